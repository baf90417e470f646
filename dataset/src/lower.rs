//! The last rewrite before planning: stage boundaries become sources.
//!
//! The optimizer sees exchanges, splits, sorts, aggregations, distincts and joins as nodes of
//! the logical plan (and pushes projections and filters through them where that is
//! sound). This process then runs each as a source over its optimized input: the
//! exchange's store, or a DataFusion plan over the input datasets. A runner may plan a
//! boundary itself instead: the cluster runner makes sorts, aggregations, distincts,
//! joins and hash or random exchanges exchanges on the nodes.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use volley_common::{Result, VolleyError};
use volley_connectors::ScanRequest;

use crate::context::Context;
use crate::dataset::Dataset;
use crate::exchange::exchange_source;
use crate::logical::LogicalOp;
use crate::relational::relational_source;

/// Whether `op` is a stage boundary that [`lower`] turns into a source.
fn is_boundary(op: &LogicalOp) -> bool {
    matches!(
        op,
        LogicalOp::Exchange { .. }
            | LogicalOp::Split { .. }
            | LogicalOp::Sort { .. }
            | LogicalOp::Aggregate { .. }
            | LogicalOp::Distinct { .. }
            | LogicalOp::Join { .. }
    )
}

/// `plan` (optimized) with every stage boundary replaced by its source, bottom up,
/// but those the context's runner plans itself (a cluster's exchanges).
pub(crate) fn lower(plan: Arc<LogicalOp>, ctx: &Context) -> Result<Arc<LogicalOp>> {
    let runner = ctx.runner();
    let exec = ctx.exec_context();
    let lowers = |op: &LogicalOp| is_boundary(op) && !runner.plans_boundary(op, exec);
    if !plan.exists(|op| Ok(lowers(op)))? {
        return Ok(plan);
    }
    let lowered = Arc::unwrap_or_clone(plan).transform_up(|op| {
        if !lowers(&op) {
            return Ok(Transformed::no(op));
        }
        let source = match op {
            LogicalOp::Exchange { input, kind } => {
                exchange_source(Dataset::new(ctx.clone(), input), kind)?
            }
            LogicalOp::Split { output, .. } => output.source(),
            other => match relational_source(&other, ctx)? {
                Some(source) => source,
                None => return Ok(Transformed::no(other)),
            },
        };
        Ok(Transformed::yes(LogicalOp::Source {
            source,
            request: ScanRequest::default(),
        }))
    });
    Ok(Arc::new(lowered.map_err(VolleyError::from)?.data))
}
