//! Writing datasets as files, committed atomically.
//!
//! ```text
//!   task 0 ─ PartWriter ─▶ staging/part-<id>-00000-0.parquet ┐
//!   task 1 ─ PartWriter ─▶ staging/part-<id>-00001-0.parquet ├─ commit ─▶ destination
//!   ...                                                      ┘  (or abort: staging removed)
//! ```
//!
//! On the local file system the staging folder is a hidden sibling of the destination
//! and the commit is one `rename` of the folder, so a reader sees either nothing or the
//! whole output. On object stores (which have no folders to rename) the parts are staged
//! under a hidden `_volley_staging-<id>/` prefix of the destination, which readers skip,
//! and moved into place one object at a time once every task has succeeded.

mod parquet;
mod writer;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use volley_common::{Result, ResultExt, VolleyError};

pub use writer::PartWriter;

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

/// One part of a write, as it travels to the process that writes it.
///
/// Its files are named after the part, so writing the same part again (a task re-run
/// after its worker died) replaces them instead of adding to them; each file appears in
/// the staging area whole (written aside, then renamed or uploaded in one put).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RemotePart {
    options: WriteOptions,
    prefix: String,
    target: RemoteTarget,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum RemoteTarget {
    Local { staging: PathBuf },
    Store { url: String, staging: String },
}

impl RemotePart {
    /// Writes `batches` as this part; `attempt` names this try's scratch folder.
    pub fn write(
        &self,
        batches: impl Iterator<Item = Result<arrow::array::RecordBatch>>,
        registry: &dyn datafusion::execution::object_store::ObjectStoreRegistry,
        scratch: &FsPath,
        attempt: &str,
        io: tokio::runtime::Handle,
    ) -> Result<WriteSummary> {
        match &self.target {
            RemoteTarget::Local { staging } => {
                if !staging.is_dir() {
                    return Err(VolleyError::execution(format!(
                        "the write's staging folder {} is not reachable from this node \
                         (a cluster writing to a local path needs it on a shared file system)",
                        staging.display()
                    )));
                }
                let aside = staging.join(format!(".{}-{attempt}", self.prefix));
                let mut w = PartWriter::try_new(
                    self.options.clone(),
                    self.prefix.clone(),
                    aside.clone(),
                    None,
                )?;
                for b in batches {
                    w.write(&b?)?;
                }
                let summary = w.finish()?;
                for f in &summary.files {
                    let to = staging.join(f);
                    if let Some(dir) = to.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    std::fs::rename(aside.join(f), &to)
                        .with_context(|| format!("moving {f} into {}", staging.display()))?;
                }
                std::fs::remove_dir_all(&aside).ok();
                Ok(summary)
            }
            RemoteTarget::Store { url, staging } => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| VolleyError::plan(format!("invalid URL {url}: {e}")))?;
                let store = registry
                    .get_store(&parsed)
                    .with_context(|| format!("opening {url}"))?;
                let local = scratch.join(format!("volley-part-{}-{attempt}", self.prefix));
                let mut w = PartWriter::try_new(
                    self.options.clone(),
                    self.prefix.clone(),
                    local.clone(),
                    Some((store, Path::from(staging.as_str()), io)),
                )?;
                for b in batches {
                    w.write(&b?)?;
                }
                let summary = w.finish();
                std::fs::remove_dir_all(&local).ok();
                summary
            }
        }
    }
}

