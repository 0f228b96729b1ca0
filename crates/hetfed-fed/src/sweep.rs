//! Experiment sweeps: the table of EXPERIMENTS.md from one config.
//!
//! A sweep takes a heterogeneous run config (`base`), a list of seeds and a list of rows. Per
//! seed (which sets `run.seed`, `data.seed` and `transfer.maps.seed`) it evaluates every row
//! on the server's evaluation tasks. Every row but `zero_shot` is a configuration of the same
//! round loop: a run of [`simulate`](crate::assemble::simulate) (the server's round loop with
//! in-process clients, exactly `hetfed simulate`), kept under `out/runs/`:
//!
//! - `zero_shot`: the large base model as it is (an evaluation, no loop);
//! - `central`: the base config with `data.pooled = true` and FedAvg: one client holding every
//!   client's share (all tasks pooled, shuffled together by its training) LoRA-fine-tunes the
//!   large model for the same rounds × epochs: the upper bound no federation reaches without
//!   sharing data;
//! - `local_only`: for each client `i`, the base config with `data.only_client = i`, FedAvg and
//!   the client's small model as the server's: the client trains alone on its own share (same
//!   id, data and seeds as in the federated run). A task's metrics are the mean over the clients
//!   that hold that task (a specialist is judged on its own task; each run evaluates its own
//!   task only); metrics of tasks no client holds (forgetting monitors, general text) are the
//!   mean over all clients;
//! - `fedavg_small`: the base config with the clients' small model as the server's and FedAvg:
//!   homogeneous federation of the small clients; its bytes per client and round and server
//!   seconds per round come from the run's `metrics.jsonl`;
//! - `hetero`: the base config with the row's `transfer` settings merged over its `[transfer]`
//!   table (after the sweep's own `transfer` settings, if any), run as it is
//!   (`out/runs/row<NN>-seed<seed>`).
//!
//! Derived runs have no `[transfer]` table, strategy FedAvg (`server_lr = 1`), every client of
//! the run registered before round 1 (`server.min_clients`), and no round deadline (the sweep
//! compares methods, not deadlines); every round must aggregate, or the row fails. Everything
//! else (rounds, client training, data, evaluation) is the base config's.
//!
//! `eval_split = "test"` evaluates every row on the tasks' test splits instead.
//!
//! Every run evaluates before its first round and after its last (`server.eval.every` = rounds):
//! a row reads the evaluation after the last round, which does not depend on how often the run
//! evaluates.
//!
//! In a heterogeneous run clients always train from their own base with seeds fixed by
//! `(seed, round, client)`, so their updates do not depend on the server: the clients of every
//! `hetero` row of a seed share one [`TrainMemo`], so they train in the first such row and
//! replay the same updates, through the whole loop (upload, validation, aggregation, events), in
//! the others.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hetfed_core::{Error, Result};
use hetfed_data::DataDir;
use hetfed_events::{Event, Status};
use hetfed_model::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::assemble::server_eval;
use crate::client::TrainMemo;
use crate::config::{EvalSplit, RunConfig};
use crate::server::evaluate_weights;

/// What a sweep row computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    ZeroShot,
    Central,
    LocalOnly,
    FedavgSmall,
    Hetero,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub name: String,
    pub kind: RowKind,
    /// `hetero` rows: settings merged over the base config's `[transfer]`.
    #[serde(default)]
    pub transfer: Option<toml::Value>,
    /// The control every method must beat (the random map): the table says, per row and task,
    /// whether the row's target NLL is below this row's by more than 2 std.
    #[serde(default)]
    pub control: bool,
}

/// A sweep config (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The heterogeneous run config the rows vary (relative to the sweep config).
    pub base: PathBuf,
    pub seeds: Vec<u64>,
    /// Evaluate on this split instead of the base config's (`server.eval.split`).
    #[serde(default)]
    pub eval_split: Option<EvalSplit>,
    /// Settings merged over the base config's `[transfer]` in every `hetero` row, before the
    /// row's own: what a whole sweep was measured with where the base has since changed (the
    /// student of an earlier default, say).
    #[serde(default)]
    pub transfer: Option<toml::Value>,
    #[serde(rename = "row")]
    pub rows: Vec<Row>,
}

/// One row's outcome for one seed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub metrics: BTreeMap<String, f64>,
    /// Bytes each client sends and receives per round (mean).
    pub bytes_per_client_round: f64,
    /// Seconds the server spends aggregating per round (mean).
    pub server_s_per_round: f64,
    /// Which model the metrics are of: "large" or "small".
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowResult {
    pub name: String,
    pub kind: RowKind,
    #[serde(default)]
    pub control: bool,
    /// Seed → cell.
    pub cells: BTreeMap<u64, Cell>,
}

