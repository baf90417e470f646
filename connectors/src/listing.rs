//! Parquet, CSV, NDJSON and Arrow IPC scans, on DataFusion's listing tables.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::common::DFSchema;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{cast, col, LogicalPlanBuilder};
use datafusion::optimizer::simplify_expressions::{ExprSimplifier, SimplifyContext};
use datafusion::physical_plan::ExecutionPlan;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::ObjectMeta;
use volley_common::{Result, ResultExt, VolleyError};

use crate::format::FileFormatKind;
use crate::lines::CsvDialect;
use crate::scan_listings::KeptListing;
use crate::source::{DataSource, ReadTask, ScanRequest};
use crate::table::{decode_plain_strings, NullPartitionTable};

/// A scan of Parquet, CSV, NDJSON or Arrow IPC files: a file, a folder, a glob or a
/// list of them, local or in an object store.
///
/// Created by [`FileScan::try_new`], which lists the files and reads their schemas
/// (failing with the path of any file that is missing, unreadable or incompatible with
/// the others). Hive-style `key=value/` folders become string columns after the file
/// columns.
#[derive(Debug)]
pub struct FileScan {
    format: FileFormatKind,
    paths: Vec<String>,
    num_files: usize,
    total_bytes: u64,
    schema: SchemaRef,
    table: Arc<ListingTable>,
    /// The table relational operators scan where the files hold view strings: the
    /// same files, decoded into plain strings.
    relational: Option<Arc<dyn TableProvider>>,
    split_bytes: u64,
    /// The files listed at creation: scans read these and no others.
    listed: std::collections::HashSet<object_store::path::Path>,
    /// The same files as the listing of the file tables' paths (see `scan_listings`).
    _kept: Arc<KeptListing>,
    /// Partition columns some folder of which holds a null value (see
    /// [`PartitionFolders`]).
    null_partitions: Vec<String>,
}

/// Files whose name (or a folder under the listed path) starts with `.` or `_` are
/// bookkeeping (`_SUCCESS`, `.crc`, staging folders), not data.
fn is_hidden(url: &ListingTableUrl, meta: &ObjectMeta) -> bool {
    match url.strip_prefix(&meta.location) {
        Some(mut parts) => parts.any(|p| p.starts_with('.') || p.starts_with('_')),
        None => false,
    }
}

impl FileScan {
    /// Lists `paths` and reads the files' schemas.
    ///
    /// `split_bytes` is the target size of one read task for splittable formats.
    pub async fn try_new(
        state: &SessionState,
        format: FileFormatKind,
        paths: &[String],
        split_bytes: u64,
    ) -> Result<Self> {
        if paths.is_empty() {
            return Err(VolleyError::plan("no paths given to read"));
        }
        let urls = paths
            .iter()
            .map(|p| crate::parse_path(p))
            .collect::<Result<Vec<_>>>()?;
        // One table reads one store (DataFusion's listing reads every path from the
        // first path's store).
        let store = urls[0].object_store();
        if let Some((other, u)) = paths
            .iter()
            .zip(&urls)
            .find(|(_, u)| u.object_store() != store)
        {
            return Err(VolleyError::plan(format!(
                "{} and {other} are on different stores ({} and {}): read each on its own \
                 and union them",
                paths[0],
                store.as_str(),
                u.object_store().as_str()
            )));
        }

        let files = list_files(state, &urls, paths, "").await?;
        // The file tables below find these files as their paths' listing.
        let kept = KeptListing::new();
        // (A path that names a folder without a trailing `/` is listed too, once no
        // object of its name is found; one that names a file is not listed.)
        let names: std::collections::HashSet<&object_store::path::Path> =
            files.iter().map(|f| &f.meta.location).collect();
        for url in &urls {
            if !url.is_collection() && names.contains(url.prefix()) {
                continue;
            }
            let under: Vec<ObjectMeta> = files
                .iter()
                .filter(|f| url.strip_prefix(&f.meta.location).is_some())
                .map(|f| f.meta.clone())
                .collect();
            kept.keep(url.prefix(), under);
        }
        let urls: Vec<ListingTableUrl> = urls
            .into_iter()
            .map(|u| u.with_table_ref(kept.table().clone()))
            .collect();
        // Compression (of text formats) follows the files' extension, one for all files.
        if !format.is_binary() {
            let first = &files[0].meta.location;
            let codec = crate::format::compression_of(first.as_ref());
            if let Some(other) = files
                .iter()
                .find(|f| crate::format::compression_of(f.meta.location.as_ref()) != codec)
            {
                return Err(VolleyError::plan(format!(
                    "{} mixes compressed and uncompressed (or differently compressed) files: \
                     {first} and {}; read each kind on its own and union them",
                    paths.join(", "),
                    other.meta.location
                )));
            }
        }
        let df_format = format.to_datafusion(state, files[0].meta.location.as_ref());
        let (file_schema, each_file) =
            infer_schemas(state, &df_format, format.is_binary(), &files).await?;

        let mut options = ListingOptions::new(Arc::clone(&df_format)).with_file_extension("");
        let PartitionFolders {
            keys: partition_cols,
            nulls: null_partitions,
        } = partition_columns(&urls, paths, &files)?;
        options = options.with_table_partition_cols(
            partition_cols
                .iter()
                .map(|c| (c.clone(), DataType::Utf8))
                .collect(),
        );
        let mut fields: Vec<Field> = file_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for c in &partition_cols {
            if file_schema.field_with_name(c).is_ok() {
                return Err(VolleyError::plan(format!(
                    "partition folder key `{c}` is also a column inside the files of {}",
                    paths[0]
                )));
            }
            fields.push(Field::new(c, DataType::Utf8, true));
        }
        // Operators that buffer (sort, aggregation, join) read plain strings: see
        // `plain_strings`. Over Parquet they scan a table of their own, whose files
        // decode straight into plain strings (a cast after decoding copies every string
        // once more).
        // Only Parquet's decoder makes plain strings of view-hinted files; other formats
        // are cast after the scan (`logical_plan`).
        let plain = plain_strings(&file_schema);
        let config = ListingTableConfig::new_with_multi_paths(urls.clone())
            .with_listing_options(options.clone())
            .with_schema(Arc::clone(&file_schema));
        let table = Arc::new(ListingTable::try_new(config)?);
        let relational =
            if Arc::ptr_eq(&plain, &file_schema) || !matches!(format, FileFormatKind::Parquet) {
                None
            } else {
                let config = ListingTableConfig::new_with_multi_paths(urls)
                    .with_listing_options(options)
                    .with_schema(plain);
                Some(decode_plain_strings(
                    ListingTable::try_new(config)?,
                    Arc::clone(&table),
                    each_file,
                ))
            };
        Ok(Self {
            relational,
            listed: files.iter().map(|f| f.meta.location.clone()).collect(),
            _kept: Arc::new(kept),
            num_files: files.len(),
            total_bytes: files.iter().map(|f| f.meta.size).sum(),
            format,
            paths: paths.to_vec(),
            schema: Arc::new(Schema::new(fields)),
            table,
            split_bytes,
            null_partitions,
        })
    }

