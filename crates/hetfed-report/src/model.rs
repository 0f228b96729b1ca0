//! What the report knows about a run, read from `metrics.jsonl` through the records the server
//! writes ([`hetfed_events::Event`]): unknown events, unknown fields, and fields of the wrong
//! type are ignored (a field that is not what the schema says is missing, never an error), and
//! numbers that are not finite are missing too (serde_json writes NaN as `null`).

use hetfed_events::Event;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

pub(crate) type Metrics = BTreeMap<String, f64>;

#[derive(Debug, Default)]
pub(crate) struct RunStart {
    pub run_id: Option<String>,
    pub strategy: Option<String>,
    pub rounds: Option<u64>,
    pub clients: Vec<String>,
    pub config: Option<Value>,
    pub time_unix_ms: Option<f64>,
}

#[derive(Debug, Default)]
pub(crate) struct RoundRec {
    pub selected: Option<f64>,
    pub ok: Option<f64>,
    pub failed: Option<f64>,
    pub rejected: Option<f64>,
    pub aggregate_s: Option<f64>,
    pub server_eval_s: Option<f64>,
    pub wall_s: Option<f64>,
    pub bytes_up: Option<f64>,
    pub bytes_down: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub server_rss_bytes: Option<f64>,
    pub server_eval: Metrics,
    pub alphas: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    Failed,
    Rejected,
    Other(String),
    Unknown,
}

impl From<hetfed_events::Status> for Status {
    fn from(s: hetfed_events::Status) -> Self {
        match s {
            hetfed_events::Status::Ok => Status::Ok,
            hetfed_events::Status::Failed => Status::Failed,
            hetfed_events::Status::Rejected => Status::Rejected,
            hetfed_events::Status::Other(s) => Status::Other(s),
        }
    }
}

impl Status {
    pub fn label(&self) -> &str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Other(s) => s,
            Status::Unknown => "—",
        }
    }

    /// Worth highlighting: anything that is neither ok nor unreported.
    pub fn is_problem(&self) -> bool {
        !matches!(self, Status::Ok | Status::Unknown)
    }

    /// CSS class suffix (never untrusted text).
    pub fn class(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Rejected => "rejected",
            Status::Other(_) => "other",
            Status::Unknown => "unknown",
        }
    }
}

#[derive(Debug)]
pub(crate) struct ClientRow {
    pub round: u64,
    pub client: String,
    pub status: Status,
    pub reason: Option<String>,
    pub examples: Option<f64>,
    pub bytes_up: Option<f64>,
    pub bytes_down: Option<f64>,
    pub train_s: Option<f64>,
    pub upload_s: Option<f64>,
    pub update_norm: Option<f64>,
    pub train_loss: Option<f64>,
    pub cpu_s: Option<f64>,
    pub peak_rss_bytes: Option<f64>,
    pub eval: Metrics,
}

#[derive(Debug, Default)]
pub(crate) struct RunEnd {
    pub rounds_completed: Option<u64>,
    pub wall_s: Option<f64>,
    pub time_unix_ms: Option<f64>,
}

/// A run as the report sees it.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// The first `run_start`; later ones (a resumed run) only fill in what it lacks.
    pub start: Option<RunStart>,
    /// How many `run_start` events there were (more than one: the run was resumed).
    pub starts: usize,
    /// `round` events by round number; a repeated round (resumed run) keeps the last.
    pub rounds: BTreeMap<u64, RoundRec>,
    /// `client_round` events ordered by (round, first appearance); a repeated (round, client)
    /// keeps the last.
    pub clients: Vec<ClientRow>,
    /// The last `run_end`.
    pub end: Option<RunEnd>,
    /// Client ids: `run_start.clients` first, then in order of first appearance.
    pub client_order: Vec<String>,
}

