//! The source contract.

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionState;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use volley_common::Result;

/// What the optimizer pushed into a source.
#[derive(Debug, Clone, Default)]
pub struct ScanRequest {
    /// Columns to produce, as indices into [`DataSource::schema`]; `None` is all.
    pub projection: Option<Vec<usize>>,
    /// Filters (conjuncts) over the source's columns. A source may use them to skip
    /// data (row groups, partitions, rows); the executor still applies them after,
    /// so a source never has to be exact.
    pub filters: Vec<Expr>,
    /// Rows needed at most (after `filters`); a source may stop early.
    pub limit: Option<usize>,
}

/// One unit of reading: opens a stream of batches.
#[derive(Clone)]
pub struct ReadTask {
    /// What it reads, for errors and logs: a file path (with a row range if split).
    pub label: String,
    /// Estimated bytes it will read (for scheduling and progress).
    pub size_bytes: u64,
    opener: Arc<dyn Fn(Arc<TaskContext>) -> Result<SendableRecordBatchStream> + Send + Sync>,
    /// The task as a DataFusion plan of one partition, where it is one: such a task can
    /// be serialized and run by another process (a cluster worker).
    plan: Option<Arc<dyn datafusion::physical_plan::ExecutionPlan>>,
    /// The rows it yields, where planning knows them exactly.
    rows: Option<u64>,
    /// Its stream's errors name the file they came from (a file scan's, see
    /// [`name_file_errors`](crate::name_file_errors)): whoever runs it adds no label.
    names_its_errors: bool,
}

impl Debug for ReadTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReadTask({})", self.label)
    }
}

impl ReadTask {
    /// A task labelled `label` that opens its stream with `opener`.
    pub fn new(
        label: impl Into<String>,
        size_bytes: u64,
        opener: impl Fn(Arc<TaskContext>) -> Result<SendableRecordBatchStream> + Send + Sync + 'static,
    ) -> Self {
        Self {
            label: label.into(),
            size_bytes,
            opener: Arc::new(opener),
            plan: None,
            rows: None,
            names_its_errors: false,
        }
    }

    /// The task, whose stream's errors say where they came from already (a query's
    /// plan whose scans name their files): whoever runs it adds no label.
    pub fn naming_its_errors(mut self) -> Self {
        self.names_its_errors = true;
        self
    }

    /// Whether its stream's errors name their file already, so that the label would
    /// only repeat it.
    pub fn names_its_errors(&self) -> bool {
        self.names_its_errors
    }

    /// The task, known to yield exactly `rows` rows (a Parquet split read whole: its
    /// row groups' counts, from the file's footer).
    pub fn with_rows(mut self, rows: u64) -> Self {
        self.rows = Some(rows);
        self
    }

    /// The rows it yields, where planning knows them exactly: an exchange that places
    /// rows by their position in the input (a seeded shuffle) can then partition a
    /// split where it is read, knowing its first row. `None` where a filter, a limit
    /// or the format leaves the count open.
    pub fn rows(&self) -> Option<u64> {
        self.rows
    }

    /// A task that runs partition 0 of `plan` (a plan of one partition). Its file scans
    /// run wrapped by [`name_file_errors`](crate::name_file_errors): an error names its
    /// file, and a CSV or NDJSON parse error its line.
    pub fn from_plan(
        label: impl Into<String>,
        size_bytes: u64,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> Self {
        let label = label.into();
        let named = crate::name_file_errors(Arc::clone(&plan)).ok();
        let names_its_errors = named.as_ref().is_some_and(|p| reads_files(p));
        let runs = named.unwrap_or_else(|| Arc::clone(&plan));
        let context_label = label.clone();
        let mut task = Self::new(label, size_bytes, move |ctx| {
            use volley_common::ResultExt;
            runs.execute(0, ctx)
                .with_context(|| format!("reading {context_label}"))
        });
        task.plan = Some(plan);
        task.names_its_errors = names_its_errors;
        task
    }

    /// The DataFusion plan this task runs, if it is one (see [`from_plan`](Self::from_plan)).
    pub fn plan(&self) -> Option<&Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        self.plan.as_ref()
    }

    /// The task, opened in `ctx` whatever context its runner gives: a plan shipped
    /// from another process runs with the settings of the query it reads for.
    pub fn in_context(mut self, ctx: Arc<TaskContext>) -> Self {
        let opener = self.opener;
        self.opener = Arc::new(move |_| opener(Arc::clone(&ctx)));
        self
    }

    /// Opens the stream. Cheap: the reading happens as the stream is polled.
    pub fn open(&self, ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        (self.opener)(ctx)
    }
}

/// A source of data that plans read tasks.
///
/// Planning may do I/O (listing, reading footers), so it is `async`; it runs on the
/// runtime's I/O threads when an execution starts. A source that is given a
/// projection produces exactly the projected columns, in order.
#[async_trait::async_trait]
pub trait DataSource: Send + Sync + Debug {
    /// The operator name shown in plans and stats, e.g. `ReadParquet`.
    fn name(&self) -> String;
    /// The schema of everything the source can produce.
    fn schema(&self) -> SchemaRef;
    /// A short description for `explain`: paths, file count.
    fn describe(&self) -> String;
    /// Whether `filters` in a [`ScanRequest`] can be used at all (a source that ignores
    /// them is still correct, but the optimizer then keeps them out).
    fn supports_filters(&self) -> bool {
        false
    }

    /// Whether its read tasks can be sent to another process (each [`ReadTask`] has a
    /// [`plan`](ReadTask::plan)): on a cluster they then run on the nodes. Planning
    /// such a source must not run anything (a cluster runner plans it up front).
    fn shippable(&self) -> bool {
        false
    }
    /// More lines for `explain` under the operator's line: the plan a query source runs
    /// (DataFusion's sort, aggregation and join operators, with their exchanges).
    fn explain_detail(&self, _request: &ScanRequest) -> Option<String> {
        None
    }
    /// More lines for `explain`'s logical sections: the logical plan a query source
    /// stands for, as written (`optimized` false) or as its optimizer leaves it for
    /// `request`.
    fn logical_detail(&self, _request: &ScanRequest, _optimized: bool) -> Option<String> {
        None
    }
    /// The source as a DataFusion logical plan, where it has one (files: their listing
    /// table; a query: its plan). Sorts, group-bys and joins over such a source then
    /// let DataFusion scan it directly, with its statistics and its own parallelism,
    /// instead of through volley's executor.
    fn logical_plan(&self) -> Option<datafusion::logical_expr::LogicalPlan> {
        None
    }
    /// Whether the order of the output is the point (a sort, a seeded shuffle, a split
    /// by row positions): executions that read the source then keep its order.
    fn ordered(&self) -> bool {
        false
    }
    /// Bytes the source's own operators spilled to disk in its latest execution.
    fn spilled_bytes(&self) -> u64 {
        0
    }
    /// Plans the read tasks for `request`.
    async fn plan(&self, state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>>;
}

/// Whether `plan` scans files (and so, once wrapped, names them in its errors).
fn reads_files(plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>) -> bool {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    let mut found = false;
    let _ = plan.apply(|node| {
        found = (node.as_ref() as &dyn std::any::Any).is::<crate::NamedFileScanExec>();
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}
