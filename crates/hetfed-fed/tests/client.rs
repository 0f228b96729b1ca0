//! A client's local round (`train_round`) on the embedded small model: a kept adapter continues
//! across rounds and its upload stays the whole change from the base.

use std::path::{Path, PathBuf};

use hetfed_fed::client::{train_round, ClientData};
use hetfed_fed::strategy::FitConfig;
use hetfed_model::{Checkpoint, ModelIdentity};
use hetfed_taskvec::TaskVector;
use hetfed_train::Example;

fn small() -> Checkpoint {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/base-small");
    Checkpoint::load(&dir).unwrap_or_else(|e| panic!("the embedded model {} must load: {e}", dir.display()))
}

/// Short fixed prompt/target pairs: enough for the loss to move in a few steps.
fn examples(n: usize, offset: usize) -> Vec<Example> {
    let words = ["river", "stone", "light", "winter", "garden", "signal", "paper", "window"];
    (0..n)
        .map(|i| {
            let w = words[(i + offset) % words.len()];
            Example { prompt: format!("Repeat the word: {w}\nAnswer:"), target: format!(" {w} {w}") }
        })
        .collect()
}

fn data() -> ClientData {
    ClientData {
        task: hetfed_data::builtin("scitldr").unwrap(),
        train: examples(16, 0),
        val: examples(4, 3),
        val_items: hetfed_data::Items::Generation(Vec::new()),
        stats: Default::default(),
    }
}

fn loss_of(ck: &Checkpoint, weights: &hetfed_core::TensorMap, val: &[Example]) -> f64 {
    let tok = ck.tokenizer().unwrap();
    let enc = hetfed_train::encode(tok, val, 64, ck.arch.eos_token_id()).unwrap();
    let m = ck.arch.build(weights, &ck.source(), None).unwrap();
    hetfed_train::eval_loss(m.as_ref(), &enc, 8).unwrap()
}

/// Round 2 of a client that keeps its adapter starts where round 1 ended: it reaches a lower
/// validation loss than round 1 (a fresh adapter would repeat round 1 exactly), its `val_gain` is
/// measured from the base as round 1's is, and its upload applied to the base gives the model it
/// trained (the whole change, not the increment).
#[test]
fn a_kept_adapter_continues_across_rounds_and_uploads_the_whole_change() {
    let ck = small();
    let identity: ModelIdentity = ck.identity().unwrap();
    let d = data();
    let cfg = FitConfig {
        epochs: 1,
        lr: 1e-2,
        batch_size: 4,
        max_len: 64,
        lora_rank: 4,
        lora_alpha: 8.0,
        keep_adapter: true,
        ..FitConfig::default()
    };
    let opts = hetfed_eval::EvalOptions::default();
    let r1 = train_round(&ck, ck.weights.clone(), &identity, &cfg, &d, &opts, None).unwrap();
    let again = train_round(&ck, ck.weights.clone(), &identity, &cfg, &d, &opts, None).unwrap();
    assert_eq!(r1.bytes, again.bytes, "a round from a fresh adapter is deterministic");
    let a1 = r1.adapter.as_ref().expect("LoRA training returns its adapter");
    let r2 = train_round(&ck, ck.weights.clone(), &identity, &cfg, &d, &opts, Some(a1)).unwrap();
    assert_ne!(r1.bytes, r2.bytes, "a continued adapter gives another update");
    // Recomputing activations (`gradient_checkpointing`) trains the same update.
    let recomputed = FitConfig { gradient_checkpointing: true, ..cfg.clone() };
    let rc = train_round(&ck, ck.weights.clone(), &identity, &recomputed, &d, &opts, None).unwrap();
    let (u1, uc) =
        (TaskVector::from_bytes(&r1.bytes, Path::new("a")), TaskVector::from_bytes(&rc.bytes, Path::new("b")));
    let diff =
        hetfed_core::testing::max_map_diff(&u1.unwrap().materialize().unwrap(), &uc.unwrap().materialize().unwrap());
    assert!(diff < 1e-5, "gradient checkpointing changed the update by {diff}");
    // A base held as stored (`client.weights = "stored"`: the embedded f16 file stays f16, each
    // matrix widened inside the op) trains the same update.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/base-small");
    let ck16 = Checkpoint::load_with(&dir, hetfed_model::WeightDtype::Stored).unwrap();
    assert!(ck16.weights.values().any(|t| t.dtype() == candle_core::DType::F16), "the base stays f16");
    let r16 = train_round(&ck16, ck16.weights.clone(), &identity, &cfg, &d, &opts, None).unwrap();
    let u16 = TaskVector::from_bytes(&r16.bytes, Path::new("c")).unwrap();
    let u1 = TaskVector::from_bytes(&r1.bytes, Path::new("a")).unwrap();
    let diff = hetfed_core::testing::max_map_diff(&u1.materialize().unwrap(), &u16.materialize().unwrap());
    assert!(diff < 1e-5, "an f16-resident base changed the update by {diff}");

    let before = |r: &hetfed_fed::client::LocalUpdate| r.metrics.val_loss_before.expect("a validation split");
    let after = |r: &hetfed_fed::client::LocalUpdate| r.metrics.val_loss_after.expect("a validation split");
    assert!(
        (before(&r1) - before(&r2)).abs() < 1e-9,
        "val_loss_before is the base's in both rounds: {} vs {}",
        before(&r1),
        before(&r2)
    );
    assert!(
        after(&r2) < after(&r1),
        "continuing lowers the loss further: round 1 {}, round 2 {}",
        after(&r1),
        after(&r2)
    );
    // The upload (f32) applied to the base is the trained model.
    for r in [&r1, &r2] {
        let tv = TaskVector::from_bytes(&r.bytes, Path::new("<update>")).unwrap();
        let tuned = tv.apply_unchecked(&ck.weights, 1.0).unwrap();
        let l = loss_of(&ck, &tuned, &d.val);
        assert!((l - after(r)).abs() < 1e-3, "upload applied to the base: loss {l}, trained model {}", after(r));
    }
}

