//! Files as DataFusion tables, for SQL: `--table NAME=PATH`, `register_files` and the
//! paths a query names in quotes (`FROM 'data/*.parquet'`).
//!
//! DataFusion's own listing tables read the files' schemas together, so an error (a
//! corrupt footer, an empty file, two files whose columns clash) does not say which
//! file it came from. These tables are listing tables too, but their files are listed
//! and their schemas read one file at a time first, the way [`FileScan`](crate::FileScan)
//! does for the Dataset API, so every such error names its file; and their scans name
//! the file of any error met while reading ([`name_file_errors`](crate::name_file_errors)).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, UrlTableFactory};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{Constraints, Statistics};
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::options::{
    ArrowReadOptions, CsvReadOptions, JsonReadOptions, ParquetReadOptions, ReadOptions,
};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::TableType;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path;
use object_store::ObjectMeta;
use volley_common::{Result, ResultExt, VolleyError};

use crate::format::compression_of;
use crate::listing::{
    file_scan_config, filter_null_partitions, infer_schemas, list_files, partition_columns,
    plain_strings, scan_null_partitions, PartitionFolders,
};

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
    let glob = crate::is_glob(path);
    let named_file = !lower.contains("://") && !glob && std::path::Path::new(path).is_file();
    // The extension files must end in: any, for a file named on its own, or for a glob
    // that names the extension (`*.CSV`: the glob matches its case, the filter would
    // not).
    let filter = |e: &str| {
        if named_file || (glob && !ext.is_empty()) {
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
                // Quoted values may hold line breaks: no file is read from a byte
                // range that could start inside one.
                newlines_in_values: true,
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
    let (file_schema, each_file) = infer_schemas(state, &options.format, binary, &files).await?;
    let PartitionFolders {
        keys: partitions,
        nulls,
    } = partition_columns(std::slice::from_ref(&url), &[path.to_string()], &files)?;
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
    let config = ListingTableConfig::new(url.clone())
        .with_listing_options(options.clone())
        .with_schema(plain_strings(&file_schema));
    let table = ListingTable::try_new(config).with_context(|| format!("reading {path}"))?;
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(file_schema);
    let views = ListingTable::try_new(config).with_context(|| format!("reading {path}"))?;
    let table = decode_plain_strings(table, Arc::new(views), each_file);
    Ok(NullPartitionTable::wrap(table, nulls))
}

/// A file table some partition folders of which hold a null value
/// (`key=__HIVE_DEFAULT_PARTITION__`, see [`PartitionFolders`]): those columns read
/// through [`null_partition`], as nullable columns.
///
/// Filters reading them are rewritten the same way to prune folders, and are
/// `Inexact`: DataFusion prunes a folder where a filter's value bit is false, whatever
/// its null bit says, and `nullif` leaves the folder's name under its null, so a
/// filter such as `k <> 'a'` keeps the null folder; the filter above the scan drops
/// its rows.
#[derive(Debug)]
pub(crate) struct NullPartitionTable {
    inner: Arc<dyn TableProvider>,
    nulls: Vec<String>,
    schema: SchemaRef,
}

impl NullPartitionTable {
    /// `inner` itself where no column has a null folder.
    pub(crate) fn wrap(
        inner: Arc<dyn TableProvider>,
        nulls: Vec<String>,
    ) -> Arc<dyn TableProvider> {
        if nulls.is_empty() {
            return inner;
        }
        let schema = inner.schema();
        let fields: Vec<_> = schema
            .fields()
            .iter()
            .map(|f| {
                if nulls.contains(f.name()) {
                    Arc::new(f.as_ref().clone().with_nullable(true))
                } else {
                    Arc::clone(f)
                }
            })
            .collect();
        let schema = Arc::new(arrow::datatypes::Schema::new_with_metadata(
            fields,
            schema.metadata().clone(),
        ));
        Arc::new(Self {
            inner,
            nulls,
            schema,
        })
    }

    fn reads_null_column(&self, filter: &Expr) -> bool {
        filter
            .column_refs()
            .iter()
            .any(|c| self.nulls.contains(&c.name))
    }
}

#[async_trait::async_trait]
impl TableProvider for NullPartitionTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.inner.constraints()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let filters = filters
            .iter()
            .map(|f| filter_null_partitions(f.clone(), &self.nulls))
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let plan = self.inner.scan(state, projection, &filters, limit).await?;
        scan_null_partitions(plan, &self.nulls)
            .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        let mut pushed = self.inner.supports_filters_pushdown(filters)?;
        for (p, f) in pushed.iter_mut().zip(filters) {
            if self.reads_null_column(f) && *p == TableProviderFilterPushDown::Exact {
                *p = TableProviderFilterPushDown::Inexact;
            }
        }
        Ok(pushed)
    }

    fn statistics(&self) -> Option<Statistics> {
        self.inner.statistics()
    }

    async fn insert_into(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.inner.insert_into(state, input, insert_op).await
    }
}

