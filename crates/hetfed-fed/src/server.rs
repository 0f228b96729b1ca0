//! The federated server: registration and authentication, the round loop (sampling, deadline,
//! quorum), validation of every update, streaming aggregation through a [`Strategy`], server-side
//! evaluation, metrics and atomic checkpoints. It implements [`FedService`], so simulation calls
//! it directly and deployment wraps it in `hetfed_net::grpc::serve`: one code path.
//!
//! Refusals are audited: every refused registration and upload, and every call refused for its
//! credentials, is one `{"event": "refused", ...}` line in `metrics.jsonl` (see [`Server::audit`]),
//! never with the token. Each round's uploads: see [`FedService::upload`] on [`Server`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use candle_core::DType;
use futures::StreamExt;
use hetfed_core::{Error, Result, TensorMap};
use hetfed_data::{Items, TaskSpec};
use hetfed_eval::{evaluate, EvalOptions};
use hetfed_model::{Checkpoint, ModelIdentity};
use hetfed_net::{
    body_from_bytes, ByteStream, Caller, ClientInfo, EvalReport, FedService, FitIns, Instruction, ModelHeader,
    RegisterReply, ServiceError, UploadHeader, UploadReply,
};
use hetfed_taskvec::TaskVector;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::strategy::{AggregateReport, Failure, FitResult, Strategy};
use crate::sys;
use crate::validate::validate_update;

/// Who may connect: client id → SHA-256 of its token (the server never stores tokens), and the
/// revoked ids.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    token_hashes: BTreeMap<String, String>,
    revoked: BTreeSet<String>,
}

impl Auth {
    pub fn add_token(&mut self, client_id: &str, token: &str) {
        self.token_hashes.insert(client_id.to_string(), hetfed_core::sha256_hex(token.as_bytes()));
    }

    pub fn add_token_hash(&mut self, client_id: &str, sha256_hex: &str) {
        self.token_hashes.insert(client_id.to_string(), sha256_hex.to_ascii_lowercase());
    }

    pub fn revoke(&mut self, client_id: &str) {
        self.revoked.insert(client_id.to_string());
    }

    pub fn len(&self) -> usize {
        self.token_hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_hashes.is_empty()
    }

    /// Refuses unknown ids, wrong tokens (compared in constant time) and revoked clients.
    pub fn check(&self, caller: &Caller) -> std::result::Result<(), ServiceError> {
        let Some(expected) = self.token_hashes.get(&caller.client_id) else {
            return Err(ServiceError::Unauthenticated(format!("unknown client id {:?}", caller.client_id)));
        };
        let got = hetfed_core::sha256_hex(caller.token.expose().as_bytes());
        let diff =
            expected.bytes().zip(got.bytes()).fold(expected.len() ^ got.len(), |acc, (a, b)| acc | (a ^ b) as usize);
        if diff != 0 {
            return Err(ServiceError::Unauthenticated(format!("wrong token for client {:?}", caller.client_id)));
        }
        if self.revoked.contains(&caller.client_id) {
            return Err(ServiceError::PermissionDenied(format!("client {:?} is revoked", caller.client_id)));
        }
        Ok(())
    }
}

/// A task the server evaluates its model on each round.
pub struct EvalTask {
    pub spec: TaskSpec,
    pub items: Items,
}

/// Server-side evaluation.
pub struct ServerEval {
    pub tasks: Vec<EvalTask>,
    pub opts: EvalOptions,
    /// Evaluate every this many rounds (and always after the last and before the first).
    pub every: u64,
    /// General held-out text (never trained on): its perplexity, `general/ppl`, measures
    /// forgetting. Empty = not measured.
    pub general: Vec<hetfed_train::Encoded>,
}

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

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Registering,
    Fit,
    Closed,
    Done,
}

#[derive(Debug, Clone)]
enum Outcome {
    InProgress,
    Accepted { n_examples: u64, metrics: BTreeMap<String, f64>, bytes: u64, norm: f64, upload_s: f64 },
    Rejected { reason: String, bytes: u64 },
}

/// Uploads streamed into the spool at once; later ones wait, unread. Each costs the server about
/// two chunks (the transport's decoder, the spool file's buffer), so this bounds the memory of
/// uploads independently of the number of clients; it is large enough that a few clients on slow
/// links do not hold up everyone's uploads.
const RECEPTIONS: usize = 16;

/// Audit records of refusals written in full per minute; beyond, they are counted, and the count
/// is written as one `refused_suppressed` line (a flood of bad calls cannot fill the disk).
const AUDIT_PER_MINUTE: u32 = 120;
/// Longest claimed client id and reason an audit record keeps (both may come from the caller).
const AUDIT_MAX_CHARS: usize = 256;

struct AuditWindow {
    start: Instant,
    written: u32,
    suppressed: u64,
}

struct State {
    clients: BTreeMap<String, ClientInfo>,
    /// Heterogeneous runs: each client's own base (identity and weights) its updates are made from.
    client_bases: BTreeMap<String, (ModelIdentity, Arc<TensorMap>)>,
    round: u64,
    phase: Phase,
    global: Arc<TensorMap>,
    identity: ModelIdentity,
    model_bytes: Bytes,
    selected: BTreeMap<String, FitIns>,
    outcomes: BTreeMap<String, Outcome>,
    bytes_down: BTreeMap<String, u64>,
    /// Clients told the run is over.
    finished: BTreeSet<String>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub rounds_completed: u64,
    pub model_version: String,
    pub final_eval: BTreeMap<String, f64>,
    pub wall_s: f64,
}

