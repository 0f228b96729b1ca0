//! Strategies: which clients train in a round with what configuration, and how their updates
//! become the next global model. Pure: no I/O, no transport, no clocks (see Flower's `Strategy`).
//!
//! Updates reach [`Strategy::aggregate_fit`] one at a time from an iterator (the server reads them
//! from its spool in client-id order), so memory stays at the global model, one accumulator and
//! one update however many clients report, and the result does not depend on arrival order.

use std::collections::BTreeMap;

use hetfed_core::{Error, Result, TensorMap};
use hetfed_net::ClientInfo;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// The training a client does in one round (sent as the JSON `config` of its instructions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FitConfig {
    pub epochs: usize,
    /// Stop after this many optimizer steps (per round).
    pub max_steps: Option<usize>,
    pub lr: f64,
    pub batch_size: usize,
    pub max_len: usize,
    /// LoRA rank; 0 trains every parameter.
    pub lora_rank: usize,
    pub lora_alpha: f64,
    /// FedProx coefficient the client adds to its loss (0 = plain local training).
    pub proximal_mu: f64,
    /// How the update is encoded. LoRA updates stay as factors.
    pub encoding: Encoding,
    /// Seed of the client's shuffling, adapter initialisation and dropout in this round.
    pub seed: u64,
    /// Continue the client's own LoRA adapter from its previous round instead of a fresh one,
    /// when the round starts from the model that adapter was trained on (in heterogeneous runs
    /// always: the client's own base). A specialist then keeps learning across rounds, as the
    /// central and local-only baselines do, and each upload is its whole change from the base.
    pub keep_adapter: bool,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (`hetfed_train::TrainConfig::gradient_checkpointing`): the same update for a fraction of
    /// the memory, about one more forward pass of time. For clients at real widths.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
    /// How a client holds its base model's frozen weights: `"f32"` (widened at load, the
    /// default) or `"stored"` (as the file stores them: bloom-560m's f16 is half the memory;
    /// LoRA still trains in f32 on top). Full fine-tuning (`lora_rank = 0`) always widens.
    #[serde(default, skip_serializing_if = "BaseWeights::is_f32")]
    pub weights: BaseWeights,
}

/// `client.weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseWeights {
    #[default]
    F32,
    Stored,
}

impl BaseWeights {
    fn is_f32(&self) -> bool {
        *self == BaseWeights::F32
    }
}

/// How a client encodes its update on the wire (`client.encoding`; TOML and the wire carry
/// `"f32"`, `"f16"` or `"int8"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Full precision.
    #[default]
    F32,
    /// Half precision: half the bytes.
    F16,
    /// Symmetric 8-bit quantisation per tensor: a quarter of the bytes.
    Int8,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            lr: 2e-3,
            batch_size: 8,
            max_len: 128,
            lora_rank: 8,
            lora_alpha: 16.0,
            proximal_mu: 0.0,
            encoding: Encoding::F32,
            seed: 0,
            keep_adapter: false,
            gradient_checkpointing: false,
            weights: BaseWeights::F32,
        }
    }
}

impl FitConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err("client.epochs: expected at least 1, found 0".into());
        }
        if self.batch_size == 0 {
            return Err("client.batch_size: expected at least 1, found 0".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("client.lr: expected a positive number, found {}", self.lr));
        }
        if !(self.proximal_mu >= 0.0 && self.proximal_mu.is_finite()) {
            return Err(format!("client.proximal_mu: expected a number >= 0, found {}", self.proximal_mu));
        }
        if self.keep_adapter && self.lora_rank == 0 {
            return Err("client.keep_adapter: expected LoRA training (client.lora_rank >= 1), found full fine-tuning (lora_rank = 0)".into());
        }
        Ok(())
    }
}

/// One client's accepted update, as the strategy sees it: the task vector as uploaded (LoRA
/// factors stay factored, so projection keeps their rank and offsets rebuild the tuned model
/// from them), in f32, with its base's identity: the round's global model, or in a
/// heterogeneous run the client's own base. A strategy that needs the dense update calls
/// [`FitResult::delta`].
#[derive(Debug, Clone)]
pub struct FitResult {
    pub client_id: String,
    pub n_examples: u64,
    /// What the client measured in its fit (as uploaded).
    pub metrics: hetfed_net::FitMetrics,
    pub update: hetfed_taskvec::TaskVector,
}

