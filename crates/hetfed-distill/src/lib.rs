//! Server-side ensemble distillation: the alternative to projecting small-model task vectors
//! onto the large model.
//!
//! FedDF (Lin et al., 2006.07242) fuses heterogeneous client models by distilling their
//! ensemble into the server model on unlabeled data. hetfed needs no public data set: the
//! server holds each client's small base model and its task vector, so it can rebuild every
//! fine-tuned small model (a *teacher*); it samples text from the large model itself
//! ([`sample_texts`]), computes the weighted ensemble's next-token distributions on that text
//! ([`ensemble_targets`]), and trains the large model (the *student*, LoRA or full) to match them
//! with a KL loss ([`distill`]). The result is a dense update of the student's weights, usable
//! wherever a projected task vector would be.
//!
//! Teachers and student must share a tokenizer; this crate checks that their vocabulary sizes
//! agree. The KL loss is built from plain candle ops that all have backward passes (candle's
//! fused softmax has none), and every trainable parameter is required to receive a gradient.

#![warn(missing_docs)]

pub mod offset;
pub use offset::{OffsetLm, Posterior};

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::generate::{generate_batch, SamplingConfig};
use hetfed_model::{ops, CausalLm, Checkpoint, LoraConfig, LoraSet};
use hetfed_train::{lr_at, AdamW, AdamWConfig, Schedule};

/// The global gradient norm is clipped to this value before every optimizer step.
pub const MAX_GRAD_NORM: f64 = 1.0;

/// Rows generated together by [`sample_texts`] (bounds the KV cache of a large model).
const SAMPLE_CHUNK: usize = 32;

/// Sequences of equal length that [`ensemble_targets`] runs through a teacher at once.
const TEACHER_CHUNK: usize = 16;

/// Everything that determines a distillation run (TOML/JSON with every field optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// LoRA rank of the student's adapters; 0 trains every parameter (full fine-tuning).
    pub lora_rank: usize,
    /// LoRA alpha (the adapter's output is scaled by `lora_alpha / lora_rank`).
    pub lora_alpha: f64,
    /// Peak AdamW learning rate (cosine decay to 0 over `steps`, no warmup).
    pub lr: f64,
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Softmax temperature applied to teacher and student logits alike.
    pub temperature: f64,
    /// Number of sequences to sample from the student (for the caller's [`sample_texts`]).
    pub n_prompts: usize,
    /// Tokens per sampled sequence, start token included (for the caller's [`sample_texts`]).
    pub seq_len: usize,
    /// Seed of the LoRA initialisation and of the batch order (and, by convention, of sampling).
    pub seed: u64,
    /// What the student minimises per position (see [`Objective`]); the reported `kl_before`
    /// and `kl_after` are the KL either way.
    #[serde(skip_serializing_if = "Objective::is_kl")]
    pub objective: Objective,
}

/// The distillation loss per counted position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// KL(target ‖ student) over the vocabulary: each token weighted by the teacher's probability.
    #[default]
    Kl,
    /// Squared error between the student's and the teacher's log-probabilities, each centred over
    /// the vocabulary (logit matching up to a constant), averaged over the vocabulary: every
    /// token weighs the same, so the teacher's change to tokens it finds unlikely (the tail the KL
    /// barely weighs) is learnt as much as its change to its likeliest. Target rows' probabilities
    /// are floored at 1e-30 before the logarithm.
    LogRatio,
    /// The teacher-weighted absolute difference of log-probabilities, `Σ_v p_v·h(ln q_v − ln p_v)`
    /// with `h(d) = √(d² + ε²) − ε`, `ε` = [`ABS_EPS`] (smooth at 0). First order in the
    /// difference: a small, consistent change of a likely token's log-probability (what a
    /// reference's NLL counts, linearly) weighs as much per nat as a large one, where the KL
    /// weighs it by its square. Target probabilities are floored at 1e-30 before the logarithm.
    AbsLogRatio,
}

/// The smoothing width of [`Objective::AbsLogRatio`], in nats.
pub const ABS_EPS: f64 = 0.01;

impl Objective {
    fn is_kl(&self) -> bool {
        *self == Objective::Kl
    }
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            lora_rank: 8,
            lora_alpha: 16.0,
            lr: 1e-3,
            steps: 30,
            batch_size: 8,
            temperature: 1.0,
            n_prompts: 64,
            seq_len: 48,
            seed: 0,
            objective: Objective::Kl,
        }
    }
}

