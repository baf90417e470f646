//! Benchmark: volley against its peers on TPC-H data (W1-W8).
//!
//! ```text
//! # data: bash bench/gen_tpch.sh 1 /tmp/tpch-sf1
//! cargo run --release --example bench_workloads -- compare --tpch /tmp/tpch-sf1 \
//!     --peers duckdb,polars,datafusion --runs 5
//! ```
//!
//! Every run is a fresh process timed from outside with `/usr/bin/time` (wall time and
//! peak RSS), volley's as much as the peers' (`bench/peers/bench_*.py`). The
//! program prints the median per engine and workload and volley's ratio to each peer.
//!
//! Ray Data cannot filter the `string_view` columns `tpchgen-cli` writes, so it reads a
//! plain-string copy of `lineitem` (`bench/peers/make_utf8_copy.py`), by default
//! `<tpch>-utf8/lineitem` (`--utf8-copy DIR` to change).
//!
//! - W1: read `lineitem`, keep `l_shipdate <= 1998-09-02 AND l_quantity < 30`, five
//!   columns plus `disc_price = l_extendedprice * (1 - l_discount)`, write Parquet.
//! - W2: TPC-H Q1 through volley's SQL.
//! - W3: `map_batches` of a Rust function over `l_orderkey, l_partkey, l_suppkey` in
//!   batches of 65,536 rows, then the count and the sum of its output.
//! - W4: full sort of `lineitem` by `l_extendedprice`, written to Parquet.
//! - W5: `random_shuffle` of `lineitem` (peer: Ray Data), then count and sum.
//! - W6: the 22 TPC-H queries (`bench/tpch/`; peers: DuckDB and DataFusion's bindings
//!   through `run_tpch.py`); the in-engine time is the sum over the queries.
//! - W7: `lineitem` grouped by `l_suppkey` with 4 aggregates (`bench/peers/relational.py`).
//! - W8: `lineitem` joined with `orders` on the order key, then count and two sums.
//! - `oocsort` (volley only, `run oocsort`): W4 under the memory budget set by
//!   `VOLLEY_EXEC_MEMORY_LIMIT`; prints bytes spilled and peak RSS.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

use volley::arrow::array::{Array, Int64Array, RecordBatch};
use volley::arrow::datatypes::{DataType, Field, Schema};
use volley::datafusion::prelude::{cast, lit as df_lit};
use volley::prelude::*;

/// The workloads, and volley's runs of them.
#[derive(Parser)]
#[command(about = "volley against its peers on TPC-H data (W1-W8)")]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Runs one workload through volley in this process and prints its RESULT line.
    Run {
        /// w1..w8, or oocsort (W4 under VOLLEY_EXEC_MEMORY_LIMIT).
        workload: String,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Runs the workloads through volley and the peers, each run a fresh process timed
    /// from outside, and prints medians and ratios.
    Compare {
        #[command(flatten)]
        data: DataArgs,
        /// Runs per engine and workload (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Peer engines: duckdb, polars, datafusion, daft, ray.
        #[arg(long, default_value = "duckdb,polars,datafusion")]
        peers: String,
        /// Folder of the peers' scripts.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers"))]
        peer_dir: String,
        /// Workloads to run, comma-separated.
        #[arg(long, default_value = "w1,w2,w3")]
        workloads: String,
        /// Plain-string copy of the TPC-H folder for Ray Data (default: `<tpch>-utf8`).
        #[arg(long)]
        utf8_copy: Option<String>,
    },
}

#[derive(clap::Args)]
struct DataArgs {
    /// The TPC-H folder (`bench/gen_tpch.sh` writes one).
    #[arg(long, default_value = "/tmp/tpch-sf1")]
    tpch: String,
    /// Where written outputs go.
    #[arg(long, default_value = "/tmp/out")]
    out: String,
}

