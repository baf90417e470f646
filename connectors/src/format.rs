//! The file formats volley reads through DataFusion's scans.

use std::sync::Arc;

use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::execution::context::SessionState;

/// Options for reading CSV.
#[derive(Debug, Clone)]
pub struct CsvReadOptions {
    /// The first line holds column names.
    pub has_header: bool,
    /// Field delimiter.
    pub delimiter: u8,
    /// Quote character.
    pub quote: u8,
    /// Rows read to infer column types.
    pub schema_infer_max_records: usize,
}

impl Default for CsvReadOptions {
    fn default() -> Self {
        Self {
            has_header: true,
            delimiter: b',',
            quote: b'"',
            schema_infer_max_records: 1000,
        }
    }
}

/// A format read by a [`FileScan`](crate::FileScan).
#[derive(Debug, Clone)]
pub enum FileFormatKind {
    /// Apache Parquet.
    Parquet,
    /// Comma-separated (or other delimiter) values.
    Csv(CsvReadOptions),
    /// Newline-delimited JSON.
    Json,
    /// Arrow IPC files.
    Ipc,
}

impl FileFormatKind {
    /// The operator name: `ReadParquet`, `ReadCsv`, ...
    pub fn operator_name(&self) -> &'static str {
        match self {
            FileFormatKind::Parquet => "ReadParquet",
            FileFormatKind::Csv(_) => "ReadCsv",
            FileFormatKind::Json => "ReadJson",
            FileFormatKind::Ipc => "ReadIpc",
        }
    }

    /// Whether the format is binary (Parquet, Arrow IPC): an empty file of it is corrupt,
    /// where an empty text file simply holds no rows.
    pub fn is_binary(&self) -> bool {
        matches!(self, FileFormatKind::Parquet | FileFormatKind::Ipc)
    }

    /// Whether one file can be read by several tasks (Parquet, by row groups).
    pub fn splittable(&self) -> bool {
        matches!(self, FileFormatKind::Parquet)
    }

    /// DataFusion's format for files at `path` (compression from the extension).
    pub(crate) fn to_datafusion(&self, state: &SessionState, path: &str) -> Arc<dyn FileFormat> {
        let compression = compression_of(path);
        match self {
            FileFormatKind::Parquet => {
                Arc::new(ParquetFormat::new().with_options(state.table_options().parquet.clone()))
            }
            FileFormatKind::Csv(o) => Arc::new(
                CsvFormat::default()
                    .with_has_header(o.has_header)
                    .with_delimiter(o.delimiter)
                    .with_quote(o.quote)
                    .with_schema_infer_max_rec(o.schema_infer_max_records)
                    .with_file_compression_type(compression),
            ),
            FileFormatKind::Json => {
                Arc::new(JsonFormat::default().with_file_compression_type(compression))
            }
            FileFormatKind::Ipc => Arc::new(ArrowFormat),
        }
    }
}

/// Compression of a text file from its extension.
pub(crate) fn compression_of(path: &str) -> FileCompressionType {
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".gz") {
        FileCompressionType::GZIP
    } else if lower.ends_with(".zst") {
        FileCompressionType::ZSTD
    } else if lower.ends_with(".bz2") {
        FileCompressionType::BZIP2
    } else if lower.ends_with(".xz") {
        FileCompressionType::XZ
    } else {
        FileCompressionType::UNCOMPRESSED
    }
}
