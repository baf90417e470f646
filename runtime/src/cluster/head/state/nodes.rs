//! Nodes: joining, heartbeats, death, draining and leaving.

use tracing::{info, warn};

use super::*;

impl State {
    /// A node joins: its id.
    pub fn register_node(&mut self, node: NodeRegistration) -> String {
        self.next_node += 1;
        let id = format!("node-{}", self.next_node);
        info!("{id} joined from {} with {}", node.hostname, node.total);
        self.nodes.insert(id.clone(), Node::new(node));
        id
    }

    /// A node that was part of the cluster under a head before this one rejoins under
    /// its id `id`, with what it kept: its objects wait for the tasks their drivers
    /// submit again (a task whose object is kept is done at once), and the drivers of
    /// jobs waiting for them run on. Returns the jobs whose drivers and objects the
    /// node must drop (ended, or started again elsewhere). Refused for a node this head
    /// knows (it declared it dead: what it holds may be stale, so it joins again as a
    /// new node).
    pub fn rejoin_node(
        &mut self,
        id: &str,
        node: NodeRegistration,
        kept: Kept,
    ) -> Result<Rejoined, Refusal> {
        if self.nodes.contains_key(id) || self.gone_nodes.contains_key(id) {
            return Err(Refusal::NotNow(format!(
                "{id} is not one this head lost: join as a new node"
            )));
        }
        // A node's number is never given out again.
        if let Some(n) = id.strip_prefix("node-").and_then(|n| n.parse::<u64>().ok()) {
            self.next_node = self.next_node.max(n);
        }
        info!(
            "{id} rejoined from {} with {}, keeping {} objects, {} drivers, {} running tasks \
             and {} actors",
            node.hostname,
            node.total,
            kept.objects.len(),
            kept.drivers.len(),
            kept.running.len(),
            kept.actors.len()
        );
        self.nodes.insert(id.to_string(), Node::new(node));
        let mut drop_jobs = BTreeSet::new();
        let mut free_objects = vec![];
        let mut cancel_tasks = vec![];
        let mut stop_actors = vec![];
        for job in kept.drivers {
            let resumed = self.jobs.get_mut(&job).is_some_and(|j| {
                let ours = j.status.state == JobState::Running
                    && !j.attached
                    && j.status.node_id == id
                    && j.resume_by.is_some();
                if ours {
                    j.resume_by = None;
                }
                ours
            });
            if !resumed {
                drop_jobs.insert(job);
                continue;
            }
            info!("job {job}: its driver on {id} goes on (the head restarted)");
            let req = self.jobs[&job].resources.clone();
            let n = self.nodes.get_mut(id).expect("inserted above");
            let gpus = req
                .fits_in(&n.available)
                .then(|| n.gpus.take(req.num_gpus))
                .flatten();
            match gpus {
                Some(gpus) => {
                    n.available.subtract(&req);
                    let j = self.jobs.get_mut(&job).expect("exists");
                    j.gpus = gpus;
                    j.driver_charged = true;
                }
                None => warn!("job {job}: its driver's resources do not fit {id} now"),
            }
        }
        for o in kept.objects {
            if !self.job_active(&o.job) {
                drop_jobs.insert(o.job);
                continue;
            }
            // A replay still to come may claim it (not once its driver has replayed,
            // nor for a job started again since).
            let claimable = self.jobs.get(&o.job).is_some_and(|j| j.replay.is_some());
            match self.tasks.get(&o.id).map(|t| t.state.clone()) {
                // Its driver came back first and submitted the task again.
                Some(TaskState::Pending) => {
                    self.task_done(&o.id, id, o.bytes, o.rows, Default::default());
                    self.claimed.insert(o.id, id.to_string());
                }
                // Made again elsewhere already, or running; or no task will claim it
                // (its driver has replayed), or another node's copy is kept: this copy
                // is not needed.
                Some(_) => free_objects.push(o.id),
                None if !claimable || self.adopted.contains_key(&o.id) => {
                    free_objects.push(o.id);
                }
                None => {
                    if let Some(n) = self.nodes.get_mut(id) {
                        n.stored += o.bytes;
                    }
                    self.adopted.insert(
                        o.id,
                        Adopted {
                            job: o.job,
                            node: id.to_string(),
                            bytes: o.bytes,
                            rows: o.rows,
                            error: None,
                        },
                    );
                }
            }
        }
        for t in kept.running {
            if !self.job_active(&t.job) {
                drop_jobs.insert(t.job);
                continue;
            }
            // Known here already (queued or made again), or of a job whose driver has
            // replayed or that started again: no one will claim it.
            let claimable = self.jobs.get(&t.job).is_some_and(|j| j.replay.is_some());
            if !claimable || self.tasks.contains_key(&t.id) || self.adopted_runs.contains_key(&t.id)
            {
                if !t.actor_call {
                    cancel_tasks.push(t.id);
                }
                continue;
            }
            // It goes on; its CPUs are held until its driver's replay claims it (or
            // its report comes first).
            if let Some(n) = self.nodes.get_mut(id) {
                n.available.num_cpus -= t.cpus;
            }
            self.adopted_runs.insert(
                t.id,
                AdoptedRun {
                    job: t.job,
                    node: id.to_string(),
                    attempt: t.attempt,
                    cpus: t.cpus,
                    actor_call: t.actor_call,
                },
            );
        }
        for a in kept.actors {
            if !self.job_active(&a.job) {
                drop_jobs.insert(a.job);
                continue;
            }
            // As a running task: kept only for a replay still to come, and while its
            // resources are there to hold.
            let n = self.nodes.get_mut(id).expect("inserted above");
            let claimable = self.jobs.get(&a.job).is_some_and(|j| j.replay.is_some())
                && !self.actors.contains_key(&a.id)
                && !self.adopted_actors.contains_key(&a.id)
                && a.resources.num_gpus == 0.0
                && a.resources.fits_in(&n.available);
            if !claimable {
                stop_actors.push(a.id);
                continue;
            }
            n.available.subtract(&a.resources);
            self.adopted_actors.insert(
                a.id,
                AdoptedActor {
                    job: a.job,
                    node: id.to_string(),
                    incarnation: a.incarnation,
                    pid: a.pid,
                    resources: a.resources,
                },
            );
        }
        Ok(Rejoined {
            drop_jobs: drop_jobs.into_iter().collect(),
            free_objects,
            cancel_tasks,
            stop_actors,
        })
    }