    /// The number of files listed.
    pub fn num_files(&self) -> usize {
        self.num_files
    }

    /// Bytes of all files listed.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Replaces the scan's file groups with one split per task: every task reads one
    /// file, or one byte range of a splittable file (Parquet assigns a row group to the
    /// range holding its midpoint).
    fn split(&self, config: &FileScanConfig) -> Vec<FileGroup> {
        let mut groups = Vec::new();
        for group in &config.file_groups {
            for file in group.iter() {
                if !self.listed.contains(&file.object_meta.location) {
                    continue;
                }
                let size = file.object_meta.size;
                if self.format.splittable() && size > self.split_bytes && file.range.is_none() {
                    let n = size.div_ceil(self.split_bytes);
                    let step = size.div_ceil(n);
                    let mut start = 0u64;
                    while start < size {
                        let end = (start + step).min(size);
                        let part = file.clone().with_range(start as i64, end as i64);
                        groups.push(FileGroup::new(vec![part]));
                        start = end;
                    }
                } else {
                    groups.push(FileGroup::new(vec![file.clone()]));
                }
            }
        }
        groups
    }
}

/// A listed file: the store that holds it, its metadata, and its name as the user
/// knows it (`/data/a.parquet`, `s3://bucket/a.parquet`).
#[derive(Debug, Clone)]
pub(crate) struct ListedFile {
    pub store: Arc<dyn object_store::ObjectStore>,
    pub meta: ObjectMeta,
    pub name: String,
    /// Which of the paths listed found it.
    pub path: usize,
}

/// `e`, or where it is an NDJSON record that did not parse while inferring the schema
/// of the local file `name`, the same with the record's line in the file.
fn json_inference_line(
    e: datafusion::error::DataFusionError,
    name: &str,
) -> datafusion::error::DataFusionError {
    use arrow::error::ArrowError;
    use datafusion::error::DataFusionError;
    let renumbered = match e.find_root() {
        DataFusionError::ArrowError(a, _) => match a.as_ref() {
            ArrowError::JsonError(m) if std::path::Path::new(name).is_file() => {
                crate::lines::renumber_json_inference(std::path::Path::new(name), m)
            }
            _ => None,
        },
        _ => None,
    };
    match renumbered {
        Some(m) => DataFusionError::ArrowError(Box::new(ArrowError::JsonError(m)), None),
        None => e,
    }
}

/// The name of `location` in the store at `store` as the user would write it: a local
/// path (`/data/a.parquet`) or a URL (`s3://bucket/a.parquet`).
pub(crate) fn display_location(
    store: &datafusion::execution::object_store::ObjectStoreUrl,
    location: &object_store::path::Path,
) -> String {
    let base = store.as_str();
    if base.starts_with("file://") {
        format!("/{location}")
    } else {
        format!("{}/{location}", base.trim_end_matches('/'))
    }
}

