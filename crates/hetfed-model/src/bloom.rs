//! BLOOM (`BloomForCausalLM`): fused per-head QKV, ALiBi, embedding LayerNorm, tanh-GELU, tied
//! LM head. Checkpoint keys are canonicalised to the `transformer.` prefix that
//! `save_pretrained` writes; the bigscience checkpoints, which have no prefix, load too.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::lora::{Linear, LoraSet};
use crate::model::{attention, embed, fused_target_logprobs, CausalLm, KvCache, Weights};
use crate::ops;
use crate::recompute::Recompute;
use hetfed_core::TensorMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_eps() -> f64 {
    1e-5
}

impl Config {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_head == 0 || !self.hidden_size.is_multiple_of(self.n_head) {
            return Err(format!("hidden_size ({}) must be a multiple of n_head ({})", self.hidden_size, self.n_head));
        }
        if self.vocab_size == 0 || self.n_layer == 0 {
            return Err("vocab_size and n_layer must be positive".into());
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.n_head
    }

    /// Every parameter with its shape, in canonical names.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![
            ("transformer.word_embeddings.weight".to_string(), vec![v, h]),
            ("transformer.word_embeddings_layernorm.weight".to_string(), vec![h]),
            ("transformer.word_embeddings_layernorm.bias".to_string(), vec![h]),
        ];
        for i in 0..self.n_layer {
            let p = format!("transformer.h.{i}");
            for (n, s) in [
                ("input_layernorm.weight", vec![h]),
                ("input_layernorm.bias", vec![h]),
                ("self_attention.query_key_value.weight", vec![3 * h, h]),
                ("self_attention.query_key_value.bias", vec![3 * h]),
                ("self_attention.dense.weight", vec![h, h]),
                ("self_attention.dense.bias", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
                ("post_attention_layernorm.bias", vec![h]),
                ("mlp.dense_h_to_4h.weight", vec![4 * h, h]),
                ("mlp.dense_h_to_4h.bias", vec![4 * h]),
                ("mlp.dense_4h_to_h.weight", vec![h, 4 * h]),
                ("mlp.dense_4h_to_h.bias", vec![h]),
            ] {
                out.push((format!("{p}.{n}"), s));
            }
        }
        out.push(("transformer.ln_f.weight".into(), vec![h]));
        out.push(("transformer.ln_f.bias".into(), vec![h]));
        out
    }
}

impl Config {
    /// Freshly initialised weights as BLOOM initialises them: linear and embedding matrices
    /// ~ N(0, 0.02), LayerNorm gains 1, biases 0. Deterministic under `seed`.
    pub fn random_weights(&self, seed: u64) -> candle_core::Result<TensorMap> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut weights = TensorMap::new();
        for (name, shape) in self.param_shapes() {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if shape.len() == 1 {
                vec![1.0; n]
            } else {
                // Box-Muller: N(0, 1) from two uniforms.
                (0..n)
                    .map(|_| {
                        let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                        0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            weights.insert(name, Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?);
        }
        Ok(weights)
    }

    /// The `config.json` that `transformers` reads for this model.
    pub fn hf_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["BloomForCausalLM"],
            "model_type": "bloom",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "apply_residual_connection_post_layernorm": self.apply_residual_connection_post_layernorm,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "slow_but_exact": false,
            "pretraining_tp": 1,
            "use_cache": true,
            "tie_word_embeddings": true,
        })
    }
}

impl crate::checkpoint::Architecture for Config {
    fn validate(&self) -> std::result::Result<(), String> {
        Config::validate(self)
    }
    fn sizes(&self) -> (usize, Vec<(&'static str, usize)>) {
        (
            self.n_layer,
            vec![("vocab_size", self.vocab_size), ("hidden_size", self.hidden_size), ("n_head", self.n_head)],
        )
    }
    fn canonicalize(&self, raw: TensorMap) -> TensorMap {
        canonicalize(raw)
    }
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        Config::param_shapes(self)
    }
    fn build(
        &self,
        w: &Weights,
        lora: Option<&LoraSet>,
        recompute: Option<&Recompute>,
    ) -> hetfed_core::Result<Box<dyn CausalLm>> {
        let mut m = Model::new(self, w, lora)?;
        m.recompute = recompute.cloned();
        Ok(Box::new(m))
    }
    fn default_lora_targets(&self) -> &'static [&'static str] {
        &["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    }
    fn config_string(&self) -> String {
        serde_json::to_string(self).expect("configs serialise")
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions_key(&self) -> &'static str {
        "seq_length"
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }
}

/// Canonical names: add the `transformer.` prefix where missing; drop the tied `lm_head.weight`
/// (it is the embedding matrix).
pub fn canonicalize(raw: TensorMap) -> TensorMap {
    raw.into_iter()
        .filter(|(k, _)| k != "lm_head.weight")
        .map(|(k, t)| if k.starts_with("transformer.") { (k, t) } else { (format!("transformer.{k}"), t) })
        .collect()
}

/// ALiBi slopes exactly as BLOOM computes them, including head counts that are not powers of two.
pub fn alibi_slopes(n_head: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - n_head.leading_zeros()); // largest power of 2 <= n
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f64> = (1..=closest).map(|i| base.powi(i as i32)).collect();
    if closest != n_head {
        let extra_base = 2f64.powf(-(2f64.powf(-((2.0 * closest as f64).log2() - 3.0))));
        let remaining = (n_head - closest).min(closest);
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn trainable(&self) -> impl Iterator<Item = Tensor> + '_ {
        [&self.w, &self.b].into_iter().filter(|t| t.track_op()).cloned()
    }
    fn load(w: &Weights, name: &str, h: usize, eps: f64) -> hetfed_core::Result<Self> {
        Ok(Self { w: w.get(&format!("{name}.weight"), &[h])?, b: w.get(&format!("{name}.bias"), &[h])?, eps })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.w, &self.b, self.eps)
    }
}

