//! The service the federated server offers, independent of transport.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::error::{Classify, ErrorClass};
use crate::types::*;

/// A body of bytes streamed in chunks (uploads and model downloads): no size cap, bounded memory.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ServiceError>> + Send>>;

/// One in-memory chunked body (used by tests and the in-memory transport).
pub fn body_from_bytes(data: Bytes, chunk: usize) -> ByteStream {
    let chunk = chunk.max(1);
    let n = data.len();
    let chunks: Vec<Bytes> = (0..n.div_ceil(chunk)).map(|i| data.slice(i * chunk..((i + 1) * chunk).min(n))).collect();
    Box::pin(futures::stream::iter(chunks.into_iter().map(Ok)))
}

/// Read a whole body into memory (callers bound the size first).
pub async fn collect_body(mut body: ByteStream) -> Result<Vec<u8>, ServiceError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// A secret string whose `Debug`/`Display` never print it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Who is calling: the client id it claims and the token that proves it. The server checks both.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caller {
    pub client_id: String,
    pub token: Secret,
}

/// Errors a service call returns; each maps to one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Wrong round, late update, model version gone, ...
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Size limits.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// Transport failure or server shutting down; the client retries with backoff.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// Whether a client should retry the same call later (transport trouble), as opposed to a
    /// refusal: the [`ErrorClass::Transient`] errors of [`Classify`].
    pub fn is_retryable(&self) -> bool {
        self.class() == ErrorClass::Transient
    }
}

impl Classify for ServiceError {
    /// Only `Unavailable` (the connection failed or timed out, the server is shutting down) is
    /// transient. Every other error is the server's answer to this request (or, for
    /// `Unauthenticated` raised by the transport, the TLS layer refusing the peer) and would be
    /// the same answer again.
    fn class(&self) -> ErrorClass {
        match self {
            ServiceError::Unavailable(_) => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        }
    }
}

/// The federated server's API. Implemented by the server; called by clients either directly
/// (simulation) or through `grpc::GrpcClient` (deployment).
#[async_trait::async_trait]
pub trait FedService: Send + Sync + 'static {
    /// Register (or re-register after a reconnect) a client.
    async fn register(&self, caller: &Caller, info: ClientInfo) -> Result<RegisterReply, ServiceError>;

    /// Long poll: the instruction for this client for a round after `after_round` (0 = any),
    /// waiting at most `wait` before answering `Instruction::Wait`.
    async fn instructions(
        &self,
        caller: &Caller,
        after_round: u64,
        wait: Duration,
    ) -> Result<Instruction, ServiceError>;

    /// Download the model with this version (hash) as safetensors bytes.
    async fn fetch_model(&self, caller: &Caller, version: &str) -> Result<(ModelHeader, ByteStream), ServiceError>;

    /// Upload an update: the header (with the client's [`FitMetrics`], its own evaluation
    /// included), then its bytes. The server checks size and checksum.
    async fn upload(
        &self,
        caller: &Caller,
        header: UploadHeader,
        body: ByteStream,
    ) -> Result<UploadReply, ServiceError>;
}
