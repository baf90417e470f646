//! An exchange on a cluster: map tasks partition each input block on the node that
//! holds it, reduce tasks read their partition of every map output and combine it.
//!
//! ```text
//!   inputs ──▶ [sample tasks ─▶ boundaries]  (a sort only: all blocks are sampled first)
//!          ──▶ map task per block, as blocks arrive: one object, batch p = partition p
//!          ──▶ (all maps done) reduce task per partition: batch p of every map output
//!          ──▶ output blocks in partition order
//! ```
//!
//! An input whose stage ran the map work in its own tasks (a read split partitioned
//! where it is read: [`ClusterExchangeExec::premapped`](crate::plan::ClusterExchangeExec))
//! comes in as map outputs: no map task runs for it (nor, for a sort, a sample task:
//! that stage chose the boundaries from a first pass of its own).
//!
//! An exchange that only reorders blocks (`randomize_block_order`) runs no tasks: once
//! the whole input arrived, its blocks go on as they are, where they are, in the order
//! the work chooses.
//!
//! A join that may broadcast its right side holds both sides' blocks until the right
//! side is all made or past [`ExchangeWork::broadcast_limit`]. If it is all made within
//! the limit, each left block (those held, then each as it comes) goes to one task with
//! the whole right side, named once as a group, and is let go when that task is done:
//! the left side is not partitioned. Otherwise both sides are mapped and reduced as
//! above.
//!
//! When the exchange is a write's input, its reduce (or broadcast) tasks write their
//! output where they run, each its own part (named by its partition, so that a sort's
//! files follow its key ranges), and hand on no blocks.
//!
//! This process holds references, never rows. An input block is let go once it is
//! mapped: its store needs room for the map outputs, not for both. The map outputs stay
//! in the nodes' stores until every reduce task is done; one lost with its node is made
//! again by the head from lineage: it re-runs the map task, and first the task that
//! made its block (the head keeps a freed block's lineage while its map output lives,
//! and keeps the block itself where its task cannot run again as it did: a driver's
//! own block, an actor's output, a block made from inputs freed too). The bookkeeping
//! is one reference per input block and per map task, and one reduce task per
//! partition: O(blocks + partitions), never one object per (map, partition) pair. Once every reduce task is submitted, this process drops
//! its references to the map outputs: the head holds them for the reduce tasks that
//! read them and frees them on the nodes when the last is done.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use volley_common::{Result, VolleyError};
use volley_runtime::cluster::{
    Cluster, EncodedTask, ObjectGroup, ObjectMeta, ObjectRef, Resources, TaskInput, TaskOptions,
};

use super::cluster_read::{submit_sample, task_result};
use super::{Expected, Operator, OutputEstimate, RemoteWork, StepContext};
use crate::plan::{bundle_task_name, ExchangeWork, WriteTarget};
use crate::queue::{Block, BlockQueue, PoppedBlock, RemoteBlock};

/// What the tasks' callbacks fill in.
#[derive(Default)]
struct Progress {
    /// Per input block (of input 0): its sample, once made.
    samples: Vec<Option<Vec<RecordBatch>>>,
    /// Per input, per block: its map output and where it is, once made.
    maps: Vec<Vec<Option<(ObjectRef, ObjectMeta)>>>,
    /// Input blocks per input, held until mapped; a broadcast join's left block,
    /// until its task is done.
    held: Vec<Vec<Option<ObjectRef>>>,
    maps_done: usize,
}

/// A join's right side, sent whole to one task per left block.
struct Broadcast {
    group: ObjectGroup,
    /// Its blocks.
    blocks: usize,
    /// The next left block to submit.
    next: usize,
}

/// What the reduce tasks read: every map output (input 0's, then input 1's), how many
/// of each input, and their bytes in all.
struct ReduceInputs {
    /// The map outputs named once at the head: each reduce task passes the group, not
    /// every map output. The group holds them (a map output lost with its node is
    /// made again) until it is dropped, once every reduce task is submitted, and then
    /// the head holds them for the reduce tasks still to finish.
    group: ObjectGroup,
    sides: Vec<usize>,
    bytes: u64,
}

