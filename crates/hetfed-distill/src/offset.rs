//! Logit-offset transfer (proxy-tuning, Liu et al. 2401.08565; federated: FedPT, 2410.00362).
//!
//! A client's fine-tuning is carried to the large model at the level of outputs, not weights:
//!
//! `log p(x) = log_softmax( log p_L(x) + Σ_i w_i·(log p_{S_i+τ_i}(x) − log p_{S_i}(x)) )`
//!
//! where `S_i` is client `i`'s small base, `τ_i` its task vector and `w_i` its weight. The small
//! and large models must share a tokenizer (the same vocabulary ids). [`OffsetLm`] is that
//! distribution as one [`CausalLm`] (its "logits" are the renormalised log-probabilities), so it
//! can be evaluated, scored and sampled from like any model (offset *serving*), and its
//! next-token distributions are distillation targets for the large model's own weights (offset
//! *distillation*: [`crate::ensemble_targets`] with the offset model as the single teacher).

use candle_core::{Tensor, D};
use hetfed_core::{Error, Result};
use hetfed_model::{CausalLm, KvCache};

/// `x − logsumexp(x)` over the last dimension (no gradient needed: teachers only).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let z = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// The large model plus weighted logit offsets of tuned small models (see the module docs).
///
/// Small bases are held once however many tuned models share them: the base's log-probs are
/// subtracted with the summed weight of its tuned models.
pub struct OffsetLm {
    large: Box<dyn CausalLm>,
    bases: Vec<Box<dyn CausalLm>>,
    /// `(index into bases, tuned model, weight)`.
    tuned: Vec<(usize, Box<dyn CausalLm>, f64)>,
    vocab: usize,
}

impl OffsetLm {
    /// `bases`: the distinct small base models; `tuned`: each offset's base index, tuned model
    /// and weight `w_i` (finite; may be negative to subtract a task). Every model must have the
    /// large model's vocabulary size.
    pub fn new(
        large: Box<dyn CausalLm>,
        bases: Vec<Box<dyn CausalLm>>,
        tuned: Vec<(usize, Box<dyn CausalLm>, f64)>,
    ) -> Result<Self> {
        let vocab = large.vocab_size();
        for (i, b) in bases.iter().enumerate() {
            if b.vocab_size() != vocab {
                return Err(Error::msg(format!(
                    "logit offsets need one vocabulary: the large model has {vocab} tokens, small base {i} has {}",
                    b.vocab_size()
                )));
            }
        }
        for (k, (b, t, w)) in tuned.iter().enumerate() {
            if *b >= bases.len() {
                return Err(Error::msg(format!("offset {k}: expected a base index below {}, found {b}", bases.len())));
            }
            if t.vocab_size() != vocab {
                return Err(Error::msg(format!(
                    "logit offsets need one vocabulary: the large model has {vocab} tokens, tuned model {k} has {}",
                    t.vocab_size()
                )));
            }
            if !w.is_finite() {
                return Err(Error::msg(format!("offset {k}: expected a finite weight, found {w}")));
            }
        }
        Ok(Self { large, bases, tuned, vocab })
    }

    /// Number of offsets (tuned models).
    pub fn n_offsets(&self) -> usize {
        self.tuned.len()
    }

    fn models(&self) -> impl Iterator<Item = &dyn CausalLm> {
        std::iter::once(self.large.as_ref())
            .chain(self.bases.iter().map(|b| b.as_ref()))
            .chain(self.tuned.iter().map(|(_, t, _)| t.as_ref()))
    }
}

impl CausalLm for OffsetLm {
    fn forward_padded(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        left_pad: Option<&[usize]>,
    ) -> candle_core::Result<Tensor> {
        // Every model's output, each with its own slice of the cache's layers.
        let mut outs = Vec::with_capacity(1 + self.bases.len() + self.tuned.len());
        match cache {
            None => {
                for m in self.models() {
                    outs.push(m.forward_padded(ids, None, left_pad)?);
                }
            }
            Some(cache) => {
                if cache.layers.len() < self.n_layers() {
                    cache.layers.resize(self.n_layers(), None);
                }
                let mut start = 0;
                for m in self.models() {
                    let n = m.n_layers();
                    let mut sub = KvCache { layers: cache.layers[start..start + n].to_vec() };
                    outs.push(m.forward_padded(ids, Some(&mut sub), left_pad)?);
                    for (slot, l) in cache.layers[start..start + n].iter_mut().zip(sub.layers) {
                        *slot = l;
                    }
                    start += n;
                }
            }
        }
        let ls = |t: &Tensor| log_softmax(t).map_err(|e| candle_core::Error::Msg(e.to_string()));
        let mut acc = ls(&outs[0])?;
        let nb = self.bases.len();
        let mut base_weight = vec![0f64; nb];
        for (k, (b, _, w)) in self.tuned.iter().enumerate() {
            base_weight[*b] += w;
            acc = (acc + (ls(&outs[1 + nb + k])? * *w)?)?;
        }
        for (b, w) in base_weight.iter().enumerate() {
            if *w != 0.0 {
                acc = (acc - (ls(&outs[1 + b])? * *w)?)?;
            }
        }
        ls(&acc)
    }

    /// The layers of every model together (the cache holds each model's slice in turn).
    fn n_layers(&self) -> usize {
        self.models().map(|m| m.n_layers()).sum()
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