fn merge(base: &mut toml::Value, over: &toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) => merge(bv, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

impl SweepConfig {
    pub fn from_file(path: &Path) -> Result<(Self, PathBuf)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: SweepConfig =
            toml::from_str(&text).map_err(|e| Error::msg(format!("{}: {}", path.display(), e.to_string().trim())))?;
        if c.seeds.is_empty() || c.rows.is_empty() {
            return Err(Error::msg(format!(
                "{}: expected at least one seed and one [[row]], found {} and {}",
                path.display(),
                c.seeds.len(),
                c.rows.len()
            )));
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for r in &c.rows {
            if r.transfer.is_some() && r.kind != RowKind::Hetero {
                return Err(Error::msg(format!(
                    "{}: row {:?}: `transfer` settings apply to kind = \"hetero\" rows only",
                    path.display(),
                    r.name
                )));
            }
        }
        Ok((c, dir))
    }
}

/// The base run config for `seed` as TOML, with `transfer` overrides merged in.
fn run_value(
    base_path: &Path,
    seed: u64,
    transfer: Option<&toml::Value>,
    eval_split: Option<EvalSplit>,
) -> Result<toml::Value> {
    let text = std::fs::read_to_string(base_path).map_err(|e| Error::io(base_path, e))?;
    let mut v: toml::Value = toml::from_str(&text).map_err(|e| Error::msg(format!("{}: {e}", base_path.display())))?;
    let mut over = toml::map::Map::new();
    let mut run = toml::map::Map::new();
    run.insert("seed".into(), toml::Value::Integer(seed as i64));
    over.insert("run".into(), toml::Value::Table(run));
    let mut data = toml::map::Map::new();
    data.insert("seed".into(), toml::Value::Integer(seed as i64));
    over.insert("data".into(), toml::Value::Table(data));
    let mut t = toml::map::Map::new();
    let mut maps = toml::map::Map::new();
    maps.insert("seed".into(), toml::Value::Integer(seed as i64));
    t.insert("maps".into(), toml::Value::Table(maps));
    let mut t = toml::Value::Table(t);
    if let Some(o) = transfer {
        merge(&mut t, o);
    }
    // A homogeneous base stays homogeneous (only `central` and `zero_shot` rows need no
    // [transfer]).
    if v.get("transfer").is_some() || transfer.is_some() {
        over.insert("transfer".into(), t);
    }
    // A row reads the evaluation after the last round only: its run evaluates before the first
    // round and after the last (the final evaluation does not depend on how often it evaluates).
    let mut eval = toml::map::Map::new();
    let rounds = v.get("run").and_then(|r| r.get("rounds")).and_then(toml::Value::as_integer).unwrap_or(1);
    eval.insert("every".into(), toml::Value::Integer(rounds.max(1)));
    if let Some(split) = eval_split {
        let split = toml::Value::try_from(split).map_err(|e| Error::msg(format!("eval_split: {e}")))?;
        eval.insert("split".into(), split);
    }
    let mut server = toml::map::Map::new();
    server.insert("eval".into(), toml::Value::Table(eval));
    over.insert("server".into(), toml::Value::Table(server));
    merge(&mut v, &toml::Value::Table(over));
    Ok(v)
}

fn parse_value(v: &toml::Value, base_path: &Path, what: &str) -> Result<RunConfig> {
    let text = toml::to_string(v).map_err(|e| Error::msg(e.to_string()))?;
    let base_dir = base_path.parent().map(Path::to_path_buf).unwrap_or_default();
    RunConfig::from_toml(&text, base_dir, &format!("{}{what}", base_path.display()))
}

/// The base run config for `seed`, with `transfer` overrides merged in: a `hetero` row's run
/// (its `transfer`), checked as `hetfed simulate` checks a config.
pub fn run_config(
    base_path: &Path,
    seed: u64,
    transfer: Option<&toml::Value>,
    eval_split: Option<EvalSplit>,
) -> Result<RunConfig> {
    parse_value(&run_value(base_path, seed, transfer, eval_split)?, base_path, "")
}

/// A `hetero` row's `transfer` settings: the sweep's own (see [`SweepConfig::transfer`]) with
/// the row's merged over them.
pub fn row_transfer(sweep: Option<&toml::Value>, row: Option<&toml::Value>) -> Option<toml::Value> {
    match (sweep, row) {
        (Some(s), Some(r)) => {
            let mut t = s.clone();
            merge(&mut t, r);
            Some(t)
        }
        (s, r) => s.or(r).cloned(),
    }
}

/// The run a `central`, `local_only` (client `client`) or `fedavg_small` row of the sweep's
/// base config `base_path` is, for `seed` (see the module docs): the config `hetfed simulate`
/// runs for that row. Other kinds are not runs of their own: an error.
pub fn derived_config(
    base_path: &Path,
    seed: u64,
    eval_split: Option<EvalSplit>,
    kind: RowKind,
    client: Option<usize>,
) -> Result<RunConfig> {
    let base = run_config(base_path, seed, None, eval_split)?;
    let mut v = run_value(base_path, seed, None, eval_split)?;
    let (n_run, model) = derived_run(&base, base_path, &mut v, kind, client)?;
    as_fedavg_run(&mut v, &base, n_run, model);
    let what = match client {
        Some(i) => format!(" ({} row, client c{i})", kind.name()),
        None => format!(" ({} row)", kind.name()),
    };
    parse_value(&v, base_path, &what)
}

/// What sets a derived row's run apart in `v` (the base config `base` as TOML): its data
/// (`central`: pooled; `local_only`: one client's share), and the number of clients the run has
/// with the server model it uses instead of the base's (the clients' small model; `None`: the
/// base's).
fn derived_run(
    base: &RunConfig,
    base_path: &Path,
    v: &mut toml::Value,
    kind: RowKind,
    client: Option<usize>,
) -> Result<(usize, Option<toml::Value>)> {
    let small_model = |i: usize| -> Result<toml::Value> {
        let t = base.transfer.as_ref().filter(|t| !t.client_models.is_empty()).ok_or_else(|| {
            Error::msg(format!(
                "{}: a {} row needs the clients' small model: expected a [transfer] table with client_models, found none",
                base_path.display(),
                kind.name()
            ))
        })?;
        let m = &t.client_models[i % t.client_models.len()];
        Ok(toml::Value::String(m.display().to_string()))
    };
    Ok(match (kind, client) {
        (RowKind::Central, None) => {
            set(v, &["data", "pooled"], toml::Value::Boolean(true));
            (1, None)
        }
        (RowKind::LocalOnly, Some(i)) => {
            if i >= base.data.num_clients() {
                return Err(Error::msg(format!(
                    "local_only: expected a client 0..={} of the base config, found {i}",
                    base.data.num_clients().saturating_sub(1)
                )));
            }
            set(v, &["data", "only_client"], toml::Value::Integer(i as i64));
            (1, Some(small_model(i)?))
        }
        (RowKind::FedavgSmall, None) => {
            let t = base.transfer.as_ref();
            let mut models: Vec<PathBuf> =
                t.map(|t| t.client_models.iter().map(|m| base.path(m)).collect()).unwrap_or_default();
            models.sort();
            models.dedup();
            if models.len() > 1 {
                return Err(Error::msg(format!(
                    "{}: a fedavg_small row averages one model: expected one entry in transfer.client_models, found {}",
                    base_path.display(),
                    models.len()
                )));
            }
            (base.data.num_clients(), Some(small_model(0)?))
        }
        _ => {
            return Err(Error::msg(format!(
                "a {} row{} is not a run of its own",
                kind.name(),
                client.map(|i| format!(" of client {i}")).unwrap_or_default()
            )))
        }
    })
}

/// Makes `v` (the base config `base` as TOML) a FedAvg run of `n_run` clients on `model` (when
/// given): no `[transfer]`, every client registered before round 1, no round deadline.
fn as_fedavg_run(v: &mut toml::Value, base: &RunConfig, n_run: usize, model: Option<toml::Value>) {
    if let toml::Value::Table(t) = v {
        t.remove("transfer");
        let mut strategy = toml::map::Map::new();
        strategy.insert("name".into(), toml::Value::String("fedavg".into()));
        strategy.insert("server_lr".into(), toml::Value::Float(1.0));
        t.insert("strategy".into(), toml::Value::Table(strategy));
    }
    if let Some(m) = model {
        set(v, &["server", "model"], m);
    }
    set(v, &["server", "min_clients"], toml::Value::Integer(n_run as i64));
    set(v, &["server", "quorum"], toml::Value::Integer(base.server.quorum.min(n_run) as i64));
    set(v, &["server", "round_timeout_s"], toml::Value::Float(crate::config::MAX_TIMEOUT_S));
    set(v, &["sampling", "min_fit_clients"], toml::Value::Integer(base.sampling.min_fit_clients.min(n_run) as i64));
}

/// Sets `path` in a TOML table, creating the tables on the way.
fn set(v: &mut toml::Value, path: &[&str], value: toml::Value) {
    let (last, tables) = path.split_last().expect("a non-empty path");
    let mut cur = v;
    for k in tables {
        let toml::Value::Table(t) = cur else { return };
        cur = t.entry(k.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    if let toml::Value::Table(t) = cur {
        t.insert(last.to_string(), value);
    }
}

impl RowKind {
    /// The kind as a sweep config writes it.
    pub fn name(self) -> &'static str {
        match self {
            RowKind::ZeroShot => "zero_shot",
            RowKind::Central => "central",
            RowKind::LocalOnly => "local_only",
            RowKind::FedavgSmall => "fedavg_small",
            RowKind::Hetero => "hetero",
        }
    }
}

/// What a sweep reads from a finished run's `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunRecord {
    /// The server's evaluation after the last round.
    pub final_eval: BTreeMap<String, f64>,
    /// Bytes each accepted client sent and received per round (mean).
    pub bytes_per_client_round: f64,
    /// Seconds the server spent aggregating per round (mean).
    pub server_s_per_round: f64,
}

/// Reads a finished run of `rounds` rounds from `run_dir/metrics.jsonl`; an error unless every
/// round aggregated and the last one was evaluated.
pub fn read_run(run_dir: &Path, rounds: u64) -> Result<RunRecord> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let (mut bytes, mut n_client_rounds, mut agg_s) = (0f64, 0usize, 0f64);
    let mut aggregated = BTreeMap::new();
    let mut final_eval = None;
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::msg(format!("{}:{}: expected a JSON record: {e}", path.display(), n + 1)))?;
        match Event::parse(&v) {
            Some(Event::ClientRound(c)) if c.status == Some(Status::Ok) => {
                bytes += (c.bytes_up.unwrap_or(0) + c.bytes_down.unwrap_or(0)) as f64;
                n_client_rounds += 1;
            }
            Some(Event::Round(r)) if r.round.unwrap_or(0) >= 1 => {
                let round = r.round.unwrap_or(0);
                aggregated.insert(round, r.aggregated.unwrap_or(false));
                agg_s += r.aggregate_s.unwrap_or(0.0);
                if round == rounds {
                    final_eval = r.server_eval;
                }
            }
            _ => {}
        }
    }
    if let Some(r) = (1..=rounds).find(|r| aggregated.get(r) != Some(&true)) {
        return Err(Error::msg(format!(
            "{}: round {r} {}: a sweep row needs every round aggregated",
            path.display(),
            if aggregated.contains_key(&r) { "did not aggregate (too few accepted updates)" } else { "is missing" }
        )));
    }
    let final_eval: BTreeMap<String, f64> =
        final_eval.filter(|m: &BTreeMap<String, f64>| !m.is_empty()).ok_or_else(|| {
            Error::msg(format!("{}: expected the server's evaluation of round {rounds}, found none", path.display()))
        })?;
    Ok(RunRecord {
        final_eval,
        bytes_per_client_round: bytes / n_client_rounds.max(1) as f64,
        server_s_per_round: agg_s / rounds.max(1) as f64,
    })
}

