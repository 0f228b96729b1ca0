//! The gRPC + TLS transport end to end on loopback: a toy `FedService` behind `serve_with_listener`,
//! called through `GrpcClient`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hetfed_net::grpc::proto;
use hetfed_net::*;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const MIB: usize = 1 << 20;

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Fail the test instead of hanging.
async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut).await.expect("test timed out")
}

/// A server that checks tokens against a fixed map, stores uploads, serves one model, and holds
/// long polls for rounds after 1.
struct Toy {
    tokens: HashMap<String, String>,
    model: Bytes,
    /// (header, body, number of chunks the body arrived in)
    uploads: Mutex<Vec<(UploadHeader, Vec<u8>, usize)>>,
}

impl Toy {
    fn new(model: Bytes) -> Self {
        let tokens = [("alice", "alice-token"), ("bob", "bob-token")].map(|(a, b)| (a.to_owned(), b.to_owned()));
        Self { tokens: tokens.into(), model, uploads: Mutex::default() }
    }

    fn auth(&self, caller: &Caller) -> Result<(), ServiceError> {
        match self.tokens.get(&caller.client_id) {
            Some(t) if t == caller.token.expose() => Ok(()),
            _ => Err(ServiceError::Unauthenticated(format!("bad token for {:?}", caller.client_id))),
        }
    }
}

/// The error `instructions` returns for a poll after round `100 + k` (k in 1..=8), to test every
/// variant.
fn error_for_round(round: u64) -> Option<ServiceError> {
    let m = format!("round {round} refused: ünïcode, \"quotes\", 100% sure");
    Some(match round {
        1 => ServiceError::Unauthenticated(m),
        2 => ServiceError::PermissionDenied(m),
        3 => ServiceError::InvalidArgument(m),
        4 => ServiceError::FailedPrecondition(m),
        5 => ServiceError::ResourceExhausted(m),
        6 => ServiceError::NotFound(m),
        7 => ServiceError::Unavailable(m),
        8 => ServiceError::Internal(m),
        _ => return None,
    })
}

#[async_trait::async_trait]
impl FedService for Toy {
    async fn register(&self, caller: &Caller, info: ClientInfo) -> Result<RegisterReply, ServiceError> {
        self.auth(caller)?;
        Ok(RegisterReply {
            run_id: "run-1".into(),
            message: format!("hello {} ({} tasks)", info.client_id, info.stats.tasks.len()),
        })
    }

    async fn instructions(
        &self,
        caller: &Caller,
        after_round: u64,
        wait: Duration,
    ) -> Result<Instruction, ServiceError> {
        self.auth(caller)?;
        if let Some(e) = after_round.checked_sub(100).and_then(error_for_round) {
            return Err(e);
        }
        Ok(match after_round {
            0 => Instruction::Fit(FitIns {
                round: 1,
                model_version: sha256_hex(&self.model),
                config: serde_json::json!({"epochs": 2, "lr": 1e-4, "encoding": "f16"}),
                deadline_unix_ms: 1_700_000_000_000,
            }),
            1000 => Instruction::Done,
            _ => {
                tokio::time::sleep(wait).await;
                Instruction::Wait
            }
        })
    }

    async fn fetch_model(&self, caller: &Caller, version: &str) -> Result<(ModelHeader, ByteStream), ServiceError> {
        self.auth(caller)?;
        let sha256 = sha256_hex(&self.model);
        if version != sha256 {
            return Err(ServiceError::NotFound(format!("no model {version}")));
        }
        let header = ModelHeader { version: sha256.clone(), size_bytes: self.model.len() as u64, sha256 };
        // Big chunks on purpose: the transport re-chunks them.
        Ok((header, body_from_bytes(self.model.clone(), 4 * MIB)))
    }

    async fn upload(
        &self,
        caller: &Caller,
        header: UploadHeader,
        mut body: ByteStream,
    ) -> Result<UploadReply, ServiceError> {
        self.auth(caller)?;
        let (mut data, mut chunks) = (Vec::new(), 0);
        while let Some(chunk) = body.next().await {
            data.extend_from_slice(&chunk?);
            chunks += 1;
        }
        if sha256_hex(&data) != header.sha256 {
            return Err(ServiceError::InvalidArgument("checksum mismatch".into()));
        }
        self.uploads.lock().unwrap().push((header, data, chunks));
        Ok(UploadReply { accepted: true, duplicate: false, reason: String::new() })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    certs: CertPaths,
    toy: Arc<Toy>,
    endpoint: String,
    shutdown: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), NetError>>,
}

