//! Benchmark: volley against its peers on TPC-H data (W1-W3 of `shared/bench`).
//!
//! ```text
//! # data: bash ../shared/bench/gen_tpch.sh 1 /tmp/tpch-sf1
//! cargo run --release --example bench_workloads -- compare --tpch /tmp/tpch-sf1 \
//!     --peers duckdb,polars,datafusion --runs 5
//! ```
//!
//! Every run is a fresh process timed from outside with `/usr/bin/time` (wall time and
//! peak RSS), volley's as much as the peers' (`../shared/bench/peers/bench_*.py`). The
//! program prints the median per engine and workload and volley's ratio to each peer.
//!
//! Ray Data cannot filter the `string_view` columns `tpchgen-cli` writes, so it reads a
//! plain-string copy of `lineitem` (`../shared/bench/peers/make_utf8_copy.py`), by default
//! `<tpch>-utf8/lineitem` (`--utf8-copy DIR` to change).
//!
//! - W1: read `lineitem`, keep `l_shipdate <= 1998-09-02 AND l_quantity < 30`, five
//!   columns plus `disc_price = l_extendedprice * (1 - l_discount)`, write Parquet.
//! - W2: TPC-H Q1 through volley's SQL.
//! - W3: `map_batches` of a Rust function over `l_orderkey, l_partkey, l_suppkey` in
//!   batches of 65,536 rows, then the count and the sum of its output.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use volley::arrow::array::{Array, Int64Array, RecordBatch};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::datafusion::prelude::{cast, lit as df_lit};
use volley::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let tpch = get("--tpch", "/tmp/tpch-sf1");
    let out = get("--out", "/tmp/out");
    let result = match args.first().map(String::as_str) {
        Some("run") => run_volley(args.get(1).map(String::as_str).unwrap_or("w1"), &tpch, &out),
        Some("compare") => {
            let runs: usize = get("--runs", "5").parse().unwrap_or(5);
            let peers = get("--peers", "duckdb,polars,datafusion");
            let peer_dir = get("--peer-dir", "../shared/bench/peers");
            let workloads = get("--workloads", "w1,w2,w3");
            let utf8 = get(
                "--utf8-copy",
                &format!("{}-utf8", tpch.trim_end_matches('/')),
            );
            let ray_dir = format!("{utf8}/lineitem");
            let envs = [
                ("TPCH_DIR", tpch.as_str()),
                ("OUT_DIR", out.as_str()),
                ("RAY_LINEITEM_DIR", ray_dir.as_str()),
            ];
            compare(&tpch, &out, runs, &peers, &peer_dir, &workloads, &envs);
            Ok(())
        }
        _ => {
            eprintln!("usage: bench_workloads run w1|w2|w3 [--tpch DIR] [--out DIR]\n       bench_workloads compare [--tpch DIR] [--runs N] [--peers duckdb,polars,datafusion,ray] [--peer-dir DIR] [--workloads w1,w2,w3] [--utf8-copy DIR]");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("volley: error: {e}");
        std::process::exit(1);
    }
}

/// The W3 mix, wrapping u64 arithmetic as the peers compute it.
fn mix3(a: i64, b: i64, c: i64) -> i64 {
    let mut h = (a as u64).wrapping_mul(0x9E3779B97F4A7C15)
        ^ (b as u64).wrapping_mul(0xC2B2AE3D27D4EB4F)
        ^ (c as u64).wrapping_mul(0x165667B19E3779F9);
    h ^= h >> 29;
    (h % 1_000_003) as i64
}

fn int_col(b: &RecordBatch, i: usize) -> volley::Result<Int64Array> {
    let c = volley::arrow::compute::cast(b.column(i), &DataType::Int64)?;
    Ok(c.as_any()
        .downcast_ref::<Int64Array>()
        .expect("cast to Int64")
        .clone())
}