pub(crate) struct ClusterExchangeOp {
    cluster: Cluster,
    inputs: Vec<Arc<BlockQueue>>,
    work: Arc<dyn ExchangeWork>,
    sample: Option<EncodedTask>,
    /// Whether it only reorders its input blocks (no tasks).
    reorders: bool,
    /// The input blocks, kept whole when it only reorders them; then, in their new
    /// order, those not handed on yet.
    kept: Vec<(ObjectRef, ObjectMeta)>,
    reordered: Option<VecDeque<(ObjectRef, ObjectMeta)>>,
    /// A join waiting for its right side to choose between a broadcast and a shuffle.
    deciding: bool,
    /// Bytes per input so far.
    bytes: Vec<u64>,
    /// The right side, once a broadcast was chosen.
    broadcast: Option<Broadcast>,
    /// What the map tasks were given (after sampling, for a sort).
    prepared: Option<Vec<u8>>,
    input_done: Vec<bool>,
    /// Rows popped so far per input (the next block's first row).
    rows: Vec<u64>,
    /// Per input, per block: its first row in the input.
    firsts: Vec<Vec<u64>>,
    /// Blocks per input whose map task was submitted (or, for an input the stage below
    /// maps, that came in as map outputs).
    mapped: Vec<usize>,
    /// Per input: whether its blocks are map outputs already (see
    /// [`ClusterExchangeExec::premapped`](crate::plan::ClusterExchangeExec)).
    premapped: Vec<bool>,
    progress: Arc<Mutex<Progress>>,
    /// The next output: a reduce task's partition, or a reordered block's place.
    next_reduce: usize,
    /// The map outputs every reduce task reads, once all are made.
    reduce_inputs: Option<ReduceInputs>,
    first_seq: u64,
    window: usize,
    estimate: Arc<OutputEstimate>,
    /// Where the reduce (or broadcast) tasks write their output, when they do: they
    /// hand on no blocks.
    write: Option<Arc<WriteTarget>>,
}

impl ClusterExchangeOp {
    pub(crate) fn new(
        cluster: Cluster,
        inputs: Vec<Arc<BlockQueue>>,
        work: Arc<dyn ExchangeWork>,
        premapped: Vec<bool>,
        write: Option<Arc<WriteTarget>>,
        window: usize,
        first_seq: u64,
    ) -> Result<Self> {
        let n = inputs.len();
        let premapped: Vec<bool> = (0..n)
            .map(|i| premapped.get(i).copied().unwrap_or(false))
            .collect();
        // An input mapped below was sampled there (a sort over read splits).
        let sample = match premapped.iter().any(|p| *p) {
            true => None,
            false => work.sample_task()?,
        };
        let reorders = work.block_order(0).is_some();
        let one_input = sample.is_some() || work.needs_row_count() || reorders;
        if one_input && n != 1 {
            return Err(VolleyError::internal(
                "a sampled, counted or reordering exchange has exactly one input",
            ));
        }
        if premapped.iter().any(|p| *p) && one_input {
            return Err(VolleyError::internal(
                "a sampled, counted or reordering exchange maps its blocks itself",
            ));
        }
        let deciding = work.broadcast_limit().is_some();
        if deciding && n != 2 {
            return Err(VolleyError::internal(
                "a join that may broadcast has exactly two inputs",
            ));
        }
        let holds = one_input || deciding;
        Ok(Self {
            cluster,
            prepared: if holds { None } else { Some(vec![]) },
            sample,
            reorders,
            kept: Vec::new(),
            reordered: None,
            deciding,
            bytes: vec![0; n],
            broadcast: None,
            work,
            input_done: vec![false; n],
            rows: vec![0; n],
            firsts: vec![Vec::new(); n],
            mapped: vec![0; n],
            premapped,
            progress: Arc::new(Mutex::new(Progress {
                maps: vec![Vec::new(); n],
                held: vec![Vec::new(); n],
                ..Progress::default()
            })),
            inputs,
            next_reduce: 0,
            reduce_inputs: None,
            first_seq,
            window: window.max(1),
            estimate: Arc::default(),
            write,
        })
    }

