//! Writing datasets as files, committed atomically.
//!
//! ```text
//!   task 0, attempt 0 ─ PartWriter ─▶ staging/part-<id>-00000.a0/part-<id>-00000-00000.parquet ┐
//!   task 1, attempt 0 ─ PartWriter ─▶ staging/part-<id>-00001.a0/...  (node lost)         │
//!   task 1, attempt 1 ─ PartWriter ─▶ staging/part-<id>-00001.a1/...                       ├ commit(accepted
//!   ...                                                                                     ┘  attempts)
//!                                                           ─▶ destination; the rest of staging removed
//! ```
//!
//! Every task attempt writes into a staging folder of its own (named after the task and
//! the attempt; on a cluster also its node and worker process, as `.a1-node-2-4711`,
//! since a head that restarted numbers attempts from 0 again while a node may still run
//! an old one); the commit is given the attempts whose results were accepted, moves
//! exactly their files, and removes everything else staged. A superseded attempt that
//! still runs (its node declared dead while it was cut off) can therefore never put a
//! file in the destination: its folder is not moved, and once the staging is removed it
//! cannot make files or folders there again.
//!
//! On the local file system the staging folder is a hidden sibling of the destination
//! (one whose process was killed mid-write is removed by the next write there, see
//! `stale.rs`);
//! the accepted files are gathered in one folder which is renamed into place, so a
//! reader sees either nothing or the whole output. On object stores (which have no
//! folders to rename) staging is a hidden sibling prefix, and the accepted objects are
//! moved into place one at a time once every task has succeeded: the new objects first,
//! then the old ones an overwrite replaces, so the destination is never empty on the
//! way, and a commit that fails part way keeps the files not moved yet in staging and
//! says so.

mod dictionary;
mod parquet;
mod stale;
mod writer;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use volley_common::{Result, ResultExt, VolleyError};

pub use writer::{csv_can_hold, PartWriter};

/// The format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WriteFormat {
    /// Apache Parquet.
    Parquet,
    /// CSV with a header line.
    Csv,
    /// Newline-delimited JSON.
    Json,
}

impl WriteFormat {
    /// The file extension, without compression.
    pub fn extension(&self) -> &'static str {
        match self {
            WriteFormat::Parquet => "parquet",
            WriteFormat::Csv => "csv",
            WriteFormat::Json => "json",
        }
    }

    /// The format of a path by its extension (`.parquet`, `.csv`, `.json`/`.ndjson`/`.jsonl`,
    /// each optionally followed by `.gz` or `.zst`).
    pub fn from_path(path: &str) -> Option<(WriteFormat, Compression)> {
        let lower = path.to_ascii_lowercase();
        let (stem, compression) = if let Some(s) = lower.strip_suffix(".gz") {
            (s.to_string(), Compression::Gzip)
        } else if let Some(s) = lower.strip_suffix(".zst") {
            (s.to_string(), Compression::Zstd)
        } else {
            (lower.clone(), Compression::Default)
        };
        let format = if stem.ends_with(".parquet") {
            WriteFormat::Parquet
        } else if stem.ends_with(".csv") {
            WriteFormat::Csv
        } else if stem.ends_with(".json") || stem.ends_with(".ndjson") || stem.ends_with(".jsonl") {
            WriteFormat::Json
        } else {
            return None;
        };
        Some((format, compression))
    }
}

/// Compression of written files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Snappy for Parquet, none for CSV and JSON.
    #[default]
    Default,
    /// No compression.
    None,
    /// Snappy (Parquet only).
    Snappy,
    /// Gzip.
    Gzip,
    /// Zstandard.
    Zstd,
    /// LZ4 (Parquet only).
    Lz4,
}

impl std::str::FromStr for Compression {
    type Err = VolleyError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "default" => Compression::Default,
            "none" | "uncompressed" => Compression::None,
            "snappy" => Compression::Snappy,
            "gzip" | "gz" => Compression::Gzip,
            "zstd" | "zst" => Compression::Zstd,
            "lz4" => Compression::Lz4,
            other => {
                return Err(VolleyError::plan(format!(
                    "unknown compression `{other}` (none, snappy, gzip, zstd, lz4)"
                )))
            }
        })
    }
}

