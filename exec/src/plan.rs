//! The physical plan: operators the streaming executor runs.

use std::fmt::{self, Write as _};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use volley_common::Result;
use volley_connectors::{DataSource, ScanRequest, StagedPart, WriteJob, WriteSummary};
use volley_runtime::cluster::{EncodedActor, EncodedTask, ObjectMeta, ObjectRef, Resources};
use volley_runtime::ResourceRequest;

use crate::step::Step;
use crate::transform::TransformFactory;

/// A write that tasks feed: each task writes its own part files.
#[derive(Debug)]
pub struct WriteTarget {
    pub(crate) job: Mutex<Option<WriteJob>>,
    /// What each finished task staged.
    pub(crate) parts: Mutex<Vec<StagedPart>>,
}

impl WriteTarget {
    /// Wraps a prepared [`WriteJob`].
    pub fn new(job: WriteJob) -> Arc<Self> {
        Arc::new(Self {
            job: Mutex::new(Some(job)),
            parts: Mutex::new(Vec::new()),
        })
    }

    /// Commits every part (after a successful execution) and returns what was written;
    /// with no rows, one file of no rows with `schema`, where known and the format
    /// holds one ([`WriteJob::commit_with_schema`]).
    pub fn commit(
        &self,
        schema: Option<arrow::datatypes::SchemaRef>,
    ) -> volley_common::Result<WriteSummary> {
        let parts = std::mem::take(&mut *self.parts.lock().expect("write lock"));
        match self.job.lock().expect("write lock").take() {
            Some(job) => job.commit_with_schema(parts, schema),
            None => Err(volley_common::VolleyError::internal(
                "the write was committed or aborted already",
            )),
        }
    }

    /// Removes every staged part (after a failed execution).
    pub fn abort(&self) {
        if let Some(job) = self.job.lock().expect("write lock").take() {
            job.abort();
        }
    }
}

/// Reads a source: one task per read task of the source, with the fused steps applied
/// inside each task.
#[derive(Debug)]
pub struct ReadExec {
    /// The source.
    pub source: Arc<dyn DataSource>,
    /// What was pushed into it.
    pub request: ScanRequest,
    /// Steps fused into the read tasks.
    pub steps: Vec<Step>,
    /// Resources of one task.
    pub resources: ResourceRequest,
    /// When set, tasks write their output here instead of passing it on.
    pub write: Option<Arc<WriteTarget>>,
}

/// Runs steps over bundles of input blocks, as a pool of tasks.
#[derive(Debug)]
pub struct MapExec {
    /// The input.
    pub input: Box<PhysicalPlan>,
    /// The steps.
    pub steps: Vec<Step>,
    /// Resources of one task.
    pub resources: ResourceRequest,
    /// Tasks at once at most.
    pub concurrency: Option<usize>,
    /// Rows gathered into one task at least (the last task may get fewer).
    pub bundle_rows: usize,
    /// When set, tasks write their output here.
    pub write: Option<Arc<WriteTarget>>,
}

/// Runs a stateful transform on a pool of long-lived workers (actors), each built once.
#[derive(Debug)]
pub struct ActorMapExec {
    /// The input.
    pub input: Box<PhysicalPlan>,
    /// Builds each worker's transform.
    pub factory: TransformFactory,
    /// Number of workers.
    pub concurrency: usize,
    /// Resources each worker holds for its lifetime.
    pub resources: ResourceRequest,
    /// Rows per call; `None` passes blocks as they come.
    pub batch_size: Option<usize>,
}

/// Passes the first `n` rows and stops everything upstream.
#[derive(Debug)]
pub struct LimitExec {
    /// The input.
    pub input: Box<PhysicalPlan>,
    /// Rows to pass.
    pub n: usize,
}

/// The blocks of all inputs.
#[derive(Debug)]
pub struct UnionExec {
    /// The inputs.
    pub inputs: Vec<PhysicalPlan>,
}

