//! Local fine-tuning: full or LoRA, LM loss on target tokens only, AdamW with warmup and
//! cosine/linear decay, gradient clipping and accumulation, an optional FedProx term
//! `mu/2·||w - w_ref||²`, deterministic under a seed, resumable from checkpoints.
//!
//! This crate knows nothing about transport or aggregation: it turns a base model and examples
//! into fine-tuned weights (or adapters), and reports progress through a callback.

pub mod data;
pub mod optim;
pub mod pretrain;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::{CausalLm, Checkpoint, LoraConfig, LoraSet, Recompute};

pub use data::{encode, read_jsonl, Encoded, Example};
pub use optim::{lr_at, AdamW, AdamWConfig, Schedule};

/// Everything that determines a fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// LoRA adapters; `None` trains every parameter.
    pub lora: Option<LoraConfig>,
    pub lr: f64,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs` when smaller).
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    pub max_len: usize,
    /// FedProx coefficient; the reference point is the starting weights (or adapters).
    pub proximal_mu: f64,
    pub adamw: AdamWConfig,
    pub seed: u64,
    /// Recompute every block's activations in the backward pass instead of keeping them
    /// ("gradient checkpointing", [`hetfed_model::recompute`]): far less memory for about one
    /// more forward pass of the blocks. The gradients are the same.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lora: None,
            lr: 1e-3,
            schedule: Schedule::Cosine,
            warmup_steps: 0,
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            max_len: 256,
            proximal_mu: 0.0,
            adamw: AdamWConfig::default(),
            seed: 0,
            gradient_checkpointing: false,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.batch_size == 0 || self.grad_accum == 0 || self.epochs == 0 {
            return Err("batch_size, grad_accum and epochs must be at least 1".into());
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return Err(format!("lr must be positive, found {}", self.lr));
        }
        if self.proximal_mu < 0.0 {
            return Err(format!("proximal_mu must be >= 0, found {}", self.proximal_mu));
        }
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        Ok(())
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    /// Mean LM loss over the step's target tokens (without the proximal term).
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
}

/// A fine-tuning run in progress.
pub struct Trainer<'a> {
    ck: &'a Checkpoint,
    cfg: TrainConfig,
    model: Box<dyn CausalLm>,
    /// Gradients of recomputed blocks ([`TrainConfig::gradient_checkpointing`]).
    recompute: Option<Recompute>,
    lora: Option<LoraSet>,
    /// Full fine-tuning: the model's weights as variables (canonical names).
    full: Option<TensorMap>,
    opt: AdamW,
    reference: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl<'a> Trainer<'a> {
    /// Starts from the checkpoint's weights; with LoRA, from `adapters` if given (e.g. the global
    /// adapter of a federated round) or fresh ones.
    pub fn new(ck: &'a Checkpoint, cfg: TrainConfig, adapters: Option<LoraSet>) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let mut recompute = None;
        let (model, lora, full, vars) = match &cfg.lora {
            Some(lcfg) => {
                let set = match adapters {
                    Some(s) => s,
                    None => LoraSet::init(lcfg, &ck.weights, cfg.seed)?,
                };
                let model = if cfg.gradient_checkpointing {
                    let rc = recompute.insert(Recompute::with_lora(&set));
                    ck.arch.build_recomputing(&ck.weights, &ck.source(), Some(&set), rc)?
                } else {
                    ck.arch.build(&ck.weights, &ck.source(), Some(&set))?
                };
                let vars = set.vars();
                (model, Some(set), None, vars)
            }
            None => {
                let vars: Vec<(String, Var)> = ck
                    .weights
                    .iter()
                    // Trainable weights are f32, whatever the checkpoint keeps resident.
                    .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?)))
                    .collect::<candle_core::Result<_>>()?;
                let tracked: TensorMap = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
                let model = if cfg.gradient_checkpointing {
                    let rc = recompute.insert(Recompute::new());
                    ck.arch.build_recomputing(&tracked, &ck.source(), None, rc)?
                } else {
                    ck.arch.build(&tracked, &ck.source(), None)?
                };
                (model, None, Some(tracked), vars)
            }
        };
        let reference = vars.iter().map(|(_, v)| v.as_detached_tensor().copy()).collect::<candle_core::Result<_>>()?;
        let opt = AdamW::new(vars, cfg.adamw)?;
        Ok(Self { ck, cfg, model, recompute, lora, full, opt, reference, step: 0 })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn model(&self) -> &dyn CausalLm {
        self.model.as_ref()
    }

    /// The micro-batches of the whole run, as example indices: per epoch a seeded shuffle cut
    /// into batches. Step `s` uses micro-batches `s·accum .. (s+1)·accum`; the plan is a pure
    /// function of the config and the data size, which is what makes resuming exact.
    fn plan(&self, n: usize) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        for epoch in 0..self.cfg.epochs {
            let mut idx: Vec<usize> = (0..n).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.cfg.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch as u64 + 1)),
            );
            idx.shuffle(&mut rng);
            out.extend(idx.chunks(self.cfg.batch_size).map(<[usize]>::to_vec));
        }
        out
    }

    pub fn total_steps(&self, n: usize) -> usize {
        let micro = self.plan(n).len();
        let steps = micro.div_ceil(self.cfg.grad_accum);
        self.cfg.max_steps.map_or(steps, |m| m.min(steps))
    }

    /// Trains until the planned number of steps, calling `on_step` after each optimizer step
    /// and `should_stop` before each (return true to stop early, e.g. on Ctrl-C).
    pub fn train(
        &mut self,
        data: &[Encoded],
        mut on_step: impl FnMut(&StepReport, &Self) -> Result<()>,
        mut should_stop: impl FnMut() -> bool,
    ) -> Result<()> {
        if data.is_empty() {
            return Err(Error::msg("expected at least one training example, found none"));
        }
        let plan = self.plan(data.len());
        let total = self.total_steps(data.len());
        let accum = self.cfg.grad_accum;
        while self.step < total {
            if should_stop() {
                break;
            }
            let t0 = Instant::now();
            if let Some(l) = &self.lora {
                l.set_train(Some(self.cfg.seed.wrapping_add(1 + self.step as u64)));
            }
            let micro: Vec<&Vec<usize>> = plan.iter().skip(self.step * accum).take(accum).collect();
            let n_tok: usize = micro.iter().flat_map(|b| b.iter()).map(|&i| data[i].n_target()).sum();
            let mut grads: Vec<Option<Tensor>> = vec![None; self.opt.vars().len()];
            let mut loss_sum = 0.0;
            let mut tokens = 0;
            for batch in micro {
                let exs: Vec<&Encoded> = batch.iter().map(|&i| &data[i]).collect();
                let sum_nll = batch_nll(self.model.as_ref(), &exs)?;
                loss_sum += sum_nll.to_scalar::<f32>()? as f64;
                tokens += exs.iter().map(|e| e.ids.len()).sum::<usize>();
                // Mean over all target tokens of the step, whatever the micro-batch split.
                let scaled = (sum_nll / n_tok.max(1) as f64)?;
                let mut g = scaled.backward()?;
                if let Some(rc) = &self.recompute {
                    rc.drain_into(&mut g)?;
                }
                for (i, (_, var)) in self.opt.vars().iter().enumerate() {
                    if let Some(gi) = g.get(var.as_tensor()) {
                        grads[i] = Some(match grads[i].take() {
                            None => gi.clone(),
                            Some(acc) => (acc + gi)?,
                        });
                    }
                }
            }
            // Every trainable parameter must receive a gradient: a silently missing one means an
            // op without a backward pass, which would freeze that parameter unnoticed.
            let mut grads: Vec<Tensor> = grads
                .into_iter()
                .zip(self.opt.vars())
                .map(|(g, (name, _))| g.ok_or_else(|| Error::msg(format!("parameter `{name}` received no gradient"))))
                .collect::<Result<_>>()?;
            if self.cfg.proximal_mu > 0.0 {
                for (i, (_, v)) in self.opt.vars().iter().enumerate() {
                    let d = (v.as_tensor().detach() - &self.reference[i])?;
                    grads[i] = (&grads[i] + (d * self.cfg.proximal_mu)?)?;
                }
            }
            let mut sq = 0.0;
            for g in &grads {
                sq += hetfed_core::sq_norm(g)?;
            }
            let grad_norm = sq.sqrt();
            if let Some(max) = self.cfg.max_grad_norm {
                if grad_norm > max {
                    let c = max / (grad_norm + 1e-6);
                    grads = grads.into_iter().map(|g| g * c).collect::<candle_core::Result<_>>()?;
                }
            }
            let lr = lr_at(self.cfg.lr, self.cfg.schedule, self.cfg.warmup_steps, total, self.step);
            self.opt.step(&grads, lr)?;
            self.step += 1;
            let secs = t0.elapsed().as_secs_f64();
            let report = StepReport {
                step: self.step,
                total_steps: total,
                loss: loss_sum / n_tok.max(1) as f64,
                lr,
                grad_norm,
                tokens,
                tokens_per_s: tokens as f64 / secs.max(1e-9),
            };
            on_step(&report, self)?;
        }
        if let Some(l) = &self.lora {
            l.set_train(None);
        }
        Ok(())
    }

    /// Mean target-token loss over `data` (no gradient, no dropout).
    pub fn eval_loss(&self, data: &[Encoded]) -> Result<f64> {
        eval_loss(self.model.as_ref(), data, self.cfg.batch_size)
    }

    /// The fine-tuned weights (full fine-tuning), detached, canonical names.
    pub fn weights(&self) -> Option<TensorMap> {
        self.full.as_ref().map(|m| m.iter().map(|(k, t)| (k.clone(), t.detach())).collect())
    }

    pub fn lora(&self) -> Option<&LoraSet> {
        self.lora.as_ref()
    }

    /// Saves everything needed to continue exactly: trainable values, optimizer moments, step.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut map = TensorMap::new();
        for (name, v) in self.opt.vars() {
            map.insert(format!("param.{name}"), v.as_detached_tensor());
        }
        for (k, t) in self.opt.state() {
            map.insert(format!("opt.{k}"), t);
        }
        for (i, (name, _)) in self.opt.vars().iter().enumerate() {
            map.insert(format!("ref.{name}"), self.reference[i].clone());
        }
        let mut meta = BTreeMap::new();
        meta.insert("hetfed.format".into(), "train-state/1".into());
        meta.insert("step".into(), self.step.to_string());
        meta.insert("opt_t".into(), self.opt.t.to_string());
        meta.insert("config".into(), serde_json::to_string(&self.cfg).expect("config serialises"));
        hetfed_core::save_safetensors(&map, DType::F32, &meta, path)
    }

    /// Restores a state written by [`Trainer::save_state`] for the same model and config.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let (map, meta) = hetfed_core::load_safetensors(path)?;
        let get = |k: &str| {
            meta.get(k).cloned().ok_or_else(|| Error::Format {
                path: path.to_owned(),
                msg: format!("expected metadata key `{k}` of a hetfed training state, found none"),
            })
        };
        let saved: TrainConfig = serde_json::from_str(&get("config")?)
            .map_err(|e| Error::Format { path: path.to_owned(), msg: format!("config: {e}") })?;
        if saved != self.cfg {
            return Err(Error::Format {
                path: path.to_owned(),
                msg: "was saved with a different training config; resume with the same options".into(),
            });
        }
        let parse = |k: &str| -> Result<usize> {
            get(k)?.parse().map_err(|e| Error::Format { path: path.to_owned(), msg: format!("`{k}`: {e}") })
        };
        let (step, opt_t) = (parse("step")?, parse("opt_t")?);
        let mut opt_state = TensorMap::new();
        for (k, t) in &map {
            if let Some(rest) = k.strip_prefix("opt.") {
                opt_state.insert(rest.to_string(), t.clone());
            }
        }
        for (i, (name, var)) in self.opt.vars().iter().enumerate() {
            let p = map.get(&format!("param.{name}")).ok_or_else(|| Error::Format {
                path: path.to_owned(),
                msg: format!("expected tensor `param.{name}`, found none"),
            })?;
            var.set(p)?;
            if let Some(r) = map.get(&format!("ref.{name}")) {
                self.reference[i] = r.clone();
            }
        }
        self.opt.load_state(&opt_state, opt_t)?;
        self.step = step;
        Ok(())
    }

    pub fn checkpoint(&self) -> &Checkpoint {
        self.ck
    }
}

/// Makes a `metrics.jsonl` of step rows agree with a run that continues after optimizer step
/// `step` (the step of the state it resumes from, or 0 for a fresh start): drops every row whose
/// `"step"` is greater, which the run is about to log again, and a torn last line (a crash in the
/// middle of a write). Other lines are kept as they are. Returns how many lines were dropped; the
/// file is rewritten (atomically) only when there are any, and a missing file is no error.
///
/// Without this, a run killed after logging step 7 but checkpointed at step 5 logs steps 6 and 7
/// twice once resumed.
pub fn truncate_log_after(path: &Path, step: usize) -> Result<usize> {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0;
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let n_lines = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let parsed = serde_json::from_str::<serde_json::Value>(line).ok();
        let row_step = parsed.as_ref().and_then(|v| v.get("step")).and_then(serde_json::Value::as_u64);
        let torn = torn_tail && i + 1 == n_lines && parsed.is_none();
        if torn || row_step.is_some_and(|s| s > step as u64) {
            dropped += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if dropped > 0 {
        hetfed_core::write_atomic(path, kept.as_bytes())?;
    }
    Ok(dropped)
}

/// Sum of target-token NLL over a batch (differentiable): what one training step minimises.
/// Through [`CausalLm::target_logprobs`], so BLOOM and Llama never hold the batch's full logits
/// (or their gradient), only a chunk of them.
pub fn batch_nll(model: &dyn CausalLm, exs: &[&Encoded]) -> Result<Tensor> {
    let t = exs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if t < 2 {
        return Err(Error::msg(format!("expected a batch with a sequence of at least 2 tokens, found {t}")));
    }
    let b = exs.len();
    let mut ids = vec![0u32; b * t];
    let mut targets = vec![0u32; b * (t - 1)];
    let mut mask = vec![0f32; b * (t - 1)];
    for (i, e) in exs.iter().enumerate() {
        ids[i * t..i * t + e.ids.len()].copy_from_slice(&e.ids);
        for j in e.prompt_len.max(1)..e.ids.len() {
            targets[i * (t - 1) + j - 1] = e.ids[j];
            mask[i * (t - 1) + j - 1] = 1.0;
        }
    }
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let lp = model.target_logprobs(&ids, &targets)?;
    let mask = Tensor::from_vec(mask, (b, t - 1), &Device::Cpu)?;
    Ok((lp * mask)?.sum_all()?.neg()?)
}

/// Mean target-token loss of a model over encoded examples.
pub fn eval_loss(model: &dyn CausalLm, data: &[Encoded], batch_size: usize) -> Result<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for chunk in data.chunks(batch_size.max(1)) {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            chunk.iter().map(|e| (e.ids[..e.prompt_len].to_vec(), e.ids[e.prompt_len..].to_vec())).collect();
        for s in hetfed_model::score::continuation_logprobs(model, &pairs, batch_size)? {
            sum -= s.sum as f64;
            n += s.n_tokens;
        }
    }
    Ok(sum / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncating_the_log_drops_rows_after_the_step_and_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("hetfed-train-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        assert_eq!(super::truncate_log_after(&path, 3).unwrap(), 0, "a missing log is no error");
        let rows: String = (1..=5).map(|s| format!("{{\"step\":{s},\"loss\":1.0}}\n")).collect();
        std::fs::write(&path, format!("{{\"event\":\"note\"}}\n{rows}{{\"step\":6,\"lo")).unwrap();
        assert_eq!(super::truncate_log_after(&path, 3).unwrap(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"event\":\"note\"}\n{\"step\":1,\"loss\":1.0}\n{\"step\":2,\"loss\":1.0}\n{\"step\":3,\"loss\":1.0}\n"
        );
        assert_eq!(super::truncate_log_after(&path, 3).unwrap(), 0, "nothing more to drop");
        assert_eq!(super::truncate_log_after(&path, 0).unwrap(), 3, "a fresh start keeps no step rows");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"event\":\"note\"}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
