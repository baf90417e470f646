//! Bounded block queues between operators, counted against the memory budget.
//!
//! A producer's `push` waits while queued blocks fill their share of the
//! [`MemoryBudget`] (half; see [`queue_ceiling`]), except
//! for the block that the consumer needs next (the queue is empty, or in ordered mode
//! the block belongs to the sequence at the head). That exception is what makes the
//! budget deadlock-free: the consumer can always make progress, and the budget is
//! exceeded by at most one block per queue.
//!
//! In ordered mode every producer task has a *sequence number*, registered in
//! dispatch order; `pop` returns the blocks of the oldest unfinished sequence first, so
//! the output follows the input's order however the tasks finish.
//!
//! On a cluster a block may be an object in a node's store ([`Block::Remote`]): the
//! queue holds its reference and metadata (never its bytes), counted against the
//! execution's object-store budget instead of this process's memory. The charge goes
//! with the block when it is popped and ends only when the driver drops its reference
//! (the object then leaves its node's store), so blocks waiting for an actor or held by
//! the task that reads them stay counted. A consumer in this process that pops one
//! ([`BlockQueue::pop`]) gets its batches fetched over Flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{object_batch, Cluster, ObjectMeta, ObjectRef};
use volley_runtime::{MemoryBudget, MemoryReservation};

use crate::store_budget::{StoreBudget, StoreCharge};

/// Wakes whoever waits on an execution: pushers, poppers, the scheduling loop.
#[derive(Debug, Default)]
pub struct Signal {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    /// Wakes all waiters.
    pub fn notify(&self) {
        *self.generation.lock().expect("signal lock") += 1;
        self.cv.notify_all();
    }

    /// The current generation; pass it to [`wait_since`](Self::wait_since).
    pub fn generation(&self) -> u64 {
        *self.generation.lock().expect("signal lock")
    }

    /// Waits until notified after `generation`, or `timeout`.
    pub fn wait_since(&self, generation: u64, timeout: Duration) {
        let g = self.generation.lock().expect("signal lock");
        if *g != generation {
            return;
        }
        let _unused = self.cv.wait_timeout(g, timeout);
    }
}

/// An object in a cluster node's store: its reference and what the head says of it.
#[derive(Debug, Clone)]
pub struct RemoteBlock {
    /// The object (dropping the last reference frees it).
    pub object: ObjectRef,
    /// Rows, bytes and where it lives.
    pub meta: ObjectMeta,
    /// Its bytes, held against the execution's object-store budget from the moment it
    /// enters a queue for as long as the driver holds its reference: queued, waiting
    /// for an actor, or held by the task or call that reads it (the object stays in its
    /// node's store until then).
    charge: Option<Arc<StoreCharge>>,
}

impl RemoteBlock {
    /// A block of `object`, not yet counted against a budget.
    pub fn new(object: ObjectRef, meta: ObjectMeta) -> Self {
        Self {
            object,
            meta,
            charge: None,
        }
    }

    /// Counts its bytes against `budget`, in all and on the node holding it (once: a
    /// block already counted keeps its charge).
    pub(crate) fn charge(&mut self, budget: &StoreBudget) {
        if self.charge.is_none() {
            let node = self.meta.addresses.first().map(String::as_str);
            self.charge = Some(Arc::new(budget.charge(self.meta.bytes, node)));
        }
    }
}

/// A block between two operators.
#[derive(Debug, Clone)]
pub enum Block {
    /// Batches in this process.
    Local(RecordBatch),
    /// An object in a cluster node's store.
    Remote(RemoteBlock),
}

impl Block {
    /// Its rows.
    pub fn rows(&self) -> usize {
        match self {
            Block::Local(b) => b.num_rows(),
            Block::Remote(r) => r.meta.rows as usize,
        }
    }

    /// Its bytes (in this process's memory, or in a node's store).
    pub fn bytes(&self) -> u64 {
        match self {
            Block::Local(b) => volley_common::batch_memory(b),
            Block::Remote(r) => r.meta.bytes,
        }
    }
}

/// Where remote blocks are counted and fetched from.
#[derive(Clone)]
pub(crate) struct RemoteSide {
    pub cluster: Cluster,
    pub budget: Arc<StoreBudget>,
}

