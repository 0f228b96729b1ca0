//! hetfed's federated runtime.
//!
//! - [`strategy`]: the pure `Strategy` interface and the homogeneous baselines (FedAvg, FedProx,
//!   FedAdam/FedYogi/FedAdagrad, task arithmetic).
//! - [`server`]: the server, implementing `hetfed_net::FedService`.
//! - [`hetero`]: heterogeneous aggregation: small clients' task vectors projected into (or
//!   distilled into) the larger server model, with alpha weighting, LARS and forgetting protection.
//! - [`client`]: the client loop, written against `Arc<dyn FedService>`.
//! - [`config`], [`sim`]: one TOML config for simulation and deployment; the in-process simulation.

pub mod client;
pub mod hetero;
pub mod server;
pub mod strategy;
pub mod sys;
pub mod validate;

pub use strategy::{Encoding, FitConfig, Sampling, Strategy, StrategyConfig};
pub mod assemble;
pub mod config;
pub mod sweep;

pub use config::{EvalSplit, RunConfig};
