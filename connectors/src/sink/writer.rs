//! One task's files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch, UInt32Array};
use arrow::compute::{cast, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};

use super::parquet::{ParquetFileWriter, ROW_GROUP_ROWS};
use datafusion::parquet::basic::{Compression as PqCompression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use volley_common::{Result, ResultExt, VolleyError};

use super::{Compression, StagedPart, WriteFormat, WriteOptions, WriteSummary};

/// Files a task attempt keeps open at once (one per partition value it writes to): each
/// holds buffers (1 MiB for text, up to a row group's rows for Parquet) and a file
/// handle. Rows of other partition values wait in memory ([`PENDING_BYTES`]) and go
/// out in pieces of [`PENDING_PIECE_BYTES`], each closing the file written least
/// recently and opening one: a write partitioned by a column of thousands of values
/// stays within memory and the process's open-file limit, and makes a file per piece,
/// not one per value per batch.
const MAX_OPEN_FILES: usize = 32;

/// The most bytes of rows a task attempt holds for partition values without an open
/// file; past it, the partition holding most goes out.
const PENDING_BYTES: usize = 32 << 20;

/// Rows held for one partition value that go out at once.
const PENDING_PIECE_BYTES: usize = 4 << 20;

/// The most bytes of rows a task attempt's open Parquet files hold in memory together
/// (each holds its row group being encoded, up to [`ROW_GROUP_ROWS`] rows, and the one
/// before it until that is appended). Past it, the files holding most other than the
/// one just written are closed: a write into many folders at once makes smaller files
/// instead of holding a row group per folder (32 folders of wide rows held gigabytes).
/// The file being written may hold more alone: up to two row groups.
const OPEN_FILE_BYTES: u64 = 128 << 20;

/// Rows of one partition value held until its file is opened.
#[derive(Default)]
struct Pending {
    batches: Vec<RecordBatch>,
    bytes: usize,
}

/// Where an attempt writing to an object store uploads its files.
pub(crate) struct Upload {
    pub(crate) store: Arc<dyn ObjectStore>,
    /// The attempt's folder in the write's staging.
    pub(crate) folder: Path,
    /// The staging's marker ([`super::LIVE_MARKER`]): while it exists, the write takes
    /// attempts' files.
    pub(crate) live: Path,
    pub(crate) io: tokio::runtime::Handle,
}

/// A byte sink, maybe compressed.
enum ByteSink {
    Plain(BufWriter<File>),
    Gzip(flate2::write::GzEncoder<BufWriter<File>>),
    Zstd(zstd::Encoder<'static, BufWriter<File>>),
}

impl Write for ByteSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ByteSink::Plain(w) => w.write(buf),
            ByteSink::Gzip(w) => w.write(buf),
            ByteSink::Zstd(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            ByteSink::Plain(w) => w.flush(),
            ByteSink::Gzip(w) => w.flush(),
            ByteSink::Zstd(w) => w.flush(),
        }
    }
}

impl ByteSink {
    fn finish(self) -> std::io::Result<()> {
        let mut inner = match self {
            ByteSink::Plain(w) => w,
            ByteSink::Gzip(w) => w.finish()?,
            ByteSink::Zstd(w) => w.finish()?,
        };
        inner.flush()
    }
}

/// An open file of one format. (A task holds one per open output file, so the size
/// difference of the variants does not matter.)
#[allow(clippy::large_enum_variant)]
enum FileWriter {
    Parquet(ParquetFileWriter),
    Csv(arrow::csv::Writer<ByteSink>),
    Json(arrow::json::LineDelimitedWriter<ByteSink>),
}

/// An open output file and where it goes.
struct OpenFile {
    writer: FileWriter,
    local: PathBuf,
    relative: String,
    rows: usize,
    /// When it was last written to (the writer's count of pieces written).
    used: u64,
}

