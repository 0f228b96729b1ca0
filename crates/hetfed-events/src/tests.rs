use serde_json::json;

use super::*;

fn full_round() -> Round {
    Round {
        round: Some(2),
        selected: Some(3),
        ok: Some(1),
        rejected: Some(1),
        failed: Some(1),
        aggregated: Some(true),
        n_aggregated: Some(1),
        quorum: Some(1),
        alphas: Some(Metrics::from([("c1".into(), 0.25)])),
        applied_norm: Some(0.5),
        aggregation: Some(json!({"z": [1, 2]})),
        aggregate_s: Some(0.5),
        server_eval_s: Some(0.0),
        wall_s: Some(2.0),
        bytes_up: Some(10),
        bytes_down: Some(20),
        server_eval: Some(Metrics::from([("t/acc".into(), 0.5)])),
        server_cpu_s: Some(0.1),
        server_rss_bytes: Some(5),
        server_peak_rss_bytes: Some(6),
        model_version: Some("h".into()),
    }
}

#[test]
fn every_record_reads_back_as_written() {
    let events = [
        Event::RunStart(RunStart {
            run_id: Some("r".into()),
            strategy: Some("fedavg".into()),
            rounds: Some(3),
            clients: Some(vec!["c1".into(), "c2".into()]),
            config: Some(json!({"a": 1})),
            strategy_info: Some(json!({"k": "v"})),
            time_unix_ms: Some(7),
        }),
        Event::Round(Box::new(full_round())),
        Event::Round(Box::new(Round {
            round: Some(0),
            server_eval: Some(Metrics::new()),
            server_eval_s: Some(1.0),
            ..Default::default()
        })),
        Event::ClientRound(ClientRound {
            round: Some(1),
            client: Some("c1".into()),
            bytes_down: Some(0),
            status: Some(Status::Ok),
            examples: Some(8),
            bytes_up: Some(100),
            update_norm: Some(0.5),
            upload_s: Some(0.25),
            train_s: Some(1.5),
            peak_rss_bytes: Some(1 << 20),
            eval: Some(Metrics::from([("t/acc".into(), 0.75)])),
            weight: Some(0.5),
            ..Default::default()
        }),
        Event::ClientRound(ClientRound {
            round: Some(1),
            client: Some("c2".into()),
            status: Some(Status::Rejected),
            reason: Some("norm".into()),
            bytes_up: Some(50),
            ..Default::default()
        }),
        Event::Refused(Refused {
            call: Some("upload".into()),
            client: Some("c1".into()),
            reason: Some("no".into()),
            peer: Some("127.0.0.1:5".into()),
            upload_round: Some(3),
            server_round: Some(2),
            time_unix_ms: Some(9),
        }),
        Event::RefusedSuppressed(RefusedSuppressed { count: Some(4), window_s: Some(60), time_unix_ms: Some(9) }),
        Event::Resume(Resume { round: Some(2), time_unix_ms: Some(9) }),
        Event::RunEnd(RunEnd { rounds_completed: Some(3), wall_s: Some(1.5), time_unix_ms: Some(9) }),
    ];
    for e in events {
        let line = e.to_line().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(Event::parse(&v).as_ref(), Some(&e), "{line}");
    }
}

#[test]
fn lines_keep_their_layout() {
    let line = Event::Round(Box::new(Round {
        round: Some(0),
        server_eval: Some(Metrics::from([("general/ppl".into(), f64::NAN)])),
        server_eval_s: Some(1.25),
        ..Default::default()
    }))
    .to_line()
    .unwrap();
    // Keys sorted, missing fields omitted, a non-finite number written as null.
    assert_eq!(line, r#"{"event":"round","round":0,"server_eval":{"general/ppl":null},"server_eval_s":1.25}"#);
    let mut r = full_round();
    r.applied_norm = Some(f64::NAN);
    let v: Value = serde_json::from_str(&Event::Round(Box::new(r)).to_line().unwrap()).unwrap();
    assert_eq!(v["applied_norm"], Value::Null, "a full round always writes applied_norm");
    assert!(v.as_object().unwrap().contains_key("applied_norm"));
}

#[test]
fn fields_of_the_wrong_type_are_missing_and_unknown_lines_are_no_events() {
    let e = Event::parse(&json!({"event": "run_start", "run_id": 7, "rounds": "five", "clients": ["a", 3, "b"]}));
    let Some(Event::RunStart(s)) = e else { panic!("{e:?}") };
    assert_eq!(s.run_id.as_deref(), Some("7"));
    assert_eq!(s.rounds, None);
    assert_eq!(s.clients.unwrap(), ["a", "b"]);
    for not_an_event in [json!({"event": "mystery", "round": 1}), json!("text"), json!({"round": 1}), json!(null)] {
        assert_eq!(Event::parse(&not_an_event), None, "{not_an_event}");
    }
    let e = Event::parse(&json!({"event": "client_round", "round": -1, "client": "a", "status": "OK",
        "examples": "many", "eval": {"m": 1.0, "n": "x"}, "extra": true}));
    let Some(Event::ClientRound(c)) = e else { panic!("{e:?}") };
    assert_eq!(c.round, None);
    assert_eq!(c.status, Some(Status::Ok));
    assert_eq!(c.examples, None);
    assert_eq!(c.eval.unwrap(), Metrics::from([("m".into(), 1.0)]));
    let e = Event::parse(
        &json!({"event": "round", "round": 1.0, "bytes_up": null, "server_eval": [1, 2], "wall_s": "slow"}),
    );
    let Some(Event::Round(r)) = e else { panic!("{e:?}") };
    assert_eq!((r.round, r.bytes_up, r.server_eval.as_ref(), r.wall_s), (Some(1), None, None, None));
    let e = Event::parse(&json!({"event": "client_round", "round": 1, "client": "a", "status": "paused"}));
    let Some(Event::ClientRound(c)) = e else { panic!("{e:?}") };
    assert_eq!(c.status, Some(Status::Other("paused".into())));
}
