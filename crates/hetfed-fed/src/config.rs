//! One TOML file configures a federated run: `hetfed simulate` reads all of it, `hetfed server`
//! and `hetfed client` read the same file (plus `[deploy]`). Relative paths are relative to the
//! file's directory. Every error names the key, the value found and what is allowed.

use std::path::{Path, PathBuf};

use hetfed_core::{Error, Result};
use hetfed_data::PartitionScheme;
use serde::{Deserialize, Serialize};

use crate::hetero::{Aggregation, OffsetConfig, OffsetSequences, TransferConfig};
use crate::strategy::{FitConfig, Sampling, StrategyConfig};

/// The embedded default (`hetfed simulate` with no `--config`): paths relative to `configs/`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/simulate.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    #[serde(default)]
    pub run: RunSection,
    pub server: ServerSection,
    #[serde(default)]
    pub strategy: StrategyConfig,
    #[serde(default)]
    pub sampling: Sampling,
    /// What each selected client does in a round.
    #[serde(default)]
    pub client: FitConfig,
    pub data: DataSection,
    #[serde(default)]
    pub deploy: Option<DeploySection>,
    /// Heterogeneous federation: clients train their own small models and the server projects
    /// (or distils) their updates into its larger one.
    #[serde(default)]
    pub transfer: Option<crate::hetero::TransferConfig>,
    /// Directory that relative paths refer to (the config file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Federated rounds: 1..=100000.
    pub rounds: u64,
    /// Seed of client sampling and of every derived seed: any `u64`.
    pub seed: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        Self { rounds: 3, seed: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The server's model directory (HF layout).
    pub model: PathBuf,
    /// Registered clients the server waits for before round 1: 1..=the number of clients.
    #[serde(default = "d_min_clients")]
    pub min_clients: usize,
    /// Accepted updates needed to aggregate a round: 1..=the number of clients.
    #[serde(default = "d_quorum")]
    pub quorum: usize,
    /// Deadline of a round in seconds: (0, 1000000].
    #[serde(default = "d_round_timeout")]
    pub round_timeout_s: f64,
    /// How long the server waits for `min_clients` registrations, in seconds: (0, 1000000].
    #[serde(default = "d_register_timeout")]
    pub register_timeout_s: f64,
    /// Largest accepted global L2 norm of an update: a finite number > 0.
    #[serde(default = "d_max_norm")]
    pub max_update_norm: f64,
    /// Largest accepted update body in MiB: 1..=8192 (the transport's own cap is 8 GiB).
    #[serde(default = "d_max_mib")]
    pub max_update_mib: u64,
    #[serde(default)]
    pub eval: EvalSection,
}

fn d_min_clients() -> usize {
    1
}
fn d_quorum() -> usize {
    1
}
fn d_round_timeout() -> f64 {
    600.0
}
fn d_register_timeout() -> f64 {
    120.0
}
fn d_max_norm() -> f64 {
    1000.0
}
fn d_max_mib() -> u64 {
    8192
}

/// The split the server evaluates tasks on (`server.eval.split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    /// The tasks' dev splits (the default).
    #[default]
    Dev,
    /// The tasks' test splits.
    Test,
    /// The examples of each client task's train split that no client holds: for choosing
    /// settings without touching dev or test (`tasks` beyond the clients' are then not
    /// evaluated).
    Validation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Tasks the server evaluates its model on (their dev split); empty disables it.
    pub tasks: Vec<String>,
    /// At most this many examples per task, evenly spaced over the split (`i·n/k`); 0 = all.
    /// Range 0..=1000000.
    pub max_examples: usize,
    /// Evaluate every this many rounds: 1..=100000.
    pub every: u64,
    /// Sequences per forward pass: 1..=4096.
    pub batch_size: usize,
    /// Longest evaluated sequence in tokens (prompts lose their start): 2..=65536, and at most
    /// the context of the server's and the clients' models (clients evaluate with these settings
    /// too).
    pub max_len: usize,
    /// Lines of general held-out text (`mltext` English dev split) whose perplexity measures
    /// forgetting each evaluation (`general/ppl`); 0 = off. Range 0..=100000.
    pub general_lines: usize,
    /// The split the tasks are evaluated on.
    pub split: EvalSplit,
    /// Longest generated output of generation tasks, in tokens: 1..=4096, and less than the
    /// context of the server's and the clients' models.
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            tasks: vec![],
            max_examples: 0,
            every: 1,
            batch_size: 16,
            max_len: 128,
            general_lines: 0,
            split: EvalSplit::Dev,
            max_new_tokens: 64,
        }
    }
}

