//! The node agent: one per machine. It registers with the head, runs what the head
//! sends (worker processes for tasks and actors, job drivers), serves its object store
//! over Arrow Flight, and heartbeats.
//!
//! Workers are processes of the job's own binary (fetched from the head once per job),
//! started with `VOLLEY_WORKER_ID` set so that `volley::init()` enters worker mode. They
//! pull tasks from the agent (the `NodeAgent` service, on the same port as Flight) and
//! put results into its object store. The agent watches every child: a worker that
//! exits while running a task is reported, and the head runs the task again elsewhere.
//!
//! This module holds the agent's state, its joining and rejoining the head, the
//! head's commands and the objects; `processes` starts and watches the job's
//! processes, `service` answers its workers, `reports` sends task reports to the
//! head.

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

mod processes;
mod reports;
mod service;

use processes::Spawner;
use reports::{report_loop, FailedUnreported, PendingReport};
use service::AgentService;

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
        self.actor = None;
        self.start_actor = None;
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

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node_id", &self.node_id)
            .finish()
    }
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
    // Spill files belong to this store alone: those of an earlier run of this folder
    // (a node that rejoined as a new one, or was killed) are of objects no one has.
    let spill = options.dir.join("spill");
    let _ = std::fs::remove_dir_all(&spill);
    let mut store = ObjectStore::new(options.object_store_memory, spill.clone())
        .with_compression(options.object_compression);
    if let Some(dir) = make_shared_dir() {
        store = store.with_shared_dir(dir);
    }
    let store = Arc::new(store);
    // The shared and spill folders go with the agent, however it stops.
    let _shared = store.shared_dir().map(|d| RemoveOnDrop(d.to_path_buf()));
    let _spill = RemoveOnDrop(spill);
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
    // `volley start` in the background waits for this to say that the node joined.
    let _ = std::fs::create_dir_all(&options.dir)
        .and_then(|()| std::fs::write(options.dir.join("node_id"), &node_id));
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
    // Tasks and their inline inputs pass through it: messages up to the head's limit
    // (tonic's default, 4 MiB, lost tasks whose inputs were bigger).
    let service = tonic::service::interceptor::InterceptedService::new(
        proto::node_agent_server::NodeAgentServer::new(AgentService {
            agent: Arc::clone(&agent),
        })
        .max_decoding_message_size(super::net::MAX_MESSAGE)
        .max_encoding_message_size(super::net::MAX_MESSAGE),
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

    /// Whether a live worker here holds or starts actor `actor` (any incarnation).
    pub(super) fn runs_actor(&self, actor: &str) -> bool {
        let s = self.state.lock().expect("agent lock");
        s.workers.values().any(|w| {
            !w.exiting
                && (w.actor.as_ref().is_some_and(|(a, _)| a == actor)
                    || w.start_actor.as_ref().is_some_and(|a| a.actor_id == actor))
        })
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
        // The first beat goes at once: a head that has just taken this node in (or
        // back, after its restart) knows its store's use and spills from the start.
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::time::sleep(interval).await;
            }
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
                        Ok(Ok(mut s)) => {
                            worker_logs::fit(&mut s, worker_logs::MAX_NODE_ANSWER);
                            (s, String::new())
                        }
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
                    // Also one still starting it.
                    if w.actor.as_ref().is_some_and(|(a, _)| *a == id)
                        || w.start_actor.as_ref().is_some_and(|a| a.actor_id == id)
                    {
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
                        let given = super::http::bearer_token(&headers);
                        if !given.is_some_and(|t| super::auth::same_token(t, &agent.options.token))
                        {
                            return (
                                StatusCode::UNAUTHORIZED,
                                "a cluster token is needed (Authorization: Bearer TOKEN)",
                            )
                                .into_response();
                        }
                        let figures = tokio::task::spawn_blocking({
                            let agent = Arc::clone(&agent);
                            move || (agent.figures(), agent.blobs.size())
                        })
                        .await;
                        // Zeros would read as real figures: a failure is said as one.
                        let Ok(mut figures) = figures else {
                            return (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "the node agent could not gather its figures",
                            )
                                .into_response();
                        };
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
}

/// Stops a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
