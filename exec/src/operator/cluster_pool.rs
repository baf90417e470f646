//! A stateful stage on a pool of cluster actors.
//!
//! ```text
//!   input blocks ──▶ waiting ──dispatch──▶ actor on the block's node (or the least busy)
//!        ▲                                   │ call "process" (several in flight each)
//!        └── re-queued when an actor dies ◀──┴──▶ output object ──▶ next operator
//! ```
//!
//! The pool starts `min` actors, grows one at a time (up to `max`) while blocks wait and
//! every actor is busy, and lets idle ones go (down to `min`). When more blocks wait
//! than there are free slots, a call takes several consecutive ones (up to
//! [`MAX_BLOCKS_PER_CALL`], within a share of the object-store budget, and under
//! [`CALL_BATCHES`] of the transform's batches, so that big blocks still go one per call
//! and spread evenly over the actors): fewer calls, and a transform that keeps many rows in flight
//! (an LLM engine) refills its batch from the next block instead of draining at the end
//! of each; the call's output is the blocks' outputs in order, handed on as the first
//! block's (the others' sequences close empty, so the order holds). A call that fails because
//! its actor died is dispatched again (to another actor, or to the actor once it is
//! restarted or replaced): its output is made once, by the call that succeeds. A call
//! that fails in the user's transform ends the execution. A pool that can never get its
//! minimum size (no node offers what one actor needs, or all nodes together hold fewer
//! than `min`) fails at once, naming the resource.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use volley_common::{ErrorKind, Result, VolleyError};
use volley_runtime::cluster::{
    ActorHandle, ActorOptions, Cluster, EncodedActor, ObjectMeta, Resources,
};

use super::{Expected, Operator, OutputEstimate, RemoteWork, StepContext};
use crate::plan::{PoolSize, CALL_BATCHES};
use crate::queue::{Block, BlockQueue, PoppedBlock, RemoteBlock};

/// Calls of one block that may fail on dead actors before the execution fails.
const MAX_ATTEMPTS: u32 = 4;
/// How long an actor beyond the minimum may sit idle before it is let go.
const IDLE: Duration = Duration::from_secs(5);
/// Most input blocks one call takes.
const MAX_BLOCKS_PER_CALL: usize = 4;

struct Member {
    handle: ActorHandle,
    /// The Flight address of its node, once known.
    address: Option<String>,
    in_flight: usize,
    idle_since: Instant,
    /// A call failed on it: ask the head whether it is dead.
    suspect: bool,
}

struct Waiting {
    seq: u64,
    block: RemoteBlock,
    attempts: u32,
}

#[derive(Default)]
struct PoolState {
    members: Vec<Member>,
    waiting: VecDeque<Waiting>,
}

pub(crate) struct ClusterPoolOp {
    cluster: Cluster,
    input: Arc<BlockQueue>,
    actor: EncodedActor,
    resources: Resources,
    /// What the pool leaves free for the stages feeding it.
    reserve: Resources,
    size: PoolSize,
    max_in_flight: usize,
    /// Most rows a call of several blocks holds (see [`CALL_BATCHES`]).
    call_rows: u64,
    transform: String,
    state: Arc<Mutex<PoolState>>,
    input_done: bool,
    next_seq: u64,
    started: bool,
    /// Node id -> Flight address, from the cluster's status.
    nodes: HashMap<String, String>,
    last_refresh: Option<Instant>,
    last_grow: Option<Instant>,
    estimate: Arc<OutputEstimate>,
}