    /// Takes the blocks that arrived: each is held, and sampled or mapped at once.
    fn take_input(&mut self, cx: &StepContext<'_>) {
        for side in 0..self.inputs.len() {
            while !self.input_done[side] {
                let (object, meta) = match self.inputs[side].try_pop_block() {
                    // The block's charge on the object-store budget ends here: it rests
                    // in its node's store (which spills it) until it is mapped, and
                    // holding it back must not stop the stages feeding this one.
                    Ok(PoppedBlock::Block(Block::Remote(r))) => (r.object.clone(), r.meta.clone()),
                    Ok(PoppedBlock::Block(Block::Local(b))) => match cx.put_block(b) {
                        Ok(r) => (r.object.clone(), r.meta.clone()),
                        Err(e) => {
                            cx.fail(e);
                            self.input_done[side] = true;
                            break;
                        }
                    },
                    Ok(PoppedBlock::Empty) => break,
                    Ok(PoppedBlock::Done) | Err(_) => {
                        self.input_done[side] = true;
                        break;
                    }
                };
                if self.reorders {
                    self.kept.push((object, meta));
                    continue;
                }
                let first_row = self.rows[side];
                self.rows[side] += meta.rows;
                self.bytes[side] += meta.bytes;
                self.firsts[side].push(first_row);
                if self.premapped[side] {
                    self.take_map_output(side, object, meta);
                    continue;
                }
                let index = {
                    let mut p = self.progress.lock().expect("exchange lock");
                    p.held[side].push(Some(object.clone()));
                    p.maps[side].push(None);
                    if self.sample.is_some() {
                        p.samples.push(None);
                    }
                    p.held[side].len() - 1
                };
                match (&self.sample, &self.prepared) {
                    (Some(task), _) => self.submit_sample(cx, task.clone(), index, object),
                    (None, Some(prepared)) => {
                        let prepared = prepared.clone();
                        self.submit_map(cx, side, index, first_row, &prepared, object);
                    }
                    // Held until the whole input is counted.
                    (None, None) => {}
                }
            }
        }
    }

    /// A block of an input the stage below maps: it is a map output already. A join
    /// deciding whether to broadcast (or broadcasting) holds it as a block too, which
    /// a broadcast task reads whole (every partition: all of its rows).
    fn take_map_output(&mut self, side: usize, object: ObjectRef, meta: ObjectMeta) {
        let mut p = self.progress.lock().expect("exchange lock");
        let as_block = self.deciding || self.broadcast.is_some();
        p.held[side].push(as_block.then(|| object.clone()));
        if self.broadcast.is_some() {
            p.maps[side].push(None);
        } else {
            p.maps[side].push(Some((object, meta)));
            p.maps_done += 1;
            self.mapped[side] += 1;
        }
    }

    fn submit_sample(
        &self,
        cx: &StepContext<'_>,
        task: EncodedTask,
        index: usize,
        block: ObjectRef,
    ) {
        let progress = Arc::clone(&self.progress);
        submit_sample(
            cx,
            &self.cluster,
            format!("sampling a block for {}", cx.name),
            (&task, &[&block], &options(cx, "sample")),
            move |batches| progress.lock().expect("exchange lock").samples[index] = Some(batches),
        );
    }

    fn submit_map(
        &mut self,
        cx: &StepContext<'_>,
        side: usize,
        index: usize,
        first_row: u64,
        prepared: &[u8],
        block: ObjectRef,
    ) {
        self.mapped[side] += 1;
        let work = cx.background_work(format!("a map task of {}", cx.name));
        let task = match self.work.map_task(side, first_row, prepared) {
            Ok(t) => t,
            Err(e) => return work.finish(Err(e)),
        };
        match self
            .cluster
            .submit_encoded(&task, &[&block], &options(cx, "map"))
        {
            Ok(object) => {
                let progress = Arc::clone(&self.progress);
                let output = object.clone();
                cx.watch().add(
                    object,
                    Box::new(move |meta| {
                        work.finish(meta.map(|meta| {
                            let mut p = progress.lock().expect("exchange lock");
                            p.maps[side][index] = Some((output, meta));
                            p.maps_done += 1;
                            // Mapped: the block goes (the head keeps its lineage).
                            if let Some(held) = p.held.get_mut(side).and_then(|h| h.get_mut(index))
                            {
                                *held = None;
                            }
                        }));
                    }),
                );
            }
            Err(e) => work.finish(Err(e)),
        }
    }

