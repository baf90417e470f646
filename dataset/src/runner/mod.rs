//! Where a dataset's plan runs: the [`Runner`] turns an optimized logical plan into the
//! operators of one execution, which the executor's one driver runs.
//!
//! ```text
//!   optimized LogicalOp ── Runner::plan ──▶ PhysicalPlan ── volley_exec::execute ──▶ stream
//!     LocalRunner:   every operator in this process (tasks on threads)
//!     ClusterRunner: stages that can travel run on the cluster's nodes (their blocks
//!                    stay there); closures, limits, unions and all-to-all operators
//!                    run in this process over references to those blocks
//! ```
//!
//! Nothing else asks where a plan runs: the [`Context`](crate::Context) holds its
//! runner, and `explain` and `stats` read the same plan and the same driver either way.

mod cluster;
mod scan;
mod stage;

use std::sync::Arc;

use volley_common::Result;
use volley_connectors::RemotePart;
use volley_exec::{ExecContext, PhysicalPlan, WriteTarget};

pub use cluster::ClusterRunner;
pub(crate) use scan::scans_on_cluster;
pub use stage::StageTask;

use crate::logical::LogicalOp;

/// A write the plan's output goes to: the driver's target (which commits), and the
/// part template tasks on other processes write with.
#[derive(Debug, Clone)]
pub struct WriteSpec {
    /// Where the staged parts are gathered and committed.
    pub target: Arc<WriteTarget>,
    /// What a task on a cluster node writes its part with.
    pub part: RemotePart,
}

/// Where and how the plans of a context run.
pub trait Runner: Send + Sync + std::fmt::Debug {
    /// The operators of `plan` (optimized), writing into `write` when given; `exec`
    /// is the context's (its session plans the reads).
    fn plan(
        &self,
        plan: &LogicalOp,
        exec: &ExecContext,
        write: Option<&WriteSpec>,
    ) -> Result<PhysicalPlan>;

    /// The execution context its operators run with (on a cluster: with the cluster).
    fn exec_context(&self, base: ExecContext) -> ExecContext;
}

/// Runs every operator in this process, its tasks on the context's threads.
#[derive(Debug, Default)]
pub struct LocalRunner;

impl Runner for LocalRunner {
    fn plan(
        &self,
        plan: &LogicalOp,
        exec: &ExecContext,
        write: Option<&WriteSpec>,
    ) -> Result<PhysicalPlan> {
        let (physical, _) = crate::planner::plan(plan, &exec.session)?;
        Ok(match write {
            Some(w) => crate::planner::with_write(physical, Arc::clone(&w.target)),
            None => physical,
        })
    }

    fn exec_context(&self, base: ExecContext) -> ExecContext {
        base
    }
}
