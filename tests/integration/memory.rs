//! The memory budget holds on data several times its size.

use std::sync::Arc;

use volley::arrow::array::{Int64Array, RecordBatch, StringArray};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::prelude::*;

use crate::common::*;

#[test]
fn pipeline_larger_than_budget_stays_inside_it() {
    let budget: u64 = 16 << 20;
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.memory_limit", "16MiB").unwrap();
        cfg.set("volley.exec.batch_size", "8192").unwrap();
    });
    // ~100 bytes per row, 2M rows: about 200 MiB flows through a 16 MiB budget.
    let ds = c
        .range(2_000_000)
        .map_batches(
            "widen",
            |b: RecordBatch| {
                let id = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                let payload: StringArray = id
                    .iter()
                    .map(|v| Some(format!("{:0>96}", v.unwrap())))
                    .collect();
                let schema = Arc::new(Schema::new(vec![
                    Field::new("id", DataType::Int64, false),
                    Field::new("payload", DataType::Utf8, false),
                ]));
                Ok(RecordBatch::try_new(
                    schema,
                    vec![Arc::clone(b.column(0)), Arc::new(payload)],
                )?)
            },
            MapOptions::default(),
        )
        .map_batches(
            "slow_consumer_side",
            |b: RecordBatch| Ok(b),
            MapOptions::default().with_concurrency(1),
        );
    let mut bytes = 0u64;
    let mut rows = 0u64;
    for b in ds.iter_batches().unwrap() {
        let b = b.unwrap();
        bytes += b.get_array_memory_size() as u64;
        rows += b.num_rows() as u64;
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    assert_eq!(rows, 2_000_000);
    assert!(
        bytes > 5 * budget,
        "the data ({bytes} bytes) must be several times the budget"
    );
    let stats = ds.stats().unwrap();
    // At most one block per queue past the budget (blocks are ~1 MiB here).
    assert!(stats.peak_memory <= budget + 4 * (2 << 20), "{stats}");
}

/// Runs the `volley` binary; returns (stdout file contents' line count, stderr).
fn volley_sql(args: &[&str], stdout_to: &std::path::Path) -> String {
    let out = std::fs::File::create(stdout_to).unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_volley"))
        .arg("sql")
        .args(args)
        .stdout(out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "volley sql failed: {stderr}");
    stderr
}

/// The `peak RSS: ... (N KiB)` line of `--stats`, in bytes.
fn peak_rss(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("peak RSS:"))
        .unwrap_or_else(|| panic!("no peak RSS in: {stderr}"));
    let kib: u64 = line
        .rsplit('(')
        .next()
        .unwrap()
        .trim_end_matches(" KiB)")
        .parse()
        .unwrap();
    kib * 1024
}

/// The bytes-spilled figure of the `total:` line of `--stats`.
fn spilled(stderr: &str) -> String {
    let total = stderr.lines().find(|l| l.starts_with("total:")).unwrap();
    total.rsplit("spilled ").next().unwrap().to_string()
}