impl FitResult {
    /// An update as a strategy sees it; its tensors are converted to f32 (uploads may be f16).
    pub fn new(
        client_id: impl Into<String>,
        n_examples: u64,
        metrics: hetfed_net::FitMetrics,
        mut update: hetfed_taskvec::TaskVector,
    ) -> Result<Self> {
        let to_f32 = |m: &mut TensorMap| -> Result<()> {
            for t in m.values_mut() {
                *t = t.to_dtype(candle_core::DType::F32)?;
            }
            Ok(())
        };
        match &mut update.kind {
            hetfed_taskvec::Delta::Full(m) => to_f32(m)?,
            hetfed_taskvec::Delta::Lora { factors, .. } => to_f32(factors)?,
        }
        Ok(Self { client_id: client_id.into(), n_examples, metrics, update })
    }

    /// Weights hash of the model the update was made from.
    pub fn base_hash(&self) -> &str {
        &self.update.base.weights_hash
    }

    /// The dense update (`<module>.weight = B·A·scale` for LoRA factors).
    pub fn delta(&self) -> Result<TensorMap> {
        self.update.materialize()
    }
}

/// A selected client that did not contribute, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub client_id: String,
    pub reason: String,
}

/// What an aggregation did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AggregateReport {
    /// Client → normalised aggregation weight.
    pub weights: BTreeMap<String, f64>,
    pub n_aggregated: usize,
    /// Norm of the change applied to the global model.
    pub applied_norm: f64,
    /// Strategy-specific record of the aggregation (logged with the round).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// Client sampling of a round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sampling {
    /// Fraction of the registered clients that train each round.
    pub fraction_fit: f64,
    /// At least this many (when that many are registered).
    pub min_fit_clients: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self { fraction_fit: 1.0, min_fit_clients: 1 }
    }
}

/// Picks `max(ceil(fraction·n), min)` of the clients (at most all), deterministically from
/// `(seed, round)`, returned in id order.
pub fn sample_clients(available: &[ClientInfo], s: Sampling, seed: u64, round: u64) -> Vec<String> {
    let mut ids: Vec<String> = available.iter().map(|c| c.client_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let want = ((s.fraction_fit * ids.len() as f64).ceil() as usize).max(s.min_fit_clients).min(ids.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, round));
    ids.shuffle(&mut rng);
    ids.truncate(want);
    ids.sort();
    ids
}

/// A seed for `(seed, round)` (SplitMix64 finaliser), also used for per-client training seeds.
pub fn mix(seed: u64, x: u64) -> u64 {
    hetfed_core::mix_seed(seed, x)
}

/// The per-client, per-round training seed.
pub fn client_seed(seed: u64, round: u64, client_id: &str) -> u64 {
    let h = hetfed_core::sha256_hex(client_id.as_bytes());
    let c = u64::from_str_radix(&h[..16], 16).unwrap_or(0);
    mix(mix(seed, round), c)
}

/// A federated strategy (see the module docs).
pub trait Strategy: Send {
    fn name(&self) -> &'static str;

    /// The clients that train in `round` and their configuration.
    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)>;

    /// Folds the round's accepted updates into `global`; `failures` lists selected clients that
    /// did not contribute (timeouts, disconnects, rejected updates).
    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &mut TensorMap,
        results: &mut dyn Iterator<Item = Result<FitResult>>,
        failures: &[Failure],
    ) -> Result<AggregateReport>;

    /// The models clients train from, fixed when the strategy is built. The server takes this
    /// table once and consults it at registration without the strategy's lock, so registering
    /// never waits on an aggregation. The default: every client trains the global model.
    fn client_bases(&self) -> ClientBases {
        ClientBases::default()
    }

    /// What the strategy wants recorded once at the start of the run (e.g. fitted maps).
    fn run_info(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// The model the server evaluates on `task` (`None`: general text) when it is not just the
    /// global weights (`None`: the server architecture over `global`). Offset serving evaluates
    /// the large model with its clients' logit offsets, leaving the weights as they are.
    fn serving_model(
        &self,
        _base: &hetfed_model::Checkpoint,
        _global: &TensorMap,
        _task: Option<&str>,
    ) -> Result<Option<Box<dyn hetfed_model::CausalLm>>> {
        Ok(None)
    }

    /// State to checkpoint (JSON and tensors); restoring it with [`Strategy::load_state`] makes a
    /// resumed run identical to an uninterrupted one.
    fn state(&self) -> (serde_json::Value, TensorMap) {
        (serde_json::Value::Null, TensorMap::new())
    }

    fn load_state(&mut self, _json: serde_json::Value, _tensors: TensorMap) -> Result<()> {
        Ok(())
    }
}

