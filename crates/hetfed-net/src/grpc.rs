//! The gRPC + TLS transport of [`FedService`] (tonic, schema in `proto/hetfed/v2/fed.proto`).
//!
//! - [`serve`] / [`serve_with_listener`] expose an `Arc<dyn FedService>` as the `hetfed.v2.Fed`
//!   service.
//! - [`GrpcClient`] implements [`FedService`] by forwarding every call to such a server, so client
//!   code is the same over the network and in simulation.
//!
//! Authentication: every call carries `x-hetfed-client-id: <id>` and `authorization: Bearer
//! <token>` metadata; the server turns them into a [`Caller`] and the service decides whether the
//! token is valid. A call without them is refused with `Unauthenticated`. Tokens are never logged.
//!
//! Bodies (uploads, model downloads) travel as a header message followed by chunks of at most
//! [`Limits::chunk_bytes`], and are handed to and taken from the service as lazy [`ByteStream`]s:
//! neither side holds a whole body in memory and there is no size cap beyond
//! [`Limits::max_upload_bytes`].
//!
//! Errors: each [`ServiceError`] variant maps to one gRPC status code and back (variant and message
//! survive the round trip). Of the other outcomes, a TLS refusal under a call (an untrusted or
//! misnamed server certificate after a reconnect, a client certificate the server refuses) becomes
//! [`ServiceError::Unauthenticated`] and `Unimplemented` (another protocol version) becomes
//! [`ServiceError::FailedPrecondition`], both permanent; network failures and the remaining codes
//! become [`ServiceError::Unavailable`], which clients retry (see [`crate::Classify`]).
//!
//! The server side records each call's peer address in a task-local: the service reads it with
//! [`peer_addr`] (e.g. for audit records of refused calls) without it being part of [`Caller`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{future, stream, Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::error::{error_chain, tls_refusal, ErrorClass, NetError};
use crate::service::{ByteStream, Caller, FedService, Secret, ServiceError};
use crate::tls::{install_crypto_provider, ClientTls, ServerTls};
use crate::types::*;

/// Code generated from `proto/hetfed/v2/fed.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("hetfed.v2");
}

use proto::fed_client::FedClient;
use proto::fed_server::{Fed, FedServer};
use proto::{fetch_model_response, instructions_response, upload_request};

/// Metadata key carrying the caller's client id.
pub const CLIENT_ID_METADATA: &str = "x-hetfed-client-id";
/// Metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION_METADATA: &str = "authorization";
/// The server holds an `Instructions` long poll at most this long, whatever the client asks for.
pub const MAX_LONG_POLL: Duration = Duration::from_secs(30);
/// HTTP/2 keep-alive pings keep idle connections (long polls) alive through NATs and detect dead peers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Size limits of the transport. Server and client should use the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single gRPC message either side encodes or accepts.
    pub max_message_bytes: usize,
    /// Bodies are sent in chunks of at most this many bytes (must fit in a message).
    pub chunk_bytes: usize,
    /// Largest upload body the server accepts.
    pub max_upload_bytes: u64,
    /// The server's HTTP/2 flow-control window, per call and per connection: the most a client
    /// can have sent that the server has not read yet. It bounds what an upload waiting for the
    /// server costs the server's memory (one window per connection, instead of the 1 MiB hyper
    /// would grant), and a single upload's rate (one window per round trip: 256 KiB at 50 ms is
    /// 5 MB/s). At least 65 535 (HTTP/2's initial window).
    pub window_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_message_bytes: 8 << 20, chunk_bytes: 1 << 20, max_upload_bytes: 8 << 30, window_bytes: 256 << 10 }
    }
}

impl Limits {
    /// Room for a chunk message's framing besides its bytes.
    const FRAMING: usize = 1024;

