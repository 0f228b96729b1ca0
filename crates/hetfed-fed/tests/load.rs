//! Load tests of the federated server: one server on 127.0.0.1 behind gRPC + TLS (development
//! certificates and `hetfed_net::serve_with_listener`, as `hetfed server` runs it) and many light
//! clients in this process: real `GrpcClient`s, one TLS connection each, uploading precomputed
//! FedAvg updates (no training: what is measured is the runtime, not the model).
//!
//! - Every round completes; no update is lost or counted twice: per round, the server aggregates
//!   exactly the clients whose upload it accepted (`n_aggregated`, the FedAvg weights), and the
//!   final model equals the base plus the example-weighted mean of exactly those updates
//!   (200 clients, 3 rounds, 1 MiB updates; and in every other scenario).
//! - Memory: the server runs in a child process (this test binary started again on the ignored
//!   test `load_server_process`), so that its memory is its own and not the clients'. Once set up
//!   (model loaded, listener bound) it resets its peak RSS (`5` into `/proc/self/clear_refs`) and
//!   at the end of the run reports its growth: `VmHWM` − `VmRSS` at the reset (glibc set to
//!   return large freed blocks and to use two arenas, so that the peak follows live memory). The
//!   growth with 50, 100 and 200 clients (16 MiB updates, all sent at once) must not rise by more
//!   than one update's size per 50 clients, plus a fixed slack of [`SLACK`] for allocator noise.
//! - Disconnects: clients that drop their upload midway leave nothing in the spool, and the round
//!   closes with the others (quorum) at its deadline.
//!
//! `cargo test --release -p hetfed-fed --test load -- --nocapture` prints the figures recorded in
//! BENCHMARKS.md; `-- --ignored --nocapture load_large` runs the larger variant.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};
use hetfed_core::TensorMap;
use hetfed_fed::server::{Auth, Server, ServerOptions};
use hetfed_fed::{FitConfig, Sampling, StrategyConfig};
use hetfed_model::{bloom, Checkpoint, ModelIdentity};
use hetfed_net::{
    body_from_bytes, ByteStream, Caller, ClientInfo, ClientTls, FedService, GrpcClient, Instruction, Limits, Secret,
    ServerTls, UploadHeader, UploadReply,
};
use hetfed_taskvec::{Delta, TaskVector};
use serde_json::{json, Value};
use tempfile::TempDir;

const EMB: &str = "transformer.word_embeddings.weight";
const MIB: f64 = (1u64 << 20) as f64;
/// The environment variable that makes `load_server_process` the server of a scenario.
const CHILD_ENV: &str = "HETFED_LOAD_SERVER";
/// Fixed allowance on top of one update per 50 clients, for allocator noise.
const SLACK: f64 = 24.0 * MIB;
/// Hidden size of the model; its vocabulary sets the update's size (the embedding, f32).
const HIDDEN: usize = 128;

/// One load test at a time: they measure time and memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
struct Scenario {
    clients: usize,
    rounds: u64,
    quorum: usize,
    round_timeout: Duration,
    /// Clients that drop their upload midway in round 1 and are gone after.
    disconnect: usize,
    /// Vocabulary of the model: the update is `vocab × HIDDEN` f32 values.
    vocab: usize,
}

fn id(i: usize) -> String {
    format!("c{i:04}")
}

/// Client `i` uploads `scale(i) · D` with `examples(i)` examples: distinct weights and updates,
/// so that a lost or double-counted update changes the aggregate.
fn scale(i: usize) -> f32 {
    (1 + 4 * (i % 4)) as f32
}

fn examples(i: usize) -> u64 {
    1 + (i % 3) as u64
}

