//! The cluster backend: a head, node agents and worker processes speaking gRPC.
//!
//! ```text
//!   driver ──SubmitTask/Wait──▶ head ──NodeCommand stream──▶ node agent ──▶ worker processes
//!     ▲                          ▲  ◀──heartbeats, reports──     │  ▲            │
//!     └──── Arrow Flight DoGet ──┼───────────────────── object store ◀─ DoPut ───┘
//!                                └── HTTP/JSON job API
//! ```
//!
//! * [`head`]: node registry, scheduler (resources, GPUs, placement groups, actors,
//!   locality), object directory with lineage, job manager; declares silent nodes dead
//!   and re-runs their tasks and lost objects' tasks.
//! * [`node`]: the agent on each machine; starts the job's binary as worker processes,
//!   watches them, serves its [`objects::ObjectStore`] over Arrow Flight.
//! * [`worker`]: what a worker process does after `volley::init()`.
//! * [`client`]: the driver's API ([`Cluster`], [`ObjectRef`], [`ActorHandle`],
//!   [`PlacementGroup`]).
//! * [`jobs`] and [`http`]: job submission over gRPC and over HTTP.
//! * [`local`]: a private one-node cluster inside a process ([`LocalCluster`]).
//!
//! Every call carries the cluster token ([`auth`]).

pub mod auth;
pub mod client;
pub mod gpus;
pub mod head;
pub mod http;
pub mod jobs;
pub mod local;
mod metrics;
pub mod net;
pub mod node;
pub mod objects;
pub mod package;
pub mod resources;
mod session;
pub mod status;
pub mod task;
pub mod tls;
pub mod worker;
mod worker_logs;

/// The generated protocol types and services.
#[allow(missing_docs, clippy::all, clippy::clone_on_ref_ptr)]
pub(crate) mod proto {
    tonic::include_proto!("volley.cluster");
}

use std::sync::Arc;

use volley_common::Result;

pub use client::{
    ActorHandle, ActorInfo, ActorOptions, Cluster, ConnectOptions, EncodedActor, EncodedTask,
    ObjectGroup, ObjectMeta, ObjectRef, ObjectState, PlacementGroup, PlacementStrategy, TaskInput,
    TaskOptions,
};
pub use head::{HeadCore, HeadOptions};
pub use jobs::{
    ExecutionProgress, JobClient, JobRequest, OperatorProgress, OutputSection, WorkerOutput,
};
pub use local::LocalCluster;
pub use node::{run_node, run_node_until, NodeOptions};
pub use objects::{object_batch, ObjectCompression, ObjectReader, ObjectSlice};
pub use resources::Resources;
pub use status::{ClusterStatus, JobState, JobStatus, NodeState, NodeStatus};
pub use task::{
    catch_panic, object_value, on_own_thread, value_object, ActorCall, ActorCalls, InputStream,
    RemoteActor, RemoteTask, TaskContext,
};
pub use tls::TlsConfig;
pub use worker::{is_worker, name_task_error, run_worker};

/// A running head: its addresses.
#[derive(Debug, Clone)]
pub struct HeadAddresses {
    /// gRPC, `host:port`.
    pub grpc: String,
    /// HTTP API, `host:port`, if started.
    pub http: Option<String>,
}

/// Starts a head's gRPC server (and HTTP API if `http_port` is given) on the current
/// tokio runtime; they run until the runtime ends.
pub async fn start_head(
    options: HeadOptions,
    host: &str,
    port: u16,
    http_port: Option<u16>,
    tls: &TlsConfig,
) -> Result<(Arc<HeadCore>, HeadAddresses)> {
    std::fs::create_dir_all(&options.state_dir)?;
    let core = HeadCore::new(options)?;
    let (listener, grpc) = net::bind(host, port).await?;
    let service = tonic::service::interceptor::InterceptedService::new(
        proto::head_server::HeadServer::new(head::HeadService::new(Arc::clone(&core)))
            .max_decoding_message_size(net::MAX_MESSAGE)
            .max_encoding_message_size(net::MAX_MESSAGE),
        auth::CheckToken::for_head(&core.options().token, core.incarnation()),
    );
    // Accepted connections get TCP_NODELAY here: the builder's setting only applies to
    // listeners tonic binds itself, and without it small replies wait on Nagle's
    // algorithm (tens of milliseconds per call).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(t) = tls.server() {
        builder = builder
            .tls_config(t)
            .map_err(|e| volley_common::VolleyError::Config(format!("TLS: {e}")))?;
    }
    tokio::spawn(builder.add_service(service).serve_with_incoming(incoming));
    tokio::spawn(Arc::clone(&core).monitor());
    tokio::spawn(Arc::clone(&core).persist_loop());
    let http = match http_port {
        Some(p) => {
            let (listener, addr) = net::bind(host, p).await?;
            let app = http::router(Arc::clone(&core));
            match tls.acceptor()? {
                None => {
                    tokio::spawn(async move { axum::serve(listener, app).await });
                }
                Some(acceptor) => {
                    tokio::spawn(http::serve_tls(listener, app, acceptor));
                }
            }
            Some(addr)
        }
        None => None,
    };
    Ok((core, HeadAddresses { grpc, http }))
}