    /// Check the limits are usable: a non-empty chunk that fits in a message with its framing.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.chunk_bytes == 0 {
            return Err(NetError::Limits("expected chunk_bytes > 0, found 0".into()));
        }
        if self.window_bytes < 65_535 {
            return Err(NetError::Limits(format!(
                "expected window_bytes >= 65535 (HTTP/2's initial window), found {}",
                self.window_bytes
            )));
        }
        if self.chunk_bytes.saturating_add(Self::FRAMING) > self.max_message_bytes {
            return Err(NetError::Limits(format!(
                "expected chunk_bytes + {} <= max_message_bytes, found chunk_bytes {} and max_message_bytes {}",
                Self::FRAMING,
                self.chunk_bytes,
                self.max_message_bytes
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let (code, msg) = match e {
            ServiceError::Unauthenticated(m) => (Code::Unauthenticated, m),
            ServiceError::PermissionDenied(m) => (Code::PermissionDenied, m),
            ServiceError::InvalidArgument(m) => (Code::InvalidArgument, m),
            ServiceError::FailedPrecondition(m) => (Code::FailedPrecondition, m),
            ServiceError::ResourceExhausted(m) => (Code::ResourceExhausted, m),
            ServiceError::NotFound(m) => (Code::NotFound, m),
            ServiceError::Unavailable(m) => (Code::Unavailable, m),
            ServiceError::Internal(m) => (Code::Internal, m),
        };
        Status::new(code, msg)
    }
}

impl From<Status> for ServiceError {
    fn from(s: Status) -> Self {
        let msg = s.message().to_owned();
        // The TLS layer refusing the peer is permanent whatever code tonic gave the failure.
        if !matches!(s.code(), Code::Ok | Code::Unauthenticated | Code::PermissionDenied) {
            if let Some(why) = std::error::Error::source(&s).and_then(|e| tls_refusal(e, None)) {
                return ServiceError::Unauthenticated(why);
            }
        }
        match s.code() {
            Code::Unauthenticated => ServiceError::Unauthenticated(msg),
            Code::PermissionDenied => ServiceError::PermissionDenied(msg),
            Code::InvalidArgument => ServiceError::InvalidArgument(msg),
            Code::FailedPrecondition => ServiceError::FailedPrecondition(msg),
            // tonic reports a message over the size limit as OutOfRange: a refusal, not a transient failure.
            Code::ResourceExhausted | Code::OutOfRange => ServiceError::ResourceExhausted(msg),
            Code::NotFound => ServiceError::NotFound(msg),
            Code::Internal => ServiceError::Internal(msg),
            Code::Unavailable => ServiceError::Unavailable(msg),
            Code::Unimplemented => ServiceError::FailedPrecondition(format!(
                "the server does not implement this call (another hetfed protocol version?): {msg}"
            )),
            // Transport failures (Unknown, Cancelled, ...) and codes the protocol does not use: retry.
            code => {
                let detail = match std::error::Error::source(&s).map(error_chain) {
                    Some(chain) if chain.contains(&msg) => chain,
                    Some(chain) => format!("{msg} ({chain})"),
                    None => msg,
                };
                ServiceError::Unavailable(format!("{code:?}: {detail}"))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Domain types <-> protobuf

impl From<DataStats> for proto::DataStats {
    fn from(s: DataStats) -> Self {
        Self {
            tasks: s.tasks,
            n_examples: s.n_examples,
            n_tokens: s.n_tokens,
            label_hist: s.label_hist,
            label_entropy_bits: s.label_entropy_bits,
        }
    }
}

impl From<proto::DataStats> for DataStats {
    fn from(s: proto::DataStats) -> Self {
        Self {
            tasks: s.tasks,
            n_examples: s.n_examples,
            n_tokens: s.n_tokens,
            label_hist: s.label_hist,
            label_entropy_bits: s.label_entropy_bits,
        }
    }
}

impl From<ClientInfo> for proto::ClientInfo {
    fn from(c: ClientInfo) -> Self {
        Self {
            client_id: c.client_id,
            arch: c.arch,
            base_hash: c.base_hash,
            stats: Some(c.stats.into()),
            tokenizer_hash: c.tokenizer_hash,
        }
    }
}

impl From<proto::ClientInfo> for ClientInfo {
    fn from(c: proto::ClientInfo) -> Self {
        Self {
            client_id: c.client_id,
            arch: c.arch,
            base_hash: c.base_hash,
            stats: c.stats.map(Into::into).unwrap_or_default(),
            tokenizer_hash: c.tokenizer_hash,
        }
    }
}

impl From<RegisterReply> for proto::RegisterResponse {
    fn from(r: RegisterReply) -> Self {
        Self { run_id: r.run_id, message: r.message }
    }
}

impl From<proto::RegisterResponse> for RegisterReply {
    fn from(r: proto::RegisterResponse) -> Self {
        Self { run_id: r.run_id, message: r.message }
    }
}

impl From<Instruction> for proto::InstructionsResponse {
    fn from(i: Instruction) -> Self {
        use instructions_response::Instruction as I;
        let instruction = match i {
            Instruction::Fit(f) => I::Fit(proto::FitIns {
                round: f.round,
                model_version: f.model_version,
                config_json: f.config.to_string(),
                deadline_unix_ms: f.deadline_unix_ms,
            }),
            Instruction::Wait => I::Wait(proto::Wait {}),
            Instruction::Done => I::Done(proto::Done {}),
        };
        Self { instruction: Some(instruction) }
    }
}

impl TryFrom<proto::InstructionsResponse> for Instruction {
    type Error = ServiceError;
    fn try_from(r: proto::InstructionsResponse) -> Result<Self, ServiceError> {
        use instructions_response::Instruction as I;
        Ok(match r.instruction {
            Some(I::Fit(f)) => Instruction::Fit(FitIns {
                round: f.round,
                model_version: f.model_version,
                config: if f.config_json.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_str(&f.config_json).map_err(|e| {
                        ServiceError::Internal(format!("the server sent a fit configuration that is not JSON: {e}"))
                    })?
                },
                deadline_unix_ms: f.deadline_unix_ms,
            }),
            Some(I::Wait(_)) => Instruction::Wait,
            Some(I::Done(_)) => Instruction::Done,
            None => return Err(ServiceError::Internal("the server sent an empty instruction".into())),
        })
    }
}

impl From<ModelHeader> for proto::ModelHeader {
    fn from(h: ModelHeader) -> Self {
        Self { version: h.version, size_bytes: h.size_bytes, sha256: h.sha256 }
    }
}

impl From<proto::ModelHeader> for ModelHeader {
    fn from(h: proto::ModelHeader) -> Self {
        Self { version: h.version, size_bytes: h.size_bytes, sha256: h.sha256 }
    }
}

impl From<UploadHeader> for proto::UploadHeader {
    fn from(h: UploadHeader) -> Self {
        Self {
            round: h.round,
            client_id: h.client_id,
            n_examples: h.n_examples,
            size_bytes: h.size_bytes,
            sha256: h.sha256,
            metrics: Some(h.metrics.into()),
        }
    }
}

impl From<proto::UploadHeader> for UploadHeader {
    fn from(h: proto::UploadHeader) -> Self {
        Self {
            round: h.round,
            client_id: h.client_id,
            n_examples: h.n_examples,
            size_bytes: h.size_bytes,
            sha256: h.sha256,
            metrics: h.metrics.map(Into::into).unwrap_or_default(),
        }
    }
}

impl From<UploadReply> for proto::UploadResponse {
    fn from(r: UploadReply) -> Self {
        Self { accepted: r.accepted, duplicate: r.duplicate, reason: r.reason }
    }
}

impl From<proto::UploadResponse> for UploadReply {
    fn from(r: proto::UploadResponse) -> Self {
        Self { accepted: r.accepted, duplicate: r.duplicate, reason: r.reason }
    }
}

impl From<FitMetrics> for proto::FitMetrics {
    fn from(m: FitMetrics) -> Self {
        Self {
            train_loss: m.train_loss,
            train_steps: m.train_steps,
            val_loss_before: m.val_loss_before,
            val_loss_after: m.val_loss_after,
            val_gain: m.val_gain,
            train_s: m.train_s,
            cpu_s: m.cpu_s,
            peak_rss_bytes: m.peak_rss_bytes,
            eval: m.eval,
        }
    }
}

impl From<proto::FitMetrics> for FitMetrics {
    fn from(m: proto::FitMetrics) -> Self {
        Self {
            train_loss: m.train_loss,
            train_steps: m.train_steps,
            val_loss_before: m.val_loss_before,
            val_loss_after: m.val_loss_after,
            val_gain: m.val_gain,
            train_s: m.train_s,
            cpu_s: m.cpu_s,
            peak_rss_bytes: m.peak_rss_bytes,
            eval: m.eval,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// Split every chunk of `body` into pieces of at most `max` bytes (zero-copy), dropping empty ones.
fn rechunk(body: ByteStream, max: usize) -> impl Stream<Item = Result<Bytes, ServiceError>> + Send {
    let max = max.max(1);
    body.flat_map(move |item| {
        let pieces: Vec<_> = match item {
            Ok(mut b) => std::iter::from_fn(|| (!b.is_empty()).then(|| b.split_to(max.min(b.len())))).map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        stream::iter(pieces)
    })
}

/// A lazy body that must total exactly `expected` bytes: yields `ResourceExhausted` as soon as it
/// exceeds them and `InvalidArgument` if it ends short; it ends after its first error.
fn checked_body<S>(chunks: S, expected: u64, what: &'static str) -> ByteStream
where
    S: Stream<Item = Result<Bytes, ServiceError>> + Send + 'static,
{
    let state = Some((Box::pin(chunks), 0u64));
    Box::pin(stream::unfold(state, move |state| async move {
        let (mut chunks, seen) = state?;
        let failure = match chunks.next().await {
            None if seen == expected => return None,
            None => ServiceError::InvalidArgument(format!(
                "the {what} ended after {seen} of the {expected} bytes its header announced"
            )),
            Some(Ok(chunk)) => {
                let seen = seen.saturating_add(chunk.len() as u64);
                if seen <= expected {
                    return Some((Ok(chunk), Some((chunks, seen))));
                }
                ServiceError::ResourceExhausted(format!(
                    "the {what} is longer than the {expected} bytes its header announced"
                ))
            }
            Some(Err(e)) => e,
        };
        Some((Err(failure), None))
    }))
}

// ---------------------------------------------------------------------------------------------
// Server

/// Serve `service` on `addr` over TLS until `shutdown` completes (then finish in-flight calls).
pub async fn serve(
    service: Arc<dyn FedService>,
    addr: SocketAddr,
    tls: ServerTls,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NetError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| NetError::Bind { addr, source })?;
    serve_with_listener(service, listener, tls, limits, shutdown).await
}

/// [`serve`] on an already bound listener (e.g. `127.0.0.1:0`, whose port the caller reads first).
pub async fn serve_with_listener(
    service: Arc<dyn FedService>,
    listener: TcpListener,
    tls: ServerTls,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NetError> {
    limits.validate()?;
    install_crypto_provider();
    let addr = listener.local_addr().map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string());
    let fed = FedServer::new(Adapter { inner: service, limits })
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    tracing::info!(%addr, "serving hetfed.v2.Fed over TLS");
    Server::builder()
        .tls_config(tls.to_tonic()?)
        .map_err(|e| NetError::Tls { context: format!("server on {addr}"), reason: error_chain(&e) })?
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .initial_stream_window_size(limits.window_bytes)
        .initial_connection_window_size(limits.window_bytes)
        .add_service(fed)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await
        .map_err(|e| NetError::Serve { addr, reason: error_chain(&e) })
}

tokio::task_local! {
    static PEER: Option<SocketAddr>;
}

/// The remote address of the gRPC call the current task is serving, when [`serve`] runs the
/// service (`None` elsewhere, e.g. in simulation). For logs and audit records only: the address
/// proves nothing about who the caller is.
pub fn peer_addr() -> Option<SocketAddr> {
    PEER.try_with(|p| *p).ok().flatten()
}

/// Adapts a [`FedService`] to the generated `Fed` server trait.
struct Adapter {
    inner: Arc<dyn FedService>,
    limits: Limits,
}

/// The [`Caller`] named by a request's metadata; `Unauthenticated` when it is missing.
fn caller_of(metadata: &MetadataMap) -> Result<Caller, Status> {
    let client_id = metadata
        .get(CLIENT_ID_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Status::unauthenticated(format!("missing {CLIENT_ID_METADATA} metadata")))?;
    let token = metadata
        .get(AUTHORIZATION_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Status::unauthenticated(format!("missing `{AUTHORIZATION_METADATA}: Bearer <token>` metadata"))
        })?;
    Ok(Caller { client_id: client_id.to_owned(), token: Secret::new(token) })
}

type FetchModelStream = Pin<Box<dyn Stream<Item = Result<proto::FetchModelResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Fed for Adapter {
    async fn register(
        &self,
        req: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterResponse>, Status> {
        let caller = caller_of(req.metadata())?;
        let peer = req.remote_addr();
        let info = req.into_inner().info.ok_or_else(|| Status::invalid_argument("RegisterRequest without info"))?;
        tracing::debug!(client_id = %caller.client_id, "register");
        Ok(Response::new(PEER.scope(peer, self.inner.register(&caller, info.into())).await?.into()))
    }

    async fn instructions(
        &self,
        req: Request<proto::InstructionsRequest>,
    ) -> Result<Response<proto::InstructionsResponse>, Status> {
        let caller = caller_of(req.metadata())?;
        let peer = req.remote_addr();
        let proto::InstructionsRequest { after_round, wait_ms } = req.into_inner();
        let wait = Duration::from_millis(wait_ms).min(MAX_LONG_POLL);
        Ok(Response::new(PEER.scope(peer, self.inner.instructions(&caller, after_round, wait)).await?.into()))
    }

    type FetchModelStream = FetchModelStream;

    async fn fetch_model(&self, req: Request<proto::FetchModelRequest>) -> Result<Response<FetchModelStream>, Status> {
        use fetch_model_response::Msg;
        let caller = caller_of(req.metadata())?;
        let peer = req.remote_addr();
        let version = req.into_inner().version;
        tracing::debug!(client_id = %caller.client_id, %version, "fetch_model");
        let (header, body) = PEER.scope(peer, self.inner.fetch_model(&caller, &version)).await?;
        let first = proto::FetchModelResponse { msg: Some(Msg::Header(header.into())) };
        let chunks = rechunk(body, self.limits.chunk_bytes)
            .map(|r| r.map(|b| proto::FetchModelResponse { msg: Some(Msg::Chunk(b)) }).map_err(Status::from));
        Ok(Response::new(Box::pin(stream::once(future::ready(Ok(first))).chain(chunks))))
    }

    async fn upload(
        &self,
        req: Request<Streaming<proto::UploadRequest>>,
    ) -> Result<Response<proto::UploadResponse>, Status> {
        use upload_request::Msg;
        let caller = caller_of(req.metadata())?;
        let peer = req.remote_addr();
        let mut messages = req.into_inner();
        let header: UploadHeader = match messages.message().await? {
            Some(proto::UploadRequest { msg: Some(Msg::Header(h)) }) => h.into(),
            Some(_) => return Err(Status::invalid_argument("an upload must start with its header")),
            None => return Err(Status::invalid_argument("the upload ended before its header")),
        };
        tracing::debug!(client_id = %caller.client_id, round = header.round, size_bytes = header.size_bytes, "upload");
        if header.size_bytes > self.limits.max_upload_bytes {
            return Err(Status::resource_exhausted(format!(
                "the upload announces {} bytes; this server accepts at most {}",
                header.size_bytes, self.limits.max_upload_bytes
            )));
        }
        let chunks = messages.map(|m| match m {
            Ok(proto::UploadRequest { msg: Some(Msg::Chunk(b)) }) => Ok(b),
            Ok(_) => Err(ServiceError::InvalidArgument("an upload carries one header, then only chunks".into())),
            Err(status) => Err(status.into()),
        });
        let body = checked_body(chunks, header.size_bytes, "upload");
        Ok(Response::new(PEER.scope(peer, self.inner.upload(&caller, header, body)).await?.into()))
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// A [`FedService`] that forwards every call to a [`serve`]d server over gRPC + TLS.
///
/// Each call sends its `caller` argument as metadata; a call whose caller has an empty client id
/// uses the caller given to [`GrpcClient::connect`] instead. Cloning is cheap and shares the
/// connection, which tonic re-establishes by itself after a failure (calls made meanwhile fail
/// with [`ServiceError::Unavailable`]).
#[derive(Debug, Clone)]
pub struct GrpcClient {
    channel: Channel,
    caller: Caller,
    limits: Limits,
}

impl GrpcClient {
    /// Connect (TCP + TLS handshake + HTTP/2) to `endpoint`, e.g. `"https://127.0.0.1:50051"`,
    /// within `connect_timeout`.
    pub async fn connect(
        endpoint: &str,
        tls: ClientTls,
        caller: Caller,
        limits: Limits,
        connect_timeout: Duration,
    ) -> Result<Self, NetError> {
        limits.validate()?;
        install_crypto_provider();
        let bad = |reason: String| NetError::Endpoint { endpoint: endpoint.to_owned(), reason };
        let ep = Endpoint::from_shared(endpoint.to_owned()).map_err(|e| bad(error_chain(&e)))?;
        match ep.uri().scheme_str() {
            Some("https") => {}
            Some("http") => return Err(bad("found http://: the server only speaks TLS (use https://)".into())),
            other => return Err(bad(format!("found the scheme {:?}", other.unwrap_or("(none)")))),
        }
        let ep = ep
            .tls_config(tls.to_tonic()?)
            .map_err(|e| NetError::Tls { context: format!("client for {endpoint}"), reason: error_chain(&e) })?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let failed =
            |reason: String, class: ErrorClass| NetError::Connect { endpoint: endpoint.to_owned(), reason, class };
        let channel = tokio::time::timeout(connect_timeout, ep.connect())
            .await
            .map_err(|_| failed(format!("no TLS connection within {connect_timeout:?}"), ErrorClass::Transient))?
            .map_err(|e| match tls_refusal(&e, Some(&tls.domain)) {
                // The TLS layer refused: trying again cannot help.
                Some(why) => failed(why, ErrorClass::Permanent),
                // The network failed (nothing listening, reset, unreachable, timeout): maybe later.
                None => failed(error_chain(&e), ErrorClass::Transient),
            })?;
        let this = Self { channel, caller, limits };
        this.probe(connect_timeout).await.map_err(|(reason, class)| failed(reason, class))?;
        Ok(this)
    }

    /// One call without credentials, which a hetfed server answers `Unauthenticated` without
    /// involving its service: proves that the server speaks this protocol and kept the connection.
    /// Under TLS 1.3 a server refuses a client certificate (or its absence) only after the
    /// client's side of the handshake is over, by closing the connection: a connection closed
    /// before this first answer is that refusal, and permanent.
    async fn probe(&self, timeout: Duration) -> Result<(), (String, ErrorClass)> {
        let mut client = self.client();
        let call = client.register(Request::new(proto::RegisterRequest { info: None }));
        let status = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err((format!("no answer to a first call within {timeout:?}"), ErrorClass::Transient)),
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(s)) if s.code() == Code::Unauthenticated => return Ok(()),
            Ok(Err(s)) => s,
        };
        let chain = error_chain(&status);
        match ServiceError::from(status) {
            ServiceError::Unavailable(m) if ["connection closed", "connection reset", "broken pipe"].iter().any(|p| chain.contains(p)) => Err((
                format!("the server closed the connection right after the TLS handshake ({m}): it refuses this client's certificate (mutual TLS needs a client certificate signed by the server's client CA)"),
                ErrorClass::Permanent,
            )),
            ServiceError::Unavailable(m) => Err((m, ErrorClass::Transient)),
            // The TLS layer's refusal, explained by the conversion.
            ServiceError::Unauthenticated(m) => Err((m, ErrorClass::Permanent)),
            e => Err((format!("the server refused a first call: {e}"), ErrorClass::Permanent)),
        }
    }

    /// The caller used for calls whose own caller has an empty client id.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The underlying channel, for calls this type does not wrap (e.g. `proto::fed_client::FedClient::new`).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn client(&self) -> FedClient<Channel> {
        FedClient::new(self.channel.clone())
            .max_decoding_message_size(self.limits.max_message_bytes)
            .max_encoding_message_size(self.limits.max_message_bytes)
    }

    /// `message` with the caller's metadata (an empty client id or token is not sent).
    fn request<T>(&self, caller: &Caller, message: T) -> Result<Request<T>, ServiceError> {
        let caller = if caller.client_id.is_empty() { &self.caller } else { caller };
        let mut req = Request::new(message);
        let md = req.metadata_mut();
        if !caller.client_id.is_empty() {
            let id = MetadataValue::try_from(caller.client_id.as_str()).map_err(|_| {
                ServiceError::InvalidArgument(format!(
                    "the client id {:?} is not valid gRPC metadata (visible ASCII only)",
                    caller.client_id
                ))
            })?;
            md.insert(CLIENT_ID_METADATA, id);
        }
        if !caller.token.expose().is_empty() {
            let mut auth = MetadataValue::try_from(format!("Bearer {}", caller.token.expose())).map_err(|_| {
                ServiceError::InvalidArgument("the token is not valid gRPC metadata (visible ASCII only)".into())
            })?;
            auth.set_sensitive(true);
            md.insert(AUTHORIZATION_METADATA, auth);
        }
        Ok(req)
    }
}

#[async_trait::async_trait]
impl FedService for GrpcClient {
    async fn register(&self, caller: &Caller, info: ClientInfo) -> Result<RegisterReply, ServiceError> {
        let req = self.request(caller, proto::RegisterRequest { info: Some(info.into()) })?;
        Ok(self.client().register(req).await?.into_inner().into())
    }

    async fn instructions(
        &self,
        caller: &Caller,
        after_round: u64,
        wait: Duration,
    ) -> Result<Instruction, ServiceError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let req = self.request(caller, proto::InstructionsRequest { after_round, wait_ms })?;
        self.client().instructions(req).await?.into_inner().try_into()
    }

    async fn fetch_model(&self, caller: &Caller, version: &str) -> Result<(ModelHeader, ByteStream), ServiceError> {
        use fetch_model_response::Msg;
        let req = self.request(caller, proto::FetchModelRequest { version: version.to_owned() })?;
        let mut messages = self.client().fetch_model(req).await?.into_inner();
        let header: ModelHeader = match messages.message().await? {
            Some(proto::FetchModelResponse { msg: Some(Msg::Header(h)) }) => h.into(),
            _ => return Err(ServiceError::Internal("the model download did not start with its header".into())),
        };
        let chunks = messages.map(|m| match m {
            Ok(proto::FetchModelResponse { msg: Some(Msg::Chunk(b)) }) => Ok(b),
            Ok(_) => Err(ServiceError::Internal("a model download carries one header, then only chunks".into())),
            Err(status) => Err(status.into()),
        });
        let body = checked_body(chunks, header.size_bytes, "model download");
        Ok((header, body))
    }

    async fn upload(
        &self,
        caller: &Caller,
        header: UploadHeader,
        body: ByteStream,
    ) -> Result<UploadReply, ServiceError> {
        use upload_request::Msg;
        // A failure to read the local body ends the request stream early (the server then refuses
        // the short upload); the local error is what this call reports.
        let local_error: Arc<Mutex<Option<ServiceError>>> = Arc::default();
        let slot = Arc::clone(&local_error);
        let first = proto::UploadRequest { msg: Some(Msg::Header(header.into())) };
        let chunks = rechunk(body, self.limits.chunk_bytes).scan((), move |_, item| {
            future::ready(match item {
                Ok(b) => Some(proto::UploadRequest { msg: Some(Msg::Chunk(b)) }),
                Err(e) => {
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(e);
                    }
                    None
                }
            })
        });
        let req = self.request(caller, stream::once(future::ready(first)).chain(chunks))?;
        let result = self.client().upload(req).await;
        if let Some(e) = local_error.lock().ok().and_then(|mut s| s.take()) {
            return Err(e);
        }
        Ok(result?.into_inner().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_error_survives_status() {
        let all = [
            ServiceError::Unauthenticated("a".into()),
            ServiceError::PermissionDenied("b".into()),
            ServiceError::InvalidArgument("c".into()),
            ServiceError::FailedPrecondition("d".into()),
            ServiceError::ResourceExhausted("e".into()),
            ServiceError::NotFound("f".into()),
            ServiceError::Unavailable("g".into()),
            ServiceError::Internal("h ünïcode".into()),
        ];
        for e in all {
            assert_eq!(ServiceError::from(Status::from(e.clone())), e);
        }
        assert!(ServiceError::from(Status::cancelled("x")).is_retryable());
        assert!(ServiceError::from(Status::unknown("x")).is_retryable());
        assert!(ServiceError::from(Status::deadline_exceeded("x")).is_retryable());
        // Another protocol version: permanent.
        let e = ServiceError::from(Status::unimplemented("x"));
        assert!(matches!(&e, ServiceError::FailedPrecondition(m) if m.contains("protocol version")), "{e:?}");
    }

    #[test]
    fn limits_are_checked() {
        assert!(Limits::default().validate().is_ok());
        assert!(Limits { chunk_bytes: 0, ..Limits::default() }.validate().is_err());
        assert!(Limits { chunk_bytes: 8 << 20, ..Limits::default() }.validate().is_err());
        assert!(Limits { window_bytes: 1000, ..Limits::default() }.validate().is_err());
    }

    #[tokio::test]
    async fn checked_body_enforces_the_announced_size() {
        let body = |n: usize| stream::iter(vec![Ok(Bytes::from(vec![0u8; n]))]);
        let collect = |b: ByteStream| crate::collect_body(b);
        assert_eq!(collect(checked_body(body(10), 10, "t")).await.map(|v| v.len()), Ok(10));
        assert!(matches!(collect(checked_body(body(11), 10, "t")).await, Err(ServiceError::ResourceExhausted(_))));
        assert!(matches!(collect(checked_body(body(9), 10, "t")).await, Err(ServiceError::InvalidArgument(_))));
        let pieces: Vec<_> = rechunk(crate::body_from_bytes(Bytes::from(vec![1u8; 10]), 10), 3).collect().await;
        assert_eq!(pieces.iter().map(|p| p.as_ref().map(Bytes::len)).collect::<Vec<_>>(), [Ok(3), Ok(3), Ok(3), Ok(1)]);
    }
}
