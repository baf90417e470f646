//! Volley's own exchange: blocks routed into partitions, held against the memory
//! budget, spilled to Arrow IPC files when the budget is full, and read back
//! partition by partition.
//!
//! DataFusion's operators cover sort, aggregation and join; the Dataset model also
//! needs exchanges that DataFusion does not have: hash repartitioning into a chosen
//! number of outputs, a reproducible random shuffle, block-order shuffles and row-range
//! splits of a materialized dataset. They all write into an [`ExchangeStore`] and read
//! from the frozen store ([`FrozenStore`]) that [`ExchangeStore::finish`] returns.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, interleave_record_batch, take_record_batch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use datafusion::common::hash_utils::{create_hashes, RandomState};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use volley_common::{Result, ResultExt, VolleyError};
use volley_runtime::{MemoryBudget, MemoryReservation};

/// Where an exchange sends each row.
#[derive(Debug, Clone)]
pub enum Partitioning {
    /// Everything into one partition, in arrival order, block boundaries kept.
    Single,
    /// By a hash of the key columns into `n` partitions: equal keys meet.
    Hash {
        /// Key columns.
        keys: Vec<String>,
        /// Partitions.
        n: usize,
    },
    /// Each row to a partition drawn from a generator seeded with `seed` and the row's
    /// position in the input, so that the same input order gives the same result.
    Random {
        /// Seed.
        seed: u64,
        /// Partitions.
        n: usize,
    },
}

impl Partitioning {
    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        match self {
            Partitioning::Single => 1,
            Partitioning::Hash { n, .. } | Partitioning::Random { n, .. } => (*n).max(1),
        }
    }
}

/// A block of a partition: in memory, or batch `index` of spill file `file`.
#[derive(Debug, Clone)]
enum Located {
    Memory(RecordBatch),
    Spilled { file: usize, index: usize },
}

#[derive(Debug, Clone)]
struct StoredBlock {
    rows: usize,
    at: Located,
}

/// The write side of an exchange.
pub struct ExchangeStore {
    schema: SchemaRef,
    partitioning: Partitioning,
    budget: Arc<MemoryBudget>,
    spill_root: Option<PathBuf>,
    folder: Option<tempfile::TempDir>,
    files: Vec<PathBuf>,
    parts: Vec<Vec<StoredBlock>>,
    reservations: Vec<MemoryReservation>,
    held: u64,
    rows_in: u64,
    spilled_bytes: u64,
    hashes: Vec<u64>,
    /// Whether a column holds dictionaries (each block may have its own).
    dictionaries: bool,
}

impl std::fmt::Debug for ExchangeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeStore")
            .field("partitioning", &self.partitioning)
            .field("held", &self.held)
            .field("spilled_bytes", &self.spilled_bytes)
            .finish_non_exhaustive()
    }
}

/// Whether values of type `t` hold a dictionary, at the top or nested.
fn holds_dictionaries(t: &DataType) -> bool {
    match t {
        DataType::Dictionary(..) => true,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f)
        | DataType::FixedSizeList(f, _)
        | DataType::Map(f, _) => holds_dictionaries(f.data_type()),
        DataType::Struct(fields) => fields.iter().any(|f| holds_dictionaries(f.data_type())),
        DataType::RunEndEncoded(_, v) => holds_dictionaries(v.data_type()),
        DataType::Union(fields, _) => fields
            .iter()
            .any(|(_, f)| holds_dictionaries(f.data_type())),
        _ => false,
    }
}

impl ExchangeStore {
    /// An empty store for rows of `schema`; spill files go into a fresh folder inside
    /// `spill_root` (the system's temporary folder when `None`), removed when the store
    /// or its frozen form is dropped.
    pub fn new(
        schema: SchemaRef,
        partitioning: Partitioning,
        budget: Arc<MemoryBudget>,
        spill_root: Option<PathBuf>,
    ) -> Result<Self> {
        if let Partitioning::Hash { keys, .. } = &partitioning {
            for k in keys {
                schema
                    .index_of(k)
                    .map_err(|_| VolleyError::unknown_column("repartition key", k, &schema))?;
            }
        }
        let n = partitioning.partitions();
        let dictionaries = schema
            .fields()
            .iter()
            .any(|f| holds_dictionaries(f.data_type()));
        Ok(Self {
            dictionaries,
            schema,
            partitioning,
            budget,
            spill_root,
            folder: None,
            files: Vec::new(),
            parts: vec![Vec::new(); n],
            reservations: Vec::new(),
            held: 0,
            rows_in: 0,
            spilled_bytes: 0,
            hashes: Vec::new(),
        })
    }

