//! The streaming executor.
//!
//! ```text
//!   ReadExec tasks ──▶ [queue] ──▶ MapExec tasks ──▶ [queue] ──▶ Limit ──▶ [queue] ──▶ consumer
//!        ▲                              ▲                                                │
//!        └──────── one scheduling loop dispatches tasks when CPUs, the memory ◀──────────┘
//!                  budget and the downstream queue allow
//! ```
//!
//! One scheduling loop (a thread per execution) looks at every operator, downstream
//! first, and starts the tasks that fit: the runtime must have the task's CPUs free, the
//! memory budget must have room (or the operator's output queue be empty), and the
//! operator must be under its concurrency. Tasks push their blocks into bounded queues
//! and wait there when the budget is full, so a slow consumer slows the sources instead
//! of growing memory. The consumer pulls from the last queue; dropping it cancels
//! everything under it.
//!
//! Each operator always gets one task running even if its CPUs are held elsewhere (by
//! an actor pool that holds its workers' CPUs for their lifetime): a pipeline whose
//! stages wait on each other must not starve.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use datafusion::execution::context::SessionState;
use datafusion::execution::TaskContext;
use futures::StreamExt;
use volley_common::{Result, VolleyConfig, VolleyError};
use volley_connectors::{DataSource, PartWriter, ReadTask};
use volley_runtime::{MemoryBudget, ResourceRequest, Runtime, TaskSpec};

use crate::plan::{PhysicalPlan, WriteTarget};
use crate::progress::Progress;
use crate::queue::{BlockQueue, Popped, Signal};
use crate::stats::{ExecutionStats, OpCounters};
use crate::step::{Step, StepRunner};
use crate::transform::{guard, TransformFactory};

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
struct Shared {
    signal: Arc<Signal>,
    budget: Arc<MemoryBudget>,
    error: Mutex<Option<VolleyError>>,
    queues: Mutex<Vec<Arc<BlockQueue>>>,
    runtime: Arc<dyn Runtime>,
    io: tokio::runtime::Handle,
    task_ctx: Arc<TaskContext>,
    stopped: AtomicBool,
}

