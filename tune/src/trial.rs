//! What runs in a trial's process: the trainable, its context, and the link to the
//! driver that decides after every report whether the trial goes on.
//!
//! A trial is a cluster task (on a pooled worker process) holding the trial's
//! resources. Its reports travel to the tuner over the run channel
//! ([`volley_run::ReportClient`]); each is answered with the scheduler's decision.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley_common::{Result, VolleyError};
use volley_run::{
    on_own_thread, Checkpoint, CheckpointConfig, CheckpointStore, Decision, Metrics, Peer, Report,
    ReportClient, SavedCheckpoint, TrainCheckpoint,
};
use volley_runtime::cluster::{value_object, RemoteTask, TaskContext};

/// A function of a config that reports metrics: what a sweep runs in each trial.
///
/// Trials are processes, so a trainable travels by name: it is a serializable value
/// of a type registered with `#[typetag::serde]`; its fields are settings shared by
/// every trial, `config` is the trial's own.
///
/// ```no_run
/// use volley_tune::{Trainable, TrialContext};
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// struct Quadratic;
///
/// #[typetag::serde]
/// impl Trainable for Quadratic {
///     fn run(&self, config: &serde_json::Value, ctx: &mut TrialContext) -> volley_common::Result<()> {
///         let x = config["x"].as_f64().unwrap_or(0.0);
///         for step in 0..10 {
///             // `?`: a trial the scheduler stops ends here.
///             ctx.report(volley_run::metrics([("loss", (x - 0.3).powi(2) / (step + 1) as f64)]), None)?;
///         }
///         Ok(())
///     }
/// }
/// ```
#[typetag::serde(tag = "trainable", content = "args")]
pub trait Trainable: Send + Sync + std::fmt::Debug {
    /// Runs one trial with `config`; returns when it is done. `ctx.report` returns an
    /// error (`VolleyError::Cancelled`) once the scheduler stops the trial: propagate it.
    fn run(&self, config: &Value, ctx: &mut TrialContext) -> Result<()>;
}

/// What a trial's code is given.
pub struct TrialContext {
    trial_id: String,
    config: Value,
    iteration: u64,
    store: Arc<CheckpointStore>,
    resume: Option<SavedCheckpoint>,
    link: ReportClient,
    stopped: bool,
}

impl std::fmt::Debug for TrialContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrialContext")
            .field("trial_id", &self.trial_id)
            .field("iteration", &self.iteration)
            .finish()
    }
}

impl TrialContext {
    /// The trial's id (`trial_00003`).
    pub fn trial_id(&self) -> &str {
        &self.trial_id
    }

    /// The trial's config.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// Reports made so far (continuing after a restart from a checkpoint).
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The checkpoint to resume from: the trial's latest after a failure, or the one a
    /// PBT exploit copied from a better trial.
    pub fn checkpoint(&self) -> Option<&SavedCheckpoint> {
        self.resume.as_ref()
    }

    /// Reports one iteration's metrics (and saves `checkpoint`, atomically). Returns
    /// `Err(VolleyError::Cancelled)` when the scheduler stops the trial.
    pub fn report(&mut self, metrics: Metrics, checkpoint: Option<TrainCheckpoint>) -> Result<()> {
        if self.stopped {
            return Err(VolleyError::Cancelled);
        }
        volley_run::check_metrics(&metrics)?;
        self.iteration += 1;
        let saved = match checkpoint {
            Some(c) => {
                let files: Vec<(&str, &[u8])> = c.files().collect();
                Some(self.store.save(self.iteration, &metrics, &files)?)
            }
            None => None,
        };
        let decision = self.link.report(&Report {
            iteration: self.iteration,
            metrics,
            checkpoint: saved,
        })?;
        if decision == Decision::Stop {
            self.stopped = true;
            return Err(VolleyError::Cancelled);
        }
        Ok(())
    }
}

/// A trial as a cluster task.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TrialTask {
    /// The serialized `Box<dyn Trainable>`.
    pub trainable: Value,
    pub config: Value,
    pub trial: usize,
    pub trial_id: String,
    pub attempt: u32,
    pub tuner: SocketAddr,
    pub token: String,
    /// `{storage}/{experiment}`: the trial's checkpoints are under `{trial_id}`.
    pub storage: String,
    pub checkpoint: CheckpointConfig,
    pub resume: Option<Checkpoint>,
    pub iteration: u64,
}

#[typetag::serde(name = "volley_tune::TrialTask")]
impl RemoteTask for TrialTask {
    fn run(&self, _: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let outcome = on_own_thread(&self.trial_id, || self.run_trial());
        match outcome {
            // Stopped by the scheduler: a normal end.
            Ok(()) | Err(VolleyError::Cancelled) => value_object(&self.trial),
            Err(e) => Err(e),
        }
    }
}

impl TrialTask {
    fn run_trial(&self) -> Result<()> {
        let trainable: Box<dyn Trainable> = serde_json::from_value(self.trainable.clone())
            .map_err(|e| {
                VolleyError::execution(format!(
                    "the trainable cannot be rebuilt in the trial's process: {e} (trials run \
                     the tuner's binary; is the type registered with #[typetag::serde]?)"
                ))
            })?;
        let store = Arc::new(CheckpointStore::open(
            &self.storage,
            &self.trial_id,
            self.checkpoint.clone(),
        )?);
        let resume = self
            .resume
            .clone()
            .map(|c| SavedCheckpoint::new(c, Arc::clone(&store)));
        let link = ReportClient::new(
            self.tuner,
            self.token.clone(),
            Peer {
                trial: self.trial,
                attempt: self.attempt,
                rank: 0,
            },
        );
        let mut ctx = TrialContext {
            trial_id: self.trial_id.clone(),
            config: self.config.clone(),
            iteration: self.iteration,
            store,
            resume,
            link,
            stopped: false,
        };
        trainable.run(&self.config, &mut ctx)
    }
}
