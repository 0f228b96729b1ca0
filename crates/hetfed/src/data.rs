//! `hetfed data`: fetch the public datasets and list what the data directory holds, turn a
//! task's split into fine-tuning JSONL, and split it among clients. Also the fetch-on-demand of
//! the commands that read datasets (`simulate`, `eval`, `sweep`): [`ensure`].

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand, ValueEnum};

use hetfed_data::partition::{quantity, with_token_counts};
use hetfed_data::{partition_stats, DataDir, DataDirOrigin, DatasetSpec, PartitionScheme, Split, TaskRegistry};
use hetfed_fetch::{Fetcher, Manifest, Outcome};

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

#[derive(Args)]
pub struct FetchArgs {
    /// Datasets to fetch: a name from `hetfed data list` (ethos, copa, flores, tico, xlsum, ilsum,
    /// scitldr, bbc, mltext, ...), or a dataset with its languages to fetch only their files
    /// (tico:en-hi, flores:en-hi, xlsum:hindi, mltext:en)
    #[arg(value_name = "NAME", required_unless_present = "all", conflicts_with = "all")]
    pub names: Vec<String>,
    /// Fetch every dataset of the manifest
    #[arg(long)]
    pub all: bool,
    /// Data directory (default: $HETFED_DATA_DIR, else the per-user cache directory)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Fetch hetfed's layout from this mirror (<URL>/<dataset folder>/<file>) instead of the
    /// upstream URLs: https://, or http:// on a loopback address only (default: $HETFED_MIRROR)
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Resume an interrupted download up to this many times per file: 0..=100
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Download public datasets into the data directory: a progress bar per file, resumed
    /// downloads, size and SHA-256 verified, each dataset's licence printed once
    Fetch(FetchArgs),
    /// Show each dataset of the manifest: present, partial or missing, where, and its licence
    List {
        /// Data directory (default: $HETFED_DATA_DIR, else the per-user cache directory)
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
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
        DataCmd::Fetch(a) => fetch(a)?,
        DataCmd::List { data_dir } => list(&DataDir::resolve(data_dir.as_deref())?)?,
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

/// Files a command needs: a manifest dataset, and the tags (languages, pairs) of the files it
/// needs (`None`: all of its files).
pub type Need = (String, Option<Vec<String>>);

/// What a dataset spec needs: `flores:eng_Latn-hin_Deva` the two languages' files (and the
/// untagged metadata), `tico:en-hi` the `en-hi` pair, `xlsum:hindi` and `mltext:en` that
/// language; any other dataset all of its files.
pub fn need_of(spec: &DatasetSpec) -> Need {
    let tags = match spec {
        DatasetSpec::Flores { src, tgt } => Some(vec![src.clone(), tgt.clone()]),
        DatasetSpec::Tico { src, tgt } => Some(vec![format!("en-{}", if src == "en" { tgt } else { src })]),
        DatasetSpec::XlSum { lang } | DatasetSpec::Mltext { lang, .. } => Some(vec![lang.clone()]),
        _ => None,
    };
    (spec.dataset().name().to_string(), tags)
}

/// Merges needs of the same dataset (the union of their tags; `None` wins).
fn merge(needs: Vec<Need>) -> Vec<Need> {
    let mut out: Vec<Need> = Vec::new();
    for (name, tags) in needs {
        match out.iter_mut().find(|(n, _)| *n == name) {
            None => out.push((name, tags)),
            Some((_, have)) => match (have.as_mut(), tags) {
                (Some(h), Some(t)) => h.extend(t.into_iter().filter(|x| !h.contains(x)).collect::<Vec<_>>()),
                _ => *have = None,
            },
        }
    }
    out
}

/// `NAME` of `hetfed data fetch NAME`: a manifest name, else a dataset spec (`tico:en-hi`).
fn parse_need(m: &Manifest, name: &str) -> Result<Need> {
    if let Ok(d) = m.get(name) {
        return Ok((d.name.clone(), None));
    }
    match name.parse::<DatasetSpec>() {
        Ok(spec) => Ok(need_of(&spec)),
        Err(_) => Err(anyhow!("{}", m.get(name).unwrap_err())),
    }
}

/// A `Need` in the form `hetfed data fetch` takes back.
fn need_arg(n: &Need) -> String {
    n.0.clone()
}

/// Whether `$HETFED_OFFLINE` asks never to fetch (`1`, `true`, `yes`).
pub fn offline_env() -> bool {
    std::env::var("HETFED_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

fn fetcher(dir: &Path, mirror: Option<&str>, retries: u32) -> Result<Fetcher> {
    Ok(Fetcher::new(dir, Fetcher::source_from(mirror))?.retries(retries, std::time::Duration::from_millis(500))?)
}

fn fetch(a: FetchArgs) -> Result<()> {
    let dir = DataDir::resolve(a.data_dir.as_deref())?;
    let m = Manifest::embedded();
    let needs: Vec<Need> = if a.all {
        m.datasets.iter().map(|d| (d.name.clone(), None)).collect()
    } else {
        merge(a.names.iter().map(|n| parse_need(&m, n)).collect::<Result<_>>()?)
    };
    let f = fetcher(dir.root(), a.mirror.as_deref(), a.retries)?;
    let (mut fetched, mut bytes, mut present) = (0usize, 0u64, 0usize);
    let mut failed = Vec::new();
    for (name, tags) in &needs {
        let d = m.get(name)?;
        if d.files.is_empty() {
            println!("{}: no file to fetch ({})", d.name, d.notes);
            continue;
        }
        present += d.files.iter().filter(|x| x.needed_for(tags.as_deref()) && f.present(d, x).is_some()).count();
        match f.fetch_dataset(d, tags.as_deref(), &mut |s| println!("{s}")) {
            Ok(out) => {
                for o in out {
                    if let Outcome::Downloaded { bytes: b, .. } = o {
                        fetched += 1;
                        bytes += b;
                    }
                }
            }
            Err(e) => failed.push((d.name.clone(), e)),
        }
    }
    println!(
        "fetched {fetched} files ({:.1} MiB) into {}; {present} already present",
        bytes as f64 / (1024.0 * 1024.0),
        dir.root().display()
    );
    if let Some((name, e)) = failed.into_iter().next() {
        bail!("fetching {name}: {e}");
    }
    Ok(())
}

fn list(dir: &DataDir) -> Result<()> {
    let m = Manifest::embedded();
    let f = Fetcher::new(dir.root(), hetfed_fetch::Source::Upstream)?;
    println!("data directory {} ({})", dir.root().display(), dir.origin());
    for d in &m.datasets {
        let at = dir.root().join(&d.dir);
        if d.files.is_empty() {
            let state = if at.is_dir() { "present (not in the manifest)" } else { "missing (not in the manifest)" };
            println!("{:<8} {state:<30} {}", d.name, at.display());
            continue;
        }
        let missing: Vec<&str> = f.missing(d, None).iter().map(|x| x.path.as_str()).collect();
        let n = d.files.len();
        let have = n - missing.len();
        let state = match have {
            0 => "missing".to_string(),
            h if h == n => "present".to_string(),
            h => format!("partial {h}/{n} files"),
        };
        let mut line = format!("{:<8} {state:<30} {}  licence {}", d.name, at.display(), d.licence);
        if have > 0 && !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(4).copied().collect();
            line.push_str(&format!(
                "; missing {}{}",
                shown.join(", "),
                if missing.len() > 4 { format!(" and {} more", missing.len() - 4) } else { String::new() }
            ));
        }
        println!("{line}");
    }
    println!("fetch with `hetfed data fetch NAME` (or --all)");
    Ok(())
}

/// Makes sure the files `needs` names are in `dir`. Fetches what is missing when `auto` (no data
/// directory was given: the per-user cache) unless `offline`; offline, a missing file fails with
/// one line naming `hetfed data fetch NAME` and the data directory. With `auto` false (a data
/// directory was given) it does nothing: the loaders name what they miss.
pub fn ensure(dir: &DataDir, needs: Vec<Need>, auto: bool, offline: bool) -> Result<()> {
    if !auto {
        return Ok(());
    }
    let m = Manifest::embedded();
    let f = Fetcher::new(dir.root(), Fetcher::source_from(None))?;
    let mut missing = Vec::new();
    for (name, tags) in merge(needs) {
        let Ok(d) = m.get(&name) else { continue };
        if !f.missing(d, tags.as_deref()).is_empty() {
            missing.push((d, (name, tags)));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(|(_, n)| need_arg(n)).collect();
    let cmd = format!("hetfed data fetch {} --data-dir {}", names.join(" "), dir.root().display());
    if offline {
        bail!(
            "dataset(s) {} missing from the data directory {} ({}); offline, nothing is fetched: run `{cmd}` when online",
            names.join(", "),
            dir.root().display(),
            dir.origin()
        );
    }
    eprintln!("fetching {} into {} (missing; --offline never fetches)", names.join(", "), dir.root().display());
    for (d, (_, tags)) in missing {
        f.fetch_dataset(d, tags.as_deref(), &mut |s| eprintln!("{s}"))
            .map_err(|e| anyhow!("fetching {}: {e}; when online, run `{cmd}`", d.name))?;
    }
    Ok(())
}

/// Whether a data directory is the per-user cache, where commands fetch what they miss.
pub fn is_cache(dir: &DataDir) -> bool {
    dir.origin() == DataDirOrigin::UserCache
}