/// A stage whose tasks run on a cluster's nodes, one object each, without inputs: a
/// source stage (a read split and the steps fused into it, shipped as a task). Its
/// blocks stay in the nodes' stores; this process holds their references.
#[derive(Debug)]
pub struct ClusterReadExec {
    /// The stage's name in stats.
    pub name: String,
    /// What it shows in `explain`.
    pub describe: String,
    /// One task per read split, with its label (errors name it).
    pub tasks: ReadTasks,
    /// What each task holds.
    pub resources: Resources,
    /// When set, the tasks write their output (each returns what it staged).
    pub write: Option<Arc<WriteTarget>>,
}

/// The tasks of a [`ClusterReadExec`].
#[derive(Debug)]
pub enum ReadTasks {
    /// Made when planned.
    Planned(Vec<(String, EncodedTask)>),
    /// Made from what a first pass of tasks over the same splits returns: the map of a
    /// sort above needs boundaries chosen from samples of the whole input, and a first
    /// pass that reads only the keys' columns costs a fraction of storing every row
    /// and mapping it in tasks of its own.
    AfterSampling {
        /// One task per read split: a few rows of its keys.
        samples: Vec<(String, EncodedTask)>,
        /// How many tasks [`SampledTasks::tasks`] makes.
        count: usize,
        /// Makes them from every sample.
        tasks: Arc<dyn SampledTasks>,
    },
}

impl ReadTasks {
    /// How many tasks the stage runs (not counting a sampling pass).
    pub fn len(&self) -> usize {
        match self {
            ReadTasks::Planned(tasks) => tasks.len(),
            ReadTasks::AfterSampling { count, .. } => *count,
        }
    }

    /// Whether it runs no tasks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The tasks of a read stage made from the samples of a first pass (see
/// [`ReadTasks::AfterSampling`]).
pub trait SampledTasks: Send + Sync + fmt::Debug {
    /// The stage's tasks, given the rows every sampling task returned.
    fn tasks(&self, samples: Vec<RecordBatch>) -> Result<Vec<(String, EncodedTask)>>;
}

/// The name a [`ClusterMapExec`] gives the task of its bundle `seq` (the bundles'
/// order in its input): `"{operator} #{seq}"`. The task reads the order back with
/// [`bundle_sequence`] (a write names its file by it, so a sort's files follow its key
/// order).
pub fn bundle_task_name(operator: &str, seq: u64) -> String {
    format!("{operator} #{seq}")
}

/// The bundle's order in its stage's input, from a task named by [`bundle_task_name`].
pub fn bundle_sequence(task_name: &str) -> Option<u64> {
    task_name.rsplit_once(" #")?.1.parse().ok()
}

/// A stage that runs on a cluster's nodes over input blocks: one task per bundle of at
/// least `bundle_rows` rows, the same work for every bundle. Blocks made in this
/// process are put into the cluster first.
#[derive(Debug)]
pub struct ClusterMapExec {
    /// The input.
    pub input: Box<PhysicalPlan>,
    /// The stage's name in stats.
    pub name: String,
    /// What it shows in `explain`.
    pub describe: String,
    /// The task each bundle is given to.
    pub task: EncodedTask,
    /// What each task holds.
    pub resources: Resources,
    /// Rows gathered into one task at least (the last task may get fewer).
    pub bundle_rows: usize,
    /// When set, the tasks write their output.
    pub write: Option<Arc<WriteTarget>>,
}

/// What an exchange on a cluster runs, made by the layer that knows the operation
/// (sort, aggregation, join, shuffle): the tasks of each phase, encoded for the nodes.
///
/// ```text
///   input blocks ──(sample tasks: a few key rows each, sort only)──▶ driver: boundaries
///   input blocks ── map task each ──▶ one object per block: batch p = its rows of partition p
///   partition p  ── reduce task: batch p of every map output (of every input) ──▶ block p
/// ```
pub trait ExchangeWork: Send + Sync + fmt::Debug {
    /// Output partitions (reduce tasks).
    fn partitions(&self) -> usize;

    /// The work as its own type: the layer that made it adds to it (a write, the steps
    /// after it) once it sees what follows the exchange.
    fn as_any(&self) -> &dyn std::any::Any;

    /// The task that samples one input block (its result: a few rows of its keys),
    /// when the map tasks need boundaries chosen from samples (a sort).
    fn sample_task(&self) -> Result<Option<EncodedTask>>;

