//! Domain messages of the federated protocol. The protobuf schema (`proto/hetfed/v2/fed.proto`)
//! mirrors these; free-form parts (fit configuration, metrics) travel as JSON or maps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a client declares when it registers. Only aggregate statistics of its data, never examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClientInfo {
    pub client_id: String,
    /// Model architecture (`model_type` of its base, e.g. "bloom").
    pub arch: String,
    /// Content hash of the client's base weights (`ModelIdentity::weights_hash`).
    pub base_hash: String,
    pub stats: DataStats,
    /// SHA-256 of the base's tokenizer vocabulary, merges and added tokens
    /// (`Checkpoint::tokenizer_hash`); empty when the client does not say.
    #[serde(default)]
    pub tokenizer_hash: String,
}

/// Aggregate statistics of a client's private training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DataStats {
    pub tasks: Vec<String>,
    pub n_examples: u64,
    pub n_tokens: u64,
    /// Label → count (classification tasks; empty otherwise).
    pub label_hist: BTreeMap<String, u64>,
    pub label_entropy_bits: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RegisterReply {
    /// The run this server is executing (clients log it; a changed id after reconnect means a new run).
    pub run_id: String,
    pub message: String,
}

/// The answer to a (long-polled) request for instructions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Instruction {
    /// Train in this round.
    Fit(FitIns),
    /// Nothing for this client yet; ask again (the server held the poll as long as it could).
    Wait,
    /// The run is over; the client exits.
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitIns {
    pub round: u64,
    /// Hash of the weights the client must start from: its own base hash, or the server's global
    /// model (then the client fetches it with [`crate::FedService::fetch_model`] if it lacks it).
    pub model_version: String,
    /// Strategy-defined configuration as JSON (epochs, lr, proximal_mu, encoding, ...).
    pub config: serde_json::Value,
    /// Unix milliseconds after which the server stops accepting this round's updates.
    pub deadline_unix_ms: u64,
}

/// Sent before an update's bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UploadHeader {
    pub round: u64,
    pub client_id: String,
    pub n_examples: u64,
    /// Total length of the body in bytes.
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the body.
    pub sha256: String,
    /// What the client measured in this fit. (The body is a task vector's safetensors bytes; the
    /// server reads its encoding from them.)
    pub metrics: FitMetrics,
}

/// What a client measured in one fit, sent with its update. `None`: not measured (e.g. no
/// validation split, or a value that was not finite).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FitMetrics {
    /// Mean training loss over the last quarter of the fit's steps.
    pub train_loss: Option<f64>,
    /// Optimiser steps taken.
    pub train_steps: Option<u64>,
    /// Validation loss of the weights the fit started from.
    pub val_loss_before: Option<f64>,
    /// Validation loss of the tuned weights.
    pub val_loss_after: Option<f64>,
    /// `val_loss_before - val_loss_after`: how much the fit helped on the client's own data.
    pub val_gain: Option<f64>,
    /// Wall seconds of the fit.
    pub train_s: Option<f64>,
    /// CPU seconds of the fit.
    pub cpu_s: Option<f64>,
    /// The client process's peak resident memory.
    pub peak_rss_bytes: Option<u64>,
    /// The client's own evaluation of the tuned model: `"<task>/<metric>"` → value.
    pub eval: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UploadReply {
    pub accepted: bool,
    /// True when the same client already uploaded for this round (the retry is accepted once, not twice).
    pub duplicate: bool,
    pub reason: String,
}

/// Metadata of a model download.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelHeader {
    pub version: String,
    pub size_bytes: u64,
    pub sha256: String,
}