fn bloom_config(vocab: usize) -> bloom::Config {
    bloom::Config {
        vocab_size: vocab,
        hidden_size: HIDDEN,
        n_layer: 1,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        apply_residual_connection_post_layernorm: false,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

/// The update direction `D` (the embedding's shape, values in [-0.01, 0.01]).
fn direction(vocab: usize) -> Tensor {
    let v: Vec<f32> = (0..vocab * HIDDEN).map(|i| 0.01 * (i as f32 * 0.37 + 1.3).sin()).collect();
    Tensor::from_vec(v, (vocab, HIDDEN), &Device::Cpu).unwrap()
}

fn status_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The server process

/// The server of a scenario, in its own process; does nothing unless started by a load test.
#[test]
#[ignore = "the server process of the load tests: they start it themselves"]
fn load_server_process() {
    let Ok(cfg) = std::env::var(CHILD_ENV) else { return };
    let cfg: Value = serde_json::from_str(&cfg).unwrap();
    let path = |k: &str| PathBuf::from(cfg[k].as_str().unwrap());
    let n = cfg["clients"].as_u64().unwrap() as usize;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let mut auth = Auth::default();
        (0..n).for_each(|i| auth.add_token(&id(i), &format!("token-{}", id(i))));
        let o = ServerOptions {
            run_dir: path("run_dir"),
            rounds: cfg["rounds"].as_u64().unwrap(),
            seed: 5,
            min_clients: n,
            quorum: cfg["quorum"].as_u64().unwrap() as usize,
            round_timeout: Duration::from_secs_f64(cfg["round_timeout_s"].as_f64().unwrap()),
            register_timeout: Duration::from_secs(120),
            max_update_norm: 1e6,
            max_update_bytes: 1 << 30,
            max_poll: Duration::from_secs(10),
            auth,
            resume: false,
            config_json: Value::Null,
            strategy_name: "fedavg".into(),
        };
        let strategy = StrategyConfig::Fedavg { server_lr: 1.0 }.build(Sampling::default(), FitConfig::default(), o.seed);
        let server = Server::new(o, Checkpoint::load(&path("model")).unwrap(), strategy, None).unwrap();
        let certs = path("certs");
        let tls = ServerTls::from_files(&certs.join("server.pem"), &certs.join("server.key"), None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        // Set up: from here on the peak is the run's.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let rss_idle = status_kib("VmRSS:").unwrap_or(0) * 1024;
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let svc: Arc<dyn FedService> = server.clone();
        let grpc = tokio::spawn(hetfed_net::serve_with_listener(svc, listener, tls, Limits::default(), async move {
            let _ = rx.await;
        }));
        let tmp = path("endpoint_file").with_extension("tmp");
        std::fs::write(&tmp, &endpoint).unwrap();
        std::fs::rename(&tmp, path("endpoint_file")).unwrap();
        let t0 = Instant::now();
        let summary = server.run().await.unwrap();
        let wall_s = t0.elapsed().as_secs_f64();
        let t = Instant::now();
        // Clients still connected learn that the run is over (those gone never will).
        while !server.all_finished() && t.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), grpc).await;
        let hwm = status_kib("VmHWM:").unwrap_or(0) * 1024;
        let report = json!({
            "peak_reset": reset, "rss_idle": rss_idle, "hwm": hwm, "growth": hwm.saturating_sub(rss_idle),
            "rss_end": status_kib("VmRSS:").unwrap_or(0) * 1024, "wall_s": wall_s, "rounds_completed": summary.rounds_completed,
            "cpu_s": hetfed_fed::sys::cpu_seconds(),
        });
        std::fs::write(path("report_file"), report.to_string()).unwrap();
    });
}

/// Kills the server process if the test fails before it ends.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The clients

/// Update bytes per (model version, scale), built once and shared by the clients.
struct Updates {
    base: ModelIdentity,
    d: Tensor,
    cache: tokio::sync::Mutex<HashMap<(String, u32), (Bytes, String)>>,
}

impl Updates {
    async fn get(&self, version: &str, scale: f32) -> (Bytes, String) {
        let mut cache = self.cache.lock().await;
        let key = (version.to_owned(), scale as u32);
        if let Some(v) = cache.get(&key) {
            return v.clone();
        }
        let tv = TaskVector {
            base: ModelIdentity { weights_hash: version.to_owned(), ..self.base.clone() },
            kind: Delta::Full(TensorMap::from([(EMB.to_owned(), (&self.d * scale as f64).unwrap())])),
        };
        let bytes = Bytes::from(tv.to_bytes(DType::F32).unwrap());
        let sha = hetfed_core::sha256_hex(&bytes);
        cache.insert(key, (bytes.clone(), sha.clone()));
        (bytes, sha)
    }
}

