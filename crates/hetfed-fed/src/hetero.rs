//! Heterogeneous aggregation: clients fine-tune their own *small* base models; the server holds a
//! larger model and turns their task vectors into improvements of it, either by projection
//! (fitted per-layer maps, `hetfed-transfer`) or by distillation (`hetfed-distill`).
//!
//! One round, projection:
//!
//! 1. each accepted update `tau_i` (made from client `i`'s small base) is projected,
//!    `P(tau_i)`, with the maps of its base (fitted once per pair, cached by both hashes);
//! 2. `alpha_i` from update quality (the client's reported validation gain) and data
//!    heterogeneity (example count, label entropy), every part logged (`hetfed-merge`);
//! 3. combined: `sum alpha_i·P(tau_i) / sum alpha_i` (or TIES, or DARE then the mean);
//! 4. continual learning: Fisher damping (important weights move less) or orthogonal
//!    projection against earlier rounds' applied updates, or nothing;
//! 5. LARS-style trust ratio per parameter, `||dW|| <= c·||W||`;
//! 6. `W ← W + eta·dW`.
//!
//! Distillation replaces steps 1 and 3: the server rebuilds each client's fine-tuned small
//! model from its base and task vector, samples text from its own model, and trains its model
//! (LoRA) on the alpha-weighted ensemble's next-token distributions; steps 4–6 apply to the
//! resulting change.
//!
//! Logit offsets (proxy-tuning; `hetfed_distill::offset`) carry the clients' fine-tuning at the
//! level of outputs: the teacher is
//! `log_softmax(log p_L0 + Σ_i w_i·(log p_{S_i+τ_i} − log p_{S_i}))`, `L0` the server's starting
//! model, `w_i = λ·alpha_i / Σ alpha` (normalised over the clients of the same task by default:
//! specialists on different tasks add up, clients of one task average). With
//! `aggregation = "offset_serving"` the server evaluates that teacher as it is (no weight
//! changes: the upper reference); with `"offset_distillation"` it distils the teacher into its
//! own model each round (LoRA, token-level KL over the vocabulary) on server-owned sequences:
//! its general text, sequences sampled from the teacher after each task's prompt prefix, or
//! both; `offset.init = "projection"` starts the student from the projected update. Offsets need
//! one tokenizer on both sides: its identity is checked when the strategy is built and at every
//! client's registration.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_distill::{DistillConfig, OffsetLm, Posterior};
use hetfed_merge::{compute_alphas, AlphaConfig, ClientSignals, OrthoMemory};
use hetfed_model::{CausalLm, Checkpoint, ModelIdentity, ModelSpec};
use hetfed_net::{ClientInfo, DataStats};
use hetfed_taskvec::{Delta, TaskVector};
use hetfed_transfer::{MapConfig, PairMaps, MODULES};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::strategy::{
    apply_delta, AggregateReport, ClientBase, ClientBases, Failure, FitConfig, FitPlan, FitResult, Sampling, Strategy,
};

/// How client updates reach the server model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Projection,
    /// Ensemble distillation of the tuned small models (FedDF-style).
    Distillation,
    /// Evaluate the large model plus the clients' logit offsets (no weight change).
    OffsetServing,
    /// Distil the offset teacher into the large model's weights each round.
    OffsetDistillation,
}

impl Aggregation {
    pub fn strategy_name(self) -> &'static str {
        match self {
            Aggregation::Projection => "hetero_projection",
            Aggregation::Distillation => "hetero_distillation",
            Aggregation::OffsetServing => "hetero_offset_serving",
            Aggregation::OffsetDistillation => "hetero_offset_distillation",
        }
    }

    fn uses_offsets(self) -> bool {
        matches!(self, Aggregation::OffsetServing | Aggregation::OffsetDistillation)
    }
}

/// How a projected update's size is set per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectionScale {
    /// As the maps give it (orthogonal maps keep the small model's norm).
    None,
    /// Per module, `‖ΔW_L‖/‖W_L‖ = ‖ΔW_S‖/‖W_S‖`: the update changes the large weights by the
    /// same fraction as it changed the small ones.
    RelativeNorm,
}

/// Which clients' weights are normalised together for the offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetNormalise {
    /// Within each task: specialists on different tasks each add a full offset (task
    /// arithmetic), clients of one task average.
    Task,
    /// Over all clients of the round (`Σ w_i = λ`).
    All,
}

/// One offset per client, or per small base (its clients' task vectors averaged first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetPer {
    Client,
    Base,
}

/// The sequences offset distillation trains on (all server-owned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetSequences {
    /// The server's general text (`mltext` English train lines).
    General,
    /// Synthetic examples of each round task, sampled from the offset teacher in the task's
    /// format (the templates' text kept, its fields written by the teacher).
    Sampled,
    /// Both.
    Mixed,
}

/// Which offsets teach which distillation sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetRouting {
    /// Sequences sampled after task `t`'s prefix are taught by `L0` plus task `t`'s offsets;
    /// general text by `L0` alone (it keeps what the server knew).
    Task,
    /// Every sequence by `L0` plus every offset (the plain proxy-tuning sum).
    Sum,
    /// Every sequence by `L0` plus every offset weighted by the posterior that its specialist
    /// wrote the tokens so far (`hetfed_distill::Posterior`: each tuned small model's likelihood
    /// relative to its base; the offsets' weights divided by λ are the prior masses, and "no
    /// offset" has the mass of one task). Needs no task label: what a server that cannot tell
    /// which task a request is for serves.
    Posterior,
}

/// Where the offset-distillation student starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetInit {
    /// The current global model.
    Global,
    /// The global model plus the projected update (projection, then distillation).
    Projection,
}

/// Where the answers of a task's distillation examples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetAnswers {
    /// Sampled from the task's teacher, like the prompt's fields.
    Sampled,
    /// Teacher-forced: consecutive lines of the server's own text (`mltext` train lines) in the
    /// language of the task's answers (a translation's target, a summary's language); the
    /// prompt's fields are still sampled. Choice tasks keep sampled answers.
    Text,
    /// **A diagnostic oracle, not a method** (with `prompts = "task_inputs"`): a translation
    /// task's own train-split references, each example's answer the translation of its prompt's
    /// first source sentence. Task data the transfer's rules exclude: it measures what
    /// distillation on real, aligned target-side contexts would carry.
    TaskReferences,
}

/// Where the prompt fields of a task's distillation examples come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetPrompts {
    /// Sampled from the task's teacher, like the answer.
    Sampled,
    /// Teacher-forced from the server's own text (`mltext` train lines) in the language of the
    /// task's prompts (a translation's source, a summarised document, a comment); the teacher
    /// then writes the answer to that real input.
    Text,
    /// `Text` for translation tasks, `Sampled` for the others: a translation's input is general
    /// text in its source language, which the server holds, while a summarised document or a
    /// classified comment is in-domain text that only the specialist's teacher writes. (Chosen
    /// on the validation cut, seed 0: text prompts helped TICO-19 and hurt SciTLDR.)
    Translation,
    /// **A diagnostic oracle, not a method:** like `Translation`, with the source sentences of the
    /// translation task's own train split (public task data, which the transfer's rules exclude;
    /// never its references). It measures how much of distillation's gap the server's lack of
    /// in-domain inputs explains.
    TaskInputs,
}

/// Which positions of a sampled task example the distillation KL covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetLoss {
    /// The answer only (up to its end-of-sequence token): the tokens a client's loss covers.
    /// Its prompt (a sampled document or source sentence) is context, as in the client's
    /// training, and the offset there is a side effect the clients never trained for.
    Answer,
    /// Every position of the example, prompt included.
    All,
}

/// How many students distil a round's teachers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffsetStudents {
    /// One LoRA student on every sequence of the round.
    #[default]
    One,
    /// One LoRA student per task, each on that task's examples plus the general text (which
    /// every student replays), started from the same model; their changes are summed. Tasks do
    /// not share a student's optimizer state, so a task whose teacher moves the model much
    /// (Ethos's label words) cannot crowd out one that moves it little (translation). Costs one
    /// distillation per task. Measured worse than one student: the summed changes interfere
    /// (EXPERIMENTS.md).
    PerTask,
    /// One student per task, as `per_task`, that also replays every other task's examples to
    /// the model it starts from (that model's own distributions as their targets), so that its
    /// change stays on its own task and the summed changes interfere less. The same steps per
    /// student as `per_task`, each step over every task's sequences. Measured: less interference
    /// than `per_task`, TICO-19 still behind one student (EXPERIMENTS.md).
    PerTaskLocal,
}

impl OffsetStudents {
    fn is_one(&self) -> bool {
        *self == OffsetStudents::One
    }
}

