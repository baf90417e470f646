//! Sort, group-by, join and distinct: the all-to-all operations that DataFusion's
//! operators do well.
//!
//! Each builds a DataFusion logical plan whose leaves are the input datasets (as
//! [`DatasetTable`]s) and becomes a dataset source again ([`PlanSource`]). DataFusion
//! then runs its external sort, spilling hash aggregation and hash join, with its
//! repartition exchanges, and takes their memory from the context's budget through
//! volley's pool; spills go to the context's spill folder. The inputs stream through
//! volley's executor into those operators, and the output streams out of them.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::Column;
use datafusion::datasource::provider_as_source;
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::functions_aggregate::expr_fn as agg_fn;
use datafusion::logical_expr::type_coercion::binary::comparison_coercion;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use volley_common::{Result, VolleyError};
use volley_connectors::DataSource;

use crate::col;
use crate::context::Context;
use crate::dataset::Dataset;
use crate::logical::{aggregate_label, join_label, sort_label, LogicalOp};
use crate::options::{JoinHow, SortKey};
use crate::sql::{DatasetTable, PlanSource};

/// Aggregations for [`GroupedDataset::agg`] and [`Dataset::aggregate`], named as Ray
/// Data names them (`sum(x)`, `count()`); rename with `.alias("...")`. Any DataFusion
/// aggregate expression works too.
pub mod agg {
    use super::*;

    /// Rows in the group.
    pub fn count_all() -> Expr {
        datafusion::functions_aggregate::count::count_all().alias("count()")
    }
    /// Non-null values of `column`.
    pub fn count(column: &str) -> Expr {
        agg_fn::count(col(column)).alias(format!("count({column})"))
    }
    /// Distinct non-null values of `column`.
    pub fn count_distinct(column: &str) -> Expr {
        agg_fn::count_distinct(col(column)).alias(format!("count_distinct({column})"))
    }
    /// Sum of `column`.
    pub fn sum(column: &str) -> Expr {
        agg_fn::sum(col(column)).alias(format!("sum({column})"))
    }
    /// Smallest value of `column`.
    pub fn min(column: &str) -> Expr {
        agg_fn::min(col(column)).alias(format!("min({column})"))
    }
    /// Largest value of `column`.
    pub fn max(column: &str) -> Expr {
        agg_fn::max(col(column)).alias(format!("max({column})"))
    }
    /// Mean of `column`.
    pub fn mean(column: &str) -> Expr {
        agg_fn::avg(col(column)).alias(format!("mean({column})"))
    }
    /// Sample standard deviation of `column` (n - 1 in the denominator, as Ray, Polars
    /// and DuckDB's `stddev`).
    pub fn std(column: &str) -> Expr {
        agg_fn::stddev(col(column)).alias(format!("std({column})"))
    }
    /// The first value of `column` in the group, where rows are ordered by `order_by`
    /// (without an order, whichever row the parallel aggregation saw first).
    pub fn first(column: &str, order_by: &[SortKey]) -> Expr {
        agg_fn::first_value(
            col(column),
            order_by.iter().map(|k| k.to_sort_expr()).collect(),
        )
        .alias(format!("first({column})"))
    }
    /// The last value of `column` in the group (see [`first`]).
    pub fn last(column: &str, order_by: &[SortKey]) -> Expr {
        agg_fn::last_value(
            col(column),
            order_by.iter().map(|k| k.to_sort_expr()).collect(),
        )
        .alias(format!("last({column})"))
    }
}

/// A dataset grouped by key columns; [`agg`](GroupedDataset::agg) computes per group.
#[derive(Debug, Clone)]
pub struct GroupedDataset {
    pub(crate) dataset: Dataset,
    pub(crate) keys: Vec<String>,
}

