//! The all-to-all operations on a cluster: what the sample, map and reduce tasks of an
//! exchange ([`ClusterExchangeExec`](volley_exec::ClusterExchangeExec)) do for each
//! operation.
//!
//! | operation | map tasks partition by | a reduce task (one partition) |
//! | --- | --- | --- |
//! | `sort` | ranges of the keys, boundaries from samples of every block (or of every read split, in a first pass reading the keys) | sorts it |
//! | `groupby().agg()`, `aggregate` | a hash of the keys (no keys: one partition), after a partial aggregation of each block | finishes the aggregation of its groups' states |
//! | `distinct`, `unique` | a hash of every column | keeps each row once |
//! | `join` | a hash of each side's keys (cast to a common type) | joins its two sides |
//! | `repartition_by` | a hash of the keys | its rows, in input order |
//! | `random_shuffle` | the seed and each row's position | its rows in a seeded order |
//! | `map_groups`' groups | a hash of the keys | one block per group |
//!
//! A reduce task runs the same local operator a single process runs (DataFusion's
//! external sort, spilling aggregation, hash join) over its partition, so each
//! partition's answer is the single-process answer for its rows; the partitioning
//! puts every row that must meet (equal keys, a key range) into one partition. A
//! seeded shuffle and `repartition_by` read their input in order and draw from the same
//! functions as the single-process exchange: the same rows in the same order.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array, UInt64Array};
use arrow::compute::{cast, concat_batches, take, take_record_batch, SortOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::row::{RowConverter, SortField};
use datafusion::common::hash_utils::{create_hashes, RandomState};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::{MemTable, MemorySourceConfig};
use datafusion::datasource::provider_as_source;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::context::SessionState;
use datafusion::execution::SessionStateBuilder;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::streaming::StreamingTableExec;
use datafusion::physical_plan::{ExecutionPlan, PhysicalExpr};
use serde::{Deserialize, Serialize};
use volley_common::{Result, VolleyError};
use volley_connectors::{DataSource, ReadTask, RemotePart, ScanRequest};
use volley_exec::{
    compile_expr, hash_partitions, partition_order, random_partitions, shuffle_partition,
    ExchangeWork, InputStreamPartition, InputStreamSource, MemorySource,
};
use volley_runtime::cluster::{EncodedTask, InputStream, RemoteTask, TaskContext};

use super::stage::{discard_part, expr_bytes, expr_from, write_part, ShippedOp};
use crate::context::Context;
use crate::dataset::Dataset;
use crate::exchange::groups;
use crate::logical::{ExchangeKind, LogicalOp};
use crate::options::{JoinHow, SortKey};
use crate::relational::GroupedDataset;

/// Key rows each block gives a sort's boundaries.
const SAMPLE_ROWS: usize = 128;

/// A sort key as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShippedKey {
    expr: Vec<u8>,
    descending: bool,
    nulls_first: bool,
}

impl ShippedKey {
    fn of(k: &SortKey) -> Result<Self> {
        Ok(Self {
            expr: expr_bytes(&k.expr)?,
            descending: k.descending,
            nulls_first: k.nulls_first,
        })
    }

    fn rebuild(&self, state: &SessionState) -> Result<SortKey> {
        Ok(SortKey {
            expr: expr_from(&self.expr, state)?,
            descending: self.descending,
            nulls_first: self.nulls_first,
        })
    }

    fn options(&self) -> SortOptions {
        SortOptions {
            descending: self.descending,
            nulls_first: self.nulls_first,
        }
    }
}

/// The sort keys of a task, compiled again only when a batch's schema differs from the
/// one before: the blocks of one input share theirs, so each key is rebuilt from its
/// bytes and planned once per task, not per batch.
struct KeyColumns<'a> {
    keys: &'a [ShippedKey],
    state: &'a SessionState,
    compiled: Option<(SchemaRef, Vec<Arc<dyn PhysicalExpr>>)>,
}

impl<'a> KeyColumns<'a> {
    fn new(keys: &'a [ShippedKey], state: &'a SessionState) -> Self {
        Self {
            keys,
            state,
            compiled: None,
        }
    }

    /// The values of the sort keys over `batch`.
    fn of(&mut self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        let schema = batch.schema();
        let exprs = match &self.compiled {
            Some((s, exprs)) if *s == schema => exprs,
            _ => {
                let exprs = self
                    .keys
                    .iter()
                    .map(|k| compile_expr(&k.rebuild(self.state)?.expr, &schema, self.state))
                    .collect::<Result<Vec<_>>>()?;
                &self.compiled.insert((schema, exprs)).1
            }
        };
        exprs
            .iter()
            .map(|e| Ok(e.evaluate(batch)?.into_array(batch.num_rows())?))
            .collect()
    }
}

/// Rows of key values that compare in the sort's order.
fn converter(keys: &[ShippedKey], columns: &[ArrayRef]) -> Result<RowConverter> {
    Ok(RowConverter::new(
        keys.iter()
            .zip(columns)
            .map(|(k, c)| SortField::new_with_options(c.data_type().clone(), k.options()))
            .collect(),
    )?)
}

fn batch_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut w = StreamWriter::try_new(Vec::new(), &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    Ok(w.into_inner()?)
}

pub(crate) fn schema_bytes(schema: &Schema) -> Result<Vec<u8>> {
    let mut w = StreamWriter::try_new(Vec::new(), schema)?;
    w.finish()?;
    Ok(w.into_inner()?)
}

/// The schema and batches of an IPC stream.
pub(crate) fn from_bytes(bytes: &[u8]) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// An aggregation in DataFusion's two halves, as the map and reduce tasks run it:
/// the partial aggregation of each block (its groups' states: sums, counts, the
/// parts of a mean) on the node holding the block, and the final aggregation of each
/// partition's states. Only the states cross the exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TwoPhase {
    keys: Vec<String>,
    aggs: Vec<Vec<u8>>,
    /// The rows' schema (an IPC stream without batches).
    schema: Vec<u8>,
}

impl TwoPhase {
    /// The partial and the final aggregation, planned over `batches` (DataFusion's
    /// planner makes a partial and a final aggregation; without its physical optimizer
    /// rules they stay apart, and with one target partition nothing is between them).
    fn halves(
        &self,
        ctx: &Context,
        batches: Vec<RecordBatch>,
    ) -> Result<(Arc<dyn ExecutionPlan>, Arc<AggregateExec>)> {
        let state = ctx.session_state();
        let (schema, _) = from_bytes(&self.schema)?;
        let aggs = self
            .aggs
            .iter()
            .map(|a| expr_from(a, state))
            .collect::<Result<Vec<Expr>>>()?;
        let mut config = state.config().clone();
        config.options_mut().execution.target_partitions = 1;
        let planner = SessionStateBuilder::new_from_existing(state.clone())
            .with_config(config)
            .with_physical_optimizer_rules(vec![])
            .build();
        // Over plain strings, as the aggregation of one process reads them (see `scan`
        // in `relational.rs`): its output's types are the plan's.
        let plain = volley_connectors::plain_strings(&schema);
        let batches = batches
            .into_iter()
            .map(plain_batch)
            .collect::<Result<Vec<_>>>()?;
        let table = MemTable::try_new(plain, vec![batches])?;
        let plan = LogicalPlanBuilder::scan("input", provider_as_source(Arc::new(table)), None)?
            .aggregate(self.keys.iter().map(|k| crate::col(k.as_str())), aggs)?
            .build()?;
        let physical = ctx
            .exec_context()
            .block_on(planner.create_physical_plan(&plan))?;
        let final_agg = find_aggregate(&physical, |m| {
            matches!(m, AggregateMode::Final | AggregateMode::FinalPartitioned)
        })
        .ok_or_else(|| VolleyError::internal("no final aggregation in the plan"))?;
        let partial = find_aggregate(&physical, |m| matches!(m, AggregateMode::Partial))
            .ok_or_else(|| VolleyError::internal("no partial aggregation in the plan"))?;
        let final_agg = final_agg
            .downcast_ref::<AggregateExec>()
            .map(|a| Arc::new(a.clone()))
            .ok_or_else(|| VolleyError::internal("the final aggregation"))?;
        Ok((partial, final_agg))
    }

    /// The groups' states of `batches` (a map task's block).
    fn partial(&self, ctx: &Context, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let (partial, _) = self.halves(ctx, batches)?;
        let task = ctx.session_state().task_ctx();
        Ok(ctx
            .exec_context()
            .block_on(datafusion::physical_plan::collect(partial, task))?)
    }

