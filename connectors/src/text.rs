//! Text files (one row per line) and binary files (one row per file).

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
                    let lines = Lines {
                        chunks: None,
                        store: Arc::clone(&store),
                        meta: meta.clone(),
                        name: name.clone(),
                        schema: Arc::clone(&schema),
                        batch_size,
                        pending: Vec::new(),
                        ends: Vec::new(),
                        scanned: 0,
                        line: 0,
                        done: false,
                    };
                    let batches = futures::stream::try_unfold(lines, |mut lines| async move {
                        let batch = lines.next_batch().await?;
                        Ok(batch.map(|b| (b, lines)))
                    })
                    .map(|r: Result<RecordBatch>| r.map_err(Into::into));
                    Ok(Box::pin(RecordBatchStreamAdapter::new(
                        Arc::clone(&schema),
                        batches,
                    )))
                })
            })
            .collect())
    }
}

/// Where a text file's bytes come from.
enum TextBytes {
    /// As the store sends them (an uncompressed file).
    Stream(futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>),
    /// Decompressed from the whole compressed file, a piece at a time: every member
    /// of a file of several (as pbzip2, pzstd, `cat a.gz b.gz` make them), which
    /// DataFusion's streaming decoders stop short of, but for gzip.
    Decoder(Box<dyn std::io::Read + Send>),
}

/// Decompressed bytes read at a time.
const TEXT_PIECE: usize = 1 << 20;

impl TextBytes {
    async fn open(store: Arc<dyn ObjectStore>, meta: ObjectMeta, name: &str) -> Result<Self> {
        let got = store
            .get(&meta.location)
            .await
            .with_context(|| format!("reading {name}"))?;
        let compression = compression_of(name);
        if !compression.is_compressed() {
            return Ok(Self::Stream(got.into_stream()));
        }
        let bytes = got
            .bytes()
            .await
            .with_context(|| format!("reading {name}"))?;
        let decoder = compression
            .convert_read(bytes::Buf::reader(bytes))
            .with_context(|| format!("decompressing {name}"))?;
        Ok(Self::Decoder(decoder))
    }

    /// Appends the next bytes to `into`; `false` at the end.
    async fn read_into(&mut self, name: &str, into: &mut Vec<u8>) -> Result<bool> {
        match self {
            Self::Stream(s) => match s.next().await {
                Some(chunk) => {
                    into.extend_from_slice(&chunk.with_context(|| format!("reading {name}"))?);
                    Ok(true)
                }
                None => Ok(false),
            },
            Self::Decoder(r) => {
                use std::io::Read;
                let n = r
                    .by_ref()
                    .take(TEXT_PIECE as u64)
                    .read_to_end(into)
                    .map_err(|e| VolleyError::from(e).context(format!("decompressing {name}")))?;
                Ok(n > 0)
            }
        }
    }
}

/// A text file's lines, read `batch_size` at a time as its bytes arrive: the file is
/// never held whole (a log of many GiB reads in a batch's memory).
struct Lines {
    /// The file's bytes, decompressed; opened on the first batch.
    chunks: Option<TextBytes>,
    store: Arc<dyn ObjectStore>,
    meta: ObjectMeta,
    name: String,
    schema: SchemaRef,
    batch_size: usize,
    /// Bytes read and not yet made rows.
    pending: Vec<u8>,
    /// Where the line breaks in `pending` are.
    ends: Vec<usize>,
    /// How far `pending` has been searched for line breaks.
    scanned: usize,
    /// Lines made rows so far.
    line: u64,
    done: bool,
}

impl Lines {
    async fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if self.ends.len() >= self.batch_size {
                return self.take(self.batch_size, false).map(Some);
            }
            if self.done {
                let rest = self.ends.last().map_or(0, |e| e + 1) < self.pending.len();
                if self.ends.is_empty() && !rest {
                    return Ok(None);
                }
                return self.take(self.ends.len(), rest).map(Some);
            }
            if self.chunks.is_none() {
                let (store, meta) = (Arc::clone(&self.store), self.meta.clone());
                self.chunks = Some(TextBytes::open(store, meta, &self.name).await?);
            }
            let chunks = self.chunks.as_mut().expect("opened");
            if chunks.read_into(&self.name, &mut self.pending).await? {
                let from = self.scanned;
                self.ends.extend(
                    self.pending[from..]
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| **b == b'\n')
                        .map(|(i, _)| from + i),
                );
                self.scanned = self.pending.len();
            } else {
                self.done = true;
            }
        }
    }

    /// The next `n` lines (a line break ends each, `\r\n` too), and with `rest` the
    /// bytes after the last line break as one more line, as a batch.
    fn take(&mut self, n: usize, rest: bool) -> Result<RecordBatch> {
        // One string column holds at most 2 GiB.
        let bytes = if rest {
            self.pending.len()
        } else {
            self.ends[n - 1]
        };
        if bytes > i32::MAX as usize {
            return Err(VolleyError::execution(format!(
                "{}: lines {} to {} hold {}, more than a batch of text holds (2 GiB): \
                 lower the batch size",
                self.name,
                self.line + 1,
                self.line + (n + usize::from(rest)) as u64,
                volley_common::format_bytes(bytes as u64)
            )));
        }
        let mut values = arrow::array::StringBuilder::new();
        let mut start = 0;
        let mut rows = 0;
        let mut add = |bytes: &[u8], line: u64| -> Result<()> {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                VolleyError::execution(format!("{} line {line} is not UTF-8 text: {e}", self.name))
            })?;
            values.append_value(text);
            Ok(())
        };
        for &end in &self.ends[..n] {
            let line = &self.pending[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            add(line, self.line + rows as u64 + 1)?;
            rows += 1;
            start = end + 1;
        }
        if rest {
            add(&self.pending[start..], self.line + rows as u64 + 1)?;
            rows += 1;
            start = self.pending.len();
        }
        self.pending.drain(..start);
        // A long line read once does not keep its memory for the rest of the file.
        if self.pending.capacity() > 4 * TEXT_PIECE.max(self.pending.len()) {
            self.pending.shrink_to(TEXT_PIECE.max(self.pending.len()));
        }
        self.ends.drain(..n);
        for e in &mut self.ends {
            *e -= start;
        }
        self.scanned -= start;
        self.line += rows as u64;
        let cols: Vec<ArrayRef> = if self.schema.fields().is_empty() {
            vec![]
        } else {
            vec![Arc::new(values.finish())]
        };
        let opts = arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            cols,
            &opts,
        )?)
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
                        // One value of a binary column holds at most 2 GiB.
                        if meta.size > i32::MAX as u64 {
                            return Err(VolleyError::execution(format!(
                                "{name} is {}: a file read as one value holds at most 2 GiB",
                                volley_common::format_bytes(meta.size)
                            )));
                        }
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