struct Queued {
    block: Block,
    /// A local block's bytes in this process's budget (a remote block carries its own
    /// charge, which leaves the queue with it).
    _reservation: Option<MemoryReservation>,
}

#[derive(Default)]
struct SeqSlot {
    blocks: VecDeque<Queued>,
    finished: bool,
}

struct State {
    /// Unordered mode: blocks in arrival order.
    fifo: VecDeque<Queued>,
    /// Ordered mode: blocks per sequence.
    seqs: BTreeMap<u64, SeqSlot>,
    bytes: u64,
    peak_bytes: u64,
    producers: usize,
    closed_producers: usize,
    error: Option<String>,
}

/// A queue of blocks between two operators.
pub struct BlockQueue {
    ordered: bool,
    budget: Arc<MemoryBudget>,
    remote: Option<RemoteSide>,
    signal: Arc<Signal>,
    cancelled: AtomicBool,
    state: Mutex<State>,
}

/// What [`BlockQueue::try_pop_block`] found.
pub enum PoppedBlock {
    /// A block.
    Block(Block),
    /// Nothing now; more may come.
    Empty,
    /// Every producer is done and the queue is drained.
    Done,
}

/// How much of the budget queued blocks may fill: half. The rest is working memory
/// for the operators that need it (sorts, aggregations, joins, exchanges), which
/// otherwise would find the budget full of their own queued input.
pub(crate) fn queue_ceiling(budget: &MemoryBudget) -> u64 {
    budget.limit() / 2
}

impl BlockQueue {
    /// A queue of this process's blocks fed by `producers` producers (each calls
    /// [`close`](Self::close) once).
    #[cfg(test)]
    pub fn new(
        ordered: bool,
        producers: usize,
        budget: Arc<MemoryBudget>,
        signal: Arc<Signal>,
    ) -> Arc<Self> {
        Self::with_remote(ordered, producers, budget, signal, None)
    }

    /// A queue that may also hold remote blocks (counted against `remote.budget`,
    /// fetched from `remote.cluster`).
    pub(crate) fn with_remote(
        ordered: bool,
        producers: usize,
        budget: Arc<MemoryBudget>,
        signal: Arc<Signal>,
        remote: Option<RemoteSide>,
    ) -> Arc<Self> {
        Arc::new(Self {
            ordered,
            budget,
            remote,
            signal,
            cancelled: AtomicBool::new(false),
            state: Mutex::new(State {
                fifo: VecDeque::new(),
                seqs: BTreeMap::new(),
                bytes: 0,
                peak_bytes: 0,
                producers,
                closed_producers: 0,
                error: None,
            }),
        })
    }

    /// Registers a sequence number (ordered mode), in dispatch order.
    pub fn register(&self, seq: u64) {
        if self.ordered {
            self.state
                .lock()
                .expect("queue lock")
                .seqs
                .entry(seq)
                .or_default();
        }
    }

    /// Marks a sequence as complete (ordered mode).
    pub fn finish_seq(&self, seq: u64) {
        if self.ordered {
            if let Some(slot) = self.state.lock().expect("queue lock").seqs.get_mut(&seq) {
                slot.finished = true;
            }
            self.signal.notify();
        }
    }

    /// Adds a batch, waiting while the memory budget is full (see the module docs).
    /// Fails with [`VolleyError::Cancelled`] once the execution is cancelled.
    pub fn push(&self, seq: u64, batch: RecordBatch) -> Result<()> {
        self.push_block(seq, Block::Local(batch))
    }