/// The strategy of a run, as written in the `[strategy]` table of a config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategyConfig {
    /// McMahan et al. 2017: the example-weighted mean of the updates.
    Fedavg {
        #[serde(default = "one")]
        server_lr: f64,
    },
    /// Li et al. 2020: FedAvg, and clients add `mu/2·||w - w_global||²` to their loss.
    Fedprox {
        #[serde(default = "default_mu")]
        proximal_mu: f64,
        #[serde(default = "one")]
        server_lr: f64,
    },
    /// Reddi et al. 2021: a server optimiser on the mean update.
    Fedadam(FedOptParams),
    Fedyogi(FedOptParams),
    Fedadagrad(FedOptParams),
    /// Ilharco et al. 2023: `W ← W + scale·Σ τ_i` (a sum, not a mean).
    TaskArithmetic {
        #[serde(default = "half")]
        scale: f64,
    },
}

fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn default_mu() -> f64 {
    0.01
}

/// Parameters of the FedOpt family (defaults as Reddi et al.'s Algorithm 2 with a small `eta`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FedOptParams {
    /// Server learning rate.
    pub eta: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Adaptivity: the second-moment estimate starts at `tau²` and `tau` is added to its root.
    pub tau: f64,
}

impl Default for FedOptParams {
    fn default() -> Self {
        Self { eta: 1e-3, beta1: 0.9, beta2: 0.99, tau: 1e-6 }
    }
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig::Fedavg { server_lr: 1.0 }
    }
}

impl StrategyConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |k: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("strategy.{k}: expected a positive number, found {v}"))
            }
        };
        match self {
            StrategyConfig::Fedavg { server_lr } => pos("server_lr", *server_lr),
            StrategyConfig::Fedprox { proximal_mu, server_lr } => {
                pos("server_lr", *server_lr)?;
                if !(*proximal_mu >= 0.0 && proximal_mu.is_finite()) {
                    return Err(format!("strategy.proximal_mu: expected a number >= 0, found {proximal_mu}"));
                }
                Ok(())
            }
            StrategyConfig::Fedadam(p) | StrategyConfig::Fedyogi(p) | StrategyConfig::Fedadagrad(p) => {
                pos("eta", p.eta)?;
                pos("tau", p.tau)?;
                for (k, b) in [("beta1", p.beta1), ("beta2", p.beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(format!("strategy.{k}: expected a number in [0, 1), found {b}"));
                    }
                }
                Ok(())
            }
            StrategyConfig::TaskArithmetic { scale } => pos("scale", *scale),
        }
    }

    /// Builds the strategy; `client` is the base training configuration it hands out.
    pub fn build(&self, sampling: Sampling, client: FitConfig, seed: u64) -> Box<dyn Strategy> {
        let plan = FitPlan { sampling, client, seed };
        match *self {
            StrategyConfig::Fedavg { server_lr } => Box::new(FedAvg { plan, server_lr, mu: 0.0, name: "fedavg" }),
            StrategyConfig::Fedprox { proximal_mu, server_lr } => {
                Box::new(FedAvg { plan, server_lr, mu: proximal_mu, name: "fedprox" })
            }
            StrategyConfig::Fedadam(p) => Box::new(FedOpt::new(plan, p, OptKind::Adam)),
            StrategyConfig::Fedyogi(p) => Box::new(FedOpt::new(plan, p, OptKind::Yogi)),
            StrategyConfig::Fedadagrad(p) => Box::new(FedOpt::new(plan, p, OptKind::Adagrad)),
            StrategyConfig::TaskArithmetic { scale } => Box::new(TaskArithmetic { plan, scale }),
        }
    }
}