impl DistillConfig {
    /// Checks that every field is in range; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.lora_rank > 0 && !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return Err(format!("lora_alpha must be positive and finite, found {}", self.lora_alpha));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("lr must be positive and finite, found {}", self.lr));
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1, found 0".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(format!("temperature must be positive and finite, found {}", self.temperature));
        }
        if self.n_prompts == 0 {
            return Err("n_prompts must be at least 1, found 0".into());
        }
        if self.seq_len < 2 {
            return Err(format!(
                "seq_len must be at least 2 (the start token and one sampled token), found {}",
                self.seq_len
            ));
        }
        Ok(())
    }

    /// The LoRA config this run uses for `arch` (`None` for full fine-tuning).
    pub fn lora_config(&self, arch: &hetfed_model::Arch) -> Option<LoraConfig> {
        (self.lora_rank > 0).then(|| LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: 0.0,
            targets: arch.default_lora_targets(),
        })
    }
}

/// What [`distill`] produces.
#[derive(Debug, Clone, Serialize)]
pub struct DistillReport {
    /// Dense change of the student's canonical weights, keyed as in `Checkpoint::weights`: with
    /// LoRA, `B·A·scale` for each adapted `<module>.weight` (only those keys); with full
    /// fine-tuning, `trained - initial` for every weight.
    #[serde(skip)]
    pub delta: TensorMap,
    /// Mean KL(target ‖ student) per position over all sequences, before training.
    pub kl_before: f64,
    /// The same after training.
    pub kl_after: f64,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Wall-clock seconds of the whole run (evaluations included).
    pub seconds: f64,
}

fn cerr(e: candle_core::Error) -> Error {
    Error::Candle(e)
}

/// `n` sequences of `len` tokens sampled from `model` itself: each starts with `start_token`
/// (e.g. the eos/bos id) followed by `len - 1` tokens drawn at temperature 1 from the full
/// distribution (no top-k/top-p, no stop at eos), deterministic under `seed`.
pub fn sample_texts(model: &dyn CausalLm, start_token: u32, n: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    sample_after(model, &[start_token], n, len, seed)
}

