//! Llama (`LlamaForCausalLM`): RMSNorm, rotary position embeddings (HF `rotate_half` layout),
//! grouped-query attention, SwiGLU MLP, tied or untied LM head.

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
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers 4.x writes `rope_theta` at the top level; 5.x writes
    /// `rope_parameters: {rope_theta, rope_type}`. Either is accepted.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!("expected hidden_act \"silu\", found {:?}", self.hidden_act));
        }
        if let Some(rt) = self.rope_parameters.as_ref().and_then(|p| p.get("rope_type")).and_then(|v| v.as_str()) {
            if rt != "default" {
                return Err(format!("expected rope_type \"default\", found {rt:?}"));
            }
        }
        if let Some(rs) = &self.rope_scaling {
            if !rs.is_null() {
                return Err(format!("rope_scaling is not supported yet, found {rs}"));
            }
        }
        let kv = self.kv_heads();
        if self.num_attention_heads == 0 || kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    pub fn theta(&self) -> f64 {
        self.rope_theta.or_else(|| self.rope_parameters.as_ref()?.get("rope_theta")?.as_f64()).unwrap_or(10000.0)
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Every parameter with its shape, in canonical names.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let cfg = self;
        let (h, hd, nh, nkv, i) =
            (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads(), cfg.intermediate_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            for (n, o, inp) in
                [("q_proj", nh * hd, h), ("k_proj", nkv * hd, h), ("v_proj", nkv * hd, h), ("o_proj", h, nh * hd)]
            {
                out.push((format!("{p}.self_attn.{n}.weight"), vec![o, inp]));
                if cfg.attention_bias {
                    out.push((format!("{p}.self_attn.{n}.bias"), vec![o]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for (n, o, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                out.push((format!("{p}.mlp.{n}.weight"), vec![o, inp]));
                if cfg.mlp_bias {
                    out.push((format!("{p}.mlp.{n}.bias"), vec![o]));
                }
            }
        }
        out.push(("model.norm.weight".into(), vec![h]));
        if !cfg.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
        }
        out
    }
}

impl crate::checkpoint::Architecture for Config {
    fn validate(&self) -> std::result::Result<(), String> {
        Config::validate(self)
    }
    fn sizes(&self) -> (usize, Vec<(&'static str, usize)>) {
        (
            self.num_hidden_layers,
            vec![
                ("vocab_size", self.vocab_size),
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads", self.num_attention_heads),
                ("num_key_value_heads", self.num_key_value_heads.unwrap_or(0)),
                ("head_dim", self.head_dim.unwrap_or(0)),
            ],
        )
    }
    fn canonicalize(&self, raw: TensorMap) -> TensorMap {
        canonicalize(raw, self)
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
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    }
    fn config_string(&self) -> String {
        serde_json::to_string(self).expect("configs serialise")
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn max_positions_key(&self) -> &'static str {
        "max_position_embeddings"
    }
    fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id.as_ref().and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
            serde_json::Value::Array(a) => a.first().and_then(serde_json::Value::as_u64).map(|x| x as u32),
            _ => None,
        })
    }
}

/// Canonical names: a tied checkpoint that stores only `lm_head.weight` (as some exports do)
/// gets it as `model.embed_tokens.weight`; a tied `lm_head.weight` beside the embedding is dropped.
pub fn canonicalize(mut raw: TensorMap, cfg: &Config) -> TensorMap {
    if cfg.tie_word_embeddings {
        if let Some(head) = raw.remove("lm_head.weight") {
            raw.entry("model.embed_tokens.weight".into()).or_insert(head);
        }
    }
    raw
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    eps: f64,
}

impl Layer {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        left_pad: Option<&[usize]>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let hn = ops::rms_norm(x, &self.input_layernorm, self.eps)?;
        let x = (x + self.self_attn.forward(&hn, cos, sin, left_pad, cache)?)?;
        let hn = ops::rms_norm(&x, &self.post_attention_layernorm, self.eps)?;
        let gate = self.mlp.gate_proj.forward(&hn)?.silu()?;
        let up = self.mlp.up_proj.forward(&hn)?;
        x + self.mlp.down_proj.forward(&(gate * up)?)?
    }

    /// The tensors of this layer that training tracks (what a recomputation differentiates).
    fn trainable(&self) -> Vec<Tensor> {
        let a = &self.self_attn;
        let linears =
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &self.mlp.gate_proj, &self.mlp.up_proj, &self.mlp.down_proj];
        let norms =
            [&self.input_layernorm, &self.post_attention_layernorm].into_iter().filter(|t| t.track_op()).cloned();
        linears.into_iter().flat_map(Linear::trainable).chain(norms).collect()
    }
}

pub struct Model {
    embed_tokens: Tensor,
    layers: Vec<Arc<Layer>>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Vec<f32>,
    cfg: Config,
    /// Layers with trainable tensors are recomputed in the backward pass (training only).
    recompute: Option<Recompute>,
}

