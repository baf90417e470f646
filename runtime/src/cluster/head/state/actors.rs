//! Actors: placement, restarts and deaths.

use std::collections::HashMap;

use tracing::{info, warn};

use super::*;

impl State {
    /// A driver creates an actor; it is placed as soon as a node has room.
    pub fn create_actor(&mut self, spec: ActorSpec) -> Result<(), Refusal> {
        spec.resources
            .validate()
            .map_err(|e| Refusal::Invalid(e.to_string()))?;
        self.require_running(&spec.job_id)?;
        if self.actors.contains_key(&spec.actor_id) {
            // A driver creates an actor again only to replay what a head before this
            // one knew: it is known here already.
            return Ok(());
        }
        // Work that could never be placed is refused now rather than wait unseen.
        if let Some(why) = spec
            .bundle
            .as_ref()
            .and_then(|b| self.bundle_refusal(b, &spec.resources))
        {
            return Err(Refusal::Invalid(format!("actor {}: {why}", spec.name)));
        }
        let job = self.jobs.get(&spec.job_id);
        let replayed = job.is_some_and(|j| j.replay.is_some());
        let history = job
            .and_then(|j| j.actor_history.get(&spec.actor_id))
            .cloned()
            .unwrap_or_default();
        let id = spec.actor_id.clone();
        // Restarts before the head restarted count against its limit.
        let mut entry = ActorEntry {
            spec,
            state: ActorState::Pending,
            incarnation: 0,
            restarts: history.restarts,
            gpus: vec![],
            bundle: None,
            pid: 0,
            stopping: None,
        };
        if replayed {
            // Started again, it takes an incarnation past the one a node kept: that
            // one's end, reported as its worker stops, must not be taken for the new
            // one's.
            if let Some(kept) = self.adopted_actors.get(&id) {
                entry.incarnation = kept.incarnation;
            }
            if let Some(why) = history.dead {
                // It died for good before the head restarted: it stays dead, and its
                // calls fail saying why.
                info!("actor {id}: died before the head restarted ({why}); not started again");
                self.stop_adopted_actor(&id);
                entry.die(why);
                self.actors.insert(id, entry);
                return Ok(());
            }
            if let Some(a) = self.adopt_actor(&entry.spec) {
                info!("actor {id}: goes on on {} (the head restarted)", a.node);
                entry.state = ActorState::Alive { node: a.node };
                entry.incarnation = a.incarnation;
                entry.restarts = entry.restarts.max(a.incarnation.saturating_sub(1));
                entry.pid = a.pid;
                self.actors.insert(id, entry);
                return Ok(());
            }
            // It had not started, or its worker did not outlive the head before this
            // one (it had GPUs, lived in a placement group, or its node did not come
            // back): it starts (again).
            warn!(
                "actor {id}: no node kept it across the head's restart; it starts again \
                 (what it held, if it had started, is lost)"
            );
        }
        self.pending_actors.insert(id.clone());
        self.actors.insert(id, entry);
        Ok(())
    }

    /// Keeps actor `id`'s restarts and death in its job's record, for a head after
    /// this one ([`ActorHistory`]).
    fn note_history(&mut self, id: &str) {
        let Some(a) = self.actors.get(id) else {
            return;
        };
        let Some(job) = self
            .jobs
            .get_mut(&a.spec.job_id)
            .filter(|j| j.status.state == JobState::Running)
        else {
            return;
        };
        let dead = match &a.state {
            ActorState::Dead(why) => Some(why.clone()),
            _ => None,
        };
        job.actor_history.insert(
            id.to_string(),
            ActorHistory {
                restarts: a.restarts,
                dead,
            },
        );
    }

    /// The actor that a node kept alive across a head restart for `spec` (replayed by
    /// its driver), now holding `spec`'s resources on that node; `None` (its worker
    /// stopped) when none was kept, or one that cannot go on as `spec` asks.
    fn adopt_actor(&mut self, spec: &ActorSpec) -> Option<AdoptedActor> {
        let a = self.adopted_actors.get(&spec.actor_id)?;
        let n = self.nodes.get(&a.node).filter(|n| n.alive);
        let fits = n.is_some_and(|n| {
            let mut room = n.available.clone();
            room.add(&a.resources);
            spec.resources.fits_in(&room)
        });
        if a.job != spec.job_id || spec.bundle.is_some() || spec.resources.num_gpus > 0.0 || !fits {
            self.stop_adopted_actor(&spec.actor_id);
            return None;
        }
        let a = self.adopted_actors.remove(&spec.actor_id)?;
        let n = self.nodes.get_mut(&a.node).expect("alive, looked up above");
        n.available.add(&a.resources);
        n.available.subtract(&spec.resources);
        Some(a)
    }