impl Run {
    pub fn from_events(events: &[Value]) -> Run {
        let mut run = Run::default();
        let mut rows: BTreeMap<(u64, String), (usize, ClientRow)> = BTreeMap::new();
        let mut seen: Vec<String> = Vec::new();
        let count = |v: Option<u64>| v.map(|x| x as f64);
        for (i, ev) in events.iter().enumerate() {
            match Event::parse(ev) {
                Some(Event::RunStart(e)) => {
                    run.starts += 1;
                    let this = RunStart {
                        run_id: e.run_id,
                        strategy: e.strategy,
                        rounds: e.rounds,
                        clients: e.clients.unwrap_or_default(),
                        config: e.config,
                        time_unix_ms: count(e.time_unix_ms),
                    };
                    match &mut run.start {
                        None => run.start = Some(this),
                        Some(first) => {
                            first.run_id = first.run_id.take().or(this.run_id);
                            first.strategy = first.strategy.take().or(this.strategy);
                            first.rounds = first.rounds.or(this.rounds);
                            if first.clients.is_empty() {
                                first.clients = this.clients;
                            }
                            first.config = first.config.take().or(this.config);
                            first.time_unix_ms = first.time_unix_ms.or(this.time_unix_ms);
                        }
                    }
                }
                Some(Event::ClientRound(e)) => {
                    let (Some(round), Some(client)) = (e.round, e.client) else { continue };
                    if !seen.contains(&client) {
                        seen.push(client.clone());
                    }
                    let row = ClientRow {
                        round,
                        client: client.clone(),
                        status: e.status.map_or(Status::Unknown, Status::from),
                        reason: e.reason.filter(|r| !r.is_empty()),
                        examples: count(e.examples),
                        bytes_up: count(e.bytes_up),
                        bytes_down: count(e.bytes_down),
                        train_s: e.train_s,
                        upload_s: e.upload_s,
                        update_norm: e.update_norm,
                        train_loss: e.train_loss,
                        cpu_s: e.cpu_s,
                        peak_rss_bytes: count(e.peak_rss_bytes),
                        eval: e.eval.unwrap_or_default(),
                    };
                    // Keep the position of the first occurrence so the table order is stable.
                    let pos = rows.get(&(round, client.clone())).map_or(i, |(p, _)| *p);
                    rows.insert((round, client), (pos, row));
                }
                Some(Event::Round(e)) => {
                    let Some(round) = e.round else { continue };
                    run.rounds.insert(
                        round,
                        RoundRec {
                            selected: count(e.selected),
                            ok: count(e.ok),
                            failed: count(e.failed),
                            rejected: count(e.rejected),
                            aggregate_s: e.aggregate_s,
                            server_eval_s: e.server_eval_s,
                            wall_s: e.wall_s,
                            bytes_up: count(e.bytes_up),
                            bytes_down: count(e.bytes_down),
                            server_cpu_s: e.server_cpu_s,
                            server_rss_bytes: count(e.server_rss_bytes),
                            server_eval: e.server_eval.unwrap_or_default(),
                            alphas: e.alphas.unwrap_or_default(),
                        },
                    );
                }
                Some(Event::RunEnd(e)) => {
                    run.end = Some(RunEnd {
                        rounds_completed: e.rounds_completed,
                        wall_s: e.wall_s,
                        time_unix_ms: count(e.time_unix_ms),
                    });
                }
                Some(Event::Refused(_) | Event::RefusedSuppressed(_) | Event::Resume(_)) | None => {}
            }
        }
        let mut rows: Vec<(usize, ClientRow)> = rows.into_values().collect();
        rows.sort_by_key(|(pos, r)| (r.round, *pos));
        run.clients = rows.into_iter().map(|(_, r)| r).collect();
        let mut order: Vec<String> = Vec::new();
        let listed = run.start.as_ref().map(|s| s.clients.as_slice()).unwrap_or_default();
        for c in listed.iter().chain(seen.iter()) {
            if !order.contains(c) {
                order.push(c.clone());
            }
        }
        // Clients that only ever appear in `alphas`.
        for r in run.rounds.values() {
            for c in r.alphas.keys() {
                if !order.contains(c) {
                    order.push(c.clone());
                }
            }
        }
        run.client_order = order;
        run
    }

    /// Position of a client in [`Run::client_order`] (its colour in charts).
    pub fn client_index(&self, client: &str) -> usize {
        self.client_order.iter().position(|c| c == client).unwrap_or(0)
    }

    /// Every round any event mentions.
    pub fn all_rounds(&self) -> BTreeSet<u64> {
        self.rounds.keys().copied().chain(self.clients.iter().map(|r| r.round)).collect()
    }

    /// Training rounds (round ≥ 1) seen in any event.
    pub fn training_rounds(&self) -> BTreeSet<u64> {
        self.all_rounds().into_iter().filter(|r| *r >= 1).collect()
    }

