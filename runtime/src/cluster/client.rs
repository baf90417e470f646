//! The driver's side: submit tasks, create actors and placement groups, get objects.
//!
//! A [`Cluster`] is a connection to a head for one job. A program started by `volley job
//! submit` joins its own job (`VOLLEY_JOB_ID`); a program that connects by itself starts
//! an *attached* job whose package is its own binary, so the cluster's workers can run
//! the tasks it defines. The API is blocking (it runs its own small I/O runtime), like the
//! rest of volley's user API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use volley_common::{ErrorReport, Result, VolleyError};

use super::net::{error_report, wire_error, Channels, Head};
use super::objects::{decode_inline, fetch, store, ObjectCompression};
use super::proto;
use super::resources::Resources;
use super::session::Session;
use super::task::{encode, Payload, RemoteActor, RemoteTask};

struct Inner {
    rt: tokio::runtime::Runtime,
    head: Head,
    /// Calls that wait out a head restart, and what to tell a restarted head.
    session: Arc<Session>,
    channels: Channels,
    address: String,
    job_id: String,
    attached: bool,
    frees: mpsc::UnboundedSender<String>,
    submits: mpsc::UnboundedSender<proto::Submission>,
    submitted: Arc<Submitted>,
    /// How long `get` keeps trying to read an object whose copies are lost while the
    /// cluster rebuilds it.
    fetch_patience: Duration,
    /// How `put` sends objects: as the node that started this driver compresses them.
    compression: ObjectCompression,
    /// The attached job was ended ([`Cluster::end_attached_job`]).
    ended: AtomicBool,
    /// What the head last said this program's work waits for that no node has.
    told_waiting: Mutex<String>,
}

/// Submissions on their way to the head.
///
/// `submit` queues a task and returns at once; one loop sends what is queued, many
/// tasks per call, in order. Whatever asks the head about objects (waits, gets, frees,
/// kills) first waits until everything queued before it was answered.
#[derive(Default)]
struct Submitted {
    queued: AtomicU64,
    answered: watch::Sender<u64>,
    /// Tasks the head refused, and why: their objects fail with that error.
    rejected: Mutex<HashMap<String, ErrorReport>>,
}

impl Submitted {
    /// Waits until every task queued so far was answered.
    async fn flush(&self) {
        let target = self.queued.load(Ordering::SeqCst);
        let mut answered = self.answered.subscribe();
        let _ = answered.wait_for(|n| *n >= target).await;
    }

    /// Why object `id` was refused, if it was.
    fn rejected(&self, id: &str) -> Option<VolleyError> {
        let r = self.rejected.lock().expect("rejected lock");
        r.get(id)
            .map(|e| VolleyError::from(e.clone()).context(format!("the head refused task {id}")))
    }
}

async fn submit_loop(
    session: Arc<Session>,
    submitted: Arc<Submitted>,
    mut rx: mpsc::UnboundedReceiver<proto::Submission>,
) {
    use proto::submission::Item;
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < 1024 {
            match rx.try_recv() {
                Ok(t) => items.push(t),
                Err(_) => break,
            }
        }
        let n = items.len() as u64;
        let ids: Vec<String> = items
            .iter()
            .filter_map(|i| match &i.item {
                Some(Item::Task(t)) => Some(t.task_id.clone()),
                Some(Item::Group(g)) => Some(g.group_id.clone()),
                None => None,
            })
            .collect();
        let refused: Vec<(String, ErrorReport)> = match session
            .call("submitting tasks", |mut h, _| {
                let items = items.clone();
                async move { h.submit_tasks(proto::SubmitTasksRequest { items }).await }
            })
            .await
        {
            Ok(r) => r
                .rejected
                .into_iter()
                .map(|r| {
                    let e = r.error.as_ref().map(error_report);
                    (
                        r.task_id,
                        e.unwrap_or_else(|| ErrorReport::from(&VolleyError::execution("refused"))),
                    )
                })
                .collect(),
            Err(e) => {
                let e = ErrorReport::from(&e);
                ids.into_iter().map(|id| (id, e.clone())).collect()
            }
        };
        if !refused.is_empty() {
            submitted
                .rejected
                .lock()
                .expect("rejected lock")
                .extend(refused);
        }
        submitted.answered.send_modify(|a| *a += n);
    }
}

impl Inner {
    /// Calls the head through the session once every task queued before this call
    /// was answered: the head must know a task before a call about it (a cancel, or
    /// the actor or group it uses going).
    async fn call_after_submissions<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: FnMut(Head, String) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.submitted.flush().await;
        self.session.call(what, f).await
    }

    /// Says on stderr, once per reason, what the head reports this program's work
    /// waits for that no node has (a task asking for a GPU of CPU-only nodes waits for
    /// such a node to join, silently otherwise). A driver the head started gets it in
    /// its job's log instead.
    fn tell_waiting(&self, reason: &str) {
        if reason.is_empty() || !self.attached {
            return;
        }
        let mut told = self.told_waiting.lock().expect("waiting lock");
        if *told != reason {
            eprintln!("[volley] job {}: {reason}", self.job_id);
            reason.clone_into(&mut told);
        }
    }

    /// Tells the head this attached driver is done, once.
    fn end_attached(&self, exit_code: i32, error: &str) {
        if !self.attached || self.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut head = self.head.clone();
        let exit = proto::DriverExit {
            node_id: String::new(),
            job_id: self.job_id.clone(),
            exit_code,
            error: error.to_string(),
        };
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), head.report_driver_exit(exit)).await
        });
    }
}

