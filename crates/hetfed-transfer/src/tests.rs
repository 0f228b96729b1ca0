use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use hetfed_core::TensorMap;
use hetfed_model::bloom::Config;
use hetfed_model::{Arch, Checkpoint, LoraConfig, ModelSpec};
use hetfed_project::{concat_rows_interleaved, numerical_rank, random_orthogonal, split_rows_interleaved};
use hetfed_taskvec::TaskVector;

use crate::*;

fn cfg(h: usize, layers: usize, heads: usize) -> Config {
    Config {
        vocab_size: 50,
        hidden_size: h,
        n_layer: layers,
        n_head: heads,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

fn checkpoint(c: &Config, weights: TensorMap, name: &str) -> Checkpoint {
    let spec = ModelSpec {
        dir: PathBuf::from(name),
        arch: Arch::Bloom(c.clone()),
        tokenizer: None,
        config_json: c.hf_config_json(),
    };
    Checkpoint { spec, weights }
}

fn random_model(c: &Config, seed: u64) -> Checkpoint {
    // Larger than BLOOM's 0.02 init so that the random network is far from linear.
    let w = c.random_weights(seed).unwrap();
    let w = w
        .into_iter()
        .map(|(k, t)| {
            if t.rank() == 2 {
                let s = (t * 5.0).unwrap();
                (k, s)
            } else {
                (k, t)
            }
        })
        .collect();
    checkpoint(c, w, &format!("random-{seed}"))
}

fn seqs(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) % 50) as u32
                })
                .collect()
        })
        .collect()
}

fn mat(m: &hetfed_project::Map) -> Tensor {
    m.to_tensor(&Device::Cpu).unwrap()
}

use hetfed_core::testing::max_abs_diff;

/// A permutation matrix `[n, n]` from a seed.
fn permutation(n: usize, seed: u64) -> Tensor {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut x = seed + 1;
    for i in (1..n).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        idx.swap(i, (x >> 33) as usize % (i + 1));
    }
    let mut v = vec![0f32; n * n];
    for (r, &c) in idx.iter().enumerate() {
        v[r * n + c] = 1.0;
    }
    Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap()
}

/// Block-diagonal orthogonal matrix: one random `hd × hd` rotation per head.
fn per_head_rotation(heads: usize, hd: usize, seed: u64) -> Tensor {
    let n = heads * hd;
    let mut v = vec![0f32; n * n];
    for h in 0..heads {
        let r = random_orthogonal(hd, hd, seed + h as u64).unwrap();
        let m = r.matrix();
        for i in 0..hd {
            for j in 0..hd {
                v[(h * hd + i) * n + h * hd + j] = m[(i, j)];
            }
        }
    }
    Tensor::from_vec(v, (n, n), &Device::Cpu).unwrap()
}

/// A copy of `ck` whose residual stream is permuted, whose MLP hidden units are permuted, and
/// whose queries/keys and values are rotated within each head: it computes exactly the same
/// function in other coordinates (LayerNorm commutes with permutations; per-head rotations
/// shared by queries and keys leave attention scores unchanged).
fn rotated_copy(ck: &Checkpoint, c: &Config) -> (Checkpoint, Tensor, Tensor, Tensor, Tensor) {
    let (h, nh) = (c.hidden_size, c.n_head);
    let pr = permutation(h, 11);
    let ph = permutation(4 * h, 12);
    let rqk = per_head_rotation(nh, h / nh, 100);
    let rv = per_head_rotation(nh, h / nh, 200);
    let w = &ck.weights;
    let mut out = TensorMap::new();
    let vecmul = |m: &Tensor, v: &Tensor| m.matmul(&v.unsqueeze(1).unwrap()).unwrap().squeeze(1).unwrap();
    for (name, t) in w {
        let new = if name == "transformer.word_embeddings.weight" {
            t.matmul(&pr.t().unwrap()).unwrap()
        } else if name.contains("layernorm") || name.starts_with("transformer.ln_f") {
            vecmul(&pr, t)
        } else if name.ends_with("query_key_value.weight") {
            let p = split_rows_interleaved(t, nh, 3).unwrap();
            let q = rqk.matmul(&p[0]).unwrap().matmul(&pr.t().unwrap()).unwrap();
            let k = rqk.matmul(&p[1]).unwrap().matmul(&pr.t().unwrap()).unwrap();
            let v = rv.matmul(&p[2]).unwrap().matmul(&pr.t().unwrap()).unwrap();
            concat_rows_interleaved(&[q, k, v], nh).unwrap()
        } else if name.ends_with("query_key_value.bias") {
            let p = split_rows_interleaved(t, nh, 3).unwrap();
            concat_rows_interleaved(&[vecmul(&rqk, &p[0]), vecmul(&rqk, &p[1]), vecmul(&rv, &p[2])], nh).unwrap()
        } else if name.ends_with("self_attention.dense.weight") {
            pr.matmul(t).unwrap().matmul(&rv.t().unwrap()).unwrap()
        } else if name.ends_with("dense_h_to_4h.weight") {
            ph.matmul(t).unwrap().matmul(&pr.t().unwrap()).unwrap()
        } else if name.ends_with("dense_h_to_4h.bias") {
            vecmul(&ph, t)
        } else if name.ends_with("dense_4h_to_h.weight") {
            pr.matmul(t).unwrap().matmul(&ph.t().unwrap()).unwrap()
        } else if name.ends_with(".bias") {
            vecmul(&pr, t)
        } else {
            panic!("unexpected parameter {name}");
        };
        out.insert(name.clone(), new);
    }
    (checkpoint(c, out, "rotated"), pr, ph, rqk, rv)
}

