//! Heterogeneous aggregation: clients fine-tune their own *small* base models; the server holds a
//! larger model and turns their task vectors into improvements of it, either by projection
//! (fitted per-layer maps, `hetfed-transfer`) or by distillation (`hetfed-distill`).
//!
//! One round, projection:
//!
//! 1. each accepted update `tau_i` (made from client `i`'s small base) is projected,
//!    `P(tau_i)`, with the maps of its base (fitted once per pair, cached by both hashes);
//! 2. `alpha_i` from update quality (the client's reported validation gain) and data
//!    heterogeneity (example count, label entropy), every part logged (`hetfed-merge`);
//! 3. combined: `sum alpha_i·P(tau_i) / sum alpha_i` (or TIES, or DARE then the mean);
//! 4. continual learning: Fisher damping (important weights move less) or orthogonal
//!    projection against earlier rounds' applied updates, or nothing;
//! 5. LARS-style trust ratio per parameter, `||dW|| <= c·||W||`;
//! 6. `W ← W + eta·dW`.
//!
//! Distillation replaces steps 1 and 3: the server rebuilds each client's fine-tuned small
//! model from its base and task vector, samples text from its own model, and trains its model
//! (LoRA) on the alpha-weighted ensemble's next-token distributions; steps 4–6 apply to the
//! resulting change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_distill::DistillConfig;
use hetfed_merge::{compute_alphas, AlphaConfig, ClientSignals, OrthoMemory};
use hetfed_model::{ops, Checkpoint, ModelIdentity};
use hetfed_net::{ClientInfo, DataStats};
use hetfed_taskvec::{Delta, TaskVector};
use hetfed_transfer::{MapConfig, PairMaps, MODULES};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::strategy::{apply_delta, AggregateReport, Base, Failure, FitConfig, FitResult, Sampling, Strategy};

/// How client updates reach the server model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Projection,
    Distillation,
}

/// How several projected updates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// `sum alpha_i·P_i / sum alpha_i` (the proposal's rule).
    Mean,
    /// TIES-Merging (trim, elect sign, disjoint mean), weighted by alpha.
    Ties,
    /// DARE (drop and rescale) on each update, then the mean.
    Dare,
}

/// Forgetting protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continual {
    None,
    /// Diagonal-Fisher damping (EWC-like) on the server's calibration text.
    Fisher,
    /// Project each update orthogonally to earlier rounds' applied updates (O-LoRA-like).
    Orthogonal,
}

/// Where calibration text comes from (never client data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    /// Sampled from the server's own (large) model.
    Sample,
    /// The server's own general text: `mltext` English train lines from the data directory.
    Text,
}

/// The `[transfer]` table: its presence makes a run heterogeneous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// The clients' small base models; client `i` uses entry `i mod len`. Relative to the config.
    pub client_models: Vec<PathBuf>,
    pub aggregation: Aggregation,
    pub calibration: Calibration,
    pub calibration_sequences: usize,
    pub calibration_len: usize,
    /// Where fitted maps are cached (relative to the working directory); default `runs/maps`.
    pub cache_dir: Option<PathBuf>,
    pub maps: MapConfig,
    pub alpha: AlphaConfig,
    /// Server rate `eta` on the combined update.
    pub eta: f64,
    /// LARS trust ratio `c` (`||dW|| <= c·||W||` per parameter); none = no cap.
    pub lars: Option<f64>,
    pub combine: Combine,
    pub ties_top_k: f64,
    pub dare_drop: f64,
    pub continual: Continual,
    pub fisher_strength: f64,
    pub ortho_memory: usize,
    /// Clients send task vectors relative to their fixed base every round, so by default each
    /// round's aggregate is added to the server model (`W ← W + eta·dW`, the proposal's rule)
    /// and repeated rounds of the same task stack up. With `anchor = true` each round's
    /// aggregate instead replaces the last one: `W = W_0 + eta·dW_t` (task arithmetic on the
    /// server's starting model), so rounds refine one estimate instead of accumulating.
    pub anchor: bool,
    pub distill: DistillConfig,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            client_models: Vec::new(),
            aggregation: Aggregation::Projection,
            calibration: Calibration::Sample,
            calibration_sequences: 64,
            calibration_len: 32,
            cache_dir: None,
            maps: MapConfig::default(),
            alpha: AlphaConfig::default(),
            eta: 1.0,
            lars: None,
            combine: Combine::Mean,
            ties_top_k: 0.2,
            dare_drop: 0.9,
            continual: Continual::None,
            fisher_strength: 1.0,
            ortho_memory: 8,
            anchor: false,
            distill: DistillConfig::default(),
        }
    }
}

