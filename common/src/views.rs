//! View columns (`Utf8View`, `BinaryView`) copied into buffers of their own.
//!
//! A `take`, `slice` or sort of a view array still points into every data buffer of its
//! input: a partition cut from a block, or a sorted run, would keep (and spill, store,
//! count and send) the whole input once per piece. The exchange compacts each piece it
//! makes; results and Flight messages are compacted only where it pays.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, GenericByteViewArray};
use arrow::datatypes::{ByteViewType, DataType};
use arrow::record_batch::RecordBatch;

use crate::Result;

/// Whether `batch` has a view column.
pub fn has_view_columns(batch: &RecordBatch) -> bool {
    batch
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Utf8View | DataType::BinaryView))
}

/// `batch` with every view column's strings copied into buffers of its own.
pub fn compact_views(batch: RecordBatch) -> Result<RecordBatch> {
    compact(batch, |_, _| true)
}

/// `batch` with the strings of its view columns copied into buffers of their own where
/// a column's buffers hold more than twice what its rows use (a compact column is
/// passed on as it is).
pub fn compact_bloated_views(batch: RecordBatch) -> Result<RecordBatch> {
    compact(batch, |held, used| held > 2 * used + 4096)
}

/// `batch` with each view column for which `copy(bytes held, bytes its rows use)` holds
/// copied.
fn compact(batch: RecordBatch, copy: impl Fn(usize, usize) -> bool) -> Result<RecordBatch> {
    if !has_view_columns(&batch) {
        return Ok(batch);
    }
    fn one<T: ByteViewType + ?Sized>(
        a: &GenericByteViewArray<T>,
        copy: &impl Fn(usize, usize) -> bool,
    ) -> Option<ArrayRef> {
        let held = a.data_buffers().iter().map(|b| b.len()).sum();
        copy(held, a.total_buffer_bytes_used()).then(|| Arc::new(a.gc()) as ArrayRef)
    }
    let columns: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| {
            let copied = match c.data_type() {
                DataType::Utf8View => one(c.as_string_view(), &copy),
                DataType::BinaryView => one(c.as_binary_view(), &copy),
                _ => None,
            };
            copied.unwrap_or_else(|| Arc::clone(c))
        })
        .collect();
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}
