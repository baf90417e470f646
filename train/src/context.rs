//! What a rank's training loop sees: its place in the group, its dataset shards, the
//! gradient all-reduce, reports and checkpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Record, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor};
use volley_common::{Result, VolleyError};

use crate::collective::{Collective, TcpRing};
use crate::grads::all_reduce_gradients;
use volley_run::{BatchStream, Decision, Report, ReportClient};
use volley_run::{CheckpointStore, Metrics, SavedCheckpoint, TrainCheckpoint};

type Recorder_ = NamedMpkBytesRecorder<FullPrecisionSettings>;

/// Burn records in a [`TrainCheckpoint`]: `ckpt.with_record::<B, _>("model",
/// model.clone().into_record())?`, stored in full precision as named MessagePack.
///
/// ```no_run
/// # use volley_train::{TrainCheckpoint, WithRecord};
/// # fn f<B: burn::tensor::backend::Backend, M: burn::module::Module<B>>(model: &M, step: u64) -> volley_common::Result<()> {
/// let ckpt = TrainCheckpoint::new()
///     .with_record::<B, _>("model", model.clone().into_record())?
///     .with_value("step", &step)?;
/// # Ok(()) }
/// ```
pub trait WithRecord: Sized {
    /// Adds a Burn record (`model.into_record()`, `optimizer.to_record()`).
    fn with_record<B: Backend, R: Record<B>>(self, name: &str, record: R) -> Result<Self>;
}

impl WithRecord for TrainCheckpoint {
    fn with_record<B: Backend, R: Record<B>>(self, name: &str, record: R) -> Result<Self> {
        let bytes = Recorder::<B>::record(&Recorder_::default(), record, ()).map_err(|e| {
            VolleyError::execution(format!("checkpoint: cannot record `{name}`: {e}"))
        })?;
        Ok(self.with_bytes(name, bytes))
    }
}

/// Burn records read back from a [`SavedCheckpoint`]: a model with
/// `ckpt.load_module("model", model, &device)?`, other records (an optimizer's) with
/// `optim.load_record(ckpt.record("optimizer", &device)?)`.
pub trait LoadRecord {
    /// A record saved with [`WithRecord::with_record`], on `device`; bytes that are not
    /// such a record are an error, not a panic.
    fn record<B: Backend, R: Record<B>>(&self, file: &str, device: &B::Device) -> Result<R>;

    /// `model` with the parameters of its record saved as `file`, checked against the
    /// model: a parameter whose shape differs (a checkpoint of another model size)
    /// or that the checkpoint lacks is an error naming it. Burn's `load_record` alone
    /// takes any shape, and the model fails later in its forward pass, or trains with
    /// the wrong sizes. A parameter only the checkpoint holds (an optional bias the
    /// model does without) is passed over, as Burn does.
    fn load_module<B: Backend, M: Module<B>>(
        &self,
        file: &str,
        model: M,
        device: &B::Device,
    ) -> Result<M>;
}

/// The shape of every parameter of a module by its path (`l1.weight`), read without
/// initializing a lazy one.
#[derive(Default)]
struct Shapes {
    path: Vec<String>,
    found: Vec<(String, Vec<usize>)>,
}

impl Shapes {
    fn of<B: Backend, M: Module<B>>(model: &M) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Shapes::default();
        model.visit(&mut shapes);
        shapes.found
    }

    fn add(&mut self, shape: burn::tensor::Shape) {
        self.found.push((self.path.join("."), shape.to_vec()));
    }
}

impl<B: Backend> ModuleVisitor<B> for Shapes {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        self.add(p.lazy_shape());
    }
    fn visit_int<const D: usize>(&mut self, p: &Param<Tensor<B, D, Int>>) {
        self.add(p.lazy_shape());
    }
    fn visit_bool<const D: usize>(&mut self, p: &Param<Tensor<B, D, Bool>>) {
        self.add(p.lazy_shape());
    }
}

