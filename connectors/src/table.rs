//! Files as DataFusion tables, for SQL: `--table NAME=PATH`, `register_files` and the
//! paths a query names in quotes (`FROM 'data/*.parquet'`).
//!
//! DataFusion's own listing tables read the files' schemas together, so an error (a
//! corrupt footer, an empty file, two files whose columns clash) does not say which
//! file it came from. These tables are listing tables too, but their files are listed
//! and their schemas read one file at a time first, the way [`FileScan`](crate::FileScan)
//! does for the Dataset API, so every such error names its file; and their scans name
//! the file of any error met while reading ([`name_file_errors`](crate::name_file_errors)).

use std::sync::Arc;

use arrow::datatypes::DataType;
use async_trait::async_trait;
use datafusion::catalog::{TableProvider, UrlTableFactory};
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::options::{
    ArrowReadOptions, CsvReadOptions, JsonReadOptions, ParquetReadOptions, ReadOptions,
};
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig};
use datafusion::execution::context::SessionState;
use volley_common::{Result, ResultExt, VolleyError};

use crate::format::compression_of;
use crate::listing::{infer_schema, list_files, plain_strings};

/// How to list and read the files at `path`, and whether their format is binary (an
/// empty file is corrupt). The format follows the extension of the path's last part,
/// after a compression extension (`.gz`, `.zst`, `.bz2`, `.xz`) for text formats: CSV
/// (`.csv`), NDJSON (`.json`, `.ndjson`, `.jsonl`), Arrow IPC (`.arrow`, `.ipc`,
/// `.feather`), else Parquet. A folder lists the files with that extension (`.parquet`
/// for a folder); a file named on its own is read whatever its name.
fn listing_options(state: &SessionState, path: &str) -> (ListingOptions, bool) {
    let lower = path.to_ascii_lowercase();
    let last = lower.trim_end_matches('/').rsplit('/').next().unwrap_or("");
    let compression = compression_of(last);
    let (stem, zipped) = match last.rsplit_once('.') {
        Some((stem, z)) if compression != FileCompressionType::UNCOMPRESSED => {
            (stem, format!(".{z}"))
        }
        _ => (last, String::new()),
    };
    let ext = stem.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    let named_file = !lower.contains("://")
        && !path.contains(['*', '?', '['])
        && std::path::Path::new(path).is_file();
    // The extension files must end in: any, for a file named on its own.
    let filter = |e: &str| {
        if named_file {
            String::new()
        } else {
            format!(".{e}{zipped}")
        }
    };
    let (config, defaults) = (state.config(), state.default_table_options());
    match ext {
        "csv" => {
            let file_extension = filter(ext);
            let options = CsvReadOptions {
                file_extension: &file_extension,
                file_compression_type: compression,
                ..Default::default()
            };
            (options.to_listing_options(config, defaults), false)
        }
        "json" | "ndjson" | "jsonl" => {
            let file_extension = filter(ext);
            let options = JsonReadOptions {
                file_extension: &file_extension,
                file_compression_type: compression,
                ..Default::default()
            };
            (options.to_listing_options(config, defaults), false)
        }
        "arrow" | "ipc" | "feather" => {
            let file_extension = filter(ext);
            let options = ArrowReadOptions {
                file_extension: &file_extension,
                ..Default::default()
            };
            (options.to_listing_options(config, defaults), true)
        }
        _ => {
            let file_extension = filter("parquet");
            let options = ParquetReadOptions {
                file_extension: &file_extension,
                ..Default::default()
            };
            (options.to_listing_options(config, defaults), true)
        }
    }
}

/// Files at `path` (a file, folder or glob; local or an object-store URL) as a
/// DataFusion table with view string columns read as plain strings (see
/// [`plain_strings`]). Lists the files and reads every file's schema now, naming the
/// file of any error; Hive `key=value/` folders become string columns.
pub async fn file_table(state: &SessionState, path: &str) -> Result<Arc<dyn TableProvider>> {
    let url = crate::parse_path(path)?;
    let (options, binary) = listing_options(state, path);
    let files = list_files(
        state,
        std::slice::from_ref(&url),
        &[path.to_string()],
        &options.file_extension,
    )
    .await?;
    let file_schema = infer_schema(state, &options.format, binary, &files).await?;
    let partitions = if url.is_collection() {
        options
            .infer_partitions(state, &url)
            .await
            .with_context(|| format!("reading the partition folders of {path}"))?
    } else {
        vec![]
    };
    for c in &partitions {
        if file_schema.field_with_name(c).is_ok() {
            return Err(VolleyError::plan(format!(
                "partition folder key `{c}` is also a column inside the files of {path}"
            )));
        }
    }
    let options = options.with_table_partition_cols(
        partitions
            .iter()
            .map(|c| (c.clone(), DataType::Utf8))
            .collect(),
    );
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(plain_strings(&file_schema));
    let table = ListingTable::try_new(config).with_context(|| format!("reading {path}"))?;
    Ok(Arc::new(table))
}

/// Makes a table of the files a query names in quotes (`FROM 'data/*.parquet'`), with
/// [`file_table`]; a name that does not look like a path (no `/`, `.` or `*`) is left
/// for the catalog to report as an unknown table.
#[derive(Debug)]
pub struct FileTableFactory {
    state: SessionState,
}

impl FileTableFactory {
    /// Tables read with `state`'s object stores and options.
    pub fn new(state: SessionState) -> Self {
        Self { state }
    }
}

#[async_trait]
impl UrlTableFactory for FileTableFactory {
    async fn try_new(
        &self,
        url: &str,
    ) -> datafusion::common::Result<Option<Arc<dyn TableProvider>>> {
        if !url.contains(['/', '.', '*']) {
            return Ok(None);
        }
        Ok(Some(file_table(&self.state, url).await?))
    }
}
