//! Objects: the immutable blocks tasks produce, kept in the object store of the node
//! that produced them and moved between nodes over Arrow Flight.
//!
//! Each node agent runs one [`ObjectStore`] and serves it with [`FlightObjects`]: a
//! `DoGet` with the object id as ticket streams the object's batches; a `DoPut` whose
//! descriptor path is the object id stores one. The store keeps objects in memory up to
//! its limit and spills the oldest to Arrow IPC files beyond it, so a node never holds
//! more than its limit in memory however much its tasks produce.
//!
//! Between a node's workers and its store, big objects skip Flight: a worker writes its
//! result as an Arrow IPC file into the node's shared-memory folder (`/dev/shm`) and
//! hands it over (`DoAction` `adopt`); a worker reading an object of its own node asks
//! where its file is (`locate`) and reads it. Such objects count as memory, spill like
//! the others, and are served over Flight to other nodes from their files.
//!
//! The files and the Flight messages carry Arrow IPC buffers compressed as the node's
//! [`ObjectCompression`] says: by default ([`ObjectCompression::Auto`]) objects sent to
//! another host go LZ4-compressed and nothing else is (on one host compression only
//! costs CPU); `lz4` or `zstd` compress files too, so a map output takes less of the
//! node's memory and spills later. Readers need no setting: each IPC message says how
//! its buffers are compressed.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::reader::{FileReader, StreamReader};
use arrow::ipc::writer::{FileWriter, IpcWriteOptions, StreamWriter};
use arrow::ipc::CompressionType;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};
use volley_common::{Result, VolleyError};

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
}

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

/// Bytes of a list of batches, as the store counts them.
pub fn batches_size(batches: &[RecordBatch]) -> u64 {
    volley_common::batches_memory(batches)
}

/// The variable telling the workers and drivers a node starts how it compresses
/// objects (its [`ObjectCompression`]).
pub(crate) const COMPRESSION_VAR: &str = "VOLLEY_OBJECT_COMPRESSION";

/// How a node compresses the Arrow buffers of the objects it writes to files (handed
/// over by workers, spilled) and sends over Flight. Compression is per buffer, as the
/// Arrow IPC format defines it, so any reader decodes it without being told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ObjectCompression {
    /// LZ4 for objects sent to another host ([`Self::for_peer`]), nothing for files
    /// and transfers within a host. On one 2-core machine LZ4 made the 22 TPC-H
    /// queries on a 2-node cluster 23% slower (`bench/results/sql-cluster-2core.md`).
    #[default]
    Auto,
    /// Buffers as they are in memory: no CPU spent, the most bytes kept and moved.
    None,
    /// LZ4 frames: fast enough to cost little next to the work that makes the data,
    /// and typically halves the bytes of columnar data.
    Lz4,
    /// Zstandard: fewer bytes than LZ4 for more CPU; for slow networks or disks.
    Zstd,
}

impl ObjectCompression {
    /// Its name, as `--object-compression` takes it.
    pub fn name(self) -> &'static str {
        match self {
            ObjectCompression::Auto => "auto",
            ObjectCompression::None => "none",
            ObjectCompression::Lz4 => "lz4",
            ObjectCompression::Zstd => "zstd",
        }
    }

    /// The compression a process started by a node agent was told to use
    /// ([`COMPRESSION_VAR`]); the default elsewhere.
    pub(crate) fn from_env() -> Result<Self> {
        match volley_common::env_var(COMPRESSION_VAR)? {
            Some(v) if !v.is_empty() => v
                .parse()
                .map_err(|e: VolleyError| e.context(format!("${COMPRESSION_VAR}"))),
            _ => Ok(Self::default()),
        }
    }

    /// The compression of a transfer to a peer on another host (`remote`) or this one.
    pub fn for_peer(self, remote: bool) -> Self {
        match self {
            ObjectCompression::Auto if remote => ObjectCompression::Lz4,
            ObjectCompression::Auto => ObjectCompression::None,
            c => c,
        }
    }

    /// The IPC codec of its buffers (`Auto` as it writes files: none).
    fn codec(self) -> Option<CompressionType> {
        match self {
            ObjectCompression::Auto | ObjectCompression::None => None,
            ObjectCompression::Lz4 => Some(CompressionType::LZ4_FRAME),
            ObjectCompression::Zstd => Some(CompressionType::ZSTD),
        }
    }

    fn ipc_options(self) -> Result<IpcWriteOptions> {
        Ok(IpcWriteOptions::default().try_with_compression(self.codec())?)
    }
}

impl std::str::FromStr for ObjectCompression {
    type Err = VolleyError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(ObjectCompression::Auto),
            "none" => Ok(ObjectCompression::None),
            "lz4" => Ok(ObjectCompression::Lz4),
            "zstd" => Ok(ObjectCompression::Zstd),
            _ => Err(VolleyError::Config(format!(
                "object compression {s:?}: expected auto, none, lz4 or zstd"
            ))),
        }
    }
}

impl std::fmt::Display for ObjectCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
        self.insert(id, Stored::Shared(path, bytes), bytes)?;
        Ok(bytes)
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
            // Pick the oldest objects until what stays fits.
            let mut over = s.memory_bytes.saturating_sub(self.memory_limit);
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
        for (old, what, n) in to_spill {
            self.spill(&old, what, n)?;
        }
        Ok(())
    }

    fn spill(&self, id: &str, what: ToSpill, bytes: u64) -> Result<()> {
        std::fs::create_dir_all(&self.spill_dir)?;
        // A name of its own: an object put again while a reader holds its earlier
        // spill file gets a new file, and the earlier one is never written again.
        let path = self.spill_dir.join(format!(
            "{}-{:016x}.arrow",
            sanitize(id),
            rand::random::<u64>()
        ));
        let written = match &what {
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
        let current = match (s.objects.get(id), &what) {
            (Some(Stored::Memory(b, _)), ToSpill::Batches(was)) => Arc::ptr_eq(b, was),
            (Some(Stored::Shared(p, _)), ToSpill::File(was)) => p == was,
            _ => false,
        };
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
        let path = {
            let s = self.inner.lock().expect("object store lock");
            match s.objects.get(id) {
                None => return Ok(None),
                Some(Stored::Memory(b, _)) => return Ok(Some(Arc::clone(b))),
                Some(Stored::Shared(p, _) | Stored::Spilled(p, _)) => p.clone(),
            }
        };
        Ok(Some(Arc::new(read_file(&path)?)))
    }

    /// Batch `i` of object `id` (nothing for an object without batches); `None` if it
    /// is not here. A file is read at that batch only (the IPC file's footer indexes
    /// its batches).
    pub fn get_batch(&self, id: &str, i: u32) -> Result<Option<Vec<RecordBatch>>> {
        let (path, shared) = {
            let s = self.inner.lock().expect("object store lock");
            match s.objects.get(id) {
                None => return Ok(None),
                Some(Stored::Memory(b, _)) => {
                    return Selection::Batch(i).apply(id, b.to_vec()).map(Some);
                }
                Some(Stored::Shared(p, _)) => (p.clone(), true),
                Some(Stored::Spilled(p, _)) => (p.clone(), false),
            }
        };
        // A shared file is mapped; a spill file (on disk) is read.
        if shared {
            map_shared_file(&path, Some(i)).map(Some)
        } else {
            read_file_batch(&path, i).map(Some)
        }
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
fn write_file(path: &Path, batches: &[RecordBatch], compression: ObjectCompression) -> Result<()> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
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

/// The batches of an Arrow IPC file (a spilled or shared object).
pub(crate) fn read_file(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| {
        VolleyError::Io(e).context(format!("cannot read object file {}", path.display()))
    })?;
    let reader = own_file_reader(file)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

/// A reader of an object file this node's store holds (shared or spilled), without
/// validating the arrays it decodes.
fn own_file_reader(file: std::fs::File) -> Result<FileReader<std::io::BufReader<std::fs::File>>> {
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
pub(crate) fn read_file_batch(path: &Path, i: u32) -> Result<Vec<RecordBatch>> {
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

fn sanitize(id: &str) -> String {
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

/// The Arrow Flight face of an [`ObjectStore`].
#[derive(Debug, Clone)]
pub struct FlightObjects {
    store: Arc<ObjectStore>,
}

impl FlightObjects {
    /// Serves `store`.
    pub fn new(store: Arc<ObjectStore>) -> Self {
        Self { store }
    }

    /// Runs `f` on the store off the async threads: reading, writing and spilling
    /// objects of hundreds of MB is blocking file work, and the agent's heartbeats and
    /// task reports share those threads (a node busy moving objects must not look dead).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ObjectStore) -> T + Send + 'static,
    ) -> std::result::Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("the object store's thread failed: {e}")))
    }
}

type BoxedStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

fn unsupported<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what}: a volley object store only serves DoGet and DoPut"
    )))
}

