//! Turns an optimized logical plan into a physical plan, fusing row-local steps.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::Column;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{cast, Expr};
use volley_common::{Result, VolleyError};
use volley_exec::{
    ActorMapExec, LazyStep, LimitExec, MapExec, PhysicalPlan, ReadExec, Step, UnionExec,
    WriteTarget,
};
use volley_runtime::ResourceRequest;

use crate::logical::LogicalOp;
use crate::options::MapOptions;

/// CPUs of the task a plan's output comes from, when its steps can fuse into it.
fn fusable_cpus(plan: &PhysicalPlan) -> Option<f64> {
    match plan {
        PhysicalPlan::Read(r) if r.write.is_none() => Some(r.resources.num_cpus),
        PhysicalPlan::Map(m) if m.write.is_none() && m.concurrency.is_none() => {
            Some(m.resources.num_cpus)
        }
        _ => None,
    }
}

/// Appends a step to the plan's last task-based operator, or starts a new one.
fn append(plan: PhysicalPlan, step: Step, cpus: Option<f64>) -> PhysicalPlan {
    let want = cpus.or_else(|| fusable_cpus(&plan)).unwrap_or(1.0);
    match plan {
        PhysicalPlan::Read(mut r)
            if r.write.is_none() && (r.resources.num_cpus - want).abs() < 1e-9 =>
        {
            r.steps.push(step);
            PhysicalPlan::Read(r)
        }
        PhysicalPlan::Map(mut m)
            if m.write.is_none()
                && m.concurrency.is_none()
                && (m.resources.num_cpus - want).abs() < 1e-9 =>
        {
            m.steps.push(step);
            PhysicalPlan::Map(m)
        }
        other => PhysicalPlan::Map(MapExec {
            input: Box::new(other),
            steps: vec![step],
            resources: ResourceRequest::cpus(want),
            concurrency: None,
            bundle_rows: 1,
            write: None,
        }),
    }
}

/// A planned subtree: its operators and its output schema where known.
pub(crate) type Planned = (PhysicalPlan, Option<SchemaRef>);

/// Plans `op` to run in this process; returns the plan and its output schema where
/// known.
pub(crate) fn plan(op: &LogicalOp, state: &SessionState) -> Result<Planned> {
    let children = op
        .inputs()
        .into_iter()
        .map(|i| plan(i, state))
        .collect::<Result<Vec<_>>>()?;
    plan_node(op, children, state)
}

/// The most workers (threads) a stateful transform of this process may ask for.
const MAX_LOCAL_WORKERS: usize = 4096;

/// Checks a stateful transform's workers: each is a thread of this process.
fn local_workers(name: &str, options: &MapOptions) -> Result<()> {
    let most = options.concurrency.map_or(1, |c| c.bounds().1);
    if most > MAX_LOCAL_WORKERS {
        return Err(VolleyError::plan(format!(
            "`{name}` asks for {most} concurrent workers: at most {MAX_LOCAL_WORKERS} in \
             one process (each is a thread)"
        )));
    }
    Ok(())
}

/// Checks that a transform asks only for what this process has (CPUs, memory).
fn local_resources(name: &str, options: &MapOptions) -> Result<()> {
    // A negative share would give CPUs back to the runtime for every task started.
    if !(options.num_cpus.is_finite() && options.num_cpus >= 0.0) {
        return Err(VolleyError::plan(format!(
            "`{name}` asks for {} CPUs: give a share of 0 or more",
            options.num_cpus
        )));
    }
    if options.wants_cluster_resources() {
        return Err(VolleyError::plan(format!(
            "`{name}` asks for {} GPUs and resources {:?}, which only a cluster's nodes \
             give (run it on a cluster: VOLLEY_ADDRESS)",
            options.num_gpus, options.custom
        )));
    }
    Ok(())
}

