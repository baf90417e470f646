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
mod cluster_exchange;
mod cluster_map;
mod cluster_pool;
mod cluster_read;
mod cluster_rows;
mod limit;
mod map;
mod read;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};
use volley_connectors::PartWriter;
use volley_runtime::cluster::name_task_error;
use volley_runtime::ResourceRequest;

pub(crate) use actor_pool::ActorPoolOp;
pub(crate) use cluster_exchange::ClusterExchangeOp;
pub(crate) use cluster_map::ClusterMapOp;
pub(crate) use cluster_pool::ClusterPoolOp;
pub(crate) use cluster_read::ClusterReadOp;
pub(crate) use cluster_rows::ClusterRowsOp;
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
    /// The memory budget has room for more output (or `out` is empty, or its consumer
    /// waits for this operator's output while nothing of it runs).
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
            self.out,
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

    /// The execution's watch of cluster objects (started on first use), for this
    /// operator's objects.
    pub(crate) fn watch(&self) -> crate::watch::OpWatch {
        crate::watch::OpWatch {
            watch: self.shared.watch(),
            op: op_key(self.in_flight_counter),
        }
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
    /// The writer of task `seq`'s part: numbered by the task's place in the output, so
    /// that the part files' names follow the rows' order (a sorted dataset's files).
    fn writer(&self, seq: u64) -> Result<Option<PartWriter>> {
        match &self.write {
            None => Ok(None),
            Some(w) => {
                let job = w.job.lock().expect("write lock");
                match job.as_ref() {
                    Some(job) => Ok(Some(job.part_writer(seq as usize)?)),
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
                .output(b.num_rows(), volley_common::batch_memory(&b) as usize);
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
        let mut writer = self.writer(seq)?;
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

/// What an operator's tasks or calls put into the object stores, learnt from those
/// that finished, to reserve room for one before it starts. Before any has finished, a
/// task with input is expected to make as many bytes as it reads, one without input
/// (a read) [`FIRST_READ_ESTIMATE`].
#[derive(Debug, Default)]
pub(crate) struct OutputEstimate {
    /// (input bytes, output bytes, finished tasks).
    seen: std::sync::Mutex<(u64, u64, u64)>,
}

/// What a read task is expected to put into the store before any has finished (Ray
/// Data assumes its target block size the same way).
pub(crate) const FIRST_READ_ESTIMATE: u64 = 64 << 20;

impl OutputEstimate {
    /// The bytes a task reading `input` bytes is expected to make.
    pub(crate) fn bytes(&self, input: u64) -> u64 {
        let (seen_in, seen_out, n) = *self.seen.lock().expect("estimate lock");
        match (n, input) {
            (0, 0) => FIRST_READ_ESTIMATE,
            (0, input) => input,
            (_, 0) => seen_out / n,
            (_, input) if seen_in > 0 => {
                (input as u128 * seen_out as u128 / seen_in as u128) as u64
            }
            _ => seen_out / n,
        }
    }

    fn record(&self, input: u64, output: u64) {
        let mut seen = self.seen.lock().expect("estimate lock");
        seen.0 += input;
        seen.1 += output;
        seen.2 += 1;
    }
}

/// An operator's key in its execution's [`Watch`](crate::watch::Watch): its count of
/// work in flight, one per operator.
pub(crate) fn op_key(in_flight: &Arc<std::sync::atomic::AtomicUsize>) -> usize {
    Arc::as_ptr(in_flight) as usize
}

/// One cluster task or actor call of an operator, counted as running until its object
/// is made or fails; then [`finish`](RemoteWork::finish) hands its block on. Until
/// then it holds room in the object-store budget for the output it is expected to
/// make.
pub(crate) struct RemoteWork {
    shared: Arc<ExecShared>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    counters: Arc<OpCounters>,
    out: Arc<BlockQueue>,
    seq: u64,
    label: String,
    expected: Option<(Arc<OutputEstimate>, u64)>,
    room: Option<crate::store_budget::StoreCharge>,
    /// Whether it ended (finished, abandoned or handed back for a retry).
    ended: bool,
}

impl Drop for RemoteWork {
    /// Dropped without an end (a panicking callback): the execution fails, rather than
    /// wait for good on its sequence.
    fn drop(&mut self) {
        if !self.ended {
            self.end(Err(VolleyError::internal("it ended without a result")));
        }
    }
}

impl StepContext<'_> {
    /// Starts counting a cluster task or call of this operator whose output is
    /// sequence `seq` of the output queue, holding room for the output it is `expected`
    /// to make until it ends (see [`store_room`](Self::store_room)); `None` for a
    /// further sequence of a call whose first one holds the room.
    pub(crate) fn remote_work(
        &self,
        seq: u64,
        label: String,
        expected: Option<Expected<'_>>,
    ) -> RemoteWork {
        self.in_flight_counter.fetch_add(1, Ordering::AcqRel);
        self.shared.remote_running.fetch_add(1, Ordering::AcqRel);
        self.counters.task_started();
        let room = match (&self.shared.remote, &expected) {
            (Some(r), Some(e)) => Some(r.budget.charge(e.bytes(), e.node)),
            _ => None,
        };
        RemoteWork {
            shared: Arc::clone(self.shared),
            in_flight: Arc::clone(self.in_flight_counter),
            counters: Arc::clone(self.counters),
            out: Arc::clone(self.out),
            seq,
            label,
            expected: expected.map(|e| (Arc::clone(e.estimate), e.input)),
            room,
            ended: false,
        }
    }

    /// Whether cluster work of this operator may start now: the object-store budget
    /// has room for its expected output (in all, and on its node where that is known),
    /// or [it may pass a full budget](Self::may_pass_full_budget). Everything the driver
    /// holds a reference to counts: queued blocks, blocks held by waiting or running
    /// work, and the room held for running work's outputs.
    pub(crate) fn store_room(&self, expected: &Expected<'_>) -> bool {
        self.store_has_room(expected.bytes(), expected.node) || self.may_pass_full_budget()
    }

    /// One piece of work may start past a full budget when no cluster work of the
    /// execution runs anywhere and this operator's output is not waiting to be read,
    /// so that a full budget never stops the execution: operators are stepped
    /// downstream first, so the one nearest the output that has input takes the turn
    /// and drains the blocks filling the budget; a consumer that does not read holds
    /// everything back.
    ///
    /// Also when nothing of this operator runs and the consumer waits for its output,
    /// behind which the blocks filling the budget wait (ordered mode: another input of
    /// a union; see `BlockQueue::waiting_on`).
    pub(crate) fn may_pass_full_budget(&self) -> bool {
        (self.shared.remote_running.load(Ordering::Acquire) == 0 && self.out.bytes() == 0)
            || (self.running() == 0 && self.out.waiting_on(self.seqs.base, self.seqs.sentinel()))
    }

    /// Whether the object-store budget has room for `bytes` more (in all, and on
    /// `node`).
    pub(crate) fn store_has_room(&self, bytes: u64, node: Option<&str>) -> bool {
        self.shared
            .remote
            .as_ref()
            .is_none_or(|r| r.budget.has_room(bytes, node))
    }

    /// Puts a block of this process into the cluster (for a cluster stage to read),
    /// counted against the object-store budget.
    pub(crate) fn put_block(&self, batch: RecordBatch) -> Result<crate::queue::RemoteBlock> {
        let remote = self.shared.remote.as_ref().ok_or_else(|| {
            VolleyError::internal("a cluster stage in an execution without a cluster")
        })?;
        let meta = volley_runtime::cluster::ObjectMeta {
            rows: batch.num_rows() as u64,
            bytes: volley_common::batch_memory(&batch),
            addresses: vec![],
        };
        let object = remote
            .cluster
            .put(vec![batch])
            .map_err(|e| e.context("putting a block into the cluster"))?;
        let mut block = crate::queue::RemoteBlock::new(object, meta);
        block.charge(&remote.budget);
        Ok(block)
    }
}

impl StepContext<'_> {
    /// Starts counting a cluster task of this operator that makes no output block (an
    /// exchange's sample or map task): the operator stays open while it runs, and is
    /// stepped again when it ends.
    pub(crate) fn background_work(&self, label: String) -> BackgroundWork {
        self.in_flight_counter.fetch_add(1, Ordering::AcqRel);
        self.shared.remote_running.fetch_add(1, Ordering::AcqRel);
        self.counters.tasks_total.fetch_add(1, Ordering::Relaxed);
        self.counters.task_started();
        BackgroundWork {
            shared: Arc::clone(self.shared),
            out: Arc::clone(self.out),
            in_flight: Arc::clone(self.in_flight_counter),
            counters: Arc::clone(self.counters),
            label,
            finished: false,
        }
    }
}

/// A cluster task that makes no output block; see [`StepContext::background_work`].
/// Dropped without [`finish`](Self::finish) (a panic, a callback never called), it
/// ends the execution with an error rather than leave its operator open.
pub(crate) struct BackgroundWork {
    shared: Arc<ExecShared>,
    /// Its operator's output: whether the operator is stopping.
    out: Arc<BlockQueue>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    counters: Arc<OpCounters>,
    label: String,
    finished: bool,
}

impl Drop for BackgroundWork {
    fn drop(&mut self) {
        if !self.finished {
            self.end(Err(VolleyError::internal("it ended without a result")));
        }
    }
}

impl BackgroundWork {
    /// The task ended; an error ends the execution, naming the task.
    pub(crate) fn finish(mut self, result: Result<()>) {
        self.end(result);
    }

    fn end(&mut self, result: Result<()>) {
        self.finished = true;
        if let Err(e) = result {
            if let Some(e) = self.shared.task_error(&self.out, e) {
                self.shared.fail(name_task_error(e, &self.label));
            }
        }
        self.counters.task_done(std::time::Duration::ZERO);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.remote_running.fetch_sub(1, Ordering::AcqRel);
        self.shared.signal.notify();
    }
}

/// What a piece of cluster work is expected to put into the object stores: its
/// operator's estimate, the bytes it reads, and the node (Flight address) its output
/// will be stored on, where that is known before the head places it.
#[derive(Clone, Copy)]
pub(crate) struct Expected<'a> {
    pub estimate: &'a Arc<OutputEstimate>,
    pub input: u64,
    pub node: Option<&'a str>,
}

impl Expected<'_> {
    fn bytes(&self) -> u64 {
        self.estimate.bytes(self.input)
    }
}

impl RemoteWork {
    /// The work ended: `Ok(Some(block))` goes to the output, `Ok(None)` (a write's
    /// part, recorded elsewhere) is counted only; an error ends the execution, naming
    /// the task.
    pub(crate) fn finish(mut self, result: Result<Option<crate::queue::Block>>) {
        self.end(result);
    }

    fn end(&mut self, result: Result<Option<crate::queue::Block>>) {
        self.ended = true;
        let made = match &result {
            Ok(Some(block)) => block.bytes(),
            _ => 0,
        };
        if let (Ok(_), Some((estimate, input))) = (&result, &self.expected) {
            estimate.record(*input, made);
        }
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
            Err(e) => {
                if let Some(e) = self.shared.task_error(&self.out, e) {
                    self.shared.fail(name_task_error(e, &self.label));
                }
            }
        }
        self.out.finish_seq(self.seq);
        self.counters.task_done(std::time::Duration::ZERO);
        // The room it held goes back before the scheduler hears of it.
        drop(self.room.take());
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.remote_running.fetch_sub(1, Ordering::AcqRel);
        self.shared.signal.notify();
    }

    /// Abandons the work without a result (it could not be started).
    pub(crate) fn abandon(self, e: VolleyError) {
        self.finish(Err(e))
    }

    /// The work will be done again (its actor died): no longer running, its sequence
    /// still open.
    pub(crate) fn retry(mut self) {
        self.ended = true;
        drop(self.room.take());
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.shared.remote_running.fetch_sub(1, Ordering::AcqRel);
        self.shared.signal.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_estimates_learn_from_finished_work() {
        let e = OutputEstimate::default();
        // Nothing seen: a read expects a default block, a map its input's size.
        assert_eq!(e.bytes(0), FIRST_READ_ESTIMATE);
        assert_eq!(e.bytes(1000), 1000);
        // A stage that halves its input.
        e.record(1000, 500);
        e.record(3000, 1500);
        assert_eq!(e.bytes(2000), 1000);
        assert_eq!(e.bytes(0), 1000, "a read expects the mean of its outputs");
        // Reads (no input): the mean output per task.
        let r = OutputEstimate::default();
        r.record(0, 100);
        r.record(0, 300);
        assert_eq!(r.bytes(0), 200);
        assert_eq!(r.bytes(50), 200);
    }
}
