//! Aggregations of many groups in hash tables sized for the CPU's caches.
//!
//! DataFusion aggregates in two phases: a partial aggregation per input partition, a
//! hash exchange on the grouping keys into the plan's partitions (one per core and a
//! half here), and a final aggregation per partition. Each phase keeps one hash table
//! per partition holding all of its groups. With many groups those tables outgrow the
//! CPU's caches and nearly every row costs a cache miss: TPC-H Q18's subquery
//! (`lineitem`'s 6 M rows grouped by `l_orderkey` into 1.5 M groups, three partitions
//! on two cores) spent 0.30 s in its partial aggregation and 0.18 s in its final one,
//! most of the query. [`cache_sized_aggregations`] rewrites a plan run in one process
//! so that both phases work in small tables:
//!
//! - A partial aggregation runs afresh over each chunk of [`CHUNK_ROWS`] rows of its
//!   input ([`PartialInChunksExec`]), emitting each chunk's groups before the next
//!   starts, where that reduces the rows as well as one table would: where the rows of
//!   a group come together (a file written in the order of its keys, as TPC-H's
//!   `lineitem` is by `l_orderkey`).
//! - A final aggregation over a hash exchange runs in [`FINE_PARTITIONS`] times as many
//!   hash partitions, each holding a small part of the groups, folded back into the
//!   plan's partitions ([`FoldPartitionsExec`]): output partition `i` of `n` runs the
//!   fine partitions `i`, `i + n`, `i + 2n`, ... one after another. The exchange places
//!   a row by its hash modulo the partitions, so a fine partition `j` holds the rows
//!   whose hash is `j` modulo `16n`, hence `j` modulo `n`: the folded partitions are
//!   hash-partitioned exactly as the plan's were, and the operators above see the
//!   partitioning they were planned for. Rows of the fine partitions not yet
//!   aggregated wait in the exchange, which counts them against the memory budget and
//!   spills them as it does any partition's.
//!
//! Q18 on two cores: the two phases 0.19 s and 0.06 s instead of 0.30 s and 0.18 s.
//! Results are the same: a partial aggregation's groups may be split in any way (the
//! final aggregation merges them), and every group's rows still meet in one final
//! aggregation. A plan cut into stages for a cluster is not rewritten (its exchanges'
//! partitions are its tasks), nor one under a budget below [`MIN_BUDGET_PER_CPU`].

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;

use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{internal_err, DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet, Time,
};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties,
};
use futures::{FutureExt, StreamExt};

/// How many fine partitions each of the plan's partitions is folded from.
pub(crate) const FINE_PARTITIONS: usize = 16;

/// The memory budget per CPU from which plans are rewritten. Each fine partition's
/// channel in the exchange is a memory consumer that may spill, and the budget's pool
/// shares its room among those: under a small budget sixteen times as many would leave
/// each final aggregation a sixteenth of its share, and it would spill early.
pub(crate) const MIN_BUDGET_PER_CPU: u64 = 1 << 30;

/// `plan` with its aggregations in cache-sized tables (see the module's
/// documentation).
pub(crate) fn cache_sized_aggregations(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let plan = finer_final_aggregations(plan, FINE_PARTITIONS)?;
    partial_aggregations_in_chunks(plan, CHUNK_ROWS)
}

