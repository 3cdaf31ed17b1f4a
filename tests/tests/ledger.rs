//! Billing's ledger through the real collector (`tidemark dev`): batches
//! replayed, duplicated and out of order count once; a missing batch is
//! reported as a gap, open then lost.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use tidemark_e2e::{billed, get, start_dev};
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{TenantUsage, UsageBatch};

/// `tidemark dev` taking batches from November 2025, when these were written.
fn start_dev_for_old_batches(dir: &std::path::Path, extra: &[&str]) -> tidemark_e2e::Proc {
    let mut args = vec!["--max-batch-age=100000days"];
    args.extend_from_slice(extra);
    start_dev(dir, &args)
}

fn batch(session: &str, seq: u64, requests: u64) -> UsageBatch {
    let start = 1_764_000_000_000_000 + seq as i64 * 1_000_000;
    UsageBatch {
        service: "shop".into(),
        instance: "shop-1".into(),
        session_id: session.into(),
        seq,
        window_start_unix_micros: start,
        window_end_unix_micros: start + 1_000_000,
        tenants: vec![TenantUsage {
            tenant: "acme".into(),
            requests,
            ..TenantUsage::default()
        }],
        ..UsageBatch::default()
    }
}

/// Sends `batches` on one stream and checks each is acked.
async fn deliver(ingest: std::net::SocketAddr, batches: Vec<UsageBatch>) {
    let count = batches.len();
    let mut client = IngestClient::connect(format!("http://{ingest}")).await.unwrap();
    let mut replies = client.report(tokio_stream::iter(batches)).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(reply) = replies.message().await.unwrap() {
        assert!(matches!(reply.result, Some(Reply::Ack(_))), "{reply:?}");
        acked += 1;
    }
    assert_eq!(acked, count);
}

async fn gaps(api: std::net::SocketAddr) -> serde_json::Value {
    let (status, body) = get(&format!("http://{api}/v1/gaps"), &[]).await;
    assert!(status.is_success(), "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_count_once_and_missing_batches_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev_for_old_batches(dir.path(), &["--gap-grace=2s"]);
    let ingest = dev.address("ingest gRPC");
    let api = dev.address("billing HTTP API");

    // Session A: 0, 2, 2 again, then the late 1, then 0 replayed. All there, once.
    // Session B: 0 and 2; 1 never comes.
    deliver(
        ingest,
        vec![
            batch("a", 0, 1),
            batch("a", 2, 100),
            batch("b", 0, 1000),
            batch("b", 2, 4000),
        ],
    )
    .await;
    deliver(ingest, vec![batch("a", 2, 100), batch("a", 1, 10), batch("a", 0, 1)]).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while billed(api, "acme", "requests").await != 5111 {
        assert!(tokio::time::Instant::now() < deadline, "never reached 5111");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open = gaps(api).await;
    assert_eq!(open["sessions"].as_array().unwrap().len(), 1, "{open}");
    assert_eq!(open["sessions"][0]["session"], "b");
    assert_eq!(
        open["sessions"][0]["missing"],
        serde_json::json!([{"from_seq": 1, "to_seq": 1, "state": "open"}])
    );

    // Past the grace, B's next batch finds the hole old: declared lost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    deliver(ingest, vec![batch("b", 3, 10000)]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = gaps(api).await;
        if now["sessions"][0]["missing"][0]["state"] == "lost" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never declared lost: {now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(billed(api, "acme", "requests").await, 15111);
    let (_, metrics) = get(
        &format!("http://{}/metrics", dev.address("metrics, healthz, readyz")),
        &[],
    )
    .await;
    assert!(metrics.contains("tidemark_billing_batches_lost_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("tidemark_billing_batches_duplicate_total 2\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_by_window_and_service_as_json_and_csv_and_bad_queries_get_400() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev_for_old_batches(dir.path(), &[]);
    let ingest = dev.address("ingest gRPC");
    let api = dev.address("billing HTTP API");
    // Two services, batches an hour apart (seq s starts at s seconds; 3600 s = 1 h).
    let mut other = batch("c", 0, 7);
    other.service = "cart".into();
    let mut late = batch("a", 3600, 30);
    late.session_id = "d".into();
    late.seq = 0;
    deliver(ingest, vec![batch("a", 0, 1), batch("a", 1, 2), other, late]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while billed(api, "acme", "requests").await != 40 {
        assert!(tokio::time::Instant::now() < deadline, "never reached 40");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let url = format!("http://{api}/v1/usage?tenant=acme&meter=requests&window=hour&group_by=service");
    let (_, body) = get(&url, &[]).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows: Vec<(String, String, i64)> = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["window_start"].as_str().unwrap().to_owned(),
                r["service"].as_str().unwrap().to_owned(),
                r["quantity"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("2025-11-24T16:00:00Z".to_owned(), "cart".to_owned(), 7),
            ("2025-11-24T16:00:00Z".to_owned(), "shop".to_owned(), 3),
            ("2025-11-24T17:00:00Z".to_owned(), "shop".to_owned(), 30),
        ],
        "{json}"
    );
    assert_eq!(json["window"], "hour");

    let url = format!("http://{api}/v1/usage?tenant=acme&meter=requests&window=month");
    let (_, csv) = get(&url, &[("accept", "text/csv")]).await;
    assert_eq!(
        csv,
        "window_start,service,meter,quantity,batches\n2025-11-01T00:00:00Z,,requests,40,4\n"
    );

    for (query, parameter) in [
        ("window=week", "window"),
        ("from=soon", "from"),
        ("group_by=tenant", "group_by"),
    ] {
        let (status, body) = get(&format!("http://{api}/v1/usage?tenant=acme&{query}"), &[]).await;
        assert_eq!(status.as_u16(), 400, "{query}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["parameter"], parameter, "{json}");
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
}
