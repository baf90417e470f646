//! A node's object store: objects in memory up to a limit, the oldest spilled to Arrow
//! IPC files beyond it.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use volley_common::{Result, VolleyError};

use super::ipc_file::map_shared_file;
use super::{batches_size, ObjectCompression, Selection};

/// Objects held by one node.
#[derive(Debug)]
pub struct ObjectStore {
    inner: Mutex<StoreInner>,
    memory_limit: u64,
    spill_dir: PathBuf,
    /// Where the node's workers hand over objects as files (in shared memory).
    shared_dir: Option<PathBuf>,
    /// How spilled files and Flight transfers are compressed.
    compression: ObjectCompression,
}

#[derive(Debug, Default)]
struct StoreInner {
    objects: HashMap<String, Stored>,
    /// In-memory objects, oldest first: the order they spill in.
    order: VecDeque<String>,
    memory_bytes: u64,
    spilled_bytes: u64,
    /// Bytes ever spilled (an execution that fits its budget spills none).
    spilled_total: u64,
    /// When a spill last failed: none is tried for [`SPILL_BACKOFF`] after (each would
    /// write every object over the limit again, to fail again).
    spill_failed_at: Option<std::time::Instant>,
}

/// How long the store keeps what is over its limit in memory after a spill failed.
const SPILL_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
enum Stored {
    Memory(Arc<Vec<RecordBatch>>, u64),
    /// An Arrow IPC file in the shared-memory folder: memory, read by path.
    Shared(PathBuf, u64),
    Spilled(PathBuf, u64),
}

/// An object on its way to disk.
enum ToSpill {
    Batches(Arc<Vec<RecordBatch>>),
    File(PathBuf),
}

impl ObjectStore {
    /// A store holding at most `memory_limit` bytes in memory, spilling into `spill_dir`.
    pub fn new(memory_limit: u64, spill_dir: PathBuf) -> Self {
        Self {
            inner: Mutex::new(StoreInner::default()),
            memory_limit,
            spill_dir,
            shared_dir: None,
            compression: ObjectCompression::default(),
        }
    }

    /// Compresses spilled objects and the objects it sends over Flight with `c`.
    pub fn with_compression(mut self, c: ObjectCompression) -> Self {
        self.compression = c;
        self
    }

    /// How it compresses the objects it writes and sends.
    pub fn compression(&self) -> ObjectCompression {
        self.compression
    }

    /// Takes objects handed over as files in `dir` (see [`Self::adopt`]).
    pub fn with_shared_dir(mut self, dir: PathBuf) -> Self {
        self.shared_dir = Some(dir);
        self
    }

    /// Where workers hand over objects as files, if anywhere.
    pub fn shared_dir(&self) -> Option<&Path> {
        self.shared_dir.as_deref()
    }

