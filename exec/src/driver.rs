//! The generic driver of an execution: it owns what every operator shares (the
//! queues between them, sequence numbers, the memory budget, CPUs, statistics and
//! cancellation) and gives each [operator](crate::operator) a turn whenever something
//! changed.
//!
//! ```text
//!   ReadOp tasks ──▶ [queue] ──▶ MapOp tasks ──▶ [queue] ──▶ LimitOp ──▶ [queue] ──▶ consumer
//!        ▲                              ▲                                                │
//!        └──────── one scheduling loop dispatches tasks when CPUs, the memory ◀──────────┘
//!                  budget and the downstream queue allow
//! ```
//!
//! One scheduling loop (a thread per execution) steps every operator, downstream first,
//! on every signal (a push, a pop, a task's end) or every 100 ms. Operators start the
//! tasks that fit: the runtime must have the task's CPUs free, the memory budget must
//! have room (or the operator's output queue be empty, or, nothing of the operator
//! running, the ordered consumer wait for its output), and the operator must be under
//! its concurrency. Tasks push their blocks into bounded queues and wait there when the
//! budget is full, so a slow consumer slows the sources instead of growing memory. The
//! consumer pulls from the last queue; dropping it cancels everything under it.
//!
//! Each operator always gets one task running even if its CPUs are held elsewhere (by
//! an actor pool that holds its workers' CPUs for their lifetime): a pipeline whose
//! stages wait on each other must not starve.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use datafusion::execution::context::SessionState;
use datafusion::execution::TaskContext;
use volley_common::{Result, VolleyConfig, VolleyError};
use volley_connectors::DataSource;
use volley_runtime::cluster::Cluster;
use volley_runtime::{MemoryBudget, ResourceRequest, Runtime, TaskSpec};

use crate::operator::{
    ActorPoolOp, ClusterExchangeOp, ClusterMapOp, ClusterPoolOp, ClusterReadOp, ClusterRowsOp,
    LimitOp, MapOp, Operator, ReadOp, StepContext, TaskBody,
};
use crate::plan::{PhysicalPlan, WriteTarget};
use crate::progress::Progress;
use crate::queue::{Block, BlockQueue, RemoteSide, Signal};
use crate::stats::{ExecutionStats, OpCounters};
use crate::step::Step;
use crate::watch::Watch;

/// What an execution needs: options, the runtime that runs its tasks, and the
/// DataFusion session that plans file scans and SQL.
#[derive(Clone)]
pub struct ExecContext {
    /// Options.
    pub config: Arc<VolleyConfig>,
    /// Where tasks run.
    pub runtime: Arc<dyn Runtime>,
    /// DataFusion's session (object stores, SQL functions, file formats).
    pub session: SessionState,
    /// The memory budget every execution of this context draws from (volley's queues
    /// and, through [`BudgetMemoryPool`](crate::BudgetMemoryPool), DataFusion's
    /// operators).
    pub budget: Arc<MemoryBudget>,
    /// The cluster the plan's cluster stages run on, if any.
    pub cluster: Option<Cluster>,
}

impl std::fmt::Debug for ExecContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecContext")
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl ExecContext {
    /// The execution memory limit in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.budget.limit()
    }

    /// Runs a future to completion from synchronous code, also when called from inside
    /// an asynchronous runtime (then on a helper thread).
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let io = self.runtime.io_handle();
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| io.block_on(fut))
                    .join()
                    .expect("planning thread")
            })
        } else {
            io.block_on(fut)
        }
    }
}

/// Everything the tasks of one execution share.
pub(crate) struct ExecShared {
    pub(crate) signal: Arc<Signal>,
    budget: Arc<MemoryBudget>,
    error: Mutex<Option<VolleyError>>,
    queues: Mutex<Vec<Arc<BlockQueue>>>,
    runtime: Arc<dyn Runtime>,
    pub(crate) io: tokio::runtime::Handle,
    pub(crate) task_ctx: Arc<TaskContext>,
    stopped: AtomicBool,
    /// The cluster and the object-store budget of the execution's remote blocks.
    pub(crate) remote: Option<RemoteSide>,
    /// Cluster tasks and calls of the execution running now (all operators).
    pub(crate) remote_running: AtomicUsize,
    watch: std::sync::OnceLock<Arc<Watch>>,
}