impl LoadRecord for SavedCheckpoint {
    fn record<B: Backend, R: Record<B>>(&self, file: &str, device: &B::Device) -> Result<R> {
        let bytes = self.read(file)?;
        Recorder::<B>::load(&Recorder_::default(), bytes, device).map_err(|e| {
            VolleyError::execution(format!(
                "checkpoint {}: `{file}` does not hold the record expected: {e}",
                self.info.step
            ))
        })
    }

    fn load_module<B: Backend, M: Module<B>>(
        &self,
        file: &str,
        model: M,
        device: &B::Device,
    ) -> Result<M> {
        let step = self.info.step;
        let wanted = Shapes::of::<B, M>(&model);
        let record = self.record::<B, M::Record>(file, device)?;
        // Burn panics where a list of modules has another length.
        let loaded =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.load_record(record)))
                .map_err(|_| {
                    VolleyError::execution(format!(
                        "checkpoint {step}: `{file}` does not fit the model (a list of modules of \
                 another length)"
                    ))
                })?;
        let got = Shapes::of::<B, M>(&loaded);
        for (path, shape) in &wanted {
            match got.iter().find(|(p, _)| p == path) {
                None => {
                    return Err(VolleyError::execution(format!(
                        "checkpoint {step}: `{file}` has no parameter `{path}` (shape \
                         {shape:?} in the model)"
                    )))
                }
                Some((_, saved)) if saved != shape => {
                    return Err(VolleyError::execution(format!(
                        "checkpoint {step}: `{file}`: parameter `{path}` has shape {saved:?} \
                         in the checkpoint and {shape:?} in the model"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(loaded)
    }
}

/// A rank's view of its share of one dataset. Each [`DataShard::iter_batches`] call is
/// one pass (epoch): every rank's k-th pass reads its share of the same execution of
/// the dataset's pipeline, so that together the ranks see every row once per pass.
#[derive(Debug, Clone)]
pub struct DataShard {
    name: String,
    session: Arc<std::sync::Mutex<ReportClient>>,
    passes: Arc<AtomicU64>,
}

impl DataShard {
    /// Starts the next pass; batches of exactly `batch_size` rows, the pass's last one
    /// shorter unless `drop_last`. The rows arrive as the pipeline produces them.
    pub fn iter_batches(&self, batch_size: usize, drop_last: bool) -> Result<ShardBatches> {
        if batch_size == 0 {
            return Err(VolleyError::plan(
                "iter_batches: batch_size must be at least 1",
            ));
        }
        // The pass is used up once its stream opens: a rank that tries again after an
        // open failed asks for the pass the other ranks read (under the session's
        // lock, passes are opened one at a time).
        let session = self.session.lock().expect("session lock");
        let pass = self.passes.load(Ordering::SeqCst);
        let stream = session.open_stream(&self.name, pass)?;
        self.passes.store(pass + 1, Ordering::SeqCst);
        drop(session);
        Ok(ShardBatches {
            stream,
            batch_size,
            drop_last,
            pending: Vec::new(),
            pending_rows: 0,
            done: false,
        })
    }

    /// The dataset's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The batches of one pass over a [`DataShard`].
pub struct ShardBatches {
    stream: BatchStream,
    batch_size: usize,
    drop_last: bool,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    done: bool,
}

impl std::fmt::Debug for ShardBatches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardBatches")
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl ShardBatches {
    /// Cuts the first `n` pending rows off as one batch.
    fn cut(&mut self, n: usize) -> Result<RecordBatch> {
        let schema = self.pending[0].schema();
        let all = arrow::compute::concat_batches(&schema, &self.pending)?;
        let out = all.slice(0, n);
        self.pending.clear();
        self.pending_rows = all.num_rows() - n;
        if self.pending_rows > 0 {
            self.pending.push(all.slice(n, self.pending_rows));
        }
        Ok(out)
    }
}

impl Iterator for ShardBatches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.pending_rows >= self.batch_size {
                // One batch that is exactly the size needs no copy.
                if self.pending.len() == 1 && self.pending_rows == self.batch_size {
                    self.pending_rows = 0;
                    return self.pending.pop().map(Ok);
                }
                return Some(self.cut(self.batch_size));
            }
            if self.done {
                if self.pending_rows == 0 || self.drop_last {
                    return None;
                }
                let n = self.pending_rows;
                return Some(self.cut(n));
            }
            match self.stream.next() {
                Some(Ok(b)) => {
                    self.pending_rows += b.num_rows();
                    self.pending.push(b);
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.pending.clear();
                    self.pending_rows = 0;
                    return Some(Err(e));
                }
                None => self.done = true,
            }
        }
    }
}

/// What a rank's training loop is given.
pub struct TrainContext {
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) attempt: u32,
    pub(crate) config: serde_json::Value,
    pub(crate) ring: TcpRing,
    pub(crate) session: Arc<std::sync::Mutex<ReportClient>>,
    pub(crate) store: Arc<CheckpointStore>,
    pub(crate) resume: Option<SavedCheckpoint>,
    pub(crate) iteration: u64,
    pub(crate) passes: HashMap<String, Arc<AtomicU64>>,
    pub(crate) gpu_ids: Vec<u32>,
}

impl std::fmt::Debug for TrainContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainContext")
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .field("attempt", &self.attempt)
            .field("iteration", &self.iteration)
            .finish()
    }
}

