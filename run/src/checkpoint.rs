//! Checkpoints of a run in a storage path: a local folder or an object-store URL.
//!
//! A checkpoint is a folder `{storage}/{name}/checkpoint_{step:010}/` holding the files
//! it was given (model and optimizer state, as bytes) and, written last,
//! `checkpoint.json` with its step, metrics and file list. Only a folder with its
//! manifest counts: a save cut short leaves no checkpoint, and opening the store
//! removes such leftovers. After each save the store keeps the `num_to_keep` best by
//! the score metric (or the newest without one) and always the latest, from which a
//! run resumes; the others are deleted, manifest first.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use url::Url;
use volley_common::{Result, VolleyError};
use volley_connectors::VolleyObjectStoreRegistry;

const MANIFEST: &str = "checkpoint.json";

/// Whether a larger or a smaller score is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Order {
    /// Larger is better (accuracy).
    #[default]
    Max,
    /// Smaller is better (loss).
    Min,
}

/// Which checkpoints a run keeps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    /// How many to keep besides the latest (`None`: all).
    pub num_to_keep: Option<usize>,
    /// The metric that ranks checkpoints; `None` ranks by step (newest best).
    pub score_metric: Option<String>,
    /// Whether the metric is better large or small.
    pub order: Order,
}

/// One complete checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Training step it was taken at.
    pub step: u64,
    /// Metrics reported with it.
    pub metrics: BTreeMap<String, f64>,
    /// Names of its files.
    pub files: Vec<String>,
}

/// The checkpoints of one run.
#[derive(Debug)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    /// `{storage}/{name}` inside the store.
    root: StorePath,
    /// Shown in errors.
    location: String,
    /// The run's folder when the storage is local (empty folders are removed there).
    local: Option<std::path::PathBuf>,
    config: CheckpointConfig,
    rt: tokio::runtime::Runtime,
}

fn folder(step: u64) -> String {
    format!("checkpoint_{step:010}")
}

impl CheckpointStore {
    /// Opens (creating if needed) the run `name` under `storage` (a local path or an
    /// `s3://`, `gs://`, `az://` URL with credentials from the environment), and removes
    /// checkpoints left incomplete by an interrupted save. Only the run's writer opens
    /// its store this way: another process's open would remove a save in progress.
    pub fn open(storage: &str, name: &str, config: CheckpointConfig) -> Result<Self> {
        let this = Self::open_for_reading(storage, name, config)?;
        this.remove_incomplete()?;
        Ok(this)
    }

