use std::path::PathBuf;

use rand::{Rng, SeedableRng};

use hetfed_model::{bloom, Arch, ModelSpec};

use super::*;

fn config(vocab: usize) -> bloom::Config {
    bloom::Config {
        vocab_size: vocab,
        hidden_size: 16,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        pad_token_id: Some(3),
    }
}

fn checkpoint(cfg: bloom::Config, weights: TensorMap) -> Checkpoint {
    let spec = ModelSpec {
        dir: PathBuf::from("<test>"),
        config_json: cfg.hf_config_json(),
        arch: Arch::Bloom(cfg),
        tokenizer: None,
    };
    Checkpoint { spec, weights }
}

/// A tiny random BLOOM whose embeddings are scaled up so its next-token distributions are far
/// from uniform (BLOOM's 0.02 init gives near-uniform logits, and near-zero KLs).
fn tiny(vocab: usize, seed: u64) -> Checkpoint {
    let cfg = config(vocab);
    let mut w = cfg.random_weights(seed).unwrap();
    let e = "transformer.word_embeddings.weight";
    w.insert(e.into(), (&w[e] * 25.0).unwrap());
    checkpoint(cfg, w)
}

/// `ck` with N(0, std²) noise added to every linear weight (what LoRA can adapt).
fn perturbed(ck: &Checkpoint, seed: u64, std: f32) -> Checkpoint {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let linear = hetfed_model::lora::linear_modules(&ck.weights);
    let mut w = ck.weights.clone();
    for module in linear.keys() {
        let name = format!("{module}.weight");
        let t = &w[&name];
        let noise: Vec<f32> = (0..t.elem_count())
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        let n = Tensor::from_vec(noise, t.dims(), &Device::Cpu).unwrap();
        let v = (t + n).unwrap();
        w.insert(name, v);
    }
    let Arch::Bloom(cfg) = &ck.arch else { unreachable!() };
    checkpoint(cfg.clone(), w)
}

fn quick_cfg(lora_rank: usize) -> DistillConfig {
    DistillConfig {
        lora_rank,
        lr: 1e-2,
        steps: 40,
        batch_size: 8,
        n_prompts: 24,
        seq_len: 12,
        ..DistillConfig::default()
    }
}

fn seqs_of(ck: &Checkpoint, cfg: &DistillConfig) -> Vec<Vec<u32>> {
    let m = ck.model(None).unwrap();
    sample_texts(m.as_ref(), 2, cfg.n_prompts, cfg.seq_len, cfg.seed).unwrap()
}

fn targets_of(teacher: &Checkpoint, seqs: &[Vec<u32>], temperature: f64) -> Vec<Tensor> {
    let m = teacher.model(None).unwrap();
    ensemble_targets(&[(m.as_ref(), 1.0)], seqs, temperature).unwrap()
}

use hetfed_core::testing::max_abs_diff;

