//! The model-level subcommands: score, generate, finetune, taskvec.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use hetfed_model::generate::SamplingConfig;
use hetfed_model::{CausalLm, Checkpoint, LoraConfig, LoraSet};
use hetfed_taskvec::TaskVector;
use hetfed_train::{Schedule, TrainConfig, Trainer};

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
    /// Scale of the task vector
    #[arg(long, default_value_t = 1.0, requires = "taskvec")]
    pub lambda: f64,
}

/// A checkpoint with what to run on top of it.
pub struct Loaded {
    pub ck: Checkpoint,
    pub model: Box<dyn CausalLm>,
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    let mut ck = Checkpoint::load(&args.model)?;
    let lora = match &args.adapter {
        Some(dir) => {
            let (cfg, factors) = hetfed_taskvec::peft::import_peft(dir)?;
            Some(LoraSet::from_tensors(&cfg, &factors)?)
        }
        None => None,
    };
    if let Some(path) = &args.taskvec {
        let tv = TaskVector::load(path)?;
        let id = ck.identity()?;
        ck.weights = tv.apply(&id, &ck.weights, args.lambda).with_context(|| format!("applying {}", path.display()))?;
    }
    let model = ck.model(lora.as_ref())?;
    Ok(Loaded { ck, model })
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Text to score (the tokenizer adds its special tokens, e.g. BOS)
    #[arg(long)]
    pub text: String,
    /// Print exactly one JSON object {"tokens": [...], "logprobs": [...]}
    #[arg(long)]
    pub json: bool,
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let l = load(&a.m)?;
    let tok = l.ck.tokenizer()?;
    let enc = tok.encode(a.text.as_str(), true).map_err(|e| anyhow::anyhow!("tokenising --text: {e}"))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        bail!("--text: expected text that encodes to at least one token, found none");
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
    /// Prompt to continue
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 decodes greedily
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Beam search with this many beams (deterministic; excludes sampling)
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
    /// Print {"prompt_tokens", "tokens", "text"} as one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.temperature < 0.0 {
        bail!("--temperature: expected a value >= 0, found {}", a.temperature);
    }
    if let Some(p) = a.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p: expected a value in (0, 1], found {p}");
        }
    }
    let l = load(&a.m)?;
    let tok = l.ck.tokenizer()?;
    let ids = tok.encode(a.prompt.as_str(), true).map_err(|e| anyhow::anyhow!("tokenising --prompt: {e}"))?.get_ids().to_vec();
    let cfg = SamplingConfig { max_new_tokens: a.max_new_tokens, temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let t0 = std::time::Instant::now();
    let eos = l.ck.arch.eos_token_id();
    let new = if a.num_beams > 1 {
        if a.temperature > 0.0 {
            bail!("--num-beams {}: beam search is deterministic; expected --temperature 0, found {}", a.num_beams, a.temperature);
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
        println!("{}{}", a.prompt, text);
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
    /// LoRA rank; without it every parameter is trained
    #[arg(long)]
    pub lora_rank: Option<usize>,
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Comma-separated module names or suffixes (default: the architecture's attention and MLP projections)
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// constant, linear or cosine
    #[arg(long)]
    pub schedule: Option<Schedule>,
    /// Clip the global gradient norm (0 disables)
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Longest sequence in tokens (prompts lose their start first)
    #[arg(long)]
    pub max_len: Option<usize>,
    /// FedProx coefficient mu: adds mu/2·||w - w_start||² to the loss
    #[arg(long)]
    pub proximal_mu: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Save a resumable state every N optimizer steps (and always at the end or on Ctrl-C)
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
    let mut c = match &a.config {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let f: FileConfig = toml::from_str(&s).with_context(|| format!("{}: expected TOML with a [train] table", p.display()))?;
            f.train.unwrap_or_default()
        }
        None => TrainConfig::default(),
    };
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
    if let Some(m) = a.max_steps {
        c.max_steps = Some(m);
    }
    if let Some(g) = a.max_grad_norm {
        c.max_grad_norm = (g > 0.0).then_some(g);
    }
    if let Some(w) = a.weight_decay {
        c.adamw.weight_decay = w;
    }
    c.validate().map_err(|e| anyhow::anyhow!("training config: {e}"))?;
    Ok(c)
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
    std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))
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
    let before = match &eval {
        Some(e) => Some(tr.eval_loss(e)?),
        None => None,
    };
    let total = tr.total_steps(train.len());
    let pb = progress_bar(total as u64, "finetune");
    pb.set_position(tr.step as u64);
    let stop = stop_flag();
    let mut metrics = open_append(&a.out.join("metrics.jsonl"))?;
    let every = a.checkpoint_every.max(1);
    tr.train(
        &train,
        |r, t| {
            use std::io::Write;
            pb.set_position(r.step as u64);
            pb.set_message(format!("loss {:.4}  {:.0} tok/s  lr {:.2e}", r.loss, r.tokens_per_s, r.lr));
            writeln!(metrics, "{}", serde_json::to_string(r).expect("report serialises")).map_err(|e| hetfed_core::Error::io("metrics.jsonl", e))?;
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
        eprintln!("stopped at step {}/{}; state saved to {} (continue with --resume)", tr.step, total, state_path.display());
        return Ok(());
    }
    let id = ck.identity()?;
    let tv = match (tr.lora(), tr.weights()) {
        (Some(set), _) => {
            hetfed_taskvec::peft::export_peft_factors(&set.config, &set.to_tensors(), &a.out.join("adapter"), &a.model.display().to_string())?;
            TaskVector::from_lora(id.clone(), set)?
        }
        (None, Some(w)) => TaskVector::full_diff(id.clone(), &ck.weights, &w)?,
        (None, None) => unreachable!("a trainer is either LoRA or full"),
    };
    tv.save(&a.out.join("taskvec.safetensors"), DType::F32)?;
    if a.export_model || tr.lora().is_none() {
        let merged = tv.apply(&id, &ck.weights, 1.0)?;
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
                bail!("{} is a {} model with another config than {} ({}): a task vector needs one architecture", finetuned.display(), f.arch.model_type(), base.display(), b.arch.model_type());
            }
            let tv = TaskVector::full_diff(b.identity()?, &b.weights, &f.weights)?;
            tv.save(&out, DType::F32)?;
            println!("wrote {} (full, {} values, norm {:.6})", out.display(), tv.num_stored_values(), tv.global_norm()?);
        }
        TaskvecCmd::Apply { base, taskvec, lambda, out } => {
            let b = Checkpoint::load(&base)?;
            let tv = TaskVector::load(&taskvec)?;
            let w = tv.apply(&b.identity()?, &b.weights, lambda)?;
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
