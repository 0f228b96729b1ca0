//! `hetfed`: federated learning with heterogeneous language models.
//!
//! The binary is thin: it parses flags, sets up logging and progress bars, and calls the
//! library crates. Every error ends the process with one line on stderr and exit code 2.

mod bench;
mod commands;
mod data;
mod demo;
mod eval;
mod export;
mod fed;
#[cfg(feature = "hub")]
mod hub;
mod limits;
mod metric;
mod pretrain;
mod transfer;

use std::process::ExitCode;

// Training allocates and frees many large tensors per step; glibc returns each to the OS and
// page-faults it back in, mimalloc keeps them (measured in BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// hetfed: federated learning with heterogeneous language models.
///
/// Clients fine-tune small language models on private data and send updates, never data; a
/// server turns those updates into improvements of its larger model. This command loads
/// Hugging Face checkpoints (BLOOM, Llama), scores and generates text, fine-tunes (full or
/// LoRA), and builds, inspects and applies task vectors.
#[derive(Parser)]
#[command(name = "hetfed", version, about, long_about, propagate_version = true)]
struct Cli {
    /// Log more (-v info, -vv debug); the HETFED_LOG variable overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Worker threads for the numeric kernels, 1..=1024 (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-token log-probabilities of a text under a model
    Score(Box<commands::ScoreArgs>),
    /// Continue a prompt (greedy, or sampled with temperature/top-k/top-p and a seed)
    Generate(Box<commands::GenerateArgs>),
    /// Fine-tune a model (full or LoRA) on {prompt, target} JSONL; writes a task vector
    Finetune(Box<commands::FinetuneArgs>),
    /// Task vectors: difference of two models, apply to a base, inspect
    #[command(subcommand)]
    Taskvec(commands::TaskvecCmd),
    /// Train a byte-level BPE tokenizer
    #[command(subcommand)]
    Tokenizer(pretrain::TokenizerCmd),
    /// Pretrain a BLOOM-architecture model from scratch (recipe in a TOML file)
    Pretrain(pretrain::PretrainArgs),
    /// Task data: export fine-tuning JSONL, partition among clients
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Evaluate a model on a task (accuracy, BLEU/chrF, ROUGE or perplexity)
    Eval(Box<eval::EvalArgs>),
    /// Corpus BLEU, chrF/chrF++ or ROUGE of a hypothesis file against reference files
    Metric(metric::MetricArgs),
    /// Training and inference throughput on the reference shape, side by side with PyTorch
    Bench(bench::BenchArgs),
    /// Run a federated simulation: server and clients in one process (the main job)
    Simulate(Box<fed::SimulateArgs>),
    /// Run a federated server over gRPC + TLS (config with a [deploy] section)
    Server(Box<fed::ServerArgs>),
    /// Run a federated client that connects to a server over gRPC + TLS
    Client(Box<fed::ClientArgs>),
    /// Write development TLS certificates and client tokens for a deployment
    Certs(fed::CertsArgs),
    /// Project a small model's task vector into a larger model's weight space (fitted maps)
    Project(Box<transfer::ProjectArgs>),
    /// Run an experiment sweep (rows × seeds) and write its table (EXPERIMENTS.md)
    Sweep(transfer::SweepArgs),
    /// Write report.html (charts of metrics per round and client) for a run directory
    Report(fed::ReportArgs),
    /// Write a run's global server model (a kept checkpoint) as a Hugging Face model directory
    Export(export::ExportArgs),
    /// Download a Hugging Face model (built with --features hub)
    #[cfg(feature = "hub")]
    #[command(subcommand)]
    Hub(hub::HubCmd),
    /// A tour of the foundation on a real model: generate, score, LoRA fine-tune, task vector
    Demo(demo::DemoArgs),
}

/// mimalloc's `purge_delay` option (enum index in mimalloc.h): -1 never returns freed pages to the
/// OS. A training step frees and reallocates the same large buffers every step; purging them made
/// the kernel zero fresh pages each time (20% of a step in `perf`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The error and its causes joined with ": " (as `{:#}`), leaving out a cause whose text the
/// message already holds (`hetfed_core::Error::Io` prints its source itself).
fn causes(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if !msg.contains(&c) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&c);
        }
    }
    msg
}

/// An error as one line: multi-line messages (TOML parse errors point at the line and column on
/// separate lines) are joined, and any backtrace a dependency attached is dropped.
fn one_line(msg: &str) -> String {
    let msg = msg.split("\nStack backtrace:").next().unwrap_or(msg);
    let msg = msg.split("\nstack backtrace:").next().unwrap_or(msg);
    let joined: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '|' || c == '^' || c == ' '))
        .collect();
    joined.join(" ").trim_end_matches('.').to_string()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that run training steps keep freed pages (see MI_OPTION_PURGE_DELAY). The others
    // return them, so that a server holding a 7B model does not keep the high-water mark of
    // every transient buffer (map fits, evaluation) on top of it.
    let trains = matches!(
        cli.cmd,
        Command::Finetune(_)
            | Command::Pretrain(_)
            | Command::Bench(_)
            | Command::Simulate(_)
            | Command::Client(_)
            | Command::Sweep(_)
            | Command::Demo(_)
    );
    if trains {
        // SAFETY: sets a process-wide allocator option before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HETFED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Some(n) = cli.threads {
        if let Err(e) = limits::int("--threads", n, 1, limits::MAX_THREADS) {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        // Ignored if already initialised; both paths end with the pool sized as asked.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let result = match cli.cmd {
        Command::Score(a) => commands::score(*a),
        Command::Generate(a) => commands::generate(*a),
        Command::Finetune(a) => commands::finetune(*a),
        Command::Taskvec(c) => commands::taskvec(c),
        Command::Tokenizer(c) => pretrain::tokenizer(c),
        Command::Pretrain(a) => pretrain::pretrain(a),
        Command::Data(c) => data::run(c),
        Command::Eval(a) => eval::run(*a),
        Command::Metric(a) => metric::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Simulate(a) => fed::simulate(*a),
        Command::Server(a) => fed::server(*a),
        Command::Client(a) => fed::client(*a),
        Command::Certs(a) => fed::certs(a),
        Command::Report(a) => fed::report(a),
        Command::Export(a) => export::run(a),
        Command::Project(a) => transfer::project(*a),
        Command::Sweep(a) => transfer::sweep(a),
        #[cfg(feature = "hub")]
        Command::Hub(c) => hub::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&causes(&e)));
            ExitCode::from(2)
        }
    }
}