/// `x·cos + rotate_half(x)·sin`, `rotate_half(x) = cat(-x₂, x₁)` over the last dim.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(3)?;
    let x1 = x.narrow(3, 0, d / 2)?;
    let x2 = x.narrow(3, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        lp: Option<&[usize]>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize| -> Result<Tensor> { y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous() };
        let q = rope(&heads(self.q_proj.forward(x)?, self.n_head)?, cos, sin)?;
        let mut k = rope(&heads(self.k_proj.forward(x)?, self.n_kv)?, cos, sin)?;
        let mut v = heads(self.v_proj.forward(x)?, self.n_kv)?;
        if let Some((c, idx)) = cache {
            (k, v) = c.append(idx, k, v)?;
        }
        let rep = self.n_head / self.n_kv;
        let (k, v) = if rep == 1 { (k, v) } else { (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?) };
        let ctx = attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), None, lp)?;
        self.o_proj.forward(&ctx.transpose(1, 2)?.reshape((b, t, self.n_head * hd))?)
    }
}

/// Query head `h` uses key/value head `h / rep`, as HF's `repeat_kv`.
fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    let (b, n, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, n, rep, s, d))?.reshape((b, n * rep, s, d))
}

impl Model {
    pub fn new(cfg: &Config, w: &Weights, lora: Option<&LoraSet>) -> hetfed_core::Result<Self> {
        cfg.validate().map_err(|m| hetfed_core::Error::msg(format!("{}: {m}", w.source)))?;
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_heads());
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head =
            if cfg.tie_word_embeddings { embed_tokens.clone() } else { w.get("lm_head.weight", &[cfg.vocab_size, h])? };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin =
                |n: &str, o: usize, inp: usize, bias: bool| Linear::load(w, &format!("{p}.{n}"), o, inp, bias, lora);
            layers.push(Arc::new(Layer {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn: Attention {
                    q_proj: lin("self_attn.q_proj", nh * hd, h, cfg.attention_bias)?,
                    k_proj: lin("self_attn.k_proj", nkv * hd, h, cfg.attention_bias)?,
                    v_proj: lin("self_attn.v_proj", nkv * hd, h, cfg.attention_bias)?,
                    o_proj: lin("self_attn.o_proj", h, nh * hd, cfg.attention_bias)?,
                    n_head: nh,
                    n_kv: nkv,
                    head_dim: hd,
                },
                post_attention_layernorm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate_proj: lin("mlp.gate_proj", cfg.intermediate_size, h, cfg.mlp_bias)?,
                    up_proj: lin("mlp.up_proj", cfg.intermediate_size, h, cfg.mlp_bias)?,
                    down_proj: lin("mlp.down_proj", h, cfg.intermediate_size, cfg.mlp_bias)?,
                },
                eps: cfg.rms_norm_eps,
            }));
        }
        let inv_freq = (0..hd / 2).map(|i| (1.0 / cfg.theta().powf((2 * i) as f64 / hd as f64)) as f32).collect();
        let norm = w.get("model.norm.weight", &[h])?;
        Ok(Self { embed_tokens, layers, norm, lm_head, inv_freq, cfg: cfg.clone(), recompute: None })
    }

    /// cos/sin tables for positions `past..past+t`: `[t, head_dim]`, or `[b, 1, t, head_dim]`
    /// with each row's positions shifted back by its left padding.
    fn rope_tables(
        &self,
        past: usize,
        t: usize,
        left_pad: Option<&[usize]>,
        dev: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let rows: Vec<usize> = left_pad.map_or_else(|| vec![0], <[usize]>::to_vec);
        let mut cos = Vec::with_capacity(rows.len() * t * half * 2);
        let mut sin = Vec::with_capacity(rows.len() * t * half * 2);
        for p in rows.iter().flat_map(|&lp| (past..past + t).map(move |p| p.saturating_sub(lp))) {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    // Computed in f32 like HF (position · inv_freq in float32).
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let shape: Vec<usize> = match left_pad {
            None => vec![t, 2 * half],
            Some(lp) => vec![lp.len(), 1, t, 2 * half],
        };
        Ok((Tensor::from_vec(cos, shape.clone(), dev)?, Tensor::from_vec(sin, shape, dev)?))
    }
}

impl Model {
    /// The final hidden states `[batch, seq, hidden]` (after `norm`): what the LM head reads.
    fn hidden_states(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        left_pad: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let dev = ids.device();
        let past = cache.as_ref().map(|c| c.past_len()).unwrap_or(0);
        let (cos, sin) = self.rope_tables(past, t, left_pad, dev)?;
        let mut x = embed(&self.embed_tokens, ids)?;
        for (idx, l) in self.layers.iter().enumerate() {
            x = match &self.recompute {
                Some(rc) if cache.is_none() && left_pad.is_none() => {
                    let (l, cos, sin) = (l.clone(), cos.clone(), sin.clone());
                    rc.block(&x, l.trainable(), Arc::new(move |x| l.forward(x, &cos, &sin, None, None)))?
                }
                _ => l.forward(&x, &cos, &sin, left_pad, cache.as_deref_mut().map(|c| (c, idx)))?,
            };
        }
        ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }
}

impl CausalLm for Model {
    fn forward_padded(&self, ids: &Tensor, cache: Option<&mut KvCache>, left_pad: Option<&[usize]>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let x = self.hidden_states(ids, cache, left_pad)?;
        let logits = ops::linear(&x.reshape((b * t, self.cfg.hidden_size))?, &self.lm_head, None)?;
        logits.reshape((b, t, self.cfg.vocab_size))
    }
    fn target_logprobs(&self, ids: &Tensor, targets: &[u32]) -> Result<Tensor> {
        fused_target_logprobs(&self.hidden_states(ids, None, None)?, &self.lm_head, targets)
    }
    fn n_layers(&self) -> usize {
        self.cfg.num_hidden_layers
    }
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}