/// Sorting and aggregating data about eight times the budget finishes, spills, and keeps the
/// process's peak RSS under the budget plus a fixed overhead.
///
/// The overhead is the binary's own footprint (the peak RSS of `volley sql "SELECT 1"`,
/// about 50 MiB for a release build and 95 MiB for a debug one) plus 96 MiB for what is
/// not data held by operators: DataFusion's and Parquet's decoding buffers, the batches
/// in flight inside running tasks, the CSV writer, and allocator fragmentation. The
/// data is larger than budget + 96 MiB, so a run that held it in memory would fail.
#[test]
fn sort_and_aggregate_eight_times_the_budget_stay_inside_it() {
    const BUDGET: u64 = 32 << 20;
    const OVERHEAD: u64 = 96 << 20;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let c = ctx();
    // 6M rows: id, r (scrambled), a 24-byte payload: about 260 MiB in Arrow memory.
    let rows: i64 = 6_000_000;
    let chunk: i64 = 200_000;
    let mut batches = Vec::new();
    let mut arrow_bytes = 0u64;
    for start in (0..rows).step_by(chunk as usize) {
        let ids = start..start + chunk;
        let id: Int64Array = ids.clone().collect();
        let r: Int64Array = ids.clone().map(|i| (i * 7919) % 6_000_011).collect();
        let payload: StringArray = ids.map(|i| Some(format!("payload-{i:016}"))).collect();
        let b = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, false),
                Field::new("r", DataType::Int64, false),
                Field::new("payload", DataType::Utf8, false),
            ])),
            vec![Arc::new(id), Arc::new(r), Arc::new(payload)],
        )
        .unwrap();
        arrow_bytes += b.get_array_memory_size() as u64;
        batches.push(b);
    }
    assert!(arrow_bytes >= 5 * BUDGET, "{arrow_bytes}");
    c.from_batches(batches)
        .unwrap()
        .write_parquet(data.to_str().unwrap())
        .unwrap();
    let table = format!("t={}", data.display());
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&spill).unwrap();
    let common = [
        "--memory-limit",
        "32MiB",
        "--spill-dir",
        spill.to_str().unwrap(),
        "--stats",
        "--format",
        "csv",
        "--table",
        &table,
    ];

    let idle = peak_rss(&volley_sql(
        &["--stats", "SELECT 1"],
        &dir.path().join("one.txt"),
    ));
    let limit = idle + BUDGET + OVERHEAD;
    assert!(
        arrow_bytes > limit,
        "the data must not fit under the RSS limit"
    );

    // Sort everything (by one integer key: kept in memory up to half the budget,
    // then handed to the spilling sort).
    let sorted_csv = dir.path().join("sorted.csv");
    let mut args = common.to_vec();
    args.push("SELECT * FROM t ORDER BY r");
    let stderr = volley_sql(&args, &sorted_csv);
    let rss = peak_rss(&stderr);
    assert!(rss < limit, "sort peak RSS {rss}, limit {limit}\n{stderr}");
    assert_ne!(spilled(&stderr), "0 B", "{stderr}");
    let text = std::fs::read_to_string(&sorted_csv).unwrap();
    let mut prev = -1i64;
    let mut n = 0;
    for line in text.lines().skip(1) {
        let r: i64 = line.split(',').nth(1).unwrap().parse().unwrap();
        assert!(r >= prev, "not sorted at line {n}");
        prev = r;
        n += 1;
    }
    assert_eq!(n, rows);
    drop(text);

    // Group by a key with a million values.
    let grouped_csv = dir.path().join("grouped.csv");
    let mut args = common.to_vec();
    args.push("SELECT id % 1000000 AS k, count(*) AS n, max(payload) AS m, sum(r) AS s FROM t GROUP BY id % 1000000");
    let stderr = volley_sql(&args, &grouped_csv);
    let rss = peak_rss(&stderr);
    assert!(
        rss < limit,
        "aggregate peak RSS {rss}, limit {limit}\n{stderr}"
    );
    let text = std::fs::read_to_string(&grouped_csv).unwrap();
    let mut groups = 0;
    let mut total = 0i64;
    for line in text.lines().skip(1) {
        total += line.split(',').nth(1).unwrap().parse::<i64>().unwrap();
        groups += 1;
    }
    assert_eq!(groups, 1_000_000);
    assert_eq!(total, rows);
    // The spill folder is left empty.
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
}

/// A hash join fits a budget that holds its build side as a hash table, even where the
/// build's keys fill a sixteenth of their range: under a small budget such keys are not
/// indexed by an array over the whole range (4 bytes per key in it: 64 MiB here for
/// 1 M build rows, where the hash table takes ~20 MiB).
#[test]
fn a_join_on_sparse_keys_fits_a_small_budget() {
    let dir = tempfile::tempdir().unwrap();
    // One CPU: the build side (16 MB by its files' statistics) is built once, whole
    // (`CollectLeft`), not split by key among partitions (each part would fill too
    // little of the range for an array at any setting).
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.memory_limit", "64MiB").unwrap();
        cfg.set("volley.runtime.num_cpus", "1").unwrap();
    });
    let build = dir.path().join("build");
    let probe = dir.path().join("probe");
    c.range(1_000_000)
        .with_column("k", col("id") * lit(16i64))
        .unwrap()
        .write_parquet(build.to_str().unwrap())
        .unwrap();
    c.range(5_333_334)
        .with_column("k", col("id") * lit(3i64))
        .unwrap()
        .write_parquet(probe.to_str().unwrap())
        .unwrap();
    c.register_files("b", build.to_str().unwrap()).unwrap();
    c.register_files("p", probe.to_str().unwrap()).unwrap();
    let out = c
        .sql(
            "SELECT count(*) AS n, sum(b.id) AS s FROM p JOIN b ON p.k = b.k",
            &[],
        )
        .unwrap()
        .collect()
        .unwrap();
    let value = |name: &str| {
        out[0]
            .column_by_name(name)
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0)
    };
    // Build keys 16j meet probe keys 3i where j is a multiple of 3.
    assert_eq!(value("n"), 333_334);
    assert_eq!(value("s"), 3 * 333_333 * 333_334 / 2);
}

/// In ordered mode (every local exchange runs its input ordered) a union's later input
/// can fill the budget with blocks that wait behind the first input's next sequence:
/// the first input's operator must still start its next task, or nothing moves again.
#[test]
fn an_ordered_union_whose_later_input_fills_the_budget_finishes() {
    let c = ctx_with(|cfg| {
        cfg.set("volley.exec.memory_limit", "16MiB").unwrap();
        cfg.set("volley.runtime.num_cpus", "2").unwrap();
    });
    let (a, b) = (c.range(4_000_000), c.range(4_000_000));
    let shuffled = a.union(&[&b]).unwrap().random_shuffle(7).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rows: usize = shuffled
            .iter_batches()
            .unwrap()
            .map(|b| b.unwrap().num_rows())
            .sum();
        let _ = tx.send(rows);
    });
    let rows = rx
        .recv_timeout(std::time::Duration::from_secs(240))
        .expect("the union stalled: its first input never started its next task");
    assert_eq!(rows, 8_000_000);
}
