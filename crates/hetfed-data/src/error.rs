//! Typed errors. Messages say what was expected, what was found and where, and end without a
//! period (the convention of `hetfed_core::Error`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing of a dataset was found where the data directory says it should be.
    #[error(
        "dataset `{dataset}` not found: looked for {} (data directory {root}, {origin}); the public copy is at {url}",
        paths(looked_at)
    )]
    MissingDataset { dataset: String, looked_at: Vec<PathBuf>, root: PathBuf, origin: String, url: String },
    /// The dataset is there but the requested split is not.
    #[error(
        "dataset `{dataset}`: split `{split}` is not present: looked for {}{}",
        paths(looked_at),
        note_suffix(note)
    )]
    MissingSplit { dataset: String, split: String, looked_at: Vec<PathBuf>, note: String },
    /// The dataset is there but not for this language.
    #[error(
        "dataset `{dataset}`: language `{lang}` not found: looked for {}; available: {}",
        paths(looked_at),
        list(available)
    )]
    MissingLanguage { dataset: String, lang: String, looked_at: Vec<PathBuf>, available: Vec<String> },
    /// A file does not have the documented layout.
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Format {
        path: PathBuf,
        /// 1-based line number, when the problem is on one line.
        line: Option<usize>,
        msg: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad task spec, dataset name, template or partition argument.
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_owned(), source }
    }
    pub(crate) fn format(path: &Path, line: Option<usize>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.to_owned(), line, msg: msg.into() }
    }
    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}

impl From<Error> for hetfed_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { path, source } => hetfed_core::Error::Io { path, source },
            other => hetfed_core::Error::Msg(other.to_string()),
        }
    }
}

fn paths(p: &[PathBuf]) -> String {
    let mut s = String::new();
    for (i, p) in p.iter().enumerate() {
        if i > 0 {
            s.push_str(" or ");
        }
        let _ = write!(s, "{}", p.display());
    }
    s
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn note_suffix(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!(" ({note})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `?` into `hetfed_core::Error` keeps the message users see, word for word.
    #[test]
    fn conversion_to_the_core_error_keeps_the_message() {
        let errors = || {
            vec![
                Error::MissingDataset {
                    dataset: "ethos".into(),
                    looked_at: vec!["a/b".into(), "c".into()],
                    root: "data".into(),
                    origin: "--data-dir".into(),
                    url: "https://example.org".into(),
                },
                Error::MissingSplit {
                    dataset: "copa".into(),
                    split: "test".into(),
                    looked_at: vec![],
                    note: "n".into(),
                },
                Error::MissingLanguage {
                    dataset: "flores".into(),
                    lang: "xx".into(),
                    looked_at: vec!["f".into()],
                    available: vec![],
                },
                Error::format(Path::new("x.jsonl"), Some(3), "expected a JSON object"),
                Error::io(Path::new("missing.txt"), std::io::Error::from(std::io::ErrorKind::NotFound)),
                Error::config("unknown task `nope`"),
            ]
        };
        for (e, expected) in errors().into_iter().zip(errors().iter().map(ToString::to_string)) {
            let core = hetfed_core::Error::from(e);
            assert_eq!(core.to_string(), expected);
        }
        let io = hetfed_core::Error::from(Error::io(Path::new("f"), std::io::ErrorKind::NotFound.into()));
        assert!(matches!(io, hetfed_core::Error::Io { .. }), "an I/O error stays one: {io:?}");
    }
}
