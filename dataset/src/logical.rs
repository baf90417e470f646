//! The logical plan of a dataset.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeIterator, TreeNodeRecursion};
use datafusion::common::Result as DfResult;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use volley_common::{Result, VolleyError};
use volley_connectors::{DataSource, RemotePart, ScanRequest};
use volley_exec::{PredicateFn, Step, TransformFactory, TransformFn, WriteTarget};

use crate::col;
use crate::exchange::SplitOutput;
use crate::options::{JoinHow, MapOptions, SortKey};

/// What an [`LogicalOp::Exchange`] produces: how it redistributes its input's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeKind {
    /// `n` outputs of equal row counts, in input order.
    Repartition {
        /// Outputs.
        n: usize,
    },
    /// `n` outputs by a hash of the keys.
    RepartitionBy {
        /// Key columns.
        keys: Vec<String>,
        /// Outputs.
        n: usize,
    },
    /// Rows in a seeded random order, over `n` partitions.
    RandomShuffle {
        /// The seed: the same seed gives the same order.
        seed: u64,
        /// Partitions.
        n: usize,
    },
    /// The input's blocks in a seeded random order.
    RandomizeBlockOrder {
        /// The seed.
        seed: u64,
    },
    /// One block per group of equal keys (hash partitioned, sorted within).
    Groups {
        /// Key columns.
        keys: Vec<String>,
        /// Partitions.
        n: usize,
    },
}

impl ExchangeKind {
    /// The columns it partitions by.
    pub fn keys(&self) -> &[String] {
        match self {
            ExchangeKind::RepartitionBy { keys, .. } | ExchangeKind::Groups { keys, .. } => keys,
            _ => &[],
        }
    }

    /// Whether its output order is meaningful (reproducible, or the input's).
    pub fn ordered(&self) -> bool {
        self.keys().is_empty()
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            ExchangeKind::Repartition { n } => format!("{n} partitions of equal rows, in order"),
            ExchangeKind::RepartitionBy { keys, n } => {
                format!("hash of [{}] into {n} partitions", keys.join(", "))
            }
            ExchangeKind::RandomShuffle { seed, n } => {
                format!("random rows (seed {seed}) over {n} partitions")
            }
            ExchangeKind::RandomizeBlockOrder { seed } => {
                format!("random block order (seed {seed})")
            }
            ExchangeKind::Groups { keys, n } => {
                format!(
                    "groups of [{}], hashed into {n} partitions",
                    keys.join(", ")
                )
            }
        }
    }
}

/// A write the plan's output goes to (a [`LogicalOp::Write`] at the plan's root): the
/// driver's target (which commits), and the part template tasks on other processes
/// write with.
#[derive(Debug, Clone)]
pub struct WriteSpec {
    /// Where the staged parts are gathered and committed.
    pub target: Arc<WriteTarget>,
    /// What a task on a cluster node writes its part with.
    pub part: RemotePart,
    /// What is written where, for plans (`parquet to /data/out`).
    pub label: String,
}

