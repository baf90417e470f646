//! The executor's operators: what each kind of physical operator does when the driver
//! gives it a turn. The [driver](crate::driver) owns everything they share (queues,
//! sequence numbers, the memory budget, CPUs, statistics, cancellation); an operator
//! holds only its own logic and state.
//!
//! ```text
//!   driver loop ── step(cx) ──▶ Operator ── cx.spawn(task) ──▶ runtime (a thread per task)
//!        ▲                          │ pops cx.inputs, pushes cx.out (sequence numbers
//!        └───── signal (a push, a pop, a task's end) ◀──────┘  registered through cx)
//! ```
//!
//! An operator is stepped downstream first, on every signal. It starts the tasks that
//! may start now (the driver's `cx.room` says whether the budget has room for more
//! output, `cx.spawn` whether the runtime has the CPUs) and says when it has nothing
//! left to start; the driver closes its output once its last task has ended.

mod actor_pool;
mod cluster_map;
mod cluster_pool;
mod cluster_read;
mod limit;
mod map;
mod read;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};
use volley_connectors::PartWriter;
use volley_runtime::ResourceRequest;

pub(crate) use actor_pool::ActorPoolOp;
pub(crate) use cluster_map::ClusterMapOp;
pub(crate) use cluster_pool::ClusterPoolOp;
pub(crate) use cluster_read::ClusterReadOp;
pub(crate) use limit::LimitOp;
pub(crate) use map::MapOp;
pub(crate) use read::ReadOp;

use crate::driver::{ExecShared, SeqRange};
use crate::plan::WriteTarget;
use crate::queue::BlockQueue;
use crate::stats::OpCounters;
use crate::step::{Step, StepRunner};

/// One kind of physical operator, run by the driver.
pub(crate) trait Operator: Send {
    /// Starts what can start now. Returns `true` once the operator will start nothing
    /// more (its input is exhausted, or it is stopping); the driver then closes its
    /// output when its running tasks have ended.
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool;
}

/// What the driver gives an operator for one step.
pub(crate) struct StepContext<'a> {
    pub shared: &'a Arc<ExecShared>,
    /// The operator's name (stats, task names).
    pub name: &'a str,
    /// Where its blocks go.
    pub out: &'a Arc<BlockQueue>,
    /// The sequence numbers it may use in `out`.
    pub seqs: SeqRange,
    /// The execution is stopping (an error, a cancelled consumer, a satisfied limit):
    /// start nothing.
    pub stopping: bool,
    /// The memory budget has room for more output (or `out` is empty).
    pub room: bool,
    /// The most tasks one operator may run at once.
    pub max_tasks: usize,
    /// Its counters.
    pub counters: &'a Arc<OpCounters>,
    pub(crate) in_flight_counter: &'a Arc<std::sync::atomic::AtomicUsize>,
}

impl StepContext<'_> {
    /// Starts `body` as a task of this operator holding `resources`; `false` when the
    /// runtime cannot take it now (try again at a later step). A task of an operator
    /// with nothing running starts even without its resources, so that stages waiting
    /// on each other cannot starve.
    pub fn spawn(
        &self,
        name: String,
        resources: ResourceRequest,
        body: impl FnOnce() -> Result<()> + Send + 'static,
    ) -> bool {
        crate::driver::spawn(
            self.shared,
            self.in_flight_counter,
            name,
            resources,
            self.counters,
            body,
        )
    }

    /// Tasks of this operator running now (including those started in this step).
    pub fn running(&self) -> usize {
        self.in_flight_counter.load(Ordering::Acquire)
    }

    /// Ends the execution with `e` (unless it is already ending).
    pub(crate) fn fail(&self, e: VolleyError) {
        self.shared.fail(e);
    }

    /// The execution's object-store budget in bytes; `None` off a cluster.
    pub(crate) fn remote_limit(&self) -> Option<u64> {
        self.shared.remote.as_ref().map(|r| r.budget.limit())
    }

    /// The execution's watch of cluster objects (started on first use).
    pub(crate) fn watch(&self) -> Arc<crate::watch::Watch> {
        self.shared.watch()
    }
}

/// Work shared by the tasks of a task-based operator (reads and maps): the fused steps,
/// and where the output goes (the next queue, or a write).
#[derive(Clone)]
pub(crate) struct TaskBody {
    pub steps: Vec<Step>,
    pub write: Option<Arc<WriteTarget>>,
    pub out: Arc<BlockQueue>,
    pub counters: Arc<OpCounters>,
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

    /// Runs batches through the steps into the output (or the write).
    fn run(&self, seq: u64, batches: impl Iterator<Item = Result<RecordBatch>>) -> Result<()> {
        let mut runner = StepRunner::new(self.steps.clone());
        let mut writer = self.writer()?;
        let mut out = Vec::new();
        for b in batches {
            if self.out.is_cancelled() {
                return Err(VolleyError::Cancelled);
            }
            runner.push(b?, &mut out)?;
            self.emit(seq, &mut out, &mut writer)?;
        }
        runner.finish(&mut out)?;
        self.emit(seq, &mut out, &mut writer)?;
        self.finish(writer)
    }
}

/// One cluster task or actor call of an operator, counted as running until its object
/// is made or fails; then [`finish`](RemoteWork::finish) hands its block on.
pub(crate) struct RemoteWork {
    shared: Arc<ExecShared>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    counters: Arc<OpCounters>,
    out: Arc<BlockQueue>,
    seq: u64,
    label: String,
}

impl StepContext<'_> {
    /// Starts counting a cluster task or call of this operator whose output is
    /// sequence `seq` of the output queue.
    pub(crate) fn remote_work(&self, seq: u64, label: String) -> RemoteWork {
        self.in_flight_counter.fetch_add(1, Ordering::AcqRel);
        self.counters.task_started();
        RemoteWork {
            shared: Arc::clone(self.shared),
            in_flight: Arc::clone(self.in_flight_counter),
            counters: Arc::clone(self.counters),
            out: Arc::clone(self.out),
            seq,
            label,
        }
    }
}

impl RemoteWork {
    /// The work ended: `Ok(Some(block))` goes to the output, `Ok(None)` (a write's
    /// part, recorded elsewhere) is counted only; an error ends the execution, naming
    /// the task.
    pub(crate) fn finish(self, result: Result<Option<crate::queue::Block>>) {
        match result {
            Ok(Some(block)) => {
                self.counters.output(block.rows(), block.bytes() as usize);
                if let Err(e) = self.out.push_now(self.seq, block) {
                    if !e.is_cancelled() {
                        self.shared.fail(e);
                    }
                }
            }
            Ok(None) => {}
            Err(e) if e.is_cancelled() => {}
            Err(e) => self.shared.fail(e.context(&self.label)),
        }
        self.out.finish_seq(self.seq);
        self.counters.task_done(std::time::Duration::ZERO);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.signal.notify();
    }

    /// Abandons the work without a result (it could not be started).
    pub(crate) fn abandon(self, e: VolleyError) {
        self.finish(Err(e))
    }

    /// The work will be done again (its actor died): no longer running, its sequence
    /// still open.
    pub(crate) fn retry(self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.signal.notify();
    }
}
