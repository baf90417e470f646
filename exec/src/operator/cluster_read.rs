//! A source stage on a cluster: one task per read split, each producing one object in
//! the store of the node that ran it (or, for a write, staging its part there).
//!
//! A stage whose tasks are made from samples ([`ReadTasks::AfterSampling`]) first runs
//! its sampling tasks, each returning a few rows, and makes its tasks once every sample
//! is in.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use volley_common::Result;
use volley_connectors::StagedPart;
use volley_runtime::cluster::{
    object_value, Cluster, EncodedTask, ObjectMeta, ObjectRef, Resources, TaskOptions,
};

use super::{Expected, Operator, OutputEstimate, RemoteWork, StepContext};
use crate::plan::{ReadTasks, SampledTasks, WriteTarget};
use crate::queue::{Block, RemoteBlock};

pub(crate) struct ClusterReadOp {
    cluster: Cluster,
    pending: VecDeque<(u64, String, EncodedTask)>,
    /// The first pass, while the tasks wait for its samples.
    sampling: Option<Sampling>,
    first_seq: u64,
    resources: Resources,
    write: Option<Arc<WriteTarget>>,
    /// Tasks in flight at most (twice what the cluster's CPUs run at once).
    window: usize,
    estimate: Arc<OutputEstimate>,
}

/// The sampling tasks of a stage whose tasks are made from their samples.
struct Sampling {
    /// Those not submitted yet, with their place in `samples`.
    pending: VecDeque<(usize, String, EncodedTask)>,
    samples: Arc<Mutex<Vec<Option<Vec<RecordBatch>>>>>,
    tasks: Arc<dyn SampledTasks>,
    /// The stage's name (errors).
    name: String,
}

impl ClusterReadOp {
    pub(crate) fn new(
        cluster: Cluster,
        tasks: ReadTasks,
        name: &str,
        first_seq: u64,
        resources: Resources,
        write: Option<Arc<WriteTarget>>,
        window: usize,
    ) -> Self {
        let (planned, sampling) = match tasks {
            ReadTasks::Planned(tasks) => (tasks, None),
            ReadTasks::AfterSampling { samples, tasks, .. } => {
                let n = samples.len();
                let sampling = Sampling {
                    pending: samples
                        .into_iter()
                        .enumerate()
                        .map(|(i, (label, task))| (i, label, task))
                        .collect(),
                    samples: Arc::new(Mutex::new(vec![None; n])),
                    tasks,
                    name: name.to_string(),
                };
                (vec![], Some(sampling))
            }
        };
        let mut op = Self {
            cluster,
            pending: VecDeque::new(),
            sampling,
            first_seq,
            resources,
            write,
            window: window.max(1),
            estimate: Arc::default(),
        };
        op.queue(planned);
        op
    }

    fn queue(&mut self, tasks: Vec<(String, EncodedTask)>) {
        let first = self.first_seq;
        self.pending.extend(
            tasks
                .into_iter()
                .enumerate()
                .map(|(i, (label, task))| (first + i as u64, label, task)),
        );
    }

    /// Submits the sampling tasks there is room for; once every sample is in, makes the
    /// stage's tasks from them. `true` once the stage's tasks are made (or cannot be).
    fn sample(&mut self, cx: &StepContext<'_>) -> bool {
        let Some(sampling) = &mut self.sampling else {
            return true;
        };
        while cx.running() < self.window {
            let Some((index, label, task)) = sampling.pending.pop_front() else {
                break;
            };
            let options = TaskOptions::default()
                .resources(self.resources.clone())
                .name(format!("{label} (sample)"));
            let samples = Arc::clone(&sampling.samples);
            submit_sample(
                cx,
                &self.cluster,
                format!("task {label} (sampling its keys)"),
                (&task, &[], &options),
                move |batches| samples.lock().expect("samples lock")[index] = Some(batches),
            );
        }
        let samples = {
            let samples = sampling.samples.lock().expect("samples lock");
            if !sampling.pending.is_empty() || samples.iter().any(Option::is_none) {
                return false;
            }
            samples.iter().flatten().flatten().cloned().collect()
        };
        let sampling = self.sampling.take().expect("checked above");
        match sampling.tasks.tasks(samples) {
            Ok(tasks) => self.queue(tasks),
            Err(e) => cx.fail(e.context(format!("choosing the partitions of {}", sampling.name))),
        }
        true
    }
}

/// Submits a sampling task (`task` over `inputs`, with `options`) as background work
/// named `label`, and hands its rows, fetched into this process once made, to `keep`.
pub(crate) fn submit_sample(
    cx: &StepContext<'_>,
    cluster: &Cluster,
    label: String,
    (task, inputs, options): (&EncodedTask, &[&ObjectRef], &TaskOptions),
    keep: impl FnOnce(Vec<RecordBatch>) + Send + 'static,
) {
    let work = cx.background_work(label);
    match cluster.submit_encoded(task, inputs, options) {
        Ok(object) => {
            let cluster = cluster.clone();
            let sample = object.clone();
            cx.watch().add(
                object,
                Box::new(move |meta| {
                    let got = meta.and_then(|_| cluster.get(&sample));
                    work.finish(got.map(keep));
                }),
            );
        }
        Err(e) => work.finish(Err(e)),
    }
}

/// What a finished stage task (`work`) hands on: its object as a block, or (for a
/// write) the part it staged, recorded in the write's target, its rows and bytes in
/// the operator's statistics. An object of no rows is no block: it carries nothing,
/// and one made by a transform that never ran (its input had no rows) holds no batch
/// to tell its schema.
pub(crate) fn task_result(
    cluster: &Cluster,
    write: Option<&Arc<WriteTarget>>,
    object: ObjectRef,
    meta: Result<ObjectMeta>,
    work: &RemoteWork,
) -> Result<Option<Block>> {
    let meta = meta?;
    match write {
        Some(target) => {
            let staged: StagedPart = object_value(&cluster.get(&object)?)?;
            let written = &staged.summary;
            work.counters
                .output(written.rows as usize, written.bytes as usize);
            target.parts.lock().expect("write lock").push(staged);
            Ok(None)
        }
        None if meta.rows == 0 => Ok(None),
        None => Ok(Some(Block::Remote(RemoteBlock::new(object, meta)))),
    }
}

impl Operator for ClusterReadOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.sampling = None;
            self.pending.clear();
        }
        if !self.sample(cx) {
            return false;
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
                            let result = task_result(&cluster, write.as_ref(), object, meta, &work);
                            work.finish(result)
                        }),
                    );
                }
                Err(e) => work.abandon(e),
            }
        }
        self.pending.is_empty()
    }
}
