//! Job packages: the job's binary and working folder, uploaded to the head and fetched
//! by the nodes that run the job's driver and workers.
//!
//! A package is a set of regular files under relative paths. Paths are checked on both
//! ends: no absolute paths, no `..`, and the uploader follows no link that leads out of
//! the working folder, so a package can only ever write inside its job's folder.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use volley_common::{Result, VolleyError};

use super::proto::FileChunk;

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

/// Writes a package's chunks into a folder.
#[derive(Debug)]
pub struct PackageWriter {
    root: PathBuf,
    bytes: u64,
    limit: u64,
    /// Files begun whose last chunk has not come yet.
    open: std::collections::BTreeSet<String>,
}

impl PackageWriter {
    /// Writes into `root` (created), refusing packages over `limit` bytes.
    pub fn new(root: PathBuf, limit: u64) -> Result<Self> {
        std::fs::create_dir_all(&root)
            .map_err(|e| VolleyError::Io(e).context(format!("cannot create {}", root.display())))?;
        Ok(Self {
            root,
            bytes: 0,
            limit,
            open: Default::default(),
        })
    }

    /// Checks that every file arrived whole.
    pub fn finish(self) -> Result<()> {
        match self.open.iter().next() {
            Some(f) => Err(VolleyError::plan(format!(
                "package file {f} arrived incomplete (the upload stopped)"
            ))),
            None => Ok(()),
        }
    }

    /// Writes one chunk. The first chunk of a file (offset 0) creates it; later ones
    /// must continue exactly where the file ends.
    pub fn write(&mut self, chunk: &FileChunk) -> Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let rel = safe_relative(&chunk.path)?;
        self.bytes += chunk.data.len() as u64;
        if self.bytes > self.limit {
            return Err(VolleyError::plan(format!(
                "the package is larger than the limit of {}",
                volley_common::format_bytes(self.limit)
            )));
        }
        let path = self.root.join(&rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = if chunk.offset == 0 {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                // Never write through a link, even one that cannot exist here.
                .custom_flags(libc_nofollow())
                .mode(0o600)
                .open(&path)
                .map_err(|e| VolleyError::plan(format!("package file {}: {e}", chunk.path)))?
        } else {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc_nofollow())
                .open(&path)
                .map_err(|e| VolleyError::plan(format!("package file {}: {e}", chunk.path)))?;
            let len = f.seek(SeekFrom::End(0))?;
            if len != chunk.offset {
                return Err(VolleyError::plan(format!(
                    "package file {}: chunk at {} but the file has {len} bytes",
                    chunk.path, chunk.offset
                )));
            }
            f
        };
        f.write_all(&chunk.data)?;
        if chunk.last {
            self.open.remove(&chunk.path);
        } else {
            self.open.insert(chunk.path.clone());
        }
        if chunk.last {
            let mode = (chunk.mode & 0o755) | 0o600;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }
}

/// `O_NOFOLLOW` on Linux (x86-64 and aarch64 share the value).
fn libc_nofollow() -> i32 {
    0o400000
}

/// The files of a package folder: `(relative path, file, mode)`.
pub fn package_files(root: &Path) -> Result<Vec<(String, PathBuf, u32)>> {
    let mut files = Vec::new();
    walk(root, root, &mut files, false)?;
    Ok(files)
}

/// The chunks of `files`, read on a blocking thread a few chunks ahead of the consumer
/// (a package may be hundreds of MiB: it is never held whole in memory).
pub fn chunk_stream(
    files: Vec<(String, PathBuf, u32)>,
) -> tokio::sync::mpsc::Receiver<Result<FileChunk>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for (rel, path, mode) in files {
            if let Err(e) = each_chunk(&rel, &path, mode, |c| {
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

/// Chunks of one file.
pub fn file_chunks(rel: &str, path: &Path, mode: u32) -> Result<Vec<FileChunk>> {
    let mut out = Vec::new();
    each_chunk(rel, path, mode, |c| {
        out.push(c);
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` with each chunk of one file, in order.
fn each_chunk(
    rel: &str,
    path: &Path,
    mode: u32,
    mut f: impl FnMut(FileChunk) -> Result<()>,
) -> Result<()> {
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
        f(FileChunk {
            path: rel.to_string(),
            mode,
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

/// The files of a working folder to upload: `(relative path, file, mode)`.
///
/// Links are followed only where they stay inside `root`; a link that leads out of it
/// is an error, so a job cannot smuggle in files from elsewhere on the submitting machine.
pub fn working_dir_files(root: &Path) -> Result<Vec<(String, PathBuf, u32)>> {
    let mut files = Vec::new();
    walk(root, root, &mut files, true)?;
    Ok(files)
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, PathBuf, u32)>,
    check_links: bool,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let canon_root = root
        .canonicalize()
        .map_err(|e| VolleyError::Io(e).context(format!("cannot read {}", root.display())))?;
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
            walk(root, &path, out, check_links)?;
        } else if target_meta.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| VolleyError::internal("walked outside the root"))?
                .to_string_lossy()
                .to_string();
            out.push((rel, path, target_meta.permissions().mode()));
        }
    }
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
    fn writes_chunks_and_refuses_links_out() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a.txt"), vec![7u8; CHUNK + 10]).unwrap();
        std::os::unix::fs::symlink(src.join("sub/a.txt"), src.join("inside")).unwrap();
        let files = working_dir_files(&src).unwrap();
        assert_eq!(files.len(), 2);
        let mut w = PackageWriter::new(dir.path().join("dst"), 1 << 30).unwrap();
        for (rel, path, mode) in &files {
            for c in file_chunks(rel, path, *mode).unwrap() {
                w.write(&c).unwrap();
            }
        }
        assert_eq!(
            std::fs::read(dir.path().join("dst/sub/a.txt"))
                .unwrap()
                .len(),
            CHUNK + 10
        );
        std::os::unix::fs::symlink("/etc", src.join("out")).unwrap();
        let err = working_dir_files(&src).unwrap_err().to_string();
        assert!(err.contains("outside the working folder"), "{err}");
        let evil = FileChunk {
            path: "../evil".into(),
            mode: 0o644,
            offset: 0,
            data: vec![1],
            last: true,
        };
        assert!(w.write(&evil).is_err());
    }
}
