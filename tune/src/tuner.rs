//! The tuner: creates trials from the searcher, runs as many at once as the cluster's
//! resources allow, feeds their reports to the scheduler, keeps the experiment's state
//! in storage, and resumes it.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley_common::{Result, VolleyError};
use volley_run::{
    Checkpoint, CheckpointConfig, CheckpointStore, ClusterLease, Decision as RunDecision, Metrics,
    Peer, Report, ReportHandler, ReportServer, RunConfig, SavedCheckpoint,
};
use volley_runtime::cluster::{Cluster, ObjectRef, Resources, TaskOptions};

use crate::schedulers::{
    Asha, AshaConfig, Decision, Fifo, MedianStopping, MedianStoppingConfig, Pbt, PbtConfig,
    Scheduler, TrialInfo,
};
use crate::search::{BasicVariant, Searcher, Tpe, TpeConfig};
use crate::space::SearchSpace;
use crate::trial::{Trainable, TrialTask};
use crate::Mode;
#[cfg(feature = "train")]
use volley_train::{DataParallelTrainer, ReportHook};

const STATE_FILE: &str = "experiment.json";

/// Which searcher makes the configs.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum SearchAlgorithm {
    /// Grid and random search.
    #[default]
    Random,
    /// Tree-structured Parzen estimator.
    Tpe(TpeConfig),
}

/// Which scheduler decides after each result.
#[derive(Debug, Clone, Default)]
pub enum SchedulerConfig {
    /// Run every trial to its end.
    #[default]
    Fifo,
    /// Asynchronous successive halving.
    Asha(AshaConfig),
    /// Median stopping.
    MedianStopping(MedianStoppingConfig),
    /// Population-based training.
    Pbt(PbtConfig),
}

/// What a sweep optimizes and how.
#[derive(Debug, Clone)]
pub struct TuneConfig {
    /// The metric each trial reports.
    pub metric: String,
    /// Whether it is minimized or maximized.
    pub mode: Mode,
    /// Trials (random and TPE) or passes over the grid (with `grid_search`).
    pub num_samples: usize,
    /// At most this many trials at once (`None`: as many as the resources allow).
    pub max_concurrent_trials: Option<usize>,
    /// The searcher.
    pub search: SearchAlgorithm,
    /// The scheduler.
    pub scheduler: SchedulerConfig,
    /// After this long no trial starts and running ones stop at their next report.
    pub time_budget: Option<Duration>,
    /// Seed of the searcher (the same seed gives the same trials).
    pub seed: u64,
    /// Print the status (a table on a terminal, a line per event otherwise).
    pub progress: bool,
}

impl TuneConfig {
    /// Optimizes `metric` in `mode` over `num_samples` trials.
    pub fn new(metric: impl Into<String>, mode: Mode, num_samples: usize) -> Self {
        Self {
            metric: metric.into(),
            mode,
            num_samples,
            max_concurrent_trials: None,
            search: SearchAlgorithm::Random,
            scheduler: SchedulerConfig::Fifo,
            time_budget: None,
            seed: 0,
            progress: true,
        }
    }
}

/// Where a trial stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrialStatus {
    /// Waiting to (re)start.
    Pending,
    /// Running.
    Running,
    /// Stopped by PBT, waiting to restart from a better trial's checkpoint.
    Paused,
    /// Finished, or stopped early by the scheduler.
    Terminated,
    /// Failed more often than `max_failures` allows.
    Error,
}

impl TrialStatus {
    fn done(self) -> bool {
        matches!(self, TrialStatus::Terminated | TrialStatus::Error)
    }
}

