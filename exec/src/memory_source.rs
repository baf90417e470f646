//! Sources that need no files: batches in memory and integer ranges.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::context::SessionState;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use volley_common::{Result, VolleyError};
use volley_connectors::{DataSource, ReadTask, ScanRequest};

pub(crate) fn projected(schema: &SchemaRef, request: &ScanRequest) -> Result<SchemaRef> {
    Ok(match &request.projection {
        Some(p) => Arc::new(schema.project(p)?),
        None => Arc::clone(schema),
    })
}

/// The `projection` columns of `batch` (all of them for `None`), as `schema`.
pub fn project_batch(
    batch: &RecordBatch,
    projection: &Option<Vec<usize>>,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    match projection {
        None => Ok(batch.clone()),
        Some(p) => {
            let cols = p.iter().map(|&i| Arc::clone(batch.column(i))).collect();
            let opts = RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
            Ok(RecordBatch::try_new_with_options(
                Arc::clone(schema),
                cols,
                &opts,
            )?)
        }
    }
}

fn stream_task(label: String, rows: u64, schema: SchemaRef, batches: Vec<RecordBatch>) -> ReadTask {
    ReadTask::new(label, rows, move |_ctx| {
        let items: Vec<datafusion::common::Result<RecordBatch>> =
            batches.iter().cloned().map(Ok).collect();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&schema),
            futures::stream::iter(items),
        )))
    })
}

/// Batches held in memory (`from_batches`), read as `partitions` tasks.
#[derive(Debug)]
pub struct MemorySource {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl MemorySource {
    /// A source over `batches`, which must share one schema.
    pub fn try_new(batches: Vec<RecordBatch>) -> Result<Self> {
        let Some(first) = batches.first() else {
            return Err(VolleyError::plan(
                "from_batches needs at least one batch (its schema)",
            ));
        };
        let schema = first.schema();
        for (i, b) in batches.iter().enumerate() {
            if b.schema().fields() != schema.fields() {
                return Err(VolleyError::plan(format!(
                    "batch {i} has schema {} but batch 0 has {}",
                    b.schema(),
                    schema
                )));
            }
        }
        Ok(Self { schema, batches })
    }

    /// A source over `batches` (maybe none) of `schema`.
    pub fn with_schema(schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Self> {
        for (i, b) in batches.iter().enumerate() {
            if b.schema().fields() != schema.fields() {
                return Err(VolleyError::plan(format!(
                    "batch {i} has schema {} but the source has {schema}",
                    b.schema()
                )));
            }
        }
        Ok(Self { schema, batches })
    }

    /// The batches it holds.
    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }
}

#[async_trait::async_trait]
impl DataSource for MemorySource {
    fn name(&self) -> String {
        "FromBatches".into()
    }
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn describe(&self) -> String {
        let rows: usize = self.batches.iter().map(|b| b.num_rows()).sum();
        format!("{} batches, {rows} rows", self.batches.len())
    }
    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let schema = projected(&self.schema, request)?;
        self.batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let b = project_batch(b, &request.projection, &schema)?;
                Ok(stream_task(
                    format!("batch {i}"),
                    b.num_rows() as u64,
                    Arc::clone(&schema),
                    vec![b],
                ))
            })
            .collect()
    }
}

/// The integers `0..n` in a column `id` (Int64).
#[derive(Debug)]
pub struct RangeSource {
    n: u64,
    tasks: usize,
    batch_size: usize,
}

impl RangeSource {
    /// `0..n` read as `tasks` tasks of batches of `batch_size` rows.
    pub fn new(n: u64, tasks: usize, batch_size: usize) -> Self {
        Self {
            n,
            tasks: tasks.max(1),
            batch_size: batch_size.max(1),
        }
    }

    fn full_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("id", DataType::Int64, false)]))
    }
}

#[async_trait::async_trait]
impl DataSource for RangeSource {
    fn name(&self) -> String {
        "Range".into()
    }
    fn schema(&self) -> SchemaRef {
        Self::full_schema()
    }
    fn describe(&self) -> String {
        format!("0..{}", self.n)
    }
    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let schema = projected(&Self::full_schema(), request)?;
        let mut n = self.n;
        if let Some(limit) = request.limit {
            n = n.min(limit as u64);
        }
        if n > i64::MAX as u64 {
            return Err(VolleyError::plan(format!(
                "range({}): the ids are Int64, so at most {} rows",
                self.n,
                i64::MAX
            )));
        }
        let tasks = (self.tasks as u64).min(n.max(1));
        let per = n.div_ceil(tasks.max(1));
        let keep = request
            .projection
            .as_ref()
            .map(|p| !p.is_empty())
            .unwrap_or(true);
        let batch_size = self.batch_size as u64;
        let mut out = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + per).min(n);
            let schema = Arc::clone(&schema);
            out.push(ReadTask::new(
                format!("range {start}..{end}"),
                (end - start).saturating_mul(8),
                move |_ctx| {
                    let schema2 = Arc::clone(&schema);
                    let batches = (start..end).step_by(batch_size as usize).map(move |s| {
                        let e = (s + batch_size).min(end);
                        let cols: Vec<arrow::array::ArrayRef> = if keep {
                            vec![Arc::new(Int64Array::from_iter_values(s as i64..e as i64))]
                        } else {
                            vec![]
                        };
                        let opts = RecordBatchOptions::new().with_row_count(Some((e - s) as usize));
                        RecordBatch::try_new_with_options(Arc::clone(&schema2), cols, &opts)
                            .map_err(Into::into)
                    });
                    Ok(Box::pin(RecordBatchStreamAdapter::new(
                        Arc::clone(&schema),
                        futures::stream::iter(batches),
                    )))
                },
            ));
            start = end;
        }
        Ok(out)
    }
}