/// How every built-in strategy plans a round's fits: which clients (sampling) and what they train
/// (the client configuration, with per-client seeds).
#[derive(Debug, Clone)]
pub(crate) struct FitPlan {
    pub(crate) sampling: Sampling,
    pub(crate) client: FitConfig,
    pub(crate) seed: u64,
}

impl FitPlan {
    pub(crate) fn configure(&self, round: u64, available: &[ClientInfo], mu: f64) -> Vec<(String, FitConfig)> {
        sample_clients(available, self.sampling, self.seed, round)
            .into_iter()
            .map(|id| {
                let cfg =
                    FitConfig { proximal_mu: mu, seed: client_seed(self.seed, round, &id), ..self.client.clone() };
                (id, cfg)
            })
            .collect()
    }
}

/// Streaming weighted sum: `Σ w_i·Δ_i` and `Σ w_i`, one update at a time. Parameters an update
/// lacks count as zero for it (a LoRA update touches only its target matrices).
#[derive(Default)]
pub struct WeightedSum {
    pub sum: TensorMap,
    pub total_weight: f64,
    pub weights: BTreeMap<String, f64>,
}

impl WeightedSum {
    pub fn add(&mut self, client_id: &str, delta: &TensorMap, w: f64) -> Result<()> {
        if !(w >= 0.0 && w.is_finite()) {
            return Err(Error::msg(format!("client {client_id}: expected an aggregation weight >= 0, found {w}")));
        }
        if self.weights.insert(client_id.to_string(), w).is_some() {
            return Err(Error::msg(format!("client {client_id}: expected one update per round, found two")));
        }
        self.total_weight += w;
        if w == 0.0 {
            return Ok(());
        }
        for (name, d) in delta {
            let scaled = (d * w)?;
            let next = match self.sum.remove(name) {
                Some(acc) => {
                    if acc.dims() != d.dims() {
                        return Err(Error::msg(format!(
                            "client {client_id}: parameter `{name}` expected shape {:?}, found {:?}",
                            acc.dims(),
                            d.dims()
                        )));
                    }
                    (acc + scaled)?
                }
                None => scaled,
            };
            self.sum.insert(name.clone(), next);
        }
        Ok(())
    }

    /// `Σ w_i·Δ_i / Σ w_i`, or `None` when no update carried weight.
    pub fn mean(self) -> Result<Option<(TensorMap, BTreeMap<String, f64>)>> {
        if self.total_weight <= 0.0 {
            return Ok(None);
        }
        let inv = 1.0 / self.total_weight;
        let mean = self.sum.into_iter().map(|(k, t)| Ok((k, (t * inv)?))).collect::<Result<TensorMap>>()?;
        let weights = self.weights.into_iter().map(|(k, w)| (k, w * inv)).collect();
        Ok(Some((mean, weights)))
    }
}

/// `global[k] += scale · delta[k]`; the delta must name parameters of the model with their shapes.
/// The sum is computed and kept in f32: a parameter resident in half precision comes out widened
/// (rounding a small update back into f16 would lose it), an f32 one is unchanged in kind.
pub fn apply_delta(global: &mut TensorMap, delta: &TensorMap, scale: f64) -> Result<f64> {
    let mut sq = 0.0;
    for (name, d) in delta {
        let w = global.get(name).ok_or_else(|| {
            Error::msg(format!("update names parameter `{name}`, which the global model does not have"))
        })?;
        if w.dims() != d.dims() {
            return Err(Error::msg(format!("parameter `{name}`: expected shape {:?}, found {:?}", w.dims(), d.dims())));
        }
        let step = (d.to_dtype(candle_core::DType::F32)? * scale)?;
        sq += hetfed_core::sq_norm(&step)?;
        let next = (w.to_dtype(candle_core::DType::F32)? + step)?;
        global.insert(name.clone(), next);
    }
    Ok(sq.sqrt())
}

fn drain(
    results: &mut dyn Iterator<Item = Result<FitResult>>,
    mut f: impl FnMut(FitResult) -> Result<()>,
) -> Result<()> {
    for r in results {
        f(r?)?;
    }
    Ok(())
}

/// FedAvg (and FedProx, which differs only in what clients are told).
struct FedAvg {
    plan: FitPlan,
    server_lr: f64,
    mu: f64,
    name: &'static str,
}

