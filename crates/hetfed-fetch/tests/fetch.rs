//! Downloads through a loopback mirror (no internet): the ../shared layout reproduced byte for
//! byte, resume after a cut connection, corrupted and wrong-size files refused, a missing file,
//! concurrent fetches of one file, trust on first use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hetfed_fetch::testing::Mirror;
use hetfed_fetch::{DatasetEntry, Error, Fetcher, Manifest, Outcome, Source, LOCK_FILE};
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
    let m = Manifest::embedded();
    let copa = m.get("copa").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = Fetcher::new(dir.path(), Source::Upstream).unwrap().progress(false);
    let e = f.fetch_file(copa, &copa.files[0]).unwrap_err().to_string();
    assert!(e.contains("copa/copa_en.jsonl") && e.contains("transformation hetfed does not implement"), "{e}");
    assert!(e.contains("--mirror") && e.contains(&dir.path().join("copa/copa_en.jsonl").display().to_string()), "{e}");
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
    let upstream_key = |url: &str| url.strip_prefix("https://").unwrap().to_string();
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