impl ClusterPoolOp {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cluster: Cluster,
        input: Arc<BlockQueue>,
        actor: EncodedActor,
        resources: Resources,
        reserve: Resources,
        size: PoolSize,
        max_in_flight: usize,
        batch_size: Option<usize>,
        transform: String,
        first_seq: u64,
    ) -> Self {
        Self {
            cluster,
            input,
            actor,
            resources,
            reserve,
            size,
            max_in_flight: max_in_flight.max(1),
            call_rows: batch_size.map_or(u64::MAX, |b| (b.max(1) * CALL_BATCHES) as u64),
            transform,
            state: Arc::default(),
            input_done: false,
            next_seq: first_seq,
            started: false,
            nodes: HashMap::new(),
            last_refresh: None,
            last_grow: None,
            estimate: Arc::default(),
        }
    }

    /// Fails unless the cluster's live nodes can hold `min` actors at once and still
    /// leave `reserve` free for the stages that feed the pool (actors hold their
    /// resources for their lifetime: a pool taking every CPU would wait forever for
    /// input). Lowers `max` to what fits.
    fn check_fits(&mut self) -> Result<()> {
        let status = self.cluster.status()?;
        let mut per_node = 0usize;
        let mut short: Option<String> = None;
        let mut sum = Resources::default();
        for n in status.nodes.iter().filter(|n| n.alive()) {
            let total: Resources = n.total.clone();
            let (k, missing) = total.how_many(&self.resources);
            per_node = per_node.saturating_add(k);
            if missing.is_some() {
                short = missing;
            }
            sum.add(&total);
        }
        let mut left = sum.clone();
        left.subtract(&self.reserve);
        let (with_reserve, reserve_short) = left.how_many(&self.resources);
        let fits = per_node.min(with_reserve);
        if fits >= self.size.min {
            self.size.max = self.size.max.min(fits).max(self.size.min);
            return Ok(());
        }
        let why = if with_reserve < per_node {
            format!(
                "{} of {sum} once {} is left for the stages that feed it",
                reserve_short.unwrap_or_else(|| "room".into()),
                self.reserve
            )
        } else {
            short.unwrap_or_else(|| "room for all of them".into())
        };
        Err(VolleyError::ResourcesExhausted(format!(
            "the actor pool of {} needs {} actor(s) of {} each, but the cluster's nodes \
             hold {fits} at most (short of {why}); lower its concurrency or add nodes",
            self.transform, self.size.min, self.resources
        )))
    }

    fn spawn_actor(&self, state: &mut PoolState) -> Result<()> {
        let mut options = ActorOptions::default()
            .resources(self.resources.clone())
            .max_restarts(0);
        options.name = self.transform.clone();
        let handle = self.cluster.create_actor_encoded(&self.actor, &options)?;
        state.members.push(Member {
            handle,
            address: None,
            in_flight: 0,
            idle_since: Instant::now(),
            suspect: false,
        });
        Ok(())
    }

    /// Learns where actors live and which suspects are dead (replacing those).
    fn refresh(&mut self, state: &mut PoolState) -> Result<()> {
        let due = self
            .last_refresh
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
        let needed = state
            .members
            .iter()
            .any(|m| m.address.is_none() || m.suspect);
        if !due || !needed {
            return Ok(());
        }
        self.last_refresh = Some(Instant::now());
        if state.members.iter().any(|m| m.address.is_none()) {
            self.nodes = self
                .cluster
                .status()?
                .nodes
                .into_iter()
                .filter(|n| n.alive())
                .map(|n| (n.node_id, n.object_address))
                .collect();
        }
        let mut dead = Vec::new();
        for (i, m) in state.members.iter_mut().enumerate() {
            if m.address.is_none() || m.suspect {
                let info = m.handle.info()?;
                if info.state == "DEAD" {
                    dead.push(i);
                    continue;
                }
                m.suspect = false;
                if info.state == "ALIVE" {
                    m.address = self.nodes.get(&info.node_id).cloned();
                }
            }
        }
        for i in dead.into_iter().rev() {
            let m = state.members.remove(i);
            tracing::warn!(
                "an actor of {} died; replacing it ({} calls to retry)",
                self.transform,
                m.in_flight
            );
            self.spawn_actor(state)?;
        }
        Ok(())
    }

    /// Takes input blocks while some actor slot would be free for them and the
    /// object-store budget has room for their calls' output; otherwise one block waits
    /// (the rest stay queued, where the operator feeding the pool sees them and holds
    /// back).
    fn take_input(&mut self, cx: &StepContext<'_>, state: &mut PoolState) {
        // Room for a few blocks per free slot: calls may take several.
        let slots = state.members.len() * self.max_in_flight;
        let busy: usize = state.members.iter().map(|m| m.in_flight).sum();
        let free = slots.saturating_sub(busy);
        loop {
            let next_input = state.waiting.front().map_or(0, |w| w.block.meta.bytes);
            let room = if free > 0 && cx.store_has_room(self.estimate.bytes(next_input), None) {
                free * MAX_BLOCKS_PER_CALL + 1
            } else {
                1
            };
            if self.input_done || state.waiting.len() >= room {
                break;
            }
            let block = match self.input.try_pop_block() {
                Ok(PoppedBlock::Block(Block::Remote(r))) => r,
                Ok(PoppedBlock::Block(Block::Local(b))) => match cx.put_block(b) {
                    Ok(block) => block,
                    Err(e) => {
                        cx.fail(e);
                        self.input_done = true;
                        break;
                    }
                },
                Ok(PoppedBlock::Empty) => break,
                Ok(PoppedBlock::Done) | Err(_) => {
                    self.input_done = true;
                    break;
                }
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            cx.out.register(seq);
            state.waiting.push_back(Waiting {
                seq,
                block,
                attempts: 0,
            });
        }
    }

    /// Gives waiting blocks to actors with a free slot, preferring the block's node;
    /// several consecutive blocks per call when more wait than there are free slots. A
    /// call goes to an actor whose node's share of the object-store budget has room for
    /// its output (and only while the execution's total has room), except that an idle
    /// pool may always start one, so that the execution moves.
    fn dispatch(&self, cx: &StepContext<'_>, state: &mut PoolState) {
        let free = |m: &Member| m.in_flight < self.max_in_flight && !m.suspect;
        while !state.waiting.is_empty() {
            let slots: usize = state
                .members
                .iter()
                .filter(|m| free(m))
                .map(|m| self.max_in_flight - m.in_flight)
                .sum();
            if slots == 0 {
                break;
            }
            let take = state
                .waiting
                .len()
                .div_ceil(slots)
                .clamp(1, MAX_BLOCKS_PER_CALL);
            // A call's blocks (and so its output) stay within a share of the
            // object-store budget: the nodes' stores hold every call's input and output.
            let cap = cx.remote_limit().map_or(u64::MAX, |l| {
                l / (2 * state.members.len() * self.max_in_flight).max(1) as u64
            });
            let mut group = vec![state.waiting.pop_front().expect("not empty")];
            let mut bytes = group[0].block.meta.bytes;
            let mut rows = group[0].block.meta.rows;
            while group.len() < take
                && state.waiting.front().is_some_and(|n| {
                    Some(n.seq) == group.last().map(|l| l.seq + 1)
                        && bytes.saturating_add(n.block.meta.bytes) <= cap
                        && rows.saturating_add(n.block.meta.rows) <= self.call_rows
                })
            {
                let next = state.waiting.pop_front().expect("front");
                bytes += next.block.meta.bytes;
                rows += next.block.meta.rows;
                group.push(next);
            }
            let expected = self.estimate.bytes(bytes);
            let holders = &group[0].block.meta.addresses;
            let local = |m: &Member| m.address.as_ref().is_some_and(|a| holders.contains(a));
            let fits = |m: &Member| free(m) && cx.store_has_room(expected, m.address.as_deref());
            let least_busy = |ok: &dyn Fn(&Member) -> bool| {
                state
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| ok(m))
                    .min_by_key(|(_, m)| m.in_flight)
                    .map(|(i, _)| i)
            };
            let pick = state
                .members
                .iter()
                .position(|m| fits(m) && local(m))
                .or_else(|| least_busy(&fits))
                .or_else(|| {
                    cx.may_pass_full_budget()
                        .then(|| {
                            state
                                .members
                                .iter()
                                .position(|m| free(m) && local(m))
                                .or_else(|| least_busy(&free))
                        })
                        .flatten()
                });
            let Some(i) = pick else {
                for w in group.into_iter().rev() {
                    state.waiting.push_front(w);
                }
                break;
            };
            let member = &mut state.members[i];
            let actor_id = member.handle.id().to_string();
            let node = member.address.clone();
            let inputs: Vec<&volley_runtime::cluster::ObjectRef> =
                group.iter().map(|w| &w.block.object).collect();
            match member.handle.call("process", (), &inputs) {
                Ok(object) => {
                    member.in_flight += 1;
                    // The call's first block holds the room for the whole call's output,
                    // on the actor's node.
                    let works = group
                        .iter()
                        .enumerate()
                        .map(|(k, w)| {
                            cx.remote_work(
                                w.seq,
                                format!("a call of {}", self.transform),
                                (k == 0).then_some(Expected {
                                    estimate: &self.estimate,
                                    input: bytes,
                                    node: node.as_deref(),
                                }),
                            )
                        })
                        .collect();
                    let pool = Arc::clone(&self.state);
                    let watched = object.clone();
                    cx.watch().add(
                        watched,
                        Box::new(move |meta| on_done(pool, actor_id, group, object, meta, works)),
                    );
                }
                Err(e) => {
                    for w in group.into_iter().rev() {
                        state.waiting.push_front(w);
                    }
                    cx.fail(e);
                    break;
                }
            }
        }
    }

    /// Adds an actor while blocks wait and every actor is busy; lets idle ones go.
    fn scale(&mut self, state: &mut PoolState) -> Result<()> {
        let all_busy = state
            .members
            .iter()
            .all(|m| m.in_flight >= self.max_in_flight);
        let grow_due = self
            .last_grow
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
        if !state.waiting.is_empty() && all_busy && state.members.len() < self.size.max && grow_due
        {
            self.last_grow = Some(Instant::now());
            self.spawn_actor(state)?;
        }
        if state.waiting.is_empty() && state.members.len() > self.size.min {
            if let Some(i) = state
                .members
                .iter()
                .position(|m| m.in_flight == 0 && m.idle_since.elapsed() >= IDLE)
            {
                let m = state.members.remove(i);
                let _ = m.handle.kill();
            }
        }
        Ok(())
    }

    fn shut_down(state: &mut PoolState) {
        for m in state.members.drain(..) {
            let _ = m.handle.kill();
        }
        state.waiting.clear();
    }
}

