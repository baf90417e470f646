//! A stage on a cluster over input blocks: one task per bundle of blocks, the same
//! encoded work for every bundle. Blocks made in this process are put into the cluster
//! first; the task runs where the head places it (preferring the node that holds most
//! of its input).

use std::sync::Arc;

use volley_runtime::cluster::{Cluster, EncodedTask, Resources, TaskOptions};

use super::cluster_read::task_result;
use super::{Expected, Operator, OutputEstimate, StepContext};
use crate::plan::WriteTarget;
use crate::queue::{Block, BlockQueue, PoppedBlock, RemoteBlock};

pub(crate) struct ClusterMapOp {
    cluster: Cluster,
    input: Arc<BlockQueue>,
    task: EncodedTask,
    resources: Resources,
    bundle_rows: usize,
    write: Option<Arc<WriteTarget>>,
    window: usize,
    next_seq: u64,
    input_done: bool,
    bundle: Vec<RemoteBlock>,
    bundle_len: usize,
    estimate: Arc<OutputEstimate>,
}

impl ClusterMapOp {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cluster: Cluster,
        input: Arc<BlockQueue>,
        task: EncodedTask,
        resources: Resources,
        bundle_rows: usize,
        write: Option<Arc<WriteTarget>>,
        window: usize,
        first_seq: u64,
    ) -> Self {
        Self {
            cluster,
            input,
            task,
            resources,
            bundle_rows: bundle_rows.max(1),
            write,
            window: window.max(1),
            next_seq: first_seq,
            input_done: false,
            bundle: Vec::new(),
            bundle_len: 0,
            estimate: Arc::default(),
        }
    }

    /// Fills the bundle; whether one is ready to go. A block of this process is put
    /// into the cluster (an error ends the execution).
    fn fill(&mut self, cx: &StepContext<'_>) -> bool {
        while self.bundle_len < self.bundle_rows && !self.input_done {
            match self.input.try_pop_block() {
                Ok(PoppedBlock::Block(Block::Remote(r))) => {
                    self.bundle_len += r.meta.rows as usize;
                    self.bundle.push(r);
                }
                Ok(PoppedBlock::Block(Block::Local(b))) => match cx.put_block(b) {
                    Ok(block) => {
                        self.bundle_len += block.meta.rows as usize;
                        self.bundle.push(block);
                    }
                    Err(e) => {
                        cx.fail(e);
                        self.input_done = true;
                    }
                },
                Ok(PoppedBlock::Empty) => break,
                Ok(PoppedBlock::Done) | Err(_) => self.input_done = true,
            }
        }
        !self.bundle.is_empty() && (self.bundle_len >= self.bundle_rows || self.input_done)
    }
}

impl Operator for ClusterMapOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.input_done = true;
            self.bundle.clear();
            self.bundle_len = 0;
        }
        while !cx.stopping && cx.running() < self.window {
            if !self.fill(cx) {
                break;
            }
            // The head runs the task on the node holding most of its input: its output
            // is expected there.
            let input: u64 = self.bundle.iter().map(|b| b.meta.bytes).sum();
            let node = self
                .bundle
                .iter()
                .max_by_key(|b| b.meta.bytes)
                .and_then(|b| b.meta.addresses.first().cloned());
            let expected = Expected {
                estimate: &self.estimate,
                input,
                node: node.as_deref(),
            };
            if !cx.store_room(&expected) {
                break;
            }
            let bundle = std::mem::take(&mut self.bundle);
            self.bundle_len = 0;
            let seq = self.next_seq;
            self.next_seq += 1;
            cx.out.register(seq);
            cx.counters
                .tasks_total
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let work = cx.remote_work(seq, format!("a task of {}", cx.name), Some(expected));
            let inputs: Vec<&volley_runtime::cluster::ObjectRef> =
                bundle.iter().map(|b| &b.object).collect();
            let options = TaskOptions::default()
                .resources(self.resources.clone())
                .name(crate::plan::bundle_task_name(cx.name, seq));
            match self.cluster.submit_encoded(&self.task, &inputs, &options) {
                Ok(object) => {
                    let (cluster, write) = (self.cluster.clone(), self.write.clone());
                    let watched = object.clone();
                    cx.watch().add(
                        watched,
                        Box::new(move |meta| {
                            // The inputs are freed once the task is done with them.
                            drop(bundle);
                            let result = task_result(&cluster, write.as_ref(), object, meta, &work);
                            work.finish(result)
                        }),
                    );
                }
                Err(e) => work.abandon(e),
            }
        }
        self.input_done && self.bundle.is_empty()
    }
}
