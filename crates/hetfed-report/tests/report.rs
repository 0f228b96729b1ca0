use hetfed_report::{read_events, render_html, render_report, ReportError};
use serde_json::{json, Value};
use std::fs;

const EVIL: &str = r#"OOM <script>alert("pwned")</script> & more"#;

/// A realistic 3-round, 3-client run: in round 2 client c2 fails (with a hostile reason) and
/// in round 3 client c1 is rejected.
fn realistic() -> Vec<Value> {
    let mut ev = vec![json!({
        "event": "run_start", "run_id": "fedavg-ethos-2024", "strategy": "fedavg", "rounds": 3,
        "clients": ["c0", "c1", "c2"],
        "config": {"model": "smollm-135m", "lr": 0.0002, "local_steps": 20, "tasks": ["ethos", "mltext"]},
        "time_unix_ms": 1_714_564_800_000u64
    })];
    ev.push(json!({"event": "round", "round": 0, "server_eval": {"ethos/accuracy": 50.0, "ethos/macro_f1": 40.5, "mltext/ppl": 120.4}, "server_eval_s": 4.0}));
    let mut up_total = 0u64;
    for round in 1..=3u64 {
        let mut ok = 0;
        let (mut failed, mut rejected) = (0, 0);
        let mut up = 0u64;
        for (k, c) in ["c0", "c1", "c2"].iter().enumerate() {
            let bytes_up = 100_000 + 1_000 * round + k as u64;
            let status = match (round, *c) {
                (2, "c2") => "failed",
                (3, "c1") => "rejected",
                _ => "ok",
            };
            let mut row = json!({
                "event": "client_round", "round": round, "client": c, "status": status,
                "examples": 120 + k, "bytes_up": bytes_up, "bytes_down": 7_000_000,
                "train_s": 12.0 + k as f64, "upload_s": 0.2, "update_norm": 0.5 + 0.01 * k as f64,
                "train_loss": 2.0 - 0.1 * round as f64,
                "eval": {"ethos/accuracy": 55.0 + round as f64 + k as f64, "ethos/macro_f1": 50.0 + round as f64},
                "cpu_s": 20.0 + k as f64, "peak_rss_bytes": 300_000_000u64 + k as u64
            });
            match status {
                "failed" => {
                    row["reason"] = json!(EVIL);
                    row["bytes_up"] = json!(0);
                    row.as_object_mut().unwrap().remove("eval");
                    row.as_object_mut().unwrap().remove("update_norm");
                    failed += 1;
                }
                "rejected" => {
                    row["reason"] = json!("update norm 9.1 exceeds clip bound 5.0");
                    row["update_norm"] = json!(9.1);
                    rejected += 1;
                }
                _ => ok += 1,
            }
            up += row["bytes_up"].as_u64().unwrap();
            ev.push(row);
        }
        up_total += up;
        ev.push(json!({
            "event": "round", "round": round, "selected": 3, "ok": ok, "failed": failed, "rejected": rejected,
            "aggregate_s": 0.4, "server_eval_s": 5.1, "wall_s": 40.0 + round as f64,
            "bytes_up": up, "bytes_down": 21_000_000,
            "server_eval": {"ethos/accuracy": 60.0 + round as f64, "ethos/macro_f1": 55.0 + round as f64, "mltext/ppl": 90.0 - round as f64},
            "alphas": {"c0": 0.4, "c1": 0.35, "c2": 0.25},
            "server_cpu_s": 3.0, "server_rss_bytes": 500_000_000u64
        }));
    }
    assert_eq!(up_total, 303_003 + 204_001 + 309_003);
    ev.push(json!({"event": "run_end", "rounds_completed": 3, "wall_s": 130.5, "time_unix_ms": 1_714_564_930_500u64}));
    ev
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn assert_self_contained(html: &str) {
    assert!(!html.contains("http://"), "external http reference");
    assert!(!html.contains("https://"), "external https reference");
    assert!(!html.to_ascii_lowercase().contains("<script"), "script element");
    assert!(!html.contains("<link"), "linked resource");
    assert!(!html.contains("@import") && !html.contains("url("), "CSS fetch");
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
}

#[test]
fn realistic_run_renders_every_chart_and_table() {
    let ev = realistic();
    let html = render_html(&ev);
    assert_self_contained(&html);

    // Charts: 3 server metrics, bytes, time, 2 client metrics, loss, norm, alpha, CPU, memory.
    let svgs = html.matches("<svg").count();
    assert_eq!(svgs, 12, "one <svg> per chart");
    assert_eq!(html.matches("</svg>").count(), svgs);
    for title in [
        "Bytes per round",
        "Time per phase per round",
        "client eval: ethos/accuracy",
        "client eval: ethos/macro_f1",
        "training loss",
        "update norm",
        "CPU time per round",
        "Peak memory per round",
    ] {
        assert!(html.contains(&format!("<title>{title}</title>")), "chart titled {title}");
    }
    for metric in ["ethos/accuracy", "ethos/macro_f1", "mltext/ppl"] {
        assert!(html.contains(&format!("<title>{metric}</title>")), "server chart for {metric}");
        assert!(html.contains(&format!("<code>{metric}</code>")), "summary row for {metric}");
    }

    // Header.
    assert!(html.contains("fedavg-ethos-2024"));
    assert!(html.contains("<code>fedavg</code>"));
    assert!(html.contains("3 completed of 3 planned"));
    assert!(html.contains("2024-05-01 12:00:00 UTC"));
    assert!(html.contains("&quot;local_steps&quot;: 20"), "pretty, escaped config");

    // Untrusted reason: escaped, never raw.
    assert!(!html.contains("<script>alert"));
    assert!(html.contains("OOM &lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; more"));
    assert!(html.contains("update norm 9.1 exceeds clip bound 5.0"));

    // Failures and rejections are highlighted.
    assert!(html.contains("Failures and rejections (2)"));
    assert!(html.contains("<tr class=\"failed\"><td>2</td><td class=\"l\"><code>c2</code>"));
    assert!(html.contains("<tr class=\"rejected\"><td>3</td><td class=\"l\"><code>c1</code>"));
    assert!(html.contains("7 ok</span>") && html.contains("1 failed</span>") && html.contains("1 rejected</span>"));

    // Numbers match the input.
    let up: u64 = ev.iter().filter(|e| e["event"] == "round").filter_map(|e| e["bytes_up"].as_u64()).sum();
    assert_eq!(up, 816_007);
    assert!(html.contains(&format!("({} B)", group(up))), "exact total bytes up");
    assert!(html.contains("797 KiB"), "human total bytes up");
    assert!(html.contains("(63,000,000 B)") && html.contains("60.1 MiB"), "total bytes down");
    assert!(html.contains("2 min 11 s") && html.contains("(130.5 s)"), "total wall time");
    // Summary: initial (round 0) vs final (round 3).
    assert!(html.contains("<td>50 <small>(round 0)</small></td><td>63 <small>(round 3)</small></td><td>+13</td>"));
    assert!(html
        .contains("<td>120.4 <small>(round 0)</small></td><td>87 <small>(round 3)</small></td><td>\u{2212}33.4</td>"));
    // Per-client columns.
    assert!(html.contains("<th><code>ethos/accuracy</code></th>"));
    assert!(html.contains("<span class=\"b rejected\">rejected</span>"));
}

#[test]
fn hostile_client_ids_and_metric_names_are_escaped() {
    let ev = vec![
        json!({"event": "run_start", "run_id": "<img src=x onerror=alert(1)>", "clients": ["<b>c0</b>"], "config": {"x": "</pre><script>"}}),
        json!({"event": "client_round", "round": 1, "client": "<b>c0</b>", "status": "<i>weird</i>", "eval": {"<svg onload=x>": 1.0}, "train_s": 1.0}),
        json!({"event": "round", "round": 1, "server_eval": {"a\"b'<c>": 2.0}, "alphas": {"<u>": 1.0}}),
    ];
    let html = render_html(&ev);
    assert_self_contained(&html);
    for raw in ["<img", "<b>c0", "<i>weird", "<svg onload", "</pre><script", "a\"b'<c>", "<u>"] {
        assert!(!html.contains(raw), "raw {raw:?} in output");
    }
    assert!(html.contains("&lt;b&gt;c0&lt;/b&gt;"));
    assert!(html.contains("&lt;i&gt;weird&lt;/i&gt;"));
}

#[test]
fn empty_run_says_no_rounds_completed() {
    let html = render_html(&[]);
    assert_self_contained(&html);
    assert!(html.contains("No rounds completed") || html.contains("no rounds completed"));
    assert!(!html.contains("<svg"));

    // A run that started and evaluated the initial model but never finished a round.
    let ev = vec![
        json!({"event": "run_start", "run_id": "r", "strategy": "fedavg", "rounds": 5, "clients": ["a"]}),
        json!({"event": "round", "round": 0, "server_eval": {"acc": 0.5}}),
    ];
    let html = render_html(&ev);
    assert_self_contained(&html);
    assert!(html.contains("No rounds completed."));
    assert!(html.contains("0 completed of 5 planned"));
    assert!(html.contains("incomplete"));
    assert_eq!(html.matches("<svg").count(), 1, "the initial evaluation is still charted");
}

#[test]
fn single_round_nan_and_missing_values() {
    let ev = vec![
        json!({"event": "client_round", "round": 1, "client": "a", "status": "ok", "train_s": null, "eval": {"m": null, "n": 3.0}}),
        json!({"event": "client_round", "round": 1, "client": "b", "status": "failed"}),
        json!({"event": "round", "round": 1, "server_eval": {"m": 0.25, "n": null}, "bytes_up": 10, "wall_s": 2.0}),
        json!({"event": "something_new", "data": [1, 2, 3]}),
    ];
    let html = render_html(&ev);
    assert_self_contained(&html);
    assert!(!html.contains("NaN"));
    // Server m, bytes, time (wall only), client n.
    assert_eq!(html.matches("<svg").count(), 4);
    assert!(html.contains("(10 B)"));
    assert!(html.contains("Failures and rejections (1)"));
}

#[test]
fn read_events_reports_malformed_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    fs::write(&p, "{\"event\":\"run_start\"}\n\n{\"event\": round}\n{\"event\":\"run_end\"}\n").unwrap();
    let err = read_events(&p).unwrap_err();
    match &err {
        ReportError::Parse { line, path, .. } => {
            assert_eq!(*line, 3);
            assert_eq!(path, &p);
        }
        other => panic!("wrong error {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("metrics.jsonl") && msg.contains("line 3"), "{msg}");
}

#[test]
fn read_events_skips_a_truncated_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    let full = "{\"event\":\"run_start\",\"run_id\":\"x\"}\n{\"event\":\"round\",\"round\":1}\n";
    for cut in ["{\"event\":\"client_round\",\"rou", "{\"event\":\"client_round\",\"round\":1.", "{\"ev", "{"] {
        fs::write(&p, format!("{full}{cut}")).unwrap();
        let ev = read_events(&p).unwrap();
        assert_eq!(ev.len(), 2, "cut {cut:?}");
    }
    // A cut that ended with its newline (writer died between the data and the next line).
    fs::write(&p, format!("{full}{{\"event\":\"client_round\",\"round\":\n")).unwrap();
    assert_eq!(read_events(&p).unwrap().len(), 2);
    // A complete file, and an empty one.
    fs::write(&p, full).unwrap();
    assert_eq!(read_events(&p).unwrap().len(), 2);
    fs::write(&p, "").unwrap();
    assert!(read_events(&p).unwrap().is_empty());
    // Garbage on a terminated last line is still an error.
    fs::write(&p, format!("{full}not json\n")).unwrap();
    assert!(matches!(read_events(&p), Err(ReportError::Parse { line: 3, .. })));
}

#[test]
fn render_report_writes_report_html() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = realistic().iter().map(|e| e.to_string()).collect();
    fs::write(dir.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    let out = render_report(dir.path()).unwrap();
    assert_eq!(out, dir.path().join("report.html"));
    let html = fs::read_to_string(&out).unwrap();
    assert_eq!(html, render_html(&realistic()));
    // Rendering again replaces it; no temporary file is left behind.
    render_report(dir.path()).unwrap();
    let mut names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["metrics.jsonl", "report.html"]);
}

#[test]
fn render_report_without_log_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = render_report(dir.path()).unwrap_err();
    assert!(matches!(err, ReportError::Io { .. }));
    assert!(err.to_string().contains("metrics.jsonl"));
}
