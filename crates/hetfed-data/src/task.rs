//! Tasks as data: a [`TaskSpec`] names a dataset, a prompt template, how candidates or targets
//! are written, length limits and metric names. It turns loaded [`Examples`] into model-agnostic
//! [`Items`] for evaluation and into `{prompt, target}` pairs for fine-tuning.
//!
//! Template fields, by kind (`{{`/`}}` are literal braces):
//!
//! | kind | fields |
//! |---|---|
//! | classification | `id`, `text` |
//! | reasoning | `id`, `premise`, `premise_stem` (premise without its final `.`/`!`/`?`), `question`, `connector` (`connectors[question]`), `choice1`, `choice2`, `choice1_lc`, `choice2_lc` (first letter lowercased unless the first word is `I` or an acronym) |
//! | translation | `id`, `src`, `tgt`, `src_lang`, `tgt_lang` (codes), `src_name`, `tgt_name` (English names) |
//! | summarization | `id`, `document`, `title` (empty when absent), `summary` (the first reference) |
//! | language_modelling | `id`, `text` |
//!
//! The prompt may not use the answer (`tgt`, `summary`). Classification candidates are the
//! `label_words`, verbatim; reasoning candidates are the `choices` templates, filled per item. The
//! fine-tuning target of a choice task is the gold candidate; of other tasks the `target` template.
//!
//! Limits: `field_limits` cut a field before rendering, keeping its start (a news article keeps its
//! lede); `max_prompt` cuts the rendered prompt keeping its **end** (the instruction and the place
//! where the answer goes); `max_target` cuts fine-tuning targets and language-modelling texts
//! keeping their start. Candidates and references are never cut. Limits in tokens need a
//! [`TokenCounter`] from the caller.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::datasets::DatasetSpec;
use crate::dir::DataDir;
use crate::error::{Error, Result};
use crate::examples::{
    ChoiceExample, ClassificationExample, Examples, SummaryExample, TextExample, TranslationExample,
};
use crate::lang::english_name;
use crate::split::Split;
use crate::template::{check, placeholders, render};
use crate::truncate::{keep_end, keep_start, Length, TokenCounter};

/// What a task asks of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Pick a label word after the prompt.
    Classification,
    /// Pick the continuation (alternative) that fits the prompt.
    Reasoning,
    /// Generate a translation.
    Translation,
    /// Generate a summary.
    Summarization,
    /// Score text (perplexity).
    LanguageModelling,
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskKind::Classification => "classification",
            TaskKind::Reasoning => "reasoning",
            TaskKind::Translation => "translation",
            TaskKind::Summarization => "summarization",
            TaskKind::LanguageModelling => "language_modelling",
        })
    }
}

/// A task. Deserialised from TOML (see [`TaskRegistry::from_toml_str`]); built-in defaults come
/// from [`builtin`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub kind: TaskKind,
    pub dataset: DatasetSpec,
    /// Prompt template.
    pub prompt: String,
    /// Target template (translation, summarization, language modelling; absent for choice tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Classification: one continuation per class, index = label (Ethos: `[" no", " yes"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label_words: Vec<String>,
    /// Reasoning: one template per alternative (COPA: `[" {choice1_lc}", " {choice2_lc}"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    /// Reasoning: the word joining premise and alternative, by question (`cause`, `effect`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connectors: BTreeMap<String, String>,
    /// Per-field limits applied before rendering (keep the start of the field).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_limits: BTreeMap<String, Length>,
    /// Limit of the rendered prompt (keeps its end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt: Option<Length>,
    /// Limit of fine-tuning targets and language-modelling texts (keeps their start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_target: Option<Length>,
    /// Names of the metrics to report (`accuracy`, `macro_f1`, `bleu`, `chrf`, `rouge1`, `rouge2`,
    /// `rougeL`, `perplexity`, ...); computing them is another crate's job.
    pub metrics: Vec<String>,
}

/// Names of the built-in tasks (parameterised ones with a placeholder).
pub const BUILTIN_TASKS: &[&str] = &[
    "ethos",
    "copa",
    "xcopa:<lang>",
    "flores:<src>-<tgt>",
    "tico:<src>-<tgt>",
    "in22-gen:<src>-<tgt>",
    "in22-conv:<src>-<tgt>",
    "xlsum:<lang>",
    "ilsum",
    "scitldr",
    "bbc",
    "mltext:<lang>[@<source>,...]",
];