impl TransferConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.client_models.is_empty() {
            return Err("transfer.client_models: expected at least one small model directory, found none".into());
        }
        if self.calibration_sequences < 2 || self.calibration_len < 4 {
            return Err(format!(
                "transfer.calibration_sequences / calibration_len: expected at least 2 sequences of 4 tokens, found {} of {}",
                self.calibration_sequences, self.calibration_len
            ));
        }
        if !(self.eta > 0.0 && self.eta.is_finite()) {
            return Err(format!("transfer.eta: expected a positive number, found {}", self.eta));
        }
        if let Some(c) = self.lars {
            if !(c > 0.0 && c.is_finite()) {
                return Err(format!("transfer.lars: expected a positive number, found {c}"));
            }
        }
        if !(self.ties_top_k > 0.0 && self.ties_top_k <= 1.0) {
            return Err(format!("transfer.ties_top_k: expected a fraction in (0, 1], found {}", self.ties_top_k));
        }
        if !(0.0..1.0).contains(&self.dare_drop) {
            return Err(format!("transfer.dare_drop: expected a fraction in [0, 1), found {}", self.dare_drop));
        }
        if !(self.fisher_strength >= 0.0 && self.fisher_strength.is_finite()) {
            return Err(format!("transfer.fisher_strength: expected a number >= 0, found {}", self.fisher_strength));
        }
        self.maps.validate()?;
        self.alpha.validate()?;
        self.distill.validate()?;
        Ok(())
    }

    /// Describes the calibration text (part of the maps' cache key).
    pub fn calibration_key(&self) -> String {
        format!("{:?}:n={}:len={}", self.calibration, self.calibration_sequences, self.calibration_len).to_lowercase()
    }
}

/// A small base model clients train from, with its maps into the server model.
pub struct SmallBase {
    /// Architecture, config and source of the model (its weights live in `weights`).
    pub checkpoint: Checkpoint,
    /// Shared with every registered client of this base (updates are validated against it).
    pub weights: Arc<TensorMap>,
    pub identity: ModelIdentity,
    pub maps: PairMaps,
}

impl SmallBase {
    pub fn new(mut small: Checkpoint, maps: PairMaps) -> Result<Self> {
        let identity = small.identity()?;
        let weights = Arc::new(std::mem::take(&mut small.weights));
        Ok(Self { checkpoint: small, weights, identity, maps })
    }
}

/// The heterogeneous strategy (see the module docs).
pub struct Hetero {
    base: Base,
    cfg: TransferConfig,
    /// The server model's architecture, config and source (its weights are the global model).
    large: Checkpoint,
    smalls: BTreeMap<String, SmallBase>,
    stats: BTreeMap<String, DataStats>,
    fisher: Option<TensorMap>,
    memory: OrthoMemory,
    /// The server model before the first aggregation (`anchor = true`).
    anchor: Option<TensorMap>,
}