/// `n` sequences of `len` tokens: `prefix` (e.g. the start token and a task's prompt prefix)
/// followed by tokens drawn from `model` at temperature 1 (full distribution, no stop at eos),
/// deterministic under `seed`.
pub fn sample_after(model: &dyn CausalLm, prefix: &[u32], n: usize, len: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if prefix.is_empty() || len <= prefix.len() {
        return Err(Error::msg(format!(
            "sampled sequences need a prefix of at least one token and room for one more: found a prefix of {} tokens and len {len}",
            prefix.len()
        )));
    }
    if let Some(&t) = prefix.iter().find(|&&t| t as usize >= model.vocab_size()) {
        return Err(Error::msg(format!(
            "prefix token {t} is outside the model's vocabulary of {}",
            model.vocab_size()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut chunk_idx = 0u64;
    while out.len() < n {
        let rows = (n - out.len()).min(SAMPLE_CHUNK);
        let cfg = SamplingConfig {
            max_new_tokens: len - prefix.len(),
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: seed.wrapping_add(chunk_idx.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        };
        let prompts = vec![prefix.to_vec(); rows];
        for new in generate_batch(model, &prompts, &cfg, None).map_err(cerr)? {
            let mut s = Vec::with_capacity(len);
            s.extend_from_slice(prefix);
            s.extend(new);
            out.push(s);
        }
        chunk_idx += 1;
    }
    Ok(out)
}

/// A piece of a synthetic example for [`sample_template`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal token ids every example has (a template's text).
    Text(Vec<u32>),
    /// A field the model writes (a document, a summary, a sentence).
    Field,
}

/// Synthetic examples from [`sample_template`]: every row has the same layout, so the answer
/// (the last field) starts at one index in all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Samples {
    /// The examples, `len` tokens each.
    pub seqs: Vec<Vec<u32>>,
    /// Index of the answer's first token in every row.
    pub answer_start: usize,
}

/// `n` synthetic examples of `len` tokens in a task's shape: `start`, then each segment in
/// turn, literal text copied and fields sampled from `model` at temperature 1 (no stop at
/// eos). The free tokens are shared equally among the fields; a template that ends with text
/// gets one more field after it (the answer). Deterministic under `seed`.
pub fn sample_template(
    model: &dyn CausalLm,
    start: u32,
    segments: &[Segment],
    n: usize,
    len: usize,
    seed: u64,
) -> Result<Samples> {
    sample_template_from(model, start, segments, n, len, seed, TemplateText::default())
}

/// Text the caller owns that fills a template's fields instead of the model's samples (see
/// [`sample_template_from`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TemplateText<'a> {
    /// The prompt's fields (every field but the answer): field `f` of row `i` takes the first
    /// tokens of `prompts[(i·k + f) % len]`, `k` the number of prompt fields.
    pub prompts: Option<&'a [Vec<u32>]>,
    /// The answer (the last field): row `i` takes the first tokens of `answers[i % len]`.
    pub answers: Option<&'a [Vec<u32>]>,
    /// A sampled answer's temperature and nucleus (`None`: temperature 1, the whole
    /// vocabulary). Below 1, the answers are nearer the teacher's mode: sequence-level
    /// distillation's targets (Kim & Rush, 2016), on which the KL is then taken token by token.
    pub answer_sampling: Option<(f64, Option<f64>)>,
}

/// Like [`sample_template`], except that the fields `text` provides are teacher-forced from it
/// (each entry at least as long as its field's share of `len`) and only the others are
/// sampled. With real prompts and a sampled answer, the examples are the teacher's answers to
/// real inputs (sequence-level distillation on unlabeled text).
pub fn sample_template_from(
    model: &dyn CausalLm,
    start: u32,
    segments: &[Segment],
    n: usize,
    len: usize,
    seed: u64,
    text: TemplateText<'_>,
) -> Result<Samples> {
    for (what, t) in [("prompt", text.prompts), ("answer", text.answers)] {
        if t.is_some_and(<[Vec<u32>]>::is_empty) {
            return Err(Error::msg(format!("teacher-forced {what}s: expected at least one, found none")));
        }
    }
    let mut parts: Vec<Segment> =
        segments.iter().filter(|s| !matches!(s, Segment::Text(t) if t.is_empty())).cloned().collect();
    if !matches!(parts.last(), Some(Segment::Field)) {
        parts.push(Segment::Field);
    }
    let literal: usize = parts.iter().map(|p| if let Segment::Text(t) = p { t.len() } else { 0 }).sum();
    let fields = parts.iter().filter(|p| **p == Segment::Field).count();
    let free = len.saturating_sub(1 + literal);
    if free < fields {
        return Err(Error::msg(format!(
            "synthetic examples of {len} tokens: the template's text takes {literal} tokens, leaving {free} for {fields} fields (expected at least one each)"
        )));
    }
    let mut rows: Vec<Vec<u32>> = vec![vec![start]; n];
    let mut field_idx = 0usize;
    let mut answer_start = 1usize;
    for p in &parts {
        match p {
            Segment::Text(t) => {
                rows.iter_mut().for_each(|r| r.extend_from_slice(t));
                answer_start += t.len();
            }
            Segment::Field => {
                let budget =
                    if field_idx + 1 == fields { free - (fields - 1) * (free / fields) } else { free / fields };
                let is_answer = field_idx + 1 == fields;
                if !is_answer {
                    answer_start += budget;
                }
                let (given, what) = if is_answer { (text.answers, "answer") } else { (text.prompts, "prompt") };
                if let Some(given) = given {
                    let k = if is_answer { 1 } else { fields - 1 };
                    let f = if is_answer { 0 } else { field_idx };
                    for (i, r) in rows.iter_mut().enumerate() {
                        let j = (i * k + f) % given.len();
                        let a = &given[j];
                        if a.len() < budget {
                            return Err(Error::msg(format!(
                                "teacher-forced {what} {j}: expected at least {budget} tokens, found {}",
                                a.len()
                            )));
                        }
                        r.extend_from_slice(&a[..budget]);
                    }
                    field_idx += 1;
                    continue;
                }
                let step_seed = seed.wrapping_add((field_idx as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
                let (temperature, top_p) =
                    if is_answer { text.answer_sampling.unwrap_or((1.0, None)) } else { (1.0, None) };
                let mut out = Vec::with_capacity(n);
                for (c, chunk) in rows.chunks(SAMPLE_CHUNK).enumerate() {
                    let cfg = SamplingConfig {
                        max_new_tokens: budget,
                        temperature,
                        top_k: None,
                        top_p,
                        seed: step_seed.wrapping_add((c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    };
                    for (row, new) in chunk.iter().zip(generate_batch(model, chunk, &cfg, None).map_err(cerr)?) {
                        let mut r = row.clone();
                        r.extend(new);
                        out.push(r);
                    }
                }
                rows = out;
                field_idx += 1;
            }
        }
    }
    rows.iter_mut().for_each(|r| r.truncate(len));
    Ok(Samples { seqs: rows, answer_start })
}

/// Restricts distillation of template samples to their answers, the tokens a client's loss
/// covers (its target and end-of-sequence, never its prompt): each row is cut after the first
/// `eos` at or past `answer_start` (the position predicting that `eos` stays), and the target
/// rows before the one predicting the answer's first token are zeroed, so [`distill`] and
/// [`mean_kl`] count only answer positions. `targets` are [`ensemble_targets`] of `seqs`.
pub fn answer_only(seqs: &mut [Vec<u32>], targets: &mut [Tensor], answer_start: usize, eos: u32) -> Result<()> {
    if seqs.len() != targets.len() {
        return Err(Error::msg(format!(
            "expected one target per sequence, found {} targets for {} sequences",
            targets.len(),
            seqs.len()
        )));
    }
    for (s, t) in seqs.iter_mut().zip(targets.iter_mut()) {
        if answer_start == 0 || answer_start >= s.len() {
            return Err(Error::msg(format!(
                "the answer starts at token {answer_start}, outside a sequence of {} tokens (expected 1..len)",
                s.len()
            )));
        }
        let end = s[answer_start..].iter().position(|&x| x == eos).map_or(s.len(), |p| answer_start + p);
        // Rows `answer_start - 1 .. end` predict the answer's tokens and its eos.
        let end = end.max(answer_start);
        s.truncate(end);
        let vocab = t.dim(1)?;
        let keep = t.narrow(0, answer_start - 1, end - (answer_start - 1))?;
        *t = if answer_start == 1 {
            keep
        } else {
            Tensor::cat(&[&Tensor::zeros((answer_start - 1, vocab), t.dtype(), t.device())?, &keep], 0)?
        };
    }
    Ok(())
}

/// Checks that `seqs` is non-empty, every sequence non-empty, and every id below `vocab`.
fn check_seqs(seqs: &[Vec<u32>], vocab: usize) -> Result<()> {
    if seqs.is_empty() {
        return Err(Error::msg("expected at least one sequence, found none"));
    }
    for (i, s) in seqs.iter().enumerate() {
        if s.is_empty() {
            return Err(Error::msg(format!("sequence {i} is empty")));
        }
        if let Some(&t) = s.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::msg(format!("sequence {i} has token {t}, outside the vocabulary of {vocab}")));
        }
    }
    Ok(())
}

/// Per sequence, the `[len, vocab]` next-token probabilities of the teacher ensemble:
/// `Σ_k w_k·softmax(logits_k / temperature) / Σ_k w_k`. Weights must be finite and `>= 0` with a
/// positive sum; all teachers must have the same vocabulary size.
pub fn ensemble_targets(teachers: &[(&dyn CausalLm, f64)], seqs: &[Vec<u32>], temperature: f64) -> Result<Vec<Tensor>> {
    if teachers.is_empty() {
        return Err(Error::msg("expected at least one teacher, found none"));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::msg(format!("temperature must be positive and finite, found {temperature}")));
    }
    if let Some((i, (_, w))) = teachers.iter().enumerate().find(|(_, (_, w))| !(w.is_finite() && *w >= 0.0)) {
        return Err(Error::msg(format!("teacher {i} has weight {w}: weights must be finite and >= 0")));
    }
    let total: f64 = teachers.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return Err(Error::msg("teacher weights sum to 0: at least one must be positive"));
    }
    let vocab = teachers[0].0.vocab_size();
    if let Some((i, (t, _))) = teachers.iter().enumerate().find(|(_, (t, _))| t.vocab_size() != vocab) {
        return Err(Error::msg(format!(
            "teacher {i} has a vocabulary of {}, teacher 0 one of {vocab}: teachers must share a tokenizer",
            t.vocab_size()
        )));
    }
    check_seqs(seqs, vocab)?;
    let mut out: Vec<Option<Tensor>> = vec![None; seqs.len()];
    // Consecutive sequences of equal length go through each teacher as one batch.
    let mut start = 0;
    while start < seqs.len() {
        let len = seqs[start].len();
        let mut end = start + 1;
        while end < seqs.len() && end - start < TEACHER_CHUNK && seqs[end].len() == len {
            end += 1;
        }
        let rows = end - start;
        let ids: Vec<u32> = seqs[start..end].iter().flatten().copied().collect();
        let ids = Tensor::from_vec(ids, (rows, len), &Device::Cpu)?;
        let mut mix: Option<Tensor> = None;
        for (model, w) in teachers {
            if *w == 0.0 {
                continue;
            }
            let logits = (model.forward(&ids, None)? / temperature)?;
            let p = (ops::softmax_last_dim(&logits)? * (w / total))?;
            mix = Some(match mix {
                None => p,
                Some(m) => (m + p)?,
            });
        }
        let mix = mix.expect("a teacher has positive weight").detach();
        for r in 0..rows {
            out[start + r] = Some(mix.get(r)?.contiguous()?);
        }
        start = end;
    }
    Ok(out.into_iter().map(|t| t.expect("every sequence filled")).collect())
}

/// The trainable student: the network built over LoRA adapters or tracked weights.
struct Student {
    model: Box<dyn CausalLm>,
    lora: Option<LoraSet>,
    /// Full fine-tuning: the tracked weights (canonical names).
    full: Option<TensorMap>,
    vars: Vec<(String, Var)>,
}

impl Student {
    fn new(ck: &Checkpoint, cfg: &DistillConfig) -> Result<Self> {
        match cfg.lora_config(&ck.arch) {
            Some(lcfg) => {
                let set = LoraSet::init(&lcfg, &ck.weights, cfg.seed)?;
                let model = ck.arch.build(&ck.weights, &ck.source(), Some(&set))?;
                let vars = set.vars();
                Ok(Self { model, lora: Some(set), full: None, vars })
            }
            None => {
                let vars: Vec<(String, Var)> = ck
                    .weights
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
                    .collect::<candle_core::Result<_>>()?;
                let tracked: TensorMap = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
                let model = ck.arch.build(&tracked, &ck.source(), None)?;
                Ok(Self { model, lora: None, full: Some(tracked), vars })
            }
        }
    }

    /// The dense change of the canonical weights relative to `ck`.
    fn delta(&self, ck: &Checkpoint) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        if let Some(set) = &self.lora {
            for module in set.factors.keys() {
                let d = set.delta(module)?.expect("module has factors");
                out.insert(format!("{module}.weight"), d);
            }
        }
        if let Some(full) = &self.full {
            for (k, t) in full {
                out.insert(k.clone(), (t.detach() - ck.weights[k].to_dtype(DType::F32)?)?);
            }
        }
        Ok(out)
    }
}

/// The distillation data, checked: sequences, targets and each target's `Σ p·ln p`.
struct Data<'a> {
    seqs: &'a [Vec<u32>],
    targets: &'a [Tensor],
    /// Per sequence, `Σ_positions Σ_v p·ln p` (the constant part of the KL).
    plogp: Vec<f64>,
    /// Per sequence, the positions whose target carries probability (a zeroed row, e.g. a
    /// prompt position under [`answer_only`], is not counted).
    positions: Vec<usize>,
    vocab: usize,
    temperature: f64,
    /// Per sequence, the weight of its loss in training (1 unless [`distill_groups`] balances).
    weights: Vec<f64>,
}