    /// A head started on the state of one before it expects that head's nodes back:
    /// drivers wait for them, for at most [`NODES_WAIT`], before they replay.
    pub fn expect_nodes(&mut self, nodes: Vec<String>) {
        self.awaiting_nodes = nodes.into_iter().collect();
        self.awaiting_until = Some(Instant::now() + NODES_WAIT);
    }

    /// Whether nodes of the head before this one may still rejoin (drivers wait).
    pub fn recovering(&self) -> bool {
        !self.awaiting_nodes.is_empty() && self.awaiting_until.is_some_and(|t| Instant::now() < t)
    }

    /// The nodes alive now (kept in the head's store, for a head after this one).
    pub fn live_node_ids(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// A node's heartbeat; false for a node the head does not know alive (it must join
    /// again).
    pub fn heartbeat(&mut self, node: &str, load: NodeLoad) -> bool {
        match self.nodes.get_mut(node) {
            Some(n) if n.alive => {
                n.last_seen = Instant::now();
                n.load = load;
                true
            }
            _ => false,
        }
    }

    /// A node opens its command stream; refused for a node not known alive.
    pub fn attach(&mut self, node: &str, link: NodeLink) -> Result<(), Refusal> {
        match self.nodes.get_mut(node) {
            Some(n) if n.alive => {
                n.link = Some(link);
                // Awaited after a restart: drivers may replay once it takes commands.
                self.awaiting_nodes.remove(node);
                Ok(())
            }
            _ => Err(Refusal::NotFound(format!("unknown node {node}"))),
        }
    }

    /// Declares dead the nodes silent for longer than `timeout`.
    pub fn check_heartbeats(&mut self, timeout: Duration) {
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive && n.last_seen.elapsed() > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in dead {
            warn!("node {id} missed its heartbeats for {timeout:?}: declared dead");
            self.node_died(&id);
        }
        // A cancelled task's GPUs whose end was never reported (the report lost on
        // the way) go back after a while.
        let mut bundles = vec![];
        let mut gone_actors = vec![];
        for (id, n) in &mut self.nodes {
            for ((held_for, task), bundle) in n.expire_cancelled_gpus() {
                let what = match held_for {
                    HeldFor::Task => "cancelled task",
                    HeldFor::Actor => "killed actor",
                };
                warn!("node {id}: no word of {what} {task}'s end: its GPUs are free again");
                bundles.extend(bundle.map(|c| (id.clone(), c)));
                if held_for == HeldFor::Actor {
                    gone_actors.push(task);
                }
            }
        }
        for a in gone_actors {
            if let Some(a) = self.actors.get_mut(&a) {
                a.stopping = None;
            }
        }
        // Killed actors whose end was never reported count as gone after a while.
        for (id, a) in &mut self.actors {
            if a.stopping
                .as_ref()
                .is_some_and(|(_, since)| since.elapsed() >= STOPPING_PRESUMED_GONE)
            {
                warn!(
                    "actor {id}: no word of its process's end since it was killed: taken as gone"
                );
                a.stopping = None;
            }
        }
        for (node, c) in bundles {
            self.return_bundle_gpus(&node, c);
        }
    }

    /// Sends `command` to every live node; the ids of those it went to, in order.
    pub fn broadcast(&self, command: &NodeCommand) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.send(command.clone()))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub(super) fn node_died(&mut self, node: &str) {
        self.node_gone(node, "died");
    }