fn main() {
    let result = match Cli::parse().command {
        BenchCommand::Run { workload, data } => run_volley(&workload, &data.tpch, &data.out),
        BenchCommand::Compare {
            data,
            runs,
            peers,
            peer_dir,
            workloads,
            utf8_copy,
        } => {
            let (tpch, out) = (data.tpch, data.out);
            let utf8 = utf8_copy.unwrap_or_else(|| format!("{}-utf8", tpch.trim_end_matches('/')));
            let ray_dir = format!("{utf8}/lineitem");
            let envs = [
                ("TPCH_DIR", tpch.as_str()),
                ("OUT_DIR", out.as_str()),
                ("RAY_LINEITEM_DIR", ray_dir.as_str()),
                ("RAY_TPCH_DIR", utf8.as_str()),
            ];
            compare(&tpch, &out, runs, &peers, &peer_dir, &workloads, &envs);
            Ok(())
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

/// `bench/tpch/qNN.sql`, from the repository root or the crate folder.
fn query_path(q: usize) -> String {
    format!("{}/bench/tpch/q{q:02}.sql", env!("CARGO_MANIFEST_DIR"))
}

/// The sum of a numeric column as f64.
fn float_sum(b: &RecordBatch, i: usize) -> volley::Result<f64> {
    let c = volley::arrow::compute::cast(b.column(i), &DataType::Float64)?;
    let c = c
        .as_any()
        .downcast_ref::<volley::arrow::array::Float64Array>()
        .expect("cast to Float64");
    Ok(c.iter().flatten().sum())
}

/// This process's peak resident memory in KiB (Linux), 0 elsewhere.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn run_volley(workload: &str, tpch: &str, out: &str) -> volley::Result<()> {
    let ctx = volley::init()?;
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
            let q1 = std::fs::read_to_string(query_path(1))
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
        "w4" | "oocsort" => {
            let dest = format!("{out}/volley/{workload}");
            let _ = std::fs::remove_dir_all(&dest);
            let sorted = ctx
                .read_parquet(lineitem.as_str())?
                .sort(["l_extendedprice"])?;
            let summary = sorted.write_parquet(&dest)?;
            let spilled = sorted.stats().map(|s| s.spilled_bytes()).unwrap_or(0);
            println!(
                "RESULT engine=volley workload={workload} elapsed_s={:.3} rows={} files={} spilled_bytes={spilled} budget={} peak_rss_kib={}",
                start.elapsed().as_secs_f64(),
                summary.rows,
                summary.files.len(),
                ctx.exec_context().memory_limit(),
                peak_rss_kib()
            );
        }
        "w5" => {
            let shuffled = ctx.read_parquet(lineitem.as_str())?.random_shuffle(42)?;
            let (mut rows, mut sum) = (0u64, 0i64);
            let mut first = Vec::new();
            for b in shuffled.iter_batches()? {
                let b = b?;
                rows += b.num_rows() as u64;
                let k = int_col(&b, b.schema().index_of("l_orderkey")?)?;
                if first.len() < 3 {
                    first.extend(
                        k.values()
                            .iter()
                            .take(3 - first.len())
                            .map(|v| v.to_string()),
                    );
                }
                sum += k.values().iter().sum::<i64>();
            }
            println!(
                "RESULT engine=volley workload=w5 elapsed_s={:.3} rows={rows} sum_orderkey={sum} first_orderkeys={}",
                start.elapsed().as_secs_f64(),
                first.join(",")
            );
        }
        "w6" => {
            // Registered once, outside the timing, as the peers' set-up is.
            for t in [
                "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation",
                "region",
            ] {
                ctx.register_files(t, &format!("{tpch}/{t}/"))?;
            }
            let mut total = 0.0;
            for q in 1..=22 {
                let sql = std::fs::read_to_string(query_path(q))
                    .map_err(|e| VolleyError::plan(format!("reading q{q:02}.sql: {e}")))?;
                let t = Instant::now();
                let rows: usize = ctx
                    .sql(&sql, &[])?
                    .collect()?
                    .iter()
                    .map(|b| b.num_rows())
                    .sum();
                let secs = t.elapsed().as_secs_f64();
                total += secs;
                println!("Q{q:02} {secs:8.3}s rows={rows}");
            }
            println!("RESULT engine=volley workload=w6 elapsed_s={total:.3} queries=22");
        }
        "w7" => {
            let groups = ctx
                .read_parquet(lineitem.as_str())?
                .groupby(&["l_suppkey"])
                .agg([
                    agg::count_all().alias("n"),
                    agg::sum("l_quantity").alias("q"),
                    agg::mean("l_extendedprice").alias("p"),
                    agg::max("l_discount").alias("d"),
                ])?
                .collect()?;
            let (mut n_groups, mut rows, mut qty) = (0usize, 0i64, 0f64);
            for b in &groups {
                n_groups += b.num_rows();
                rows += int_col(b, 1)?.values().iter().sum::<i64>();
                qty += float_sum(b, 2)?;
            }
            println!(
                "RESULT engine=volley workload=w7 elapsed_s={:.3} groups={n_groups} rows={rows} sum_qty={qty:.2}",
                start.elapsed().as_secs_f64()
            );
        }
        "w8" => {
            let li = ctx
                .read_parquet(lineitem.as_str())?
                .select(&["l_orderkey", "l_extendedprice"])?;
            let orders = ctx
                .read_parquet(format!("{tpch}/orders/").as_str())?
                .select(&["o_orderkey", "o_totalprice"])?;
            let out = li
                .join_on(&orders, &["l_orderkey"], &["o_orderkey"], JoinHow::Inner)?
                .aggregate([
                    agg::count_all(),
                    agg::sum("l_extendedprice"),
                    agg::sum("o_totalprice"),
                ])?
                .collect_batch()?;
            println!(
                "RESULT engine=volley workload=w8 elapsed_s={:.3} rows={} sum_price={:.2} sum_total={:.2}",
                start.elapsed().as_secs_f64(),
                int_col(&out, 0)?.value(0),
                float_sum(&out, 1)?,
                float_sum(&out, 2)?
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

/// How a peer runs workload `w`, if it has that workload.
fn peer_command(engine: &str, w: &str, peer_dir: &str) -> Option<Vec<String>> {
    let py = |script: String, args: &[&str]| {
        let mut v = vec!["python3".to_string(), script];
        v.extend(args.iter().map(|a| a.to_string()));
        Some(v)
    };
    match (w, engine) {
        ("w1" | "w2" | "w3" | "w4", _) => py(format!("{peer_dir}/bench_{engine}.py"), &[w]),
        ("w5", "ray") => py(format!("{peer_dir}/bench_ray.py"), &[w]),
        ("w6", "duckdb" | "datafusion") => py(format!("{peer_dir}/run_tpch.py"), &[engine]),
        ("w7" | "w8", _) => py(format!("{peer_dir}/relational.py"), &[engine, w]),
        _ => None,
    }
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
    let mut table: BTreeMap<(String, String), (f64, f64, f64)> = BTreeMap::new();
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
                match peer_command(e, w, peer_dir) {
                    Some(c) => c,
                    None => continue,
                }
            };
            let mut walls = Vec::new();
            let mut inner = Vec::new();
            let mut rss = Vec::new();
            let mut last = String::new();

            for _ in 0..runs {
                if let Some((wall, kib, result)) = timed(&cmd, envs) {
                    walls.push(wall);
                    rss.push(kib as f64 / 1024.0);
                    if let Some(v) = result
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("elapsed_s="))
                        .and_then(|v| v.parse::<f64>().ok())
                    {
                        inner.push(v);
                    }
                    last = result;
                }
            }
            if walls.is_empty() {
                continue;
            }
            let (mw, mr) = (median(&mut walls), median(&mut rss));
            let mi = if inner.is_empty() {
                f64::NAN
            } else {
                median(&mut inner)
            };
            println!("{w} {e:<11} median {mw:>7.2} s  peak {mr:>7.0} MiB  runs {walls:?}  {last}");
            table.insert((w.to_string(), e.clone()), (mw, mr, mi));
        }
    }
    println!(
        "\nworkload  engine       median wall   peak RSS   in-engine   volley/engine (wall)  (in-engine)"
    );
    for ((w, e), (wall, rss, inner)) in &table {
        let mine = table.get(&(w.clone(), "volley".to_string()));
        let ratio = mine
            .map(|(v, _, _)| format!("{:.2}", v / wall))
            .unwrap_or_default();
        let inner_ratio = mine
            .map(|(_, _, vi)| format!("{:.2}", vi / inner))
            .unwrap_or_default();
        println!(
            "{w:<9} {e:<12} {wall:>9.2} s {rss:>8.0} MiB {inner:>8.2} s   {ratio:>8}             {inner_ratio:>6}"
        );
    }
}