    /// Once every block is sampled (or counted): the boundaries, then a map task for
    /// every block.
    fn map_sampled(&mut self, cx: &StepContext<'_>) {
        let samples = {
            let p = self.progress.lock().expect("exchange lock");
            if p.samples.iter().any(Option::is_none) {
                return;
            }
            p.samples
                .iter()
                .flatten()
                .flatten()
                .cloned()
                .collect::<Vec<_>>()
        };
        let prepared = match self.work.prepare(samples, self.rows[0]) {
            Ok(p) => p,
            Err(e) => {
                cx.fail(e.context(format!("choosing the partitions of {}", cx.name)));
                self.prepared = Some(vec![]);
                return;
            }
        };
        let blocks = self.progress.lock().expect("exchange lock").held[0].clone();
        let firsts = self.firsts[0].clone();
        for (i, (block, first_row)) in blocks.into_iter().zip(firsts).enumerate() {
            if let Some(block) = block {
                self.submit_map(cx, 0, i, first_row, &prepared, block);
            }
        }
        self.prepared = Some(prepared);
    }

    /// Once a join's right side is all made and small enough (and has rows): a
    /// broadcast; once it is done or past the limit otherwise: map tasks for every
    /// block held so far on both sides (later ones are mapped as they come). `false`
    /// when the exchange cannot go on (the execution fails).
    fn decide(&mut self, cx: &StepContext<'_>) -> bool {
        self.deciding = false;
        let limit = self.work.broadcast_limit().unwrap_or(0);
        let (left, right) = {
            let p = self.progress.lock().expect("exchange lock");
            (p.held[0].clone(), p.held[1].clone())
        };
        if self.input_done[1] && self.rows[1] > 0 && self.bytes[1] <= limit {
            let right: Vec<ObjectRef> = right.into_iter().flatten().collect();
            // The map outputs made below are read whole, as blocks, by the broadcast
            // tasks: none is reduced.
            {
                let mut p = self.progress.lock().expect("exchange lock");
                for side in 0..2 {
                    if self.premapped[side] {
                        let made = p.maps[side].iter().filter(|m| m.is_some()).count();
                        p.maps[side].iter_mut().for_each(|m| *m = None);
                        p.maps_done -= made;
                        self.mapped[side] -= made;
                    }
                }
            }
            return match self.cluster.object_group(&right.iter().collect::<Vec<_>>()) {
                Ok(group) => {
                    self.broadcast = Some(Broadcast {
                        group,
                        blocks: right.len(),
                        next: 0,
                    });
                    true
                }
                Err(e) => {
                    cx.fail(e.context(format!("naming the right side of {}", cx.name)));
                    false
                }
            };
        }
        self.prepared = Some(vec![]);
        for (side, blocks) in [left, right].into_iter().enumerate() {
            if self.premapped[side] {
                // Map outputs already: no longer held as blocks.
                let mut p = self.progress.lock().expect("exchange lock");
                p.held[side].iter_mut().for_each(|h| *h = None);
                continue;
            }
            let firsts = self.firsts[side].clone();
            for (i, (block, first_row)) in blocks.into_iter().zip(firsts).enumerate() {
                if let Some(block) = block {
                    self.submit_map(cx, side, i, first_row, &[], block);
                }
            }
        }
        true
    }