/// The federated server (see the module docs).
pub struct Server {
    opts: ServerOptions,
    base: Checkpoint,
    eval: Option<ServerEval>,
    strategy: Mutex<Box<dyn Strategy>>,
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

fn model_bytes(weights: &TensorMap) -> Result<Bytes> {
    Ok(Bytes::from(hetfed_core::tensors_to_bytes(weights, DType::F32, &BTreeMap::new())?))
}

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

const LATEST: &str = "LATEST";

impl Server {
    /// A server whose global model starts as `base` (its weights), or as the latest checkpoint in
    /// the run directory when `opts.resume` is set.
    pub fn new(
        opts: ServerOptions,
        base: Checkpoint,
        strategy: Box<dyn Strategy>,
        eval: Option<ServerEval>,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&opts.run_dir).map_err(|e| Error::io(&opts.run_dir, e))?;
        let mut strategy = strategy;
        let mut global = base.weights.clone();
        let mut round = 0;
        let metrics_path = opts.run_dir.join("metrics.jsonl");
        let mut run_id = format!("{:016x}", crate::strategy::mix(opts.seed, unix_ms()));
        let has_checkpoint = opts.run_dir.join("checkpoints").join(LATEST).exists();
        if opts.resume && !has_checkpoint {
            // The run stopped before its first checkpoint: nothing to keep, start it again.
            tracing::warn!("{}: no checkpoint yet, starting the run from round 0", opts.run_dir.display());
            hetfed_core::write_atomic(&metrics_path, b"")?;
        }
        if opts.resume && has_checkpoint {
            let ck = load_checkpoint(&opts.run_dir)?;
            global = ck.weights;
            round = ck.round;
            run_id = ck.run_id;
            strategy.load_state(ck.strategy_json, ck.strategy_tensors)?;
            truncate_metrics(&metrics_path, round)?;
        } else if !opts.resume && metrics_path.exists() {
            return Err(Error::msg(format!(
                "{}: a run already exists here; pass --resume to continue it or choose another --out",
                opts.run_dir.display()
            )));
        }
        let identity = ModelIdentity { weights_hash: hetfed_core::tensor_map_hash(&global)?, ..base.identity()? };
        let bytes = model_bytes(&global)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let (changed, _) = tokio::sync::watch::channel(0u64);
        let server = Arc::new(Self {
            base,
            eval,
            strategy: Mutex::new(strategy),
            state: Mutex::new(State {
                clients: BTreeMap::new(),
                client_bases: BTreeMap::new(),
                round,
                phase: Phase::Registering,
                global: Arc::new(global),
                identity,
                model_bytes: bytes,
                selected: BTreeMap::new(),
                outcomes: BTreeMap::new(),
                bytes_down: BTreeMap::new(),
                finished: BTreeSet::new(),
            }),
            changed,
            log: Mutex::new(log),
            audit: Mutex::new(AuditWindow { start: Instant::now(), written: 0, suppressed: 0 }),
            receptions: tokio::sync::Semaphore::new(RECEPTIONS),
            validations: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8),
            ),
            run_id,
            opts,
        });
        if server.opts.resume {
            server.event(json!({"event": "resume", "round": round, "time_unix_ms": unix_ms()}));
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

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn event(&self, v: Value) {
        let mut f = lock(&self.log);
        let line = v.to_string();
        if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
            tracing::error!("writing metrics.jsonl: {e}");
        }
    }

    /// Records a refused call (audit): one `metrics.jsonl` line
    /// `{"event": "refused", "call", "client" (the id claimed), "reason", "peer" (remote address or
    /// null), "upload_round" (the round an upload named, else null), "server_round", "time_unix_ms"}`
    /// and a warning in the log. The token is never written: it is not part of the record, and a
    /// reason or id that happens to contain it has it replaced by `***`. At most
    /// [`AUDIT_PER_MINUTE`] records a minute; the rest are counted into one `refused_suppressed`
    /// line `{"count", "window_s", "time_unix_ms"}` written before the next record (or at the end
    /// of the run).
    pub fn audit(&self, call: &str, caller: &Caller, upload_round: Option<u64>, reason: &str) {
        let token = caller.token.expose();
        let clean = |s: &str| -> String {
            let s = if token.is_empty() { s.to_owned() } else { s.replace(token, "***") };
            let mut out: String = s.chars().take(AUDIT_MAX_CHARS).collect();
            if out.len() < s.len() {
                out.push('…');
            }
            out
        };
        let (client, reason) = (clean(&caller.client_id), clean(reason));
        let peer = hetfed_net::peer_addr().map(|a| a.to_string());
        let suppressed = {
            let mut w = lock(&self.audit);
            let mut flushed = None;
            if w.start.elapsed() >= Duration::from_secs(60) {
                flushed = Some(std::mem::take(&mut w.suppressed)).filter(|n| *n > 0);
                w.start = Instant::now();
                w.written = 0;
            }
            if w.written >= AUDIT_PER_MINUTE {
                w.suppressed += 1;
                if let Some(n) = flushed {
                    // Not expected (a fresh window writes first), but never lose a count.
                    w.suppressed += n;
                }
                return;
            }
            w.written += 1;
            flushed
        };
        if let Some(n) = suppressed {
            self.event(json!({"event": "refused_suppressed", "count": n, "window_s": 60, "time_unix_ms": unix_ms()}));
        }
        tracing::warn!(call, client = %client, peer = ?peer, "refused: {reason}");
        let server_round = lock(&self.state).round;
        self.event(json!({
            "event": "refused", "call": call, "client": client, "reason": reason, "peer": peer,
            "upload_round": upload_round, "server_round": server_round, "time_unix_ms": unix_ms(),
        }));
    }

    /// Writes the count of audit records suppressed in the current window, if any.
    fn flush_audit(&self) {
        let n = std::mem::take(&mut lock(&self.audit).suppressed);
        if n > 0 {
            self.event(json!({"event": "refused_suppressed", "count": n, "window_s": 60, "time_unix_ms": unix_ms()}));
        }
    }

    fn spool_dir(&self, round: u64) -> PathBuf {
        self.opts.run_dir.join("spool").join(format!("round-{round}"))
    }

    /// Runs every round, then tells clients the run is over.
    pub async fn run(self: &Arc<Self>) -> Result<RunSummary> {
        let t0 = Instant::now();
        let start = lock(&self.state).round;
        if start == 0 {
            self.event(json!({
                "event": "run_start", "run_id": self.run_id, "strategy": self.opts.strategy_name,
                "rounds": self.opts.rounds, "clients": self.opts.auth.token_hashes.keys().collect::<Vec<_>>(),
                "config": self.opts.config_json, "strategy_info": lock(&self.strategy).run_info(), "time_unix_ms": unix_ms(),
            }));
        }
        let mut final_eval = BTreeMap::new();
        if start == 0 && self.eval.is_some() {
            let t = Instant::now();
            final_eval = self.server_eval().await?;
            self.event(json!({"event": "round", "round": 0, "server_eval": final_eval, "server_eval_s": t.elapsed().as_secs_f64()}));
        }
        for round in start + 1..=self.opts.rounds {
            final_eval = self.run_round(round).await?;
        }
        {
            let mut st = lock(&self.state);
            st.phase = Phase::Done;
        }
        // Each round's spool is removed when it closes; the empty root goes with the run.
        let _ = std::fs::remove_dir(self.opts.run_dir.join("spool"));
        self.notify();
        self.flush_audit();
        let wall_s = t0.elapsed().as_secs_f64();
        let rounds_completed = self.opts.rounds;
        self.event(json!({"event": "run_end", "rounds_completed": rounds_completed, "wall_s": wall_s, "time_unix_ms": unix_ms()}));
        let model_version = lock(&self.state).identity.weights_hash.clone();
        Ok(RunSummary { rounds_completed, model_version, final_eval, wall_s })
    }

    async fn wait_for_clients(&self) -> Result<()> {
        let deadline = Instant::now() + self.opts.register_timeout;
        loop {
            let mut rx = self.changed.subscribe();
            let n = lock(&self.state).clients.len();
            if n >= self.opts.min_clients {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(Error::msg(format!(
                    "expected at least {} registered clients (server.min_clients), found {n} after waiting {:.1} s (server.register_timeout_s)",
                    self.opts.min_clients,
                    self.opts.register_timeout.as_secs_f64()
                )));
            }
        }
    }

    async fn run_round(self: &Arc<Self>, round: u64) -> Result<BTreeMap<String, f64>> {
        self.wait_for_clients().await?;
        let t_round = Instant::now();
        let (cpu0, available) = (sys::cpu_seconds(), lock(&self.state).clients.values().cloned().collect::<Vec<_>>());
        let plan = lock(&self.strategy).configure_fit(round, &available);
        if plan.is_empty() {
            return Err(Error::msg(format!(
                "round {round}: the strategy selected no client among {}",
                available.len()
            )));
        }
        let deadline = Instant::now() + self.opts.round_timeout;
        let deadline_ms = unix_ms() + self.opts.round_timeout.as_millis() as u64;
        {
            let mut st = lock(&self.state);
            st.round = round;
            st.phase = Phase::Fit;
            st.outcomes.clear();
            st.bytes_down.clear();
            let version = st.identity.weights_hash.clone();
            let versions: BTreeMap<String, String> =
                st.client_bases.iter().map(|(id, (i, _))| (id.clone(), i.weights_hash.clone())).collect();
            st.selected = plan
                .iter()
                .map(|(id, cfg)| {
                    let config = serde_json::to_value(cfg).unwrap_or(Value::Null);
                    let model_version = versions.get(id).cloned().unwrap_or_else(|| version.clone());
                    (id.clone(), FitIns { round, model_version, config, deadline_unix_ms: deadline_ms })
                })
                .collect();
        }
        self.notify();
        tracing::info!("round {round}: {} clients selected", plan.len());
        // Wait until every selected client has a final outcome, or the deadline.
        loop {
            let mut rx = self.changed.subscribe();
            let all = {
                let st = lock(&self.state);
                st.selected
                    .keys()
                    .all(|c| matches!(st.outcomes.get(c), Some(Outcome::Accepted { .. } | Outcome::Rejected { .. })))
            };
            if all || tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                break;
            }
        }
        let (outcomes, selected, bytes_down) = {
            let mut st = lock(&self.state);
            st.phase = Phase::Closed;
            (std::mem::take(&mut st.outcomes), st.selected.clone(), std::mem::take(&mut st.bytes_down))
        };
        self.notify();
        let mut failures = Vec::new();
        let mut accepted = Vec::new();
        for id in selected.keys() {
            match outcomes.get(id) {
                Some(Outcome::Accepted { n_examples, metrics, .. }) => {
                    accepted.push((id.clone(), *n_examples, metrics.clone()))
                }
                Some(Outcome::Rejected { reason, .. }) => {
                    failures.push(Failure { client_id: id.clone(), reason: format!("rejected: {reason}") })
                }
                Some(Outcome::InProgress) => {
                    failures.push(Failure { client_id: id.clone(), reason: "upload unfinished at the deadline".into() })
                }
                None => failures.push(Failure {
                    client_id: id.clone(),
                    reason: "no update before the deadline (client slow or disconnected)".into(),
                }),
            }
        }
        // Aggregate from the spool, in client-id order, one update in memory at a time.
        let t_agg = Instant::now();
        let report = if accepted.len() >= self.opts.quorum.max(1) {
            let this = self.clone();
            let failures2 = failures.clone();
            let acc = accepted.clone();
            let rep = tokio::task::spawn_blocking(move || this.aggregate(round, &acc, &failures2))
                .await
                .map_err(|e| Error::msg(format!("aggregation task failed: {e}")))??;
            Some(rep)
        } else {
            tracing::warn!(
                "round {round}: {} of {} updates accepted, quorum {}: model unchanged",
                accepted.len(),
                selected.len(),
                self.opts.quorum
            );
            None
        };
        let aggregate_s = t_agg.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(self.spool_dir(round));
        let t_eval = Instant::now();
        let every = self.eval.as_ref().map_or(0, |e| e.every.max(1));
        let server_eval = if self.eval.is_some() && (round.is_multiple_of(every) || round == self.opts.rounds) {
            self.server_eval().await?
        } else {
            BTreeMap::new()
        };
        let server_eval_s = t_eval.elapsed().as_secs_f64();
        // Metrics: one line per selected client, then the round.
        let (mut up_total, mut down_total) = (0u64, 0u64);
        for id in selected.keys() {
            let down = bytes_down.get(id).copied().unwrap_or(0);
            down_total += down;
            let mut line = json!({"event": "client_round", "round": round, "client": id, "bytes_down": down});
            match outcomes.get(id) {
                Some(Outcome::Accepted { n_examples, metrics, bytes, norm, upload_s }) => {
                    up_total += bytes;
                    let eval: BTreeMap<&str, f64> =
                        metrics.iter().filter_map(|(k, v)| k.strip_prefix("eval:").map(|k| (k, *v))).collect();
                    let m = |k: &str| metrics.get(k).copied();
                    line["status"] = json!("ok");
                    line["examples"] = json!(n_examples);
                    line["bytes_up"] = json!(bytes);
                    line["update_norm"] = json!(norm);
                    line["upload_s"] = json!(upload_s);
                    line["train_s"] = json!(m("train_s"));
                    line["train_loss"] = json!(m("train_loss"));
                    line["val_loss_before"] = json!(m("val_loss_before"));
                    line["val_loss_after"] = json!(m("val_loss_after"));
                    line["cpu_s"] = json!(m("cpu_s"));
                    line["peak_rss_bytes"] = json!(m("peak_rss_bytes"));
                    line["eval"] = json!(eval);
                    if let Some(w) = report.as_ref().and_then(|r| r.weights.get(id)) {
                        line["weight"] = json!(w);
                    }
                }
                Some(Outcome::Rejected { reason, bytes }) => {
                    up_total += bytes;
                    line["status"] = json!("rejected");
                    line["reason"] = json!(reason);
                    line["bytes_up"] = json!(bytes);
                }
                _ => {
                    let reason =
                        failures.iter().find(|f| &f.client_id == id).map(|f| f.reason.clone()).unwrap_or_default();
                    line["status"] = json!("failed");
                    line["reason"] = json!(reason);
                }
            }
            self.event(line);
        }
        let n_ok = accepted.len();
        let n_rej = outcomes.values().filter(|o| matches!(o, Outcome::Rejected { .. })).count();
        let report = report.unwrap_or_default();
        self.event(json!({
            "event": "round", "round": round, "selected": selected.len(), "ok": n_ok, "rejected": n_rej,
            "failed": selected.len() - n_ok - n_rej, "aggregated": report.n_aggregated > 0, "n_aggregated": report.n_aggregated, "quorum": self.opts.quorum,
            "alphas": report.weights, "applied_norm": report.applied_norm, "aggregation": report.details,
            "aggregate_s": aggregate_s, "server_eval_s": server_eval_s, "wall_s": t_round.elapsed().as_secs_f64(),
            "bytes_up": up_total, "bytes_down": down_total, "server_eval": server_eval,
            "server_cpu_s": sys::cpu_seconds() - cpu0, "server_rss_bytes": sys::rss_bytes(), "server_peak_rss_bytes": sys::peak_rss_bytes(),
            "model_version": lock(&self.state).identity.weights_hash,
        }));
        // After the round's metrics: a crash in between re-runs the round on resume, and resume
        // drops that round's lines first, so metrics.jsonl never holds a round twice.
        self.save_checkpoint(round)?;
        Ok(server_eval)
    }

    fn aggregate(
        &self,
        round: u64,
        accepted: &[(String, u64, BTreeMap<String, f64>)],
        failures: &[Failure],
    ) -> Result<AggregateReport> {
        let spool = self.spool_dir(round);
        let mut global = (*lock(&self.state).global).clone();
        let mut iter = accepted.iter().map(|(id, n, metrics)| {
            let path = spool.join(format!("{id}.safetensors"));
            let tv = TaskVector::load(&path)?;
            FitResult::new(id.clone(), *n, metrics.clone(), tv)
        });
        let report = lock(&self.strategy).aggregate_fit(round, &mut global, &mut iter, failures)?;
        let identity = ModelIdentity {
            weights_hash: hetfed_core::tensor_map_hash(&global)?,
            ..lock(&self.state).identity.clone()
        };
        let bytes = model_bytes(&global)?;
        let mut st = lock(&self.state);
        st.global = Arc::new(global);
        st.identity = identity;
        st.model_bytes = bytes;
        Ok(report)
    }

    async fn server_eval(self: &Arc<Self>) -> Result<BTreeMap<String, f64>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, f64>> {
            let Some(ev) = &this.eval else { return Ok(BTreeMap::new()) };
            let global = this.global();
            // The models are built under the strategy's lock (cheap: they share weights), and
            // evaluated after it is released.
            let served = Served::new(&this.base, &global, ev, &**lock(&this.strategy))?;
            evaluate_served(&this.base, &served, ev)
        })
        .await
        .map_err(|e| Error::msg(format!("evaluation task failed: {e}")))?
    }

    fn save_checkpoint(&self, round: u64) -> Result<()> {
        let root = self.opts.run_dir.join("checkpoints");
        let dir = root.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let global = self.global();
        hetfed_core::save_safetensors(&global, DType::F32, &BTreeMap::new(), &dir.join("model.safetensors"))?;
        let (sjson, stensors) = lock(&self.strategy).state();
        hetfed_core::save_safetensors(&stensors, DType::F32, &BTreeMap::new(), &dir.join("strategy.safetensors"))?;
        let state = json!({"round": round, "run_id": self.run_id, "seed": self.opts.seed, "strategy": self.opts.strategy_name, "strategy_state": sjson});
        hetfed_core::write_atomic(&dir.join("state.json"), state.to_string().as_bytes())?;
        // The pointer flips atomically once the checkpoint is complete; older ones are removed after.
        hetfed_core::write_atomic(&root.join(LATEST), format!("round-{round}").as_bytes())?;
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("round-") && name != format!("round-{round}") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// The caller's credentials; refusals of calls other than register and upload (which audit
    /// every refusal themselves) are audited here under `call`.
    fn authed(&self, call: Option<&str>, caller: &Caller) -> std::result::Result<(), ServiceError> {
        let r = self.opts.auth.check(caller);
        if let (Some(call), Err(e)) = (call, &r) {
            self.audit(call, caller, None, &e.to_string());
        }
        r
    }

    fn registered(&self, call: Option<&str>, caller: &Caller) -> std::result::Result<(), ServiceError> {
        self.authed(call, caller)?;
        if !lock(&self.state).clients.contains_key(&caller.client_id) {
            return Err(ServiceError::NotFound(format!(
                "client {:?} is not registered (register again)",
                caller.client_id
            )));
        }
        Ok(())
    }

    /// Streams `body` to `path` through `path.part` (renamed once complete and checked); on any
    /// failure the partial file is removed.
    async fn receive(
        &self,
        header: &UploadHeader,
        body: ByteStream,
        path: &Path,
    ) -> std::result::Result<u64, ServiceError> {
        let tmp = path.with_extension("part");
        let r = Self::receive_to(header, body, &tmp, path).await;
        if r.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        r
    }

    async fn receive_to(
        header: &UploadHeader,
        mut body: ByteStream,
        tmp: &Path,
        path: &Path,
    ) -> std::result::Result<u64, ServiceError> {
        let mut f = tokio::fs::File::create(tmp).await.map_err(internal)?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            n += chunk.len() as u64;
            if n > header.size_bytes {
                return Err(ServiceError::InvalidArgument(format!(
                    "expected {} bytes as declared, received more",
                    header.size_bytes
                )));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).await.map_err(internal)?;
        }
        f.flush().await.map_err(internal)?;
        drop(f);
        if n != header.size_bytes {
            return Err(ServiceError::InvalidArgument(format!(
                "expected {} bytes as declared, received {n}",
                header.size_bytes
            )));
        }
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        if got != header.sha256.to_ascii_lowercase() {
            return Err(ServiceError::InvalidArgument(format!(
                "checksum mismatch: declared sha256 {}, received {got}",
                header.sha256
            )));
        }
        tokio::fs::rename(tmp, path).await.map_err(internal)?;
        Ok(n)
    }

    async fn register_checked(
        &self,
        caller: &Caller,
        info: ClientInfo,
    ) -> std::result::Result<RegisterReply, ServiceError> {
        self.authed(None, caller)?;
        if info.client_id != caller.client_id {
            return Err(ServiceError::PermissionDenied(format!(
                "client {:?} cannot register as {:?}",
                caller.client_id, info.client_id
            )));
        }
        let expected = self.base.identity().map_err(internal)?;
        if info.arch != expected.arch {
            return Err(ServiceError::FailedPrecondition(format!(
                "expected a client model of architecture {}, found {}",
                expected.arch, info.arch
            )));
        }
        let own_base = lock(&self.strategy).client_base(&info).map_err(ServiceError::FailedPrecondition)?;
        tracing::info!("client {} registered ({} examples)", info.client_id, info.stats.n_examples);
        let mut st = lock(&self.state);
        match own_base {
            Some(b) => st.client_bases.insert(info.client_id.clone(), b),
            None => st.client_bases.remove(&info.client_id),
        };
        st.clients.insert(info.client_id.clone(), info);
        drop(st);
        self.notify();
        Ok(RegisterReply { run_id: self.run_id.clone(), message: "registered".into() })
    }

    async fn upload_checked(
        &self,
        caller: &Caller,
        header: UploadHeader,
        body: ByteStream,
    ) -> std::result::Result<UploadReply, ServiceError> {
        self.registered(None, caller)?;
        if header.client_id != caller.client_id {
            return Err(ServiceError::PermissionDenied(format!(
                "client {:?} cannot upload for {:?}",
                caller.client_id, header.client_id
            )));
        }
        if header.size_bytes > self.opts.max_update_bytes {
            return Err(ServiceError::ResourceExhausted(format!(
                "expected an update of at most {} bytes, found {}",
                self.opts.max_update_bytes, header.size_bytes
            )));
        }
        let id = caller.client_id.clone();
        let (identity, global, previous) = {
            let mut st = lock(&self.state);
            if header.round != st.round || st.phase != Phase::Fit {
                let why = if header.round < st.round || (header.round == st.round && st.phase != Phase::Fit) {
                    "late: the round is closed"
                } else {
                    "not open yet"
                };
                return Err(ServiceError::FailedPrecondition(format!(
                    "update for round {} refused ({why}; current round {})",
                    header.round, st.round
                )));
            }
            if !st.selected.contains_key(&id) {
                return Err(ServiceError::PermissionDenied(format!(
                    "client {id:?} is not selected in round {}",
                    st.round
                )));
            }
            // Only an accepted update uses up the client's turn; a rejected one may be replaced.
            let previous = match st.outcomes.get(&id) {
                Some(Outcome::Accepted { .. }) => {
                    return Ok(UploadReply {
                        accepted: true,
                        duplicate: true,
                        reason: "already received for this round".into(),
                    })
                }
                Some(Outcome::InProgress) => {
                    return Err(ServiceError::FailedPrecondition(
                        "an upload for this round is already in progress".into(),
                    ))
                }
                Some(rejected @ Outcome::Rejected { .. }) => Some(rejected.clone()),
                None => None,
            };
            st.outcomes.insert(id.clone(), Outcome::InProgress);
            let (identity, global) = match st.client_bases.get(&id) {
                Some((i, w)) => (i.clone(), w.clone()),
                None => (st.identity.clone(), st.global.clone()),
            };
            (identity, global, previous)
        };
        let t0 = Instant::now();
        let dir = self.spool_dir(header.round);
        let path = dir.join(format!("{id}.safetensors"));
        // From here until a final outcome is recorded, a failure or a dropped call (the client
        // disconnected) undoes the upload: the spool file goes, the previous outcome comes back.
        let mut in_flight = InFlight {
            server: self,
            caller: caller.clone(),
            round: header.round,
            path: path.clone(),
            previous,
            armed: true,
        };
        let received = async {
            let _slot = self.receptions.acquire().await.map_err(internal)?;
            {
                let st = lock(&self.state);
                if st.round != header.round || st.phase != Phase::Fit {
                    // Closed while this upload waited: do not read it, nor re-create the spool.
                    return Err(ServiceError::FailedPrecondition(format!(
                        "update for round {} refused (late: the round closed before the upload could be read)",
                        header.round
                    )));
                }
            }
            tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
            self.receive(&header, body, &path).await
        }
        .await;
        let bytes = match received {
            Ok(n) => n,
            Err(e) => {
                return Err(if in_flight.undo() {
                    // A broken transfer leaves no trace: the client may retry.
                    e
                } else {
                    // The round closed under the transfer (and its spool went with it).
                    ServiceError::FailedPrecondition(format!(
                        "update for round {} refused (late: the round closed during the upload)",
                        header.round
                    ))
                });
            }
        };
        let upload_s = t0.elapsed().as_secs_f64();
        let (max_norm, p2) = (self.opts.max_update_norm, path.clone());
        // Validation reads the whole update: a bounded number at once bounds the memory they take.
        let permit = self.validations.acquire().await.map_err(internal)?;
        let verdict = tokio::task::spawn_blocking(move || -> std::result::Result<f64, String> {
            let data = std::fs::read(&p2).map_err(|e| e.to_string())?;
            validate_update(&data, &identity, &global, max_norm).map(|(_, _, norm)| norm)
        })
        .await;
        drop(permit);
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                in_flight.undo();
                return Err(internal(e));
            }
        };
        let mut st = lock(&self.state);
        in_flight.armed = false;
        if st.round != header.round || st.phase != Phase::Fit {
            drop(st);
            in_flight.remove_files();
            return Err(ServiceError::FailedPrecondition(format!(
                "update for round {} refused (late: the round closed during the upload)",
                header.round
            )));
        }
        let reply = match verdict {
            Ok(norm) => {
                st.outcomes.insert(
                    id,
                    Outcome::Accepted { n_examples: header.n_examples, metrics: header.metrics, bytes, norm, upload_s },
                );
                UploadReply { accepted: true, duplicate: false, reason: String::new() }
            }
            Err(reason) => {
                tracing::warn!("round {}: update of {id} rejected: {reason}", header.round);
                let _ = std::fs::remove_file(&path);
                st.outcomes.insert(id, Outcome::Rejected { reason: reason.clone(), bytes });
                UploadReply { accepted: false, duplicate: false, reason }
            }
        };
        drop(st);
        self.notify();
        Ok(reply)
    }
}

