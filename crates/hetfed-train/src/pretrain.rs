//! Pretraining a BLOOM-architecture model from scratch on hetfed's corpus: `mltext` plus the raw
//! text of task *training* splits (never dev or test text), packed into fixed-length sequences
//! and shuffled per epoch; held-out perplexity per language on `mltext`'s dev split.
//!
//! The training loop itself is [`crate::Trainer`] (full fine-tuning of a randomly initialised
//! model with the loss on every token), so warmup + cosine, clipping, accumulation, exact resume
//! and determinism come with it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use hetfed_core::{Error, Result};
use hetfed_data::{DataDir, Examples, Split};
use hetfed_model::tokenizers::Tokenizer;
use hetfed_model::{bloom, Arch, Checkpoint, ModelSpec};

use crate::{Encoded, TrainConfig};

/// The shape of the model to pretrain (the vocabulary comes from the tokenizer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub hidden_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
}

/// A pretraining recipe (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub model: ModelShape,
    /// The tokenizer.json to use (relative paths are relative to the config file).
    pub tokenizer: PathBuf,
    /// Tokens per packed training sequence.
    pub seq_len: usize,
    /// `mltext` languages to train on (their `train` split).
    pub languages: Vec<String>,
    /// Tasks whose *training* split's raw text joins the corpus (e.g. "ethos", "xlsum:hindi").
    #[serde(default)]
    pub tasks: Vec<String>,
    /// At most this many lines per language (None = all).
    #[serde(default)]
    pub max_lines_per_language: Option<usize>,
    /// Held-out lines per language (from `mltext`'s dev split) for perplexity.
    #[serde(default = "default_held_out")]
    pub held_out_lines: usize,
    /// Evaluate held-out perplexity every N optimizer steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Save a resumable state every N steps.
    #[serde(default = "default_ckpt")]
    pub checkpoint_every: usize,
    pub train: TrainConfig,
}

fn default_held_out() -> usize {
    200
}
fn default_ckpt() -> usize {
    200
}

impl PretrainConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.seq_len < 8 {
            return Err(format!("seq_len must be at least 8, found {}", self.seq_len));
        }
        if self.languages.is_empty() {
            return Err("expected at least one language in `languages`, found none".into());
        }
        if self.train.lora.is_some() {
            return Err("pretraining trains every parameter: remove [train.lora]".into());
        }
        self.train.validate()
    }
}

/// Tokenised corpus: packed training sequences and per-language held-out lines.
pub struct Corpus {
    pub train: Vec<Encoded>,
    pub held_out: BTreeMap<String, Vec<Encoded>>,
    pub train_tokens: usize,
    /// Lines (documents) per source, for the model card.
    pub sources: BTreeMap<String, usize>,
    /// Perplexity of an add-one-smoothed unigram model of the training tokens on each language's
    /// held-out lines: the floor a pretrained model must beat by far.
    pub unigram_ppl: BTreeMap<String, f64>,
}

/// Add-one-smoothed unigram perplexity of `held` (every token after the first of each sequence)
/// under token counts from `train_stream`.
fn unigram_ppl(train_stream: &[u32], vocab: usize, held: &[Encoded]) -> f64 {
    let mut counts = vec![1u64; vocab];
    for &t in train_stream {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
        }
    }
    let total: u64 = counts.iter().sum();
    let (mut nll, mut n) = (0f64, 0usize);
    for e in held {
        for &t in &e.ids[e.prompt_len..] {
            let c = counts.get(t as usize).copied().unwrap_or(1);
            nll -= (c as f64 / total as f64).ln();
            n += 1;
        }
    }
    (nll / n.max(1) as f64).exp()
}

fn texts_of(ex: &Examples) -> Vec<String> {
    match ex {
        Examples::Classification(v) => v.iter().map(|e| e.text.clone()).collect(),
        Examples::Choice(v) => v.iter().flat_map(|e| [e.premise.clone(), e.choices.join(" ")]).collect(),
        Examples::Translation(v) => v.iter().flat_map(|e| [e.src.clone(), e.tgt.clone()]).collect(),
        Examples::Summary(v) => {
            v.iter().flat_map(|e| std::iter::once(e.document.clone()).chain(e.references.iter().cloned())).collect()
        }
        Examples::Text(v) => v.iter().map(|e| e.text.clone()).collect(),
    }
}

