//! The manifest: `manifest.toml` (embedded), parsed and checked.

use serde::Deserialize;

use crate::{Error, Result};

/// The embedded manifest's text.
pub const MANIFEST_TOML: &str = include_str!("../manifest.toml");

/// How the public copy of a file relates to hetfed's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Upstream {
    /// The URL serves exactly the bytes of hetfed's layout.
    Same,
    /// The URL serves the full upstream file of which `../shared` keeps a documented cut; the
    /// loader reads the full file as is (saved as `saved_as`) and applies the same split rule.
    Full,
    /// hetfed's layout is made by a transformation hetfed does not implement: mirror only.
    Transformed,
}

/// One file a loader reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path in hetfed's layout, relative to the dataset folder (`/`-separated).
    pub path: String,
    /// Size in bytes of the file in hetfed's layout.
    pub size: u64,
    /// SHA-256 (lowercase hex) of the file in hetfed's layout.
    pub sha256: String,
    /// Languages or pairs the file serves; empty: every task of the dataset needs it.
    #[serde(default)]
    pub tags: Vec<String>,
    pub upstream: Upstream,
    /// The upstream URL, pinned to a commit.
    #[serde(default)]
    pub url: Option<String>,
    /// Where an [`Upstream::Full`] download is saved (default: `path`).
    #[serde(default)]
    pub saved_as: Option<String>,
    /// The deterministic transformation from the upstream bytes to `path`.
    #[serde(default)]
    pub transform: Option<String>,
}

impl FileEntry {
    /// Where the upstream download of this file is saved, relative to the dataset folder.
    pub fn upstream_path(&self) -> &str {
        match self.upstream {
            Upstream::Full => self.saved_as.as_deref().unwrap_or(&self.path),
            Upstream::Same | Upstream::Transformed => &self.path,
        }
    }

    /// Whether a task that needs `tags` (none: all of the dataset) needs this file.
    pub fn needed_for(&self, tags: Option<&[String]>) -> bool {
        match tags {
            None => true,
            Some(want) => self.tags.is_empty() || self.tags.iter().any(|t| want.contains(t)),
        }
    }
}

/// One dataset: a folder of the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetEntry {
    /// The name used in task names (`ethos`, `flores`, `tico`, ...).
    pub name: String,
    /// Its folder in the data directory (`flores200`).
    pub dir: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    pub licence: String,
    /// Repository and pinned commit.
    pub source: String,
    #[serde(default)]
    pub notes: String,
    #[serde(default, rename = "file")]
    pub files: Vec<FileEntry>,
}

/// The datasets hetfed knows.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    #[serde(rename = "dataset")]
    pub datasets: Vec<DatasetEntry>,
}

impl Manifest {
    /// The embedded manifest.
    pub fn embedded() -> Manifest {
        Manifest::parse(MANIFEST_TOML, "the embedded manifest").expect("the embedded manifest is valid (tested)")
    }

    /// Parses and checks a manifest; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest> {
        let m: Manifest = toml::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: {}", e.to_string().replace('\n', " "))))?;
        m.check().map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(m)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.version != 1 {
            return Err(format!("expected version = 1, found {}", self.version));
        }
        let mut names = std::collections::BTreeSet::new();
        for d in &self.datasets {
            for n in std::iter::once(&d.name).chain(&d.aliases) {
                if !names.insert(n.clone()) {
                    return Err(format!("dataset name `{n}` appears twice"));
                }
            }
            if !safe_rel(&d.dir) || d.dir.contains('/') {
                return Err(format!("dataset `{}`: expected a plain folder name, found dir = {:?}", d.name, d.dir));
            }
            for f in &d.files {
                let at = format!("dataset `{}`, file {:?}", d.name, f.path);
                if !safe_rel(&f.path) || f.saved_as.as_deref().is_some_and(|s| !safe_rel(s)) {
                    return Err(format!("{at}: expected a relative path without `..`"));
                }
                if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(format!("{at}: expected sha256 as 64 lowercase hex digits, found {:?}", f.sha256));
                }
                if f.upstream != Upstream::Transformed && f.url.is_none() {
                    return Err(format!("{at}: upstream = {:?} needs a url", f.upstream));
                }
                if f.upstream == Upstream::Transformed && f.transform.is_none() {
                    return Err(format!("{at}: upstream = \"transformed\" needs a transform"));
                }
            }
        }
        Ok(())
    }

    /// The dataset named `name` (its name, an alias or its folder name).
    pub fn get(&self, name: &str) -> Result<&DatasetEntry> {
        self.datasets
            .iter()
            .find(|d| d.name == name || d.dir == name || d.aliases.iter().any(|a| a == name))
            .ok_or_else(|| {
                let known: Vec<&str> = self.datasets.iter().map(|d| d.name.as_str()).collect();
                Error::Config(format!("unknown dataset `{name}`: expected one of {}", known.join(", ")))
            })
    }
}

/// A relative `/`-separated path with no empty, `.` or `..` component.
fn safe_rel(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_manifest_parses_and_names_are_unique() {
        let m = Manifest::embedded();
        assert!(m.datasets.len() >= 11);
        assert_eq!(m.get("flores200").unwrap().name, "flores");
        assert_eq!(m.get("tico19").unwrap().dir, "tico19");
        let e = m.get("imdb").unwrap_err().to_string();
        assert!(e.contains("unknown dataset `imdb`") && e.contains("ethos"), "{e}");
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let base = "version = 1\n[[dataset]]\nname = \"x\"\ndir = \"x\"\nlicence = \"l\"\nsource = \"s\"\n";
        let bad = [
            ("[[dataset.file]]\npath = \"../a\"\nsize = 1\nsha256 = \"00\"\nupstream = \"same\"\n", "without `..`"),
            (
                "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"00\"\nupstream = \"same\"\nurl = \"https://x\"\n",
                "64 lowercase hex",
            ),
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"same\"\n",
                    "0".repeat(64)
                ),
                "needs a url",
            ),
        ];
        for (extra, want) in bad {
            let e = Manifest::parse(&format!("{base}{extra}"), "m.toml").unwrap_err().to_string();
            assert!(e.starts_with("m.toml: ") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn tags_select_files() {
        let m = Manifest::embedded();
        let tico = m.get("tico").unwrap();
        let want = vec!["en-hi".to_string()];
        let picked: Vec<&str> =
            tico.files.iter().filter(|f| f.needed_for(Some(&want))).map(|f| f.path.as_str()).collect();
        assert_eq!(picked.len(), 3, "{picked:?}");
        assert!(picked.iter().all(|p| p.starts_with("en-hi/")));
        let flores = m.get("flores").unwrap();
        let want = vec!["eng_Latn".to_string(), "hin_Deva".to_string()];
        let n = flores.files.iter().filter(|f| f.needed_for(Some(&want))).count();
        assert_eq!(n, 3, "two languages and the untagged metadata");
    }
}
