//! The model-level subcommands: score, generate, finetune, taskvec.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use hetfed_fed::config::Interval;
use hetfed_model::generate::SamplingConfig;
use hetfed_model::{CausalLm, Checkpoint, LoraConfig, LoraSet, WeightDtype};
use hetfed_taskvec::TaskVector;
use hetfed_train::{Schedule, TrainConfig, Trainer};

use crate::limits;

/// Which weights to run: a base model, optionally with a LoRA adapter or a task vector.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json)
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)
    #[arg(long, value_name = "DIR", conflicts_with = "taskvec")]
    pub adapter: Option<PathBuf>,
    /// A hetfed task vector to add to the model's weights
    #[arg(long, value_name = "FILE")]
    pub taskvec: Option<PathBuf>,
    /// Scale of the task vector (a finite number)
    #[arg(long, default_value_t = 1.0, requires = "taskvec")]
    pub lambda: f64,
    /// Dtype of the weight matrices in memory: `stored` keeps them as the file has them (an f16
    /// or bf16 model stays half precision, widened a block at a time as it is read: half the
    /// memory of f32), or `f32`, `bf16`, `f16`. Norms and biases are f32 either way; with
    /// --taskvec the weights are widened to f32 to add it
    #[arg(long, default_value = "stored", value_name = "DTYPE")]
    pub dtype: WeightDtype,
}

/// A checkpoint with what to run on top of it.
pub struct Loaded {
    pub ck: Checkpoint,
    pub model: Box<dyn CausalLm>,
}