impl<'a> Data<'a> {
    fn new(seqs: &'a [Vec<u32>], targets: &'a [Tensor], vocab: usize, temperature: f64) -> Result<Self> {
        check_seqs(seqs, vocab)?;
        if targets.len() != seqs.len() {
            return Err(Error::msg(format!(
                "expected one target per sequence, found {} targets for {} sequences",
                targets.len(),
                seqs.len()
            )));
        }
        let mut plogp = Vec::with_capacity(seqs.len());
        let mut positions = Vec::with_capacity(seqs.len());
        for (i, (s, t)) in seqs.iter().zip(targets).enumerate() {
            if t.dims() != [s.len(), vocab] {
                let hint = match t.dims() {
                    [_, v] if *v != vocab => format!(
                        " (the teachers' vocabulary is {v}, the student's {vocab}: they must share a tokenizer)"
                    ),
                    _ => String::new(),
                };
                return Err(Error::Shape {
                    name: format!("target {i}"),
                    expected: vec![s.len(), vocab],
                    found: t.dims().to_vec(),
                    where_: Some(format!("distillation targets{hint}")),
                });
            }
            let p = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            plogp.push(p.iter().filter(|&&x| x > 0.0).map(|&x| x as f64 * (x as f64).ln()).sum());
            positions.push(p.chunks(vocab).filter(|row| row.iter().any(|&x| x > 0.0)).count());
        }
        let weights = vec![1.0; seqs.len()];
        Ok(Self { seqs, targets, plogp, positions, vocab, temperature, weights })
    }

