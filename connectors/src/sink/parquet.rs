//! Parquet files encoded as they are written, a row group's columns split across
//! threads.
//!
//! One task writing one ordered stream (a sorted dataset, a single-file output) would
//! otherwise encode every column of every row group on one core; the columns of a row
//! group are independent, so each thread encodes some of them, fed every batch as it
//! arrives, and the row groups are appended in order. The writer's caller (a sort's
//! final merge runs on one core) thus never stops to encode: it hands batches over and
//! goes on, while the other cores encode them (W4 on two cores: a row group filled and
//! then encoded while the next fills was ~6% faster than encoding on the caller's core;
//! encoding while it fills leaves no core idle while the first row group fills). A row
//! group's encoding finishes while the next fills; it is appended after.
//!
//! A file's encoding threads live while a row group of it is open, parked between
//! batches: a write into many folders at once holds a thread (at least) per file past
//! its first 128 Ki rows; files smaller than that start theirs only when they close.

use std::cmp::Reverse;
use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowRowGroupWriterFactory,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::file::writer::SerializedFileWriter;
use volley_common::{Result, VolleyError};

use super::dictionary::columns_without_dictionary;

/// Rows per Parquet row group that volley writes (arrow-rs' and DataFusion's default):
/// readers split and prune by them. Smaller row groups cost write speed (about 10% on
/// W1 at 128Ki rows).
pub(crate) const ROW_GROUP_ROWS: usize = 1024 * 1024;

/// Rows held back before a file's first row group starts encoding: the sample that
/// decides which columns go without a dictionary (see [`columns_without_dictionary`]).
const SAMPLE_ROWS: usize = 128 * 1024;

/// Batches queued for each encoding thread before the writer's caller waits.
const QUEUED_BATCHES: usize = 2;

/// Parquet files being written in this process right now: encoder threads are shared
/// among them, so that many writing tasks do not oversubscribe the cores.
static OPEN_WRITERS: AtomicUsize = AtomicUsize::new(0);

/// A row group's column chunks, each with its leaf column's index.
type EncodedRowGroup = Vec<(usize, ArrowColumnChunk)>;

/// A top-level column's index with the writers of its leaf columns (and their indices).
type ColumnWriters = (usize, Vec<(usize, ArrowColumnWriter)>);

/// Where a Parquet file's row groups go.
enum Output {
    /// Nothing encoded yet: the first rows decide which columns go without a
    /// dictionary.
    Unopened { file: File, props: WriterProperties },
    Open {
        writer: SerializedFileWriter<File>,
        factory: ArrowRowGroupWriterFactory,
    },
    /// Between the two, or after a failure while opening.
    Failed,
}

/// A row group being encoded: its columns split among threads, each thread fed every
/// batch of the row group and encoding its own columns of it.
struct RowGroupEncoder {
    feeds: Vec<SyncSender<RecordBatch>>,
    threads: Vec<JoinHandle<Result<EncodedRowGroup>>>,
    rows: usize,
    /// Bytes of the rows fed (their encoded pages, held until the row group is
    /// appended, take at most about as much).
    bytes: u64,
}

