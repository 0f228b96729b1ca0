//! Files from outside never panic: bounded fuzzing of the parsers behind the boundary
//! (`config.json`, `tokenizer.json`, safetensors, whole model directories) with mutated bytes of
//! real files: truncations, byte flips, inserted junk, deleted and duplicated ranges. Every case
//! must give `Ok` or an error of one non-empty line; a case that fails prints its seed.
//!
//! The mutator is a small seeded one (SplitMix64 through `hetfed_core::mix_seed`), so every run
//! tries the same cases and a failure reproduces.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use hetfed_core::testing::fuzz::{header_len, mutate, run};
use hetfed_model::{Arch, Checkpoint};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(rel)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Runs `cases` mutations of `orig` through `parse` (hetfed_core's seeded fuzzer: no panic, every
/// error one line); returns how many parsed.
fn fuzz<T>(
    what: &str,
    orig: &[u8],
    cases: u64,
    focus: usize,
    parse: impl Fn(&[u8]) -> hetfed_core::Result<T>,
) -> usize {
    let (ok, errors) = run(what, 0xF022, cases, |rng| parse(&mutate(orig, rng, focus)));
    let caught = errors.iter().filter(|m| m.contains("its parser cannot read")).count();
    eprintln!("{what}: {caught} panics of a dependency caught at the boundary");
    ok
}

#[test]
fn mutated_configs_never_panic() {
    for path in [repo("models/base-small/config.json"), fixture("llama_gqa/config.json")] {
        let orig = std::fs::read(&path).unwrap();
        Arch::from_config_bytes(&orig, &path).expect("the original parses");
        let ok = fuzz("config.json", &orig, 200, orig.len(), |b| Arch::from_config_bytes(b, &path));
        assert!(ok < 200, "some mutations must be refused");
    }
}

#[test]
fn mutated_tokenizers_never_panic() {
    // The 250 kB tokenizer of the repo's model gets few cases (each parse reads its whole
    // vocabulary); the fixture's small one gets more.
    for (path, cases) in [(repo("models/base-small/tokenizer.json"), 64), (fixture("bloom_h3/tokenizer.json"), 200)] {
        let orig = std::fs::read(&path).unwrap();
        hetfed_model::tokenizer::from_bytes(&orig, &path).expect("the original parses");
        fuzz("tokenizer.json", &orig, cases, orig.len(), |b| {
            let tok = hetfed_model::tokenizer::from_bytes(b, &path)?;
            // What loaded must also tokenise without a panic (an error is the caller's to report).
            let _ = tok.encode("the cat sat, 12 ✓", true).map(|e| tok.decode(e.get_ids(), true));
            Ok(())
        });
    }
}

/// Every truncation inside a tokenizer's sections before its (long) vocabulary: where the
/// `tokenizers` crate panics (a cut inside `"decoder"`), which random cuts of a 250 kB file
/// rarely hit.
#[test]
fn every_truncation_of_a_tokenizers_sections_is_an_error() {
    let mut caught = 0;
    for path in [repo("models/base-small/tokenizer.json"), fixture("bloom_h3/tokenizer.json")] {
        let orig = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&orig);
        let end = text.find("\"vocab\"").expect("a BPE vocabulary") + 16;
        for cut in 0..end {
            let r = catch_unwind(AssertUnwindSafe(|| hetfed_model::tokenizer::from_bytes(&orig[..cut], &path)));
            let msg = match r {
                Err(_) => panic!("{}: cut at {cut} panicked", path.display()),
                Ok(Ok(_)) => panic!("{}: cut at {cut} parsed", path.display()),
                Ok(Err(e)) => e.to_string(),
            };
            assert!(
                msg.contains("tokenizer.json: expected a Hugging Face tokenizer") && !msg.contains('\n'),
                "cut at {cut}: {msg}"
            );
            caught += usize::from(msg.contains("its parser cannot read"));
        }
    }
    assert!(caught > 0, "the sweep reaches the cuts where the tokenizers crate panics");
}

#[test]
fn the_truncated_tokenizer_of_the_issue_is_one_line_naming_the_file() {
    let path = repo("models/base-small/tokenizer.json");
    let orig = std::fs::read(&path).unwrap();
    let err = hetfed_model::tokenizer::from_bytes(&orig[..1000], &path).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("expected a Hugging Face tokenizer"), "{err}");
    assert!(err.contains("its parser cannot read"), "this cut is one where the tokenizers crate panics: {err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn mutated_safetensors_never_panic() {
    let path = fixture("bloom_h3/model.safetensors");
    let orig = std::fs::read(&path).unwrap();
    let focus = header_len(&orig);
    let ok = fuzz("model.safetensors", &orig, 200, focus, |b| hetfed_core::tensors_from_bytes(b, &path, true));
    assert!(ok < 200, "some mutations must be refused");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn model_directories_with_a_mutated_file_never_panic() {
    let src = fixture("bloom_h3");
    let dir = std::env::temp_dir().join(format!("hetfed-robust-{}", std::process::id()));
    copy_dir(&src, &dir);
    for (i, file) in ["config.json", "tokenizer.json", "model.safetensors"].into_iter().enumerate() {
        let orig = std::fs::read(src.join(file)).unwrap();
        let focus = if file.ends_with(".safetensors") { header_len(&orig) } else { orig.len() };
        fuzz(file, &orig, 40, focus, |b| {
            std::fs::write(dir.join(file), b).unwrap();
            Checkpoint::load(&dir).map(|ck| ck.tokenizer.is_some())
        });
        std::fs::copy(src.join(file), dir.join(file)).unwrap();
        assert!(Checkpoint::load(&dir).is_ok(), "case set {i}: the restored directory loads");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_given_as_the_model_directory_says_so() {
    let cfg = fixture("bloom_h3/config.json");
    let err = Checkpoint::load(&cfg).err().expect("a file is not a model directory").to_string();
    assert!(err.contains("expected a model directory") && err.contains("found a file"), "{err}");
    assert!(err.contains(&fixture("bloom_h3").display().to_string()), "names the directory to pass: {err}");
    let err = Checkpoint::load(&fixture("no_such_model")).err().unwrap().to_string();
    assert!(err.contains("found no such directory"), "{err}");
}

#[test]
fn a_size_no_model_has_is_refused_before_any_allocation() {
    let path = fixture("bloom_h3/config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"n_layer\": 2", "\"n_layer\": 2000000000");
    let err = Arch::from_config_bytes(text.as_bytes(), &path).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("layers") && err.contains("2000000000"), "{err}");
}