/// The Hive partition columns of `files` (as [`list_files`] lists `urls`, the paths
/// `paths`): the keys of the `key=value` folders each file sits in under its path,
/// which must be the same keys, in the same order, for every file.
///
/// Every file is looked at: a file in other folders than the rest would otherwise be
/// left out of the scan without a word (its folders do not parse as the table's
/// partitions), and DataFusion's own inference reads only the first ten files of the
/// first path. A path that names a file, or an object-store folder without a trailing
/// `/`, has no partition folders.
pub(crate) fn partition_columns(
    urls: &[ListingTableUrl],
    paths: &[String],
    files: &[ListedFile],
) -> Result<PartitionFolders> {
    let mut first: Option<(Vec<String>, &ListedFile)> = None;
    let mut nulls: Vec<String> = Vec::new();
    for file in files {
        let (url, path) = (&urls[file.path], &paths[file.path]);
        let keys = if url.is_collection() {
            partition_keys(url, path, file, &mut nulls)?
        } else {
            vec![]
        };
        match &first {
            None => first = Some((keys, file)),
            Some((expected, other)) if *expected != keys => {
                let show = |k: &[String]| {
                    if k.is_empty() {
                        "no partition folders".to_string()
                    } else {
                        format!("partition folders {}", k.join("/"))
                    }
                };
                return Err(VolleyError::plan(format!(
                    "the files read are in different partition folders: {} is under {} \
                     but {} is under {}; every file must be under the same `key=value` \
                     folders (read each layout on its own)",
                    other.name,
                    show(expected),
                    file.name,
                    show(&keys)
                )));
            }
            Some(_) => {}
        }
    }
    Ok(PartitionFolders {
        keys: first.map(|(keys, _)| keys).unwrap_or_default(),
        nulls,
    })
}

/// The partition columns of a listing: the keys of its `key=value` folders, and those
/// of them some folder of which holds a null value.
///
/// Writes name a null (or empty) value's folder `key=__HIVE_DEFAULT_PARTITION__`, as
/// Hive and Spark do (DataFusion's own writes name it `key=`); DataFusion reads the
/// folder name as the value. Reads turn it back into null: the column reads as
/// `nullif(nullif(key, '__HIVE_DEFAULT_PARTITION__'), '')` ([`null_partition`]), in
/// filters that prune folders as in the rows read.
pub(crate) struct PartitionFolders {
    pub keys: Vec<String>,
    pub nulls: Vec<String>,
}

/// The partition column `name` read with its null folder as null.
pub(crate) fn null_partition(name: &str) -> datafusion::logical_expr::Expr {
    use datafusion::functions::expr_fn::nullif;
    use datafusion::logical_expr::lit;
    // `key=` too: DataFusion's own writes (SQL INSERT into a partitioned table) name
    // a null value's folder so; volley's writes take an empty value for null, as Hive.
    nullif(
        nullif(
            col(datafusion::common::Column::new_unqualified(name)),
            lit(crate::NULL_PARTITION),
        ),
        lit(""),
    )
}

/// `filter` reading the partition columns `nulls` through [`null_partition`]: as
/// DataFusion prunes folders by it, a null folder is found by `IS NULL`, and not by its
/// name.
pub(crate) fn filter_null_partitions(
    filter: datafusion::logical_expr::Expr,
    nulls: &[String],
) -> datafusion::common::Result<datafusion::logical_expr::Expr> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::logical_expr::Expr;
    if nulls.is_empty() {
        return Ok(filter);
    }
    filter
        .transform(|e| match e {
            Expr::Column(c) if c.relation.is_none() && nulls.contains(&c.name) => {
                Ok(Transformed::yes(null_partition(&c.name)))
            }
            e => Ok(Transformed::no(e)),
        })
        .map(|t| t.data)
}

/// `plan` (a file scan) with the partition columns `nulls` it reads passed through
/// [`null_partition`].
pub(crate) fn scan_null_partitions(
    plan: Arc<dyn ExecutionPlan>,
    nulls: &[String],
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::execution::context::ExecutionProps;
    use datafusion::physical_expr::create_physical_expr;
    use datafusion::physical_expr::projection::ProjectionExpr;
    use datafusion::physical_plan::projection::ProjectionExec;
    let schema = plan.schema();
    if !schema.fields().iter().any(|f| nulls.contains(f.name())) {
        return Ok(plan);
    }
    let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
    let props = ExecutionProps::new();
    let exprs = schema
        .fields()
        .iter()
        .map(|f| {
            let e = if nulls.contains(f.name()) {
                null_partition(f.name())
            } else {
                col(datafusion::common::Column::new_unqualified(f.name()))
            };
            let e = create_physical_expr(&e, &df_schema, &props, &Default::default())?;
            Ok(ProjectionExpr::new(e, f.name().clone()))
        })
        .collect::<datafusion::common::Result<Vec<_>>>()?;
    Ok(Arc::new(ProjectionExec::try_new(exprs, plan)?))
}

