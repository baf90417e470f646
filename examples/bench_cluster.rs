//! Benchmark: volley's cluster against Ray on this machine.
//!
//! ```text
//! cargo build --release --bin volley --example bench_cluster --example cluster_pipeline
//! target/release/examples/bench_cluster --nodes 2 --runs 3
//! ```
//!
//! Starts a local volley cluster (a head and `--nodes` node agents splitting this
//! machine's CPUs) with the `volley` binary next to this program, and for each run:
//!
//! - `tasks`: 2,000 no-op tasks (1 CPU each), all submitted, then all fetched; the
//!   figure is tasks per second. The peer is 2,000 `@ray.remote` tasks on `ray.init()`.
//! - `pipeline`: `cluster_pipeline` (read Parquet, an expression column, a named
//!   transform computing `sqrt(x) * weight`, a filter, write Parquet) over 16 files of
//!   500,000 rows, submitted as a job; the figure is the job's own time from its log
//!   (without the binary upload). The peer is the same pipeline in Ray Data
//!   (`bench/peers/cluster_ray.py`).
//!
//! Prints medians and volley's speed-up over Ray for each.
//!
//! With `--suite exchange --tpch DIR` (data: `bash bench/gen_tpch.sh 1 DIR` and, for
//! Ray, `python3 bench/peers/make_utf8_copy.py DIR DIR-utf8 lineitem,orders`) it runs
//! the all-to-all workloads instead, each as a job on the cluster against Ray Data on
//! `ray.init()` (`bench/peers/bench_ray.py`, `bench/peers/relational.py`):
//!
//! - W4: `lineitem` sorted by `l_extendedprice`, written to Parquet.
//! - W5: `random_shuffle(42)` of `lineitem`, then its rows and the sum of `l_orderkey`
//!   (counted on the nodes: Ray materializes the shuffle, then counts and sums).
//! - W7: `lineitem` grouped by `l_suppkey` with four aggregates.
//! - W8: `lineitem` joined with `orders` on the order key, then the count and two sums.
//! - W9: `lineitem` joined with the small `supplier`, then the count and two sums: its
//!   right side is broadcast; W9p runs it with broadcast joins off (partitioned).
//!
//! The figure for both is the workload's own time (without process and cluster start).
//!
//! With `--suite sql --tpch DIR` it runs the 22 TPC-H queries (`bench/tpch/`) through
//! `volley sql` on the cluster (its stages on the nodes) and through the same binary in
//! one process (the cost of distribution); the figure for both is the command's wall
//! time, process start included, the result written to Parquet.
//!
//! With `--suite operate` it measures operating the cluster:
//!
//! - head restart: the `pipeline` job (with `--restart-with-pool`, also its model stage
//!   on `--actors` actors) once without faults, then again with the head
//!   killed (`kill -9`) halfway and started again on its state folder: seconds from the
//!   new head's start to its nodes back, to the job's driver running (the same
//!   process: it goes on), to a task done past those done before the kill; and the
//!   job's total time over the fault-free one.
//! - dashboard: the head's CPU share (its process's CPU seconds over the wall time)
//!   while `--tasks` no-op tasks run, alone and with a client fetching what an open
//!   dashboard fetches every second. The peer is the same tasks on `ray.init()`: the CPU
//!   its control plane (GCS server and raylet) spends per task, against the head's.
//!   (No peer for the head restart: Ray's GCS fault tolerance needs an external Redis,
//!   not run here.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use volley::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use volley::crates::runtime::cluster::{
    object_value, value_object, RemoteTask, TaskContext, TaskOptions,
};
use volley::prelude::*;
use volley::{agg, NamedTransform};

/// Returns its number.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Noop(u64);

#[typetag::serde]
impl RemoteTask for Noop {
    fn run(&self, _: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        value_object(&self.0)
    }
}

/// One row per block: its rows and the sum of its `l_orderkey` (W5's count, made where
/// the shuffled blocks are).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RowsAndSum;

#[typetag::serde]
impl NamedTransform for RowsAndSum {
    fn transform(&self, batch: RecordBatch) -> Result<RecordBatch> {
        let keys = batch
            .column_by_name("l_orderkey")
            .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
            .ok_or_else(|| VolleyError::plan("W5 needs an int64 column l_orderkey"))?;
        let sum: i64 = keys.values().iter().sum();
        Ok(RecordBatch::try_from_iter([
            (
                "rows",
                Arc::new(Int64Array::from(vec![batch.num_rows() as i64])) as ArrayRef,
            ),
            ("sum", Arc::new(Int64Array::from(vec![sum])) as ArrayRef),
        ])?)
    }
}

/// The sum of an int64 column of `batches`.
fn int_sum(batches: &[RecordBatch], column: &str) -> Result<i64> {
    let mut sum = 0;
    for b in batches {
        let c = b
            .column_by_name(column)
            .ok_or_else(|| VolleyError::plan(format!("no column {column}")))?;
        let c = volley::arrow::compute::cast(c, &volley::arrow::datatypes::DataType::Int64)?;
        let c = c
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| VolleyError::internal("cast to int64"))?;
        sum += c.iter().flatten().sum::<i64>();
    }
    Ok(sum)
}

