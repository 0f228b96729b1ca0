//! COPA (English, with Balanced-COPA mirrors) and XCOPA.
//!
//! **COPA** layout: `copa/copa_en.jsonl`, one SuperGLUE-like object per line:
//! `{"id", "premise", "choice1", "choice2", "question": "cause"|"effect", "label": 0|1,
//! "mirrored": bool, "original_copa_id"}` (mirrored items are Balanced-COPA ids 1001-1500 and name
//! the original item whose alternatives they share). Rows without `original_copa_id` use `id`
//! (minus 1000 for ids above 1000).
//!
//! COPA splits, by original id `g` so an original item and its mirror always fall together:
//! `test` = `g > 400` (SuperGLUE's validation items 401-500 and COPA's test items 501-1000, all
//! held out of the shared copy); `dev` = `g <= 400` and `g % 5 == 0` (the shared copy: 80 originals +
//! 80 mirrors = 160 rows); `train` = the other `g <= 400` (640 rows).
//!
//! **XCOPA** layout (the upstream repository's `data/` folder): `xcopa/<lang>/val.<lang>.jsonl`
//! (`dev`) and `xcopa/<lang>/test.<lang>.jsonl` (`test`), or the same under `xcopa/data/`; rows
//! `{"premise", "choice1", "choice2", "question", "label", "idx", "changed"}`. XCOPA has no train
//! split.

use std::path::Path;

use serde::Deserialize;

use crate::dir::{first_existing, DataDir, Dataset};
use crate::error::{Error, Result};
use crate::examples::ChoiceExample;
use crate::io::read_jsonl;
use crate::split::Split;

#[derive(Deserialize)]
struct Row {
    #[serde(alias = "idx")]
    id: u64,
    premise: String,
    choice1: String,
    choice2: String,
    question: String,
    label: usize,
    #[serde(default)]
    mirrored: bool,
    #[serde(default)]
    original_copa_id: Option<u64>,
}

const ROW_SHAPE: &str = r#"{"id" or "idx", "premise", "choice1", "choice2", "question", "label"}"#;

fn to_example(path: &Path, line: usize, r: Row) -> Result<ChoiceExample> {
    if r.question != "cause" && r.question != "effect" {
        return Err(Error::format(
            path,
            Some(line),
            format!("expected question \"cause\" or \"effect\", found {:?}", r.question),
        ));
    }
    if r.label > 1 {
        return Err(Error::format(path, Some(line), format!("expected label 0 or 1, found {}", r.label)));
    }
    Ok(ChoiceExample {
        id: r.id.to_string(),
        premise: r.premise,
        question: r.question,
        choices: vec![r.choice1, r.choice2],
        label: r.label,
        mirrored: r.mirrored,
    })
}

/// The split of a COPA item from its original COPA id (see the module docs).
pub fn copa_split(original_id: u64) -> Split {
    if original_id > 400 {
        Split::Test
    } else if original_id.is_multiple_of(5) {
        Split::Dev
    } else {
        Split::Train
    }
}

/// Loads one split of English COPA from `copa/copa_en.jsonl`.
pub fn load_copa(dir: &DataDir, split: Split) -> Result<Vec<ChoiceExample>> {
    let path = dir.dataset_dir(Dataset::Copa).join("copa_en.jsonl");
    if !path.exists() {
        return Err(dir.missing(Dataset::Copa, vec![path]));
    }
    let rows: Vec<(usize, Row)> = read_jsonl(&path, ROW_SHAPE)?;
    let n_all = rows.len();
    let mut out = Vec::new();
    for (line, r) in rows {
        let g = r.original_copa_id.unwrap_or(if r.id > 1000 { r.id - 1000 } else { r.id });
        if copa_split(g) == split {
            out.push(to_example(&path, line, r)?);
        }
    }
    if out.is_empty() {
        return Err(Error::MissingSplit {
            dataset: "copa".into(),
            split: split.to_string(),
            looked_at: vec![path],
            note: format!("none of its {n_all} rows falls in `{split}`: test = original COPA ids above 400, held out of the shared copy"),
        });
    }
    Ok(out)
}

/// Loads one split (`dev` = `val.<lang>.jsonl`, `test` = `test.<lang>.jsonl`) of XCOPA for a
/// language code such as `ta`, `et`, `zh`.
pub fn load_xcopa(dir: &DataDir, lang: &str, split: Split) -> Result<Vec<ChoiceExample>> {
    let base = dir.dataset_dir(Dataset::Xcopa);
    let roots = [base.join(lang), base.join("data").join(lang)];
    let Some(root) = first_existing(&roots) else {
        if !base.exists() {
            return Err(dir.missing(Dataset::Xcopa, roots.to_vec()));
        }
        return Err(Error::MissingLanguage {
            dataset: "xcopa".into(),
            lang: lang.into(),
            looked_at: roots.to_vec(),
            available: xcopa_languages(&base),
        });
    };
    let file = match split {
        Split::Dev => format!("val.{lang}.jsonl"),
        Split::Test => format!("test.{lang}.jsonl"),
        Split::Train => {
            return Err(Error::MissingSplit {
                dataset: "xcopa".into(),
                split: split.to_string(),
                looked_at: vec![root],
                note: "XCOPA has only val (dev) and test; train on English COPA".into(),
            })
        }
    };
    let path = root.join(file);
    if !path.exists() {
        return Err(Error::MissingSplit {
            dataset: "xcopa".into(),
            split: split.to_string(),
            looked_at: vec![path],
            note: String::new(),
        });
    }
    read_jsonl::<Row>(&path, ROW_SHAPE)?.into_iter().map(|(line, r)| to_example(&path, line, r)).collect()
}

fn xcopa_languages(base: &Path) -> Vec<String> {
    let mut langs: Vec<String> = [base.to_path_buf(), base.join("data")]
        .iter()
        .flat_map(|d| crate::io::subdirs(d))
        .filter(|n| n != "data")
        .collect();
    langs.sort();
    langs.dedup();
    langs
}