    /// The groups' states of each of `parts` (a block cut by its keys' hash, each part
    /// in pieces), planned once, and their schema. Each part takes the place of the
    /// plan's in-memory input with that input's schema and projection (the optimizer
    /// narrows the scan to the columns the aggregation reads).
    fn partial_each(
        &self,
        ctx: &Context,
        parts: Vec<Vec<RecordBatch>>,
    ) -> Result<(SchemaRef, Vec<Vec<RecordBatch>>)> {
        let (partial, _) = self.halves(ctx, vec![])?;
        let task = ctx.session_state().task_ctx();
        let states = parts
            .into_iter()
            .map(|pieces| {
                let Some(first) = pieces.first() else {
                    return Ok(vec![]);
                };
                let part = concat_batches(&first.schema(), &pieces)?;
                drop(pieces);
                let mut over_part = false;
                let plan = Arc::clone(&partial)
                    .transform_up(|node| {
                        let memory = node
                            .downcast_ref::<DataSourceExec>()
                            .and_then(|d| d.data_source().downcast_ref::<MemorySourceConfig>());
                        let Some(memory) = memory else {
                            return Ok(Transformed::no(node));
                        };
                        over_part = true;
                        let input: Arc<dyn ExecutionPlan> = MemorySourceConfig::try_new_exec(
                            &[vec![part.clone()]],
                            memory.original_schema(),
                            memory.projection().clone(),
                        )?;
                        Ok(Transformed::yes(input))
                    })?
                    .data;
                if !over_part {
                    // Another plan shape: planned for this part alone.
                    return self.partial(ctx, vec![part]);
                }
                Ok(ctx
                    .exec_context()
                    .block_on(datafusion::physical_plan::collect(plan, Arc::clone(&task)))?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((partial.schema(), states))
    }

    /// The aggregation of states (a reduce task's partition).
    fn finish(&self, ctx: &Context, states: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let (partial, final_agg) = self.halves(ctx, vec![])?;
        let input = MemorySourceConfig::try_new_exec(&[states], partial.schema(), None)?;
        self.finish_over(ctx, final_agg, input)
    }

    /// The aggregation of states read as they arrive: the final aggregation spills
    /// past the worker's budget instead of the states being held whole first.
    fn finish_streamed(&self, ctx: &Context, states: InputStream) -> Result<Vec<RecordBatch>> {
        let (partial, final_agg) = self.halves(ctx, vec![])?;
        let schema = partial.schema();
        let partition = Arc::new(InputStreamPartition::new(Arc::clone(&schema), states));
        let input = Arc::new(StreamingTableExec::try_new(
            schema,
            vec![partition],
            None,
            vec![],
            false,
            None,
        )?);
        self.finish_over(ctx, final_agg, input)
    }

    /// `final_agg` over `input` (the groups' states), run.
    fn finish_over(
        &self,
        ctx: &Context,
        final_agg: Arc<AggregateExec>,
        input: Arc<dyn ExecutionPlan>,
    ) -> Result<Vec<RecordBatch>> {
        let plan = final_agg.replace_children(
            vec![input],
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )?;
        let task = ctx.session_state().task_ctx();
        Ok(ctx
            .exec_context()
            .block_on(datafusion::physical_plan::collect(plan, task))?)
    }
}

/// `batch` with its view string columns cast to plain strings.
fn plain_batch(batch: RecordBatch) -> Result<RecordBatch> {
    let plain = volley_connectors::plain_strings(&batch.schema());
    if Arc::ptr_eq(&plain, &batch.schema()) {
        return Ok(batch);
    }
    let columns = batch
        .columns()
        .iter()
        .zip(plain.fields())
        .map(|(c, f)| Ok(cast(c, f.data_type())?))
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(plain, columns)?)
}

/// The first aggregation (from the root down) whose mode passes `mode`.
fn find_aggregate(
    plan: &Arc<dyn ExecutionPlan>,
    mode: impl Fn(&AggregateMode) -> bool + Copy,
) -> Option<Arc<dyn ExecutionPlan>> {
    if let Some(a) = plan.downcast_ref::<AggregateExec>() {
        if mode(a.mode()) {
            return Some(Arc::clone(plan));
        }
    }
    plan.children()
        .into_iter()
        .find_map(|c| find_aggregate(c, mode))
}

/// How a map task sends each row to a partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Partitioner {
    /// A hash of the key columns (`None`: every column; no keys: all rows to
    /// partition 0), each cast to its type in `casts` first where one is given (a
    /// join's two sides must hash equal keys of different types alike).
    Hash {
        keys: Option<Vec<String>>,
        casts: Vec<Option<String>>,
        /// A row with a null key goes to any partition (round robin), not to its
        /// hash's: a join's, which meets no other row. (Every null key hashes alike:
        /// one partition would take them all.)
        nulls_anywhere: bool,
    },
    /// The seed and each row's position in the input (rows `first_row..`).
    Random { seed: u64, first_row: u64 },
    /// Each row's position in the input (rows `first_row..` of `rows`): partition `p`
    /// takes rows `rows * p / n .. rows * (p + 1) / n`, as the local `repartition(n)`.
    Positions { first_row: u64, rows: u64 },
    /// Ranges of the sort keys: `bounds` is an IPC stream of one batch of boundary
    /// key rows, in order.
    Range {
        keys: Vec<ShippedKey>,
        bounds: Vec<u8>,
    },
}

/// The place among `width` of a row whose whole-row hash is `h`: by the hash, each
/// further row of that hash (`seen` counts them) in the next place, so that equal rows
/// spread and any order of the same rows makes the same places.
fn deal(seen: &mut HashMap<u64, u64>, h: u64, width: usize) -> usize {
    let turn = seen.entry(h).or_insert(0);
    let place = (h.wrapping_add(*turn) % width.max(1) as u64) as usize;
    *turn += 1;
    place
}

/// A hash of each row of `batch`, all its columns (a column DataFusion cannot hash is
/// left out), the same in every process.
fn row_hashes(batch: &RecordBatch) -> Result<Vec<u64>> {
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .filter(|c| {
            let mut probe = vec![0; c.len().min(1)];
            create_hashes(
                &[c.slice(0, c.len().min(1))],
                &RandomState::default(),
                &mut probe,
            )
            .is_ok()
        })
        .cloned()
        .collect();
    let mut hashes = vec![0; batch.num_rows()];
    if !columns.is_empty() {
        create_hashes(&columns, &RandomState::default(), &mut hashes)?;
    }
    Ok(hashes)
}

/// The partition of row `i` of `rows` among `n` of (nearly) equal row counts:
/// partition `p` holds rows `rows * p / n .. rows * (p + 1) / n`.
fn position_partition(i: u64, rows: u64, n: usize) -> usize {
    let n = n.max(1);
    if rows == 0 {
        return 0;
    }
    // The largest p with rows * p / n <= i (integer division, as the local runner).
    let p = ((u128::from(i) + 1) * n as u128).div_ceil(u128::from(rows)) - 1;
    (p as usize).min(n - 1)
}

/// A map task: its input block, cut into one batch per partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeMapTask {
    partitions: usize,
    partitioner: Partitioner,
    /// For an aggregation: the block becomes its groups' states first.
    partial: Option<TwoPhase>,
    /// The rows its input must have, where a stage below runs it knowing its first
    /// row (see [`at_rows`](Self::at_rows)).
    #[serde(default)]
    rows: Option<u64>,
}

impl ExchangeMapTask {
    /// Whether a row's partition follows from its position in the input (a seeded
    /// shuffle): a stage below can run the map only where it knows each task's first
    /// row.
    pub(crate) fn places_by_position(&self) -> bool {
        matches!(self.partitioner, Partitioner::Random { .. })
    }

    /// The map of a task whose rows are rows `first_row..first_row + rows` of the
    /// input (counted at planning): given another count (a file changed since), it
    /// fails rather than place rows where another run would not.
    pub(crate) fn at_rows(&self, first_row: u64, rows: u64) -> Self {
        let mut map = self.clone();
        if let Partitioner::Random {
            first_row: first, ..
        } = &mut map.partitioner
        {
            *first = first_row;
        }
        map.rows = Some(rows);
        map
    }

    /// The partition of each row of each batch.
    fn route(&self, batches: &[RecordBatch]) -> Result<Vec<Vec<usize>>> {
        self.route_into(batches, self.partitions)
    }

