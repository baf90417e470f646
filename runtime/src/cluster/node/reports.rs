//! Task reports on their way from the node to the head, many per call.

use super::*;

/// Attempts that failed here (their own code's error) whose report the head has not
/// answered: a node that rejoins a restarted head lists them with its running tasks,
/// so that the head keeps the failure for the driver's replay instead of running the
/// task again (an actor's call would change its actor twice).
pub(super) type FailedUnreported = Arc<Mutex<HashMap<String, proto::RunningTask>>>;

/// A task report on its way to the head.
pub(super) struct PendingReport {
    pub(super) report: proto::TaskReport,
    /// Whoever waits for the head's answer (whether the attempt was stale).
    pub(super) verdict: Option<oneshot::Sender<bool>>,
    /// Tasks sent ahead wait on this node: its workers keep busy without the head for
    /// a while, so the report may wait for others to go with it.
    pub(super) may_wait: bool,
}

impl PendingReport {
    /// A report sent as soon as the link is free.
    pub(super) fn now(report: proto::TaskReport) -> Self {
        Self {
            report,
            verdict: None,
            may_wait: false,
        }
    }
}

/// How long a report may wait for others while tasks sent ahead keep this node busy
/// (the head sends up to 40 ms of work ahead per slot, twice this: see its
/// `ahead_per_slot`), so its workers still have work queued when the report goes. A
/// node finishing thousands of short tasks a second then reports them in a few calls,
/// and the head's cost per task falls with them: 20,000 no-op tasks on two one-CPU
/// nodes took ~0.22 s of the head's CPU with 20 ms here against ~0.28 s with 8 ms, and
/// the job took no longer.
const REPORT_LINGER: Duration = Duration::from_millis(20);

/// Whether the agent is attached to a head: reports wait while it is not (a head that
/// restarted hears them once the node has rejoined it).
type Attached = tokio::sync::watch::Receiver<bool>;

/// Sends task reports to the head, many per call: the reports that arrive while one
/// call is on its way go together in the next, and while tasks wait ahead here (so no
/// worker idles for it) a report waits up to [`REPORT_LINGER`] for more. An idle node,
/// or one whose attempt waits for the head's verdict, adds no delay.
pub(super) async fn report_loop(
    mut head: Head,
    mut rx: mpsc::UnboundedReceiver<PendingReport>,
    mut attached: Attached,
    patience: Duration,
    failed: FailedUnreported,
) {
    while let Some(first) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + REPORT_LINGER;
        let mut wait = first.may_wait && first.verdict.is_none();
        let mut batch = vec![first];
        while batch.len() < 1024 {
            let next = match rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::error::TryRecvError::Empty) if wait => {
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
                Err(_) => None,
            };
            let Some(r) = next else { break };
            wait &= r.may_wait && r.verdict.is_none();
            batch.push(r);
        }
        let (reports, waiters): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.report, p.verdict)).unzip();
        let n = reports.len();
        // Sent again while the head is away (it restarts: the node rejoins it first),
        // for at most the node's patience.
        let deadline = Instant::now() + patience;
        let sent = loop {
            let _ = attached.wait_for(|up| *up).await;
            match head
                .report_tasks(proto::TaskReports {
                    reports: reports.clone(),
                })
                .await
            {
                Err(e) if crate::cluster::net::unreachable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => break other,
            }
        };
        // Answered, or given up on (the head then runs them again anyway).
        let mut failed = failed.lock().expect("failed reports lock");
        if !failed.is_empty() {
            for r in &reports {
                if failed
                    .get(&r.task_id)
                    .is_some_and(|t| t.attempt == r.attempt)
                {
                    failed.remove(&r.task_id);
                }
            }
        }
        drop(failed);
        match sent {
            Ok(acks) => {
                let acks = acks.into_inner().acks;
                for (i, w) in waiters.into_iter().enumerate() {
                    if let Some(w) = w {
                        let _ = w.send(acks.get(i).is_none_or(|a| a.stale));
                    }
                }
            }
            Err(e) => {
                // Not delivered: the head runs these tasks again once it declares this
                // node dead, so the attempts here count as superseded.
                warn!(
                    "cannot report {n} task results to the head: {}",
                    e.message()
                );
                for w in waiters.into_iter().flatten() {
                    let _ = w.send(true);
                }
            }
        }
    }
}

impl Agent {
    /// Reports that task `t` did not run here.
    pub(super) fn report(&self, t: &proto::TaskAssignment, outcome: Outcome, error: String) {
        let report = proto::TaskReport {
            node_id: self.node_id.clone(),
            task_id: t.task_id.clone(),
            attempt: t.attempt,
            outcome: outcome as i32,
            error: Some(wire_execution_error(error)),
            ..Default::default()
        };
        let _ = self.reports.send(PendingReport::now(report));
    }

    /// Tells the head whether incarnation `incarnation` of `actor` is alive here (and
    /// if not, why).
    pub(super) async fn report_actor(
        &self,
        actor: &str,
        incarnation: u32,
        alive: bool,
        error: String,
        pid: u32,
    ) {
        let report = proto::ActorReport {
            node_id: self.node_id.clone(),
            actor_id: actor.to_string(),
            incarnation,
            alive,
            error,
            pid,
        };
        // An end is said again if the head does not take it (a killed actor's GPUs,
        // and whoever waits for it to be gone, wait for that word); the head drops an
        // end it has had already.
        let tries = if alive { 1 } else { 4 };
        for i in 0..tries {
            // Not once a worker here runs the actor again (a head that restarted
            // numbers its incarnations anew, and could take this end for the new one's).
            if i > 0 && self.runs_actor(actor) {
                return;
            }
            let mut head = self.head.clone();
            if head.report_actor(report.clone()).await.is_ok() {
                return;
            }
            if i + 1 < tries {
                tokio::time::sleep(std::time::Duration::from_millis(500 << i)).await;
            }
        }
    }
}