/// Writes one task attempt's batches to files (a new file per partition value, and
/// after `max_rows_per_file` rows), in the attempt's own staging folder. Files appear at
/// the destination only when the [`WriteJob`](super::WriteJob) commits this attempt.
pub struct PartWriter {
    options: WriteOptions,
    prefix: String,
    /// The attempt's folder, relative to the write's staging root.
    folder: String,
    /// Where files are written: the attempt's folder (local destinations) or a private
    /// scratch folder they are uploaded from (object stores). It exists already; files
    /// and partition folders are only ever made below it.
    local_dir: PathBuf,
    upload: Option<Upload>,
    open: HashMap<String, OpenFile>,
    /// Rows of partition values without an open file, and their bytes in all.
    pending: HashMap<String, Pending>,
    pending_bytes: usize,
    counter: usize,
    /// Pieces written so far: what the open files' `used` counts.
    pieces: u64,
    /// [`OPEN_FILE_BYTES`] (smaller in tests).
    open_file_bytes: u64,
    summary: WriteSummary,
}

impl PartWriter {
    pub(crate) fn new(
        options: WriteOptions,
        prefix: String,
        folder: String,
        local_dir: PathBuf,
        upload: Option<Upload>,
    ) -> Self {
        Self {
            options,
            prefix,
            folder,
            local_dir,
            upload,
            open: HashMap::new(),
            pending: HashMap::new(),
            pending_bytes: 0,
            counter: 0,
            pieces: 0,
            open_file_bytes: OPEN_FILE_BYTES,
            summary: WriteSummary::default(),
        }
    }