/// The keys of the `key=value` folders `file` sits in under `url` (the path `path`),
/// outermost first. They must be the first folders under the path, each key once.
/// Adds to `nulls` the keys whose folder holds a null value.
fn partition_keys(
    url: &ListingTableUrl,
    path: &str,
    file: &ListedFile,
    nulls: &mut Vec<String>,
) -> Result<Vec<String>> {
    let Some(parts) = url.strip_prefix(&file.meta.location) else {
        return Ok(vec![]);
    };
    let mut folders: Vec<&str> = parts.collect();
    folders.pop(); // the file's own name
    let mut keys: Vec<String> = Vec::new();
    let mut plain: Option<&str> = None;
    for folder in folders {
        match (folder.split_once('='), plain) {
            (Some((key, value)), None) => {
                let null = value == crate::NULL_PARTITION || value.is_empty();
                if null && !nulls.iter().any(|k| k == key) {
                    nulls.push(key.to_string());
                }
                if keys.iter().any(|k| k == key) {
                    return Err(VolleyError::plan(format!(
                        "{}: partition key `{key}` names two of its folders under {path}",
                        file.name
                    )));
                }
                keys.push(key.to_string());
            }
            (Some(_), Some(plain)) => {
                return Err(VolleyError::plan(format!(
                    "{}: partition folder `{folder}` is inside folder `{plain}`, which is \
                     not a `key=value` one; partition folders must be the first folders \
                     under {path} (read from the folder above `{folder}` instead)",
                    file.name
                )));
            }
            (None, _) => plain = plain.or(Some(folder)),
        }
    }
    Ok(keys)
}

/// Lists every path (each must name at least one file whose name ends in `extension`),
/// leaving out bookkeeping files.
pub(crate) async fn list_files(
    state: &SessionState,
    urls: &[ListingTableUrl],
    paths: &[String],
    extension: &str,
) -> Result<Vec<ListedFile>> {
    let mut files = Vec::new();
    for (i, (url, path)) in urls.iter().zip(paths).enumerate() {
        let store = state
            .runtime_env()
            .object_store(url)
            .with_context(|| format!("opening {path}"))?;
        let listed: Vec<ObjectMeta> = url
            .list_all_files(state, store.as_ref(), extension)
            .await
            .with_context(|| format!("listing {path}"))?
            .try_collect()
            .await
            .with_context(|| format!("listing {path}"))?;
        let mut listed: Vec<ObjectMeta> =
            listed.into_iter().filter(|m| !is_hidden(url, m)).collect();
        if listed.is_empty() {
            let what = if extension.is_empty() {
                String::new()
            } else {
                format!(" ending in `{extension}`")
            };
            return Err(VolleyError::plan(format!("no files{what} found at {path}")));
        }
        listed.sort_by(|a, b| a.location.cmp(&b.location));
        let base = url.object_store();
        files.extend(listed.into_iter().map(|meta| ListedFile {
            store: Arc::clone(&store),
            name: display_location(&base, &meta.location),
            meta,
            path: i,
        }));
    }
    Ok(files)
}

/// The file scan `plan` is, if it is one: a `DataSourceExec` over a
/// `FileScanConfig` (the shape DataFusion plans for every file table).
pub fn file_scan_config(plan: &dyn ExecutionPlan) -> Option<&FileScanConfig> {
    plan.downcast_ref::<DataSourceExec>()?
        .data_source()
        .downcast_ref::<FileScanConfig>()
}

