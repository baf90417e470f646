//! Sources and sinks: how volley reads and writes files.
//!
//! Every path goes through [`object_store`], so local files, `s3://`, `gs://`, `az://`
//! and `http(s)://` read the same way; stores are made on first use from the
//! environment's credentials ([`VolleyObjectStoreRegistry`]).
//!
//! A source ([`DataSource`]) plans *read tasks*: each task reads one split of the input
//! (a file, or a range of a Parquet file's row groups) as a stream of Arrow batches.
//! Parquet, CSV, NDJSON and Arrow IPC scans are DataFusion's file scans
//! ([`FileScan`]), so projection, predicate and limit pushdown, row-group pruning by
//! statistics and page index, and late materialization come from there; volley decides
//! the splits, so that every task reads one file and every error names it. SQL reads
//! files through DataFusion's listing tables ([`file_table`]), whose schemas are read
//! file by file and whose scans name the file of any error ([`name_file_errors`]).
//! Text and binary files have their own small readers ([`TextScan`], [`BinaryScan`]).
//!
//! Writes go through [`WriteJob`]: every task writes its part files into a staging
//! location, and [`WriteJob::commit`] moves them into place only when all succeeded.

mod format;
mod lines;
mod listing;
mod named_scan;
mod registry;
mod scan_listings;
mod sink;
mod source;
mod table;
mod text;

pub use format::{CsvReadOptions, FileFormatKind};
pub use listing::{cast_to_plain_strings, file_scan_config, plain_strings, FileScan};
pub use named_scan::{file_label, name_file_errors, NamedFileScanExec};
pub use registry::VolleyObjectStoreRegistry;
pub use scan_listings::{with_scan_listings, ScanListings};
pub use sink::{
    csv_can_hold, Compression, PartWriter, RemotePart, StagedPart, WriteFormat, WriteJob,
    WriteMode, WriteOptions, WriteSummary,
};
pub use source::{DataSource, ReadTask, ScanRequest};
pub use table::{file_table, view_strings_table, FileTableFactory};
pub use text::{BinaryScan, TextScan};

/// The folder value of a null (or empty) partition value, as Hive and Spark write it;
/// reads turn it back into null.
pub(crate) const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// Resolves a user path (relative, absolute or URL, maybe a glob) to a DataFusion
/// listing URL, with an error that names the path.
pub fn parse_path(
    path: &str,
) -> volley_common::Result<datafusion::datasource::listing::ListingTableUrl> {
    use volley_common::VolleyError;
    if path.trim().is_empty() {
        return Err(VolleyError::plan("empty path"));
    }
    let is_url = path.contains("://");
    if !is_url {
        // A local path without glob characters must exist: say so with the path,
        // rather than an empty listing later.
        let has_glob = path.contains(['*', '?', '[']);
        if !has_glob && !std::path::Path::new(path).exists() {
            return Err(VolleyError::plan(format!("path does not exist: {path}")));
        }
    }
    datafusion::datasource::listing::ListingTableUrl::parse(path)
        .map_err(|e| VolleyError::plan(format!("invalid path `{path}`: {e}")))
}
