//! Integration tests of the federated server through its `FedService` API (the in-memory
//! transport): authentication, FedAvg aggregation, validation, broken transfers, idempotency,
//! deadline and quorum, and resume (FedAvg and FedAdam). The model is a tiny random BLOOM written
//! to a temporary directory; updates are built by hand, no client trains.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use candle_core::{DType, Device, Tensor};
use hetfed_core::TensorMap;
use hetfed_fed::server::{Auth, RunSummary, Server, ServerOptions};
use hetfed_fed::strategy::FedOptParams;
use hetfed_fed::{FitConfig, Sampling, StrategyConfig};
use hetfed_model::{bloom, Checkpoint, ModelIdentity};
use hetfed_net::{body_from_bytes, ByteStream, Caller, ClientInfo, EvalReport, FedService, FitIns, Instruction, Secret, ServiceError, UploadHeader, UploadReply};
use hetfed_taskvec::{Delta, TaskVector};
use serde_json::Value;
use tempfile::TempDir;

const EMB: &str = "transformer.word_embeddings.weight";
const BIAS: &str = "transformer.h.0.mlp.dense_4h_to_h.bias";

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("test timed out after 60 s")
}

/// A tiny random BLOOM as an HF directory (config.json + model.safetensors, no tokenizer).
fn model_dir() -> TempDir {
    let cfg = bloom::Config {
        vocab_size: 32,
        hidden_size: 8,
        n_layer: 1,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.hf_config_json().to_string()).unwrap();
    hetfed_core::save_safetensors(&cfg.random_weights(7).unwrap(), DType::F32, &BTreeMap::new(), &dir.path().join("model.safetensors")).unwrap();
    dir
}

fn err<T>(r: Result<T, ServiceError>) -> ServiceError {
    r.err().expect("expected the call to be refused")
}

fn caller(id: &str) -> Caller {
    Caller { client_id: id.into(), token: Secret::new(format!("token-{id}")) }
}

fn auth(ids: &[&str]) -> Auth {
    let mut a = Auth::default();
    ids.iter().for_each(|id| a.add_token(id, &format!("token-{id}")));
    a
}

fn opts(run_dir: &Path, ids: &[&str], rounds: u64, quorum: usize) -> ServerOptions {
    ServerOptions {
        run_dir: run_dir.to_path_buf(),
        rounds,
        seed: 11,
        min_clients: ids.len(),
        quorum,
        round_timeout: Duration::from_secs(5),
        register_timeout: Duration::from_secs(5),
        max_update_norm: 10.0,
        max_update_bytes: 1 << 20,
        max_poll: Duration::from_millis(500),
        auth: auth(ids),
        resume: false,
        config_json: Value::Null,
        strategy_name: String::new(),
    }
}

fn server(model: &Path, mut o: ServerOptions, strategy: &StrategyConfig) -> hetfed_core::Result<Arc<Server>> {
    let s = strategy.build(Sampling::default(), FitConfig::default(), o.seed);
    o.strategy_name = s.name().into();
    Server::new(o, Checkpoint::load(model).unwrap(), s, None)
}

const FEDAVG: StrategyConfig = StrategyConfig::Fedavg { server_lr: 1.0 };

fn base_identity(model: &Path) -> ModelIdentity {
    Checkpoint::load(model).unwrap().identity().unwrap()
}

fn info(id: &str) -> ClientInfo {
    ClientInfo { client_id: id.into(), arch: "bloom".into(), ..Default::default() }
}

async fn register(s: &Arc<Server>, ids: &[&str]) {
    for id in ids {
        s.register(&caller(id), info(id)).await.unwrap();
    }
}

fn spawn_run(s: &Arc<Server>) -> tokio::task::JoinHandle<hetfed_core::Result<RunSummary>> {
    let s = s.clone();
    tokio::spawn(async move { s.run().await })
}

