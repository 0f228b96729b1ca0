//! Summarization: XL-Sum, ILSUM Hindi (extract), SciTLDR-A, BBC News Summary.
//!
//! **XL-Sum** (official v2.0 layout): `xlsum/<language>_{train,val,test}.jsonl`, rows
//! `{"id", "url", "title", "summary", "text"}`; `<language>` is XL-Sum's name (`hindi`), and ISO or
//! FLORES codes are mapped to it. Official splits (`dev` = `val`).
//!
//! **ILSUM Hindi** (extract): `ilsum_hindi_extract/ilsum_hindi_val_bm25extract.jsonl`, rows
//! `{"id", "heading", "article_extract" (or "article"), "summary"}`. The file is the source
//! repository's "val" part; this crate cuts it into `train` and `dev` (`dev` iff
//! `sha256(normalize(article)) % 5 == 0`: 210 of 1061). `test` = the repository's "test" part,
//! `ilsum_hindi_test_bm25extract.jsonl`, when present (held out of the shared copy).
//!
//! **SciTLDR-A**: `scitldr/scitldr_a_{train,dev,test}.jsonl`, or the upstream
//! `scitldr/SciTLDR-Data/SciTLDR-A/{train,dev,test}.jsonl` (also without `SciTLDR-Data/`); rows
//! `{"paper_id", "source": [sentences], "target": [TLDRs], "title", ...}`. The document is the
//! abstract's sentences joined by spaces; every TLDR is a reference (dev/test papers have several).
//!
//! **BBC News Summary**: `bbc_news_summary/bbc_news_summary_{train,test}.jsonl` (whichever exist),
//! rows `{"id", "category", "title", "article", "summary"}`, or the Kaggle folders
//! `bbc_news_summary/[BBC News Summary/]{News Articles,Summaries}/<category>/<NNN>.txt` (title =
//! first line of the article file, article = the rest; files not in UTF-8 are read as cp1252).
//! No official split: [`hash_split`] of `title + " " + article` with `held_out_mod = 10`, so `test`
//! is the PROVENANCE held-out rule (`% 10 == 0`, empty in the shared copy), `dev` ≈ 20% of the
//! rest (400 of the shared 1993), `train` the remainder (1593). Hashing the text keeps the
//! corpus's duplicate articles on one side.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dir::{first_existing, DataDir, Dataset};
use crate::error::{Error, Result};
use crate::examples::SummaryExample;
use crate::io::read_jsonl;
use crate::lang::xlsum_name;
use crate::split::{hash_mod, hash_split, Split};

fn missing_split(dataset: &str, split: Split, looked_at: Vec<PathBuf>, note: impl Into<String>) -> Error {
    Error::MissingSplit { dataset: dataset.into(), split: split.to_string(), looked_at, note: note.into() }
}

fn non_empty(path: &Path, line: usize, what: &str, s: String) -> Result<String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(Error::format(path, Some(line), format!("expected a non-empty {what}, found an empty string")));
    }
    Ok(t.to_string())
}

#[derive(Deserialize)]
struct XlSumRow {
    id: String,
    #[serde(default)]
    title: Option<String>,
    summary: String,
    text: String,
}