    /// Node `node` is gone (`how`: "died", or "left" after draining): what ran there
    /// is retried, objects only it held are rebuilt, its actors restart elsewhere.
    pub(super) fn node_gone(&mut self, node: &str, how: &str) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        n.alive = false;
        n.link = None;
        let running: Vec<String> = n.running.drain().collect();
        self.adopted.retain(|_, a| a.node != node);
        self.adopted_runs.retain(|_, r| r.node != node);
        self.adopted_actors.retain(|_, a| a.node != node);
        self.claimed.retain(|_, n| n != node);
        // Killed actors' processes there are gone with it (or are killed by their
        // agent once it finds its head gone).
        for a in self.actors.values_mut() {
            if a.stopping.as_ref().is_some_and(|(n, _)| n == node) {
                a.stopping = None;
            }
        }
        for t in running {
            self.system_failure(&t, &format!("node {node} {how}"));
        }
        // Copies it was making for a draining node will not come: the next drain call
        // sends them elsewhere.
        self.copies.retain(|_, (target, _)| target != node);
        // Objects whose last copy was there are rebuilt by re-running their task, if
        // still wanted (not freed, or freed but still read: a group's member).
        let lost: Vec<String> = self
            .objects
            .iter_mut()
            .filter_map(|(id, o)| {
                let had = o.locations.len();
                o.locations.retain(|l| l != node);
                (had > 0 && o.locations.is_empty() && o.error.is_none() && o.wanted())
                    .then(|| id.clone())
            })
            .collect();
        for id in lost {
            self.reconstruct(&id, node);
        }
        let actors: Vec<String> = self
            .actors
            .iter()
            .filter(|(_, a)| {
                matches!(&a.state, ActorState::Alive { node: n } | ActorState::Starting { node: n } if n == node)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for a in actors {
            self.actor_failed(&a, &format!("node {node} {how}"));
        }
        let groups: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.bundles.iter().any(|b| b.node.as_deref() == Some(node)))
            .map(|(id, _)| id.clone())
            .collect();
        for g in groups {
            self.unplace_group(&g);
        }
        let drivers: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.status.node_id == node && j.status.state == JobState::Running && !j.attached
            })
            .map(|(id, _)| id.clone())
            .collect();
        for j in drivers {
            self.finish_job(
                &j,
                JobState::Failed,
                -1,
                &format!("the driver's node {node} {how}"),
            );
        }
        if let Some(n) = self.nodes.remove(node) {
            self.gone_nodes.insert(node.to_string(), n);
        }
    }

    // ------------------------------------------------------------------ draining

    /// Starts or goes on draining `node`: no new work goes there, and each object only
    /// it holds is copied to the node that takes work with the fewest stored bytes.
    /// What still keeps it, or `None` for a node not alive.
    pub fn drain(&mut self, node: &str) -> Option<DrainStatus> {
        let n = self.nodes.get_mut(node)?;
        if !n.alive {
            return None;
        }
        if !n.draining {
            info!("{node} is draining");
            n.draining = true;
        }
        let from = n.object_address.clone();
        let running = (n.running.len() + n.ahead.len()) as u32;
        let drivers = self
            .jobs
            .values()
            .filter(|j| {
                j.status.node_id == node && j.status.state == JobState::Running && !j.attached
            })
            .count() as u32;
        let sole: Vec<(String, u64)> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o.locations.len() == 1 && o.locations[0] == node && o.wanted() && o.error.is_none()
            })
            .map(|(id, o)| (id.clone(), o.bytes))
            .collect();
        let left = sole.len() as u32;
        for (id, bytes) in sole {
            if self.copies.contains_key(&id) {
                continue;
            }
            let Some(target) = self
                .nodes
                .iter()
                .filter(|(other, n)| other.as_str() != node && n.takes_work())
                .min_by_key(|(_, n)| n.stored)
                .map(|(other, _)| other.clone())
            else {
                break;
            };
            info!("{node} is draining: copying object {id} to {target}");
            let t = self.nodes.get_mut(&target).expect("picked");
            t.stored += bytes;
            t.send(NodeCommand::CopyObject {
                object_id: id.clone(),
                from: from.clone(),
            });
            self.copies.insert(id, (target, bytes));
        }
        Some(DrainStatus {
            running_tasks: running,
            drivers,
            objects_to_copy: left,
        })
    }

    /// A copy of `object` is (or could not be made) on `node`.
    pub fn object_copied(&mut self, object: &str, node: &str, bytes: u64, error: &str) {
        // What was reserved for it, which a copy of an object freed meanwhile gives
        // back too.
        let Some((target, reserved)) = self.copies.remove(object) else {
            return;
        };
        if let Some(n) = self.nodes.get_mut(&target) {
            n.stored = n.stored.saturating_sub(reserved);
        }
        if !error.is_empty() || target != node {
            info!("object {object}: no copy on {node}: {error}");
            return;
        }
        let alive = self.nodes.get(node).is_some_and(|n| n.alive);
        match self.objects.get_mut(object) {
            // Made again there meanwhile: that copy stays.
            Some(o) if o.locations.iter().any(|l| l == node) => {}
            Some(o) if alive && o.wanted() => {
                o.locations.push(node.to_string());
                if let Some(n) = self.nodes.get_mut(node) {
                    n.stored += bytes;
                }
            }
            // Freed meanwhile (or its node went): the copy goes too.
            _ => {
                if let Some(n) = self.nodes.get(node) {
                    n.send(NodeCommand::FreeObjects(vec![object.to_string()]));
                }
            }
        }
    }

    /// Node `node` leaves after draining.
    pub fn leave(&mut self, node: &str) {
        if self.nodes.get(node).is_some_and(|n| n.alive) {
            info!("{node} left the cluster");
            self.node_gone(node, "left");
        }
    }
}
