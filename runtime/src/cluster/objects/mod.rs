//! Objects: the immutable blocks tasks produce, kept in the object store of the node
//! that produced them and moved between nodes over Arrow Flight.
//!
//! Each node agent runs one [`ObjectStore`] and serves it with [`FlightObjects`]: a
//! `DoGet` with the object id as ticket streams the object's batches; a `DoPut` whose
//! descriptor path is the object id stores one. The store keeps objects in memory up to
//! its limit and spills the oldest to Arrow IPC files beyond it, so a node never holds
//! more than its limit in memory however much its tasks produce.
//!
//! Between a node's workers and its store, big objects skip Flight: a worker writes its
//! result as an Arrow IPC file into the node's shared-memory folder (`/dev/shm`) and
//! hands it over (`DoAction` `adopt`); a worker reading an object of its own node asks
//! where its file is (`locate`) and reads it. Such objects count as memory, spill like
//! the others, and are served over Flight to other nodes from their files.
//!
//! The files and the Flight messages carry Arrow IPC buffers compressed as the node's
//! [`ObjectCompression`] says: by default ([`ObjectCompression::Auto`]) objects sent to
//! another host go LZ4-compressed and nothing else is (on one host compression only
//! costs CPU); `lz4` or `zstd` compress files too, so a map output takes less of the
//! node's memory and spills later. Readers need no setting: each IPC message says how
//! its buffers are compressed.

use arrow::array::RecordBatch;

mod compression;
mod flight;
mod inline;
mod ipc_file;
mod reader;
mod shared;
mod store;
#[cfg(test)]
mod tests;
mod transfer;

pub use compression::ObjectCompression;
pub(crate) use compression::COMPRESSION_VAR;
pub use flight::FlightObjects;
pub(crate) use inline::{decode_inline, encode_inline};
pub(crate) use reader::slice_rows;
pub use reader::{object_batch, ObjectReader, ObjectSlice};
pub(crate) use shared::{fetch_shared, make_shared_dir, store_shared, SHARED_DIR_VAR};
pub(crate) use store::one_schema;
pub use store::ObjectStore;
pub(crate) use transfer::{fetch, fetch_range, fetch_whole, store, Selection};

/// Bytes of a list of batches, as the store counts them.
pub fn batches_size(batches: &[RecordBatch]) -> u64 {
    volley_common::batches_memory(batches)
}
