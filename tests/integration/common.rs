//! Shared fixtures.

use std::sync::Arc;

use volley::arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::{Context, VolleyConfig};

/// A context with quiet progress and the given memory limit.
pub fn ctx() -> Context {
    ctx_with(|_| {})
}

pub fn ctx_with(f: impl FnOnce(&mut VolleyConfig)) -> Context {
    let mut c = VolleyConfig::default();
    c.set("volley.exec.progress", "off").unwrap();
    f(&mut c);
    Context::try_new(c).unwrap()
}

/// `n` rows: id, key (id % 7, null every 11th), value (id * 0.5), name ("n" + id % 3).
pub fn sample(n: i64) -> RecordBatch {
    let id: Int64Array = (0..n).collect();
    let key: Int64Array = (0..n)
        .map(|i| if i % 11 == 0 { None } else { Some(i % 7) })
        .collect();
    let value: Float64Array = (0..n).map(|i| Some(i as f64 * 0.5)).collect();
    let name: StringArray = (0..n).map(|i| Some(format!("n{}", i % 3))).collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("key", DataType::Int64, true),
            Field::new("value", DataType::Float64, false),
            Field::new("name", DataType::Utf8, false),
        ])),
        vec![Arc::new(id), Arc::new(key), Arc::new(value), Arc::new(name)],
    )
    .unwrap()
}

pub fn total_rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// All values of an Int64 column, in order.
pub fn i64_column(batches: &[RecordBatch], name: &str) -> Vec<Option<i64>> {
    let mut out = Vec::new();
    for b in batches {
        let c = b.column(b.schema().index_of(name).unwrap());
        let c = volley::arrow::compute::cast(c, &DataType::Int64).unwrap();
        let c = c.as_any().downcast_ref::<Int64Array>().unwrap();
        out.extend((0..c.len()).map(|i| c.is_valid(i).then(|| c.value(i))));
    }
    out
}

/// Runs Python with DuckDB and returns its stdout; fails with the reason otherwise.
pub fn duckdb(script: &str) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("import duckdb\n{script}"))
        .output()
        .expect("python3 must be installed (scripts/test.sh installs the oracle)");
    assert!(
        out.status.success(),
        "DuckDB oracle failed (run scripts/test.sh, which installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
