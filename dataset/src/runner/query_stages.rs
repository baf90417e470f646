//! SQL and relational plans cut into stages that run on a cluster's nodes.
//!
//! DataFusion plans a query for as many partitions as the cluster's exchanges use.
//! The plan is then cut at every repartition and every merge of partitions:
//!
//! ```text
//!   SortPreservingMergeExec            ── runs here, over the last stage's outputs
//!     ClusterStageExec: stage 2        ◀─ gather: task p's output is partition p
//!       SortExec                          ┐ stage 2: one task per partition, on the
//!         AggregateExec FinalPartitioned  ┘ nodes, reading partition p of stage 1
//!           ClusterStageExec: stage 1  ◀─ exchange: every map output's batch p
//!             RepartitionExec Hash(..)    ┐ stage 1: one map task per input
//!               AggregateExec Partial     │ partition (file group), splitting its
//!                 DataSourceExec          ┘ rows by the hash of the keys
//! ```
//!
//! A stage is a subtree of the plan shipped as `datafusion-proto` bytes; its tasks are
//! ordinary cluster tasks whose inputs are the objects of the stages below (an
//! exchange's task reads only its partition's batch of each map output), so the head
//! schedules them as their inputs become ready, runs them where those inputs are, and
//! rebuilds a lost input by running its task again (lineage). An exchange stage's task
//! runs its partition of the repartition's input and splits the rows into one batch
//! per output partition, by the plan's own hash expressions (or round robin); a gather
//! stage's task returns its partition's rows. Where a stage's task needs every
//! partition of a stage below (the build side of a join collected into one partition,
//! a merge inside a stage), it is given all of them: a broadcast.
//!
//! Every stage is submitted when this process first reads the plan's output; the
//! objects are freed when it has read all of it, or stopped (a `LIMIT` reached) or
//! failed, and then the tasks still running or waiting are stopped
//! ([`Cluster::cancel`]). A plan with a node that
//! `datafusion-proto` cannot carry (a dataset's own scan, a user-defined function the
//! nodes do not know) runs as before: its file scans on the nodes, the rest here.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, JoinType, Result as DfResult};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext as DfTaskContext};
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_expr::expressions::{DynamicFilterPhysicalExpr, Literal};
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_expr_common::physical_expr::proto_decode::PhysicalExprDecodeCtx;
use datafusion::physical_expr_common::physical_expr::proto_encode::PhysicalExprEncodeCtx;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execution_plan::{
    Boundedness, ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions,
};
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, PartitionMode,
};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::scalar_subquery::ScalarSubqueryExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PhysicalExpr, PlanProperties,
};
use datafusion_proto::physical_plan::from_proto::parse_physical_expr_with_converter;
use datafusion_proto::physical_plan::to_proto::serialize_physical_expr_with_converter;
use datafusion_proto::physical_plan::{
    DefaultPhysicalExtensionCodec, PhysicalExtensionCodec, PhysicalPlanDecodeContext,
    PhysicalPlanNodeExt, PhysicalProtoConverterExtension,
};
use serde::{Deserialize, Serialize};
use volley_common::{Result, ResultExt, VolleyError};
use volley_runtime::cluster::{
    name_task_error, Cluster, EncodedTask, ObjectGroup, ObjectRef, ObjectState, RemoteTask,
    Resources, TaskContext, TaskInput, TaskOptions,
};

use super::exchange::{batches_per_partition, from_bytes, schema_bytes};
use super::SessionSettings;
use crate::conjunction::Conjunction;
use crate::context::Context;
use crate::decimal_arith::{DecimalArith, DecimalOp};
use crate::decode_filters::{holds_dynamic_filter, Sample, ScanCondition, MAX_PASSING};
use crate::handover::{thread_stream, Handover};
use crate::view_compare::ViewStringIn;
use volley_connectors::file_scan_config;

/// The plan `plan` with its stages cut out to run on `cluster`'s nodes, their tasks
/// with the query's `settings`; `None` where the plan cannot be cut (a node
/// `datafusion-proto` cannot carry, a repartition that keeps an order or splits by
/// ranges).
pub(crate) fn stages_on_cluster(
    plan: &Arc<dyn ExecutionPlan>,
    cluster: &Cluster,
    settings: &Arc<SessionSettings>,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    // Each stage computes its own copy of what a query shares in one process.
    let plan = &crate::shared_subplans::unshare(Arc::clone(plan))?;
    if !can_cut(plan) {
        return Ok(None);
    }
    let mut next = 0;
    let Some(cut) = cut_stages(plan, cluster, settings, &mut next)? else {
        return Ok(None);
    };
    // File scans left here (a plan of one partition) still run on the nodes.
    Ok(Some(super::scans_on_cluster(cut, cluster, settings)?))
}

