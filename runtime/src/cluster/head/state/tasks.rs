//! Tasks: the queue of those waiting for room, where each goes, the reports of their
//! attempts, and retries.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use tracing::{info, warn};
use volley_common::{ErrorReport, Result, VolleyError};

use super::super::super::metrics::TaskEnd;
use super::super::super::resources::Resources;
use super::super::JobTask;
use super::*;

/// How many tasks may wait ahead on a node per running task of the same CPUs, at least:
/// two keep a worker that finishes from waiting while the head's next one is on its way.
const AHEAD_PER_SLOT: usize = 2;

/// At most this many per slot, for the shortest tasks.
const MAX_AHEAD_PER_SLOT: usize = 128;

/// How much work (by the job's tasks' average time) may wait ahead per slot: enough that
/// a node keeps busy while its reports go to the head in batches (a node holds a report
/// up to [`crate::cluster::node`]'s linger, half of this, while more tasks wait
/// there), so the head handles a batch of short tasks per message instead of one. At
/// 10 ms here and a 2 ms linger, 10,000 no-op tasks on two one-CPU nodes cost the head
/// ~0.25 s of CPU; at 40 ms and 8 ms, ~0.17 s, and the job ends ~13% sooner (the
/// linger is 20 ms now: see the node's `REPORT_LINGER`).
const AHEAD_WORK: Duration = Duration::from_millis(40);

/// How many task names of a job have their time kept: a job naming each task
/// differently keeps the first ones', and its others wait ahead as unknown ones do.
pub(super) const TIMED_NAMES: usize = 64;

/// How many tasks of a job whose tasks take `task_seconds` (on average, if known) may
/// wait ahead per slot: [`AHEAD_PER_SLOT`] for tasks of 20 ms and more, up to
/// [`MAX_AHEAD_PER_SLOT`] for shorter ones. Few tasks of seconds wait on a node, so
/// a node that joins or frees room soon still gets its share.
pub(super) fn ahead_per_slot(task_seconds: Option<f64>) -> usize {
    match task_seconds {
        Some(t) if t > 0.0 => ((AHEAD_WORK.as_secs_f64() / t).ceil() as usize)
            .clamp(AHEAD_PER_SLOT, MAX_AHEAD_PER_SLOT),
        _ => AHEAD_PER_SLOT,
    }
}

/// Whether `req`, placed on node `n`, would take some of what `holder` waits for
/// there: a resource both ask for, of which the node would then have less free than
/// `holder` asks (a request that leaves it room enough, or takes none of it, passes).
fn takes_what_it_lacks(holder: &Resources, n: &Node, req: &Resources) -> bool {
    let eps = 1e-9;
    let a = &n.available;
    let short = |asks: f64, takes: f64, free: f64| takes > 0.0 && asks > free - takes + eps;
    short(holder.num_cpus, req.num_cpus, a.num_cpus)
        || (req.num_gpus > 0.0 && holder.num_gpus > 0.0 && {
            let mut gpus = n.gpus.clone();
            holder.num_gpus > a.num_gpus - req.num_gpus + eps
                || gpus.take(req.num_gpus).is_none()
                || gpus.take(holder.num_gpus).is_none()
        })
        || (req.memory > 0 && holder.memory > a.memory.saturating_sub(req.memory))
        || holder.custom.iter().any(|(k, v)| {
            let takes = req.custom.get(k).copied().unwrap_or(0.0);
            short(*v, takes, a.custom.get(k).copied().unwrap_or(0.0))
        })
}

/// The tasks waiting for room, in submission order (retries first).
///
/// Tasks that ask for CPUs alone (no GPUs, memory, custom resources, placement group
/// or actor) wait apart from the rest: they compare by one number, so a scheduling
/// pass stops at the first such task that finds no room once no waiting one asks for
/// less (placing tasks only takes room away). A pass then costs what it places, not
/// the length of the queue: a driver that submits tens of thousands of small tasks
/// would otherwise pay for every one of them on every event.
#[derive(Default)]
pub(super) struct TaskQueue {
    /// CPU-only tasks and the CPUs each asks for.
    pub(super) cpu: VecDeque<(String, f64)>,
    /// At most the smallest request in `cpu` (reset when it empties).
    pub(super) cpu_min: f64,
    /// Every other task.
    pub(super) other: VecDeque<String>,
}

impl TaskQueue {
    pub(super) fn push(&mut self, id: String, cpu_only: Option<f64>, first: bool) {
        match cpu_only {
            Some(c) => {
                if self.cpu.is_empty() {
                    self.cpu_min = c;
                }
                self.cpu_min = self.cpu_min.min(c);
                if first {
                    self.cpu.push_front((id, c));
                } else {
                    self.cpu.push_back((id, c));
                }
            }
            None if first => self.other.push_front(id),
            None => self.other.push_back(id),
        }
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.cpu.retain(|(id, _)| keep(id));
        self.other.retain(|id| keep(id));
    }
}

/// Times a task may wait for an input it could not read to be made again (its node
/// died or was cut off) before such a loss uses one of its retries.
const MAX_INPUT_LOSSES: u32 = 8;

/// Most tasks of a job [`State::job_tasks`] lists.
pub const JOB_TASKS_SHOWN: usize = 2000;

/// How long a job's tasks keep off a node that could not start the job's workers (as
/// long as the node itself starts none for the job after repeated failures): their
/// retries go to the other nodes instead of failing there again.
pub(super) const NO_WORKER_PAUSE: Duration = Duration::from_secs(30);

/// Times a task may be handed back for want of a worker before that uses one of its
/// retries (each time it goes to another node, or fails once no node is left).
pub(super) const MAX_NO_WORKER: u32 = 8;

impl JobEntry {
    /// The nodes that could not start its workers within the last
    /// [`NO_WORKER_PAUSE`] (`(node, with GPUs)`), each with why.
    fn recent_no_workers(&self) -> impl Iterator<Item = (&(String, bool), &String)> {
        self.no_workers
            .iter()
            .filter(|(_, (at, _))| at.elapsed() < NO_WORKER_PAUSE)
            .map(|(key, (_, why))| (key, why))
    }
}

