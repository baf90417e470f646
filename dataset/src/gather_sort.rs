//! A whole-row sort that keeps its input in memory and copies each row once.
//!
//! DataFusion sorts a plan's rows with a `SortExec` per partition under a
//! `SortPreservingMergeExec`, which copies every row several times: each run of
//! batches is concatenated, sorted with `take`, merged with the partition's other runs
//! (`interleave`) and merged again across partitions (`interleave`). Sorting TPC-H
//! `lineitem` to Parquet on two cores spent about a quarter of its CPU there.
//!
//! [`GatherSortExec`] runs such a sort by one key of a fixed-width type (integers,
//! floats, decimals, dates, times) while its rows fit half the memory budget: each
//! partition sorts every batch as it comes (`take`, within a batch that fits the
//! CPU's caches) and keeps it with a (key, row position) pair per row; its pairs,
//! sorted runs already, are merged by a stable sort, the partitions' pairs merged
//! again, and each output batch is built with one `interleave` from the kept
//! batches, several output batches at a time. Each row is copied twice, and the
//! final copy reads every kept batch front to back: a gather in the final order
//! straight from the unsorted batches, one copy, was slower (every row a cache miss).
//! TPC-H `lineitem` sorted to Parquet on two cores: ~3-5% less time, ~9% less peak
//! memory.
//!
//! Where the budget runs out first, the kept batches and the rest of the input go
//! through DataFusion's sort, which spills; the other half of the budget is its room
//! to start. [`gather_sorts`] puts the operator in a plan.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, UInt32Array};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{interleave_record_batch, take_record_batch, SortOptions};
use arrow::datatypes::{ArrowNativeType, DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{internal_err, DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{LexOrdering, PhysicalExpr};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};

/// Output batches built at the same time (each on a task of its own).
const GATHERS_AHEAD: usize = 2;

/// `plan` with each whole-row sort that [`GatherSortExec`] can run (one key of a
/// fixed-width type, no limit) run by it: a `SortPreservingMergeExec` over a
/// `SortExec` of the same order, or a `SortExec` whose output is one partition.
pub(crate) fn gather_sorts(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_down(|node| {
        let found = if let Some(merge) = node.downcast_ref::<SortPreservingMergeExec>() {
            merge
                .input()
                .downcast_ref::<SortExec>()
                .filter(|s| {
                    merge.fetch().is_none()
                        && s.fetch().is_none()
                        && s.preserve_partitioning()
                        && s.expr() == merge.expr()
                })
                .and_then(|s| GatherSortExec::try_new(s.input(), s.expr(), merge.properties()))
        } else if let Some(sort) = node.downcast_ref::<SortExec>() {
            (sort.fetch().is_none() && sort.properties().partitioning.partition_count() == 1)
                .then(|| GatherSortExec::try_new(sort.input(), sort.expr(), sort.properties()))
                .flatten()
        } else {
            None
        };
        Ok(match found {
            Some(g) => Transformed::yes(Arc::new(g) as Arc<dyn ExecutionPlan>),
            None => Transformed::no(node),
        })
    })
    .data()
}

/// How a key's values become integers that order as the values do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum KeyKind {
    /// Signed integers of this many bytes (dates, times, timestamps, durations and
    /// decimals of up to 64 bits among them).
    Signed(usize),
    Unsigned(usize),
    Float32,
    Float64,
    /// 128-bit decimals.
    Decimal128,
}

impl KeyKind {
    fn of(t: &DataType) -> Option<Self> {
        use DataType::*;
        Some(match t {
            Int8 => Self::Signed(1),
            Int16 => Self::Signed(2),
            Int32 | Date32 | Time32(_) | Decimal32(..) => Self::Signed(4),
            Int64 | Date64 | Time64(_) | Timestamp(..) | Duration(_) | Decimal64(..) => {
                Self::Signed(8)
            }
            UInt8 => Self::Unsigned(1),
            UInt16 => Self::Unsigned(2),
            UInt32 => Self::Unsigned(4),
            UInt64 => Self::Unsigned(8),
            Float32 => Self::Float32,
            Float64 => Self::Float64,
            Decimal128(..) => Self::Decimal128,
            _ => return None,
        })
    }

    fn wide(self) -> bool {
        self == Self::Decimal128
    }
}