impl RowGroupEncoder {
    /// Starts encoding a row group with `writers` (one per leaf column, in order) on
    /// up to `threads` threads, its columns split by their size in `first`, the row
    /// group's first batch.
    fn start(
        file: &SerializedFileWriter<File>,
        writers: Vec<ArrowColumnWriter>,
        schema: &SchemaRef,
        first: &RecordBatch,
        threads: usize,
    ) -> Result<Self> {
        let descr = file.schema_descr();
        let mut columns: Vec<ColumnWriters> = (0..schema.fields().len())
            .map(|c| (c, Vec::new()))
            .collect();
        for (leaf, writer) in writers.into_iter().enumerate() {
            columns[descr.get_column_root_idx(leaf)]
                .1
                .push((leaf, writer));
        }
        // Largest columns first, each to the least loaded thread.
        let size = |c: usize| first.column(c).get_array_memory_size();
        columns.sort_by_cached_key(|(c, _)| Reverse(size(*c)));
        let threads = threads.min(columns.len()).max(1);
        let mut buckets: Vec<(usize, Vec<ColumnWriters>)> =
            (0..threads).map(|_| (0, Vec::new())).collect();
        for column in columns {
            let lightest = buckets
                .iter_mut()
                .min_by_key(|(load, _)| *load)
                .expect("at least one bucket");
            lightest.0 += size(column.0);
            lightest.1.push(column);
        }
        let mut encoder = Self {
            feeds: Vec::with_capacity(threads),
            threads: Vec::with_capacity(threads),
            rows: 0,
            bytes: 0,
        };
        for (_, bucket) in buckets {
            let (feed, batches) = sync_channel(QUEUED_BATCHES);
            let schema = Arc::clone(schema);
            let thread = std::thread::Builder::new()
                .name("volley-parquet".into())
                .spawn(move || encode_columns(&schema, bucket, batches))
                .map_err(|e| {
                    VolleyError::internal(format!("cannot start a Parquet encoder: {e}"))
                })?;
            encoder.feeds.push(feed);
            encoder.threads.push(thread);
        }
        Ok(encoder)
    }

    /// Hands `batch`, of `bytes` bytes, to every thread (each encodes its columns of it).
    fn feed(&mut self, batch: RecordBatch, bytes: u64) -> Result<()> {
        self.rows += batch.num_rows();
        self.bytes += bytes;
        for feed in &self.feeds {
            if feed.send(batch.clone()).is_err() {
                // A thread stopped early: it failed, and says why.
                self.feeds.clear();
                let errors: Vec<VolleyError> = self
                    .threads
                    .drain(..)
                    .map(join)
                    .filter_map(Result::err)
                    .collect();
                return Err(errors
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| VolleyError::internal("a Parquet encoder stopped early")));
            }
        }
        Ok(())
    }

    /// No more rows for this row group: its threads finish encoding what they have.
    fn end(&mut self) {
        self.feeds.clear();
    }

    /// Waits for the row group's column chunks.
    fn finish(mut self) -> Result<EncodedRowGroup> {
        self.end();
        let mut chunks = Vec::new();
        for thread in self.threads {
            chunks.extend(join(thread)?);
        }
        Ok(chunks)
    }
}

fn join(thread: JoinHandle<Result<EncodedRowGroup>>) -> Result<EncodedRowGroup> {
    thread
        .join()
        .unwrap_or_else(|_| Err(VolleyError::internal("a Parquet encoder thread panicked")))
}

/// An encoding thread: encodes its `columns` of each batch it is fed, then closes
/// their writers.
fn encode_columns(
    schema: &SchemaRef,
    mut columns: Vec<ColumnWriters>,
    batches: Receiver<RecordBatch>,
) -> Result<EncodedRowGroup> {
    while let Ok(batch) = batches.recv() {
        for (column, writers) in &mut columns {
            let leaves = compute_leaves(schema.field(*column), batch.column(*column))?;
            if leaves.len() != writers.len() {
                return Err(VolleyError::internal(format!(
                    "column `{}` has {} Parquet leaves, its writer {}",
                    schema.field(*column).name(),
                    leaves.len(),
                    writers.len()
                )));
            }
            for (leaf, (_, writer)) in leaves.iter().zip(writers.iter_mut()) {
                writer.write(leaf)?;
            }
        }
    }
    columns
        .into_iter()
        .flat_map(|(_, writers)| writers)
        .map(|(leaf, writer)| Ok((leaf, writer.close()?)))
        .collect()
}

/// Bytes `batch`'s rows use: their part of each buffer, and a view column's strings by
/// their lengths. (A slice or a taken piece of a batch shares the batch's buffers,
/// which [`volley_common::batch_memory`] would count whole for every piece.)
fn rows_bytes(batch: &RecordBatch) -> u64 {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::DataType;
    batch
        .columns()
        .iter()
        .map(|c| {
            let own = c
                .to_data()
                .get_slice_memory_size()
                .unwrap_or_else(|_| c.get_array_memory_size());
            let strings = match c.data_type() {
                DataType::Utf8View => c.as_string_view().total_buffer_bytes_used(),
                DataType::BinaryView => c.as_binary_view().total_buffer_bytes_used(),
                _ => 0,
            };
            (own + strings) as u64
        })
        .sum()
}