    /// Takes the Arrow IPC file `name` in the shared folder as object `id` (replacing an
    /// earlier copy). Spills older objects if memory is over the limit.
    pub fn adopt(&self, id: &str, name: &str) -> Result<u64> {
        let dir = self
            .shared_dir
            .as_ref()
            .ok_or_else(|| VolleyError::execution("this node takes no objects as files"))?;
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(VolleyError::execution(format!(
                "object {id}: {name:?} is not a file name"
            )));
        }
        let path = dir.join(name);
        let bytes = std::fs::metadata(&path)
            .map_err(|e| {
                VolleyError::Io(e).context(format!("object {id}: cannot read {}", path.display()))
            })?
            .len();
        self.insert(id, Stored::Shared(path.clone(), bytes), bytes)?;
        // Its writer's files may have been removed meanwhile (it died: see
        // `drop_unadopted`): not kept as an object without its file.
        // (Spilled at once, its file is gone for that reason: it is stored.)
        if !path.exists() {
            let mut s = self.inner.lock().expect("object store lock");
            if matches!(s.objects.get(id), Some(Stored::Shared(p, _)) if *p == path) {
                s.remove(id);
                return Err(VolleyError::execution(format!(
                    "object {id}: {} was removed as it was handed over",
                    path.display()
                )));
            }
        }
        Ok(bytes)
    }

    /// Removes the files worker `worker` wrote into the shared folder that it did not
    /// hand over (it died between writing and handing over, or while writing): nothing
    /// else would remove them while the node runs. A worker's files are named
    /// `{worker}--...` ([`store_shared`](super::shared::store_shared)).
    pub fn drop_unadopted(&self, worker: &str) {
        let Some(dir) = &self.shared_dir else {
            return;
        };
        let prefix = format!("{}--", sanitize(worker));
        // Under the lock: a file is adopted wholly before or after this.
        let s = self.inner.lock().expect("object store lock");
        let adopted: std::collections::HashSet<&Path> = s
            .objects
            .values()
            .filter_map(|o| match o {
                Stored::Shared(p, _) => Some(p.as_path()),
                _ => None,
            })
            .collect();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if e.file_name().to_string_lossy().starts_with(&prefix)
                && !adopted.contains(path.as_path())
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// The file holding object `id`, if it is one of the shared folder's.
    pub fn locate(&self, id: &str) -> Option<PathBuf> {
        match self
            .inner
            .lock()
            .expect("object store lock")
            .objects
            .get(id)
        {
            Some(Stored::Shared(p, _)) => Some(p.clone()),
            _ => None,
        }
    }

    /// Stores `batches` under `id` (replacing an earlier copy: a re-run task writes the
    /// same object again). Spills older objects if memory is over the limit.
    pub fn put(&self, id: &str, batches: Vec<RecordBatch>) -> Result<u64> {
        let bytes = batches_size(&batches);
        self.insert(id, Stored::Memory(Arc::new(batches), bytes), bytes)?;
        Ok(bytes)
    }

    /// Keeps `stored` (in memory) as `id`, spilling the oldest objects until what stays
    /// in memory fits the limit.
    fn insert(&self, id: &str, stored: Stored, bytes: u64) -> Result<()> {
        let mut to_spill = Vec::new();
        {
            let mut s = self.inner.lock().expect("object store lock");
            s.remove(id);
            s.objects.insert(id.to_string(), stored);
            s.order.push_back(id.to_string());
            s.memory_bytes += bytes;
            // Pick the oldest objects until what stays fits (none for a while after a
            // spill failed).
            let backing_off = s
                .spill_failed_at
                .is_some_and(|at| at.elapsed() < SPILL_BACKOFF);
            let mut over = if backing_off {
                0
            } else {
                s.memory_bytes.saturating_sub(self.memory_limit)
            };
            while over > 0 {
                let Some(old) = s.order.pop_front() else {
                    break;
                };
                match s.objects.get(&old) {
                    Some(Stored::Memory(b, n)) => {
                        to_spill.push((old.clone(), ToSpill::Batches(Arc::clone(b)), *n));
                        over = over.saturating_sub(*n);
                    }
                    Some(Stored::Shared(p, n)) => {
                        to_spill.push((old.clone(), ToSpill::File(p.clone()), *n));
                        over = over.saturating_sub(*n);
                    }
                    _ => {}
                }
            }
        }
        // The object is stored whatever becomes of the spills: one that fails leaves
        // its object in memory (over the limit, and first in line for the next spill).
        let mut kept = Vec::new();
        for (old, what, n) in to_spill {
            if let Err(e) = self.spill(&old, &what, n) {
                tracing::warn!("{e}: object {old} stays in memory");
                kept.push((old, what));
            }
        }
        if !kept.is_empty() {
            let mut s = self.inner.lock().expect("object store lock");
            // Back at the front, oldest first. Spilling backs off only where an object
            // that failed is still held: one freed or replaced while it was copied
            // failed for that reason alone.
            let mut held = false;
            for (old, what) in kept.into_iter().rev() {
                if s.holds_unspilled(&old, &what) {
                    s.order.push_front(old);
                    held = true;
                }
            }
            if held {
                s.spill_failed_at = Some(std::time::Instant::now());
            }
        }
        Ok(())
    }

    fn spill(&self, id: &str, what: &ToSpill, bytes: u64) -> Result<()> {
        std::fs::create_dir_all(&self.spill_dir)?;
        // A name of its own: an object put again while a reader holds its earlier
        // spill file gets a new file, and the earlier one is never written again.
        let path = self.spill_dir.join(format!(
            "{}-{:016x}.arrow",
            sanitize(id),
            rand::random::<u64>()
        ));
        let written = match what {
            ToSpill::Batches(batches) => write_file(&path, batches, self.compression),
            // Already an IPC file: copied out of shared memory as it is.
            ToSpill::File(from) => std::fs::copy(from, &path)
                .map(|_| ())
                .map_err(VolleyError::Io),
        };
        if let Err(e) = written {
            // A partial file under a name of its own would never be written or removed.
            let _ = std::fs::remove_file(&path);
            return Err(e.context(format!("cannot spill object to {}", path.display())));
        }
        let mut s = self.inner.lock().expect("object store lock");
        // The object may have been freed or replaced while it was being written.
        let current = s.holds_unspilled(id, what);
        if current {
            if let Some(Stored::Shared(p, _)) = s
                .objects
                .insert(id.to_string(), Stored::Spilled(path, bytes))
            {
                let _ = std::fs::remove_file(p);
            }
            s.memory_bytes = s.memory_bytes.saturating_sub(bytes);
            s.spilled_bytes += bytes;
            s.spilled_total += bytes;
        } else {
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }

    /// The object's batches, read back from disk if it was spilled.
    pub fn get(&self, id: &str) -> Result<Option<Arc<Vec<RecordBatch>>>> {
        self.read(
            id,
            |b| Ok(Arc::clone(b)),
            |path, _| read_file(path).map(Arc::new),
        )
    }

    /// Batch `i` of object `id` (nothing for an object without batches); `None` if it
    /// is not here. A file is read at that batch only (the IPC file's footer indexes
    /// its batches).
    pub fn get_batch(&self, id: &str, i: u32) -> Result<Option<Vec<RecordBatch>>> {
        self.read(
            id,
            |b| Selection::Batch(i).apply(id, b.to_vec()),
            // A shared file is mapped; a spill file (on disk) is read.
            |path, shared| {
                if shared {
                    map_shared_file(path, Some(i))
                } else {
                    read_file_batch(path, i)
                }
            },
        )
    }

    /// Object `id` through `memory` (batches in memory) or `file` (its file's path, and
    /// whether it is a shared one); `None` if it is not here. A file read that fails
    /// because the object moved meanwhile (spilled, freed, replaced) looks again.
    fn read<T>(
        &self,
        id: &str,
        memory: impl Fn(&Arc<Vec<RecordBatch>>) -> Result<T>,
        file: impl Fn(&Path, bool) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut tries = 0;
        loop {
            let (path, shared) = {
                let s = self.inner.lock().expect("object store lock");
                match s.objects.get(id) {
                    None => return Ok(None),
                    Some(Stored::Memory(b, _)) => return memory(b).map(Some),
                    Some(Stored::Shared(p, _)) => (p.clone(), true),
                    Some(Stored::Spilled(p, _)) => (p.clone(), false),
                }
            };
            match file(&path, shared) {
                Ok(v) => return Ok(Some(v)),
                Err(_) if tries < 3 && self.moved(id, &path) => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether object `id` is no longer at `path` (it was spilled, freed or replaced
    /// while it was being read there): a read that failed there looks again.
    fn moved(&self, id: &str, path: &Path) -> bool {
        let s = self.inner.lock().expect("object store lock");
        !matches!(
            s.objects.get(id),
            Some(Stored::Shared(p, _) | Stored::Spilled(p, _)) if p == path
        )
    }

    /// Drops objects (and their spill files).
    pub fn free(&self, ids: &[String]) {
        let mut s = self.inner.lock().expect("object store lock");
        for id in ids {
            s.remove(id);
        }
    }

    /// `(bytes in memory, bytes spilled)`.
    pub fn usage(&self) -> (u64, u64) {
        let s = self.inner.lock().expect("object store lock");
        (s.memory_bytes, s.spilled_bytes)
    }

    /// Bytes ever spilled to disk.
    pub fn spilled_total(&self) -> u64 {
        self.inner.lock().expect("object store lock").spilled_total
    }

    /// The ids of every object held.
    pub fn ids(&self) -> Vec<String> {
        self.inner
            .lock()
            .expect("object store lock")
            .objects
            .keys()
            .cloned()
            .collect()
    }

    /// Bytes of object `id`, if held.
    pub fn bytes_of(&self, id: &str) -> Option<u64> {
        match self
            .inner
            .lock()
            .expect("object store lock")
            .objects
            .get(id)?
        {
            Stored::Memory(_, b) | Stored::Shared(_, b) | Stored::Spilled(_, b) => Some(*b),
        }
    }

    /// Whether the store holds `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.inner
            .lock()
            .expect("object store lock")
            .objects
            .contains_key(id)
    }
}

/// Writes `batches` as an Arrow IPC file (a spilled or shared object), its buffers
/// compressed with `compression`.
pub(super) fn write_file(
    path: &Path,
    batches: &[RecordBatch],
    compression: ObjectCompression,
) -> Result<()> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    one_schema(batches)?;
    let file = std::fs::File::create(path)?;
    let mut w = FileWriter::try_new_with_options(
        std::io::BufWriter::new(file),
        &schema,
        compression.ipc_options()?,
    )?;
    for b in batches {
        w.write(b)?;
    }
    w.finish()?;
    Ok(())
}

/// An error unless `batches` have the same column names and types (an object is one
/// IPC stream or file, decoded with the first batch's schema; nullability and metadata
/// may differ).
pub(crate) fn one_schema(batches: &[RecordBatch]) -> Result<()> {
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let columns = |b: &RecordBatch| -> Vec<(String, arrow::datatypes::DataType)> {
        b.schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect()
    };
    let want = columns(first);
    match batches.iter().enumerate().find(|(_, b)| columns(b) != want) {
        Some((i, b)) => Err(VolleyError::execution(format!(
            "an object's batches must share one schema: batch {i} has {:?}, the first {want:?}",
            columns(b)
        ))),
        None => Ok(()),
    }
}

/// The batches of an Arrow IPC file (a spilled or shared object).
pub(super) fn read_file(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| {
        VolleyError::Io(e).context(format!("cannot read object file {}", path.display()))
    })?;
    let reader = own_file_reader(file)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// A reader of an object file this node's store holds (shared or spilled), without
/// validating the arrays it decodes.
pub(super) fn own_file_reader(
    file: std::fs::File,
) -> Result<FileReader<std::io::BufReader<std::fs::File>>> {
    let reader = FileReader::try_new(std::io::BufReader::new(file), None)?;
    // SAFETY: the store's files are written by volley processes of this node with
    // arrow's IPC writer (`write_file`), under names of their own, and are not written
    // again while they are read; DataFusion trusts its spill files on the same grounds.
    // Validating them (every offset, every string's UTF-8) cost ~10% of a cluster
    // sort's CPU. The footer and each message's metadata are still checked.
    #[allow(unsafe_code)]
    Ok(unsafe { reader.with_skip_validation(true) })
}

/// Batch `i` of the Arrow IPC file at `path` (nothing if the file has no batches),
/// read through the file's index.
pub(super) fn read_file_batch(path: &Path, i: u32) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| {
        VolleyError::Io(e).context(format!("cannot read object file {}", path.display()))
    })?;
    let mut reader = own_file_reader(file)?;
    let n = reader.num_batches();
    if n == 0 {
        return Ok(vec![]);
    }
    if i as usize >= n {
        return Err(VolleyError::execution(format!(
            "object file {} has {n} batches; batch {i} was asked for",
            path.display()
        )));
    }
    reader.set_index(i as usize)?;
    let batch = reader.next().transpose()?.ok_or_else(|| {
        VolleyError::execution(format!(
            "object file {}: batch {i} is missing",
            path.display()
        ))
    })?;
    Ok(vec![batch])
}

impl StoreInner {
    /// Whether `id` is still held as `what` was taken to be spilled (not freed,
    /// replaced or spilled since).
    fn holds_unspilled(&self, id: &str, what: &ToSpill) -> bool {
        match (self.objects.get(id), what) {
            (Some(Stored::Memory(b, _)), ToSpill::Batches(was)) => Arc::ptr_eq(b, was),
            (Some(Stored::Shared(p, _)), ToSpill::File(was)) => p == was,
            _ => false,
        }
    }

    fn remove(&mut self, id: &str) {
        match self.objects.remove(id) {
            Some(Stored::Memory(_, n)) => {
                self.memory_bytes = self.memory_bytes.saturating_sub(n);
                self.order.retain(|o| o != id);
            }
            Some(Stored::Shared(p, n)) => {
                self.memory_bytes = self.memory_bytes.saturating_sub(n);
                self.order.retain(|o| o != id);
                let _ = std::fs::remove_file(p);
            }
            Some(Stored::Spilled(p, n)) => {
                self.spilled_bytes = self.spilled_bytes.saturating_sub(n);
                let _ = std::fs::remove_file(p);
            }
            None => {}
        }
    }
}

pub(super) fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
