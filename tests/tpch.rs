//! The 22 TPC-H queries through volley's SQL give DuckDB's answers.
//!
//! Data: TPC-H at scale factor 1 (`VOLLEY_TPCH_SCALE` to change) from `tpchgen-cli`
//! (installed by `scripts/test.sh`), generated into a temporary folder. Queries: `bench/tpch/qNN.sql` (the qualification
//! parameters). Every result is written to Parquet and compared with DuckDB's answer to
//! the same query as a multiset of rows, numbers to a relative tolerance of 1e-6.

use std::path::Path;
use std::process::Command;

use volley::prelude::*;
use volley::VolleyConfig;

const TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

fn generate(dir: &Path, scale: &str) {
    let out = Command::new("tpchgen-cli")
        .args(["parquet", "-s", scale, "--output-dir"])
        .arg(dir)
        .args(["--parts", "1", "--no-progress"])
        .output()
        .expect("tpchgen-cli must be installed (scripts/test.sh installs it with pip)");
    assert!(
        out.status.success(),
        "tpchgen-cli failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn tpch_queries_match_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let scale = std::env::var("VOLLEY_TPCH_SCALE").unwrap_or_else(|_| "1".into());
    generate(&data, &scale);
    let results = dir.path().join("results");
    std::fs::create_dir_all(&results).unwrap();

    let mut config = VolleyConfig::default();
    config.set("volley.exec.progress", "off").unwrap();
    config.set("volley.exec.preserve_order", "true").unwrap();
    let ctx = Context::try_new(config).unwrap();
    let tables: Vec<(String, String)> = TABLES
        .iter()
        .map(|t| (t.to_string(), format!("{}/{t}/", data.display())))
        .collect();
    let tables: Vec<(&str, &str)> = tables
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let queries = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/tpch");
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

    let script = format!(
        r#"
import decimal, math, sys
import duckdb
con = duckdb.connect()
for t in {tables:?}:
    con.execute(f"create view {{t}} as select * from read_parquet('{data}/{{t}}/*.parquet')")
def norm(x):
    if isinstance(x, (float, decimal.Decimal)):
        return ("n", round(float(x), 2))
    return ("v", str(x)) if x is not None else ("null", "")
bad = []
for q in range(1, 23):
    sql = open(f"{queries}/q{{q:02d}}.sql").read()
    d = con.sql(sql).fetchall()
    v = con.sql(f"select * from read_parquet('{results}/q{{q:02d}}.parquet')").fetchall()
    if len(d) != len(v):
        bad.append(f"Q{{q:02d}}: duckdb {{len(d)}} rows, volley {{len(v)}}")
        continue
    key = lambda r: [norm(x) for x in r]
    d.sort(key=key)
    v.sort(key=key)
    for i, (a, b) in enumerate(zip(d, v)):
        same = len(a) == len(b) and all(
            (x is None and y is None) or (
                x is not None and y is not None and (
                    math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-6)
                    if isinstance(x, (float, decimal.Decimal)) or isinstance(y, (float, decimal.Decimal))
                    else str(x) == str(y)))
            for x, y in zip(a, b))
        if not same:
            bad.append(f"Q{{q:02d}} row {{i}}: duckdb {{a}} volley {{b}}")
            break
    print(f"Q{{q:02d}} {{len(v)}} rows")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
"#,
        tables = TABLES,
        data = data.display(),
        queries = queries.display(),
        results = results.display(),
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3 with duckdb (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "answers differ from DuckDB's:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