/// What to do when the destination exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum WriteMode {
    /// Fail before writing anything.
    #[default]
    ErrorIfExists,
    /// Replace the destination.
    Overwrite,
    /// Add new files beside the existing ones.
    Append,
}

/// Options of a write.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WriteOptions {
    /// The format.
    pub format: WriteFormat,
    /// Compression.
    pub compression: Compression,
    /// Columns whose values become `col=value/` folders (Hive style); the columns are
    /// not stored inside the files.
    pub partition_by: Vec<String>,
    /// Start a new file after this many rows.
    pub max_rows_per_file: Option<usize>,
    /// What to do when the destination exists.
    pub mode: WriteMode,
    /// Write one file at the destination path instead of a folder of parts.
    pub single_file: bool,
}

impl WriteOptions {
    /// Options for `format` with defaults.
    pub fn new(format: WriteFormat) -> Self {
        Self {
            format,
            compression: Compression::Default,
            partition_by: vec![],
            max_rows_per_file: None,
            mode: WriteMode::ErrorIfExists,
            single_file: false,
        }
    }
}

/// What a write produced.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriteSummary {
    /// Files written, relative to the destination.
    pub files: Vec<String>,
    /// Rows written.
    pub rows: u64,
    /// Bytes written.
    pub bytes: u64,
}

impl WriteSummary {
    /// Adds another summary to this one.
    pub fn merge(&mut self, other: WriteSummary) {
        self.files.extend(other.files);
        self.rows += other.rows;
        self.bytes += other.bytes;
    }
}

/// What one task attempt staged: its folder under the write's staging root and what it
/// wrote there. The commit moves exactly the folders of the attempts it is given.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct StagedPart {
    /// The attempt's folder, relative to the staging root (`part-<id>-00003.a1`).
    pub(crate) folder: String,
    /// Its files (relative to the destination), rows and bytes.
    pub summary: WriteSummary,
}

/// The staging folder of attempt `attempt` of part `prefix`.
fn attempt_folder(prefix: &str, attempt: &str) -> String {
    format!("{prefix}.a{attempt}")
}

/// One part of a write, as it travels to the process that writes it.
///
/// Each attempt of the part (a task re-run after its worker or node was lost) writes
/// into a staging folder of its own, named after the part and the attempt. The commit
/// moves only the folders of the attempts whose results were accepted and removes
/// everything else staged, so an attempt that was superseded but went on writing (a node
/// cut off by a network partition on a shared file system) leaves nothing at the
/// destination; when it learns it was superseded it removes its own folder
/// ([`RemotePart::discard`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RemotePart {
    options: WriteOptions,
    /// The write's id: parts are named `part-<id>-<part>`.
    id: String,
    target: RemoteTarget,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum RemoteTarget {
    Local { staging: PathBuf },
    Store { url: String, staging: String },
}

impl RemotePart {
    fn prefix(&self, part: &str) -> String {
        format!("part-{}-{part}", self.id)
    }

