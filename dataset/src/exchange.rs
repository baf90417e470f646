//! Repartitioning, shuffles, group-wise maps and splits: volley's own exchanges.
//!
//! Each is a stage boundary. When an execution plans an [`ExchangeSource`], the input
//! dataset runs to completion (in input order, so that seeded shuffles reproduce) into
//! an [`ExchangeStore`] that holds blocks against the memory budget and spills them to
//! Arrow IPC files beyond it; the source then reads the store back, one task per
//! output partition. The store and its spill folder go away with the execution.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{lexsort_to_indices, take_record_batch, SortColumn};
use arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionState;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use volley_common::{Result, VolleyError, MAX_EXCHANGE_PARTITIONS};
use volley_connectors::{DataSource, ReadTask, ScanRequest};
use volley_exec::{
    project_batch, Block, ClusterRows, ExchangeStore, FrozenStore, Partitioning, RowsPiece,
};
use volley_runtime::cluster::{EncodedTask, ObjectMeta, ObjectRef, RemoteTask, TaskContext};

use crate::dataset::Dataset;
use crate::logical::{ExchangeKind, LogicalOp};
use crate::options::MapOptions;
use crate::relational::{check_keys, GroupedDataset};

/// Partitions of a `random_shuffle`: fixed, so that a seed gives the same order on any
/// machine or cluster (partition `p` of a row is a hash of the seed and the row's
/// position, modulo this).
pub const SHUFFLE_PARTITIONS: usize = 64;

/// Runs `input` in order into a store with `partitioning`.
fn materialize(input: &Dataset, partitioning: Partitioning) -> Result<FrozenStore> {
    let ctx = input.context();
    let schema = input.schema()?;
    let mut store = ExchangeStore::new(
        schema,
        partitioning,
        Arc::clone(&ctx.exec_context().budget),
        ctx.config().exec.spill_dir.clone(),
    )?;
    for batch in input.ordered_batches()? {
        store.push(batch?)?;
    }
    Ok(store.finish())
}

/// A read task streaming what `produce` yields, projected.
fn task<I>(
    label: String,
    size: u64,
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    produce: impl Fn() -> Result<I> + Send + Sync + 'static,
) -> ReadTask
where
    I: Iterator<Item = Result<RecordBatch>> + Send + 'static,
{
    ReadTask::new(label, size, move |_ctx| {
        let schema = Arc::clone(&schema);
        let projection = projection.clone();
        let out_schema = Arc::clone(&schema);
        let items = produce()?.map(move |b| {
            b.and_then(|b| project_batch(&b, &projection, &schema))
                .map_err(Into::into)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            out_schema,
            futures::stream::iter(items),
        )))
    })
}

/// How an exchange's store partitions the rows.
fn partitioning(kind: &ExchangeKind) -> Partitioning {
    match kind {
        ExchangeKind::Repartition { .. } | ExchangeKind::RandomizeBlockOrder { .. } => {
            Partitioning::Single
        }
        ExchangeKind::RepartitionBy { keys, n } | ExchangeKind::Groups { keys, n } => {
            Partitioning::Hash {
                keys: keys.clone(),
                n: *n,
            }
        }
        ExchangeKind::RandomShuffle { seed, n } => Partitioning::Random { seed: *seed, n: *n },
    }
}

/// An exchange as a dataset source: what an [`LogicalOp::Exchange`] node becomes before
/// planning.
#[derive(Debug)]
struct ExchangeSource {
    input: Dataset,
    kind: ExchangeKind,
    schema: SchemaRef,
    /// Bytes the latest execution spilled.
    spilled: AtomicU64,
}

