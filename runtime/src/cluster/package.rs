//! Job packages: the job's binary and working folder, uploaded to the head and fetched
//! by the nodes that run the job's driver and workers.
//!
//! A package travels as a manifest (each file's path, mode, size and SHA-256) and blobs
//! (file contents, named by their digest). The head and each node keep blobs in a
//! [`BlobCache`], so content the head (or a node) already has is not sent again: a
//! program submitted a hundred times is uploaded once, and fetched once per node.
//!
//! A package is a set of regular files under relative paths. Paths are checked on both
//! ends: no absolute paths, no `..`, and the uploader follows no link that leads out of
//! the working folder, so a package can only ever write inside its job's folder.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use volley_common::{Result, VolleyError};

use super::proto::{BlobChunk, PackageFile, PackageManifest};

/// Size of the chunks a package travels in.
pub const CHUNK: usize = 1 << 20;

/// Checks that `path` stays inside the folder it is relative to.
pub fn safe_relative(path: &str) -> Result<PathBuf> {
    let bad = |why: &str| VolleyError::plan(format!("package path {path:?}: {why}"));
    if path.is_empty() || path.contains('\0') {
        return Err(bad("empty or not a valid path"));
    }
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("`..` is not allowed")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad("absolute paths are not allowed"))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("names no file"));
    }
    Ok(out)
}

/// The SHA-256 of `data`, as 64 lowercase hex digits: a blob's name.
pub fn digest_of(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Checks that `digest` is a SHA-256 in hex (it becomes a file name).
pub fn check_digest(digest: &str) -> Result<()> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        Err(VolleyError::plan(format!(
            "{digest:?} is not a package digest (64 hex digits of SHA-256)"
        )))
    }
}

/// The manifest of local files `(relative path, file, mode)`, hashing each (or taking
/// its digest from `known`), and where each digest's bytes are on this machine.
pub fn manifest_of(
    files: &[(String, PathBuf, u32)],
    known: Option<&DigestCache>,
) -> Result<(PackageManifest, HashMap<String, PathBuf>)> {
    let mut manifest = PackageManifest::default();
    let mut sources = HashMap::new();
    for (rel, path, mode) in files {
        safe_relative(rel)?;
        let cannot_read = |e: std::io::Error| {
            VolleyError::Io(e).context(format!("cannot read {}", path.display()))
        };
        let mut file = std::fs::File::open(path).map_err(cannot_read)?;
        let before = file.metadata().map_err(cannot_read)?;
        let (digest, size) = match known.and_then(|k| k.get(&before)) {
            Some(digest) => (digest, before.len()),
            None => {
                let (digest, size) = hash_file(&mut file).map_err(cannot_read)?;
                // Remembered only if the file did not change while it was read.
                let after = std::fs::metadata(path).map_err(cannot_read)?;
                if let Some(k) = known {
                    if file_identity(&before) == file_identity(&after) && size == after.len() {
                        k.put(&after, &digest);
                    }
                }
                (digest, size)
            }
        };
        sources.insert(digest.clone(), path.clone());
        manifest.files.push(PackageFile {
            path: rel.clone(),
            mode: *mode,
            size,
            digest,
        });
    }
    Ok((manifest, sources))
}

/// The SHA-256 of what is left to read in `file`, and its bytes.
fn hash_file(file: &mut std::fs::File) -> std::io::Result<(String, u64)> {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(hasher.finish().as_ref()), size))
}