impl ExecShared {
    /// Records the first error and cancels everything.
    pub(crate) fn fail(&self, e: VolleyError) {
        {
            let mut slot = self.error.lock().expect("error lock");
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.cancel_all();
    }

    /// Whether an operator writing into `out` is stopping: the execution failed or
    /// was cancelled, or `out`'s consumer stopped reading (a satisfied limit).
    pub(crate) fn stopping(&self, out: &BlockQueue) -> bool {
        out.is_cancelled() || self.stopped.load(Ordering::Acquire)
    }

    /// The error a task of an operator writing into `out` ended with, where it ends
    /// the execution: `None` once the operator is stopping, whatever the error. Its
    /// output is then read by no one (a satisfied limit, a dropped stream), or the
    /// execution has failed already and keeps its first error: a task that was not
    /// needed does not fail a run that has what it asked for. Otherwise a
    /// cancellation no one asked for is an error (see [`unasked_cancel`]).
    pub(crate) fn task_error(&self, out: &BlockQueue, e: VolleyError) -> Option<VolleyError> {
        if self.stopping(out) {
            return None;
        }
        Some(unasked_cancel(e))
    }

    fn cancel_all(&self) {
        self.stopped.store(true, Ordering::Release);
        for q in self.queues.lock().expect("queues lock").iter() {
            q.cancel();
        }
        self.signal.notify();
    }

    fn take_error(&self) -> Option<VolleyError> {
        self.error.lock().expect("error lock").take()
    }

    /// The watch of cluster objects (started on first use; only cluster operators
    /// ask, and they exist only when the execution has a cluster).
    pub(crate) fn watch(&self) -> Arc<Watch> {
        Arc::clone(self.watch.get_or_init(|| {
            let cluster = self
                .remote
                .as_ref()
                .map(|r| r.cluster.clone())
                .expect("cluster operators run with a cluster");
            Watch::start(cluster).expect("a thread for the cluster watch")
        }))
    }

    fn new_queue(&self, ordered: bool, producers: usize) -> Arc<BlockQueue> {
        let q = BlockQueue::with_remote(
            ordered,
            producers,
            Arc::clone(&self.budget),
            Arc::clone(&self.signal),
            self.remote.clone(),
        );
        self.queues
            .lock()
            .expect("queues lock")
            .push(Arc::clone(&q));
        q
    }
}

/// The sequence numbers an operator may use in an ordered queue: `[base, base+span)`;
/// the last one is a sentinel that holds the queue's order until the operator is done.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SeqRange {
    pub base: u64,
    pub span: u64,
}

impl SeqRange {
    fn full() -> SeqRange {
        SeqRange {
            base: 0,
            span: 1 << 62,
        }
    }
    pub(crate) fn sentinel(&self) -> u64 {
        self.base + self.span - 1
    }
    /// `k` ranges in order within this one, below its sentinel: a child's sentinel is
    /// never its parent's (a union finishes its own at once, which would end the last
    /// child's range before that child registered its tasks).
    fn split(&self, k: usize) -> Vec<SeqRange> {
        let span = (self.span - 1) / k.max(1) as u64;
        (0..k as u64)
            .map(|i| SeqRange {
                base: self.base + i * span,
                span,
            })
            .collect()
    }
}

/// An operator as the driver holds it: its logic and what the driver keeps for it.
struct OpSlot {
    name: String,
    op: Box<dyn Operator>,
    /// The source of a read operator (asked for its spill figures at the end).
    source: Option<Arc<dyn DataSource>>,
    counters: Arc<OpCounters>,
    out: Arc<BlockQueue>,
    seqs: SeqRange,
    in_flight: Arc<AtomicUsize>,
    closed: bool,
    inputs: Vec<Arc<BlockQueue>>,
    max_tasks: usize,
    /// Its output is cluster objects (counted against the object-store budget).
    remote: bool,
    /// Its cluster tasks in flight were cancelled (it stopped before they were done).
    cancelled_remote: bool,
}

impl OpSlot {
    /// Whether the memory budget has room for more output (or the output queue is
    /// empty, or its consumer waits for this operator's output while nothing of it
    /// runs: see [`BlockQueue::waiting_on`]). A cluster operator's output goes to the object
    /// stores: it asks [`StepContext::store_room`] for each task or call instead.
    fn has_room(&self, shared: &ExecShared) -> bool {
        self.remote
            || shared.budget.used() < crate::queue::queue_ceiling(&shared.budget)
            || self.out.bytes() == 0
            || (self.in_flight.load(Ordering::Acquire) == 0
                && self.out.waiting_on(self.seqs.base, self.seqs.sentinel()))
    }

    fn close(&mut self) {
        if !self.closed {
            self.out.finish_seq(self.seqs.sentinel());
            self.out.close();
            self.closed = true;
        }
    }

