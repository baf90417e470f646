//! Arrow IPC files mapped into memory, read whole or one batch at a time, and sent
//! over Flight as the file holds them.

use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::FlightData;
use volley_common::{Result, VolleyError};

use super::ObjectCompression;

/// The batches of an Arrow IPC file in a node's shared folder (all, or batch `i`),
/// mapped into memory rather than read: their buffers are the file's pages, shared
/// with the node's store, not copies (the file is not compressed: see
/// [`ObjectCompression::Auto`]). While a batch lives it keeps the file's pages, even
/// once the store has freed or spilled the object.
pub(super) fn map_shared_file(path: &Path, batch: Option<u32>) -> Result<Vec<RecordBatch>> {
    decode_ipc_file(map_file(path)?, batch)
        .map_err(|e| e.context(format!("object file {}", path.display())))
}

/// The file at `path` (one of a node's shared objects) mapped into memory.
pub(super) fn map_file(path: &Path) -> Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).map_err(|e| {
        VolleyError::Io(e).context(format!("cannot read object file {}", path.display()))
    })?;
    // SAFETY: a file of the shared folder is written once, under a name of its own,
    // before the store takes it, and never written again (a re-run task writes a new
    // file): its pages do not change under the mapping. Removing it (the object freed
    // or spilled) keeps the mapped pages until the batches are dropped.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
        VolleyError::Io(e).context(format!("cannot map object file {}", path.display()))
    })?;
    Ok(Arc::new(map))
}

fn not_ipc(what: String) -> VolleyError {
    VolleyError::execution(format!("not an Arrow IPC file: {what}"))
}

/// The footer of the Arrow IPC file `bytes`, and where it starts.
fn ipc_footer(bytes: &[u8]) -> Result<(arrow::ipc::Footer<'_>, usize)> {
    let len = bytes.len();
    let trailer: [u8; 10] = bytes
        .get(len.saturating_sub(10)..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| not_ipc(format!("{len} bytes")))?;
    let footer_len = arrow::ipc::reader::read_footer_length(trailer)?;
    let footer_start = (len - 10)
        .checked_sub(footer_len)
        .ok_or_else(|| not_ipc(format!("a footer of {footer_len} bytes in {len}")))?;
    let footer = arrow::ipc::root_as_footer(&bytes[footer_start..len - 10])
        .map_err(|e| not_ipc(format!("its footer: {e}")))?;
    Ok((footer, footer_start))
}

/// Where `block`'s message lies in a file whose footer starts at `footer_start`:
/// `(start, header and prefix, body)` bytes. A message starts with its 8-byte prefix,
/// and ends before the footer.
fn block_range(block: &arrow::ipc::Block, footer_start: usize) -> Result<(usize, usize, usize)> {
    let (start, meta, body) = (
        usize::try_from(block.offset()).ok(),
        usize::try_from(block.metaDataLength()).ok(),
        usize::try_from(block.bodyLength()).ok(),
    );
    match (start, meta, body) {
        (Some(start), Some(meta), Some(body))
            if meta >= 8
                && start
                    .checked_add(meta)
                    .and_then(|m| m.checked_add(body))
                    .is_some_and(|end| end <= footer_start) =>
        {
            Ok((start, meta, body))
        }
        _ => Err(not_ipc(format!(
            "a block at {} of {} + {} bytes",
            block.offset(),
            block.metaDataLength(),
            block.bodyLength()
        ))),
    }
}

