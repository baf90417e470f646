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
mod local_store;
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
///
/// `*`, `?` and `[` make a glob, except in a local path that exists as written (a file
/// named `data[1].csv` is read as itself). In a URL (`s3://bucket/logs/*.parquet`)
/// they always do: percent-encode them (`%2A`, `%3F`, `%5B`) to name an object that
/// holds them.
pub fn parse_path(
    path: &str,
) -> volley_common::Result<datafusion::datasource::listing::ListingTableUrl> {
    use datafusion::datasource::listing::ListingTableUrl;
    use volley_common::VolleyError;
    if path.trim().is_empty() {
        return Err(VolleyError::plan("empty path"));
    }
    let invalid =
        |e: &dyn std::fmt::Display| VolleyError::plan(format!("invalid path `{path}`: {e}"));
    if path.contains("://") {
        // DataFusion takes a URL's glob characters literally (and `?` as the start of
        // its query): the glob is split off here.
        let Some((base, glob)) = split_url_glob(path) else {
            return ListingTableUrl::parse(path).map_err(|e| invalid(&e));
        };
        let url = url::Url::parse(base).map_err(|e| invalid(&e))?;
        let glob = glob::Pattern::new(glob).map_err(|e| invalid(&e))?;
        return ListingTableUrl::try_new(url, Some(glob)).map_err(|e| invalid(&e));
    }
    let local = std::path::Path::new(path);
    if local.exists() {
        if path.contains(GLOB_CHARS) {
            // Read as written, not as a glob.
            let absolute = std::path::absolute(local).map_err(|e| invalid(&e))?;
            let url = if local.is_dir() {
                url::Url::from_directory_path(&absolute)
            } else {
                url::Url::from_file_path(&absolute)
            }
            .map_err(|()| invalid(&"cannot be made a file URL"))?;
            // (Parsed again: that resolves `..` and `.` segments.)
            let url = url::Url::parse(url.as_str()).map_err(|e| invalid(&e))?;
            return ListingTableUrl::try_new(url, None).map_err(|e| invalid(&e));
        }
    } else if !path.contains(GLOB_CHARS) {
        // A local path without glob characters must exist: say so with the path,
        // rather than an empty listing later.
        return Err(VolleyError::plan(format!("path does not exist: {path}")));
    }
    ListingTableUrl::parse(path).map_err(|e| invalid(&e))
}

/// The characters that make a path a glob.
const GLOB_CHARS: [char; 3] = ['*', '?', '['];

/// Whether [`parse_path`] reads `path` as a glob.
pub(crate) fn is_glob(path: &str) -> bool {
    if path.contains("://") {
        split_url_glob(path).is_some()
    } else {
        path.contains(GLOB_CHARS) && !std::path::Path::new(path).exists()
    }
}

/// A URL whose path holds a glob character, cut before the path segment that holds
/// the first one: `("s3://b/logs/", "2024-*/*.parquet")`.
fn split_url_glob(url: &str) -> Option<(&str, &str)> {
    let authority = url.find("://")? + 3;
    // (A host may hold `[`: an IPv6 address.)
    let path = authority + url[authority..].find('/')?;
    let first = path + url[path..].find(GLOB_CHARS)?;
    let cut = path + url[path..first].rfind('/')? + 1;
    Some(url.split_at(cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_cut_before_their_glob() {
        assert_eq!(
            split_url_glob("s3://b/logs/2024-*/*.parquet"),
            Some(("s3://b/logs/", "2024-*/*.parquet"))
        );
        assert_eq!(split_url_glob("s3://b/*"), Some(("s3://b/", "*")));
        assert_eq!(split_url_glob("s3://b/a?.csv"), Some(("s3://b/", "a?.csv")));
        assert_eq!(split_url_glob("s3://b/data/x.parquet"), None);
        assert_eq!(split_url_glob("http://[::1]:9000/b/x.csv"), None);
        assert_eq!(split_url_glob("s3://b/x%5B1%5D.csv"), None);
        let url = parse_path("s3://b/logs/*.parquet").unwrap();
        assert_eq!(url.prefix().as_ref(), "logs");
        assert!(url.contains(&"logs/a.parquet".into(), true));
        assert!(!url.contains(&"logs/a.csv".into(), true));
        let url = parse_path("s3://b/x%5B1%5D.csv").unwrap();
        assert_eq!(url.prefix().as_ref(), "x[1].csv");
    }

    #[test]
    fn a_local_path_that_exists_is_read_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let named = dir.path().join("data[1].csv");
        std::fs::write(&named, "a\n1\n").unwrap();
        let url = parse_path(named.to_str().unwrap()).unwrap();
        assert!(url.get_glob().is_none());
        assert!(url.prefix().as_ref().ends_with("data[1].csv"), "{url}");
        assert!(!is_glob(named.to_str().unwrap()));
        let other = dir.path().join("data[2].csv");
        assert!(is_glob(other.to_str().unwrap()));
        assert!(parse_path(other.to_str().unwrap())
            .unwrap()
            .get_glob()
            .is_some());
    }
}
