//! `hetfed bench`: training and inference throughput of the reference shape (BLOOM, vocab 8192,
//! hidden 256, 4 layers, 4 heads, batch 8 × sequence 128, f32), next to the identical PyTorch
//! model (`benches/torch_reference.py`) in the same run, with the ratio.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};

use hetfed_model::{bloom, Arch, Checkpoint};
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
    Ok(Checkpoint {
        dir: PathBuf::from("<bench>"),
        config_json: serde_json::to_value(&cfg)?,
        arch: Arch::Bloom(cfg),
        weights,
        tokenizer: None,
    })
}

struct Rates {
    train: f64,
    infer: f64,
}

fn measure_rust(steps: usize) -> Result<Rates> {
    let ck = reference_checkpoint()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let data: Vec<Encoded> = (0..BATCH)
        .map(|_| Encoded { ids: (0..SEQ).map(|_| rng.random_range(0..VOCAB as u32)).collect(), prompt_len: 1 })
        .collect();
    // Same work as the PyTorch script: full fine-tuning, loss on every next token, AdamW, no clipping.
    let cfg = TrainConfig {
        lr: 1e-4,
        batch_size: BATCH,
        epochs: WARMUP + steps,
        max_grad_norm: None,
        max_len: SEQ,
        schedule: hetfed_train::Schedule::Constant,
        ..Default::default()
    };
    let mut tr = Trainer::new(&ck, cfg, None)?;
    let mut t0 = None;
    tr.train(
        &data,
        |r, _| {
            if r.step == WARMUP {
                t0 = Some(Instant::now());
            }
            Ok(())
        },
        || false,
    )?;
    let train = (BATCH * SEQ * steps) as f64 / t0.context("warm-up did not finish")?.elapsed().as_secs_f64();

    let model = ck.model(None)?;
    let ids =
        Tensor::from_vec(data.iter().flat_map(|e| e.ids.clone()).collect::<Vec<u32>>(), (BATCH, SEQ), &Device::Cpu)?;
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
