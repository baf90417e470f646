//! The head: node registry, scheduler, object directory and job manager.
//!
//! All cluster state lives in one [`State`] behind a lock; every event (a node joins, a
//! task is submitted or finishes, a node stops answering) changes it and then runs
//! [`State::schedule`], which places what can run now and pushes the commands to the
//! nodes' attached streams. Waiters (`Wait`, `WaitPlacementGroup`, log followers) sleep on
//! one `Notify` that every change wakes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, Notify};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use volley_common::{ErrorKind, ErrorReport, Result, VolleyError};

use super::head_store::HeadStore;
use super::metrics::{TaskEnd, TaskMetrics};
use super::net::{error_report, wire_error, wire_execution_error};
use super::package::{blob_chunks, check_manifest, digest_of, receive_blobs, BlobCache};
use super::proto::{self, node_command::Command, task_report::Outcome};
use super::resources::{GpuSlots, Resources};

/// A task of a job, as the head holds it (the dashboard's task list).
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobTask {
    /// Its id.
    pub task_id: String,
    /// Its name.
    pub name: String,
    /// `PENDING`, `RUNNING`, `DONE` or `FAILED`.
    pub state: String,
    /// Where it runs (or where its output is).
    pub node_id: String,
    /// Its attempt (0 for the first).
    pub attempt: u32,
    /// Why it failed for good.
    pub error: String,
}

/// How the head is run.
#[derive(Debug, Clone)]
pub struct HeadOptions {
    /// The folder for job packages and logs.
    pub state_dir: PathBuf,
    /// The cluster token.
    pub token: String,
    /// How often nodes heartbeat.
    pub heartbeat_interval: Duration,
    /// A node silent for this long is dead.
    pub node_timeout: Duration,
    /// Largest job package accepted.
    pub max_package_bytes: u64,
    /// Bytes of job files kept for later jobs (least recently used evicted; files of
    /// jobs not yet ended are always kept).
    pub package_cache_bytes: u64,
    /// Memory for copies of small objects kept beside their metadata (each at most
    /// 100 KiB; beyond this budget, small objects are read from their node like big
    /// ones).
    pub inline_memory: u64,
}

impl HeadOptions {
    /// Defaults: heartbeat every 500 ms, dead after 5 s of silence, packages up to 8 GiB,
    /// 16 GiB of cached package files.
    pub fn new(state_dir: PathBuf, token: String) -> Self {
        Self {
            state_dir,
            token,
            heartbeat_interval: Duration::from_millis(500),
            node_timeout: Duration::from_secs(5),
            max_package_bytes: 8 << 30,
            package_cache_bytes: 16 << 30,
            inline_memory: 256 << 20,
        }
    }
}

/// `(placement group, bundle index, group generation)` a task or actor runs in.
type BundleRef = (String, usize, u64);

type CommandTx = mpsc::UnboundedSender<std::result::Result<proto::NodeCommand, Status>>;

struct Node {
    hostname: String,
    object_address: String,
    total: Resources,
    available: Resources,
    gpus: GpuSlots,
    last_seen: Instant,
    alive: bool,
    tx: Option<CommandTx>,
    running: HashSet<String>,
    /// Tasks sent ahead of room (oldest first), not yet holding resources here.
    ahead: VecDeque<String>,
    /// Running CPU-only tasks holding resources here, by their CPUs (`f64` bits):
    /// the slots a task sent ahead may wait for.
    slots: HashMap<u64, usize>,
    object_bytes: u64,
    object_store_memory: u64,
    /// Bytes of the live objects the directory places here (current at every task's
    /// end, unlike `object_bytes`, which comes with heartbeats).
    stored: u64,
    spilled_bytes: u64,
    spilled_total: u64,
    workers: u32,
    /// Leaving the cluster: it gets no new work, and the objects only it holds are
    /// copied to other nodes before it goes.
    draining: bool,
}

impl Node {
    /// Whether new work (tasks, actors, drivers, group bundles, objects) may go here.
    fn takes_work(&self) -> bool {
        self.alive && self.tx.is_some() && !self.draining
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
        self.available.subtract(&task.resources);
        *self
            .slots
            .entry(task.resources.num_cpus.to_bits())
            .or_default() += 1;
        task.ahead = false;
    }

    fn send(&self, command: Command) -> bool {
        match &self.tx {
            Some(tx) if self.alive => tx
                .send(Ok(proto::NodeCommand {
                    command: Some(command),
                }))
                .is_ok(),
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

/// How many tasks may wait ahead on a node per running task of the same CPUs: two keep
/// a worker that finishes from waiting while the head's next one is on its way.
const AHEAD_PER_SLOT: usize = 2;

/// The tasks waiting for room, in submission order (retries first).
///
/// Tasks that ask for CPUs alone (no GPUs, memory, custom resources, placement group
/// or actor) wait apart from the rest: they compare by one number, so a scheduling
/// pass stops at the first such task that finds no room once no waiting one asks for
/// less (placing tasks only takes room away). A pass then costs what it places, not
/// the length of the queue: a driver that submits tens of thousands of small tasks
/// would otherwise pay for every one of them on every event.
#[derive(Default)]
struct TaskQueue {
    /// CPU-only tasks and the CPUs each asks for.
    cpu: VecDeque<(String, f64)>,
    /// At most the smallest request in `cpu` (reset when it empties).
    cpu_min: f64,
    /// Every other task.
    other: VecDeque<String>,
}

impl TaskQueue {
    fn push(&mut self, id: String, cpu_only: Option<f64>, first: bool) {
        match cpu_only {
            Some(c) => {
                if self.cpu.is_empty() {
                    self.cpu_min = c;
                }
                self.cpu_min = self.cpu_min.min(c);
                if first {
                    self.cpu.push_front((id, c));
                } else {
                    self.cpu.push_back((id, c));
                }
            }
            None if first => self.other.push_front(id),
            None => self.other.push_back(id),
        }
    }

    fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.cpu.retain(|(id, _)| keep(id));
        self.other.retain(|id| keep(id));
    }
}

struct TaskEntry {
    spec: proto::SubmitTaskRequest,
    resources: Resources,
    state: TaskState,
    attempt: u32,
    retries_left: u32,
    reconstructions: u32,
    /// Times it waited for an input that could not be read to be made again.
    input_losses: u32,
    /// `(group, bundle, generation)` whose reservation the running task uses.
    bundle: Option<BundleRef>,
    /// Sent to its node ahead of room: it holds no resources yet.
    ahead: bool,
    /// When it last became pending (a source waits for a store with room only so
    /// long: [`SOURCE_WAIT`]).
    pending_since: Instant,
    /// When its current attempt was sent to a node.
    sent_at: Instant,
}

/// Times a task may wait for an input it could not read to be made again (its node
/// died or was cut off) before such a loss uses one of its retries.
const MAX_INPUT_LOSSES: u32 = 8;

/// How long a task that reads nothing waits for a node whose store has room before it
/// goes where it fits: a full store's objects may be held for good (a materialized
/// dataset) while the nodes with room are taken by actors.
const SOURCE_WAIT: Duration = Duration::from_secs(2);

impl TaskEntry {
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
    fn cpu_only(&self) -> Option<f64> {
        let r = &self.resources;
        (self.spec.actor_id.is_empty()
            && self.spec.placement_group.is_empty()
            && r.num_gpus == 0.0
            && r.memory == 0
            && r.custom.is_empty())
        .then_some(r.num_cpus)
    }
}

fn actor_status(id: &str, a: &ActorEntry) -> proto::ActorStatus {
    let (state, node, error) = match &a.state {
        ActorState::Pending => ("PENDING", String::new(), String::new()),
        ActorState::Starting { node } => ("STARTING", node.clone(), String::new()),
        ActorState::Alive { node } => ("ALIVE", node.clone(), String::new()),
        ActorState::Dead(e) => ("DEAD", String::new(), e.clone()),
    };
    proto::ActorStatus {
        actor_id: id.to_string(),
        state: state.into(),
        node_id: node,
        restarts: a.restarts,
        error,
        pid: if state == "ALIVE" { a.pid } else { 0 },
        name: a.spec.name.clone(),
    }
}

/// A failure of the cluster's own (a lost worker, node or input) as an error report.
fn execution_report(message: impl Into<String>) -> ErrorReport {
    ErrorReport::new(ErrorKind::Execution, message)
}

/// Work that will not run because its job ended.
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
}

impl ObjectEntry {
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
        }
    }
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
    strategy: i32,
    bundles: Vec<BundleState>,
    ready: bool,
    generation: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum ActorState {
    Pending,
    Starting { node: String },
    Alive { node: String },
    Dead(String),
}

struct ActorEntry {
    spec: proto::CreateActorRequest,
    resources: Resources,
    state: ActorState,
    incarnation: u32,
    restarts: u32,
    gpus: Vec<u32>,
    bundle: Option<BundleRef>,
    /// Its worker process, once alive.
    pid: u32,
}

struct JobEntry {
    info: proto::JobInfo,
    /// Its logs.
    dir: PathBuf,
    package: proto::PackageManifest,
    last_alive: Instant,
    gpus: Vec<u32>,
    resources: Resources,
}

const TERMINAL: [&str; 3] = ["SUCCEEDED", "FAILED", "STOPPED"];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything the head knows.
#[derive(Default)]
struct State {
    next_node: u64,
    next_job: u64,
    nodes: BTreeMap<String, Node>,
    tasks: HashMap<String, TaskEntry>,
    queue: TaskQueue,
    objects: HashMap<String, ObjectEntry>,
    groups: HashMap<String, Group>,
    actors: HashMap<String, ActorEntry>,
    jobs: BTreeMap<String, JobEntry>,
    /// Copies of objects off draining nodes on their way: object → target node.
    copies: HashMap<String, String>,
    /// Dataset executions of each job as their drivers last reported them (the last
    /// few per job).
    executions: HashMap<String, Vec<proto::ExecutionProgress>>,
    /// Bytes of the inline copies held, and the most they may take.
    inline_bytes: u64,
    inline_limit: u64,
    /// Whether CPU-only tasks may be sent to nodes ahead of room in this scheduling
    /// pass: not while an actor, a driver, a placement group or a task asking for
    /// more than CPUs waits, since tasks ahead take freed CPUs first.
    ahead_allowed: bool,
    /// Tasks' ends and durations, for `/metrics`.
    task_metrics: TaskMetrics,
}

/// The head's state and the signal its waiters sleep on.
pub struct HeadCore {
    state: Mutex<State>,
    changed: Notify,
    options: HeadOptions,
    /// Job files, once per digest.
    blobs: BlobCache,
    /// Jobs and counters kept across restarts.
    store: HeadStore,
    /// Held while a snapshot of the jobs is taken and written.
    persisting: Mutex<()>,
    /// Worker-log queries sent to nodes and waiting for their answers, by query id.
    log_queries: Mutex<HashMap<u64, mpsc::UnboundedSender<proto::LogReply>>>,
    next_query: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for HeadCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadCore").finish_non_exhaustive()
    }
}

impl HeadCore {
    /// A head with no nodes.
    /// A head keeping its files in `options.state_dir`, with the jobs a head before it
    /// kept there: finished ones as they were; one that was waiting or running starts
    /// again from the beginning (its driver went with the nodes' connections); one
    /// whose program joined the cluster itself has failed. Fails, saying why, if it
    /// cannot open its store or package cache there.
    pub fn new(options: HeadOptions) -> Result<Arc<Self>> {
        let blobs = BlobCache::open(
            options.state_dir.join("packages"),
            options.package_cache_bytes,
        )?;
        let (store, recovered) = HeadStore::open(&options.state_dir.join("head.redb"))?;
        let mut state = State {
            inline_limit: options.inline_memory,
            next_node: recovered.next_node,
            next_job: recovered.next_job,
            ..State::default()
        };
        for job in recovered.jobs {
            let mut info = job.info.unwrap_or_default();
            if !TERMINAL.contains(&info.state.as_str()) {
                if info.attached {
                    info.state = "FAILED".into();
                    info.error = "the head restarted; a program that joined the cluster \
                                  itself does not survive that"
                        .into();
                    info.finished_ms = now_ms();
                } else {
                    info!("job {}: starts again (the head restarted)", info.job_id);
                    info.state = "PENDING".into();
                    info.node_id.clear();
                }
            }
            let dir = options.state_dir.join("jobs").join(&info.job_id);
            state.jobs.insert(
                info.job_id.clone(),
                JobEntry {
                    resources: info.resources.clone().into(),
                    info,
                    dir,
                    package: job.package.unwrap_or_default(),
                    last_alive: Instant::now(),
                    gpus: vec![],
                },
            );
        }
        let core = Arc::new(Self {
            state: Mutex::new(state),
            changed: Notify::new(),
            blobs,
            store,
            persisting: Mutex::new(()),
            log_queries: Mutex::default(),
            next_query: Default::default(),
            options,
        });
        // After the jobs are back: the files of those that start again stay.
        core.evict_packages(&[]);
        Ok(core)
    }