    /// The counted positions of sequences `idx` (at least 1, so a mean is always defined).
    fn n_positions(&self, idx: &[usize]) -> usize {
        idx.iter().map(|&i| self.positions[i]).sum::<usize>().max(1)
    }

    /// Σ over the positions of sequences `idx` of KL(target ‖ softmax(student logits / T)),
    /// differentiable w.r.t. the student's parameters. Built from candle ops with backward passes
    /// only: `log q = z - ln Σ exp z` with `z = logits/T - max` (the max is detached; the
    /// log-softmax does not depend on it). Right-padding gets zero target rows, so contributes 0.
    #[cfg(test)]
    fn sum_kl(&self, model: &dyn CausalLm, idx: &[usize]) -> Result<Tensor> {
        Ok(self.seq_kl(model, idx)?.sum_all()?)
    }

    /// Per sequence of `idx`, Σ over its positions of the KL (`[b]`), differentiable.
    fn seq_kl(&self, model: &dyn CausalLm, idx: &[usize]) -> Result<Tensor> {
        let (ids, p) = self.batch(idx)?;
        let plogp: Vec<f32> = idx.iter().map(|&i| self.plogp[i] as f32).collect();
        let plogp = Tensor::from_vec(plogp, idx.len(), &Device::Cpu)?;
        let logq = self.student_logq(model, &ids)?;
        let cross = (p * logq)?.sum(D::Minus1)?.sum(D::Minus1)?;
        Ok((plogp - cross)?)
    }