    /// Writes a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.options.partition_by.is_empty() {
            return self.write_to(String::new(), batch);
        }
        let schema = batch.schema();
        let mut key_cols = Vec::new();
        for c in &self.options.partition_by {
            let idx = schema
                .index_of(c)
                .map_err(|_| VolleyError::unknown_column("partition column", c, &schema))?;
            let as_str = cast(batch.column(idx), &DataType::Utf8)
                .with_context(|| format!("partition column `{c}`"))?;
            key_cols.push((c.clone(), as_str));
        }
        // Row indices per partition, in first-seen order.
        let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for row in 0..batch.num_rows() {
            let mut key = String::new();
            for (name, col) in &key_cols {
                let col = col
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .expect("cast to Utf8");
                let value = if col.is_null(row) {
                    crate::NULL_PARTITION.to_string()
                } else {
                    escape_partition_value(col.value(row))
                };
                key.push_str(&format!("{name}={value}/"));
            }
            let slot = *index.entry(key.clone()).or_insert_with(|| {
                groups.push((key, Vec::new()));
                groups.len() - 1
            });
            groups[slot].1.push(row as u32);
        }
        let keep: Vec<usize> = (0..schema.fields().len())
            .filter(|i| !self.options.partition_by.contains(schema.field(*i).name()))
            .collect();
        let data = batch.project(&keep)?;
        for (key, rows) in groups {
            let part = take_record_batch(&data, &UInt32Array::from(rows))?;
            // (Rows already held go first: a partition's rows keep their order.)
            if !self.pending.contains_key(&key)
                && (self.open.contains_key(&key) || self.open.len() < MAX_OPEN_FILES)
            {
                self.write_to(key, &part)?;
                continue;
            }
            // Held alone: view columns keep only the strings of these rows (taken,
            // they share the whole batch's buffers, and would count them).
            let part = volley_common::compact_views(part)?;
            let bytes = part.get_array_memory_size();
            let pending = self.pending.entry(key.clone()).or_default();
            pending.batches.push(part);
            pending.bytes += bytes;
            self.pending_bytes += bytes;
            if pending.bytes >= PENDING_PIECE_BYTES {
                self.write_pending(&key)?;
            }
        }
        while self.pending_bytes > PENDING_BYTES {
            let most = self
                .pending
                .iter()
                .max_by_key(|(_, p)| p.bytes)
                .map(|(k, _)| k.clone())
                .expect("rows are held");
            self.write_pending(&most)?;
        }
        Ok(())
    }

    /// Writes the rows held for partition `folder` (into a file opened for them).
    fn write_pending(&mut self, folder: &str) -> Result<()> {
        let Some(pending) = self.pending.remove(folder) else {
            return Ok(());
        };
        self.pending_bytes -= pending.bytes;
        let schema = pending.batches[0].schema();
        let rows = arrow::compute::concat_batches(&schema, &pending.batches)?;
        drop(pending);
        self.write_to(folder.to_string(), &rows)
    }

    /// Writes `batch` into the open file of `folder`, starting a new file wherever the
    /// open one reaches `max_rows_per_file` (a batch is cut there).
    fn write_to(&mut self, folder: String, batch: &RecordBatch) -> Result<()> {
        let Some(max) = self.options.max_rows_per_file.map(|m| m.max(1)) else {
            return self.write_piece(folder, batch);
        };
        let mut offset = 0;
        while offset < batch.num_rows() {
            let room = max - self.open.get(&folder).map_or(0, |f| f.rows);
            let n = room.min(batch.num_rows() - offset);
            self.write_piece(folder.clone(), &batch.slice(offset, n))?;
            offset += n;
        }
        Ok(())
    }

    fn write_piece(&mut self, folder: String, batch: &RecordBatch) -> Result<()> {
        if !self.open.contains_key(&folder) {
            if self.open.len() >= MAX_OPEN_FILES {
                let least_recent = self
                    .open
                    .iter()
                    .min_by_key(|(_, f)| f.used)
                    .map(|(k, _)| k.clone())
                    .expect("files are open");
                let file = self.open.remove(&least_recent).expect("present");
                self.close(file)?;
            }
            let file = self.open_file(&folder, batch.schema())?;
            self.open.insert(folder.clone(), file);
        }
        self.pieces += 1;
        let file = self.open.get_mut(&folder).expect("opened above");
        file.used = self.pieces;
        let path = file.relative.clone();
        match &mut file.writer {
            FileWriter::Parquet(w) => w.write(batch).with_context(|| format!("writing {path}"))?,
            FileWriter::Csv(w) => w.write(batch).with_context(|| format!("writing {path}"))?,
            FileWriter::Json(w) => w.write(batch).with_context(|| format!("writing {path}"))?,
        }
        file.rows += batch.num_rows();
        self.summary.rows += batch.num_rows() as u64;
        if let Some(max) = self.options.max_rows_per_file {
            if file.rows >= max {
                let file = self.open.remove(&folder).expect("present");
                self.close(file)?;
            }
        }
        self.close_past_open_file_bytes(&folder)
    }

    /// Bytes of rows the open files hold in memory.
    fn buffered_bytes(&self) -> u64 {
        self.open
            .values()
            .map(|f| match &f.writer {
                FileWriter::Parquet(w) => w.buffered_bytes(),
                // A megabyte's buffer each.
                FileWriter::Csv(_) | FileWriter::Json(_) => 0,
            })
            .sum()
    }

    /// While the open files hold more than [`OPEN_FILE_BYTES`], closes the one holding
    /// most, other than `written` (the file just written to).
    fn close_past_open_file_bytes(&mut self, written: &str) -> Result<()> {
        while self.buffered_bytes() > self.open_file_bytes {
            let most = self
                .open
                .iter()
                .filter(|(k, _)| k.as_str() != written)
                .filter_map(|(k, f)| match &f.writer {
                    FileWriter::Parquet(w) => Some((k, w.buffered_bytes())),
                    _ => None,
                })
                .max_by_key(|(_, b)| *b)
                .map(|(k, _)| k.clone());
            let Some(most) = most else { break };
            let file = self.open.remove(&most).expect("present");
            self.close(file)?;
        }
        Ok(())
    }

    fn open_file(&mut self, folder: &str, schema: SchemaRef) -> Result<OpenFile> {
        let ext = self.options.format.extension();
        let comp_ext = match (self.options.format, self.options.compression) {
            (WriteFormat::Parquet, _) => "",
            (_, Compression::Gzip) => ".gz",
            (_, Compression::Zstd) => ".zst",
            _ => "",
        };
        // Numbered with a fixed width, so that a part's files sort in the order they
        // were written.
        let relative = format!(
            "{folder}{}-{:05}.{ext}{comp_ext}",
            self.prefix, self.counter
        );
        self.counter += 1;
        if self.options.format == WriteFormat::Csv {
            csv_can_hold(&schema)?;
        }
        let local = self.local_dir.join(&relative);
        if !folder.is_empty() {
            create_dirs_below(&self.local_dir, folder)?;
        }
        let file = File::create(&local).with_context(|| format!("creating {}", local.display()))?;
        let writer = match self.options.format {
            WriteFormat::Parquet => {
                let codec = match self.options.compression {
                    Compression::Default | Compression::Snappy => PqCompression::SNAPPY,
                    Compression::None => PqCompression::UNCOMPRESSED,
                    Compression::Gzip => PqCompression::GZIP(Default::default()),
                    Compression::Zstd => PqCompression::ZSTD(ZstdLevel::default()),
                    Compression::Lz4 => PqCompression::LZ4_RAW,
                };
                let props = WriterProperties::builder()
                    .set_compression(codec)
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                    .build();
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                let max_rows = self.options.max_rows_per_file;
                FileWriter::Parquet(ParquetFileWriter::try_new(
                    file, schema, props, max_rows, threads,
                )?)
            }
            format => {
                let buffered = BufWriter::with_capacity(1 << 20, file);
                let sink = match self.options.compression {
                    Compression::Default | Compression::None => ByteSink::Plain(buffered),
                    Compression::Gzip => ByteSink::Gzip(flate2::write::GzEncoder::new(
                        buffered,
                        flate2::Compression::default(),
                    )),
                    Compression::Zstd => ByteSink::Zstd(zstd::Encoder::new(buffered, 3)?),
                    other => {
                        return Err(VolleyError::plan(format!(
                            "{other:?} compression is for Parquet only; use gzip or zstd for {}",
                            format.extension()
                        )))
                    }
                };
                match format {
                    WriteFormat::Csv => FileWriter::Csv(
                        arrow::csv::WriterBuilder::new()
                            .with_header(true)
                            .build(sink),
                    ),
                    // Nulls are written as `null`, not left out: a reader infers a
                    // file's columns from its first lines, and would lose a column
                    // that is null in all of them.
                    _ => FileWriter::Json(
                        arrow::json::WriterBuilder::new()
                            .with_explicit_nulls(true)
                            .build::<_, arrow::json::writer::LineDelimited>(sink),
                    ),
                }
            }
        };
        Ok(OpenFile {
            writer,
            local,
            relative,
            rows: 0,
            used: 0,
        })
    }

    fn close(&mut self, file: OpenFile) -> Result<()> {
        let OpenFile {
            writer,
            local,
            relative,
            ..
        } = file;
        match writer {
            FileWriter::Parquet(w) => {
                w.close().with_context(|| format!("finishing {relative}"))?;
            }
            FileWriter::Csv(w) => w
                .into_inner()
                .finish()
                .with_context(|| format!("finishing {relative}"))?,
            FileWriter::Json(mut w) => {
                w.finish()
                    .with_context(|| format!("finishing {relative}"))?;
                w.into_inner()
                    .finish()
                    .with_context(|| format!("finishing {relative}"))?
            }
        }
        let size = std::fs::metadata(&local).map(|m| m.len()).unwrap_or(0);
        self.summary.bytes += size;
        if let Some(Upload {
            store,
            folder,
            live,
            io,
        }) = &self.upload
        {
            let target = Path::from_iter(folder.parts().chain(store_path(&relative)?.parts()));
            io.block_on(upload(Arc::clone(store), target.clone(), &local))
                .with_context(|| format!("uploading {relative}"))?;
            // A write that was committed or abandoned without this attempt removed its
            // marker first: the file is taken back and this attempt stops, so nothing
            // of it stays (a file up before the marker went is in the staging the
            // write's end deletes).
            if let Err(object_store::Error::NotFound { .. }) = io.block_on(store.head(live)) {
                let _ = io.block_on(store.delete(&target));
                return Err(VolleyError::execution(format!(
                    "the write's staging {} is gone: the write was committed or \
                     abandoned without this attempt",
                    live.as_ref().trim_end_matches(super::LIVE_MARKER)
                )));
            }
            std::fs::remove_file(&local).ok();
        }
        self.summary.files.push(relative);
        Ok(())
    }

    /// Makes the file of a write that had no rows yet, for `schema`: a Parquet file
    /// without row groups, a CSV file holding its header (where headers are written),
    /// an empty JSON file. A single-file write of no rows still leaves its file.
    /// Nothing changes once a file was opened, or where the write is partitioned (its
    /// folders come from the rows).
    pub fn ensure_file(&mut self, schema: SchemaRef) -> Result<()> {
        if self.counter > 0 || !self.options.partition_by.is_empty() {
            return Ok(());
        }
        // Not cut by a row count: it has none.
        self.write_piece(String::new(), &RecordBatch::new_empty(schema))
    }

    /// Closes every open file and reports what this attempt staged.
    pub fn finish(mut self) -> Result<StagedPart> {
        let mut held: Vec<String> = self.pending.keys().cloned().collect();
        held.sort();
        for folder in held {
            self.write_pending(&folder)?;
        }
        let mut open: Vec<(String, OpenFile)> = self.open.drain().collect();
        open.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, file) in open {
            self.close(file)?;
        }
        Ok(StagedPart {
            folder: std::mem::take(&mut self.folder),
            summary: std::mem::take(&mut self.summary),
        })
    }
}