    /// Adds a block, waiting while the memory budget is full; a remote one is counted
    /// against the object-store budget without waiting (the room for it was checked when
    /// the work that made it started).
    pub fn push_block(&self, seq: u64, block: Block) -> Result<()> {
        if matches!(block, Block::Remote(_)) {
            return self.push_now(seq, block);
        }
        let bytes = block.bytes();
        let budget = Arc::clone(&self.budget);
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return Err(VolleyError::Cancelled);
            }
            let generation = self.signal.generation();
            {
                let mut s = self.state.lock().expect("queue lock");
                // Again under the lock: a cancel that came in between cleared the
                // queue, and a block added now would hold its memory to the end.
                if self.cancelled.load(Ordering::Acquire) {
                    return Err(VolleyError::Cancelled);
                }
                let at_head = if self.ordered {
                    s.seqs.keys().next() == Some(&seq)
                        && s.seqs
                            .get(&seq)
                            .map(|x| x.blocks.is_empty())
                            .unwrap_or(true)
                } else {
                    s.fifo.is_empty()
                };
                let reservation = if at_head {
                    Some(budget.reserve(bytes))
                } else {
                    budget.try_reserve_under(bytes, queue_ceiling(&budget))
                };
                if let Some(reservation) = reservation {
                    let block = Queued {
                        block,
                        _reservation: Some(reservation),
                    };
                    if self.ordered {
                        s.seqs.entry(seq).or_default().blocks.push_back(block);
                    } else {
                        s.fifo.push_back(block);
                    }
                    s.bytes += bytes;
                    s.peak_bytes = s.peak_bytes.max(s.bytes);
                    drop(s);
                    self.signal.notify();
                    return Ok(());
                }
            }
            self.signal
                .wait_since(generation, Duration::from_millis(50));
        }
    }

    /// Adds a block without waiting for room (its room was checked when its work was
    /// started: a cluster task's result, which must not hold up the thread that hands
    /// results on).
    pub(crate) fn push_now(&self, seq: u64, block: Block) -> Result<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(VolleyError::Cancelled);
        }
        let bytes = block.bytes();
        let queued = match block {
            Block::Remote(mut r) => {
                if let Some(remote) = &self.remote {
                    r.charge(&remote.budget);
                }
                Queued {
                    block: Block::Remote(r),
                    _reservation: None,
                }
            }
            Block::Local(_) => Queued {
                _reservation: Some(self.budget.reserve(bytes)),
                block,
            },
        };
        let mut s = self.state.lock().expect("queue lock");
        if self.cancelled.load(Ordering::Acquire) {
            return Err(VolleyError::Cancelled);
        }
        if self.ordered {
            s.seqs.entry(seq).or_default().blocks.push_back(queued);
        } else {
            s.fifo.push_back(queued);
        }
        s.bytes += bytes;
        s.peak_bytes = s.peak_bytes.max(s.bytes);
        drop(s);
        self.signal.notify();
        Ok(())
    }

    /// One producer is done.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed_producers += 1;
        self.signal.notify();
    }

    /// The batches of a block, as one batch: a remote block's are fetched from the
    /// node that holds it.
    pub fn resolve(&self, block: Block) -> Result<RecordBatch> {
        match block {
            Block::Local(b) => Ok(b),
            Block::Remote(r) => {
                let cluster = self.remote.as_ref().map(|s| &s.cluster).ok_or_else(|| {
                    VolleyError::internal("a remote block in an execution without a cluster")
                })?;
                object_batch(r.object.id(), cluster.get(&r.object)?)
            }
        }
    }

    /// Takes the next block if there is one, without waiting.
    pub fn try_pop_block(&self) -> Result<PoppedBlock> {
        let mut s = self.state.lock().expect("queue lock");
        if let Some(e) = &s.error {
            return Err(VolleyError::execution(e.clone()));
        }
        let block = if self.ordered {
            loop {
                let Some((&seq, slot)) = s.seqs.iter_mut().next() else {
                    break None;
                };
                if let Some(b) = slot.blocks.pop_front() {
                    break Some(b);
                }
                if slot.finished {
                    s.seqs.remove(&seq);
                    continue;
                }
                break None;
            }
        } else {
            s.fifo.pop_front()
        };
        match block {
            Some(q) => {
                s.bytes -= q.block.bytes();
                drop(s);
                let block = q.block;
                // A local block's reservation is dropped here (it is no longer
                // buffered); a remote block's charge goes on with it.
                self.signal.notify();
                Ok(PoppedBlock::Block(block))
            }
            None => {
                let drained = s.fifo.is_empty() && s.seqs.values().all(|x| x.blocks.is_empty());
                if s.closed_producers >= s.producers && drained {
                    Ok(PoppedBlock::Done)
                } else {
                    Ok(PoppedBlock::Empty)
                }
            }
        }
    }

    /// Takes the next batch, waiting for one (a remote block is fetched); `None` when
    /// every producer is done.
    pub fn pop(&self) -> Result<Option<RecordBatch>> {
        match self.pop_block()? {
            Some(b) => Ok(Some(self.resolve(b)?)),
            None => Ok(None),
        }
    }

    /// Takes the next block, waiting for one; `None` when every producer is done.
    pub fn pop_block(&self) -> Result<Option<Block>> {
        loop {
            if self.cancelled.load(Ordering::Acquire) {
                return Err(VolleyError::Cancelled);
            }
            let generation = self.signal.generation();
            match self.try_pop_block()? {
                PoppedBlock::Block(b) => return Ok(Some(b)),
                PoppedBlock::Done => return Ok(None),
                PoppedBlock::Empty => self
                    .signal
                    .wait_since(generation, Duration::from_millis(50)),
            }
        }
    }

    /// Tells producers that nothing more is wanted: their pushes fail with
    /// [`VolleyError::Cancelled`], and the buffered blocks are dropped.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        let mut s = self.state.lock().expect("queue lock");
        s.fifo.clear();
        s.seqs.clear();
        s.bytes = 0;
        drop(s);
        self.signal.notify();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Whether the consumer waits for a block of the sequence numbers `lo..=hi`
    /// (ordered mode): the oldest sequence not yet done is among them and holds no
    /// block. The operator writing that range must be let start work past a full
    /// budget: the blocks filling it (another input of a union, say) wait behind
    /// that sequence, and only the consumer could release them.
    pub(crate) fn waiting_on(&self, lo: u64, hi: u64) -> bool {
        if !self.ordered {
            return false;
        }
        let s = self.state.lock().expect("queue lock");
        let head = s
            .seqs
            .iter()
            .find(|(_, slot)| !(slot.finished && slot.blocks.is_empty()));
        head.is_some_and(|(seq, slot)| (lo..=hi).contains(seq) && slot.blocks.is_empty())
    }

    /// Bytes buffered now.
    pub fn bytes(&self) -> u64 {
        self.state.lock().expect("queue lock").bytes
    }

    /// The most bytes ever buffered.
    pub fn peak_bytes(&self) -> u64 {
        self.state.lock().expect("queue lock").peak_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int32Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(v: i32) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int32, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int32Array::from(vec![v; 100]))]).unwrap()
    }

    fn queue(ordered: bool, limit: u64) -> Arc<BlockQueue> {
        BlockQueue::new(
            ordered,
            1,
            MemoryBudget::new(limit),
            Arc::new(Signal::default()),
        )
    }

    fn first(b: &RecordBatch) -> i32 {
        b.column(0)
            .as_any()
            .downcast_ref::<Int32Array>()
            .unwrap()
            .value(0)
    }

    #[test]
    fn ordered_delivers_in_sequence_order() {
        let q = queue(true, u64::MAX);
        q.register(0);
        q.register(1);
        q.push(1, batch(1)).unwrap();
        q.finish_seq(1);
        assert!(matches!(q.try_pop_block().unwrap(), PoppedBlock::Empty));
        q.push(0, batch(0)).unwrap();
        q.finish_seq(0);
        q.close();
        assert_eq!(first(&q.pop().unwrap().unwrap()), 0);
        assert_eq!(first(&q.pop().unwrap().unwrap()), 1);
        assert!(q.pop().unwrap().is_none());
    }

    #[test]
    fn full_budget_admits_only_the_head_block() {
        let q = queue(false, 1);
        q.push(0, batch(0)).unwrap(); // empty queue: admitted past the budget
        let q2 = Arc::clone(&q);
        let pusher = std::thread::spawn(move || q2.push(0, batch(1)));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!pusher.is_finished(), "second block must wait for room");
        assert_eq!(first(&q.pop().unwrap().unwrap()), 0);
        pusher.join().unwrap().unwrap();
        assert_eq!(first(&q.pop().unwrap().unwrap()), 1);
    }
}