/// The built-in task for a name of [`BUILTIN_TASKS`]; its `name` is the canonical dataset string
/// (`flores:en-hi` → `flores:eng_Latn-hin_Deva`). Defaults:
///
/// | task | prompt | candidates / target | metrics |
/// |---|---|---|---|
/// | `ethos` | `Comment: {text}\nIs this comment hateful?` | `" no"`, `" yes"` | accuracy, macro_f1 |
/// | `copa`, `xcopa:<lang>` | `{premise_stem} {connector}` (cause → `because`, effect → `so`) | `" {choice1_lc}"`, `" {choice2_lc}"` | accuracy |
/// | `flores:`, `tico:`, `in22-*:` | `Translate {src_name} to {tgt_name}.\n{src_name}: {src}\n{tgt_name}:` | `" {tgt}"` | bleu, chrf |
/// | `xlsum:<lang>`, `ilsum`, `bbc` | `Article: {document}\nSummary:` (document cut to 3000 chars) | `" {summary}"` | rouge1, rouge2, rougeL |
/// | `scitldr` | `Abstract: {document}\nTL;DR:` | `" {summary}"` | rouge1, rouge2, rougeL |
/// | `mltext:<lang>` | empty | `{text}` | perplexity |
///
/// Prompts are in English for every language; XCOPA keeps the English connectors (override
/// `connectors` and `prompt` in TOML for a monolingual prompt).
pub fn builtin(name: &str) -> Result<TaskSpec> {
    let dataset: DatasetSpec = name.parse().map_err(|e| Error::config(format!("unknown task `{name}`: {e}")))?;
    let s = |x: &str| x.to_string();
    let metrics = |m: &[&str]| m.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let base = TaskSpec {
        name: dataset.to_string(),
        kind: dataset.kind(),
        dataset: dataset.clone(),
        prompt: String::new(),
        target: None,
        label_words: Vec::new(),
        choices: Vec::new(),
        connectors: BTreeMap::new(),
        field_limits: BTreeMap::new(),
        max_prompt: None,
        max_target: None,
        metrics: Vec::new(),
    };
    let summary_limits = BTreeMap::from([(s("document"), Length::Chars(3000))]);
    let spec = match dataset.kind() {
        TaskKind::Classification => TaskSpec {
            prompt: s("Comment: {text}\nIs this comment hateful?"),
            label_words: vec![s(" no"), s(" yes")],
            metrics: metrics(&["accuracy", "macro_f1"]),
            ..base
        },
        TaskKind::Reasoning => TaskSpec {
            prompt: s("{premise_stem} {connector}"),
            choices: vec![s(" {choice1_lc}"), s(" {choice2_lc}")],
            connectors: BTreeMap::from([(s("cause"), s("because")), (s("effect"), s("so"))]),
            metrics: metrics(&["accuracy"]),
            ..base
        },
        TaskKind::Translation => TaskSpec {
            prompt: s("Translate {src_name} to {tgt_name}.\n{src_name}: {src}\n{tgt_name}:"),
            target: Some(s(" {tgt}")),
            metrics: metrics(&["bleu", "chrf"]),
            ..base
        },
        TaskKind::Summarization if dataset == DatasetSpec::SciTldr => TaskSpec {
            prompt: s("Abstract: {document}\nTL;DR:"),
            target: Some(s(" {summary}")),
            metrics: metrics(&["rouge1", "rouge2", "rougeL"]),
            ..base
        },
        TaskKind::Summarization => TaskSpec {
            prompt: s("Article: {document}\nSummary:"),
            target: Some(s(" {summary}")),
            field_limits: summary_limits,
            metrics: metrics(&["rouge1", "rouge2", "rougeL"]),
            ..base
        },
        TaskKind::LanguageModelling => {
            TaskSpec { prompt: String::new(), target: Some(s("{text}")), metrics: metrics(&["perplexity"]), ..base }
        }
    };
    spec.validate()?;
    Ok(spec)
}