/// An upload between its admission (outcome `InProgress`) and its final outcome. Undone when it
/// fails or when its future is dropped (the client disconnected mid-transfer, the call was
/// cancelled): the spool file and its partial file are removed, the client's previous outcome
/// (none, or a rejection) is restored if the round is still open, and a dropped upload is audited.
struct InFlight<'a> {
    server: &'a Server,
    caller: Caller,
    round: u64,
    path: PathBuf,
    previous: Option<Outcome>,
    armed: bool,
}

impl InFlight<'_> {
    /// Undoes the upload; whether its round is still open.
    fn undo(&mut self) -> bool {
        self.armed = false;
        self.remove_files();
        let mut st = lock(&self.server.state);
        let open = st.round == self.round && st.phase == Phase::Fit;
        if open && matches!(st.outcomes.get(&self.caller.client_id), Some(Outcome::InProgress)) {
            match self.previous.take() {
                Some(o) => st.outcomes.insert(self.caller.client_id.clone(), o),
                None => st.outcomes.remove(&self.caller.client_id),
            };
        }
        drop(st);
        self.server.notify();
        open
    }

    fn remove_files(&self) {
        let _ = std::fs::remove_file(self.path.with_extension("part"));
        let _ = std::fs::remove_file(&self.path);
        // A transfer that outlived its round may have re-created the round's spool directory.
        let st = lock(&self.server.state);
        if st.round != self.round || st.phase != Phase::Fit {
            drop(st);
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.undo();
            self.server.audit(
                "upload",
                &self.caller,
                Some(self.round),
                "the upload was abandoned mid-transfer (the client disconnected or cancelled the call)",
            );
        }
    }
}

