//! What workers call on their node: the next task (or actor, or exit) for a worker,
//! a task's result, an actor ready.

use super::*;

impl Agent {
    /// What worker `id` does next, if anything is waiting for it: exit, become an
    /// actor, or run a task (or an actor call).
    fn next_for(&self, id: &str) -> Option<proto::PullResponse> {
        self.next_after(id, None).0
    }

    /// [`Self::next_for`], for a worker whose task of `freed` CPUs just finished: with
    /// nothing else waiting, it takes over a task sent ahead that asks for the same
    /// CPUs (returned second: the head learns it from the finished task's report).
    fn next_after(
        &self,
        id: &str,
        freed: Option<f64>,
    ) -> (Option<proto::PullResponse>, Option<String>) {
        let (next, successor, job) = self.take_next(id, freed);
        // Where each task's output begins in its worker's file (`volley logs --task`).
        if let (Some(next), Some(job)) = (&next, job) {
            let dir = self.options.dir.join("jobs").join(job);
            if let Some(t) = next.task.as_ref().filter(|t| t.actor_id.is_empty()) {
                worker_logs::note_task(&dir, &t.task_id, t.attempt, &t.name, id);
            }
            if let Some(a) = &next.actor {
                worker_logs::note_actor(&dir, &a.actor_id, a.incarnation, id);
            }
        }
        (next, successor)
    }

    /// [`Self::next_after`] under the agent's lock, with the worker's job.
    fn take_next(
        &self,
        id: &str,
        freed: Option<f64>,
    ) -> (Option<proto::PullResponse>, Option<String>, Option<String>) {
        let mut s = self.state.lock().expect("agent lock");
        let s = &mut *s;
        let exit = proto::PullResponse {
            exit: true,
            ..Default::default()
        };
        let Some(w) = s.workers.get_mut(id) else {
            return (Some(exit), None, None);
        };
        if !w.pulled {
            // Its program started as a worker: the job's workers start fine here.
            w.pulled = true;
            s.failed_starts.remove(&w.job);
        }
        if w.exiting {
            return (Some(exit), None, None);
        }
        // A task worker asks for work holding none: a task it still seems to hold is
        // over, and its result never came (the finish call, or the answer that handed
        // it the task, was lost). It is reported lost, so that the head runs it again
        // rather than wait for it.
        if w.actor.is_none() && !w.running.is_empty() {
            let lost = std::mem::take(&mut w.running);
            self.report_lost(lost, &format!("worker {id} moved on without its result"));
        }
        if let Some(a) = w.start_actor.take() {
            w.actor = Some((a.actor_id.clone(), a.incarnation));
            w.actor_held.clone_from(&a.resources);
            let start = proto::PullResponse {
                actor: Some(a),
                ..Default::default()
            };
            return (Some(start), None, Some(w.job.clone()));
        }
        let mut successor = None;
        let mut next = match &w.actor {
            Some((actor, _)) => s.calls.get_mut(actor).and_then(|q| q.pop_front()),
            None => s
                .queues
                .get_mut(&(w.job.clone(), w.gpus.clone()))
                .and_then(|q| q.pop_front()),
        };
        if let (None, Some(cpus), None, true) = (&next, freed, &w.actor, w.gpus.is_empty()) {
            let at = s
                .ahead
                .iter()
                .position(|t| t.job_id == w.job && t.num_cpus == cpus);
            next = at.and_then(|i| s.ahead.remove(i)).map(|mut t| {
                t.ahead = false;
                successor = Some(t.task_id.clone());
                t
            });
        }
        let next = next.map(|task| {
            w.running.push((task.task_id.clone(), task.attempt));
            w.cpus = task.num_cpus;
            proto::PullResponse {
                task: Some(task),
                ..Default::default()
            }
        });
        // A spare taken over by another job hears so first (with its first task).
        let next = match (next, w.moved.take()) {
            (Some(next), None) => Some(next),
            (next, Some(moved)) => Some(proto::PullResponse {
                job: Some(moved),
                ..next.unwrap_or_default()
            }),
            (None, None) => None,
        };
        (next, successor, Some(w.job.clone()))
    }
}

/// What workers call on their node.
pub(super) struct AgentService {
    pub(super) agent: Arc<Agent>,
}