impl Strategy for FedAvg {
    fn name(&self) -> &'static str {
        self.name
    }

    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)> {
        self.plan.configure(round, available, self.mu)
    }

    fn aggregate_fit(
        &mut self,
        _round: u64,
        global: &mut TensorMap,
        results: &mut dyn Iterator<Item = Result<FitResult>>,
        _failures: &[Failure],
    ) -> Result<AggregateReport> {
        let mut acc = WeightedSum::default();
        drain(results, |r| acc.add(&r.client_id, &r.delta()?, r.n_examples as f64))?;
        let n = acc.weights.len();
        let Some((mean, weights)) = acc.mean()? else {
            return Ok(AggregateReport { n_aggregated: n, ..Default::default() });
        };
        let applied_norm = apply_delta(global, &mean, self.server_lr)?;
        Ok(AggregateReport { weights, n_aggregated: n, applied_norm, ..Default::default() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OptKind {
    Adam,
    Yogi,
    Adagrad,
}

/// FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2, no bias correction):
/// `Δ = mean update`, `m ← β1·m + (1-β1)·Δ`, second moment `v` by the variant, `W ← W + η·m/(√v + τ)`.
struct FedOpt {
    plan: FitPlan,
    p: FedOptParams,
    kind: OptKind,
    m: TensorMap,
    v: TensorMap,
}

impl FedOpt {
    fn new(plan: FitPlan, p: FedOptParams, kind: OptKind) -> Self {
        Self { plan, p, kind, m: TensorMap::new(), v: TensorMap::new() }
    }
}

impl Strategy for FedOpt {
    fn name(&self) -> &'static str {
        match self.kind {
            OptKind::Adam => "fedadam",
            OptKind::Yogi => "fedyogi",
            OptKind::Adagrad => "fedadagrad",
        }
    }

    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)> {
        self.plan.configure(round, available, 0.0)
    }

    fn aggregate_fit(
        &mut self,
        _round: u64,
        global: &mut TensorMap,
        results: &mut dyn Iterator<Item = Result<FitResult>>,
        _failures: &[Failure],
    ) -> Result<AggregateReport> {
        let mut acc = WeightedSum::default();
        drain(results, |r| acc.add(&r.client_id, &r.delta()?, r.n_examples as f64))?;
        let n = acc.weights.len();
        let Some((delta, weights)) = acc.mean()? else {
            return Ok(AggregateReport { n_aggregated: n, ..Default::default() });
        };
        let (b1, b2, tau) = (self.p.beta1, self.p.beta2, self.p.tau);
        let mut step = TensorMap::new();
        for (name, d) in &delta {
            let m0 = match self.m.remove(name) {
                Some(m) => m,
                None => d.zeros_like()?,
            };
            let v0 = match self.v.remove(name) {
                Some(v) => v,
                None => (d.ones_like()? * (tau * tau))?,
            };
            let m = ((m0 * b1)? + (d * (1.0 - b1))?)?;
            let d2 = d.sqr()?;
            let v = match self.kind {
                OptKind::Adam => ((v0 * b2)? + (&d2 * (1.0 - b2))?)?,
                OptKind::Adagrad => (v0 + &d2)?,
                OptKind::Yogi => {
                    let sign = (&v0 - &d2)?.sign()?;
                    (&v0 - ((d2 * sign)? * (1.0 - b2))?)?
                }
            };
            let s = (&m / (v.sqrt()? + tau)?)?;
            step.insert(name.clone(), s);
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        let applied_norm = apply_delta(global, &step, self.p.eta)?;
        Ok(AggregateReport { weights, n_aggregated: n, applied_norm, ..Default::default() })
    }

    fn state(&self) -> (serde_json::Value, TensorMap) {
        let mut t = TensorMap::new();
        for (k, m) in &self.m {
            t.insert(format!("m.{k}"), m.clone());
        }
        for (k, v) in &self.v {
            t.insert(format!("v.{k}"), v.clone());
        }
        (serde_json::Value::Null, t)
    }

    fn load_state(&mut self, _json: serde_json::Value, tensors: TensorMap) -> Result<()> {
        self.m.clear();
        self.v.clear();
        for (k, t) in tensors {
            if let Some(name) = k.strip_prefix("m.") {
                self.m.insert(name.to_string(), t);
            } else if let Some(name) = k.strip_prefix("v.") {
                self.v.insert(name.to_string(), t);
            } else {
                return Err(Error::msg(format!(
                    "{} state: expected tensors named m.* or v.*, found `{k}`",
                    self.name()
                )));
            }
        }
        Ok(())
    }
}

/// Task arithmetic: the scaled sum of the clients' task vectors.
struct TaskArithmetic {
    plan: FitPlan,
    scale: f64,
}

impl Strategy for TaskArithmetic {
    fn name(&self) -> &'static str {
        "task_arithmetic"
    }

    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)> {
        self.plan.configure(round, available, 0.0)
    }

    fn aggregate_fit(
        &mut self,
        _round: u64,
        global: &mut TensorMap,
        results: &mut dyn Iterator<Item = Result<FitResult>>,
        _failures: &[Failure],
    ) -> Result<AggregateReport> {
        let mut acc = WeightedSum::default();
        drain(results, |r| acc.add(&r.client_id, &r.delta()?, 1.0))?;
        let n = acc.weights.len();
        let weights = acc.weights.keys().map(|k| (k.clone(), self.scale)).collect();
        let applied_norm = apply_delta(global, &acc.sum, self.scale)?;
        Ok(AggregateReport { weights, n_aggregated: n, applied_norm, ..Default::default() })
    }
}

