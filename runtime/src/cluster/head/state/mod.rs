//! The head's state machine: everything the head knows about nodes, tasks, objects,
//! placement groups, actors and jobs, and the rules that change it.
//!
//! It holds no locks, does no I/O and knows nothing of the wire: each event (a node
//! joins, a task is submitted or finishes, a node stops answering) is a method call
//! with volley's own types ([`messages`]), and what the nodes must do comes out as
//! [`NodeCommand`]s on each node's [link](NodeLink). After every event the owner calls
//! [`State::schedule`], which places what can run now. The service around it
//! (`head::service`) converts from and to the protocol at the edge.
//!
//! One module per concern: [`tasks`] (queue, placement, reports, retries),
//! [`objects`] (the object directory and lineage), [`nodes`] (joining, death,
//! draining), [`groups`] (placement groups), [`actors`], [`jobs`], and [`waiting`] (why
//! a job's work does not start).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use volley_common::{ErrorKind, ErrorReport, VolleyError};

use super::super::jobs::ExecutionProgress;
use super::super::metrics::{TaskEnd, TaskMetrics};
use super::super::resources::{GpuSlots, Resources};
use super::super::status::{ClusterStatus, JobState, JobStatus, NodeState, NodeStatus};

mod actors;
mod groups;
mod jobs;
pub(crate) mod messages;
mod nodes;
mod objects;
mod tasks;
#[cfg(test)]
mod tests;
mod waiting;

pub(crate) use messages::*;
pub(crate) use waiting::{WaitKind, Waiting};

/// Where a node's commands go (the node's attached stream, through the service).
pub(crate) type NodeLink = mpsc::UnboundedSender<NodeCommand>;

/// The head's maps of tasks, objects and the like, keyed by ids: each task's placement
/// and report looks several of them up, and SipHash (the standard map's) was a tenth
/// of the head's CPU time. Seeded per process, as the standard one is.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// How long a job that was running when the head before this one stopped waits for
/// its driver to come back: its node rejoining with it (node agents try every quarter
/// second), or a program that joined the cluster itself saying it is alive.
pub(crate) const RESUME_WAIT: Duration = Duration::from_secs(30);

/// How long after a restart drivers wait, before they replay their jobs, for the nodes
/// the head before had to rejoin (so that the objects those nodes kept are found
/// rather than made again).
pub(crate) const NODES_WAIT: Duration = Duration::from_secs(10);

/// `(placement group, bundle index, group generation)` a task or actor runs in.
type BundleRef = (String, usize, u64);

/// How long a cancelled task's GPUs stay held for want of word that its worker ended
/// (a node reports it as the worker dies: this is for a report lost on the way).
const CANCELLED_GPUS_HELD: Duration = Duration::from_secs(60);

/// How long a killed actor counts as still running without word of its process's end
/// (its node says it again for a few seconds if the head does not take it): after
/// this it is taken as gone. Longer than a trainer waits for its ranks
/// (`volley_train`'s 60 s), so a rank that truly does not exit fails the run instead
/// of being taken as gone.
const STOPPING_PRESUMED_GONE: Duration = Duration::from_secs(120);

struct Node {
    hostname: String,
    object_address: String,
    total: Resources,
    available: Resources,
    gpus: GpuSlots,
    last_seen: Instant,
    alive: bool,
    link: Option<NodeLink>,
    running: FastSet<String>,
    /// Tasks sent ahead of room (oldest first), not yet holding resources here.
    ahead: AheadQueue,
    /// Running CPU-only tasks holding resources here, by their CPUs (`f64` bits):
    /// the slots a task sent ahead may wait for.
    slots: FastMap<u64, usize>,
    /// Figures from its last heartbeat.
    load: NodeLoad,
    object_store_memory: u64,
    /// Bytes of the live objects the directory places here (current at every task's
    /// end, unlike `load.object_store_bytes`, which comes with heartbeats).
    stored: u64,
    /// Leaving the cluster: it gets no new work, and the objects only it holds are
    /// copied to other nodes before it goes.
    draining: bool,
    /// The GPUs of cancelled tasks and killed actors whose workers may still run, by
    /// task or actor: they go to no other work until the node reports that attempt or
    /// incarnation ended (its worker killed, or done first), so work started next
    /// does not share a GPU with a process still holding its memory; or, should that
    /// report be lost, for [`CANCELLED_GPUS_HELD`].
    cancelled_gpus: FastMap<(HeldFor, String), CancelledGpus>,
}

