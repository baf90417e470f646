//! A subplan that a query and its scalar subquery both compute, computed once.
//!
//! SQL that names a common table expression twice, once in the query and once in a
//! scalar subquery (TPC-H Q15: the revenue per supplier, and its maximum), is planned
//! as two copies of the same subplan. DataFusion runs both; each scans and aggregates
//! `lineitem`. A scalar subquery runs to its end before the query above it reads a
//! row (`ScalarSubqueryExec`), so the subquery's copy can keep its output for the
//! query's copy to read:
//!
//! ```text
//!   ScalarSubqueryExec
//!   ├─ query ... ReuseExec: share=1 ──(kept output, or else)──▶ its own copy
//!   └─ subquery ... ShareExec: share=1 ──▶ the subplan (runs first, keeps its output)
//! ```
//!
//! [`SharedSubplans`] finds the largest subtree of a subquery whose plan the query
//! holds too, and puts a [`ShareExec`] over the subquery's copy and a [`ReuseExec`]
//! over the query's copy. The two copies are the same plan, except that the query's
//! may hold a join's dynamic filter (the keys of the join's other side): it drops rows
//! that the join would drop in any case, so the subquery's unfiltered output serves
//! it as well. A subtree qualifies only if its leaves are file scans (the plan as
//! displayed names their files; an in-memory scan's shows only its sizes), and it
//! holds no volatile function (`random()` computed once would change the answer), no
//! dynamic filter of a join outside it and no scalar subquery's value.
//!
//! What a `ShareExec` keeps counts against the memory budget, and at most an eighth of
//! it per share. All or nothing: if a partition does not fit (or the subquery did not
//! read it to its end), nothing is kept and the `ReuseExec` computes every partition
//! with its own copy (a partition computed again may hold other rows than the first
//! time, as behind a round-robin repartition).
//!
//! On a cluster, plans are cut into stages before they run; [`unshare`] puts the
//! copies back first (each stage computes its own).

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{internal_err, Result};
use datafusion::datasource::physical_plan::{FileScanConfigBuilder, FileSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_expr::{conjunction, split_conjunction};
use datafusion::physical_expr_common::physical_expr::is_volatile;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coop::cooperative;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::scalar_subquery::ScalarSubqueryExec;
use datafusion::physical_plan::{
    displayable, DisplayAs, DisplayFormatType, ExecutionPlan, PhysicalExpr, PlanProperties,
    RecordBatchStream,
};
use futures::{Stream, StreamExt};
use volley_connectors::file_scan_config;

use crate::decode_filters::holds_dynamic_filter;

/// What a [`ShareExec`] keeps, at most, when the memory pool states no limit.
const UNLIMITED_POOL_SHARE: usize = 256 << 20;

/// Shares the subplans that a scalar subquery and the query above it both compute
/// (see the module's documentation). Runs after every other rule.
#[derive(Debug, Default)]
pub(crate) struct SharedSubplans;

impl PhysicalOptimizerRule for SharedSubplans {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut next_id = 0;
        plan.transform_down(|node| match node.downcast_ref::<ScalarSubqueryExec>() {
            Some(subqueries) => share_within(&node, subqueries, &mut next_id),
            None => Ok(Transformed::no(node)),
        })
        .data()
    }

    fn name(&self) -> &str {
        "volley_shared_subplans"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `plan` with every [`ShareExec`] and [`ReuseExec`] replaced by the copy it wraps.
pub(crate) fn unshare(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if let Some(share) = node.downcast_ref::<ShareExec>() {
            return Ok(Transformed::yes(Arc::clone(&share.input)));
        }
        if let Some(reuse) = node.downcast_ref::<ReuseExec>() {
            return Ok(Transformed::yes(Arc::clone(&reuse.own)));
        }
        Ok(Transformed::no(node))
    })
    .data()
}

