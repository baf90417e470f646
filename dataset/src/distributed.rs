//! Running a dataset on a cluster.
//!
//! A plan that reads files and then applies row-local steps (select, filter,
//! with_column, drop, rename, named `map_batches` transforms) is cut into one cluster
//! task per read task. Each task carries its fragment: the read as a serialized
//! DataFusion plan (`datafusion-proto`), the steps after it as serialized expressions
//! and named transforms. A worker rebuilds the fragment, runs it with its own local
//! executor, and either returns the batches as an object or writes them as one part of
//! the write (named after the task, so a retried task replaces its files).
//!
//! Other plan shapes (limits, unions, stateful transforms, sorts, joins, group-bys) run on
//! the driver as they do locally.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::execution::context::SessionState;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::Serializeable;
use serde::{Deserialize, Serialize};
use volley_common::{Result, ResultExt, VolleyError};
use volley_connectors::{
    DataSource, ReadTask, RemotePart, ScanRequest, StagedPart, WriteJob, WriteSummary,
};
use volley_exec::TransformFn;
use volley_runtime::cluster::{
    object_value, value_object, Cluster, ObjectRef, RemoteTask, Resources, TaskContext, TaskOptions,
};

use crate::context::Context;
use crate::dataset::MapOptions;
use crate::logical::LogicalOp;
use crate::{optimizer, planner};

/// A row-local step as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum ShippedOp {
    Select(Vec<Vec<u8>>),
    WithColumn {
        name: String,
        expr: Vec<u8>,
    },
    Drop(Vec<String>),
    Rename(Vec<(String, String)>),
    Filter(Vec<u8>),
    Map {
        transform: String,
        batch_size: Option<usize>,
        num_cpus: f64,
    },
}

fn expr_bytes(e: &datafusion::logical_expr::Expr) -> Result<Vec<u8>> {
    Ok(e.to_bytes()
        .with_context(|| format!("serializing expression `{e}` for the cluster"))?
        .to_vec())
}

fn expr_from(bytes: &[u8], state: &SessionState) -> Result<datafusion::logical_expr::Expr> {
    datafusion::logical_expr::Expr::from_bytes_with_ctx(bytes, &state.task_ctx())
        .context("rebuilding an expression shipped by the driver")
}

/// The part of a plan that runs as cluster tasks: a source and the steps after it.
struct Fragment {
    source: Arc<dyn DataSource>,
    request: ScanRequest,
    ops: Vec<ShippedOp>,
    /// CPUs of each task: the most any fused transform asks for.
    num_cpus: f64,
}

/// The fragment of `op`, if its shape runs as cluster tasks. Fails for a transform that
/// cannot be shipped (a closure).
fn fragment(op: &LogicalOp) -> Result<Option<Fragment>> {
    let (input, shipped) = match op {
        LogicalOp::Source { source, request } => {
            return Ok(Some(Fragment {
                source: Arc::clone(source),
                request: request.clone(),
                ops: vec![],
                num_cpus: 1.0,
            }))
        }
        LogicalOp::Select { input, exprs } => (
            input,
            ShippedOp::Select(exprs.iter().map(expr_bytes).collect::<Result<_>>()?),
        ),
        LogicalOp::WithColumn { input, name, expr } => (
            input,
            ShippedOp::WithColumn {
                name: name.clone(),
                expr: expr_bytes(expr)?,
            },
        ),
        LogicalOp::Drop { input, columns } => (input, ShippedOp::Drop(columns.clone())),
        LogicalOp::Rename { input, pairs } => (input, ShippedOp::Rename(pairs.clone())),
        LogicalOp::Filter { input, predicate } => {
            (input, ShippedOp::Filter(expr_bytes(predicate)?))
        }
        LogicalOp::FilterFn { predicate, .. } => {
            return Err(VolleyError::plan(format!(
                "filter `{}` is a Rust closure and cannot be shipped to cluster workers: \
                 use an expression (`filter(col(..).gt(..))`) or a NamedTransform",
                predicate.name()
            )))
        }
        LogicalOp::MapBatches { input, f, options } => {
            if !f.is_shippable() {
                // Names the transform and says how to make it shippable.
                f.to_json()?;
            }
            (
                input,
                ShippedOp::Map {
                    transform: f.to_json()?,
                    batch_size: options.batch_size,
                    num_cpus: options.num_cpus,
                },
            )
        }
        LogicalOp::MapBatchesStateful { .. }
        | LogicalOp::Limit { .. }
        | LogicalOp::Union { .. } => return Ok(None),
    };
    let Some(mut f) = fragment(input)? else {
        return Ok(None);
    };
    if let ShippedOp::Map { num_cpus, .. } = &shipped {
        f.num_cpus = f.num_cpus.max(*num_cpus);
    }
    f.ops.push(shipped);
    Ok(Some(f))
}

