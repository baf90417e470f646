//! Where a dataset's plan runs: the [`Runner`] turns an optimized logical plan into the
//! operators of one execution, which the executor's one driver runs.
//!
//! ```text
//!   optimized LogicalOp ── Runner::plan ──▶ PhysicalPlan ── volley_exec::execute ──▶ stream
//!     LocalRunner:   every operator in this process (tasks on threads)
//!     ClusterRunner: stages that can travel run on the cluster's nodes (their blocks
//!                    stay there), and so do sorts, aggregations, joins and shuffles
//!                    (exchanges: map and reduce tasks); closures, limits, unions
//!                    run in this process over references to those blocks
//! ```
//!
//! Nothing else asks where a plan runs: the [`Context`](crate::Context) holds its
//! runner, and `explain` and `stats` read the same plan and the same driver either way.

mod cluster;
mod exchange;
mod query_stages;
mod scan;
mod settings;
mod stage;

use std::sync::Arc;

use volley_common::Result;
use volley_exec::{ExecContext, PhysicalPlan};

pub use cluster::ClusterRunner;
pub(crate) use cluster::{query_partitions, SMALL_QUERY_BYTES_PER_CPU};
pub(crate) use query_stages::{
    finishes_collected_side, partition_collected_joins, scanned_bytes, scans_files,
    stages_on_cluster, ClusterStageExec,
};
pub(crate) use scan::scans_on_cluster;
pub(crate) use settings::SessionSettings;
pub use stage::StageTask;

use crate::logical::LogicalOp;

/// Where and how the plans of a context run.
pub trait Runner: Send + Sync + std::fmt::Debug {
    /// The operators of `plan` (optimized; a [`LogicalOp::Write`] may be its root);
    /// `exec` is the context's (its session plans the reads).
    fn plan(&self, plan: &LogicalOp, exec: &ExecContext) -> Result<PhysicalPlan>;

    /// The execution context its operators run with (on a cluster: with the cluster).
    fn exec_context(&self, base: ExecContext) -> ExecContext;

    /// Whether it plans the stage boundary `op` (a sort, an aggregation, a join, an
    /// exchange) itself; otherwise `op` becomes a source of this process before
    /// planning (see `lower`).
    fn plans_boundary(&self, _op: &LogicalOp, _exec: &ExecContext) -> bool {
        false
    }
}

/// Runs every operator in this process, its tasks on the context's threads.
#[derive(Debug, Default)]
pub struct LocalRunner;

impl Runner for LocalRunner {
    fn plan(&self, plan: &LogicalOp, exec: &ExecContext) -> Result<PhysicalPlan> {
        let (plan, write) = plan.split_write();
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
