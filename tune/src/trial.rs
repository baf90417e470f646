//! What runs in a trial's process: the trainable, its context, and the link to the
//! driver that decides after every report whether the trial goes on.
//!
//! A trial is a cluster task (on a pooled worker process) holding the trial's
//! resources. Its reports travel to the tuner over TCP as JSON lines; each is answered
//! with the scheduler's decision.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{value_object, RemoteTask, TaskContext};
use volley_train::{
    on_own_thread, Checkpoint, CheckpointConfig, CheckpointStore, Metrics, SavedCheckpoint,
    TrainCheckpoint,
};

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
///             ctx.report(volley_train::metrics([("loss", (x - 0.3).powi(2) / (step + 1) as f64)]), None)?;
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

/// One report on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireReport {
    pub iteration: u64,
    pub metrics: Metrics,
    pub checkpoint: Option<Checkpoint>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub token: String,
    pub trial: usize,
    pub attempt: u32,
}

/// The scheduler's answer, on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub go_on: bool,
}

/// What a trial's code is given.
pub struct TrialContext {
    trial_id: String,
    config: Value,
    iteration: u64,
    store: Arc<CheckpointStore>,
    resume: Option<SavedCheckpoint>,
    link: Link,
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
        self.iteration += 1;
        let saved = match checkpoint {
            Some(c) => {
                let files: Vec<(&str, &[u8])> = c.files().collect();
                Some(self.store.save(self.iteration, &metrics, &files)?)
            }
            None => None,
        };
        let go_on = self.link.report(&WireReport {
            iteration: self.iteration,
            metrics,
            checkpoint: saved,
        })?;
        if !go_on {
            self.stopped = true;
            return Err(VolleyError::Cancelled);
        }
        Ok(())
    }
}

struct Link {
    address: SocketAddr,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

fn link_err(address: SocketAddr, e: impl std::fmt::Display) -> VolleyError {
    VolleyError::execution(format!("the tuner at {address}: {e}"))
}

impl Link {
    fn connect(address: SocketAddr, hello: &Hello) -> Result<Link> {
        let conn = TcpStream::connect_timeout(&address, Duration::from_secs(30))
            .map_err(|e| link_err(address, e))?;
        let _ = conn.set_nodelay(true);
        let read = conn.try_clone().map_err(|e| link_err(address, e))?;
        let mut link = Link {
            address,
            reader: BufReader::new(read),
            writer: BufWriter::new(conn),
        };
        link.send(hello)?;
        Ok(link)
    }

    fn send(&mut self, value: &impl Serialize) -> Result<()> {
        let mut line =
            serde_json::to_vec(value).map_err(|e| VolleyError::internal(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .and_then(|_| self.writer.flush())
            .map_err(|e| link_err(self.address, e))
    }

    fn report(&mut self, report: &WireReport) -> Result<bool> {
        self.send(report)?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| link_err(self.address, e))?;
        if n == 0 {
            return Err(link_err(self.address, "closed the connection"));
        }
        let reply: Reply = serde_json::from_str(&line).map_err(|e| link_err(self.address, e))?;
        Ok(reply.go_on)
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
        let link = Link::connect(
            self.tuner,
            &Hello {
                token: self.token.clone(),
                trial: self.trial,
                attempt: self.attempt,
            },
        )?;
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
