//! The records of `metrics.jsonl`, built here and nowhere else: one typed [`Event`] per line
//! (`run_start`, `round`, `client_round`, `refused`, `refused_suppressed`, `resume`,
//! `run_end`), each tagged by its `"event"` field.
//!
//! A record is written through a [`serde_json::Value`], whose objects keep their keys sorted, so
//! the lines' key order does not depend on the order of the fields here.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;
use serde_json::Value;

use super::{lock, Outcome, Server};
use crate::strategy::AggregateReport;

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(super) enum Event<'a> {
    /// The run's first line (not written again on resume).
    RunStart {
        run_id: &'a str,
        strategy: &'a str,
        rounds: u64,
        /// Every id that holds a token.
        clients: Vec<&'a str>,
        config: &'a Value,
        strategy_info: Value,
        time_unix_ms: u64,
    },
    /// The server's evaluation of the initial model (round 0).
    #[serde(rename = "round")]
    InitialEval {
        round: u64,
        server_eval: &'a BTreeMap<String, f64>,
        server_eval_s: f64,
    },
    Round(Box<RoundRecord<'a>>),
    ClientRound(ClientRound<'a>),
    /// A refused call (see [`Server::audit`]).
    Refused {
        call: &'a str,
        client: &'a str,
        reason: &'a str,
        peer: Option<&'a str>,
        upload_round: Option<u64>,
        server_round: u64,
        time_unix_ms: u64,
    },
    /// Refusals counted but not written in an audit window.
    RefusedSuppressed {
        count: u64,
        window_s: u64,
        time_unix_ms: u64,
    },
    /// A server restarted from the checkpoint of `round`.
    Resume {
        round: u64,
        time_unix_ms: u64,
    },
    RunEnd {
        rounds_completed: u64,
        wall_s: f64,
        time_unix_ms: u64,
    },
}

/// A round (after its clients' lines): outcomes, aggregation, timings, traffic, evaluation.
#[derive(Serialize)]
pub(super) struct RoundRecord<'a> {
    pub round: u64,
    pub selected: usize,
    pub ok: usize,
    pub rejected: usize,
    pub failed: usize,
    pub aggregated: bool,
    pub n_aggregated: usize,
    pub quorum: usize,
    /// Client → aggregation weight.
    pub alphas: &'a BTreeMap<String, f64>,
    pub applied_norm: f64,
    /// The strategy's own record of the aggregation.
    pub aggregation: &'a Value,
    pub aggregate_s: f64,
    pub server_eval_s: f64,
    pub wall_s: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub server_eval: &'a BTreeMap<String, f64>,
    pub server_cpu_s: f64,
    pub server_rss_bytes: u64,
    pub server_peak_rss_bytes: u64,
    pub model_version: String,
}

/// A selected client in a round: what it downloaded, and its upload's outcome.
#[derive(Serialize)]
pub(super) struct ClientRound<'a> {
    round: u64,
    client: &'a str,
    bytes_down: u64,
    #[serde(flatten)]
    status: ClientStatus<'a>,
}

/// The outcome of a client's round, tagged by `"status"`.
#[derive(Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum ClientStatus<'a> {
    /// Accepted: the client's [`hetfed_net::FitMetrics`] (`null` when it did not report one),
    /// its own evaluation (`"<task>/<metric>"` → value), and its aggregation weight when the round
    /// aggregated.
    Ok {
        examples: u64,
        bytes_up: u64,
        update_norm: f64,
        upload_s: f64,
        train_s: Option<f64>,
        train_loss: Option<f64>,
        val_loss_before: Option<f64>,
        val_loss_after: Option<f64>,
        cpu_s: Option<f64>,
        peak_rss_bytes: Option<u64>,
        eval: &'a BTreeMap<String, f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        weight: Option<f64>,
    },
    /// Refused by validation.
    Rejected { reason: &'a str, bytes_up: u64 },
    /// No final upload by the deadline.
    Failed { reason: &'a str },
}

impl<'a> ClientRound<'a> {
    /// The line of `client` (selected in `round`): `outcome` is its upload's (none: it sent
    /// nothing), `failure` the reason recorded when it has no final outcome, `report` the round's
    /// aggregation if any.
    pub(super) fn new(
        round: u64,
        client: &'a str,
        bytes_down: u64,
        outcome: Option<&'a Outcome>,
        failure: Option<&'a str>,
        report: Option<&AggregateReport>,
    ) -> Self {
        let status = match outcome {
            Some(Outcome::Accepted { n_examples, metrics, bytes, norm, upload_s }) => ClientStatus::Ok {
                examples: *n_examples,
                bytes_up: *bytes,
                update_norm: *norm,
                upload_s: *upload_s,
                train_s: metrics.train_s,
                train_loss: metrics.train_loss,
                val_loss_before: metrics.val_loss_before,
                val_loss_after: metrics.val_loss_after,
                cpu_s: metrics.cpu_s,
                peak_rss_bytes: metrics.peak_rss_bytes,
                eval: &metrics.eval,
                weight: report.and_then(|r| r.weights.get(client).copied()),
            },
            Some(Outcome::Rejected { reason, bytes }) => ClientStatus::Rejected { reason, bytes_up: *bytes },
            Some(Outcome::InProgress) | None => ClientStatus::Failed { reason: failure.unwrap_or_default() },
        };
        Self { round, client, bytes_down, status }
    }

    /// The bytes the client uploaded (accepted or rejected).
    pub(super) fn bytes_up(&self) -> u64 {
        match self.status {
            ClientStatus::Ok { bytes_up, .. } | ClientStatus::Rejected { bytes_up, .. } => bytes_up,
            ClientStatus::Failed { .. } => 0,
        }
    }
}

impl Server {
    /// Appends `event` to `metrics.jsonl` (flushed at once; a failure is logged, not raised).
    pub(super) fn event(&self, event: &Event<'_>) {
        let line = match serde_json::to_value(event) {
            Ok(v) => v.to_string(),
            Err(e) => {
                tracing::error!("encoding a metrics.jsonl record: {e}");
                return;
            }
        };
        let mut f = lock(&self.log);
        if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
            tracing::error!("writing metrics.jsonl: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