#[tonic::async_trait]
impl FlightService for FlightObjects {
    type HandshakeStream = BoxedStream<HandshakeResponse>;
    type ListFlightsStream = BoxedStream<FlightInfo>;
    type DoGetStream = BoxedStream<FlightData>;
    type DoPutStream = BoxedStream<PutResult>;
    type DoExchangeStream = BoxedStream<FlightData>;
    type DoActionStream = BoxedStream<arrow_flight::Result>;
    type ListActionsStream = BoxedStream<ActionType>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unsupported("Handshake")
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("ListFlights")
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        unsupported("GetFlightInfo")
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        unsupported("PollFlightInfo")
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        unsupported("GetSchema")
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("DoExchange")
    }
    /// `adopt` (body: the object id, a NUL, the file's name in the shared folder): the
    /// file becomes the object; answers its size. `locate` (body: the object id):
    /// answers the path of the object's file if it is a shared one, else nothing.
    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let body = std::str::from_utf8(&action.body)
            .map_err(|_| Status::invalid_argument("an action body must be UTF-8"))?;
        let answer = match action.r#type.as_str() {
            ACTION_ADOPT => {
                let (id, name) = body
                    .split_once('\0')
                    .ok_or_else(|| Status::invalid_argument("adopt: `id\\0file` expected"))?;
                let (id, name) = (id.to_string(), name.to_string());
                let bytes = self
                    .blocking(move |store| store.adopt(&id, &name))
                    .await?
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                bytes.to_string()
            }
            ACTION_LOCATE => self
                .store
                .locate(body)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            other => return unsupported(&format!("the action {other:?}")),
        };
        let result = arrow_flight::Result {
            body: answer.into_bytes().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(result)]))))
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        unsupported("ListActions")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let (id, selection) = parse_ticket(&request.get_ref().ticket)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Unknown addresses (not TCP) count as this host.
        let remote = match (request.remote_addr(), request.local_addr()) {
            (Some(from), Some(here)) => from.ip() != here.ip(),
            _ => false,
        };
        let compression = self.store.compression().for_peer(remote);
        // The store writes its files with its own compression (`Auto`: none).
        let as_filed = self.store.compression().codec() == compression.codec();
        if let (Selection::Batch(i), true) = (selection, as_filed) {
            // A partition of a map output held as a file goes out as the file's own
            // IPC message, where its compression is the one the peer gets.
            let key = id.clone();
            let found = self
                .blocking(move |store| {
                    let path = store.locate(&key)?;
                    file_batch_messages(&path, i, compression).ok().flatten()
                })
                .await?;
            if let Some(messages) = found {
                return Ok(Response::new(Box::pin(futures::stream::iter(
                    messages.into_iter().map(Ok),
                ))));
            }
        }
        let not_here = || Status::not_found(format!("object {id} is not on this node"));
        let internal = |e: VolleyError| Status::internal(e.to_string());
        let key = id.clone();
        let found = self
            .blocking(move |store| match selection {
                Selection::Batch(i) => store.get_batch(&key, i),
                Selection::All | Selection::Whole | Selection::Rows { .. } => store
                    .get(&key)
                    .map(|all| all.map(|all| all.iter().cloned().collect())),
            })
            .await?;
        let batches: Vec<RecordBatch> = found.map_err(internal)?.ok_or_else(not_here)?;
        let batches = match selection {
            Selection::Rows { offset, rows } => slice_rows(&batches, offset, rows)
                .map_err(|e| Status::out_of_range(format!("object {id}: {e}")))?,
            Selection::All | Selection::Batch(_) | Selection::Whole => batches,
        };
        let schema = batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(Schema::empty()));
        // Whole: Flight sends no empty batch, so the schema message carries every
        // batch's rows and the reader puts the empty ones back (`fetch_whole`).
        let rows_per_batch = (selection == Selection::Whole).then(|| {
            batches
                .iter()
                .map(|b| b.num_rows().to_string())
                .collect::<Vec<_>>()
                .join(",")
        });
        let pieces = if selection == Selection::Whole {
            batches
                .into_iter()
                .filter(|b| b.num_rows() > 0)
                .map(volley_common::compact_bloated_views)
                .collect::<Result<Vec<_>>>()
        } else {
            for_flight(batches)
        };
        let items: Vec<std::result::Result<RecordBatch, FlightError>> = pieces
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(Ok)
            .collect();
        let mut encoder = flight_encoder(schema, compression).map_err(internal)?;
        if let Some(rows) = rows_per_batch {
            encoder = encoder.with_metadata(rows.into());
        }
        let stream = encoder
            .build(futures::stream::iter(items))
            .map_err(|e| Status::internal(e.to_string()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        let mut input = request.into_inner().peekable();
        let first = Pin::new(&mut input)
            .peek()
            .await
            .ok_or_else(|| Status::invalid_argument("DoPut with no data"))?;
        let id = match first {
            Ok(data) => data
                .flight_descriptor
                .as_ref()
                .and_then(|d| d.path.first().cloned())
                .ok_or_else(|| {
                    Status::invalid_argument("DoPut: the descriptor must name the object")
                })?,
            Err(e) => return Err(e.clone()),
        };
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(
            input.map_err(|e| FlightError::Tonic(Box::new(e))),
        )
        .try_collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("DoPut {id}: {e}")))?;
        let bytes = self
            .blocking(move |store| store.put(&id, batches))
            .await?
            .map_err(|e| Status::internal(e.to_string()))?;
        let result = PutResult {
            app_metadata: bytes.to_string().into_bytes().into(),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(result)]))))
    }
}

/// The largest object, as an Arrow IPC stream, that travels inline with its metadata:
/// in a worker's result report, kept by the head, and handed to the tasks and drivers
/// that read it, which then skip a Flight round trip. Like Ray's inlined small objects,
/// this is what lets many tiny tasks (a number, a file name) go fast; bigger objects
/// stay on their node and move over Flight.
pub(crate) const INLINE_LIMIT: usize = 100 * 1024;

