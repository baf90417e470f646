//! File scans whose errors name their file.
//!
//! DataFusion's file scans read several files per partition, and an error met while
//! decoding one (a corrupt page, a value that does not parse) says what went wrong but
//! not in which file. [`name_file_errors`] wraps every file scan of a physical plan in a
//! [`NamedFileScanExec`], which runs the same scan with each file's work wrapped so that
//! its errors read `reading data/part-3.parquet: ...`.
//!
//! ```text
//!   NamedFileScanExec ── execute(p) ─▶ FileStream over file group p
//!        (same plan properties,            │ per file: NamingMorselizer
//!         metrics and display)             ▼   errors: "reading FILE: {error}"
//!                                     the FileSource's own morsels
//! ```
//!
//! The wrapper delegates its downcast identity to the `DataSourceExec` it wraps, so code
//! that looks for file scans (and `datafusion-proto`, which serializes the scan itself)
//! sees through it.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::datasource::physical_plan::{FileScanConfig, FileStreamBuilder};
use datafusion::datasource::source::{DataSource, DataSourceExec};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::coop::cooperative;
use datafusion::physical_plan::metrics::{MetricsSet, SplitMetrics};
use datafusion::physical_plan::statistics::StatisticsArgs;
use datafusion::physical_plan::stream::BatchSplitStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, Statistics,
};
use datafusion_datasource::morsel::{Morsel, MorselPlan, MorselPlanner, Morselizer};
use datafusion_datasource::PartitionedFile;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use crate::lines::{CsvDialect, LineKind, LineOrigin};

/// Wraps every file scan in `plan` so that its errors name their file. Plans without
/// file scans come back unchanged; scans already wrapped are left alone.
pub fn name_file_errors(plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if (node.as_ref() as &dyn Any).is::<NamedFileScanExec>() {
            return Ok(Transformed::no(node));
        }
        match NamedFileScanExec::try_wrap(&node) {
            Some(named) => Ok(Transformed::yes(Arc::new(named) as Arc<dyn ExecutionPlan>)),
            None => Ok(Transformed::no(node)),
        }
    })
    .data()
}

/// A file scan (`DataSourceExec` over a `FileScanConfig`) whose errors name the file
/// they came from. Made by [`name_file_errors`].
#[derive(Debug)]
pub struct NamedFileScanExec {
    inner: Arc<dyn ExecutionPlan>,
    config: FileScanConfig,
}

impl NamedFileScanExec {
    fn try_wrap(plan: &Arc<dyn ExecutionPlan>) -> Option<Self> {
        let exec = (plan.as_ref() as &dyn Any).downcast_ref::<DataSourceExec>()?;
        let config = exec.data_source().downcast_ref::<FileScanConfig>()?;
        Some(Self {
            inner: Arc::clone(plan),
            config: config.clone(),
        })
    }
}

impl DisplayAs for NamedFileScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.fmt_as(t, f)
    }
}