fn logits(ck: &Checkpoint, weights: &TensorMap, ids: &[Vec<u32>]) -> Tensor {
    let m = ck.arch.build(weights, "test", None).unwrap();
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (ids.len(), ids[0].len()), &Device::Cpu).unwrap();
    m.forward(&t, None).unwrap()
}

fn lora_update(ck: &Checkpoint, rank: usize, seed: u64) -> TaskVector {
    let lc = LoraConfig { rank, alpha: 2.0 * rank as f64, dropout: 0.0, targets: ck.arch.default_lora_targets() };
    let set = hetfed_model::LoraSet::init(&lc, &ck.weights, seed).unwrap();
    // LoRA starts with B = 0; give B values so that the update is not zero.
    let mut factors = set.to_tensors();
    let mut k = 0u64;
    for (name, t) in factors.iter_mut() {
        if name.ends_with("lora_B") {
            k += 1;
            *t = (Tensor::randn(0f32, 0.05, t.dims(), &Device::Cpu).unwrap() + (k as f64) * 1e-3).unwrap();
        }
    }
    TaskVector::from_lora_factors(ck.identity().unwrap(), lc, factors).unwrap()
}

#[test]
fn maps_between_a_model_and_its_rotated_copy_recover_the_rotation_and_transport_updates_exactly() {
    let c = cfg(16, 2, 4);
    let small = random_model(&c, 1);
    let (large, pr, ph, rqk, rv) = rotated_copy(&small, &c);
    let calib = seqs(48, 24, 5);
    // The copy computes the same function.
    let probe = seqs(2, 12, 9);
    assert!(max_abs_diff(&logits(&small, &small.weights, &probe), &logits(&large, &large.weights, &probe)) < 1e-3);
    let maps =
        PairMaps::fit(&small, &large, &calib, "test", &MapConfig { method: Method::Procrustes, ..Default::default() })
            .unwrap();
    assert_eq!(maps.pairing, vec![0, 1]);
    for l in &maps.summary.layers {
        for (space, r2) in &l.explained_variance {
            assert!(*r2 > 0.999, "layer {} space {space}: R² {r2}", l.large_layer);
        }
    }
    // The fitted maps are the rotations where the activations span their space (the residual
    // stream, the GELU output). LayerNorm outputs, and so queries, keys, values and contexts,
    // span one dimension less (they are centred across coordinates), which leaves the map free
    // in that one direction: there it is checked on the data (R² above) and through the update.
    assert!(max_abs_diff(&mat(&maps.layer(1).unwrap()["mlp.dense_4h_to_h"].input), &ph) < 1e-3);
    assert!(max_abs_diff(&mat(&maps.layer(0).unwrap()["mlp.dense_4h_to_h"].out[0]), &pr) < 1e-3);
    assert!(max_abs_diff(&mat(&maps.embed), &pr) < 1e-3);
    let _ = (rqk, rv);
    // A LoRA update moved through the maps changes the copy exactly as it changes the original.
    // (The fused QKV's output spaces lack one direction, see the crate docs: it is left out.)
    let mut tv = lora_update(&small, 2, 3);
    if let hetfed_taskvec::Delta::Lora { factors, .. } = &mut tv.kind {
        factors.retain(|k, _| !k.contains("query_key_value"));
    }
    let (projected, report) = maps.project(&tv).unwrap();
    assert_eq!(projected.base, large.identity().unwrap());
    assert_eq!(report.modules.len(), 6);
    for m in &report.modules {
        assert!((m.norm_in - m.norm_out).abs() < 1e-4 * m.norm_in.max(1.0), "{m:?}");
    }
    let tuned_small = tv.apply_unchecked(&small.weights, 1.0).unwrap();
    let tuned_large = projected.apply_unchecked(&large.weights, 1.0).unwrap();
    let (a, b) = (logits(&small, &tuned_small, &probe), logits(&large, &tuned_large, &probe));
    let moved = max_abs_diff(&a, &logits(&small, &small.weights, &probe));
    assert!(moved > 1e-2, "the update should change the model (moved {moved})");
    assert!(max_abs_diff(&a, &b) < 2e-3, "{}", max_abs_diff(&a, &b));
    // ...and back: the reverse maps return the small update (personalisation direction).
    let (back, _) = maps.project_back(&projected).unwrap();
    assert_eq!(back.base, small.identity().unwrap());
    let tuned_back = back.apply_unchecked(&small.weights, 1.0).unwrap();
    assert!(max_abs_diff(&a, &logits(&small, &tuned_back, &probe)) < 2e-3);
    assert!(maps.project_back(&tv).is_err(), "a small model's update cannot go back");
    // A dense update too.
    let dense = TaskVector { base: tv.base.clone(), kind: hetfed_taskvec::Delta::Full(tv.materialize().unwrap()) };
    let (pd, _) = maps.project(&dense).unwrap();
    let tuned_large = pd.apply_unchecked(&large.weights, 1.0).unwrap();
    assert!(max_abs_diff(&a, &logits(&large, &tuned_large, &probe)) < 2e-3);
}