/// `plan` cut into stages numbered from `next` + 1; `None` where what would be left
/// here reads an exchange, or a scalar subquery's plan is not at the top.
///
/// A plan with scalar subqueries (`ScalarSubqueryExec`, at the top of the plan that
/// uses their values) keeps that node here: each subquery is cut on its own and runs
/// first, as a query of its own; the main plan's stages are submitted after, when its
/// first partition is read, and carry the subqueries' values as literals (see
/// [`StageConverter`]).
fn cut_stages(
    plan: &Arc<dyn ExecutionPlan>,
    cluster: &Cluster,
    settings: &Arc<SessionSettings>,
    next: &mut usize,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if plan.downcast_ref::<ScalarSubqueryExec>().is_some() {
        let mut children = Vec::new();
        for child in plan.children() {
            match cut_stages(child, cluster, settings, next)? {
                Some(c) => children.push(c),
                None => return Ok(None),
            }
        }
        return Ok(Some(Arc::clone(plan).replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )?));
    }
    let mut nested_subqueries = false;
    plan.apply(|node| {
        nested_subqueries |= node.downcast_ref::<ScalarSubqueryExec>().is_some();
        Ok(TreeNodeRecursion::Continue)
    })?;
    if nested_subqueries {
        return Ok(None);
    }
    // This process reads one partition: the last stage gathers the rest.
    let root = if plan.output_partitioning().partition_count() > 1 {
        Arc::new(CoalescePartitionsExec::new(Arc::clone(plan))) as Arc<dyn ExecutionPlan>
    } else {
        Arc::clone(plan)
    };
    let mut new_stage = |plan: Arc<dyn ExecutionPlan>, kind: StageKind| {
        *next += 1;
        Stage::new(*next, kind, plan, cluster.clone(), Arc::clone(settings))
    };
    let cut = root
        .transform_up(|node| {
            if let Some(r) = node.downcast_ref::<RepartitionExec>() {
                let n = r.partitioning().partition_count();
                let props = Arc::clone(node.properties());
                let stage = new_stage(Arc::clone(&node), StageKind::Exchange { partitions: n })?;
                return Ok(Transformed::yes(ClusterStageExec::on_driver(stage, props)));
            }
            let merges = node.downcast_ref::<CoalescePartitionsExec>().is_some()
                || node.downcast_ref::<SortPreservingMergeExec>().is_some();
            if merges {
                let child = Arc::clone(node.children()[0]);
                let props = Arc::clone(child.properties());
                let stage = new_stage(child, StageKind::Gather)?;
                let read = ClusterStageExec::on_driver(stage, props);
                return Ok(Transformed::yes(node.replace_children(
                    vec![read],
                    ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
                )?));
            }
            let mut cut = |plan: Arc<dyn ExecutionPlan>, kind| {
                let props = Arc::clone(plan.properties());
                Ok(ClusterStageExec::on_driver(new_stage(plan, kind)?, props))
            };
            if let Some(reduced) = reduce_collected_join(&node, &mut cut)? {
                return Ok(Transformed::yes(reduced));
            }
            // A join's collected side is computed once, by a stage of its own, and
            // read whole by every task of the join: recomputed in each task, an
            // order-dependent side (a limit, `first_value`) could differ between tasks.
            // A side that only merges a stage's outputs is read as it is: each task
            // reads every output of that stage (no stage of one task between them).
            if collects_left(&node) {
                let left = Arc::clone(node.children()[0]);
                if !reads_stage_outputs(&left) {
                    let mut children: Vec<Arc<dyn ExecutionPlan>> =
                        node.children().into_iter().cloned().collect();
                    let props = Arc::clone(left.properties());
                    let stage = new_stage(left, StageKind::Gather)?;
                    children[0] = ClusterStageExec::on_driver(stage, props);
                    let node = node.replace_children(
                        children,
                        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
                    )?;
                    KeysFilter::register(&node)?;
                    return Ok(Transformed::yes(node));
                }
                KeysFilter::register(&node)?;
            } else if node
                .downcast_ref::<HashJoinExec>()
                .is_some_and(|j| j.partition_mode() == &PartitionMode::Partitioned)
            {
                KeysFilter::register(&node)?;
            }
            Ok(Transformed::no(node))
        })
        .data()?;
    // What is left here reads gathered stages only (every partition of them).
    let mut reads_exchange = false;
    cut.apply(|node| {
        if let Some(s) = node.downcast_ref::<ClusterStageExec>() {
            if let Source::Cluster(stage) = &s.source {
                reads_exchange |= matches!(stage.kind, StageKind::Exchange { .. });
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok((!reads_exchange).then_some(cut))
}

/// The keys of a hash join (one whose probe rows without a match are never output:
/// inner, left, semi, left anti and mark joins), as a filter for the scans of a stage
/// below its probe side, across an exchange.
///
/// In one process a hash join's dynamic filter reaches every scan of its probe side
/// that DataFusion pushed it into, through partitioned joins and aggregations (TPC-H
/// Q18: the 57 order keys of its `HAVING` leave `orders` and `lineitem` those orders'
/// rows; Q17: the 204 parts of one brand and container leave the scan of `lineitem`
/// that its subquery aggregates by part those parts' rows). On a cluster such a scan
/// runs in a stage of its own, below an exchange: its tasks would run before the join
/// has built anything. Here the stage waits for the
/// stage that makes the join's build side (the collected side, or all partitions of a
/// partitioned join's build side's exchange), this process reads that side (at most
/// [`KEYS_FILTER_BYTES`]), and the filter is set from its keys (each key's bounds, and
/// the keys themselves where one column holds at most [`KEYS_FILTER_VALUES`]
/// distinct ones) before the stage's tasks are made: they carry it as a predicate.
/// A larger side leaves the filter passing every row.
struct KeysFilter {
    /// The join's dynamic filter (a [`DynamicFilterPhysicalExpr`]): its children are
    /// the probe side's keys.
    filter: Arc<dyn PhysicalExpr>,
    /// The join's keys on its build side, and their types on the probe side.
    build_keys: Vec<Arc<dyn PhysicalExpr>>,
    probe_types: Vec<arrow::datatypes::DataType>,
    /// The schema the probe side's keys are over.
    probe_schema: SchemaRef,
    /// The stage that makes the build side (all its outputs).
    build: Arc<Stage>,
}

/// The most bytes of a join's build side this process reads for a [`KeysFilter`].
const KEYS_FILTER_BYTES: u64 = 4 << 20;

/// The most distinct keys a [`KeysFilter`] lists (beyond, bounds only).
const KEYS_FILTER_VALUES: usize = 1024;

impl KeysFilter {
    /// For a join `node` (its build side cut already), registers the filter with
    /// every stage below its probe side whose scans hold the join's dynamic filter.
    fn register(node: &Arc<dyn ExecutionPlan>) -> DfResult<()> {
        let Some(join) = node.downcast_ref::<HashJoinExec>() else {
            return Ok(());
        };
        let Some(filter) = node
            .dynamic_expressions_produced()
            .into_iter()
            .find(|e| e.downcast_ref::<DynamicFilterPhysicalExpr>().is_some())
        else {
            return Ok(());
        };
        // Only where a probe row whose keys the build side lacks is never output (as
        // DataFusion decides for its own filter). A null-aware anti join outputs a
        // build side's NULL key only when its probe side is empty: no filter may empty it.
        let (_, probe_filtered) = join.join_type().on_lr_is_preserved();
        let kept = probe_filtered
            && !join.null_aware
            && join.null_equality() == datafusion::common::NullEquality::NullEqualsNothing
            && matches!(
                join.partition_mode(),
                PartitionMode::CollectLeft | PartitionMode::Partitioned
            );
        let Some(id) = filter.expression_id() else {
            return Ok(());
        };
        let build = match join
            .left()
            .downcast_ref::<CoalescePartitionsExec>()
            .map_or(join.left(), |m| m.input())
            .downcast_ref::<ClusterStageExec>()
            .map(|s| &s.source)
        {
            Some(Source::Cluster(stage)) if kept => Arc::clone(stage),
            _ => return Ok(()),
        };
        let right_schema = join.right().schema();
        let probe_types = join
            .on()
            .iter()
            .map(|(_, r)| r.data_type(&right_schema))
            .collect::<DfResult<Vec<_>>>()?;
        let build_keys: Vec<_> = join.on().iter().map(|(l, _)| Arc::clone(l)).collect();
        let mut stages = BTreeMap::new();
        stages_below(join.right(), &mut stages);
        for stage in stages.values() {
            if scans_hold(&stage.plan, id) {
                stage
                    .keys_filters
                    .lock()
                    .expect("stage lock")
                    .push(KeysFilter {
                        filter: Arc::clone(&filter),
                        build_keys: build_keys.clone(),
                        probe_types: probe_types.clone(),
                        probe_schema: Arc::clone(&right_schema),
                        build: Arc::clone(&build),
                    });
            }
        }
        Ok(())
    }

    /// Waits for the build side and sets the filter from its keys; whether it was set.
    /// The wait is on a thread of its own: this may be called from a task of the
    /// runtime that runs the plan here (a stage submitted when the plan is executed).
    fn fill(&self, cluster: &Cluster) -> Result<bool> {
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("volley-keys-filter".into())
                .spawn_scoped(scope, || self.fill_here(cluster))?
                .join()
                .map_err(|_| VolleyError::internal("a join keys filter's thread panicked"))?
        })
    }

    fn fill_here(&self, cluster: &Cluster) -> Result<bool> {
        let outputs = self.build.outputs()?;
        let metas = loop {
            let states = cluster.wait_objects(&outputs, outputs.len(), WAIT)?;
            let mut metas = Vec::new();
            for s in states {
                match s {
                    ObjectState::Ready(meta) => metas.push(meta),
                    ObjectState::Failed(e) => return Err(e),
                    ObjectState::Pending => {}
                }
            }
            if metas.len() == outputs.len() {
                break metas;
            }
        };
        if metas.iter().map(|m| m.bytes).sum::<u64>() > KEYS_FILTER_BYTES {
            return Ok(false);
        }
        let mut batches = Vec::new();
        for o in outputs.iter() {
            batches.extend(cluster.get(o)?);
        }
        let dynamic = self
            .filter
            .downcast_ref::<DynamicFilterPhysicalExpr>()
            .ok_or_else(|| VolleyError::internal("a join's keys filter is not dynamic"))?;
        let Some(expr) = keys_expression(
            &self.filter,
            &self.build_keys,
            &self.probe_types,
            &self.probe_schema,
            &batches,
        )?
        else {
            return Ok(false);
        };
        dynamic.update(expr)?;
        Ok(true)
    }
}

/// The filter over the probe side's keys (`filter`'s children, of `probe_types`
/// over `probe_schema`) that a join's build side's `batches` make (its keys:
/// `build_keys`); `None` where a key's types differ.
fn keys_expression(
    filter: &Arc<dyn PhysicalExpr>,
    build_keys: &[Arc<dyn PhysicalExpr>],
    probe_types: &[arrow::datatypes::DataType],
    probe_schema: &arrow::datatypes::Schema,
    batches: &[RecordBatch],
) -> DfResult<Option<Arc<dyn PhysicalExpr>>> {
    use datafusion::common::ScalarValue;
    use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
    use datafusion::logical_expr::{Accumulator, Operator};
    use datafusion::physical_expr::expressions::{in_list, BinaryExpr};
    let probe_keys: Vec<Arc<dyn PhysicalExpr>> = filter.children().into_iter().cloned().collect();
    if probe_keys.len() != build_keys.len() {
        return Ok(None);
    }
    let mut conditions: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
    let single = build_keys.len() == 1;
    for (i, key) in build_keys.iter().enumerate() {
        // Bounds, and (one key) the distinct keys while they are few.
        let mut min = MinAccumulator::try_new(&probe_types[i])?;
        let mut max = MaxAccumulator::try_new(&probe_types[i])?;
        let mut listed = HashSet::new();
        for b in batches {
            let values = key.evaluate(b)?.into_array(b.num_rows())?;
            if values.data_type() != &probe_types[i] {
                return Ok(None);
            }
            min.update_batch(std::slice::from_ref(&values))?;
            max.update_batch(std::slice::from_ref(&values))?;
            if !single {
                continue;
            }
            for r in 0..values.len() {
                if listed.len() > KEYS_FILTER_VALUES {
                    break;
                }
                if !values.is_null(r) {
                    listed.insert(ScalarValue::try_from_array(&values, r)?);
                }
            }
        }
        let (min, max) = (min.evaluate()?, max.evaluate()?);
        if min.is_null() || max.is_null() {
            // No build row has this key: the join outputs nothing.
            return Ok(Some(Arc::new(Literal::new(ScalarValue::Boolean(Some(
                false,
            ))))));
        }
        let probe = &probe_keys[i];
        let bound = |op, v| -> Arc<dyn PhysicalExpr> {
            Arc::new(BinaryExpr::new(
                Arc::clone(probe),
                op,
                Arc::new(Literal::new(v)),
            ))
        };
        conditions.push(bound(Operator::GtEq, min));
        conditions.push(bound(Operator::LtEq, max));
        if single && listed.len() <= KEYS_FILTER_VALUES {
            // In order: the same keys make the same plan.
            let mut listed: Vec<ScalarValue> = listed.into_iter().collect();
            listed.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            let listed = listed
                .into_iter()
                .map(|v| Arc::new(Literal::new(v)) as Arc<dyn PhysicalExpr>)
                .collect();
            conditions.push(in_list(Arc::clone(probe), listed, &false, probe_schema)?);
        }
    }
    Ok(conditions
        .into_iter()
        .reduce(|a, b| Arc::new(BinaryExpr::new(a, Operator::And, b)) as Arc<dyn PhysicalExpr>))
}

/// `plan` as its tasks run it: no dynamic filters but the join keys filters of
/// `filled`, which travel as what they now are (nothing changes them any more).
///
/// The cluster's plans are made with joins' dynamic filters so that DataFusion places
/// them in the scans they reach; only those across an exchange ([`KeysFilter`]) are
/// kept. One in its join's own stage would be filled by one partition of the join
/// while it waits for all of them (each runs in a task of its own), and kept only
/// where it pays it did not (TPC-H on the cluster took the same time with it). Nor did
/// filling it here before the stage's tasks start, where the join's collected side is
/// a stage of its own: the stage then waits for that side, and the 22 TPC-H queries
/// took 6.60 s against 6.34 s (Q02, Q03, Q07, Q08 slower by 15-25%). So it is left out
/// with the joins' own, and a scan left with no join keys filter decodes its rows
/// unfiltered again, as planned without them.
///
/// With `fix` false (to show the plan before they are filled), the filters of `filled`
/// stay as they are.
fn stage_filters(
    plan: &Arc<dyn ExecutionPlan>,
    filled: &HashSet<u64>,
    fix: bool,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    use datafusion::datasource::physical_plan::{FileSource, ParquetSource};
    use datafusion::physical_expr::{conjunction, split_conjunction};
    let is_filled = |e: &Arc<dyn PhysicalExpr>| {
        e.downcast_ref::<DynamicFilterPhysicalExpr>()
            .and_then(|d| d.expression_id())
            .is_some_and(|id| filled.contains(&id))
    };
    Arc::clone(plan)
        .transform_up(|node| {
            if node.downcast_ref::<HashJoinExec>().is_some()
                && !node.dynamic_expressions_produced().is_empty()
            {
                return Ok(Transformed::yes(node.reset_state()?));
            }
            let Some(config) = file_scan_config(node.as_ref()) else {
                return Ok(Transformed::no(node));
            };
            let Some(parquet) = config.file_source().downcast_ref::<ParquetSource>() else {
                return Ok(Transformed::no(node));
            };
            let Some(predicate) = parquet.filter() else {
                return Ok(Transformed::no(node));
            };
            if !holds_dynamic_filter(&predicate)? {
                return Ok(Transformed::no(node));
            }
            // Each dynamic filter in a condition: filled (then its expression) or not.
            let mut keys = Vec::new();
            let mut query = Vec::new();
            for c in split_conjunction(&predicate) {
                let wrapped = c.downcast_ref::<ScanCondition>();
                if !holds_dynamic_filter(c)? {
                    query.push((Arc::clone(c), wrapped.map(|w| Arc::clone(w.inner()))));
                    continue;
                }
                let all_filled = !c.exists(|x| {
                    Ok(x.downcast_ref::<DynamicFilterPhysicalExpr>().is_some() && !is_filled(x))
                })?;
                if all_filled && !fix {
                    keys.push(Arc::clone(c));
                } else if all_filled {
                    let fixed = Arc::clone(c)
                        .transform_up(|x| match x.downcast_ref::<DynamicFilterPhysicalExpr>() {
                            Some(d) => Ok(Transformed::yes(d.current()?)),
                            None => Ok(Transformed::no(x)),
                        })?
                        .data;
                    keys.push(fixed);
                }
            }
            let source = if keys.is_empty() {
                // As planned without them: the query's own conditions, unwrapped,
                // tested above the scan. Unless DataFusion itself pushed them into the
                // scan (`pushdown_filters` set by the query): then a condition is not
                // wrapped, no filter above tests it, and the scan must.
                let pushed_by_query = parquet.table_parquet_options().global.pushdown_filters
                    && query.iter().any(|(_, inner)| inner.is_none());
                let own: Vec<_> = query
                    .into_iter()
                    .map(|(c, inner)| inner.unwrap_or(c))
                    .collect();
                let source = parquet.clone().with_pushdown_filters(pushed_by_query);
                match own.is_empty() {
                    true => source.with_predicate(Arc::new(Literal::new(
                        datafusion::common::ScalarValue::Boolean(Some(true)),
                    ))),
                    false => source.with_predicate(conjunction(own)),
                }
            } else {
                let kept = keys.into_iter().chain(query.into_iter().map(|(c, _)| c));
                parquet.with_predicate(conjunction(kept))
            };
            let config = FileScanConfigBuilder::from(config.clone())
                .with_source(Arc::new(source))
                .build();
            Ok(Transformed::yes(
                DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
            ))
        })
        .data()
}

/// Whether a Parquet scan of `plan` holds the dynamic filter `id` in its predicate.
fn scans_hold(plan: &Arc<dyn ExecutionPlan>, id: u64) -> bool {
    plan.exists(|node| {
        Ok(
            crate::shared_subplans::scan_predicate(node.as_ref()).is_some_and(|p| {
                p.exists(|x| {
                    Ok(x.downcast_ref::<DynamicFilterPhysicalExpr>().is_some()
                        && x.expression_id() == Some(id))
                })
                .unwrap_or(false)
            }),
        )
    })
    .unwrap_or(false)
}

/// The stages `plan` reads, and those they read, by id.
fn stages_below(plan: &Arc<dyn ExecutionPlan>, stages: &mut BTreeMap<usize, Arc<Stage>>) {
    let _ = plan.apply(|node| {
        if let Some(ClusterStageExec {
            source: Source::Cluster(stage),
            ..
        }) = node.downcast_ref::<ClusterStageExec>()
        {
            if !stages.contains_key(&stage.id) {
                stages.insert(stage.id, Arc::clone(stage));
                stages_below(&stage.plan, stages);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
}

/// Whether `plan` is a stage's outputs, or the merge of all of them (with no limit).
fn reads_stage_outputs(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let plan = match plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(merge) if merge.fetch().is_none() => merge.input(),
        _ => plan,
    };
    plan.downcast_ref::<ClusterStageExec>().is_some()
}

/// A hash join that collects its left side and emits left rows once its right side is
/// done (see [`finishes_collected_side`]; a left outer, semi, anti or mark join) as a
/// semi-join reduction, the way distributed databases run it: `None` for other nodes.
///
/// Such a join needs all of its right side's rows of a key in the task that has the
/// key's left rows, so both sides are hash-partitioned on the keys. Only the right rows
/// that match some left row (keys and the join's filter) can change its output, and
/// the left side is small (it was collected): a right semi join against the collected
/// left side, which emits right rows as they come in any task, keeps those rows
/// before they are exchanged. Its stage reads the collected side whole (a stage of its
/// own, made once), the exchange of the left side reads the same stage's outputs, and
/// the join itself runs partitioned on the two exchanges. TPC-H Q21 at SF1 then
/// exchanges at most the ~600,000 `lineitem` rows of its 72,000 candidate orders
/// instead of the 9.8 million rows of its two `lineitem` sides.
///
/// A full join keeps every right row and a null-aware anti join (`NOT IN`) needs them
/// all in one place: neither is reduced. [`partition_collected_joins`] partitions the
/// joins that should not be ([`reduced`]) before the plan is cut.
fn reduce_collected_join(
    node: &Arc<dyn ExecutionPlan>,
    cut: &mut dyn FnMut(Arc<dyn ExecutionPlan>, StageKind) -> DfResult<Arc<dyn ExecutionPlan>>,
) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
    let Some(join) = node.downcast_ref::<HashJoinExec>() else {
        return Ok(None);
    };
    if !reducible(join) {
        return Ok(None);
    }
    // The collected side (one partition), as a stage's outputs.
    let mut left = Arc::clone(join.left());
    if !reads_stage_outputs(&left) {
        left = cut(left, StageKind::Gather)?;
    }
    let left_parts = match left.downcast_ref::<CoalescePartitionsExec>() {
        Some(merge) => Arc::clone(merge.input()),
        None => Arc::clone(&left),
    };
    // With no keys filter for the stages below its right side: they would wait for
    // the collected side (TPC-H Q20's scan of `lineitem` below an aggregation, 10%
    // slower), and the reduction already keeps only the matching rows. Nor with the
    // join's limit (a `LIMIT` DataFusion pushed into it): every matching row counts.
    let matching = join
        .builder()
        .with_type(JoinType::RightSemi)
        .with_projection(None)
        .with_fetch(None)
        .with_new_children(vec![left, Arc::clone(join.right())])?
        .reset_state()
        .recompute_properties()
        .build_exec()?;
    let partitions = join.right().output_partitioning().partition_count();
    partitioned_join(join, left_parts, matching, |repartition| {
        cut(repartition, StageKind::Exchange { partitions })
    })
    .map(Some)
}

/// `join` run partitioned: `left` and `right` (its sides) hash-partitioned on its keys
/// into as many partitions as its right side has, each repartition passed through
/// `exchange` (cut into a stage, or left in place).
fn partitioned_join(
    join: &HashJoinExec,
    left: Arc<dyn ExecutionPlan>,
    right: Arc<dyn ExecutionPlan>,
    mut exchange: impl FnMut(Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    let partitions = join.right().output_partitioning().partition_count();
    let mut hash = |input, keys| {
        let repartition = RepartitionExec::try_new(input, Partitioning::Hash(keys, partitions))?;
        exchange(Arc::new(repartition))
    };
    let left = hash(left, join.on().iter().map(|(l, _)| Arc::clone(l)).collect())?;
    let right = hash(
        right,
        join.on().iter().map(|(_, r)| Arc::clone(r)).collect(),
    )?;
    join.builder()
        .with_partition_mode(PartitionMode::Partitioned)
        .with_new_children(vec![left, right])?
        .reset_state()
        .recompute_properties()
        .build_exec()
}

/// Whether `plan` may hold fewer keys than its tables: it filters rows, or joins them
/// in a way that drops some. A collected side that does not (TPC-H Q13's whole
/// `customer` table, left-joined to `orders`) would keep nearly every row of the other
/// side: reducing it is a probe of every row, and the other side's stage waits for it,
/// for nothing (Q13 on a cluster ~15% slower).
fn narrows_keys(plan: &Arc<dyn ExecutionPlan>) -> DfResult<bool> {
    use datafusion::physical_expr::split_conjunction;
    use datafusion::physical_plan::filter::FilterExec;
    plan.exists(|node| {
        if node.downcast_ref::<FilterExec>().is_some() {
            return Ok(true);
        }
        let joined = node
            .downcast_ref::<HashJoinExec>()
            .map(|j| *j.join_type())
            .or_else(|| {
                node.downcast_ref::<NestedLoopJoinExec>()
                    .map(|j| *j.join_type())
            });
        if let Some(
            JoinType::Inner
            | JoinType::LeftSemi
            | JoinType::RightSemi
            | JoinType::LeftAnti
            | JoinType::RightAnti,
        ) = joined
        {
            return Ok(true);
        }
        match crate::shared_subplans::scan_predicate(node.as_ref()) {
            Some(p) => Ok(split_conjunction(&p)
                .into_iter()
                .any(|c| !crate::decode_filters::holds_dynamic_filter(c).unwrap_or(true))),
            None => Ok(false),
        }
    })
}

/// Whether a cluster runs `join` as a semi-join reduction: it can
/// ([`reducible`]) and its collected side [`narrows_keys`].
fn reduced(join: &HashJoinExec) -> bool {
    reducible(join) && narrows_keys(join.left()).unwrap_or(false)
}

/// Whether [`reduce_collected_join`] can run `join`.
fn reducible(join: &HashJoinExec) -> bool {
    join.partition_mode() == &PartitionMode::CollectLeft
        && emits_left_last(join.join_type())
        && join.join_type() != &JoinType::Full
        && !join.null_aware
}

/// Whether `node` is a join that reads every partition of its left side into one
/// table shared by all its partitions.
fn collects_left(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.downcast_ref::<CrossJoinExec>().is_some()
        || node.downcast_ref::<NestedLoopJoinExec>().is_some()
        || node
            .downcast_ref::<HashJoinExec>()
            .is_some_and(|j| j.partition_mode() == &PartitionMode::CollectLeft)
}

/// Whether every node of `plan` travels and every repartition can be cut.
fn can_cut(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut ok = !finishes_collected_side(plan);
    let _ = plan.apply(|node| {
        if let Some(r) = node.downcast_ref::<RepartitionExec>() {
            ok &= !r.preserve_order()
                && matches!(
                    r.partitioning(),
                    Partitioning::Hash(..) | Partitioning::RoundRobinBatch(_)
                );
        }
        Ok(if ok {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    ok && encode(plan).is_ok()
}

/// Whether `plan` has a join that collects its left side into one partition and
/// emits left rows only when every partition of its right side is done (an outer,
/// semi, anti or mark join on the left), other than those that run as a semi-join
/// reduction ([`reduced`]): its partitions are not independent, and a stage's task
/// runs one of them.
pub(crate) fn finishes_collected_side(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        if let Some(j) = node.downcast_ref::<HashJoinExec>() {
            found |= j.partition_mode() == &PartitionMode::CollectLeft
                && emits_left_last(j.join_type())
                && !reduced(j);
        }
        if let Some(j) = node.downcast_ref::<NestedLoopJoinExec>() {
            found |= emits_left_last(j.join_type());
        }
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// `plan` with each join that collects its left side and emits left rows last (see
/// [`finishes_collected_side`]), and that does not run as a semi-join reduction,
/// turned into a partitioned join: both sides hash-partitioned on the join keys into as
/// many partitions as its right side has, so that each partition is a task of its own.
/// A join runs as a reduction ([`reduce_collected_join`]) when it can and its collected
/// side [`narrows_keys`]. Other joins keep their mode: a small side collected and read
/// whole by every task of an inner join stays a broadcast. A null-aware anti join
/// (`NOT IN`) needs every right row in one place and is kept.
pub(crate) fn partition_collected_joins(
    plan: Arc<dyn ExecutionPlan>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(join) = node.downcast_ref::<HashJoinExec>() else {
            return Ok(Transformed::no(node));
        };
        if join.partition_mode() != &PartitionMode::CollectLeft
            || !emits_left_last(join.join_type())
            || join.null_aware
            || reduced(join)
        {
            return Ok(Transformed::no(node));
        }
        // The collected side's own partitions, not their merge (unless the merge also
        // limits them: `LIMIT` pushed into it).
        let left = match join.left().downcast_ref::<CoalescePartitionsExec>() {
            Some(merge) if merge.fetch().is_none() => Arc::clone(merge.input()),
            _ => Arc::clone(join.left()),
        };
        let partitioned = partitioned_join(join, left, Arc::clone(join.right()), Ok)?;
        Ok(Transformed::yes(partitioned))
    })
    .data()
}

/// Whether a join of this type emits rows of its left side once its right side is
/// done (unmatched ones, or the matched ones of a semi join).
fn emits_left_last(join_type: &JoinType) -> bool {
    matches!(
        join_type,
        JoinType::Left
            | JoinType::Full
            | JoinType::LeftSemi
            | JoinType::LeftAnti
            | JoinType::LeftMark
    )
}

/// What a stage's tasks make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum StageKind {
    /// The stage is a repartition: each task splits its rows into `partitions`
    /// batches, one per output partition.
    Exchange { partitions: usize },
    /// Each task's rows are one partition of the stage's output.
    Gather,
}

/// A stage: a subtree of the plan and the tasks that run it on the nodes.
struct Stage {
    id: usize,
    kind: StageKind,
    /// For an exchange, the repartition; for a gather, the subtree whose partitions
    /// are its tasks.
    plan: Arc<dyn ExecutionPlan>,
    /// Tasks: the partitions of the subtree each task runs one of.
    tasks: usize,
    /// The stages this one reads (by id).
    inputs: HashMap<usize, Arc<Stage>>,
    cluster: Cluster,
    /// The query's settings, carried by its tasks.
    settings: Arc<SessionSettings>,
    /// The tasks' outputs.
    outputs: Mutex<Outputs>,
    /// Joins above whose keys its scans filter by, filled before its tasks go.
    keys_filters: Mutex<Vec<KeysFilter>>,
}

impl fmt::Debug for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("tasks", &self.tasks)
            .finish()
    }
}

impl Stage {
    fn new(
        id: usize,
        kind: StageKind,
        plan: Arc<dyn ExecutionPlan>,
        cluster: Cluster,
        settings: Arc<SessionSettings>,
    ) -> DfResult<Arc<Self>> {
        let tasks = task_root(&plan, kind)
            .output_partitioning()
            .partition_count();
        let mut inputs = HashMap::new();
        plan.apply(|node| {
            if let Some(s) = node.downcast_ref::<ClusterStageExec>() {
                if let Source::Cluster(stage) = &s.source {
                    inputs.insert(stage.id, Arc::clone(stage));
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(Arc::new(Self {
            id,
            kind,
            plan,
            tasks,
            inputs,
            cluster,
            settings,
            outputs: Mutex::new(Outputs::NotSubmitted),
            keys_filters: Mutex::new(Vec::new()),
        }))
    }

    /// Whether this stage, or one it reads, waits for a join's keys.
    fn waits_for_keys(&self) -> bool {
        !self.keys_filters.lock().expect("stage lock").is_empty()
            || self.inputs.values().any(|s| s.waits_for_keys())
    }

    /// Its tasks' outputs: submits them (and those of the stages below) the first
    /// time. Tasks wait on the head for their inputs; nothing here waits for them.
    fn outputs(&self) -> Result<Arc<Vec<ObjectRef>>> {
        let mut outputs = self.outputs.lock().expect("stage lock");
        match &*outputs {
            Outputs::Submitted { outputs, .. } => return Ok(Arc::clone(outputs)),
            Outputs::Released => {
                return Err(VolleyError::execution(format!(
                    "stage {}: its outputs were freed (the query ended or failed)",
                    self.id
                )))
            }
            Outputs::NotSubmitted => {}
        }
        // Stages that wait for a join's keys go last: the others run meanwhile.
        let mut order: Vec<&Arc<Stage>> = self.inputs.values().collect();
        order.sort_by_key(|s| (s.waits_for_keys(), s.id));
        let inputs: HashMap<usize, (StageKind, Arc<Vec<ObjectRef>>)> = order
            .into_iter()
            .map(|s| Ok((s.id, (s.kind, s.outputs()?))))
            .collect::<Result<_>>()?;
        let mut filled = HashSet::new();
        for f in self.keys_filters.lock().expect("stage lock").iter() {
            let set = f
                .fill(&self.cluster)
                .with_context(|| format!("stage {}: its join keys filter", self.id))?;
            if set {
                filled.extend(f.filter.expression_id());
            }
        }
        let plan = &stage_filters(&self.plan, &filled, true)
            .with_context(|| format!("stage {}: its join keys filter", self.id))?;
        // Each exchange read names its stage's outputs once, as a group: a task reading
        // a partition of it passes one argument, not one per upstream task (the head
        // holds O(tasks) names, not O(upstream x downstream)). Kept while this stage's
        // outputs are (a lost output is rebuilt from the same inputs).
        let mut groups: HashMap<usize, ObjectGroup> = HashMap::new();
        for (stage, (kind, objects)) in &inputs {
            if matches!(kind, StageKind::Exchange { .. }) {
                let refs: Vec<&ObjectRef> = objects.iter().collect();
                groups.insert(*stage, self.cluster.object_group(&refs)?);
            }
        }
        let root = task_root(plan, self.kind);
        let made = (0..self.tasks)
            .map(|p| {
                let mut needs = Reads::default();
                partitions_read(root, &[p], &mut needs);
                let mut reads = Vec::new();
                let mut parts: Vec<TaskInput<'_>> = Vec::new();
                for (stage, partitions) in needs.stages {
                    let (kind, objects) = inputs.get(&stage).ok_or_else(|| {
                        VolleyError::internal(format!("stage {} reads stage {stage}", self.id))
                    })?;
                    for q in partitions {
                        // The objects the worker gets for this read (a group's each).
                        let count = match kind {
                            StageKind::Exchange { .. } => {
                                let g = groups.get(&stage).ok_or_else(|| {
                                    VolleyError::internal(format!(
                                        "stage {} has no group of stage {stage}",
                                        self.id
                                    ))
                                })?;
                                parts.push(TaskInput::Group(g, Some(q as u32)));
                                g.len()
                            }
                            StageKind::Gather => {
                                parts.push(TaskInput::Object(&objects[q], None));
                                1
                            }
                        };
                        reads.push(StageRead {
                            stage,
                            partition: q,
                            inputs: count,
                        });
                    }
                }
                let plan = task_plan(plan, &needs.scans)
                    .map_err(VolleyError::from)
                    .and_then(|plan| encode(&plan))
                    .with_context(|| format!("serializing stage {} task {p}", self.id))?;
                let label = format!("stage {} task {p}", self.id);
                let task = EncodedTask::new(Box::new(QueryStageTask {
                    label: label.clone(),
                    plan,
                    kind: self.kind,
                    partition: p,
                    reads,
                    settings: SessionSettings::clone(&self.settings),
                }))?;
                let options = TaskOptions::default()
                    .resources(Resources::cpus(1.0))
                    .name(format!("query {label}"));
                self.cluster.submit_selected(&task, &parts, &options)
            })
            .collect::<Result<Vec<_>>>()?;
        let made = Arc::new(made);
        *outputs = Outputs::Submitted {
            outputs: Arc::clone(&made),
            _groups: groups.into_values().collect(),
        };
        Ok(made)
    }

    /// Frees the outputs of this stage and of those below it; with `cancel` (the query
    /// stopped early or failed: nothing more will be read), first stops the tasks
    /// that have not made theirs, instead of leaving them to run for no one.
    fn release(&self, cancel: bool) {
        let outputs = std::mem::replace(
            &mut *self.outputs.lock().expect("stage lock"),
            Outputs::Released,
        );
        if let (true, Outputs::Submitted { outputs, .. }) = (cancel, &outputs) {
            let refs: Vec<&ObjectRef> = outputs.iter().collect();
            if let Err(e) = self.cluster.cancel(&refs) {
                tracing::warn!("stage {}: cannot stop its tasks: {e}", self.id);
            }
        }
        drop(outputs);
        for s in self.inputs.values() {
            s.release(cancel);
        }
    }
}

/// Where a stage's outputs are.
enum Outputs {
    NotSubmitted,
    Submitted {
        outputs: Arc<Vec<ObjectRef>>,
        /// The groups of its inputs' outputs its tasks read: held (not read) as long
        /// as its outputs are, so that a lost output can be made again.
        _groups: Vec<ObjectGroup>,
    },
    /// Freed: the query read them all, stopped or failed; never submitted again.
    Released,
}

/// The node whose partitions a stage's tasks run: an exchange's input, or the stage.
fn task_root(plan: &Arc<dyn ExecutionPlan>, kind: StageKind) -> &Arc<dyn ExecutionPlan> {
    match kind {
        StageKind::Exchange { .. } => plan.children()[0],
        StageKind::Gather => plan,
    }
}

/// What a task of a stage reads: partitions of the stages below, and of its file scans
/// (by the scan node's address).
#[derive(Debug, Default)]
struct Reads {
    stages: BTreeMap<usize, BTreeSet<usize>>,
    scans: HashMap<usize, BTreeSet<usize>>,
}

/// An identity for a node of a plan (while the plan lives).
fn node_key(node: &Arc<dyn ExecutionPlan>) -> usize {
    Arc::as_ptr(node) as *const () as usize
}

/// The partitions of each stage and scan read below `node` when it runs `partitions`.
fn partitions_read(node: &Arc<dyn ExecutionPlan>, partitions: &[usize], out: &mut Reads) {
    if let Some(s) = node.downcast_ref::<ClusterStageExec>() {
        out.stages.entry(s.stage_id).or_default().extend(partitions);
        return;
    }
    if node.downcast_ref::<DataSourceExec>().is_some() {
        out.scans
            .entry(node_key(node))
            .or_default()
            .extend(partitions);
        return;
    }
    let all = |c: &Arc<dyn ExecutionPlan>| -> Vec<usize> {
        (0..c.output_partitioning().partition_count()).collect()
    };
    let children = node.children();
    let collects_left = collects_left(node);
    if node.downcast_ref::<UnionExec>().is_some() {
        // Partition p of a union is partition p - offset of one of its inputs.
        let mut offset = 0;
        for c in children {
            let n = c.output_partitioning().partition_count();
            let mine: Vec<usize> = partitions
                .iter()
                .filter(|&&p| p >= offset && p < offset + n)
                .map(|p| p - offset)
                .collect();
            if !mine.is_empty() {
                partitions_read(c, &mine, out);
            }
            offset += n;
        }
        return;
    }
    let n = node.output_partitioning().partition_count();
    for (i, c) in children.into_iter().enumerate() {
        let same = c.output_partitioning().partition_count() == n;
        if (i == 0 && collects_left) || !same {
            partitions_read(c, &all(c), out);
        } else {
            partitions_read(c, partitions, out);
        }
    }
}

/// `plan` for one task: each file scan keeps only the file groups the task reads (the
/// others are left empty, so partitions keep their numbers), so that a task's message
/// grows with its own files, not with every file of the stage.
fn task_plan(
    plan: &Arc<dyn ExecutionPlan>,
    scans: &HashMap<usize, BTreeSet<usize>>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    Arc::clone(plan)
        .transform_up(|node| {
            let Some(read) = scans.get(&node_key(&node)) else {
                return Ok(Transformed::no(node));
            };
            let Some(config) = file_scan_config(node.as_ref()) else {
                return Ok(Transformed::no(node));
            };
            let groups = config
                .file_groups
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    if read.contains(&i) {
                        g.clone()
                    } else {
                        FileGroup::new(vec![])
                    }
                })
                .collect();
            let one = FileScanConfigBuilder::from(config.clone())
                .with_file_groups(groups)
                .build();
            Ok(Transformed::yes(
                DataSourceExec::from_data_source(one) as Arc<dyn ExecutionPlan>
            ))
        })
        .data()
}

/// What a stage's task reads: `inputs` of its objects make `partition` of `stage`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageRead {
    stage: usize,
    partition: usize,
    inputs: usize,
}

/// A task of a query stage: one partition of a subtree of a DataFusion plan.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueryStageTask {
    label: String,
    /// The stage's plan (`datafusion-proto`, the stages it reads as leaves).
    plan: Vec<u8>,
    kind: StageKind,
    partition: usize,
    /// How its inputs, in order, make the partitions of the stages it reads.
    reads: Vec<StageRead>,
    /// The query's settings, over the node's.
    settings: SessionSettings,
}

#[typetag::serde(name = "volley::QueryStageTask")]
impl RemoteTask for QueryStageTask {
    fn run(&self, _: &TaskContext, inputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
        let ctx = Context::global()?;
        let mut given: HashMap<usize, HashMap<usize, Vec<RecordBatch>>> = HashMap::new();
        let mut inputs = inputs.into_iter();
        for r in &self.reads {
            let batches: Vec<RecordBatch> = inputs.by_ref().take(r.inputs).flatten().collect();
            given
                .entry(r.stage)
                .or_default()
                .insert(r.partition, batches);
        }
        let codec = StageCodec {
            given: Mutex::new(given),
        };
        let task_ctx = self
            .settings
            .task_ctx(ctx.session_state())
            .with_context(|| format!("rebuilding {}", self.label))?;
        let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &self.plan, &task_ctx, &codec,
        )
        .with_context(|| format!("rebuilding {}", self.label))?;
        let plan = volley_connectors::name_file_errors(plan)
            .with_context(|| format!("rebuilding {}", self.label))?;
        // Its errors go back as `task query {label} failed on {node}: ...`: the worker
        // names the task.
        let label = &self.label;
        match self.kind {
            StageKind::Gather => run_partition(&ctx, &plan, self.partition, task_ctx),
            StageKind::Exchange { partitions } => {
                let r = plan.downcast_ref::<RepartitionExec>().ok_or_else(|| {
                    VolleyError::internal(format!("{label}: an exchange stage's root"))
                })?;
                let exprs = match r.partitioning() {
                    Partitioning::Hash(exprs, _) => Some(exprs.clone()),
                    _ => None,
                };
                let batches = run_partition(&ctx, r.input(), self.partition, task_ctx)?;
                route(&batches, exprs.as_deref(), partitions, self.partition)
                    .and_then(|routes| batches_per_partition(batches, &routes, partitions))
                    .context("splitting its rows into partitions")
            }
        }
    }
}

/// The batches of partition `p` of `plan`, run on the context's runtime (operators
/// spawn their work onto the runtime that executes them).
fn run_partition(
    ctx: &Context,
    plan: &Arc<dyn ExecutionPlan>,
    p: usize,
    task_ctx: Arc<DfTaskContext>,
) -> Result<Vec<RecordBatch>> {
    let run = async {
        let stream = plan.execute(p, task_ctx)?;
        datafusion::physical_plan::common::collect(stream).await
    };
    Ok(ctx.exec_context().block_on(run)?)
}

/// The output partition of each row of each batch: by the hash of `exprs`, or (no
/// expressions) round robin by batch, starting where the task's number says.
fn route(
    batches: &[RecordBatch],
    exprs: Option<&[Arc<dyn PhysicalExpr>]>,
    n: usize,
    task: usize,
) -> Result<Vec<Vec<usize>>> {
    let mut hashes = Vec::new();
    batches
        .iter()
        .enumerate()
        .map(|(i, b)| match exprs {
            Some(exprs) => {
                let cols = exprs
                    .iter()
                    .map(|e| Ok(e.evaluate(b)?.into_array(b.num_rows())?))
                    .collect::<Result<Vec<_>>>()?;
                volley_exec::hash_partitions(&cols, n, &mut hashes)
            }
            None => Ok(vec![(task + i) % n; b.num_rows()]),
        })
        .collect()
}

/// A read of a stage's output: on the driver, from the cluster's objects; in a
/// stage's task, from the batches the task was given.
enum Source {
    Cluster(Arc<Stage>),
    Given(HashMap<usize, Vec<RecordBatch>>),
}

/// The output of a stage, in the plan of the stage (or the driver) that reads it.
pub(crate) struct ClusterStageExec {
    stage_id: usize,
    source: Source,
    properties: Arc<PlanProperties>,
    /// Partitions this process has yet to read to the end (a gather on the driver:
    /// when none are left, the stages' objects are freed).
    unread: Arc<AtomicUsize>,
    /// Whether a partition was left before its end (or failed): then the stages'
    /// unfinished tasks are stopped when their objects are freed.
    stopped: Arc<AtomicBool>,
}

impl fmt::Debug for ClusterStageExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterStageExec({})", self.stage_id)
    }
}

impl ClusterStageExec {
    fn on_driver(stage: Arc<Stage>, properties: Arc<PlanProperties>) -> Arc<dyn ExecutionPlan> {
        let n = properties.partitioning.partition_count();
        Arc::new(Self {
            stage_id: stage.id,
            source: Source::Cluster(stage),
            properties,
            unread: Arc::new(AtomicUsize::new(n)),
            stopped: Arc::default(),
        })
    }

    fn given(
        stage_id: usize,
        schema: SchemaRef,
        partitions: usize,
        batches: HashMap<usize, Vec<RecordBatch>>,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Self {
            stage_id,
            source: Source::Given(batches),
            properties: Arc::new(properties),
            unread: Arc::new(AtomicUsize::new(partitions)),
            stopped: Arc::default(),
        }
    }

    /// Shows the stages below a plan, each under a heading (for `explain`).
    pub(crate) fn describe_stages(plan: &Arc<dyn ExecutionPlan>) -> String {
        let mut stages = BTreeMap::new();
        stages_below(plan, &mut stages);
        let mut out = String::new();
        for (id, s) in stages.iter().rev() {
            let what = match s.kind {
                StageKind::Exchange { partitions } => {
                    format!("{} map tasks into {partitions} partitions", s.tasks)
                }
                StageKind::Gather => format!("{} tasks", s.tasks),
            };
            // As its tasks will run it: the filters it waits for still to be filled.
            let waits: BTreeSet<usize> = s
                .keys_filters
                .lock()
                .expect("stage lock")
                .iter()
                .map(|f| f.build.id)
                .collect();
            let ids: HashSet<u64> = s
                .keys_filters
                .lock()
                .expect("stage lock")
                .iter()
                .filter_map(|f| f.filter.expression_id())
                .collect();
            let keys = match waits.is_empty() {
                true => String::new(),
                false => format!(
                    "; its scans filtered by the keys of stage {}",
                    waits
                        .iter()
                        .map(|w| w.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            out.push_str(&format!(
                "Stage {id} on the cluster's nodes ({what}{keys}):\n"
            ));
            let plan = stage_filters(&s.plan, &ids, false).unwrap_or_else(|_| Arc::clone(&s.plan));
            let text = datafusion::physical_plan::displayable(plan.as_ref())
                .indent(true)
                .to_string();
            for line in text.lines() {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl DisplayAs for ClusterStageExec {
    fn fmt_as(&self, _: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let n = self.properties.partitioning.partition_count();
        write!(
            f,
            "ClusterStageExec: stage {}, {n} partitions",
            self.stage_id
        )
    }
}

/// Rows of a gathered partition read at a time.
const READ_ROWS: u64 = 64 * 1024;

/// How long one wait for a stage's task lasts before waiting again.
const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ExecutionPlan for ClusterStageExec {
    fn name(&self) -> &str {
        "ClusterStageExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "a cluster stage's output has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<DfTaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let schema = self.schema();
        match &self.source {
            Source::Given(parts) => {
                let batches = parts.get(&partition).cloned().ok_or_else(|| {
                    DataFusionError::Internal(format!(
                        "partition {partition} of stage {} was not given to this task",
                        self.stage_id
                    ))
                })?;
                Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
            }
            Source::Cluster(stage) => {
                if stage.kind != StageKind::Gather {
                    return Err(DataFusionError::Internal(format!(
                        "stage {} is an exchange, read only by stages",
                        stage.id
                    )));
                }
                let outputs = stage.outputs()?;
                let object = outputs.get(partition).cloned().ok_or_else(|| {
                    DataFusionError::Internal(format!(
                        "stage {} has no partition {partition}",
                        stage.id
                    ))
                })?;
                let cluster = stage.cluster.clone();
                let label = format!("stage {} task {partition}", stage.id);
                let (unread, stage) = (Arc::clone(&self.unread), Arc::clone(stage));
                let stopped = Arc::clone(&self.stopped);
                let stopped_here = Arc::clone(&self.stopped);
                // Whether the partition was read to its end.
                let read = move |tx: &Handover| -> Result<bool> {
                    // A slice at a time: this process holds a few slices per
                    // partition, however big the partition is.
                    let total = loop {
                        if tx.is_closed() {
                            return Ok(false);
                        }
                        let state = cluster
                            .wait_objects(std::slice::from_ref(&object), 1, WAIT)
                            .map_err(|e| e.context(label.clone()))?
                            .pop();
                        match state {
                            Some(ObjectState::Ready(meta)) => break meta.rows,
                            // This query stopped its stages (another partition
                            // failed, or a limit was reached): that one says why.
                            Some(ObjectState::Failed(e))
                                if e.is_cancelled() && stopped_here.load(Ordering::SeqCst) =>
                            {
                                return Ok(false)
                            }
                            // The node that ran it named the task already (a
                            // cancellation asked by no one fails the run: see the
                            // executor's `task_error`).
                            Some(ObjectState::Failed(e)) => {
                                return Err(name_task_error(e, &format!("task query {label}")))
                            }
                            _ => {}
                        }
                    };
                    let mut offset = 0;
                    while offset < total {
                        let rows = READ_ROWS.min(total - offset);
                        let batches = cluster
                            .get_rows(&object, offset, rows)
                            .map_err(|e| e.context(label.clone()))?;
                        for b in batches {
                            if !tx.send(b) {
                                // The consumer went away.
                                return Ok(false);
                            }
                        }
                        offset += rows;
                    }
                    Ok(true)
                };
                // Cluster calls block: on a thread of their own, handing batches over.
                thread_stream("volley-stage-read", schema, move |tx| {
                    let read = read(tx);
                    if !matches!(read, Ok(true)) {
                        stopped.store(true, Ordering::SeqCst);
                    }
                    // The last partition read to its end (or left by its consumer)
                    // frees every stage's objects, stopping the tasks still running if
                    // any partition was left unread (a `LIMIT` reached); an error (the
                    // query fails: nothing more will be read) frees them at once.
                    if read.is_err() || unread.fetch_sub(1, Ordering::SeqCst) == 1 {
                        stage.release(stopped.load(Ordering::SeqCst));
                    }
                    read.map(|_| ())
                })
            }
        }
    }
}

/// `datafusion-proto`'s codec plus the outputs of stages: as their id, schema and
/// partition count; rebuilt with the batches a task was given.
#[derive(Debug, Default)]
struct StageCodec {
    given: Mutex<HashMap<usize, HashMap<usize, Vec<RecordBatch>>>>,
}

#[derive(Serialize, Deserialize)]
struct EncodedStageRead {
    stage: usize,
    partitions: usize,
    /// An IPC stream without batches.
    schema: Vec<u8>,
}

impl PhysicalExtensionCodec for StageCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &DfTaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let Some(rest) = buf.strip_prefix(STAGE_READ_TAG) else {
            return DefaultPhysicalExtensionCodec {}.try_decode(buf, inputs, ctx, proto_converter);
        };
        let read: EncodedStageRead = serde_json::from_slice(rest)
            .map_err(|e| DataFusionError::Internal(format!("a stage read: {e}")))?;
        let (schema, _) = from_bytes(&read.schema)?;
        let batches = self
            .given
            .lock()
            .expect("codec lock")
            .remove(&read.stage)
            .unwrap_or_default();
        Ok(Arc::new(ClusterStageExec::given(
            read.stage,
            schema,
            read.partitions,
            batches,
        )))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<()> {
        let Some(s) = node.downcast_ref::<ClusterStageExec>() else {
            return DefaultPhysicalExtensionCodec {}.try_encode(node, buf, proto_converter);
        };
        let read = EncodedStageRead {
            stage: s.stage_id,
            partitions: s.properties.partitioning.partition_count(),
            schema: schema_bytes(&s.schema())?,
        };
        buf.extend_from_slice(STAGE_READ_TAG);
        serde_json::to_writer(buf, &read)
            .map_err(|e| DataFusionError::Internal(format!("a stage read: {e}")))
    }

    fn try_decode_expr(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn PhysicalExpr>],
        ctx: &PhysicalExprDecodeCtx<'_>,
    ) -> DfResult<Arc<dyn PhysicalExpr>> {
        match buf {
            CONJUNCTION_TAG => Ok(Arc::new(Conjunction::new(inputs.to_vec())?)),
            _ if buf.starts_with(DECIMAL_ARITH_TAG) => {
                let op = std::str::from_utf8(&buf[DECIMAL_ARITH_TAG.len()..])
                    .ok()
                    .and_then(DecimalOp::from_name);
                match (op, inputs) {
                    (Some(op), [l, r]) => Ok(Arc::new(DecimalArith::new(
                        op,
                        Arc::clone(l),
                        Arc::clone(r),
                    ))),
                    _ => Err(DataFusionError::Internal(format!(
                        "a decimal operation {:?} with {} inputs",
                        String::from_utf8_lossy(buf),
                        inputs.len()
                    ))),
                }
            }
            _ if buf.starts_with(VIEW_STRING_IN_TAG) => {
                let encoded: Option<EncodedViewStringIn> =
                    serde_json::from_slice(&buf[VIEW_STRING_IN_TAG.len()..]).ok();
                match (encoded, inputs) {
                    (Some(e), [input]) => Ok(Arc::new(ViewStringIn::new(
                        Arc::clone(input),
                        e.constants,
                        e.negated,
                    ))),
                    _ => Err(DataFusionError::Internal(format!(
                        "a view string comparison {:?} with {} inputs",
                        String::from_utf8_lossy(buf),
                        inputs.len()
                    ))),
                }
            }
            SAMPLED_FILTER_TAG | QUERY_CONDITION_TAG => match inputs {
                // With a sample of its own where it is decoded (at `MAX_PASSING`: the
                // looser share of a scan grouped before its join is not sent).
                [inner] if buf == SAMPLED_FILTER_TAG => Ok(Arc::new(ScanCondition::join_keys(
                    Arc::clone(inner),
                    Arc::new(Sample::new(MAX_PASSING)),
                ))),
                [inner] => Ok(Arc::new(ScanCondition::query(
                    Arc::clone(inner),
                    Vec::new(),
                ))),
                _ => Err(DataFusionError::Internal(format!(
                    "a scan condition with {} inputs",
                    inputs.len()
                ))),
            },
            _ => DefaultPhysicalExtensionCodec {}.try_decode_expr(buf, inputs, ctx),
        }
    }

    fn try_encode_expr(
        &self,
        node: &Arc<dyn PhysicalExpr>,
        buf: &mut Vec<u8>,
        ctx: &PhysicalExprEncodeCtx<'_>,
    ) -> DfResult<()> {
        // Their conditions travel as the node's inputs, in their order.
        if node.downcast_ref::<Conjunction>().is_some() {
            buf.extend_from_slice(CONJUNCTION_TAG);
            return Ok(());
        }
        if let Some(d) = node.downcast_ref::<DecimalArith>() {
            buf.extend_from_slice(DECIMAL_ARITH_TAG);
            buf.extend_from_slice(d.op().name().as_bytes());
            return Ok(());
        }
        if let Some(v) = node.downcast_ref::<ViewStringIn>() {
            buf.extend_from_slice(VIEW_STRING_IN_TAG);
            let encoded = EncodedViewStringIn {
                constants: v.constants().to_vec(),
                negated: v.negated(),
            };
            return serde_json::to_writer(buf, &encoded)
                .map_err(|e| DataFusionError::Internal(format!("a view string comparison: {e}")));
        }
        if let Some(c) = node.downcast_ref::<ScanCondition>() {
            buf.extend_from_slice(if c.is_join_keys() {
                SAMPLED_FILTER_TAG
            } else {
                QUERY_CONDITION_TAG
            });
            return Ok(());
        }
        DefaultPhysicalExtensionCodec {}.try_encode_expr(node, buf, ctx)
    }
}

/// An encoded [`Conjunction`].
const CONJUNCTION_TAG: &[u8] = b"volley-conjunction";

/// What an encoded [`DecimalArith`] begins with (its operator's name follows; its
/// operands travel as the node's inputs).
const DECIMAL_ARITH_TAG: &[u8] = b"volley-decimal-arith:";

/// What an encoded [`ViewStringIn`] begins with (an [`EncodedViewStringIn`] as JSON
/// follows; its input travels as the node's input).
const VIEW_STRING_IN_TAG: &[u8] = b"volley-view-string-in:";

/// The constants of a [`ViewStringIn`], as it travels in a stage's plan.
#[derive(Serialize, Deserialize)]
struct EncodedViewStringIn {
    constants: Vec<String>,
    negated: bool,
}

/// An encoded [`ScanCondition`] of a join's keys (with a sample of its own where it is
/// decoded).
const SAMPLED_FILTER_TAG: &[u8] = b"volley-sampled-filter";

/// An encoded [`ScanCondition`] of the query's own (following no sample where it is
/// decoded: it passes every row while decoding).
const QUERY_CONDITION_TAG: &[u8] = b"volley-query-condition";

/// What an encoded stage read begins with.
const STAGE_READ_TAG: &[u8] = b"volley-stage-read:";

/// `plan` as `datafusion-proto` bytes.
fn encode(plan: &Arc<dyn ExecutionPlan>) -> Result<Vec<u8>> {
    let codec = StageCodec::default();
    Ok(
        datafusion_proto::bytes::physical_plan_to_bytes_with_proto_converter(
            Arc::clone(plan),
            &codec,
            &StageConverter,
        )?
        .to_vec(),
    )
}

/// `datafusion-proto`'s conversion, except that a scalar subquery's value known in
/// this process travels as a literal: a stage's task has no subquery to run (the
/// subquery ran first, on its own stages; see [`cut_stages`]). One still to run
/// travels as the subquery's reference.
#[derive(Debug)]
struct StageConverter;

impl PhysicalProtoConverterExtension for StageConverter {
    fn proto_to_execution_plan(
        &self,
        proto: &datafusion_proto::protobuf::PhysicalPlanNode,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        proto.try_into_physical_plan_with_context(ctx, self)
    }

    fn execution_plan_to_proto(
        &self,
        plan: &Arc<dyn ExecutionPlan>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> DfResult<datafusion_proto::protobuf::PhysicalPlanNode> {
        datafusion_proto::protobuf::PhysicalPlanNode::try_from_physical_plan_with_converter(
            Arc::clone(plan),
            codec,
            self,
        )
    }

    fn proto_to_physical_expr(
        &self,
        proto: &datafusion_proto::protobuf::PhysicalExprNode,
        input_schema: &arrow::datatypes::Schema,
        ctx: &PhysicalPlanDecodeContext<'_>,
    ) -> DfResult<Arc<dyn PhysicalExpr>> {
        parse_physical_expr_with_converter(proto, input_schema, ctx, self)
    }

    fn physical_expr_to_proto(
        &self,
        expr: &Arc<dyn PhysicalExpr>,
        codec: &dyn PhysicalExtensionCodec,
    ) -> DfResult<datafusion_proto::protobuf::PhysicalExprNode> {
        if expr.downcast_ref::<ScalarSubqueryExpr>().is_some() {
            // Evaluated before its subquery ran, it fails: then it travels as it is.
            let empty = RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty()));
            if let Ok(ColumnarValue::Scalar(value)) = expr.evaluate(&empty) {
                let literal = Arc::new(Literal::new(value)) as Arc<dyn PhysicalExpr>;
                return serialize_physical_expr_with_converter(&literal, codec, self);
            }
        }
        serialize_physical_expr_with_converter(expr, codec, self)
    }
}

/// The bytes of the files a plan scans (each scan counted: a file read twice counts
/// twice), by the byte ranges its file groups read.
pub(crate) fn scanned_bytes(plan: &Arc<dyn ExecutionPlan>) -> u64 {
    let mut bytes = 0;
    let _ = plan.apply(|node| {
        if let Some(scan) = file_scan_config(node.as_ref()) {
            for file in scan.file_groups.iter().flat_map(|g| g.files()) {
                bytes += match &file.range {
                    Some(r) => u64::try_from(r.end - r.start).unwrap_or(0),
                    None => file.object_meta.size,
                };
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    bytes
}

/// Whether a plan scans files (only such plans are worth cutting into stages).
pub(crate) fn scans_files(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|node| {
        found |= file_scan_config(node.as_ref()).is_some();
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

#[cfg(test)]
mod tests {
    //! The parts of cutting a plan that need no cluster: which partitions a task reads,
    //! the plan a task carries, and a stage read's way through `datafusion-proto`.
    use super::*;
    use arrow::array::Int64Array;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::prelude::{SessionConfig, SessionContext};

    /// `big` (4 files of 1,000 rows, `k` 0..4000) and `small` (one file, `k` 0..10).
    fn context(dir: &std::path::Path) -> SessionContext {
        context_with(dir, false)
    }

    /// [`context`], planning joins' dynamic filters where `join_filters` (as on a
    /// cluster, see `sql.rs`; the others never).
    fn context_with(dir: &std::path::Path, join_filters: bool) -> SessionContext {
        let write = |path: std::path::PathBuf, from: i64, to: i64| {
            let k = Int64Array::from_iter_values(from..to);
            let batch = RecordBatch::try_from_iter([("k", Arc::new(k) as _)]).unwrap();
            let mut w =
                ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None)
                    .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        };
        for f in 0..4 {
            std::fs::create_dir_all(dir.join("big")).unwrap();
            write(
                dir.join(format!("big/{f}.parquet")),
                f * 1000,
                f * 1000 + 1000,
            );
        }
        std::fs::create_dir_all(dir.join("small")).unwrap();
        write(dir.join("small/0.parquet"), 0, 10);
        let mut config = SessionConfig::new().with_target_partitions(4);
        config
            .options_mut()
            .optimizer
            .enable_round_robin_repartition = false;
        // As volley's sessions: a scan run twice (a collected side read by two stages,
        // run in place) reads its files twice.
        config
            .options_mut()
            .execution
            .enable_file_stream_work_stealing = false;
        let optimizer = &mut config.options_mut().optimizer;
        optimizer.enable_dynamic_filter_pushdown = false;
        optimizer.enable_join_dynamic_filter_pushdown = join_filters;
        optimizer.enable_topk_dynamic_filter_pushdown = false;
        optimizer.enable_aggregate_dynamic_filter_pushdown = false;
        let ctx = SessionContext::new_with_config(config);
        let rt = tokio::runtime::Runtime::new().unwrap();
        for t in ["big", "small"] {
            let path = format!("{}/{t}/", dir.display());
            rt.block_on(ctx.register_parquet(t, &path, Default::default()))
                .unwrap();
        }
        ctx
    }

    fn physical(ctx: &SessionContext, sql: &str) -> Arc<dyn ExecutionPlan> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            ctx.sql(sql)
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap()
        })
    }

    /// The batches `plan` gives, run to its end.
    fn run(ctx: &SessionContext, plan: Arc<dyn ExecutionPlan>) -> Vec<RecordBatch> {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(datafusion::physical_plan::collect(plan, ctx.task_ctx()))
            .unwrap()
    }

    /// How many rows `plan` gives.
    fn row_count(ctx: &SessionContext, plan: Arc<dyn ExecutionPlan>) -> usize {
        run(ctx, plan).iter().map(|b| b.num_rows()).sum()
    }

    /// The file scans of `plan`, by the folder they read.
    fn scans(plan: &Arc<dyn ExecutionPlan>) -> HashMap<String, Arc<dyn ExecutionPlan>> {
        let mut out = HashMap::new();
        let _ = plan.apply(|node| {
            if let Some(c) = file_scan_config(node.as_ref()) {
                let file = c
                    .file_groups
                    .iter()
                    .flat_map(|g| g.files())
                    .next()
                    .map(|f| f.object_meta.location.to_string())
                    .unwrap_or_default();
                let table = if file.contains("/big/") {
                    "big"
                } else {
                    "small"
                };
                out.insert(table.to_string(), Arc::clone(node));
            }
            Ok(TreeNodeRecursion::Continue)
        });
        out
    }

    /// A plan's scanned bytes are its files' bytes, each scan counted: the size of a
    /// query, before it runs, that chooses its partitions on a cluster.
    #[test]
    fn a_plan_scans_the_bytes_of_its_files_once_per_scan() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let size = |t: &str| -> u64 {
            std::fs::read_dir(dir.path().join(t))
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum()
        };
        let (big, small) = (size("big"), size("small"));
        let one = physical(&ctx, "SELECT sum(k) FROM big");
        assert_eq!(scanned_bytes(&one), big);
        let join = physical(
            &ctx,
            "SELECT sum(b.k) FROM big b JOIN small s ON b.k = s.k \
             UNION ALL SELECT sum(k) FROM small",
        );
        assert_eq!(scanned_bytes(&join), big + 2 * small);
    }

    #[test]
    fn a_task_reads_its_partition_of_the_probe_side_and_all_of_the_collected_side() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let plan = physical(&ctx, "SELECT big.k FROM small JOIN big ON small.k = big.k");
        let join = first_join(&plan);
        assert_eq!(
            join.downcast_ref::<HashJoinExec>()
                .unwrap()
                .partition_mode(),
            &PartitionMode::CollectLeft,
            "{}",
            datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
        );
        assert!(!finishes_collected_side(&plan), "an inner join");
        let tables = scans(&plan);
        let (big, small) = (&tables["big"], &tables["small"]);
        let mut reads = Reads::default();
        partitions_read(&join, &[2], &mut reads);
        assert_eq!(reads.scans[&node_key(big)], BTreeSet::from([2]));
        let small_groups = small.output_partitioning().partition_count();
        assert_eq!(
            reads.scans[&node_key(small)],
            (0..small_groups).collect::<BTreeSet<_>>(),
            "the build side whole"
        );

        // The task's plan keeps its own file groups only, and still has 4 partitions.
        let mine = task_plan(&plan, &reads.scans).unwrap();
        let kept = scans(&mine);
        let config = file_scan_config(kept["big"].as_ref()).unwrap();
        let sizes: Vec<usize> = config.file_groups.iter().map(|g| g.len()).collect();
        assert_eq!(sizes, vec![0, 0, 1, 0]);
        assert!(encode(&mine).unwrap().len() < encode(&plan).unwrap().len());
    }

    /// The hash join of `plan` and the dynamic filter DataFusion gave it.
    fn join_and_filter(
        plan: &Arc<dyn ExecutionPlan>,
    ) -> (Arc<dyn ExecutionPlan>, Arc<dyn PhysicalExpr>) {
        let join = first_join(plan);
        let filter = join
            .dynamic_expressions_produced()
            .pop()
            .expect("a dynamic filter");
        (join, filter)
    }

    /// The first hash join of `plan`.
    fn first_join(plan: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        let mut found = None;
        let _ = plan.apply(|node| {
            if node.downcast_ref::<HashJoinExec>().is_some() {
                found = Some(Arc::clone(node));
                return Ok(TreeNodeRecursion::Stop);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        found.expect("a hash join")
    }

    /// Rows the scan of `big` in `plan` gives when it runs partition `p` alone.
    fn big_rows(ctx: &SessionContext, plan: &Arc<dyn ExecutionPlan>, p: usize) -> usize {
        let rt = tokio::runtime::Runtime::new().unwrap();
        // As a task's plan: the scan's other file groups left empty (its partitions
        // would take them).
        let mut reads = Reads::default();
        partitions_read(plan, &[p], &mut reads);
        let plan = task_plan(plan, &reads.scans).unwrap();
        let scan = Arc::clone(&scans(&plan)["big"]);
        let batches = rt
            .block_on(async {
                let stream = scan.execute(p, ctx.task_ctx())?;
                datafusion::physical_plan::common::collect(stream).await
            })
            .unwrap();
        batches.iter().map(|b| b.num_rows()).sum()
    }

    /// A join's keys, filled from its build side's rows, travel in the scans of its
    /// probe side as a plain predicate that prunes by statistics; unfilled dynamic
    /// filters leave the stages' plans, with the joins' own.
    #[test]
    fn a_joins_keys_filter_the_scans_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context_with(dir.path(), true);
        let plan = physical(&ctx, "SELECT big.k FROM small JOIN big ON small.k = big.k");
        let shown = |p: &Arc<dyn ExecutionPlan>| {
            datafusion::physical_plan::displayable(p.as_ref())
                .indent(true)
                .to_string()
        };
        assert!(shown(&plan).contains("DynamicFilter"), "{}", shown(&plan));
        let (join, filter) = join_and_filter(&plan);
        let id = filter.expression_id().unwrap();

        // Not filled: no dynamic filter, in the scans or the join, and the same rows.
        // Shown before it is filled (`explain`), the filter stays.
        let waiting = stage_filters(&plan, &HashSet::from([id]), false).unwrap();
        assert!(
            shown(&waiting).contains("DynamicFilter"),
            "{}",
            shown(&waiting)
        );
        let bare = stage_filters(&plan, &HashSet::new(), true).unwrap();
        assert!(!shown(&bare).contains("DynamicFilter"), "{}", shown(&bare));
        assert!(first_join(&bare).dynamic_expressions_produced().is_empty());
        assert_eq!(row_count(&ctx, Arc::clone(&bare)), 10);
        assert_eq!(big_rows(&ctx, &bare, 2), 1000);

        // Filled from `small`'s rows (k 0..10): bounds and the keys themselves.
        let small = run(&ctx, physical(&ctx, "SELECT k FROM small"));
        let join = join.downcast_ref::<HashJoinExec>().unwrap();
        let build_keys: Vec<_> = join.on().iter().map(|(l, _)| Arc::clone(l)).collect();
        let right = join.right().schema();
        let types = vec![arrow::datatypes::DataType::Int64];
        let expr = keys_expression(&filter, &build_keys, &types, &right, &small)
            .unwrap()
            .expect("a filter");
        let text = format!("{expr}");
        assert!(
            text.contains(">= 0") && text.contains("<= 9") && text.contains("IN"),
            "{text}"
        );
        filter
            .downcast_ref::<DynamicFilterPhysicalExpr>()
            .unwrap()
            .update(expr)
            .unwrap();
        let filtered = stage_filters(&plan, &HashSet::from([id]), true).unwrap();
        assert!(
            !shown(&filtered).contains("DynamicFilter"),
            "{}",
            shown(&filtered)
        );
        // Through `datafusion-proto` as a task gets it.
        let bytes = encode(&filtered).unwrap();
        let decoded = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &bytes,
            &ctx.task_ctx(),
            &StageCodec::default(),
        )
        .unwrap();
        // `big`'s partition 2 holds k 2000..3000: its row group is skipped whole.
        assert_eq!(big_rows(&ctx, &decoded, 2), 0);
        assert_eq!(row_count(&ctx, decoded), 10);

        // A build side with no rows: the join outputs nothing, nor does the filter.
        let none = keys_expression(&filter, &build_keys, &types, &right, &[]).unwrap();
        assert_eq!(format!("{}", none.unwrap()), "false");
        // Keys of another type than the probe side's: no filter.
        let utf8 = vec![arrow::datatypes::DataType::Utf8];
        assert!(keys_expression(&filter, &build_keys, &utf8, &right, &small)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_left_join_that_collects_its_left_side_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let plan = physical(
            &ctx,
            "SELECT small.k, big.k FROM small LEFT JOIN big ON small.k = big.k",
        );
        let collect_left_outer = {
            let mut found = false;
            let _ = plan.apply(|node| {
                if let Some(j) = node.downcast_ref::<HashJoinExec>() {
                    found |= j.partition_mode() == &PartitionMode::CollectLeft
                        && j.join_type() == &JoinType::Left;
                }
                Ok(TreeNodeRecursion::Continue)
            });
            found
        };
        assert_eq!(finishes_collected_side(&plan), collect_left_outer);
        assert!(
            collect_left_outer,
            "{}",
            datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
        );
    }

    /// `plan` with its collected joins as a cluster runs them, each stage left in
    /// place (a gather as its plan, an exchange as its repartition): one plan that
    /// runs here.
    fn as_cut(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
        partition_collected_joins(plan)
            .unwrap()
            .transform_up(|node| {
                let mut in_place = |plan, _| Ok(plan);
                Ok(match reduce_collected_join(&node, &mut in_place)? {
                    Some(reduced) => Transformed::yes(reduced),
                    None => Transformed::no(node),
                })
            })
            .data()
            .unwrap()
    }

    #[test]
    fn a_collected_join_that_emits_left_rows_last_is_cut_and_gives_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut reductions = 0;
        let mut partitioned = 0;
        for join_filters in [false, true] {
            let ctx = context_with(dir.path(), join_filters);
            let rows = |plan: &Arc<dyn ExecutionPlan>| {
                let batches = rt
                    .block_on(datafusion::physical_plan::collect(
                        Arc::clone(plan),
                        ctx.task_ctx(),
                    ))
                    .unwrap();
                let mut lines: Vec<String> = arrow::util::pretty::pretty_format_batches(&batches)
                    .unwrap()
                    .to_string()
                    .lines()
                    .map(str::to_string)
                    .collect();
                lines.sort();
                lines
            };
            // `small` filtered (its keys narrowed: reduced), or whole (partitioned).
            for sql in [
                "SELECT small.k, big.k FROM small LEFT JOIN big ON small.k = big.k + 5",
                "SELECT s.k, big.k FROM (SELECT k FROM small WHERE k <> 3) s \
                 LEFT JOIN big ON s.k = big.k + 5",
                "SELECT s.k, big.k FROM (SELECT k FROM small WHERE k <> 3) s LEFT JOIN big \
                 ON s.k = big.k % 100 AND big.k > s.k * 300",
                "SELECT small.k, big.k FROM small FULL JOIN big ON small.k = big.k + 5",
                "SELECT k FROM small WHERE k IN (SELECT k * 2 FROM big)",
                "SELECT k FROM small WHERE k <> 3 AND k IN (SELECT k * 2 FROM big)",
                // A limit DataFusion pushes into the join (each partition of `big`
                // holds a few keys, in runs of 400 rows).
                "SELECT k FROM small WHERE k <> 3 AND k IN (SELECT k / 400 FROM big) LIMIT 20",
                "SELECT k FROM small WHERE k <> 3 AND EXISTS \
                 (SELECT 1 FROM big WHERE big.k % 10 = small.k AND big.k <> small.k)",
                "SELECT k FROM small WHERE k <> 3 AND NOT EXISTS \
                 (SELECT 1 FROM big WHERE big.k = small.k * 500)",
                "SELECT k FROM small WHERE k <> 3 AND NOT EXISTS \
                 (SELECT 1 FROM big WHERE big.k % 10 = small.k AND big.k < 5)",
                "SELECT k FROM small WHERE k <> 3 AND (k > 7 OR EXISTS \
                 (SELECT 1 FROM big WHERE big.k = small.k * 500))",
                "SELECT small.k, big.k FROM small JOIN big ON small.k = big.k",
            ] {
                let plan = physical(&ctx, sql);
                let planned = datafusion::physical_plan::displayable(plan.as_ref())
                    .indent(true)
                    .to_string();
                let expected = rows(&plan);
                let collected = finishes_collected_side(&plan);
                let mut reducible_joins = 0;
                let _ = plan.apply(|node| {
                    if let Some(j) = node.downcast_ref::<HashJoinExec>() {
                        if reduced(j) {
                            reducible_joins += 1;
                        }
                    }
                    Ok(TreeNodeRecursion::Continue)
                });
                // Planned again: a plan's nodes run once.
                let cut = as_cut(physical(&ctx, sql));
                let shown = datafusion::physical_plan::displayable(cut.as_ref())
                    .indent(true)
                    .to_string();
                assert!(!finishes_collected_side(&cut), "{sql}:\n{shown}");
                if reducible_joins > 0 {
                    reductions += 1;
                    // The right rows that match the collected side, before the exchange.
                    assert_eq!(
                        shown
                            .matches("mode=CollectLeft, join_type=RightSemi")
                            .count(),
                        reducible_joins,
                        "{sql}:\n{shown}"
                    );
                    assert!(shown.contains("mode=Partitioned"), "{sql}:\n{shown}");
                } else if collected {
                    partitioned += 1;
                    assert!(shown.contains("mode=Partitioned"), "{sql}:\n{shown}");
                    assert!(can_cut(&cut), "{sql}:\n{shown}");
                } else {
                    // Nothing to change: an inner join keeps its collected (broadcast) side.
                    assert_eq!(shown, planned, "{sql}");
                }
                assert_eq!(
                    cut.output_partitioning().partition_count(),
                    plan.output_partitioning().partition_count(),
                    "{sql}"
                );
                assert_eq!(rows(&cut), expected, "{sql}:\n{shown}");
                assert!(expected.len() > 4, "{sql}: rows to compare");
            }
            // A limit pushed into the merge of the collected side stays (which 7 rows
            // it keeps is not fixed: only their number is compared).
            let sql =
                "SELECT s.k FROM (SELECT k FROM big LIMIT 7) s WHERE s.k IN (SELECT k FROM big)";
            let cut = as_cut(physical(&ctx, sql));
            let shown = datafusion::physical_plan::displayable(cut.as_ref())
                .indent(true)
                .to_string();
            assert_eq!(rows(&cut).len(), 7 + 4, "{sql}:\n{shown}");
        }
        // Each query over the filtered `small` (8, with and without join filters) is
        // reduced; over the whole of it, the left, full and semi joins are partitioned.
        assert_eq!((reductions, partitioned), (16, 6));
    }

    #[test]
    fn a_scalar_subquerys_value_travels_as_a_literal_once_the_subquery_ran() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sql = "SELECT k FROM big WHERE k > (SELECT max(k) FROM small) * 399";
        let plan = physical(&ctx, sql);
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(true)
            .to_string();
        let subqueries = plan
            .downcast_ref::<ScalarSubqueryExec>()
            .unwrap_or_else(|| panic!("a scalar subquery at the top:\n{shown}"));
        assert!(can_cut(&plan), "{shown}");
        let main = Arc::clone(subqueries.input());
        let decode = |bytes: &[u8]| {
            datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
                bytes,
                &ctx.task_ctx(),
                &StageCodec::default(),
            )
        };
        // Before the subquery ran, the main plan alone cannot be rebuilt elsewhere.
        assert!(decode(&encode(&main).unwrap()).is_err(), "{shown}");
        let all = rt
            .block_on(datafusion::physical_plan::collect(
                Arc::clone(&plan),
                ctx.task_ctx(),
            ))
            .unwrap();
        let rows: usize = all.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 4000 - 9 * 399 - 1);
        // After, it carries the value (9) and gives the same rows on its own.
        let shipped = decode(&encode(&main).unwrap()).unwrap();
        let text = datafusion::physical_plan::displayable(shipped.as_ref())
            .indent(true)
            .to_string();
        assert!(!text.contains("scalar_subquery"), "{text}");
        let again = rt
            .block_on(datafusion::physical_plan::collect(shipped, ctx.task_ctx()))
            .unwrap();
        assert_eq!(again.iter().map(|b| b.num_rows()).sum::<usize>(), rows);
    }

    #[test]
    fn a_filters_conditions_travel_in_their_order_and_give_the_same_rows() {
        use datafusion::physical_optimizer::PhysicalOptimizerRule;
        use datafusion::physical_plan::filter::FilterExec;
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let sql = "SELECT k FROM big WHERE k % 7 = 3 AND k < 3000 AND k > 100";
        let plan = crate::conjunction::FilterConjunctions
            .optimize(physical(&ctx, sql), &Default::default())
            .unwrap();
        let predicate = |plan: &Arc<dyn ExecutionPlan>| {
            let mut found = None;
            let _ = plan.apply(|node| {
                if let Some(f) = node.downcast_ref::<FilterExec>() {
                    found = Some(Arc::clone(f.predicate()));
                }
                Ok(TreeNodeRecursion::Continue)
            });
            found.expect("a filter")
        };
        let shipped = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &encode(&plan).unwrap(),
            &ctx.task_ctx(),
            &StageCodec::default(),
        )
        .unwrap();
        let (sent, got) = (predicate(&plan), predicate(&shipped));
        assert!(got.downcast_ref::<Conjunction>().is_some(), "{got}");
        // The cheap comparisons first, the one that computes last.
        assert_eq!(got.to_string(), "k@0 < 3000 AND k@0 > 100 AND k@0 % 7 = 3");
        assert_eq!(sent.to_string(), got.to_string());
        let rows = |plan| row_count(&ctx, plan);
        let want = (101..3000).filter(|k| k % 7 == 3).count();
        assert_eq!(rows(plan), want);
        assert_eq!(rows(shipped), want);
    }

    #[test]
    fn decimal_arithmetic_travels_and_gives_the_same_values() {
        use datafusion::physical_optimizer::PhysicalOptimizerRule;
        use datafusion::physical_plan::aggregates::AggregateExec;
        use datafusion::physical_plan::projection::ProjectionExec;
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let sql =
            "SELECT sum(CAST(k AS DECIMAL(15, 2)) * (1 - CAST(k AS DECIMAL(15, 2)) / 10000)) \
                   AS s FROM big WHERE k < 3000";
        let plan = crate::decimal_arith::DecimalArithmetic
            .optimize(physical(&ctx, sql), &Default::default())
            .unwrap();
        let decimal_ops = |plan: &Arc<dyn ExecutionPlan>| {
            let text = datafusion::physical_plan::displayable(plan.as_ref())
                .indent(true)
                .to_string();
            let mut found = 0;
            let _ = plan.apply(|node| {
                let mut exprs = Vec::new();
                if let Some(p) = node.downcast_ref::<ProjectionExec>() {
                    exprs.extend(p.expr().iter().map(|e| Arc::clone(&e.expr)));
                }
                if let Some(a) = node.downcast_ref::<AggregateExec>() {
                    exprs.extend(a.aggr_expr().iter().flat_map(|f| f.expressions()));
                }
                for e in exprs {
                    let _ = e.apply(|x| {
                        found += x.downcast_ref::<DecimalArith>().is_some() as usize;
                        Ok(TreeNodeRecursion::Continue)
                    });
                }
                Ok(TreeNodeRecursion::Continue)
            });
            (found, text)
        };
        let shipped = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &encode(&plan).unwrap(),
            &ctx.task_ctx(),
            &StageCodec::default(),
        )
        .unwrap();
        let (sent, text) = decimal_ops(&plan);
        assert!(sent >= 1, "{text}");
        assert_eq!(decimal_ops(&shipped).0, sent);
        let value = |plan| {
            let batches = run(&ctx, plan);
            let b = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
            arrow::util::display::array_value_to_string(b.column(0), 0).unwrap()
        };
        let want = value(physical(&ctx, sql));
        assert_eq!(value(plan), want);
        assert_eq!(value(shipped), want);
    }

    #[test]
    fn view_string_comparisons_travel_and_give_the_same_rows() {
        use datafusion::physical_optimizer::PhysicalOptimizerRule;
        use datafusion::physical_plan::filter::FilterExec;
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let sql = "SELECT k FROM big \
                   WHERE arrow_cast(CAST(k % 7 AS VARCHAR), 'Utf8View') IN ('1', '3') \
                   AND arrow_cast(concat('a long prefix ', CAST(k AS VARCHAR)), 'Utf8View') \
                   <> 'a long prefix 15'";
        let plan = crate::view_compare::ViewComparisons
            .optimize(physical(&ctx, sql), &Default::default())
            .unwrap();
        let comparisons = |plan: &Arc<dyn ExecutionPlan>| {
            let mut found = Vec::new();
            let _ = plan.apply(|node| {
                if let Some(f) = node.downcast_ref::<FilterExec>() {
                    let _ = f.predicate().apply(|x| {
                        if x.downcast_ref::<ViewStringIn>().is_some() {
                            found.push(x.to_string());
                        }
                        Ok(TreeNodeRecursion::Continue)
                    });
                }
                Ok(TreeNodeRecursion::Continue)
            });
            found
        };
        let shipped = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &encode(&plan).unwrap(),
            &ctx.task_ctx(),
            &StageCodec::default(),
        )
        .unwrap();
        let sent = comparisons(&plan);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(comparisons(&shipped), sent);
        let rows = |plan| row_count(&ctx, plan);
        let want = (0..4000)
            .filter(|k| [1, 3].contains(&(k % 7)) && *k != 15)
            .count();
        assert_eq!(rows(physical(&ctx, sql)), want);
        assert_eq!(rows(plan), want);
        assert_eq!(rows(shipped), want);
    }

    #[test]
    fn a_stage_read_travels_as_its_id_and_schema_and_serves_what_the_task_was_given() {
        let batch =
            RecordBatch::try_from_iter([("k", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])
                .unwrap();
        let read: Arc<dyn ExecutionPlan> = Arc::new(ClusterStageExec::given(
            7,
            batch.schema(),
            4,
            HashMap::new(),
        ));
        let bytes = encode(&read).unwrap();
        let codec = StageCodec {
            given: Mutex::new(HashMap::from([(
                7,
                HashMap::from([(2, vec![batch.clone()])]),
            )])),
        };
        let task_ctx = Arc::new(DfTaskContext::default());
        let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            &bytes, &task_ctx, &codec,
        )
        .unwrap();
        assert_eq!(plan.output_partitioning().partition_count(), 4);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let got = rt
            .block_on(datafusion::physical_plan::common::collect(
                plan.execute(2, Arc::clone(&task_ctx)).unwrap(),
            ))
            .unwrap();
        assert_eq!(got, vec![batch]);
        let other = plan.execute(1, task_ctx).err().expect("not given");
        assert!(
            other.to_string().contains("partition 1 of stage 7"),
            "{other}"
        );
    }
}
