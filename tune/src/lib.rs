//! Hyperparameter sweeps for volley.
//!
//! A [`Tuner`] runs a [`Trainable`] once per trial, each trial with a config drawn from
//! a [`SearchSpace`] by a searcher (grid/random or TPE), as many trials at once as the
//! cluster's resources allow (trials are cluster tasks holding their resources; on one
//! machine a private one-node cluster runs them as worker processes). Every report
//! goes to a scheduler (FIFO, ASHA, median stopping, PBT) that may stop the trial or, for
//! PBT, restart it from a better trial's checkpoint with a perturbed config. The
//! experiment's state is written to `storage_path/name` as it changes; running the same
//! sweep again (or [`Tuner::restore`]) resumes it: finished trials are not run again.
//!
//! Programs that tune call `volley::init()` first in `main` (trials run in processes of
//! the same program).
//!
//! Burn is not needed: trainables are any code. With the `train` feature,
//! [`Tuner::for_trainer`] sweeps `volley-train`'s data-parallel training runs.

mod schedulers;
mod search;
pub mod space;
mod trial;
mod tuner;

pub use schedulers::{
    Asha, AshaConfig, Decision, Fifo, MedianStopping, MedianStoppingConfig, Pbt, PbtConfig,
    Scheduler, TrialInfo,
};
pub use search::{BasicVariant, Searcher, Tpe, TpeConfig};
pub use space::{
    choice, constant, grid_search, lograndint, loguniform, quniform, randint, randn, sample_from,
    uniform, Domain, Param, SearchSpace,
};
pub use trial::{Trainable, TrialContext};
pub use tuner::{
    ResultGrid, SchedulerConfig, SearchAlgorithm, TrialReport, TrialResult, TrialStatus,
    TuneConfig, Tuner,
};
/// What every run shares (configuration, checkpoints, metrics), from `volley-run`.
pub use volley_run::{
    metrics, CheckpointConfig, FailureConfig, Metrics, Order, RunConfig, SavedCheckpoint,
    TrainCheckpoint,
};

/// Whether the metric is minimized or maximized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// Smaller is better (a loss).
    Min,
    /// Larger is better (an accuracy).
    Max,
}