impl Drop for Inner {
    /// A program that lets go of its cluster ends its job: succeeded, unless it is
    /// unwinding from a panic (an error the program returns is its to report, with
    /// [`Cluster::end_attached_job`]).
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.end_attached(101, "the program panicked");
        } else {
            self.end_attached(0, "");
        }
    }
}

/// How a program joins a cluster ([`Cluster::connect_with`]).
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The certificates to trust (none: plain connections).
    pub tls: super::tls::TlsConfig,
    /// For a program that joins as a job of its own: once the job ends, its CPU workers
    /// may stay on their nodes for a while and run the next job of the same program,
    /// binary, entrypoint and environment that asks for this too, instead of that job
    /// starting workers of its own. For programs whose workers keep nothing of one job
    /// that would change the next (`volley sql` runs each query as a job; a fresh
    /// worker process per job and node cost each query a start and a cold heap).
    /// Ignored inside a submitted job (it joins the job it is part of).
    pub share_workers: bool,
}

/// A connection to a cluster, for one job.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("address", &self.inner.address)
            .field("job_id", &self.inner.job_id)
            .finish()
    }
}

/// A result that lives in the cluster. Dropping the last clone frees it.
#[derive(Clone)]
pub struct ObjectRef {
    inner: Arc<RefInner>,
}

/// One input of a task ([`Cluster::submit_selected`]): all of it, or one batch.
#[derive(Debug, Clone, Copy)]
pub enum TaskInput<'a> {
    /// An object.
    Object(&'a ObjectRef, Option<u32>),
    /// Each object of a group in turn, the same batch of each.
    Group(&'a ObjectGroup, Option<u32>),
}

/// Objects named once as a group ([`Cluster::object_group`]); dropping it lets them go
/// once no task reading the group is left.
#[derive(Clone)]
pub struct ObjectGroup {
    handle: ObjectRef,
    len: usize,
}

impl ObjectGroup {
    /// How many objects it names.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it names none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for ObjectGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectGroup")
            .field("id", &self.handle.id())
            .field("len", &self.len)
            .finish()
    }
}

struct RefInner {
    id: String,
    frees: mpsc::UnboundedSender<String>,
}

impl Drop for RefInner {
    fn drop(&mut self) {
        let _ = self.frees.send(std::mem::take(&mut self.id));
    }
}

impl ObjectRef {
    /// The object's id (`JOB:...`).
    pub fn id(&self) -> &str {
        &self.inner.id
    }
}

impl std::fmt::Debug for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectRef({})", self.inner.id)
    }
}

/// Where an object lives and how big it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Rows of its batches.
    pub rows: u64,
    /// Bytes in its node's store.
    pub bytes: u64,
    /// Flight endpoints of the nodes that hold a copy.
    pub addresses: Vec<String>,
}

/// An object's state, as [`Cluster::wait_objects`] sees it.
#[derive(Debug)]
pub enum ObjectState {
    /// Its task has not finished.
    Pending,
    /// Made; where and how big.
    Ready(ObjectMeta),
    /// It can never be made: why (its task's error, with its category).
    Failed(VolleyError),
}

/// A task serialized once, to submit many times (each time with other inputs).
#[derive(Debug, Clone)]
pub struct EncodedTask {
    payload: bytes::Bytes,
    /// Its type's name: the name of its tasks that options do not name.
    name: &'static str,
}

impl EncodedTask {
    /// Serializes `task` (a `#[typetag::serde]` type).
    pub fn new(task: Box<dyn RemoteTask>) -> Result<Self> {
        let name = task.typetag_name();
        let payload = encode("the task", &Payload::Task(task))?;
        Ok(Self {
            payload: payload.into(),
            name,
        })
    }
}

/// An actor serialized once, to start many times.
#[derive(Debug, Clone)]
pub struct EncodedActor {
    payload: Arc<[u8]>,
}

impl EncodedActor {
    /// Serializes `actor` (a `#[typetag::serde]` type).
    pub fn new(actor: Box<dyn RemoteActor>) -> Result<Self> {
        let payload = encode("the actor", &actor)?;
        Ok(Self {
            payload: payload.into(),
        })
    }
}

/// How a task runs.
#[derive(Debug, Clone)]
pub struct TaskOptions {
    /// What it holds while it runs (default: 1 CPU).
    pub resources: Resources,
    /// How many times it is run again after its worker or node dies (default 3). Errors
    /// its own code returns are not retried.
    pub max_retries: u32,
    /// Runs in a bundle of this placement group (`-1`: any bundle).
    pub placement: Option<(String, i32)>,
    /// A name for logs.
    pub name: String,
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self {
            resources: Resources::cpus(1.0),
            max_retries: 3,
            placement: None,
            name: String::new(),
        }
    }
}