/// A Parquet file being written.
pub(crate) struct ParquetFileWriter {
    output: Output,
    schema: SchemaRef,
    /// Rows held back until the file opens, and their bytes.
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    pending_bytes: u64,
    /// The row group being filled, encoded as it fills.
    filling: Option<RowGroupEncoder>,
    /// The row group before it, finishing its encoding.
    ending: Option<RowGroupEncoder>,
    row_groups: usize,
    /// Rows the file's first row group is expected to hold once its first rows are
    /// in (a full row group, or the file's row limit).
    expected_rows: usize,
    cores: usize,
}

impl ParquetFileWriter {
    /// A writer of `schema` rows into `file` (of at most `max_rows` rows), encoding on
    /// up to `cores` threads (shared with the other files being written).
    pub(crate) fn try_new(
        file: File,
        schema: SchemaRef,
        props: WriterProperties,
        max_rows: Option<usize>,
        cores: usize,
    ) -> Result<Self> {
        OPEN_WRITERS.fetch_add(1, Ordering::AcqRel);
        Ok(Self {
            output: Output::Unopened { file, props },
            schema,
            pending: Vec::new(),
            pending_rows: 0,
            pending_bytes: 0,
            filling: None,
            ending: None,
            row_groups: 0,
            expected_rows: max_rows.map_or(ROW_GROUP_ROWS, |m| m.clamp(1, ROW_GROUP_ROWS)),
            cores: cores.max(1),
        })
    }

