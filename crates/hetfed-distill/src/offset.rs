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
    /// `Some`: the weights are prior masses of a per-sequence posterior (see [`Posterior`]).
    posterior: Option<Posterior>,
}

/// Routing by the sequence itself, with no task label: each offset is an expert, and at every
/// position its weight is `λ·π_k`, where `π` is the posterior over the experts given the tokens
/// so far, each tuned small model being the likelihood of its expert relative to its base:
///
/// `π_k(t) ∝ m_k · Π_{s≤t} p_{S_k+τ_k}(x_s | x_<s) / p_{S_k}(x_s | x_<s)`, and the "no offset"
/// expert `π_0(t) ∝ m_0` (its ratio is 1).
///
/// `m_k` are the offsets' weights as given to [`OffsetLm::routed`], `m_0` is `base_mass`. The
/// posterior at position `t` uses the tokens up to `t` only, so the model stays causal: scoring,
/// sampling and cached generation see the same distribution. A prompt in a specialist's format
/// is routed to that specialist within a few tokens; text no specialist explains better than
/// its base keeps the large model's own distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Posterior {
    /// λ, the scale of the routed offset.
    pub lambda: f64,
    /// Prior mass of the "no offset" expert.
    pub base_mass: f64,
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
        Ok(Self { large, bases, tuned, vocab, posterior: None })
    }

    /// Routed by the sequence: the offsets' weights are their prior masses `m_k` (positive);
    /// see [`Posterior`].
    pub fn routed(
        large: Box<dyn CausalLm>,
        bases: Vec<Box<dyn CausalLm>>,
        tuned: Vec<(usize, Box<dyn CausalLm>, f64)>,
        posterior: Posterior,
    ) -> Result<Self> {
        let Posterior { lambda, base_mass } = posterior;
        if !(lambda.is_finite() && lambda > 0.0 && base_mass.is_finite() && base_mass > 0.0) {
            return Err(Error::msg(format!(
                "posterior routing: expected a positive λ and base mass, found {lambda} and {base_mass}"
            )));
        }
        if let Some(k) = tuned.iter().position(|(_, _, m)| *m <= 0.0) {
            return Err(Error::msg(format!(
                "posterior routing: expected a positive prior mass for every offset, found {} for offset {k}",
                tuned[k].2
            )));
        }
        Ok(Self { posterior: Some(posterior), ..Self::new(large, bases, tuned)? })
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
        let mut cache = cache;
        let past = cache.as_ref().map(|c| c.past_len()).unwrap_or(0);
        let state = match self.posterior {
            Some(_) => cache.as_ref().and_then(|c| c.layers.get(self.n_layers() - 1).cloned().flatten()),
            None => None,
        };
        // Every model's output, each with its own slice of the cache's layers.
        let mut outs = Vec::with_capacity(1 + self.bases.len() + self.tuned.len());
        match cache.as_deref_mut() {
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
        if let Some(p) = self.posterior {
            let bases: Vec<Tensor> = outs[1..1 + nb].iter().map(ls).collect::<candle_core::Result<_>>()?;
            let deltas: Vec<Tensor> = self
                .tuned
                .iter()
                .enumerate()
                .map(|(k, (b, _, _))| ls(&outs[1 + nb + k])? - &bases[*b])
                .collect::<candle_core::Result<_>>()?;
            let (routed, new_state) = route(p, &self.tuned, acc, &deltas, ids, state, past, left_pad)?;
            if let Some(c) = cache {
                let slot = self.n_layers() - 1;
                c.layers[slot] = Some(new_state);
            }
            return ls(&routed);
        }
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

    /// The layers of every model together (the cache holds each model's slice in turn), plus,
    /// routed by the sequence, one slot for the posterior's state.
    fn n_layers(&self) -> usize {
        self.models().map(|m| m.n_layers()).sum::<usize>() + usize::from(self.posterior.is_some())
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

/// [`Posterior`] routing of one forward pass: `large` (the large model's log-probs), each
/// offset's `deltas` (`log p_{S_k+τ_k} − log p_{S_k}`, `[b, t, V]`), the input `ids` after
/// `past` cached positions, and the state carried from the previous pass (`(R, Δ_last)`: each
/// row's cumulative log-ratio per offset `[b, K]` and the offsets' deltas at its last position
/// `[b, K, V]`). Returns the unnormalised routed log-probs and the new state.
#[allow(clippy::too_many_arguments)]
fn route(
    p: Posterior,
    tuned: &[(usize, Box<dyn CausalLm>, f64)],
    large: Tensor,
    deltas: &[Tensor],
    ids: &Tensor,
    state: Option<(Tensor, Tensor)>,
    past: usize,
    left_pad: Option<&[usize]>,
) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
    let (b, t) = ids.dims2()?;
    let k_n = deltas.len();
    let dev = ids.device();
    // r_k[b, s]: the log-ratio of token s (the ratio of the first token of the pass comes from
    // the previous pass's last position; the sequence's first real token has none).
    let mut ratios = Vec::with_capacity(k_n);
    for (k, d) in deltas.iter().enumerate() {
        let first = match &state {
            Some((_, last)) => last
                .narrow(1, k, 1)?
                .contiguous()?
                .gather(&ids.narrow(1, 0, 1)?.unsqueeze(2)?.contiguous()?, 2)?
                .squeeze(2)?,
            None => Tensor::zeros((b, 1), candle_core::DType::F32, dev)?,
        };
        let r = if t > 1 {
            let next = ids.narrow(1, 1, t - 1)?.unsqueeze(2)?.contiguous()?;
            let rest = d.narrow(1, 0, t - 1)?.contiguous()?.gather(&next, 2)?.squeeze(2)?;
            Tensor::cat(&[&first, &rest], 1)?
        } else {
            first
        };
        ratios.push(r);
    }
    // Left padding: no ratio at padding or at the first real token.
    let mask: Vec<f32> = (0..b)
        .flat_map(|row| {
            let pad = left_pad.map(|l| l[row]).unwrap_or(0);
            (0..t).map(move |s| if past + s > pad { 1.0 } else { 0.0 })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), dev)?;
    let r = Tensor::stack(&ratios, 2)?.broadcast_mul(&mask.unsqueeze(2)?)?; // [b, t, K]
    let r0 = match &state {
        Some((cum, _)) => cum.unsqueeze(1)?,
        None => Tensor::zeros((b, 1, k_n), candle_core::DType::F32, dev)?,
    };
    let cum = r.cumsum(1)?.broadcast_add(&r0)?; // [b, t, K]
    let log_prior: Vec<f32> =
        std::iter::once(p.base_mass.ln() as f32).chain(tuned.iter().map(|(_, _, m)| m.ln() as f32)).collect();
    let log_prior = Tensor::from_vec(log_prior, (1, 1, k_n + 1), dev)?;
    let scores =
        Tensor::cat(&[&Tensor::zeros((b, t, 1), candle_core::DType::F32, dev)?, &cum], 2)?.broadcast_add(&log_prior)?;
    let pi = log_softmax(&scores).map_err(|e| candle_core::Error::Msg(e.to_string()))?.exp()?; // [b, t, K+1]
    let mut acc = large;
    for (k, d) in deltas.iter().enumerate() {
        let w = (pi.narrow(2, k + 1, 1)? * p.lambda)?;
        acc = (acc + d.broadcast_mul(&w)?)?;
    }
    let last_cum = cum.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
    let last = Tensor::stack(
        &deltas.iter().map(|d| d.narrow(1, t - 1, 1)?.squeeze(1)).collect::<candle_core::Result<Vec<_>>>()?,
        1,
    )?;
    Ok((acc, (last_cum, last)))
}
