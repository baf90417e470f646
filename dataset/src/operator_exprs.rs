//! Rewriting the expressions an operator evaluates per row, for the rules that swap
//! one of DataFusion's expressions for a faster one of volley's
//! ([`DecimalArithmetic`], [`ViewComparisons`]).
//!
//! [`DecimalArithmetic`]: crate::decimal_arith::DecimalArithmetic
//! [`ViewComparisons`]: crate::view_compare::ViewComparisons

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::Result;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::ExecutionPlan;
use volley_exec::ExprRewrite;

/// `plan` with `rewrite` applied to the expressions of its projections, its filters'
/// predicates and its aggregates' arguments. Other operators' expressions (join keys,
/// sort keys, a scan's predicate, which pruning reads) are left as they are.
pub(crate) fn rewrite_operator_exprs(
    plan: Arc<dyn ExecutionPlan>,
    rewrite: ExprRewrite,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if let Some(p) = node.downcast_ref::<ProjectionExec>() {
            let schema = p.input().schema();
            let mut changed = false;
            let mut exprs = Vec::with_capacity(p.expr().len());
            for e in p.expr() {
                let new = rewrite(&e.expr, &schema)?;
                changed |= new.transformed;
                exprs.push(ProjectionExpr {
                    expr: new.data,
                    alias: e.alias.clone(),
                });
            }
            if !changed {
                return Ok(Transformed::no(node));
            }
            let rewritten = ProjectionExec::try_new_with_schema_metadata(
                exprs,
                Arc::clone(p.input()),
                &p.schema(),
            )?;
            return Ok(Transformed::yes(Arc::new(rewritten) as _));
        }
        if let Some(f) = node.downcast_ref::<FilterExec>() {
            let new = rewrite(f.predicate(), &f.input().schema())?;
            if !new.transformed {
                return Ok(Transformed::no(node));
            }
            let rewritten = FilterExecBuilder::from(f)
                .with_predicate(new.data)
                .build()?;
            return Ok(Transformed::yes(Arc::new(rewritten) as _));
        }
        if let Some(a) = node.downcast_ref::<AggregateExec>() {
            let schema = a.input_schema();
            let mut changed = false;
            let mut aggregates = Vec::with_capacity(a.aggr_expr().len());
            for agg in a.aggr_expr() {
                // `with_new_expressions` forgets that an ordered aggregate was
                // reversed: those keep their expressions.
                if agg.is_reversed() || !agg.order_bys().is_empty() {
                    aggregates.push(Arc::clone(agg));
                    continue;
                }
                let mut args = Vec::new();
                let mut args_changed = false;
                for arg in agg.expressions() {
                    let new = rewrite(&arg, &schema)?;
                    args_changed |= new.transformed;
                    args.push(new.data);
                }
                if !args_changed {
                    aggregates.push(Arc::clone(agg));
                    continue;
                }
                match agg.with_new_expressions(args, vec![]) {
                    Some(new) => {
                        changed = true;
                        aggregates.push(Arc::new(new));
                    }
                    None => aggregates.push(Arc::clone(agg)),
                }
            }
            if !changed {
                return Ok(Transformed::no(node));
            }
            return Ok(Transformed::yes(
                Arc::new(a.with_new_aggr_exprs(aggregates)) as _,
            ));
        }
        Ok(Transformed::no(node))
    })
    .data()
}