impl Hetero {
    /// `smalls`: every small base clients may use, with fitted maps; `fisher`: the server model's
    /// diagonal Fisher (needed for [`Continual::Fisher`]).
    pub fn new(cfg: TransferConfig, sampling: Sampling, client: FitConfig, seed: u64, large: &Checkpoint, smalls: Vec<SmallBase>, fisher: Option<TensorMap>) -> Result<Self> {
        if cfg.continual == Continual::Fisher && fisher.is_none() {
            return Err(Error::msg("transfer.continual = \"fisher\" needs the server model's Fisher information, found none"));
        }
        let memory = OrthoMemory::new(cfg.ortho_memory);
        Ok(Self {
            base: Base { sampling, client, seed },
            cfg,
            large: Checkpoint { dir: large.dir.clone(), arch: large.arch.clone(), weights: TensorMap::new(), tokenizer: None, config_json: large.config_json.clone() },
            smalls: smalls.into_iter().map(|s| (s.identity.weights_hash.clone(), s)).collect(),
            stats: BTreeMap::new(),
            fisher,
            memory,
            anchor: None,
        })
    }

    fn signals(&self, r: &FitResult) -> ClientSignals {
        let st = self.stats.get(&r.client_id);
        ClientSignals {
            n_examples: r.n_examples,
            label_entropy_bits: st.map(|s| s.label_entropy_bits).filter(|h| h.is_finite()),
            n_classes: st.map(|s| s.label_hist.len()).filter(|&n| n >= 2),
            val_gain: r.metrics.get("val_gain").copied().filter(|g| g.is_finite()),
            server_gain: None,
        }
    }

    fn small_of(&self, r: &FitResult) -> Result<&SmallBase> {
        self.smalls.get(&r.base_hash).ok_or_else(|| {
            Error::msg(format!("client {}: update of base {}, for which the server has no maps", r.client_id, short(&r.base_hash)))
        })
    }

    /// The combined change of the server model (before continual protection, LARS and eta).
    fn projected_change(&self, results: Vec<FitResult>, alphas: &BTreeMap<String, f64>, details: &mut serde_json::Value) -> Result<TensorMap> {
        let mut projected = Vec::with_capacity(results.len());
        let mut norms = BTreeMap::new();
        for r in results {
            let sb = self.small_of(&r)?;
            let tv = TaskVector { base: sb.identity.clone(), kind: Delta::Full(r.delta) };
            let (p, rep) = sb.maps.project(&tv)?;
            let (n_in, n_out): (f64, f64) = rep.modules.iter().fold((0.0, 0.0), |(a, b), m| (a + m.norm_in * m.norm_in, b + m.norm_out * m.norm_out));
            norms.insert(r.client_id.clone(), json!({"norm_small": n_in.sqrt(), "norm_projected": n_out.sqrt(), "dropped": rep.dropped.len(), "project_s": rep.seconds}));
            let mut d = p.materialize()?;
            if self.cfg.combine == Combine::Dare {
                d = hetfed_merge::dare(&d, self.cfg.dare_drop, crate::strategy::mix(self.base.seed, projected.len() as u64))?;
            }
            projected.push((r.client_id, d));
        }
        details["projection"] = json!(norms);
        let weighted: Vec<(f64, &TensorMap)> = projected.iter().map(|(id, d)| (alphas[id], d)).collect();
        if self.cfg.combine == Combine::Ties {
            return hetfed_merge::ties_merge(&weighted, self.cfg.ties_top_k);
        }
        let mut acc = crate::strategy::WeightedSum::default();
        for (id, d) in &projected {
            acc.add(id, d, alphas[id])?;
        }
        Ok(acc.mean()?.map(|(m, _)| m).unwrap_or_default())
    }

