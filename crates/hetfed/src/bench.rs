//! `hetfed bench`: training and inference throughput of the reference shape (BLOOM, vocab 8192,
//! hidden 256, 4 layers, 4 heads, batch 8 × sequence 128, f32), next to the identical PyTorch
//! model (`benches/torch_reference.py`) in the same run, with the ratio.
//!
//! With `--model DIR`, any model directory instead: LoRA training (rank `--lora-rank`, alpha
//! twice the rank, every attention and MLP projection, AdamW) and scoring (the log-probability
//! of each next token of the batch) on random token ids, tokens/s and peak resident memory,
//! next to transformers + peft doing the same on the same directory, with the ratios. Each
//! implementation runs in its own process (hetfed in a child of this one), so each peak is its
//! own.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};

use hetfed_model::{bloom, Arch, Checkpoint, ModelSpec};
use hetfed_train::{Encoded, TrainConfig, Trainer};

#[derive(Args)]
pub struct BenchArgs {
    /// Measured steps (after 2 warm-up steps) for training and for inference: 1..=10000
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Python interpreter with torch + transformers for the side-by-side baseline; "none" skips it
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// The PyTorch reference script
    #[arg(long, default_value = "benches/torch_reference.py")]
    pub torch_script: PathBuf,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    /// Benchmark this Hugging Face model directory (LoRA training and scoring, tokens/s and
    /// peak memory) instead of the reference shape
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// With --model: sequences per batch, 1..=1024
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// With --model: tokens per sequence, 2..=65536
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// With --model: LoRA rank, 1..=4096
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// With --model: how hetfed holds the frozen weights (stored = the file's dtype, f32, bf16,
    /// f16); PyTorch always computes in f32, its fastest CPU path
    #[arg(long, default_value = "stored")]
    pub dtype: hetfed_model::WeightDtype,
    /// With --model: recompute each block's activations in the backward pass, on both sides
    /// (hetfed's `gradient_checkpointing`, PyTorch's `gradient_checkpointing_enable()`)
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Internal: measure hetfed alone on --model and print one JSON line (the child process)
    #[arg(long, hide = true)]
    pub hetfed_only: bool,
}

const VOCAB: usize = 8192;
const HIDDEN: usize = 256;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const BATCH: usize = 8;
const SEQ: usize = 128;
const WARMUP: usize = 2;

fn reference_checkpoint() -> Result<Checkpoint> {
    let cfg = bloom::Config {
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        n_layer: LAYERS,
        n_head: HEADS,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(3),
    };
    let weights = cfg.random_weights(0)?;
    let spec = ModelSpec {
        dir: PathBuf::from("<bench>"),
        config_json: serde_json::to_value(&cfg)?,
        arch: Arch::Bloom(cfg),
        tokenizer: None,
    };
    Ok(Checkpoint { spec, weights })
}

struct Rates {
    train: f64,
    infer: f64,
}

/// Training tokens/s of `ck` on `data` (one batch of equal-length rows, loss on every next
/// token, AdamW at lr 1e-4, no clipping; LoRA when `lora` is given): [`WARMUP`] steps, then
/// `steps` timed ones.
fn train_tokens_per_s(
    ck: &Checkpoint,
    data: &[Encoded],
    lora: Option<hetfed_model::LoraConfig>,
    steps: usize,
    gradient_checkpointing: bool,
) -> Result<f64> {
    let seq = data.first().map_or(0, |e| e.ids.len());
    let cfg = TrainConfig {
        lora,
        lr: 1e-4,
        batch_size: data.len(),
        epochs: WARMUP + steps,
        max_grad_norm: None,
        max_len: seq,
        schedule: hetfed_train::Schedule::Constant,
        gradient_checkpointing,
        ..Default::default()
    };
    let mut tr = Trainer::new(ck, cfg, None)?;
    let mut t0 = None;
    tr.train(
        data,
        |r, _| {
            if r.step == WARMUP {
                t0 = Some(Instant::now());
            }
            Ok(())
        },
        || false,
    )?;
    Ok((data.len() * seq * steps) as f64 / t0.context("warm-up did not finish")?.elapsed().as_secs_f64())
}