    /// Writes `batch`: held back while the file's first rows decide its dictionaries,
    /// then handed to the encoding threads.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(VolleyError::plan(format!(
                "a batch with schema {} does not match the file's schema {}",
                batch.schema(),
                self.schema
            )));
        }
        if let Output::Unopened { .. } = self.output {
            // Held alone, a piece of a batch would keep the whole batch's strings.
            let batch = volley_common::compact_bloated_views(batch.clone())?;
            self.pending_rows += batch.num_rows();
            self.pending_bytes += rows_bytes(&batch);
            self.pending.push(batch);
            if self.pending_rows >= SAMPLE_ROWS {
                return self.open(self.expected_rows).inspect_err(|_| self.fail());
            }
            return Ok(());
        }
        self.encode(batch).inspect_err(|_| self.fail())
    }

    /// Bytes of rows this file holds in memory: those held back until it opens, and
    /// those of its row groups not yet appended (encoded as pages, which take about as
    /// much at most).
    pub(crate) fn buffered_bytes(&self) -> u64 {
        self.pending_bytes
            + [&self.filling, &self.ending]
                .into_iter()
                .flatten()
                .map(|e| e.bytes)
                .sum::<u64>()
    }

    /// After an error: nothing more is written to this file.
    fn fail(&mut self) {
        self.output = Output::Failed;
        self.filling = None;
        self.ending = None;
        self.pending.clear();
        self.pending_bytes = 0;
    }

    /// Hands `batch` to the row groups' encoders, starting and ending row groups as
    /// they fill.
    fn encode(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            let rows = self.filling.as_ref().map_or(0, |e| e.rows);
            let n = (ROW_GROUP_ROWS - rows).min(batch.num_rows() - offset);
            let slice = batch.slice(offset, n);
            offset += n;
            let encoder = match self.filling.take() {
                Some(encoder) => encoder,
                None => {
                    let index = self.row_groups;
                    let writers = OPEN_WRITERS.load(Ordering::Acquire).max(1);
                    let threads = (self.cores / writers).max(1);
                    let schema = Arc::clone(&self.schema);
                    let (file, factory) = self.opened()?;
                    let columns = factory.create_column_writers(index)?;
                    let encoder = RowGroupEncoder::start(file, columns, &schema, &slice, threads)?;
                    self.row_groups += 1;
                    encoder
                }
            };
            let encoder = self.filling.insert(encoder);
            let bytes = rows_bytes(&slice);
            encoder.feed(slice, bytes)?;
            if encoder.rows == ROW_GROUP_ROWS {
                self.end_row_group()?;
            }
        }
        Ok(())
    }

    /// Ends the row group being filled; the one before it, if any, is appended first
    /// (this one finishes encoding while the next fills).
    fn end_row_group(&mut self) -> Result<()> {
        let Some(mut filling) = self.filling.take() else {
            return Ok(());
        };
        filling.end();
        if let Some(ending) = self.ending.replace(filling) {
            self.append(ending.finish()?)?;
        }
        Ok(())
    }

    /// Appends encoded column chunks as the next row group.
    fn append(&mut self, mut chunks: EncodedRowGroup) -> Result<()> {
        chunks.sort_by_key(|(i, _)| *i);
        let (writer, _) = self.opened()?;
        let mut row_group = writer.next_row_group()?;
        for (_, chunk) in chunks {
            chunk.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        Ok(())
    }

    /// Writes what is left and the footer.
    pub(crate) fn close(mut self) -> Result<()> {
        if let Output::Unopened { .. } = self.output {
            self.open(self.pending_rows)?;
        }
        self.end_row_group()?;
        if let Some(ending) = self.ending.take() {
            self.append(ending.finish()?)?;
        }
        let (writer, _) = self.opened()?;
        writer.finish()?;
        Ok(())
    }

    /// Opens the file: with its first rows at hand (a row group of `rows` rows is
    /// expected), columns whose dictionary would overflow are written plain; then
    /// the rows held back are encoded.
    fn open(&mut self, rows: usize) -> Result<()> {
        if let Output::Unopened { file, props } =
            std::mem::replace(&mut self.output, Output::Failed)
        {
            let plain = columns_without_dictionary(&self.schema, &self.pending, rows, &props);
            let props = if plain.is_empty() {
                props
            } else {
                plain
                    .into_iter()
                    .fold(props.into_builder(), |b, column| {
                        b.set_column_dictionary_enabled(column, false)
                    })
                    .build()
            };
            let (writer, factory) =
                ArrowWriter::try_new(file, Arc::clone(&self.schema), Some(props))?
                    .into_serialized_writer()?;
            self.output = Output::Open { writer, factory };
        }
        self.pending_rows = 0;
        self.pending_bytes = 0;
        for batch in std::mem::take(&mut self.pending) {
            self.encode(&batch)?;
        }
        Ok(())
    }

    /// The open file's writer and its row groups' column writers.
    fn opened(
        &mut self,
    ) -> Result<(
        &mut SerializedFileWriter<File>,
        &mut ArrowRowGroupWriterFactory,
    )> {
        match &mut self.output {
            Output::Open { writer, factory } => Ok((writer, factory)),
            _ => Err(VolleyError::internal(
                "writing this Parquet file failed earlier; it cannot be written further",
            )),
        }
    }
}

