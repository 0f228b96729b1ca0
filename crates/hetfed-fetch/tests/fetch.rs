//! Downloads through a loopback mirror (no internet): the ../shared layout reproduced byte for
//! byte, resume after a cut connection, corrupted and wrong-size files refused, a missing file,
//! concurrent fetches of one file, trust on first use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hetfed_fetch::testing::Mirror;
use hetfed_fetch::{DatasetEntry, Error, Fetcher, Manifest, Outcome, Source, Upstream, LOCK_FILE};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Deterministic test bytes (not text: every byte value occurs).
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// A one-dataset manifest (`toy`, folder `toy/`) with the given files of hetfed's layout.
fn toy_manifest(files: &[(&str, &[u8])]) -> Manifest {
    let mut m = String::from(
        "version = 1\n[[dataset]]\nname = \"toy\"\ndir = \"toy\"\nlicence = \"CC0-1.0\"\nsource = \"https://example.org/toy @ abc\"\n",
    );
    for (path, b) in files {
        m.push_str(&format!(
            "[[dataset.file]]\npath = \"{path}\"\nsize = {}\nsha256 = \"{}\"\nupstream = \"same\"\nurl = \"https://example.org/toy/{path}\"\n",
            b.len(),
            sha(b)
        ));
    }
    Manifest::parse(&m, "toy manifest").unwrap()
}

fn fetcher(root: &Path, mirror: &Mirror) -> Fetcher {
    Fetcher::new(root, Source::Mirror(mirror.url()))
        .unwrap()
        .timeouts(Duration::from_secs(5), Duration::from_secs(5))
        .unwrap()
        .retries(3, Duration::from_millis(10))
        .unwrap()
        .progress(false)
}

fn toy(m: &Manifest) -> &DatasetEntry {
    m.get("toy").unwrap()
}

