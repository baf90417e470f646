//! The sweep benchmark: volley's tuner against Ray Tune on this machine.
//!
//! ```text
//! cargo run --release --example bench_tune -- --trials 60 --runs 3 --python python3
//! ```
//!
//! 1. Scheduling overhead: `--trials` trials that report 10 times and do no work (FIFO,
//!    one CPU each); trials completed per second.
//! 2. ASHA: the same 40-point grid of `x` in [-1, 1) for both, a learning curve
//!    `1 + (x - 0.3)^2 + 0.05 / t` over 10 iterations with 20 ms of "work" each, ASHA
//!    (max_t 10, grace 1, reduction 3): wall time to finish the sweep, and whether the
//!    best config found is within 1% of the optimum (1.0).
//!
//! Both on this machine's cores, one CPU per trial; volley's private cluster is started
//! before timing (as `ray.init` is for Ray). Medians of `--runs`; peer:
//! `bench/peers/tune_ray.py`.

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley::crates::runtime::cluster::{LocalCluster, Resources};
use volley::prelude::*;
use volley::train::{metrics, RunConfig};
use volley::tune::{
    grid_search, uniform, AshaConfig, Mode, SchedulerConfig, SearchSpace, Trainable, TrialContext,
    TuneConfig, Tuner,
};

#[derive(Parser, Debug)]
#[command(about = "Sweeps against Ray Tune: no-op trial throughput and ASHA over a grid")]
struct Args {
    /// Trials of the overhead run.
    #[arg(long, default_value_t = 60)]
    trials: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A Python with `ray[tune]`: run Ray Tune too.
    #[arg(long)]
    python: Option<String>,
}

/// Reports 10 times, does nothing.
#[derive(Debug, Serialize, Deserialize)]
struct NoOp;

#[typetag::serde]
impl Trainable for NoOp {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        for _ in 0..10 {
            ctx.report(metrics([("loss", c["x"].as_f64().unwrap_or(0.0))]), None)?;
        }
        Ok(())
    }
}

/// A learning curve with 20 ms of work per iteration.
#[derive(Debug, Serialize, Deserialize)]
struct Curve;

#[typetag::serde]
impl Trainable for Curve {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        let x = c["x"].as_f64().unwrap_or(0.0);
        for t in 1..=10 {
            std::thread::sleep(Duration::from_millis(20));
            ctx.report(
                metrics([("loss", 1.0 + (x - 0.3).powi(2) + 0.05 / t as f64)]),
                None,
            )?;
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peer(python: &str, args: &[&str]) -> Result<Vec<(String, f64)>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers/tune_ray.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(VolleyError::execution(format!(
            "Ray Tune failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect())
}

fn get(values: &[(String, f64)], key: &str) -> f64 {
    values
        .iter()
        .find(|(k, _)| k == key)
        .map_or(f64::NAN, |(_, v)| *v)
}

fn main() -> Result<()> {
    volley::init()?;
    let args = Args::parse();
    let (resources, gpus) = LocalCluster::machine();
    let cpus = resources.num_cpus;
    let local = LocalCluster::start(resources, gpus)?;
    let dir = tempfile::tempdir()?;
    let storage = dir.path().to_str().expect("utf-8").to_string();

    let mut rates = Vec::new();
    let mut asha = Vec::new();
    for run in 0..args.runs {
        let mut c = TuneConfig::new("loss", Mode::Min, args.trials);
        c.progress = false;
        let tuner = Tuner::new(
            NoOp,
            SearchSpace::new().with("x", uniform(0.0, 1.0)),
            c,
            RunConfig::new(&storage, format!("overhead-{run}")),
        )
        .with_resources(Resources::cpus(1.0))
        .with_cluster(local.cluster().clone());
        let start = Instant::now();
        let grid = tuner.fit()?;
        let s = start.elapsed().as_secs_f64();
        assert_eq!(grid.trials.len(), args.trials);
        rates.push(args.trials as f64 / s);

        let mut c = TuneConfig::new("loss", Mode::Min, 1);
        c.progress = false;
        c.scheduler = SchedulerConfig::Asha(AshaConfig {
            max_t: 10,
            grace_period: 1,
            reduction_factor: 3.0,
        });
        let tuner = Tuner::new(
            Curve,
            SearchSpace::new().with(
                "x",
                grid_search((0..40).map(|i| -1.0 + 2.0 * i as f64 / 40.0)),
            ),
            c,
            RunConfig::new(&storage, format!("asha-{run}")),
        )
        .with_resources(Resources::cpus(1.0))
        .with_cluster(local.cluster().clone());
        let start = Instant::now();
        let grid = tuner.fit()?;
        let s = start.elapsed().as_secs_f64();
        let best = grid.best_result().map_or(f64::NAN, |t| t.metrics["loss"]);
        let iterations: u64 = grid
            .trials
            .iter()
            .map(|t| t.history.last().map_or(0, |r| r.iteration))
            .sum();
        println!(
            "volley run {run}: {:.1} trials/s; ASHA {s:.2} s, best {best:.4}, {iterations} iterations",
            rates[run]
        );
        asha.push((s, best, iterations));
    }
    let rate = median(rates);
    let asha_s = median(asha.iter().map(|a| a.0).collect());
    let best = asha.iter().map(|a| a.1).fold(f64::INFINITY, f64::min);
    println!(
        "volley ({cpus} CPUs): {rate:.1} trials/s (median of {}); ASHA sweep {asha_s:.2} s, best {best:.4} ({}within 1% of the optimum 1.0)",
        args.runs,
        if best <= 1.01 { "" } else { "not " }
    );

    if let Some(py) = &args.python {
        let mut ray_rates = Vec::new();
        let mut ray_asha = Vec::new();
        for run in 0..args.runs {
            let t = peer(py, &["throughput", &args.trials.to_string()])?;
            ray_rates.push(args.trials as f64 / get(&t, "seconds"));
            let a = peer(py, &["asha"])?;
            println!(
                "ray run {run}: {:.2} trials/s; ASHA {:.2} s, best {:.4}, {} iterations",
                ray_rates[run],
                get(&a, "seconds"),
                get(&a, "best"),
                get(&a, "iterations")
            );
            ray_asha.push(get(&a, "seconds"));
        }
        let ray_rate = median(ray_rates);
        let ray_asha = median(ray_asha);
        println!(
            "trial throughput: volley {rate:.1} vs Ray Tune {ray_rate:.2} trials/s: {:.1}x",
            rate / ray_rate
        );
        println!(
            "ASHA sweep: volley {asha_s:.2} s vs Ray Tune {ray_asha:.2} s: {:.1}x faster",
            ray_asha / asha_s
        );
    }
    Ok(())
}
