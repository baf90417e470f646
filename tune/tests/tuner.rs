//! Sweeps end to end: trials are worker processes of this test program (so it has its
//! own `main`: a worker enters its loop before any test runs), started by a private
//! one-node cluster on 127.0.0.1. Nothing here uses Burn (sweeps of Burn training runs
//! are in `train_sweeps.rs`, with the `train` feature).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley_common::{Result, VolleyError};
use volley_run::{metrics, RunConfig, TrainCheckpoint};
use volley_runtime::cluster::Resources;
use volley_tune::{
    choice, grid_search, loguniform, uniform, AshaConfig, Mode, PbtConfig, SchedulerConfig,
    SearchAlgorithm, SearchSpace, TpeConfig, Trainable, TrialContext, TrialStatus, TuneConfig,
    Tuner,
};

/// `(x - 0.3)^2 + (y + 0.6)^2`, reported 3 times, approaching its value.
#[derive(Debug, Serialize, Deserialize)]
struct Quadratic;

#[typetag::serde]
impl Trainable for Quadratic {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        let (x, y) = (c["x"].as_f64().unwrap(), c["y"].as_f64().unwrap());
        let f = (x - 0.3).powi(2) + (y + 0.6).powi(2);
        for i in 1..=3 {
            ctx.report(metrics([("loss", f * (1.0 + 1.0 / i as f64))]), None)?;
        }
        Ok(())
    }
}

/// A learning curve: `loss_t = q + 1 / t` for `t` in 1..=16.
#[derive(Debug, Serialize, Deserialize)]
struct Curve {
    sleep_ms: u64,
}

#[typetag::serde]
impl Trainable for Curve {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        let q = c["q"].as_f64().unwrap();
        for t in 1..=16 {
            std::thread::sleep(Duration::from_millis(self.sleep_ms));
            ctx.report(metrics([("loss", q + 1.0 / t as f64)]), None)?;
        }
        Ok(())
    }
}

/// PBT's toy: a score that grows each iteration by `1 - |h - 0.7|`, kept in the
/// checkpoint so that an exploited trial continues from its donor's score.
#[derive(Debug, Serialize, Deserialize)]
struct Climb;

#[typetag::serde]
impl Trainable for Climb {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        let h = c["h"].as_f64().unwrap();
        let mut score: f64 = match ctx.checkpoint() {
            Some(ck) => ck.value("score")?,
            None => 0.0,
        };
        while ctx.iteration() < 24 {
            std::thread::sleep(Duration::from_millis(20));
            score += 1.0 - (h - 0.7).abs();
            let ckpt = TrainCheckpoint::new().with_value("score", &score)?;
            ctx.report(metrics([("score", score), ("h", h)]), Some(ckpt))?;
        }
        Ok(())
    }
}

/// Writes a marker per start and per finish; sleeps per iteration; fails on demand.
#[derive(Debug, Serialize, Deserialize)]
struct Slow {
    dir: String,
    iterations: u64,
    sleep_ms: u64,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[typetag::serde]
impl Trainable for Slow {
    fn run(&self, c: &Value, ctx: &mut TrialContext) -> Result<()> {
        let id = ctx.trial_id().to_string();
        let dir = Path::new(&self.dir);
        let n = std::fs::read_dir(dir)?
            .filter(|e| {
                e.as_ref().is_ok_and(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{id}.start"))
                })
            })
            .count();
        std::fs::write(dir.join(format!("{id}.start.{n}")), now_ms().to_string())?;
        if c["fail"] == "always" || (c["fail"] == "once" && n == 0) {
            return Err(VolleyError::execution(format!("{id} fails on purpose")));
        }
        while ctx.iteration() < self.iterations {
            std::thread::sleep(Duration::from_millis(self.sleep_ms));
            ctx.report(
                metrics([("loss", c["x"].as_f64().unwrap_or(0.0))]),
                Some(TrainCheckpoint::new().with_value("i", &ctx.iteration())?),
            )?;
        }
        std::fs::write(dir.join(format!("{id}.done.{n}")), now_ms().to_string())?;
        Ok(())
    }
}

fn quiet(mut c: TuneConfig) -> TuneConfig {
    c.progress = false;
    c
}