    /// Writes `batches` as attempt `attempt` of part `part` (a name unique in the write
    /// and the same for every attempt: a task's id); `attempt` names this run of the
    /// part, unique among the runs that may write at once (attempt numbers alone are
    /// not: a head that restarted numbers a task's attempts from 0 again while a node
    /// may still run the old one); `scratch` holds files on their way to an object
    /// store.
    pub fn write(
        &self,
        batches: impl Iterator<Item = Result<arrow::array::RecordBatch>>,
        registry: &dyn datafusion::execution::object_store::ObjectStoreRegistry,
        scratch: &FsPath,
        part: &str,
        attempt: &str,
        io: tokio::runtime::Handle,
    ) -> Result<StagedPart> {
        let prefix = self.prefix(part);
        let folder = attempt_folder(&prefix, attempt);
        let mut w = match &self.target {
            RemoteTarget::Local { staging } => {
                if !staging.is_dir() {
                    return Err(VolleyError::execution(format!(
                        "the write's staging folder {} is not reachable from this node \
                         (a cluster writing to a local path needs it on a shared file \
                         system), or the write has ended",
                        staging.display()
                    )));
                }
                local_part_writer(&self.options, &prefix, staging, folder)?
            }
            RemoteTarget::Store { url, staging } => {
                let store = store_of(registry, url)?;
                let local = scratch.join(format!("volley-part-{folder}"));
                std::fs::create_dir_all(&local)
                    .with_context(|| format!("creating {}", local.display()))?;
                let staging = writer::store_path(staging)?;
                let upload = writer::Upload {
                    store,
                    folder: staging.clone().join(folder.as_str()),
                    live: staging.join(LIVE_MARKER),
                    io,
                };
                PartWriter::new(
                    self.options.clone(),
                    prefix.clone(),
                    folder,
                    local,
                    Some(upload),
                )
            }
        };
        let written = (|| {
            for b in batches {
                w.write(&b?)?;
            }
            w.finish()
        })();
        if let RemoteTarget::Store { .. } = &self.target {
            let local = scratch.join(format!("volley-part-{}", attempt_folder(&prefix, attempt)));
            std::fs::remove_dir_all(&local).ok();
        }
        written
    }

    /// Removes what attempt `attempt` of part `part` staged: called when the attempt
    /// learns it was superseded, so that nothing of it outlives the write.
    pub fn discard(
        &self,
        registry: &dyn datafusion::execution::object_store::ObjectStoreRegistry,
        part: &str,
        attempt: &str,
        io: tokio::runtime::Handle,
    ) -> Result<()> {
        let folder = attempt_folder(&self.prefix(part), attempt);
        match &self.target {
            RemoteTarget::Local { staging } => {
                match std::fs::remove_dir_all(staging.join(&folder)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(VolleyError::from(e).context(format!("removing staged {folder}")))
                    }
                    _ => Ok(()),
                }
            }
            RemoteTarget::Store { url, staging } => {
                let store = store_of(registry, url)?;
                let prefix = writer::store_path(staging)?.join(folder.as_str());
                io.block_on(delete_prefix(store.as_ref(), &prefix))
                    .with_context(|| format!("removing staged {folder}"))
            }
        }
    }
}

fn store_of(
    registry: &dyn datafusion::execution::object_store::ObjectStoreRegistry,
    url: &str,
) -> Result<Arc<dyn ObjectStore>> {
    let parsed =
        url::Url::parse(url).map_err(|e| VolleyError::plan(format!("invalid URL {url}: {e}")))?;
    registry
        .get_store(&parsed)
        .with_context(|| format!("opening {url}"))
}

/// Deletes every object under `prefix`.
async fn delete_prefix(store: &dyn ObjectStore, prefix: &Path) -> object_store::Result<()> {
    use futures::TryStreamExt;
    let objects: Vec<_> = store.list(Some(prefix)).try_collect().await?;
    for o in objects {
        match store.delete(&o.location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A writer of attempt folder `folder` under the local staging root `staging`. The
/// folder is made with `create_dir`, never with its parents: once the write has been
/// committed or abandoned (the staging root removed), a late attempt cannot make it.
fn local_part_writer(
    options: &WriteOptions,
    prefix: &str,
    staging: &FsPath,
    folder: String,
) -> Result<PartWriter> {
    let dir = staging.join(&folder);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        // Each run names its own folder: one that exists is another run's, which this
        // one must not touch.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(VolleyError::internal(format!(
                "the staging folder {} exists already: another run of this attempt \
                 writes there",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VolleyError::execution(format!(
                "the staging folder {} is gone: the write was committed or abandoned \
                 without this attempt",
                staging.display()
            )))
        }
        Err(e) => return Err(VolleyError::from(e).context(format!("creating {}", dir.display()))),
    }
    Ok(PartWriter::new(
        options.clone(),
        prefix.to_string(),
        folder,
        dir,
        None,
    ))
}

