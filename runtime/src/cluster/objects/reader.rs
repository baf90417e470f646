//! Reading objects' rows from a task: slices and whole objects.

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};

use super::{fetch_range, Selection};

/// Rows `offset..offset + rows` of `batches` taken as one sequence (zero-copy slices).
pub(crate) fn slice_rows(
    batches: &[RecordBatch],
    offset: u64,
    rows: u64,
) -> Result<Vec<RecordBatch>> {
    let total: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    let end = offset
        .checked_add(rows)
        .filter(|&e| e <= total)
        .ok_or_else(|| {
            VolleyError::plan(format!(
                "rows {offset}..{} asked of an object of {total} rows",
                offset.saturating_add(rows)
            ))
        })?;
    let mut out = Vec::new();
    let mut start = 0u64;
    for b in batches {
        let n = b.num_rows() as u64;
        let (lo, hi) = (offset.max(start), end.min(start + n));
        if lo < hi {
            out.push(b.slice((lo - start) as usize, (hi - lo) as usize));
        }
        start += n;
    }
    Ok(out)
}

/// An object's batches as one batch (a single batch is passed on as is).
pub fn object_batch(id: &str, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
    match batches.len() {
        0 => Err(VolleyError::internal(format!("object {id} holds no batch"))),
        1 => Ok(batches.into_iter().next().expect("one")),
        _ => Ok(arrow::compute::concat_batches(
            &batches[0].schema(),
            &batches,
        )?),
    }
}

/// Where some rows of an object live: what a process other than the object's owner
/// needs to read them from the nodes with an [`ObjectReader`]. It names the object but
/// does not keep it alive: its owner holds the [`ObjectRef`](super::ObjectRef) until the
/// reader is done.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectSlice {
    /// The object's id.
    pub id: String,
    /// Flight endpoints of the nodes that hold a copy.
    pub addresses: Vec<String>,
    /// The first row (counted over the object's batches in order).
    pub offset: u64,
    /// How many rows.
    pub rows: u64,
}

/// Reads objects straight from the nodes' stores: how a task or actor (a training rank)
/// reads blocks whose references another process holds, without the bytes passing
/// through that process. Built in a worker from its environment; blocking, so use it
/// from a thread of its own (see [`on_own_thread`](super::on_own_thread)), not inside
/// an async runtime.
pub struct ObjectReader {
    channels: crate::cluster::net::Channels,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader").finish_non_exhaustive()
    }
}

impl ObjectReader {
    /// A reader with the cluster's token and TLS settings of this worker process
    /// (`VOLLEY_TOKEN`, the TLS variables).
    pub fn from_env() -> Result<Self> {
        let token = volley_common::env_var("VOLLEY_TOKEN")?.ok_or_else(|| {
            VolleyError::Config(
                "reading objects from the nodes needs the cluster token in VOLLEY_TOKEN \
                 (set in every worker process)"
                    .into(),
            )
        })?;
        Self::new(&token, &crate::cluster::tls::TlsConfig::from_env()?)
    }

    /// A reader that presents `token`, over TLS when `tls` has a CA to trust.
    pub fn new(token: &str, tls: &crate::cluster::tls::TlsConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("cannot start a runtime: {e}")))?;
        Ok(Self {
            channels: crate::cluster::net::Channels::new(token, tls),
            runtime,
        })
    }

    /// The slice's rows, from the first node that serves them.
    pub fn read(&self, slice: &ObjectSlice) -> Result<Vec<RecordBatch>> {
        let ObjectSlice {
            id,
            addresses,
            offset,
            rows,
        } = slice;
        if addresses.is_empty() {
            return Err(VolleyError::execution(format!(
                "object {id}: no node holds a copy to read"
            )));
        }
        let _enter = self.runtime.enter();
        let mut errors = Vec::new();
        for a in addresses {
            match self.runtime.block_on(fetch_range(
                &self.channels,
                a,
                id,
                Selection::Rows {
                    offset: *offset,
                    rows: *rows,
                },
            )) {
                Ok(b) => return Ok(b),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(VolleyError::execution(errors.join("; ")))
    }
}
