//! The trainer's side of the run channel ([`volley_run::ReportServer`]): it streams
//! each rank its share of every dataset pass and records rank 0's reports.
//!
//! A rank opens one stream per pass over a dataset (its share of that pass's
//! `streaming_split`, as Arrow IPC) and one report connection. The greeting names the
//! attempt (restart count) and the rank, so that a rank of an earlier attempt cannot
//! take data meant for the current one, and its reports are not recorded.
//!
//! On a cluster, a pass's blocks stay in the nodes' stores: the session sends each rank
//! references to its rows and the rank reads them from the nodes, so the driver sends
//! metadata, not bytes ([`DataTransfer`] counts both ways).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use volley_common::{Result, VolleyError};
use volley_dataset::{Dataset, SplitIterator, SplitPart};
use volley_run::{Decision, PartIter, Peer, Report, ReportHandler};

/// Sees every report as it arrives; `false` stops the run.
pub type ReportHook = Arc<dyn Fn(&Report) -> bool + Send + Sync>;

struct State {
    attempt: u32,
    /// Passes handed out in this attempt: one split iterator per rank, taken once.
    passes: HashMap<(String, u64), Vec<Option<SplitIterator>>>,
    /// Ranks of this attempt whose loop returned: their shares of passes are given
    /// up, so that in `equal` mode the others are not held back waiting for them.
    finished: Vec<bool>,
    history: Vec<Report>,
}

/// How the rows of a training run's datasets reached its ranks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataTransfer {
    /// Rows the driver sent itself: blocks it produced, and with
    /// [`DataConfig::relay`](crate::DataConfig::relay) (or for a dataset on another
    /// cluster than the ranks') every block.
    pub relayed_rows: u64,
    /// Bytes of those rows.
    pub relayed_bytes: u64,
    /// Rows handed to the ranks by reference, to read from the cluster's nodes (a rank
    /// that cannot read some gets them from the driver; those count here too).
    pub node_rows: u64,
    /// Bytes of those rows, as the nodes' stores count them.
    pub node_bytes: u64,
}

#[derive(Default)]
struct Counters {
    relayed_rows: AtomicU64,
    relayed_bytes: AtomicU64,
    node_rows: AtomicU64,
    node_bytes: AtomicU64,
}

/// What the driver of a training run serves its ranks.
pub(crate) struct Session {
    hook: Option<ReportHook>,
    /// Set once the hook said stop.
    stopped: AtomicBool,
    world: usize,
    equal: bool,
    /// Fetch remote rows here and send the bytes, instead of their references.
    relay: bool,
    /// The head address of the cluster the ranks run on: rows of a dataset on another
    /// cluster are relayed (the ranks hold no token for its nodes).
    ranks_cluster: String,
    datasets: HashMap<String, Dataset>,
    state: Mutex<State>,
    transfer: Arc<Counters>,
}

impl Session {
    /// A session for a group of `world` ranks over `datasets`.
    pub(crate) fn new(
        world: usize,
        data: crate::DataConfig,
        datasets: HashMap<String, Dataset>,
        hook: Option<ReportHook>,
        ranks_cluster: &volley_runtime::cluster::Cluster,
    ) -> Self {
        Self {
            ranks_cluster: ranks_cluster.address().to_string(),
            hook,
            stopped: AtomicBool::new(false),
            world,
            equal: data.equal,
            relay: data.relay,
            transfer: Arc::default(),
            datasets,
            state: Mutex::new(State {
                attempt: 0,
                passes: HashMap::new(),
                finished: vec![false; world],
                history: Vec::new(),
            }),
        }
    }

    /// Starts attempt `attempt`: passes of earlier attempts are dropped (their readers
    /// get an error), the history keeps only reports up to `iteration` (what the
    /// attempt resumes from).
    pub(crate) fn begin_attempt(&self, attempt: u32, iteration: u64) {
        let mut s = self.state.lock().expect("session lock");
        s.attempt = attempt;
        s.passes.clear();
        s.finished.iter_mut().for_each(|f| *f = false);
        s.history.retain(|r| r.iteration <= iteration);
    }