#[test]
fn projection_into_a_wider_deeper_model_keeps_lora_rank_and_refuses_other_bases() {
    let (cs, cl) = (cfg(16, 2, 4), cfg(32, 3, 8));
    let small = random_model(&cs, 1);
    let large = random_model(&cl, 2);
    let calib = seqs(40, 24, 5);
    for method in [Method::Ridge, Method::Procrustes, Method::WeightSpace, Method::Random, Method::Identity] {
        let maps = PairMaps::fit(&small, &large, &calib, "test", &MapConfig { method, ..Default::default() }).unwrap();
        assert_eq!(maps.pairing, vec![0, 1, 1]);
        let tv = lora_update(&small, 3, 4);
        let (p, report) = maps.project(&tv).unwrap();
        assert_eq!(report.modules.len(), 12, "{method:?}");
        let dense = p.materialize().unwrap();
        assert_eq!(dense.len(), 12);
        for (name, d) in &dense {
            assert_eq!(d.dims(), large.weights[name].dims(), "{name}");
            assert!(numerical_rank(d, 1e-5).unwrap() <= 3, "{method:?} {name}");
        }
        assert!(numerical_rank(&dense["transformer.h.2.mlp.dense_h_to_4h.weight"], 1e-5).unwrap() == 3, "{method:?}");
        // Semi-orthogonal maps (T^T·T = I) make the reverse projection an exact inverse, the
        // duplicated deep layers averaging back to the one small layer.
        if matches!(method, Method::Procrustes | Method::Random | Method::Identity) {
            let (back, _) = maps.project_back(&p).unwrap();
            let (orig, back) = (tv.materialize().unwrap(), back.materialize().unwrap());
            assert_eq!(orig.len(), back.len());
            for (k, t) in &orig {
                assert!(max_abs_diff(t, &back[k]) < 1e-4, "{method:?} {k}");
            }
        }
        // A different small model's update is refused with a clear error.
        let other = random_model(&cs, 9);
        let e = maps.project(&lora_update(&other, 3, 4)).unwrap_err().to_string();
        assert!(e.contains("expected an update of the small model these maps were fitted for"), "{e}");
    }
}