    /// Gives the operator a turn; closes its output when it is done.
    fn step(&mut self, shared: &Arc<ExecShared>) {
        if self.closed {
            return;
        }
        let stopping = self.out.is_cancelled() || shared.stopped.load(Ordering::Acquire);
        if stopping {
            for q in &self.inputs {
                q.cancel();
            }
            // Its cluster tasks still running make what no one will read: stopped,
            // once (they end as cancelled, and the operator closes without waiting).
            if !self.cancelled_remote && self.in_flight.load(Ordering::Acquire) > 0 {
                self.cancelled_remote = true;
                if let Some(w) = shared.watch.get() {
                    w.cancel(crate::operator::op_key(&self.in_flight));
                }
            }
        }
        let mut cx = StepContext {
            shared,
            name: &self.name,
            out: &self.out,
            seqs: self.seqs,
            stopping,
            room: self.has_room(shared),
            max_tasks: self.max_tasks,
            counters: &self.counters,
            in_flight_counter: &self.in_flight,
        };
        let done = self.op.step(&mut cx);
        if done && self.in_flight.load(Ordering::Acquire) == 0 {
            self.close();
        }
    }
}

/// Builds the operators of `plan` (children first) writing into `out`.
///
/// `ordered`: the queues keep input order (the execution preserves order, or an
/// exchange above needs its input in order).
fn build(
    plan: PhysicalPlan,
    out: Arc<BlockQueue>,
    seqs: SeqRange,
    ctx: &ExecContext,
    shared: &ExecShared,
    ops: &mut Vec<OpSlot>,
    ordered: bool,
) -> Result<()> {
    let cpus = ctx.runtime.total().num_cpus.ceil().max(1.0) as usize;
    let max_tasks = ctx.config.exec.max_tasks_per_operator.unwrap_or(cpus);
    let name = plan.name();
    let counters = Arc::new(OpCounters::default());
    out.register(seqs.sentinel());
    let body =
        |steps: Vec<Step>, write: Option<Arc<WriteTarget>>, counters: &Arc<OpCounters>| TaskBody {
            steps,
            write,
            out: Arc::clone(&out),
            counters: Arc::clone(counters),
        };
    let check_fits = |r: &ResourceRequest, what: &str| {
        if !ctx.runtime.could_fit(r) {
            Err(VolleyError::plan(format!(
                "{what} asks for {} CPUs and {} bytes per task, more than this runtime has ({} CPUs, {} bytes)",
                r.num_cpus,
                r.memory,
                ctx.runtime.total().num_cpus,
                ctx.runtime.total().memory
            )))
        } else {
            Ok(())
        }
    };
    let source = match &plan {
        PhysicalPlan::Read(r) => Some(Arc::clone(&r.source)),
        _ => None,
    };
    let remote = matches!(
        plan,
        PhysicalPlan::ClusterRead(_)
            | PhysicalPlan::ClusterMap(_)
            | PhysicalPlan::ClusterActorPool(_)
            | PhysicalPlan::ClusterExchange(_)
            | PhysicalPlan::ClusterRows(_)
    );
    let cluster = || {
        ctx.cluster.clone().ok_or_else(|| {
            VolleyError::internal(format!("{name} is a cluster stage but no cluster is given"))
        })
    };
    // Cluster tasks in flight per operator: twice what the cluster's CPUs run at once.
    let window = |cpus_each: f64| -> usize {
        let total: f64 = ctx
            .cluster
            .as_ref()
            .and_then(|c| c.live_cpus().ok())
            .unwrap_or(1.0);
        ((total / cpus_each.max(0.01)) as usize * 2).max(2)
    };
    let input_in =
        |child: PhysicalPlan, ops: &mut Vec<OpSlot>, ordered: bool| -> Result<Arc<BlockQueue>> {
            let input = shared.new_queue(ordered, producers(&child));
            build(
                child,
                Arc::clone(&input),
                SeqRange::full(),
                ctx,
                shared,
                ops,
                ordered,
            )?;
            Ok(input)
        };
    let input_of = |child: PhysicalPlan, ops: &mut Vec<OpSlot>| -> Result<Arc<BlockQueue>> {
        input_in(child, ops, ordered)
    };
    let (op, inputs): (Box<dyn Operator>, Vec<Arc<BlockQueue>>) = match plan {
        PhysicalPlan::Read(r) => {
            check_fits(&r.resources, &name)?;
            let tasks = ctx
                .block_on(r.source.plan(&ctx.session, &r.request))
                .map_err(|e| e.context(format!("planning {}", r.source.name())))?;
            counters.tasks_total.store(tasks.len(), Ordering::Relaxed);
            let body = body(r.steps, r.write, &counters);
            (
                Box::new(ReadOp::new(tasks, seqs.base, r.resources, body)),
                vec![],
            )
        }
        PhysicalPlan::Map(m) => {
            check_fits(&m.resources, &name)?;
            let input = input_of(*m.input, ops)?;
            let op = MapOp::new(
                Arc::clone(&input),
                m.resources,
                m.concurrency.unwrap_or(max_tasks),
                m.bundle_rows,
                body(m.steps, m.write, &counters),
                seqs.base,
            );
            (Box::new(op), vec![input])
        }
        PhysicalPlan::ActorMap(a) => {
            check_fits(&a.resources, &name)?;
            let input = input_of(*a.input, ops)?;
            counters.tasks_total.store(a.concurrency, Ordering::Relaxed);
            let op = ActorPoolOp::new(
                Arc::clone(&input),
                a.factory,
                a.concurrency,
                a.resources,
                a.batch_size,
                seqs.base,
            );
            (Box::new(op), vec![input])
        }
        PhysicalPlan::Limit(l) => {
            let input = input_of(*l.input, ops)?;
            counters.tasks_total.store(1, Ordering::Relaxed);
            (Box::new(LimitOp::new(Arc::clone(&input), l.n)), vec![input])
        }
        PhysicalPlan::ClusterRead(r) => {
            counters.tasks_total.store(r.tasks.len(), Ordering::Relaxed);
            let op = ClusterReadOp::new(
                cluster()?,
                r.tasks,
                &r.name,
                seqs.base,
                r.resources.clone(),
                r.write,
                window(r.resources.num_cpus),
            );
            (Box::new(op), vec![])
        }
        PhysicalPlan::ClusterMap(m) => {
            let input = input_of(*m.input, ops)?;
            let op = ClusterMapOp::new(
                cluster()?,
                Arc::clone(&input),
                m.task,
                m.resources.clone(),
                m.bundle_rows,
                m.write,
                window(m.resources.num_cpus),
                seqs.base,
            );
            (Box::new(op), vec![input])
        }
        PhysicalPlan::ClusterActorPool(a) => {
            let input = input_of(*a.input, ops)?;
            let op = ClusterPoolOp::new(
                cluster()?,
                Arc::clone(&input),
                a.actor,
                a.resources,
                a.reserve,
                a.size,
                a.max_in_flight,
                a.batch_size,
                a.transform,
                seqs.base,
            );
            (Box::new(op), vec![input])
        }
        PhysicalPlan::ClusterExchange(x) => {
            let in_order = ordered || x.work.needs_input_order();
            let inputs = x
                .inputs
                .into_iter()
                .map(|child| input_in(child, ops, in_order))
                .collect::<Result<Vec<_>>>()?;
            counters
                .tasks_total
                .store(x.work.partitions(), Ordering::Relaxed);
            let op = ClusterExchangeOp::new(
                cluster()?,
                inputs.clone(),
                x.work,
                x.premapped,
                x.write,
                window(1.0),
                seqs.base,
            )?;
            (Box::new(op), inputs)
        }
        PhysicalPlan::ClusterRows(r) => {
            let op = ClusterRowsOp::new(cluster()?, r.rows, window(1.0), seqs.base);
            (Box::new(op), vec![])
        }
        PhysicalPlan::Union(u) => {
            // The children write into the union's output queue, each in its own range
            // of sequence numbers, so that ordered mode keeps input order.
            let ranges = seqs.split(u.inputs.len());
            for (child, range) in u.inputs.into_iter().zip(ranges) {
                build(child, Arc::clone(&out), range, ctx, shared, ops, ordered)?;
            }
            out.finish_seq(seqs.sentinel());
            return Ok(());
        }
    };
    ops.push(OpSlot {
        name,
        op,
        source,
        counters,
        out,
        seqs,
        in_flight: Arc::new(AtomicUsize::new(0)),
        closed: false,
        inputs,
        max_tasks,
        remote,
        cancelled_remote: false,
    });
    Ok(())
}

