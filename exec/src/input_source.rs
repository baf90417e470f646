//! A source over a cluster task's inputs, read as they arrive.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::DataFusionError;
use datafusion::execution::context::SessionState;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use futures::StreamExt;
use volley_common::{Result, VolleyError};
use volley_connectors::{DataSource, ReadTask, ScanRequest};
use volley_runtime::cluster::InputStream;

use crate::memory_source::{project_batch, projected};

/// Batches already taken from a stream (to learn its schema), and the stream.
type Unread = (Vec<RecordBatch>, InputStream);

/// The batches of a task's input objects, read once, in order, as its worker reads
/// them: a reduce task's partition of every map output flows into its operator (a
/// sort or aggregation that spills past the memory budget) instead of being held
/// whole before it starts.
#[derive(Debug)]
pub struct InputStreamSource {
    schema: SchemaRef,
    /// The stream, and batches already taken from it (to learn the schema); taken by
    /// the one read that runs.
    inputs: Arc<Mutex<Option<Unread>>>,
}

impl InputStreamSource {
    /// The rows of `inputs`, of `schema`, after `first` (batches already taken from it).
    pub fn new(schema: SchemaRef, first: Vec<RecordBatch>, inputs: InputStream) -> Self {
        Self {
            schema,
            inputs: Arc::new(Mutex::new(Some((first, inputs)))),
        }
    }
}

fn external(e: VolleyError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[async_trait::async_trait]
impl DataSource for InputStreamSource {
    fn name(&self) -> String {
        "TaskInputs".into()
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn describe(&self) -> String {
        "the task's input objects, as they are read".into()
    }

    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let schema = projected(&self.schema, request)?;
        let projection = request.projection.clone();
        let (inputs, full) = (Arc::clone(&self.inputs), Arc::clone(&self.schema));
        Ok(vec![ReadTask::new("the task's inputs", 0, move |_ctx| {
            let (first, inputs) = take_once(&inputs)?;
            Ok(batches_of(
                first,
                inputs,
                Some(&full),
                Arc::clone(&schema),
                projection.clone(),
            ))
        })])
    }
}

/// The stream and the batches taken from it, the first time; an error after.
fn take_once(inputs: &Mutex<Option<Unread>>) -> Result<Unread> {
    inputs
        .lock()
        .map_err(|_| VolleyError::internal("a task's input stream was poisoned"))?
        .take()
        .ok_or_else(|| VolleyError::internal("a task's inputs are read once"))
}

/// `first`, then the batches of `inputs` (of schema `full` where given: others are an
/// error), the `projection` of their columns as `schema`; empty batches left out.
fn batches_of(
    first: Vec<RecordBatch>,
    inputs: InputStream,
    full: Option<&SchemaRef>,
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
) -> SendableRecordBatchStream {
    let rest = futures::stream::unfold(inputs, |mut inputs| async move {
        let next = inputs.next().await?;
        Some((next, inputs))
    })
    .flat_map(|input| {
        let items: Vec<Result<RecordBatch>> = match input {
            Ok(batches) => batches.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(items)
    });
    let (full, s) = (full.cloned(), Arc::clone(&schema));
    let batches = futures::stream::iter(first.into_iter().map(Ok))
        .chain(rest)
        .filter(|b| futures::future::ready(!matches!(b, Ok(b) if b.num_rows() == 0)))
        .map(move |b| {
            b.and_then(|b| {
                // As a source over batches held in memory checks them.
                match &full {
                    Some(full) if b.schema().fields() != full.fields() => {
                        return Err(VolleyError::plan(format!(
                            "an input batch has schema {} but the task's inputs have {full}",
                            b.schema()
                        )))
                    }
                    _ => {}
                }
                project_batch(&b, &projection, &s)
            })
            .map_err(external)
        });
    Box::pin(RecordBatchStreamAdapter::new(schema, batches))
}

/// A task's inputs as a DataFusion partition (of a `StreamingTableExec`), read once:
/// for a task that runs a DataFusion plan over them (the final half of an
/// aggregation).
#[derive(Debug)]
pub struct InputStreamPartition {
    schema: SchemaRef,
    inputs: Mutex<Option<(Vec<RecordBatch>, InputStream)>>,
}

impl InputStreamPartition {
    /// The rows of `inputs`, of `schema`.
    pub fn new(schema: SchemaRef, inputs: InputStream) -> Self {
        Self {
            schema,
            inputs: Mutex::new(Some((vec![], inputs))),
        }
    }
}

impl PartitionStream for InputStreamPartition {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let schema = Arc::clone(&self.schema);
        match take_once(&self.inputs) {
            Ok((first, inputs)) => batches_of(first, inputs, None, schema, None),
            Err(e) => Box::pin(RecordBatchStreamAdapter::new(
                schema,
                futures::stream::once(futures::future::ready(Err(external(e)))),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use datafusion::prelude::SessionContext;

    fn batch(name: &str, column: ArrayRef) -> RecordBatch {
        RecordBatch::try_from_iter([(name, column)]).unwrap()
    }

    /// Reads the source whole: its batches, or the first error.
    fn read_all(source: &InputStreamSource, request: &ScanRequest) -> Result<Vec<RecordBatch>> {
        let state = SessionContext::new().state();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let tasks = source.plan(&state, request).await?;
            let mut out = Vec::new();
            for t in tasks {
                let mut stream = t.open(state.task_ctx())?;
                while let Some(b) = stream.next().await {
                    out.push(b?);
                }
            }
            Ok(out)
        })
    }

    #[test]
    fn batches_arrive_in_order_projected_and_empty_ones_left_out() {
        let x = |v: Vec<i64>| batch("x", Arc::new(Int64Array::from(v)));
        let first = vec![x(vec![1, 2])];
        let inputs = InputStream::of(vec![vec![x(vec![]), x(vec![3])], vec![x(vec![4, 5])]]);
        let source = InputStreamSource::new(first[0].schema(), first, inputs);
        let got = read_all(&source, &ScanRequest::default()).unwrap();
        let rows: Vec<usize> = got.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(rows, [2, 1, 2]);
        // Read once: a second read is an error, not an empty result.
        let again = read_all(&source, &ScanRequest::default()).unwrap_err();
        assert!(again.to_string().contains("read once"), "{again}");
    }

    #[test]
    fn a_batch_of_another_schema_is_an_error_naming_both() {
        let x = batch("x", Arc::new(Int64Array::from(vec![1])));
        let other = batch("name", Arc::new(StringArray::from(vec!["a"])));
        let inputs = InputStream::of(vec![vec![other]]);
        let source = InputStreamSource::new(x.schema(), vec![x], inputs);
        let e = read_all(&source, &ScanRequest::default()).unwrap_err();
        let message = e.to_string();
        assert!(message.contains("an input batch has schema"), "{message}");
        assert!(
            message.contains("name") && message.contains("\"x\""),
            "{message}"
        );
    }
}
