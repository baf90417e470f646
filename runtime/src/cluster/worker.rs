//! Worker mode: a process of the job's binary started by a node agent, running tasks
//! and actor calls it pulls from that agent until told to exit.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use arrow::array::RecordBatch;
use tracing::warn;
use volley_common::{ErrorReport, Result, VolleyError};

use super::net::{wire_error, wire_execution_error, Channels};
use super::objects::{decode_inline, encode_inline, fetch, store};
use super::proto::{self, task_report::Outcome};
use super::task::{decode, Payload, RemoteActor, RemoteTask, TaskContext};

/// Whether this process was started by a node agent as a worker.
pub fn is_worker() -> bool {
    std::env::var_os("VOLLEY_WORKER_ID").is_some_and(|v| !v.is_empty())
}

fn env(name: &str) -> Result<String> {
    volley_common::env_var(name)?
        .ok_or_else(|| VolleyError::Config(format!("worker mode needs {name} in the environment")))
}

/// Runs tasks until the agent says to stop or cannot be reached; never returns.
pub fn run_worker() -> ! {
    let code = match worker_loop() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("volley worker: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn worker_loop() -> Result<()> {
    // A worker never outlives its node agent: if the agent dies (even by SIGKILL), the
    // kernel kills the worker too, so no orphan keeps running a task the cluster has
    // already handed to another node.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    let worker_id = env("VOLLEY_WORKER_ID")?;
    let agent_address = env("VOLLEY_AGENT_ADDRESS")?;
    let token = env("VOLLEY_TOKEN")?;
    let node_id = env("VOLLEY_NODE_ID").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| VolleyError::internal(format!("cannot start the worker runtime: {e}")))?;
    let _enter = rt.enter();
    let channels = Channels::new(&token, &super::tls::TlsConfig::from_env()?);
    let mut agent = channels.agent(&agent_address)?;
    let mut actor: Option<Box<dyn RemoteActor>> = None;
    let mut failures = 0;
    // The next task, when the agent handed it over with the last result's answer.
    let mut handed: Option<proto::PullResponse> = None;
    loop {
        let pulled = match handed.take() {
            Some(next) => Ok(tonic::Response::new(next)),
            None => rt.block_on(agent.pull(proto::PullRequest {
                worker_id: worker_id.clone(),
                timeout_ms: 2_000,
            })),
        };
        let r = match pulled {
            Ok(r) => {
                failures = 0;
                r.into_inner()
            }
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return Err(VolleyError::execution(format!(
                        "lost the node agent at {agent_address}: {}",
                        e.message()
                    )));
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if r.exit {
            return Ok(());
        }
        if let Some(start) = r.actor {
            let ctx = TaskContext {
                task_id: start.actor_id.clone(),
                attempt: start.incarnation,
                job_id: start.job_id.clone(),
                node_id: node_id.clone(),
                gpu_ids: start.gpu_ids.clone(),
            };
            let built =
                decode::<Box<dyn RemoteActor>>("the actor", &start.payload).and_then(|mut a| {
                    guard("actor start", || a.start(&ctx))?;
                    Ok(a)
                });
            let error = match built {
                Ok(a) => {
                    actor = Some(a);
                    String::new()
                }
                Err(e) => e.to_string(),
            };
            let failed = !error.is_empty();
            rt.block_on(agent.actor_ready(proto::ActorStarted {
                worker_id: worker_id.clone(),
                actor_id: start.actor_id,
                incarnation: start.incarnation,
                error,
                pid: std::process::id(),
            }))
            .map_err(|e| VolleyError::execution(format!("lost the node agent: {}", e.message())))?;
            if failed {
                return Ok(());
            }
            continue;
        }
        let Some(task) = r.task else { continue };
        let (report, output, ran) = rt.block_on(run_one(
            &channels,
            &agent_address,
            &node_id,
            &task,
            actor.as_deref_mut(),
        ));
        let send = rt.block_on(agent.finish(proto::WorkerResult {
            worker_id: worker_id.clone(),
            report: Some(report),
            output: output.into(),
            await_verdict: ran.as_ref().is_some_and(|(t, _)| t.leaves_side_effects()),
        }));
        // An attempt whose result will not be used (superseded, or not delivered: the
        // head then runs the task again) undoes what it left behind.
        let stale = match send {
            Ok(r) => {
                let r = r.into_inner();
                handed = r
                    .next
                    .filter(|n| n.task.is_some() || n.actor.is_some() || n.exit);
                r.stale
            }
            Err(e) => {
                warn!("cannot report task {}: {}", task.task_id, e.message());
                true
            }
        };
        if let (true, Some((t, ctx))) = (stale, ran) {
            let _ = guard("discarding a superseded attempt", || {
                t.discard(&ctx);
                Ok(())
            });
        }
    }
}

async fn run_one(
    channels: &Channels,
    agent_address: &str,
    node_id: &str,
    task: &proto::TaskAssignment,
    actor: Option<&mut (dyn RemoteActor + 'static)>,
) -> (
    proto::TaskReport,
    Vec<u8>,
    Option<(Box<dyn RemoteTask>, TaskContext)>,
) {
    let mut report = proto::TaskReport {
        node_id: node_id.to_string(),
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        outcome: Outcome::Ok as i32,
        ..Default::default()
    };
    // Inputs: any copy will do; if none can be read the task is retried (the head
    // rebuilds a lost input first).
    let mut inputs = Vec::with_capacity(task.args.len());
    for arg in &task.args {
        let mut got = None;
        let mut last_error = String::from("no copy is known");
        if !arg.inline.is_empty() {
            match decode_inline(&arg.object_id, &arg.inline) {
                Ok(b) => got = Some(b),
                Err(e) => last_error = e.to_string(),
            }
        }
        for address in arg.addresses.iter().filter(|_| got.is_none()) {
            match fetch(channels, address, &arg.object_id).await {
                Ok(b) => {
                    got = Some(b);
                    break;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        match got {
            Some(b) => inputs.push(b),
            None => {
                report.outcome = Outcome::SystemFailure as i32;
                report.error = Some(wire_execution_error(format!(
                    "cannot read input {}: {last_error}",
                    arg.object_id
                )));
                return (report, Vec::new(), None);
            }
        }
    }
    let ctx = TaskContext {
        task_id: task.task_id.clone(),
        attempt: task.attempt,
        job_id: task.job_id.clone(),
        node_id: node_id.to_string(),
        gpu_ids: task.gpu_ids.clone(),
    };
    let label = if task.name.is_empty() {
        task.task_id.clone()
    } else {
        task.name.clone()
    };
    let mut ran = None;
    let mut output = Vec::new();
    let result: Result<Vec<RecordBatch>> =
        decode::<Payload>(&format!("task {label}"), &task.payload).and_then(|payload| {
            match (payload, actor) {
                (Payload::Task(t), _) => {
                    let out = guard(&label, || t.run(&ctx, inputs));
                    ran = Some((t, ctx.clone()));
                    out
                }
                (Payload::Call { method, arg }, Some(a)) => {
                    guard(&label, || a.call(&ctx, &method, arg, inputs))
                }
                (Payload::Call { .. }, None) => Err(VolleyError::internal(
                    "an actor call reached a worker with no actor",
                )),
            }
        });
    match result {
        Ok(batches) => {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            // A small result goes to the agent with the report; a big one over Flight.
            let stored = match encode_inline(&batches) {
                Some(bytes) => {
                    output = bytes;
                    Ok(0)
                }
                None => store(channels, agent_address, &task.task_id, batches).await,
            };
            match stored {
                Ok(bytes) => {
                    report.output_bytes = bytes;
                    report.output_rows = rows as u64;
                }
                Err(e) => {
                    report.outcome = Outcome::SystemFailure as i32;
                    report.error = Some(wire_execution_error(format!(
                        "cannot store the result: {e}"
                    )));
                }
            }
        }
        Err(e) => {
            report.outcome = Outcome::Failed as i32;
            // The category travels with the message (a cancelled task, a user
            // function's failure, a lack of resources are told apart by the driver).
            let e = e.context(format!("task {label} failed"));
            report.error = Some(wire_error(&ErrorReport::from(&e)));
        }
    }
    (report, output, ran)
}

/// Runs user code, turning a panic into an error.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(VolleyError::execution(format!("{what} panicked: {msg}")))
        }
    }
}
