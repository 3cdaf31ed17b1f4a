//! The sidecar against the real collector and Kafka: exact per-tenant usage
//! for a scripted request mix, streaming, upgrades, the concurrency limit,
//! and the spool surviving `kill -9`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tidemark_e2e::{Proc, free_port, get, kafka_brokers, read_usage, start_upstream, totals, unique_topic};
use tidemark_proto::v1::{TenantUsage, UsageBatch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Each request is billed 10 s: far more than any takes, so billed duration
/// is exactly 10 s per request.
const BILLING_STEP_MICROS: u64 = 10_000_000;

fn collector(brokers: &str, topic: &str, listen: &str) -> Proc {
    Proc::start(
        "tidemark-collector",
        &[
            &format!("--listen={listen}"),
            "--admin-listen=127.0.0.1:0",
            &format!("--kafka-brokers={brokers}"),
            &format!("--usage-topic={topic}"),
        ],
    )
}

fn sidecar(upstream: &str, collector: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "--listen=127.0.0.1:0".to_owned(),
        "--admin-listen=127.0.0.1:0".to_owned(),
        format!("--upstream={upstream}"),
        format!("--collector=http://{collector}"),
        "--report-interval=100ms".to_owned(),
        "--billing-step=10s".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    if !extra.iter().any(|a| a.starts_with("--service=")) {
        args.push("--service=shop".to_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start("tidemark-sidecar", &args)
}

async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> (StatusCode, hyper::HeaderMap, Bytes) {
    let response = client.request(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

fn request(
    method: &str,
    proxy: SocketAddr,
    path: &str,
    tenant: Option<&str>,
    body: &'static [u8],
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(format!("http://{proxy}{path}"));
    if let Some(tenant) = tenant {
        builder = builder.header("x-tenant-id", tenant);
    }
    builder.body(Full::new(Bytes::from_static(body))).unwrap()
}

/// `GET /ws` with an upgrade, then `payload` through the tunnel and back.
async fn websocket_round_trip(proxy: SocketAddr, tenant: &str, payload: &[u8]) {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "GET /ws HTTP/1.1\r\nhost: {proxy}\r\nconnection: upgrade\r\nupgrade: echo\r\nx-tenant-id: {tenant}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        response.push(byte[0]);
    }
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    stream.write_all(payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, payload);
}

fn usage(tenant: &str, f: impl FnOnce(&mut TenantUsage)) -> TenantUsage {
    let mut u = TenantUsage {
        tenant: tenant.into(),
        ..TenantUsage::default()
    };
    f(&mut u);
    u
}

/// What the test compares: the counted fields, not the timing-dependent ones.
fn counted(u: &TenantUsage) -> TenantUsage {
    TenantUsage {
        duration_micros: 0,
        in_flight_micros: 0,
        cpu_micros: 0,
        memory_byte_micros: 0,
        ..u.clone()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scripted_request_mix_is_metered_exactly_per_tenant() {
    let brokers = kafka_brokers();
    let topic = unique_topic();
    let upstream = start_upstream().await;
    let collector = collector(&brokers, &topic, "127.0.0.1:0");
    let ingest = collector.address("ingest gRPC");
    let pid = std::process::id().to_string();
    let sidecar = sidecar(
        &format!("http://{upstream}"),
        &ingest.to_string(),
        &[&format!("--app-pid={pid}")],
    );
    let proxy = sidecar.address("proxy");
    let down = sidecar_to_nowhere(&ingest);
    let down_proxy = down.address("proxy");

    let http1: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let http2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();

    for _ in 0..10 {
        let (status, _, body) = send(&http1, request("GET", proxy, "/hello", Some("acme"), b"")).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    }
    for _ in 0..3 {
        let (status, _, body) = send(&http1, request("POST", proxy, "/echo", Some("acme"), &[7u8; 1000])).await;
        assert_eq!((status, body.len()), (StatusCode::OK, 1000));
    }
    for _ in 0..5 {
        let (status, _, body) = send(&http2, request("GET", proxy, "/hello", Some("globex"), b"")).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello"[..]));
    }
    for (code, times) in [(503, 2), (404, 4)] {
        for _ in 0..times {
            let (status, _, _) = send(
                &http1,
                request("GET", proxy, &format!("/status/{code}"), Some("globex"), b""),
            )
            .await;
            assert_eq!(status.as_u16(), code);
        }
    }
    websocket_round_trip(proxy, "initech", b"ping!!").await;
    for _ in 0..2 {
        let (status, headers, _) = send(&http1, request("GET", proxy, "/usage", Some("initech"), b"")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!headers.contains_key("tidemark-usage"), "the usage header is stripped");
    }
    for _ in 0..2 {
        send(&http1, request("GET", proxy, "/hello", None, b"")).await;
    }
    send(&http1, request("GET", proxy, "/hello", Some("bad tenant!"), b"")).await;
    for _ in 0..3 {
        let (status, _, _) = send(&http1, request("GET", down_proxy, "/hello", Some("umbrella"), b"")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }

    let want: BTreeMap<String, TenantUsage> = [
        usage("acme", |u| {
            u.requests = 13;
            u.responses_2xx = 13;
            u.bytes_in = 3000;
            u.bytes_out = 50 + 3000;
        }),
        usage("globex", |u| {
            u.requests = 11;
            u.responses_2xx = 5;
            u.responses_4xx = 4;
            u.responses_5xx = 2;
            u.errors = 2;
            u.bytes_out = 25 + 2 * 6 + 4 * 6;
        }),
        usage("initech", |u| {
            u.requests = 3;
            u.responses_1xx = 1;
            u.responses_2xx = 2;
            u.bytes_in = 6;
            u.bytes_out = 6 + 2 * 4;
            u.custom.insert("tokens".into(), "10".into());
            u.custom_rejects = 2;
        }),
        usage("anonymous", |u| {
            u.requests = 3;
            u.responses_2xx = 3;
            u.bytes_out = 15;
        }),
        usage("umbrella", |u| {
            u.requests = 3;
            u.responses_5xx = 3;
            u.errors = 3;
            u.bytes_out = 3 * "upstream unavailable\n".len() as u64;
        }),
    ]
    .into_iter()
    .map(|mut u| {
        u.billed_duration_micros = u.requests * BILLING_STEP_MICROS;
        (u.tenant.clone(), u)
    })
    .collect();

    let batches = read_usage(&brokers, &topic, |batches| {
        let got = totals(batches);
        want.iter().all(|(t, w)| got.get(t).map(counted).as_ref() == Some(w))
    })
    .await;
    let got = totals(&batches);
    for (tenant, w) in &want {
        let g = &got[tenant];
        assert_eq!(&counted(g), w, "{tenant}");
        assert!(
            g.duration_micros > 0 && g.duration_micros < g.billed_duration_micros,
            "{tenant}: {g:?}"
        );
    }
    // CPU and memory measured for the app (this process) split among the
    // tenants and idle, summing to what was measured, batch by batch.
    for batch in batches.iter().filter(|b| b.service == "shop" && b.resources.is_some()) {
        let measured = batch.resources.as_ref().unwrap().cpu_micros;
        let attributed: u64 = batch.tenants.iter().map(|t| t.cpu_micros).sum();
        assert_eq!(attributed, measured, "batch {}", batch.seq);
    }
    assert!(batches.iter().any(|b| b.resources.is_some()), "resources were sampled");
    drop(down);
}

/// A sidecar in front of `upstream` whose collector is not there.
fn sidecar_without_collector(upstream: SocketAddr) -> Proc {
    sidecar(
        &format!("http://{upstream}"),
        &format!("127.0.0.1:{}", free_port()),
        &[],
    )
}

/// A sidecar whose upstream does not exist.
fn sidecar_to_nowhere(collector: &SocketAddr) -> Proc {
    sidecar(
        &format!("http://127.0.0.1:{}", free_port()),
        &collector.to_string(),
        &["--service=nowhere"],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_through_without_buffering() {
    let upstream = start_upstream().await;
    let sidecar = sidecar_without_collector(upstream);
    let proxy = sidecar.address("proxy");
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let started = Instant::now();
    let response = client.request(request("GET", proxy, "/drip", None, b"")).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the first chunk came before the second was sent"
    );
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"second");
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_trailers_pass_through_as_grpc_needs_them() {
    let upstream = start_upstream().await;
    let sidecar = sidecar_without_collector(upstream);
    let proxy = sidecar.address("proxy");
    let http2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let response = http2
        .request(request("POST", proxy, "/trailers", None, b""))
        .await
        .unwrap();
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "done");
    assert_eq!(&collected.to_bytes()[..], b"body");
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_the_concurrency_limit_and_queue_requests_get_503_at_once() {
    let brokers = kafka_brokers();
    let topic = unique_topic();
    let upstream = start_upstream().await;
    let collector = collector(&brokers, &topic, "127.0.0.1:0");
    let ingest = collector.address("ingest gRPC").to_string();
    let sidecar = sidecar(
        &format!("http://{upstream}"),
        &ingest,
        &["--max-concurrency=2", "--max-queue=1"],
    );
    let proxy = sidecar.address("proxy");

    let tasks: Vec<_> = (0..6)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let (status, _) = get(&format!("http://{proxy}/slow"), &[("x-tenant-id", "acme")]).await;
                (status, started.elapsed())
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        let (status, elapsed) = task.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert!(
                    elapsed < Duration::from_millis(500),
                    "refused at once, not after {elapsed:?}"
                )
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 3, "two running and one queued");
    let batches = read_usage(&brokers, &topic, |b| {
        let t = totals(b);
        t.get("acme").is_some_and(|u| u.requests == 3 && u.rejected == 3)
    })
    .await;
    assert_eq!(totals(&batches)["acme"].responses_5xx, 0, "refusals are not requests");
}

/// Checks that each session's batches are `0..n` with none missing or twice.
fn assert_no_gap_no_duplicate(batches: &[UsageBatch]) {
    let mut by_session: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for b in batches {
        by_session.entry(&b.session_id).or_default().push(b.seq);
    }
    for (session, mut seqs) in by_session {
        seqs.sort_unstable();
        let want: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, want, "session {session}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_kill_9_the_spool_delivers_every_batch_exactly_once() {
    let brokers = kafka_brokers();
    let topic = unique_topic();
    let upstream = format!("http://{}", start_upstream().await);
    let spool = tempfile::tempdir().unwrap();
    let spool_flag = format!("--spool-dir={}", spool.path().display());
    let ingest = format!("127.0.0.1:{}", free_port());

    // The collector is not there yet: everything waits in the spool.
    let mut first = sidecar(&upstream, &ingest, &[&spool_flag]);
    let proxy = first.address("proxy");
    for _ in 0..25 {
        get(&format!("http://{proxy}/hello"), &[("x-tenant-id", "acme")]).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a few windows close
    first.kill();
    let first_session_batches = std::fs::read_dir(spool.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "batch"))
        .count();
    assert!(
        first_session_batches >= 3,
        "batches were spooled: {first_session_batches}"
    );

    let collector = collector(&brokers, &topic, &ingest);
    collector.address("ingest gRPC"); // up, and the topic exists
    let second = sidecar(&upstream, &ingest, &[&spool_flag]);
    let proxy = second.address("proxy");
    for _ in 0..5 {
        get(&format!("http://{proxy}/hello"), &[("x-tenant-id", "acme")]).await;
    }
    let batches = read_usage(&brokers, &topic, |b| {
        totals(b).get("acme").is_some_and(|u| u.requests >= 30)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let more = read_usage(&brokers, &topic, |b| b.len() > batches.len()).await;
    assert_eq!(totals(&more)["acme"].requests, 30, "every request once");
    let sessions: std::collections::BTreeSet<&str> = more.iter().map(|b| b.session_id.as_str()).collect();
    assert_eq!(sessions.len(), 2, "both runs delivered");
    assert_no_gap_no_duplicate(&more);
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, made
/// with openssl: `(ca, cert, key)` paths.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs (scripts/setup installs it)");
        assert!(status.success(), "openssl {args:?}");
    };
    let (ca, ca_key, csr) = (path("ca.pem"), path("ca-key.pem"), path("leaf.csr"));
    let (cert, key, ext) = (path("cert.pem"), path("key.pem"), path("leaf.ext"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    (ca, cert, key)
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_reaches_a_collector_over_tls() {
    let brokers = kafka_brokers();
    let topic = unique_topic();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let collector = Proc::start(
        "tidemark-collector",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--kafka-brokers={brokers}"),
            &format!("--usage-topic={topic}"),
            &format!("--tls-cert={cert}"),
            &format!("--tls-key={key}"),
        ],
    );
    let port = collector.address("ingest gRPC").port();
    let upstream = start_upstream().await;
    let sidecar = Proc::start(
        "tidemark-sidecar",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--service=shop",
            "--report-interval=100ms",
            &format!("--upstream=http://{upstream}"),
            &format!("--collector=https://localhost:{port}"),
            &format!("--collector-ca={ca}"),
        ],
    );
    let proxy = sidecar.address("proxy");
    for _ in 0..4 {
        get(&format!("http://{proxy}/hello"), &[("x-tenant-id", "acme")]).await;
    }
    let batches = read_usage(&brokers, &topic, |b| {
        totals(b).get("acme").is_some_and(|u| u.requests == 4)
    })
    .await;
    assert_eq!(totals(&batches)["acme"].requests, 4);
}