/// How many operators write into the queue of `plan`'s output.
fn producers(plan: &PhysicalPlan) -> usize {
    match plan {
        PhysicalPlan::Union(u) => u.inputs.iter().map(producers).sum::<usize>().max(1),
        _ => 1,
    }
}

/// `e` with a cancellation made an execution error: a task that ends cancelled while
/// its operator is not stopping (work of a job the head no longer runs, a user
/// function returning the error) would otherwise be taken for one the execution
/// stopped, and its rows would be missing from a result that succeeds.
fn unasked_cancel(e: VolleyError) -> VolleyError {
    if e.is_cancelled() {
        VolleyError::execution(format!("cancelled while its execution was running ({e})"))
    } else {
        e
    }
}

/// Starts a task on the runtime: with its resources when free, or with none when the
/// operator has nothing running (so that no operator starves). The task writes into
/// `out`: a cancellation it ends with is its operator's stop only while that stops.
pub(crate) fn spawn(
    shared: &Arc<ExecShared>,
    out: &Arc<BlockQueue>,
    op_in_flight: &Arc<AtomicUsize>,
    name: String,
    resources: ResourceRequest,
    counters: &Arc<OpCounters>,
    body: impl FnOnce() -> Result<()> + Send + 'static,
) -> bool {
    let in_flight = Arc::clone(op_in_flight);
    let counters = Arc::clone(counters);
    let task_shared = Arc::clone(shared);
    let task_out = Arc::clone(out);
    let task_name = name.clone();
    let task = Box::new(move || {
        let start = cpu_time::ThreadTime::try_now().ok();
        counters.task_started();
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(r) => r,
            Err(panic) => Err(VolleyError::internal(format!(
                "task {task_name} panicked: {}",
                crate::transform::panic_text(panic.as_ref())
            ))),
        };
        if let Err(e) = result {
            if let Some(e) = task_shared.task_error(&task_out, e) {
                task_shared.fail(e);
            }
        }
        counters.task_done(start.map(|s| s.elapsed()).unwrap_or_default());
        in_flight.fetch_sub(1, Ordering::AcqRel);
        task_shared.signal.notify();
    });
    op_in_flight.fetch_add(1, Ordering::AcqRel);
    match shared
        .runtime
        .try_spawn(TaskSpec::new(name.clone(), resources), task)
    {
        Ok(_) => true,
        Err(task) => {
            if op_in_flight.load(Ordering::Acquire) == 1 {
                // Nothing of this operator runs: run it anyway, holding nothing.
                if shared
                    .runtime
                    .try_spawn(TaskSpec::new(name, ResourceRequest::default()), task)
                    .is_ok()
                {
                    return true;
                }
            }
            op_in_flight.fetch_sub(1, Ordering::AcqRel);
            false
        }
    }
}

