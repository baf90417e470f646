//! The object directory: where each object's copies are, who still reads it, and its
//! lineage (the task that makes it again when its last copy is lost).

use tracing::info;

use super::*;

impl State {
    pub(super) fn object_addresses(&self, id: &str) -> Vec<String> {
        self.objects
            .get(id)
            .map(|o| {
                o.locations
                    .iter()
                    .filter_map(|n| self.nodes.get(n).filter(|n| n.alive))
                    .map(|n| n.object_address.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether object `o` has a live copy.
    pub(super) fn object_ready(&self, o: &ObjectEntry) -> bool {
        o.locations
            .iter()
            .any(|n| self.nodes.get(n).is_some_and(|n| n.alive))
    }

    /// What a waiting driver learns of object `id`.
    pub fn object_status(&self, id: &str) -> ObjectStatus {
        match self.objects.get(id).filter(|o| !o.lineage_only) {
            None => ObjectStatus {
                object_id: id.to_string(),
                ready: false,
                error: Some(execution_report(format!(
                    "object {id} is unknown (freed, or its job ended)"
                ))),
                location: None,
            },
            Some(o) => {
                let addresses = self.object_addresses(id);
                let ready = !addresses.is_empty();
                ObjectStatus {
                    object_id: id.to_string(),
                    ready,
                    error: o.error.clone(),
                    location: Some(ObjectLocation {
                        object_id: id.to_string(),
                        addresses,
                        bytes: o.bytes,
                        rows: o.rows,
                        inline: o.inline.clone().filter(|_| ready).unwrap_or_default(),
                        batch: None,
                    }),
                }
            }
        }
    }

    /// Whether object `id` is settled: it has a live copy, will never have one (its
    /// task failed for good), or is unknown.
    /// The job object `id` belongs to.
    pub fn object_job(&self, id: &str) -> Option<&str> {
        self.objects.get(id).map(|o| o.job.as_str())
    }

    pub fn object_settled(&self, id: &str) -> bool {
        self.objects
            .get(id)
            .is_none_or(|o| o.lineage_only || o.error.is_some() || self.object_ready(o))
    }

    /// Records an object a driver put into the store at `address` itself.
    pub fn put_object(
        &mut self,
        job: &str,
        object_id: &str,
        address: &str,
        bytes: u64,
        rows: u64,
    ) -> Result<(), Refusal> {
        if self.objects.contains_key(object_id) {
            // Put again by a driver replaying what a head before this one knew.
            return Ok(());
        }
        let node = match self.adopted.remove(object_id) {
            // Kept across a head restart by its node, which rejoined (its bytes are
            // counted there already).
            Some(a) => a.node,
            None => {
                let (node, n) = self
                    .nodes
                    .iter_mut()
                    .find(|(_, n)| n.alive && n.object_address == address)
                    .ok_or_else(|| Refusal::NotFound(format!("no live node at {address}")))?;
                n.stored += bytes;
                node.clone()
            }
        };
        self.objects.insert(
            object_id.to_string(),
            Box::new(ObjectEntry::new(job, None, vec![node], bytes, rows)),
        );
        Ok(())
    }

    /// The driver is done with these objects: each goes once no task still reads it.
    pub fn free(&mut self, ids: &[String]) {
        for id in ids {
            if let Some(g) = self.object_groups.get_mut(id) {
                g.freed = true;
                self.try_delete_group(id);
            } else if let Some(o) = self.objects.get_mut(id) {
                o.freed = true;
                self.try_delete(id);
            }
        }
    }

    /// The object store of the node that takes work with the fewest bytes in memory
    /// (for a driver's own objects).
    pub fn emptiest_store(&self) -> Option<String> {
        self.nodes
            .values()
            .filter(|n| n.takes_work())
            .min_by_key(|n| n.load.object_store_bytes)
            .map(|n| n.object_address.clone())
    }

    /// Drops the copies of `input` in the stores `from` (task `id` could not read
    /// them); rebuilds it if none is left.
    pub(super) fn copies_unreadable(
        &mut self,
        id: &str,
        input: &str,
        from: &[String],
        error: &str,
    ) {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| from.contains(&n.object_address))
            .map(|(node, _)| node.clone())
            .collect();
        let mut lost_on = None;
        if let Some(o) = self.objects.get_mut(input) {
            let had = o.locations.len();
            let bytes = o.bytes;
            o.locations.retain(|l| !nodes.contains(l));
            if o.locations.len() < had {
                for n in &nodes {
                    if let Some(n) = self.nodes.get_mut(n) {
                        n.stored = n.stored.saturating_sub(bytes);
                    }
                }
                if o.locations.is_empty() && o.error.is_none() {
                    lost_on = nodes.first().cloned();
                }
            }
        }
        if let Some(node) = lost_on {
            info!("task {id} cannot read {input} on {node}: {error}");
            self.reconstruct(input, &node);
        }
    }

    /// Names objects `members` of job `job` as group `id`: a task argument naming the
    /// group stands for each of them. The group holds them until it is freed and no
    /// task that reads it is left.
    pub fn create_object_group(
        &mut self,
        job: &str,
        id: &str,
        members: Vec<String>,
    ) -> Result<(), Refusal> {
        self.require_running(job)?;
        if self.object_groups.contains_key(id) {
            // Named again by a driver replaying what a head before this one knew.
            return Ok(());
        }
        if self.objects.contains_key(id) {
            return Err(Refusal::Invalid(format!("object {id} exists")));
        }
        for m in &members {
            match self.objects.get(m) {
                None => {
                    return Err(Refusal::NotFound(format!(
                        "object {m} (of group {id}) was freed or never existed"
                    )))
                }
                Some(o) if o.job != job => {
                    return Err(Refusal::Invalid(format!(
                        "object {m} (of group {id}) belongs to job {}, not {job}",
                        o.job
                    )))
                }
                Some(_) => {}
            }
        }
        for m in &members {
            if let Some(o) = self.objects.get_mut(m) {
                o.users += 1;
            }
        }
        self.object_groups.insert(
            id.to_string(),
            ObjectGroup {
                job: job.to_string(),
                members,
                freed: false,
                users: 0,
            },
        );
        Ok(())
    }

    /// The objects argument `arg` stands for: a group's members, or itself.
    pub(super) fn arg_objects<'a>(&'a self, arg: &'a String) -> std::slice::Iter<'a, String> {
        match self.object_groups.get(arg) {
            Some(g) => g.members.iter(),
            None => std::slice::from_ref(arg).iter(),
        }
    }

    /// A task that reads `args` starts to count (again) among their users.
    pub(super) fn hold_args(&mut self, args: &[String]) {
        for a in args {
            if let Some(g) = self.object_groups.get_mut(a) {
                g.users += 1;
            } else if let Some(o) = self.objects.get_mut(a) {
                o.users += 1;
            }
        }
    }

    /// Deletes a freed group once no unfinished task reads it; its objects are let go.
    fn try_delete_group(&mut self, id: &str) {
        if !self
            .object_groups
            .get(id)
            .is_some_and(|g| g.freed && g.users == 0)
        {
            return;
        }
        let g = self.object_groups.remove(id).expect("checked above");
        self.release_args(&g.members);
    }

    pub(super) fn release_args(&mut self, args: &[String]) {
        for a in args {
            if let Some(g) = self.object_groups.get_mut(a) {
                g.users = g.users.saturating_sub(1);
                self.try_delete_group(a);
            } else if let Some(o) = self.objects.get_mut(a) {
                o.users = o.users.saturating_sub(1);
                if o.freed {
                    self.try_delete(a);
                }
            }
        }
    }

    /// Deletes a freed object once no unfinished task needs it. One a kept task may
    /// read again (`lineage_users`) loses only its copies when its task can make it
    /// again, and is kept whole when it cannot.
    pub(super) fn try_delete(&mut self, id: &str) {
        let Some(o) = self.objects.get(id) else {
            return;
        };
        if o.users > 0 {
            return;
        }
        if let Some(p) = &o.producer {
            if matches!(
                self.tasks.get(p).map(|t| &t.state),
                Some(TaskState::Pending | TaskState::Running { .. })
            ) {
                return;
            }
        }
        if o.lineage_users > 0 {
            if !self.can_make_again(o) {
                return;
            }
            let released = o.lineage_only;
            self.drop_copies(id);
            let o = self.objects.get_mut(id).expect("looked up above");
            o.lineage_only = true;
            if !released {
                let args = o.producer.as_ref().and_then(|p| self.tasks.get(p));
                let args = args.map(|t| t.spec.args.clone()).unwrap_or_default();
                self.release_lineage(&args);
            }
            return;
        }
        self.drop_copies(id);
        let o = self.objects.remove(id).expect("checked above");
        let Some(task) = o.producer.and_then(|p| self.tasks.remove(&p)) else {
            return;
        };
        if !o.lineage_only {
            self.release_lineage(&task.spec.args);
        }
    }

    /// Whether the task that made `o` can run again once `o` is let go: a task (not an
    /// actor's call, whose actor may be gone or changed) whose placement group, if
    /// any, is still there, and whose own inputs its driver still holds (lineage is
    /// one task deep: an input freed too may be gone by then). A block made from a
    /// freed input (a map stage's output, a reduce output of an earlier exchange) is
    /// kept whole instead.
    fn can_make_again(&self, o: &ObjectEntry) -> bool {
        let Some(task) = o.producer.as_ref().and_then(|p| self.tasks.get(p)) else {
            return false;
        };
        let held = |a: &String| match self.object_groups.get(a) {
            Some(g) => !g.freed,
            None => self.objects.get(a).is_some_and(|i| !i.freed),
        };
        task.spec.actor.is_none()
            && task
                .spec
                .bundle
                .as_ref()
                .is_none_or(|b| self.groups.contains_key(&b.group))
            && task.spec.args.iter().all(held)
    }

    /// A kept task that named `args` is gone (or its output keeps only its lineage):
    /// they are no longer kept for it.
    pub(super) fn release_lineage(&mut self, args: &[String]) {
        for a in args {
            let Some(input) = self.objects.get_mut(a) else {
                continue;
            };
            input.lineage_users = input.lineage_users.saturating_sub(1);
            if input.freed && input.lineage_users == 0 {
                self.try_delete(a);
            }
        }
    }

    /// Deletes the copies of object `id` (and its inline bytes) on every node.
    fn drop_copies(&mut self, id: &str) {
        let Some(o) = self.objects.get_mut(id) else {
            return;
        };
        self.inline_bytes -= o.inline.take().map_or(0, |b| b.len() as u64);
        for n in std::mem::take(&mut o.locations) {
            if let Some(node) = self.nodes.get_mut(&n) {
                node.stored = node.stored.saturating_sub(o.bytes);
                node.send(NodeCommand::FreeObjects(vec![id.to_string()]));
            }
        }
    }

    /// Object `object`'s last copy was lost with node `node`: its task runs again.
    pub(super) fn reconstruct(&mut self, object: &str, node: &str) {
        self.make_again(object, &format!("was lost with node {node}"));
    }

    /// Runs the task that made `object` again (`why`: what became of its copies), and
    /// first those of its inputs that are gone too.
    pub(super) fn make_again(&mut self, object: &str, why: &str) {
        let producer = self.objects.get(object).and_then(|o| o.producer.clone());
        let Some(p) = producer else {
            if let Some(o) = self.objects.get_mut(object) {
                o.error = Some(execution_report(format!(
                    "object {object} {why} and has no task to rebuild it"
                )));
            }
            return;
        };
        let Some(task) = self.tasks.get(&p) else {
            return;
        };
        if task.state != TaskState::Done {
            return;
        }
        if let Some(b) = task.spec.bundle.as_ref() {
            if !self.groups.contains_key(&b.group) {
                let e = format!(
                    "object {object} {why} and its placement group {} was removed",
                    b.group
                );
                if let Some(o) = self.objects.get_mut(object) {
                    o.error = Some(execution_report(e));
                }
                return;
            }
        }
        // A call of an actor changed the actor's state: it is not run again on the
        // actor (restarted or not) to make its output (as Ray's actor tasks, which run
        // again only with retries, by default none).
        if let Some(actor) = task.spec.actor.as_ref() {
            let e = format!(
                "object {object} {why}; it was made by a call of actor {actor}, which is \
                 not run again (it changed the actor's state once)"
            );
            if let Some(o) = self.objects.get_mut(object) {
                o.error = Some(execution_report(e));
            }
            return;
        }
        let task = self.tasks.get_mut(&p).expect("looked up above");
        if task.reconstructions >= 10 {
            if let Some(o) = self.objects.get_mut(object) {
                o.error = Some(execution_report(format!(
                    "object {object} was lost too many times"
                )));
            }
            return;
        }
        task.reconstructions += 1;
        task.attempt += 1;
        task.state = TaskState::Pending;
        task.pending_since = Instant::now();
        task.ready_since = None;
        task.passed_over = false;
        let args = task.spec.args.clone();
        if let Some(j) = self.jobs.get_mut(&task.spec.job_id) {
            j.status.task_retries += 1;
        }
        self.hold_args(&args);
        info!("object {object} {why}: re-running task {p}");
        self.enqueue(p.clone(), true);
        // Inputs let go since (only their lineage kept) are made again first.
        let gone: Vec<String> = args
            .iter()
            .flat_map(|a| self.arg_objects(a))
            .filter(|a| {
                self.objects
                    .get(*a)
                    .is_some_and(|o| o.error.is_none() && !self.object_ready(o))
            })
            .cloned()
            .collect();
        for a in gone {
            self.make_again(&a, &format!("was let go and task {p} reads it"));
        }
    }
}