/// The `[transfer.offset]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffsetConfig {
    /// λ, the scale of every offset.
    pub lambda: f64,
    pub normalise: OffsetNormalise,
    pub per: OffsetPer,
    pub sequences: OffsetSequences,
    pub routing: OffsetRouting,
    /// Sequences of general text (`general` and `mixed`).
    pub general_sequences: usize,
    /// Sequences sampled per task of the round (`sampled` and `mixed`).
    pub sampled_per_task: usize,
    /// Tokens per distillation sequence (start token and prefix included).
    pub seq_len: usize,
    pub init: OffsetInit,
    /// The positions of sampled task examples that the KL covers (general text: all).
    pub loss: OffsetLoss,
    /// Where task examples' prompt fields come from.
    pub prompts: OffsetPrompts,
    /// Where task examples' answers come from.
    pub answers: OffsetAnswers,
    /// Held-out diagnostic: per task, this many more examples sampled from its teacher (another
    /// seed, never trained on); the round's details report the student's KL to the teacher on
    /// their answers before and after distillation (and, with general text among the
    /// sequences, on as many held-out general windows). 0 (the default) skips it.
    pub heldout_per_task: usize,
    /// Candidate scales of the distilled change (`[1.0]`, the default: the change as trained).
    /// With several, the server applies the one whose student has the lowest mean held-out KL
    /// to its teachers (each task's held-out examples and the held-out general windows, see
    /// `heldout_per_task`, which it needs): a line search along the distilled direction, on
    /// server-owned sequences only, for a student that stops short of its teacher along its own
    /// direction. (Measured on the default run: scale 1 is best on every task but Ethos;
    /// EXPERIMENTS.md.)
    pub scales: Vec<f64>,
    /// Temperature of the teacher's sampled answers (1, the default: its distribution as it
    /// is). Lower draws answers nearer its mode, as sequence-level distillation does.
    pub answer_temperature: f64,
    /// Nucleus of the teacher's sampled answers: the smallest set of tokens holding this much
    /// probability (1, the default: the whole vocabulary).
    pub answer_top_p: f64,
    /// One student for the round, or one per task (see [`OffsetStudents`]).
    #[serde(skip_serializing_if = "OffsetStudents::is_one")]
    pub students: OffsetStudents,
    /// With one student: each task's examples weigh in its loss by the tasks' mean KL before
    /// training over that task's own (`hetfed_distill::distill_groups`), so a task whose
    /// teacher moves the model little (translation) counts, relative to its distance, as much
    /// as one that moves it far (Ethos's label words). General text weighs 1. Off by default.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub balance: bool,
}

impl Default for OffsetConfig {
    fn default() -> Self {
        Self {
            lambda: 1.0,
            normalise: OffsetNormalise::Task,
            per: OffsetPer::Client,
            sequences: OffsetSequences::Sampled,
            routing: OffsetRouting::Task,
            general_sequences: 64,
            sampled_per_task: 32,
            seq_len: 64,
            init: OffsetInit::Global,
            loss: OffsetLoss::All,
            prompts: OffsetPrompts::Sampled,
            answers: OffsetAnswers::Sampled,
            heldout_per_task: 0,
            scales: vec![1.0],
            answer_temperature: 1.0,
            answer_top_p: 1.0,
            students: OffsetStudents::One,
            balance: false,
        }
    }
}

impl OffsetConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.lambda.is_finite() && self.lambda > 0.0 && self.lambda <= 100.0) {
            return Err(format!("transfer.offset.lambda: expected a number in (0, 100], found {}", self.lambda));
        }
        if !(4..=4096).contains(&self.seq_len) {
            return Err(format!("transfer.offset.seq_len: expected 4..=4096 tokens, found {}", self.seq_len));
        }
        let need_general = matches!(self.sequences, OffsetSequences::General | OffsetSequences::Mixed);
        let need_sampled = matches!(self.sequences, OffsetSequences::Sampled | OffsetSequences::Mixed);
        if need_general && !(1..=100_000).contains(&self.general_sequences) {
            return Err(format!(
                "transfer.offset.general_sequences: expected 1..=100000, found {}",
                self.general_sequences
            ));
        }
        if self.answers == OffsetAnswers::TaskReferences && self.prompts != OffsetPrompts::TaskInputs {
            return Err(
                "transfer.offset.answers = \"task_references\": expected prompts = \"task_inputs\" (the references' sources), found another prompt source".into(),
            );
        }
        if self.heldout_per_task > 10_000 {
            return Err(format!(
                "transfer.offset.heldout_per_task: expected 0..=10000, found {}",
                self.heldout_per_task
            ));
        }
        if self.scales.is_empty() || self.scales.len() > 16 {
            return Err(format!("transfer.offset.scales: expected 1 to 16 scales, found {}", self.scales.len()));
        }
        if let Some(bad) = self.scales.iter().find(|s| !(s.is_finite() && **s > 0.0 && **s <= 10.0)) {
            return Err(format!("transfer.offset.scales: expected each scale in (0, 10], found {bad}"));
        }
        if self.scales.len() > 1 && self.heldout_per_task == 0 {
            return Err(format!(
                "transfer.offset.scales: choosing among {} scales needs held-out sequences; set transfer.offset.heldout_per_task to at least 1",
                self.scales.len()
            ));
        }
        if !(self.answer_temperature.is_finite() && self.answer_temperature > 0.0 && self.answer_temperature <= 10.0) {
            return Err(format!(
                "transfer.offset.answer_temperature: expected a number in (0, 10], found {}",
                self.answer_temperature
            ));
        }
        if !(self.answer_top_p.is_finite() && self.answer_top_p > 0.0 && self.answer_top_p <= 1.0) {
            return Err(format!(
                "transfer.offset.answer_top_p: expected a number in (0, 1], found {}",
                self.answer_top_p
            ));
        }
        if self.students != OffsetStudents::One && !need_sampled {
            return Err(format!(
                "transfer.offset.students = {}: expected task examples among the sequences (sequences = \"sampled\" or \"mixed\"), found general text only",
                serde_json::to_string(&self.students).unwrap_or_default()
            ));
        }
        if self.balance && self.students != OffsetStudents::One {
            return Err(format!(
                "transfer.offset.balance = true: expected one student (students = \"one\"), found students = {}",
                serde_json::to_string(&self.students).unwrap_or_default()
            ));
        }
        if need_sampled && !(1..=100_000).contains(&self.sampled_per_task) {
            return Err(format!(
                "transfer.offset.sampled_per_task: expected 1..=100000, found {}",
                self.sampled_per_task
            ));
        }
        Ok(())
    }
}

/// Text the server owns, for offset distillation: general sequences and each task's example
/// format, tokenised (`TaskSpec::skeleton`: the templates' literal text and the fields a model
/// fills in). Never client data.
#[derive(Debug, Clone, Default)]
pub struct ServerText {
    pub general: Vec<Vec<u32>>,
    /// Task name → its example format.
    pub templates: BTreeMap<String, Vec<hetfed_distill::Segment>>,
    /// Task name → teacher-forced answers in its answer language (`answers = "text"`): each
    /// consecutive server text lines, ` line` then the end-of-sequence token, at least
    /// `seq_len` tokens long.
    pub answers: BTreeMap<String, Vec<Vec<u32>>>,
    /// Task name → teacher-forced prompt fields in its prompt language (`prompts = "text"`):
    /// each consecutive server text lines (` line ...`), at least `seq_len` tokens long.
    pub prompts: BTreeMap<String, Vec<Vec<u32>>>,
}

/// How several projected updates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// `sum alpha_i·P_i / sum alpha_i` (the proposal's rule).
    Mean,
    /// TIES-Merging (trim, elect sign, disjoint mean), weighted by alpha.
    Ties,
    /// DARE (drop and rescale) on each update, then the mean.
    Dare,
}

/// Forgetting protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continual {
    None,
    /// Diagonal-Fisher damping (EWC-like) on the server's calibration text.
    Fisher,
    /// Project each update orthogonally to earlier rounds' applied updates (O-LoRA-like).
    Orthogonal,
}

/// Where calibration text comes from (never client data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    /// Sampled from the server's own (large) model.
    Sample,
    /// The server's own general text: `mltext` English train lines from the data directory.
    Text,
}