/// A PEFT LoRA adapter directory as the adapters a model runs with.
pub fn peft_adapter(dir: &std::path::Path) -> Result<LoraSet> {
    let (cfg, factors) = hetfed_taskvec::peft::import_peft(dir)?;
    Ok(LoraSet::from_tensors(&cfg, &factors)?)
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    if !args.lambda.is_finite() {
        bail!("--lambda: expected a finite number, found {}", args.lambda);
    }
    let mut ck = Checkpoint::load_with(&args.model, args.dtype)?;
    let lora = args.adapter.as_deref().map(peft_adapter).transpose()?;
    if let Some(path) = &args.taskvec {
        let tv = TaskVector::load(path)?;
        let id = ck.identity()?;
        // The update is added to f32 weights (rounding it into half precision would lose most of it).
        for t in ck.weights.values_mut() {
            if matches!(t.dtype(), DType::F16 | DType::BF16) {
                *t = t.to_dtype(DType::F32)?;
            }
        }
        // The same validation as the server's for an upload (identity, names, shapes, finite values).
        ck.weights = tv
            .apply_validated(&id, &ck.weights, args.lambda, "the base model")
            .with_context(|| format!("applying {}", path.display()))?;
    }
    let model = ck.model(lora.as_ref())?;
    Ok(Loaded { ck, model })
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Text to score (the tokenizer adds its special tokens, e.g. BOS); tokens beyond the
    /// model's context are dropped (said on stderr)
    #[arg(long, required_unless_present = "text_file", conflicts_with = "text_file")]
    pub text: Option<String>,
    /// Read the text to score from this file instead (UTF-8, at most 1 MiB; one final line
    /// ending is dropped)
    #[arg(long, value_name = "FILE")]
    pub text_file: Option<PathBuf>,
    /// Print exactly one JSON object {"tokens": [...], "logprobs": [...]}
    #[arg(long)]
    pub json: bool,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let from = if a.text_file.is_some() { "--text-file" } else { "--text" };
    let text = limits::read_text(a.text, a.text_file.as_deref(), "--text")?;
    let l = load(&a.m)?;
    let tok = l.ck.tokenizer()?;
    let enc = tok.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("tokenising {from}: {e}"))?;
    let mut ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        bail!("{from}: expected text that encodes to at least one token, found none");
    }
    // Attention over n tokens holds heads × n² scores: never more than the model's context.
    let ctx = limits::context(&l.ck);
    if ids.len() > ctx {
        eprintln!(
            "note: {from} is {} tokens, more than the context of {} ({ctx} tokens); scoring its first {ctx}",
            ids.len(),
            a.m.model.display()
        );
        ids.truncate(ctx);
    }
    let lp = hetfed_model::score::sequence_logprobs(l.model.as_ref(), std::slice::from_ref(&ids), 1)?
        .pop()
        .unwrap_or_default();
    if a.json {
        println!("{}", serde_json::json!({ "tokens": ids, "logprobs": lp }));
    } else {
        let total: f32 = lp.iter().sum();
        println!("{:>6}  {:>10}  token", "id", "logprob");
        println!("{:>6}  {:>10}  {:?}", ids[0], "", tok.id_to_token(ids[0]).unwrap_or_default());
        for (id, p) in ids[1..].iter().zip(&lp) {
            println!("{id:>6}  {p:>10.4}  {:?}", tok.id_to_token(*id).unwrap_or_default());
        }
        let n = lp.len().max(1) as f32;
        println!("total {total:.4} over {} tokens, perplexity {:.3}", lp.len(), (-total / n).exp());
    }
    Ok(())
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Prompt to continue; it loses its start when prompt and new tokens exceed the model's
    /// context (said on stderr)
    #[arg(long, required_unless_present = "text_file", conflicts_with = "text_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file instead (UTF-8, at most 1 MiB; one final line ending is
    /// dropped)
    #[arg(long, value_name = "FILE", visible_alias = "prompt-file")]
    pub text_file: Option<PathBuf>,
    /// Tokens to generate: 1..=the model's context − 1
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature, a finite number >= 0; 0 decodes greedily
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample from the K most likely tokens: 1..=the vocabulary size
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches P: (0, 1]
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Beam search with this many beams (deterministic; excludes sampling): 1..=min(64, the
    /// vocabulary size)
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Print {"prompt_tokens", "tokens", "text"} as one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    // What needs no model first, so a bad flag fails before anything loads.
    limits::real("--temperature", a.temperature, Interval::NON_NEGATIVE)?;
    if let Some(p) = a.top_p {
        limits::real("--top-p", p, Interval::left_open(0.0, 1.0))?;
    }
    if let Some(k) = a.top_k {
        limits::at_least("--top-k", k, 1)?;
    }
    limits::int("--num-beams", a.num_beams, 1, limits::MAX_BEAMS)?;
    limits::at_least("--max-new-tokens", a.max_new_tokens, 1)?;
    let from = if a.text_file.is_some() { "--text-file" } else { "--prompt" };
    let prompt = limits::read_text(a.prompt, a.text_file.as_deref(), "--prompt")?;
    let l = load(&a.m)?;
    let vocab = l.ck.arch.vocab_size();
    if let Some(k) = a.top_k {
        limits::int("--top-k", k, 1, vocab)?;
    }
    limits::beams("--num-beams", a.num_beams, &l.ck)?;
    limits::new_tokens("--max-new-tokens", a.max_new_tokens, &l.ck)?;
    let tok = l.ck.tokenizer()?;
    let mut ids =
        tok.encode(prompt.as_str(), true).map_err(|e| anyhow::anyhow!("tokenising {from}: {e}"))?.get_ids().to_vec();
    if ids.is_empty() {
        bail!("{from}: expected text that encodes to at least one token, found none");
    }
    // The prompt and the new tokens together fit the model's context.
    let room = limits::context(&l.ck) - a.max_new_tokens;
    if ids.len() > room {
        eprintln!(
            "note: {from} is {} tokens; with --max-new-tokens {} the context of {} ({} tokens) leaves room for its last {room}",
            ids.len(),
            a.max_new_tokens,
            a.m.model.display(),
            limits::context(&l.ck)
        );
        ids.drain(..ids.len() - room);
    }
    let cfg = SamplingConfig {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let eos = l.ck.arch.eos_token_id();
    let new = if a.num_beams > 1 {
        if a.temperature > 0.0 {
            bail!(
                "--num-beams {}: beam search is deterministic; expected --temperature 0, found {}",
                a.num_beams,
                a.temperature
            );
        }
        hetfed_model::generate::beam_search(l.model.as_ref(), &ids, a.num_beams, a.max_new_tokens, 1.0, eos)?
    } else {
        hetfed_model::generate::generate(l.model.as_ref(), &ids, &cfg, eos)?
    };
    let secs = t0.elapsed().as_secs_f64();
    let text = tok.decode(&new, true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    if a.json {
        println!("{}", serde_json::json!({ "prompt_tokens": ids, "tokens": new, "text": text }));
    } else {
        println!("{prompt}{text}");
        tracing::info!(tokens = new.len(), tokens_per_s = new.len() as f64 / secs, "generated");
    }
    Ok(())
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// Base model directory
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Training examples: JSONL of {"prompt": ..., "target": ...}
    #[arg(long, value_name = "FILE")]
    pub train: PathBuf,
    /// Held-out examples (same format) for the loss before and after
    #[arg(long, value_name = "FILE")]
    pub eval: Option<PathBuf>,
    /// Output directory: taskvec.safetensors, adapter/ (LoRA, PEFT format) or model/ (full),
    /// state.safetensors (to resume), metrics.jsonl
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A TOML file with a [train] table (TrainConfig fields); flags override it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// LoRA rank, 1..=min(in, out) of the smallest adapted layer; without it (and without a
    /// [train.lora] table) every parameter is trained
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha, a finite number > 0 (default: twice the rank)
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout: [0, 1)
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names or suffixes (default: the architecture's attention and MLP projections)
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    /// Peak learning rate: (0, 10]
    #[arg(long)]
    pub lr: Option<f64>,
    /// 1..=10000
    #[arg(long)]
    pub epochs: Option<usize>,
    /// 1..=10000000
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// 1..=4096
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Batches per optimizer step: 1..=4096
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// 0..=10000000
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// constant, linear or cosine
    #[arg(long)]
    pub schedule: Option<Schedule>,
    /// Clip the global gradient norm, a finite number >= 0 (0 disables)
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// AdamW weight decay: [0, 1]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Longest sequence in tokens (prompts lose their start first): 2..=the model's context
    /// (default 256, or the context when it is shorter)
    #[arg(long)]
    pub max_len: Option<usize>,
    /// FedProx coefficient mu: adds mu/2·||w - w_start||² to the loss; [0, 1000000]
    #[arg(long)]
    pub proximal_mu: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Recompute each block's activations in the backward pass instead of keeping them (far
    /// less memory, one more forward pass of the blocks; the same gradients). Also
    /// `gradient_checkpointing = true` under [train]
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Save a resumable state every N optimizer steps (and always at the end or on Ctrl-C):
    /// 1..=10000000
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    /// Continue from OUT/state.safetensors
    #[arg(long)]
    pub resume: bool,
    /// Also write the fine-tuned model as an HF directory (LoRA merged), OUT/model/
    #[arg(long)]
    pub export_model: bool,
}

#[derive(serde::Deserialize, Default)]
struct FileConfig {
    #[serde(default)]
    train: Option<TrainConfig>,
}

/// LoRA targets when none are given: every attention and MLP projection of the architecture.
pub fn default_targets(ck: &Checkpoint) -> Vec<String> {
    ck.arch.default_lora_targets()
}

fn train_config(a: &FinetuneArgs, ck: &Checkpoint) -> Result<TrainConfig> {
    // Whether the file sets `max_len` (the default adapts to a short context; a value never does).
    let mut file_max_len = false;
    let mut c = match &a.config {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let f: FileConfig =
                toml::from_str(&s).with_context(|| format!("{}: expected TOML with a [train] table", p.display()))?;
            let raw: toml::Value = toml::from_str(&s).with_context(|| format!("{}: expected TOML", p.display()))?;
            file_max_len = raw.get("train").and_then(|t| t.get("max_len")).is_some();
            f.train.unwrap_or_default()
        }
        None => TrainConfig::default(),
    };
    if a.max_len.is_none() && !file_max_len {
        c.max_len = c.max_len.min(limits::context(ck));
    }
    if a.lora_rank.is_some() || a.lora_alpha.is_some() || a.lora_targets.is_some() || a.lora_dropout.is_some() {
        let mut l = c.lora.take().unwrap_or(LoraConfig { targets: default_targets(ck), ..Default::default() });
        if let Some(r) = a.lora_rank {
            l.rank = r;
            if a.lora_alpha.is_none() {
                l.alpha = 2.0 * r as f64;
            }
        }
        if let Some(x) = a.lora_alpha {
            l.alpha = x;
        }
        if let Some(x) = a.lora_dropout {
            l.dropout = x;
        }
        if let Some(t) = &a.lora_targets {
            l.targets = t.clone();
        }
        c.lora = Some(l);
    }
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f { c.$f = v; } )* };
    }
    set!(lr, epochs, batch_size, grad_accum, warmup_steps, schedule, max_len, proximal_mu, seed);
    c.gradient_checkpointing |= a.gradient_checkpointing;
    if let Some(m) = a.max_steps {
        c.max_steps = Some(m);
    }
    if let Some(g) = a.max_grad_norm {
        c.max_grad_norm = (g > 0.0).then_some(g);
    }
    if let Some(w) = a.weight_decay {
        c.adamw.weight_decay = w;
    }
    check_train_limits(a, &c, ck)?;
    c.validate().map_err(|e| anyhow::anyhow!("training config: {e}"))?;
    Ok(c)
}

