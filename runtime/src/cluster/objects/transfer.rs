//! Moving objects between stores and their readers over Flight.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightDescriptor, PutResult, Ticket};
use futures::{StreamExt, TryStreamExt};
use volley_common::{Result, VolleyError};

use super::flight::ticket;
use super::{slice_rows, ObjectCompression};

/// Bytes of a Flight message's batch, about.
pub(super) const FLIGHT_PIECE_BYTES: u64 = 2 << 20;

/// Rows of a Flight message at most where a batch has view columns.
pub(super) const FLIGHT_VIEW_ROWS: usize = 16 * 1024;

/// `batches` cut into the pieces Flight sends, one message each, of about
/// [`FLIGHT_PIECE_BYTES`] (at most [`FLIGHT_VIEW_ROWS`] rows with view columns), each
/// view column's piece holding the strings it uses only.
///
/// Flight's encoder would cut a batch itself, by `get_buffer_memory_size`, which counts
/// a shared buffer once per array: a batch read from an IPC file (one body that every
/// column slices) looked tens of times its size and went out in hundreds of slices, and
/// a slice of a view column (`Utf8View`, `BinaryView`) is encoded with every data buffer
/// of the column, so a 2 MB partition went out as over 64 MB of messages. The pieces
/// made here are cut by the bytes there are, and the encoders are told to leave them
/// whole ([`flight_encoder`]). The cut is by bytes in memory, before compression.
pub(super) fn for_flight(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let rows = b.num_rows();
        let bytes = volley_common::batch_memory(&b).max(1);
        let mut per_piece = ((rows as u64 * FLIGHT_PIECE_BYTES) / bytes).max(1) as usize;
        let views = volley_common::has_view_columns(&b);
        if views {
            per_piece = per_piece.min(FLIGHT_VIEW_ROWS);
        }
        if per_piece >= rows {
            out.push(if views {
                volley_common::compact_bloated_views(b)?
            } else {
                b
            });
            continue;
        }
        let mut start = 0;
        while start < rows {
            let piece = b.slice(start, per_piece.min(rows - start));
            start += piece.num_rows();
            out.push(volley_common::compact_bloated_views(piece)?);
        }
    }
    Ok(out)
}