/// What tells one version of a file from another without reading it: its device and
/// inode, size, and times of last modification and of last change (which no one can set
/// back: rewriting a file with its old modification time still moves it).
fn file_identity(m: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{:x}-{:x}-{:x}-{}.{:09}-{}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// Digests of local files already hashed, by [`file_identity`], one small file each in
/// a folder: a program that joins a cluster for every query (`volley sql --address`)
/// hashes its binary of tens of MB once per build, not once per run. The head still
/// checks every byte it receives against its digest.
#[derive(Debug)]
pub struct DigestCache {
    dir: PathBuf,
}

/// Entries a [`DigestCache`] keeps; past this the oldest half goes.
const DIGESTS_KEPT: usize = 4096;

impl DigestCache {
    /// The cache in `dir` (created).
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| VolleyError::Io(e).context(format!("cannot create {}", dir.display())))?;
        Ok(Self { dir })
    }

    /// The user's cache: `$XDG_CACHE_HOME/volley/digests`, else
    /// `~/.cache/volley/digests`; `None` where neither can be made (files are then
    /// hashed every time).
    pub fn user() -> Option<Self> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|d| !d.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })?;
        Self::open(base.join("volley").join("digests")).ok()
    }

    fn get(&self, m: &std::fs::Metadata) -> Option<String> {
        let digest = std::fs::read_to_string(self.dir.join(file_identity(m))).ok()?;
        check_digest(&digest).ok()?;
        Some(digest)
    }

    /// Remembers `digest` for the file `m` describes; failures only cost a later hash.
    fn put(&self, m: &std::fs::Metadata, digest: &str) {
        let Ok(mut tmp) = tempfile::NamedTempFile::new_in(&self.dir) else {
            return;
        };
        if tmp.write_all(digest.as_bytes()).is_ok() {
            let _ = tmp.persist(self.dir.join(file_identity(m)));
        }
        self.trim();
    }

    /// Keeps at most [`DIGESTS_KEPT`] entries, the newest.
    fn trim(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut entries: Vec<(std::time::SystemTime, PathBuf)> = dir
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if entries.len() <= DIGESTS_KEPT {
            return;
        }
        entries.sort();
        for (_, path) in &entries[..entries.len() - DIGESTS_KEPT / 2] {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Checks a manifest received from elsewhere: safe paths, each once, valid digests, and
/// at most `limit` bytes in all.
pub fn check_manifest(manifest: &PackageManifest, limit: u64) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    for f in &manifest.files {
        let rel = safe_relative(&f.path)?;
        if !seen.insert(rel) {
            return Err(VolleyError::plan(format!(
                "package file {} is listed twice",
                f.path
            )));
        }
        check_digest(&f.digest)
            .map_err(|e| VolleyError::plan(format!("package file {}: {e}", f.path)))?;
        total = total.saturating_add(f.size);
    }
    // A file cannot also be a folder of others (`a` and `a/b`).
    for f in &manifest.files {
        let path = safe_relative(&f.path)?;
        if let Some(file) = path.ancestors().skip(1).find(|a| seen.contains(*a)) {
            return Err(VolleyError::plan(format!(
                "package file {}: {} is a file of the package too",
                f.path,
                file.display()
            )));
        }
    }
    if total > limit {
        return Err(VolleyError::plan(format!(
            "the package ({}) is larger than the limit of {}",
            volley_common::format_bytes(total),
            volley_common::format_bytes(limit)
        )));
    }
    Ok(())
}

/// Files kept once per content digest, least recently used evicted past a size limit.
///
/// The head keeps every uploaded file here, so a job whose binary (or working folder)
/// the head already has uploads nothing; each node keeps the files it fetched, so a node
/// fetches a given binary once. A blob is written to a temporary file, checked against
/// its digest, then renamed into place: readers (other processes sharing the folder
/// included) see whole, verified blobs or none.
///
/// A job gets its files in its own folder ([`BlobCache::materialize`]): executables as
/// hard links to their blobs (a binary of hundreds of MB is not copied for every job
/// on every node), the other files as copies it may change. Either way it keeps its
/// files when a blob is evicted while it runs. A blob is read-only and *sealed*: its
/// modification time is set to [`SEALED`] when it is put in place; a blob found with
/// another one was written since (through a job's link) and is removed, not used, so
/// a job cannot change what later jobs get. When each blob was last used is kept
/// beside it (`used/DIGEST`), for eviction.
#[derive(Debug)]
pub struct BlobCache {
    root: PathBuf,
    limit: u64,
    /// Bytes of blobs received (uploads or fetches), for metrics and logs.
    received: std::sync::atomic::AtomicU64,
}

impl BlobCache {
    /// Opens (creating) the cache in `root`, holding at most `limit` bytes of blobs
    /// not in use.
    pub fn open(root: PathBuf, limit: u64) -> Result<Self> {
        for sub in ["tmp", "used"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| {
                VolleyError::Io(e).context(format!("cannot create {}", root.display()))
            })?;
        }
        // Partial files of uploads or fetches a killed process left (an hour old: the
        // agents of one machine share the folder, and theirs may be under way).
        if let Ok(dir) = std::fs::read_dir(root.join("tmp")) {
            for e in dir.flatten() {
                // By the last change (a blob about to be put in place is sealed with
                // an old modification time first).
                let old = e.metadata().ok().is_some_and(|m| {
                    use std::os::unix::fs::MetadataExt;
                    let changed = std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(m.ctime().max(0) as u64);
                    changed
                        .elapsed()
                        .is_ok_and(|age| age > std::time::Duration::from_secs(3600))
                });
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Self {
            root,
            limit,
            received: Default::default(),
        })
    }

    /// Where the blob `digest` is (whether there or not).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.root.join(digest)
    }

    /// Whether the blob is here, as it was put in place; marks it used. A blob written
    /// since is removed (and then fetched or uploaded again).
    pub fn has(&self, digest: &str) -> bool {
        if check_digest(digest).is_err() {
            return false;
        }
        let path = self.path(digest);
        match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) if t == SEALED => touch(&self.used_path(digest)).is_ok(),
            Ok(_) => {
                tracing::warn!("package blob {digest} was written after it was stored: removed");
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(self.used_path(digest));
                false
            }
            Err(_) => false,
        }
    }

    /// Where the blob's last use is noted (the file's modification time).
    fn used_path(&self, digest: &str) -> PathBuf {
        self.root.join("used").join(digest)
    }

    /// The digests of `manifest` that are not here (each once).
    pub fn missing(&self, manifest: &PackageManifest) -> Vec<String> {
        let mut out: Vec<String> = manifest
            .files
            .iter()
            .filter(|f| !self.has(&f.digest))
            .map(|f| f.digest.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Bytes of blobs received since the cache was opened.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of blobs here now.
    pub fn size(&self) -> u64 {
        self.blobs().iter().map(|b| b.1).sum()
    }

    /// Starts receiving the blob `digest`, of at most `limit` bytes.
    pub fn writer(&self, digest: &str, limit: u64) -> Result<BlobWriter<'_>> {
        check_digest(digest)?;
        let file = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        Ok(BlobWriter {
            cache: self,
            digest: digest.to_string(),
            file,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            written: 0,
            limit,
        })
    }

    /// Stores `data` as a blob; returns its digest.
    pub fn insert(&self, data: &[u8]) -> Result<String> {
        let digest = digest_of(data);
        if !self.has(&digest) {
            let mut w = self.writer(&digest, data.len() as u64)?;
            w.write(0, data)?;
            w.commit()?;
        }
        Ok(digest)
    }

    /// Puts the files of `manifest` into `dest` (created afresh): executables (a mode
    /// with an execute bit) as hard links to their read-only blobs where `dest` is on
    /// the cache's file system, other files as copies with their modes. Fails naming
    /// the first file whose blob is not here.
    pub fn materialize(&self, manifest: &PackageManifest, dest: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_dir_all(dest);
        std::fs::create_dir_all(dest)
            .map_err(|e| VolleyError::Io(e).context(format!("cannot create {}", dest.display())))?;
        for f in &manifest.files {
            let rel = safe_relative(&f.path)?;
            check_digest(&f.digest)?;
            let to = dest.join(&rel);
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let from = self.path(&f.digest);
            if !from.exists() {
                return Err(VolleyError::execution(format!(
                    "package file {} (blob {}): not in the cache",
                    f.path,
                    &f.digest[..12]
                )));
            }
            let _ = touch(&self.used_path(&f.digest));
            if f.mode & 0o111 != 0 && std::fs::hard_link(&from, &to).is_ok() {
                continue;
            }
            std::fs::copy(&from, &to).map_err(|e| {
                VolleyError::execution(format!(
                    "package file {} (blob {}): {e}",
                    f.path,
                    &f.digest[..12]
                ))
            })?;
            std::fs::set_permissions(
                &to,
                std::fs::Permissions::from_mode((f.mode & 0o755) | 0o600),
            )?;
        }
        Ok(())
    }

    /// Removes least recently used blobs, never one in `keep`, until the cache holds at
    /// most its limit; returns the bytes removed.
    pub fn evict(&self, keep: &std::collections::HashSet<String>) -> u64 {
        let mut blobs = self.blobs();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        if total <= self.limit {
            return 0;
        }
        blobs.sort_by_key(|b| b.2);
        let mut removed = 0;
        for (digest, size, _) in blobs {
            if total <= self.limit {
                break;
            }
            if keep.contains(&digest) {
                continue;
            }
            if std::fs::remove_file(self.path(&digest)).is_ok() {
                let _ = std::fs::remove_file(self.used_path(&digest));
                total -= size;
                removed += size;
            }
        }
        removed
    }

    /// `(digest, bytes, last use)` of each blob here.
    fn blobs(&self) -> Vec<(String, u64, std::time::SystemTime)> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return vec![];
        };
        dir.filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().to_string();
            check_digest(&name).ok()?;
            let size = e.metadata().ok()?.len();
            // Never noted as used: the oldest.
            let used = std::fs::metadata(self.used_path(&name))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            Some((name, size, used))
        })
        .collect()
    }

    /// The chunks of the blob `digest`, read on a blocking thread a few ahead of the
    /// consumer (a blob may be hundreds of MiB: it is never held whole in memory).
    pub fn chunks(&self, digest: &str) -> Result<tokio::sync::mpsc::Receiver<Result<BlobChunk>>> {
        check_digest(digest)?;
        let path = self.path(digest);
        if !self.has(digest) {
            return Err(VolleyError::plan(format!("no blob {digest} here")));
        }
        Ok(blob_chunks(vec![(digest.to_string(), path)]))
    }
}