/// The clients' data. Three forms (exactly one):
///
/// - `task = "ethos"` with `num_clients` and `partition`: every client holds a share of one
///   task's train split (the homogeneous benchmark);
/// - `tasks = ["bbc", "scitldr", ...]`: one group of `clients_per_task` clients per task, each
///   group partitioning its task's train split with `partition` (specialist clients: the
///   proposal's scenario);
/// - `[[data.groups]]` tables `{ task, clients, partition }`: groups with their own sizes and
///   partitions.
///
/// Clients are numbered group after group in the order given (`c0`, `c1`, ...), so which task a
/// client holds is a function of the config alone. Two keys change which of the layout's
/// clients a run has, never what any client holds: `pooled` (one client with every share) and
/// `only_client` (one client of the layout alone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The clients' task (its train split is partitioned among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// With `task`: the number of clients; with `tasks`/`groups`: optional, must equal the total.
    /// The total over all groups is 1..=[`MAX_CLIENTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_clients: Option<usize>,
    /// `iid`, or `dirichlet` / `quantity` with `alpha` in (0, 1000000].
    #[serde(default = "d_partition")]
    pub partition: PartitionScheme,
    /// One group of `clients_per_task` clients per task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    /// 1..=[`MAX_CLIENTS`].
    #[serde(default = "d_one")]
    pub clients_per_task: usize,
    /// Explicit client groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<ClientGroup>,
    /// Cap on each client's share (a seeded random sample of it); 0 = no cap. Range
    /// 0..=10000000.
    #[serde(default)]
    pub max_examples_per_client: usize,
    /// Fraction of each client's share kept as its local held-out slice: [0, 0.9).
    #[serde(default = "d_val_fraction")]
    pub val_fraction: f64,
    /// Seed of the partition: any `u64`.
    #[serde(default)]
    pub seed: u64,
    /// One client, `c0`, holds every share the clients of this layout would hold (their
    /// training slices one after the other in client order, and their held-out slices
    /// likewise): centralised training on exactly the federated examples (the sweep's
    /// `central` row). Not with `only_client`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pooled: bool,
    /// Run only client `i` of this layout: its id `c<i>`, share and training seeds as in the
    /// full run (the sweep's `local_only` rows train each client alone this way). Range
    /// 0..the layout's number of clients. Not with `pooled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_client: Option<usize>,
}

/// Clients that share one task: its train split is partitioned among them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGroup {
    pub task: String,
    /// 1..=[`MAX_CLIENTS`].
    #[serde(default = "d_one")]
    pub clients: usize,
    /// Default: `data.partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionScheme>,
}

fn d_one() -> usize {
    1
}
fn d_partition() -> PartitionScheme {
    PartitionScheme::Iid
}
fn d_val_fraction() -> f64 {
    0.1
}

impl DataSection {
    /// The client groups, resolved from whichever form the config uses (validated configs only
    /// have one).
    pub fn groups(&self) -> Vec<ClientGroup> {
        if let Some(t) = &self.task {
            return vec![ClientGroup {
                task: t.clone(),
                clients: self.num_clients.unwrap_or(0),
                partition: Some(self.partition),
            }];
        }
        if !self.tasks.is_empty() {
            return self
                .tasks
                .iter()
                .map(|t| ClientGroup {
                    task: t.clone(),
                    clients: self.clients_per_task,
                    partition: Some(self.partition),
                })
                .collect();
        }
        self.groups
            .iter()
            .map(|g| ClientGroup { partition: Some(g.partition.unwrap_or(self.partition)), ..g.clone() })
            .collect()
    }

    /// Number of clients over all groups (the layout; see [`DataSection::run_clients`] for the
    /// clients a run has).
    pub fn num_clients(&self) -> usize {
        self.groups().iter().fold(0, |n, g| n.saturating_add(g.clients))
    }

    /// The numbers of the run's clients (`c<n>`): every client of the layout, only
    /// `only_client`, or the one pooled client `0`.
    pub fn run_clients(&self) -> Vec<usize> {
        match (self.pooled, self.only_client) {
            (true, _) => vec![0],
            (false, Some(i)) => vec![i],
            (false, None) => (0..self.num_clients()).collect(),
        }
    }

    /// The distinct tasks of the run's clients, in group order (with `only_client`: that
    /// client's task).
    pub fn task_names(&self) -> Vec<String> {
        if let Some((g, _)) = self.only_client.filter(|_| !self.pooled).and_then(|i| self.assignment(i)) {
            return vec![g.task];
        }
        let mut out: Vec<String> = Vec::new();
        for g in self.groups() {
            if !out.contains(&g.task) {
                out.push(g.task);
            }
        }
        out
    }

    /// Client `index`'s group and its index within the group (`None` past the last client).
    pub fn assignment(&self, index: usize) -> Option<(ClientGroup, usize)> {
        let mut start: usize = 0;
        for g in self.groups() {
            if index < start.saturating_add(g.clients) {
                return Some((g, index - start));
            }
            start = start.saturating_add(g.clients);
        }
        None
    }

    /// A one-line description (`ethos × 3 (dirichlet α=1)`, `bbc × 1, scitldr × 1, ...`; with
    /// `pooled` or `only_client`, which of the layout's clients the run has first).
    pub fn describe(&self) -> String {
        let layout = self.describe_layout();
        match (self.pooled, self.only_client) {
            (true, _) => format!("one client pooling every share of {layout}"),
            (false, Some(i)) => format!("client c{i} alone of {layout}"),
            (false, None) => layout,
        }
    }