/// A piece of a task's example format ([`TaskSpec::skeleton`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemplatePart {
    /// Literal text every example has.
    Text(String),
    /// An example's field (a document, a summary, a source sentence).
    Field(String),
}

/// A classification or reasoning item: score each candidate continuation after the prompt and
/// compare the best with `gold`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceItem {
    pub id: String,
    pub prompt: String,
    pub candidates: Vec<String>,
    pub gold: usize,
}

/// A generation item: generate after the prompt and compare with every reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationItem {
    pub id: String,
    pub prompt: String,
    pub references: Vec<String>,
    /// The first reference rendered by the task's target template, exactly as fine-tuning sees
    /// it (what target NLL scores after the prompt).
    #[serde(default)]
    pub target: String,
}

/// A language-modelling item: score `text` after `prompt` (usually empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmItem {
    pub id: String,
    pub prompt: String,
    pub text: String,
}

/// Model-agnostic evaluation items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "items", rename_all = "snake_case")]
pub enum Items {
    Choice(Vec<ChoiceItem>),
    Generation(Vec<GenerationItem>),
    Lm(Vec<LmItem>),
}

impl Items {
    pub fn len(&self) -> usize {
        match self {
            Items::Choice(v) => v.len(),
            Items::Generation(v) => v.len(),
            Items::Lm(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A fine-tuning pair; serialises as `{"prompt", "target"}`, the line format of hetfed-train's
/// `Example` (loss on the target only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTarget {
    pub prompt: String,
    pub target: String,
}

/// Writes pairs as JSONL, atomically (temporary file + rename).
pub fn write_prompt_target_jsonl(path: &Path, pairs: &[PromptTarget]) -> Result<()> {
    let mut out = String::new();
    for p in pairs {
        out.push_str(
            &serde_json::to_string(p).map_err(|e| Error::config(format!("serialising a prompt/target pair: {e}")))?,
        );
        out.push('\n');
    }
    hetfed_core::write_atomic(path, out.as_bytes()).map_err(|e| match e {
        hetfed_core::Error::Io { path, source } => Error::Io { path, source },
        other => Error::config(other.to_string()),
    })
}

/// Fields a template may use for a kind of task with `n_choices` alternatives.
fn known_fields(kind: TaskKind, n_choices: usize) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match kind {
        TaskKind::Classification | TaskKind::LanguageModelling => s(&["id", "text"]),
        TaskKind::Reasoning => {
            let mut f = s(&["id", "premise", "premise_stem", "question", "connector"]);
            for i in 1..=n_choices {
                f.push(format!("choice{i}"));
                f.push(format!("choice{i}_lc"));
            }
            f
        }
        TaskKind::Translation => s(&["id", "src", "tgt", "src_lang", "tgt_lang", "src_name", "tgt_name"]),
        TaskKind::Summarization => s(&["id", "document", "title", "summary"]),
    }
}

/// Fields that hold the answer, which a prompt must not show.
const ANSWER_FIELDS: &[&str] = &["tgt", "summary"];

impl TaskSpec {
    /// The task's example format as the server knows it without any example: the prompt
    /// template then the target template, cut into literal text and example fields, with the
    /// task-level fields filled in (a translation's language names and codes). `Article:
    /// {document}\nSummary:` + ` {summary}` gives `[Text("Article: "), Field("document"),
    /// Text("\nSummary:"), Field("summary")]` (a target's leading space goes with its field).
    /// The server defines its tasks, so it may sample synthetic examples in this shape from a
    /// model, with no client data.
    pub fn skeleton(&self) -> Vec<TemplatePart> {
        let langs = match &self.dataset {
            DatasetSpec::Flores { src, tgt } | DatasetSpec::Tico { src, tgt } | DatasetSpec::In22 { src, tgt, .. } => {
                Some((src.clone(), tgt.clone()))
            }
            _ => None,
        };
        let fixed = |k: &str| -> Option<String> {
            let (src, tgt) = langs.as_ref()?;
            Some(match k {
                "src_name" => crate::lang::english_name(src),
                "tgt_name" => crate::lang::english_name(tgt),
                "src_lang" => src.clone(),
                "tgt_lang" => tgt.clone(),
                _ => return None,
            })
        };
        let mut parts: Vec<TemplatePart> = Vec::new();
        let mut text = String::new();
        let target = self.target.as_deref().map(|t| t.trim_start()).unwrap_or_default();
        for template in [self.prompt.as_str(), target] {
            let mut rest = template;
            while let Some(open) = rest.find('{') {
                text.push_str(&rest[..open]);
                let Some(close) = rest[open..].find('}') else { break };
                let name = &rest[open + 1..open + close];
                match fixed(name) {
                    Some(v) => text.push_str(&v),
                    None => {
                        if !text.trim().is_empty() {
                            parts.push(TemplatePart::Text(std::mem::take(&mut text)));
                        }
                        text.clear();
                        parts.push(TemplatePart::Field(name.to_string()));
                    }
                }
                rest = &rest[open + close + 1..];
            }
            text.push_str(rest);
        }
        if !text.trim().is_empty() {
            parts.push(TemplatePart::Text(text));
        }
        parts
    }

    /// Checks that the spec is coherent: kind fits the dataset, templates use known fields, the
    /// candidates fit the dataset's classes or alternatives, limits are positive.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Error::config(format!("task `{}`: {msg}", self.name));
        if self.name.trim().is_empty() {
            return Err(Error::config("task with an empty name"));
        }
        if self.kind != self.dataset.kind() {
            return Err(bad(format!(
                "kind `{}` does not fit dataset `{}`, whose examples are for `{}`",
                self.kind,
                self.dataset,
                self.dataset.kind()
            )));
        }
        let n_choices = self.dataset.n_choices().unwrap_or(0);
        let fields = known_fields(self.kind, n_choices);
        let known: Vec<&str> = fields.iter().map(String::as_str).collect();
        let ctx = |what: &str| format!("task `{}`: {what}", self.name);
        check(&self.prompt, &known, &ctx("prompt"))?;
        if let Some(f) = placeholders(&self.prompt)?.into_iter().find(|f| ANSWER_FIELDS.contains(&f.as_str())) {
            return Err(bad(format!("the prompt uses `{{{f}}}`, which is the answer")));
        }
        let is_choice = matches!(self.kind, TaskKind::Classification | TaskKind::Reasoning);
        match (&self.target, is_choice) {
            (Some(_), true) => {
                return Err(bad(
                    "`target` is not used by choice tasks: the target is the gold label word or choice".into()
                ))
            }
            (None, false) => return Err(bad(format!("a {} task needs a `target` template", self.kind))),
            (Some(t), false) => check(t, &known, &ctx("target"))?,
            (None, true) => {}
        }
        if self.kind == TaskKind::Classification {
            let classes = self.dataset.class_names().unwrap_or_default();
            if self.label_words.len() != classes.len() {
                return Err(bad(format!(
                    "expected {} label words (for {}), found {}",
                    classes.len(),
                    classes.join(", "),
                    self.label_words.len()
                )));
            }
            let mut seen = self.label_words.clone();
            seen.sort();
            seen.dedup();
            if seen.len() != self.label_words.len() || self.label_words.iter().any(|w| w.is_empty()) {
                return Err(bad(format!("label words must be distinct and non-empty, found {:?}", self.label_words)));
            }
        } else if !self.label_words.is_empty() {
            return Err(bad(format!("`label_words` are for classification tasks, not {}", self.kind)));
        }
        if self.kind == TaskKind::Reasoning {
            if self.choices.len() != n_choices {
                return Err(bad(format!("expected {n_choices} `choices` templates, found {}", self.choices.len())));
            }
            for c in &self.choices {
                check(c, &known, &ctx("choice"))?;
            }
            let uses_connector = std::iter::once(&self.prompt)
                .chain(&self.choices)
                .map(|t| placeholders(t))
                .collect::<Result<Vec<_>>>()?
                .iter()
                .any(|f| f.iter().any(|n| n == "connector"));
            if uses_connector {
                for q in ["cause", "effect"] {
                    if !self.connectors.contains_key(q) {
                        return Err(bad(format!("templates use `{{connector}}` but `connectors` has no `{q}`")));
                    }
                }
            }
        } else if !self.choices.is_empty() || !self.connectors.is_empty() {
            return Err(bad(format!("`choices` and `connectors` are for reasoning tasks, not {}", self.kind)));
        }
        for (f, l) in &self.field_limits {
            if !known.contains(&f.as_str()) {
                return Err(bad(format!("`field_limits` names `{f}`: expected one of {}", known.join(", "))));
            }
            check_len(l, &format!("field_limits.{f}")).map_err(bad)?;
        }
        for (what, l) in [("max_prompt", &self.max_prompt), ("max_target", &self.max_target)] {
            if let Some(l) = l {
                check_len(l, what).map_err(bad)?;
            }
        }
        if self.metrics.is_empty() || self.metrics.iter().any(|m| m.trim().is_empty()) {
            return Err(bad("expected at least one metric name, and no empty ones".into()));
        }
        Ok(())
    }

    /// Parses one spec from TOML: the keys of [`TaskSpec`], plus an optional `base = "<built-in
    /// task>"` whose values the others override (then `name` defaults to the base's).
    pub fn from_toml_str(text: &str) -> Result<TaskSpec> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| Error::config(format!("task spec: {}", toml_error(&e, Some(text)))))?;
        spec_from_table(None, table)
    }

    /// The spec as TOML (e.g. to start a custom task from a built-in one).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::config(format!("task `{}`: serialising to TOML: {e}", self.name)))
    }

    /// Loads one split of the task's dataset.
    pub fn load(&self, dir: &DataDir, split: Split) -> Result<Examples> {
        self.dataset.load(dir, split)
    }

    /// Evaluation items: classification and reasoning → [`ChoiceItem`]s, translation and
    /// summarization → [`GenerationItem`]s, language modelling → [`LmItem`]s.
    pub fn to_items(&self, examples: &Examples, counter: Option<&dyn TokenCounter>) -> Result<Items> {
        self.validate()?;
        let r = Renderer { spec: self, counter };
        Ok(match (self.kind, examples) {
            (TaskKind::Classification, Examples::Classification(v)) => {
                Items::Choice(v.iter().map(|e| r.classification(e)).collect::<Result<_>>()?)
            }
            (TaskKind::Reasoning, Examples::Choice(v)) => {
                Items::Choice(v.iter().map(|e| r.reasoning(e)).collect::<Result<_>>()?)
            }
            (TaskKind::Translation, Examples::Translation(v)) => Items::Generation(
                v.iter()
                    .map(|e| {
                        let look = |k: &str| translation_field(e, k);
                        Ok(GenerationItem {
                            id: e.id.clone(),
                            prompt: r.prompt(&look)?,
                            references: vec![e.tgt.trim().to_string()],
                            target: r.target(&look)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            (TaskKind::Summarization, Examples::Summary(v)) => Items::Generation(
                v.iter()
                    .map(|e| {
                        let look = |k: &str| summary_field(e, k);
                        Ok(GenerationItem {
                            id: e.id.clone(),
                            prompt: r.prompt(&look)?,
                            references: e.references.clone(),
                            target: r.target(&look)?,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            (TaskKind::LanguageModelling, Examples::Text(v)) => Items::Lm(
                v.iter()
                    .map(|e| {
                        Ok(LmItem {
                            id: e.id.clone(),
                            prompt: r.prompt(&|k| text_field(e, k))?,
                            text: r.target(&|k| text_field(e, k))?,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => return Err(self.mismatch(examples)),
        })
    }

    /// Fine-tuning pairs, one per example: the prompt, and the gold candidate (choice tasks) or
    /// the filled `target` template (others; summaries use their first reference).
    pub fn to_prompt_target(
        &self,
        examples: &Examples,
        counter: Option<&dyn TokenCounter>,
    ) -> Result<Vec<PromptTarget>> {
        self.validate()?;
        let r = Renderer { spec: self, counter };
        let cut = |t: String| -> Result<String> {
            Ok(match self.max_target {
                Some(l) => keep_start(&t, l, counter)?.to_string(),
                None => t,
            })
        };
        match (self.kind, examples) {
            (TaskKind::Classification | TaskKind::Reasoning, Examples::Classification(_) | Examples::Choice(_)) => {
                let Items::Choice(items) = self.to_items(examples, counter)? else {
                    unreachable!("choice kinds give choice items")
                };
                items
                    .into_iter()
                    .map(|it| Ok(PromptTarget { target: cut(it.candidates[it.gold].clone())?, prompt: it.prompt }))
                    .collect()
            }
            (TaskKind::Translation, Examples::Translation(v)) => {
                v.iter().map(|e| r.pair(&|k| translation_field(e, k))).collect()
            }
            (TaskKind::Summarization, Examples::Summary(v)) => {
                v.iter().map(|e| r.pair(&|k| summary_field(e, k))).collect()
            }
            (TaskKind::LanguageModelling, Examples::Text(v)) => {
                v.iter().map(|e| r.pair(&|k| text_field(e, k))).collect()
            }
            _ => Err(self.mismatch(examples)),
        }
    }

    fn mismatch(&self, examples: &Examples) -> Error {
        let found = match examples {
            Examples::Classification(_) => "classification",
            Examples::Choice(_) => "choice (reasoning)",
            Examples::Translation(_) => "translation",
            Examples::Summary(_) => "summarization",
            Examples::Text(_) => "text (language modelling)",
        };
        Error::config(format!("task `{}` ({}) was given {found} examples", self.name, self.kind))
    }
}

fn check_len(l: &Length, what: &str) -> std::result::Result<(), String> {
    match l {
        Length::Chars(0) | Length::Tokens(0) => Err(format!("`{what}` must be positive, found 0")),
        _ => Ok(()),
    }
}

/// A TOML error on one line: `line L: message` (the crate's errors are single lines).
fn toml_error(e: &toml::de::Error, text: Option<&str>) -> String {
    let flat = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    match (text, e.span()) {
        (Some(t), Some(span)) => {
            format!("line {}: {}", t[..span.start.min(t.len())].matches('\n').count() + 1, flat(e.message()))
        }
        // Without source text the display is the message plus the key path (`in `max_prompt``).
        _ => flat(&e.to_string()),
    }
}

fn spec_from_table(name: Option<&str>, mut table: toml::Table) -> Result<TaskSpec> {
    let label = name.map_or_else(|| "task spec".to_string(), |n| format!("task `{n}`"));
    let mut merged = match table.remove("base") {
        Some(toml::Value::String(b)) => {
            toml::Table::try_from(builtin(&b)?).map_err(|e| Error::config(format!("{label}: base `{b}`: {e}")))?
        }
        Some(other) => {
            return Err(Error::config(format!(
                "{label}: expected `base` to be a built-in task name string, found {other}"
            )))
        }
        None => toml::Table::new(),
    };
    merged.extend(table);
    if let Some(n) = name {
        merged.insert("name".into(), toml::Value::String(n.to_string()));
    }
    let spec: TaskSpec = toml::Value::Table(merged)
        .try_into()
        .map_err(|e| Error::config(format!("{label}: {}", toml_error(&e, None))))?;
    spec.validate()?;
    Ok(spec)
}

/// Built-in tasks plus custom ones from TOML.
///
/// ```toml
/// [tasks.ethos-short]            # a built-in task with overrides
/// base = "ethos"
/// max_prompt = { chars = 500 }
///
/// [tasks.copa-then]              # a task from scratch
/// kind = "reasoning"
/// dataset = "copa"
/// prompt = "{premise_stem} {connector}"
/// choices = [" {choice1_lc}", " {choice2_lc}"]
/// connectors = { cause = "because", effect = "then" }
/// metrics = ["accuracy"]
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskRegistry {
    custom: BTreeMap<String, TaskSpec>,
}

impl TaskRegistry {
    /// Only the built-in tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Built-in tasks plus the `[tasks.<name>]` tables of a TOML document; a custom task may
    /// shadow a built-in name.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            tasks: BTreeMap<String, toml::Table>,
        }
        let file: File = toml::from_str(text)
            .map_err(|e| Error::config(format!("task registry: {}", toml_error(&e, Some(text)))))?;
        let mut reg = Self::new();
        for (name, table) in file.tasks {
            reg.custom.insert(name.clone(), spec_from_table(Some(&name), table)?);
        }
        Ok(reg)
    }

    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = crate::io::read_text(path)?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::Config(m) => Error::format(path, None, m),
            other => other,
        })
    }

    /// Adds (or replaces) a custom task after validating it.
    pub fn insert(&mut self, spec: TaskSpec) -> Result<()> {
        spec.validate()?;
        self.custom.insert(spec.name.clone(), spec);
        Ok(())
    }

    /// A custom task by name, else a built-in one.
    pub fn get(&self, name: &str) -> Result<TaskSpec> {
        if let Some(s) = self.custom.get(name) {
            return Ok(s.clone());
        }
        builtin(name).map_err(|e| {
            if self.custom.is_empty() {
                e
            } else {
                Error::config(format!(
                    "{e} (custom tasks: {})",
                    self.custom.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }
        })
    }

    /// Custom task names followed by the built-in name patterns.
    pub fn names(&self) -> Vec<String> {
        self.custom.keys().cloned().chain(BUILTIN_TASKS.iter().map(|s| s.to_string())).collect()
    }
}

struct Renderer<'a> {
    spec: &'a TaskSpec,
    counter: Option<&'a dyn TokenCounter>,
}

type Lookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

impl Renderer<'_> {
    /// A field value after its `field_limits` entry.
    fn field(&self, look: &Lookup<'_>, k: &str) -> Result<Option<String>> {
        let Some(v) = look(k) else { return Ok(None) };
        Ok(Some(match self.spec.field_limits.get(k) {
            Some(&l) => keep_start(&v, l, self.counter)?.to_string(),
            None => v,
        }))
    }

    fn fill(&self, template: &str, look: &Lookup<'_>) -> Result<String> {
        // Resolve fields first so a limit error is reported rather than swallowed.
        let mut values = BTreeMap::new();
        for k in placeholders(template)? {
            if let Some(v) = self.field(look, &k)? {
                values.insert(k, v);
            }
        }
        render(template, |k| values.get(k).cloned())
    }

    fn prompt(&self, look: &Lookup<'_>) -> Result<String> {
        let p = self.fill(&self.spec.prompt, look)?;
        Ok(match self.spec.max_prompt {
            Some(l) => keep_end(&p, l, self.counter)?.to_string(),
            None => p,
        })
    }

    fn target(&self, look: &Lookup<'_>) -> Result<String> {
        let t = self.fill(self.spec.target.as_deref().unwrap_or_default(), look)?;
        Ok(match self.spec.max_target {
            Some(l) => keep_start(&t, l, self.counter)?.to_string(),
            None => t,
        })
    }

    fn pair(&self, look: &Lookup<'_>) -> Result<PromptTarget> {
        Ok(PromptTarget { prompt: self.prompt(look)?, target: self.target(look)? })
    }

    fn classification(&self, e: &ClassificationExample) -> Result<ChoiceItem> {
        let n = self.spec.label_words.len();
        if e.label >= n {
            return Err(Error::config(format!(
                "task `{}`: example {} has label {}, expected < {n}",
                self.spec.name, e.id, e.label
            )));
        }
        Ok(ChoiceItem {
            id: e.id.clone(),
            prompt: self.prompt(&|k| classification_field(e, k))?,
            candidates: self.spec.label_words.clone(),
            gold: e.label,
        })
    }

    fn reasoning(&self, e: &ChoiceExample) -> Result<ChoiceItem> {
        let look = |k: &str| choice_field(e, &self.spec.connectors, k);
        if e.choices.len() != self.spec.choices.len() || e.label >= e.choices.len() {
            return Err(Error::config(format!(
                "task `{}`: example {} has {} alternatives and label {}, expected {} alternatives",
                self.spec.name,
                e.id,
                e.choices.len(),
                e.label,
                self.spec.choices.len()
            )));
        }
        Ok(ChoiceItem {
            id: e.id.clone(),
            prompt: self.prompt(&look)?,
            candidates: self.spec.choices.iter().map(|c| self.fill(c, &look)).collect::<Result<_>>()?,
            gold: e.label,
        })
    }
}

fn classification_field(e: &ClassificationExample, k: &str) -> Option<String> {
    match k {
        "id" => Some(e.id.clone()),
        "text" => Some(e.text.clone()),
        _ => None,
    }
}

fn text_field(e: &TextExample, k: &str) -> Option<String> {
    match k {
        "id" => Some(e.id.clone()),
        "text" => Some(e.text.clone()),
        _ => None,
    }
}

fn translation_field(e: &TranslationExample, k: &str) -> Option<String> {
    Some(match k {
        "id" => e.id.clone(),
        "src" => e.src.trim().to_string(),
        "tgt" => e.tgt.trim().to_string(),
        "src_lang" => e.src_lang.clone(),
        "tgt_lang" => e.tgt_lang.clone(),
        "src_name" => english_name(&e.src_lang),
        "tgt_name" => english_name(&e.tgt_lang),
        _ => return None,
    })
}

fn summary_field(e: &SummaryExample, k: &str) -> Option<String> {
    Some(match k {
        "id" => e.id.clone(),
        "document" => e.document.clone(),
        "title" => e.title.clone().unwrap_or_default(),
        "summary" => e.references.first().cloned().unwrap_or_default(),
        _ => return None,
    })
}

fn choice_field(e: &ChoiceExample, connectors: &BTreeMap<String, String>, k: &str) -> Option<String> {
    match k {
        "id" => Some(e.id.clone()),
        "premise" => Some(e.premise.trim().to_string()),
        "premise_stem" => Some(e.premise.trim().trim_end_matches(['.', '!', '?', '।', '。']).trim_end().to_string()),
        "question" => Some(e.question.clone()),
        "connector" => connectors.get(&e.question).cloned(),
        _ => {
            let rest = k.strip_prefix("choice")?;
            let (num, lc) = match rest.strip_suffix("_lc") {
                Some(n) => (n, true),
                None => (rest, false),
            };
            let i: usize = num.parse().ok()?;
            let c = e.choices.get(i.checked_sub(1)?)?.trim();
            Some(if lc { lower_first(c) } else { c.to_string() })
        }
    }
}

/// Lowercases the first letter, except for the pronoun `I` and words whose second letter is
/// uppercase (acronyms).
fn lower_first(s: &str) -> String {
    let first_word = s.split_whitespace().next().unwrap_or_default();
    let mut chars = first_word.chars();
    let (Some(c0), c1) = (chars.next(), chars.next()) else { return s.to_string() };
    if first_word == "I" || first_word.starts_with("I'") || c1.is_some_and(char::is_uppercase) {
        return s.to_string();
    }
    let mut out: String = c0.to_lowercase().collect();
    out.push_str(&s[c0.len_utf8()..]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn skeleton_splits_a_template_into_text_and_fields() {
        use TemplatePart::{Field, Text};
        let t = |s: &str| Text(s.to_string());
        let f = |s: &str| Field(s.to_string());
        assert_eq!(builtin("bbc").unwrap().skeleton(), [t("Article: "), f("document"), t("\nSummary:"), f("summary")]);
        assert_eq!(
            builtin("tico:en-hi").unwrap().skeleton(),
            [t("Translate English to Hindi.\nEnglish: "), f("src"), t("\nHindi:"), f("tgt")]
        );
        assert_eq!(builtin("ethos").unwrap().skeleton(), [t("Comment: "), f("text"), t("\nIs this comment hateful?")]);
    }

    use super::*;

    #[test]
    fn lower_first_keeps_i_and_acronyms() {
        assert_eq!(lower_first("The sun was rising."), "the sun was rising.");
        assert_eq!(lower_first("I ate."), "I ate.");
        assert_eq!(lower_first("I'm late."), "I'm late.");
        assert_eq!(lower_first("NASA called."), "NASA called.");
        assert_eq!(lower_first("Éric left."), "éric left.");
    }

    #[test]
    fn every_builtin_validates_and_round_trips_through_toml() {
        for name in [
            "ethos",
            "copa",
            "xcopa:ta",
            "flores:en-hi",
            "tico:en-ta",
            "in22-gen:eng_Latn-ben_Beng",
            "xlsum:hindi",
            "ilsum",
            "scitldr",
            "bbc",
            "mltext:hi",
        ] {
            let spec = builtin(name).unwrap();
            let text = spec.to_toml_string().unwrap();
            assert_eq!(TaskSpec::from_toml_str(&text).unwrap(), spec, "{text}");
        }
    }
}