/// `batches` as one Arrow IPC stream if it fits [`INLINE_LIMIT`] (and the batches share
/// one schema); `None` otherwise.
pub(crate) fn encode_inline(batches: &[RecordBatch]) -> Option<Vec<u8>> {
    // In-memory size bounds the stream's size loosely (buffers are padded, slices
    // count their whole buffers): a cheap way to skip encoding big objects.
    if batches_size(batches) > 4 * INLINE_LIMIT as u64 {
        return None;
    }
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    if batches.iter().any(|b| b.schema() != schema) {
        return None;
    }
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &schema).ok()?;
    for b in batches {
        w.write(b).ok()?;
    }
    w.finish().ok()?;
    drop(w);
    (out.len() <= INLINE_LIMIT).then_some(out)
}

/// Reads back what [`encode_inline`] made of object `id`.
pub(crate) fn decode_inline(id: &str, bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .and_then(|r| r.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| VolleyError::internal(format!("object {id}: unreadable inline copy: {e}")))
}

/// Bytes of a Flight message's batch, about.
const FLIGHT_PIECE_BYTES: u64 = 2 << 20;

/// Rows of a Flight message at most where a batch has view columns.
const FLIGHT_VIEW_ROWS: usize = 16 * 1024;

/// `batches` cut into the pieces Flight sends, one message each, of about
/// [`FLIGHT_PIECE_BYTES`] (at most [`FLIGHT_VIEW_ROWS`] rows with view columns), each
/// view column's piece holding the strings it uses only.
///
/// Flight's encoder would cut a batch itself, by `get_buffer_memory_size`, which counts
/// a shared buffer once per array: a batch read from an IPC file (one body that every
/// column slices) looked tens of times its size and went out in hundreds of slices, and
/// a slice of a view column (`Utf8View`, `BinaryView`) is encoded with every data buffer
/// of the column, so a 2 MB partition went out as over 64 MB of messages. The pieces
/// made here are cut by the bytes there are, and the encoders are told to leave them
/// whole ([`flight_encoder`]). The cut is by bytes in memory, before compression.
fn for_flight(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        let rows = b.num_rows();
        let bytes = volley_common::batch_memory(&b).max(1);
        let mut per_piece = ((rows as u64 * FLIGHT_PIECE_BYTES) / bytes).max(1) as usize;
        let views = volley_common::has_view_columns(&b);
        if views {
            per_piece = per_piece.min(FLIGHT_VIEW_ROWS);
        }
        if per_piece >= rows {
            out.push(if views {
                volley_common::compact_bloated_views(b)?
            } else {
                b
            });
            continue;
        }
        let mut start = 0;
        while start < rows {
            let piece = b.slice(start, per_piece.min(rows - start));
            start += piece.num_rows();
            out.push(volley_common::compact_bloated_views(piece)?);
        }
    }
    Ok(out)
}

/// Flight's encoder for pieces made by [`for_flight`]: it sends each as one message
/// (its own cutting is what [`for_flight`] replaces; a limit it could reach would cut a
/// piece whose buffers slice a larger body again). Buffers are compressed with
/// `compression`.
fn flight_encoder(
    schema: SchemaRef,
    compression: ObjectCompression,
) -> Result<FlightDataEncoderBuilder> {
    Ok(FlightDataEncoderBuilder::new()
        .with_options(compression.ipc_options()?)
        .with_schema(schema)
        .with_max_flight_data_size(usize::MAX))
}

/// Reads an object from the Flight endpoint at `address`.
pub(crate) async fn fetch(
    channels: &super::net::Channels,
    address: &str,
    id: &str,
) -> Result<Vec<RecordBatch>> {
    fetch_range(channels, address, id, Selection::All).await
}

/// What part of an object a read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// All of it.
    All,
    /// Rows `offset..offset + rows` of its batches taken as one sequence.
    Rows { offset: u64, rows: u64 },
    /// Its batch `i` (a partition of an exchange's map output).
    Batch(u32),
    /// All of it, each batch sent whole, so the reader gets the same batches (a copy
    /// whose batches are partitions read one by one). Each batch must fit a message.
    Whole,
}

impl Selection {
    /// The selection of a task input: one batch, or all of it.
    pub(crate) fn of_batch(batch: Option<u32>) -> Self {
        batch.map_or(Selection::All, Selection::Batch)
    }

    /// The selected part of `batches` (all of an object).
    pub(crate) fn apply(self, id: &str, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        match self {
            Selection::All | Selection::Whole => Ok(batches),
            Selection::Rows { offset, rows } => {
                slice_rows(&batches, offset, rows).map_err(|e| e.context(format!("object {id}")))
            }
            // An object without batches (a map task's empty input) has no rows in
            // any partition.
            Selection::Batch(_) if batches.is_empty() => Ok(batches),
            Selection::Batch(i) => {
                let n = batches.len();
                batches
                    .into_iter()
                    .nth(i as usize)
                    .map(|b| vec![b])
                    .ok_or_else(|| {
                        VolleyError::execution(format!(
                            "object {id} has {n} batches; batch {i} was asked for"
                        ))
                    })
            }
        }
    }
}

/// The `selection` of object `id`, fetched from the store at `address`: the node cuts
/// it, so only those rows travel.
pub(crate) async fn fetch_range(
    channels: &super::net::Channels,
    address: &str,
    id: &str,
    selection: Selection,
) -> Result<Vec<RecordBatch>> {
    let mut client = channels.flight(address).await?;
    let stream = client
        .do_get(Ticket {
            ticket: ticket(id, selection).into(),
        })
        .await
        .map_err(|e| {
            VolleyError::execution(format!("cannot fetch object {id} from {address}: {e}"))
        })?;
    FlightRecordBatchStream::new(from_a_store(stream.into_inner()))
        .try_collect()
        .await
        .map_err(|e| {
            VolleyError::execution(format!("cannot fetch object {id} from {address}: {e}"))
        })
}

/// `decoder`, told not to validate the arrays it decodes: what a node's store sends
/// over Flight.
fn from_a_store(
    decoder: arrow_flight::decode::FlightDataDecoder,
) -> arrow_flight::decode::FlightDataDecoder {
    // SAFETY: the sender is a volley node's store, which encodes batches that volley
    // processes made or read back from its own files, over a connection that carried the
    // cluster's token; anyone holding that token can already run any program on every
    // node, so trusting the bytes widens nothing. Validating them (every offset, every
    // string's UTF-8) cost ~5% of a cluster sort's CPU.
    #[allow(unsafe_code)]
    unsafe {
        decoder.with_skip_validation()
    }
}

/// Object `id` from the store at `address` with the batches it has there, empty ones
/// included (a map output's batches are its partitions, read by index).
pub(crate) async fn fetch_whole(
    channels: &super::net::Channels,
    address: &str,
    id: &str,
) -> Result<Vec<RecordBatch>> {
    use arrow_flight::decode::DecodedPayload;
    let failed = |e: &dyn std::fmt::Display| {
        VolleyError::execution(format!("cannot copy object {id} from {address}: {e}"))
    };
    let mut client = channels.flight(address).await?;
    let decoder = client
        .do_get(Ticket {
            ticket: ticket(id, Selection::Whole).into(),
        })
        .await
        .map_err(|e| failed(&e))?
        .into_inner();
    let mut decoder = from_a_store(decoder);
    let mut schema = None;
    let mut rows: Vec<usize> = Vec::new();
    let mut sent = VecDeque::new();
    while let Some(d) = decoder.next().await {
        let d = d.map_err(|e| failed(&e))?;
        match d.payload {
            DecodedPayload::Schema(s) => {
                let text = String::from_utf8_lossy(&d.inner.app_metadata).to_string();
                rows = text
                    .split(',')
                    .filter(|r| !r.is_empty())
                    .map(|r| {
                        r.parse()
                            .map_err(|_| failed(&format!("bad batch rows {text:?}")))
                    })
                    .collect::<Result<_>>()?;
                schema = Some(s);
            }
            DecodedPayload::RecordBatch(b) => sent.push_back(b),
            DecodedPayload::None => {}
        }
    }
    let schema = schema.unwrap_or_else(|| Arc::new(Schema::empty()));
    let mut out = Vec::with_capacity(rows.len());
    for n in rows {
        if n == 0 {
            out.push(RecordBatch::new_empty(Arc::clone(&schema)));
            continue;
        }
        match sent.pop_front() {
            Some(b) if b.num_rows() == n => out.push(b),
            _ => return Err(failed(&"its batches did not come as sent")),
        }
    }
    if !sent.is_empty() {
        return Err(failed(&"more batches came than were sent"));
    }
    Ok(out)
}