/// An error naming the first column of `schema` that CSV cannot hold (a list, struct,
/// map or union), if any.
pub fn csv_can_hold(schema: &arrow::datatypes::Schema) -> Result<()> {
    match schema.fields().iter().find(|f| f.data_type().is_nested()) {
        Some(f) => Err(VolleyError::plan(format!(
            "column `{}` is {}, which CSV cannot hold (write JSON or Parquet, or turn it \
             into a string first)",
            f.name(),
            f.data_type()
        ))),
        None => Ok(()),
    }
}

/// Makes the folders of `relative` below `root`, never `root` itself: when the write
/// was committed or abandoned (its staging removed) while a superseded attempt still
/// ran, that attempt fails here instead of making its folders again.
fn create_dirs_below(root: &std::path::Path, relative: &str) -> Result<()> {
    let mut dir = root.to_path_buf();
    for part in relative.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolleyError::execution(format!(
                    "the staging folder {} is gone: the write was committed or abandoned \
                     without this attempt",
                    root.display()
                )))
            }
            Err(e) => {
                return Err(VolleyError::from(e).context(format!("creating {}", dir.display())))
            }
        }
    }
    Ok(())
}

/// Uploads the file at `local` to `target` in pieces of 8 MiB, past the first as a
/// multipart upload (two pieces in flight): a part file is never held whole in memory,
/// and one past a store's single-request limit (5 GiB on S3) goes up too.
async fn upload(store: Arc<dyn ObjectStore>, target: Path, local: &std::path::Path) -> Result<()> {
    use std::io::Read;
    const PIECE: usize = 8 << 20;
    let mut file =
        File::open(local).with_context(|| format!("reading back {}", local.display()))?;
    let mut w = object_store::buffered::BufWriter::with_capacity(store, target, PIECE)
        .with_max_concurrency(2);
    let sent = async {
        loop {
            let mut piece = Vec::with_capacity(PIECE);
            let n = (&mut file)
                .take(PIECE as u64)
                .read_to_end(&mut piece)
                .with_context(|| format!("reading back {}", local.display()))?;
            if n == 0 {
                break;
            }
            w.put(piece.into()).await?;
        }
        futures::future::poll_fn(|cx| {
            tokio::io::AsyncWrite::poll_shutdown(std::pin::Pin::new(&mut w), cx)
        })
        .await?;
        Ok(())
    }
    .await;
    if sent.is_err() {
        // The pieces a multipart upload sent go with it.
        let _ = w.abort().await;
    }
    sent
}

