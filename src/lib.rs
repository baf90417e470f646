//! volley: a dataflow and batch-processing engine for AI workloads, on Apache Arrow.
//!
//! ```no_run
//! use volley::prelude::*;
//!
//! # fn main() -> volley::Result<()> {
//! let ds = volley::read_parquet("data/events/")?
//!     .filter(col("score").gt(lit(0.5)))?
//!     .with_column("double", col("score") * lit(2.0))?;
//! ds.write_parquet("out/")?;
//! # Ok(())
//! # }
//! ```
//!
//! Everything is lazy until consumed; see [`Dataset`]. The free functions use the
//! process-wide [`Context`] (configured from `VOLLEY_*` environment variables); make
//! your own with [`Context::try_new`] for other settings.

pub use volley_common::{Result, VolleyConfig, VolleyError};
pub use volley_dataset::{
    agg, col, lit, Compression, Context, CsvReadOptions, Dataset, ExecutionStats, Expr,
    GroupedDataset, IterOptions, JoinHow, MapOptions, NamedTransform, NamedTransformFactory,
    OperatorStats, Paths, SortKey, SplitIterator, StatefulTransform, TransformFactory, TransformFn,
    WriteBuilder, WriteFormat, WriteMode, WriteSummary,
};

/// Arrow, as volley uses it.
pub use arrow;
/// DataFusion, as volley uses it (expressions, SQL functions).
pub use datafusion;
/// For `#[typetag::serde]` on named transforms.
pub use typetag;

/// Batch LLM inference: models, the engine, the Dataset stage (feature `llm`).
#[cfg(feature = "llm")]
pub use volley_llm as llm;

/// Data-parallel training on Burn: the trainer, dataset shards, checkpoints (feature
/// `train`).
#[cfg(feature = "train")]
pub use volley_train as train;

/// Hyperparameter sweeps: search spaces, searchers, schedulers, resumable experiments
/// (feature `tune`).
#[cfg(feature = "tune")]
pub use volley_tune as tune;

/// The crates volley is made of.
pub mod crates {
    pub use volley_common as common;
    pub use volley_connectors as connectors;
    pub use volley_dataset as dataset;
    pub use volley_exec as exec;
    pub use volley_runtime as runtime;
}

/// What most programs need: `use volley::prelude::*;`.
pub mod prelude {
    pub use crate::{
        agg, col, from_batches, lit, range, read_binary_files, read_csv, read_ipc, read_json,
        read_parquet, read_text, Context, Dataset, Expr, IterOptions, JoinHow, MapOptions,
        NamedTransform, Result, SortKey, StatefulTransform, TransformFn, VolleyError, WriteMode,
    };
    pub use arrow::array::RecordBatch;
}

/// Starts volley in this process and returns the process-wide context.
///
/// Call it first in `main`: in a process that a cluster's node agent started as a worker
/// (`VOLLEY_WORKER_ID` is set) it does not return, but runs the tasks the agent hands it
/// and exits. Everywhere else it returns the process-wide context, joined to the cluster
/// `VOLLEY_ADDRESS` names (if set and not empty), or why that context cannot be made (an
/// invalid `VOLLEY_*` value, a cluster that cannot be joined): one line to print.
pub fn init() -> Result<Context> {
    if volley_runtime::cluster::is_worker() {
        volley_runtime::cluster::run_worker();
    }
    log_warnings();
    Context::global()
}

/// Sends volley's warnings (a closure that stays in the driver, an actor that died and
/// was replaced) to stderr, unless the program set up its own `tracing` subscriber.
pub fn log_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// A context whose datasets run on the cluster whose head is at `address` (`host:port`),
/// with the cluster `token` (TLS when `VOLLEY_TLS_CA` names a CA certificate). The
/// argument form of setting `VOLLEY_ADDRESS`.
pub fn connect(address: &str, token: &str) -> Result<Context> {
    let cluster = volley_runtime::cluster::Cluster::connect(address, token)?;
    Ok(Context::try_default()?.with_cluster(cluster))
}

/// The cluster this program runs on: the one named by `VOLLEY_ADDRESS` (with the token
/// from `VOLLEY_TOKEN` or the file `VOLLEY_TOKEN_FILE`), joined once per process by the
/// process-wide [`Context`]. `None` when no address is set.
pub fn cluster() -> Result<Option<volley_runtime::cluster::Cluster>> {
    Ok(Context::global()?.cluster().cloned())
}

/// Parquet files: a file, folder, glob or list; local or object-store URLs.
pub fn read_parquet(paths: impl Into<Paths>) -> Result<Dataset> {
    Context::global()?.read_parquet(paths)
}

/// CSV files with a header line.
pub fn read_csv(paths: impl Into<Paths>) -> Result<Dataset> {
    Context::global()?.read_csv(paths)
}

/// Newline-delimited JSON files.
pub fn read_json(paths: impl Into<Paths>) -> Result<Dataset> {
    Context::global()?.read_json(paths)
}

/// Arrow IPC files.
pub fn read_ipc(paths: impl Into<Paths>) -> Result<Dataset> {
    Context::global()?.read_ipc(paths)
}

/// Text files, one row per line (column `text`).
pub fn read_text(paths: impl Into<Paths>) -> Result<Dataset> {
    Context::global()?.read_text(paths)
}

/// Whole files as rows (`path`, `bytes`).
pub fn read_binary_files(paths: impl Into<Paths>) -> Result<Dataset> {
    Context::global()?.read_binary_files(paths)
}

/// Batches in memory.
pub fn from_batches(batches: Vec<arrow::array::RecordBatch>) -> Result<Dataset> {
    Context::global()?.from_batches(batches)
}

/// The integers `0..n` in a column `id`.
pub fn range(n: u64) -> Result<Dataset> {
    Ok(Context::global()?.range(n))
}
