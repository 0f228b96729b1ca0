//! Calibration: token sequences without client data, and the activations both base models
//! produce on them.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use hetfed_core::{Error, Result};
use hetfed_model::generate::{generate_batch, SamplingConfig};
use hetfed_model::{bloom, Arch, CausalLm, Checkpoint, Weights};
use serde::{Deserialize, Serialize};

/// A space a BLOOM block's linear layers read or write (see the crate docs' table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// The residual stream entering the block (block 0's: the embedding space).
    ResidIn,
    AttnIn,
    Q,
    K,
    V,
    Ctx,
    MlpIn,
    MlpPre,
    MlpHidden,
    /// The residual stream leaving the block: what `dense` and `dense_4h_to_h` write into.
    Resid,
}

impl Space {
    pub const ALL: [Space; 10] = [
        Space::ResidIn,
        Space::AttnIn,
        Space::Q,
        Space::K,
        Space::V,
        Space::Ctx,
        Space::MlpIn,
        Space::MlpPre,
        Space::MlpHidden,
        Space::Resid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Space::ResidIn => "resid_in",
            Space::AttnIn => "attn_in",
            Space::Q => "q",
            Space::K => "k",
            Space::V => "v",
            Space::Ctx => "ctx",
            Space::MlpIn => "mlp_in",
            Space::MlpPre => "mlp_pre",
            Space::MlpHidden => "mlp_hidden",
            Space::Resid => "resid",
        }
    }
}

/// Per block, each [`Space`]'s activations stacked over every calibration token: `[n_tokens, d]`.
pub type Activations = Vec<BTreeMap<Space, Tensor>>;

/// The BLOOM network of a checkpoint, or an error naming what is supported.
pub(crate) fn bloom_model(ck: &Checkpoint) -> Result<bloom::Model> {
    match &ck.arch {
        Arch::Bloom(cfg) => bloom::Model::new(cfg, &Weights { map: &ck.weights, source: &ck.source() }, None),
        other => {
            Err(Error::msg(format!("{}: projection supports BLOOM models, found {}", ck.source(), other.model_type())))
        }
    }
}

/// Checks calibration sequences for `model`: at least one, all of one non-zero length, every
/// id in the vocabulary. Returns the length.
pub(crate) fn check_seqs(model: &bloom::Model, source: &str, seqs: &[Vec<u32>]) -> Result<usize> {
    let len = seqs.first().map(Vec::len).unwrap_or(0);
    if len == 0 || seqs.iter().any(|s| s.len() != len) {
        return Err(Error::msg(format!(
            "calibration: expected at least one sequence, all of one non-zero length, found {} sequences of lengths {:?}",
            seqs.len(),
            seqs.iter().map(Vec::len).collect::<std::collections::BTreeSet<_>>()
        )));
    }
    let vocab = model.vocab_size();
    if let Some(bad) = seqs.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(Error::msg(format!(
            "calibration: expected token ids below {vocab} (the vocabulary of {source}), found {bad}"
        )));
    }
    Ok(len)
}

/// `seqs` (checked, all of length `len`) as one `[n, len]` id tensor.
pub(crate) fn id_batch(seqs: &[Vec<u32>], len: usize) -> Result<Tensor> {
    let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (seqs.len(), len), &Device::Cpu)?)
}

/// A block's activations by [`Space`], in [`Space::ALL`]'s order.
pub(crate) fn by_space(a: bloom::BlockActivations) -> [(Space, Tensor); 10] {
    [
        (Space::ResidIn, a.resid_in),
        (Space::AttnIn, a.attn_in),
        (Space::Q, a.q),
        (Space::K, a.k),
        (Space::V, a.v),
        (Space::Ctx, a.ctx),
        (Space::MlpIn, a.mlp_in),
        (Space::MlpPre, a.mlp_pre),
        (Space::MlpHidden, a.mlp_hidden),
        (Space::Resid, a.resid_out),
    ]
}

/// Runs `seqs` (all the same length, no padding) through `ck`'s base model in batches of
/// `batch` and returns every block's activations, all held at once: memory grows with
/// blocks × tokens × widths. [`crate::PairMaps::fit`] walks the blocks one at a time instead.
pub fn capture(ck: &Checkpoint, seqs: &[Vec<u32>], batch: usize) -> Result<Activations> {
    let model = bloom_model(ck)?;
    let len = check_seqs(&model, &ck.source(), seqs)?;
    let mut parts: Vec<BTreeMap<Space, Vec<Tensor>>> = Vec::new();
    for chunk in seqs.chunks(batch.max(1)) {
        let acts = model.capture(&id_batch(chunk, len)?)?;
        if parts.is_empty() {
            parts = vec![BTreeMap::new(); acts.len()];
        }
        for (layer, a) in parts.iter_mut().zip(acts) {
            for (space, t) in by_space(a) {
                layer.entry(space).or_default().push(t);
            }
        }
    }
    parts
        .into_iter()
        .map(|layer| layer.into_iter().map(|(s, ts)| Ok((s, Tensor::cat(&ts, 0)?))).collect::<Result<_>>())
        .collect()
}

/// `n` sequences of `len` tokens sampled from `model` itself (temperature 1, top-k 50) after
/// `start` (e.g. the end-of-text token): calibration text the server owns by construction.
pub fn sample_sequences(model: &dyn CausalLm, start: u32, n: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if n == 0 || len < 2 {
        return Err(Error::msg(format!(
            "calibration: expected at least 1 sequence of at least 2 tokens, found {n} of {len}"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for (k, chunk) in (0..n).collect::<Vec<_>>().chunks(16).enumerate() {
        let cfg = SamplingConfig {
            max_new_tokens: len - 1,
            temperature: 1.0,
            top_k: Some(50),
            top_p: None,
            seed: seed.wrapping_add(k as u64),
        };
        let prompts = vec![vec![start]; chunk.len()];
        for cont in generate_batch(model, &prompts, &cfg, None)? {
            let mut s = vec![start];
            s.extend(cont);
            s.truncate(len);
            out.push(s);
        }
    }
    Ok(out)
}

/// `n` windows of `len` tokens from `texts` tokenised and joined with `sep` (the server's own
/// text, e.g. its pretraining corpus). Errors when the texts hold fewer than one window.
pub fn text_sequences(
    tok: &hetfed_model::tokenizers::Tokenizer,
    texts: &[String],
    sep: u32,
    n: usize,
    len: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut stream = Vec::new();
    for t in texts {
        let enc = tok.encode(t.as_str(), false).map_err(|e| Error::msg(format!("calibration: tokenising: {e}")))?;
        stream.extend_from_slice(enc.get_ids());
        stream.push(sep);
        if stream.len() >= n * len {
            break;
        }
    }
    let out: Vec<Vec<u32>> = stream.chunks_exact(len.max(1)).take(n).map(<[u32]>::to_vec).collect();
    if out.is_empty() {
        return Err(Error::msg(format!(
            "calibration: expected text for at least one window of {len} tokens, found {} tokens",
            stream.len()
        )));
    }
    Ok(out)
}