    /// Opens the run `name` under `storage` as [`open`](Self::open) does, leaving
    /// incomplete checkpoints alone: for reading the complete checkpoints of a run that
    /// may be saving one right now (a sweep's donor trial).
    pub fn open_for_reading(storage: &str, name: &str, config: CheckpointConfig) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name.contains("..") {
            return Err(VolleyError::plan(format!(
                "run name {name:?} must be non-empty, without `/` or `..`"
            )));
        }
        if config.num_to_keep == Some(0) {
            return Err(VolleyError::plan(
                "checkpoint num_to_keep must be at least 1 (or unset to keep all)",
            ));
        }
        let url = match Url::parse(storage) {
            Ok(u) if u.scheme().len() > 1 => u,
            _ => {
                std::fs::create_dir_all(storage).map_err(|e| {
                    VolleyError::plan(format!("cannot create storage path {storage}: {e}"))
                })?;
                let abs = std::fs::canonicalize(storage).map_err(|e| {
                    VolleyError::plan(format!("cannot resolve storage path {storage}: {e}"))
                })?;
                Url::from_directory_path(&abs).map_err(|_| {
                    VolleyError::plan(format!("storage path {storage} is not a folder path"))
                })?
            }
        };
        let store = datafusion::execution::object_store::ObjectStoreRegistry::get_store(
            &VolleyObjectStoreRegistry::new(),
            &url,
        )
        .map_err(|e| VolleyError::plan(format!("storage path {storage}: {e}")))?;
        let root = StorePath::from_url_path(url.path())
            .map_err(|e| VolleyError::plan(format!("storage path {storage}: {e}")))?
            .join(name);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("starting I/O runtime: {e}")))?;
        let local = (url.scheme() == "file")
            .then(|| url.to_file_path().ok())
            .flatten()
            .map(|p| p.join(name));
        let this = Self {
            local,
            store,
            root,
            location: format!("{}/{name}", storage.trim_end_matches('/')),
            config,
            rt,
        };
        Ok(this)
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> VolleyError {
        VolleyError::execution(format!("checkpoints in {}: {what}: {e}", self.location))
    }

    /// The checkpoint folders present (complete or not), by step.
    fn folders(&self) -> Result<BTreeMap<u64, bool>> {
        let objects: Vec<_> = self
            .rt
            .block_on(self.store.list(Some(&self.root)).try_collect::<Vec<_>>())
            .map_err(|e| self.err("listing", e))?;
        let depth = self.root.parts().count();
        let mut out = BTreeMap::new();
        for o in objects {
            let parts: Vec<_> = o.location.parts().collect();
            let n = parts.len();
            // Only `{root}/checkpoint_N/file`: deeper objects belong to runs nested
            // under this one (a sweep's trials).
            if n != depth + 2 {
                continue;
            }
            let Some(step) = parts[n - 2]
                .as_ref()
                .strip_prefix("checkpoint_")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let complete = parts[n - 1].as_ref() == MANIFEST;
            *out.entry(step).or_insert(false) |= complete;
        }
        Ok(out)
    }

    fn delete(&self, step: u64) -> Result<()> {
        let dir = self.root.clone().join(folder(step));
        let manifest = dir.clone().join(MANIFEST);
        self.rt.block_on(async {
            // The manifest first: from then on the folder is no checkpoint.
            match self.store.delete(&manifest).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("deleting", e)),
            }
            let rest: Vec<_> = self
                .store
                .list(Some(&dir))
                .try_collect()
                .await
                .map_err(|e| self.err("listing", e))?;
            for o in rest {
                match self.store.delete(&o.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.err("deleting", e)),
                }
            }
            Ok(())
        })?;
        if let Some(run) = &self.local {
            // Object stores have no folders; a local disk keeps the empty one.
            let _ = std::fs::remove_dir(run.join(folder(step)));
        }
        Ok(())
    }

    fn remove_incomplete(&self) -> Result<()> {
        for (step, complete) in self.folders()? {
            if !complete {
                self.delete(step)?;
            }
        }
        Ok(())
    }

    /// Complete checkpoints, oldest first.
    pub fn list(&self) -> Result<Vec<Checkpoint>> {
        let mut out = Vec::new();
        for (step, complete) in self.folders()? {
            if !complete {
                continue;
            }
            let path = self.root.clone().join(folder(step)).join(MANIFEST);
            let bytes = self
                .rt
                .block_on(async { self.store.get(&path).await?.bytes().await })
                .map_err(|e| self.err("reading a manifest", e))?;
            let c: Checkpoint = serde_json::from_slice(&bytes)
                .map_err(|e| self.err(&format!("manifest of step {step} is not valid"), e))?;
            out.push(c);
        }
        Ok(out)
    }

    /// The newest checkpoint, to resume from.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        Ok(self.list()?.pop())
    }

    fn score(&self, c: &Checkpoint) -> f64 {
        match &self.config.score_metric {
            Some(m) => {
                let v = c.metrics.get(m).copied().unwrap_or(f64::NAN);
                match self.config.order {
                    Order::Max => v,
                    Order::Min => -v,
                }
            }
            None => c.step as f64,
        }
    }

    /// The best checkpoint by the score metric (the newest without one).
    pub fn best(&self) -> Result<Option<Checkpoint>> {
        Ok(self.list()?.into_iter().max_by(|a, b| {
            self.score(a)
                .total_cmp(&self.score(b))
                .then(a.step.cmp(&b.step))
        }))
    }

    /// Writes a checkpoint of `files` (name, bytes) taken at `step` with `metrics`, then
    /// prunes. Fails if the score metric is configured but not among `metrics`.
    pub fn save(
        &self,
        step: u64,
        metrics: &BTreeMap<String, f64>,
        files: &[(&str, &[u8])],
    ) -> Result<Checkpoint> {
        if let Some(m) = &self.config.score_metric {
            if !metrics.contains_key(m) {
                return Err(VolleyError::plan(format!(
                    "checkpoint score metric `{m}` is not among the reported metrics {:?}",
                    metrics.keys().collect::<Vec<_>>()
                )));
            }
        }
        for (name, _) in files {
            if name.is_empty() || name.contains('/') || *name == MANIFEST {
                return Err(VolleyError::plan(format!(
                    "checkpoint file name {name:?} must be a plain name other than {MANIFEST}"
                )));
            }
        }
        let dir = self.root.clone().join(folder(step));
        let c = Checkpoint {
            step,
            metrics: metrics.clone(),
            files: files.iter().map(|(n, _)| n.to_string()).collect(),
        };
        let manifest =
            serde_json::to_vec_pretty(&c).map_err(|e| self.err("writing a manifest", e))?;
        // A step saved again (a PBT exploit copies its donor's files over the step it
        // just saved) is incomplete until its new manifest lands: the old one goes
        // first, so that a save cut short is never read as the old checkpoint with
        // some of the new files. (Only then: a new step needs no right to delete.)
        self.rt.block_on(async {
            let manifest_path = dir.clone().join(MANIFEST);
            let again = match self.store.head(&manifest_path).await {
                Ok(_) => true,
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => return Err(self.err(&format!("looking for step {step}"), e)),
            };
            if again {
                match self.store.delete(&manifest_path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.err(&format!("replacing step {step}"), e)),
                }
            }
            for (name, bytes) in files {
                self.store
                    .put(&dir.clone().join(*name), PutPayload::from(bytes.to_vec()))
                    .await
                    .map_err(|e| self.err(&format!("writing {name} of step {step}"), e))?;
            }
            self.store
                .put(&dir.clone().join(MANIFEST), PutPayload::from(manifest))
                .await
                .map_err(|e| self.err(&format!("committing step {step}"), e))?;
            Ok::<(), VolleyError>(())
        })?;
        self.prune()?;
        Ok(c)
    }

    /// Writes `bytes` as the file `name` at the run's top level, beside its checkpoints
    /// (state that is not a checkpoint: a sweep's experiment record). One `put`: a
    /// reader sees the old or the new content.
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        if name.is_empty() || name.contains('/') {
            return Err(VolleyError::plan(format!(
                "file name {name:?} must be a plain name"
            )));
        }
        let path = self.root.clone().join(name);
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map_err(|e| self.err(&format!("writing {name}"), e))?;
        Ok(())
    }

    /// A file written with [`CheckpointStore::put_file`], if present.
    pub fn get_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.root.clone().join(name);
        match self
            .rt
            .block_on(async { self.store.get(&path).await?.bytes().await })
        {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(&format!("reading {name}"), e)),
        }
    }

    /// Reads one file of a checkpoint.
    pub fn read(&self, c: &Checkpoint, file: &str) -> Result<Vec<u8>> {
        let path = self.root.clone().join(folder(c.step)).join(file);
        let bytes = self
            .rt
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| self.err(&format!("reading {file} of step {}", c.step), e))?;
        Ok(bytes.to_vec())
    }

    fn prune(&self) -> Result<()> {
        let Some(keep) = self.config.num_to_keep else {
            return Ok(());
        };
        let all = self.list()?;
        let Some(latest) = all.last().map(|c| c.step) else {
            return Ok(());
        };
        let mut ranked: Vec<&Checkpoint> = all.iter().collect();
        ranked.sort_by(|a, b| {
            self.score(b)
                .total_cmp(&self.score(a))
                .then(b.step.cmp(&a.step))
        });
        let kept: Vec<u64> = ranked.iter().take(keep).map(|c| c.step).collect();
        for c in &all {
            if c.step != latest && !kept.contains(&c.step) {
                self.delete(c.step)?;
            }
        }
        Ok(())
    }
}

