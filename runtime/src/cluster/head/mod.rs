//! The head: node registry, scheduler, object directory and job manager.
//!
//! Three layers, dependencies pointing down:
//! - [`state`]: a pure state machine holding everything the head knows. Each event is a
//!   method call with volley's own types; what nodes must do comes out as commands on
//!   their links. No locks, I/O, protocol or `tonic` types inside; unit-tested alone.
//! - [`HeadCore`]: the state behind one lock, the signal its waiters sleep on (every
//!   change wakes them), job packages and logs on disk, and the store that keeps jobs
//!   across restarts ([`store`]).
//! - [`HeadService`] (`service`): the gRPC face, converting from and to the protocol at
//!   the edge ([`wire`]); the HTTP API (`http.rs`) reads [`HeadCore`] too.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{info, warn};
use volley_common::{Result, VolleyError};

use super::jobs::ExecutionProgress;
use super::metrics::PackageFigures;
use super::package::{check_manifest, digest_of, BlobCache};
use super::proto;
use super::resources::Resources;
use super::status::{ClusterStatus, JobState, JobStatus};

mod service;
mod state;
pub(crate) mod store;
mod wire;

pub use service::HeadService;
pub(crate) use state::ActorRecord;
use state::{now_ms, JobEntry, State, WaitKind, Waiting};
use store::HeadStore;

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
    /// Why it waits, when no node could hold it even empty (`asks for 1 GPU: no node
    /// has 1 GPU (none has any)`); empty otherwise.
    pub waiting: String,
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

/// The most bytes of a job's log one read returns: a follower reads on from there.
pub(crate) const LOG_PIECE: u64 = 4 << 20;

/// The head's state and the signal its waiters sleep on.
pub struct HeadCore {
    state: Mutex<State>,
    changed: Notify,
    /// Wakes followers of jobs' logs: a driver's output arrived, or a job ended. Apart
    /// from `changed`, which fires on every task's move.
    logs: Notify,
    options: HeadOptions,
    /// Job files, once per digest.
    blobs: BlobCache,
    /// Each job's package: its files' paths, modes and digests.
    packages: Mutex<HashMap<String, proto::PackageManifest>>,
    /// Jobs and counters kept across restarts.
    store: HeadStore,
    /// Held while a snapshot of the jobs is taken and written.
    persisting: Mutex<()>,
    /// Worker-log queries sent to nodes and waiting for their answers, by query id.
    log_queries: Mutex<HashMap<u64, mpsc::UnboundedSender<proto::LogReply>>>,
    next_query: std::sync::atomic::AtomicU64,
    /// What each job's work waits for that no node has, as the monitor last saw it
    /// (once a second): answers to a driver's waits read it without a look at the
    /// whole queue.
    beyond_nodes: Mutex<HashMap<String, String>>,
    /// Tells this head apart from those before it on the same state folder: drivers
    /// name it on their calls ([`super::auth::HEAD_HEADER`]).
    incarnation: u64,
}

impl std::fmt::Debug for HeadCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadCore").finish_non_exhaustive()
    }
}

impl HeadCore {
    /// A head keeping its files in `options.state_dir`, with the jobs a head before it
    /// kept there (see [`State::restore_job`]) and expecting that head's nodes back.
    /// Fails, saying why, if it cannot open its store or package cache there.
    pub fn new(options: HeadOptions) -> Result<Arc<Self>> {
        let blobs = BlobCache::open(
            options.state_dir.join("packages"),
            options.package_cache_bytes,
        )?;
        let (store, recovered) = HeadStore::open(&options.state_dir.join("head.redb"))?;
        let mut state = State::new(
            options.inline_memory,
            recovered.next_node,
            recovered.next_job,
        );
        let mut packages = HashMap::new();
        for job in recovered.jobs {
            let info = job.info.unwrap_or_default();
            packages.insert(info.job_id.clone(), job.package.unwrap_or_default());
            let mut entry = wire::job_entry(info);
            entry.actor_history = wire::actor_history(job.actors);
            state.restore_job(entry);
        }
        state.expect_nodes(recovered.nodes);
        let core = Arc::new(Self {
            state: Mutex::new(state),
            changed: Notify::new(),
            logs: Notify::new(),
            blobs,
            packages: Mutex::new(packages),
            store,
            persisting: Mutex::new(()),
            log_queries: Mutex::default(),
            next_query: Default::default(),
            beyond_nodes: Mutex::default(),
            incarnation: rand::random::<u64>().max(1),
            options,
        });
        // After the jobs are back: the files of those that start again stay.
        core.evict_packages(&[]);
        Ok(core)
    }

