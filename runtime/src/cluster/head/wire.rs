//! Conversions between the protocol's generated types and the head's own, at the edge
//! of the state machine: the service and the store use them, the state machine never
//! sees a protocol type.

use std::collections::HashMap;

use super::super::jobs::ExecutionProgress;
use super::super::net::{error_report, wire_error};
use super::super::proto::{self, node_command::Command, task_report::Outcome};
use super::super::resources::Resources;
use super::super::status::{ClusterStatus, JobStatus, NodeState};
use super::state::*;

fn bundle_choice(group: String, index: i32) -> Option<BundleChoice> {
    (!group.is_empty()).then(|| BundleChoice {
        group,
        index: usize::try_from(index).ok(),
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<proto::SubmitTaskRequest> for TaskSpec {
    fn from(r: proto::SubmitTaskRequest) -> Self {
        Self {
            resources: r.resources.into(),
            arg_batches: r
                .arg_batches
                .iter()
                .map(|b| u32::try_from(*b).ok())
                .collect(),
            bundle: bundle_choice(r.placement_group, r.bundle_index),
            actor: non_empty(r.actor_id),
            job_id: r.job_id,
            task_id: r.task_id,
            name: r.name,
            payload: r.payload,
            args: r.args,
            max_retries: r.max_retries,
            made: r.made,
        }
    }
}

impl From<proto::CreateActorRequest> for ActorSpec {
    fn from(r: proto::CreateActorRequest) -> Self {
        Self {
            resources: r.resources.into(),
            bundle: bundle_choice(r.placement_group, r.bundle_index),
            job_id: r.job_id,
            actor_id: r.actor_id,
            name: r.name,
            payload: r.payload.into(),
            max_restarts: r.max_restarts,
        }
    }
}

/// A placement strategy from the wire (an unknown one packs).
pub(super) fn strategy(wire: i32) -> Strategy {
    use proto::create_placement_group_request::Strategy as S;
    match S::try_from(wire).unwrap_or(S::Pack) {
        S::Pack => Strategy::Pack,
        S::Spread => Strategy::Spread,
        S::StrictPack => Strategy::StrictPack,
        S::StrictSpread => Strategy::StrictSpread,
    }
}

impl From<proto::TaskReport> for TaskReport {
    fn from(r: proto::TaskReport) -> Self {
        let outcome = match Outcome::try_from(r.outcome).unwrap_or(Outcome::SystemFailure) {
            Outcome::Ok => TaskOutcome::Succeeded {
                bytes: r.output_bytes,
                rows: r.output_rows,
                inline: r.inline,
            },
            Outcome::Failed => TaskOutcome::Failed(r.error.as_ref().map_or_else(
                || volley_common::ErrorReport::new(volley_common::ErrorKind::Execution, "failed"),
                error_report,
            )),
            Outcome::NoWorker => TaskOutcome::NoWorker {
                error: r.error.map(|e| e.message).unwrap_or_default(),
            },
            Outcome::SystemFailure => TaskOutcome::SystemFailure {
                error: r.error.map(|e| e.message).unwrap_or_default(),
                unreadable: r
                    .unreadable
                    .into_iter()
                    .map(|u| UnreadableInput {
                        object_id: u.object_id,
                        from: u.from,
                    })
                    .collect(),
            },
        };
        Self {
            node_id: r.node_id,
            task_id: r.task_id,
            attempt: r.attempt,
            outcome,
            successor: non_empty(r.successor),
            run_time: std::time::Duration::from_micros(r.run_micros),
        }
    }
}

impl From<ObjectLocation> for proto::ObjectLocation {
    fn from(l: ObjectLocation) -> Self {
        Self {
            object_id: l.object_id,
            addresses: l.addresses,
            bytes: l.bytes,
            rows: l.rows,
            inline: l.inline,
            batch: l.batch,
        }
    }
}

impl From<ObjectStatus> for proto::ObjectStatus {
    fn from(s: ObjectStatus) -> Self {
        Self {
            object_id: s.object_id,
            ready: s.ready,
            error: s.error.as_ref().map(wire_error),
            location: s.location.map(Into::into),
        }
    }
}

impl From<LogQuery> for proto::LogQuery {
    fn from(q: LogQuery) -> Self {
        Self {
            query_id: q.query_id,
            job_id: q.job_id,
            task: q.task,
            actor_id: q.actor_id,
            list: q.list,
            seen: q.seen,
        }
    }
}

impl From<proto::LogQuery> for LogQuery {
    fn from(q: proto::LogQuery) -> Self {
        Self {
            query_id: q.query_id,
            job_id: q.job_id,
            task: q.task,
            actor_id: q.actor_id,
            list: q.list,
            seen: q.seen,
        }
    }
}

impl From<NodeCommand> for proto::NodeCommand {
    fn from(c: NodeCommand) -> Self {
        let command = match c {
            NodeCommand::RunTask(a) => Command::RunTask(proto::TaskAssignment {
                task_id: a.task_id,
                attempt: a.attempt,
                job_id: a.job_id,
                payload: a.payload,
                args: a.args.into_iter().map(Into::into).collect(),
                gpu_ids: a.gpu_ids,
                actor_id: a.actor.unwrap_or_default(),
                name: a.name,
                ahead: a.ahead,
                num_cpus: a.num_cpus,
            }),
            NodeCommand::PromoteTask(id) => Command::PromoteTask(id),
            NodeCommand::CancelTask(id) => Command::CancelTask(id),
            NodeCommand::FreeObjects(ids) => Command::FreeObjects(proto::ObjectIds { ids }),
            NodeCommand::PrepareJob(id) => Command::PrepareJob(id),
            NodeCommand::StopJob(id) => Command::StopJob(id),
            NodeCommand::StartDriver {
                job_id,
                entrypoint,
                env,
                gpu_ids,
            } => Command::StartDriver(proto::StartDriver {
                job_id,
                entrypoint,
                env,
                gpu_ids,
            }),
            NodeCommand::StartActor {
                actor_id,
                job_id,
                payload,
                gpu_ids,
                incarnation,
                resources,
            } => Command::StartActor(proto::StartActor {
                actor_id,
                job_id,
                payload: payload.to_vec(),
                gpu_ids,
                incarnation,
                resources: Some((&resources).into()),
            }),
            NodeCommand::StopActor(id) => Command::StopActor(id),
            NodeCommand::CopyObject { object_id, from } => {
                Command::CopyObject(proto::ObjectCopy { object_id, from })
            }
            NodeCommand::ReadLogs(q) => Command::ReadLogs(q.into()),
        };
        Self {
            command: Some(command),
        }
    }
}

impl From<DrainStatus> for proto::DrainStatus {
    fn from(d: DrainStatus) -> Self {
        Self {
            running_tasks: d.running_tasks,
            drivers: d.drivers,
            objects_to_copy: d.objects_to_copy,
        }
    }
}

impl From<ActorRecord> for proto::ActorStatus {
    fn from(a: ActorRecord) -> Self {
        let (state, node_id, error) = a.state.parts();
        Self {
            state: state.into(),
            node_id: node_id.into(),
            error: error.into(),
            actor_id: a.actor_id,
            restarts: a.restarts,
            pid: a.pid.unwrap_or(0),
            name: a.name,
            exited: a.exited,
        }
    }
}

impl From<GroupStatus> for proto::PlacementGroupStatus {
    fn from(g: GroupStatus) -> Self {
        Self {
            ready: g.ready,
            bundle_nodes: g
                .bundle_nodes
                .into_iter()
                .map(Option::unwrap_or_default)
                .collect(),
        }
    }
}

/// A job's full record on the wire and in the store.
pub(super) fn job_info(j: &JobEntry) -> proto::JobInfo {
    let s = &j.status;
    proto::JobInfo {
        job_id: s.job_id.clone(),
        name: s.name.clone(),
        state: s.state.to_string(),
        entrypoint: s.entrypoint.clone(),
        node_id: s.node_id.clone(),
        exit_code: s.exit_code,
        error: s.error.clone(),
        submitted_ms: s.submitted_ms,
        finished_ms: s.finished_ms,
        env: j.env.clone(),
        attached: j.attached,
        share_workers: j.share_workers,
        resources: Some((&j.resources).into()),
        task_retries: s.task_retries,
        waiting: s.waiting.clone(),
    }
}

/// A job's actors that restarted or died, as its record in the store keeps them.
pub(super) fn stored_actors(j: &JobEntry) -> Vec<proto::StoredActor> {
    j.actor_history
        .iter()
        .map(|(id, h)| proto::StoredActor {
            actor_id: id.clone(),
            restarts: h.restarts,
            dead: h.dead.is_some(),
            error: h.dead.clone().unwrap_or_default(),
        })
        .collect()
}

/// A job's actors' history from its record in the store.
pub(super) fn actor_history(
    actors: Vec<proto::StoredActor>,
) -> std::collections::BTreeMap<String, ActorHistory> {
    actors
        .into_iter()
        .map(|a| {
            let dead = a.dead.then_some(a.error);
            let history = ActorHistory {
                restarts: a.restarts,
                dead,
            };
            (a.actor_id, history)
        })
        .collect()
}

/// A job's record as it is answered now: with what it waits for, out of `waiting`
/// ([`State::waiting`](super::state::State::waiting)).
pub(super) fn job_info_now(j: &JobEntry, waiting: &HashMap<String, Waiting>) -> proto::JobInfo {
    let mut info = job_info(j);
    if let Some(w) = waiting.get(&j.status.job_id) {
        info.waiting = w.reason.clone();
    }
    info
}

/// A job from its record on the wire or in the store.
pub(super) fn job_entry(info: proto::JobInfo) -> JobEntry {
    let resources: Resources = info.resources.clone().into();
    let (env, attached, share_workers) = (info.env.clone(), info.attached, info.share_workers);
    let mut job = JobEntry::new(JobStatus::from(info), env, attached, resources);
    job.share_workers = share_workers;
    job
}

impl From<&ClusterStatus> for proto::ClusterStatus {
    fn from(s: &ClusterStatus) -> Self {
        Self {
            nodes: s
                .nodes
                .iter()
                .map(|n| proto::NodeInfo {
                    node_id: n.node_id.clone(),
                    hostname: n.hostname.clone(),
                    object_address: n.object_address.clone(),
                    alive: n.alive(),
                    draining: matches!(n.state, NodeState::Draining | NodeState::Left),
                    total: Some((&n.total).into()),
                    available: Some((&n.available).into()),
                    object_store_bytes: n.object_store_bytes,
                    spilled_bytes: n.spilled_bytes,
                    spilled_total: n.spilled_total,
                    workers: n.workers,
                    running_tasks: n.running_tasks,
                    object_store_memory: n.object_store_memory,
                })
                .collect(),
            pending_tasks: s.pending_tasks,
            running_tasks: s.running_tasks,
            running_jobs: s.running_jobs,
            objects: s.objects,
        }
    }
}

/// A Dataset execution of job `job` on the wire.
pub(super) fn execution(job: &str, e: &ExecutionProgress) -> proto::ExecutionProgress {
    proto::ExecutionProgress {
        job_id: job.to_string(),
        execution_id: e.id.clone(),
        operators: e
            .operators
            .iter()
            .map(proto::OperatorProgress::from)
            .collect(),
        finished: e.finished,
        started_ms: e.started_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's actor history goes into its stored record and comes back the same.
    #[test]
    fn an_actor_history_survives_the_store() {
        let mut job = JobEntry::new(
            JobStatus::from(proto::JobInfo::default()),
            HashMap::new(),
            false,
            Resources::default(),
        );
        job.actor_history.insert(
            "a1".into(),
            ActorHistory {
                restarts: 2,
                dead: Some("exit 3".into()),
            },
        );
        job.actor_history.insert(
            "a2".into(),
            ActorHistory {
                restarts: 1,
                dead: None,
            },
        );
        assert_eq!(actor_history(stored_actors(&job)), job.actor_history);
    }
}
