//! The federated server. Simulation calls it directly and deployment wraps it in
//! `hetfed_net::grpc::serve`: one code path. Its parts, one file each:
//!
//! - **desk** (`desk.rs`, `upload.rs`): what a transport talks to, the server's
//!   [`FedService`](hetfed_net::FedService): clients register, long-poll for instructions, download
//!   the global model (serialised once per version, when first asked for), upload their updates
//!   into the round's spool, where each is validated (see
//!   [`FedService::upload`](hetfed_net::FedService::upload) on [`Server`]), and report their own
//!   evaluations.
//! - **rounds** (`rounds.rs`): the round loop. Open a round (the strategy samples the clients),
//!   wait until every selected client has an outcome or the deadline, aggregate the accepted
//!   updates from the spool through a [`Strategy`] when the quorum is met, evaluate, record the
//!   round, checkpoint it, and close.
//! - **events** (`events.rs`): the JSON records of `metrics.jsonl`.
//! - **checkpoint** (`checkpoint.rs`): atomic checkpoints after each round, and resuming from one.
//! - **auth** (`auth.rs`): who may connect, and the audit of refusals: every refused registration
//!   and upload, and every call refused for its credentials, is one `{"event": "refused", ...}`
//!   line in `metrics.jsonl` (see [`Server::audit`]), never with the token.
//! - **eval** (`eval.rs`): server-side evaluation of the global model, or of what the strategy
//!   serves instead.

mod auth;
mod checkpoint;
mod desk;
mod eval;
mod events;
mod rounds;
mod upload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::{Checkpoint, ModelIdentity};
use hetfed_net::{ClientInfo, FitIns, ServiceError};
use serde_json::Value;

pub use auth::Auth;
pub use eval::{evaluate_model, evaluate_served, evaluate_weights, EvalTask, Served, ServerEval};

use crate::strategy::Strategy;
use auth::AuditWindow;
use hetfed_events::{Event, Resume};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub run_dir: PathBuf,
    pub rounds: u64,
    pub seed: u64,
    /// Registered clients needed before the first round (and after a restart).
    pub min_clients: usize,
    /// Accepted updates needed to aggregate a round; fewer leaves the model unchanged.
    pub quorum: usize,
    pub round_timeout: Duration,
    pub register_timeout: Duration,
    pub max_update_norm: f64,
    pub max_update_bytes: u64,
    /// Longest a long poll is held.
    pub max_poll: Duration,
    pub auth: Auth,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// The run's configuration, recorded in `metrics.jsonl`.
    pub config_json: Value,
    pub strategy_name: String,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds_completed: u64,
    pub model_version: String,
    pub final_eval: BTreeMap<String, f64>,
    pub wall_s: f64,
}

/// Where the run is: before its first round (or between a restart and the clients' return), a
/// round open for updates, a round closed (aggregating, evaluating), or the run over.
#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Registering,
    Fit,
    Closed,
    Done,
}

/// A selected client's upload in the open round.
#[derive(Debug, Clone)]
enum Outcome {
    InProgress,
    Accepted { n_examples: u64, metrics: hetfed_net::FitMetrics, bytes: u64, norm: f64, upload_s: f64 },
    Rejected { reason: String, bytes: u64 },
}

/// The global model as a client downloads it: its safetensors bytes and their SHA-256, made when
/// first asked for and kept until the model changes (a fresh cell per version).
type Download = Arc<tokio::sync::OnceCell<(Bytes, String)>>;

struct State {
    clients: BTreeMap<String, ClientInfo>,
    /// Heterogeneous runs: each client's own base (identity and weights) its updates are made from.
    client_bases: BTreeMap<String, (ModelIdentity, Arc<TensorMap>)>,
    round: u64,
    phase: Phase,
    global: Arc<TensorMap>,
    identity: ModelIdentity,
    /// `global` serialised for download, once a client asks for it.
    download: Download,
    selected: BTreeMap<String, FitIns>,
    outcomes: BTreeMap<String, Outcome>,
    bytes_down: BTreeMap<String, u64>,
    /// Clients told the run is over.
    finished: BTreeSet<String>,
}

/// The federated server (see the module docs).
pub struct Server {
    opts: ServerOptions,
    base: Checkpoint,
    eval: Option<ServerEval>,
    strategy: Mutex<Box<dyn Strategy>>,
    /// The strategy's client bases, taken once (they are fixed when it is built).
    client_bases: crate::strategy::ClientBases,
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
    log: Mutex<std::fs::File>,
    audit: Mutex<AuditWindow>,
    /// Uploads received at once (each holds a chunk in the transport's decoder and the spool
    /// file's buffer); the others wait, unread, holding at most the transport's window each.
    receptions: tokio::sync::Semaphore,
    /// Uploads validated at once (each validation holds one update in memory).
    validations: tokio::sync::Semaphore,
    run_id: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What a call of the [`FedService`](hetfed_net::FedService) answers.
type Reply<T> = std::result::Result<T, ServiceError>;

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

impl Server {
    /// A server whose global model starts as `base` (its weights), or as the latest checkpoint in
    /// the run directory when `opts.resume` is set.
    pub fn new(
        opts: ServerOptions,
        base: Checkpoint,
        strategy: Box<dyn Strategy>,
        eval: Option<ServerEval>,
    ) -> Result<Arc<Self>> {
        let mut strategy = strategy;
        let start = checkpoint::start(&opts, &base.weights, &mut *strategy)?;
        let identity = ModelIdentity { weights_hash: hetfed_core::tensor_map_hash(&start.global)?, ..base.identity()? };
        let metrics_path = opts.run_dir.join("metrics.jsonl");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let (changed, _) = tokio::sync::watch::channel(0u64);
        let client_bases = strategy.client_bases();
        let server = Arc::new(Self {
            base,
            eval,
            strategy: Mutex::new(strategy),
            client_bases,
            state: Mutex::new(State {
                clients: BTreeMap::new(),
                client_bases: BTreeMap::new(),
                round: start.round,
                phase: Phase::Registering,
                global: Arc::new(start.global),
                identity,
                download: Download::default(),
                selected: BTreeMap::new(),
                outcomes: BTreeMap::new(),
                bytes_down: BTreeMap::new(),
                finished: BTreeSet::new(),
            }),
            changed,
            log: Mutex::new(log),
            audit: Mutex::new(AuditWindow::new()),
            receptions: tokio::sync::Semaphore::new(upload::RECEPTIONS),
            validations: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8),
            ),
            run_id: start.run_id,
            opts,
        });
        if server.opts.resume {
            server.event(&Event::Resume(Resume { round: Some(start.round), time_unix_ms: Some(unix_ms()) }));
        }
        Ok(server)
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The current global weights.
    pub fn global(&self) -> Arc<TensorMap> {
        lock(&self.state).global.clone()
    }

    /// `(round, clients selected, final outcomes so far, registered clients)` for progress displays.
    pub fn progress(&self) -> (u64, usize, usize, usize) {
        let st = lock(&self.state);
        let done = st.outcomes.values().filter(|o| !matches!(o, Outcome::InProgress)).count();
        (st.round, st.selected.len(), done, st.clients.len())
    }

    /// Whether every registered client has been told that the run is over.
    pub fn all_finished(&self) -> bool {
        let st = lock(&self.state);
        st.phase == Phase::Done && st.clients.keys().all(|c| st.finished.contains(c))
    }

    /// Wakes every long poll and wait on the state.
    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Where a round's uploads are received (removed when the round closes).
    fn spool_dir(&self, round: u64) -> PathBuf {
        self.opts.run_dir.join("spool").join(format!("round-{round}"))
    }
}