    /// A broadcast join: a task per left block, with the whole right side; done once
    /// the left input is over and each of its blocks has its task.
    fn step_broadcast(&mut self, cx: &StepContext<'_>) -> bool {
        let Some(b) = self.broadcast.as_mut() else {
            return true;
        };
        let blocks = self.progress.lock().expect("exchange lock").held[0].len();
        let right_bytes = self.bytes[1];
        while b.next < blocks && cx.running() < self.window {
            let (left, left_bytes) = {
                let p = self.progress.lock().expect("exchange lock");
                (
                    p.held[0][b.next].clone(),
                    self.bytes[0] / blocks.max(1) as u64,
                )
            };
            let Some(left) = left else {
                cx.fail(VolleyError::internal(format!(
                    "{}: left block {} was let go before its task",
                    cx.name, b.next
                )));
                return true;
            };
            let expected = Expected {
                estimate: &self.estimate,
                input: left_bytes + right_bytes,
                node: None,
            };
            if !cx.store_room(&expected) {
                break;
            }
            let i = b.next;
            b.next += 1;
            let seq = self.first_seq + i as u64;
            cx.out.register(seq);
            cx.counters.tasks_total.fetch_add(1, Ordering::Relaxed);
            let work = cx.remote_work(
                seq,
                format!("broadcast join task {i} of {}", cx.name),
                Some(expected),
            );
            let task = self.work.broadcast_task(b.blocks);
            let parts = [
                TaskInput::Object(&left, None),
                TaskInput::Group(&b.group, None),
            ];
            submit_output(
                &self.cluster,
                cx,
                work,
                task,
                &parts,
                options(cx, "broadcast join"),
                &self.progress,
                self.write.as_ref(),
                // Its left block is read: the node may let it go.
                move |p| {
                    if let Some(held) = p.held.first_mut().and_then(|h| h.get_mut(i)) {
                        *held = None;
                    }
                },
            );
        }
        self.input_done[0] && b.next >= blocks
    }

    /// Hands the input blocks on, as they are and where they are, in the order the
    /// work chooses, as the object-store budget has room for them; `true` once all
    /// are.
    fn emit_reordered(&mut self, cx: &StepContext<'_>) -> bool {
        if self.reordered.is_none() {
            let mut kept: Vec<Option<_>> = std::mem::take(&mut self.kept)
                .into_iter()
                .map(Some)
                .collect();
            let order = self.work.block_order(kept.len()).unwrap_or_default();
            let reordered: Option<VecDeque<_>> = order
                .iter()
                .map(|&from| kept.get_mut(from).and_then(Option::take))
                .collect();
            match reordered {
                Some(r) if r.len() == kept.len() => self.reordered = Some(r),
                _ => {
                    cx.fail(VolleyError::internal(format!(
                        "{} chose an order that is not one of its {} blocks",
                        cx.name,
                        kept.len()
                    )));
                    return true;
                }
            }
        }
        let reordered = self.reordered.as_mut().expect("set above");
        while let Some((_, meta)) = reordered.front() {
            let node = meta.addresses.first().map(String::as_str);
            if !(cx.store_has_room(meta.bytes, node) || cx.may_pass_full_budget()) {
                return false;
            }
            let (object, meta) = reordered.pop_front().expect("looked at above");
            let seq = self.first_seq + self.next_reduce as u64;
            self.next_reduce += 1;
            cx.out.register(seq);
            let (rows, bytes) = (meta.rows as usize, meta.bytes as usize);
            let pushed = cx
                .out
                .push_now(seq, Block::Remote(RemoteBlock::new(object, meta)));
            cx.out.finish_seq(seq);
            match pushed {
                Ok(()) => cx.counters.output(rows, bytes),
                Err(e) if e.is_cancelled() => return true,
                Err(e) => {
                    cx.fail(e);
                    return true;
                }
            }
        }
        true
    }