/// Evaluates `weights` (a model of `base`'s architecture and tokenizer) on the server's tasks:
/// `task/metric` for each, and `general/ppl` when general text is configured.
pub fn evaluate_weights(base: &Checkpoint, weights: &TensorMap, ev: &ServerEval) -> Result<BTreeMap<String, f64>> {
    evaluate_model(base, base.arch.build(weights, &base.source(), None)?, ev)
}

/// The models the server evaluates: the global model, or per task (and for general text) what
/// the strategy serves instead (`Strategy::serving_model`).
pub struct Served {
    global: Box<dyn hetfed_model::CausalLm>,
    per_task: BTreeMap<String, Box<dyn hetfed_model::CausalLm>>,
    general: Option<Box<dyn hetfed_model::CausalLm>>,
}

impl Served {
    pub fn new(base: &Checkpoint, global: &TensorMap, ev: &ServerEval, strategy: &dyn Strategy) -> Result<Self> {
        let mut per_task = BTreeMap::new();
        for t in &ev.tasks {
            if let Some(m) = strategy.serving_model(base, global, Some(&t.spec.name))? {
                per_task.insert(t.spec.name.clone(), m);
            }
        }
        let general = strategy.serving_model(base, global, None)?;
        Ok(Self { global: base.arch.build(global, &base.source(), None)?, per_task, general })
    }