/// Where the parts go before the commit.
#[derive(Debug)]
enum Target {
    /// The destination is on this machine's file system; attempts stage their files in
    /// folders of `staging`, a hidden sibling of the destination.
    Local { dest: PathBuf, staging: PathBuf },
    /// The destination is in an object store; parts are written locally in `scratch`,
    /// uploaded under `staging` (a hidden sibling prefix of the destination), and moved
    /// to `dest` at commit.
    Remote {
        store: Arc<dyn ObjectStore>,
        /// The destination's URL (its store is found again from it in other processes).
        url: url::Url,
        dest: Path,
        staging: Path,
        scratch: PathBuf,
    },
}

/// Why `name` cannot name a partition column, if it cannot: it becomes a folder name
/// (`name=value`), so a `/` or `..` would put files outside their folder, an `=`
/// would not read back, and a leading `_` or `.` makes a folder readers skip as
/// hidden.
fn check_partition_column(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.contains(['/', '\\', '=']) || name.chars().any(|c| c.is_control()) {
        return Err("cannot name a folder (it holds `/`, `\\`, `=` or a control character)");
    }
    if name.starts_with(['_', '.']) {
        return Err("would name a hidden folder (it starts with `_` or `.`), which reads skip");
    }
    Ok(())
}

/// One write of a dataset: hands out [`PartWriter`]s and commits or aborts their files.
#[derive(Debug)]
pub struct WriteJob {
    display: String,
    options: WriteOptions,
    id: String,
    target: Target,
    io: tokio::runtime::Handle,
}

