//! The federated client: registers with aggregate statistics of its private data, then per
//! round trains locally from the round's model, evaluates on its own held-out slice, encodes the
//! update and uploads it. Written against `Arc<dyn FedService>`: the server object itself in
//! simulation, a gRPC client in deployment. Examples never leave this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::DType;
use futures::StreamExt;
use hetfed_core::{Error, Result, TensorMap};
use hetfed_data::{Items, TaskSpec};
use hetfed_eval::{evaluate, EvalOptions};
use hetfed_model::{Checkpoint, LoraConfig, LoraSet, ModelIdentity};
use hetfed_net::{
    body_from_bytes, Caller, Classify, ClientInfo, DataStats, FedService, FitIns, FitMetrics, Instruction,
    ServiceError, UploadHeader,
};
use hetfed_taskvec::TaskVector;
use hetfed_train::{Example, TrainConfig, Trainer};

use crate::strategy::{Encoding, FitConfig};
use crate::sys;

/// A client's private data: training pairs and a local held-out slice.
pub struct ClientData {
    pub task: TaskSpec,
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub val_items: Items,
    pub stats: DataStats,
}

pub struct ClientOptions {
    pub caller: Caller,
    /// The client's own base model (architecture, tokenizer, and the weights of rounds that
    /// start from it).
    pub base: Checkpoint,
    pub data: ClientData,
    pub eval_opts: EvalOptions,
    /// How long one long poll may wait.
    pub poll_wait: Duration,
    /// First retry delay after a transport failure (doubles up to 30 s).
    pub backoff: Duration,
    /// Give up after this long without reaching the server.
    pub give_up_after: Duration,
    /// Called with one line per finished round (the CLI prints it; simulation passes `None`).
    pub on_round: Option<Arc<dyn Fn(String) + Send + Sync>>,
    /// Where the client keeps what a restart must not lose: the adapters it keeps across rounds
    /// (`FitConfig::keep_adapter`). `None` keeps them in memory only.
    pub state_dir: Option<PathBuf>,
    /// Training results to reuse instead of training again (see [`TrainMemo`]); `None` always
    /// trains.
    pub memo: Option<TrainMemo>,
}

/// Local training results shared by clients across runs on the same data (the sweep's
/// heterogeneous rows: clients that train from their own base produce the same update whatever
/// the server does, so every row after the first replays them through the whole round loop).
/// A result is keyed by everything `train_round` reads besides the client's data: the client,
/// the round, the starting model version, the fit configuration and the adapter it continues.
/// One memo must serve runs whose clients hold the same data (one sweep seed). A replayed
/// update carries the metrics measured when it was trained.
#[derive(Clone, Default)]
pub struct TrainMemo(Arc<std::sync::Mutex<BTreeMap<String, Arc<LocalUpdate>>>>);

impl TrainMemo {
    fn key(client: &str, fit: &FitIns, adapter: Option<&TensorMap>) -> Result<String> {
        let adapter = adapter.map(hetfed_core::tensor_map_hash).transpose()?.unwrap_or_default();
        Ok(format!("{client}\n{}\n{}\n{}\n{adapter}", fit.round, fit.model_version, fit.config))
    }

    fn get(&self, key: &str) -> Option<Arc<LocalUpdate>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }

    fn put(&self, key: String, update: Arc<LocalUpdate>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key, update);
    }

    /// How many training results are kept.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The adapters a client trained, by round (`FitConfig::keep_adapter`). Round `r` continues from
/// the latest adapter of a round before `r` of the same run, trained on the same model version,
/// so a round trained again (after a server resume, or a client restart with `state_dir`) starts
/// exactly where it first did. With a state directory each is written atomically as
/// `adapter-round-<r>.safetensors` (f32; the run id, model version, LoRA rank and alpha in its
/// metadata, so the file alone rebuilds the tuned model); the two latest rounds are kept.
pub struct Adapters {
    dir: Option<PathBuf>,
    /// The run this client is registered with (adapters of other runs are never continued).
    pub run_id: String,
    /// Round → (run id, model version, factors).
    by_round: BTreeMap<u64, (String, String, TensorMap)>,
}

impl Adapters {
    const KEEP: usize = 2;

