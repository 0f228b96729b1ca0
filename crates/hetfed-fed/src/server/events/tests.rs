//! Each record against the `json!` that wrote it before it was typed: the lines must not change,
//! except that a field without a value is now omitted where it was written as `null` (readers
//! treat both as missing).

use std::collections::BTreeMap;

use hetfed_events::{Refused, RefusedSuppressed, Resume, Round, RunEnd, RunStart};
use serde_json::{json, Value};

use super::*;

fn line(e: &Event) -> String {
    without_nulls(serde_json::from_str(&e.to_line().unwrap()).unwrap())
}

/// The line's text with its top-level `null` fields removed.
fn without_nulls(v: Value) -> String {
    match v {
        Value::Object(o) => Value::Object(o.into_iter().filter(|(_, v)| !v.is_null()).collect()).to_string(),
        v => v.to_string(),
    }
}

fn old(v: Value) -> String {
    without_nulls(v)
}

#[test]
fn records_are_unchanged() {
    let (config, info, details) = (json!({"b": 1, "a": [1.5]}), json!({"k": "v"}), json!({"z": null}));
    let eval = BTreeMap::from([("t/acc".to_string(), 0.5), ("general/ppl".to_string(), f64::NAN)]);
    let alphas = BTreeMap::from([("c1".to_string(), 0.25)]);
    let e = Event::RunStart(RunStart {
        run_id: Some("r".into()),
        strategy: Some("fedavg".into()),
        rounds: Some(3),
        clients: Some(vec!["c1".into(), "c2".into()]),
        config: Some(config.clone()),
        strategy_info: Some(info.clone()),
        time_unix_ms: Some(7),
    });
    let expected = json!({"event": "run_start", "run_id": "r", "strategy": "fedavg", "rounds": 3u64,
        "clients": ["c1", "c2"], "config": config, "strategy_info": info, "time_unix_ms": 7u64});
    assert_eq!(line(&e), old(expected));
    let e = Event::Round(Box::new(Round {
        round: Some(0),
        server_eval: Some(eval.clone()),
        server_eval_s: Some(1.25),
        ..Default::default()
    }));
    let expected = json!({"event": "round", "round": 0, "server_eval": eval, "server_eval_s": 1.25});
    assert_eq!(line(&e), old(expected));
    let e = Event::Round(Box::new(Round {
        round: Some(2),
        selected: Some(3),
        ok: Some(1),
        rejected: Some(1),
        failed: Some(1),
        aggregated: Some(true),
        n_aggregated: Some(1),
        quorum: Some(1),
        alphas: Some(alphas.clone()),
        applied_norm: Some(f64::NAN),
        aggregation: Some(details.clone()),
        aggregate_s: Some(0.5),
        server_eval_s: Some(0.0),
        wall_s: Some(2.0),
        bytes_up: Some(10),
        bytes_down: Some(20),
        server_eval: Some(eval.clone()),
        server_cpu_s: Some(0.1),
        server_rss_bytes: Some(5),
        server_peak_rss_bytes: Some(6),
        model_version: Some("h".into()),
    }));
    let expected = json!({
        "event": "round", "round": 2u64, "selected": 3usize, "ok": 1usize, "rejected": 1usize,
        "failed": 1usize, "aggregated": true, "n_aggregated": 1usize, "quorum": 1usize,
        "alphas": alphas, "applied_norm": f64::NAN, "aggregation": details,
        "aggregate_s": 0.5, "server_eval_s": 0.0, "wall_s": 2.0,
        "bytes_up": 10u64, "bytes_down": 20u64, "server_eval": eval,
        "server_cpu_s": 0.1, "server_rss_bytes": 5u64, "server_peak_rss_bytes": 6u64,
        "model_version": "h",
    });
    assert_eq!(line(&e), old(expected));
    for peer in [None, Some("1.2.3.4:5")] {
        let e = Event::Refused(Refused {
            call: Some("upload".into()),
            client: Some("c1".into()),
            reason: Some("no".into()),
            peer: peer.map(str::to_string),
            upload_round: Some(3),
            server_round: Some(2),
            time_unix_ms: Some(9),
        });
        let expected = json!({"event": "refused", "call": "upload", "client": "c1", "reason": "no", "peer": peer,
            "upload_round": Some(3u64), "server_round": 2u64, "time_unix_ms": 9u64});
        assert_eq!(line(&e), old(expected));
    }
    let e = Event::RefusedSuppressed(RefusedSuppressed { count: Some(4), window_s: Some(60), time_unix_ms: Some(9) });
    let expected = json!({"event": "refused_suppressed", "count": 4u64, "window_s": 60, "time_unix_ms": 9u64});
    assert_eq!(line(&e), old(expected));
    let e = Event::Resume(Resume { round: Some(2), time_unix_ms: Some(9) });
    assert_eq!(line(&e), old(json!({"event": "resume", "round": 2u64, "time_unix_ms": 9u64})));
    let e = Event::RunEnd(RunEnd { rounds_completed: Some(3), wall_s: Some(1.5), time_unix_ms: Some(9) });
    let expected = json!({"event": "run_end", "rounds_completed": 3u64, "wall_s": 1.5, "time_unix_ms": 9u64});
    assert_eq!(line(&e), old(expected));
}

