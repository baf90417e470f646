//! The node agent: one per machine. It registers with the head, runs what the head
//! sends (worker processes for tasks and actors, job drivers), serves its object store
//! over Arrow Flight, and heartbeats.
//!
//! Workers are processes of the job's own binary (fetched from the head once per job),
//! started with `VOLLEY_WORKER_ID` set so that `volley::init()` enters worker mode. They
//! pull tasks from the agent (the `NodeAgent` service, on the same port as Flight) and
//! put results into its object store. The agent watches every child: a worker that
//! exits while running a task is reported, and the head runs the task again elsewhere.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, Notify, OnceCell};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use volley_common::{Result, VolleyError};

use super::auth::CheckToken;
use super::net::{bind, status_error, wire_execution_error, Channels, Head};
use super::objects::{
    decode_inline, make_shared_dir, FlightObjects, ObjectCompression, ObjectStore, COMPRESSION_VAR,
    SHARED_DIR_VAR,
};
use super::package::{check_manifest, receive_blobs, BlobCache};
use super::proto::{self, node_command::Command, task_report::Outcome};
use super::resources::Resources;
use super::worker_logs;

/// How a node agent is run.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The head, `host:port`.
    pub head_address: String,
    /// The cluster token.
    pub token: String,
    /// The address to listen on and advertise to the others.
    pub host: String,
    /// Port for the agent (Flight + worker service); 0 picks one.
    pub port: u16,
    /// What this node offers.
    pub resources: Resources,
    /// Ids of its GPUs.
    pub gpu_ids: Vec<u32>,
    /// Bytes of objects kept in memory before spilling.
    pub object_store_memory: u64,
    /// How objects are compressed in files (handed over, spilled) and between nodes.
    pub object_compression: ObjectCompression,
    /// The node's folder: job packages, logs, spilled objects.
    pub dir: PathBuf,
    /// The folder of cached job files (the agents of one machine may share it).
    pub package_cache: PathBuf,
    /// Bytes of cached job files kept (least recently used evicted).
    pub package_cache_bytes: u64,
    /// How long a leaving node waits for its tasks and drivers to end and its objects
    /// to be copied away ([`run_node_until`]).
    pub drain_timeout: Duration,
    /// Serve this node's `/metrics` (Prometheus, token as bearer credentials) over HTTP
    /// on this port of `host` (0: any free port); `None`: not served.
    pub metrics_port: Option<u16>,
    /// Certificates: the CA to trust (the head, other nodes) and this node's own.
    pub tls: super::tls::TlsConfig,
    /// How long a node that lost its head tries to rejoin it (a restarted head on the
    /// same address) under its own id, keeping its objects and its jobs' drivers,
    /// before it gives up (its workers go at once). Its jobs' drivers are told the
    /// same patience.
    pub head_patience: Duration,
}

struct WorkerEntry {
    job: String,
    gpus: Vec<u32>,
    /// What it runs: a task, or an actor's calls (its worker reads the next call's
    /// inputs while one runs).
    running: Vec<(String, u32)>,
    /// The CPUs the running task holds: the slot a task sent ahead may take over.
    cpus: f64,
    actor: Option<(String, u32)>,
    /// What its actor holds, and its process: told to a head that restarts.
    actor_held: Option<proto::Resources>,
    pid: u32,
    start_actor: Option<proto::StartActor>,
    kill: Option<oneshot::Sender<()>>,
    exiting: bool,
    /// It asked for work: its program started as a worker.
    pulled: bool,
    /// What it runs ([`LocalJob::kin`]), for a CPU worker of a job that shares its
    /// workers: kept as a spare when that job ends.
    kin: Option<String>,
    /// Kept since then, its job ended: a later job of its kin takes it over, or it
    /// exits after [`SPARE_LINGER`] (or as room for another job's worker).
    spare_since: Option<Instant>,
    /// The job it was taken over by, told with the next thing it pulls.
    moved: Option<proto::WorkerJob>,
}

impl WorkerEntry {
    /// Marks it exiting and kills its process; what it ran is reported lost as it
    /// dies.
    fn stop(&mut self) {
        self.exiting = true;
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }

    /// Stops it without reporting what it ran (to a head that will not know it).
    fn stop_unreported(&mut self) {
        self.running.clear();
        self.stop();
    }

    /// Waiting for a task: none running, no actor in it or on its way, not leaving.
    fn idle(&self) -> bool {
        self.running.is_empty()
            && self.actor.is_none()
            && self.start_actor.is_none()
            && !self.exiting
    }
}

/// What a node agent kept across the loss of its head, to tell the head that comes
/// back.
struct Kept {
    objects: Vec<proto::HeldObject>,
    drivers: Vec<String>,
    running: Vec<proto::RunningTask>,
    actors: Vec<proto::KeptActor>,
}

#[derive(Default)]
struct AgentState {
    /// Tasks waiting for a worker, by `(job, gpu ids)`.
    queues: HashMap<(String, Vec<u32>), VecDeque<proto::TaskAssignment>>,
    /// Calls waiting for their actor's worker.
    calls: HashMap<String, VecDeque<proto::TaskAssignment>>,
    /// Tasks the head sent ahead of room, oldest first: each runs once the head
    /// promotes it, or sooner in the slot of a task that just finished here.
    ahead: VecDeque<proto::TaskAssignment>,
    workers: HashMap<String, WorkerEntry>,
    drivers: HashMap<String, oneshot::Sender<()>>,
    stopped_jobs: std::collections::HashSet<String>,
    next_worker: u64,
    /// Per job, its workers that exited in a row before asking for work.
    failed_starts: HashMap<String, FailedStarts>,
    /// Rows of the objects tasks stored here (the store counts bytes only): what a
    /// node rejoining a restarted head says it kept.
    object_rows: HashMap<String, u64>,
}

/// Workers of a job that exited before asking for work, in a row (a program that
/// fails before `volley::init()` makes it a worker, or cannot load its libraries).
#[derive(Debug)]
struct FailedStarts {
    count: u32,
    last: Instant,
    /// How the last one ended and what it printed last.
    why: String,
}

/// Workers of a job that may exit before asking for work, in a row, before the node
/// starts no more for [`FAILED_STARTS_PAUSE`] and hands the job's tasks back as
/// failed attempts (the head retries them, elsewhere if it can, then fails them with
/// the reason). Without a limit such a job started and lost hundreds of workers a
/// second for as long as its tasks waited.
const MAX_FAILED_STARTS: u32 = 3;

/// How long a node starts no workers for a job whose workers keep failing to start;
/// then it tries one again.
const FAILED_STARTS_PAUSE: Duration = Duration::from_secs(30);

/// A job as this node runs it.
#[derive(Debug, Clone)]
struct LocalJob {
    package: PathBuf,
    entrypoint: Vec<String>,
    env: HashMap<String, String>,
    /// For a job that shares its workers (`JobSpec.share_workers`): its package's
    /// files, entrypoint program and environment, which a worker it takes over from an
    /// ended job must have run the same.
    kin: Option<String>,
}

/// How long the CPU workers of a job that shares them stay after it ended, for the
/// next job of their kin (a `volley sql` query after another).
const SPARE_LINGER: Duration = Duration::from_secs(10);

/// A job's package, fetched once (or why it could not be).
type JobCell = Arc<OnceCell<std::result::Result<LocalJob, String>>>;

/// The running agent.
pub struct Agent {
    node_id: String,
    options: NodeOptions,
    address: String,
    head: Head,
    store: Arc<ObjectStore>,
    /// Connections to other nodes' stores (copies off a leaving node).
    channels: Channels,
    /// Job files fetched, once per digest.
    blobs: BlobCache,
    state: Mutex<AgentState>,
    changed: Notify,
    jobs: Mutex<HashMap<String, JobCell>>,
    /// Held while a job's package files are fetched: jobs started together (each
    /// prepared at once) fetch a binary they share once, not each.
    fetching: tokio::sync::Mutex<()>,
    max_workers: usize,
    spawner: Spawner,
    reports: mpsc::UnboundedSender<PendingReport>,
    /// The attempts whose own code failed here and whose report the head has not
    /// answered yet, by task.
    failed_unreported: FailedUnreported,
}

/// Attempts that failed here (their own code's error) whose report the head has not
/// answered: a node that rejoins a restarted head lists them with its running tasks,
/// so that the head keeps the failure for the driver's replay instead of running the
/// task again (an actor's call would change its actor twice).
type FailedUnreported = Arc<Mutex<HashMap<String, proto::RunningTask>>>;

/// A task report on its way to the head.
struct PendingReport {
    report: proto::TaskReport,
    /// Whoever waits for the head's answer (whether the attempt was stale).
    verdict: Option<oneshot::Sender<bool>>,
    /// Tasks sent ahead wait on this node: its workers keep busy without the head for
    /// a while, so the report may wait for others to go with it.
    may_wait: bool,
}

impl PendingReport {
    /// A report sent as soon as the link is free.
    fn now(report: proto::TaskReport) -> Self {
        Self {
            report,
            verdict: None,
            may_wait: false,
        }
    }
}

/// How long a report may wait for others while tasks sent ahead keep this node busy
/// (the head sends up to 40 ms of work ahead per slot, twice this: see its
/// `ahead_per_slot`), so its workers still have work queued when the report goes. A
/// node finishing thousands of short tasks a second then reports them in a few calls,
/// and the head's cost per task falls with them: 20,000 no-op tasks on two one-CPU
/// nodes took ~0.22 s of the head's CPU with 20 ms here against ~0.28 s with 8 ms, and
/// the job took no longer.
const REPORT_LINGER: Duration = Duration::from_millis(20);