/// A read task and the steps after it, run by a cluster worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct FragmentTask {
    label: String,
    scan: Vec<u8>,
    ops: Vec<ShippedOp>,
    write: Option<RemotePart>,
}

/// One read of a shipped plan: the worker-side source of a fragment.
#[derive(Debug)]
struct ShippedScan {
    label: String,
    plan: Arc<dyn ExecutionPlan>,
}

#[async_trait::async_trait]
impl DataSource for ShippedScan {
    fn name(&self) -> String {
        "Read".into()
    }
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.plan.schema()
    }
    fn describe(&self) -> String {
        self.label.clone()
    }
    async fn plan(&self, _: &SessionState, _: &ScanRequest) -> Result<Vec<ReadTask>> {
        Ok(vec![ReadTask::from_plan(
            self.label.clone(),
            0,
            Arc::clone(&self.plan),
        )])
    }
}

impl FragmentTask {
    /// The fragment as a local dataset of this process.
    fn dataset(&self, ctx: &Context) -> Result<crate::Dataset> {
        let state = ctx.session_state();
        let codec = datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec {};
        let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &self.scan,
            &state.task_ctx(),
            &codec,
        )
        .with_context(|| format!("rebuilding the read of {}", self.label))?;
        let mut op = LogicalOp::source(Arc::new(ShippedScan {
            label: self.label.clone(),
            plan,
        }));
        for s in &self.ops {
            op = Arc::new(match s.clone() {
                ShippedOp::Select(exprs) => LogicalOp::Select {
                    input: op,
                    exprs: exprs
                        .iter()
                        .map(|b| expr_from(b, state))
                        .collect::<Result<_>>()?,
                },
                ShippedOp::WithColumn { name, expr } => LogicalOp::WithColumn {
                    input: op,
                    name,
                    expr: expr_from(&expr, state)?,
                },
                ShippedOp::Drop(columns) => LogicalOp::Drop { input: op, columns },
                ShippedOp::Rename(pairs) => LogicalOp::Rename { input: op, pairs },
                ShippedOp::Filter(p) => LogicalOp::Filter {
                    input: op,
                    predicate: expr_from(&p, state)?,
                },
                ShippedOp::Map {
                    transform,
                    batch_size,
                    num_cpus,
                } => LogicalOp::MapBatches {
                    input: op,
                    f: TransformFn::from_json(&transform)?,
                    options: MapOptions {
                        batch_size,
                        num_cpus,
                        concurrency: None,
                    },
                },
            });
        }
        Ok(crate::Dataset::new(ctx.clone(), op))
    }
}

#[typetag::serde(name = "volley::FragmentTask")]
impl RemoteTask for FragmentTask {
    fn run(&self, task: &TaskContext, _: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let ctx = Context::global()?;
        let ds = self.dataset(&ctx)?;
        match &self.write {
            None => ds.collect(),
            Some(part) => {
                let exec = ctx.exec_context();
                let registry = Arc::clone(&exec.session.runtime_env().object_store_registry);
                let scratch = exec
                    .config
                    .exec
                    .spill_dir
                    .as_ref()
                    .map(std::path::PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir);
                let staged = part.write(
                    ds.iter_batches()?,
                    registry.as_ref(),
                    &scratch,
                    &part_name(task),
                    task.attempt,
                    exec.runtime.io_handle(),
                )?;
                value_object(&staged)
            }
        }
    }

    /// A superseded attempt removes what it staged.
    fn discard(&self, task: &TaskContext) {
        let Some(part) = &self.write else { return };
        let Ok(ctx) = Context::global() else { return };
        let exec = ctx.exec_context();
        let registry = Arc::clone(&exec.session.runtime_env().object_store_registry);
        let io = exec.runtime.io_handle();
        if let Err(e) = part.discard(registry.as_ref(), &part_name(task), task.attempt, io) {
            tracing::warn!("{}: {e}", self.label);
        }
    }
}