/// One report in a trial's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialReport {
    /// 1 for the trial's first report.
    pub iteration: u64,
    /// Its metrics.
    pub metrics: Metrics,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrialState {
    index: usize,
    id: String,
    config: Value,
    status: TrialStatus,
    history: Vec<TrialReport>,
    checkpoint: Option<Checkpoint>,
    failures: u32,
    error: Option<String>,
    attempt: u32,
    /// Whether the scheduler stopped it early.
    stopped_early: bool,
    #[serde(skip)]
    stopping: bool,
    /// PBT: the config to restart with.
    next_config: Option<Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Experiment {
    metric: String,
    mode: Mode,
    trials: Vec<TrialState>,
}

/// The tuner's state, shared with the thread that answers trials' reports.
struct Shared {
    trials: Vec<TrialState>,
    scheduler: Box<dyn Scheduler>,
    population: bool,
    metric: String,
    stop_all: bool,
    dirty: bool,
    events: Vec<String>,
    /// `{storage}/{experiment}`, where trials keep their checkpoints.
    trials_root: String,
    checkpoint: CheckpointConfig,
}

impl Shared {
    fn infos(&self) -> Vec<TrialInfo> {
        let metric = &self.metric;
        self.trials
            .iter()
            .map(|t| TrialInfo {
                index: t.index,
                config: t.config.clone(),
                results: t
                    .history
                    .iter()
                    .filter_map(|r| r.metrics.get(metric).map(|v| (r.iteration, *v)))
                    .collect(),
                checkpoint: t.checkpoint.as_ref().map(|c| c.step),
                running: t.status == TrialStatus::Running,
            })
            .collect()
    }

    /// Records a report and returns whether the trial goes on.
    fn on_report(&mut self, trial: usize, attempt: u32, report: Report) -> bool {
        let Some(t) = self.trials.get_mut(trial) else {
            return false;
        };
        if t.attempt != attempt || t.status != TrialStatus::Running {
            return false;
        }
        if t.stopping {
            return false;
        }
        t.history.push(TrialReport {
            iteration: report.iteration,
            metrics: report.metrics.clone(),
        });
        if report.checkpoint.is_some() {
            t.checkpoint = report.checkpoint;
        }
        self.dirty = true;
        if self.stop_all {
            t.stopping = true;
            return false;
        }
        let Some(value) = report.metrics.get(&self.metric).copied() else {
            t.error = Some(format!(
                "reported metrics {:?} without `{}`",
                report.metrics.keys().collect::<Vec<_>>(),
                self.metric
            ));
            t.stopping = true;
            return false;
        };
        let infos = if self.population {
            self.infos()
        } else {
            Vec::new()
        };
        match self
            .scheduler
            .on_result(trial, report.iteration, value, &infos)
        {
            Decision::Continue => true,
            Decision::Stop => {
                let t = &mut self.trials[trial];
                t.stopping = true;
                t.stopped_early = true;
                false
            }
            Decision::Exploit { donor, config } => {
                match self.copy_checkpoint(donor, trial, report.iteration) {
                    Ok(c) => {
                        let id = self.trials[donor].id.clone();
                        let t = &mut self.trials[trial];
                        t.checkpoint = Some(c);
                        t.next_config = Some(config.clone());
                        t.stopping = true;
                        self.events.push(format!(
                            "{} exploits {id} at iteration {}: new config {config}",
                            t.id, report.iteration
                        ));
                        false
                    }
                    Err(e) => {
                        let id = self.trials[trial].id.clone();
                        self.events
                            .push(format!("{id}: PBT could not copy a checkpoint: {e}"));
                        // A copy cut short left the step it wrote incomplete: the
                        // trial's checkpoint is its newest complete one.
                        let recorded = self.trials[trial].checkpoint.take();
                        self.trials[trial].checkpoint =
                            resume_point(&self.trials_root, &id, recorded);
                        true
                    }
                }
            }
        }
    }

    /// Copies `donor`'s latest checkpoint into `trial`'s store as step `step`.
    fn copy_checkpoint(&self, donor: usize, trial: usize, step: u64) -> Result<Checkpoint> {
        let d = &self.trials[donor];
        let c = d
            .checkpoint
            .clone()
            .ok_or_else(|| VolleyError::execution(format!("{} has no checkpoint", d.id)))?;
        // The donor may be saving a checkpoint right now: its store is only read.
        let from = CheckpointStore::open_for_reading(
            &self.trials_root,
            &d.id,
            CheckpointConfig::default(),
        )?;
        // Its files are read by name: the step must still be complete (not pruned, not
        // being saved again).
        if !from.list()?.iter().any(|k| k.step == c.step) {
            return Err(VolleyError::execution(format!(
                "{}'s checkpoint of step {} is no longer complete",
                d.id, c.step
            )));
        }
        let files: Vec<(String, Vec<u8>)> = c
            .files
            .iter()
            .map(|f| Ok((f.clone(), from.read(&c, f)?)))
            .collect::<Result<_>>()?;
        let to = CheckpointStore::open(
            &self.trials_root,
            &self.trials[trial].id,
            self.checkpoint.clone(),
        )?;
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        to.save(step, &c.metrics, &refs)
    }
}

/// What a trial runs.
#[derive(Debug)]
enum Runner {
    /// A function, as a cluster task.
    Function(Box<dyn Trainable>),
    /// A data-parallel training run (its ranks are actors; the tuner drives its `fit`).
    #[cfg(feature = "train")]
    Trainer(Box<DataParallelTrainer>),
}

/// Runs a sweep.
pub struct Tuner {
    runner: Runner,
    space: SearchSpace,
    config: TuneConfig,
    run: RunConfig,
    resources: Resources,
    cluster: Option<Cluster>,
}

impl std::fmt::Debug for Tuner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tuner")
            .field("runner", &self.runner)
            .field("config", &self.config)
            .field("run", &self.run)
            .finish()
    }
}

