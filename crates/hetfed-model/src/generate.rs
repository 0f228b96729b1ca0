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
        Self {
            max_new_tokens: 32,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
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