/// A blob being received; [`BlobWriter::commit`] checks it and puts it in place.
pub struct BlobWriter<'a> {
    cache: &'a BlobCache,
    digest: String,
    file: tempfile::NamedTempFile,
    hasher: ring::digest::Context,
    written: u64,
    limit: u64,
}

impl BlobWriter<'_> {
    /// Appends a chunk, which must start where the blob ends.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset != self.written {
            return Err(VolleyError::plan(format!(
                "blob {}: chunk at {offset} but {} bytes have come",
                self.digest, self.written
            )));
        }
        self.written += data.len() as u64;
        if self.written > self.limit {
            return Err(VolleyError::plan(format!(
                "the package is larger than the limit of {}",
                volley_common::format_bytes(self.limit)
            )));
        }
        self.hasher.update(data);
        self.file.write_all(data)?;
        self.cache
            .received
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks the bytes against the digest and puts the blob in place.
    pub fn commit(self) -> Result<()> {
        let got = hex(self.hasher.finish().as_ref());
        if got != self.digest {
            return Err(VolleyError::plan(format!(
                "blob {}: the bytes that came have digest {got}",
                self.digest
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        let file = self.file.as_file();
        file.sync_data()?;
        // Sealed and read-only, for this user only (executable: jobs run their
        // binaries through links).
        file.set_modified(SEALED)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o500))?;
        let digest = self.digest.clone();
        let cache = self.cache;
        // Marked used before it is in place: an eviction in between must not take it
        // for the least recently used blob.
        let _ = touch(&cache.used_path(&digest));
        self.file
            .persist(cache.path(&digest))
            .map_err(|e| VolleyError::Io(e.error))?;
        Ok(())
    }
}

/// The modification time of every blob in a [`BlobCache`]: one with another was
/// written after it was checked and put in place.
const SEALED: std::time::SystemTime = std::time::UNIX_EPOCH;

/// Notes a use now (the cache evicts the least recently used): the modification time
/// of `path`, created if missing.
fn touch(path: &Path) -> std::io::Result<()> {
    std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)?
        .set_modified(std::time::SystemTime::now())
}