    fn get(&self, task: Option<&str>) -> &dyn hetfed_model::CausalLm {
        let m = match task {
            Some(t) => self.per_task.get(t),
            None => self.general.as_ref(),
        };
        m.unwrap_or(&self.global).as_ref()
    }
}

/// [`evaluate_weights`] for any model with `base`'s tokenizer (e.g. an offset-serving model).
pub fn evaluate_model(
    base: &Checkpoint,
    model: Box<dyn hetfed_model::CausalLm>,
    ev: &ServerEval,
) -> Result<BTreeMap<String, f64>> {
    evaluate_served(base, &Served { global: model, per_task: BTreeMap::new(), general: None }, ev)
}

/// Evaluates what the server serves on each task and on general text.
pub fn evaluate_served(base: &Checkpoint, served: &Served, ev: &ServerEval) -> Result<BTreeMap<String, f64>> {
    let tok = base.tokenizer()?;
    let mut out = BTreeMap::new();
    for t in &ev.tasks {
        let model = served.get(Some(&t.spec.name));
        let r = evaluate(model, tok, base.arch.eos_token_id(), &t.spec, &t.items, &ev.opts, |_, _| {})
            .map_err(|e| Error::msg(format!("server evaluation of {}: {e}", t.spec.name)))?;
        for (k, v) in r.metrics {
            out.insert(format!("{}/{k}", t.spec.name), v);
        }
    }
    if !ev.general.is_empty() {
        let loss = hetfed_train::eval_loss(served.get(None), &ev.general, ev.opts.batch_size)?;
        out.insert("general/ppl".into(), loss.exp());
    }
    Ok(out)
}