/// `schema` with string and binary view columns as plain `Utf8` / `Binary`.
///
/// Files written with an Arrow schema hint of `Utf8View` (DataFusion, `tpchgen-cli`)
/// decode into view arrays, which scans and filters handle fastest. But slices and
/// sorted copies of view arrays keep pointing into whole decoded pages: every batch
/// then reports (and spills, and holds) far more memory than its rows, which defeats
/// the memory budget of operators that buffer. Those (sorts, aggregations, joins, SQL
/// over files) read plain strings: a copy at decode time, and exact counts.
pub fn plain_strings(schema: &SchemaRef) -> SchemaRef {
    use arrow::datatypes::{DataType, Field};
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Utf8View | DataType::BinaryView))
    {
        return Arc::clone(schema);
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8View => f.as_ref().clone().with_data_type(DataType::Utf8),
            DataType::BinaryView => f.as_ref().clone().with_data_type(DataType::Binary),
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

/// `plan` (whose output is `schema`) with its view columns cast to the plain types of
/// [`plain_strings`], keeping their names; `plan` itself where it has none. For
/// sources that cannot decode plain strings directly.
pub fn cast_to_plain_strings(
    plan: LogicalPlanBuilder,
    schema: &SchemaRef,
) -> datafusion::common::Result<LogicalPlanBuilder> {
    let plain = plain_strings(schema);
    if Arc::ptr_eq(&plain, schema) {
        return Ok(plan);
    }
    let exprs = schema.fields().iter().zip(plain.fields()).map(|(f, p)| {
        let c = col(datafusion::common::Column::new_unqualified(f.name()));
        if f.data_type() == p.data_type() {
            c
        } else {
            cast(c, p.data_type().clone()).alias(f.name())
        }
    });
    plan.project(exprs)
}

/// Reads the schema of every file, each on its own so that an error names its file, and
/// merges them the way the format does (for CSV, the schemas of the files the
/// inference's record budget reaches); where they
/// cannot be merged, names the column, the two files and their types. Returns the
/// merged schema and each file's own, with the file as listed.
///
/// Empty text files hold no rows and no schema and are skipped; an empty file of a
/// binary format (`binary`: Parquet, Arrow IPC) is corrupt and is reported.
pub(crate) async fn infer_schemas(
    state: &SessionState,
    df_format: &Arc<dyn FileFormat>,
    binary: bool,
    files: &[ListedFile],
) -> Result<(SchemaRef, Vec<(ObjectMeta, SchemaRef)>)> {
    let readable: Vec<&ListedFile> = files.iter().filter(|f| f.meta.size > 0 || binary).collect();
    if readable.is_empty() {
        return Err(VolleyError::plan(format!(
            "all files are empty, no schema can be read: {}",
            files[0].name
        )));
    }
    // Every file's own schema, concurrently, each error naming its file.
    type Read = (String, ObjectMeta, SchemaRef, usize);
    let futs: Vec<futures::future::BoxFuture<'_, Result<Read>>> = readable
        .iter()
        .map(|f| {
            let (store, meta, df_format) =
                (Arc::clone(&f.store), f.meta.clone(), Arc::clone(df_format));
            let name = f.name.clone();
            async move {
                if meta.size == 0 {
                    return Err(VolleyError::plan(format!(
                        "reading the schema of {name}: the file is empty (0 bytes), \
                         not a valid {} file",
                        df_format.get_ext().trim_start_matches('.')
                    )));
                }
                let (schema, records) = match df_format.downcast_ref::<CsvFormat>() {
                    Some(csv) => csv_schema(state, csv, &store, &meta).await,
                    None => df_format
                        .infer_schema(state, &store, std::slice::from_ref(&meta))
                        .await
                        .map(|schema| (schema, 0)),
                }
                .map_err(|e| json_inference_line(e, &name))
                .with_context(|| format!("reading the schema of {name}"))?;
                // A JSON column null in every record looked at has no type yet: more
                // of the file may tell it (reading values into a column typed null
                // fails).
                let schema = match df_format.downcast_ref::<JsonFormat>() {
                    Some(json) if has_untyped(&schema) => JsonFormat::default()
                        .with_options(json.options().clone())
                        .with_schema_infer_max_rec(JSON_RETYPE_RECORDS)
                        .infer_schema(state, &store, std::slice::from_ref(&meta))
                        .await
                        .map_err(|e| json_inference_line(e, &name))
                        .with_context(|| format!("reading the schema of {name}"))?,
                    _ => schema,
                };
                Ok::<_, VolleyError>((name, meta, schema, records))
            }
            .boxed()
        })
        .collect();
    let read: Vec<Read> = futures::stream::iter(futs)
        .buffered(16)
        .try_collect()
        .await?;
    let mut schemas = Vec::with_capacity(read.len());
    let mut each = Vec::with_capacity(read.len());
    let mut records = Vec::with_capacity(read.len());
    for (name, meta, schema, n) in read {
        schemas.push((name, Arc::clone(&schema)));
        each.push((meta, schema));
        records.push(n);
    }
    if schemas.len() == 1 {
        return Ok((Arc::clone(&schemas[0].1), each));
    }
    if let Some(csv) = df_format.downcast_ref::<CsvFormat>() {
        // As DataFusion merges CSV files' schemas: those of the files, in order, whose
        // records the inference's budget reaches (the first file's alone when it holds
        // that many records), where they agree.
        let mut left = csv_max_records(csv);
        let mut reached = Vec::new();
        for ((_, schema), n) in schemas.iter().zip(&records) {
            reached.push(schema.as_ref().clone());
            left = left.saturating_sub(*n);
            if left == 0 {
                break;
            }
        }
        if let Ok(merged) = Schema::try_merge(reached) {
            return Ok((Arc::new(merged), each));
        }
        return Ok((merge_schemas(&schemas)?, each));
    }
    // The format's own merge first.
    let by_store: Vec<ObjectMeta> = readable.iter().map(|f| f.meta.clone()).collect();
    let same_store = readable
        .iter()
        .all(|f| Arc::ptr_eq(&f.store, &readable[0].store));
    if same_store {
        if let Ok(merged) = df_format
            .infer_schema(state, &readable[0].store, &by_store)
            .await
        {
            // A JSON column it leaves untyped takes the type the files' own schemas
            // (read further for it) give, where they agree; where they do not, the
            // files' schemas are merged as below, naming the clash. (Inside a list or
            // struct, its type stays as the merge left it.)
            if df_format.downcast_ref::<JsonFormat>().is_some() && has_untyped(&merged) {
                let mut fields = Vec::with_capacity(merged.fields().len());
                let mut agree = true;
                for f in merged.fields() {
                    if f.data_type() != &DataType::Null {
                        fields.push(f.as_ref().clone());
                        continue;
                    }
                    let mut typed = schemas.iter().filter_map(|(_, s)| {
                        s.field_with_name(f.name())
                            .ok()
                            .map(|t| t.data_type().clone())
                            .filter(|t| t != &DataType::Null)
                    });
                    let first = typed.next();
                    agree &= typed.all(|t| Some(&t) == first.as_ref());
                    let t = first.unwrap_or(DataType::Null);
                    fields.push(f.as_ref().clone().with_data_type(t));
                }
                if agree {
                    let merged = Schema::new_with_metadata(fields, merged.metadata().clone());
                    return Ok((Arc::new(merged), each));
                }
                return Ok((merge_schemas(&schemas)?, each));
            }
            return Ok((merged, each));
        }
    }
    Ok((merge_schemas(&schemas)?, each))
}

/// The schema of the CSV file `meta`, from its first records as `csv` infers them, and
/// how many records it read.
///
/// DataFusion reads them in chunks cut at line breaks outside quotes, but finds those
/// by scanning each chunk's bytes from both ends (object_store's `LineDelimiter`):
/// walking back from the end flips its in-quotes state over the wrong bytes, so a
/// chunk could end inside a quoted value holding a line break, and the record cut
/// there failed the whole read. Here the records are found with `csv-core`, as Arrow
/// parses them, and handed over as one piece.
async fn csv_schema(
    state: &SessionState,
    csv: &CsvFormat,
    store: &Arc<dyn object_store::ObjectStore>,
    meta: &ObjectMeta,
) -> datafusion::common::Result<(SchemaRef, usize)> {
    use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
    use datafusion::error::DataFusionError;
    use object_store::ObjectStoreExt;
    let options = csv.options();
    let max = csv_max_records(csv);
    let header = options
        .has_header
        .unwrap_or(state.config_options().catalog.has_header);
    let raw = store
        .get(&meta.location)
        .await?
        .into_stream()
        .map_err(|e| DataFusionError::ObjectStore(Box::new(e)))
        .boxed();
    let text = FileCompressionType::from(options.compression).convert_stream(raw)?;
    let head = CsvDialect::of(options)
        .first_records(text, max + usize::from(header), CSV_INFERENCE_BYTES)
        .await?
        .ok_or_else(|| {
            DataFusionError::Execution(format!(
                "{}: no CSV record ends in its first {} MiB (a quote left open?)",
                meta.location,
                CSV_INFERENCE_BYTES >> 20
            ))
        })?;
    let one = futures::stream::once(async { Ok(bytes::Bytes::from(head)) });
    let (schema, records) = csv.infer_schema_from_stream(state, max, one).await?;
    Ok((Arc::new(schema), records))
}

/// The most bytes of a CSV file its schema is inferred from.
const CSV_INFERENCE_BYTES: usize = 64 << 20;

/// Whether `schema` has a column of no type (null in every record inference read), at
/// its top or inside a list, struct or map.
fn has_untyped(schema: &Schema) -> bool {
    fn untyped(t: &DataType) -> bool {
        match t {
            DataType::Null => true,
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                untyped(f.data_type())
            }
            DataType::Map(f, _) => untyped(f.data_type()),
            DataType::Struct(fields) => fields.iter().any(|f| untyped(f.data_type())),
            _ => false,
        }
    }
    schema.fields().iter().any(|f| untyped(f.data_type()))
}