    /// Routes the rows of `batch` (the next block of the input, in input order).
    pub fn push(&mut self, batch: RecordBatch) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let targets: Vec<usize> = match &self.partitioning {
            Partitioning::Single => {
                self.rows_in += rows as u64;
                let batch = volley_common::compact_views(batch)?;
                let bytes = volley_common::batch_memory(&batch);
                return self.hold(vec![(0, batch)], bytes);
            }
            Partitioning::Hash { keys, n } => {
                let cols: Vec<ArrayRef> = keys
                    .iter()
                    .map(|k| Ok(Arc::clone(batch.column(self.schema.index_of(k)?))))
                    .collect::<Result<_>>()?;
                hash_partitions(&cols, *n, &mut self.hashes)?
            }
            Partitioning::Random { seed, n } => random_partitions(*seed, *n, self.rows_in, rows),
        };
        self.rows_in += rows as u64;
        let (grouped, counts) = group_by_partition(&batch, &targets, self.parts.len())?;
        let bytes = volley_common::batch_memory(&grouped);
        let slices: Vec<(usize, RecordBatch)> = (0..self.parts.len())
            .filter(|&p| counts[p + 1] > counts[p])
            .map(|p| (p, grouped.slice(counts[p], counts[p + 1] - counts[p])))
            .collect();
        self.hold(slices, bytes)
    }

    /// Holds blocks that share `bytes` of memory (slices of one batch).
    fn hold(&mut self, blocks: Vec<(usize, RecordBatch)>, bytes: u64) -> Result<()> {
        let reservation = match self.budget.try_reserve(bytes) {
            Some(r) => r,
            None => {
                self.spill()?;
                // Empty now: this one block may pass the budget, as a queue's may.
                self.budget.reserve(bytes)
            }
        };
        self.reservations.push(reservation);
        self.held += bytes;
        for (part, batch) in blocks {
            self.parts[part].push(StoredBlock {
                rows: batch.num_rows(),
                at: Located::Memory(batch),
            });
        }
        Ok(())
    }

    fn folder(&mut self) -> Result<&Path> {
        if self.folder.is_none() {
            let root = self.spill_root.clone().unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating spill folder {}", root.display()))?;
            let dir = tempfile::Builder::new()
                .prefix("volley-exchange-")
                .tempdir_in(&root)
                .with_context(|| format!("creating a spill folder in {}", root.display()))?;
            self.folder = Some(dir);
        }
        Ok(self.folder.as_ref().expect("just made").path())
    }

    /// Writes every block held in memory to IPC files (one per partition), in order.
    fn spill(&mut self) -> Result<()> {
        if self.held == 0 {
            return Ok(());
        }
        let coalesce = !matches!(self.partitioning, Partitioning::Single);
        for p in 0..self.parts.len() {
            let first_mem = self.parts[p]
                .iter()
                .position(|b| matches!(b.at, Located::Memory(_)));
            let Some(first_mem) = first_mem else { continue };
            let blocks: Vec<RecordBatch> = self.parts[p][first_mem..]
                .iter()
                .map(|b| match &b.at {
                    Located::Memory(batch) => batch.clone(),
                    Located::Spilled { .. } => unreachable!("memory blocks follow spilled ones"),
                })
                .collect();
            let files: Vec<Vec<RecordBatch>> = if coalesce {
                // Hash and random partitions hold small slices of many blocks.
                vec![vec![concat_batches(&self.schema, &blocks)?]]
            } else if self.dictionaries {
                // An IPC file holds one dictionary per column: blocks with
                // dictionaries of their own go to files of their own.
                blocks.into_iter().map(|b| vec![b]).collect()
            } else {
                vec![blocks]
            };
            self.parts[p].truncate(first_mem);
            for written in files {
                let name = format!("part-{p}-{}.arrow", self.files.len());
                let path = self.folder()?.join(name);
                let file = File::create(&path)
                    .with_context(|| format!("creating spill file {}", path.display()))?;
                let mut w = FileWriter::try_new(BufWriter::new(file), &self.schema)?;
                for b in &written {
                    w.write(b)?;
                }
                w.finish()?;
                self.spilled_bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let file = self.files.len();
                self.files.push(path);
                self.parts[p].extend(written.iter().enumerate().map(|(index, b)| StoredBlock {
                    rows: b.num_rows(),
                    at: Located::Spilled { file, index },
                }));
            }
        }
        self.reservations.clear();
        self.held = 0;
        Ok(())
    }

    /// Bytes written to spill files so far.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    /// The store, read-only, for the reading side.
    pub fn finish(self) -> FrozenStore {
        FrozenStore {
            schema: self.schema,
            partitioning: self.partitioning,
            files: self.files,
            parts: self.parts,
            _reservations: self.reservations,
            _folder: self.folder,
            spilled_bytes: self.spilled_bytes,
            rows: self.rows_in,
        }
    }
}