fn measure_rust(steps: usize) -> Result<Rates> {
    let ck = reference_checkpoint()?;
    let flat = random_ids(BATCH, SEQ, VOCAB);
    let data: Vec<Encoded> = flat.chunks(SEQ).map(|row| Encoded { ids: row.to_vec(), prompt_len: 1 }).collect();
    // Same work as the PyTorch script: full fine-tuning, loss on every next token, AdamW, no clipping.
    let train = train_tokens_per_s(&ck, &data, None, steps, false)?;

    let model = ck.model(None)?;
    let ids = Tensor::from_vec(flat, (BATCH, SEQ), &Device::Cpu)?;
    for _ in 0..WARMUP {
        model.forward(&ids, None)?;
    }
    let t = Instant::now();
    for _ in 0..steps {
        model.forward(&ids, None)?;
    }
    let infer = (BATCH * SEQ * steps) as f64 / t.elapsed().as_secs_f64();
    Ok(Rates { train, infer })
}

fn measure_torch(a: &BenchArgs, threads: usize) -> Result<Option<Rates>> {
    if a.python == "none" {
        return Ok(None);
    }
    let out = std::process::Command::new(&a.python)
        .arg(&a.torch_script)
        .args(["--threads", &threads.to_string(), "--steps", &a.steps.to_string()])
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            eprintln!(
                "PyTorch baseline skipped: {} {} failed: {}",
                a.python,
                a.torch_script.display(),
                err.lines().last().unwrap_or("")
            );
            return Ok(None);
        }
        Err(e) => {
            eprintln!("PyTorch baseline skipped: cannot run {}: {e}", a.python);
            return Ok(None);
        }
    };
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
        .context("parsing the PyTorch script's JSON line")?;
    let get =
        |k: &str| v.get(k).and_then(serde_json::Value::as_f64).with_context(|| format!("PyTorch JSON has no `{k}`"));
    Ok(Some(Rates { train: get("train_tokens_per_s")?, infer: get("infer_tokens_per_s")? }))
}

pub fn run(a: BenchArgs) -> Result<()> {
    crate::limits::int("--steps", a.steps, 1, 10_000)?;
    if let Some(dir) = a.model.clone() {
        return run_model(&a, &dir);
    }
    let threads = rayon::current_num_threads();
    let rust = measure_rust(a.steps)?;
    let torch = measure_torch(&a, threads)?;
    if a.json {
        let mut v = serde_json::json!({
            "shape": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "batch": BATCH, "seq": SEQ},
            "threads": threads,
            "hetfed": {"train_tokens_per_s": rust.train, "infer_tokens_per_s": rust.infer},
        });
        if let Some(t) = &torch {
            v["pytorch"] = serde_json::json!({"train_tokens_per_s": t.train, "infer_tokens_per_s": t.infer});
            v["ratio"] = serde_json::json!({"train": rust.train / t.train, "infer": rust.infer / t.infer});
        }
        println!("{v}");
        return Ok(());
    }
    println!("BLOOM vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, batch {BATCH} x seq {SEQ}, f32, {threads} threads, {} steps", a.steps);
    println!("{:<10} {:>18} {:>18}", "", "train tokens/s", "infer tokens/s");
    println!("{:<10} {:>18.0} {:>18.0}", "hetfed", rust.train, rust.infer);
    if let Some(t) = torch {
        println!("{:<10} {:>18.0} {:>18.0}", "pytorch", t.train, t.infer);
        println!("{:<10} {:>18.2} {:>18.2}", "ratio", rust.train / t.train, rust.infer / t.infer);
    }
    Ok(())
}

/// One implementation's numbers on a model directory.
#[derive(serde::Serialize, serde::Deserialize)]
struct ModelRates {
    train_tokens_per_s: f64,
    infer_tokens_per_s: f64,
    peak_rss_bytes: u64,
}