/// What GPUs are held for until its process is gone: a task's attempt or an actor's
/// incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum HeldFor {
    Task,
    Actor,
}

/// GPUs a cancelled task's or killed actor's worker may still hold.
struct CancelledGpus {
    /// The attempt (of a task) or incarnation (of an actor) that ran.
    attempt: u32,
    /// The GPUs asked for, and their ids.
    n: f64,
    ids: Vec<u32>,
    since: Instant,
    /// The placement group bundle they are held from; the node's own room if none.
    bundle: Option<BundleRef>,
}

impl Node {
    fn new(r: NodeRegistration) -> Self {
        Self {
            hostname: r.hostname,
            object_address: r.object_address,
            available: r.total.clone(),
            total: r.total,
            gpus: GpuSlots::new(&r.gpu_ids),
            last_seen: Instant::now(),
            alive: true,
            link: None,
            running: FastSet::default(),
            ahead: AheadQueue::default(),
            slots: FastMap::default(),
            load: NodeLoad::default(),
            object_store_memory: r.object_store_memory,
            stored: 0,
            draining: false,
            cancelled_gpus: FastMap::default(),
        }
    }

    /// Whether new work (tasks, actors, drivers, group bundles, objects) may go here.
    fn takes_work(&self) -> bool {
        self.alive && self.link.is_some() && !self.draining
    }

    /// Its store holds three quarters of its memory or more (by the directory): a
    /// task that reads nothing (a source) is not started here while another node has
    /// room, since its output would be stored here and spill.
    fn store_full(&self) -> bool {
        self.object_store_memory > 0
            && self.stored.saturating_mul(4) >= self.object_store_memory.saturating_mul(3)
    }

    /// A task sent ahead gets its room here: it holds its resources and a slot.
    fn hold_slot(&mut self, task: &mut TaskEntry) {
        self.available.subtract(&task.spec.resources);
        *self
            .slots
            .entry(task.spec.resources.num_cpus.to_bits())
            .or_default() += 1;
        task.ahead = false;
    }

    /// Holds the GPUs `ids` (`n` asked for) of task or actor `task`, cancelled while
    /// attempt (or incarnation) `attempt` ran here, until that attempt's end is
    /// reported: out of this node's room, or, for work in a placement group's
    /// `bundle`, out of the bundle's (the caller has taken them out of it).
    #[allow(clippy::too_many_arguments)]
    fn hold_cancelled_gpus(
        &mut self,
        held_for: HeldFor,
        task: &str,
        attempt: u32,
        n: f64,
        ids: Vec<u32>,
        bundle: Option<BundleRef>,
    ) {
        if bundle.is_none() {
            self.available.num_gpus -= n;
            self.gpus.hold(&ids, n);
        }
        let held = CancelledGpus {
            attempt,
            n,
            ids,
            since: Instant::now(),
            bundle,
        };
        self.cancelled_gpus
            .insert((held_for, task.to_string()), held);
    }

    /// Attempt (or incarnation) `attempt` of task or actor `task` ended here: the GPUs
    /// held for it, if it was cancelled, are free. Those of a bundle are returned, for
    /// the bundle to take back.
    fn cancelled_attempt_ended(
        &mut self,
        held_for: HeldFor,
        task: &str,
        attempt: u32,
    ) -> Option<CancelledGpus> {
        if self.cancelled_gpus.is_empty() {
            return None;
        }
        let key = (held_for, task.to_string());
        if self
            .cancelled_gpus
            .get(&key)
            .is_some_and(|c| c.attempt == attempt)
        {
            return self.free_cancelled_gpus(&key);
        }
        None
    }

    /// Frees the GPUs held longer than [`CANCELLED_GPUS_HELD`] for cancelled tasks and
    /// killed actors; those, each with what a bundle must take back.
    fn expire_cancelled_gpus(&mut self) -> Vec<((HeldFor, String), Option<CancelledGpus>)> {
        let expired: Vec<(HeldFor, String)> = self
            .cancelled_gpus
            .iter()
            .filter(|(_, c)| c.since.elapsed() >= CANCELLED_GPUS_HELD)
            .map(|(task, _)| task.clone())
            .collect();
        expired
            .into_iter()
            .map(|task| {
                let bundle = self.free_cancelled_gpus(&task);
                (task, bundle)
            })
            .collect()
    }