/// A node of a dataset's logical plan.
#[derive(Debug, Clone)]
pub enum LogicalOp {
    /// A source, with what the optimizer pushed into it.
    Source {
        /// The source.
        source: Arc<dyn DataSource>,
        /// Projection, filters and limit pushed down.
        request: ScanRequest,
    },
    /// Keeps or computes columns.
    Select {
        /// Input.
        input: Arc<LogicalOp>,
        /// Output columns (named by alias, or by the column they read).
        exprs: Vec<Expr>,
    },
    /// Adds or replaces a column.
    WithColumn {
        /// Input.
        input: Arc<LogicalOp>,
        /// The column's name.
        name: String,
        /// Its value.
        expr: Expr,
    },
    /// Removes columns.
    Drop {
        /// Input.
        input: Arc<LogicalOp>,
        /// Columns to remove.
        columns: Vec<String>,
    },
    /// Renames columns.
    Rename {
        /// Input.
        input: Arc<LogicalOp>,
        /// `(from, to)` pairs.
        pairs: Vec<(String, String)>,
    },
    /// Keeps rows where an expression is true.
    Filter {
        /// Input.
        input: Arc<LogicalOp>,
        /// The predicate.
        predicate: Expr,
    },
    /// Keeps rows where a Rust predicate is true.
    FilterFn {
        /// Input.
        input: Arc<LogicalOp>,
        /// The predicate.
        predicate: PredicateFn,
    },
    /// A stateless user transform.
    MapBatches {
        /// Input.
        input: Arc<LogicalOp>,
        /// The transform.
        f: TransformFn,
        /// Batch size, resources, concurrency.
        options: MapOptions,
    },
    /// A stateful user transform on a pool of workers.
    MapBatchesStateful {
        /// Input.
        input: Arc<LogicalOp>,
        /// Builds each worker's transform.
        factory: TransformFactory,
        /// Batch size, resources, concurrency.
        options: MapOptions,
    },
    /// The first `n` rows.
    Limit {
        /// Input.
        input: Arc<LogicalOp>,
        /// Rows.
        n: usize,
    },
    /// All rows of all inputs.
    Union {
        /// Inputs.
        inputs: Vec<Arc<LogicalOp>>,
    },
    /// All rows in the order of the keys (DataFusion's external sort, spilling beyond
    /// the budget).
    Sort {
        /// Input.
        input: Arc<LogicalOp>,
        /// Keys, the first first.
        keys: Vec<SortKey>,
    },
    /// One row per group of equal keys (no keys: one row), with the aggregations.
    Aggregate {
        /// Input.
        input: Arc<LogicalOp>,
        /// Key columns.
        keys: Vec<String>,
        /// Aggregate expressions (`agg::sum("x")`, any DataFusion aggregate).
        aggs: Vec<Expr>,
        /// The output schema (the keys, then one column per aggregation).
        schema: SchemaRef,
    },
    /// Each distinct row once.
    Distinct {
        /// Input.
        input: Arc<LogicalOp>,
    },
    /// Rows of two inputs matched on equal keys.
    Join {
        /// The left input.
        left: Arc<LogicalOp>,
        /// The right input.
        right: Arc<LogicalOp>,
        /// Key columns of the left input.
        left_on: Vec<String>,
        /// Key columns of the right input (as many).
        right_on: Vec<String>,
        /// Which rows are kept.
        how: JoinHow,
        /// Per key pair whose two types differ (Int32 and Int64): the type the join
        /// compares them in. A partitioned join hashes both sides' keys in it, so that
        /// equal keys meet in one partition; learned when the join was built, where the
        /// inputs' schemas were known (a transform's output may not be later).
        key_casts: Vec<Option<DataType>>,
        /// The output schema (keys once, left columns, right columns).
        schema: SchemaRef,
    },
    /// Writes its input's rows (always the root of a plan): each task writes its part
    /// where it runs, and the driver commits them all or none.
    Write {
        /// Input.
        input: Arc<LogicalOp>,
        /// Where and how.
        spec: WriteSpec,
    },
    /// One output of a split (`split`, `split_at_indices`, `split_proportionately`,
    /// `train_test_split`): a stage boundary whose input runs once, when the first
    /// output is read, and is kept for all of them. Nothing is pushed into its input
    /// (the outputs share it); before planning it becomes the split's source.
    Split {
        /// Input (the same for every output of the split).
        input: Arc<LogicalOp>,
        /// Which rows this output holds.
        output: SplitOutput,
    },
    /// A stage boundary that redistributes the rows (repartition, shuffles, the groups
    /// of `map_groups`): the input runs to completion first. The optimizer sees
    /// through it (the columns asked of it and its keys are all its input must give);
    /// before planning it becomes the exchange's source over its optimized input.
    Exchange {
        /// Input.
        input: Arc<LogicalOp>,
        /// How the rows are redistributed.
        kind: ExchangeKind,
    },
}

impl LogicalOp {
    pub(crate) fn source(source: Arc<dyn DataSource>) -> Arc<Self> {
        Arc::new(LogicalOp::Source {
            source,
            request: ScanRequest::default(),
        })
    }