/// Runs `cfg` as `hetfed simulate` does into `run_dir` (continuing it with `resume`, else
/// starting it afresh) and reads its record.
fn simulate_run(
    rt: &tokio::runtime::Runtime,
    cfg: &RunConfig,
    dir: &DataDir,
    run_dir: &Path,
    resume: bool,
    memo: Option<&TrainMemo>,
) -> Result<RunRecord> {
    if !resume && run_dir.exists() {
        std::fs::remove_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    }
    rt.block_on(crate::assemble::simulate_with(cfg, dir, run_dir, resume, memo, |_| {}))?;
    read_run(run_dir, cfg.run.rounds)
}

/// The `local_only` cell from each client's run (see the module docs).
fn local_only_cell(runs: &[(String, BTreeMap<String, f64>)]) -> Cell {
    let held: Vec<&str> = runs.iter().map(|(t, _)| t.as_str()).collect();
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (own_task, metrics) in runs {
        for (k, v) in metrics {
            let task = k.split('/').next().unwrap_or_default();
            if task == own_task || !held.contains(&task) {
                let e = sums.entry(k.clone()).or_default();
                e.0 += v;
                e.1 += 1.0;
            }
        }
    }
    Cell {
        metrics: sums.into_iter().map(|(k, (s, n))| (k, s / n)).collect(),
        model: "small".into(),
        ..Default::default()
    }
}

