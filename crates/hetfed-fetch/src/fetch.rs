//! Downloads: resumable, verified, atomic, one process per file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{DatasetEntry, FileEntry, Upstream};
use crate::{Error, Result};

/// Environment variable naming a mirror that replaces the upstream URLs (tests; a mirror serves
/// hetfed's layout: `<mirror>/<dataset dir>/<path>`).
pub const MIRROR_ENV: &str = "HETFED_MIRROR";

/// The trust-on-first-use lock file in the data directory: path → URL, size, SHA-256 of every
/// file downloaded there.
pub const LOCK_FILE: &str = "hetfed-data.lock";

/// Per-file lock files (held while a file downloads) live under this folder of the data directory.
const LOCKS_DIR: &str = ".locks";

/// Where files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The pinned upstream URLs of the manifest.
    Upstream,
    /// A mirror of hetfed's layout at this base URL.
    Mirror(String),
    /// A mirror of the upstream URLs at this base URL: `https://HOST/PATH` is fetched from
    /// `<base>/HOST/PATH` (tests of the upstream path: layouts, trust on first use).
    UpstreamVia(String),
}

/// What [`Fetcher::fetch_file`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The file was already there (possibly fetched meanwhile by another process).
    Present(PathBuf),
    /// Downloaded `bytes` bytes, the first `resumed_from` of which came from an earlier attempt.
    Downloaded { path: PathBuf, bytes: u64, resumed_from: u64 },
}

/// One lock file entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pin {
    url: String,
    size: u64,
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LockFile {
    #[serde(default)]
    files: BTreeMap<String, Pin>,
}

/// What a download must match (`None`: unknown, pinned on first download).
struct Expect {
    size: Option<u64>,
    sha256: Option<String>,
    /// Where the expectation comes from, for messages.
    from: String,
}

/// Downloads manifest files into a data directory.
pub struct Fetcher {
    root: PathBuf,
    source: Source,
    agent: ureq::Agent,
    /// Attempts per file after an interrupted transfer (each resumes): 0..=100.
    retries: u32,
    /// Pause before a retry, times the attempt number.
    backoff: Duration,
    progress: bool,
}

impl Fetcher {
    /// A fetcher writing under `root` (the data directory). Timeouts: 15 s to connect, 60 s
    /// without a byte.
    pub fn new(root: impl Into<PathBuf>, source: Source) -> Result<Fetcher> {
        if let Source::Mirror(m) | Source::UpstreamVia(m) = &source {
            check_url(m).map_err(|e| Error::Config(format!("mirror: {e}")))?;
        }
        Ok(Fetcher {
            root: root.into(),
            source,
            agent: agent(Duration::from_secs(15), Duration::from_secs(60)),
            retries: 3,
            backoff: Duration::from_millis(500),
            progress: true,
        })
    }

    /// The source for a `--mirror` flag: the flag, else `$HETFED_MIRROR` (non-empty), else upstream.
    pub fn source_from(flag: Option<&str>) -> Source {
        match flag.map(str::to_string).or_else(|| std::env::var(MIRROR_ENV).ok().filter(|v| !v.trim().is_empty())) {
            Some(m) => Source::Mirror(m.trim().trim_end_matches('/').to_string()),
            None => Source::Upstream,
        }
    }

    /// Sets the connect and read timeouts (each 1 ms..=1 hour).
    pub fn timeouts(mut self, connect: Duration, read: Duration) -> Result<Self> {
        for (what, d) in [("connect timeout", connect), ("read timeout", read)] {
            if d < Duration::from_millis(1) || d > Duration::from_secs(3600) {
                return Err(Error::Config(format!("{what}: expected 1 ms..=1 h, found {d:?}")));
            }
        }
        self.agent = agent(connect, read);
        Ok(self)
    }