/// One trial of a finished sweep.
#[derive(Debug, Clone)]
pub struct TrialResult {
    /// `trial_00003`.
    pub id: String,
    /// Its config.
    pub config: Value,
    /// How it ended.
    pub status: TrialStatus,
    /// Whether the scheduler stopped it (before its own end, or at ASHA's `max_t`).
    pub stopped_early: bool,
    /// Its last report's metrics.
    pub metrics: Metrics,
    /// Every report.
    pub history: Vec<TrialReport>,
    /// Its latest checkpoint.
    pub checkpoint: Option<SavedCheckpoint>,
    /// Why it failed.
    pub error: Option<String>,
}

/// What [`Tuner::fit`] returns: every trial, and the best.
#[derive(Debug, Clone)]
pub struct ResultGrid {
    /// The trials, in creation order.
    pub trials: Vec<TrialResult>,
    metric: String,
    mode: Mode,
}

impl ResultGrid {
    /// The trial whose last reported metric is best.
    pub fn best_result(&self) -> Option<&TrialResult> {
        self.trials
            .iter()
            .filter_map(|t| t.metrics.get(&self.metric).map(|v| (t, *v)))
            .filter(|(_, v)| v.is_finite())
            .reduce(|a, b| match self.mode {
                Mode::Min if b.1 < a.1 => b,
                Mode::Max if b.1 > a.1 => b,
                _ => a,
            })
            .map(|(t, _)| t)
    }

    /// Trials that failed.
    pub fn errors(&self) -> Vec<&TrialResult> {
        self.trials
            .iter()
            .filter(|t| t.status == TrialStatus::Error)
            .collect()
    }

    /// Every report of every trial: `trial_id`, `status`, `config` (JSON), `iteration`,
    /// then one `Float64` column per metric. Query it with SQL or write it to Parquet.
    pub fn to_table(&self) -> Result<RecordBatch> {
        let rows: Vec<(&TrialResult, &TrialReport)> = self
            .trials
            .iter()
            .flat_map(|t| t.history.iter().map(move |r| (t, r)))
            .collect();
        let mut names: Vec<&String> = rows.iter().flat_map(|(_, r)| r.metrics.keys()).collect();
        names.sort();
        names.dedup();
        let mut fields = vec![
            Field::new("trial_id", DataType::Utf8, false),
            Field::new("status", DataType::Utf8, false),
            Field::new("config", DataType::Utf8, false),
            Field::new("iteration", DataType::UInt64, false),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|(t, _)| t.id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|(t, _)| format!("{:?}", t.status)),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|(t, _)| t.config.to_string()),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|(_, r)| r.iteration),
            )),
        ];
        for n in names {
            fields.push(Field::new(n, DataType::Float64, true));
            columns.push(Arc::new(Float64Array::from_iter(
                rows.iter().map(|(_, r)| r.metrics.get(n).copied()),
            )));
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }
}

impl Tuner {
    /// A sweep of `trainable` over `space`, kept under `run.storage_path/run.name`
    /// (`run.failure.max_failures`: retries per trial; `run.checkpoint`: per trial).
    pub fn new(
        trainable: impl Trainable + 'static,
        space: SearchSpace,
        config: TuneConfig,
        run: RunConfig,
    ) -> Self {
        Self {
            runner: Runner::Function(Box::new(trainable)),
            space,
            config,
            run,
            resources: Resources::cpus(1.0),
            cluster: None,
        }
    }

    /// A sweep whose trials are runs of `trainer`, each with its sampled config as the
    /// ranks' `ctx.config()`, its checkpoints under `run.storage_path/run.name/trial_N`,
    /// and its reports (rank 0's) going to the scheduler, which may stop the run. A
    /// trial holds all its ranks' resources. (Feature `train`.)
    #[cfg(feature = "train")]
    pub fn for_trainer(
        trainer: DataParallelTrainer,
        space: SearchSpace,
        config: TuneConfig,
        run: RunConfig,
    ) -> Self {
        let resources = trainer.resources();
        Self {
            runner: Runner::Trainer(Box::new(trainer)),
            space,
            config,
            run,
            resources,
            cluster: None,
        }
    }