    /// What the map tasks need from the samples of every block (sort boundaries) or
    /// from the input's row count `rows` (an order-keeping repartition), encoded for
    /// [`map_task`](Self::map_task); called once, with all samples, after the whole
    /// input arrived when it samples or [counts rows](Self::needs_row_count).
    fn prepare(&self, samples: Vec<RecordBatch>, rows: u64) -> Result<Vec<u8>>;

    /// Whether an exchange whose input has no rows still makes output: an aggregation
    /// without keys gives one row (a count of 0) from no rows, as in one process. Its
    /// one reduce task then runs over no map outputs.
    fn makes_rows_from_none(&self) -> bool {
        false
    }

    /// Whether the map tasks need the input's row count: its blocks are then held
    /// until the whole input arrived.
    fn needs_row_count(&self) -> bool {
        false
    }

    /// The map task of one block of input `side` whose first row is row `first_row`
    /// of that input (a seeded shuffle draws from row positions); `prepared`: what
    /// [`prepare`](Self::prepare) returned (empty without sampling). Its result holds
    /// exactly [`partitions`](Self::partitions) batches, batch `p` partition `p`.
    fn map_task(&self, side: usize, first_row: u64, prepared: &[u8]) -> Result<EncodedTask>;

    /// The reduce task of partition `p`; its inputs are batch `p` of every map output,
    /// input 0's in input order, then input 1's, `sides[i]` of input `i`.
    fn reduce_task(&self, partition: usize, sides: &[usize]) -> Result<EncodedTask>;

    /// Whether the map tasks must see the input's blocks in input order (a seeded
    /// shuffle, an order-keeping repartition): the stages below then run in
    /// order-preserving mode.
    fn needs_input_order(&self) -> bool {
        false
    }

    /// For an exchange that moves no rows (`randomize_block_order`): the order of its
    /// `blocks` input blocks in its output; it runs no tasks, and its output is the
    /// input blocks themselves, where they are. `None` (the default): map and reduce
    /// tasks.
    fn block_order(&self, blocks: usize) -> Option<Vec<usize>> {
        let _ = blocks;
        None
    }

    /// For a join whose tasks may each take its whole right side (input 1): the most
    /// bytes that side may hold, once all of it is made, to be broadcast (one
    /// [`broadcast_task`](Self::broadcast_task) per left block; the left side never
    /// moves) instead of partitioned. `None` (the default): always partitioned.
    fn broadcast_limit(&self) -> Option<u64> {
        None
    }

    /// The task that joins one block of input 0 (its first input) with every block of
    /// input 1 (the `right` inputs after it).
    fn broadcast_task(&self, right: usize) -> Result<EncodedTask> {
        let _ = right;
        Err(volley_common::VolleyError::internal(
            "this exchange does not broadcast",
        ))
    }
}

/// An all-to-all operation on a cluster: map tasks partition each input block where it
/// is, reduce tasks read their partition of every map output and combine it (sort,
/// aggregate, join, shuffle). This process holds references only: to the input blocks
/// until they are mapped, to the map outputs until every reduce task is submitted (the
/// head then holds them for the unfinished ones; one lost with its node is made again
/// from lineage), and to the output blocks, in partition order.
#[derive(Debug)]
pub struct ClusterExchangeExec {
    /// The inputs (two for a join).
    pub inputs: Vec<PhysicalPlan>,
    /// The operation's name in stats.
    pub name: String,
    /// What it shows in `explain`.
    pub describe: String,
    /// Its tasks.
    pub work: Arc<dyn ExchangeWork>,
    /// Per input: whether the stage below already ran the map tasks' work in its own
    /// tasks (a read split partitioned where it is read), so that its blocks are map
    /// outputs: the exchange runs no map tasks for that input, and its blocks are never
    /// stored whole. Empty: none is.
    pub premapped: Vec<bool>,
    /// When set, its reduce (or broadcast) tasks write their output: each returns what
    /// it staged (the work's tasks must then write, see `DatasetExchange::writing`).
    pub write: Option<Arc<WriteTarget>>,
}

/// Rows of blocks already in the cluster's stores, as [`ClusterRowsExec`] hands them on.
pub trait ClusterRows: Send + Sync + fmt::Debug {
    /// The pieces, in order. The first call may run whatever makes the blocks (the
    /// input of a split, once for all its parts): it blocks, and it runs when an
    /// execution first needs them, never at planning. Once `cancel` is set it may stop
    /// early with [`VolleyError::Cancelled`](volley_common::VolleyError::Cancelled).
    fn pieces(&self, cancel: &AtomicBool) -> Result<Vec<RowsPiece>>;

