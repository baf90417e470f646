//! Predicate pushdown into sources.

use std::sync::Arc;

use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::Expr;
use volley_connectors::ScanRequest;

use crate::logical::LogicalOp;

/// Whether every column `e` reads is in `pass` (columns passed through unchanged).
fn reads_only(e: &Expr, pass: impl Fn(&str) -> bool) -> bool {
    e.column_refs().iter().all(|c| pass(&c.name))
}

/// Moves `pending` filters (from above) and this node's own filters as far down as they
/// stay valid, into the scan request of sources that use filters.
pub(crate) fn push_filters(op: &Arc<LogicalOp>, pending: Vec<Expr>) -> Arc<LogicalOp> {
    Arc::new(match op.as_ref() {
        LogicalOp::Source { source, request } => {
            let mut filters = request.filters.clone();
            if source.supports_filters() {
                for f in pending {
                    if !filters.contains(&f) {
                        filters.push(f);
                    }
                }
            }
            LogicalOp::Source {
                source: Arc::clone(source),
                request: ScanRequest {
                    filters,
                    ..request.clone()
                },
            }
        }
        LogicalOp::Filter { input, predicate } => {
            let mut all = pending;
            all.extend(split_conjunction(predicate).into_iter().cloned());
            LogicalOp::Filter {
                input: push_filters(input, all),
                predicate: predicate.clone(),
            }
        }
        LogicalOp::Select { input, exprs } => {
            let plain: Vec<&str> = exprs
                .iter()
                .filter_map(|e| match e {
                    Expr::Column(c) => Some(c.name.as_str()),
                    _ => None,
                })
                .collect();
            let pass: Vec<Expr> = pending
                .into_iter()
                .filter(|f| reads_only(f, |c| plain.contains(&c)))
                .collect();
            LogicalOp::Select {
                input: push_filters(input, pass),
                exprs: exprs.clone(),
            }
        }
        LogicalOp::WithColumn { input, name, expr } => {
            let pass = pending
                .into_iter()
                .filter(|f| reads_only(f, |c| c != name))
                .collect();
            LogicalOp::WithColumn {
                input: push_filters(input, pass),
                name: name.clone(),
                expr: expr.clone(),
            }
        }
        LogicalOp::Drop { input, columns } => LogicalOp::Drop {
            input: push_filters(input, pending),
            columns: columns.clone(),
        },
        LogicalOp::Rename { input, pairs } => {
            let touched = |c: &str| pairs.iter().any(|(a, b)| a == c || b == c);
            let pass = pending
                .into_iter()
                .filter(|f| reads_only(f, |c| !touched(c)))
                .collect();
            LogicalOp::Rename {
                input: push_filters(input, pass),
                pairs: pairs.clone(),
            }
        }
        // Keeping or dropping a row commutes with ordering and deduplicating rows.
        LogicalOp::Sort { input, keys } => LogicalOp::Sort {
            input: push_filters(input, pending),
            keys: keys.clone(),
        },
        LogicalOp::Distinct { input } => LogicalOp::Distinct {
            input: push_filters(input, pending),
        },
        LogicalOp::Union { inputs } => LogicalOp::Union {
            inputs: inputs
                .iter()
                .map(|i| push_filters(i, pending.clone()))
                .collect(),
        },
        // A filter may not move below a limit, user code, an exchange (it would change
        // which rows a seeded shuffle puts where), an aggregation or a join.
        other => other.with_inputs(
            other
                .inputs()
                .into_iter()
                .map(|i| push_filters(i, vec![]))
                .collect(),
        ),
    })
}
