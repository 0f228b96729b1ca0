//! The round loop: [`Server::run`] runs every round, each in named steps: open it (the strategy
//! samples clients), wait for their outcomes or the deadline, close it, aggregate the accepted
//! updates when the quorum is met, evaluate, record its metrics, and checkpoint it.

use std::collections::BTreeMap;
use std::sync::Arc;

use hetfed_core::{Error, Result};
use hetfed_model::ModelIdentity;
use hetfed_net::FitIns;
use hetfed_taskvec::TaskVector;
use serde_json::Value;
use tokio::time::Instant;

use hetfed_events::{Event, Round, RunEnd, RunStart};

use super::events::client_round;
use super::{lock, unix_ms, Outcome, Phase, RunSummary, Server};
use crate::strategy::{AggregateReport, Failure, FitResult};
use crate::sys;

/// An accepted update: client id, examples, the client's metrics.
type Accepted = (String, u64, hetfed_net::FitMetrics);

/// A round once closed: its selection and what came of it.
struct Closed {
    round: u64,
    /// When the round started (after waiting for the clients), and the server's CPU time then.
    started: Instant,
    cpu0: f64,
    selected: Vec<String>,
    outcomes: BTreeMap<String, Outcome>,
    bytes_down: BTreeMap<String, u64>,
    accepted: Vec<Accepted>,
    failures: Vec<Failure>,
}

/// What the server did with a closed round.
struct Done {
    report: Option<AggregateReport>,
    aggregate_s: f64,
    server_eval: BTreeMap<String, f64>,
    server_eval_s: f64,
}

impl Server {
    /// Runs every round, then tells clients the run is over.
    pub async fn run(self: &Arc<Self>) -> Result<RunSummary> {
        let t0 = Instant::now();
        let start = lock(&self.state).round;
        if start == 0 {
            self.event(&Event::RunStart(RunStart {
                run_id: Some(self.run_id.clone()),
                strategy: Some(self.opts.strategy_name.clone()),
                rounds: Some(self.opts.rounds),
                clients: Some(self.opts.auth.client_ids().map(str::to_string).collect()),
                config: Some(self.opts.config_json.clone()),
                strategy_info: Some(lock(&self.strategy).run_info()),
                time_unix_ms: Some(unix_ms()),
            }));
        }
        let mut final_eval = BTreeMap::new();
        if start == 0 && self.eval.is_some() {
            let t = Instant::now();
            final_eval = self.server_eval().await?;
            let server_eval_s = t.elapsed().as_secs_f64();
            self.event(&Event::Round(Box::new(Round {
                round: Some(0),
                server_eval: Some(final_eval.clone()),
                server_eval_s: Some(server_eval_s),
                ..Default::default()
            })));
        }
        for round in start + 1..=self.opts.rounds {
            final_eval = self.run_round(round).await?;
        }
        lock(&self.state).phase = Phase::Done;
        // Each round's spool is removed when it closes; the empty root goes with the run.
        let _ = std::fs::remove_dir(self.opts.run_dir.join("spool"));
        self.notify();
        self.flush_audit();
        let wall_s = t0.elapsed().as_secs_f64();
        let rounds_completed = self.opts.rounds;
        self.event(&Event::RunEnd(RunEnd {
            rounds_completed: Some(rounds_completed),
            wall_s: Some(wall_s),
            time_unix_ms: Some(unix_ms()),
        }));
        let model_version = lock(&self.state).identity.weights_hash.clone();
        Ok(RunSummary { rounds_completed, model_version, final_eval, wall_s })
    }

    /// One round; its server evaluation (empty when not evaluated).
    async fn run_round(self: &Arc<Self>, round: u64) -> Result<BTreeMap<String, f64>> {
        self.wait_for_clients().await?;
        let (started, cpu0) = (Instant::now(), sys::cpu_seconds());
        let deadline = self.open_round(round)?;
        self.wait_for_outcomes(deadline).await;
        let closed = self.close_round(round, started, cpu0);
        let t_agg = Instant::now();
        let report = self.aggregate_round(&closed).await?;
        let aggregate_s = t_agg.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(self.spool_dir(round));
        let t_eval = Instant::now();
        let server_eval = if self.evaluates(round) { self.server_eval().await? } else { BTreeMap::new() };
        let server_eval_s = t_eval.elapsed().as_secs_f64();
        let done = Done { report, aggregate_s, server_eval, server_eval_s };
        self.record_round(&closed, &done);
        // After the round's metrics: a crash in between re-runs the round on resume, and resume
        // drops that round's lines first, so metrics.jsonl never holds a round twice.
        self.checkpoint(round).await?;
        Ok(done.server_eval)
    }

