//! The cluster's state as the head reports it, in volley's own types (the protocol's
//! generated types stay inside the cluster crate's wire code).

use super::proto;
use super::resources::Resources;

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Takes work.
    Alive,
    /// Leaving: takes no new work while its tasks end and its objects are copied away.
    Draining,
    /// Gone after draining.
    Left,
    /// Declared dead (silent past the node timeout, or its agent stopped).
    Dead,
}

/// A node as the head sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeStatus {
    /// Its id (`node-3`).
    pub node_id: String,
    /// Its machine's name.
    pub hostname: String,
    /// Its object store's Flight address (`host:port`).
    pub object_address: String,
    /// Where it is in its life.
    pub state: NodeState,
    /// What it offers.
    pub total: Resources,
    /// What is free now.
    pub available: Resources,
    /// Bytes of objects its store keeps in memory.
    pub object_store_bytes: u64,
    /// Bytes its store keeps in memory before spilling.
    pub object_store_memory: u64,
    /// Bytes of objects its store holds on disk now.
    pub spilled_bytes: u64,
    /// Bytes its store ever spilled.
    pub spilled_total: u64,
    /// Its worker processes.
    pub workers: u32,
    /// Tasks running there.
    pub running_tasks: u32,
}

impl NodeStatus {
    /// Whether it is in the cluster (alive or draining).
    pub fn alive(&self) -> bool {
        matches!(self.state, NodeState::Alive | NodeState::Draining)
    }
}

/// The cluster's nodes and load.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStatus {
    /// Every node the head knows, in id order.
    pub nodes: Vec<NodeStatus>,
    /// Tasks waiting for room.
    pub pending_tasks: u32,
    /// Tasks running.
    pub running_tasks: u32,
    /// Jobs running.
    pub running_jobs: u32,
    /// Objects in the head's directory.
    pub objects: u32,
}

impl From<proto::NodeInfo> for NodeStatus {
    fn from(n: proto::NodeInfo) -> Self {
        let state = match (n.alive, n.draining) {
            (true, false) => NodeState::Alive,
            (true, true) => NodeState::Draining,
            (false, true) => NodeState::Left,
            (false, false) => NodeState::Dead,
        };
        Self {
            node_id: n.node_id,
            hostname: n.hostname,
            object_address: n.object_address,
            state,
            total: n.total.into(),
            available: n.available.into(),
            object_store_bytes: n.object_store_bytes,
            object_store_memory: n.object_store_memory,
            spilled_bytes: n.spilled_bytes,
            spilled_total: n.spilled_total,
            workers: n.workers,
            running_tasks: n.running_tasks,
        }
    }
}

impl From<proto::ClusterStatus> for ClusterStatus {
    fn from(s: proto::ClusterStatus) -> Self {
        Self {
            nodes: s.nodes.into_iter().map(Into::into).collect(),
            pending_tasks: s.pending_tasks,
            running_tasks: s.running_tasks,
            running_jobs: s.running_jobs,
            objects: s.objects,
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for a node to run its driver.
    Pending,
    /// Its driver runs.
    Running,
    /// Its driver exited with 0.
    Succeeded,
    /// Its driver failed, or could not run.
    Failed,
    /// Stopped by `volley job stop`.
    Stopped,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Stopped)
    }

    fn parse(s: &str) -> Self {
        match s {
            "RUNNING" => Self::Running,
            "SUCCEEDED" => Self::Succeeded,
            "FAILED" => Self::Failed,
            "STOPPED" => Self::Stopped,
            _ => Self::Pending,
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Stopped => "STOPPED",
        })
    }
}

/// A job's record.
#[derive(Debug, Clone, PartialEq)]
pub struct JobStatus {
    /// Its id.
    pub job_id: String,
    /// Its name.
    pub name: String,
    /// Where it is in its life.
    pub state: JobState,
    /// Its command.
    pub entrypoint: Vec<String>,
    /// The node its driver runs on.
    pub node_id: String,
    /// Its driver's exit code.
    pub exit_code: i32,
    /// Why it failed.
    pub error: String,
    /// When it was submitted, milliseconds since the Unix epoch.
    pub submitted_ms: u64,
    /// When it ended (0 while it runs).
    pub finished_ms: u64,
    /// Task runs repeated after a worker or node died.
    pub task_retries: u32,
    /// What it waits for, when something of it cannot start: its driver, for a node or
    /// for room on one; or a task, actor or placement group asking for more than any
    /// node has (which waits until a node with enough joins). Empty otherwise.
    pub waiting: String,
}

impl From<proto::JobInfo> for JobStatus {
    fn from(j: proto::JobInfo) -> Self {
        Self {
            state: JobState::parse(&j.state),
            job_id: j.job_id,
            name: j.name,
            entrypoint: j.entrypoint,
            node_id: j.node_id,
            exit_code: j.exit_code,
            error: j.error,
            submitted_ms: j.submitted_ms,
            finished_ms: j.finished_ms,
            task_retries: j.task_retries,
            waiting: j.waiting,
        }
    }
}