/// `keep_adapter` needs LoRA: with full fine-tuning the configuration is refused by name.
#[test]
fn keep_adapter_without_lora_is_refused() {
    let cfg = FitConfig { lora_rank: 0, keep_adapter: true, ..FitConfig::default() };
    let e = cfg.validate().unwrap_err();
    assert!(e.starts_with("client.keep_adapter:"), "{e}");
}

/// Kept adapters survive a restart through the state directory: the two latest rounds stay on
/// disk, a round continues from the latest earlier one of the same run and model version, and
/// nothing of another run or version is continued.
#[test]
fn kept_adapters_are_saved_by_round_and_continued_only_within_their_run() {
    use hetfed_fed::client::Adapters;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients/c0");
    let factors = |x: f32| {
        hetfed_core::TensorMap::from([(
            "h.0.q.lora_A".to_string(),
            candle_core::Tensor::full(x, (2, 3), &candle_core::Device::Cpu).unwrap(),
        )])
    };
    let first = |m: &hetfed_core::TensorMap| m["h.0.q.lora_A"].flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
    let mut a = Adapters::load(Some(&state)).unwrap();
    a.run_id = "run-1".into();
    assert!(a.before(1, "v").is_none(), "nothing before the first round");
    for r in 1..=3 {
        a.keep(r, "v", factors(r as f32), 2, 16.0).unwrap();
    }
    let mut files: Vec<String> =
        std::fs::read_dir(&state).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    assert_eq!(files, ["adapter-round-2.safetensors", "adapter-round-3.safetensors"]);
    // Each file describes itself: the LoRA rank and alpha rebuild the tuned model from it alone.
    let (_, meta) = hetfed_core::load_safetensors(&state.join("adapter-round-3.safetensors")).unwrap();
    assert_eq!((meta["lora_rank"].as_str(), meta["lora_alpha"].as_str()), ("2", "16"), "{meta:?}");

    let mut b = Adapters::load(Some(&state)).unwrap();
    b.run_id = "run-1".into();
    assert_eq!(b.before(4, "v").map(first), Some(3.0), "round 4 continues round 3");
    assert_eq!(b.before(3, "v").map(first), Some(2.0), "round 3 trained again continues round 2");
    assert!(b.before(4, "other").is_none(), "another model version starts fresh");
    b.run_id = "run-2".into();
    assert!(b.before(4, "v").is_none(), "another run starts fresh");
    assert!(Adapters::load(None).unwrap().before(2, "v").is_none(), "in memory: nothing saved");
}