impl TaskOptions {
    /// Holds `resources`.
    pub fn resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }
    /// Retries after system failures.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }
    /// Runs in bundle `index` of `group` (-1: any).
    pub fn in_group(mut self, group: &PlacementGroup, index: i32) -> Self {
        self.placement = Some((group.id.clone(), index));
        self
    }
    /// Names it.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// These options, named `name` unless they have a name.
    fn named(&self, name: &str) -> std::borrow::Cow<'_, TaskOptions> {
        if self.name.is_empty() {
            std::borrow::Cow::Owned(self.clone().name(name))
        } else {
            std::borrow::Cow::Borrowed(self)
        }
    }
}

/// How an actor runs.
#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// What it holds while alive (default: 1 CPU).
    pub resources: Resources,
    /// How many times it is rebuilt after its process or node dies (default 0).
    pub max_restarts: u32,
    /// Lives in a bundle of this placement group.
    pub placement: Option<(String, i32)>,
    /// A name for logs.
    pub name: String,
}

impl Default for ActorOptions {
    fn default() -> Self {
        Self {
            resources: Resources::cpus(1.0),
            max_restarts: 0,
            placement: None,
            name: String::new(),
        }
    }
}

impl ActorOptions {
    /// Holds `resources`.
    pub fn resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }
    /// Restarts after failures.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }
    /// Lives in bundle `index` of `group`.
    pub fn in_group(mut self, group: &PlacementGroup, index: i32) -> Self {
        self.placement = Some((group.id.clone(), index));
        self
    }
}

/// How a placement group's bundles spread over nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementStrategy {
    /// As few nodes as possible, more if needed.
    Pack,
    /// As many nodes as possible.
    Spread,
    /// All on one node, or wait.
    StrictPack,
    /// Each on its own node, or wait.
    StrictSpread,
}

/// A gang of resource bundles reserved together.
#[derive(Debug, Clone)]
pub struct PlacementGroup {
    id: String,
    cluster: Cluster,
}

impl PlacementGroup {
    /// The group's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits up to `timeout` for every bundle to be reserved; returns the node of each
    /// bundle, or `None` if it does not fit yet.
    pub fn wait(&self, timeout: Duration) -> Result<Option<Vec<String>>> {
        let session = &self.cluster.inner.session;
        let what = format!("placement group {}", self.id);
        let request = proto::PlacementGroupRequest {
            group_id: self.id.clone(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let r = self.cluster.block_on(session.call(&what, |mut h, _| {
            let request = request.clone();
            async move { h.wait_placement_group(request).await }
        }))?;
        Ok(r.ready.then_some(r.bundle_nodes))
    }

    /// Gives the reservation back (actors in it are stopped).
    pub fn remove(&self) -> Result<()> {
        let inner = &self.cluster.inner;
        let what = format!("placement group {}", self.id);
        self.cluster
            .block_on(inner.call_after_submissions(&what, |mut h, _| {
                let request = proto::PlacementGroupRequest {
                    group_id: self.id.clone(),
                    timeout_ms: 0,
                };
                async move { h.remove_placement_group(request).await }
            }))?;
        inner.session.note_placement_group_removed(&self.id);
        Ok(())
    }
}

/// An actor in the cluster.
#[derive(Debug, Clone)]
pub struct ActorHandle {
    id: String,
    cluster: Cluster,
}

/// An actor's state as the head sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    /// `PENDING`, `STARTING`, `ALIVE` or `DEAD`.
    pub state: String,
    /// The node it lives on.
    pub node_id: String,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Why it died.
    pub error: String,
    /// Its process on its node (0 unless alive).
    pub pid: u32,
    /// Dead, and its process gone: its node reported so, or left the cluster. A
    /// killed actor is `DEAD` at once; its process may run a moment longer.
    pub exited: bool,
}

impl ActorHandle {
    /// The actor's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Calls `method`; calls run one at a time, in the order they were made. A call that
    /// was running when the actor's process died fails (it is not run again: it may be
    /// what killed it); later calls go to the restarted actor.
    pub fn call(
        &self,
        method: &str,
        arg: impl Serialize,
        inputs: &[&ObjectRef],
    ) -> Result<ObjectRef> {
        let arg = serde_json::to_value(arg)
            .map_err(|e| VolleyError::plan(format!("actor call {method}: {e}")))?;
        let payload = encode(
            &format!("call {method}"),
            &Payload::Call {
                method: method.to_string(),
                arg,
            },
        )?;
        self.cluster.submit_payload(
            payload.into(),
            inputs,
            &[],
            &TaskOptions {
                resources: Resources::default(),
                max_retries: 0,
                placement: None,
                name: method.to_string(),
            },
            &self.id,
        )
    }

    /// The actor's state.
    pub fn info(&self) -> Result<ActorInfo> {
        let session = &self.cluster.inner.session;
        let what = format!("actor {}", self.id);
        let r = self.cluster.block_on(session.call(&what, |mut h, _| {
            let actor_id = self.id.clone();
            async move { h.get_actor(proto::ActorId { actor_id }).await }
        }))?;
        Ok(ActorInfo {
            state: r.state,
            node_id: r.node_id,
            restarts: r.restarts,
            error: r.error,
            pid: r.pid,
            exited: r.exited,
        })
    }