impl State {
    /// Places the waiting tasks that can run now.
    pub(super) fn place_tasks(&mut self) {
        // Tasks holding a node go first: a task ahead of one in the queue may find no
        // room only because of its hold, and end the pass before it.
        if !self.holds.is_empty() {
            let holders: Vec<String> = self.holds.keys().cloned().collect();
            for id in holders {
                if self.try_start(&id) {
                    self.queue.retain(|q| q != id);
                }
            }
        }
        // The tasks that found no room (or were not tried for want of it) since the
        // last one placed in this pass: one placed after them passed them over.
        let mut unplaced: Vec<String> = Vec::new();
        let other = std::mem::take(&mut self.queue.other);
        let mut room_awaited = false;
        for id in other {
            if self.try_start(&id) {
                self.placed_past(&id, &mut unplaced);
            } else {
                unplaced.push(id.clone());
                room_awaited = room_awaited
                    || self.tasks.get(&id).is_none_or(|t| {
                        t.spec.actor.is_some()
                            || t.spec.bundle.is_some()
                            || self.fits_some_node(&t.spec.resources)
                    });
                self.queue.other.push_back(id);
            }
        }
        // Tasks ahead take freed CPUs first: none go ahead while anything else waits
        // for room a node could give it. What no node could hold even empty does not
        // count (it waits for a bigger node to join, and would hold tasks back for as
        // long).
        self.ahead_allowed = !room_awaited
            && !self
                .waiting_actors()
                .any(|a| a.spec.bundle.is_some() || self.fits_some_node(&a.spec.resources))
            && !self
                .waiting_jobs()
                .any(|(_, j)| self.fits_some_node(&j.resources))
            && !self
                .groups
                .values()
                .any(|g| !g.ready && self.job_active(&g.job) && self.group_fits_nodes(g));
        // The smallest CPU-only request that found no room in this pass: a task asking
        // at least as much cannot fit either.
        let mut no_room_at = f64::INFINITY;
        let mut passed = Vec::new();
        while let Some((id, cpus)) = self.queue.cpu.pop_front() {
            if no_room_at <= self.queue.cpu_min {
                self.queue.cpu.push_front((id, cpus));
                break;
            }
            if cpus >= no_room_at {
                // Not tried (something no bigger found no room).
                unplaced.push(id.clone());
                passed.push((id, cpus));
                continue;
            }
            if self.try_start(&id) {
                self.placed_past(&id, &mut unplaced);
            } else {
                if self.tasks.get(&id).is_some_and(|t| self.waits_for_room(t)) {
                    no_room_at = no_room_at.min(cpus);
                }
                unplaced.push(id.clone());
                passed.push((id, cpus));
            }
        }
        for q in passed.into_iter().rev() {
            self.queue.cpu.push_front(q);
        }
    }

    /// Whether `task`, unplaced, waits for room: not for an input, a store with room,
    /// the node holding its input, a node that can start its job's workers, its actor
    /// or its placement group.
    fn waits_for_room(&self, task: &TaskEntry) -> bool {
        task.spec.actor.is_none()
            && task.spec.bundle.is_none()
            && self.inputs_ready(task)
            && !self.kept_off_full_store(task)
            && self.input_holder(task).is_none()
            && !self.avoids_nodes(&task.spec.job_id)
    }

    /// Task `id` left the queue: if it runs now, the tasks in `unplaced` (that found
    /// no room before it in this pass) were passed over, and may hold a node once they
    /// have waited long enough ([`Self::hold_node_for`]).
    fn placed_past(&mut self, id: &str, unplaced: &mut Vec<String>) {
        if unplaced.is_empty()
            || !matches!(
                self.tasks.get(id).map(|t| &t.state),
                Some(TaskState::Running { .. })
            )
        {
            return;
        }
        // Those that wait for room, not for an input, a store, a node or an actor
        // (looked at only now: most passes place nothing past a task).
        let passed: Vec<String> = unplaced
            .drain(..)
            .filter(|u| {
                self.tasks
                    .get(u)
                    .is_some_and(|t| !t.passed_over && self.waits_for_room(t))
            })
            .collect();
        for u in passed {
            if let Some(t) = self.tasks.get_mut(&u) {
                t.passed_over = true;
            }
        }
    }

    /// Puts task `id` in the queue, first (a retry) or last.
    pub(super) fn enqueue(&mut self, id: String, first: bool) {
        let cpu_only = self.tasks.get(&id).and_then(|t| t.cpu_only());
        self.queue.push(id, cpu_only, first);
    }

    /// Whether every input of `task` has a live copy.
    pub(super) fn inputs_ready(&self, task: &TaskEntry) -> bool {
        task.spec
            .args
            .iter()
            .flat_map(|a| self.arg_objects(a))
            .all(|a| !self.object_addresses(a).is_empty())
    }

    /// Starts task `id` if it can run; returns true when it left the queue.
    pub(super) fn try_start(&mut self, id: &str) -> bool {
        let Some(task) = self.tasks.get(id) else {
            return true;
        };
        if task.state != TaskState::Pending {
            return true;
        }
        if !self.job_active(&task.spec.job_id) {
            self.fail_task(id, cancelled_report("its job is not running"));
            return true;
        }
        if let Some(b) = task
            .spec
            .bundle
            .as_ref()
            .filter(|b| !self.groups.contains_key(&b.group))
        {
            let why = format!("its placement group {} was removed", b.group);
            self.fail_task(id, execution_report(why));
            return true;
        }
        // Inputs: all present, or one failed for good. A group stands for each of its
        // objects, with the same batch.
        let mut args = Vec::new();
        let mut missing = false;
        let inputs: Vec<(String, Option<u32>)> = task
            .spec
            .args
            .iter()
            .enumerate()
            .flat_map(|(i, a)| {
                let batch = task.spec.arg_batches.get(i).copied().flatten();
                self.arg_objects(a).map(move |a| (a.clone(), batch))
            })
            .collect();
        for (a, batch) in inputs {
            let a = &a;
            match self.objects.get(a) {
                None => {
                    self.fail_task(
                        id,
                        execution_report(format!("input object {a} was freed or never existed")),
                    );
                    return true;
                }
                Some(o) if o.error.is_some() => {
                    let e = o
                        .error
                        .clone()
                        .unwrap_or_else(|| execution_report(""))
                        .with_context(format!("input object {a} failed"));
                    self.fail_task(id, e);
                    return true;
                }
                Some(o) => {
                    let addresses = self.object_addresses(a);
                    if addresses.is_empty() {
                        // Let go with only its lineage kept (named by a task submitted
                        // since): made again, as for a lost copy; every such input at
                        // once.
                        if o.lineage_only {
                            self.make_again(a, &format!("was let go and task {id} reads it"));
                        }
                        missing = true;
                        continue;
                    }
                    if missing {
                        // It waits anyway: only the other inputs' state matters now.
                        continue;
                    }
                    args.push(ObjectLocation {
                        object_id: a.clone(),
                        addresses,
                        bytes: o.bytes,
                        rows: o.rows,
                        inline: o.inline.clone().unwrap_or_default(),
                        batch,
                    });
                }
            }
        }
        if missing {
            // It waits for its inputs now, not for room: it holds no node meanwhile,
            // and waits anew once they are back.
            let task = self.tasks.get_mut(id).expect("looked up above");
            task.passed_over = false;
            if self.holds.remove(id).is_some() {
                task.ready_since = None;
            }
            return false;
        }
        let task = self.tasks.get_mut(id).expect("looked up above");
        task.ready_since.get_or_insert_with(Instant::now);
        let task = &self.tasks[id];
        // Actor calls go where the actor lives; it holds the resources.
        if let Some(actor) = task.spec.actor.clone() {
            let node = match self.actors.get(&actor).map(|a| &a.state) {
                Some(ActorState::Alive { node }) => node.clone(),
                Some(ActorState::Dead(e)) => {
                    let e = format!("actor {actor} is dead: {e}");
                    self.fail_task(id, execution_report(e));
                    return true;
                }
                None => {
                    let e = format!("no actor {actor}");
                    self.fail_task(id, execution_report(e));
                    return true;
                }
                _ => return false,
            };
            let gpus = self.actors[&actor].gpus.clone();
            return self.dispatch(id, node, gpus, None, args, false);
        }
        let resources = task.spec.resources.clone();
        let cpu_only = task.cpu_only().filter(|c| *c > 0.0 && self.ahead_allowed);
        let arg_ids: Vec<String> = task
            .spec
            .args
            .iter()
            .flat_map(|a| self.arg_objects(a))
            .cloned()
            .collect();
        let source = self.waits_for_store(task);
        let (holder, wait_left) = self.input_holder(task).unzip();
        let avoid = self.nodes_without_workers(&task.spec.job_id, task.uses_gpus());
        let placement = match task.spec.bundle.clone() {
            None => self
                .pick_node(
                    &resources,
                    &arg_ids,
                    &HashMap::new(),
                    source,
                    holder.as_deref(),
                    &avoid,
                    Some(id),
                )
                .map(|(node, gpus)| (node, gpus, None)),
            Some(choice) => self.take_from_bundle(&choice, &resources),
        };
        if let Some((node, gpus, bundle)) = placement {
            return self.dispatch(id, node, gpus, bundle, args, false);
        }
        // Looked up only for a task that may go ahead: most placements do not need it.
        let depth = self.ahead_depth(id);
        let ahead = cpu_only
            .and_then(|_| self.pick_ahead(&resources, source, depth, holder.as_deref(), &avoid))
            .filter(|node| wait_left.is_none_or(|left| self.ahead_ends_within(id, node, left)));
        if let Some(node) = ahead {
            return self.dispatch(id, node, vec![], None, args, true);
        }
        if self.tasks[id].spec.bundle.is_none() {
            self.hold_node_for(id, holder.as_deref(), &avoid, source);
        }
        // Every node that could hold it has just failed to start its job's workers:
        // it fails now, saying why, instead of waiting for one of them to try again.
        if !avoid.is_empty() && self.tasks[id].spec.bundle.is_none() {
            let elsewhere = self.nodes.iter().any(|(n, node)| {
                node.takes_work()
                    && resources.fits_in(&node.total)
                    && !avoid.iter().any(|(a, _)| a == n)
            });
            if !elsewhere {
                let why: Vec<String> = avoid.into_iter().map(|(_, why)| why).collect();
                let e = format!("no node can start its job's workers: {}", why.join("; "));
                self.fail_task(id, execution_report(e));
                return true;
            }
        }
        false
    }

