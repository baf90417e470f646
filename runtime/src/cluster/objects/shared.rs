//! Objects handed between a node's workers and its store as files in shared memory.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow_flight::Action;
use futures::TryStreamExt;
use volley_common::{Result, VolleyError};

use super::ipc_file::map_shared_file;
use super::store::{sanitize, write_file};
use super::ObjectCompression;

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
    // Its objects are the jobs' data: readable by this user only.
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .ok()?;
    Some(dir)
}

pub(super) const ACTION_ADOPT: &str = "adopt";
pub(super) const ACTION_LOCATE: &str = "locate";

/// Runs a `DoAction` on the store at `address`; returns the first result's body.
pub(super) async fn action(
    channels: &crate::cluster::net::Channels,
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
    channels: &crate::cluster::net::Channels,
    address: &str,
    dir: &Path,
    id: &str,
    batches: &[RecordBatch],
    compression: ObjectCompression,
) -> Result<u64> {
    // Named after this worker: what it leaves unadopted when it dies is removed.
    let writer = std::env::var("VOLLEY_WORKER_ID")
        .unwrap_or_else(|_| format!("process-{}", std::process::id()));
    let name = format!(
        "{}--{}-{:016x}.arrow",
        sanitize(&writer),
        sanitize(id),
        rand::random::<u64>()
    );
    let path = dir.join(&name);
    let written =
        write_file(&path, batches, compression).map_err(|e| e.context(format!("object {id}")));
    let adopted = match written {
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
    channels: &crate::cluster::net::Channels,
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