impl ExchangeSource {
    /// One read task per output partition of `store` (whose columns are `stored`).
    fn tasks(&self, store: &Arc<FrozenStore>, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let out_schema = match &request.projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let proj = request.projection.clone();
        let mut tasks = Vec::new();
        match &self.kind {
            ExchangeKind::Repartition { n } => {
                let total = store.rows();
                let n = (*n).max(1) as u64;
                for i in 0..n {
                    let (start, end) = (total * i / n, total * (i + 1) / n);
                    let store = Arc::clone(store);
                    tasks.push(task(
                        format!("partition {i} (rows {start}..{end})"),
                        end - start,
                        Arc::clone(&out_schema),
                        proj.clone(),
                        move || Ok(store.read_range(0, start, end)),
                    ));
                }
            }
            ExchangeKind::RepartitionBy { .. } => {
                for p in 0..store.partitions() {
                    let store2 = Arc::clone(store);
                    tasks.push(task(
                        format!("partition {p}"),
                        store.partition_rows(p),
                        Arc::clone(&out_schema),
                        proj.clone(),
                        move || Ok(store2.read_range(p, 0, u64::MAX)),
                    ));
                }
            }
            ExchangeKind::RandomShuffle { .. } => {
                for p in 0..store.partitions() {
                    let store2 = Arc::clone(store);
                    tasks.push(task(
                        format!("partition {p}"),
                        store.partition_rows(p),
                        Arc::clone(&out_schema),
                        proj.clone(),
                        // One block per partition: a slice of it would count the whole.
                        move || Ok(std::iter::once(store2.read_partition(p))),
                    ));
                }
            }
            ExchangeKind::RandomizeBlockOrder { seed } => {
                for i in block_order(store.partition_blocks(0), *seed) {
                    let store2 = Arc::clone(store);
                    tasks.push(task(
                        format!("block {i}"),
                        0,
                        Arc::clone(&out_schema),
                        proj.clone(),
                        move || Ok(std::iter::once(store2.block(0, i))),
                    ));
                }
            }
            ExchangeKind::Groups { keys, .. } => {
                let key_idx: Vec<usize> = keys
                    .iter()
                    .map(|k| self.schema.index_of(k))
                    .collect::<std::result::Result<_, _>>()?;
                for p in 0..store.partitions() {
                    let store2 = Arc::clone(store);
                    let key_idx = key_idx.clone();
                    tasks.push(task(
                        format!("groups of partition {p}"),
                        store.partition_rows(p),
                        Arc::clone(&out_schema),
                        proj.clone(),
                        move || {
                            let groups = groups(&store2.read_partition(p)?, &key_idx)?;
                            Ok(groups.into_iter().map(Ok))
                        },
                    ));
                }
            }
        }
        Ok(tasks)
    }
}

/// The rows of `batch` sorted by the key columns and cut into one batch per group.
/// `randomize_block_order`'s order of `blocks` blocks with `seed`: the same here and on
/// a cluster.
pub(crate) fn block_order(blocks: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..blocks).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    order
}

pub(crate) fn groups(batch: &RecordBatch, keys: &[usize]) -> Result<Vec<RecordBatch>> {
    if batch.num_rows() == 0 {
        return Ok(vec![]);
    }
    let columns: Vec<SortColumn> = keys
        .iter()
        .map(|&i| SortColumn {
            values: Arc::clone(batch.column(i)),
            options: None,
        })
        .collect();
    let order = lexsort_to_indices(&columns, None)?;
    let sorted = take_record_batch(batch, &order)?;
    let key_cols: Vec<ArrayRef> = keys.iter().map(|&i| Arc::clone(sorted.column(i))).collect();
    let ranges = arrow::compute::partition(&key_cols)?.ranges();
    Ok(ranges
        .into_iter()
        .map(|r| sorted.slice(r.start, r.end - r.start))
        .collect())
}

#[async_trait::async_trait]
impl DataSource for ExchangeSource {
    fn name(&self) -> String {
        "Exchange".into()
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn describe(&self) -> String {
        self.kind.describe()
    }

    fn ordered(&self) -> bool {
        self.kind.ordered()
    }

    fn explain_detail(&self, _request: &ScanRequest) -> Option<String> {
        Some(match self.input.physical() {
            Ok(p) => format!("stage boundary: runs to completion first:\n{p}"),
            Err(e) => format!("(cannot plan the input: {e})"),
        })
    }

    fn spilled_bytes(&self) -> u64 {
        self.spilled.load(Ordering::Relaxed)
    }

    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let input = self.input.clone();
        let partitioning = partitioning(&self.kind);
        let store = tokio::task::spawn_blocking(move || materialize(&input, partitioning))
            .await
            .map_err(|e| VolleyError::internal(format!("exchange thread failed: {e}")))??;
        let store = Arc::new(store);
        self.spilled.store(store.spilled_bytes(), Ordering::Relaxed);
        self.tasks(&store, request)
    }
}

/// A materialization shared by the outputs of a split: in this process (a store that
/// spills), or on a cluster (the input's blocks, left in the nodes' stores).
#[derive(Debug)]
struct Shared {
    input: Dataset,
    partitioning: Partitioning,
    store: Mutex<Option<Arc<FrozenStore>>>,
    blocks: Mutex<Option<Arc<Vec<(ObjectRef, ObjectMeta)>>>>,
}