/// Returns the value in `slot`, made by `f` the first time.
fn get_or_try<T>(slot: &mut Option<T>, f: impl FnOnce() -> Result<T>) -> Result<&T> {
    if slot.is_none() {
        *slot = Some(f()?);
    }
    Ok(slot.as_ref().expect("just set"))
}

/// Runs the sweep; `progress` gets one line per finished row and seed. Results are also written
/// to `out/results.json` after every cell, so an interrupted sweep keeps what it finished; with
/// `resume`, the cells already there (same row name and kind, same seed) are kept and not rerun,
/// and a row's run left unfinished under `out/runs/` continues from its latest checkpoint.
pub fn run_sweep(
    path: &Path,
    dir: &DataDir,
    out: &Path,
    resume: bool,
    mut progress: impl FnMut(String),
) -> Result<Vec<RowResult>> {
    let (sweep, sdir) = SweepConfig::from_file(path)?;
    let base_path = sdir.join(&sweep.base);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut results = initial_results(&sweep, out, resume)?;
    let mut rt: Option<tokio::runtime::Runtime> = None;
    for &seed in &sweep.seeds {
        if results.iter().all(|r| r.cells.contains_key(&seed)) {
            continue;
        }
        let ctx = SeedRun::new(&sweep, &base_path, dir, out, resume, seed)?;
        for (ri, row) in sweep.rows.iter().enumerate() {
            if results[ri].cells.contains_key(&seed) {
                continue;
            }
            let t0 = Instant::now();
            let cell = ctx.cell(&mut rt, ri, row)?;
            progress(format!(
                "seed {seed} · {} · {} ({:.0} s)",
                row.name,
                cell.metrics.iter().map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", "),
                t0.elapsed().as_secs_f64()
            ));
            results[ri].cells.insert(seed, cell);
            let json = serde_json::to_string_pretty(&results).map_err(|e| Error::msg(e.to_string()))?;
            hetfed_core::write_atomic(&out.join("results.json"), json.as_bytes())?;
        }
    }
    Ok(results)
}

