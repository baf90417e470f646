//! Results checked against DuckDB on the same files.

use volley::prelude::*;

use crate::common::*;

#[test]
fn counts_sums_and_groups_match_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let path = dir.path().join("data");
    let path = path.to_str().unwrap();
    c.from_batches(vec![sample(50_000), sample(20_000)])
        .unwrap()
        .write_parquet(path)
        .unwrap();
    let glob = format!("{path}/*.parquet");

    // volley: Dataset API
    let ds = c.read_parquet(path).unwrap();
    let filtered = ds.filter(col("value").gt(lit(100.0))).unwrap();
    let count = filtered.count().unwrap();
    let sum_id: i64 = i64_column(&filtered.select(&["id"]).unwrap().collect().unwrap(), "id")
        .into_iter()
        .flatten()
        .sum();
    // volley: SQL
    let groups = c
        .sql_with_files(
            "SELECT key, count(*) AS n, sum(id) AS s FROM t GROUP BY key ORDER BY key NULLS LAST",
            &[("t", path)],
        )
        .unwrap()
        .collect()
        .unwrap();
    let keys = i64_column(&groups, "key");
    let ns = i64_column(&groups, "n");
    let ss = i64_column(&groups, "s");
    let volley_groups: Vec<String> = keys
        .iter()
        .zip(&ns)
        .zip(&ss)
        .map(|((k, n), s)| {
            format!(
                "{}|{}|{}",
                k.map(|k| k.to_string()).unwrap_or("None".into()),
                n.unwrap(),
                s.unwrap()
            )
        })
        .collect();

    let out = duckdb(&format!(
        "con = duckdb.connect()\n\
         print(tuple(con.sql(\"SELECT count(*), sum(id) FROM '{glob}' WHERE value > 100\").fetchall()[0]))\n\
         for r in con.sql(\"SELECT key, count(*), sum(id) FROM '{glob}' GROUP BY key ORDER BY key NULLS LAST\").fetchall():\n    print(f'{{r[0]}}|{{r[1]}}|{{r[2]}}')\n"
    ));
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap(), format!("({count}, {sum_id})"));
    let duck_groups: Vec<&str> = lines.collect();
    assert_eq!(volley_groups, duck_groups);

    // written files read back by DuckDB
    let out2 = dir.path().join("filtered");
    filtered.write_parquet(out2.to_str().unwrap()).unwrap();
    let n = duckdb(&format!(
        "print(duckdb.sql(\"SELECT count(*) FROM '{}/*.parquet'\").fetchall()[0][0])",
        out2.display()
    ));
    assert_eq!(n.trim(), count.to_string());
}
