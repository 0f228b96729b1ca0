//! The heterogeneous strategy: aggregation invariants (order, identical updates, zero weights),
//! and a heterogeneous server that hands clients their own base, projects their updates into
//! its larger model, and refuses clients whose base it has no maps for. Tiny random BLOOM
//! models; updates are built by hand.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{Device, Tensor};
use hetfed_core::testing::{max_abs_diff, max_map_diff as max_diff};
use hetfed_core::TensorMap;
use hetfed_fed::hetero::{Hetero, ServerText, SmallBase, TransferConfig};
use hetfed_fed::server::{Auth, Server, ServerOptions};
use hetfed_fed::strategy::FitResult;
use hetfed_fed::{FitConfig, Sampling, Strategy};
use hetfed_merge::AlphaConfig;
use hetfed_model::{bloom, Arch, Checkpoint, ModelSpec};
use hetfed_net::{
    body_from_bytes, Caller, ClientInfo, DataStats, FedService, Instruction, Secret, ServiceError, UploadHeader,
};
use hetfed_taskvec::{Delta, TaskVector};
use hetfed_transfer::{MapConfig, PairMaps};

fn cfg(h: usize, layers: usize, heads: usize) -> bloom::Config {
    bloom::Config {
        vocab_size: 32,
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

fn model(c: &bloom::Config, seed: u64) -> Checkpoint {
    let spec = ModelSpec {
        dir: PathBuf::from(format!("random-{seed}")),
        arch: Arch::Bloom(c.clone()),
        tokenizer: None,
        config_json: c.hf_config_json(),
    };
    Checkpoint { spec, weights: c.random_weights(seed).unwrap() }
}

fn calib() -> Vec<Vec<u32>> {
    (0..24u32).map(|i| (0..12u32).map(|j| (i * 7 + j * 13 + i * j) % 32).collect()).collect()
}

fn small_base(small: &Checkpoint, large: &Checkpoint) -> SmallBase {
    let maps = PairMaps::fit(small, large, &calib(), "test", &MapConfig::default()).unwrap();
    SmallBase::new(small.with_weights(small.weights.clone()), maps).unwrap()
}

fn strategy(small: &Checkpoint, large: &Checkpoint, t: TransferConfig) -> Hetero {
    Hetero::new(
        t,
        Sampling::default(),
        FitConfig::default(),
        0,
        large,
        vec![small_base(small, large)],
        None,
        ServerText::default(),
    )
    .unwrap()
}

fn transfer() -> TransferConfig {
    TransferConfig { client_models: vec![PathBuf::from("small")], ..Default::default() }
}

/// A dense update of the small model's MLP input projections.
fn update(small: &Checkpoint, seed: u64) -> TensorMap {
    let mut d = TensorMap::new();
    for (k, w) in &small.weights {
        if k.ends_with("dense_h_to_4h.weight") || k.ends_with("query_key_value.weight") {
            let t = Tensor::randn(0f32, 1.0, w.dims(), &Device::Cpu).unwrap();
            let t = (t * (0.01 * (1.0 + seed as f64))).unwrap();
            d.insert(k.clone(), t);
        }
    }
    d
}

fn result(id: &str, base: &hetfed_model::ModelIdentity, n: u64, gain: f64, delta: TensorMap) -> FitResult {
    let metrics = hetfed_net::FitMetrics { val_gain: Some(gain), ..Default::default() };
    FitResult::new(
        id,
        n,
        metrics,
        hetfed_taskvec::TaskVector { base: base.clone(), kind: hetfed_taskvec::Delta::Full(delta) },
    )
    .unwrap()
}

fn aggregate(s: &mut Hetero, global: &TensorMap, results: Vec<FitResult>) -> TensorMap {
    let mut g = global.clone();
    s.aggregate_fit(1, &mut g, &mut results.into_iter().map(Ok), &[]).unwrap();
    g
}

#[test]
fn aggregation_is_order_free_averages_identical_updates_and_ignores_zero_weights() {
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let h = small.identity().unwrap();
    let (u1, u2, u3) = (update(&small, 1), update(&small, 2), update(&small, 3));
    let t = transfer();
    // Order.
    let a = aggregate(
        &mut strategy(&small, &large, t.clone()),
        &large.weights,
        vec![
            result("a", &h, 10, 0.5, u1.clone()),
            result("b", &h, 30, 0.2, u2.clone()),
            result("c", &h, 20, 0.1, u3.clone()),
        ],
    );
    let b = aggregate(
        &mut strategy(&small, &large, t.clone()),
        &large.weights,
        vec![
            result("c", &h, 20, 0.1, u3.clone()),
            result("a", &h, 10, 0.5, u1.clone()),
            result("b", &h, 30, 0.2, u2.clone()),
        ],
    );
    assert!(max_diff(&a, &b) < 1e-6);
    assert!(max_diff(&a, &large.weights) > 1e-4, "the update must change the model");
    // Identical updates with identical signals = that one update.
    let one =
        aggregate(&mut strategy(&small, &large, t.clone()), &large.weights, vec![result("a", &h, 10, 0.5, u1.clone())]);
    let three = aggregate(
        &mut strategy(&small, &large, t.clone()),
        &large.weights,
        vec![
            result("a", &h, 10, 0.5, u1.clone()),
            result("b", &h, 10, 0.5, u1.clone()),
            result("c", &h, 10, 0.5, u1.clone()),
        ],
    );
    assert!(max_diff(&one, &three) < 1e-6);
    // A client whose alpha is zero (no examples) changes nothing.
    let with_zero = aggregate(
        &mut strategy(&small, &large, t.clone()),
        &large.weights,
        vec![result("a", &h, 10, 0.5, u1.clone()), result("z", &h, 0, 0.5, u3.clone())],
    );
    assert!(max_diff(&one, &with_zero) < 1e-6);
    // Uniform alphas: the plain mean of the projections.
    let uniform = TransferConfig { alpha: AlphaConfig::uniform(), ..t.clone() };
    let mean = aggregate(
        &mut strategy(&small, &large, uniform.clone()),
        &large.weights,
        vec![result("a", &h, 1, 0.9, u1.clone()), result("b", &h, 99, 0.1, u2.clone())],
    );
    let maps = small_base(&small, &large).maps;
    let proj = |u: &TensorMap| {
        maps.project(&TaskVector { base: small.identity().unwrap(), kind: Delta::Full(u.clone()) })
            .unwrap()
            .0
            .materialize()
            .unwrap()
    };
    let (p1, p2) = (proj(&u1), proj(&u2));
    let mut want = large.weights.clone();
    for (k, d) in &p1 {
        let step = ((d + &p2[k]).unwrap() * 0.5).unwrap();
        want.insert(k.clone(), (&want[k] + step).unwrap());
    }
    assert!(max_diff(&mean, &want) < 1e-5);
    // LARS caps every parameter's step at c·||W||.
    let capped = TransferConfig { lars: Some(1e-4), ..t };
    let g = aggregate(&mut strategy(&small, &large, capped), &large.weights, vec![result("a", &h, 10, 0.5, u1)]);
    for (k, w) in &large.weights {
        let step = hetfed_core::sq_norm(&(&g[k] - w).unwrap()).unwrap().sqrt();
        assert!(step <= 1e-4 * hetfed_core::sq_norm(w).unwrap().sqrt() * 1.001 + 1e-9, "{k}");
    }
}

#[test]
fn an_update_of_an_unknown_base_is_refused() {
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let other = model(&cfg(8, 1, 2), 5);
    let mut s = strategy(&small, &large, transfer());
    let mut g = large.weights.clone();
    let h = other.identity().unwrap();
    let e = s
        .aggregate_fit(1, &mut g, &mut vec![Ok(result("a", &h, 1, 0.1, update(&other, 1)))].into_iter(), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("for which the server has no maps"), "{e}");
}

fn info(id: &str, ck: &Checkpoint) -> ClientInfo {
    let i = ck.identity().unwrap();
    ClientInfo {
        client_id: id.into(),
        arch: i.arch,
        base_hash: i.weights_hash,
        stats: DataStats { n_examples: 10, ..Default::default() },
        tokenizer_hash: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heterogeneous_server_projects_client_updates_and_refuses_unknown_bases() {
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let other = model(&cfg(8, 1, 2), 5);
    let dir = tempfile::tempdir().unwrap();
    let mut auth = Auth::default();
    for id in ["c0", "c1"] {
        auth.add_token(id, &format!("token-{id}"));
    }
    let opts = ServerOptions {
        run_dir: dir.path().to_path_buf(),
        rounds: 1,
        seed: 0,
        min_clients: 1,
        quorum: 1,
        round_timeout: Duration::from_secs(20),
        register_timeout: Duration::from_secs(20),
        max_update_norm: 100.0,
        max_update_bytes: 1 << 24,
        max_poll: Duration::from_millis(500),
        auth,
        resume: false,
        config_json: serde_json::Value::Null,
        strategy_name: "hetero_projection".into(),
    };
    let strategy = Box::new(strategy(&small, &large, transfer()));
    let large_ck = large.with_weights(large.weights.clone());
    let server = Server::new(opts, large_ck, strategy, None).unwrap();
    let caller = |id: &str| Caller { client_id: id.into(), token: Secret::new(format!("token-{id}")) };
    // A client of another small model: refused with the reason.
    match server.register(&caller("c1"), info("c1", &other)).await {
        Err(ServiceError::FailedPrecondition(m)) => assert!(m.contains("projection maps"), "{m}"),
        r => panic!("expected a refusal, found {r:?}"),
    }
    server.register(&caller("c0"), info("c0", &small)).await.unwrap();
    let run = {
        let s = server.clone();
        tokio::spawn(async move { s.run().await })
    };
    let fit = loop {
        match tokio::time::timeout(
            Duration::from_secs(20),
            server.instructions(&caller("c0"), 0, Duration::from_secs(5)),
        )
        .await
        .unwrap()
        .unwrap()
        {
            Instruction::Fit(f) => break f,
            Instruction::Wait => continue,
            Instruction::Done => panic!("run ended early"),
        }
    };
    // The client trains from its own base.
    assert_eq!(fit.model_version, small.identity().unwrap().weights_hash);
    let tv = TaskVector { base: small.identity().unwrap(), kind: Delta::Full(update(&small, 1)) };
    let bytes = bytes::Bytes::from(tv.to_bytes(candle_core::DType::F32).unwrap());
    let header = UploadHeader {
        round: 1,
        client_id: "c0".into(),
        n_examples: 10,
        size_bytes: bytes.len() as u64,
        sha256: hetfed_core::sha256_hex(&bytes),
        metrics: Default::default(),
    };
    let reply = server.upload(&caller("c0"), header, body_from_bytes(bytes, 1 << 16)).await.unwrap();
    assert!(reply.accepted, "{}", reply.reason);
    tokio::time::timeout(Duration::from_secs(30), run).await.unwrap().unwrap().unwrap();
    let g = server.global();
    assert!(max_diff(&g, &large.weights) > 1e-5, "the large model must change");
    for (k, w) in &large.weights {
        assert_eq!(g[k].dims(), w.dims());
    }
}

#[test]
fn clients_of_two_widths_aggregate_into_one_server_model() {
    let (s8, s12, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(12, 2, 3), 3), model(&cfg(16, 2, 4), 2));
    let mut s = Hetero::new(
        transfer(),
        Sampling::default(),
        FitConfig::default(),
        0,
        &large,
        vec![small_base(&s8, &large), small_base(&s12, &large)],
        None,
        ServerText::default(),
    )
    .unwrap();
    let info = s.run_info();
    assert_eq!(info["maps"].as_array().unwrap().len(), 2);
    let (h8, h12) = (s8.identity().unwrap(), s12.identity().unwrap());
    let both = aggregate(
        &mut s,
        &large.weights,
        vec![result("a", &h8, 10, 0.5, update(&s8, 1)), result("b", &h12, 10, 0.5, update(&s12, 2))],
    );
    let only8 = aggregate(
        &mut strategy(&s8, &large, transfer()),
        &large.weights,
        vec![result("a", &h8, 10, 0.5, update(&s8, 1))],
    );
    assert!(max_diff(&both, &large.weights) > 1e-5);
    assert!(max_diff(&both, &only8) > 1e-6, "the second width's update must count");
}

#[test]
fn distillation_moves_the_server_model_toward_the_clients() {
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let h = small.identity().unwrap();
    let t = TransferConfig {
        aggregation: hetfed_fed::hetero::Aggregation::Distillation,
        distill: hetfed_distill::DistillConfig {
            steps: 4,
            n_prompts: 8,
            seq_len: 8,
            batch_size: 4,
            ..Default::default()
        },
        ..transfer()
    };
    let mut s = strategy(&small, &large, t);
    let mut g = large.weights.clone();
    let rep = s
        .aggregate_fit(1, &mut g, &mut vec![Ok(result("a", &h, 10, 0.5, update(&small, 1)))].into_iter(), &[])
        .unwrap();
    let d = &rep.details["distill"];
    assert!(d["kl_after"].as_f64().unwrap() < d["kl_before"].as_f64().unwrap(), "{d}");
    assert!(max_diff(&g, &large.weights) > 1e-6);
}

#[test]
fn anchored_rounds_replace_each_other_and_survive_a_checkpoint() {
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let h = small.identity().unwrap();
    let u = update(&small, 1);
    let anchored = TransferConfig { anchor: true, ..transfer() };
    // Accumulating: the same update twice moves the model twice as far; anchored: once.
    let mut acc = strategy(&small, &large, transfer());
    let mut anc = strategy(&small, &large, anchored.clone());
    let (mut ga, mut gb) = (large.weights.clone(), large.weights.clone());
    for round in 1..=2 {
        acc.aggregate_fit(round, &mut ga, &mut vec![Ok(result("a", &h, 10, 0.5, u.clone()))].into_iter(), &[]).unwrap();
        anc.aggregate_fit(round, &mut gb, &mut vec![Ok(result("a", &h, 10, 0.5, u.clone()))].into_iter(), &[]).unwrap();
    }
    let once =
        aggregate(&mut strategy(&small, &large, transfer()), &large.weights, vec![result("a", &h, 10, 0.5, u.clone())]);
    assert!(max_diff(&gb, &once) < 1e-6);
    assert!(max_diff(&ga, &once) > 1e-5);
    // The anchor is part of the strategy's state: a restored strategy continues identically.
    let (json, tensors) = anc.state();
    let mut restored = strategy(&small, &large, anchored);
    restored.load_state(json, tensors).unwrap();
    let (mut g1, mut g2) = (gb.clone(), gb.clone());
    let u2 = update(&small, 2);
    anc.aggregate_fit(3, &mut g1, &mut vec![Ok(result("a", &h, 10, 0.5, u2.clone()))].into_iter(), &[]).unwrap();
    restored.aggregate_fit(3, &mut g2, &mut vec![Ok(result("a", &h, 10, 0.5, u2))].into_iter(), &[]).unwrap();
    assert_eq!(max_diff(&g1, &g2), 0.0);
}

/// The embedded pair's tokenizer, and one that differs from it in one merge only.
fn tokenizers() -> (hetfed_model::tokenizers::Tokenizer, hetfed_model::tokenizers::Tokenizer) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/base-small/tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mine: hetfed_model::tokenizers::Tokenizer = text.parse().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["model"]["merges"].as_array_mut().unwrap().pop();
    let other: hetfed_model::tokenizers::Tokenizer = v.to_string().parse().unwrap();
    (mine, other)
}

fn with_tokenizer(ck: &Checkpoint, tok: &hetfed_model::tokenizers::Tokenizer) -> Checkpoint {
    let spec = ModelSpec { tokenizer: Some(tok.clone()), ..ck.spec.clone() };
    Checkpoint { spec, weights: ck.weights.clone() }
}

#[test]
fn logit_offsets_refuse_another_tokenizer() {
    let small = model(&cfg(8, 2, 2), 1);
    let large = model(&cfg(16, 3, 4), 2);
    let (tok, other) = tokenizers();
    let offsets = TransferConfig { aggregation: hetfed_fed::hetero::Aggregation::OffsetServing, ..transfer() };
    let base_with = |t: &hetfed_model::tokenizers::Tokenizer| {
        let maps = PairMaps::fit(&small, &large, &calib(), "test", &MapConfig::default()).unwrap();
        SmallBase::new(with_tokenizer(&small, t), maps).unwrap()
    };
    let large_tok = with_tokenizer(&large, &tok);
    let (h_tok, h_other) =
        (large_tok.tokenizer_hash().unwrap(), with_tokenizer(&small, &other).tokenizer_hash().unwrap());
    assert_ne!(h_tok, h_other, "one merge less is another tokenizer");
    // When the strategy is built: a client base with another tokenizer, both named.
    let e = Hetero::new(
        offsets.clone(),
        Sampling::default(),
        FitConfig::default(),
        0,
        &large_tok,
        vec![base_with(&other)],
        None,
        ServerText::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("one tokenizer") && e.contains(&h_tok[..12]) && e.contains(&h_other[..12]), "{e}");
    // Projection does not need one.
    Hetero::new(
        transfer(),
        Sampling::default(),
        FitConfig::default(),
        0,
        &large_tok,
        vec![base_with(&other)],
        None,
        ServerText::default(),
    )
    .unwrap();
    // At registration: a client naming another tokenizer (or none) is refused, both named.
    let s = Hetero::new(
        offsets,
        Sampling::default(),
        FitConfig::default(),
        0,
        &large_tok,
        vec![base_with(&tok)],
        None,
        ServerText::default(),
    )
    .unwrap();
    let good = ClientInfo { tokenizer_hash: h_tok.clone(), ..info("a", &small) };
    assert!(s.client_bases().lookup(&good).unwrap().is_some());
    let e = s.client_bases().lookup(&ClientInfo { tokenizer_hash: h_other.clone(), ..info("b", &small) }).unwrap_err();
    assert!(e.contains("expected tokenizer") && e.contains(&h_tok[..12]) && e.contains(&h_other[..12]), "{e}");
    let e = s.client_bases().lookup(&info("c", &small)).unwrap_err();
    assert!(e.contains("did not name its tokenizer"), "{e}");
}

#[test]
fn offset_serving_keeps_the_weights_and_serves_the_offset_model() {
    let small = model(&cfg(8, 2, 2), 1);
    let large = model(&cfg(16, 3, 4), 2);
    let t = TransferConfig { aggregation: hetfed_fed::hetero::Aggregation::OffsetServing, ..transfer() };
    let mut s = strategy(&small, &large, t);
    let h = small.identity().unwrap();
    assert!(s.serving_model(&large, &large.weights, Some("")).unwrap().is_none(), "nothing to serve before a round");
    let mut g = large.weights.clone();
    s.aggregate_fit(1, &mut g, &mut vec![Ok(result("a", &h, 5, 0.1, update(&small, 1)))].into_iter(), &[]).unwrap();
    assert_eq!(max_diff(&g, &large.weights), 0.0, "serving changes no weight");
    // The client has no task statistics here: its offset is the task "" one.
    let served = s.serving_model(&large, &g, Some("")).unwrap().expect("an offset model");
    let ids = Tensor::from_vec(vec![1u32, 5, 7], (1, 3), &Device::Cpu).unwrap();
    let plain = large.model(None).unwrap().forward(&ids, None).unwrap();
    let with = served.forward(&ids, None).unwrap();
    let d = hetfed_core::testing::max_abs_diff(&hetfed_distill::offset::log_softmax(&plain).unwrap(), &with);
    assert!(d > 1e-4, "the offset changes the distribution ({d})");
    // The served offsets survive a checkpoint.
    let (json, tensors) = s.state();
    let mut s2 = strategy(
        &small,
        &large,
        TransferConfig { aggregation: hetfed_fed::hetero::Aggregation::OffsetServing, ..transfer() },
    );
    s2.load_state(json, tensors).unwrap();
    let again = s2.serving_model(&large, &g, Some("")).unwrap().unwrap().forward(&ids, None).unwrap();
    // Routed by task, another task (or general text) is served by the large model alone.
    let other = s2.serving_model(&large, &g, None).unwrap().unwrap().forward(&ids, None).unwrap();
    let d0 = hetfed_core::testing::max_abs_diff(&hetfed_distill::offset::log_softmax(&plain).unwrap(), &other);
    assert!(d0 < 1e-5, "{d0}");
    let with = served.forward(&ids, None).unwrap();
    assert_eq!(hetfed_core::testing::max_abs_diff(&again, &with), 0.0);
}

/// LoRA factors of the small model's QKV and MLP input projections (rank 2), as a client uploads them.
fn lora_update(small: &Checkpoint, seed: u64) -> TaskVector {
    let config = hetfed_model::LoraConfig { rank: 2, alpha: 4.0, ..Default::default() };
    let mut factors = TensorMap::new();
    for (k, w) in &small.weights {
        if let Some(module) =
            k.strip_suffix(".weight").filter(|m| m.ends_with("dense_h_to_4h") || m.ends_with("query_key_value"))
        {
            let (out, inp) = (w.dims()[0], w.dims()[1]);
            let s = 0.05 * (1.0 + seed as f64);
            factors.insert(
                format!("{module}.lora_A"),
                (Tensor::randn(0f32, 1.0, (2, inp), &Device::Cpu).unwrap() * s).unwrap(),
            );
            factors.insert(
                format!("{module}.lora_B"),
                (Tensor::randn(0f32, 1.0, (out, 2), &Device::Cpu).unwrap() * s).unwrap(),
            );
        }
    }
    TaskVector { base: small.identity().unwrap(), kind: Delta::Lora { config, factors } }
}

#[test]
fn a_factored_update_aggregates_like_its_dense_product() {
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let tv = lora_update(&small, 1);
    let dense = TaskVector { base: tv.base.clone(), kind: Delta::Full(tv.materialize().unwrap()) };
    let fit = |u: TaskVector| {
        FitResult::new("a", 10, hetfed_net::FitMetrics { val_gain: Some(0.5), ..Default::default() }, u).unwrap()
    };
    // Projection: factor by factor (rank kept) against the dense module-by-module path.
    let f = aggregate(&mut strategy(&small, &large, transfer()), &large.weights, vec![fit(tv.clone())]);
    let d = aggregate(&mut strategy(&small, &large, transfer()), &large.weights, vec![fit(dense.clone())]);
    assert!(max_diff(&f, &large.weights) > 1e-5, "the factored update must move the model");
    assert!(max_diff(&f, &d) < 1e-5, "factored and dense projections differ by {}", max_diff(&f, &d));
    // The rebuilt client model (distillation's teacher) is the same from factors as from the product.
    let t = TransferConfig {
        aggregation: hetfed_fed::hetero::Aggregation::Distillation,
        distill: hetfed_distill::DistillConfig {
            steps: 2,
            n_prompts: 4,
            seq_len: 6,
            batch_size: 2,
            ..Default::default()
        },
        ..transfer()
    };
    let f = aggregate(&mut strategy(&small, &large, t.clone()), &large.weights, vec![fit(tv)]);
    let d = aggregate(&mut strategy(&small, &large, t), &large.weights, vec![fit(dense)]);
    assert!(
        max_diff(&f, &d) < 1e-5,
        "distillation from factors and from the dense update differ by {}",
        max_diff(&f, &d)
    );
}

/// The Fisher diagonal (through the fused head) is the mean over sequences of the squared
/// gradient of the per-token NLL, computed here through the full logits.
#[test]
fn fisher_diagonal_is_the_mean_squared_gradient_of_the_nll() {
    use candle_core::Var;
    use hetfed_model::{model::Unfused, ops, CausalLm};
    let large = model(&cfg(16, 2, 2), 3);
    let seqs: Vec<Vec<u32>> = calib().into_iter().take(5).collect();
    let fisher = hetfed_fed::hetero::fisher_diagonal(&large, &seqs).unwrap();
    assert!(!fisher.is_empty());
    let mut sums: TensorMap = TensorMap::new();
    for s in &seqs {
        let mut w = large.weights.clone();
        let vars: Vec<(String, Var)> =
            fisher.keys().map(|k| (k.clone(), Var::from_tensor(&large.weights[k]).unwrap())).collect();
        for (k, v) in &vars {
            w.insert(k.clone(), v.as_tensor().clone());
        }
        let m = large.arch.build(&w, "test", None).unwrap();
        let ids = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
        let logits = Unfused(m.as_ref()).forward(&ids, None).unwrap().narrow(1, 0, s.len() - 1).unwrap();
        let loss = (ops::token_logprobs(&logits, &s[1..]).unwrap().sum_all().unwrap().neg().unwrap()
            / (s.len() - 1) as f64)
            .unwrap();
        let grads = loss.backward().unwrap();
        for (k, v) in &vars {
            let sq = grads.get(v.as_tensor()).unwrap().sqr().unwrap();
            let next = match sums.remove(k) {
                Some(a) => (a + sq).unwrap(),
                None => sq,
            };
            sums.insert(k.clone(), next);
        }
    }
    let want: TensorMap = sums.into_iter().map(|(k, t)| (k, (t / seqs.len() as f64).unwrap())).collect();
    let scale = want.values().map(|t| hetfed_core::sq_norm(t).unwrap()).sum::<f64>().sqrt();
    assert!(scale > 0.0);
    let d = max_diff(&fisher, &want);
    assert!((d as f64) < 1e-5 * scale.max(1.0), "fisher differs by {d} (scale {scale})");
}

fn logits_of(large: &Checkpoint, weights: &TensorMap) -> Tensor {
    let m = large.arch.build(weights, "test", None).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 0, 1, 6]], &Device::Cpu).unwrap();
    m.forward(&ids, None).unwrap()
}

