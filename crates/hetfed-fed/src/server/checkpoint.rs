//! Checkpoints: after each round the global model, the strategy's state and the round number are
//! written under `checkpoints/round-N`, then the `LATEST` pointer flips atomically. A server
//! started with `resume` continues from the latest one.
//!
//! The global model is written as what differs from the server's base: every tensor that is not
//! the base's own (changed weights, factors of a factored change). A run that updates every
//! weight writes the whole model; a factored one (`transfer.factored`) writes megabytes. Resuming
//! lays the saved tensors over the base, loaded as the server loads it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::DType;
use hetfed_core::{Error, Result, TensorMap};
use serde_json::{json, Value};

use super::{lock, unix_ms, Server, ServerOptions};
use crate::strategy::Strategy;

/// The file naming the latest complete checkpoint.
const LATEST: &str = "LATEST";

/// Where a server starts: its global weights, the last round completed and the run's id.
pub(super) struct Start {
    pub global: TensorMap,
    pub round: u64,
    pub run_id: String,
}

/// Prepares the run directory and finds where the run starts: from `base` at round 0 with a new
/// run id, or, when `opts.resume` is set and a checkpoint exists, from that checkpoint (its weights,
/// round, run id and strategy state, loaded into `strategy`), with the metrics of later rounds
/// dropped. Refuses to start a new run over an existing one.
pub(super) fn start(opts: &ServerOptions, base: &TensorMap, strategy: &mut dyn Strategy) -> Result<Start> {
    std::fs::create_dir_all(&opts.run_dir).map_err(|e| Error::io(&opts.run_dir, e))?;
    let metrics_path = opts.run_dir.join("metrics.jsonl");
    let run_id = format!("{:016x}", crate::strategy::mix(opts.seed, unix_ms()));
    let has_checkpoint = opts.run_dir.join("checkpoints").join(LATEST).exists();
    if opts.resume && !has_checkpoint {
        // The run stopped before its first checkpoint: nothing to keep, start it again.
        tracing::warn!("{}: no checkpoint yet, starting the run from round 0", opts.run_dir.display());
        hetfed_core::write_atomic(&metrics_path, b"")?;
    }
    if opts.resume && has_checkpoint {
        let ck = load_checkpoint(&opts.run_dir)?;
        strategy.load_state(ck.strategy_json, ck.strategy_tensors)?;
        truncate_metrics(&metrics_path, ck.round)?;
        let mut global = base.clone();
        global.extend(ck.weights);
        return Ok(Start { global, round: ck.round, run_id: ck.run_id });
    }
    if !opts.resume && metrics_path.exists() {
        return Err(Error::msg(format!(
            "{}: a run already exists here; pass --resume to continue it or choose another --out",
            opts.run_dir.display()
        )));
    }
    Ok(Start { global: base.clone(), round: 0, run_id })
}

struct LoadedCheckpoint {
    round: u64,
    run_id: String,
    weights: TensorMap,
    strategy_json: Value,
    strategy_tensors: TensorMap,
}

fn load_checkpoint(run_dir: &Path) -> Result<LoadedCheckpoint> {
    let root = run_dir.join("checkpoints");
    let latest = root.join(LATEST);
    let name = std::fs::read_to_string(&latest).map_err(|e| {
        Error::msg(format!("--resume: expected a checkpoint pointer at {}, found none ({e})", latest.display()))
    })?;
    let dir = root.join(name.trim());
    let state_path = dir.join("state.json");
    let state: Value = serde_json::from_slice(&hetfed_core::read_file(&state_path)?)
        .map_err(|e| Error::Format { path: state_path.clone(), msg: format!("expected JSON: {e}") })?;
    let round = state["round"]
        .as_u64()
        .ok_or_else(|| Error::Format { path: state_path.clone(), msg: "expected a `round` number".into() })?;
    let run_id = state["run_id"].as_str().unwrap_or_default().to_string();
    let (weights, _) = hetfed_core::load_safetensors(&dir.join("model.safetensors"))?;
    let (strategy_tensors, _) = hetfed_core::load_safetensors(&dir.join("strategy.safetensors"))?;
    Ok(LoadedCheckpoint { round, run_id, weights, strategy_json: state["strategy_state"].clone(), strategy_tensors })
}

/// The tensors of `global` that are not `base`'s own (the same tensor, not merely equal values):
/// what a checkpoint stores.
pub(crate) fn changed_from(global: &TensorMap, base: &TensorMap) -> TensorMap {
    global
        .iter()
        .filter(|(k, t)| base.get(*k).is_none_or(|b| b.id() != t.id()))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect()
}

/// Drops metrics of rounds after the checkpoint (they are run again), keeping everything else.
fn truncate_metrics(path: &Path, round: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) => v["round"].as_u64().is_none_or(|r| r <= round) && v["event"] != "run_end",
            Err(_) => false,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    hetfed_core::write_atomic(path, kept.as_bytes())
}

impl Server {
    /// Checkpoints the end of `round` (off the async threads: it writes the whole model).
    pub(super) async fn checkpoint(self: &Arc<Self>, round: u64) -> Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.save_checkpoint(round))
            .await
            .map_err(|e| Error::msg(format!("checkpoint task failed: {e}")))?
    }

    fn save_checkpoint(&self, round: u64) -> Result<()> {
        let root = self.opts.run_dir.join("checkpoints");
        let dir = root.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let global = self.global();
        let changed = changed_from(&global, &self.base.weights);
        hetfed_core::save_safetensors(&changed, DType::F32, &BTreeMap::new(), &dir.join("model.safetensors"))?;
        let (sjson, stensors) = lock(&self.strategy).state();
        hetfed_core::save_safetensors(&stensors, DType::F32, &BTreeMap::new(), &dir.join("strategy.safetensors"))?;
        let state = json!({"round": round, "run_id": self.run_id, "seed": self.opts.seed, "strategy": self.opts.strategy_name, "strategy_state": sjson});
        hetfed_core::write_atomic(&dir.join("state.json"), state.to_string().as_bytes())?;
        // The pointer flips atomically once the checkpoint is complete; older ones are removed after.
        hetfed_core::write_atomic(&root.join(LATEST), format!("round-{round}").as_bytes())?;
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("round-") && name != format!("round-{round}") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }
}