    /// Resumes the experiment at `path` (`storage/name`): finished trials are not run
    /// again, unfinished ones continue from their latest checkpoint. The same as
    /// running [`Tuner::new`] again with `RunConfig::new(storage, name)`: failure and
    /// checkpoint settings are the defaults (no retries, every checkpoint kept); to
    /// resume with others, call [`Tuner::new`] with the run's own [`RunConfig`].
    pub fn restore(
        path: &str,
        trainable: impl Trainable + 'static,
        space: SearchSpace,
        config: TuneConfig,
    ) -> Result<Self> {
        let path = path.trim_end_matches('/');
        let (storage, name) = path.rsplit_once('/').ok_or_else(|| {
            VolleyError::Config(format!("{path} is not an experiment path (storage/name)"))
        })?;
        let t = Self::new(trainable, space, config, RunConfig::new(storage, name));
        let store = CheckpointStore::open(storage, name, CheckpointConfig::default())?;
        if store.get_file(STATE_FILE)?.is_none() {
            return Err(VolleyError::Config(format!("no experiment at {path}")));
        }
        Ok(t)
    }

    /// What each trial holds (default 1 CPU).
    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// Runs the trials on `cluster` (default: `VOLLEY_ADDRESS`'s, else a private
    /// one-node cluster on this machine).
    pub fn with_cluster(mut self, cluster: Cluster) -> Self {
        self.cluster = Some(cluster);
        self
    }

    fn validate(&self) -> Result<()> {
        let c = &self.config;
        if c.metric.is_empty() {
            return Err(VolleyError::Config("TuneConfig.metric is empty".into()));
        }
        if c.num_samples == 0 {
            return Err(VolleyError::Config(
                "TuneConfig.num_samples must be at least 1".into(),
            ));
        }
        if c.max_concurrent_trials == Some(0) {
            return Err(VolleyError::Config(
                "TuneConfig.max_concurrent_trials must be at least 1".into(),
            ));
        }
        self.space.validate()?;
        self.resources
            .validate()
            .map_err(|e| e.context("trial resources"))
    }

    fn searcher(&self) -> Result<Box<dyn Searcher>> {
        let c = &self.config;
        Ok(match &c.search {
            SearchAlgorithm::Random => {
                Box::new(BasicVariant::new(self.space.clone(), c.num_samples, c.seed))
            }
            SearchAlgorithm::Tpe(t) => Box::new(Tpe::new(
                self.space.clone(),
                c.num_samples,
                c.mode,
                c.seed,
                *t,
            )?),
        })
    }

    fn scheduler(&self) -> Result<(Box<dyn Scheduler>, bool)> {
        let mode = self.config.mode;
        Ok(match &self.config.scheduler {
            SchedulerConfig::Fifo => (Box::new(Fifo), false),
            SchedulerConfig::Asha(a) => (Box::new(Asha::new(*a, mode)?), false),
            SchedulerConfig::MedianStopping(m) => (Box::new(MedianStopping::new(*m, mode)), true),
            SchedulerConfig::Pbt(p) => (Box::new(Pbt::new(p.clone(), mode)?), true),
        })
    }