    /// Submits the reduce tasks that may start now.
    fn reduce(&mut self, cx: &StepContext<'_>) {
        let partitions = self.work.partitions();
        if self.next_reduce >= partitions {
            return;
        }
        // Gathered once, when the last map task is done: the map outputs' references
        // move here.
        if self.reduce_inputs.is_none() {
            let mut p = self.progress.lock().expect("exchange lock");
            let sides = p.maps.iter().map(Vec::len).collect();
            let done: Vec<(ObjectRef, ObjectMeta)> = std::mem::take(&mut p.maps)
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            drop(p);
            let group = match self
                .cluster
                .object_group(&done.iter().map(|(o, _)| o).collect::<Vec<_>>())
            {
                Ok(g) => g,
                Err(e) => {
                    cx.fail(e.context(format!("naming the map outputs of {}", cx.name)));
                    self.next_reduce = partitions;
                    return;
                }
            };
            self.reduce_inputs = Some(ReduceInputs {
                bytes: done.iter().map(|(_, m)| m.bytes).sum(),
                group,
                sides,
            });
        }
        let inputs = self.reduce_inputs.as_ref().expect("gathered above");
        let (group, sides, bytes) = (inputs.group.clone(), inputs.sides.clone(), inputs.bytes);
        while self.next_reduce < partitions && cx.running() < self.window {
            let expected = Expected {
                estimate: &self.estimate,
                input: bytes / partitions as u64,
                node: None,
            };
            if !cx.store_room(&expected) {
                break;
            }
            let p = self.next_reduce;
            self.next_reduce += 1;
            let seq = self.first_seq + p as u64;
            cx.out.register(seq);
            let work = cx.remote_work(
                seq,
                format!("reduce task {p} of {}", cx.name),
                Some(expected),
            );
            let task = self.work.reduce_task(p, &sides);
            let parts = [TaskInput::Group(&group, Some(p as u32))];
            submit_output(
                &self.cluster,
                cx,
                work,
                task,
                &parts,
                // Named by its partition: a write's part files follow the partitions'
                // order (a sort's key ranges).
                options(cx, "reduce")
                    .name(bundle_task_name(&format!("{} (reduce)", cx.name), p as u64)),
                &self.progress,
                self.write.as_ref(),
                |_| {},
            );
        }
        if self.next_reduce >= partitions {
            // Every reduce task is submitted: the head holds the map outputs for
            // them (the group's readers) and frees them when the last is done.
            self.reduce_inputs = None;
        }
    }
}

/// The options of the exchange's `what` tasks (one CPU each).
fn options(cx: &StepContext<'_>, what: &str) -> TaskOptions {
    TaskOptions::default()
        .resources(Resources::cpus(1.0))
        .name(format!("{} ({what})", cx.name))
}

/// Submits a task whose output goes on as a block of the exchange's output (a reduce
/// or broadcast task; an empty output makes no block), counted by `work`; `then` runs
/// on the exchange's progress when it ends.
#[allow(clippy::too_many_arguments)]
fn submit_output(
    cluster: &Cluster,
    cx: &StepContext<'_>,
    work: RemoteWork,
    task: Result<EncodedTask>,
    parts: &[TaskInput<'_>],
    options: TaskOptions,
    progress: &Arc<Mutex<Progress>>,
    write: Option<&Arc<WriteTarget>>,
    then: impl FnOnce(&mut Progress) + Send + 'static,
) {
    let task = match task {
        Ok(t) => t,
        Err(e) => return work.abandon(e),
    };
    match cluster.submit_selected(&task, parts, &options) {
        Ok(object) => {
            let (cluster, progress) = (cluster.clone(), Arc::clone(progress));
            let write = write.cloned();
            let output = object.clone();
            cx.watch().add(
                object,
                Box::new(move |meta| {
                    let block = match meta {
                        Ok(m) if m.rows == 0 && write.is_none() => Ok(None),
                        meta => task_result(&cluster, write.as_ref(), output, meta, &work),
                    };
                    work.finish(block);
                    then(&mut progress.lock().expect("exchange lock"));
                }),
            );
        }
        Err(e) => work.abandon(e),
    }
}

impl Operator for ClusterExchangeOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        if cx.stopping {
            self.input_done.iter_mut().for_each(|d| *d = true);
            return true;
        }
        self.take_input(cx);
        let past_limit = self.bytes.get(1).copied().unwrap_or(0)
            > self.work.broadcast_limit().unwrap_or(u64::MAX);
        if self.deciding && (self.input_done[1] || past_limit) && !self.decide(cx) {
            return true;
        }
        if self.broadcast.is_some() {
            return self.step_broadcast(cx);
        }
        if !self.input_done.iter().all(|d| *d) {
            return false;
        }
        if self.reorders {
            return self.emit_reordered(cx);
        }
        if self.firsts.iter().all(Vec::is_empty) && !self.work.makes_rows_from_none() {
            // Nothing came in: nothing goes out.
            return true;
        }
        if self.prepared.is_none() {
            self.map_sampled(cx);
            if self.prepared.is_none() {
                return false;
            }
        }
        let blocks: usize = self.mapped.iter().sum();
        if self.progress.lock().expect("exchange lock").maps_done < blocks {
            return false;
        }
        self.reduce(cx);
        self.next_reduce >= self.work.partitions()
    }
}
