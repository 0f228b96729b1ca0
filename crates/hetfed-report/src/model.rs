//! What the report knows about a run, read tolerantly from `metrics.jsonl` events.
//!
//! Unknown events, unknown fields, and fields of the wrong type are ignored: a field that is not
//! what the schema says is treated as missing, never as an error. Numbers that are not finite
//! are missing too (serde_json writes NaN as `null`).

use serde_json::{Map, Value};
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

impl Status {
    fn parse(s: Option<&str>) -> Self {
        match s {
            None => Status::Unknown,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "ok" => Status::Ok,
                "failed" => Status::Failed,
                "rejected" => Status::Rejected,
                _ => Status::Other(s.to_string()),
            },
        }
    }

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

fn f(o: &Map<String, Value>, k: &str) -> Option<f64> {
    o.get(k).and_then(Value::as_f64).filter(|v| v.is_finite())
}

fn s(o: &Map<String, Value>, k: &str) -> Option<String> {
    match o.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A non-negative integer, also when written as an integral float (`3.0`).
fn u(o: &Map<String, Value>, k: &str) -> Option<u64> {
    let v = o.get(k)?;
    v.as_u64().or_else(|| {
        v.as_f64().filter(|x| x.is_finite() && *x >= 0.0 && x.fract() == 0.0 && *x < 9.0e15).map(|x| x as u64)
    })
}

fn metrics(o: &Map<String, Value>, k: &str) -> Metrics {
    match o.get(k) {
        Some(Value::Object(m)) => {
            m.iter().filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (k.clone(), x))).collect()
        }
        _ => Metrics::new(),
    }
}

impl Run {
    pub fn from_events(events: &[Value]) -> Run {
        let mut run = Run::default();
        let mut rows: BTreeMap<(u64, String), (usize, ClientRow)> = BTreeMap::new();
        let mut seen: Vec<String> = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let Some(o) = ev.as_object() else { continue };
            match o.get("event").and_then(Value::as_str) {
                Some("run_start") => {
                    run.starts += 1;
                    let clients: Vec<String> = match o.get("clients") {
                        Some(Value::Array(a)) => a.iter().filter_map(|c| c.as_str().map(str::to_string)).collect(),
                        _ => Vec::new(),
                    };
                    let this = RunStart {
                        run_id: s(o, "run_id"),
                        strategy: s(o, "strategy"),
                        rounds: u(o, "rounds"),
                        clients,
                        config: o.get("config").filter(|c| !c.is_null()).cloned(),
                        time_unix_ms: f(o, "time_unix_ms"),
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
                Some("client_round") => {
                    let (Some(round), Some(client)) = (u(o, "round"), s(o, "client")) else { continue };
                    if !seen.contains(&client) {
                        seen.push(client.clone());
                    }
                    let row = ClientRow {
                        round,
                        client: client.clone(),
                        status: Status::parse(o.get("status").and_then(Value::as_str)),
                        reason: s(o, "reason").filter(|r| !r.is_empty()),
                        examples: f(o, "examples"),
                        bytes_up: f(o, "bytes_up"),
                        bytes_down: f(o, "bytes_down"),
                        train_s: f(o, "train_s"),
                        upload_s: f(o, "upload_s"),
                        update_norm: f(o, "update_norm"),
                        train_loss: f(o, "train_loss"),
                        cpu_s: f(o, "cpu_s"),
                        peak_rss_bytes: f(o, "peak_rss_bytes"),
                        eval: metrics(o, "eval"),
                    };
                    // Keep the position of the first occurrence so the table order is stable.
                    let pos = rows.get(&(round, client.clone())).map_or(i, |(p, _)| *p);
                    rows.insert((round, client), (pos, row));
                }
                Some("round") => {
                    let Some(round) = u(o, "round") else { continue };
                    run.rounds.insert(
                        round,
                        RoundRec {
                            selected: f(o, "selected"),
                            ok: f(o, "ok"),
                            failed: f(o, "failed"),
                            rejected: f(o, "rejected"),
                            aggregate_s: f(o, "aggregate_s"),
                            server_eval_s: f(o, "server_eval_s"),
                            wall_s: f(o, "wall_s"),
                            bytes_up: f(o, "bytes_up"),
                            bytes_down: f(o, "bytes_down"),
                            server_cpu_s: f(o, "server_cpu_s"),
                            server_rss_bytes: f(o, "server_rss_bytes"),
                            server_eval: metrics(o, "server_eval"),
                            alphas: metrics(o, "alphas"),
                        },
                    );
                }
                Some("run_end") => {
                    run.end = Some(RunEnd {
                        rounds_completed: u(o, "rounds_completed"),
                        wall_s: f(o, "wall_s"),
                        time_unix_ms: f(o, "time_unix_ms"),
                    });
                }
                _ => {}
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
