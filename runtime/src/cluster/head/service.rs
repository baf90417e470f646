//! The head's gRPC face: each call converts its request to the state machine's types
//! ([`super::wire`]), runs the event on [`HeadCore`], and converts the answer back.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;
use volley_common::{ErrorReport, VolleyError};

use super::super::jobs::ExecutionProgress;
use super::super::net::wire_error;
use super::super::package::{blob_chunks, check_manifest, receive_blobs};
use super::super::proto;
use super::super::resources::Resources;
use super::state::{
    Kept, KeptActor, KeptObject, KeptRun, NodeCommand, NodeLoad, NodeRegistration, Refusal,
    Rejoined, State,
};
use super::{wire, HeadCore};

/// The head's gRPC face.
#[derive(Debug, Clone)]
pub struct HeadService {
    core: Arc<HeadCore>,
}

impl HeadService {
    /// Serves `core`.
    pub fn new(core: Arc<HeadCore>) -> Self {
        Self { core }
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

type Answer<T> = std::result::Result<Response<T>, Status>;

fn invalid(e: VolleyError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn refused(r: Refusal) -> Status {
    match r {
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::NotNow(m) => Status::failed_precondition(m),
        Refusal::Invalid(m) => Status::invalid_argument(m),
    }
}

fn not_found(e: VolleyError) -> Status {
    Status::not_found(e.to_string())
}

fn empty() -> Answer<proto::Empty> {
    Ok(Response::new(proto::Empty {}))
}

#[tonic::async_trait]
impl proto::head_server::Head for HeadService {
    async fn register_node(
        &self,
        request: Request<proto::RegisterNodeRequest>,
    ) -> Answer<proto::RegisterNodeResponse> {
        let r = request.into_inner();
        let total: Resources = r.total.into();
        total.validate().map_err(invalid)?;
        let node = NodeRegistration {
            hostname: r.hostname,
            object_address: r.object_address,
            total,
            gpu_ids: r.gpu_ids,
            object_store_memory: r.object_store_memory,
        };
        let (node_id, rejoined) = if r.rejoin.is_empty() {
            (
                self.core.with(|s| s.register_node(node)),
                Rejoined::default(),
            )
        } else {
            let kept = Kept {
                objects: r
                    .objects
                    .into_iter()
                    .map(|o| KeptObject {
                        id: o.object_id,
                        job: o.job_id,
                        bytes: o.bytes,
                        rows: o.rows,
                    })
                    .collect(),
                drivers: r.drivers,
                running: r
                    .running
                    .into_iter()
                    .map(|t| KeptRun {
                        id: t.task_id,
                        job: t.job_id,
                        attempt: t.attempt,
                        cpus: t.num_cpus,
                        actor_call: t.actor_call,
                    })
                    .collect(),
                actors: r
                    .actors
                    .into_iter()
                    .map(|a| KeptActor {
                        id: a.actor_id,
                        job: a.job_id,
                        incarnation: a.incarnation,
                        pid: a.pid,
                        resources: a.resources.into(),
                    })
                    .collect(),
            };
            let rejoined = self
                .core
                .with(|s| s.rejoin_node(&r.rejoin, node, kept))
                .map_err(refused)?;
            (r.rejoin, rejoined)
        };
        Ok(Response::new(proto::RegisterNodeResponse {
            node_id,
            heartbeat_interval_ms: self.core.options.heartbeat_interval.as_millis() as u64,
            drop_jobs: rejoined.drop_jobs,
            free_objects: rejoined.free_objects,
            cancel_tasks: rejoined.cancel_tasks,
            stop_actors: rejoined.stop_actors,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Answer<proto::HeartbeatResponse> {
        let r = request.into_inner();
        let load = NodeLoad {
            object_store_bytes: r.object_store_bytes,
            spilled_bytes: r.spilled_bytes,
            spilled_total: r.spilled_total,
            workers: r.workers,
        };
        // Figures only: nothing to place, nobody to wake.
        let known = self
            .core
            .state
            .lock()
            .expect("head lock")
            .heartbeat(&r.node_id, load);
        Ok(Response::new(proto::HeartbeatResponse { known }))
    }

    type AttachStream = Boxed<proto::NodeCommand>;

    async fn attach(&self, request: Request<proto::AttachRequest>) -> Answer<Self::AttachStream> {
        let id = request.into_inner().node_id;
        let (tx, rx) = mpsc::unbounded_channel::<NodeCommand>();
        self.core.with(|s| s.attach(&id, tx)).map_err(refused)?;
        let commands = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(|c| Ok(proto::NodeCommand::from(c)));
        Ok(Response::new(Box::pin(commands)))
    }

    async fn report_tasks(
        &self,
        request: Request<proto::TaskReports>,
    ) -> Answer<proto::ReportAcks> {
        let reports = request.into_inner().reports;
        let acks = self.core.with(|s| {
            reports
                .into_iter()
                .map(|r| proto::ReportAck {
                    stale: !s.task_reported(r.into()),
                })
                .collect()
        });
        Ok(Response::new(proto::ReportAcks { acks }))
    }

    async fn report_actor(&self, request: Request<proto::ActorReport>) -> Answer<proto::Empty> {
        let r = request.into_inner();
        self.core.with(|s| {
            s.actor_reported(
                &r.actor_id,
                &r.node_id,
                r.incarnation,
                r.alive,
                r.pid,
                &r.error,
            )
        });
        empty()
    }

    async fn report_driver_exit(
        &self,
        request: Request<proto::DriverExit>,
    ) -> Answer<proto::Empty> {
        let r = request.into_inner();
        self.core
            .with(|s| s.driver_exited(&r.job_id, &r.node_id, r.exit_code, &r.error));
        empty()
    }

    async fn drain_node(
        &self,
        request: Request<proto::DrainRequest>,
    ) -> Answer<proto::DrainStatus> {
        let r = request.into_inner();
        let status = self.core.with(|s| {
            if r.leave {
                s.leave(&r.node_id);
                Some(Default::default())
            } else {
                s.drain(&r.node_id)
            }
        });
        status
            .map(|d| Response::new(d.into()))
            .ok_or_else(|| Status::not_found(format!("no live node {}", r.node_id)))
    }

    async fn report_object_copied(
        &self,
        request: Request<proto::ObjectCopied>,
    ) -> Answer<proto::Empty> {
        let r = request.into_inner();
        self.core
            .with(|s| s.object_copied(&r.object_id, &r.node_id, r.bytes, &r.error));
        empty()
    }

    async fn report_execution(
        &self,
        request: Request<proto::ExecutionProgress>,
    ) -> Answer<proto::Empty> {
        let r = request.into_inner();
        let job = r.job_id.clone();
        let report = ExecutionProgress::from(r);
        // Figures only: nothing to place, nobody to wake.
        let mut s = self.core.state.lock().expect("head lock");
        s.report_execution(&job, report).map_err(refused)?;
        empty()
    }

    async fn get_executions(&self, request: Request<proto::JobId>) -> Answer<proto::JobExecutions> {
        let id = request.into_inner().job_id;
        let executions = self
            .core
            .read(|s| {
                s.executions(&id)
                    .map(|list| list.iter().map(|e| wire::execution(&id, e)).collect())
            })
            .map_err(refused)?;
        Ok(Response::new(proto::JobExecutions { executions }))
    }

    async fn reply_logs(&self, request: Request<proto::LogReply>) -> Answer<proto::Empty> {
        let r = request.into_inner();
        let waiting = self.core.log_queries.lock().expect("queries lock");
        if let Some(tx) = waiting.get(&r.query_id) {
            let _ = tx.send(r);
        }
        empty()
    }

    async fn append_log(&self, request: Request<proto::LogAppend>) -> Answer<proto::Empty> {
        use std::io::Write;
        let r = request.into_inner();
        if self.core.read(|s| s.job(&r.job_id).is_ok()) {
            let dir = self.core.job_dir(&r.job_id);
            // How much of this driver run's output the log has: a chunk sent again
            // (its answer lost as a head stopped) adds only what is new.
            let mark = dir.join("driver.offset");
            let had = std::fs::read_to_string(&mark)
                .ok()
                .and_then(|m| {
                    let (run, n) = m.trim().split_once(' ')?;
                    (run == r.run).then(|| n.parse::<u64>().ok()).flatten()
                })
                .unwrap_or(0);
            let skip = had.saturating_sub(r.offset) as usize;
            if skip < r.data.len() {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("driver.log"))
                    .map_err(|e| Status::internal(e.to_string()))?;
                f.write_all(&r.data[skip..])
                    .map_err(|e| Status::internal(e.to_string()))?;
                let end = r.offset + r.data.len() as u64;
                std::fs::write(&mark, format!("{} {end}", r.run))
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
        }
        self.core.logs.notify_waiters();
        empty()
    }

    async fn fetch_package(
        &self,
        request: Request<proto::JobId>,
    ) -> Answer<proto::PackageManifest> {
        let id = request.into_inner().job_id;
        let packages = self.core.packages.lock().expect("packages lock");
        packages
            .get(&id)
            .map(|p| Response::new(p.clone()))
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    type FetchBlobStream = Boxed<proto::BlobChunk>;

    async fn fetch_blob(&self, request: Request<proto::Digests>) -> Answer<Self::FetchBlobStream> {
        let mut blobs = Vec::new();
        for d in request.into_inner().digests {
            if !self.core.blobs.has(&d) {
                return Err(Status::not_found(format!(
                    "no package file with digest {d}"
                )));
            }
            blobs.push((d.clone(), self.core.blobs.path(&d)));
        }
        let chunks = tokio_stream::wrappers::ReceiverStream::new(blob_chunks(blobs))
            .map(|c| c.map_err(|e| Status::internal(e.to_string())));
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn driver_alive(
        &self,
        request: Request<proto::DriverHeartbeat>,
    ) -> Answer<proto::DriverAliveReply> {
        let r = request.into_inner();
        // A replay's end may free objects: the nodes hear of it, as after any change.
        let alive = |s: &mut State| {
            s.driver_alive(&r.job_id, r.replayed)
                .map(|()| s.recovering())
        };
        let recovering = if r.replayed {
            self.core.with(alive)
        } else {
            alive(&mut self.core.state.lock().expect("head lock"))
        };
        Ok(Response::new(proto::DriverAliveReply {
            head: self.core.incarnation(),
            recovering: recovering.map_err(refused)?,
        }))
    }

    async fn submit_tasks(
        &self,
        request: Request<proto::SubmitTasksRequest>,
    ) -> Answer<proto::SubmitTasksResponse> {
        use proto::submission::Item;
        let items = request.into_inner().items;
        let rejected = self.core.with(|s| {
            items
                .into_iter()
                .filter_map(|i| i.item)
                .filter_map(|item| {
                    let (id, result) = match item {
                        Item::Task(spec) => (spec.task_id.clone(), s.submit(spec.into())),
                        Item::Group(g) => (
                            g.group_id.clone(),
                            s.create_object_group(&g.job_id, &g.group_id, g.object_ids)
                                .map_err(VolleyError::from),
                        ),
                    };
                    result.err().map(|e| proto::RejectedTask {
                        task_id: id,
                        error: Some(wire_error(&ErrorReport::from(&e))),
                    })
                })
                .collect()
        });
        Ok(Response::new(proto::SubmitTasksResponse { rejected }))
    }

    async fn put_object(&self, request: Request<proto::PutObjectRequest>) -> Answer<proto::Empty> {
        let r = request.into_inner();
        self.core
            .with(|s| s.put_object(&r.job_id, &r.object_id, &r.address, r.bytes, r.rows))
            .map_err(refused)?;
        empty()
    }

    async fn wait(&self, request: Request<proto::WaitRequest>) -> Answer<proto::WaitResponse> {
        let r = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.timeout_ms);
        let want = (r.num_ready as usize).min(r.object_ids.len());
        // A wait for thousands of objects wakes on every change, so each look only
        // visits the objects not yet seen done, and a wait for all of them stops at the
        // first one still running (tasks mostly end in the order they were submitted).
        // The statuses are described once, when the answer is due.
        let mut pending: VecDeque<usize> = (0..r.object_ids.len()).collect();
        let all = want == r.object_ids.len();
        let (objects, waiting) = self
            .core
            .wait_until(deadline, |s, last| {
                let finished = |i: &usize| s.object_settled(&r.object_ids[*i]);
                if all {
                    while pending.front().is_some_and(finished) {
                        pending.pop_front();
                    }
                } else {
                    pending.retain(|i| !finished(i));
                }
                let done = r.object_ids.len() - pending.len();
                let answer = done >= want || last;
                let objects = if answer {
                    r.object_ids
                        .iter()
                        .map(|id| s.object_status(id).into())
                        .collect()
                } else {
                    Vec::new()
                };
                // Due before enough are done: a driver of its own (an attached job,
                // with no log the head writes to) learns what its work waits for.
                let waiting = match r.object_ids.first() {
                    Some(id) if answer && done < want => s
                        .object_job(id)
                        .map(|job| self.core.beyond_nodes(job))
                        .unwrap_or_default(),
                    _ => String::new(),
                };
                Ok::<_, Status>(((objects, waiting), answer))
            })
            .await?;
        Ok(Response::new(proto::WaitResponse { objects, waiting }))
    }

    async fn free(&self, request: Request<proto::FreeRequest>) -> Answer<proto::Empty> {
        let r = request.into_inner();
        self.core.with(|s| s.free(&r.object_ids));
        empty()
    }

    async fn cancel(&self, request: Request<proto::FreeRequest>) -> Answer<proto::Empty> {
        let r = request.into_inner();
        self.core.with(|s| s.cancel(&r.job_id, &r.object_ids));
        empty()
    }

    async fn create_placement_group(
        &self,
        request: Request<proto::CreatePlacementGroupRequest>,
    ) -> Answer<proto::Empty> {
        let r = request.into_inner();
        let bundles: Vec<Resources> = r
            .bundles
            .into_iter()
            .map(|b| Resources::from(b.resources))
            .collect();
        let strategy = wire::strategy(r.strategy);
        self.core
            .with(|s| s.create_group(&r.job_id, &r.group_id, strategy, bundles))
            .map_err(refused)?;
        empty()
    }

    async fn wait_placement_group(
        &self,
        request: Request<proto::PlacementGroupRequest>,
    ) -> Answer<proto::PlacementGroupStatus> {
        let r = request.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.timeout_ms);
        let status = self
            .core
            .wait_until(deadline, |s, _| {
                let status = s.group_status(&r.group_id)?;
                let ready = status.ready;
                Ok((status, ready))
            })
            .await
            .map_err(refused)?;
        Ok(Response::new(status.into()))
    }

    async fn remove_placement_group(
        &self,
        request: Request<proto::PlacementGroupRequest>,
    ) -> Answer<proto::Empty> {
        let id = request.into_inner().group_id;
        self.core.with(|s| s.remove_group(&id));
        empty()
    }

    async fn create_actor(
        &self,
        request: Request<proto::CreateActorRequest>,
    ) -> Answer<proto::Empty> {
        let spec = request.into_inner().into();
        self.core.with(|s| s.create_actor(spec)).map_err(refused)?;
        empty()
    }

    async fn get_actor(&self, request: Request<proto::ActorId>) -> Answer<proto::ActorStatus> {
        let id = request.into_inner().actor_id;
        let actor = self.core.read(|s| s.actor(&id)).map_err(refused)?;
        Ok(Response::new(actor.into()))
    }

    async fn kill_actor(&self, request: Request<proto::ActorId>) -> Answer<proto::Empty> {
        let id = request.into_inner().actor_id;
        self.core.with(|s| s.kill_actor(&id, "killed by request"));
        empty()
    }

    async fn pick_object_store(
        &self,
        _request: Request<proto::JobId>,
    ) -> Answer<proto::ObjectLocation> {
        let address = self
            .core
            .read(|s| s.emptiest_store())
            .ok_or_else(|| Status::failed_precondition("the cluster has no live node"))?;
        Ok(Response::new(proto::ObjectLocation {
            addresses: vec![address],
            ..Default::default()
        }))
    }

    async fn missing_blobs(
        &self,
        request: Request<proto::PackageManifest>,
    ) -> Answer<proto::Digests> {
        let manifest = request.into_inner();
        check_manifest(&manifest, self.core.options.max_package_bytes).map_err(invalid)?;
        let digests = tokio::task::block_in_place(|| self.core.blobs.missing(&manifest));
        Ok(Response::new(proto::Digests { digests }))
    }

    async fn upload_blobs(
        &self,
        request: Request<Streaming<proto::BlobChunk>>,
    ) -> Answer<proto::Empty> {
        let (received, digests) = receive_blobs(
            &self.core.blobs,
            request.into_inner(),
            self.core.options.max_package_bytes,
        )
        .await
        .map_err(invalid)?;
        info!(
            "package files received: {}",
            volley_common::format_bytes(received)
        );
        // What just came is for a job about to be submitted: it stays.
        tokio::task::block_in_place(|| self.core.evict_packages(&digests));
        empty()
    }

    async fn submit_job(&self, request: Request<proto::JobSpec>) -> Answer<proto::JobId> {
        let job_id = self.core.add_job(request.into_inner())?;
        Ok(Response::new(proto::JobId { job_id }))
    }

    async fn get_job(&self, request: Request<proto::JobId>) -> Answer<proto::JobInfo> {
        let id = request.into_inner().job_id;
        let info = self
            .core
            .read(|s| {
                let waiting = s.waiting();
                s.job(&id).map(|j| wire::job_info_now(j, &waiting))
            })
            .map_err(refused)?;
        Ok(Response::new(info))
    }

    async fn list_jobs(&self, _request: Request<proto::Empty>) -> Answer<proto::JobList> {
        let jobs = self.core.read(|s| {
            let waiting = s.waiting();
            s.jobs().map(|j| wire::job_info_now(j, &waiting)).collect()
        });
        Ok(Response::new(proto::JobList { jobs }))
    }

    async fn stop_job(&self, request: Request<proto::JobId>) -> Answer<proto::JobInfo> {
        let id = request.into_inner().job_id;
        self.core.stop_job(&id).map_err(not_found)?;
        let info = self
            .core
            .read(|s| s.job(&id).map(wire::job_info))
            .map_err(refused)?;
        Ok(Response::new(info))
    }

    type JobLogsStream = Boxed<proto::LogChunk>;

    async fn job_logs(&self, request: Request<proto::LogsRequest>) -> Answer<Self::JobLogsStream> {
        let r = request.into_inner();
        let core = Arc::clone(&self.core);
        core.job(&r.job_id).map_err(not_found)?;
        let stream =
            futures::stream::unfold((core, r.offset, false), move |(core, offset, finished)| {
                let job = r.job_id.clone();
                async move {
                    if finished {
                        return None;
                    }
                    loop {
                        let (data, done) = match core.job_log(&job, offset) {
                            Ok(x) => x,
                            Err(e) => return Some((Err(not_found(e)), (core, offset, true))),
                        };
                        if !data.is_empty() {
                            let next = offset + data.len() as u64;
                            return Some((Ok(proto::LogChunk { data }), (core, next, false)));
                        }
                        if done || !r.follow {
                            return None;
                        }
                        core.logs_within(Duration::from_millis(250)).await;
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn read_worker_logs(
        &self,
        request: Request<proto::LogQuery>,
    ) -> Answer<proto::WorkerLogs> {
        use std::sync::atomic::Ordering;
        let mut q = request.into_inner();
        let job = self.core.job(&q.job_id).map_err(not_found)?;
        q.query_id = self.core.next_query.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.core
            .log_queries
            .lock()
            .expect("queries lock")
            .insert(q.query_id, tx);
        // Every live node is asked: any may have run the job's workers.
        let query_id = q.query_id;
        let mut asked = self
            .core
            .read(|s| s.broadcast(&NodeCommand::ReadLogs(q.into())));
        asked.sort();
        let mut replies: HashMap<String, proto::LogReply> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while replies.len() < asked.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    replies.insert(r.node_id.clone(), r);
                }
                _ => break,
            }
        }
        self.core
            .log_queries
            .lock()
            .expect("queries lock")
            .remove(&query_id);
        let mut out = proto::WorkerLogs {
            job_ended: job.state.is_final(),
            ..Default::default()
        };
        for node in asked {
            match replies.remove(&node) {
                Some(r) if r.error.is_empty() => out.sections.extend(r.sections),
                Some(r) => out.unanswered.push(format!("{node}: {}", r.error)),
                None => out.unanswered.push(format!("{node}: no answer within 5 s")),
            }
        }
        crate::cluster::worker_logs::fit(
            &mut out.sections,
            crate::cluster::worker_logs::MAX_ANSWER,
        );
        Ok(Response::new(out))
    }

    async fn status(&self, _request: Request<proto::Empty>) -> Answer<proto::ClusterStatus> {
        Ok(Response::new((&self.core.status()).into()))
    }
}
