//! File scans of SQL and relational plans, on a cluster's nodes.
//!
//! DataFusion plans a query as it does locally; then every file scan in the plan is
//! replaced by a [`ClusterScanExec`]: each file split of each partition becomes a stage
//! task that reads it (projection and filters pushed in, filtering while decoding) on
//! a node, and this process streams the tasks' batches into the rest of the plan.
//! Operators after the scans (joins, aggregations, sorts) run here, as they do locally.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::scalar_subquery::ScalarSubqueryExpr;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{
    name_task_error, Cluster, EncodedTask, ObjectRef, Resources, TaskOptions,
};

use super::stage::{plan_bytes, StageInput, StageTask};
use super::SessionSettings;
use crate::handover::{thread_stream, Handover};

/// Replaces every file scan of `plan` by a scan on `cluster`'s nodes, its tasks with
/// the query's `settings` (a filter decoded there may call a function that reads one).
pub(crate) fn scans_on_cluster(
    plan: Arc<dyn ExecutionPlan>,
    cluster: &Cluster,
    settings: &Arc<SessionSettings>,
) -> DfResult<Arc<dyn ExecutionPlan>> {
    // Each node's task computes its own copy of what a query shares in one process.
    let plan = crate::shared_subplans::unshare(plan)?;
    plan.transform_up(|node| {
        let Some(exec) = node.downcast_ref::<DataSourceExec>() else {
            return Ok(Transformed::no(node));
        };
        let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else {
            return Ok(Transformed::no(node));
        };
        if reads_subquery_value(&node)? {
            // Its filter holds a scalar subquery's value, given to it in this process.
            return Ok(Transformed::no(node));
        }
        // The scan's filter is applied on the node, while decoding: the rows it drops
        // do not travel here (the plan's filter above it still applies).
        let (config, inner) = match crate::decode_filters::filtering_while_decoding(config) {
            Some(c) => (
                c.clone(),
                DataSourceExec::from_data_source(c) as Arc<dyn ExecutionPlan>,
            ),
            None => (config.clone(), Arc::clone(&node)),
        };
        let scan = ClusterScanExec {
            config,
            inner,
            cluster: cluster.clone(),
            settings: Arc::clone(settings),
        };
        Ok(Transformed::yes(Arc::new(scan) as Arc<dyn ExecutionPlan>))
    })
    .data()
}

/// Whether an expression of `node` is a scalar subquery's value.
fn reads_subquery_value(node: &Arc<dyn ExecutionPlan>) -> DfResult<bool> {
    let mut found = false;
    node.apply_expressions(&mut |e| {
        e.apply(|x| {
            found |= x.downcast_ref::<ScalarSubqueryExpr>().is_some();
            Ok(TreeNodeRecursion::Continue)
        })
    })?;
    Ok(found)
}

/// A file scan whose file splits are read by stage tasks on a cluster's nodes.
#[derive(Debug)]
pub(crate) struct ClusterScanExec {
    config: FileScanConfig,
    inner: Arc<dyn ExecutionPlan>,
    cluster: Cluster,
    settings: Arc<SessionSettings>,
}

impl DisplayAs for ClusterScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let files: usize = self.config.file_groups.iter().map(|g| g.len()).sum();
        write!(
            f,
            "ClusterScanExec: {files} file splits read on the cluster's nodes, "
        )?;
        self.inner.fmt_as(t, f)
    }
}

/// Cluster tasks each partition keeps in flight ahead of what it streams.
const AHEAD: usize = 2;

impl ClusterScanExec {
    /// The stage tasks of partition `partition`: one per file split.
    fn tasks(&self, partition: usize) -> Result<Vec<(String, EncodedTask)>> {
        let group = self.config.file_groups.get(partition).ok_or_else(|| {
            VolleyError::internal(format!("scan partition {partition} does not exist"))
        })?;
        group
            .iter()
            .map(|file| {
                let label = volley_connectors::file_label(&self.config.object_store_url, file);
                let one = FileScanConfigBuilder::from(self.config.clone())
                    .with_file_groups(vec![FileGroup::new(vec![file.clone()])])
                    .build();
                let plan: Arc<dyn ExecutionPlan> = DataSourceExec::from_data_source(one);
                let task = EncodedTask::new(Box::new(StageTask {
                    label: label.clone(),
                    input: StageInput::Read {
                        plan: plan_bytes(&plan, &label)?,
                        settings: SessionSettings::clone(&self.settings),
                    },
                    ops: vec![],
                    write: None,
                    map: None,
                    sample: None,
                }))?;
                Ok((label, task))
            })
            .collect()
    }
}

/// Runs `tasks` in order, `AHEAD` at a time, and sends their batches on.
fn run_tasks(cluster: &Cluster, tasks: Vec<(String, EncodedTask)>, tx: &Handover) -> Result<()> {
    let mut pending: VecDeque<(String, EncodedTask)> = tasks.into();
    let mut running: VecDeque<(String, ObjectRef)> = VecDeque::new();
    loop {
        while running.len() < AHEAD {
            let Some((label, task)) = pending.pop_front() else {
                break;
            };
            let options = TaskOptions::default()
                .resources(Resources::cpus(1.0))
                .name(label.clone());
            running.push_back((label, cluster.submit_encoded(&task, &[], &options)?));
        }
        let Some((label, object)) = running.pop_front() else {
            return Ok(());
        };
        let batches = cluster
            .get(&object)
            .map_err(|e| name_task_error(e, &format!("task {label}")))?;
        for b in batches {
            if !tx.send(b) {
                // The consumer went away.
                return Ok(());
            }
        }
    }
}

impl ExecutionPlan for ClusterScanExec {
    fn name(&self) -> &str {
        "ClusterScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.inner.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_plan::PhysicalExpr>,
        ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
        self.inner.apply_expressions(f)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal(
                "a cluster scan has no children".into(),
            ))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let tasks = self.tasks(partition)?;
        let cluster = self.cluster.clone();
        // Cluster calls block: on a thread of their own, handing batches over.
        let stream = thread_stream("volley-cluster-scan", self.inner.schema(), move |tx| {
            run_tasks(&cluster, tasks, tx)
        })?;
        // The scan's limit holds for the partition, as in one process: each file's task
        // keeps it too, so a partition of several files could give it several times.
        let Some(limit) = self.config.limit else {
            return Ok(stream);
        };
        use datafusion::physical_plan::limit::LimitStream;
        use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet};
        let metrics = BaselineMetrics::new(&ExecutionPlanMetricsSet::new(), partition);
        Ok(Box::pin(LimitStream::new(stream, 0, Some(limit), metrics)))
    }
}
