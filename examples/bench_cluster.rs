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

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use volley::arrow::array::{ArrayRef, Int64Array, RecordBatch};
use volley::crates::runtime::cluster::{
    object_value, value_object, RemoteTask, TaskContext, TaskOptions,
};
use volley::{Result, VolleyError};

/// Returns its number.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Noop(u64);

#[typetag::serde]
impl RemoteTask for Noop {
    fn run(&self, _: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        value_object(&self.0)
    }
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
}

impl LocalCluster {
    fn start(volley: &Path, home: &Path, nodes: usize, cpus: f64) -> Result<Self> {
        let _ = std::fs::remove_dir_all(home);
        let mut procs = vec![Command::new(volley)
            .args([
                "start",
                "--head",
                "--block",
                "--port",
                "0",
                "--http-port",
                "0",
            ])
            .env("VOLLEY_HOME", home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?];
        let addr_file = home.join("head_address");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addr_file.exists() {
            if Instant::now() > deadline {
                return Err(VolleyError::execution("the head did not start"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let address = std::fs::read_to_string(&addr_file)?;
        for _ in 0..nodes {
            procs.push(
                Command::new(volley)
                    .args(["start", "--block", "--address", &address])
                    .args(["--num-cpus", &format!("{cpus}")])
                    .env("VOLLEY_HOME", home)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok(Self {
            procs,
            home: home.to_path_buf(),
            volley: volley.to_path_buf(),
        })
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

fn seconds_in(text: &str) -> Option<f64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("seconds="))
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
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env("RAY_NUM_CPUS", cpus)
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
    /// Folder for the input, the outputs and the cluster's state.
    #[arg(long, default_value = "/tmp/volley-bench-cluster")]
    work_dir: PathBuf,
    /// The Ray peer script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers/cluster_ray.py"))]
    peer: String,
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
        None => {}
    }
    let (runs, nodes) = (args.runs, args.nodes);
    let n_tasks = args.tasks.to_string();
    let n_trips = args.round_trips.to_string();
    let work = args.work_dir.clone();
    let script = args.peer.clone();
    let me = std::env::current_exe()?;
    let bin_dir = me
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| VolleyError::Config("where is target/?".into()))?;
    let volley_bin = bin_dir.join("volley");
    let pipeline = bin_dir.join("examples").join("cluster_pipeline");
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