    /// This plan without the write at its root, and the write (if there is one).
    pub(crate) fn split_write(&self) -> (&LogicalOp, Option<&WriteSpec>) {
        match self {
            LogicalOp::Write { input, spec } => (input, Some(spec)),
            other => (other, None),
        }
    }

    /// Whether a source below this node makes the output order meaningful.
    pub fn needs_order(&self) -> bool {
        match self {
            LogicalOp::Source { source, .. } => source.ordered(),
            // Its input runs in order anyway (seeded shuffles must reproduce).
            LogicalOp::Exchange { kind, .. } => kind.ordered(),
            LogicalOp::Sort { .. } | LogicalOp::Split { .. } => true,
            LogicalOp::Aggregate { .. } | LogicalOp::Distinct { .. } | LogicalOp::Join { .. } => {
                false
            }
            other => other.inputs().iter().any(|i| i.needs_order()),
        }
    }

    /// Inputs of this node.
    pub fn inputs(&self) -> Vec<&Arc<LogicalOp>> {
        match self {
            LogicalOp::Source { .. } => vec![],
            LogicalOp::Select { input, .. }
            | LogicalOp::WithColumn { input, .. }
            | LogicalOp::Drop { input, .. }
            | LogicalOp::Rename { input, .. }
            | LogicalOp::Filter { input, .. }
            | LogicalOp::FilterFn { input, .. }
            | LogicalOp::MapBatches { input, .. }
            | LogicalOp::MapBatchesStateful { input, .. }
            | LogicalOp::Limit { input, .. }
            | LogicalOp::Exchange { input, .. }
            | LogicalOp::Sort { input, .. }
            | LogicalOp::Aggregate { input, .. }
            | LogicalOp::Write { input, .. }
            | LogicalOp::Split { input, .. }
            | LogicalOp::Distinct { input } => vec![input],
            LogicalOp::Join { left, right, .. } => vec![left, right],
            LogicalOp::Union { inputs } => inputs.iter().collect(),
        }
    }

    /// Rebuilds this node over new inputs.
    pub(crate) fn with_inputs(&self, mut new: Vec<Arc<LogicalOp>>) -> LogicalOp {
        let mut one = || new.remove(0);
        match self {
            LogicalOp::Source { .. } => self.clone(),
            LogicalOp::Select { exprs, .. } => LogicalOp::Select {
                input: one(),
                exprs: exprs.clone(),
            },
            LogicalOp::WithColumn { name, expr, .. } => LogicalOp::WithColumn {
                input: one(),
                name: name.clone(),
                expr: expr.clone(),
            },
            LogicalOp::Drop { columns, .. } => LogicalOp::Drop {
                input: one(),
                columns: columns.clone(),
            },
            LogicalOp::Rename { pairs, .. } => LogicalOp::Rename {
                input: one(),
                pairs: pairs.clone(),
            },
            LogicalOp::Filter { predicate, .. } => LogicalOp::Filter {
                input: one(),
                predicate: predicate.clone(),
            },
            LogicalOp::FilterFn { predicate, .. } => LogicalOp::FilterFn {
                input: one(),
                predicate: predicate.clone(),
            },
            LogicalOp::MapBatches { f, options, .. } => LogicalOp::MapBatches {
                input: one(),
                f: f.clone(),
                options: options.clone(),
            },
            LogicalOp::MapBatchesStateful {
                factory, options, ..
            } => LogicalOp::MapBatchesStateful {
                input: one(),
                factory: factory.clone(),
                options: options.clone(),
            },
            LogicalOp::Limit { n, .. } => LogicalOp::Limit {
                input: one(),
                n: *n,
            },
            LogicalOp::Union { .. } => LogicalOp::Union { inputs: new },
            LogicalOp::Exchange { kind, .. } => LogicalOp::Exchange {
                input: one(),
                kind: kind.clone(),
            },
            LogicalOp::Split { output, .. } => LogicalOp::Split {
                input: one(),
                output: output.clone(),
            },
            LogicalOp::Sort { keys, .. } => LogicalOp::Sort {
                input: one(),
                keys: keys.clone(),
            },
            LogicalOp::Aggregate {
                keys, aggs, schema, ..
            } => LogicalOp::Aggregate {
                input: one(),
                keys: keys.clone(),
                aggs: aggs.clone(),
                schema: Arc::clone(schema),
            },
            LogicalOp::Distinct { .. } => LogicalOp::Distinct { input: one() },
            LogicalOp::Write { spec, .. } => LogicalOp::Write {
                input: one(),
                spec: spec.clone(),
            },
            LogicalOp::Join {
                left_on,
                right_on,
                how,
                key_casts,
                schema,
                ..
            } => LogicalOp::Join {
                left: one(),
                right: one(),
                left_on: left_on.clone(),
                right_on: right_on.clone(),
                how: *how,
                key_casts: key_casts.clone(),
                schema: Arc::clone(schema),
            },
        }
    }