    /// Stops actor `id`, kept by a node across a head restart, that no one claims:
    /// its worker stops and its resources go back to its node.
    pub(super) fn stop_adopted_actor(&mut self, id: &str) {
        let Some(a) = self.adopted_actors.remove(id) else {
            return;
        };
        if let Some(n) = self.nodes.get_mut(&a.node) {
            n.available.add(&a.resources);
            n.send(NodeCommand::StopActor(id.to_string()));
        }
    }

    /// A node's word on an actor's incarnation: it started (`alive`, in process
    /// `pid`) or died (`error`). Words on an older incarnation are dropped.
    pub fn actor_reported(
        &mut self,
        id: &str,
        node_id: &str,
        incarnation: u32,
        alive: bool,
        pid: u32,
        error: &str,
    ) {
        let Some(a) = self.actors.get_mut(id) else {
            // One a node kept across a head restart died before its driver claimed it.
            if !alive
                && self
                    .adopted_actors
                    .get(id)
                    .is_some_and(|a| a.node == node_id && a.incarnation == incarnation)
            {
                let a = self.adopted_actors.remove(id).expect("looked up above");
                if let Some(n) = self.nodes.get_mut(&a.node) {
                    n.available.add(&a.resources);
                }
            }
            return;
        };
        if a.incarnation != incarnation {
            return;
        }
        if !alive {
            // A killed one's process is gone: what it held is free.
            if a.stopping.as_ref().is_some_and(|(n, _)| n == node_id) {
                a.stopping = None;
            }
            let bundle_gpus = self
                .nodes
                .get_mut(node_id)
                .and_then(|n| n.cancelled_attempt_ended(HeldFor::Actor, id, incarnation));
            if let Some(c) = bundle_gpus {
                self.return_bundle_gpus(node_id, c);
            }
        }
        let Some(a) = self.actors.get_mut(id) else {
            return;
        };
        match (&a.state, alive) {
            (ActorState::Dead(_), true) => {
                // Killed while it started: it must not live on, holding what was
                // given back.
                if let Some(n) = self.nodes.get(node_id) {
                    n.send(NodeCommand::StopActor(id.to_string()));
                }
            }
            (ActorState::Starting { node }, true) if *node == node_id => {
                a.state = ActorState::Alive { node: node.clone() };
                a.pid = pid;
            }
            (ActorState::Starting { node } | ActorState::Alive { node }, false)
                if *node == node_id =>
            {
                self.actor_failed(id, error);
            }
            _ => {}
        }
    }

    /// Actor `id` as reported.
    pub fn actor(&self, id: &str) -> Result<ActorRecord, Refusal> {
        self.actors
            .get(id)
            .map(|a| actor_record(id, a))
            .ok_or_else(|| Refusal::NotFound(format!("no actor {id}")))
    }

    /// The actors of job `id` (alive or not), by id.
    pub fn job_actors(&self, id: &str) -> Result<Vec<ActorRecord>, Refusal> {
        self.job(id)?;
        let mut actors: Vec<ActorRecord> = self
            .actors
            .iter()
            .filter(|(_, a)| a.spec.job_id == id)
            .map(|(aid, a)| {
                let mut record = actor_record(aid, a);
                if a.state == ActorState::Pending && a.spec.bundle.is_none() {
                    record.waiting = self
                        .beyond_nodes("asks", &a.spec.resources)
                        .unwrap_or_default();
                }
                record
            })
            .collect();
        actors.sort_by(|a, b| a.actor_id.cmp(&b.actor_id));
        Ok(actors)
    }

