//! The head's HTTP/JSON API, for tools that do not speak gRPC.
//!
//! Every request but `/healthz` carries `Authorization: Bearer TOKEN`.
//!
//! | method and path             | does                                            |
//! |-----------------------------|-------------------------------------------------|
//! | `GET /api/cluster`          | nodes, their resources and load                 |
//! | `GET /api/jobs`             | every job                                       |
//! | `POST /api/jobs`            | submits a job (JSON body, files in base64)      |
//! | `GET /api/jobs/{id}`        | one job                                         |
//! | `GET /api/jobs/{id}/logs`   | the driver's log so far (text)                  |
//! | `POST /api/jobs/{id}/stop`  | stops a job                                     |
//! | `GET /metrics`              | the cluster in Prometheus' text format          |
//! | `GET /healthz`              | `ok` (no token: for load balancers and probes)  |
//!
//! Prometheus scrapes `/metrics` with the token as its `authorization` credentials.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use volley_common::ErrorKind;

use super::auth::same_token;
use super::head::HeadCore;
use super::proto;
use super::resources::Resources;
use super::status::{JobStatus, NodeState};

/// A job as the HTTP API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct JobJson {
    /// Its id.
    pub job_id: String,
    /// Its name.
    pub name: String,
    /// `PENDING`, `RUNNING`, `SUCCEEDED`, `FAILED` or `STOPPED`.
    pub state: String,
    /// Its command.
    pub entrypoint: Vec<String>,
    /// Where its driver runs.
    pub node_id: String,
    /// The driver's exit code.
    pub exit_code: i32,
    /// Why it failed.
    pub error: String,
    /// When it was submitted (ms since the epoch).
    pub submitted_ms: u64,
    /// When it ended.
    pub finished_ms: u64,
    /// What it waits for, when something of it cannot start (empty otherwise).
    pub waiting: String,
}

impl From<JobStatus> for JobJson {
    fn from(j: JobStatus) -> Self {
        JobJson {
            job_id: j.job_id,
            name: j.name,
            state: j.state.to_string(),
            entrypoint: j.entrypoint,
            node_id: j.node_id,
            exit_code: j.exit_code,
            error: j.error,
            submitted_ms: j.submitted_ms,
            finished_ms: j.finished_ms,
            waiting: j.waiting,
        }
    }
}

/// One file of a job submitted over HTTP.
#[derive(Debug, Deserialize)]
pub struct FileJson {
    /// Relative path in the package.
    pub path: String,
    /// Unix mode (e.g. 493 = 0o755 for a program).
    #[serde(default = "default_mode")]
    pub mode: u32,
    /// The content, base64.
    pub data_base64: String,
}

fn default_mode() -> u32 {
    0o644
}

/// A job submission over HTTP.
#[derive(Debug, Deserialize)]
pub struct SubmitJson {
    /// The command.
    pub entrypoint: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: HashMap<String, String>,
    /// Resources of the driver.
    #[serde(default)]
    pub resources: Resources,
    /// A name.
    #[serde(default)]
    pub name: String,
    /// The package's files.
    #[serde(default)]
    pub files: Vec<FileJson>,
}

#[derive(Debug, Serialize)]
struct NodeJson {
    node_id: String,
    hostname: String,
    alive: bool,
    total: Resources,
    available: Resources,
    object_store_bytes: u64,
    object_store_memory: u64,
    spilled_total: u64,
    workers: u32,
    running_tasks: u32,
    draining: bool,
}

#[derive(Debug, Serialize)]
struct ClusterJson {
    nodes: Vec<NodeJson>,
    pending_tasks: u32,
    running_tasks: u32,
    running_jobs: u32,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// The token of an `Authorization: Bearer TOKEN` header, if there is one.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110).
        .and_then(|v| {
            v.get(..7)
                .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
}

fn check(core: &HeadCore, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer_token(headers) {
        Some(t) if same_token(t, &core.options().token) => Ok(()),
        Some(_) => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong cluster token".into(),
        )),
        None => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "no cluster token (Authorization: Bearer TOKEN)".into(),
        )),
    }
}

fn not_found(e: volley_common::VolleyError) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, e.to_string())
}

type Core = State<Arc<HeadCore>>;

async fn cluster(State(core): Core, h: HeaderMap) -> Result<Json<ClusterJson>, ApiError> {
    check(&core, &h)?;
    let s = core.status();
    Ok(Json(ClusterJson {
        nodes: s
            .nodes
            .into_iter()
            .map(|n| NodeJson {
                alive: n.alive(),
                draining: matches!(n.state, NodeState::Draining | NodeState::Left),
                node_id: n.node_id,
                hostname: n.hostname,
                total: n.total,
                available: n.available,
                object_store_bytes: n.object_store_bytes,
                object_store_memory: n.object_store_memory,
                spilled_total: n.spilled_total,
                workers: n.workers,
                running_tasks: n.running_tasks,
            })
            .collect(),
        pending_tasks: s.pending_tasks,
        running_tasks: s.running_tasks,
        running_jobs: s.running_jobs,
    }))
}

async fn list(State(core): Core, h: HeaderMap) -> Result<Json<Vec<JobJson>>, ApiError> {
    check(&core, &h)?;
    Ok(Json(core.jobs().into_iter().map(JobJson::from).collect()))
}