/// Records a JSON file's schema is read again from, when its first ones leave a column
/// untyped.
const JSON_RETYPE_RECORDS: usize = 100_000;

/// The records CSV schema inference reads at most.
fn csv_max_records(csv: &CsvFormat) -> usize {
    csv.options()
        .schema_infer_max_rec
        .unwrap_or(datafusion::datasource::file_format::DEFAULT_SCHEMA_INFER_MAX_RECORD)
}

/// The schemas of several files as one; where they clash, an error naming the column,
/// both files and both types.
fn merge_schemas(schemas: &[(String, SchemaRef)]) -> Result<SchemaRef> {
    let mut merged = schemas[0].1.as_ref().clone();
    for (i, (name, schema)) in schemas.iter().enumerate().skip(1) {
        merged = Schema::try_merge([merged, schema.as_ref().clone()])
            .map_err(|e| schema_clash(&schemas[..i], name, schema, e))?;
    }
    Ok(Arc::new(merged))
}

fn schema_clash(
    before: &[(String, SchemaRef)],
    name: &str,
    schema: &Schema,
    error: arrow::error::ArrowError,
) -> VolleyError {
    for field in schema.fields() {
        for (other, other_schema) in before {
            let Ok(theirs) = other_schema.field_with_name(field.name()) else {
                continue;
            };
            let alone = |f: &Field| Schema::new(vec![f.clone()]);
            if Schema::try_merge([alone(theirs), alone(field)]).is_err() {
                return VolleyError::plan(format!(
                    "the files' schemas clash: column `{}` is {} in {other} but {} in {name}",
                    field.name(),
                    theirs.data_type(),
                    field.data_type()
                ));
            }
        }
    }
    VolleyError::plan(format!(
        "file {name} does not match the schema of the files before it (first: {}): {error}",
        before[0].0
    ))
}