/// One split of XL-Sum for a language (`hindi`, `hi` or `hin_Deva`).
pub fn load_xlsum(dir: &DataDir, lang: &str, split: Split) -> Result<Vec<SummaryExample>> {
    let name = xlsum_name(lang);
    let base = dir.dataset_dir(Dataset::XlSum);
    let file = |s: &str| base.join(format!("{name}_{s}.jsonl"));
    let path = file(match split {
        Split::Train => "train",
        Split::Dev => "val",
        Split::Test => "test",
    });
    if !path.exists() {
        if !base.exists() {
            return Err(dir.missing(Dataset::XlSum, vec![path]));
        }
        if ["train", "val", "test"].iter().any(|s| file(s).exists()) {
            return Err(missing_split("xlsum", split, vec![path], ""));
        }
        let mut available: Vec<String> = std::fs::read_dir(&base)
            .map(|rd| {
                rd.filter_map(|e| {
                    let n = e.ok()?.file_name().to_str()?.to_string();
                    ["_train.jsonl", "_val.jsonl", "_test.jsonl"]
                        .iter()
                        .find_map(|s| n.strip_suffix(s))
                        .map(str::to_string)
                })
                .collect()
            })
            .unwrap_or_default();
        available.sort();
        available.dedup();
        return Err(Error::MissingLanguage { dataset: "xlsum".into(), lang: name, looked_at: vec![path], available });
    }
    read_jsonl::<XlSumRow>(&path, r#"{"id", "url", "title", "summary", "text"}"#)?
        .into_iter()
        .map(|(line, r)| {
            Ok(SummaryExample {
                id: r.id,
                title: r.title.filter(|t| !t.trim().is_empty()),
                document: non_empty(&path, line, "text", r.text)?,
                references: vec![non_empty(&path, line, "summary", r.summary)?],
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct IlsumRow {
    id: String,
    #[serde(default, alias = "Heading")]
    heading: Option<String>,
    #[serde(alias = "article", alias = "Article")]
    article_extract: String,
    #[serde(alias = "Summary")]
    summary: String,
}

/// One split of ILSUM Hindi (extract); see the module docs for the split rule.
pub fn load_ilsum(dir: &DataDir, split: Split) -> Result<Vec<SummaryExample>> {
    let base = dir.dataset_dir(Dataset::Ilsum);
    let val = base.join("ilsum_hindi_val_bm25extract.jsonl");
    let test = base.join("ilsum_hindi_test_bm25extract.jsonl");
    let path = if split == Split::Test { &test } else { &val };
    if !path.exists() {
        if !val.exists() && !test.exists() {
            return Err(dir.missing(Dataset::Ilsum, vec![path.clone()]));
        }
        return Err(missing_split(
            "ilsum",
            split,
            vec![path.clone()],
            if split == Split::Test { "the repository's test part is held out of the shared copy" } else { "" },
        ));
    }
    let rows = read_jsonl::<IlsumRow>(path, r#"{"id", "heading", "article_extract", "summary"}"#)?;
    let mut out = Vec::new();
    for (line, r) in rows {
        let in_split = split == Split::Test || (hash_mod(&r.article_extract, 5) == 0) == (split == Split::Dev);
        if in_split {
            out.push(SummaryExample {
                id: r.id,
                title: r.heading.filter(|t| !t.trim().is_empty()),
                document: non_empty(path, line, "article_extract", r.article_extract)?,
                references: vec![non_empty(path, line, "summary", r.summary)?],
            });
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct SciTldrRow {
    paper_id: String,
    source: Vec<String>,
    target: Vec<String>,
    #[serde(default)]
    title: Option<String>,
}

/// One split of SciTLDR-A (abstract → one-sentence TLDR), with every reference TLDR.
pub fn load_scitldr(dir: &DataDir, split: Split) -> Result<Vec<SummaryExample>> {
    let base = dir.dataset_dir(Dataset::SciTldr);
    let candidates = |s: Split| {
        let s = s.as_str();
        [
            base.join(format!("scitldr_a_{s}.jsonl")),
            base.join("SciTLDR-Data").join("SciTLDR-A").join(format!("{s}.jsonl")),
            base.join("SciTLDR-A").join(format!("{s}.jsonl")),
        ]
    };
    let Some(path) = first_existing(&candidates(split)) else {
        if Split::ALL.iter().any(|&s| first_existing(&candidates(s)).is_some()) {
            return Err(missing_split("scitldr", split, candidates(split).to_vec(), ""));
        }
        return Err(dir.missing(Dataset::SciTldr, candidates(split).to_vec()));
    };
    read_jsonl::<SciTldrRow>(&path, r#"{"paper_id", "source": [..], "target": [..], "title"}"#)?
        .into_iter()
        .map(|(line, r)| {
            let references: Vec<String> =
                r.target.iter().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
            if references.is_empty() {
                return Err(Error::format(
                    &path,
                    Some(line),
                    "expected at least one non-empty TLDR in `target`, found none",
                ));
            }
            Ok(SummaryExample {
                id: r.paper_id,
                title: r.title.filter(|t| !t.trim().is_empty()),
                document: non_empty(
                    &path,
                    line,
                    "source",
                    r.source.iter().map(|s| s.trim()).collect::<Vec<_>>().join(" "),
                )?,
                references,
            })
        })
        .collect()
}

#[derive(Deserialize)]
struct BbcRow {
    id: String,
    title: String,
    article: String,
    summary: String,
}

/// One split of BBC News Summary; see the module docs for the layouts and the split rule.
pub fn load_bbc(dir: &DataDir, split: Split) -> Result<Vec<SummaryExample>> {
    let base = dir.dataset_dir(Dataset::BbcNewsSummary);
    let jsonl = [base.join("bbc_news_summary_train.jsonl"), base.join("bbc_news_summary_test.jsonl")];
    let kaggle_roots = [base.join("BBC News Summary"), base.clone()];
    let kaggle = kaggle_roots.iter().find(|r| r.join("News Articles").is_dir());
    let mut rows: Vec<(PathBuf, usize, BbcRow)> = Vec::new();
    if let Some(root) = kaggle {
        rows = read_bbc_folders(root)?;
    } else {
        for p in jsonl.iter().filter(|p| p.exists()) {
            for (line, r) in read_jsonl::<BbcRow>(p, r#"{"id", "category", "title", "article", "summary"}"#)? {
                rows.push((p.clone(), line, r));
            }
        }
    }
    if rows.is_empty() && !jsonl.iter().any(|p| p.exists()) && kaggle.is_none() {
        let mut looked = jsonl.to_vec();
        looked.push(kaggle_roots[0].join("News Articles"));
        return Err(dir.missing(Dataset::BbcNewsSummary, looked));
    }
    let n_all = rows.len();
    let mut out = Vec::new();
    for (path, line, r) in rows {
        if hash_split(&format!("{} {}", r.title, r.article), 10) == split {
            out.push(SummaryExample {
                id: r.id,
                title: Some(r.title.trim().to_string()).filter(|t| !t.is_empty()),
                document: non_empty(&path, line, "article", r.article)?,
                references: vec![non_empty(&path, line, "summary", r.summary)?],
            });
        }
    }
    if out.is_empty() {
        return Err(missing_split(
            "bbc",
            split,
            jsonl.to_vec(),
            format!("none of its {n_all} articles falls in `{split}` under the rule sha256(normalize(title + \" \" + article)) % 10 == 0 -> test"),
        ));
    }
    Ok(out)
}

fn read_bbc_folders(root: &Path) -> Result<Vec<(PathBuf, usize, BbcRow)>> {
    let articles = root.join("News Articles");
    let mut out = Vec::new();
    for category in crate::io::subdirs(&articles) {
        let cat_dir = articles.join(&category);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cat_dir)
            .map_err(|e| Error::io(&cat_dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        for art_path in files {
            let stem = art_path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let sum_path = root.join("Summaries").join(&category).join(format!("{stem}.txt"));
            let art = decode_utf8_or_cp1252(&std::fs::read(&art_path).map_err(|e| Error::io(&art_path, e))?);
            let summary = decode_utf8_or_cp1252(&std::fs::read(&sum_path).map_err(|e| Error::io(&sum_path, e))?);
            let (title, article) = art.split_once('\n').unwrap_or((art.as_str(), ""));
            out.push((
                art_path.clone(),
                1,
                BbcRow {
                    id: format!("{category}/{stem}"),
                    title: title.trim().to_string(),
                    article: article.trim().to_string(),
                    summary: summary.trim().to_string(),
                },
            ));
        }
    }
    Ok(out)
}

/// UTF-8 if valid, else Windows-1252 (one upstream BBC file is cp1252).
fn decode_utf8_or_cp1252(bytes: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return s.to_string();
    }
    const HIGH: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘',
        '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
    ];
    bytes
        .iter()
        .map(|&b| match b {
            0x80..=0x9f => HIGH[usize::from(b - 0x80)],
            _ => char::from(b),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cp1252_fallback() {
        assert_eq!(decode_utf8_or_cp1252(b"caf\xe9 \x93q\x94 \x80"), "café “q” €");
        assert_eq!(decode_utf8_or_cp1252("naïve".as_bytes()), "naïve");
    }
}
