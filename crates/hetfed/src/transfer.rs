//! Heterogeneous transfer commands: `project` (a small model's task vector into a large model,
//! offline, or back with `--reverse`) and `sweep` (the EXPERIMENTS.md table).

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use hetfed_model::Checkpoint;
use hetfed_taskvec::TaskVector;
use hetfed_transfer::{sample_sequences, MapConfig, Method, PairMaps};

#[derive(Args)]
pub struct ProjectArgs {
    /// The small model the task vector was made from (HF directory)
    #[arg(long, value_name = "DIR")]
    pub small: PathBuf,
    /// The large model to project into (HF directory, same tokenizer)
    #[arg(long, value_name = "DIR")]
    pub large: PathBuf,
    /// The small model's task vector (hetfed taskvec file)
    #[arg(long, value_name = "FILE")]
    pub taskvec: PathBuf,
    /// Where to write the projected task vector (of the large model)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Map method: procrustes, ridge, weight_space, random (control) or identity (control)
    #[arg(long, default_value = "procrustes")]
    pub method: Method,
    /// Calibration sequences sampled from the large model: 2..=4096, and at most 65536
    /// calibration tokens in all
    #[arg(long, default_value_t = 64)]
    pub calibration_sequences: usize,
    /// Tokens per calibration sequence: 4..=4096, at most the context of both models
    #[arg(long, default_value_t = 32)]
    pub calibration_len: usize,
    /// Seed of the calibration sampling and of random maps
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Map cache directory
    #[arg(long, value_name = "DIR", default_value = "runs/maps")]
    pub cache_dir: PathBuf,
    /// Scale of the projected update (a finite number)
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// The reverse direction (personalisation): --taskvec is a task vector of the *large* model,
    /// moved into the small one with the transposed maps
    #[arg(long)]
    pub reverse: bool,
}

pub fn project(a: ProjectArgs) -> Result<()> {
    use crate::limits;
    use hetfed_fed::config::MAX_CALIBRATION_TOKENS;
    limits::int("--calibration-sequences", a.calibration_sequences, 2, 4096)?;
    limits::int("--calibration-len", a.calibration_len, 4, 4096)?;
    if a.calibration_sequences * a.calibration_len > MAX_CALIBRATION_TOKENS {
        anyhow::bail!(
            "--calibration-sequences × --calibration-len: expected at most {MAX_CALIBRATION_TOKENS} calibration tokens, found {} × {} = {}",
            a.calibration_sequences,
            a.calibration_len,
            a.calibration_sequences * a.calibration_len
        );
    }
    if !a.scale.is_finite() {
        anyhow::bail!("--scale: expected a finite number, found {}", a.scale);
    }
    let small = Checkpoint::load(&a.small)?;
    let large = Checkpoint::load(&a.large)?;
    limits::seq_len("--calibration-len", a.calibration_len, 4, &small)?;
    limits::seq_len("--calibration-len", a.calibration_len, 4, &large)?;
    let tv = TaskVector::load(&a.taskvec)?;
    let cfg = MapConfig { method: a.method, seed: a.seed, ..Default::default() };
    let key = format!("sample:n={}:len={}", a.calibration_sequences, a.calibration_len);
    let (maps, cached) = PairMaps::load_or_fit(&a.cache_dir, &small, &large, &key, &cfg, || {
        let model = large.model(None)?;
        sample_sequences(
            model.as_ref(),
            large.arch.eos_token_id().unwrap_or(0),
            a.calibration_sequences,
            a.calibration_len,
            a.seed,
        )
    })?;
    let (p, report) = if a.reverse { maps.project_back(&tv)? } else { maps.project(&tv)? };
    let p = if a.scale != 1.0 { p.scale(a.scale)? } else { p };
    p.save(&a.out, DType::F32).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "maps ({}): {} {:.1} s, mean held-out explained variance {:.3} (embedding {:.3})",
        a.method.name(),
        if cached { "from the cache, fitted once in" } else { "fitted in" },
        maps.summary.seconds,
        maps.summary.mean_explained_variance,
        maps.summary.embed_explained_variance
    );
    for (space, r2) in maps.mean_explained_variance_by_space() {
        println!("  {space:<10} R² {r2:.3}");
    }
    let (n_in, n_out) =
        report.modules.iter().fold((0.0, 0.0), |(x, y), m| (x + m.norm_in * m.norm_in, y + m.norm_out * m.norm_out));
    println!(
        "projected {} modules (norm {:.4} → {:.4}), dropped {} parameters; wrote {}",
        report.modules.len(),
        f64::sqrt(n_in),
        f64::sqrt(n_out),
        report.dropped.len(),
        a.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct SweepArgs {
    /// Sweep config (TOML: base run config, seeds, rows)
    #[arg(long, value_name = "FILE", default_value = "configs/sweep.toml")]
    pub config: PathBuf,
    /// Output directory: results.json and table.md
    #[arg(long, value_name = "DIR", default_value = "runs/sweep")]
    pub out: PathBuf,
    /// Data directory (default: $HETFED_DATA_DIR, else ../shared/data if it exists, else the
    /// per-user cache, where the datasets of the base config are fetched first)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Only render table.md again from --out's results.json (no training)
    #[arg(long)]
    pub table_only: bool,
    /// Keep the cells already in --out's results.json (same row and seed) and run only the rest
    #[arg(long, conflicts_with = "table_only")]
    pub resume: bool,
}

pub fn sweep(a: SweepArgs) -> Result<()> {
    if a.table_only {
        let path = a.out.join("results.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let results: Vec<hetfed_fed::sweep::RowResult> = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected the results of hetfed sweep", path.display()))?;
        let table = hetfed_fed::sweep::render_table(&results);
        std::fs::write(a.out.join("table.md"), &table)?;
        println!("{table}");
        return Ok(());
    }
    let (sweep, sweep_dir) = hetfed_fed::sweep::SweepConfig::from_file(&a.config)?;
    // Every row runs the base config's tasks and evaluation: its datasets are what the sweep needs.
    let base = hetfed_fed::RunConfig::from_file(&sweep_dir.join(&sweep.base))?;
    let dir = crate::fed::data_dir_for(a.data_dir.as_deref(), crate::fed::run_needs(&base))?;
    let pb = crate::commands::progress_bar((sweep.rows.len() * sweep.seeds.len()) as u64, "sweep");
    let results = hetfed_fed::sweep::run_sweep(&a.config, &dir, &a.out, a.resume, |line| {
        // One line per finished cell, on a terminal above the bar, otherwise (a log file) on stderr.
        if pb.is_hidden() {
            eprintln!("{line}");
        } else {
            pb.println(line);
        }
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    let table = hetfed_fed::sweep::render_table(&results);
    let path = a.out.join("table.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{table}\nresults  {}\ntable    {}", a.out.join("results.json").display(), path.display());
    Ok(())
}