    /// Rank `rank`'s loop returned: it reads no more, and its shares of the passes
    /// open now or later are dropped (a rank whose loop ends a pass early, or reads
    /// one pass fewer, no longer holds up the others in `equal` mode).
    pub(crate) fn rank_finished(&self, rank: usize) {
        let mut s = self.state.lock().expect("session lock");
        if let Some(f) = s.finished.get_mut(rank) {
            *f = true;
        }
        let mut dropped = Vec::new();
        for slots in s.passes.values_mut() {
            dropped.extend(slots.get_mut(rank).and_then(Option::take));
        }
        s.passes
            .retain(|_, slots| slots.iter().any(Option::is_some));
        drop(s);
        // Dropping a split iterator gives its share up (outside the session's lock).
        drop(dropped);
    }

    /// Whether a report hook stopped the run.
    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub(crate) fn history(&self) -> Vec<Report> {
        self.state.lock().expect("session lock").history.clone()
    }

    /// How the rows sent so far travelled.
    pub(crate) fn transfer(&self) -> DataTransfer {
        let c = &self.transfer;
        DataTransfer {
            relayed_rows: c.relayed_rows.load(Ordering::Relaxed),
            relayed_bytes: c.relayed_bytes.load(Ordering::Relaxed),
            node_rows: c.node_rows.load(Ordering::Relaxed),
            node_bytes: c.node_bytes.load(Ordering::Relaxed),
        }
    }

    /// Rank `peer`'s split of pass `pass` over `dataset`, and whether its remote rows
    /// must be relayed.
    fn take_split(&self, peer: &Peer, dataset: &str, pass: u64) -> Result<(SplitIterator, bool)> {
        let mut s = self.state.lock().expect("session lock");
        let rank = peer.rank;
        if peer.attempt != s.attempt {
            return Err(VolleyError::execution(format!(
                "rank {rank} belongs to attempt {}, the run is at attempt {}",
                peer.attempt, s.attempt
            )));
        }
        let ds = self.datasets.get(dataset).ok_or_else(|| {
            let mut names: Vec<&String> = self.datasets.keys().collect();
            names.sort();
            VolleyError::plan(format!(
                "no dataset named `{dataset}` was given to the trainer (it has {names:?})"
            ))
        })?;
        let key = (dataset.to_string(), pass);
        if !s.passes.contains_key(&key) {
            let splits = ds.streaming_split(self.world, self.equal)?;
            // Ranks that finished will not read theirs: dropped, given up.
            let slots = splits
                .into_iter()
                .zip(&s.finished)
                .map(|(split, finished)| (!finished).then_some(split))
                .collect();
            s.passes.insert(key.clone(), slots);
        }
        let slots = s.passes.get_mut(&key).expect("inserted");
        let split = slots.get_mut(rank).and_then(Option::take).ok_or_else(|| {
            VolleyError::execution(format!(
                "rank {rank} asked twice for pass {pass} of dataset `{dataset}`"
            ))
        })?;
        if slots.iter().all(Option::is_none) {
            s.passes.remove(&key);
        }
        let elsewhere = ds
            .context()
            .cluster()
            .is_some_and(|c| c.address() != self.ranks_cluster);
        Ok((split, self.relay || elsewhere))
    }
}

impl ReportHandler for Session {
    fn report(&self, peer: &Peer, report: Report) -> Result<Decision> {
        let current = {
            let mut s = self.state.lock().expect("session lock");
            let current = s.attempt == peer.attempt;
            if current {
                s.history.push(report.clone());
            }
            current
        };
        let go_on = !current || self.hook.as_ref().is_none_or(|h| h(&report));
        if !go_on {
            self.stopped.store(true, Ordering::SeqCst);
        }
        Ok(if go_on {
            Decision::Continue
        } else {
            Decision::Stop
        })
    }

    fn stream(&self, peer: &Peer, name: &str, pass: u64) -> Result<PartIter> {
        let (mut split, relay) = self.take_split(peer, name, pass)?;
        let counters = Arc::clone(&self.transfer);
        Ok(Box::new(std::iter::from_fn(move || {
            let part = match split.next_part()? {
                Ok(SplitPart::Remote(r)) if relay => r.fetch().map(SplitPart::Batch),
                other => other,
            };
            if let Ok(p) = &part {
                counters.count(p);
            }
            Some(part)
        })))
    }
}

impl Counters {
    fn count(&self, part: &SplitPart) {
        match part {
            SplitPart::Batch(b) => {
                self.relayed_rows
                    .fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                self.relayed_bytes
                    .fetch_add(volley_common::batch_memory(b), Ordering::Relaxed);
            }
            SplitPart::Remote(r) => {
                self.node_rows.fetch_add(r.slice().rows, Ordering::Relaxed);
                self.node_bytes.fetch_add(r.bytes(), Ordering::Relaxed);
            }
        }
    }
}