fn random_and_tpe_reach_the_optimum() {
    let dir = tempfile::tempdir().unwrap();
    let space = SearchSpace::new()
        .with("x", uniform(-2.0, 2.0))
        .with("y", uniform(-2.0, 2.0));
    let run = |search: SearchAlgorithm, name: &str| {
        let mut c = quiet(TuneConfig::new("loss", Mode::Min, 30));
        // One trial at a time: each suggestion sees every earlier result, so the
        // sequence is the same on every run.
        c.max_concurrent_trials = Some(1);
        c.search = search;
        c.seed = 3;
        Tuner::new(
            Quadratic,
            space.clone(),
            c,
            RunConfig::new(dir.path().to_str().unwrap(), name),
        )
        .with_resources(Resources::cpus(0.5))
        .fit()
        .unwrap()
    };
    let random = run(SearchAlgorithm::Random, "random");
    let tpe = run(
        SearchAlgorithm::Tpe(TpeConfig {
            n_initial: 8,
            ..Default::default()
        }),
        "tpe",
    );
    for (name, grid) in [("random", &random), ("tpe", &tpe)] {
        assert_eq!(grid.trials.len(), 30);
        assert!(grid
            .trials
            .iter()
            .all(|t| t.status == TrialStatus::Terminated));
        let best = grid.best_result().unwrap();
        let loss = best.metrics["loss"];
        assert!(loss < 0.15, "{name}: best loss {loss} at {}", best.config);
        let table = grid.to_table().unwrap();
        assert_eq!(table.num_rows(), 90, "3 reports x 30 trials");
        assert!(table.column_by_name("loss").is_some());
        println!("ok: {name} best loss {loss:.4} at {}", best.config);
    }
    // Same seed, same trials.
    let again = run(SearchAlgorithm::Random, "random-again");
    let configs = |g: &volley_tune::ResultGrid| -> Vec<Value> {
        g.trials.iter().map(|t| t.config.clone()).collect()
    };
    assert_eq!(configs(&random), configs(&again));
}

fn asha_stops_the_bad_trials_early() {
    let dir = tempfile::tempdir().unwrap();
    // One pass over a grid of 16 values.
    let mut c = quiet(TuneConfig::new("loss", Mode::Min, 1));
    c.scheduler = SchedulerConfig::Asha(AshaConfig {
        max_t: 16,
        grace_period: 1,
        reduction_factor: 2.0,
    });
    c.max_concurrent_trials = Some(2);
    let grid = Tuner::new(
        Curve { sleep_ms: 5 },
        SearchSpace::new().with("q", grid_search((0..16).map(|i| i as f64 / 16.0))),
        c,
        RunConfig::new(dir.path().to_str().unwrap(), "asha"),
    )
    .with_resources(Resources::cpus(0.5))
    .fit()
    .unwrap();
    // 16 trials (q = 0, 1/16, ...), taken in grid order: later ones are worse.
    let iterations: Vec<u64> = grid
        .trials
        .iter()
        .map(|t| t.history.last().map_or(0, |r| r.iteration))
        .collect();
    let stopped = iterations.iter().filter(|&&i| i < 16).count();
    assert!(stopped >= 8, "ASHA stopped {stopped} of 16: {iterations:?}");
    let best = grid.best_result().unwrap();
    assert_eq!(best.config["q"], 0.0, "the best trial ran to its end");
    assert_eq!(best.history.len(), 16);
    let total: u64 = iterations.iter().sum();
    assert!(total < 16 * 16 / 2, "ASHA spent {total} iterations of 256");
    println!("ok: ASHA stopped {stopped} of 16 trials early, {total} of 256 iterations");
}