    /// The task that returns rows `offset..offset + rows` of the one object it is
    /// given.
    fn slice_task(&self, offset: u64, rows: u64) -> Result<EncodedTask>;
}

/// Rows `offset..offset + rows` of an object in the cluster.
#[derive(Debug, Clone)]
pub struct RowsPiece {
    /// The object (held while the piece is).
    pub object: ObjectRef,
    /// Its rows, bytes and where it is.
    pub meta: ObjectMeta,
    /// The first row taken.
    pub offset: u64,
    /// Rows taken.
    pub rows: u64,
}

/// Rows of blocks already in the cluster (a part of a split): a piece that is a whole
/// block goes on as it is, where it is; one that cuts a block is sliced by a task on a
/// node that holds it. This process holds references only.
#[derive(Debug)]
pub struct ClusterRowsExec {
    /// Its name in stats.
    pub name: String,
    /// What it shows in `explain`.
    pub describe: String,
    /// The pieces, and the slice tasks.
    pub rows: Arc<dyn ClusterRows>,
    /// What must stay free on the cluster for the blocks to be made (the most the
    /// input's stage tasks, or a slice task, hold): an actor pool over it leaves this.
    pub reserve: Resources,
}

/// How many actors a pool runs: a fixed number, or between `min` and `max` (growing
/// while blocks wait for a free actor, shrinking when actors sit idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSize {
    /// Actors at least (and at start).
    pub min: usize,
    /// Actors at most.
    pub max: usize,
}

/// A stateful transform on a pool of cluster actors, each built once on its node; the
/// input blocks are dispatched to them as calls (several in flight per actor, preferring
/// an actor on the node that holds the block).
#[derive(Debug)]
pub struct ClusterActorPoolExec {
    /// The input.
    pub input: Box<PhysicalPlan>,
    /// The stage's name in stats.
    pub name: String,
    /// The transform's name (errors, warnings).
    pub transform: String,
    /// Each actor, encoded once.
    pub actor: EncodedActor,
    /// What each actor holds.
    pub resources: Resources,
    /// What the pool leaves free on the cluster for the stages that feed it (their
    /// tasks' resources).
    pub reserve: Resources,
    /// How many actors.
    pub size: PoolSize,
    /// Calls in flight per actor.
    pub max_in_flight: usize,
    /// Rows the transform takes at once (`MapOptions::batch_size`): a call groups
    /// several blocks only while they hold fewer than [`CALL_BATCHES`] of these.
    pub batch_size: Option<usize>,
}

/// How many of its transform's batches a pool call may hold when it groups several
/// blocks: enough for a transform that keeps many rows in flight (an LLM engine) to
/// refill from the next block, while blocks that are big already go one per call and
/// spread evenly over the actors.
pub(crate) const CALL_BATCHES: usize = 16;

/// A physical operator tree.
#[derive(Debug)]
pub enum PhysicalPlan {
    /// See [`ReadExec`].
    Read(ReadExec),
    /// See [`MapExec`].
    Map(MapExec),
    /// See [`ActorMapExec`].
    ActorMap(ActorMapExec),
    /// See [`LimitExec`].
    Limit(LimitExec),
    /// See [`UnionExec`].
    Union(UnionExec),
    /// See [`ClusterReadExec`].
    ClusterRead(ClusterReadExec),
    /// See [`ClusterMapExec`].
    ClusterMap(ClusterMapExec),
    /// See [`ClusterActorPoolExec`].
    ClusterActorPool(ClusterActorPoolExec),
    /// See [`ClusterExchangeExec`].
    ClusterExchange(ClusterExchangeExec),
    /// See [`ClusterRowsExec`].
    ClusterRows(ClusterRowsExec),
}

