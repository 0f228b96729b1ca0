//! Loaded examples, one type per task kind, before any prompt is applied.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A text with a class label (Ethos: `label` 1 = hate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationExample {
    pub id: String,
    pub text: String,
    pub label: usize,
    /// The raw annotation the label was derived from, when there is one (Ethos: the fraction of
    /// annotators who judged the comment hateful).
    pub score: Option<f64>,
}

/// A premise with alternatives, one of which is correct (COPA, XCOPA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceExample {
    pub id: String,
    pub premise: String,
    /// `"cause"` or `"effect"`: what the correct alternative is to the premise.
    pub question: String,
    pub choices: Vec<String>,
    /// Index into `choices`.
    pub label: usize,
    /// A Balanced-COPA mirrored item (same alternatives as an original item, other premise and answer).
    pub mirrored: bool,
}

/// A sentence and its translation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranslationExample {
    pub id: String,
    pub src_lang: String,
    pub tgt_lang: String,
    pub src: String,
    pub tgt: String,
}

/// A document and one or more reference summaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryExample {
    pub id: String,
    pub title: Option<String>,
    pub document: String,
    /// Never empty. SciTLDR dev papers have several; every other dataset has one.
    pub references: Vec<String>,
}

/// One line of plain text (for perplexity and language-model training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextExample {
    /// `<source>/<file>:<line>`.
    pub id: String,
    pub text: String,
}

/// The examples of one dataset split, typed by task kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "examples", rename_all = "snake_case")]
pub enum Examples {
    Classification(Vec<ClassificationExample>),
    Choice(Vec<ChoiceExample>),
    Translation(Vec<TranslationExample>),
    Summary(Vec<SummaryExample>),
    Text(Vec<TextExample>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Classification(v) => v.len(),
            Examples::Choice(v) => v.len(),
            Examples::Translation(v) => v.len(),
            Examples::Summary(v) => v.len(),
            Examples::Text(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gold label of each example for classification and choice tasks (the input of a
    /// Dirichlet label split), `None` for the others.
    pub fn labels(&self) -> Option<Vec<usize>> {
        match self {
            Examples::Classification(v) => Some(v.iter().map(|e| e.label).collect()),
            Examples::Choice(v) => Some(v.iter().map(|e| e.label).collect()),
            _ => None,
        }
    }

    /// The examples at `indices`, in that order (e.g. one client's share of a partition).
    pub fn subset(&self, indices: &[usize]) -> Result<Examples> {
        fn pick<T: Clone>(v: &[T], idx: &[usize]) -> Result<Vec<T>> {
            idx.iter()
                .map(|&i| {
                    v.get(i)
                        .cloned()
                        .ok_or_else(|| Error::config(format!("example index {i} out of range: expected < {}", v.len())))
                })
                .collect()
        }
        Ok(match self {
            Examples::Classification(v) => Examples::Classification(pick(v, indices)?),
            Examples::Choice(v) => Examples::Choice(pick(v, indices)?),
            Examples::Translation(v) => Examples::Translation(pick(v, indices)?),
            Examples::Summary(v) => Examples::Summary(pick(v, indices)?),
            Examples::Text(v) => Examples::Text(pick(v, indices)?),
        })
    }
}