/// A base model a client may train from: what the server checks its updates against.
#[derive(Clone)]
pub struct ClientBase {
    pub identity: hetfed_model::ModelIdentity,
    /// Shared with every registered client of this base.
    pub weights: std::sync::Arc<TensorMap>,
    /// The base's tokenizer identity ("" when it has none).
    pub tokenizer_hash: String,
    /// Where it came from (for messages).
    pub source: String,
}

/// Which model each client trains from (see [`Strategy::client_bases`]): the round's global
/// model (homogeneous federation, the default), or one of the server's small bases
/// (heterogeneous: a client's updates are checked against its own base).
#[derive(Clone, Default)]
pub struct ClientBases {
    /// Per weights hash. Empty: every client trains the global model.
    bases: BTreeMap<String, ClientBase>,
    /// Logit offsets: a client's tokenizer must be its base's.
    same_tokenizer: bool,
}

impl ClientBases {
    /// Clients train their own bases, one of `bases`; `same_tokenizer` requires a client's
    /// tokenizer to be its base's (logit offsets need one vocabulary).
    pub fn own(bases: impl IntoIterator<Item = ClientBase>, same_tokenizer: bool) -> Self {
        Self { bases: bases.into_iter().map(|b| (b.identity.weights_hash.clone(), b)).collect(), same_tokenizer }
    }

    /// The model `client` trains from: `Ok(None)` for the round's global model,
    /// `Ok(Some((identity, weights)))` for its own base, `Err(reason)` to refuse it at
    /// registration.
    #[allow(clippy::type_complexity)]
    pub fn lookup(
        &self,
        client: &ClientInfo,
    ) -> std::result::Result<Option<(hetfed_model::ModelIdentity, std::sync::Arc<TensorMap>)>, String> {
        if self.bases.is_empty() {
            return Ok(None);
        }
        let short = |h: &str| h.chars().take(12).collect::<String>();
        match self.bases.get(&client.base_hash) {
            Some(b) if self.same_tokenizer && client.tokenizer_hash != b.tokenizer_hash => Err(format!(
                "logit offsets need the server's tokenizer: expected tokenizer {} (of {}), found {}",
                if b.tokenizer_hash.is_empty() {
                    "none (no tokenizer.json)".to_string()
                } else {
                    short(&b.tokenizer_hash)
                },
                b.source,
                if client.tokenizer_hash.is_empty() {
                    "none (the client did not name its tokenizer)".to_string()
                } else {
                    short(&client.tokenizer_hash)
                }
            )),
            Some(b) => Ok(Some((b.identity.clone(), b.weights.clone()))),
            None => Err(format!(
                "expected a client base model the server has projection maps for ({}), found base {}",
                self.bases
                    .values()
                    .map(|b| format!("{} = {}", b.source, short(&b.identity.weights_hash)))
                    .collect::<Vec<_>>()
                    .join(", "),
                short(&client.base_hash)
            )),
        }
    }
}