    /// The output schema, where it is known without running user code.
    pub fn schema(&self, state: &SessionState) -> Result<Option<SchemaRef>> {
        Ok(match self {
            LogicalOp::Source { source, request } => Some(match &request.projection {
                Some(p) => Arc::new(source.schema().project(p)?),
                None => source.schema(),
            }),
            LogicalOp::Filter { input, .. }
            | LogicalOp::FilterFn { input, .. }
            | LogicalOp::Limit { input, .. }
            | LogicalOp::Exchange { input, .. }
            | LogicalOp::Write { input, .. } => input.schema(state)?,
            // DataFusion sorts and deduplicates them, over plain strings (see `scan` in
            // `relational.rs`).
            LogicalOp::Sort { input, .. } | LogicalOp::Distinct { input } => input
                .schema(state)?
                .map(|s| volley_connectors::plain_strings(&s)),
            LogicalOp::Aggregate { schema, .. } | LogicalOp::Join { schema, .. } => {
                Some(Arc::clone(schema))
            }
            LogicalOp::Split { output, .. } => Some(output.schema()),
            LogicalOp::MapBatches { .. } | LogicalOp::MapBatchesStateful { .. } => None,
            LogicalOp::Union { inputs } => {
                // Known for all: theirs as one. Otherwise the first's, where known (an
                // input whose columns a user transform decides must give them).
                let mut schemas = Vec::with_capacity(inputs.len());
                for i in inputs {
                    match i.schema(state)? {
                        Some(s) => schemas.push((schemas.len(), s)),
                        None => return inputs[0].schema(state),
                    }
                }
                Some(union_schema(&schemas)?)
            }
            LogicalOp::Select { input, .. }
            | LogicalOp::WithColumn { input, .. }
            | LogicalOp::Drop { input, .. }
            | LogicalOp::Rename { input, .. } => match input.schema(state)? {
                Some(s) => match self.projection(&s, false)? {
                    Some(exprs) => match Step::project(&exprs, &s, state)? {
                        Step::Project { schema, .. } => Some(schema),
                        _ => None,
                    },
                    None => None,
                },
                None => None,
            },
        })
    }