struct LoadedCheckpoint {
    round: u64,
    run_id: String,
    weights: TensorMap,
    strategy_json: Value,
    strategy_tensors: TensorMap,
}

fn load_checkpoint(run_dir: &Path) -> Result<LoadedCheckpoint> {
    let root = run_dir.join("checkpoints");
    let latest = root.join(LATEST);
    let name = std::fs::read_to_string(&latest).map_err(|e| {
        Error::msg(format!("--resume: expected a checkpoint pointer at {}, found none ({e})", latest.display()))
    })?;
    let dir = root.join(name.trim());
    let state_path = dir.join("state.json");
    let state: Value = serde_json::from_slice(&hetfed_core::read_file(&state_path)?)
        .map_err(|e| Error::Format { path: state_path.clone(), msg: format!("expected JSON: {e}") })?;
    let round = state["round"]
        .as_u64()
        .ok_or_else(|| Error::Format { path: state_path.clone(), msg: "expected a `round` number".into() })?;
    let run_id = state["run_id"].as_str().unwrap_or_default().to_string();
    let (weights, _) = hetfed_core::load_safetensors(&dir.join("model.safetensors"))?;
    let (strategy_tensors, _) = hetfed_core::load_safetensors(&dir.join("strategy.safetensors"))?;
    Ok(LoadedCheckpoint { round, run_id, weights, strategy_json: state["strategy_state"].clone(), strategy_tensors })
}