/// A finished exchange: partitions of blocks to read back.
#[derive(Debug)]
pub struct FrozenStore {
    schema: SchemaRef,
    partitioning: Partitioning,
    files: Vec<PathBuf>,
    parts: Vec<Vec<StoredBlock>>,
    _reservations: Vec<MemoryReservation>,
    _folder: Option<tempfile::TempDir>,
    spilled_bytes: u64,
    rows: u64,
}

impl FrozenStore {
    /// The rows' schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Number of partitions.
    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// Rows in all partitions.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Rows in partition `p`.
    pub fn partition_rows(&self, p: usize) -> u64 {
        self.parts[p].iter().map(|b| b.rows as u64).sum()
    }

    /// Blocks in partition `p`.
    pub fn partition_blocks(&self, p: usize) -> usize {
        self.parts[p].len()
    }

    /// Bytes written to spill files.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    /// Reads block `i` of partition `p`.
    pub fn block(&self, p: usize, i: usize) -> Result<RecordBatch> {
        let b = &self.parts[p][i];
        match &b.at {
            Located::Memory(batch) => Ok(batch.clone()),
            Located::Spilled { file, index } => {
                let path = &self.files[*file];
                let f = File::open(path)
                    .with_context(|| format!("opening spill file {}", path.display()))?;
                let mut reader = FileReader::try_new(f, None)
                    .with_context(|| format!("reading spill file {}", path.display()))?;
                reader.set_index(*index)?;
                reader
                    .next()
                    .ok_or_else(|| {
                        VolleyError::internal(format!(
                            "spill file {} has no batch {index}",
                            path.display()
                        ))
                    })?
                    .map_err(Into::into)
            }
        }
    }

    /// The rows of partition `p` in order, as blocks; rows `[start, end)` only.
    pub fn read_range(
        self: &Arc<Self>,
        p: usize,
        start: u64,
        end: u64,
    ) -> impl Iterator<Item = Result<RecordBatch>> + Send + 'static {
        let store = Arc::clone(self);
        let mut offset = 0u64;
        let mut picks = Vec::new();
        for (i, b) in store.parts[p].iter().enumerate() {
            let (lo, hi) = (offset, offset + b.rows as u64);
            offset = hi;
            if hi <= start || lo >= end {
                continue;
            }
            let from = start.saturating_sub(lo) as usize;
            let to = (end.min(hi) - lo) as usize;
            picks.push((i, from, to));
        }
        picks.into_iter().map(move |(i, from, to)| {
            let b = store.block(p, i)?;
            Ok(if from == 0 && to == b.num_rows() {
                b
            } else {
                b.slice(from, to - from)
            })
        })
    }

    /// All rows of partition `p` as one batch with buffers of its own (so that it
    /// counts only its rows' memory): shuffled (seeded by the exchange's seed and `p`)
    /// for a random partitioning, in order otherwise.
    pub fn read_partition(self: &Arc<Self>, p: usize) -> Result<RecordBatch> {
        let blocks: Vec<RecordBatch> = self.read_range(p, 0, u64::MAX).collect::<Result<_>>()?;
        match self.partitioning {
            Partitioning::Random { seed, .. } if !blocks.is_empty() => {
                shuffle_partition(&self.schema, &blocks, seed, p)
            }
            _ => Ok(concat_batches(&self.schema, &blocks)?),
        }
    }
}

/// The partition (of `n`) of each row, by a hash of the key columns `cols`: equal keys
/// get the same partition in every process (the hash's seeds are fixed). `hashes` is
/// scratch space.
pub fn hash_partitions(cols: &[ArrayRef], n: usize, hashes: &mut Vec<u64>) -> Result<Vec<usize>> {
    let rows = cols.first().map_or(0, |c| c.len());
    hashes.clear();
    hashes.resize(rows, 0);
    create_hashes(cols, &RandomState::default(), hashes)?;
    let n = n.max(1) as u64;
    Ok(hashes.iter().map(|h| (h % n) as usize).collect())
}

/// The partition (of `n`) of each of `rows` rows that are rows `first..` of the input:
/// drawn from the seed and each row's position, so that the same input order gives the
/// same partitions however the input is cut into blocks.
pub fn random_partitions(seed: u64, n: usize, first: u64, rows: usize) -> Vec<usize> {
    let n = n.max(1) as u64;
    (0..rows as u64)
        .map(|i| (mix(seed, first + i) % n) as usize)
        .collect()
}