impl Shared {
    /// Runs the input the first time any output is consumed; later reads reuse it.
    fn get(&self) -> Result<Arc<FrozenStore>> {
        let mut slot = self.store.lock().expect("split lock");
        if let Some(s) = slot.as_ref() {
            return Ok(Arc::clone(s));
        }
        let store = Arc::new(materialize(&self.input, self.partitioning.clone())?);
        *slot = Some(Arc::clone(&store));
        Ok(store)
    }

    /// On a cluster: runs the input (in order) the first time any output is consumed,
    /// keeping references to its blocks where they are; a block made in this process
    /// is put into the cluster. Stops (with [`VolleyError::Cancelled`]) once `cancel`
    /// is set; a run that failed or stopped leaves the next reader to run it again, as
    /// locally.
    fn blocks(&self, cancel: &AtomicBool) -> Result<Arc<Vec<(ObjectRef, ObjectMeta)>>> {
        let mut slot = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            return Ok(Arc::clone(b));
        }
        if cancel.load(Ordering::Acquire) {
            return Err(VolleyError::Cancelled);
        }
        let blocks = self.run_on_cluster(cancel)?;
        *slot = Some(Arc::clone(&blocks));
        Ok(blocks)
    }

    fn run_on_cluster(&self, cancel: &AtomicBool) -> Result<Arc<Vec<(ObjectRef, ObjectMeta)>>> {
        let cluster = self.input.context().cluster().cloned().ok_or_else(|| {
            VolleyError::internal("a split planned for a cluster runs without one")
        })?;
        let mut stream = self.input.ordered_batches()?;
        let mut blocks = Vec::new();
        while let Some(block) = stream.next_block() {
            if cancel.load(Ordering::Acquire) {
                return Err(VolleyError::Cancelled);
            }
            match block? {
                Block::Remote(r) if r.meta.rows == 0 => {}
                Block::Local(b) if b.num_rows() == 0 => {}
                Block::Remote(r) => blocks.push((r.object, r.meta)),
                Block::Local(batch) => {
                    let meta = ObjectMeta {
                        rows: batch.num_rows() as u64,
                        bytes: volley_common::batch_memory(&batch),
                        addresses: vec![],
                    };
                    let object = cluster
                        .put(vec![batch])
                        .map_err(|e| e.context("putting a block of a split into the cluster"))?;
                    blocks.push((object, meta));
                }
            }
        }
        Ok(Arc::new(blocks))
    }
}

/// Which rows of a shared materialization a split output holds.
#[derive(Debug, Clone, Copy)]
enum Bounds {
    /// Part `i` of `n` equal parts.
    Fraction { i: u64, n: u64 },
    /// Rows `start..end` (clamped to the total).
    Rows { start: u64, end: u64 },
    /// The last `fraction` of the rows (rounded down), or everything before them.
    Tail { fraction: f64, tail: bool },
}

impl Bounds {
    fn resolve(self, total: u64) -> (u64, u64) {
        match self {
            Bounds::Fraction { i, n } => (total * i / n, total * (i + 1) / n),
            Bounds::Rows { start, end } => (start.min(total), end.min(total)),
            Bounds::Tail { fraction, tail } => {
                let cut = total - ((total as f64 * fraction).floor() as u64).min(total);
                if tail {
                    (cut, total)
                } else {
                    (0, cut)
                }
            }
        }
    }
}

/// One output of a split (a [`LogicalOp::Split`] node): which rows of the input,
/// materialized once for all the outputs, it holds.
#[derive(Debug, Clone)]
pub struct SplitOutput {
    shared: Arc<Shared>,
    bounds: Bounds,
    schema: SchemaRef,
    parts: usize,
}

impl SplitOutput {
    /// Its rows, as `explain` shows them.
    pub fn describe(&self) -> String {
        match self.bounds {
            Bounds::Fraction { i, n } => format!("part {} of {n}", i + 1),
            Bounds::Rows { start, end } => format!("rows {start}..{end}"),
            Bounds::Tail {
                fraction,
                tail: true,
            } => format!("last {fraction} of the rows"),
            Bounds::Tail {
                fraction,
                tail: false,
            } => format!("all but the last {fraction} of the rows"),
        }
    }