#[test]
fn a_factored_server_model_is_its_base_plus_the_mean_projection() {
    use hetfed_model::delta;
    let (small, large) = (model(&cfg(8, 1, 2), 1), model(&cfg(16, 2, 4), 2));
    let fit = |id: &str, gain: f64, u: TaskVector| {
        FitResult::new(id, 10, hetfed_net::FitMetrics { val_gain: Some(gain), ..Default::default() }, u).unwrap()
    };
    // (`lora_update` draws fresh factors on each call: draw them once.)
    let (u1, u2) = (lora_update(&small, 1), lora_update(&small, 2));
    let results = || vec![fit("b", 0.9, u1.clone()), fit("a", 0.2, u2.clone())];
    let factored = TransferConfig { factored: true, eta: 0.7, ..transfer() };
    let dense =
        aggregate(&mut strategy(&small, &large, TransferConfig { eta: 0.7, ..transfer() }), &large.weights, results());
    let mut s = strategy(&small, &large, factored.clone());
    let f = aggregate(&mut s, &large.weights, results());
    // The base is never rewritten: every base tensor is the base's own; the change is factors.
    for (k, w) in &large.weights {
        assert_eq!(f[k].id(), w.id(), "`{k}` was rewritten");
    }
    let ranks = delta::ranks(&f);
    assert!(!ranks.is_empty() && ranks.values().all(|&r| r == 4), "two clients of rank 2: {ranks:?}");
    // It computes what the dense mean projection computes.
    let (lf, ld, l0) = (logits_of(&large, &f), logits_of(&large, &dense), logits_of(&large, &large.weights));
    assert!(max_abs_diff(&lf, &ld) < 1e-4, "factored vs dense: {}", max_abs_diff(&lf, &ld));
    assert!(max_abs_diff(&lf, &l0) > 1e-4, "the update must change the model");
    assert!(max_diff(&delta::merge(&f).unwrap(), &dense) < 1e-5);
    // The order updates arrive in does not change the factors.
    let mut rev = results();
    rev.reverse();
    let g = aggregate(&mut strategy(&small, &large, factored.clone()), &large.weights, rev);
    assert_eq!(max_diff(&delta::factors(&f), &delta::factors(&g)), 0.0);
    // A second round appends its factors.
    let mut f2 = f.clone();
    s.aggregate_fit(2, &mut f2, &mut results().into_iter().map(Ok), &[]).unwrap();
    assert!(delta::ranks(&f2).values().all(|&r| r == 8));
    // A bounded rank: the second round's rank 8 is cut back to the best rank-4 approximation of
    // the accumulated change (exactly what a dense truncated SVD of `B·A` gives), and the round
    // reports the dropped norm.
    let bounded = TransferConfig { max_rank: 4, ..factored.clone() };
    let mut s4 = strategy(&small, &large, bounded);
    let mut f4 = aggregate(&mut s4, &large.weights, results());
    assert_eq!(max_diff(&delta::factors(&f4), &delta::factors(&f)), 0.0, "rank 4 fits the bound: unchanged");
    let report = s4.aggregate_fit(2, &mut f4, &mut results().into_iter().map(Ok), &[]).unwrap();
    let ranks4 = delta::ranks(&f4);
    assert!(ranks4.values().all(|&r| r == 4), "{ranks4:?}");
    for (module, _) in ranks4 {
        let (na, nb) = delta::names(&module);
        let (na8, nb8) = (f2[&na].clone(), f2[&nb].clone());
        let full = nb8.matmul(&na8).unwrap();
        let (tb, ta) = hetfed_project::truncated_svd(&full, 4).unwrap();
        let best = tb.matmul(&ta).unwrap();
        let got = f4[&nb].matmul(&f4[&na]).unwrap();
        let d = max_abs_diff(&got, &best);
        assert!(d < 1e-4, "{module}: the bounded change is not the best rank-4 one ({d})");
    }
    let dropped = report.details["factored"]["dropped_norm"].as_f64().unwrap();
    assert!(dropped > 0.0 && report.details["factored"]["recompressed"].as_u64().unwrap() > 0, "{}", report.details);
    let e = TransferConfig { max_rank: 4, factored: false, ..transfer() }.validate().unwrap_err();
    assert!(e.starts_with("transfer.max_rank:"), "{e}");
    // A dense update cannot be kept factored: refused, naming why.
    let e = strategy(&small, &large, factored)
        .aggregate_fit(
            1,
            &mut large.weights.clone(),
            &mut vec![Ok(result("a", &small.identity().unwrap(), 10, 0.5, update(&small, 1)))].into_iter(),
            &[],
        )
        .unwrap_err();
    assert!(e.to_string().contains("transfer.factored: expected LoRA factors"), "{e}");
}

#[test]
fn a_factored_server_refuses_what_it_cannot_keep_factored() {
    use hetfed_fed::hetero::{Aggregation, Combine, Continual};
    let base = TransferConfig { factored: true, ..transfer() };
    base.validate().unwrap();
    for (t, want) in [
        (
            TransferConfig { aggregation: Aggregation::OffsetDistillation, ..base.clone() },
            "aggregation = \"offset_distillation\"",
        ),
        (TransferConfig { combine: Combine::Ties, ..base.clone() }, "combine"),
        (TransferConfig { continual: Continual::Orthogonal, ..base.clone() }, "continual"),
        (TransferConfig { lars: Some(0.1), ..base.clone() }, "lars"),
        (TransferConfig { anchor: true, ..base.clone() }, "anchor"),
    ] {
        let e = t.validate().unwrap_err();
        assert!(e.starts_with("transfer.factored:") && e.contains(want), "{e}");
    }
}
