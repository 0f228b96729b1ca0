//! One TOML file configures a federated run: `hetfed simulate` reads all of it, `hetfed server`
//! and `hetfed client` read the same file (plus `[deploy]`). Relative paths are relative to the
//! file's directory. Every error names the key, the value found and what is allowed.

use std::path::{Path, PathBuf};

use hetfed_core::{Error, Result};
use hetfed_data::PartitionScheme;
use serde::{Deserialize, Serialize};

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
    pub rounds: u64,
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
    #[serde(default = "d_min_clients")]
    pub min_clients: usize,
    /// Accepted updates needed to aggregate a round.
    #[serde(default = "d_quorum")]
    pub quorum: usize,
    #[serde(default = "d_round_timeout")]
    pub round_timeout_s: f64,
    #[serde(default = "d_register_timeout")]
    pub register_timeout_s: f64,
    #[serde(default = "d_max_norm")]
    pub max_update_norm: f64,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Tasks the server evaluates its model on (their dev split); empty disables it.
    pub tasks: Vec<String>,
    /// At most this many examples per task, evenly spaced over the split (`i·n/k`); 0 = all.
    pub max_examples: usize,
    pub every: u64,
    pub batch_size: usize,
    pub max_len: usize,
    /// Lines of general held-out text (`mltext` English dev split) whose perplexity measures
    /// forgetting each evaluation (`general/ppl`); 0 = off.
    pub general_lines: usize,
    /// The split the tasks are evaluated on: "dev" (default) or "test".
    pub split: String,
    /// Longest generated output of generation tasks, in tokens.
    pub max_new_tokens: usize,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self { tasks: vec![], max_examples: 0, every: 1, batch_size: 16, max_len: 128, general_lines: 0, split: "dev".into(), max_new_tokens: 64 }
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
/// client holds is a function of the config alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// The clients' task (its train split is partitioned among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// With `task`: the number of clients; with `tasks`/`groups`: optional, must equal the total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_clients: Option<usize>,
    #[serde(default = "d_partition")]
    pub partition: PartitionScheme,
    /// One group of `clients_per_task` clients per task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    #[serde(default = "d_one")]
    pub clients_per_task: usize,
    /// Explicit client groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<ClientGroup>,
    /// Cap on each client's share (a seeded random sample of it); 0 = no cap.
    #[serde(default)]
    pub max_examples_per_client: usize,
    /// Fraction of each client's share kept as its local held-out slice.
    #[serde(default = "d_val_fraction")]
    pub val_fraction: f64,
    #[serde(default)]
    pub seed: u64,
}

/// Clients that share one task: its train split is partitioned among them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientGroup {
    pub task: String,
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
            return vec![ClientGroup { task: t.clone(), clients: self.num_clients.unwrap_or(0), partition: Some(self.partition) }];
        }
        if !self.tasks.is_empty() {
            return self.tasks.iter().map(|t| ClientGroup { task: t.clone(), clients: self.clients_per_task, partition: Some(self.partition) }).collect();
        }
        self.groups.iter().map(|g| ClientGroup { partition: Some(g.partition.unwrap_or(self.partition)), ..g.clone() }).collect()
    }

    /// Number of clients over all groups.
    pub fn num_clients(&self) -> usize {
        self.groups().iter().map(|g| g.clients).sum()
    }

    /// The distinct tasks of the run, in group order.
    pub fn task_names(&self) -> Vec<String> {
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
        let mut start = 0;
        for g in self.groups() {
            if index < start + g.clients {
                return Some((g, index - start));
            }
            start += g.clients;
        }
        None
    }

    /// A one-line description (`ethos × 3 (dirichlet α=1)`, `bbc × 1, scitldr × 1, ...`).
    pub fn describe(&self) -> String {
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
        let forms = usize::from(self.task.is_some()) + usize::from(!self.tasks.is_empty()) + usize::from(!self.groups.is_empty());
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
                return Err(format!("data.groups[{i}] ({}): expected at least 1 client, found 0", g.task));
            }
            hetfed_data::task::builtin(&g.task).map_err(|e| format!("data: task {:?}: {e}", g.task))?;
        }
        let total = self.num_clients();
        if total == 0 {
            return Err("data.num_clients: expected at least 1, found 0".into());
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
}

fn d_domain() -> String {
    "localhost".into()
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
        let mut c: RunConfig = toml::from_str(text).map_err(|e| Error::msg(format!("{origin}: {}", e.to_string().trim())))?;
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

    /// Client ids: `c0`, `c1`, ...
    pub fn client_ids(&self) -> Vec<String> {
        (0..self.data.num_clients()).map(|i| format!("c{i}")).collect()
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let s = &self.server;
        if self.run.rounds == 0 {
            return Err("run.rounds: expected at least 1, found 0".into());
        }
        self.data.validate()?;
        let n_clients = self.data.num_clients();
        if s.min_clients > n_clients {
            return Err(format!("server.min_clients: expected at most the number of clients {n_clients}, found {}", s.min_clients));
        }
        if s.quorum == 0 || s.quorum > n_clients {
            return Err(format!("server.quorum: expected 1..={n_clients}, found {}", s.quorum));
        }
        for (k, v) in [("server.round_timeout_s", s.round_timeout_s), ("server.register_timeout_s", s.register_timeout_s), ("server.max_update_norm", s.max_update_norm)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(format!("{k}: expected a positive number, found {v}"));
            }
        }
        if !(0.0..0.9).contains(&self.data.val_fraction) {
            return Err(format!("data.val_fraction: expected a number in [0, 0.9), found {}", self.data.val_fraction));
        }
        if !(self.sampling.fraction_fit > 0.0 && self.sampling.fraction_fit <= 1.0) {
            return Err(format!("sampling.fraction_fit: expected a number in (0, 1], found {}", self.sampling.fraction_fit));
        }
        self.strategy.validate()?;
        self.client.validate()?;
        if let Some(t) = &self.transfer {
            t.validate()?;
        }
        let e = &self.server.eval;
        if !(1..=4096).contains(&e.max_new_tokens) {
            return Err(format!("server.eval.max_new_tokens: expected 1..=4096, found {}", e.max_new_tokens));
        }
        if !(2..=65536).contains(&e.max_len) {
            return Err(format!("server.eval.max_len: expected 2..=65536 tokens, found {}", e.max_len));
        }
        if e.batch_size == 0 || e.batch_size > 4096 {
            return Err(format!("server.eval.batch_size: expected 1..=4096, found {}", e.batch_size));
        }
        if !matches!(self.server.eval.split.as_str(), "dev" | "test") {
            return Err(format!("server.eval.split: expected \"dev\" or \"test\", found {:?}", self.server.eval.split));
        }
        Ok(())
    }
}
