//! hetfed's dataset manifest and downloader.
//!
//! [`Manifest`] is data (`manifest.toml`, embedded): for every file hetfed's loaders read, its
//! path in hetfed's layout, size and SHA-256, the public URL pinned to a commit, the licence, and
//! how hetfed's layout is made from the upstream bytes. [`Fetcher`] downloads the files of a
//! dataset into a data directory: from the upstream URLs, or from a mirror that serves hetfed's
//! layout (`--mirror`, `$HETFED_MIRROR`; loopback HTTP in tests). Downloads resume (`.part` file +
//! HTTP `Range`), are verified (size, SHA-256; a mismatch deletes the download), land by atomic
//! rename, and one process at a time downloads a given file (a lock file per file). Files whose
//! upstream hash is not known here are pinned on first download in the lock file
//! [`LOCK_FILE`] beside them (trust on first use). Files the manifest marks `derived` are made
//! from their upstream files by a [`transform`] recipe and checked against the manifest's hash
//! of hetfed's layout.
//!
//! [`testing::Mirror`] is the loopback HTTP server the tests use instead of the internet.

mod fetch;
mod manifest;
pub mod testing;
pub mod transform;

pub use fetch::{Fetcher, Outcome, Source, LOCK_FILE, MIRROR_ENV};
pub use manifest::{DatasetEntry, FileEntry, Input, Manifest, Upstream};

/// Everything that can go wrong; every message is one line naming what was expected, what was
/// found, and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// The server answered with an error, or could not be reached.
    #[error("{0}")]
    Http(String),
    /// The connection broke before the whole file arrived; the `.part` file keeps what came and
    /// the next attempt resumes from it.
    #[error("{}", interrupted(url, *got, why))]
    Interrupted { url: String, got: u64, why: String },
    /// A downloaded file has the wrong size or hash (it was deleted).
    #[error("{0}")]
    Mismatch(String),
    /// A bad manifest, name, URL or setting.
    #[error("{0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn interrupted(url: &str, got: u64, why: &str) -> String {
    match got {
        0 => format!("cannot download {url} ({why})"),
        n => format!("download of {url} interrupted after {n} bytes ({why}); run the command again to resume"),
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}