#[async_trait::async_trait]
impl DataSource for FileScan {
    fn name(&self) -> String {
        self.format.operator_name().to_string()
    }

    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} files, {})",
            self.paths.join(", "),
            self.num_files,
            volley_common::format_bytes(self.total_bytes)
        )
    }

    fn supports_filters(&self) -> bool {
        true
    }

    fn shippable(&self) -> bool {
        true
    }

    fn logical_plan(&self) -> Option<datafusion::logical_expr::LogicalPlan> {
        use datafusion::logical_expr::LogicalPlanBuilder;
        let source = |table: Arc<dyn TableProvider>| {
            LogicalPlanBuilder::scan(
                "files",
                datafusion::datasource::provider_as_source(table),
                None,
            )
        };
        let nulls = |table| NullPartitionTable::wrap(table, self.null_partitions.clone());
        if let Some(plain) = &self.relational {
            return source(nulls(Arc::clone(plain)))
                .and_then(|b| b.build())
                .ok();
        }
        // Files of other formats with view strings: cast after the scan.
        let scan = source(nulls(Arc::clone(&self.table) as Arc<dyn TableProvider>)).ok()?;
        cast_to_plain_strings(scan, &self.schema)
            .and_then(|b| b.build())
            .ok()
    }

    async fn plan(&self, state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        // Filters come uncoerced from the Dataset API (`l_shipdate <= '1998-09-02'` on a
        // date column); pruning needs them in the columns' types.
        let schema = Arc::new(DFSchema::try_from(self.table.schema().as_ref().clone())?);
        let simplifier = ExprSimplifier::new(
            SimplifyContext::builder()
                .with_schema(Arc::clone(&schema))
                .build(),
        );
        let filters = request
            .filters
            .iter()
            .map(|f| {
                let f = filter_null_partitions(f.clone(), &self.null_partitions)?;
                simplifier.simplify(simplifier.coerce(f, &schema)?)
            })
            .collect::<datafusion::common::Result<Vec<_>>>()?;
        let plan = self
            .table
            .scan(state, request.projection.as_ref(), &filters, request.limit)
            .await?;
        let Some(exec) = plan.downcast_ref::<DataSourceExec>() else {
            // No files survived pruning (an `EmptyExec`), or another plan shape:
            // one task per partition.
            return Ok(partition_tasks(plan, "empty scan", 0));
        };
        let Some(config) = exec.data_source().downcast_ref::<FileScanConfig>() else {
            return Ok(partition_tasks(Arc::clone(&plan), "scan", 0));
        };
        let groups = self.split(config);
        // Where nothing drops rows, each split's count is known from the footers.
        let rows = match self.format {
            FileFormatKind::Parquet if request.filters.is_empty() && request.limit.is_none() => {
                split_rows(state, config, &groups).await
            }
            _ => None,
        };
        let labels: Vec<(String, u64)> = groups
            .iter()
            .map(|g| {
                let f = &g.files()[0];
                let label = crate::named_scan::file_label(&config.object_store_url, f);
                let size = f
                    .range
                    .as_ref()
                    .map(|r| (r.end - r.start) as u64)
                    .unwrap_or(f.object_meta.size);
                (label, size)
            })
            .collect();
        // One plan per task (one file group each): a task then stands alone, and can be
        // shipped to a cluster worker as a serialized plan.
        Ok(labels
            .into_iter()
            .zip(groups)
            .enumerate()
            .map(|(i, ((label, size), group))| {
                let config = FileScanConfigBuilder::from(config.clone())
                    .with_file_groups(vec![group])
                    .build();
                let plan: Arc<dyn ExecutionPlan> = DataSourceExec::from_data_source(config);
                let plan = scan_null_partitions(plan, &self.null_partitions)?;
                let task = ReadTask::from_plan(label, size, plan);
                Ok(match &rows {
                    Some(rows) => task.with_rows(rows[i]),
                    None => task,
                })
            })
            .collect::<Result<Vec<_>>>()?)
    }
}