/// `plan` with each final aggregation over a hash exchange run in `fine` times as many
/// partitions, folded back into the plan's (see the module's documentation). An
/// aggregation whose output is ordered keeps its partitions: folding would interleave
/// the orders.
pub(crate) fn finer_final_aggregations(
    plan: Arc<dyn ExecutionPlan>,
    fine: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    if fine < 2 {
        return Ok(plan);
    }
    plan.transform_up(|node| {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
            return Ok(Transformed::no(node));
        };
        if *aggregate.mode() != AggregateMode::FinalPartitioned || node.output_ordering().is_some()
        {
            return Ok(Transformed::no(node));
        }
        let Some(exchange) = aggregate.input().downcast_ref::<RepartitionExec>() else {
            return Ok(Transformed::no(node));
        };
        let Partitioning::Hash(keys, n) = exchange.partitioning() else {
            return Ok(Transformed::no(node));
        };
        if exchange.preserve_order() || *n == 0 {
            return Ok(Transformed::no(node));
        }
        let finer = RepartitionExec::try_new(
            Arc::clone(exchange.input()),
            Partitioning::Hash(keys.clone(), n * fine),
        )?;
        let fine_aggregate = Arc::clone(&node).replace_children(
            vec![Arc::new(finer)],
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )?;
        // The aggregation's output partitioning is its input's on the grouping keys
        // as they come out; where DataFusion cannot name it so, nothing is folded.
        match FoldPartitionsExec::fold(fine_aggregate, node.output_partitioning()) {
            Some(folded) => Ok(Transformed::new(
                Arc::new(folded),
                true,
                TreeNodeRecursion::Continue,
            )),
            None => Ok(Transformed::no(node)),
        }
    })
    .data()
}

/// Runs its input's hash partitions `i`, `i + n`, `i + 2n`, ... one after another as
/// its partition `i` of `n`, which keeps the hash partitioning on the same keys (see
/// the module's documentation).
#[derive(Debug)]
pub(crate) struct FoldPartitionsExec {
    input: Arc<dyn ExecutionPlan>,
    properties: Arc<PlanProperties>,
}

impl FoldPartitionsExec {
    /// `input`'s partitions folded into `partitioning`, if that is a hash partitioning
    /// on the input's expressions into a number of partitions that divides the
    /// input's.
    pub(crate) fn fold(input: Arc<dyn ExecutionPlan>, partitioning: &Partitioning) -> Option<Self> {
        let (Partitioning::Hash(keys, n), Partitioning::Hash(input_keys, fine)) =
            (partitioning, input.output_partitioning())
        else {
            return None;
        };
        if *n == 0 || fine % n != 0 || keys != input_keys {
            return None;
        }
        // The folded partitions follow one another: no order holds across them.
        let properties = PlanProperties::new(
            EquivalenceProperties::new(input.schema()),
            partitioning.clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        Some(Self {
            input,
            properties: Arc::new(properties),
        })
    }

    fn partitions(&self) -> usize {
        self.properties.partitioning.partition_count()
    }
}

impl DisplayAs for FoldPartitionsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "FoldPartitionsExec: {} partitions into {}",
            self.input.output_partitioning().partition_count(),
            self.partitions()
        )
    }
}

impl ExecutionPlan for FoldPartitionsExec {
    fn name(&self) -> &str {
        "FoldPartitionsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("FoldPartitionsExec has one child, got {}", children.len());
        }
        let input = children.remove(0);
        match Self::fold(input, &self.properties.partitioning) {
            Some(folded) => Ok(Arc::new(folded)),
            None => internal_err!("FoldPartitionsExec cannot fold its new input's partitions"),
        }
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let n = self.partitions();
        let fine = self.input.output_partitioning().partition_count();
        if partition >= n {
            return internal_err!("FoldPartitionsExec has {n} partitions, not {partition}");
        }
        // The exchange below the fine aggregations, whose partitions not started are
        // released if this partition stops early.
        let exchange = self
            .input
            .children()
            .first()
            .filter(|c| c.downcast_ref::<RepartitionExec>().is_some())
            .map(|c| Arc::clone(c));
        let folded = Folded {
            input: Arc::clone(&self.input),
            exchange,
            context,
            waiting: (partition..fine).step_by(n),
            current: None,
            started: false,
            failed: false,
        };
        let batches = futures::stream::unfold(folded, |mut folded| async move {
            let batch = folded.next().await;
            batch.map(|b| (b, folded))
        })
        .fuse();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            batches,
        )))
    }
}

/// One partition of a [`FoldPartitionsExec`], running: its fine partitions one after
/// another, each started once the one before it ended, so that only one of them holds
/// its groups at a time.
struct Folded {
    input: Arc<dyn ExecutionPlan>,
    exchange: Option<Arc<dyn ExecutionPlan>>,
    context: Arc<TaskContext>,
    /// The fine partitions not started yet.
    waiting: std::iter::StepBy<std::ops::Range<usize>>,
    current: Option<SendableRecordBatchStream>,
    started: bool,
    failed: bool,
}