    /// Runs the sweep to its end (or its time budget) and returns every trial.
    pub fn fit(&self) -> Result<ResultGrid> {
        self.validate()?;
        let mut searcher = self.searcher()?;
        let (mut scheduler, population) = self.scheduler()?;
        let storage = self.run.resolved_storage_path()?;
        let exp_store =
            CheckpointStore::open(&storage, &self.run.name, CheckpointConfig::default())
                .map_err(|e| VolleyError::Config(format!("RunConfig.storage_path: {e}")))?;
        let trials_root = format!("{}/{}", storage.trim_end_matches('/'), self.run.name);
        let trainable = match &self.runner {
            Runner::Function(f) => serde_json::to_value(f).map_err(|e| {
                VolleyError::plan(format!("the trainable cannot be serialized: {e}"))
            })?,
            #[cfg(feature = "train")]
            Runner::Trainer(_) => Value::Null,
        };
        // Trainer trials run on threads here; they say when they end through this.
        #[cfg_attr(not(feature = "train"), allow(unused_variables))]
        let (ended_tx, ended) = std::sync::mpsc::channel::<(usize, Result<()>)>();

        // Resume: finished trials stay finished; the others start again.
        let mut trials: Vec<TrialState> = match exp_store.get_file(STATE_FILE)? {
            Some(bytes) => {
                let e: Experiment = serde_json::from_slice(&bytes).map_err(|e| {
                    VolleyError::execution(format!(
                        "{trials_root}/{STATE_FILE} is not a valid experiment record: {e}"
                    ))
                })?;
                // Its histories are read by the metric and mode it ran with.
                if e.metric != self.config.metric || e.mode != self.config.mode {
                    return Err(VolleyError::plan(format!(
                        "the experiment at {trials_root} ran with metric `{}` ({:?}); \
                         resuming it with `{}` ({:?}) would read its results otherwise: \
                         give the same, or another experiment name",
                        e.metric, e.mode, self.config.metric, self.config.mode
                    )));
                }
                e.trials
            }
            None => Vec::new(),
        };
        for t in &mut trials {
            if !t.status.done() {
                t.status = TrialStatus::Pending;
                // It runs again from its checkpoint: what it reported past that is
                // reported again, and is not the schedulers' to learn twice.
                let resume = resume_point(&trials_root, &t.id, t.checkpoint.clone());
                let iteration = resume.map_or(0, |c| c.step);
                t.history.retain(|r| r.iteration <= iteration);
            }
            t.stopping = false;
        }
        for t in trials.iter().filter(|t| t.status.done()) {
            let last = t
                .history
                .last()
                .and_then(|r| r.metrics.get(&self.config.metric))
                .copied();
            searcher.on_trial_complete(t.index, &t.config, last);
        }
        // Schedulers learn the results already recorded (decisions are not replayed).
        for t in &trials {
            for r in &t.history {
                if let Some(v) = r.metrics.get(&self.config.metric) {
                    let _ = scheduler.on_result(t.index, r.iteration, *v, &[]);
                }
            }
        }

        let lease = ClusterLease::acquire(self.cluster.as_ref(), |total, what| {
            capacity(&self.resources, total, what).map(|_| ())
        })?;
        let cluster = lease.cluster().clone();
        let what = if lease.is_private() {
            "this machine"
        } else {
            "the cluster"
        };
        let mut slots = capacity(&self.resources, lease.total(), what)?;
        if let Some(m) = self.config.max_concurrent_trials {
            slots = slots.min(m);
        }

        let shared = Arc::new(Mutex::new(Shared {
            trials,
            scheduler,
            population,
            metric: self.config.metric.clone(),
            stop_all: false,
            dirty: true,
            events: Vec::new(),
            trials_root: trials_root.clone(),
            checkpoint: self.run.checkpoint.clone(),
        }));
        let token = uuid::Uuid::new_v4().simple().to_string();
        let server = ReportServer::start(
            &lease.driver_host()?,
            token.clone(),
            Arc::new(TrialReports(Arc::clone(&shared))),
            "volley-tune",
        )?;

        let start = Instant::now();
        let mut status = Status::new(self.config.progress);
        // Running trials: a task's result, or `None` for a trainer run on a thread.
        let mut running: Vec<(usize, Option<ObjectRef>)> = Vec::new();
        let mut last_save = Instant::now();
        let result = (|| -> Result<()> {
            loop {
                let over = self
                    .config
                    .time_budget
                    .is_some_and(|b| start.elapsed() >= b);
                // Start what fits.
                while running.len() < slots && !over {
                    let mut s = shared.lock().expect("tuner lock");
                    let next = s.trials.iter().position(|t| {
                        matches!(t.status, TrialStatus::Pending | TrialStatus::Paused)
                    });
                    let index = match next {
                        Some(i) => i,
                        None => {
                            let i = s.trials.len();
                            let Some(config) = searcher.suggest(i) else {
                                break;
                            };
                            s.trials.push(TrialState {
                                index: i,
                                id: format!("trial_{i:05}"),
                                config,
                                status: TrialStatus::Pending,
                                history: Vec::new(),
                                checkpoint: None,
                                failures: 0,
                                error: None,
                                attempt: 0,
                                stopped_early: false,
                                stopping: false,
                                next_config: None,
                            });
                            i
                        }
                    };
                    let t = &mut s.trials[index];
                    t.attempt += 1;
                    t.status = TrialStatus::Running;
                    if let Some(c) = t.next_config.take() {
                        t.config = c;
                    }
                    let resume = resume_point(&trials_root, &t.id, t.checkpoint.take());
                    t.checkpoint = resume.clone();
                    let iteration = resume.as_ref().map_or(0, |c| c.step);
                    t.history.retain(|r| r.iteration <= iteration);
                    // (The attempt and config are the trainer runner's.)
                    #[cfg_attr(not(feature = "train"), allow(unused_variables))]
                    let (id, attempt, trial_config) = (t.id.clone(), t.attempt, t.config.clone());
                    let task = TrialTask {
                        trainable: trainable.clone(),
                        config: t.config.clone(),
                        trial: index,
                        trial_id: t.id.clone(),
                        attempt: t.attempt,
                        tuner: server.address(),
                        token: token.clone(),
                        storage: trials_root.clone(),
                        checkpoint: self.run.checkpoint.clone(),
                        resume,
                        iteration,
                    };
                    let event = if t.attempt == 1 {
                        format!("{} started: {}", t.id, t.config)
                    } else {
                        format!(
                            "{} restarted (attempt {}) from iteration {iteration}: {}",
                            t.id, t.attempt, t.config
                        )
                    };
                    s.events.push(event);
                    s.dirty = true;
                    drop(s);
                    match &self.runner {
                        Runner::Function(_) => {
                            let options = TaskOptions::default()
                                .resources(self.resources.clone())
                                .max_retries(0)
                                .name(id);
                            let r = cluster.submit(task, &[], &options)?;
                            running.push((index, Some(r)));
                        }
                        #[cfg(feature = "train")]
                        Runner::Trainer(template) => {
                            let hook_state = Arc::clone(&shared);
                            let hook: ReportHook = Arc::new(move |r: &Report| {
                                hook_state.lock().expect("tuner lock").on_report(
                                    index,
                                    attempt,
                                    r.clone(),
                                )
                            });
                            let mut run = RunConfig::new(trials_root.clone(), id.clone());
                            run.checkpoint = self.run.checkpoint.clone();
                            let trainer = template
                                .for_trial(trial_config, run)?
                                .with_cluster(cluster.clone())
                                .with_report_hook(hook);
                            let tx = ended_tx.clone();
                            std::thread::Builder::new()
                                .name(id)
                                .spawn(move || {
                                    // A panic is the trial's failure: the loop that
                                    // waits for its end must hear of it.
                                    let fit = std::panic::catch_unwind(
                                        std::panic::AssertUnwindSafe(|| trainer.fit()),
                                    )
                                    .unwrap_or_else(|_| {
                                        Err(VolleyError::execution("the trainer panicked"))
                                    });
                                    let _ = tx.send((index, fit.map(|_| ())));
                                })
                                .map_err(|e| {
                                    VolleyError::internal(format!("cannot start a thread: {e}"))
                                })?;
                            running.push((index, None));
                        }
                    }
                }
                if over {
                    shared.lock().expect("tuner lock").stop_all = true;
                }
                if running.is_empty() {
                    break;
                }
                let refs: Vec<ObjectRef> = running.iter().filter_map(|(_, r)| r.clone()).collect();
                let mut ended_now: Vec<(usize, Result<()>)> = Vec::new();
                if refs.is_empty() {
                    if let Ok(e) = ended.recv_timeout(Duration::from_millis(200)) {
                        ended_now.push(e);
                    }
                } else {
                    let (ready, _) = cluster.wait(&refs, 1, Duration::from_millis(200))?;
                    for r in ready {
                        let pos = running
                            .iter()
                            .position(|(_, x)| x.as_ref().is_some_and(|x| x.id() == r.id()))
                            .expect("a ref we asked about");
                        ended_now.push((running[pos].0, cluster.get(&r).map(|_| ())));
                    }
                }
                ended_now.extend(ended.try_iter());
                for (index, outcome) in ended_now {
                    running.retain(|(i, _)| *i != index);
                    let mut s = shared.lock().expect("tuner lock");
                    let max_failures = self.run.failure.max_failures;
                    let metric = s.metric.clone();
                    let t = &mut s.trials[index];
                    let stopping = std::mem::take(&mut t.stopping);
                    let event = match outcome {
                        _ if stopping && t.next_config.is_some() => {
                            t.status = TrialStatus::Paused;
                            None
                        }
                        _ if stopping && t.error.is_some() => {
                            t.status = TrialStatus::Error;
                            Some(format!(
                                "{} failed: {}",
                                t.id,
                                t.error.clone().unwrap_or_default()
                            ))
                        }
                        Ok(_) => {
                            t.status = TrialStatus::Terminated;
                            let how = if t.stopped_early {
                                "stopped early"
                            } else {
                                "finished"
                            };
                            let last = t.history.last().and_then(|r| r.metrics.get(&metric));
                            Some(format!(
                                "{} {how} after {} iterations ({metric} {})",
                                t.id,
                                t.history.last().map_or(0, |r| r.iteration),
                                last.map_or("-".to_string(), |v| format!("{v:.6}"))
                            ))
                        }
                        Err(_) if stopping => {
                            t.status = TrialStatus::Terminated;
                            Some(format!("{} stopped", t.id))
                        }
                        Err(e) => {
                            t.failures += 1;
                            if t.failures <= max_failures {
                                t.status = TrialStatus::Pending;
                                Some(format!(
                                    "{} failed ({e}); retrying ({} of {max_failures})",
                                    t.id, t.failures
                                ))
                            } else {
                                t.status = TrialStatus::Error;
                                t.error = Some(e.to_string());
                                Some(format!("{} failed: {e}", t.id))
                            }
                        }
                    };
                    if t.status.done() {
                        let last = t
                            .history
                            .last()
                            .and_then(|r| r.metrics.get(&metric))
                            .copied();
                        let (i, c) = (t.index, t.config.clone());
                        searcher.on_trial_complete(i, &c, last);
                    }
                    if let Some(e) = event {
                        s.events.push(e);
                    }
                    s.dirty = true;
                }
                let mut s = shared.lock().expect("tuner lock");
                for e in s.events.drain(..) {
                    status.event(&e);
                }
                status.draw(&s.trials, &self.config);
                if s.dirty && last_save.elapsed() > Duration::from_millis(250) {
                    save(&exp_store, &s, &self.config)?;
                    s.dirty = false;
                    last_save = Instant::now();
                }
            }
            Ok(())
        })();
        if result.is_err() {
            // Trials still running are told to stop at their next report (trainer
            // trials' hooks hold the state past this call). Function trials' tasks are
            // stopped now, and trainer trials waited for (a minute at most): a sweep
            // resumed next must not meet them still writing to their trials' stores.
            shared.lock().expect("tuner lock").stop_all = true;
            let tasks: Vec<&ObjectRef> = running.iter().filter_map(|(_, r)| r.as_ref()).collect();
            if !tasks.is_empty() {
                let _ = cluster.cancel(&tasks);
            }
            let mut threads = running.iter().filter(|(_, r)| r.is_none()).count();
            let deadline = Instant::now() + Duration::from_secs(60);
            while threads > 0 {
                match ended.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(_) => threads -= 1,
                    Err(_) => break,
                }
            }
        }
        server.shutdown();
        drop(lease);
        let s = shared.lock().expect("tuner lock");
        for e in &s.events {
            status.event(e);
        }
        save(&exp_store, &s, &self.config)?;
        result?;
        status.draw_final(&s.trials, &self.config);

