//! The cluster runner: cuts a plan into stages that run on the cluster's nodes and
//! operators that run in this process.
//!
//! Bottom up, each node goes where it can:
//!
//! - a source whose reads can travel (files) opens a **stage**: one task per read
//!   split; the row-local steps after it (select, filter, with_column, drop, rename,
//!   named `map_batches`) join that stage and run inside its tasks;
//! - a named `map_batches` after operators of this process opens a stage over their
//!   blocks (put into the cluster); after an exchange, its row-local steps (and a
//!   one-CPU named `map_batches`, and a write) run in the exchange's reduce tasks;
//! - a named stateful transform runs on a **pool of cluster actors**;
//! - a closure (`map_batches`, `filter_fn`, a local stateful factory) cannot travel: it
//!   runs in this process (warned once, naming it), as do limits and unions (over
//!   references) and sources that cannot travel (batches in memory, SQL results);
//! - a sort, aggregation, distinct, join, repartition (by keys, or into `n` of equal
//!   rows in order) or seeded shuffle is an **exchange** on the nodes (`exchange.rs`):
//!   map tasks partition each input block where it is, a reduce task per partition
//!   combines its rows; `randomize_block_order` is one without tasks (the blocks go
//!   on where they are, reordered); where the map needs nothing of the whole input (a
//!   hash exchange), a stage below it runs the map in its own tasks, so a read split
//!   is partitioned as it is read; so does a seeded shuffle's over read splits whose
//!   rows planning counted (Parquet footers; no filter, no transform in the stage),
//!   each task knowing its first row; and a sort's over read splits and expressions,
//!   its tasks made once a first pass over the splits, reading only the keys' columns,
//!   sampled them;
//! - a split's input runs once for all its parts, its blocks staying on the nodes;
//!   each part hands on the blocks inside its rows as they are and has a task slice
//!   the (at most two) blocks its bounds cut;
//! - a write joins the last stage (each task writes its part where it runs), is done
//!   by an exchange's reduce tasks (each writes its partition), or is a stage of its
//!   own over the blocks of an actor pool.
//!
//! Blocks made on a node stay in its object store; this process holds references and
//! fetches bytes only for the operators that run here.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::datatypes::SchemaRef;
use datafusion::common::Column;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use volley_common::{Result, VolleyConfig};
use volley_exec::{
    ClusterActorPoolExec, ClusterExchangeExec, ClusterMapExec, ClusterReadExec, ClusterRowsExec,
    ExchangeWork, ExecContext, PhysicalPlan, PoolSize, PoolWorker, ReadTasks, SampledTasks,
};
use volley_runtime::cluster::{Cluster, EncodedActor, EncodedTask, Resources};

use super::exchange::{DatasetExchange, ExchangeMapTask};
use super::stage::{plan_bytes, ShippedOp, StageInput, StageTask};
use super::Runner;
use crate::logical::{ExchangeKind, LogicalOp, WriteSpec};
use crate::options::{MapOptions, SortKey};
use crate::planner::{self, Planned};

/// Runs plans on a cluster: stages on its nodes, the rest in this process.
#[derive(Debug, Clone)]
pub struct ClusterRunner {
    cluster: Cluster,
}

impl ClusterRunner {
    /// A runner for `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        Self { cluster }
    }
}

/// One read split of a stage.
struct Read {
    label: String,
    /// Its serialized plan.
    plan: Vec<u8>,
    /// The rows it yields, where planning knows them exactly.
    rows: Option<u64>,
}

/// Where a stage's rows come from.
enum Input {
    /// Read splits.
    Reads(Vec<Read>),
    /// The blocks of operators below (this process's, or an actor pool's).
    Blocks(Box<PhysicalPlan>),
    /// An exchange's output: its reduce tasks run the stage's steps (and write) on it,
    /// so it is not stored and read again by tasks of its own.
    Reduce(ClusterExchangeExec),
}

/// The input of a stage over `input`'s blocks: an exchange's reduce tasks where they
/// can take the stage's steps, else tasks over its blocks.
fn blocks_input(input: PhysicalPlan) -> Input {
    match input {
        PhysicalPlan::ClusterExchange(x)
            if x.write.is_none()
                && x.work.block_order(0).is_none()
                && x.work.as_any().is::<DatasetExchange>() =>
        {
            Input::Reduce(x)
        }
        other => Input::Blocks(Box::new(other)),
    }
}

