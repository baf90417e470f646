//! The 22 TPC-H queries through volley's SQL give DuckDB's answers.
//!
//! Data: TPC-H at scale factor 1 (`VOLLEY_TPCH_SCALE` to change) from `tpchgen-cli`
//! (installed by `scripts/test.sh`), generated into a temporary folder. Queries: `bench/tpch/qNN.sql` (the qualification
//! parameters). Every result is written to Parquet and compared with DuckDB's answer to
//! the same query as a multiset of rows, numbers to a relative tolerance of 1e-6.

#[path = "support/tpch.rs"]
mod tpch;

use volley::prelude::*;
use volley::VolleyConfig;

#[test]
fn tpch_queries_match_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let scale = std::env::var("VOLLEY_TPCH_SCALE").unwrap_or_else(|_| "1".into());
    tpch::generate(&data, &scale);
    let results = dir.path().join("results");
    std::fs::create_dir_all(&results).unwrap();

    let mut config = VolleyConfig::default();
    config.set("volley.exec.progress", "off").unwrap();
    config.set("volley.exec.preserve_order", "true").unwrap();
    let ctx = Context::try_new(config).unwrap();
    let tables: Vec<(String, String)> = tpch::TABLES
        .iter()
        .map(|t| (t.to_string(), format!("{}/{t}/", data.display())))
        .collect();
    let tables: Vec<(&str, &str)> = tables
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let queries = tpch::queries();
    for q in 1..=22 {
        let sql = std::fs::read_to_string(queries.join(format!("q{q:02}.sql"))).unwrap();
        let out = results.join(format!("q{q:02}.parquet"));
        ctx.sql_with_files(&sql, &tables)
            .and_then(|ds| {
                ds.write(out.to_str().unwrap(), volley::WriteFormat::Parquet)
                    .single_file()
                    .run()
            })
            .unwrap_or_else(|e| panic!("Q{q:02}: {e}"));
    }
    tpch::assert_duckdb_answers(&data, &results);
}