    fn describe_layout(&self) -> String {
        self.groups()
            .iter()
            .map(|g| {
                let p = match g.partition.unwrap_or(self.partition) {
                    PartitionScheme::Iid => "iid".to_string(),
                    PartitionScheme::Dirichlet { alpha } => format!("dirichlet α={alpha}"),
                    PartitionScheme::Quantity { alpha } => format!("quantity α={alpha}"),
                };
                if g.clients > 1 {
                    format!("{} × {} ({p})", g.task, g.clients)
                } else {
                    format!("{} × 1", g.task)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let forms = usize::from(self.task.is_some())
            + usize::from(!self.tasks.is_empty())
            + usize::from(!self.groups.is_empty());
        if forms != 1 {
            return Err(format!("data: expected exactly one of `task`, `tasks` or `[[data.groups]]`, found {forms}"));
        }
        if self.task.is_some() && self.num_clients.is_none() {
            return Err("data.num_clients: expected a number of clients with `data.task`, found none".into());
        }
        if self.clients_per_task == 0 {
            return Err("data.clients_per_task: expected at least 1, found 0".into());
        }
        for (i, g) in self.groups().iter().enumerate() {
            if g.clients == 0 {
                if self.task.is_some() {
                    return Err(format!("data.num_clients: expected 1..={MAX_CLIENTS}, found 0"));
                }
                return Err(format!("data.groups[{i}].clients ({}): expected 1..={MAX_CLIENTS}, found 0", g.task));
            }
            hetfed_data::task::builtin(&g.task).map_err(|e| format!("data: task {:?}: {e}", g.task))?;
        }
        let total = self.num_clients();
        if total == 0 {
            return Err("data.num_clients: expected at least 1, found 0".into());
        }
        if let Some(i) = self.only_client {
            if self.pooled {
                return Err("data: expected at most one of `pooled` and `only_client`, found both".into());
            }
            if i >= total {
                return Err(format!(
                    "data.only_client: expected 0..={} (a client of the layout), found {i}",
                    total.saturating_sub(1)
                ));
            }
        }
        if self.task.is_none() {
            if let Some(n) = self.num_clients {
                if n != total {
                    return Err(format!("data.num_clients: expected the groups' total {total}, found {n}"));
                }
            }
        }
        Ok(())
    }
}

/// Deployment: where the server listens, where clients connect, certificates and tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySection {
    /// Server: address to listen on, e.g. "127.0.0.1:50051" or "0.0.0.0:50051".
    pub listen: String,
    /// Clients: the server's URL, e.g. "https://127.0.0.1:50051".
    pub server: String,
    /// Name the server's certificate must carry (e.g. "localhost").
    #[serde(default = "d_domain")]
    pub domain: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Require client certificates signed by `ca` (mutual TLS) besides tokens.
    #[serde(default)]
    pub mutual_tls: bool,
    /// TOML table `client id = "sha256 of its token"` (written by `hetfed certs`).
    pub tokens: PathBuf,
    /// Clients refused even with a valid token.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Clients: how long the server may stay unreachable (not up yet, restarting, or too busy
    /// to answer, e.g. evaluating a 7B model) before a client gives up, in seconds:
    /// (0, 86400]. Default 120.
    #[serde(default = "d_give_up_s")]
    pub give_up_s: f64,
}

fn d_domain() -> String {
    "localhost".into()
}

fn d_give_up_s() -> f64 {
    120.0
}

impl RunConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_toml(&text, base, &path.display().to_string())
    }

    /// The embedded default; its paths are relative to `configs/` of the working directory.
    pub fn embedded_default() -> Result<Self> {
        Self::from_toml(DEFAULT_CONFIG, PathBuf::from("configs"), "the embedded default config")
    }

