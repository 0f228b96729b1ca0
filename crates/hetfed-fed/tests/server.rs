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
use candle_core::{DType, Device, Tensor};
use futures::StreamExt;
use hetfed_core::testing::max_map_diff as max_diff;
use hetfed_core::TensorMap;
use hetfed_fed::server::{Auth, RunSummary, Server, ServerOptions};
use hetfed_fed::strategy::FedOptParams;
use hetfed_fed::{FitConfig, Sampling, StrategyConfig};
use hetfed_model::{bloom, Checkpoint, ModelIdentity};
use hetfed_net::{
    body_from_bytes, ByteStream, Caller, ClientInfo, FedService, FitIns, Instruction, Secret, ServiceError,
    UploadHeader, UploadReply,
};
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
    hetfed_core::save_safetensors(
        &cfg.random_weights(7).unwrap(),
        DType::F32,
        &BTreeMap::new(),
        &dir.path().join("model.safetensors"),
    )
    .unwrap();
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
        metrics: Default::default(),
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
fn spawn_client(
    s: &Arc<Server>,
    id: &str,
    base: &ModelIdentity,
    plan: Plan,
) -> tokio::task::JoinHandle<Vec<(u64, UploadReply)>> {
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
async fn run_with(
    s: &Arc<Server>,
    ids: &[&str],
    base: &ModelIdentity,
    plan: Plan,
) -> (RunSummary, Vec<Vec<(u64, UploadReply)>>) {
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
    let lines: Vec<_> =
        ev.iter().filter(|e| e["event"] == "client_round" && e["round"] == round && e["client"] == id).collect();
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
        // The checkpoint holds what differs from the base (the updated tensors); laid over the
        // base, it is the global model.
        let (saved, _) =
            hetfed_core::load_safetensors(&run.path().join("checkpoints/round-1/model.safetensors")).unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), d1.keys().collect::<Vec<_>>());
        let mut restored = base_weights(m.path());
        restored.extend(saved);
        assert_eq!(max_diff(&restored, &s.global()), 0.0);
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
        assert_eq!(
            (r["ok"].as_u64(), r["rejected"].as_u64(), r["failed"].as_u64()),
            (Some(1), Some(6), Some(0)),
            "{r}"
        );
        assert_eq!(r["aggregated"], true);
        // Each rejection was also audited when it happened.
        for (id, _, why) in &cases {
            let a = refused(&ev, "upload", id);
            assert_eq!(a.len(), 1, "{id}: {a:?}");
            assert!(a[0]["reason"].as_str().unwrap().contains(why) && a[0]["upload_round"] == round, "{}", a[0]);
        }
    })
    .await
}

/// The audit records of refused calls by `call` claiming to be `id`.
fn refused<'a>(ev: &'a [Value], call: &str, id: &str) -> Vec<&'a Value> {
    ev.iter().filter(|e| e["event"] == "refused" && e["call"] == call && e["client"] == id).collect()
}

/// Only an accepted update uses up a client's turn: after a rejection, a corrected upload in the
/// same round is accepted (and aggregated once); after an acceptance, another upload is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_update_can_be_corrected_within_the_round() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let s = server(m.path(), opts(run.path(), &["a", "b"], 1, 2), &FEDAVG).unwrap();
        register(&s, &["a", "b"]).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "a", 0).await.round;
        let (da, db) = (delta(1, 0.01), delta(2, 0.01));
        let bad = send(&s, "a", round, &bytes_of(&tv(&base_id, delta(9, 100.0))), 5).await.unwrap();
        assert!(!bad.accepted && !bad.duplicate && bad.reason.contains("norm"), "{bad:?}");
        // A broken transfer in between changes nothing.
        let good = bytes_of(&tv(&base_id, da.clone()));
        let r = s.upload(&caller("a"), header("a", round, &good, 2), body(&good[..10])).await;
        assert!(matches!(r, Err(ServiceError::InvalidArgument(_))), "{r:?}");
        let fixed = send(&s, "a", round, &good, 2).await.unwrap();
        assert!(fixed.accepted && !fixed.duplicate, "{fixed:?}");
        let again = send(&s, "a", round, &bytes_of(&tv(&base_id, delta(3, 0.01))), 9).await.unwrap();
        assert!(again.accepted && again.duplicate, "{again:?}");
        assert!(send(&s, "b", round, &bytes_of(&tv(&base_id, db.clone())), 1).await.unwrap().accepted);
        h.await.unwrap().unwrap();
        let expected = plus(&base_weights(m.path()), &[(2.0 / 3.0, &da), (1.0 / 3.0, &db)]);
        let d = max_diff(&s.global(), &expected);
        assert!(d <= 1e-6, "global differs from base + (2·da + db)/3 by {d}");
        let ev = events(run.path());
        let l = client_line(&ev, round, "a");
        assert_eq!((l["status"].as_str(), l["examples"].as_u64()), (Some("ok"), Some(2)), "{l}");
        assert_eq!(
            (round_line(&ev, round)["ok"].as_u64(), round_line(&ev, round)["rejected"].as_u64()),
            (Some(2), Some(0))
        );
        // The rejection and the broken transfer are in the audit trail, the duplicate is not.
        let a = refused(&ev, "upload", "a");
        assert_eq!(a.len(), 2, "{a:?}");
        assert!(
            a[0]["reason"].as_str().unwrap().contains("norm") && a[1]["reason"].as_str().unwrap().contains("received"),
            "{a:?}"
        );
        assert!(!run.path().join("spool").exists(), "the spool is removed with the run");
    })
    .await
}