impl GroupedDataset {
    /// One row per group: the keys, then one column per aggregation.
    ///
    /// ```
    /// use volley_dataset::{agg, col, lit, Context};
    /// let ctx = Context::try_default().unwrap();
    /// let ds = ctx.range(100).with_column("k", col("id") % lit(3i64)).unwrap();
    /// let out = ds.groupby(&["k"]).agg([agg::count_all(), agg::sum("id")]).unwrap();
    /// assert_eq!(out.count().unwrap(), 3);
    /// ```
    pub fn agg(&self, aggs: impl IntoIterator<Item = Expr>) -> Result<Dataset> {
        let aggs: Vec<Expr> = aggs.into_iter().collect();
        // Built now to check the expressions and learn the output schema.
        let plan = aggregate_plan(&self.dataset, &self.keys, &aggs)?;
        Ok(self.dataset.with(LogicalOp::Aggregate {
            input: Arc::clone(self.dataset.logical_plan()),
            keys: self.keys.clone(),
            aggs,
            schema: Arc::new(plan.schema().as_arrow().clone()),
        }))
    }

    /// Rows per group, in a column `count()`.
    pub fn count(&self) -> Result<Dataset> {
        self.agg([agg::count_all()])
    }
}

/// Fails, naming the key and listing the schema's columns, unless every key is one.
pub(crate) fn check_keys<S: AsRef<str>>(schema: &SchemaRef, keys: &[S], what: &str) -> Result<()> {
    for k in keys {
        let k = k.as_ref();
        if schema.index_of(k).is_err() {
            return Err(VolleyError::unknown_column(what, k, schema));
        }
    }
    Ok(())
}

/// A dataset as the leaf of a DataFusion plan, named `name`: translated into
/// DataFusion's own plan where it is files or a query under column and row steps (so
/// that DataFusion scans in parallel, with statistics), or else streamed from volley's
/// executor ([`DatasetTable`]), its view strings cast to plain ones.
///
/// The sort, aggregation or join above buffers its input, and must count it exactly.
/// View strings cannot be counted exactly there: the sort's sorted chunks (and a
/// join's gathered rows) each keep every string buffer of the batch they came from,
/// and each is counted as holding all of them, so a sort of a few hundred MiB of view
/// strings (an exchange's reduce task over `lineitem`) counted them many times over
/// and failed for want of memory. Files are read as plain strings for the same reason
/// (`plain_strings`).
fn scan(ds: &Dataset, name: &str) -> Result<LogicalPlanBuilder> {
    if let Some(b) = native(ds.logical())? {
        return Ok(b.alias(name)?);
    }
    let table = Arc::new(DatasetTable::try_new(ds.clone())?);
    let schema = table.schema();
    let scan = LogicalPlanBuilder::scan("dataset", provider_as_source(table), None)?;
    Ok(volley_connectors::cast_to_plain_strings(scan, &schema)?.alias(name)?)
}

/// `op` as a DataFusion plan, if every step has a DataFusion equivalent.
fn native(op: &LogicalOp) -> Result<Option<LogicalPlanBuilder>> {
    Ok(match op {
        // What the optimizer pushed into the source goes on top of its plan (DataFusion
        // pushes it into its own scan again): the filters (hints: the filter step above
        // repeats them), then the projection, then the limit (pushed only without
        // filters).
        LogicalOp::Source { source, request } => {
            let Some(plan) = source.logical_plan() else {
                return Ok(None);
            };
            let mut b = LogicalPlanBuilder::from(plan);
            if let Some(f) = datafusion::logical_expr::utils::conjunction(request.filters.clone()) {
                b = b.filter(f)?;
            }
            if let Some(p) = &request.projection {
                let schema = source.schema();
                b = b.project(p.iter().map(|&i| col(schema.field(i).name().as_str())))?;
            }
            if let Some(n) = request.limit {
                b = b.limit(0, Some(n))?;
            }
            Some(b)
        }
        LogicalOp::Filter { input, predicate } => match native(input)? {
            Some(b) => Some(b.filter(predicate.clone())?),
            None => None,
        },
        LogicalOp::Select { input, .. }
        | LogicalOp::WithColumn { input, .. }
        | LogicalOp::Drop { input, .. }
        | LogicalOp::Rename { input, .. } => {
            let Some(b) = native(input)? else {
                return Ok(None);
            };
            // Over the optimized plan: a column the optimizer pruned below a drop or a
            // rename is not there (the user's plan was checked when it was built).
            let schema = Arc::new(b.schema().as_arrow().clone());
            match op.projection(&schema, false)? {
                Some(cols) => Some(b.project(cols.into_iter().map(|(e, n)| e.alias(n)))?),
                None => None,
            }
        }
        _ => None,
    })
}

fn qualified(table: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(table), name))
}