/// A join workload's checksum: rows, and the sums `p` and `t` over them.
fn join_check(r: &[RecordBatch]) -> Result<String> {
    let text = |c: &str| -> Result<String> {
        let b = r
            .first()
            .ok_or_else(|| VolleyError::execution("no result"))?;
        let col = b
            .column_by_name(c)
            .ok_or_else(|| VolleyError::execution(format!("no column {c}")))?;
        Ok(volley::arrow::util::display::array_value_to_string(col, 0)?)
    };
    Ok(format!(
        "rows={} sum_price={} sum_total={}",
        int_sum(r, "n")?,
        text("p")?,
        text("t")?
    ))
}

/// The driver of one all-to-all workload, run as a job: prints `seconds=...` and a
/// checksum.
fn exchange_driver(workload: Workload, tpch: &str, out: &str) -> Result<()> {
    let cluster = volley::cluster()?.ok_or_else(|| VolleyError::Config("no cluster".into()))?;
    let ctx = Context::try_new(volley::init()?.config().clone())?.with_cluster(cluster);
    let lineitem = format!("{tpch}/lineitem/");
    let start = Instant::now();
    let check = match workload {
        Workload::W4 => {
            let _ = std::fs::remove_dir_all(out);
            let summary = ctx
                .read_parquet(lineitem.as_str())?
                .sort(["l_extendedprice"])?
                .write_parquet(out)?;
            format!("rows={} files={}", summary.rows, summary.files.len())
        }
        Workload::W5 => {
            let counts = ctx
                .read_parquet(lineitem.as_str())?
                .random_shuffle(42)?
                .map_transform(TransformFn::named(RowsAndSum), MapOptions::default())
                .collect()?;
            format!(
                "rows={} sum_orderkey={}",
                int_sum(&counts, "rows")?,
                int_sum(&counts, "sum")?
            )
        }
        Workload::W7 => {
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
            let n: usize = groups.iter().map(RecordBatch::num_rows).sum();
            format!("groups={n} rows={}", int_sum(&groups, "n")?)
        }
        Workload::W9 | Workload::W9p => {
            // A small right side: broadcast (W9), or partitioned like any join (W9p).
            let ctx = if workload == Workload::W9p {
                let mut config = ctx.config().clone();
                config.set("volley.exec.broadcast_join_bytes", "0")?;
                Context::try_new(config)?.with_cluster(
                    volley::cluster()?.ok_or_else(|| VolleyError::Config("no cluster".into()))?,
                )
            } else {
                ctx.clone()
            };
            let supplier = ctx
                .read_parquet(format!("{tpch}/supplier/").as_str())?
                .select(&["s_suppkey", "s_acctbal"])?;
            let r = ctx
                .read_parquet(lineitem.as_str())?
                .select(&["l_suppkey", "l_extendedprice"])?
                .join_on(&supplier, &["l_suppkey"], &["s_suppkey"], JoinHow::Inner)?
                .aggregate([
                    agg::count_all().alias("n"),
                    agg::sum("l_extendedprice").alias("p"),
                    agg::sum("s_acctbal").alias("t"),
                ])?
                .collect()?;
            join_check(&r)?
        }
        Workload::W8 => {
            let orders = ctx
                .read_parquet(format!("{tpch}/orders/").as_str())?
                .select(&["o_orderkey", "o_totalprice"])?;
            let r = ctx
                .read_parquet(lineitem.as_str())?
                .select(&["l_orderkey", "l_extendedprice"])?
                .join_on(&orders, &["l_orderkey"], &["o_orderkey"], JoinHow::Inner)?
                .aggregate([
                    agg::count_all().alias("n"),
                    agg::sum("l_extendedprice").alias("p"),
                    agg::sum("o_totalprice").alias("t"),
                ])?
                .collect()?;
            join_check(&r)?
        }
    };
    println!("seconds={:.4} {check}", start.elapsed().as_secs_f64());
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The driver side of `tasks`, run as a job: prints `seconds=...`.
fn tasks_driver(n: u64) -> Result<()> {
    let cluster = volley::cluster()?.ok_or_else(|| VolleyError::Config("no cluster".into()))?;
    let warm: Vec<_> = (0..8)
        .map(|i| cluster.submit(Noop(i), &[], &TaskOptions::default()))
        .collect::<Result<_>>()?;
    for w in &warm {
        cluster.get(w)?;
    }
    let start = Instant::now();
    let refs: Vec<_> = (0..n)
        .map(|i| cluster.submit(Noop(i), &[], &TaskOptions::default()))
        .collect::<Result<_>>()?;
    let mut sum = 0u64;
    for batches in cluster.get_all(&refs.iter().collect::<Vec<_>>())? {
        sum += object_value::<u64>(&batches)?;
    }
    println!("seconds={:.4} check={sum}", start.elapsed().as_secs_f64());
    Ok(())
}

fn write_input(dir: &Path, files: usize, rows: i64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for f in 0..files {
        let start = f as i64 * rows;
        let batch = RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from_iter_values(start..start + rows)) as ArrayRef,
        )])?;
        let file = std::fs::File::create(dir.join(format!("part-{f:03}.parquet")))?;
        let mut w =
            volley::datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None)
                .map_err(|e| VolleyError::execution(e.to_string()))?;
        w.write(&batch)
            .map_err(|e| VolleyError::execution(e.to_string()))?;
        w.close()
            .map_err(|e| VolleyError::execution(e.to_string()))?;
    }
    Ok(())
}

