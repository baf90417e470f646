//! Errors and configuration shared by every volley crate.
//!
//! This crate sits beneath all others (as `datafusion-common` does for DataFusion):
//! [`VolleyError`] is the one error type that crosses crate edges, and
//! [`VolleyConfig`] is the typed, documented set of options that travels in an
//! execution context to every operator. Nothing here reads the environment except
//! [`VolleyConfig::from_env`], the one place where `VOLLEY_*` variables are looked at.

mod config;
mod error;
mod size;

pub use config::{ExecOptions, ProgressMode, ReadOptions, RuntimeOptions, VolleyConfig};
pub use error::{Result, ResultExt, VolleyError};
pub use size::{format_bytes, parse_bytes};