/// The DataFusion plan of sorting `input`.
fn sort_plan(input: &Dataset, keys: &[SortKey]) -> Result<LogicalPlan> {
    Ok(scan(input, "input")?
        .sort(keys.iter().map(SortKey::to_sort_expr))?
        .build()?)
}

/// The DataFusion plan of aggregating `input` by `keys`.
fn aggregate_plan(input: &Dataset, keys: &[String], aggs: &[Expr]) -> Result<LogicalPlan> {
    let keys: Vec<Expr> = keys.iter().map(|k| col(k.as_str())).collect();
    Ok(scan(input, "input")?
        .aggregate(keys, aggs.to_vec())?
        .build()?)
}

/// The DataFusion plan of joining `left` and `right`: the keys once (named as on the
/// left), the other left columns, then the other right columns (suffixed `_right` where
/// a left column has the name).
fn join_plan(
    left: &Dataset,
    right: &Dataset,
    left_on: &[String],
    right_on: &[String],
    how: JoinHow,
) -> Result<LogicalPlan> {
    let left_schema = left.schema()?;
    let right_schema = right.schema()?;
    let (l, r) = ("left", "right");
    let keys = (
        left_on
            .iter()
            .map(|k| Column::new(Some(l), k.as_str()))
            .collect::<Vec<_>>(),
        right_on
            .iter()
            .map(|k| Column::new(Some(r), k.as_str()))
            .collect::<Vec<_>>(),
    );
    let joined = scan(left, l)?.join(scan(right, r)?.build()?, how.join_type(), keys, None)?;
    let mut out: Vec<Expr> = Vec::new();
    for (lk, rk) in left_on.iter().zip(right_on) {
        let key = match how {
            JoinHow::Right => qualified(r, rk),
            JoinHow::Full => coalesce(vec![qualified(l, lk), qualified(r, rk)]),
            _ => qualified(l, lk),
        };
        out.push(key.alias(lk));
    }
    for f in left_schema.fields() {
        if !left_on.contains(f.name()) {
            out.push(qualified(l, f.name()).alias(f.name()));
        }
    }
    if !matches!(how, JoinHow::Semi | JoinHow::Anti) {
        // Names taken so far: the keys' and the left columns'.
        let mut named: std::collections::HashSet<String> = left_schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        for f in right_schema.fields() {
            let name = f.name();
            if right_on.contains(name) {
                continue;
            }
            let alias = if left_schema.field_with_name(name).is_ok() {
                format!("{name}_right")
            } else {
                name.to_string()
            };
            if !named.insert(alias.clone()) {
                return Err(VolleyError::plan(format!(
                    "join: the right side's column `{name}` would be named `{alias}`, the \
                     name of another column of the join's output; rename one of them before \
                     the join"
                )));
            }
            out.push(qualified(r, name).alias(alias));
        }
    }
    Ok(joined.project(out)?.build()?)
}

/// The source a sort, aggregation, distinct or join node becomes before planning: its
/// DataFusion plan over its (optimized) inputs; `None` for other nodes.
pub(crate) fn relational_source(
    op: &LogicalOp,
    ctx: &Context,
) -> Result<Option<Arc<dyn DataSource>>> {
    let ds = |i: &Arc<LogicalOp>| Dataset::new(ctx.clone(), Arc::clone(i));
    let (plan, name, label, ordered) = match op {
        LogicalOp::Sort { input, keys } => {
            (sort_plan(&ds(input), keys)?, "Sort", sort_label(keys), true)
        }
        LogicalOp::Aggregate {
            input, keys, aggs, ..
        } => (
            aggregate_plan(&ds(input), keys, aggs)?,
            "Aggregate",
            aggregate_label(keys, aggs),
            false,
        ),
        LogicalOp::Distinct { input } => (
            scan(&ds(input), "input")?.distinct()?.build()?,
            "Distinct",
            "all columns".to_string(),
            false,
        ),
        LogicalOp::Join {
            left,
            right,
            left_on,
            right_on,
            how,
            ..
        } => (
            join_plan(&ds(left), &ds(right), left_on, right_on, *how)?,
            "Join",
            join_label(left_on, right_on, *how),
            false,
        ),
        _ => return Ok(None),
    };
    let state = ctx.session_state().clone();
    Ok(Some(Arc::new(PlanSource::new(
        ctx, state, plan, name, label, ordered,
    ))))
}