impl TrainContext {
    /// This rank, `0..world_size()`. Rank 0 saves checkpoints and its metrics are the
    /// run's.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// How many times the group was restarted after a failure before this attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The trainer's `train_loop_config` (`DataParallelTrainer::with_config`); `null`
    /// when none was given.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// The GPUs this rank holds (as the cluster numbers them; inside the process they
    /// are devices `0..n`, through `CUDA_VISIBLE_DEVICES`).
    pub fn gpu_ids(&self) -> &[u32] {
        &self.gpu_ids
    }

    /// The device to train on: the backend's default device, which on a GPU backend is
    /// this rank's GPU (the only one it sees).
    pub fn device<B: Backend>(&self) -> B::Device {
        B::Device::default()
    }

    /// This rank's share of the dataset given to the trainer as `name`.
    pub fn dataset_shard(&mut self, name: &str) -> Result<DataShard> {
        let passes = Arc::clone(self.passes.entry(name.to_string()).or_default());
        Ok(DataShard {
            name: name.to_string(),
            session: Arc::clone(&self.session),
            passes,
        })
    }

    /// Replaces `grads` by their average over the group (every rank calls it with the
    /// gradients of the same model, once per step).
    pub fn all_reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        grads: GradientsParams,
    ) -> Result<GradientsParams> {
        all_reduce_gradients(model, grads, &mut self.ring)
    }

    /// The group's collective, for other sums (metrics, a barrier).
    pub fn collective(&mut self) -> &mut dyn Collective {
        &mut self.ring
    }

    /// Reports this iteration's metrics, and on rank 0 saves `checkpoint` (atomically:
    /// complete or absent). Every rank calls it at the same points; other ranks'
    /// checkpoints are not written (the model is the same on all of them). On rank 0 it
    /// returns `VolleyError::Cancelled` when the driver stops the run (a sweep's
    /// scheduler): propagate it.
    pub fn report(&mut self, metrics: Metrics, checkpoint: Option<TrainCheckpoint>) -> Result<()> {
        volley_run::check_metrics(&metrics)?;
        self.iteration += 1;
        if self.rank != 0 {
            return Ok(());
        }
        let saved = match checkpoint {
            Some(c) => {
                let files: Vec<(&str, &[u8])> = c.files().collect();
                Some(self.store.save(self.iteration, &metrics, &files)?)
            }
            None => None,
        };
        let report = Report {
            iteration: self.iteration,
            metrics,
            checkpoint: saved,
        };
        match self.session.lock().expect("session lock").report(&report)? {
            Decision::Continue => Ok(()),
            Decision::Stop => Err(VolleyError::Cancelled),
        }
    }

    /// The checkpoint this attempt resumes from: the run's latest, when the run was
    /// restarted after a failure or started again under a name that has checkpoints.
    pub fn checkpoint(&self) -> Option<&SavedCheckpoint> {
        self.resume.as_ref()
    }

    /// Reports made so far in the run (including those before a resume).
    pub fn iteration(&self) -> u64 {
        self.iteration
    }
}