impl Folded {
    async fn next(&mut self) -> Option<Result<RecordBatch>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(stream) = &mut self.current {
                match stream.next().await {
                    Some(Ok(batch)) => return Some(Ok(batch)),
                    Some(Err(e)) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            let j = self.waiting.next()?;
            self.started = true;
            match self.input.execute(j, Arc::clone(&self.context)) {
                Ok(stream) => self.current = Some(stream),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Drop for Folded {
    /// A partition stopped early (a limit above, an error, a cancelled query) leaves
    /// the rows of its fine partitions not started in the exchange, holding memory or
    /// spill files until the plan is dropped, and a plan that ran is kept for its
    /// metrics. Each such partition's channel is opened and closed here, which drops
    /// its rows and frees what they held.
    fn drop(&mut self) {
        let Some(exchange) = self.exchange.as_ref().filter(|_| self.started) else {
            return;
        };
        for j in self.waiting.by_ref() {
            if let Ok(mut stream) = exchange.execute(j, Arc::clone(&self.context)) {
                let _ = stream.next().now_or_never();
            }
        }
    }
}

/// Rows a partial aggregation in chunks takes per chunk (see [`PartialInChunksExec`]).
pub(crate) const CHUNK_ROWS: usize = 128 * 1024;

/// The reduction (input rows per output row) a partial aggregation's first chunk must
/// reach for the rest of its input to be aggregated in chunks too.
const MIN_CHUNK_REDUCTION: usize = 2;

/// The share of its rows (`1 /` this) a partial aggregation's first chunk must keep as
/// groups for the rest of its input to be aggregated in chunks too: fewer groups
/// (16,384 at [`CHUNK_ROWS`]) fit the caches in one table over the whole input (TPC-H
/// `lineitem` grouped by its 10,000 suppliers), where chunks would only emit the same
/// groups again and again.
const MIN_CHUNK_GROUPS_SHARE: usize = 8;

/// `plan` with each partial aggregation that groups rows aggregated in chunks of
/// `chunk_rows` input rows (see [`PartialInChunksExec`]); `chunk_rows` 0 leaves them.
pub(crate) fn partial_aggregations_in_chunks(
    plan: Arc<dyn ExecutionPlan>,
    chunk_rows: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    if chunk_rows == 0 {
        return Ok(plan);
    }
    plan.transform_up(|node| {
        let Some(aggregate) = node.downcast_ref::<AggregateExec>() else {
            return Ok(Transformed::no(node));
        };
        // A partial aggregation with a limit stops once it holds that many groups;
        // chunks would each stop there and go on to the next.
        if *aggregate.mode() != AggregateMode::Partial
            || aggregate.group_expr().expr().is_empty()
            || aggregate.limit_options().is_some()
            || aggregate.input().output_partitioning().partition_count() == 0
        {
            return Ok(Transformed::no(node));
        }
        let input = Arc::clone(aggregate.input());
        Ok(Transformed::yes(Arc::new(PartialInChunksExec::new(
            node, input, chunk_rows,
        ))))
    })
    .data()
}

/// A partial aggregation run afresh over each chunk of its input, each chunk's groups
/// emitted before the next chunk starts.
///
/// Where rows of a group come together, a table per chunk holds few groups, stays in
/// the CPU's caches, and reduces its chunk as well as one table over the whole input
/// would. Where a group's rows are spread over the input, a chunk reduces little, and
/// its output is what the final aggregation works through; where there are few groups,
/// one table fits the caches anyway. So the rest of the input goes in chunks only if
/// the first chunk kept at least `1 /` [`MIN_CHUNK_GROUPS_SHARE`] and at most `1 /`
/// [`MIN_CHUNK_REDUCTION`] of its rows; if not, it goes through one aggregation, as
/// without chunks.
#[derive(Debug)]
pub(crate) struct PartialInChunksExec {
    /// The partial aggregation, over `input`: each chunk runs a copy of it.
    aggregate: Arc<dyn ExecutionPlan>,
    input: Arc<dyn ExecutionPlan>,
    chunk_rows: usize,
    metrics: ExecutionPlanMetricsSet,
}

impl PartialInChunksExec {
    fn new(
        aggregate: Arc<dyn ExecutionPlan>,
        input: Arc<dyn ExecutionPlan>,
        chunk_rows: usize,
    ) -> Self {
        Self {
            aggregate,
            input,
            chunk_rows,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for PartialInChunksExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PartialInChunksExec: chunk_rows={}, ", self.chunk_rows)?;
        self.aggregate.fmt_as(t, f)
    }
}

impl ExecutionPlan for PartialInChunksExec {
    fn name(&self) -> &str {
        "PartialInChunksExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.aggregate.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.aggregate.apply_expressions(f)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        self.aggregate.maintains_input_order()
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("PartialInChunksExec has one child, got {}", children.len());
        }
        let input = children.remove(0);
        let aggregate = Arc::clone(&self.aggregate).replace_children(
            vec![Arc::clone(&input)],
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )?;
        Ok(Arc::new(Self::new(aggregate, input, self.chunk_rows)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let slot = Arc::new(Slot {
            input: Mutex::new(Some(self.input.execute(partition, Arc::clone(&context))?)),
            taken: AtomicUsize::new(0),
        });
        let run = Chunks {
            aggregate: Arc::clone(&self.aggregate),
            source_properties: Arc::new(PlanProperties::new(
                self.input.equivalence_properties().clone(),
                Partitioning::UnknownPartitioning(1),
                self.input.pipeline_behavior(),
                self.input.boundedness(),
            )),
            slot,
            context,
            chunk_rows: self.chunk_rows,
            chunked: true,
            first: true,
            failed: false,
            current: None,
            output_rows: MetricBuilder::new(&self.metrics).output_rows(partition),
            elapsed_compute: MetricBuilder::new(&self.metrics).elapsed_compute(partition),
            chunks: MetricBuilder::new(&self.metrics).counter("chunks", partition),
        };
        let batches = futures::stream::unfold(run, |mut run| async move {
            let batch = run.next().await;
            batch.map(|b| (b, run))
        })
        .fuse();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.aggregate.schema(),
            batches,
        )))
    }
}

/// The input of a [`PartialInChunksExec`]'s partition, handed from chunk to chunk.
struct Slot {
    /// The input's stream between chunks; `None` once it ended (or failed).
    input: Mutex<Option<SendableRecordBatchStream>>,
    /// Rows taken from the input so far.
    taken: AtomicUsize,
}

/// One partition of a [`PartialInChunksExec`], running.
struct Chunks {
    aggregate: Arc<dyn ExecutionPlan>,
    source_properties: Arc<PlanProperties>,
    slot: Arc<Slot>,
    context: Arc<TaskContext>,
    chunk_rows: usize,
    /// Whether the chunks after the current one are chunks, or the whole rest.
    chunked: bool,
    /// Whether the current chunk is the first.
    first: bool,
    /// Whether it returned an error (and ends).
    failed: bool,
    /// The aggregation of the current chunk, its output rows so far and the input's
    /// rows taken before it.
    current: Option<(
        Arc<dyn ExecutionPlan>,
        SendableRecordBatchStream,
        usize,
        usize,
    )>,
    output_rows: Count,
    elapsed_compute: Time,
    chunks: Count,
}

impl Chunks {
    async fn next(&mut self) -> Option<Result<RecordBatch>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some((aggregate, stream, out, before)) = &mut self.current {
                match stream.next().await {
                    Some(Ok(batch)) => {
                        *out += batch.num_rows();
                        self.output_rows.add(batch.num_rows());
                        return Some(Ok(batch));
                    }
                    Some(Err(e)) => return Some(Err(self.fail(e))),
                    None => {
                        let taken = self.slot.taken.load(Ordering::Relaxed) - *before;
                        if taken > 0 {
                            self.chunks.add(1);
                        }
                        if std::mem::take(&mut self.first)
                            && (out.saturating_mul(MIN_CHUNK_GROUPS_SHARE) < self.chunk_rows
                                || out.saturating_mul(MIN_CHUNK_REDUCTION) > taken)
                        {
                            self.chunked = false;
                        }
                        if let Some(nanos) = aggregate.metrics().and_then(|m| m.elapsed_compute()) {
                            self.elapsed_compute
                                .add_duration(std::time::Duration::from_nanos(nanos as u64));
                        }
                        self.current = None;
                    }
                }
            }
            let Some(input) = self.slot.input.lock().expect("chunk input lock").take() else {
                return None;
            };
            let limit = if self.chunked {
                self.chunk_rows
            } else {
                usize::MAX
            };
            let source = Arc::new(ChunkSource {
                chunk: Mutex::new(Some(Chunk {
                    slot: Arc::clone(&self.slot),
                    input: Some(input),
                    rows: 0,
                    limit,
                })),
                properties: Arc::clone(&self.source_properties),
            });
            let started = Arc::clone(&self.aggregate)
                .replace_children(
                    vec![source],
                    ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
                )
                .and_then(|aggregate| {
                    let stream = aggregate.execute(0, Arc::clone(&self.context))?;
                    Ok((aggregate, stream))
                });
            match started {
                Ok((aggregate, stream)) => {
                    let before = self.slot.taken.load(Ordering::Relaxed);
                    self.current = Some((aggregate, stream, 0, before));
                }
                Err(e) => return Some(Err(self.fail(e))),
            }
        }
    }

    /// Ends the partition with `e`: its input is dropped (a chunk that failed to start
    /// handed it back).
    fn fail(&mut self, e: DataFusionError) -> DataFusionError {
        self.failed = true;
        self.current = None;
        *self.slot.input.lock().expect("chunk input lock") = None;
        e
    }
}

/// The rows of one chunk: the input's batches until `limit` rows were taken.
struct Chunk {
    slot: Arc<Slot>,
    /// `None` once the input ended or failed.
    input: Option<SendableRecordBatchStream>,
    rows: usize,
    limit: usize,
}

impl Drop for Chunk {
    /// Hands the input on to the next chunk (unless it ended).
    fn drop(&mut self) {
        if let Some(input) = self.input.take() {
            *self.slot.input.lock().expect("chunk input lock") = Some(input);
        }
    }
}

/// A chunk of a [`PartialInChunksExec`]'s input as the plan its aggregation runs over.
///
/// A plan node of its own rather than DataFusion's `StreamingTableExec`: it reports the
/// input's equivalence properties (constants and equal columns as well as orderings),
/// from which each chunk's copy of the aggregation derives the same grouping mode as the
/// planned one; a streaming table knows orderings only.
struct ChunkSource {
    chunk: Mutex<Option<Chunk>>,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for ChunkSource {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("ChunkSource")
    }
}

impl DisplayAs for ChunkSource {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("ChunkSource")
    }
}