fn pbt_moves_the_population_to_better_configs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = quiet(TuneConfig::new("score", Mode::Max, 1));
    let mut mutations = BTreeMap::new();
    mutations.insert("h".to_string(), uniform(0.0, 1.0));
    c.scheduler = SchedulerConfig::Pbt(PbtConfig {
        perturbation_interval: 4,
        quantile_fraction: 0.25,
        resample_probability: 0.25,
        hyperparam_mutations: mutations,
        seed: 1,
    });
    c.seed = 2;
    let grid = Tuner::new(
        Climb,
        SearchSpace::new().with("h", grid_search([0.05, 0.2, 0.95, 0.6])),
        c,
        RunConfig::new(dir.path().to_str().unwrap(), "pbt"),
    )
    .with_resources(Resources::cpus(0.5))
    .fit()
    .unwrap();
    let start: f64 = [0.05f64, 0.2, 0.95, 0.6]
        .iter()
        .map(|h| (h - 0.7).abs())
        .sum::<f64>()
        / 4.0;
    let end: f64 = grid
        .trials
        .iter()
        .map(|t| (t.config["h"].as_f64().unwrap() - 0.7).abs())
        .sum::<f64>()
        / 4.0;
    let exploited = grid
        .trials
        .iter()
        .filter(|t| {
            t.history
                .iter()
                .any(|r| r.metrics["h"] != t.history[0].metrics["h"])
        })
        .count();
    assert!(exploited >= 1, "PBT replaced at least one trial's config");
    assert!(
        end < start,
        "mean |h - 0.7| went from {start:.3} to {end:.3}"
    );
    for t in &grid.trials {
        assert_eq!(t.status, TrialStatus::Terminated);
        assert_eq!(t.history.last().unwrap().iteration, 24, "{}", t.id);
    }
    println!(
        "ok: PBT moved mean |h - 0.7| from {start:.3} to {end:.3} ({exploited} trials exploited)"
    );
}

fn resources_errors_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let slow = Slow {
        dir: marks.to_str().unwrap().to_string(),
        iterations: 3,
        sleep_ms: 100,
    };
    let space = SearchSpace::new().with("x", uniform(0.0, 1.0)).with(
        "fail",
        grid_search(["no", "no", "no", "once", "always", "no"]),
    );
    let mut run = RunConfig::new(dir.path().join("runs").to_str().unwrap(), "res");
    run.failure.max_failures = 1;
    let grid = Tuner::new(
        slow,
        space.clone(),
        quiet(TuneConfig::new("loss", Mode::Min, 1)),
        run,
    )
    .with_resources(Resources::cpus(1.0))
    .fit()
    .unwrap();
    // At most 2 one-CPU trials at once on this 2-CPU machine, and 2 were reached.
    let mut spans = Vec::new();
    for t in &grid.trials {
        for e in std::fs::read_dir(&marks).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix(&format!("{}.done.", t.id)) {
                let end: u128 = std::fs::read_to_string(e.path()).unwrap().parse().unwrap();
                let begin: u128 =
                    std::fs::read_to_string(marks.join(format!("{}.start.{n}", t.id)))
                        .unwrap()
                        .parse()
                        .unwrap();
                spans.push((begin, end));
            }
        }
    }
    let most = spans
        .iter()
        .map(|(b, _)| spans.iter().filter(|(b2, e2)| b2 <= b && b < e2).count())
        .max()
        .unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(most <= cpus, "{most} trials at once on {cpus} CPUs");
    if cpus >= 2 {
        assert!(most >= 2, "trials ran side by side");
    }
    // The one failing once was retried and finished; the one always failing is
    // recorded with its error and did not end the sweep.
    let by_fail = |f: &str| grid.trials.iter().find(|t| t.config["fail"] == f).unwrap();
    assert_eq!(by_fail("once").status, TrialStatus::Terminated);
    let bad = by_fail("always");
    assert_eq!(bad.status, TrialStatus::Error);
    assert!(
        bad.error
            .as_deref()
            .unwrap_or("")
            .contains("fails on purpose"),
        "{:?}",
        bad.error
    );
    assert_eq!(grid.errors().len(), 1);
    assert_eq!(
        grid.trials
            .iter()
            .filter(|t| t.status == TrialStatus::Terminated)
            .count(),
        5
    );

    // Invalid spaces, configs and resources fail before any trial starts.
    let fails = |space: SearchSpace, c: TuneConfig, r: Resources| {
        let started = std::fs::read_dir(&marks).unwrap().count();
        let e = Tuner::new(
            Slow {
                dir: marks.to_str().unwrap().to_string(),
                iterations: 1,
                sleep_ms: 0,
            },
            space,
            quiet(c),
            RunConfig::new(dir.path().join("runs").to_str().unwrap(), "bad"),
        )
        .with_resources(r)
        .fit()
        .unwrap_err()
        .to_string();
        assert_eq!(
            std::fs::read_dir(&marks).unwrap().count(),
            started,
            "no trial ran: {e}"
        );
        e
    };
    let ok = TuneConfig::new("loss", Mode::Min, 2);
    let e = fails(
        SearchSpace::new().with("lr", loguniform(0.0, 1.0)),
        ok.clone(),
        Resources::cpus(1.0),
    );
    assert!(e.contains("`lr`"), "{e}");
    let e = fails(space.clone(), ok.clone(), Resources::cpus(1000.0));
    assert!(e.contains("CPUs"), "{e}");
    let e = fails(
        space.clone(),
        TuneConfig::new("loss", Mode::Min, 0),
        Resources::cpus(1.0),
    );
    assert!(e.contains("num_samples"), "{e}");
    let mut tpe_grid = ok.clone();
    tpe_grid.search = SearchAlgorithm::Tpe(TpeConfig::default());
    let e = fails(space.clone(), tpe_grid, Resources::cpus(1.0));
    assert!(e.contains("grid_search"), "{e}");
    let mut bad_asha = ok;
    bad_asha.scheduler = SchedulerConfig::Asha(AshaConfig {
        max_t: 0,
        ..Default::default()
    });
    let e = fails(space, bad_asha, Resources::cpus(1.0));
    assert!(e.contains("ASHA"), "{e}");
    println!("ok: at most {most} trials at once; retries, errors and bad configs");
}