#[test]
fn config_defaults_validate_and_reject_bad_values() {
    let d = DistillConfig::default();
    d.validate().unwrap();
    assert_eq!((d.lora_rank, d.steps, d.batch_size, d.n_prompts, d.seq_len), (8, 30, 8, 64, 48));
    for bad in [
        DistillConfig { lr: 0.0, ..d.clone() },
        DistillConfig { batch_size: 0, ..d.clone() },
        DistillConfig { temperature: 0.0, ..d.clone() },
        DistillConfig { seq_len: 1, ..d.clone() },
        DistillConfig { n_prompts: 0, ..d.clone() },
        DistillConfig { lora_alpha: f64::NAN, ..d.clone() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    // Full fine-tuning ignores lora_alpha.
    DistillConfig { lora_rank: 0, lora_alpha: 0.0, ..d.clone() }.validate().unwrap();
    // serde: every field optional, unknown fields rejected.
    let parsed: DistillConfig = serde_json::from_str(r#"{"steps": 5}"#).unwrap();
    assert_eq!(parsed, DistillConfig { steps: 5, ..d });
    assert!(serde_json::from_str::<DistillConfig>(r#"{"stepz": 5}"#).is_err());
}

#[test]
fn sample_texts_is_deterministic_and_starts_with_the_start_token() {
    let ck = tiny(64, 1);
    let m = ck.model(None).unwrap();
    let a = sample_texts(m.as_ref(), 2, 40, 10, 7).unwrap();
    let b = sample_texts(m.as_ref(), 2, 40, 10, 7).unwrap();
    let c = sample_texts(m.as_ref(), 2, 40, 10, 8).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.len(), 40);
    assert!(a.iter().all(|s| s.len() == 10 && s[0] == 2 && s.iter().all(|&t| t < 64)));
    // Sampled, not greedy: the rows differ.
    assert!(a.iter().any(|s| s != &a[0]));
    assert!(sample_texts(m.as_ref(), 64, 1, 10, 0).is_err());
    assert!(sample_texts(m.as_ref(), 2, 1, 1, 0).is_err());
}

/// Every trainable parameter must get a non-zero gradient from the KL loss (an op without a
/// backward pass would silently freeze it).
#[test]
fn every_trainable_parameter_gets_a_nonzero_gradient() {
    let student = tiny(64, 1);
    let teacher = perturbed(&student, 9, 0.3);
    for rank in [4, 0] {
        let cfg = DistillConfig { temperature: 2.0, ..quick_cfg(rank) };
        let seqs = seqs_of(&student, &cfg);
        let targets = targets_of(&teacher, &seqs, cfg.temperature);
        let st = Student::new(&student, &cfg).unwrap();
        if let Some(set) = &st.lora {
            // B starts at 0, which zeroes A's gradient; give B values so both are exercised.
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            for f in set.factors.values() {
                let v: Vec<f32> = (0..f.b.elem_count()).map(|_| rng.random_range(-0.1..0.1)).collect();
                f.b.set(&Tensor::from_vec(v, f.b.dims(), &Device::Cpu).unwrap()).unwrap();
            }
            assert_eq!(st.vars.len(), 2 * 4 * 2, "A and B of 4 targets in 2 layers");
        } else {
            assert_eq!(st.vars.len(), student.weights.len());
        }
        let data = Data::new(&seqs, &targets, 64, cfg.temperature).unwrap();
        let idx: Vec<usize> = (0..seqs.len()).collect();
        let loss = data.sum_kl(st.model.as_ref(), &idx).unwrap();
        let grads = grads_of(&loss, &st.vars).unwrap();
        for ((name, _), g) in st.vars.iter().zip(&grads) {
            let n = hetfed_core::sq_norm(g).unwrap();
            assert!(n > 0.0 && n.is_finite(), "rank {rank}: `{name}` has gradient norm² {n}");
        }
    }
}

/// The KL loss's gradient matches a finite difference (so the composition is the right function).
#[test]
fn kl_gradient_matches_finite_difference() {
    let student = tiny(64, 1);
    let teacher = perturbed(&student, 9, 0.3);
    let cfg = DistillConfig { temperature: 1.5, ..quick_cfg(0) };
    let seqs = seqs_of(&student, &cfg)[..4].to_vec();
    let targets = targets_of(&teacher, &seqs, cfg.temperature);
    let st = Student::new(&student, &cfg).unwrap();
    let data = Data::new(&seqs, &targets, 64, cfg.temperature).unwrap();
    let idx = [0, 1, 2, 3];
    let name = "transformer.h.1.mlp.dense_4h_to_h.weight";
    let (i, (_, var)) = st.vars.iter().enumerate().find(|(_, (n, _))| n == name).unwrap();
    let grads = grads_of(&data.sum_kl(st.model.as_ref(), &idx).unwrap(), &st.vars).unwrap();
    let g = grads[i].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let j = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
    let orig = var.as_tensor().detach().copy().unwrap();
    let eps = 1e-2f32;
    let eval = |delta: f32| {
        let mut v = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[j] += delta;
        var.set(&Tensor::from_vec(v, orig.dims(), &Device::Cpu).unwrap()).unwrap();
        data.sum_kl(st.model.as_ref(), &idx).unwrap().to_scalar::<f32>().unwrap()
    };
    let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
    var.set(&orig).unwrap();
    assert!((fd - g[j]).abs() < 0.05 * g[j].abs() + 1e-4, "finite difference {fd} vs gradient {}", g[j]);
}

fn check_distils(rank: usize) {
    let student = tiny(64, 1);
    let teacher = perturbed(&student, 9, 0.3);
    let cfg = quick_cfg(rank);
    let seqs = seqs_of(&student, &cfg);
    let targets = targets_of(&teacher, &seqs, cfg.temperature);
    let mut losses = Vec::new();
    let r = distill(&student, &targets, &seqs, &cfg, |s, l| losses.push((s, l))).unwrap();
    assert_eq!(r.steps, cfg.steps);
    assert_eq!(losses.len(), cfg.steps);
    assert_eq!(losses.last().unwrap().0, cfg.steps);
    assert!(r.kl_before > 1e-2, "rank {rank}: teacher too close to the student: KL {}", r.kl_before);
    assert!(r.kl_after < 0.5 * r.kl_before, "rank {rank}: KL {} -> {}", r.kl_before, r.kl_after);
    // The delta is the whole change: the student's weights plus it reproduce kl_after.
    if rank > 0 {
        let n_linear = hetfed_model::lora::linear_modules(&student.weights).len();
        assert_eq!(r.delta.len(), n_linear);
    } else {
        assert_eq!(r.delta.len(), student.weights.len());
    }
    let mut w = student.weights.clone();
    for (k, d) in &r.delta {
        assert_eq!(w[k].dims(), d.dims(), "{k}");
        let v = (&w[k] + d).unwrap();
        w.insert(k.clone(), v);
    }
    let Arch::Bloom(c) = &student.arch else { unreachable!() };
    let trained = checkpoint(c.clone(), w).model(None).unwrap();
    let data = Data::new(&seqs, &targets, 64, cfg.temperature).unwrap();
    let kl = data.mean_kl(trained.as_ref(), 8).unwrap();
    assert!((kl - r.kl_after).abs() < 1e-4 * (1.0 + r.kl_after), "rank {rank}: {kl} vs {}", r.kl_after);
    // Deterministic under the seed.
    let r2 = distill(&student, &targets, &seqs, &cfg, |_, _| {}).unwrap();
    assert_eq!(r2.kl_after, r.kl_after);
    for (k, d) in &r.delta {
        assert_eq!(max_abs_diff(d, &r2.delta[k]), 0.0, "{k}");
    }
}

#[test]
fn lora_distillation_reduces_kl() {
    check_distils(8);
}

#[test]
fn full_distillation_reduces_kl() {
    check_distils(0);
}

#[test]
fn a_student_teaching_itself_starts_at_zero_kl() {
    let student = tiny(64, 1);
    for temperature in [1.0, 2.0] {
        let cfg = DistillConfig { temperature, steps: 3, ..quick_cfg(4) };
        let seqs = seqs_of(&student, &cfg);
        let targets = targets_of(&student, &seqs, cfg.temperature);
        let r = distill(&student, &targets, &seqs, &cfg, |_, _| {}).unwrap();
        assert!(r.kl_before.abs() < 1e-5, "T {temperature}: KL {}", r.kl_before);
        assert!(r.kl_after.abs() < 1e-3, "T {temperature}: KL {}", r.kl_after);
    }
}

#[test]
fn ensemble_targets_are_the_weighted_mixture() {
    let a = tiny(64, 1);
    let b = tiny(64, 2);
    let (ma, mb) = (a.model(None).unwrap(), b.model(None).unwrap());
    let mut seqs = seqs_of(&a, &quick_cfg(4))[..5].to_vec();
    seqs[3].truncate(7); // different lengths are fine
    let t = 1.7;
    let mix = ensemble_targets(&[(ma.as_ref(), 3.0), (mb.as_ref(), 1.0)], &seqs, t).unwrap();
    let only_b = ensemble_targets(&[(ma.as_ref(), 0.0), (mb.as_ref(), 2.5)], &seqs, t).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(mix[i].dims(), [s.len(), 64]);
        let sums = mix[i].sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(sums.iter().all(|x| (x - 1.0).abs() < 1e-5), "{sums:?}");
        let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
        let soft = |m: &dyn CausalLm| {
            let l = (m.forward(&ids, None).unwrap().squeeze(0).unwrap() / t).unwrap();
            let e = l.broadcast_sub(&l.max_keepdim(1).unwrap()).unwrap().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap()
        };
        let (pa, pb) = (soft(ma.as_ref()), soft(mb.as_ref()));
        assert!(max_abs_diff(&only_b[i], &pb) < 1e-6);
        let want = ((pa * 0.75).unwrap() + (pb * 0.25).unwrap()).unwrap();
        assert!(max_abs_diff(&mix[i], &want) < 1e-6);
    }
    // The two teachers really differ, so the checks above can fail.
    assert!(max_abs_diff(&mix[0], &only_b[0]) > 1e-3);
}

#[test]
fn bad_inputs_are_errors() {
    let student = tiny(64, 1);
    let small = tiny(32, 2);
    let (ms, m32) = (student.model(None).unwrap(), small.model(None).unwrap());
    let cfg = quick_cfg(4);
    let seqs = seqs_of(&small, &cfg); // ids < 32, valid for both vocabularies
    let msg = |e: Error| e.to_string();
    // Teachers with different vocabularies.
    let e = ensemble_targets(&[(ms.as_ref(), 1.0), (m32.as_ref(), 1.0)], &seqs, 1.0).unwrap_err();
    assert!(msg(e).contains("vocabulary"));
    // Teacher vocabulary differs from the student's.
    let t32 = ensemble_targets(&[(m32.as_ref(), 1.0)], &seqs, 1.0).unwrap();
    let e = distill(&student, &t32, &seqs, &cfg, |_, _| {}).unwrap_err();
    assert!(msg(e).contains("tokenizer"));
    // Empty sequence lists or sequences.
    assert!(ensemble_targets(&[(ms.as_ref(), 1.0)], &[], 1.0).is_err());
    assert!(ensemble_targets(&[(ms.as_ref(), 1.0)], &[vec![]], 1.0).is_err());
    assert!(distill(&student, &[], &[], &cfg, |_, _| {}).is_err());
    // Weights: all zero, negative, NaN; no teacher at all.
    assert!(ensemble_targets(&[(ms.as_ref(), 0.0), (ms.as_ref(), 0.0)], &seqs, 1.0).is_err());
    assert!(ensemble_targets(&[(ms.as_ref(), -1.0), (ms.as_ref(), 2.0)], &seqs, 1.0).is_err());
    assert!(ensemble_targets(&[(ms.as_ref(), f64::NAN)], &seqs, 1.0).is_err());
    assert!(ensemble_targets(&[], &seqs, 1.0).is_err());
    // Token outside the vocabulary; bad temperature.
    assert!(ensemble_targets(&[(m32.as_ref(), 1.0)], &[vec![2, 40]], 1.0).is_err());
    assert!(ensemble_targets(&[(ms.as_ref(), 1.0)], &seqs, 0.0).is_err());
    // Target count or length mismatch; invalid config.
    let t64 = ensemble_targets(&[(ms.as_ref(), 1.0)], &seqs, 1.0).unwrap();
    assert!(distill(&student, &t64[1..], &seqs, &cfg, |_, _| {}).is_err());
    let mut short = seqs.clone();
    short[0].pop();
    assert!(distill(&student, &t64, &short, &cfg, |_, _| {}).is_err());
    assert!(distill(&student, &t64, &seqs, &DistillConfig { batch_size: 0, ..cfg.clone() }, |_, _| {}).is_err());
    // And the valid combination works.
    distill(&student, &t64, &seqs, &DistillConfig { steps: 1, ..cfg }, |_, _| {}).unwrap();
}

/// Log-softmax of one row, by hand in f64.
fn log_softmax_row(x: &[f32]) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// `got` (f32 log-probs of one position) equals `want` to 1e-4.
fn assert_row_close(got: &[f32], want: &[f64], pos: usize) {
    for (v, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() < 1e-4, "position {pos}, token {v}: {g} vs {w}");
    }
}

/// Greedy decoding without a cache: the argmax of a full forward at each of `n` steps.
fn greedy_full_forward(lm: &dyn CausalLm, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let ids = Tensor::from_vec(seq.clone(), (1, seq.len()), &Device::Cpu).unwrap();
        let last =
            lm.forward(&ids, None).unwrap().squeeze(0).unwrap().get(seq.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        seq.push((0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn offset_teacher_equals_a_hand_computation() {
    let large = tiny(64, 1);
    let base = tiny(64, 2);
    let (t1, t2) = (perturbed(&base, 5, 0.3), perturbed(&base, 6, 0.3));
    let (w1, w2) = (0.7, 1.3);
    let lm = OffsetLm::new(
        large.model(None).unwrap(),
        vec![base.model(None).unwrap()],
        vec![(0, t1.model(None).unwrap(), w1), (0, t2.model(None).unwrap(), w2)],
    )
    .unwrap();
    assert_eq!(lm.n_layers(), 4 * 2);
    let ids = Tensor::from_vec(vec![2u32, 7, 9, 11, 3], (1, 5), &Device::Cpu).unwrap();
    let got = lm.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let rows = |ck: &Checkpoint| {
        ck.model(None).unwrap().forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap()
    };
    let (l, b, a1, a2) = (rows(&large), rows(&base), rows(&t1), rows(&t2));
    for pos in 0..5 {
        let (ll, lb, l1, l2) =
            (log_softmax_row(&l[pos]), log_softmax_row(&b[pos]), log_softmax_row(&a1[pos]), log_softmax_row(&a2[pos]));
        let raw: Vec<f32> = (0..64).map(|v| (ll[v] + w1 * (l1[v] - lb[v]) + w2 * (l2[v] - lb[v])) as f32).collect();
        let want = log_softmax_row(&raw);
        assert_row_close(&got[pos], &want, pos);
        // A real offset: the teacher is not the large model.
        assert!((0..64).any(|v| (want[v] - ll[v]).abs() > 1e-2));
    }
    // A zero weight gives the large model back.
    let same = OffsetLm::new(
        large.model(None).unwrap(),
        vec![base.model(None).unwrap()],
        vec![(0, t1.model(None).unwrap(), 0.0)],
    )
    .unwrap();
    let s = same.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    for pos in 0..5 {
        let ll = log_softmax_row(&l[pos]);
        assert!((0..64).all(|v| (s[pos][v] as f64 - ll[v]).abs() < 1e-4));
    }
}

#[test]
fn offset_model_decodes_through_its_cache_like_a_full_forward() {
    let large = tiny(64, 1);
    let base = tiny(64, 2);
    let lm = OffsetLm::new(
        large.model(None).unwrap(),
        vec![base.model(None).unwrap()],
        vec![(0, perturbed(&base, 5, 0.3).model(None).unwrap(), 1.0)],
    )
    .unwrap();
    let prompt = vec![2u32, 7, 9];
    let cfg = hetfed_model::generate::SamplingConfig {
        max_new_tokens: 6,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
    };
    let cached = hetfed_model::generate::generate(&lm, &prompt, &cfg, None).unwrap();
    assert_eq!(cached, greedy_full_forward(&lm, &prompt, 6));
}

/// A posterior-routed offset model over two offsets of one base (prior masses 0.5 and 2, base
/// mass 1, λ = 1.5).
fn routed_fixture() -> (Checkpoint, Checkpoint, Checkpoint, Checkpoint, OffsetLm) {
    let large = tiny(64, 1);
    let base = tiny(64, 2);
    let (t1, t2) = (perturbed(&base, 5, 0.4), perturbed(&base, 6, 0.4));
    let lm = OffsetLm::routed(
        large.model(None).unwrap(),
        vec![base.model(None).unwrap()],
        vec![(0, t1.model(None).unwrap(), 0.5), (0, t2.model(None).unwrap(), 2.0)],
        Posterior { lambda: 1.5, base_mass: 1.0 },
    )
    .unwrap();
    (large, base, t1, t2, lm)
}

#[test]
fn posterior_routing_equals_a_hand_computation() {
    let (large, base, t1, t2, lm) = routed_fixture();
    let seq = [2u32, 7, 9, 11, 3, 40, 41];
    let n = seq.len();
    let ids = Tensor::from_vec(seq.to_vec(), (1, n), &Device::Cpu).unwrap();
    let got = lm.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    let rows = |ck: &Checkpoint| -> Vec<Vec<f64>> {
        let r = ck.model(None).unwrap().forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        r.iter().map(|x| log_softmax_row(x)).collect()
    };
    let (l, b, a1, a2) = (rows(&large), rows(&base), rows(&t1), rows(&t2));
    let (mut r1, mut r2) = (0f64, 0f64);
    let mut routed_to = Vec::new();
    for pos in 0..n {
        if pos > 0 {
            let x = seq[pos] as usize;
            r1 += a1[pos - 1][x] - b[pos - 1][x];
            r2 += a2[pos - 1][x] - b[pos - 1][x];
        }
        let s = [1.0f64, 0.5 * r1.exp(), 2.0 * r2.exp()];
        let z: f64 = s.iter().sum();
        let (p1, p2) = (s[1] / z, s[2] / z);
        routed_to.push((p1, p2));
        let raw: Vec<f32> = (0..64)
            .map(|v| (l[pos][v] + 1.5 * (p1 * (a1[pos][v] - b[pos][v]) + p2 * (a2[pos][v] - b[pos][v]))) as f32)
            .collect();
        let want = log_softmax_row(&raw);
        assert_row_close(&got[pos], &want, pos);
    }
    // Before any token the prior decides; afterwards the tokens move the posterior.
    assert!((routed_to[0].0 - 0.5 / 3.5).abs() < 1e-9 && (routed_to[0].1 - 2.0 / 3.5).abs() < 1e-9);
    assert!(routed_to.iter().any(|p| (p.0 - routed_to[0].0).abs() > 1e-3));
}

#[test]
fn posterior_routing_follows_the_specialist_that_wrote_the_text() {
    let (_, _, t1, t2, lm) = routed_fixture();
    let pi_of = |seq: &[u32]| -> f64 {
        // How much closer the routed model's last distribution is to specialist 1 than to 2.
        let ids = Tensor::from_vec(seq.to_vec(), (1, seq.len()), &Device::Cpu).unwrap();
        let last = |m: &dyn CausalLm| {
            let r = m.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            log_softmax_row(&r[seq.len() - 1])
        };
        let (g, s1, s2) = (last(&lm), last(t1.model(None).unwrap().as_ref()), last(t2.model(None).unwrap().as_ref()));
        let d = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>();
        d(&g, &s2) - d(&g, &s1)
    };
    let from1 = sample_texts(t1.model(None).unwrap().as_ref(), 2, 4, 24, 11).unwrap();
    let from2 = sample_texts(t2.model(None).unwrap().as_ref(), 2, 4, 24, 11).unwrap();
    let m1: f64 = from1.iter().map(|s| pi_of(s)).sum::<f64>();
    let m2: f64 = from2.iter().map(|s| pi_of(s)).sum::<f64>();
    assert!(m1 > m2, "text of specialist 1 should move the routed model toward it: {m1} vs {m2}");
}

#[test]
fn posterior_routing_decodes_through_its_cache_like_a_full_forward() {
    let (.., lm) = routed_fixture();
    let cfg = hetfed_model::generate::SamplingConfig {
        max_new_tokens: 6,
        temperature: 0.0,
        top_k: None,
        top_p: None,
        seed: 0,
    };
    let greedy = |prompt: &[u32]| greedy_full_forward(&lm, prompt, 6);
    let (p1, p2) = (vec![2u32, 7, 9, 30, 31], vec![2u32, 12]);
    assert_eq!(hetfed_model::generate::generate(&lm, &p1, &cfg, None).unwrap(), greedy(&p1));
    // Left-padded batches: the padding carries no evidence.
    let batch = hetfed_model::generate::generate_batch(&lm, &[p1.clone(), p2.clone()], &cfg, None).unwrap();
    assert_eq!(batch, vec![greedy(&p1), greedy(&p2)]);
}

#[test]
fn posterior_routing_refuses_masses_that_are_not_positive() {
    let large = tiny(64, 1);
    let base = tiny(64, 2);
    let routed = |m: f64, p: Posterior| {
        OffsetLm::routed(
            large.model(None).unwrap(),
            vec![base.model(None).unwrap()],
            vec![(0, base.model(None).unwrap(), m)],
            p,
        )
        .err()
        .map(|e| e.to_string())
    };
    let ok = Posterior { lambda: 1.0, base_mass: 1.0 };
    assert!(routed(0.0, ok).unwrap().contains("offset 0"));
    assert!(routed(1.0, Posterior { base_mass: 0.0, ..ok }).unwrap().contains("base mass"));
    assert!(routed(1.0, Posterior { lambda: f64::NAN, ..ok }).is_some());
    assert!(routed(1.0, ok).is_none());
}

/// A tiny student distilled under `cfg` toward its own offset teacher (the student plus the
/// offset of a perturbed small model), on text sampled from that teacher.
fn distil_toward_an_offset_teacher(cfg: &DistillConfig) -> DistillReport {
    let student = tiny(64, 1);
    let base = tiny(64, 2);
    let tuned = perturbed(&base, 5, 0.4);
    let teacher = OffsetLm::new(
        student.model(None).unwrap(),
        vec![base.model(None).unwrap()],
        vec![(0, tuned.model(None).unwrap(), 1.0)],
    )
    .unwrap();
    let seqs = sample_texts(&teacher, 2, cfg.n_prompts, cfg.seq_len, 3).unwrap();
    let targets = ensemble_targets(&[(&teacher, 1.0)], &seqs, 1.0).unwrap();
    distill(&student, &targets, &seqs, cfg, |_, _| {}).unwrap()
}

#[test]
fn offset_distillation_lowers_the_kl_to_the_offset_teacher() {
    let r = distil_toward_an_offset_teacher(&quick_cfg(8));
    assert!(r.kl_before > 1e-2, "the offset changes the distribution: KL {}", r.kl_before);
    assert!(r.kl_after < 0.5 * r.kl_before, "KL {} -> {}", r.kl_before, r.kl_after);
}

#[test]
fn offset_model_refuses_another_vocabulary() {
    let large = tiny(64, 1);
    let other = tiny(48, 2);
    let e =
        OffsetLm::new(large.model(None).unwrap(), vec![other.model(None).unwrap()], vec![]).err().unwrap().to_string();
    assert!(e.contains("64") && e.contains("48"), "{e}");
}

#[test]
fn template_samples_keep_the_literal_text_in_place() {
    let m = tiny(64, 1).model(None).unwrap();
    let segs = [Segment::Text(vec![10, 11]), Segment::Field, Segment::Text(vec![12]), Segment::Field];
    let samples = sample_template(m.as_ref(), 2, &segs, 5, 20, 7).unwrap();
    assert_eq!(samples.answer_start, 12, "start, 2 literal, 8 sampled, 1 literal: the answer follows");
    let rows = samples.seqs;
    assert_eq!(rows.len(), 5);
    // start, 2 literal, 8 sampled, 1 literal, 8 sampled: the 16 free tokens split evenly.
    for r in &rows {
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..3], &[2, 10, 11]);
        assert_eq!(r[11], 12);
    }
    assert_ne!(rows[0][3..11], rows[1][3..11], "fields are sampled");
    assert_eq!(rows, sample_template(m.as_ref(), 2, &segs, 5, 20, 7).unwrap().seqs, "deterministic under the seed");
    // A template ending in text gets an answer field after it.
    let s = sample_template(m.as_ref(), 2, &[Segment::Field, Segment::Text(vec![9])], 2, 9, 1).unwrap();
    assert_eq!(s.seqs[0][4], 9);
    assert_eq!(s.answer_start, 5);
    assert!(sample_template(m.as_ref(), 2, &[Segment::Text(vec![1; 10])], 2, 8, 1)
        .unwrap_err()
        .to_string()
        .contains("leaving"));
}

#[test]
fn teacher_forced_answers_replace_the_sampled_answer_and_keep_the_prompt() {
    let m = tiny(64, 1).model(None).unwrap();
    let segs = [Segment::Text(vec![10, 11]), Segment::Field, Segment::Text(vec![12]), Segment::Field];
    let answers = vec![(30..40).collect::<Vec<u32>>(), (40..50).collect()];
    let s = sample_template_from(
        m.as_ref(),
        2,
        &segs,
        3,
        20,
        7,
        TemplateText { answers: Some(&answers), ..Default::default() },
    )
    .unwrap();
    let sampled = sample_template(m.as_ref(), 2, &segs, 3, 20, 7).unwrap();
    assert_eq!(s.answer_start, sampled.answer_start);
    for (i, (r, q)) in s.seqs.iter().zip(&sampled.seqs).enumerate() {
        assert_eq!(r.len(), 20);
        assert_eq!(r[..12], q[..12], "the prompt (literal text and sampled fields) is the one sampled");
        assert_eq!(r[12..], answers[i % 2][..8], "row {i}: the answer is the first 8 tokens of its text");
    }
    let short = vec![vec![1u32; 3]];
    let e = sample_template_from(
        m.as_ref(),
        2,
        &segs,
        1,
        20,
        7,
        TemplateText { answers: Some(&short), ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("at least 8 tokens, found 3"), "{e}");
    assert!(sample_template_from(
        m.as_ref(),
        2,
        &segs,
        1,
        20,
        7,
        TemplateText { answers: Some(&[]), ..Default::default() }
    )
    .is_err());
}

#[test]
fn template_prompts_from_text_are_teacher_forced_and_answers_sampled_after_them() {
    let m = tiny(64, 1).model(None).unwrap();
    // start, "10 11", prompt field, "12", answer field: 20 tokens, 17 free, 8 + 9 per field.
    let segs = [Segment::Text(vec![10, 11]), Segment::Field, Segment::Text(vec![12]), Segment::Field];
    let prompts = vec![(30..40).collect::<Vec<u32>>(), (40..50).collect(), (50..60).collect()];
    let text = TemplateText { prompts: Some(&prompts), ..Default::default() };
    let s = sample_template_from(m.as_ref(), 2, &segs, 4, 20, 7, text).unwrap();
    let sampled = sample_template(m.as_ref(), 2, &segs, 4, 20, 7).unwrap();
    assert_eq!(s.answer_start, sampled.answer_start);
    assert_eq!(s.answer_start, 12);
    for (i, r) in s.seqs.iter().enumerate() {
        assert_eq!(r.len(), 20);
        assert_eq!(r[..3], [2, 10, 11]);
        assert_eq!(r[3..11], prompts[i % 3][..8], "row {i}: the prompt field is its text's first 8 tokens");
        assert_eq!(r[11], 12);
    }
    assert_eq!(s, sample_template_from(m.as_ref(), 2, &segs, 4, 20, 7, text).unwrap(), "deterministic");
    // The answers are sampled (the fixture's model is peaked: take a flat one to see seeds).
    let flat = flat_model();
    let a = sample_template_from(flat.as_ref(), 2, &segs, 4, 20, 7, text).unwrap();
    let b = sample_template_from(flat.as_ref(), 2, &segs, 4, 20, 8, text).unwrap();
    assert!(a.seqs.iter().zip(&b.seqs).all(|(a, b)| a[..12] == b[..12]), "the prompts are the text");
    assert!(a.seqs.iter().zip(&b.seqs).any(|(a, b)| a[12..] != b[12..]), "the answers are sampled");
    // Both given: nothing is sampled.
    let answers = vec![(1..20).collect::<Vec<u32>>()];
    let both = TemplateText { prompts: Some(&prompts), answers: Some(&answers), ..Default::default() };
    let b = sample_template_from(m.as_ref(), 2, &segs, 2, 20, 7, both).unwrap();
    assert_eq!(b.seqs[1][3..11], prompts[1][..8]);
    assert_eq!(b.seqs[1][12..], answers[0][..8]);
    let short = vec![vec![1u32; 3]];
    let e = sample_template_from(
        m.as_ref(),
        2,
        &segs,
        1,
        20,
        7,
        TemplateText { prompts: Some(&short), ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("teacher-forced prompt 0: expected at least 8 tokens, found 3"), "{e}");
    let none: Vec<Vec<u32>> = Vec::new();
    assert!(sample_template_from(
        m.as_ref(),
        2,
        &segs,
        1,
        20,
        7,
        TemplateText { prompts: Some(&none), ..Default::default() }
    )
    .is_err());
}

/// A model of random weights: flat enough that seeds and temperatures show in its samples
/// (the `tiny` fixture is peaked).
fn flat_model() -> Box<dyn CausalLm> {
    let cfg = config(64);
    let w = cfg.random_weights(1).unwrap();
    checkpoint(cfg, w).model(None).unwrap()
}

/// A sampled answer's temperature and nucleus apply to the answer only: the prompt is the one
/// sampled at temperature 1, and a near-zero temperature (or a tiny nucleus) gives the greedy
/// answer.
#[test]
fn answer_sampling_narrows_the_answer_and_keeps_the_prompt() {
    let flat = flat_model();
    let segs = [Segment::Text(vec![10, 11]), Segment::Field, Segment::Text(vec![12]), Segment::Field];
    let plain = sample_template(flat.as_ref(), 2, &segs, 4, 20, 7).unwrap();
    for narrow in [(1e-4, None), (1.0, Some(1e-6))] {
        let text = TemplateText { answer_sampling: Some(narrow), ..Default::default() };
        let s = sample_template_from(flat.as_ref(), 2, &segs, 4, 20, 7, text).unwrap();
        let prompts: Vec<Vec<u32>> = s.seqs.iter().map(|r| r[..12].to_vec()).collect();
        assert!(
            s.seqs.iter().zip(&plain.seqs).all(|(a, b)| a[..12] == b[..12]),
            "{narrow:?}: the prompts are unchanged"
        );
        let greedy = SamplingConfig { max_new_tokens: 8, temperature: 0.0, top_k: None, top_p: None, seed: 0 };
        let want = generate_batch(flat.as_ref(), &prompts, &greedy, None).unwrap();
        for (r, w) in s.seqs.iter().zip(&want) {
            assert_eq!(r[12..], w[..], "{narrow:?}: the answer is the greedy one");
        }
    }
    assert_ne!(
        plain.seqs,
        sample_template_from(
            flat.as_ref(),
            2,
            &segs,
            4,
            20,
            7,
            TemplateText { answer_sampling: Some((1e-4, None)), ..Default::default() }
        )
        .unwrap()
        .seqs,
        "a flat model's sampled answers are not its greedy ones"
    );
}

#[test]
fn answer_only_keeps_the_answer_positions_up_to_eos() {
    let m = tiny(64, 1).model(None).unwrap();
    // start 2, prompt 10 11, answer 20 21 then eos 3, then junk after eos.
    let mut seqs = vec![vec![2, 10, 11, 20, 21, 3, 40, 41], vec![2, 10, 11, 22, 23, 24, 25, 26]];
    let full = ensemble_targets(&[(m.as_ref(), 1.0)], &seqs, 1.0).unwrap();
    let mut targets = full.clone();
    answer_only(&mut seqs, &mut targets, 3, 3).unwrap();
    assert_eq!(seqs[0], [2, 10, 11, 20, 21], "cut at the answer's eos");
    assert_eq!(seqs[1].len(), 8, "no eos: the whole answer");
    let mass = |t: &Tensor| t.sum(1).unwrap().to_vec1::<f32>().unwrap();
    // Rows 2.. predict the answer's tokens (row 4 predicts the eos); rows 0-1 predict the prompt.
    let m0 = mass(&targets[0]);
    assert_eq!(m0.len(), 5);
    assert_eq!(&m0[..2], &[0.0, 0.0]);
    assert!(m0[2..].iter().all(|&x| (x - 1.0).abs() < 1e-4), "{m0:?}");
    let kept = targets[0].narrow(0, 2, 3).unwrap();
    let orig = full[0].narrow(0, 2, 3).unwrap();
    assert_eq!(kept.to_vec2::<f32>().unwrap(), orig.to_vec2::<f32>().unwrap(), "kept rows unchanged");
    // The KL to the teacher itself is 0; to another model it counts only answer positions.
    assert!(mean_kl(m.as_ref(), &seqs, &targets, 1.0).unwrap().abs() < 1e-5);
    let other = tiny(64, 9).model(None).unwrap();
    let per_answer = mean_kl(other.as_ref(), &seqs, &targets, 1.0).unwrap();
    assert!(per_answer > 0.0);
    // Zeroed rows add nothing: the mean over 3 + 6 answer rows equals the per-row sum / 9.
    let row_kl = |seq: &[u32], t: &Tensor, rows: std::ops::Range<usize>| -> f64 {
        let ids = Tensor::new(seq, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logq = offset::log_softmax(&other.forward(&ids, None).unwrap().squeeze(0).unwrap()).unwrap();
        let (p, lq) = (t.to_vec2::<f32>().unwrap(), logq.to_vec2::<f32>().unwrap());
        rows.map(|r| {
            p[r].iter()
                .zip(&lq[r])
                .map(|(&a, &b)| if a > 0.0 { a as f64 * (a.ln() - b) as f64 } else { 0.0 })
                .sum::<f64>()
        })
        .sum()
    };
    let want = (row_kl(&seqs[0], &targets[0], 2..5) + row_kl(&seqs[1], &targets[1], 2..8)) / 9.0;
    assert!((per_answer - want).abs() < 1e-4 * want.max(1.0), "{per_answer} vs {want}");
    // An answer start outside a sequence is refused by name.
    let mut s2 = vec![vec![2, 10]];
    let mut t2 = vec![full[0].narrow(0, 0, 2).unwrap()];
    assert!(answer_only(&mut s2, &mut t2, 2, 3).unwrap_err().to_string().contains("answer starts at token 2"));
}

/// Checks a per-position objective against a hand computation on a tiny fixture: `loss` of the
/// student summed over three sequences (the first two positions of sequence 0 zeroed, as
/// `answer_only` does, so they must not count) equals the sum over the counted positions of
/// `by_hand(log q, p)`, and the teacher's own loss against its targets is 0.
fn check_position_loss(
    what: &str,
    loss: impl Fn(&Data, &dyn CausalLm, &[usize]) -> f64,
    by_hand: impl Fn(&[f64], &[f32]) -> f64,
) {
    let student = tiny(16, 1);
    let teacher = perturbed(&student, 4, 0.3);
    let cfg = DistillConfig { n_prompts: 3, seq_len: 5, ..quick_cfg(4) };
    let seqs = seqs_of(&student, &cfg);
    let mut targets = targets_of(&teacher, &seqs, 1.0);
    let t0 = targets[0].to_vec2::<f32>().unwrap();
    let masked: Vec<f32> =
        t0.iter().enumerate().flat_map(|(i, r)| r.iter().map(move |&x| if i < 2 { 0.0 } else { x })).collect();
    targets[0] = Tensor::from_vec(masked, (5, 16), &Device::Cpu).unwrap();
    let data = Data::new(&seqs, &targets, 16, 1.0).unwrap();
    let m = student.model(None).unwrap();
    let all = [0usize, 1, 2];
    let got = loss(&data, m.as_ref(), &all);
    let mut want = 0.0;
    for &i in &all {
        let ids = Tensor::new(seqs[i].as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = m.forward(&ids, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let p = targets[i].to_vec2::<f32>().unwrap();
        for (lq, pr) in logits.iter().zip(&p) {
            if pr.iter().all(|&x| x == 0.0) {
                continue;
            }
            let lse = lq.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            let logq: Vec<f64> = lq.iter().map(|&x| x as f64 - lse).collect();
            want += by_hand(&logq, pr);
        }
    }
    assert!(want > 1e-3, "{what}: the teacher differs from the student: {want}");
    assert!((got - want).abs() < 1e-4 * want.max(1.0), "{what}: loss {got}, by hand {want}");
    let t = teacher.model(None).unwrap();
    let own = loss(&data, t.as_ref(), &all);
    assert!(own.abs() < 1e-4 * want + 1e-5, "{what}: the teacher's own loss {own}");
}

/// The log-ratio objective is a hand computation: the mean over the vocabulary of the squared
/// difference of centred log-probabilities, over the counted positions only.
#[test]
fn log_ratio_loss_equals_a_hand_computation() {
    check_position_loss(
        "log ratio",
        |d, m, idx| d.sum_log_ratio(m, idx).unwrap().to_scalar::<f32>().unwrap() as f64,
        |logq, p| {
            let logp: Vec<f64> = p.iter().map(|&x| (x.max(1e-30) as f64).ln()).collect();
            let (mq, mp) = (logq.iter().sum::<f64>() / 16.0, logp.iter().sum::<f64>() / 16.0);
            logq.iter().zip(&logp).map(|(a, b)| ((a - mq) - (b - mp)).powi(2)).sum::<f64>() / 16.0
        },
    );
}

#[test]
fn log_ratio_distillation_lowers_the_kl_to_the_offset_teacher() {
    let r = distil_toward_an_offset_teacher(&DistillConfig { objective: Objective::LogRatio, ..quick_cfg(8) });
    assert!(r.kl_before > 1e-2, "the offset changes the distribution: KL {}", r.kl_before);
    // It spends its steps on every token alike, the teacher's unlikely ones included, so the KL
    // (which weighs the likely ones) falls less than under the KL objective, but it falls.
    assert!(r.kl_after < 0.8 * r.kl_before, "KL {} -> {}", r.kl_before, r.kl_after);
    // serde: `objective` parses, and the default is not written (older configs stay identical).
    let parsed: DistillConfig = serde_json::from_str(r#"{"objective": "log_ratio"}"#).unwrap();
    assert_eq!(parsed.objective, Objective::LogRatio);
    assert!(!serde_json::to_string(&DistillConfig::default()).unwrap().contains("objective"));
    assert!(serde_json::from_str::<DistillConfig>(r#"{"objective": "mse"}"#).is_err());
}

/// The absolute log-ratio objective is a hand computation: `Σ_v p_v·(√(d² + ε²) − ε)` with
/// `d = ln q_v − ln p_v`, over the counted positions only.
#[test]
fn abs_log_ratio_loss_equals_a_hand_computation() {
    check_position_loss(
        "absolute log ratio",
        |d, m, idx| d.sum_abs_log_ratio(m, idx).unwrap().to_scalar::<f32>().unwrap() as f64,
        |logq, p| {
            logq.iter()
                .zip(p)
                .map(|(&lq, &pv)| {
                    let d = lq - (pv.max(1e-30) as f64).ln();
                    pv as f64 * ((d * d + ABS_EPS * ABS_EPS).sqrt() - ABS_EPS)
                })
                .sum::<f64>()
        },
    );
}

#[test]
fn abs_log_ratio_distillation_lowers_the_kl_to_the_offset_teacher() {
    let r = distil_toward_an_offset_teacher(&DistillConfig { objective: Objective::AbsLogRatio, ..quick_cfg(8) });
    assert!(r.kl_before > 1e-2, "the offset changes the distribution: KL {}", r.kl_before);
    assert!(r.kl_after < 0.8 * r.kl_before, "KL {} -> {}", r.kl_before, r.kl_after);
    let parsed: DistillConfig = serde_json::from_str(r#"{"objective": "abs_log_ratio"}"#).unwrap();
    assert_eq!(parsed.objective, Objective::AbsLogRatio);
}

/// `distill_groups` reports each group's KL as `mean_kl` computes it on the group alone, and
/// with `balance` weighs each group by the groups' mean KL over its own: a group whose teacher
/// is near the student gains weight and ends nearer its teacher than without balancing.
#[test]
fn balanced_groups_weigh_by_their_distance_and_report_their_kl() {
    let student = tiny(32, 1);
    let near = perturbed(&student, 4, 0.1);
    let far = perturbed(&student, 5, 0.15);
    let cfg = DistillConfig { n_prompts: 12, seq_len: 10, ..quick_cfg(4) };
    let seqs = seqs_of(&student, &cfg);
    let (a, b) = seqs.split_at(6);
    let targets: Vec<Tensor> = [targets_of(&near, a, 1.0), targets_of(&far, b, 1.0)].concat();
    let groups: Vec<Option<usize>> = (0..12).map(|i| Some(usize::from(i >= 6))).collect();
    let run = |balance| distill_groups(&student, &targets, &seqs, &groups, balance, &cfg, |_, _| {}).unwrap();
    let (plain_rep, plain) = run(false);
    let (bal_rep, bal) = run(true);
    let m = student.model(None).unwrap();
    for (g, range) in [(0usize, 0..6), (1, 6..12)] {
        let want = mean_kl(m.as_ref(), &seqs[range.clone()], &targets[range], 1.0).unwrap();
        assert!(
            (plain[g].kl_before - want).abs() < 1e-4 * want.max(1.0),
            "group {g}: {} vs {want}",
            plain[g].kl_before
        );
        assert_eq!(plain[g].weight, 1.0);
    }
    assert!(plain[1].kl_before > 4.0 * plain[0].kl_before, "far {} vs near {}", plain[1].kl_before, plain[0].kl_before);
    // Unclamped weights make every group's weighted KL the groups' mean.
    let mean = (bal[0].kl_before + bal[1].kl_before) / 2.0;
    for g in &bal {
        assert!((g.weight * g.kl_before - mean).abs() < 1e-6 * mean, "{g:?}, mean {mean}");
    }
    assert!(bal[0].weight > 1.0 && bal[1].weight < 1.0, "{bal:?}");
    assert!(
        bal[0].kl_after < plain[0].kl_after,
        "near group: balanced {} vs plain {}",
        bal[0].kl_after,
        plain[0].kl_after
    );
    assert_eq!(plain_rep.kl_before, bal_rep.kl_before);
    // One group per sequence, or none.
    let e = distill_groups(&student, &targets, &seqs, &groups[..5], false, &cfg, |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("5 groups for 12 sequences"), "{e}");
}