impl PhysicalPlan {
    /// The operator's name in stats and progress.
    pub fn name(&self) -> String {
        match self {
            PhysicalPlan::Read(r) => {
                let mut name = r.source.name();
                for s in &r.steps {
                    name.push_str("->");
                    name.push_str(step_name(s));
                }
                if r.write.is_some() {
                    name.push_str("->Write");
                }
                name
            }
            PhysicalPlan::Map(m) => {
                let mut names: Vec<&str> = m.steps.iter().map(step_name).collect();
                if m.write.is_some() {
                    names.push("Write");
                }
                if names.is_empty() {
                    "Map".into()
                } else {
                    names.join("->")
                }
            }
            PhysicalPlan::ActorMap(a) => format!("MapBatches({})", a.factory.name()),
            PhysicalPlan::Limit(l) => format!("Limit[{}]", l.n),
            PhysicalPlan::Union(_) => "Union".into(),
            PhysicalPlan::ClusterRead(r) => r.name.clone(),
            PhysicalPlan::ClusterMap(m) => m.name.clone(),
            PhysicalPlan::ClusterActorPool(a) => a.name.clone(),
            PhysicalPlan::ClusterExchange(x) => x.name.clone(),
            PhysicalPlan::ClusterRows(r) => r.name.clone(),
        }
    }

    /// Children.
    pub fn children(&self) -> Vec<&PhysicalPlan> {
        match self {
            PhysicalPlan::Read(_) => vec![],
            PhysicalPlan::Map(m) => vec![&m.input],
            PhysicalPlan::ActorMap(a) => vec![&a.input],
            PhysicalPlan::Limit(l) => vec![&l.input],
            PhysicalPlan::Union(u) => u.inputs.iter().collect(),
            PhysicalPlan::ClusterRead(_) => vec![],
            PhysicalPlan::ClusterMap(m) => vec![&m.input],
            PhysicalPlan::ClusterActorPool(a) => vec![&a.input],
            PhysicalPlan::ClusterExchange(x) => x.inputs.iter().collect(),
            PhysicalPlan::ClusterRows(_) => vec![],
        }
    }