/// A running execution: an iterator over the output blocks.
///
/// Dropping it before the end cancels the execution and waits for its tasks to stop.
pub struct ExecutionStream {
    out: Arc<BlockQueue>,
    shared: Arc<ExecShared>,
    driver: Option<std::thread::JoinHandle<ExecutionStats>>,
    stats: Option<ExecutionStats>,
    done: bool,
}

impl std::fmt::Debug for ExecutionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutionStream")
            .field("done", &self.done)
            .finish()
    }
}

impl ExecutionStream {
    /// Per-operator statistics; complete once the stream has ended.
    pub fn stats(&mut self) -> Option<&ExecutionStats> {
        self.stats.as_ref()
    }

    fn join(&mut self) {
        if let Some(d) = self.driver.take() {
            if let Ok(stats) = d.join() {
                self.stats = Some(stats);
            }
        }
    }
}

impl ExecutionStream {
    /// The next output block as it is: on a cluster, a [`Block::Remote`] stays in its
    /// node's store (for a consumer in another process that reads it from there).
    pub fn next_block(&mut self) -> Option<Result<Block>> {
        self.next_with(|_, b| Ok(b))
    }

    /// The next block's batches: a remote block's are fetched from its node.
    pub fn resolve(&self, block: Block) -> Result<RecordBatch> {
        self.out.resolve(block)
    }

    fn next_with<T>(
        &mut self,
        take: impl FnOnce(&BlockQueue, Block) -> Result<T>,
    ) -> Option<Result<T>> {
        if self.done {
            return None;
        }
        match self
            .out
            .pop_block()
            .and_then(|b| b.map(|b| take(&self.out, b)).transpose())
        {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => {
                self.done = true;
                self.join();
                self.shared.take_error().map(Err)
            }
            Err(e) => {
                self.done = true;
                self.shared.cancel_all();
                self.join();
                Some(Err(self.shared.take_error().unwrap_or(e)))
            }
        }
    }
}

impl Iterator for ExecutionStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_with(BlockQueue::resolve)
    }
}

impl Drop for ExecutionStream {
    fn drop(&mut self) {
        if !self.done {
            self.shared.cancel_all();
        }
        self.join();
    }
}

/// Starts executing `plan`; blocks flow as the returned stream is consumed.
pub fn execute(plan: PhysicalPlan, ctx: &ExecContext) -> Result<ExecutionStream> {
    let limit = ctx.memory_limit();
    let shared = Arc::new(ExecShared {
        signal: Arc::new(Signal::default()),
        budget: Arc::clone(&ctx.budget),
        error: Mutex::new(None),
        queues: Mutex::new(Vec::new()),
        runtime: Arc::clone(&ctx.runtime),
        io: ctx.runtime.io_handle(),
        task_ctx: Arc::new(TaskContext::from(&ctx.session)),
        stopped: AtomicBool::new(false),
        remote: match &ctx.cluster {
            Some(cluster) => Some(RemoteSide {
                cluster: cluster.clone(),
                budget: Arc::new(crate::store_budget::StoreBudget::new(
                    cluster,
                    ctx.config.exec.object_store_limit,
                )?),
            }),
            None => None,
        },
        watch: std::sync::OnceLock::new(),
        remote_running: AtomicUsize::new(0),
    });
    let out = shared.new_queue(ctx.config.exec.preserve_order, producers(&plan));
    let mut ops = Vec::new();
    build(
        plan,
        Arc::clone(&out),
        SeqRange::full(),
        ctx,
        &shared,
        &mut ops,
        ctx.config.exec.preserve_order,
    )?;
    let names: Vec<String> = ops.iter().map(|o| o.name.clone()).collect();
    let progress = Progress::new(ctx.config.exec.progress, &names);
    let driver_shared = Arc::clone(&shared);
    let driver = std::thread::Builder::new()
        .name("volley-scheduler".into())
        .spawn(move || drive(ops, driver_shared, progress, limit))
        .map_err(|e| VolleyError::internal(format!("cannot start the scheduler thread: {e}")))?;
    Ok(ExecutionStream {
        out,
        shared,
        driver: Some(driver),
        stats: None,
        done: false,
    })
}

