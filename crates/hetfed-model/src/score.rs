//! Log-likelihood scoring: per-token log-probs of sequences, and the log-likelihood of a
//! continuation given a prompt (what evaluation uses for label words and COPA alternatives).

use candle_core::{Device, Result, Tensor};

use crate::model::CausalLm;

/// `out[s][i] = log P(seqs[s][i+1] | seqs[s][..=i])` for each sequence, computed in batches of
/// `batch_size` right-padded sequences.
///
/// Sequences are batched by length (longest first) so a batch pads to about its own length, not to
/// the longest sequence overall; results come back in input order.
pub fn sequence_logprobs(model: &dyn CausalLm, seqs: &[Vec<u32>], batch_size: usize) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
    let mut out = vec![Vec::new(); seqs.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].clone()).collect();
        for (&i, lp) in chunk.iter().zip(batch_logprobs(model, &batch)?) {
            out[i] = lp;
        }
    }
    Ok(out)
}

fn batch_logprobs(model: &dyn CausalLm, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    if t < 2 {
        return Ok(seqs.iter().map(|_| Vec::new()).collect());
    }
    let b = seqs.len();
    // Right padding with token 0: causal attention keeps real tokens blind to it.
    let mut ids = vec![0u32; b * t];
    let mut targets = vec![0u32; b * (t - 1)];
    for (i, s) in seqs.iter().enumerate() {
        ids[i * t..i * t + s.len()].copy_from_slice(s);
        for j in 1..s.len() {
            targets[i * (t - 1) + j - 1] = s[j];
        }
    }
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    // The fused head: the `[b, t, vocab]` logits are never held whole.
    let lp = model.target_logprobs(&ids, &targets)?.to_vec2::<f32>()?;
    Ok(seqs
        .iter()
        .zip(lp)
        .map(|(s, mut row)| {
            row.truncate(s.len().saturating_sub(1));
            row
        })
        .collect())
}

/// Log-likelihood of a continuation after a prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContinuationScore {
    /// Sum of the continuation tokens' log-probs.
    pub sum: f32,
    /// Number of continuation tokens.
    pub n_tokens: usize,
}

impl ContinuationScore {
    /// Length-normalised score (mean log-prob per token).
    pub fn mean(&self) -> f32 {
        if self.n_tokens == 0 {
            f32::NEG_INFINITY
        } else {
            self.sum / self.n_tokens as f32
        }
    }
}

/// Scores each `(prompt, continuation)` pair: the sum of `log P(c_k | prompt, c_<k)`.
pub fn continuation_logprobs(
    model: &dyn CausalLm,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<ContinuationScore>> {
    Ok(continuation_token_logprobs(model, pairs, batch_size)?
        .into_iter()
        .map(|lp| ContinuationScore { sum: lp.iter().sum(), n_tokens: lp.len() })
        .collect())
}

/// Each `(prompt, continuation)` pair's per-token `log P(c_k | prompt, c_<k)` (the terms
/// [`continuation_logprobs`] sums, in order).
pub fn continuation_token_logprobs(
    model: &dyn CausalLm,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let seqs: Vec<Vec<u32>> = pairs.iter().map(|(p, c)| p.iter().chain(c).copied().collect()).collect();
    let lps = sequence_logprobs(model, &seqs, batch_size)?;
    Ok(pairs
        .iter()
        .zip(lps)
        .map(|((p, c), lp)| {
            // Token k of the sequence is predicted at index k-1; a prompt of length 0 cannot
            // score its first token.
            let start = p.len().max(1) - 1;
            let n = c.len().min(lp.len().saturating_sub(start));
            lp[start..start + n].to_vec()
        })
        .collect())
}