/// `table` (whose schema has plain strings where its files hint view strings, see
/// [`plain_strings`]), with each Parquet file of `each_file` (as listed, with its own
/// schema) decoded straight into the table's plain strings. `views` is the same files
/// read by their hint, which [`view_strings_table`] hands out.
pub(crate) fn decode_plain_strings(
    table: ListingTable,
    views: Arc<ListingTable>,
    each_file: Vec<(ObjectMeta, SchemaRef)>,
) -> Arc<dyn TableProvider> {
    if !table.options().format.is::<ParquetFormat>() {
        return Arc::new(table);
    }
    let plain: HashMap<Path, (ObjectMeta, SchemaRef)> = each_file
        .into_iter()
        .filter_map(|(meta, schema)| {
            let plain = plain_strings(&schema);
            // The same schema back: no view strings in this file.
            (!Arc::ptr_eq(&schema, &plain)).then(|| (meta.location.clone(), (meta, plain)))
        })
        .collect();
    if plain.is_empty() {
        return Arc::new(table);
    }
    Arc::new(PlainStringFiles {
        inner: Arc::new(table),
        files: plain,
        views,
    })
}

/// The files of `table` with their strings read as the views their files hint, where
/// `table` reads them as plain strings ([`plain_strings`]); `None` for any other
/// table.
///
/// Views cost no copy where the file's pages are dictionary-encoded (each view points
/// into the dictionary), and grouping, comparing and hashing short strings compares
/// their inline bytes. A plan may read them where no operator buffers the view arrays
/// themselves: an aggregation copies its groups' strings, and a filter whose output
/// is cast back to plain strings copies only the rows it keeps.
pub fn view_strings_table(table: &dyn TableProvider) -> Option<Arc<dyn TableProvider>> {
    if let Some(nulls) = table.downcast_ref::<NullPartitionTable>() {
        let views = view_strings_table(nulls.inner.as_ref())?;
        return Some(NullPartitionTable::wrap(views, nulls.nulls.clone()));
    }
    let plain = table.downcast_ref::<PlainStringFiles>()?;
    Some(Arc::clone(&plain.views) as Arc<dyn TableProvider>)
}

/// A Parquet table whose files carry an Arrow schema hint of view strings
/// (`Utf8View`), read as the table's plain strings by the Parquet decoder itself.
///
/// Without it, the decoder makes view arrays (as the hint says) and the scan then
/// casts them to the table's `Utf8`: two passes where one does, 6% of TPC-H Q01's time
/// and 13% of Q12's. Each file's scan is given the file's own schema with plain
/// strings, known from when the table was made; a file listed with another size,
/// modification time or tag (or not listed then) is read as before, by its hint.
#[derive(Debug)]
struct PlainStringFiles {
    inner: Arc<dyn TableProvider>,
    /// By location: the file as listed then, and its schema with plain strings.
    files: HashMap<Path, (ObjectMeta, SchemaRef)>,
    /// The same files read by their hint, with view strings.
    views: Arc<ListingTable>,
}

#[async_trait]
impl TableProvider for PlainStringFiles {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn constraints(&self) -> Option<&Constraints> {
        self.inner.constraints()
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        plan.transform_up(|node| {
            let Some(config) = file_scan_config(node.as_ref()) else {
                return Ok(Transformed::no(node));
            };
            let groups = config
                .file_groups
                .iter()
                .map(|group| {
                    let files = group
                        .iter()
                        .map(|f| match self.files.get(&f.object_meta.location) {
                            Some((listed, schema))
                                if listed.size == f.object_meta.size
                                    && listed.last_modified == f.object_meta.last_modified
                                    && listed.e_tag == f.object_meta.e_tag =>
                            {
                                f.clone().with_arrow_schema(Arc::clone(schema))
                            }
                            _ => f.clone(),
                        })
                        .collect();
                    let plain = FileGroup::new(files);
                    match group.file_statistics(None) {
                        Some(stats) => plain.with_statistics(Arc::new(stats.clone())),
                        None => plain,
                    }
                })
                .collect();
            let config = FileScanConfigBuilder::from(config.clone())
                .with_file_groups(groups)
                .build();
            Ok(Transformed::yes(
                DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
            ))
        })
        .data()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    fn statistics(&self) -> Option<Statistics> {
        self.inner.statistics()
    }

    async fn insert_into(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        self.inner.insert_into(state, input, insert_op).await
    }
}

/// Makes a table of the files a query names in quotes (`FROM 'data/*.parquet'`), with
/// [`file_table`]; a name that does not look like a path (no `/`, `.` or `*`) is left
/// for the catalog to report as an unknown table.
pub struct FileTableFactory {
    state: SessionState,
    live: std::sync::OnceLock<Box<dyn Fn() -> Option<SessionState> + Send + Sync>>,
}

impl std::fmt::Debug for FileTableFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileTableFactory").finish_non_exhaustive()
    }
}