/// A stage still open to more row-local steps.
struct Stage {
    input: Input,
    /// The source's or the stage's first name (stats).
    names: Vec<String>,
    /// Its steps as the plan shows them.
    describe: Vec<String>,
    ops: Vec<ShippedOp>,
    /// Whether its steps keep every row of its input (no filter, no transform).
    keeps_rows: bool,
    resources: Resources,
    bundle_rows: usize,
    schema: Option<SchemaRef>,
}

/// A planned subtree.
enum Node {
    /// Operators (in this process, or a closed stage); `remote`: its output blocks are
    /// cluster objects.
    Plan { planned: Planned, remote: bool },
    /// An open stage.
    Stage(Stage),
}

fn resources(options: &MapOptions) -> Resources {
    let mut r = Resources::cpus(options.num_cpus)
        .with_gpus(options.num_gpus)
        .with_memory(options.memory);
    r.custom = options.custom.clone();
    r
}

/// Warns once per process for each transform that runs here because it cannot travel.
fn warn_stays_here(name: &str, what: &str) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut warned = WARNED
        .get_or_init(Default::default)
        .lock()
        .expect("warned lock");
    if warned.insert(name.to_string()) {
        tracing::warn!(
            "{what} `{name}` is a closure: it runs in this process, not on the cluster's \
             nodes (make it a named transform, #[typetag::serde], to run it there)"
        );
    }
}

impl Stage {
    /// A stage of no steps yet over `input`, whose rows are `schema`.
    fn over(input: Input, schema: Option<SchemaRef>) -> Self {
        Self {
            input,
            names: vec![],
            describe: vec![],
            ops: vec![],
            keeps_rows: true,
            resources: Resources::cpus(1.0),
            bundle_rows: 1,
            schema,
        }
    }

    fn name(&self) -> String {
        self.names.join("->")
    }

    /// Each task's first row in the stage's output, where planning knows them: read
    /// splits whose rows are counted, and steps that keep every row.
    fn first_rows(&self) -> Option<Vec<u64>> {
        let Input::Reads(reads) = &self.input else {
            return None;
        };
        if !self.keeps_rows {
            return None;
        }
        let mut first = 0u64;
        reads
            .iter()
            .map(|r| {
                let at = first;
                first += r.rows?;
                Some(at)
            })
            .collect()
    }

    /// The stage with row-local step `op` (select, with_column, drop, rename, filter)
    /// run after its steps.
    fn then_step(mut self, op: &LogicalOp, state: &SessionState) -> Result<Self> {
        self.ops.push(ShippedOp::of(op)?.expect("a row-local step"));
        self.names.push(step_name(op).into());
        self.describe.push(ShippedOp::describe(op));
        self.keeps_rows &= !matches!(op, LogicalOp::Filter { .. });
        self.schema = op.schema(state)?;
        Ok(self)
    }

    /// Whether its tasks can run `map`: one that places rows by position needs each
    /// task's first row.
    fn can_map(&self, map: &ExchangeMapTask) -> bool {
        !map.places_by_position() || self.first_rows().is_some()
    }

    /// Whether it reads splits and runs expressions only: a first pass over the same
    /// splits that reads fewer columns costs a fraction of the stage (a transform would
    /// run twice).
    fn reads_with_expressions(&self) -> bool {
        matches!(self.input, Input::Reads(_))
            && !self.ops.iter().any(|o| matches!(o, ShippedOp::Map { .. }))
    }

