//! A stateful transform on a pool of long-lived workers: each worker builds its
//! transform once, then takes bundles of input until the input ends.

use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::compute::concat_batches;
use volley_common::{Result, VolleyError};
use volley_runtime::ResourceRequest;

use super::{Operator, StepContext};
use crate::queue::{BlockQueue, PoppedBlock};
use crate::stats::OpCounters;
use crate::transform::{chunks, guard, TransformFactory};

/// Chunks (of `batch_size` rows) a worker takes at once when blocks are waiting.
const BUNDLE_CHUNKS: usize = 4;

pub(crate) struct ActorPoolOp {
    input: Arc<BlockQueue>,
    factory: TransformFactory,
    concurrency: usize,
    resources: ResourceRequest,
    batch_size: Option<usize>,
    spawned: usize,
    taker: Arc<Mutex<Taker>>,
}

/// What the workers of a pool take input through, one at a time: the next bundle's
/// number, and the rows of the last bundle past a whole number of batches.
struct Taker {
    next_seq: u64,
    /// Rows held back for the next bundle (slices of the last blocks taken), so that
    /// every batch but the stream's last has `batch_size` rows, whatever the input's
    /// blocks hold.
    carry: Vec<RecordBatch>,
}

impl ActorPoolOp {
    pub(crate) fn new(
        input: Arc<BlockQueue>,
        factory: TransformFactory,
        concurrency: usize,
        resources: ResourceRequest,
        batch_size: Option<usize>,
        first_seq: u64,
    ) -> Self {
        Self {
            input,
            factory,
            concurrency: concurrency.max(1),
            resources,
            batch_size,
            spawned: 0,
            taker: Arc::new(Mutex::new(Taker {
                next_seq: first_seq,
                carry: Vec::new(),
            })),
        }
    }
}

impl Operator for ActorPoolOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        // A worker that ended found the input drained: later ones (waiting for CPUs
        // the first held) would only build their state to find nothing left.
        while !cx.stopping && self.spawned < self.concurrency && cx.running() == self.spawned {
            let worker = ActorWorker {
                input: Arc::clone(&self.input),
                out: Arc::clone(cx.out),
                factory: self.factory.clone(),
                batch_size: self.batch_size,
                taker: Arc::clone(&self.taker),
                counters: Arc::clone(cx.counters),
            };
            let name = format!("{}#{}", cx.name, self.spawned);
            if !cx.spawn(name, self.resources, move || worker.run()) {
                break;
            }
            self.spawned += 1;
        }
        // Workers run until their input ends: once they are started (or the execution
        // stops), there is nothing more to start.
        self.spawned > 0 || cx.stopping
    }
}

/// One worker of an actor pool.
struct ActorWorker {
    input: Arc<BlockQueue>,
    out: Arc<BlockQueue>,
    factory: TransformFactory,
    batch_size: Option<usize>,
    taker: Arc<Mutex<Taker>>,
    counters: Arc<OpCounters>,
}

impl ActorWorker {
    fn run(self) -> Result<()> {
        let mut transform = self.factory.build()?;
        let name = self.factory.name();
        let want = self.batch_size.unwrap_or(1).max(1);
        loop {
            // Taking input and numbering it happen together, so that ordered mode
            // sees bundles in input order (and rows carried over stay in it).
            let (bundle, seq) = {
                let mut taker = self.taker.lock().expect("actor lock");
                let mut bundle: Vec<RecordBatch> = std::mem::take(&mut taker.carry);
                let mut rows: usize = bundle.iter().map(RecordBatch::num_rows).sum();
                let mut ended = false;
                while rows < want {
                    match self.input.pop()? {
                        Some(b) => {
                            rows += b.num_rows();
                            bundle.push(b);
                        }
                        None => {
                            ended = true;
                            break;
                        }
                    }
                }
                // With a batch size, blocks already waiting join the bundle (up to a
                // few chunks' worth), so that a transform that keeps many rows in
                // flight refills from them instead of draining at the end of each
                // block. Without one, the transform sees one block per batch.
                while self.batch_size.is_some() && rows < want * BUNDLE_CHUNKS {
                    match self.input.try_pop_block()? {
                        PoppedBlock::Block(b) => {
                            let b = self.input.resolve(b)?;
                            rows += b.num_rows();
                            bundle.push(b);
                        }
                        PoppedBlock::Done => {
                            ended = true;
                            break;
                        }
                        PoppedBlock::Empty => break,
                    }
                }
                // Rows past the last whole batch wait for the next bundle, unless the
                // input has ended (then they are the stream's last, short batch). The
                // input has not ended, so `rows` reached `want`: at least one whole
                // batch stays. Cut by slicing the last blocks (no copy under the lock).
                if let (Some(size), false) = (self.batch_size, ended) {
                    let mut tail = rows % size.max(1);
                    while tail > 0 {
                        let b = bundle.pop().expect("the tail is part of the bundle");
                        let n = b.num_rows();
                        if n <= tail {
                            tail -= n;
                            taker.carry.push(b);
                        } else {
                            taker.carry.push(b.slice(n - tail, tail));
                            bundle.push(b.slice(0, n - tail));
                            tail = 0;
                        }
                    }
                    taker.carry.reverse();
                }
                if bundle.is_empty() {
                    return Ok(());
                }
                let seq = taker.next_seq;
                taker.next_seq += 1;
                self.out.register(seq);
                (bundle, seq)
            };
            let result = (|| {
                let all = if bundle.len() == 1 {
                    bundle.into_iter().next().expect("one")
                } else {
                    concat_batches(&bundle[0].schema(), &bundle)?
                };
                let outs = guard(&name, || {
                    transform.transform_batches(chunks(&all, self.batch_size))
                })?;
                for out in outs.into_iter().filter(|b| b.num_rows() > 0) {
                    self.counters
                        .output(out.num_rows(), volley_common::batch_memory(&out) as usize);
                    self.out.push(seq, out)?;
                }
                Ok::<_, VolleyError>(())
            })();
            self.out.finish_seq(seq);
            result?;
        }
    }
}