impl FileTableFactory {
    /// Tables read with `state`'s object stores and options.
    pub fn new(state: SessionState) -> Self {
        Self {
            state,
            live: std::sync::OnceLock::new(),
        }
    }

    /// Tables read with the session `live` returns at the time each table is made
    /// (with the options a `SET` before it gave), where it returns one; `state`
    /// otherwise. A factory is made before the session whose catalog holds it, so
    /// the session is given afterwards (weakly held by `live`: a session holding
    /// its factory holding it would never be freed). Only the first call counts.
    pub fn follow(&self, live: impl Fn() -> Option<SessionState> + Send + Sync + 'static) {
        let _ = self.live.set(Box::new(live));
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
        match self.live.get().and_then(|live| live()) {
            Some(state) => Ok(Some(file_table(&state, url).await?)),
            None => Ok(Some(file_table(&self.state, url).await?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringViewArray};
    use datafusion::execution::context::SessionContext;
    use datafusion::physical_plan::collect;
    use parquet::arrow::ArrowWriter;

    /// A file of `n` rows whose strings are written as views (with the Arrow schema
    /// hint saying so, as DataFusion and `tpchgen-cli` write them).
    fn write_views(path: &std::path::Path, n: i64) {
        let s: StringViewArray = (0..n)
            .map(|i| Some(format!("value number {}", i % 7)))
            .collect();
        let batch = RecordBatch::try_from_iter([
            (
                "k",
                Arc::new(Int64Array::from_iter_values(0..n)) as ArrayRef,
            ),
            ("s", Arc::new(s) as ArrayRef),
        ])
        .unwrap();
        let mut w =
            ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// Two files of 1,000 and 500 rows written with view strings; the folder's path.
    fn view_files() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("t")).unwrap();
        write_views(&dir.path().join("t/a.parquet"), 1000);
        write_views(&dir.path().join("t/b.parquet"), 500);
        let path = format!("{}/t/", dir.path().display());
        (dir, path)
    }

    /// The batches hold the 1,500 rows of `view_files` with plain strings.
    fn assert_plain_rows(batches: &[RecordBatch]) {
        let mut rows = 0;
        for b in batches {
            let s = b
                .column(1)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .expect("plain strings");
            let k = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                assert_eq!(s.value(i), format!("value number {}", k.value(i) % 7));
            }
            rows += b.num_rows();
        }
        assert_eq!(rows, 1500);
    }

    #[test]
    fn view_strings_are_decoded_as_the_tables_plain_strings() {
        let (_dir, path) = view_files();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctx = SessionContext::new();
        let state = ctx.state();
        let table = rt.block_on(file_table(&state, &path)).unwrap();
        assert_eq!(table.schema().field(1).data_type(), &DataType::Utf8);
        let plan = rt.block_on(table.scan(&state, None, &[], None)).unwrap();
        // Each file's scan is given its schema with plain strings.
        let config = file_scan_config(plan.as_ref()).expect("a file scan");
        let files: Vec<_> = config.file_groups.iter().flat_map(|g| g.iter()).collect();
        assert_eq!(files.len(), 2);
        for f in files {
            let schema = f.arrow_schema.as_ref().expect("a schema for the file");
            assert_eq!(schema.field(1).data_type(), &DataType::Utf8);
        }
        let batches = rt.block_on(collect(plan, ctx.task_ctx())).unwrap();
        assert_plain_rows(&batches);
    }

    /// Sorts, aggregations and joins of the Dataset API scan the files through the
    /// scan's relational plan: its strings come out of the decoder plain, with no cast
    /// after it, and its streaming reads keep the files' view strings.
    #[test]
    fn a_dataset_scans_relational_plan_decodes_plain_strings() {
        use crate::source::DataSource;
        let (_dir, path) = view_files();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ctx = SessionContext::new();
        let state = ctx.state();
        let scan = rt
            .block_on(crate::FileScan::try_new(
                &state,
                crate::FileFormatKind::Parquet,
                &[path],
                64 << 20,
            ))
            .unwrap();
        assert_eq!(scan.schema().field(1).data_type(), &DataType::Utf8View);
        let logical = scan.logical_plan().expect("a relational plan");
        assert_eq!(
            logical.schema().field(1).data_type(),
            &DataType::Utf8,
            "{logical}"
        );
        let plan = rt.block_on(state.create_physical_plan(&logical)).unwrap();
        let shown = datafusion::physical_plan::displayable(plan.as_ref())
            .indent(true)
            .to_string();
        assert!(!shown.contains("CAST"), "no cast after decoding: {shown}");
        let batches = rt.block_on(collect(plan, ctx.task_ctx())).unwrap();
        assert_plain_rows(&batches);
    }
}