/// Refused registrations (wrong token, revoked, unknown id, another id) and calls with bad
/// credentials leave an audit record in metrics.jsonl: the id claimed and the reason, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_audited_without_the_token() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let mut o = opts(run.path(), &["a", "r"], 1, 1);
        o.auth.revoke("r");
        o.min_clients = 1;
        let s = server(m.path(), o, &FEDAVG).unwrap();
        let secret = "s3cret-token-never-logged";
        let wrong = Caller { client_id: "a".into(), token: Secret::new(secret) };
        assert!(s.register(&wrong, info("a")).await.is_err());
        let revoked = Caller { client_id: "r".into(), token: Secret::new("token-r") };
        assert!(s.register(&revoked, info("r")).await.is_err());
        // An id that carries the token, and a huge id: kept short, token masked.
        let sneaky = Caller { client_id: format!("x-{secret}"), token: Secret::new(secret) };
        assert!(s.register(&sneaky, info("x")).await.is_err());
        let huge = Caller { client_id: "z".repeat(100_000), token: Secret::new(secret) };
        assert!(s.register(&huge, info("z")).await.is_err());
        assert!(s.register(&caller("a"), info("b")).await.is_err());
        assert!(s.instructions(&wrong, 0, Duration::ZERO).await.is_err());
        assert!(s.upload(&wrong, header("a", 1, b"x", 1), body(b"x")).await.is_err());
        // An authenticated client that is not registered (yet) is not an audit matter.
        assert!(s.instructions(&caller("a"), 0, Duration::ZERO).await.is_err());
        let text = std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap();
        assert!(!text.contains(secret), "the token leaked into metrics.jsonl: {text}");
        assert!(text.len() < 10_000, "audit records are bounded: {} bytes", text.len());
        let ev = events(run.path());
        let reg = |id: &str| refused(&ev, "register", id);
        assert!(reg("a").iter().any(|e| e["reason"].as_str().unwrap().contains("wrong token")), "{ev:?}");
        assert!(reg("a").iter().any(|e| e["reason"].as_str().unwrap().contains("cannot register as")), "{ev:?}");
        assert!(reg("r")[0]["reason"].as_str().unwrap().contains("revoked"), "{ev:?}");
        assert_eq!(reg("x-***").len(), 1, "{ev:?}");
        for e in of(&ev, "refused") {
            // In simulation there is no peer address; over gRPC there is (see the deployment test).
            assert!(e["peer"].is_null() && e["time_unix_ms"].as_u64().unwrap() > 0 && e.get("round").is_none(), "{e}");
            assert!(e["client"].as_str().unwrap().chars().count() <= 257, "{e}");
        }
        assert_eq!(refused(&ev, "instructions", "a").len(), 1);
        assert_eq!(refused(&ev, "upload", "a").len(), 1);
        assert_eq!(of(&ev, "refused").len(), 7, "{ev:?}");
        // A flood of refusals is bounded: 120 records a minute, the rest counted at the end.
        for _ in 0..300 {
            assert!(s.register(&wrong, info("a")).await.is_err());
        }
        assert_eq!(of(&events(run.path()), "refused").len(), 120);
        register(&s, &["a"]).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "a", 0).await.round;
        assert!(
            send(&s, "a", round, &bytes_of(&tv(&base_identity(m.path()), delta(1, 0.01))), 1).await.unwrap().accepted
        );
        h.await.unwrap().unwrap();
        let ev = events(run.path());
        let sup = of(&ev, "refused_suppressed");
        assert!(sup.len() == 1 && sup[0]["count"] == 307 - 120, "{sup:?}");
        assert!(!std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap().contains(secret));
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
            (
                "checksum",
                UploadHeader { sha256: hetfed_core::sha256_hex(&other), ..header("a", round, &data, 1) },
                body(&data),
            ),
            ("short", UploadHeader { size_bytes: n + 10, ..header("a", round, &data, 1) }, body(&data)),
            ("long", UploadHeader { size_bytes: n - 10, ..header("a", round, &data, 1) }, body(&data)),
            ("truncated", header("a", round, &data, 1), body(&data[..data.len() / 2])),
            ("too big", UploadHeader { size_bytes: (1 << 20) + 1, ..header("a", round, &data, 1) }, body(&data)),
            (
                "disconnect",
                header("a", round, &data, 1),
                Box::pin(futures::stream::iter(vec![
                    Ok(Bytes::copy_from_slice(&data[..64])),
                    Err(ServiceError::Unavailable("connection reset".into())),
                ])) as ByteStream,
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
            assert_eq!(
                (r["ok"].as_u64(), r["failed"].as_u64(), r["aggregated"].as_bool()),
                (Some(ok), Some(3 - ok), Some(false)),
                "{r}"
            );
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
    let e = server(m.path(), opts(dir.path(), &ids, 2, 2), &strategy)
        .err()
        .expect("a second run in the same directory must be refused");
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

// ---------------------------------------------------------------------------------------------
// Deployment: the server behind gRPC + TLS on loopback, the client's connect and retry loops.

/// The server behind `serve_with_listener` on 127.0.0.1 with development certificates.
struct Deployed {
    _certs_dir: TempDir,
    certs: hetfed_net::CertPaths,
    endpoint: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    grpc: tokio::task::JoinHandle<Result<(), hetfed_net::NetError>>,
}

impl Deployed {
    async fn start(s: &Arc<Server>) -> Self {
        let certs_dir = tempfile::tempdir().unwrap();
        let certs = hetfed_net::generate_dev_certs(certs_dir.path(), &[]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let tls = hetfed_net::ServerTls::from_dev_certs(&certs, false).unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let svc: Arc<dyn FedService> = s.clone();
        let grpc = tokio::spawn(hetfed_net::serve_with_listener(
            svc,
            listener,
            tls,
            hetfed_net::Limits::default(),
            async move {
                let _ = rx.await;
            },
        ));
        Self { _certs_dir: certs_dir, certs, endpoint, stop: Some(stop), grpc }
    }

    fn tls(&self, domain: &str) -> hetfed_net::ClientTls {
        hetfed_net::ClientTls::from_dev_certs(&self.certs, domain).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        (&mut self.grpc).await.unwrap().unwrap();
    }
}

/// `hetfed client`'s connect loop: connect, and on failure `Retry::wait` (first delay 200 ms, as
/// the CLI), giving up after `give_up`. Returns the outcome and the number of attempts.
async fn connect_with_retry(
    endpoint: &str,
    tls: hetfed_net::ClientTls,
    who: Caller,
    give_up: Duration,
) -> (hetfed_core::Result<hetfed_net::GrpcClient>, u32) {
    let mut retry = hetfed_fed::client::Retry::new(Duration::from_millis(200), give_up);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match hetfed_net::GrpcClient::connect(
            endpoint,
            tls.clone(),
            who.clone(),
            hetfed_net::Limits::default(),
            Duration::from_secs(10),
        )
        .await
        {
            Ok(c) => return (Ok(c), attempts),
            Err(e) => {
                if let Err(e) = retry.wait(&e).await {
                    return (Err(e), attempts);
                }
            }
        }
    }
}

/// A client of the tiny model with no data: enough to register (it never trains here).
fn client_options(m: &Path, who: Caller) -> hetfed_fed::client::ClientOptions {
    hetfed_fed::client::ClientOptions {
        caller: who,
        base: Checkpoint::load(m).unwrap(),
        data: hetfed_fed::client::ClientData {
            task: hetfed_data::builtin("ethos").unwrap(),
            train: Vec::new(),
            val: Vec::new(),
            val_items: hetfed_data::Items::Choice(Vec::new()),
            stats: Default::default(),
        },
        eval_opts: Default::default(),
        poll_wait: Duration::from_millis(200),
        backoff: Duration::from_millis(200),
        give_up_after: Duration::from_secs(120),
        on_round: None,
        state_dir: None,
        memo: None,
    }
}

/// Permanent failures end the client at once with their cause (no 120 s of backoff): the http
/// scheme, a CA that did not sign the server's certificate, a TLS domain the certificate does not
/// name, a wrong token, a revoked client. A transient one (nothing listening) is retried until
/// the bound, then reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_end_the_client_at_once() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let mut o = opts(run.path(), &["a", "r"], 1, 1);
        o.auth.revoke("r");
        let s = server(m.path(), o, &FEDAVG).unwrap();
        let d = Deployed::start(&s).await;
        let fast = |what: &str, t: std::time::Instant, msg: &str, needle: &str| {
            assert!(t.elapsed() < Duration::from_secs(5), "{what}: {:?} before failing: {msg}", t.elapsed());
            assert!(msg.contains(needle), "{what}: expected {needle:?} in {msg:?}");
        };
        let other_dir = tempfile::tempdir().unwrap();
        let other = hetfed_net::generate_dev_certs(other_dir.path(), &[]).unwrap();
        let wrong_ca = hetfed_net::ClientTls::from_files(&other.ca_cert, "127.0.0.1", None).unwrap();
        let http = d.endpoint.replace("https://", "http://");
        let cases = [
            ("http scheme", http.as_str(), d.tls("127.0.0.1"), "https://"),
            ("wrong CA", d.endpoint.as_str(), wrong_ca, "not signed by a CA this client trusts"),
            ("wrong domain", d.endpoint.as_str(), d.tls("fed.example.org"), "does not name \"fed.example.org\""),
        ];
        for (what, endpoint, tls, needle) in cases {
            let t = std::time::Instant::now();
            let (r, attempts) = connect_with_retry(endpoint, tls, caller("a"), Duration::from_secs(120)).await;
            let msg = r.err().unwrap_or_else(|| panic!("{what}: connected")).to_string();
            fast(what, t, &msg, needle);
            assert!(msg.contains("not retried") && attempts == 1, "{what}: {attempts} attempts: {msg}");
        }
        // Connected, but refused at registration: the client ends at once.
        for (who, needle) in
            [(Caller { client_id: "a".into(), token: Secret::new("token-r") }, "wrong token"), (caller("r"), "revoked")]
        {
            let t = std::time::Instant::now();
            let (conn, _) =
                connect_with_retry(&d.endpoint, d.tls("127.0.0.1"), who.clone(), Duration::from_secs(120)).await;
            let svc: Arc<dyn FedService> = Arc::new(conn.unwrap());
            let r = hetfed_fed::client::run_client(svc, client_options(m.path(), who)).await;
            let msg = r.expect_err("a refused client must fail").to_string();
            fast(needle, t, &msg, needle);
            assert!(msg.contains("registration refused"), "{msg}");
        }
        // The refusals were audited with the peer's loopback address, and without the token.
        let ev = events(run.path());
        let a = refused(&ev, "register", "a");
        assert_eq!(a.len(), 1, "{ev:?}");
        assert!(a[0]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{}", a[0]);
        assert!(!std::fs::read_to_string(run.path().join("metrics.jsonl")).unwrap().contains("token-r"));
        assert_eq!(refused(&ev, "register", "r").len(), 1, "{ev:?}");
        d.stop().await;

        // Transient: nothing listens on the port any more. Retried with backoff, bounded.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("https://{}", listener.local_addr().unwrap());
        drop(listener);
        let t = std::time::Instant::now();
        let (r, attempts) = connect_with_retry(
            &closed,
            hetfed_net::ClientTls::from_dev_certs(&other, "127.0.0.1").unwrap(),
            caller("a"),
            Duration::from_millis(1500),
        )
        .await;
        let msg = r.expect_err("nothing listens").to_string();
        let took = t.elapsed();
        assert!(attempts >= 3 && msg.contains("unreachable") && msg.contains(&closed), "{attempts} attempts: {msg}");
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(10), "gave up after {took:?}");
    })
    .await
}

