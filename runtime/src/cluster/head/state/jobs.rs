//! Jobs: their drivers' placement and their end (everything of theirs goes).

use std::collections::HashMap;

use super::super::super::jobs::ExecutionProgress;

use tracing::info;

use super::*;

impl State {
    /// A new job's id (`job-0007-1a2b3c`).
    pub fn new_job_id(&mut self) -> String {
        self.next_job += 1;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        format!("job-{:04}-{suffix}", self.next_job)
    }

    /// The last job number given out.
    pub fn next_job(&self) -> u64 {
        self.next_job
    }

    /// Adds a job: a program that joined the cluster itself runs from now on; any other
    /// waits for a node to start its driver. The nodes ready its package meanwhile.
    pub fn add_job(&mut self, mut job: JobEntry) {
        let id = job.status.job_id.clone();
        job.status.state = if job.attached {
            JobState::Running
        } else {
            JobState::Pending
        };
        info!(
            "job {id}: {:?} ({})",
            job.status.entrypoint, job.status.state
        );
        if job.status.state == JobState::Pending {
            self.pending_jobs.insert(id.clone());
        }
        self.jobs.insert(id.clone(), job);
        for n in self.nodes.values().filter(|n| n.takes_work()) {
            n.send(NodeCommand::PrepareJob(id.clone()));
        }
    }

    /// Takes back a job a head before this one kept: one that ended stays as it was;
    /// one that was waiting still waits; one that was running waits [`RESUME_WAIT`]
    /// for its driver to come back and goes on where it was ([`State::check_resumes`]
    /// says what happens if it does not).
    pub fn restore_job(&mut self, mut job: JobEntry) {
        let status = &mut job.status;
        match status.state {
            JobState::Running => {
                // Its driver may still run (on a node that kept it, or a program that
                // joined the cluster itself): it gets a while to come back.
                info!(
                    "job {}: waits {RESUME_WAIT:?} for its driver to come back (the head restarted)",
                    status.job_id
                );
                job.resume_by = Some(Instant::now() + RESUME_WAIT);
                job.replay = Some([0; 4]);
            }
            JobState::Pending => {
                self.pending_jobs.insert(status.job_id.clone());
            }
            _ => {}
        }
        self.jobs.insert(status.job_id.clone(), job);
    }