    /// The nodes that could not start job `job`'s workers (with GPUs, or without)
    /// within the last [`NO_WORKER_PAUSE`], each with why.
    pub(super) fn nodes_without_workers(&self, job: &str, gpus: bool) -> Vec<(String, String)> {
        self.jobs.get(job).map_or_else(Vec::new, |j| {
            j.recent_no_workers()
                .filter(|((_, g), _)| *g == gpus)
                .map(|((node, _), why)| (node.clone(), why.clone()))
                .collect()
        })
    }

    /// Whether some node could not start job `job`'s workers lately: its tasks may
    /// wait although a node has room.
    pub(super) fn avoids_nodes(&self, job: &str) -> bool {
        self.jobs
            .get(job)
            .is_some_and(|j| j.recent_no_workers().next().is_some())
    }

    /// Node `node` could not start a worker for task `id` (`why`): its job's tasks of
    /// its kind (with GPUs or without) keep off the node for [`NO_WORKER_PAUSE`]. The
    /// task runs again without using a retry, up to [`MAX_NO_WORKER`] times.
    fn no_worker_on(&mut self, node: &str, id: &str, why: &str) {
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        let (job, gpus) = (task.spec.job_id.clone(), task.uses_gpus());
        if let Some(j) = self.jobs.get_mut(&job) {
            j.no_workers
                .retain(|_, (at, _)| at.elapsed() < NO_WORKER_PAUSE);
            j.no_workers
                .insert((node.to_string(), gpus), (Instant::now(), why.to_string()));
        }
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if task.no_worker_bounces >= MAX_NO_WORKER {
            self.system_failure(id, why);
            return;
        }
        task.no_worker_bounces += 1;
        info!("task {id}: {why}; running it elsewhere");
        self.run_again(id, true);
    }

    /// Whether task `id`, sent ahead to `node`, would start there within `left`: the
    /// tasks of its size running or waiting ahead there, at the measured time of its
    /// job's tasks of its name, take less. A task ahead stays there, so one waiting for
    /// the node holding its input goes ahead only then (else it waits in the queue,
    /// where its wait can end); unmeasured tasks do not.
    fn ahead_ends_within(&self, id: &str, node: &str, left: Duration) -> bool {
        let Some(seconds) = self.measured_seconds(id) else {
            return false;
        };
        let t = &self.tasks[id];
        let Some(n) = self.nodes.get(node) else {
            return false;
        };
        let key = t.spec.resources.num_cpus.to_bits();
        let slots = n.slots.get(&key).copied().unwrap_or(0).max(1);
        let rounds = n.ahead.waiting(key) as f64 / slots as f64 + 1.0;
        seconds * rounds < left.as_secs_f64()
    }

    /// How many tasks like `id` (its job's, of its name) may wait ahead per slot
    /// ([`ahead_per_slot`], from their measured time).
    fn ahead_depth(&self, id: &str) -> usize {
        ahead_per_slot(self.measured_seconds(id))
    }

    /// The average time of the finished tasks of task `id`'s job and name, if any.
    fn measured_seconds(&self, id: &str) -> Option<f64> {
        let t = &self.tasks[id];
        self.jobs
            .get(&t.spec.job_id)
            .and_then(|j| j.task_seconds.get(&t.spec.name).copied())
    }

    /// Whether work asking for `req` may not go to node `node` for a task other than
    /// `task` that holds it ([`Self::hold_node_for`]): it would take some of what that
    /// task waits for there (CPUs, GPUs, memory or a custom resource it is short of).
    /// Work that takes none of it still goes there: CPU tasks beside a GPU task that
    /// waits for a GPU.
    fn held_from(&self, node: &str, task: Option<&str>, req: &Resources) -> bool {
        if self.holds.is_empty() {
            return false;
        }
        let Some(n) = self.nodes.get(node) else {
            return false;
        };
        self.holds.iter().any(|(t, held)| {
            held == node
                && task.is_none_or(|task| task != t)
                && self
                    .tasks
                    .get(t)
                    .is_some_and(|h| takes_what_it_lacks(&h.spec.resources, n, req))
        })
    }

    /// What node `node` will have free once the tasks holding room there end: its free
    /// room and theirs, and its GPUs with theirs given back (not what actors, drivers
    /// or placement groups hold).
    fn room_when_tasks_end(&self, node: &Node) -> (Resources, GpuSlots) {
        let mut room = node.available.clone();
        let mut gpus = node.gpus.clone();
        for t in node.running.iter().filter_map(|t| self.tasks.get(t)) {
            if !t.ahead && t.spec.actor.is_none() && t.bundle.is_none() {
                room.add(&t.spec.resources);
                if let TaskState::Running { gpus: ids, .. } = &t.state {
                    gpus.give(ids, t.spec.resources.num_gpus);
                }
            }
        }
        (room, gpus)
    }