/// Every number of the training configuration against its range (see [`crate::limits`]),
/// before anything is allocated. A value from a flag is named by the flag; one from `--config`
/// by its key in the file.
fn check_train_limits(a: &FinetuneArgs, c: &TrainConfig, ck: &Checkpoint) -> Result<()> {
    let file = a.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let name = |flag_given: bool, flag: &str, key: &str| {
        if flag_given || a.config.is_none() {
            flag.to_string()
        } else {
            format!("{file}: train.{key}")
        }
    };
    let int = |given: bool, flag: &str, key: &str, v: usize, lo: usize, hi: usize| {
        limits::int(&name(given, flag, key), v, lo, hi)
    };
    let real =
        |given: bool, flag: &str, key: &str, v: f64, range: Interval| limits::real(&name(given, flag, key), v, range);
    if let Some(l) = &c.lora {
        let targets_given = a.lora_targets.is_some();
        let Some(max) = hetfed_fed::config::max_lora_rank(&ck.arch, &l.targets) else {
            bail!(
                "{}: expected names (or name suffixes) of linear layers of {} such as {}, found {:?}, which match none",
                name(targets_given, "--lora-targets", "lora.targets"),
                a.model.display(),
                ck.arch.default_lora_targets().join(","),
                l.targets
            );
        };
        let rank = name(a.lora_rank.is_some(), "--lora-rank", "lora.rank");
        if l.rank < 1 || l.rank > max {
            bail!(
                "{rank}: expected 1..={max} (min(in, out) of the smallest adapted layer of {}), found {}",
                a.model.display(),
                l.rank
            );
        }
        real(a.lora_alpha.is_some(), "--lora-alpha", "lora.alpha", l.alpha, Interval::POSITIVE)?;
        real(a.lora_dropout.is_some(), "--lora-dropout", "lora.dropout", l.dropout, Interval::right_open(0.0, 1.0))?;
    }
    real(a.lr.is_some(), "--lr", "lr", c.lr, Interval::left_open(0.0, 10.0))?;
    int(a.epochs.is_some(), "--epochs", "epochs", c.epochs, 1, 10_000)?;
    if let Some(m) = c.max_steps {
        int(a.max_steps.is_some(), "--max-steps", "max_steps", m, 1, 10_000_000)?;
    }
    int(a.batch_size.is_some(), "--batch-size", "batch_size", c.batch_size, 1, hetfed_fed::config::MAX_BATCH)?;
    int(a.grad_accum.is_some(), "--grad-accum", "grad_accum", c.grad_accum, 1, 4096)?;
    int(a.warmup_steps.is_some(), "--warmup-steps", "warmup_steps", c.warmup_steps, 0, 10_000_000)?;
    if let Some(g) = c.max_grad_norm {
        real(a.max_grad_norm.is_some(), "--max-grad-norm", "max_grad_norm", g, Interval::NON_NEGATIVE)?;
    }
    if let Some(g) = a.max_grad_norm {
        limits::real("--max-grad-norm", g, Interval::NON_NEGATIVE)?;
    }
    real(
        a.weight_decay.is_some(),
        "--weight-decay",
        "adamw.weight_decay",
        c.adamw.weight_decay,
        Interval::closed(0.0, 1.0),
    )?;
    // Only the file sets these (the defaults are in range).
    for (key, v, range) in [
        ("beta1", c.adamw.beta1, Interval::right_open(0.0, 1.0)),
        ("beta2", c.adamw.beta2, Interval::right_open(0.0, 1.0)),
        ("eps", c.adamw.eps, Interval::left_open(0.0, 1.0)),
    ] {
        limits::real(&format!("{file}: train.adamw.{key}"), v, range)?;
    }
    let ctx = limits::context(ck);
    let max_len = name(a.max_len.is_some(), "--max-len", "max_len");
    if c.max_len < 2 || c.max_len > ctx {
        bail!("{max_len}: expected 2..={ctx} (the context of {}), found {}", a.model.display(), c.max_len);
    }
    real(a.proximal_mu.is_some(), "--proximal-mu", "proximal_mu", c.proximal_mu, Interval::closed(0.0, 1e6))?;
    limits::int("--checkpoint-every", a.checkpoint_every, 1, 10_000_000)?;
    Ok(())
}