    /// Its schema (the input's).
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The source it becomes before planning: it runs the shared input the first time
    /// any output of the split is read.
    pub(crate) fn source(&self) -> Arc<dyn DataSource> {
        Arc::new(SplitSource(self.clone()))
    }

    /// Its rows on a cluster: the shared input's blocks (made the first time any
    /// output of the split is read) within its bounds.
    pub(crate) fn cluster_rows(&self) -> Arc<dyn ClusterRows> {
        Arc::new(SplitRows(self.clone()))
    }

    /// The plan of the input all outputs share (planning runs nothing).
    pub(crate) fn input_plan(&self) -> Result<volley_exec::PhysicalPlan> {
        self.shared.input.physical()
    }
}

/// A split's output on a cluster.
#[derive(Debug)]
struct SplitRows(SplitOutput);

impl ClusterRows for SplitRows {
    fn pieces(&self, cancel: &AtomicBool) -> Result<Vec<RowsPiece>> {
        let blocks = self.0.shared.blocks(cancel)?;
        let total = blocks.iter().map(|(_, m)| m.rows).sum();
        let (start, end) = self.0.bounds.resolve(total);
        let rows: Vec<u64> = blocks.iter().map(|(_, m)| m.rows).collect();
        Ok(cuts(&rows, start, end)
            .into_iter()
            .map(|(i, offset, rows)| RowsPiece {
                object: blocks[i].0.clone(),
                meta: blocks[i].1.clone(),
                offset,
                rows,
            })
            .collect())
    }

    fn slice_task(&self, offset: u64, rows: u64) -> Result<EncodedTask> {
        EncodedTask::new(Box::new(SliceTask { offset, rows }))
    }
}

/// Which rows of blocks of `rows` rows each (in order) hold rows `start..end` of them
/// all: `(block, first row in it, rows)`, no empty ones.
fn cuts(rows: &[u64], start: u64, end: u64) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    let mut first = 0u64;
    for (i, &n) in rows.iter().enumerate() {
        let (a, b) = (start.max(first), end.min(first + n));
        if a < b {
            out.push((i, a - first, b - a));
        }
        first += n;
    }
    out
}

/// The task that takes rows `offset..offset + rows` of the object it is given (a block
/// a split's bounds cut), on a node that holds it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SliceTask {
    offset: u64,
    rows: u64,
}

#[typetag::serde(name = "volley::SliceTask")]
impl RemoteTask for SliceTask {
    fn run(&self, _: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let (mut skip, mut left) = (self.offset as usize, self.rows as usize);
        let mut out = Vec::new();
        for batch in inputs.into_iter().flatten() {
            if left == 0 {
                break;
            }
            let n = batch.num_rows();
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = left.min(n - skip);
            out.push(batch.slice(skip, take));
            left -= take;
            skip = 0;
        }
        if left > 0 {
            return Err(VolleyError::internal(format!(
                "a split's slice asks for rows {}..{} of a block with fewer",
                self.offset,
                self.offset + self.rows
            )));
        }
        Ok(out)
    }
}

/// A split's output as a source.
#[derive(Debug)]
struct SplitSource(SplitOutput);

#[async_trait::async_trait]
impl DataSource for SplitSource {
    fn name(&self) -> String {
        "Split".into()
    }

    fn schema(&self) -> SchemaRef {
        self.0.schema()
    }

    fn describe(&self) -> String {
        self.0.describe()
    }

    fn ordered(&self) -> bool {
        true
    }

    fn spilled_bytes(&self) -> u64 {
        self.0
            .shared
            .store
            .lock()
            .expect("split lock")
            .as_ref()
            .map_or(0, |s| s.spilled_bytes())
    }

    fn explain_detail(&self, _request: &ScanRequest) -> Option<String> {
        Some(match self.0.shared.input.physical() {
            Ok(p) => format!("stage boundary: materialized once for all parts of the split:\n{p}"),
            Err(e) => format!("(cannot plan the input: {e})"),
        })
    }

    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let shared = Arc::clone(&self.0.shared);
        let store = tokio::task::spawn_blocking(move || shared.get())
            .await
            .map_err(|e| VolleyError::internal(format!("split thread failed: {e}")))??;
        let out_schema = match &request.projection {
            Some(p) => Arc::new(self.0.schema.project(p)?),
            None => self.0.schema(),
        };
        let (start, end) = self.0.bounds.resolve(store.rows());
        // A few tasks per part, over consecutive row ranges.
        let n = self.0.parts.max(1) as u64;
        let len = end.saturating_sub(start);
        Ok((0..n)
            .map(|i| {
                let (a, b) = (start + len * i / n, start + len * (i + 1) / n);
                let store = Arc::clone(&store);
                task(
                    format!("rows {a}..{b}"),
                    b - a,
                    Arc::clone(&out_schema),
                    request.projection.clone(),
                    move || Ok(store.read_range(0, a, b)),
                )
            })
            .collect())
    }
}