fn ids(tok: &Tokenizer, s: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(s, false).map_err(|e| Error::msg(format!("tokenising: {e}")))?.get_ids().to_vec())
}

/// The corpus's training text by source, in order: each language's `mltext` train split, then
/// each task's *train* split. Never dev or test text, so a tokenizer trained on it has not seen
/// the held-out lines either.
pub fn training_texts(cfg: &PretrainConfig, dir: &DataDir) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for lang in &cfg.languages {
        let spec: hetfed_data::DatasetSpec = format!("mltext:{lang}").parse()?;
        let mut train = texts_of(&spec.load(dir, Split::Train)?);
        if let Some(m) = cfg.max_lines_per_language {
            train.truncate(m);
        }
        out.push((format!("mltext:{lang}"), train));
    }
    for task in &cfg.tasks {
        let spec = hetfed_data::task::builtin(task)?;
        let ex = spec.load(dir, Split::Train)?;
        out.push((format!("{} (train split)", spec.name), texts_of(&ex)));
    }
    Ok(out)
}

/// Reads, tokenises and packs the corpus. Only `train` splits feed training; the held-out lines
/// come from `mltext`'s dev split, which no training text overlaps (hetfed-data's split rule).
pub fn build_corpus(cfg: &PretrainConfig, dir: &DataDir, tok: &Tokenizer, eos: u32) -> Result<Corpus> {
    let mut stream: Vec<u32> = Vec::new();
    let mut sources = BTreeMap::new();
    for (name, texts) in training_texts(cfg, dir)? {
        sources.insert(name, texts.len());
        for t in texts {
            stream.extend(ids(tok, &t)?);
            stream.push(eos);
        }
    }
    let mut held_out = BTreeMap::new();
    for lang in &cfg.languages {
        let spec: hetfed_data::DatasetSpec = format!("mltext:{lang}").parse()?;
        let dev = texts_of(&spec.load(dir, Split::Dev)?);
        let held: Vec<Encoded> = dev
            .iter()
            .take(cfg.held_out_lines)
            .map(|t| {
                let mut v = vec![eos];
                v.extend(ids(tok, t)?);
                v.truncate(cfg.seq_len);
                Ok(Encoded { ids: v, prompt_len: 1 })
            })
            .collect::<Result<_>>()?;
        held_out.insert(lang.clone(), held);
    }
    let train_tokens = stream.len();
    let vocab = tok.get_vocab_size(true);
    let unigram_ppl = held_out.iter().map(|(l, h)| (l.clone(), unigram_ppl(&stream, vocab, h))).collect();
    // Packed: consecutive `seq_len` windows of the token stream (documents separated by eos);
    // the loss covers every position after the first.
    let train: Vec<Encoded> =
        stream.chunks_exact(cfg.seq_len).map(|c| Encoded { ids: c.to_vec(), prompt_len: 1 }).collect();
    if train.is_empty() {
        return Err(Error::msg(format!(
            "the corpus has {train_tokens} tokens, fewer than one sequence of {}",
            cfg.seq_len
        )));
    }
    Ok(Corpus { train, held_out, train_tokens, sources, unigram_ppl })
}

/// A randomly initialised BLOOM checkpoint for `tok` (BLOOM's init, deterministic under `seed`).
pub fn init_model(shape: &ModelShape, tok: Tokenizer, seed: u64) -> Result<Checkpoint> {
    let id = |t: &str| tok.token_to_id(t);
    let cfg = bloom::Config {
        vocab_size: tok.get_vocab_size(true),
        hidden_size: shape.hidden_size,
        n_layer: shape.n_layer,
        n_head: shape.n_head,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: id("<s>"),
        eos_token_id: id("</s>"),
        pad_token_id: id("<pad>"),
    };
    cfg.validate().map_err(Error::msg)?;
    let config_json = cfg.hf_config_json();
    let weights = cfg.random_weights(seed)?;
    let spec =
        ModelSpec { dir: PathBuf::from("<pretrain>"), config_json, arch: Arch::Bloom(cfg), tokenizer: Some(tok) };
    Ok(Checkpoint { spec, weights })
}
