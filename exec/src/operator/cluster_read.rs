//! A source stage on a cluster: one task per read split, each producing one object in
//! the store of the node that ran it (or, for a write, staging its part there).

use std::collections::VecDeque;
use std::sync::Arc;

use volley_common::Result;
use volley_connectors::StagedPart;
use volley_runtime::cluster::{
    object_value, Cluster, EncodedTask, ObjectMeta, ObjectRef, Resources, TaskOptions,
};

use super::{Expected, Operator, OutputEstimate, StepContext};
use crate::plan::WriteTarget;
use crate::queue::{Block, RemoteBlock};

pub(crate) struct ClusterReadOp {
    cluster: Cluster,
    pending: VecDeque<(u64, String, EncodedTask)>,
    resources: Resources,
    write: Option<Arc<WriteTarget>>,
    /// Tasks in flight at most (twice what the cluster's CPUs run at once).
    window: usize,
    estimate: Arc<OutputEstimate>,
}

impl ClusterReadOp {
    pub(crate) fn new(
        cluster: Cluster,
        tasks: Vec<(String, EncodedTask)>,
        first_seq: u64,
        resources: Resources,
        write: Option<Arc<WriteTarget>>,
        window: usize,
    ) -> Self {
        Self {
            cluster,
            pending: tasks
                .into_iter()
                .enumerate()
                .map(|(i, (label, task))| (first_seq + i as u64, label, task))
                .collect(),
            resources,
            write,
            window: window.max(1),
            estimate: Arc::default(),
        }
    }
}

/// What a finished stage task hands on: its object as a block, or (for a write) the part
/// it staged, recorded in the write's target.
pub(crate) fn task_result(
    cluster: &Cluster,
    write: Option<&Arc<WriteTarget>>,
    object: ObjectRef,
    meta: Result<ObjectMeta>,
) -> Result<Option<Block>> {
    let meta = meta?;
    match write {
        Some(target) => {
            let staged: StagedPart = object_value(&cluster.get(&object)?)?;
            target.parts.lock().expect("write lock").push(staged);
            Ok(None)
        }
        None => Ok(Some(Block::Remote(RemoteBlock::new(object, meta)))),
    }
}

impl Operator for ClusterReadOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.pending.clear();
        }
        // Where a read's output goes is the head's choice (the node whose store is least
        // full): it is checked against the total only.
        let expected = Expected {
            estimate: &self.estimate,
            input: 0,
            node: None,
        };
        while cx.running() < self.window && cx.store_room(&expected) {
            let Some((seq, label, task)) = self.pending.pop_front() else {
                break;
            };
            cx.out.register(seq);
            let work = cx.remote_work(seq, format!("task {label}"), Some(expected));
            let options = TaskOptions::default()
                .resources(self.resources.clone())
                .name(label);
            match self.cluster.submit_encoded(&task, &[], &options) {
                Ok(object) => {
                    let (cluster, write) = (self.cluster.clone(), self.write.clone());
                    let watched = object.clone();
                    cx.watch().add(
                        watched,
                        Box::new(move |meta| {
                            work.finish(task_result(&cluster, write.as_ref(), object, meta))
                        }),
                    );
                }
                Err(e) => work.abandon(e),
            }
        }
        self.pending.is_empty()
    }
}