    /// The stage as operators whose tasks run the map of `sort` (the sort's exchange
    /// above): its tasks are made once `samples` (tasks over the same rows, each
    /// returning a sample of the keys) chose the boundaries. Its rows are partitioned as
    /// they are read, never stored whole and mapped by tasks of their own.
    fn close_sorted(
        mut self,
        sort: DatasetExchange,
        samples: Vec<(String, EncodedTask)>,
    ) -> Result<Planned> {
        let Input::Reads(reads) = self.input else {
            return Err(volley_common::VolleyError::internal(
                "a sampled stage over no read splits",
            ));
        };
        self.names.push("Sort (map)".into());
        self.describe.push(format!(
            "then, in its tasks: the map of the Sort above, its key ranges from a first \
             pass of {} tasks reading the keys",
            samples.len()
        ));
        let plan = PhysicalPlan::ClusterRead(ClusterReadExec {
            name: self.names.join("->"),
            describe: self.describe.join("\n"),
            tasks: ReadTasks::AfterSampling {
                count: reads.len(),
                samples,
                tasks: Arc::new(SortMapTasks {
                    sort,
                    reads: reads.into_iter().map(|r| (r.label, r.plan)).collect(),
                    ops: self.ops,
                }),
            },
            resources: self.resources,
            write: None,
        });
        Ok((plan, self.schema))
    }

    /// The stage as operators, writing into `write` when given.
    fn close(self, write: Option<&WriteSpec>) -> Result<Planned> {
        self.close_with(write, None)
    }

    /// The stage as operators whose tasks also run `map` (the map work of the exchange
    /// `boundary` above) on their rows, so that their objects are its map outputs.
    fn close_mapped(self, map: ExchangeMapTask, boundary: &str) -> Result<Planned> {
        self.close_with(None, Some((map, boundary)))
    }

    fn close_with(
        mut self,
        write: Option<&WriteSpec>,
        map: Option<(ExchangeMapTask, &str)>,
    ) -> Result<Planned> {
        let firsts = self.first_rows();
        if let Some((_, boundary)) = &map {
            self.names.push(format!("{boundary} (map)"));
            // Over an exchange, these steps are its reduce tasks' (said once, below).
            let tasks = match self.input {
                Input::Reduce(_) => "",
                _ => "then, in its tasks: ",
            };
            self.describe
                .push(format!("{tasks}the map of the {boundary} above"));
        }
        let map = map.map(|(m, _)| m);
        let name = self.name();
        let describe = self.describe.join("\n");
        let part = write.map(|w| w.part.clone());
        let target = write.map(|w| Arc::clone(&w.target));
        let encode = |label: String,
                      input: StageInput,
                      map: Option<ExchangeMapTask>|
         -> Result<EncodedTask> {
            EncodedTask::new(Box::new(StageTask {
                label,
                input,
                ops: self.ops.clone(),
                write: part.clone(),
                map,
                sample: None,
            }))
        };
        let positional = map
            .as_ref()
            .is_some_and(ExchangeMapTask::places_by_position);
        let plan = match self.input {
            Input::Reads(reads) => PhysicalPlan::ClusterRead(ClusterReadExec {
                name,
                describe,
                tasks: ReadTasks::Planned(
                    reads
                        .into_iter()
                        .enumerate()
                        .map(|(i, read)| {
                            // A map that places rows by position, at the task's rows.
                            let map = match (&map, &firsts, read.rows) {
                                (Some(m), Some(firsts), Some(rows)) if positional => {
                                    Some(m.at_rows(firsts[i], rows))
                                }
                                (Some(_), _, _) if positional => {
                                    return Err(volley_common::VolleyError::internal(format!(
                                        "{}: a map by row position over a split of unknown rows",
                                        read.label
                                    )))
                                }
                                (m, _, _) => m.clone(),
                            };
                            let task =
                                encode(read.label.clone(), StageInput::read(read.plan), map)?;
                            Ok((read.label, task))
                        })
                        .collect::<Result<_>>()?,
                ),
                resources: self.resources,
                write: target,
            }),
            Input::Reduce(mut x) => {
                let work = x
                    .work
                    .as_any()
                    .downcast_ref::<DatasetExchange>()
                    .cloned()
                    .and_then(|w| w.then(self.ops.clone()))
                    .and_then(|w| match part {
                        Some(p) => w.writing(p),
                        None => Some(w),
                    })
                    .and_then(|w| match map {
                        Some(m) if !positional => w.mapping(m),
                        Some(_) => None,
                        None => Some(w),
                    })
                    .ok_or_else(|| {
                        volley_common::VolleyError::internal(format!(
                            "{name}: the exchange below cannot run the stage's steps"
                        ))
                    })?;
                x.work = Arc::new(work);
                x.write = target;
                x.name = format!("{}->{name}", x.name);
                x.describe = format!("{}\nthen, in its reduce tasks: {describe}", x.describe);
                PhysicalPlan::ClusterExchange(x)
            }
            Input::Blocks(_) if positional => {
                return Err(volley_common::VolleyError::internal(format!(
                    "{name}: a map by row position over blocks of unknown rows"
                )))
            }
            Input::Blocks(input) => PhysicalPlan::ClusterMap(ClusterMapExec {
                input,
                task: encode(name.clone(), StageInput::Objects, map)?,
                name,
                describe,
                resources: self.resources,
                bundle_rows: self.bundle_rows,
                write: target,
            }),
        };
        Ok((plan, self.schema))
    }
}