/// Sends task reports to the head, many per call: the reports that arrive while one
/// call is on its way go together in the next, and while tasks wait ahead here (so no
/// worker idles for it) a report waits up to [`REPORT_LINGER`] for more. An idle node,
/// or one whose attempt waits for the head's verdict, adds no delay.
/// Whether the agent is attached to a head: reports wait while it is not (a head that
/// restarted hears them once the node has rejoined it).
type Attached = tokio::sync::watch::Receiver<bool>;

async fn report_loop(
    mut head: Head,
    mut rx: mpsc::UnboundedReceiver<PendingReport>,
    mut attached: Attached,
    patience: Duration,
    failed: FailedUnreported,
) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + REPORT_LINGER;
        let mut wait = first.may_wait && first.verdict.is_none();
        let mut batch = vec![first];
        while batch.len() < 1024 {
            let next = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::error::TryRecvError::Empty) if wait => {
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(_) => None,
            };
            let Some(r) = next else { break };
            wait &= r.may_wait && r.verdict.is_none();
            batch.push(r);
        }
        let (reports, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.report, p.verdict)).unzip();
        let n = reports.len();
        // Sent again while the head is away (it restarts: the node rejoins it first),
        // for at most the node's patience.
        let deadline = Instant::now() + patience;
        let sent = loop {
            let _ = attached.wait_for(|up| *up).await;
            match head
                .report_tasks(proto::TaskReports {
                    reports: reports.clone(),
                })
                .await
            {
                Err(e) if super::net::unreachable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => break other,
            }
        };
        // Answered, or given up on (the head then runs them again anyway).
        let mut failed = failed.lock().expect("failed reports lock");
        if !failed.is_empty() {
            for r in &reports {
                if failed
                    .get(&r.task_id)
                    .is_some_and(|t| t.attempt == r.attempt)
                {
                    failed.remove(&r.task_id);
                }
            }
        }
        drop(failed);
        match sent {
            Ok(acks) => {
                let acks = acks.into_inner().acks;
                for (i, w) in waiters.into_iter().enumerate() {
                    if let Some(w) = w {
                        let _ = w.send(acks.get(i).is_none_or(|a| a.stale));
                    }
                }
            }
            Err(e) => {
                // Not delivered: the head runs these tasks again once it declares this
                // node dead, so the attempts here count as superseded.
                warn!(
                    "cannot report {n} task results to the head: {}",
                    e.message()
                );
                for w in waiters.into_iter().flatten() {
                    let _ = w.send(true);
                }
            }
        }
    }
}

type SpawnRequest = (
    tokio::process::Command,
    oneshot::Sender<std::io::Result<tokio::process::Child>>,
);

/// Starts child processes from one thread that lives as long as the agent.
///
/// Workers and drivers ask the kernel to kill them when their parent goes
/// (`PR_SET_PDEATHSIG`), and "parent" there means the *thread* that forked them: a
/// child forked from a runtime thread that later retires would be killed with it.
#[derive(Clone)]
struct Spawner {
    tx: std::sync::mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    fn start(handle: tokio::runtime::Handle) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("volley-spawner".into())
            .spawn(move || {
                let _enter = handle.enter();
                for (mut cmd, reply) in rx {
                    // A job file just copied into place may still be open for writing
                    // in a child another thread forked meanwhile (it closes the copy
                    // when it execs): the kernel refuses to run it until then.
                    let mut spawned = cmd.spawn();
                    for _ in 0..40 {
                        match &spawned {
                            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                                std::thread::sleep(std::time::Duration::from_millis(25));
                                spawned = cmd.spawn();
                            }
                            _ => break,
                        }
                    }
                    let _ = reply.send(spawned);
                }
            })
            .map_err(|e| VolleyError::internal(format!("cannot start the spawner thread: {e}")))?;
        Ok(Self { tx })
    }

    async fn spawn(&self, cmd: tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .map_err(|_| std::io::Error::other("the spawner thread stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the spawner thread stopped"))?
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node_id", &self.node_id)
            .finish()
    }
}

/// glibc's allocator thresholds for a process whose memory budget (a worker's, or a
/// node agent's object store) is `budget`: `(mmap, trim)`, the size from which a buffer
/// is mapped on its own and given back when dropped, and the free memory a heap keeps
/// at its top for the next buffers.
///
/// Small budgets keep 256 KiB and 16 MiB: held in the heap instead (a 4 MiB
/// threshold), the blocks a sort takes in and spills freed memory that no later
/// allocation reused, and a reduce task sorting a partition of ~330 MiB under a 48 MiB
/// budget peaked at 510-600 MiB where it peaks at ~300 MiB (the out-of-core sort test).
/// Large budgets keep more, in proportion (a 256th and a 64th, at most 32 MiB, glibc's
/// ceiling before 2.35, and 256 MiB): batch-sized buffers mapped and unmapped again and
/// again cost a page fault and a zeroed page per 4 KiB each time; a random shuffle
/// (W5) on 2 one-CPU nodes took 2.02-2.07 s with such thresholds against 2.18-2.22 s.
pub fn allocator_thresholds(budget: u64) -> (u64, u64) {
    (
        (budget / 256).clamp(256 << 10, 32 << 20),
        (budget / 64).clamp(16 << 20, 256 << 20),
    )
}

/// glibc's allocator settings (`GLIBC_TUNABLES`) for a job's processes under `budget`:
/// [`allocator_thresholds`], and two heaps (arenas) at most, so that freed memory is
/// reused across the runtime's threads. Other C libraries ignore the variable.
fn malloc_tunables(budget: u64) -> String {
    let (mmap, trim) = allocator_thresholds(budget);
    format!(
        "glibc.malloc.mmap_threshold={mmap}:glibc.malloc.trim_threshold={trim}:\
         glibc.malloc.arena_max=2"
    )
}

/// The variable of a process's memory budget (`volley.exec.memory_limit`).
const MEMORY_LIMIT_VAR: &str = "VOLLEY_EXEC_MEMORY_LIMIT";

/// The memory budget of a job's process on a node offering `resources` with an object
/// store of `store` bytes: one CPU's share of the node's memory past its store, at
/// least 64 MiB. Without it each process would take a quarter of the machine's
/// memory, and a node's workers together could take several times the machine.
fn worker_memory_limit(resources: &Resources, store: u64) -> u64 {
    let free = resources.memory.saturating_sub(store) as f64;
    ((free / resources.num_cpus.max(1.0)) as u64).max(64 << 20)
}

/// Removes a folder when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a node agent until the head forgets it or cannot be reached. Returns why it
/// stopped.
pub async fn run_node(options: NodeOptions) -> Result<String> {
    run_node_until(options, std::future::pending()).await
}