    fn distilled_change(&self, round: u64, global: &TensorMap, results: &[FitResult], alphas: &BTreeMap<String, f64>, details: &mut serde_json::Value) -> Result<TensorMap> {
        let dc = &self.cfg.distill;
        let mut teachers = Vec::with_capacity(results.len());
        for r in results {
            let sb = self.small_of(r)?;
            let mut w = (*sb.weights).clone();
            apply_delta(&mut w, &r.delta, 1.0)?;
            teachers.push((sb.checkpoint.arch.build(&w, &sb.checkpoint.source(), None)?, alphas[&r.client_id]));
        }
        let student = Checkpoint { dir: self.large.dir.clone(), arch: self.large.arch.clone(), weights: global.clone(), tokenizer: None, config_json: self.large.config_json.clone() };
        let model = student.model(None)?;
        let start = self.large.arch.eos_token_id().unwrap_or(0);
        let seed = crate::strategy::mix(dc.seed ^ self.base.seed, round);
        let seqs = hetfed_distill::sample_texts(model.as_ref(), start, dc.n_prompts, dc.seq_len, seed)?;
        let refs: Vec<(&dyn hetfed_model::CausalLm, f64)> = teachers.iter().map(|(m, w)| (m.as_ref(), *w)).collect();
        let targets = hetfed_distill::ensemble_targets(&refs, &seqs, dc.temperature)?;
        let cfg = DistillConfig { seed, ..dc.clone() };
        let rep = hetfed_distill::distill(&student, &targets, &seqs, &cfg, |_, _| {})?;
        details["distill"] = json!({"kl_before": rep.kl_before, "kl_after": rep.kl_after, "steps": rep.steps, "seconds": rep.seconds});
        Ok(rep.delta)
    }
}

fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

impl Strategy for Hetero {
    fn name(&self) -> &'static str {
        match self.cfg.aggregation {
            Aggregation::Projection => "hetero_projection",
            Aggregation::Distillation => "hetero_distillation",
        }
    }

    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)> {
        for c in available {
            self.stats.insert(c.client_id.clone(), c.stats.clone());
        }
        self.base.configure(round, available, 0.0)
    }

    fn client_base(&self, info: &ClientInfo) -> std::result::Result<Option<(ModelIdentity, Arc<TensorMap>)>, String> {
        match self.smalls.get(&info.base_hash) {
            Some(sb) => Ok(Some((sb.identity.clone(), sb.weights.clone()))),
            None => Err(format!(
                "expected a client base model the server has projection maps for ({}), found base {}",
                self.smalls.values().map(|s| format!("{} = {}", s.checkpoint.source(), short(&s.identity.weights_hash))).collect::<Vec<_>>().join(", "),
                short(&info.base_hash)
            )),
        }
    }

    fn aggregate_fit(&mut self, round: u64, global: &mut TensorMap, results: &mut dyn Iterator<Item = Result<FitResult>>, _failures: &[Failure]) -> Result<AggregateReport> {
        let t0 = Instant::now();
        let results: Vec<FitResult> = results.collect::<Result<_>>()?;
        let n = results.len();
        if n == 0 {
            return Ok(AggregateReport::default());
        }
        let signals: Vec<(String, ClientSignals)> = results.iter().map(|r| (r.client_id.clone(), self.signals(r))).collect();
        let parts = compute_alphas(&self.cfg.alpha, &signals)?;
        let alphas: BTreeMap<String, f64> = parts.iter().map(|(k, p)| (k.clone(), p.alpha)).collect();
        let mut details = json!({"alpha": parts});
        let mut change = match self.cfg.aggregation {
            Aggregation::Projection => self.projected_change(results, &alphas, &mut details)?,
            Aggregation::Distillation => self.distilled_change(round, global, &results, &alphas, &mut details)?,
        };
        match self.cfg.continual {
            Continual::None => {}
            Continual::Fisher => {
                let fisher = self.fisher.as_ref().ok_or_else(|| Error::msg("no Fisher information"))?;
                let kept = hetfed_merge::fisher_damp(&mut change, fisher, self.cfg.fisher_strength)?;
                let mean = kept.values().sum::<f64>() / kept.len().max(1) as f64;
                details["fisher_norm_kept_mean"] = json!(mean);
            }
            Continual::Orthogonal => {
                let removed = self.memory.project_out(&mut change)?;
                details["orthogonal_removed"] = json!(removed);
            }
        }
        if self.cfg.anchor {
            let w0 = self.anchor.get_or_insert_with(|| global.clone());
            *global = w0.clone();
        }
        if let Some(c) = self.cfg.lars {
            let factors = hetfed_merge::trust_ratio(global, &mut change, c)?;
            let capped = factors.values().filter(|f| **f < 1.0).count();
            let min = factors.values().copied().fold(1.0f64, f64::min);
            details["lars"] = json!({"capped": capped, "of": factors.len(), "min_factor": min});
        }
        let applied_norm = apply_delta(global, &change, self.cfg.eta)?;
        if self.cfg.continual == Continual::Orthogonal {
            self.memory.remember(&change)?;
        }
        details["server_s"] = json!(t0.elapsed().as_secs_f64());
        Ok(AggregateReport { weights: alphas, n_aggregated: n, applied_norm, details })
    }

    fn run_info(&self) -> serde_json::Value {
        let maps: Vec<serde_json::Value> = self
            .smalls
            .values()
            .map(|s| {
                json!({
                    "small": s.checkpoint.source(), "small_hash": s.identity.weights_hash, "method": s.maps.config.method,
                    "pairing": s.maps.pairing, "fit_s": s.maps.summary.seconds,
                    "mean_explained_variance": s.maps.summary.mean_explained_variance,
                    "explained_variance_by_space": s.maps.mean_explained_variance_by_space(),
                    "layers": s.maps.summary.layers, "calibration": s.maps.summary.calibration,
                })
            })
            .collect();
        json!({"maps": maps})
    }

    fn state(&self) -> (serde_json::Value, TensorMap) {
        let mut t = self.memory.to_tensors();
        if let Some(a) = &self.anchor {
            t.extend(a.iter().map(|(k, v)| (format!("anchor.{k}"), v.clone())));
        }
        (serde_json::Value::Null, t)
    }

    fn load_state(&mut self, _json: serde_json::Value, tensors: TensorMap) -> Result<()> {
        let (anchor, memory): (TensorMap, TensorMap) = tensors.into_iter().partition(|(k, _)| k.starts_with("anchor."));
        self.memory = OrthoMemory::from_tensors(self.cfg.ortho_memory, memory)?;
        self.anchor = (!anchor.is_empty()).then(|| anchor.into_iter().map(|(k, v)| (k["anchor.".len()..].to_string(), v)).collect());
        Ok(())
    }
}