struct LocalCluster {
    procs: Vec<std::process::Child>,
    home: PathBuf,
    volley: PathBuf,
    /// The head's gRPC port (0: any).
    port: u16,
}

impl LocalCluster {
    fn start(volley: &Path, home: &Path, nodes: usize, cpus: f64) -> Result<Self> {
        Self::start_on(volley, home, nodes, cpus, 0)
    }

    /// A cluster whose head listens on `port` (0: any free port).
    fn start_on(volley: &Path, home: &Path, nodes: usize, cpus: f64, port: u16) -> Result<Self> {
        let _ = std::fs::remove_dir_all(home);
        std::fs::create_dir_all(home)?;
        let mut cluster = Self {
            procs: vec![],
            home: home.to_path_buf(),
            volley: volley.to_path_buf(),
            port,
        };
        let head = cluster.spawn_head("head.log")?;
        cluster.procs.push(head);
        let address = std::fs::read_to_string(home.join("head_address"))?;
        for i in 0..nodes {
            cluster.procs.push(
                Command::new(volley)
                    .args(["start", "--block", "--address", &address])
                    .args(["--num-cpus", &format!("{cpus}")])
                    .env("VOLLEY_HOME", home)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(home.join(format!("node-{i}.log")))?)
                    .spawn()?,
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok(cluster)
    }

    /// Starts a head on this cluster's state folder and port; waits for its address.
    fn spawn_head(&self, log: &str) -> Result<std::process::Child> {
        let addr_file = self.home.join("head_address");
        let _ = std::fs::remove_file(&addr_file);
        let child = Command::new(&self.volley)
            .args(["start", "--head", "--block", "--http-port", "0"])
            .args(["--port", &self.port.to_string()])
            .env("VOLLEY_HOME", &self.home)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.home.join(log))?)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addr_file.exists() {
            if Instant::now() > deadline {
                return Err(VolleyError::execution("the head did not start"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// `volley ARGS` against this cluster; its standard output.
    fn volley(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.volley)
            .args(args)
            .env("VOLLEY_HOME", &self.home)
            .output()?;
        if !out.status.success() {
            return Err(VolleyError::execution(format!(
                "volley {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Submits a job, waits, returns its log.
    fn job(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.volley)
            .args(["job", "submit", "--wait", "--"])
            .args(args)
            .env("VOLLEY_HOME", &self.home)
            .output()?;
        let log = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(VolleyError::execution(format!(
                "job failed: {log}{}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(log)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// This program, and the `volley` binary and `cluster_pipeline` example built beside it.
fn programs() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let me = std::env::current_exe()?;
    let bin_dir = me
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| VolleyError::Config("where is target/?".into()))?;
    let volley_bin = bin_dir.join("volley");
    let pipeline = bin_dir.join("examples").join("cluster_pipeline");
    Ok((me, volley_bin, pipeline))
}

fn seconds_in(text: &str) -> Option<f64> {
    text.split_whitespace()
        .find_map(|w| {
            w.strip_prefix("seconds=")
                .or_else(|| w.strip_prefix("elapsed_s="))
        })
        .and_then(|s| s.parse().ok())
        .or_else(|| {
            // cluster_pipeline prints "... in 1.23s"
            text.lines()
                .find(|l| l.starts_with("wrote "))
                .and_then(|l| l.rsplit(" in ").next())
                .and_then(|s| s.trim().trim_end_matches('s').parse().ok())
        })
}

fn ray(script: &str, args: &[&str], cpus: &str) -> Result<f64> {
    ray_with(script, args, cpus, &[])
}

fn ray_with(script: &str, args: &[&str], cpus: &str, env: &[(&str, String)]) -> Result<f64> {
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env("RAY_NUM_CPUS", cpus)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    seconds_in(&text).ok_or_else(|| {
        VolleyError::execution(format!(
            "Ray run failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })
}

/// The benchmark's settings.
#[derive(Parser)]
#[command(
    about = "volley's cluster against Ray on this machine: no-op tasks, a task's round trip, \
             a Dataset job, and a Dataset job with an actor-pool stage"
)]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Runs of each workload (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Node agents of the local cluster.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Logical CPUs each node offers (Ray gets the same total); the default lets an
    /// actor pool of 2 and the reads feeding it run at once.
    #[arg(long, default_value_t = 2.0)]
    cpus_per_node: f64,
    /// No-op tasks per run.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Sequential one-task round trips per run.
    #[arg(long, default_value_t = 200)]
    round_trips: usize,
    /// Actors of the model stage (both engines).
    #[arg(long, default_value_t = 2)]
    actors: usize,
    /// Milliseconds of work per batch in the model stage.
    #[arg(long, default_value_t = 2)]
    model_ms: u64,
    /// With `--suite operate`: the job the head restarts under also has the model
    /// stage, on a pool of `--actors` actors (they outlive the restart).
    #[arg(long)]
    restart_with_pool: bool,
    /// Folder for the input, the outputs and the cluster's state.
    #[arg(long, default_value = "/tmp/volley-bench-cluster")]
    work_dir: PathBuf,
    /// The Ray peer script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers/cluster_ray.py"))]
    peer: String,
    /// Which workloads: `basic` (tasks, round trip, pipeline, actor pool),
    /// `exchange` (W4, W5, W7, W8, W9, W9p on TPC-H data; needs `--tpch`), `sql` (the 22 TPC-H
    /// queries on the cluster and in one process; needs `--tpch`) or `operate` (a head
    /// restart mid-job, the head's CPU with the dashboard open).
    #[arg(long, value_enum, default_value_t = Suite::Basic)]
    suite: Suite,
    /// TPC-H Parquet (`bench/gen_tpch.sh`); Ray reads its plain-string copy `DIR-utf8`.
    #[arg(long)]
    tpch: Option<String>,
    /// The all-to-all workloads to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "w4,w5,w7,w8")]
    workloads: Vec<Workload>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    Basic,
    Exchange,
    Sql,
    Operate,
}

/// The all-to-all workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Workload {
    W4,
    W5,
    W7,
    W8,
    /// `lineitem` joined with the small `supplier` (10,000 rows at SF1): its right side
    /// is broadcast.
    W9,
    /// W9 with broadcast joins off (`volley.exec.broadcast_join_bytes=0`): partitioned.
    W9p,
}

#[derive(Subcommand)]
enum Role {
    /// The job that submits the no-op tasks (started by the benchmark on its cluster).
    #[command(hide = true)]
    TasksDriver {
        /// Tasks to submit.
        n: u64,
    },
    /// The job that times one-task round trips (started by the benchmark).
    #[command(hide = true)]
    RoundTripDriver {
        /// Round trips.
        n: u64,
    },
    /// The job that runs one all-to-all workload (started by the benchmark).
    #[command(hide = true)]
    ExchangeDriver {
        #[arg(value_enum)]
        workload: Workload,
        tpch: String,
        out: String,
    },
}

/// The driver side of `roundtrip`, run as a job: prints `seconds=<median of one>`.
fn round_trip_driver(n: u64) -> Result<()> {
    let cluster = volley::cluster()?.ok_or_else(|| VolleyError::Config("no cluster".into()))?;
    for i in 0..8 {
        cluster.get(&cluster.submit(Noop(i), &[], &TaskOptions::default())?)?;
    }
    let mut times = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        let r = cluster.submit(Noop(i), &[], &TaskOptions::default())?;
        let v: u64 = object_value(&cluster.get(&r)?)?;
        times.push(start.elapsed().as_secs_f64());
        if v != i {
            return Err(VolleyError::execution("wrong value"));
        }
    }
    println!("seconds={:.6}", median(times));
    Ok(())
}

fn main() -> Result<()> {
    volley::init()?;
    let args = Args::parse();
    match args.role {
        Some(Role::TasksDriver { n }) => return tasks_driver(n),
        Some(Role::RoundTripDriver { n }) => return round_trip_driver(n),
        Some(Role::ExchangeDriver {
            workload,
            tpch,
            out,
        }) => return exchange_driver(workload, &tpch, &out),
        None => {}
    }
    if args.suite == Suite::Exchange {
        return exchange_suite(&args);
    }
    if args.suite == Suite::Sql {
        return sql_suite(&args);
    }
    if args.suite == Suite::Operate {
        return operate_suite(&args);
    }
    let (runs, nodes) = (args.runs, args.nodes);
    let n_tasks = args.tasks.to_string();
    let n_trips = args.round_trips.to_string();
    let work = args.work_dir.clone();
    let script = args.peer.clone();
    let (me, volley_bin, pipeline) = programs()?;
    let input = work.join("input");
    if !input.exists() {
        write_input(&input, 16, 500_000)?;
    }
    let (actors, model_ms) = (args.actors.to_string(), args.model_ms.to_string());
    let cluster = LocalCluster::start(&volley_bin, &work.join("home"), nodes, args.cpus_per_node)?;
    // Ray gets the same logical CPUs.
    let ray_cpus = format!("{}", (args.cpus_per_node * nodes as f64).round() as usize);
    let ray = |script: &str, args: &[&str]| ray(script, args, &ray_cpus);
    let mut v: [Vec<f64>; 4] = Default::default();
    let mut r: [Vec<f64>; 4] = Default::default();
    let path = |p: &Path| p.to_str().unwrap_or_default().to_string();
    for run in 0..runs {
        let log = cluster.job(&[&path(&me), "tasks-driver", &n_tasks])?;
        v[0].push(seconds_in(&log).ok_or_else(|| VolleyError::execution(log.clone()))?);
        r[0].push(ray(&script, &["tasks", &n_tasks])?);
        let log = cluster.job(&[&path(&me), "round-trip-driver", &n_trips])?;
        v[1].push(seconds_in(&log).ok_or_else(|| VolleyError::execution(log.clone()))?);
        r[1].push(ray(&script, &["roundtrip", &n_trips])?);
        for (k, pool) in [(2usize, false), (3usize, true)] {
            let out = work.join(format!("out-volley-{run}"));
            let mut job = vec![path(&pipeline), path(&input), path(&out)];
            if pool {
                job.extend([
                    "--actors".into(),
                    actors.clone(),
                    "--model-ms".into(),
                    model_ms.clone(),
                ]);
            }
            let refs: Vec<&str> = job.iter().map(String::as_str).collect();
            let log = cluster.job(&refs)?;
            v[k].push(seconds_in(&log).ok_or_else(|| VolleyError::execution(log.clone()))?);
            let _ = std::fs::remove_dir_all(&out);
            let rout = work.join(format!("out-ray-{run}"));
            let mut peer = vec![
                if pool { "actorpool" } else { "pipeline" }.to_string(),
                path(&input),
                path(&rout),
            ];
            if pool {
                peer.extend([actors.clone(), model_ms.clone()]);
            }
            let refs: Vec<&str> = peer.iter().map(String::as_str).collect();
            r[k].push(ray(&script, &refs)?);
            let _ = std::fs::remove_dir_all(&rout);
        }
        eprintln!(
            "run {run}: tasks {:.3}s / ray {:.3}s; round trip {:.2}ms / ray {:.2}ms; \
             pipeline {:.2}s / ray {:.2}s; actor pool {:.2}s / ray {:.2}s",
            v[0][run],
            r[0][run],
            v[1][run] * 1e3,
            r[1][run] * 1e3,
            v[2][run],
            r[2][run],
            v[3][run],
            r[3][run]
        );
    }
    let n: f64 = args.tasks as f64;
    let [vt, vr, vp, va] = v.map(median);
    let [rt, rr, rp, ra] = r.map(median);
    println!("volley cluster ({nodes} nodes on this machine) vs Ray, medians of {runs} runs");
    println!(
        "tasks:      volley {:>8.0} tasks/s   ray {:>8.0} tasks/s   volley/ray throughput {:.2}x",
        n / vt,
        n / rt,
        rt / vt
    );
    println!(
        "round trip: volley {:>8.2} ms        ray {:>8.2} ms        volley/ray time {:.2}x",
        vr * 1e3,
        rr * 1e3,
        vr / rr
    );
    println!(
        "pipeline:   volley {:>8.2} s         ray {:>8.2} s         ray/volley time {:.2}x",
        vp,
        rp,
        rp / vp
    );
    println!(
        "actor pool: volley {:>8.2} s         ray {:>8.2} s         ray/volley time {:.2}x  ({} actors, {} ms per batch)",
        va, ra, ra / va, args.actors, args.model_ms
    );
    Ok(())
}

/// `--suite exchange`: the all-to-all workloads as jobs on the cluster against Ray Data.
fn exchange_suite(args: &Args) -> Result<()> {
    let tpch = args
        .tpch
        .clone()
        .ok_or_else(|| VolleyError::Config("--suite exchange needs --tpch DIR".into()))?;
    let utf8 = format!("{tpch}-utf8");
    let me = std::env::current_exe()?;
    let bin_dir = me
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| VolleyError::Config("where is target/?".into()))?;
    let work = args.work_dir.clone();
    let cluster = LocalCluster::start(
        &bin_dir.join("volley"),
        &work.join("home"),
        args.nodes,
        args.cpus_per_node,
    )?;
    let ray_cpus = format!(
        "{}",
        (args.cpus_per_node * args.nodes as f64).round() as usize
    );
    let peers = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers");
    let me = me.to_str().unwrap_or_default().to_string();
    let workloads = args.workloads.clone();
    let mut v: Vec<Vec<f64>> = vec![vec![]; workloads.len()];
    let mut r: Vec<Vec<f64>> = vec![vec![]; workloads.len()];
    for run in 0..args.runs {
        for (k, w) in workloads.iter().enumerate() {
            let name = format!("{w:?}").to_lowercase();
            let out = work.join(format!("out-{name}"));
            let log = cluster.job(&[
                &me,
                "exchange-driver",
                &name,
                &tpch,
                out.to_str().unwrap_or_default(),
            ])?;
            v[k].push(seconds_in(&log).ok_or_else(|| VolleyError::execution(log.clone()))?);
            let _ = std::fs::remove_dir_all(&out);
            let env = [
                ("RAY_LINEITEM_DIR", format!("{utf8}/lineitem")),
                ("TPCH_DIR", tpch.clone()),
                ("RAY_TPCH_DIR", utf8.clone()),
            ];
            let secs = match w {
                Workload::W4 | Workload::W5 => {
                    ray_with(&format!("{peers}/bench_ray.py"), &[&name], &ray_cpus, &env)?
                }
                Workload::W7 | Workload::W8 | Workload::W9 | Workload::W9p => ray_with(
                    &format!("{peers}/relational.py"),
                    &["ray", &name.replace("w9p", "w9")],
                    &ray_cpus,
                    &env,
                )?,
            };
            r[k].push(secs);
            eprintln!(
                "run {run} {name}: volley {:.2}s ({}) / ray {secs:.2}s",
                v[k][run],
                log.lines()
                    .find(|l| l.starts_with("seconds="))
                    .unwrap_or_default()
            );
        }
    }
    println!(
        "volley cluster ({} nodes x {} CPUs on this machine) vs Ray Data (ray.init()), medians of {} runs",
        args.nodes, args.cpus_per_node, args.runs
    );
    for (k, w) in workloads.iter().enumerate() {
        let (vm, rm) = (median(v[k].clone()), median(r[k].clone()));
        println!(
            "{:<3} volley {vm:>7.2} s   ray {rm:>7.2} s   ray/volley time {:.2}x",
            format!("{w:?}"),
            rm / vm
        );
    }
    Ok(())
}

/// `--suite sql`: the 22 TPC-H queries through `volley sql` on the cluster and in one
/// process.
fn sql_suite(args: &Args) -> Result<()> {
    let tpch = args
        .tpch
        .clone()
        .ok_or_else(|| VolleyError::Config("--suite sql needs --tpch DIR".into()))?;
    let (_, volley, _) = programs()?;
    let work = args.work_dir.clone();
    let cluster = LocalCluster::start(&volley, &work.join("home"), args.nodes, args.cpus_per_node)?;
    let address = std::fs::read_to_string(work.join("home").join("head_address"))?;
    let tables: Vec<String> = [
        "lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region",
    ]
    .iter()
    .map(|t| format!("--table={t}={tpch}/{t}/"))
    .collect();
    let queries = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/tpch");
    // One run through the cluster first: it uploads the binary once (cached after).
    let timed = |q: usize, on_cluster: bool| -> Result<f64> {
        let file = format!("{queries}/q{q:02}.sql");
        let out = work.join(format!("q{q:02}.parquet"));
        let mut cmd = Command::new(&volley);
        cmd.args(["sql", "-f", &file, "--output"])
            .arg(&out)
            .args(&tables)
            .env("VOLLEY_HOME", work.join("home"));
        if on_cluster {
            cmd.env("VOLLEY_ADDRESS", &address);
        } else {
            cmd.env_remove("VOLLEY_ADDRESS");
        }
        let start = Instant::now();
        let o = cmd.output()?;
        let secs = start.elapsed().as_secs_f64();
        if !o.status.success() {
            return Err(VolleyError::execution(format!(
                "Q{q:02} ({}): {}",
                if on_cluster { "cluster" } else { "local" },
                String::from_utf8_lossy(&o.stderr)
            )));
        }
        Ok(secs)
    };
    timed(6, true)?;
    let mut c: Vec<Vec<f64>> = vec![vec![]; 22];
    let mut l: Vec<Vec<f64>> = vec![vec![]; 22];
    for run in 0..args.runs {
        for q in 1..=22 {
            c[q - 1].push(timed(q, true)?);
            l[q - 1].push(timed(q, false)?);
        }
        eprintln!(
            "run {run}: cluster {:.1} s, one process {:.1} s",
            c.iter().map(|v| v[run]).sum::<f64>(),
            l.iter().map(|v| v[run]).sum::<f64>()
        );
    }
    println!(
        "TPC-H through `volley sql`: a cluster ({} nodes x {} CPUs on this machine) vs one process, medians of {} runs (seconds, process start included)",
        args.nodes, args.cpus_per_node, args.runs
    );
    let (mut ct, mut lt) = (0.0, 0.0);
    for q in 0..22 {
        let (cm, lm) = (median(c[q].clone()), median(l[q].clone()));
        ct += cm;
        lt += lm;
        println!(
            "Q{:02}  cluster {cm:>7.2}  one process {lm:>7.2}  cluster/one {:.2}x",
            q + 1,
            cm / lm
        );
    }
    println!(
        "all  cluster {ct:>7.2}  one process {lt:>7.2}  cluster/one {:.2}x",
        ct / lt
    );
    drop(cluster);
    Ok(())
}

/// CPU seconds process `pid` has used (user and system).
/// CPU seconds process `pid`'s threads have run, to the nanosecond: the sum of each
/// live thread's `schedstat` (`/proc/PID/stat` counts in 10 ms ticks, a tenth of what
/// the head spends on 10,000 tasks). Threads that ended are not counted: the head's
/// runtime threads live as long as it does.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let ns: u64 = threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// `GET path` on the head's HTTP API with the token; the body.
fn http_get(address: &str, path: &str, token: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// `--suite operate`: a head restart during a job, and the head's CPU while tasks run
/// with the dashboard open.
fn operate_suite(args: &Args) -> Result<()> {
    let (me, volley_bin, pipeline) = programs()?;
    let work = args.work_dir.clone();
    // Long enough (a few seconds) for the head to be killed while it runs.
    let input = work.join("input-64x1m");
    if !input.exists() {
        write_input(&input, 64, 1_000_000)?;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cluster = LocalCluster::start_on(
        &volley_bin,
        &work.join("home"),
        args.nodes,
        args.cpus_per_node,
        port,
    )?;
    let path = |p: &Path| p.to_str().unwrap_or_default().to_string();
    let state = |cluster: &LocalCluster, id: &str| -> Result<String> {
        Ok(cluster
            .volley(&["job", "status", id])?
            .lines()
            .find_map(|l| l.strip_prefix("state:"))
            .unwrap_or_default()
            .trim()
            .to_string())
    };
    // The finished tasks of job `id`'s executions, as its driver last reported them
    // (0 until it reports to the head that answers).
    let tasks_done = |cluster: &LocalCluster, id: &str| -> Result<u64> {
        let status = cluster.volley(&["job", "status", id])?;
        Ok(status
            .lines()
            .filter_map(|l| {
                l.trim_start()
                    .split_whitespace()
                    .nth(2)
                    .and_then(|t| t.split('/').next())
                    .and_then(|d| d.parse::<u64>().ok())
            })
            .sum())
    };
    let wait_for = |what: &str, f: &mut dyn FnMut() -> Result<bool>| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !f()? {
            if Instant::now() > deadline {
                return Err(VolleyError::execution(format!(
                    "waited too long for {what}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    let (mut fault_free, mut total, mut rejoin, mut running, mut progress) =
        (vec![], vec![], vec![], vec![], vec![]);
    for run in 0..args.runs {
        let out = work.join(format!("out-{run}"));
        let mut job = vec![path(&pipeline), path(&input), path(&out)];
        if args.restart_with_pool {
            job.extend([
                "--actors".to_string(),
                args.actors.to_string(),
                "--model-ms".to_string(),
                args.model_ms.to_string(),
            ]);
        }
        let job: Vec<&str> = job.iter().map(String::as_str).collect();
        let start = Instant::now();
        cluster.job(&job)?;
        let clean = start.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&out);

        let mut submit = vec!["job", "submit", "--"];
        submit.extend(&job);
        let start = Instant::now();
        let id = cluster.volley(&submit)?.trim().to_string();
        // Killed once the job is under way (a task done), not after a fixed time: the
        // job's package is cached by now, so it runs faster than the fault-free one.
        wait_for("the job's first task", &mut || {
            Ok(tasks_done(&cluster, &id)? > 0)
        })?;
        let done_before = tasks_done(&cluster, &id)?;
        if state(&cluster, &id)? != "RUNNING" {
            return Err(VolleyError::execution(format!(
                "job {id} ended before the head could be killed: use more input"
            )));
        }
        let head = &mut cluster.procs[0];
        let _ = head.kill();
        let _ = head.wait();
        let restarted = Instant::now();
        cluster.procs[0] = cluster.spawn_head(&format!("head-restart-{run}.log"))?;
        let nodes = args.nodes;
        wait_for("the nodes", &mut || {
            Ok(cluster
                .volley(&["status"])?
                .lines()
                .filter(|l| l.contains(" yes "))
                .count()
                == nodes)
        })?;
        rejoin.push(restarted.elapsed().as_secs_f64());
        wait_for("the driver", &mut || {
            Ok(matches!(
                state(&cluster, &id)?.as_str(),
                "RUNNING" | "SUCCEEDED"
            ))
        })?;
        running.push(restarted.elapsed().as_secs_f64());
        // Progress: more tasks done than when the head went.
        wait_for("a finished task", &mut || {
            Ok(tasks_done(&cluster, &id)? > done_before)
        })?;
        progress.push(restarted.elapsed().as_secs_f64());
        wait_for("the job", &mut || {
            let s = state(&cluster, &id)?;
            if s == "FAILED" || s == "STOPPED" {
                return Err(VolleyError::execution(format!("job {id} {s}")));
            }
            Ok(s == "SUCCEEDED")
        })?;
        total.push(start.elapsed().as_secs_f64());
        fault_free.push(clean);
        let _ = std::fs::remove_dir_all(&out);
        eprintln!(
            "run {run}: fault-free {clean:.2}s; with a head restart {:.2}s (nodes back {:.2}s, driver running {:.2}s, a task done past those done before {:.2}s after the new head started)",
            total[run], rejoin[run], running[run], progress[run]
        );
    }
    let (ff, t) = (median(fault_free), median(total));
    println!(
        "head restart ({} nodes, pipeline job{}, medians of {} runs):",
        args.nodes,
        if args.restart_with_pool {
            format!(" with a model stage on {} actors", args.actors)
        } else {
            String::new()
        },
        args.runs
    );
    println!(
        "  nodes back {:.2}s, driver running {:.2}s, a task done past those done before {:.2}s after the new head started",
        median(rejoin),
        median(running),
        median(progress)
    );
    println!(
        "  job {t:.2}s with the restart vs {ff:.2}s without: {:.2}x (the job goes on where it was)",
        t / ff
    );

    // The head's CPU while tasks run, with and without an open dashboard.
    let token = std::fs::read_to_string(cluster.home.join("token"))?;
    let http = std::fs::read_to_string(cluster.home.join("http_address"))?;
    let n_tasks = args.tasks.to_string();
    let head_pid = cluster.procs[0].id();
    let mut shares = [vec![], vec![]];
    // Head CPU seconds and wall seconds of each run with the dashboard closed.
    let mut closed_runs = vec![];
    for run in 0..args.runs {
        for (k, dashboard) in [(0, false), (1, true)] {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let poller = dashboard.then(|| {
                let (stop, http, token) = (Arc::clone(&stop), http.clone(), token.clone());
                std::thread::spawn(move || {
                    let mut polls = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let jobs = http_get(&http, "/api/jobs", &token).unwrap_or_default();
                        // The newest job: the running one.
                        let id = jobs
                            .rsplit("\"job_id\":\"")
                            .next()
                            .and_then(|r| r.split('"').next())
                            .unwrap_or_default()
                            .to_string();
                        for p in ["/", "/api/cluster"] {
                            let _ = http_get(&http, p, &token);
                        }
                        for p in ["", "/executions", "/tasks", "/actors", "/logs?offset=0"] {
                            let _ = http_get(&http, &format!("/api/jobs/{id}{p}"), &token);
                        }
                        polls += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    polls
                })
            });
            let (cpu0, t0) = (cpu_seconds(head_pid), Instant::now());
            cluster.job(&[&path(&me), "tasks-driver", &n_tasks])?;
            let (cpu, wall) = (cpu_seconds(head_pid) - cpu0, t0.elapsed().as_secs_f64());
            let share = cpu / wall;
            if !dashboard {
                closed_runs.push((cpu, wall));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let polls = poller.map(|p| p.join().unwrap_or(0)).unwrap_or(0);
            eprintln!(
                "run {run}: {} tasks, dashboard {}: head CPU {:.1}% of one core ({polls} dashboard refreshes)",
                args.tasks,
                if dashboard { "open" } else { "closed" },
                share * 100.0
            );
            shares[k].push(share);
        }
    }
    let [closed, open] = shares.map(median);
    println!(
        "dashboard: head CPU while {} tasks run: {:.1}% of one core closed, {:.1}% open (+{:.1} points)",
        args.tasks,
        closed * 100.0,
        open * 100.0,
        (open - closed) * 100.0
    );
    drop(cluster);
    let n = args.tasks as f64;
    let head_us = median(closed_runs.iter().map(|(c, _)| c * 1e6 / n).collect());
    let rate = median(closed_runs.iter().map(|(_, w)| n / w).collect());
    let cpus = format!(
        "{}",
        (args.cpus_per_node * args.nodes as f64).round() as usize
    );
    match ray_control(&args.peer, args.tasks, args.runs, &cpus) {
        Ok(runs) => {
            let per_task = |f: fn(&RayControl) -> f64| median(runs.iter().map(f).collect());
            let gcs_us = per_task(|r| r.gcs_cpu * 1e6 / r.tasks);
            let raylet_us = per_task(|r| r.raylet_cpu * 1e6 / r.tasks);
            let ray_rate = per_task(|r| r.tasks / r.seconds);
            let gcs_share = per_task(|r| r.gcs_cpu / r.seconds);
            println!(
                "control plane per no-op task (dashboard closed): volley's head {head_us:.1} µs \
                 at {rate:.0} tasks/s ({:.1}% of a core); Ray's GCS {gcs_us:.1} µs and raylet \
                 {raylet_us:.1} µs at {ray_rate:.0} tasks/s (GCS {:.1}% of a core): the head \
                 {:.1}x the GCS's CPU per task, volley {:.1}x Ray's task rate",
                closed * 100.0,
                gcs_share * 100.0,
                head_us / gcs_us,
                rate / ray_rate
            );
        }
        Err(e) => println!("Ray control plane: not run ({e})"),
    }
    Ok(())
}

/// One run of `--tasks` no-op tasks on Ray: seconds, and CPU seconds of its GCS server
/// and raylet over it.
struct RayControl {
    tasks: f64,
    seconds: f64,
    gcs_cpu: f64,
    raylet_cpu: f64,
}

/// `runs` runs of `tasks` no-op tasks on `ray.init()` with `cpus` CPUs.
fn ray_control(script: &str, tasks: usize, runs: usize, cpus: &str) -> Result<Vec<RayControl>> {
    let out = Command::new("python3")
        .args([script, "control", &tasks.to_string(), &runs.to_string()])
        .env("RAY_NUM_CPUS", cpus)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |line: &str, key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    };
    let runs: Vec<RayControl> = text
        .lines()
        .filter_map(|l| {
            Some(RayControl {
                tasks: tasks as f64,
                seconds: field(l, "seconds")?,
                gcs_cpu: field(l, "gcs_cpu")?,
                raylet_cpu: field(l, "raylet_cpu")?,
            })
        })
        .collect();
    if runs.is_empty() {
        return Err(VolleyError::execution(format!(
            "Ray run failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(runs)
}
