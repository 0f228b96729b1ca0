//! Server-side evaluation: the tasks and general text the server measures its model on, what it
//! serves for each (the global model, or what the strategy serves instead), and the evaluation
//! itself, also used by the sweep and the baselines.

use std::collections::BTreeMap;
use std::sync::Arc;

use hetfed_core::{Error, Result, TensorMap};
use hetfed_data::{Items, TaskSpec};
use hetfed_eval::{evaluate, EvalOptions};
use hetfed_model::{CausalLm, Checkpoint};

use super::{lock, Server};
use crate::strategy::Strategy;

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

/// Evaluates `weights` (a model of `base`'s architecture and tokenizer) on the server's tasks:
/// `task/metric` for each, and `general/ppl` when general text is configured.
pub fn evaluate_weights(base: &Checkpoint, weights: &TensorMap, ev: &ServerEval) -> Result<BTreeMap<String, f64>> {
    evaluate_model(base, base.arch.build(weights, &base.source(), None)?, ev)
}

/// The models the server evaluates: the global model, or per task (and for general text) what
/// the strategy serves instead (`Strategy::serving_model`).
pub struct Served {
    global: Box<dyn CausalLm>,
    per_task: BTreeMap<String, Box<dyn CausalLm>>,
    general: Option<Box<dyn CausalLm>>,
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

    fn get(&self, task: Option<&str>) -> &dyn CausalLm {
        let m = match task {
            Some(t) => self.per_task.get(t),
            None => self.general.as_ref(),
        };
        m.unwrap_or(&self.global).as_ref()
    }
}

/// [`evaluate_weights`] for any model with `base`'s tokenizer (e.g. an offset-serving model).
pub fn evaluate_model(base: &Checkpoint, model: Box<dyn CausalLm>, ev: &ServerEval) -> Result<BTreeMap<String, f64>> {
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

impl Server {
    /// Whether `round` is evaluated: every `eval.every` rounds, and always the last one.
    pub(super) fn evaluates(&self, round: u64) -> bool {
        let every = self.eval.as_ref().map_or(0, |e| e.every.max(1));
        self.eval.is_some() && (round.is_multiple_of(every) || round == self.opts.rounds)
    }

    /// Evaluates what the server serves now (off the async threads); empty without evaluation.
    pub(super) async fn server_eval(self: &Arc<Self>) -> Result<BTreeMap<String, f64>> {
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
}