    /// The token ids `[b, t]` of sequences `idx`, right-padded, and their targets `[b, t, vocab]`
    /// (padding gets zero rows).
    fn batch(&self, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        let b = idx.len();
        let t = idx.iter().map(|&i| self.seqs[i].len()).max().unwrap_or(0);
        let mut ids = vec![0u32; b * t];
        let mut rows = Vec::with_capacity(b);
        for (r, &i) in idx.iter().enumerate() {
            let s = &self.seqs[i];
            ids[r * t..r * t + s.len()].copy_from_slice(s);
            let tg = self.targets[i].to_dtype(DType::F32)?;
            rows.push(if s.len() < t {
                Tensor::cat(&[&tg, &Tensor::zeros((t - s.len(), self.vocab), DType::F32, &Device::Cpu)?], 0)?
            } else {
                tg
            });
        }
        Ok((Tensor::from_vec(ids, (b, t), &Device::Cpu)?, Tensor::stack(&rows, 0)?))
    }

    /// The student's `log softmax(logits / T)` of `ids` `[b, t]`: `z - ln Σ exp z` with
    /// `z = logits/T - max` (the max is detached; the log-softmax does not depend on it).
    fn student_logq(&self, model: &dyn CausalLm, ids: &Tensor) -> Result<Tensor> {
        let logits = (model.forward(ids, None)? / self.temperature)?;
        let z = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
        let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
        Ok(z.broadcast_sub(&lse)?)
    }

    /// Σ over the counted positions of sequences `idx` of the [`Objective::LogRatio`] loss:
    /// the mean over the vocabulary of `(c(log q) − c(log p))²`, `c` centring over the vocabulary.
    /// Zeroed target rows (padding, prompt positions under [`answer_only`]) are masked out.
    #[cfg(test)]
    fn sum_log_ratio(&self, model: &dyn CausalLm, idx: &[usize]) -> Result<Tensor> {
        Ok(self.seq_log_ratio(model, idx)?.sum_all()?)
    }

    /// Per sequence of `idx`, its [`Objective::LogRatio`] loss (`[b]`).
    fn seq_log_ratio(&self, model: &dyn CausalLm, idx: &[usize]) -> Result<Tensor> {
        let (ids, p) = self.batch(idx)?;
        let mask = p.sum_keepdim(D::Minus1)?.gt(0.0)?.to_dtype(DType::F32)?;
        let logp = p.clamp(1e-30f32, 1.0f32)?.log()?;
        let cp = logp.broadcast_sub(&logp.mean_keepdim(D::Minus1)?)?;
        let logq = self.student_logq(model, &ids)?;
        let cq = logq.broadcast_sub(&logq.mean_keepdim(D::Minus1)?)?;
        let sq = (cq - cp)?.sqr()?.mean_keepdim(D::Minus1)?;
        Ok((sq * mask)?.sum(D::Minus1)?.sum(D::Minus1)?)
    }

    /// Σ over the positions of sequences `idx` of the [`Objective::AbsLogRatio`] loss:
    /// `Σ_v p_v·(√((ln q_v − ln p_v)² + ε²) − ε)`. Zeroed target rows weigh nothing.
    #[cfg(test)]
    fn sum_abs_log_ratio(&self, model: &dyn CausalLm, idx: &[usize]) -> Result<Tensor> {
        Ok(self.seq_abs_log_ratio(model, idx)?.sum_all()?)
    }

    /// Per sequence of `idx`, its [`Objective::AbsLogRatio`] loss (`[b]`).
    fn seq_abs_log_ratio(&self, model: &dyn CausalLm, idx: &[usize]) -> Result<Tensor> {
        let (ids, p) = self.batch(idx)?;
        let logp = p.clamp(1e-30f32, 1.0f32)?.log()?;
        let logq = self.student_logq(model, &ids)?;
        let h = (((logq - logp)?.sqr()? + ABS_EPS * ABS_EPS)?.sqrt()? - ABS_EPS)?;
        Ok((p * h)?.sum(D::Minus1)?.sum(D::Minus1)?)
    }