impl WriteJob {
    /// Prepares a write to `dest` (a local path or object-store URL). Checks the
    /// destination against the [`WriteMode`] before anything is written.
    pub fn try_new(
        dest: &str,
        options: WriteOptions,
        registry: &dyn datafusion::execution::object_store::ObjectStoreRegistry,
        scratch_dir: Option<&FsPath>,
        io: tokio::runtime::Handle,
    ) -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let is_url = dest.contains("://") && !dest.starts_with("file://");
        // One file cannot also be one per partition value, or cut by a row count.
        if options.single_file && !options.partition_by.is_empty() {
            return Err(VolleyError::plan(format!(
                "{dest}: a single-file write cannot be partitioned by [{}]",
                options.partition_by.join(", ")
            )));
        }
        if let (true, Some(n)) = (options.single_file, options.max_rows_per_file) {
            return Err(VolleyError::plan(format!(
                "{dest}: a single-file write cannot also be cut into files of {n} rows"
            )));
        }
        for c in &options.partition_by {
            check_partition_column(c).map_err(|why| {
                VolleyError::plan(format!("{dest}: partition column `{c}` {why}"))
            })?;
        }
        let target = if !is_url {
            let dest_path = PathBuf::from(dest.strip_prefix("file://").unwrap_or(dest));
            let exists = dest_path.exists();
            if exists && options.mode == WriteMode::ErrorIfExists {
                return Err(VolleyError::plan(format!(
                    "destination {dest} already exists (choose overwrite or append mode)"
                )));
            }
            // One file replaces a file, never a folder (and what it holds).
            if options.single_file && dest_path.is_dir() {
                return Err(VolleyError::plan(format!(
                    "{dest} is a folder: a single-file write replaces a file only"
                )));
            }
            if exists
                && options.mode == WriteMode::Append
                && (options.single_file || dest_path.is_file())
            {
                return Err(VolleyError::plan(format!(
                    "cannot append to the single file {dest}"
                )));
            }
            let parent = match dest_path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !parent.exists() {
                std::fs::create_dir_all(&parent)
                    .with_context(|| format!("creating the folder of {dest}"))?;
            }
            let name = dest_path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .ok_or_else(|| VolleyError::plan(format!("{dest} names no file or folder")))?;
            stale::remove_abandoned(&parent, &name);
            let staging = parent.join(format!(".{name}.volley-staging-{id}"));
            std::fs::create_dir_all(&staging)
                .with_context(|| format!("creating the staging folder {}", staging.display()))?;
            stale::mark(&staging);
            Target::Local {
                dest: dest_path,
                staging,
            }
        } else {
            let url = url::Url::parse(dest)
                .map_err(|e| VolleyError::plan(format!("invalid URL {dest}: {e}")))?;
            let store = registry
                .get_store(&url)
                .with_context(|| format!("opening {dest}"))?;
            let prefix = Path::from_url_path(url.path())
                .map_err(|e| VolleyError::plan(format!("invalid path in {dest}: {e}")))?;
            // An object named `dest` (a file) and objects under `dest/` (a folder): a
            // listing shows only the second.
            let (file, folder) = io
                .block_on(occupied(store.as_ref(), &prefix))
                .with_context(|| format!("listing {dest}"))?;
            if (file || folder) && options.mode == WriteMode::ErrorIfExists {
                return Err(VolleyError::plan(format!(
                    "destination {dest} already exists (choose overwrite or append mode)"
                )));
            }
            // As on a local disk: one file replaces a file, never a folder, and nothing
            // is appended to a file.
            if options.single_file && folder {
                return Err(VolleyError::plan(format!(
                    "{dest} is a folder: a single-file write replaces a file only"
                )));
            }
            if file && options.mode == WriteMode::Append {
                return Err(VolleyError::plan(format!(
                    "cannot append to the single file {dest}"
                )));
            }
            // A hidden sibling of the destination; at a bucket's root, a hidden prefix
            // inside it (readers skip names starting with `_`).
            let parts: Vec<_> = prefix.parts().collect();
            let staging = match parts.split_last() {
                Some((name, parent)) => Path::from_iter(
                    parent.iter().cloned().chain([format!(
                        ".{}.volley-staging-{id}",
                        name.as_ref()
                    )
                    .into()]),
                ),
                None => Path::from(format!("{ROOT_STAGING}{id}")),
            };
            let base = scratch_dir
                .map(FsPath::to_path_buf)
                .unwrap_or_else(std::env::temp_dir);
            let scratch = base.join(format!("volley-write-{id}"));
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("creating the scratch folder {}", scratch.display()))?;
            io.block_on(store.put(&staging.clone().join(LIVE_MARKER), Default::default()))
                .with_context(|| format!("staging the write of {dest}"))?;
            Target::Remote {
                url,
                staging,
                dest: prefix,
                store,
                scratch,
            }
        };
        Ok(Self {
            display: dest.to_string(),
            options,
            id,
            target,
            io,
        })
    }

    /// The write's options.
    pub fn options(&self) -> &WriteOptions {
        &self.options
    }

    fn prefix(&self, task: usize) -> String {
        // Fixed width, so that names sort in the order of the tasks' rows.
        format!("part-{}-{task:010}", self.id)
    }

    /// A writer for task `task` in this process (its only attempt); its files are named
    /// after the task.
    pub fn part_writer(&self, task: usize) -> Result<PartWriter> {
        self.part_writer_attempt(task, "0")
    }

    /// A writer for attempt `attempt` of task `task` in this process.
    fn part_writer_attempt(&self, task: usize, attempt: &str) -> Result<PartWriter> {
        let prefix = self.prefix(task);
        let folder = attempt_folder(&prefix, attempt);
        match &self.target {
            Target::Local { staging, .. } => {
                local_part_writer(&self.options, &prefix, staging, folder)
            }
            Target::Remote {
                store,
                staging,
                scratch,
                ..
            } => {
                let local = scratch.join(&folder);
                std::fs::create_dir_all(&local)
                    .with_context(|| format!("creating {}", local.display()))?;
                let upload = writer::Upload {
                    store: Arc::clone(store),
                    folder: staging.clone().join(folder.as_str()),
                    live: staging.clone().join(LIVE_MARKER),
                    io: self.io.clone(),
                };
                Ok(PartWriter::new(
                    self.options.clone(),
                    prefix,
                    folder,
                    local,
                    Some(upload),
                ))
            }
        }
    }

    /// The parts of the write, to be written by other processes (cluster workers)
    /// that reach the same file system or object store.
    pub fn remote_part(&self) -> RemotePart {
        RemotePart {
            options: self.options.clone(),
            id: self.id.clone(),
            target: match &self.target {
                Target::Local { staging, .. } => RemoteTarget::Local {
                    staging: staging.clone(),
                },
                Target::Remote { url, staging, .. } => RemoteTarget::Store {
                    url: url.to_string(),
                    staging: staging.to_string(),
                },
            },
        }
    }

    /// Commits `parts` as [`Self::commit`] does; when they hold no file (the dataset
    /// had no rows), first stages one file of no rows with `schema`, so that the
    /// output reads back (as an empty dataset with its columns) instead of being an
    /// empty folder that no read takes. Not for JSON, whose file of no rows holds no
    /// columns, partitioned writes, whose files live in partition folders, nor
    /// appends.
    pub fn commit_with_schema(
        self,
        mut parts: Vec<StagedPart>,
        schema: Option<SchemaRef>,
    ) -> Result<WriteSummary> {
        let none = parts.iter().all(|p| p.summary.files.is_empty());
        // An append adds to output that reads already (and a file of the planned
        // schema could clash with its files').
        let fits = !self.options.single_file
            && self.options.partition_by.is_empty()
            && self.options.format != WriteFormat::Json
            && self.options.mode != WriteMode::Append;
        if let (true, true, Some(schema)) = (none, fits, schema) {
            let staged = (|| {
                let mut w = self.part_writer_attempt(0, "empty")?;
                w.ensure_file(schema)?;
                w.finish()
            })();
            match staged {
                Ok(p) => parts.push(p),
                Err(e) => {
                    self.abort();
                    return Err(e);
                }
            }
        }
        self.commit(parts)
    }

    /// Moves the files of `parts` (one accepted attempt of each task) into place, then
    /// removes everything else staged (attempts that were superseded), and returns what
    /// was written. Call once, after every part succeeded.
    pub fn commit(self, parts: Vec<StagedPart>) -> Result<WriteSummary> {
        let display = self.display.clone();
        let mut summary = WriteSummary::default();
        for p in &parts {
            summary.merge(p.summary.clone());
        }
        summary.files.sort();
        if self.options.single_file && summary.files.len() != 1 {
            let n = summary.files.len();
            self.abort();
            return Err(VolleyError::internal(format!(
                "a single-file write of {display} staged {n} files"
            )));
        }
        let result = match &self.target {
            Target::Local { dest, staging } => self.commit_local(dest, staging, &parts, &summary),
            Target::Remote {
                store,
                dest,
                staging,
                scratch,
                url,
            } => match self.commit_remote(store, dest, staging, &parts) {
                // Some new files are in place and others are not: those stay staged,
                // and the error says where.
                Err(e @ RemoteCommitError::Partial(_)) => {
                    std::fs::remove_dir_all(scratch).ok();
                    let e = e.into_error(url, staging);
                    return Err(e.context(format!("committing {display}")));
                }
                other => other.map_err(|e| e.into_error(url, staging)),
            },
        };
        self.abort();
        result.with_context(|| format!("committing {display}"))?;
        Ok(summary)
    }

    fn commit_local(
        &self,
        dest: &FsPath,
        staging: &FsPath,
        parts: &[StagedPart],
        summary: &WriteSummary,
    ) -> Result<()> {
        // The accepted attempts' files, gathered in one folder that no attempt writes to.
        let ready = staging.join("commit");
        std::fs::create_dir(&ready)?;
        for p in parts {
            let from = staging.join(&p.folder);
            for f in &p.summary.files {
                let to = ready.join(f);
                if let Some(dir) = to.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::rename(from.join(f), &to)
                    .with_context(|| format!("moving staged {f} of {}", p.folder))?;
            }
        }
        let refuse = self.options.mode == WriteMode::ErrorIfExists;
        if self.options.single_file {
            let file = ready.join(&summary.files[0]);
            if refuse {
                // A link, unlike a rename, fails where the name was taken meanwhile.
                match std::fs::hard_link(&file, dest) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(made_meanwhile(&dest.display().to_string()))
                    }
                    // (A file system without links.)
                    Err(_) if dest.exists() || dest.is_symlink() => {
                        return Err(made_meanwhile(&dest.display().to_string()))
                    }
                    Err(_) => {}
                }
            }
            // A file is replaced by the rename itself; a folder made meanwhile fails it.
            std::fs::rename(&file, dest)?;
        } else if !dest.exists() {
            std::fs::rename(&ready, dest)?;
        } else if refuse {
            return Err(made_meanwhile(&dest.display().to_string()));
        } else if self.options.mode == WriteMode::Overwrite {
            let trash = staging.join("old");
            std::fs::rename(dest, &trash)?;
            if let Err(e) = std::fs::rename(&ready, dest) {
                // The old output goes back where it was: the abort that follows
                // removes the staging folder, and would take it along.
                let what = match std::fs::rename(&trash, dest) {
                    Ok(()) => "the old output is left as it was".to_string(),
                    Err(_) => {
                        let name = dest.file_name().map(|n| n.to_string_lossy().to_string());
                        let kept = dest.with_file_name(format!(
                            "{}.old-{}",
                            name.unwrap_or_default(),
                            self.id
                        ));
                        match std::fs::rename(&trash, &kept) {
                            Ok(()) => format!("the old output is kept at {}", kept.display()),
                            Err(k) => format!("the old output could not be kept either ({k})"),
                        }
                    }
                };
                return Err(VolleyError::execution(format!(
                    "replacing {}: {e}; {what}",
                    dest.display()
                )));
            }
        } else {
            move_tree(&ready, dest)?;
        }
        Ok(())
    }

    fn commit_remote(
        &self,
        store: &Arc<dyn ObjectStore>,
        dest: &Path,
        staging: &Path,
        parts: &[StagedPart],
    ) -> std::result::Result<(), RemoteCommitError> {
        if self.options.mode == WriteMode::ErrorIfExists {
            // Looked at again: something may have been written there meanwhile.
            let (file, folder) = self
                .io
                .block_on(occupied(store.as_ref(), dest))
                .map_err(|e| RemoteCommitError::Untouched(e.into()))?;
            if file || folder {
                return Err(RemoteCommitError::Untouched(made_meanwhile(dest.as_ref())));
            }
        }
        // Attempts still running stop uploading from here on, whatever the commit's
        // outcome (one that fails part way leaves files staged for the user to take).
        let marker = staging.clone().join(LIVE_MARKER);
        match self.io.block_on(store.delete(&marker)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(RemoteCommitError::Untouched(e.into())),
        }
        let store = Arc::clone(store);
        let (dest, staging) = (dest.clone(), staging.clone());
        let overwrite = self.options.mode == WriteMode::Overwrite;
        let single = self.options.single_file;
        let mut moves: Vec<(Path, Path)> = Vec::new();
        for p in parts {
            let from = staging.clone().join(p.folder.as_str());
            for f in &p.summary.files {
                let rel = writer::store_path(f).map_err(RemoteCommitError::Untouched)?;
                let target = if single {
                    dest.clone()
                } else {
                    Path::from_iter(dest.parts().chain(rel.parts()))
                };
                moves.push((Path::from_iter(from.parts().chain(rel.parts())), target));
            }
        }
        let total = moves.len();
        let moved = self.io.block_on(async move {
            use futures::TryStreamExt;
            // The new files first, each replacing any old one of its name; then the
            // old files the new ones did not replace (an overwrite). The destination is
            // never empty on the way, and a failure loses neither the old files not
            // replaced yet nor the new ones not moved yet (they stay staged).
            let mut moved = 0;
            let mut targets = std::collections::HashSet::new();
            for (from, to) in moves {
                if let Err(e) = store.rename(&from, &to).await {
                    return Err((moved, e));
                }
                targets.insert(to);
                moved += 1;
            }
            if overwrite && !single {
                // A file of the destination's name, which the folder replaces.
                if !dest.as_ref().is_empty() {
                    match store.delete(&dest).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err((moved, e)),
                    }
                }
                let old: Vec<_> = store
                    .list(Some(&dest))
                    .try_collect()
                    .await
                    .map_err(|e| (moved, e))?;
                for o in old {
                    if !targets.contains(&o.location)
                        && !o.location.as_ref().starts_with(staging.as_ref())
                    {
                        store.delete(&o.location).await.map_err(|e| (moved, e))?;
                    }
                }
            }
            Ok(moved)
        });
        match moved {
            Ok(_) => Ok(()),
            Err((0, e)) if total > 0 => Err(RemoteCommitError::Untouched(e.into())),
            Err((moved, e)) if moved < total => Err(RemoteCommitError::Partial(format!(
                "{moved} of {total} new files were moved into place, then: {e}"
            ))),
            Err((_, e)) => Err(RemoteCommitError::OldLeft(e)),
        }
    }

    /// Removes everything staged; the destination is left as it was (after a commit,
    /// what is left are superseded attempts).
    pub fn abort(&self) {
        match &self.target {
            Target::Local { staging, .. } => {
                // A superseded attempt may still be making files in its folder: retry.
                for _ in 0..3 {
                    match std::fs::remove_dir_all(staging) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            std::thread::sleep(std::time::Duration::from_millis(20))
                        }
                        _ => break,
                    }
                }
            }
            Target::Remote {
                store,
                staging,
                scratch,
                ..
            } => {
                let store = Arc::clone(store);
                let staging = staging.clone();
                // The marker first: attempts still running stop uploading.
                let _ = self.io.block_on(async move {
                    let _ = store.delete(&staging.clone().join(LIVE_MARKER)).await;
                    delete_prefix(store.as_ref(), &staging).await
                });
                std::fs::remove_dir_all(scratch).ok();
            }
        }
    }
}