#[derive(Default)]
struct ClientLog {
    /// (round, reply, upload seconds)
    uploads: Vec<(u64, UploadReply, f64)>,
    disconnected: bool,
}

/// One light client: register, long-poll, upload its precomputed update each round; a
/// disconnecting one sends `cut` chunks of its first update, then drops the call and the
/// connection.
async fn client(
    i: usize,
    endpoint: String,
    tls: ClientTls,
    updates: Arc<Updates>,
    cut: Option<usize>,
    gone: Arc<AtomicUsize>,
) -> ClientLog {
    let who = Caller { client_id: id(i), token: Secret::new(format!("token-{}", id(i))) };
    let c = GrpcClient::connect(&endpoint, tls, who.clone(), Limits::default(), Duration::from_secs(60)).await.unwrap();
    c.register(&who, ClientInfo { client_id: id(i), arch: "bloom".into(), ..Default::default() }).await.unwrap();
    let (mut after, mut log) = (0, ClientLog::default());
    loop {
        match c.instructions(&who, after, Duration::from_secs(10)).await.unwrap() {
            Instruction::Fit(ins) => {
                let (bytes, sha256) = updates.get(&ins.model_version, scale(i)).await;
                let header = UploadHeader {
                    round: ins.round,
                    client_id: id(i),
                    n_examples: examples(i),
                    size_bytes: bytes.len() as u64,
                    sha256,
                    metrics: Default::default(),
                };
                let chunk = Limits::default().chunk_bytes;
                if let Some(cut) = cut {
                    let part = bytes.slice(..(cut * chunk).min(bytes.len() - 1));
                    let stalled: ByteStream =
                        Box::pin(futures::StreamExt::chain(body_from_bytes(part, chunk), futures::stream::pending()));
                    // The body stalls; the call is dropped partway, then the connection.
                    let r = tokio::time::timeout(Duration::from_millis(500), c.upload(&who, header, stalled)).await;
                    assert!(r.is_err(), "a stalled upload cannot finish: {r:?}");
                    drop(c);
                    gone.fetch_add(1, Ordering::SeqCst);
                    log.disconnected = true;
                    return log;
                }
                let t = Instant::now();
                let reply = c.upload(&who, header, body_from_bytes(bytes, chunk)).await.unwrap();
                log.uploads.push((ins.round, reply, t.elapsed().as_secs_f64()));
                after = ins.round;
            }
            Instruction::Wait => {}
            Instruction::Done => return log,
        }
    }
}

/// What a scenario measured.
struct Measured {
    _dirs: Vec<TempDir>,
    run_dir: PathBuf,
    model: PathBuf,
    server: Value,
    events: Vec<Value>,
    logs: Vec<ClientLog>,
    wall_s: f64,
    /// CPU seconds of this process (the clients) over the scenario.
    clients_cpu_s: f64,
    /// With disconnects: whether round 1's spool existed (the round was open), and its files,
    /// shortly after the last disconnect.
    spool_snapshot: Option<(bool, Vec<PathBuf>)>,
}

impl Measured {
    fn round(&self, round: u64) -> &Value {
        let r: Vec<_> = self.events.iter().filter(|e| e["event"] == "round" && e["round"] == round).collect();
        assert_eq!(r.len(), 1, "round {round}: {r:?}");
        r[0]
    }