/// The chunks of blobs `(digest, file)`, read on a blocking thread a few chunks ahead of
/// the consumer. A file that cannot be read ends the stream with its error.
pub fn blob_chunks(
    blobs: Vec<(String, PathBuf)>,
) -> tokio::sync::mpsc::Receiver<Result<BlobChunk>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for (digest, path) in blobs {
            if let Err(e) = each_chunk(&digest, &path, |c| {
                tx.blocking_send(Ok(c))
                    .map_err(|_| VolleyError::execution("the receiver went away"))
            }) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    });
    rx
}

/// Calls `f` with each chunk of one file, in order.
fn each_chunk(digest: &str, path: &Path, mut f: impl FnMut(BlobChunk) -> Result<()>) -> Result<()> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| VolleyError::Io(e).context(format!("cannot read {}", path.display())))?;
    let mut offset = 0u64;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            let r = file.read(&mut buf[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        buf.truncate(n);
        let last = n < CHUNK;
        f(BlobChunk {
            digest: digest.to_string(),
            offset,
            data: buf,
            last,
        })?;
        offset += n as u64;
        if last {
            break;
        }
    }
    Ok(())
}

/// Receives a stream of blob chunks into `cache`, each blob checked against its digest;
/// returns the bytes received and the blobs' digests. At most `limit` bytes in all.
pub async fn receive_blobs<S, E>(
    cache: &BlobCache,
    mut chunks: S,
    limit: u64,
) -> Result<(u64, Vec<String>)>
where
    S: futures::Stream<Item = std::result::Result<BlobChunk, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures::StreamExt;
    let mut total = 0u64;
    let mut digests = Vec::new();
    let mut current: Option<BlobWriter<'_>> = None;
    while let Some(chunk) = chunks.next().await {
        let c = chunk.map_err(|e| VolleyError::execution(format!("receiving a package: {e}")))?;
        let mut w = match current.take() {
            Some(w) if w.digest == c.digest => w,
            Some(w) => {
                return Err(VolleyError::plan(format!(
                    "blob {} ended without its last chunk",
                    w.digest
                )))
            }
            None => cache.writer(&c.digest, limit.saturating_sub(total))?,
        };
        // Disk writes stay off the threads that answer heartbeats.
        tokio::task::block_in_place(|| w.write(c.offset, &c.data))?;
        total += c.data.len() as u64;
        if c.last {
            digests.push(w.digest.clone());
            tokio::task::block_in_place(|| w.commit())?;
        } else {
            current = Some(w);
        }
    }
    if let Some(w) = current {
        return Err(VolleyError::plan(format!(
            "blob {} arrived incomplete (the upload stopped)",
            w.digest
        )));
    }
    Ok((total, digests))
}