/// Runs a node agent until it loses the head, or until `leave` completes: then it
/// drains (the head sends it no new work and copies the objects only it holds to
/// other nodes; it waits for its running tasks and drivers, at most
/// `options.drain_timeout`) and leaves the cluster. What is still running when it
/// leaves is retried elsewhere, as after a failure. Returns why it stopped.
pub async fn run_node_until(
    options: NodeOptions,
    leave: impl std::future::Future<Output = ()>,
) -> Result<String> {
    options.resources.validate()?;
    std::fs::create_dir_all(&options.dir)?;
    let blobs = BlobCache::open(options.package_cache.clone(), options.package_cache_bytes)?;
    let channels = Channels::new(&options.token, &options.tls);
    let mut head = channels.head(&options.head_address)?;
    let (listener, address) = bind(&options.host, options.port).await?;
    let mut store = ObjectStore::new(options.object_store_memory, options.dir.join("spill"))
        .with_compression(options.object_compression);
    if let Some(dir) = make_shared_dir() {
        store = store.with_shared_dir(dir);
    }
    let store = Arc::new(store);
    // The shared folder goes with the agent, however it stops.
    let _shared = store.shared_dir().map(|d| RemoveOnDrop(d.to_path_buf()));
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| options.host.clone());
    let reg = head
        .register_node(proto::RegisterNodeRequest {
            hostname,
            object_address: address.clone(),
            total: Some((&options.resources).into()),
            gpu_ids: options.gpu_ids.clone(),
            object_store_memory: options.object_store_memory,
            ..Default::default()
        })
        .await
        .map_err(|e| {
            status_error(
                format!("joining the cluster at {}", options.head_address),
                e,
            )
        })?
        .into_inner();
    let node_id = reg.node_id;
    info!("joined as {node_id}; objects and workers on {address}");
    let max_workers = ((options.resources.num_cpus.ceil() as usize) * 4).max(8);
    let (reports, report_rx) = mpsc::unbounded_channel();
    // Both stop with this function however it returns (a failed attach included).
    let (attached_tx, attached) = tokio::sync::watch::channel(true);
    let failed_unreported = FailedUnreported::default();
    let reporter = AbortOnDrop(tokio::spawn(report_loop(
        head.clone(),
        report_rx,
        attached,
        options.head_patience,
        Arc::clone(&failed_unreported),
    )));
    let agent = Arc::new(Agent {
        node_id: node_id.clone(),
        options: options.clone(),
        address: address.clone(),
        head: head.clone(),
        store: Arc::clone(&store),
        channels: channels.clone(),
        blobs,
        state: Mutex::default(),
        changed: Notify::new(),
        jobs: Mutex::default(),
        fetching: tokio::sync::Mutex::new(()),
        max_workers,
        spawner: Spawner::start(tokio::runtime::Handle::current())?,
        reports,
        failed_unreported,
    });

    // One port: Flight for objects, NodeAgent for this node's workers.
    let check = CheckToken::new(&options.token);
    let flight = tonic::service::interceptor::InterceptedService::new(
        arrow_flight::flight_service_server::FlightServiceServer::new(FlightObjects::new(store))
            .max_decoding_message_size(super::net::MAX_MESSAGE)
            .max_encoding_message_size(super::net::MAX_MESSAGE),
        check.clone(),
    );
    let service = proto::node_agent_server::NodeAgentServer::with_interceptor(
        AgentService {
            agent: Arc::clone(&agent),
        },
        check,
    );
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = options.tls.server() {
        builder = builder
            .tls_config(tls)
            .map_err(|e| VolleyError::Config(format!("TLS: {e}")))?;
    }
    let server = builder
        .add_service(flight)
        .add_service(service)
        .serve_with_incoming(incoming);
    let server = AbortOnDrop(tokio::spawn(async move {
        let _ = server.await;
    }));

    let _metrics = match options.metrics_port {
        Some(port) => Some(Arc::clone(&agent).serve_metrics(port).await?),
        None => None,
    };
    let mut commands = head
        .attach(proto::AttachRequest {
            node_id: node_id.clone(),
        })
        .await
        .map_err(|e| status_error("attaching to the head", e))?
        .into_inner();

    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(50));
    let (mut beat, mut _stop_beats) = Arc::clone(&agent).start_heartbeats(interval)?;
    let mut leave = std::pin::pin!(leave);
    let mut drained: std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>> =
        Box::pin(std::future::pending());
    let mut draining = false;
    let why = loop {
        let lost = tokio::select! {
            _ = &mut leave, if !draining => {
                draining = true;
                drained = Box::pin(Arc::clone(&agent).drain(head.clone()));
                continue;
            }
            why = &mut drained => break why,
            c = commands.next() => match c {
                Some(Ok(cmd)) => {
                    if let Some(cmd) = cmd.command {
                        Arc::clone(&agent).handle(cmd);
                    }
                    continue;
                }
                // Leaving closes the stream: the drain says how it ended.
                _ if draining => break (&mut drained).await,
                Some(Err(e)) => format!("the head closed the command stream: {}", e.message()),
                None => "the head closed the command stream".to_string(),
            },
            r = &mut beat => r.unwrap_or_else(|_| "the heartbeat thread stopped".to_string()),
        };
        if draining {
            break lost;
        }
        // The head went (or restarted): rejoin it under this node's id with what is
        // kept here, if it comes back in time.
        attached_tx.send_replace(false);
        // Told to stop meanwhile, it stops at once: there is no head to drain to.
        let rejoined = tokio::select! {
            r = Arc::clone(&agent).rejoin(&mut head, &lost) => r,
            _ = &mut leave => Err(format!("{lost}; told to stop while the head was away")),
        };
        match rejoined {
            Ok(stream) => {
                commands = stream;
                (beat, _stop_beats) = Arc::clone(&agent).start_heartbeats(interval)?;
                attached_tx.send_replace(true);
            }
            Err(why) => break why,
        }
    };
    warn!("{node_id} stops: {why}");
    agent.kill_all();
    // Give the kills a moment to land before the process goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(server);
    drop(reporter);
    Ok(why)
}