#[tonic::async_trait]
impl proto::node_agent_server::NodeAgent for AgentService {
    async fn pull(
        &self,
        request: Request<proto::PullRequest>,
    ) -> std::result::Result<Response<proto::PullResponse>, Status> {
        let r = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.timeout_ms.min(30_000));
        let agent = &self.agent;
        loop {
            let notified = agent.changed.notified();
            if let Some(next) = agent.next_for(&r.worker_id) {
                return Ok(Response::new(next));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Response::new(proto::PullResponse::default()));
            }
            let _ = tokio::time::timeout(deadline - now, notified).await;
        }
    }

    async fn finish(
        &self,
        request: Request<proto::WorkerResult>,
    ) -> std::result::Result<Response<proto::FinishResponse>, Status> {
        let r = request.into_inner();
        let Some(mut report) = r.report else {
            return Err(Status::invalid_argument("a result without a report"));
        };
        if !r.output.is_empty() {
            // A small result came with the report: it is stored here, and its bytes go
            // on to the head, which hands them to whoever reads it.
            let stored = decode_inline(&report.task_id, &r.output)
                .and_then(|batches| self.agent.store.put(&report.task_id, batches));
            match stored {
                Ok(bytes) => {
                    report.output_bytes = bytes;
                    report.inline = r.output;
                }
                Err(e) => {
                    report.outcome = Outcome::SystemFailure as i32;
                    report.error = Some(wire_execution_error(format!(
                        "cannot store the result: {e}"
                    )));
                }
            }
        }
        let (freed, actor, job) = {
            let mut s = self.agent.state.lock().expect("agent lock");
            // Known as an object of this node (stored by now) in the same step that the
            // task stops running here: a node looking for the objects it keeps (while
            // its head is away) must not take this one for an orphan in between.
            if report.outcome == Outcome::Ok as i32 {
                s.object_rows
                    .insert(report.task_id.clone(), report.output_rows);
            }
            match s.workers.get_mut(&r.worker_id) {
                Some(w) => {
                    let at = w.running.iter().position(|(id, _)| *id == report.task_id);
                    (
                        at.map(|i| w.running.remove(i)).map(|_| w.cpus),
                        w.actor.is_some(),
                        Some(w.job.clone()),
                    )
                }
                None => (None, false, None),
            }
        };
        if let (Some(job), false) = (&job, actor) {
            let dir = self.agent.options.dir.join("jobs").join(job);
            worker_logs::note_task_end(&dir, &report.task_id, report.attempt, &r.worker_id);
        }
        report.node_id = self.agent.node_id.clone();
        let task_id = report.task_id.clone();
        // The worker's next task is chosen before the report leaves: a task sent
        // ahead that takes over this slot travels in it. An actor's worker takes its
        // calls by pulling, one pull at a time, so that they reach the actor in the
        // order they came (it pulls while a call runs: a call handed back here could
        // overtake the one its pull is bringing).
        let (next, successor) = if actor {
            (None, None)
        } else {
            self.agent.next_after(&r.worker_id, freed)
        };
        report.successor = successor.unwrap_or_default();
        if let (true, Some(job)) = (report.outcome == Outcome::Failed as i32, &job) {
            self.agent
                .failed_unreported
                .lock()
                .expect("failed reports lock")
                .insert(
                    task_id.clone(),
                    proto::RunningTask {
                        task_id: task_id.clone(),
                        attempt: report.attempt,
                        job_id: job.clone(),
                        num_cpus: 0.0,
                        actor_call: actor,
                    },
                );
        }
        let may_wait = !self
            .agent
            .state
            .lock()
            .expect("agent lock")
            .ahead
            .is_empty();
        let (tx, rx) = oneshot::channel();
        self.agent
            .reports
            .send(PendingReport {
                report,
                verdict: r.await_verdict.then_some(tx),
                may_wait,
            })
            .map_err(|_| Status::unavailable("the node agent is stopping"))?;
        let stale = if r.await_verdict {
            rx.await
                .map_err(|_| Status::unavailable("the node agent is stopping"))?
        } else {
            false
        };
        if stale {
            // Its worker undoes what the attempt left behind: its object goes too, so
            // that no one (a head restarted since, taking back what this node holds)
            // reads a result whose effects were undone.
            self.agent.free_objects(std::slice::from_ref(&task_id));
        }
        Ok(Response::new(proto::FinishResponse { stale, next }))
    }

    async fn actor_ready(
        &self,
        request: Request<proto::ActorStarted>,
    ) -> std::result::Result<Response<proto::Empty>, Status> {
        let r = request.into_inner();
        self.agent
            .report_actor(
                &r.actor_id,
                r.incarnation,
                r.error.is_empty(),
                r.error,
                r.pid,
            )
            .await;
        Ok(Response::new(proto::Empty {}))
    }
}