/// The rows of `batch` in partition order (stable: input order within a partition), in
/// one `take` with buffers of its own, and where each partition starts: partition `p`
/// is rows `counts[p]..counts[p + 1]`.
pub fn group_by_partition(
    batch: &RecordBatch,
    targets: &[usize],
    n: usize,
) -> Result<(RecordBatch, Vec<usize>)> {
    let (order, counts) = partition_order(targets, n);
    let grouped = volley_common::compact_views(take_record_batch(batch, &order)?)?;
    Ok((grouped, counts))
}

/// The rows of a batch whose row `r` goes to partition `targets[r]` (of `n`), in
/// partition order (stable), as `take` indices, and where each partition starts:
/// partition `p` is positions `starts[p]..starts[p + 1]`.
pub fn partition_order(targets: &[usize], n: usize) -> (UInt32Array, Vec<usize>) {
    let mut starts = vec![0usize; n + 1];
    for &t in targets {
        starts[t + 1] += 1;
    }
    for i in 0..n {
        starts[i + 1] += starts[i];
    }
    let mut next = starts.clone();
    let mut order = vec![0u32; targets.len()];
    for (row, &t) in targets.iter().enumerate() {
        order[next[t]] = row as u32;
        next[t] += 1;
    }
    (UInt32Array::from(order), starts)
}

/// The rows of `blocks` (partition `p` of a random exchange with `seed`, in input
/// order) in the partition's seeded random order, as one batch with buffers of its own.
pub fn shuffle_partition(
    schema: &SchemaRef,
    blocks: &[RecordBatch],
    seed: u64,
    p: usize,
) -> Result<RecordBatch> {
    // Every (block, row) pair, shuffled, gathered in one copy.
    let mut picks: Vec<(usize, usize)> = blocks
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.num_rows()).map(move |r| (b, r)))
        .collect();
    if picks.is_empty() {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, p as u64 ^ (1 << 63)));
    picks.shuffle(&mut rng);
    if schema.fields().is_empty() {
        // Rows of no columns: only their count (Arrow's interleave needs a column).
        let rows = arrow::array::RecordBatchOptions::new().with_row_count(Some(picks.len()));
        return Ok(RecordBatch::try_new_with_options(
            Arc::clone(schema),
            vec![],
            &rows,
        )?);
    }
    let refs: Vec<&RecordBatch> = blocks.iter().collect();
    Ok(interleave_record_batch(&refs, &picks)?)
}