/// A whole-row sort of its input's partitions into one partition, by one key of a
/// fixed-width type, copying each row once (see the module's documentation).
#[derive(Debug)]
pub(crate) struct GatherSortExec {
    input: Arc<dyn ExecutionPlan>,
    ordering: LexOrdering,
    key: Arc<dyn PhysicalExpr>,
    options: SortOptions,
    kind: KeyKind,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl GatherSortExec {
    /// The sort of `input` by `ordering`, with the properties of the plan it stands
    /// for; `None` where it cannot run it.
    fn try_new(
        input: &Arc<dyn ExecutionPlan>,
        ordering: &LexOrdering,
        properties: &Arc<PlanProperties>,
    ) -> Option<Self> {
        let [key] = &ordering[..] else {
            return None;
        };
        let kind = KeyKind::of(&key.expr.data_type(&input.schema()).ok()?)?;
        // A row's position keeps its partition in 8 bits.
        let parts = input.output_partitioning().partition_count();
        if parts == 0 || parts > 255 || properties.partitioning.partition_count() != 1 {
            return None;
        }
        Some(Self {
            input: Arc::clone(input),
            ordering: ordering.clone(),
            key: Arc::clone(&key.expr),
            options: key.options,
            kind,
            properties: Arc::clone(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The partitions of its input, each sorted with its own share of the budget.
    pub(crate) fn input_partitions(&self) -> usize {
        self.input.output_partitioning().partition_count()
    }
}

impl DisplayAs for GatherSortExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "GatherSortExec: expr=[{}]", self.ordering)
    }
}

impl ExecutionPlan for GatherSortExec {
    fn name(&self) -> &str {
        "GatherSortExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        f(&self.key)
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
            return internal_err!("GatherSortExec has one child, got {}", children.len());
        }
        match Self::try_new(&children.remove(0), &self.ordering, &self.properties) {
            Some(g) => Ok(Arc::new(g)),
            None => internal_err!("GatherSortExec cannot sort its new input"),
        }
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return internal_err!("GatherSortExec has one partition, not {partition}");
        }
        let metrics = &self.metrics;
        let run = Run {
            input: Arc::clone(&self.input),
            ordering: self.ordering.clone(),
            key: Arc::clone(&self.key),
            options: self.options,
            kind: self.kind,
            output_rows: MetricBuilder::new(metrics).output_rows(0),
            spilled_bytes: MetricBuilder::new(metrics).spilled_bytes(0),
            spill_count: MetricBuilder::new(metrics).spill_count(0),
            fallbacks: MetricBuilder::new(metrics).counter("external_sort_fallbacks", 0),
        };
        let schema = self.schema();
        let stream = futures::stream::once(run.sorted(context)).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// One execution of a [`GatherSortExec`].
struct Run {
    input: Arc<dyn ExecutionPlan>,
    ordering: LexOrdering,
    key: Arc<dyn PhysicalExpr>,
    options: SortOptions,
    kind: KeyKind,
    output_rows: Count,
    spilled_bytes: Count,
    spill_count: Count,
    fallbacks: Count,
}

/// Sorted (key, row position) pairs; a position is the partition (8 bits), the batch
/// (24 bits) and the row (32 bits), so equal keys keep the input's order.
enum Pairs {
    Narrow(Vec<(u64, u64)>),
    Wide(Vec<(u128, u64)>),
}

impl Pairs {
    fn bytes_per_row(kind: KeyKind) -> usize {
        if kind.wide() {
            size_of::<(u128, u64)>()
        } else {
            size_of::<(u64, u64)>()
        }
    }
}

/// What a partition kept of its input.
struct Kept {
    batches: Vec<RecordBatch>,
    pairs: Pairs,
    /// Positions of the rows whose key is null, in input order.
    nulls: Vec<u64>,
    reservation: MemoryReservation,
    /// The batch that did not fit the budget.
    held_back: Option<RecordBatch>,
    /// Where this or another partition ran out of budget: the rest of the input.
    rest: Option<SendableRecordBatchStream>,
}

impl Run {
    async fn sorted(self, ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let parts = self.input.output_partitioning().partition_count();
        // Rows are kept while they take at most half of a finite budget: the other
        // half is room for DataFusion's sort to start in, should it take over.
        let room = match ctx.memory_pool().memory_limit() {
            MemoryLimit::Finite(bytes) => bytes / 2,
            MemoryLimit::Infinite | MemoryLimit::Unknown => usize::MAX,
        };
        let full = Arc::new(Budget {
            full: AtomicBool::new(false),
            kept: AtomicUsize::new(0),
            room,
        });
        // Each pair, and the row's position in the merged order; a merge of more than
        // two partitions holds a round's pairs twice.
        let pair = Pairs::bytes_per_row(self.kind);
        let per_row = pair + size_of::<u64>() + if parts > 2 { pair } else { 0 };
        let tasks = (0..parts)
            .map(|p| {
                let stream = self.input.execute(p, Arc::clone(&ctx))?;
                let reservation = MemoryConsumer::new(format!("GatherSortExec[{p}]"))
                    .with_can_spill(true)
                    .register(ctx.memory_pool());
                let key = Key {
                    expr: Arc::clone(&self.key),
                    options: self.options,
                    kind: self.kind,
                    part: p as u64,
                };
                Ok(SpawnedTask::spawn(keep(
                    stream,
                    key,
                    per_row,
                    reservation,
                    Arc::clone(&full),
                )))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut kept = Vec::with_capacity(parts);
        for t in tasks {
            kept.push(t.join().await.map_err(|e| {
                DataFusionError::Execution(format!("a partition of a sort failed: {e}"))
            })??);
        }
        if kept.iter().any(|k| k.rest.is_some()) {
            return self.external(kept, ctx);
        }
        self.gathered(kept, &ctx)
    }

    /// The kept rows in the merged order of their pairs.
    fn gathered(
        self,
        kept: Vec<Kept>,
        ctx: &Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let mut batches = Vec::new();
        let mut offsets = Vec::with_capacity(kept.len());
        let mut nulls = Vec::new();
        let mut lists = Vec::with_capacity(kept.len());
        let mut reservations = Vec::with_capacity(kept.len());
        for k in kept {
            offsets.push(batches.len());
            batches.extend(k.batches);
            nulls.extend(k.nulls);
            lists.push(k.pairs);
            reservations.push(k.reservation);
        }
        let sorted = merged(lists);
        let order: Vec<u64> = if self.options.nulls_first {
            nulls.into_iter().chain(sorted).collect()
        } else {
            sorted.into_iter().chain(nulls).collect()
        };
        let rows = order.len();
        let size = ctx.session_config().batch_size().max(1);
        let order = Arc::new(order);
        let batches = Arc::new(batches);
        let offsets = Arc::new(offsets);
        let output_rows = self.output_rows.clone();
        let stream = futures::stream::iter((0..rows).step_by(size))
            .map(move |start| {
                let (order, batches, offsets) = (
                    Arc::clone(&order),
                    Arc::clone(&batches),
                    Arc::clone(&offsets),
                );
                SpawnedTask::spawn(async move {
                    let end = (start + size).min(order.len());
                    gather(&batches, &offsets, &order[start..end])
                })
                .join()
            })
            .buffered(GATHERS_AHEAD)
            .map(move |r| {
                // The kept rows count against the budget until the last batch.
                let _ = &reservations;
                let batch = r.map_err(|e| {
                    DataFusionError::Execution(format!("building a sorted batch failed: {e}"))
                })??;
                output_rows.add(batch.num_rows());
                Ok(batch)
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.input.schema(),
            stream,
        )))
    }

    /// The rows through DataFusion's sort, which spills: what each partition kept,
    /// then the rest of its input.
    fn external(self, kept: Vec<Kept>, ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        self.fallbacks.add(1);
        let parts = kept.len();
        let replay = Arc::new(Replay::input(self.input.schema(), kept)?);
        let sort =
            Arc::new(SortExec::new(self.ordering.clone(), replay).with_preserve_partitioning(true));
        let plan: Arc<dyn ExecutionPlan> = if parts > 1 {
            Arc::new(SortPreservingMergeExec::new(
                self.ordering.clone(),
                Arc::clone(&sort) as _,
            ))
        } else {
            Arc::clone(&sort) as _
        };
        let stream = plan.execute(0, ctx)?;
        let (spilled_bytes, spill_count) = (self.spilled_bytes.clone(), self.spill_count.clone());
        let done = futures::stream::once(async move {
            if let Some(m) = sort.metrics() {
                spilled_bytes.add(m.spilled_bytes().unwrap_or(0));
                spill_count.add(m.spill_count().unwrap_or(0));
            }
            Ok(None)
        });
        let output_rows = self.output_rows.clone();
        let stream = stream
            .map_ok(move |b| {
                output_rows.add(b.num_rows());
                Some(b)
            })
            .chain(done)
            .try_filter_map(|b| async move { Ok(b) });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.input.schema(),
            stream,
        )))
    }
}