/// The `[transfer]` table: its presence makes a run heterogeneous.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferConfig {
    /// The clients' small base models; client `i` uses entry `i mod len`. Relative to the config.
    pub client_models: Vec<PathBuf>,
    pub aggregation: Aggregation,
    pub calibration: Calibration,
    pub calibration_sequences: usize,
    pub calibration_len: usize,
    /// Where fitted maps are cached (relative to the working directory); default `runs/maps`.
    pub cache_dir: Option<PathBuf>,
    pub maps: MapConfig,
    pub alpha: AlphaConfig,
    /// Server rate `eta` on the combined update.
    pub eta: f64,
    /// Per-layer size of projected updates.
    pub scale: ProjectionScale,
    /// LARS trust ratio `c` (`||dW|| <= c·||W||` per parameter); none = no cap.
    pub lars: Option<f64>,
    pub combine: Combine,
    pub ties_top_k: f64,
    pub dare_drop: f64,
    pub continual: Continual,
    pub fisher_strength: f64,
    pub ortho_memory: usize,
    /// Clients send task vectors relative to their fixed base every round, so by default each
    /// round's aggregate is added to the server model (`W ← W + eta·dW`, the proposal's rule)
    /// and repeated rounds of the same task stack up. With `anchor = true` each round's
    /// aggregate instead replaces the last one: `W = W_0 + eta·dW_t` (task arithmetic on the
    /// server's starting model), so rounds refine one estimate instead of accumulating.
    pub anchor: bool,
    /// Keep the server model as its base plus a factored change ([`hetfed_model::delta`]): the
    /// base stays in its stored dtype (f16 for a 7B model: half the memory, never rewritten),
    /// each round's projected LoRA factors are appended (scaled by `eta·alpha_i/Σalpha`, the
    /// mean projection's weights), the forward pass adds `x·Aᵀ·Bᵀ`, and checkpoints hold the
    /// factors only. Projection with the mean, without LARS, per-layer scaling, continual
    /// protection or anchoring; client updates must be LoRA.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub factored: bool,
    /// With `factored`: the most rank a module's factored change keeps. Each round appends the
    /// clients' ranks; a module above this is recompressed to its best approximation of this
    /// rank (`hetfed_project::recompress_factors`: thin QRs and the SVD of the small core, never
    /// the dense change), and the dropped norm is reported in the round's details. 0 = no bound.
    /// Range 0..=65536.
    #[serde(skip_serializing_if = "is_zero")]
    pub max_rank: usize,
    pub distill: DistillConfig,
    pub offset: OffsetConfig,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            client_models: Vec::new(),
            aggregation: Aggregation::Projection,
            calibration: Calibration::Sample,
            calibration_sequences: 64,
            calibration_len: 32,
            cache_dir: None,
            maps: MapConfig::default(),
            alpha: AlphaConfig::default(),
            eta: 1.0,
            scale: ProjectionScale::None,
            lars: None,
            combine: Combine::Mean,
            ties_top_k: 0.2,
            dare_drop: 0.9,
            continual: Continual::None,
            fisher_strength: 1.0,
            ortho_memory: 8,
            anchor: false,
            factored: false,
            max_rank: 0,
            distill: DistillConfig::default(),
            offset: OffsetConfig::default(),
        }
    }
}

impl TransferConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.client_models.is_empty() {
            return Err("transfer.client_models: expected at least one small model directory, found none".into());
        }
        if self.calibration_sequences < 2 || self.calibration_len < 4 {
            return Err(format!(
                "transfer.calibration_sequences / calibration_len: expected at least 2 sequences of 4 tokens, found {} of {}",
                self.calibration_sequences, self.calibration_len
            ));
        }
        if !(self.eta > 0.0 && self.eta.is_finite()) {
            return Err(format!("transfer.eta: expected a positive number, found {}", self.eta));
        }
        if let Some(c) = self.lars {
            if !(c > 0.0 && c.is_finite()) {
                return Err(format!("transfer.lars: expected a positive number, found {c}"));
            }
        }
        if !(self.ties_top_k > 0.0 && self.ties_top_k <= 1.0) {
            return Err(format!("transfer.ties_top_k: expected a fraction in (0, 1], found {}", self.ties_top_k));
        }
        if !(0.0..1.0).contains(&self.dare_drop) {
            return Err(format!("transfer.dare_drop: expected a fraction in [0, 1), found {}", self.dare_drop));
        }
        if !(self.fisher_strength >= 0.0 && self.fisher_strength.is_finite()) {
            return Err(format!("transfer.fisher_strength: expected a number >= 0, found {}", self.fisher_strength));
        }
        if self.max_rank > 0 && !self.factored {
            return Err(format!(
                "transfer.max_rank: bounds the rank of a factored server model; expected transfer.factored = true, found max_rank = {} without it",
                self.max_rank
            ));
        }
        if self.factored {
            self.validate_factored()?;
        }
        self.maps.validate()?;
        self.alpha.validate()?;
        self.distill.validate().map_err(|e| format!("transfer.distill: {e}"))?;
        self.offset.validate()?;
        Ok(())
    }

    /// What a factored server model supports: its change is a sum of scaled LoRA products.
    fn validate_factored(&self) -> std::result::Result<(), String> {
        let conflict = if self.aggregation != Aggregation::Projection {
            let name = serde_json::to_string(&self.aggregation).unwrap_or_default();
            Some(format!("aggregation = {name} (expected \"projection\")"))
        } else if self.combine != Combine::Mean {
            Some("combine other than \"mean\"".to_string())
        } else if self.continual != Continual::None {
            Some("continual protection".to_string())
        } else if self.lars.is_some() {
            Some("lars".to_string())
        } else if self.scale != ProjectionScale::None {
            Some("scale = \"relative_norm\"".to_string())
        } else if self.anchor {
            Some("anchor = true".to_string())
        } else {
            None
        };
        match conflict {
            Some(c) => Err(format!(
                "transfer.factored: a factored server model takes the mean of projected LoRA updates only; found {c}"
            )),
            None => Ok(()),
        }
    }

    /// Describes the calibration text (part of the maps' cache key).
    pub fn calibration_key(&self) -> String {
        format!("{:?}:n={}:len={}", self.calibration, self.calibration_sequences, self.calibration_len).to_lowercase()
    }
}

/// A small base model clients train from, with its maps into the server model.
pub struct SmallBase {
    /// Architecture, config, tokenizer and source of the model (its weights live in `weights`).
    pub spec: ModelSpec,
    /// Shared with every registered client of this base (updates are validated against it).
    pub weights: Arc<TensorMap>,
    pub identity: ModelIdentity,
    /// `ModelSpec::tokenizer_hash` of the base ("" when it has no tokenizer).
    pub tokenizer_hash: String,
    pub maps: PairMaps,
}

impl SmallBase {
    pub fn new(small: Checkpoint, maps: PairMaps) -> Result<Self> {
        let identity = small.identity()?;
        let tokenizer_hash = if small.tokenizer.is_some() { small.tokenizer_hash()? } else { String::new() };
        let Checkpoint { spec, weights } = small;
        Ok(Self { spec, weights: Arc::new(weights), identity, tokenizer_hash, maps })
    }

    /// The client's fine-tuned small model: this base plus its update (dense or LoRA factors).
    fn tuned(&self, update: &TaskVector) -> Result<Box<dyn CausalLm>> {
        let w = update.apply_unchecked(&self.weights, 1.0)?;
        self.spec.arch.build(&w, &self.spec.source(), None)
    }
}

/// One logit offset: a small base (by weights hash), the update that tunes it (a client's LoRA
/// factors as uploaded, or the dense mean of a base's clients), its weight.
#[derive(Debug, Clone)]
struct Offset {
    base_hash: String,
    /// The task of the client it came from ("" for offsets merged per base).
    task: String,
    update: TaskVector,
    weight: f64,
}

/// The heterogeneous strategy (see the module docs).
pub struct Hetero {
    plan: FitPlan,
    cfg: TransferConfig,
    /// The server model's architecture, config and source, without its tokenizer (its weights
    /// are the global model).
    large: ModelSpec,
    smalls: BTreeMap<String, SmallBase>,
    stats: BTreeMap<String, DataStats>,
    fisher: Option<TensorMap>,
    memory: OrthoMemory,
    /// The server model before the first aggregation (`anchor = true`, and the `L0` of the
    /// offset teacher).
    anchor: Option<TensorMap>,
    /// The large model's tokenizer identity.
    tokenizer_hash: String,
    text: ServerText,
    /// Offset serving: the last round's offsets.
    serving: Vec<Offset>,
}

