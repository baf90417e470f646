//! The processes a node starts for a job: its files fetched once, its workers and its
//! driver, each with its memory budget and allocator settings.

use super::*;

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
pub(super) struct Spawner {
    tx: std::sync::mpsc::Sender<SpawnRequest>,
}

impl Spawner {
    pub(super) fn start(handle: tokio::runtime::Handle) -> Result<Self> {
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

impl Agent {
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
    pub(super) async fn prepare_job(self: Arc<Self>, job: String) {
        if self.stopped(&job) {
            return;
        }
        if let Err(e) = self.job(&job).await {
            // Said again, with the task it fails, if the job sends any here.
            warn!("job {job}: cannot get its package ready: {e}");
        }
    }

    pub(super) async fn ensure_workers(self: Arc<Self>, job: String, gpus: Vec<u32>) {
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

    pub(super) async fn spawn_worker(
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
            agent.store.drop_unadopted(&id);
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
            // Told to exit (to give way, or killed for a cancel, a killed actor or a
            // stopped job): what it was still running ended with it, and the head
            // hears so (a cancelled task's or killed actor's GPUs wait for that, and
            // so may whoever waits for a killed actor to be gone).
            if let Some((actor, inc)) = w.actor.clone().or(w
                .start_actor
                .as_ref()
                .map(|a| (a.actor_id.clone(), a.incarnation)))
            {
                self.report_actor(&actor, inc, false, why.clone(), 0).await;
            }
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
    pub(super) fn report_lost(&self, running: Vec<(String, u32)>, why: &str) {
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
    pub(super) async fn start_driver(self: Arc<Self>, d: proto::StartDriver) -> Result<()> {
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
            .stderr(Stdio::from(log))
            // It leads a process group of its own: a stopped job's driver takes the
            // processes it started with it (a shell's commands).
            .process_group(0);
        let mut child = self.spawner.spawn(cmd).await.map_err(|e| {
            VolleyError::execution(format!("cannot start {:?}: {e}", job.entrypoint[0]))
        })?;
        let (kill_tx, mut kill_rx) = oneshot::channel();
        {
            let mut s = self.state.lock().expect("agent lock");
            // A stop that came while the process started found no driver to kill:
            // this one is killed at once.
            if s.stopped_jobs.contains(&d.job_id) {
                let _ = kill_tx.send(());
            } else {
                s.drivers.insert(d.job_id.clone(), kill_tx);
            }
        }
        let mut head = self.head.clone();
        let mut offset = 0u64;
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let (code, killed) = loop {
            tokio::select! {
                s = child.wait() => break (s.ok().and_then(|s| s.code()).unwrap_or(-1), false),
                _ = &mut kill_rx => {
                    if let Some(pid) = child.id() {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
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
                    Err(e) if crate::cluster::net::unreachable(&e) && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// Most bytes of a driver's log sent in one message.
const LOG_PIECE: u64 = 4 << 20;

/// Sends the driver's output past `offset` to the head (as part of driver run `run`),
/// a piece at a time (a chatty driver's backlog is neither read whole nor sent as one
/// message past the transport's limit); returns how far it got.
async fn forward_log(head: &mut Head, job: &str, run: &str, path: &Path, mut offset: u64) -> u64 {
    loop {
        let data = match read_piece(path, offset, LOG_PIECE) {
            Ok(data) if !data.is_empty() => data,
            _ => return offset,
        };
        let n = data.len() as u64;
        let sent = head
            .append_log(proto::LogAppend {
                job_id: job.to_string(),
                data,
                offset,
                run: run.to_string(),
            })
            .await;
        if sent.is_err() {
            return offset;
        }
        offset += n;
        if n < LOG_PIECE {
            return offset;
        }
    }
}

/// At most `max` bytes of the file at `path` from `offset`.
fn read_piece(path: &Path, offset: u64, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut data = Vec::new();
    file.take(max).read_to_end(&mut data)?;
    Ok(data)
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
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