/// Plans one node over its children's plans (in the order of `op.inputs()`), to run in
/// this process.
pub(crate) fn plan_node(
    op: &LogicalOp,
    mut children: Vec<Planned>,
    state: &SessionState,
) -> Result<Planned> {
    let mut child = || children.remove(0);
    Ok(match op {
        LogicalOp::Exchange { .. }
        | LogicalOp::Split { .. }
        | LogicalOp::Sort { .. }
        | LogicalOp::Aggregate { .. }
        | LogicalOp::Distinct { .. }
        | LogicalOp::Join { .. } => {
            return Err(VolleyError::internal(format!(
                "a stage boundary reached the planner (they become sources before planning): {op}"
            )))
        }
        LogicalOp::Write { .. } => {
            return Err(VolleyError::internal(format!(
                "a write below the root of a plan: {op}"
            )))
        }
        LogicalOp::Source { source, request } => {
            let schema = op.schema(state)?;
            (
                PhysicalPlan::Read(ReadExec {
                    source: Arc::clone(source),
                    request: request.clone(),
                    steps: vec![],
                    resources: ResourceRequest::cpus(1.0),
                    write: None,
                }),
                schema,
            )
        }
        LogicalOp::Select { input, .. }
        | LogicalOp::WithColumn { input, .. }
        | LogicalOp::Drop { input, .. }
        | LogicalOp::Rename { input, .. } => {
            let (child, schema) = child();
            match schema {
                Some(schema) => {
                    let exprs = op.projection(&schema, false)?.expect("column-shaping node");
                    let step = Step::project(&exprs, &schema, state)?;
                    let out = match &step {
                        Step::Project { schema, .. } => Some(Arc::clone(schema)),
                        _ => None,
                    };
                    (append(child, step, None), out)
                }
                None => {
                    let node = op.with_inputs(vec![Arc::clone(input)]);
                    let state = state.clone();
                    let display = node.to_string();
                    let lazy = LazyStep::new(display, move |schema| {
                        let exprs = node
                            .projection(schema, false)?
                            .expect("column-shaping node");
                        Step::project(&exprs, schema, &state)
                    });
                    (append(child, Step::Lazy(lazy), None), None)
                }
            }
        }
        LogicalOp::Filter { predicate, .. } => {
            let (child, schema) = child();
            let step = match &schema {
                Some(s) => Step::filter(predicate, s, state)?,
                None => {
                    let (predicate, state) = (predicate.clone(), state.clone());
                    Step::Lazy(LazyStep::new(format!("Filter {predicate}"), move |s| {
                        Step::filter(&predicate, s, &state)
                    }))
                }
            };
            (append(child, step, None), schema)
        }
        LogicalOp::FilterFn { predicate, .. } => {
            let (child, schema) = child();
            (
                append(child, Step::FilterFn(predicate.clone()), None),
                schema,
            )
        }
        LogicalOp::MapBatches { f, options, .. } => {
            local_resources(&f.name(), options)?;
            let (child, _) = child();
            let step = Step::Map {
                f: f.clone(),
                batch_size: options.batch_size,
            };
            let concurrency = options.concurrency.map(|c| c.bounds().1);
            let plan = if concurrency.is_some() || fusable_cpus(&child) != Some(options.num_cpus) {
                PhysicalPlan::Map(MapExec {
                    input: Box::new(child),
                    steps: vec![step],
                    resources: ResourceRequest::cpus(options.num_cpus),
                    concurrency,
                    bundle_rows: options.batch_size.unwrap_or(1),
                    write: None,
                })
            } else {
                append(child, step, Some(options.num_cpus))
            };
            (plan, None)
        }
        LogicalOp::MapBatchesStateful {
            factory, options, ..
        } => {
            local_resources(&factory.name(), options)?;
            local_workers(&factory.name(), options)?;
            let (child, _) = child();
            (
                PhysicalPlan::ActorMap(ActorMapExec {
                    input: Box::new(child),
                    factory: factory.clone(),
                    concurrency: options.concurrency.map_or(1, |c| c.bounds().1),
                    resources: ResourceRequest::cpus(options.num_cpus),
                    batch_size: options.batch_size,
                }),
                None,
            )
        }
        LogicalOp::Limit { n, .. } => {
            let (child, schema) = child();
            (
                PhysicalPlan::Limit(LimitExec {
                    input: Box::new(child),
                    n: *n,
                }),
                schema,
            )
        }
        LogicalOp::Union { .. } => {
            let known: Option<Vec<(usize, SchemaRef)>> = children
                .iter()
                .enumerate()
                .map(|(i, (_, s))| s.clone().map(|s| (i, s)))
                .collect();
            let Some(known) = known else {
                // An input whose columns a user transform decides gives them as they
                // come: the first input's schema, where known; the known ones must be
                // the same exactly (nothing is relabelled).
                let some: Vec<(usize, SchemaRef)> = children
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, s))| s.clone().map(|s| (i, s)))
                    .collect();
                if !some.is_empty() {
                    crate::logical::same_schemas(&some)?;
                }
                let schema = children[0].1.clone();
                let plans = children.into_iter().map(|(p, _)| p).collect();
                return Ok((PhysicalPlan::Union(UnionExec { inputs: plans }), schema));
            };
            // Every input gives the union's schema exactly: views cast to plain
            // strings, columns labelled nullable where another input's are.
            let target = crate::logical::union_schema(&known)?;
            let mut plans = Vec::new();
            for (i, (p, s)) in children.into_iter().enumerate() {
                let s = s.expect("known above");
                if s.fields() == target.fields() {
                    plans.push(p);
                    continue;
                }
                // Relabelled here, a cluster input's rows would all pass through this
                // process.
                if on_cluster(&p) {
                    return Err(VolleyError::plan(format!(
                        "union: input {i}'s columns differ from the others' in nullability, \
                         string views or field metadata; on a cluster they are not made one \
                         (its rows would pass \
                         through this process): cast its string columns, or union inputs whose \
                         columns are the same"
                    )));
                }
                let exprs: Vec<(Expr, String)> = s
                    .fields()
                    .iter()
                    .zip(target.fields())
                    .map(|(f, t)| {
                        let c = Expr::Column(Column::new_unqualified(f.name()));
                        let e = match f.data_type() == t.data_type() {
                            true => c,
                            false => cast(c, t.data_type().clone()),
                        };
                        (e, f.name().clone())
                    })
                    .collect();
                let Step::Project { exprs, .. } = Step::project(&exprs, &s, state)? else {
                    return Err(VolleyError::internal("a projection that is not one"));
                };
                let relabel = Step::Project {
                    exprs,
                    schema: Arc::clone(&target),
                };
                plans.push(append(p, relabel, None));
            }
            (
                PhysicalPlan::Union(UnionExec { inputs: plans }),
                Some(target),
            )
        }
    })
}