    /// The partition of each row of each batch among `n`. A hash partitioner places a
    /// row in `hash % n`: with `n` a multiple of the exchange's partitions, part `b`
    /// falls whole into partition `b % partitions`.
    fn route_into(&self, batches: &[RecordBatch], n: usize) -> Result<Vec<Vec<usize>>> {
        match &self.partitioner {
            Partitioner::Hash {
                keys,
                casts,
                nulls_anywhere,
            } => {
                let mut hashes = Vec::new();
                // How many rows of each whole-row hash were placed: equal rows take
                // turns, and being equal, any order of them places the same rows.
                let mut seen: HashMap<u64, u64> = HashMap::new();
                batches
                    .iter()
                    .map(|b| {
                        let schema = b.schema();
                        let names: Vec<String> = match keys {
                            Some(k) => k.clone(),
                            None => schema.fields().iter().map(|f| f.name().clone()).collect(),
                        };
                        if names.is_empty() {
                            return Ok(vec![0; b.num_rows()]);
                        }
                        let cols = names
                            .iter()
                            .enumerate()
                            .map(|(i, k)| {
                                let idx = schema.index_of(k).map_err(|_| {
                                    VolleyError::unknown_column("exchange key", k, &schema)
                                })?;
                                let col = Arc::clone(b.column(idx));
                                match casts.get(i).and_then(Option::as_ref) {
                                    Some(t) => {
                                        let t = DataType::from_str(t)?;
                                        Ok(cast(&col, &t)?)
                                    }
                                    None => Ok(col),
                                }
                            })
                            .collect::<Result<Vec<_>>>()?;
                        let mut targets = hash_partitions(&cols, n, &mut hashes)?;
                        if *nulls_anywhere && cols.iter().any(|c| c.null_count() > 0) {
                            // By a hash of the whole row: a map task run again over the
                            // same rows puts each where it did, whatever their order.
                            let nulls: Vec<u32> = (0..b.num_rows())
                                .filter(|&row| cols.iter().any(|c| c.is_null(row)))
                                .map(|row| row as u32)
                                .collect();
                            // (Only those rows hashed whole.)
                            let rows = take_record_batch(b, &UInt32Array::from(nulls.clone()))?;
                            for (row, h) in nulls.into_iter().zip(row_hashes(&rows)?) {
                                targets[row as usize] = deal(&mut seen, h, n);
                            }
                        }
                        Ok(targets)
                    })
                    .collect()
            }
            Partitioner::Random { seed, first_row } => {
                let mut first = *first_row;
                Ok(batches
                    .iter()
                    .map(|b| {
                        let t = random_partitions(*seed, n, first, b.num_rows());
                        first += b.num_rows() as u64;
                        t
                    })
                    .collect())
            }
            Partitioner::Positions { first_row, rows } => {
                let mut first = *first_row;
                Ok(batches
                    .iter()
                    .map(|b| {
                        let t = (first..first + b.num_rows() as u64)
                            .map(|i| position_partition(i, *rows, n))
                            .collect();
                        first += b.num_rows() as u64;
                        t
                    })
                    .collect())
            }
            Partitioner::Range { keys, bounds } => {
                let ctx = Context::global()?;
                let state = ctx.session_state();
                // No boundaries (one partition, or no samples: `prepare` encodes
                // nothing when no block had rows): all in partition 0.
                let bounds = match bounds.is_empty() {
                    true => vec![],
                    false => from_bytes(bounds)?.1,
                };
                let bounds = match bounds.into_iter().next() {
                    Some(b) if b.num_rows() > 0 => b,
                    _ => return Ok(batches.iter().map(|b| vec![0; b.num_rows()]).collect()),
                };
                let bound_cols: Vec<ArrayRef> = bounds.columns().to_vec();
                let conv = converter(keys, &bound_cols)?;
                let bound_rows = conv.convert_columns(&bound_cols)?;
                let bound_rows: Vec<_> = bound_rows.iter().collect();
                let mut key_columns = KeyColumns::new(keys, state);
                let mut seen: HashMap<u64, u64> = HashMap::new();
                // Rows whose key equals a boundary may go to any partition from the
                // first such boundary's to the one after the last (those between hold
                // nothing else): spread over them by a hash of the whole row (the same
                // wherever and in whatever order a map task runs again), a key that
                // fills several partitions' worth of rows is not all held by one reduce.
                batches
                    .iter()
                    .map(|b| {
                        let cols = key_columns.of(b)?;
                        // The key types of the samples and of every block agree: the
                        // same expressions over the same schema.
                        let cols = cols
                            .iter()
                            .zip(&bound_cols)
                            .map(|(c, b)| Ok(cast(c, b.data_type())?))
                            .collect::<Result<Vec<_>>>()?;
                        let rows = conv.convert_columns(&cols)?;
                        let mut whole: Option<Vec<u64>> = None;
                        rows.iter()
                            .enumerate()
                            .map(|(i, r)| {
                                let after = bound_rows.partition_point(|b| *b <= r);
                                let p = if after > 0 && bound_rows[after - 1] == r {
                                    let first = bound_rows.partition_point(|b| *b < r);
                                    let whole = match &mut whole {
                                        Some(w) => w,
                                        None => whole.insert(row_hashes(b)?),
                                    };
                                    first + deal(&mut seen, whole[i], after - first + 1)
                                } else {
                                    after
                                };
                                Ok(p.min(n - 1))
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }
}

impl ExchangeMapTask {
    /// `batches` (one block) as a map output: batch `p` holds partition `p`.
    pub(crate) fn partition(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        if let Some(planned) = self.rows {
            let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
            if rows as u64 != planned {
                return Err(VolleyError::execution(format!(
                    "read {rows} rows where planning counted {planned} from the files' \
                     footers: the files changed after the execution was planned"
                )));
            }
        }
        let n = self.partitions.max(1);
        if let (Some(two), false) = (&self.partial, batches.is_empty()) {
            let ctx = Context::global()?;
            let batches = batches
                .into_iter()
                .map(plain_batch)
                .collect::<Result<Vec<_>>>()?;
            if !self.many_groups(&batches)? {
                let states = two.partial(&ctx, batches)?;
                let routes = self.route(&states)?;
                return batches_per_partition(states, &routes, n);
            }
            // Many groups: a hash table of them all outgrows the CPU's caches, and
            // each row's lookup waits on memory. The rows go by their keys' hash into
            // parts of a few groups each, each part is aggregated on its own, and a
            // part's states all belong to one partition.
            let parts = n * RADIX_PARTS.div_ceil(n);
            let routes = self.route_into(&batches, parts)?;
            let pieces = pieces_per_partition(batches, &routes, parts)?;
            let (schema, states) = two.partial_each(&ctx, pieces)?;
            return (0..n)
                .map(|p| {
                    let mine: Vec<&RecordBatch> =
                        states.iter().skip(p).step_by(n).flatten().collect();
                    Ok(concat_batches(&schema, mine)?)
                })
                .collect();
        }
        let routes = self.route(&batches)?;
        batches_per_partition(batches, &routes, n)
    }

    /// Whether an aggregation's block has groups enough that aggregating it in parts
    /// pays: at least [`RADIX_MIN_GROUPS`] distinct key hashes among its first
    /// [`RADIX_PROBE_ROWS`] rows. Only a hash exchange (an aggregation's) is cut.
    fn many_groups(&self, batches: &[RecordBatch]) -> Result<bool> {
        let Partitioner::Hash {
            keys: Some(keys), ..
        } = &self.partitioner
        else {
            return Ok(false);
        };
        if keys.is_empty() {
            return Ok(false);
        }
        let mut seen = std::collections::HashSet::new();
        let (mut rows, mut hashes) = (0, Vec::new());
        for b in batches {
            if rows >= RADIX_PROBE_ROWS {
                break;
            }
            let b = b.slice(0, b.num_rows().min(RADIX_PROBE_ROWS - rows));
            rows += b.num_rows();
            let cols =
                keys.iter()
                    .map(|k| {
                        let idx = b.schema().index_of(k).map_err(|_| {
                            VolleyError::unknown_column("exchange key", k, &b.schema())
                        })?;
                        Ok(Arc::clone(b.column(idx)))
                    })
                    .collect::<Result<Vec<_>>>()?;
            hashes.clear();
            hashes.resize(b.num_rows(), 0);
            create_hashes(&cols, &RandomState::default(), &mut hashes)?;
            seen.extend(hashes.iter().copied());
            if seen.len() >= RADIX_MIN_GROUPS {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Distinct groups, among a map block's first [`RADIX_PROBE_ROWS`] rows, from which
/// its partial aggregation runs in [`RADIX_PARTS`] parts: a table of this many groups
/// and their states no longer fits a core's L2 cache.
const RADIX_MIN_GROUPS: usize = 8192;
const RADIX_PROBE_ROWS: usize = 65_536;
/// Parts (rounded up to a multiple of the partitions) a block of many groups is
/// aggregated in.
const RADIX_PARTS: usize = 64;

#[typetag::serde(name = "volley::ExchangeMapTask")]
impl RemoteTask for ExchangeMapTask {
    fn run(&self, _: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        self.partition(inputs.into_iter().flatten().collect())
    }
}

/// `batches` cut into exactly one batch per partition (maybe empty), row `r` of batch
/// `b` into partition `routes[b][r]`, in input order: reduce task `p` reads batch `p`.
/// No batches make no partitions (readers of a batch of them get none).
///
/// Each input batch is put in partition order in one `take` and the partitions'
/// pieces are concatenated: each value is copied twice, but each copy reads memory in
/// order or within one batch. A gather of each partition from all of `batches` at
/// once copied once, but waited on memory for nearly every row of a large block. View
/// columns' strings are copied once, at the end: a partition's own buffers, as the
/// object's file would otherwise hold every row's strings once per partition.
pub(crate) fn batches_per_partition(
    batches: Vec<RecordBatch>,
    routes: &[Vec<usize>],
    n: usize,
) -> Result<Vec<RecordBatch>> {
    let Some(schema) = batches.first().map(RecordBatch::schema) else {
        return Ok(vec![]);
    };
    pieces_per_partition(batches, routes, n)?
        .into_iter()
        .map(|pieces| match pieces.len() {
            0 => Ok(RecordBatch::new_empty(Arc::clone(&schema))),
            _ => volley_common::compact_views(concat_batches(&schema, &pieces)?),
        })
        .collect()
}

/// Each partition's rows of `batches` as pieces, in input order: each batch is put in
/// partition order in one `take` (its rows stay in the CPU's cache, where a gather
/// across all the batches at once would wait on memory for each row) and let go, and
/// each partition gets its slice of it. A view column's strings stay in the input's
/// buffers (a `take` copies the views) until the caller copies them.
fn pieces_per_partition(
    batches: Vec<RecordBatch>,
    routes: &[Vec<usize>],
    n: usize,
) -> Result<Vec<Vec<RecordBatch>>> {
    let mut pieces: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
    for (batch, targets) in batches.into_iter().zip(routes) {
        let (order, starts) = partition_order(targets, n);
        let grouped = take_record_batch(&batch, &order)?;
        drop(batch);
        for (p, piece) in pieces.iter_mut().enumerate() {
            if starts[p + 1] > starts[p] {
                piece.push(grouped.slice(starts[p], starts[p + 1] - starts[p]));
            }
        }
    }
    Ok(pieces)
}

/// A sample task: up to [`SAMPLE_ROWS`] key rows of its block, evenly spaced, each
/// with the rows of the block it stands for (its `weight`, the last column).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeSampleTask {
    keys: Vec<ShippedKey>,
}

#[typetag::serde(name = "volley::ExchangeSampleTask")]
impl RemoteTask for ExchangeSampleTask {
    fn run(&self, _: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        self.sample(inputs.into_iter().flatten().collect())
    }
}

impl ExchangeSampleTask {
    /// The sample of `batches` (one block's rows): key columns, then each row's weight.
    pub(crate) fn sample(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let ctx = Context::global()?;
        let state = ctx.session_state();
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if total == 0 {
            return Ok(vec![]);
        }
        let step = total.div_ceil(SAMPLE_ROWS).max(1);
        let mut key_columns = KeyColumns::new(&self.keys, state);
        let mut out = Vec::new();
        let mut offset = 0;
        for b in &batches {
            // Rows offset.. of the whole block that fall on the step.
            let first = (step - offset % step) % step;
            let picks: Vec<u32> = (first..b.num_rows())
                .step_by(step)
                .map(|i| i as u32)
                .collect();
            offset += b.num_rows();
            if picks.is_empty() {
                continue;
            }
            let weights = UInt64Array::from(vec![step as u64; picks.len()]);
            let idx = UInt32Array::from(picks);
            let mut cols = key_columns
                .of(b)?
                .iter()
                .map(|c| Ok(take(c, &idx, None)?))
                .collect::<Result<Vec<_>>>()?;
            cols.push(Arc::new(weights));
            out.push(key_batch(cols)?);
        }
        Ok(out)
    }
}

/// Key columns as a batch (`k0`, `k1`, ...).
fn key_batch(cols: Vec<ArrayRef>) -> Result<RecordBatch> {
    let fields: Vec<Field> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| Field::new(format!("k{i}"), c.data_type().clone(), true))
        .collect();
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// What a reduce task makes of its partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Combine {
    /// Its rows, in input order.
    Concat,
    /// Its rows in the seeded order.
    Shuffle {
        seed: u64,
    },
    /// One block per group of equal keys.
    Groups {
        keys: Vec<String>,
    },
    Sort {
        keys: Vec<ShippedKey>,
    },
    Aggregate {
        keys: Vec<String>,
        aggs: Vec<Vec<u8>>,
    },
    /// The final aggregation of the groups' states the map tasks made.
    FinishAggregate(TwoPhase),
    Distinct,
    Join {
        left_on: Vec<String>,
        right_on: Vec<String>,
        how: JoinHow,
    },
}

/// One input's rows in a reduce task, and their schema.
type Side = (SchemaRef, Vec<RecordBatch>);

/// A reduce task: its partition of every map output (input 0's, then input 1's).
#[derive(Debug, Serialize, Deserialize)]
pub struct ExchangeReduceTask {
    partition: usize,
    /// Map outputs per input.
    sides: Vec<usize>,
    /// Each input's schema (an IPC stream without batches), where the plan knows it.
    schemas: Vec<Option<Vec<u8>>>,
    combine: Combine,
    /// Where it writes its output (the exchange is a write's input): its result is
    /// then what it staged.
    #[serde(default)]
    write: Option<RemotePart>,
    /// The row-local steps after the exchange, run on its output in the same task.
    #[serde(default)]
    then: Vec<ShippedOp>,
    /// The map work of the exchange above, run last: the task's object is then one of
    /// that exchange's map outputs.
    #[serde(default)]
    map: Option<ExchangeMapTask>,
}

/// A reduce task's output: its batches, or a dataset of this process that makes them.
enum Reduced {
    Batches(Vec<RecordBatch>),
    Dataset(Dataset),
}

impl ExchangeReduceTask {
    /// Each input's rows and schema (`None`: no rows and no known schema).
    fn sides(&self, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<Option<Side>>> {
        let mut inputs = inputs.into_iter();
        self.sides
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let batches: Vec<RecordBatch> = inputs.by_ref().take(n).flatten().collect();
                let schema = match (
                    batches.first(),
                    self.schemas.get(i).and_then(Option::as_ref),
                ) {
                    (Some(b), _) => b.schema(),
                    (None, Some(bytes)) => from_bytes(bytes)?.0,
                    (None, None) => return Ok(None),
                };
                Ok(Some((schema, batches)))
            })
            .collect()
    }
}

fn dataset(ctx: &Context, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Dataset> {
    Ok(ctx.source(Arc::new(MemorySource::with_schema(schema, batches)?)))
}

/// A join side a reduce task holds, which DataFusion scans as a table of its own
/// (`MemTable`): the join then knows its size, and with both sides held builds its
/// hash table from the smaller one.
#[derive(Debug)]
struct HeldSide {
    rows: MemorySource,
}

impl HeldSide {
    fn dataset(ctx: &Context, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Dataset> {
        let rows = MemorySource::with_schema(schema, batches)?;
        Ok(ctx.source(Arc::new(Self { rows })))
    }
}

#[async_trait::async_trait]
impl DataSource for HeldSide {
    fn name(&self) -> String {
        "TaskInputs".into()
    }

    fn schema(&self) -> SchemaRef {
        self.rows.schema()
    }

    fn describe(&self) -> String {
        "the task's input objects, held".into()
    }

    fn logical_plan(&self) -> Option<LogicalPlan> {
        let schema = self.rows.schema();
        let table =
            MemTable::try_new(Arc::clone(&schema), vec![self.rows.batches().to_vec()]).ok()?;
        let scan = LogicalPlanBuilder::scan("held", provider_as_source(Arc::new(table)), None);
        // Plain strings, as every scan of a relational operator (see `scan` in
        // `relational.rs`).
        scan.and_then(|b| volley_connectors::cast_to_plain_strings(b, &schema))
            .and_then(LogicalPlanBuilder::build)
            .ok()
    }

    async fn plan(&self, state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        self.rows.plan(state, request).await
    }
}

#[typetag::serde(name = "volley::ExchangeReduceTask")]
impl RemoteTask for ExchangeReduceTask {
    fn run(&self, task: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let reduced = self.reduce(inputs)?;
        self.output(task, reduced)
    }

    /// A sort, aggregation or distinct takes its partition as the worker reads it: the
    /// operator spills past the worker's memory budget, so a partition larger than that
    /// memory (a skewed key, few partitions) is not held whole. A join holds its left
    /// side's partition and takes its right side's as it is read, holding it too only
    /// while it is at most half the left's (see `reduce_streamed`).
    fn streams_inputs(&self) -> bool {
        match self.combine {
            Combine::Sort { .. }
            | Combine::Aggregate { .. }
            | Combine::FinishAggregate(_)
            | Combine::Distinct => self.sides.len() == 1,
            Combine::Join { .. } => self.sides.len() == 2,
            Combine::Concat | Combine::Shuffle { .. } | Combine::Groups { .. } => false,
        }
    }

    fn run_streamed(&self, task: &TaskContext, inputs: InputStream) -> Result<Vec<RecordBatch>> {
        let reduced = self.reduce_streamed(inputs)?;
        self.output(task, reduced)
    }

    /// A write stages files; the worker waits to learn whether to keep them.
    fn leaves_side_effects(&self) -> bool {
        self.write.is_some()
    }

    /// A superseded attempt removes what it staged.
    fn discard(&self, task: &TaskContext) {
        if let Some(part) = &self.write {
            discard_part(part, task, "a reduce task's write");
        }
    }
}

impl ExchangeReduceTask {
    /// What the task hands on of its partition's `reduced` rows: the steps after the
    /// exchange run on them, then they are written, or returned.
    fn output(&self, task: &TaskContext, mut reduced: Reduced) -> Result<Vec<RecordBatch>> {
        if !self.then.is_empty() {
            reduced = self.then(reduced)?;
        }
        if let Some(map) = &self.map {
            let batches = match reduced {
                Reduced::Batches(b) => b,
                Reduced::Dataset(ds) => ds.ordered_batches()?.collect::<Result<_>>()?,
            };
            return map.partition(batches);
        }
        match (&self.write, reduced) {
            (None, Reduced::Batches(b)) => Ok(b),
            // In the order the local operator makes it (a sorted partition, then the
            // steps after the exchange, keeps its order).
            (None, Reduced::Dataset(ds)) => ds.ordered_batches()?.collect(),
            (Some(part), Reduced::Batches(b)) => write_part(part, task, b.into_iter().map(Ok)),
            // Written as the local operator makes it (a sorted partition, in order).
            (Some(part), Reduced::Dataset(ds)) => write_part(part, task, ds.ordered_batches()?),
        }
    }

    /// [`Self::reduce`] of a partition read as it arrives (see
    /// [`RemoteTask::streams_inputs`]).
    fn reduce_streamed(&self, mut inputs: InputStream) -> Result<Reduced> {
        let ctx = Context::global()?;
        if let Combine::FinishAggregate(two) = &self.combine {
            return two.finish_streamed(&ctx, inputs).map(Reduced::Batches);
        }
        if let Combine::Join { .. } = &self.combine {
            // The left side whole, then the right side: held too while it is at most
            // half the left, so that the join knows both sizes and builds its hash
            // table from the smaller one (at most half again the left's memory is held
            // for it); else the rest of it as it is read, the table built from the
            // left side.
            let mut left = Vec::new();
            for _ in 0..self.sides[0] {
                match inputs.next_blocking() {
                    Some(input) => left.extend(input?),
                    None => break,
                }
            }
            let left_schema = match (left.first(), self.schema_of(0)?) {
                (Some(b), _) => b.schema(),
                (None, Some(schema)) => schema,
                (None, None) => return Ok(Reduced::Batches(vec![])),
            };
            let Some((right_schema, mut first)) = self.first_rows(1, &mut inputs)? else {
                return Err(VolleyError::internal(
                    "a join's reduce task has no schema for its right input",
                ));
            };
            let left_bytes = volley_common::batches_memory(&left);
            let mut right_bytes = volley_common::batches_memory(&first);
            let mut ended = false;
            while right_bytes <= left_bytes / 2 {
                match inputs.next_blocking() {
                    Some(input) => {
                        let input = input?;
                        right_bytes += volley_common::batches_memory(&input);
                        first.extend(input);
                    }
                    None => {
                        ended = true;
                        break;
                    }
                }
            }
            let right = match ended {
                true => HeldSide::dataset(&ctx, right_schema, first)?,
                false => ctx.source(Arc::new(InputStreamSource::new(
                    right_schema,
                    first,
                    inputs,
                ))),
            };
            let left = match ended {
                true => HeldSide::dataset(&ctx, left_schema, left)?,
                false => self::dataset(&ctx, left_schema, left)?,
            };
            return self.operate(left, Some(right));
        }
        let Some((schema, first)) = self.first_rows(0, &mut inputs)? else {
            return Ok(Reduced::Batches(vec![]));
        };
        let input = ctx.source(Arc::new(InputStreamSource::new(schema, first, inputs)));
        self.operate(input, None)
    }

    /// Input `side`'s schema as the plan knows it.
    fn schema_of(&self, side: usize) -> Result<Option<SchemaRef>> {
        self.schemas
            .get(side)
            .and_then(Option::as_ref)
            .map(|bytes| Ok(from_bytes(bytes)?.0))
            .transpose()
    }

    /// The schema of input `side` (whose objects come next in `inputs`), and the
    /// batches read to learn it: the first batch's schema (with rows or not), as a
    /// reduce task that holds its inputs takes it, else the plan's; `None` when neither
    /// is known.
    fn first_rows(
        &self,
        side: usize,
        inputs: &mut InputStream,
    ) -> Result<Option<(SchemaRef, Vec<RecordBatch>)>> {
        while let Some(input) = inputs.next_blocking() {
            let input = input?;
            if let Some(b) = input.first() {
                return Ok(Some((b.schema(), input)));
            }
        }
        Ok(self.schema_of(side)?.map(|schema| (schema, vec![])))
    }

    /// The steps after the exchange over its output (no rows: none come out).
    fn then(&self, reduced: Reduced) -> Result<Reduced> {
        let ctx = Context::global()?;
        let mut op = match reduced {
            Reduced::Batches(b) if b.is_empty() => return Ok(Reduced::Batches(b)),
            Reduced::Batches(b) => LogicalOp::source(Arc::new(MemorySource::try_new(b)?)),
            Reduced::Dataset(ds) => Arc::clone(ds.logical()),
        };
        for s in &self.then {
            op = Arc::new(s.rebuild(op, ctx.session_state())?);
        }
        Ok(Reduced::Dataset(Dataset::new(ctx, op)))
    }

    fn reduce(&self, inputs: Vec<Vec<RecordBatch>>) -> Result<Reduced> {
        use Reduced::Batches;
        let ctx = Context::global()?;
        if let Combine::FinishAggregate(two) = &self.combine {
            // States, not rows: the input's schema does not apply.
            let states = inputs.into_iter().flatten().collect();
            return two.finish(&ctx, states).map(Batches);
        }
        let mut sides = self.sides(inputs)?;
        let Some((schema, batches)) = sides.first_mut().and_then(Option::take) else {
            return Ok(Batches(vec![]));
        };
        let non_empty = |b: Vec<RecordBatch>| b.into_iter().filter(|b| b.num_rows() > 0).collect();
        match &self.combine {
            Combine::Concat => Ok(Batches(non_empty(batches))),
            Combine::Shuffle { seed } => {
                let batches: Vec<RecordBatch> = non_empty(batches);
                if batches.is_empty() {
                    return Ok(Batches(vec![]));
                }
                Ok(Batches(vec![shuffle_partition(
                    &schema,
                    &batches,
                    *seed,
                    self.partition,
                )?]))
            }
            Combine::Groups { keys } => {
                let all = concat_batches(&schema, &batches)?;
                let idx = keys
                    .iter()
                    .map(|k| {
                        schema
                            .index_of(k)
                            .map_err(|_| VolleyError::unknown_column("group key", k, &schema))
                    })
                    .collect::<Result<Vec<_>>>()?;
                groups(&all, &idx).map(Batches)
            }
            Combine::FinishAggregate(_) => unreachable!("finished above"),
            Combine::Join { .. } => {
                let Some((right_schema, right)) = sides.get_mut(1).and_then(Option::take) else {
                    return Err(VolleyError::internal(
                        "a join's reduce task has no schema for its right input",
                    ));
                };
                let right = self::dataset(&ctx, right_schema, right)?;
                self.operate(self::dataset(&ctx, schema, batches)?, Some(right))
            }
            Combine::Sort { .. } | Combine::Aggregate { .. } | Combine::Distinct => {
                self.operate(self::dataset(&ctx, schema, batches)?, None)
            }
        }
    }

    /// The single-process operator of a sort, aggregation, distinct or join over its
    /// partition's rows (a join's right side in `right`), held or read as they come.
    fn operate(&self, input: Dataset, right: Option<Dataset>) -> Result<Reduced> {
        let ctx = input.context().clone();
        let state = ctx.session_state();
        Ok(Reduced::Dataset(match (&self.combine, right) {
            (Combine::Sort { keys }, None) => input.sort(
                keys.iter()
                    .map(|k| k.rebuild(state))
                    .collect::<Result<Vec<_>>>()?,
            )?,
            (Combine::Aggregate { keys, aggs }, None) => GroupedDataset {
                dataset: input,
                keys: keys.clone(),
            }
            .agg(
                aggs.iter()
                    .map(|a| expr_from(a, state))
                    .collect::<Result<Vec<_>>>()?,
            )?,
            (Combine::Distinct, None) => input.distinct()?,
            (
                Combine::Join {
                    left_on,
                    right_on,
                    how,
                },
                Some(right),
            ) => {
                let l: Vec<&str> = left_on.iter().map(String::as_str).collect();
                let r: Vec<&str> = right_on.iter().map(String::as_str).collect();
                input.join_on(&right, &l, &r, *how)?
            }
            _ => {
                return Err(VolleyError::internal(
                    "this reduce task runs no operator over datasets",
                ))
            }
        }))
    }
}

/// How the map tasks of one exchange partition.
#[derive(Debug, Clone)]
enum MapPlan {
    /// Per input: its key columns (`None`: every column), and the casts of each key.
    Hash {
        keys: Vec<Option<Vec<String>>>,
        casts: Vec<Option<String>>,
        /// A join's: rows with a null key meet nothing, so go anywhere.
        nulls_anywhere: bool,
    },
    Random {
        seed: u64,
    },
    /// By row position, once the input's rows are counted.
    Positions,
    /// No map tasks: the input blocks are handed on whole, in a seeded order.
    BlockOrder {
        seed: u64,
    },
    Range {
        keys: Vec<ShippedKey>,
    },
}

/// The tasks of one exchange on a cluster.
#[derive(Debug, Clone)]
pub(crate) struct DatasetExchange {
    partitions: usize,
    map: MapPlan,
    /// An aggregation's partial half, run by the map tasks.
    partial: Option<TwoPhase>,
    combine: Combine,
    schemas: Vec<Option<Vec<u8>>>,
    in_order: bool,
    /// A join that may broadcast its right side: at most this many bytes of it.
    broadcast: Option<u64>,
    /// The write its reduce (or broadcast) tasks make of their output, when the
    /// exchange is a write's input.
    write: Option<RemotePart>,
    /// The row-local steps its reduce (or broadcast) tasks run on their output.
    then: Vec<ShippedOp>,
    /// The map work of the exchange above, run by its reduce (or broadcast) tasks on
    /// their output (after `then`).
    map_next: Option<ExchangeMapTask>,
}

impl DatasetExchange {
    /// The exchange that runs `op` (a stage boundary) on a cluster, with `partitions`
    /// reduce tasks where the operation leaves it open, and a join's right side
    /// broadcast up to `broadcast_bytes` (0: never); `None` where `op` does not run as
    /// an exchange on the nodes (an expression that cannot travel: it runs in the
    /// driver).
    pub(crate) fn of(
        op: &LogicalOp,
        state: &SessionState,
        partitions: usize,
        broadcast_bytes: u64,
    ) -> Result<Option<Self>> {
        let mut broadcast = None;
        let schemas = op
            .inputs()
            .iter()
            .map(|i| i.schema(state)?.map(|s| schema_bytes(&s)).transpose())
            .collect::<Result<Vec<_>>>()?;
        let mut partial = None;
        let hash = |keys: Vec<Option<Vec<String>>>| MapPlan::Hash {
            keys,
            casts: vec![],
            nulls_anywhere: false,
        };
        let (partitions, map, combine, in_order) = match op {
            LogicalOp::Exchange { kind, .. } => match kind {
                ExchangeKind::RepartitionBy { keys, n } => {
                    (*n, hash(vec![Some(keys.clone())]), Combine::Concat, true)
                }
                ExchangeKind::Groups { keys, n } => (
                    *n,
                    hash(vec![Some(keys.clone())]),
                    Combine::Groups { keys: keys.clone() },
                    true,
                ),
                ExchangeKind::RandomShuffle { seed, n } => (
                    *n,
                    MapPlan::Random { seed: *seed },
                    Combine::Shuffle { seed: *seed },
                    true,
                ),
                ExchangeKind::Repartition { n } => (*n, MapPlan::Positions, Combine::Concat, true),
                ExchangeKind::RandomizeBlockOrder { seed } => (
                    0,
                    MapPlan::BlockOrder { seed: *seed },
                    Combine::Concat,
                    true,
                ),
            },
            LogicalOp::Sort { keys, .. } => {
                let Ok(keys) = keys.iter().map(ShippedKey::of).collect::<Result<Vec<_>>>() else {
                    return Ok(None);
                };
                (
                    partitions,
                    MapPlan::Range { keys: keys.clone() },
                    Combine::Sort { keys },
                    false,
                )
            }
            LogicalOp::Aggregate { keys, aggs, .. } => {
                // A distinct aggregate (`count(DISTINCT x)`) runs whole in the reduce
                // tasks: not every one has a partial state, and DataFusion plans one
                // as two aggregations, whose partial half would remove duplicates
                // within a block only.
                let distinct = aggs.iter().any(|a| {
                    a.exists(|e| Ok(matches!(e, Expr::AggregateFunction(f) if f.params.distinct)))
                        .unwrap_or(true)
                });
                let Ok(aggs) = aggs.iter().map(expr_bytes).collect::<Result<Vec<_>>>() else {
                    return Ok(None);
                };
                let n = if keys.is_empty() { 1 } else { partitions };
                // Partial aggregation on the nodes where the rows are, when the rows'
                // schema is known before running (a transform's output may not be).
                let combine = match schemas.first().cloned().flatten() {
                    Some(schema) if !distinct => {
                        let two = TwoPhase {
                            keys: keys.clone(),
                            aggs,
                            schema,
                        };
                        partial = Some(two.clone());
                        Combine::FinishAggregate(two)
                    }
                    _ => Combine::Aggregate {
                        keys: keys.clone(),
                        aggs,
                    },
                };
                (n, hash(vec![Some(keys.clone())]), combine, false)
            }
            LogicalOp::Distinct { .. } => (partitions, hash(vec![None]), Combine::Distinct, false),
            LogicalOp::Join {
                left_on,
                right_on,
                how,
                key_casts,
                ..
            } => {
                // Equal keys of different types (Int32 and Int64) hash alike once cast
                // to the type the join compares them in.
                let casts = key_casts
                    .iter()
                    .map(|t| t.as_ref().map(DataType::to_string))
                    .collect();
                // Each left row meets the whole right side in one task: right and full
                // joins, which also keep unmatched right rows, cannot.
                if broadcast_bytes > 0
                    && matches!(
                        how,
                        JoinHow::Inner | JoinHow::Left | JoinHow::Semi | JoinHow::Anti
                    )
                {
                    broadcast = Some(broadcast_bytes);
                }
                (
                    partitions,
                    MapPlan::Hash {
                        keys: vec![Some(left_on.clone()), Some(right_on.clone())],
                        casts,
                        nulls_anywhere: true,
                    },
                    Combine::Join {
                        left_on: left_on.clone(),
                        right_on: right_on.clone(),
                        how: *how,
                    },
                    false,
                )
            }
            _ => return Ok(None),
        };
        Ok(Some(Self {
            partitions: partitions.max(1),
            map,
            partial,
            combine,
            schemas,
            in_order,
            broadcast,
            write: None,
            then: vec![],
            map_next: None,
        }))
    }

    /// The exchange with its reduce (and broadcast) tasks running `ops` (row-local
    /// steps) on their output, instead of a stage of tasks over their blocks; `None` for
    /// one that runs no tasks (`randomize_block_order`).
    pub(crate) fn then(mut self, ops: Vec<ShippedOp>) -> Option<Self> {
        if matches!(self.map, MapPlan::BlockOrder { .. }) {
            return None;
        }
        self.then.extend(ops);
        Some(self)
    }

    /// The exchange with its reduce (and broadcast) tasks running `map`, the map work
    /// of the exchange above, on their output (after its steps): their objects are that
    /// exchange's map outputs. `None` for one that runs no tasks or writes.
    pub(crate) fn mapping(mut self, map: ExchangeMapTask) -> Option<Self> {
        if matches!(self.map, MapPlan::BlockOrder { .. }) || self.write.is_some() {
            return None;
        }
        self.map_next = Some(map);
        Some(self)
    }

    /// The exchange with its reduce (and broadcast) tasks writing their output as parts
    /// of a write, instead of a stage of write tasks over their blocks; `None` for one
    /// that runs no tasks (`randomize_block_order`).
    pub(crate) fn writing(mut self, part: RemotePart) -> Option<Self> {
        if matches!(self.map, MapPlan::BlockOrder { .. }) || self.map_next.is_some() {
            return None;
        }
        self.write = Some(part);
        Some(self)
    }
}

impl ExchangeWork for DatasetExchange {
    fn partitions(&self) -> usize {
        self.partitions
    }

    fn makes_rows_from_none(&self) -> bool {
        // An aggregation without keys has a row for no input (a whole one only where
        // its input's schema is known).
        match &self.combine {
            Combine::FinishAggregate(two) => two.keys.is_empty(),
            Combine::Aggregate { keys, .. } => {
                keys.is_empty() && self.schemas.first().is_some_and(Option::is_some)
            }
            _ => false,
        }
    }

    fn sample_task(&self) -> Result<Option<EncodedTask>> {
        self.sample()
            .map(|t| EncodedTask::new(Box::new(t)))
            .transpose()
    }

    fn prepare(&self, samples: Vec<RecordBatch>, rows: u64) -> Result<Vec<u8>> {
        let keys = match &self.map {
            MapPlan::Range { keys } => keys,
            MapPlan::Positions => return Ok(rows.to_le_bytes().to_vec()),
            _ => return Ok(vec![]),
        };
        let samples: Vec<RecordBatch> = samples.into_iter().filter(|b| b.num_rows() > 0).collect();
        let Some(first) = samples.first() else {
            return Ok(vec![]);
        };
        let all = concat_batches(&first.schema(), &samples)?;
        // Key columns, then the rows each sample stands for.
        let (cols, weights) = all.columns().split_at(all.num_columns() - 1);
        let cols = cols.to_vec();
        let weights = weights[0]
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| VolleyError::internal("a sort's samples come without weights"))?;
        let rows = converter(keys, &cols)?.convert_columns(&cols)?;
        let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
        order.sort_by(|a, b| rows.row(*a as usize).cmp(&rows.row(*b as usize)));
        // The sample at each 1/n of the rows in key order (a big block's samples
        // stand for more rows than a small one's): partition p takes the keys from
        // boundary p - 1 (exclusive) up to boundary p (inclusive).
        let n = self.partitions;
        let total: u128 = weights.values().iter().map(|w| *w as u128).sum();
        let mut picks: Vec<u32> = Vec::with_capacity(n.saturating_sub(1));
        let mut seen: u128 = 0;
        for &o in &order {
            seen += weights.value(o as usize) as u128;
            while picks.len() + 1 < n && seen * n as u128 > total * (picks.len() + 1) as u128 {
                picks.push(o);
            }
        }
        let last = *order.last().expect("samples have rows");
        picks.resize(n.saturating_sub(1), last);
        let idx = UInt32Array::from(picks);
        let bounds = cols
            .iter()
            .map(|c| Ok(take(c, &idx, None)?))
            .collect::<Result<Vec<_>>>()?;
        batch_bytes(&key_batch(bounds)?)
    }

    fn map_task(&self, side: usize, first_row: u64, prepared: &[u8]) -> Result<EncodedTask> {
        EncodedTask::new(Box::new(self.map(side, first_row, prepared)?))
    }

    fn reduce_task(&self, partition: usize, sides: &[usize]) -> Result<EncodedTask> {
        EncodedTask::new(Box::new(self.reduce(partition, sides)))
    }

    fn needs_input_order(&self) -> bool {
        self.in_order
    }

    fn needs_row_count(&self) -> bool {
        matches!(self.map, MapPlan::Positions)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    fn block_order(&self, blocks: usize) -> Option<Vec<usize>> {
        match self.map {
            MapPlan::BlockOrder { seed } => Some(crate::exchange::block_order(blocks, seed)),
            _ => None,
        }
    }

    fn broadcast_limit(&self) -> Option<u64> {
        self.broadcast
    }

    fn broadcast_task(&self, right: usize) -> Result<EncodedTask> {
        if self.broadcast.is_none() {
            return Err(VolleyError::internal("this exchange does not broadcast"));
        }
        EncodedTask::new(Box::new(ExchangeReduceTask {
            partition: 0,
            sides: vec![1, right],
            schemas: self.schemas.clone(),
            combine: self.combine.clone(),
            write: self.write.clone(),
            then: self.then.clone(),
            map: self.map_next.clone(),
        }))
    }
}

impl DatasetExchange {
    /// A sort's sampling of one block.
    pub(crate) fn sample(&self) -> Option<ExchangeSampleTask> {
        match &self.map {
            MapPlan::Range { keys } => Some(ExchangeSampleTask { keys: keys.clone() }),
            _ => None,
        }
    }

    /// The map work of input `side`, given what [`ExchangeWork::prepare`] made (a
    /// sort's boundaries) and the first row of the rows it maps.
    pub(crate) fn map(
        &self,
        side: usize,
        first_row: u64,
        prepared: &[u8],
    ) -> Result<ExchangeMapTask> {
        let partitioner = match &self.map {
            MapPlan::BlockOrder { .. } => {
                return Err(VolleyError::internal(
                    "an exchange that reorders blocks has no map tasks",
                ))
            }
            MapPlan::Hash {
                keys,
                casts,
                nulls_anywhere,
            } => Partitioner::Hash {
                keys: keys.get(side).cloned().flatten(),
                casts: casts.clone(),
                nulls_anywhere: *nulls_anywhere,
            },
            MapPlan::Random { seed } => Partitioner::Random {
                seed: *seed,
                first_row,
            },
            MapPlan::Range { keys } => Partitioner::Range {
                keys: keys.clone(),
                bounds: prepared.to_vec(),
            },
            MapPlan::Positions => Partitioner::Positions {
                first_row,
                rows: prepared
                    .try_into()
                    .map(u64::from_le_bytes)
                    .unwrap_or_default(),
            },
        };
        Ok(ExchangeMapTask {
            partitions: self.partitions,
            partitioner,
            partial: self.partial.clone(),
            rows: None,
        })
    }

    /// The map work of input `side`, for the stage below to run in its own tasks on
    /// what they make (a read split partitioned where it is read, never stored whole):
    /// `None` where the map tasks need something of the whole input (a sort's
    /// samples, a repartition's row count). A seeded shuffle's map
    /// [places rows by position](ExchangeMapTask::places_by_position): only a stage
    /// that knows each task's first row can run it.
    pub(crate) fn map_in_stage(&self, side: usize) -> Result<Option<ExchangeMapTask>> {
        match self.map {
            MapPlan::Hash { .. } | MapPlan::Random { .. } => self.map(side, 0, &[]).map(Some),
            _ => Ok(None),
        }
    }

    fn reduce(&self, partition: usize, sides: &[usize]) -> ExchangeReduceTask {
        ExchangeReduceTask {
            partition,
            sides: sides.to_vec(),
            schemas: self.schemas.clone(),
            combine: self.combine.clone(),
            write: self.write.clone(),
            then: self.then.clone(),
            map: self.map_next.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The exchange's tasks run in this process, as the cluster runs them (samples,
    //! boundaries, a map task per block, a reduce task per partition), against the
    //! single-process operators.
    use super::*;
    use crate::{agg, lit, Context};

    /// Distinct aggregates, named or not, through the exchange's tasks over blocks
    /// sharing values, count each value once (as one process does).
    #[test]
    fn distinct_aggregates_count_values_shared_by_blocks_once() {
        use datafusion::functions_aggregate::expr_fn::{count_distinct, sum_distinct};
        let ctx = Context::global().unwrap();
        let ds = ctx
            .range(2_000)
            .with_column("k", crate::col("id") % lit(2i64))
            .unwrap()
            .with_column("x", crate::col("id") % lit(300i64))
            .unwrap();
        let blocks: Vec<RecordBatch> = ds.collect().unwrap();
        assert!(blocks.len() > 1 || blocks[0].num_rows() > 1000);
        let blocks: Vec<RecordBatch> = blocks
            .iter()
            .flat_map(|b| {
                (0..b.num_rows())
                    .step_by(500)
                    .map(|o| b.slice(o, 500.min(b.num_rows() - o)))
            })
            .collect();
        let input = ctx.from_batches(blocks.clone()).unwrap();
        for aggs in [
            vec![count_distinct(crate::col("x"))],
            vec![agg::count_distinct("x"), agg::count_all()],
            vec![sum_distinct(crate::col("x"))],
        ] {
            let grouped = input.groupby(&["k"]).agg(aggs.clone()).unwrap();
            let mut got = rows(&through_tasks(grouped.logical_plan(), &blocks, 4));
            let mut want = rows(&grouped.collect().unwrap());
            got.sort();
            want.sort();
            assert_eq!(got, want, "{aggs:?}");
        }
    }

    fn task() -> TaskContext {
        TaskContext {
            task_id: "t".into(),
            attempt: 0,
            job_id: "j".into(),
            node_id: "n".into(),
            gpu_ids: vec![],
            name: String::new(),
        }
    }

    /// The output of `op` (a boundary over a dataset of `blocks`) through its tasks.
    fn through_tasks(
        op: &LogicalOp,
        blocks: &[RecordBatch],
        partitions: usize,
    ) -> Vec<RecordBatch> {
        let ctx = Context::global().unwrap();
        let work = DatasetExchange::of(op, ctx.session_state(), partitions, 0)
            .unwrap()
            .expect("runs as an exchange");
        let t = task();
        let prepared = match work.sample() {
            Some(s) => {
                let samples: Vec<RecordBatch> = blocks
                    .iter()
                    .flat_map(|b| s.run(&t, vec![vec![b.clone()]]).unwrap())
                    .collect();
                work.prepare(samples, 0).unwrap()
            }
            None => {
                let rows = blocks.iter().map(|b| b.num_rows() as u64).sum();
                work.prepare(vec![], rows).unwrap()
            }
        };
        let mut first = 0;
        let maps: Vec<Vec<RecordBatch>> = blocks
            .iter()
            .map(|b| {
                let out = work
                    .map(0, first, &prepared)
                    .unwrap()
                    .run(&t, vec![vec![b.clone()]])
                    .unwrap();
                first += b.num_rows() as u64;
                assert_eq!(out.len(), work.partitions(), "one batch per partition");
                out
            })
            .collect();
        (0..work.partitions())
            .flat_map(|p| {
                let inputs: Vec<Vec<RecordBatch>> =
                    maps.iter().map(|m| vec![m[p].clone()]).collect();
                let reduce = work.reduce(p, &[maps.len()]);
                let held = reduce.run(&t, inputs.clone()).unwrap();
                if reduce.streams_inputs() {
                    // Taking the partition as it is read gives the same rows (a
                    // sort's in the same order).
                    let streamed = reduce.run_streamed(&t, InputStream::of(inputs)).unwrap();
                    let (mut a, mut b) = (rows(&streamed), rows(&held));
                    if !matches!(reduce.combine, Combine::Sort { .. }) {
                        a.sort();
                        b.sort();
                    }
                    assert_eq!(a, b, "partition {p} streamed");
                }
                held
            })
            .collect()
    }

    fn rows(batches: &[RecordBatch]) -> Vec<String> {
        let mut out = Vec::new();
        for b in batches {
            for r in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                    .collect();
                out.push(cells.join("|"));
            }
        }
        out
    }

    #[test]
    fn map_output_partitions_keep_input_order_and_own_their_strings() {
        use arrow::array::{AsArray, Int64Array, StringViewArray};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8View, false),
        ]));
        let batch = |ids: std::ops::Range<i64>| {
            let s: StringViewArray = ids
                .clone()
                .map(|i| Some(format!("a string longer than twelve bytes {i}")))
                .collect();
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from_iter_values(ids)), Arc::new(s)],
            )
            .unwrap()
        };
        let batches = [batch(0..5), batch(5..9)];
        let routes = vec![vec![2, 0, 2, 1, 0], vec![0, 2, 2, 0]];
        let parts = batches_per_partition(batches.to_vec(), &routes, 4).unwrap();
        let ids = |b: &RecordBatch| -> Vec<i64> {
            b.column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .values()
                .to_vec()
        };
        assert_eq!(parts.len(), 4);
        assert_eq!(ids(&parts[0]), [1, 4, 5, 8]);
        assert_eq!(ids(&parts[1]), [3]);
        assert_eq!(ids(&parts[2]), [0, 2, 6, 7]);
        assert_eq!(parts[3].num_rows(), 0);
        assert_eq!(parts[3].schema(), schema);
        for part in &parts[..3] {
            let s = part.column(1).as_string_view();
            let held: usize = s.data_buffers().iter().map(|b| b.len()).sum();
            assert_eq!(held, s.total_buffer_bytes_used(), "strings of its own");
            for (row, id) in ids(part).into_iter().enumerate() {
                assert_eq!(
                    s.value(row),
                    format!("a string longer than twelve bytes {id}")
                );
            }
        }
        assert!(batches_per_partition(vec![], &[], 4).unwrap().is_empty());
    }

    #[test]
    fn a_partition_of_empty_batches_keeps_their_schema_when_streamed() {
        // The input's schema is not known to the plan: the reduce task learns it from
        // the first batch, rows or not (a global count of no rows is one row, 0).
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]));
        let empty = RecordBatch::new_empty(schema);
        let reduce = ExchangeReduceTask {
            partition: 0,
            sides: vec![2],
            schemas: vec![None],
            combine: Combine::Aggregate {
                keys: vec![],
                aggs: vec![expr_bytes(&agg::count_all()).unwrap()],
            },
            write: None,
            then: vec![],
            map: None,
        };
        assert!(reduce.streams_inputs());
        let inputs = vec![vec![empty.clone()], vec![empty]];
        let held = reduce.run(&task(), inputs.clone()).unwrap();
        let streamed = reduce
            .run_streamed(&task(), InputStream::of(inputs))
            .unwrap();
        assert_eq!(rows(&held), ["0"]);
        assert_eq!(rows(&streamed), rows(&held));
    }

