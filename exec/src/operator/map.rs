//! A pool of tasks over bundles of input blocks: each task runs the fused steps over
//! at least `bundle_rows` rows (the last bundle may have fewer).

use std::sync::Arc;

use volley_runtime::ResourceRequest;

use super::{Operator, StepContext, TaskBody};
use crate::queue::{Block, BlockQueue, PoppedBlock};

pub(crate) struct MapOp {
    input: Arc<BlockQueue>,
    resources: ResourceRequest,
    concurrency: usize,
    bundle_rows: usize,
    body: TaskBody,
    next_seq: u64,
    input_done: bool,
    /// Blocks taken for the next task (a remote one is fetched by the task).
    bundle: Vec<Block>,
    bundle_len: usize,
}

impl MapOp {
    pub(crate) fn new(
        input: Arc<BlockQueue>,
        resources: ResourceRequest,
        concurrency: usize,
        bundle_rows: usize,
        body: TaskBody,
        first_seq: u64,
    ) -> Self {
        Self {
            input,
            resources,
            concurrency: concurrency.max(1),
            bundle_rows: bundle_rows.max(1),
            body,
            next_seq: first_seq,
            input_done: false,
            bundle: Vec::new(),
            bundle_len: 0,
        }
    }

    /// Fills the bundle from the input; whether a bundle is ready to go.
    fn fill(&mut self) -> bool {
        while self.bundle_len < self.bundle_rows && !self.input_done {
            match self.input.try_pop_block() {
                Ok(PoppedBlock::Block(b)) => {
                    self.bundle_len += b.rows();
                    self.bundle.push(b);
                }
                Ok(PoppedBlock::Empty) => break,
                Ok(PoppedBlock::Done) | Err(_) => self.input_done = true,
            }
        }
        !self.bundle.is_empty() && (self.bundle_len >= self.bundle_rows || self.input_done)
    }
}

impl Operator for MapOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.input_done = true;
            self.bundle.clear();
            self.bundle_len = 0;
        }
        while !cx.stopping && cx.room && cx.running() < self.concurrency.min(cx.max_tasks) {
            if !self.fill() {
                break;
            }
            let work = std::mem::take(&mut self.bundle);
            let held = work.clone();
            let seq = self.next_seq;
            cx.out.register(seq);
            cx.counters
                .tasks_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (body, input) = (self.body.clone(), Arc::clone(&self.input));
            let started = cx.spawn(cx.name.to_string(), self.resources, move || {
                let r = body.run(seq, work.into_iter().map(|b| input.resolve(b)));
                body.out.finish_seq(seq);
                r
            });
            if !started {
                // The bundle goes back; its sequence stays registered for the next try.
                cx.counters
                    .tasks_total
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                self.bundle = held;
                break;
            }
            self.bundle_len = 0;
            self.next_seq += 1;
        }
        self.input_done && self.bundle.is_empty()
    }
}