impl Shared {
    /// Records the first error and cancels everything.
    fn fail(&self, e: VolleyError) {
        {
            let mut slot = self.error.lock().expect("error lock");
            if slot.is_none() {
                *slot = Some(e);
            }
        }
        self.cancel_all();
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

    fn new_queue(&self, ordered: bool, producers: usize) -> Arc<BlockQueue> {
        let q = BlockQueue::new(
            ordered,
            producers,
            Arc::clone(&self.budget),
            Arc::clone(&self.signal),
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
#[derive(Clone, Copy)]
struct SeqRange {
    base: u64,
    span: u64,
}

impl SeqRange {
    fn sentinel(&self) -> u64 {
        self.base + self.span - 1
    }
    fn split(&self, k: usize) -> Vec<SeqRange> {
        let span = self.span / k.max(1) as u64;
        (0..k as u64)
            .map(|i| SeqRange {
                base: self.base + i * span,
                span,
            })
            .collect()
    }
}

/// Work shared by the tasks of a task-based operator.
#[derive(Clone)]
struct TaskBody {
    steps: Vec<Step>,
    write: Option<Arc<WriteTarget>>,
    out: Arc<BlockQueue>,
    counters: Arc<OpCounters>,
}

impl TaskBody {
    fn writer(&self) -> Result<Option<PartWriter>> {
        match &self.write {
            None => Ok(None),
            Some(w) => {
                let part = w.next_part.fetch_add(1, Ordering::Relaxed);
                let job = w.job.lock().expect("write lock");
                match job.as_ref() {
                    Some(job) => Ok(Some(job.part_writer(part)?)),
                    None => Err(VolleyError::Cancelled),
                }
            }
        }
    }

    fn emit(
        &self,
        seq: u64,
        batches: &mut Vec<RecordBatch>,
        writer: &mut Option<PartWriter>,
    ) -> Result<()> {
        for b in batches.drain(..) {
            self.counters
                .output(b.num_rows(), b.get_array_memory_size());
            match writer {
                Some(w) => w.write(&b)?,
                None => self.out.push(seq, b)?,
            }
        }
        Ok(())
    }

    fn finish(&self, writer: Option<PartWriter>) -> Result<()> {
        if let (Some(w), Some(target)) = (writer, &self.write) {
            let staged = w.finish()?;
            target.parts.lock().expect("write lock").push(staged);
        }
        Ok(())
    }

    /// Reads one read task through the steps.
    fn run_read(&self, shared: &Shared, task: &ReadTask, seq: u64) -> Result<()> {
        // Opening may start DataFusion's own tasks (repartition, joins): on the I/O runtime.
        let mut stream = {
            let _runtime = shared.io.enter();
            task.open(Arc::clone(&shared.task_ctx))?
        };
        let mut runner = StepRunner::new(self.steps.clone());
        let mut writer = self.writer()?;
        let mut out = Vec::new();
        loop {
            if self.out.is_cancelled() {
                return Err(VolleyError::Cancelled);
            }
            let next = shared.io.block_on(stream.next());
            match next {
                None => break,
                Some(Err(e)) => {
                    return Err(VolleyError::from(e).context(format!("reading {}", task.label)))
                }
                Some(Ok(batch)) => {
                    runner.push(batch, &mut out)?;
                    self.emit(seq, &mut out, &mut writer)?;
                }
            }
        }
        runner.finish(&mut out)?;
        self.emit(seq, &mut out, &mut writer)?;
        self.finish(writer)
    }

    /// Runs a bundle of blocks through the steps.
    fn run_bundle(&self, bundle: Vec<RecordBatch>, seq: u64) -> Result<()> {
        let mut runner = StepRunner::new(self.steps.clone());
        let mut writer = self.writer()?;
        let mut out = Vec::new();
        for b in bundle {
            runner.push(b, &mut out)?;
            self.emit(seq, &mut out, &mut writer)?;
        }
        runner.finish(&mut out)?;
        self.emit(seq, &mut out, &mut writer)?;
        self.finish(writer)
    }
}

enum Kind {
    Read {
        pending: VecDeque<(u64, ReadTask)>,
        resources: ResourceRequest,
        body: TaskBody,
    },
    Map {
        input: Arc<BlockQueue>,
        resources: ResourceRequest,
        concurrency: usize,
        bundle_rows: usize,
        body: TaskBody,
        next_seq: u64,
        input_done: bool,
        bundle: Vec<RecordBatch>,
        bundle_len: usize,
    },
    ActorMap {
        input: Arc<BlockQueue>,
        factory: TransformFactory,
        concurrency: usize,
        resources: ResourceRequest,
        batch_size: Option<usize>,
        spawned: usize,
        next_seq: Arc<Mutex<u64>>,
    },
    Limit {
        input: Arc<BlockQueue>,
        n: usize,
        spawned: bool,
    },
}

struct Op {
    name: String,
    /// The source of a read operator (asked for its spill figures at the end).
    source: Option<Arc<dyn DataSource>>,
    counters: Arc<OpCounters>,
    out: Arc<BlockQueue>,
    seqs: SeqRange,
    in_flight: Arc<AtomicUsize>,
    closed: bool,
    inputs: Vec<Arc<BlockQueue>>,
    max_tasks: usize,
    kind: Kind,
}

/// Builds the operators of `plan` (children first) writing into `out`.
fn build(
    plan: PhysicalPlan,
    out: Arc<BlockQueue>,
    seqs: SeqRange,
    ctx: &ExecContext,
    shared: &Shared,
    ops: &mut Vec<Op>,
) -> Result<()> {
    let ordered = ctx.config.exec.preserve_order;
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
    let (kind, inputs) = match plan {
        PhysicalPlan::Read(r) => {
            check_fits(&r.resources, &name)?;
            let tasks = ctx
                .block_on(r.source.plan(&ctx.session, &r.request))
                .map_err(|e| e.context(format!("planning {}", r.source.name())))?;
            counters.tasks_total.store(tasks.len(), Ordering::Relaxed);
            let pending = tasks
                .into_iter()
                .enumerate()
                .map(|(i, t)| (seqs.base + i as u64, t))
                .collect();
            (
                Kind::Read {
                    pending,
                    resources: r.resources,
                    body: body(r.steps, r.write, &counters),
                },
                vec![],
            )
        }
        PhysicalPlan::Map(m) => {
            check_fits(&m.resources, &name)?;
            let input = shared.new_queue(ordered, producers(&m.input));
            build(*m.input, Arc::clone(&input), full_range(), ctx, shared, ops)?;
            (
                Kind::Map {
                    input: Arc::clone(&input),
                    resources: m.resources,
                    concurrency: m.concurrency.unwrap_or(max_tasks).max(1),
                    bundle_rows: m.bundle_rows.max(1),
                    body: body(m.steps, m.write, &counters),
                    next_seq: seqs.base,
                    input_done: false,
                    bundle: Vec::new(),
                    bundle_len: 0,
                },
                vec![input],
            )
        }
        PhysicalPlan::ActorMap(a) => {
            check_fits(&a.resources, &name)?;
            let input = shared.new_queue(ordered, producers(&a.input));
            build(*a.input, Arc::clone(&input), full_range(), ctx, shared, ops)?;
            counters.tasks_total.store(a.concurrency, Ordering::Relaxed);
            (
                Kind::ActorMap {
                    input: Arc::clone(&input),
                    factory: a.factory,
                    concurrency: a.concurrency.max(1),
                    resources: a.resources,
                    batch_size: a.batch_size,
                    spawned: 0,
                    next_seq: Arc::new(Mutex::new(seqs.base)),
                },
                vec![input],
            )
        }
        PhysicalPlan::Limit(l) => {
            let input = shared.new_queue(ordered, producers(&l.input));
            build(*l.input, Arc::clone(&input), full_range(), ctx, shared, ops)?;
            counters.tasks_total.store(1, Ordering::Relaxed);
            (
                Kind::Limit {
                    input: Arc::clone(&input),
                    n: l.n,
                    spawned: false,
                },
                vec![input],
            )
        }
        PhysicalPlan::Union(u) => {
            // The children write into the union's output queue, each in its own range
            // of sequence numbers, so that ordered mode keeps input order.
            let ranges = seqs.split(u.inputs.len());
            for (child, range) in u.inputs.into_iter().zip(ranges) {
                build(child, Arc::clone(&out), range, ctx, shared, ops)?;
            }
            out.finish_seq(seqs.sentinel());
            return Ok(());
        }
    };
    ops.push(Op {
        name,
        source,
        counters,
        out,
        seqs,
        in_flight: Arc::new(AtomicUsize::new(0)),
        closed: false,
        inputs,
        max_tasks,
        kind,
    });
    Ok(())
}

fn full_range() -> SeqRange {
    SeqRange {
        base: 0,
        span: 1 << 62,
    }
}

/// How many operators write into the queue of `plan`'s output.
fn producers(plan: &PhysicalPlan) -> usize {
    match plan {
        PhysicalPlan::Union(u) => u.inputs.iter().map(producers).sum::<usize>().max(1),
        _ => 1,
    }
}

/// Starts a task on the runtime: with its resources when free, or with none when the
/// operator has nothing running (so that no operator starves).
fn spawn(
    shared: &Arc<Shared>,
    op_in_flight: &Arc<AtomicUsize>,
    name: String,
    resources: ResourceRequest,
    counters: &Arc<OpCounters>,
    body: impl FnOnce() -> Result<()> + Send + 'static,
) -> bool {
    let in_flight = Arc::clone(op_in_flight);
    let counters = Arc::clone(counters);
    let task_shared = Arc::clone(shared);
    let task = Box::new(move || {
        let start = cpu_time::ThreadTime::try_now().ok();
        counters.task_started();
        let result = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
            Ok(r) => r,
            Err(_) => Err(VolleyError::internal("a task panicked")),
        };
        if let Err(e) = result {
            if !e.is_cancelled() {
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

impl Op {
    fn has_room(&self, shared: &Shared) -> bool {
        shared.budget.used() < crate::queue::queue_ceiling(&shared.budget) || self.out.bytes() == 0
    }

    fn close(&mut self) {
        if !self.closed {
            self.out.finish_seq(self.seqs.sentinel());
            self.out.close();
            self.closed = true;
        }
    }

    /// Starts what can start; closes the output when all is done.
    fn step(&mut self, shared: &Arc<Shared>) {
        if self.closed {
            return;
        }
        let stopping = self.out.is_cancelled() || shared.stopped.load(Ordering::Acquire);
        if stopping {
            for q in &self.inputs {
                q.cancel();
            }
        }
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let room = self.has_room(shared);
        let name = self.name.clone();
        match &mut self.kind {
            Kind::Read {
                pending,
                resources,
                body,
            } => {
                if stopping {
                    pending.clear();
                }
                let mut running = in_flight;
                while room && running < self.max_tasks {
                    let Some((seq, task)) = pending.pop_front() else {
                        break;
                    };
                    self.out.register(seq);
                    let b = body.clone();
                    let s = Arc::clone(shared);
                    let t = task.clone();
                    let ok = spawn(
                        shared,
                        &self.in_flight,
                        name.clone(),
                        *resources,
                        &self.counters,
                        move || {
                            let r = b.run_read(&s, &t, seq);
                            b.out.finish_seq(seq);
                            r
                        },
                    );
                    if !ok {
                        pending.push_front((seq, task));
                        break;
                    }
                    running += 1;
                }
                if pending.is_empty() && self.in_flight.load(Ordering::Acquire) == 0 {
                    self.close();
                }
            }
            Kind::Map {
                input,
                resources,
                concurrency,
                bundle_rows,
                body,
                next_seq,
                input_done,
                bundle,
                bundle_len,
            } => {
                if stopping {
                    *input_done = true;
                    bundle.clear();
                    *bundle_len = 0;
                }
                let mut running = in_flight;
                while !stopping && room && running < (*concurrency).min(self.max_tasks) {
                    while *bundle_len < *bundle_rows && !*input_done {
                        match input.try_pop() {
                            Ok(Popped::Batch(b)) => {
                                *bundle_len += b.num_rows();
                                bundle.push(b);
                            }
                            Ok(Popped::Empty) => break,
                            Ok(Popped::Done) => *input_done = true,
                            Err(_) => *input_done = true,
                        }
                    }
                    if bundle.is_empty() || (*bundle_len < *bundle_rows && !*input_done) {
                        break;
                    }
                    let work = std::mem::take(bundle);
                    *bundle_len = 0;
                    let seq = *next_seq;
                    *next_seq += 1;
                    self.out.register(seq);
                    self.counters.tasks_total.fetch_add(1, Ordering::Relaxed);
                    let b = body.clone();
                    let held = work.clone();
                    let ok = spawn(
                        shared,
                        &self.in_flight,
                        name.clone(),
                        *resources,
                        &self.counters,
                        move || {
                            let r = b.run_bundle(work, seq);
                            b.out.finish_seq(seq);
                            r
                        },
                    );
                    if !ok {
                        // Put the bundle back; the sequence stays registered and is
                        // used by the next try.
                        *next_seq -= 1;
                        self.counters.tasks_total.fetch_sub(1, Ordering::Relaxed);
                        *bundle_len = held.iter().map(|b| b.num_rows()).sum();
                        *bundle = held;
                        break;
                    }
                    running += 1;
                }
                if *input_done && bundle.is_empty() && self.in_flight.load(Ordering::Acquire) == 0 {
                    self.close();
                }
            }
            Kind::ActorMap {
                input,
                factory,
                concurrency,
                resources,
                batch_size,
                spawned,
                next_seq,
            } => {
                while !stopping && *spawned < *concurrency {
                    let worker = ActorWorker {
                        input: Arc::clone(input),
                        out: Arc::clone(&self.out),
                        factory: factory.clone(),
                        batch_size: *batch_size,
                        next_seq: Arc::clone(next_seq),
                        counters: Arc::clone(&self.counters),
                    };
                    let ok = spawn(
                        shared,
                        &self.in_flight,
                        format!("{name}#{spawned}"),
                        *resources,
                        &self.counters,
                        move || worker.run(),
                    );
                    if !ok {
                        break;
                    }
                    *spawned += 1;
                }
                if (*spawned > 0 || stopping) && self.in_flight.load(Ordering::Acquire) == 0 {
                    self.close();
                }
            }
            Kind::Limit { input, n, spawned } => {
                if !*spawned && !stopping {
                    let (input, out, n, counters) = (
                        Arc::clone(input),
                        Arc::clone(&self.out),
                        *n,
                        Arc::clone(&self.counters),
                    );
                    let seq = self.seqs.base;
                    self.out.register(seq);
                    *spawned = spawn(
                        shared,
                        &self.in_flight,
                        name,
                        ResourceRequest::default(),
                        &self.counters,
                        move || {
                            let r = run_limit(&input, &out, n, seq, &counters);
                            out.finish_seq(seq);
                            r
                        },
                    );
                }
                if (*spawned || stopping) && self.in_flight.load(Ordering::Acquire) == 0 {
                    self.close();
                }
            }
        }
    }
}

fn run_limit(
    input: &BlockQueue,
    out: &BlockQueue,
    n: usize,
    seq: u64,
    counters: &OpCounters,
) -> Result<()> {
    let mut left = n;
    while left > 0 {
        match input.pop()? {
            Some(b) => {
                let take = left.min(b.num_rows());
                let b = if take < b.num_rows() {
                    b.slice(0, take)
                } else {
                    b
                };
                left -= take;
                counters.output(b.num_rows(), b.get_array_memory_size());
                out.push(seq, b)?;
            }
            None => break,
        }
    }
    // Enough: everything upstream stops.
    input.cancel();
    Ok(())
}

/// One worker of an actor pool: builds its transform once, then takes bundles until
/// the input ends.
struct ActorWorker {
    input: Arc<BlockQueue>,
    out: Arc<BlockQueue>,
    factory: TransformFactory,
    batch_size: Option<usize>,
    next_seq: Arc<Mutex<u64>>,
    counters: Arc<OpCounters>,
}

impl ActorWorker {
    fn run(self) -> Result<()> {
        let mut transform = self.factory.build()?;
        let name = self.factory.name();
        let want = self.batch_size.unwrap_or(1).max(1);
        loop {
            // Taking input and numbering it happen together, so that ordered mode
            // sees bundles in input order.
            let (bundle, seq) = {
                let mut next = self.next_seq.lock().expect("actor lock");
                let mut bundle = Vec::new();
                let mut rows = 0;
                while rows < want {
                    match self.input.pop()? {
                        Some(b) => {
                            rows += b.num_rows();
                            bundle.push(b);
                        }
                        None => break,
                    }
                }
                if bundle.is_empty() {
                    return Ok(());
                }
                let seq = *next;
                *next += 1;
                self.out.register(seq);
                (bundle, seq)
            };
            let result = (|| {
                let all = if bundle.len() == 1 {
                    bundle.into_iter().next().expect("one")
                } else {
                    concat_batches(&bundle[0].schema(), &bundle)?
                };
                let chunk = self.batch_size.unwrap_or(all.num_rows().max(1));
                let mut offset = 0;
                while offset < all.num_rows() {
                    let len = chunk.min(all.num_rows() - offset);
                    let out = guard(&name, || transform.transform(all.slice(offset, len)))?;
                    offset += len;
                    if out.num_rows() > 0 {
                        self.counters
                            .output(out.num_rows(), out.get_array_memory_size());
                        self.out.push(seq, out)?;
                    }
                }
                Ok::<_, VolleyError>(())
            })();
            self.out.finish_seq(seq);
            result?;
        }
    }
}

/// A running execution: an iterator over the output blocks.
///
/// Dropping it before the end cancels the execution and waits for its tasks to stop.
pub struct ExecutionStream {
    out: Arc<BlockQueue>,
    shared: Arc<Shared>,
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

impl Iterator for ExecutionStream {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.out.pop() {
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
    let shared = Arc::new(Shared {
        signal: Arc::new(Signal::default()),
        budget: Arc::clone(&ctx.budget),
        error: Mutex::new(None),
        queues: Mutex::new(Vec::new()),
        runtime: Arc::clone(&ctx.runtime),
        io: ctx.runtime.io_handle(),
        task_ctx: Arc::new(TaskContext::from(&ctx.session)),
        stopped: AtomicBool::new(false),
    });
    let out = shared.new_queue(ctx.config.exec.preserve_order, producers(&plan));
    let mut ops = Vec::new();
    build(plan, Arc::clone(&out), full_range(), ctx, &shared, &mut ops)?;
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
fn drive(mut ops: Vec<Op>, shared: Arc<Shared>, progress: Progress, limit: u64) -> ExecutionStats {
    let start = Instant::now();
    // The budget is the context's (shared with other executions and DataFusion's
    // operators): this execution's peak is sampled at every scheduling step.
    let mut peak = shared.budget.used();
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
        shared
            .signal
            .wait_since(generation, Duration::from_millis(100));
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
    };
    progress.finish(&stats);
    stats
}