struct Attention {
    query_key_value: Linear,
    dense: Linear,
    n_head: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        slopes: &[f32],
        lp: Option<&[usize]>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, hd) = (self.n_head, self.head_dim);
        // Fused layout per head: [.., n_head, 3, head_dim].
        let qkv = self.query_key_value.forward(x)?.reshape((b, t, nh, 3, hd))?;
        let part = |i: usize| -> Result<Tensor> { qkv.narrow(3, i, 1)?.squeeze(3)?.transpose(1, 2)?.contiguous() };
        let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
        if let Some((c, idx)) = cache {
            (k, v) = c.append(idx, k, v)?;
        }
        let ctx = attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), Some(slopes), lp)?;
        let ctx = ctx.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.dense.forward(&ctx)
    }

    /// Like `forward` (no cache), also returning the flattened `[b·t, h]` queries, keys, values
    /// (head-major) and attention context.
    fn capture(&self, x: &Tensor, slopes: &[f32]) -> Result<(Tensor, [Tensor; 4])> {
        let (b, t, _) = x.dims3()?;
        let (nh, hd) = (self.n_head, self.head_dim);
        let qkv = self.query_key_value.forward(x)?.reshape((b, t, nh, 3, hd))?;
        let flat = |i: usize| -> Result<Tensor> { qkv.narrow(3, i, 1)?.squeeze(3)?.reshape((b * t, nh * hd)) };
        let (fq, fk, fv) = (flat(0)?, flat(1)?, flat(2)?);
        let part = |i: usize| -> Result<Tensor> { qkv.narrow(3, i, 1)?.squeeze(3)?.transpose(1, 2)?.contiguous() };
        let ctx = attention(&part(0)?, &part(1)?, &part(2)?, 1.0 / (hd as f64).sqrt(), Some(slopes), None)?;
        let ctx = ctx.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let out = self.dense.forward(&ctx)?;
        Ok((out, [fq, fk, fv, ctx.reshape((b * t, nh * hd))?]))
    }
}

/// What one BLOOM block reads and writes on calibration text, each flattened to `[b·t, d]`:
/// the spaces a map between two models' blocks is fitted on.
pub struct BlockActivations {
    /// Residual stream entering the block.
    pub resid_in: Tensor,
    /// `input_layernorm` output: what `query_key_value` reads.
    pub attn_in: Tensor,
    /// Queries, keys and values (head-major, `n_head·head_dim`): what `query_key_value` writes.
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    /// Attention context: what `self_attention.dense` reads.
    pub ctx: Tensor,
    /// `post_attention_layernorm` output: what `dense_h_to_4h` reads.
    pub mlp_in: Tensor,
    /// `dense_h_to_4h` output before GELU: what it writes.
    pub mlp_pre: Tensor,
    /// GELU output: what `dense_4h_to_h` reads.
    pub mlp_hidden: Tensor,
    /// Residual stream leaving the block.
    pub resid_out: Tensor,
}

struct Block {
    input_layernorm: LayerNorm,
    self_attention: Attention,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    residual_post_ln: bool,
}

impl Block {
    /// The tensors of this block that training tracks (what a recomputation differentiates).
    fn trainable(&self) -> Vec<Tensor> {
        let linears = [
            &self.self_attention.query_key_value,
            &self.self_attention.dense,
            &self.dense_h_to_4h,
            &self.dense_4h_to_h,
        ];
        let norms = self.input_layernorm.trainable().chain(self.post_attention_layernorm.trainable());
        linears.into_iter().flat_map(Linear::trainable).chain(norms).collect()
    }

