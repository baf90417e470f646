//! Batches made by blocking code, streamed into DataFusion.
//!
//! Cluster calls and volley's own executor block; a DataFusion operator's stream must
//! not. [`thread_stream`] runs the blocking producer on a thread of its own and hands
//! its batches over a small channel: the producer stays at most two batches ahead, and
//! dropping the stream closes the channel, which the producer sees on its next send.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result as DfResult};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use volley_common::{Result, VolleyError};

/// The producer's end of a [`thread_stream`].
pub(crate) struct Handover(tokio::sync::mpsc::Sender<DfResult<RecordBatch>>);

impl Handover {
    /// Hands `batch` over, waiting for room; false once the consumer went away.
    pub(crate) fn send(&self, batch: RecordBatch) -> bool {
        self.0.blocking_send(Ok(batch)).is_ok()
    }

    /// Whether the consumer went away.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// A stream of the batches `produce` hands over from a thread named `name`; an error it
/// returns (or its panic, as an error) is the stream's last item.
pub(crate) fn thread_stream(
    name: &str,
    schema: SchemaRef,
    produce: impl FnOnce(&Handover) -> Result<()> + Send + 'static,
) -> DfResult<SendableRecordBatchStream> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let tx = Handover(tx);
            // A panic would close the channel as an end: the stream would end short.
            let produced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| produce(&tx)))
                .unwrap_or_else(|_| Err(VolleyError::internal("a stream's producer panicked")));
            if let Err(e) = produced {
                let _ = tx.0.blocking_send(Err(e.into()));
            }
        })
        .map_err(|e| DataFusionError::Execution(format!("cannot start a thread: {e}")))?;
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
}