/// A flag that the first Ctrl-C sets (the run then saves its state and stops); a second Ctrl-C
/// ends the process at once.
pub fn stop_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    stop
}

/// Opens a file for appending (metrics logs survive `--resume`).
pub fn open_append(path: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta}) {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

pub fn finetune(a: FinetuneArgs) -> Result<()> {
    let ck = Checkpoint::load(&a.model)?;
    let cfg = train_config(&a, &ck)?;
    let tok = ck.tokenizer()?;
    let eos = ck.arch.eos_token_id();
    let train = hetfed_train::encode(tok, &hetfed_train::read_jsonl(&a.train)?, cfg.max_len, eos)?;
    let eval = match &a.eval {
        Some(p) => Some(hetfed_train::encode(tok, &hetfed_train::read_jsonl(p)?, cfg.max_len, eos)?),
        None => None,
    };
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let state_path = a.out.join("state.safetensors");
    let mut tr = Trainer::new(&ck, cfg.clone(), None)?;
    if a.resume {
        if !state_path.exists() {
            bail!("--resume: expected {}, found no such file", state_path.display());
        }
        tr.load_state(&state_path)?;
    }
    // Rows logged after the state being resumed (or, on a fresh start, by an earlier run into this
    // directory) are about to be logged again: drop them so every step has one row.
    hetfed_train::truncate_log_after(&a.out.join("metrics.jsonl"), tr.step)?;
    let before = match &eval {
        Some(e) => Some(tr.eval_loss(e)?),
        None => None,
    };
    let total = tr.total_steps(train.len());
    let pb = progress_bar(total as u64, "finetune");
    pb.set_position(tr.step as u64);
    let stop = stop_flag();
    let mut metrics = open_append(&a.out.join("metrics.jsonl"))?;
    let every = a.checkpoint_every;
    tr.train(
        &train,
        |r, t| {
            use std::io::Write;
            pb.set_position(r.step as u64);
            pb.set_message(format!("loss {:.4}  {:.0} tok/s  lr {:.2e}", r.loss, r.tokens_per_s, r.lr));
            writeln!(metrics, "{}", serde_json::to_string(r).expect("report serialises"))
                .map_err(|e| hetfed_core::Error::io("metrics.jsonl", e))?;
            if r.step % every == 0 {
                t.save_state(&state_path)?;
            }
            Ok(())
        },
        || stop.load(Ordering::SeqCst),
    )?;
    tr.save_state(&state_path)?;
    pb.finish();
    if stop.load(Ordering::SeqCst) {
        eprintln!(
            "stopped at step {}/{}; state saved to {} (continue with --resume)",
            tr.step,
            total,
            state_path.display()
        );
        return Ok(());
    }
    let id = ck.identity()?;
    let tv = match (tr.lora(), tr.weights()) {
        (Some(set), _) => {
            hetfed_taskvec::peft::export_peft_factors(
                &set.config,
                &set.to_tensors(),
                &a.out.join("adapter"),
                &a.model.display().to_string(),
            )?;
            TaskVector::from_lora(id.clone(), set)?
        }
        (None, Some(w)) => TaskVector::full_diff(id.clone(), &ck.weights, &w)?,
        (None, None) => unreachable!("a trainer is either LoRA or full"),
    };
    tv.save(&a.out.join("taskvec.safetensors"), DType::F32)?;
    if a.export_model || tr.lora().is_none() {
        let merged = tv.apply_validated(&id, &ck.weights, 1.0, "the base model")?;
        ck.save_as(&merged, &a.out.join("model"), DType::F32)?;
    }
    let after = match &eval {
        Some(e) => Some(tr.eval_loss(e)?),
        None => None,
    };
    println!(
        "fine-tuned {} steps; task vector {} ({} values, norm {:.4}) in {}",
        tr.step,
        tv.kind.name(),
        tv.num_stored_values(),
        tv.global_norm()?,
        a.out.display()
    );
    if let (Some(b), Some(f)) = (before, after) {
        println!("held-out loss {b:.4} -> {f:.4}");
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum TaskvecCmd {
    /// tau = finetuned - base, for two model directories of the same architecture
    Diff {
        #[arg(long, value_name = "DIR")]
        base: PathBuf,
        #[arg(long, value_name = "DIR")]
        finetuned: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Write base + lambda·tau as a model directory
    Apply {
        #[arg(long, value_name = "DIR")]
        base: PathBuf,
        #[arg(long, value_name = "FILE")]
        taskvec: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        lambda: f64,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Kind, base identity, size and per-layer norms of a task vector
    Info {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Combine task vectors: sum of lambda_i·tau_i (same base)
    Combine {
        /// FILE or FILE:LAMBDA, at least one
        #[arg(required = true, num_args = 1..)]
        inputs: Vec<String>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Turn a PEFT LoRA adapter for BASE into a hetfed task vector
    FromPeft {
        #[arg(long, value_name = "DIR")]
        base: PathBuf,
        #[arg(long, value_name = "DIR")]
        adapter: PathBuf,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub fn taskvec(c: TaskvecCmd) -> Result<()> {
    match c {
        TaskvecCmd::Diff { base, finetuned, out } => {
            let b = Checkpoint::load(&base)?;
            let f = Checkpoint::load(&finetuned)?;
            if b.arch != f.arch {
                bail!(
                    "{} is a {} model with another config than {} ({}): a task vector needs one architecture",
                    finetuned.display(),
                    f.arch.model_type(),
                    base.display(),
                    b.arch.model_type()
                );
            }
            let tv = TaskVector::full_diff(b.identity()?, &b.weights, &f.weights)?;
            tv.save(&out, DType::F32)?;
            println!(
                "wrote {} (full, {} values, norm {:.6})",
                out.display(),
                tv.num_stored_values(),
                tv.global_norm()?
            );
        }
        TaskvecCmd::Apply { base, taskvec, lambda, out } => {
            let b = Checkpoint::load(&base)?;
            let tv = TaskVector::load(&taskvec)?;
            // The same validation as the server's for an upload (identity, names, shapes, finite values).
            let w = tv
                .apply_validated(&b.identity()?, &b.weights, lambda, "the base model")
                .with_context(|| format!("applying {}", taskvec.display()))?;
            b.save_as(&w, &out, DType::F32)?;
            println!("wrote {}", out.display());
        }
        TaskvecCmd::Info { file, json } => {
            let tv = TaskVector::load(&file)?;
            let norms = tv.layer_norms()?;
            if json {
                let v = serde_json::json!({
                    "kind": tv.kind.name(),
                    "base": tv.base,
                    "lora": tv.lora_config(),
                    "num_params": tv.num_params(),
                    "num_stored_values": tv.num_stored_values(),
                    "global_norm": tv.global_norm()?,
                    "layer_norms": norms.iter().map(|(k, v)| serde_json::json!({"name": k, "norm": v})).collect::<Vec<_>>(),
                });
                println!("{v}");
            } else {
                println!("kind            {}", tv.kind.name());
                println!("base            {}", tv.base);
                if let Some(l) = tv.lora_config() {
                    println!("lora            rank {} alpha {} targets {}", l.rank, l.alpha, l.targets.join(","));
                }
                println!("parameters      {} (stored values {})", tv.num_params(), tv.num_stored_values());
                println!("global norm     {:.6}", tv.global_norm()?);
                for (k, v) in norms {
                    println!("  {v:>12.6}  {k}");
                }
            }
        }
        TaskvecCmd::Combine { inputs, out } => {
            let mut acc: Option<TaskVector> = None;
            for spec in &inputs {
                let (path, lambda) = parse_weighted(spec)?;
                let tv = TaskVector::load(&path)?.scale(lambda)?;
                acc = Some(match acc {
                    None => tv,
                    Some(a) => a.add(&tv).with_context(|| format!("adding {}", path.display()))?,
                });
            }
            let tv = acc.expect("clap requires at least one input");
            tv.save(&out, DType::F32)?;
            println!("wrote {} ({}, norm {:.6})", out.display(), tv.kind.name(), tv.global_norm()?);
        }
        TaskvecCmd::FromPeft { base, adapter, out } => {
            let b = Checkpoint::load(&base)?;
            let (cfg, factors) = hetfed_taskvec::peft::import_peft(&adapter)?;
            let set = LoraSet::from_tensors(&cfg, &factors)?;
            // Building the model checks every factor against the base's layer shapes.
            b.model(Some(&set)).with_context(|| format!("{} does not fit {}", adapter.display(), base.display()))?;
            let tv = TaskVector::from_lora(b.identity()?, &set)?;
            tv.save(&out, DType::F32)?;
            println!("wrote {} (lora rank {}, {} modules)", out.display(), cfg.rank, set.factors.len());
        }
    }
    Ok(())
}

fn parse_weighted(spec: &str) -> Result<(PathBuf, f64)> {
    if let Some((p, l)) = spec.rsplit_once(':') {
        if let Ok(x) = l.parse::<f64>() {
            return Ok((PathBuf::from(p), x));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}
