//! The local file system as an object store, with writes that end.

use std::collections::HashSet;
use std::fmt;
use std::io::ErrorKind;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// [`LocalFileSystem`], whose writes, copies and renames first check that the folder
/// they write into takes new files.
///
/// `LocalFileSystem` stages a write in a new file beside its destination; where
/// making that file says "not found", it makes the folder and tries again, without
/// end. A folder that exists but takes no new files (`/proc`, `/sys`, some FUSE
/// mounts) says "not found" every time: `COPY (SELECT 1) TO '/proc/x.parquet'` spun
/// at full CPU until killed. Here the folder is made and a file made and removed in
/// it first (named as `LocalFileSystem` names its staged files, which its listings
/// leave out); where that file cannot be made, the write fails naming the folder. A
/// folder that passed is not checked again (up to [`CHECKED_FOLDERS`] of them).
#[derive(Debug, Default)]
pub(crate) struct LocalStore {
    inner: LocalFileSystem,
    checked: Mutex<HashSet<PathBuf>>,
}

/// The most folders a [`LocalStore`] remembers as taking files; past it, it forgets
/// them all and checks again.
const CHECKED_FOLDERS: usize = 4096;

/// Numbers the files that check folders, unique in this process.
static CHECKS: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    /// Checks that the folder of `location` takes new files (making it if missing).
    async fn check_folder(&self, location: &Path) -> Result<()> {
        let file = self.inner.path_to_filesystem(location)?;
        let Some(folder) = file.parent().map(|f| f.to_path_buf()) else {
            return Ok(());
        };
        if self
            .checked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&folder)
        {
            return Ok(());
        }
        let checked = folder.clone();
        let check = move || -> std::io::Result<()> {
            std::fs::create_dir_all(&checked)?;
            let n = CHECKS.fetch_add(1, Ordering::Relaxed);
            let probe = checked.join(format!(".volley-write-{}#{n}", std::process::id()));
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)?;
            // Best effort: a probe left behind is hidden from listings.
            let _ = std::fs::remove_file(&probe);
            Ok(())
        };
        // On a runtime's blocking threads where there is one, as `LocalFileSystem`
        // does its own file work.
        let made =
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => runtime.spawn_blocking(check).await.map_err(|e| {
                    object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(e),
                    }
                })?,
                Err(_) => check(),
            };
        match made {
            Ok(()) => {
                let mut checked = self.checked.lock().unwrap_or_else(PoisonError::into_inner);
                if checked.len() >= CHECKED_FOLDERS {
                    checked.clear();
                }
                checked.insert(folder);
                Ok(())
            }
            // Other errors (a file where the folder would be, no permission): the
            // write itself reports them.
            Err(e) if e.kind() != ErrorKind::NotFound => Ok(()),
            Err(e) => Err(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: format!("cannot write into {}: {e}", folder.display()).into(),
            }),
        }
    }

    /// [`check_folder`](Self::check_folder) of a copy's or rename's destination,
    /// where its source exists (else `LocalFileSystem` says so, making no folder).
    async fn check_destination(&self, from: &Path, to: &Path) -> Result<()> {
        if self.inner.path_to_filesystem(from)?.exists() {
            self.check_folder(to).await?;
        }
        Ok(())
    }
}

impl fmt::Display for LocalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.check_folder(location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.check_folder(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check_destination(from, to).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.check_destination(from, to).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use std::time::Duration;

    /// `write` run on a runtime of its own thread: its result, or `None` where it did
    /// not end in 20 s (a write that spins would hang the test; its thread is left).
    fn ended<T: Send + 'static>(
        write: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = tx.send(rt.block_on(write));
            rt.shutdown_background();
        });
        rx.recv_timeout(Duration::from_secs(20)).ok()
    }

    #[test]
    fn a_write_into_a_folder_that_takes_no_files_fails_naming_it() {
        let proc_file = Path::from("proc/volley-test.parquet");
        let put = ended(async move {
            LocalStore::default()
                .put(&proc_file, "x".into())
                .await
                .map(|_| ())
        });
        let proc_file = Path::from("proc/volley-test.parquet");
        let multipart = ended(async move {
            LocalStore::default()
                .put_multipart(&proc_file)
                .await
                .map(|_| ())
        });
        for (what, result) in [("put", put), ("multipart", multipart)] {
            let err = result
                .unwrap_or_else(|| panic!("{what}: the write did not end"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("cannot write into /proc"), "{what}: {err}");
        }
        // An ordinary folder: written, made where missing, nothing else left in it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.txt");
        let file = Path::from(path.to_str().unwrap().trim_start_matches('/'));
        let got = ended(async move {
            let store = LocalStore::default();
            store.put(&file, "hello".into()).await.unwrap();
            store.get(&file).await.unwrap().bytes().await.unwrap()
        })
        .unwrap();
        assert_eq!(&got[..], b"hello");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["b.txt"]);
        // A copy whose source is missing fails as before, making no folder.
        let missing = dir.path().join("missing");
        let into = dir.path().join("c/d.txt");
        let (missing, into) = (
            Path::from(missing.to_str().unwrap().trim_start_matches('/')),
            Path::from(into.to_str().unwrap().trim_start_matches('/')),
        );
        let copied = ended(async move { LocalStore::default().copy(&missing, &into).await });
        assert!(matches!(
            copied.unwrap(),
            Err(object_store::Error::NotFound { .. })
        ));
        assert!(!dir.path().join("c").exists());
        // Outside a runtime, as `LocalFileSystem` works there.
        let path = dir.path().join("e/f.txt");
        let file = Path::from(path.to_str().unwrap().trim_start_matches('/'));
        futures::executor::block_on(LocalStore::default().put(&file, "x".into())).unwrap();
        assert!(path.exists());
    }
}