/// Where the parts go before the commit.
#[derive(Debug)]
enum Target {
    /// The destination is on this machine's file system.
    Local { dest: PathBuf, staging: PathBuf },
    /// The destination is in an object store; parts are staged locally in `scratch`,
    /// uploaded under `staging`, and moved to `dest` at commit.
    Remote {
        store: Arc<dyn ObjectStore>,
        /// The destination's URL (its store is found again from it in other processes).
        url: url::Url,
        dest: Path,
        staging: Path,
        scratch: PathBuf,
    },
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
        let target = if !is_url {
            let dest_path = PathBuf::from(dest.strip_prefix("file://").unwrap_or(dest));
            let exists = dest_path.exists();
            if exists && options.mode == WriteMode::ErrorIfExists {
                return Err(VolleyError::plan(format!(
                    "destination {dest} already exists (choose overwrite or append mode)"
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
            let staging = parent.join(format!(".{name}.volley-staging-{id}"));
            std::fs::create_dir_all(&staging)
                .with_context(|| format!("creating the staging folder {}", staging.display()))?;
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
            let existing = io
                .block_on(async {
                    use futures::StreamExt;
                    let mut list = store.list(Some(&prefix));
                    list.next().await.transpose()
                })
                .with_context(|| format!("listing {dest}"))?;
            if existing.is_some() && options.mode == WriteMode::ErrorIfExists {
                return Err(VolleyError::plan(format!(
                    "destination {dest} already exists (choose overwrite or append mode)"
                )));
            }
            let base = scratch_dir
                .map(FsPath::to_path_buf)
                .unwrap_or_else(std::env::temp_dir);
            let scratch = base.join(format!("volley-write-{id}"));
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("creating the scratch folder {}", scratch.display()))?;
            Target::Remote {
                url,
                staging: prefix.clone().join(format!("_volley_staging-{id}")),
                dest: prefix,
                store,
                scratch,
            }
        };
        for c in &options.partition_by {
            if c.is_empty() {
                return Err(VolleyError::plan("empty partition column name"));
            }
        }
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

    /// A writer for task `task`; its files are named after the task.
    pub fn part_writer(&self, task: usize) -> Result<PartWriter> {
        let (local_dir, upload) = match &self.target {
            Target::Local { staging, .. } => (staging.clone(), None),
            Target::Remote {
                store,
                staging,
                scratch,
                ..
            } => (
                scratch.join(format!("task-{task}")),
                Some((Arc::clone(store), staging.clone(), self.io.clone())),
            ),
        };
        PartWriter::try_new(
            self.options.clone(),
            format!("part-{}-{task:05}", self.id),
            local_dir,
            upload,
        )
    }

    /// Part `task` of the write, to be written by another process (a cluster worker)
    /// that reaches the same file system or object store.
    pub fn remote_part(&self, task: usize) -> RemotePart {
        RemotePart {
            options: self.options.clone(),
            prefix: format!("part-{}-{task:05}", self.id),
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

    /// Moves every staged file into place. Call once, after every part writer finished.
    pub fn commit(self) -> Result<()> {
        let display = self.display.clone();
        match &self.target {
            Target::Local { dest, staging } => {
                if self.options.single_file {
                    let file = std::fs::read_dir(staging)?
                        .filter_map(|e| e.ok())
                        .find(|e| e.path().is_file())
                        .map(|e| e.path());
                    match file {
                        Some(f) => {
                            if dest.exists() {
                                remove_path(dest)?;
                            }
                            std::fs::rename(&f, dest)
                                .with_context(|| format!("committing {display}"))?;
                        }
                        None => {
                            return Err(VolleyError::internal(format!(
                                "no file was staged for {display}"
                            )))
                        }
                    }
                    std::fs::remove_dir_all(staging).ok();
                } else if !dest.exists() {
                    std::fs::rename(staging, dest)
                        .with_context(|| format!("committing {display}"))?;
                } else if self.options.mode == WriteMode::Overwrite {
                    let trash = staging.with_extension("old");
                    std::fs::rename(dest, &trash)
                        .with_context(|| format!("committing {display}"))?;
                    std::fs::rename(staging, dest)
                        .with_context(|| format!("committing {display}"))?;
                    remove_path(&trash).ok();
                } else {
                    move_tree(staging, dest).with_context(|| format!("committing {display}"))?;
                    std::fs::remove_dir_all(staging).ok();
                }
            }
            Target::Remote {
                store,
                dest,
                staging,
                scratch,
                ..
            } => {
                let store = Arc::clone(store);
                let (dest, staging) = (dest.clone(), staging.clone());
                let overwrite = self.options.mode == WriteMode::Overwrite;
                let single = self.options.single_file;
                self.io
                    .block_on(async move {
                        use futures::TryStreamExt;
                        let staged: Vec<_> = store.list(Some(&staging)).try_collect().await?;
                        if overwrite || single {
                            let old: Vec<_> = store.list(Some(&dest)).try_collect().await?;
                            for o in old {
                                if !o.location.as_ref().starts_with(staging.as_ref()) {
                                    store.delete(&o.location).await?;
                                }
                            }
                        }
                        for o in staged {
                            let target = if single {
                                dest.clone()
                            } else {
                                let rel: Vec<_> = o
                                    .location
                                    .prefix_match(&staging)
                                    .map(|it| it.collect())
                                    .unwrap_or_default();
                                Path::from_iter(dest.parts().chain(rel))
                            };
                            store.rename(&o.location, &target).await?;
                        }
                        Ok::<_, object_store::Error>(())
                    })
                    .with_context(|| format!("committing {display}"))?;
                std::fs::remove_dir_all(scratch).ok();
            }
        }
        Ok(())
    }

    /// Removes everything staged; the destination is left as it was.
    pub fn abort(self) {
        match &self.target {
            Target::Local { staging, .. } => {
                std::fs::remove_dir_all(staging).ok();
            }
            Target::Remote {
                store,
                staging,
                scratch,
                ..
            } => {
                let store = Arc::clone(store);
                let staging = staging.clone();
                self.io.block_on(async move {
                    use futures::TryStreamExt;
                    if let Ok(staged) = store.list(Some(&staging)).try_collect::<Vec<_>>().await {
                        for o in staged {
                            store.delete(&o.location).await.ok();
                        }
                    }
                });
                std::fs::remove_dir_all(scratch).ok();
            }
        }
    }
}

fn remove_path(p: &FsPath) -> std::io::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
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