    pub fn from_toml(text: &str, base_dir: PathBuf, origin: &str) -> Result<Self> {
        let mut c: RunConfig = toml::from_str(text).map_err(|e| match strategy_type_error(text) {
            Some(m) => Error::msg(format!("{origin}: {m}")),
            None => Error::msg(format!("{origin}: {}", e.to_string().trim())),
        })?;
        c.base_dir = base_dir;
        c.validate().map_err(|e| Error::msg(format!("{origin}: {e}")))?;
        Ok(c)
    }

    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn strategy_name(&self) -> &'static str {
        if let Some(t) = &self.transfer {
            return t.aggregation.strategy_name();
        }
        self.strategy.build(self.sampling, self.client.clone(), 0).name()
    }

    /// The run's client ids: `c0`, `c1`, ... (see [`DataSection::run_clients`]).
    pub fn client_ids(&self) -> Vec<String> {
        self.data.run_clients().into_iter().map(|i| format!("c{i}")).collect()
    }

    /// Checks the whole configuration: every numeric key against its range (see
    /// [`RunConfig::check_ranges`]), then the structure (data forms, names, strings).
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.data.validate()?;
        self.check_ranges()?;
        self.strategy.validate()?;
        self.client.validate()?;
        if let Some(t) = &self.transfer {
            t.validate()?;
        }
        Ok(())
    }

    /// Every numeric key of the file against its documented range, in one place. The error
    /// names the key, the range and the value found (`client.batch_size: expected 1..=4096,
    /// found 0`). Ranges that depend on the models (LoRA rank, sequence lengths against a
    /// model's context) are checked by [`RunConfig::check_models`] once the models are known.
    ///
    /// | key | range |
    /// |---|---|
    /// | `run.rounds` | 1..=100000 |
    /// | `run.seed`, `data.seed`, `client.seed`, `transfer.maps.seed`, `transfer.distill.seed` | any `u64` |
    /// | `server.min_clients`, `server.quorum` | 1..=the run's clients |
    /// | `server.round_timeout_s`, `server.register_timeout_s` | (0, 1000000] seconds |
    /// | `server.max_update_norm` | finite > 0 |
    /// | `server.max_update_mib` | 1..=8192 |
    /// | `server.eval.max_examples` | 0..=1000000 (0 = all) |
    /// | `server.eval.every` | 1..=100000 |
    /// | `server.eval.batch_size` | 1..=4096 |
    /// | `server.eval.max_len` | 2..=65536, ≤ the models' context |
    /// | `server.eval.general_lines` | 0..=100000 |
    /// | `server.eval.max_new_tokens` | 1..=4096, < the models' context |
    /// | `sampling.fraction_fit` | (0, 1] |
    /// | `sampling.min_fit_clients` | 0..=the run's clients |
    /// | `client.epochs` | 1..=1000 (0 allowed with `max_steps`) |
    /// | `client.max_steps` | 1..=1000000 |
    /// | `client.lr` | (0, 10] |
    /// | `client.batch_size` | 1..=4096 |
    /// | `client.max_len` | 2..=65536, ≤ the client model's context |
    /// | `client.lora_rank` | 0 (full fine-tuning) or 1..=[`MAX_LORA_RANK`], ≤ min(in, out) of the adapted layers |
    /// | `client.lora_alpha` | finite > 0 |
    /// | `client.proximal_mu` | [0, 1000000] |
    /// | `data.num_clients` (total), `data.clients_per_task`, `data.groups[i].clients` | 1..=[`MAX_CLIENTS`] |
    /// | `data.only_client` | 0..the layout's clients |
    /// | `data.max_examples_per_client` | 0..=10000000 (0 = all) |
    /// | `data.val_fraction` | [0, 0.9) |
    /// | `data.partition.alpha`, `data.groups[i].partition.alpha` | (0, 1000000] |
    /// | `strategy.server_lr`, `strategy.eta`, `strategy.tau`, `strategy.scale` | (0, 1000] |
    /// | `strategy.proximal_mu` | [0, 1000000] |
    /// | `strategy.beta1`, `strategy.beta2` | [0, 1) |
    /// | `transfer.calibration_sequences` | 2..=4096 |
    /// | `transfer.calibration_len` | 4..=4096, ≤ the models' context |
    /// | `transfer.calibration_sequences × calibration_len` | ≤ [`MAX_CALIBRATION_TOKENS`] |
    /// | `transfer.eta` | (0, 1000] |
    /// | `transfer.lars` | (0, 1000] |
    /// | `transfer.ties_top_k` | (0, 1] |
    /// | `transfer.dare_drop` | [0, 1) |
    /// | `transfer.fisher_strength` | [0, 1000000] |
    /// | `transfer.ortho_memory` | 0..=64 |
    /// | `transfer.maps.ridge` | [0, 1000000] |
    /// | `transfer.maps.held_out` | [0, 0.9) |
    /// | `transfer.maps.pairing[i]` | 0..=65535 (a layer index of the small model) |
    /// | `transfer.alpha.quality`, `.size`, `.entropy` | [0, 1000] |
    /// | `transfer.alpha.min_quality` | (0, 1] |
    /// | `transfer.distill.lora_rank` | 0 or 1..=[`MAX_LORA_RANK`], ≤ min(in, out) of the server model's layers |
    /// | `transfer.distill.lora_alpha` | finite > 0 |
    /// | `transfer.distill.lr` | (0, 10] |
    /// | `transfer.distill.steps` | 1..=100000 |
    /// | `transfer.distill.batch_size` | 1..=4096 |
    /// | `transfer.distill.temperature` | (0, 100] |
    /// | `transfer.distill.n_prompts` | 1..=100000 |
    /// | `transfer.distill.seq_len` | 2..=4096, ≤ the server model's context |
    /// | `transfer.offset.lambda` | (0, 100] |
    /// | `transfer.offset.general_sequences`, `.sampled_per_task` | 1..=100000 (when used) |
    /// | `transfer.offset.seq_len` | 4..=4096, ≤ the models' context |
    /// | `transfer.offset.heldout_per_task` | 0..=10000 |
    /// | `transfer.offset.answer_temperature` | (0, 10] |
    /// | `transfer.offset.answer_top_p` | (0, 1] |
    /// | `transfer.offset.scales` | 1 to 16 scales, each in (0, 10]; several need `heldout_per_task` ≥ 1 |
    /// | distillation tokens per round (sequences × seq_len) | ≤ [`MAX_DISTILL_TOKENS`] |
    pub fn check_ranges(&self) -> std::result::Result<(), String> {
        // The clients of the run (one with `data.pooled` or `data.only_client`).
        // Counted, not listed: the layout's client count is itself only checked below.
        let n_clients = if self.data.pooled || self.data.only_client.is_some() { 1 } else { self.data.num_clients() };
        int("run.rounds", self.run.rounds, 1, 100_000)?;

        let s = &self.server;
        int("server.min_clients", s.min_clients, 1, n_clients.max(1))?;
        int("server.quorum", s.quorum, 1, n_clients.max(1))?;
        real("server.round_timeout_s", s.round_timeout_s, Interval::left_open(0.0, MAX_TIMEOUT_S))?;
        real("server.register_timeout_s", s.register_timeout_s, Interval::left_open(0.0, MAX_TIMEOUT_S))?;
        real("server.max_update_norm", s.max_update_norm, Interval::POSITIVE)?;
        int("server.max_update_mib", s.max_update_mib, 1, 8192)?;

        let e = &s.eval;
        int("server.eval.max_examples", e.max_examples, 0, 1_000_000)?;
        int("server.eval.every", e.every, 1, 100_000)?;
        int("server.eval.batch_size", e.batch_size, 1, MAX_BATCH)?;
        int("server.eval.max_len", e.max_len, 2, MAX_SEQ_LEN)?;
        int("server.eval.general_lines", e.general_lines, 0, 100_000)?;
        int("server.eval.max_new_tokens", e.max_new_tokens, 1, 4096)?;

        real("sampling.fraction_fit", self.sampling.fraction_fit, Interval::left_open(0.0, 1.0))?;
        int("sampling.min_fit_clients", self.sampling.min_fit_clients, 0, n_clients)?;

        let c = &self.client;
        int("client.epochs", c.epochs, if c.max_steps.is_some() { 0 } else { 1 }, 1000)?;
        if let Some(m) = c.max_steps {
            int("client.max_steps", m, 1, 1_000_000)?;
        }
        real("client.lr", c.lr, Interval::left_open(0.0, 10.0))?;
        int("client.batch_size", c.batch_size, 1, MAX_BATCH)?;
        int("client.max_len", c.max_len, 2, MAX_SEQ_LEN)?;
        lora_rank("client.lora_rank", c.lora_rank, MAX_LORA_RANK, None)?;
        if c.lora_rank > 0 {
            real("client.lora_alpha", c.lora_alpha, Interval::POSITIVE)?;
        }
        real("client.proximal_mu", c.proximal_mu, Interval::closed(0.0, 1e6))?;
        if let Some(t) = &self.transfer {
            int("transfer.max_rank", t.max_rank, 0, MAX_LORA_RANK)?;
        }
        if let Some(dep) = &self.deploy {
            real("deploy.give_up_s", dep.give_up_s, Interval::left_open(0.0, 86_400.0))?;
        }

        let d = &self.data;
        int("data.num_clients", d.num_clients(), 1, MAX_CLIENTS)?;
        if let Some(n) = d.num_clients {
            int("data.num_clients", n, 1, MAX_CLIENTS)?;
        }
        int("data.clients_per_task", d.clients_per_task, 1, MAX_CLIENTS)?;
        for (i, g) in d.groups.iter().enumerate() {
            int(&format!("data.groups[{i}].clients"), g.clients, 1, MAX_CLIENTS)?;
            if let Some(p) = g.partition {
                partition(&format!("data.groups[{i}].partition.alpha"), p)?;
            }
        }
        partition("data.partition.alpha", d.partition)?;
        int("data.max_examples_per_client", d.max_examples_per_client, 0, 10_000_000)?;
        real("data.val_fraction", d.val_fraction, Interval::right_open(0.0, 0.9))?;

        let server_lr = Interval::left_open(0.0, 1000.0);
        match &self.strategy {
            StrategyConfig::Fedavg { server_lr: lr } => real("strategy.server_lr", *lr, server_lr)?,
            StrategyConfig::Fedprox { proximal_mu, server_lr: lr } => {
                real("strategy.server_lr", *lr, server_lr)?;
                real("strategy.proximal_mu", *proximal_mu, Interval::closed(0.0, 1e6))?;
            }
            StrategyConfig::Fedadam(p) | StrategyConfig::Fedyogi(p) | StrategyConfig::Fedadagrad(p) => {
                real("strategy.eta", p.eta, server_lr)?;
                real("strategy.tau", p.tau, server_lr)?;
                real("strategy.beta1", p.beta1, Interval::right_open(0.0, 1.0))?;
                real("strategy.beta2", p.beta2, Interval::right_open(0.0, 1.0))?;
            }
            StrategyConfig::TaskArithmetic { scale } => real("strategy.scale", *scale, server_lr)?,
        }

        if let Some(t) = &self.transfer {
            self.check_transfer(t)?;
        }
        Ok(())
    }

    fn check_transfer(&self, t: &TransferConfig) -> std::result::Result<(), String> {
        int("transfer.calibration_sequences", t.calibration_sequences, 2, 4096)?;
        int("transfer.calibration_len", t.calibration_len, 4, 4096)?;
        let calib = t.calibration_sequences * t.calibration_len;
        if calib > MAX_CALIBRATION_TOKENS {
            return Err(format!(
                "transfer.calibration_sequences × transfer.calibration_len: expected at most {MAX_CALIBRATION_TOKENS} calibration tokens, found {} × {} = {calib}",
                t.calibration_sequences, t.calibration_len
            ));
        }
        real("transfer.eta", t.eta, Interval::left_open(0.0, 1000.0))?;
        if let Some(c) = t.lars {
            real("transfer.lars", c, Interval::left_open(0.0, 1000.0))?;
        }
        real("transfer.ties_top_k", t.ties_top_k, Interval::left_open(0.0, 1.0))?;
        real("transfer.dare_drop", t.dare_drop, Interval::right_open(0.0, 1.0))?;
        real("transfer.fisher_strength", t.fisher_strength, Interval::closed(0.0, 1e6))?;
        int("transfer.ortho_memory", t.ortho_memory, 0, 64)?;

        let m = &t.maps;
        real("transfer.maps.ridge", m.ridge, Interval::closed(0.0, 1e6))?;
        real("transfer.maps.held_out", m.held_out, Interval::right_open(0.0, 0.9))?;
        for (i, &l) in m.pairing.iter().enumerate() {
            int(&format!("transfer.maps.pairing[{i}]"), l, 0, 65_535)?;
        }

        let a = &t.alpha;
        for (k, v) in [("quality", a.quality), ("size", a.size), ("entropy", a.entropy)] {
            real(&format!("transfer.alpha.{k}"), v, Interval::closed(0.0, 1000.0))?;
        }
        real("transfer.alpha.min_quality", a.min_quality, Interval::left_open(0.0, 1.0))?;

        check_distill(&t.distill)?;
        check_offset(&t.offset)?;
        self.check_distill_tokens(t)
    }

    /// The distillation targets hold a distribution over the vocabulary for every token: the
    /// tokens a round distils are bounded.
    fn check_distill_tokens(&self, t: &TransferConfig) -> std::result::Result<(), String> {
        let (dc, oc) = (&t.distill, &t.offset);
        let general = matches!(oc.sequences, OffsetSequences::General | OffsetSequences::Mixed);
        let sampled = matches!(oc.sequences, OffsetSequences::Sampled | OffsetSequences::Mixed);
        match t.aggregation {
            Aggregation::Distillation => {
                let tokens = dc.n_prompts * dc.seq_len;
                if tokens > MAX_DISTILL_TOKENS {
                    return Err(format!(
                        "transfer.distill.n_prompts × transfer.distill.seq_len: expected at most {MAX_DISTILL_TOKENS} distillation tokens per round, found {} × {} = {tokens}",
                        dc.n_prompts, dc.seq_len
                    ));
                }
            }
            Aggregation::OffsetDistillation => {
                let n_tasks = self.data.task_names().len();
                let seqs = if general { oc.general_sequences } else { 0 }
                    + if sampled { oc.sampled_per_task * n_tasks } else { 0 }
                    + oc.heldout_per_task * (n_tasks + usize::from(general));
                let tokens = seqs * oc.seq_len;
                if tokens > MAX_DISTILL_TOKENS {
                    return Err(format!(
                        "transfer.offset.general_sequences / sampled_per_task × transfer.offset.seq_len: expected at most {MAX_DISTILL_TOKENS} distillation tokens per round, found {seqs} sequences × {} = {tokens}",
                        oc.seq_len
                    ));
                }
            }
            Aggregation::Projection | Aggregation::OffsetServing => {}
        }
        Ok(())
    }

    /// The ranges that depend on the models, read from their `config.json` (no weights are
    /// loaded): `client.lora_rank` against the smallest adapted layer of every client model,
    /// `client.max_len` against the client models' context, `server.eval.max_len` and
    /// `server.eval.max_new_tokens` against the server's and clients' context (clients
    /// evaluate with the same settings), and in heterogeneous runs `transfer.distill.lora_rank`,
    /// `transfer.distill.seq_len`, `transfer.offset.seq_len` and `transfer.calibration_len`.
    /// `client_model` replaces the clients' models (`hetfed client --model`). A model whose
    /// `config.json` cannot be read is skipped here: loading it reports that.
    pub fn check_models(&self, client_model: Option<&Path>) -> Result<()> {
        self.check_models_inner(client_model).map_err(Error::msg)
    }

    fn check_models_inner(&self, client_model: Option<&Path>) -> std::result::Result<(), String> {
        let server = read_model_config(&self.path(&self.server.model));
        let client_dirs: Vec<PathBuf> = match (client_model, &self.transfer) {
            (Some(m), _) => vec![m.to_path_buf()],
            (None, Some(t)) if !t.client_models.is_empty() => t.client_models.iter().map(|m| self.path(m)).collect(),
            _ => vec![self.path(&self.server.model)],
        };
        let clients: Vec<ModelLimits> = client_dirs.iter().filter_map(|d| read_model_config(d)).collect();
        let c = &self.client;
        for m in &clients {
            if c.lora_rank > 0 {
                lora_rank("client.lora_rank", c.lora_rank, m.max_lora_rank.unwrap_or(0), Some(m))?;
            }
            seq_len("client.max_len", c.max_len, 2, m)?;
        }
        let e = &self.server.eval;
        for m in server.iter().chain(&clients) {
            seq_len("server.eval.max_len", e.max_len, 2, m)?;
            if e.max_new_tokens >= m.context {
                return Err(format!(
                    "server.eval.max_new_tokens: expected 1..={} (less than the context of {}), found {}",
                    m.context - 1,
                    m.dir.display(),
                    e.max_new_tokens
                ));
            }
        }
        if let Some(t) = &self.transfer {
            for m in server.iter().chain(&clients) {
                seq_len("transfer.calibration_len", t.calibration_len, 4, m)?;
            }
            if let Some(m) = &server {
                let uses_distill = matches!(t.aggregation, Aggregation::Distillation | Aggregation::OffsetDistillation);
                if uses_distill && t.distill.lora_rank > 0 {
                    lora_rank(
                        "transfer.distill.lora_rank",
                        t.distill.lora_rank,
                        m.max_lora_rank.unwrap_or(0),
                        Some(m),
                    )?;
                }
                if t.aggregation == Aggregation::Distillation {
                    seq_len("transfer.distill.seq_len", t.distill.seq_len, 2, m)?;
                }
            }
            if matches!(t.aggregation, Aggregation::OffsetServing | Aggregation::OffsetDistillation) {
                for m in server.iter().chain(&clients) {
                    seq_len("transfer.offset.seq_len", t.offset.seq_len, 4, m)?;
                }
            }
        }
        Ok(())
    }
}