    /// This head's incarnation (never 0).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Writes what changed of the jobs and counters to the store.
    fn persist(&self) -> Result<()> {
        use prost::Message;
        // One writer at a time, snapshot to commit: an older snapshot never lands last.
        let _one = self.persisting.lock().expect("persist lock");
        let (infos, next_node, next_job, nodes) = {
            let s = self.state.lock().expect("head lock");
            let infos: Vec<(proto::JobInfo, Vec<proto::StoredActor>)> = s
                .jobs()
                .map(|j| (wire::job_info(j), wire::stored_actors(j)))
                .collect();
            (infos, s.next_node(), s.next_job(), s.live_node_ids())
        };
        let packages = self.packages.lock().expect("packages lock");
        let jobs = infos
            .into_iter()
            .map(|(info, actors)| {
                let stored = proto::StoredJob {
                    package: packages.get(&info.job_id).cloned(),
                    info: Some(info),
                    actors,
                };
                let id = stored.info.as_ref().map(|i| i.job_id.clone());
                (id.unwrap_or_default(), stored.encode_to_vec())
            })
            .collect();
        drop(packages);
        self.store.save(jobs, next_node, next_job, nodes)
    }

    /// Writes the jobs and counters to the store now (a head about to exit).
    pub fn flush(&self) -> Result<()> {
        self.persist()
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
        // Every package but those of ended jobs: a job being added has its package
        // here before it is in the state.
        let ended: std::collections::HashSet<String> = {
            let s = self.state.lock().expect("head lock");
            s.jobs()
                .filter(|j| j.status.state.is_final())
                .map(|j| j.status.job_id.clone())
                .collect()
        };
        // Held while evicting: a job added meanwhile lists its package first, then
        // finds its files here or not.
        let packages = self.packages.lock().expect("packages lock");
        let keep = packages
            .iter()
            .filter(|(id, _)| !ended.contains(*id))
            .flat_map(|(_, p)| p.files.iter().map(|f| f.digest.clone()))
            .chain(also.iter().cloned())
            .collect();
        let removed = self.blobs.evict(&keep);
        drop(packages);
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

    /// Runs `f` on the state, then places what can run and wakes the waiters.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, ended) = {
            let mut s = self.state.lock().expect("head lock");
            let before = s.jobs_ended();
            let out = f(&mut s);
            s.schedule();
            (out, s.jobs_ended() != before)
        };
        self.changed.notify_waiters();
        if ended {
            // Kept before the caller hears of it: a head restarted right after must
            // not find the job running and start it again.
            if let Err(e) = self.persist() {
                warn!("{e}");
            }
            self.logs.notify_waiters();
        }
        out
    }

    /// Reads the state.
    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().expect("head lock"))
    }

    /// Checks heartbeats and attached drivers, and says in a job's log when work of
    /// it asks for more than any node has; runs until the process ends.
    pub async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        // What each job waited for at the last look, and what its log was told.
        let mut told = Told::default();
        for n in 0u64.. {
            tick.tick().await;
            let timeout = self.options.node_timeout;
            self.with(|s| {
                s.check_heartbeats(timeout);
                s.check_attached_drivers(timeout);
                s.check_resumes();
            });
            if n % 10 == 0 {
                self.tell_waiting(&mut told);
            }
        }
    }

    /// Writes into a job's log, once per reason, that work of it asks for more than
    /// any node has: `volley job submit --wait` and `volley job logs --follow` show
    /// it where the job's own output goes (a driver asking for too much would
    /// otherwise wait without a word). A reason is written once it held at two looks
    /// in a row: nodes rejoining a restarted head one by one pass without a word.
    fn tell_waiting(&self, told: &mut Told) {
        use std::io::Write;
        let now: HashMap<String, String> = self
            .read(State::waiting)
            .into_iter()
            .filter(|(_, w)| w.kind == WaitKind::BeyondNodes)
            .map(|(job, w)| (job, w.reason))
            .collect();
        let mut wrote = false;
        for (job, reason) in &now {
            if told.last.get(job) != Some(reason) || told.written.get(job) == Some(reason) {
                continue;
            }
            warn!("job {job}: {reason}");
            let line = format!("[volley] {reason}\n");
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.job_dir(job).join("driver.log"))
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = appended {
                warn!("job {job}: writing to its log: {e}");
            }
            told.written.insert(job.clone(), reason.clone());
            wrote = true;
        }
        told.written.retain(|job, _| now.contains_key(job));
        self.beyond_nodes
            .lock()
            .expect("waiting lock")
            .clone_from(&now);
        told.last = now;
        if wrote {
            self.logs.notify_waiters();
        }
    }

    // ------------------------------------------------------------------ jobs

    /// Registers a job whose package's files the head has; returns its id. A file
    /// missing on the head (evicted since it was uploaded) is `FailedPrecondition`:
    /// the client uploads it again.
    fn add_job(&self, mut spec: proto::JobSpec) -> std::result::Result<String, Status> {
        let invalid = |e: VolleyError| Status::invalid_argument(e.to_string());
        if spec.entrypoint.is_empty() {
            return Err(Status::invalid_argument("the job has no entrypoint"));
        }
        // What a process cannot be started with, said now rather than by the node that
        // fails to start the driver.
        if let Some(arg) = spec.entrypoint.iter().find(|a| a.contains('\0')) {
            return Err(Status::invalid_argument(format!(
                "entrypoint argument {arg:?} holds a NUL byte"
            )));
        }
        for (name, value) in &spec.env {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(Status::invalid_argument(format!(
                    "environment variable name {name:?}: give a name without `=` or NUL"
                )));
            }
            if value.contains('\0') {
                return Err(Status::invalid_argument(format!(
                    "environment variable {name}: its value holds a NUL byte"
                )));
            }
        }
        let resources: Resources = spec.resources.clone().into();
        resources.validate().map_err(invalid)?;
        let package = spec.package.take().unwrap_or_default();
        check_manifest(&package, self.options.max_package_bytes).map_err(invalid)?;
        let id = self.state.lock().expect("head lock").new_job_id();
        // Listed first, so that no eviction takes its files once they are found here.
        self.packages
            .lock()
            .expect("packages lock")
            .insert(id.clone(), package.clone());
        if let Some(f) = package.files.iter().find(|f| !self.blobs.has(&f.digest)) {
            self.packages.lock().expect("packages lock").remove(&id);
            return Err(Status::failed_precondition(format!(
                "package file {}: its contents (digest {}) are not on the head; upload them first",
                f.path, f.digest
            )));
        }
        if let Err(e) = std::fs::create_dir_all(self.job_dir(&id)) {
            self.packages.lock().expect("packages lock").remove(&id);
            return Err(Status::internal(e.to_string()));
        }
        let status = JobStatus {
            job_id: id.clone(),
            name: spec.name,
            state: JobState::Pending,
            entrypoint: spec.entrypoint,
            node_id: String::new(),
            exit_code: 0,
            error: String::new(),
            submitted_ms: now_ms(),
            finished_ms: 0,
            task_retries: 0,
            waiting: String::new(),
        };
        self.with(|s| {
            let mut job = JobEntry::new(status, spec.env, spec.attached, resources);
            job.share_workers = spec.share_workers;
            s.add_job(job);
        });
        // Kept before it is acknowledged: a head killed now still has it.
        if let Err(e) = self.persist() {
            warn!("{e}");
        }
        Ok(id)
    }

    /// Where job `id`'s logs are kept.
    fn job_dir(&self, id: &str) -> PathBuf {
        self.options.state_dir.join("jobs").join(id)
    }

    /// Creates a job from files already in memory (the HTTP API): `(path, mode, bytes)`.
    pub(crate) fn submit_job_files(
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
        self.add_job(spec).map_err(|e| match e.code() {
            tonic::Code::Internal => VolleyError::internal(e.message()),
            _ => VolleyError::plan(e.message()),
        })
    }

    /// The Dataset executions job `id`'s driver reported (the last few).
    pub fn job_executions(&self, id: &str) -> Result<Vec<ExecutionProgress>> {
        Ok(self.read(|s| s.executions(id).map(<[_]>::to_vec))?)
    }

    /// The tasks of job `id` the head holds (waiting, running, or done with their
    /// objects still in use), at most 2,000, failed and running first; and how many it
    /// holds in all.
    pub fn job_tasks(&self, id: &str) -> Result<(Vec<JobTask>, usize)> {
        Ok(self.read(|s| s.job_tasks(id))?)
    }

    /// A job's record, with what it waits for now.
    pub fn job(&self, id: &str) -> Result<JobStatus> {
        Ok(self.read(|s| {
            let waiting = s.waiting();
            s.job(id).map(|j| status_now(j, &waiting))
        })?)
    }

    /// The actors of job `id` (alive or not), by id.
    pub(crate) fn job_actors(&self, id: &str) -> Result<Vec<ActorRecord>> {
        Ok(self.read(|s| s.job_actors(id))?)
    }

    /// Every job, oldest first, with what each waits for now.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.read(|s| {
            let waiting = s.waiting();
            s.jobs().map(|j| status_now(j, &waiting)).collect()
        })
    }

    /// Stops a job: its driver and tasks are killed and its objects freed.
    pub fn stop_job(&self, id: &str) -> Result<JobStatus> {
        Ok(self.with(|s| {
            s.job(id)?;
            s.finish_job(id, JobState::Stopped, -1, "stopped by request");
            s.job(id).map(|j| j.status.clone())
        })?)
    }

    /// The job's log from `offset`, at most [`LOG_PIECE`] bytes of it: `(bytes, job
    /// finished and nothing more to read)`.
    pub fn job_log(&self, id: &str, offset: u64) -> Result<(Vec<u8>, bool)> {
        use std::io::{Read, Seek, SeekFrom};
        let done = self.read(|s| s.job(id).map(|j| j.status.state.is_final()))?;
        // No file yet: the driver has written nothing.
        let mut data = Vec::new();
        let mut at_end = true;
        if let Ok(mut f) = std::fs::File::open(self.job_dir(id).join("driver.log")) {
            // An offset at or past the end reads nothing, even while the log grows: what
            // comes back always starts at `offset` (a seek past `i64::MAX` would fail).
            if offset < f.metadata()?.len() {
                f.seek(SeekFrom::Start(offset))?;
                // A piece at a time: a log of gigabytes is neither held whole nor sent
                // as one message past the transport's limit.
                (&mut f).take(LOG_PIECE + 1).read_to_end(&mut data)?;
                if data.len() as u64 > LOG_PIECE {
                    data.truncate(LOG_PIECE as usize);
                    at_end = false;
                }
            }
        }
        Ok((data, done && at_end))
    }

    /// What job `id`'s work waits for that no node has, as the monitor last saw it
    /// (empty if nothing).
    fn beyond_nodes(&self, id: &str) -> String {
        let beyond = self.beyond_nodes.lock().expect("waiting lock");
        beyond.get(id).cloned().unwrap_or_default()
    }

    /// Waits until a driver's output arrives, a job ends, or `timeout` passes.
    pub(crate) async fn logs_within(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.logs.notified()).await;
    }

    /// The cluster in Prometheus' text format (the head's `/metrics`).
    pub fn metrics(&self) -> String {
        let (status, jobs, tasks, running, waits) = self.read(|s| {
            let running: Vec<proto::ExecutionProgress> = s
                .running_executions()
                .iter()
                .map(|(job, e)| wire::execution(job, e))
                .collect();
            let jobs: Vec<proto::JobInfo> = s.jobs().map(wire::job_info).collect();
            let waiting = s.waiting();
            let waits: Vec<(&'static str, usize)> = WaitKind::ALL
                .iter()
                .map(|k| (k.name(), waiting.values().filter(|w| w.kind == *k).count()))
                .collect();
            (s.status(), jobs, s.task_metrics().clone(), running, waits)
        });
        let packages = PackageFigures {
            cached: self.blobs.size(),
            received: self.blobs.received_bytes(),
        };
        let status = proto::ClusterStatus::from(&status);
        super::metrics::render(&status, &jobs, &waits, &tasks, &packages, &running)
    }

    /// The cluster's nodes and load.
    pub fn status(&self) -> ClusterStatus {
        self.read(State::status)
    }

    /// Looks at the state with `check` until it says done or `deadline` passes, waking
    /// on every change; returns what `check` saw last.
    async fn wait_until<T, E>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&State, bool) -> std::result::Result<(T, bool), E>,
    ) -> std::result::Result<T, E> {
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

/// Job `j`'s record with what it waits for, out of `waiting`
/// ([`State::waiting`]).
fn status_now(j: &JobEntry, waiting: &HashMap<String, Waiting>) -> JobStatus {
    let mut status = j.status.clone();
    if let Some(w) = waiting.get(&status.job_id) {
        status.waiting = w.reason.clone();
    }
    status
}

/// What jobs waited for at the head's last look, and what their logs were told
/// ([`HeadCore::tell_waiting`]).
#[derive(Default)]
struct Told {
    last: HashMap<String, String>,
    written: HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's end is in the store when the call that ended it returns: a head killed
    /// right after must not find it running and start it again.
    #[test]
    fn a_stopped_job_is_stored_stopped_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let options = HeadOptions::new(dir.path().join("head"), "t".repeat(32));
        let core = HeadCore::new(options).unwrap();
        let id = core
            .add_job(proto::JobSpec {
                entrypoint: vec!["true".into()],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(core.stop_job(&id).unwrap().state, JobState::Stopped);
        drop(core);
        let (_, recovered) = HeadStore::open(&dir.path().join("head/head.redb")).unwrap();
        let stored = recovered
            .jobs
            .iter()
            .find_map(|j| j.info.as_ref().filter(|i| i.job_id == id))
            .unwrap();
        assert_eq!(stored.state, JobState::Stopped.to_string());
    }
}
