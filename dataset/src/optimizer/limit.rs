//! Limit pushdown into sources.

use std::sync::Arc;

use volley_connectors::ScanRequest;

use crate::logical::LogicalOp;

/// Tells sources under a limit (with only column-shaping steps between) how many rows
/// are wanted at most. The limit itself stays in the plan.
pub(crate) fn push_limit(op: &Arc<LogicalOp>, limit: Option<usize>) -> Arc<LogicalOp> {
    Arc::new(match op.as_ref() {
        LogicalOp::Source { source, request } => {
            // A source with pushed filters applies its limit after them only if it is
            // exact; it may not be, so the limit goes in only when there are none.
            let limit = if request.filters.is_empty() {
                limit
            } else {
                None
            };
            LogicalOp::Source {
                source: Arc::clone(source),
                request: ScanRequest {
                    limit: match (limit, request.limit) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    },
                    ..request.clone()
                },
            }
        }
        LogicalOp::Limit { input, n } => {
            let l = limit.map(|l| l.min(*n)).unwrap_or(*n);
            LogicalOp::Limit {
                input: push_limit(input, Some(l)),
                n: *n,
            }
        }
        LogicalOp::Select { .. }
        | LogicalOp::WithColumn { .. }
        | LogicalOp::Drop { .. }
        | LogicalOp::Rename { .. }
        | LogicalOp::Union { .. } => op.with_inputs(
            op.inputs()
                .into_iter()
                .map(|i| push_limit(i, limit))
                .collect(),
        ),
        other => other.with_inputs(
            other
                .inputs()
                .into_iter()
                .map(|i| push_limit(i, None))
                .collect(),
        ),
    })
}