/// `[strategy]` is an internally tagged enum (`name = "fedadam"`): serde reads it as a whole, so
/// a value of the wrong type is reported at the table's header without its key. Every key of the
/// table but `name` is a number; this names the first that is not.
fn strategy_type_error(text: &str) -> Option<String> {
    let v: toml::Table = toml::from_str(text).ok()?;
    let t = v.get("strategy")?.as_table()?;
    t.iter()
        .filter(|(k, _)| k.as_str() != "name")
        .find(|(_, v)| !(v.is_integer() || v.is_float()))
        .map(|(k, v)| format!("strategy.{k}: expected a number, found {} {v}", v.type_str()))
}

/// Most clients of one run (simulation holds every client's model and data in one process).
pub const MAX_CLIENTS: usize = 1024;
/// Largest batch of any batch-size key (sequences per forward pass).
pub const MAX_BATCH: usize = 4096;
/// Longest sequence any length key may ask for before the model's own context is known.
pub const MAX_SEQ_LEN: usize = 65_536;
/// Largest LoRA rank before the model is known; [`max_lora_rank`] gives the model's own bound.
pub const MAX_LORA_RANK: usize = 65_536;
/// Longest timeout in seconds (about 11.5 days; larger values overflow a `Duration`).
pub const MAX_TIMEOUT_S: f64 = 1_000_000.0;
/// Calibration tokens (sequences × length): both models' activations of every block are held
/// for them, `tokens × hidden × layers × 4` bytes each.
pub const MAX_CALIBRATION_TOKENS: usize = 65_536;
/// Distillation tokens per round (sequences × length): the targets hold a distribution over the
/// vocabulary for each, `tokens × vocab × 4` bytes (2 GiB at 65536 tokens and 8192 words).
pub const MAX_DISTILL_TOKENS: usize = 65_536;

