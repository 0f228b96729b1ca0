//! Half-precision resident weights (`WeightDtype::Stored` on an f16 file): the same log-probs,
//! logits and LoRA gradients as the same file widened to f32 at load (the values are exactly
//! representable, so only the order of summation may differ), and log-probs within half-precision
//! rounding of the f32 original.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hetfed_core::testing::max_abs_diff;
use hetfed_model::model::Unfused;
use hetfed_model::{CausalLm, Checkpoint, LoraConfig, LoraSet, WeightDtype};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Tiny BLOOM and Llama fixtures (f32 files, one f16) and the repository's base-small (f16).
fn models() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        ["bloom_h3", "llama_gqa", "llama_tied", "bloom_h8_f16"].into_iter().map(fixture).collect();
    v.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/base-small"));
    v
}

/// Log-probs of the f16 copy against the f32 original: f16 keeps 11 significant bits (a relative
/// rounding of at most 2^-12 per weight). On these fixtures the largest change of a log-prob is
/// 1.5e-3 (BLOOM) to 5.9e-3 (Llama); the bound leaves about 3x room.
const HALF_TOL: f32 = 0.02;

/// Summation order only (blocked or online log-sum-exp against one product).
const ORDER_TOL: f32 = 1e-4;

fn batch(vocab: u32) -> (Tensor, Vec<u32>, Tensor) {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(7);
    let (lens, t) = ([9usize, 6, 3], 9);
    let mut ids = vec![0u32; 3 * t];
    let mut targets = vec![0u32; 3 * (t - 1)];
    let mut mask = vec![0f32; 3 * (t - 1)];
    for (b, &len) in lens.iter().enumerate() {
        for j in 0..len {
            ids[b * t + j] = r.random_range(4..vocab);
        }
        for j in 1..len {
            targets[b * (t - 1) + j - 1] = ids[b * t + j];
            mask[b * (t - 1) + j - 1] = 1.0;
        }
    }
    let dev = &Device::Cpu;
    (Tensor::from_vec(ids, (3, t), dev).unwrap(), targets, Tensor::from_vec(mask, (3, t - 1), dev).unwrap())
}