/// How the staging of a write to a bucket's root starts its name (inside the bucket:
/// a hidden prefix, which readers skip).
const ROOT_STAGING: &str = "_volley_staging-";

/// The object in an object-store write's staging that says it still takes attempts'
/// files: made when the write starts, deleted first when it ends.
pub(crate) const LIVE_MARKER: &str = "_live";

/// Why moving a write's staged files into place in an object store failed.
#[derive(Debug)]
enum RemoteCommitError {
    /// Before anything moved: the destination is as it was.
    Untouched(VolleyError),
    /// Some new files were moved and the others were not (they stay staged).
    Partial(String),
    /// The new files are in place; some old ones an overwrite replaces are left.
    OldLeft(object_store::Error),
}

impl RemoteCommitError {
    /// The error to report, naming the staging prefix of `url`'s store where the files
    /// not moved are.
    fn into_error(self, url: &url::Url, staging: &Path) -> VolleyError {
        match self {
            Self::Untouched(e) => e,
            Self::Partial(what) => VolleyError::execution(format!(
                "{what}; the others stay in {}://{}/{staging}",
                url.scheme(),
                url.host_str().unwrap_or_default()
            )),
            Self::OldLeft(e) => VolleyError::execution(format!(
                "the new files are in place, but removing the old ones the overwrite \
                 replaces failed: {e}"
            )),
        }
    }
}