/// Stores `batches` as object `id` in the store at `address`, sent compressed with
/// `compression`; returns its size in bytes.
pub(crate) async fn store(
    channels: &super::net::Channels,
    address: &str,
    id: &str,
    batches: Vec<RecordBatch>,
    compression: ObjectCompression,
) -> Result<u64> {
    let mut client = channels.flight(address).await?;
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(Schema::empty()));
    let items: Vec<std::result::Result<RecordBatch, FlightError>> =
        for_flight(batches)?.into_iter().map(Ok).collect();
    let data = flight_encoder(schema, compression)?
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec![id.to_string()])))
        .build(futures::stream::iter(items));
    let results: Vec<PutResult> = client
        .do_put(data)
        .await
        .map_err(|e| VolleyError::execution(format!("cannot store object {id} at {address}: {e}")))?
        .try_collect()
        .await
        .map_err(|e| {
            VolleyError::execution(format!("cannot store object {id} at {address}: {e}"))
        })?;
    Ok(results
        .first()
        .and_then(|r| std::str::from_utf8(&r.app_metadata).ok()?.parse().ok())
        .unwrap_or(0))
}

/// The variable naming a node's shared folder to the workers it starts.
pub(crate) const SHARED_DIR_VAR: &str = "VOLLEY_SHARED_DIR";

/// A node's folder in shared memory (`/dev/shm`) for objects handed over as files,
/// removed with the node; `None` where there is no shared memory to use. Folders left
/// by nodes that died are removed first.
pub(crate) fn make_shared_dir() -> Option<PathBuf> {
    let root = Path::new("/dev/shm");
    if !root.is_dir() {
        return None;
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("volley-objects-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = root.join(format!(
        "volley-objects-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

const ACTION_ADOPT: &str = "adopt";
const ACTION_LOCATE: &str = "locate";

/// Runs a `DoAction` on the store at `address`; returns the first result's body.
async fn action(
    channels: &super::net::Channels,
    address: &str,
    kind: &str,
    body: String,
) -> Result<String> {
    let mut client = channels.flight(address).await?;
    let mut results = client
        .do_action(Action {
            r#type: kind.to_string(),
            body: body.into_bytes().into(),
        })
        .await
        .map_err(|e| VolleyError::execution(format!("{kind} at {address}: {e}")))?;
    let first = results
        .try_next()
        .await
        .map_err(|e| VolleyError::execution(format!("{kind} at {address}: {e}")))?;
    Ok(first
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default())
}

/// Hands `batches` to the store of this node at `address` as a file in its shared
/// folder `dir` (no Flight transfer), compressed with `compression`; returns the
/// object's size (the file's).
pub(crate) async fn store_shared(
    channels: &super::net::Channels,
    address: &str,
    dir: &Path,
    id: &str,
    batches: &[RecordBatch],
    compression: ObjectCompression,
) -> Result<u64> {
    let name = format!("{}-{:016x}.arrow", sanitize(id), rand::random::<u64>());
    let path = dir.join(&name);
    let adopted = match write_file(&path, batches, compression) {
        Ok(()) => action(channels, address, ACTION_ADOPT, format!("{id}\0{name}"))
            .await
            .and_then(|b| {
                b.parse::<u64>()
                    .map_err(|_| VolleyError::execution(format!("adopt {id}: answered {b:?}")))
            }),
        Err(e) => Err(e),
    };
    if adopted.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    adopted
}

/// Object `id` read from its file in this node's shared folder, if the store at
/// `address` (this node's) holds it as one; `None` when it must travel over Flight.
pub(crate) async fn fetch_shared(
    channels: &super::net::Channels,
    address: &str,
    id: &str,
    batch: Option<u32>,
) -> Option<Vec<RecordBatch>> {
    let path = action(channels, address, ACTION_LOCATE, id.to_string())
        .await
        .ok()
        .filter(|p| !p.is_empty())?;
    // The store may spill or free it meanwhile: then Flight says where it went.
    map_shared_file(Path::new(&path), batch).ok()
}

/// The batches of an Arrow IPC file in a node's shared folder (all, or batch `i`),
/// mapped into memory rather than read: their buffers are the file's pages, shared
/// with the node's store, not copies (the file is not compressed: see
/// [`ObjectCompression::Auto`]). While a batch lives it keeps the file's pages, even
/// once the store has freed or spilled the object.
fn map_shared_file(path: &Path, batch: Option<u32>) -> Result<Vec<RecordBatch>> {
    decode_ipc_file(map_file(path)?, batch)
        .map_err(|e| e.context(format!("object file {}", path.display())))
}

/// The file at `path` (one of a node's shared objects) mapped into memory.
fn map_file(path: &Path) -> Result<Arc<memmap2::Mmap>> {
    let file = std::fs::File::open(path).map_err(|e| {
        VolleyError::Io(e).context(format!("cannot read object file {}", path.display()))
    })?;
    // SAFETY: a file of the shared folder is written once, under a name of its own,
    // before the store takes it, and never written again (a re-run task writes a new
    // file): its pages do not change under the mapping. Removing it (the object freed
    // or spilled) keeps the mapped pages until the batches are dropped.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
        VolleyError::Io(e).context(format!("cannot map object file {}", path.display()))
    })?;
    Ok(Arc::new(map))
}

fn not_ipc(what: String) -> VolleyError {
    VolleyError::execution(format!("not an Arrow IPC file: {what}"))
}

/// The footer of the Arrow IPC file `bytes`, and where it starts.
fn ipc_footer(bytes: &[u8]) -> Result<(arrow::ipc::Footer<'_>, usize)> {
    let len = bytes.len();
    let trailer: [u8; 10] = bytes
        .get(len.saturating_sub(10)..)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| not_ipc(format!("{len} bytes")))?;
    let footer_len = arrow::ipc::reader::read_footer_length(trailer)?;
    let footer_start = (len - 10)
        .checked_sub(footer_len)
        .ok_or_else(|| not_ipc(format!("a footer of {footer_len} bytes in {len}")))?;
    let footer = arrow::ipc::root_as_footer(&bytes[footer_start..len - 10])
        .map_err(|e| not_ipc(format!("its footer: {e}")))?;
    Ok((footer, footer_start))
}