impl ExecutionPlan for NamedFileScanExec {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.inner.as_ref())
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
                "a file scan has no children".to_string(),
            ))
        }
    }

    /// The scan as `DataSourceExec` runs it (`FileScanConfig::open`), with every file's
    /// work wrapped by a [`NamingMorselizer`].
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let config = &self.config;
        let store = context
            .runtime_env()
            .object_store(&config.object_store_url)?;
        let batch_size = config
            .batch_size
            .unwrap_or_else(|| context.session_config().batch_size());
        let source = config.file_source.with_batch_size(batch_size);
        let morselizer = source.create_morselizer(store, config, partition)?;
        let stream = FileStreamBuilder::new(config)
            .with_partition(partition)
            .with_morselizer(Box::new(NamingMorselizer {
                inner: morselizer,
                store: config.object_store_url.clone(),
                lines: match config.file_source.file_type() {
                    "csv" => LineKind::Csv(csv_dialect(config)),
                    // Found by decoding the file again: its plain bytes only.
                    "json" if !config.file_compression_type.is_compressed() => {
                        LineKind::Json(decoded_schema(config))
                    }
                    _ => LineKind::None,
                },
            }))
            .with_metrics(source.metrics())
            .build()?;
        let metrics = config.metrics();
        Ok(Box::pin(BatchSplitStream::new(
            Box::pin(cooperative(stream)),
            context.session_config().batch_size(),
            SplitMetrics::new(&metrics, partition),
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        self.inner.metrics()
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> DfResult<Arc<Statistics>> {
        self.inner.statistics_from_inputs(input_stats, args)
    }
}

/// The columns a JSON scan decodes (its projection of the file's schema): a line is
/// found by decoding with the same, so that a bad value in a column the query does not
/// read is not taken for the error.
fn decoded_schema(config: &FileScanConfig) -> arrow::datatypes::SchemaRef {
    use datafusion_datasource::projection::SplitProjection;
    let file_schema = config.file_schema();
    config
        .file_source
        .projection()
        .and_then(|p| {
            let indices = SplitProjection::new(file_schema, p).file_indices;
            file_schema.project(&indices).ok().map(Arc::new)
        })
        .unwrap_or_else(|| Arc::clone(file_schema))
}

/// The dialect of a CSV scan whose files' plain bytes can be read again (not
/// compressed).
fn csv_dialect(config: &FileScanConfig) -> Option<CsvDialect> {
    use datafusion::datasource::physical_plan::CsvSource;
    if config.file_compression_type.is_compressed() {
        return None;
    }
    let csv = config.file_source.downcast_ref::<CsvSource>()?;
    Some(CsvDialect {
        delimiter: csv.delimiter(),
        quote: csv.quote(),
        escape: csv.escape(),
        terminator: csv.terminator(),
        comment: csv.comment(),
    })
}

/// What names the file in an error: its path, and the byte range when a task reads
/// part of it.
pub fn file_label(store: &ObjectStoreUrl, file: &PartitionedFile) -> String {
    let name = crate::listing::display_location(store, &file.object_meta.location);
    match &file.range {
        Some(r) => format!("{name} [bytes {}..{}]", r.start, r.end),
        None => name,
    }
}

/// What names a file's errors: its label, and for a local text file (CSV, NDJSON),
/// where a parse error's line is found.
#[derive(Debug)]
struct Naming {
    label: String,
    lines: Option<LineOrigin>,
}

impl Naming {
    /// `e`, or the parse error it ends in with its line counted in the file.
    fn renumbered(&self, e: DataFusionError) -> DataFusionError {
        use arrow::error::ArrowError;
        let Some(origin) = &self.lines else {
            return e;
        };
        let error = match (e.find_root(), &origin.kind) {
            (DataFusionError::ArrowError(a, _), LineKind::Csv(_)) => match a.as_ref() {
                // Parse errors count the split's lines from 0 (`at line N`); rows with
                // the wrong number of fields from 1 (`for line N`).
                ArrowError::ParseError(m) => origin
                    .renumber_csv(m, " at line ", 0)
                    .map(ArrowError::ParseError),
                ArrowError::CsvError(m) => origin
                    .renumber_csv(m, " for line ", 1)
                    .map(ArrowError::CsvError),
                _ => None,
            },
            (DataFusionError::ArrowError(a, _), LineKind::Json(schema)) => match a.as_ref() {
                ArrowError::JsonError(m) => origin
                    .find_json_line(schema, m)
                    .map(|line| ArrowError::JsonError(format!("{m} at line {line}"))),
                _ => None,
            },
            _ => None,
        };
        match error {
            Some(a) => DataFusionError::ArrowError(Box::new(a), None),
            None => e,
        }
    }
}

fn named(naming: &Naming, e: DataFusionError) -> DataFusionError {
    DataFusionError::Context(
        format!("reading {}", naming.label),
        Box::new(naming.renumbered(e)),
    )
}

/// Wraps a format's morselizer: every planner, pending read and morsel of a file
/// reports its errors with the file's name.
#[derive(Debug)]
struct NamingMorselizer {
    inner: Box<dyn Morselizer>,
    store: ObjectStoreUrl,
    /// How the files' parse errors count lines.
    lines: LineKind,
}

impl Morselizer for NamingMorselizer {
    fn plan_file(&self, file: PartitionedFile) -> DfResult<Box<dyn MorselPlanner>> {
        // A local file is read again to count its lines; elsewhere, or compressed (a
        // CSV file is then read whole), lines count from the file's start already.
        let local = self.store.as_str().starts_with("file://");
        let start = file.range.as_ref().map_or(0, |r| r.start.max(0) as u64);
        let usable = match self.lines {
            LineKind::None => false,
            LineKind::Csv(_) => local || start == 0,
            LineKind::Json(_) => local,
        };
        let kind = match &self.lines {
            // Records are walked again in local files only.
            LineKind::Csv(_) if !local => LineKind::Csv(None),
            kind => kind.clone(),
        };
        let lines = usable.then(|| LineOrigin {
            path: std::path::PathBuf::from(format!("/{}", file.object_meta.location)),
            start,
            end: file.range.as_ref().map(|r| r.end.max(0) as u64),
            kind,
        });
        let label = Arc::new(Naming {
            label: file_label(&self.store, &file),
            lines,
        });
        let planner = self.inner.plan_file(file).map_err(|e| named(&label, e))?;
        Ok(Box::new(NamingPlanner {
            inner: planner,
            label,
        }))
    }
}

#[derive(Debug)]
struct NamingPlanner {
    inner: Box<dyn MorselPlanner>,
    label: Arc<Naming>,
}

impl NamingPlanner {
    fn wrap(inner: Box<dyn MorselPlanner>, label: &Arc<Naming>) -> Box<dyn MorselPlanner> {
        Box::new(NamingPlanner {
            inner,
            label: Arc::clone(label),
        })
    }
}

impl MorselPlanner for NamingPlanner {
    fn plan(self: Box<Self>) -> DfResult<Option<MorselPlan>> {
        let label = self.label;
        let Some(mut plan) = self.inner.plan().map_err(|e| named(&label, e))? else {
            return Ok(None);
        };
        let morsels: Vec<Box<dyn Morsel>> = plan
            .take_morsels()
            .into_iter()
            .map(|m| {
                Box::new(NamingMorsel {
                    inner: m,
                    label: Arc::clone(&label),
                }) as Box<dyn Morsel>
            })
            .collect();
        let planners: Vec<Box<dyn MorselPlanner>> = plan
            .take_ready_planners()
            .into_iter()
            .map(|p| NamingPlanner::wrap(p, &label))
            .collect();
        let mut out = MorselPlan::new()
            .with_morsels(morsels)
            .with_planners(planners);
        if let Some(pending) = plan.take_pending_planner() {
            let label = Arc::clone(&label);
            out.set_pending_planner(pending.into_future().map(move |r| match r {
                Ok(p) => Ok(NamingPlanner::wrap(p, &label)),
                Err(e) => Err(named(&label, e)),
            }));
        }
        Ok(Some(out))
    }
}

#[derive(Debug)]
struct NamingMorsel {
    inner: Box<dyn Morsel>,
    label: Arc<Naming>,
}

impl Morsel for NamingMorsel {
    fn into_stream(self: Box<Self>) -> BoxStream<'static, DfResult<RecordBatch>> {
        let label = self.label;
        self.inner
            .into_stream()
            .map(move |r| r.map_err(|e| named(&label, e)))
            .boxed()
    }
}