/// `node` (a `ScalarSubqueryExec`) with the subtrees its subqueries share with its
/// main input wrapped in [`ShareExec`] / [`ReuseExec`] pairs.
fn share_within(
    node: &Arc<dyn ExecutionPlan>,
    subqueries: &ScalarSubqueryExec,
    next_id: &mut usize,
) -> Result<Transformed<Arc<dyn ExecutionPlan>>> {
    let mut input = Arc::clone(subqueries.input());
    // The main input's subtrees by their plan (as displayed, dynamic filters left out).
    let mut in_input: HashSet<String> = HashSet::new();
    input.apply(|m| {
        in_input.extend(plan_key(m, true)?);
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut changed = false;
    let mut children = vec![];
    for link in subqueries.subqueries() {
        let plan = Arc::clone(&link.plan).transform_down(|t| {
            if !shareable(&t)? {
                return Ok(Transformed::no(t));
            }
            let Some(key) = plan_key(&t, false)? else {
                return Ok(Transformed::no(t));
            };
            if !in_input.contains(&key) {
                return Ok(Transformed::no(t));
            }
            let partitions = t.properties().partitioning.partition_count();
            let shared = Arc::new(SharedOutput::new(*next_id + 1, partitions));
            let mut found = false;
            input = Arc::clone(&input)
                .transform_down(|m| {
                    if found || m.downcast_ref::<ReuseExec>().is_some() {
                        return Ok(Transformed::new(m, false, TreeNodeRecursion::Jump));
                    }
                    if m.schema() != t.schema() || plan_key(&m, true)?.as_ref() != Some(&key) {
                        return Ok(Transformed::no(m));
                    }
                    found = true;
                    let reuse = ReuseExec::new(m, Arc::clone(&shared));
                    Ok(Transformed::new(
                        Arc::new(reuse) as Arc<dyn ExecutionPlan>,
                        true,
                        TreeNodeRecursion::Jump,
                    ))
                })
                .data()?;
            if !found {
                return Ok(Transformed::no(t));
            }
            changed = true;
            *next_id += 1;
            let share = Arc::new(ShareExec::new(t, shared)) as Arc<dyn ExecutionPlan>;
            Ok(Transformed::new(share, true, TreeNodeRecursion::Jump))
        })?;
        children.push(plan.data);
    }
    if !changed {
        return Ok(Transformed::no(Arc::clone(node)));
    }
    children.insert(0, input);
    let options = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute);
    Ok(Transformed::yes(
        Arc::clone(node).replace_children(children, options)?,
    ))
}

/// Whether the subquery's subtree `t` may stand for a copy of itself: every leaf is a
/// file scan (whose displayed plan names its files; an in-memory scan's shows only
/// its sizes), and it holds no volatile function, no dynamic filter, no scalar
/// subquery's value (all display alike before they run) and no shared or nested
/// subquery part.
fn shareable(t: &Arc<dyn ExecutionPlan>) -> Result<bool> {
    let mut refused = false;
    t.apply(|node| {
        let leaf_not_a_file_scan =
            node.children().is_empty() && file_scan_config(node.as_ref()).is_none();
        if leaf_not_a_file_scan
            || node.downcast_ref::<ScalarSubqueryExec>().is_some()
            || node.downcast_ref::<ShareExec>().is_some()
            || node.downcast_ref::<ReuseExec>().is_some()
        {
            refused = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        let mut exprs = node_expressions(node.as_ref())?;
        if let Some(predicate) = scan_predicate(node.as_ref()) {
            exprs.push(predicate);
        }
        for e in &exprs {
            let context_dependent = e.exists(|x| {
                Ok(x.is::<DynamicFilterPhysicalExpr>() || x.is::<ScalarSubqueryExpr>())
            })?;
            if is_volatile(e) || context_dependent {
                refused = true;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(!refused)
}

fn node_expressions(node: &dyn ExecutionPlan) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
    let mut exprs = vec![];
    node.apply_expressions(&mut |e| {
        exprs.push(Arc::clone(e));
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(exprs)
}

/// The predicate of a Parquet scan `node`, if it is one and has one.
pub(crate) fn scan_predicate(node: &dyn ExecutionPlan) -> Option<Arc<dyn PhysicalExpr>> {
    file_scan_config(node)?
        .file_source()
        .downcast_ref::<ParquetSource>()?
        .filter()
}

/// The plan of `plan` as displayed, which names every node, expression and file; with
/// `strip`, its scans' dynamic filters left out. `None` where a dynamic filter stays
/// (one in a node other than a Parquet scan's predicate, or a predicate of nothing
/// else).
fn plan_key(plan: &Arc<dyn ExecutionPlan>, strip: bool) -> Result<Option<String>> {
    let plan = if strip {
        let mut left = false;
        let stripped = Arc::clone(plan)
            .transform_up(|node| match without_dynamic_filters(&node) {
                Some(Some(scan)) => Ok(Transformed::yes(scan)),
                Some(None) => {
                    left = true;
                    Ok(Transformed::no(node))
                }
                None => Ok(Transformed::no(node)),
            })
            .data()?;
        if left {
            return Ok(None);
        }
        stripped
    } else {
        Arc::clone(plan)
    };
    let mut dynamic = false;
    // The display names files by their paths: the stores they are in, too.
    let mut stores = String::new();
    plan.apply(|node| {
        for e in node_expressions(node.as_ref())? {
            dynamic |= holds_dynamic_filter(&e)?;
        }
        if let Some(config) = file_scan_config(node.as_ref()) {
            stores.push_str(config.object_store_url.as_str());
            stores.push('\n');
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if dynamic {
        return Ok(None);
    }
    let shown = displayable(plan.as_ref()).indent(true).to_string();
    Ok(Some(stores + &shown))
}

/// For a Parquet scan whose predicate holds dynamic filters: the scan without them
/// (`Some(None)` where nothing else is left of the predicate); `None` for any other
/// node.
fn without_dynamic_filters(
    node: &Arc<dyn ExecutionPlan>,
) -> Option<Option<Arc<dyn ExecutionPlan>>> {
    let config = file_scan_config(node.as_ref())?;
    let parquet = config.file_source().downcast_ref::<ParquetSource>()?;
    let predicate = parquet.filter()?;
    let dynamic = |e: &Arc<dyn PhysicalExpr>| holds_dynamic_filter(e).unwrap_or(true);
    if !dynamic(&predicate) {
        return None;
    }
    let kept: Vec<_> = split_conjunction(&predicate)
        .into_iter()
        .filter(|c| !dynamic(c))
        .cloned()
        .collect();
    if kept.is_empty() {
        return Some(None);
    }
    let source = parquet.with_predicate(conjunction(kept));
    let config = FileScanConfigBuilder::from(config.clone())
        .with_source(Arc::new(source))
        .build();
    Some(Some(
        DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
    ))
}

/// The output a [`ShareExec`] kept, per partition, for its [`ReuseExec`].
///
/// All or nothing: the query's copy reads kept output only if every partition was
/// kept. A partition computed again need not hold the rows it held the first time (a
/// round-robin repartition deals batches as they come), so mixing kept and computed
/// partitions could repeat some rows and lose others.
#[derive(Debug)]
struct SharedOutput {
    id: usize,
    partitions: Mutex<Vec<Slot>>,
    /// Bytes kept now, over all partitions.
    held: AtomicUsize,
}

#[derive(Debug)]
enum Slot {
    /// Not run to its end (yet).
    Pending,
    Kept(Kept),
    /// Read by the `ReuseExec`.
    Taken,
    /// Not kept: over the limit, failed, or dropped because another partition was.
    Dropped,
}

#[derive(Debug)]
struct Kept {
    batches: Vec<RecordBatch>,
    bytes: usize,
    reservation: MemoryReservation,
}

impl SharedOutput {
    fn new(id: usize, partitions: usize) -> Self {
        Self {
            id,
            partitions: Mutex::new((0..partitions).map(|_| Slot::Pending).collect()),
            held: AtomicUsize::new(0),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `bytes` more as kept, if that stays within `limit`.
    fn admit(&self, bytes: usize, limit: usize) -> bool {
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > limit {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Sets `partition`'s slot, releasing what it kept before.
    fn set(&self, partition: usize, slot: Slot) {
        if let Some(old) = self.slots().get_mut(partition) {
            if let Slot::Kept(kept) = std::mem::replace(old, slot) {
                self.release(kept.bytes);
            }
        }
    }

    /// What was kept of `partition`, if every partition was kept; otherwise `None`,
    /// and nothing is kept from then on.
    fn take(&self, partition: usize) -> Option<Kept> {
        let mut slots = self.slots();
        let all_kept = slots
            .iter()
            .all(|s| matches!(s, Slot::Kept(_) | Slot::Taken));
        if !all_kept {
            for slot in slots.iter_mut() {
                if let Slot::Kept(kept) = std::mem::replace(slot, Slot::Dropped) {
                    self.release(kept.bytes);
                }
            }
            return None;
        }
        match std::mem::replace(slots.get_mut(partition)?, Slot::Taken) {
            Slot::Kept(kept) => {
                self.release(kept.bytes);
                Some(kept)
            }
            _ => None,
        }
    }
}

/// Runs the subquery's copy of a shared subplan and keeps its output for a
/// [`ReuseExec`], partition by partition, within the memory budget.
#[derive(Debug)]
pub(crate) struct ShareExec {
    input: Arc<dyn ExecutionPlan>,
    shared: Arc<SharedOutput>,
}

impl ShareExec {
    fn new(input: Arc<dyn ExecutionPlan>, shared: Arc<SharedOutput>) -> Self {
        Self { input, shared }
    }
}

impl DisplayAs for ShareExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "share={}", self.shared.id),
            _ => write!(f, "ShareExec: share={}", self.shared.id),
        }
    }
}

impl ExecutionPlan for ShareExec {
    fn name(&self) -> &str {
        "ShareExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
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
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("ShareExec has one child, got {}", children.len());
        }
        Ok(Arc::new(Self::new(
            children.remove(0),
            Arc::clone(&self.shared),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let pool = context.memory_pool();
        let limit = match pool.memory_limit() {
            MemoryLimit::Finite(bytes) => bytes / 8,
            MemoryLimit::Infinite | MemoryLimit::Unknown => UNLIMITED_POOL_SHARE,
        };
        let reservation = MemoryConsumer::new(format!("ShareExec[{partition}]")).register(pool);
        // A run again (a plan reset) keeps anew.
        self.shared.set(partition, Slot::Pending);
        Ok(Box::pin(Keeping {
            input: self.input.execute(partition, context)?,
            shared: Arc::clone(&self.shared),
            partition,
            limit,
            kept: Some(Kept {
                batches: vec![],
                bytes: 0,
                reservation,
            }),
        }))
    }
}

/// A partition of a [`ShareExec`]: its input's batches, passed on and kept.
struct Keeping {
    input: SendableRecordBatchStream,
    shared: Arc<SharedOutput>,
    partition: usize,
    limit: usize,
    /// `None` once the partition keeps nothing (over its limit, or failed).
    kept: Option<Kept>,
}

impl Keeping {
    fn give_up(&mut self) {
        if let Some(kept) = self.kept.take() {
            self.shared.release(kept.bytes);
            self.shared.set(self.partition, Slot::Dropped);
        }
    }
}

impl Stream for Keeping {
    type Item = Result<RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.input.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(batch))) => {
                if let Some(kept) = &mut this.kept {
                    let bytes = batch.get_array_memory_size();
                    if this.shared.admit(bytes, this.limit) {
                        if kept.reservation.try_grow(bytes).is_ok() {
                            kept.bytes += bytes;
                            kept.batches.push(batch.clone());
                        } else {
                            this.shared.release(bytes);
                            this.give_up();
                        }
                    } else {
                        this.give_up();
                    }
                }
                Poll::Ready(Some(Ok(batch)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.give_up();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                if let Some(kept) = this.kept.take() {
                    this.shared.set(this.partition, Slot::Kept(kept));
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl RecordBatchStream for Keeping {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}

impl Drop for Keeping {
    fn drop(&mut self) {
        // A partition not read to its end keeps nothing.
        self.give_up();
    }
}

/// The query's copy of a shared subplan: reads what the [`ShareExec`] kept of a
/// partition, or, where it kept nothing, computes the partition with its own copy.
#[derive(Debug)]
pub(crate) struct ReuseExec {
    own: Arc<dyn ExecutionPlan>,
    shared: Arc<SharedOutput>,
    metrics: ExecutionPlanMetricsSet,
}

impl ReuseExec {
    fn new(own: Arc<dyn ExecutionPlan>, shared: Arc<SharedOutput>) -> Self {
        Self {
            own,
            shared,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for ReuseExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "share={}", self.shared.id),
            _ => write!(f, "ReuseExec: share={}", self.shared.id),
        }
    }
}

impl ExecutionPlan for ReuseExec {
    fn name(&self) -> &str {
        "ReuseExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.own.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.own]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("ReuseExec has one child, got {}", children.len());
        }
        Ok(Arc::new(Self::new(
            children.remove(0),
            Arc::clone(&self.shared),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        // The query's copy runs only once the subquery ran (`ScalarSubqueryExec`
        // executes its main input after its subqueries): decided here, and what was
        // kept is released with the stream, read or not.
        match self.shared.take(partition) {
            Some(kept) => {
                MetricBuilder::new(&self.metrics)
                    .counter("reused_rows", partition)
                    .add(kept.batches.iter().map(RecordBatch::num_rows).sum());
                Ok(Box::pin(cooperative(Replay {
                    schema: self.schema(),
                    batches: kept.batches.into(),
                    reservation: kept.reservation,
                })))
            }
            None => {
                MetricBuilder::new(&self.metrics)
                    .counter("computed_partitions", partition)
                    .add(1);
                self.own.execute(partition, context)
            }
        }
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Kept batches, handed out once; the memory they hold is released as they go.
struct Replay {
    schema: SchemaRef,
    batches: VecDeque<RecordBatch>,
    reservation: MemoryReservation,
}

impl RecordBatchStream for Replay {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

impl Stream for Replay {
    type Item = Result<RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let batch = self.batches.pop_front();
        if let Some(b) = &batch {
            self.reservation
                .shrink(b.get_array_memory_size().min(self.reservation.size()));
        }
        Poll::Ready(batch.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// `big` (`k` 0..40000, in 4 files) and `small` (`k` 0..10), with the rule or
    /// without it, in a memory pool of `pool` bytes.
    fn context(dir: &std::path::Path, share: bool, pool: Option<usize>) -> SessionContext {
        for (table, files, rows) in [("big", 4, 10_000), ("small", 1, 10)] {
            let folder = dir.join(table);
            if folder.exists() {
                continue;
            }
            std::fs::create_dir_all(&folder).unwrap();
            for f in 0..files {
                let k = Int64Array::from_iter_values(f * rows..(f + 1) * rows);
                let batch = RecordBatch::try_from_iter([("k", Arc::new(k) as _)]).unwrap();
                let file = std::fs::File::create(folder.join(format!("{f}.parquet")));
                let mut w = ArrowWriter::try_new(file.unwrap(), batch.schema(), None).unwrap();
                w.write(&batch).unwrap();
                w.close().unwrap();
            }
        }
        let mut config = SessionConfig::new().with_target_partitions(2);
        config.options_mut().execution.sort_spill_reservation_bytes = 64 << 10;
        let mut runtime = RuntimeEnvBuilder::new();
        if let Some(bytes) = pool {
            runtime = runtime.with_memory_pool(Arc::new(GreedyMemoryPool::new(bytes)));
        }
        let mut state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime.build_arc().unwrap())
            .with_default_features();
        if share {
            state = state.with_physical_optimizer_rule(Arc::new(SharedSubplans));
        }
        let ctx = SessionContext::new_with_state(state.build());
        let rt = tokio::runtime::Runtime::new().unwrap();
        for t in ["big", "small"] {
            let path = format!("{}/{t}/", dir.display());
            rt.block_on(ctx.register_parquet(t, &path, Default::default()))
                .unwrap();
        }
        ctx
    }

    /// What a run of `sql` shows: its sorted rows, its plan, and over its `ReuseExec`s
    /// the rows read from a `ShareExec` and the partitions computed anew.
    struct Run {
        rows: String,
        plan: String,
        reused_rows: usize,
        computed_partitions: usize,
    }

    fn run(ctx: &SessionContext, sql: &str) -> Run {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let df = ctx.sql(&format!("{sql} ORDER BY 1, 2")).await.unwrap();
            let plan = df.create_physical_plan().await.unwrap();
            let batches = collect(Arc::clone(&plan), ctx.task_ctx()).await.unwrap();
            let (mut reused_rows, mut computed_partitions) = (0, 0);
            plan.apply(|node| {
                if node.downcast_ref::<ReuseExec>().is_some() {
                    let metrics = node.metrics().unwrap();
                    let sum = |name: &str| metrics.sum_by_name(name).map_or(0, |v| v.as_usize());
                    reused_rows += sum("reused_rows");
                    computed_partitions += sum("computed_partitions");
                }
                Ok(TreeNodeRecursion::Continue)
            })
            .unwrap();
            let shown = displayable(plan.as_ref()).indent(true).to_string();
            Run {
                rows: pretty_format_batches(&batches).unwrap().to_string(),
                plan: shown,
                reused_rows,
                computed_partitions,
            }
        })
    }

    const GROUPS: &str =
        "WITH r AS (SELECT k % 7 AS g, sum(k) AS s FROM big WHERE k > 100 GROUP BY k % 7) ";

    #[test]
    fn a_subquery_and_its_query_compute_a_common_table_once() {
        let dir = tempfile::tempdir().unwrap();
        let (shared, plain) = (
            context(dir.path(), true, None),
            context(dir.path(), false, None),
        );
        for sql in [
            "SELECT g, s FROM r WHERE s = (SELECT max(s) FROM r)",
            // The query's copy is the probe side of a join, with its dynamic filter.
            "SELECT small.k, r.s FROM small JOIN r ON small.k = r.g \
             WHERE r.s > (SELECT avg(s) FROM r)",
        ] {
            let sql = format!("{GROUPS}{sql}");
            let (a, b) = (run(&shared, &sql), run(&plain, &sql));
            assert_eq!(a.rows, b.rows, "{sql}\n{}", a.plan);
            assert!(a.plan.contains("ShareExec: share=1"), "{sql}\n{}", a.plan);
            assert!(a.plan.contains("ReuseExec: share=1"), "{sql}\n{}", a.plan);
            assert!(!b.plan.contains("ShareExec"), "{}", b.plan);
            // Each partition of the query's copy read what the subquery's kept.
            assert_eq!(a.computed_partitions, 0, "{sql}\n{}", a.plan);
            assert_eq!(a.reused_rows, 7, "{sql}\n{}", a.plan);
        }
    }

    #[test]
    fn what_does_not_fit_the_budget_is_computed_again() {
        let dir = tempfile::tempdir().unwrap();
        // An eighth of 4 MiB does not keep all of the 40 000 groups.
        let (shared, plain) = (
            context(dir.path(), true, Some(4 << 20)),
            context(dir.path(), false, None),
        );
        let sql = "WITH r AS (SELECT k, sum(k * 2) AS s FROM big GROUP BY k) \
                   SELECT k, s FROM r WHERE s > (SELECT max(s) FROM r) - 5";
        let (a, b) = (run(&shared, sql), run(&plain, sql));
        assert_eq!(a.rows, b.rows, "{}", a.plan);
        assert!(a.plan.contains("ReuseExec"), "{}", a.plan);
        // All or nothing: both partitions computed anew, none read kept.
        assert_eq!((a.computed_partitions, a.reused_rows), (2, 0), "{}", a.plan);
        assert_eq!(a.rows.lines().count(), 3 + 3 + 1, "{}", a.rows);
    }

    #[test]
    fn volatile_or_different_subplans_are_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), true, None);
        for sql in [
            // `random()` computed once would pair each row with the same draw.
            "WITH r AS (SELECT k, random() AS x FROM big) \
             SELECT k, x FROM r WHERE x > (SELECT max(x) FROM r) - 0.0001",
            // Different filters: different plans.
            "SELECT k, k AS k2 FROM big WHERE k > 5 AND k < (SELECT max(k) FROM big WHERE k < 30)",
            // In-memory scans display alike whatever they hold.
            "SELECT column1, column1 AS c FROM (VALUES (1), (2)) \
             WHERE column1 < (SELECT max(column1) FROM (VALUES (10), (20)))",
        ] {
            let r = run(&ctx, sql);
            assert!(!r.plan.contains("ShareExec"), "{sql}\n{}", r.plan);
            if sql.contains("VALUES") {
                assert!(r.rows.contains("| 1       | 1 |"), "{}", r.rows);
            }
        }
    }

    #[test]
    fn unshare_puts_both_copies_back() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), true, None);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sql = format!("{GROUPS}SELECT g, s FROM r WHERE s = (SELECT max(s) FROM r)");
        let plan = rt.block_on(async {
            let df = ctx.sql(&sql).await.unwrap();
            df.create_physical_plan().await.unwrap()
        });
        let shown = displayable(plan.as_ref()).indent(true).to_string();
        let plain = unshare(Arc::clone(&plan)).unwrap();
        let plain_shown = displayable(plain.as_ref()).indent(true).to_string();
        assert!(shown.contains("ShareExec"), "{shown}");
        assert!(!plain_shown.contains("ShareExec") && !plain_shown.contains("ReuseExec"));
        assert_eq!(
            shown.lines().count(),
            plain_shown.lines().count() + 2,
            "{shown}\n{plain_shown}"
        );
    }
}
