//! Where a run's processes go: the cluster a trainer or a sweep uses.

use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{Cluster, LocalCluster, Resources};

/// The cluster a run uses: the one it was given, else the one `VOLLEY_ADDRESS` names,
/// else a private one-node cluster on this machine, held until the lease is dropped.
pub struct ClusterLease {
    cluster: Cluster,
    local: Option<LocalCluster>,
    total: Resources,
}

impl std::fmt::Debug for ClusterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLease")
            .field("cluster", &self.cluster)
            .field("local", &self.local.is_some())
            .finish()
    }
}

impl ClusterLease {
    /// Picks the cluster. `check` sees the total resources (and "this machine" or "the
    /// cluster") before a private cluster is started, so a run that cannot fit fails
    /// before any process starts.
    pub fn acquire(
        given: Option<&Cluster>,
        check: impl Fn(&Resources, &str) -> Result<()>,
    ) -> Result<ClusterLease> {
        let shared = match given {
            Some(c) => Some(c.clone()),
            None => volley_dataset::Context::global()?.cluster().cloned(),
        };
        match shared {
            Some(cluster) => {
                let mut total = Resources::default();
                for n in cluster.status()?.nodes.iter().filter(|n| n.alive()) {
                    total.add(&n.total);
                }
                check(&total, "the cluster")?;
                Ok(ClusterLease {
                    cluster,
                    local: None,
                    total,
                })
            }
            None => {
                let (total, gpus) = LocalCluster::machine();
                check(&total, "this machine")?;
                let local = LocalCluster::start(total.clone(), gpus)?;
                Ok(ClusterLease {
                    cluster: local.cluster().clone(),
                    local: Some(local),
                    total,
                })
            }
        }
    }

    /// The connection.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Whether it is a private cluster started for this run.
    pub fn is_private(&self) -> bool {
        self.local.is_some()
    }

    /// What the cluster's live nodes offer in all.
    pub fn total(&self) -> &Resources {
        &self.total
    }

    /// The address the cluster's processes reach this one at: loopback for a private
    /// cluster, else the local address of a connection to the head.
    pub fn driver_host(&self) -> Result<String> {
        if self.is_private() {
            return Ok("127.0.0.1".into());
        }
        let address = self.cluster.address();
        let s = std::net::TcpStream::connect(address).map_err(|e| {
            VolleyError::execution(format!("cannot reach the cluster at {address}: {e}"))
        })?;
        Ok(s.local_addr()?.ip().to_string())
    }
}
