//! Where datasets live: the data directory and the per-dataset folders inside it.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the data directory when no `--data-dir` is given.
pub const DATA_DIR_ENV: &str = "HETFED_DATA_DIR";

/// How a [`DataDir`] was chosen; error messages report it so a user knows which setting to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirOrigin {
    /// Given explicitly (`--data-dir`, or [`DataDir::new`]).
    Explicit,
    /// From `$HETFED_DATA_DIR`.
    Env,
    /// The per-user cache directory (`$XDG_CACHE_HOME/hetfed/data` or `~/.cache/hetfed/data`).
    UserCache,
}

impl fmt::Display for DataDirOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataDirOrigin::Explicit => "given explicitly (--data-dir)",
            DataDirOrigin::Env => "from $HETFED_DATA_DIR",
            DataDirOrigin::UserCache => "the per-user cache; set --data-dir or $HETFED_DATA_DIR to use another",
        })
    }
}

/// The root folder holding one sub-folder per dataset (`ethos/`, `copa/`, `flores200/`, ...).
/// Resolving it touches no file: a missing folder surfaces as [`Error::MissingDataset`] when a
/// dataset is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
    origin: DataDirOrigin,
}

impl DataDir {
    /// A data directory at `root`, as if given by `--data-dir`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), origin: DataDirOrigin::Explicit }
    }

    /// `cli` (the `--data-dir` flag) if given, else `$HETFED_DATA_DIR` if set and non-empty, else
    /// `$XDG_CACHE_HOME/hetfed/data` (when that variable is an absolute path), else
    /// `$HOME/.cache/hetfed/data`. Fails only when none of these can be formed.
    pub fn resolve(cli: Option<&Path>) -> Result<DataDir> {
        Self::resolve_from(cli, |k| std::env::var_os(k))
    }

    /// [`DataDir::resolve`] with the environment given as a lookup function (for tests, which
    /// must not mutate the process environment).
    pub fn resolve_from(cli: Option<&Path>, env: impl Fn(&str) -> Option<OsString>) -> Result<DataDir> {
        let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(p) = cli {
            return Ok(DataDir::new(p));
        }
        if let Some(p) = non_empty(DATA_DIR_ENV) {
            return Ok(DataDir { root: PathBuf::from(p), origin: DataDirOrigin::Env });
        }
        // The XDG spec says relative values are invalid and must be ignored.
        let cache = non_empty("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| non_empty("HOME").map(|h| PathBuf::from(h).join(".cache")));
        match cache {
            Some(c) => Ok(DataDir { root: c.join("hetfed").join("data"), origin: DataDirOrigin::UserCache }),
            None => Err(Error::config(format!(
                "no data directory: expected --data-dir, ${DATA_DIR_ENV}, $XDG_CACHE_HOME or $HOME, found none set"
            ))),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn origin(&self) -> DataDirOrigin {
        self.origin
    }

    /// The folder of one dataset (which need not exist).
    pub fn dataset_dir(&self, d: Dataset) -> PathBuf {
        self.root.join(d.dir_name())
    }

    /// The error for a dataset of which nothing was found at `looked_at`.
    pub(crate) fn missing(&self, d: Dataset, looked_at: Vec<PathBuf>) -> Error {
        Error::MissingDataset {
            dataset: d.name().to_string(),
            looked_at,
            root: self.root.clone(),
            origin: self.origin.to_string(),
            url: d.source_url().to_string(),
        }
    }
}

/// The datasets this crate reads, each in its own folder of the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dataset {
    Ethos,
    Copa,
    Xcopa,
    Flores200,
    Tico19,
    In22,
    XlSum,
    Ilsum,
    SciTldr,
    BbcNewsSummary,
    Mltext,
}

impl Dataset {
    pub const ALL: [Dataset; 11] = [
        Dataset::Ethos,
        Dataset::Copa,
        Dataset::Xcopa,
        Dataset::Flores200,
        Dataset::Tico19,
        Dataset::In22,
        Dataset::XlSum,
        Dataset::Ilsum,
        Dataset::SciTldr,
        Dataset::BbcNewsSummary,
        Dataset::Mltext,
    ];

    /// Short name used in dataset specs and messages.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Ethos => "ethos",
            Dataset::Copa => "copa",
            Dataset::Xcopa => "xcopa",
            Dataset::Flores200 => "flores",
            Dataset::Tico19 => "tico",
            Dataset::In22 => "in22",
            Dataset::XlSum => "xlsum",
            Dataset::Ilsum => "ilsum",
            Dataset::SciTldr => "scitldr",
            Dataset::BbcNewsSummary => "bbc",
            Dataset::Mltext => "mltext",
        }
    }

    /// Folder name under the data directory.
    pub fn dir_name(self) -> &'static str {
        match self {
            Dataset::Ethos => "ethos",
            Dataset::Copa => "copa",
            Dataset::Xcopa => "xcopa",
            Dataset::Flores200 => "flores200",
            Dataset::Tico19 => "tico19",
            Dataset::In22 => "in22",
            Dataset::XlSum => "xlsum",
            Dataset::Ilsum => "ilsum_hindi_extract",
            Dataset::SciTldr => "scitldr",
            Dataset::BbcNewsSummary => "bbc_news_summary",
            Dataset::Mltext => "mltext",
        }
    }

    /// Where the public copy lives (the source named in the dataset's PROVENANCE.md).
    pub fn source_url(self) -> &'static str {
        match self {
            Dataset::Ethos => "https://github.com/intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset (ethos/ethos_data/Ethos_Dataset_Binary.csv)",
            Dataset::Copa => "https://github.com/Balanced-COPA/Balanced-COPA.github.io (downloads/balanced_copa/balacopa-dev-all.xml, converted to copa_en.jsonl as documented in hetfed-data)",
            Dataset::Xcopa => "https://github.com/cambridgeltl/xcopa (data/<lang>/{val,test}.<lang>.jsonl)",
            Dataset::Flores200 => "https://github.com/Helsinki-NLP/OPUS-MT-testsets (the FLORES-200 release: flores200_dataset/{dev,devtest}/<code>.<split>)",
            Dataset::Tico19 => "https://github.com/Helsinki-NLP/OPUS-MT-testsets (datasets/tico19/testsets/en-<lang>/tico19-test.*)",
            Dataset::In22 => "https://github.com/AI4Bharat/IndicTrans2 (its README links IN22_testset.zip; also huggingface.co/datasets/ai4bharat/IN22-Gen and IN22-Conv)",
            Dataset::XlSum => "https://github.com/csebuetnlp/xl-sum (also huggingface.co/datasets/csebuetnlp/xlsum)",
            Dataset::Ilsum => "https://github.com/rohan20113/IndianLanguageSummarization (hindi_*_final_BM25.csv; originals at huggingface.co/datasets/ILSUM/ILSUM-1.0)",
            Dataset::SciTldr => "https://github.com/allenai/scitldr (SciTLDR-Data/SciTLDR-A/{train,dev,test}.jsonl)",
            Dataset::BbcNewsSummary => "https://www.kaggle.com/datasets/pariza/bbc-news-summary (copy: https://github.com/Miguel-G-Soares/PRI_proj1)",
            Dataset::Mltext => "https://github.com/common-voice/common-voice (server/data/<lang>/) and the other open sources listed in hetfed-data's mltext docs",
        }
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The first of `candidates` that exists.
pub(crate) fn first_existing(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.exists()).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
    }

    #[test]
    fn flag_beats_env_beats_cache() {
        let vars = [("HETFED_DATA_DIR", "/e"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/h")];
        let d = DataDir::resolve_from(Some(Path::new("/f")), env(&vars)).unwrap();
        assert_eq!((d.root(), d.origin()), (Path::new("/f"), DataDirOrigin::Explicit));
        let d = DataDir::resolve_from(None, env(&vars)).unwrap();
        assert_eq!((d.root(), d.origin()), (Path::new("/e"), DataDirOrigin::Env));
        let d = DataDir::resolve_from(None, env(&vars[1..])).unwrap();
        assert_eq!((d.root(), d.origin()), (Path::new("/x/hetfed/data"), DataDirOrigin::UserCache));
        let d = DataDir::resolve_from(None, env(&vars[2..])).unwrap();
        assert_eq!(d.root(), Path::new("/h/.cache/hetfed/data"));
    }

    #[test]
    fn empty_and_relative_values_are_ignored() {
        let vars = [("HETFED_DATA_DIR", ""), ("XDG_CACHE_HOME", "rel/cache"), ("HOME", "/h")];
        let d = DataDir::resolve_from(None, env(&vars)).unwrap();
        assert_eq!(d.root(), Path::new("/h/.cache/hetfed/data"));
    }

    #[test]
    fn nothing_set_is_a_clear_error() {
        let e = DataDir::resolve_from(None, env(&[])).unwrap_err().to_string();
        assert!(e.contains("--data-dir") && e.contains("HETFED_DATA_DIR"), "{e}");
    }
}