impl Fixture {
    async fn start(limits: Limits, mutual: bool, model: Bytes) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = generate_dev_certs(dir.path(), &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let toy = Arc::new(Toy::new(model));
        let tls = ServerTls::from_dev_certs(&certs, mutual).unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_with_listener(toy.clone(), listener, tls, limits, async move {
            let _ = stop.await;
        }));
        Self { _dir: dir, certs, toy, endpoint, shutdown, server }
    }

    async fn client_with(&self, tls: ClientTls, id: &str, token: &str) -> Result<GrpcClient, NetError> {
        let caller = Caller { client_id: id.into(), token: Secret::new(token) };
        GrpcClient::connect(&self.endpoint, tls, caller, Limits::default(), Duration::from_secs(10)).await
    }

    async fn client(&self, id: &str, token: &str) -> GrpcClient {
        self.client_with(ClientTls::from_dev_certs(&self.certs, "127.0.0.1").unwrap(), id, token).await.unwrap()
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        bounded(self.server).await.unwrap().unwrap();
    }
}

fn alice() -> Caller {
    Caller { client_id: "alice".into(), token: Secret::new("alice-token") }
}

fn upload_header(body: &[u8]) -> UploadHeader {
    UploadHeader {
        round: 1,
        client_id: "alice".into(),
        n_examples: 12,
        size_bytes: body.len() as u64,
        sha256: sha256_hex(body),
        // Every field set but one: an absent value stays absent.
        metrics: FitMetrics {
            train_loss: Some(0.25),
            train_steps: Some(7),
            val_loss_before: None,
            val_loss_after: Some(1.5),
            val_gain: Some(-0.125),
            train_s: Some(3.5),
            cpu_s: Some(6.75),
            peak_rss_bytes: Some(3 << 30),
            eval: BTreeMap::from([("sst2/accuracy".into(), 80.0), ("sst2/macro_f1".into(), 79.5)]),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_round_trips_over_tls() {
    bounded(async {
        let model = Bytes::from_static(b"tiny model");
        let fx = Fixture::start(Limits::default(), false, model.clone()).await;
        let client = fx.client("alice", "alice-token").await;
        let me = alice();

        let info = ClientInfo {
            client_id: "alice".into(),
            arch: "bloom".into(),
            base_hash: "abc".into(),
            stats: DataStats {
                tasks: vec!["sst2".into()],
                n_examples: 10,
                n_tokens: 100,
                label_hist: BTreeMap::from([("pos".into(), 6), ("neg".into(), 4)]),
                label_entropy_bits: 0.97,
            },
            tokenizer_hash: "0123abcd".into(),
        };
        let reply = client.register(&me, info).await.unwrap();
        assert_eq!(reply, RegisterReply { run_id: "run-1".into(), message: "hello alice (1 tasks)".into() });

        let Instruction::Fit(fit) = client.instructions(&me, 0, Duration::from_secs(1)).await.unwrap() else {
            panic!("expected fit")
        };
        assert_eq!(fit.round, 1);
        assert_eq!(fit.config, serde_json::json!({"epochs": 2, "lr": 1e-4, "encoding": "f16"}));
        assert_eq!(fit.deadline_unix_ms, 1_700_000_000_000);
        assert_eq!(client.instructions(&me, 1000, Duration::ZERO).await.unwrap(), Instruction::Done);

        let (header, body) = client.fetch_model(&me, &fit.model_version).await.unwrap();
        assert_eq!(header.size_bytes, model.len() as u64);
        assert_eq!(collect_body(body).await.unwrap(), model);
        assert!(matches!(client.fetch_model(&me, "nope").await, Err(ServiceError::NotFound(_))));

        let data = b"an update".to_vec();
        let header = upload_header(&data);
        let reply = client.upload(&me, header.clone(), body_from_bytes(data.clone().into(), 4)).await.unwrap();
        assert!(reply.accepted && !reply.duplicate);
        assert_eq!(fx.toy.uploads.lock().unwrap()[0].0, header);

        // Default metrics (nothing measured) travel too.
        let header = UploadHeader { metrics: FitMetrics::default(), ..upload_header(&data) };
        client.upload(&me, header.clone(), body_from_bytes(data.clone().into(), 4)).await.unwrap();
        assert_eq!(fx.toy.uploads.lock().unwrap()[1].0, header);

        // An empty per-call caller falls back to the one given at connect time.
        assert_eq!(client.instructions(&Caller::default(), 1000, Duration::ZERO).await.unwrap(), Instruction::Done);
        fx.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_in_chunks() {
    bounded(async {
        let size = 48 * MIB;
        let model: Bytes = (0..size).map(|i| (i.wrapping_mul(31) >> 7) as u8).collect::<Vec<_>>().into();
        let fx = Fixture::start(Limits::default(), false, model.clone()).await;
        let client = fx.client("alice", "alice-token").await;

        // Download: the client receives many chunks, none larger than chunk_bytes.
        let (header, mut body) = client.fetch_model(&alice(), &sha256_hex(&model)).await.unwrap();
        let (mut hasher, mut n, mut chunks) = (Sha256::new(), 0usize, 0usize);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= Limits::default().chunk_bytes);
            hasher.update(&chunk);
            n += chunk.len();
            chunks += 1;
        }
        let got: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!((n, got), (size, header.sha256));
        assert!(chunks >= 48, "download arrived in {chunks} chunks");

        // Upload: handed over in one piece, it reaches the service in chunks and intact.
        let data: Bytes = model.iter().rev().copied().collect::<Vec<_>>().into();
        let header = upload_header(&data);
        let reply = client.upload(&alice(), header.clone(), body_from_bytes(data.clone(), size)).await.unwrap();
        assert!(reply.accepted);
        let (got_header, got_body, got_chunks) = fx.toy.uploads.lock().unwrap().remove(0);
        assert_eq!(got_header, header);
        assert_eq!(sha256_hex(&got_body), header.sha256);
        assert!(got_chunks >= 48, "upload arrived in {got_chunks} chunks");
        fx.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_authenticated() {
    bounded(async {
        let fx = Fixture::start(Limits::default(), false, Bytes::new()).await;
        let client = fx.client("alice", "alice-token").await;
        let info = ClientInfo::default();

        let wrong = Caller { client_id: "alice".into(), token: Secret::new("bob-token") };
        match client.register(&wrong, info.clone()).await {
            Err(ServiceError::Unauthenticated(m)) => assert!(m.contains("alice") && !m.contains("bob-token"), "{m}"),
            other => panic!("expected Unauthenticated, got {other:?}"),
        }

        // No client id and no token anywhere: the transport itself refuses.
        let anonymous = fx.client("", "").await;
        match anonymous.register(&Caller::default(), info.clone()).await {
            Err(ServiceError::Unauthenticated(m)) => assert!(m.contains("x-hetfed-client-id"), "{m}"),
            other => panic!("expected Unauthenticated, got {other:?}"),
        }

        // A token but no client id.
        let mut raw = proto::fed_client::FedClient::new(client.channel());
        let mut req = tonic::Request::new(proto::RegisterRequest { info: Some(info.clone().into()) });
        req.metadata_mut().insert("authorization", "Bearer alice-token".parse().unwrap());
        let status = raw.register(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);

        // A client id but no token.
        let mut req = tonic::Request::new(proto::RegisterRequest { info: Some(info.into()) });
        req.metadata_mut().insert("x-hetfed-client-id", "alice".parse().unwrap());
        let status = raw.register(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        fx.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_error_survives_the_wire() {
    bounded(async {
        let fx = Fixture::start(Limits::default(), false, Bytes::new()).await;
        let client = fx.client("alice", "alice-token").await;
        for k in 1..=8 {
            let expected = error_for_round(k).unwrap();
            assert_eq!(client.instructions(&alice(), 100 + k, Duration::ZERO).await, Err(expected));
        }
        fx.stop().await;
    })
    .await
}

/// A connection attempt that must fail permanently, fast, with `needle` in its message.
async fn refused_at_once(
    what: &str,
    attempt: impl Future<Output = Result<GrpcClient, NetError>>,
    needle: &str,
) -> NetError {
    let t = Instant::now();
    let err = attempt.await.expect_err(what);
    let msg = err.to_string();
    assert!(t.elapsed() < Duration::from_secs(5), "{what}: took {:?}: {msg}", t.elapsed());
    assert!(err.is_permanent(), "{what}: expected a permanent failure, got {err:?}");
    assert!(msg.contains(needle), "{what}: expected {needle:?} in {msg:?}");
    eprintln!("{what}: {msg}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_is_refused_clearly() {
    bounded(async {
        let fx = Fixture::start(Limits::default(), false, Bytes::new()).await;
        let other = tempfile::tempdir().unwrap();
        let other_certs = generate_dev_certs(other.path(), &[]).unwrap();

        // Wrong CA: permanent, naming the endpoint and the CA.
        let tls = ClientTls::from_files(&other_certs.ca_cert, "127.0.0.1", None).unwrap();
        let err = refused_at_once(
            "wrong CA",
            fx.client_with(tls, "alice", "alice-token"),
            "not signed by a CA this client trusts",
        )
        .await;
        assert!(matches!(err, NetError::Connect { class: ErrorClass::Permanent, .. }), "{err:?}");
        assert!(err.to_string().contains(&fx.endpoint), "{err}");

        // Wrong expected name: permanent, naming the name.
        let tls = ClientTls::from_dev_certs(&fx.certs, "example.org").unwrap();
        refused_at_once("wrong domain", fx.client_with(tls, "alice", "alice-token"), "does not name \"example.org\"")
            .await;

        // Plain http is not accepted, whatever listens there.
        let tls = ClientTls::from_dev_certs(&fx.certs, "127.0.0.1").unwrap();
        let http = fx.endpoint.replace("https://", "http://");
        let err = refused_at_once(
            "http scheme",
            GrpcClient::connect(&http, tls.clone(), alice(), Limits::default(), Duration::from_secs(5)),
            "http://",
        )
        .await;
        assert!(matches!(err, NetError::Endpoint { .. }), "{err}");
        refused_at_once(
            "no scheme",
            GrpcClient::connect("ftp://127.0.0.1:1", tls.clone(), alice(), Limits::default(), Duration::from_secs(5)),
            "ftp",
        )
        .await;

        // Nothing listening: a clear connect error, not a hang, and transient (the server may come).
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://{}", closed.local_addr().unwrap());
        drop(closed);
        let t = Instant::now();
        let err = GrpcClient::connect(&endpoint, tls.clone(), alice(), Limits::default(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&endpoint), "{err}");
        assert!(
            !err.is_permanent() && matches!(err, NetError::Connect { class: ErrorClass::Transient, .. }),
            "{err:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        fx.stop().await;
    })
    .await
}

/// An https URL whose port answers in plain text (an http server, or some other service): the
/// TLS layer refuses it, permanently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_server_is_refused_clearly() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let certs = generate_dev_certs(dir.path(), &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        let plain = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for _ in 0..4 {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
            }
        });
        let tls = ClientTls::from_dev_certs(&certs, "127.0.0.1").unwrap();
        refused_at_once(
            "plain text server",
            GrpcClient::connect(&endpoint, tls, alice(), Limits::default(), Duration::from_secs(5)),
            "TLS",
        )
        .await;
        plain.abort();
    })
    .await
}

/// Every call error is classified in one place: only `Unavailable` is transient.
#[test]
fn service_errors_are_classified() {
    for round in 1..=8 {
        let e = error_for_round(round).unwrap();
        assert_eq!(e.is_permanent(), !matches!(e, ServiceError::Unavailable(_)), "{e:?}");
        assert_eq!(e.is_retryable(), !e.is_permanent(), "{e:?}");
    }
    let setup = NetError::Endpoint { endpoint: "http://x".into(), reason: "r".into() };
    assert_eq!(setup.class(), ErrorClass::Permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_a_permanent_refusal() {
    bounded(async {
        let fx = Fixture::start(Limits::default(), false, Bytes::new()).await;
        let client = fx.client("alice", "bob-token").await;
        let t = Instant::now();
        let err = client.register(&Caller::default(), ClientInfo::default()).await.unwrap_err();
        assert!(
            matches!(&err, ServiceError::Unauthenticated(m) if m.contains("alice") && !m.contains("bob-token")),
            "{err:?}"
        );
        assert!(err.is_permanent() && t.elapsed() < Duration::from_secs(5), "{err:?} after {:?}", t.elapsed());
        fx.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate() {
    bounded(async {
        let fx = Fixture::start(Limits::default(), true, Bytes::new()).await;
        let client = fx.client("alice", "alice-token").await;
        client.register(&alice(), ClientInfo::default()).await.unwrap();

        // Without a client certificate: refused, permanently, either at connect time or (TLS 1.3
        // may only reveal the refusal then) on the first call.
        let tls = ClientTls::from_files(&fx.certs.ca_cert, "127.0.0.1", None).unwrap();
        let t = Instant::now();
        let msg = match fx.client_with(tls, "alice", "alice-token").await {
            Ok(client) => {
                let err = client.register(&alice(), ClientInfo::default()).await.unwrap_err();
                assert!(err.is_permanent(), "{err:?}");
                err.to_string()
            }
            Err(err) => {
                assert!(err.is_permanent(), "{err:?}");
                err.to_string()
            }
        };
        assert!(msg.contains("certificate"), "{msg}");
        eprintln!("mutual TLS without a client certificate: {msg}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        fx.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_over_the_limit_are_refused() {
    bounded(async {
        let limits = Limits { max_upload_bytes: MIB as u64, chunk_bytes: 64 << 10, ..Limits::default() };
        let fx = Fixture::start(limits, false, Bytes::new()).await;
        let client = fx.client("alice", "alice-token").await;
        let data = Bytes::from(vec![7u8; 2 * MIB]);

        // Announced honestly: refused before the body is read.
        let header = upload_header(&data);
        let err = client.upload(&alice(), header.clone(), body_from_bytes(data.clone(), MIB)).await.unwrap_err();
        assert!(matches!(err, ServiceError::ResourceExhausted(_)), "{err:?}");

        // Under-announced: refused once the body passes its announced size.
        let lying = UploadHeader { size_bytes: 1000, ..header.clone() };
        let err = client.upload(&alice(), lying, body_from_bytes(data.clone(), MIB)).await.unwrap_err();
        assert!(matches!(err, ServiceError::ResourceExhausted(_)), "{err:?}");

        // Over-announced: refused when the body ends short.
        let small = Bytes::from(vec![7u8; 1000]);
        let long = UploadHeader { size_bytes: 2000, ..upload_header(&small) };
        let err = client.upload(&alice(), long, body_from_bytes(small.clone(), 100)).await.unwrap_err();
        assert!(matches!(err, ServiceError::InvalidArgument(_)), "{err:?}");

        // A local body failure is what the client reports.
        let failing: ByteStream =
            Box::pin(futures::stream::iter(vec![Ok(small.clone()), Err(ServiceError::Internal("disk gone".into()))]));
        let err = client.upload(&alice(), upload_header(&[0u8; 2000]), failing).await.unwrap_err();
        assert_eq!(err, ServiceError::Internal("disk gone".into()));

        assert!(fx.toy.uploads.lock().unwrap().is_empty());
        fx.stop().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_waits_then_answers_wait() {
    bounded(async {
        let fx = Fixture::start(Limits::default(), false, Bytes::new()).await;
        let client = fx.client("alice", "alice-token").await;
        let start = Instant::now();
        let got = client.instructions(&alice(), 5, Duration::from_millis(400)).await.unwrap();
        let waited = start.elapsed();
        assert_eq!(got, Instruction::Wait);
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(10), "{waited:?}");
        fx.stop().await;
    })
    .await
}

#[test]
fn dev_certs_and_loaders() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = vec!["fed.example".to_owned(), "10.1.2.3".to_owned()];
    let certs = generate_dev_certs(&dir.path().join("certs"), &hosts).unwrap();
    for p in
        [&certs.ca_cert, &certs.ca_key, &certs.server_cert, &certs.server_key, &certs.client_cert, &certs.client_key]
    {
        assert!(p.exists(), "{}", p.display());
    }
    #[cfg(unix)]
    for key in [&certs.ca_key, &certs.server_key, &certs.client_key] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let tls = ServerTls::from_dev_certs(&certs, true).unwrap();
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"));

    let missing = dir.path().join("missing.pem");
    let err = ClientTls::from_files(&missing, "x", None).unwrap_err().to_string();
    assert!(err.contains("missing.pem") && err.contains("CA certificate"), "{err}");

    // A key where a certificate belongs, and the other way round.
    let err = ServerTls::from_files(&certs.server_key, &certs.server_key, None).unwrap_err().to_string();
    assert!(err.contains("server.key") && err.contains("certificate"), "{err}");
    let err = ServerTls::from_files(&certs.server_cert, &certs.server_cert, None).unwrap_err().to_string();
    assert!(err.contains("server.pem") && err.contains("private key"), "{err}");
    assert!(Path::new(&certs.server_cert).starts_with(dir.path()));
}