/// An upload whose call is dropped midway (the client disconnected; over gRPC the server drops
/// the call) is undone at once: no partial file stays in the spool, the client may upload again
/// in the same round, and the abandoned attempt is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_upload_is_undone() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let s = server(m.path(), opts(run.path(), &["a"], 1, 1), &FEDAVG).unwrap();
        register(&s, &["a"]).await;
        let h = spawn_run(&s);
        let round = next_fit(&s, "a", 0).await.round;
        let data = bytes_of(&tv(&base_id, delta(1, 0.01)));
        let head = Bytes::copy_from_slice(&data[..64]);
        let stalled: ByteStream = Box::pin(futures::stream::iter([Ok(head)]).chain(futures::stream::pending()));
        let (s2, hdr) = (s.clone(), header("a", round, &data, 1));
        let call = tokio::spawn(async move { s2.upload(&caller("a"), hdr, stalled).await });
        let part = run.path().join(format!("spool/round-{round}/a.part"));
        while !part.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        call.abort();
        assert!(call.await.unwrap_err().is_cancelled());
        assert!(!part.exists(), "the partial file outlived the call");
        let r = send(&s, "a", round, &data, 1).await.unwrap();
        assert!(r.accepted && !r.duplicate, "{r:?}");
        h.await.unwrap().unwrap();
        let ev = events(run.path());
        assert_eq!(client_line(&ev, round, "a")["status"], "ok");
        let a = refused(&ev, "upload", "a");
        assert!(a.len() == 1 && a[0]["reason"].as_str().unwrap().contains("abandoned"), "{a:?}");
    })
    .await
}