/// A call ended: its output goes on (as the first block's; the others' sequences close
/// empty); a failure on a dead actor sends its blocks back to the waiting line.
fn on_done(
    pool: Arc<Mutex<PoolState>>,
    actor_id: String,
    group: Vec<Waiting>,
    object: volley_runtime::cluster::ObjectRef,
    meta: Result<ObjectMeta>,
    works: Vec<RemoteWork>,
) {
    let mut state = pool.lock().expect("pool lock");
    if let Some(m) = state.members.iter_mut().find(|m| m.handle.id() == actor_id) {
        m.in_flight = m.in_flight.saturating_sub(1);
        if m.in_flight == 0 {
            m.idle_since = Instant::now();
        }
        if meta.is_err() {
            m.suspect = true;
        }
    }
    let attempts = group.iter().map(|w| w.attempts).max().unwrap_or(0);
    let mut works = works.into_iter();
    let first = works.next().expect("a call takes at least one block");
    let finish = |first: RemoteWork, result, rest: std::vec::IntoIter<RemoteWork>| {
        first.finish(result);
        for w in rest {
            w.finish(Ok(None));
        }
    };
    match meta {
        Ok(meta) => {
            drop(state);
            // The inputs are freed (and uncharged) before the scheduler hears of the end.
            drop(group);
            finish(
                first,
                Ok(Some(Block::Remote(RemoteBlock::new(object, meta)))),
                works,
            );
        }
        Err(e) if e.kind() == ErrorKind::UserFunction || e.is_cancelled() => {
            drop(state);
            finish(first, Err(e), works);
        }
        Err(e) if attempts + 1 >= MAX_ATTEMPTS => {
            drop(state);
            let e = e.context(format!(
                "a block failed on {MAX_ATTEMPTS} actors of the pool"
            ));
            finish(first, Err(e), works);
        }
        Err(_) => {
            for w in group.into_iter().rev() {
                state.waiting.push_front(Waiting {
                    attempts: w.attempts + 1,
                    ..w
                });
            }
            drop(state);
            first.retry();
            for w in works {
                w.retry();
            }
        }
    }
}

