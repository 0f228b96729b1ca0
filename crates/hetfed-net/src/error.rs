//! Errors of setting up the transport (certificates, listening, connecting). Errors of individual
//! calls are [`crate::ServiceError`]s.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A transport setup error: each says what was expected, what was found, and where.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot read the {what} at {path}: {source}")]
    Read { what: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot write the {what} to {path}: {source}")]
    Write { what: &'static str, path: PathBuf, source: io::Error },
    /// A PEM file or buffer that does not hold what it should.
    #[error("expected {expected} in {origin}, found {found}")]
    Pem { expected: &'static str, origin: String, found: String },
    #[error("TLS configuration rejected ({context}): {reason}")]
    Tls { context: String, reason: String },
    #[error("cannot generate development certificates: {0}")]
    CertGen(String),
    #[error("invalid transport limits: {0}")]
    Limits(String),
    #[error("invalid endpoint {endpoint:?}: expected an https://host:port URL, {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("the gRPC server on {addr} failed: {reason}")]
    Serve { addr: String, reason: String },
}

/// An error and its sources as one line ("transport error: tls handshake: invalid peer certificate"),
/// without repeating a source whose text its parent already contains.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}
