//! The fused LM head (`CausalLm::target_logprobs` of BLOOM and Llama, through
//! `ops::linear_token_logprobs`) against the full logits (`forward` + `ops::token_logprobs`):
//! the same log-probs, and the same gradients for LoRA factors and for every weight of a full
//! fine-tuning, the tied or untied head included.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use hetfed_core::testing::max_abs_diff;
use hetfed_core::TensorMap;
use hetfed_model::model::Unfused;
use hetfed_model::{ops, CausalLm, Checkpoint, LoraConfig, LoraSet};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Tiny random models: BLOOM (tied head), Llama with grouped-query attention and an untied head,
/// Llama with a tied head.
const MODELS: [&str; 3] = ["bloom_h3", "llama_gqa", "llama_tied"];

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// A right-padded batch of 3 sequences (lengths 9, 5, 2) with targets `ids[b, j + 1]` (0 at
/// padding) and a mask that also drops the first target of each row, as a prompt would.
fn batch(vocab: u32) -> (Tensor, Vec<u32>, Tensor) {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let lens = [9usize, 5, 2];
    let t = 9;
    let mut ids = vec![0u32; 3 * t];
    let mut targets = vec![0u32; 3 * (t - 1)];
    let mut mask = vec![0f32; 3 * (t - 1)];
    for (b, &len) in lens.iter().enumerate() {
        for j in 0..len {
            ids[b * t + j] = r.random_range(4..vocab);
        }
        for j in 1..len {
            targets[b * (t - 1) + j - 1] = ids[b * t + j];
            mask[b * (t - 1) + j - 1] = if j == 1 { 0.0 } else { 1.0 };
        }
    }
    (
        Tensor::from_vec(ids, (3, t), &Device::Cpu).unwrap(),
        targets,
        Tensor::from_vec(mask, (3, t - 1), &Device::Cpu).unwrap(),
    )
}