impl Operator for ClusterPoolOp {
    fn step(&mut self, cx: &mut StepContext<'_>) -> bool {
        let state = Arc::clone(&self.state);
        let mut state = state.lock().expect("pool lock");
        if cx.stopping {
            self.input_done = true;
            Self::shut_down(&mut state);
            return true;
        }
        if !self.started {
            self.started = true;
            let created = self
                .check_fits()
                .and_then(|()| (0..self.size.min).try_for_each(|_| self.spawn_actor(&mut state)));
            if let Err(e) = created {
                cx.fail(e);
                Self::shut_down(&mut state);
                return true;
            }
        }
        let upkeep = self
            .refresh(&mut state)
            .and_then(|()| self.scale(&mut state));
        if let Err(e) = upkeep {
            cx.fail(e);
            Self::shut_down(&mut state);
            return true;
        }
        // Taking blocks moves them from the queue to the waiting line, where they stay
        // counted against the object-store budget: only the line's length bounds it.
        self.take_input(cx, &mut state);
        self.dispatch(cx, &mut state);
        let busy = state.members.iter().any(|m| m.in_flight > 0);
        cx.counters.pool_size(state.members.len());
        let done = self.input_done && state.waiting.is_empty() && !busy;
        if done {
            Self::shut_down(&mut state);
        }
        done
    }
}
