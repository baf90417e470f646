//! What a cluster stage's task carries and does on a worker.
//!
//! A stage task is a small logical plan: its input (one read split, shipped as a
//! `datafusion-proto` physical plan, or the blocks it is given as objects), the
//! row-local steps after it (expressions as `datafusion-proto` bytes, named transforms
//! as JSON), and maybe a write part. The worker rebuilds it as a dataset of its own
//! process and runs it with its local executor; the result is the task's object (or,
//! for a write, the part it staged).

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::bytes::Serializeable;
use serde::{Deserialize, Serialize};
use volley_common::{Result, ResultExt};
use volley_connectors::{DataSource, ReadTask, RemotePart, ScanRequest};
use volley_exec::{MemorySource, TransformFn};
use volley_runtime::cluster::{value_object, RemoteTask, TaskContext};

use super::exchange::{ExchangeMapTask, ExchangeSampleTask};
use super::SessionSettings;
use crate::context::Context;
use crate::logical::LogicalOp;
use crate::options::MapOptions;

/// A row-local step as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ShippedOp {
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
    },
}

pub(crate) fn expr_bytes(e: &Expr) -> Result<Vec<u8>> {
    Ok(e.to_bytes()
        .with_context(|| format!("serializing expression `{e}` for the cluster"))?
        .to_vec())
}

pub(crate) fn expr_from(bytes: &[u8], state: &SessionState) -> Result<Expr> {
    Expr::from_bytes_with_ctx(bytes, &state.task_ctx())
        .context("rebuilding an expression shipped by the driver")
}

impl ShippedOp {
    /// The step of `op` (a row-local node) as it travels; `None` for a node that is
    /// not row-local or holds a closure.
    pub(crate) fn of(op: &LogicalOp) -> Result<Option<ShippedOp>> {
        Ok(Some(match op {
            LogicalOp::Select { exprs, .. } => {
                ShippedOp::Select(exprs.iter().map(expr_bytes).collect::<Result<_>>()?)
            }
            LogicalOp::WithColumn { name, expr, .. } => ShippedOp::WithColumn {
                name: name.clone(),
                expr: expr_bytes(expr)?,
            },
            LogicalOp::Drop { columns, .. } => ShippedOp::Drop(columns.clone()),
            LogicalOp::Rename { pairs, .. } => ShippedOp::Rename(pairs.clone()),
            LogicalOp::Filter { predicate, .. } => ShippedOp::Filter(expr_bytes(predicate)?),
            LogicalOp::MapBatches { f, options, .. } if f.is_shippable() => ShippedOp::Map {
                transform: f.to_json()?,
                batch_size: options.batch_size,
            },
            _ => return Ok(None),
        }))
    }

    /// The node this step was, over `input`.
    pub(crate) fn rebuild(&self, input: Arc<LogicalOp>, state: &SessionState) -> Result<LogicalOp> {
        Ok(match self.clone() {
            ShippedOp::Select(exprs) => LogicalOp::Select {
                input,
                exprs: exprs
                    .iter()
                    .map(|b| expr_from(b, state))
                    .collect::<Result<_>>()?,
            },
            ShippedOp::WithColumn { name, expr } => LogicalOp::WithColumn {
                input,
                name,
                expr: expr_from(&expr, state)?,
            },
            ShippedOp::Drop(columns) => LogicalOp::Drop { input, columns },
            ShippedOp::Rename(pairs) => LogicalOp::Rename { input, pairs },
            ShippedOp::Filter(p) => LogicalOp::Filter {
                input,
                predicate: expr_from(&p, state)?,
            },
            ShippedOp::Map {
                transform,
                batch_size,
            } => LogicalOp::MapBatches {
                input,
                f: TransformFn::from_json(&transform)?,
                options: MapOptions {
                    batch_size,
                    ..MapOptions::default()
                },
            },
        })
    }

    /// What it shows in `explain`.
    pub(crate) fn describe(op: &LogicalOp) -> String {
        op.to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

/// Where a stage task's rows come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum StageInput {
    /// One read split: a serialized DataFusion physical plan, rebuilt with the
    /// settings of the query it reads for.
    Read {
        plan: Vec<u8>,
        settings: SessionSettings,
    },
    /// The batches of the objects the task is given.
    Objects,
}

impl StageInput {
    /// A read split of a dataset's plan: rebuilt with the node's settings.
    pub(crate) fn read(plan: Vec<u8>) -> Self {
        Self::Read {
            plan,
            settings: SessionSettings::default(),
        }
    }
}

/// A task of a cluster stage.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageTask {
    pub(crate) label: String,
    pub(crate) input: StageInput,
    pub(crate) ops: Vec<ShippedOp>,
    pub(crate) write: Option<RemotePart>,
    /// The map work of the exchange above, run on the task's rows: its object is then
    /// a map output (batch `p`: partition `p`), not a block.
    pub(crate) map: Option<ExchangeMapTask>,
    /// The sampling of a sort's keys above, run on the task's rows: its object is then
    /// their sample (the first pass of a stage that runs the sort's map).
    pub(crate) sample: Option<ExchangeSampleTask>,
}