impl ExecutionPlan for ChunkSource {
    fn name(&self) -> &str {
        "ChunkSource"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !children.is_empty() {
            return internal_err!("ChunkSource has no children");
        }
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let chunk = self.chunk.lock().expect("chunk lock").take();
        let Some(chunk) = chunk.filter(|_| partition == 0) else {
            return internal_err!("ChunkSource runs once, as partition 0");
        };
        let schema = chunk
            .input
            .as_ref()
            .map(|i| i.schema())
            .unwrap_or_else(|| self.schema());
        let batches = futures::stream::unfold(chunk, |mut chunk| async move {
            if chunk.rows >= chunk.limit {
                return None;
            }
            let next = chunk.input.as_mut()?.next().await;
            match next {
                Some(Ok(batch)) => {
                    chunk.rows += batch.num_rows();
                    chunk
                        .slot
                        .taken
                        .fetch_add(batch.num_rows(), Ordering::Relaxed);
                    Some((Ok(batch), chunk))
                }
                Some(Err(e)) => {
                    chunk.input = None;
                    Some((Err(e), chunk))
                }
                None => {
                    // Ended: nothing to hand on to a next chunk.
                    drop(chunk.input.take());
                    None
                }
            }
        })
        .fuse();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, batches)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::MemTable;
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// `t(k, v)` in 3 partitions of batches of 1,000 rows: `rows` rows whose key is
    /// `i / 4` (each group's rows together) or `i % groups` (spread), and `u(k, w)`
    /// with one row per key of `t`'s first keys.
    fn context(rows: i64, clustered: bool, groups: i64) -> SessionContext {
        let mut config = SessionConfig::new().with_target_partitions(3);
        // Both sides of the join below hash-partitioned: it relies on their
        // aggregations' partitioning.
        let opts = config.options_mut();
        opts.optimizer.hash_join_single_partition_threshold = 0;
        opts.optimizer.hash_join_single_partition_threshold_rows = 0;
        let ctx = SessionContext::new_with_config(config);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let batch = |from: i64, to: i64| {
            let keys = (from..to).map(|i| {
                let k = if clustered { i / 4 } else { i % groups };
                // A few null keys, grouped as one.
                (i % 997 != 0).then_some(k)
            });
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(keys.collect::<Int64Array>()),
                    Arc::new(Int64Array::from_iter_values(from..to)),
                ],
            )
            .unwrap()
        };
        let per = rows / 3;
        let partitions: Vec<Vec<RecordBatch>> = (0..3)
            .map(|p| {
                (p * per..(p + 1) * per)
                    .step_by(1000)
                    .map(|s| batch(s, (s + 1000).min((p + 1) * per)))
                    .collect()
            })
            .collect();
        let t = MemTable::try_new(Arc::clone(&schema), partitions).unwrap();
        ctx.register_table("t", Arc::new(t)).unwrap();
        let keys = Int64Array::from_iter_values(0..rows / 8);
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("w", DataType::Int64, false),
        ]));
        let u = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(keys.clone()), Arc::new(keys)],
        )
        .unwrap();
        let u = MemTable::try_new(schema, vec![vec![u]]).unwrap();
        ctx.register_table("u", Arc::new(u)).unwrap();
        ctx
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    }

    fn plan(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        runtime()
            .block_on(async { ctx.sql(sql).await?.create_physical_plan().await })
            .unwrap()
    }

    /// The rows of `plan`'s output, sorted, as text.
    fn run(ctx: &SessionContext, plan: &Arc<dyn ExecutionPlan>) -> String {
        let batches = runtime()
            .block_on(collect(Arc::clone(plan), ctx.task_ctx()))
            .unwrap();
        let text = pretty_format_batches(&batches).unwrap().to_string();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        lines.join("\n")
    }

    fn find(plan: &Arc<dyn ExecutionPlan>, name: &str) -> Vec<Arc<dyn ExecutionPlan>> {
        let mut found = Vec::new();
        plan.apply(|node| {
            if node.name() == name {
                found.push(Arc::clone(node));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
        found
    }

    fn counter(plan: &Arc<dyn ExecutionPlan>, name: &str) -> usize {
        plan.metrics()
            .and_then(|m| m.sum_by_name(name))
            .map_or(0, |v| v.as_usize())
    }

    /// A partitioned join of an aggregation's output (hash-partitioned by it) with a
    /// table's rows (hash-partitioned by an exchange).
    const QUERY: &str = "SELECT a.k, a.s, a.n, u.w FROM \
        (SELECT k, sum(v) AS s, count(*) AS n FROM t GROUP BY k) a \
        JOIN u ON a.k = u.k";

    #[test]
    fn final_aggregations_in_finer_partitions_keep_the_plans_partitioning() {
        let ctx = context(60_000, true, 0);
        // Planned twice: a plan's exchanges run once.
        let planned = plan(&ctx, QUERY);
        let folded = finer_final_aggregations(plan(&ctx, QUERY), 4).unwrap();
        let shown = displayable(folded.as_ref()).indent(false).to_string();
        // The aggregation under the partitioned join, 12 partitions into 3.
        assert_eq!(find(&folded, "FoldPartitionsExec").len(), 1, "{shown}");
        assert!(shown.contains("Hash([k@0], 12)"), "{shown}");
        assert!(shown.contains("HashJoinExec: mode=Partitioned"), "{shown}");
        assert_eq!(
            folded.output_partitioning().partition_count(),
            planned.output_partitioning().partition_count()
        );
        // The join matches every key of `u` (7,500 of them): each key's rows of
        // both sides are still in the same partition.
        let (want, got) = (run(&ctx, &planned), run(&ctx, &folded));
        assert!(
            got == want,
            "answers differ: {} rows against {}",
            got.lines().count(),
            want.lines().count()
        );
        assert_eq!(
            got.lines().filter(|l| l.starts_with("| ")).count(),
            7_500 + 1
        );
    }

    #[test]
    fn a_partial_aggregation_goes_in_chunks_where_its_groups_rows_come_together() {
        // Clustered keys: each chunk of 4,000 rows holds ~1,000 groups.
        let ctx = context(60_000, true, 0);
        let sql = "SELECT k, sum(v), count(*), min(v) FROM t GROUP BY k";
        let planned = plan(&ctx, sql);
        let chunked = partial_aggregations_in_chunks(plan(&ctx, sql), 4_000).unwrap();
        assert!(run(&ctx, &chunked) == run(&ctx, &planned), "answers differ");
        let partials = find(&chunked, "PartialInChunksExec");
        assert_eq!(partials.len(), 1);
        // 20,000 rows per partition: 5 chunks each.
        assert_eq!(counter(&partials[0], "chunks"), 15);

        // Spread keys: the first chunk of 4,000 rows keeps 3,000 groups, less than
        // half its rows gone: the rest goes through one aggregation.
        let ctx = context(60_000, false, 3_000);
        let sql = "SELECT k, sum(v), count(*), min(v) FROM t GROUP BY k";
        let planned = plan(&ctx, sql);
        let chunked = partial_aggregations_in_chunks(plan(&ctx, sql), 4_000).unwrap();
        assert!(run(&ctx, &chunked) == run(&ctx, &planned), "answers differ");
        let partials = find(&chunked, "PartialInChunksExec");
        assert_eq!(counter(&partials[0], "chunks"), 6);
    }

    #[test]
    fn both_rewrites_together_give_the_plans_answers() {
        // 150,000 rows per partition: more than one chunk of `CHUNK_ROWS`.
        for (clustered, groups) in [(true, 0), (false, 40_000), (false, 7)] {
            let ctx = context(450_000, clustered, groups);
            for sql in [
                QUERY,
                "SELECT k, avg(v), count(v) FROM t GROUP BY k HAVING count(*) > 1",
                "SELECT count(*), sum(s) FROM (SELECT k, sum(v) AS s FROM t GROUP BY k)",
            ] {
                let rewritten = cache_sized_aggregations(plan(&ctx, sql)).unwrap();
                let same = run(&ctx, &rewritten) == run(&ctx, &plan(&ctx, sql));
                assert!(same, "answers differ: {sql} ({clustered}, {groups} groups)");
            }
        }
    }

    #[test]
    fn a_partition_stopped_by_a_limit_frees_the_rows_its_fine_partitions_hold() {
        let ctx = context(60_000, true, 0);
        let sql = "SELECT k, count(*) FROM t GROUP BY k LIMIT 5";
        let folded = finer_final_aggregations(plan(&ctx, sql), 4).unwrap();
        assert_eq!(find(&folded, "FoldPartitionsExec").len(), 1);
        let shown = run(&ctx, &folded);
        assert_eq!(shown.lines().filter(|l| l.starts_with("| ")).count(), 5 + 1);
        // The plan is still held (as a plan that ran is, for its metrics); the rows
        // of the fine partitions its limit never reached are not.
        let pool = &ctx.runtime_env().memory_pool;
        assert_eq!(pool.reserved(), 0);
        drop(folded);
    }
}
