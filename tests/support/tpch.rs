//! TPC-H data and DuckDB's answers, for the tests that run the 22 queries (included
//! by `tests/tpch.rs` and `tests/cluster.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The TPC-H tables.
pub const TABLES: [&str; 8] = [
    "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
];

/// TPC-H at `scale` as Parquet in `dir`, one folder per table.
pub fn generate(dir: &Path, scale: &str) {
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

/// The query files: `bench/tpch/qNN.sql` (the qualification parameters).
pub fn queries() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/tpch")
}

/// Checks that `results/qNN.parquet` (q01 to q22) hold DuckDB's answers to the queries
/// over `data` (one folder per table), as multisets of rows, numbers to a relative
/// tolerance of 1e-6.
pub fn assert_duckdb_answers(data: &Path, results: &Path) {
    let queries = queries();
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