    #[test]
    fn position_partitions_cut_where_the_local_repartition_does() {
        for (rows, n) in [(10u64, 3usize), (7, 7), (3, 5), (1000, 7), (1, 1)] {
            let mut counts = vec![0u64; n];
            for i in 0..rows {
                counts[position_partition(i, rows, n)] += 1;
            }
            let want: Vec<u64> = (0..n as u64)
                .map(|p| rows * (p + 1) / n as u64 - rows * p / n as u64)
                .collect();
            assert_eq!(counts, want, "{rows} rows in {n}");
        }
    }

    #[test]
    fn repartition_through_its_tasks_keeps_the_order_and_the_cuts() {
        let ctx = Context::global().unwrap();
        // Blocks of uneven sizes.
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("id", DataType::Int64, false),
        ]));
        let blocks: Vec<RecordBatch> = [0..5i64, 5..6, 6..40, 40..41, 41..100]
            .into_iter()
            .map(|r| {
                let ids = arrow::array::Int64Array::from_iter_values(r);
                RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(ids)]).unwrap()
            })
            .collect();
        let input = ctx.from_batches(blocks.clone()).unwrap();
        let parts = input.repartition(7).unwrap();
        let got = through_tasks(parts.logical_plan(), &blocks, 4);
        assert_eq!(
            rows(&got),
            rows(&parts.collect().unwrap()),
            "same rows, same order"
        );
        // Each partition's rows (the map tasks' batch p of every block) are the local
        // partition's: rows * p / n .. rows * (p + 1) / n.
        let ctx_state = Context::global().unwrap();
        let work = DatasetExchange::of(parts.logical_plan(), ctx_state.session_state(), 4, 0)
            .unwrap()
            .unwrap();
        let prepared = work.prepare(vec![], 100).unwrap();
        let (t, mut first, mut sizes) = (task(), 0, vec![0; 7]);
        for b in &blocks {
            let out = work
                .map(0, first, &prepared)
                .unwrap()
                .run(&t, vec![vec![b.clone()]])
                .unwrap();
            first += b.num_rows() as u64;
            for (p, part) in out.iter().enumerate() {
                sizes[p] += part.num_rows();
            }
        }
        let want: Vec<usize> = (0..7).map(|p| 100 * (p + 1) / 7 - 100 * p / 7).collect();
        assert_eq!(sizes, want);
    }

    /// A stage below a seeded shuffle runs its map knowing each task's first row: the
    /// same partitions as a map task over the block at that row; a task that reads
    /// another count than planned fails.
    #[test]
    fn a_seeded_shuffle_maps_in_a_stage_at_the_rows_planned() {
        let ctx = Context::global().unwrap();
        let blocks: Vec<RecordBatch> = ctx.range(1_000).collect().unwrap();
        let input = ctx.from_batches(blocks.clone()).unwrap();
        let shuffled = input.random_shuffle(5).unwrap();
        let work = DatasetExchange::of(shuffled.logical_plan(), ctx.session_state(), 6, 0)
            .unwrap()
            .unwrap();
        let in_stage = work.map_in_stage(0).unwrap().expect("a stage can run it");
        assert!(in_stage.places_by_position());
        let block = ctx.range(300).collect_batch().unwrap();
        let t = task();
        let by_task = work
            .map(0, 700, &[])
            .unwrap()
            .run(&t, vec![vec![block.clone()]])
            .unwrap();
        let by_stage = in_stage
            .at_rows(700, 300)
            .partition(vec![block.clone()])
            .unwrap();
        assert_eq!(rows(&by_task), rows(&by_stage));
        assert_ne!(
            rows(
                &in_stage
                    .at_rows(0, 300)
                    .partition(vec![block.clone()])
                    .unwrap()
            ),
            rows(&by_stage),
            "the first row places the rows"
        );
        let err = in_stage
            .at_rows(700, 301)
            .partition(vec![block])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("read 300 rows where planning counted 301"),
            "{err}"
        );
    }

    #[test]
    fn an_aggregation_of_many_groups_maps_in_parts_as_one_table_would() {
        let ctx = Context::global().unwrap();
        let ds = ctx
            .range(120_000)
            .with_column("k", crate::col("id") % lit(20_011i64))
            .unwrap()
            .with_column(
                "s",
                datafusion::logical_expr::cast(crate::col("id") % lit(3i64), DataType::Utf8View),
            )
            .unwrap()
            // A column the aggregation does not read: its plan's input is narrower.
            .with_column("unused", crate::col("id") * lit(2i64))
            .unwrap();
        let all: Vec<RecordBatch> = ds.collect().unwrap();
        let all = concat_batches(&all[0].schema(), &all).unwrap();
        // Two blocks of 60,000 rows, each with every key: many groups per block.
        let blocks = vec![all.slice(0, 60_000), all.slice(60_000, 60_000)];
        let input = ctx.from_batches(blocks.clone()).unwrap();
        let grouped = input
            .groupby(&["k", "s"])
            .agg([agg::count_all(), agg::sum("id"), agg::max("s")])
            .unwrap();
        let work = DatasetExchange::of(grouped.logical_plan(), ctx.session_state(), 4, 0)
            .unwrap()
            .expect("runs as an exchange");
        let prepared = work.prepare(vec![], 0).unwrap();
        let map = work.map(0, 0, &prepared).unwrap();
        assert!(map.many_groups(&blocks[..1]).unwrap());
        assert!(!map.many_groups(&[blocks[0].slice(0, 5_000)]).unwrap());
        // Each partition's states are the groups that hash there, one row per group.
        let out = map.partition(vec![blocks[0].clone()]).unwrap();
        assert_eq!(out.len(), 4);
        assert_eq!(out.iter().map(RecordBatch::num_rows).sum::<usize>(), 60_000);
        let mut got = rows(&through_tasks(grouped.logical_plan(), &blocks, 4));
        let mut want = rows(&grouped.collect().unwrap());
        got.sort();
        want.sort();
        assert_eq!(got.len(), 60_033);
        assert_eq!(got, want);
    }

    /// A join's rows with a null key, which meet no row, are dealt over the
    /// partitions instead of all landing in the one every null hashes to; rows with a
    /// key go where their hash says.
    #[test]
    fn a_joins_null_keys_are_dealt_over_the_partitions() {
        use arrow::array::Int64Array;
        let ctx = Context::global().unwrap();
        let keys: Vec<Option<i64>> = (0..1000).map(|i| (i % 10 == 0).then_some(i)).collect();
        // The key alone: the null rows are all equal.
        let block = RecordBatch::try_from_iter([(
            "k",
            Arc::new(Int64Array::from(keys.clone())) as ArrayRef,
        )])
        .unwrap();
        let side = ctx.from_batches(vec![block.clone()]).unwrap();
        let joined = side.join(&side, &["k"], JoinHow::Left).unwrap();
        let work = DatasetExchange::of(joined.logical_plan(), ctx.session_state(), 4, 0)
            .unwrap()
            .expect("runs as an exchange");
        let map = work.map(0, 0, &[]).unwrap();
        let targets = map.route(std::slice::from_ref(&block)).unwrap().remove(0);
        let mut nulls = [0; 4];
        for (row, key) in keys.iter().enumerate() {
            if key.is_none() {
                nulls[targets[row]] += 1;
            }
        }
        assert_eq!(nulls, [225; 4]);
        // The same rows in another order make the same partitions.
        let order = arrow::array::UInt32Array::from_iter_values((0..1000u32).rev());
        let backwards = take_record_batch(&block, &order).unwrap();
        let again = map
            .route(std::slice::from_ref(&backwards))
            .unwrap()
            .remove(0);
        let placed = |block: &RecordBatch, targets: &[usize]| {
            use arrow::array::Array;
            let k = block
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            let mut rows: Vec<(usize, Option<i64>)> = (0..block.num_rows())
                .map(|r| (targets[r], (!k.is_null(r)).then(|| k.value(r))))
                .collect();
            rows.sort();
            rows
        };
        assert_eq!(placed(&backwards, &again), placed(&block, &targets));
        let mut hashes = Vec::new();
        let hashed = hash_partitions(&[block.column(0).clone()], 4, &mut hashes).unwrap();
        for (row, key) in keys.iter().enumerate() {
            if key.is_some() {
                assert_eq!(targets[row], hashed[row]);
            }
        }
    }

    /// The partition of each row of each block when `blocks` are sorted by `k` into
    /// `partitions` through the exchange's tasks (samples, boundaries, maps).
    fn sort_routes(blocks: &[RecordBatch], partitions: usize) -> Vec<Vec<usize>> {
        let ctx = Context::global().unwrap();
        let input = ctx.from_batches(blocks.to_vec()).unwrap();
        let sorted = input.sort([SortKey::asc("k")]).unwrap();
        let work = DatasetExchange::of(sorted.logical_plan(), ctx.session_state(), partitions, 0)
            .unwrap()
            .unwrap();
        let t = task();
        let samples: Vec<RecordBatch> = blocks
            .iter()
            .flat_map(|b| {
                work.sample()
                    .unwrap()
                    .run(&t, vec![vec![b.clone()]])
                    .unwrap()
            })
            .collect();
        let prepared = work.prepare(samples, 0).unwrap();
        blocks
            .iter()
            .map(|b| {
                let mut routes = work
                    .map(0, 0, &prepared)
                    .unwrap()
                    .route(std::slice::from_ref(b))
                    .unwrap();
                routes.remove(0)
            })
            .collect()
    }

    /// A key that fills most of a sort's input is dealt over the partitions its
    /// boundaries span, and the output is still in order.
    #[test]
    fn a_sort_key_of_many_rows_is_dealt_over_its_partitions() {
        let ctx = Context::global().unwrap();
        let ds = ctx
            .range(20_000)
            .with_column(
                "k",
                datafusion::logical_expr::when(
                    (crate::col("id") % lit(10i64)).eq(lit(0i64)),
                    crate::col("id"),
                )
                .otherwise(lit(0i64))
                .unwrap(),
            )
            .unwrap();
        let blocks: Vec<RecordBatch> = ds.collect().unwrap();
        // (Rows of equal keys come in any order: the partitions' key ranges are
        // checked, not the rows' order.)
        let mut keys: [Vec<i64>; 4] = Default::default();
        for (b, routes) in blocks.iter().zip(sort_routes(&blocks, 4)) {
            let k = b
                .column_by_name("k")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap();
            for (row, p) in routes.iter().enumerate() {
                keys[*p].push(k.value(row));
            }
        }
        // 18,000 zeros: no partition takes them all, and every key of a partition
        // sorts at or before every key of the next.
        assert!(
            keys.iter().all(|k| k.len() < 12_000),
            "{:?}",
            keys.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(keys.iter().map(Vec::len).sum::<usize>(), 20_000);
        for p in 0..3 {
            let (Some(hi), Some(lo)) = (keys[p].iter().max(), keys[p + 1].iter().min()) else {
                continue;
            };
            assert!(
                hi <= lo,
                "partition {p} ends at {hi}, the next starts at {lo}"
            );
        }
    }

    /// A sort's boundaries weigh each block's samples by the rows they stand for: a
    /// small block's keys do not count as much as a big one's.
    #[test]
    fn a_sorts_boundaries_weigh_blocks_by_their_rows() {
        let block = |from: i64, rows: i64| {
            RecordBatch::try_from_iter([(
                "k",
                Arc::new(arrow::array::Int64Array::from_iter_values(
                    from..from + rows,
                )) as ArrayRef,
            )])
            .unwrap()
        };
        // 100 small keys, then 100,000 big ones: 100 and 128 samples.
        let blocks = [block(0, 100), block(1_000, 100_000)];
        let mut sizes = [0usize; 2];
        for p in sort_routes(&blocks, 2).iter().flatten() {
            sizes[*p] += 1;
        }
        // Equal weights put the boundary at the 114th of 228 samples: 11,000 rows
        // against 89,100.
        assert!(
            sizes.iter().all(|s| (45_000..55_100).contains(s)),
            "{sizes:?}"
        );
    }

    #[test]
    fn sorts_and_aggregations_through_their_tasks_equal_the_local_operators() {
        let ctx = Context::global().unwrap();
        let ds = ctx
            .range(100_000)
            .with_column("k", crate::col("id") % lit(37i64))
            .unwrap()
            .with_column(
                "s",
                datafusion::logical_expr::cast(crate::col("id") % lit(11i64), DataType::Utf8View),
            )
            .unwrap();
        let blocks: Vec<RecordBatch> = ds.collect().unwrap();
        let input = ctx.from_batches(blocks.clone()).unwrap();

        let sorted = input
            .sort([SortKey::desc("k"), SortKey::asc("id")])
            .unwrap();
        // The tasks make the types the plan declares: strings plain (a view `s` in).
        let types = |batches: &[RecordBatch], ds: &Dataset| {
            let declared: Vec<DataType> = ds
                .schema()
                .unwrap()
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            assert!(declared.contains(&DataType::Utf8), "{declared:?}");
            for b in batches {
                let made: Vec<DataType> = b
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.data_type().clone())
                    .collect();
                assert_eq!(made, declared);
            }
        };
        let got = through_tasks(sorted.logical_plan(), &blocks, 4);
        types(&got, &sorted);
        assert_eq!(rows(&got), rows(&sorted.collect().unwrap()), "same order");
        // Blocks of no rows: no samples, so no boundaries.
        let empty = [blocks[0].slice(0, 0)];
        let got = through_tasks(sorted.logical_plan(), &empty, 4);
        assert_eq!(got.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);

        let grouped = input
            .groupby(&["k", "s"])
            .agg([
                agg::count_all(),
                agg::sum("id"),
                agg::mean("id"),
                agg::max("s"),
            ])
            .unwrap();
        let got = through_tasks(grouped.logical_plan(), &blocks, 4);
        types(&got, &grouped);
        let mut got = rows(&got);
        let mut want = rows(&grouped.collect().unwrap());
        got.sort();
        want.sort();
        assert_eq!(got, want);

        let total = input.aggregate([agg::count_all(), agg::sum("id")]).unwrap();
        assert_eq!(
            rows(&through_tasks(total.logical_plan(), &blocks, 4)),
            rows(&total.collect().unwrap())
        );
    }
}