/// Deterministic values in `[-scale, scale]`.
fn wave(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| scale * (seed as f32 * 1.7 + i as f32 * 0.37).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A dense update of two parameters.
fn delta(seed: u64, scale: f32) -> TensorMap {
    TensorMap::from([(EMB.to_string(), wave(&[32, 8], seed, scale)), (BIAS.to_string(), wave(&[8], seed + 100, scale))])
}

fn tv(base: &ModelIdentity, d: TensorMap) -> TaskVector {
    TaskVector { base: base.clone(), kind: Delta::Full(d) }
}

fn bytes_of(t: &TaskVector) -> Vec<u8> {
    t.to_bytes(DType::F32).unwrap()
}

fn header(id: &str, round: u64, data: &[u8], n: u64) -> UploadHeader {
    UploadHeader {
        round,
        client_id: id.into(),
        n_examples: n,
        size_bytes: data.len() as u64,
        sha256: hetfed_core::sha256_hex(data),
        encoding: "f32".into(),
        metrics: BTreeMap::new(),
    }
}

fn body(data: &[u8]) -> ByteStream {
    body_from_bytes(Bytes::copy_from_slice(data), 64)
}

async fn send(s: &Arc<Server>, id: &str, round: u64, data: &[u8], n: u64) -> Result<UploadReply, ServiceError> {
    s.upload(&caller(id), header(id, round, data, n), body(data)).await
}

/// Long-polls until this client is told to fit in a round after `after`.
async fn next_fit(s: &Arc<Server>, id: &str, after: u64) -> FitIns {
    loop {
        match s.instructions(&caller(id), after, Duration::from_millis(500)).await.unwrap() {
            Instruction::Fit(ins) => return ins,
            Instruction::Wait => {}
            Instruction::Done => panic!("{id}: run over while waiting for a round after {after}"),
        }
    }
}

type Plan = Arc<dyn Fn(u64, &str, &ModelIdentity) -> Option<(TaskVector, u64)> + Send + Sync>;

/// A scripted client: every round it is told to fit in, it uploads what `plan` gives for
/// `(round, id, identity of the round's model)`, until the server says the run is over.
fn spawn_client(s: &Arc<Server>, id: &str, base: &ModelIdentity, plan: Plan) -> tokio::task::JoinHandle<Vec<(u64, UploadReply)>> {
    let (s, id, base) = (s.clone(), id.to_string(), base.clone());
    tokio::spawn(async move {
        let (mut after, mut out) = (0, Vec::new());
        loop {
            match s.instructions(&caller(&id), after, Duration::from_millis(500)).await.unwrap() {
                Instruction::Fit(ins) => {
                    let ident = ModelIdentity { weights_hash: ins.model_version.clone(), ..base.clone() };
                    if let Some((t, n)) = plan(ins.round, &id, &ident) {
                        out.push((ins.round, send(&s, &id, ins.round, &bytes_of(&t), n).await.unwrap()));
                    }
                    after = ins.round;
                }
                Instruction::Wait => {}
                Instruction::Done => return out,
            }
        }
    })
}

/// Registers the clients, runs the server with them to the end; every client's upload replies.
async fn run_with(s: &Arc<Server>, ids: &[&str], base: &ModelIdentity, plan: Plan) -> (RunSummary, Vec<Vec<(u64, UploadReply)>>) {
    register(s, ids).await;
    let clients: Vec<_> = ids.iter().map(|id| spawn_client(s, id, base, plan.clone())).collect();
    let summary = s.run().await.unwrap();
    let mut replies = Vec::new();
    for c in clients {
        replies.push(c.await.unwrap());
    }
    (summary, replies)
}

fn events(run_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn of<'a>(ev: &'a [Value], event: &str) -> Vec<&'a Value> {
    ev.iter().filter(|e| e["event"] == event).collect()
}

fn client_line<'a>(ev: &'a [Value], round: u64, id: &str) -> &'a Value {
    let lines: Vec<_> = ev.iter().filter(|e| e["event"] == "client_round" && e["round"] == round && e["client"] == id).collect();
    assert_eq!(lines.len(), 1, "expected one client_round line for {id} in round {round}, found {lines:?}");
    lines[0]
}

fn round_line(ev: &[Value], round: u64) -> &Value {
    let lines: Vec<_> = ev.iter().filter(|e| e["event"] == "round" && e["round"] == round).collect();
    assert_eq!(lines.len(), 1, "expected one round line for round {round}, found {lines:?}");
    lines[0]
}

/// `base + Σ c_i·d_i` (parameters the deltas lack pass through).
fn plus(base: &TensorMap, terms: &[(f64, &TensorMap)]) -> TensorMap {
    let mut out = base.clone();
    for (c, d) in terms {
        for (k, t) in *d {
            let next = (&out[k] + (t * *c).unwrap()).unwrap();
            out.insert(k.clone(), next);
        }
    }
    out
}