/// The scheduling loop.
fn drive(
    mut ops: Vec<OpSlot>,
    shared: Arc<ExecShared>,
    progress: Progress,
    limit: u64,
) -> ExecutionStats {
    let start = Instant::now();
    // The budget is the context's (shared with other executions and DataFusion's
    // operators): this execution's peak is sampled at every scheduling step.
    let mut peak = shared.budget.used();
    let mut reporter = shared
        .remote
        .as_ref()
        .map(|r| ProgressReporter::new(&r.cluster));
    loop {
        let generation = shared.signal.generation();
        peak = peak.max(shared.budget.used());
        for op in ops.iter_mut().rev() {
            op.step(&shared);
        }
        for (i, op) in ops.iter().enumerate() {
            progress.update(
                i,
                op.counters.tasks_done.load(Ordering::Relaxed),
                op.counters.tasks_total.load(Ordering::Relaxed),
                op.counters.rows_out.load(Ordering::Relaxed),
            );
        }
        if ops.iter().all(|o| o.closed) {
            break;
        }
        if let Some(r) = &mut reporter {
            r.maybe_report(&ops, false);
        }
        shared
            .signal
            .wait_since(generation, Duration::from_millis(100));
    }
    if let Some(r) = &mut reporter {
        r.maybe_report(&ops, true);
    }
    let stats = ExecutionStats {
        operators: ops
            .iter()
            .map(|o| {
                let spilled = o.source.as_ref().map_or(0, |s| s.spilled_bytes());
                o.counters.snapshot(&o.name, o.out.peak_bytes(), spilled)
            })
            .collect(),
        wall: start.elapsed(),
        peak_memory: peak.max(shared.budget.used()),
        memory_limit: limit,
        object_store: shared
            .remote
            .as_ref()
            .map(|r| (r.budget.peak(), r.budget.limit())),
    };
    progress.finish(&stats);
    if let Some(w) = shared.watch.get() {
        w.stop();
    }
    stats
}

/// Tells the cluster's head how a cluster execution is going, about once a second and
/// at its end (its `/metrics` and `volley job status` show it).
struct ProgressReporter {
    cluster: volley_runtime::cluster::Cluster,
    id: String,
    started_ms: u64,
    last: Option<Instant>,
}

impl ProgressReporter {
    fn new(cluster: &volley_runtime::cluster::Cluster) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            cluster: cluster.clone(),
            id: format!(
                "execution-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            started_ms,
            last: None,
        }
    }

    fn maybe_report(&mut self, ops: &[OpSlot], finished: bool) {
        if !finished
            && self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(Instant::now());
        let operators: Vec<volley_runtime::cluster::OperatorProgress> = ops
            .iter()
            .map(|o| {
                let c = &o.counters;
                let done = c.tasks_done.load(Ordering::Relaxed) as u64;
                volley_runtime::cluster::OperatorProgress {
                    name: o.name.clone(),
                    tasks_done: done,
                    tasks_running: (c.tasks_started.load(Ordering::Relaxed) as u64)
                        .saturating_sub(done),
                    tasks_total: c.tasks_total.load(Ordering::Relaxed) as u64,
                    rows: c.rows_out.load(Ordering::Relaxed),
                    bytes: c.bytes_out.load(Ordering::Relaxed),
                    queued_bytes: o.out.bytes(),
                    spilled_bytes: o.source.as_ref().map_or(0, |s| s.spilled_bytes()),
                }
            })
            .collect();
        self.cluster
            .report_execution(&self.id, self.started_ms, &operators, finished);
    }
}

#[cfg(test)]
mod tests {
    //! The driver's contracts, on real operators and a real thread-per-task runtime:
    //! ordered output, no starvation, cancellation that stops every task, the first
    //! error ends the execution.

    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    use arrow::array::{ArrayRef, Int64Array, RecordBatch};
    use datafusion::execution::session_state::SessionStateBuilder;
    use volley_common::VolleyConfig;
    use volley_runtime::{LocalRuntime, MemoryBudget, ResourceRequest};

