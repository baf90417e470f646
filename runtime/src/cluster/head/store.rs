//! What the head keeps across restarts: its jobs (records and package manifests; their
//! logs are files in the state folder) and its id counters, in an embedded
//! transactional store (`redb`) in the head's state folder. No server to run.
//!
//! The head writes what changed a few times a second and at once when a job is
//! submitted; a commit is atomic and durable, so a head killed at any moment restarts
//! from its last commit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use volley_common::{Result, VolleyError};

use super::super::proto;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// The nodes alive when last written (a head after this one waits a while for them to
/// rejoin before drivers replay their jobs).
const NODES: TableDefinition<&str, u64> = TableDefinition::new("nodes");

/// The head's store.
pub(crate) struct HeadStore {
    db: Database,
    path: PathBuf,
    /// What the store has, to write only what changed.
    written: Mutex<Written>,
}

/// What the store holds, as last written: jobs, counters, live nodes.
#[derive(Default)]
struct Written {
    jobs: HashMap<String, Vec<u8>>,
    counters: (u64, u64),
    nodes: Vec<String>,
}

/// What a head finds in its store when it starts.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    pub jobs: Vec<proto::StoredJob>,
    pub next_node: u64,
    pub next_job: u64,
    /// The nodes alive when the head before stopped.
    pub nodes: Vec<String>,
}

impl HeadStore {
    /// Opens (creating) the store at `path` and reads what it holds.
    pub fn open(path: &Path) -> Result<(Self, Recovered)> {
        let failed = |e: &dyn std::fmt::Display| {
            VolleyError::Config(format!(
                "cannot open the head's state store {}: {e}",
                path.display()
            ))
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
        }
        let db = Database::create(path).map_err(|e| failed(&e))?;
        // Jobs' environments (secrets among them) are in it: for this user only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| failed(&e))?;
        }
        // Tables exist from the first start on: reads never meet a missing one.
        let tx = db.begin_write().map_err(|e| failed(&e))?;
        tx.open_table(JOBS).map_err(|e| failed(&e))?;
        tx.open_table(COUNTERS).map_err(|e| failed(&e))?;
        tx.open_table(NODES).map_err(|e| failed(&e))?;
        tx.commit().map_err(|e| failed(&e))?;

        let mut recovered = Recovered::default();
        let mut written = HashMap::new();
        let rx = db.begin_read().map_err(|e| failed(&e))?;
        let jobs = rx.open_table(JOBS).map_err(|e| failed(&e))?;
        for entry in jobs.iter().map_err(|e| failed(&e))? {
            let (id, bytes) = entry.map_err(|e| failed(&e))?;
            let job = proto::StoredJob::decode(bytes.value())
                .map_err(|e| failed(&format!("job {}: {e}", id.value())))?;
            written.insert(id.value().to_string(), bytes.value().to_vec());
            recovered.jobs.push(job);
        }
        let counters = rx.open_table(COUNTERS).map_err(|e| failed(&e))?;
        let counter = |name: &str| -> Result<u64> {
            Ok(counters
                .get(name)
                .map_err(|e| failed(&e))?
                .map_or(0, |v| v.value()))
        };
        recovered.next_node = counter("next_node")?;
        recovered.next_job = counter("next_job")?;
        let nodes = rx.open_table(NODES).map_err(|e| failed(&e))?;
        for entry in nodes.iter().map_err(|e| failed(&e))? {
            let (id, _) = entry.map_err(|e| failed(&e))?;
            recovered.nodes.push(id.value().to_string());
        }
        drop((jobs, counters, nodes, rx));
        let written = Written {
            jobs: written,
            counters: (recovered.next_node, recovered.next_job),
            nodes: recovered.nodes.clone(),
        };
        Ok((
            Self {
                db,
                path: path.to_path_buf(),
                written: Mutex::new(written),
            },
            recovered,
        ))
    }

    /// Writes the jobs and counters that differ from what the store has, in one
    /// transaction.
    pub fn save(
        &self,
        jobs: Vec<(String, Vec<u8>)>,
        next_node: u64,
        next_job: u64,
        mut nodes: Vec<String>,
    ) -> Result<()> {
        nodes.sort();
        let failed = |e: &dyn std::fmt::Display| {
            VolleyError::execution(format!(
                "cannot write the head's state store {}: {e}",
                self.path.display()
            ))
        };
        let mut written = self.written.lock().expect("store lock");
        let changed: Vec<(String, Vec<u8>)> = jobs
            .into_iter()
            .filter(|(id, bytes)| written.jobs.get(id) != Some(bytes))
            .collect();
        if changed.is_empty() && written.counters == (next_node, next_job) && written.nodes == nodes
        {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(|e| failed(&e))?;
        {
            let mut table = tx.open_table(JOBS).map_err(|e| failed(&e))?;
            for (id, bytes) in &changed {
                table
                    .insert(id.as_str(), bytes.as_slice())
                    .map_err(|e| failed(&e))?;
            }
            let mut counters = tx.open_table(COUNTERS).map_err(|e| failed(&e))?;
            counters
                .insert("next_node", next_node)
                .map_err(|e| failed(&e))?;
            counters
                .insert("next_job", next_job)
                .map_err(|e| failed(&e))?;
            if written.nodes != nodes {
                let mut table = tx.open_table(NODES).map_err(|e| failed(&e))?;
                for gone in written.nodes.iter().filter(|n| !nodes.contains(n)) {
                    table.remove(gone.as_str()).map_err(|e| failed(&e))?;
                }
                for n in &nodes {
                    table.insert(n.as_str(), 0).map_err(|e| failed(&e))?;
                }
            }
        }
        tx.commit().map_err(|e| failed(&e))?;
        for (id, bytes) in changed {
            written.jobs.insert(id, bytes);
        }
        written.counters = (next_node, next_job);
        written.nodes = nodes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: &str) -> (String, Vec<u8>) {
        let job = proto::StoredJob {
            info: Some(proto::JobInfo {
                job_id: id.into(),
                state: state.into(),
                ..Default::default()
            }),
            package: None,
            actors: vec![],
        };
        (id.to_string(), job.encode_to_vec())
    }

    #[test]
    fn jobs_and_counters_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.redb");
        let (store, found) = HeadStore::open(&path).unwrap();
        assert!(found.jobs.is_empty());
        store
            .save(
                vec![job("a", "RUNNING"), job("b", "SUCCEEDED")],
                3,
                2,
                vec![],
            )
            .unwrap();
        store
            .save(
                vec![job("a", "FAILED"), job("b", "SUCCEEDED")],
                3,
                2,
                vec![],
            )
            .unwrap();
        drop(store);
        let (_, found) = HeadStore::open(&path).unwrap();
        let mut states: Vec<(String, String)> = found
            .jobs
            .iter()
            .map(|j| {
                let i = j.info.clone().unwrap();
                (i.job_id, i.state)
            })
            .collect();
        states.sort();
        assert_eq!(
            states,
            [
                ("a".into(), "FAILED".into()),
                ("b".into(), "SUCCEEDED".into())
            ]
        );
        assert_eq!((found.next_node, found.next_job), (3, 2));
    }

    #[test]
    fn a_store_that_cannot_be_opened_says_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("head.redb");
        std::fs::write(&path, b"not a database").unwrap();
        let err = HeadStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("cannot open the head's state store"), "{err}");
        assert!(err.contains("head.redb"), "{err}");
    }
}