#[test]
fn fitted_maps_beat_the_random_control_on_held_out_tokens() {
    let (cs, cl) = (cfg(16, 2, 4), cfg(24, 2, 4));
    let small = random_model(&cs, 1);
    let large = random_model(&cl, 2);
    let calib = seqs(60, 24, 5);
    let r2 = |method| {
        PairMaps::fit(&small, &large, &calib, "test", &MapConfig { method, ..Default::default() })
            .unwrap()
            .summary
            .mean_explained_variance
    };
    let (ridge, procrustes, random) = (r2(Method::Ridge), r2(Method::Procrustes), r2(Method::Random));
    assert!(ridge > random && procrustes > random, "ridge {ridge}, procrustes {procrustes}, random {random}");
    assert!(random < 0.05, "{random}");
}

#[test]
fn maps_are_cached_by_both_identities_and_settings() {
    let (cs, cl) = (cfg(16, 2, 4), cfg(24, 3, 4));
    let small = random_model(&cs, 1);
    let large = random_model(&cl, 2);
    let dir = tempfile::tempdir().unwrap();
    let cfg = MapConfig::default();
    let mut calls = 0;
    let (m1, hit1) = PairMaps::load_or_fit(dir.path(), &small, &large, "c1", &cfg, || {
        calls += 1;
        Ok(seqs(30, 16, 1))
    })
    .unwrap();
    let (m2, hit2) =
        PairMaps::load_or_fit(dir.path(), &small, &large, "c1", &cfg, || panic!("must come from the cache")).unwrap();
    assert_eq!((hit1, hit2, calls), (false, true, 1));
    let tv = lora_update(&small, 2, 1);
    let (a, b) = (m1.project(&tv).unwrap().0.materialize().unwrap(), m2.project(&tv).unwrap().0.materialize().unwrap());
    for (k, t) in &a {
        assert_eq!(max_abs_diff(t, &b[k]), 0.0);
    }
    assert_eq!(m1.summary, m2.summary);
    // Another small model, or other settings, miss the cache.
    let other = random_model(&cs, 3);
    let (_, hit) = PairMaps::load_or_fit(dir.path(), &other, &large, "c1", &cfg, || Ok(seqs(30, 16, 1))).unwrap();
    assert!(!hit);
    let (_, hit) = PairMaps::load_or_fit(
        dir.path(),
        &small,
        &large,
        "c1",
        &MapConfig { method: Method::Ridge, ..cfg.clone() },
        || Ok(seqs(30, 16, 1)),
    )
    .unwrap();
    assert!(!hit);
    // The cache entry is a directory: the embedding map and metadata, one file per large layer.
    let entry =
        dir.path().join(PairMaps::cache_name(&small.identity().unwrap(), &large.identity().unwrap(), &cfg, "c1"));
    let mut files: Vec<String> =
        std::fs::read_dir(&entry).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["layer-0.safetensors", "layer-1.safetensors", "layer-2.safetensors", "pair.safetensors"]);
    // Each distinct map once: 8 spaces for the 10 (module, part) names of a layer.
    let (t, md) = hetfed_core::load_safetensors(&entry.join("layer-0.safetensors")).unwrap();
    assert_eq!(t.len(), 8, "{:?}", t.keys().collect::<Vec<_>>());
    assert!(md["hetfed.aliases"].contains("mlp.dense_h_to_4h.out0"), "{}", md["hetfed.aliases"]);
    // A layer read again shares the maps its modules share.
    let l0 = m2.layer(0).unwrap();
    assert!(Arc::ptr_eq(&l0["mlp.dense_h_to_4h"].out[0], &l0["mlp.dense_4h_to_h"].input));
    // Only the layer asked for last is held: reading layer 1 drops layer 0.
    let held = Arc::downgrade(&l0);
    drop(l0);
    assert!(held.upgrade().is_some(), "the last layer read stays resident");
    let _l1 = m2.layer(1).unwrap();
    assert!(held.upgrade().is_none(), "layer 0 is still held after reading layer 1");
    // A missing layer file, a damaged metadata file and an unfinished directory are errors naming
    // what is wrong, not panics.
    let copy = dir.path().join("copy");
    m2.save(&copy).unwrap();
    let m3 = PairMaps::load(&copy).unwrap();
    assert_eq!(
        max_abs_diff(
            &mat(&m3.layer(2).unwrap()["self_attention.dense"].out[0]),
            &mat(&m2.layer(2).unwrap()["self_attention.dense"].out[0])
        ),
        0.0
    );
    std::fs::remove_file(copy.join("layer-2.safetensors")).unwrap();
    let e = PairMaps::load(&copy).unwrap_err().to_string();
    assert!(e.contains("found none for layer 2"), "{e}");
    std::fs::write(copy.join("pair.safetensors"), b"not safetensors").unwrap();
    assert!(PairMaps::load(&copy).is_err());
    std::fs::remove_file(copy.join("pair.safetensors")).unwrap();
    let e = PairMaps::load(&copy).unwrap_err().to_string();
    assert!(e.contains("unfinished fit"), "{e}");
    // A damaged cache entry is fitted again, not an error.
    std::fs::write(entry.join("pair.safetensors"), b"not safetensors").unwrap();
    let (_, hit) = PairMaps::load_or_fit(dir.path(), &small, &large, "c1", &cfg, || Ok(seqs(30, 16, 1))).unwrap();
    assert!(!hit);
}

