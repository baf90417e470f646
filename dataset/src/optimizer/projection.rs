//! Projection pushdown.

use std::collections::HashSet;
use std::sync::Arc;

use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use volley_common::Result;
use volley_connectors::ScanRequest;

use crate::logical::LogicalOp;

/// Rewrites `op` so that it produces at least the columns in `required` (`None`: all of
/// its columns), with sources reading no more than needed.
pub(crate) fn push_projection(
    op: &Arc<LogicalOp>,
    required: Option<HashSet<String>>,
    state: &SessionState,
) -> Result<Arc<LogicalOp>> {
    let refs = |e: &Expr| {
        e.column_refs()
            .into_iter()
            .map(|c| c.name.clone())
            .collect::<HashSet<_>>()
    };
    let below =
        |input: &Arc<LogicalOp>, req: Option<HashSet<String>>| push_projection(input, req, state);
    Ok(Arc::new(match op.as_ref() {
        LogicalOp::Source { source, request } => {
            // A source already cut to some columns (a plan optimized before, as an
            // exchange's input is when it runs) keeps that cut: nothing above asking
            // for columns does not mean every column of the source, and a stream
            // declaring the cut schema must not carry the others.
            let projection = match required {
                None => request.projection.clone(),
                Some(set) => Some(
                    source
                        .schema()
                        .fields()
                        .iter()
                        .enumerate()
                        .filter(|(i, f)| {
                            set.contains(f.name())
                                && request.projection.as_ref().is_none_or(|p| p.contains(i))
                        })
                        .map(|(i, _)| i)
                        .collect::<Vec<_>>(),
                ),
            };
            LogicalOp::Source {
                source: Arc::clone(source),
                request: ScanRequest {
                    projection,
                    ..request.clone()
                },
            }
        }
        LogicalOp::Select { input, exprs } => {
            // Leave out the outputs nobody reads.
            let exprs: Vec<Expr> = match &required {
                Some(set) => exprs
                    .iter()
                    .filter(|e| {
                        let name = match e {
                            Expr::Column(c) => c.name.clone(),
                            Expr::Alias(a) => a.name.clone(),
                            other => other.schema_name().to_string(),
                        };
                        set.contains(&name)
                    })
                    .cloned()
                    .collect(),
                None => exprs.clone(),
            };
            let needed: HashSet<String> = exprs.iter().flat_map(refs).collect();
            LogicalOp::Select {
                input: below(input, Some(needed))?,
                exprs,
            }
        }
        LogicalOp::WithColumn { input, name, expr } => {
            let req = required.map(|mut set| {
                set.remove(name);
                set.extend(refs(expr));
                set
            });
            LogicalOp::WithColumn {
                input: below(input, req)?,
                name: name.clone(),
                expr: expr.clone(),
            }
        }
        LogicalOp::Drop { input, columns } => {
            let req = match required {
                Some(set) => Some(set),
                None => input.schema(state)?.map(|s| {
                    s.fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .filter(|n| !columns.contains(n))
                        .collect()
                }),
            };
            LogicalOp::Drop {
                input: below(input, req)?,
                columns: columns.clone(),
            }
        }
        LogicalOp::Rename { input, pairs } => {
            let req = required.map(|set| {
                set.into_iter()
                    .map(|n| {
                        pairs
                            .iter()
                            .find(|(_, to)| *to == n)
                            .map(|(from, _)| from.clone())
                            .unwrap_or(n)
                    })
                    .collect()
            });
            LogicalOp::Rename {
                input: below(input, req)?,
                pairs: pairs.clone(),
            }
        }
        LogicalOp::Filter { input, predicate } => {
            let req = required.map(|mut set| {
                set.extend(refs(predicate));
                set
            });
            LogicalOp::Filter {
                input: below(input, req)?,
                predicate: predicate.clone(),
            }
        }
        LogicalOp::Limit { input, n } => LogicalOp::Limit {
            input: below(input, required)?,
            n: *n,
        },
        LogicalOp::Sort { input, keys } => {
            let req = required.map(|mut set| {
                for k in keys {
                    set.extend(refs(&k.expr));
                }
                set
            });
            LogicalOp::Sort {
                input: below(input, req)?,
                keys: keys.clone(),
            }
        }
        // An aggregation reads its keys and what its aggregations read, whatever is
        // asked of it (none at all, as `count()`: every column stays, for the rows).
        LogicalOp::Aggregate {
            input,
            keys,
            aggs,
            schema,
        } => {
            let mut read: HashSet<String> = keys.iter().cloned().collect();
            for a in aggs {
                read.extend(refs(a));
            }
            LogicalOp::Aggregate {
                input: below(input, Some(read).filter(|r| !r.is_empty()))?,
                keys: keys.clone(),
                aggs: aggs.clone(),
                schema: Arc::clone(schema),
            }
        }
        // What is asked of an exchange and its keys is all its input must give: the
        // other columns are not read, stored or spilled.
        LogicalOp::Exchange { input, kind } => {
            // An exchange moves rows, which it keeps in batches: one column at least
            // (a count asks for none), the narrowest of fixed width where there is
            // one; every column where the input's are not known.
            let narrowest = input.schema(state)?.and_then(|s| {
                s.fields()
                    .iter()
                    .min_by_key(|f| f.data_type().primitive_width().unwrap_or(usize::MAX))
                    .map(|f| f.name().clone())
            });
            let req = required.and_then(|mut set| {
                set.extend(kind.keys().iter().cloned());
                if set.is_empty() {
                    set.insert(narrowest?);
                }
                Some(set)
            });
            LogicalOp::Exchange {
                input: below(input, req)?,
                kind: kind.clone(),
            }
        }
        LogicalOp::Union { inputs } => {
            // Every input must give the same columns in the same order: a Select of
            // the required columns (in the first input's order) on top of each.
            let order = match (&required, inputs[0].schema(state)?) {
                (Some(set), Some(schema)) => Some(
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .filter(|n| set.contains(n))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            };
            LogicalOp::Union {
                inputs: inputs
                    .iter()
                    .map(|i| {
                        let child = below(i, order.as_ref().and(required.clone()))?;
                        Ok(match &order {
                            Some(cols) => Arc::new(LogicalOp::Select {
                                input: child,
                                exprs: cols.iter().map(|c| crate::col(c.as_str())).collect(),
                            }),
                            None => child,
                        })
                    })
                    .collect::<Result<_>>()?,
            }
        }
        // User code sees whole rows; a distinct compares whole rows; a join's sides
        // keep their columns (DataFusion prunes them inside the join's plan).
        other => other.with_inputs(
            other
                .inputs()
                .into_iter()
                .map(|i| below(i, None))
                .collect::<Result<_>>()?,
        ),
    }))
}