        let mut out = Vec::new();
        for t in &s.trials {
            let checkpoint = match &t.checkpoint {
                Some(c) => {
                    let store = Arc::new(CheckpointStore::open(
                        &trials_root,
                        &t.id,
                        self.run.checkpoint.clone(),
                    )?);
                    // The last one reported, unless a newer one (saved by a trial that
                    // died before it reported) pruned it: then the newest.
                    let kept = store.list()?.iter().any(|k| k.step == c.step);
                    let c = if kept {
                        Some(c.clone())
                    } else {
                        store.latest()?
                    };
                    c.map(|c| SavedCheckpoint::new(c, store))
                }
                None => None,
            };
            out.push(TrialResult {
                id: t.id.clone(),
                config: t.config.clone(),
                status: t.status,
                stopped_early: t.stopped_early,
                metrics: t
                    .history
                    .last()
                    .map(|r| r.metrics.clone())
                    .unwrap_or_default(),
                history: t.history.clone(),
                checkpoint,
                error: t.error.clone(),
            });
        }
        Ok(ResultGrid {
            trials: out,
            metric: self.config.metric.clone(),
            mode: self.config.mode,
        })
    }
}

/// The checkpoint a trial starts again from: the newest complete one its store holds,
/// which can be newer than `recorded`, the last the tuner heard of (the tuner stopped
/// before recording a report, or the trial died between saving and reporting), or
/// hold it no more (pruned by `num_to_keep`); none where the store holds none; `recorded`
/// where the store cannot be read.
fn resume_point(trials_root: &str, id: &str, recorded: Option<Checkpoint>) -> Option<Checkpoint> {
    let newest = CheckpointStore::open_for_reading(trials_root, id, CheckpointConfig::default())
        .and_then(|store| store.latest());
    match newest {
        Ok(newest) => newest,
        Err(_) => recorded,
    }
}

