//! `hetfed export`: the global server model of a federated run (one of its kept checkpoints) as
//! a Hugging Face model directory that `hetfed eval`/`score` and `transformers` load.
//!
//! A run directory (written by `hetfed simulate` or `hetfed server`) keeps
//! `checkpoints/round-N/model.safetensors` (the global weights that differ from the base's, in
//! f32, canonical names; a factored run's factors) for its latest round only, named by
//! `checkpoints/LATEST`. The export lays them over the base, folds any factors into their layers
//! and writes every weight in f32. The config.json and tokenizer.json come from
//! the server's base model: `--model`, else the `server.model` path that the run's `run_start`
//! event in `metrics.jsonl` records (usable as is only when it is absolute, since the config's
//! directory that a relative path refers to is not recorded).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use serde_json::Value;

use hetfed_core::TensorMap;
use hetfed_model::{Checkpoint, WeightDtype};

#[derive(Args)]
pub struct ExportArgs {
    /// A run directory written by `hetfed simulate` or `hetfed server` (metrics.jsonl, checkpoints/)
    #[arg(value_name = "RUN_DIR")]
    pub run_dir: PathBuf,
    /// The round whose global model to export (default: the latest; a run keeps only its latest
    /// checkpoint)
    #[arg(long, value_name = "N")]
    pub round: Option<u64>,
    /// Output model directory: config.json, tokenizer.json, model.safetensors (f32)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// The server's base model directory, for its config.json and tokenizer.json (default: the
    /// server.model recorded in the run's metrics.jsonl, when it is an absolute path)
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Write into a non-empty --out, replacing the model files there
    #[arg(long)]
    pub force: bool,
}

/// Files of an HF model directory that a previous export into --out may have left and this one
/// would not replace when the base model has none (`save_as` copies those it has).
const STALE: &[&str] =
    &["model.safetensors.index.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"];

