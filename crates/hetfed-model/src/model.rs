//! What every architecture shares: the weights a model is built from, the KV cache, causal
//! masks, embeddings, and the `CausalLm` interface the rest of hetfed uses.

use candle_core::{Result, Tensor};

use hetfed_core::TensorMap;

use crate::ops;

/// A causal decoder LM: token ids in, next-token logits out.
pub trait CausalLm: Send + Sync {
    /// `ids`: `[batch, seq]` u32. Returns logits `[batch, seq, vocab]` in f32. With a cache, the
    /// ids continue the cached sequence and the cache is extended.
    ///
    /// Batches of different lengths are right-padded: the causal mask already keeps every real
    /// token from seeing the padding after it, so positions and outputs of real tokens are exact.
    fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.forward_padded(ids, cache, None)
    }
    /// Like [`CausalLm::forward`] for a left-padded batch: row `b` starts with `left_pad[b]`
    /// padding tokens, which no token attends to and which do not count as positions. (What
    /// batched generation uses; the padding rows' own outputs are meaningless.)
    fn forward_padded(&self, ids: &Tensor, cache: Option<&mut KvCache>, left_pad: Option<&[usize]>) -> Result<Tensor>;
    /// Teacher-forced log-probs of given next tokens: for `ids: [batch, seq]` (right-padded,
    /// `seq >= 2`) and `targets` of `batch·(seq - 1)` ids in row-major order, returns
    /// `[batch, seq - 1]` with `out[b, j] = log_softmax(logits[b, j])[targets[b·(seq-1) + j]]`,
    /// the log-prob of the token after position `j` (normally `ids[b, j + 1]`; callers put any
    /// valid id at padded or masked positions), differentiable.
    ///
    /// The default computes the full logits ([`CausalLm::forward`] + [`ops::token_logprobs`]);
    /// BLOOM and Llama override it with [`ops::linear_token_logprobs`], which never holds more
    /// than a chunk of them: what training and scoring call.
    fn target_logprobs(&self, ids: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        check_target_len(t)?;
        let logits = self.forward(ids, None)?.narrow(1, 0, t - 1)?;
        ops::token_logprobs(&logits, targets)
    }
    fn n_layers(&self) -> usize;
    fn vocab_size(&self) -> usize;
}

/// Next-token targets need sequences of at least 2 tokens.
fn check_target_len(t: usize) -> Result<()> {
    if t < 2 {
        candle_core::bail!("target log-probs need sequences of at least 2 tokens, found {t}");
    }
    Ok(())
}

/// [`CausalLm::target_logprobs`] of a model whose final hidden states `[batch, seq, h]` (after
/// the last norm) feed the LM head `head: [vocab, h]`: the fused, chunked head and log-prob.
pub(crate) fn fused_target_logprobs(hidden: &Tensor, head: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    check_target_len(t)?;
    let x = hidden.narrow(1, 0, t - 1)?.reshape((b * (t - 1), h))?;
    ops::linear_token_logprobs(&x, head, targets)?.reshape((b, t - 1))
}

/// A model scored through its full logits: every method but [`CausalLm::target_logprobs`] is
/// the wrapped model's, and that one is the trait's default (`forward` + `token_logprobs`).
/// What the fused path is tested and measured against (`crates/hetfed-train/examples/head_memory.rs`).
pub struct Unfused<'a>(pub &'a dyn CausalLm);

impl CausalLm for Unfused<'_> {
    fn forward_padded(&self, ids: &Tensor, cache: Option<&mut KvCache>, left_pad: Option<&[usize]>) -> Result<Tensor> {
        self.0.forward_padded(ids, cache, left_pad)
    }
    fn n_layers(&self) -> usize {
        self.0.n_layers()
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
}

/// Named weights a model is built from, with the directory they came from for error messages.
/// Tensors may be plain (inference, LoRA: nothing tracked) or `Var`-backed (full fine-tuning).
pub struct Weights<'a> {
    pub map: &'a TensorMap,
    pub source: &'a str,
}

impl Weights<'_> {
    /// The tensor `name`, checked against the shape the config implies.
    pub fn get(&self, name: &str, shape: &[usize]) -> hetfed_core::Result<Tensor> {
        let t = self.map.get(name).ok_or_else(|| {
            hetfed_core::Error::msg(format!("{}: missing tensor `{name}` (expected shape {shape:?})", self.source))
        })?;
        if t.dims() != shape {
            return Err(hetfed_core::Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
                where_: Some(self.source.to_string()),
            });
        }
        Ok(t.clone())
    }
}

/// Keys and values of every layer for incremental decoding.
#[derive(Default, Clone)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `[batch, kv_heads, past, head_dim]`.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![None; n_layers] }
    }

    /// Number of positions already cached.
    pub fn past_len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }

    /// Appends this step's keys/values to layer `idx` and returns the full ones.
    pub fn append(&mut self, idx: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= idx {
            self.layers.resize(idx + 1, None);
        }
        let (k, v) = match self.layers[idx].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[idx] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}

/// Embedding lookup `[b, t] -> [b, t, d]` in f32 (differentiable w.r.t. an f32 table). A frozen
/// half-precision table stays as it is: only the selected rows are widened.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let d = table.dim(1)?;
    table.index_select(&ids.flatten_all()?, 0)?.to_dtype(candle_core::DType::F32)?.reshape((b, t, d))
}

/// Causal attention `softmax(q·kᵀ·scale [+ ALiBi])·v` for `q: [b, h, t, d]` and
/// `k, v: [b, h, past + t, d]`; query `i` sees keys `0..=past + i`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    slopes: Option<&[f32]>,
    left_pad: Option<&[usize]>,
) -> Result<Tensor> {
    let past = k.dim(2)? - q.dim(2)?;
    let scores = q.matmul(&k.t()?)?;
    let probs = crate::ops::causal_softmax(&scores, scale, slopes, past, left_pad)?;
    probs.matmul(&v.contiguous()?)
}
