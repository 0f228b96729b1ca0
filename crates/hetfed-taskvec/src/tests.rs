//! Unit and property tests on small random CPU tensors; no network, no shared data.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use hetfed_core::TensorMap;
use hetfed_model::{LoraConfig, LoraSet, ModelIdentity};
use proptest::prelude::*;

use crate::peft::{export_peft, import_peft, CONFIG_FILE, WEIGHTS_FILE};
use crate::{Delta, TaskVector};

fn ident(arch: &str, tag: &str) -> ModelIdentity {
    ModelIdentity {
        arch: arch.into(),
        config_hash: format!("cfg{tag}0123456789abcdef"),
        weights_hash: format!("w{tag}0123456789abcdef"),
    }
}

fn bloom() -> ModelIdentity {
    ident("bloom", "a")
}

fn mat(rows: &[&[f32]]) -> Tensor {
    let v: Vec<Vec<f32>> = rows.iter().map(|r| r.to_vec()).collect();
    Tensor::new(v, &Device::Cpu).unwrap()
}

/// A fresh path under the system temp dir, unique within this test process.
fn tmp(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hetfed-taskvec-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Same names, and values within `tol` (absolute).
fn assert_close(a: &TensorMap, b: &TensorMap, tol: f32) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, ta) in a {
        let tb = &b[name];
        assert_eq!(ta.dims(), tb.dims(), "{name}");
        let d = hetfed_core::testing::max_abs_diff(ta, tb);
        assert!(d <= tol, "{name}: max difference {d} > {tol}");
    }
}

fn assert_equal(a: &TensorMap, b: &TensorMap) {
    assert_close(a, b, 0.0);
}

// ---- strategies ----

fn tensor(shape: Vec<usize>, bound: f32) -> impl Strategy<Value = Tensor> {
    let n: usize = shape.iter().product();
    prop::collection::vec(-bound..bound, n).prop_map(move |v| Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
}

fn map_of(shapes: Vec<(String, Vec<usize>)>, bound: f32) -> impl Strategy<Value = TensorMap> {
    shapes
        .into_iter()
        .map(|(name, shape)| tensor(shape, bound).prop_map(move |t| (name.clone(), t)))
        .collect::<Vec<_>>()
        .prop_map(|v| v.into_iter().collect())
}

fn dense_shapes(o: usize, i: usize) -> Vec<(String, Vec<usize>)> {
    vec![("h.0.q.weight".into(), vec![o, i]), ("h.0.q.bias".into(), vec![o]), ("h.1.q.weight".into(), vec![o, i])]
}

fn lora_shapes(o: usize, i: usize, r: usize, modules: &[&str]) -> Vec<(String, Vec<usize>)> {
    modules.iter().flat_map(|m| [(format!("{m}.lora_A"), vec![r, i]), (format!("{m}.lora_B"), vec![o, r])]).collect()
}

/// A LoRA task vector on `modules` with factor values in ±0.5 and scale in [0.5, 2], so dense
/// updates stay O(1) and f32 tolerances of 1e-5 are meaningful.
fn lora_tv(o: usize, i: usize, modules: &'static [&'static str]) -> impl Strategy<Value = TaskVector> {
    (1usize..4, 0.5f64..2.0).prop_flat_map(move |(r, scale)| {
        map_of(lora_shapes(o, i, r, modules), 0.5).prop_map(move |factors| {
            let config =
                LoraConfig { rank: r, alpha: scale * r as f64, dropout: 0.0, targets: vec!["q".into(), "k".into()] };
            TaskVector::from_lora_factors(bloom(), config, factors).unwrap()
        })
    })
}

fn full_tv(o: usize, i: usize) -> impl Strategy<Value = TaskVector> {
    map_of(dense_shapes(o, i), 2.0).prop_map(|m| TaskVector { base: bloom(), kind: Delta::Full(m) })
}

/// Either kind, on the same dense parameters (`h.{0,1}.q.weight`; Full also has a bias).
fn any_tv(o: usize, i: usize) -> BoxedStrategy<TaskVector> {
    prop_oneof![full_tv(o, i), lora_tv(o, i, &["h.0.q", "h.1.q"])].boxed()
}