    /// Writes what changed of the jobs and counters to the store.
    fn persist(&self) -> Result<()> {
        use prost::Message;
        // One writer at a time, snapshot to commit: an older snapshot never lands last.
        let _one = self.persisting.lock().expect("persist lock");
        let (jobs, next_node, next_job) = {
            let s = self.state.lock().expect("head lock");
            let jobs = s
                .jobs
                .iter()
                .map(|(id, j)| {
                    let stored = proto::StoredJob {
                        info: Some(j.info.clone()),
                        package: Some(j.package.clone()),
                    };
                    (id.clone(), stored.encode_to_vec())
                })
                .collect();
            (jobs, s.next_node, s.next_job)
        };
        self.store.save(jobs, next_node, next_job)
    }

    /// Writes what changes to the store, a few times a second, for as long as the head
    /// runs.
    pub async fn persist_loop(self: Arc<Self>) {
        loop {
            self.changed_within(Duration::from_millis(250)).await;
            let core = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || core.persist()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("{e}"),
                Err(e) => warn!("persisting the head's state: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evicts cached package files past the limit, keeping those of jobs not ended
    /// and `also` (files just received for a job about to be submitted).
    fn evict_packages(&self, also: &[String]) {
        let keep = {
            let s = self.state.lock().expect("head lock");
            s.jobs
                .values()
                .filter(|j| !TERMINAL.contains(&j.info.state.as_str()))
                .flat_map(|j| j.package.files.iter().map(|f| f.digest.clone()))
                .chain(also.iter().cloned())
                .collect()
        };
        let removed = self.blobs.evict(&keep);
        if removed > 0 {
            info!(
                "package cache: evicted {}",
                volley_common::format_bytes(removed)
            );
        }
    }

    /// The options it runs with.
    pub fn options(&self) -> &HeadOptions {
        &self.options
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = {
            let mut s = self.state.lock().expect("head lock");
            let out = f(&mut s);
            s.schedule();
            out
        };
        self.changed.notify_waiters();
        out
    }

    /// Checks heartbeats and attached drivers; runs until the process ends.
    pub async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let timeout = self.options.node_timeout;
            self.with(|s| {
                let dead: Vec<String> = s
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.alive && n.last_seen.elapsed() > timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in dead {
                    warn!("node {id} missed its heartbeats for {timeout:?}: declared dead");
                    s.node_died(&id);
                }
                let gone: Vec<String> = s
                    .jobs
                    .iter()
                    .filter(|(_, j)| {
                        j.info.attached
                            && j.info.state == "RUNNING"
                            && j.last_alive.elapsed() > timeout
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in gone {
                    s.finish_job(&id, "FAILED", -1, "the driver stopped answering");
                }
            });
        }
    }

    // ------------------------------------------------------------------ jobs

    fn new_job_id(&self) -> String {
        let mut s = self.state.lock().expect("head lock");
        s.next_job += 1;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        format!("job-{:04}-{suffix}", s.next_job)
    }

    /// Registers a job whose package's files the head has; returns its id.
    fn add_job(&self, mut spec: proto::JobSpec) -> std::result::Result<String, Status> {
        if spec.entrypoint.is_empty() {
            return Err(Status::invalid_argument("the job has no entrypoint"));
        }
        let resources: Resources = spec.resources.clone().into();
        resources.validate().map_err(invalid)?;
        let package = spec.package.take().unwrap_or_default();
        check_manifest(&package, self.options.max_package_bytes).map_err(invalid)?;
        if let Some(f) = package.files.iter().find(|f| !self.blobs.has(&f.digest)) {
            return Err(Status::failed_precondition(format!(
                "package file {}: its contents (digest {}) are not on the head; upload them first",
                f.path, f.digest
            )));
        }
        let id = self.new_job_id();
        let dir = self.options.state_dir.join("jobs").join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| Status::internal(e.to_string()))?;
        self.with(|s| {
            let state = if spec.attached { "RUNNING" } else { "PENDING" };
            info!("job {id}: {:?} ({state})", spec.entrypoint);
            s.jobs.insert(
                id.to_string(),
                JobEntry {
                    info: proto::JobInfo {
                        job_id: id.to_string(),
                        name: spec.name.clone(),
                        state: state.into(),
                        entrypoint: spec.entrypoint.clone(),
                        submitted_ms: now_ms(),
                        env: spec.env.clone(),
                        attached: spec.attached,
                        resources: spec.resources.clone(),
                        ..Default::default()
                    },
                    dir,
                    package,
                    last_alive: Instant::now(),
                    gpus: vec![],
                    resources,
                },
            );
            // The nodes get the job's package and workers ready meanwhile.
            for n in s.nodes.values().filter(|n| n.takes_work()) {
                n.send(Command::PrepareJob(id.clone()));
            }
        });
        // Kept before it is acknowledged: a head killed now still has it.
        if let Err(e) = self.persist() {
            warn!("{e}");
        }
        Ok(id)
    }

    /// Creates a job from files already in memory (the HTTP API): `(path, mode, bytes)`.
    pub fn submit_job_files(
        &self,
        mut spec: proto::JobSpec,
        files: Vec<(String, u32, Vec<u8>)>,
    ) -> Result<String> {
        let mut package = proto::PackageManifest::default();
        for (path, mode, data) in &files {
            package.files.push(proto::PackageFile {
                path: path.clone(),
                mode: *mode,
                size: data.len() as u64,
                digest: digest_of(data),
            });
        }
        check_manifest(&package, self.options.max_package_bytes)?;
        for (_, _, data) in &files {
            self.blobs.insert(data)?;
        }
        let digests: Vec<String> = package.files.iter().map(|f| f.digest.clone()).collect();
        self.evict_packages(&digests);
        spec.package = Some(package);
        self.add_job(spec)
            .map_err(|e| VolleyError::plan(e.message().to_string()))
    }

    /// The Dataset executions job `id`'s driver reported (the last few).
    pub fn job_executions(&self, id: &str) -> Result<Vec<super::jobs::ExecutionProgress>> {
        let s = self.state.lock().expect("head lock");
        if !s.jobs.contains_key(id) {
            return Err(VolleyError::plan(format!("no job {id}")));
        }
        Ok(s.executions
            .get(id)
            .map(|l| l.iter().cloned().map(Into::into).collect())
            .unwrap_or_default())
    }

    /// The tasks of job `id` the head holds (waiting, running, or done with their
    /// objects still in use), at most 2,000.
    pub fn job_tasks(&self, id: &str) -> Result<Vec<JobTask>> {
        let s = self.state.lock().expect("head lock");
        if !s.jobs.contains_key(id) {
            return Err(VolleyError::plan(format!("no job {id}")));
        }
        let mut out: Vec<JobTask> = s
            .tasks
            .iter()
            .filter(|(_, t)| t.spec.job_id == id)
            .take(2000)
            .map(|(tid, t)| {
                let error = s
                    .objects
                    .get(tid)
                    .and_then(|o| o.error.as_ref())
                    .map(|e| e.message.clone())
                    .unwrap_or_default();
                let (state, node_id) = match &t.state {
                    TaskState::Pending => ("PENDING", String::new()),
                    TaskState::Running { node, .. } => ("RUNNING", node.clone()),
                    TaskState::Failed => ("FAILED", String::new()),
                    TaskState::Done if !error.is_empty() => ("FAILED", String::new()),
                    TaskState::Done => (
                        "DONE",
                        s.objects
                            .get(tid)
                            .and_then(|o| o.locations.first().cloned())
                            .unwrap_or_default(),
                    ),
                };
                JobTask {
                    task_id: tid.clone(),
                    name: t.spec.name.clone(),
                    state: state.into(),
                    node_id,
                    attempt: t.attempt,
                    error,
                }
            })
            .collect();
        out.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        Ok(out)
    }

    /// A job's record.
    pub fn job(&self, id: &str) -> Result<proto::JobInfo> {
        let s = self.state.lock().expect("head lock");
        s.jobs
            .get(id)
            .map(|j| j.info.clone())
            .ok_or_else(|| VolleyError::plan(format!("no job {id}")))
    }

    /// The actors of job `id` (alive or not), by id.
    pub fn job_actors(&self, id: &str) -> Result<Vec<proto::ActorStatus>> {
        let s = self.state.lock().expect("head lock");
        if !s.jobs.contains_key(id) {
            return Err(VolleyError::plan(format!("no job {id}")));
        }
        let mut actors: Vec<proto::ActorStatus> = s
            .actors
            .iter()
            .filter(|(_, a)| a.spec.job_id == id)
            .map(|(aid, a)| actor_status(aid, a))
            .collect();
        actors.sort_by(|a, b| a.actor_id.cmp(&b.actor_id));
        Ok(actors)
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> Vec<proto::JobInfo> {
        let s = self.state.lock().expect("head lock");
        s.jobs.values().map(|j| j.info.clone()).collect()
    }

    /// Stops a job: its driver and tasks are killed and its objects freed.
    pub fn stop_job(&self, id: &str) -> Result<proto::JobInfo> {
        self.with(|s| {
            if !s.jobs.contains_key(id) {
                return Err(VolleyError::plan(format!("no job {id}")));
            }
            s.finish_job(id, "STOPPED", -1, "stopped by request");
            Ok(s.jobs[id].info.clone())
        })
    }

    /// The job's log from `offset`: `(bytes, job finished)`.
    pub fn job_log(&self, id: &str, offset: u64) -> Result<(Vec<u8>, bool)> {
        let (path, done) = {
            let s = self.state.lock().expect("head lock");
            let j = s
                .jobs
                .get(id)
                .ok_or_else(|| VolleyError::plan(format!("no job {id}")))?;
            (
                j.dir.join("driver.log"),
                TERMINAL.contains(&j.info.state.as_str()),
            )
        };
        let data = match std::fs::read(&path) {
            Ok(d) => d
                .get(offset as usize..)
                .map(|s| s.to_vec())
                .unwrap_or_default(),
            Err(_) => vec![],
        };
        Ok((data, done))
    }

    /// The cluster in Prometheus' text format (the head's `/metrics`).
    pub fn metrics(&self) -> String {
        let status = self.status();
        let jobs = self.jobs();
        let tasks = self.state.lock().expect("head lock").task_metrics.clone();
        let packages = super::metrics::PackageFigures {
            cached: self.blobs.size(),
            received: self.blobs.received_bytes(),
        };
        let running: Vec<proto::ExecutionProgress> = {
            let s = self.state.lock().expect("head lock");
            s.executions
                .iter()
                .filter(|(job, _)| s.jobs.get(*job).is_some_and(|j| j.info.state == "RUNNING"))
                .flat_map(|(_, list)| list.iter().filter(|e| !e.finished).cloned())
                .collect()
        };
        super::metrics::render(&status, &jobs, &tasks, &packages, &running)
    }

    /// The cluster's nodes and load.
    pub fn status(&self) -> proto::ClusterStatus {
        let s = self.state.lock().expect("head lock");
        proto::ClusterStatus {
            nodes: s
                .nodes
                .iter()
                .map(|(id, n)| proto::NodeInfo {
                    node_id: id.clone(),
                    hostname: n.hostname.clone(),
                    object_address: n.object_address.clone(),
                    alive: n.alive,
                    draining: n.draining,
                    total: Some((&n.total).into()),
                    available: Some((&n.available).into()),
                    object_store_bytes: n.object_bytes,
                    spilled_bytes: n.spilled_bytes,
                    spilled_total: n.spilled_total,
                    workers: n.workers,
                    running_tasks: n.running.len() as u32,
                    object_store_memory: n.object_store_memory,
                })
                .collect(),
            pending_tasks: s
                .tasks
                .values()
                .filter(|t| t.state == TaskState::Pending)
                .count() as u32,
            running_tasks: s
                .tasks
                .values()
                .filter(|t| matches!(t.state, TaskState::Running { .. }))
                .count() as u32,
            running_jobs: s
                .jobs
                .values()
                .filter(|j| j.info.state == "RUNNING")
                .count() as u32,
            objects: s.objects.len() as u32,
        }
    }

    /// Looks at the state with `check` until it says done or `deadline` passes, waking
    /// on every change; returns what `check` saw last.
    async fn wait_until<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&State, bool) -> std::result::Result<(T, bool), Status>,
    ) -> std::result::Result<T, Status> {
        loop {
            // Registered before looking, so a change in between is not missed.
            let notified = self.changed.notified();
            let now = Instant::now();
            // `check` learns whether this is its last look (it may answer less
            // thoroughly until then).
            let (seen, done) = check(&self.state.lock().expect("head lock"), now >= deadline)?;
            if done || now >= deadline {
                return Ok(seen);
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    /// Waits until the state changes or `timeout` passes.
    async fn changed_within(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }
}

impl State {
    fn object_addresses(&self, id: &str) -> Vec<String> {
        self.objects
            .get(id)
            .map(|o| {
                o.locations
                    .iter()
                    .filter_map(|n| self.nodes.get(n).filter(|n| n.alive))
                    .map(|n| n.object_address.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether object `o` has a live copy.
    fn object_ready(&self, o: &ObjectEntry) -> bool {
        o.locations
            .iter()
            .any(|n| self.nodes.get(n).is_some_and(|n| n.alive))
    }

    /// What a waiting driver learns of object `id`.
    fn object_status(&self, id: &str) -> proto::ObjectStatus {
        match self.objects.get(id) {
            None => proto::ObjectStatus {
                object_id: id.to_string(),
                ready: false,
                error: Some(wire_execution_error(format!(
                    "object {id} is unknown (freed, or its job ended)"
                ))),
                location: None,
            },
            Some(o) => {
                let addresses = self.object_addresses(id);
                let ready = !addresses.is_empty();
                proto::ObjectStatus {
                    object_id: id.to_string(),
                    ready,
                    error: o.error.as_ref().map(wire_error),
                    location: Some(proto::ObjectLocation {
                        object_id: id.to_string(),
                        addresses,
                        bytes: o.bytes,
                        rows: o.rows,
                        inline: o.inline.clone().filter(|_| ready).unwrap_or_default(),
                        batch: None,
                    }),
                }
            }
        }
    }

    /// Refuses work for a job that is not running (ended, stopped, or unknown).
    fn require_running(&self, job: &str) -> std::result::Result<(), Status> {
        if self.job_active(job) {
            Ok(())
        } else {
            Err(Status::failed_precondition(format!(
                "job {job} is not running"
            )))
        }
    }

    fn job_active(&self, job: &str) -> bool {
        self.jobs
            .get(job)
            .is_some_and(|j| j.info.state == "RUNNING")
    }

    /// Places whatever can run now.
    fn schedule(&mut self) {
        self.promote_ahead();
        self.place_groups();
        self.place_drivers();
        self.place_actors();
        let other = std::mem::take(&mut self.queue.other);
        for id in other {
            if !self.try_start(&id) {
                self.queue.other.push_back(id);
            }
        }
        self.ahead_allowed = self.queue.other.is_empty()
            && !self.actors.values().any(|a| a.state == ActorState::Pending)
            && !self.jobs.values().any(|j| j.info.state == "PENDING")
            && !self
                .groups
                .values()
                .any(|g| !g.ready && self.job_active(&g.job));
        // The smallest CPU-only request that found no room in this pass: a task asking
        // at least as much cannot fit either.
        let mut no_room_at = f64::INFINITY;
        let mut passed = Vec::new();
        while let Some((id, cpus)) = self.queue.cpu.pop_front() {
            if no_room_at <= self.queue.cpu_min {
                self.queue.cpu.push_front((id, cpus));
                break;
            }
            if cpus >= no_room_at {
                passed.push((id, cpus));
                continue;
            }
            if !self.try_start(&id) {
                // A source kept off a full store says nothing of the CPUs.
                if self
                    .tasks
                    .get(&id)
                    .is_some_and(|t| self.inputs_ready(t) && !self.kept_off_full_store(t))
                {
                    no_room_at = no_room_at.min(cpus);
                }
                passed.push((id, cpus));
            }
        }
        for q in passed.into_iter().rev() {
            self.queue.cpu.push_front(q);
        }
    }

    /// Puts task `id` in the queue, first (a retry) or last.
    fn enqueue(&mut self, id: String, first: bool) {
        let cpu_only = self.tasks.get(&id).and_then(TaskEntry::cpu_only);
        self.queue.push(id, cpu_only, first);
    }

    /// Whether every input of `task` has a live copy.
    fn inputs_ready(&self, task: &TaskEntry) -> bool {
        task.spec
            .args
            .iter()
            .all(|a| !self.object_addresses(a).is_empty())
    }

    /// Starts task `id` if it can run; returns true when it left the queue.
    fn try_start(&mut self, id: &str) -> bool {
        let Some(task) = self.tasks.get(id) else {
            return true;
        };
        if task.state != TaskState::Pending {
            return true;
        }
        if !self.job_active(&task.spec.job_id) {
            self.fail_task(id, cancelled_report("its job is not running"));
            return true;
        }
        // Inputs: all present, or one failed for good.
        let mut args = Vec::new();
        for (i, a) in task.spec.args.iter().enumerate() {
            let batch = task
                .spec
                .arg_batches
                .get(i)
                .and_then(|b| u32::try_from(*b).ok());
            match self.objects.get(a) {
                None => {
                    self.fail_task(
                        id,
                        execution_report(format!("input object {a} was freed or never existed")),
                    );
                    return true;
                }
                Some(o) if o.error.is_some() => {
                    let e = o
                        .error
                        .clone()
                        .unwrap_or_else(|| execution_report(""))
                        .with_context(format!("input object {a} failed"));
                    self.fail_task(id, e);
                    return true;
                }
                Some(o) => {
                    let addresses = self.object_addresses(a);
                    if addresses.is_empty() {
                        return false;
                    }
                    args.push(proto::ObjectLocation {
                        object_id: a.clone(),
                        addresses,
                        bytes: o.bytes,
                        rows: o.rows,
                        inline: o.inline.clone().unwrap_or_default(),
                        batch,
                    });
                }
            }
        }
        let task = &self.tasks[id];
        // Actor calls go where the actor lives; it holds the resources.
        if !task.spec.actor_id.is_empty() {
            let node = match self.actors.get(&task.spec.actor_id).map(|a| &a.state) {
                Some(ActorState::Alive { node }) => node.clone(),
                Some(ActorState::Dead(e)) => {
                    let e = format!("actor {} is dead: {e}", task.spec.actor_id);
                    self.fail_task(id, execution_report(e));
                    return true;
                }
                None => {
                    let e = format!("no actor {}", task.spec.actor_id);
                    self.fail_task(id, execution_report(e));
                    return true;
                }
                _ => return false,
            };
            let gpus = self.actors[&task.spec.actor_id].gpus.clone();
            return self.dispatch(id, node, gpus, None, args, false);
        }
        let resources = task.resources.clone();
        let cpu_only = task.cpu_only().filter(|c| *c > 0.0 && self.ahead_allowed);
        let arg_ids: Vec<String> = task.spec.args.clone();
        let source = self.waits_for_store(task);
        let placement = if task.spec.placement_group.is_empty() {
            self.pick_node(&resources, &arg_ids, &HashMap::new(), source)
                .map(|(node, gpus)| (node, gpus, None))
        } else {
            let group = task.spec.placement_group.clone();
            let index = task.spec.bundle_index;
            self.take_from_bundle(&group, index, &resources)
        };
        if let Some((node, gpus, bundle)) = placement {
            return self.dispatch(id, node, gpus, bundle, args, false);
        }
        match cpu_only.and_then(|_| self.pick_ahead(&resources, source)) {
            Some(node) => self.dispatch(id, node, vec![], None, args, true),
            None => false,
        }
    }

    /// A node to send a CPU-only task to ahead of room: one with fewer tasks of the
    /// same CPUs waiting ahead than [`AHEAD_PER_SLOT`] per running task of those CPUs
    /// (the fewest waiting first). A worker that finishes such a task takes one ahead
    /// over at once, instead of idling while its report goes to the head and the next
    /// task comes back. Only tasks that will end count (not actors, drivers or
    /// placement groups), and a slot they free goes to the tasks ahead first
    /// ([`Self::promote_ahead`] runs before any other placement), so a task ahead
    /// never waits on something that holds its room for good.
    fn pick_ahead(&self, req: &Resources, source: bool) -> Option<String> {
        let key = req.num_cpus.to_bits();
        self.nodes
            .iter()
            .filter(|(_, n)| n.takes_work() && !(source && n.store_full()))
            .filter_map(|(id, n)| {
                let slots = n.slots.get(&key).copied().unwrap_or(0);
                let waiting = n
                    .ahead
                    .iter()
                    .filter(|a| {
                        self.tasks
                            .get(*a)
                            .is_some_and(|t| t.resources.num_cpus.to_bits() == key)
                    })
                    .count();
                (waiting < AHEAD_PER_SLOT * slots).then_some((n.ahead.len(), id))
            })
            .min()
            .map(|(_, id)| id.clone())
    }

    /// Gives tasks sent ahead the room their nodes now have, oldest first.
    fn promote_ahead(&mut self) {
        for n in self.nodes.values_mut().filter(|n| !n.ahead.is_empty()) {
            while let Some(id) = n.ahead.front() {
                let Some(task) = self.tasks.get_mut(id) else {
                    n.ahead.pop_front();
                    continue;
                };
                if !task.resources.fits_in(&n.available) {
                    break;
                }
                n.hold_slot(task);
                let id = n.ahead.pop_front().expect("front exists");
                n.send(Command::PromoteTask(id));
            }
        }
    }

    /// Task `successor`, sent ahead, took over the slot of a task that just left
    /// `node`: it now holds the resources that task gave back.
    fn take_over(&mut self, node: &str, successor: &str) {
        let Some(task) = self.tasks.get_mut(successor) else {
            return;
        };
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        let running_here = matches!(&task.state, TaskState::Running { node: at, .. } if at == node);
        if !task.ahead || !running_here || !task.resources.fits_in(&n.available) {
            return;
        }
        n.hold_slot(task);
        n.ahead.retain(|a| a != successor);
    }

    fn dispatch(
        &mut self,
        id: &str,
        node: String,
        gpus: Vec<u32>,
        bundle: Option<BundleRef>,
        args: Vec<proto::ObjectLocation>,
        ahead: bool,
    ) -> bool {
        let task = self.tasks.get_mut(id).expect("task exists");
        task.ahead = ahead;
        task.sent_at = Instant::now();
        let slot = task.slot(ahead, &bundle);
        task.state = TaskState::Running {
            node: node.clone(),
            gpus: gpus.clone(),
        };
        task.bundle = bundle;
        let assignment = proto::TaskAssignment {
            task_id: id.to_string(),
            attempt: task.attempt,
            job_id: task.spec.job_id.clone(),
            payload: task.spec.payload.clone(),
            args,
            gpu_ids: gpus,
            actor_id: task.spec.actor_id.clone(),
            name: task.spec.name.clone(),
            ahead,
            num_cpus: task.resources.num_cpus,
        };
        let n = self.nodes.get_mut(&node).expect("placed on a known node");
        n.running.insert(id.to_string());
        if ahead {
            n.ahead.push_back(id.to_string());
        }
        if let Some(key) = slot {
            *n.slots.entry(key).or_default() += 1;
        }
        if !n.send(Command::RunTask(assignment)) {
            // The node went away between placement and now; the death handling will
            // requeue it.
            warn!("node {node} did not take task {id}");
        }
        true
    }

    /// Whether `task` is a source that [waits for a store](Self::waits_for_store) and
    /// would fit now on a node whose store is full (so it found no room for that
    /// reason, not for lack of CPUs).
    fn kept_off_full_store(&self, task: &TaskEntry) -> bool {
        self.waits_for_store(task)
            && self
                .nodes
                .values()
                .any(|n| n.takes_work() && n.store_full() && task.resources.fits_in(&n.available))
    }

    /// Whether `task` reads nothing (a source) and waits, for a while, for a node whose
    /// store has room rather than fill a [full](Node::store_full) one: while it has
    /// waited less than [`SOURCE_WAIT`] and some live node it could fit on has room.
    fn waits_for_store(&self, task: &TaskEntry) -> bool {
        task.spec.args.is_empty()
            && task.pending_since.elapsed() < SOURCE_WAIT
            && self
                .nodes
                .values()
                .any(|n| n.takes_work() && !n.store_full() && task.resources.fits_in(&n.total))
    }

    /// The best node for a task: one where it fits (for a `source`, a task that reads
    /// nothing, one whose store is not [full](Node::store_full)), holding most of its
    /// input bytes, then the one with the fewest of `crowd` (a count per node of what
    /// should spread), then the one whose object store is least full (by quarters of
    /// its memory: the task's output will be stored there, and a full store spills),
    /// then the one with the most CPUs free (spreading load).
    fn pick_node(
        &mut self,
        req: &Resources,
        args: &[String],
        crowd: &HashMap<String, usize>,
        source: bool,
    ) -> Option<(String, Vec<u32>)> {
        let mut best: Option<(u64, usize, u64, f64, String)> = None;
        for (id, n) in &self.nodes {
            if !n.takes_work() || !req.fits_in(&n.available) {
                continue;
            }
            if source && n.store_full() {
                continue;
            }
            if req.num_gpus > 0.0 && n.gpus.clone().take(req.num_gpus).is_none() {
                continue;
            }
            let local: u64 = args
                .iter()
                .filter_map(|a| self.objects.get(a))
                .filter(|o| o.locations.contains(id))
                .map(|o| o.bytes)
                .sum();
            let free = n.available.num_cpus / n.total.num_cpus.max(1e-9);
            let many = crowd.get(id).copied().unwrap_or(0);
            let full = n.stored.saturating_mul(4) / n.object_store_memory.max(1);
            let better = match &best {
                None => true,
                Some((l, m, q, f, _)) => {
                    local > *l
                        || (local == *l && many < *m)
                        || (local == *l && many == *m && full < *q)
                        || (local == *l && many == *m && full == *q && free > *f + 1e-9)
                }
            };
            if better {
                best = Some((local, many, full, free, id.clone()));
            }
        }
        let (_, _, _, _, id) = best?;
        let n = self.nodes.get_mut(&id)?;
        let gpus = n.gpus.take(req.num_gpus)?;
        n.available.subtract(req);
        Some((id, gpus))
    }

    fn take_from_bundle(
        &mut self,
        group: &str,
        index: i32,
        req: &Resources,
    ) -> Option<(String, Vec<u32>, Option<BundleRef>)> {
        let g = self.groups.get_mut(group)?;
        if !g.ready {
            return None;
        }
        let candidates: Vec<usize> = if index >= 0 {
            vec![index as usize]
        } else {
            (0..g.bundles.len()).collect()
        };
        for i in candidates {
            let Some(b) = g.bundles.get_mut(i) else {
                continue;
            };
            if !req.fits_in(&b.available) {
                continue;
            }
            let Some(gpus) = b.gpus.take(req.num_gpus) else {
                continue;
            };
            b.available.subtract(req);
            let node = b.node.clone()?;
            if !self.nodes.get(&node).is_some_and(|n| n.takes_work()) {
                let b = &mut g.bundles[i];
                b.available.add(req);
                b.gpus.give(&gpus, req.num_gpus);
                return None;
            }
            return Some((node, gpus, Some((group.to_string(), i, g.generation))));
        }
        None
    }

    /// Gives a running task's (or actor's) resources back to its node or bundle.
    fn release(&mut self, node: &str, req: &Resources, gpus: &[u32], bundle: &Option<BundleRef>) {
        match bundle {
            Some((g, i, generation)) => {
                if let Some(b) = self
                    .groups
                    .get_mut(g)
                    .filter(|g| g.generation == *generation)
                    .and_then(|g| g.bundles.get_mut(*i))
                {
                    b.available.add(req);
                    b.gpus.give(gpus, req.num_gpus);
                }
            }
            None => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.available.add(req);
                    n.gpus.give(gpus, req.num_gpus);
                }
            }
        }
    }

    fn finish_running(&mut self, id: &str) -> Option<String> {
        let task = self.tasks.get_mut(id)?;
        let TaskState::Running { node, gpus } = task.state.clone() else {
            return None;
        };
        task.state = TaskState::Pending;
        task.pending_since = Instant::now();
        let req = task.resources.clone();
        let bundle = task.bundle.take();
        let is_call = !task.spec.actor_id.is_empty();
        let ahead = std::mem::take(&mut task.ahead);
        let slot = task.slot(ahead, &bundle);
        if let Some(n) = self.nodes.get_mut(&node) {
            n.running.remove(id);
            if ahead {
                n.ahead.retain(|a| a != id);
            }
            if let Some(key) = slot {
                if let Some(c) = n.slots.get_mut(&key) {
                    *c = c.saturating_sub(1);
                }
            }
        }
        if !is_call && !ahead {
            self.release(&node, &req, &gpus, &bundle);
        }
        Some(node)
    }

    /// Queues a submitted task.
    fn submit(&mut self, spec: proto::SubmitTaskRequest) -> Result<()> {
        let resources: Resources = spec.resources.clone().into();
        resources.validate()?;
        if !self.job_active(&spec.job_id) {
            return Err(
                VolleyError::Cancelled.context(format!("job {} is not running", spec.job_id))
            );
        }
        if self.tasks.contains_key(&spec.task_id) {
            return Err(VolleyError::plan(format!("task {} exists", spec.task_id)));
        }
        if !spec.placement_group.is_empty() && !self.groups.contains_key(&spec.placement_group) {
            return Err(VolleyError::plan(format!(
                "no placement group {}",
                spec.placement_group
            )));
        }
        for a in &spec.args {
            if let Some(o) = self.objects.get_mut(a) {
                o.users += 1;
            }
        }
        self.objects.insert(
            spec.task_id.clone(),
            ObjectEntry::new(&spec.job_id, Some(spec.task_id.clone()), vec![], 0, 0),
        );
        let id = spec.task_id.clone();
        self.tasks.insert(
            id.clone(),
            TaskEntry {
                retries_left: spec.max_retries,
                spec,
                resources,
                state: TaskState::Pending,
                attempt: 0,
                reconstructions: 0,
                input_losses: 0,
                bundle: None,
                ahead: false,
                pending_since: Instant::now(),
                sent_at: Instant::now(),
            },
        );
        self.enqueue(id, false);
        Ok(())
    }

    /// Takes in a task's report; false when it was not of the attempt the head waits
    /// for (a late report from a node declared dead, or from an attempt already
    /// retried): it is dropped, and its sender told to undo what it left behind.
    fn task_reported(&mut self, mut r: proto::TaskReport) -> bool {
        let current = self.tasks.get(&r.task_id).is_some_and(|t| {
            t.attempt == r.attempt
                && matches!(&t.state, TaskState::Running { node, .. } if *node == r.node_id)
        });
        if !current {
            return false;
        }
        let successor = std::mem::take(&mut r.successor);
        match Outcome::try_from(r.outcome).unwrap_or(Outcome::SystemFailure) {
            Outcome::Ok => self.task_done(
                &r.task_id,
                &r.node_id,
                r.output_bytes,
                r.output_rows,
                r.inline,
            ),
            Outcome::Failed => {
                let e = r.error.as_ref().map(error_report);
                self.fail_task(&r.task_id, e.unwrap_or_else(|| execution_report("failed")))
            }
            Outcome::SystemFailure => {
                let e = r.error.as_ref().map(|e| e.message.clone());
                let e = e.unwrap_or_default();
                if r.unreadable.is_empty() {
                    self.system_failure(&r.task_id, &e)
                } else {
                    self.inputs_unreadable(&r.task_id, &r.unreadable, &e)
                }
            }
        }
        if !successor.is_empty() {
            self.take_over(&r.node_id, &successor);
        }
        true
    }

    fn task_done(&mut self, id: &str, node: &str, bytes: u64, rows: u64, inline: bytes::Bytes) {
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.state = TaskState::Done;
        self.task_metrics.ended(
            TaskEnd::Succeeded,
            Some(task.sent_at.elapsed().as_secs_f64()),
        );
        let args = task.spec.args.clone();
        if let Some(o) = self.objects.get_mut(id) {
            for old in &o.locations {
                if let Some(n) = self.nodes.get_mut(old) {
                    n.stored = n.stored.saturating_sub(o.bytes);
                }
            }
            if let Some(n) = self.nodes.get_mut(node) {
                n.stored += bytes;
            }
            o.locations = vec![node.to_string()];
            o.bytes = bytes;
            o.rows = rows;
            o.error = None;
            let old = o.inline.take().map_or(0, |b| b.len() as u64);
            self.inline_bytes -= old;
            if !inline.is_empty() && self.inline_bytes + inline.len() as u64 <= self.inline_limit {
                self.inline_bytes += inline.len() as u64;
                o.inline = Some(inline);
            }
        }
        self.release_args(&args);
        if self.objects.get(id).is_some_and(|o| o.freed) {
            self.try_delete(id);
        }
    }

    fn fail_task(&mut self, id: &str, error: ErrorReport) {
        if matches!(
            self.tasks.get(id).map(|t| &t.state),
            None | Some(TaskState::Done | TaskState::Failed)
        ) {
            return;
        }
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.state = TaskState::Failed;
        self.task_metrics.ended(TaskEnd::Failed, None);
        let args = task.spec.args.clone();
        if let Some(o) = self.objects.get_mut(id) {
            o.error = Some(error);
        }
        self.release_args(&args);
        if self.objects.get(id).is_some_and(|o| o.freed) {
            self.try_delete(id);
        }
    }

    /// A task's worker or node died, or its input vanished: run it again if it may.
    fn system_failure(&mut self, id: &str, error: &str) {
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if task.retries_left == 0 {
            let e = execution_report(format!("{error} (no retries left)"));
            self.fail_task(id, e);
            return;
        }
        task.retries_left -= 1;
        task.attempt += 1;
        task.state = TaskState::Pending;
        self.task_metrics.ended(TaskEnd::Retried, None);
        task.pending_since = Instant::now();
        let job = task.spec.job_id.clone();
        if let Some(j) = self.jobs.get_mut(&job) {
            j.info.task_retries += 1;
        }
        let task = &self.tasks[id];
        info!("task {id}: {error}; retrying (attempt {})", task.attempt);
        self.enqueue(id.to_string(), true);
    }

    /// Task `id` could not read some inputs from the stores listed for them. A store
    /// that cannot serve an object it holds is on a node that died or is cut off: its
    /// copy leaves the directory (it is never read again, even if the node comes back,
    /// before the head declares it dead), and the input is rebuilt from its lineage
    /// (its task run again) when no copy is left. The task waits for them, without
    /// using one of its retries, up to [`MAX_INPUT_LOSSES`] times.
    fn inputs_unreadable(&mut self, id: &str, inputs: &[proto::UnreadableInput], error: &str) {
        for u in inputs {
            self.copies_unreadable(id, &u.object_id, &u.from, error);
        }
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if task.input_losses >= MAX_INPUT_LOSSES {
            self.system_failure(id, error);
            return;
        }
        task.input_losses += 1;
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.attempt += 1;
        task.state = TaskState::Pending;
        task.pending_since = Instant::now();
        self.enqueue(id.to_string(), true);
    }

    /// Drops the copies of `input` in the stores `from` (task `id` could not read
    /// them); rebuilds it if none is left.
    fn copies_unreadable(&mut self, id: &str, input: &str, from: &[String], error: &str) {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| from.contains(&n.object_address))
            .map(|(node, _)| node.clone())
            .collect();
        let mut lost_on = None;
        if let Some(o) = self.objects.get_mut(input) {
            let had = o.locations.len();
            let bytes = o.bytes;
            o.locations.retain(|l| !nodes.contains(l));
            if o.locations.len() < had {
                for n in &nodes {
                    if let Some(n) = self.nodes.get_mut(n) {
                        n.stored = n.stored.saturating_sub(bytes);
                    }
                }
                if o.locations.is_empty() && o.error.is_none() {
                    lost_on = nodes.first().cloned();
                }
            }
        }
        if let Some(node) = lost_on {
            info!("task {id} cannot read {input} on {node}: {error}");
            self.reconstruct(input, &node);
        }
    }

    fn release_args(&mut self, args: &[String]) {
        for a in args {
            if let Some(o) = self.objects.get_mut(a) {
                o.users = o.users.saturating_sub(1);
                if o.freed {
                    self.try_delete(a);
                }
            }
        }
    }

    /// Deletes a freed object once no unfinished task needs it.
    fn try_delete(&mut self, id: &str) {
        let Some(o) = self.objects.get(id) else {
            return;
        };
        if o.users > 0 {
            return;
        }
        if let Some(p) = &o.producer {
            if matches!(
                self.tasks.get(p).map(|t| &t.state),
                Some(TaskState::Pending | TaskState::Running { .. })
            ) {
                return;
            }
        }
        let o = self.objects.remove(id).expect("checked above");
        self.inline_bytes -= o.inline.as_ref().map_or(0, |b| b.len() as u64);
        for n in &o.locations {
            if let Some(node) = self.nodes.get_mut(n) {
                node.stored = node.stored.saturating_sub(o.bytes);
                node.send(Command::FreeObjects(proto::ObjectIds {
                    ids: vec![id.to_string()],
                }));
            }
        }
        if let Some(p) = o.producer {
            self.tasks.remove(&p);
        }
    }

    fn node_died(&mut self, node: &str) {
        self.node_gone(node, "died");
    }

    /// Node `node` is gone (`how`: "died", or "left" after draining): what ran there
    /// is retried, objects only it held are rebuilt, its actors restart elsewhere.
    fn node_gone(&mut self, node: &str, how: &str) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        n.alive = false;
        n.tx = None;
        let running: Vec<String> = n.running.drain().collect();
        for t in running {
            self.system_failure(&t, &format!("node {node} {how}"));
        }
        // Copies it was making for a draining node will not come: the next drain call
        // sends them elsewhere.
        self.copies.retain(|_, target| target != node);
        // Objects whose last copy was there are rebuilt by re-running their task.
        let lost: Vec<String> = self
            .objects
            .iter_mut()
            .filter_map(|(id, o)| {
                let had = o.locations.len();
                o.locations.retain(|l| l != node);
                (had > 0 && o.locations.is_empty() && o.error.is_none() && !o.freed)
                    .then(|| id.clone())
            })
            .collect();
        for id in lost {
            self.reconstruct(&id, node);
        }
        let actors: Vec<String> = self
            .actors
            .iter()
            .filter(|(_, a)| {
                matches!(&a.state, ActorState::Alive { node: n } | ActorState::Starting { node: n } if n == node)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for a in actors {
            self.actor_failed(&a, &format!("node {node} {how}"));
        }
        let groups: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.bundles.iter().any(|b| b.node.as_deref() == Some(node)))
            .map(|(id, _)| id.clone())
            .collect();
        for g in groups {
            self.unplace_group(&g);
        }
        let drivers: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.info.node_id == node && j.info.state == "RUNNING" && !j.info.attached
            })
            .map(|(id, _)| id.clone())
            .collect();
        for j in drivers {
            self.finish_job(&j, "FAILED", -1, &format!("the driver's node {node} {how}"));
        }
    }

    // ------------------------------------------------------------------ draining

    /// Starts or goes on draining `node`: no new work goes there, and each object only
    /// it holds is copied to the node that takes work with the fewest stored bytes.
    /// What still keeps it, or `None` for a node not alive.
    fn drain(&mut self, node: &str) -> Option<proto::DrainStatus> {
        let n = self.nodes.get_mut(node)?;
        if !n.alive {
            return None;
        }
        if !n.draining {
            info!("{node} is draining");
            n.draining = true;
        }
        let from = n.object_address.clone();
        let running = (n.running.len() + n.ahead.len()) as u32;
        let drivers = self
            .jobs
            .values()
            .filter(|j| j.info.node_id == node && j.info.state == "RUNNING" && !j.info.attached)
            .count() as u32;
        let sole: Vec<(String, u64)> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o.locations.len() == 1 && o.locations[0] == node && !o.freed && o.error.is_none()
            })
            .map(|(id, o)| (id.clone(), o.bytes))
            .collect();
        let left = sole.len() as u32;
        for (id, bytes) in sole {
            if self.copies.contains_key(&id) {
                continue;
            }
            let Some(target) = self
                .nodes
                .iter()
                .filter(|(other, n)| other.as_str() != node && n.takes_work())
                .min_by_key(|(_, n)| n.stored)
                .map(|(other, _)| other.clone())
            else {
                break;
            };
            info!("{node} is draining: copying object {id} to {target}");
            let t = self.nodes.get_mut(&target).expect("picked");
            t.stored += bytes;
            t.send(Command::CopyObject(proto::ObjectCopy {
                object_id: id.clone(),
                from: from.clone(),
            }));
            self.copies.insert(id, target);
        }
        Some(proto::DrainStatus {
            running_tasks: running,
            drivers,
            objects_to_copy: left,
        })
    }

    /// A copy of `object` is (or could not be made) on `node`.
    fn object_copied(&mut self, object: &str, node: &str, bytes: u64, error: &str) {
        let Some(target) = self.copies.remove(object) else {
            return;
        };
        let reserved = self.objects.get(object).map_or(0, |o| o.bytes);
        if let Some(n) = self.nodes.get_mut(&target) {
            n.stored = n.stored.saturating_sub(reserved);
        }
        if !error.is_empty() || target != node {
            info!("object {object}: no copy on {node}: {error}");
            return;
        }
        let alive = self.nodes.get(node).is_some_and(|n| n.alive);
        match self.objects.get_mut(object) {
            Some(o) if alive && !o.freed && !o.locations.iter().any(|l| l == node) => {
                o.locations.push(node.to_string());
                if let Some(n) = self.nodes.get_mut(node) {
                    n.stored += bytes;
                }
            }
            // Freed meanwhile (or its node went): the copy goes too.
            _ => {
                if let Some(n) = self.nodes.get(node) {
                    n.send(Command::FreeObjects(proto::ObjectIds {
                        ids: vec![object.to_string()],
                    }));
                }
            }
        }
    }

    /// Node `node` leaves after draining.
    fn leave(&mut self, node: &str) {
        if self.nodes.get(node).is_some_and(|n| n.alive) {
            info!("{node} left the cluster");
            self.node_gone(node, "left");
        }
    }

    fn reconstruct(&mut self, object: &str, node: &str) {
        let producer = self.objects.get(object).and_then(|o| o.producer.clone());
        let Some(p) = producer else {
            if let Some(o) = self.objects.get_mut(object) {
                o.error = Some(execution_report(format!(
                    "object {object} was lost with node {node} and has no task to rebuild it"
                )));
            }
            return;
        };
        let Some(task) = self.tasks.get_mut(&p) else {
            return;
        };
        if task.state != TaskState::Done {
            return;
        }
        if task.reconstructions >= 10 {
            if let Some(o) = self.objects.get_mut(object) {
                o.error = Some(execution_report(format!(
                    "object {object} was lost too many times"
                )));
            }
            return;
        }
        task.reconstructions += 1;
        task.attempt += 1;
        task.state = TaskState::Pending;
        task.pending_since = Instant::now();
        let args = task.spec.args.clone();
        if let Some(j) = self.jobs.get_mut(&task.spec.job_id) {
            j.info.task_retries += 1;
        }
        for a in &args {
            if let Some(o) = self.objects.get_mut(a) {
                o.users += 1;
            }
        }
        info!("object {object} was lost with node {node}: re-running task {p}");
        self.enqueue(p, true);
    }

    // ------------------------------------------------------------------ groups

    fn place_groups(&mut self) {
        let pending: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.ready && self.job_active(&g.job))
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            self.try_place_group(&id);
        }
    }

    /// All bundles at once or none: simulates on a copy of what nodes have free.
    fn try_place_group(&mut self, id: &str) {
        use proto::create_placement_group_request::Strategy;
        let g = &self.groups[id];
        let strategy = Strategy::try_from(g.strategy).unwrap_or(Strategy::Pack);
        let mut free: BTreeMap<String, (Resources, GpuSlots)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.takes_work())
            .map(|(id, n)| (id.clone(), (n.available.clone(), n.gpus.clone())))
            .collect();
        let mut used: BTreeMap<String, usize> = BTreeMap::new();
        let mut placed: Vec<(String, Vec<u32>)> = Vec::new();
        let bundles: Vec<Resources> = g.bundles.iter().map(|b| b.total.clone()).collect();
        let strict_pack_node = if strategy == Strategy::StrictPack {
            let mut sum = Resources::default();
            for b in &bundles {
                sum.add(b);
            }
            match free
                .iter()
                .find(|(_, (r, gp))| sum.fits_in(r) && gpu_fit_all(gp, &bundles))
            {
                Some((n, _)) => Some(n.clone()),
                None => return,
            }
        } else {
            None
        };
        for b in &bundles {
            let mut candidates: Vec<(&String, usize)> = free
                .iter()
                .filter(|(n, (r, gp))| {
                    b.fits_in(r)
                        && gp.clone().take(b.num_gpus).is_some()
                        && strict_pack_node.as_ref().is_none_or(|s| s == *n)
                        && (strategy != Strategy::StrictSpread || !used.contains_key(*n))
                })
                .map(|(n, _)| (n, used.get(n).copied().unwrap_or(0)))
                .collect();
            match strategy {
                Strategy::Spread | Strategy::StrictSpread => candidates.sort_by_key(|(_, c)| *c),
                _ => candidates.sort_by_key(|(_, c)| std::cmp::Reverse(*c)),
            }
            let Some((node, _)) = candidates.first() else {
                return;
            };
            let node = (*node).clone();
            let (r, gp) = free.get_mut(&node).expect("candidate exists");
            r.subtract(b);
            let gpus = gp.take(b.num_gpus).expect("checked");
            *used.entry(node.clone()).or_insert(0) += 1;
            placed.push((node, gpus));
        }
        // Commit.
        let g = self.groups.get_mut(id).expect("group exists");
        for (b, (node, gpus)) in g.bundles.iter_mut().zip(placed) {
            let n = self.nodes.get_mut(&node).expect("placed on a known node");
            n.available.subtract(&b.total);
            let taken = n.gpus.take(b.total.num_gpus).unwrap_or_default();
            debug_assert_eq!(taken, gpus);
            b.node = Some(node);
            b.available = b.total.clone();
            b.gpus = GpuSlots::new(&taken);
            b.gpu_ids = taken;
        }
        g.ready = true;
        info!("placement group {id} placed");
    }

    /// Returns a group's reservations (a node of it died): it is placed again whole.
    fn unplace_group(&mut self, id: &str) {
        let Some(g) = self.groups.get_mut(id) else {
            return;
        };
        g.ready = false;
        g.generation += 1;
        let mut back = Vec::new();
        for b in &mut g.bundles {
            if let Some(node) = b.node.take() {
                back.push((node, b.total.clone(), std::mem::take(&mut b.gpu_ids)));
            }
        }
        for (node, r, gpus) in back {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.available.add(&r);
                n.gpus.give(&gpus, r.num_gpus);
            }
        }
    }

    // ------------------------------------------------------------------ actors

    fn place_actors(&mut self) {
        let pending: Vec<String> = self
            .actors
            .iter()
            .filter(|(_, a)| a.state == ActorState::Pending)
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            let a = &self.actors[&id];
            if !self.job_active(&a.spec.job_id) {
                let a = self.actors.get_mut(&id).expect("exists");
                a.state = ActorState::Dead("its job is not running".into());
                continue;
            }
            let req = a.resources.clone();
            let placement = if a.spec.placement_group.is_empty() {
                // A job's actors spread over the nodes (a pool's actors serve blocks
                // wherever they were made), then go where most CPUs are free.
                let job = a.spec.job_id.clone();
                let mut crowd: HashMap<String, usize> = HashMap::new();
                for other in self.actors.values().filter(|o| o.spec.job_id == job) {
                    if let ActorState::Starting { node } | ActorState::Alive { node } = &other.state
                    {
                        *crowd.entry(node.clone()).or_default() += 1;
                    }
                }
                self.pick_node(&req, &[], &crowd, false)
                    .map(|(n, g)| (n, g, None))
            } else {
                let (g, i) = (a.spec.placement_group.clone(), a.spec.bundle_index);
                self.take_from_bundle(&g, i, &req)
            };
            let Some((node, gpus, bundle)) = placement else {
                continue;
            };
            let a = self.actors.get_mut(&id).expect("exists");
            a.incarnation += 1;
            a.state = ActorState::Starting { node: node.clone() };
            a.gpus = gpus.clone();
            a.bundle = bundle;
            let cmd = proto::StartActor {
                actor_id: id.clone(),
                job_id: a.spec.job_id.clone(),
                payload: a.spec.payload.clone(),
                gpu_ids: gpus,
                incarnation: a.incarnation,
            };
            self.nodes[&node].send(Command::StartActor(cmd));
        }
    }

    fn actor_failed(&mut self, id: &str, error: &str) {
        let Some(a) = self.actors.get_mut(id) else {
            return;
        };
        let node = match &a.state {
            ActorState::Alive { node } | ActorState::Starting { node } => node.clone(),
            _ => return,
        };
        let (req, gpus, bundle) = (a.resources.clone(), a.gpus.clone(), a.bundle.take());
        let restart = a.restarts < a.spec.max_restarts;
        if restart {
            a.restarts += 1;
            a.state = ActorState::Pending;
            warn!(
                "actor {id}: {error}; restarting ({} of {})",
                a.restarts, a.spec.max_restarts
            );
        } else {
            a.state = ActorState::Dead(error.to_string());
            warn!("actor {id}: {error}; not restarted");
        }
        self.release(&node, &req, &gpus, &bundle);
        // Calls in flight on the old incarnation run again on the new one (or fail).
        let calls: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.spec.actor_id == id && matches!(t.state, TaskState::Running { .. }))
            .map(|(t, _)| t.clone())
            .collect();
        for t in calls {
            self.system_failure(&t, &format!("actor {id} died: {error}"));
        }
    }

    fn kill_actor(&mut self, id: &str, why: &str) {
        let Some(a) = self.actors.get_mut(id) else {
            return;
        };
        let node = match &a.state {
            ActorState::Alive { node } | ActorState::Starting { node } => Some(node.clone()),
            _ => None,
        };
        a.state = ActorState::Dead(why.to_string());
        let (req, gpus, bundle) = (a.resources.clone(), a.gpus.clone(), a.bundle.take());
        if let Some(node) = node {
            if let Some(n) = self.nodes.get(&node) {
                n.send(Command::StopActor(id.to_string()));
            }
            self.release(&node, &req, &gpus, &bundle);
        }
    }

    // ------------------------------------------------------------------ jobs

    fn place_drivers(&mut self) {
        let pending: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.info.state == "PENDING")
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            let req = self.jobs[&id].resources.clone();
            let Some((node, gpus)) = self.pick_node(&req, &[], &HashMap::new(), false) else {
                continue;
            };
            let j = self.jobs.get_mut(&id).expect("exists");
            j.info.state = "RUNNING".into();
            j.info.node_id = node.clone();
            j.gpus = gpus.clone();
            let cmd = proto::StartDriver {
                job_id: id.clone(),
                entrypoint: j.info.entrypoint.clone(),
                env: j.info.env.clone(),
                gpu_ids: gpus,
            };
            info!("job {id}: driver starts on {node}");
            self.nodes[&node].send(Command::StartDriver(cmd));
        }
    }

    fn finish_job(&mut self, id: &str, state: &str, exit_code: i32, error: &str) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        if TERMINAL.contains(&j.info.state.as_str()) {
            return;
        }
        let had_driver = j.info.state == "RUNNING" && !j.info.attached;
        j.info.state = state.into();
        j.info.exit_code = exit_code;
        j.info.error = error.into();
        j.info.finished_ms = now_ms();
        info!("job {id}: {state} {error}");
        let (node, req, gpus) = (j.info.node_id.clone(), j.resources.clone(), j.gpus.clone());
        // Nodes drop their copies of the package on `StopJob`; the head's cached files
        // are evicted past its cache limit; the log stays.
        if had_driver {
            self.release(&node, &req, &gpus, &None);
        }
        // Everything of the job goes: tasks, actors, groups, objects.
        let tasks: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.spec.job_id == id)
            .map(|(t, _)| t.clone())
            .collect();
        for t in &tasks {
            if matches!(
                self.tasks[t].state,
                TaskState::Pending | TaskState::Running { .. }
            ) {
                self.fail_task(t, cancelled_report(&format!("job {id} ended")));
            }
        }
        let actors: Vec<String> = self
            .actors
            .iter()
            .filter(|(_, a)| a.spec.job_id == id)
            .map(|(a, _)| a.clone())
            .collect();
        for a in actors {
            self.kill_actor(&a, &format!("job {id} ended"));
        }
        let groups: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.job == id)
            .map(|(g, _)| g.clone())
            .collect();
        for g in groups {
            self.unplace_group(&g);
            self.groups.remove(&g);
        }
        let mut dropped = 0;
        let nodes = &mut self.nodes;
        self.objects.retain(|_, o| {
            let keep = o.job != id;
            if !keep {
                dropped += o.inline.as_ref().map_or(0, |b| b.len() as u64);
                // The nodes drop the job's objects on `StopJob`.
                for l in &o.locations {
                    if let Some(n) = nodes.get_mut(l) {
                        n.stored = n.stored.saturating_sub(o.bytes);
                    }
                }
            }
            keep
        });
        self.inline_bytes -= dropped;
        for t in tasks {
            self.tasks.remove(&t);
        }
        self.queue.retain(|id| self.tasks.contains_key(id));
        for n in self.nodes.values() {
            n.send(Command::StopJob(id.to_string()));
        }
    }
}