    /// Task `id`, ready but without room, holds a node once it has waited
    /// [`STARVING_AFTER`] and work placed after it has passed it over (so a task that
    /// waits its turn among others of its size never holds one): the node that will
    /// hold it once its tasks end and has most CPUs free (the one it waits for,
    /// `only`, if any; none in `avoid`, none whose store is full for a `source`, none
    /// held for another task). No work that would take what it lacks there is placed
    /// or sent ahead there until it starts ([`Self::held_from`]), so a request for
    /// more than the others ask is not passed over for as long as smaller ones keep
    /// taking what frees. A hold that can no longer be met (its node left, or
    /// longer-lived work took the room it waited for) moves to another node, or goes.
    fn hold_node_for(
        &mut self,
        id: &str,
        only: Option<&str>,
        avoid: &[(String, String)],
        source: bool,
    ) {
        let task = &self.tasks[id];
        if !task.passed_over
            || task
                .ready_since
                .is_none_or(|since| since.elapsed() < STARVING_AFTER)
        {
            return;
        }
        let req = &task.spec.resources;
        let usable = |node_id: &str, n: &Node| {
            if !n.takes_work()
                || only.is_some_and(|o| o != node_id)
                || avoid.iter().any(|(a, _)| a == node_id)
                || (source && n.store_full())
            {
                return false;
            }
            let (room, mut gpus) = self.room_when_tasks_end(n);
            req.fits_in(&room) && gpus.take(req.num_gpus).is_some()
        };
        if let Some(held) = self.holds.get(id) {
            if self.nodes.get(held).is_some_and(|n| usable(held, n)) {
                return;
            }
        }
        let held_by_others: Vec<&String> = self
            .holds
            .iter()
            .filter(|(t, _)| t.as_str() != id)
            .map(|(_, n)| n)
            .collect();
        let choice = self
            .nodes
            .iter()
            .filter(|(node_id, n)| !held_by_others.contains(node_id) && usable(node_id, n))
            .max_by(|(a_id, a), (b_id, b)| {
                a.available
                    .num_cpus
                    .total_cmp(&b.available.num_cpus)
                    .then_with(|| b_id.cmp(a_id))
            })
            .map(|(node_id, _)| node_id.clone());
        match choice {
            Some(node) => {
                if self.holds.insert(id.to_string(), node.clone()).as_deref() != Some(&node) {
                    info!(
                        "task {id} was passed over for {STARVING_AFTER:?} or more: node {node} \
                         takes no work that would take what it lacks until it fits"
                    );
                }
            }
            None => {
                self.holds.remove(id);
            }
        }
    }

