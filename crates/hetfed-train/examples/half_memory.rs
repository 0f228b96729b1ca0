//! Peak memory of loading and running a BLOOM checkpoint kept in half precision
//! (`WeightDtype::Stored` on an f16 file) against the same file widened to f32 at load.
//!
//! ```sh
//! # a random-weight checkpoint of bloom-560m's exact shape (f16, about 1.1 GB)
//! cargo run --release -p hetfed-train --example half_memory -- --write DIR
//! # load + score one batch (and one LoRA step with --lora) per dtype, each in a child process
//! cargo run --release -p hetfed-train --example half_memory -- DIR [--lora]
//! ```
//!
//! Each dtype runs in a child process of its own (this binary again, with `--dtype`), which
//! reports the peak RSS (`VmHWM`, Linux) after loading, the RSS after loading, and the peak while
//! scoring a batch of 4 × 128 tokens through the fused head (`target_logprobs`), and with
//! `--lora` while taking one LoRA step (rank 8 on `query_key_value`, batch 2 × 128, AdamW); the
//! peak is reset (`5` into `/proc/self/clear_refs`) before each phase.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use hetfed_core::TensorMap;
use hetfed_model::{bloom, Checkpoint, LoraConfig, LoraSet, WeightDtype};
use hetfed_train::{batch_nll, AdamW, AdamWConfig, Encoded};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let (mut write, mut dir, mut dtype, mut lora) = (None, None, None, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--write" => write = Some(PathBuf::from(args.next().ok_or("--write: expected a directory")?)),
            "--dtype" => dtype = Some(args.next().ok_or("--dtype: expected a value")?.parse::<WeightDtype>()?),
            "--lora" => lora = true,
            _ if !a.starts_with("--") && dir.is_none() => dir = Some(PathBuf::from(a)),
            _ => return Err(format!("unknown argument {a}; expected --write DIR, or DIR [--lora]").into()),
        }
    }
    if let Some(out) = write {
        return write_checkpoint(&out);
    }
    let dir = dir.ok_or("expected a checkpoint directory (write one with --write DIR)")?;
    match dtype {
        Some(d) => child(&dir, d, lora),
        None => parent(&dir, lora),
    }
}

/// bloom-560m's shape.
fn config() -> bloom::Config {
    bloom::Config {
        vocab_size: 250_880,
        hidden_size: 1024,
        n_layer: 24,
        n_head: 16,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(3),
    }
}

/// Random weights (matrices uniform in ±0.035, about BLOOM's N(0, 0.02) spread; gains 1, biases
/// 0), each made in f32 and rounded to f16 at once, written as an HF directory.
fn write_checkpoint(out: &Path) -> Res<()> {
    let cfg = config();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut map = TensorMap::new();
    for (name, shape) in cfg.param_shapes() {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n).map(|_| rng.random_range(-0.035f32..0.035)).collect()
        };
        map.insert(name, Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::F16)?);
    }
    std::fs::create_dir_all(out)?;
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    hetfed_core::save_safetensors(&map, DType::F16, &meta, &out.join("model.safetensors"))?;
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&cfg.hf_config_json())?)?;
    println!("wrote {}", out.display());
    Ok(())
}

fn parent(dir: &Path, lora: bool) -> Res<()> {
    let exe = std::env::current_exe()?;
    println!("bloom-560m shape (f16 file), {} threads", rayon::current_num_threads());
    println!(
        "{:<7} {:>14} {:>14} {:>16} {:>8} {:>16} {:>8} {:>12}",
        "dtype", "load peak", "resident", "score peak", "score s", "LoRA step peak", "step s", "mean logprob"
    );
    for d in [WeightDtype::Stored, WeightDtype::F32] {
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg(dir).args(["--dtype", &d.to_string()]);
        if lora {
            cmd.arg("--lora");
        }
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(format!("{d}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let line = String::from_utf8(out.stdout)?;
        let f: Vec<f64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let [load, resident, score, score_s, step, step_s, lp] = f[..] else {
            return Err(format!("{d}: unexpected output {line:?}").into());
        };
        let step = if lora { format!("{step:.0} MiB") } else { "-".into() };
        let step_s = if lora { format!("{step_s:.1}") } else { "-".into() };
        println!(
            "{:<7} {load:>10.0} MiB {resident:>10.0} MiB {score:>12.0} MiB {score_s:>8.1} {step:>16} {step_s:>8} {lp:>12.6}",
            d.to_string()
        );
    }
    Ok(())
}

/// `VmRSS` or `VmHWM` of this process in MiB.
fn status_mib(key: &str) -> Res<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(key)).ok_or_else(|| format!("no {key} in /proc/self/status"))?;
    let kb: f64 = line.split_whitespace().nth(1).ok_or("malformed status line")?.parse()?;
    Ok(kb / 1024.0)
}

fn reset_peak() -> Res<()> {
    Ok(std::fs::write("/proc/self/clear_refs", "5")?)
}

/// Prints `load_peak resident score_peak score_s step_peak step_s mean_logprob` (MiB, seconds).
fn child(dir: &Path, dtype: WeightDtype, lora: bool) -> Res<()> {
    let ck = Checkpoint::load_with(dir, dtype)?;
    let load_peak = status_mib("VmHWM:")?;
    let resident = status_mib("VmRSS:")?;
    let vocab = ck.arch.vocab_size() as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut seqs = |b: usize| -> Vec<Vec<u32>> {
        (0..b).map(|_| (0..128).map(|_| rng.random_range(4..vocab)).collect()).collect()
    };
    let score_batch = seqs(4);
    let model = ck.model(None)?;
    reset_peak()?;
    let t0 = Instant::now();
    let lps = hetfed_model::score::sequence_logprobs(model.as_ref(), &score_batch, 4)?;
    let score_s = t0.elapsed().as_secs_f64();
    let score_peak = status_mib("VmHWM:")?;
    let n: usize = lps.iter().map(Vec::len).sum();
    let mean = lps.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    drop(model);
    let (mut step_peak, mut step_s) = (0.0, 0.0);
    if lora {
        let cfg = LoraConfig { rank: 8, alpha: 16.0, dropout: 0.0, targets: vec!["query_key_value".into()] };
        let set = LoraSet::init(&cfg, &ck.weights, 1)?;
        let model = ck.model(Some(&set))?;
        let data: Vec<Encoded> = seqs(2).into_iter().map(|ids| Encoded { ids, prompt_len: 1 }).collect();
        let exs: Vec<&Encoded> = data.iter().collect();
        let mut opt = AdamW::new(set.vars(), AdamWConfig::default())?;
        reset_peak()?;
        let t0 = Instant::now();
        let nll = (batch_nll(model.as_ref(), &exs)? / (2.0 * 127.0))?;
        let g = nll.backward()?;
        let grads: Vec<Tensor> = opt
            .vars()
            .iter()
            .map(|(n, v)| g.get(v.as_tensor()).cloned().ok_or_else(|| format!("`{n}` got no gradient")))
            .collect::<Result<_, _>>()?;
        opt.step(&grads, 1e-4)?;
        step_s = t0.elapsed().as_secs_f64();
        step_peak = status_mib("VmHWM:")?;
    }
    println!("{load_peak} {resident} {score_peak} {score_s} {step_peak} {step_s} {mean}");
    Ok(())
}
