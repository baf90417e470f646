//! Where a run keeps its checkpoints and state, and how it survives failures.

use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};

use crate::checkpoint::CheckpointConfig;

/// How often a failed run (a training group, a sweep's trial) is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FailureConfig {
    /// Restarts allowed after a failure (`0`: the first failure ends the run).
    pub max_failures: u32,
}

/// Where and under what name a run keeps its checkpoints, and how it survives failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// A local folder or an object-store URL (`s3://bucket/prefix`, `gs://`, `az://`).
    pub storage_path: String,
    /// The run's folder under `storage_path`; running again with the same name resumes
    /// from its latest checkpoint.
    pub name: String,
    /// Which checkpoints are kept.
    pub checkpoint: CheckpointConfig,
    /// Restarts after failures.
    pub failure: FailureConfig,
}

impl RunConfig {
    /// The run `name` under `storage_path`, keeping every checkpoint, no restarts.
    pub fn new(storage_path: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            storage_path: storage_path.into(),
            name: name.into(),
            checkpoint: CheckpointConfig::default(),
            failure: FailureConfig::default(),
        }
    }

    /// The storage path as every process must see it: a local path made absolute (worker
    /// processes run in other folders), a URL as it is.
    pub fn resolved_storage_path(&self) -> Result<String> {
        let s = self.storage_path.trim();
        if s.is_empty() {
            return Err(VolleyError::Config(
                "RunConfig.storage_path is empty".into(),
            ));
        }
        if s.contains("://") {
            return Ok(s.to_string());
        }
        let p = std::path::Path::new(s);
        let abs = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        };
        Ok(abs.to_string_lossy().into_owned())
    }
}