    fn fmt_indent(&self, f: &mut String, indent: usize) {
        let pad = "  ".repeat(indent);
        let _ = match self {
            PhysicalPlan::Read(r) => {
                let mut pushed = Vec::new();
                if let Some(p) = &r.request.projection {
                    let schema = r.source.schema();
                    let cols: Vec<&str> =
                        p.iter().map(|&i| schema.field(i).name().as_str()).collect();
                    pushed.push(format!("projection=[{}]", cols.join(", ")));
                }
                if !r.request.filters.is_empty() {
                    let fs: Vec<String> = r.request.filters.iter().map(|e| e.to_string()).collect();
                    pushed.push(format!("filters=[{}]", fs.join(", ")));
                }
                if let Some(l) = r.request.limit {
                    pushed.push(format!("limit={l}"));
                }
                writeln!(
                    f,
                    "{pad}{}: {} {}  (cpus/task={})",
                    r.source.name(),
                    r.source.describe(),
                    pushed.join(" "),
                    r.resources.num_cpus
                )
                .and_then(|_| {
                    if let Some(detail) = r.source.explain_detail(&r.request) {
                        for line in detail.lines() {
                            writeln!(f, "{pad}  | {line}")?;
                        }
                    }
                    for s in &r.steps {
                        writeln!(f, "{pad}  fused: {s:?}")?;
                    }
                    if r.write.is_some() {
                        writeln!(f, "{pad}  fused: Write")?;
                    }
                    Ok(())
                })
            }
            PhysicalPlan::Map(m) => writeln!(
                f,
                "{pad}Map: tasks of >= {} rows, concurrency={}  (cpus/task={})",
                m.bundle_rows,
                m.concurrency
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "auto".into()),
                m.resources.num_cpus
            )
            .and_then(|_| {
                for s in &m.steps {
                    writeln!(f, "{pad}  fused: {s:?}")?;
                }
                if m.write.is_some() {
                    writeln!(f, "{pad}  fused: Write")?;
                }
                Ok(())
            }),
            PhysicalPlan::ActorMap(a) => writeln!(
                f,
                "{pad}ActorPoolMap: {} on {} workers{}  (cpus/worker={})",
                a.factory.name(),
                a.concurrency,
                a.batch_size
                    .map(|b| format!(", batch_size={b}"))
                    .unwrap_or_default(),
                a.resources.num_cpus
            ),
            PhysicalPlan::Limit(l) => writeln!(f, "{pad}Limit: {}  (in the driver)", l.n),
            PhysicalPlan::Union(u) => writeln!(f, "{pad}Union: {} inputs", u.inputs.len()),
            PhysicalPlan::ClusterRead(r) => writeln!(
                f,
                "{pad}{}: {} tasks on the cluster's nodes{}{}  (cpus/task={})\n{pad}  {}",
                r.name,
                r.tasks.len(),
                match &r.tasks {
                    ReadTasks::AfterSampling { samples, .. } =>
                        format!(", after {} tasks sampling their keys", samples.len()),
                    ReadTasks::Planned(_) => String::new(),
                },
                if r.write.is_some() { ", writing" } else { "" },
                r.resources.num_cpus,
                r.describe.replace('\n', &format!("\n{pad}  "))
            ),
            PhysicalPlan::ClusterMap(m) => writeln!(
                f,
                "{pad}{}: tasks of >= {} rows on the cluster's nodes{}  (cpus/task={})\n{pad}  {}",
                m.name,
                m.bundle_rows,
                if m.write.is_some() { ", writing" } else { "" },
                m.resources.num_cpus,
                m.describe.replace('\n', &format!("\n{pad}  "))
            ),
            PhysicalPlan::ClusterActorPool(a) => writeln!(
                f,
                "{pad}{}: {} on {} cluster actors, {} calls in flight each  (resources/actor: {})",
                a.name,
                a.transform,
                if a.size.min == a.size.max {
                    a.size.min.to_string()
                } else {
                    format!("{}..{}", a.size.min, a.size.max)
                },
                a.max_in_flight,
                a.resources
            ),
            PhysicalPlan::ClusterExchange(x) if x.work.block_order(0).is_some() => writeln!(
                f,
                "{pad}{}: its input's blocks in a new order, where they are (no tasks)\n{pad}  {}",
                x.name,
                x.describe.replace('\n', &format!("\n{pad}  "))
            ),
            PhysicalPlan::ClusterExchange(x) => writeln!(
                f,
                "{pad}{}: an exchange on the cluster's nodes, {} partitions ({}; a reduce \
                     task per partition)\n{pad}  {}",
                x.name,
                x.work.partitions(),
                match x.premapped.iter().filter(|p| **p).count() {
                    0 => "map tasks partition each block where it is",
                    n if n == x.inputs.len() => "the tasks below partition each block as they make it",
                    _ => "map tasks partition each block where it is, or the tasks below as they make it",
                },
                x.describe.replace('\n', &format!("\n{pad}  "))
            )
            .and_then(|()| match x.write {
                Some(_) => writeln!(f, "{pad}  fused: Write (by the reduce tasks)"),
                None => Ok(()),
            }),
            PhysicalPlan::ClusterRows(r) => writeln!(
                f,
                "{pad}{}: blocks in the cluster's stores (whole ones go on where they are; \
                 a task on its node slices a cut one)\n{pad}  {}",
                r.name,
                r.describe.replace('\n', &format!("\n{pad}  "))
            ),
        };
        for c in self.children() {
            c.fmt_indent(f, indent + 1);
        }
    }
}

fn step_name(s: &Step) -> &'static str {
    match s {
        Step::Project { .. } => "Project",
        Step::Filter { .. } | Step::FilterFn(_) => "Filter",
        Step::Lazy(_) => "Project",
        Step::Map { .. } => "MapBatches",
    }
}

impl fmt::Display for PhysicalPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        self.fmt_indent(&mut s, 0);
        f.write_str(s.trim_end())
    }
}
