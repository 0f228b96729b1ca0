//! Task vector files from outside never panic: bounded fuzzing of `TaskVector::from_bytes`
//! (then, for what parses, the validation every update passes before it touches a model) and of
//! PEFT adapter import, with mutated bytes of files written by this crate: truncations, byte
//! flips, inserted junk, deleted and duplicated ranges. Every case must give `Ok` or an error of
//! one non-empty line; a failing case prints its seed. The mutator is seeded, so runs repeat.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hetfed_core::testing::fuzz::{header_len, mutate, run, Rng};
use hetfed_core::TensorMap;
use hetfed_model::{LoraConfig, ModelIdentity};
use hetfed_taskvec::{Delta, TaskVector};

/// Runs `cases` seeded cases through hetfed_core's fuzzer (no panic, every error one line);
/// returns how many parsed and validated.
fn check(what: &str, cases: u64, case: impl FnMut(&mut Rng) -> hetfed_core::Result<()>) -> usize {
    run(what, 0x7A5C, cases, case).0
}

fn ident() -> ModelIdentity {
    ModelIdentity { arch: "bloom".into(), config_hash: "c".repeat(64), weights_hash: "w".repeat(64) }
}

fn wave(rows: usize, cols: usize, k: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 + k) * 0.37).sin() * 0.1).collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
}

fn base() -> TensorMap {
    let mut m = TensorMap::new();
    for l in 0..2 {
        m.insert(format!("h.{l}.q.weight"), wave(6, 4, l as f32));
        m.insert(format!("h.{l}.v.weight"), wave(6, 4, 3.0 + l as f32));
        m.insert(format!("h.{l}.ln.bias"), wave(1, 6, 7.0).flatten_all().unwrap());
    }
    m
}

fn lora() -> TaskVector {
    let mut f = TensorMap::new();
    for l in 0..2 {
        for m in ["q", "v"] {
            f.insert(format!("h.{l}.{m}.lora_A"), wave(2, 4, l as f32 + 1.0));
            f.insert(format!("h.{l}.{m}.lora_B"), wave(6, 2, l as f32 + 2.0));
        }
    }
    let cfg = LoraConfig { rank: 2, alpha: 4.0, dropout: 0.05, targets: vec!["q".into(), "v".into()] };
    TaskVector::from_lora_factors(ident(), cfg, f).unwrap()
}

fn full() -> TaskVector {
    let b = base();
    let d: TensorMap = b.iter().map(|(k, t)| (k.clone(), (t * 0.01).unwrap())).collect();
    TaskVector { base: ident(), kind: Delta::Full(d) }
}

#[test]
fn mutated_task_vector_files_never_panic() {
    let base = base();
    let files = [
        ("lora f32", lora().to_bytes(DType::F32).unwrap()),
        ("full f16", full().to_bytes(DType::F16).unwrap()),
        ("lora int8", lora().to_bytes_int8().unwrap()),
    ];
    for (what, orig) in &files {
        let tv = TaskVector::from_bytes(orig, Path::new("tv.safetensors")).unwrap();
        tv.validate(&ident(), &base, "the base model", f64::INFINITY).expect("the original is valid");
        let focus = header_len(orig);
        let ok = check(what, 200, |rng| {
            let bytes = mutate(orig, rng, focus);
            let tv = TaskVector::from_bytes(&bytes, Path::new("tv.safetensors"))?;
            // What parses still passes (or fails) the validation without a panic, and applies.
            tv.apply_validated(&ident(), &base, 0.5, "the base model").map(|_| ())
        });
        assert!(ok < 200, "{what}: some mutations must be refused");
    }
}

#[test]
fn mutated_peft_adapters_never_panic() {
    let dir = std::env::temp_dir().join(format!("hetfed-taskvec-robust-{}", std::process::id()));
    hetfed_taskvec::peft::export_peft(&lora(), &dir, "base").unwrap();
    for file in [hetfed_taskvec::peft::CONFIG_FILE, hetfed_taskvec::peft::WEIGHTS_FILE] {
        let orig = std::fs::read(dir.join(file)).unwrap();
        let focus = if file.ends_with(".json") { orig.len() } else { header_len(&orig) };
        check(file, 100, |rng| {
            std::fs::write(dir.join(file), mutate(&orig, rng, focus)).unwrap();
            let (cfg, factors) = hetfed_taskvec::peft::import_peft(&dir)?;
            let tv = TaskVector::from_lora_factors(ident(), cfg, factors)?;
            tv.validate(&ident(), &base(), "the base model", f64::INFINITY).map(|_| ())
        });
        std::fs::write(dir.join(file), &orig).unwrap();
    }
    assert!(hetfed_taskvec::peft::import_peft(&dir).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}
