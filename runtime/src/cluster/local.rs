//! A private one-node cluster inside this process, for work that needs real worker
//! processes on a single machine (training ranks, trials) without `volley start`.
//!
//! The head and a node agent run on a small tokio runtime of their own, on 127.0.0.1 with
//! a fresh token; the agent offers this machine's CPUs, GPUs and memory and starts
//! workers as processes of this program (so `volley::init()` must be the first thing
//! `main` does, as for any cluster program). Dropping the [`LocalCluster`] stops the
//! agent, which kills its workers; they also die with this process (`PR_SET_PDEATHSIG`).

use volley_common::{Result, VolleyError};

use super::client::Cluster;
use super::head::HeadOptions;
use super::node::{run_node, NodeOptions};
use super::resources::Resources;
use super::tls::TlsConfig;

/// A head and one node agent in this process, and a [`Cluster`] connection to them.
pub struct LocalCluster {
    cluster: Option<Cluster>,
    rt: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCluster")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl LocalCluster {
    /// Starts the head and an agent offering `resources` (see [`LocalCluster::machine`])
    /// with GPUs `gpu_ids`, and connects to them as an attached job.
    pub fn start(resources: Resources, gpu_ids: Vec<u32>) -> Result<LocalCluster> {
        resources.validate()?;
        remove_abandoned();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let token = super::auth::new_token();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("volley-local-cluster")
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("cannot start a runtime: {e}")))?;
        let head_options = HeadOptions::new(dir.path().join("head"), token.clone());
        let (_core, addresses) = rt.block_on(super::start_head(
            head_options,
            "127.0.0.1",
            0,
            None,
            &TlsConfig::default(),
        ))?;
        let node = NodeOptions {
            head_address: addresses.grpc.clone(),
            token: token.clone(),
            host: "127.0.0.1".into(),
            port: 0,
            resources,
            gpu_ids,
            object_store_memory: 256 << 20,
            object_compression: Default::default(),
            dir: dir.path().join("node"),
            package_cache: dir.path().join("node-packages"),
            package_cache_bytes: 1 << 30,
            drain_timeout: std::time::Duration::from_secs(30),
            metrics_port: None,
            tls: TlsConfig::default(),
            // The head lives in this process: it does not come back.
            head_patience: std::time::Duration::ZERO,
        };
        rt.spawn(async move {
            if let Err(e) = run_node(node).await {
                tracing::warn!("local cluster node agent: {e}");
            }
        });
        // The agent registers asynchronously: wait until the head lists it, so the
        // first request sees the node's resources.
        let cluster = Cluster::connect(&addresses.grpc, &token)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while cluster.status()?.nodes.is_empty() {
            if std::time::Instant::now() > deadline {
                return Err(VolleyError::internal(
                    "the local cluster's node agent did not register within 30 s",
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(LocalCluster {
            cluster: Some(cluster),
            rt: Some(rt),
            _dir: dir,
        })
    }

    /// This machine's CPUs (`available_parallelism`), memory and CUDA GPUs.
    pub fn machine() -> (Resources, Vec<u32>) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let gpus = super::gpus::detect();
        (
            Resources::cpus(cpus as f64)
                .with_gpus(gpus as f64)
                .with_memory(crate::resources::machine_memory()),
            (0..gpus).collect(),
        )
    }

    /// The connection to it.
    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("present until drop")
    }
}

/// Folders are `{PREFIX}{pid}-{random}` in the temporary folder.
const PREFIX: &str = "volley-local-cluster-";

/// Removes the folders of local clusters whose process is gone (killed before it could
/// clean up: each holds a copy of its program, hundreds of MB for a debug build).
fn remove_abandoned() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // The connection first (it reports the job's end, which stops its workers), then
        // the runtime that runs the head and the agent.
        drop(self.cluster.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_of_dead_processes_are_removed() {
        // Above the kernel's largest pid: no such process.
        let dead = std::env::temp_dir().join(format!("{PREFIX}99999999-test"));
        let alive = std::env::temp_dir().join(format!("{PREFIX}{}-test", std::process::id()));
        for d in [&dead, &alive] {
            std::fs::create_dir_all(d.join("node")).unwrap();
        }
        remove_abandoned();
        assert!(!dead.exists());
        assert!(alive.exists());
        std::fs::remove_dir_all(&alive).unwrap();
    }
}