/// The files of a working folder to upload: `(relative path, file, mode)`.
///
/// Links are followed only where they stay inside `root`; a link that leads out of it
/// is an error, so a job cannot smuggle in files from elsewhere on the submitting machine.
pub fn working_dir_files(root: &Path) -> Result<Vec<(String, PathBuf, u32)>> {
    let mut files = Vec::new();
    walk(root, root, &mut files, true, &mut Vec::new())?;
    Ok(files)
}

/// Lists the files below `dir` into `out`; `inside` holds the folders (canonical) the
/// walk is in, so that a link back to one of them is refused rather than followed
/// round and round.
fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf, u32)>,
    check_links: bool,
    inside: &mut Vec<PathBuf>,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let canon_root = root
        .canonicalize()
        .map_err(|e| VolleyError::Io(e).context(format!("cannot read {}", root.display())))?;
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| VolleyError::Io(e).context(format!("cannot read {}", dir.display())))?;
    if inside.contains(&canon_dir) {
        return Err(VolleyError::plan(format!(
            "link {} leads back to a folder that holds it (a loop)",
            dir.display()
        )));
    }
    inside.push(canon_dir);
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| VolleyError::Io(e).context(format!("cannot read {}", dir.display())))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let target_meta = if meta.file_type().is_symlink() {
            if !check_links {
                continue;
            }
            let target = path
                .canonicalize()
                .map_err(|e| VolleyError::plan(format!("link {}: {e}", path.display())))?;
            if !target.starts_with(&canon_root) {
                return Err(VolleyError::plan(format!(
                    "link {} leads outside the working folder (to {})",
                    path.display(),
                    target.display()
                )));
            }
            std::fs::metadata(&path)?
        } else {
            meta
        };
        if target_meta.is_dir() {
            walk(root, &path, out, check_links, inside)?;
        } else if target_meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| VolleyError::internal("walked outside the root"))?
                .to_string_lossy()
                .to_string();
            out.push((rel, path, target_meta.permissions().mode()));
        }
    }
    inside.pop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escaping_paths() {
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("a/../../x").is_err()); // check_paths: allow
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("").is_err());
        assert_eq!(safe_relative("./a/b").unwrap(), PathBuf::from("a/b"));
    }

    #[test]
    fn refuses_links_out_of_the_working_folder() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink(src.join("sub/a.txt"), src.join("inside")).unwrap();
        assert_eq!(working_dir_files(&src).unwrap().len(), 2);
        std::os::unix::fs::symlink("/etc", src.join("out")).unwrap();
        let err = working_dir_files(&src).unwrap_err().to_string();
        assert!(err.contains("outside the working folder"), "{err}");
        std::fs::remove_file(src.join("out")).unwrap();
        // A link to a folder it is in, directly or through another link, is a loop.
        std::os::unix::fs::symlink(&src, src.join("sub/up")).unwrap();
        let err = working_dir_files(&src).unwrap_err().to_string();
        assert!(err.contains("a loop") && err.contains("up"), "{err}");
        std::fs::remove_file(src.join("sub/up")).unwrap();
        std::fs::create_dir_all(src.join("b")).unwrap();
        std::os::unix::fs::symlink(src.join("b"), src.join("sub/to_b")).unwrap();
        std::os::unix::fs::symlink(src.join("sub"), src.join("b/to_sub")).unwrap();
        let err = working_dir_files(&src).unwrap_err().to_string();
        assert!(err.contains("a loop"), "{err}");
    }

    fn receive(
        cache: &BlobCache,
        chunks: Vec<BlobChunk>,
        limit: u64,
    ) -> Result<(u64, Vec<String>)> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, String>));
        rt.block_on(receive_blobs(cache, stream, limit))
    }

    fn chunks_of(digest: &str, path: &Path) -> Vec<BlobChunk> {
        let mut out = vec![];
        each_chunk(digest, path, |c| {
            out.push(c);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn a_package_round_trips_through_caches_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/big"), vec![7u8; CHUNK + 10]).unwrap();
        std::fs::write(src.join("same"), vec![7u8; CHUNK + 10]).unwrap();
        std::fs::write(src.join("run.sh"), b"echo hi").unwrap();
        let files = working_dir_files(&src).unwrap();
        let (manifest, sources) = manifest_of(&files, None).unwrap();
        assert_eq!(manifest.files.len(), 3);
        // Two files with the same bytes are one blob.
        assert_eq!(sources.len(), 2);
        check_manifest(&manifest, 1 << 30).unwrap();
        let too_small = check_manifest(&manifest, 100).unwrap_err().to_string();
        assert!(too_small.contains("larger than the limit"), "{too_small}");

        let head = BlobCache::open(dir.path().join("head"), 1 << 30).unwrap();
        let missing = head.missing(&manifest);
        assert_eq!(missing.len(), 2);
        let chunks: Vec<BlobChunk> = missing
            .iter()
            .flat_map(|d| chunks_of(d, &sources[d]))
            .collect();
        assert_eq!(
            receive(&head, chunks, 1 << 30).unwrap().0,
            CHUNK as u64 + 10 + 7
        );
        assert!(head.missing(&manifest).is_empty());
        assert_eq!(head.received_bytes(), CHUNK as u64 + 10 + 7);

        let out = dir.path().join("job");
        head.materialize(&manifest, &out).unwrap();
        assert_eq!(
            std::fs::read(out.join("sub/big")).unwrap().len(),
            CHUNK + 10
        );
        assert_eq!(std::fs::read(out.join("run.sh")).unwrap(), b"echo hi");
        // The job's copy is its own: writing it leaves the cache as it was.
        std::fs::write(out.join("run.sh"), b"changed").unwrap();
        let d = &manifest
            .files
            .iter()
            .find(|f| f.path == "run.sh")
            .unwrap()
            .digest;
        assert_eq!(std::fs::read(head.path(d)).unwrap(), b"echo hi");
    }

    /// An executable is linked into the job's folder, not copied; a blob written
    /// through such a link is not trusted again: it is removed (and fetched again).
    #[test]
    fn executables_are_linked_and_a_blob_written_through_a_link_is_dropped() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path().join("c"), 1 << 30).unwrap();
        let body = b"#!/bin/sh\necho hi\n";
        let d = cache.insert(body).unwrap();
        let manifest = PackageManifest {
            files: vec![PackageFile {
                path: "bin/prog".into(),
                mode: 0o755,
                size: body.len() as u64,
                digest: d.clone(),
            }],
        };
        let job = dir.path().join("job");
        cache.materialize(&manifest, &job).unwrap();
        let linked = job.join("bin/prog");
        assert_eq!(
            std::fs::metadata(&linked).unwrap().ino(),
            std::fs::metadata(cache.path(&d)).unwrap().ino()
        );
        assert_eq!(std::fs::read(&linked).unwrap(), body);
        assert!(cache.has(&d));
        match std::fs::File::options().write(true).open(&linked) {
            // Allowed to a privileged user only: the blob is read-only.
            Ok(mut f) => {
                f.write_all(b"changed").unwrap();
                drop(f);
                assert!(!cache.has(&d));
                assert!(!cache.path(&d).exists());
                assert!(cache.missing(&manifest) == vec![d.clone()]);
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied),
        }
    }

    /// A file's digest is taken from the cache while the file is unchanged; a file
    /// rewritten (even to the same size and modification time) is hashed again.
    #[test]
    fn digests_are_remembered_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::open(dir.path().join("digests")).unwrap();
        let file = dir.path().join("prog");
        std::fs::write(&file, b"version one").unwrap();
        let files = vec![("bin/prog".to_string(), file.clone(), 0o755)];
        let digest = |files: &[(String, PathBuf, u32)]| {
            manifest_of(files, Some(&cache)).unwrap().0.files[0]
                .digest
                .clone()
        };
        let first = digest(&files);
        assert_eq!(first, digest_of(b"version one"));
        assert_eq!(
            std::fs::read_dir(dir.path().join("digests"))
                .unwrap()
                .count(),
            1
        );
        // Remembered: a wrong entry for the same identity would be believed.
        let meta = std::fs::metadata(&file).unwrap();
        cache.put(&meta, &digest_of(b"remembered"));
        assert_eq!(digest(&files), digest_of(b"remembered"));
        // Rewritten with the same length and modification time: hashed again.
        let mtime = meta.modified().unwrap();
        // File times move by the kernel's clock tick: let one pass.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"version two").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(digest(&files), digest_of(b"version two"));
    }

    #[test]
    fn bytes_that_do_not_match_their_digest_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path().join("c"), 1 << 30).unwrap();
        let wrong = digest_of(b"something else");
        let err = receive(
            &cache,
            vec![BlobChunk {
                digest: wrong.clone(),
                offset: 0,
                data: b"evil".to_vec(),
                last: true,
            }],
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("the bytes that came have digest"), "{err}");
        assert!(!cache.has(&wrong));
        // A digest is a file name: only hex of the right length.
        let err = receive(
            &cache,
            vec![BlobChunk {
                digest: "../../etc/passwd".into(), // check_paths: allow
                offset: 0,
                data: vec![],
                last: true,
            }],
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not a package digest"), "{err}");
        // An upload over the limit stops.
        let big = vec![1u8; 5000];
        let err = receive(
            &cache,
            vec![BlobChunk {
                digest: digest_of(&big),
                offset: 0,
                data: big,
                last: true,
            }],
            4096,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("larger than the limit"), "{err}");
        // A stream that stops mid-blob leaves nothing.
        let data = vec![2u8; 10];
        let err = receive(
            &cache,
            vec![BlobChunk {
                digest: digest_of(&data),
                offset: 0,
                data: data.clone(),
                last: false,
            }],
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("arrived incomplete"), "{err}");
        assert!(!cache.has(&digest_of(&data)));
    }

    #[test]
    fn the_least_recently_used_blobs_go_first_and_kept_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::open(dir.path().join("c"), 2500).unwrap();
        let set = |d: &str, secs: u64| {
            std::fs::File::options()
                .append(true)
                .open(cache.used_path(d))
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .unwrap();
        };
        let a = cache.insert(&[1u8; 1000]).unwrap();
        let b = cache.insert(&[2u8; 1000]).unwrap();
        let c = cache.insert(&[3u8; 1000]).unwrap();
        set(&a, 1_000);
        set(&b, 3_000);
        set(&c, 2_000);
        assert_eq!(cache.size(), 3000);
        // `a` is the oldest but kept: `c`, the next oldest, goes.
        let keep = [a.clone()].into_iter().collect();
        assert_eq!(cache.evict(&keep), 1000);
        assert!(cache.path(&a).exists() && cache.path(&b).exists());
        assert!(!cache.path(&c).exists());
        // Using `a` makes it the newest: `b` goes next.
        set(&b, 3_000);
        assert!(cache.has(&a));
        let d = cache.insert(&[4u8; 1000]).unwrap();
        set(&d, 4_000);
        cache.has(&a);
        assert_eq!(cache.evict(&Default::default()), 1000);
        assert!(!cache.path(&b).exists());
        assert!(cache.path(&a).exists() && cache.path(&d).exists());
        // Under the limit, nothing goes.
        assert_eq!(cache.evict(&Default::default()), 0);
    }
}