/// The rows each Parquet split (one file, or a byte range of one) yields when read
/// whole: its file's row groups that DataFusion's scan reads for that range (those
/// whose first page starts in it). Each file's footer is fetched once, without its
/// page index, into the session's metadata cache, where the scan finds it again.
/// `None` where a footer cannot be read: the scan then reports it, naming the file.
async fn split_rows(
    state: &SessionState,
    config: &FileScanConfig,
    groups: &[FileGroup],
) -> Option<Vec<u64>> {
    use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
    use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, RowGroupMetaData};
    let store = state
        .runtime_env()
        .object_store(&config.object_store_url)
        .ok()?;
    let cache = state.runtime_env().cache_manager.get_file_metadata_cache();
    // Each distinct file once, in the order of its first split.
    let mut at = std::collections::HashMap::new();
    let mut files: Vec<&ObjectMeta> = Vec::new();
    for group in groups {
        let [file] = group.files() else {
            return None;
        };
        at.entry(&file.object_meta.location).or_insert_with(|| {
            files.push(&file.object_meta);
            files.len() - 1
        });
    }
    let footers: Vec<futures::future::BoxFuture<'_, Option<Arc<ParquetMetaData>>>> = files
        .iter()
        .map(|&meta| {
            let (store, cache) = (Arc::clone(&store), Arc::clone(&cache));
            async move {
                DFParquetMetadata::new(store.as_ref(), meta)
                    .with_file_metadata_cache(Some(cache))
                    .with_page_index_policy(Some(PageIndexPolicy::Skip))
                    .fetch_metadata()
                    .await
                    .ok()
            }
            .boxed()
        })
        .collect();
    let footers: Vec<Arc<ParquetMetaData>> = futures::stream::iter(footers)
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Option<_>>()?;
    let counts = groups
        .iter()
        .map(|group| {
            let file = &group.files()[0];
            let footer = &footers[at[&file.object_meta.location]];
            let read = |rg: &&RowGroupMetaData| match (&file.range, rg.columns().first()) {
                (None, _) => true,
                (Some(range), Some(first)) => range.contains(
                    first
                        .dictionary_page_offset()
                        .unwrap_or_else(|| first.data_page_offset()),
                ),
                (Some(_), None) => false,
            };
            let rows = footer.row_groups().iter().filter(read);
            rows.map(|rg| rg.num_rows().max(0) as u64).sum::<u64>()
        })
        .collect();
    Some(counts)
}

/// One task per output partition of a DataFusion plan.
pub(crate) fn partition_tasks(
    plan: Arc<dyn ExecutionPlan>,
    label: &str,
    size: u64,
) -> Vec<ReadTask> {
    let n = plan.properties().partitioning.partition_count();
    (0..n)
        .map(|i| {
            let plan = Arc::clone(&plan);
            ReadTask::new(format!("{label} [{i}]"), size, move |ctx| {
                Ok(plan.execute(i, ctx)?)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::*;

    /// A file of `rows` rows in row groups of 7,000.
    fn write(path: &std::path::Path, rows: i64) {
        let ids = Int64Array::from_iter_values(0..rows);
        let names = StringArray::from_iter_values((0..rows).map(|i| format!("row {i}")));
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(ids) as arrow::array::ArrayRef),
            ("name", Arc::new(names) as arrow::array::ArrayRef),
        ])
        .unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(7_000))
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    /// Each split of a file read whole knows its rows: exactly what its scan yields,
    /// byte ranges included; a filter or a limit leaves them unknown.
    #[tokio::test]
    async fn parquet_splits_count_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("a.parquet"), 100_000);
        write(&dir.path().join("b.parquet"), 9_000);
        let state = SessionContext::new().state();
        let path = dir.path().to_str().unwrap().to_string();
        let scan = FileScan::try_new(&state, FileFormatKind::Parquet, &[path], 64 * 1024)
            .await
            .unwrap();
        let tasks = scan.plan(&state, &ScanRequest::default()).await.unwrap();
        assert!(tasks.len() > 3, "the large file is split: {tasks:?}");
        let mut total = 0;
        for task in &tasks {
            let batches: Vec<RecordBatch> = task
                .open(state.task_ctx())
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            let read: usize = batches.iter().map(RecordBatch::num_rows).sum();
            assert_eq!(task.rows(), Some(read as u64), "{}", task.label);
            total += read;
        }
        assert_eq!(total, 109_000);
        let filtered = ScanRequest {
            filters: vec![col("id").lt(lit(10i64))],
            ..ScanRequest::default()
        };
        let limited = ScanRequest {
            limit: Some(10),
            ..ScanRequest::default()
        };
        for request in [filtered, limited] {
            let tasks = scan.plan(&state, &request).await.unwrap();
            assert!(tasks.iter().all(|t| t.rows().is_none()), "{request:?}");
        }
    }
}