    async fn wait_for_clients(&self) -> Result<()> {
        let deadline = Instant::now() + self.opts.register_timeout;
        loop {
            let mut rx = self.changed.subscribe();
            let n = lock(&self.state).clients.len();
            if n >= self.opts.min_clients {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(Error::msg(format!(
                    "expected at least {} registered clients (server.min_clients), found {n} after waiting {:.1} s (server.register_timeout_s)",
                    self.opts.min_clients,
                    self.opts.register_timeout.as_secs_f64()
                )));
            }
        }
    }

    /// Opens `round`: the strategy selects clients among the registered ones, each gets its
    /// instructions. Returns the round's deadline.
    fn open_round(&self, round: u64) -> Result<Instant> {
        let available = lock(&self.state).clients.values().cloned().collect::<Vec<_>>();
        let plan = lock(&self.strategy).configure_fit(round, &available);
        if plan.is_empty() {
            return Err(Error::msg(format!(
                "round {round}: the strategy selected no client among {}",
                available.len()
            )));
        }
        let deadline = Instant::now() + self.opts.round_timeout;
        let deadline_ms = unix_ms() + self.opts.round_timeout.as_millis() as u64;
        {
            let mut st = lock(&self.state);
            st.round = round;
            st.phase = Phase::Fit;
            st.outcomes.clear();
            st.bytes_down.clear();
            let version = st.identity.weights_hash.clone();
            let versions: BTreeMap<String, String> =
                st.client_bases.iter().map(|(id, (i, _))| (id.clone(), i.weights_hash.clone())).collect();
            st.selected = plan
                .iter()
                .map(|(id, cfg)| {
                    let config = serde_json::to_value(cfg).unwrap_or(Value::Null);
                    let model_version = versions.get(id).cloned().unwrap_or_else(|| version.clone());
                    (id.clone(), FitIns { round, model_version, config, deadline_unix_ms: deadline_ms })
                })
                .collect();
        }
        self.notify();
        tracing::info!("round {round}: {} clients selected", plan.len());
        Ok(deadline)
    }