async fn submit(
    State(core): Core,
    h: HeaderMap,
    request: axum::extract::Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    // The token before the body: a caller without it cannot make the head read (up to
    // a gigabyte) or parse anything.
    check(&core, &h)?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let bytes = axum::body::to_bytes(request.into_body(), SUBMIT_BODY_LIMIT)
        .await
        .map_err(|e| bad(format!("reading the request's body: {e}")))?;
    let body: SubmitJson = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("the request's body is not a job (JSON): {e}")))?;
    let mut files = Vec::new();
    for f in body.files {
        let data = base64::engine::general_purpose::STANDARD
            .decode(f.data_base64.as_bytes())
            .map_err(|e| bad(format!("file {}: bad base64: {e}", f.path)))?;
        files.push((f.path, f.mode, data));
    }
    let spec = proto::JobSpec {
        entrypoint: body.entrypoint,
        env: body.env,
        resources: Some((&body.resources).into()),
        name: body.name,
        attached: false,
        package: None,
        share_workers: false,
    };
    let id = tokio::task::spawn_blocking(move || core.submit_job_files(spec, files))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e.kind() {
            // The head's own trouble (its disk), not the request's.
            ErrorKind::Execution | ErrorKind::Internal => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            _ => bad(e.to_string()),
        })?;
    Ok(Json(serde_json::json!({ "job_id": id })))
}

async fn one(
    State(core): Core,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobJson>, ApiError> {
    check(&core, &h)?;
    Ok(Json(core.job(&id).map_err(not_found)?.into()))
}

/// An actor as the API shows it.
#[derive(Serialize)]
struct ActorJson {
    actor_id: String,
    name: String,
    state: String,
    node_id: String,
    restarts: u32,
    pid: u32,
    error: String,
    /// Why it waits, when no node could hold it even empty.
    waiting: String,
}

async fn actors(
    State(core): Core,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Vec<ActorJson>>, ApiError> {
    check(&core, &h)?;
    Ok(Json(
        core.job_actors(&id)
            .map_err(not_found)?
            .into_iter()
            .map(|a| {
                let (state, node_id, error) = a.state.parts();
                ActorJson {
                    state: state.into(),
                    node_id: node_id.into(),
                    error: error.into(),
                    actor_id: a.actor_id,
                    name: a.name,
                    restarts: a.restarts,
                    pid: a.pid.unwrap_or(0),
                    waiting: a.waiting,
                }
            })
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    /// Bytes of the log already read.
    #[serde(default)]
    offset: u64,
}

async fn logs(
    State(core): Core,
    h: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    check(&core, &h)?;
    let (mut data, _) = core.job_log(&id, q.offset).map_err(not_found)?;
    // A character cut at the end waits for the next read, whole.
    if let Err(e) = std::str::from_utf8(&data) {
        if e.error_len().is_none() {
            data.truncate(e.valid_up_to());
        }
    }
    // Where the next read starts, in the log's bytes (the text may hold replacement
    // characters for bytes that are not UTF-8, of another length).
    let next = q.offset + data.len() as u64;
    Ok((
        [(
            axum::http::HeaderName::from_static("x-volley-next-offset"),
            next.to_string(),
        )],
        String::from_utf8_lossy(&data).into_owned(),
    )
        .into_response())
}

async fn executions(
    State(core): Core,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Vec<super::jobs::ExecutionProgress>>, ApiError> {
    check(&core, &h)?;
    Ok(Json(core.job_executions(&id).map_err(not_found)?))
}

/// A job's tasks (at most 2,000, failed and running first), with how many the head
/// holds in all in the `x-volley-total` header.
async fn tasks(
    State(core): Core,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check(&core, &h)?;
    let (tasks, total) = core.job_tasks(&id).map_err(not_found)?;
    Ok((
        [(
            axum::http::HeaderName::from_static("x-volley-total"),
            total.to_string(),
        )],
        Json(tasks),
    )
        .into_response())
}

/// The dashboard: one page, bundled into the binary (it works without internet); it
/// asks for the token and reads the JSON API with it.
async fn dashboard() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard/index.html"),
    )
        .into_response()
}

async fn stop(
    State(core): Core,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobJson>, ApiError> {
    check(&core, &h)?;
    Ok(Json(core.stop_job(&id).map_err(not_found)?.into()))
}

async fn metrics(State(core): Core, h: HeaderMap) -> Result<Response, ApiError> {
    check(&core, &h)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        core.metrics(),
    )
        .into_response())
}

/// How long a TLS client has to finish its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `app` over TLS on `listener` (HTTP/1.1 and HTTP/2).
pub(crate) async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            // Out of file descriptors, say: wait for some to close rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            // A client that never finishes its handshake does not hold its connection.
            let Ok(Ok(tls)) = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}

/// The most bytes a job submitted over HTTP may take (its files inline, in base64).
const SUBMIT_BODY_LIMIT: usize = 1 << 30;

/// The API's routes over `core`.
pub fn router(core: Arc<HeadCore>) -> Router {
    Router::new()
        .route("/api/cluster", get(cluster))
        .route("/api/jobs", get(list).post(submit))
        .route("/api/jobs/{id}", get(one))
        .route("/api/jobs/{id}/logs", get(logs))
        .route("/api/jobs/{id}/actors", get(actors))
        .route("/api/jobs/{id}/executions", get(executions))
        .route("/api/jobs/{id}/tasks", get(tasks))
        .route("/", get(dashboard))
        .route("/api/jobs/{id}/stop", post(stop))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(core)
}
