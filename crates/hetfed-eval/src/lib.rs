//! The evaluation runner: one function that scores any causal LM on any hetfed task, so the same
//! code evaluates clients (small models) and the server (large model).
//!
//! - choice tasks (classification, reasoning): each candidate continuation is scored by its
//!   log-likelihood after the prompt (batched); the prediction is the best candidate (length
//!   normalised or not, configurable); accuracy and macro-F1;
//! - generation tasks (translation, summarization): batched greedy KV-cached decoding (or beam
//!   search), cut at the first
//!   newline or end-of-sequence; BLEU/chrF/chrF++ or ROUGE against the references;
//! - language modelling: perplexity over the texts.
//!
//! Every choice and generation task also reports `target_nll`: the mean negative log-likelihood,
//! in nats per target token, of the reference target given the prompt, teacher-forced (choice
//! tasks: the gold candidate; generation: the first reference as the task's target template
//! renders it, exactly what fine-tuning trains on). It is continuous and low-noise where a task
//! metric on a few hundred examples cannot separate two models.
//!
//! All scores are on a 0–100 scale except perplexity. Evaluation is deterministic.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use hetfed_data::{DatasetSpec, Items, TaskKind, TaskSpec};
use hetfed_model::generate::{beam_search, generate_batch, SamplingConfig};
use hetfed_model::score::{continuation_logprobs, continuation_token_logprobs};
use hetfed_model::tokenizers::Tokenizer;
use hetfed_model::CausalLm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Metric(#[from] hetfed_metrics::Error),
    #[error("tokenising: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// How to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalOptions {
    /// Sequences per forward pass when scoring.
    pub batch_size: usize,
    /// Longest generated output, in tokens.
    pub max_new_tokens: usize,
    /// Longest sequence the model sees (prompt + continuation), in tokens; prompts lose their
    /// start first. Set it to the model's context length.
    pub max_len: usize,
    /// Generation: beam width; 1 = greedy decoding (batched across examples).
    pub num_beams: usize,
    /// Choice tasks: compare mean log-prob per token (true) or the sum (false). `None` = the
    /// task kind's default: normalised for reasoning (alternatives differ in length), summed for
    /// classification (label words are short and fixed).
    pub length_normalise: Option<bool>,
    /// Generation tasks: keep each example's per-token target log-probabilities in its
    /// [`Prediction`] (`target_logprobs`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub token_logprobs: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            max_new_tokens: 64,
            max_len: 2048,
            num_beams: 1,
            length_normalise: None,
            token_logprobs: false,
        }
    }
}

/// One example's outcome, for `--out` files and error analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    /// Choice tasks: the chosen candidate; generation: the output text; LM: empty.
    pub prediction: String,
    /// Choice tasks: the gold candidate; generation: the first reference.
    pub gold: String,
    /// Choice tasks: the per-candidate scores; LM: the text's total log-likelihood.
    pub scores: Vec<f32>,
    /// Generation: the log-probability of each token of the reference target after the prompt
    /// (teacher-forced; the terms of `target_nll`), when [`EvalOptions::token_logprobs`] asks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_logprobs: Vec<f32>,
    /// Generation, with `target_logprobs`: each of those tokens decoded alone (a token that holds
    /// part of a character's bytes shows U+FFFD), so per-token analyses can tell a word's start
    /// (a leading space) from its continuation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_tokens: Vec<String>,
}

/// The result of evaluating a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub task: String,
    pub n_examples: usize,
    /// Metric name → value (0–100, perplexity as is).
    pub metrics: BTreeMap<String, f64>,
    pub seconds: f64,
    pub examples_per_s: f64,
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

struct Tok<'a> {
    tok: &'a Tokenizer,
    max_len: usize,
}