/// The rows at `positions` of `batches` (each partition's first at `offsets`).
fn gather(batches: &[RecordBatch], offsets: &[usize], positions: &[u64]) -> Result<RecordBatch> {
    let indices: Vec<(usize, usize)> = positions
        .iter()
        .map(|&p| {
            let part = (p >> 56) as usize;
            let batch = ((p >> 32) & 0xFF_FFFF) as usize;
            (offsets[part] + batch, (p & 0xFFFF_FFFF) as usize)
        })
        .collect();
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    Ok(interleave_record_batch(&refs, &indices)?)
}

/// Merges sorted pair lists into the order of their positions.
fn merged(mut lists: Vec<Pairs>) -> Vec<u64> {
    while lists.len() > 2 {
        let mut next = Vec::with_capacity(lists.len().div_ceil(2));
        let mut it = lists.into_iter();
        while let Some(a) = it.next() {
            next.push(match (a, it.next()) {
                (Pairs::Narrow(a), Some(Pairs::Narrow(b))) => Pairs::Narrow(merge_pairs(a, b)),
                (Pairs::Wide(a), Some(Pairs::Wide(b))) => Pairs::Wide(merge_pairs(a, b)),
                (a, None) => a,
                _ => unreachable!("one sort's pairs are all of one width"),
            });
        }
        lists = next;
    }
    let mut it = lists.into_iter();
    match (it.next(), it.next()) {
        (None, _) => Vec::new(),
        (Some(Pairs::Narrow(a)), None) => a.into_iter().map(|(_, p)| p).collect(),
        (Some(Pairs::Wide(a)), None) => a.into_iter().map(|(_, p)| p).collect(),
        (Some(Pairs::Narrow(a)), Some(Pairs::Narrow(b))) => merge_positions(&a, &b),
        (Some(Pairs::Wide(a)), Some(Pairs::Wide(b))) => merge_positions(&a, &b),
        _ => unreachable!("one sort's pairs are all of one width"),
    }
}