    /// A node to send a CPU-only task to ahead of room: one with fewer tasks of the
    /// same CPUs waiting ahead than `per_slot` ([`ahead_per_slot`]) per running task of
    /// those CPUs (the fewest waiting first). A worker that finishes such a task takes one ahead
    /// over at once, instead of idling while its report goes to the head and the next
    /// task comes back. Only tasks that will end count (not actors, drivers or
    /// placement groups), and a slot they free goes to the tasks ahead first
    /// ([`Self::promote_ahead`] runs before any other placement), so a task ahead
    /// never waits on something that holds its room for good.
    pub(super) fn pick_ahead(
        &self,
        req: &Resources,
        source: bool,
        per_slot: usize,
        only: Option<&str>,
        avoid: &[(String, String)],
    ) -> Option<String> {
        let key = req.num_cpus.to_bits();
        self.nodes
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == id.as_str()))
            .filter(|(id, _)| !avoid.iter().any(|(a, _)| a == *id))
            .filter(|(id, _)| !self.held_from(id, None, req))
            .filter(|(_, n)| n.takes_work() && !(source && n.store_full()))
            .filter_map(|(id, n)| {
                let slots = n.slots.get(&key).copied().unwrap_or(0);
                (n.ahead.waiting(key) < per_slot * slots).then_some((n.ahead.len(), id))
            })
            .min()
            .map(|(_, id)| id.clone())
    }

    /// Gives tasks sent ahead the room their nodes now have, oldest first.
    pub(super) fn promote_ahead(&mut self) {
        for n in self.nodes.values_mut().filter(|n| !n.ahead.is_empty()) {
            while let Some(id) = n.ahead.front() {
                let Some(task) = self.tasks.get_mut(id) else {
                    n.ahead.pop_front();
                    continue;
                };
                if !task.spec.resources.fits_in(&n.available) {
                    break;
                }
                n.hold_slot(task);
                let id = n.ahead.pop_front().expect("front exists");
                n.send(NodeCommand::PromoteTask(id));
            }
        }
    }

    /// Task `successor`, sent ahead, took over the slot of a task that just left
    /// `node`: it now holds the resources that task gave back.
    pub(super) fn take_over(&mut self, node: &str, successor: &str) {
        let Some(task) = self.tasks.get_mut(successor) else {
            return;
        };
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        let running_here = matches!(&task.state, TaskState::Running { node: at, .. } if at == node);
        if !task.ahead || !running_here || !task.spec.resources.fits_in(&n.available) {
            return;
        }
        n.hold_slot(task);
        n.ahead.remove(successor);
    }

    pub(super) fn dispatch(
        &mut self,
        id: &str,
        node: String,
        gpus: Vec<u32>,
        bundle: Option<BundleRef>,
        args: Vec<ObjectLocation>,
        ahead: bool,
    ) -> bool {
        if !self.holds.is_empty() {
            self.holds.remove(id);
        }
        let task = self.tasks.get_mut(id).expect("task exists");
        task.ahead = ahead;
        task.passed_over = false;
        task.sent_at = Instant::now();
        let slot = task.slot(ahead, &bundle);
        task.state = TaskState::Running {
            node: node.clone(),
            gpus: gpus.clone(),
        };
        task.bundle = bundle;
        let assignment = Assignment {
            task_id: id.to_string(),
            attempt: task.attempt,
            job_id: task.spec.job_id.clone(),
            payload: task.spec.payload.clone(),
            args,
            gpu_ids: gpus,
            actor: task.spec.actor.clone(),
            name: task.spec.name.clone(),
            ahead,
            num_cpus: task.spec.resources.num_cpus,
        };
        let n = self.nodes.get_mut(&node).expect("placed on a known node");
        n.running.insert(id.to_string());
        if ahead {
            n.ahead.push(id, task.spec.resources.num_cpus.to_bits());
        }
        if let Some(key) = slot {
            *n.slots.entry(key).or_default() += 1;
        }
        if !n.send(NodeCommand::RunTask(assignment)) {
            // The node went away between placement and now; the death handling will
            // requeue it.
            warn!("node {node} did not take task {id}");
        }
        true
    }

    /// Whether `task` is a source that [waits for a store](Self::waits_for_store) and
    /// would fit now on a node whose store is full (so it found no room for that
    /// reason, not for lack of CPUs).
    pub(super) fn kept_off_full_store(&self, task: &TaskEntry) -> bool {
        self.waits_for_store(task)
            && self.nodes.values().any(|n| {
                n.takes_work() && n.store_full() && task.spec.resources.fits_in(&n.available)
            })
    }

    /// The node `task` waits for: the live one holding most of its input's bytes, when
    /// it holds at least [`LOCAL_INPUT_BYTES`] more than any other node, could run the
    /// task, and the task has found its inputs for less time than those bytes would
    /// take to travel ([`TaskEntry::locality_wait`]). Until then it runs there (or
    /// waits ahead there), not on a node with room that would fetch them: a 150 MB
    /// block fetched between two agents of the development machine took a map task
    /// from 0.35 s to 1.7 s. Delay scheduling, as Spark's `spark.locality.wait`.
    ///
    /// A task reading one batch of an object (a reduce task: partition p of every map
    /// output) never waits: the head knows the object's bytes, not the batch's, and
    /// such inputs are spread over the nodes anyway. Nor does one that asks for more
    /// than CPUs (while it waits, no task goes ahead anywhere). Returns the node and
    /// how much longer the task may wait for it; it goes ahead there only if it would
    /// start in that time ([`Self::ahead_ends_within`]). Each scheduling pass tries a
    /// waiting task again (it does not stop the pass as a task without room does), so
    /// a pass costs the waiting tasks as well, for at most 3 s each.
    pub(super) fn input_holder(&self, task: &TaskEntry) -> Option<(String, Duration)> {
        let ready = task.ready_since?;
        if task.cpu_only().is_none() || task.spec.arg_batches.iter().any(Option::is_some) {
            return None;
        }
        let mut held: HashMap<&str, u64> = HashMap::new();
        for a in task.spec.args.iter().flat_map(|a| self.arg_objects(a)) {
            let Some(o) = self.objects.get(a) else {
                continue;
            };
            for l in &o.locations {
                *held.entry(l.as_str()).or_default() += o.bytes;
            }
        }
        let mut held: Vec<(&str, u64)> = held.into_iter().collect();
        // The most bytes first; of equals, the first name (the same choice every time).
        held.sort_by(|(a, x), (b, y)| y.cmp(x).then_with(|| a.cmp(b)));
        let (node, bytes) = *held.first()?;
        let saved = bytes - held.get(1).map_or(0, |(_, b)| *b);
        if saved < LOCAL_INPUT_BYTES {
            return None;
        }
        let left = TaskEntry::locality_wait(saved).checked_sub(ready.elapsed())?;
        let n = self.nodes.get(node)?;
        // Not a node that cannot start the job's workers: it would wait for nothing.
        let kept_off = self.jobs.get(&task.spec.job_id).is_some_and(|j| {
            j.recent_no_workers()
                .any(|((n, gpus), _)| !gpus && n == node)
        });
        (n.takes_work() && !kept_off && task.spec.resources.fits_in(&n.total))
            .then(|| (node.to_string(), left))
    }

    /// Whether `task` reads nothing (a source) and waits, for a while, for a node whose
    /// store has room rather than fill a [full](Node::store_full) one: while it has
    /// waited less than [`SOURCE_WAIT`] and some live node it could fit on has room.
    pub(super) fn waits_for_store(&self, task: &TaskEntry) -> bool {
        task.spec.args.is_empty()
            && task.pending_since.elapsed() < SOURCE_WAIT
            && self
                .nodes
                .values()
                .any(|n| n.takes_work() && !n.store_full() && task.spec.resources.fits_in(&n.total))
    }

    /// The best node for a task: one where it fits (for a `source`, a task that reads
    /// nothing, one whose store is not [full](Node::store_full)), holding most of its
    /// input bytes, then the one with the fewest of `crowd` (a count per node of what
    /// should spread), then the one whose object store is least full (by quarters of
    /// its memory: the task's output will be stored there, and a full store spills),
    /// then the one with the most CPUs free (spreading load). `only` names the one
    /// node it may be; the nodes in `avoid` (with why) it may not; nor a node held for
    /// a task other than `task` (none for a driver or an actor).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pick_node(
        &mut self,
        req: &Resources,
        args: &[String],
        crowd: &HashMap<String, usize>,
        source: bool,
        only: Option<&str>,
        avoid: &[(String, String)],
        task: Option<&str>,
    ) -> Option<(String, Vec<u32>)> {
        let mut best: Option<(u64, usize, u64, f64, u64, String)> = None;
        for (id, n) in &self.nodes {
            if only.is_some_and(|o| o != id) || !n.takes_work() || !req.fits_in(&n.available) {
                continue;
            }
            if self.held_from(id, task, req) {
                continue;
            }
            if avoid.iter().any(|(a, _)| a == id) {
                continue;
            }
            if source && n.store_full() {
                continue;
            }
            if req.num_gpus > 0.0 && n.gpus.clone().take(req.num_gpus).is_none() {
                continue;
            }
            let local: u64 = args
                .iter()
                .filter_map(|a| self.objects.get(a))
                .filter(|o| o.locations.contains(id))
                .map(|o| o.bytes)
                .sum();
            let free = n.available.num_cpus / n.total.num_cpus.max(1e-9);
            let many = crowd.get(id).copied().unwrap_or(0);
            let full = n.stored.saturating_mul(4) / n.object_store_memory.max(1);
            // Last, the fewest bytes stored: tasks submitted one at a time (a small
            // budget) spread their outputs instead of all going to the first node.
            let stored = n.stored;
            let better = match &best {
                None => true,
                Some((l, m, q, f, s, _)) => {
                    local > *l
                        || (local == *l && many < *m)
                        || (local == *l && many == *m && full < *q)
                        || (local == *l && many == *m && full == *q && free > *f + 1e-9)
                        || (local == *l
                            && many == *m
                            && full == *q
                            && (free - *f).abs() <= 1e-9
                            && stored < *s)
                }
            };
            if better {
                best = Some((local, many, full, free, stored, id.clone()));
            }
        }
        let (_, _, _, _, _, id) = best?;
        let n = self.nodes.get_mut(&id)?;
        let gpus = n.gpus.take(req.num_gpus)?;
        n.available.subtract(req);
        Some((id, gpus))
    }

    /// Room for `req` in a bundle of a placed group: the bundle chosen, or the first
    /// with room.
    pub(super) fn take_from_bundle(
        &mut self,
        choice: &BundleChoice,
        req: &Resources,
    ) -> Option<(String, Vec<u32>, Option<BundleRef>)> {
        let group = choice.group.as_str();
        let g = self.groups.get_mut(group)?;
        if !g.ready {
            return None;
        }
        let candidates: Vec<usize> = match choice.index {
            Some(i) => vec![i],
            None => (0..g.bundles.len()).collect(),
        };
        for i in candidates {
            let Some(b) = g.bundles.get_mut(i) else {
                continue;
            };
            if !req.fits_in(&b.available) {
                continue;
            }
            let Some(gpus) = b.gpus.take(req.num_gpus) else {
                continue;
            };
            b.available.subtract(req);
            let node = b.node.clone()?;
            if !self.nodes.get(&node).is_some_and(|n| n.takes_work()) {
                let b = &mut g.bundles[i];
                b.available.add(req);
                b.gpus.give(&gpus, req.num_gpus);
                return None;
            }
            return Some((node, gpus, Some((group.to_string(), i, g.generation))));
        }
        None
    }

    /// Gives a running task's (or actor's) resources back to its bundle, or to its node
    /// where it ran outside one or its bundle is gone (its group removed or placed
    /// again: the node kept what the bundle's work held, see `unplace_group`).
    pub(super) fn release(
        &mut self,
        node: &str,
        req: &Resources,
        gpus: &[u32],
        bundle: &Option<BundleRef>,
    ) {
        if let Some((g, i, generation)) = bundle {
            if let Some(b) = self
                .groups
                .get_mut(g)
                .filter(|g| g.generation == *generation)
                .and_then(|g| g.bundles.get_mut(*i))
            {
                b.available.add(req);
                b.gpus.give(gpus, req.num_gpus);
                return;
            }
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.available.add(req);
            n.gpus.give(gpus, req.num_gpus);
        }
    }

    /// Takes GPUs `ids` (`n` asked for) out of bundle `b`'s room, as a cancelled
    /// task's worker may still hold them; false if the bundle is gone (its group
    /// removed, or placed again: what it held went back to its node).
    pub(super) fn take_bundle_gpus(&mut self, b: &BundleRef, n: f64, ids: &[u32]) -> bool {
        let (group, index, generation) = b;
        let Some(bundle) = self
            .groups
            .get_mut(group)
            .filter(|g| g.generation == *generation)
            .and_then(|g| g.bundles.get_mut(*index))
        else {
            return false;
        };
        bundle.available.num_gpus -= n;
        bundle.gpus.hold(ids, n);
        true
    }

    /// A cancelled task's worker no longer holds the GPUs `c` held out of a bundle:
    /// the bundle takes them back (if it is still the one they came from).
    pub(super) fn return_bundle_gpus(&mut self, node: &str, c: CancelledGpus) {
        let Some(b) = &c.bundle else {
            return;
        };
        let req = Resources {
            num_gpus: c.n,
            ..Resources::default()
        };
        // (To node `node` if the bundle is gone since: it kept them when it was.)
        self.release(node, &req, &c.ids, &Some(b.clone()));
    }

    pub(super) fn finish_running(&mut self, id: &str) -> Option<String> {
        let task = self.tasks.get_mut(id)?;
        let TaskState::Running { node, gpus } = task.state.clone() else {
            return None;
        };
        task.state = TaskState::Pending;
        task.pending_since = Instant::now();
        task.ready_since = None;
        task.passed_over = false;
        let req = task.spec.resources.clone();
        let bundle = task.bundle.take();
        let is_call = task.spec.actor.is_some();
        let ahead = std::mem::take(&mut task.ahead);
        let slot = task.slot(ahead, &bundle);
        if let Some(n) = self.nodes.get_mut(&node) {
            n.running.remove(id);
            if ahead {
                n.ahead.remove(id);
            }
            if let Some(key) = slot {
                if let Some(c) = n.slots.get_mut(&key) {
                    *c = c.saturating_sub(1);
                }
            }
        }
        if !is_call && !ahead {
            self.release(&node, &req, &gpus, &bundle);
        }
        Some(node)
    }

    /// Queues a submitted task.
    pub fn submit(&mut self, spec: TaskSpec) -> Result<()> {
        spec.resources.validate()?;
        if !self.job_active(&spec.job_id) {
            return Err(
                VolleyError::Cancelled.context(format!("job {} is not running", spec.job_id))
            );
        }
        if self.tasks.contains_key(&spec.task_id) {
            // A driver submits a task again only to replay what a head before this
            // one knew: it is known here already.
            return Ok(());
        }
        if let Some(why) = spec
            .bundle
            .as_ref()
            .and_then(|b| self.bundle_refusal(b, &spec.resources))
        {
            return Err(VolleyError::plan(format!("task {}: {why}", spec.name)));
        }
        self.hold_args(&spec.args);
        for a in &spec.args {
            if let Some(o) = self.objects.get_mut(a) {
                o.lineage_users += 1;
            }
        }
        self.objects.insert(
            spec.task_id.clone(),
            Box::new(ObjectEntry::new(
                &spec.job_id,
                Some(spec.task_id.clone()),
                vec![],
                0,
                0,
            )),
        );
        let id = spec.task_id.clone();
        self.tasks.insert(
            id.clone(),
            Box::new(TaskEntry {
                retries_left: spec.max_retries,
                spec,
                state: TaskState::Pending,
                attempt: 0,
                reconstructions: 0,
                input_losses: 0,
                no_worker_bounces: 0,
                passed_over: false,
                bundle: None,
                ahead: false,
                pending_since: Instant::now(),
                ready_since: None,
                sent_at: Instant::now(),
            }),
        );
        // Its object outlived a head restart on a node that rejoined: done.
        let made = self.tasks[&id].spec.made;
        let job = self.tasks[&id].spec.job_id.clone();
        let adopted = self.adopted.remove(&id).filter(|a| a.job == job);
        // (Not one in a placement group's bundle: the group is placed anew, and the
        // task runs again in it. Nor the call of an actor that does not live on there
        // any more: it runs again on the actor.)
        let spec = &self.tasks[&id].spec;
        let claimable = |r: &AdoptedRun| {
            r.job == job
                && spec.bundle.is_none()
                && spec.actor.as_ref().is_none_or(|a| {
                    self.actors.get(a).is_some_and(
                        |a| matches!(&a.state, ActorState::Alive { node } if *node == r.node),
                    )
                })
        };
        let run = match self.adopted_runs.remove(&id) {
            Some(r) if claimable(&r) => Some(r),
            Some(r) => {
                if let Some(n) = self.nodes.get_mut(&r.node) {
                    n.available.num_cpus += r.cpus;
                    if !r.actor_call {
                        n.send(NodeCommand::CancelTask(id.clone()));
                    }
                }
                // Its old run's report, should it come, is of an attempt before this
                // one's.
                let task = self.tasks.get_mut(&id).expect("inserted above");
                task.attempt = r.attempt + 1;
                None
            }
            None => None,
        };
        if let Some(count) = self.jobs.get_mut(&job).and_then(|j| j.replay.as_mut()) {
            let at = match (&adopted, &run) {
                (Some(_), _) => 0,
                (None, Some(_)) => 3,
                _ if made => 1,
                _ => 2,
            };
            count[at] += 1;
        }
        if let Some(r) = run {
            // Still running on the node that ran it before the restart: it goes on
            // there, as if sent now.
            let task = self.tasks.get_mut(&id).expect("inserted above");
            task.attempt = r.attempt;
            task.sent_at = Instant::now();
            task.state = TaskState::Running {
                node: r.node.clone(),
                gpus: vec![],
            };
            let slot = task.slot(false, &None);
            // An actor's call holds nothing of its own: its actor holds the resources.
            let req = match task.spec.actor {
                Some(_) => Resources::default(),
                None => task.spec.resources.clone(),
            };
            if let Some(n) = self.nodes.get_mut(&r.node) {
                n.available.num_cpus += r.cpus;
                n.available.subtract(&req);
                n.running.insert(id.clone());
                if let Some(key) = slot {
                    *n.slots.entry(key).or_default() += 1;
                }
            }
            return Ok(());
        }
        match adopted {
            // Its code failed on the node before the replay: it fails so.
            Some(Adopted { error: Some(e), .. }) => self.fail_task(&id, e),
            Some(a) => {
                if let Some(n) = self.nodes.get_mut(&a.node) {
                    n.stored = n.stored.saturating_sub(a.bytes);
                }
                self.task_done(&id, &a.node, a.bytes, a.rows, Default::default());
                self.claimed.insert(id, a.node);
            }
            // Made before, its object freed and gone: kept as lineage, run again only
            // for a reader that needs it.
            _ if made => {
                let task = self.tasks.get_mut(&id).expect("inserted above");
                task.state = TaskState::Done;
                let args = task.spec.args.clone();
                self.release_args(&args);
                // As an object let go with its lineage kept (one task deep: its own
                // inputs keep none for it), which a reader makes again.
                if let Some(o) = self.objects.get_mut(&id) {
                    o.lineage_only = true;
                }
                self.release_lineage(&args);
            }
            _ => self.enqueue(id, false),
        }
        Ok(())
    }

    /// Whether `r` is a success this head took in already: its task is done by that
    /// attempt, its object on that node.
    fn already_taken(&self, r: &TaskReport) -> bool {
        matches!(r.outcome, TaskOutcome::Succeeded { .. })
            && self
                .tasks
                .get(&r.task_id)
                .is_some_and(|t| t.state == TaskState::Done && t.attempt == r.attempt)
            && self
                .objects
                .get(&r.task_id)
                .is_some_and(|o| o.locations.contains(&r.node_id))
    }

    /// Takes in a task's report; false when it was not of the attempt the head waits
    /// for (a late report from a node declared dead, or from an attempt already
    /// retried): it is dropped, and its sender told to undo what it left behind.
    pub fn task_reported(&mut self, r: TaskReport) -> bool {
        let current = self.tasks.get(&r.task_id).is_some_and(|t| {
            t.attempt == r.attempt
                && matches!(&t.state, TaskState::Running { node, .. } if *node == r.node_id)
        });
        if !current && self.already_taken(&r) {
            // The same report again: its node sent it again after the answer to the
            // first was lost. Taken in already; its attempt stands.
            return true;
        }
        if !current {
            // A cancelled attempt's worker ended: the GPUs it held are free now.
            let bundle_gpus = self
                .nodes
                .get_mut(&r.node_id)
                .and_then(|n| n.cancelled_attempt_ended(HeldFor::Task, &r.task_id, r.attempt));
            if let Some(c) = bundle_gpus {
                self.return_bundle_gpus(&r.node_id, c);
            }
            // An attempt that ended well after its task ended for good (it was
            // cancelled while it ran, or is gone with its object): no one will read what
            // it stored, so its node drops it. (The attempt of a task that still runs
            // elsewhere, or again, keeps it: the same object may be stored there.)
            // A task a node ran on across a head restart, reported before its driver
            // replayed it: its object is kept for the replay to claim.
            let adopted_run = self
                .adopted_runs
                .get(&r.task_id)
                .is_some_and(|run| run.node == r.node_id && run.attempt == r.attempt);
            if adopted_run {
                let run = self
                    .adopted_runs
                    .remove(&r.task_id)
                    .expect("looked up above");
                if let Some(n) = self.nodes.get_mut(&run.node) {
                    n.available.num_cpus += run.cpus;
                    if let TaskOutcome::Succeeded { bytes, .. } = &r.outcome {
                        n.stored += bytes;
                    }
                }
                let (bytes, rows, error) = match r.outcome {
                    TaskOutcome::Succeeded { bytes, rows, .. } => (bytes, rows, None),
                    TaskOutcome::Failed(e) => (0, 0, Some(e)),
                    // Not run through (its worker or an input was lost, or no worker
                    // started): the replayed task runs again.
                    TaskOutcome::NoWorker { .. } | TaskOutcome::SystemFailure { .. } => {
                        return true;
                    }
                };
                // Its result stands.
                self.adopted.insert(
                    r.task_id.clone(),
                    Adopted {
                        job: run.job,
                        node: run.node,
                        bytes,
                        rows,
                        error,
                    },
                );
                return true;
            }
            // An object its node kept across a head restart, whose report comes after
            // (a replayed task claims it, or did): its result stands.
            if self
                .adopted
                .get(&r.task_id)
                .is_some_and(|a| a.node == r.node_id)
            {
                return true;
            }
            if self
                .claimed
                .get(&r.task_id)
                .is_some_and(|n| *n == r.node_id)
            {
                self.claimed.remove(&r.task_id);
                return true;
            }
            // (Nor one its node kept across a head restart: a replayed task claims it.)
            let over = self
                .tasks
                .get(&r.task_id)
                .is_none_or(|t| t.state == TaskState::Failed)
                && !self.adopted.contains_key(&r.task_id);
            if over && matches!(r.outcome, TaskOutcome::Succeeded { .. }) {
                if let Some(n) = self.nodes.get(&r.node_id) {
                    n.send(NodeCommand::FreeObjects(vec![r.task_id.clone()]));
                }
            }
            // Its worker took over a task sent ahead all the same: that task holds the
            // slot now.
            if let Some(successor) = &r.successor {
                self.take_over(&r.node_id, successor);
            }
            return false;
        }
        match r.outcome {
            TaskOutcome::Succeeded {
                bytes,
                rows,
                inline,
            } => {
                self.note_task_time(&r.task_id, r.run_time);
                self.task_done(&r.task_id, &r.node_id, bytes, rows, inline)
            }
            TaskOutcome::Failed(e) => self.fail_task(&r.task_id, e),
            TaskOutcome::NoWorker { error } => self.no_worker_on(&r.node_id, &r.task_id, &error),
            TaskOutcome::SystemFailure { error, unreadable } => {
                if unreadable.is_empty() {
                    self.system_failure(&r.task_id, &error)
                } else {
                    self.inputs_unreadable(&r.task_id, &unreadable, &error)
                }
            }
        }
        if let Some(successor) = r.successor {
            self.take_over(&r.node_id, &successor);
        }
        true
    }

    /// Adds the time a CPU-only task took to the average of its job's tasks of its
    /// name (the last ~10 weigh most).
    fn note_task_time(&mut self, id: &str, run_time: Duration) {
        let Some(task) = self.tasks.get(id).filter(|t| t.cpu_only().is_some()) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&task.spec.job_id) else {
            return;
        };
        let t = run_time.as_secs_f64();
        if let Some(avg) = job.task_seconds.get_mut(&task.spec.name) {
            *avg = 0.9 * *avg + 0.1 * t;
        } else if job.task_seconds.len() < TIMED_NAMES {
            job.task_seconds.insert(task.spec.name.clone(), t);
        }
    }

    pub(super) fn task_done(
        &mut self,
        id: &str,
        node: &str,
        bytes: u64,
        rows: u64,
        inline: bytes::Bytes,
    ) {
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.state = TaskState::Done;
        self.task_metrics.ended(
            TaskEnd::Succeeded,
            Some(task.sent_at.elapsed().as_secs_f64()),
        );
        let args = task.spec.args.clone();
        if let Some(o) = self.objects.get_mut(id) {
            for old in &o.locations {
                if let Some(n) = self.nodes.get_mut(old) {
                    n.stored = n.stored.saturating_sub(o.bytes);
                }
            }
            if let Some(n) = self.nodes.get_mut(node) {
                n.stored += bytes;
            }
            o.locations = vec![node.to_string()];
            o.bytes = bytes;
            o.rows = rows;
            o.error = None;
            let old = o.inline.take().map_or(0, |b| b.len() as u64);
            self.inline_bytes -= old;
            if !inline.is_empty() && self.inline_bytes + inline.len() as u64 <= self.inline_limit {
                self.inline_bytes += inline.len() as u64;
                o.inline = Some(inline);
            }
        }
        self.release_args(&args);
        if self.objects.get(id).is_some_and(|o| o.freed) {
            self.try_delete(id);
        }
    }

    pub(super) fn fail_task(&mut self, id: &str, error: ErrorReport) {
        self.end_unfinished(id, error, TaskEnd::Failed);
    }

    /// Stops the unfinished tasks that make `objects` (those of job `job`) and that no
    /// other unfinished task reads (one that reads another of `objects` is stopped
    /// first); actor calls go on, as they change their actor. One waiting is dropped,
    /// one running or sent ahead is dropped by its node, whose worker is killed if it
    /// has started it. Their objects fail with a cancellation, and go once their driver
    /// frees them. A query that stops early (a `LIMIT` reached) stops the tasks whose
    /// output it will not read, instead of leaving them to hold the cluster's CPUs.
    pub fn cancel(&mut self, job: &str, objects: &[String]) {
        let mut left: Vec<&String> = objects.iter().collect();
        // Readers first: stopping one lets go of its inputs, which may then go too.
        loop {
            // A group no unfinished task reads holds its members for readers the
            // driver may still submit: not readers (an exchange's map outputs are
            // held so until the driver frees the group, after its reduce tasks).
            let mut idle_holds: HashMap<String, u32> = HashMap::new();
            for g in self.object_groups.values() {
                if g.job == job && g.users == 0 {
                    for m in &g.members {
                        *idle_holds.entry(m.clone()).or_default() += 1;
                    }
                }
            }
            let before = left.len();
            left.retain(|id| {
                let task = self.tasks.get(id.as_str()).filter(|t| {
                    t.spec.job_id == job
                        && t.spec.actor.is_none()
                        && matches!(t.state, TaskState::Pending | TaskState::Running { .. })
                });
                if task.is_none() {
                    return false;
                }
                let held = idle_holds.get(id.as_str()).copied().unwrap_or(0);
                if self
                    .objects
                    .get(id.as_str())
                    .is_some_and(|o| o.users > held)
                {
                    return true;
                }
                self.stop_task(
                    id,
                    cancelled_report("its driver cancelled it"),
                    TaskEnd::Cancelled,
                );
                false
            });
            if left.len() == before {
                break;
            }
        }
    }

    /// Ends pending or running task `id` for good with `report`: a running one's node is
    /// told to cancel it.
    pub(super) fn stop_task(&mut self, id: &str, report: ErrorReport, how: TaskEnd) {
        // A running task's GPUs stay held until its node reports the attempt
        // ended (its CPUs are free at once), out of its node's room or its
        // placement group bundle's.
        let gpus = self.tasks.get(id).and_then(|t| match &t.state {
            TaskState::Running { gpus, .. } if !gpus.is_empty() && !t.ahead => Some((
                t.attempt,
                t.spec.resources.num_gpus,
                gpus.clone(),
                t.bundle.clone(),
            )),
            _ => None,
        });
        if let Some(node) = self.finish_running(id) {
            if let Some((attempt, n, ids, bundle)) = gpus {
                self.hold_until_exit(&node, HeldFor::Task, id, attempt, n, ids, bundle);
            }
            if let Some(n) = self.nodes.get(&node) {
                n.send(NodeCommand::CancelTask(id.to_string()));
            }
        }
        self.end_unfinished(id, report, how);
    }

    /// Holds the GPUs `ids` (`n` asked for) of task or actor `id`, stopped while its
    /// attempt or incarnation `attempt` ran on `node`, until the node reports it ended:
    /// out of its bundle's room, or its node's if the bundle is gone (what it held went
    /// back to the node when it was released). Its CPUs are free at once.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hold_until_exit(
        &mut self,
        node: &str,
        held_for: HeldFor,
        id: &str,
        attempt: u32,
        n: f64,
        ids: Vec<u32>,
        bundle: Option<BundleRef>,
    ) {
        if ids.is_empty() || !self.nodes.contains_key(node) {
            return;
        }
        let bundle = bundle.filter(|b| self.take_bundle_gpus(b, n, &ids));
        if let Some(node) = self.nodes.get_mut(node) {
            node.hold_cancelled_gpus(held_for, id, attempt, n, ids, bundle);
        }
    }

    /// Ends task `id` for good, if it has not ended, with `error` as its object's.
    fn end_unfinished(&mut self, id: &str, error: ErrorReport, how: TaskEnd) {
        if matches!(
            self.tasks.get(id).map(|t| &t.state),
            None | Some(TaskState::Done | TaskState::Failed)
        ) {
            return;
        }
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.state = TaskState::Failed;
        self.task_metrics.ended(how, None);
        let args = task.spec.args.clone();
        if let Some(o) = self.objects.get_mut(id) {
            o.error = Some(error);
        }
        self.release_args(&args);
        if self.objects.get(id).is_some_and(|o| o.freed) {
            self.try_delete(id);
        }
    }

    /// A task's worker or node died, or its input vanished: run it again if it may.
    pub(super) fn system_failure(&mut self, id: &str, error: &str) {
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if task.retries_left == 0 {
            let e = execution_report(format!("{error} (no retries left)"));
            self.fail_task(id, e);
            return;
        }
        task.retries_left -= 1;
        info!(
            "task {id}: {error}; retrying (attempt {})",
            task.attempt + 1
        );
        self.run_again(id, true);
    }

    /// Queues task `id` (first) as its next attempt; `retried`: counted as a retry
    /// (its job's and the metrics').
    fn run_again(&mut self, id: &str, retried: bool) {
        self.finish_running(id);
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        task.attempt += 1;
        task.state = TaskState::Pending;
        task.pending_since = Instant::now();
        task.ready_since = None;
        task.passed_over = false;
        if retried {
            self.task_metrics.ended(TaskEnd::Retried, None);
            if let Some(j) = self.jobs.get_mut(&task.spec.job_id) {
                j.status.task_retries += 1;
            }
        }
        self.enqueue(id.to_string(), true);
    }

    /// Task `id` could not read some inputs from the stores listed for them. A store
    /// that cannot serve an object it holds is on a node that died or is cut off: its
    /// copy leaves the directory (it is never read again, even if the node comes back,
    /// before the head declares it dead), and the input is rebuilt from its lineage
    /// (its task run again) when no copy is left. The task waits for them, without
    /// using one of its retries, up to [`MAX_INPUT_LOSSES`] times.
    pub(super) fn inputs_unreadable(&mut self, id: &str, inputs: &[UnreadableInput], error: &str) {
        for u in inputs {
            self.copies_unreadable(id, &u.object_id, &u.from, error);
        }
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if task.input_losses >= MAX_INPUT_LOSSES {
            self.system_failure(id, error);
            return;
        }
        task.input_losses += 1;
        self.run_again(id, false);
    }

    /// The tasks of job `id` the head holds (waiting, running, or done with their
    /// objects still in use), at most [`JOB_TASKS_SHOWN`]: the failed ones first, then
    /// the running, the waiting and the done, each by id; and how many it holds in all.
    pub fn job_tasks(&self, id: &str) -> std::result::Result<(Vec<JobTask>, usize), Refusal> {
        self.job(id)?;
        let failed = |tid: &String| self.objects.get(tid).is_some_and(|o| o.error.is_some());
        let mut all: Vec<(u8, &String, &TaskEntry)> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.spec.job_id == id)
            .map(|(tid, t)| {
                let rank = match &t.state {
                    TaskState::Failed => 0,
                    TaskState::Done if failed(tid) => 0,
                    TaskState::Running { .. } => 1,
                    TaskState::Pending => 2,
                    TaskState::Done => 3,
                };
                (rank, tid, t.as_ref())
            })
            .collect();
        let total = all.len();
        all.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        all.truncate(JOB_TASKS_SHOWN);
        let out: Vec<JobTask> = all
            .into_iter()
            .map(|(_, tid, t)| {
                let object = self.objects.get(tid);
                let error = object
                    .and_then(|o| o.error.as_ref())
                    .map(|e| e.message.clone())
                    .unwrap_or_default();
                let (state, node_id) = match &t.state {
                    TaskState::Running { node, .. } => (t.state.name(), node.clone()),
                    TaskState::Done if !error.is_empty() => ("FAILED", String::new()),
                    TaskState::Done => (
                        t.state.name(),
                        object
                            .and_then(|o| o.locations.first().cloned())
                            .unwrap_or_default(),
                    ),
                    TaskState::Pending | TaskState::Failed => (t.state.name(), String::new()),
                };
                let waiting = if t.state == TaskState::Pending
                    && t.spec.actor.is_none()
                    && t.spec.bundle.is_none()
                {
                    self.beyond_nodes("asks", &t.spec.resources)
                } else {
                    None
                };
                JobTask {
                    task_id: tid.clone(),
                    name: t.spec.name.clone(),
                    state: state.into(),
                    node_id,
                    attempt: t.attempt,
                    error,
                    waiting: waiting.unwrap_or_default(),
                }
            })
            .collect();
        Ok((out, total))
    }
}
