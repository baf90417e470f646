//! Logical optimizer rules, one per file.
//!
//! Each rule rewrites the plan top-down and returns a new tree (plans are small and
//! immutable). They run in this order:
//!
//! 1. [`projection`]: the columns a source must produce are the ones something above
//!    reads; Parquet then decodes only those.
//! 2. [`filter`]: filters move into the source's scan request, where DataFusion prunes
//!    files, row groups and pages and filters while decoding. The filter step stays in
//!    the plan: sources may be inexact.
//! 3. [`limit`]: a limit with only column-shaping steps between it and a source tells
//!    the source it may stop early.

mod filter;
mod limit;
mod projection;

use std::sync::Arc;

use datafusion::execution::context::SessionState;
use volley_common::Result;

use crate::logical::LogicalOp;

/// Runs every rule.
pub(crate) fn optimize(plan: &Arc<LogicalOp>, state: &SessionState) -> Result<Arc<LogicalOp>> {
    let plan = projection::push_projection(plan, None, state)?;
    let plan = filter::push_filters(&plan, Vec::new());
    let plan = limit::push_limit(&plan, None);
    Ok(plan)
}