/// An interval of finite reals, each end open or closed; `hi = ∞` leaves it unbounded above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub lo_closed: bool,
    pub hi: f64,
    pub hi_closed: bool,
}

impl Interval {
    /// Finite and > 0.
    pub const POSITIVE: Interval = Interval { lo: 0.0, lo_closed: false, hi: f64::INFINITY, hi_closed: false };
    /// Finite and >= 0.
    pub const NON_NEGATIVE: Interval = Interval { lo: 0.0, lo_closed: true, hi: f64::INFINITY, hi_closed: false };

    /// `[lo, hi]`.
    pub const fn closed(lo: f64, hi: f64) -> Self {
        Interval { lo, lo_closed: true, hi, hi_closed: true }
    }
    /// `(lo, hi]`.
    pub const fn left_open(lo: f64, hi: f64) -> Self {
        Interval { lo, lo_closed: false, hi, hi_closed: true }
    }
    /// `[lo, hi)`.
    pub const fn right_open(lo: f64, hi: f64) -> Self {
        Interval { lo, lo_closed: true, hi, hi_closed: false }
    }

    /// Whether `v` is finite and inside.
    pub fn contains(&self, v: f64) -> bool {
        v.is_finite()
            && (if self.lo_closed { v >= self.lo } else { v > self.lo })
            && (if self.hi_closed { v <= self.hi } else { v < self.hi })
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.hi.is_infinite() {
            write!(f, "a finite number {} {}", if self.lo_closed { ">=" } else { ">" }, self.lo)
        } else {
            write!(
                f,
                "a number in {}{}, {}{}",
                if self.lo_closed { '[' } else { '(' },
                self.lo,
                self.hi,
                if self.hi_closed { ']' } else { ')' }
            )
        }
    }
}

