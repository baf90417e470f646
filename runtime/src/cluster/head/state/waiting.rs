//! Why a job waits: for one whose driver has not started, the driver's wait (for a
//! node, or for room on one); for any job, what of it asks for more than any node in
//! the cluster has (a task, an actor, a placement group). Such work is not refused: a
//! node big enough may join. But it waits for that with nothing moving, so the head
//! says so: in the job's record (`volley job status`, the HTTP API, the dashboard)
//! and, once, in the job's log.

use super::*;

/// What a job waits for, as the head sees it now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Waiting {
    /// Said to the user.
    pub reason: String,
    /// What for.
    pub kind: WaitKind,
}

/// What a job waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitKind {
    /// Its driver waits for a node to take work (none does).
    Node,
    /// Its driver waits for room some node will have once other work ends.
    Room,
    /// Some of it asks for more than any node has, and waits until a node with enough
    /// joins (most often a mistake).
    BeyondNodes,
}

impl WaitKind {
    /// Every kind.
    pub const ALL: [WaitKind; 3] = [Self::Node, Self::Room, Self::BeyondNodes];

    /// Its name in `/metrics` (`volley_jobs_waiting{reason=...}`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Room => "room",
            Self::BeyondNodes => "beyond_nodes",
        }
    }
}

/// Work of a job that no node could hold even empty, described at most this many
/// times in its reason (the rest counted).
const NAMED: usize = 3;

impl State {
    /// What each job not ended waits for, by job id; jobs waiting for nothing (or only
    /// for room their tasks will get as others end) are absent.
    pub fn waiting(&self) -> HashMap<String, Waiting> {
        let mut out = HashMap::new();
        let mut big: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let nodes = self.working_nodes();
        for (id, j) in self.waiting_jobs() {
            if j.attached {
                continue;
            }
            let waiting = if nodes == 0 {
                Waiting {
                    reason: if self.nodes.is_empty() && self.gone_nodes.is_empty() {
                        "its driver waits for a node to join the cluster".into()
                    } else {
                        format!(
                            "its driver waits for a node: none of the {} that joined takes \
                             work now (gone, draining, or not yet back)",
                            self.nodes.len() + self.gone_nodes.len()
                        )
                    },
                    kind: WaitKind::Node,
                }
            } else if let Some(b) = self.beyond_nodes("its driver asks", &j.resources) {
                big.entry(id).or_default().push(b);
                continue;
            } else {
                Waiting {
                    reason: format!("its driver waits for {} free on one node", j.resources),
                    kind: WaitKind::Room,
                }
            };
            out.insert(id.clone(), waiting);
        }
        if nodes > 0 {
            self.work_beyond_nodes(&mut big);
        }
        for (job, items) in big {
            let more = items.len().saturating_sub(NAMED);
            let mut reason = items[..items.len().min(NAMED)].join("; ");
            if more > 0 {
                reason.push_str(&format!("; and {more} more"));
            }
            reason.push_str("; it waits until a node with enough joins");
            out.insert(
                job.to_string(),
                Waiting {
                    reason,
                    kind: WaitKind::BeyondNodes,
                },
            );
        }
        out
    }

    /// The nodes that take work.
    fn working_nodes(&self) -> usize {
        self.nodes.values().filter(|n| n.takes_work()).count()
    }

    /// Whether some node taking work could hold `r` when empty.
    pub(super) fn fits_some_node(&self, r: &Resources) -> bool {
        self.nodes
            .values()
            .any(|n| n.takes_work() && r.fits_in(&n.total))
    }

    /// `WHO for R: no node has ...`, when nodes take work and none could hold `r`
    /// even empty.
    pub(super) fn beyond_nodes(&self, who: &str, r: &Resources) -> Option<String> {
        let offers = self
            .nodes
            .values()
            .filter(|n| n.takes_work())
            .map(|n| &n.total);
        if offers.clone().next().is_none() || self.fits_some_node(r) {
            return None;
        }
        let parts = r.beyond(offers);
        Some(if parts.is_empty() {
            format!("{who} for {r}: no one node has all of it")
        } else {
            format!("{who} for {r}: no node has {}", parts.join(" or "))
        })
    }

