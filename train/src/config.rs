//! How a training run is laid out (ranks and their resources) and kept (storage,
//! checkpoints, failures).

use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::Resources;

use crate::checkpoint::CheckpointConfig;

/// How the ranks' bundles spread over nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Placement {
    /// As few nodes as possible (ranks that share a machine talk over loopback).
    #[default]
    Pack,
    /// As many nodes as possible.
    Spread,
}

/// How many ranks, and what each holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScalingConfig {
    /// Ranks in the group (at least 1).
    pub num_workers: usize,
    /// Whether each rank gets a GPU (`resources_per_worker.num_gpus`, or 1 if that is 0).
    pub use_gpu: bool,
    /// What each rank holds (default: 1 CPU).
    pub resources_per_worker: Resources,
    /// How the ranks spread over nodes.
    pub placement: Placement,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        Self {
            num_workers: 1,
            use_gpu: false,
            resources_per_worker: Resources::cpus(1.0),
            placement: Placement::Pack,
        }
    }
}

impl ScalingConfig {
    /// `n` ranks of 1 CPU each.
    pub fn workers(n: usize) -> Self {
        Self {
            num_workers: n,
            ..Self::default()
        }
    }

    /// The bundle one rank holds.
    pub fn bundle(&self) -> Resources {
        let mut r = self.resources_per_worker.clone();
        if self.use_gpu && r.num_gpus == 0.0 {
            r.num_gpus = 1.0;
        }
        if !self.use_gpu {
            r.num_gpus = 0.0;
        }
        r
    }

    /// Checks what can be checked without a cluster.
    pub fn validate(&self) -> Result<()> {
        if self.num_workers == 0 {
            return Err(VolleyError::Config(
                "ScalingConfig.num_workers must be at least 1".into(),
            ));
        }
        self.bundle()
            .validate()
            .map_err(|e| VolleyError::Config(format!("ScalingConfig.resources_per_worker: {e}")))
    }
}

/// How often a failed group is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FailureConfig {
    /// Restarts allowed after a rank fails (`0`: the first failure ends the run).
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
