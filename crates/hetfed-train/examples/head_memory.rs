//! Peak memory and time of one LoRA training step through the fused LM head
//! (`CausalLm::target_logprobs` → `ops::linear_token_logprobs`) and through the full logits
//! (`forward` + `ops::token_logprobs`, the path before it), at a real vocabulary.
//!
//! ```sh
//! cargo run --release -p hetfed-train --example head_memory -- [--vocab 250880] [--hidden 1024] [--layers 2]
//! ```
//!
//! BLOOM with random weights (bloom-560m's vocabulary and width by default, `hidden / 64`
//! heads), LoRA rank 8 on `query_key_value`, batch 8 × 128 tokens, loss on every next token,
//! one AdamW step. Each path runs in a child process of its own (this binary again, with
//! `--path fused|unfused`), which builds the model, runs one warm-up step, resets its peak RSS
//! (`5` into `/proc/self/clear_refs`, Linux) and reports the peak RSS of the measured step
//! (`VmHWM`) above the RSS before it, and the step's wall time.

use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};

use hetfed_model::model::Unfused;
use hetfed_model::{bloom, CausalLm, LoraConfig, LoraSet, Weights};
use hetfed_train::{batch_nll, AdamW, AdamWConfig, Encoded};

const BATCH: usize = 8;
const SEQ: usize = 128;

struct Shape {
    vocab: usize,
    hidden: usize,
    layers: usize,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut shape = Shape { vocab: 250_880, hidden: 1024, layers: 2 };
    let mut path = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a}: expected a value"));
        match a.as_str() {
            "--vocab" => shape.vocab = value()?.parse()?,
            "--hidden" => shape.hidden = value()?.parse()?,
            "--layers" => shape.layers = value()?.parse()?,
            "--path" => path = Some(value()?),
            _ => return Err(format!("unknown argument {a}; expected --vocab, --hidden, --layers").into()),
        }
    }
    if shape.vocab < 2 || shape.hidden < 64 || !shape.hidden.is_multiple_of(64) || shape.layers == 0 {
        return Err("expected --vocab >= 2, --hidden a positive multiple of 64, --layers >= 1".into());
    }
    match path.as_deref() {
        Some(p @ ("fused" | "unfused")) => child(&shape, p == "fused"),
        Some(p) => Err(format!("--path: expected fused or unfused, found {p}").into()),
        None => parent(&shape),
    }
}

/// Runs both paths in child processes and prints their numbers side by side.
fn parent(s: &Shape) -> Result<(), Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let (threads, heads) = (rayon::current_num_threads(), s.hidden / 64);
    print!("BLOOM vocab {}, hidden {}, {} layers, {heads} heads, ", s.vocab, s.hidden, s.layers);
    println!("LoRA r8 on query_key_value, batch {BATCH} x seq {SEQ}, {threads} threads");
    println!(
        "{:<10} {:>14} {:>18} {:>14} {:>10} {:>12}",
        "path", "RSS before", "step peak above", "peak RSS", "step s", "loss"
    );
    let mut losses = Vec::new();
    for p in ["unfused", "fused"] {
        let out = std::process::Command::new(&exe)
            .args(["--path", p, "--vocab", &s.vocab.to_string()])
            .args(["--hidden", &s.hidden.to_string(), "--layers", &s.layers.to_string()])
            .output()?;
        if !out.status.success() {
            return Err(format!("{p}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let line = String::from_utf8(out.stdout)?;
        let f: Vec<f64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let [before, peak, secs, loss] = f[..] else { return Err(format!("{p}: unexpected output {line:?}").into()) };
        println!("{p:<10} {before:>10.0} MiB {peak:>14.0} MiB {:>10.0} MiB {secs:>10.2} {loss:>12.6}", before + peak);
        losses.push(loss);
    }
    println!("loss difference fused - unfused: {:.2e}", losses[1] - losses[0]);
    Ok(())
}

/// `VmRSS` or `VmHWM` of this process in MiB.
fn status_mib(key: &str) -> Result<f64, Box<dyn std::error::Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(key)).ok_or_else(|| format!("no {key} in /proc/self/status"))?;
    let kb: f64 = line.split_whitespace().nth(1).ok_or("malformed status line")?.parse()?;
    Ok(kb / 1024.0)
}

/// One path: prints `rss_before_mib step_peak_above_mib seconds loss`.
fn child(s: &Shape, fused: bool) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = bloom::Config {
        vocab_size: s.vocab,
        hidden_size: s.hidden,
        n_layer: s.layers,
        n_head: s.hidden / 64,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(3),
    };
    let weights = cfg.random_weights(0)?;
    let lora_cfg = LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec!["query_key_value".into()] };
    let set = LoraSet::init(&lora_cfg, &weights, 1)?;
    let model = bloom::Model::new(&cfg, &Weights { map: &weights, source: "head_memory" }, Some(&set))?;
    let unfused = Unfused(&model);
    let lm: &dyn CausalLm = if fused { &model } else { &unfused };
    let mut rng = rand::rngs::StdRng::seed_from_u64(1234);
    let data: Vec<Encoded> = (0..BATCH)
        .map(|_| Encoded { ids: (0..SEQ).map(|_| rng.random_range(0..s.vocab as u32)).collect(), prompt_len: 1 })
        .collect();
    let exs: Vec<&Encoded> = data.iter().collect();
    let mut opt = AdamW::new(set.vars(), AdamWConfig::default())?;
    let mut step = || -> Result<f32, Box<dyn std::error::Error>> {
        let nll = (batch_nll(lm, &exs)? / (BATCH * (SEQ - 1)) as f64)?;
        let loss = nll.to_scalar::<f32>()?;
        let g = nll.backward()?;
        let grads: Vec<Tensor> = opt
            .vars()
            .iter()
            .map(|(n, v)| g.get(v.as_tensor()).cloned().ok_or_else(|| format!("`{n}` got no gradient")))
            .collect::<Result<_, _>>()?;
        opt.step(&grads, 1e-4)?;
        Ok(loss)
    };
    // The first step's loss is the one reported (B = 0: the base model's loss), so both paths
    // report the same quantity; the second step is measured.
    let loss = step()?;
    let before = status_mib("VmRSS:")?;
    std::fs::write("/proc/self/clear_refs", "5")?;
    let t0 = Instant::now();
    step()?;
    let secs = t0.elapsed().as_secs_f64();
    let peak = status_mib("VmHWM:")?;
    println!("{before} {} {secs} {loss}", peak - before);
    Ok(())
}