    /// Jobs whose drivers did not come back within [`RESUME_WAIT`] of a head restart:
    /// a submitted one starts again from the beginning (what its old driver replayed,
    /// and the objects kept for it, go), an attached one fails.
    pub fn check_resumes(&mut self) {
        let late: Vec<(String, bool)> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.status.state == JobState::Running
                    && j.resume_by.is_some_and(|t| Instant::now() > t)
            })
            .map(|(id, j)| (id.clone(), j.attached))
            .collect();
        for (id, attached) in late {
            if attached {
                self.finish_job(
                    &id,
                    JobState::Failed,
                    -1,
                    "the head restarted, and the program that joined the cluster did not \
                     come back",
                );
                continue;
            }
            info!("job {id}: starts again (the head restarted)");
            // Its old driver may have replayed work before it went quiet (its node never
            // rejoined); the new driver starts from nothing. What runs of it stops.
            let running: Vec<(String, String)> = self
                .tasks
                .iter()
                .filter(|(_, t)| t.spec.job_id == id)
                .filter_map(|(t, e)| match &e.state {
                    TaskState::Running { node, .. } => Some((node.clone(), t.clone())),
                    _ => None,
                })
                .collect();
            for (node, t) in running {
                if let Some(n) = self.nodes.get(&node) {
                    n.send(NodeCommand::CancelTask(t));
                }
            }
            let held = self.drop_work(&id, "the job started again (the head restarted)", true);
            self.free_on_nodes(held);
            let j = self.jobs.get_mut(&id).expect("exists");
            j.resume_by = None;
            j.replay = None;
            j.status.state = JobState::Pending;
            j.status.node_id.clear();
            // A node that rejoins later with the old driver is told to stop it.
            self.pending_jobs.insert(id.clone());
        }
    }

    /// A driver has replayed its job to this head: the objects kept for it that no
    /// replayed task claimed go (its driver let go of them while the head was away).
    fn replay_done(&mut self, id: &str) {
        if let Some(j) = self.jobs.get_mut(id) {
            if let Some([done, lineage, queued, running]) = j.replay.take() {
                info!(
                    "job {id}: its driver replayed {} tasks to this head: {done} done on \
                     nodes that kept their objects, {running} running on where they ran, \
                     {lineage} kept as lineage, {queued} to run",
                    done + lineage + queued + running
                );
            }
        }
        self.drop_adopted(id);
    }

    /// Lets go of the objects kept for job `id` across a head restart, on their nodes
    /// too, and stops the tasks and actors nodes kept for it that no one claimed.
    fn drop_adopted(&mut self, id: &str) {
        let runs: Vec<String> = self
            .adopted_runs
            .iter()
            .filter(|(_, r)| r.job == id)
            .map(|(t, _)| t.clone())
            .collect();
        for t in runs {
            let r = self.adopted_runs.remove(&t).expect("listed above");
            if let Some(n) = self.nodes.get_mut(&r.node) {
                n.available.num_cpus += r.cpus;
                if !r.actor_call {
                    n.send(NodeCommand::CancelTask(t));
                }
            }
        }
        let actors: Vec<String> = self
            .adopted_actors
            .iter()
            .filter(|(_, a)| a.job == id)
            .map(|(a, _)| a.clone())
            .collect();
        for a in actors {
            self.stop_adopted_actor(&a);
        }
        let mut free: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let nodes = &mut self.nodes;
        self.adopted.retain(|object, a| {
            let keep = a.job != id;
            if !keep {
                if let Some(n) = nodes.get_mut(&a.node) {
                    n.stored = n.stored.saturating_sub(a.bytes);
                }
                free.entry(a.node.clone()).or_default().push(object.clone());
            }
            keep
        });
        self.free_on_nodes(free);
    }

    /// Tells each node to drop its objects listed in `by_node`.
    fn free_on_nodes(&self, by_node: BTreeMap<String, Vec<String>>) {
        for (node, ids) in by_node {
            if let Some(n) = self.nodes.get(&node) {
                n.send(NodeCommand::FreeObjects(ids));
            }
        }
    }

    /// Job `id`.
    pub fn job(&self, id: &str) -> Result<&JobEntry, Refusal> {
        self.jobs
            .get(id)
            .ok_or_else(|| Refusal::NotFound(format!("no job {id}")))
    }

    /// Every job, oldest first.
    pub fn jobs(&self) -> impl Iterator<Item = &JobEntry> {
        self.jobs.values()
    }

    /// A driver's report on one of its Dataset executions (the last few are kept).
    pub fn report_execution(
        &mut self,
        job: &str,
        report: ExecutionProgress,
    ) -> Result<(), Refusal> {
        /// Executions kept per job.
        const KEPT: usize = 16;
        if !self.jobs.contains_key(job) {
            return Err(Refusal::NotFound(format!("no job {job}")));
        }
        let list = self.executions.entry(job.to_string()).or_default();
        match list.iter_mut().find(|e| e.id == report.id) {
            // A periodic report overtaken by the final one changes nothing.
            Some(e) if e.finished => {}
            Some(e) => *e = report,
            None => {
                list.push(report);
                if list.len() > KEPT {
                    list.remove(0);
                }
            }
        }
        Ok(())
    }

    /// The Dataset executions job `id`'s driver reported (the last few).
    pub fn executions(&self, id: &str) -> Result<&[ExecutionProgress], Refusal> {
        self.job(id)?;
        Ok(self.executions.get(id).map_or(&[], Vec::as_slice))
    }

    /// The executions not yet finished of the jobs running, with their jobs.
    pub fn running_executions(&self) -> Vec<(String, ExecutionProgress)> {
        self.executions
            .iter()
            .filter(|(job, _)| self.job_active(job))
            .flat_map(|(job, list)| {
                list.iter()
                    .filter(|e| !e.finished)
                    .map(|e| (job.clone(), e.clone()))
            })
            .collect()
    }

    /// A job's driver on node `node` (none for a program that joined the cluster
    /// itself) exited with `exit_code` (and `error`, if it could say). A report from a
    /// node that no longer runs the job's driver (one that ran before a head restart,
    /// reported late) changes nothing.
    pub fn driver_exited(&mut self, job: &str, node: &str, exit_code: i32, error: &str) {
        if self
            .jobs
            .get(job)
            .is_some_and(|j| !node.is_empty() && j.status.node_id != node)
        {
            return;
        }
        let (state, error) = if exit_code == 0 && error.is_empty() {
            (JobState::Succeeded, String::new())
        } else if error.is_empty() {
            (
                JobState::Failed,
                format!("the driver exited with code {exit_code}"),
            )
        } else {
            (JobState::Failed, error.to_string())
        };
        self.finish_job(job, state, exit_code, &error);
    }

    /// A driver says it is alive (and, once after a head restart, that it has
    /// replayed its job); refused for a job not running.
    pub fn driver_alive(&mut self, id: &str, replayed: bool) -> Result<(), Refusal> {
        match self.jobs.get_mut(id) {
            Some(j) if j.status.state == JobState::Running => {
                j.last_alive = Instant::now();
                if j.attached {
                    j.resume_by = None;
                }
                if replayed {
                    self.replay_done(id);
                }
                Ok(())
            }
            Some(j) => Err(Refusal::NotNow(format!("job {id} is {}", j.status.state))),
            None => Err(Refusal::NotFound(format!("no job {id}"))),
        }
    }

    /// Fails the running jobs whose programs joined the cluster themselves and have
    /// not said they are alive for longer than `timeout`.
    pub fn check_attached_drivers(&mut self, timeout: Duration) {
        let gone: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                j.attached
                    && j.status.state == JobState::Running
                    && j.resume_by.is_none()
                    && j.last_alive.elapsed() > timeout
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.finish_job(&id, JobState::Failed, -1, "the driver stopped answering");
        }
    }

    pub(super) fn place_drivers(&mut self) {
        let pending: Vec<String> = self.pending_jobs.iter().cloned().collect();
        for id in pending {
            // The index follows each job's state; one that no longer waits leaves it.
            let Some(req) = self
                .jobs
                .get(&id)
                .filter(|j| j.status.state == JobState::Pending)
                .map(|j| j.resources.clone())
            else {
                self.pending_jobs.remove(&id);
                continue;
            };
            let Some((node, gpus)) =
                self.pick_node(&req, &[], &HashMap::new(), false, None, &[], None)
            else {
                continue;
            };
            self.pending_jobs.remove(&id);
            let j = self.jobs.get_mut(&id).expect("exists");
            j.status.state = JobState::Running;
            j.status.node_id = node.clone();
            j.gpus = gpus.clone();
            j.driver_charged = true;
            let cmd = NodeCommand::StartDriver {
                job_id: id.clone(),
                entrypoint: j.status.entrypoint.clone(),
                env: j.env.clone(),
                gpu_ids: gpus,
            };
            info!("job {id}: driver starts on {node}");
            self.nodes[&node].send(cmd);
        }
    }

    /// Ends job `id` in `state` (one of the final ones): its driver's resources are
    /// given back, and its tasks, actors, groups and objects go.
    pub fn finish_job(&mut self, id: &str, state: JobState, exit_code: i32, error: &str) {
        let Some(j) = self.jobs.get_mut(id) else {
            return;
        };
        if j.status.state.is_final() {
            return;
        }
        let had_driver = std::mem::take(&mut j.driver_charged);
        self.jobs_ended += 1;
        self.pending_jobs.remove(id);
        j.status.state = state;
        j.status.exit_code = exit_code;
        j.status.error = error.into();
        j.status.finished_ms = now_ms();
        info!("job {id}: {state} {error}");
        let (node, req, gpus) = (
            j.status.node_id.clone(),
            j.resources.clone(),
            j.gpus.clone(),
        );
        // Nodes drop their copies of the package on `StopJob`; the head's cached files
        // are evicted past its cache limit; the log stays.
        if had_driver {
            self.release(&node, &req, &gpus, &None);
        }
        self.drop_work(id, &format!("job {id} ended"), false);
        for n in self.nodes.values() {
            n.send(NodeCommand::StopJob(id.to_string()));
        }
    }

    /// Takes everything of job `id` out (`why` it goes): its unfinished tasks fail,
    /// its actors stop, its groups, objects and kept lineage go. Returns, if `list`,
    /// the objects that were on nodes, by node (a job that ends has its nodes drop them
    /// all with `StopJob`; one that starts again has them freed one by one).
    fn drop_work(&mut self, id: &str, why: &str, list: bool) -> BTreeMap<String, Vec<String>> {
        // Only its unfinished tasks need failing; the finished ones (most of a job's,
        // kept for their lineage) go in one pass at the end.
        let unfinished: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, t)| {
                t.spec.job_id == id
                    && matches!(t.state, TaskState::Pending | TaskState::Running { .. })
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in &unfinished {
            // Failing one may delete others (an output no one wants takes its
            // task, and the lineage it kept, with it).
            match self.tasks.get(t).map(|t| &t.state) {
                // Its GPUs wait for its worker to be gone (its node kills it with the
                // job), as a cancelled task's do.
                Some(TaskState::Running { gpus, .. })
                    if !gpus.is_empty() && self.tasks[t].spec.actor.is_none() =>
                {
                    self.stop_task(t, cancelled_report(why), TaskEnd::Failed)
                }
                Some(TaskState::Pending | TaskState::Running { .. }) => {
                    self.fail_task(t, cancelled_report(why))
                }
                _ => {}
            }
        }
        let actors: Vec<String> = self
            .actors
            .iter()
            .filter(|(_, a)| a.spec.job_id == id)
            .map(|(a, _)| a.clone())
            .collect();
        for a in actors {
            self.kill_actor(&a, why);
        }
        let groups: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.job == id)
            .map(|(g, _)| g.clone())
            .collect();
        for g in groups {
            self.unplace_group(&g);
            self.groups.remove(&g);
        }
        self.object_groups.retain(|_, g| g.job != id);
        self.drop_adopted(id);
        let mut dropped = 0;
        let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let nodes = &mut self.nodes;
        self.objects.retain(|object, o| {
            let keep = o.job != id;
            if !keep {
                dropped += o.inline.as_ref().map_or(0, |b| b.len() as u64);
                for l in &o.locations {
                    if let Some(n) = nodes.get_mut(l) {
                        n.stored = n.stored.saturating_sub(o.bytes);
                    }
                    if list {
                        held.entry(l.clone()).or_default().push(object.clone());
                    }
                }
            }
            keep
        });
        self.inline_bytes -= dropped;
        self.tasks.retain(|_, t| t.spec.job_id != id);
        self.queue.retain(|id| self.tasks.contains_key(id));
        let tasks = &self.tasks;
        self.claimed.retain(|t, _| tasks.contains_key(t));
        if let Some(j) = self.jobs.get_mut(id) {
            j.actor_history.clear();
        }
        held
    }
}