    /// Stops the actor (no restart) and waits up to `timeout` for its process to be
    /// gone: what comes next may then take its GPUs and files, as a restarted training
    /// run takes its checkpoints. A head that no longer knows the actor (it restarted
    /// meanwhile: its nodes stop what no driver claims) counts as gone. Fails naming
    /// the actor when it is still there then, with the last error asking about it.
    pub fn kill_and_wait(&self, timeout: Duration) -> Result<()> {
        self.kill()?;
        let end = Instant::now() + timeout;
        let mut last_error = None;
        loop {
            match self.info() {
                Ok(info) if info.exited => return Ok(()),
                Ok(_) => {}
                Err(e) if e.to_string().contains(&format!("no actor {}", self.id)) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= end {
                let why = last_error.map_or_else(String::new, |e| format!(" (last: {e})"));
                return Err(VolleyError::execution(format!(
                    "actor {}: its process had not exited {timeout:?} after it was killed{why}",
                    self.id
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the actor (no restart); its process is killed soon after (see
    /// [`Self::kill_and_wait`]).
    pub fn kill(&self) -> Result<()> {
        let inner = &self.cluster.inner;
        let what = format!("actor {}", self.id);
        self.cluster
            .block_on(inner.call_after_submissions(&what, |mut h, _| {
                let actor_id = self.id.clone();
                async move { h.kill_actor(proto::ActorId { actor_id }).await }
            }))?;
        inner.session.note_freed(std::slice::from_ref(&self.id));
        Ok(())
    }
}

/// Reads the token: `VOLLEY_TOKEN`, else the file `VOLLEY_TOKEN_FILE` (empty variables
/// are unset).
pub fn token_from_env() -> Result<Option<String>> {
    if let Some(t) = volley_common::env_var("VOLLEY_TOKEN")? {
        return Ok(Some(t));
    }
    if let Some(p) = volley_common::env_var("VOLLEY_TOKEN_FILE")? {
        return super::auth::read_token(std::path::Path::new(&p)).map(Some);
    }
    Ok(None)
}

impl Cluster {
    /// Connects to the head at `address` (`host:port`) with `token` (over TLS when
    /// `VOLLEY_TLS_CA` names a CA certificate). Inside a job started
    /// by `volley job submit` it joins that job; otherwise it uploads this program as the
    /// package of a new attached job.
    pub fn connect(address: &str, token: &str) -> Result<Cluster> {
        let options = ConnectOptions {
            tls: super::tls::TlsConfig::from_env()?,
            share_workers: false,
        };
        Self::connect_with(address, token, &options)
    }

    /// Like [`connect`](Self::connect), with its [`ConnectOptions`] given (TLS settings
    /// given rather than read from the environment).
    pub fn connect_with(address: &str, token: &str, options: &ConnectOptions) -> Result<Cluster> {
        let tls = &options.tls;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("volley-client")
            .enable_all()
            .build()
            .map_err(|e| VolleyError::internal(format!("cannot start the client runtime: {e}")))?;
        let _enter = rt.enter();
        let channels = Channels::new(token, tls);
        let head = channels.head(address)?;
        if volley_common::env_var("VOLLEY_NODE_ID")?.is_some() {
            // A driver started by a node agent ends with it, like the agent's workers.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
        }
        let (job_id, attached) = match volley_common::env_var("VOLLEY_JOB_ID")? {
            Some(j) => (j, false),
            None => (
                rt.block_on(attach(head.clone(), address, token, options.share_workers))?,
                true,
            ),
        };
        let compression = ObjectCompression::from_env()?;
        let session = Arc::new(Session::new(&channels, address, &job_id)?);
        rt.block_on(session.hello())?;
        let submitted = Arc::new(Submitted::default());
        let (submits, submit_rx) = mpsc::unbounded_channel();
        rt.spawn(submit_loop(
            Arc::clone(&session),
            Arc::clone(&submitted),
            submit_rx,
        ));
        let (frees, rx) = mpsc::unbounded_channel();
        rt.spawn(free_loop(Arc::clone(&session), Arc::clone(&submitted), rx));
        rt.spawn(alive_loop(Arc::clone(&session)));
        Ok(Cluster {
            inner: Arc::new(Inner {
                rt,
                head: session.head(),
                session,
                channels,
                address: address.to_string(),
                job_id,
                attached,
                frees,
                submits,
                submitted,
                fetch_patience: Duration::from_secs(300),
                compression,
                ended: AtomicBool::new(false),
                told_waiting: Mutex::default(),
            }),
        })
    }

    /// The head's address.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// Ends the job this program joined the cluster as (an attached job; nothing for a
    /// submitted one, which ends with its driver process): succeeded with `exit_code`
    /// 0, else failed with `error`. Its workers stop and its objects are freed. The last
    /// handle's drop does the same; a program that returns from `main` while other
    /// threads may still hold handles calls this first, or the head learns of its end
    /// only when its heartbeats stop, and calls it failed.
    pub fn end_attached_job(&self, exit_code: i32, error: &str) {
        self.inner.end_attached(exit_code, error);
    }

    /// The job this connection works for.
    pub fn job_id(&self) -> &str {
        &self.inner.job_id
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.inner.rt.block_on(f)
    }

    fn new_ref(&self, id: String) -> ObjectRef {
        ObjectRef {
            inner: Arc::new(RefInner {
                id,
                frees: self.inner.frees.clone(),
            }),
        }
    }

    /// Tells the head how Dataset execution `id` of this job is going (its `/metrics`,
    /// `volley job status`). Sent in the background: a report that fails is dropped
    /// (the next one replaces it). The caller waits for the last one (`finished`), at
    /// most two seconds, so that a driver that exits right after its execution still
    /// leaves its final figures.
    pub fn report_execution(
        &self,
        id: &str,
        started_ms: u64,
        operators: &[super::jobs::OperatorProgress],
        finished: bool,
    ) {
        let request = proto::ExecutionProgress {
            job_id: self.inner.job_id.clone(),
            execution_id: id.to_string(),
            operators: operators.iter().map(Into::into).collect(),
            finished,
            started_ms,
        };
        let mut head = self.inner.head.clone();
        let (sent, delivered) = std::sync::mpsc::channel();
        self.inner.rt.spawn(async move {
            let _ = head.report_execution(request).await;
            let _ = sent.send(());
        });
        if finished {
            let _ = delivered.recv_timeout(Duration::from_secs(2));
        }
    }

    fn new_id(&self, kind: &str) -> String {
        format!(
            "{}:{kind}-{}",
            self.inner.job_id,
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        )
    }

    /// Runs `task` on the cluster with the batches of `inputs`; returns its result.
    pub fn submit(
        &self,
        task: impl RemoteTask + 'static,
        inputs: &[&ObjectRef],
        options: &TaskOptions,
    ) -> Result<ObjectRef> {
        let task = EncodedTask::new(Box::new(task))?;
        self.submit_encoded(&task, inputs, options)
    }

    /// Runs a task encoded once (the same work over many inputs: a stage's tasks).
    pub fn submit_encoded(
        &self,
        task: &EncodedTask,
        inputs: &[&ObjectRef],
        options: &TaskOptions,
    ) -> Result<ObjectRef> {
        self.submit_payload(
            task.payload.clone(),
            inputs,
            &[],
            &options.named(task.name),
            "",
        )
    }

    /// Runs a task over selected inputs, in order: an object, or each object of a
    /// group in turn ([`Cluster::object_group`]); all of it, or one batch (an
    /// exchange's reduce task reads its partition of every map output). Only a
    /// selected batch travels; a node reads it from the object's file by the file's
    /// index without reading the rest.
    pub fn submit_selected(
        &self,
        task: &EncodedTask,
        inputs: &[TaskInput<'_>],
        options: &TaskOptions,
    ) -> Result<ObjectRef> {
        let (objects, batches): (Vec<&ObjectRef>, Vec<i64>) = inputs
            .iter()
            .map(|i| {
                let (o, b) = match *i {
                    TaskInput::Object(o, b) => (o, b),
                    TaskInput::Group(g, b) => (&g.handle, b),
                };
                (o, b.map_or(-1, i64::from))
            })
            .unzip();
        self.submit_payload(
            task.payload.clone(),
            &objects,
            &batches,
            &options.named(task.name),
            "",
        )
    }

    /// Stops the tasks that make `objects`, where they have not finished: a task that
    /// waits is dropped, one that runs is stopped (its worker killed). Reading such an
    /// object then fails with a [`VolleyError::Cancelled`] error; one already made is
    /// kept. Actor calls are not stopped (they change their actor's state).
    pub fn cancel(&self, objects: &[&ObjectRef]) -> Result<()> {
        let ids: Vec<String> = objects.iter().map(|o| o.id().to_string()).collect();
        self.block_on(
            self.inner
                .call_after_submissions("cancel", |mut h, job_id| {
                    let object_ids = ids.clone();
                    async move { h.cancel(proto::FreeRequest { job_id, object_ids }).await }
                }),
        )?;
        Ok(())
    }

    /// Names `objects` as one group (for an exchange: its map outputs), so that tasks
    /// reading one batch of each ([`TaskInput::Group`]) pass the head one name
    /// instead of one per object: the head's bookkeeping for M map and N reduce tasks
    /// is O(M + N), not O(M x N). The group keeps its objects until it is dropped and
    /// no task reading it is left. It is sent with the task submissions, in order;
    /// should the head refuse it, the tasks reading it fail saying so.
    pub fn object_group(&self, objects: &[&ObjectRef]) -> Result<ObjectGroup> {
        let id = self.new_id("group");
        let request = proto::ObjectGroupRequest {
            job_id: self.inner.job_id.clone(),
            group_id: id.clone(),
            object_ids: objects.iter().map(|o| o.id().to_string()).collect(),
        };
        // In the submission stream: after the tasks that make its objects, before the
        // tasks that read it; nothing waits here.
        self.queue_submission(proto::submission::Item::Group(request))?;
        Ok(ObjectGroup {
            handle: self.new_ref(id),
            len: objects.len(),
        })
    }

    fn submit_payload(
        &self,
        payload: bytes::Bytes,
        inputs: &[&ObjectRef],
        batches: &[i64],
        options: &TaskOptions,
        actor: &str,
    ) -> Result<ObjectRef> {
        options.resources.validate()?;
        let id = self.new_id("t");
        let (group, index) = options.placement.clone().unwrap_or((String::new(), -1));
        let request = proto::SubmitTaskRequest {
            job_id: self.inner.job_id.clone(),
            task_id: id.clone(),
            payload,
            args: inputs.iter().map(|r| r.id().to_string()).collect(),
            resources: Some((&options.resources).into()),
            max_retries: options.max_retries,
            placement_group: group,
            bundle_index: index,
            actor_id: actor.to_string(),
            name: options.name.clone(),
            arg_batches: batches.to_vec(),
            made: false,
        };
        // Queued for the submission loop; the head's refusal, if any, is the object's
        // error (as a failing task's is).
        self.queue_submission(proto::submission::Item::Task(request))?;
        Ok(self.new_ref(id))
    }

    /// Queues `item` for the submission loop, after everything queued before it.
    fn queue_submission(&self, item: proto::submission::Item) -> Result<()> {
        self.inner.submitted.queued.fetch_add(1, Ordering::SeqCst);
        let submission = proto::Submission { item: Some(item) };
        self.inner.session.note_submission(&submission);
        if self.inner.submits.send(submission).is_err() {
            self.inner.submitted.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(VolleyError::internal(
                "the client's submission loop stopped",
            ));
        }
        Ok(())
    }

    /// Stores `batches` in the cluster.
    pub fn put(&self, batches: Vec<RecordBatch>) -> Result<ObjectRef> {
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let id = self.new_id("put");
        let session = Arc::clone(&self.inner.session);
        let channels = self.inner.channels.clone();
        let oid = id.clone();
        let compression = self.inner.compression;
        self.block_on(async move {
            let loc = session
                .call("put", |mut h, job_id| async move {
                    h.pick_object_store(proto::JobId { job_id }).await
                })
                .await?;
            let address = loc
                .addresses
                .first()
                .cloned()
                .ok_or_else(|| VolleyError::execution("put: no object store"))?;
            let bytes = store(&channels, &address, &oid, batches, compression).await?;
            let put = |job_id| proto::PutObjectRequest {
                job_id,
                object_id: oid.clone(),
                address: address.clone(),
                bytes,
                rows,
            };
            session
                .call("put", |mut h, job_id| {
                    let r = put(job_id);
                    async move { h.put_object(r).await }
                })
                .await?;
            session.note_put(&put(String::new()));
            Ok::<_, VolleyError>(())
        })?;
        Ok(self.new_ref(id))
    }

    /// The object's batches, waiting for its task. Fails if the task failed for good.
    pub fn get(&self, object: &ObjectRef) -> Result<Vec<RecordBatch>> {
        let mut all = self.get_all(&[object])?;
        Ok(all.pop().unwrap_or_default())
    }

    /// Rows `offset..offset + rows` of the object (its batches taken as one sequence),
    /// waiting for its task: a node that holds it sends only those rows. Like
    /// [`get`](Self::get), it waits while a lost object is made again.
    pub fn get_rows(&self, object: &ObjectRef, offset: u64, rows: u64) -> Result<Vec<RecordBatch>> {
        let inner = Arc::clone(&self.inner);
        let id = object.id().to_string();
        self.block_on(async move {
            let status = wait_all(&inner, std::slice::from_ref(&id))
                .await?
                .pop()
                .unwrap_or_default();
            let location = status.location.unwrap_or_default();
            if location.inline.is_empty() {
                for a in &location.addresses {
                    if let Ok(b) = super::objects::fetch_range(
                        &inner.channels,
                        a,
                        &id,
                        super::objects::Selection::Rows { offset, rows },
                    )
                    .await
                    {
                        return Ok(b);
                    }
                }
            }
            let all = match read_copy(&inner, &id, &location).await {
                Some(Ok(all)) => all,
                _ => get_one(&inner, &id).await?,
            };
            super::objects::slice_rows(&all, offset, rows)
                .map_err(|e| e.context(format!("object {id}")))
        })
    }

    /// The batches of several objects, in order.
    pub fn get_all(&self, objects: &[&ObjectRef]) -> Result<Vec<Vec<RecordBatch>>> {
        let inner = Arc::clone(&self.inner);
        let ids: Vec<String> = objects.iter().map(|o| o.id().to_string()).collect();
        self.block_on(async move {
            // One wait for all of them, then the reads (of those not inline), several
            // at a time.
            let statuses = wait_all(&inner, &ids).await?;
            futures::stream::iter(statuses.into_iter().map(|s| read(&inner, s)))
                .buffered(16)
                .try_collect()
                .await
        })
    }

    /// Waits until `num_ready` of `objects` are ready (or failed) or `timeout` passes;
    /// returns `(ready, not ready)`, each in the given order.
    pub fn wait(
        &self,
        objects: &[ObjectRef],
        num_ready: usize,
        timeout: Duration,
    ) -> Result<(Vec<ObjectRef>, Vec<ObjectRef>)> {
        let statuses = self.block_on(wait_some(&self.inner, objects, num_ready, timeout))?;
        let mut ready = Vec::new();
        let mut rest = Vec::new();
        for (o, s) in objects.iter().zip(statuses) {
            if s.ready || s.error.is_some() {
                ready.push(o.clone());
            } else {
                rest.push(o.clone());
            }
        }
        Ok((ready, rest))
    }

    /// Waits until `num_ready` of `objects` are ready or failed, or `timeout` passes;
    /// returns the state of each, in the given order.
    pub fn wait_objects(
        &self,
        objects: &[ObjectRef],
        num_ready: usize,
        timeout: Duration,
    ) -> Result<Vec<ObjectState>> {
        let statuses = self.block_on(wait_some(&self.inner, objects, num_ready, timeout))?;
        Ok(statuses
            .into_iter()
            .map(|s| match (&s.error, s.ready) {
                (Some(e), _) => ObjectState::Failed(VolleyError::from(error_report(e))),
                (None, true) => {
                    let loc = s.location.unwrap_or_default();
                    ObjectState::Ready(ObjectMeta {
                        rows: loc.rows,
                        bytes: loc.bytes,
                        addresses: loc.addresses,
                    })
                }
                (None, false) => ObjectState::Pending,
            })
            .collect())
    }

    /// Reserves `bundles` together; see [`PlacementGroup::wait`].
    pub fn placement_group(
        &self,
        bundles: Vec<Resources>,
        strategy: PlacementStrategy,
    ) -> Result<PlacementGroup> {
        use proto::create_placement_group_request::Strategy;
        for b in &bundles {
            b.validate()?;
        }
        let id = self.new_id("pg");
        let request = proto::CreatePlacementGroupRequest {
            job_id: self.inner.job_id.clone(),
            group_id: id.clone(),
            bundles: bundles
                .iter()
                .map(|b| proto::Bundle {
                    resources: Some(b.into()),
                })
                .collect(),
            strategy: match strategy {
                PlacementStrategy::Pack => Strategy::Pack,
                PlacementStrategy::Spread => Strategy::Spread,
                PlacementStrategy::StrictPack => Strategy::StrictPack,
                PlacementStrategy::StrictSpread => Strategy::StrictSpread,
            } as i32,
        };
        // Noted first: a head that restarts before it answers is told of it again.
        let session = &self.inner.session;
        session.note_placement_group(&request);
        self.block_on(session.call("creating a placement group", |mut h, _| {
            let request = request.clone();
            async move { h.create_placement_group(request).await }
        }))
        .inspect_err(|_| session.note_freed(std::slice::from_ref(&id)))?;
        Ok(PlacementGroup {
            id,
            cluster: self.clone(),
        })
    }

    /// Starts an actor.
    pub fn create_actor(
        &self,
        actor: impl RemoteActor + 'static,
        options: &ActorOptions,
    ) -> Result<ActorHandle> {
        let actor = EncodedActor::new(Box::new(actor))?;
        self.create_actor_encoded(&actor, options)
    }

    /// Starts an actor encoded once (the members of an actor pool).
    pub fn create_actor_encoded(
        &self,
        actor: &EncodedActor,
        options: &ActorOptions,
    ) -> Result<ActorHandle> {
        options.resources.validate()?;
        let payload = actor.payload.to_vec();
        let id = self.new_id("actor");
        let (group, index) = options.placement.clone().unwrap_or((String::new(), -1));
        let request = proto::CreateActorRequest {
            job_id: self.inner.job_id.clone(),
            actor_id: id.clone(),
            payload,
            resources: Some((&options.resources).into()),
            max_restarts: options.max_restarts,
            placement_group: group,
            bundle_index: index,
            name: options.name.clone(),
        };
        // Noted first: a head that restarts before it answers is told of it again.
        let session = &self.inner.session;
        session.note_actor(&request);
        self.block_on(session.call("creating an actor", |mut h, _| {
            let request = request.clone();
            async move { h.create_actor(request).await }
        }))
        .inspect_err(|_| session.note_freed(std::slice::from_ref(&id)))?;
        Ok(ActorHandle {
            id,
            cluster: self.clone(),
        })
    }

    /// Nodes, resources and load.
    pub fn status(&self) -> Result<super::ClusterStatus> {
        let session = &self.inner.session;
        Ok(self
            .block_on(session.call("status", |mut h, _| async move {
                h.status(proto::Empty {}).await
            }))?
            .into())
    }

    /// CPUs of the live nodes, in all.
    pub fn live_cpus(&self) -> Result<f64> {
        Ok(self
            .status()?
            .nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.total.num_cpus)
            .sum())
    }
}

/// Asks the head for the state of `objects`, waiting until `num_ready` are ready or
/// failed or `timeout` passes (tasks the head refused count as failed).
async fn wait_some(
    inner: &Inner,
    objects: &[ObjectRef],
    num_ready: usize,
    timeout: Duration,
) -> Result<Vec<proto::ObjectStatus>> {
    inner.submitted.flush().await;
    let refused: Vec<Option<VolleyError>> = objects
        .iter()
        .map(|o| inner.submitted.rejected(o.id()))
        .collect();
    let already = refused.iter().filter(|r| r.is_some()).count();
    let request = proto::WaitRequest {
        object_ids: objects.iter().map(|o| o.id().to_string()).collect(),
        num_ready: num_ready.saturating_sub(already) as u32,
        timeout_ms: timeout.as_millis() as u64,
    };
    let r = inner
        .session
        .call("wait", |mut h, _| {
            let request = request.clone();
            async move { h.wait(request).await }
        })
        .await?;
    inner.tell_waiting(&r.waiting);
    Ok(r.objects
        .into_iter()
        .zip(refused)
        .map(|(mut s, refused)| {
            if let Some(e) = refused {
                s.ready = false;
                s.error = Some(wire_error(&ErrorReport::from(&e)));
            }
            s
        })
        .collect())
}

/// Waits until every object in `ids` is ready or failed (failing on the first failure);
/// returns their states.
async fn wait_all(inner: &Inner, ids: &[String]) -> Result<Vec<proto::ObjectStatus>> {
    inner.submitted.flush().await;
    if let Some(e) = ids.iter().find_map(|id| inner.submitted.rejected(id)) {
        return Err(e);
    }
    let request = proto::WaitRequest {
        object_ids: ids.to_vec(),
        num_ready: ids.len() as u32,
        timeout_ms: 10_000,
    };
    loop {
        let r = inner
            .session
            .call("waiting for objects", |mut h, _| {
                let request = request.clone();
                async move { h.wait(request).await }
            })
            .await?;
        inner.tell_waiting(&r.waiting);
        if let Some(e) = r.objects.iter().find_map(|o| o.error.as_ref()) {
            return Err(VolleyError::from(error_report(e)));
        }
        if r.objects.iter().all(|o| o.ready) {
            return Ok(r.objects);
        }
    }
}

/// The batches of a ready object: its inline copy, else read from a node that holds it.
async fn read(inner: &Inner, status: proto::ObjectStatus) -> Result<Vec<RecordBatch>> {
    let id = status.object_id;
    let location = status.location.unwrap_or_default();
    match read_copy(inner, &id, &location).await {
        Some(read) => read,
        None => get_one(inner, &id).await,
    }
}

/// Object `id`'s inline copy, else the first copy a node serves; `None` when no node
/// served one.
async fn read_copy(
    inner: &Inner,
    id: &str,
    location: &proto::ObjectLocation,
) -> Option<Result<Vec<RecordBatch>>> {
    if !location.inline.is_empty() {
        return Some(decode_inline(id, &location.inline));
    }
    for a in &location.addresses {
        if let Ok(b) = fetch(&inner.channels, a, id).await {
            return Some(Ok(b));
        }
    }
    None
}

async fn get_one(inner: &Inner, id: &str) -> Result<Vec<RecordBatch>> {
    let start = Instant::now();
    let what = format!("waiting for {id}");
    loop {
        let r = inner
            .session
            .call(&what, |mut h, _| async move {
                h.wait(proto::WaitRequest {
                    object_ids: vec![id.to_string()],
                    num_ready: 1,
                    timeout_ms: 10_000,
                })
                .await
            })
            .await?;
        let s = r.objects.into_iter().next().unwrap_or_default();
        if let Some(e) = &s.error {
            return Err(VolleyError::from(error_report(e)));
        }
        if s.ready {
            let location = s.location.unwrap_or_default();
            if let Some(read) = read_copy(inner, id, &location).await {
                return read;
            }
            // Every copy failed to read: its node is probably dying. The head will
            // declare it dead and rebuild the object; ask again.
            if start.elapsed() > inner.fetch_patience {
                return Err(VolleyError::execution(format!(
                    "object {id}: no copy could be read at {:?}",
                    location.addresses
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Uploads this program (unless the head has it) as the package of a new attached job.
async fn attach(head: Head, address: &str, token: &str, share_workers: bool) -> Result<String> {
    let exe = std::env::current_exe()?;
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "driver".into());
    let rel = format!("bin/{name}");
    let mut entrypoint = vec![rel.clone()];
    // Its workers run with these arguments: the token goes in their environment.
    entrypoint.extend(super::auth::redact_token(
        &super::auth::program_args()?,
        token,
    ));
    let spec = proto::JobSpec {
        entrypoint,
        env: Default::default(),
        resources: Some((&Resources::default()).into()),
        name,
        attached: true,
        package: None,
        share_workers,
    };
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&exe)?.permissions().mode();
    let context = format!("joining the cluster at {address}");
    super::jobs::submit_job(head, spec, vec![(rel, exe, mode)], &context).await
}

async fn free_loop(
    session: Arc<Session>,
    submitted: Arc<Submitted>,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    while let Some(first) = rx.recv().await {
        let mut ids = vec![first];
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(more) = rx.try_recv() {
            ids.push(more);
        }
        // The head must know a task before it can forget its object.
        submitted.flush().await;
        {
            let mut refused = submitted.rejected.lock().expect("rejected lock");
            if !refused.is_empty() {
                for id in &ids {
                    refused.remove(id);
                }
            }
        }
        session.note_freed(&ids);
        let _ = session
            .call("freeing objects", |mut h, job_id| {
                let object_ids = ids.clone();
                async move { h.free(proto::FreeRequest { job_id, object_ids }).await }
            })
            .await;
    }
}

/// Tells the head the driver is alive, twice a second; it finds a restarted head
/// (and replays to it) while the driver waits for nothing else.
async fn alive_loop(session: Arc<Session>) {
    loop {
        let said = session
            .call("saying the driver is alive", |mut h, job_id| async move {
                h.driver_alive(proto::DriverHeartbeat {
                    job_id,
                    replayed: false,
                })
                .await
            })
            .await;
        // The job no longer runs (stopped, or this driver judged dead): nothing to say.
        if said.is_err() && session.has_ended() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
