//! Bad input harms nothing else: a malformed batch is refused with a reason
//! while its stream goes on, the sidecar keeps serving while the collector is
//! away, and bad settings fail at start with a clear message.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use tidemark_e2e::{
    Proc, expect_billed_requests, free_port, kafka_brokers, send_requests, start_dev, start_upstream, unique_topic,
};
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{TenantUsage, UsageBatch};

/// A one-second batch that ended a second ago.
fn batch(service: &str, seq: u64) -> UsageBatch {
    let end = tidemark_core::window::now_micros() - 1_000_000;
    UsageBatch {
        service: service.into(),
        instance: "i-1".into(),
        session_id: "3f1c5a8e-0000-4000-8000-000000000001".into(),
        seq,
        window_start_unix_micros: end - 1_000_000,
        window_end_unix_micros: end,
        tenants: vec![TenantUsage {
            tenant: "acme".into(),
            requests: 1,
            ..TenantUsage::default()
        }],
        ..UsageBatch::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_batch_gets_invalid_argument_and_the_stream_goes_on() {
    let brokers = kafka_brokers();
    let collector = Proc::start(
        "tidemark-collector",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--kafka-brokers={brokers}"),
            &format!("--usage-topic={}", unique_topic()),
        ],
    );
    let addr = collector.address("ingest gRPC");
    let mut client = IngestClient::connect(format!("http://{addr}")).await.unwrap();
    let mut bad = batch("", 0);
    bad.window_end_unix_micros = bad.window_start_unix_micros;
    let batches = vec![bad, batch("shop", 1)];
    let mut replies = client.report(tokio_stream::iter(batches)).await.unwrap().into_inner();

    let mut results = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        results.push(reply.result.unwrap());
    }
    assert_eq!(results.len(), 2, "{results:?}");
    match &results[0] {
        Reply::Reject(r) => {
            assert_eq!((r.seq, r.code), (0, tonic::Code::InvalidArgument as i32));
            assert_eq!(r.reason, "service name is empty");
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    match &results[1] {
        Reply::Ack(a) => assert_eq!(a.seq, 1),
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Sends `batches` on one stream with `token` and returns `(seq, code)` per
/// answer, code 0 for an ack; or the status that ended the stream.
async fn report(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    batches: Vec<UsageBatch>,
) -> Result<Vec<(u64, i32)>, tonic::Status> {
    let mut client = IngestClient::connect(format!("http://{addr}")).await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(batches));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let mut replies = client.report(request).await?.into_inner();
    let mut results = Vec::new();
    while let Some(reply) = replies.message().await? {
        results.push(match reply.result.unwrap() {
            Reply::Ack(a) => (a.seq, 0),
            Reply::Reject(r) => (r.seq, r.code),
        });
    }
    Ok(results)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_admit_only_their_services_and_clocks_must_agree_without_disturbing_other_streams() {
    let brokers = kafka_brokers();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "shop = \"shop-token-0123456789\"\nsearch = \"search-token-0123456789\"\n",
    )
    .unwrap();
    let collector = Proc::start(
        "tidemark-collector",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--kafka-brokers={brokers}"),
            &format!("--usage-topic={}", unique_topic()),
            &format!("--ingest-tokens={}", tokens.display()),
            "--max-clock-skew=5s",
            "--max-batch-age=1h",
        ],
    );
    let addr = collector.address("ingest gRPC");

    for token in [None, Some("guess-guess-guess-guess")] {
        let status = report(addr, token, vec![batch("shop", 0)]).await.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{token:?}: {status:?}");
    }

    let mut future = batch("shop", 2);
    future.window_start_unix_micros += 60_000_000;
    future.window_end_unix_micros += 60_000_000;
    let mut old = batch("shop", 3);
    old.window_start_unix_micros -= 7_200_000_000;
    old.window_end_unix_micros -= 7_200_000_000;
    let mixed = vec![batch("shop", 0), batch("search", 1), future, old, batch("shop", 4)];
    // A second stream, for another service, runs alongside the troubled one.
    let (troubled, clean) = tokio::join!(
        report(addr, Some("shop-token-0123456789"), mixed),
        report(
            addr,
            Some("search-token-0123456789"),
            (10..20).map(|seq| batch("search", seq)).collect()
        ),
    );
    let denied = tonic::Code::PermissionDenied as i32;
    let out_of_range = tonic::Code::OutOfRange as i32;
    assert_eq!(
        troubled.unwrap(),
        [(0, 0), (1, denied), (2, out_of_range), (3, out_of_range), (4, 0)]
    );
    assert_eq!(clean.unwrap(), (10..20).map(|seq| (seq, 0)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_serves_while_the_collector_is_down_and_delivers_later() {
    let upstream = start_upstream().await;
    let ingest_port = free_port();
    let sidecar = Proc::start(
        "tidemark-sidecar",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--upstream=http://{upstream}"),
            &format!("--collector=http://127.0.0.1:{ingest_port}"),
            "--service=shop",
            "--report-interval=100ms",
        ],
    );
    let proxy = sidecar.address("proxy");
    // 30 s without a collector, with traffic all along.
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(30) {
        send_requests(proxy, "acme", 3).await;
        send_requests(proxy, "globex", 1).await;
        rounds += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), &[&format!("--ingest-listen=127.0.0.1:{ingest_port}")]);
    let api = dev.address("billing HTTP API");
    expect_billed_requests(api, &[("acme", 3 * rounds), ("globex", rounds)], Duration::from_secs(1)).await;
}

#[test]
fn a_bad_database_url_fails_at_start_with_a_clear_message() {
    for (url, says) in [
        (
            "postgres://tidemark@127.0.0.1:1/nowhere",
            "cannot open database postgres://tidemark@127.0.0.1:1/nowhere",
        ),
        (
            "sqlite:/nonexistent-dir/sub/billing.db",
            "cannot open database sqlite:/nonexistent-dir/sub/billing.db",
        ),
        ("mysql://db/x", "unsupported scheme"),
    ] {
        let mut billing = Proc::start(
            "tidemark-billing",
            &[&format!("--database-url={url}"), "--kafka-brokers=127.0.0.1:1"],
        );
        let status = billing.wait_exit(Duration::from_secs(60));
        let output = billing.output();
        assert!(!status.success(), "{url}: exited {status}");
        assert!(
            output.contains("check --database-url") && output.contains(says),
            "{url}: {output}"
        );
    }
}

#[test]
fn an_unreachable_broker_fails_at_start_with_a_clear_message() {
    let mut collector = Proc::start(
        "tidemark-collector",
        &[
            "--kafka-brokers=127.0.0.1:1",
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
        ],
    );
    let status = collector.wait_exit(Duration::from_secs(60));
    let output = collector.output();
    assert!(!status.success());
    assert!(output.contains("cannot reach Kafka at 127.0.0.1:1"), "{output}");
    assert!(output.contains("check --kafka-brokers"), "{output}");
}

#[test]
fn a_config_file_with_an_unknown_key_fails_at_start_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(
        &path,
        "upstream = \"http://127.0.0.1:1\"\nservice = \"shop\"\nreport_intervall = \"1s\"\n",
    )
    .unwrap();
    let mut sidecar = Proc::start("tidemark-sidecar", &[&format!("--config={}", path.display())]);
    let status = sidecar.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2));
    let output = sidecar.output();
    assert!(
        output.contains(&format!(
            "config file {}: key `report_intervall`: unknown key",
            path.display()
        )),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_last_window_before_the_sidecar_exits() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), &[]);
    let ingest = dev.address("ingest gRPC");
    let api = dev.address("billing HTTP API");
    let upstream = start_upstream().await;
    // A window far longer than the test: only the shutdown flush reports.
    let mut sidecar = Proc::start(
        "tidemark-sidecar",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--upstream=http://{upstream}"),
            &format!("--collector=http://{ingest}"),
            "--service=shop",
            "--report-interval=1h",
        ],
    );
    send_requests(sidecar.address("proxy"), "acme", 7).await;
    let status = sidecar.terminate();
    assert!(status.success(), "exited {status}:\n{}", sidecar.output());
    expect_billed_requests(api, &[("acme", 7)], Duration::from_millis(500)).await;
}