/// The batch both implementations see: `batch` rows of `seq` ids below `vocab` (fixed seed).
fn random_ids(batch: usize, seq: usize, vocab: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    (0..batch * seq).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// hetfed on `dir`: LoRA training steps, then scoring passes; run in a child process.
fn measure_model(a: &BenchArgs, dir: &std::path::Path) -> Result<ModelRates> {
    let ck = Checkpoint::load_with(dir, a.dtype)?;
    let ids = random_ids(a.batch, a.seq, ck.arch.vocab_size());
    let data: Vec<Encoded> = ids.chunks(a.seq).map(|row| Encoded { ids: row.to_vec(), prompt_len: 1 }).collect();
    let lora = hetfed_model::LoraConfig {
        rank: a.lora_rank,
        alpha: 2.0 * a.lora_rank as f64,
        dropout: 0.0,
        targets: ck.arch.default_lora_targets(),
    };
    let train = train_tokens_per_s(&ck, &data, Some(lora), a.steps, a.gradient_checkpointing)?;
    let model = ck.model(None)?;
    let t = Tensor::from_vec(ids.clone(), (a.batch, a.seq), &Device::Cpu)?;
    let targets: Vec<u32> = ids.chunks(a.seq).flat_map(|row| row[1..].to_vec()).collect();
    for _ in 0..WARMUP {
        model.target_logprobs(&t, &targets)?;
    }
    let t1 = Instant::now();
    for _ in 0..a.steps {
        model.target_logprobs(&t, &targets)?;
    }
    let infer = (a.batch * a.seq * a.steps) as f64 / t1.elapsed().as_secs_f64();
    Ok(ModelRates {
        train_tokens_per_s: train,
        infer_tokens_per_s: infer,
        peak_rss_bytes: hetfed_fed::sys::peak_rss_bytes(),
    })
}

/// Runs `cmd`, which prints one JSON line of [`ModelRates`] last; `what` names it in errors and
/// in the spinner shown while it runs (its output is captured, so the spinner shows it is alive).
fn child_rates(mut cmd: std::process::Command, what: &str) -> Result<ModelRates> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("valid template"),
    );
    spinner.set_message(format!("measuring {what}: LoRA training steps, then scoring passes"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let out = cmd.output().with_context(|| format!("running {what}"));
    spinner.finish_and_clear();
    let out = out?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{what} failed: {}", err.lines().last().unwrap_or("(no output)"));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim().lines().last().unwrap_or(""))
        .with_context(|| format!("{what}: expected one JSON line of rates, found {:?}", text.trim()))
}

fn run_model(a: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    crate::limits::int("--batch", a.batch, 1, 1024)?;
    crate::limits::int("--seq", a.seq, 2, 65_536)?;
    crate::limits::int("--lora-rank", a.lora_rank, 1, 4096)?;
    if a.hetfed_only {
        println!("{}", serde_json::to_string(&measure_model(a, dir)?)?);
        return Ok(());
    }
    let shape = |k: &str, v: usize| [format!("--{k}"), v.to_string()];
    let mut common: Vec<String> =
        [shape("steps", a.steps), shape("batch", a.batch), shape("seq", a.seq), shape("lora-rank", a.lora_rank)]
            .into_iter()
            .flatten()
            .collect();
    if a.gradient_checkpointing {
        common.push("--gradient-checkpointing".into());
    }
    let threads = rayon::current_num_threads();
    let mut me = std::process::Command::new(std::env::current_exe().context("locating the hetfed binary")?);
    me.args(["--threads", &threads.to_string(), "bench", "--hetfed-only", "--model"]).arg(dir).args(&common);
    me.args(["--dtype", &a.dtype.to_string()]);
    let rust = child_rates(me, "hetfed")?;
    let torch = if a.python == "none" {
        None
    } else {
        let mut py = std::process::Command::new(&a.python);
        py.arg(&a.torch_script).args(["--threads", &threads.to_string(), "--model"]).arg(dir).args(&common);
        match child_rates(py, &format!("{} {}", a.python, a.torch_script.display())) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("PyTorch baseline skipped: {e:#}");
                None
            }
        }
    };
    if a.json {
        let mut v = serde_json::json!({
            "model": dir.display().to_string(),
            "shape": {"batch": a.batch, "seq": a.seq, "lora_rank": a.lora_rank},
            "threads": threads,
            "hetfed": rust,
        });
        if let Some(t) = &torch {
            v["pytorch"] = serde_json::to_value(t)?;
            v["ratio"] = serde_json::json!({
                "train": rust.train_tokens_per_s / t.train_tokens_per_s,
                "infer": rust.infer_tokens_per_s / t.infer_tokens_per_s,
                "peak_rss": rust.peak_rss_bytes as f64 / t.peak_rss_bytes as f64,
            });
        }
        println!("{v}");
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "{}: LoRA rank {} training and scoring, batch {} x seq {}, {threads} threads, {} steps",
        dir.display(),
        a.lora_rank,
        a.batch,
        a.seq,
        a.steps
    );
    println!("{:<10} {:>18} {:>18} {:>16}", "", "train tokens/s", "score tokens/s", "peak RSS GiB");
    let row = |name: &str, r: &ModelRates| {
        println!(
            "{:<10} {:>18.1} {:>18.1} {:>16.2}",
            name,
            r.train_tokens_per_s,
            r.infer_tokens_per_s,
            gib(r.peak_rss_bytes)
        )
    };
    row("hetfed", &rust);
    if let Some(t) = &torch {
        row("pytorch", t);
        println!(
            "{:<10} {:>18.2} {:>18.2} {:>16.2}",
            "ratio",
            rust.train_tokens_per_s / t.train_tokens_per_s,
            rust.infer_tokens_per_s / t.infer_tokens_per_s,
            rust.peak_rss_bytes as f64 / t.peak_rss_bytes as f64
        );
    }
    Ok(())
}