#[test]
fn a_mirror_fetch_writes_the_file_prints_the_licence_once_and_is_idempotent() {
    let (a, b) = (bytes(70_000, 1), bytes(10, 2));
    let m = toy_manifest(&[("a.bin", &a), ("sub/b.txt", &b)]);
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", a.clone());
    mirror.put("toy/sub/b.txt", b.clone());
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), &mirror);
    assert_eq!(f.missing(toy(&m), None).len(), 2);
    let mut said = Vec::new();
    let out = f.fetch_dataset(toy(&m), None, &mut |s| said.push(s.to_string())).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("licence CC0-1.0"), "{said:?}");
    assert_eq!(std::fs::read(dir.path().join("toy/a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(dir.path().join("toy/sub/b.txt")).unwrap(), b);
    assert!(f.missing(toy(&m), None).is_empty());
    // Again: nothing to fetch, nothing said, no request.
    let n = mirror.requests().len();
    said.clear();
    assert!(f.fetch_dataset(toy(&m), None, &mut |s| said.push(s.to_string())).unwrap().is_empty());
    assert!(said.is_empty() && mirror.requests().len() == n);
    // No leftovers beside the data.
    let leftovers: Vec<_> =
        walk(&dir.path().join("toy")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "part")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_cut_connection_resumes_with_a_range_request() {
    let a = bytes(200_000, 3);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", a.clone());
    mirror.cut("toy/a.bin", 70_000, 1);
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), &mirror);
    let out = f.fetch_file(toy(&m), &toy(&m).files[0]).unwrap();
    assert!(matches!(out, Outcome::Downloaded { bytes: 200_000, .. }), "{out:?}");
    assert_eq!(std::fs::read(dir.path().join("toy/a.bin")).unwrap(), a);
    let reqs = mirror.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!((reqs[0].range_start, reqs[1].range_start), (None, Some(70_000)));
}

#[test]
fn an_interrupted_run_leaves_a_part_file_that_the_next_run_resumes() {
    let a = bytes(150_000, 4);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", a.clone());
    mirror.cut("toy/a.bin", 50_000, 1);
    let dir = tempfile::tempdir().unwrap();
    let once = fetcher(dir.path(), &mirror).retries(0, Duration::ZERO).unwrap();
    let e = once.fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err();
    assert!(matches!(e, Error::Interrupted { got: 50_000, .. }), "{e:?}");
    assert!(e.to_string().contains("run the command again to resume"), "{e}");
    let part = dir.path().join("toy/a.bin.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 50_000);
    assert!(!dir.path().join("toy/a.bin").exists());
    let out = once.fetch_file(toy(&m), &toy(&m).files[0]).unwrap();
    assert!(matches!(out, Outcome::Downloaded { resumed_from: 50_000, .. }), "{out:?}");
    assert_eq!(std::fs::read(dir.path().join("toy/a.bin")).unwrap(), a);
    assert!(!part.exists());
    assert_eq!(mirror.requests()[1].range_start, Some(50_000));
}

#[test]
fn a_server_without_range_support_restarts_the_file() {
    let a = bytes(90_000, 5);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", a.clone());
    mirror.ignore_range("toy/a.bin");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("toy")).unwrap();
    std::fs::write(dir.path().join("toy/a.bin.part"), &a[..1000]).unwrap();
    fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap();
    assert_eq!(std::fs::read(dir.path().join("toy/a.bin")).unwrap(), a);
}

#[test]
fn a_corrupted_file_is_refused_naming_both_hashes_and_deleted() {
    let a = bytes(40_000, 6);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mut bad = a.clone();
    bad[12_345] ^= 0x40;
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", bad.clone());
    let dir = tempfile::tempdir().unwrap();
    let e = fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err().to_string();
    assert!(e.contains("sha256 mismatch for toy/a.bin"), "{e}");
    assert!(e.contains(&sha(&a)) && e.contains(&sha(&bad)), "both hashes: {e}");
    assert!(e.contains(&mirror.url()) && !e.contains('\n'), "{e}");
    assert!(!dir.path().join("toy/a.bin").exists() && !dir.path().join("toy/a.bin.part").exists());
}

#[test]
fn a_file_of_the_wrong_size_is_refused() {
    let a = bytes(40_000, 7);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", a[..39_000].to_vec());
    let dir = tempfile::tempdir().unwrap();
    let e = fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err().to_string();
    assert!(e.contains("wrong size") && e.contains("39000") && e.contains("40000"), "{e}");
    assert!(!dir.path().join("toy/a.bin").exists() && !dir.path().join("toy/a.bin.part").exists());
}

#[test]
fn a_file_missing_on_the_server_is_a_clear_error() {
    let a = bytes(100, 8);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mirror = Mirror::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let e = fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err().to_string();
    assert_eq!(e, format!("not found: the server has no file at {}/toy/a.bin (HTTP 404)", mirror.url()));
    assert!(!dir.path().join("toy").exists(), "a failed fetch leaves no empty dataset folder");
}

#[test]
fn an_unreachable_mirror_is_a_clear_error() {
    let a = bytes(100, 9);
    let m = toy_manifest(&[("a.bin", &a)]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let f = Fetcher::new(dir.path(), Source::Mirror(format!("http://127.0.0.1:{port}")))
        .unwrap()
        .retries(1, Duration::from_millis(1))
        .unwrap()
        .progress(false);
    let e = f.fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err().to_string();
    assert!(e.contains("cannot reach it") && e.contains(&format!("127.0.0.1:{port}/toy/a.bin")), "{e}");
}

#[test]
fn concurrent_fetches_of_one_file_download_it_once() {
    let a = bytes(300_000, 10);
    let m = toy_manifest(&[("a.bin", &a)]);
    let mirror = Mirror::start().unwrap();
    mirror.put("toy/a.bin", a.clone());
    mirror.delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (m, mirror, root) = (&m, &mirror, dir.path());
                s.spawn(move || fetcher(root, mirror).fetch_file(toy(m), &toy(m).files[0]).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(mirror.count("toy/a.bin"), 1, "{:?}", mirror.requests());
    let downloaded = outcomes.iter().filter(|o| matches!(o, Outcome::Downloaded { .. })).count();
    assert_eq!(downloaded, 1, "{outcomes:?}");
    assert_eq!(std::fs::read(dir.path().join("toy/a.bin")).unwrap(), a);
}

#[test]
fn transformed_files_are_mirror_only_and_say_so() {
    // The embedded manifest has no such file any more: a toy one.
    let text = toy_manifest(&[("a.txt", b"a\n")]).datasets[0].files[0].sha256.clone();
    let m = Manifest::parse(
        &format!(
            "version = 1\n[[dataset]]\nname = \"toy\"\ndir = \"toy\"\nlicence = \"CC0-1.0\"\n\
             source = \"https://example.org/toy @ abc\"\n[[dataset.file]]\npath = \"a.txt\"\nsize = 2\n\
             sha256 = \"{text}\"\nupstream = \"transformed\"\nurl = \"https://example.org/toy/src\"\n\
             transform = \"something hetfed does not do\"\n"
        ),
        "toy manifest",
    )
    .unwrap();
    let (d, f) = (toy(&m), &toy(&m).files[0]);
    assert!(
        Manifest::embedded().datasets.iter().flat_map(|d| &d.files).all(|f| f.upstream != Upstream::Transformed),
        "every file of the embedded manifest is fetched from upstream"
    );
    let dir = tempfile::tempdir().unwrap();
    let fetch = Fetcher::new(dir.path(), Source::Upstream).unwrap().progress(false);
    let e = fetch.fetch_file(d, f).unwrap_err().to_string();
    let path = format!("{}/{}", d.dir, f.path);
    assert!(e.contains(&path) && e.contains("transformation hetfed does not implement"), "{e}");
    assert!(e.contains("--mirror") && e.contains(&dir.path().join(&path).display().to_string()), "{e}");
}

/// The shared data folder, or `None` (skipped; a failure under CI=true).
fn shared_data() -> Option<PathBuf> {
    hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data")
}

/// The mirror layout: every file the manifest lists, fetched from a mirror serving ../shared/data,
/// equals its ../shared copy byte for byte, and matches the manifest's size and hash.
#[test]
fn a_mirror_of_shared_reproduces_its_layout_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let m = Manifest::embedded();
    let mirror = Mirror::start().unwrap();
    mirror.serve_dir("", &shared, |rel| rel.ends_with("PROVENANCE.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(dir.path(), &mirror);
    let mut n = 0;
    for d in &m.datasets {
        f.fetch_dataset(d, None, &mut |_| {}).unwrap();
        for file in &d.files {
            let ours = std::fs::read(dir.path().join(&d.dir).join(&file.path)).unwrap();
            let theirs = std::fs::read(shared.join(&d.dir).join(&file.path)).unwrap();
            assert!(ours == theirs, "{}/{} differs from ../shared", d.dir, file.path);
            n += 1;
        }
    }
    assert!(n >= 60, "{n} files");
}

/// The upstream path, with a loopback server standing in for the upstream hosts: files whose
/// upstream bytes ../shared keeps unchanged (`upstream = "same"`) land in ../shared's layout byte
/// for byte; a full upstream file (`upstream = "full"`) lands under its upstream name, is pinned
/// in the lock file on first download, and a later download that differs is refused.
#[test]
fn upstream_urls_reproduce_unchanged_files_and_pin_full_files_on_first_use() {
    let Some(shared) = shared_data() else { return };
    let m = Manifest::embedded();
    let mirror = Mirror::start().unwrap();
    let mut same = 0;
    for d in &m.datasets {
        for f in &d.files {
            match (f.upstream, &f.url) {
                (hetfed_fetch::Upstream::Same, Some(u)) => {
                    mirror.put(&upstream_key(u), std::fs::read(shared.join(&d.dir).join(&f.path)).unwrap());
                    same += 1;
                }
                (hetfed_fetch::Upstream::Full, Some(u)) => {
                    // Stand-in for the full upstream file: ../shared's cut plus rows it holds out.
                    let mut b = std::fs::read(shared.join(&d.dir).join(&f.path)).unwrap();
                    b.extend_from_slice(b"held-out row\n");
                    mirror.put(&upstream_key(u), b);
                }
                _ => {}
            }
        }
    }
    assert!(same >= 11, "flores (9) and scitldr (2) are unchanged upstream: {same}");
    let dir = tempfile::tempdir().unwrap();
    let f = Fetcher::new(dir.path(), Source::UpstreamVia(mirror.url())).unwrap().progress(false);
    for name in ["flores", "scitldr"] {
        let d = m.get(name).unwrap();
        f.fetch_dataset(d, None, &mut |_| {}).unwrap();
        for file in &d.files {
            let ours = std::fs::read(dir.path().join(&d.dir).join(&file.path)).unwrap();
            assert!(ours == std::fs::read(shared.join(&d.dir).join(&file.path)).unwrap(), "{}", file.path);
        }
    }
    let ethos = m.get("ethos").unwrap();
    let file = &ethos.files[0];
    assert!(matches!(f.fetch_file(ethos, file).unwrap(), Outcome::Downloaded { .. }));
    let saved = dir.path().join("ethos").join(file.upstream_path());
    let first = std::fs::read(&saved).unwrap();
    let lock = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
    assert!(lock.contains("ethos/Ethos_Dataset_Binary.csv") && lock.contains(&sha(&first)), "{lock}");
    // Upstream changes under the pinned URL: refused against the pin.
    std::fs::remove_file(&saved).unwrap();
    let mut changed = first.clone();
    changed[0] ^= 0x20;
    mirror.put(&upstream_key(file.url.as_deref().unwrap()), changed.clone());
    let e = f.fetch_file(ethos, file).unwrap_err().to_string();
    assert!(e.contains("sha256 mismatch") && e.contains(&sha(&first)) && e.contains(&sha(&changed)), "{e}");
    assert!(e.contains(LOCK_FILE), "names the pin's origin: {e}");
    // Tico: a full upstream file keeps its upstream name, which the loader reads.
    let tico = m.get("tico").unwrap();
    let want = vec!["en-hi".to_string()];
    f.fetch_dataset(tico, Some(&want), &mut |_| {}).unwrap();
    assert!(dir.path().join("tico19/en-hi/tico19-test.en").is_file());
    assert!(f.missing(tico, Some(&want)).is_empty());
    assert_eq!(f.missing(tico, None).len(), 9);
}

/// The mirror path that stands in for an upstream URL under [`Source::UpstreamVia`].
fn upstream_key(url: &str) -> String {
    url.strip_prefix("https://").unwrap().to_string()
}

fn upstream_fetcher(root: &Path, mirror: &Mirror) -> Fetcher {
    Fetcher::new(root, Source::UpstreamVia(mirror.url()))
        .unwrap()
        .timeouts(Duration::from_secs(5), Duration::from_secs(5))
        .unwrap()
        .retries(3, Duration::from_millis(10))
        .unwrap()
        .progress(false)
}

/// A CSV field as Python's `csv.writer` (QUOTE_MINIMAL) writes it.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// ILSUM from upstream: ../shared's JSONL written back as the upstream CSV (the inverse of the
/// recipe) is the upstream file byte for byte — its size and SHA-256 are the manifest's input
/// pin — and fetching it through the upstream path derives ../shared's file byte for byte.
#[test]
fn ilsum_is_derived_from_its_upstream_csv_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let m = Manifest::embedded();
    let d = m.get("ilsum").unwrap();
    let f = &d.files[0];
    assert_eq!(f.upstream, Upstream::Derived);
    let theirs = std::fs::read(shared.join(&d.dir).join(&f.path)).unwrap();
    let mut csv = String::from("Id,Heading,Article,Summary\n");
    for r in jsonl(&shared.join(&d.dir).join(&f.path)) {
        let cols: Vec<String> =
            ["id", "heading", "article_extract", "summary"].iter().map(|k| csv_field(r[k].as_str().unwrap())).collect();
        csv.push_str(&cols.join(","));
        csv.push('\n');
    }
    let input = &f.inputs[0];
    assert_eq!((Some(csv.len() as u64), Some(sha(csv.as_bytes()))), (input.size, input.sha256.clone()));
    let mirror = Mirror::start().unwrap();
    mirror.put(&upstream_key(&input.url), csv.into_bytes());
    mirror.cut(&upstream_key(&input.url), 1_000_000, 1);
    let dir = tempfile::tempdir().unwrap();
    let fetch = upstream_fetcher(dir.path(), &mirror);
    let out = fetch.fetch_dataset(d, None, &mut |_| {}).unwrap();
    assert!(matches!(&out[..], [Outcome::Downloaded { .. }]), "{out:?}");
    let ours = std::fs::read(dir.path().join(&d.dir).join(&f.path)).unwrap();
    assert!(ours == theirs, "{}/{} differs from ../shared", d.dir, f.path);
    let reqs = mirror.requests();
    assert_eq!(reqs.len(), 2, "the cut download resumed: {reqs:?}");
    assert_eq!(reqs[1].range_start, Some(1_000_000));
    // Only the derived file is left: the upstream input and its folder are gone.
    assert_eq!(walk(&dir.path().join(&d.dir)), vec![dir.path().join(&d.dir).join(&f.path)]);
    assert!(fetch.fetch_dataset(d, None, &mut |_| {}).unwrap().is_empty());
}

/// COPA from upstream, with stand-ins built from ../shared: the Balanced-COPA XML (with the
/// alternatives of every odd original item swapped, as Balanced-COPA swaps some, and held-out
/// items 401 and 1401 added) and the NLP-NL labels file (original ids and labels). The recipe
/// restores the original order, drops the held-out items, and reproduces ../shared byte for byte.
#[test]
fn copa_is_derived_from_balanced_copa_and_the_original_labels_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let mut m = Manifest::embedded();
    let d = m.datasets.iter_mut().find(|d| d.name == "copa").unwrap();
    let f = &mut d.files[0];
    assert_eq!((f.upstream, f.inputs.len()), (Upstream::Derived, 2));
    // The stand-ins are not the upstream bytes: no input pins.
    for i in &mut f.inputs {
        (i.size, i.sha256) = (None, None);
    }
    let d = d.clone();
    let f = d.files[0].clone();
    let rows = jsonl(&shared.join(&d.dir).join(&f.path));
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let item = |id: i64, q: &str, ans: i64, p: &str, a1: &str, a2: &str| {
        format!(
            "  <item id=\"{id}\" asks-for=\"{q}\" most-plausible-alternative=\"{ans}\">\n    <p>{}</p>\n    \
             <a1>{}</a1>\n    <a2>{}</a2>\n  </item>\n\n",
            esc(p),
            esc(a1),
            esc(a2)
        )
    };
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<copa-corpus  version=\"1.0\">\n\n");
    let mut labels = String::new();
    let mut swapped = 0;
    for r in &rows {
        let id = r["id"].as_i64().unwrap();
        let (p, q) = (r["premise"].as_str().unwrap(), r["question"].as_str().unwrap());
        let (c1, c2, label) =
            (r["choice1"].as_str().unwrap(), r["choice2"].as_str().unwrap(), r["label"].as_i64().unwrap());
        if id <= 500 {
            labels.push_str(&format!("{{\"id\": {id}, \"question\": \"{q}\", \"label\": {label}}}\n"));
        }
        if id <= 500 && id % 2 == 1 {
            xml.push_str(&item(id, q, 2 - label, p, c2, c1));
            swapped += 1;
        } else {
            xml.push_str(&item(id, q, label + 1, p, c1, c2));
        }
        if id == 400 {
            xml.push_str(&item(401, "cause", 1, "Held out.", "x", "y"));
            xml.push_str(&item(1401, "effect", 2, "Held out, mirrored.", "x", "y"));
        }
    }
    xml.push_str("</copa-corpus>\n");
    assert_eq!((rows.len(), swapped), (800, 200));
    let mirror = Mirror::start().unwrap();
    mirror.put(&upstream_key(&f.inputs[0].url), xml.into_bytes());
    mirror.put(&upstream_key(&f.inputs[1].url), labels.into_bytes());
    let dir = tempfile::tempdir().unwrap();
    let fetch = upstream_fetcher(dir.path(), &mirror);
    assert!(matches!(fetch.fetch_file(&d, &f).unwrap(), Outcome::Downloaded { .. }));
    let ours = std::fs::read(dir.path().join(&d.dir).join(&f.path)).unwrap();
    assert!(ours == std::fs::read(shared.join(&d.dir).join(&f.path)).unwrap(), "copa differs from ../shared");
    // Inputs without a manifest pin are checked through the result only: nothing is pinned.
    assert!(!dir.path().join(LOCK_FILE).exists());
    assert_eq!(walk(&dir.path().join(&d.dir)).len(), 1);
}

/// mltext from upstream: for every file made by `dedup-lines`, stand-in inputs built from
/// ../shared's lines (split into contiguous parts, one per input, with repeated lines, blank lines
/// and padded repeats added; CSV files for inputs that name columns) derive ../shared's file byte
/// for byte.
#[test]
fn mltext_text_files_are_derived_by_dropping_repeated_lines_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let mut m = Manifest::embedded();
    let d = m.datasets.iter_mut().find(|d| d.name == "mltext").unwrap();
    let mirror = Mirror::start().unwrap();
    let mut n = 0;
    for f in d.files.iter_mut().filter(|f| f.recipe.as_deref() == Some("dedup-lines")) {
        let text = std::fs::read_to_string(shared.join("mltext").join(&f.path)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let k = f.inputs.len();
        let per = lines.len().div_ceil(k);
        for (i, input) in f.inputs.iter_mut().enumerate() {
            (input.size, input.sha256) = (None, None);
            let part = &lines[(i * per).min(lines.len())..((i + 1) * per).min(lines.len())];
            let mut text: Vec<String> = Vec::new();
            if i > 0 {
                text.extend([lines[0].to_string(), String::new()]);
            }
            text.extend(part.iter().map(|l| l.to_string()));
            // A padded repeat of a line this input already gave.
            text.push(format!("  {} \r", part.first().unwrap_or(&lines[0])));
            let b = if input.columns.is_empty() {
                text.iter().map(|l| format!("{l}\n")).collect::<String>()
            } else {
                // A CSV file: the lines fill the named columns one after the other.
                let c = input.columns.len();
                let rows = text.len().div_ceil(c);
                let mut b = format!("{},Label\n", input.columns.join(","));
                for r in 0..rows {
                    let cells: Vec<String> =
                        (0..c).map(|k| csv_field(text.get(k * rows + r).map_or("", |s| s.as_str()))).collect();
                    b.push_str(&format!("{},x\n", cells.join(",")));
                }
                b
            };
            mirror.put(&upstream_key(&input.url), b.into_bytes());
        }
        n += 1;
    }
    assert!(n >= 17, "commonvoice (8), post2012 (6), l3cube (1), cltk (2): {n}");
    let d = d.clone();
    let dir = tempfile::tempdir().unwrap();
    let fetch = upstream_fetcher(dir.path(), &mirror);
    for f in d.files.iter().filter(|f| f.recipe.as_deref() == Some("dedup-lines")) {
        fetch.fetch_file(&d, f).unwrap();
        let ours = std::fs::read(dir.path().join("mltext").join(&f.path)).unwrap();
        assert!(ours == std::fs::read(shared.join("mltext").join(&f.path)).unwrap(), "{} differs", f.path);
    }
}

/// mltext from GitHub's source archives (`zip-text`): a stand-in archive per file in the
/// upstream layout (everything under `<repo>-<commit>/`; ../shared's lines spread over member
/// files in the selected folders, in path order, with repeated and padded lines, lines the
/// recipe must skip, and members it must not read) derives ../shared's file byte for byte.
#[test]
fn mltext_files_are_derived_from_github_source_archives_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let mut m = Manifest::embedded();
    let d = m.datasets.iter_mut().find(|d| d.name == "mltext").unwrap();
    let mirror = Mirror::start().unwrap();
    let mut paths = Vec::new();
    for f in d.files.iter_mut().filter(|f| f.recipe.as_deref() == Some("zip-text")) {
        let text = std::fs::read_to_string(shared.join("mltext").join(&f.path)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let input = &mut f.inputs[0];
        assert!(input.url.starts_with("https://github.com/") && input.url.ends_with(".zip"), "{}", input.url);
        assert_eq!((input.size, input.sha256.as_deref()), (None, None), "GitHub's archive bytes are not pinned");
        let mut parts = input.url.trim_end_matches(".zip").rsplit('/');
        let (commit, repo) = (parts.next().unwrap(), parts.nth(1).unwrap());
        let top = format!("{repo}-{commit}");
        let ud = input.line_prefix.is_some();
        // Member paths in byte order under the selected folders; the lines split over them.
        let (dirs, not_read): (&[&str], &[&str]) = if ud {
            (
                &["not-to-release/sources/answers", "not-to-release/sources/email"],
                &[
                    "not-to-release/sources/answers/deeper/x.conllu",
                    "not-to-release/sources/answers.conllu",
                    "en_ewt-ud-train.conllu",
                    "not-to-release/sources/email/a.txt",
                ],
            )
        } else {
            (
                &["texts/bhagavatham/part-1", "texts/vemana_satakam"],
                &[
                    "texts/siva_puranam/kailasa_khandam/chapter-1",
                    "texts/brahma_puranam/a",
                    "texts/srimadbhagavatham/b/c",
                    "README.md",
                ],
            )
        };
        let k = 6;
        let per = lines.len().div_ceil(k);
        let mut members: Vec<(String, Vec<u8>)> = vec![(format!("{top}/"), Vec::new())];
        for i in 0..k {
            let part = &lines[(i * per).min(lines.len())..((i + 1) * per).min(lines.len())];
            let mut body: Vec<String> = Vec::new();
            if i > 0 {
                body.extend([lines[0].to_string(), String::new()]);
            }
            body.extend(part.iter().map(|l| l.to_string()));
            body.push(format!("  {} \r", part.first().unwrap_or(&lines[0])));
            let body: String = if ud {
                body.iter().map(|l| format!("# sent_id = s\n# text = {l}\n1\tword\t_\n\n")).collect()
            } else {
                body.iter().map(|l| format!("{l}\n")).collect()
            };
            let name = format!("{}/{:02}{}", dirs[i / 3], i, if ud { ".conllu" } else { "" });
            members.push((format!("{top}/{name}"), body.into_bytes()));
        }
        for n in not_read {
            let junk = if ud { "# text = not read\n" } else { "not read\n" };
            members.push((format!("{top}/{n}"), junk.as_bytes().to_vec()));
        }
        // Archive order is not the recipe's order: it sorts the paths.
        members.reverse();
        mirror.put(&upstream_key(&input.url), stored_zip(&members));
        paths.push(f.path.clone());
    }
    assert_eq!(paths, ["cltk_wikisource/te_classical_verse.txt", "ud_english_ewt/en.txt"]);
    let d = d.clone();
    let dir = tempfile::tempdir().unwrap();
    let fetch = upstream_fetcher(dir.path(), &mirror);
    for f in d.files.iter().filter(|f| f.recipe.as_deref() == Some("zip-text")) {
        fetch.fetch_file(&d, f).unwrap();
        let ours = std::fs::read(dir.path().join("mltext").join(&f.path)).unwrap();
        assert!(ours == std::fs::read(shared.join("mltext").join(&f.path)).unwrap(), "{} differs", f.path);
    }
    assert_eq!(walk(&dir.path().join("mltext")).len(), 2, "no archive left");
}

/// A zip archive of stored members (what `zip -0` writes; CRCs are not checked by the reader).
fn stored_zip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut cd) = (Vec::new(), Vec::new());
    for (name, bytes) in members {
        let local = out.len() as u32;
        let fields = |h: &mut Vec<u8>| {
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend([0u8; 12]); // flags, method 0 (stored), time, date, crc
            h.extend((bytes.len() as u32).to_le_bytes());
            h.extend((bytes.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes());
        };
        out.extend(0x0403_4b50u32.to_le_bytes());
        fields(&mut out);
        out.extend(name.as_bytes());
        out.extend(bytes);
        cd.extend(0x0201_4b50u32.to_le_bytes());
        cd.extend(20u16.to_le_bytes()); // version made by
        fields(&mut cd);
        cd.extend([0u8; 10]); // comment length, disk, attributes
        cd.extend(local.to_le_bytes());
        cd.extend(name.as_bytes());
    }
    let (at, n) = (out.len() as u32, members.len() as u16);
    out.extend(&cd);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend(n.to_le_bytes());
    out.extend(n.to_le_bytes());
    out.extend((cd.len() as u32).to_le_bytes());
    out.extend(at.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// Non-ASCII characters as JSON `\uXXXX` escapes (surrogate pairs above U+FFFF): the same JSON
/// text as Python's `ensure_ascii=True` would write.
fn ascii_escaped(line: &str) -> String {
    let mut out = String::new();
    for c in line.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// XL-Sum from upstream: a stand-in of each language's `dummy_data.zip`, built from ../shared's
/// train and validation rows (non-ASCII text escaped, as JSON allows; no newline after the last
/// row, as upstream; a test member beside them), derives ../shared's files byte for byte, and the
/// zip both files read is downloaded once.
#[test]
fn xlsum_files_are_derived_from_the_dummy_data_zips_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let mut m = Manifest::embedded();
    let d = m.datasets.iter_mut().find(|d| d.name == "xlsum").unwrap();
    let mut zips: std::collections::BTreeMap<String, Vec<(String, Vec<u8>)>> = Default::default();
    for f in d.files.iter_mut() {
        assert_eq!((f.upstream, f.recipe.as_deref(), f.inputs.len()), (Upstream::Derived, Some("zip-jsonl"), 1));
        let input = &mut f.inputs[0];
        (input.size, input.sha256) = (None, None);
        let text = std::fs::read_to_string(shared.join("xlsum").join(&f.path)).unwrap();
        let rows: Vec<String> = text.lines().map(ascii_escaped).collect();
        let member = format!("dummy_data/uc%3Fid%3Dx%26export%3Ddownload/{}", input.member.as_deref().unwrap());
        let zip = zips.entry(input.url.clone()).or_default();
        if zip.is_empty() {
            zip.push(("dummy_data/uc%3Fid%3Dx%26export%3Ddownload/x_test.jsonl".into(), b"{\"id\": \"t\"}".to_vec()));
        }
        zip.push((member, rows.join("\n").into_bytes()));
    }
    assert_eq!((d.files.len(), zips.len()), (16, 8));
    let mirror = Mirror::start().unwrap();
    for (url, members) in &zips {
        let zip = stored_zip(members);
        // The size is known (as upstream's is): a zip kept for the second file is not asked for again.
        for f in d.files.iter_mut().filter(|f| &f.inputs[0].url == url) {
            f.inputs[0].size = Some(zip.len() as u64);
        }
        mirror.put(&upstream_key(url), zip);
    }
    let d = d.clone();
    let dir = tempfile::tempdir().unwrap();
    let fetch = upstream_fetcher(dir.path(), &mirror);
    assert_eq!(fetch.fetch_dataset(&d, None, &mut |_| {}).unwrap().len(), 16);
    for f in &d.files {
        let ours = std::fs::read(dir.path().join("xlsum").join(&f.path)).unwrap();
        assert!(ours == std::fs::read(shared.join("xlsum").join(&f.path)).unwrap(), "{} differs", f.path);
    }
    for url in zips.keys() {
        assert_eq!(mirror.count(&upstream_key(url)), 1, "{url} downloaded once");
    }
    assert_eq!(walk(&dir.path().join("xlsum")).len(), 16, "no zip left");
}

/// Whether BBC's split rule holds `title + " " + article` out: `int(sha256(normalize(text)), 16)
/// % 10 == 0` (normalize: collapse white space, lowercase).
fn bbc_held_out(text: &str) -> bool {
    let norm = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    Sha256::digest(norm.as_bytes()).iter().fold(0u32, |r, &b| (r * 256 + u32::from(b)) % 10) == 0
}

/// BBC News Summary from upstream: stand-ins of the 2 x 2225 upstream files, built from
/// ../shared's rows (article file = title, blank line, article; padded summary) and, for the
/// items ../shared holds out, made-up items that the split rule holds out, derive ../shared's
/// file byte for byte.
#[test]
fn bbc_is_derived_from_the_article_and_summary_files_byte_for_byte() {
    let Some(shared) = shared_data() else { return };
    let m = Manifest::embedded();
    let d = m.get("bbc").unwrap();
    let f = &d.files[0];
    let inputs = f.expanded_inputs().unwrap();
    let n = inputs.len() / 2;
    assert_eq!(n, 2225);
    let rows: std::collections::BTreeMap<String, serde_json::Value> = jsonl(&shared.join(&d.dir).join(&f.path))
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect();
    let mirror = Mirror::start().unwrap();
    let mut made_up = 0;
    for i in 0..n {
        let url = &inputs[i].url;
        let mut parts = url.rsplit('/');
        let (file, category) = (parts.next().unwrap(), parts.next().unwrap());
        let id = format!("{category}/{}", file.trim_end_matches(".txt"));
        let (article, summary) = match rows.get(&id) {
            Some(r) => {
                let s = |k: &str| r[k].as_str().unwrap().to_string();
                (format!("{}\n\n{}\n", s("title"), s("article")), format!("{} \n", s("summary")))
            }
            None => {
                made_up += 1;
                let title =
                    (0..).map(|k| format!("Held out {id} {k}")).find(|t| bbc_held_out(&format!("{t} text"))).unwrap();
                (format!("{title}\n\ntext\n"), "summary".to_string())
            }
        };
        assert!(inputs[n + i].url.ends_with(&format!("/Summaries/{id}.txt")), "{}", inputs[n + i].url);
        mirror.put(&upstream_key(url), article.into_bytes());
        mirror.put(&upstream_key(&inputs[n + i].url), summary.into_bytes());
    }
    assert_eq!((rows.len(), made_up), (1993, 232));
    let dir = tempfile::tempdir().unwrap();
    let fetch = upstream_fetcher(dir.path(), &mirror);
    assert!(matches!(fetch.fetch_file(d, f).unwrap(), Outcome::Downloaded { .. }));
    let ours = std::fs::read(dir.path().join(&d.dir).join(&f.path)).unwrap();
    assert!(ours == std::fs::read(shared.join(&d.dir).join(&f.path)).unwrap(), "bbc differs from ../shared");
    assert_eq!(walk(&dir.path().join(&d.dir)).len(), 1, "the 4450 upstream files are deleted");
}

/// A derived file is written only when both its inputs and its result match: an upstream file
/// that differs from the manifest's input pin is refused (and deleted); a result that differs
/// from the manifest's hash is refused and nothing is written.
#[test]
fn a_derived_file_is_refused_when_an_input_or_the_result_differs() {
    let csv = "Id,Heading,Article,Summary\nhindi_1,h,\"a, b\",s\n";
    let out = "{\"id\": \"hindi_1\", \"heading\": \"h\", \"article_extract\": \"a, b\", \"summary\": \"s\"}\n";
    let manifest = |out_sha: &str, in_sha: &str| {
        Manifest::parse(
            &format!(
                "version = 1\n[[dataset]]\nname = \"toy\"\ndir = \"toy\"\nlicence = \"l\"\nsource = \"s\"\n\
                 [[dataset.file]]\npath = \"t.jsonl\"\nsize = {}\nsha256 = \"{out_sha}\"\nupstream = \"derived\"\n\
                 recipe = \"ilsum-csv\"\ntransform = \"CSV to JSONL\"\n\
                 [[dataset.file.input]]\nurl = \"https://example.org/toy/t.csv\"\nsha256 = \"{in_sha}\"\n",
                out.len()
            ),
            "toy",
        )
        .unwrap()
    };
    let mirror = Mirror::start().unwrap();
    mirror.put("example.org/toy/t.csv", csv.as_bytes().to_vec());
    // Both match.
    let m = manifest(&sha(out.as_bytes()), &sha(csv.as_bytes()));
    let dir = tempfile::tempdir().unwrap();
    upstream_fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("toy/t.jsonl")).unwrap(), out);
    // The upstream file changed.
    let other = "0".repeat(64);
    let m = manifest(&sha(out.as_bytes()), &other);
    let dir = tempfile::tempdir().unwrap();
    let e = upstream_fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err().to_string();
    assert!(e.contains("sha256 mismatch for toy/.upstream/example.org/toy/t.csv") && e.contains(&other), "{e}");
    assert!(walk(&dir.path().join("toy")).is_empty(), "{:?}", walk(&dir.path().join("toy")));
    // The result differs from the manifest's hash.
    let m = manifest(&other, &sha(csv.as_bytes()));
    let dir = tempfile::tempdir().unwrap();
    let e = upstream_fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap_err().to_string();
    assert!(e.contains("toy/t.jsonl: recipe `ilsum-csv` made") && e.contains(&sha(out.as_bytes())), "{e}");
    assert!(e.contains(&other) && e.contains("not written"), "{e}");
    assert!(!dir.path().join("toy/t.jsonl").exists() && !dir.path().join("toy/t.jsonl.part").exists());
    // From a mirror of hetfed's layout, a derived file is served as is.
    mirror.put("toy/t.jsonl", out.as_bytes().to_vec());
    let m = manifest(&sha(out.as_bytes()), &other);
    let dir = tempfile::tempdir().unwrap();
    fetcher(dir.path(), &mirror).fetch_file(toy(&m), &toy(&m).files[0]).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("toy/t.jsonl")).unwrap(), out);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}