    fn new(cfg: &Config, w: &Weights, i: usize, lora: Option<&LoraSet>) -> hetfed_core::Result<Self> {
        let h = cfg.hidden_size;
        let p = format!("transformer.h.{i}");
        let eps = cfg.layer_norm_epsilon;
        Ok(Self {
            input_layernorm: LayerNorm::load(w, &format!("{p}.input_layernorm"), h, eps)?,
            self_attention: Attention {
                query_key_value: Linear::load(w, &format!("{p}.self_attention.query_key_value"), 3 * h, h, true, lora)?,
                dense: Linear::load(w, &format!("{p}.self_attention.dense"), h, h, true, lora)?,
                n_head: cfg.n_head,
                head_dim: cfg.head_dim(),
            },
            post_attention_layernorm: LayerNorm::load(w, &format!("{p}.post_attention_layernorm"), h, eps)?,
            dense_h_to_4h: Linear::load(w, &format!("{p}.mlp.dense_h_to_4h"), 4 * h, h, true, lora)?,
            dense_4h_to_h: Linear::load(w, &format!("{p}.mlp.dense_4h_to_h"), h, 4 * h, true, lora)?,
            residual_post_ln: cfg.apply_residual_connection_post_layernorm,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        slopes: &[f32],
        lp: Option<&[usize]>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let ln = self.input_layernorm.forward(x)?;
        let residual = if self.residual_post_ln { &ln } else { x };
        let attn = (self.self_attention.forward(&ln, slopes, lp, cache)? + residual)?;
        let ln = self.post_attention_layernorm.forward(&attn)?;
        let residual = if self.residual_post_ln { &ln } else { &attn };
        let hidden = ops::gelu_tanh(&self.dense_h_to_4h.forward(&ln)?)?;
        self.dense_4h_to_h.forward(&hidden)? + residual
    }
}

pub struct Model {
    word_embeddings: Tensor,
    word_embeddings_layernorm: LayerNorm,
    h: Vec<Arc<Block>>,
    ln_f: LayerNorm,
    slopes: Arc<Vec<f32>>,
    cfg: Config,
    /// Blocks with trainable tensors are recomputed in the backward pass (training only).
    recompute: Option<Recompute>,
}

impl Model {
    pub fn new(cfg: &Config, w: &Weights, lora: Option<&LoraSet>) -> hetfed_core::Result<Self> {
        cfg.validate().map_err(|m| hetfed_core::Error::msg(format!("{}: {m}", w.source)))?;
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_epsilon;
        let word_embeddings = w.get("transformer.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let slopes = alibi_slopes(cfg.n_head);
        Ok(Self {
            word_embeddings,
            word_embeddings_layernorm: LayerNorm::load(w, "transformer.word_embeddings_layernorm", h, eps)?,
            h: (0..cfg.n_layer)
                .map(|i| Block::new(cfg, w, i, lora).map(Arc::new))
                .collect::<hetfed_core::Result<_>>()?,
            ln_f: LayerNorm::load(w, "transformer.ln_f", h, eps)?,
            slopes: Arc::new(slopes),
            cfg: cfg.clone(),
            recompute: None,
        })
    }
}

impl Model {
    /// Runs `ids` (`[batch, seq]`, no padding) and returns every block's activations
    /// ([`BlockActivations`]); the logits are not computed.
    pub fn capture(&self, ids: &Tensor) -> Result<Vec<BlockActivations>> {
        let mut x = self.embed_ids(ids)?;
        let mut out = Vec::with_capacity(self.h.len());
        for i in 0..self.h.len() {
            let (acts, next) = self.capture_block(i, &x)?;
            out.push(acts);
            x = next;
        }
        Ok(out)
    }

    /// The residual stream entering block 0 (`[batch, seq, hidden]`): embeddings and their
    /// layer norm. With [`Model::capture_block`] it walks the network one block at a time, so a
    /// caller can keep a single block's activations resident.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.word_embeddings_layernorm.forward(&embed(&self.word_embeddings, ids)?)
    }

    /// Block `i` on the residual stream `x` (`[batch, seq, hidden]`, no padding): its
    /// activations and the stream it writes (the next block's input).
    pub fn capture_block(&self, i: usize, x: &Tensor) -> Result<(BlockActivations, Tensor)> {
        let block = self.h.get(i).ok_or_else(|| {
            candle_core::Error::Msg(format!("capture_block: expected a block index below {}, found {i}", self.h.len()))
        })?;
        let (b, t, h) = x.dims3()?;
        let flat = |x: &Tensor, d: usize| x.reshape((b * t, d));
        let ln = block.input_layernorm.forward(x)?;
        let residual = if block.residual_post_ln { &ln } else { x };
        let (attn_out, [q, k, v, ctx]) = block.self_attention.capture(&ln, &self.slopes)?;
        let attn = (attn_out + residual)?;
        let ln2 = block.post_attention_layernorm.forward(&attn)?;
        let residual = if block.residual_post_ln { &ln2 } else { &attn };
        let pre = block.dense_h_to_4h.forward(&ln2)?;
        let hidden = ops::gelu_tanh(&pre)?;
        let next = (block.dense_4h_to_h.forward(&hidden)? + residual)?;
        let acts = BlockActivations {
            resid_in: flat(x, h)?,
            attn_in: flat(&ln, h)?,
            q,
            k,
            v,
            ctx,
            mlp_in: flat(&ln2, h)?,
            mlp_pre: flat(&pre, 4 * h)?,
            mlp_hidden: flat(&hidden, 4 * h)?,
            resid_out: flat(&next, h)?,
        };
        Ok((acts, next))
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The final hidden states `[batch, seq, hidden]` (after `ln_f`): what the tied LM head reads.
    fn hidden_states(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        left_pad: Option<&[usize]>,
    ) -> Result<Tensor> {
        // ALiBi and the causal mask live in the fused attention softmax (ops::causal_softmax).
        let mut x = embed(&self.word_embeddings, ids)?;
        x = self.word_embeddings_layernorm.forward(&x)?;
        for (idx, block) in self.h.iter().enumerate() {
            x = match &self.recompute {
                Some(rc) if cache.is_none() && left_pad.is_none() => {
                    let (b, slopes) = (block.clone(), self.slopes.clone());
                    rc.block(&x, block.trainable(), Arc::new(move |x| b.forward(x, &slopes, None, None)))?
                }
                _ => block.forward(&x, &self.slopes, left_pad, cache.as_deref_mut().map(|c| (c, idx)))?,
            };
        }
        self.ln_f.forward(&x)
    }
}

impl CausalLm for Model {
    fn forward_padded(&self, ids: &Tensor, cache: Option<&mut KvCache>, left_pad: Option<&[usize]>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.hidden_states(ids, cache, left_pad)?;
        let logits = ops::linear(&x.reshape((b * t, self.cfg.hidden_size))?, &self.word_embeddings, None)?;
        logits.reshape((b, t, self.cfg.vocab_size))
    }
    fn target_logprobs(&self, ids: &Tensor, targets: &[u32]) -> Result<Tensor> {
        fused_target_logprobs(&self.hidden_states(ids, None, None)?, &self.word_embeddings, targets)
    }
    fn n_layers(&self) -> usize {
        self.cfg.n_layer
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_reproduces_the_forward_pass() {
        let cfg = Config {
            vocab_size: 50,
            hidden_size: 16,
            n_layer: 2,
            n_head: 4,
            layer_norm_epsilon: 1e-5,
            apply_residual_connection_post_layernorm: false,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        };
        let w = cfg.random_weights(3).unwrap();
        let m = Model::new(&cfg, &Weights { map: &w, source: "test" }, None).unwrap();
        let ids = Tensor::new(&[[1u32, 7, 3, 9, 2], [4, 4, 8, 0, 1]], &candle_core::Device::Cpu).unwrap();
        let acts = m.capture(&ids).unwrap();
        assert_eq!(acts.len(), 2);
        assert_eq!(acts[0].mlp_hidden.dims(), &[10, 64]);
        assert_eq!(acts[1].q.dims(), &[10, 16]);
        // The last block's output through ln_f and the tied head gives the model's logits.
        let x = m.ln_f.forward(&acts[1].resid_out).unwrap();
        let logits = ops::linear(&x, &m.word_embeddings, None).unwrap();
        let want = m.forward(&ids, None).unwrap().reshape((10, 50)).unwrap();
        let diff = (logits - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
        // Block 1 reads what block 0 wrote.
        let d = (&acts[0].resid_out - &acts[1].resid_in)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }

    #[test]
    fn alibi_slopes_match_bloom_for_powers_of_two_and_not() {
        // Values from BLOOM's build_alibi_tensor.
        let s8 = alibi_slopes(8);
        let want8 = [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625];
        for (a, b) in s8.iter().zip(want8) {
            assert!((a - b).abs() < 1e-7);
        }
        let s6 = alibi_slopes(6);
        // closest power of two 4: base 2^-2 → 0.25, 0.0625, 0.015625, 0.00390625; extra base 2^-1 → 0.5, 0.125
        let want6 = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125];
        for (a, b) in s6.iter().zip(want6) {
            assert!((a - b).abs() < 1e-7, "{s6:?}");
        }
        assert_eq!(alibi_slopes(3).len(), 3);
    }
}
