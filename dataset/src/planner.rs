//! Turns an optimized logical plan into a physical plan, fusing row-local steps.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionState;
use volley_common::{Result, VolleyError};
use volley_exec::{
    ActorMapExec, LazyStep, LimitExec, MapExec, PhysicalPlan, ReadExec, Step, UnionExec,
    WriteTarget,
};
use volley_runtime::ResourceRequest;

use crate::logical::LogicalOp;

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

/// Plans `op`; returns the plan and its output schema where known.
pub(crate) fn plan(
    op: &LogicalOp,
    state: &SessionState,
) -> Result<(PhysicalPlan, Option<SchemaRef>)> {
    Ok(match op {
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
            let (child, schema) = plan(input, state)?;
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
        LogicalOp::Filter { input, predicate } => {
            let (child, schema) = plan(input, state)?;
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
        LogicalOp::FilterFn { input, predicate } => {
            let (child, schema) = plan(input, state)?;
            (
                append(child, Step::FilterFn(predicate.clone()), None),
                schema,
            )
        }
        LogicalOp::MapBatches { input, f, options } => {
            let (child, _) = plan(input, state)?;
            let step = Step::Map {
                f: f.clone(),
                batch_size: options.batch_size,
            };
            let plan = if options.concurrency.is_some()
                || fusable_cpus(&child) != Some(options.num_cpus)
            {
                PhysicalPlan::Map(MapExec {
                    input: Box::new(child),
                    steps: vec![step],
                    resources: ResourceRequest::cpus(options.num_cpus),
                    concurrency: options.concurrency,
                    bundle_rows: options.batch_size.unwrap_or(1),
                    write: None,
                })
            } else {
                append(child, step, Some(options.num_cpus))
            };
            (plan, None)
        }
        LogicalOp::MapBatchesStateful {
            input,
            factory,
            options,
        } => {
            let (child, _) = plan(input, state)?;
            (
                PhysicalPlan::ActorMap(ActorMapExec {
                    input: Box::new(child),
                    factory: factory.clone(),
                    concurrency: options.concurrency.unwrap_or(1),
                    resources: ResourceRequest::cpus(options.num_cpus),
                    batch_size: options.batch_size,
                }),
                None,
            )
        }
        LogicalOp::Limit { input, n } => {
            let (child, schema) = plan(input, state)?;
            (
                PhysicalPlan::Limit(LimitExec {
                    input: Box::new(child),
                    n: *n,
                }),
                schema,
            )
        }
        LogicalOp::Union { inputs } => {
            let mut plans = Vec::new();
            let mut schema: Option<SchemaRef> = None;
            for (i, input) in inputs.iter().enumerate() {
                let (p, s) = plan(input, state)?;
                if let (Some(first), Some(this)) = (&schema, &s) {
                    if first.fields() != this.fields() {
                        return Err(VolleyError::plan(format!(
                            "union: input {i} has schema {this} but input 0 has {first}"
                        )));
                    }
                }
                if i == 0 {
                    schema = s;
                }
                plans.push(p);
            }
            (PhysicalPlan::Union(UnionExec { inputs: plans }), schema)
        }
    })
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