/// The files of a checkpoint to save: small values and raw bytes (and, with the
/// trainer's `WithRecord`, Burn records), each under a file name.
///
/// ```
/// # use volley_run::TrainCheckpoint;
/// # fn f(weights: Vec<u8>, step: u64) -> volley_common::Result<()> {
/// let ckpt = TrainCheckpoint::new()
///     .with_bytes("weights.bin", weights)
///     .with_value("step", &step)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone)]
pub struct TrainCheckpoint {
    files: Vec<(String, Vec<u8>)>,
}

impl TrainCheckpoint {
    /// An empty checkpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a serde value as JSON (a step counter, an epoch, a config).
    pub fn with_value<T: Serialize + ?Sized>(mut self, name: &str, value: &T) -> Result<Self> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            VolleyError::execution(format!("checkpoint: cannot serialize `{name}`: {e}"))
        })?;
        self.files.push((name.to_string(), bytes));
        Ok(self)
    }

    /// Adds raw bytes (what other encodings, such as the trainer's Burn records, are
    /// built on).
    pub fn with_bytes(mut self, name: &str, bytes: Vec<u8>) -> Self {
        self.files.push((name.to_string(), bytes));
        self
    }

    /// Its files, as (name, bytes).
    pub fn files(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.files.iter().map(|(n, b)| (n.as_str(), b.as_slice()))
    }
}

/// A saved checkpoint and the store it lives in: what a rank resumes from, or what a
/// finished run hands back.
#[derive(Debug, Clone)]
pub struct SavedCheckpoint {
    /// Its step (the report iteration it was saved with), metrics and files.
    pub info: Checkpoint,
    store: Arc<CheckpointStore>,
}