#[test]
fn bad_input_is_an_error() {
    let (cs, cl) = (cfg(16, 2, 4), cfg(24, 2, 4));
    let small = random_model(&cs, 1);
    let mut cl2 = cl.clone();
    cl2.vocab_size = 60;
    let large = random_model(&cl2, 2);
    let e = PairMaps::fit(&small, &large, &seqs(10, 8, 1), "t", &MapConfig::default()).unwrap_err().to_string();
    assert!(e.contains("equal vocabularies"), "{e}");
    let large = random_model(&cl, 2);
    let e = PairMaps::fit(&small, &large, &[vec![1, 2, 3], vec![1, 2]], "t", &MapConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("all of one non-zero length"), "{e}");
    let e = PairMaps::fit(&small, &large, &[vec![1, 2, 99]], "t", &MapConfig::default()).unwrap_err().to_string();
    assert!(e.contains("below 50"), "{e}");
    let e =
        PairMaps::fit(&small, &large, &seqs(10, 8, 1), "t", &MapConfig { pairing: vec![5, 0], ..Default::default() })
            .unwrap_err()
            .to_string();
    assert!(e.contains("maps.pairing"), "{e}");
}

/// Largest entry of `|a - b|` relative to the largest of `|b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12)
}

/// The streamed and the in-memory fit agree: every map on the centred small-side activations of
/// its space (where the data do not span a space, e.g. LayerNorm outputs and so the embedding
/// space too, Procrustes leaves the map free in the missing direction, so only its action on the
/// data is determined), every matrix where it is determined, and every explained variance.
fn assert_same_fit(streamed: &PairMaps, reference: &PairMaps, small: &Checkpoint, calib: &[Vec<u32>], tol: f32) {
    let what = format!("{:?}, pairing {:?}", reference.config.method, reference.pairing);
    assert_eq!(streamed.pairing, reference.pairing);
    assert_eq!(streamed.summary.tokens_fit, reference.summary.tokens_fit);
    assert_eq!(streamed.summary.tokens_held_out, reference.summary.tokens_held_out);
    let acts = capture(small, calib, 16).unwrap();
    let on_data = |a: &hetfed_project::Map, b: &hetfed_project::Map, x: &Tensor, name: &str| {
        let xc = x.broadcast_sub(&x.mean_keepdim(0).unwrap()).unwrap();
        let (pa, pb) = (a.apply(&xc).unwrap(), b.apply(&xc).unwrap());
        let d = rel_diff(&pa, &pb);
        assert!(d < tol, "{what} {name}: maps differ on the data by {d}");
    };
    let full_span = matches!(reference.config.method, Method::Ridge | Method::Random | Method::Identity);
    assert_eq!(streamed.n_layers(), reference.n_layers());
    for j in 0..reference.n_layers() {
        let (ls, lr) = (streamed.layer(j).unwrap(), reference.layer(j).unwrap());
        let i = reference.pairing[j];
        for m in MODULES {
            let (outs, input) = crate::maps::module_spaces(m);
            let (ms, mr) = (&ls[m], &lr[m]);
            for (p, space) in outs.iter().chain(std::iter::once(&input)).enumerate() {
                let (a, b) = if p < outs.len() { (&ms.out[p], &mr.out[p]) } else { (&ms.input, &mr.input) };
                let name = format!("L{j}.{m}.{}", space.name());
                on_data(a, b, &acts[i][space], &name);
                if full_span || matches!(space, Space::Resid | Space::MlpHidden) {
                    let d = rel_diff(&mat(a), &mat(b));
                    assert!(d < tol, "{what} {name}: matrices differ by {d}");
                }
            }
        }
        let (fs, fr) = (&streamed.summary.layers[j], &reference.summary.layers[j]);
        assert_eq!((fs.large_layer, fs.small_layer), (fr.large_layer, fr.small_layer));
        assert_eq!(fs.explained_variance.keys().collect::<Vec<_>>(), fr.explained_variance.keys().collect::<Vec<_>>());
        for (k, r) in &fr.explained_variance {
            let s = fs.explained_variance[k];
            assert!((s - r).abs() < tol as f64 * r.abs().max(1.0), "{what} L{j} {k}: R² {s} vs {r}");
        }
    }
    on_data(&streamed.embed, &reference.embed, &acts[0][&Space::ResidIn], "embed");
    // Block 0's input is the embedding LayerNorm's output: not spanned either.
    if full_span {
        let d = rel_diff(&mat(&streamed.embed), &mat(&reference.embed));
        assert!(d < tol, "{what} embed: matrices differ by {d}");
    }
    let (es, er) = (streamed.summary.embed_explained_variance, reference.summary.embed_explained_variance);
    assert!((es - er).abs() < tol as f64 * er.abs().max(1.0), "{what} embed R²: {es} vs {er}");
    let (ms, mr) = (streamed.summary.mean_explained_variance, reference.summary.mean_explained_variance);
    assert!((ms - mr).abs() < tol as f64 * mr.abs().max(1.0), "{what} mean R²: {ms} vs {mr}");
}