/// Moves every file under `from` to the same place under `to`.
fn move_tree(from: &FsPath, to: &FsPath) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target)?;
            move_tree(&entry.path(), &target)?;
        } else {
            std::fs::rename(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Whether `prefix` in `store` names an object (a file) and whether objects lie under
/// it (a folder). At a bucket's root, writes' staging (`_volley_staging-*`, this
/// write's own or one a killed process left) does not count.
async fn occupied(store: &dyn ObjectStore, prefix: &Path) -> object_store::Result<(bool, bool)> {
    use futures::StreamExt;
    // (A bucket's root is no object.)
    let file = !prefix.as_ref().is_empty()
        && match store.head(prefix).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
    let mut list = store.list(Some(prefix));
    while let Some(o) = list.next().await.transpose()? {
        let staged = prefix.as_ref().is_empty()
            && o.location
                .parts()
                .next()
                .is_some_and(|p| p.as_ref().starts_with(ROOT_STAGING));
        if !staged {
            return Ok((file, true));
        }
    }
    Ok((file, false))
}

/// The error of a write refusing to replace what was written at `dest` while it ran
/// (it found nothing there when it started).
fn made_meanwhile(dest: &str) -> VolleyError {
    VolleyError::execution(format!(
        "destination {dest} exists now (it did not when this write started: written \
         meanwhile); nothing of this write was put there (choose overwrite or append mode \
         to replace or add)"
    ))
}