/// A part's file name under its folder (`k=v/part-....parquet`) as an object store's
/// path: its partition values are escaped already (`a%2Fb`), so not escaped again.
pub(super) fn store_path(relative: &str) -> Result<Path> {
    Path::parse(relative)
        .map_err(|e| VolleyError::internal(format!("the file name {relative}: {e}")))
}

/// A partition value as a folder name. A filter on the column finds the value's folder
/// by a name DataFusion builds: the value with control characters, space, `%`, `/`,
/// `?` and `#` percent-escaped, then made an object-store path, which escapes `\`,
/// `{`, `}`, `[`, `]`, `^`, `` ` ``, `~`, `"`, `<`, `>`, `|` and `*` too (a value with
/// a character of the first set is not looked up by name: the filter reads every
/// folder's decoded value). Escaping exactly these makes that name the folder's: a
/// value escaped otherwise (Hive escapes `:` too) is looked for where no folder is,
/// and `tag = 'x:y'` read no rows of `tag=x%3Ay`.
fn escape_partition_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            c if c.is_ascii_control() => out.push_str(&format!("%{:02X}", c as u32)),
            ' ' | '%' | '/' | '?' | '#' | '\\' | '{' | '}' | '[' | ']' | '^' | '`' | '~' | '"'
            | '<' | '>' | '|' | '*' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        crate::NULL_PARTITION.to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringViewArray};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// A write into several folders at once whose open Parquet files would hold more
    /// rows than [`OPEN_FILE_BYTES`] closes files instead: the rows they hold stay
    /// under it (past it by the file being written at most), and every row reads back.
    /// A piece of a view column counts its own strings, not the batch's it shares
    /// (counted whole, every file would close at an eighth of its size).
    #[test]
    fn open_parquet_files_hold_at_most_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = WriteOptions::new(WriteFormat::Parquet);
        options.partition_by = vec!["k".into()];
        let mut w = PartWriter::new(
            options,
            "part-0".into(),
            String::new(),
            dir.path().to_path_buf(),
            None,
        );
        let limit = 8 << 20;
        w.open_file_bytes = limit;
        let (batches, rows) = (64i64, 16_384i64);
        let (mut most, mut biggest_piece) = (0, 0);
        for b in 0..batches {
            let ids: Vec<i64> = (b * rows..(b + 1) * rows).collect();
            let k = Int64Array::from_iter_values(ids.iter().map(|i| i % 8));
            let s: StringViewArray = ids.iter().map(|i| Some(format!("{i:0>64}"))).collect();
            let batch = RecordBatch::try_from_iter([
                ("k", Arc::new(k) as ArrayRef),
                ("id", Arc::new(Int64Array::from(ids)) as ArrayRef),
                ("s", Arc::new(s) as ArrayRef),
            ])
            .unwrap();
            biggest_piece = biggest_piece.max(volley_common::batch_memory(&batch));
            w.write(&batch).unwrap();
            most = most.max(w.buffered_bytes());
        }
        // Without the limit, the 8 folders held every row until the end: ~90 MiB.
        assert!(most > 0 && most <= limit + biggest_piece, "{most}");
        let staged = w.finish().unwrap();
        // Files of about a MiB of rows each: ~90.
        let files = staged.summary.files.len();
        assert!((9..200).contains(&files), "{files} files");
        let (mut n, mut sum) = (0i64, 0i64);
        for f in &staged.summary.files {
            let file = File::open(dir.path().join(f)).unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(file)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                n += b.num_rows() as i64;
                sum += ids.values().iter().sum::<i64>();
            }
        }
        let all = batches * rows;
        assert_eq!((n, sum), (all, all * (all - 1) / 2));
    }
}