fn run_volley(workload: &str, tpch: &str, out: &str) -> volley::Result<()> {
    let ctx = volley::init();
    let lineitem = format!("{tpch}/lineitem/");
    let start = Instant::now();
    match workload {
        "w1" => {
            let dest = format!("{out}/volley/w1");
            let _ = std::fs::remove_dir_all(&dest);
            let ds = ctx
                .read_parquet(lineitem.as_str())?
                .filter(
                    col("l_shipdate")
                        .lt_eq(cast(df_lit("1998-09-02"), DataType::Date32))
                        .and(col("l_quantity").lt(df_lit(30))),
                )?
                .select_exprs(vec![
                    col("l_orderkey"),
                    col("l_quantity"),
                    col("l_extendedprice"),
                    col("l_discount"),
                    col("l_shipmode"),
                    (col("l_extendedprice") * (df_lit(1) - col("l_discount"))).alias("disc_price"),
                ])?;
            let summary = ds.write_parquet(&dest)?;
            println!(
                "RESULT engine=volley workload=w1 elapsed_s={:.3} rows={} files={}",
                start.elapsed().as_secs_f64(),
                summary.rows,
                summary.files.len()
            );
        }
        "w2" => {
            let q1 = std::fs::read_to_string("../shared/bench/peers/tpch_queries/q01.sql")
                .map_err(|e| VolleyError::plan(format!("reading q01.sql: {e}")))?;
            let result = ctx
                .sql_with_files(&q1, &[("lineitem", lineitem.as_str())])?
                .collect()?;
            let rows: usize = result.iter().map(|b| b.num_rows()).sum();
            let mut count = 0i64;
            for b in &result {
                count += int_col(b, b.num_columns() - 1)?
                    .values()
                    .iter()
                    .sum::<i64>();
            }
            println!(
                "RESULT engine=volley workload=w2 elapsed_s={:.3} rows={rows} count_order_total={count}",
                start.elapsed().as_secs_f64()
            );
        }
        "w3" => {
            let schema = Arc::new(Schema::new(vec![Field::new("h", DataType::Int64, false)]));
            let ds = ctx
                .read_parquet(lineitem.as_str())?
                .select(&["l_orderkey", "l_partkey", "l_suppkey"])?
                .map_batches(
                    "mix3",
                    move |b: RecordBatch| {
                        let (a, bb, c) = (int_col(&b, 0)?, int_col(&b, 1)?, int_col(&b, 2)?);
                        let h: Int64Array = a
                            .values()
                            .iter()
                            .zip(bb.values().iter())
                            .zip(c.values().iter())
                            .map(|((a, b), c)| mix3(*a, *b, *c))
                            .collect();
                        Ok(RecordBatch::try_new(
                            Arc::clone(&schema),
                            vec![Arc::new(h)],
                        )?)
                    },
                    MapOptions::default().with_batch_size(65_536),
                );
            let (mut rows, mut sum) = (0u64, 0i64);
            for b in ds.iter_batches()? {
                let b = b?;
                rows += b.num_rows() as u64;
                let h = b
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("h");
                sum += h.values().iter().sum::<i64>();
                debug_assert_eq!(h.null_count(), 0);
            }
            println!(
                "RESULT engine=volley workload=w3 elapsed_s={:.3} rows={rows} sum_h={sum}",
                start.elapsed().as_secs_f64()
            );
        }
        other => return Err(VolleyError::plan(format!("unknown workload {other}"))),
    }
    Ok(())
}

/// One timed process: (wall seconds, peak RSS in KiB, its RESULT line).
fn timed(cmd: &[String], envs: &[(&str, &str)]) -> Option<(f64, u64, String)> {
    let output = Command::new("/usr/bin/time")
        .args(["-f", "TIME %e %M"])
        .args(cmd)
        .envs(envs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        eprintln!("  failed: {}\n{stderr}", cmd.join(" "));
        return None;
    }
    let line = stderr.lines().rev().find(|l| l.starts_with("TIME "))?;
    let mut parts = line.split_whitespace().skip(1);
    let wall: f64 = parts.next()?.parse().ok()?;
    let rss: u64 = parts.next()?.parse().ok()?;
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .unwrap_or("")
        .to_string();
    Some((wall, rss, result))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn compare(
    tpch: &str,
    out: &str,
    runs: usize,
    peers: &str,
    peer_dir: &str,
    workloads: &str,
    envs: &[(&str, &str)],
) {
    let me = std::env::current_exe()
        .expect("own path")
        .to_string_lossy()
        .to_string();
    let mut engines: Vec<String> = vec!["volley".into()];
    engines.extend(peers.split(',').filter(|p| !p.is_empty()).map(String::from));
    let mut table: BTreeMap<(String, String), (f64, f64, String)> = BTreeMap::new();
    for w in workloads.split(',') {
        for e in &engines {
            let cmd: Vec<String> = if e == "volley" {
                vec![
                    me.clone(),
                    "run".into(),
                    w.into(),
                    "--tpch".into(),
                    tpch.into(),
                    "--out".into(),
                    out.into(),
                ]
            } else {
                vec![
                    "python3".into(),
                    format!("{peer_dir}/bench_{e}.py"),
                    w.into(),
                ]
            };
            let mut walls = Vec::new();
            let mut rss = Vec::new();
            let mut last = String::new();
            for _ in 0..runs {
                if let Some((wall, kib, result)) = timed(&cmd, envs) {
                    walls.push(wall);
                    rss.push(kib as f64 / 1024.0);
                    last = result;
                }
            }
            if walls.is_empty() {
                continue;
            }
            let (mw, mr) = (median(&mut walls), median(&mut rss));
            println!("{w} {e:<11} median {mw:>7.2} s  peak {mr:>7.0} MiB  runs {walls:?}  {last}");
            table.insert((w.to_string(), e.clone()), (mw, mr, last));
        }
    }
    println!("\nworkload  engine       median wall   peak RSS   volley time / engine time");
    for ((w, e), (wall, rss, _)) in &table {
        let ratio = table
            .get(&(w.clone(), "volley".to_string()))
            .map(|(v, _, _)| format!("{:.2}", v / wall))
            .unwrap_or_default();
        println!("{w:<9} {e:<12} {wall:>9.2} s {rss:>8.0} MiB   {ratio}");
    }
}
