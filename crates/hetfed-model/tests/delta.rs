//! A factored change kept next to the base weights (`hetfed_model::delta`): the model built from
//! base + factors computes what the model built from the merged dense weights computes, on both
//! architectures and on a half-resident base; appending factors adds the changes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hetfed_core::testing::max_abs_diff;
use hetfed_core::TensorMap;
use hetfed_model::{delta, lora::linear_modules, Checkpoint, WeightDtype};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn randn(shape: (usize, usize), seed: u64, scale: f64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| (rng.random::<f32>() - 0.5) * scale as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Two rank-2 changes appended to every other linear layer of `weights`.
fn with_changes(weights: &TensorMap) -> TensorMap {
    let mut w = weights.clone();
    for (i, (module, (o, inp))) in linear_modules(weights).into_iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        for round in 0..2u64 {
            let seed = 100 * i as u64 + round;
            delta::append(&mut w, &module, &randn((2, inp), seed, 0.2), &randn((o, 2), seed + 50, 0.2)).unwrap();
        }
    }
    w
}

fn logits(ck: &Checkpoint, weights: &TensorMap) -> Tensor {
    let m = ck.arch.build(weights, &ck.source(), None).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 0, 1, 6]], &Device::Cpu).unwrap();
    m.forward(&ids, None).unwrap()
}

#[test]
fn factored_model_computes_the_merged_dense_model() {
    for name in ["bloom_h3", "llama_gqa", "llama_tied"] {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let factored = with_changes(&ck.weights);
        let ranks = delta::ranks(&factored);
        assert!(!ranks.is_empty() && ranks.values().all(|&r| r == 4), "{name}: {ranks:?}");
        let merged = delta::merge(&factored).unwrap();
        assert!(merged.keys().all(|k| !delta::is_factor(k)) && merged.len() == ck.weights.len());
        let (f, m, base) = (logits(&ck, &factored), logits(&ck, &merged), logits(&ck, &ck.weights));
        assert!(max_abs_diff(&f, &m) < 1e-4, "{name}: factored vs merged {}", max_abs_diff(&f, &m));
        assert!(max_abs_diff(&f, &base) > 1e-3, "{name}: the change must change the model");
    }
}

#[test]
fn appending_adds_the_changes_and_merge_is_w_plus_ba() {
    let ck = Checkpoint::load(&fixture("bloom_h3")).unwrap();
    let module = linear_modules(&ck.weights).into_keys().next().unwrap();
    let w0 = ck.weights[&format!("{module}.weight")].clone();
    let (o, i) = w0.dims2().unwrap();
    let (a1, b1, a2, b2) = (randn((3, i), 1, 1.0), randn((o, 3), 2, 1.0), randn((1, i), 3, 1.0), randn((o, 1), 4, 1.0));
    let mut w = ck.weights.clone();
    delta::append(&mut w, &module, &a1, &b1).unwrap();
    delta::append(&mut w, &module, &a2, &b2).unwrap();
    assert_eq!(delta::ranks(&w)[&module], 4);
    assert_eq!(delta::factors(&w).len(), 2);
    let want = ((&w0 + b1.matmul(&a1).unwrap()).unwrap() + b2.matmul(&a2).unwrap()).unwrap();
    let got = &delta::merge(&w).unwrap()[&format!("{module}.weight")];
    assert!(max_abs_diff(got, &want) < 1e-5);
    // Wrong shapes and a missing layer are errors naming what was expected.
    let e = delta::append(&mut w, &module, &randn((2, i + 1), 5, 1.0), &randn((o, 2), 6, 1.0)).unwrap_err();
    assert!(e.to_string().contains(&format!("[r, {i}]")), "{e}");
    let e = delta::append(&mut w, "no.such.layer", &a1, &b1).unwrap_err();
    assert!(e.to_string().contains("no linear layer `no.such.layer`"), "{e}");
    let mut half = w.clone();
    half.remove(&delta::names(&module).1);
    let e = ck.arch.build(&half, "x", None).err().unwrap();
    assert!(e.to_string().contains("found only one"), "{e}");
}

#[test]
fn factored_change_on_a_half_resident_base() {
    // The base stays f16 (what a 7B server holds); the factors are f32 and add the same change.
    let src = fixture("bloom_h8_f16");
    let half = Checkpoint::load_with(&src, WeightDtype::Stored).unwrap();
    let wide = Checkpoint::load_with(&src, WeightDtype::F32).unwrap();
    assert!(half.weights.values().any(|t| t.dtype() == DType::F16));
    let (fh, fw) = (with_changes(&half.weights), with_changes(&wide.weights));
    assert!(delta::factors(&fh).values().all(|t| t.dtype() == DType::F32));
    let d = max_abs_diff(&logits(&half, &fh), &logits(&wide, &fw));
    assert!(d < 1e-4, "half base + factors vs f32 base + factors: {d}");
}