/// Uniform in [-0.5, 0.5), seeded.
fn rand(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.iter().product()).map(|_| r.random_range(-0.5f32..0.5)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn masked_nll(lp: &Tensor, mask: &Tensor) -> Tensor {
    (lp * mask).unwrap().sum_all().unwrap().neg().unwrap()
}

#[test]
fn target_logprobs_equal_forward_then_token_logprobs() {
    for name in MODELS {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let model = ck.model(None).unwrap();
        let (ids, targets, _) = batch(model.vocab_size() as u32);
        let fused = model.target_logprobs(&ids, &targets).unwrap();
        let logits = model.forward(&ids, None).unwrap().narrow(1, 0, 8).unwrap();
        let want = ops::token_logprobs(&logits, &targets).unwrap();
        assert_eq!(fused.dims(), &[3, 8], "{name}");
        let d = max_abs_diff(&fused, &want);
        assert!(d < 1e-5, "{name}: fused log-probs differ by {d}");
        // The wrapper used as the unfused baseline is exactly that composition.
        let unfused = Unfused(model.as_ref()).target_logprobs(&ids, &targets).unwrap();
        assert_eq!(max_abs_diff(&unfused, &want), 0.0, "{name}");
    }
}

#[test]
fn target_logprobs_refuse_a_single_token() {
    let ck = Checkpoint::load(&fixture("bloom_h3")).unwrap();
    let model = ck.model(None).unwrap();
    let ids = Tensor::new(&[[5u32]], &Device::Cpu).unwrap();
    let unfused = Unfused(model.as_ref());
    let both: [&dyn CausalLm; 2] = [model.as_ref(), &unfused];
    for m in both {
        let e = m.target_logprobs(&ids, &[]).unwrap_err().to_string();
        assert!(e.contains("at least 2 tokens"), "{e}");
    }
}

fn lora_targets(name: &str) -> Vec<String> {
    let t: &[&str] = if name.starts_with("bloom") {
        &["query_key_value", "dense_4h_to_h"]
    } else {
        &["q_proj", "v_proj", "down_proj"]
    };
    t.iter().map(|s| s.to_string()).collect()
}

/// The LM head's weight: the tied embedding, or Llama's untied `lm_head`.
fn is_head(name: &str) -> bool {
    ["transformer.word_embeddings.weight", "model.embed_tokens.weight", "lm_head.weight"].contains(&name)
}

#[test]
fn lora_step_gradients_match_the_unfused_loss() {
    for name in MODELS {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, targets: lora_targets(name) };
        let set = LoraSet::init(&cfg, &ck.weights, 3).unwrap();
        // B = 0 at init would make every A gradient zero: give B values so both factors count.
        for (i, f) in set.factors.values().enumerate() {
            f.b.set(&rand(f.b.dims(), 100 + i as u64)).unwrap();
        }
        let model = ck.model(Some(&set)).unwrap();
        let (ids, targets, mask) = batch(model.vocab_size() as u32);
        let fused = masked_nll(&model.target_logprobs(&ids, &targets).unwrap(), &mask);
        let unfused = masked_nll(&Unfused(model.as_ref()).target_logprobs(&ids, &targets).unwrap(), &mask);
        let dl = max_abs_diff(&fused, &unfused);
        assert!(dl < 1e-4, "{name}: loss differs by {dl}");
        let (g1, g2) = (fused.backward().unwrap(), unfused.backward().unwrap());
        for (pname, var) in set.vars() {
            let a = g1.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: `{pname}` got no gradient"));
            let b = g2.get(var.as_tensor()).unwrap();
            assert!(max_abs(b) > 0.0, "{name}: `{pname}` has a zero reference gradient");
            let rel = max_abs(&(a - b).unwrap()) / max_abs(b);
            assert!(rel < 1e-3, "{name}: gradient of `{pname}` differs by {rel} (relative)");
        }
        // The head is frozen: the fused path gives it no gradient.
        let mut heads = 0;
        for (k, t) in &ck.weights {
            if is_head(k) {
                assert!(g1.get(t).is_none(), "{name}: the frozen head `{k}` got a gradient");
                heads += 1;
            }
        }
        assert!(heads > 0, "{name}: no head found");
    }
}

#[test]
fn full_finetuning_gradients_match_the_unfused_loss_head_included() {
    for name in MODELS {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let vars: Vec<(String, Var)> =
            ck.weights.iter().map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap())).collect();
        let tracked: TensorMap = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        let model = ck.arch.build(&tracked, "test", None).unwrap();
        let (ids, targets, mask) = batch(model.vocab_size() as u32);
        let fused = masked_nll(&model.target_logprobs(&ids, &targets).unwrap(), &mask);
        let unfused = masked_nll(&Unfused(model.as_ref()).target_logprobs(&ids, &targets).unwrap(), &mask);
        let (g1, g2) = (fused.backward().unwrap(), unfused.backward().unwrap());
        let mut head_checked = false;
        for (pname, var) in &vars {
            let a = g1.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: `{pname}` got no gradient"));
            let b = g2.get(var.as_tensor()).unwrap();
            let rel = max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12);
            assert!(rel < 1e-3, "{name}: gradient of `{pname}` differs by {rel} (relative)");
            head_checked |= is_head(pname);
        }
        assert!(head_checked, "{name}: the head's gradient was not compared");
    }
}

#[test]
fn scoring_through_the_fused_head_equals_the_unfused_scores() {
    for name in MODELS {
        let ck = Checkpoint::load(&fixture(name)).unwrap();
        let model = ck.model(None).unwrap();
        let seqs = vec![vec![1u32, 5, 9, 200, 31, 8], vec![1, 44, 2], vec![1, 7, 7, 7], vec![9]];
        let fused = hetfed_model::score::sequence_logprobs(model.as_ref(), &seqs, 2).unwrap();
        let unfused = hetfed_model::score::sequence_logprobs(&Unfused(model.as_ref()), &seqs, 2).unwrap();
        for (a, b) in fused.iter().zip(&unfused) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
            }
        }
    }
}
