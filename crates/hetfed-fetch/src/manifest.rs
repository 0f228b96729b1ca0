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
    /// hetfed's layout is made from the upstream files `input` by the transformation `recipe`
    /// (crate::transform); the result must match the entry's size and hash.
    Derived,
}

/// One upstream file a derived file is made from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The upstream URL, pinned to a commit.
    pub url: String,
    /// Its size and SHA-256, when known (checked on download).
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
    /// For a recipe that reads CSV columns (`dedup-lines`): the columns this input contributes,
    /// in order; empty: the input is plain text.
    #[serde(default)]
    pub columns: Vec<String>,
    /// For `zip-jsonl`: the file name (last path component) of the zip member to read.
    #[serde(default)]
    pub member: Option<String>,
    /// For `zip-text`: globs of the member paths to read, relative to the archive's top folder
    /// (`*` matches within one path component, `**` any number of components).
    #[serde(default)]
    pub include: Vec<String>,
    /// For `zip-text`: globs of member paths (as `include`) not to read.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// For `zip-text`: keep only the lines that start with this text, without it.
    #[serde(default)]
    pub line_prefix: Option<String>,
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
    /// For [`Upstream::Derived`]: the name of the transformation hetfed runs
    /// ([`crate::transform::RECIPES`]).
    #[serde(default)]
    pub recipe: Option<String>,
    /// For [`Upstream::Derived`]: the upstream files the recipe reads, in its order.
    #[serde(default, rename = "input")]
    pub inputs: Vec<Input>,
}

impl Input {
    /// The upstream files this input stands for: itself, or, when `url` holds one decimal range
    /// `{A..B}` (A <= B; A's width zero-pads, as `{001..510}`), one file per number from A to B,
    /// in order. A range cannot carry one size and hash.
    pub fn expand(&self) -> std::result::Result<Vec<Input>, String> {
        let Some(open) = self.url.find('{') else { return Ok(vec![self.clone()]) };
        let bad = || format!("input {}: expected one range {{A..B}} of decimal numbers, A <= B", self.url);
        let close = self.url[open..].find('}').map(|c| open + c).ok_or_else(bad)?;
        let (a, b) = self.url[open + 1..close].split_once("..").ok_or_else(bad)?;
        let (lo, hi): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if lo > hi || self.url[close + 1..].contains(['{', '}']) || hi - lo >= 100_000 {
            return Err(bad());
        }
        if self.size.is_some() || self.sha256.is_some() {
            return Err(format!("input {}: a range has no single size or sha256", self.url));
        }
        let (head, tail) = (&self.url[..open], &self.url[close + 1..]);
        Ok((lo..=hi).map(|n| Input { url: format!("{head}{n:0w$}{tail}", w = a.len()), ..self.clone() }).collect())
    }
}

impl FileEntry {
    /// The upstream files of a derived file, ranges expanded ([`Input::expand`]), in order.
    pub fn expanded_inputs(&self) -> std::result::Result<Vec<Input>, String> {
        let mut out = Vec::new();
        for i in &self.inputs {
            out.extend(i.expand()?);
        }
        Ok(out)
    }

