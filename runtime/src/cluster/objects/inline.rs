//! Small objects that travel inline with their metadata instead of over Flight.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use volley_common::{Result, VolleyError};

use super::batches_size;

/// The largest object, as an Arrow IPC stream, that travels inline with its metadata:
/// in a worker's result report, kept by the head, and handed to the tasks and drivers
/// that read it, which then skip a Flight round trip. Like Ray's inlined small objects,
/// this is what lets many tiny tasks (a number, a file name) go fast; bigger objects
/// stay on their node and move over Flight.
const INLINE_LIMIT: usize = 100 * 1024;

/// `batches` as one Arrow IPC stream if it fits [`INLINE_LIMIT`] (and the batches share
/// one schema); `None` otherwise.
pub(crate) fn encode_inline(batches: &[RecordBatch]) -> Option<Vec<u8>> {
    // In-memory size bounds the stream's size loosely (buffers are padded, slices
    // count their whole buffers): a cheap way to skip encoding big objects.
    if batches_size(batches) > 4 * INLINE_LIMIT as u64 {
        return None;
    }
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    if batches.iter().any(|b| b.schema() != schema) {
        return None;
    }
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &schema).ok()?;
    for b in batches {
        w.write(b).ok()?;
    }
    w.finish().ok()?;
    drop(w);
    (out.len() <= INLINE_LIMIT).then_some(out)
}

/// Reads back what [`encode_inline`] made of object `id`.
pub(crate) fn decode_inline(id: &str, bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .and_then(|r| r.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| VolleyError::internal(format!("object {id}: unreadable inline copy: {e}")))
}