/// How many trials of `need` fit in `total` at once; an error naming what is short
/// when none does.
fn capacity(need: &Resources, total: &Resources, what: &str) -> Result<usize> {
    let mut n = usize::MAX;
    let mut fit = |need: f64, have: f64, name: &str| -> Result<()> {
        if need > 0.0 {
            let k = ((have + 1e-9) / need).floor() as usize;
            if k == 0 {
                return Err(VolleyError::Config(format!(
                    "a trial needs {need} {name}; {what} has {have}"
                )));
            }
            n = n.min(k);
        }
        Ok(())
    };
    fit(need.num_cpus, total.num_cpus, "CPUs")?;
    fit(need.num_gpus, total.num_gpus, "GPUs")?;
    for (k, v) in &need.custom {
        fit(*v, total.custom.get(k).copied().unwrap_or(0.0), k)?;
    }
    if n == usize::MAX {
        return Err(VolleyError::Config(
            "a trial must hold some resource (CPUs, GPUs or a custom one)".into(),
        ));
    }
    Ok(n)
}

fn save(store: &CheckpointStore, s: &Shared, config: &TuneConfig) -> Result<()> {
    let e = ExperimentRef {
        metric: &config.metric,
        mode: config.mode,
        trials: &s.trials,
    };
    let bytes = serde_json::to_vec(&e).map_err(|e| VolleyError::internal(e.to_string()))?;
    store.put_file(STATE_FILE, bytes)
}