#[test]
fn the_streamed_fit_equals_the_in_memory_fit() {
    let (cs, cl) = (cfg(16, 2, 4), cfg(24, 3, 4));
    let small = random_model(&cs, 1);
    let large = random_model(&cl, 2);
    let calib = seqs(20, 12, 5);
    let tol = 1e-4;
    for method in [Method::Procrustes, Method::Ridge, Method::Random, Method::Identity, Method::WeightSpace] {
        let mc = MapConfig { method, seed: 3, ..Default::default() };
        let reference = PairMaps::fit_in_memory(&small, &large, &calib, "t", &mc).unwrap();
        assert_eq!(reference.pairing, vec![0, 1, 1]);
        // One batch (the default size), then batches of 3 sequences: the statistics are summed
        // over 6 fitted batches (the last of 1 sequence) and the R² read from 2 held-out ones.
        assert_same_fit(&PairMaps::fit(&small, &large, &calib, "t", &mc).unwrap(), &reference, &small, &calib, tol);
        let streamed = PairMaps::fit_batched(&small, &large, &calib, "t", &mc, 3, None).unwrap();
        assert_same_fit(&streamed, &reference, &small, &calib, tol);
        // Fitted into a directory, a layer file at a time, and read back from it.
        let dir = tempfile::tempdir().unwrap();
        let on_disk = PairMaps::fit_into(dir.path(), &small, &large, &calib, "t", &mc).unwrap();
        assert_same_fit(&on_disk, &reference, &small, &calib, tol);
        assert_same_fit(&PairMaps::load(dir.path()).unwrap(), &reference, &small, &calib, tol);
    }
    // No held-out tokens: R² on the fitted tokens, from the statistics alone.
    for method in [Method::Procrustes, Method::Ridge, Method::Random, Method::WeightSpace] {
        let mc = MapConfig { method, held_out: 0.0, ..Default::default() };
        let reference = PairMaps::fit_in_memory(&small, &large, &calib, "t", &mc).unwrap();
        assert_eq!(reference.summary.tokens_held_out, 0);
        let streamed = PairMaps::fit_batched(&small, &large, &calib, "t", &mc, 4, None).unwrap();
        assert_same_fit(&streamed, &reference, &small, &calib, tol);
    }
    // A pairing that goes back (the small stream starts again) and repeats.
    for method in [Method::Procrustes, Method::Ridge] {
        let mc = MapConfig { method, pairing: vec![1, 0, 1], ..Default::default() };
        let reference = PairMaps::fit_in_memory(&small, &large, &calib, "t", &mc).unwrap();
        let streamed = PairMaps::fit_batched(&small, &large, &calib, "t", &mc, 5, None).unwrap();
        assert_same_fit(&streamed, &reference, &small, &calib, tol);
    }
}