impl Hetero {
    /// `smalls`: every small base clients may use, with fitted maps; `fisher`: the server model's
    /// diagonal Fisher (needed for [`Continual::Fisher`]).
    /// `text`: the server's own sequences for offset distillation (may be empty otherwise).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: TransferConfig,
        sampling: Sampling,
        client: FitConfig,
        seed: u64,
        large: &Checkpoint,
        smalls: Vec<SmallBase>,
        fisher: Option<TensorMap>,
        text: ServerText,
    ) -> Result<Self> {
        if cfg.continual == Continual::Fisher && fisher.is_none() {
            return Err(Error::msg(
                "transfer.continual = \"fisher\" needs the server model's Fisher information, found none",
            ));
        }
        let tokenizer_hash = if large.tokenizer.is_some() { large.tokenizer_hash()? } else { String::new() };
        if cfg.aggregation.uses_offsets() {
            for s in &smalls {
                if s.tokenizer_hash != tokenizer_hash {
                    return Err(Error::msg(format!(
                        "logit offsets need one tokenizer: the server model {} has tokenizer {}, the client base {} has {}",
                        large.source(),
                        short_or_none(&tokenizer_hash),
                        s.spec.source(),
                        short_or_none(&s.tokenizer_hash)
                    )));
                }
            }
            let general = matches!(cfg.offset.sequences, OffsetSequences::General | OffsetSequences::Mixed);
            if cfg.aggregation == Aggregation::OffsetDistillation && general && text.general.is_empty() {
                return Err(Error::msg("transfer.offset.sequences needs the server's general text, found none"));
            }
        }
        let memory = OrthoMemory::new(cfg.ortho_memory);
        Ok(Self {
            plan: FitPlan { sampling, client, seed },
            cfg,
            large: ModelSpec {
                dir: large.dir.clone(),
                arch: large.arch.clone(),
                tokenizer: None,
                config_json: large.config_json.clone(),
            },
            smalls: smalls.into_iter().map(|s| (s.identity.weights_hash.clone(), s)).collect(),
            stats: BTreeMap::new(),
            fisher,
            memory,
            anchor: None,
            tokenizer_hash,
            text,
            serving: Vec::new(),
        })
    }

    fn signals(&self, r: &FitResult) -> ClientSignals {
        let st = self.stats.get(&r.client_id);
        ClientSignals {
            n_examples: r.n_examples,
            label_entropy_bits: st.map(|s| s.label_entropy_bits).filter(|h| h.is_finite()),
            n_classes: st.map(|s| s.label_hist.len()).filter(|&n| n >= 2),
            val_gain: r.metrics.val_gain.filter(|g| g.is_finite()),
            server_gain: None,
        }
    }

    fn small_of(&self, r: &FitResult) -> Result<&SmallBase> {
        self.smalls.get(r.base_hash()).ok_or_else(|| {
            Error::msg(format!(
                "client {}: update of base {}, for which the server has no maps",
                r.client_id,
                short(r.base_hash())
            ))
        })
    }

    /// The combined change of the server model (before continual protection, LARS and eta).
    fn projected_change(
        &self,
        round: u64,
        global: &TensorMap,
        results: Vec<FitResult>,
        alphas: &BTreeMap<String, f64>,
        details: &mut serde_json::Value,
    ) -> Result<TensorMap> {
        let mut projected = Vec::with_capacity(results.len());
        let mut norms = BTreeMap::new();
        for r in results {
            let sb = self.small_of(&r)?;
            // LoRA factors project factor by factor (rank kept); dense updates module by module.
            let (p, rep) = sb.maps.project(&r.update)?;
            let (n_in, n_out): (f64, f64) = rep
                .modules
                .iter()
                .fold((0.0, 0.0), |(a, b), m| (a + m.norm_in * m.norm_in, b + m.norm_out * m.norm_out));
            let mut d = p.materialize()?;
            let mut scaled_norm = n_out.sqrt();
            if self.cfg.scale == ProjectionScale::RelativeNorm {
                scaled_norm = relative_norm_scale(&mut d, &rep.modules, &sb.weights, global)?;
            }
            norms.insert(r.client_id.clone(), json!({"norm_small": n_in.sqrt(), "norm_projected": n_out.sqrt(), "norm_scaled": scaled_norm, "dropped": rep.dropped.len(), "project_s": rep.seconds}));
            if self.cfg.combine == Combine::Dare {
                d = hetfed_merge::dare(
                    &d,
                    self.cfg.dare_drop,
                    crate::strategy::mix(crate::strategy::mix(self.plan.seed, round), projected.len() as u64),
                )?;
            }
            projected.push((r.client_id, d));
        }
        details["projection"] = json!(norms);
        let weighted: Vec<(f64, &TensorMap)> = projected.iter().map(|(id, d)| (alphas[id], d)).collect();
        if self.cfg.combine == Combine::Ties {
            return hetfed_merge::ties_merge(&weighted, self.cfg.ties_top_k);
        }
        let mut acc = crate::strategy::WeightedSum::default();
        for (id, d) in &projected {
            acc.add(id, d, alphas[id])?;
        }
        Ok(acc.mean()?.map(|(m, _)| m).unwrap_or_default())
    }

    /// [`TransferConfig::factored`]: each client's projected LoRA factors, `B` scaled by
    /// `eta·alpha_i/Σalpha`, appended to the server model's factored change (clients in id
    /// order, so the factors' order is the same whatever order the updates arrived in). Returns
    /// the Frobenius norm of the round's change, from the factors' Gram matrices.
    fn factored_projection(
        &self,
        global: &mut TensorMap,
        mut results: Vec<FitResult>,
        alphas: &BTreeMap<String, f64>,
        details: &mut serde_json::Value,
    ) -> Result<f64> {
        results.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        let total: f64 = results.iter().map(|r| alphas[&r.client_id]).sum();
        let mut round: BTreeMap<String, (Vec<Tensor>, Vec<Tensor>)> = BTreeMap::new();
        let mut norms = BTreeMap::new();
        for r in &results {
            let (p, rep) = self.small_of(r)?.maps.project(&r.update)?;
            let w = if total > 0.0 { self.cfg.eta * alphas[&r.client_id] / total } else { 0.0 };
            norms.insert(
                r.client_id.clone(),
                json!({"weight": w, "dropped": rep.dropped.len(), "project_s": rep.seconds}),
            );
            if w == 0.0 {
                continue;
            }
            for (module, a, b) in p.scaled_factors("transfer.factored")? {
                let e = round.entry(module).or_default();
                e.0.push(a);
                e.1.push((b * w)?);
            }
        }
        let mut sq = 0.0;
        for (module, (a, b)) in round {
            let (a, b) = (Tensor::cat(&a, 0)?, Tensor::cat(&b, 1)?);
            sq += factored_sq_norm(&a, &b)?;
            hetfed_model::delta::append(global, &module, &a, &b)?;
        }
        // Bounded rank: modules above it are cut back to their best approximation of that rank.
        let mut dropped_sq = 0.0;
        let mut recompressed = 0;
        if self.cfg.max_rank > 0 {
            for (module, r) in hetfed_model::delta::ranks(global) {
                if r <= self.cfg.max_rank {
                    continue;
                }
                let (na, nb) = hetfed_model::delta::names(&module);
                let (a, b) = (global[&na].clone(), global[&nb].clone());
                let (b, a, dropped) = hetfed_project::recompress_factors(&b, &a, self.cfg.max_rank)?;
                global.insert(na, a.contiguous()?);
                global.insert(nb, b.contiguous()?);
                dropped_sq += dropped * dropped;
                recompressed += 1;
            }
        }
        let ranks = hetfed_model::delta::ranks(global);
        details["projection"] = json!(norms);
        details["factored"] = json!({
            "modules": ranks.len(), "max_rank": ranks.values().max(),
            "recompressed": recompressed, "dropped_norm": dropped_sq.sqrt(),
        });
        Ok(sq.sqrt())
    }

    fn distilled_change(
        &self,
        round: u64,
        global: &TensorMap,
        results: &[FitResult],
        alphas: &BTreeMap<String, f64>,
        details: &mut serde_json::Value,
    ) -> Result<TensorMap> {
        let dc = &self.cfg.distill;
        let mut teachers = Vec::with_capacity(results.len());
        for r in results {
            let sb = self.small_of(r)?;
            let w = r.update.apply_unchecked(&sb.weights, 1.0)?;
            teachers.push((sb.spec.arch.build(&w, &sb.spec.source(), None)?, alphas[&r.client_id]));
        }
        let student = self.large.with_weights(global.clone());
        let model = student.model(None)?;
        let start = self.large.arch.eos_token_id().unwrap_or(0);
        let seed = crate::strategy::mix(dc.seed ^ self.plan.seed, round);
        let seqs = hetfed_distill::sample_texts(model.as_ref(), start, dc.n_prompts, dc.seq_len, seed)?;
        let refs: Vec<(&dyn hetfed_model::CausalLm, f64)> = teachers.iter().map(|(m, w)| (m.as_ref(), *w)).collect();
        let targets = hetfed_distill::ensemble_targets(&refs, &seqs, dc.temperature)?;
        let cfg = DistillConfig { seed, ..dc.clone() };
        let rep = hetfed_distill::distill(&student, &targets, &seqs, &cfg, |_, _| {})?;
        details["distill"] =
            json!({"kl_before": rep.kl_before, "kl_after": rep.kl_after, "steps": rep.steps, "seconds": rep.seconds});
        Ok(rep.delta)
    }
}