    /// Clients whose upload of `round` was accepted (not as a duplicate).
    fn accepted(&self, round: u64) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        for (i, log) in self.logs.iter().enumerate() {
            for (r, reply, _) in &log.uploads {
                assert!(reply.accepted && !reply.duplicate, "{} round {r}: {reply:?}", id(i));
                if *r == round {
                    assert!(out.insert(i), "{} uploaded twice in round {round}", id(i));
                }
            }
        }
        out
    }

    fn latencies(&self) -> Vec<f64> {
        let mut l: Vec<f64> = self.logs.iter().flat_map(|c| c.uploads.iter().map(|u| u.2)).collect();
        l.sort_by(f64::total_cmp);
        l
    }

    fn growth(&self) -> f64 {
        self.server["growth"].as_f64().unwrap()
    }

    /// Every round completed and aggregated exactly the accepted uploads, and the final model is
    /// the base plus their example-weighted means: nothing lost, nothing counted twice.
    fn check_aggregation(&self, sc: &Scenario) {
        assert_eq!(self.server["rounds_completed"].as_u64(), Some(sc.rounds), "{}", self.server);
        let mut total = 0.0f64;
        for round in 1..=sc.rounds {
            let accepted = self.accepted(round);
            let r = self.round(round);
            assert_eq!(r["ok"].as_u64(), Some(accepted.len() as u64), "round {round}: {r}");
            assert_eq!(r["n_aggregated"].as_u64(), Some(accepted.len() as u64), "round {round}: {r}");
            assert!(accepted.len() >= sc.quorum && r["aggregated"] == true, "round {round}: {r}");
            let weights: BTreeSet<String> = r["alphas"].as_object().unwrap().keys().cloned().collect();
            assert_eq!(weights, accepted.iter().map(|i| id(*i)).collect::<BTreeSet<_>>(), "round {round}");
            let n: f64 = accepted.iter().map(|i| examples(*i) as f64).sum();
            total += accepted.iter().map(|i| examples(*i) as f64 * scale(*i) as f64).sum::<f64>() / n;
        }
        let ck = self.run_dir.join(format!("checkpoints/round-{}/model.safetensors", sc.rounds));
        // A checkpoint holds what differs from the base: here the one tensor the updates touch.
        let (saved, _) = hetfed_core::load_safetensors(&ck).unwrap();
        assert_eq!(saved.keys().collect::<Vec<_>>(), vec![EMB], "only the updated tensor differs from the base");
        let base = Checkpoint::load(&self.model).unwrap().weights;
        let expected = (&base[EMB] + (direction(sc.vocab) * total).unwrap()).unwrap();
        let diff = hetfed_core::testing::max_abs_diff(&saved[EMB], &expected);
        // One client counted twice or lost moves the mean by ≥ 1/(3n) of a scale step of 4·0.01.
        assert!(diff < 2e-6, "final model differs from base + Σ mean updates by {diff} (Σ coefficients {total})");
    }
}

