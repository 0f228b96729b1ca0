//! KV-cached incremental decoding: greedy, or sampling with temperature, top-k and top-p under
//! a seed.

use candle_core::{Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model::{CausalLm, KvCache};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 32, temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// Continues `prompt` by up to `max_new_tokens` tokens, stopping after `eos`. Returns only the
/// new tokens. The prompt is processed once; every later step feeds one token through the cache.
pub fn generate(model: &dyn CausalLm, prompt: &[u32], cfg: &SamplingConfig, eos: Option<u32>) -> Result<Vec<u32>> {
    generate_with(model, prompt, cfg, eos, |_| {})
}

/// Like [`generate`], calling `on_token` with each new token as it is produced.
pub fn generate_with(
    model: &dyn CausalLm,
    prompt: &[u32],
    cfg: &SamplingConfig,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("generation needs a prompt of at least one token, found an empty one");
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new(model.n_layers());
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    let mut input = prompt.to_vec();
    for _ in 0..cfg.max_new_tokens {
        let ids = Tensor::from_vec(input.clone(), (1, input.len()), &Device::Cpu)?;
        let logits = model.forward(&ids, Some(&mut cache))?;
        let last = logits.narrow(1, input.len() - 1, 1)?.flatten_all()?.to_vec1::<f32>()?;
        let next = pick(&last, cfg, &mut rng);
        out.push(next);
        on_token(next);
        if Some(next) == eos {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Continues several prompts at once: left-padded into one batch (the padding is masked and not
/// counted as positions), prefilled once, then one token per row per step through the KV cache.
/// Greedy decoding gives exactly what [`generate`] gives for each prompt alone. A row stops after
/// `eos`; the batch stops when every row has. Returns each row's new tokens.
pub fn generate_batch(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
    eos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    if prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("generation needs prompts of at least one token, found an empty one");
    }
    let b = prompts.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let left_pad: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
    let mut ids = Vec::with_capacity(b * t);
    for p in prompts {
        // Padding id 0 is never attended to, so its value does not matter.
        ids.extend(std::iter::repeat_n(0u32, t - p.len()));
        ids.extend_from_slice(p);
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cache = KvCache::new(model.n_layers());
    let mut out = vec![Vec::with_capacity(cfg.max_new_tokens); b];
    let mut done = vec![false; b];
    let mut input = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    for _ in 0..cfg.max_new_tokens {
        let step = input.dim(1)?;
        let logits = model.forward_padded(&input, Some(&mut cache), Some(&left_pad))?;
        let last = logits.narrow(1, step - 1, 1)?.squeeze(1)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for (row, l) in last.iter().enumerate() {
            let tok = if done[row] { eos.unwrap_or(0) } else { pick(l, cfg, &mut rng) };
            if !done[row] {
                out[row].push(tok);
                done[row] = Some(tok) == eos;
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), &Device::Cpu)?;
    }
    Ok(out)
}

/// Chooses the next token from logits: argmax when greedy, else a draw from the tempered,
/// top-k / top-p filtered distribution.
pub fn pick(logits: &[f32], cfg: &SamplingConfig, rng: &mut StdRng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k {
        idx.truncate(k.max(1));
    }
    let t = cfg.temperature as f32;
    let m = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - m) / t).exp()).collect();
    let z: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if let Some(p) = cfg.top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc as f64 >= p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut u = rng.random::<f32>() * total;
    for (q, &i) in probs.iter().zip(&idx) {
        if u < *q {
            return i as u32;
        }
        u -= q;
    }
    *idx.last().expect("at least one candidate") as u32
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Beam search (deterministic): keeps the `num_beams` best partial continuations by total
/// log-probability; a beam that emits `eos` is finished. Finished and still-open beams are ranked by
/// `sum_logprob / length^length_penalty` (Hugging Face's convention, with `length_penalty` 1.0 the
/// mean log-prob per token). The beams advance together as one batch through a shared KV cache
/// whose rows are reordered after each step. Returns the best continuation's new tokens.
pub fn beam_search(
    model: &dyn CausalLm,
    prompt: &[u32],
    num_beams: usize,
    max_new_tokens: usize,
    length_penalty: f64,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        candle_core::bail!("generation needs a prompt of at least one token, found an empty one");
    }
    let k = num_beams.max(1);
    let mut cache = KvCache::new(model.n_layers());
    let ids = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &Device::Cpu)?;
    let logits = model.forward(&ids, Some(&mut cache))?;
    let mut last: Vec<Vec<f32>> = vec![logits.narrow(1, prompt.len() - 1, 1)?.flatten_all()?.to_vec1::<f32>()?];
    // Open beams: (tokens, sum of log-probs); initially one empty beam.
    let mut beams: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    let mut finished: Vec<(Vec<u32>, f64)> = Vec::new();
    let rank = |toks: &[u32], s: f64| s / (toks.len().max(1) as f64).powf(length_penalty);
    for _ in 0..max_new_tokens {
        // Every (beam, token) candidate, best first.
        let mut cands: Vec<(usize, u32, f64)> = Vec::new();
        for (b, l) in last.iter().enumerate() {
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + l.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
            let mut idx: Vec<usize> = (0..l.len()).collect();
            let top = (2 * k).min(l.len());
            idx.select_nth_unstable_by(top - 1, |&x, &y| l[y].total_cmp(&l[x]));
            for &t in &idx[..top] {
                cands.push((b, t as u32, beams[b].1 + (l[t] - lse) as f64));
            }
        }
        cands.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
        let mut next: Vec<(usize, Vec<u32>, f64)> = Vec::new();
        for (b, t, s) in cands {
            let mut toks = beams[b].0.clone();
            toks.push(t);
            if Some(t) == eos {
                finished.push((toks, s));
            } else {
                next.push((b, toks, s));
            }
            if next.len() == k {
                break;
            }
        }
        // Stop when no beam is open or `k` have finished.
        if next.is_empty() || finished.len() >= k {
            break;
        }
        let rows: Vec<u32> = next.iter().map(|(b, _, _)| *b as u32).collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu)?;
        for layer in cache.layers.iter_mut().flatten() {
            *layer = (layer.0.index_select(&rows, 0)?, layer.1.index_select(&rows, 0)?);
        }
        let input: Vec<u32> = next.iter().map(|(_, toks, _)| *toks.last().expect("a beam has a token")).collect();
        let input = Tensor::from_vec(input, (next.len(), 1), &Device::Cpu)?;
        let logits = model.forward(&input, Some(&mut cache))?;
        last = logits.squeeze(1)?.to_vec2::<f32>()?;
        beams = next.into_iter().map(|(_, t, s)| (t, s)).collect();
    }
    finished.extend(beams);
    let best = finished
        .into_iter()
        .max_by(|a, b| rank(&a.0, a.1).total_cmp(&rank(&b.0, b.1)))
        .map(|(t, _)| t)
        .unwrap_or_default();
    Ok(best)
}