/// A write part's name: the task's id (unique in the write, the same for every attempt).
fn part_name(task: &TaskContext) -> String {
    task.task_id
        .rsplit_once('-')
        .map_or(task.task_id.as_str(), |(_, id)| id)
        .to_string()
}

/// The cluster tasks of a dataset, if its shape runs on the cluster.
pub(crate) struct Distributed {
    tasks: Vec<FragmentTask>,
    options: TaskOptions,
}

impl Distributed {
    /// Cuts `plan` into cluster tasks; `None` when its shape runs on the driver.
    pub(crate) fn plan(ctx: &Context, plan: &Arc<LogicalOp>) -> Result<Option<Self>> {
        let state = ctx.session_state();
        let optimized = optimizer::optimize(plan, state)?;
        let Some(f) = fragment(&optimized)? else {
            return Ok(None);
        };
        // The steps must plan here (a bad column fails now, not on every worker).
        planner::plan(&optimized, state)?;
        let exec = ctx.exec_context();
        let reads = exec.block_on(f.source.plan(state, &f.request))?;
        if reads.iter().any(|r| r.plan().is_none()) {
            return Ok(None);
        }
        let codec = datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec {};
        let tasks = reads
            .iter()
            .map(|r| {
                let plan = r.plan().expect("checked above");
                let scan = datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(
                    Arc::clone(plan),
                    &codec,
                )
                .with_context(|| format!("serializing the read of {}", r.label))?;
                Ok(FragmentTask {
                    label: r.label.clone(),
                    scan: scan.to_vec(),
                    ops: f.ops.clone(),
                    write: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            tasks,
            options: TaskOptions::default()
                .resources(Resources::cpus(f.num_cpus))
                .name("fragment"),
        }))
    }

    /// Submits the tasks, at most `window` at once, and hands each result to `each` in
    /// task order.
    fn run(
        self,
        cluster: &Cluster,
        mut each: impl FnMut(usize, Vec<RecordBatch>) -> Result<()>,
    ) -> Result<()> {
        let total = cluster
            .status()?
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.total.as_ref().map_or(0.0, |t| t.num_cpus))
            .sum::<f64>();
        let window = ((total / self.options.resources.num_cpus.max(0.01)) as usize * 2).max(2);
        let mut pending: std::collections::VecDeque<(usize, ObjectRef)> = Default::default();
        let mut tasks = self.tasks.into_iter().enumerate();
        loop {
            while pending.len() < window {
                let Some((i, t)) = tasks.next() else { break };
                let label = t.label.clone();
                let r = cluster.submit(t, &[], &self.options.clone().name(label))?;
                pending.push_back((i, r));
            }
            let Some((i, r)) = pending.pop_front() else {
                break;
            };
            each(i, cluster.get(&r)?)?;
        }
        Ok(())
    }

    /// Runs the tasks on a thread and streams their batches, in order, through a
    /// bounded channel.
    pub(crate) fn stream(
        self,
        cluster: Cluster,
    ) -> Result<impl Iterator<Item = Result<RecordBatch>> + Send> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<RecordBatch>>(4);
        std::thread::Builder::new()
            .name("volley-cluster-stream".into())
            .spawn(move || {
                let sent = self.run(&cluster, |_, batches| {
                    for b in batches {
                        tx.send(Ok(b))
                            .map_err(|_| VolleyError::execution("the consumer stopped"))?;
                    }
                    Ok(())
                });
                if let Err(e) = sent {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| VolleyError::internal(format!("cannot start a thread: {e}")))?;
        Ok(rx.into_iter())
    }

    /// Runs the tasks and returns their batches in order.
    pub(crate) fn collect(self, cluster: &Cluster) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        self.run(cluster, |_, b| {
            out.extend(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Runs the tasks as parts of `job`; commits it when all succeeded.
    pub(crate) fn write(mut self, cluster: &Cluster, job: WriteJob) -> Result<WriteSummary> {
        for (i, t) in self.tasks.iter_mut().enumerate() {
            let _ = i;
            t.write = Some(job.remote_part());
        }
        // The results the head accepted: one attempt of each task.
        let mut parts: Vec<StagedPart> = Vec::new();
        let result = self.run(cluster, |_, b| {
            parts.push(object_value(&b)?);
            Ok(())
        });
        match result {
            Ok(()) => job.commit(parts),
            Err(e) => {
                job.abort();
                Err(e)
            }
        }
    }
}