/// One empty result per row of `sweep`; with `resume`, filled with the cells `out/results.json`
/// already holds (same row name and kind, a seed of the sweep).
fn initial_results(sweep: &SweepConfig, out: &Path, resume: bool) -> Result<Vec<RowResult>> {
    let mut results: Vec<RowResult> = sweep
        .rows
        .iter()
        .map(|r| RowResult { name: r.name.clone(), kind: r.kind, control: r.control, cells: BTreeMap::new() })
        .collect();
    let saved = out.join("results.json");
    if resume && saved.exists() {
        let text = std::fs::read_to_string(&saved).map_err(|e| Error::io(&saved, e))?;
        let old: Vec<RowResult> = serde_json::from_str(&text)
            .map_err(|e| Error::msg(format!("{}: expected the results of hetfed sweep: {e}", saved.display())))?;
        for r in &mut results {
            if let Some(o) = old.iter().find(|o| o.name == r.name && o.kind == r.kind) {
                r.cells =
                    o.cells.iter().filter(|(s, _)| sweep.seeds.contains(s)).map(|(s, c)| (*s, c.clone())).collect();
            }
        }
    }
    Ok(results)
}

/// The async runtime the sweep's runs share (started by the first row that runs the loop).
fn start_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .map_err(|e| Error::msg(format!("starting the async runtime: {e}")))
}

/// One seed of a sweep: what each of its cells needs.
struct SeedRun<'a> {
    base_path: &'a Path,
    eval_split: Option<EvalSplit>,
    dir: &'a DataDir,
    /// Where the rows' runs are kept (`out/runs`).
    runs: PathBuf,
    resume: bool,
    seed: u64,
    /// The base config for this seed.
    cfg: RunConfig,
    /// The clients' training results of this seed, shared by the hetero rows.
    memo: TrainMemo,
    /// The sweep's own `transfer` settings (see [`SweepConfig::transfer`]).
    transfer: Option<toml::Value>,
}