/// `src` saved as f16 into a temporary directory (with `save_as`).
fn f16_copy(src: &Path) -> tempfile::TempDir {
    let ck = Checkpoint::load(src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    ck.save_as(&ck.weights, dir.path(), DType::F16).unwrap();
    dir
}

fn scores(m: &dyn CausalLm) -> (Tensor, Tensor) {
    let (ids, targets, _) = batch(m.vocab_size() as u32);
    (m.target_logprobs(&ids, &targets).unwrap(), m.forward(&ids, None).unwrap())
}

#[test]
fn stored_keeps_matrices_half_and_widens_small_tensors() {
    let dir = f16_copy(&fixture("llama_gqa"));
    let half = Checkpoint::load_with(dir.path(), WeightDtype::Stored).unwrap();
    let wide = Checkpoint::load_with(dir.path(), WeightDtype::F32).unwrap();
    for (k, t) in &half.weights {
        let want = if t.rank() >= 2 { DType::F16 } else { DType::F32 };
        assert_eq!(t.dtype(), want, "{k}");
        assert_eq!(wide.weights[k].dtype(), DType::F32, "{k}");
    }
    // Who the model is does not depend on how it is held.
    assert_eq!(half.identity().unwrap(), wide.identity().unwrap());
    // Asking for f16 on an f32 file rounds exactly as writing an f16 file does; bf16 too.
    let narrowed = Checkpoint::load_with(&fixture("llama_gqa"), WeightDtype::F16).unwrap();
    for (k, t) in &half.weights {
        assert_eq!(narrowed.weights[k].dtype(), t.dtype(), "{k}");
        // (Small tensors are f32 either way: unrounded from the f32 file.)
        if t.rank() >= 2 {
            let d = max_abs_diff(&narrowed.weights[k].to_dtype(DType::F32).unwrap(), &t.to_dtype(DType::F32).unwrap());
            assert_eq!(d, 0.0, "{k}");
        }
    }
    let bf = Checkpoint::load_with(&fixture("llama_gqa"), WeightDtype::Bf16).unwrap();
    assert_eq!(bf.weights["model.embed_tokens.weight"].dtype(), DType::BF16);
    assert_eq!(bf.weights["model.norm.weight"].dtype(), DType::F32);
    // An f32 file as stored is f32.
    let f = Checkpoint::load_with(&fixture("llama_gqa"), WeightDtype::Stored).unwrap();
    assert!(f.weights.values().all(|t| t.dtype() == DType::F32));
    assert_eq!("bf16".parse::<WeightDtype>().unwrap(), WeightDtype::Bf16);
    assert!("f64".parse::<WeightDtype>().unwrap_err().contains("stored, f32, bf16, f16"));
}

#[test]
fn half_resident_model_scores_as_the_same_file_widened() {
    for src in models() {
        let dir = f16_copy(&src);
        let half = Checkpoint::load_with(dir.path(), WeightDtype::Stored).unwrap();
        assert!(half.weights.values().any(|t| t.dtype() == DType::F16), "{}", src.display());
        let wide = Checkpoint::load_with(dir.path(), WeightDtype::F32).unwrap();
        let (hm, wm) = (half.model(None).unwrap(), wide.model(None).unwrap());
        let ((hl, hf), (wl, wf)) = (scores(hm.as_ref()), scores(wm.as_ref()));
        let d = max_abs_diff(&hl, &wl);
        assert!(d < ORDER_TOL, "{}: fused log-probs differ by {d}", src.display());
        let d = max_abs_diff(&hf, &wf);
        assert!(d < ORDER_TOL, "{}: logits differ by {d}", src.display());
        // Scoring through the full logits agrees too.
        let (ids, targets, _) = batch(hm.vocab_size() as u32);
        let u = Unfused(hm.as_ref()).target_logprobs(&ids, &targets).unwrap();
        assert!(max_abs_diff(&u, &hl) < ORDER_TOL, "{}", src.display());
        // Generation reads the same weights.
        let g = hetfed_model::generate::SamplingConfig { max_new_tokens: 6, ..Default::default() };
        let prompt = vec![1u32, 5, 9];
        let a = hetfed_model::generate::generate(hm.as_ref(), &prompt, &g, None).unwrap();
        let b = hetfed_model::generate::generate(wm.as_ref(), &prompt, &g, None).unwrap();
        assert_eq!(a, b, "{}: greedy continuations differ", src.display());
    }
}

#[test]
fn half_resident_model_is_within_half_precision_of_the_f32_original() {
    for name in ["bloom_h3", "llama_gqa", "llama_tied"] {
        let orig = Checkpoint::load(&fixture(name)).unwrap();
        let half = Checkpoint::load_with(&fixture(name), WeightDtype::F16).unwrap();
        let (ol, _) = scores(orig.model(None).unwrap().as_ref());
        let (hl, _) = scores(half.model(None).unwrap().as_ref());
        let d = max_abs_diff(&ol, &hl);
        assert!(d < HALF_TOL, "{name}: log-probs differ by {d}");
        // ... and rounding does change them (the comparison is not vacuous).
        assert!(d > 0.0, "{name}");
    }
}

#[test]
fn lora_on_a_half_resident_base_has_the_widened_gradients() {
    for src in models() {
        let dir = f16_copy(&src);
        let half = Checkpoint::load_with(dir.path(), WeightDtype::Stored).unwrap();
        let wide = Checkpoint::load_with(dir.path(), WeightDtype::F32).unwrap();
        let targets = if half.arch.model_type() == "bloom" {
            vec!["query_key_value".to_string(), "dense_4h_to_h".to_string()]
        } else {
            vec!["q_proj".to_string(), "v_proj".to_string(), "down_proj".to_string()]
        };
        let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets };
        let set = LoraSet::init(&cfg, &half.weights, 3).unwrap();
        for (i, f) in set.factors.values().enumerate() {
            assert_eq!(f.a.dtype(), DType::F32);
            // B = 0 at init would make every A gradient zero.
            let b = (Tensor::randn(0f32, 0.5, f.b.dims(), &Device::Cpu).unwrap() * (1.0 + i as f64 * 0.01)).unwrap();
            f.b.set(&b).unwrap();
        }
        let loss = |ck: &Checkpoint| {
            let m = ck.model(Some(&set)).unwrap();
            let (ids, targets, mask) = batch(m.vocab_size() as u32);
            (m.target_logprobs(&ids, &targets).unwrap() * mask).unwrap().sum_all().unwrap().neg().unwrap()
        };
        let (lh, lw) = (loss(&half), loss(&wide));
        assert!(max_abs_diff(&lh, &lw) < ORDER_TOL, "{}", src.display());
        let (gh, gw) = (lh.backward().unwrap(), lw.backward().unwrap());
        for (pname, var) in set.vars() {
            let a = gh.get(var.as_tensor()).unwrap_or_else(|| panic!("{}: `{pname}` got no gradient", src.display()));
            let b = gw.get(var.as_tensor()).unwrap();
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(scale > 0.0, "{}: `{pname}` has a zero gradient", src.display());
            let rel = max_abs_diff(a, b) / scale;
            assert!(rel < 1e-3, "{}: gradient of `{pname}` differs by {rel} (relative)", src.display());
        }
        // The frozen half matrices get none.
        for (k, t) in half.weights.iter().filter(|(_, t)| t.dtype() == DType::F16) {
            assert!(gh.get(t).is_none(), "{}: frozen `{k}` got a gradient", src.display());
        }
    }
}

#[test]
fn sharded_half_checkpoint_keeps_each_shard_dtype() {
    let src = fixture("bloom_h3");
    let ck = Checkpoint::load(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let (mut a, mut b) = (hetfed_core::TensorMap::new(), hetfed_core::TensorMap::new());
    let mut index = serde_json::Map::new();
    for (i, (k, t)) in ck.weights.iter().enumerate() {
        let (map, file) = if i % 2 == 0 { (&mut a, "a.safetensors") } else { (&mut b, "b.safetensors") };
        map.insert(k.clone(), t.clone());
        index.insert(k.clone(), serde_json::Value::String(file.into()));
    }
    let meta = std::collections::BTreeMap::new();
    hetfed_core::save_safetensors(&a, DType::BF16, &meta, &dir.path().join("a.safetensors")).unwrap();
    hetfed_core::save_safetensors(&b, DType::F16, &meta, &dir.path().join("b.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": index}).to_string(),
    )
    .unwrap();
    let half = Checkpoint::load_with(dir.path(), WeightDtype::Stored).unwrap();
    let wide = Checkpoint::load_with(dir.path(), WeightDtype::F32).unwrap();
    for (k, t) in &half.weights {
        let want = match (t.rank(), a.contains_key(k)) {
            (1, _) => DType::F32,
            (_, true) => DType::BF16,
            (_, false) => DType::F16,
        };
        assert_eq!(t.dtype(), want, "{k}");
        assert_eq!(max_abs_diff(&t.to_dtype(DType::F32).unwrap(), &wide.weights[k]), 0.0, "{k}");
    }
    let (hl, _) = scores(half.model(None).unwrap().as_ref());
    let (wl, _) = scores(wide.model(None).unwrap().as_ref());
    assert!(max_abs_diff(&hl, &wl) < ORDER_TOL);
}