pub fn run(a: ExportArgs) -> Result<()> {
    let run_dir = &a.run_dir;
    if !run_dir.is_dir() {
        bail!("{}: expected a run directory of `hetfed simulate` or `hetfed server` (metrics.jsonl, checkpoints/), found no such directory", run_dir.display());
    }
    let (latest, kept) = kept_rounds(run_dir)?;
    let round = a.round.unwrap_or(latest);
    if !kept.contains(&round) {
        let list: Vec<String> = kept.iter().map(|r| r.to_string()).collect();
        bail!(
            "--round {round}: expected a round whose checkpoint {} keeps (a run keeps only its latest; kept: round {}), found no checkpoints/round-{round}",
            run_dir.display(),
            list.join(", ")
        );
    }
    let ck_dir = run_dir.join("checkpoints").join(format!("round-{round}"));
    let metrics_path = run_dir.join("metrics.jsonl");
    let events = read_events(&metrics_path);
    let (base_dir, from) = match &a.model {
        Some(m) => (m.clone(), "--model"),
        None => (recorded_model(&events, &metrics_path)?, "recorded in metrics.jsonl"),
    };
    if !base_dir.is_dir() {
        bail!(
            "{}: expected the server's base model directory ({from}), found no such directory; pass --model DIR",
            base_dir.display()
        );
    }
    let out = &a.out;
    if out.exists() && !out.is_dir() {
        bail!("--out {}: expected a directory, found a file", out.display());
    }
    if same_dir(out, &base_dir) || same_dir(out, run_dir) {
        bail!(
            "--out {}: expected a directory other than the run's and its base model's, found one of them",
            out.display()
        );
    }
    let entries = if out.is_dir() {
        std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))?.count()
    } else {
        0
    };
    if entries > 0 && !a.force {
        bail!("--out {}: expected an empty or new directory, found {entries} entries (pass --force to replace the model files there)", out.display());
    }

    let state_path = ck_dir.join("state.json");
    let state: Value = serde_json::from_slice(&hetfed_core::read_file(&state_path)?)
        .with_context(|| format!("{}: expected JSON", state_path.display()))?;
    if state["round"].as_u64() != Some(round) {
        bail!(
            "{}: expected `round` {round} (the checkpoint's directory), found {}",
            state_path.display(),
            state["round"]
        );
    }
    let run_id = state["run_id"].as_str().unwrap_or_default().to_string();
    let weights_path = ck_dir.join("model.safetensors");
    let (saved, _) = hetfed_core::load_safetensors(&weights_path)?;
    // A factored run's server held its base as stored (transfer.factored); others widened it.
    let factored = saved.keys().any(|k| hetfed_model::delta::is_factor(k));
    let dtype = if factored { WeightDtype::Stored } else { WeightDtype::F32 };
    let mut base = Checkpoint::load_with(&base_dir, dtype)?;
    base.tokenizer().context("the exported directory needs the base model's tokenizer")?;
    // The checkpoint holds what differs from the base (checkpoints before that: every tensor).
    check_overlay(&base, &saved, &weights_path)?;
    let mut weights = base.weights.clone();
    weights.extend(saved);
    let hash = hetfed_core::tensor_map_hash(&weights)?;
    // The round's metrics record the weights hash of the global model the checkpoint holds.
    let recorded_version = events
        .iter()
        .rev()
        .find(|e| e["event"] == "round" && e["round"].as_u64() == Some(round))
        .and_then(|e| e["model_version"].as_str());
    if let Some(v) = recorded_version {
        if v != hash {
            bail!(
                "{}: expected the weights hash {v} that {} records for round {round}, found {hash}",
                weights_path.display(),
                metrics_path.display()
            );
        }
    }
    // Dense f32 weights: a factored change folded into its layers, a half base widened.
    let weights: TensorMap = hetfed_model::delta::merge(&weights)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let hash = if factored { hetfed_core::tensor_map_hash(&weights)? } else { hash };
    check_weights(&base, &weights, &weights_path)?;

    if entries > 0 {
        for f in STALE {
            let p = out.join(f);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    // The weights are written in f32 (how the run holds them); a base config naming another
    // dtype would make `transformers` with torch_dtype="auto" narrow them.
    if let Some(obj) = base.spec.config_json.as_object_mut() {
        if obj.get("torch_dtype").is_some_and(|v| *v != "float32") {
            obj.insert("torch_dtype".into(), Value::from("float32"));
        }
    }
    base.save_as(&weights, out, DType::F32)?;

    // What was written loads as a model with the same weights.
    let back = Checkpoint::load(out).with_context(|| format!("loading the exported {}", out.display()))?;
    let back_hash = back.identity()?.weights_hash;
    if back_hash != hash {
        bail!("{}: expected the exported weights to hash to {hash}, found {back_hash}", out.display());
    }
    let n_params: usize = weights.values().map(|t| t.elem_count()).sum();
    let files: Vec<&str> = ["config.json", "model.safetensors", "tokenizer.json"]
        .into_iter()
        .chain(STALE.iter().copied())
        .filter(|f| out.join(f).is_file())
        .collect();
    println!(
        "exported round {round} of run {}{} to {}",
        run_dir.display(),
        if run_id.is_empty() { String::new() } else { format!(" ({run_id})") },
        out.display()
    );
    println!("weights  {hash} (f32, {} tensors, {n_params} parameters)", weights.len());
    println!("base     {} ({}, {from})", base_dir.display(), base.arch.model_type());
    println!("files    {}", files.join(", "));
    Ok(())
}

/// The round `checkpoints/LATEST` names, and every round with a complete checkpoint directory
/// up to it (the server removes older ones once the pointer has moved on).
fn kept_rounds(run_dir: &Path) -> Result<(u64, Vec<u64>)> {
    let root = run_dir.join("checkpoints");
    let latest_path = root.join("LATEST");
    let Ok(name) = std::fs::read_to_string(&latest_path) else {
        bail!("{}: expected a checkpoint pointer (written after each round), found none: the run has not completed a round", latest_path.display());
    };
    let name = name.trim();
    let Some(latest) = name.strip_prefix("round-").and_then(|n| n.parse::<u64>().ok()) else {
        bail!("{}: expected `round-N`, found {name:?}", latest_path.display());
    };
    let mut kept = Vec::new();
    for e in std::fs::read_dir(&root).with_context(|| format!("reading {}", root.display()))?.flatten() {
        let file_name = e.file_name();
        let Some(r) = file_name.to_str().and_then(|n| n.strip_prefix("round-")).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if r <= latest && e.path().join("model.safetensors").is_file() && e.path().join("state.json").is_file() {
            kept.push(r);
        }
    }
    kept.sort_unstable();
    if !kept.contains(&latest) {
        bail!(
            "{}: names {name}, found no complete checkpoint there (model.safetensors, state.json)",
            latest_path.display()
        );
    }
    Ok((latest, kept))
}

/// The events of metrics.jsonl (none when it is missing; unreadable lines are skipped).
fn read_events(path: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The server model the run's `run_start` event records, when it can be used as is.
fn recorded_model(events: &[Value], metrics_path: &Path) -> Result<PathBuf> {
    let Some(start) = events.iter().find(|e| e["event"] == "run_start") else {
        bail!("{}: expected a run_start event naming the server model, found none; pass --model DIR (the server's base model directory)", metrics_path.display());
    };
    let Some(model) = start["config"]["server"]["model"].as_str() else {
        bail!("{}: expected run_start to record config.server.model, found none; pass --model DIR (the server's base model directory)", metrics_path.display());
    };
    let p = PathBuf::from(model);
    if !p.is_absolute() {
        bail!(
            "{}: run_start records server.model {model:?}, relative to the run's config file, whose directory the run does not record; pass --model DIR (the server's base model directory)",
            metrics_path.display()
        );
    }
    Ok(p)
}

/// The checkpoint holds exactly the base architecture's parameters, with their shapes.
/// Every tensor a checkpoint saved is one of the base's with its shape (a factor: of a layer the
/// base has), before the base is completed with it.
fn check_overlay(base: &Checkpoint, saved: &TensorMap, path: &Path) -> Result<()> {
    let what = format!("the parameters of {} ({})", base.source(), base.arch.model_type());
    for (name, t) in saved {
        let layer = match name.rsplit_once('.') {
            Some((module, _)) if hetfed_model::delta::is_factor(name) => format!("{module}.weight"),
            _ => name.clone(),
        };
        match base.weights.get(&layer) {
            None => bail!(
                "{}: expected {what}, found the extra tensor `{name}`; is --model the run's server model?",
                path.display()
            ),
            Some(b) if layer == *name && b.dims() != t.dims() => bail!(
                "{}: expected {what}, found tensor `{name}` of shape {:?} instead of {:?}; is --model the run's server model?",
                path.display(),
                t.dims(),
                b.dims()
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_weights(base: &Checkpoint, weights: &TensorMap, path: &Path) -> Result<()> {
    let expected = base.arch.param_shapes();
    let what = format!("the parameters of {} ({})", base.source(), base.arch.model_type());
    for (name, shape) in &expected {
        match weights.get(name) {
            None => bail!(
                "{}: expected {what}, found no tensor `{name}`; is --model the run's server model?",
                path.display()
            ),
            Some(t) if t.dims() != shape.as_slice() => {
                bail!("{}: expected {what}, found tensor `{name}` of shape {:?} instead of {shape:?}; is --model the run's server model?", path.display(), t.dims())
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = weights.keys().find(|k| !expected.iter().any(|(n, _)| n == *k)) {
        bail!(
            "{}: expected {what}, found the extra tensor `{extra}`; is --model the run's server model?",
            path.display()
        );
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