/// The `client_round` lines as they were built before: a base, then fields by outcome (the
/// metrics were a string map then, `eval:<task>/<metric>` keys included; the keys are unchanged,
/// and `peak_rss_bytes`, a count now, is written as an integer).
fn old_client_round(id: &str, outcome: Option<&Outcome>, failure: &str, weight: Option<f64>) -> String {
    let mut line = json!({"event": "client_round", "round": 2u64, "client": id, "bytes_down": 30u64});
    match outcome {
        Some(Outcome::Accepted { n_examples, metrics, bytes, norm, upload_s }) => {
            line["status"] = json!("ok");
            line["examples"] = json!(n_examples);
            line["bytes_up"] = json!(bytes);
            line["update_norm"] = json!(norm);
            line["upload_s"] = json!(upload_s);
            line["train_s"] = json!(metrics.train_s);
            line["train_loss"] = json!(metrics.train_loss);
            line["val_loss_before"] = json!(metrics.val_loss_before);
            line["val_loss_after"] = json!(metrics.val_loss_after);
            line["cpu_s"] = json!(metrics.cpu_s);
            line["peak_rss_bytes"] = json!(metrics.peak_rss_bytes);
            line["eval"] = json!(metrics.eval);
            if let Some(w) = weight {
                line["weight"] = json!(w);
            }
        }
        Some(Outcome::Rejected { reason, bytes }) => {
            line["status"] = json!("rejected");
            line["reason"] = json!(reason);
            line["bytes_up"] = json!(bytes);
        }
        _ => {
            line["status"] = json!("failed");
            line["reason"] = json!(failure);
        }
    }
    line.to_string()
}

#[test]
fn client_rounds_are_unchanged() {
    let metrics = hetfed_net::FitMetrics {
        train_s: Some(1.5),
        train_loss: Some(f64::NAN),
        val_gain: Some(0.5),
        train_steps: Some(3),
        peak_rss_bytes: Some(1 << 20),
        eval: BTreeMap::from([("t/acc".to_string(), 0.75)]),
        ..Default::default()
    };
    let accepted = Outcome::Accepted { n_examples: 8, metrics, bytes: 100, norm: 0.5, upload_s: 0.25 };
    let rejected = Outcome::Rejected { reason: "norm".into(), bytes: 50 };
    let report = AggregateReport { weights: BTreeMap::from([("c1".to_string(), 0.5)]), ..Default::default() };
    let cases = [
        (Some(&accepted), "", Some(&report), Some(0.5)),
        (Some(&accepted), "", None, None),
        (Some(&rejected), "", Some(&report), None),
        (Some(&Outcome::InProgress), "upload unfinished", None, None),
        (None, "no update", None, None),
        (None, "", None, None),
    ];
    for (outcome, failure, report, weight) in cases {
        let new = client_round(2, "c1", 30, outcome, Some(failure).filter(|f| !f.is_empty()), report);
        let bytes_up = match outcome {
            Some(Outcome::Accepted { bytes, .. } | Outcome::Rejected { bytes, .. }) => *bytes,
            _ => 0,
        };
        assert_eq!(new.bytes_up.unwrap_or(0), bytes_up);
        let written = line(&Event::ClientRound(new));
        assert_eq!(
            written,
            without_nulls(serde_json::from_str(&old_client_round("c1", outcome, failure, weight)).unwrap())
        );
    }
}