impl Hetero {
    /// The round's offsets: per client (or per base), with weights `λ·alpha` normalised over
    /// the clients of one task (or over all).
    fn offsets(&self, results: Vec<FitResult>, alphas: &BTreeMap<String, f64>) -> Result<Vec<Offset>> {
        let oc = &self.cfg.offset;
        let task_of = |id: &str| self.stats.get(id).and_then(|s| s.tasks.first().cloned()).unwrap_or_default();
        let mut group_sum: BTreeMap<String, f64> = BTreeMap::new();
        for r in &results {
            let key = match oc.normalise {
                OffsetNormalise::Task => task_of(&r.client_id),
                OffsetNormalise::All => String::new(),
            };
            *group_sum.entry(key).or_default() += alphas[&r.client_id];
        }
        let mut out: Vec<Offset> = Vec::new();
        for r in results {
            self.small_of(&r)?;
            let key = match oc.normalise {
                OffsetNormalise::Task => task_of(&r.client_id),
                OffsetNormalise::All => String::new(),
            };
            let total = group_sum[&key];
            let w = if total > 0.0 { oc.lambda * alphas[&r.client_id] / total } else { 0.0 };
            match oc.per {
                OffsetPer::Client => out.push(Offset {
                    task: task_of(&r.client_id),
                    base_hash: r.base_hash().to_string(),
                    update: r.update,
                    weight: w,
                }),
                OffsetPer::Base => {
                    let d = r.delta()?;
                    match out.iter_mut().find(|o| o.base_hash == r.base_hash()) {
                        // Accumulate `Σ w_i·τ_i` per base (dense); divided by `Σ w_i` below.
                        Some(o) => {
                            let Delta::Full(acc) = &mut o.update.kind else {
                                unreachable!("offsets per base are dense")
                            };
                            apply_delta(acc, &d, w)?;
                            o.weight += w;
                        }
                        None => {
                            let mut d = d;
                            for t in d.values_mut() {
                                *t = (&*t * w)?;
                            }
                            let base = r.update.base.clone();
                            out.push(Offset {
                                base_hash: r.base_hash().to_string(),
                                task: String::new(),
                                update: TaskVector { base, kind: Delta::Full(d) },
                                weight: w,
                            });
                        }
                    }
                }
            }
        }
        if oc.per == OffsetPer::Base {
            // One offset per base: the weighted mean of its clients' updates, with weight λ
            // (λ per task group when normalising per task: the groups' weights add up).
            for o in &mut out {
                if let (true, Delta::Full(d)) = (o.weight > 0.0, &mut o.update.kind) {
                    for t in d.values_mut() {
                        *t = (&*t / o.weight)?;
                    }
                }
                o.weight = if oc.normalise == OffsetNormalise::Task { o.weight } else { oc.lambda };
            }
        }
        Ok(out)
    }

    /// `L0 + Σ w_i·offset_i` as one model.
    fn offset_model(&self, large: &TensorMap, offsets: &[Offset]) -> Result<OffsetLm> {
        let l = self.large.arch.build(large, &self.large.source(), None)?;
        let mut base_ids: Vec<&str> = Vec::new();
        let mut bases = Vec::new();
        let mut tuned = Vec::new();
        for o in offsets {
            let sb = self.smalls.get(&o.base_hash).ok_or_else(|| {
                Error::msg(format!("offset of base {}, for which the server has no model", short(&o.base_hash)))
            })?;
            let b = match base_ids.iter().position(|h| *h == o.base_hash) {
                Some(b) => b,
                None => {
                    base_ids.push(&o.base_hash);
                    bases.push(sb.spec.arch.build(&sb.weights, &sb.spec.source(), None)?);
                    bases.len() - 1
                }
            };
            tuned.push((b, sb.tuned(&o.update)?, o.weight));
        }
        let oc = &self.cfg.offset;
        if oc.routing != OffsetRouting::Posterior {
            return OffsetLm::new(l, bases, tuned);
        }
        // Offsets of weight 0 (no aggregation weight) are no experts.
        let tuned = tuned.into_iter().filter(|t| t.2 > 0.0).map(|(b, m, w)| (b, m, w / oc.lambda)).collect();
        OffsetLm::routed(l, bases, tuned, Posterior { lambda: oc.lambda, base_mass: 1.0 })
    }

    /// Offset distillation: the change of the server model that distils the offset teacher
    /// (plus, with `init = "projection"`, the projected update it starts from).
    fn offset_distilled_change(
        &self,
        round: u64,
        global: &TensorMap,
        results: Vec<FitResult>,
        alphas: &BTreeMap<String, f64>,
        details: &mut serde_json::Value,
    ) -> Result<TensorMap> {
        let oc = &self.cfg.offset;
        let tasks: Vec<String> = {
            let mut t: Vec<String> = results
                .iter()
                .filter_map(|r| self.stats.get(&r.client_id).and_then(|s| s.tasks.first().cloned()))
                .collect();
            t.sort();
            t.dedup();
            t
        };
        // The student's start: the global model, or the global model plus the projected update.
        // With `anchor = true` the round's change replaces the last one (`W = W_0 + dW_t`), so
        // the student starts from `W_0` and distils the clients' whole offsets afresh.
        let base = match (&self.anchor, self.cfg.anchor) {
            (Some(a), true) => a,
            _ => global,
        };
        let mut start = base.clone();
        let mut change = TensorMap::new();
        if oc.init == OffsetInit::Projection {
            let for_projection: Vec<FitResult> = results.clone();
            change = self.projected_change(round, base, for_projection, alphas, details)?;
            if let Some(c) = self.cfg.lars {
                hetfed_merge::trust_ratio(base, &mut change, c)?;
            }
            for t in change.values_mut() {
                *t = (&*t * self.cfg.eta)?;
            }
            apply_delta(&mut start, &change, 1.0)?;
        }
        let offsets = self.offsets(results, alphas)?;
        let seed = crate::strategy::mix(self.cfg.distill.seed ^ self.plan.seed, round);
        let data = self.distill_data(global, &offsets, &tasks, seed)?;
        let student = self.large.with_weights(start);
        let cfg = DistillConfig { seed, ..self.cfg.distill.clone() };
        let mut kl_by_task = serde_json::Map::new();
        let (rep, per_task) = match oc.students {
            OffsetStudents::One => {
                let mut groups: Vec<Option<usize>> = vec![None; data.seqs.len()];
                for (g, (_, range)) in data.groups.iter().enumerate() {
                    range.clone().for_each(|i| groups[i] = Some(g));
                }
                let (rep, per_group) = hetfed_distill::distill_groups(
                    &student,
                    &data.targets,
                    &data.seqs,
                    &groups,
                    oc.balance,
                    &cfg,
                    |_, _| {},
                )?;
                for ((task, _), g) in data.groups.iter().zip(per_group) {
                    kl_by_task.insert(task.clone(), json!(g));
                }
                (rep, None)
            }
            OffsetStudents::PerTask | OffsetStudents::PerTaskLocal => {
                let (rep, per_task) = self.per_task_students(&student, &data, &cfg)?;
                (rep, Some(per_task))
            }
        };
        let (heldout, scale) = self.heldout_kl(&student, &rep.delta, &data.heldout)?;
        let weights: BTreeMap<String, f64> = offsets
            .iter()
            .enumerate()
            .map(|(i, o)| {
                (format!("{i}:{}", if o.task.is_empty() { short(&o.base_hash) } else { o.task.clone() }), o.weight)
            })
            .collect();
        details["offset"] = json!({
            "n_offsets": offsets.len(), "weights": weights, "tasks": tasks, "routed": data.routed, "sampled": data.sampled,
            "sequences": data.seqs.len(), "positions": data.positions, "kl_before": rep.kl_before, "kl_after": rep.kl_after,
            "steps": rep.steps, "distill_s": rep.seconds,
        });
        if !heldout.is_empty() {
            details["offset"]["heldout_kl"] = json!(heldout);
        }
        if !kl_by_task.is_empty() {
            details["offset"]["kl_by_task"] = serde_json::Value::Object(kl_by_task);
        }
        if let Some(per_task) = per_task {
            details["offset"]["students"] = json!(per_task);
        }
        details["offset"]["scale"] = json!(scale);
        let mut delta = rep.delta;
        if scale != 1.0 {
            for t in delta.values_mut() {
                *t = (&*t * scale)?;
            }
        }
        // The whole change from the student's base (the global model, or `W_0` when anchored):
        // the projected start (if any) plus the distilled delta.
        change_with(&mut change, &delta)?;
        Ok(change)
    }

