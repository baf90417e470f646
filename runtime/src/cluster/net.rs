//! Connections: one gRPC channel per address, shared by every client of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_flight::FlightClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use volley_common::{ErrorKind, ErrorReport, Result, VolleyError};

use super::auth::{AddToken, TOKEN_HEADER};
use super::proto;
use super::proto::head_client::HeadClient;
use super::proto::node_agent_client::NodeAgentClient;

/// Largest gRPC message volley sends or accepts (job package chunks are 1 MiB; objects
/// travel as Flight streams of IPC messages, each under this).
pub const MAX_MESSAGE: usize = 256 << 20;

/// A client of the head with the token attached.
pub type Head = HeadClient<InterceptedService<Channel, AddToken>>;
/// A client of a node agent with the token attached.
pub type Agent = NodeAgentClient<InterceptedService<Channel, AddToken>>;

/// Channels by address, all carrying one cluster token.
#[derive(Clone)]
pub struct Channels {
    token: String,
    tls: super::tls::TlsConfig,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

impl Channels {
    /// Channels that present `token`, over TLS when `tls` has a CA to trust.
    pub fn new(token: &str, tls: &super::tls::TlsConfig) -> Self {
        Self {
            token: token.to_string(),
            tls: tls.clone(),
            channels: Arc::default(),
        }
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The channel to `address` (`host:port`), made on first use. Connection errors show
    /// up on the first call.
    pub fn channel(&self, address: &str) -> Result<Channel> {
        let mut map = self.channels.lock().expect("channels lock");
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_client() {
            "https"
        } else {
            "http"
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| VolleyError::Config(format!("bad address {address:?}: {e}")))?;
        if let Some(tls) = self.tls.client() {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| VolleyError::Config(format!("TLS for {address}: {e}")))?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = endpoint.connect_lazy();
        map.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// A head client.
    pub fn head(&self, address: &str) -> Result<Head> {
        Ok(
            HeadClient::with_interceptor(self.channel(address)?, AddToken::new(&self.token)?)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
    }

    /// A head client that names the head incarnation `head` holds on every call
    /// (a driver's: see [`super::auth::HEAD_HEADER`]).
    pub fn head_naming(
        &self,
        address: &str,
        head: Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<Head> {
        Ok(HeadClient::with_interceptor(
            self.channel(address)?,
            AddToken::new(&self.token)?.naming_head(head),
        )
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
    }

    /// A node-agent client (its messages carry tasks' inputs inline: up to
    /// [`MAX_MESSAGE`], as the head's).
    pub fn agent(&self, address: &str) -> Result<Agent> {
        Ok(
            NodeAgentClient::with_interceptor(self.channel(address)?, AddToken::new(&self.token)?)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
    }

    /// A Flight client of the object store at `address`.
    pub async fn flight(&self, address: &str) -> Result<FlightClient> {
        let inner =
            arrow_flight::flight_service_client::FlightServiceClient::new(self.channel(address)?)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
        let mut client = FlightClient::new_from_inner(inner);
        client
            .add_header(TOKEN_HEADER, &self.token)
            .map_err(|e| VolleyError::Config(format!("cluster token: {e}")))?;
        Ok(client)
    }
}

/// A gRPC status as a volley error that names what was being done.
pub fn status_error(what: impl std::fmt::Display, status: tonic::Status) -> VolleyError {
    match status.code() {
        tonic::Code::Unauthenticated => {
            VolleyError::Config(format!("{what}: refused: {}", status.message()))
        }
        tonic::Code::Unavailable => VolleyError::execution(format!(
            "{what}: cannot reach the cluster ({})",
            status.message()
        )),
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            VolleyError::plan(format!("{what}: {}", status.message()))
        }
        _ => VolleyError::execution(format!("{what}: {}", status.message())),
    }
}

/// Whether a call failed for want of the server rather than by its answer: it cannot
/// be reached, or its connection broke in the middle of the call (as when it stops).
pub fn unreachable(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::Cancelled => true,
        Code::Unknown | Code::Internal => {
            let m = status.message();
            m.contains("transport") || m.contains("connection") || m.contains("h2 protocol")
        }
        _ => false,
    }
}

/// Binds `host:port` (port 0 picks a free one) and returns the listener and its address.
pub async fn bind(host: &str, port: u16) -> Result<(tokio::net::TcpListener, String)> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .map_err(|e| VolleyError::Io(e).context(format!("cannot listen on {host}:{port}")))?;
    let port = listener.local_addr()?.port();
    Ok((listener, format!("{host}:{port}")))
}

/// An error report as the protocol carries it.
pub(crate) fn wire_error(report: &ErrorReport) -> proto::TaskError {
    use proto::task_error::Kind;
    let kind = match report.kind {
        ErrorKind::Plan => Kind::Plan,
        ErrorKind::Config => Kind::Config,
        ErrorKind::UserFunction => Kind::UserFunction,
        ErrorKind::Cancelled => Kind::Cancelled,
        ErrorKind::ResourcesExhausted => Kind::ResourcesExhausted,
        ErrorKind::Internal => Kind::Internal,
        _ => Kind::Execution,
    };
    proto::TaskError {
        kind: kind as i32,
        message: report.message.clone(),
        function: report.function.clone().unwrap_or_default(),
        context: report.context.clone(),
    }
}

/// The error report a protocol message carries (an unknown category is an execution
/// error).
pub(crate) fn error_report(e: &proto::TaskError) -> ErrorReport {
    use proto::task_error::Kind;
    let kind = match Kind::try_from(e.kind).unwrap_or(Kind::Execution) {
        Kind::Plan => ErrorKind::Plan,
        Kind::Config => ErrorKind::Config,
        Kind::UserFunction => ErrorKind::UserFunction,
        Kind::Cancelled => ErrorKind::Cancelled,
        Kind::ResourcesExhausted => ErrorKind::ResourcesExhausted,
        Kind::Internal => ErrorKind::Internal,
        Kind::Execution => ErrorKind::Execution,
    };
    ErrorReport {
        kind,
        message: e.message.clone(),
        function: (!e.function.is_empty()).then(|| e.function.clone()),
        context: e.context.clone(),
    }
}

/// An execution error (a lost worker, node or input) as the protocol carries it.
pub(crate) fn wire_execution_error(message: impl Into<String>) -> proto::TaskError {
    wire_error(&ErrorReport::new(ErrorKind::Execution, message))
}
