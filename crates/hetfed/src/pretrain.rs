//! `hetfed tokenizer train` and `hetfed pretrain`: hetfed's own base models from scratch.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Subcommand};

use hetfed_data::DataDir;
use hetfed_train::pretrain::{build_corpus, init_model, PretrainConfig};
use hetfed_train::{eval_loss, Trainer};

#[derive(Subcommand)]
pub enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer (<unk>, <s>, </s>, <pad>; BOS prepended) on text files,
    /// or on the training text of a pretraining recipe (--recipe: train splits only)
    Train {
        /// Text files, one sentence or document per line
        #[arg(long, num_args = 1.., required_unless_present = "recipe", conflicts_with = "recipe")]
        input: Vec<PathBuf>,
        /// Train on this pretraining recipe's corpus (mltext train split + task train splits)
        #[arg(long, value_name = "FILE")]
        recipe: Option<PathBuf>,
        /// Data directory for --recipe (default: $HETFED_DATA_DIR, else the per-user cache)
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Vocabulary size: 260..=1000000 (256 bytes and the special tokens at least)
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub fn tokenizer(c: TokenizerCmd) -> Result<()> {
    let TokenizerCmd::Train { mut input, recipe, data_dir, vocab_size, min_frequency, out } = c;
    crate::limits::int("--vocab-size", vocab_size, 256 + hetfed_model::tokenizer::SPECIAL_TOKENS.len(), 1_000_000)?;
    // A recipe's corpus is written to one text file per source beside the output, which then
    // also serve the tokens-per-character report.
    if let Some(r) = &recipe {
        let cfg = read_recipe(r)?;
        let dir = DataDir::resolve(data_dir.as_deref())?;
        let texts_dir = out.with_extension("corpus");
        std::fs::create_dir_all(&texts_dir).with_context(|| format!("creating {}", texts_dir.display()))?;
        for (name, texts) in hetfed_train::pretrain::training_texts(&cfg, &dir)? {
            let file = texts_dir.join(format!("{}.txt", name.replace([':', ' ', '(', ')'], "_")));
            let body: String = texts.iter().map(|t| t.replace('\n', " ") + "\n").collect();
            hetfed_core::write_atomic(&file, body.as_bytes())?;
            input.push(file);
        }
    }
    let files: Vec<String> = input.iter().map(|p| p.display().to_string()).collect();
    let t0 = std::time::Instant::now();
    let tok = hetfed_model::tokenizer::train_bpe(&files, vocab_size, min_frequency)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    tok.save(&out, false).map_err(|e| anyhow::anyhow!("{}: writing the tokenizer: {e}", out.display()))?;
    println!("trained {} tokens in {:.1}s -> {}", tok.get_vocab_size(true), t0.elapsed().as_secs_f64(), out.display());
    println!("{:<48} {:>14}", "file", "tokens/char");
    for f in &input {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let lines: Vec<String> = text.lines().take(2000).map(str::to_string).collect();
        println!("{:<48} {:>14.3}", f.display(), hetfed_model::tokenizer::tokens_per_char(&tok, &lines)?);
    }
    Ok(())
}

fn read_recipe(path: &Path) -> Result<PretrainConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: PretrainConfig =
        toml::from_str(&text).with_context(|| format!("{}: expected a pretraining recipe", path.display()))?;
    cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

#[derive(Args)]
pub struct PretrainArgs {
    /// The recipe (TOML; see configs/pretrain-*.toml)
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Output: model/ (HF directory), state.safetensors (resumable), metrics.jsonl
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Data directory (default: $HETFED_DATA_DIR, else the per-user cache directory)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Continue from OUT/state.safetensors
    #[arg(long)]
    pub resume: bool,
    /// Store the exported weights as f16 (default) or bf16
    #[arg(long, default_value = "f16")]
    pub dtype: String,
}

fn held_out_ppl(
    tr: &Trainer,
    held: &std::collections::BTreeMap<String, Vec<hetfed_train::Encoded>>,
) -> Result<serde_json::Value> {
    let mut m = serde_json::Map::new();
    for (lang, ex) in held {
        if !ex.is_empty() {
            m.insert(lang.clone(), serde_json::json!(eval_loss(tr.model(), ex, 16)?.exp()));
        }
    }
    Ok(serde_json::Value::Object(m))
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let cfg = read_recipe(&a.config)?;
    let dtype = match a.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype: expected f16 or bf16, found {other:?}"),
    };
    let state = a.out.join("state.safetensors");
    if a.resume && !state.exists() {
        bail!("--resume: expected {}, found no such file", state.display());
    }
    let tok_path = if cfg.tokenizer.is_relative() {
        a.config.parent().unwrap_or(Path::new(".")).join(&cfg.tokenizer)
    } else {
        cfg.tokenizer.clone()
    };
    let tok = hetfed_model::tokenizer::load(&tok_path)
        .map_err(|e| anyhow::anyhow!("{e} (make one with `hetfed tokenizer train`)"))?;
    let ck = init_model(&cfg.model, tok.clone(), cfg.train.seed)?;
    let eos = ck.arch.eos_token_id().context("the tokenizer has no </s>")?;
    let dir = DataDir::resolve(a.data_dir.as_deref())?;
    let corpus = build_corpus(&cfg, &dir, &tok, eos)?;
    let n_params: usize = ck.weights.values().map(|t| t.elem_count()).sum();
    eprintln!(
        "pretraining {} parameters on {} tokens ({} sequences of {}) from {} sources",
        n_params,
        corpus.train_tokens,
        corpus.train.len(),
        cfg.seq_len,
        corpus.sources.len()
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut tr = Trainer::new(&ck, cfg.train.clone(), None)?;
    if a.resume {
        tr.load_state(&state)?;
    }
    // Rows logged after the saved state (a crash between the two) would repeat on resume.
    hetfed_train::truncate_log_after(&a.out.join("metrics.jsonl"), tr.step)?;
    let total = tr.total_steps(corpus.train.len());
    let pb = crate::commands::progress_bar(total as u64, "pretrain");
    pb.set_position(tr.step as u64);
    let stop = crate::commands::stop_flag();
    let mut metrics = crate::commands::open_append(&a.out.join("metrics.jsonl"))?;
    let t0 = std::time::Instant::now();
    tr.train(
        &corpus.train,
        |r, t| {
            use std::io::Write;
            pb.set_position(r.step as u64);
            pb.set_message(format!("loss {:.4}  {:.0} tok/s", r.loss, r.tokens_per_s));
            let mut line = serde_json::to_value(r).expect("report serialises");
            if cfg.eval_every > 0 && r.step % cfg.eval_every == 0 {
                line["held_out_ppl"] =
                    held_out_ppl(t, &corpus.held_out).map_err(|e| hetfed_core::Error::msg(e.to_string()))?;
            }
            line["elapsed_s"] = serde_json::json!(t0.elapsed().as_secs_f64());
            writeln!(metrics, "{line}").map_err(|e| hetfed_core::Error::io("metrics.jsonl", e))?;
            if r.step % cfg.checkpoint_every.max(1) == 0 {
                t.save_state(&state)?;
            }
            Ok(())
        },
        || stop.load(Ordering::SeqCst),
    )?;
    tr.save_state(&state)?;
    pb.finish_and_clear();
    if stop.load(Ordering::SeqCst) {
        eprintln!("stopped at step {}/{total}; state saved to {} (continue with --resume)", tr.step, state.display());
        return Ok(());
    }
    let ppl = held_out_ppl(&tr, &corpus.held_out)?;
    let model_dir = a.out.join("model");
    ck.save_as(&tr.weights().context("pretraining trains every parameter")?, &model_dir, dtype)?;
    tok.save(model_dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("writing the tokenizer: {e}"))?;
    let summary = serde_json::json!({
        "parameters": n_params,
        "train_tokens": corpus.train_tokens,
        "tokens_seen": tr.step * cfg.train.batch_size * cfg.train.grad_accum * cfg.seq_len,
        "steps": tr.step,
        "sources": corpus.sources,
        "held_out_ppl": ppl,
        "unigram_ppl": corpus.unigram_ppl,
    });
    hetfed_core::write_atomic(&a.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("{summary}");
    Ok(())
}
