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
    fn start(volley: &Path, home: &Path, nodes: usize) -> Result<Self> {
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
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2) as f64;
        for _ in 0..nodes {
            procs.push(
                Command::new(volley)
                    .args(["start", "--block", "--address", &address])
                    .args(["--num-cpus", &format!("{}", cpus / nodes as f64)])
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

fn ray(script: &str, args: &[&str]) -> Result<f64> {
    let out = Command::new("python3").arg(script).args(args).output()?;
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
#[command(about = "volley's cluster against Ray on this machine: no-op tasks and a Dataset job")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Runs of each workload (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Node agents of the local cluster (they split this machine's CPUs).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// No-op tasks per run.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
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
}

fn main() -> Result<()> {
    volley::init()?;
    let args = Args::parse();
    if let Some(Role::TasksDriver { n }) = args.role {
        return tasks_driver(n);
    }
    let (runs, nodes) = (args.runs, args.nodes);
    let n_tasks = args.tasks.to_string();
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
    let cluster = LocalCluster::start(&volley_bin, &work.join("home"), nodes)?;
    let (mut vt, mut rt, mut vp, mut rp) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let log = cluster.job(&[me.to_str().unwrap_or_default(), "tasks-driver", &n_tasks])?;
        vt.push(seconds_in(&log).ok_or_else(|| VolleyError::execution(log.clone()))?);
        rt.push(ray(&script, &["tasks", &n_tasks])?);
        let out = work.join(format!("out-volley-{run}"));
        let log = cluster.job(&[
            pipeline.to_str().unwrap_or_default(),
            input.to_str().unwrap_or_default(),
            out.to_str().unwrap_or_default(),
        ])?;
        vp.push(seconds_in(&log).ok_or_else(|| VolleyError::execution(log.clone()))?);
        let _ = std::fs::remove_dir_all(&out);
        let rout = work.join(format!("out-ray-{run}"));
        rp.push(ray(
            &script,
            &[
                "pipeline",
                input.to_str().unwrap_or_default(),
                rout.to_str().unwrap_or_default(),
            ],
        )?);
        let _ = std::fs::remove_dir_all(&rout);
        eprintln!(
            "run {run}: tasks volley {:.3}s ray {:.3}s; pipeline volley {:.3}s ray {:.3}s",
            vt[run], rt[run], vp[run], rp[run]
        );
    }
    let n: f64 = n_tasks.parse().unwrap_or(2000.0);
    let (vt, rt, vp, rp) = (median(vt), median(rt), median(vp), median(rp));
    println!("volley cluster ({nodes} nodes on this machine) vs Ray, medians of {runs} runs");
    println!(
        "tasks:    volley {:>8.0} tasks/s   ray {:>8.0} tasks/s   volley/ray throughput {:.2}x",
        n / vt,
        n / rt,
        rt / vt
    );
    println!(
        "pipeline: volley {:>8.2} s         ray {:>8.2} s         ray/volley time {:.2}x",
        vp,
        rp,
        rp / vp
    );
    Ok(())
}