/// Drops metrics of rounds after the checkpoint (they are run again), keeping everything else.
fn truncate_metrics(path: &Path, round: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) => v["round"].as_u64().is_none_or(|r| r <= round) && v["event"] != "run_end",
            Err(_) => false,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    hetfed_core::write_atomic(path, kept.as_bytes())
}

#[async_trait::async_trait]
impl FedService for Server {
    /// Registers (or re-registers) a client. Every refusal is audited (see [`Server::audit`]).
    async fn register(&self, caller: &Caller, info: ClientInfo) -> std::result::Result<RegisterReply, ServiceError> {
        let r = self.register_checked(caller, info).await;
        if let Err(e) = &r {
            self.audit("register", caller, None, &e.to_string());
        }
        r
    }

    async fn instructions(
        &self,
        caller: &Caller,
        after_round: u64,
        wait: Duration,
    ) -> std::result::Result<Instruction, ServiceError> {
        self.registered(Some("instructions"), caller)?;
        let deadline = Instant::now() + wait.min(self.opts.max_poll);
        loop {
            let mut rx = self.changed.subscribe();
            {
                let mut st = lock(&self.state);
                if st.phase == Phase::Done {
                    st.finished.insert(caller.client_id.clone());
                    drop(st);
                    self.notify();
                    return Ok(Instruction::Done);
                }
                if st.phase == Phase::Fit && st.round > after_round && !st.outcomes.contains_key(&caller.client_id) {
                    if let Some(ins) = st.selected.get(&caller.client_id) {
                        return Ok(Instruction::Fit(ins.clone()));
                    }
                }
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Ok(Instruction::Wait);
            }
        }
    }

