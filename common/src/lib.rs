//! Errors and configuration shared by every volley crate.
//!
//! This crate sits beneath all others (as `datafusion-common` does for DataFusion):
//! [`VolleyError`] is the one error type that crosses crate edges, and
//! [`VolleyConfig`] is the typed, documented set of options that travels in an
//! execution context to every operator. [`env_var`] is how volley reads its `VOLLEY_*`
//! environment variables (an empty one is unset); [`VolleyConfig::from_env`] is the one
//! place where the option variables are looked at.

mod config;
mod error;
mod size;
mod views;

pub use config::{
    env_var, ExecOptions, ProgressMode, ReadOptions, RuntimeOptions, VolleyConfig, MAX_BATCH_SIZE,
    MAX_EXCHANGE_PARTITIONS, MAX_TARGET_PARTITIONS,
};
pub use error::{ErrorKind, ErrorReport, Result, ResultExt, VolleyError};
pub use size::{batch_memory, batches_memory, format_bytes, parse_bytes};
pub use views::{compact_bloated_views, compact_views, has_view_columns};