impl Drop for ParquetFileWriter {
    fn drop(&mut self) {
        OPEN_WRITERS.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// A writer of `schema` rows into a new file at `path`, on up to `cores` threads.
    fn writer(
        path: &std::path::Path,
        schema: &SchemaRef,
        props: WriterProperties,
        cores: usize,
    ) -> ParquetFileWriter {
        let file = File::create(path).unwrap();
        ParquetFileWriter::try_new(file, Arc::clone(schema), props, None, cores).unwrap()
    }

    /// Row groups are encoded while the next fills: every one lands, in order.
    #[test]
    fn row_groups_encoded_behind_the_writer_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let mut w = writer(&path, &schema, props, 2);
        let total = 2 * ROW_GROUP_ROWS as i64 + 1000;
        let step = 300_000;
        let mut start = 0;
        while start < total {
            let end = (start + step).min(total);
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![Arc::new(Int64Array::from_iter_values(start..end))],
            )
            .unwrap();
            w.write(&batch).unwrap();
            start = end;
        }
        w.close().unwrap();

        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        let groups: Vec<i64> = reader
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        assert_eq!(
            groups,
            vec![ROW_GROUP_ROWS as i64, ROW_GROUP_ROWS as i64, 1000]
        );
        let mut next = 0;
        for b in reader.build().unwrap() {
            let b = b.unwrap();
            let x = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            for v in x.values().iter() {
                assert_eq!(*v, next);
                next += 1;
            }
            assert_eq!(x.null_count(), 0);
        }
        assert_eq!(next, total);
    }

    /// A column of distinct values is written without a dictionary from its first
    /// page; a column of few values keeps one; both read back as written.
    #[test]
    fn columns_whose_dictionary_would_overflow_are_written_plain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("key", DataType::Int64, false),
            Field::new("code", DataType::Int64, false),
        ]));
        let props = WriterProperties::builder().build();
        let mut w = writer(&path, &schema, props, 2);
        let rows = 600_000i64;
        for start in (0..rows).step_by(100_000) {
            let batch = RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(Int64Array::from_iter_values(start..start + 100_000)),
                    Arc::new(Int64Array::from_iter_values(
                        (start..start + 100_000).map(|i| i % 5),
                    )),
                ],
            )
            .unwrap();
            w.write(&batch).unwrap();
        }
        w.close().unwrap();

        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        let group = &reader.metadata().row_groups()[0];
        assert!(group.column(0).dictionary_page_offset().is_none());
        assert!(group.column(1).dictionary_page_offset().is_some());
        let mut next = 0;
        for b in reader.build().unwrap() {
            let b = b.unwrap();
            let key = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            let code = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            for (k, c) in key.values().iter().zip(code.values()) {
                assert_eq!((*k, *c), (next, next % 5));
                next += 1;
            }
        }
        assert_eq!(next, rows);
    }

    /// A file closed before any row arrives is a valid, empty Parquet file.
    #[test]
    fn a_file_without_rows_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, true)]));
        let w = writer(&path, &schema, WriterProperties::builder().build(), 1);
        w.close().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
        assert_eq!(reader.schema().fields(), schema.fields());
    }

    /// Nested columns (several leaves under one top-level column) split across
    /// threads read back as written, across row groups.
    #[test]
    fn nested_columns_read_back_as_written() {
        use arrow::array::{ArrayRef, Int32Array, ListArray, StringArray, StructArray};
        use arrow::datatypes::{Fields, Int32Type};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested.parquet");
        let fields = Fields::from(vec![
            Field::new("a", DataType::Int32, true),
            Field::new("b", DataType::Utf8, true),
        ]);
        let make = |start: usize, n: usize| -> Vec<ArrayRef> {
            let ids = Int64Array::from_iter_values((start..start + n).map(|i| i as i64));
            let a =
                Int32Array::from_iter((start..start + n).map(|i| (i % 3 != 0).then_some(i as i32)));
            let b =
                StringArray::from_iter_values((start..start + n).map(|i| format!("s{}", i % 100)));
            let s = StructArray::new(fields.clone(), vec![Arc::new(a), Arc::new(b)], None);
            let l = ListArray::from_iter_primitive::<Int32Type, _, _>(
                (start..start + n).map(|i| Some((0..(i % 4) as i32).map(Some).collect::<Vec<_>>())),
            );
            vec![Arc::new(ids), Arc::new(s), Arc::new(l)]
        };
        let probe = make(0, 1);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("s", probe[1].data_type().clone(), true),
            Field::new("l", probe[2].data_type().clone(), true),
        ]));
        // Enough cores for a thread per column while other tests write too.
        let mut w = writer(&path, &schema, WriterProperties::builder().build(), 16);
        let total = ROW_GROUP_ROWS + 50_000;
        let mut written = Vec::new();
        let mut start = 0;
        while start < total {
            let n = 70_000.min(total - start);
            let batch = RecordBatch::try_new(Arc::clone(&schema), make(start, n)).unwrap();
            w.write(&batch).unwrap();
            written.push(batch);
            start += n;
        }
        w.close().unwrap();

        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 2);
        let read: Vec<RecordBatch> = reader.build().unwrap().map(|b| b.unwrap()).collect();
        let written = arrow::compute::concat_batches(&schema, &written).unwrap();
        let read = arrow::compute::concat_batches(&schema, &read).unwrap();
        assert_eq!(read, written);
    }
}