    /// Frees the GPUs held for cancelled task (or killed actor) `key`: this node's go
    /// back to it; a bundle's are returned.
    fn free_cancelled_gpus(&mut self, key: &(HeldFor, String)) -> Option<CancelledGpus> {
        let c = self.cancelled_gpus.remove(key)?;
        if c.bundle.is_some() {
            return Some(c);
        }
        self.available.num_gpus += c.n;
        self.gpus.give(&c.ids, c.n);
        None
    }

    /// Sends `command` if the node is alive and attached; false if it could not.
    fn send(&self, command: NodeCommand) -> bool {
        match &self.link {
            Some(link) if self.alive => link.send(command).is_ok(),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TaskState {
    Pending,
    Running { node: String, gpus: Vec<u32> },
    Done,
    Failed,
}

impl TaskState {
    fn name(&self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running { .. } => "RUNNING",
            Self::Done => "DONE",
            Self::Failed => "FAILED",
        }
    }
}

/// A node's tasks sent ahead of room, oldest first, with how many of them ask for each
/// number of CPUs: placing a task ahead asks that count of every node, so it is kept
/// rather than counted from the queue each time.
#[derive(Default)]
struct AheadQueue {
    /// Task ids and their CPUs (`f64` bits).
    queue: VecDeque<(String, u64)>,
    by_cpus: FastMap<u64, usize>,
}

impl AheadQueue {
    fn push(&mut self, id: &str, cpus: u64) {
        self.queue.push_back((id.to_string(), cpus));
        *self.by_cpus.entry(cpus).or_default() += 1;
    }

    fn front(&self) -> Option<&str> {
        self.queue.front().map(|(id, _)| id.as_str())
    }

    fn pop_front(&mut self) -> Option<String> {
        let (id, cpus) = self.queue.pop_front()?;
        self.forget(cpus);
        Some(id)
    }

    /// Takes `id` out (a task leaves in about the order it came: searched from the
    /// front).
    fn remove(&mut self, id: &str) {
        if let Some(i) = self.queue.iter().position(|(a, _)| a == id) {
            if let Some((_, cpus)) = self.queue.remove(i) {
                self.forget(cpus);
            }
        }
    }

    fn forget(&mut self, cpus: u64) {
        if let Some(c) = self.by_cpus.get_mut(&cpus) {
            *c -= 1;
            if *c == 0 {
                self.by_cpus.remove(&cpus);
            }
        }
    }

    /// Tasks waiting that ask for `cpus` (`f64` bits).
    fn waiting(&self, cpus: u64) -> usize {
        self.by_cpus.get(&cpus).copied().unwrap_or(0)
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

struct TaskEntry {
    spec: TaskSpec,
    state: TaskState,
    attempt: u32,
    retries_left: u32,
    reconstructions: u32,
    /// Times it waited for an input that could not be read to be made again.
    input_losses: u32,
    /// Times a node handed it back for want of a worker (no retry used, up to
    /// [`tasks::MAX_NO_WORKER`]).
    no_worker_bounces: u32,
    /// Work placed after it, in a pass where it found no room, passed it over: after
    /// [`STARVING_AFTER`] it may hold a node ([`State::hold_node_for`]).
    passed_over: bool,
    /// `(group, bundle, generation)` whose reservation the running task uses.
    bundle: Option<BundleRef>,
    /// Sent to its node ahead of room: it holds no resources yet.
    ahead: bool,
    /// When it last became pending (a source waits for a store with room only so
    /// long: [`SOURCE_WAIT`]).
    pending_since: Instant,
    /// Since when, pending, it has found all its inputs (a task whose input is mostly
    /// on one busy node waits for that node only so long: [`Self::locality_wait`]).
    ready_since: Option<Instant>,
    /// When its current attempt was sent to a node.
    sent_at: Instant,
}

/// How long a task that reads nothing waits for a node whose store has room before it
/// goes where it fits: a full store's objects may be held for good (a materialized
/// dataset) while the nodes with room are taken by actors.
const SOURCE_WAIT: Duration = Duration::from_secs(2);

/// How long a task may wait for room, with all its inputs, before it holds a node for
/// itself ([`State::hold_node_for`]): long enough that tasks placed in the order room
/// frees are not held up, short next to how long smaller tasks that keep coming could
/// pass it over.
const STARVING_AFTER: Duration = Duration::from_secs(1);

/// The input bytes a node must hold, more than any other node, before a task waits
/// for that node rather than run elsewhere and fetch them.
const LOCAL_INPUT_BYTES: u64 = 16 << 20;

/// The rate at which a wait for locality is measured: a task waits for the node
/// holding its input at most as long as that input would take to travel at this rate
/// (~115 MB/s between two node agents of the 2-core development machine, Flight and
/// decoding included), and never more than [`LOCALITY_WAIT`].
const TRANSFER_BYTES_PER_SECOND: f64 = 100.0 * 1024.0 * 1024.0;

/// The longest a task waits for the node holding its input.
const LOCALITY_WAIT: Duration = Duration::from_secs(3);

impl TaskEntry {
    /// How long it may wait for a node holding `bytes` of its input to have room.
    fn locality_wait(bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / TRANSFER_BYTES_PER_SECOND).min(LOCALITY_WAIT)
    }

    /// The key of the node slot it holds while it runs with `bundle`, sent `ahead` or
    /// not: its CPUs' bits, for a CPU-only task holding the node's own resources.
    fn slot(&self, ahead: bool, bundle: &Option<BundleRef>) -> Option<u64> {
        (!ahead && bundle.is_none())
            .then(|| self.cpu_only())
            .flatten()
            .map(f64::to_bits)
    }

    /// The CPUs it asks for, when that is all it asks for (no GPUs, memory, custom
    /// resources, placement group or actor).
    /// Whether it runs in a worker with GPUs.
    fn uses_gpus(&self) -> bool {
        self.spec.resources.num_gpus > 0.0
    }

    fn cpu_only(&self) -> Option<f64> {
        let r = &self.spec.resources;
        (self.spec.actor.is_none()
            && self.spec.bundle.is_none()
            && r.num_gpus == 0.0
            && r.memory == 0
            && r.custom.is_empty())
        .then_some(r.num_cpus)
    }
}

/// A failure of the cluster's own (a lost worker, node or input) as an error report.
fn execution_report(message: impl Into<String>) -> ErrorReport {
    ErrorReport::new(ErrorKind::Execution, message)
}

/// Work that will not run (or run on): its job ended, or its driver cancelled it.
fn cancelled_report(why: &str) -> ErrorReport {
    ErrorReport::new(ErrorKind::Cancelled, "").with_context(why)
}

struct ObjectEntry {
    job: String,
    producer: Option<String>,
    locations: Vec<String>,
    bytes: u64,
    rows: u64,
    /// Why the object can never be produced (its task failed for good).
    error: Option<ErrorReport>,
    /// The object itself, when small (an Arrow IPC stream): handed to its readers.
    inline: Option<bytes::Bytes>,
    freed: bool,
    /// Tasks not yet finished that take this object as input.
    users: u32,
    /// Tasks the head keeps (to run, or to run again should their output be lost) that
    /// name this object as an input directly (not through a group). A freed object
    /// such a task may need again keeps its lineage (its entry and its producer) once
    /// its copies are gone, so that it can be made again first: an exchange lets its
    /// input blocks go once they are mapped, and a lost map output is rebuilt from a
    /// re-read block. One whose task cannot run again as it did (a driver's own
    /// object, an actor call's output, one made from inputs freed too) is kept whole
    /// instead.
    lineage_users: u32,
    /// Freed, its copies gone, only its lineage kept. Its task's inputs (all held by
    /// their driver then) keep no lineage for it: lineage is one task deep, so the
    /// head holds at most one lost generation per live object.
    lineage_only: bool,
}

impl ObjectEntry {
    /// Whether anyone still wants its copies: its driver (not freed), a task or group
    /// that reads it, or a kept task that may read it again when it cannot be made
    /// again itself.
    fn wanted(&self) -> bool {
        !self.freed || self.users > 0 || (self.lineage_users > 0 && !self.lineage_only)
    }

    fn new(
        job: &str,
        producer: Option<String>,
        locations: Vec<String>,
        bytes: u64,
        rows: u64,
    ) -> Self {
        Self {
            job: job.to_string(),
            producer,
            locations,
            bytes,
            rows,
            error: None,
            inline: None,
            freed: false,
            users: 0,
            lineage_users: 0,
            lineage_only: false,
        }
    }
}

/// Objects a driver named once, to pass to tasks as one argument (an exchange's map
/// outputs, read a partition each by the reduce tasks): the head then holds one name
/// per reduce task instead of one per map output and reduce task.
struct ObjectGroup {
    job: String,
    /// Each held (counted among its users) while the group lives.
    members: Vec<String>,
    freed: bool,
    /// Tasks not yet finished that take the group as input.
    users: u32,
}

struct BundleState {
    total: Resources,
    node: Option<String>,
    available: Resources,
    gpus: GpuSlots,
    gpu_ids: Vec<u32>,
}

struct Group {
    job: String,
    strategy: Strategy,
    bundles: Vec<BundleState>,
    ready: bool,
    generation: u64,
}

struct ActorEntry {
    spec: ActorSpec,
    state: ActorState,
    incarnation: u32,
    restarts: u32,
    gpus: Vec<u32>,
    bundle: Option<BundleRef>,
    /// Its worker process, once alive.
    pid: u32,
    /// Killed while it lived on this node (since then): its process may still run
    /// there until the node reports it gone, the node itself goes, or
    /// [`STOPPING_PRESUMED_GONE`] passes without word, as [`ActorRecord::exited`] says.
    stopping: Option<(String, Instant)>,
}

impl ActorEntry {
    /// The actor is dead for good. It never starts again, so the encoded actor it
    /// would start from goes; its record stays, listed, as long as its job's.
    fn die(&mut self, why: String) {
        self.state = ActorState::Dead(why);
        self.spec.payload = Default::default();
    }
}

/// A job as the state machine holds it.
pub(crate) struct JobEntry {
    /// What it reports.
    pub status: JobStatus,
    pub env: HashMap<String, String>,
    /// Its program joined the cluster itself (no driver started by the head).
    pub attached: bool,
    /// Its CPU workers may serve a later job of the same program once it ends
    /// (`JobSpec.share_workers`); the nodes decide, the head only passes it on.
    pub share_workers: bool,
    /// What its driver asks for.
    pub resources: Resources,
    last_alive: Instant,
    gpus: Vec<u32>,
    /// Seconds its CPU-only tasks take in their workers, a moving average per task name
    /// (a task's type unless its submitter named it: a Dataset's map and reduce tasks
    /// apart): how many of them may wait ahead on a node ([`tasks::ahead_per_slot`]).
    /// At most [`tasks::TIMED_NAMES`] names.
    task_seconds: FastMap<String, f64>,
    /// The nodes that could not start its workers lately, for tasks with GPUs or
    /// without (a node starts each kind apart): when, and why. Its tasks of that kind
    /// keep off them for [`tasks::NO_WORKER_PAUSE`].
    no_workers: FastMap<(String, bool), (Instant, String)>,
    /// Running when a head before this one stopped: until when it waits for its
    /// driver to come back (its node rejoining with it, or an attached program
    /// saying it is alive) before it starts again from the beginning (or, attached,
    /// fails).
    resume_by: Option<Instant>,
    /// Its driver's resources are held on its node (given back when the job ends).
    driver_charged: bool,
    /// Restored running by a restarted head, until its driver has replayed it: what
    /// became of the tasks replayed so far (`[done, lineage, queued]`: done on a node
    /// that kept the object, kept as lineage, to run, running on where it ran).
    replay: Option<[u32; 4]>,
    /// Its actors that restarted or died for good, while it runs: kept across head
    /// restarts (see [`ActorHistory`]).
    pub actor_history: BTreeMap<String, ActorHistory>,
}

impl JobEntry {
    /// A job as submitted now, or as kept by a head before (`submitted_ms` set).
    pub fn new(
        status: JobStatus,
        env: HashMap<String, String>,
        attached: bool,
        resources: Resources,
    ) -> Self {
        Self {
            status,
            env,
            attached,
            share_workers: false,
            resources,
            last_alive: Instant::now(),
            gpus: vec![],
            task_seconds: FastMap::default(),
            no_workers: FastMap::default(),
            resume_by: None,
            driver_charged: false,
            replay: None,
            actor_history: BTreeMap::new(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the head knows.
#[derive(Default)]
pub(crate) struct State {
    next_node: u64,
    next_job: u64,
    /// The nodes alive or draining: what every scheduling pass reads.
    nodes: BTreeMap<String, Node>,
    /// The nodes that died or left, kept for listing only: out of `nodes`, since a
    /// pass that looked at every node ever known grew with the cluster's churn (with
    /// 1,000 gone nodes kept there, scheduling 20,000 tasks took ~9 times as long).
    gone_nodes: BTreeMap<String, Node>,
    /// Tasks and objects are boxed: a job keeps tens of thousands of each, and a table
    /// of pointers that a lookup probes stays in cache where one of the entries did not
    /// (the head's CPU for 20,000 no-op tasks: 0.216 s against 0.232 s unboxed, medians
    /// of 12 runs).
    tasks: FastMap<String, Box<TaskEntry>>,
    queue: tasks::TaskQueue,
    objects: FastMap<String, Box<ObjectEntry>>,
    object_groups: FastMap<String, ObjectGroup>,
    groups: HashMap<String, Group>,
    actors: HashMap<String, ActorEntry>,
    jobs: BTreeMap<String, JobEntry>,
    /// The jobs waiting for a node to start their driver, and the actors waiting for a
    /// node (new or restarting), in id order: what a scheduling pass looks at. The
    /// head keeps every job and actor it has known (for listing), so passes over all
    /// of them grew with the cluster's history: with 5,000 ended jobs and 20,000 dead
    /// actors kept, scheduling 20,000 tasks took ~19 times as long.
    pending_jobs: BTreeSet<String>,
    pending_actors: BTreeSet<String>,
    /// Copies of objects off draining nodes on their way: object → target node and
    /// the bytes reserved there (given back when the copy ends, freed meanwhile or not).
    copies: HashMap<String, (String, u64)>,
    /// Dataset executions of each job as their drivers last reported them (the last
    /// few per job).
    executions: HashMap<String, Vec<ExecutionProgress>>,
    /// Bytes of the inline copies held, and the most they may take.
    inline_bytes: u64,
    inline_limit: u64,
    /// Whether CPU-only tasks may be sent to nodes ahead of room in this scheduling
    /// pass: not while an actor, a driver, a placement group or a task asking for
    /// more than CPUs waits, since tasks ahead take freed CPUs first.
    ahead_allowed: bool,
    /// Tasks' ends and durations, for `/metrics`.
    task_metrics: TaskMetrics,
    /// Jobs ended since the head started: followers of a job's log wake when it moves.
    jobs_ended: u64,
    /// Objects that nodes rejoining after a head restart kept, not yet claimed by a
    /// task their driver submits again ([`State::rejoin_node`]).
    adopted: FastMap<String, Adopted>,
    /// Tasks that nodes rejoining after a head restart still run, not yet claimed by
    /// their drivers' replay (their CPUs are held on their nodes meanwhile).
    adopted_runs: FastMap<String, AdoptedRun>,
    /// Actors alive in workers of nodes rejoining after a head restart, not yet
    /// claimed by their drivers' replay (their resources are held meanwhile).
    adopted_actors: FastMap<String, AdoptedActor>,
    /// Tasks made done by an object a rejoined node kept, with that node, until the
    /// node's own report of the task comes: its result stands (a write keeps its
    /// effects) though the task is done by then.
    claimed: FastMap<String, String>,
    /// The nodes a head before this one had, not yet rejoined, and until when drivers
    /// wait for them before they replay ([`State::recovering`]).
    awaiting_nodes: BTreeSet<String>,
    awaiting_until: Option<Instant>,
    /// Tasks that have waited for room past [`STARVING_AFTER`], each with the node it
    /// holds: no other work is placed or sent ahead there until the task fits, so a
    /// request bigger than the rest is not passed over for good by smaller ones that
    /// keep taking what frees ([`State::hold_node_for`]).
    holds: FastMap<String, String>,
}

/// A task a node ran on across a head restart, waiting for its driver's replay.
struct AdoptedRun {
    job: String,
    node: String,
    attempt: u32,
    cpus: f64,
    /// An actor's call: never stopped (that would stop the actor); its report, if no
    /// one claims it, is dropped as stale.
    actor_call: bool,
}

/// An actor alive on a node across a head restart, waiting for its driver's replay.
struct AdoptedActor {
    job: String,
    node: String,
    incarnation: u32,
    pid: u32,
    resources: Resources,
}

/// An object kept by a node across a head restart, waiting for its task.
struct Adopted {
    job: String,
    node: String,
    bytes: u64,
    rows: u64,
    /// Its task's own code failed on the node, reported before the driver's replay:
    /// the replayed task fails with it rather than run again (an actor's call that
    /// ran again would change its actor twice).
    error: Option<ErrorReport>,
}

/// Why the state machine refused a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// The thing named does not exist.
    NotFound(String),
    /// It exists but is in no state for this (a job not running).
    NotNow(String),
    /// The request itself is wrong.
    Invalid(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound(m) | Self::NotNow(m) | Self::Invalid(m) => f.write_str(m),
        }
    }
}

impl From<Refusal> for VolleyError {
    fn from(r: Refusal) -> Self {
        VolleyError::plan(r.to_string())
    }
}

impl State {
    /// A head's state with no nodes, keeping up to `inline_limit` bytes of small
    /// objects beside their metadata, numbering nodes and jobs after `next_node` and
    /// `next_job`.
    pub fn new(inline_limit: u64, next_node: u64, next_job: u64) -> Self {
        Self {
            inline_limit,
            next_node,
            next_job,
            ..Self::default()
        }
    }

    /// The last node number given out.
    pub fn next_node(&self) -> u64 {
        self.next_node
    }

    /// Places whatever can run now.
    pub fn schedule(&mut self) {
        let tasks = &self.tasks;
        self.holds
            .retain(|id, _| tasks.get(id).is_some_and(|t| t.state == TaskState::Pending));
        self.promote_ahead();
        self.place_groups();
        self.place_drivers();
        self.place_actors();
        self.place_tasks();
    }

    /// Refuses work for a job that is not running (ended, stopped, or unknown).
    fn require_running(&self, job: &str) -> Result<(), Refusal> {
        if self.job_active(job) {
            Ok(())
        } else {
            Err(Refusal::NotNow(format!("job {job} is not running")))
        }
    }

    fn job_active(&self, job: &str) -> bool {
        self.jobs
            .get(job)
            .is_some_and(|j| j.status.state == JobState::Running)
    }

    /// How many jobs have ended since this head started: a change says a follower of
    /// some job's log may be done.
    pub fn jobs_ended(&self) -> u64 {
        self.jobs_ended
    }

    /// The tasks' ends and durations so far.
    pub fn task_metrics(&self) -> &TaskMetrics {
        &self.task_metrics
    }

    /// The jobs waiting for a node to start their driver, in id order (from
    /// `pending_jobs`, each checked against its state).
    fn waiting_jobs(&self) -> impl Iterator<Item = (&String, &JobEntry)> {
        self.pending_jobs
            .iter()
            .filter_map(|id| self.jobs.get_key_value(id))
            .filter(|(_, j)| j.status.state == JobState::Pending)
    }

    /// The actors waiting for a node, in id order (from `pending_actors`, each checked
    /// against its state).
    fn waiting_actors(&self) -> impl Iterator<Item = &ActorEntry> {
        self.pending_actors
            .iter()
            .filter_map(|id| self.actors.get(id))
            .filter(|a| a.state == ActorState::Pending)
    }

    /// Every node the head has known, alive or not, by id.
    fn listed_nodes(&self) -> impl Iterator<Item = (&String, &Node)> {
        let mut all: Vec<(&String, &Node)> =
            self.nodes.iter().chain(self.gone_nodes.iter()).collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all.into_iter()
    }

    /// The cluster's nodes and load.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            nodes: self
                .listed_nodes()
                .map(|(id, n)| NodeStatus {
                    node_id: id.clone(),
                    hostname: n.hostname.clone(),
                    object_address: n.object_address.clone(),
                    state: match (n.alive, n.draining) {
                        (true, false) => NodeState::Alive,
                        (true, true) => NodeState::Draining,
                        (false, true) => NodeState::Left,
                        (false, false) => NodeState::Dead,
                    },
                    total: n.total.clone(),
                    available: n.available.clone(),
                    object_store_bytes: n.load.object_store_bytes,
                    object_store_memory: n.object_store_memory,
                    spilled_bytes: n.load.spilled_bytes,
                    spilled_total: n.load.spilled_total,
                    workers: n.load.workers,
                    running_tasks: n.running.len() as u32,
                })
                .collect(),
            pending_tasks: self
                .tasks
                .values()
                .filter(|t| t.state == TaskState::Pending)
                .count() as u32,
            running_tasks: self
                .tasks
                .values()
                .filter(|t| matches!(t.state, TaskState::Running { .. }))
                .count() as u32,
            running_jobs: self
                .jobs
                .values()
                .filter(|j| j.status.state == JobState::Running)
                .count() as u32,
            // Entries kept only for their lineage hold no object.
            objects: self.objects.values().filter(|o| !o.lineage_only).count() as u32,
        }
    }
}