    /// Rounds completed: `run_end.rounds_completed`, else the number of `round` events past round 0.
    pub fn rounds_completed(&self) -> u64 {
        self.end
            .as_ref()
            .and_then(|e| e.rounds_completed)
            .unwrap_or_else(|| self.rounds.keys().filter(|r| **r >= 1).count() as u64)
    }

    /// The `client_round` rows of a round (`clients` is sorted by round).
    pub fn rows_in(&self, round: u64) -> impl Iterator<Item = &ClientRow> {
        let lo = self.clients.partition_point(|r| r.round < round);
        let hi = self.clients.partition_point(|r| r.round <= round);
        self.clients[lo..hi].iter()
    }

    fn client_sum(&self, round: u64, get: fn(&ClientRow) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self.rows_in(round).filter_map(get).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// Mean of a client field over the clients of a round that report it.
    pub fn client_mean(&self, round: u64, get: fn(&ClientRow) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self.rows_in(round).filter_map(get).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Bytes uploaded in a round: the round event's count, else the sum over its clients.
    pub fn bytes_up(&self, round: u64) -> Option<f64> {
        self.rounds.get(&round).and_then(|r| r.bytes_up).or_else(|| self.client_sum(round, |c| c.bytes_up))
    }

    /// Bytes downloaded in a round: the round event's count, else the sum over its clients.
    pub fn bytes_down(&self, round: u64) -> Option<f64> {
        self.rounds.get(&round).and_then(|r| r.bytes_down).or_else(|| self.client_sum(round, |c| c.bytes_down))
    }

    pub fn total(&self, per_round: impl Fn(u64) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self.all_rounds().into_iter().filter_map(per_round).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    }

    /// Names of the server metrics, sorted.
    pub fn server_metric_names(&self) -> BTreeSet<String> {
        self.rounds.values().flat_map(|r| r.server_eval.keys().cloned()).collect()
    }

    /// Names of the client metrics, sorted.
    pub fn client_metric_names(&self) -> BTreeSet<String> {
        self.clients.iter().flat_map(|r| r.eval.keys().cloned()).collect()
    }

    /// The alpha the server gave a client in a round, if it reported one.
    pub fn alpha(&self, round: u64, client: &str) -> Option<f64> {
        self.rounds.get(&round).and_then(|r| r.alphas.get(client)).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.start.is_none() && self.rounds.is_empty() && self.clients.is_empty() && self.end.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tolerant_of_wrong_types_and_unknown_events() {
        let ev = vec![
            json!({"event": "run_start", "run_id": 7, "rounds": "five", "clients": ["a", 3, "b"]}),
            json!({"event": "mystery", "round": 1}),
            json!("not an object"),
            json!({"event": "client_round", "round": 1, "client": "a", "status": "OK", "examples": "many", "eval": {"m": 1.0, "n": "x"}}),
            json!({"event": "client_round", "round": -1, "client": "a"}),
            json!({"event": "client_round", "round": 1}),
            json!({"event": "round", "round": 1.0, "bytes_up": null, "server_eval": [1, 2]}),
        ];
        let run = Run::from_events(&ev);
        let start = run.start.as_ref().unwrap();
        assert_eq!(start.run_id.as_deref(), Some("7"));
        assert_eq!(start.rounds, None);
        assert_eq!(start.clients, ["a", "b"]);
        assert_eq!(run.clients.len(), 1);
        assert_eq!(run.clients[0].status, Status::Ok);
        assert_eq!(run.clients[0].examples, None);
        assert_eq!(run.clients[0].eval.len(), 1);
        assert!(run.rounds.contains_key(&1));
        assert_eq!(run.bytes_up(1), None);
    }

    #[test]
    fn repeated_rounds_keep_the_last_and_bytes_fall_back_to_clients() {
        let ev = vec![
            json!({"event": "client_round", "round": 1, "client": "a", "status": "failed", "bytes_up": 5}),
            json!({"event": "client_round", "round": 1, "client": "b", "status": "ok", "bytes_up": 7}),
            json!({"event": "client_round", "round": 1, "client": "a", "status": "ok", "bytes_up": 10}),
        ];
        let run = Run::from_events(&ev);
        assert_eq!(run.clients.len(), 2);
        assert_eq!(run.clients[0].client, "a");
        assert_eq!(run.clients[0].status, Status::Ok);
        assert_eq!(run.bytes_up(1), Some(17.0));
        assert_eq!(run.client_order, ["a", "b"]);
    }
}
