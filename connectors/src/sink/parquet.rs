//! Parquet files encoded one row group at a time, the row group's columns split
//! across threads.
//!
//! One task writing one ordered stream (a sorted dataset, a single-file output) would
//! otherwise encode every column of every row group on one core; the columns of a row
//! group are independent, so they are encoded in parallel and appended in order. A row
//! group is encoded while the writer's caller fills the next one (one row group more
//! in memory): a sort's final merge runs on one core and would otherwise stop for
//! each row group's encoding (W4 on two cores: ~6% faster).

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::parquet::arrow::arrow_writer::{
    compute_leaves, ArrowColumnChunk, ArrowColumnWriter, ArrowLeafColumn,
    ArrowRowGroupWriterFactory,
};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::file::writer::SerializedFileWriter;
use volley_common::{Result, VolleyError};

use super::dictionary::columns_without_dictionary;

/// Rows per Parquet row group that volley writes (arrow-rs' and DataFusion's default):
/// the writer buffers one row group per file in memory; readers split and prune by
/// them. Smaller row groups cost write speed (about 10% on W1 at 128Ki rows).
pub(crate) const ROW_GROUP_ROWS: usize = 1024 * 1024;

/// Parquet files being written in this process right now: encoder threads are shared
/// among them, so that many writing tasks do not oversubscribe the cores.
static OPEN_WRITERS: AtomicUsize = AtomicUsize::new(0);

/// One column's encoder with what it has to encode.
struct ColumnJob {
    index: usize,
    writer: ArrowColumnWriter,
    leaves: Vec<ArrowLeafColumn>,
    bytes: usize,
}

/// A row group's column chunks, each with its column's index.
type EncodedRowGroup = Vec<(usize, ArrowColumnChunk)>;

/// Where a Parquet file's row groups go.
enum Output {
    /// Nothing encoded yet: the first row group decides which columns go without a
    /// dictionary (see [`columns_without_dictionary`]).
    Unopened { file: File, props: WriterProperties },
    Open {
        writer: SerializedFileWriter<File>,
        factory: ArrowRowGroupWriterFactory,
    },
    /// Between the two, or after a failure while opening.
    Failed,
}

/// A Parquet file being written.
pub(crate) struct ParquetFileWriter {
    output: Output,
    schema: SchemaRef,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    row_groups: usize,
    cores: usize,
    /// The row group being encoded while the next one fills.
    encoding: Option<std::thread::JoinHandle<Result<EncodedRowGroup>>>,
}

impl ParquetFileWriter {
    /// A writer of `schema` rows into `file`, encoding on up to `cores` threads (shared
    /// with the other files being written).
    pub(crate) fn try_new(
        file: File,
        schema: SchemaRef,
        props: WriterProperties,
        cores: usize,
    ) -> Result<Self> {
        Ok(Self {
            output: Output::Unopened { file, props },
            schema,
            pending: Vec::new(),
            pending_rows: 0,
            row_groups: 0,
            cores: cores.max(1),
            encoding: None,
        })
        .inspect(|_| {
            OPEN_WRITERS.fetch_add(1, Ordering::AcqRel);
        })
    }

