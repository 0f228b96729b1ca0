//! Writing `metrics.jsonl`: the records are [`hetfed_events::Event`]s (the same types the report
//! reads), built here from the server's state and appended one per line.

use std::io::Write;

use hetfed_events::{ClientRound, Event, Status};

use super::{lock, Outcome, Server};
use crate::strategy::AggregateReport;

/// The line of `client` (selected in `round`): `outcome` is its upload's (none: it sent
/// nothing), `failure` the reason recorded when it has no final outcome, `report` the round's
/// aggregation if any.
pub(super) fn client_round(
    round: u64,
    client: &str,
    bytes_down: u64,
    outcome: Option<&Outcome>,
    failure: Option<&str>,
    report: Option<&AggregateReport>,
) -> ClientRound {
    let base = ClientRound {
        round: Some(round),
        client: Some(client.into()),
        bytes_down: Some(bytes_down),
        ..Default::default()
    };
    match outcome {
        Some(Outcome::Accepted { n_examples, metrics, bytes, norm, upload_s }) => ClientRound {
            status: Some(Status::Ok),
            examples: Some(*n_examples),
            bytes_up: Some(*bytes),
            update_norm: Some(*norm),
            upload_s: Some(*upload_s),
            train_s: metrics.train_s,
            train_loss: metrics.train_loss,
            val_loss_before: metrics.val_loss_before,
            val_loss_after: metrics.val_loss_after,
            cpu_s: metrics.cpu_s,
            peak_rss_bytes: metrics.peak_rss_bytes,
            eval: Some(metrics.eval.clone()),
            weight: report.and_then(|r| r.weights.get(client).copied()),
            ..base
        },
        Some(Outcome::Rejected { reason, bytes }) => {
            ClientRound { status: Some(Status::Rejected), reason: Some(reason.clone()), bytes_up: Some(*bytes), ..base }
        }
        Some(Outcome::InProgress) | None => {
            ClientRound { status: Some(Status::Failed), reason: Some(failure.unwrap_or_default().to_string()), ..base }
        }
    }
}

impl Server {
    /// Appends `event` to `metrics.jsonl` (flushed at once; a failure is logged, not raised).
    pub(super) fn event(&self, event: &Event) {
        let line = match event.to_line() {
            Ok(l) => l,
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
