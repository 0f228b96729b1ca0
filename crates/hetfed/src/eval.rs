//! `hetfed eval`: a model (optionally with an adapter or task vector) on one task's split.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use hetfed_data::{DataDir, Split};
use hetfed_eval::{evaluate, EvalOptions};

use crate::commands::{self, load, progress_bar, ModelArgs};
use crate::limits;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Task: ethos, copa, xcopa:<lang>, flores:<src>-<tgt>, tico:<src>-<tgt>, in22-gen:<src>-<tgt>,
    /// in22-conv:<src>-<tgt>, xlsum:<lang>, ilsum, scitldr, bbc, mltext:<lang>, or one defined in --tasks
    #[arg(long)]
    pub task: String,
    /// train, dev (validation) or test
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Evaluate only N examples, evenly spaced over the split (`i·n/N`, as the server's
    /// `[server.eval] max_examples`; at least 1)
    #[arg(long)]
    pub limit: Option<usize>,
    /// Data directory (default: $HETFED_DATA_DIR, else the per-user cache directory, where a
    /// missing dataset is fetched first; see `hetfed data fetch --help`)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Never fetch a missing dataset (also $HETFED_OFFLINE=1); the error names the fetch command
    #[arg(long)]
    pub offline: bool,
    /// A TOML file of task definitions ([[task]] tables) that add to or override the built-ins
    #[arg(long, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
    /// Sequences per forward pass: 1..=4096
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Longest generated output (translation, summarization), in tokens: 1..=the model's
    /// context − 1
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Beam width for generation tasks (1 = greedy): 1..=min(64, the vocabulary size)
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Longest sequence in tokens, 2..=the model's context (default: the context); prompts
    /// lose their start
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Choice tasks: compare mean log-prob per token (true) or the sum (false); default by task kind
    #[arg(long)]
    pub length_normalise: Option<bool>,
    /// Write predictions.jsonl and metrics.json here
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print exactly one JSON object with the metrics
    #[arg(long)]
    pub json: bool,
    /// Evaluate the logit-offset model instead (proxy-tuning, what `offset_serving` serves):
    /// `log_softmax(log p_model + λ·(log p_tuned − log p_base))`, with this small base model
    /// (it must share the model's tokenizer)
    #[arg(long, value_name = "DIR", requires = "offset_adapter")]
    pub offset_base: Option<PathBuf>,
    /// The PEFT LoRA adapter of the tuned small model (on --offset-base)
    #[arg(long, value_name = "DIR", requires = "offset_base")]
    pub offset_adapter: Option<PathBuf>,
    /// λ, the offset's weight: a number in (0, 100]
    #[arg(long, default_value_t = 1.0, requires = "offset_base")]
    pub offset_lambda: f64,
}

/// `--offset-base` and `--offset-adapter`: the model plus the tuned small model's offset.
fn offset_model(a: &EvalArgs, l: commands::Loaded) -> Result<commands::Loaded> {
    let (Some(base), Some(adapter)) = (&a.offset_base, &a.offset_adapter) else { return Ok(l) };
    if !(a.offset_lambda.is_finite() && a.offset_lambda > 0.0 && a.offset_lambda <= 100.0) {
        bail!("--offset-lambda: expected a number in (0, 100], found {}", a.offset_lambda);
    }
    let small = load(&ModelArgs { model: base.clone(), adapter: None, taskvec: None, lambda: 1.0, dtype: a.m.dtype })?;
    let (mine, theirs) = (l.ck.spec.tokenizer_hash()?, small.ck.spec.tokenizer_hash()?);
    if mine != theirs {
        bail!(
            "--offset-base {}: logit offsets need one tokenizer; expected the model's ({}), found {}",
            base.display(),
            &mine[..mine.len().min(12)],
            &theirs[..theirs.len().min(12)]
        );
    }
    // The tuned model is the same base weights with the adapter on top: loaded once.
    let tuned = small.ck.model(Some(&commands::peft_adapter(adapter)?))?;
    let model = hetfed_distill::OffsetLm::new(l.model, vec![small.model], vec![(0, tuned, a.offset_lambda)])?;
    Ok(commands::Loaded { ck: l.ck, model: Box::new(model) })
}

pub fn run(a: EvalArgs) -> Result<()> {
    limits::int("--batch-size", a.batch_size, 1, hetfed_fed::config::MAX_BATCH)?;
    limits::int("--num-beams", a.num_beams, 1, limits::MAX_BEAMS)?;
    limits::at_least("--max-new-tokens", a.max_new_tokens, 1)?;
    if let Some(n) = a.limit {
        limits::at_least("--limit", n, 1)?;
    }
    if let Some(n) = a.max_len {
        limits::at_least("--max-len", n, 2)?;
    }
    // The model first: its limits (context, vocabulary) are checked before any data is read.
    let l = offset_model(&a, load(&a.m)?)?;
    limits::beams("--num-beams", a.num_beams, &l.ck)?;
    limits::new_tokens("--max-new-tokens", a.max_new_tokens, &l.ck)?;
    if let Some(n) = a.max_len {
        limits::seq_len("--max-len", n, 2, &l.ck)?;
    }
    let task = crate::data::task_registry(a.tasks.as_deref())?.get(&a.task)?;
    let split: Split = a.split.parse()?;
    let dir = DataDir::resolve(a.data_dir.as_deref())?;
    let offline = a.offline || crate::data::offline_env();
    crate::data::ensure(&dir, vec![crate::data::need_of(&task.dataset)], crate::data::is_cache(&dir), offline)?;
    let mut examples = task.load(&dir, split)?;
    if let Some(n) = a.limit {
        // Evenly spaced, as the server's `max_examples`: files are often sorted by label.
        examples = examples.subset(&hetfed_fed::assemble::strided(examples.len(), n))?;
    }
    let tok = l.ck.tokenizer()?;
    let counter = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
    let items = task.to_items(&examples, Some(&counter))?;
    let max_len = a.max_len.unwrap_or_else(|| limits::context(&l.ck));
    let opts = EvalOptions {
        batch_size: a.batch_size,
        max_new_tokens: a.max_new_tokens,
        max_len,
        num_beams: a.num_beams,
        length_normalise: a.length_normalise,
        // With --out, predictions.jsonl keeps each reference's per-token log-probabilities.
        token_logprobs: a.out.is_some(),
    };
    let pb = progress_bar(items.len() as u64, &format!("eval {}", task.name));
    let report = evaluate(l.model.as_ref(), tok, l.ck.arch.eos_token_id(), &task, &items, &opts, |done, total| {
        pb.set_position(done as u64);
        let secs = pb.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{:.1} examples/s", done as f64 / secs));
        let _ = total;
    })?;
    pb.finish_and_clear();
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let mut lines = String::new();
        for p in &report.predictions {
            lines.push_str(&serde_json::to_string(p)?);
            lines.push('\n');
        }
        hetfed_core::write_atomic(&out.join("predictions.jsonl"), lines.as_bytes())?;
        hetfed_core::write_atomic(&out.join("metrics.json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "task": report.task, "split": split.as_str(), "n_examples": report.n_examples, "metrics": report.metrics })
        );
    } else {
        println!(
            "{} ({} split, {} examples, {:.1} examples/s)",
            report.task,
            split.as_str(),
            report.n_examples,
            report.examples_per_s
        );
        for (k, v) in &report.metrics {
            println!("  {k:<12} {v:.2}");
        }
    }
    Ok(())
}