/// Whether `plan`'s rows come from the cluster's nodes as they are, without passing
/// through this process (a union or limit of such plans too).
fn on_cluster(plan: &PhysicalPlan) -> bool {
    match plan {
        PhysicalPlan::ClusterRead(_)
        | PhysicalPlan::ClusterMap(_)
        | PhysicalPlan::ClusterActorPool(_)
        | PhysicalPlan::ClusterExchange(_)
        | PhysicalPlan::ClusterRows(_) => true,
        PhysicalPlan::Union(u) => u.inputs.iter().any(on_cluster),
        PhysicalPlan::Limit(l) => on_cluster(&l.input),
        _ => false,
    }
}

/// Makes the plan's tasks write their output to `target`.
pub(crate) fn with_write(plan: PhysicalPlan, target: Arc<WriteTarget>) -> PhysicalPlan {
    match plan {
        PhysicalPlan::Read(mut r) if r.write.is_none() => {
            r.write = Some(target);
            PhysicalPlan::Read(r)
        }
        PhysicalPlan::Map(mut m) if m.write.is_none() => {
            m.write = Some(target);
            PhysicalPlan::Map(m)
        }
        other => PhysicalPlan::Map(MapExec {
            input: Box::new(other),
            steps: vec![],
            resources: ResourceRequest::cpus(1.0),
            concurrency: None,
            bundle_rows: 1,
            write: Some(target),
        }),
    }
}
