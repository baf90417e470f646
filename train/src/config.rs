//! How a training run is laid out: ranks and their resources. (Where it is kept and
//! how it survives failures is the [`RunConfig`](volley_run::RunConfig) every run shares.)

use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::Resources;

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
            .map_err(|e| e.context("ScalingConfig.resources_per_worker"))
    }
}