/// `transfer.distill`'s ranges.
fn check_distill(dc: &hetfed_distill::DistillConfig) -> std::result::Result<(), String> {
    lora_rank("transfer.distill.lora_rank", dc.lora_rank, MAX_LORA_RANK, None)?;
    if dc.lora_rank > 0 {
        real("transfer.distill.lora_alpha", dc.lora_alpha, Interval::POSITIVE)?;
    }
    real("transfer.distill.lr", dc.lr, Interval::left_open(0.0, 10.0))?;
    int("transfer.distill.steps", dc.steps, 1, 100_000)?;
    int("transfer.distill.batch_size", dc.batch_size, 1, MAX_BATCH)?;
    real("transfer.distill.temperature", dc.temperature, Interval::left_open(0.0, 100.0))?;
    int("transfer.distill.n_prompts", dc.n_prompts, 1, 100_000)?;
    int("transfer.distill.seq_len", dc.seq_len, 2, 4096)
}

/// `transfer.offset`'s ranges (the sequence counts of the sources its `sequences` uses).
fn check_offset(oc: &OffsetConfig) -> std::result::Result<(), String> {
    real("transfer.offset.lambda", oc.lambda, Interval::left_open(0.0, 100.0))?;
    int("transfer.offset.seq_len", oc.seq_len, 4, 4096)?;
    int("transfer.offset.heldout_per_task", oc.heldout_per_task, 0, 10_000)?;
    if matches!(oc.sequences, OffsetSequences::General | OffsetSequences::Mixed) {
        int("transfer.offset.general_sequences", oc.general_sequences, 1, 100_000)?;
    }
    if matches!(oc.sequences, OffsetSequences::Sampled | OffsetSequences::Mixed) {
        int("transfer.offset.sampled_per_task", oc.sampled_per_task, 1, 100_000)?;
    }
    Ok(())
}