/// One read of a shipped plan: the worker-side source of a stage.
#[derive(Debug)]
struct ShippedScan {
    label: String,
    plan: Arc<dyn ExecutionPlan>,
    /// What it runs in: the node's session with the query's settings.
    task_ctx: Arc<datafusion::execution::TaskContext>,
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
        )
        .in_context(Arc::clone(&self.task_ctx))])
    }
}

/// Serializes a read split's plan for a stage task.
pub(crate) fn plan_bytes(plan: &Arc<dyn ExecutionPlan>, label: &str) -> Result<Vec<u8>> {
    let codec = datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec {};
    Ok(
        datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(
            Arc::clone(plan),
            &codec,
        )
        .with_context(|| format!("serializing the read of {label}"))?
        .to_vec(),
    )
}

/// A write part's name: the same for every attempt, unique in the write, and in the
/// order of the stage's input where the task knows its place in it (a sort's ranges
/// give files in key order); else the task's id.
fn part_name(task: &TaskContext) -> String {
    match volley_exec::bundle_sequence(&task.name) {
        Some(seq) => format!("{seq:05}"),
        None => task
            .task_id
            .rsplit_once('-')
            .map_or(task.task_id.as_str(), |(_, id)| id)
            .to_string(),
    }
}

impl StageTask {
    /// The task as a dataset of this process over `inputs`.
    fn dataset(&self, ctx: &Context, inputs: Vec<Vec<RecordBatch>>) -> Result<crate::Dataset> {
        let state = ctx.session_state();
        let mut op = match &self.input {
            StageInput::Read { plan, settings } => {
                let codec = datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec {};
                let task_ctx = settings.task_ctx(state)?;
                let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
                    plan, &task_ctx, &codec,
                )
                .with_context(|| format!("rebuilding the read of {}", self.label))?;
                LogicalOp::source(Arc::new(ShippedScan {
                    label: self.label.clone(),
                    plan,
                    task_ctx,
                }))
            }
            StageInput::Objects => {
                let batches: Vec<RecordBatch> = inputs.into_iter().flatten().collect();
                LogicalOp::source(Arc::new(MemorySource::try_new(batches)?))
            }
        };
        for s in &self.ops {
            op = Arc::new(s.rebuild(op, state)?);
        }
        Ok(crate::Dataset::new(ctx.clone(), op))
    }
}

#[typetag::serde(name = "volley::StageTask")]
impl RemoteTask for StageTask {
    fn run(&self, task: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let ctx = Context::global()?;
        let ds = self.dataset(&ctx, inputs)?;
        // A task keeps the order of its input, whatever the job's `preserve_order`: its
        // input may be a sorted partition (a sort's reduce output), whose batches would
        // otherwise be written in the order its local tasks finish.
        let batches = ds.ordered_batches()?;
        match (&self.write, &self.map, &self.sample) {
            (Some(part), _, _) => write_part(part, task, batches),
            (None, Some(map), _) => map.partition(batches.collect::<Result<_>>()?),
            (None, None, Some(sample)) => sample.sample(batches.collect::<Result<_>>()?),
            (None, None, None) => batches.collect(),
        }
    }

    /// A write stages files; the worker waits to learn whether to keep them.
    fn leaves_side_effects(&self) -> bool {
        self.write.is_some()
    }

    /// A superseded attempt removes what it staged.
    fn discard(&self, task: &TaskContext) {
        if let Some(part) = &self.write {
            discard_part(part, task, &self.label);
        }
    }
}

/// Writes a task's output as its part of a write; the task's result is what it staged
/// (committed by the driver once every part is staged).
pub(crate) fn write_part(
    part: &RemotePart,
    task: &TaskContext,
    batches: impl Iterator<Item = Result<RecordBatch>>,
) -> Result<Vec<RecordBatch>> {
    let ctx = Context::global()?;
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
        batches,
        registry.as_ref(),
        &scratch,
        &part_name(task),
        &attempt_name(task),
        exec.runtime.io_handle(),
    )?;
    value_object(&staged)
}

/// This run of `task`'s attempt as its write names it: the attempt number, the node
/// and the worker process. Unique among the runs that may write at once: after a head
/// restart a task's attempts are numbered from 0 again, while a node may still run the
/// old attempt 0 (a worker writes and discards in the same process).
fn attempt_name(task: &TaskContext) -> String {
    format!("{}-{}-{}", task.attempt, task.node_id, std::process::id())
}

/// Removes what a superseded attempt of `task` staged for its part of a write.
pub(crate) fn discard_part(part: &RemotePart, task: &TaskContext, label: &str) {
    let Ok(ctx) = Context::global() else { return };
    let exec = ctx.exec_context();
    let registry = Arc::clone(&exec.session.runtime_env().object_store_registry);
    let io = exec.runtime.io_handle();
    if let Err(e) = part.discard(registry.as_ref(), &part_name(task), &attempt_name(task), io) {
        tracing::warn!("{label}: {e}");
    }
}