/// A range of a file's bytes, owned as one allocation: a batch decoded from it counts
/// its own block's bytes, not the whole file's (memory pools and Flight's piece sizes
/// count a buffer by its allocation).
struct FileRange<T> {
    file: Arc<T>,
    start: usize,
    len: usize,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for FileRange<T> {
    fn as_ref(&self) -> &[u8] {
        &self.file.as_ref().as_ref()[self.start..self.start + self.len]
    }
}

/// The largest message [`file_batch_messages`] sends as it is in the file; a larger
/// batch is cut into pieces by the encoder's path.
pub(super) const PASSTHROUGH_MAX_BYTES: usize = 64 << 20;

/// Batch `i` of the Arrow IPC file at `path` (a shared object's) as the Flight messages
/// that send it (its schema, then the batch's message unless it has no rows), its
/// header and body taken from the file as they are: no decoding, no copying of views
/// into pieces, no encoding again, the body a range of the file's mapped pages.
///
/// `None` where the file cannot be sent as it is: its buffers are compressed otherwise
/// than `compression` asks, it holds dictionaries, or the batch is larger than
/// [`PASSTHROUGH_MAX_BYTES`] (the encoder's path then sends it in pieces).
pub(super) fn file_batch_messages(
    path: &Path,
    i: u32,
    compression: ObjectCompression,
) -> Result<Option<Vec<FlightData>>> {
    let map = map_file(path)?;
    let bytes: &[u8] = &map;
    let (footer, footer_start) = ipc_footer(bytes)?;
    if footer.dictionaries().is_some_and(|d| !d.is_empty()) {
        return Ok(None);
    }
    let schema = footer
        .schema()
        .map(arrow::ipc::convert::fb_to_schema)
        .ok_or_else(|| not_ipc("no schema".into()))?;
    // The encoder sends dictionaries' values in their place (and their schema so).
    let dictionary = |f: &&arrow::datatypes::Field| {
        matches!(f.data_type(), arrow::datatypes::DataType::Dictionary(..))
    };
    if schema.flattened_fields().iter().any(dictionary) {
        return Ok(None);
    }
    let options = IpcWriteOptions::default();
    let mut messages = vec![FlightData::from(arrow_flight::SchemaAsIpc::new(
        &schema, &options,
    ))];
    let blocks = footer
        .recordBatches()
        .ok_or_else(|| not_ipc("no batch index".into()))?;
    if blocks.is_empty() {
        // No batches (a map task's empty input): no rows in any partition.
        return Ok(Some(messages));
    }
    let Some(block) = blocks.iter().nth(i as usize) else {
        // The decoding path says what is wrong.
        return Ok(None);
    };
    let (start, meta, body) = block_range(block, footer_start)?;
    // The message: a continuation marker, its header's length, the header (padded),
    // then the body.
    if body > PASSTHROUGH_MAX_BYTES || bytes[start..start + 4] != [0xff; 4] {
        return Ok(None);
    }
    let header = &bytes[start + 8..start + meta];
    let message =
        arrow::ipc::root_as_message(header).map_err(|e| not_ipc(format!("a message: {e}")))?;
    let batch = message
        .header_as_record_batch()
        .ok_or_else(|| not_ipc("a block that is not a record batch".into()))?;
    if batch.compression().map(|c| c.codec()) != compression.codec() {
        return Ok(None);
    }
    if batch.length() == 0 {
        // Flight sends no empty batch.
        return Ok(Some(messages));
    }
    let body = FileRange {
        file: Arc::clone(&map),
        start: start + meta,
        len: body,
    };
    messages.push(FlightData {
        data_header: bytes::Bytes::copy_from_slice(header),
        data_body: bytes::Bytes::from_owner(body),
        ..Default::default()
    });
    Ok(Some(messages))
}

/// The batches of the Arrow IPC file `file` (all, or batch `i`), decoded without
/// copying their buffers; each block of the file is an allocation of its own.
pub(super) fn decode_ipc_file<T>(file: Arc<T>, batch: Option<u32>) -> Result<Vec<RecordBatch>>
where
    T: AsRef<[u8]> + Send + Sync + 'static,
{
    use arrow::ipc::reader::FileDecoder;
    let bytes: &[u8] = file.as_ref().as_ref();
    let (footer, footer_start) = ipc_footer(bytes)?;
    let schema = footer
        .schema()
        .map(arrow::ipc::convert::fb_to_schema)
        .ok_or_else(|| not_ipc("no schema".into()))?;
    let decoder = FileDecoder::new(Arc::new(schema), footer.version());
    // SAFETY: the files decoded here are the node's shared objects, written as in
    // `own_file_reader` and never written again.
    #[allow(unsafe_code)]
    let mut decoder = unsafe { decoder.with_skip_validation(true) };
    let block_data = |block: &arrow::ipc::Block| {
        let (start, meta, body) = block_range(block, footer_start)?;
        let range = FileRange {
            file: Arc::clone(&file),
            start,
            len: meta + body,
        };
        Ok::<_, VolleyError>(arrow::buffer::Buffer::from(bytes::Bytes::from_owner(range)))
    };

    for block in footer.dictionaries().iter().flatten() {
        decoder.read_dictionary(block, &block_data(block)?)?;
    }
    let blocks = footer
        .recordBatches()
        .ok_or_else(|| not_ipc("no batch index".into()))?;
    let wanted = match batch {
        None => 0..blocks.len(),
        Some(_) if blocks.is_empty() => 0..0,
        Some(i) if (i as usize) < blocks.len() => i as usize..i as usize + 1,
        Some(i) => {
            return Err(VolleyError::execution(format!(
                "{} batches; batch {i} was asked for",
                blocks.len()
            )))
        }
    };
    let mut out = Vec::with_capacity(wanted.len());
    for i in wanted {
        let block = blocks.get(i);
        if let Some(b) = decoder.read_record_batch(block, &block_data(block)?)? {
            out.push(b);
        }
    }
    Ok(out)
}