impl Dataset {
    /// Sorts all rows by `keys` (the first key first). Spills to disk when the data
    /// does not fit the memory budget; the output streams in order.
    ///
    /// ```
    /// use volley_dataset::{Context, SortKey};
    /// let ctx = Context::try_default().unwrap();
    /// let top = ctx.range(10).sort([SortKey::desc("id")]).unwrap().take(1).unwrap();
    /// assert_eq!(top[0].num_rows(), 1);
    /// ```
    pub fn sort<K: Into<SortKey>>(&self, keys: impl IntoIterator<Item = K>) -> Result<Dataset> {
        let keys: Vec<SortKey> = keys.into_iter().map(Into::into).collect();
        if keys.is_empty() {
            return Err(VolleyError::plan("sort needs at least one key"));
        }
        // Built now to check the keys against the input.
        sort_plan(self, &keys)?;
        Ok(self.with(LogicalOp::Sort {
            input: Arc::clone(self.logical_plan()),
            keys,
        }))
    }

    /// Groups rows by the `keys` columns; aggregate with [`GroupedDataset::agg`].
    pub fn groupby(&self, keys: &[&str]) -> GroupedDataset {
        GroupedDataset {
            dataset: self.clone(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    /// Aggregates over all rows: one output row.
    pub fn aggregate(&self, aggs: impl IntoIterator<Item = Expr>) -> Result<Dataset> {
        GroupedDataset {
            dataset: self.clone(),
            keys: vec![],
        }
        .agg(aggs)
    }

    /// Each distinct row once.
    pub fn distinct(&self) -> Result<Dataset> {
        Ok(self.with(LogicalOp::Distinct {
            input: Arc::clone(self.logical_plan()),
        }))
    }

    /// The distinct values of `column`, one row each.
    pub fn unique(&self, column: &str) -> Result<Dataset> {
        self.select(&[column])?.distinct()
    }

    /// Joins with `other` on equal values of the `on` columns (same names on both
    /// sides).
    ///
    /// Output columns: the keys once, then the other left columns, then the other
    /// right columns (suffixed `_right` where a left column has the same name). Semi
    /// and anti joins keep the left columns only. Null keys match nothing.
    pub fn join(&self, other: &Dataset, on: &[&str], how: JoinHow) -> Result<Dataset> {
        self.join_on(other, on, on, how)
    }

    /// Joins with `other` where `left_on[i]` equals `right_on[i]`; the key columns
    /// keep the left names (see [`join`](Dataset::join)).
    pub fn join_on(
        &self,
        other: &Dataset,
        left_on: &[&str],
        right_on: &[&str],
        how: JoinHow,
    ) -> Result<Dataset> {
        if left_on.is_empty() || left_on.len() != right_on.len() {
            return Err(VolleyError::plan(format!(
                "join needs as many left keys as right keys, at least one (got {left_on:?} and {right_on:?})"
            )));
        }
        let (left_schema, right_schema) = (self.schema()?, other.schema()?);
        for (side, keys, schema) in [
            ("left", left_on, &left_schema),
            ("right", right_on, &right_schema),
        ] {
            check_keys(schema, keys, &format!("join key of the {side} dataset"))?;
        }
        let key_casts = left_on
            .iter()
            .zip(right_on)
            .map(|(l, r)| {
                let lt = left_schema.field_with_name(l)?.data_type();
                let rt = right_schema.field_with_name(r)?.data_type();
                Ok((lt != rt).then(|| comparison_coercion(lt, rt).unwrap_or_else(|| lt.clone())))
            })
            .collect::<Result<Vec<_>>>()?;
        let left_on: Vec<String> = left_on.iter().map(|k| k.to_string()).collect();
        let right_on: Vec<String> = right_on.iter().map(|k| k.to_string()).collect();
        // Built now to learn the output schema.
        let plan = join_plan(self, other, &left_on, &right_on, how)?;
        Ok(self.with(LogicalOp::Join {
            left: Arc::clone(self.logical_plan()),
            right: Arc::clone(other.logical_plan()),
            left_on,
            right_on,
            how,
            key_casts,
            schema: Arc::new(plan.schema().as_arrow().clone()),
        }))
    }
}
