//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use hetfed_data::DataDir;

/// The shared data directory, if `../shared/data/<rel>` exists (else `shared_path` prints a
/// SKIPPED line, or panics under CI=true).
pub fn shared_data(rel: &str) -> Option<DataDir> {
    let p = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), &format!("data/{rel}"))?;
    let mut root = p.as_path();
    for _ in Path::new(rel).components() {
        root = root.parent().expect("shared_path returns <shared>/data/<rel>");
    }
    Some(DataDir::new(root))
}

/// A fresh temporary directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "hetfed-data-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    /// Writes `text` to `rel`, creating folders.
    pub fn write(&self, rel: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn data_dir(&self) -> DataDir {
        DataDir::new(&self.0)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
