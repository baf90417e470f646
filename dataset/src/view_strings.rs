//! File scans that read their strings as views where no operator buffers them.
//!
//! SQL file tables read view-hinted Parquet strings as plain `Utf8`
//! ([`plain_strings`]): operators that buffer batches (sorts, joins, windows) count a
//! batch's memory by its buffers, and a slice or sorted copy of a view array keeps,
//! and reports, its whole decoded pages. But decoding plain strings copies every
//! string, and grouping on them hashes and compares their bytes, where a view of a
//! dictionary page points into the dictionary and a short string's view holds its
//! bytes inline. In TPC-H Q01 (grouped by two one-letter columns) the copies,
//! hashing and comparisons were about a fifth of the query.
//!
//! [`ViewStringScans`] finds each scan of such a table under a run of filters and
//! projections (a *chain*) and reads the files' view strings when nothing above the
//! chain buffers the view arrays:
//! - the chain feeds an aggregation: it copies its groups' strings (and minimum or
//!   maximum values) into its own buffers, so the aggregation reads views, and its
//!   output string columns are cast back to plain strings above it;
//! - the chain filters rows (a filter step): its output's
//!   view columns are cast back to plain strings above it, which copies only the
//!   strings of the rows kept. Columns only the filter reads are never copied.
//!
//! Every plan node above keeps the schema it had, so the rule changes nothing else.
//! Expressions inside the chain are coerced again to the view types (a comparison
//! with a string constant then compares views).
//!
//! [`plain_strings`]: volley_connectors::plain_strings

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::catalog::default_table_source::{provider_as_source, source_as_provider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, Result};
use datafusion::logical_expr::logical_plan::{Projection, TableScan, TableScanBuilder};
use datafusion::logical_expr::{cast, Expr, LogicalPlan};
use datafusion::optimizer::analyzer::type_coercion::TypeCoercion;
use datafusion::optimizer::analyzer::AnalyzerRule;
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};

/// Reads the view strings of file scans whose strings no operator buffers (see the
/// module's documentation). Runs after DataFusion's rules, when filters and
/// projections have moved next to the scans.
#[derive(Debug, Default)]
pub(crate) struct ViewStringScans;

impl OptimizerRule for ViewStringScans {
    fn name(&self) -> &str {
        "volley_view_string_scans"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        plan.transform_down_with_subqueries(|node| {
            // An aggregate ordered by its arguments (`array_agg(x ORDER BY s)`) has
            // its input sorted: that sort would buffer the views.
            let aggregates =
                matches!(&node, LogicalPlan::Aggregate(a) if !a.aggr_expr.iter().any(ordered));
            let chain = if aggregates {
                node.inputs().first().and_then(|input| chain_scan(input))
            } else {
                chain_scan(&node)
            };
            let Some(chain) = chain else {
                return Ok(Transformed::no(node));
            };
            if !aggregates && !chain.filters {
                // Without a filter, casting the chain's strings back copies every
                // string, as decoding them plain does: nothing to gain.
                return Ok(Transformed::no(node));
            }
            match read_views(&node, config)? {
                Some(rewritten) => Ok(Transformed::new(rewritten, true, TreeNodeRecursion::Jump)),
                None => Ok(Transformed::no(node)),
            }
        })
    }
}

/// A chain of filters, projections and aliases down to a scan that reads strings of a
/// table whose strings can be read as views.
struct Chain {
    /// The chain has a filter step.
    filters: bool,
}

fn chain_scan(plan: &LogicalPlan) -> Option<Chain> {
    let mut filters = false;
    let mut node = plan;
    loop {
        node = match node {
            LogicalPlan::Filter(f) => {
                filters = true;
                &f.input
            }
            LogicalPlan::Projection(p) => &p.input,
            LogicalPlan::SubqueryAlias(a) => &a.input,
            LogicalPlan::TableScan(scan) => {
                // Conditions pushed into the scan that drop rows keep their filter
                // step above it (the files' scan is inexact); the exact ones, on
                // partition folders, drop whole files and keep every row of the rest.
                let strings = scan
                    .projected_schema
                    .fields()
                    .iter()
                    .any(|f| matches!(f.data_type(), DataType::Utf8 | DataType::Binary));
                views_of(scan).filter(|_| strings)?;
                return Some(Chain { filters });
            }
            _ => return None,
        };
    }
}

/// `expr` is an aggregate function with an `ORDER BY`.
fn ordered(expr: &Expr) -> bool {
    match expr {
        Expr::Alias(alias) => ordered(&alias.expr),
        Expr::AggregateFunction(f) => !f.params.order_by.is_empty(),
        _ => false,
    }
}

/// The view-string twin of the table `scan` reads, if it has one.
fn views_of(scan: &TableScan) -> Option<Arc<dyn datafusion::catalog::TableProvider>> {
    let provider = source_as_provider(&scan.source).ok()?;
    volley_connectors::view_strings_table(provider.as_ref())
}

/// `top` (a chain, or an aggregation over one) with its scan reading view strings,
/// its expressions coerced to them, and its output cast back to the types it had;
/// `None` where an output column would change type in another way.
fn read_views(top: &LogicalPlan, config: &dyn OptimizerConfig) -> Result<Option<LogicalPlan>> {
    let swapped = top.clone().transform_down(|node| match node {
        LogicalPlan::TableScan(scan) => match views_of(&scan) {
            Some(views) => {
                let scan = TableScanBuilder::new(scan.table_name, provider_as_source(views))
                    .with_projection(scan.projection)
                    .with_filters(scan.filters)
                    .with_fetch(scan.fetch)
                    .with_statistics_requests(scan.statistics_requests)
                    .build()?;
                Ok(Transformed::new(
                    LogicalPlan::TableScan(scan),
                    true,
                    TreeNodeRecursion::Jump,
                ))
            }
            None => Ok(Transformed::no(LogicalPlan::TableScan(scan))),
        },
        other => Ok(Transformed::no(other)),
    })?;
    let coerced = TypeCoercion::new().analyze(swapped.data, config.options().as_ref())?;
    let before = top.schema();
    let after = Arc::clone(coerced.schema());
    if before.fields().len() != after.fields().len() {
        return Ok(None);
    }
    let mut casts = false;
    let mut exprs = Vec::with_capacity(after.fields().len());
    for ((qualifier, field), (_, was)) in after.iter().zip(before.iter()) {
        let column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
        if field.data_type() == was.data_type() {
            exprs.push(column);
            continue;
        }
        let plain = matches!(
            (field.data_type(), was.data_type()),
            (DataType::Utf8View, DataType::Utf8) | (DataType::BinaryView, DataType::Binary)
        );
        if !plain || field.name() != was.name() {
            return Ok(None);
        }
        casts = true;
        exprs.push(
            cast(column, was.data_type().clone()).alias_qualified(qualifier.cloned(), field.name()),
        );
    }
    if !casts {
        return Ok(Some(coerced));
    }
    let projection = Projection::try_new_with_schema(
        exprs,
        Arc::new(coerced),
        Arc::new(DFSchema::clone(before)),
    )?;
    Ok(Some(LogicalPlan::Projection(projection)))
}
