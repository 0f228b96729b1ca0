//! Fit time and peak memory of the projection maps between random-weight BLOOM models at real
//! widths (bloom-560m's hidden 1024 / 16 heads → bloom-7b1's 4096 / 32 heads) but few layers.
//!
//! ```sh
//! cargo run --release -p hetfed-transfer --example map_widths -- [streamed|in-memory] \
//!     [--layers 2] [--seqs 32] [--len 64] [--method procrustes] [--small 1024] [--large 4096]
//! ```
//!
//! `streamed` is [`PairMaps::fit_into`] (one block at a time, each layer's maps written to a
//! temporary directory as they are fitted, as the map cache does); `in-memory` is
//! [`PairMaps::fit_in_memory`] (every block's activations of both models held at once). Run each
//! in its own process: the peak resident set (`VmHWM`) is the process's.

use std::path::PathBuf;
use std::time::Instant;

use hetfed_model::bloom::Config;
use hetfed_model::{Arch, Checkpoint, ModelSpec};
use hetfed_transfer::{MapConfig, Method, PairMaps};

struct Args {
    path: String,
    layers: usize,
    seqs: usize,
    len: usize,
    method: Method,
    small: usize,
    large: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        path: "streamed".into(),
        layers: 2,
        seqs: 32,
        len: 64,
        method: Method::Procrustes,
        small: 1024,
        large: 4096,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k}: expected a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "streamed" | "in-memory" => a.path = k.clone(),
            "--layers" => a.layers = num(v()?)?,
            "--seqs" => a.seqs = num(v()?)?,
            "--len" => a.len = num(v()?)?,
            "--small" => a.small = num(v()?)?,
            "--large" => a.large = num(v()?)?,
            "--method" => a.method = v()?.parse()?,
            _ => return Err(format!("unknown argument {k:?}")),
        }
    }
    Ok(a)
}

/// A `status` line of this process in MiB (`VmRSS`, `VmHWM`).
fn status_mib(key: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = s
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kb / 1024.0
}

fn model(hidden: usize, heads: usize, layers: usize, seed: u64) -> Result<Checkpoint, Box<dyn std::error::Error>> {
    let c = Config {
        vocab_size: 1024,
        hidden_size: hidden,
        n_layer: layers,
        n_head: heads,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    };
    let weights = c.random_weights(seed)?;
    let spec = ModelSpec {
        dir: PathBuf::from(format!("random-{hidden}")),
        arch: Arch::Bloom(c.clone()),
        tokenizer: None,
        config_json: c.hf_config_json(),
    };
    Ok(Checkpoint { spec, weights })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    let small = model(a.small, a.small / 64, a.layers, 1)?;
    let large = model(a.large, a.large / 128, a.layers, 2)?;
    let mut x = 7u64;
    let seqs: Vec<Vec<u32>> = (0..a.seqs)
        .map(|_| {
            (0..a.len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) % 1024) as u32
                })
                .collect()
        })
        .collect();
    let (rss0, hwm0) = (status_mib("VmRSS:"), status_mib("VmHWM:"));
    let cfg = MapConfig { method: a.method, ..Default::default() };
    let t0 = Instant::now();
    // The streamed fit writes each layer's maps to a directory as it goes (what the map cache
    // does), so it holds one layer's maps at a time; the in-memory fit keeps every layer's.
    let dir = std::env::temp_dir().join(format!("hetfed-map-widths-{}", std::process::id()));
    let maps = match a.path.as_str() {
        "in-memory" => PairMaps::fit_in_memory(&small, &large, &seqs, "random", &cfg)?,
        _ => PairMaps::fit_into(&dir, &small, &large, &seqs, "random", &cfg)?,
    };
    let _ = std::fs::remove_dir_all(&dir);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} {}: hidden {} ({} heads) -> {} ({} heads), {} layers each, vocab 1024, {} seqs x {} tokens",
        a.path,
        a.method.name(),
        a.small,
        a.small / 64,
        a.large,
        a.large / 128,
        a.layers,
        a.seqs,
        a.len
    );
    println!("fit seconds: {secs:.1}");
    for l in &maps.summary.layers {
        println!("  large layer {} (small {}): {:.1} s", l.large_layer, l.small_layer, l.seconds);
    }
    println!("mean held-out R²: {:.4}", maps.summary.mean_explained_variance);
    println!("RSS before the fit (models built): {rss0:.0} MiB (peak so far {hwm0:.0} MiB)");
    println!("peak RSS (VmHWM): {:.0} MiB", status_mib("VmHWM:"));
    Ok(())
}