    /// For the column-shaping nodes, their output as `(expression, name)` pairs over an
    /// input of `schema`. Errors name unknown columns.
    ///
    /// When not `strict`, dropping or renaming a column that is not there is ignored:
    /// the optimizer may have pruned it (the user's plan was checked when built).
    pub(crate) fn projection(
        &self,
        schema: &SchemaRef,
        strict: bool,
    ) -> Result<Option<Vec<(Expr, String)>>> {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let unknown = |c: &str| {
            VolleyError::plan(format!(
                "no column named `{c}`; columns are: {}",
                names.join(", ")
            ))
        };
        Ok(Some(match self {
            LogicalOp::Select { exprs, .. } => {
                let mut out = Vec::new();
                for e in exprs {
                    for c in e.column_refs() {
                        if !names.contains(&c.name.as_str()) {
                            return Err(unknown(&c.name));
                        }
                    }
                    let name = match e {
                        Expr::Column(c) => c.name.clone(),
                        Expr::Alias(a) => a.name.clone(),
                        other => other.schema_name().to_string(),
                    };
                    let e = match e {
                        Expr::Alias(a) => (*a.expr).clone(),
                        other => other.clone(),
                    };
                    out.push((e, name));
                }
                out
            }
            LogicalOp::WithColumn { name, expr, .. } => {
                for c in expr.column_refs() {
                    if !names.contains(&c.name.as_str()) {
                        return Err(unknown(&c.name));
                    }
                }
                let mut out: Vec<(Expr, String)> =
                    names.iter().map(|n| (col(*n), n.to_string())).collect();
                match out.iter_mut().find(|(_, n)| n == name) {
                    Some(slot) => slot.0 = expr.clone(),
                    None => out.push((expr.clone(), name.clone())),
                }
                out
            }
            LogicalOp::Drop { columns, .. } => {
                for c in columns {
                    if strict && !names.contains(&c.as_str()) {
                        return Err(unknown(c));
                    }
                }
                names
                    .iter()
                    .filter(|n| !columns.iter().any(|c| c == *n))
                    .map(|n| (col(*n), n.to_string()))
                    .collect()
            }
            LogicalOp::Rename { pairs, .. } => {
                for (from, _) in pairs {
                    if strict && !names.contains(&from.as_str()) {
                        return Err(unknown(from));
                    }
                }
                names
                    .iter()
                    .map(|n| {
                        let to = pairs.iter().find(|(f, _)| f == n).map(|(_, t)| t.clone());
                        (col(*n), to.unwrap_or_else(|| n.to_string()))
                    })
                    .collect()
            }
            _ => return Ok(None),
        }))
    }

    /// The plan as `explain` shows it: each query source followed by the logical plan
    /// it stands for, as written or as optimized (`optimized`).
    pub(crate) fn explain(&self, optimized: bool) -> String {
        let mut s = String::new();
        self.fmt_indent(&mut s, 0, Some(optimized));
        s.trim_end().to_string()
    }

    /// The plan from this node down, indented by `indent`; with sources' logical
    /// detail where `detail` says which (as optimized or not).
    fn fmt_indent(&self, out: &mut String, indent: usize, detail: Option<bool>) {
        let pad = "  ".repeat(indent);
        let _ = match self {
            LogicalOp::Source { source, request } => {
                let mut extra = String::new();
                if let Some(p) = &request.projection {
                    let s = source.schema();
                    let cols: Vec<&str> = p.iter().map(|&i| s.field(i).name().as_str()).collect();
                    let _ = write!(extra, " projection=[{}]", cols.join(", "));
                }
                if !request.filters.is_empty() {
                    let f: Vec<String> = request.filters.iter().map(|e| e.to_string()).collect();
                    let _ = write!(extra, " filters=[{}]", f.join(", "));
                }
                if let Some(l) = request.limit {
                    let _ = write!(extra, " limit={l}");
                }
                let line = writeln!(out, "{pad}{}: {}{extra}", source.name(), source.describe());
                let lines = detail.and_then(|optimized| source.logical_detail(request, optimized));
                for l in lines.iter().flat_map(|d| d.lines()) {
                    let _ = writeln!(out, "{pad}  | {l}");
                }
                line
            }
            LogicalOp::Select { exprs, .. } => {
                let e: Vec<String> = exprs.iter().map(|e| e.to_string()).collect();
                writeln!(out, "{pad}Select: {}", e.join(", "))
            }
            LogicalOp::WithColumn { name, expr, .. } => {
                writeln!(out, "{pad}WithColumn: {name} = {expr}")
            }
            LogicalOp::Drop { columns, .. } => writeln!(out, "{pad}Drop: {}", columns.join(", ")),
            LogicalOp::Rename { pairs, .. } => {
                let p: Vec<String> = pairs.iter().map(|(a, b)| format!("{a} -> {b}")).collect();
                writeln!(out, "{pad}Rename: {}", p.join(", "))
            }
            LogicalOp::Filter { predicate, .. } => writeln!(out, "{pad}Filter: {predicate}"),
            LogicalOp::FilterFn { predicate, .. } => {
                writeln!(out, "{pad}Filter: fn {}", predicate.name())
            }
            LogicalOp::MapBatches { f, options, .. } => {
                writeln!(out, "{pad}MapBatches: {} {options}", f.name())
            }
            LogicalOp::MapBatchesStateful {
                factory, options, ..
            } => {
                writeln!(
                    out,
                    "{pad}MapBatches (stateful): {} {options}",
                    factory.name()
                )
            }
            LogicalOp::Limit { n, .. } => writeln!(out, "{pad}Limit: {n}"),
            LogicalOp::Union { inputs } => writeln!(out, "{pad}Union: {} inputs", inputs.len()),
            LogicalOp::Exchange { kind, .. } => writeln!(out, "{pad}Exchange: {}", kind.describe()),
            LogicalOp::Split { output, .. } => writeln!(out, "{pad}Split: {}", output.describe()),
            LogicalOp::Sort { keys, .. } => writeln!(out, "{pad}Sort: {}", sort_label(keys)),
            LogicalOp::Aggregate { keys, aggs, .. } => {
                writeln!(out, "{pad}Aggregate: {}", aggregate_label(keys, aggs))
            }
            LogicalOp::Distinct { .. } => writeln!(out, "{pad}Distinct"),
            LogicalOp::Write { spec, .. } => writeln!(out, "{pad}Write: {}", spec.label),
            LogicalOp::Join {
                left_on,
                right_on,
                how,
                ..
            } => writeln!(out, "{pad}Join: {}", join_label(left_on, right_on, *how)),
        };
        for i in self.inputs() {
            i.fmt_indent(out, indent + 1, detail);
        }
    }
}