    /// Where the upstream download of this file is saved, relative to the dataset folder.
    pub fn upstream_path(&self) -> &str {
        match self.upstream {
            Upstream::Full => self.saved_as.as_deref().unwrap_or(&self.path),
            Upstream::Same | Upstream::Transformed | Upstream::Derived => &self.path,
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
                let hex =
                    |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if f.upstream == Upstream::Derived {
                    let Some(r) = &f.recipe else {
                        return Err(format!("{at}: upstream = \"derived\" needs a recipe"));
                    };
                    let inputs = f.expanded_inputs().map_err(|e| format!("{at}: {e}"))?;
                    crate::transform::check_inputs(r, inputs.len()).map_err(|e| format!("{at}: {e}"))?;
                    crate::transform::check_specs(r, &inputs).map_err(|e| format!("{at}: {e}"))?;
                    if f.transform.is_none() {
                        return Err(format!("{at}: upstream = \"derived\" needs a transform (its description)"));
                    }
                    if f.url.is_some() || f.saved_as.is_some() {
                        return Err(format!(
                            "{at}: upstream = \"derived\" takes no url or saved_as (its inputs have the URLs)"
                        ));
                    }
                    for i in &f.inputs {
                        if !i.url.starts_with("https://") {
                            return Err(format!("{at}: expected an https:// input url, found {:?}", i.url));
                        }
                        if i.sha256.as_deref().is_some_and(|h| !hex(h)) {
                            return Err(format!("{at}: input {}: expected sha256 as 64 lowercase hex digits", i.url));
                        }
                    }
                    continue;
                }
                if f.recipe.is_some() || !f.inputs.is_empty() {
                    return Err(format!("{at}: recipe and input belong to upstream = \"derived\" only"));
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
pub(crate) fn safe_rel(p: &str) -> bool {
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
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"derived\"\ntransform = \"t\"\n",
                    "0".repeat(64)
                ),
                "needs a recipe",
            ),
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"derived\"\nrecipe = \"magic\"\n",
                    "0".repeat(64)
                ),
                "unknown recipe `magic`: expected one of ilsum-csv",
            ),
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"derived\"\nrecipe = \"copa-xml\"\n\
                     transform = \"t\"\n[[dataset.file.input]]\nurl = \"https://x/a\"\n",
                    "0".repeat(64)
                ),
                "recipe `copa-xml` takes 2 input file(s), found 1",
            ),
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"derived\"\nrecipe = \"ilsum-csv\"\n\
                     transform = \"t\"\n[[dataset.file.input]]\nurl = \"http://x/a\"\n",
                    "0".repeat(64)
                ),
                "expected an https:// input url",
            ),
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"derived\"\nrecipe = \"ilsum-csv\"\n\
                     transform = \"t\"\nurl = \"https://x/b\"\n[[dataset.file.input]]\nurl = \"https://x/a\"\n",
                    "0".repeat(64)
                ),
                "takes no url or saved_as",
            ),
            (
                &format!(
                    "[[dataset.file]]\npath = \"a\"\nsize = 1\nsha256 = \"{}\"\nupstream = \"same\"\nurl = \"https://x\"\n\
                     recipe = \"ilsum-csv\"\n",
                    "0".repeat(64)
                ),
                "belong to upstream = \"derived\" only",
            ),
        ];
        for (extra, want) in bad {
            let e = Manifest::parse(&format!("{base}{extra}"), "m.toml").unwrap_err().to_string();
            assert!(e.starts_with("m.toml: ") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn derived_files_name_a_known_recipe_and_pinned_inputs() {
        let m = Manifest::embedded();
        let derived: Vec<&FileEntry> =
            m.datasets.iter().flat_map(|d| &d.files).filter(|f| f.upstream == Upstream::Derived).collect();
        assert!(derived.len() >= 2, "ilsum and copa");
        for f in derived {
            assert!(f.url.is_none() && !f.inputs.is_empty(), "{}", f.path);
            let ranged = f.inputs.iter().any(|i| i.url.contains('{'));
            // GitHub builds a source archive on request and does not promise stable bytes.
            let archive =
                f.inputs.iter().all(|i| i.url.starts_with("https://github.com/") && i.url.contains("/archive/"));
            assert!(
                ranged || archive || f.inputs.iter().all(|i| i.size.is_some() && i.sha256.is_some()),
                "{}: inputs pinned",
                f.path
            );
        }
    }

    #[test]
    fn input_ranges_expand_in_order_with_zero_padding() {
        let i = |url: &str| Input {
            url: url.into(),
            size: None,
            sha256: None,
            columns: Vec::new(),
            member: None,
            include: Vec::new(),
            exclude: Vec::new(),
            line_prefix: None,
        };
        let urls: Vec<String> = i("https://x/a/{008..011}.txt").expand().unwrap().into_iter().map(|i| i.url).collect();
        assert_eq!(urls, ["https://x/a/008.txt", "https://x/a/009.txt", "https://x/a/010.txt", "https://x/a/011.txt"]);
        assert_eq!(i("https://x/{1..2}").expand().unwrap()[1].url, "https://x/2");
        assert_eq!(i("https://x/plain").expand().unwrap().len(), 1);
        for bad in ["https://x/{3..1}", "https://x/{a..b}", "https://x/{1..2}/{1..2}", "https://x/{1-2}"] {
            let e = i(bad).expand().unwrap_err();
            assert!(e.contains("expected one range {A..B}") && e.contains(bad), "{e}");
        }
        let pinned = Input { sha256: Some("0".repeat(64)), ..i("https://x/{1..2}") };
        assert!(pinned.expand().unwrap_err().contains("no single size or sha256"));
        let m = Manifest::embedded();
        let bbc = &m.get("bbc").unwrap().files[0];
        let inputs = bbc.expanded_inputs().unwrap();
        assert_eq!(inputs.len(), 2 * 2225);
        assert!(inputs[0].url.ends_with("/News%20Articles/business/001.txt"), "{}", inputs[0].url);
        assert!(inputs[4449].url.ends_with("/Summaries/tech/401.txt"), "{}", inputs[4449].url);
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