impl<'a> SeedRun<'a> {
    fn new(
        sweep: &SweepConfig,
        base_path: &'a Path,
        dir: &'a DataDir,
        out: &Path,
        resume: bool,
        seed: u64,
    ) -> Result<Self> {
        let cfg = run_config(base_path, seed, None, sweep.eval_split)?;
        if cfg.server.eval.tasks.is_empty() && cfg.server.eval.general_lines == 0 {
            return Err(Error::msg(format!(
                "{}: the sweep's base config needs [server.eval] tasks or general_lines, found neither",
                base_path.display()
            )));
        }
        let (eval_split, runs, memo) = (sweep.eval_split, out.join("runs"), TrainMemo::default());
        let transfer = sweep.transfer.clone();
        Ok(Self { base_path, eval_split, dir, runs, resume, seed, cfg, memo, transfer })
    }

    /// Row `ri`'s cell for this seed (`rt`: the shared runtime, started when first needed).
    fn cell(&self, rt: &mut Option<tokio::runtime::Runtime>, ri: usize, row: &Row) -> Result<Cell> {
        match row.kind {
            RowKind::ZeroShot => self.zero_shot(),
            RowKind::Hetero => self.hetero(rt, ri, row),
            RowKind::Central | RowKind::FedavgSmall => self.derived(rt, row.kind),
            RowKind::LocalOnly => self.local_only(rt),
        }
    }

    /// The large base model as it is.
    fn zero_shot(&self) -> Result<Cell> {
        let cfg = &self.cfg;
        let large = Checkpoint::load(&cfg.path(&cfg.server.model))?;
        let ev = server_eval(cfg, self.dir, &large)?
            .ok_or_else(|| Error::msg("the sweep's base config needs [server.eval] tasks"))?;
        Ok(Cell {
            metrics: evaluate_weights(&large, &large.weights, &ev)?,
            model: "large".into(),
            ..Default::default()
        })
    }

    /// The base config with the row's `transfer` settings, its clients replaying the seed's memo.
    fn hetero(&self, rt: &mut Option<tokio::runtime::Runtime>, ri: usize, row: &Row) -> Result<Cell> {
        let seed = self.seed;
        let transfer = row_transfer(self.transfer.as_ref(), row.transfer.as_ref());
        let rcfg = run_config(self.base_path, seed, transfer.as_ref(), self.eval_split)?;
        let rt = get_or_try(rt, start_runtime)?;
        let run_dir = self.runs.join(format!("row{ri:02}-seed{seed}"));
        let rec = simulate_run(rt, &rcfg, self.dir, &run_dir, self.resume, Some(&self.memo))?;
        Ok(Cell {
            metrics: rec.final_eval,
            bytes_per_client_round: rec.bytes_per_client_round,
            server_s_per_round: rec.server_s_per_round,
            model: "large".into(),
        })
    }

    /// A `central` or `fedavg_small` row: one run of its derived config.
    fn derived(&self, rt: &mut Option<tokio::runtime::Runtime>, kind: RowKind) -> Result<Cell> {
        let seed = self.seed;
        let rcfg = derived_config(self.base_path, seed, self.eval_split, kind, None)?;
        let rt = get_or_try(rt, start_runtime)?;
        let run_dir = self.runs.join(format!("{}-seed{seed}", kind.name()));
        let rec = simulate_run(rt, &rcfg, self.dir, &run_dir, self.resume, None)?;
        Ok(if kind == RowKind::Central {
            Cell { metrics: rec.final_eval, model: "large".into(), ..Default::default() }
        } else {
            Cell {
                metrics: rec.final_eval,
                bytes_per_client_round: rec.bytes_per_client_round,
                server_s_per_round: rec.server_s_per_round,
                model: "small".into(),
            }
        })
    }