/// The row counts of `batches`, as a DoPut's descriptor carries them (`12,0,7`).
pub(super) fn batch_rows(batches: &[RecordBatch]) -> String {
    batches
        .iter()
        .map(|b| b.num_rows().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `pieces` (as [`for_flight`] cut them, received in order) put back into batches of
/// `rows` rows each (as [`batch_rows`] wrote them), a batch of no rows where a count
/// is 0.
pub(super) fn regroup(
    schema: &arrow::datatypes::SchemaRef,
    pieces: Vec<RecordBatch>,
    rows: &str,
) -> Result<Vec<RecordBatch>> {
    let counts = rows
        .split(',')
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<usize>()
                .map_err(|_| VolleyError::execution(format!("row counts {rows:?}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut pieces = pieces.into_iter().filter(|p| p.num_rows() > 0);
    let mut out = Vec::with_capacity(counts.len());
    for want in counts {
        let (mut got, mut n) = (Vec::new(), 0);
        while n < want {
            let Some(p) = pieces.next() else { break };
            n += p.num_rows();
            got.push(p);
        }
        if n != want {
            return Err(VolleyError::execution(format!(
                "a batch of {want} rows arrived as {n}: the object is cut short"
            )));
        }
        out.push(match got.len() {
            0 => RecordBatch::new_empty(Arc::clone(schema)),
            1 => got.pop().expect("one"),
            _ => arrow::compute::concat_batches(schema, &got)?,
        });
    }
    if pieces.next().is_some() {
        return Err(VolleyError::execution(
            "more rows arrived than the object's batches hold",
        ));
    }
    Ok(out)
}

/// Flight's encoder for pieces made by [`for_flight`]: it sends each as one message
/// (its own cutting is what [`for_flight`] replaces; a limit it could reach would cut a
/// piece whose buffers slice a larger body again). Buffers are compressed with
/// `compression`.
pub(super) fn flight_encoder(
    schema: SchemaRef,
    compression: ObjectCompression,
) -> Result<FlightDataEncoderBuilder> {
    Ok(FlightDataEncoderBuilder::new()
        .with_options(compression.ipc_options()?)
        .with_schema(schema)
        .with_max_flight_data_size(usize::MAX))
}

/// Reads an object from the Flight endpoint at `address`.
pub(crate) async fn fetch(
    channels: &crate::cluster::net::Channels,
    address: &str,
    id: &str,
) -> Result<Vec<RecordBatch>> {
    fetch_range(channels, address, id, Selection::All).await
}

/// What part of an object a read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// All of it.
    All,
    /// Rows `offset..offset + rows` of its batches taken as one sequence.
    Rows { offset: u64, rows: u64 },
    /// Its batch `i` (a partition of an exchange's map output).
    Batch(u32),
    /// All of it, each batch sent whole, so the reader gets the same batches (a copy
    /// whose batches are partitions read one by one). Each batch must fit a message.
    Whole,
}

impl Selection {
    /// The selection of a task input: one batch, or all of it.
    pub(crate) fn of_batch(batch: Option<u32>) -> Self {
        batch.map_or(Selection::All, Selection::Batch)
    }

    /// The selected part of `batches` (all of an object).
    pub(crate) fn apply(self, id: &str, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        match self {
            Selection::All | Selection::Whole => Ok(batches),
            Selection::Rows { offset, rows } => {
                slice_rows(&batches, offset, rows).map_err(|e| e.context(format!("object {id}")))
            }
            // An object without batches (a map task's empty input) has no rows in
            // any partition.
            Selection::Batch(_) if batches.is_empty() => Ok(batches),
            Selection::Batch(i) => {
                let n = batches.len();
                batches
                    .into_iter()
                    .nth(i as usize)
                    .map(|b| vec![b])
                    .ok_or_else(|| {
                        VolleyError::execution(format!(
                            "object {id} has {n} batches; batch {i} was asked for"
                        ))
                    })
            }
        }
    }
}

/// The `selection` of object `id`, fetched from the store at `address`: the node cuts
/// it, so only those rows travel.
pub(crate) async fn fetch_range(
    channels: &crate::cluster::net::Channels,
    address: &str,
    id: &str,
    selection: Selection,
) -> Result<Vec<RecordBatch>> {
    let mut client = channels.flight(address).await?;
    let stream = client
        .do_get(Ticket {
            ticket: ticket(id, selection).into(),
        })
        .await
        .map_err(|e| {
            VolleyError::execution(format!("cannot fetch object {id} from {address}: {e}"))
        })?;
    FlightRecordBatchStream::new(from_a_store(stream.into_inner()))
        .try_collect()
        .await
        .map_err(|e| {
            VolleyError::execution(format!("cannot fetch object {id} from {address}: {e}"))
        })
}

/// `decoder`, told not to validate the arrays it decodes: what a node's store sends
/// over Flight.
fn from_a_store(
    decoder: arrow_flight::decode::FlightDataDecoder,
) -> arrow_flight::decode::FlightDataDecoder {
    // SAFETY: the sender is a volley node's store, which encodes batches that volley
    // processes made or read back from its own files, over a connection that carried the
    // cluster's token; anyone holding that token can already run any program on every
    // node, so trusting the bytes widens nothing. Validating them (every offset, every
    // string's UTF-8) cost ~5% of a cluster sort's CPU.
    #[allow(unsafe_code)]
    unsafe {
        decoder.with_skip_validation()
    }
}

/// Object `id` from the store at `address` with the batches it has there, empty ones
/// included (a map output's batches are its partitions, read by index).
pub(crate) async fn fetch_whole(
    channels: &crate::cluster::net::Channels,
    address: &str,
    id: &str,
) -> Result<Vec<RecordBatch>> {
    use arrow_flight::decode::DecodedPayload;
    let failed = |e: &dyn std::fmt::Display| {
        VolleyError::execution(format!("cannot copy object {id} from {address}: {e}"))
    };
    let mut client = channels.flight(address).await?;
    let decoder = client
        .do_get(Ticket {
            ticket: ticket(id, Selection::Whole).into(),
        })
        .await
        .map_err(|e| failed(&e))?
        .into_inner();
    let mut decoder = from_a_store(decoder);
    let mut schema = None;
    let mut rows: Vec<usize> = Vec::new();
    let mut sent = VecDeque::new();
    while let Some(d) = decoder.next().await {
        let d = d.map_err(|e| failed(&e))?;
        match d.payload {
            DecodedPayload::Schema(s) => {
                let text = String::from_utf8_lossy(&d.inner.app_metadata).to_string();
                rows = text
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(|r| {
                        r.parse()
                            .map_err(|_| failed(&format!("bad batch rows {text:?}")))
                    })
                    .collect::<Result<_>>()?;
                schema = Some(s);
            }
            DecodedPayload::RecordBatch(b) => sent.push_back(b),
            DecodedPayload::None => {}
        }
    }
    let schema = schema.unwrap_or_else(|| Arc::new(Schema::empty()));
    let mut out = Vec::with_capacity(rows.len());
    for n in rows {
        if n == 0 {
            out.push(RecordBatch::new_empty(Arc::clone(&schema)));
            continue;
        }
        match sent.pop_front() {
            Some(b) if b.num_rows() == n => out.push(b),
            _ => return Err(failed(&"its batches did not come as sent")),
        }
    }
    if !sent.is_empty() {
        return Err(failed(&"more batches came than were sent"));
    }
    Ok(out)
}

/// Stores `batches` as object `id` in the store at `address`, sent compressed with
/// `compression`; returns its size in bytes.
pub(crate) async fn store(
    channels: &crate::cluster::net::Channels,
    address: &str,
    id: &str,
    batches: Vec<RecordBatch>,
    compression: ObjectCompression,
) -> Result<u64> {
    let mut client = channels.flight(address).await?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    // The batches travel in pieces: their row counts go along, so that the store
    // keeps them as they were (an object's batches are read by index: a map task's
    // batch `p` is partition `p`).
    let rows = batch_rows(&batches);
    let items: Vec<std::result::Result<RecordBatch, FlightError>> =
        for_flight(batches)?.into_iter().map(Ok).collect();
    let data = flight_encoder(schema, compression)?
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![id.to_string(), rows])))
        .build(futures::stream::iter(items));
    let results: Vec<PutResult> = client
        .do_put(data)
        .await
        .map_err(|e| VolleyError::execution(format!("cannot store object {id} at {address}: {e}")))?
        .try_collect()
        .await
        .map_err(|e| {
            VolleyError::execution(format!("cannot store object {id} at {address}: {e}"))
        })?;
    Ok(results
        .first()
        .and_then(|r| std::str::from_utf8(&r.app_metadata).ok()?.parse().ok())
        .unwrap_or(0))
}
