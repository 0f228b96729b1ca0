//! Task vector files from outside never panic: bounded fuzzing of `TaskVector::from_bytes`
//! (then, for what parses, the validation every update passes before it touches a model) and of
//! PEFT adapter import, with mutated bytes of files written by this crate: truncations, byte
//! flips, inserted junk, deleted and duplicated ranges. Every case must give `Ok` or an error of
//! one non-empty line; a failing case prints its seed. The mutator is seeded, so runs repeat.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hetfed_core::TensorMap;
use hetfed_model::{LoraConfig, ModelIdentity};
use hetfed_taskvec::{Delta, TaskVector};

struct Rng(u64, u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.1 += 1;
        hetfed_core::mix_seed(self.0, self.1)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const JUNK: &[u8] = b"{}[]\":,0123456789-+.eE \\nul\xff\x00";

/// One to three mutations of `orig`, half of them inside the first `focus` bytes.
fn mutate(orig: &[u8], rng: &mut Rng, focus: usize) -> Vec<u8> {
    let mut b = orig.to_vec();
    let pos = |rng: &mut Rng, len: usize| {
        if rng.below(2) == 0 {
            rng.below(focus.min(len).max(1))
        } else {
            rng.below(len.max(1))
        }
    };
    for _ in 0..1 + rng.below(3) {
        let len = b.len();
        let i = pos(rng, len).min(len);
        let j = (i + 1 + rng.below(64)).min(len);
        match rng.below(5) {
            0 => b.truncate(i),
            1 => {
                if i < len {
                    b[i] ^= 1 + rng.below(255) as u8;
                }
            }
            2 => {
                let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| JUNK[rng.below(JUNK.len())]).collect();
                b.splice(i..i, junk);
            }
            3 => {
                b.drain(i..j);
            }
            _ => {
                let copy = b[i..j].to_vec();
                b.splice(i..i, copy);
            }
        }
    }
    b
}

fn check(what: &str, cases: u64, mut case: impl FnMut(&mut Rng) -> hetfed_core::Result<()>) -> usize {
    let mut ok = 0;
    for n in 0..cases {
        let seed = hetfed_core::mix_seed(0x7A5C, n);
        match catch_unwind(AssertUnwindSafe(|| case(&mut Rng(seed, 0)))) {
            Err(_) => panic!("{what}: case {n} (seed {seed:#x}) panicked"),
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(!msg.trim().is_empty() && !msg.contains('\n'), "{what}: case {n} (seed {seed:#x}): {msg:?}");
            }
        }
    }
    eprintln!("{what}: {cases} cases, {ok} parsed and validated");
    ok
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

fn header_len(b: &[u8]) -> usize {
    8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize
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