    /// Whether some set of the nodes taking work could hold group `g` when empty: each
    /// bundle fits some node, a STRICT_PACK group's sum fits one, and a STRICT_SPREAD
    /// group has no more bundles than there are nodes. Asked on every scheduling pass,
    /// so it describes nothing ([`Self::group_beyond_nodes`] says why not).
    pub(super) fn group_fits_nodes(&self, g: &Group) -> bool {
        let sum = || {
            let mut sum = Resources::default();
            for b in &g.bundles {
                sum.add(&b.total);
            }
            sum
        };
        g.bundles.iter().all(|b| self.fits_some_node(&b.total))
            && (g.strategy != Strategy::StrictPack || self.fits_some_node(&sum()))
            && (g.strategy != Strategy::StrictSpread || g.bundles.len() <= self.working_nodes())
    }

    /// Why no set of the nodes taking work could hold placement group `id` even
    /// empty (a bundle bigger than any node, a STRICT_PACK group's sum, a STRICT_SPREAD
    /// group with more bundles than nodes); empty if some could.
    pub(super) fn group_beyond_nodes(&self, id: &str, g: &Group) -> Vec<String> {
        if self.group_fits_nodes(g) {
            return Vec::new();
        }
        let mut said: Vec<String> = g
            .bundles
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                self.beyond_nodes(&format!("placement group {id}: bundle {i} asks"), &b.total)
            })
            .collect();
        if said.is_empty() && g.strategy == Strategy::StrictPack {
            let mut sum = Resources::default();
            for b in &g.bundles {
                sum.add(&b.total);
            }
            said.extend(self.beyond_nodes(
                &format!("placement group {id} (STRICT_PACK: all on one node) asks"),
                &sum,
            ));
        }
        let nodes = self.working_nodes();
        if said.is_empty() && g.strategy == Strategy::StrictSpread && g.bundles.len() > nodes {
            said.push(format!(
                "placement group {id} (STRICT_SPREAD: one node per bundle) has {} bundles \
                 and {nodes} node(s) take work",
                g.bundles.len(),
            ));
        }
        said
    }

    /// The tasks, actors and placement groups of running jobs that no node taking work
    /// could hold even empty, described, into `big` by job.
    fn work_beyond_nodes<'a>(&'a self, big: &mut BTreeMap<&'a str, Vec<String>>) {
        // Tasks alike (same job, name and request) are counted, not each named. A
        // CPU-only task within the CPUs of the biggest node fits somewhere: most of a
        // long queue is passed over without a lookup.
        let most_cpus = self
            .nodes
            .values()
            .filter(|n| n.takes_work())
            .map(|n| n.total.num_cpus)
            .fold(0.0, f64::max);
        let mut tasks: BTreeMap<(&str, &str, String), (usize, &Resources)> = BTreeMap::new();
        let cpu = self
            .queue
            .cpu
            .iter()
            .filter(|(_, c)| *c > most_cpus + 1e-9)
            .map(|(id, _)| id);
        for id in cpu.chain(self.queue.other.iter()) {
            let Some(t) = self.tasks.get(id) else {
                continue;
            };
            // Actor calls run in their actor; tasks in a bundle in its reservation.
            if t.state != TaskState::Pending || t.spec.actor.is_some() || t.spec.bundle.is_some() {
                continue;
            }
            let r = &t.spec.resources;
            if self.fits_some_node(r) {
                continue;
            }
            let key = (t.spec.job_id.as_str(), t.spec.name.as_str(), r.to_string());
            tasks.entry(key).or_insert((0, r)).0 += 1;
        }
        for ((job, name, _), (n, r)) in tasks {
            let name = if name.is_empty() { "(unnamed)" } else { name };
            let who = match n {
                1 => format!("task `{name}` asks"),
                n => format!("{n} tasks `{name}` each ask"),
            };
            if let Some(b) = self.beyond_nodes(&who, r) {
                big.entry(job).or_default().push(b);
            }
        }
        for a in self.waiting_actors() {
            if a.spec.bundle.is_some() {
                continue;
            }
            let who = format!("actor `{}` asks", a.spec.name);
            if let Some(b) = self.beyond_nodes(&who, &a.spec.resources) {
                big.entry(a.spec.job_id.as_str()).or_default().push(b);
            }
        }
        let mut groups: Vec<(&String, &Group)> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.ready && self.job_active(&g.job))
            .collect();
        groups.sort_by_key(|(id, _)| *id);
        for (id, g) in groups {
            let said = self.group_beyond_nodes(id, g);
            if !said.is_empty() {
                big.entry(g.job.as_str()).or_default().extend(said);
            }
        }
    }
}