impl Dataset {
    fn exchange(&self, kind: ExchangeKind) -> Result<Dataset> {
        if let ExchangeKind::RepartitionBy { keys, .. } | ExchangeKind::Groups { keys, .. } = &kind
        {
            if keys.is_empty() {
                return Err(VolleyError::plan(
                    "repartition by keys needs at least one key",
                ));
            }
            check_keys(&self.schema()?, keys, "key")?;
        }
        Ok(self.with(LogicalOp::Exchange {
            input: Arc::clone(self.logical_plan()),
            kind,
        }))
    }

    fn cpus(&self) -> usize {
        self.context().runtime().total().num_cpus.ceil().max(1.0) as usize
    }

    /// `n` partitions of (nearly) equal row counts, rows in their input order. What a
    /// later `write_parquet` makes of them: one file per partition.
    pub fn repartition(&self, n: usize) -> Result<Dataset> {
        check_parts("repartition", n)?;
        self.exchange(ExchangeKind::Repartition { n })
    }

    /// `n` partitions by a hash of the `keys` columns: rows with equal keys end up in
    /// the same partition.
    pub fn repartition_by(&self, keys: &[&str], n: usize) -> Result<Dataset> {
        check_parts("repartition", n)?;
        self.exchange(ExchangeKind::RepartitionBy {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            n,
        })
    }

    /// All rows in a random order; the same `seed` over the same input gives the same
    /// order, on any machine or cluster. Rows go to [`SHUFFLE_PARTITIONS`] partitions
    /// (a number that does not follow the CPUs, which would change the order), each
    /// shuffled in memory when read, so a partition (about 1/64 of the data) must fit
    /// in memory.
    pub fn random_shuffle(&self, seed: u64) -> Result<Dataset> {
        self.exchange(ExchangeKind::RandomShuffle {
            seed,
            n: SHUFFLE_PARTITIONS,
        })
    }

    /// The input's blocks in a random order (rows within a block keep theirs): a cheap
    /// shuffle for training input.
    pub fn randomize_block_order(&self, seed: u64) -> Result<Dataset> {
        self.exchange(ExchangeKind::RandomizeBlockOrder { seed })
    }

    fn split_sources(
        &self,
        bounds: Vec<Bounds>,
        partitioning: Partitioning,
    ) -> Result<Vec<Dataset>> {
        let schema = self.schema()?;
        let shared = Arc::new(Shared {
            input: self.clone(),
            partitioning,
            store: Mutex::new(None),
            blocks: Mutex::new(None),
        });
        let parts = self.cpus();
        Ok(bounds
            .into_iter()
            .map(|bounds| {
                self.with(LogicalOp::Split {
                    input: Arc::clone(self.logical_plan()),
                    output: SplitOutput {
                        shared: Arc::clone(&shared),
                        bounds,
                        schema: Arc::clone(&schema),
                        parts,
                    },
                })
            })
            .collect())
    }

    /// `n` datasets of (nearly) equal row counts that together hold every row, in
    /// order. The input runs once, when the first of them is consumed; its rows are
    /// kept (in memory within the budget, spilled beyond it) while any of them lives.
    /// On a cluster they stay in the nodes' stores (which spill), and this process
    /// keeps references to them.
    pub fn split(&self, n: usize) -> Result<Vec<Dataset>> {
        check_parts("split", n)?;
        let n = n as u64;
        self.split_sources(
            (0..n).map(|i| Bounds::Fraction { i, n }).collect(),
            Partitioning::Single,
        )
    }

    /// Datasets of the rows before `indices[0]`, between consecutive indices, and after
    /// the last one (indices must not decrease; ones past the end give empty parts).
    pub fn split_at_indices(&self, indices: &[u64]) -> Result<Vec<Dataset>> {
        if indices.windows(2).any(|w| w[0] > w[1]) {
            return Err(VolleyError::plan(format!(
                "split_at_indices: indices must not decrease: {indices:?}"
            )));
        }
        let mut bounds = Vec::new();
        let mut start = 0;
        for &i in indices {
            bounds.push(Bounds::Rows { start, end: i });
            start = i;
        }
        bounds.push(Bounds::Rows {
            start,
            end: u64::MAX,
        });
        self.split_sources(bounds, Partitioning::Single)
    }