/// `key: expected lo..=hi, found v` unless `lo <= v <= hi`.
pub fn int<T: PartialOrd + std::fmt::Display>(key: &str, v: T, lo: T, hi: T) -> std::result::Result<(), String> {
    if v < lo || v > hi {
        return Err(format!("{key}: expected {lo}..={hi}, found {v}"));
    }
    Ok(())
}

/// `key: expected a number in (lo, hi], found v` unless `v` is finite and in `range`.
pub fn real(key: &str, v: f64, range: Interval) -> std::result::Result<(), String> {
    if !range.contains(v) {
        return Err(format!("{key}: expected {range}, found {v}"));
    }
    Ok(())
}

/// A LoRA rank: 0 (full fine-tuning) or 1..=`max` (with the model it comes from, if known).
fn lora_rank(key: &str, r: usize, max: usize, model: Option<&ModelLimits>) -> std::result::Result<(), String> {
    if r <= max {
        return Ok(());
    }
    match model {
        Some(m) if max == 0 => Err(format!("{key}: expected 0 (full fine-tuning), found {r}: no layer of {} is adapted by LoRA", m.dir.display())),
        Some(m) => Err(format!("{key}: expected 0 (full fine-tuning) or 1..={max} (min(in, out) of the smallest adapted layer of {}), found {r}", m.dir.display())),
        None => Err(format!("{key}: expected 0 (full fine-tuning) or 1..={max}, found {r}")),
    }
}

/// A sequence length of at least `lo` and at most the model's context.
fn seq_len(key: &str, v: usize, lo: usize, m: &ModelLimits) -> std::result::Result<(), String> {
    if v < lo || v > m.context {
        return Err(format!(
            "{key}: expected {lo}..={} tokens (the context of {}), found {v}",
            m.context,
            m.dir.display()
        ));
    }
    Ok(())
}

/// A partition's concentration `alpha` (Dirichlet and quantity skew): (0, 1000000].
fn partition(key: &str, p: PartitionScheme) -> std::result::Result<(), String> {
    match p {
        PartitionScheme::Iid => Ok(()),
        PartitionScheme::Dirichlet { alpha } | PartitionScheme::Quantity { alpha } => {
            real(key, alpha, Interval::left_open(0.0, 1e6))
        }
    }
}

/// What the limits need of a model, from its `config.json`.
struct ModelLimits {
    dir: PathBuf,
    context: usize,
    max_lora_rank: Option<usize>,
}

fn read_model_config(dir: &Path) -> Option<ModelLimits> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let arch = hetfed_model::Arch::from_config(&json, &path).ok()?;
    Some(ModelLimits {
        dir: dir.to_path_buf(),
        context: arch.max_positions(&json),
        max_lora_rank: max_lora_rank(&arch, &arch.default_lora_targets()),
    })
}

/// The largest LoRA rank that `targets` admit on `arch`: min(in, out) over the linear layers
/// they adapt (a rank above it adds parameters but no expressiveness, and allocates
/// `rank × (in + out)` values per layer). `None` when no layer matches.
pub fn max_lora_rank(arch: &hetfed_model::Arch, targets: &[String]) -> Option<usize> {
    let cfg = hetfed_model::LoraConfig { targets: targets.to_vec(), ..Default::default() };
    arch.param_shapes()
        .into_iter()
        .filter(|(name, shape)| shape.len() == 2 && name.strip_suffix(".weight").is_some_and(|m| cfg.matches(m)))
        .map(|(_, shape)| shape[0].min(shape[1]))
        .min()
}