fn max_diff(a: &TensorMap, b: &TensorMap) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(k, t)| (t - &b[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap())
        .fold(0.0, f32::max)
}

fn base_weights(model: &Path) -> TensorMap {
    Checkpoint::load(model).unwrap().weights
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_registration() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let mut o = opts(run.path(), &["a", "b", "r"], 1, 1);
        o.auth.revoke("r");
        let s = server(m.path(), o, &FEDAVG).unwrap();
        let wrong = Caller { client_id: "a".into(), token: Secret::new("token-b") };
        let stranger = Caller { client_id: "zz".into(), token: Secret::new("token-zz") };
        let unauth = |e: ServiceError| assert!(matches!(e, ServiceError::Unauthenticated(_)), "{e:?}");
        unauth(err(s.register(&stranger, info("zz")).await));
        unauth(err(s.register(&wrong, info("a")).await));
        unauth(err(s.instructions(&stranger, 0, Duration::ZERO).await));
        unauth(err(s.instructions(&wrong, 0, Duration::ZERO).await));
        unauth(err(s.upload(&wrong, header("a", 1, b"x", 1), body(b"x")).await));
        // A revoked client is known but refused; with a wrong token it is not even recognised.
        let r = s.register(&caller("r"), info("r")).await;
        assert!(matches!(&r, Err(ServiceError::PermissionDenied(m)) if m.contains("revoked")), "{r:?}");
        let r = s.register(&Caller { client_id: "r".into(), token: Secret::new("nope") }, info("r")).await;
        assert!(matches!(r, Err(ServiceError::Unauthenticated(_))), "{r:?}");
        // Registering under another id, or with another architecture.
        let r = s.register(&caller("a"), info("b")).await;
        assert!(matches!(r, Err(ServiceError::PermissionDenied(_))), "{r:?}");
        let r = s.register(&caller("a"), ClientInfo { arch: "llama".into(), ..info("a") }).await;
        assert!(matches!(r, Err(ServiceError::FailedPrecondition(_))), "{r:?}");
        // None of the refused attempts registered anyone: every call of `a` is NotFound.
        let a = caller("a");
        let nf = |e: ServiceError| assert!(matches!(e, ServiceError::NotFound(_)), "{e:?}");
        nf(err(s.instructions(&a, 0, Duration::ZERO).await));
        nf(err(s.fetch_model(&a, "whatever").await));
        nf(err(s.upload(&a, header("a", 1, b"x", 1), body(b"x")).await));
        nf(err(s.report_eval(&a, EvalReport { client_id: "a".into(), ..Default::default() }).await));
        assert_eq!(s.progress().3, 0);
        // Registered, `a` may poll (nothing to do yet), fetch the current model, but not act for `b`.
        let reply = s.register(&a, info("a")).await.unwrap();
        assert_eq!(reply.run_id, s.run_id());
        assert_eq!(s.progress().3, 1);
        assert_eq!(s.instructions(&a, 0, Duration::from_millis(20)).await.unwrap(), Instruction::Wait);
        let version = base_identity(m.path()).weights_hash;
        let (h, stream) = s.fetch_model(&a, &version).await.unwrap();
        assert_eq!(hetfed_net::collect_body(stream).await.unwrap().len() as u64, h.size_bytes);
        let r = s.upload(&a, header("b", 1, b"x", 1), body(b"x")).await;
        assert!(matches!(r, Err(ServiceError::PermissionDenied(_))), "{r:?}");
        let r = s.report_eval(&a, EvalReport { client_id: "b".into(), ..Default::default() }).await;
        assert!(matches!(r, Err(ServiceError::PermissionDenied(_))), "{r:?}");
        // `b` is authenticated but still unregistered.
        nf(err(s.instructions(&caller("b"), 0, Duration::ZERO).await));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_round_weights_by_examples() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let s = server(m.path(), opts(run.path(), &["c1", "c2"], 1, 2), &FEDAVG).unwrap();
        let (d1, d2) = (delta(1, 0.01), delta(2, 0.02));
        register(&s, &["c1", "c2"]).await;
        let h = spawn_run(&s);
        let ins = next_fit(&s, "c1", 0).await;
        assert_eq!((ins.round, &ins.model_version), (1, &base_id.weights_hash));
        assert_eq!(next_fit(&s, "c2", 0).await.model_version, ins.model_version);
        let r1 = send(&s, "c1", 1, &bytes_of(&tv(&base_id, d1.clone())), 1).await.unwrap();
        let r2 = send(&s, "c2", 1, &bytes_of(&tv(&base_id, d2.clone())), 3).await.unwrap();
        assert!(r1.accepted && !r1.duplicate && r2.accepted && !r2.duplicate, "{r1:?} {r2:?}");
        let summary = h.await.unwrap().unwrap();
        let expected = plus(&base_weights(m.path()), &[(0.25, &d1), (0.75, &d2)]);
        let d = max_diff(&s.global(), &expected);
        assert!(d <= 1e-6, "global differs from base + (1·d1 + 3·d2)/4 by {d}");
        assert_eq!(summary.model_version, hetfed_core::tensor_map_hash(&s.global()).unwrap());
        assert_eq!(s.instructions(&caller("c1"), 1, Duration::ZERO).await.unwrap(), Instruction::Done);
        let ev = events(run.path());
        for (id, n, w) in [("c1", 1, 0.25), ("c2", 3, 0.75)] {
            let l = client_line(&ev, 1, id);
            assert_eq!((l["status"].as_str(), l["examples"].as_u64()), (Some("ok"), Some(n)), "{l}");
            assert!((l["weight"].as_f64().unwrap() - w).abs() < 1e-12, "{l}");
        }
        let r = round_line(&ev, 1);
        assert_eq!((r["ok"].as_u64(), r["aggregated"].as_bool()), (Some(2), Some(true)), "{r}");
        assert_eq!(r["model_version"].as_str(), Some(summary.model_version.as_str()));
        assert_eq!((of(&ev, "run_start").len(), of(&ev, "run_end").len()), (1, 1));
        assert_eq!(std::fs::read_to_string(run.path().join("checkpoints/LATEST")).unwrap().trim(), "round-1");
        let (saved, _) = hetfed_core::load_safetensors(&run.path().join("checkpoints/round-1/model.safetensors")).unwrap();
        assert_eq!(max_diff(&saved, &s.global()), 0.0);
        assert!(!run.path().join("spool/round-1").exists(), "the spool of a closed round is removed");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_updates_are_rejected_and_logged() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let ids = ["garbage", "good", "nan", "norm", "shape", "unknown", "wrongbase"];
        let s = server(m.path(), opts(run.path(), &ids, 1, 1), &FEDAVG).unwrap();
        register(&s, &ids).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "good", 0).await.round;
        let good = delta(5, 0.01);
        let mut nan = delta(6, 0.01);
        let mut v = vec![0.0f32; 8];
        v[3] = f32::NAN;
        nan.insert(BIAS.into(), Tensor::from_vec(v, 8, &Device::Cpu).unwrap());
        let mut unknown = delta(7, 0.01);
        unknown.insert("transformer.bogus.weight".into(), wave(&[2, 2], 1, 0.01));
        let mut shape = delta(8, 0.01);
        shape.insert(BIAS.into(), wave(&[9], 1, 0.01));
        let other = ModelIdentity { weights_hash: "0".repeat(64), ..base_id.clone() };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("wrongbase", bytes_of(&tv(&other, good.clone())), "round's model"),
            ("nan", bytes_of(&tv(&base_id, nan)), "NaN"),
            ("norm", bytes_of(&tv(&base_id, delta(9, 100.0))), "norm <= 10"),
            ("unknown", bytes_of(&tv(&base_id, unknown)), "`transformer.bogus.weight` is not a parameter"),
            ("shape", bytes_of(&tv(&base_id, shape)), "expected shape [8], found [9]"),
            ("garbage", b"definitely not safetensors".to_vec(), "expected a hetfed task vector"),
        ];
        let r = send(&s, "good", round, &bytes_of(&tv(&base_id, good.clone())), 1).await.unwrap();
        assert!(r.accepted && !r.duplicate, "{r:?}");
        for (id, data, why) in &cases {
            let r = send(&s, id, round, data, 1).await.unwrap();
            assert!(!r.accepted && !r.duplicate && r.reason.contains(why), "{id}: {r:?}");
            if *id == "nan" {
                // A rejected client cannot replace its update in the same round.
                let again = send(&s, id, round, &bytes_of(&tv(&base_id, delta(10, 0.01))), 1).await.unwrap();
                assert!(!again.accepted && again.duplicate && again.reason == r.reason, "{again:?}");
            }
        }
        h.await.unwrap().unwrap();
        // Only the good update, with all the weight, reached the model.
        assert_eq!(max_diff(&s.global(), &plus(&base_weights(m.path()), &[(1.0, &good)])), 0.0);
        let ev = events(run.path());
        assert_eq!(client_line(&ev, round, "good")["status"], "ok");
        for (id, _, why) in &cases {
            let l = client_line(&ev, round, id);
            assert_eq!(l["status"], "rejected", "{l}");
            assert!(l["reason"].as_str().unwrap().contains(why), "{l}");
        }
        let r = round_line(&ev, round);
        assert_eq!((r["ok"].as_u64(), r["rejected"].as_u64(), r["failed"].as_u64()), (Some(1), Some(6), Some(0)), "{r}");
        assert_eq!(r["aggregated"], true);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_transfers_leave_no_trace() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let s = server(m.path(), opts(run.path(), &["a"], 1, 1), &FEDAVG).unwrap();
        register(&s, &["a"]).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "a", 0).await.round;
        let d = delta(3, 0.01);
        let data = bytes_of(&tv(&base_id, d.clone()));
        let other = bytes_of(&tv(&base_id, delta(4, 0.01)));
        let n = data.len() as u64;
        let a = caller("a");
        let attempts: Vec<(&str, UploadHeader, ByteStream)> = vec![
            ("checksum", UploadHeader { sha256: hetfed_core::sha256_hex(&other), ..header("a", round, &data, 1) }, body(&data)),
            ("short", UploadHeader { size_bytes: n + 10, ..header("a", round, &data, 1) }, body(&data)),
            ("long", UploadHeader { size_bytes: n - 10, ..header("a", round, &data, 1) }, body(&data)),
            ("truncated", header("a", round, &data, 1), body(&data[..data.len() / 2])),
            ("too big", UploadHeader { size_bytes: (1 << 20) + 1, ..header("a", round, &data, 1) }, body(&data)),
            (
                "disconnect",
                header("a", round, &data, 1),
                Box::pin(futures::stream::iter(vec![Ok(Bytes::copy_from_slice(&data[..64])), Err(ServiceError::Unavailable("connection reset".into()))])) as ByteStream,
            ),
        ];
        for (what, hdr, b) in attempts {
            let r = s.upload(&a, hdr, b).await;
            let ok = match what {
                "checksum" => matches!(&r, Err(ServiceError::InvalidArgument(m)) if m.contains("checksum mismatch")),
                "short" | "truncated" => matches!(&r, Err(ServiceError::InvalidArgument(m)) if m.contains("received")),
                "long" => matches!(&r, Err(ServiceError::InvalidArgument(m)) if m.contains("received more")),
                "too big" => matches!(&r, Err(ServiceError::ResourceExhausted(_))),
                _ => matches!(&r, Err(ServiceError::Unavailable(_))),
            };
            assert!(ok, "{what}: {r:?}");
            // The client is still asked for its update, and the round is still open.
            assert_eq!(next_fit(&s, "a", 0).await.round, round, "after {what}");
        }
        let r = send(&s, "a", round, &data, 1).await.unwrap();
        assert!(r.accepted && !r.duplicate, "{r:?}");
        h.await.unwrap().unwrap();
        assert_eq!(max_diff(&s.global(), &plus(&base_weights(m.path()), &[(1.0, &d)])), 0.0);
        let ev = events(run.path());
        let l = client_line(&ev, round, "a");
        assert_eq!((l["status"].as_str(), l["bytes_up"].as_u64()), (Some("ok"), Some(n)), "{l}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_upload_is_aggregated_once() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let s = server(m.path(), opts(run.path(), &["a", "b"], 1, 2), &FEDAVG).unwrap();
        register(&s, &["a", "b"]).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "a", 0).await.round;
        let (da, db) = (delta(1, 0.01), delta(2, 0.01));
        let first = send(&s, "a", round, &bytes_of(&tv(&base_id, da.clone())), 2).await.unwrap();
        assert!(first.accepted && !first.duplicate, "{first:?}");
        // A retry (here even with other contents and counts) is acknowledged, not counted again.
        for (data, n) in [(bytes_of(&tv(&base_id, da.clone())), 2), (bytes_of(&tv(&base_id, delta(3, 0.05))), 7)] {
            let again = send(&s, "a", round, &data, n).await.unwrap();
            assert!(again.accepted && again.duplicate, "{again:?}");
        }
        // `a` is not asked again in this round.
        assert_eq!(s.instructions(&caller("a"), 0, Duration::from_millis(50)).await.unwrap(), Instruction::Wait);
        assert!(send(&s, "b", round, &bytes_of(&tv(&base_id, db.clone())), 1).await.unwrap().accepted);
        h.await.unwrap().unwrap();
        let expected = plus(&base_weights(m.path()), &[(2.0 / 3.0, &da), (1.0 / 3.0, &db)]);
        let d = max_diff(&s.global(), &expected);
        assert!(d <= 1e-6, "global differs from base + (2·da + db)/3 by {d}");
        let ev = events(run.path());
        assert_eq!(client_line(&ev, round, "a")["examples"], 2);
        assert_eq!(round_line(&ev, round)["ok"], 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_and_quorum() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let ids = ["a", "b", "c"];
        let mut o = opts(run.path(), &ids, 2, 2);
        o.round_timeout = Duration::from_secs(2);
        let s = server(m.path(), o, &FEDAVG).unwrap();
        register(&s, &ids).await;
        let h = spawn_run(&s);
        let t0 = tokio::time::Instant::now();
        let ins = next_fit(&s, "a", 0).await;
        assert_eq!(ins.round, 1);
        let data = bytes_of(&tv(&base_id, delta(1, 0.01)));
        assert!(send(&s, "a", 1, &data, 1).await.unwrap().accepted);
        // Round 2 opens once round 1 has closed at its deadline.
        let ins2 = next_fit(&s, "b", 1).await;
        assert_eq!(ins2.round, 2);
        assert!(t0.elapsed() >= Duration::from_secs(2), "round 1 closed after {:?}, before its deadline", t0.elapsed());
        assert_eq!(ins2.model_version, base_id.weights_hash, "1 update is below quorum 2: the model must not change");
        let r = send(&s, "b", 1, &data, 1).await;
        assert!(matches!(&r, Err(ServiceError::FailedPrecondition(m)) if m.contains("late")), "{r:?}");
        // Nobody uploads in round 2 either; the run still ends.
        let summary = h.await.unwrap().unwrap();
        assert_eq!(summary.rounds_completed, 2);
        assert_eq!(max_diff(&s.global(), &base_weights(m.path())), 0.0);
        let r = send(&s, "c", 2, &data, 1).await;
        assert!(matches!(&r, Err(ServiceError::FailedPrecondition(m)) if m.contains("late")), "{r:?}");
        let ev = events(run.path());
        assert_eq!(client_line(&ev, 1, "a")["status"], "ok");
        for (round, id) in [(1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")] {
            let l = client_line(&ev, round, id);
            assert_eq!(l["status"], "failed", "{l}");
            assert!(l["reason"].as_str().unwrap().contains("deadline"), "{l}");
        }
        for (round, ok) in [(1, 1), (2, 0)] {
            let r = round_line(&ev, round);
            assert_eq!((r["ok"].as_u64(), r["failed"].as_u64(), r["aggregated"].as_bool()), (Some(ok), Some(3 - ok), Some(false)), "{r}");
        }
    })
    .await
}