#[derive(Serialize)]
struct ExperimentRef<'a> {
    metric: &'a str,
    mode: Mode,
    trials: &'a [TrialState],
}

/// The tuner's end of the trials' report channel: every report goes to the
/// scheduler, whose decision is the answer.
struct TrialReports(Arc<Mutex<Shared>>);

impl ReportHandler for TrialReports {
    fn report(&self, peer: &Peer, report: Report) -> Result<RunDecision> {
        let go_on = self
            .0
            .lock()
            .expect("tuner lock")
            .on_report(peer.trial, peer.attempt, report);
        Ok(if go_on {
            RunDecision::Continue
        } else {
            RunDecision::Stop
        })
    }
}

/// The sweep's status: a table redrawn on a terminal, a line per event otherwise.
struct Status {
    on: bool,
    tty: bool,
    drawn: usize,
    last: Instant,
}

impl Status {
    fn new(on: bool) -> Self {
        Self {
            on,
            tty: std::io::stderr().is_terminal(),
            drawn: 0,
            last: Instant::now() - Duration::from_secs(10),
        }
    }

    fn event(&mut self, e: &str) {
        if self.on && !self.tty {
            eprintln!("tune: {e}");
        }
    }

    fn table(trials: &[TrialState], config: &TuneConfig) -> Vec<String> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for t in trials {
            *counts
                .entry(format!("{:?}", t.status).to_lowercase())
                .or_default() += 1;
        }
        let best = trials
            .iter()
            .filter_map(|t| {
                t.history
                    .last()
                    .and_then(|r| r.metrics.get(&config.metric))
                    .map(|v| (t, *v))
            })
            .reduce(|a, b| match config.mode {
                Mode::Min if b.1 < a.1 => b,
                Mode::Max if b.1 > a.1 => b,
                _ => a,
            });
        let mut lines = vec![format!(
            "trials: {}  best {}: {}",
            counts
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            config.metric,
            best.map_or("-".into(), |(t, v)| format!("{v:.6} ({})", t.id))
        )];
        for t in trials
            .iter()
            .filter(|t| t.status == TrialStatus::Running)
            .take(10)
        {
            let last = t.history.last();
            lines.push(format!(
                "  {} running  iter {:>4}  {} {}  {}",
                t.id,
                last.map_or(0, |r| r.iteration),
                config.metric,
                last.and_then(|r| r.metrics.get(&config.metric))
                    .map_or("-".into(), |v| format!("{v:.6}")),
                t.config
            ));
        }
        lines
    }

    fn draw(&mut self, trials: &[TrialState], config: &TuneConfig) {
        if !self.on || !self.tty || self.last.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last = Instant::now();
        let lines = Self::table(trials, config);
        let mut err = std::io::stderr().lock();
        if self.drawn > 0 {
            let _ = write!(err, "\x1b[{}A\x1b[J", self.drawn);
        }
        for l in &lines {
            let _ = writeln!(err, "{l}");
        }
        self.drawn = lines.len();
    }

    fn draw_final(&mut self, trials: &[TrialState], config: &TuneConfig) {
        if !self.on {
            return;
        }
        self.last = Instant::now() - Duration::from_secs(10);
        if self.tty {
            self.draw(trials, config);
        } else if let Some(l) = Self::table(trials, config).first() {
            eprintln!("tune: {l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_resumes_from_the_newest_checkpoint_its_store_holds() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_str().unwrap();
        let keep_one = CheckpointConfig {
            num_to_keep: Some(1),
            ..CheckpointConfig::default()
        };
        let store = CheckpointStore::open(root, "t0", keep_one).unwrap();
        let first = store.save(1, &BTreeMap::new(), &[("x", b"1")]).unwrap();
        store.save(2, &BTreeMap::new(), &[("x", b"2")]).unwrap();
        store.save(3, &BTreeMap::new(), &[("x", b"3")]).unwrap();
        assert_eq!(store.list().unwrap().len(), 1, "steps 1 and 2 pruned");
        // Step 1, the last the tuner recorded, is gone: step 3 is where to go on.
        let resume = resume_point(root, "t0", Some(first.clone())).unwrap();
        assert_eq!(resume.step, 3);
        // An incomplete save (files without a manifest) is neither used nor removed.
        std::fs::create_dir_all(dir.path().join("t0/checkpoint_0000000004")).unwrap();
        std::fs::write(dir.path().join("t0/checkpoint_0000000004/x"), b"4").unwrap();
        assert_eq!(resume_point(root, "t0", Some(first)).unwrap().step, 3);
        assert!(dir.path().join("t0/checkpoint_0000000004/x").exists());
        // A trial with nothing saved starts from the beginning.
        assert!(resume_point(root, "t1", None).is_none());
    }
}
