//! Data-parallel training for volley, on Burn.
//!
//! A [`DataParallelTrainer`] runs a [`TrainLoop`] on a group of ranks. Ranks are
//! runtime actors gang-scheduled in a placement group, one worker process each (on this
//! machine through a private one-node cluster, or spread over a cluster's nodes). The
//! driver runs the dataset pipelines and streams each rank its share of every pass
//! (`streaming_split`); ranks keep their gradients in step with a bucketed ring
//! all-reduce over TCP ([`TcpRing`], behind the [`Collective`] trait); rank 0 saves
//! checkpoints into a [`CheckpointStore`] (complete or absent; Burn records through
//! [`WithRecord`] and [`LoadRecord`]); when a rank dies the
//! group is restarted from the latest checkpoint, up to `max_failures` times.
//!
//! Programs that train call `volley::init()` first in `main` (ranks are processes of the
//! same program and enter their worker loop there).

mod collective;
mod config;
mod context;
mod grads;
mod session;
pub mod tensor;
mod trainer;

/// Burn, as volley's trainer uses it (modules, optimizers, the `ndarray` CPU backend).
pub use burn;

pub use collective::{Collective, RingConfig, TcpRing};
pub use config::{Placement, ScalingConfig};
pub use context::{DataShard, LoadRecord, ShardBatches, TrainContext, WithRecord};
pub use grads::all_reduce_gradients;
pub use session::{DataTransfer, ReportHook};
pub use trainer::{DataConfig, DataParallelTrainer, TrainLoop, TrainResult};
/// What every run shares (configuration, checkpoints, metrics, reports), from
/// `volley-run`.
pub use volley_run::{
    metrics, Checkpoint, CheckpointConfig, CheckpointStore, FailureConfig, Metrics, Order, Report,
    RunConfig, SavedCheckpoint, TrainCheckpoint,
};
