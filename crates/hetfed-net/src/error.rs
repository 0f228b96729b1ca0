//! Errors of setting up the transport (certificates, listening, connecting). Errors of individual
//! calls are [`crate::ServiceError`]s.
//!
//! Both are classified in one place, here: [`Classify::class`] says whether a failure is
//! [`ErrorClass::Transient`] (the network or the server is not there yet: connection refused or
//! reset, timeouts, `Unavailable`; retry with backoff) or [`ErrorClass::Permanent`] (only a change
//! of configuration helps: the URL's scheme, TLS trust, the server's name, the client's
//! certificate, credentials, revocation, protocol version; give up at once with the cause).

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
    /// A failed connection attempt; `class` says whether trying again later can succeed
    /// (nothing listening, timeouts) or not (TLS trust, the server's name, protocol).
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String, class: ErrorClass },
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

/// Whether trying the same thing again later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The network or the server is not there (yet): connection refused or reset, timeouts, a
    /// server shutting down. Retried with backoff, for a bounded time.
    Transient,
    /// Only a change of configuration helps (URL scheme, TLS trust, the server's name, the client's
    /// certificate, token, revocation, protocol version) or the server refused this very request.
    /// Never retried as is.
    Permanent,
}

/// The one classification of transport and call errors used by every retry loop.
pub trait Classify: std::fmt::Display {
    fn class(&self) -> ErrorClass;

    fn is_permanent(&self) -> bool {
        self.class() == ErrorClass::Permanent
    }
}

impl Classify for NetError {
    /// Everything but a failed connection attempt is a local configuration or setup problem;
    /// a connection attempt carries its own class.
    fn class(&self) -> ErrorClass {
        match self {
            NetError::Connect { class, .. } => *class,
            _ => ErrorClass::Permanent,
        }
    }
}

impl<T: Classify + ?Sized> Classify for &T {
    fn class(&self) -> ErrorClass {
        (**self).class()
    }
}

/// The error, somewhere in `err`'s chain, of the TLS layer refusing the connection (as opposed to
/// the network failing under it), explained in words: every such failure is permanent. `domain`
/// is the name the client expected on the server's certificate, when known.
pub(crate) fn tls_refusal(err: &(dyn std::error::Error + 'static), domain: Option<&str>) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C};
    let mut next = Some(err);
    while let Some(e) = next {
        // tokio-rustls reports TLS failures as io::Errors wrapping the rustls error, and
        // io::Error::source skips the wrapped error itself.
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(t) = tls {
            let name = domain.map_or_else(|| "the expected name".to_owned(), |d| format!("{d:?}"));
            return Some(match t {
                rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
                    format!("TLS: the server's certificate is not signed by a CA this client trusts ({t}); check the CA file (deploy.ca, ClientTls::ca_pem)")
                }
                rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                    format!("TLS: the server's certificate does not name {name} ({t}); check the TLS domain (deploy.domain, ClientTls::domain)")
                }
                rustls::Error::InvalidCertificate(_) => {
                    format!("TLS: the server's certificate is not acceptable ({t})")
                }
                rustls::Error::AlertReceived(
                    a @ (A::CertificateRequired
                    | A::BadCertificate
                    | A::UnknownCA
                    | A::CertificateUnknown
                    | A::AccessDenied
                    | A::CertificateExpired
                    | A::CertificateRevoked),
                ) => {
                    format!("TLS: the server refused this client's certificate (alert {a:?}); mutual TLS needs a client certificate signed by the server's client CA")
                }
                rustls::Error::AlertReceived(
                    a @ (A::ProtocolVersion | A::HandshakeFailure | A::InsufficientSecurity | A::NoApplicationProtocol),
                ) => {
                    format!("TLS: the server and this client share no protocol version or parameters (alert {a:?})")
                }
                rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
                    format!("TLS: the server and this client are incompatible ({t})")
                }
                rustls::Error::InvalidMessage(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. } => {
                    format!("TLS: the server does not speak TLS as expected ({t}); is it a plain-text (http) server?")
                }
                _ => format!("TLS: the handshake failed ({t})"),
            });
        }
        next = e.source();
    }
    // Layers that keep only the text of the error they wrap (h2 does, for io errors): rustls'
    // own wording, and tonic's refusal after the handshake (a private type).
    let text = error_chain(err);
    let alert = |name: &str| text.contains(&format!("received fatal alert: {name}"));
    if [
        "CertificateRequired",
        "BadCertificate",
        "UnknownCA",
        "CertificateUnknown",
        "AccessDenied",
        "CertificateExpired",
        "CertificateRevoked",
    ]
    .into_iter()
    .any(alert)
    {
        return Some(format!("TLS: the server refused this client's certificate ({text}); mutual TLS needs a client certificate signed by the server's client CA"));
    }
    if ["ProtocolVersion", "HandshakeFailure", "InsufficientSecurity", "NoApplicationProtocol"].into_iter().any(alert)
        || text.contains("peer is incompatible")
    {
        return Some(format!("TLS: the server and this client share no protocol version or parameters ({text})"));
    }
    if text.contains("invalid peer certificate") {
        return Some(format!(
            "TLS: the server's certificate is not acceptable ({text}); check the CA file and the TLS domain"
        ));
    }
    if text.contains("received corrupt message") {
        return Some(format!(
            "TLS: the server does not speak TLS as expected ({text}); is it a plain-text (http) server?"
        ));
    }
    if text.contains("HTTP/2 was not negotiated") {
        return Some("the server did not negotiate HTTP/2 over TLS (ALPN h2): it is not a gRPC server".into());
    }
    None
}