    /// The adapters saved in `dir` (none if it does not exist yet), or an empty in-memory set.
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        let mut by_round = BTreeMap::new();
        if let Some(d) = dir.filter(|d| d.is_dir()) {
            for entry in std::fs::read_dir(d).map_err(|e| Error::io(d, e))? {
                let path = entry.map_err(|e| Error::io(d, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let Some(round) = name.strip_prefix("adapter-round-").and_then(|r| r.strip_suffix(".safetensors"))
                else {
                    continue;
                };
                let round: u64 = round.parse().map_err(|_| {
                    Error::msg(format!("{}: expected adapter-round-<number>.safetensors, found {name}", d.display()))
                })?;
                let (tensors, meta) = hetfed_core::load_safetensors(&path)?;
                let field = |k: &str| {
                    meta.get(k).cloned().ok_or_else(|| {
                        Error::msg(format!("{}: expected `{k}` in its metadata, found none", path.display()))
                    })
                };
                by_round.insert(round, (field("run_id")?, field("model_version")?, tensors));
            }
        }
        Ok(Self { dir: dir.map(Path::to_path_buf), run_id: String::new(), by_round })
    }

    /// The adapter round `round` continues from: the latest of an earlier round, if it was
    /// trained on `version`.
    pub fn before(&self, round: u64, version: &str) -> Option<&TensorMap> {
        let (_, (run, v, a)) = self.by_round.range(..round).next_back()?;
        (*run == self.run_id && v == version).then_some(a)
    }

    /// Keeps round `round`'s adapter, trained with LoRA rank `rank` and alpha `alpha` (saved
    /// first when there is a state directory).
    pub fn keep(&mut self, round: u64, version: &str, adapter: TensorMap, rank: usize, alpha: f64) -> Result<()> {
        if let Some(d) = &self.dir {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            let meta = BTreeMap::from([
                ("model_version".to_string(), version.to_string()),
                ("run_id".to_string(), self.run_id.clone()),
                ("lora_rank".to_string(), rank.to_string()),
                ("lora_alpha".to_string(), alpha.to_string()),
            ]);
            hetfed_core::save_safetensors(
                &adapter,
                DType::F32,
                &meta,
                &d.join(format!("adapter-round-{round}.safetensors")),
            )?;
        }
        self.by_round.insert(round, (self.run_id.clone(), version.to_string(), adapter));
        while self.by_round.len() > Self::KEEP {
            let (old, _) = self.by_round.pop_first().expect("more than KEEP entries");
            if let Some(d) = &self.dir {
                let p = d.join(format!("adapter-round-{old}.safetensors"));
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }
}

/// What a client did over a run.
#[derive(Debug, Clone, Default)]
pub struct ClientSummary {
    pub rounds_trained: Vec<u64>,
    pub refused: Vec<(u64, String)>,
}

/// One round's local training result.
#[derive(Clone)]
pub struct LocalUpdate {
    pub bytes: Vec<u8>,
    pub n_examples: u64,
    pub metrics: FitMetrics,
    /// The trained LoRA factors in f32 (`<module>.lora_A` / `.lora_B`), for a client that keeps
    /// its adapter across rounds (`FitConfig::keep_adapter`); `None` for full fine-tuning.
    pub adapter: Option<TensorMap>,
}

/// Trains one round from `weights` (the round's model, whose identity is `identity`) and returns
/// the encoded update and its metrics. Pure computation: usable without any server.
///
/// `adapter`: LoRA factors to continue from (the client's previous round, see
/// `FitConfig::keep_adapter`) instead of fresh ones. The update is then the whole change from
/// `weights`, and `val_gain` is measured against `weights` without any adapter.
pub fn train_round(
    base: &Checkpoint,
    weights: TensorMap,
    identity: &ModelIdentity,
    cfg: &FitConfig,
    data: &ClientData,
    eval_opts: &EvalOptions,
    adapter: Option<&TensorMap>,
) -> Result<LocalUpdate> {
    let t0 = Instant::now();
    let cpu0 = sys::cpu_seconds();
    let ck = base.with_weights(weights);
    let tok = ck.tokenizer()?;
    let eos = ck.arch.eos_token_id();
    let train = hetfed_train::encode(tok, &data.train, cfg.max_len, eos)?;
    let val = hetfed_train::encode(tok, &data.val, cfg.max_len, eos)?;
    let (mut tr, continued) = local_trainer(&ck, cfg, adapter)?;
    let losses = train_and_measure(&ck, &mut tr, continued, &train, &val, cfg.batch_size)?;
    let train_s = t0.elapsed().as_secs_f64();
    let mut eval = BTreeMap::new();
    if !data.val_items.is_empty() {
        let r = evaluate(tr.model(), tok, eos, &data.task, &data.val_items, eval_opts, |_, _| {})
            .map_err(|e| Error::msg(format!("local evaluation: {e}")))?;
        for (k, v) in r.metrics {
            eval.insert(format!("{}/{k}", data.task.name), v);
        }
    }
    let adapter = tr.lora().map(|set| set.to_tensors());
    let bytes = encode_update(&tr, &ck, identity, cfg.encoding)?;
    let metrics = fit_metrics(&losses, tr.step as u64, eval, train_s, cpu0);
    Ok(LocalUpdate { bytes, n_examples: data.train.len() as u64, metrics, adapter })
}

/// The round's trainer on `ck` (LoRA when `cfg.lora_rank > 0`), continuing from `adapter`'s
/// factors when given and LoRA is on; `true` when it continues.
fn local_trainer<'a>(ck: &'a Checkpoint, cfg: &FitConfig, adapter: Option<&TensorMap>) -> Result<(Trainer<'a>, bool)> {
    let lora = (cfg.lora_rank > 0).then(|| LoraConfig {
        rank: cfg.lora_rank,
        alpha: cfg.lora_alpha,
        dropout: 0.0,
        targets: ck.arch.default_lora_targets(),
    });
    let tcfg = TrainConfig {
        lora,
        lr: cfg.lr,
        epochs: cfg.epochs.max(1),
        max_steps: cfg.max_steps,
        batch_size: cfg.batch_size,
        max_len: cfg.max_len,
        proximal_mu: cfg.proximal_mu,
        warmup_steps: 0,
        seed: cfg.seed,
        gradient_checkpointing: cfg.gradient_checkpointing,
        ..Default::default()
    };
    let start = match (adapter, &tcfg.lora) {
        (Some(a), Some(lcfg)) => Some(LoraSet::from_tensors(lcfg, a)?),
        _ => None,
    };
    let continued = start.is_some();
    Ok((Trainer::new(ck, tcfg, start)?, continued))
}

/// The losses of one local round: every step's training loss, and the validation loss before
/// and after training (NaN without a validation split).
struct RoundLosses {
    train: Vec<f64>,
    val_before: f64,
    val_after: f64,
}

/// Trains `tr` on `train`, measuring the validation loss before and after. A trainer that
/// continues a kept adapter (`continued`) is measured before against `ck`'s weights without any
/// adapter.
fn train_and_measure(
    ck: &Checkpoint,
    tr: &mut Trainer<'_>,
    continued: bool,
    train: &[hetfed_train::Encoded],
    val: &[hetfed_train::Encoded],
    batch_size: usize,
) -> Result<RoundLosses> {
    let val_before = if val.is_empty() {
        f64::NAN
    } else if continued {
        let plain = ck.arch.build(&ck.weights, &ck.source(), None)?;
        hetfed_train::eval_loss(plain.as_ref(), val, batch_size)?
    } else {
        tr.eval_loss(val)?
    };
    let mut losses = Vec::new();
    tr.train(
        train,
        |r, _| {
            losses.push(r.loss);
            Ok(())
        },
        || false,
    )?;
    let val_after = if val.is_empty() { f64::NAN } else { tr.eval_loss(val)? };
    Ok(RoundLosses { train: losses, val_before, val_after })
}

/// The trained change from `ck`'s weights as a task vector of `identity` (the LoRA factors, or
/// the dense difference of full fine-tuning), encoded as `encoding` asks.
fn encode_update(tr: &Trainer<'_>, ck: &Checkpoint, identity: &ModelIdentity, encoding: Encoding) -> Result<Vec<u8>> {
    let tv = match tr.lora() {
        Some(set) => TaskVector::from_lora(identity.clone(), set)?,
        None => {
            let tuned = tr.weights().ok_or_else(|| Error::msg("full fine-tuning produced no weights"))?;
            TaskVector::full_diff(identity.clone(), &ck.weights, &tuned)?
        }
    };
    Ok(match encoding {
        Encoding::F16 => tv.to_bytes(DType::F16)?,
        Encoding::Int8 => tv.to_bytes_int8()?,
        Encoding::F32 => tv.to_bytes(DType::F32)?,
    })
}

/// The round's reported metrics: the mean of the last quarter of the training losses, the
/// validation losses and gain, times and memory (`cpu0`: the CPU seconds when the round began).
/// A value that is not finite (no validation split: NaN losses) is reported as not measured.
fn fit_metrics(
    losses: &RoundLosses,
    steps: u64,
    mut eval: BTreeMap<String, f64>,
    train_s: f64,
    cpu0: f64,
) -> FitMetrics {
    let tail = losses.train.len().div_ceil(4).max(1);
    let train_loss = losses.train.iter().rev().take(tail).sum::<f64>() / tail.min(losses.train.len()).max(1) as f64;
    let finite = |v: f64| Some(v).filter(|v| v.is_finite());
    eval.retain(|_, v| v.is_finite());
    FitMetrics {
        train_loss: finite(train_loss),
        train_steps: Some(steps),
        val_loss_before: finite(losses.val_before),
        val_loss_after: finite(losses.val_after),
        val_gain: finite(losses.val_before - losses.val_after),
        train_s: finite(train_s),
        cpu_s: finite(sys::cpu_seconds() - cpu0),
        peak_rss_bytes: Some(sys::peak_rss_bytes()),
        eval,
    }
}

/// The client's registration message.
pub fn client_info(opts: &ClientOptions) -> Result<ClientInfo> {
    let id = opts.base.identity()?;
    Ok(ClientInfo {
        client_id: opts.caller.client_id.clone(),
        arch: id.arch,
        base_hash: id.weights_hash,
        stats: opts.data.stats.clone(),
        tokenizer_hash: opts.base.tokenizer_hash().unwrap_or_default(),
    })
}

/// Exponential backoff (doubling up to 30 s) while the server is unreachable; gives up after
/// `give_up` without success. Shared by every retried call and by the deployment's connect loop.
///
/// Only transient failures are waited on ([`hetfed_net::Classify`], the one classification of
/// transport and call errors): a permanent one (URL scheme, TLS trust, the server's name, the
/// client's certificate, credentials, revocation, protocol version) fails at once with its cause,
/// as no amount of waiting changes it.
pub struct Retry {
    delay: Duration,
    first: Duration,
    since: Option<Instant>,
    give_up: Duration,
}

impl Retry {
    pub fn new(first: Duration, give_up: Duration) -> Self {
        Self { delay: first, first, since: None, give_up }
    }

    /// After a failed attempt: fails at once if `e` is permanent, or once the server has been
    /// unreachable for `give_up`; otherwise sleeps before the next attempt (never past `give_up`).
    pub async fn wait<E: Classify + Sync + ?Sized>(&mut self, e: &E) -> Result<()> {
        if e.is_permanent() {
            return Err(Error::msg(format!("{e} (a permanent failure: not retried)")));
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        let left = self.give_up.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(Error::msg(format!(
                "server unreachable for {:.0} s, giving up: {e}",
                self.give_up.as_secs_f64()
            )));
        }
        let delay = self.delay.min(left);
        tracing::warn!("{e}; retrying in {:.1} s", delay.as_secs_f64());
        tokio::time::sleep(delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(30));
        Ok(())
    }

    pub fn reset(&mut self) {
        self.delay = self.first;
        self.since = None;
    }
}

/// Runs the client until the server says the run is over.
pub async fn run_client(service: Arc<dyn FedService>, opts: ClientOptions) -> Result<ClientSummary> {
    let opts = Arc::new(opts);
    let info = client_info(&opts)?;
    let base_identity = opts.base.identity()?;
    let caller = &opts.caller;
    let mut retry = Retry::new(opts.backoff, opts.give_up_after);
    let mut summary = ClientSummary::default();
    let mut last_round = 0u64;
    // The weights of the last model version received: (version, weights).
    let mut cached: Option<(String, Arc<TensorMap>)> = None;
    // The adapters this client trained (kept across rounds with `FitConfig::keep_adapter`).
    let mut adapter = Adapters::load(opts.state_dir.as_deref())?;
    let mut registered = false;
    loop {
        if !registered {
            match service.register(caller, info.clone()).await {
                Ok(r) => {
                    tracing::info!("client {} registered with run {}", caller.client_id, r.run_id);
                    adapter.run_id = r.run_id.clone();
                    registered = true;
                    // The server is the source of truth: after a server restart (resume) a round
                    // this client already trained may be open again, and the server only offers
                    // it to clients it holds no update from.
                    last_round = 0;
                    retry.reset();
                }
                Err(e) if !e.is_permanent() => {
                    retry.wait(&e).await?;
                    continue;
                }
                Err(e) => return Err(Error::msg(format!("client {}: registration refused: {e}", caller.client_id))),
            }
        }
        let ins = match service.instructions(caller, last_round, opts.poll_wait).await {
            Ok(i) => {
                retry.reset();
                i
            }
            Err(ServiceError::NotFound(_)) => {
                registered = false;
                continue;
            }
            Err(e) if !e.is_permanent() => {
                retry.wait(&e).await?;
                registered = false;
                continue;
            }
            Err(e) => return Err(Error::msg(format!("client {}: {e}", caller.client_id))),
        };
        let fit = match ins {
            Instruction::Done => return Ok(summary),
            Instruction::Wait => continue,
            Instruction::Fit(f) => f,
        };
        let outcome = fit_round(&service, &opts, &fit, &base_identity, &mut cached, &mut adapter, &mut retry).await;
        if let (Some(f), Ok(o)) = (&opts.on_round, &outcome) {
            f(match o {
                Some(reason) => format!("round {}: update refused: {reason}", fit.round),
                None => format!("round {}: trained and uploaded", fit.round),
            });
        }
        match outcome {
            Ok(Some(reason)) => summary.refused.push((fit.round, reason)),
            Ok(None) => summary.rounds_trained.push(fit.round),
            Err(FitError::Reregister) => {
                registered = false;
                continue;
            }
            Err(FitError::Fatal(e)) => return Err(e),
        }
        last_round = fit.round;
    }
}

enum FitError {
    Reregister,
    Fatal(Error),
}

impl From<Error> for FitError {
    fn from(e: Error) -> Self {
        FitError::Fatal(e)
    }
}

/// One round; `Ok(Some(reason))` when the server refused the update.
async fn fit_round(
    service: &Arc<dyn FedService>,
    opts: &Arc<ClientOptions>,
    fit: &FitIns,
    base_identity: &ModelIdentity,
    cached: &mut Option<(String, Arc<TensorMap>)>,
    adapter: &mut Adapters,
    retry: &mut Retry,
) -> std::result::Result<Option<String>, FitError> {
    let caller = &opts.caller;
    let cfg: FitConfig = serde_json::from_value(fit.config.clone()).map_err(|e| {
        Error::msg(format!("round {}: expected a fit configuration, found {}: {e}", fit.round, fit.config))
    })?;
    cfg.validate().map_err(Error::msg)?;
    let weights = match round_weights(service, opts, fit, base_identity, cached, retry).await? {
        Ok(w) => w,
        Err(refused) => return Ok(Some(refused)),
    };
    let identity = ModelIdentity { weights_hash: fit.model_version.clone(), ..base_identity.clone() };
    let prev = if cfg.keep_adapter { adapter.before(fit.round, &fit.model_version).cloned() } else { None };
    let mut upd = train_or_replay(opts, fit, &cfg, weights, identity, prev).await?;
    // Kept whether or not the server accepts the upload: the next upload is again the whole
    // change from the base, so nothing depends on this one arriving.
    if let (true, Some(a)) = (cfg.keep_adapter, upd.adapter.take()) {
        adapter.keep(fit.round, &fit.model_version, a, cfg.lora_rank, cfg.lora_alpha)?;
    }
    let bytes = Bytes::from(upd.bytes);
    let header = UploadHeader {
        round: fit.round,
        client_id: caller.client_id.clone(),
        n_examples: upd.n_examples,
        size_bytes: bytes.len() as u64,
        sha256: hetfed_core::sha256_hex(&bytes),
        metrics: upd.metrics,
    };
    upload_update(service, caller, fit.round, header, bytes, retry).await
}

/// The round's starting weights: our base, the cached global model, or a download (which then
/// becomes the cached one). `Ok(Err(reason))` when the server refused the download.
async fn round_weights(
    service: &Arc<dyn FedService>,
    opts: &ClientOptions,
    fit: &FitIns,
    base_identity: &ModelIdentity,
    cached: &mut Option<(String, Arc<TensorMap>)>,
    retry: &mut Retry,
) -> std::result::Result<std::result::Result<Arc<TensorMap>, String>, FitError> {
    if fit.model_version == base_identity.weights_hash {
        return Ok(Ok(Arc::new(opts.base.weights.clone())));
    }
    if let Some((_, w)) = cached.as_ref().filter(|(v, _)| *v == fit.model_version) {
        return Ok(Ok(w.clone()));
    }
    let w = loop {
        match download(service, &opts.caller, &fit.model_version).await {
            Ok(w) => break w,
            Err(DownloadError::Service(ServiceError::NotFound(m))) if m.contains("not registered") => {
                return Err(FitError::Reregister)
            }
            Err(DownloadError::Service(e)) if !e.is_permanent() => retry.wait(&e).await?,
            Err(DownloadError::Service(e)) => return Ok(Err(format!("model download refused: {e}"))),
            Err(DownloadError::Local(e)) => return Err(FitError::Fatal(e)),
        }
    };
    let w = Arc::new(w);
    *cached = Some((fit.model_version.clone(), w.clone()));
    Ok(Ok(w))
}

/// The round's local update: replayed from the client's [`TrainMemo`] when it holds this round,
/// else trained from `weights` (on a blocking thread) and then remembered there.
async fn train_or_replay(
    opts: &Arc<ClientOptions>,
    fit: &FitIns,
    cfg: &FitConfig,
    weights: Arc<TensorMap>,
    identity: ModelIdentity,
    prev: Option<TensorMap>,
) -> Result<LocalUpdate> {
    let memo_key = match &opts.memo {
        Some(_) => Some(TrainMemo::key(&opts.caller.client_id, fit, prev.as_ref())?),
        None => None,
    };
    let known = opts.memo.as_ref().zip(memo_key.as_deref()).and_then(|(m, k)| m.get(k));
    if let Some(u) = known {
        return Ok((*u).clone());
    }
    let o = opts.clone();
    let cfg = cfg.clone();
    let u = tokio::task::spawn_blocking(move || {
        train_round(&o.base, (*weights).clone(), &identity, &cfg, &o.data, &o.eval_opts, prev.as_ref())
    })
    .await
    .map_err(|e| Error::msg(format!("training task failed: {e}")))??;
    if let (Some(m), Some(k)) = (&opts.memo, memo_key) {
        m.put(k, Arc::new(u.clone()));
    }
    Ok(u)
}

/// Uploads the round's update until the server answers; `Ok(Some(reason))` when it refused it.
/// Uploads are idempotent per (client, round): a retry after a lost reply is accepted once.
async fn upload_update(
    service: &Arc<dyn FedService>,
    caller: &Caller,
    round: u64,
    header: UploadHeader,
    bytes: Bytes,
    retry: &mut Retry,
) -> std::result::Result<Option<String>, FitError> {
    loop {
        match service.upload(caller, header.clone(), body_from_bytes(bytes.clone(), 1 << 20)).await {
            Ok(r) if r.accepted => break,
            Ok(r) => {
                tracing::warn!("round {round}: update refused: {}", r.reason);
                return Ok(Some(r.reason));
            }
            Err(ServiceError::NotFound(_)) => return Err(FitError::Reregister),
            Err(e) if !e.is_permanent() => retry.wait(&e).await?,
            // Refusals of this update (late, not selected, too large, malformed, server trouble
            // with it) cost this round only; authentication failures end the client.
            Err(
                e @ (ServiceError::FailedPrecondition(_)
                | ServiceError::PermissionDenied(_)
                | ServiceError::ResourceExhausted(_)
                | ServiceError::InvalidArgument(_)
                | ServiceError::Internal(_)),
            ) => {
                tracing::warn!("round {round}: {e}");
                return Ok(Some(e.to_string()));
            }
            Err(e) => return Err(FitError::Fatal(Error::msg(format!("round {round}: upload failed: {e}")))),
        }
    }
    Ok(None)
}

enum DownloadError {
    Service(ServiceError),
    Local(Error),
}

async fn download(
    service: &Arc<dyn FedService>,
    caller: &Caller,
    version: &str,
) -> std::result::Result<TensorMap, DownloadError> {
    let (header, mut body) = service.fetch_model(caller, version).await.map_err(DownloadError::Service)?;
    let mut data = Vec::with_capacity(header.size_bytes as usize);
    while let Some(chunk) = body.next().await {
        data.extend_from_slice(&chunk.map_err(DownloadError::Service)?);
    }
    let got = hetfed_core::sha256_hex(&data);
    if got != header.sha256 || data.len() as u64 != header.size_bytes {
        return Err(DownloadError::Service(ServiceError::Unavailable(format!(
            "model download damaged: expected {} bytes with sha256 {}, found {} bytes with {got}",
            header.size_bytes,
            header.sha256,
            data.len()
        ))));
    }
    let (weights, _) = hetfed_core::tensors_from_bytes(&data, std::path::Path::new("<model download>"), true)
        .map_err(DownloadError::Local)?;
    let hash = hetfed_core::tensor_map_hash(&weights).map_err(DownloadError::Local)?;
    if hash != version {
        return Err(DownloadError::Local(Error::msg(format!(
            "downloaded model: expected version {version}, found weights hashing to {hash}"
        ))));
    }
    Ok(weights)
}
