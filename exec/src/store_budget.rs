//! The object-store budget of one execution on a cluster: bytes its blocks may fill in
//! the nodes' stores, in all and on each node.
//!
//! Everything the driver holds a reference to is charged (a block from its first queue
//! until the reference is dropped, and room for each running task's or call's expected
//! output), against the execution's total and against the share of the node that holds
//! it (or will: an actor's node, the node holding a task's input). A node's share is
//! its store memory times the fraction of all the stores' memory that the total is, so
//! a small store gets a small share. Work whose node is unknown until the head places
//! it (a read) is charged in all only; the head places it on the node whose store is
//! least full.

use std::collections::HashMap;
use std::sync::Arc;

use volley_common::Result;
use volley_runtime::cluster::Cluster;
use volley_runtime::{MemoryBudget, MemoryReservation};

/// Bytes held in the total and on a node; given back on drop.
#[derive(Debug)]
pub(crate) struct StoreCharge {
    _total: MemoryReservation,
    _node: Option<MemoryReservation>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct StoreBudget {
    total: Arc<MemoryBudget>,
    /// Each live node's share, by its Flight address (as objects name where they are).
    nodes: HashMap<String, Arc<MemoryBudget>>,
}

impl StoreBudget {
    /// The budget of an execution on `cluster`: `limit` bytes in all (default: half of
    /// the live nodes' store memory), shared among the live nodes by their store memory.
    pub(crate) fn new(cluster: &Cluster, limit: Option<u64>) -> Result<Self> {
        let status = match (cluster.status(), limit) {
            (Ok(s), _) => s,
            // A budget given in the options needs no status: without one, the nodes get
            // no shares of their own.
            (Err(e), Some(limit)) => {
                tracing::warn!("the cluster's status is unknown ({e}): no per-node shares");
                return Ok(Self::with_nodes(limit.max(1), &[]));
            }
            (Err(e), None) => return Err(e),
        };
        let nodes: Vec<(String, u64)> = status
            .nodes
            .into_iter()
            .filter(|n| n.alive())
            .map(|n| (n.object_address, n.object_store_memory))
            .collect();
        let memory: u64 = nodes.iter().map(|(_, m)| m).sum();
        let total = limit.unwrap_or((memory / 2).max(64 << 20)).max(1);
        Ok(Self::with_nodes(total, &nodes))
    }

    /// A budget of `total` bytes over nodes of the given `(address, store memory)`.
    pub(crate) fn with_nodes(total: u64, nodes: &[(String, u64)]) -> Self {
        let memory: u64 = nodes.iter().map(|(_, m)| m).sum::<u64>().max(1);
        let nodes = nodes
            .iter()
            .map(|(address, m)| {
                let share = (*m as u128 * total as u128 / memory as u128) as u64;
                (address.clone(), MemoryBudget::new(share.max(1)))
            })
            .collect();
        Self {
            total: MemoryBudget::new(total),
            nodes,
        }
    }

    /// The execution's total limit.
    pub(crate) fn limit(&self) -> u64 {
        self.total.limit()
    }

    /// Bytes charged in all.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.total.used()
    }

    /// The most bytes charged in all at once.
    pub(crate) fn peak(&self) -> u64 {
        self.total.peak()
    }

    /// Whether `bytes` more fit in all and on `node` (a node the budget does not know,
    /// one that joined later, has no share of its own).
    pub(crate) fn has_room(&self, bytes: u64, node: Option<&str>) -> bool {
        self.total.has_room(bytes)
            && node
                .and_then(|n| self.nodes.get(n))
                .is_none_or(|b| b.has_room(bytes))
    }

    /// Charges `bytes` in all and on `node`, whether or not they fit.
    pub(crate) fn charge(&self, bytes: u64, node: Option<&str>) -> StoreCharge {
        StoreCharge {
            _total: self.total.reserve(bytes),
            _node: node
                .and_then(|n| self.nodes.get(n))
                .map(|b| b.reserve(bytes)),
        }
    }

    /// Bytes charged on `node`.
    #[cfg(test)]
    pub(crate) fn node_used(&self, node: &str) -> u64 {
        self.nodes.get(node).map_or(0, |b| b.used())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_share_the_total_by_store_memory_and_each_is_checked() {
        let b = StoreBudget::with_nodes(300, &[("a".into(), 100), ("b".into(), 200)]);
        assert_eq!(b.limit(), 300);
        let on_a = b.charge(90, Some("a"));
        assert!(!b.has_room(20, Some("a")), "a's share is 100");
        assert!(b.has_room(20, Some("b")));
        assert!(b.has_room(20, None));
        assert!(b.has_room(20, Some("joined-later")));
        let on_b = b.charge(200, Some("b"));
        assert!(!b.has_room(20, None), "290 of 300 in all");
        assert_eq!(
            (b.node_used("a"), b.node_used("b"), b.used()),
            (90, 200, 290)
        );
        drop(on_a);
        drop(on_b);
        assert_eq!((b.node_used("a"), b.used()), (0, 0));
    }
}