    /// Sets how often an interrupted download is resumed within one call (0..=100) and the pause
    /// before each retry (times the attempt number; at most 60 s).
    pub fn retries(mut self, n: u32, backoff: Duration) -> Result<Self> {
        if n > 100 {
            return Err(Error::Config(format!("retries: expected 0..=100, found {n}")));
        }
        if backoff > Duration::from_secs(60) {
            return Err(Error::Config(format!("retry backoff: expected at most 60 s, found {backoff:?}")));
        }
        self.retries = n;
        self.backoff = backoff;
        Ok(self)
    }

    /// Draw progress bars on stderr (when it is a terminal; default true).
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Where `f` of `d` is found in the data directory, if anywhere: hetfed's layout or, for a
    /// full upstream file, its upstream name.
    pub fn present(&self, d: &DatasetEntry, f: &FileEntry) -> Option<PathBuf> {
        present(&self.root, d, f)
    }

    /// The files of `d` that a task needing `tags` needs (`None`: all) and that are missing.
    pub fn missing<'a>(&self, d: &'a DatasetEntry, tags: Option<&[String]>) -> Vec<&'a FileEntry> {
        d.files.iter().filter(|f| f.needed_for(tags) && self.present(d, f).is_none()).collect()
    }

    /// The URL `f` is downloaded from and where it is saved (relative to the dataset folder).
    fn url_of<'a>(&self, d: &DatasetEntry, f: &'a FileEntry) -> Result<(String, &'a str)> {
        match &self.source {
            Source::Mirror(m) => Ok((format!("{}/{}/{}", m.trim_end_matches('/'), d.dir, f.path), &f.path)),
            Source::Upstream | Source::UpstreamVia(_) => match (f.upstream, &f.url) {
                (Upstream::Transformed, _) | (_, None) => Err(Error::Config(format!(
                    "{}/{}: hetfed's layout is made by a transformation hetfed does not implement ({}); fetch it \
                     from a mirror of hetfed's layout (--mirror URL or ${MIRROR_ENV}) or place it at {}",
                    d.dir,
                    f.path,
                    f.transform.as_deref().unwrap_or("see the manifest"),
                    self.root.join(&d.dir).join(&f.path).display()
                ))),
                (_, Some(u)) => Ok((self.upstream_url(u), f.upstream_path())),
            },
        }
    }

    /// Downloads the missing files of `d` a task needing `tags` needs (`None`: all), printing
    /// the dataset's licence first through `say` (once, and only when something is fetched).
    /// Every file is tried; the error names the first failure and how many failed.
    pub fn fetch_dataset(
        &self,
        d: &DatasetEntry,
        tags: Option<&[String]>,
        say: &mut dyn FnMut(&str),
    ) -> Result<Vec<Outcome>> {
        let missing = self.missing(d, tags);
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        say(&format!("{}: licence {} (source {})", d.name, d.licence, d.source));
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for f in missing {
            match self.fetch_file(d, f) {
                Ok(o) => out.push(o),
                Err(e) => errors.push(e),
            }
        }
        match errors.len() {
            0 => Ok(out),
            1 => Err(errors.remove(0)),
            n => {
                let first = errors.remove(0);
                Err(Error::Http(format!("{first} (and {} more of {}'s files failed)", n - 1, d.name)))
            }
        }
    }

    /// Downloads one file unless it is present: waits for any other process fetching it, resumes
    /// a `.part` file, verifies size and hash, records the hash in the lock file, renames into
    /// place.
    pub fn fetch_file(&self, d: &DatasetEntry, f: &FileEntry) -> Result<Outcome> {
        if let Some(p) = self.present(d, f) {
            return Ok(Outcome::Present(p));
        }
        if f.upstream == Upstream::Derived && !matches!(self.source, Source::Mirror(_)) {
            return self.derive_file(d, f);
        }
        let (url, rel) = self.url_of(d, f)?;
        check_url(&url)?;
        let dest = self.root.join(&d.dir).join(rel);
        let key = format!("{}/{}", d.dir, rel);
        let lock_path = self.root.join(LOCKS_DIR).join(format!("{key}.lock"));
        let _guard = lock(&lock_path)?;
        if dest.exists() {
            return Ok(Outcome::Present(dest));
        }
        let expect = self.expect(d, f, &url, &key)?;
        let (size, resumed_from) = self.download_to(&url, &dest, &expect, &key, true)?;
        Ok(Outcome::Downloaded { path: dest, bytes: size, resumed_from })
    }

    /// Downloads `url` to `dest` (the caller holds `dest`'s lock): resumes `dest.part`, retries
    /// an interrupted transfer, verifies against `expect`, renames into place. A `kept` file (not
    /// a derived file's transient input) is synced to disk and, when `expect` has no hash, pinned
    /// in the lock file. Returns the size and the bytes resumed from.
    fn download_to(&self, url: &str, dest: &Path, expect: &Expect, key: &str, kept: bool) -> Result<(u64, u64)> {
        let parent = dest.parent().expect("a file path has a parent");
        let part = with_suffix(dest, ".part");
        let resumed_from = file_len(&part);
        let bar = self.bar(key);
        let mut attempt = 0;
        loop {
            match self.download(url, &part, expect, &bar) {
                Ok(()) => break,
                Err(Error::Interrupted { .. }) if attempt < self.retries => {
                    attempt += 1;
                    std::thread::sleep(self.backoff * attempt);
                }
                Err(e) => {
                    bar.abandon();
                    return Err(e);
                }
            }
        }
        bar.finish_and_clear();
        let (size, sha) = verify(&part, expect, url, key)?;
        if kept && expect.sha256.is_none() {
            self.pin(key, Pin { url: url.to_string(), size, sha256: sha })?;
        }
        if kept {
            File::open(&part)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", part.display()), e))?;
        }
        std::fs::rename(&part, dest)
            .map_err(|e| Error::io(format!("renaming {} to {}", part.display(), dest.display()), e))?;
        if kept {
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok((size, resumed_from))
    }

    /// A derived file from upstream (the caller checked it is absent): under the file's lock,
    /// downloads the recipe's inputs into `<dataset>/.upstream/<host>/<path>` (resumable, checked
    /// against the manifest's input size and hash where it has them), runs the recipe,
    /// checks the result against the manifest's size and hash, writes it by atomic rename, and
    /// deletes the inputs no other missing file of the dataset reads.
    fn derive_file(&self, d: &DatasetEntry, f: &FileEntry) -> Result<Outcome> {
        let recipe = f.recipe.as_deref().expect("a derived file has a recipe (checked)");
        let dest = self.root.join(&d.dir).join(&f.path);
        let key = format!("{}/{}", d.dir, f.path);
        let _guard = lock(&self.root.join(LOCKS_DIR).join(format!("{key}.lock")))?;
        if dest.exists() {
            return Ok(Outcome::Present(dest));
        }
        let specs = f.expanded_inputs().map_err(|e| Error::Config(format!("{key}: {e}")))?;
        let mut inputs = Vec::new();
        let mut saved = Vec::new();
        for input in &specs {
            let url = self.upstream_url(&input.url);
            check_url(&url)?;
            let rel = format!(".upstream/{}", input.url.strip_prefix("https://").unwrap_or(&input.url));
            if !crate::manifest::safe_rel(&rel) {
                return Err(Error::Config(format!("{key}: input url {} does not map to a file name", input.url)));
            }
            let path = self.root.join(&d.dir).join(&rel);
            let ikey = format!("{}/{rel}", d.dir);
            let _iguard = lock(&self.root.join(LOCKS_DIR).join(format!("{ikey}.lock")))?;
            // An input without a hash in the manifest is checked through the derived file's hash.
            let expect = Expect {
                size: input.size,
                sha256: input.sha256.clone(),
                from: match input.sha256 {
                    Some(_) => format!("the manifest's input entry for {key}"),
                    None => "nothing (checked through the derived file's hash)".into(),
                },
            };
            if path.is_file() {
                // Left by an earlier run: verify it again (a mismatch deletes it) and use it.
                let part = with_suffix(&path, ".part");
                std::fs::rename(&path, &part)
                    .map_err(|e| Error::io(format!("renaming {} to {}", path.display(), part.display()), e))?;
            }
            self.download_to(&url, &path, &expect, &ikey, false)?;
            inputs.push(std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?);
            saved.push(path);
        }
        let urls: Vec<&str> = f.inputs.iter().map(|i| i.url.as_str()).collect();
        let bytes = crate::transform::derive_with(recipe, &inputs, &specs)
            .map_err(|e| Error::Mismatch(format!("{key}: recipe `{recipe}` failed on {}: {e}", urls.join(" + "))))?;
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        if bytes.len() as u64 != f.size || sha != f.sha256 {
            return Err(Error::Mismatch(format!(
                "{key}: recipe `{recipe}` made {} bytes with sha256 {sha} from {}, expected {} bytes with sha256 {} \
                 (from the manifest); not written",
                bytes.len(),
                urls.join(" + "),
                f.size,
                f.sha256
            )));
        }
        let part = with_suffix(&dest, ".part");
        let parent = dest.parent().expect("a file path has a parent");
        std::fs::create_dir_all(parent).map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
        let mut out = File::create(&part).map_err(|e| Error::io(format!("opening {}", part.display()), e))?;
        out.write_all(&bytes)
            .and_then(|()| out.sync_all())
            .map_err(|e| Error::io(format!("writing {}", part.display()), e))?;
        drop(out);
        std::fs::rename(&part, &dest)
            .map_err(|e| Error::io(format!("renaming {} to {}", part.display(), dest.display()), e))?;
        if let Ok(dir) = File::open(parent) {
            let _ = dir.sync_all();
        }
        for (input, p) in specs.iter().zip(saved) {
            // Kept while another missing derived file of the dataset reads it (XL-Sum's train and
            // validation files come from one zip).
            let needed = d.files.iter().any(|g| {
                g.path != f.path
                    && g.upstream == Upstream::Derived
                    && g.expanded_inputs().is_ok_and(|gi| gi.iter().any(|i| i.url == input.url))
                    && self.present(d, g).is_none()
            });
            if needed {
                continue;
            }
            let _ = std::fs::remove_file(&p);
            // Remove the folders left empty, up to the dataset folder's `.upstream`.
            let top = self.root.join(&d.dir);
            let mut dir = p.parent();
            while let Some(x) = dir.filter(|x| x.starts_with(&top) && *x != top) {
                if std::fs::remove_dir(x).is_err() {
                    break;
                }
                dir = x.parent();
            }
        }
        Ok(Outcome::Downloaded { path: dest, bytes: f.size, resumed_from: 0 })
    }

    /// `u` as fetched from this source: itself, or through the upstream stand-in.
    fn upstream_url(&self, u: &str) -> String {
        match (&self.source, u.strip_prefix("https://")) {
            (Source::UpstreamVia(m), Some(rest)) => format!("{}/{rest}", m.trim_end_matches('/')),
            _ => u.to_string(),
        }
    }

    /// What the download of `f` from `url` must match: the manifest's size and hash for bytes of
    /// hetfed's layout, else the lock file's pin, else nothing (first use).
    fn expect(&self, d: &DatasetEntry, f: &FileEntry, url: &str, key: &str) -> Result<Expect> {
        let hetfed_layout = matches!(self.source, Source::Mirror(_)) || f.upstream == Upstream::Same;
        if hetfed_layout {
            return Ok(Expect {
                size: Some(f.size),
                sha256: Some(f.sha256.clone()),
                from: format!("the manifest's entry for {}/{}", d.dir, f.path),
            });
        }
        let lock = self.read_lock()?;
        Ok(match lock.files.get(key) {
            Some(p) if p.url == url => Expect {
                size: Some(p.size),
                sha256: Some(p.sha256.clone()),
                from: format!("{} (pinned on first download)", self.root.join(LOCK_FILE).display()),
            },
            _ => Expect { size: None, sha256: None, from: "nothing (first download: trust on first use)".into() },
        })
    }

    fn read_lock(&self) -> Result<LockFile> {
        let path = self.root.join(LOCK_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                Error::Config(format!(
                    "{}: expected the TOML lock file hetfed data fetch writes ([files.\"<dir>/<path>\"] url, size, \
                     sha256), found: {}",
                    path.display(),
                    e.to_string().replace('\n', " ")
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LockFile::default()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Records a first download's size and hash in the lock file (under its own lock).
    fn pin(&self, key: &str, pin: Pin) -> Result<()> {
        let _guard = lock(&self.root.join(LOCKS_DIR).join(format!("{LOCK_FILE}.lock")))?;
        let mut lock = self.read_lock()?;
        lock.files.insert(key.to_string(), pin);
        let text = format!(
            "# Written by `hetfed data fetch`: the size and SHA-256 of each file downloaded here whose hash the\n\
             # manifest does not hold, recorded on first download; later downloads must match.\n{}",
            toml::to_string(&lock).map_err(|e| Error::Config(format!("writing the lock file: {e}")))?
        );
        let path = self.root.join(LOCK_FILE);
        let tmp = with_suffix(&path, ".tmp");
        std::fs::write(&tmp, text).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("renaming {}", tmp.display()), e))
    }

    fn bar(&self, key: &str) -> ProgressBar {
        let target = if self.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(key.to_string());
        bar
    }

    /// One attempt: appends to `part` from its current length (HTTP `Range`), or starts over
    /// when the server ignores the range.
    fn download(&self, url: &str, part: &Path, expect: &Expect, bar: &ProgressBar) -> Result<()> {
        let mut have = file_len(part);
        if let Some(size) = expect.size {
            if have > size {
                truncate(part)?;
                have = 0;
            }
            if have == size {
                return Ok(());
            }
        }
        let mut req = self.agent.get(url);
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()), // the .part is complete: verify it
            Err(ureq::Error::Status(404, _)) => {
                return Err(Error::Http(format!("not found: the server has no file at {url} (HTTP 404)")))
            }
            Err(ureq::Error::Status(code, r)) => {
                return Err(Error::Http(format!("HTTP {code} {} from {url}", r.status_text())))
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Error::Interrupted { url: url.into(), got: have, why: format!("cannot reach it: {t}") })
            }
        };
        let length: Option<u64> = resp.header("Content-Length").and_then(|v| v.trim().parse().ok());
        let start = match resp.status() {
            206 => {
                let from = resp
                    .header("Content-Range")
                    .and_then(|v| v.trim().strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if from != Some(have) {
                    return Err(Error::Http(format!(
                        "{url}: asked for bytes {have}- and the server sent {:?}",
                        resp.header("Content-Range").unwrap_or("no Content-Range")
                    )));
                }
                have
            }
            200 => 0,
            s => return Err(Error::Http(format!("HTTP {s} {} from {url}: expected 200 or 206", resp.status_text()))),
        };
        if let (Some(size), Some(len)) = (expect.size, length) {
            if start + len != size {
                let _ = std::fs::remove_file(part);
                return Err(Error::Mismatch(format!(
                    "wrong size: {url} offers {} bytes, expected {size} (from {})",
                    start + len,
                    expect.from
                )));
            }
        }
        // The folder is made only once bytes arrive: a failed fetch leaves no empty dataset folder.
        if let Some(dir) = part.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let mut file = if start == 0 { File::create(part) } else { OpenOptions::new().append(true).open(part) }
            .map_err(|e| Error::io(format!("opening {}", part.display()), e))?;
        bar.set_length(length.map_or(start, |l| start + l));
        bar.set_position(start);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = start;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = file.flush();
                    return Err(Error::Interrupted { url: url.into(), got, why: e.to_string() });
                }
            };
            file.write_all(&buf[..n]).map_err(|e| Error::io(format!("writing {}", part.display()), e))?;
            got += n as u64;
            bar.set_position(got);
        }
        file.flush().map_err(|e| Error::io(format!("writing {}", part.display()), e))?;
        if let Some(len) = length {
            if got < start + len {
                return Err(Error::Interrupted {
                    url: url.into(),
                    got,
                    why: format!("the connection closed before the announced {} bytes", start + len),
                });
            }
        }
        Ok(())
    }
}