    /// [`OffsetStudents::PerTask`]: one student per task group of `data` (its examples plus every
    /// general sequence), each from `student` with its own seed; returns their summed change,
    /// the merged student's KL over all of `data` before and after, and each student's own KLs.
    fn per_task_students(
        &self,
        student: &Checkpoint,
        data: &DistillData,
        cfg: &DistillConfig,
    ) -> Result<(hetfed_distill::DistillReport, BTreeMap<String, serde_json::Value>)> {
        let t0 = Instant::now();
        let mut delta = TensorMap::new();
        let mut each = BTreeMap::new();
        let t = cfg.temperature;
        let start = student.model(None)?;
        // `per_task_local`: every task example's distributions under the students' start, which
        // the other tasks' students keep.
        let local = self.cfg.offset.students == OffsetStudents::PerTaskLocal;
        let mut kept: BTreeMap<usize, Tensor> = BTreeMap::new();
        if local {
            let idx: Vec<usize> = data.groups.iter().flat_map(|(_, r)| r.clone()).collect();
            let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| data.seqs[i].clone()).collect();
            let targets = hetfed_distill::ensemble_targets(&[(start.as_ref(), 1.0)], &seqs, t)?;
            kept = idx.into_iter().zip(targets).collect();
        }
        for (k, (task, range)) in data.groups.iter().enumerate() {
            let mut idx: Vec<usize> = range.clone().chain(data.general.clone()).collect();
            let mut targets: Vec<Tensor> = idx.iter().map(|&i| data.targets[i].clone()).collect();
            if local {
                let others: Vec<usize> = kept.keys().copied().filter(|i| !range.contains(i)).collect();
                targets.extend(others.iter().map(|i| kept[i].clone()));
                idx.extend(others);
            }
            let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| data.seqs[i].clone()).collect();
            let c = DistillConfig { seed: crate::strategy::mix(cfg.seed, k as u64 + 1), ..cfg.clone() };
            let r = hetfed_distill::distill(student, &targets, &seqs, &c, |_, _| {})?;
            each.insert(
                task.clone(),
                json!({"kl_before": r.kl_before, "kl_after": r.kl_after, "sequences": seqs.len()}),
            );
            change_with(&mut delta, &r.delta)?;
        }
        let kl_before = hetfed_distill::mean_kl(start.as_ref(), &data.seqs, &data.targets, t)?;
        let mut merged = student.weights.clone();
        apply_delta(&mut merged, &delta, 1.0)?;
        let merged = self.large.arch.build(&merged, &self.large.source(), None)?;
        let kl_after = hetfed_distill::mean_kl(merged.as_ref(), &data.seqs, &data.targets, t)?;
        let steps = cfg.steps * data.groups.len();
        let seconds = t0.elapsed().as_secs_f64();
        Ok((hetfed_distill::DistillReport { delta, kl_before, kl_after, steps, seconds }, each))
    }

    /// The distillation sequences and their teacher targets (see [`OffsetSequences`] and
    /// [`OffsetRouting`]), plus the held-out examples of [`OffsetConfig::heldout_per_task`].
    fn distill_data(&self, global: &TensorMap, offsets: &[Offset], tasks: &[String], seed: u64) -> Result<DistillData> {
        let oc = &self.cfg.offset;
        let temperature = self.cfg.distill.temperature;
        let l0 = self.anchor.as_ref().unwrap_or(global);
        // Routing by task: a task's sequences are taught by the teacher with that task's
        // offsets only, general text by L0 itself (replay of what the server knew). Summing
        // every offset everywhere (`routing = "sum"`) lets one specialist's offset act on
        // another's domain. Offsets merged per base have no task, so they always sum.
        let routed = oc.routing == OffsetRouting::Task && oc.per == OffsetPer::Client;
        // The summed teacher is built only when some sequence uses it.
        let all = if routed { None } else { Some(self.offset_model(l0, offsets)?) };
        let mut out = DistillData { routed, ..DistillData::default() };
        if matches!(oc.sequences, OffsetSequences::General | OffsetSequences::Mixed) {
            let general: Vec<Vec<u32>> = self
                .text
                .general
                .iter()
                .take(oc.general_sequences)
                .map(|s| s[..s.len().min(oc.seq_len)].to_vec())
                .collect();
            let plain;
            let teacher: &dyn CausalLm = match &all {
                Some(all) => all,
                None => {
                    plain = self.offset_model(l0, &[])?;
                    &plain
                }
            };
            out.targets.extend(hetfed_distill::ensemble_targets(&[(teacher, 1.0)], &general, temperature)?);
            out.positions.insert("general".into(), general.iter().map(Vec::len).sum());
            out.general = out.seqs.len()..out.seqs.len() + general.len();
            out.seqs.extend(general);
            if oc.heldout_per_task > 0 {
                // The windows after the training ones (`server_text` packs that many more).
                let held: Vec<Vec<u32>> = self
                    .text
                    .general
                    .iter()
                    .skip(oc.general_sequences)
                    .take(oc.heldout_per_task)
                    .map(|s| s[..s.len().min(oc.seq_len)].to_vec())
                    .collect();
                if !held.is_empty() {
                    let t = hetfed_distill::ensemble_targets(&[(teacher, 1.0)], &held, temperature)?;
                    out.heldout.push((GENERAL.into(), (held, t)));
                }
            }
        }
        let sampled = matches!(oc.sequences, OffsetSequences::Sampled | OffsetSequences::Mixed);
        if sampled || oc.heldout_per_task > 0 {
            for (k, task) in tasks.iter().enumerate() {
                let own;
                let teacher: &dyn CausalLm = match &all {
                    Some(all) => all,
                    None => {
                        let mine: Vec<Offset> = offsets.iter().filter(|o| &o.task == task).cloned().collect();
                        own = self.offset_model(l0, &mine)?;
                        &own
                    }
                };
                if sampled {
                    let task_seed = crate::strategy::mix(seed, k as u64 + 1);
                    let loss = oc.loss;
                    let ((s, t), positions) =
                        self.task_examples(teacher, task, oc.sampled_per_task, task_seed, loss)?;
                    out.sampled.insert(task.clone(), s.len());
                    out.positions.insert(task.clone(), positions);
                    out.groups.push((task.clone(), out.seqs.len()..out.seqs.len() + s.len()));
                    out.seqs.extend(s);
                    out.targets.extend(t);
                }
                if oc.heldout_per_task > 0 {
                    let held_seed = crate::strategy::mix(seed ^ 0x4845_4C44, k as u64 + 1);
                    let n = oc.heldout_per_task;
                    out.heldout
                        .push((task.clone(), self.task_examples(teacher, task, n, held_seed, OffsetLoss::Answer)?.0));
                }
            }
        }
        if out.seqs.is_empty() {
            return Err(Error::msg(
                "offset distillation: expected server sequences (general text or task prefixes), found none",
            ));
        }
        Ok(out)
    }

    /// `n` examples of `task` sampled from `teacher` in the task's format, with the teacher's
    /// targets (restricted to the answers under [`OffsetLoss::Answer`]), and the number of
    /// positions the KL counts.
    fn task_examples(
        &self,
        teacher: &dyn CausalLm,
        task: &str,
        n: usize,
        seed: u64,
        loss: OffsetLoss,
    ) -> Result<(Examples, usize)> {
        let eos = self.large.arch.eos_token_id().unwrap_or(0);
        let template = self.text.templates.get(task).cloned().unwrap_or_else(|| vec![hetfed_distill::Segment::Field]);
        let len = self.cfg.offset.seq_len;
        // A seeded start in the server's text, so that each round and the held-out set see
        // other lines.
        let rotated = |lines: &[Vec<u32>], start: u64| -> Vec<Vec<u32>> {
            let k = (start % lines.len() as u64) as usize;
            lines[k..].iter().chain(&lines[..k]).cloned().collect()
        };
        let oc = &self.cfg.offset;
        let prompt_start = crate::strategy::mix(seed, 0x5052_4F4D);
        // The oracle's references stay aligned with their sources: one rotation for both.
        let answer_start = if oc.answers == OffsetAnswers::TaskReferences { prompt_start } else { seed };
        let answers = self
            .text
            .answers
            .get(task)
            .filter(|_| oc.answers != OffsetAnswers::Sampled)
            .map(|a| rotated(a, answer_start));
        let prompts = self
            .text
            .prompts
            .get(task)
            .filter(|_| oc.prompts != OffsetPrompts::Sampled)
            .map(|p| rotated(p, prompt_start));
        let answer_sampling = Some((oc.answer_temperature, (oc.answer_top_p < 1.0).then_some(oc.answer_top_p)));
        let text =
            hetfed_distill::TemplateText { prompts: prompts.as_deref(), answers: answers.as_deref(), answer_sampling };
        let samples = hetfed_distill::sample_template_from(teacher, eos, &template, n, len, seed, text)?;
        let mut seqs = samples.seqs;
        let mut targets = hetfed_distill::ensemble_targets(&[(teacher, 1.0)], &seqs, self.cfg.distill.temperature)?;
        // Under `Answer` the rows before the one predicting the answer's first token are zeroed.
        let skip = if loss == OffsetLoss::Answer {
            hetfed_distill::answer_only(&mut seqs, &mut targets, samples.answer_start, eos)?;
            samples.answer_start - 1
        } else {
            0
        };
        let positions = seqs.iter().map(|s| s.len() - skip).sum();
        Ok(((seqs, targets), positions))
    }

    /// Per held-out set (each task's answers, and general text), the KL per position of the
    /// student to its teacher before (`student`) and after (`student + s·delta`) distillation,
    /// for each candidate scale `s` of [`OffsetConfig::scales`]; and the scale whose mean KL
    /// over the sets is lowest (the first on a tie; the first scale without held-out sets,
    /// which validation allows with a single scale only).
    fn heldout_kl(
        &self,
        student: &Checkpoint,
        delta: &TensorMap,
        heldout: &[(String, Examples)],
    ) -> Result<(BTreeMap<String, serde_json::Value>, f64)> {
        let mut out = BTreeMap::new();
        let scales = &self.cfg.offset.scales;
        if heldout.is_empty() {
            return Ok((out, scales.first().copied().unwrap_or(1.0)));
        }
        let temperature = self.cfg.distill.temperature;
        let kls = |m: &dyn CausalLm| -> Result<Vec<f64>> {
            heldout.iter().map(|(_, (seqs, targets))| hetfed_distill::mean_kl(m, seqs, targets, temperature)).collect()
        };
        let before = kls(student.arch.build(&student.weights, &student.source(), None)?.as_ref())?;
        let mut by_scale = Vec::with_capacity(scales.len());
        for &s in scales {
            let mut after = student.weights.clone();
            apply_delta(&mut after, delta, s)?;
            by_scale.push(kls(student.arch.build(&after, &student.source(), None)?.as_ref())?);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let best = (0..scales.len()).fold(0, |b, i| if mean(&by_scale[i]) < mean(&by_scale[b]) { i } else { b });
        for (k, (name, (seqs, _))) in heldout.iter().enumerate() {
            let mut entry = json!({"before": before[k], "after": by_scale[best][k], "examples": seqs.len()});
            if scales.len() > 1 {
                let all: BTreeMap<String, f64> =
                    scales.iter().zip(&by_scale).map(|(s, v)| (format!("{s}"), v[k])).collect();
                entry["by_scale"] = json!(all);
            }
            out.insert(name.clone(), entry);
        }
        Ok((out, scales[best]))
    }
}

