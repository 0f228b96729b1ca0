//! Fine-tuning behaviour: learning happens, runs are deterministic, resuming is exact, FedProx
//! pulls towards the reference, and every trainable parameter receives a gradient.

use std::path::{Path, PathBuf};

use hetfed_model::{Checkpoint, LoraConfig};
use hetfed_train::{encode, Encoded, Example, TrainConfig, Trainer};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hetfed-model/tests/fixtures").join(name)
}

fn toy_examples() -> Vec<Example> {
    // Prompts and targets for the random-weight fixture: only the mechanics matter here.
    (0..12)
        .map(|i| Example {
            prompt: format!("item {i} is"),
            target: if i % 2 == 0 { " even".into() } else { " odd".into() },
        })
        .collect()
}

fn encoded(ck: &Checkpoint) -> Vec<Encoded> {
    encode(ck.tokenizer().unwrap(), &toy_examples(), 32, Some(2)).unwrap()
}

fn lora_cfg() -> TrainConfig {
    TrainConfig {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: vec!["query_key_value".into(), "dense_h_to_4h".into()],
        }),
        lr: 1e-2,
        batch_size: 4,
        grad_accum: 2,
        epochs: 2,
        warmup_steps: 1,
        seed: 7,
        ..Default::default()
    }
}

fn run(ck: &Checkpoint, cfg: TrainConfig, steps: Option<usize>) -> Trainer<'_> {
    let data = encoded(ck);
    let mut tr = Trainer::new(ck, cfg, None).unwrap();
    let mut n = 0;
    tr.train(
        &data,
        |_, _| Ok(()),
        || {
            n += 1;
            steps.is_some_and(|s| n > s)
        },
    )
    .unwrap();
    tr
}

fn flat(tr: &Trainer) -> Vec<f32> {
    let map = match tr.weights() {
        Some(w) => w,
        None => tr.lora().unwrap().to_tensors(),
    };
    map.values().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

#[test]
fn same_seed_gives_identical_weights() {
    let ck = Checkpoint::load(&fixture("bloom_h3")).unwrap();
    let a = flat(&run(&ck, lora_cfg(), None));
    let b = flat(&run(&ck, lora_cfg(), None));
    assert_eq!(a, b);
}

#[test]
fn resume_continues_exactly() {
    let ck = Checkpoint::load(&fixture("bloom_h3")).unwrap();
    let straight = flat(&run(&ck, lora_cfg(), None));
    let scratch = tempdir();
    let dir = scratch.path();
    let state = dir.join("state.safetensors");
    let first = run(&ck, lora_cfg(), Some(2));
    assert_eq!(first.step, 2);
    first.save_state(&state).unwrap();
    drop(first);
    let mut tr = Trainer::new(&ck, lora_cfg(), None).unwrap();
    tr.load_state(&state).unwrap();
    tr.train(&encoded(&ck), |_, _| Ok(()), || false).unwrap();
    assert_eq!(flat(&tr), straight);
}

#[test]
fn full_finetuning_updates_every_parameter_and_lowers_loss() {
    for name in ["bloom_h6_noprefix", "llama_gqa"] {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let data = encoded(&ck);
        let cfg = TrainConfig { lr: 3e-3, batch_size: 4, epochs: 3, seed: 1, ..Default::default() };
        let mut tr = Trainer::new(&ck, cfg, None).unwrap();
        let before = tr.eval_loss(&data).unwrap();
        tr.train(&data, |_, _| Ok(()), || false).unwrap();
        let after = tr.eval_loss(&data).unwrap();
        assert!(after < before, "{name}: loss {before} -> {after}");
        let w = tr.weights().unwrap();
        for (k, t) in &ck.weights {
            let d = (t - &w[k]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d > 0.0, "{name}: parameter `{k}` did not change: it received no gradient");
        }
    }
}

#[test]
fn fedprox_term_keeps_weights_closer_to_the_reference() {
    let ck = Checkpoint::load(&fixture("bloom_h3")).unwrap();
    let dist = |mu: f64| {
        let cfg = TrainConfig {
            lr: 1e-2,
            proximal_mu: mu,
            batch_size: 4,
            epochs: 2,
            max_grad_norm: None,
            ..Default::default()
        };
        let tr = run(&ck, cfg, None);
        let w = tr.weights().unwrap();
        ck.weights.iter().map(|(k, t)| hetfed_core::sq_norm(&(t - &w[k]).unwrap()).unwrap()).sum::<f64>()
    };
    let (free, prox) = (dist(0.0), dist(50.0));
    assert!(prox < free, "FedProx distance {prox} should be below {free}");
}

#[test]
fn prompt_tokens_carry_no_loss_and_long_prompts_keep_their_end() {
    let ck = Checkpoint::load(&fixture("bloom_h3")).unwrap();
    let tok = ck.tokenizer().unwrap();
    let ex = Example { prompt: "a b c d e f g h i j k l m n o p".into(), target: " yes".into() };
    let e = &encode(tok, std::slice::from_ref(&ex), 8, Some(2)).unwrap()[0];
    assert_eq!(e.ids.len(), 8);
    let t = tok.encode(" yes", false).unwrap().get_ids().to_vec();
    assert_eq!(&e.ids[e.prompt_len..e.ids.len() - 1], &t[..]);
    assert_eq!(*e.ids.last().unwrap(), 2);
    let full = tok.encode(ex.prompt.as_str(), true).unwrap().get_ids().to_vec();
    assert_eq!(&e.ids[..e.prompt_len], &full[full.len() - e.prompt_len..], "the end of the prompt is kept");
}

#[test]
fn lora_finetune_of_tinystories_lowers_held_out_loss() {
    let Some(dir) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "models/tinystories-656k") else {
        return;
    };
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let ck = Checkpoint::load(&dir).unwrap();
    let dir = hetfed_data::DataDir::new(data.parent().unwrap());
    let task = hetfed_data::task::builtin("ethos").unwrap();
    let pairs = |split| -> Vec<Example> {
        let ex = task.load(&dir, split).unwrap();
        task.to_prompt_target(&ex, None)
            .unwrap()
            .into_iter()
            .map(|p| Example { prompt: p.prompt, target: p.target })
            .collect()
    };
    let train: Vec<Example> = pairs(hetfed_data::Split::Train).into_iter().take(96).collect();
    let held: Vec<Example> = pairs(hetfed_data::Split::Dev).into_iter().take(48).collect();
    let (train, held) = (&train[..], &held[..]);
    let tok = ck.tokenizer().unwrap();
    let train = encode(tok, train, 64, Some(2)).unwrap();
    let held = encode(tok, held, 64, Some(2)).unwrap();
    let cfg = TrainConfig {
        lora: Some(LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        }),
        lr: 5e-3,
        batch_size: 16,
        epochs: 2,
        seed: 3,
        ..Default::default()
    };
    let mut tr = Trainer::new(&ck, cfg, None).unwrap();
    let before = tr.eval_loss(&held).unwrap();
    tr.train(&train, |_, _| Ok(()), || false).unwrap();
    let after = tr.eval_loss(&held).unwrap();
    assert!(after < before - 0.1, "held-out loss {before} -> {after}");
}