/// Checks the downloaded `part` against `expect`; a mismatch deletes it. Returns its size and hash.
fn verify(part: &Path, expect: &Expect, url: &str, key: &str) -> Result<(u64, String)> {
    let size = file_len(part);
    if let Some(want) = expect.size {
        if size != want {
            let _ = std::fs::remove_file(part);
            return Err(Error::Mismatch(format!(
                "wrong size for {key}: expected {want} bytes (from {}), found {size} (downloaded from {url}; deleted)",
                expect.from
            )));
        }
    }
    let sha = sha256_file(part)?;
    if let Some(want) = &expect.sha256 {
        if &sha != want {
            let _ = std::fs::remove_file(part);
            return Err(Error::Mismatch(format!(
                "sha256 mismatch for {key}: expected {want} (from {}), found {sha} (downloaded from {url}; deleted)",
                expect.from
            )));
        }
    }
    Ok((size, sha))
}

fn present(root: &Path, d: &DatasetEntry, f: &FileEntry) -> Option<PathBuf> {
    let base = root.join(&d.dir);
    [f.path.as_str(), f.upstream_path()].iter().map(|p| base.join(p)).find(|p| p.is_file())
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn truncate(p: &Path) -> Result<()> {
    File::create(p).map(drop).map_err(|e| Error::io(format!("truncating {}", p.display()), e))
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An exclusive lock on `path` (created if needed), held until the file is dropped; waits for
/// another holder (another thread or process) to finish.
fn lock(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening the lock file {}", path.display()), e))?;
    f.lock().map_err(|e| Error::io(format!("locking {}", path.display()), e))?;
    Ok(f)
}

fn agent(connect: Duration, read: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(connect).timeout_read(read).redirects(5).build()
}

/// HTTPS anywhere; plain HTTP only to a loopback host (a test mirror).
pub(crate) fn check_url(url: &str) -> Result<()> {
    if url.starts_with("https://") {
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let authority = rest.split('/').next().unwrap_or_default();
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next().unwrap_or_default()
        } else {
            authority.rsplit_once(':').map_or(authority, |(h, _)| h)
        };
        let loopback =
            host == "localhost" || host.parse::<std::net::IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false);
        if loopback {
            return Ok(());
        }
        return Err(Error::Config(format!(
            "expected an https:// URL (plain http:// only for a loopback mirror such as http://127.0.0.1:PORT), found {url}"
        )));
    }
    Err(Error::Config(format!("expected an https:// URL, found {url}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_may_use_plain_http() {
        for ok in ["https://example.org/a", "http://127.0.0.1:8080/x", "http://localhost/x", "http://[::1]:9/x"] {
            check_url(ok).unwrap();
        }
        for bad in ["http://example.org/a", "http://10.0.0.1/x", "ftp://x/y", "file:///etc/passwd"] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains("expected an https:// URL") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn settings_are_range_checked() {
        let f = Fetcher::new("/tmp/x", Source::Upstream).unwrap();
        let e = f.retries(101, Duration::ZERO).err().unwrap().to_string();
        assert!(e.contains("0..=100") && e.contains("101"), "{e}");
        let f = Fetcher::new("/tmp/x", Source::Upstream).unwrap();
        let e = f.timeouts(Duration::ZERO, Duration::from_secs(1)).err().unwrap().to_string();
        assert!(e.contains("connect timeout"), "{e}");
        let e = Fetcher::new("/tmp/x", Source::Mirror("http://example.org".into())).err().unwrap().to_string();
        assert!(e.starts_with("mirror: expected an https:// URL"), "{e}");
    }
}