    pub(super) fn place_actors(&mut self) {
        let pending: Vec<String> = self.pending_actors.iter().cloned().collect();
        for id in pending {
            // The index follows each actor's state; one that no longer waits leaves it.
            let Some(a) = self
                .actors
                .get(&id)
                .filter(|a| a.state == ActorState::Pending)
            else {
                self.pending_actors.remove(&id);
                continue;
            };
            if !self.job_active(&a.spec.job_id) {
                let a = self.actors.get_mut(&id).expect("exists");
                a.die("its job is not running".into());
                self.pending_actors.remove(&id);
                continue;
            }
            let req = a.spec.resources.clone();
            let placement = if let Some(choice) = a.spec.bundle.clone() {
                self.take_from_bundle(&choice, &req)
            } else {
                // A job's actors spread over the nodes (a pool's actors serve blocks
                // wherever they were made), then go where most CPUs are free.
                let job = a.spec.job_id.clone();
                let mut crowd: HashMap<String, usize> = HashMap::new();
                for other in self.actors.values().filter(|o| o.spec.job_id == job) {
                    if let ActorState::Starting { node } | ActorState::Alive { node } = &other.state
                    {
                        *crowd.entry(node.clone()).or_default() += 1;
                    }
                }
                self.pick_node(&req, &[], &crowd, false, None, &[], None)
                    .map(|(n, g)| (n, g, None))
            };
            let Some((node, gpus, bundle)) = placement else {
                continue;
            };
            self.pending_actors.remove(&id);
            let a = self.actors.get_mut(&id).expect("exists");
            a.incarnation += 1;
            a.state = ActorState::Starting { node: node.clone() };
            a.gpus = gpus.clone();
            a.bundle = bundle;
            let cmd = NodeCommand::StartActor {
                actor_id: id.clone(),
                job_id: a.spec.job_id.clone(),
                payload: a.spec.payload.clone(),
                gpu_ids: gpus,
                incarnation: a.incarnation,
                resources: a.spec.resources.clone(),
            };
            info!("actor {id}: starts on {node}");
            self.nodes[&node].send(cmd);
        }
    }

    pub(super) fn actor_failed(&mut self, id: &str, error: &str) {
        let Some(a) = self.actors.get_mut(id) else {
            return;
        };
        let node = match &a.state {
            ActorState::Alive { node } | ActorState::Starting { node } => node.clone(),
            _ => return,
        };
        let (req, gpus, bundle) = (a.spec.resources.clone(), a.gpus.clone(), a.bundle.take());
        let restart = a.restarts < a.spec.max_restarts;
        if restart {
            a.restarts += 1;
            a.state = ActorState::Pending;
            self.pending_actors.insert(id.to_string());
            warn!(
                "actor {id}: {error}; restarting ({} of {})",
                a.restarts, a.spec.max_restarts
            );
        } else {
            a.die(error.to_string());
            warn!("actor {id}: {error}; not restarted");
        }
        self.note_history(id);
        self.release(&node, &req, &gpus, &bundle);
        // Calls in flight on the old incarnation run again on the new one (or fail).
        for t in self.running_calls(id) {
            self.system_failure(&t, &format!("actor {id} died: {error}"));
        }
    }

    /// The calls of actor `id` sent to its node.
    fn running_calls(&self, id: &str) -> Vec<String> {
        self.tasks
            .iter()
            .filter(|(_, t)| {
                t.spec.actor.as_deref() == Some(id) && matches!(t.state, TaskState::Running { .. })
            })
            .map(|(t, _)| t.clone())
            .collect()
    }

    pub fn kill_actor(&mut self, id: &str, why: &str) {
        let Some(a) = self.actors.get_mut(id) else {
            return;
        };
        let node = match &a.state {
            ActorState::Alive { node } | ActorState::Starting { node } => Some(node.clone()),
            _ => None,
        };
        a.die(why.to_string());
        if node.is_some() {
            a.stopping = node.clone().map(|n| (n, Instant::now()));
        }
        self.pending_actors.remove(id);
        let (req, gpus, bundle) = (a.spec.resources.clone(), a.gpus.clone(), a.bundle.take());
        let incarnation = a.incarnation;
        self.note_history(id);
        if let Some(node) = node {
            if let Some(n) = self.nodes.get(&node) {
                n.send(NodeCommand::StopActor(id.to_string()));
            }
            self.release(&node, &req, &gpus, &bundle);
            // Its GPUs wait for its process to be gone (its CPUs are free at once).
            let n = req.num_gpus;
            self.hold_until_exit(&node, HeldFor::Actor, id, incarnation, n, gpus, bundle);
        }
        // Its calls sent to its node end with it (the node drops those queued there
        // without a word): they fail now, saying why.
        for t in self.running_calls(id) {
            self.fail_task(
                &t,
                execution_report(format!("actor {id} was stopped: {why}")),
            );
        }
    }
}

fn actor_record(id: &str, a: &ActorEntry) -> ActorRecord {
    ActorRecord {
        actor_id: id.to_string(),
        name: a.spec.name.clone(),
        pid: matches!(a.state, ActorState::Alive { .. }).then_some(a.pid),
        exited: matches!(a.state, ActorState::Dead(_)) && a.stopping.is_none(),
        state: a.state.clone(),
        restarts: a.restarts,
        waiting: String::new(),
    }
}