/// A scratch directory under the system temp dir, removed with everything in it when dropped
/// (a failing test's directory goes too: the assertion message names what went wrong).
fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("hetfed-train-").tempdir().unwrap()
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let ck = Checkpoint::load(&fixture("llama_gqa")).unwrap();
    let base = TrainConfig { lr: 1e-2, epochs: 1, max_grad_norm: Some(0.5), seed: 4, ..Default::default() };
    let big = run(&ck, TrainConfig { batch_size: 12, grad_accum: 1, ..base.clone() }, None);
    let small = run(&ck, TrainConfig { batch_size: 4, grad_accum: 3, ..base }, None);
    assert_eq!(big.step, 1);
    assert_eq!(small.step, 1);
    let (a, b) = (flat(&big), flat(&small));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d < 1e-5, "accumulated step differs from the big-batch step by {d}");
}

#[test]
fn training_loss_and_eval_loss_through_the_fused_head_equal_the_full_logits() {
    use candle_core::Tensor;
    use hetfed_model::model::Unfused;
    use hetfed_model::{CausalLm, LoraSet};
    use rand::{Rng, SeedableRng};
    for name in ["bloom_h3", "llama_gqa"] {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let data = encoded(&ck);
        let targets = if name.starts_with("bloom") { "query_key_value" } else { "q_proj" };
        let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: vec![targets.into(), "down_proj".into()] };
        let cfg = if name.starts_with("bloom") {
            LoraConfig { targets: vec![targets.into(), "dense_4h_to_h".into()], ..cfg }
        } else {
            cfg
        };
        let set = LoraSet::init(&cfg, &ck.weights, 1).unwrap();
        // Non-zero B, so that the A factors get a gradient too.
        let mut r = rand::rngs::StdRng::seed_from_u64(2);
        for f in set.factors.values() {
            let v: Vec<f32> = (0..f.b.elem_count()).map(|_| r.random_range(-0.5f32..0.5)).collect();
            f.b.set(&Tensor::from_vec(v, f.b.dims(), &candle_core::Device::Cpu).unwrap()).unwrap();
        }
        let model = ck.model(Some(&set)).unwrap();
        let unfused = Unfused(model.as_ref());
        // Different lengths (right padding) and prompts (masked targets).
        let exs: Vec<&Encoded> = data.iter().collect();
        assert!(exs.iter().any(|e| e.ids.len() != exs[0].ids.len()), "the batch should need padding");
        let fused_nll = hetfed_train::batch_nll(model.as_ref(), &exs).unwrap();
        let full_nll = hetfed_train::batch_nll(&unfused, &exs).unwrap();
        let (a, b) = (fused_nll.to_scalar::<f32>().unwrap(), full_nll.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{name}: training loss {a} vs {b}");
        let (g1, g2) = (fused_nll.backward().unwrap(), full_nll.backward().unwrap());
        for (pname, var) in set.vars() {
            let (x, y) = (g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
            let m = y.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(m > 0.0 && d / m < 1e-3, "{name}: gradient of `{pname}` differs by {d} (largest {m})");
        }
        let (e1, e2) = (
            hetfed_train::eval_loss(model.as_ref(), &data, 4).unwrap(),
            hetfed_train::eval_loss(&unfused as &dyn CausalLm, &data, 4).unwrap(),
        );
        assert!((e1 - e2).abs() < 1e-5, "{name}: eval loss {e1} vs {e2}");
    }
}

#[test]
fn training_on_a_half_resident_checkpoint_equals_training_on_it_widened() {
    use candle_core::DType;
    use hetfed_model::WeightDtype;
    // An f16 file: kept half precision (frozen under LoRA; widened to f32 variables for full
    // fine-tuning) or widened at load, the runs agree.
    let dir = fixture("bloom_h8_f16");
    let half = Checkpoint::load_with(&dir, WeightDtype::Stored).unwrap();
    let wide = Checkpoint::load_with(&dir, WeightDtype::F32).unwrap();
    assert_eq!(half.weights["transformer.h.0.mlp.dense_h_to_4h.weight"].dtype(), DType::F16);
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let mut lora = lora_cfg();
    lora.lora.as_mut().unwrap().targets = vec!["query_key_value".into(), "dense_h_to_4h".into()];
    let (a, b) = (flat(&run(&half, lora.clone(), None)), flat(&run(&wide, lora, None)));
    assert_eq!(a.len(), b.len());
    assert!(max_diff(&a, &b) < 1e-5, "LoRA factors differ by {}", max_diff(&a, &b));
    let full = TrainConfig { lr: 3e-3, batch_size: 4, epochs: 1, seed: 1, ..Default::default() };
    let th = run(&half, full.clone(), None);
    assert!(th.weights().unwrap().values().all(|t| t.dtype() == DType::F32), "trainable weights are f32");
    let (a, b) = (flat(&th), flat(&run(&wide, full, None)));
    assert!(max_diff(&a, &b) < 1e-5, "fully fine-tuned weights differ by {}", max_diff(&a, &b));
}

#[test]
fn gradient_checkpointing_trains_exactly_like_keeping_activations() {
    // LoRA with dropout (the recomputation must replay the masks), and full fine-tuning, on
    // both architectures: the same weights after several steps, to float rounding.
    let full = TrainConfig { lr: 3e-3, batch_size: 4, epochs: 1, seed: 1, ..Default::default() };
    let llama_lora = TrainConfig {
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: vec!["q_proj".into(), "down_proj".into()],
        }),
        ..lora_cfg()
    };
    let cases = [
        ("bloom_h3", lora_cfg()),
        ("llama_gqa", llama_lora),
        ("bloom_h6_noprefix", full.clone()),
        ("llama_tied", full),
    ];
    for (name, cfg) in cases {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let start = flat(&run(&ck, cfg.clone(), Some(0)));
        let plain = run(&ck, cfg.clone(), None);
        let recomputed = run(&ck, TrainConfig { gradient_checkpointing: true, ..cfg }, None);
        assert!(plain.step >= 2, "{name}: expected several steps, found {}", plain.step);
        assert_eq!(plain.step, recomputed.step);
        let (a, b) = (flat(&plain), flat(&recomputed));
        assert_eq!(a.len(), b.len());
        let moved = a.iter().zip(&start).any(|(x, y)| x != y);
        assert!(moved, "{name}: training did not move the weights");
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max weight difference {diff} (scale {scale})");
    }
}