impl Tok<'_> {
    fn ids(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self.tok.encode(text, special).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
    }
    /// Cuts the start of `prompt` so that `prompt + room` tokens fit in `max_len` (the end of a
    /// prompt, next to the answer, matters most).
    fn fit(&self, mut prompt: Vec<u32>, room: usize) -> Vec<u32> {
        let keep = self.max_len.saturating_sub(room).max(1);
        if prompt.len() > keep {
            prompt.drain(..prompt.len() - keep);
        }
        prompt
    }
    fn text(&self, ids: &[u32]) -> Result<String> {
        self.tok.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Evaluates `model` on `items` of `task`, calling `progress(done, total)` as examples finish.
pub fn evaluate(
    model: &dyn CausalLm,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
    task: &TaskSpec,
    items: &Items,
    opts: &EvalOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    let t0 = Instant::now();
    let tok = Tok { tok: tokenizer, max_len: opts.max_len };
    let total = items.len();
    if total == 0 {
        return Err(Error::Msg(format!("task `{}`: expected at least one example, found none", task.name)));
    }
    let mut metrics = BTreeMap::new();
    let mut predictions = Vec::with_capacity(total);
    match items {
        Items::Choice(v) => {
            let normalise = opts.length_normalise.unwrap_or(task.kind == TaskKind::Reasoning);
            let (mut gold, mut pred) = (Vec::with_capacity(total), Vec::with_capacity(total));
            let (mut nll, mut n_target) = (0f64, 0usize);
            let chunk = opts.batch_size.max(1);
            for (c, items) in v.chunks(chunk).enumerate() {
                let mut pairs = Vec::new();
                for it in items {
                    let cands: Vec<Vec<u32>> =
                        it.candidates.iter().map(|c| tok.ids(c, false)).collect::<Result<_>>()?;
                    let longest = cands.iter().map(Vec::len).max().unwrap_or(0);
                    let p = tok.fit(tok.ids(&it.prompt, true)?, longest);
                    for c in cands {
                        pairs.push((p.clone(), c));
                    }
                }
                let scores = continuation_logprobs(model, &pairs, opts.batch_size)?;
                let mut k = 0;
                for it in items {
                    if let Some(g) = scores.get(k + it.gold) {
                        nll -= g.sum as f64;
                        n_target += g.n_tokens;
                    }
                    let s: Vec<f32> = scores[k..k + it.candidates.len()]
                        .iter()
                        .map(|s| if normalise { s.mean() } else { s.sum })
                        .collect();
                    k += it.candidates.len();
                    let best = argmax(&s);
                    gold.push(it.gold);
                    pred.push(best);
                    predictions.push(Prediction {
                        id: it.id.clone(),
                        prediction: it.candidates[best].clone(),
                        gold: it.candidates.get(it.gold).cloned().unwrap_or_default(),
                        scores: s,
                        target_logprobs: Vec::new(),
                        target_tokens: Vec::new(),
                    });
                }
                progress(((c + 1) * chunk).min(total), total);
            }
            metrics.insert("accuracy".into(), 100.0 * hetfed_metrics::classification::accuracy(&gold, &pred)?);
            if task.kind == TaskKind::Classification {
                metrics.insert("macro_f1".into(), 100.0 * hetfed_metrics::classification::macro_f1(&gold, &pred)?);
            }
            metrics.insert("target_nll".into(), nll / n_target.max(1) as f64);
        }
        Items::Generation(v) => {
            let cfg = SamplingConfig { max_new_tokens: opts.max_new_tokens, ..Default::default() };
            let prompts: Vec<Vec<u32>> = v
                .iter()
                .map(|it| Ok(tok.fit(tok.ids(&it.prompt, true)?, opts.max_new_tokens)))
                .collect::<Result<_>>()?;
            // Batches of similar prompt length waste little on padding; outputs return in order.
            let mut order: Vec<usize> = (0..total).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
            let mut outputs = vec![String::new(); total];
            let mut done = 0;
            for chunk in order.chunks(opts.batch_size.max(1)) {
                let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
                let outs = if opts.num_beams > 1 {
                    batch
                        .iter()
                        .map(|p| beam_search(model, p, opts.num_beams, opts.max_new_tokens, 1.0, eos))
                        .collect::<candle_core::Result<Vec<_>>>()?
                } else {
                    generate_batch(model, &batch, &cfg, eos)?
                };
                for (&i, out) in chunk.iter().zip(outs) {
                    let out: Vec<u32> = out.into_iter().take_while(|&t| Some(t) != eos).collect();
                    // Answers are one line: the prompt formats put the answer after a label.
                    outputs[i] = tok.text(&out)?.split('\n').next().unwrap_or("").trim().to_string();
                }
                done += chunk.len();
                progress(done, total);
            }
            for (it, text) in v.iter().zip(&outputs) {
                predictions.push(Prediction {
                    id: it.id.clone(),
                    prediction: text.clone(),
                    gold: it.references.first().cloned().unwrap_or_default(),
                    scores: Vec::new(),
                    target_logprobs: Vec::new(),
                    target_tokens: Vec::new(),
                });
            }
            let hyps = outputs;
            let refs: Vec<Vec<String>> = v.iter().map(|it| it.references.clone()).collect();
            generation_metrics(task, &hyps, &refs, &mut metrics)?;
            let targets: Vec<(&str, String)> = v
                .iter()
                .map(|it| {
                    (
                        it.prompt.as_str(),
                        if it.target.is_empty() {
                            format!(" {}", it.references.first().map(String::as_str).unwrap_or(""))
                        } else {
                            it.target.clone()
                        },
                    )
                })
                .collect();
            let (nll, per_token, ids) = target_nll(model, &tok, &targets, opts.batch_size)?;
            metrics.insert("target_nll".into(), nll);
            if opts.token_logprobs {
                let start = predictions.len() - per_token.len();
                for ((p, lp), ids) in predictions[start..].iter_mut().zip(per_token).zip(ids) {
                    p.target_logprobs = lp;
                    p.target_tokens = ids.iter().map(|&id| tok.text(&[id])).collect::<Result<_>>()?;
                }
            }
        }
        Items::Lm(v) => {
            let mut pairs = Vec::with_capacity(total);
            for it in v {
                // Perplexity of text longer than the context: score its first max_len tokens.
                let p = tok.ids(&it.prompt, true)?;
                let mut t = tok.ids(&it.text, false)?;
                t.truncate(opts.max_len.saturating_sub(p.len()).max(1));
                pairs.push((p, t));
            }
            let (mut nll, mut n) = (0f64, 0u64);
            for (c, chunk) in pairs.chunks(opts.batch_size.max(1)).enumerate() {
                for (s, it) in continuation_logprobs(model, chunk, opts.batch_size)?
                    .into_iter()
                    .zip(&v[c * opts.batch_size.max(1)..])
                {
                    nll -= s.sum as f64;
                    n += s.n_tokens as u64;
                    predictions.push(Prediction {
                        id: it.id.clone(),
                        prediction: String::new(),
                        gold: String::new(),
                        scores: vec![s.sum],
                        target_logprobs: Vec::new(),
                        target_tokens: Vec::new(),
                    });
                }
                progress(((c + 1) * opts.batch_size.max(1)).min(total), total);
            }
            metrics.insert("perplexity".into(), hetfed_metrics::classification::perplexity(nll, n)?);
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    Ok(EvalReport {
        task: task.name.clone(),
        n_examples: total,
        metrics,
        seconds,
        examples_per_s: total as f64 / seconds.max(1e-9),
        predictions,
    })
}

/// Mean negative log-likelihood, in nats per target token, of each `(prompt, target)`'s target
/// after its prompt (teacher-forced). Targets keep their start within `max_len - 1` tokens and
/// prompts their end in the room left.
/// Also returns each pair's per-token log-probabilities (the terms of the mean) and its target's
/// token ids.
#[allow(clippy::type_complexity)]
fn target_nll(
    model: &dyn CausalLm,
    tok: &Tok<'_>,
    pairs: &[(&str, String)],
    batch_size: usize,
) -> Result<(f64, Vec<Vec<f32>>, Vec<Vec<u32>>)> {
    let mut enc = Vec::with_capacity(pairs.len());
    for (prompt, target) in pairs {
        let mut t = tok.ids(target, false)?;
        t.truncate(tok.max_len.saturating_sub(1).max(1));
        enc.push((tok.fit(tok.ids(prompt, true)?, t.len()), t));
    }
    let per_token = continuation_token_logprobs(model, &enc, batch_size)?;
    let (mut nll, mut n) = (0f64, 0usize);
    for lp in &per_token {
        nll -= lp.iter().sum::<f32>() as f64;
        n += lp.len();
    }
    if n == 0 {
        return Err(Error::Msg("target NLL: expected at least one target token, found none".into()));
    }
    Ok((nll / n as f64, per_token, enc.into_iter().map(|(_, t)| t).collect()))
}

/// BLEU and chrF/chrF++ for translation; ROUGE for summarization (rouge-score with the Porter
/// stemmer for English, XL-Sum's multilingual ROUGE otherwise). References per example may vary
/// in number (SciTLDR): BLEU/chrF use as many reference streams as the fewest-referenced example
/// has, ROUGE takes the best reference per example.
fn generation_metrics(
    task: &TaskSpec,
    hyps: &[String],
    refs: &[Vec<String>],
    out: &mut BTreeMap<String, f64>,
) -> Result<()> {
    match task.kind {
        TaskKind::Translation => {
            let k = refs.iter().map(Vec::len).min().unwrap_or(0).max(1);
            let streams: Vec<Vec<String>> =
                (0..k).map(|j| refs.iter().map(|r| r.get(j).cloned().unwrap_or_default()).collect()).collect();
            out.insert("bleu".into(), hetfed_metrics::bleu::corpus_bleu(hyps, &streams)?.score);
            let chrf = |w| {
                hetfed_metrics::chrf::corpus_chrf(
                    hyps,
                    &streams,
                    hetfed_metrics::chrf::CHAR_ORDER,
                    w,
                    hetfed_metrics::chrf::BETA,
                )
            };
            out.insert("chrf".into(), chrf(0)?);
            out.insert("chrf++".into(), chrf(hetfed_metrics::chrf::CHRF_PP_WORD_ORDER)?);
        }
        TaskKind::Summarization => {
            let scorer = match summary_language(&task.dataset) {
                None => hetfed_metrics::rouge::Rouge::new(true),
                Some(lang) => hetfed_metrics::rouge::Rouge::multilingual(&lang)?,
            };
            let s = scorer.corpus_per_example(hyps, refs)?;
            out.insert("rouge1".into(), s.rouge1);
            out.insert("rouge2".into(), s.rouge2);
            out.insert("rougeL".into(), s.rouge_l);
        }
        other => return Err(Error::Msg(format!("task `{}`: {other} is not a generation task", task.name))),
    }
    Ok(())
}

/// The XL-Sum language name for multilingual ROUGE, or `None` for English (rouge-score).
fn summary_language(d: &DatasetSpec) -> Option<String> {
    match d {
        DatasetSpec::XlSum { lang } => {
            let name = hetfed_data::lang::xlsum_name(lang);
            (name != "english").then_some(name)
        }
        DatasetSpec::Ilsum => Some("hindi".into()),
        _ => None,
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}
