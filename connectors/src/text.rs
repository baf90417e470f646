//! Text files (one row per line) and binary files (one row per file).

use std::io::Read;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::execution::context::SessionState;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use volley_common::{Result, ResultExt, VolleyError};

use crate::format::compression_of;
use crate::listing::{list_files, ListedFile};
use crate::source::{DataSource, ReadTask, ScanRequest};

/// The files, listed at creation.
type Files = Vec<ListedFile>;

async fn resolve(state: &SessionState, paths: &[String]) -> Result<Files> {
    if paths.is_empty() {
        return Err(VolleyError::plan("no paths given to read"));
    }
    let urls = paths
        .iter()
        .map(|p| crate::parse_path(p))
        .collect::<Result<Vec<_>>>()?;
    list_files(state, &urls, paths, "").await
}

fn project(schema: &SchemaRef, projection: &Option<Vec<usize>>) -> Result<SchemaRef> {
    Ok(match projection {
        Some(p) => Arc::new(schema.project(p)?),
        None => Arc::clone(schema),
    })
}

async fn fetch(
    store: &Arc<dyn ObjectStore>,
    meta: &ObjectMeta,
    name: &str,
) -> Result<bytes::Bytes> {
    let bytes = store
        .get(&meta.location)
        .await
        .with_context(|| format!("reading {name}"))?
        .bytes()
        .await
        .with_context(|| format!("reading {name}"))?;
    let compression = compression_of(name);
    if compression.is_compressed() {
        let mut out = Vec::new();
        compression
            .convert_read(bytes::Buf::reader(bytes))
            .and_then(|mut r| Ok(r.read_to_end(&mut out)?))
            .with_context(|| format!("decompressing {name}"))?;
        return Ok(out.into());
    }
    Ok(bytes)
}

/// Text files read as one row per line, in a column `text` (line ends removed; files
/// ending in `.gz`, `.zst`, `.bz2` or `.xz` are decompressed, as CSV and JSON files are).
#[derive(Debug)]
pub struct TextScan {
    paths: Vec<String>,
    files: Files,
    batch_size: usize,
}

impl TextScan {
    /// Lists `paths`; each task reads one file in batches of `batch_size` lines.
    pub async fn try_new(
        state: &SessionState,
        paths: &[String],
        batch_size: usize,
    ) -> Result<Self> {
        Ok(Self {
            paths: paths.to_vec(),
            files: resolve(state, paths).await?,
            batch_size: batch_size.max(1),
        })
    }

    fn full_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]))
    }
}

#[async_trait::async_trait]
impl DataSource for TextScan {
    fn name(&self) -> String {
        "ReadText".into()
    }
    fn schema(&self) -> SchemaRef {
        Self::full_schema()
    }
    fn describe(&self) -> String {
        format!("{} ({} files)", self.paths.join(", "), self.files.len())
    }
    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let out_schema = project(&Self::full_schema(), &request.projection)?;
        let batch_size = self.batch_size;
        Ok(self
            .files
            .iter()
            .map(|f| {
                let (store, meta, name) = (Arc::clone(&f.store), f.meta.clone(), f.name.clone());
                let schema = Arc::clone(&out_schema);
                ReadTask::new(name.clone(), meta.size, move |_ctx| {
                    let (store, meta, name, schema) = (
                        Arc::clone(&store),
                        meta.clone(),
                        name.clone(),
                        Arc::clone(&schema),
                    );
                    let out = Arc::clone(&schema);
                    let batches = futures::stream::once(async move {
                        let bytes = fetch(&store, &meta, &name).await?;
                        let text = std::str::from_utf8(&bytes).map_err(|e| {
                            VolleyError::execution(format!("{name} is not UTF-8 text: {e}"))
                        })?;
                        let lines: Vec<&str> = text.lines().collect();
                        let mut batches = Vec::new();
                        for chunk in lines.chunks(batch_size) {
                            let col: ArrayRef =
                                Arc::new(StringArray::from_iter_values(chunk.iter()));
                            let cols = if schema.fields().is_empty() {
                                vec![]
                            } else {
                                vec![col]
                            };
                            let opts = arrow::array::RecordBatchOptions::new()
                                .with_row_count(Some(chunk.len()));
                            batches.push(RecordBatch::try_new_with_options(
                                Arc::clone(&schema),
                                cols,
                                &opts,
                            )?);
                        }
                        Ok::<_, VolleyError>(futures::stream::iter(batches.into_iter().map(Ok)))
                    })
                    .map(|r| match r {
                        Ok(s) => s.left_stream(),
                        Err(e) => futures::stream::iter(vec![Err(e.into())]).right_stream(),
                    })
                    .flatten();
                    Ok(Box::pin(RecordBatchStreamAdapter::new(out, batches)))
                })
            })
            .collect())
    }
}

/// Whole files as rows: `path` (the file's path or URL) and `bytes` (its contents).
#[derive(Debug)]
pub struct BinaryScan {
    paths: Vec<String>,
    files: Files,
}

impl BinaryScan {
    /// Lists `paths`; each task reads one file.
    pub async fn try_new(state: &SessionState, paths: &[String]) -> Result<Self> {
        Ok(Self {
            paths: paths.to_vec(),
            files: resolve(state, paths).await?,
        })
    }

    fn full_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("path", DataType::Utf8, false),
            Field::new("bytes", DataType::Binary, false),
        ]))
    }
}

#[async_trait::async_trait]
impl DataSource for BinaryScan {
    fn name(&self) -> String {
        "ReadBinaryFiles".into()
    }
    fn schema(&self) -> SchemaRef {
        Self::full_schema()
    }
    fn describe(&self) -> String {
        format!("{} ({} files)", self.paths.join(", "), self.files.len())
    }
    async fn plan(&self, _state: &SessionState, request: &ScanRequest) -> Result<Vec<ReadTask>> {
        let projection = request.projection.clone();
        let out_schema = project(&Self::full_schema(), &projection)?;
        Ok(self
            .files
            .iter()
            .map(|f| {
                let (store, meta, name) = (Arc::clone(&f.store), f.meta.clone(), f.name.clone());
                let schema = Arc::clone(&out_schema);
                let projection = projection.clone();
                ReadTask::new(name.clone(), meta.size, move |_ctx| {
                    let (store, meta, name, schema, projection) = (
                        Arc::clone(&store),
                        meta.clone(),
                        name.clone(),
                        Arc::clone(&schema),
                        projection.clone(),
                    );
                    let out = Arc::clone(&schema);
                    let batch = futures::stream::once(async move {
                        let bytes = store
                            .get(&meta.location)
                            .await
                            .with_context(|| format!("reading {name}"))?
                            .bytes()
                            .await
                            .with_context(|| format!("reading {name}"))?;
                        let full: Vec<ArrayRef> = vec![
                            Arc::new(StringArray::from(vec![name])),
                            Arc::new(BinaryArray::from(vec![bytes.as_ref()])),
                        ];
                        let cols = match &projection {
                            Some(p) => p.iter().map(|&i| Arc::clone(&full[i])).collect(),
                            None => full,
                        };
                        let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(1));
                        Ok(RecordBatch::try_new_with_options(schema, cols, &opts)?)
                    })
                    .map(|r: Result<RecordBatch>| r.map_err(Into::into));
                    Ok(Box::pin(RecordBatchStreamAdapter::new(out, batch)))
                })
            })
            .collect())
    }
}