fn merge_pairs<K: Ord + Copy>(a: Vec<(K, u64)>, b: Vec<(K, u64)>) -> Vec<(K, u64)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if b[j] < a[i] {
            out.push(b[j]);
            j += 1;
        } else {
            out.push(a[i]);
            i += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

fn merge_positions<K: Ord + Copy>(a: &[(K, u64)], b: &[(K, u64)]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if b[j] < a[i] {
            out.push(b[j].1);
            j += 1;
        } else {
            out.push(a[i].1);
            i += 1;
        }
    }
    out.extend(a[i..].iter().map(|(_, p)| *p));
    out.extend(b[j..].iter().map(|(_, p)| *p));
    out
}

/// What the partitions of one sort keep, together.
struct Budget {
    /// Set once a partition could not keep a batch: all of them stop.
    full: AtomicBool,
    kept: AtomicUsize,
    /// The most they keep.
    room: usize,
}

impl Budget {
    /// Whether `bytes` more fit (the room, then the memory pool), reserved if so.
    fn keep(&self, bytes: usize, reservation: &MemoryReservation) -> bool {
        let before = self.kept.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.room || reservation.try_grow(bytes).is_err() {
            self.kept.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// A partition's sort key.
struct Key {
    expr: Arc<dyn PhysicalExpr>,
    options: SortOptions,
    kind: KeyKind,
    part: u64,
}

/// Keeps a partition's batches and their sorted pairs while the budget allows.
async fn keep(
    mut input: SendableRecordBatchStream,
    key: Key,
    per_row: usize,
    reservation: MemoryReservation,
    full: Arc<Budget>,
) -> Result<Kept> {
    let mut kept = Kept {
        batches: Vec::new(),
        pairs: if key.kind.wide() {
            Pairs::Wide(Vec::new())
        } else {
            Pairs::Narrow(Vec::new())
        },
        nulls: Vec::new(),
        reservation,
        held_back: None,
        rest: None,
    };
    while !full.full.load(Ordering::Relaxed) {
        let Some(batch) = input.next().await else {
            break;
        };
        let batch = batch?;
        if batch.num_rows() == 0 {
            continue;
        }
        let bytes = batch.get_array_memory_size() + batch.num_rows() * per_row;
        if kept.batches.len() >= 1 << 24 || !full.keep(bytes, &kept.reservation) {
            full.full.store(true, Ordering::Relaxed);
            kept.held_back = Some(batch);
            kept.rest = Some(input);
            return Ok(kept);
        }
        let values = key.expr.evaluate(&batch)?.into_array(batch.num_rows())?;
        let base = (key.part << 56) | ((kept.batches.len() as u64) << 32);
        let sorted = sorted_run(&values, &key, &batch, base, &mut kept)?;
        // The sorted copy replaces the batch (its buffers are exact).
        let size = kept.reservation.size() + sorted.get_array_memory_size();
        kept.reservation
            .resize(size.saturating_sub(batch.get_array_memory_size()));
        kept.batches.push(sorted);
    }
    if full.full.load(Ordering::Relaxed) {
        // Another partition ran out of budget: every partition goes to the external
        // sort.
        kept.rest = Some(input);
        return Ok(kept);
    }
    // Each batch's pairs are sorted already: the stable sort merges those runs.
    match &mut kept.pairs {
        Pairs::Narrow(p) => p.sort(),
        Pairs::Wide(p) => p.sort(),
    }
    Ok(kept)
}

/// `batch` sorted by its key (`values`), its pairs (positions in the sorted batch,
/// from `base`) added to `kept`.
fn sorted_run(
    values: &ArrayRef,
    key: &Key,
    batch: &RecordBatch,
    base: u64,
    kept: &mut Kept,
) -> Result<RecordBatch> {
    let data = values.to_data();
    let nulls = data.nulls().filter(|n| n.null_count() > 0).cloned();
    let desc = key.options.descending;
    let nulls_first = key.options.nulls_first;
    let buffer = match data.buffers().first() {
        Some(b) => b.clone(),
        None => return internal_err!("a sort key of type {} has no values", values.data_type()),
    };
    let (offset, len) = (data.offset(), data.len());
    fn values_of<T: ArrowNativeType>(
        b: &arrow::buffer::Buffer,
        offset: usize,
        len: usize,
    ) -> ScalarBuffer<T> {
        ScalarBuffer::new(b.clone(), offset, len)
    }
    macro_rules! push {
        ($pairs:expr, $vals:expr, $norm:expr) => {{
            let vals = $vals;
            let mut run = Vec::with_capacity(len);
            let mut null_rows = Vec::new();
            for (i, v) in vals.iter().enumerate() {
                if nulls.as_ref().is_some_and(|n| n.is_null(i)) {
                    null_rows.push(i as u32);
                    continue;
                }
                let k = $norm(*v);
                run.push((if desc { !k } else { k }, i as u32));
            }
            take_run(
                run,
                null_rows,
                nulls_first,
                batch,
                base,
                $pairs,
                &mut kept.nulls,
            )
        }};
    }
    match (&mut kept.pairs, key.kind) {
        (Pairs::Narrow(p), KeyKind::Signed(1)) => {
            push!(p, values_of::<i8>(&buffer, offset, len), |v: i8| (v as i64
                as u64)
                ^ (1 << 63))
        }
        (Pairs::Narrow(p), KeyKind::Signed(2)) => {
            push!(
                p,
                values_of::<i16>(&buffer, offset, len),
                |v: i16| (v as i64 as u64) ^ (1 << 63)
            )
        }
        (Pairs::Narrow(p), KeyKind::Signed(4)) => {
            push!(
                p,
                values_of::<i32>(&buffer, offset, len),
                |v: i32| (v as i64 as u64) ^ (1 << 63)
            )
        }
        (Pairs::Narrow(p), KeyKind::Signed(8)) => {
            push!(p, values_of::<i64>(&buffer, offset, len), |v: i64| (v
                as u64)
                ^ (1 << 63))
        }
        (Pairs::Narrow(p), KeyKind::Unsigned(1)) => {
            push!(p, values_of::<u8>(&buffer, offset, len), |v: u8| v as u64)
        }
        (Pairs::Narrow(p), KeyKind::Unsigned(2)) => {
            push!(p, values_of::<u16>(&buffer, offset, len), |v: u16| v as u64)
        }
        (Pairs::Narrow(p), KeyKind::Unsigned(4)) => {
            push!(p, values_of::<u32>(&buffer, offset, len), |v: u32| v as u64)
        }
        (Pairs::Narrow(p), KeyKind::Unsigned(8)) => {
            push!(p, values_of::<u64>(&buffer, offset, len), |v: u64| v)
        }
        // IEEE 754's total order, as Arrow's sorts compare floats: the bits of a
        // negative value inverted, of a positive one with the sign bit set.
        (Pairs::Narrow(p), KeyKind::Float32) => {
            push!(p, values_of::<f32>(&buffer, offset, len), |v: f32| {
                let b = v.to_bits() as u64;
                if b >> 31 == 1 {
                    !b & 0xFFFF_FFFF
                } else {
                    b | (1 << 31)
                }
            })
        }
        (Pairs::Narrow(p), KeyKind::Float64) => {
            push!(p, values_of::<f64>(&buffer, offset, len), |v: f64| {
                let b = v.to_bits();
                if b >> 63 == 1 {
                    !b
                } else {
                    b | (1 << 63)
                }
            })
        }
        (Pairs::Wide(p), KeyKind::Decimal128) => {
            push!(p, values_of::<i128>(&buffer, offset, len), |v: i128| (v
                as u128)
                ^ (1 << 127))
        }
        _ => internal_err!(
            "a sort key of type {} in the wrong pairs",
            values.data_type()
        ),
    }
}

/// `batch` in the order of `run` (its non-null keys and rows), its null rows first
/// or last; adds the run's pairs and null rows (positions in the sorted batch, from
/// `base`) to the partition's.
fn take_run<K: Ord + Copy>(
    mut run: Vec<(K, u32)>,
    null_rows: Vec<u32>,
    nulls_first: bool,
    batch: &RecordBatch,
    base: u64,
    pairs: &mut Vec<(K, u64)>,
    nulls: &mut Vec<u64>,
) -> Result<RecordBatch> {
    run.sort_unstable();
    let (first, null_start) = if nulls_first {
        (null_rows.len(), 0)
    } else {
        (0, run.len())
    };
    nulls.extend((0..null_rows.len()).map(|i| base | (null_start + i) as u64));
    let mut indices = Vec::with_capacity(batch.num_rows());
    if nulls_first {
        indices.extend_from_slice(&null_rows);
    }
    pairs.reserve(run.len());
    for (i, (k, row)) in run.iter().enumerate() {
        indices.push(*row);
        pairs.push((*k, base | (first + i) as u64));
    }
    if !nulls_first {
        indices.extend_from_slice(&null_rows);
    }
    Ok(take_record_batch(batch, &UInt32Array::from(indices))?)
}

/// One partition's kept batches, then the rest of its input: a partition of the
/// input of the external sort a [`GatherSortExec`] falls back to (one stream, so it
/// runs once).
struct Replay {
    schema: SchemaRef,
    state: Mutex<Option<ReplayState>>,
}

struct ReplayState {
    batches: VecDeque<RecordBatch>,
    /// The kept batches' share of the budget, given back as each is passed on.
    reservation: MemoryReservation,
    rest: Option<SendableRecordBatchStream>,
}

impl fmt::Debug for Replay {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Replay")
    }
}

impl Replay {
    /// The external sort's input: a partition per partition of `kept`.
    fn input(schema: SchemaRef, kept: Vec<Kept>) -> Result<StreamingTableExec> {
        let parts = kept
            .into_iter()
            .map(|k| {
                let mut batches: VecDeque<RecordBatch> = k.batches.into();
                let reservation = k.reservation;
                let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
                reservation.shrink(reservation.size().saturating_sub(bytes));
                batches.extend(k.held_back);
                let state = ReplayState {
                    batches,
                    reservation,
                    rest: k.rest,
                };
                Arc::new(Replay {
                    schema: Arc::clone(&schema),
                    state: Mutex::new(Some(state)),
                }) as Arc<dyn PartitionStream>
            })
            .collect();
        StreamingTableExec::try_new(schema, parts, None, [], false, None)
    }
}

impl PartitionStream for Replay {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        let Some(mut replay) = self.state.lock().expect("replay lock").take() else {
            let once = futures::stream::once(async {
                internal_err!("a partition of a sort's replayed input runs once")
            });
            return Box::pin(RecordBatchStreamAdapter::new(schema, once));
        };
        let stream = futures::stream::poll_fn(move |cx| {
            if let Some(b) = replay.batches.pop_front() {
                replay
                    .reservation
                    .shrink(b.get_array_memory_size().min(replay.reservation.size()));
                return std::task::Poll::Ready(Some(Ok(b)));
            }
            match replay.rest.as_mut() {
                Some(rest) => rest.poll_next_unpin(cx),
                None => std::task::Poll::Ready(None),
            }
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::compute::{cast, concat_batches, lexsort_to_indices, SortColumn};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use arrow::util::display::array_value_to_string;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::execution::memory_pool::FairSpillPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::physical_expr::expressions::col;
    use datafusion::physical_expr::PhysicalSortExpr;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::{SessionConfig, SessionContext};
    use rand::{Rng, SeedableRng};

    /// `parts` partitions of 7 batches of up to 300 rows: `k` of type `key` (nulls
    /// and repeats among them; floats with NaN, infinities and both zeros), `id`
    /// numbering the rows, `s` a string.
    fn input(key: &DataType, parts: usize, seed: u64) -> (SchemaRef, Vec<Vec<RecordBatch>>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", key.clone(), true),
            Field::new("id", DataType::Int64, false),
            Field::new("s", DataType::Utf8, false),
        ]));
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut id = 0i64;
        let partitions = (0..parts)
            .map(|_| {
                (0..7)
                    .map(|_| {
                        let rows = rng.random_range(0..300usize);
                        let raw: Vec<Option<i64>> = (0..rows)
                            .map(|_| rng.random_bool(0.9).then(|| rng.random_range(-60..60)))
                            .collect();
                        let k: ArrayRef = match key {
                            DataType::Float64 => {
                                let special =
                                    [f64::NAN, -0.0, 0.0, f64::INFINITY, f64::NEG_INFINITY];
                                Arc::new(Float64Array::from_iter(raw.iter().map(|v| {
                                    v.map(|v| match v {
                                        -60..-55 => special[(v + 60) as usize],
                                        _ => v as f64 / 4.0,
                                    })
                                })))
                            }
                            DataType::UInt8 | DataType::UInt64 => {
                                let a = Int64Array::from_iter(raw.iter().map(|v| v.map(i64::abs)));
                                cast(&a, key).unwrap()
                            }
                            _ => cast(&Int64Array::from(raw.clone()), key).unwrap(),
                        };
                        let ids = Int64Array::from_iter_values(id..id + rows as i64);
                        id += rows as i64;
                        let s = StringArray::from_iter_values(
                            (0..rows).map(|i| format!("row {} {}", i, "x".repeat(i % 13))),
                        );
                        RecordBatch::try_new(
                            Arc::clone(&schema),
                            vec![k, Arc::new(ids), Arc::new(s)],
                        )
                        .unwrap()
                    })
                    .collect()
            })
            .collect();
        (schema, partitions)
    }

    /// DataFusion's sort of `partitions` by `k` with `options`.
    fn datafusion_sort(
        schema: &SchemaRef,
        partitions: &[Vec<RecordBatch>],
        options: SortOptions,
    ) -> Arc<dyn ExecutionPlan> {
        let source =
            MemorySourceConfig::try_new_exec(partitions, Arc::clone(schema), None).unwrap();
        let ordering: LexOrdering =
            [PhysicalSortExpr::new(col("k", schema).unwrap(), options)].into();
        let sort =
            Arc::new(SortExec::new(ordering.clone(), source).with_preserve_partitioning(true));
        Arc::new(SortPreservingMergeExec::new(ordering, sort))
    }

    fn run(plan: &Arc<dyn ExecutionPlan>, ctx: &SessionContext) -> RecordBatch {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let batches = rt
            .block_on(collect(Arc::clone(plan), ctx.task_ctx()))
            .unwrap();
        concat_batches(&plan.schema(), &batches).unwrap()
    }

    /// The key column as text (NaN equals NaN) and the rows ordered by key and id.
    fn canonical(batch: &RecordBatch) -> (Vec<String>, RecordBatch) {
        let keys = (0..batch.num_rows())
            .map(|i| array_value_to_string(batch.column(0), i).unwrap())
            .collect();
        let order = lexsort_to_indices(
            &[
                SortColumn {
                    values: Arc::clone(batch.column(0)),
                    options: None,
                },
                SortColumn {
                    values: Arc::clone(batch.column(1)),
                    options: None,
                },
            ],
            None,
        )
        .unwrap();
        (keys, take_record_batch(batch, &order).unwrap())
    }

    fn metric(plan: &Arc<dyn ExecutionPlan>, name: &str) -> usize {
        let m = plan.metrics().unwrap();
        match name {
            "output_rows" => m.output_rows(),
            "spilled_bytes" => m.spilled_bytes(),
            _ => m.sum_by_name(name).map(|v| v.as_usize()),
        }
        .unwrap_or(0)
    }

    #[test]
    fn sorts_as_datafusion_does_for_every_key_type_and_order() {
        let types = [
            DataType::Int8,
            DataType::Int32,
            DataType::Int64,
            DataType::UInt8,
            DataType::UInt64,
            DataType::Float64,
            DataType::Decimal128(12, 2),
            DataType::Decimal64(10, 1),
            DataType::Date32,
            DataType::Timestamp(TimeUnit::Microsecond, None),
        ];
        let ctx = SessionContext::new();
        for (t, key) in types.iter().enumerate() {
            for parts in [1, 3] {
                let (schema, partitions) = input(key, parts, t as u64);
                for (descending, nulls_first) in
                    [(false, false), (false, true), (true, false), (true, true)]
                {
                    let options = SortOptions {
                        descending,
                        nulls_first,
                    };
                    let expected = datafusion_sort(&schema, &partitions, options);
                    let gathered = gather_sorts(Arc::clone(&expected)).unwrap();
                    assert_eq!(gathered.name(), "GatherSortExec", "{key}");
                    let (want, got) = (run(&expected, &ctx), run(&gathered, &ctx));
                    let case = format!("{key}, {parts} partitions, {options:?}");
                    assert_eq!(canonical(&got).0, canonical(&want).0, "keys: {case}");
                    assert_eq!(canonical(&got).1, canonical(&want).1, "rows: {case}");
                    assert_eq!(metric(&gathered, "output_rows"), want.num_rows(), "{case}");
                    assert_eq!(metric(&gathered, "external_sort_fallbacks"), 0, "{case}");
                    // Equal keys keep the input's order (partition, batch, row).
                    let ids = got.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                    let keys = canonical(&got).0;
                    for i in 1..got.num_rows() {
                        if keys[i] == keys[i - 1] {
                            assert!(ids.value(i) > ids.value(i - 1), "ties: {case}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rows_over_the_budget_go_through_the_spilling_sort() {
        let config = SessionConfig::new().with_sort_spill_reservation_bytes(64 << 10);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(16 << 20)))
            .build_arc()
            .unwrap();
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        let (schema, mut partitions) = input(&DataType::Int64, 3, 7);
        // About 20 MiB of rows.
        for p in &mut partitions {
            let batches = p.clone();
            for _ in 0..60 {
                p.extend(batches.iter().cloned());
            }
        }
        let options = SortOptions::default();
        let expected = datafusion_sort(&schema, &partitions, options);
        let want = run(&expected, &SessionContext::new());
        // DataFusion's sort alone spills under this budget too.
        run(&expected, &ctx);
        let gathered = gather_sorts(expected).unwrap();
        let got = run(&gathered, &ctx);
        assert_eq!(canonical(&got).0, canonical(&want).0);
        assert_eq!(canonical(&got).1, canonical(&want).1);
        assert_eq!(metric(&gathered, "external_sort_fallbacks"), 1);
        assert!(metric(&gathered, "spilled_bytes") > 0);
        assert_eq!(metric(&gathered, "output_rows"), want.num_rows());
    }

    #[test]
    fn only_whole_sorts_by_one_fixed_width_key_are_gathered() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let source = || {
            MemorySourceConfig::try_new_exec(&[vec![], vec![]], Arc::clone(&schema), None).unwrap()
                as Arc<dyn ExecutionPlan>
        };
        let by =
            |names: &[&str]| -> LexOrdering {
                LexOrdering::new(names.iter().map(|n| {
                    PhysicalSortExpr::new(col(n, &schema).unwrap(), SortOptions::default())
                }))
                .unwrap()
            };
        let merged = |ordering: LexOrdering, fetch: Option<usize>| -> Arc<dyn ExecutionPlan> {
            let sort = SortExec::new(ordering.clone(), source())
                .with_preserve_partitioning(true)
                .with_fetch(fetch);
            Arc::new(SortPreservingMergeExec::new(ordering, Arc::new(sort)))
        };
        let name = |p: Arc<dyn ExecutionPlan>| gather_sorts(p).unwrap().name().to_string();
        assert_eq!(name(merged(by(&["k"]), None)), "GatherSortExec");
        assert_eq!(name(merged(by(&["s"]), None)), "SortPreservingMergeExec");
        assert_eq!(
            name(merged(by(&["k", "s"]), None)),
            "SortPreservingMergeExec"
        );
        assert_eq!(
            name(merged(by(&["k"]), Some(10))),
            "SortPreservingMergeExec"
        );
        // One partition: the sort alone.
        let single =
            MemorySourceConfig::try_new_exec(&[vec![]], Arc::clone(&schema), None).unwrap();
        let sort = Arc::new(SortExec::new(by(&["k"]), single));
        assert_eq!(name(sort), "GatherSortExec");
    }
}