fn gpu_fit_all(slots: &GpuSlots, bundles: &[Resources]) -> bool {
    let mut s = slots.clone();
    bundles.iter().all(|b| s.take(b.num_gpus).is_some())
}

fn invalid(e: VolleyError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The head's gRPC face.
#[derive(Debug, Clone)]
pub struct HeadService {
    core: Arc<HeadCore>,
}

impl HeadService {
    /// Serves `core`.
    pub fn new(core: Arc<HeadCore>) -> Self {
        Self { core }
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl proto::head_server::Head for HeadService {
    async fn register_node(
        &self,
        request: Request<proto::RegisterNodeRequest>,
    ) -> std::result::Result<Response<proto::RegisterNodeResponse>, Status> {
        let r = request.into_inner();
        let total: Resources = r.total.clone().into();
        total.validate().map_err(invalid)?;
        let id = self.core.with(|s| {
            s.next_node += 1;
            let id = format!("node-{}", s.next_node);
            info!("{id} joined from {} with {total}", r.hostname);
            s.nodes.insert(
                id.clone(),
                Node {
                    hostname: r.hostname.clone(),
                    object_address: r.object_address.clone(),
                    available: total.clone(),
                    total,
                    gpus: GpuSlots::new(&r.gpu_ids),
                    last_seen: Instant::now(),
                    alive: true,
                    tx: None,
                    running: HashSet::new(),
                    ahead: VecDeque::new(),
                    slots: HashMap::new(),
                    object_bytes: 0,
                    object_store_memory: r.object_store_memory,
                    stored: 0,
                    spilled_bytes: 0,
                    spilled_total: 0,
                    workers: 0,
                    draining: false,
                },
            );
            id
        });
        Ok(Response::new(proto::RegisterNodeResponse {
            node_id: id,
            heartbeat_interval_ms: self.core.options.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> std::result::Result<Response<proto::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.core.state.lock().expect("head lock");
        let known = match s.nodes.get_mut(&r.node_id) {
            Some(n) if n.alive => {
                n.last_seen = Instant::now();
                n.object_bytes = r.object_store_bytes;
                n.spilled_bytes = r.spilled_bytes;
                n.spilled_total = r.spilled_total;
                n.workers = r.workers;
                true
            }
            _ => false,
        };
        Ok(Response::new(proto::HeartbeatResponse { known }))
    }

    type AttachStream = Boxed<proto::NodeCommand>;

    async fn attach(
        &self,
        request: Request<proto::AttachRequest>,
    ) -> std::result::Result<Response<Self::AttachStream>, Status> {
        let id = request.into_inner().node_id;
        let (tx, rx) = mpsc::unbounded_channel();
        self.core.with(|s| match s.nodes.get_mut(&id) {
            Some(n) if n.alive => {
                n.tx = Some(tx);
                Ok(())
            }
            _ => Err(Status::not_found(format!("unknown node {id}"))),
        })?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn report_tasks(
        &self,
        request: Request<proto::TaskReports>,
    ) -> std::result::Result<Response<proto::ReportAcks>, Status> {
        let reports = request.into_inner().reports;
        let acks = self.core.with(|s| {
            reports
                .into_iter()
                .map(|r| proto::ReportAck {
                    stale: !s.task_reported(r),
                })
                .collect()
        });
        Ok(Response::new(proto::ReportAcks { acks }))
    }

    async fn report_actor(
        &self,
        request: Request<proto::ActorReport>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.core.with(|s| {
            let Some(a) = s.actors.get_mut(&r.actor_id) else {
                return;
            };
            if a.incarnation != r.incarnation {
                return;
            }
            match (&a.state, r.alive) {
                (ActorState::Starting { node }, true) if *node == r.node_id => {
                    a.state = ActorState::Alive { node: node.clone() };
                    a.pid = r.pid;
                }
                (ActorState::Starting { .. } | ActorState::Alive { .. }, false) => {
                    s.actor_failed(&r.actor_id, &r.error);
                }
                _ => {}
            }
        });
        Ok(Response::new(proto::Empty {}))
    }

    async fn report_driver_exit(
        &self,
        request: Request<proto::DriverExit>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.core.with(|s| {
            let (state, error) = if r.exit_code == 0 && r.error.is_empty() {
                ("SUCCEEDED", String::new())
            } else if r.error.is_empty() {
                (
                    "FAILED",
                    format!("the driver exited with code {}", r.exit_code),
                )
            } else {
                ("FAILED", r.error.clone())
            };
            s.finish_job(&r.job_id, state, r.exit_code, &error);
        });
        Ok(Response::new(proto::Empty {}))
    }

    async fn drain_node(
        &self,
        request: Request<proto::DrainRequest>,
    ) -> std::result::Result<Response<proto::DrainStatus>, Status> {
        let r = request.into_inner();
        let status = self.core.with(|s| {
            if r.leave {
                s.leave(&r.node_id);
                Some(proto::DrainStatus::default())
            } else {
                s.drain(&r.node_id)
            }
        });
        status
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no live node {}", r.node_id)))
    }

    async fn report_object_copied(
        &self,
        request: Request<proto::ObjectCopied>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.core
            .with(|s| s.object_copied(&r.object_id, &r.node_id, r.bytes, &r.error));
        Ok(Response::new(proto::Empty {}))
    }

    async fn report_execution(
        &self,
        request: Request<proto::ExecutionProgress>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        /// Executions kept per job.
        const KEPT: usize = 16;
        let r = request.into_inner();
        let mut s = self.core.state.lock().expect("head lock");
        if !s.jobs.contains_key(&r.job_id) {
            return Err(Status::not_found(format!("no job {}", r.job_id)));
        }
        let list = s.executions.entry(r.job_id.clone()).or_default();
        match list.iter_mut().find(|e| e.execution_id == r.execution_id) {
            // A periodic report overtaken by the final one changes nothing.
            Some(e) if e.finished => {}
            Some(e) => *e = r,
            None => {
                list.push(r);
                if list.len() > KEPT {
                    list.remove(0);
                }
            }
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_executions(
        &self,
        request: Request<proto::JobId>,
    ) -> std::result::Result<Response<proto::JobExecutions>, Status> {
        let id = request.into_inner().job_id;
        self.core
            .job(&id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let s = self.core.state.lock().expect("head lock");
        Ok(Response::new(proto::JobExecutions {
            executions: s.executions.get(&id).cloned().unwrap_or_default(),
        }))
    }

    async fn reply_logs(
        &self,
        request: Request<proto::LogReply>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        let waiting = self.core.log_queries.lock().expect("queries lock");
        if let Some(tx) = waiting.get(&r.query_id) {
            let _ = tx.send(r);
        }
        Ok(Response::new(proto::Empty {}))
    }

    async fn append_log(
        &self,
        request: Request<proto::LogAppend>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        use std::io::Write;
        let r = request.into_inner();
        let dir = {
            let s = self.core.state.lock().expect("head lock");
            s.jobs.get(&r.job_id).map(|j| j.dir.clone())
        };
        if let Some(dir) = dir {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("driver.log"))
                .map_err(|e| Status::internal(e.to_string()))?;
            f.write_all(&r.data)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        self.core.changed.notify_waiters();
        Ok(Response::new(proto::Empty {}))
    }

    async fn fetch_package(
        &self,
        request: Request<proto::JobId>,
    ) -> std::result::Result<Response<proto::PackageManifest>, Status> {
        let id = request.into_inner().job_id;
        let s = self.core.state.lock().expect("head lock");
        s.jobs
            .get(&id)
            .map(|j| Response::new(j.package.clone()))
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    type FetchBlobStream = Boxed<proto::BlobChunk>;

    async fn fetch_blob(
        &self,
        request: Request<proto::Digests>,
    ) -> std::result::Result<Response<Self::FetchBlobStream>, Status> {
        let mut blobs = Vec::new();
        for d in request.into_inner().digests {
            if !self.core.blobs.has(&d) {
                return Err(Status::not_found(format!(
                    "no package file with digest {d}"
                )));
            }
            blobs.push((d.clone(), self.core.blobs.path(&d)));
        }
        let chunks = tokio_stream::wrappers::ReceiverStream::new(blob_chunks(blobs))
            .map(|c| c.map_err(|e| Status::internal(e.to_string())));
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn driver_alive(
        &self,
        request: Request<proto::DriverHeartbeat>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let id = request.into_inner().job_id;
        let mut s = self.core.state.lock().expect("head lock");
        match s.jobs.get_mut(&id) {
            Some(j) if j.info.state == "RUNNING" => {
                j.last_alive = Instant::now();
                Ok(Response::new(proto::Empty {}))
            }
            Some(j) => Err(Status::failed_precondition(format!(
                "job {id} is {}",
                j.info.state
            ))),
            None => Err(Status::not_found(format!("no job {id}"))),
        }
    }

    async fn submit_tasks(
        &self,
        request: Request<proto::SubmitTasksRequest>,
    ) -> std::result::Result<Response<proto::SubmitTasksResponse>, Status> {
        let tasks = request.into_inner().tasks;
        let rejected = self.core.with(|s| {
            tasks
                .into_iter()
                .filter_map(|spec| {
                    let id = spec.task_id.clone();
                    s.submit(spec).err().map(|e| proto::RejectedTask {
                        task_id: id,
                        error: Some(wire_error(&ErrorReport::from(&e))),
                    })
                })
                .collect()
        });
        Ok(Response::new(proto::SubmitTasksResponse { rejected }))
    }

    async fn put_object(
        &self,
        request: Request<proto::PutObjectRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.core.with(|s| {
            let node = s
                .nodes
                .iter()
                .find(|(_, n)| n.alive && n.object_address == r.address)
                .map(|(id, _)| id.clone())
                .ok_or_else(|| Status::not_found(format!("no live node at {}", r.address)))?;
            if let Some(n) = s.nodes.get_mut(&node) {
                n.stored += r.bytes;
            }
            s.objects.insert(
                r.object_id.clone(),
                ObjectEntry::new(&r.job_id, None, vec![node], r.bytes, r.rows),
            );
            Ok::<(), Status>(())
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn wait(
        &self,
        request: Request<proto::WaitRequest>,
    ) -> std::result::Result<Response<proto::WaitResponse>, Status> {
        let r = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.timeout_ms);
        let want = (r.num_ready as usize).min(r.object_ids.len());
        // A wait for thousands of objects wakes on every change, so each look only
        // visits the objects not yet seen done, and a wait for all of them stops at the
        // first one still running (tasks mostly end in the order they were submitted).
        // The statuses are described once, when the answer is due.
        let mut pending: VecDeque<usize> = (0..r.object_ids.len()).collect();
        let all = want == r.object_ids.len();
        let objects = self
            .core
            .wait_until(deadline, |s, last| {
                let finished = |i: &usize| {
                    s.objects
                        .get(&r.object_ids[*i])
                        .is_none_or(|o| o.error.is_some() || s.object_ready(o))
                };
                if all {
                    while pending.front().is_some_and(finished) {
                        pending.pop_front();
                    }
                } else {
                    pending.retain(|i| !finished(i));
                }
                let done = r.object_ids.len() - pending.len();
                let answer = done >= want || last;
                let objects = if answer {
                    r.object_ids.iter().map(|id| s.object_status(id)).collect()
                } else {
                    Vec::new()
                };
                Ok((objects, answer))
            })
            .await?;
        Ok(Response::new(proto::WaitResponse { objects }))
    }

    async fn free(
        &self,
        request: Request<proto::FreeRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.core.with(|s| {
            for id in &r.object_ids {
                if let Some(o) = s.objects.get_mut(id) {
                    o.freed = true;
                    s.try_delete(id);
                }
            }
        });
        Ok(Response::new(proto::Empty {}))
    }

    async fn create_placement_group(
        &self,
        request: Request<proto::CreatePlacementGroupRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        if r.bundles.is_empty() {
            return Err(Status::invalid_argument("a placement group needs bundles"));
        }
        let bundles: Vec<Resources> = r
            .bundles
            .iter()
            .map(|b| Resources::from(b.resources.clone()))
            .collect();
        for b in &bundles {
            b.validate().map_err(invalid)?;
        }
        self.core.with(|s| {
            s.require_running(&r.job_id)?;
            s.groups.insert(
                r.group_id.clone(),
                Group {
                    job: r.job_id.clone(),
                    strategy: r.strategy,
                    bundles: bundles
                        .into_iter()
                        .map(|total| BundleState {
                            available: Resources::default(),
                            total,
                            node: None,
                            gpus: GpuSlots::default(),
                            gpu_ids: vec![],
                        })
                        .collect(),
                    ready: false,
                    generation: 0,
                },
            );
            Ok::<(), Status>(())
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn wait_placement_group(
        &self,
        request: Request<proto::PlacementGroupRequest>,
    ) -> std::result::Result<Response<proto::PlacementGroupStatus>, Status> {
        let r = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.timeout_ms);
        let status = self
            .core
            .wait_until(deadline, |s, _| {
                let g = s.groups.get(&r.group_id).ok_or_else(|| {
                    Status::not_found(format!("no placement group {}", r.group_id))
                })?;
                let status = proto::PlacementGroupStatus {
                    ready: g.ready,
                    bundle_nodes: g
                        .bundles
                        .iter()
                        .map(|b| b.node.clone().unwrap_or_default())
                        .collect(),
                };
                let ready = status.ready;
                Ok((status, ready))
            })
            .await?;
        Ok(Response::new(status))
    }

    async fn remove_placement_group(
        &self,
        request: Request<proto::PlacementGroupRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let id = request.into_inner().group_id;
        self.core.with(|s| {
            let actors: Vec<String> = s
                .actors
                .iter()
                .filter(|(_, a)| a.spec.placement_group == id)
                .map(|(a, _)| a.clone())
                .collect();
            for a in actors {
                s.kill_actor(&a, &format!("placement group {id} was removed"));
            }
            s.unplace_group(&id);
            s.groups.remove(&id);
        });
        Ok(Response::new(proto::Empty {}))
    }

    async fn create_actor(
        &self,
        request: Request<proto::CreateActorRequest>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let spec = request.into_inner();
        let resources: Resources = spec.resources.clone().into();
        resources.validate().map_err(invalid)?;
        self.core.with(|s| {
            s.require_running(&spec.job_id)?;
            s.actors.insert(
                spec.actor_id.clone(),
                ActorEntry {
                    spec,
                    resources,
                    state: ActorState::Pending,
                    incarnation: 0,
                    restarts: 0,
                    gpus: vec![],
                    bundle: None,
                    pid: 0,
                },
            );
            Ok::<(), Status>(())
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn get_actor(
        &self,
        request: Request<proto::ActorId>,
    ) -> std::result::Result<Response<proto::ActorStatus>, Status> {
        let id = request.into_inner().actor_id;
        let s = self.core.state.lock().expect("head lock");
        let a = s
            .actors
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("no actor {id}")))?;
        Ok(Response::new(actor_status(&id, a)))
    }

    async fn kill_actor(
        &self,
        request: Request<proto::ActorId>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let id = request.into_inner().actor_id;
        self.core.with(|s| s.kill_actor(&id, "killed by request"));
        Ok(Response::new(proto::Empty {}))
    }

    async fn pick_object_store(
        &self,
        _request: Request<proto::JobId>,
    ) -> std::result::Result<Response<proto::ObjectLocation>, Status> {
        let s = self.core.state.lock().expect("head lock");
        let node = s
            .nodes
            .values()
            .filter(|n| n.takes_work())
            .min_by_key(|n| n.object_bytes)
            .ok_or_else(|| Status::unavailable("the cluster has no live node"))?;
        Ok(Response::new(proto::ObjectLocation {
            object_id: String::new(),
            addresses: vec![node.object_address.clone()],
            ..Default::default()
        }))
    }

    async fn missing_blobs(
        &self,
        request: Request<proto::PackageManifest>,
    ) -> std::result::Result<Response<proto::Digests>, Status> {
        let manifest = request.into_inner();
        check_manifest(&manifest, self.core.options.max_package_bytes).map_err(invalid)?;
        let digests = tokio::task::block_in_place(|| self.core.blobs.missing(&manifest));
        Ok(Response::new(proto::Digests { digests }))
    }

    async fn upload_blobs(
        &self,
        request: Request<Streaming<proto::BlobChunk>>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let (received, digests) = receive_blobs(
            &self.core.blobs,
            request.into_inner(),
            self.core.options.max_package_bytes,
        )
        .await
        .map_err(invalid)?;
        info!(
            "package files received: {}",
            volley_common::format_bytes(received)
        );
        // What just came is for a job about to be submitted: it stays.
        tokio::task::block_in_place(|| self.core.evict_packages(&digests));
        Ok(Response::new(proto::Empty {}))
    }

    async fn submit_job(
        &self,
        request: Request<proto::JobSpec>,
    ) -> std::result::Result<Response<proto::JobId>, Status> {
        let job_id = self.core.add_job(request.into_inner())?;
        Ok(Response::new(proto::JobId { job_id }))
    }

    async fn get_job(
        &self,
        request: Request<proto::JobId>,
    ) -> std::result::Result<Response<proto::JobInfo>, Status> {
        self.core
            .job(&request.into_inner().job_id)
            .map(Response::new)
            .map_err(|e| Status::not_found(e.to_string()))
    }

    async fn list_jobs(
        &self,
        _request: Request<proto::Empty>,
    ) -> std::result::Result<Response<proto::JobList>, Status> {
        Ok(Response::new(proto::JobList {
            jobs: self.core.jobs(),
        }))
    }

    async fn stop_job(
        &self,
        request: Request<proto::JobId>,
    ) -> std::result::Result<Response<proto::JobInfo>, Status> {
        self.core
            .stop_job(&request.into_inner().job_id)
            .map(Response::new)
            .map_err(|e| Status::not_found(e.to_string()))
    }

    type JobLogsStream = Boxed<proto::LogChunk>;

    async fn job_logs(
        &self,
        request: Request<proto::LogsRequest>,
    ) -> std::result::Result<Response<Self::JobLogsStream>, Status> {
        let r = request.into_inner();
        let core = Arc::clone(&self.core);
        core.job(&r.job_id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        let stream =
            futures::stream::unfold((core, r.offset, false), move |(core, offset, finished)| {
                let job = r.job_id.clone();
                async move {
                    if finished {
                        return None;
                    }
                    loop {
                        let (data, done) = match core.job_log(&job, offset) {
                            Ok(x) => x,
                            Err(e) => {
                                return Some((
                                    Err(Status::not_found(e.to_string())),
                                    (core, offset, true),
                                ))
                            }
                        };
                        if !data.is_empty() {
                            let next = offset + data.len() as u64;
                            return Some((Ok(proto::LogChunk { data }), (core, next, false)));
                        }
                        if done || !r.follow {
                            return None;
                        }
                        core.changed_within(Duration::from_millis(250)).await;
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_worker_logs(
        &self,
        request: Request<proto::LogQuery>,
    ) -> std::result::Result<Response<proto::WorkerLogs>, Status> {
        use std::sync::atomic::Ordering;
        let mut q = request.into_inner();
        let info = self
            .core
            .job(&q.job_id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        q.query_id = self.core.next_query.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.core
            .log_queries
            .lock()
            .expect("queries lock")
            .insert(q.query_id, tx);
        // Every live node is asked: any may have run the job's workers.
        let mut asked: Vec<String> = {
            let s = self.core.state.lock().expect("head lock");
            s.nodes
                .iter()
                .filter(|(_, n)| n.send(Command::ReadLogs(q.clone())))
                .map(|(id, _)| id.clone())
                .collect()
        };
        asked.sort();
        let mut replies: HashMap<String, proto::LogReply> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while replies.len() < asked.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    replies.insert(r.node_id.clone(), r);
                }
                _ => break,
            }
        }
        self.core
            .log_queries
            .lock()
            .expect("queries lock")
            .remove(&q.query_id);
        let mut out = proto::WorkerLogs {
            job_ended: TERMINAL.contains(&info.state.as_str()),
            ..Default::default()
        };
        for node in asked {
            match replies.remove(&node) {
                Some(r) if r.error.is_empty() => out.sections.extend(r.sections),
                Some(r) => out.unanswered.push(format!("{node}: {}", r.error)),
                None => out.unanswered.push(format!("{node}: no answer within 5 s")),
            }
        }
        Ok(Response::new(out))
    }

    async fn status(
        &self,
        _request: Request<proto::Empty>,
    ) -> std::result::Result<Response<proto::ClusterStatus>, Status> {
        Ok(Response::new(self.core.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Commands = mpsc::UnboundedReceiver<std::result::Result<proto::NodeCommand, Status>>;

    /// A head state with one running job `j` and one node `n1` of `cpus` CPUs, and
    /// what the head sends that node.
    fn one_node(cpus: f64) -> (State, Commands) {
        let mut s = State::default();
        s.jobs.insert(
            "j".into(),
            JobEntry {
                info: proto::JobInfo {
                    job_id: "j".into(),
                    state: "RUNNING".into(),
                    ..Default::default()
                },
                dir: PathBuf::new(),
                package: Default::default(),
                last_alive: Instant::now(),
                gpus: vec![],
                resources: Resources::default(),
            },
        );
        let (node, rx) = test_node(cpus, "a");
        s.nodes.insert("n1".into(), node);
        (s, rx)
    }

    fn test_node(cpus: f64, address: &str) -> (Node, Commands) {
        let (tx, rx) = mpsc::unbounded_channel();
        let total = Resources {
            num_cpus: cpus,
            ..Default::default()
        };
        let node = Node {
            hostname: "h".into(),
            object_address: address.into(),
            available: total.clone(),
            total,
            gpus: GpuSlots::new(&[]),
            last_seen: Instant::now(),
            alive: true,
            tx: Some(tx),
            running: HashSet::new(),
            ahead: VecDeque::new(),
            slots: HashMap::new(),
            object_bytes: 0,
            object_store_memory: 0,
            stored: 0,
            spilled_bytes: 0,
            spilled_total: 0,
            workers: 0,
            draining: false,
        };
        (node, rx)
    }

    fn submit(s: &mut State, id: &str) {
        let one_cpu = Resources {
            num_cpus: 1.0,
            ..Default::default()
        };
        s.submit(proto::SubmitTaskRequest {
            job_id: "j".into(),
            task_id: id.into(),
            resources: Some((&one_cpu).into()),
            ..Default::default()
        })
        .unwrap();
    }

    fn done(s: &mut State, id: &str, successor: &str) {
        assert!(s.task_reported(proto::TaskReport {
            node_id: "n1".into(),
            task_id: id.into(),
            successor: successor.into(),
            ..Default::default()
        }));
        s.schedule();
    }

    fn sent(rx: &mut Commands) -> Vec<String> {
        use proto::node_command::Command as C;
        let mut out = Vec::new();
        while let Ok(Ok(c)) = rx.try_recv() {
            out.push(match c.command {
                Some(C::RunTask(t)) if t.ahead => format!("ahead {}", t.task_id),
                Some(C::RunTask(t)) => format!("run {}", t.task_id),
                Some(C::PromoteTask(id)) => format!("promote {id}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[test]
    fn tasks_wait_ahead_for_slots_that_end_and_inherit_or_get_them() {
        let (mut s, mut rx) = one_node(2.0);
        for id in ["t1", "t2", "t3", "t4", "t5", "t6", "t7"] {
            submit(&mut s, id);
        }
        s.schedule();
        // Two run, four wait ahead (two per running task of the same CPUs), one queues.
        assert_eq!(
            sent(&mut rx),
            ["run t1", "run t2", "ahead t3", "ahead t4", "ahead t5", "ahead t6"]
        );
        assert_eq!(s.nodes["n1"].available.num_cpus, 0.0);
        // t3 took over t1's slot on the node: nothing is freed, t7 goes ahead.
        done(&mut s, "t1", "t3");
        assert!(!s.tasks["t3"].ahead);
        assert_eq!(s.nodes["n1"].available.num_cpus, 0.0);
        assert_eq!(sent(&mut rx), ["ahead t7"]);
        // t2 ended with no successor: the head gives its slot to the oldest task ahead.
        done(&mut s, "t2", "");
        assert_eq!(sent(&mut rx), ["promote t4"]);
        assert_eq!(s.nodes["n1"].available.num_cpus, 0.0);
        for t in ["t3", "t4", "t5", "t6", "t7"] {
            done(&mut s, t, "");
        }
        assert_eq!(sent(&mut rx), ["promote t5", "promote t6", "promote t7"]);
        assert_eq!(s.nodes["n1"].available.num_cpus, 2.0);
        assert!(s.nodes["n1"].ahead.is_empty());
        assert_eq!(s.nodes["n1"].slots.values().sum::<usize>(), 0);
    }

    #[test]
    fn nothing_goes_ahead_while_an_actor_waits_for_room() {
        let (mut s, mut rx) = one_node(1.0);
        submit(&mut s, "t1");
        s.schedule();
        assert_eq!(sent(&mut rx), ["run t1"]);
        s.actors.insert(
            "a".into(),
            ActorEntry {
                spec: proto::CreateActorRequest {
                    job_id: "j".into(),
                    ..Default::default()
                },
                resources: Resources {
                    num_cpus: 1.0,
                    ..Default::default()
                },
                state: ActorState::Pending,
                incarnation: 0,
                restarts: 0,
                gpus: vec![],
                bundle: None,
                pid: 0,
            },
        );
        submit(&mut s, "t2");
        s.schedule();
        assert!(sent(&mut rx).is_empty(), "t2 waits at the head");
        assert!(matches!(s.tasks["t2"].state, TaskState::Pending));
    }

    #[test]
    fn tasks_go_to_the_node_whose_object_store_has_room() {
        let (mut s, mut rx1) = one_node(4.0);
        let (n2, mut rx2) = test_node(2.0, "b");
        s.nodes.insert("n2".into(), n2);
        for n in s.nodes.values_mut() {
            n.object_store_memory = 100;
        }
        // n1 has more CPUs free, but its store is half full: t1 goes to n2.
        s.nodes.get_mut("n1").unwrap().stored = 50;
        submit(&mut s, "t1");
        s.schedule();
        assert!(sent(&mut rx1).is_empty());
        assert_eq!(sent(&mut rx2), ["run t1"]);
        // Its output is counted on n2 as soon as it is reported...
        assert!(s.task_reported(proto::TaskReport {
            node_id: "n2".into(),
            task_id: "t1".into(),
            output_bytes: 80,
            ..Default::default()
        }));
        assert_eq!(s.nodes["n2"].stored, 80);
        // ...so the next goes back to n1, now the emptier store.
        submit(&mut s, "t2");
        s.schedule();
        assert_eq!(sent(&mut rx1), ["run t2"]);
        // Freeing t1's object takes its bytes off n2.
        s.objects.get_mut("t1").unwrap().freed = true;
        s.try_delete("t1");
        assert_eq!(s.nodes["n2"].stored, 0);
    }

    #[test]
    fn a_draining_node_gets_no_work_and_its_objects_are_copied_before_it_leaves() {
        use proto::node_command::Command as C;
        let (mut s, mut rx1) = one_node(4.0);
        let (n2, mut rx2) = test_node(1.0, "b");
        s.nodes.insert("n2".into(), n2);
        // t1 runs on n1 (more CPUs) and its output stays there.
        submit(&mut s, "t1");
        s.schedule();
        assert_eq!(sent(&mut rx1), ["run t1"]);
        assert!(s.task_reported(proto::TaskReport {
            node_id: "n1".into(),
            task_id: "t1".into(),
            output_bytes: 80,
            ..Default::default()
        }));
        // Draining n1: new work goes to n2 though n1 has more room, and t1's output
        // is copied to n2.
        let st = s.drain("n1").unwrap();
        assert_eq!((st.running_tasks, st.objects_to_copy), (0, 1));
        let copy = match rx2.try_recv() {
            Ok(Ok(proto::NodeCommand {
                command: Some(C::CopyObject(c)),
            })) => c,
            other => panic!("expected a copy, got {other:?}"),
        };
        assert_eq!((copy.object_id.as_str(), copy.from.as_str()), ("t1", "a"));
        // Asking again sends no second copy while the first is on its way.
        s.drain("n1");
        assert!(sent(&mut rx2).is_empty());
        submit(&mut s, "t2");
        s.schedule();
        assert!(sent(&mut rx1).is_empty());
        assert_eq!(sent(&mut rx2), ["run t2"]);
        s.object_copied("t1", "n2", 80, "");
        assert_eq!(s.objects["t1"].locations, ["n1", "n2"]);
        assert_eq!(s.drain("n1").unwrap().objects_to_copy, 0);
        // Leaving: nothing is rebuilt (n2 has the copy), and the node is listed as gone
        // after draining, not dead.
        s.leave("n1");
        assert_eq!(s.objects["t1"].locations, ["n2"]);
        assert_eq!(s.tasks["t1"].state, TaskState::Done);
        assert!(!s.nodes["n1"].alive && s.nodes["n1"].draining);
        assert!(s.drain("n1").is_none());
    }

    #[test]
    fn a_task_that_reads_nothing_waits_for_a_store_with_room() {
        let (mut s, mut rx1) = one_node(4.0);
        let (n2, mut rx2) = test_node(1.0, "b");
        s.nodes.insert("n2".into(), n2);
        for n in s.nodes.values_mut() {
            n.object_store_memory = 100;
        }
        // n1 has every CPU free, but its store is three quarters full.
        s.nodes.get_mut("n1").unwrap().stored = 80;
        submit(&mut s, "t0");
        submit(&mut s, "t1");
        s.schedule();
        assert!(sent(&mut rx1).is_empty());
        assert_eq!(sent(&mut rx2), ["run t0", "ahead t1"]);
        // One that waited long enough goes where it fits.
        submit(&mut s, "t2");
        s.tasks.get_mut("t2").unwrap().pending_since -= SOURCE_WAIT;
        s.schedule();
        assert_eq!(sent(&mut rx1), ["run t2"]);
        // And when no store has room, none waits.
        s.nodes.get_mut("n2").unwrap().stored = 90;
        submit(&mut s, "t3");
        s.schedule();
        assert_eq!(sent(&mut rx1), ["run t3"]);
        assert!(sent(&mut rx2).is_empty());
    }

    #[test]
    fn the_queue_keeps_order_and_a_lower_bound_on_cpu_requests() {
        let mut q = TaskQueue::default();
        q.push("a".into(), Some(2.0), false);
        q.push("b".into(), Some(1.0), false);
        q.push("retry".into(), Some(4.0), true);
        q.push("gpu".into(), None, false);
        let ids: Vec<&str> = q.cpu.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["retry", "a", "b"]);
        assert_eq!(q.other, ["gpu"]);
        assert_eq!(q.cpu_min, 1.0);
        q.retain(|id| id != "b" && id != "retry" && id != "a");
        assert!(q.cpu.is_empty());
        // The bound restarts once the CPU queue emptied.
        q.push("c".into(), Some(3.0), false);
        assert_eq!(q.cpu_min, 3.0);
        assert_eq!(q.other, ["gpu"]);
    }
}