    /// One run per client, each training alone (see [`local_only_cell`]).
    fn local_only(&self, rt: &mut Option<tokio::runtime::Runtime>) -> Result<Cell> {
        let (seed, kind) = (self.seed, RowKind::LocalOnly);
        let mut per_client = Vec::new();
        for i in 0..self.cfg.data.num_clients() {
            let rcfg = derived_config(self.base_path, seed, self.eval_split, kind, Some(i))?;
            let rt = get_or_try(rt, start_runtime)?;
            let run_dir = self.runs.join(format!("{}-seed{seed}", kind.name())).join(format!("c{i}"));
            let rec = simulate_run(rt, &rcfg, self.dir, &run_dir, self.resume, None)?;
            let task = self.cfg.data.assignment(i).map(|(g, _)| g.task).unwrap_or_default();
            per_client.push((hetfed_data::task::builtin(&task)?.name, rec.final_eval));
        }
        Ok(local_only_cell(&per_client))
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

/// Nats per target token the central upper bound must gain over zero-shot for a task's share
/// column to be shown.
pub const MIN_CENTRAL_GAIN: f64 = 0.02;

/// The EXPERIMENTS.md tables (mean ± sample std over seeds):
///
/// 1. target NLL per task (nats per target token);
/// 2. the share of the central gain recovered per task, `(L_zero − L_row)/(L_zero − L_central)`
///    computed per seed against the zero-shot and central rows of that seed, for tasks whose
///    mean central gain is at least [`MIN_CENTRAL_GAIN`] (a share of a gain near zero or below it
///    means nothing); `▲` marks a row whose target NLL is below the control row's by more than
///    2 std of the per-seed difference (paired by seed);
/// 3. each task's own metrics, forgetting (change of general perplexity against zero-shot of the
///    same seed), bytes per client and round, server seconds per round.
pub fn render_table(results: &[RowResult]) -> String {
    let keys: Vec<String> = {
        let mut k: Vec<String> =
            results.iter().flat_map(|r| r.cells.values().flat_map(|c| c.metrics.keys().cloned())).collect();
        k.sort();
        k.dedup();
        k
    };
    let tasks: Vec<String> = keys.iter().filter_map(|k| k.strip_suffix("/target_nll").map(str::to_string)).collect();
    let refs = Refs {
        zero: results.iter().find(|r| r.kind == RowKind::ZeroShot),
        central: results.iter().find(|r| r.kind == RowKind::Central),
        control: results.iter().find(|r| r.control),
    };
    let mut s = nll_table(results, &tasks);
    s += &share_table(results, &tasks, &refs);
    s += &metrics_table(results, &keys, &tasks, refs.zero);
    s
}

/// The rows the tables compare against: zero-shot, central and the control (when present).
struct Refs<'a> {
    zero: Option<&'a RowResult>,
    central: Option<&'a RowResult>,
    control: Option<&'a RowResult>,
}

/// `mean ± std` of `v` with `digits` decimals; "–" when empty.
fn fmt_mean_std(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "–".into();
    }
    let (m, sd) = mean_std(v);
    format!("{m:.digits$} ± {sd:.digits$}")
}

/// Row `r`'s metric `key`, per seed.
fn per_seed(r: &RowResult, key: &str) -> BTreeMap<u64, f64> {
    r.cells.iter().filter_map(|(seed, c)| Some((*seed, *c.metrics.get(key)?))).collect()
}

/// A table's header (row, model, then `cols`) and separator line.
fn table_header(cols: &[String]) -> String {
    let mut h = String::from("| row | model |");
    for c in cols {
        h += &format!(" {c} |");
    }
    h += "\n|---|---|";
    h += &"---|".repeat(cols.len());
    h + "\n"
}

/// Which model row `r`'s metrics are of.
fn model_of(r: &RowResult) -> String {
    r.cells.values().next().map(|c| c.model.clone()).unwrap_or_default()
}

/// Table 1: target NLL per task.
fn nll_table(results: &[RowResult], tasks: &[String]) -> String {
    let mut s = String::from("**Target NLL** (nats per target token, lower is better)\n\n");
    s += &table_header(tasks);
    for r in results {
        s += &format!("| {} | {} |", r.name, model_of(r));
        for t in tasks {
            let v: Vec<f64> = per_seed(r, &format!("{t}/target_nll")).into_values().collect();
            s += &format!(" {} |", fmt_mean_std(&v, 3));
        }
        s += "\n";
    }
    s
}

/// Table 2: the share of the central gain recovered per task, with the control's ▲ marks.
fn share_table(results: &[RowResult], tasks: &[String], refs: &Refs<'_>) -> String {
    let mut s = format!("\n**Share of the central gain recovered** in target NLL, `(L_zero − L_row)/(L_zero − L_central)`, for tasks whose central gain is at least {MIN_CENTRAL_GAIN} nats/token (– otherwise)");
    if let Some(c) = refs.control {
        s += &format!("; ▲ = target NLL below the control ({}) by more than 2 std of the per-seed difference", c.name);
    }
    s += "\n\n";
    let gain_cols: Vec<String> = tasks.iter().map(|t| format!("{t} (central gain)")).collect();
    s += &table_header(&gain_cols);
    // The central gain per task, mean over seeds, is shown in the header row's first line.
    s += "| *central gain, nats/token* | |";
    let mut shown: Vec<bool> = Vec::new();
    for t in tasks {
        let key = format!("{t}/target_nll");
        let g: Vec<f64> = match (refs.zero, refs.central) {
            (Some(z), Some(c)) => {
                let (zs, cs) = (per_seed(z, &key), per_seed(c, &key));
                zs.iter().filter_map(|(seed, lz)| Some(lz - cs.get(seed)?)).collect()
            }
            _ => Vec::new(),
        };
        shown.push(!g.is_empty() && mean_std(&g).0 >= MIN_CENTRAL_GAIN);
        s += &format!(" {} |", fmt_mean_std(&g, 3));
    }
    s += "\n";
    for r in results {
        if r.kind == RowKind::ZeroShot || r.kind == RowKind::Central {
            continue;
        }
        s += &format!("| {} | {} |", r.name, model_of(r));
        for (ti, t) in tasks.iter().enumerate() {
            if !shown[ti] {
                s += " – |";
                continue;
            }
            s += &share_cell(r, &format!("{t}/target_nll"), refs);
        }
        s += "\n";
    }
    s
}