/// The held-out set of general text in [`Hetero::heldout_kl`]'s report.
const GENERAL: &str = "(general)";

/// Distillation sequences and their teacher targets (`[len, vocab]` each).
type Examples = (Vec<Vec<u32>>, Vec<Tensor>);

/// The distillation set of one round.
#[derive(Default)]
struct DistillData {
    seqs: Vec<Vec<u32>>,
    targets: Vec<Tensor>,
    routed: bool,
    /// Examples sampled per task.
    sampled: BTreeMap<String, usize>,
    /// Positions the KL covers, per task and for general text.
    positions: BTreeMap<String, usize>,
    /// Per task, held-out examples and their answer-only targets.
    heldout: Vec<(String, Examples)>,
    /// The indices of the general sequences in `seqs` (empty without general text).
    general: std::ops::Range<usize>,
    /// Per task, the indices of its examples in `seqs`.
    groups: Vec<(String, std::ops::Range<usize>)>,
}

/// Adds `delta` into `acc` (keys missing from `acc` are inserted) and returns `acc`.
fn change_with(acc: &mut TensorMap, delta: &TensorMap) -> Result<()> {
    for (k, d) in delta {
        let next = match acc.get(k) {
            Some(a) => (a + d)?,
            None => d.clone(),
        };
        acc.insert(k.clone(), next);
    }
    Ok(())
}

/// Scales each projected module so that `‖ΔW_L‖/‖W_L‖ = ‖ΔW_S‖/‖W_S‖` (the small update's
/// relative size, measured on its own base); returns the scaled update's norm.
fn relative_norm_scale(
    d: &mut TensorMap,
    modules: &[hetfed_transfer::ProjectedModule],
    small: &TensorMap,
    large: &TensorMap,
) -> Result<f64> {
    let norm = |t: &Tensor| -> Result<f64> { Ok(hetfed_core::sq_norm(t)?.sqrt()) };
    let param =
        |n: &str| if n.ends_with(".weight") || n.ends_with(".bias") { n.to_string() } else { format!("{n}.weight") };
    for m in modules {
        let key = param(&m.name);
        let (Some(wl), Some(ws), Some(dl)) = (large.get(&key), small.get(&param(&m.from)), d.get(&key)) else {
            continue;
        };
        if m.norm_out <= 0.0 {
            continue;
        }
        let (nl, ns) = (norm(wl)?, norm(ws)?);
        if ns <= 0.0 {
            continue;
        }
        let factor = (m.norm_in / ns) * nl / m.norm_out;
        let scaled = (dl * factor)?;
        d.insert(key, scaled);
    }
    let mut sq = 0.0;
    for t in d.values() {
        sq += hetfed_core::sq_norm(t)?;
    }
    Ok(sq.sqrt())
}

/// `‖B·A‖²_F = sum((BᵀB) ⊙ (A·Aᵀ))`, two `rank × rank` products in f64.
fn factored_sq_norm(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(candle_core::DType::F64)?, b.to_dtype(candle_core::DType::F64)?);
    let g = (b.t()?.matmul(&b)? * a.matmul(&a.t()?)?)?;
    Ok(g.sum_all()?.to_scalar::<f64>()?)
}

fn short(h: &str) -> String {
    h.chars().take(12).collect()
}

fn short_or_none(h: &str) -> String {
    if h.is_empty() {
        "none (no tokenizer.json)".into()
    } else {
        short(h)
    }
}

