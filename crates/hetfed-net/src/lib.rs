//! hetfed's federated protocol, independent of any model code.
//!
//! - [`types`]: the domain messages (register, instructions, upload header with the client's fit metrics).
//! - [`service`]: the [`FedService`] trait the server implements. The client is written against
//!   `Arc<dyn FedService>`: in simulation that is the server object itself (the in-memory
//!   transport); in deployment it is [`grpc::GrpcClient`], which forwards every call over gRPC + TLS
//!   to [`grpc::serve`] wrapping the same server object. One server and one client code path.
//! - [`grpc`], [`tls`]: the tonic transport, protobuf schema under `proto/`, certificates.
//! - [`error`]: [`NetError`], the errors of setting the transport up, and [`Classify`]: the one
//!   place that says which failures are transient (retried) and which permanent (reported at once).

pub mod error;
pub mod grpc;
pub mod service;
pub mod tls;
pub mod types;

pub use error::{Classify, ErrorClass, NetError};
pub use grpc::{peer_addr, serve, serve_with_listener, GrpcClient, Limits};
pub use service::{body_from_bytes, collect_body, ByteStream, Caller, FedService, Secret, ServiceError};
pub use tls::{generate_dev_certs, install_crypto_provider, CertPaths, ClientTls, ServerTls};
pub use types::*;
