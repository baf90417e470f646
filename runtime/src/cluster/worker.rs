//! Worker mode: a process of the job's binary started by a node agent, running tasks
//! and actor calls it pulls from that agent until told to exit.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use arrow::array::RecordBatch;
use futures::StreamExt;
use tracing::warn;
use volley_common::{ErrorReport, Result, VolleyError};

use super::net::{wire_error, wire_execution_error, Channels};
use super::objects::{
    decode_inline, encode_inline, fetch_range, fetch_shared, store, store_shared,
    ObjectCompression, Selection, SHARED_DIR_VAR,
};
use super::proto::{self, task_report::Outcome};
use super::task::{
    catch_panic, decode, input_bytes, ActorCall, ActorCalls, InputStream, Payload, ReadAhead,
    RemoteActor, RemoteTask, TaskContext,
};

/// Whether this process was started by a node agent as a worker.
pub fn is_worker() -> bool {
    std::env::var_os("VOLLEY_WORKER_ID").is_some_and(|v| !v.is_empty())
}

fn env(name: &str) -> Result<String> {
    volley_common::env_var(name)?
        .ok_or_else(|| VolleyError::Config(format!("worker mode needs {name} in the environment")))
}

/// Runs tasks until the agent says to stop or cannot be reached; never returns.
pub fn run_worker() -> ! {
    let code = match worker_loop() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("volley worker: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// Moves this worker, kept from a job that ended, to the job that took it over: its
/// working folder to that job's package, its output (stdout and stderr) to its log
/// file there.
fn move_to_job(job: &proto::WorkerJob) -> Result<()> {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::env::set_current_dir(&job.dir).map_err(|e| {
        VolleyError::execution(format!("job {}: cannot enter {}: {e}", job.job_id, job.dir))
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&job.log)
        .map_err(|e| {
            VolleyError::execution(format!("job {}: cannot open {}: {e}", job.job_id, job.log))
        })?;
    nix::unistd::dup2_stdout(&log)
        .and_then(|()| nix::unistd::dup2_stderr(&log))
        .map_err(|e| {
            VolleyError::execution(format!(
                "job {}: cannot write to {}: {e}",
                job.job_id, job.log
            ))
        })
}

fn worker_loop() -> Result<()> {
    // A worker never outlives its node agent: if the agent dies (even by SIGKILL), the
    // kernel kills the worker too, so no orphan keeps running a task the cluster has
    // already handed to another node.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let worker_id = env("VOLLEY_WORKER_ID")?;
    let agent_address = env("VOLLEY_AGENT_ADDRESS")?;
    let token = env("VOLLEY_TOKEN")?;
    let node_id = env("VOLLEY_NODE_ID").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| VolleyError::internal(format!("cannot start the worker runtime: {e}")))?;
    let _enter = rt.enter();
    let channels = Channels::new(&token, &super::tls::TlsConfig::from_env()?);
    let mut agent = channels.agent(&agent_address)?;
    let link = Link {
        channels: &channels,
        agent_address: &agent_address,
        node_id: &node_id,
        shared_dir: volley_common::env_var(SHARED_DIR_VAR)?
            .filter(|d| !d.is_empty())
            .map(std::path::PathBuf::from),
        compression: ObjectCompression::from_env()?,
    };
    let mut failures = 0;
    // The next task, when the agent handed it over with the last result's answer.
    let mut handed: Option<proto::PullResponse> = None;
    loop {
        let pulled = match handed.take() {
            Some(next) => Ok(tonic::Response::new(next)),
            None => rt.block_on(agent.pull(proto::PullRequest {
                worker_id: worker_id.clone(),
                timeout_ms: 2_000,
            })),
        };
        let r = match pulled {
            Ok(r) => {
                failures = 0;
                r.into_inner()
            }
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return Err(VolleyError::execution(format!(
                        "lost the node agent at {agent_address}: {}",
                        e.message()
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if r.exit {
            return Ok(());
        }
        if let Some(job) = &r.job {
            move_to_job(job)?;
        }
        if let Some(start) = r.actor {
            let ctx = TaskContext {
                task_id: start.actor_id.clone(),
                attempt: start.incarnation,
                job_id: start.job_id.clone(),
                node_id: node_id.clone(),
                gpu_ids: start.gpu_ids.clone(),
                name: String::new(),
            };
            let built =
                decode::<Box<dyn RemoteActor>>("the actor", &start.payload).and_then(|mut a| {
                    catch_panic("actor start", || a.start(&ctx))?;
                    Ok(a)
                });
            let (actor, error) = match built {
                Ok(a) => (Some(a), String::new()),
                Err(e) => (None, e.to_string()),
            };
            rt.block_on(agent.actor_ready(proto::ActorStarted {
                worker_id: worker_id.clone(),
                actor_id: start.actor_id,
                incarnation: start.incarnation,
                error,
                pid: std::process::id(),
            }))
            .map_err(|e| VolleyError::execution(format!("lost the node agent: {}", e.message())))?;
            // From here on the worker serves its actor's calls, and nothing else.
            return match actor {
                Some(a) => rt.block_on(serve_actor(&link, &agent, &worker_id, a, node_id.clone())),
                None => Ok(()),
            };
        }
        let Some(task) = r.task else { continue };
        let started = std::time::Instant::now();
        let (mut report, output, ran) = rt.block_on(run_task(&link, &task));
        report.run_micros = started.elapsed().as_micros() as u64;
        let send = rt.block_on(agent.finish(proto::WorkerResult {
            worker_id: worker_id.clone(),
            report: Some(report),
            output: output.into(),
            await_verdict: ran.as_ref().is_some_and(|(t, _)| t.leaves_side_effects()),
        }));
        // An attempt whose result will not be used (superseded, or not delivered: the
        // head then runs the task again) undoes what it left behind.
        let stale = match send {
            Ok(r) => {
                let r = r.into_inner();
                handed = r
                    .next
                    .filter(|n| n.task.is_some() || n.actor.is_some() || n.exit);
                r.stale
            }
            Err(e) => {
                warn!("cannot report task {}: {}", task.task_id, e.message());
                true
            }
        };
        if let (true, Some((t, ctx))) = (stale, ran) {
            let _ = catch_panic("discarding a superseded attempt", || {
                t.discard(&ctx);
                Ok(())
            });
        }
    }
}

/// An input no listed copy of which could be read.
struct Unreadable {
    message: String,
    input: String,
    /// The stores that failed to serve it.
    from: Vec<String>,
}

/// Inputs a task reads at once.
const INPUTS_IN_FLIGHT: usize = 8;

/// Where a worker is: its agent and node, to read inputs and store results.
struct Link<'a> {
    channels: &'a Channels,
    agent_address: &'a str,
    node_id: &'a str,
    /// The node's shared-memory folder: objects of this node move through it as files.
    shared_dir: Option<std::path::PathBuf>,
    /// How the node compresses objects: results are written and sent so.
    compression: ObjectCompression,
}

impl Link<'_> {
    /// A report for `task`, filled in as it runs.
    fn report(&self, task: &proto::TaskAssignment) -> proto::TaskReport {
        proto::TaskReport {
            node_id: self.node_id.to_string(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            outcome: Outcome::Ok as i32,
            ..Default::default()
        }
    }

    /// Reads a task's inputs: any copy will do; if none can be read the task is
    /// retried (the head rebuilds a lost input first), and the report says so. Several
    /// inputs are read at once (a reduce task reads a partition of every map output),
    /// at most [`INPUTS_IN_FLIGHT`] of them.
    async fn inputs(
        &self,
        task: &proto::TaskAssignment,
    ) -> std::result::Result<Vec<Vec<RecordBatch>>, proto::TaskReport> {
        let mut reads = Vec::with_capacity(task.args.len());
        for arg in &task.args {
            reads.push(self.input(arg));
        }
        let read: Vec<_> = futures::stream::iter(reads)
            .buffered(INPUTS_IN_FLIGHT)
            .collect()
            .await;
        // Every input that could not be read is reported at once: the head rebuilds
        // them all before the task runs again.
        let (inputs, unreadable): (Vec<_>, Vec<_>) = read.into_iter().partition(|r| r.is_ok());
        if unreadable.is_empty() {
            return Ok(inputs.into_iter().flatten().collect());
        }
        let unreadable: Vec<Unreadable> = unreadable.into_iter().filter_map(|r| r.err()).collect();
        Err(self.unreadable_report(task, unreadable))
    }

    /// The report of a task that could not read `unreadable` (not empty): a system
    /// failure, retried once the cluster has rebuilt them.
    fn unreadable_report(
        &self,
        task: &proto::TaskAssignment,
        unreadable: Vec<Unreadable>,
    ) -> proto::TaskReport {
        let mut report = self.report(task);
        report.outcome = Outcome::SystemFailure as i32;
        report.error = Some(wire_execution_error(unreadable[0].message.clone()));
        report.unreadable = unreadable
            .into_iter()
            .map(|u| proto::UnreadableInput {
                object_id: u.input,
                from: u.from,
            })
            .collect();
        report
    }

    /// Reads `task`'s inputs into `to` in order while the task runs, at most
    /// [`INPUTS_IN_FLIGHT`] at once and while the task has less than
    /// [`InputStream::READ_AHEAD_BYTES`] waiting; stops when the task ends. An input
    /// that cannot be read ends the task's stream with the reason; the others are then
    /// still tried (and thrown away), so that every lost one is reported at once.
    async fn stream_inputs(
        &self,
        task: &proto::TaskAssignment,
        to: tokio::sync::mpsc::UnboundedSender<Result<Vec<RecordBatch>>>,
        ahead: &ReadAhead,
    ) -> Vec<Unreadable> {
        let mut args = task.args.iter();
        let mut reading = futures::stream::FuturesOrdered::new();
        let mut unreadable = Vec::new();
        loop {
            let failed = !unreadable.is_empty();
            while reading.len() < INPUTS_IN_FLIGHT
                && (failed || ahead.bytes() < InputStream::READ_AHEAD_BYTES)
            {
                match args.next() {
                    Some(arg) => reading.push_back(self.input(arg)),
                    None => break,
                }
            }
            if reading.is_empty() {
                if args.len() == 0 {
                    return unreadable;
                }
                // Enough read ahead: wait for the task to take some (or to end).
                tokio::select! {
                    _ = ahead.taken.notified() => continue,
                    _ = to.closed() => return unreadable,
                }
            }
            match reading.next().await {
                Some(Ok(_)) if failed => {}
                Some(Ok(batches)) => {
                    ahead.add(input_bytes(&batches));
                    if to.send(Ok(batches)).is_err() {
                        return unreadable;
                    }
                }
                Some(Err(u)) => {
                    if !failed {
                        let _ = to.send(Err(VolleyError::execution(u.message.clone())));
                    }
                    unreadable.push(u);
                }
                None => {}
            }
        }
    }

    /// Runs `t`, which streams its inputs, on a thread of the blocking pool while this
    /// one reads them.
    async fn run_streamed(
        &self,
        task: &proto::TaskAssignment,
        t: Box<dyn RemoteTask>,
        ctx: TaskContext,
        label: String,
    ) -> (
        proto::TaskReport,
        Vec<u8>,
        Option<(Box<dyn RemoteTask>, TaskContext)>,
    ) {
        let (to, ahead, inputs) = InputStream::channel();
        let reads = self.stream_inputs(task, to, &ahead);
        tokio::pin!(reads);
        let (run_ctx, run_label) = (ctx.clone(), label.clone());
        let mut running = tokio::task::spawn_blocking(move || {
            let out = catch_panic(&run_label, || t.run_streamed(&run_ctx, inputs));
            (t, out)
        });
        let mut read = None;
        let joined = loop {
            tokio::select! {
                u = &mut reads, if read.is_none() => read = Some(u),
                r = &mut running => break r,
            }
        };
        // The task has ended; where an input failed it, the reads go on to find every
        // lost input.
        let unreadable = match read {
            Some(u) => u,
            None => reads.await,
        };
        let (t, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                let e = VolleyError::internal(format!("the task's thread failed: {e}"));
                let (report, output) = self.deliver(task, &label, Err(e)).await;
                return (report, output, None);
            }
        };
        if !unreadable.is_empty() {
            // Nothing of an attempt that could not read its inputs is kept.
            if t.leaves_side_effects() {
                let _ = tokio::task::spawn_blocking(move || {
                    catch_panic("discarding a failed attempt", || {
                        t.discard(&ctx);
                        Ok(())
                    })
                })
                .await;
            }
            return (self.unreadable_report(task, unreadable), Vec::new(), None);
        }
        let (report, output) = self.deliver(task, &label, result).await;
        (report, output, Some((t, ctx)))
    }

    /// One input (or the part of it the task reads).
    async fn input(
        &self,
        arg: &proto::ObjectLocation,
    ) -> std::result::Result<Vec<RecordBatch>, Unreadable> {
        let mut last_error = String::from("no copy is known");
        let selection = Selection::of_batch(arg.batch);
        if !arg.inline.is_empty() {
            match decode_inline(&arg.object_id, &arg.inline)
                .and_then(|b| selection.apply(&arg.object_id, b))
            {
                Ok(b) => return Ok(b),
                Err(e) => last_error = e.to_string(),
            }
        }
        // A copy on this node is read from its file, without Flight.
        if self.shared_dir.is_some() && arg.addresses.iter().any(|a| a == self.agent_address) {
            let local =
                fetch_shared(self.channels, self.agent_address, &arg.object_id, arg.batch).await;
            if let Some(b) = local {
                return Ok(b);
            }
        }
        let mut failed = Vec::new();
        for address in &arg.addresses {
            match fetch_range(self.channels, address, &arg.object_id, selection).await {
                Ok(b) => return Ok(b),
                Err(e) => {
                    last_error = e.to_string();
                    failed.push(address.clone());
                }
            }
        }
        Err(Unreadable {
            message: format!("cannot read input {}: {last_error}", arg.object_id),
            input: arg.object_id.clone(),
            from: failed,
        })
    }

    /// Stores what `task` returned (a small result goes to the agent with the
    /// report, a big one over Flight) and returns the report and the inline bytes.
    async fn deliver(
        &self,
        task: &proto::TaskAssignment,
        label: &str,
        result: Result<Vec<RecordBatch>>,
    ) -> (proto::TaskReport, Vec<u8>) {
        let mut report = self.report(task);
        let mut output = Vec::new();
        match result {
            Ok(batches) => {
                let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
                let stored = match encode_inline(&batches) {
                    Some(bytes) => {
                        output = bytes;
                        Ok(0)
                    }
                    None => self.store(&task.task_id, batches).await,
                };
                match stored {
                    Ok(bytes) => {
                        report.output_bytes = bytes;
                        report.output_rows = rows as u64;
                    }
                    Err(e) => {
                        report.outcome = Outcome::SystemFailure as i32;
                        report.error = Some(wire_execution_error(format!(
                            "cannot store the result: {e}"
                        )));
                    }
                }
            }
            Err(e) => {
                report.outcome = Outcome::Failed as i32;
                // The category travels with the message (a cancelled task, a user
                // function's failure, a lack of resources are told apart by the driver).
                let e = e.context(format!("task {label} {FAILED_ON} {}", self.node_id));
                report.error = Some(wire_error(&ErrorReport::from(&e)));
            }
        }
        (report, output)
    }
}

/// What a task's error says after the task's name: `task X failed on node-2: ...`.
const FAILED_ON: &str = "failed on";

/// `e`, the error of cluster task `name` (as its caller names it: `task X`), with
/// that name in front, unless the node that ran the task already said it
/// (`task X failed on node-2: ...`).
pub fn name_task_error(e: VolleyError, name: &str) -> VolleyError {
    if e.to_string().starts_with(&format!("{name} {FAILED_ON} ")) {
        e
    } else {
        e.context(name)
    }
}

impl Link<'_> {
    /// Stores a result in this node's store: as a file in its shared folder where it
    /// has one, else (or if that fails) over Flight.
    async fn store(&self, id: &str, batches: Vec<RecordBatch>) -> Result<u64> {
        // Either way the object is decoded with its first batch's schema.
        crate::cluster::objects::one_schema(&batches)
            .map_err(|e| e.context(format!("object {id}")))?;
        let batches = batches
            .into_iter()
            .map(volley_common::compact_bloated_views)
            .collect::<Result<Vec<_>>>()?;
        if let Some(dir) = &self.shared_dir {
            let c = self.compression;
            match store_shared(self.channels, self.agent_address, dir, id, &batches, c).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => warn!("object {id}: cannot hand it over as a file ({e}); sending it"),
            }
        }
        store(
            self.channels,
            self.agent_address,
            id,
            batches,
            self.compression,
        )
        .await
    }
}

/// Where `task` runs, as its code sees it.
fn context(task: &proto::TaskAssignment, node_id: &str) -> TaskContext {
    TaskContext {
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        job_id: task.job_id.clone(),
        node_id: node_id.to_string(),
        gpu_ids: task.gpu_ids.clone(),
        name: task.name.clone(),
    }
}

fn label(task: &proto::TaskAssignment) -> String {
    if task.name.is_empty() {
        task.task_id.clone()
    } else {
        task.name.clone()
    }
}

/// Runs one task: reads its inputs, runs it, stores its result.
async fn run_task(
    link: &Link<'_>,
    task: &proto::TaskAssignment,
) -> (
    proto::TaskReport,
    Vec<u8>,
    Option<(Box<dyn RemoteTask>, TaskContext)>,
) {
    let ctx = context(task, link.node_id);
    let label = label(task);
    let decoded =
        decode::<Payload>(&format!("task {label}"), &task.payload).and_then(|p| match p {
            Payload::Task(t) => Ok(t),
            Payload::Call { .. } => Err(VolleyError::internal(
                "an actor call reached a worker with no actor",
            )),
        });
    let t = match decoded {
        Ok(t) => t,
        Err(e) => {
            let (report, output) = link.deliver(task, &label, Err(e)).await;
            return (report, output, None);
        }
    };
    if t.streams_inputs() {
        return link.run_streamed(task, t, ctx, label).await;
    }
    let inputs = match link.inputs(task).await {
        Ok(inputs) => inputs,
        Err(report) => return (report, Vec::new(), None),
    };
    let result = catch_panic(&label, || t.run(&ctx, inputs));
    let (report, output) = link.deliver(task, &label, result).await;
    (report, output, Some((t, ctx)))
}

/// How many calls an actor's worker holds at once: one the actor runs, the next with
/// its inputs being read, so reading inputs and storing results overlap the actor's
/// work (the pool sends an actor several calls at once).
const CALLS_HELD: usize = 2;

/// A call whose inputs are read, on its way to the actor's thread.
struct ReadyCall {
    task: proto::TaskAssignment,
    method: String,
    arg: serde_json::Value,
    inputs: Vec<Vec<RecordBatch>>,
}

/// A call's result on its way back from the actor's thread.
type Answer = (proto::TaskAssignment, String, Result<Vec<RecordBatch>>);

/// The actor's side of its worker: calls whose inputs are read come in, answers go out.
struct CallQueue {
    calls: std::sync::mpsc::Receiver<ReadyCall>,
    results: tokio::sync::mpsc::UnboundedSender<Answer>,
    node_id: String,
    next_id: u64,
    /// Calls taken and not answered yet, by id.
    taken: HashMap<u64, (proto::TaskAssignment, String)>,
}

impl ActorCalls for CallQueue {
    fn next(&mut self, wait: bool) -> Option<ActorCall> {
        let c = if wait {
            self.calls.recv().ok()?
        } else {
            self.calls.try_recv().ok()?
        };
        let id = self.next_id;
        self.next_id += 1;
        let ctx = context(&c.task, &self.node_id);
        self.taken.insert(id, (c.task.clone(), label(&c.task)));
        Some(ActorCall {
            id,
            ctx,
            method: c.method,
            arg: c.arg,
            inputs: c.inputs,
        })
    }

    fn answer(&mut self, id: u64, result: Result<Vec<RecordBatch>>) {
        if let Some((task, label)) = self.taken.remove(&id) {
            let _ = self.results.send((task, label, result));
        }
    }
}

/// Serves actor calls until the agent says to exit. The actor runs on a thread of its
/// own, one call at a time and in the order they came; this thread reads the next
/// call's inputs while it runs and stores each result while the next one runs.
async fn serve_actor(
    link: &Link<'_>,
    agent: &super::net::Agent,
    worker_id: &str,
    mut actor: Box<dyn RemoteActor>,
    node_id: String,
) -> Result<()> {
    use futures::future::{BoxFuture, FutureExt};
    use futures::stream::{FuturesUnordered, StreamExt};

    let (to_actor, calls) = std::sync::mpsc::channel::<ReadyCall>();
    let (results, mut done) = tokio::sync::mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("volley-actor".into())
        .spawn(move || {
            let mut queue = CallQueue {
                calls,
                results,
                node_id,
                next_id: 0,
                taken: HashMap::new(),
            };
            let served = std::panic::catch_unwind(AssertUnwindSafe(|| actor.serve(&mut queue)));
            if let Err(p) = served {
                // The actor's state is unknown: the worker exits, its agent reports the
                // actor dead and the calls it held failed, and the pool replaces it.
                eprintln!(
                    "volley worker: the actor panicked: {}",
                    super::task::panic_message(p.as_ref())
                );
                std::process::exit(1);
            }
            for (_, (task, label)) in queue.taken.drain() {
                let e = VolleyError::internal("the actor stopped without answering this call");
                let _ = queue.results.send((task, label, Err(e)));
            }
        })
        .map_err(|e| VolleyError::internal(format!("cannot start the actor's thread: {e}")))?;

    type Finished = std::result::Result<proto::FinishResponse, tonic::Status>;
    let mut waiting: std::collections::VecDeque<proto::TaskAssignment> = Default::default();
    // Calls whose inputs are being read, waiting for the actor or running on it.
    let mut held = 0usize;
    let mut reading: Option<BoxFuture<'_, std::result::Result<ReadyCall, proto::TaskReport>>> =
        None;
    let mut pulling: Option<
        BoxFuture<'static, std::result::Result<proto::PullResponse, tonic::Status>>,
    > = None;
    let mut finishing: FuturesUnordered<BoxFuture<'_, Finished>> = FuturesUnordered::new();
    let mut failures = 0;
    let mut exit = false;
    let finish = |report: proto::TaskReport, output: Vec<u8>| -> BoxFuture<'static, Finished> {
        let mut agent = agent.clone();
        let request = proto::WorkerResult {
            worker_id: worker_id.to_string(),
            report: Some(report),
            output: output.into(),
            await_verdict: false,
        };
        async move { agent.finish(request).await.map(|r| r.into_inner()) }.boxed()
    };
    loop {
        if reading.is_none() && held < CALLS_HELD {
            if let Some(task) = waiting.pop_front() {
                held += 1;
                reading = Some(
                    async move {
                        let label = label(&task);
                        let (method, arg) =
                            match decode::<Payload>(&format!("task {label}"), &task.payload) {
                                Ok(Payload::Call { method, arg }) => (method, arg),
                                Ok(Payload::Task(_)) => {
                                    let e = VolleyError::internal(
                                        "a task reached the worker of an actor",
                                    );
                                    return Err(link.deliver(&task, &label, Err(e)).await.0);
                                }
                                Err(e) => return Err(link.deliver(&task, &label, Err(e)).await.0),
                            };
                        let inputs = link.inputs(&task).await?;
                        Ok(ReadyCall {
                            task,
                            method,
                            arg,
                            inputs,
                        })
                    }
                    .boxed(),
                );
            }
        }
        if !exit && pulling.is_none() && waiting.is_empty() && held < CALLS_HELD {
            let mut agent = agent.clone();
            let request = proto::PullRequest {
                worker_id: worker_id.to_string(),
                timeout_ms: 2_000,
            };
            let pause = failures > 0;
            pulling = Some(
                async move {
                    if pause {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    agent.pull(request).await.map(|r| r.into_inner())
                }
                .boxed(),
            );
        }
        if exit && waiting.is_empty() && held == 0 && finishing.is_empty() {
            break;
        }
        tokio::select! {
            r = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                reading = None;
                match r {
                    Ok(call) => {
                        if to_actor.send(call).is_err() {
                            return Err(VolleyError::internal("the actor's thread stopped"));
                        }
                    }
                    Err(report) => {
                        held -= 1;
                        finishing.push(finish(report, Vec::new()));
                    }
                }
            }
            answer = done.recv() => {
                // The actor's thread ends only when its `serve` returns; calls it did
                // not take would wait forever: the worker exits, and its agent reports
                // every call it held as failed.
                let Some((task, label, out)) = answer else {
                    return Err(VolleyError::execution("the actor stopped serving its calls"));
                };
                held -= 1;
                finishing.push(
                    async move {
                        let (report, output) = link.deliver(&task, &label, out).await;
                        finish(report, output).await
                    }
                    .boxed(),
                );
            }
            r = async { pulling.as_mut().expect("guarded").await }, if pulling.is_some() => {
                pulling = None;
                match r {
                    Ok(r) => {
                        failures = 0;
                        exit |= r.exit;
                        waiting.extend(r.task);
                    }
                    Err(e) => {
                        failures += 1;
                        if failures >= 5 {
                            return Err(VolleyError::execution(format!(
                                "lost the node agent at {}: {}",
                                link.agent_address,
                                e.message()
                            )));
                        }
                    }
                }
            }
            Some(r) = finishing.next(), if !finishing.is_empty() => match r {
                Ok(r) => {
                    if let Some(next) = r.next {
                        exit |= next.exit;
                        waiting.extend(next.task);
                    }
                }
                Err(e) => warn!("cannot report an actor call: {}", e.message()),
            },
        }
    }
    drop(to_actor);
    let _ = thread.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::ipc::writer::StreamWriter;

    use super::*;

    /// An object that travels with its location: `rows` Int64 values from `first`.
    fn inline_object(id: &str, first: i64, rows: usize) -> proto::ObjectLocation {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let values = Int64Array::from_iter_values(first..first + rows as i64);
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(values)]).unwrap();
        let mut bytes = Vec::new();
        let mut w = StreamWriter::try_new(&mut bytes, &schema).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        drop(w);
        proto::ObjectLocation {
            object_id: id.to_string(),
            inline: bytes.into(),
            ..Default::default()
        }
    }

    fn first_value(batches: &[RecordBatch]) -> i64 {
        let x = batches[0].column(0);
        x.as_any().downcast_ref::<Int64Array>().unwrap().value(0)
    }

    fn assignment(args: Vec<proto::ObjectLocation>) -> proto::TaskAssignment {
        proto::TaskAssignment {
            task_id: "t".into(),
            args,
            ..Default::default()
        }
    }

    fn with_link<T>(f: impl FnOnce(&Link<'_>) -> T) -> T {
        let channels = Channels::new("token", &crate::cluster::tls::TlsConfig::default());
        let link = Link {
            channels: &channels,
            agent_address: "127.0.0.1:9",
            node_id: "node-1",
            shared_dir: None,
            compression: ObjectCompression::default(),
        };
        f(&link)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_streaming_task_s_inputs_come_in_order_and_the_reads_wait_at_the_cap() {
        const MIB: u64 = 1 << 20;
        // 24 inputs of 8 MiB each (1 Mi Int64 values), 192 MiB in all.
        let rows = 1 << 20;
        let task = assignment(
            (0..24)
                .map(|i| inline_object(&format!("o{i}"), i * rows as i64, rows))
                .collect(),
        );
        with_link(|link| {
            runtime().block_on(async {
                let (to, ahead, mut inputs) = InputStream::channel();
                let reads = link.stream_inputs(&task, to, &ahead);
                tokio::pin!(reads);
                // The task takes nothing: the reads stop once 64 MiB wait, past that by
                // at most the reads already started.
                let waited = tokio::time::timeout(Duration::from_millis(300), reads.as_mut()).await;
                assert!(waited.is_err(), "the reads did not wait for the task");
                let read = ahead.bytes();
                assert!(
                    (InputStream::READ_AHEAD_BYTES..=InputStream::READ_AHEAD_BYTES + 64 * MIB)
                        .contains(&read),
                    "{} MiB read ahead",
                    read / MIB
                );
                // Taken one at a time, every input comes, in order.
                let taking = async {
                    let mut firsts = Vec::new();
                    while let Some(input) = inputs.next().await {
                        firsts.push(first_value(&input.unwrap()));
                    }
                    firsts
                };
                let (unreadable, firsts) = tokio::join!(reads, taking);
                assert!(unreadable.is_empty());
                let want: Vec<i64> = (0..24).map(|i| i * rows as i64).collect();
                assert_eq!(firsts, want);
            })
        });
    }

    #[test]
    fn an_input_that_cannot_be_read_ends_the_stream_and_every_lost_one_is_told() {
        // The second and fourth inputs have no copy anywhere.
        let lost = |id: &str| proto::ObjectLocation {
            object_id: id.to_string(),
            ..Default::default()
        };
        let task = assignment(vec![
            inline_object("a", 0, 10),
            lost("b"),
            inline_object("c", 10, 10),
            lost("d"),
        ]);
        with_link(|link| {
            runtime().block_on(async {
                let (to, ahead, mut inputs) = InputStream::channel();
                let reads = link.stream_inputs(&task, to, &ahead);
                let taking = async {
                    let first = inputs.next().await.unwrap().unwrap();
                    let second = inputs.next().await.unwrap();
                    // A task fails at its first error and drops its inputs.
                    drop(inputs);
                    (first_value(&first), second)
                };
                let (unreadable, (first, second)) = tokio::join!(reads, taking);
                assert_eq!(first, 0);
                let e = second.unwrap_err().to_string();
                assert!(e.contains("cannot read input b"), "{e}");
                let ids: Vec<&str> = unreadable.iter().map(|u| u.input.as_str()).collect();
                assert_eq!(ids, ["b", "d"]);
            })
        });
    }
}