impl fmt::Display for LogicalOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.fmt_indent(&mut s, 0, None);
        f.write_str(s.trim_end())
    }
}

/// A sort's keys, as `explain` shows them.
pub(crate) fn sort_label(keys: &[SortKey]) -> String {
    keys.iter()
        .map(|k| {
            format!(
                "{} {} nulls {}",
                k.expr,
                if k.descending { "desc" } else { "asc" },
                if k.nulls_first { "first" } else { "last" }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An aggregation, as `explain` shows it.
pub(crate) fn aggregate_label(keys: &[String], aggs: &[Expr]) -> String {
    format!(
        "group by [{}]: {}",
        keys.join(", "),
        aggs.iter()
            .map(|a| a.schema_name().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A join, as `explain` shows it.
pub(crate) fn join_label(left_on: &[String], right_on: &[String], how: JoinHow) -> String {
    format!(
        "{how} on {}",
        left_on
            .iter()
            .zip(right_on)
            .map(|(a, b)| if a == b {
                a.to_string()
            } else {
                format!("{a} = {b}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The tree API of the logical plan (DataFusion's): `apply` visits, `transform_up` /
/// `transform_down` rewrite, over every node's inputs.
impl TreeNode for LogicalOp {
    fn apply_children<'n, F: FnMut(&'n Self) -> DfResult<TreeNodeRecursion>>(
        &'n self,
        f: F,
    ) -> DfResult<TreeNodeRecursion> {
        self.inputs()
            .into_iter()
            .map(AsRef::as_ref)
            .apply_until_stop(f)
    }

    fn map_children<F: FnMut(Self) -> DfResult<Transformed<Self>>>(
        self,
        f: F,
    ) -> DfResult<Transformed<Self>> {
        let inputs: Vec<LogicalOp> = self
            .inputs()
            .into_iter()
            .map(|i| i.as_ref().clone())
            .collect();
        if inputs.is_empty() {
            return Ok(Transformed::no(self));
        }
        Ok(inputs
            .into_iter()
            .map_until_stop_and_collect(f)?
            .update_data(|new| self.with_inputs(new.into_iter().map(Arc::new).collect())))
    }
}

/// The schema of a union of inputs of `schemas`: the same column names in the same
/// order, of the same types once string and binary views count as their plain types.
/// A column is nullable where any input's is, and plain where the inputs' types
/// differ (as sorts and distincts give plain strings). Every input is made to give
/// exactly this schema ([`crate::planner`]): writers and concatenations need one.
///
/// `schemas` are the inputs', each with its place among the union's inputs (for
/// errors).
pub(crate) fn union_schema(schemas: &[(usize, SchemaRef)]) -> Result<SchemaRef> {
    union_schema_as(schemas, false)
}

/// The columns of `schemas` (each with its input's place), as one: an error naming the
/// first that differs from the first in any way (names, types, nullability). For a
/// union with an input whose columns are known only when it runs.
pub(crate) fn same_schemas(schemas: &[(usize, SchemaRef)]) -> Result<()> {
    union_schema_as(schemas, true).map(|_| ())
}

fn union_schema_as(schemas: &[(usize, SchemaRef)], exactly: bool) -> Result<SchemaRef> {
    let plain = |t: &DataType| match t {
        DataType::Utf8View => DataType::Utf8,
        DataType::BinaryView => DataType::Binary,
        other => other.clone(),
    };
    let columns = |s: &Schema| {
        s.fields()
            .iter()
            .map(|f| match f.is_nullable() {
                true => format!("{} {}", f.name(), f.data_type()),
                false => format!("{} {} not null", f.name(), f.data_type()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some((first_at, first)) = schemas.first() else {
        return Err(VolleyError::internal("a union of no inputs"));
    };
    let mut fields: Vec<Field> = first.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut changed = false;
    for (i, s) in schemas.iter().skip(1) {
        let same = s.fields().len() == fields.len()
            && s.fields()
                .iter()
                .zip(&fields)
                .all(|(a, b)| a.name() == b.name() && plain(a.data_type()) == plain(b.data_type()));
        if !same {
            return Err(VolleyError::plan(format!(
                "union: input {i} has columns [{}] but input {first_at} has [{}]",
                columns(s),
                columns(first)
            )));
        }
        if exactly && s.fields() != first.fields() {
            return Err(VolleyError::plan(format!(
                "union: input {i} has columns [{}] but input {first_at} has [{}] (their \
                 nullability, string views or field metadata differ, and another input's \
                 columns are known only when it runs, so they cannot be made one)",
                columns(s),
                columns(first)
            )));
        }
        for (f, a) in fields.iter_mut().zip(s.fields()) {
            if a.is_nullable() && !f.is_nullable() {
                *f = f.clone().with_nullable(true);
                changed = true;
            }
            if a.data_type() != f.data_type() {
                *f = f.clone().with_data_type(plain(f.data_type()));
                changed = true;
            }
        }
    }
    if !changed {
        return Ok(Arc::clone(first));
    }
    Ok(Arc::new(Schema::new_with_metadata(
        fields,
        first.metadata().clone(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use volley_exec::RangeSource;

    fn plan() -> LogicalOp {
        let range = LogicalOp::source(Arc::new(RangeSource::new(100, 2, 10)));
        let shuffled = Arc::new(LogicalOp::Exchange {
            input: range,
            kind: ExchangeKind::RandomShuffle { seed: 1, n: 4 },
        });
        LogicalOp::Limit {
            input: Arc::new(LogicalOp::Union {
                inputs: vec![Arc::clone(&shuffled), shuffled],
            }),
            n: 5,
        }
    }

    #[test]
    fn the_tree_api_visits_and_rewrites_every_node() {
        let mut names = Vec::new();
        plan()
            .apply(|op| {
                names.push(op.to_string().lines().next().unwrap_or("").to_string());
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
        assert_eq!(names.len(), 6, "{names:?}");
        assert!(names[0].starts_with("Limit: 5"), "{names:?}");
        assert!(names[2].starts_with("Exchange: random rows"), "{names:?}");

        // Every exchange of the plan becomes a repartition; nothing else changes.
        let rewritten = plan()
            .transform_up(|op| {
                Ok(match op {
                    LogicalOp::Exchange { input, .. } => Transformed::yes(LogicalOp::Exchange {
                        input,
                        kind: ExchangeKind::Repartition { n: 2 },
                    }),
                    other => Transformed::no(other),
                })
            })
            .unwrap();
        assert!(rewritten.transformed);
        let text = rewritten.data.to_string();
        assert_eq!(text.matches("Exchange: 2 partitions").count(), 2, "{text}");
        assert!(!text.contains("random"), "{text}");
        assert!(text.starts_with("Limit: 5"), "{text}");
        assert!(rewritten.data.needs_order());
    }
}