    /// A (train, test) pair: the rows shuffled with `seed`, the last `test_fraction`
    /// of them (rounded down) for test.
    pub fn train_test_split(&self, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..=1.0).contains(&test_fraction) {
            return Err(VolleyError::plan(format!(
                "train_test_split: test_fraction must be within 0..=1, got {test_fraction}"
            )));
        }
        let shuffled = self.random_shuffle(seed)?;
        let mut parts = shuffled.split_sources(
            vec![
                Bounds::Tail {
                    fraction: test_fraction,
                    tail: false,
                },
                Bounds::Tail {
                    fraction: test_fraction,
                    tail: true,
                },
            ],
            Partitioning::Single,
        )?;
        let test = parts.pop().expect("two parts");
        let train = parts.pop().expect("two parts");
        Ok((train, test))
    }
}

impl GroupedDataset {
    /// Calls `f` once per group with all of the group's rows (sorted by nothing in
    /// particular), and keeps what it returns. Groups are found by hashing the keys
    /// into partitions (spilled beyond the budget) and sorting each partition, so one
    /// partition must fit in memory; a group is always whole.
    pub fn map_groups(
        &self,
        name: &str,
        f: impl Fn(RecordBatch) -> Result<RecordBatch> + Send + Sync + 'static,
    ) -> Result<Dataset> {
        let n = (2 * self.dataset.cpus()).max(16);
        let grouped = self.dataset.exchange(ExchangeKind::Groups {
            keys: self.keys.clone(),
            n,
        })?;
        // One block per group reaches `f`: no batch size, so blocks pass as they are.
        Ok(grouped.map_batches(name, f, MapOptions::default()))
    }
}

/// The source an exchange node becomes before planning: the exchange over its
/// (optimized) input.
pub(crate) fn exchange_source(input: Dataset, kind: ExchangeKind) -> Result<Arc<dyn DataSource>> {
    let schema = input.schema()?;
    Ok(Arc::new(ExchangeSource {
        input,
        kind,
        schema,
        spilled: AtomicU64::new(0),
    }))
}

/// Checks a partition (or part) count that `what` was given: at least one, at most
/// [`MAX_EXCHANGE_PARTITIONS`].
pub(crate) fn check_parts(what: &str, n: usize) -> Result<()> {
    if n == 0 {
        return Err(VolleyError::plan(format!(
            "{what} needs at least one partition"
        )));
    }
    if n > MAX_EXCHANGE_PARTITIONS {
        return Err(VolleyError::plan(format!(
            "{what} into {n} partitions: at most {MAX_EXCHANGE_PARTITIONS}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_take_whole_blocks_and_slice_the_ends() {
        let rows = [10, 0, 5, 20];
        // Rows 7..30: the end of the first block, the whole third, the start of the
        // fourth; the empty block is skipped.
        assert_eq!(cuts(&rows, 7, 30), vec![(0, 7, 3), (2, 0, 5), (3, 0, 15)]);
        assert_eq!(cuts(&rows, 0, 35), vec![(0, 0, 10), (2, 0, 5), (3, 0, 20)]);
        assert_eq!(cuts(&rows, 12, 13), vec![(2, 2, 1)]);
        assert!(cuts(&rows, 10, 10).is_empty());
        assert!(cuts(&rows, 35, 40).is_empty());
    }

    #[test]
    fn slice_task_takes_its_rows_across_batches() {
        let ctx = crate::Context::try_default().unwrap();
        let batches = ctx.range(10).collect().unwrap();
        let parts: Vec<RecordBatch> = batches
            .iter()
            .flat_map(|b| [b.slice(0, 4), b.slice(4, 6)])
            .collect();
        let task = SliceTask { offset: 3, rows: 5 };
        let tc = TaskContext {
            task_id: "t".into(),
            attempt: 0,
            job_id: "j".into(),
            node_id: "n".into(),
            gpu_ids: vec![],
            name: String::new(),
        };
        let out = task.run(&tc, vec![parts.clone()]).unwrap();
        let got: Vec<i64> = out
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(got, vec![3, 4, 5, 6, 7]);
        assert!(SliceTask { offset: 8, rows: 5 }
            .run(&tc, vec![parts])
            .is_err());
    }
}
