//! ETHOS binary hate-speech data (`Ethos_Dataset_Binary.csv`: `;`-separated, header
//! `comment;isHate`, RFC 4180 quoting; `isHate` is the fraction of annotators who judged the
//! comment hateful, and a comment is hate iff `isHate >= 0.5`).
//!
//! Layout: `ethos/Ethos_Dataset_Binary.csv`, or the upstream repository's
//! `ethos/ethos_data/Ethos_Dataset_Binary.csv`.
//!
//! Splits (there is no official one): [`hash_split`] of the comment with
//! `held_out_mod = 5`. `test` = the comments with `sha256(normalize(comment)) % 5 == 0`, the rule
//! that made the shared copy's held-out part, so it is empty in the shared copy (809 rows) and
//! holds 189 rows in the full upstream file (998 rows); `dev` ≈ 20% of the rest (164 of the shared
//! 809: 70 hate), `train` the remainder (645: 273 hate).

use std::path::Path;

use crate::dir::{first_existing, DataDir, Dataset};
use crate::error::{Error, Result};
use crate::examples::ClassificationExample;
use crate::io::{parse_dsv, read_text};
use crate::split::{hash_split, Split};

/// Label names, index = label.
pub const ETHOS_LABELS: [&str; 2] = ["not hate", "hate"];

/// Loads one split of Ethos binary. Ids are `line-<n>`, the 1-based line of the row in the file.
pub fn load_ethos(dir: &DataDir, split: Split) -> Result<Vec<ClassificationExample>> {
    let base = dir.dataset_dir(Dataset::Ethos);
    let candidates = [base.join("Ethos_Dataset_Binary.csv"), base.join("ethos_data").join("Ethos_Dataset_Binary.csv")];
    let path = first_existing(&candidates).ok_or_else(|| dir.missing(Dataset::Ethos, candidates.to_vec()))?;
    let all = parse_ethos(&path)?;
    let n_all = all.len();
    let out: Vec<_> = all.into_iter().filter(|e| hash_split(&e.text, 5) == split).collect();
    if out.is_empty() {
        return Err(Error::MissingSplit {
            dataset: "ethos".into(),
            split: split.to_string(),
            looked_at: vec![path],
            note: format!(
                "none of its {n_all} rows falls in `{split}` under the rule sha256(normalize(comment)) % 5 == 0 -> test; \
                 the test rows are only in the full upstream file"
            ),
        });
    }
    Ok(out)
}

fn parse_ethos(path: &Path) -> Result<Vec<ClassificationExample>> {
    let text = read_text(path)?;
    let records = parse_dsv(&text, ';', path)?;
    let Some(((_, header), rows)) = records.split_first() else {
        return Err(Error::format(path, None, "expected a header `comment;isHate` and rows, found an empty file"));
    };
    if header.iter().map(|h| h.trim()).collect::<Vec<_>>() != ["comment", "isHate"] {
        return Err(Error::format(
            path,
            Some(1),
            format!("expected the header `comment;isHate`, found `{}`", header.join(";")),
        ));
    }
    rows.iter()
        .map(|(line, fields)| {
            let [comment, score] = fields.as_slice() else {
                return Err(Error::format(
                    path,
                    Some(*line),
                    format!("expected 2 fields `comment;isHate`, found {}", fields.len()),
                ));
            };
            let score: f64 = score.trim().parse().ok().filter(|s: &f64| (0.0..=1.0).contains(s)).ok_or_else(|| {
                Error::format(path, Some(*line), format!("expected isHate in [0, 1], found `{score}`"))
            })?;
            Ok(ClassificationExample {
                id: format!("line-{line}"),
                text: comment.trim().to_string(),
                label: usize::from(score >= 0.5),
                score: Some(score),
            })
        })
        .collect()
}