/// Row `r`'s share of the central gain in `key` (per seed against that seed's zero-shot and
/// central rows), marked ▲ when below the control by more than 2 std of the paired difference.
fn share_cell(r: &RowResult, key: &str, refs: &Refs<'_>) -> String {
    let rs = per_seed(r, key);
    let share: Vec<f64> = match (refs.zero, refs.central) {
        (Some(z), Some(c)) => {
            let (zs, cs) = (per_seed(z, key), per_seed(c, key));
            rs.iter()
                .filter_map(|(seed, lr)| {
                    let (lz, lc) = (zs.get(seed)?, cs.get(seed)?);
                    ((lz - lc).abs() > 1e-12).then(|| 100.0 * (lz - lr) / (lz - lc))
                })
                .collect()
        }
        _ => Vec::new(),
    };
    let mark = match refs.control {
        Some(c) if !std::ptr::eq(c, r) => {
            let cs = per_seed(c, key);
            let d: Vec<f64> = rs.iter().filter_map(|(seed, lr)| Some(cs.get(seed)? - lr)).collect();
            let (m, sd) = mean_std(&d);
            if d.len() >= 2 && m > 2.0 * sd && m > 0.0 {
                " ▲"
            } else {
                ""
            }
        }
        _ => "",
    };
    format!(" {}%{mark} |", fmt_mean_std(&share, 0))
}

/// Table 3: each task's own metrics, forgetting against zero-shot, bytes and server seconds.
fn metrics_table(results: &[RowResult], keys: &[String], tasks: &[String], zero: Option<&RowResult>) -> String {
    let preferred = ["rougeL", "bleu", "chrf", "accuracy", "macro_f1"];
    let mut metric_cols: Vec<String> =
        keys.iter().filter(|k| k.split_once('/').is_some_and(|(_, m)| preferred.contains(&m))).cloned().collect();
    metric_cols
        .sort_by_key(|k| (tasks.iter().position(|t| k.starts_with(&format!("{t}/"))).unwrap_or(usize::MAX), k.clone()));
    let mut cols = metric_cols.clone();
    cols.extend([
        "forgetting (Δ general ppl)".to_string(),
        "bytes / client / round".to_string(),
        "server s / round".to_string(),
    ]);
    let mut s = String::from("\n**Task metrics** (0–100), forgetting, cost\n\n");
    s += &table_header(&cols);
    for r in results {
        let model = model_of(r);
        s += &format!("| {} | {model} |", r.name);
        for m in &metric_cols {
            let v: Vec<f64> = per_seed(r, m).into_values().collect();
            s += &format!(" {} |", fmt_mean_std(&v, 1));
        }
        let forget: Vec<f64> = r
            .cells
            .iter()
            .filter(|_| model == "large")
            .filter_map(|(seed, c)| {
                Some(c.metrics.get("general/ppl")? - zero?.cells.get(seed)?.metrics.get("general/ppl")?)
            })
            .collect();
        s += &format!(" {} |", fmt_mean_std(&forget, 1));
        let bytes: Vec<f64> = r.cells.values().map(|c| c.bytes_per_client_round).filter(|b| *b > 0.0).collect();
        s += &format!(" {} |", if bytes.is_empty() { "–".into() } else { format!("{:.0}", mean_std(&bytes).0) });
        let secs: Vec<f64> = r.cells.values().map(|c| c.server_s_per_round).filter(|b| *b > 0.0).collect();
        s += &format!(" {} |\n", if secs.is_empty() { "–".into() } else { format!("{:.2}", mean_std(&secs).0) });
    }
    s
}