    async fn fetch_model(
        &self,
        caller: &Caller,
        version: &str,
    ) -> std::result::Result<(ModelHeader, ByteStream), ServiceError> {
        self.registered(Some("fetch_model"), caller)?;
        let mut st = lock(&self.state);
        if st.identity.weights_hash != version {
            return Err(ServiceError::NotFound(format!(
                "model version {version} is not the current one ({})",
                st.identity.weights_hash
            )));
        }
        let bytes = st.model_bytes.clone();
        *st.bytes_down.entry(caller.client_id.clone()).or_default() += bytes.len() as u64;
        let header = ModelHeader {
            version: version.to_string(),
            size_bytes: bytes.len() as u64,
            sha256: hetfed_core::sha256_hex(&bytes),
        };
        Ok((header, body_from_bytes(bytes, 1 << 20)))
    }

    /// Receives a client's update for the open round into the spool, validates it, and records
    /// its outcome.
    ///
    /// One accepted update per client and round: only an *accepted* update uses up the client's
    /// turn. A later upload in the same round is answered `accepted, duplicate` and not counted
    /// again. A *refused* upload does not use up the turn: a broken transfer (checksum, size, a
    /// disconnect) leaves no trace, and an update rejected by validation (wrong base, norm, shape)
    /// is replaced by a corrected upload made while the round is still open, which is then
    /// accepted as the client's one update (the round's metrics show the last outcome; every
    /// refusal is audited when it happens). The round does not wait for such a retry: it closes
    /// at its deadline or as soon as every selected client has an accepted or rejected update.
    async fn upload(
        &self,
        caller: &Caller,
        header: UploadHeader,
        body: ByteStream,
    ) -> std::result::Result<UploadReply, ServiceError> {
        let round = header.round;
        let r = self.upload_checked(caller, header, body).await;
        match &r {
            Err(e) => self.audit("upload", caller, Some(round), &e.to_string()),
            Ok(reply) if !reply.accepted => {
                self.audit("upload", caller, Some(round), &format!("rejected: {}", reply.reason))
            }
            Ok(_) => {}
        }
        r
    }

    async fn report_eval(&self, caller: &Caller, report: EvalReport) -> std::result::Result<(), ServiceError> {
        self.registered(Some("report_eval"), caller)?;
        if report.client_id != caller.client_id {
            return Err(ServiceError::PermissionDenied(format!(
                "client {:?} cannot report for {:?}",
                caller.client_id, report.client_id
            )));
        }
        self.event(json!({"event": "client_eval", "round": report.round, "client": report.client_id, "examples": report.n_examples, "eval": report.metrics}));
        Ok(())
    }
}