/// Starts the server process, runs the clients against it to the end of the run.
async fn run_scenario(sc: Scenario) -> Measured {
    let (model, certs, work) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = bloom_config(sc.vocab);
    std::fs::write(model.path().join("config.json"), cfg.hf_config_json().to_string()).unwrap();
    hetfed_core::save_safetensors(
        &cfg.random_weights(3).unwrap(),
        DType::F32,
        &BTreeMap::new(),
        &model.path().join("model.safetensors"),
    )
    .unwrap();
    let paths = hetfed_net::generate_dev_certs(certs.path(), &[]).unwrap();
    let run_dir = work.path().join("run");
    let (endpoint_file, report_file) = (work.path().join("endpoint"), work.path().join("report.json"));
    let child_cfg = json!({
        "model": model.path(), "certs": certs.path(), "run_dir": run_dir, "endpoint_file": endpoint_file, "report_file": report_file,
        "clients": sc.clients, "rounds": sc.rounds, "quorum": sc.quorum, "round_timeout_s": sc.round_timeout.as_secs_f64(),
    });
    let stderr = std::fs::File::create(work.path().join("server.log")).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["load_server_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, child_cfg.to_string())
        // glibc: large blocks (≥ 128 KiB) mmapped and returned when freed, two arenas: the
        // peak RSS then follows live memory, not the allocator's caching of freed blocks.
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut child = ServerProcess(child);
    let t = Instant::now();
    let endpoint = loop {
        if let Ok(e) = std::fs::read_to_string(&endpoint_file) {
            break e;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the server process ended early: {}",
            std::fs::read_to_string(work.path().join("server.log")).unwrap_or_default()
        );
        assert!(t.elapsed() < Duration::from_secs(60), "the server process did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let base = Checkpoint::load(model.path()).unwrap().identity().unwrap();
    let updates = Arc::new(Updates { base, d: direction(sc.vocab), cache: Default::default() });
    let tls = ClientTls::from_dev_certs(&paths, "127.0.0.1").unwrap();
    // Disconnecting clients: spread over the ids, each cut after 1 to 3 chunks.
    let cuts: HashMap<usize, usize> =
        (0..sc.disconnect).map(|k| ((k * 7919 + 3) % sc.clients, 1 + (k * 31 + 7) % 3)).collect();
    assert_eq!(cuts.len(), sc.disconnect);
    let (t0, cpu0) = (Instant::now(), hetfed_fed::sys::cpu_seconds());
    let gone = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..sc.clients)
        .map(|i| {
            tokio::spawn(client(i, endpoint.clone(), tls.clone(), updates.clone(), cuts.get(&i).copied(), gone.clone()))
        })
        .collect();
    // Once every disconnecting client is gone and the server has undone each of their uploads
    // (it audits an upload once undone), the spool of the still open round.
    let (spool, metrics) = (run_dir.join("spool/round-1"), run_dir.join("metrics.jsonl"));
    let snapshot = (sc.disconnect > 0).then(|| {
        tokio::spawn(async move {
            let undone = || {
                std::fs::read_to_string(&metrics)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(r#""event":"refused""#) && l.contains(r#""call":"upload""#))
                    .count()
            };
            while gone.load(Ordering::SeqCst) < sc.disconnect || undone() < sc.disconnect {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (spool.exists(), walk(&spool))
        })
    });
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(t.await.unwrap());
    }
    let spool_snapshot = match snapshot {
        Some(s) => Some(s.await.unwrap()),
        None => None,
    };
    let (wall_s, clients_cpu_s) = (t0.elapsed().as_secs_f64(), hetfed_fed::sys::cpu_seconds() - cpu0);
    let t = Instant::now();
    while child.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(60), "the server process did not end");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(work.path().join("server.log")).unwrap_or_default();
    assert!(child.0.wait().unwrap().success(), "the server process failed: {log}");
    let server: Value = serde_json::from_str(&std::fs::read_to_string(&report_file).unwrap()).unwrap();
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let events = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let model_path = model.path().to_path_buf();
    Measured {
        _dirs: vec![model, certs, work],
        run_dir,
        model: model_path,
        server,
        events,
        logs,
        wall_s,
        clients_cpu_s,
        spool_snapshot,
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One line of figures for BENCHMARKS.md.
fn figures(sc: &Scenario, m: &Measured, update_bytes: f64) -> String {
    let round_s: f64 = (1..=sc.rounds).map(|r| m.round(r)["wall_s"].as_f64().unwrap()).sum();
    let l = m.latencies();
    format!(
        "{} clients x {} rounds, update {:.1} MiB: {:.2} rounds/s ({:.1} s in rounds, {:.1} s in all; CPU s: server {:.1}, clients {:.1}), upload p50 {:.0} ms p99 {:.0} ms, server RSS idle {:.1} MiB, peak {:.1} MiB (growth {:.1} MiB)",
        sc.clients,
        sc.rounds,
        update_bytes / MIB,
        sc.rounds as f64 / round_s,
        round_s,
        m.wall_s,
        m.server["cpu_s"].as_f64().unwrap_or(0.0),
        m.clients_cpu_s,
        pct(&l, 0.5) * 1e3,
        pct(&l, 0.99) * 1e3,
        m.server["rss_idle"].as_f64().unwrap() / MIB,
        m.server["hwm"].as_f64().unwrap() / MIB,
        m.growth() / MIB,
    )
}

/// Runs `sizes` clients for `rounds` rounds each with updates of `vocab × HIDDEN` f32; checks
/// aggregation, and that the server's memory grows by at most one update per 50 clients plus
/// [`SLACK`] from the smallest size to each larger one.
async fn memory_is_bounded(sizes: &[usize], rounds: u64, vocab: usize) {
    let size = (vocab * HIDDEN * 4) as f64;
    let mut runs = Vec::new();
    for &clients in sizes {
        let sc = Scenario {
            clients,
            rounds,
            quorum: clients,
            round_timeout: Duration::from_secs(300),
            disconnect: 0,
            vocab,
        };
        let m = run_scenario(sc).await;
        m.check_aggregation(&sc);
        assert!(m.server["peak_reset"] == true, "the peak RSS could not be reset: {}", m.server);
        eprintln!("load: {}", figures(&sc, &m, size));
        runs.push((clients, m.growth()));
    }
    let (n0, g0) = runs[0];
    for &(n, g) in &runs[1..] {
        let allowed = (n - n0) as f64 / 50.0 * size + SLACK;
        eprintln!(
            "load: server memory growth {n0} -> {n} clients: {:.1} MiB ({:.0} KiB per client), allowed {:.1} MiB",
            (g - g0) / MIB,
            (g - g0) / (n - n0) as f64 / 1024.0,
            allowed / MIB
        );
        assert!(
            g - g0 <= allowed,
            "server memory grew by {:.1} MiB from {n0} to {n} clients; allowed {:.1} MiB (one {:.1} MiB update per 50 clients + {:.0} MiB slack)",
            (g - g0) / MIB,
            allowed / MIB,
            size / MIB,
            SLACK / MIB
        );
    }
}

/// 200 clients, 3 rounds, 1 MiB updates: every round completes, nothing lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_every_update_counted_once() {
    let _one = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(300), memory_is_bounded(&[200], 3, 2048))
        .await
        .expect("load test timed out");
}

/// 50, 100 and 200 clients, one round each, 16 MiB updates: the server's peak memory does not
/// grow with the updates the clients send at once (each waiting upload holds one transport window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_server_memory_is_bounded() {
    let _one = SERIAL.lock().await;
    tokio::time::timeout(Duration::from_secs(600), memory_is_bounded(&[50, 100, 200], 1, 32768))
        .await
        .expect("load test timed out");
}

/// 20 of 60 clients drop their upload midway in round 1: nothing of theirs stays in the spool
/// (checked while the round is still open), and the round closes at its deadline with the 40
/// others, which meet the quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_mid_upload_leave_no_trace() {
    let _one = SERIAL.lock().await;
    let sc = Scenario {
        clients: 60,
        rounds: 1,
        quorum: 40,
        round_timeout: Duration::from_secs(10),
        disconnect: 20,
        vocab: 8192,
    };
    let m = tokio::time::timeout(Duration::from_secs(300), run_scenario(sc)).await.expect("load test timed out");
    assert_eq!(m.logs.iter().filter(|l| l.disconnected).count(), 20);
    m.check_aggregation(&sc);
    let r = m.round(1);
    assert_eq!((r["ok"].as_u64(), r["failed"].as_u64(), r["rejected"].as_u64()), (Some(40), Some(20), Some(0)), "{r}");
    let gone: BTreeSet<String> =
        m.logs.iter().enumerate().filter(|(_, l)| l.disconnected).map(|(i, _)| id(i)).collect();
    for e in m.events.iter().filter(|e| e["event"] == "client_round" && e["status"] == "failed") {
        assert!(gone.contains(e["client"].as_str().unwrap()), "{e}");
    }
    // Each dropped upload was undone and audited when it happened.
    let audited: BTreeSet<String> = m
        .events
        .iter()
        .filter(|e| e["event"] == "refused" && e["call"] == "upload")
        .map(|e| e["client"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(audited, gone);
    // While the round was open, the spool held nothing of the clients gone (the others' updates,
    // complete or still arriving, only).
    let (open, files) = m.spool_snapshot.clone().unwrap();
    assert!(open, "round 1 closed before the disconnects were checked");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(!gone.contains(name.split('.').next().unwrap()), "left in the spool: {}", f.display());
    }
    assert!(!m.run_dir.join("spool").exists(), "the spool outlived the run: {:?}", walk(&m.run_dir.join("spool")));
    eprintln!("load: {}", figures(&sc, &m, (sc.vocab * HIDDEN * 4) as f64));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The larger variant, by hand: 500 clients, 5 rounds, 1 MiB updates (aggregation checked as
/// in CI; memory reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes; run by hand for BENCHMARKS.md"]
async fn load_large() {
    let _one = SERIAL.lock().await;
    memory_is_bounded(&[500], 5, 2048).await;
}