/// FedAvg that signals when its aggregation starts and waits there until the test lets it go.
struct Gated {
    inner: Box<dyn hetfed_fed::strategy::Strategy>,
    entered: std::sync::mpsc::Sender<()>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl hetfed_fed::strategy::Strategy for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }
    fn configure_fit(&mut self, round: u64, available: &[ClientInfo]) -> Vec<(String, FitConfig)> {
        self.inner.configure_fit(round, available)
    }
    fn aggregate_fit(
        &mut self,
        round: u64,
        global: &mut TensorMap,
        results: &mut dyn Iterator<Item = hetfed_core::Result<hetfed_fed::strategy::FitResult>>,
        failures: &[hetfed_fed::strategy::Failure],
    ) -> hetfed_core::Result<hetfed_fed::strategy::AggregateReport> {
        let _ = self.entered.send(());
        let _ = self.go.lock().unwrap().recv_timeout(Duration::from_secs(30));
        self.inner.aggregate_fit(round, global, results, failures)
    }
}

/// A client registers while the server is aggregating: its registration does not wait for the
/// aggregation (the strategy is busy; registration reads the client-bases table, not it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_does_not_wait_on_an_aggregation() {
    within(async {
        let (m, run) = (model_dir(), tempfile::tempdir().unwrap());
        let base_id = base_identity(m.path());
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let strategy = Gated {
            inner: FEDAVG.build(Sampling::default(), FitConfig::default(), 11),
            entered: entered_tx,
            go: go_rx.into(),
        };
        let mut o = opts(run.path(), &["c1", "c2", "late"], 1, 2);
        o.min_clients = 2;
        o.strategy_name = "gated".into();
        let s = Server::new(o, Checkpoint::load(m.path()).unwrap(), Box::new(strategy), None).unwrap();
        register(&s, &["c1", "c2"]).await;
        let h = spawn_run(&s);
        for (id, seed) in [("c1", 1), ("c2", 2)] {
            let ins = next_fit(&s, id, 0).await;
            send(&s, id, ins.round, &bytes_of(&tv(&base_id, delta(seed, 0.01))), 1).await.unwrap();
        }
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the round aggregates");
        // The aggregation holds the strategy until `go`; registering must not wait for it.
        let t = std::time::Instant::now();
        let reg = tokio::time::timeout(Duration::from_secs(5), s.register(&caller("late"), info("late"))).await;
        assert!(matches!(reg, Ok(Ok(_))), "registration during an aggregation: {reg:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        go.send(()).unwrap();
        h.await.unwrap().unwrap();
    })
    .await
}