impl Node {
    /// The subtree as operators; `remote` says whether its output is cluster objects.
    fn close(self) -> Result<(Planned, bool)> {
        match self {
            Node::Plan { planned, remote } => Ok((planned, remote)),
            Node::Stage(s) => Ok((s.close(None)?, true)),
        }
    }
}

impl ClusterRunner {
    fn plan_node(&self, op: &LogicalOp, exec: &ExecContext) -> Result<Node> {
        let state = &exec.session;
        if let LogicalOp::Split { output, .. } = op {
            // Its input runs once, for all the split's parts, when an execution first
            // reads one (planned here for what it holds and shows, not run).
            let input = output.input_plan()?;
            return Ok(Node::Plan {
                planned: (
                    PhysicalPlan::ClusterRows(ClusterRowsExec {
                        name: "Split".into(),
                        describe: format!(
                            "Split: {}; its input, run once for every part:\n{}",
                            output.describe(),
                            input.to_string().trim_end()
                        ),
                        rows: output.cluster_rows(),
                        reserve: max_resources(&Resources::cpus(1.0), &stage_resources(&input)),
                    }),
                    op.schema(state)?,
                ),
                remote: true,
            });
        }
        let inputs = op.inputs();
        let mut children = inputs
            .iter()
            .map(|i| self.plan_node(i, exec))
            .collect::<Result<Vec<_>>>()?;
        // This node in this process, over its children's operators.
        let here = |children: Vec<Node>, remote: bool| -> Result<Node> {
            let planned = children
                .into_iter()
                .map(|c| c.close().map(|(p, _)| p))
                .collect::<Result<Vec<_>>>()?;
            Ok(Node::Plan {
                planned: planner::plan_node(op, planned, state)?,
                remote,
            })
        };
        match op {
            LogicalOp::Source { source, request } if source.shippable() => {
                let reads = exec
                    .block_on(source.plan(state, request))
                    .map_err(|e| e.context(format!("planning {}", source.name())))?;
                if reads.iter().all(|r| r.plan().is_some()) {
                    let reads = reads
                        .iter()
                        .map(|r| {
                            let plan = r.plan().expect("checked above");
                            Ok(Read {
                                label: r.label.clone(),
                                plan: plan_bytes(plan, &r.label)?,
                                rows: r.rows(),
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let mut stage = Stage::over(Input::Reads(reads), op.schema(state)?);
                    stage.names.push(source.name());
                    stage
                        .describe
                        .push(format!("{}: {}", source.name(), source.describe()));
                    return Ok(Node::Stage(stage));
                }
                here(children, false)
            }
            LogicalOp::Source { .. } => here(children, false),
            LogicalOp::Select { .. }
            | LogicalOp::WithColumn { .. }
            | LogicalOp::Drop { .. }
            | LogicalOp::Rename { .. }
            | LogicalOp::Filter { .. } => match children.remove(0) {
                Node::Stage(s) => Ok(Node::Stage(s.then_step(op, state)?)),
                // Over an actor pool's blocks: a stage of its own, where they are.
                child @ Node::Plan { remote: true, .. } => {
                    let ((input, schema), _) = child.close()?;
                    let s = Stage::over(blocks_input(input), schema);
                    Ok(Node::Stage(s.then_step(op, state)?))
                }
                child => here(vec![child], false),
            },
            LogicalOp::MapBatches { f, options, .. } if f.is_shippable() => {
                let shipped = ShippedOp::of(op)?.expect("a named transform");
                let want = resources(options);
                match children.remove(0) {
                    Node::Stage(mut s)
                        if options.concurrency.is_none()
                            && options.batch_size.is_none_or(|b| b <= s.bundle_rows.max(1))
                            && fuses(&s.resources, &want) =>
                    {
                        s.ops.push(shipped);
                        s.names.push(format!("MapBatches({})", f.name()));
                        s.describe.push(ShippedOp::describe(op));
                        s.keeps_rows = false;
                        s.resources = max_resources(&s.resources, &want);
                        s.schema = None;
                        Ok(Node::Stage(s))
                    }
                    child => {
                        let ((input, _), _) = child.close()?;
                        // A transform of one CPU at most, one task per block, runs in an
                        // exchange's reduce tasks.
                        let one_task = Resources::cpus(1.0);
                        let light = options.concurrency.is_none()
                            && options.batch_size.is_none()
                            && want.num_cpus <= one_task.num_cpus
                            && want.memory <= one_task.memory
                            && fuses(&one_task, &want);
                        let input = match light {
                            true => blocks_input(input),
                            false => Input::Blocks(Box::new(input)),
                        };
                        let resources = match input {
                            Input::Reduce(_) => one_task,
                            _ => want,
                        };
                        Ok(Node::Stage(Stage {
                            input,
                            names: vec![format!("MapBatches({})", f.name())],
                            describe: vec![ShippedOp::describe(op)],
                            ops: vec![shipped],
                            keeps_rows: false,
                            resources,
                            bundle_rows: options.batch_size.unwrap_or(1),
                            schema: None,
                        }))
                    }
                }
            }
            LogicalOp::MapBatches { f, .. } => {
                warn_stays_here(&f.name(), "map_batches");
                here(children, false)
            }
            LogicalOp::FilterFn { predicate, .. } => {
                warn_stays_here(predicate.name(), "filter_fn");
                here(children, false)
            }
            LogicalOp::MapBatchesStateful {
                factory, options, ..
            } if factory.is_shippable() => {
                let ((input, _), _) = children.remove(0).close()?;
                let reserve = stage_resources(&input);
                let (min, max) = options.concurrency.map_or((1, 1), |c| c.bounds());
                let worker = PoolWorker::new(factory, options.batch_size)?;
                Ok(Node::Plan {
                    planned: (
                        PhysicalPlan::ClusterActorPool(ClusterActorPoolExec {
                            input: Box::new(input),
                            name: format!("MapBatches({})", factory.name()),
                            transform: factory.name(),
                            actor: EncodedActor::new(Box::new(worker))?,
                            resources: resources(options),
                            reserve,
                            size: PoolSize {
                                min: min.max(1),
                                max: max.max(min).max(1),
                            },
                            max_in_flight: options.max_calls_in_flight,
                            batch_size: options.batch_size,
                        }),
                        None,
                    ),
                    remote: true,
                })
            }
            LogicalOp::MapBatchesStateful { factory, .. } => {
                warn_stays_here(&factory.name(), "map_batches_stateful");
                here(children, false)
            }
            LogicalOp::Limit { .. } => {
                let remote = matches!(
                    children[0],
                    Node::Stage(_) | Node::Plan { remote: true, .. }
                );
                here(children, remote)
            }
            LogicalOp::Union { .. } => {
                let remote = children
                    .iter()
                    .any(|c| matches!(c, Node::Stage(_) | Node::Plan { remote: true, .. }));
                here(children, remote)
            }
            // An exchange on the nodes: map tasks where the input blocks are, a reduce
            // task per partition.
            LogicalOp::Exchange { .. }
            | LogicalOp::Sort { .. }
            | LogicalOp::Aggregate { .. }
            | LogicalOp::Distinct { .. }
            | LogicalOp::Join { .. } => {
                let broadcast = exec.config.exec.broadcast_join_bytes;
                let Some(work) = DatasetExchange::of(op, state, self.partitions(exec), broadcast)?
                else {
                    // Lowered to its source before planning; planning one reports that.
                    return here(children, false);
                };
                // An input whose stage runs on the nodes partitions its rows in that
                // stage's tasks, as they are made: its blocks are never stored whole
                // and read again by map tasks of their own.
                let boundary = boundary_name(op);
                // A sort over a stage of reads: the stage maps its rows too, its tasks
                // made once a first pass sampled the keys.
                if let (LogicalOp::Sort { input, keys }, [Node::Stage(s)]) = (op, &children[..]) {
                    if let Some(samples) = self.key_samples(s, input, keys, &work, exec)? {
                        let Some(Node::Stage(s)) = children.pop() else {
                            unreachable!("matched above")
                        };
                        let input = s.close_sorted(work.clone(), samples)?.0;
                        return Ok(Node::Plan {
                            planned: (
                                PhysicalPlan::ClusterExchange(ClusterExchangeExec {
                                    inputs: vec![input],
                                    name: boundary.into(),
                                    describe: ShippedOp::describe(op),
                                    work: Arc::new(work),
                                    premapped: vec![true],
                                    write: None,
                                }),
                                op.schema(state)?,
                            ),
                            remote: true,
                        });
                    }
                }
                let mut premapped = vec![false; children.len()];
                let inputs = children
                    .into_iter()
                    .enumerate()
                    .map(|(side, c)| match (c, work.map_in_stage(side)?) {
                        (Node::Stage(s), Some(map)) if s.can_map(&map) => {
                            premapped[side] = true;
                            Ok(s.close_mapped(map, boundary)?.0)
                        }
                        // An exchange right below: its reduce tasks run the map, as a
                        // stage of no steps over it.
                        (
                            Node::Plan {
                                planned: (x @ PhysicalPlan::ClusterExchange(_), schema),
                                ..
                            },
                            Some(map),
                        ) if !map.places_by_position() => match blocks_input(x) {
                            input @ Input::Reduce(_) => {
                                premapped[side] = true;
                                Ok(Stage::over(input, schema).close_mapped(map, boundary)?.0)
                            }
                            Input::Blocks(x) => Ok(*x),
                            Input::Reads(_) => Err(volley_common::VolleyError::internal(
                                "an exchange's output as read splits",
                            )),
                        },
                        (c, _) => c.close().map(|((p, _), _)| p),
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Node::Plan {
                    planned: (
                        PhysicalPlan::ClusterExchange(ClusterExchangeExec {
                            inputs,
                            name: boundary.into(),
                            describe: ShippedOp::describe(op),
                            work: Arc::new(work),
                            premapped,
                            write: None,
                        }),
                        op.schema(state)?,
                    ),
                    remote: true,
                })
            }
            LogicalOp::Split { .. } => Err(volley_common::VolleyError::internal(
                "a split is planned above",
            )),
            LogicalOp::Write { .. } => Err(volley_common::VolleyError::internal(format!(
                "a write below the root of a plan: {op}"
            ))),
        }
    }
}

/// The name of a boundary's exchange in stats.
fn boundary_name(op: &LogicalOp) -> &'static str {
    match op {
        LogicalOp::Sort { .. } => "Sort",
        LogicalOp::Aggregate { .. } => "Aggregate",
        LogicalOp::Distinct { .. } => "Distinct",
        LogicalOp::Join { .. } => "Join",
        LogicalOp::Exchange { kind, .. } => match kind {
            ExchangeKind::RandomShuffle { .. } => "RandomShuffle",
            ExchangeKind::Groups { .. } => "Groups",
            ExchangeKind::RandomizeBlockOrder { .. } => "RandomizeBlockOrder",
            _ => "Repartition",
        },
        _ => "Exchange",
    }
}

impl ClusterRunner {
    /// The first pass of a sort's map run by `stage` (its input, `input` planned): one
    /// task per read split of `input` narrowed to the columns of `keys`, each returning a
    /// sample of the keys; `None` where that pass would not be cheap (`stage` runs a
    /// transform, or the narrowed plan is no stage of reads and expressions).
    fn key_samples(
        &self,
        stage: &Stage,
        input: &Arc<LogicalOp>,
        keys: &[SortKey],
        sort: &DatasetExchange,
        exec: &ExecContext,
    ) -> Result<Option<Vec<(String, EncodedTask)>>> {
        let Some(sample) = sort.sample() else {
            return Ok(None);
        };
        if !stage.reads_with_expressions() {
            return Ok(None);
        }
        let mut columns: Vec<Column> = Vec::new();
        for key in keys {
            for c in key.expr.column_refs() {
                if !columns.contains(c) {
                    columns.push(c.clone());
                }
            }
        }
        if columns.is_empty() {
            return Ok(None);
        }
        let narrowed = Arc::new(LogicalOp::Select {
            input: Arc::clone(input),
            exprs: columns.into_iter().map(Expr::Column).collect(),
        });
        let narrowed = crate::optimizer::optimize(&narrowed, &exec.session)?;
        let Node::Stage(first) = self.plan_node(&narrowed, exec)? else {
            return Ok(None);
        };
        if !first.reads_with_expressions() {
            return Ok(None);
        }
        let Input::Reads(reads) = first.input else {
            return Ok(None);
        };
        reads
            .into_iter()
            .map(|r| {
                let task = EncodedTask::new(Box::new(StageTask {
                    label: r.label.clone(),
                    input: StageInput::read(r.plan),
                    ops: first.ops.clone(),
                    write: None,
                    map: None,
                    sample: Some(sample.clone()),
                }))?;
                Ok((r.label, task))
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// The reduce tasks of an exchange whose operation leaves their number open.
    fn partitions(&self, exec: &ExecContext) -> usize {
        shuffle_partitions(&self.cluster, &exec.config)
    }
}

/// The tasks of a read stage that runs a sort's map, made from the first pass's samples.
#[derive(Debug)]
struct SortMapTasks {
    sort: DatasetExchange,
    /// Each read split's label and plan.
    reads: Vec<(String, Vec<u8>)>,
    ops: Vec<ShippedOp>,
}

impl SampledTasks for SortMapTasks {
    fn tasks(&self, samples: Vec<arrow::array::RecordBatch>) -> Result<Vec<(String, EncodedTask)>> {
        let bounds = self.sort.prepare(samples, 0)?;
        let map = self.sort.map(0, 0, &bounds)?;
        self.reads
            .iter()
            .map(|(label, plan)| {
                let task = EncodedTask::new(Box::new(StageTask {
                    label: label.clone(),
                    input: StageInput::read(plan.clone()),
                    ops: self.ops.clone(),
                    write: None,
                    map: Some(map.clone()),
                    sample: None,
                }))?;
                Ok((label.clone(), task))
            })
            .collect()
    }
}

/// The partitions of a cluster's exchanges where the operation leaves their number
/// open: `volley.exec.shuffle_partitions`, or twice the live nodes' CPUs (at least 8).
fn shuffle_partitions(cluster: &Cluster, config: &VolleyConfig) -> usize {
    query_partitions(cluster, config).1
}

/// File bytes per CPU up to which a SQL query's exchanges on a cluster have one
/// partition per CPU (see [`query_partitions`]).
pub(crate) const SMALL_QUERY_BYTES_PER_CPU: u64 = 256 << 20;

/// The partitions of a SQL query's exchanges on a cluster: `(few, many)`, both
/// `volley.exec.shuffle_partitions` where it is set; else one per CPU for a query whose
/// files hold at most [`SMALL_QUERY_BYTES_PER_CPU`] per CPU, and [`shuffle_partitions`]
/// for bigger ones (smaller tasks: a hash join's build side does not spill).
///
/// Every stage of a query is a wave of tasks, and a stage of twice as many tasks as
/// CPUs runs in two: on 2 nodes of 2 CPUs, the 22 TPC-H queries at SF1 took 5.75 s with
/// 4 partitions against 6.25 s with 8 (medians of 3 runs each).
pub(crate) fn query_partitions(cluster: &Cluster, config: &VolleyConfig) -> (usize, usize) {
    if let Some(n) = config.exec.shuffle_partitions {
        return (n, n);
    }
    let cpus = cluster.live_cpus().unwrap_or(0.0);
    ((cpus as usize).max(1), ((cpus * 2.0) as usize).max(8))
}

/// The most any cluster stage task below `plan` holds: what an actor pool over it must
/// leave free for its input to keep coming.
fn stage_resources(plan: &PhysicalPlan) -> Resources {
    let own = match plan {
        PhysicalPlan::ClusterRead(r) => r.resources.clone(),
        PhysicalPlan::ClusterMap(m) => m.resources.clone(),
        PhysicalPlan::ClusterRows(r) => r.reserve.clone(),
        _ => Resources::default(),
    };
    plan.children()
        .into_iter()
        .map(stage_resources)
        .fold(own, |a, b| max_resources(&a, &b))
}

fn step_name(op: &LogicalOp) -> &'static str {
    match op {
        LogicalOp::Filter { .. } => "Filter",
        _ => "Project",
    }
}

/// Whether a transform wanting `want` may run in tasks holding `have` (the same GPUs and
/// custom resources; CPUs and memory are taken at their maximum).
fn fuses(have: &Resources, want: &Resources) -> bool {
    (have.num_gpus - want.num_gpus).abs() < 1e-9 && have.custom == want.custom
}

fn max_resources(a: &Resources, b: &Resources) -> Resources {
    let mut r = a.clone();
    r.num_cpus = a.num_cpus.max(b.num_cpus);
    r.num_gpus = a.num_gpus.max(b.num_gpus);
    r.memory = a.memory.max(b.memory);
    for (k, v) in &b.custom {
        let e = r.custom.entry(k.clone()).or_insert(0.0);
        *e = e.max(*v);
    }
    r
}

/// A stage that writes the blocks of `input` (an actor pool's, a limit's or a union's
/// over cluster blocks, an exchange that runs no tasks) where they are.
fn write_stage(input: PhysicalPlan, w: &WriteSpec) -> Result<PhysicalPlan> {
    let task = EncodedTask::new(Box::new(StageTask {
        label: "Write".into(),
        input: StageInput::Objects,
        ops: vec![],
        write: Some(w.part.clone()),
        map: None,
        sample: None,
    }))?;
    Ok(PhysicalPlan::ClusterMap(ClusterMapExec {
        input: Box::new(input),
        name: "Write".into(),
        describe: "Write".into(),
        task,
        resources: Resources::cpus(1.0),
        bundle_rows: 1,
        write: Some(Arc::clone(&w.target)),
    }))
}

impl Runner for ClusterRunner {
    fn plan(&self, plan: &LogicalOp, exec: &ExecContext) -> Result<PhysicalPlan> {
        let (plan, write) = plan.split_write();
        let node = self.plan_node(plan, exec)?;
        Ok(match (node, write) {
            (Node::Stage(s), w) => s.close(w)?.0,
            (
                Node::Plan {
                    planned: (PhysicalPlan::ClusterExchange(mut x), _),
                    remote: true,
                },
                Some(w),
            ) => {
                // An exchange's reduce tasks write their output where they run: no
                // stage of write tasks reads their blocks again.
                let broadcast = exec.config.exec.broadcast_join_bytes;
                let writing =
                    DatasetExchange::of(plan, &exec.session, x.work.partitions(), broadcast)?
                        .and_then(|work| work.writing(w.part.clone()));
                match writing {
                    Some(work) => {
                        x.work = Arc::new(work);
                        x.write = Some(Arc::clone(&w.target));
                        PhysicalPlan::ClusterExchange(x)
                    }
                    None => write_stage(PhysicalPlan::ClusterExchange(x), w)?,
                }
            }
            (
                Node::Plan {
                    planned: (input, _),
                    remote: true,
                },
                Some(w),
            ) => write_stage(input, w)?,
            (Node::Plan { planned, .. }, Some(w)) => {
                planner::with_write(planned.0, Arc::clone(&w.target))
            }
            (Node::Plan { planned, .. }, None) => planned.0,
        })
    }

    fn exec_context(&self, mut base: ExecContext) -> ExecContext {
        base.cluster = Some(self.cluster.clone());
        base
    }

    fn plans_boundary(&self, op: &LogicalOp, exec: &ExecContext) -> bool {
        matches!(op, LogicalOp::Split { .. })
            || matches!(DatasetExchange::of(op, &exec.session, 1, 0), Ok(Some(_)))
    }
}
