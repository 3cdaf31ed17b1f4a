//! The thinnest real path, end to end: an upstream app, the real sidecar,
//! collector and billing binaries as separate processes, and the exact
//! per-tenant request counts billing reports afterwards.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::time::Duration;

use tidemark_e2e::{
    Proc, expect_billed_requests, fresh_postgres_database, kafka_brokers, send_requests, start_dev, start_upstream,
    unique_topic,
};

const REPORT_INTERVAL: &str = "200ms";
const MIX: [(&str, usize); 3] = [("acme", 37), ("globex", 23), ("initech", 11)];

fn start_sidecar(upstream: SocketAddr, collector: SocketAddr) -> Proc {
    Proc::start(
        "tidemark-sidecar",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--upstream=http://{upstream}"),
            &format!("--collector=http://{collector}"),
            "--service=shop",
            &format!("--report-interval={REPORT_INTERVAL}"),
        ],
    )
}

/// Sends the request mix through a fresh sidecar and checks billing's counts.
async fn drive_and_check(collector: SocketAddr, billing_api: SocketAddr) {
    let upstream = start_upstream().await;
    let sidecar = start_sidecar(upstream, collector);
    let proxy = sidecar.address("proxy");
    for (tenant, count) in MIX {
        send_requests(proxy, tenant, count).await;
    }
    let want: Vec<(&str, i64)> = MIX.iter().map(|(t, n)| (*t, *n as i64)).collect();
    expect_billed_requests(billing_api, &want, Duration::from_secs(2)).await;
}

/// Runs collector and billing on Kafka with `database_url`, then the mix.
async fn kafka_pipeline(database_url: &str) {
    let brokers = kafka_brokers();
    let topic = unique_topic();
    let kafka = [format!("--kafka-brokers={brokers}"), format!("--usage-topic={topic}")];
    let collector = Proc::start(
        "tidemark-collector",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &kafka[0],
            &kafka[1],
        ],
    );
    let billing = Proc::start(
        "tidemark-billing",
        &[
            "--api-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--commit-interval=200ms",
            &format!("--database-url={database_url}"),
            &format!("--group=billing-{topic}"),
            &kafka[0],
            &kafka[1],
        ],
    );
    drive_and_check(collector.address("ingest gRPC"), billing.address("billing HTTP API")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_to_sqlite_counts_every_request_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("billing.db").display());
    kafka_pipeline(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_to_postgres_counts_every_request_exactly_once() {
    let url = fresh_postgres_database().await;
    kafka_pipeline(&url).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_counts_every_request_exactly_once_over_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), &[]);
    drive_and_check(dev.address("ingest gRPC"), dev.address("billing HTTP API")).await;
}