/// A 64-bit mix of a seed and a position (SplitMix64's finalizer).
fn mix(seed: u64, x: u64) -> u64 {
    let mut z = seed ^ x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(from: i64, n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(from..from + n))],
        )
        .unwrap()
    }

    fn values(b: &RecordBatch) -> Vec<i64> {
        let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        (0..a.len()).map(|i| a.value(i)).collect()
    }

    #[test]
    fn spills_when_the_budget_is_full_and_reads_back_in_order() {
        let budget = MemoryBudget::new(4096);
        let dir = tempfile::tempdir().unwrap();
        let mut store = ExchangeStore::new(
            batch(0, 1).schema(),
            Partitioning::Single,
            Arc::clone(&budget),
            Some(dir.path().to_path_buf()),
        )
        .unwrap();
        for i in 0..20 {
            store.push(batch(i * 100, 100)).unwrap();
        }
        assert!(store.spilled_bytes() > 0);
        assert!(budget.used() <= 4096 + 1024);
        let frozen = Arc::new(store.finish());
        assert_eq!(frozen.rows(), 2000);
        assert_eq!(frozen.partition_blocks(0), 20);
        let got: Vec<i64> = frozen
            .read_range(0, 150, 1850)
            .flat_map(|b| values(&b.unwrap()))
            .collect();
        assert_eq!(got, (150..1850).collect::<Vec<_>>());
        drop(frozen);
        assert_eq!(budget.used(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "spill folder removed"
        );
    }

    /// Blocks whose dictionary columns hold dictionaries of their own spill and read
    /// back (an IPC file holds one dictionary per column).
    #[test]
    fn rows_of_no_columns_shuffle() {
        let schema = Arc::new(arrow::datatypes::Schema::empty());
        let rows = arrow::array::RecordBatchOptions::new().with_row_count(Some(5));
        let b = RecordBatch::try_new_with_options(Arc::clone(&schema), vec![], &rows).unwrap();
        let out = shuffle_partition(&schema, &[b.clone(), b], 7, 0).unwrap();
        assert_eq!(out.num_rows(), 10);
    }

    /// Blocks with dictionaries of their own spill, several at a time (an IPC file
    /// takes one dictionary per column: one file held them all, and failed).
    #[test]
    fn blocks_of_other_dictionaries_spill() {
        use arrow::array::{DictionaryArray, StringArray};
        use arrow::datatypes::Int32Type;
        let budget = MemoryBudget::new(64 * 1024);
        let dir = tempfile::tempdir().unwrap();
        let block = |i: usize| {
            let words: Vec<String> = (0..50).map(|j| format!("w{}", i * 7 + j % 3)).collect();
            let d: DictionaryArray<Int32Type> = words.iter().map(String::as_str).collect();
            RecordBatch::try_from_iter([("d", Arc::new(d) as ArrayRef)]).unwrap()
        };
        let mut store = ExchangeStore::new(
            block(0).schema(),
            Partitioning::Single,
            Arc::clone(&budget),
            Some(dir.path().to_path_buf()),
        )
        .unwrap();
        for i in 0..400 {
            store.push(block(i)).unwrap();
        }
        assert!(store.spilled_bytes() > 0);
        let frozen = Arc::new(store.finish());
        let got: Vec<String> = frozen
            .read_range(0, 0, 100_000)
            .flat_map(|b| {
                let b = arrow::compute::cast(b.unwrap().column(0), &DataType::Utf8).unwrap();
                let s = b.as_any().downcast_ref::<StringArray>().unwrap().clone();
                (0..s.len()).map(move |i| s.value(i).to_string())
            })
            .collect();
        let want: Vec<String> = (0..400)
            .flat_map(|i| (0..50).map(move |j| format!("w{}", i * 7 + j % 3)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn partitions_do_not_depend_on_how_the_input_is_cut() {
        // A seeded shuffle's partitions, drawn per block, equal those of the whole.
        let whole = random_partitions(7, 5, 0, 100);
        let mut cut = random_partitions(7, 5, 0, 30);
        cut.extend(random_partitions(7, 5, 30, 70));
        assert_eq!(whole, cut);
        // Hashes: equal keys, equal partitions, whatever batch they are in.
        let a: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3, 1]));
        let b: ArrayRef = Arc::new(Int64Array::from(vec![3, 1]));
        let mut scratch = Vec::new();
        let pa = hash_partitions(&[a], 4, &mut scratch).unwrap();
        let pb = hash_partitions(&[b], 4, &mut scratch).unwrap();
        assert_eq!(pa[0], pa[3]);
        assert_eq!((pa[0], pa[2]), (pb[1], pb[0]));
        // Rows in partition order, input order kept within each.
        let batch = RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from(vec![10, 11, 12, 13, 14])) as ArrayRef,
        )])
        .unwrap();
        let (grouped, counts) = group_by_partition(&batch, &[2, 0, 2, 1, 0], 3).unwrap();
        assert_eq!(counts, vec![0, 2, 3, 5]);
        let x = grouped
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(x.values().to_vec(), vec![11, 14, 13, 10, 12]);
    }

    #[test]
    fn hash_partitions_meet_keys_and_random_is_reproducible() {
        let budget = MemoryBudget::new(1 << 30);
        let run = |partitioning: Partitioning| {
            let mut store = ExchangeStore::new(
                batch(0, 1).schema(),
                partitioning,
                Arc::clone(&budget),
                None,
            )
            .unwrap();
            for i in 0..10 {
                store.push(batch(i * 50, 50)).unwrap();
            }
            let frozen = Arc::new(store.finish());
            (0..frozen.partitions())
                .map(|p| values(&frozen.read_partition(p).unwrap()))
                .collect::<Vec<_>>()
        };
        let hashed = run(Partitioning::Hash {
            keys: vec!["x".into()],
            n: 4,
        });
        let again = run(Partitioning::Hash {
            keys: vec!["x".into()],
            n: 4,
        });
        assert_eq!(hashed, again);
        assert_eq!(hashed.iter().map(Vec::len).sum::<usize>(), 500);
        let a = run(Partitioning::Random { seed: 7, n: 3 });
        let b = run(Partitioning::Random { seed: 7, n: 3 });
        let c = run(Partitioning::Random { seed: 8, n: 3 });
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut all: Vec<i64> = a.concat();
        assert_ne!(all, (0..500).collect::<Vec<_>>(), "shuffled");
        all.sort();
        assert_eq!(all, (0..500).collect::<Vec<_>>());
    }
}
