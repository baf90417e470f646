//! Integration tests: one binary, a module per area.

mod common;
mod dataset_api;
mod errors;
mod exchange;
mod hostile;
mod io;
#[cfg(feature = "llm")]
mod llm;
mod memory;
mod oracle;
mod relational;