impl Strategy for Hetero {
    fn name(&self) -> &'static str {
        self.cfg.aggregation.strategy_name()
    }

    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)> {
        for c in available {
            self.stats.insert(c.client_id.clone(), c.stats.clone());
        }
        self.plan.configure(round, available, 0.0)
    }

    fn client_bases(&self) -> ClientBases {
        let bases = self.smalls.values().map(|sb| ClientBase {
            identity: sb.identity.clone(),
            weights: sb.weights.clone(),
            tokenizer_hash: sb.tokenizer_hash.clone(),
            source: sb.spec.source(),
        });
        ClientBases::own(bases, self.cfg.aggregation.uses_offsets())
    }

    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &mut TensorMap,
        results: &mut dyn Iterator<Item = Result<FitResult>>,
        _failures: &[Failure],
    ) -> Result<AggregateReport> {
        let t0 = Instant::now();
        let results: Vec<FitResult> = results.collect::<Result<_>>()?;
        let n = results.len();
        if n == 0 {
            return Ok(AggregateReport::default());
        }
        let signals: Vec<(String, ClientSignals)> =
            results.iter().map(|r| (r.client_id.clone(), self.signals(r))).collect();
        let parts = compute_alphas(&self.cfg.alpha, &signals)?;
        let alphas: BTreeMap<String, f64> = parts.iter().map(|(k, p)| (k.clone(), p.alpha)).collect();
        let mut details = json!({"alpha": parts});
        if self.cfg.factored {
            let applied_norm = self.factored_projection(global, results, &alphas, &mut details)?;
            details["server_s"] = json!(t0.elapsed().as_secs_f64());
            return Ok(AggregateReport { weights: alphas, n_aggregated: n, applied_norm, details });
        }
        if self.cfg.aggregation.uses_offsets() && self.anchor.is_none() {
            // L0 of the offset teacher: the server model before its first aggregation.
            self.anchor = Some(global.clone());
        }
        let mut change = match self.cfg.aggregation {
            Aggregation::Projection => self.projected_change(round, global, results, &alphas, &mut details)?,
            Aggregation::Distillation => self.distilled_change(round, global, &results, &alphas, &mut details)?,
            Aggregation::OffsetServing => {
                self.serving = self.offsets(results, &alphas)?;
                let weights: Vec<f64> = self.serving.iter().map(|o| o.weight).collect();
                details["offset"] = json!({"n_offsets": self.serving.len(), "weights": weights});
                details["server_s"] = json!(t0.elapsed().as_secs_f64());
                return Ok(AggregateReport { weights: alphas, n_aggregated: n, applied_norm: 0.0, details });
            }
            Aggregation::OffsetDistillation => {
                self.offset_distilled_change(round, global, results, &alphas, &mut details)?
            }
        };
        match self.cfg.continual {
            Continual::None => {}
            Continual::Fisher => {
                let fisher = self.fisher.as_ref().ok_or_else(|| Error::msg("no Fisher information"))?;
                let kept = hetfed_merge::fisher_damp(&mut change, fisher, self.cfg.fisher_strength)?;
                let mean = kept.values().sum::<f64>() / kept.len().max(1) as f64;
                details["fisher_norm_kept_mean"] = json!(mean);
            }
            Continual::Orthogonal => {
                let removed = self.memory.project_out(&mut change)?;
                details["orthogonal_removed"] = json!(removed);
            }
        }
        if self.cfg.anchor {
            let w0 = self.anchor.get_or_insert_with(|| global.clone());
            *global = w0.clone();
        }
        let lars = if self.cfg.aggregation == Aggregation::OffsetDistillation { None } else { self.cfg.lars };
        if let Some(c) = lars {
            let factors = hetfed_merge::trust_ratio(global, &mut change, c)?;
            let capped = factors.values().filter(|f| **f < 1.0).count();
            let min = factors.values().copied().fold(1.0f64, f64::min);
            details["lars"] = json!({"capped": capped, "of": factors.len(), "min_factor": min});
        }
        // The offset-distilled change is the student's whole move (eta already scaled any
        // projected start), so it is applied as it is.
        let eta = if self.cfg.aggregation == Aggregation::OffsetDistillation { 1.0 } else { self.cfg.eta };
        let applied_norm = apply_delta(global, &change, eta)?;
        if self.cfg.continual == Continual::Orthogonal {
            self.memory.remember(&change)?;
        }
        details["server_s"] = json!(t0.elapsed().as_secs_f64());
        Ok(AggregateReport { weights: alphas, n_aggregated: n, applied_norm, details })
    }

    fn run_info(&self) -> serde_json::Value {
        let maps: Vec<serde_json::Value> = self
            .smalls
            .values()
            .map(|s| {
                json!({
                    "small": s.spec.source(), "small_hash": s.identity.weights_hash, "method": s.maps.config.method,
                    "pairing": s.maps.pairing, "fit_s": s.maps.summary.seconds,
                    "mean_explained_variance": s.maps.summary.mean_explained_variance,
                    "explained_variance_by_space": s.maps.mean_explained_variance_by_space(),
                    "layers": s.maps.summary.layers, "calibration": s.maps.summary.calibration,
                })
            })
            .collect();
        json!({"maps": maps, "tokenizer_hash": self.tokenizer_hash})
    }

    /// Offset serving: `L0` plus the last round's offsets. Routed by task (the default), a task
    /// is served with its own clients' offsets only and general text by `L0` alone, as a server
    /// that knows which task a request is for would serve it; summed, every offset always;
    /// routed by the posterior, every offset weighted by the sequence itself.
    fn serving_model(
        &self,
        _base: &Checkpoint,
        global: &TensorMap,
        task: Option<&str>,
    ) -> Result<Option<Box<dyn CausalLm>>> {
        if self.cfg.aggregation != Aggregation::OffsetServing || self.serving.is_empty() {
            return Ok(None);
        }
        let routed = self.cfg.offset.routing == OffsetRouting::Task && self.cfg.offset.per == OffsetPer::Client;
        let offsets: Vec<Offset> = if routed {
            self.serving.iter().filter(|o| Some(o.task.as_str()) == task).cloned().collect()
        } else {
            self.serving.clone()
        };
        Ok(Some(Box::new(self.offset_model(self.anchor.as_ref().unwrap_or(global), &offsets)?)))
    }

    fn state(&self) -> (serde_json::Value, TensorMap) {
        let mut t = self.memory.to_tensors();
        if let Some(a) = &self.anchor {
            t.extend(a.iter().map(|(k, v)| (format!("anchor.{k}"), v.clone())));
        }
        for (i, o) in self.serving.iter().enumerate() {
            let (Delta::Full(m) | Delta::Lora { factors: m, .. }) = &o.update.kind;
            t.extend(m.iter().map(|(k, v)| (format!("serving.{i}.{k}"), v.clone())));
        }
        let serving: Vec<serde_json::Value> = self
            .serving
            .iter()
            .map(|o| json!({"base": o.update.base, "task": o.task, "weight": o.weight, "lora": o.update.lora_config()}))
            .collect();
        (json!({"serving": serving}), t)
    }

    fn load_state(&mut self, json: serde_json::Value, tensors: TensorMap) -> Result<()> {
        let (anchor, rest): (TensorMap, TensorMap) = tensors.into_iter().partition(|(k, _)| k.starts_with("anchor."));
        let (serving, memory): (TensorMap, TensorMap) = rest.into_iter().partition(|(k, _)| k.starts_with("serving."));
        self.memory = OrthoMemory::from_tensors(self.cfg.ortho_memory, memory)?;
        self.anchor = (!anchor.is_empty())
            .then(|| anchor.into_iter().map(|(k, v)| (k["anchor.".len()..].to_string(), v)).collect());
        self.serving = Vec::new();
        for (i, o) in json["serving"].as_array().cloned().unwrap_or_default().iter().enumerate() {
            let prefix = format!("serving.{i}.");
            let tensors: TensorMap = serving
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone())))
                .collect();
            let bad = |what: &str| Error::msg(format!("strategy state: offset {i}: expected {what}, found {}", o));
            // States written before updates stayed factored name the base by hash only.
            let base: ModelIdentity = match o["base_hash"].as_str() {
                Some(h) if o["base"].is_null() => self
                    .smalls
                    .get(h)
                    .map(|sb| sb.identity.clone())
                    .ok_or_else(|| bad("a small base the server holds"))?,
                _ => serde_json::from_value(o["base"].clone()).map_err(|_| bad("a base identity"))?,
            };
            let weight = o["weight"].as_f64().ok_or_else(|| bad("a weight"))?;
            let task = o["task"].as_str().unwrap_or_default().to_string();
            let kind = match &o["lora"] {
                serde_json::Value::Null => Delta::Full(tensors),
                l => Delta::Lora {
                    config: serde_json::from_value(l.clone()).map_err(|_| bad("a LoRA config"))?,
                    factors: tensors,
                },
            };
            self.serving.push(Offset {
                base_hash: base.weights_hash.clone(),
                task,
                update: TaskVector { base, kind },
                weight,
            });
        }
        Ok(())
    }
}

/// Diagonal (empirical) Fisher information of `ck`'s projected linear weights on `seqs`: the
/// mean over sequences of the squared gradient of the sequence's mean next-token loss.
pub fn fisher_diagonal(ck: &Checkpoint, seqs: &[Vec<u32>]) -> Result<TensorMap> {
    let mut weights = TensorMap::new();
    let mut vars = Vec::new();
    for (name, t) in &ck.weights {
        let trainable = name.ends_with(".weight") && MODULES.iter().any(|m| name.contains(m));
        if trainable {
            let v = Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?;
            weights.insert(name.clone(), v.as_tensor().clone());
            vars.push((name.clone(), v));
        } else {
            weights.insert(name.clone(), t.clone());
        }
    }
    let model = ck.arch.build(&weights, &ck.source(), None)?;
    let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
    for s in seqs {
        if s.len() < 2 {
            continue;
        }
        let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu)?;
        let lp = model.target_logprobs(&ids, &s[1..])?;
        let loss = (lp.sum_all()?.neg()? / (s.len() - 1) as f64)?;
        let grads = loss.backward()?;
        for (name, v) in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let sq = g.sqr()?;
                let next = match acc.remove(name) {
                    Some(a) => (a + sq)?,
                    None => sq,
                };
                acc.insert(name.clone(), next);
            }
        }
    }
    let n = seqs.len().max(1) as f64;
    acc.into_iter().map(|(k, t)| Ok((k, (t / n)?))).collect()
}