/// Diagonal (empirical) Fisher information of `ck`'s projected linear weights on `seqs`: the
/// mean over sequences of the squared gradient of the sequence's mean next-token loss.
pub fn fisher_diagonal(ck: &Checkpoint, seqs: &[Vec<u32>]) -> Result<TensorMap> {
    let mut weights = TensorMap::new();
    let mut vars = Vec::new();
    for (name, t) in &ck.weights {
        let trainable = name.ends_with(".weight") && MODULES.iter().any(|m| name.contains(m));
        if trainable {
            let v = Var::from_tensor(t)?;
            weights.insert(name.clone(), v.as_tensor().clone());
            vars.push((name.clone(), v));
        } else {
            weights.insert(name.clone(), t.clone());
        }
    }
    let model = ck.arch.build(&weights, &ck.source(), None)?;
    let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
    for s in seqs {
        if s.len() < 2 {
            continue;
        }
        let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu)?;
        let logits = model.forward(&ids, None)?.narrow(1, 0, s.len() - 1)?;
        let lp = ops::token_logprobs(&logits, &s[1..])?;
        let loss = (lp.sum_all()?.neg()? / (s.len() - 1) as f64)?;
        let grads = loss.backward()?;
        for (name, v) in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let sq = g.sqr()?;
                let next = match acc.remove(name) {
                    Some(a) => (a + sq)?,
                    None => sq,
                };
                acc.insert(name.clone(), next);
            }
        }
    }
    let n = seqs.len().max(1) as f64;
    acc.into_iter().map(|(k, t)| Ok((k, (t / n)?))).collect()
}