    /// The training loss of [`distill`] summed over the counted positions of `idx`, each
    /// sequence's part times its weight.
    fn sum_loss(&self, model: &dyn CausalLm, idx: &[usize], objective: Objective) -> Result<Tensor> {
        let per_seq = match objective {
            Objective::Kl => self.seq_kl(model, idx)?,
            Objective::LogRatio => self.seq_log_ratio(model, idx)?,
            Objective::AbsLogRatio => self.seq_abs_log_ratio(model, idx)?,
        };
        if idx.iter().all(|&i| self.weights[i] == 1.0) {
            return Ok(per_seq.sum_all()?);
        }
        let w: Vec<f32> = idx.iter().map(|&i| self.weights[i] as f32).collect();
        Ok((per_seq * Tensor::from_vec(w, idx.len(), &Device::Cpu)?)?.sum_all()?)
    }

    /// Per sequence, Σ over its positions of the KL (unweighted; in batches of `batch`).
    fn seq_kl_sums(&self, model: &dyn CausalLm, batch: usize) -> Result<Vec<f64>> {
        let all: Vec<usize> = (0..self.seqs.len()).collect();
        let mut out = Vec::with_capacity(all.len());
        for chunk in all.chunks(batch.max(1)) {
            out.extend(self.seq_kl(model, chunk)?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        Ok(out)
    }

    /// Mean KL per position over all sequences (evaluated in batches of `batch`).
    fn mean_kl(&self, model: &dyn CausalLm, batch: usize) -> Result<f64> {
        let all: Vec<usize> = (0..self.seqs.len()).collect();
        let sum: f64 = self.seq_kl_sums(model, batch)?.iter().sum();
        Ok(sum / self.n_positions(&all) as f64)
    }

    /// Mean KL per position of each group's sequences, from per-sequence sums.
    fn group_means(&self, sums: &[f64], groups: &[Option<usize>], n_groups: usize) -> Vec<f64> {
        let mut kl = vec![0.0; n_groups];
        let mut pos = vec![0usize; n_groups];
        for (i, g) in groups.iter().enumerate() {
            if let Some(g) = *g {
                kl[g] += sums[i];
                pos[g] += self.positions[i];
            }
        }
        kl.iter().zip(&pos).map(|(k, &p)| k / p.max(1) as f64).collect()
    }
}

/// Mean KL per counted position of `targets` (from [`ensemble_targets`], optionally restricted
/// by [`answer_only`]) to `model`'s next-token distributions at `temperature`: how far a model
/// is from its teacher on sequences it was not trained on.
pub fn mean_kl(model: &dyn CausalLm, seqs: &[Vec<u32>], targets: &[Tensor], temperature: f64) -> Result<f64> {
    Data::new(seqs, targets, model.vocab_size(), temperature)?.mean_kl(model, TEACHER_CHUNK)
}

/// The sequence indices of every step: per epoch a seeded shuffle cut into batches (the last
/// batch of an epoch may be smaller), as many epochs as `steps` needs.
fn plan(n: usize, batch: usize, steps: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut out = Vec::with_capacity(steps);
    let mut epoch = 0u64;
    while out.len() < steps {
        let mut idx: Vec<usize> = (0..n).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(epoch + 1));
        idx.shuffle(&mut rng);
        out.extend(idx.chunks(batch).map(<[usize]>::to_vec));
        epoch += 1;
    }
    out.truncate(steps);
    out
}

/// Gradients of `loss` for every variable, in order; a variable the loss does not reach is an
/// error (it means an op without a backward pass froze it).
fn grads_of(loss: &Tensor, vars: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let g = loss.backward()?;
    vars.iter()
        .map(|(name, v)| {
            g.get(v.as_tensor())
                .cloned()
                .ok_or_else(|| Error::msg(format!("parameter `{name}` received no gradient from the KL loss")))
        })
        .collect()
}

/// Distils the teacher ensemble's `targets` (from [`ensemble_targets`], one `[len, vocab]`
/// tensor per sequence of `seqs`) into `student`: LoRA on `student.arch.default_lora_targets()`
/// (or every weight when `cfg.lora_rank == 0`), loss = mean over the batch's positions of
/// KL(target ‖ softmax(student logits / T)), AdamW (no weight decay) with cosine decay from
/// `cfg.lr`, gradient norm clipped to [`MAX_GRAD_NORM`]. Deterministic under `cfg.seed`.
/// `progress(step, loss)` is called after each step (steps counted from 1).
pub fn distill(
    student: &Checkpoint,
    targets: &[Tensor],
    seqs: &[Vec<u32>],
    cfg: &DistillConfig,
    progress: impl FnMut(usize, f64),
) -> Result<DistillReport> {
    Ok(distill_groups(student, targets, seqs, &[], false, cfg, progress)?.0)
}

/// Per group of sequences (a task's examples), the KL of [`distill_groups`] and its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupKl {
    /// Mean KL per position of the group's sequences before training.
    pub kl_before: f64,
    /// The same after training.
    pub kl_after: f64,
    /// The weight of each of the group's sequences in the training loss.
    pub weight: f64,
}

