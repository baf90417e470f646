//! What the head's state machine takes in (from nodes and drivers) and sends out (to
//! nodes): volley's own types. The service converts them from and to the protocol's at
//! the edge, so the state machine knows nothing of the wire.

use std::collections::HashMap;

use bytes::Bytes;
use volley_common::ErrorReport;

use super::super::super::resources::Resources;

/// Where in a placement group a task or actor runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BundleChoice {
    /// The group's id.
    pub group: String,
    /// One bundle, or any with room.
    pub index: Option<usize>,
}

/// A task as a driver submits it.
#[derive(Debug, Clone, Default)]
pub(crate) struct TaskSpec {
    pub job_id: String,
    pub task_id: String,
    pub name: String,
    /// The encoded task; the head passes it on unread.
    pub payload: Bytes,
    /// The objects it reads, in order.
    pub args: Vec<String>,
    /// For each arg, one batch of it (a map output's partition) or the whole object.
    pub arg_batches: Vec<Option<u32>>,
    pub resources: Resources,
    pub max_retries: u32,
    /// The actor whose method it calls.
    pub actor: Option<String>,
    pub bundle: Option<BundleChoice>,
    /// Replayed to a restarted head: made before, its object freed by its driver
    /// (kept as lineage, run again only if a reader needs it).
    pub made: bool,
}

/// An actor as a driver creates it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ActorSpec {
    pub job_id: String,
    pub actor_id: String,
    pub name: String,
    /// The encoded actor; passed on unread.
    pub payload: Bytes,
    pub resources: Resources,
    pub max_restarts: u32,
    pub bundle: Option<BundleChoice>,
}

/// How a placement group's bundles spread over nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Strategy {
    /// As few nodes as possible, more if needed.
    #[default]
    Pack,
    /// As many nodes as possible.
    Spread,
    /// All on one node, or wait.
    StrictPack,
    /// Each on its own node, or wait.
    StrictSpread,
}

/// Where an object can be read, and what is known of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ObjectLocation {
    pub object_id: String,
    /// The object stores of the live nodes holding a copy.
    pub addresses: Vec<String>,
    pub bytes: u64,
    pub rows: u64,
    /// The object itself when small (an Arrow IPC stream), else empty.
    pub inline: Bytes,
    /// One batch of it to read (a map output's partition), or all.
    pub batch: Option<u32>,
}

/// What a waiting driver learns of an object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ObjectStatus {
    pub object_id: String,
    /// A live copy exists.
    pub ready: bool,
    /// Why it will never be made.
    pub error: Option<ErrorReport>,
    /// Unknown objects have none.
    pub location: Option<ObjectLocation>,
}

/// A task attempt sent to a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Assignment {
    pub task_id: String,
    pub attempt: u32,
    pub job_id: String,
    pub payload: Bytes,
    pub args: Vec<ObjectLocation>,
    pub gpu_ids: Vec<u32>,
    pub actor: Option<String>,
    pub name: String,
    /// Sent ahead of room: the node runs it when a slot of its CPUs frees.
    pub ahead: bool,
    pub num_cpus: f64,
}

/// A question about workers' output, asked of every node.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LogQuery {
    pub query_id: u64,
    pub job_id: String,
    /// A task's name or id, or empty.
    pub task: String,
    /// An actor's id, or empty.
    pub actor_id: String,
    /// List what there is instead of reading it.
    pub list: bool,
    /// A follower's bytes received so far, by section title.
    pub seen: HashMap<String, u64>,
}

/// What the head tells a node to do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NodeCommand {
    RunTask(Assignment),
    /// A task sent ahead now holds its resources.
    PromoteTask(String),
    /// Drop the task if it waits there; kill its worker if it runs.
    CancelTask(String),
    FreeObjects(Vec<String>),
    /// Fetch and ready a new job's package.
    PrepareJob(String),
    /// The job ended: its workers, drivers, objects and files go.
    StopJob(String),
    StartDriver {
        job_id: String,
        entrypoint: Vec<String>,
        env: HashMap<String, String>,
        gpu_ids: Vec<u32>,
    },
    StartActor {
        actor_id: String,
        job_id: String,
        payload: Bytes,
        gpu_ids: Vec<u32>,
        incarnation: u32,
        resources: Resources,
    },
    StopActor(String),
    /// Copy an object from another node's store (that node drains).
    CopyObject {
        object_id: String,
        from: String,
    },
    ReadLogs(LogQuery),
}

/// An input a task could not read from the stores named.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct UnreadableInput {
    pub object_id: String,
    pub from: Vec<String>,
}