/// Where `block`'s message lies in a file whose footer starts at `footer_start`:
/// `(start, header and prefix, body)` bytes. A message starts with its 8-byte prefix,
/// and ends before the footer.
fn block_range(block: &arrow::ipc::Block, footer_start: usize) -> Result<(usize, usize, usize)> {
    let (start, meta, body) = (
        usize::try_from(block.offset()).ok(),
        usize::try_from(block.metaDataLength()).ok(),
        usize::try_from(block.bodyLength()).ok(),
    );
    match (start, meta, body) {
        (Some(start), Some(meta), Some(body))
            if meta >= 8
                && start
                    .checked_add(meta)
                    .and_then(|m| m.checked_add(body))
                    .is_some_and(|end| end <= footer_start) =>
        {
            Ok((start, meta, body))
        }
        _ => Err(not_ipc(format!(
            "a block at {} of {} + {} bytes",
            block.offset(),
            block.metaDataLength(),
            block.bodyLength()
        ))),
    }
}

/// A range of a file's bytes, owned as one allocation: a batch decoded from it counts
/// its own block's bytes, not the whole file's (memory pools and Flight's piece sizes
/// count a buffer by its allocation).
struct FileRange<T> {
    file: Arc<T>,
    start: usize,
    len: usize,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for FileRange<T> {
    fn as_ref(&self) -> &[u8] {
        &self.file.as_ref().as_ref()[self.start..self.start + self.len]
    }
}

/// The largest message [`file_batch_messages`] sends as it is in the file; a larger
/// batch is cut into pieces by the encoder's path.
const PASSTHROUGH_MAX_BYTES: usize = 64 << 20;

/// Batch `i` of the Arrow IPC file at `path` (a shared object's) as the Flight messages
/// that send it (its schema, then the batch's message unless it has no rows), its
/// header and body taken from the file as they are: no decoding, no copying of views
/// into pieces, no encoding again, the body a range of the file's mapped pages.
///
/// `None` where the file cannot be sent as it is: its buffers are compressed otherwise
/// than `compression` asks, it holds dictionaries, or the batch is larger than
/// [`PASSTHROUGH_MAX_BYTES`] (the encoder's path then sends it in pieces).
fn file_batch_messages(
    path: &Path,
    i: u32,
    compression: ObjectCompression,
) -> Result<Option<Vec<FlightData>>> {
    let map = map_file(path)?;
    let bytes: &[u8] = &map;
    let (footer, footer_start) = ipc_footer(bytes)?;
    if footer.dictionaries().is_some_and(|d| !d.is_empty()) {
        return Ok(None);
    }
    let schema = footer
        .schema()
        .map(arrow::ipc::convert::fb_to_schema)
        .ok_or_else(|| not_ipc("no schema".into()))?;
    // The encoder sends dictionaries' values in their place (and their schema so).
    let dictionary = |f: &&arrow::datatypes::Field| {
        matches!(f.data_type(), arrow::datatypes::DataType::Dictionary(..))
    };
    if schema.flattened_fields().iter().any(dictionary) {
        return Ok(None);
    }
    let options = IpcWriteOptions::default();
    let mut messages = vec![FlightData::from(arrow_flight::SchemaAsIpc::new(
        &schema, &options,
    ))];
    let blocks = footer
        .recordBatches()
        .ok_or_else(|| not_ipc("no batch index".into()))?;
    if blocks.is_empty() {
        // No batches (a map task's empty input): no rows in any partition.
        return Ok(Some(messages));
    }
    let Some(block) = blocks.iter().nth(i as usize) else {
        // The decoding path says what is wrong.
        return Ok(None);
    };
    let (start, meta, body) = block_range(block, footer_start)?;
    // The message: a continuation marker, its header's length, the header (padded),
    // then the body.
    if body > PASSTHROUGH_MAX_BYTES || bytes[start..start + 4] != [0xff; 4] {
        return Ok(None);
    }
    let header = &bytes[start + 8..start + meta];
    let message =
        arrow::ipc::root_as_message(header).map_err(|e| not_ipc(format!("a message: {e}")))?;
    let batch = message
        .header_as_record_batch()
        .ok_or_else(|| not_ipc("a block that is not a record batch".into()))?;
    if batch.compression().map(|c| c.codec()) != compression.codec() {
        return Ok(None);
    }
    if batch.length() == 0 {
        // Flight sends no empty batch.
        return Ok(Some(messages));
    }
    let body = FileRange {
        file: Arc::clone(&map),
        start: start + meta,
        len: body,
    };
    messages.push(FlightData {
        data_header: bytes::Bytes::copy_from_slice(header),
        data_body: bytes::Bytes::from_owner(body),
        ..Default::default()
    });
    Ok(Some(messages))
}

/// The batches of the Arrow IPC file `file` (all, or batch `i`), decoded without
/// copying their buffers; each block of the file is an allocation of its own.
fn decode_ipc_file<T>(file: Arc<T>, batch: Option<u32>) -> Result<Vec<RecordBatch>>
where
    T: AsRef<[u8]> + Send + Sync + 'static,
{
    use arrow::ipc::reader::FileDecoder;
    let bytes: &[u8] = file.as_ref().as_ref();
    let (footer, footer_start) = ipc_footer(bytes)?;
    let schema = footer
        .schema()
        .map(arrow::ipc::convert::fb_to_schema)
        .ok_or_else(|| not_ipc("no schema".into()))?;
    let decoder = FileDecoder::new(Arc::new(schema), footer.version());
    // SAFETY: the files decoded here are the node's shared objects, written as in
    // `own_file_reader` and never written again.
    #[allow(unsafe_code)]
    let mut decoder = unsafe { decoder.with_skip_validation(true) };
    let block_data = |block: &arrow::ipc::Block| {
        let (start, meta, body) = block_range(block, footer_start)?;
        let range = FileRange {
            file: Arc::clone(&file),
            start,
            len: meta + body,
        };
        Ok::<_, VolleyError>(arrow::buffer::Buffer::from(bytes::Bytes::from_owner(range)))
    };

    for block in footer.dictionaries().iter().flatten() {
        decoder.read_dictionary(block, &block_data(block)?)?;
    }
    let blocks = footer
        .recordBatches()
        .ok_or_else(|| not_ipc("no batch index".into()))?;
    let wanted = match batch {
        None => 0..blocks.len(),
        Some(_) if blocks.is_empty() => 0..0,
        Some(i) if (i as usize) < blocks.len() => i as usize..i as usize + 1,
        Some(i) => {
            return Err(VolleyError::execution(format!(
                "{} batches; batch {i} was asked for",
                blocks.len()
            )))
        }
    };
    let mut out = Vec::with_capacity(wanted.len());
    for i in wanted {
        let block = blocks.get(i);
        if let Some(b) = decoder.read_record_batch(block, &block_data(block)?)? {
            out.push(b);
        }
    }
    Ok(out)
}

/// A `DoGet` ticket: the object id, then `\0offset\0rows` for a slice or
/// `\0batch\0i` for one batch. Object ids never hold a NUL.
fn ticket(id: &str, selection: Selection) -> Vec<u8> {
    match selection {
        Selection::All => id.as_bytes().to_vec(),
        Selection::Rows { offset, rows } => format!("{id}\0{offset}\0{rows}").into_bytes(),
        Selection::Batch(i) => format!("{id}\0batch\0{i}").into_bytes(),
        Selection::Whole => format!("{id}\0whole\00").into_bytes(),
    }
}

fn parse_ticket(bytes: &[u8]) -> Result<(String, Selection)> {
    let text = String::from_utf8_lossy(bytes);
    let mut parts = text.split('\0');
    let id = parts.next().unwrap_or_default().to_string();
    let (Some(first), Some(second), None) = (parts.next(), parts.next(), parts.next()) else {
        return Ok((id, Selection::All));
    };
    let number = |s: &str| {
        s.parse::<u64>().map_err(|_| {
            VolleyError::plan(format!("ticket for object {id}: `{s}` is not a number"))
        })
    };
    let selection = if first == "whole" {
        Selection::Whole
    } else if first == "batch" {
        let i = number(second)?;
        Selection::Batch(u32::try_from(i).map_err(|_| {
            VolleyError::plan(format!("ticket for object {id}: batch {i} is out of range"))
        })?)
    } else {
        Selection::Rows {
            offset: number(first)?,
            rows: number(second)?,
        }
    };
    Ok((id.clone(), selection))
}

/// Rows `offset..offset + rows` of `batches` taken as one sequence (zero-copy slices).
pub(crate) fn slice_rows(
    batches: &[RecordBatch],
    offset: u64,
    rows: u64,
) -> Result<Vec<RecordBatch>> {
    let total: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    let end = offset
        .checked_add(rows)
        .filter(|&e| e <= total)
        .ok_or_else(|| {
            VolleyError::plan(format!(
                "rows {offset}..{} asked of an object of {total} rows",
                offset.saturating_add(rows)
            ))
        })?;
    let mut out = Vec::new();
    let mut start = 0u64;
    for b in batches {
        let n = b.num_rows() as u64;
        let (lo, hi) = (offset.max(start), end.min(start + n));
        if lo < hi {
            out.push(b.slice((lo - start) as usize, (hi - lo) as usize));
        }
        start += n;
    }
    Ok(out)
}

/// An object's batches as one batch (a single batch is passed on as is).
pub fn object_batch(id: &str, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
    match batches.len() {
        0 => Err(VolleyError::internal(format!("object {id} holds no batch"))),
        1 => Ok(batches.into_iter().next().expect("one")),
        _ => Ok(arrow::compute::concat_batches(
            &batches[0].schema(),
            &batches,
        )?),
    }
}

/// Where some rows of an object live: what a process other than the object's owner
/// needs to read them from the nodes with an [`ObjectReader`]. It names the object but
/// does not keep it alive: its owner holds the [`ObjectRef`](super::ObjectRef) until the
/// reader is done.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectSlice {
    /// The object's id.
    pub id: String,
    /// Flight endpoints of the nodes that hold a copy.
    pub addresses: Vec<String>,
    /// The first row (counted over the object's batches in order).
    pub offset: u64,
    /// How many rows.
    pub rows: u64,
}

