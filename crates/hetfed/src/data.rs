//! `hetfed data`: turn a task's split into fine-tuning JSONL, and split it among clients.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};

use hetfed_data::partition::{quantity, with_token_counts};
use hetfed_data::{partition_stats, DataDir, PartitionScheme, Split, TaskRegistry};

#[derive(Args, Clone)]
pub struct TaskArgs {
    /// Task name (see `hetfed eval --help`)
    #[arg(long)]
    pub task: String,
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Data directory (default: $HETFED_DATA_DIR, else the per-user cache directory)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A TOML file of task definitions that add to or override the built-ins
    #[arg(long, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Write a task split as {"prompt", "target"} JSONL for `hetfed finetune`
    Export {
        #[command(flatten)]
        t: TaskArgs,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Split a task split among clients and print each client's statistics (JSON lines)
    Partition {
        #[command(flatten)]
        t: TaskArgs,
        /// Number of clients: 1..=1024
        #[arg(long)]
        clients: usize,
        #[arg(long, value_enum, default_value = "iid")]
        scheme: Scheme,
        /// Concentration for dirichlet (label skew) and quantity (size skew): (0, 1000000]
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Count tokens (prompt + target) with this model's tokenizer.json for the statistics
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        /// Write each client's examples as OUT/client_<i>.jsonl ({"prompt", "target"})
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Scheme {
    Iid,
    Dirichlet,
    Quantity,
}

/// The built-in tasks, plus (or overridden by) those in a `--tasks` TOML file.
pub fn task_registry(tasks: Option<&std::path::Path>) -> Result<TaskRegistry> {
    Ok(match tasks {
        Some(p) => TaskRegistry::from_toml_file(p)?,
        None => TaskRegistry::new(),
    })
}

fn load(t: &TaskArgs) -> Result<(hetfed_data::TaskSpec, hetfed_data::Examples)> {
    let task = task_registry(t.tasks.as_deref())?.get(&t.task)?;
    let split: Split = t.split.parse()?;
    let examples = task.load(&DataDir::resolve(t.data_dir.as_deref())?, split)?;
    Ok((task, examples))
}

pub fn run(c: DataCmd) -> Result<()> {
    match c {
        DataCmd::Export { t, out } => {
            let (task, examples) = load(&t)?;
            let pairs = task.to_prompt_target(&examples, None)?;
            hetfed_data::task::write_prompt_target_jsonl(&out, &pairs)?;
            println!("wrote {} examples of {} ({}) to {}", pairs.len(), task.name, t.split, out.display());
        }
        DataCmd::Partition { t, clients, scheme, alpha, seed, model, out } => {
            crate::limits::int("--clients", clients, 1, hetfed_fed::config::MAX_CLIENTS)?;
            if !matches!(scheme, Scheme::Iid) {
                crate::limits::real("--alpha", alpha, hetfed_fed::config::Interval::left_open(0.0, 1e6))?;
            }
            let (task, examples) = load(&t)?;
            let labels = examples.labels();
            let n = examples.len();
            let parts = match (scheme, &labels) {
                (Scheme::Iid, _) => PartitionScheme::Iid.split(&vec![0; n], clients, seed)?,
                (Scheme::Quantity, _) => quantity(n, clients, alpha, seed)?,
                (Scheme::Dirichlet, Some(l)) => PartitionScheme::Dirichlet { alpha }.split(l, clients, seed)?,
                (Scheme::Dirichlet, None) => bail!(
                    "--scheme dirichlet: expected a task with labels (classification or reasoning), found {}",
                    task.kind
                ),
            };
            let labels = labels.unwrap_or_else(|| vec![0; n]);
            let pairs = task.to_prompt_target(&examples, None)?;
            let mut stats = partition_stats(&parts, &labels, 0)?;
            if let Some(dir) = model {
                let path = dir.join("tokenizer.json");
                let tok = hetfed_model::tokenizer::load(&path)?;
                let count = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
                let tokens: Vec<usize> = pairs.iter().map(|p| count(&p.prompt) + count(&p.target)).collect();
                stats = with_token_counts(stats, &parts, &tokens)?;
            }
            for s in &stats {
                println!("{}", serde_json::to_string(s)?);
            }
            if let Some(dir) = out {
                for (i, part) in parts.iter().enumerate() {
                    let mine: Vec<_> = part.iter().map(|&j| pairs[j].clone()).collect();
                    hetfed_data::task::write_prompt_target_jsonl(&dir.join(format!("client_{i}.jsonl")), &mine)?;
                }
            }
        }
    }
    Ok(())
}