    use super::*;
    use crate::plan::{ActorMapExec, LimitExec, MapExec, ReadExec, UnionExec};
    use crate::{MemorySource, RangeSource, StatefulTransform, TransformFactory, TransformFn};

    fn context(cpus: f64, ordered: bool) -> ExecContext {
        let mut config = VolleyConfig::default();
        config.set("volley.exec.progress", "off").unwrap();
        config
            .set("volley.exec.preserve_order", &ordered.to_string())
            .unwrap();
        config.runtime.num_cpus = Some(cpus);
        let runtime: Arc<dyn Runtime> = LocalRuntime::try_new(&config.runtime).unwrap();
        ExecContext {
            config: Arc::new(config),
            runtime,
            session: SessionStateBuilder::new().build(),
            budget: MemoryBudget::new(256 << 20),
            cluster: None,
        }
    }

    /// Blocks of `rows` rows each, numbered from 0 in column `id`.
    fn numbered(blocks: usize, rows: i64) -> Vec<RecordBatch> {
        (0..blocks as i64)
            .map(|b| {
                let ids = Int64Array::from_iter_values(b * rows..(b + 1) * rows);
                RecordBatch::try_from_iter([("id", Arc::new(ids) as ArrayRef)]).unwrap()
            })
            .collect()
    }

    fn read(batches: Vec<RecordBatch>) -> PhysicalPlan {
        PhysicalPlan::Read(ReadExec {
            source: Arc::new(MemorySource::try_new(batches).unwrap()),
            request: Default::default(),
            steps: vec![],
            resources: ResourceRequest::cpus(1.0),
            write: None,
        })
    }

    fn map(input: PhysicalPlan, f: TransformFn, concurrency: usize) -> PhysicalPlan {
        PhysicalPlan::Map(MapExec {
            input: Box::new(input),
            steps: vec![Step::Map {
                f,
                batch_size: None,
            }],
            resources: ResourceRequest::cpus(1.0),
            concurrency: Some(concurrency),
            bundle_rows: 1,
            write: None,
        })
    }