impl Agent {
    /// After losing the head (`why`): stops the workers with GPUs and those of actors
    /// still starting (a restarted head knows neither), drops the work waiting for a
    /// worker, and tries, for `head_patience`, to rejoin the head under this node's id
    /// with the objects, drivers, running CPU tasks and CPU actors kept here (their
    /// reports wait). Returns the new command stream, or why it gave up (the head
    /// declared this node dead, or did not come back in time): the caller then stops
    /// everything, and `volley start` joins again as a new node.
    async fn rejoin(
        self: Arc<Self>,
        head: &mut Head,
        why: &str,
    ) -> std::result::Result<tonic::Streaming<proto::NodeCommand>, String> {
        let patience = self.options.head_patience;
        warn!(
            "{}: {why}; its workers stop, its objects and drivers wait {patience:?} for the head",
            self.node_id
        );
        self.keep_cpu_workers();
        let deadline = Instant::now() + patience;
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| self.options.host.clone());
        loop {
            let Kept {
                objects,
                drivers,
                running,
                actors,
            } = self.kept();
            let listed: Vec<(String, u32, String)> = actors
                .iter()
                .map(|a| (a.actor_id.clone(), a.incarnation, a.job_id.clone()))
                .collect();
            let request = proto::RegisterNodeRequest {
                hostname: hostname.clone(),
                object_address: self.address.clone(),
                total: Some((&self.options.resources).into()),
                gpu_ids: self.options.gpu_ids.clone(),
                object_store_memory: self.options.object_store_memory,
                rejoin: self.node_id.clone(),
                objects,
                drivers,
                running,
                actors,
            };
            match head.register_node(request).await {
                Ok(r) => {
                    let r = r.into_inner();
                    for job in &r.drop_jobs {
                        self.drop_job(job);
                    }
                    self.free_objects(&r.free_objects);
                    // The tasks and actors no one will claim.
                    self.stop_unreported(|w| {
                        w.running.iter().any(|(t, _)| r.cancel_tasks.contains(t))
                            || w.actor
                                .as_ref()
                                .is_some_and(|(a, _)| r.stop_actors.contains(a))
                    });
                    // An actor listed above whose process ended since may have had its
                    // end reported before the head knew of it: said again, before this
                    // node takes commands (so that it concerns the actor kept, not
                    // one started here anew), of the actors the head kept.
                    for (actor, incarnation, job) in listed {
                        let dropped = r.stop_actors.contains(&actor) || r.drop_jobs.contains(&job);
                        if !dropped && !self.holds_actor(&actor, incarnation) {
                            let why = "its worker exited while the head was away".to_string();
                            self.report_actor(&actor, incarnation, false, why, 0).await;
                        }
                    }
                    let commands = head
                        .attach(proto::AttachRequest {
                            node_id: self.node_id.clone(),
                        })
                        .await
                        .map_err(|e| format!("cannot attach to the head again: {}", e.message()))?
                        .into_inner();
                    info!("{} rejoined the head", self.node_id);
                    return Ok(commands);
                }
                Err(e) if super::net::unreachable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) if super::net::unreachable(&e) => {
                    return Err(format!(
                        "{why}; the head did not come back within {patience:?}"
                    ));
                }
                Err(e) => return Err(format!("the head refused this node back: {}", e.message())),
            }
        }
    }

    /// What this node kept across the loss of its head: the objects in its store (with
    /// their jobs, bytes and rows) and the jobs whose drivers run here. Objects whose
    /// rows it does not know (copies from a draining node) are dropped, not offered:
    /// a reader would take them for empty.
    fn kept(&self) -> Kept {
        let ids = self.store.ids();
        let mut s = self.state.lock().expect("agent lock");
        let held: std::collections::HashSet<&String> = ids.iter().collect();
        s.object_rows.retain(|id, _| held.contains(id));
        let mut unknown = vec![];
        let mut objects = vec![];
        // A task still running may have stored its object before it reports (its
        // rows are known then): listed as running, its object stays out of the list.
        let running: std::collections::HashSet<&String> = s
            .workers
            .values()
            .flat_map(|w| w.running.iter().map(|(t, _)| t))
            .collect();
        let ids: Vec<&String> = ids.iter().filter(|id| !running.contains(id)).collect();
        for &id in &ids {
            let (Some(rows), Some((job, _)), Some(bytes)) = (
                s.object_rows.get(id).copied(),
                id.split_once(':'),
                self.store.bytes_of(id),
            ) else {
                unknown.push(id.clone());
                continue;
            };
            objects.push(proto::HeldObject {
                object_id: id.clone(),
                job_id: job.to_string(),
                bytes,
                rows,
            });
        }
        let drivers = s.drivers.keys().cloned().collect();
        let live = s.workers.values().filter(|w| !w.exiting);
        let running = live
            .clone()
            .flat_map(|w| {
                w.running.iter().map(|(id, attempt)| proto::RunningTask {
                    task_id: id.clone(),
                    attempt: *attempt,
                    job_id: w.job.clone(),
                    // An actor's call holds nothing of its own.
                    num_cpus: if w.actor.is_some() { 0.0 } else { w.cpus },
                    actor_call: w.actor.is_some(),
                })
            })
            // The calls queued for kept actors run here too, in their turn.
            .chain(s.calls.values().flatten().map(|t| proto::RunningTask {
                task_id: t.task_id.clone(),
                attempt: t.attempt,
                job_id: t.job_id.clone(),
                num_cpus: 0.0,
                actor_call: true,
            }))
            // And those that failed, whose reports are on their way.
            .chain(
                self.failed_unreported
                    .lock()
                    .expect("failed reports lock")
                    .values()
                    .cloned(),
            )
            .collect();
        let actors = live
            .filter_map(|w| {
                let (id, incarnation) = w.actor.as_ref()?;
                Some(proto::KeptActor {
                    actor_id: id.clone(),
                    job_id: w.job.clone(),
                    incarnation: *incarnation,
                    pid: w.pid,
                    resources: w.actor_held.clone(),
                })
            })
            .collect();
        drop(s);
        self.store.free(&unknown);
        Kept {
            objects,
            drivers,
            running,
            actors,
        }
    }

    /// Stops the workers `which` picks without reporting what they ran (a rejoined
    /// head will not claim it).
    fn stop_unreported(&self, which: impl Fn(&WorkerEntry) -> bool) {
        let mut s = self.state.lock().expect("agent lock");
        for w in s.workers.values_mut().filter(|w| which(w)) {
            w.stop_unreported();
        }
    }

    /// Whether a live worker here holds incarnation `incarnation` of actor `actor`.
    fn holds_actor(&self, actor: &str, incarnation: u32) -> bool {
        let s = self.state.lock().expect("agent lock");
        s.workers.values().any(|w| {
            !w.exiting
                && w.actor
                    .as_ref()
                    .is_some_and(|(a, i)| a == actor && *i == incarnation)
        })
    }

    /// Drops objects from the store, as the head asks.
    fn free_objects(&self, ids: &[String]) {
        let mut s = self.state.lock().expect("agent lock");
        for id in ids {
            s.object_rows.remove(id);
        }
        drop(s);
        self.store.free(ids);
    }

    /// Stops the workers with GPUs and those of actors still starting, and drops the
    /// tasks waiting for a worker (they come again with their drivers' replay). The
    /// drivers, the CPU workers' running tasks and the CPU actors stay, and so do the
    /// calls queued for those actors: they run on, in order, and are listed to the new
    /// head with the running ones. (A call whose result its driver let go of is not
    /// replayed: dropped here, it would never be made, and its actor would miss it.)
    fn keep_cpu_workers(&self) {
        let mut s = self.state.lock().expect("agent lock");
        s.queues.clear();
        s.ahead.clear();
        let kept_actors: std::collections::HashSet<String> = s
            .workers
            .values()
            .filter(|w| !w.exiting && w.start_actor.is_none() && w.gpus.is_empty())
            .filter_map(|w| w.actor.as_ref().map(|(a, _)| a.clone()))
            .collect();
        s.calls.retain(|actor, _| kept_actors.contains(actor));
        for w in s
            .workers
            .values_mut()
            .filter(|w| w.start_actor.is_some() || !w.gpus.is_empty())
        {
            // What they ran is reported to no head: a report reaching the new one
            // could be taken for a later attempt's.
            w.stop_unreported();
        }
        drop(s);
        self.changed.notify_waiters();
    }

    /// Drops job `job`'s driver and objects here, as a rejoined head asks for a job
    /// that ended, or started again elsewhere, while this node was away (the job's work
    /// is still taken later: it may run here again).
    fn drop_job(&self, job: &str) {
        let mut s = self.state.lock().expect("agent lock");
        if let Some(k) = s.drivers.remove(job) {
            let _ = k.send(());
        }
        for w in s.workers.values_mut().filter(|w| w.job == job) {
            w.stop_unreported();
        }
        drop(s);
        let ids = self.store_ids_with_prefix(&format!("{job}:"));
        self.free_objects(&ids);
    }

    /// Starts the heartbeats on a thread, runtime and connection of their own, so that a
    /// node busy moving objects (Flight encoding and decoding on the agent's runtime,
    /// memory copies, a saturated machine) still shows the head it is alive. The
    /// receiver gets why they stopped; dropping the sender stops them.
    fn start_heartbeats(
        self: Arc<Self>,
        interval: Duration,
    ) -> Result<(oneshot::Receiver<String>, oneshot::Sender<()>)> {
        let (done_tx, done_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                VolleyError::internal(format!("cannot start the heartbeat runtime: {e}"))
            })?;
        std::thread::Builder::new()
            .name("volley-heartbeat".into())
            .spawn(move || {
                let why = runtime.block_on(async move {
                    // A connection of this thread's own: the agent's shared one is driven
                    // by the agent's runtime.
                    let channels = Channels::new(&self.options.token, &self.options.tls);
                    let head = match channels.head(&self.options.head_address) {
                        Ok(h) => h,
                        Err(e) => return format!("cannot reach the head: {e}"),
                    };
                    tokio::select! {
                        why = self.heartbeats(head, interval) => why,
                        _ = stop_rx => String::new(),
                    }
                });
                let _ = done_tx.send(why);
            })
            .map_err(|e| {
                VolleyError::internal(format!("cannot start the heartbeat thread: {e}"))
            })?;
        Ok((done_rx, stop_tx))
    }

    async fn heartbeats(&self, mut head: Head, interval: Duration) -> String {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            let (bytes, spilled) = self.store.usage();
            let spilled_total = self.store.spilled_total();
            let workers = self.state.lock().expect("agent lock").workers.len() as u32;
            match head
                .heartbeat(proto::HeartbeatRequest {
                    node_id: self.node_id.clone(),
                    object_store_bytes: bytes,
                    spilled_bytes: spilled,
                    spilled_total,
                    workers,
                })
                .await
            {
                Ok(r) if r.get_ref().known => last_ok = Instant::now(),
                Ok(_) => return "the head declared this node dead".into(),
                Err(e) => {
                    if last_ok.elapsed() > interval * 20 {
                        return format!("lost the head: {}", e.message());
                    }
                }
            }
        }
    }

    fn handle(self: Arc<Self>, command: Command) {
        match command {
            Command::RunTask(task) if task.ahead => {
                self.state.lock().expect("agent lock").ahead.push_back(task);
            }
            Command::PromoteTask(id) => {
                let task = {
                    let mut s = self.state.lock().expect("agent lock");
                    let at = s.ahead.iter().position(|t| t.task_id == id);
                    // Gone when a worker already took it over.
                    at.and_then(|i| s.ahead.remove(i))
                };
                if let Some(mut task) = task {
                    task.ahead = false;
                    Arc::clone(&self).handle(Command::RunTask(task));
                }
            }
            Command::RunTask(task) => {
                {
                    let mut s = self.state.lock().expect("agent lock");
                    if task.actor_id.is_empty() {
                        s.queues
                            .entry((task.job_id.clone(), task.gpu_ids.clone()))
                            .or_default()
                            .push_back(task.clone());
                    } else {
                        s.calls
                            .entry(task.actor_id.clone())
                            .or_default()
                            .push_back(task.clone());
                    }
                }
                self.changed.notify_waiters();
                if task.actor_id.is_empty() {
                    tokio::spawn(self.ensure_workers(task.job_id, task.gpu_ids));
                }
            }
            Command::CancelTask(id) => {
                let mut dropped = Vec::new();
                {
                    let mut s = self.state.lock().expect("agent lock");
                    for q in s.queues.values_mut() {
                        q.retain(|t| {
                            let keep = t.task_id != id;
                            if !keep {
                                dropped.push(t.clone());
                            }
                            keep
                        });
                    }
                    s.ahead.retain(|t| t.task_id != id);
                    for w in s.workers.values_mut() {
                        if w.running.iter().any(|(t, _)| *t == id) {
                            // Exiting: should it finish the task before the kill lands,
                            // it is told to exit instead of taking another task (which
                            // the kill would then cost a retry).
                            w.stop();
                        }
                    }
                }
                // A task dropped before a worker took it ends here: the head hears so
                // (and frees what it held for it), as it hears of a killed worker's.
                for t in dropped {
                    self.report(&t, Outcome::SystemFailure, "cancelled".into());
                }
            }
            Command::FreeObjects(ids) => self.free_objects(&ids.ids),
            Command::PrepareJob(job) => {
                tokio::spawn(self.prepare_job(job));
            }
            Command::StopJob(job) => self.stop_job(&job),
            Command::StartDriver(d) => {
                tokio::spawn(async move {
                    let job = d.job_id.clone();
                    if let Err(e) = Arc::clone(&self).start_driver(d).await {
                        warn!("job {job}: cannot start the driver: {e}");
                        let mut head = self.head.clone();
                        let _ = head
                            .report_driver_exit(proto::DriverExit {
                                node_id: self.node_id.clone(),
                                job_id: job,
                                exit_code: -1,
                                error: format!("cannot start the driver: {e}"),
                            })
                            .await;
                    }
                });
            }
            Command::StartActor(a) => {
                tokio::spawn(async move {
                    let (id, inc) = (a.actor_id.clone(), a.incarnation);
                    if let Err(e) = Arc::clone(&self)
                        .spawn_worker(&a.job_id.clone(), a.gpu_ids.clone(), Some(a))
                        .await
                    {
                        self.report_actor(
                            &id,
                            inc,
                            false,
                            format!("cannot start its worker: {e}"),
                            0,
                        )
                        .await;
                    }
                });
            }
            Command::CopyObject(c) => {
                tokio::spawn(self.copy_object(c));
            }
            Command::ReadLogs(q) => {
                tokio::spawn(async move {
                    let dir = self.options.dir.join("jobs").join(&q.job_id);
                    let agent = Arc::clone(&self);
                    let node = self.node_id.clone();
                    let query = q.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        // Still working for this job: not leaving, not kept as a
                        // spare or taken over by another job.
                        let alive = |w: &str| {
                            agent
                                .state
                                .lock()
                                .expect("agent lock")
                                .workers
                                .get(w)
                                .is_some_and(|w| {
                                    !w.exiting && w.job == query.job_id && w.spare_since.is_none()
                                })
                        };
                        worker_logs::read_sections(&dir, &node, &query, &alive)
                    })
                    .await;
                    let (sections, error) = match read {
                        Ok(Ok(s)) => (s, String::new()),
                        Ok(Err(e)) => (vec![], e.to_string()),
                        Err(e) => (vec![], e.to_string()),
                    };
                    let mut head = self.head.clone();
                    let _ = head
                        .reply_logs(proto::LogReply {
                            query_id: q.query_id,
                            node_id: self.node_id.clone(),
                            sections,
                            error,
                        })
                        .await;
                });
            }
            Command::StopActor(id) => {
                let mut s = self.state.lock().expect("agent lock");
                s.calls.remove(&id);
                for w in s.workers.values_mut() {
                    if w.actor.as_ref().is_some_and(|(a, _)| *a == id) {
                        w.stop();
                    }
                }
            }
        }
    }

    fn stop_job(self: &Arc<Self>, job: &str) {
        let mut s = self.state.lock().expect("agent lock");
        s.stopped_jobs.insert(job.to_string());
        s.failed_starts.remove(job);
        s.queues.retain(|(j, _), _| j != job);
        s.ahead.retain(|t| t.job_id != job);
        let calls: Vec<String> = s
            .calls
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|t| t.job_id == job))
            .map(|(a, _)| a.clone())
            .collect();
        for a in calls {
            s.calls.remove(&a);
        }
        let mut spares = Vec::new();
        for (id, w) in s.workers.iter_mut().filter(|(_, w)| w.job == job) {
            if w.kin.is_some() && w.idle() && w.pulled {
                let since = Instant::now();
                w.spare_since = Some(since);
                spares.push((id.clone(), since));
            } else {
                w.stop();
            }
        }
        if let Some(k) = s.drivers.remove(job) {
            let _ = k.send(());
        }
        drop(s);
        for (id, since) in spares {
            let agent = Arc::clone(self);
            tokio::spawn(async move {
                tokio::time::sleep(SPARE_LINGER).await;
                let mut s = agent.state.lock().expect("agent lock");
                if let Some(w) = s.workers.get_mut(&id) {
                    if w.spare_since == Some(since) {
                        w.stop();
                    }
                }
            });
        }
        let prefix = format!("{job}:");
        let ids: Vec<String> = self.store_ids_with_prefix(&prefix);
        {
            let mut s = self.state.lock().expect("agent lock");
            for id in &ids {
                s.object_rows.remove(id);
            }
        }
        self.store.free(&ids);
        self.jobs.lock().expect("jobs lock").remove(job);
        let _ = std::fs::remove_dir_all(self.options.dir.join("jobs").join(job).join("package"));
        self.changed.notify_waiters();
    }

    /// This node's figures for its `/metrics`.
    fn figures(&self) -> super::metrics::AgentFigures {
        let (bytes, disk) = self.store.usage();
        let s = self.state.lock().expect("agent lock");
        super::metrics::AgentFigures {
            node_id: self.node_id.clone(),
            object_store_bytes: bytes,
            object_store_limit: self.options.object_store_memory,
            object_store_disk_bytes: disk,
            spilled_total: self.store.spilled_total(),
            workers: s.workers.len() as u64,
            running_tasks: s.workers.values().map(|w| w.running.len() as u64).sum(),
            queued_tasks: s.queues.values().map(|q| q.len() as u64).sum::<u64>()
                + s.ahead.len() as u64,
            package_cache_bytes: 0,
            package_fetched_bytes: self.blobs.received_bytes(),
        }
    }

    /// Serves `/metrics` (and `/healthz`) on `port` of the node's host; the server
    /// stops when the returned guard is dropped.
    async fn serve_metrics(self: Arc<Self>, port: u16) -> Result<AbortOnDrop> {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let (listener, address) = bind(&self.options.host, port).await?;
        info!("{}: /metrics on http://{address}", self.node_id);
        let agent = Arc::clone(&self);
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move |headers: HeaderMap| {
                    let agent = Arc::clone(&agent);
                    async move {
                        let given = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "));
                        if !given.is_some_and(|t| super::auth::same_token(t, &agent.options.token))
                        {
                            return (
                                StatusCode::UNAUTHORIZED,
                                "a cluster token is needed (Authorization: Bearer TOKEN)",
                            )
                                .into_response();
                        }
                        let mut figures = tokio::task::spawn_blocking({
                            let agent = Arc::clone(&agent);
                            move || (agent.figures(), agent.blobs.size())
                        })
                        .await
                        .unwrap_or_default();
                        figures.0.package_cache_bytes = figures.1;
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            super::metrics::render_agent(&figures.0),
                        )
                            .into_response()
                    }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }));
        let _ = std::fs::write(self.options.dir.join("metrics_address"), &address);
        let server = match self.options.tls.acceptor()? {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(acceptor) => tokio::spawn(super::http::serve_tls(listener, app, acceptor)),
        };
        Ok(AbortOnDrop(server))
    }

    /// Drains this node and leaves the cluster (see [`run_node_until`]).
    async fn drain(self: Arc<Self>, mut head: Head) -> String {
        let deadline = Instant::now() + self.options.drain_timeout;
        info!("{}: draining", self.node_id);
        let request = |leave| proto::DrainRequest {
            node_id: self.node_id.clone(),
            leave,
        };
        loop {
            match head.drain_node(request(false)).await {
                Ok(r) => {
                    let s = r.into_inner();
                    if s.running_tasks == 0 && s.drivers == 0 && s.objects_to_copy == 0 {
                        break;
                    }
                    if Instant::now() >= deadline {
                        warn!(
                            "{}: leaving after {:?} with {} task(s) and {} driver(s) running \
                             and {} object(s) not copied: they are retried or rebuilt elsewhere",
                            self.node_id,
                            self.options.drain_timeout,
                            s.running_tasks,
                            s.drivers,
                            s.objects_to_copy
                        );
                        break;
                    }
                }
                Err(e) => {
                    return format!(
                        "{} stops without draining: the head answered {}",
                        self.node_id,
                        e.message()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = head.drain_node(request(true)).await;
        format!("{} drained and left the cluster", self.node_id)
    }

    /// Copies object `c.object_id` from the store at `c.from` into this node's store.
    async fn copy_object(self: Arc<Self>, c: proto::ObjectCopy) {
        let copied = async {
            // Batch by batch as stored: a map output's batches are its partitions.
            let batches =
                super::objects::fetch_whole(&self.channels, &c.from, &c.object_id).await?;
            let store = Arc::clone(&self.store);
            let id = c.object_id.clone();
            tokio::task::spawn_blocking(move || store.put(&id, batches))
                .await
                .map_err(|e| VolleyError::internal(e.to_string()))?
        }
        .await;
        let (bytes, error) = match copied {
            Ok(b) => (b, String::new()),
            Err(e) => (0, e.to_string()),
        };
        let mut head = self.head.clone();
        let _ = head
            .report_object_copied(proto::ObjectCopied {
                object_id: c.object_id,
                node_id: self.node_id.clone(),
                bytes,
                error,
            })
            .await;
    }

    fn store_ids_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.store
            .ids()
            .into_iter()
            .filter(|i| i.starts_with(prefix))
            .collect()
    }

    fn kill_all(&self) {
        let mut s = self.state.lock().expect("agent lock");
        for w in s.workers.values_mut() {
            w.stop();
        }
        for (_, k) in s.drivers.drain() {
            let _ = k.send(());
        }
    }

    /// Whether job `job` was stopped here (its work refused from then on).
    fn stopped(&self, job: &str) -> bool {
        self.state
            .lock()
            .expect("agent lock")
            .stopped_jobs
            .contains(job)
    }

    /// Fetches the job's package once; refused for a stopped job.
    async fn job(&self, job: &str) -> Result<LocalJob> {
        if self.stopped(job) {
            return Err(VolleyError::execution(format!("job {job} has stopped")));
        }
        let cell = {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            Arc::clone(jobs.entry(job.to_string()).or_default())
        };
        let r = cell
            .get_or_init(|| async { self.fetch_job(job).await.map_err(|e| e.to_string()) })
            .await;
        r.clone().map_err(VolleyError::execution)
    }

    async fn fetch_job(&self, job: &str) -> Result<LocalJob> {
        let mut head = self.head.clone();
        let info = head
            .get_job(proto::JobId {
                job_id: job.to_string(),
            })
            .await
            .map_err(|e| status_error(format!("job {job}"), e))?
            .into_inner();
        let package = self.options.dir.join("jobs").join(job).join("package");
        let manifest = head
            .fetch_package(proto::JobId {
                job_id: job.to_string(),
            })
            .await
            .map_err(|e| status_error(format!("fetching job {job}"), e))?
            .into_inner();
        check_manifest(&manifest, u64::MAX)?;
        // Another agent sharing the cache may evict a file between its fetch and the
        // copy: a second round fetches it again.
        let mut tries = 0;
        loop {
            tries += 1;
            let mut missing = tokio::task::block_in_place(|| self.blobs.missing(&manifest));
            // One fetch at a time: jobs started together (each prepared at once) share
            // their binary, fetched once; asked again once the fetch ahead is done.
            let _fetching = if missing.is_empty() {
                None
            } else {
                let held = self.fetching.lock().await;
                missing = tokio::task::block_in_place(|| self.blobs.missing(&manifest));
                Some(held)
            };
            if !missing.is_empty() {
                let count = missing.len();
                let stream = head
                    .fetch_blob(proto::Digests { digests: missing })
                    .await
                    .map_err(|e| status_error(format!("fetching job {job}"), e))?
                    .into_inner();
                let (bytes, _) = receive_blobs(&self.blobs, stream, u64::MAX)
                    .await
                    .map_err(|e| e.context(format!("fetching job {job}")))?;
                info!(
                    "job {job}: fetched {count} of its {} files ({}); the others were cached",
                    manifest.files.len(),
                    volley_common::format_bytes(bytes)
                );
            }
            let copied =
                tokio::task::block_in_place(|| self.blobs.materialize(&manifest, &package));
            match copied {
                Ok(()) => break,
                Err(e) if tries >= 2 => return Err(e.context(format!("job {job}"))),
                Err(_) => continue,
            }
        }
        // Stopped while its files were put in place: `stop_job` removed them already.
        if self.stopped(job) {
            let _ = std::fs::remove_dir_all(&package);
            return Err(VolleyError::execution(format!("job {job} has stopped")));
        }
        let keep = manifest.files.iter().map(|f| f.digest.clone()).collect();
        tokio::task::block_in_place(|| self.blobs.evict(&keep));
        let kin = info.share_workers.then(|| {
            let mut files: Vec<_> = manifest
                .files
                .iter()
                .map(|f| (f.path.as_str(), f.digest.as_str(), f.mode))
                .collect();
            files.sort_unstable();
            let env: std::collections::BTreeMap<_, _> = info.env.iter().collect();
            format!("{files:?} {:?} {env:?}", info.entrypoint.first())
        });
        Ok(LocalJob {
            package,
            entrypoint: info.entrypoint,
            env: info.env,
            kin,
        })
    }

    /// The command that runs the job's binary (with [`malloc_tunables`]).
    fn command(&self, job: &LocalJob) -> Result<tokio::process::Command> {
        let first = job
            .entrypoint
            .first()
            .ok_or_else(|| VolleyError::plan("the job has no entrypoint"))?;
        let in_package = job.package.join(first);
        let program: PathBuf = if Path::new(first).is_relative() && in_package.is_file() {
            in_package
        } else {
            PathBuf::from(first)
        };
        let mut cmd = tokio::process::Command::new(program);
        if let Some(ca) = self.options.tls.ca_path() {
            cmd.env("VOLLEY_TLS_CA", ca);
        }
        // A job's processes spill past their budget (a reduce task's sort): unless
        // the job or the node's environment sets it, their share of the node.
        let set = job
            .env
            .get(MEMORY_LIMIT_VAR)
            .cloned()
            .or_else(|| std::env::var(MEMORY_LIMIT_VAR).ok());
        let budget = match set {
            Some(v) => volley_common::parse_bytes(&v).ok(),
            None => {
                let limit =
                    worker_memory_limit(&self.options.resources, self.options.object_store_memory);
                cmd.env(MEMORY_LIMIT_VAR, limit.to_string());
                Some(limit)
            }
        };
        // Unless the node's (or the job's) environment says otherwise.
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            cmd.env("GLIBC_TUNABLES", malloc_tunables(budget.unwrap_or(0)));
        }
        cmd.args(&job.entrypoint[1..])
            .current_dir(&job.package)
            .envs(&job.env)
            .env("VOLLEY_ADDRESS", &self.options.head_address)
            .env("VOLLEY_TOKEN", &self.options.token)
            .env("VOLLEY_NODE_ID", &self.node_id)
            .env(COMPRESSION_VAR, self.options.object_compression.name())
            .env_remove("VOLLEY_TLS_CERT")
            .env_remove("VOLLEY_TLS_KEY")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Starts workers for tasks of `job` queued here, in the background.
    fn respawn(self: &Arc<Self>, job: String, gpus: Vec<u32>) {
        tokio::spawn(Arc::clone(self).ensure_workers(job, gpus));
    }

    /// Gets a job that just started ready to run tasks here: its package fetched and
    /// its files linked or copied, before its first task comes. Short jobs (a query on
    /// the cluster takes a fraction of a second) would otherwise wait for it at their
    /// first task; the driver's own start-up and planning hide it. Workers start with
    /// the tasks (workers started ahead, idle, raised the nodes' memory past the
    /// out-of-core test's bound and held up an actor pool's start in a test run).
    async fn prepare_job(self: Arc<Self>, job: String) {
        if self.stopped(&job) {
            return;
        }
        if let Err(e) = self.job(&job).await {
            // Said again, with the task it fails, if the job sends any here.
            warn!("job {job}: cannot get its package ready: {e}");
        }
    }

    async fn ensure_workers(self: Arc<Self>, job: String, gpus: Vec<u32>) {
        // `Some(None)`: no worker starts, and those of the job that did take what is
        // queued; `Some(Some(why))`: none did, so it goes back.
        let failing = {
            let s = self.state.lock().expect("agent lock");
            s.failed_starts
                .get(&job)
                .filter(|f| f.count >= MAX_FAILED_STARTS && f.last.elapsed() < FAILED_STARTS_PAUSE)
                .map(|f| {
                    let started = s
                        .workers
                        .values()
                        .any(|w| w.job == job && w.gpus == gpus && w.pulled && !w.exiting);
                    (!started).then(|| {
                        format!(
                            "{} workers of job {job} in a row exited before they asked for work ({})",
                            f.count, f.why
                        )
                    })
                })
        };
        if let Some(why) = failing {
            if let Some(why) = why {
                self.hand_back(&job, &gpus, &why);
            }
            return;
        }
        // Its package (fetched once): whether spares of an ended job may take its tasks.
        let local = match gpus.is_empty() {
            true => self.job(&job).await.ok(),
            false => None,
        };
        // The folder a spare's log goes to (the worker makes the file when it moves).
        let logs = self.options.dir.join("jobs").join(&job);
        let local = local.filter(|l| l.kin.is_none() || std::fs::create_dir_all(&logs).is_ok());
        let (need, released, adopted) = {
            let mut s = self.state.lock().expect("agent lock");
            let queued = s
                .queues
                .get(&(job.clone(), gpus.clone()))
                .map_or(0, |q| q.len());
            let idle = s
                .workers
                .values()
                .filter(|w| w.job == job && w.gpus == gpus && w.idle())
                .count();
            let mut wanted = queued.saturating_sub(idle);
            // Spares of its kin take its tasks first, moved to its folder and log.
            let mut adopted = 0;
            if let Some(LocalJob {
                kin: Some(kin),
                package,
                ..
            }) = &local
            {
                for (id, w) in s.workers.iter_mut() {
                    if adopted == wanted {
                        break;
                    }
                    if w.spare_since.is_none() || w.exiting || w.kin.as_ref() != Some(kin) {
                        continue;
                    }
                    let log = worker_logs::worker_log(&logs, id);
                    w.spare_since = None;
                    w.job.clone_from(&job);
                    w.moved = Some(proto::WorkerJob {
                        job_id: job.clone(),
                        dir: package.to_string_lossy().into_owned(),
                        log: log.to_string_lossy().into_owned(),
                    });
                    adopted += 1;
                }
            }
            wanted -= adopted;
            let room = self.max_workers.saturating_sub(s.workers.len());
            // Idle workers of other jobs (prepared for jobs that sent no task here)
            // give way: each exits, and its exit starts the workers missing here.
            let mut released = 0;
            if wanted > room {
                for w in s
                    .workers
                    .values_mut()
                    .filter(|w| w.job != job && w.idle())
                    .take(wanted - room)
                {
                    w.exiting = true;
                    released += 1;
                }
            }
            (wanted.min(room), released, adopted)
        };
        if released > 0 || adopted > 0 {
            self.changed.notify_waiters();
        }
        for _ in 0..need {
            if let Err(e) = Arc::clone(&self)
                .spawn_worker(&job, gpus.clone(), None)
                .await
            {
                warn!("job {job}: cannot start a worker: {e}");
                self.hand_back(&job, &gpus, &e.to_string());
                return;
            }
        }
    }

    /// The tasks of `job` queued here for workers with `gpus` cannot run here (`why`):
    /// handed back to the head as failed attempts.
    fn hand_back(&self, job: &str, gpus: &[u32], why: &str) {
        let tasks: Vec<proto::TaskAssignment> = {
            let mut s = self.state.lock().expect("agent lock");
            s.queues
                .remove(&(job.to_string(), gpus.to_vec()))
                .map(Vec::from)
                .unwrap_or_default()
        };
        for t in tasks {
            self.report(
                &t,
                Outcome::NoWorker,
                format!("cannot start a worker on {}: {why}", self.node_id),
            );
        }
    }

    async fn spawn_worker(
        self: Arc<Self>,
        job_id: &str,
        gpus: Vec<u32>,
        actor: Option<proto::StartActor>,
    ) -> Result<()> {
        if self.stopped(job_id) {
            return Ok(());
        }
        let job = self.job(job_id).await?;
        let id = {
            let mut s = self.state.lock().expect("agent lock");
            if s.stopped_jobs.contains(job_id) {
                return Ok(());
            }
            s.next_worker += 1;
            format!("{}-w{}", self.node_id, s.next_worker)
        };
        let logs = self.options.dir.join("jobs").join(job_id);
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::File::create(worker_logs::worker_log(&logs, &id))?;
        let mut cmd = self.command(&job)?;
        cmd.env("VOLLEY_WORKER_ID", &id)
            .env("VOLLEY_AGENT_ADDRESS", &self.address)
            .env(
                SHARED_DIR_VAR,
                self.store
                    .shared_dir()
                    .map(Path::as_os_str)
                    .unwrap_or_default(),
            )
            .env("VOLLEY_JOB_ID", job_id)
            .env("CUDA_VISIBLE_DEVICES", join_ids(&gpus))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        // Known before its process starts: a worker that asks for work before the
        // spawn returns here must not be told to exit as a stranger (its tasks would
        // wait for a worker that no longer comes).
        let (kill_tx, kill_rx) = oneshot::channel();
        // Only a task worker without GPUs may serve another job later.
        let kin = job
            .kin
            .clone()
            .filter(|_| actor.is_none() && gpus.is_empty());
        {
            let mut s = self.state.lock().expect("agent lock");
            // Checked with the insert: a stop in between would not see this worker.
            if s.stopped_jobs.contains(job_id) {
                return Ok(());
            }
            s.workers.insert(
                id.clone(),
                WorkerEntry {
                    job: job_id.to_string(),
                    gpus,
                    running: Vec::new(),
                    cpus: 0.0,
                    actor: None,
                    actor_held: None,
                    pid: 0,
                    start_actor: actor,
                    kill: Some(kill_tx),
                    exiting: false,
                    pulled: false,
                    kin,
                    spare_since: None,
                    moved: None,
                },
            );
        }
        let mut child = match self.spawner.spawn(cmd).await {
            Ok(child) => child,
            Err(e) => {
                self.state.lock().expect("agent lock").workers.remove(&id);
                return Err(VolleyError::execution(format!(
                    "cannot start {:?}: {e}",
                    job.entrypoint[0]
                )));
            }
        };
        let pid = child.id().unwrap_or(0);
        if let Some(w) = self.state.lock().expect("agent lock").workers.get_mut(&id) {
            w.pid = pid;
        }
        let agent = Arc::clone(&self);
        tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let waiting = agent
                .worker_exited(
                    &id,
                    pid,
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|e| e.to_string()),
                )
                .await;
            // Tasks still queued here get workers: of its job, and of any job that
            // found no room for a worker while this one lived.
            for (job, gpus) in waiting {
                agent.respawn(job, gpus);
            }
        });
        Ok(())
    }

    /// Reports what worker `id` held as failed; returns the jobs and GPUs whose tasks
    /// wait here (its room may be what they lacked for a worker).
    async fn worker_exited(&self, id: &str, pid: u32, status: String) -> Vec<(String, Vec<u32>)> {
        let (entry, waiting) = {
            let mut s = self.state.lock().expect("agent lock");
            let entry = s.workers.remove(id);
            let waiting: Vec<(String, Vec<u32>)> = s
                .queues
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| k.clone())
                .collect();
            (entry, waiting)
        };
        self.changed.notify_waiters();
        let Some(w) = entry else {
            return waiting;
        };
        let why = format!("worker process {pid} on {} exited ({status})", self.node_id);
        if w.exiting {
            // Told to exit (to give way, or killed for a cancel): a task it was still
            // running ended with it, and the head hears so (a cancelled task's GPUs
            // wait for that).
            self.report_lost(w.running, &why);
            return waiting;
        }
        // One stopped with its job does not count.
        let stopped = self.stopped(&w.job);
        if !w.pulled && w.start_actor.is_none() && !stopped {
            let dir = self.options.dir.join("jobs").join(&w.job);
            let printed = worker_logs::last_lines(&worker_logs::worker_log(&dir, id), 3);
            let why = match printed.is_empty() {
                true => format!("the last: {status}"),
                false => format!("the last: {status}; its output ends: {printed}"),
            };
            let mut s = self.state.lock().expect("agent lock");
            let f = s
                .failed_starts
                .entry(w.job.clone())
                .or_insert(FailedStarts {
                    count: 0,
                    last: Instant::now(),
                    why: String::new(),
                });
            f.count += 1;
            f.last = Instant::now();
            f.why = why;
            if f.count == MAX_FAILED_STARTS {
                warn!(
                    "job {}: {} workers in a row exited before they asked for work ({}); none more for {:?}",
                    w.job, f.count, f.why, FAILED_STARTS_PAUSE
                );
            }
        }
        // An actor's death goes first: the head must stop routing calls to it before
        // the call that was running is reported failed (its caller may call again at
        // once). Calls queued here for it are dropped; the head decides their fate.
        if let Some((actor, inc)) = w.actor.clone().or(w
            .start_actor
            .as_ref()
            .map(|a| (a.actor_id.clone(), a.incarnation)))
        {
            self.state.lock().expect("agent lock").calls.remove(&actor);
            self.report_actor(&actor, inc, false, why.clone(), 0).await;
        }
        for (task, _) in &w.running {
            warn!("{why} while running task {task}");
        }
        self.report_lost(w.running, &why);
        waiting
    }

    /// Reports the task attempts a dead worker was `running` as failed (`why`).
    fn report_lost(&self, running: Vec<(String, u32)>, why: &str) {
        for (task, attempt) in running {
            let report = proto::TaskReport {
                node_id: self.node_id.clone(),
                task_id: task,
                attempt,
                outcome: Outcome::SystemFailure as i32,
                error: Some(wire_execution_error(why.to_string())),
                ..Default::default()
            };
            let _ = self.reports.send(PendingReport::now(report));
        }
    }

    /// What worker `id` does next, if anything is waiting for it: exit, become an
    /// actor, or run a task (or an actor call).
    fn next_for(&self, id: &str) -> Option<proto::PullResponse> {
        self.next_after(id, None).0
    }

    /// [`Self::next_for`], for a worker whose task of `freed` CPUs just finished: with
    /// nothing else waiting, it takes over a task sent ahead that asks for the same
    /// CPUs (returned second: the head learns it from the finished task's report).
    fn next_after(
        &self,
        id: &str,
        freed: Option<f64>,
    ) -> (Option<proto::PullResponse>, Option<String>) {
        let (next, successor, job) = self.take_next(id, freed);
        // Where each task's output begins in its worker's file (`volley logs --task`).
        if let (Some(next), Some(job)) = (&next, job) {
            let dir = self.options.dir.join("jobs").join(job);
            if let Some(t) = next.task.as_ref().filter(|t| t.actor_id.is_empty()) {
                worker_logs::note_task(&dir, &t.task_id, t.attempt, &t.name, id);
            }
            if let Some(a) = &next.actor {
                worker_logs::note_actor(&dir, &a.actor_id, a.incarnation, id);
            }
        }
        (next, successor)
    }

    /// [`Self::next_after`] under the agent's lock, with the worker's job.
    fn take_next(
        &self,
        id: &str,
        freed: Option<f64>,
    ) -> (Option<proto::PullResponse>, Option<String>, Option<String>) {
        let mut s = self.state.lock().expect("agent lock");
        let s = &mut *s;
        let exit = proto::PullResponse {
            exit: true,
            ..Default::default()
        };
        let Some(w) = s.workers.get_mut(id) else {
            return (Some(exit), None, None);
        };
        if !w.pulled {
            // Its program started as a worker: the job's workers start fine here.
            w.pulled = true;
            s.failed_starts.remove(&w.job);
        }
        if w.exiting {
            return (Some(exit), None, None);
        }
        if let Some(a) = w.start_actor.take() {
            w.actor = Some((a.actor_id.clone(), a.incarnation));
            w.actor_held.clone_from(&a.resources);
            let start = proto::PullResponse {
                actor: Some(a),
                ..Default::default()
            };
            return (Some(start), None, Some(w.job.clone()));
        }
        let mut successor = None;
        let mut next = match &w.actor {
            Some((actor, _)) => s.calls.get_mut(actor).and_then(|q| q.pop_front()),
            None => s
                .queues
                .get_mut(&(w.job.clone(), w.gpus.clone()))
                .and_then(|q| q.pop_front()),
        };
        if let (None, Some(cpus), None, true) = (&next, freed, &w.actor, w.gpus.is_empty()) {
            let at = s
                .ahead
                .iter()
                .position(|t| t.job_id == w.job && t.num_cpus == cpus);
            next = at.and_then(|i| s.ahead.remove(i)).map(|mut t| {
                t.ahead = false;
                successor = Some(t.task_id.clone());
                t
            });
        }
        let next = next.map(|task| {
            // A task worker holds one task: one it still seems to hold is over (its
            // result's report did not come through).
            if w.actor.is_none() {
                w.running.clear();
            }
            w.running.push((task.task_id.clone(), task.attempt));
            w.cpus = task.num_cpus;
            proto::PullResponse {
                task: Some(task),
                ..Default::default()
            }
        });
        // A spare taken over by another job hears so first (with its first task).
        let next = match (next, w.moved.take()) {
            (Some(next), None) => Some(next),
            (next, Some(moved)) => Some(proto::PullResponse {
                job: Some(moved),
                ..next.unwrap_or_default()
            }),
            (None, None) => None,
        };
        (next, successor, Some(w.job.clone()))
    }

    /// Reports that task `t` did not run here.
    fn report(&self, t: &proto::TaskAssignment, outcome: Outcome, error: String) {
        let report = proto::TaskReport {
            node_id: self.node_id.clone(),
            task_id: t.task_id.clone(),
            attempt: t.attempt,
            outcome: outcome as i32,
            error: Some(wire_execution_error(error)),
            ..Default::default()
        };
        let _ = self.reports.send(PendingReport::now(report));
    }

    async fn report_actor(
        &self,
        actor: &str,
        incarnation: u32,
        alive: bool,
        error: String,
        pid: u32,
    ) {
        let mut head = self.head.clone();
        let _ = head
            .report_actor(proto::ActorReport {
                node_id: self.node_id.clone(),
                actor_id: actor.to_string(),
                incarnation,
                alive,
                error,
                pid,
            })
            .await;
    }

    async fn start_driver(self: Arc<Self>, d: proto::StartDriver) -> Result<()> {
        let job = self.job(&d.job_id).await?;
        let dir = self.options.dir.join("jobs").join(&d.job_id);
        std::fs::create_dir_all(&dir)?;
        let log_path = dir.join("driver.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = self.command(&job)?;
        cmd.env("VOLLEY_JOB_ID", &d.job_id)
            .env(
                "VOLLEY_HEAD_PATIENCE",
                self.options.head_patience.as_secs_f64().to_string(),
            )
            .env("CUDA_VISIBLE_DEVICES", join_ids(&d.gpu_ids))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        let mut child = self.spawner.spawn(cmd).await.map_err(|e| {
            VolleyError::execution(format!("cannot start {:?}: {e}", job.entrypoint[0]))
        })?;
        let (kill_tx, mut kill_rx) = oneshot::channel();
        self.state
            .lock()
            .expect("agent lock")
            .drivers
            .insert(d.job_id.clone(), kill_tx);
        let mut head = self.head.clone();
        let mut offset = 0u64;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let (code, killed) = loop {
            tokio::select! {
                s = child.wait() => break (s.ok().and_then(|s| s.code()).unwrap_or(-1), false),
                _ = &mut kill_rx => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    break (-1, true);
                }
                _ = tick.tick() => {
                    offset = forward_log(&mut head, &d.job_id, &run, &log_path, offset).await;
                }
            }
        };
        // The log's last lines and the exit wait for a head that is away (restarting):
        // the head that comes back gets them, or its job would wait for the driver in
        // vain.
        let deadline = Instant::now() + self.options.head_patience;
        loop {
            let sent = forward_log(&mut head, &d.job_id, &run, &log_path, offset).await;
            let done = std::fs::metadata(&log_path).map_or(true, |m| m.len() <= sent);
            if done || killed || Instant::now() >= deadline {
                break;
            }
            offset = sent;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.state
            .lock()
            .expect("agent lock")
            .drivers
            .remove(&d.job_id);
        if !killed {
            let exit = proto::DriverExit {
                node_id: self.node_id.clone(),
                job_id: d.job_id.clone(),
                exit_code: code,
                error: String::new(),
            };
            loop {
                match head.report_driver_exit(exit.clone()).await {
                    Err(e) if super::net::unreachable(&e) && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// Sends the driver's output past `offset` to the head (as part of driver run `run`);
/// returns how far it got.
async fn forward_log(head: &mut Head, job: &str, run: &str, path: &Path, offset: u64) -> u64 {
    let data = match std::fs::read(path) {
        Ok(d) => d
            .get(offset as usize..)
            .map(|s| s.to_vec())
            .unwrap_or_default(),
        Err(_) => return offset,
    };
    if data.is_empty() {
        return offset;
    }
    let n = data.len() as u64;
    match head
        .append_log(proto::LogAppend {
            job_id: job.to_string(),
            data,
            offset,
            run: run.to_string(),
        })
        .await
    {
        Ok(_) => offset + n,
        Err(_) => offset,
    }
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Stops a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What workers call on their node.
struct AgentService {
    agent: Arc<Agent>,
}

#[tonic::async_trait]
impl proto::node_agent_server::NodeAgent for AgentService {
    async fn pull(
        &self,
        request: Request<proto::PullRequest>,
    ) -> std::result::Result<Response<proto::PullResponse>, Status> {
        let r = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.timeout_ms.min(30_000));
        let agent = &self.agent;
        loop {
            let notified = agent.changed.notified();
            if let Some(next) = agent.next_for(&r.worker_id) {
                return Ok(Response::new(next));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Response::new(proto::PullResponse::default()));
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    async fn finish(
        &self,
        request: Request<proto::WorkerResult>,
    ) -> std::result::Result<Response<proto::FinishResponse>, Status> {
        let r = request.into_inner();
        let Some(mut report) = r.report else {
            return Err(Status::invalid_argument("a result without a report"));
        };
        let (freed, actor, job) = {
            let mut s = self.agent.state.lock().expect("agent lock");
            match s.workers.get_mut(&r.worker_id) {
                Some(w) => {
                    let at = w.running.iter().position(|(id, _)| *id == report.task_id);
                    (
                        at.map(|i| w.running.remove(i)).map(|_| w.cpus),
                        w.actor.is_some(),
                        Some(w.job.clone()),
                    )
                }
                None => (None, false, None),
            }
        };
        if let (Some(job), false) = (&job, actor) {
            let dir = self.agent.options.dir.join("jobs").join(job);
            worker_logs::note_task_end(&dir, &report.task_id, report.attempt, &r.worker_id);
        }
        report.node_id = self.agent.node_id.clone();
        let task_id = report.task_id.clone();
        if !r.output.is_empty() {
            // A small result came with the report: it is stored here, and its bytes go
            // on to the head, which hands them to whoever reads it.
            let stored = decode_inline(&report.task_id, &r.output)
                .and_then(|batches| self.agent.store.put(&report.task_id, batches));
            match stored {
                Ok(bytes) => {
                    report.output_bytes = bytes;
                    report.inline = r.output;
                }
                Err(e) => {
                    report.outcome = Outcome::SystemFailure as i32;
                    report.error = Some(wire_execution_error(format!(
                        "cannot store the result: {e}"
                    )));
                }
            }
        }
        // The worker's next task is chosen before the report leaves: a task sent
        // ahead that takes over this slot travels in it. An actor's worker takes its
        // calls by pulling, one pull at a time, so that they reach the actor in the
        // order they came (it pulls while a call runs: a call handed back here could
        // overtake the one its pull is bringing).
        let (next, successor) = if actor {
            (None, None)
        } else {
            self.agent.next_after(&r.worker_id, freed)
        };
        report.successor = successor.unwrap_or_default();
        if report.outcome == Outcome::Ok as i32 {
            self.agent
                .state
                .lock()
                .expect("agent lock")
                .object_rows
                .insert(report.task_id.clone(), report.output_rows);
        }
        if let (true, Some(job)) = (report.outcome == Outcome::Failed as i32, &job) {
            self.agent
                .failed_unreported
                .lock()
                .expect("failed reports lock")
                .insert(
                    task_id.clone(),
                    proto::RunningTask {
                        task_id: task_id.clone(),
                        attempt: report.attempt,
                        job_id: job.clone(),
                        num_cpus: 0.0,
                        actor_call: actor,
                    },
                );
        }
        let may_wait = !self
            .agent
            .state
            .lock()
            .expect("agent lock")
            .ahead
            .is_empty();
        let (tx, rx) = oneshot::channel();
        self.agent
            .reports
            .send(PendingReport {
                report,
                verdict: r.await_verdict.then_some(tx),
                may_wait,
            })
            .map_err(|_| Status::unavailable("the node agent is stopping"))?;
        let stale = if r.await_verdict {
            rx.await
                .map_err(|_| Status::unavailable("the node agent is stopping"))?
        } else {
            false
        };
        if stale {
            // Its worker undoes what the attempt left behind: its object goes too, so
            // that no one (a head restarted since, taking back what this node holds)
            // reads a result whose effects were undone.
            self.agent.free_objects(std::slice::from_ref(&task_id));
        }
        Ok(Response::new(proto::FinishResponse { stale, next }))
    }

    async fn actor_ready(
        &self,
        request: Request<proto::ActorStarted>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.agent
            .report_actor(
                &r.actor_id,
                r.incarnation,
                r.error.is_empty(),
                r.error,
                r.pid,
            )
            .await;
        Ok(Response::new(proto::Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small budgets (the out-of-core tests' 24-48 MiB) keep the 256 KiB / 16 MiB
    /// thresholds their peaks were measured with; larger ones keep more, in proportion,
    /// up to glibc's ceilings; a worker's tunables say so.
    #[test]
    fn allocator_thresholds_grow_with_the_budget_up_to_a_ceiling() {
        const MIB: u64 = 1 << 20;
        for small in [0, 24 * MIB, 48 * MIB] {
            assert_eq!(
                allocator_thresholds(small),
                (256 << 10, 16 * MIB),
                "{small}"
            );
        }
        assert_eq!(allocator_thresholds(2048 * MIB), (8 * MIB, 32 * MIB));
        assert_eq!(allocator_thresholds(64 << 30), (32 * MIB, 256 * MIB));
        assert_eq!(
            malloc_tunables(2048 * MIB),
            "glibc.malloc.mmap_threshold=8388608:glibc.malloc.trim_threshold=33554432:\
             glibc.malloc.arena_max=2"
        );
    }

    #[test]
    fn a_worker_gets_one_cpus_share_of_the_memory_past_the_store() {
        const GIB: u64 = 1 << 30;
        let node = Resources::cpus(4.0).with_memory(24 * GIB);
        assert_eq!(worker_memory_limit(&node, 8 * GIB), 4 * GIB);
        // Fractions of a CPU count as one; a store as big as the node leaves the floor.
        let small = Resources::cpus(0.5).with_memory(GIB);
        assert_eq!(worker_memory_limit(&small, GIB / 2), GIB / 2);
        assert_eq!(worker_memory_limit(&small, 2 * GIB), 64 << 20);
    }
}