    /// Waits until every selected client has a final outcome, or the deadline.
    async fn wait_for_outcomes(&self, deadline: Instant) {
        loop {
            let mut rx = self.changed.subscribe();
            let all = {
                let st = lock(&self.state);
                st.selected
                    .keys()
                    .all(|c| matches!(st.outcomes.get(c), Some(Outcome::Accepted { .. } | Outcome::Rejected { .. })))
            };
            if all || tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return;
            }
        }
    }

    /// Closes the round to uploads and sorts its selected clients into accepted and failed.
    fn close_round(&self, round: u64, started: Instant, cpu0: f64) -> Closed {
        let (outcomes, selected, bytes_down): (_, Vec<String>, _) = {
            let mut st = lock(&self.state);
            st.phase = Phase::Closed;
            (
                std::mem::take(&mut st.outcomes),
                st.selected.keys().cloned().collect(),
                std::mem::take(&mut st.bytes_down),
            )
        };
        self.notify();
        let (mut accepted, mut failures) = (Vec::new(), Vec::new());
        for id in &selected {
            let failure = |reason: String| Failure { client_id: id.clone(), reason };
            match outcomes.get(id) {
                Some(Outcome::Accepted { n_examples, metrics, .. }) => {
                    accepted.push((id.clone(), *n_examples, metrics.clone()))
                }
                Some(Outcome::Rejected { reason, .. }) => failures.push(failure(format!("rejected: {reason}"))),
                Some(Outcome::InProgress) => failures.push(failure("upload unfinished at the deadline".into())),
                None => failures.push(failure("no update before the deadline (client slow or disconnected)".into())),
            }
        }
        Closed { round, started, cpu0, selected, outcomes, bytes_down, accepted, failures }
    }

    /// Aggregates the round's accepted updates (off the async threads) when they make the quorum;
    /// otherwise the model stays unchanged.
    async fn aggregate_round(self: &Arc<Self>, c: &Closed) -> Result<Option<AggregateReport>> {
        if c.accepted.len() < self.opts.quorum.max(1) {
            tracing::warn!(
                "round {}: {} of {} updates accepted, quorum {}: model unchanged",
                c.round,
                c.accepted.len(),
                c.selected.len(),
                self.opts.quorum
            );
            return Ok(None);
        }
        let (this, round, accepted, failures) = (self.clone(), c.round, c.accepted.clone(), c.failures.clone());
        let report = tokio::task::spawn_blocking(move || this.aggregate(round, &accepted, &failures))
            .await
            .map_err(|e| Error::msg(format!("aggregation task failed: {e}")))??;
        Ok(Some(report))
    }

    /// Aggregates from the spool, in client-id order, one update in memory at a time, into a new
    /// global model (its download is made when first asked for).
    fn aggregate(&self, round: u64, accepted: &[Accepted], failures: &[Failure]) -> Result<AggregateReport> {
        let spool = self.spool_dir(round);
        let mut global = (*lock(&self.state).global).clone();
        let mut iter = accepted.iter().map(|(id, n, metrics)| {
            let path = spool.join(format!("{id}.safetensors"));
            let tv = TaskVector::load(&path)?;
            FitResult::new(id.clone(), *n, metrics.clone(), tv)
        });
        let report = lock(&self.strategy).aggregate_fit(round, &mut global, &mut iter, failures)?;
        let identity = ModelIdentity {
            weights_hash: hetfed_core::tensor_map_hash(&global)?,
            ..lock(&self.state).identity.clone()
        };
        let mut st = lock(&self.state);
        st.global = Arc::new(global);
        st.identity = identity;
        st.download = Default::default();
        Ok(report)
    }

    /// Writes the round's metrics: one line per selected client, then the round.
    fn record_round(&self, c: &Closed, d: &Done) {
        let (mut up_total, mut down_total) = (0u64, 0u64);
        for id in &c.selected {
            let down = c.bytes_down.get(id).copied().unwrap_or(0);
            let failure = c.failures.iter().find(|f| &f.client_id == id).map(|f| f.reason.as_str());
            let line = client_round(c.round, id, down, c.outcomes.get(id), failure, d.report.as_ref());
            (up_total, down_total) = (up_total + line.bytes_up.unwrap_or(0), down_total + down);
            self.event(&Event::ClientRound(line));
        }
        let n_ok = c.accepted.len();
        let n_rej = c.outcomes.values().filter(|o| matches!(o, Outcome::Rejected { .. })).count();
        let no_report = AggregateReport::default();
        let report = d.report.as_ref().unwrap_or(&no_report);
        self.event(&Event::Round(Box::new(Round {
            round: Some(c.round),
            selected: Some(c.selected.len() as u64),
            ok: Some(n_ok as u64),
            rejected: Some(n_rej as u64),
            failed: Some((c.selected.len() - n_ok - n_rej) as u64),
            aggregated: Some(report.n_aggregated > 0),
            n_aggregated: Some(report.n_aggregated as u64),
            quorum: Some(self.opts.quorum as u64),
            alphas: Some(report.weights.clone()),
            applied_norm: Some(report.applied_norm),
            aggregation: Some(report.details.clone()),
            aggregate_s: Some(d.aggregate_s),
            server_eval_s: Some(d.server_eval_s),
            wall_s: Some(c.started.elapsed().as_secs_f64()),
            bytes_up: Some(up_total),
            bytes_down: Some(down_total),
            server_eval: Some(d.server_eval.clone()),
            server_cpu_s: Some(sys::cpu_seconds() - c.cpu0),
            server_rss_bytes: Some(sys::rss_bytes()),
            server_peak_rss_bytes: Some(sys::peak_rss_bytes()),
            model_version: Some(lock(&self.state).identity.weights_hash.clone()),
        })));
    }
}
