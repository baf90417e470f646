//! What volley's training runs and sweep trials share, without Burn: a run's
//! configuration ([`RunConfig`]), its checkpoints in a local folder or an object store
//! ([`CheckpointStore`], [`TrainCheckpoint`], [`SavedCheckpoint`]), its metrics and the
//! report channel to its driver ([`ReportServer`], [`ReportClient`]), and the cluster it
//! runs on ([`ClusterLease`]).
//!
//! `volley-train` (data-parallel training on Burn) and `volley-tune` (sweeps) are built
//! on it, so a sweep of trainables that do not use Burn builds without Burn.

mod checkpoint;
mod config;
mod lease;
mod report;

pub use checkpoint::{
    Checkpoint, CheckpointConfig, CheckpointStore, Order, SavedCheckpoint, TrainCheckpoint,
};
pub use config::{FailureConfig, RunConfig};
pub use lease::ClusterLease;
pub use report::{
    check_metrics, metrics, BatchStream, Decision, Metrics, PartIter, Peer, Report, ReportClient,
    ReportHandler, ReportServer,
};
/// Runs worker-side code on a thread of its own (from `volley-runtime`).
pub use volley_runtime::cluster::on_own_thread;