/// The sweep the resume test kills and runs again (in a child process).
fn resume_child(dir: &Path) {
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let grid = Tuner::new(
        Slow {
            dir: marks.to_str().unwrap().to_string(),
            iterations: 3,
            sleep_ms: 150,
        },
        SearchSpace::new()
            .with("x", uniform(0.0, 1.0))
            .with("fail", choice(["no"])),
        quiet(TuneConfig::new("loss", Mode::Min, 8)),
        RunConfig::new(dir.join("runs").to_str().unwrap(), "resume"),
    )
    .with_resources(Resources::cpus(1.0))
    .fit()
    .unwrap();
    assert_eq!(grid.trials.len(), 8);
}

fn resume_after_the_sweep_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let state = dir.path().join("runs/resume/experiment.json");
    let terminated = || -> Vec<String> {
        let Ok(bytes) = std::fs::read(&state) else {
            return vec![];
        };
        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
            return vec![];
        };
        v["trials"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["status"] == "Terminated")
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    let mut child = std::process::Command::new(&exe)
        .args(["--resume-child", dir.path().to_str().unwrap()])
        .spawn()
        .unwrap();
    let start = Instant::now();
    while terminated().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the sweep made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let finished_before = terminated();
    let status = std::process::Command::new(&exe)
        .args(["--resume-child", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let marks = dir.path().join("marks");
    let count = |id: &str, what: &str| {
        std::fs::read_dir(&marks)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{id}.{what}."))
            })
            .count()
    };
    for id in &finished_before {
        assert_eq!(
            count(id, "start"),
            1,
            "{id} finished before the kill and was not run again"
        );
    }
    let all = terminated();
    assert_eq!(all.len(), 8, "every trial finished: {all:?}");
    for id in &all {
        assert!(count(id, "done") >= 1, "{id} ran to its end");
    }
    // Resumed with the other mode, its recorded results would be read backwards.
    let e = Tuner::new(
        Slow {
            dir: marks.to_str().unwrap().to_string(),
            iterations: 3,
            sleep_ms: 0,
        },
        SearchSpace::new().with("x", uniform(0.0, 1.0)),
        quiet(TuneConfig::new("loss", Mode::Max, 8)),
        RunConfig::new(dir.path().join("runs").to_str().unwrap(), "resume"),
    )
    .fit()
    .unwrap_err()
    .to_string();
    assert!(e.contains("ran with metric `loss` (Min)"), "{e}");
    println!(
        "ok: killed after {} trials finished; the rerun ran only the other {}",
        finished_before.len(),
        8 - finished_before.len()
    );
}

fn main() {
    if volley_runtime::cluster::is_worker() {
        volley_runtime::cluster::run_worker();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--resume-child") {
        resume_child(Path::new(&args[i + 1]));
        return;
    }
    let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let tests: [(&str, fn()); 5] = [
        ("search", random_and_tpe_reach_the_optimum),
        ("asha", asha_stops_the_bad_trials_early),
        ("pbt", pbt_moves_the_population_to_better_configs),
        ("resources", resources_errors_and_retries),
        ("resume", resume_after_the_sweep_is_killed),
    ];
    for (name, test) in tests {
        if filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str())) {
            let start = Instant::now();
            test();
            println!(
                "test {name} ... ok ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
        }
    }
}