/// How a task attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TaskOutcome {
    /// Its output is stored on its node (and, when small, `inline`).
    Succeeded {
        bytes: u64,
        rows: u64,
        inline: Bytes,
    },
    /// The task itself failed: not retried.
    Failed(ErrorReport),
    /// Its worker died or an input could not be read: run again if it may.
    SystemFailure {
        error: String,
        unreadable: Vec<UnreadableInput>,
    },
    /// No worker of its job could start on its node: run again if it may, on another
    /// node while that one keeps failing ([`NO_WORKER_PAUSE`](super::tasks::NO_WORKER_PAUSE)).
    NoWorker { error: String },
}

/// A node's word on a task attempt it ran.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskReport {
    pub node_id: String,
    pub task_id: String,
    pub attempt: u32,
    pub outcome: TaskOutcome,
    /// A task sent ahead that took over the finished task's slot.
    pub successor: Option<String>,
    /// How long the attempt took in its worker.
    pub run_time: std::time::Duration,
}

/// A node joining.
#[derive(Debug, Clone, Default)]
pub(crate) struct NodeRegistration {
    pub hostname: String,
    pub object_address: String,
    pub total: Resources,
    pub gpu_ids: Vec<u32>,
    pub object_store_memory: u64,
}

/// What a head answers a rejoining node: the jobs whose drivers and objects it drops,
/// and other objects of its no one will read.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Rejoined {
    pub drop_jobs: Vec<String>,
    pub free_objects: Vec<String>,
    /// Tasks it still runs that no one will claim: their workers stop, unreported.
    pub cancel_tasks: Vec<String>,
    /// Actors it still holds that no one will claim: their workers stop, unreported.
    pub stop_actors: Vec<String>,
}

/// What a node that rejoins a restarted head kept from before: the objects in its
/// store and the jobs whose drivers it runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Kept {
    pub objects: Vec<KeptObject>,
    pub drivers: Vec<String>,
    pub running: Vec<KeptRun>,
    pub actors: Vec<KeptActor>,
}

/// An actor alive in a rejoining node's worker, as the head before started it.
#[derive(Debug, Clone)]
pub(crate) struct KeptActor {
    pub id: String,
    pub job: String,
    pub incarnation: u32,
    pub pid: u32,
    pub resources: Resources,
}

/// A task a rejoining node still runs, as the head before gave it.
#[derive(Debug, Clone)]
pub(crate) struct KeptRun {
    pub id: String,
    pub job: String,
    pub attempt: u32,
    pub cpus: f64,
    /// A call of an actor the node keeps: not stopped, whoever claims it (that would
    /// stop the actor).
    pub actor_call: bool,
}

/// An object a rejoining node holds.
#[derive(Debug, Clone)]
pub(crate) struct KeptObject {
    pub id: String,
    pub job: String,
    pub bytes: u64,
    pub rows: u64,
}

/// A node's heartbeat figures.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct NodeLoad {
    pub object_store_bytes: u64,
    pub spilled_bytes: u64,
    pub spilled_total: u64,
    pub workers: u32,
}

/// What still keeps a draining node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DrainStatus {
    pub running_tasks: u32,
    pub drivers: u32,
    pub objects_to_copy: u32,
}

/// Where an actor is in its life.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ActorState {
    Pending,
    Starting { node: String },
    Alive { node: String },
    Dead(String),
}

impl ActorState {
    /// How it is reported: its name (`PENDING`, `STARTING`, `ALIVE`, `DEAD`), the node
    /// it lives on and why it died (empty where they do not apply).
    pub fn parts(&self) -> (&'static str, &str, &str) {
        match self {
            Self::Pending => ("PENDING", "", ""),
            Self::Starting { node } => ("STARTING", node, ""),
            Self::Alive { node } => ("ALIVE", node, ""),
            Self::Dead(e) => ("DEAD", "", e),
        }
    }
}

/// What a head after this one must know of a running job's actor that no node or
/// driver can tell it: how often it restarted, and whether it died for good (a driver
/// replays the actors it created, dead or not, and a node keeps only live ones).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ActorHistory {
    pub restarts: u32,
    /// Why it died for good.
    pub dead: Option<String>,
}

/// An actor as the head reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ActorRecord {
    pub actor_id: String,
    pub name: String,
    pub state: ActorState,
    pub restarts: u32,
    /// Its process, while alive.
    pub pid: Option<u32>,
    /// Dead, and its process gone: its node reported so, or left the cluster. A killed
    /// actor is dead at once, but its process may hold its GPUs and files a moment
    /// longer.
    pub exited: bool,
    /// Why it waits, when no node could hold it even empty; empty otherwise.
    pub waiting: String,
}

/// A placement group as a driver waits for it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupStatus {
    pub ready: bool,
    /// Each bundle's node, once placed.
    pub bundle_nodes: Vec<Option<String>>,
}