    /// Buffers `batch`, writing each row group as it fills.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(VolleyError::plan(format!(
                "a batch with schema {} does not match the file's schema {}",
                batch.schema(),
                self.schema
            )));
        }
        let mut offset = 0;
        while offset < batch.num_rows() {
            let n = (ROW_GROUP_ROWS - self.pending_rows).min(batch.num_rows() - offset);
            self.pending.push(batch.slice(offset, n));
            self.pending_rows += n;
            offset += n;
            if self.pending_rows == ROW_GROUP_ROWS {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Encodes the buffered rows as one row group, on other threads: the row group
    /// before it (if any) is appended first, so the caller fills the next one while
    /// this one is encoded (a sorted stream's merge runs on one core, and would
    /// otherwise wait for every row group's encoding).
    fn flush(&mut self) -> Result<()> {
        self.append_encoded()?;
        if self.pending_rows == 0 {
            return Ok(());
        }
        let row_group = self.row_groups;
        let (_, factory) = self.open()?;
        let mut jobs: Vec<ColumnJob> = factory
            .create_column_writers(row_group)?
            .into_iter()
            .enumerate()
            .map(|(index, writer)| ColumnJob {
                index,
                writer,
                leaves: Vec::new(),
                bytes: 0,
            })
            .collect();
        for batch in &self.pending {
            let mut leaf = 0;
            for (field, column) in self.schema.fields().iter().zip(batch.columns()) {
                let size = column.get_array_memory_size();
                for l in compute_leaves(field, column)? {
                    jobs[leaf].leaves.push(l);
                    jobs[leaf].bytes += size;
                    leaf += 1;
                }
            }
        }
        self.pending.clear();
        self.pending_rows = 0;
        self.row_groups += 1;
        // Largest columns first, each to the least loaded thread.
        jobs.sort_by_key(|j| std::cmp::Reverse(j.bytes));
        let writers = OPEN_WRITERS.load(Ordering::Acquire).max(1);
        let threads = (self.cores / writers).min(jobs.len()).max(1);
        let mut buckets: Vec<(usize, Vec<ColumnJob>)> =
            (0..threads).map(|_| (0, Vec::new())).collect();
        for job in jobs {
            let lightest = buckets
                .iter_mut()
                .min_by_key(|(load, _)| *load)
                .expect("at least one bucket");
            lightest.0 += job.bytes;
            lightest.1.push(job);
        }
        let buckets: Vec<Vec<ColumnJob>> = buckets.into_iter().map(|(_, b)| b).collect();
        let handle = std::thread::Builder::new()
            .name("volley-parquet".into())
            .spawn(move || encode_row_group(buckets))
            .map_err(|e| VolleyError::internal(format!("cannot start a Parquet encoder: {e}")))?;
        self.encoding = Some(handle);
        Ok(())
    }

    /// Waits for the row group being encoded, if any, and appends it.
    fn append_encoded(&mut self) -> Result<()> {
        let Some(handle) = self.encoding.take() else {
            return Ok(());
        };
        let chunks = handle
            .join()
            .unwrap_or_else(|_| Err(VolleyError::internal("a Parquet encoder thread panicked")))?;
        self.append(chunks)
    }

    /// Appends encoded column chunks as the next row group.
    fn append(&mut self, mut chunks: EncodedRowGroup) -> Result<()> {
        chunks.sort_by_key(|(i, _)| *i);
        let (writer, _) = self.open()?;
        let mut row_group = writer.next_row_group()?;
        for (_, chunk) in chunks {
            chunk.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        Ok(())
    }

    /// Writes what is buffered and the footer.
    pub(crate) fn close(mut self) -> Result<()> {
        self.flush()?;
        self.append_encoded()?;
        let (writer, _) = self.open()?;
        writer.finish()?;
        Ok(())
    }

    /// The file's writer, created on first use: with the rows buffered for the first
    /// row group at hand, columns whose dictionary would overflow are written plain.
    fn open(
        &mut self,
    ) -> Result<(
        &mut SerializedFileWriter<File>,
        &mut ArrowRowGroupWriterFactory,
    )> {
        self.output = match std::mem::replace(&mut self.output, Output::Failed) {
            Output::Unopened { file, props } => {
                let plain = columns_without_dictionary(&self.schema, &self.pending, &props);
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
                Output::Open { writer, factory }
            }
            other => other,
        };
        match &mut self.output {
            Output::Open { writer, factory } => Ok((writer, factory)),
            _ => Err(VolleyError::internal(
                "a Parquet file failed to open earlier and cannot be written",
            )),
        }
    }
}

/// Encodes a row group's columns, each bucket on its own thread.
fn encode_row_group(buckets: Vec<Vec<ColumnJob>>) -> Result<EncodedRowGroup> {
    let encode = |bucket: Vec<ColumnJob>| {
        bucket
            .into_iter()
            .map(|mut job| {
                for l in &job.leaves {
                    job.writer.write(l)?;
                }
                Ok((job.index, job.writer.close()?))
            })
            .collect::<Result<Vec<_>>>()
    };
    let mut buckets = buckets;
    let Some(first) = buckets.pop() else {
        return Ok(Vec::new());
    };
    let (mine, others) = std::thread::scope(|s| {
        let handles: Vec<_> = buckets
            .into_iter()
            .map(|bucket| s.spawn(move || encode(bucket)))
            .collect();
        let mine = encode(first);
        let others: Vec<Result<EncodedRowGroup>> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(VolleyError::internal("a Parquet encoder thread panicked"))
                })
            })
            .collect();
        (mine, others)
    });
    let mut all = mine?;
    for o in others {
        all.extend(o?);
    }
    Ok(all)
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

    /// Row groups are encoded while the next fills: every one lands, in order.
    #[test]
    fn row_groups_encoded_behind_the_writer_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.parquet");
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let mut w =
            ParquetFileWriter::try_new(File::create(&path).unwrap(), Arc::clone(&schema), props, 2)
                .unwrap();
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
        let mut w =
            ParquetFileWriter::try_new(File::create(&path).unwrap(), Arc::clone(&schema), props, 2)
                .unwrap();
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
        let w = ParquetFileWriter::try_new(
            File::create(&path).unwrap(),
            Arc::clone(&schema),
            WriterProperties::builder().build(),
            1,
        )
        .unwrap();
        w.close().unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 0);
        assert_eq!(reader.schema().fields(), schema.fields());
    }
}
