//! Parallel text: FLORES-200, TICO-19, IN22. Every file is one sentence per line, and line `i` of
//! one language is the translation of line `i` of another. Languages may be given by FLORES-200
//! code (`hin_Deva`) or, for the languages in [`crate::lang`], ISO code (`hi`).
//!
//! **FLORES-200** (official release layout): `flores200/dev/<code>.dev` (`dev`, 997 sentences) and
//! `flores200/devtest/<code>.devtest` (`test`, 1012 sentences), also accepted under
//! `flores200/flores200_dataset/`. No train split.
//!
//! **TICO-19** (en↔hi/bn/mr/ta and any other `en-<lang>` folder): `tico19/en-<lang>/tico19.en-<lang>.{en,<lang>}`
//! (+ optional `tico19.en-<lang>.info.tsv`, whose first column is the sentence id), or the upstream
//! OPUS-MT-testsets names `tico19-test.{en,<lang>}` (+ `tico19-test.en.info`). Only TICO-19's test
//! split is public in that form; it is cut at a document boundary into sentences 0..1297 (the part the
//! shared copy holds) and `test` = sentences 1297... The first part is cut again, by sentence id, into
//! `train` and `dev`: a sentence is `dev` iff `hash_mod(id, 5) == 0` ([`crate::split::hash_mod`],
//! about one in five, 259 of 1297 for en-hi), else `train`. Sentences of one document can fall on
//! both sides (TICO-19 has ten documents in that part, too few to split by document).
//!
//! **IN22** (the public `IN22_testset.zip` layout): `in22/IN22_testset/{gen,conv}/test.<code>`, also
//! accepted as `in22/{gen,conv}/test.<code>`. A test set only. The Hugging Face copies
//! (`ai4bharat/IN22-Gen`, `IN22-Conv`) are parquet with `sentence_<code>` columns and are not read
//! here; export them to the zip layout (one file per language) to use them.

use std::path::{Path, PathBuf};

use crate::dir::{first_existing, DataDir, Dataset};
use crate::error::{Error, Result};
use crate::examples::TranslationExample;
use crate::io::read_lines;
use crate::lang::{flores_code, iso_code};
use crate::split::Split;

/// Number of TICO-19 test sentences in `train` + `dev`: documents up to, not including, `Wikipedia_handpicked_3`.
pub const TICO_DEV_LINES: usize = 1297;

/// `train` or `dev` for a TICO-19 sentence of the first part (sentences 0..[`TICO_DEV_LINES`]).
pub fn tico_split(id: &str) -> Split {
    if crate::split::hash_mod(id, 5) == 0 {
        Split::Dev
    } else {
        Split::Train
    }
}

/// Which IN22 test set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum In22Subset {
    /// IN22-Gen: 1024 sentences from Wikipedia and web sources.
    Gen,
    /// IN22-Conv: 1503 sentences of conversation.
    Conv,
}

impl In22Subset {
    pub fn as_str(self) -> &'static str {
        match self {
            In22Subset::Gen => "gen",
            In22Subset::Conv => "conv",
        }
    }
}

fn zip_pair(
    path_src: &Path,
    src: Vec<String>,
    path_tgt: &Path,
    tgt: Vec<String>,
    src_lang: &str,
    tgt_lang: &str,
    ids: impl Fn(usize) -> String,
) -> Result<Vec<TranslationExample>> {
    if src.len() != tgt.len() {
        return Err(Error::format(
            path_tgt,
            None,
            format!("expected {} lines, line-aligned with {}, found {}", src.len(), path_src.display(), tgt.len()),
        ));
    }
    Ok(src
        .into_iter()
        .zip(tgt)
        .enumerate()
        .map(|(i, (s, t))| TranslationExample {
            id: ids(i),
            src_lang: src_lang.to_string(),
            tgt_lang: tgt_lang.to_string(),
            src: s,
            tgt: t,
        })
        .collect())
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension()?.to_str()? == ext).then(|| p.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    v.sort();
    v
}

/// The lines of one FLORES-200 language file (`dev` or `test` = devtest).
pub fn load_flores_lines(dir: &DataDir, lang: &str, split: Split) -> Result<(PathBuf, Vec<String>)> {
    let code = flores_code(lang);
    let base = dir.dataset_dir(Dataset::Flores200);
    let name = match split {
        Split::Dev => "dev",
        Split::Test => "devtest",
        Split::Train => {
            return Err(Error::MissingSplit {
                dataset: "flores".into(),
                split: split.to_string(),
                looked_at: vec![base],
                note: "FLORES-200 has only dev and devtest (test)".into(),
            })
        }
    };
    if !base.exists() {
        return Err(dir.missing(Dataset::Flores200, vec![base.join(name).join(format!("{code}.{name}"))]));
    }
    let split_dirs = [base.join(name), base.join("flores200_dataset").join(name)];
    let Some(split_dir) = first_existing(&split_dirs) else {
        return Err(Error::MissingSplit {
            dataset: "flores".into(),
            split: split.to_string(),
            looked_at: split_dirs.to_vec(),
            note: String::new(),
        });
    };
    let path = split_dir.join(format!("{code}.{name}"));
    if !path.exists() {
        return Err(Error::MissingLanguage {
            dataset: "flores".into(),
            lang: code,
            looked_at: vec![path],
            available: files_with_ext(&split_dir, name),
        });
    }
    let lines = read_lines(&path)?;
    Ok((path, lines))
}

