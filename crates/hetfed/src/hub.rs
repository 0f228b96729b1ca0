//! `hetfed hub download` (built with `--features hub`): fetches a Hugging Face model repository's
//! checkpoint files into a directory hetfed loads (e.g. `bigscience/bloom-560m`). Uses the
//! standard Hugging Face cache and `HF_TOKEN` for gated models.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum HubCmd {
    /// Download config.json, tokenizer.json and the safetensors weights (sharded or not) of a model
    Download(DownloadArgs),
}

#[derive(Args)]
pub struct DownloadArgs {
    /// Repository id, e.g. bigscience/bloom-560m
    pub repo: String,
    /// Branch, tag or commit
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Directory to write the files to
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(c: HubCmd) -> Result<()> {
    let HubCmd::Download(a) = c;
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_progress(true)
        .build()
        .context("setting up the Hugging Face client")?;
    let repo = api.repo(hf_hub::Repo::with_revision(a.repo.clone(), hf_hub::RepoType::Model, a.revision.clone()));
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let fetch = |name: &str| -> Result<PathBuf> {
        let src = repo.get(name).with_context(|| format!("downloading {name} of {}@{}", a.repo, a.revision))?;
        let dst = a.out.join(name);
        std::fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        Ok(dst)
    };
    fetch("config.json")?;
    fetch("tokenizer.json")?;
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
                .with_context(|| format!("{}: expected JSON", index.display()))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .context("model.safetensors.index.json: expected a weight_map")?
                .values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                fetch(&s)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors").with_context(|| {
                format!(
                    "{} has neither model.safetensors nor model.safetensors.index.json (hetfed reads safetensors only)",
                    a.repo
                )
            })?;
        }
    }
    println!("{} -> {}", a.repo, a.out.display());
    Ok(())
}
