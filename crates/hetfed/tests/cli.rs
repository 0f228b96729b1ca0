//! End-to-end tests of the real `hetfed` binary: outputs against `transformers` goldens, the
//! fine-tune → task vector → apply round trip, and the one-line error contract.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hetfed"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hetfed-model/tests/fixtures")
}

fn own_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("hetfed runs")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "hetfed {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail with the one-line error contract; returns the line.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "hetfed {args:?}: expected exit code 2, stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "hetfed {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, found: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

/// A scratch directory under the system temp dir, removed with everything in it when dropped
/// (a failing test's directory goes too: the assertion message names what went wrong).
fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("hetfed-cli-{tag}-")).tempdir().unwrap()
}

/// The log-probs `hetfed score --json` gives `text` under `model`, with `taskvec` applied if given.
fn logprobs(model: &Path, taskvec: Option<&Path>, text: &str) -> Vec<f64> {
    let mut args = vec!["score", "--model", model.to_str().unwrap()];
    if let Some(tv) = taskvec {
        args.extend(["--taskvec", tv.to_str().unwrap()]);
    }
    args.extend(["--text", text, "--json"]);
    score_json(&args).1
}

fn score_json(args: &[&str]) -> (Vec<u32>, Vec<f64>) {
    let out = ok(args);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line: {out}");
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let tokens = v["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let lps = v["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    (tokens, lps)
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn check_score_golden(model: &Path, golden: &Path, extra: &[&str]) {
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let text = g["text"].as_str().unwrap();
    let mut args = vec!["score", "--model", model.to_str().unwrap(), "--text", text, "--json"];
    args.extend_from_slice(extra);
    let (tokens, lps) = score_json(&args);
    let want_tokens: Vec<u32> = g["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let want: Vec<f64> = g["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(tokens, want_tokens, "{}: token ids differ from the tokenizers library", golden.display());
    let d = max_diff(&lps, &want);
    assert!(d < 1e-4, "{}: log-probs differ from transformers by {d}", golden.display());
}

#[test]
fn every_command_has_help() {
    for cmd in [
        vec!["--help"],
        vec!["score", "--help"],
        vec!["generate", "--help"],
        vec!["finetune", "--help"],
        vec!["taskvec", "--help"],
        vec!["taskvec", "diff", "--help"],
        vec!["taskvec", "apply", "--help"],
        vec!["taskvec", "info", "--help"],
        vec!["taskvec", "combine", "--help"],
        vec!["taskvec", "from-peft", "--help"],
        vec!["metric", "--help"],
        vec!["eval", "--help"],
        vec!["tokenizer", "train", "--help"],
        vec!["pretrain", "--help"],
        vec!["data", "export", "--help"],
        vec!["data", "partition", "--help"],
        vec!["bench", "--help"],
        vec!["demo", "--help"],
        vec!["simulate", "--help"],
        vec!["server", "--help"],
        vec!["client", "--help"],
        vec!["certs", "--help"],
        vec!["report", "--help"],
        vec!["export", "--help"],
        vec!["project", "--help"],
        vec!["sweep", "--help"],
    ] {
        let out = ok(&cmd);
        assert!(out.contains("Usage:"), "{cmd:?}: {out}");
    }
}

#[test]
fn score_json_matches_transformers_on_random_checkpoints() {
    for name in ["bloom_h3", "bloom_h6_noprefix", "bloom_h8_f16", "llama_gqa", "llama_tied"] {
        let dir = fixtures().join(name);
        check_score_golden(&dir, &dir.join("score_golden.json"), &[]);
    }
}

#[test]
fn score_json_matches_transformers_on_tinystories() {
    let Some(dir) = hetfed_shared("models/tinystories-656k") else { return };
    let (golden, _) = read_golden(&fixtures().join("tinystories_golden.safetensors"));
    let (tokens, lps) = score_json(&[
        "score",
        "--model",
        dir.to_str().unwrap(),
        "--text",
        "Once upon a time, there was a little girl named Lily. She loved to play outside.",
        "--json",
    ]);
    assert_eq!(tokens, golden.0);
    let d = max_diff(&lps, &golden.1);
    assert!(d < 1e-4, "tinystories log-probs differ from transformers by {d}");
}

#[test]
fn peft_adapters_made_by_peft_score_as_in_peft() {
    for (base, adapter) in [("bloom_h3", "bloom_h3_peft"), ("llama_gqa", "llama_gqa_peft")] {
        let ad = own_fixtures().join(adapter);
        check_score_golden(&fixtures().join(base), &ad.join("score_golden.json"), &["--adapter", ad.to_str().unwrap()]);
    }
}

fn write_jsonl(path: &Path) {
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let target = if i % 3 == 0 { " yes" } else { " no" };
            serde_json::json!({"prompt": format!("question {i}: is it so?"), "target": target}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

#[test]
fn lora_finetune_writes_a_task_vector_that_equals_its_adapter() {
    let base = fixtures().join("bloom_h3");
    let base_s = base.to_str().unwrap();
    let scratch = tempdir("lora");
    let dir = scratch.path();
    let train = dir.join("train.jsonl");
    write_jsonl(&train);
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    ok(&[
        "finetune",
        "--model",
        base_s,
        "--train",
        train.to_str().unwrap(),
        "--eval",
        train.to_str().unwrap(),
        "--out",
        out_s,
        "--lora-rank",
        "4",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--batch-size",
        "4",
        "--seed",
        "3",
    ]);
    for f in [
        "taskvec.safetensors",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "state.safetensors",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    let tv = out.join("taskvec.safetensors");
    let info: serde_json::Value =
        serde_json::from_str(ok(&["taskvec", "info", tv.to_str().unwrap(), "--json"]).trim()).unwrap();
    assert_eq!(info["kind"], "lora");
    assert!(info["global_norm"].as_f64().unwrap() > 0.0);

    let text = "question 3: is it so? yes";
    let (_, with_adapter) = score_json(&[
        "score",
        "--model",
        base_s,
        "--adapter",
        out.join("adapter").to_str().unwrap(),
        "--text",
        text,
        "--json",
    ]);
    let (_, with_tv) =
        score_json(&["score", "--model", base_s, "--taskvec", tv.to_str().unwrap(), "--text", text, "--json"]);
    let (_, plain) = score_json(&["score", "--model", base_s, "--text", text, "--json"]);
    assert!(max_diff(&with_adapter, &with_tv) < 1e-4, "adapter and dense task vector disagree");
    assert!(max_diff(&with_adapter, &plain) > 1e-3, "fine-tuning changed nothing");

    // Applying the task vector to another base is refused, naming both.
    let other = fixtures().join("bloom_h6_noprefix");
    let line = fails(&[
        "taskvec",
        "apply",
        "--base",
        other.to_str().unwrap(),
        "--taskvec",
        tv.to_str().unwrap(),
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(line.contains("bloom") && line.matches("config").count() >= 2, "{line}");
}

#[test]
fn full_finetune_diff_and_apply_round_trip_and_resume() {
    let base = fixtures().join("llama_gqa");
    let base_s = base.to_str().unwrap();
    let scratch = tempdir("full");
    let dir = scratch.path();
    let train = dir.join("train.jsonl");
    write_jsonl(&train);
    let train_s = train.to_str().unwrap();
    let straight = dir.join("straight");
    let common = [
        "--model",
        base_s,
        "--train",
        train_s,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "0.003",
        "--seed",
        "5",
        "--checkpoint-every",
        "1",
    ];
    let mut args = vec!["finetune", "--out", straight.to_str().unwrap()];
    args.extend_from_slice(&common);
    ok(&args);
    let model_dir = straight.join("model");
    assert!(model_dir.join("config.json").exists() && model_dir.join("model.safetensors").exists());

    // diff(finetuned, base) then apply(base) gives back the fine-tuned model.
    let tv = dir.join("diff.safetensors");
    ok(&[
        "taskvec",
        "diff",
        "--base",
        base_s,
        "--finetuned",
        model_dir.to_str().unwrap(),
        "--out",
        tv.to_str().unwrap(),
    ]);
    let applied = dir.join("applied");
    ok(&["taskvec", "apply", "--base", base_s, "--taskvec", tv.to_str().unwrap(), "--out", applied.to_str().unwrap()]);
    let text = "question 7: is it so? no";
    let (_, a) = score_json(&["score", "--model", model_dir.to_str().unwrap(), "--text", text, "--json"]);
    let (_, b) = score_json(&["score", "--model", applied.to_str().unwrap(), "--text", text, "--json"]);
    assert!(max_diff(&a, &b) < 1e-5);

    // Interrupted after 3 steps, then resumed: the same weights as the straight run.
    let resumed = dir.join("resumed");
    let mut args = vec!["finetune", "--out", resumed.to_str().unwrap(), "--max-steps", "3"];
    args.extend_from_slice(&common);
    ok(&args);
    let mut args = vec!["finetune", "--out", resumed.to_str().unwrap(), "--resume"];
    args.extend_from_slice(&common);
    let o = run(&args);
    // --max-steps is part of the config, so resuming with a different one is refused clearly.
    assert_eq!(o.status.code(), Some(2));
    let mut args = vec!["finetune", "--out", resumed.to_str().unwrap(), "--resume", "--max-steps", "3"];
    args.extend_from_slice(&common);
    ok(&args);
}

#[test]
fn bad_input_is_one_clear_line_with_exit_code_2() {
    let scratch = tempdir("bad");
    let dir = scratch.path();
    let text = ["--text", "hello"];

    let line = fails(&["score", "--model", dir.join("nope").to_str().unwrap(), text[0], text[1]]);
    assert!(line.contains("nope") && line.contains("expected a model directory"), "{line}");

    // Unknown model_type.
    let unknown = dir.join("unknown");
    std::fs::create_dir_all(&unknown).unwrap();
    std::fs::write(unknown.join("config.json"), r#"{"model_type": "gpt9"}"#).unwrap();
    let line = fails(&["score", "--model", unknown.to_str().unwrap(), text[0], text[1]]);
    assert!(line.contains("unknown model_type \"gpt9\"") && line.contains("bloom"), "{line}");

    // A config that disagrees with the weights: shape mismatch naming tensor and shapes.
    let src = fixtures().join("bloom_h3");
    let bad_shape = dir.join("bad_shape");
    copy_dir(&src, &bad_shape);
    let cfg =
        std::fs::read_to_string(src.join("config.json")).unwrap().replace("\"vocab_size\": 300", "\"vocab_size\": 301");
    std::fs::write(bad_shape.join("config.json"), cfg).unwrap();
    let line = fails(&["score", "--model", bad_shape.to_str().unwrap(), text[0], text[1]]);
    assert!(line.contains("word_embeddings") && line.contains("301") && line.contains("300"), "{line}");

    // Truncated safetensors.
    let trunc = dir.join("trunc");
    copy_dir(&src, &trunc);
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let line = fails(&["score", "--model", trunc.to_str().unwrap(), text[0], text[1]]);
    assert!(line.contains("model.safetensors") && line.contains("not a valid safetensors file"), "{line}");

    // Malformed training data names the line.
    let jsonl = dir.join("bad.jsonl");
    std::fs::write(&jsonl, "{\"prompt\": \"a\", \"target\": \"b\"}\n{\"prompt\": 3}\n").unwrap();
    let line = fails(&[
        "finetune",
        "--model",
        src.to_str().unwrap(),
        "--train",
        jsonl.to_str().unwrap(),
        "--out",
        dir.join("o").to_str().unwrap(),
    ]);
    assert!(line.contains("line 2"), "{line}");

    // Not a task vector.
    let line = fails(&["taskvec", "info", src.join("model.safetensors").to_str().unwrap()]);
    assert!(line.contains("model.safetensors"), "{line}");
}

#[test]
fn generation_is_deterministic_under_a_seed() {
    let m = fixtures().join("llama_tied");
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "the fox",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "11",
        "--json",
    ];
    let a = ok(&args);
    assert_eq!(a, ok(&args));
    let v: serde_json::Value = serde_json::from_str(a.trim()).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 12);
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn hetfed_shared(rel: &str) -> Option<PathBuf> {
    hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), rel)
}

type Golden = (Vec<u32>, Vec<f64>);

fn read_golden(path: &Path) -> (Golden, ()) {
    let (map, _) = hetfed_core::load_safetensors(path).unwrap();
    let ids: Vec<u32> =
        map["input_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect();
    let lps: Vec<f64> =
        map["logprobs"].flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f64::from).collect();
    ((ids, lps), ())
}

#[test]
fn finetune_reads_the_committed_toml_recipe() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/finetune-lora.toml");
    let scratch = tempdir("toml");
    let dir = scratch.path();
    let train = dir.join("train.jsonl");
    write_jsonl(&train);
    let base = fixtures().join("llama_tied");
    let out = dir.join("run");
    let stdout = ok(&[
        "finetune",
        "--config",
        cfg.to_str().unwrap(),
        "--model",
        base.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    assert!(stdout.contains("task vector lora"), "{stdout}");
    assert!(out.join("adapter/adapter_config.json").exists());
    // A field of the wrong type is one clear error naming the file.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[train]\nlr = \"fast\"\n").unwrap();
    let line = fails(&[
        "finetune",
        "--config",
        bad.to_str().unwrap(),
        "--model",
        base.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(line.contains("bad.toml"), "{line}");
}

/// `hetfed metric` against sacrebleu / rouge-score / multilingual ROUGE on the metric crate's
/// fixtures (real FLORES, XL-Sum and SciTLDR text), through files as a user gives them.
#[test]
fn metric_command_matches_reference_scorers() {
    let fix = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hetfed-metrics/tests/fixtures");
    let scratch = tempdir("metric");
    let dir = scratch.path();
    let write = |name: &str, lines: &[String]| -> String {
        let p = dir.join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p.to_str().unwrap().to_string()
    };
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
    };
    let score = |args: Vec<String>| -> serde_json::Value {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(ok(&a).trim()).unwrap()
    };
    let mt: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fix.join("mt.json")).unwrap()).unwrap();
    let mut n_checked = 0;
    for set in mt["sets"].as_array().unwrap() {
        let hyps = strs(&set["hyps"]);
        if hyps.is_empty() || hyps.iter().any(|h| h.contains('\n')) {
            continue;
        }
        let mut args =
            vec!["metric".to_string(), "bleu".into(), "--json".into(), "--hyp".into(), write("hyp.txt", &hyps)];
        for (k, r) in set["refs"].as_array().unwrap().iter().enumerate() {
            args.push("--ref".into());
            args.push(write(&format!("ref{k}.txt"), &strs(r)));
        }
        let name = set["name"].as_str().unwrap();
        let bleu = score(args.clone())["score"].as_f64().unwrap();
        assert!((bleu - set["bleu"]["score"].as_f64().unwrap()).abs() <= 0.01, "{name}: BLEU {bleu}");
        args[1] = "chrf".into();
        let chrf = score(args.clone())["score"].as_f64().unwrap();
        assert!((chrf - set["chrf"].as_f64().unwrap()).abs() <= 0.01, "{name}: chrF {chrf}");
        args.extend(["--word-order".into(), "2".into()]);
        let chrfpp = score(args)["score"].as_f64().unwrap();
        assert!((chrfpp - set["chrf_pp"].as_f64().unwrap()).abs() <= 0.01, "{name}: chrF++ {chrfpp}");
        n_checked += 1;
    }
    let rouge: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fix.join("rouge.json")).unwrap()).unwrap();
    for set in rouge["sets"].as_array().unwrap() {
        let ex = set["examples"].as_array().unwrap();
        let one_ref = ex.iter().all(|e| e["refs"].as_array().unwrap().len() == 1);
        let texts: Vec<String> = ex
            .iter()
            .flat_map(|e| std::iter::once(e["hyp"].as_str().unwrap().to_string()).chain(strs(&e["refs"])))
            .collect();
        if !one_ref || ex.is_empty() || texts.iter().any(|t| t.contains('\n') || t.contains('\r')) {
            continue;
        }
        let hyps: Vec<String> = ex.iter().map(|e| e["hyp"].as_str().unwrap().to_string()).collect();
        let refs: Vec<String> = ex.iter().map(|e| e["refs"][0].as_str().unwrap().to_string()).collect();
        let name = set["name"].as_str().unwrap();
        let lang = set["lang"].as_str().unwrap().to_string();
        let base = vec![
            "metric".to_string(),
            "rouge".into(),
            "--json".into(),
            "--hyp".into(),
            write("hyp.txt", &hyps),
            "--ref".into(),
            write("ref.txt", &refs),
        ];
        let mut variants = vec![("multilingual", [base.clone(), vec!["--lang".into(), lang.clone()]].concat())];
        if lang == "english" {
            variants.push(("default", base.clone()));
            variants.push(("default_stem", [base.clone(), vec!["--stem".into()]].concat()));
        }
        for (key, args) in variants {
            let got = score(args);
            for m in ["rouge1", "rouge2", "rougeL"] {
                let (g, w) = (got[m].as_f64().unwrap(), set[key]["mean"][m].as_f64().unwrap());
                assert!((g - w).abs() <= 0.01, "{name} {key} {m}: {g} vs {w}");
            }
        }
        n_checked += 1;
    }
    assert!(n_checked >= 6, "too few fixture sets could be checked through files: {n_checked}");
    // Unequal line counts are an error, not a silent truncation.
    let line = fails(&[
        "metric",
        "bleu",
        "--hyp",
        &write("h.txt", &["a".into(), "b".into()]),
        "--ref",
        &write("r.txt", &["a".into()]),
    ]);
    assert!(line.contains("expected 2 lines"), "{line}");
}

/// `hetfed eval` runs every task kind on the shared data, on a random BLOOM fixture and on the
/// pretrained TinyStories model, and reports the task's metrics.
#[test]
fn eval_runs_every_task_on_shared_data() {
    let Some(data) = hetfed_shared("data") else { return };
    let data_s = data.to_str().unwrap();
    let mut models = vec![fixtures().join("bloom_h3")];
    if let Some(m) = hetfed_shared("models/tinystories-656k") {
        models.push(m);
    }
    let cases: [(&str, &[&str]); 10] = [
        ("ethos", &["accuracy", "macro_f1"]),
        ("copa", &["accuracy"]),
        ("flores:en-hi", &["bleu", "chrf", "chrf++"]),
        ("tico:en-ta", &["bleu", "chrf"]),
        ("xlsum:hi", &["rouge1", "rouge2", "rougeL"]),
        ("xlsum:en", &["rouge1", "rougeL"]),
        ("ilsum", &["rouge1"]),
        ("scitldr", &["rouge1", "rouge2", "rougeL"]),
        ("bbc", &["rougeL"]),
        ("mltext:hi", &["perplexity"]),
    ];
    for m in &models {
        for (task, metrics) in cases {
            let out = ok(&[
                "eval",
                "--model",
                m.to_str().unwrap(),
                "--task",
                task,
                "--limit",
                "3",
                "--max-new-tokens",
                "6",
                "--data-dir",
                data_s,
                "--json",
            ]);
            let v: serde_json::Value =
                serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{task}: {e}: {out}"));
            assert_eq!(v["n_examples"], 3, "{task}: {out}");
            for k in metrics {
                let x = v["metrics"][k].as_f64().unwrap_or_else(|| panic!("{task}: no metric {k}: {out}"));
                assert!(x.is_finite() && x >= 0.0, "{task}: {k} = {x}");
            }
        }
    }
    // Beam search output is scored the same way.
    let out = ok(&[
        "eval",
        "--model",
        models[0].to_str().unwrap(),
        "--task",
        "flores:en-fr",
        "--limit",
        "2",
        "--num-beams",
        "3",
        "--max-new-tokens",
        "5",
        "--data-dir",
        data_s,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["metrics"]["chrf"].as_f64().is_some(), "{out}");
    // Predictions are written with --out, one JSON line per example.
    let scratch = tempdir("eval");
    let dir = scratch.path();
    ok(&[
        "eval",
        "--model",
        models[0].to_str().unwrap(),
        "--task",
        "copa",
        "--limit",
        "5",
        "--data-dir",
        data_s,
        "--out",
        dir.to_str().unwrap(),
    ]);
    let preds = std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 5);
    // A split the data does not have is one clear error naming the dataset and the split.
    let line = fails(&[
        "eval",
        "--model",
        models[0].to_str().unwrap(),
        "--task",
        "ethos",
        "--split",
        "test",
        "--data-dir",
        data_s,
    ]);
    assert!(line.contains("ethos") && line.contains("test"), "{line}");
    let line = fails(&[
        "eval",
        "--model",
        models[0].to_str().unwrap(),
        "--task",
        "ethos",
        "--data-dir",
        dir.join("nowhere").to_str().unwrap(),
    ]);
    assert!(line.contains("ethos") && line.contains("nowhere"), "{line}");
}

#[test]
fn data_export_feeds_finetune_and_partition_covers_every_example() {
    let Some(data) = hetfed_shared("data") else { return };
    let data_s = data.to_str().unwrap();
    let scratch = tempdir("data");
    let dir = scratch.path();
    let jsonl = dir.join("copa.jsonl");
    ok(&["data", "export", "--task", "copa", "--data-dir", data_s, "--out", jsonl.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&jsonl).unwrap().lines().count(), 640);
    // The exported file is what finetune reads.
    let base = fixtures().join("bloom_h3");
    ok(&[
        "finetune",
        "--model",
        base.to_str().unwrap(),
        "--train",
        jsonl.to_str().unwrap(),
        "--out",
        dir.join("ft").to_str().unwrap(),
        "--lora-rank",
        "2",
        "--max-steps",
        "2",
    ]);

    let parts = dir.join("parts");
    let partition = [
        "data",
        "partition",
        "--task",
        "ethos",
        "--data-dir",
        data_s,
        "--clients",
        "5",
        "--scheme",
        "dirichlet",
        "--alpha",
        "0.3",
        "--seed",
        "9",
        "--model",
        base.to_str().unwrap(),
    ];
    let out = ok(&[&partition[..], &["--out", parts.to_str().unwrap()]].concat());
    let stats: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(stats.len(), 5);
    let total: u64 = stats.iter().map(|s| s["n_examples"].as_u64().unwrap()).sum();
    assert_eq!(total, 645, "every Ethos train example goes to exactly one client");
    assert!(stats.iter().all(|s| s["n_tokens"].as_u64().unwrap() > 0));
    let lines: usize =
        (0..5).map(|i| std::fs::read_to_string(parts.join(format!("client_{i}.jsonl"))).unwrap().lines().count()).sum();
    assert_eq!(lines, 645);
    // Same seed, same split.
    assert_eq!(out, ok(&partition));
    let line = fails(&[
        "data",
        "partition",
        "--task",
        "flores:en-hi",
        "--split",
        "dev",
        "--data-dir",
        data_s,
        "--clients",
        "2",
        "--scheme",
        "dirichlet",
    ]);
    assert!(line.contains("labels"), "{line}");
}

/// The pretraining pipeline end to end at toy scale: tokenizer training, a BLOOM model from
/// scratch on mltext + task training text, held-out perplexity per language, an HF directory
/// that hetfed loads again, and an interrupted run resumed to the same weights.
#[test]
fn tokenizer_and_pretraining_pipeline_runs_end_to_end() {
    let Some(data) = hetfed_shared("data") else { return };
    let scratch = tempdir("pretrain");
    let dir = scratch.path();
    let tok = dir.join("tokenizer.json");
    let en = data.join("mltext/ud_english_ewt/en.txt");
    let hi = data.join("mltext/post2012_wikipedia/hi.txt");
    let out = ok(&[
        "tokenizer",
        "train",
        "--input",
        en.to_str().unwrap(),
        hi.to_str().unwrap(),
        "--vocab-size",
        "400",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert!(out.contains("tokens/char"), "{out}");
    let recipe = |max_steps: usize| -> String {
        format!(
            "tokenizer = \"tokenizer.json\"\nseq_len = 32\nlanguages = [\"en\", \"hi\"]\ntasks = [\"ethos\"]\nmax_lines_per_language = 200\nheld_out_lines = 20\neval_every = 2\ncheckpoint_every = 1\n\n[model]\nhidden_size = 32\nn_layer = 2\nn_head = 2\n\n[train]\nlr = 0.003\nbatch_size = 4\nwarmup_steps = 1\nmax_steps = {max_steps}\nseed = 1\n"
        )
    };
    let cfg = dir.join("recipe.toml");
    std::fs::write(&cfg, recipe(4)).unwrap();
    let data_s = data.to_str().unwrap();
    // The tokenizer can also be trained on exactly the recipe's training text (train splits only).
    let tok2 = dir.join("from-recipe/tokenizer.json");
    let out = ok(&[
        "tokenizer",
        "train",
        "--recipe",
        cfg.to_str().unwrap(),
        "--data-dir",
        data_s,
        "--vocab-size",
        "400",
        "--out",
        tok2.to_str().unwrap(),
    ]);
    assert!(tok2.exists() && out.contains("mltext_hi.txt") && out.contains("ethos"), "{out}");
    let run1 = dir.join("run1");
    let out =
        ok(&["pretrain", "--config", cfg.to_str().unwrap(), "--out", run1.to_str().unwrap(), "--data-dir", data_s]);
    let summary: serde_json::Value = serde_json::from_str(out.trim().lines().last().unwrap()).unwrap();
    assert_eq!(summary["steps"], 4);
    for lang in ["en", "hi"] {
        let p = summary["held_out_ppl"][lang].as_f64().unwrap();
        assert!(p.is_finite() && p > 1.0 && p < 1000.0, "{lang}: {p}");
        let u = summary["unigram_ppl"][lang].as_f64().unwrap();
        assert!(u.is_finite() && u > 1.0, "{lang}: unigram {u}");
    }
    let model = run1.join("model");
    let (tokens, lps) = score_json(&["score", "--model", model.to_str().unwrap(), "--text", "the cat", "--json"]);
    assert_eq!(tokens[0], 1, "BOS comes first");
    assert_eq!(lps.len(), tokens.len() - 1);
    let metrics = std::fs::read_to_string(run1.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);
    assert!(metrics.lines().nth(1).unwrap().contains("held_out_ppl"));

    // Resuming a finished run continues from its saved state (step 4 of 4) and re-exports the
    // same weights; exact resumption mid-run is tested in hetfed-train. Without a state, --resume
    // is a clear error instead of a silent restart.
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    ok(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        run1.to_str().unwrap(),
        "--data-dir",
        data_s,
        "--resume",
    ]);
    assert_eq!(std::fs::read(model.join("model.safetensors")).unwrap(), before);
    let line = fails(&[
        "pretrain",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        dir.join("fresh").to_str().unwrap(),
        "--data-dir",
        data_s,
        "--resume",
    ]);
    assert!(line.contains("state.safetensors"), "{line}");
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

#[test]
fn project_moves_a_small_models_task_vector_into_the_large_model() {
    let (small, large) = (models().join("base-small"), models().join("base-large"));
    let scratch = tempdir("project");
    let dir = scratch.path();
    let train = dir.join("train.jsonl");
    write_jsonl(&train);
    let run = dir.join("ft");
    ok(&[
        "finetune",
        "--model",
        small.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--lora-rank",
        "4",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--batch-size",
        "8",
        "--seed",
        "1",
    ]);
    let tv = run.join("taskvec.safetensors");
    let out = dir.join("projected.safetensors");
    let cache = dir.join("maps");
    let args = |method: &str| -> Vec<String> {
        [
            "project",
            "--small",
            small.to_str().unwrap(),
            "--large",
            large.to_str().unwrap(),
            "--taskvec",
            tv.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--method",
            method,
            "--calibration-sequences",
            "16",
            "--calibration-len",
            "16",
            "--cache-dir",
            cache.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let a: Vec<String> = args("procrustes");
    let first = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(first.contains("fitted") && first.contains("explained variance"), "{first}");
    let second = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(second.contains("from the cache"), "{second}");
    let info: serde_json::Value =
        serde_json::from_str(ok(&["taskvec", "info", out.to_str().unwrap(), "--json"]).trim()).unwrap();
    assert_eq!(info["kind"], "lora");
    // The projected vector belongs to the large model: it applies there and changes its scores.
    let text = "question 3: is it so? yes";
    let plain = logprobs(&large, None, text);
    let moved = logprobs(&large, Some(&out), text);
    assert!(max_diff(&plain, &moved) > 1e-5, "the projected update changed nothing");
    // ...and not to the small one.
    let line =
        fails(&["score", "--model", small.to_str().unwrap(), "--taskvec", out.to_str().unwrap(), "--text", text]);
    assert!(line.contains("config"), "{line}");
    // --reverse brings the projected vector back into the small model (personalisation).
    let back = dir.join("back.safetensors");
    let mut r: Vec<String> = args("procrustes");
    r[6] = out.to_str().unwrap().to_string();
    r[8] = back.to_str().unwrap().to_string();
    r.push("--reverse".into());
    ok(&r.iter().map(String::as_str).collect::<Vec<_>>());
    let small_plain = logprobs(&small, None, text);
    let small_back = logprobs(&small, Some(&back), text);
    assert!(max_diff(&small_plain, &small_back) > 1e-5, "the reverse projection changed nothing");
    // A task vector of another base is refused with a clear error.
    let line = fails(&[
        "project",
        "--small",
        large.to_str().unwrap(),
        "--large",
        large.to_str().unwrap(),
        "--taskvec",
        tv.to_str().unwrap(),
        "--out",
        dir.join("x").to_str().unwrap(),
        "--calibration-sequences",
        "8",
        "--calibration-len",
        "8",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    assert!(line.contains("expected an update of the small model"), "{line}");
}

#[test]
fn a_missing_file_is_named_once_with_its_cause_once() {
    let line = fails(&["simulate", "--config", "no-such-run.toml"]);
    assert!(line.contains("no-such-run.toml"), "{line}");
    assert_eq!(line.matches("os error").count(), 1, "{line}");
    let line = fails(&["sweep", "--config", "no-such-sweep.toml"]);
    assert_eq!(line.matches("os error").count(), 1, "{line}");
}

/// A one-round FedAvg simulation of base-small (one client with a few Ethos examples, two LoRA
/// steps, server evaluation on the first 12 dev examples) in `dir/run`.
fn tiny_run(dir: &Path, data: &Path) -> PathBuf {
    let cfg = format!(
        r#"
[run]
rounds = 1
seed = 7

[server]
model = "{}"
min_clients = 1
quorum = 1

[server.eval]
tasks = ["ethos"]
max_examples = 12

[strategy]
name = "fedavg"

[client]
epochs = 1
max_steps = 2
batch_size = 4
lr = 1e-2
max_len = 64
lora_rank = 4

[data]
task = "ethos"
num_clients = 1
max_examples_per_client = 12
val_fraction = 0.25
"#,
        models().join("base-small").canonicalize().unwrap().display()
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    let run = dir.join("run");
    ok(&[
        "simulate",
        "--config",
        path.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    run
}

/// The dtype of every tensor in a safetensors file, from its header.
fn safetensors_dtypes(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(_, v)| v["dtype"].as_str().unwrap().to_string())
        .collect()
}

fn events(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `hetfed export` writes the run's final global model as an HF directory: the checkpoint's
/// tensors value for value (f32, canonical names), the base's config and tokenizer; `hetfed eval`
/// on it reproduces the server's own final evaluation and `hetfed score` matches the checkpoint's
/// weights exactly. Rounds that are not kept, a non-empty --out and an unrecorded base are clear
/// one-line errors.
#[test]
fn export_writes_the_runs_global_model_as_an_hf_directory() {
    let Some(data) = hetfed_shared("data") else { return };
    let data_s = data.to_str().unwrap();
    let scratch = tempdir("export");
    let dir = scratch.path();
    let run = tiny_run(dir, &data);
    let run_s = run.to_str().unwrap();
    let out = dir.join("exported");
    let out_s = out.to_str().unwrap();
    let stdout = ok(&["export", run_s, "--out", out_s]);

    let ev = events(&run);
    let round1 = ev.iter().find(|e| e["event"] == "round" && e["round"] == 1).unwrap();
    let version = round1["model_version"].as_str().unwrap();
    assert!(stdout.contains("round 1") && stdout.contains(version) && stdout.contains(out_s), "{stdout}");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // The run's global model (the checkpoint's tensors laid over the base), value for value,
    // under canonical HF names, in f32.
    let ck = run.join("checkpoints/round-1/model.safetensors");
    let (saved, _) = hetfed_core::load_safetensors(&ck).unwrap();
    let mut want = hetfed_model::Checkpoint::load(&models().join("base-small")).unwrap().weights;
    assert!(saved.keys().all(|k| want.contains_key(k)) && saved.len() < want.len(), "{:?}", saved.keys());
    want.extend(saved);
    let (got, meta) = hetfed_core::load_safetensors(&out.join("model.safetensors")).unwrap();
    assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
    assert!(got.contains_key("transformer.word_embeddings.weight") && !got.contains_key("lm_head.weight"));
    for (name, t) in &want {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = got[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(), "{name} differs");
    }
    assert!(safetensors_dtypes(&out.join("model.safetensors")).iter().all(|d| d == "F32"));
    let base = models().join("base-small");
    let cfg = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(&out), cfg(&base));

    // `hetfed eval` on the export reproduces the server's final evaluation (same examples and options).
    let eval = ok(&[
        "eval",
        "--model",
        out_s,
        "--task",
        "ethos",
        "--limit",
        "12",
        "--batch-size",
        "16",
        "--max-len",
        "128",
        "--data-dir",
        data_s,
        "--json",
    ]);
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    let metrics = eval["metrics"].as_object().unwrap();
    assert!(metrics.contains_key("accuracy") && metrics.contains_key("target_nll"), "{eval}");
    for (m, v) in metrics {
        assert_eq!(
            v.as_f64(),
            round1["server_eval"][format!("ethos/{m}")].as_f64(),
            "{m}: {eval} vs {}",
            round1["server_eval"]
        );
    }
    // `hetfed score` on the export equals scoring the checkpoint's weights, and the run changed the model.
    let manual = dir.join("manual");
    std::fs::create_dir_all(&manual).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(base.join(f), manual.join(f)).unwrap();
    }
    let no_meta = std::collections::BTreeMap::new();
    hetfed_core::save_safetensors(&want, candle_core::DType::F32, &no_meta, &manual.join("model.safetensors")).unwrap();
    let text = "This is a perfectly friendly comment about the weather.";
    let (t1, exported) = score_json(&["score", "--model", out_s, "--text", text, "--json"]);
    let (t2, checkpoint) = score_json(&["score", "--model", manual.to_str().unwrap(), "--text", text, "--json"]);
    let (_, plain) = score_json(&["score", "--model", base.to_str().unwrap(), "--text", text, "--json"]);
    assert_eq!(t1, t2);
    assert_eq!(exported, checkpoint, "the export scores differently from the checkpoint's weights");
    assert!(max_diff(&exported, &plain) > 0.0, "the run left the base model unchanged: the test shows nothing");

    // A non-empty --out is refused unless --force.
    let line = fails(&["export", run_s, "--out", out_s]);
    assert!(line.contains(out_s) && line.contains("--force"), "{line}");
    ok(&["export", run_s, "--out", out_s, "--force", "--round", "1"]);
    // Only the latest round is kept: another round is one line naming the kept one.
    let line = fails(&["export", run_s, "--round", "2", "--out", dir.join("r2").to_str().unwrap()]);
    assert!(line.contains("--round 2") && line.contains("kept: round 1"), "{line}");
    let line = fails(&["export", run_s, "--round", "0", "--out", dir.join("r0").to_str().unwrap()]);
    assert!(line.contains("--round 0") && line.contains("kept: round 1"), "{line}");
    // Another model's directory as --model is refused, naming a tensor.
    let large = models().join("base-large");
    let line =
        fails(&["export", run_s, "--model", large.to_str().unwrap(), "--out", dir.join("wrong").to_str().unwrap()]);
    assert!(line.contains("--model") && line.contains("shape"), "{line}");

    // A run whose config named its server model relatively (as configs/*.toml do) needs --model.
    let rel = dir.join("run-relative");
    std::fs::create_dir_all(rel.join("checkpoints")).unwrap();
    copy_dir(&run.join("checkpoints/round-1"), &rel.join("checkpoints/round-1"));
    std::fs::copy(run.join("checkpoints/LATEST"), rel.join("checkpoints/LATEST")).unwrap();
    let abs = models().join("base-small").canonicalize().unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .replace(&format!("\"model\":{}", serde_json::json!(abs)), "\"model\":\"../models/base-small\"");
    assert!(metrics.contains("../models/base-small"));
    std::fs::write(rel.join("metrics.jsonl"), metrics).unwrap();
    let line = fails(&["export", rel.to_str().unwrap(), "--out", dir.join("rel").to_str().unwrap()]);
    assert!(line.contains("../models/base-small") && line.contains("--model"), "{line}");
    let stdout = ok(&[
        "export",
        rel.to_str().unwrap(),
        "--model",
        base.to_str().unwrap(),
        "--out",
        dir.join("rel").to_str().unwrap(),
    ]);
    assert!(stdout.contains(version), "{stdout}");
    assert_eq!(
        std::fs::read(dir.join("rel/model.safetensors")).unwrap(),
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
}

#[test]
fn export_of_a_missing_or_unfinished_run_is_one_clear_line() {
    let scratch = tempdir("export-missing");
    let dir = scratch.path();
    let nope = dir.join("no-such-run");
    let line = fails(&["export", nope.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(line.contains("no-such-run") && line.contains("expected a run directory"), "{line}");
    // A run directory without a completed round has no checkpoint to export.
    let line = fails(&["export", dir.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(line.contains("LATEST") && line.contains("has not completed a round"), "{line}");
}

/// Runs a command that must be refused by clap (rc 2, usage on stderr); returns stderr.
fn refused_by_clap(args: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(2), "hetfed {args:?}: expected exit code 2, stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn generation_flags_out_of_range_are_one_line_naming_flag_value_and_range() {
    let m = models().join("base-small");
    let m = m.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--prompt", "hi"];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let line = gen(&["--num-beams", "0"]);
    assert!(line.contains("--num-beams") && line.contains("1..=64") && line.contains("found 0"), "{line}");
    let line = gen(&["--num-beams", "100000", "--max-new-tokens", "5"]);
    assert!(line.contains("--num-beams") && line.contains("1..=64") && line.contains("100000"), "{line}");
    let line = gen(&["--temperature", "NaN"]);
    assert!(line.contains("--temperature") && line.contains("NaN") && line.contains(">= 0"), "{line}");
    let line = gen(&["--temperature=-1"]);
    assert!(line.contains("--temperature") && line.contains("-1"), "{line}");
    let line = gen(&["--top-k", "0", "--temperature", "0.7"]);
    assert!(line.contains("--top-k") && line.contains("found 0"), "{line}");
    // Past the vocabulary (8192 tokens) once the model is known.
    let line = gen(&["--top-k", "9000", "--temperature", "0.7"]);
    assert!(line.contains("--top-k") && line.contains("1..=8192") && line.contains("9000"), "{line}");
    let line = gen(&["--top-p", "NaN", "--temperature", "0.7"]);
    assert!(line.contains("--top-p") && line.contains("NaN"), "{line}");
    // base-small's context is 2048 tokens: at most 2047 new ones after a one-token prompt.
    let line = gen(&["--max-new-tokens", "100000"]);
    assert!(line.contains("--max-new-tokens") && line.contains("1..=2047") && line.contains("100000"), "{line}");
    let line = gen(&["--max-new-tokens", "0"]);
    assert!(line.contains("--max-new-tokens") && line.contains("found 0"), "{line}");
    let line = gen(&["--lambda", "inf", "--taskvec", "x.safetensors"]);
    assert!(line.contains("--lambda") && line.contains("inf"), "{line}");
    let line = fails(&["--threads", "0", "generate", "--model", m, "--prompt", "hi"]);
    assert!(line.contains("--threads") && line.contains("1..=1024") && line.contains("found 0"), "{line}");
    // eval checks its flags before reading any data.
    for (flag, value) in [
        ("--num-beams", "0"),
        ("--batch-size", "0"),
        ("--max-new-tokens", "100000"),
        ("--limit", "0"),
        ("--max-len", "100000"),
    ] {
        let line =
            fails(&["eval", "--model", m, "--task", "ethos", "--data-dir", "/nonexistent-hetfed-data", flag, value]);
        assert!(line.contains(flag) && line.contains(value), "{line}");
    }
}

#[test]
fn finetune_refuses_a_lora_rank_beyond_the_models_layers() {
    let m = models().join("base-small");
    let scratch = tempdir("rank");
    let dir = scratch.path();
    let train = dir.join("train.jsonl");
    write_jsonl(&train);
    let out = dir.join("o");
    let base = [
        "finetune",
        "--model",
        m.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        fails(&args)
    };
    // base-small is 128 wide: no adapted layer admits a rank above 128.
    let line = with(&["--lora-rank", "1000"]);
    assert!(line.contains("--lora-rank") && line.contains("1..=128") && line.contains("1000"), "{line}");
    let line = with(&["--lora-rank", "0"]);
    assert!(line.contains("--lora-rank") && line.contains("found 0"), "{line}");
    let line = with(&["--lora-rank", "4", "--lora-targets", "no_such_layer"]);
    assert!(line.contains("--lora-targets") && line.contains("no_such_layer"), "{line}");
    let line = with(&["--lora-rank", "4", "--lora-dropout", "1.5"]);
    assert!(line.contains("--lora-dropout") && line.contains("1.5"), "{line}");
    let line = with(&["--max-len", "0"]);
    assert!(line.contains("--max-len") && line.contains("found 0"), "{line}");
    let line = with(&["--max-len", "5000"]);
    assert!(line.contains("--max-len") && line.contains("2..=2048") && line.contains("5000"), "{line}");
    let line = with(&["--lr", "NaN"]);
    assert!(line.contains("--lr") && line.contains("NaN"), "{line}");
    let line = with(&["--max-grad-norm=-1"]);
    assert!(line.contains("--max-grad-norm") && line.contains("-1"), "{line}");
    let line = with(&["--batch-size", "0"]);
    assert!(line.contains("--batch-size") && line.contains("found 0"), "{line}");
    let line = with(&["--checkpoint-every", "0"]);
    assert!(line.contains("--checkpoint-every") && line.contains("found 0"), "{line}");
    // A value from --config is named by its key in the file.
    let cfg = dir.join("ft.toml");
    std::fs::write(&cfg, "[train]\nmax_len = 0\n").unwrap();
    let line = with(&["--config", cfg.to_str().unwrap()]);
    assert!(line.contains("train.max_len") && line.contains("ft.toml") && line.contains("found 0"), "{line}");
    assert!(!out.exists(), "nothing is written before the limits are checked");
}

#[test]
fn text_file_scores_and_generates_as_the_same_text_inline() {
    let m = fixtures().join("bloom_h3");
    let m = m.to_str().unwrap();
    let scratch = tempdir("text-file");
    let dir = scratch.path();
    let text = "question 3: is it so? yes";
    let file = dir.join("text.txt");
    // A file holding one line: its final newline is not part of the text.
    std::fs::write(&file, format!("{text}\n")).unwrap();
    let inline = score_json(&["score", "--model", m, "--text", text, "--json"]);
    let from_file = score_json(&["score", "--model", m, "--text-file", file.to_str().unwrap(), "--json"]);
    assert_eq!(inline.0, from_file.0, "the same tokens");
    assert_eq!(inline.1, from_file.1, "the same log-probs");
    assert!(!inline.0.is_empty());
    let g = |src: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--max-new-tokens", "6", "--json"];
        args.extend_from_slice(src);
        ok(&args)
    };
    assert_eq!(g(&["--prompt", text]), g(&["--text-file", file.to_str().unwrap()]));
    // Exclusive with --text / --prompt (clap's own usage error, exit code 2).
    let err = refused_by_clap(&["score", "--model", m, "--text", text, "--text-file", file.to_str().unwrap()]);
    assert!(err.contains("--text-file") && err.contains("cannot be used with"), "{err}");
    let err = refused_by_clap(&["generate", "--model", m, "--prompt", text, "--text-file", file.to_str().unwrap()]);
    assert!(err.contains("--text-file") && err.contains("cannot be used with"), "{err}");
    let err = refused_by_clap(&["score", "--model", m]);
    assert!(err.contains("--text"), "{err}");
    // A missing file and an oversized one are one line naming the flag.
    let line = fails(&["score", "--model", m, "--text-file", dir.join("none.txt").to_str().unwrap()]);
    assert!(line.contains("--text-file") && line.contains("none.txt"), "{line}");
    let big = dir.join("big.txt");
    std::fs::write(&big, "a".repeat((1 << 20) + 1)).unwrap();
    let line = fails(&["score", "--model", m, "--text-file", big.to_str().unwrap()]);
    assert!(line.contains("--text-file") && line.contains("1048577"), "{line}");
}

#[test]
fn input_beyond_the_models_context_is_truncated_and_said_on_stderr() {
    // llama_tied has max_position_embeddings = 128.
    let m = fixtures().join("llama_tied");
    let m = m.to_str().unwrap();
    let scratch = tempdir("long");
    let dir = scratch.path();
    let file = dir.join("long.txt");
    std::fs::write(&file, "the quick brown fox jumps over the lazy dog. ".repeat(200)).unwrap();
    let o = run(&["score", "--model", m, "--text-file", file.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 128, "scored the context's first 128 tokens");
    assert_eq!(v["logprobs"].as_array().unwrap().len(), 127);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("note:") && err.contains("128"), "{err}");
    // The scored tokens are the text's first ones (up to where a shorter prefix's last tokens
    // could merge differently with what follows).
    let short =
        score_json(&["score", "--model", m, "--text", "the quick brown fox jumps over the lazy dog.", "--json"]);
    let all: Vec<u32> = v["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let k = short.0.len() - 2;
    assert!(k >= 4, "{:?}", short.0);
    assert_eq!(&all[..k], &short.0[..k]);
    // generate keeps the prompt's end so prompt and new tokens fit the context.
    let o = run(&["generate", "--model", m, "--text-file", file.to_str().unwrap(), "--max-new-tokens", "8", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_tokens"].as_array().unwrap().len(), 120);
    assert!(String::from_utf8_lossy(&o.stderr).contains("note:"));
}

#[test]
fn run_configs_out_of_range_are_refused_before_any_model_or_data_loads() {
    let scratch = tempdir("cfg-limits");
    let dir = scratch.path();
    let model = models().join("base-small").canonicalize().unwrap();
    let write = |name: &str, client: &str, server: &str| {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!(
                "[server]\nmodel = {:?}\n{server}\n[client]\n{client}\n[data]\ntask = \"ethos\"\nnum_clients = 1\n",
                model.display().to_string()
            ),
        )
        .unwrap();
        p
    };
    let no_data = dir.join("no-data");
    for (client, server, want) in [
        ("lora_rank = 100000", "", "client.lora_rank"),
        // Within the static range, beyond base-small's 128-wide layers.
        ("lora_rank = 1000", "", "1..=128"),
        ("max_len = 0", "", "client.max_len"),
        ("max_len = 4096", "", "2..=2048"),
        ("", "max_update_mib = 0", "server.max_update_mib"),
    ] {
        let p = write("run.toml", client, server);
        let line = fails(&[
            "simulate",
            "--config",
            p.to_str().unwrap(),
            "--data-dir",
            no_data.to_str().unwrap(),
            "--out",
            dir.join("out").to_str().unwrap(),
        ]);
        assert!(line.contains(want) && line.contains("run.toml"), "{client} {server}: {line}");
    }
    assert!(!dir.join("out").exists(), "nothing ran");
}

/// Files from outside are parsed behind a boundary: a truncated tokenizer.json (on which the
/// `tokenizers` crate panics) is one line naming the file, and a file given as `--model` says so.
#[test]
fn a_truncated_tokenizer_is_one_line_naming_it_not_a_panic() {
    let scratch = tempdir("trunc-tok");
    let dir = scratch.path();
    let model = dir.join("m");
    copy_dir(&models().join("base-small"), &model);
    let tok = std::fs::read(model.join("tokenizer.json")).unwrap();
    std::fs::write(model.join("tokenizer.json"), &tok[..1000]).unwrap();
    let line = fails(&["score", "--model", model.to_str().unwrap(), "--text", "hi"]);
    assert!(line.contains("tokenizer.json") && line.contains("expected a Hugging Face tokenizer"), "{line}");
    let cfg = models().join("base-small/config.json");
    let line = fails(&["score", "--model", cfg.to_str().unwrap(), "--text", "hi"]);
    assert!(line.contains("expected a model directory") && line.contains("found a file"), "{line}");
}

/// A copy of the bloom_h3 fixture whose `transformer.h.0.input_layernorm.weight` is changed by
/// `f` (a task vector of it against the fixture then holds that change).
fn changed_fixture(dir: &Path, name: &str, f: impl Fn(&mut [f32])) -> PathBuf {
    let out = dir.join(name);
    copy_dir(&fixtures().join("bloom_h3"), &out);
    let path = out.join("model.safetensors");
    let (mut map, meta) = hetfed_core::load_safetensors(&path).unwrap();
    let key = map.keys().find(|k| k.ends_with("h.0.input_layernorm.weight")).unwrap().clone();
    let t = &map[&key];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    f(&mut v);
    let changed = candle_core::Tensor::from_vec(v, t.dims(), &candle_core::Device::Cpu).unwrap();
    map.insert(key, changed);
    hetfed_core::save_safetensors(&map, candle_core::DType::F32, &meta, &path).unwrap();
    out
}

/// `taskvec apply` and `--taskvec` run the server's validation of an update: a task vector
/// holding NaN is refused (exit code 2, one line) and no model is written. And identical
/// commands write identical task vector bytes.
#[test]
fn taskvec_apply_refuses_a_nan_task_vector_as_the_server_does() {
    let scratch = tempdir("nan-tv");
    let dir = scratch.path();
    let base = fixtures().join("bloom_h3");
    let base_s = base.to_str().unwrap();
    let nan_model = changed_fixture(dir, "nan", |v| v[1] = f32::NAN);
    let tv = dir.join("nan.safetensors");
    ok(&[
        "taskvec",
        "diff",
        "--base",
        base_s,
        "--finetuned",
        nan_model.to_str().unwrap(),
        "--out",
        tv.to_str().unwrap(),
    ]);
    let out = dir.join("applied");
    let line = fails(&[
        "taskvec",
        "apply",
        "--base",
        base_s,
        "--taskvec",
        tv.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        line.contains("nan.safetensors")
            && line.contains("input_layernorm.weight")
            && line.contains("expected finite values, found NaN"),
        "{line}"
    );
    assert!(!out.exists(), "no model is written");
    let line = fails(&["score", "--model", base_s, "--taskvec", tv.to_str().unwrap(), "--text", "hi"]);
    assert!(line.contains("expected finite values"), "{line}");

    // A finite change applies; two identical diffs are byte-identical files.
    let good_model = changed_fixture(dir, "good", |v| v[1] += 0.25);
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    for p in [&a, &b] {
        ok(&[
            "taskvec",
            "diff",
            "--base",
            base_s,
            "--finetuned",
            good_model.to_str().unwrap(),
            "--out",
            p.to_str().unwrap(),
        ]);
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "identical runs, different bytes");
    ok(&["taskvec", "apply", "--base", base_s, "--taskvec", a.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(out.join("model.safetensors").exists());
}

fn logged_steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("step")?.as_u64())
        .collect()
}

/// A run killed after logging steps past its last checkpoint logs those steps again when
/// resumed; `--resume` drops the stale rows first, so every step has exactly one row.
#[test]
fn finetune_resume_leaves_one_row_per_step() {
    let base = fixtures().join("bloom_h3");
    let scratch = tempdir("resume-rows");
    let dir = scratch.path();
    let train = dir.join("train.jsonl");
    write_jsonl(&train);
    let run = dir.join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "finetune",
            "--model",
            base.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--lora-rank",
            "2",
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            "--lr",
            "0.01",
            "--seed",
            "2",
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    fn refs(a: &[String]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }
    ok(&refs(&args(&[])));
    assert_eq!(logged_steps(&run), [1, 2, 3, 4]);
    // The crash: the last checkpoint is step 2 (the state says so), steps 3 and 4 were logged,
    // and the last write was torn.
    let state = run.join("state.safetensors");
    let (map, mut meta) = hetfed_core::load_safetensors(&state).unwrap();
    meta.insert("step".into(), "2".into());
    meta.insert("opt_t".into(), "2".into());
    hetfed_core::save_safetensors(&map, candle_core::DType::F32, &meta, &state).unwrap();
    let mut log = std::fs::OpenOptions::new().append(true).open(run.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut log, b"{\"step\":5,\"lo").unwrap();
    drop(log);
    ok(&refs(&args(&["--resume"])));
    assert_eq!(logged_steps(&run), [1, 2, 3, 4], "one row per step after --resume");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "no torn line is left: {text}");
}

#[test]
fn bench_on_a_model_directory_reports_rates_and_peak_memory() {
    let small = models().join("base-small");
    let dir = small.to_str().unwrap();
    let args = ["bench", "--model", dir, "--steps", "1", "--batch", "2", "--seq", "16", "--python", "none", "--json"];
    let v: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
    for k in ["train_tokens_per_s", "infer_tokens_per_s", "peak_rss_bytes"] {
        let x = v["hetfed"][k].as_f64().unwrap_or(0.0);
        assert!(x > 0.0, "{k}: {v}");
    }
    assert_eq!(v["shape"]["seq"], 16);
    assert!(v.get("pytorch").is_none(), "no baseline under --python none: {v}");
    let e = fails(&["bench", "--model", dir, "--seq", "1"]);
    assert!(e.contains("--seq") && e.contains('1'), "{e}");
    let e = fails(&["bench", "--model", "no/such/dir", "--python", "none"]);
    assert!(e.contains("no/such/dir"), "{e}");
}

#[test]
fn dtype_flag_keeps_half_weights_resident_and_a_bad_value_is_one_clear_error() {
    // base-small is stored in f16: `stored` keeps its matrices half precision, `f32` widens them;
    // both score the same (the same values, summed in the same order for a model this small).
    let m = models().join("base-small");
    let m = m.to_str().unwrap();
    let text = "The quick brown fox jumps over the lazy dog.";
    let score = |dtype: &str| score_json(&["score", "--model", m, "--text", text, "--json", "--dtype", dtype]);
    let (t1, stored) = score("stored");
    let (t2, wide) = score("f32");
    assert_eq!(t1, t2);
    for (a, b) in stored.iter().zip(&wide) {
        assert!((a - b).abs() < 1e-4, "stored {a} vs f32 {b}");
    }
    // The default is `stored`.
    let (_, default) = score_json(&["score", "--model", m, "--text", text, "--json"]);
    assert_eq!(default, stored);
    // bf16 rounds the weights: close, not equal.
    let (_, bf) = score("bf16");
    assert!(bf.iter().zip(&wide).all(|(a, b)| (a - b).abs() < 0.5), "{bf:?} vs {wide:?}");
    ok(&["generate", "--model", m, "--prompt", "hi", "--max-new-tokens", "2", "--dtype", "f16"]);
    // A bad value: refused before anything loads, naming the flag, the value and the choices.
    let cmds: [&[&str]; 3] = [
        &["score", "--model", m, "--text", "hi", "--dtype", "f64"],
        &["generate", "--model", m, "--prompt", "hi", "--dtype", "f64"],
        &["eval", "--model", m, "--task", "ethos", "--dtype", "f64"],
    ];
    for cmd in cmds {
        let err = refused_by_clap(cmd);
        assert_eq!(err.matches("error:").count(), 1, "{err}");
        assert!(err.contains("--dtype") && err.contains("f64") && err.contains("stored, f32, bf16, f16"), "{err}");
    }
    let help = ok(&["score", "--help"]);
    assert!(help.contains("--dtype") && help.contains("stored"), "{help}");
}

/// `hetfed eval --offset-base B --offset-adapter A` evaluates the logit-offset model
/// `log_softmax(log p_M + λ·(log p_{B+A} − log p_B))`. With M = B the offsets cancel the base
/// exactly at λ = 1: the result is the tuned model itself, which `--adapter` evaluates directly.
/// With `--out`, each example's per-token target log-probabilities are the terms of `target_nll`.
#[test]
fn eval_of_a_logit_offset_model_is_the_tuned_model_when_the_bases_agree() {
    let Some(data) = hetfed_shared("data") else { return };
    let data_s = data.to_str().unwrap();
    let base = fixtures().join("bloom_h3");
    let adapter = own_fixtures().join("bloom_h3_peft");
    let (base_s, adapter_s) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    let scratch = tempdir("offset-eval");
    let eval = |extra: &[&str], out: &str| -> (f64, Vec<Vec<f64>>) {
        let dir = scratch.path().join(out);
        let mut args =
            vec!["eval", "--model", base_s, "--task", "flores:en-hi", "--limit", "3", "--max-new-tokens", "4"];
        args.extend(["--data-dir", data_s, "--json", "--out", dir.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(ok(&args).trim()).unwrap();
        let preds = std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap();
        let lps: Vec<Vec<f64>> = preds
            .lines()
            .map(|l| {
                let p: serde_json::Value = serde_json::from_str(l).unwrap();
                // Each term's token, decoded alone: as many as terms, the target's leading space first.
                let tokens = p["target_tokens"].as_array().unwrap();
                assert_eq!(tokens.len(), p["target_logprobs"].as_array().unwrap().len(), "{p}");
                assert!(tokens[0].as_str().unwrap().starts_with(' '), "{p}");
                p["target_logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
            })
            .collect();
        (v["metrics"]["target_nll"].as_f64().unwrap(), lps)
    };
    let (plain, plain_lp) = eval(&[], "plain");
    let (tuned, tuned_lp) = eval(&["--adapter", adapter_s], "tuned");
    let (offset, offset_lp) = eval(&["--offset-base", base_s, "--offset-adapter", adapter_s], "offset");
    let (half, _) = eval(&["--offset-base", base_s, "--offset-adapter", adapter_s, "--offset-lambda", "0.5"], "half");
    assert_eq!(plain_lp.len(), 3);
    // The per-token terms average to the reported NLL.
    let n: usize = plain_lp.iter().map(Vec::len).sum();
    let mean = -plain_lp.iter().flatten().sum::<f64>() / n as f64;
    assert!((mean - plain).abs() < 1e-5, "per-token mean {mean}, target_nll {plain}");
    assert!((tuned - plain).abs() > 1e-4, "the adapter changes the model: {plain} vs {tuned}");
    assert!((offset - tuned).abs() < 1e-4, "offset model {offset}, tuned model {tuned}");
    assert!(max_diff(&offset_lp.concat(), &tuned_lp.concat()) < 1e-3, "per-token log-probs differ");
    assert!((half - plain).abs() > 1e-5 && (half - tuned).abs() > 1e-5, "λ = 0.5 lies between: {half}");
    // Bad input: λ out of range, a base of another tokenizer, an adapter without its base.
    let offset_fails = |offset_base: &str, extra: &[&str]| {
        let mut args = vec!["eval", "--model", base_s, "--task", "flores:en-hi", "--data-dir", data_s];
        args.extend(["--offset-base", offset_base, "--offset-adapter", adapter_s]);
        args.extend_from_slice(extra);
        fails(&args)
    };
    let line = offset_fails(base_s, &["--offset-lambda", "0"]);
    assert!(line.contains("--offset-lambda") && line.contains("(0, 100]"), "{line}");
    // The same base with two vocabulary entries' ids swapped: another tokenizer identity.
    let other = scratch.path().join("other-tokenizer");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(base.join(f), other.join(f)).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let mut by_id: Vec<(String, u64)> = vocab.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    by_id.sort_by_key(|(_, id)| std::cmp::Reverse(*id));
    let ((a, ia), (b, ib)) = (by_id[0].clone(), by_id[1].clone());
    vocab.insert(a, ib.into());
    vocab.insert(b, ia.into());
    std::fs::write(other.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    let line = offset_fails(other.to_str().unwrap(), &[]);
    assert!(line.contains("one tokenizer"), "{line}");
    let o = run(&["eval", "--model", base_s, "--task", "flores:en-hi", "--offset-adapter", adapter_s]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--offset-base"));
}