/// FLORES-200 sentence pairs for any two languages. Ids are `<dev|devtest>-<n>`, `n` the 1-based
/// sentence number (the row of `metadata_<split>.tsv`).
pub fn load_flores(dir: &DataDir, src: &str, tgt: &str, split: Split) -> Result<Vec<TranslationExample>> {
    let (ps, s) = load_flores_lines(dir, src, split)?;
    let (pt, t) = load_flores_lines(dir, tgt, split)?;
    let name = if split == Split::Test { "devtest" } else { "dev" };
    zip_pair(&ps, s, &pt, t, &flores_code(src), &flores_code(tgt), |i| format!("{name}-{}", i + 1))
}

/// TICO-19 sentence pairs, `en` → `<lang>` or `<lang>` → `en`. Ids are the sentence ids of the
/// `.info` file (`CMU_1:1`), or `tico-<n>` (1-based) without one.
pub fn load_tico(dir: &DataDir, src: &str, tgt: &str, split: Split) -> Result<Vec<TranslationExample>> {
    let (src, tgt) = (iso_code(src), iso_code(tgt));
    let other = match (src.as_str(), tgt.as_str()) {
        ("en", o) | (o, "en") if o != "en" => o.to_string(),
        _ => {
            return Err(Error::config(format!(
                "TICO-19 pairs English with another language: expected en-<lang> or <lang>-en, found {src}-{tgt}"
            )))
        }
    };
    let base = dir.dataset_dir(Dataset::Tico19);
    let pair = format!("en-{other}");
    let pair_dir = base.join(&pair);
    let ours = |l: &str| pair_dir.join(format!("tico19.{pair}.{l}"));
    let upstream = |l: &str| pair_dir.join(format!("tico19-test.{l}"));
    let (en_path, other_path, info) = if ours("en").exists() {
        (ours("en"), ours(&other), pair_dir.join(format!("tico19.{pair}.info.tsv")))
    } else if upstream("en").exists() {
        (upstream("en"), upstream(&other), pair_dir.join("tico19-test.en.info"))
    } else if !base.exists() {
        return Err(dir.missing(Dataset::Tico19, vec![ours("en"), upstream("en")]));
    } else {
        let available =
            crate::io::subdirs(&base).into_iter().filter_map(|d| d.strip_prefix("en-").map(str::to_string)).collect();
        return Err(Error::MissingLanguage {
            dataset: "tico".into(),
            lang: other,
            looked_at: vec![ours("en"), upstream("en")],
            available,
        });
    };
    let en = read_lines(&en_path)?;
    let xx = read_lines(&other_path)?;
    let ids: Vec<String> = if info.exists() {
        read_lines(&info)?.into_iter().map(|l| l.split('\t').next().unwrap_or_default().to_string()).collect()
    } else {
        (1..=en.len()).map(|n| format!("tico-{n}")).collect()
    };
    if ids.len() != en.len() {
        return Err(Error::format(
            &info,
            None,
            format!("expected {} lines, one per sentence of {}, found {}", en.len(), en_path.display(), ids.len()),
        ));
    }
    let range = match split {
        Split::Train | Split::Dev => 0..en.len().min(TICO_DEV_LINES),
        Split::Test => en.len().min(TICO_DEV_LINES)..en.len(),
    };
    if range.is_empty() {
        return Err(Error::MissingSplit {
            dataset: "tico".into(),
            split: split.to_string(),
            looked_at: vec![en_path],
            note: format!(
                "test is TICO-19 sentences {TICO_DEV_LINES}.. and this file has {} lines; it is in the full upstream tico19-test files",
                en.len()
            ),
        });
    }
    let (s, t, ps, pt) = if src == "en" { (en, xx, &en_path, &other_path) } else { (xx, en, &other_path, &en_path) };
    let pairs = zip_pair(ps, s, pt, t, &src, &tgt, |i| ids[i].clone())?;
    let part = pairs[range].iter().cloned();
    Ok(match split {
        Split::Test => part.collect(),
        _ => part.filter(|e| tico_split(&e.id) == split).collect(),
    })
}

/// IN22 (`gen` or `conv`) sentence pairs for any two of its languages; `test` only. Ids are
/// `<gen|conv>-<n>` (1-based).
pub fn load_in22(
    dir: &DataDir,
    subset: In22Subset,
    src: &str,
    tgt: &str,
    split: Split,
) -> Result<Vec<TranslationExample>> {
    let base = dir.dataset_dir(Dataset::In22);
    let sub = subset.as_str();
    let roots = [base.join("IN22_testset").join(sub), base.join(sub)];
    if split != Split::Test {
        return Err(Error::MissingSplit {
            dataset: format!("in22-{sub}"),
            split: split.to_string(),
            looked_at: roots.to_vec(),
            note: "IN22 is a test set only; develop on FLORES-200 dev".into(),
        });
    }
    let Some(root) = first_existing(&roots) else {
        return Err(
            dir.missing(Dataset::In22, roots.iter().map(|r| r.join(format!("test.{}", flores_code(src)))).collect())
        );
    };
    let read = |lang: &str| -> Result<(PathBuf, Vec<String>)> {
        let code = flores_code(lang);
        let p = root.join(format!("test.{code}"));
        if !p.exists() {
            let mut available: Vec<String> = std::fs::read_dir(&root)
                .map(|rd| {
                    rd.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("test.").map(str::to_string)).collect()
                })
                .unwrap_or_default();
            available.sort();
            return Err(Error::MissingLanguage {
                dataset: format!("in22-{sub}"),
                lang: code,
                looked_at: vec![p],
                available,
            });
        }
        Ok((p.clone(), read_lines(&p)?))
    };
    let (ps, s) = read(src)?;
    let (pt, t) = read(tgt)?;
    zip_pair(&ps, s, &pt, t, &flores_code(src), &flores_code(tgt), |i| format!("{sub}-{}", i + 1))
}