    fn ids(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    /// Runs `plan` on a thread, failing the test if it does not end in `secs`.
    fn run_within(
        plan: PhysicalPlan,
        ctx: ExecContext,
        secs: u64,
    ) -> (Result<Vec<RecordBatch>>, Option<ExecutionStats>) {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = execute(plan, &ctx).map(|mut s| {
                let out: Result<Vec<RecordBatch>> = s.by_ref().collect();
                (out, s.stats().cloned())
            });
            let _ = tx.send(result);
        });
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(Ok((out, stats))) => (out, stats),
            Ok(Err(e)) => (Err(e), None),
            Err(_) => panic!("the execution did not end within {secs} s"),
        }
    }

    #[test]
    fn ordered_mode_keeps_input_order_whatever_the_tasks_take() {
        // Later blocks finish first: block k sleeps (20 - k) ms.
        let slow = TransformFn::local("slow", |b: RecordBatch| {
            let first = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0);
            std::thread::sleep(Duration::from_millis((20 - (first / 10).min(20)) as u64));
            Ok(b)
        });
        let plan = map(read(numbered(20, 10)), slow, 4);
        let (out, stats) = run_within(plan, context(4.0, true), 60);
        assert_eq!(ids(&out.unwrap()), (0..200).collect::<Vec<_>>());
        let stats = stats.unwrap();
        assert_eq!(stats.operators.len(), 2, "{stats}");
        assert!(stats.operators.iter().all(|o| o.rows_out == 200), "{stats}");
    }

    #[test]
    fn a_union_in_ordered_mode_gives_its_inputs_in_order() {
        let plan = PhysicalPlan::Union(UnionExec {
            inputs: vec![read(numbered(3, 5)), read(numbered(2, 5))],
        });
        let (out, _) = run_within(plan, context(2.0, true), 30);
        let got = ids(&out.unwrap());
        let want: Vec<i64> = (0..15).chain(0..10).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_actor_pool_holding_every_cpu_does_not_starve_its_reads() {
        struct Double;
        impl StatefulTransform for Double {
            fn transform(&mut self, b: RecordBatch) -> Result<RecordBatch> {
                Ok(b)
            }
        }
        // Two workers of one CPU each on a 2-CPU runtime: their CPUs are held for
        // their lifetime, and the reads that feed them must still run.
        let plan = PhysicalPlan::ActorMap(ActorMapExec {
            input: Box::new(read(numbered(50, 100))),
            factory: TransformFactory::local("double", || Ok(Double)),
            concurrency: 2,
            resources: ResourceRequest::cpus(1.0),
            batch_size: None,
        });
        let (out, _) = run_within(plan, context(2.0, false), 60);
        assert_eq!(ids(&out.unwrap()).len(), 5000);
    }

    #[test]
    fn a_limit_stops_the_reads_upstream() {
        // 1,000 read tasks of 1,000 rows; a limit of 10 rows must not read them all.
        let calls = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&calls);
        let count = TransformFn::local("count", move |b: RecordBatch| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            Ok(b)
        });
        let plan = PhysicalPlan::Limit(LimitExec {
            input: Box::new(map(
                PhysicalPlan::Read(ReadExec {
                    source: Arc::new(RangeSource::new(1_000_000, 1000, 1000)),
                    request: Default::default(),
                    steps: vec![],
                    resources: ResourceRequest::cpus(1.0),
                    write: None,
                }),
                count,
                2,
            )),
            n: 10,
        });
        let (out, _) = run_within(plan, context(2.0, false), 60);
        assert_eq!(ids(&out.unwrap()).len(), 10);
        let read = calls.load(Ordering::SeqCst);
        assert!(
            read < 100,
            "{read} of 1000 blocks were mapped after the limit"
        );
    }

    #[test]
    fn an_actor_pool_cuts_whole_batches_across_blocks() {
        struct Sizes(Arc<Mutex<Vec<usize>>>);
        impl StatefulTransform for Sizes {
            fn transform(&mut self, b: RecordBatch) -> Result<RecordBatch> {
                self.0.lock().unwrap().push(b.num_rows());
                Ok(b)
            }
        }
        for ordered in [true, false] {
            let seen = Arc::new(Mutex::new(vec![]));
            let sizes = Arc::clone(&seen);
            // Blocks of 3 rows, batches of 4: 30 rows make seven of 4 and one of 2.
            let plan = PhysicalPlan::ActorMap(ActorMapExec {
                input: Box::new(read(numbered(10, 3))),
                factory: TransformFactory::local("sizes", move || Ok(Sizes(Arc::clone(&sizes)))),
                concurrency: 2,
                resources: ResourceRequest::cpus(1.0),
                batch_size: Some(4),
            });
            let (out, _) = run_within(plan, context(4.0, ordered), 60);
            let mut got = ids(&out.unwrap());
            if !ordered {
                got.sort();
            }
            assert_eq!(got, (0..30).collect::<Vec<_>>());
            let mut sizes = seen.lock().unwrap().clone();
            sizes.sort();
            assert_eq!(sizes, [2, 4, 4, 4, 4, 4, 4, 4], "ordered {ordered}");
        }
    }

    #[test]
    fn a_satisfied_limit_ignores_errors_of_tasks_it_did_not_need() {
        for ordered in [true, false] {
            // The first block passes at once; the others fail once the limit has its
            // rows.
            let late = TransformFn::local("late", |b: RecordBatch| {
                if ids(std::slice::from_ref(&b))[0] == 0 {
                    return Ok(b);
                }
                std::thread::sleep(Duration::from_millis(300));
                Err(VolleyError::execution("bad block"))
            });
            let plan = PhysicalPlan::Limit(LimitExec {
                input: Box::new(map(read(numbered(4, 10)), late, 2)),
                n: 10,
            });
            let (out, _) = run_within(plan, context(2.0, ordered), 30);
            let out = out.unwrap_or_else(|e| panic!("ordered {ordered}: {e}"));
            assert_eq!(ids(&out), (0..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn dropping_the_stream_stops_every_task() {
        let running = Arc::new(AtomicU64::new(0));
        let live = Arc::clone(&running);
        let slow = TransformFn::local("slow", move |b: RecordBatch| {
            live.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
            live.fetch_sub(1, Ordering::SeqCst);
            Ok(b)
        });
        let plan = map(read(numbered(500, 10)), slow, 2);
        let ctx = context(2.0, false);
        let mut stream = execute(plan, &ctx).unwrap();
        assert!(stream.next().unwrap().is_ok());
        let start = Instant::now();
        drop(stream);
        // Dropping waits for the tasks to stop.
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(running.load(Ordering::SeqCst), 0, "a task still runs");
    }

    #[test]
    fn the_first_error_ends_the_execution_and_is_what_the_consumer_sees() {
        let fails = TransformFn::local("fails", |b: RecordBatch| {
            let first = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0);
            if first == 70 {
                Err(VolleyError::execution("row 70 is cursed"))
            } else {
                std::thread::sleep(Duration::from_millis(5));
                Ok(b)
            }
        });
        let plan = map(read(numbered(200, 10)), fails, 2);
        let (out, _) = run_within(plan, context(2.0, false), 60);
        let e = out.unwrap_err().to_string();
        assert!(e.contains("row 70 is cursed"), "{e}");
    }
}