/// Deterministic uploads for the resume tests: depend on round and client only.
fn resume_plan() -> Plan {
    Arc::new(|round: u64, id: &str, ident: &ModelIdentity| {
        let k: u64 = if id == "a" { 1 } else { 2 };
        Some((tv(ident, delta(round * 10 + k, 0.01 * k as f32)), k))
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

async fn resume_matches_uninterrupted(strategy: StrategyConfig) {
    let m = model_dir();
    let base_id = base_identity(m.path());
    let ids = ["a", "b"];
    // Uninterrupted: two rounds.
    let full = tempfile::tempdir().unwrap();
    let s = server(m.path(), opts(full.path(), &ids, 2, 2), &strategy).unwrap();
    let (_, replies) = run_with(&s, &ids, &base_id, resume_plan()).await;
    assert!(replies.iter().all(|r| r.len() == 2 && r.iter().all(|(_, u)| u.accepted && !u.duplicate)), "{replies:?}");
    let want = s.global();
    assert!(max_diff(&want, &base_weights(m.path())) > 0.0);
    // Interrupted: one round, then a new server resumes the same directory for round 2.
    let dir = tempfile::tempdir().unwrap();
    let s1 = server(m.path(), opts(dir.path(), &ids, 1, 2), &strategy).unwrap();
    run_with(&s1, &ids, &base_id, resume_plan()).await;
    let run_id = s1.run_id().to_string();
    let after1 = s1.global();
    drop(s1);
    let e = server(m.path(), opts(dir.path(), &ids, 2, 2), &strategy).err().expect("a second run in the same directory must be refused");
    assert!(e.to_string().contains("--resume"), "{e}");
    // A copy whose checkpoint lost the strategy's state: resuming it must differ exactly when the
    // strategy has state (so the equality below really depends on that state being restored).
    let lost = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), lost.path());
    let st = lost.path().join("checkpoints/round-1/strategy.safetensors");
    let (state, _) = hetfed_core::load_safetensors(&st).unwrap();
    hetfed_core::save_safetensors(&TensorMap::new(), DType::F32, &BTreeMap::new(), &st).unwrap();
    let s3 = server(m.path(), ServerOptions { resume: true, ..opts(lost.path(), &ids, 2, 2) }, &strategy).unwrap();
    run_with(&s3, &ids, &base_id, resume_plan()).await;
    assert_eq!(max_diff(&s3.global(), &want) > 0.0, !state.is_empty(), "strategy state of {} tensors", state.len());
    let s2 = server(m.path(), ServerOptions { resume: true, ..opts(dir.path(), &ids, 2, 2) }, &strategy).unwrap();
    assert_eq!(s2.run_id(), run_id);
    assert_eq!(max_diff(&s2.global(), &after1), 0.0);
    let (summary, replies) = run_with(&s2, &ids, &base_id, resume_plan()).await;
    assert!(replies.iter().all(|r| r.len() == 1 && r[0].0 == 2 && r[0].1.accepted), "{replies:?}");
    let got = s2.global();
    assert_eq!(max_diff(&got, &want), 0.0, "resumed run differs from the uninterrupted one");
    assert_eq!(summary.model_version, hetfed_core::tensor_map_hash(&want).unwrap());
    // The resumed metrics read like one run: each round and client line once, one start, one end.
    let ev = events(dir.path());
    for round in [1, 2] {
        round_line(&ev, round);
        for id in ids {
            assert_eq!(client_line(&ev, round, id)["status"], "ok");
        }
    }
    assert_eq!((of(&ev, "round").len(), of(&ev, "client_round").len()), (2, 4));
    assert_eq!((of(&ev, "run_start").len(), of(&ev, "run_end").len(), of(&ev, "resume").len()), (1, 1, 1));
    let full_ev = events(full.path());
    assert_eq!(round_line(&ev, 2)["model_version"], round_line(&full_ev, 2)["model_version"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_fedavg_equals_uninterrupted() {
    within(resume_matches_uninterrupted(FEDAVG)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_fedadam_restores_optimizer_state() {
    within(resume_matches_uninterrupted(StrategyConfig::Fedadam(FedOptParams::default()))).await
}

/// An upload still streaming when its round closes must be refused as late (the client then
/// goes on to the next round), not fail with an internal error (which the client treats as fatal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn upload_in_flight_at_deadline_is_refused_as_late() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let mut o = opts(run.path(), &["a"], 1, 1);
        o.round_timeout = Duration::from_secs(1);
        let s = server(m.path(), o, &FEDAVG).unwrap();
        register(&s, &["a"]).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "a", 0).await.round;
        let data = bytes_of(&tv(&base_id, delta(1, 0.01)));
        let (head, tail) = (Bytes::copy_from_slice(&data[..64]), Bytes::copy_from_slice(&data[64..]));
        // The second chunk arrives after the deadline.
        let slow: ByteStream = Box::pin(futures::stream::iter([head, tail]).then(|c| async move {
            if c.len() != 64 {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Ok(c)
        }));
        let r = s.upload(&caller("a"), header("a", round, &data, 1), slow).await;
        h.await.unwrap().unwrap();
        assert!(matches!(&r, Err(ServiceError::FailedPrecondition(m)) if m.contains("late")), "{r:?}");
        let ev = events(run.path());
        let l = client_line(&ev, round, "a");
        assert!(l["status"] == "failed" && l["reason"].as_str().unwrap().contains("unfinished"), "{l}");
        assert_eq!(max_diff(&s.global(), &base_weights(m.path())), 0.0);
    })
    .await
}
