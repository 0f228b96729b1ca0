//! `mltext`: multilingual plain text, one sentence (or verse line, or paragraph) per line, for
//! perplexity and tokenizer/LM training.
//!
//! Layout: `mltext/<source>/<file>.txt`, one folder per source (their licences differ), one file
//! per language; a file belongs to language `<lang>` (ISO 639-1, e.g. `hi`) when its name is
//! `<lang>.txt` or starts with `<lang>_` (`te_classical_verse.txt`). Files directly in `mltext/`
//! are read too (source `.`). Sources in the shared copy: Mozilla Common Voice sentence-collector
//! exports (CC0; github.com/common-voice/common-voice `server/data/<lang>/`), the Wikipedia side of
//! Post et al. 2012's Indian parallel corpora (CC BY-SA 3.0; github.com/joshua-decoder/indian-parallel-corpora),
//! UD English-EWT raw sentences (CC BY-SA 4.0; github.com/UniversalDependencies/UD_English-EWT),
//! L3Cube MarathiNLP (CC BY-NC-SA 4.0; github.com/l3cube-pune/MarathiNLP), and CLTK Wikisource
//! Telugu and Bengali texts (github.com/cltk).
//!
//! No official split: a line is `dev` iff `sha256(normalize(line)) % 10 == 0` (about 10%),
//! otherwise `train`; equal lines in two sources fall on the same side. There is no `test`.
//! Blank lines are skipped.

use std::path::{Path, PathBuf};

use crate::dir::{DataDir, Dataset};
use crate::error::{Error, Result};
use crate::examples::TextExample;
use crate::io::read_lines;
use crate::lang::iso_code;
use crate::split::{hash_mod, Split};

/// The `(source, path)` of every text file of a language, in source then file-name order.
/// `sources`, when given, keeps only files whose source (`commonvoice_cc0`) or
/// `source/stem` (`cltk_wikisource/te_siva_puranam_prose`) is listed.
pub fn mltext_files(dir: &DataDir, lang: &str, sources: Option<&[String]>) -> Result<Vec<(String, PathBuf)>> {
    let lang = iso_code(lang);
    let base = dir.dataset_dir(Dataset::Mltext);
    if !base.is_dir() {
        return Err(dir.missing(Dataset::Mltext, vec![base.join("<source>").join(format!("{lang}.txt"))]));
    }
    let mut folders: Vec<(String, PathBuf)> = vec![(".".to_string(), base.clone())];
    folders.extend(crate::io::subdirs(&base).into_iter().map(|s| (s.clone(), base.join(s))));
    let mut out = Vec::new();
    let mut all_langs = Vec::new();
    for (source, folder) in folders {
        let mut files = txt_files(&folder)?;
        files.sort();
        for f in files {
            let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            let file_lang = stem.split('_').next().unwrap_or_default().to_string();
            all_langs.push(file_lang.clone());
            if file_lang != lang {
                continue;
            }
            let keep = sources.is_none_or(|s| s.iter().any(|k| *k == source || *k == format!("{source}/{stem}")));
            if keep {
                out.push((source.clone(), f));
            }
        }
    }
    if out.is_empty() {
        all_langs.sort();
        all_langs.dedup();
        return Err(Error::MissingLanguage {
            dataset: "mltext".into(),
            lang: match sources {
                Some(s) => format!("{lang} (sources {})", s.join(", ")),
                None => lang,
            },
            looked_at: vec![base.join("<source>").join("<lang>[_*].txt")],
            available: all_langs,
        });
    }
    Ok(out)
}

fn txt_files(folder: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_dir(folder)
        .map_err(|e| Error::io(folder, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "txt"))
        .collect())
}

/// The split of one line of text (see the module docs).
pub fn mltext_split(line: &str) -> Split {
    if hash_mod(line, 10) == 0 {
        Split::Dev
    } else {
        Split::Train
    }
}

/// The lines of one language in one split, from every source (or only `sources`).
pub fn load_mltext(dir: &DataDir, lang: &str, split: Split, sources: Option<&[String]>) -> Result<Vec<TextExample>> {
    let files = mltext_files(dir, lang, sources)?;
    if split == Split::Test {
        return Err(Error::MissingSplit {
            dataset: "mltext".into(),
            split: split.to_string(),
            looked_at: files.into_iter().map(|(_, p)| p).collect(),
            note: "mltext has train and dev only".into(),
        });
    }
    let mut out = Vec::new();
    for (source, path) in files {
        let name = path.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        for (i, line) in read_lines(&path)?.into_iter().enumerate() {
            if line.trim().is_empty() || mltext_split(&line) != split {
                continue;
            }
            out.push(TextExample { id: format!("{source}/{name}:{}", i + 1), text: line });
        }
    }
    Ok(out)
}