/// [`distill`] with the sequences in groups: `groups[i]` is sequence `i`'s group (`None`: in
/// none, e.g. general text; an empty slice: every sequence in none). Returns each group's KL
/// before and after (indexed by group). With `balance`, each group's sequences weigh in the
/// loss by `mean_g KL_g / KL_g` (their groups' mean KL before training over their own, clamped
/// to [[`MIN_BALANCE`], [`MAX_BALANCE`]]), so a group whose teacher moves little from the start
/// counts as much, relative to its distance, as one that moves far; ungrouped sequences weigh 1.
pub fn distill_groups(
    student: &Checkpoint,
    targets: &[Tensor],
    seqs: &[Vec<u32>],
    groups: &[Option<usize>],
    balance: bool,
    cfg: &DistillConfig,
    mut progress: impl FnMut(usize, f64),
) -> Result<(DistillReport, Vec<GroupKl>)> {
    let t0 = Instant::now();
    cfg.validate().map_err(Error::msg)?;
    if !groups.is_empty() && groups.len() != seqs.len() {
        return Err(Error::msg(format!(
            "expected one group per sequence, found {} groups for {} sequences",
            groups.len(),
            seqs.len()
        )));
    }
    let groups: Vec<Option<usize>> = if groups.is_empty() { vec![None; seqs.len()] } else { groups.to_vec() };
    let n_groups = groups.iter().flatten().max().map_or(0, |g| g + 1);
    let vocab = student.arch.vocab_size();
    let mut data = Data::new(seqs, targets, vocab, cfg.temperature)?;
    let all: Vec<usize> = (0..seqs.len()).collect();
    let st = Student::new(student, cfg)?;
    let before = data.seq_kl_sums(st.model.as_ref(), cfg.batch_size)?;
    let kl_before = before.iter().sum::<f64>() / data.n_positions(&all) as f64;
    let group_before = data.group_means(&before, &groups, n_groups);
    let mut group_weight = vec![1.0; n_groups];
    if balance && n_groups > 0 {
        let mean = group_before.iter().sum::<f64>() / n_groups as f64;
        for (w, &k) in group_weight.iter_mut().zip(&group_before) {
            *w = if k > 0.0 { (mean / k).clamp(MIN_BALANCE, MAX_BALANCE) } else { MAX_BALANCE };
        }
        data.weights = groups.iter().map(|g| g.map_or(1.0, |g| group_weight[g])).collect();
    }
    let mut opt = AdamW::new(st.vars.clone(), AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() })?;
    for (step, batch) in plan(seqs.len(), cfg.batch_size, cfg.steps, cfg.seed).into_iter().enumerate() {
        let n_pos = data.n_positions(&batch);
        let loss = (data.sum_loss(st.model.as_ref(), &batch, cfg.objective)? / n_pos as f64)?;
        let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            return Err(Error::msg(format!("distillation loss became {loss_value} at step {}", step + 1)));
        }
        let mut grads = grads_of(&loss, opt.vars())?;
        let mut sq = 0.0;
        for g in &grads {
            sq += hetfed_core::sq_norm(g)?;
        }
        let norm = sq.sqrt();
        if norm > MAX_GRAD_NORM {
            let c = MAX_GRAD_NORM / (norm + 1e-6);
            grads = grads.into_iter().map(|g| g * c).collect::<candle_core::Result<_>>()?;
        }
        opt.step(&grads, lr_at(cfg.lr, Schedule::Cosine, 0, cfg.steps, step))?;
        progress(step + 1, loss_value);
    }
    let after = data.seq_kl_sums(st.model.as_ref(), cfg.batch_size)?;
    let kl_after = after.iter().sum::<f64>() / data.n_positions(&all) as f64;
    let group_after = data.group_means(&after, &groups, n_groups);
    let per_group = (0..n_groups)
        .map(|g| GroupKl { kl_before: group_before[g], kl_after: group_after[g], weight: group_weight[g] })
        .collect();
    Ok((
        DistillReport {
            delta: st.delta(student)?,
            kl_before,
            kl_after,
            steps: cfg.steps,
            seconds: t0.elapsed().as_secs_f64(),
        },
        per_group,
    ))
}

/// The bounds of a group's weight under [`distill_groups`]'s balancing.
pub const MIN_BALANCE: f64 = 0.1;
/// See [`MIN_BALANCE`].
pub const MAX_BALANCE: f64 = 10.0;

#[cfg(test)]
mod tests;