impl SavedCheckpoint {
    /// The checkpoint `info` of `store`.
    pub fn new(info: Checkpoint, store: Arc<CheckpointStore>) -> Self {
        Self { info, store }
    }

    /// The bytes of one of its files.
    pub fn read(&self, file: &str) -> Result<Vec<u8>> {
        if !self.info.files.iter().any(|f| f == file) {
            return Err(VolleyError::plan(format!(
                "checkpoint {} has no file `{file}` (it has {:?})",
                self.info.step, self.info.files
            )));
        }
        self.store.read(&self.info, file)
    }

    /// A value saved with [`TrainCheckpoint::with_value`].
    pub fn value<T: DeserializeOwned>(&self, file: &str) -> Result<T> {
        let bytes = self.read(file)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            VolleyError::execution(format!(
                "checkpoint {}: `{file}` is not the value expected: {e}",
                self.info.step
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(loss: f64) -> BTreeMap<String, f64> {
        BTreeMap::from([("loss".to_string(), loss)])
    }

    #[test]
    fn keeps_the_best_and_the_latest_and_reads_them_back() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = tmp.path().to_str().unwrap();
        let config = CheckpointConfig {
            num_to_keep: Some(2),
            score_metric: Some("loss".into()),
            order: Order::Min,
        };
        let s = CheckpointStore::open(storage, "run", config.clone()).unwrap();
        for (step, loss) in [(10, 0.9), (20, 0.3), (30, 0.5), (40, 0.2), (50, 0.8)] {
            let model = format!("weights at {step}");
            s.save(
                step,
                &metrics(loss),
                &[("model.bin", model.as_bytes()), ("optim.bin", b"o")],
            )
            .unwrap();
        }
        let steps: Vec<u64> = s.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![20, 40, 50], "two best by loss, and the latest");
        assert_eq!(s.best().unwrap().unwrap().step, 40);
        let latest = s.latest().unwrap().unwrap();
        assert_eq!(latest.metrics["loss"], 0.8);
        assert_eq!(s.read(&latest, "model.bin").unwrap(), b"weights at 50");
        // Pruned folders are gone from the disk.
        assert!(!tmp.path().join("run/checkpoint_0000000010").exists());

        // A save cut short (files but no manifest) is not a checkpoint, and is cleaned
        // up when the run's store is opened again.
        let partial = tmp.path().join("run/checkpoint_0000000060");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("model.bin"), b"half").unwrap();
        assert_eq!(s.latest().unwrap().unwrap().step, 50);
        let s = CheckpointStore::open(storage, "run", config).unwrap();
        assert!(!partial.exists());
        assert_eq!(s.list().unwrap().len(), 3);

        // A step saved again and cut short (its second file cannot be written) is not
        // read as the old step holding some of the new files.
        let optim = tmp.path().join("run/checkpoint_0000000050/optim.bin");
        std::fs::remove_file(&optim).unwrap();
        std::fs::create_dir(&optim).unwrap();
        std::fs::write(optim.join("in the way"), b"").unwrap();
        let new: &[(&str, &[u8])] = &[("model.bin", b"new weights"), ("optim.bin", b"n")];
        assert!(s.save(50, &metrics(0.1), new).is_err());
        assert_eq!(s.latest().unwrap().unwrap().step, 40);
    }

    #[test]
    fn bad_configs_and_metrics_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let storage = tmp.path().to_str().unwrap();
        let zero = CheckpointConfig {
            num_to_keep: Some(0),
            ..Default::default()
        };
        let e = CheckpointStore::open(storage, "r", zero)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_to_keep"), "{e}");
        let e = CheckpointStore::open("ftp://host/x", "r", CheckpointConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp://"), "{e}");
        let e = CheckpointStore::open(storage, "../up", CheckpointConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("run name"), "{e}");
        let s = CheckpointStore::open(
            storage,
            "r",
            CheckpointConfig {
                score_metric: Some("accuracy".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let e = s
            .save(1, &metrics(0.1), &[("m", b"x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("accuracy") && e.contains("loss"), "{e}");
        assert!(s.list().unwrap().is_empty(), "nothing written");
        // Without a score metric, the newest are kept.
        let s = CheckpointStore::open(
            storage,
            "newest",
            CheckpointConfig {
                num_to_keep: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        for step in 1..=3 {
            s.save(step, &BTreeMap::new(), &[("m", b"x")]).unwrap();
        }
        let steps: Vec<u64> = s.list().unwrap().iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![3]);
    }
}