fn dims() -> impl Strategy<Value = (usize, usize)> {
    (1usize..6, 1usize..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn apply_then_apply_negated_round_trips(
        (base, tv, lambda) in dims().prop_flat_map(|(o, i)| (map_of(dense_shapes(o, i), 2.0), any_tv(o, i), -2.0f64..2.0))
    ) {
        let id = bloom();
        let edited = tv.apply(&id, &base, lambda).unwrap();
        // The edited weights no longer hash to the base, but they descend from it.
        let back = tv.negate().unwrap().apply(&id, &edited, lambda).unwrap();
        assert_close(&back, &base, 1e-5);
    }

    #[test]
    fn full_diff_then_apply_gives_the_fine_tuned_weights(
        (base, ft) in dims().prop_flat_map(|(o, i)| (map_of(dense_shapes(o, i), 2.0), map_of(dense_shapes(o, i), 2.0)))
    ) {
        let tv = TaskVector::full_diff(bloom(), &base, &ft).unwrap();
        assert_close(&tv.apply(&bloom(), &base, 1.0).unwrap(), &ft, 1e-5);
    }

    #[test]
    fn add_is_commutative(
        (x, y) in dims().prop_flat_map(|(o, i)| (any_tv(o, i), any_tv(o, i)))
    ) {
        let xy = x.add(&y).unwrap();
        let yx = y.add(&x).unwrap();
        assert_eq!(xy.kind.name(), yx.kind.name());
        assert_close(&xy.materialize().unwrap(), &yx.materialize().unwrap(), 1e-5);
        if let (Delta::Full(_), Delta::Full(_)) = (&x.kind, &y.kind) {
            assert_equal(&xy.materialize().unwrap(), &yx.materialize().unwrap());
        }
    }

    #[test]
    fn stacked_lora_sum_is_exact_and_factored(
        (x, y) in dims().prop_flat_map(|(o, i)| (lora_tv(o, i, &["h.0.q", "h.1.q"]), lora_tv(o, i, &["h.1.q", "h.2.k"])))
    ) {
        let sum = x.add(&y).unwrap();
        let (r1, r2) = (x.lora_config().unwrap().rank, y.lora_config().unwrap().rank);
        let Delta::Lora { config, factors } = &sum.kind else { panic!("expected a LoRA sum") };
        prop_assert_eq!(config.rank, r1 + r2);
        prop_assert!((config.scale() - x.lora_config().unwrap().scale()).abs() < 1e-12);
        // Validates every factor against the config's rank.
        TaskVector::from_lora_factors(bloom(), config.clone(), factors.clone()).unwrap();
        let dense = TaskVector { base: bloom(), kind: Delta::Full(x.materialize().unwrap()) }
            .add(&TaskVector { base: bloom(), kind: Delta::Full(y.materialize().unwrap()) })
            .unwrap();
        assert_close(&sum.materialize().unwrap(), &dense.materialize().unwrap(), 1e-5);
    }

    #[test]
    fn scale_composes(
        (tv, a, b) in dims().prop_flat_map(|(o, i)| (any_tv(o, i), -2.0f64..2.0, -2.0f64..2.0))
    ) {
        let twice = tv.scale(a).unwrap().scale(b).unwrap();
        let once = tv.scale(a * b).unwrap();
        assert_eq!(twice.lora_config(), tv.lora_config());
        assert_close(&twice.materialize().unwrap(), &once.materialize().unwrap(), 1e-5);
    }

    #[test]
    fn lora_norms_match_the_dense_update(
        tv in dims().prop_flat_map(|(o, i)| lora_tv(o, i, &["h.0.q", "h.1.q"]))
    ) {
        let dense = TaskVector { base: bloom(), kind: Delta::Full(tv.materialize().unwrap()) };
        let (fa, da) = (tv.layer_norms().unwrap(), dense.layer_norms().unwrap());
        prop_assert_eq!(fa.len(), da.len());
        for ((n1, v1), (n2, v2)) in fa.iter().zip(&da) {
            prop_assert_eq!(n1, n2);
            prop_assert!((v1 - v2).abs() <= 1e-5 * (1.0 + v2), "{}: {} vs {}", n1, v1, v2);
        }
        prop_assert!((tv.global_norm().unwrap() - dense.global_norm().unwrap()).abs() <= 1e-5 * (1.0 + dense.global_norm().unwrap()));
    }

    #[test]
    fn save_load_round_trips(tv in dims().prop_flat_map(|(o, i)| any_tv(o, i))) {
        let path = tmp("tv.safetensors");
        tv.save(&path, DType::F32).unwrap();
        let back = TaskVector::load(&path).unwrap();
        prop_assert_eq!(&back.base, &tv.base);
        prop_assert_eq!(back.kind.name(), tv.kind.name());
        prop_assert_eq!(back.lora_config(), tv.lora_config());
        let stored = |t: &TaskVector| match &t.kind { Delta::Full(m) | Delta::Lora { factors: m, .. } => m.clone() };
        assert_equal(&stored(&back), &stored(&tv));
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn int8_round_trip_is_within_half_a_step_per_row(tv in dims().prop_flat_map(|(o, i)| any_tv(o, i))) {
        let bytes = tv.to_bytes_int8().unwrap();
        let back = TaskVector::from_bytes(&bytes, std::path::Path::new("<int8>")).unwrap();
        prop_assert_eq!(&back.base, &tv.base);
        prop_assert_eq!(back.lora_config(), tv.lora_config());
        let stored = |t: &TaskVector| match &t.kind { Delta::Full(m) | Delta::Lora { factors: m, .. } => m.clone() };
        let (a, b) = (stored(&tv), stored(&back));
        prop_assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, t) in &a {
            let rows = if t.rank() >= 2 { t.dims()[0] } else { 1 };
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
            let cols = x.len() / rows.max(1);
            for (r, (xr, yr)) in x.chunks(cols.max(1)).zip(y.chunks(cols.max(1))).enumerate() {
                let step = xr.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                for (u, v) in xr.iter().zip(yr) {
                    prop_assert!((u - v).abs() <= 0.5 * step * 1.0001 + 1e-12, "{} row {}: {} vs {}", name, r, u, v);
                }
            }
        }
    }

    #[test]
    fn peft_round_trips(tv in dims().prop_flat_map(|(o, i)| lora_tv(o, i, &["h.0.q", "h.1.k"]))) {
        let dir = tmp("adapter");
        export_peft(&tv, &dir, "bigscience/bloom-560m").unwrap();
        let (config, factors) = import_peft(&dir).unwrap();
        let Delta::Lora { config: c0, factors: f0 } = &tv.kind else { unreachable!() };
        prop_assert_eq!(config.rank, c0.rank);
        prop_assert_eq!(config.alpha, c0.alpha);
        prop_assert_eq!(&config.targets, &c0.targets);
        prop_assert_eq!(config.dropout, c0.dropout);
        assert_equal(&factors, f0);
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }
}

// ---- unit tests ----

fn small_lora() -> TaskVector {
    let mut f = TensorMap::new();
    f.insert("h.0.q.lora_A".into(), mat(&[&[1.0, 0.0, 2.0]])); // [1, 3]
    f.insert("h.0.q.lora_B".into(), mat(&[&[1.0], &[-1.0]])); // [2, 1]
    let config = LoraConfig { rank: 1, alpha: 2.0, dropout: 0.1, targets: vec!["q".into()] };
    TaskVector::from_lora_factors(bloom(), config, f).unwrap()
}

fn small_base() -> TensorMap {
    let mut m = TensorMap::new();
    m.insert("h.0.q.weight".into(), Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap());
    m.insert("h.0.q.bias".into(), Tensor::ones(2, DType::F32, &Device::Cpu).unwrap());
    m
}

#[test]
fn lora_materialises_b_a_scale() {
    let dense = small_lora().materialize().unwrap();
    assert_eq!(dense.keys().collect::<Vec<_>>(), ["h.0.q.weight"]);
    assert_eq!(dense["h.0.q.weight"].to_vec2::<f32>().unwrap(), vec![vec![2.0, 0.0, 4.0], vec![-2.0, 0.0, -4.0]]);
    let tv = small_lora();
    assert_eq!(tv.num_params(), 6);
    assert_eq!(tv.num_stored_values(), 5);
    // ||[[2,0,4],[-2,0,-4]]|| = sqrt(40)
    assert!((tv.global_norm().unwrap() - 40f64.sqrt()).abs() < 1e-9);
}

#[test]
fn apply_leaves_untouched_parameters_alone() {
    let out = small_lora().apply(&bloom(), &small_base(), 0.5).unwrap();
    assert_eq!(out["h.0.q.bias"].to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
    assert_eq!(out["h.0.q.weight"].to_vec2::<f32>().unwrap()[0], vec![1.0, 0.0, 2.0]);
}

#[test]
fn apply_to_another_base_names_both_identities() {
    let llama = ident("llama", "b");
    let err = small_lora().apply(&llama, &small_base(), 1.0).unwrap_err().to_string();
    assert!(err.contains(&bloom().to_string()), "{err}");
    assert!(err.contains(&llama.to_string()), "{err}");
    assert!(err.starts_with("task vector was made from bloom"), "{err}");
}

#[test]
fn identities_that_abbreviate_alike_are_shown_in_full() {
    let mut other = bloom();
    other.weights_hash.push_str("ff");
    let err = small_lora().apply(&other, &small_base(), 1.0).unwrap_err().to_string();
    assert!(err.contains(&other.weights_hash), "{err}");
}

#[test]
fn apply_errors_on_unknown_parameters_and_shapes() {
    let mut base = small_base();
    base.remove("h.0.q.weight");
    let err = small_lora().apply(&bloom(), &base, 1.0).unwrap_err().to_string();
    assert!(err.contains("`h.0.q.weight`"), "{err}");

    base.insert("h.0.q.weight".into(), Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap());
    let err = small_lora().apply(&bloom(), &base, 1.0).unwrap_err().to_string();
    assert!(err.contains("`h.0.q.weight`") && err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");
}

#[test]
fn full_diff_names_the_mismatched_tensor() {
    let base = small_base();
    let mut ft = small_base();
    ft.insert("h.0.q.bias".into(), Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    let err = TaskVector::full_diff(bloom(), &base, &ft).unwrap_err().to_string();
    assert!(err.contains("`h.0.q.bias`") && err.contains("expected [2]") && err.contains("found [3]"), "{err}");

    let mut ft = small_base();
    ft.insert("extra".into(), Tensor::ones(1, DType::F32, &Device::Cpu).unwrap());
    let err = TaskVector::full_diff(bloom(), &base, &ft).unwrap_err().to_string();
    assert!(err.contains("`extra`"), "{err}");
    ft.remove("extra");
    ft.remove("h.0.q.bias");
    let err = TaskVector::full_diff(bloom(), &base, &ft).unwrap_err().to_string();
    assert!(err.contains("`h.0.q.bias`"), "{err}");
}

#[test]
fn adding_different_bases_is_an_error() {
    let mut other = small_lora();
    other.base = ident("llama", "b");
    let err = small_lora().add(&other).unwrap_err().to_string();
    assert!(err.contains("bloom") && err.contains("llama"), "{err}");
}

#[test]
fn lora_plus_full_is_full() {
    let lora = small_lora();
    let full = TaskVector::full_diff(bloom(), &small_base(), &small_base()).unwrap();
    let sum = lora.add(&full).unwrap();
    assert_eq!(sum.kind.name(), "full");
    let dense = sum.materialize().unwrap();
    assert_eq!(dense.len(), 2);
    assert_close(
        &TensorMap::from([("h.0.q.weight".to_string(), dense["h.0.q.weight"].clone())]),
        &lora.materialize().unwrap(),
        0.0,
    );
}

#[test]
fn invalid_lora_factors_are_rejected() {
    let Delta::Lora { config, mut factors } = small_lora().kind else { unreachable!() };
    let mut wrong_rank = config.clone();
    wrong_rank.rank = 2;
    let err = TaskVector::from_lora_factors(bloom(), wrong_rank, factors.clone()).unwrap_err().to_string();
    assert!(err.contains("h.0.q.lora_A"), "{err}");
    factors.remove("h.0.q.lora_B");
    let err = TaskVector::from_lora_factors(bloom(), config, factors).unwrap_err().to_string();
    assert!(err.contains("h.0.q.lora_B"), "{err}");
}

#[test]
fn from_lora_set_keeps_factors() {
    let Delta::Lora { config, factors } = small_lora().kind else { unreachable!() };
    let set = LoraSet::from_tensors(&config, &factors).unwrap();
    let tv = TaskVector::from_lora(bloom(), &set).unwrap();
    assert_close(&tv.materialize().unwrap(), &small_lora().materialize().unwrap(), 0.0);
}

#[test]
fn save_in_half_precision_loads_as_f32() {
    let path = tmp("half.safetensors");
    small_lora().save(&path, DType::BF16).unwrap();
    let back = TaskVector::load(&path).unwrap();
    assert_eq!(back.lora_config(), small_lora().lora_config());
    let Delta::Lora { factors, .. } = &back.kind else { panic!("expected LoRA") };
    assert_eq!(factors["h.0.q.lora_A"].dtype(), DType::F32);
    assert!(small_lora().save(&path, DType::U8).is_err());
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let path = tmp("cut.safetensors");
    small_lora().save(&path, DType::F32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [bytes.len() - 3, bytes.len() / 2, 7, 0] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = TaskVector::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}

#[test]
fn file_without_metadata_names_the_missing_key() {
    let path = tmp("plain.safetensors");
    hetfed_core::save_safetensors(&small_base(), DType::F32, &Default::default(), &path).unwrap();
    let err = TaskVector::load(&path).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()) && err.contains("`hetfed.format`"), "{err}");

    let mut meta = std::collections::BTreeMap::new();
    meta.insert("hetfed.format".to_string(), "taskvec/1".to_string());
    hetfed_core::save_safetensors(&small_base(), DType::F32, &meta, &path).unwrap();
    let err = TaskVector::load(&path).unwrap_err().to_string();
    assert!(err.contains("`hetfed.base.arch`"), "{err}");

    meta.insert("hetfed.format".to_string(), "taskvec/9".to_string());
    hetfed_core::save_safetensors(&small_base(), DType::F32, &meta, &path).unwrap();
    let err = TaskVector::load(&path).unwrap_err().to_string();
    assert!(err.contains("taskvec/9"), "{err}");
}

#[test]
fn bytes_round_trip() {
    let tv = small_lora().scale(3.0).unwrap();
    let back = TaskVector::from_bytes(&tv.to_bytes(DType::F32).unwrap(), "wire".as_ref()).unwrap();
    assert_close(&back.materialize().unwrap(), &tv.materialize().unwrap(), 0.0);
}

#[test]
fn peft_config_has_the_fields_peft_expects() {
    let dir = tmp("adapter");
    export_peft(&small_lora(), &dir, "bigscience/bloom-560m").unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 1);
    assert_eq!(cfg["lora_alpha"], 2);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q"]));
    assert_eq!(cfg["base_model_name_or_path"], "bigscience/bloom-560m");
    let (w, _) = hetfed_core::load_safetensors(&dir.join(WEIGHTS_FILE)).unwrap();
    assert_eq!(
        w.keys().collect::<Vec<_>>(),
        ["base_model.model.h.0.q.lora_A.weight", "base_model.model.h.0.q.lora_B.weight"]
    );
    let full = TaskVector::full_diff(bloom(), &small_base(), &small_base()).unwrap();
    assert!(export_peft(&full, &dir, "x").is_err());
}

#[test]
fn peft_import_accepts_defaults_and_adapter_names() {
    let dir = tmp("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), r#"{"peft_type": "LORA", "target_modules": "q|k"}"#).unwrap();
    let mut w = TensorMap::new();
    w.insert(
        "base_model.model.h.0.q.lora_A.default.weight".into(),
        Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    w.insert(
        "base_model.model.h.0.q.lora_B.default.weight".into(),
        Tensor::zeros((2, 8), DType::F16, &Device::Cpu).unwrap(),
    );
    hetfed_core::save_safetensors(&w, DType::F16, &Default::default(), &dir.join(WEIGHTS_FILE)).unwrap();
    let (config, factors) = import_peft(&dir).unwrap();
    assert_eq!((config.rank, config.alpha), (8, 8.0));
    assert_eq!(config.targets, vec!["h.0.q".to_string()]);
    assert_eq!(factors.keys().collect::<Vec<_>>(), ["h.0.q.lora_A", "h.0.q.lora_B"]);
    assert_eq!(factors["h.0.q.lora_B"].dtype(), DType::F32);
}

#[test]
fn peft_import_rejects_options_that_change_the_math() {
    let dir = tmp("adapter");
    export_peft(&small_lora(), &dir, "m").unwrap();
    let path = dir.join(CONFIG_FILE);
    let good: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("use_rslora", serde_json::json!(true)),
        ("fan_in_fan_out", serde_json::json!(true)),
        ("bias", serde_json::json!("all")),
        ("rank_pattern", serde_json::json!({"q": 4})),
    ] {
        let mut cfg = good.clone();
        cfg[field] = value;
        std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
        let err = import_peft(&dir).unwrap_err().to_string();
        assert!(err.contains(&format!("`{field}`")), "{err}");
    }
    // Rank in the config that disagrees with the factors.
    let mut cfg = good.clone();
    cfg["r"] = serde_json::json!(4);
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let err = import_peft(&dir).unwrap_err().to_string();
    assert!(err.contains("lora_A"), "{err}");
}

#[test]
fn int8_is_about_a_quarter_of_f32() {
    let w = Tensor::randn(0f32, 0.02, (256, 512), &Device::Cpu).unwrap();
    let mut m = TensorMap::new();
    m.insert("h.0.w".into(), w);
    let tv = TaskVector { base: bloom(), kind: Delta::Full(m) };
    let (q, f) = (tv.to_bytes_int8().unwrap().len(), tv.to_bytes(DType::F32).unwrap().len());
    assert!((q as f64) < 0.27 * f as f64, "int8 {q} bytes vs f32 {f}");
}

// ---- determinism and the shared validation ----

#[test]
fn identical_task_vectors_write_identical_bytes() {
    for tv in [small_lora(), TaskVector { base: bloom(), kind: Delta::Full(small_base()) }] {
        let (a, b) = (tmp("a.safetensors"), tmp("b.safetensors"));
        tv.save(&a, DType::F32).unwrap();
        tv.clone().save(&b, DType::F32).unwrap();
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes, std::fs::read(&b).unwrap(), "two saves of one task vector differ");
        assert_eq!(bytes, tv.to_bytes(DType::F32).unwrap());
        assert_eq!(tv.to_bytes_int8().unwrap(), tv.to_bytes_int8().unwrap());
        // Metadata keys in order: the header reads the same in every process.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let keys: Vec<usize> = [
            "hetfed.base.arch",
            "hetfed.base.config_hash",
            "hetfed.base.weights_hash",
            "hetfed.dtype",
            "hetfed.format",
            "hetfed.kind",
        ]
        .iter()
        .map(|k| header.find(k).unwrap())
        .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{header}");
    }
}

fn dense_tv(entries: &[(&str, Tensor)]) -> TaskVector {
    let map: TensorMap = entries.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    TaskVector { base: bloom(), kind: Delta::Full(map) }
}

#[test]
fn validation_refuses_what_the_server_refuses() {
    let base = small_base();
    let what = "the base model";
    // `validate` and the server's `validate_norm` (which never multiplies LoRA factors out)
    // accept and refuse alike, with the same message, and agree on the norm.
    let err = |tv: &TaskVector, max: f64| {
        let e = tv.validate(&bloom(), &base, what, max).unwrap_err().to_string();
        let e2 = tv.validate_norm(&bloom(), &base, what, max).unwrap_err().to_string();
        assert_eq!(e, e2, "validate and validate_norm refuse differently");
        e
    };
    let ok = small_lora().validate(&bloom(), &base, what, f64::INFINITY).unwrap();
    assert!((ok.norm - 40f64.sqrt()).abs() < 1e-6 && ok.delta.contains_key("h.0.q.weight"));
    let norm = small_lora().validate_norm(&bloom(), &base, what, f64::INFINITY).unwrap();
    assert!((norm - ok.norm).abs() < 1e-9 * ok.norm, "{norm} vs {}", ok.norm);
    let mut nan_factors = small_lora();
    if let Delta::Lora { factors, .. } = &mut nan_factors.kind {
        let a = factors["h.0.q.lora_A"].clone();
        let poisoned = a.ones_like().unwrap().affine(f64::NAN, 0.0).unwrap();
        factors.insert("h.0.q.lora_A".into(), poisoned);
    }
    assert!(err(&nan_factors, f64::INFINITY).contains("`h.0.q.weight`: expected finite values, found NaN"));

    let nan = dense_tv(&[("h.0.q.bias", Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap())]);
    assert!(err(&nan, f64::INFINITY).contains("`h.0.q.bias`: expected finite values, found NaN"));
    let inf = dense_tv(&[("h.0.q.bias", Tensor::new(&[f32::INFINITY, 0.0], &Device::Cpu).unwrap())]);
    assert!(err(&inf, f64::INFINITY).contains("finite"));
    let unknown = dense_tv(&[("h.9.q.bias", Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap())]);
    assert!(err(&unknown, 1.0).contains("`h.9.q.bias` is not a parameter of the base model"));
    let shape = dense_tv(&[("h.0.q.bias", Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap())]);
    assert!(err(&shape, 1.0).contains("expected shape [2], found [3]"));
    assert!(err(&dense_tv(&[]), 1.0).contains("at least one updated parameter"));
    assert!(err(&small_lora(), 1.0).contains("expected an update norm <= 1, found 6.3246"));
    let other = TaskVector { base: ident("bloom", "z"), ..small_lora() };
    let e = err(&other, 1.0);
    assert!(
        e.starts_with("expected an update of the base model bloom") && e.contains(&ident("bloom", "z").to_string()),
        "{e}"
    );

    // LoRA factors far larger than the model are refused on their shapes, before `B·A` exists.
    let mut huge = TensorMap::new();
    huge.insert("h.0.q.lora_A".into(), Tensor::zeros((1, 1 << 20), DType::F32, &Device::Cpu).unwrap());
    huge.insert("h.0.q.lora_B".into(), Tensor::zeros((1 << 20, 1), DType::F32, &Device::Cpu).unwrap());
    let cfg = small_lora().lora_config().unwrap().clone();
    let huge = TaskVector::from_lora_factors(bloom(), cfg, huge).unwrap();
    assert!(err(&huge, 1.0).contains("expected shape [2, 3], found [1048576, 1048576]"));
}

#[test]
fn apply_validated_is_apply_for_good_input_and_refuses_the_rest() {
    let base = small_base();
    let tv = small_lora();
    let a = tv.apply_validated(&bloom(), &base, 0.5, "the base model").unwrap();
    assert_equal(&a, &tv.apply(&bloom(), &base, 0.5).unwrap());
    let e = tv.apply_validated(&bloom(), &base, f64::NAN, "the base model").unwrap_err().to_string();
    assert!(e.contains("finite scale"), "{e}");
    let e = tv.apply_validated(&bloom(), &base, 1e39, "the base model").unwrap_err().to_string();
    assert!(e.contains("`h.0.q.weight`") && e.contains("finite"), "overflow to infinity is refused: {e}");
    let nan = dense_tv(&[("h.0.q.bias", Tensor::new(&[f32::NAN, 0.0], &Device::Cpu).unwrap())]);
    let e = nan.apply_validated(&bloom(), &base, 1.0, "the base model").unwrap_err().to_string();
    assert!(e.contains("NaN"), "{e}");
}