/// Reads objects straight from the nodes' stores: how a task or actor (a training rank)
/// reads blocks whose references another process holds, without the bytes passing
/// through that process. Built in a worker from its environment; blocking, so use it
/// from a thread of its own (see [`on_own_thread`](super::on_own_thread)), not inside
/// an async runtime.
pub struct ObjectReader {
    channels: super::net::Channels,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader").finish_non_exhaustive()
    }
}

impl ObjectReader {
    /// A reader with the cluster's token and TLS settings of this worker process
    /// (`VOLLEY_TOKEN`, the TLS variables).
    pub fn from_env() -> Result<Self> {
        let token = volley_common::env_var("VOLLEY_TOKEN")?.ok_or_else(|| {
            VolleyError::Config(
                "reading objects from the nodes needs the cluster token in VOLLEY_TOKEN \
                 (set in every worker process)"
                    .into(),
            )
        })?;
        Self::new(&token, &super::tls::TlsConfig::from_env()?)
    }

    /// A reader that presents `token`, over TLS when `tls` has a CA to trust.
    pub fn new(token: &str, tls: &super::tls::TlsConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("cannot start a runtime: {e}")))?;
        Ok(Self {
            channels: super::net::Channels::new(token, tls),
            runtime,
        })
    }

    /// The slice's rows, from the first node that serves them.
    pub fn read(&self, slice: &ObjectSlice) -> Result<Vec<RecordBatch>> {
        let ObjectSlice {
            id,
            addresses,
            offset,
            rows,
        } = slice;
        if addresses.is_empty() {
            return Err(VolleyError::execution(format!(
                "object {id}: no node holds a copy to read"
            )));
        }
        let _enter = self.runtime.enter();
        let mut errors = Vec::new();
        for a in addresses {
            match self.runtime.block_on(fetch_range(
                &self.channels,
                a,
                id,
                Selection::Rows {
                    offset: *offset,
                    rows: *rows,
                },
            )) {
                Ok(b) => return Ok(b),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(VolleyError::execution(errors.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn batch(n: i64) -> RecordBatch {
        RecordBatch::try_from_iter([(
            "x",
            Arc::new(Int64Array::from_iter_values(0..n)) as arrow::array::ArrayRef,
        )])
        .unwrap()
    }

    fn write_ipc(path: &Path, batches: &[RecordBatch]) {
        let file = std::fs::File::create(path).unwrap();
        let mut w = FileWriter::try_new(file, &batches[0].schema()).unwrap();
        for b in batches {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
    }

    /// Files handed over in the shared folder are objects: counted as memory, found by
    /// `locate`, spilled to disk (and out of the folder) beyond the limit, removed when
    /// freed; a name leading out of the folder is refused.
    #[test]
    fn files_in_the_shared_folder_are_objects_that_spill_and_free() {
        let spill = tempfile::tempdir().unwrap();
        let shared = tempfile::tempdir().unwrap();
        let one = vec![batch(10_000)];
        write_ipc(&shared.path().join("a.arrow"), &one);
        let size = std::fs::metadata(shared.path().join("a.arrow"))
            .unwrap()
            .len();
        let store = ObjectStore::new(size * 3 / 2, spill.path().to_path_buf())
            .with_shared_dir(shared.path().to_path_buf());
        assert_eq!(store.adopt("o1", "a.arrow").unwrap(), size);
        assert_eq!(store.usage(), (size, 0));
        assert_eq!(store.locate("o1"), Some(shared.path().join("a.arrow")));
        write_ipc(&shared.path().join("b.arrow"), &one);
        store.adopt("o2", "b.arrow").unwrap();
        // o1 went to disk: out of the shared folder, still readable.
        assert_eq!(store.usage(), (size, size));
        assert_eq!(store.locate("o1"), None);
        assert!(!shared.path().join("a.arrow").exists());
        assert_eq!(*store.get("o1").unwrap().unwrap(), one);
        assert_eq!(*store.get("o2").unwrap().unwrap(), one);
        store.free(&["o2".to_string()]);
        assert!(!shared.path().join("b.arrow").exists());
        assert_eq!(store.usage().0, 0);
        assert!(store.adopt("o3", "../a.arrow").is_err());
        assert!(store.adopt("o3", "missing.arrow").is_err());
    }

    #[test]
    fn one_batch_of_an_object_is_read_alone_in_memory_and_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let parts = vec![batch(3), batch(0), batch(7)];
        let one = batches_size(&parts);
        // Room for one such object: the first spills when the second comes.
        let store = ObjectStore::new(one * 3 / 2, dir.path().to_path_buf());
        store.put("spilled", parts.clone()).unwrap();
        store.put("memory", parts.clone()).unwrap();
        store.put("empty", vec![]).unwrap();
        assert!(store.usage().1 > 0, "the first object spilled");
        for id in ["spilled", "memory"] {
            for (i, want) in parts.iter().enumerate() {
                let got = store.get_batch(id, i as u32).unwrap().unwrap();
                assert_eq!(got, vec![want.clone()], "{id} batch {i}");
            }
            let err = store.get_batch(id, 3).unwrap_err().to_string();
            assert!(err.contains("3 batches") && err.contains(id), "{err}");
        }
        // An object without batches has no rows in any partition.
        assert_eq!(store.get_batch("empty", 5).unwrap().unwrap(), vec![]);
        assert!(store.get_batch("absent", 0).unwrap().is_none());
        let all = parts.clone();
        assert_eq!(
            Selection::Batch(2).apply("o", all.clone()).unwrap(),
            vec![parts[2].clone()]
        );
        assert_eq!(
            Selection::Rows { offset: 2, rows: 4 }
                .apply("o", all)
                .unwrap()
                .iter()
                .map(RecordBatch::num_rows)
                .collect::<Vec<_>>(),
            vec![1, 3]
        );
    }

    #[test]
    fn view_columns_keep_only_their_rows_strings() {
        use arrow::array::StringViewArray;
        let long: Vec<String> = (0..40_000)
            .map(|i| format!("a string longer than twelve {i}"))
            .collect();
        let strings = StringViewArray::from_iter_values(long.iter());
        let b = RecordBatch::try_from_iter([("s", Arc::new(strings) as arrow::array::ArrayRef)])
            .unwrap();
        let held = |b: &RecordBatch| -> usize {
            use arrow::array::AsArray;
            b.column(0)
                .as_string_view()
                .data_buffers()
                .iter()
                .map(|d| d.len())
                .sum()
        };
        let whole = held(&b);
        // A slice of ten rows still holds every string; its own copy holds its ten.
        let slice = b.slice(10, 10);
        assert_eq!(held(&slice), whole);
        let own = volley_common::compact_bloated_views(slice.clone()).unwrap();
        assert!(held(&own) * 50 < whole, "{} of {whole}", held(&own));
        assert_eq!(own, slice);
        // A compact batch is passed on as it is.
        assert_eq!(
            held(&volley_common::compact_bloated_views(b.clone()).unwrap()),
            whole
        );
        // Over Flight: pieces of at most FLIGHT_VIEW_ROWS rows owning their strings.
        let pieces = for_flight(vec![b.clone()]).unwrap();
        let sizes: Vec<usize> = pieces.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(
            sizes,
            vec![
                FLIGHT_VIEW_ROWS,
                FLIGHT_VIEW_ROWS,
                40_000 - 2 * FLIGHT_VIEW_ROWS
            ]
        );
        assert!(pieces.iter().all(|p| held(p) * 2 < whole));
        assert_eq!(
            arrow::compute::concat_batches(&b.schema(), &pieces).unwrap(),
            b
        );
    }

    /// A batch read from an IPC file (one body every column slices, a view column
    /// among them) goes over Flight as messages of about its own size in all.
    #[test]
    fn a_batch_read_from_a_file_goes_over_flight_at_its_size() {
        use arrow::array::{ArrayRef, Int64Array, StringViewArray};
        let n = 200_000;
        let mut columns: Vec<(String, ArrayRef)> = (0..12)
            .map(|c| {
                (
                    format!("i{c}"),
                    Arc::new(Int64Array::from_iter_values(0..n)) as ArrayRef,
                )
            })
            .collect();
        columns.push((
            "s".into(),
            Arc::new(StringViewArray::from_iter_values(
                (0..n).map(|i| format!("a comment of some forty bytes, row {i}")),
            )),
        ));
        let b = RecordBatch::try_from_iter(columns).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.arrow");
        write_file(&path, std::slice::from_ref(&b), ObjectCompression::None).unwrap();
        let read = read_file_batch(&path, 0).unwrap();
        let size = volley_common::batch_memory(&read[0]);
        let pieces = for_flight(read).unwrap();
        assert_eq!(
            arrow::compute::concat_batches(&b.schema(), &pieces).unwrap(),
            b
        );
        let sent: usize = futures::executor::block_on(
            flight_encoder(b.schema(), ObjectCompression::None)
                .unwrap()
                .build(futures::stream::iter(pieces.into_iter().map(Ok)))
                .map_ok(|d| d.data_body.len())
                .try_collect::<Vec<_>>(),
        )
        .unwrap()
        .into_iter()
        .sum();
        assert!(
            (sent as u64) < size * 3 / 2,
            "{sent} bytes sent for a batch of {size}"
        );
    }

    /// A shared-folder file mapped into memory gives the batches it holds (a dictionary
    /// column too), all or one through the index, still whole after the file is
    /// removed; a file that is not Arrow IPC, or a batch it lacks, is an error.
    #[test]
    fn mapped_object_files_give_their_batches_without_reading_them() {
        use arrow::array::{ArrayRef, DictionaryArray, StringArray};
        use arrow::datatypes::Int32Type;
        let dir = tempfile::tempdir().unwrap();
        let batches: Vec<RecordBatch> = (0..3)
            .map(|p| {
                let keys: DictionaryArray<Int32Type> =
                    (0..1000 + p).map(|i| ["a", "b", "c"][i % 3]).collect();
                RecordBatch::try_from_iter([
                    (
                        "k",
                        Arc::new(Int64Array::from_iter_values(0..1000 + p as i64)) as ArrayRef,
                    ),
                    (
                        "s",
                        Arc::new(StringArray::from_iter_values(
                            (0..1000 + p).map(|i| format!("row {i}")),
                        )),
                    ),
                    ("d", Arc::new(keys)),
                ])
                .unwrap()
            })
            .collect();
        let path = dir.path().join("object.arrow");
        write_file(&path, &batches, ObjectCompression::None).unwrap();
        assert_eq!(map_shared_file(&path, None).unwrap(), batches);
        let second = map_shared_file(&path, Some(1)).unwrap();
        // Counted as its own block's bytes, not the file's.
        let file_len = std::fs::metadata(&path).unwrap().len() as usize;
        let counted = volley_common::batch_memory(&second[0]) as usize;
        assert!(counted < file_len / 2, "{counted} of {file_len}");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(second, vec![batches[1].clone()]);
        write_file(&path, &batches, ObjectCompression::None).unwrap();
        let err = map_shared_file(&path, Some(3)).unwrap_err().to_string();
        assert!(err.contains("3 batches; batch 3"), "{err}");
        let empty = dir.path().join("empty.arrow");
        write_file(&empty, &[], ObjectCompression::None).unwrap();
        assert!(map_shared_file(&empty, Some(0)).unwrap().is_empty());
        let junk = dir.path().join("junk.arrow");
        std::fs::write(&junk, b"not arrow").unwrap();
        let err = map_shared_file(&junk, None).unwrap_err().to_string();
        assert!(err.contains("junk.arrow"), "{err}");
    }

    /// Each compression writes files and Flight messages that read back as the same
    /// batches, one by one through the file's index too; LZ4 and ZSTD take fewer bytes
    /// than none for columnar data; an unknown name is refused with the choices.
    #[test]
    fn compressed_objects_read_back_the_same_and_take_fewer_bytes() {
        use arrow::array::{ArrayRef, StringArray};
        let dir = tempfile::tempdir().unwrap();
        let batches: Vec<RecordBatch> = (0..3)
            .map(|p| {
                RecordBatch::try_from_iter([
                    (
                        "k",
                        Arc::new(Int64Array::from_iter_values(
                            (0..50_000).map(|i| i % 97 + p),
                        )) as ArrayRef,
                    ),
                    (
                        "s",
                        Arc::new(StringArray::from_iter_values(
                            (0..50_000).map(|i| format!("flag-{}", i % 3)),
                        )),
                    ),
                ])
                .unwrap()
            })
            .collect();
        let mut sizes = HashMap::new();
        for c in [
            ObjectCompression::None,
            ObjectCompression::Lz4,
            ObjectCompression::Zstd,
        ] {
            let path = dir.path().join(format!("{c}.arrow"));
            write_file(&path, &batches, c).unwrap();
            assert_eq!(read_file(&path).unwrap(), batches, "{c}");
            assert_eq!(
                read_file_batch(&path, 2).unwrap(),
                vec![batches[2].clone()],
                "{c}"
            );
            sizes.insert(c, std::fs::metadata(&path).unwrap().len());
            let data: Vec<FlightData> = futures::executor::block_on(
                flight_encoder(batches[0].schema(), c)
                    .unwrap()
                    .build(futures::stream::iter(batches.clone().into_iter().map(Ok)))
                    .try_collect(),
            )
            .unwrap();
            let back: Vec<RecordBatch> = futures::executor::block_on(
                FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(
                    data.into_iter().map(Ok),
                ))
                .try_collect(),
            )
            .unwrap();
            assert_eq!(back, batches, "{c} over Flight");
        }
        let none = sizes[&ObjectCompression::None];
        for c in [ObjectCompression::Lz4, ObjectCompression::Zstd] {
            assert!(
                sizes[&c] * 2 < none,
                "{c}: {} bytes vs {none} uncompressed",
                sizes[&c]
            );
        }
        assert_eq!(
            "LZ4".parse::<ObjectCompression>().unwrap(),
            ObjectCompression::Lz4
        );
        let e = "snappy"
            .parse::<ObjectCompression>()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("snappy") && e.contains("auto, none, lz4 or zstd"),
            "{e}"
        );
        // The default compresses what goes to another host only.
        let auto = ObjectCompression::default();
        assert_eq!(auto, ObjectCompression::Auto);
        assert_eq!(auto.for_peer(true), ObjectCompression::Lz4);
        assert_eq!(auto.for_peer(false), ObjectCompression::None);
        assert_eq!(
            ObjectCompression::Zstd.for_peer(false),
            ObjectCompression::Zstd
        );
    }

    /// A batch of a file goes over Flight as the file's own message where the file's
    /// compression is the peer's, and reads back the same; an empty batch sends none;
    /// another compression, a dictionary column or a batch the file lacks leave it to
    /// the encoder.
    #[test]
    fn a_file_batch_goes_over_flight_as_the_file_holds_it() {
        use arrow::array::{ArrayRef, DictionaryArray, StringViewArray};
        use arrow::datatypes::Int32Type;
        let dir = tempfile::tempdir().unwrap();
        let part = |from: i64, n: i64| {
            RecordBatch::try_from_iter([
                (
                    "k",
                    Arc::new(Int64Array::from_iter_values(from..from + n)) as ArrayRef,
                ),
                (
                    "s",
                    Arc::new(StringViewArray::from_iter_values(
                        (from..from + n).map(|i| format!("a string longer than twelve {i}")),
                    )),
                ),
            ])
            .unwrap()
        };
        let batches = vec![part(0, 30_000), part(0, 0), part(7, 5)];
        let read = |messages: Vec<FlightData>| -> Vec<RecordBatch> {
            futures::executor::block_on(
                FlightRecordBatchStream::new_from_flight_data(futures::stream::iter(
                    messages.into_iter().map(Ok),
                ))
                .try_collect(),
            )
            .unwrap()
        };
        for c in [
            ObjectCompression::None,
            ObjectCompression::Lz4,
            ObjectCompression::Zstd,
        ] {
            let path = dir.path().join(format!("{c}.arrow"));
            write_file(&path, &batches, c).unwrap();
            for (i, b) in batches.iter().enumerate() {
                let messages = file_batch_messages(&path, i as u32, c)
                    .unwrap()
                    .expect("sent as the file holds it");
                let want: Vec<RecordBatch> =
                    (b.num_rows() > 0).then(|| b.clone()).into_iter().collect();
                assert_eq!(read(messages), want, "{c}, batch {i}");
            }
            let other = match c {
                ObjectCompression::None => ObjectCompression::Lz4,
                _ => ObjectCompression::None,
            };
            assert!(
                file_batch_messages(&path, 0, other).unwrap().is_none(),
                "{c}"
            );
            assert!(file_batch_messages(&path, 3, c).unwrap().is_none(), "{c}");
        }
        // `Auto` writes files as `None` does, and sends them so to this host.
        let path = dir.path().join("none.arrow");
        assert!(file_batch_messages(&path, 0, ObjectCompression::Auto)
            .unwrap()
            .is_some());
        let keys = arrow::array::Int32Array::from(vec![0, 1, 0]);
        let values = Arc::new(arrow::array::StringArray::from(vec!["a", "b"]));
        let dict = RecordBatch::try_from_iter([(
            "d",
            Arc::new(DictionaryArray::<Int32Type>::try_new(keys, values).unwrap()) as ArrayRef,
        )])
        .unwrap();
        let path = dir.path().join("dict.arrow");
        write_file(&path, &[dict], ObjectCompression::None).unwrap();
        assert!(file_batch_messages(&path, 0, ObjectCompression::None)
            .unwrap()
            .is_none());
        assert!(
            file_batch_messages(&dir.path().join("absent"), 0, ObjectCompression::None).is_err()
        );
    }

    #[test]
    fn small_objects_travel_inline_and_big_ones_do_not() {
        let small = vec![batch(10), batch(5)];
        let bytes = encode_inline(&small).expect("small enough");
        let back = decode_inline("o", &bytes).unwrap();
        assert_eq!(back, small);
        assert_eq!(
            decode_inline("o", &encode_inline(&[]).unwrap()).unwrap(),
            vec![]
        );
        assert!(encode_inline(&[batch(100_000)]).is_none());
        let err = decode_inline("job:t-1", b"not arrow")
            .unwrap_err()
            .to_string();
        assert!(err.contains("job:t-1"), "{err}");
    }

    #[test]
    fn spills_oldest_beyond_the_limit_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let one = batches_size(&[batch(10_000)]);
        let store = ObjectStore::new(one * 2, dir.path().to_path_buf());
        for i in 0..5 {
            store.put(&format!("o{i}"), vec![batch(10_000)]).unwrap();
        }
        let (mem, spilled) = store.usage();
        assert!(mem <= one * 2, "{mem} in memory");
        assert_eq!(spilled, one * 3);
        assert_eq!(store.spilled_total(), one * 3);
        let back = store.get("o0").unwrap().unwrap();
        assert_eq!(back[0].num_rows(), 10_000);
        store.free(&["o0".to_string()]);
        assert!(store.get("o0").unwrap().is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_ticket_names_a_slice_and_the_node_cuts_only_those_rows() {
        for selection in [
            Selection::All,
            Selection::Rows {
                offset: 7,
                rows: 30,
            },
            Selection::Batch(3),
        ] {
            assert_eq!(
                parse_ticket(&ticket("j:t-1", selection)).unwrap(),
                ("j:t-1".into(), selection)
            );
        }
        let err = parse_ticket(b"j:t-1\x00x\x003").unwrap_err().to_string();
        assert!(err.contains("j:t-1") && err.contains("`x`"), "{err}");

        let batches = vec![batch(10), batch(5), batch(20)];
        let cut = slice_rows(&batches, 8, 10).unwrap();
        let rows: Vec<usize> = cut.iter().map(RecordBatch::num_rows).collect();
        assert_eq!(rows, vec![2, 5, 3]);
        let first = cut[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert_eq!(first.values(), &[8, 9]);
        assert!(slice_rows(&batches, 0, 35).is_ok());
        let err = slice_rows(&batches, 30, 10).unwrap_err().to_string();
        assert!(err.contains("30..40") && err.contains("35 rows"), "{err}");
    }
}
