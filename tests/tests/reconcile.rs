//! `tidemark reconcile` on what `tidemark dev` billed: batches (some sent
//! twice, with custom meters) go through ingest, the API shows custom
//! quantities as exact decimals and late usage with both minutes, and after
//! dev stops the log proves the rollups and the finalized invoices' batch
//! counts (usage that came after a month was finalized shows as not yet
//! billed, then proven once a correction bills it); an invoice line or a
//! rollup row changed in the database is then found and reconcile exits
//! non-zero.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use sqlx::Connection;
use tidemark_e2e::{billed, bin, get, http_client, start_dev};
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{TenantUsage, UsageBatch};

/// 2025-11-24T16:00:00Z.
const T0: i64 = 1_764_000_000_000_000;
const SECOND: i64 = 1_000_000;
const MINUTE: i64 = 60 * SECOND;

fn usage(tenant: &str, requests: u64, custom: &[(&str, &str)]) -> TenantUsage {
    TenantUsage {
        tenant: tenant.into(),
        requests,
        custom: custom
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        ..TenantUsage::default()
    }
}

fn batch(session: &str, seq: u64, start: i64, tenants: Vec<TenantUsage>) -> UsageBatch {
    UsageBatch {
        service: "shop".into(),
        instance: "shop-1".into(),
        session_id: session.into(),
        seq,
        window_start_unix_micros: start,
        window_end_unix_micros: start + SECOND,
        tenants,
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

async fn json(url: &str) -> serde_json::Value {
    let (status, body) = get(url, &[]).await;
    assert!(status.is_success(), "{url}: {status} {body}");
    serde_json::from_str(&body).unwrap()
}

/// `tidemark reconcile` with `args`, with none of the test's TIDEMARK_*
/// settings; its output, stdout and stderr.
fn reconcile(args: &[&str]) -> (Output, String, String) {
    let mut command = Command::new(bin("tidemark"));
    command.arg("reconcile").args(args).stdin(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("TIDEMARK_") {
            command.env_remove(key);
        }
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

/// Finalizes invoice `id` through the billing API; the finalized invoice.
async fn finalize(api: std::net::SocketAddr, id: &str) -> serde_json::Value {
    let url = format!("http://{api}/v1/invoices/{id}/finalize");
    let request = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = http_client().request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    serde_json::from_slice(&body).unwrap()
}

/// The line of `invoice` of `kind` for `charge`.
fn line<'a>(invoice: &'a serde_json::Value, kind: &str, charge: &str) -> &'a serde_json::Value {
    invoice["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == kind && l["charge"] == charge)
        .unwrap_or_else(|| panic!("no {kind} line for {charge}: {invoice}"))
}

/// Waits until billing reports `want` requests for acme.
async fn wait_billed(api: std::net::SocketAddr, want: i64, dev: &tidemark_e2e::Proc) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while billed(api, "acme", "requests").await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never billed {want}:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn tamper(db: &Path, sql: &str) {
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", db.display()))
        .await
        .unwrap();
    let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1, "{sql}");
    conn.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_proves_what_dev_billed_and_finds_a_changed_row() {
    let dir = tempfile::tempdir().unwrap();
    // Batches from November 2025: older than ingest takes by default, and
    // late (past --late-after) when the ledger commits them.
    let dev_flags = ["--max-batch-age=100000days", "--default-plan=aws-lambda-x86"];
    let mut dev = start_dev(dir.path(), &dev_flags);
    let ingest = dev.address("ingest gRPC");
    let api = dev.address("billing HTTP API");
    let admin = dev.address("metrics, healthz, readyz");

    let a0 = batch(
        "a",
        0,
        T0 + SECOND,
        vec![
            usage("acme", 3, &[("tokens", "0.1")]),
            usage("globex", 1, &[("tokens", "1.000000001")]),
        ],
    );
    let a1 = batch("a", 1, T0 + 2 * SECOND, vec![usage("acme", 2, &[("tokens", "0.2")])]);
    let a2 = batch(
        "a",
        2,
        T0 + MINUTE + SECOND,
        vec![
            usage("acme", 5, &[("tokens", "2.5"), ("images", "0.0000000001")]),
            usage("globex", 1, &[("tokens", "0.000000009")]),
        ],
    );
    // A custom meter named like a built-in one is kept apart.
    let b0 = batch("b", 0, T0 + MINUTE, vec![usage("acme", 7, &[("requests", "1.5")])]);
    // Outside the range reconciled below.
    let b1 = batch("b", 1, T0 + 10 * MINUTE, vec![usage("acme", 100, &[])]);
    deliver(ingest, vec![a0.clone(), a1.clone(), a1.clone(), a2, b0.clone(), b1]).await;
    deliver(ingest, vec![a0, b0]).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while billed(api, "acme", "requests").await != 117 || billed(api, "globex", "requests").await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never billed:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Custom meters: exact decimal strings, built-in meters integers.
    let tokens = json(&format!("http://{api}/v1/usage?tenant=acme&meter=tokens")).await;
    assert_eq!(tokens["totals"]["tokens"], "2.8", "{tokens}");
    let quantities: Vec<&serde_json::Value> = tokens["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["quantity"])
        .collect();
    assert_eq!(quantities, ["0.3", "2.5"], "{tokens}");
    let globex = json(&format!("http://{api}/v1/usage?tenant=globex")).await;
    assert_eq!(globex["totals"]["tokens"], "1.00000001", "{globex}");
    assert_eq!(globex["totals"]["requests"], 2, "{globex}");
    let custom = json(&format!("http://{api}/v1/usage?tenant=acme&meter=custom.requests")).await;
    assert_eq!(custom["totals"]["custom.requests"], "1.5", "{custom}");
    let (status, body) = get(&format!("http://{api}/v1/usage?tenant=acme&meter=Tokens"), &[]).await;
    assert_eq!(status.as_u16(), 400, "{body}");
    assert!(body.contains("\"parameter\":\"meter\""), "{body}");

    // Every batch was late: in late_usage at its event minute, stored now.
    let late = json(&format!("http://{api}/v1/late-usage?tenant=acme&meter=requests")).await;
    let mut per_minute: Vec<(String, i64)> = Vec::new();
    for row in late["rows"].as_array().unwrap() {
        let minute = row["minute"].as_str().unwrap().to_owned();
        let stored = row["stored_minute"].as_str().unwrap();
        assert!(stored > "2026" && stored > minute.as_str(), "{row}");
        match per_minute.last_mut() {
            Some((m, q)) if *m == minute => *q += row["quantity"].as_i64().unwrap(),
            _ => per_minute.push((minute, row["quantity"].as_i64().unwrap())),
        }
    }
    assert_eq!(
        per_minute,
        [
            ("2025-11-24T16:00:00Z".to_owned(), 5),
            ("2025-11-24T16:01:00Z".to_owned(), 12),
            ("2025-11-24T16:10:00Z".to_owned(), 100),
        ],
        "{late}"
    );
    let (_, metrics) = get(&format!("http://{admin}/metrics"), &[]).await;
    for line in [
        "tidemark_billing_late_batches_total 5\n",
        "tidemark_billing_custom_usage_rejected_total 1\n",
        "tidemark_billing_batches_duplicate_total 3\n",
    ] {
        assert!(metrics.contains(line), "{line}{metrics}");
    }

    // November is billed; then usage for November arrives late.
    let november = finalize(api, "inv_acme_2025-11").await;
    assert_eq!(line(&november, "charge", "requests")["batches"], 5, "{november}");
    let c0 = batch("c", 0, T0 + 20 * MINUTE, vec![usage("acme", 1000, &[])]);
    deliver(ingest, vec![c0]).await;
    wait_billed(api, 1117, &dev).await;

    assert!(dev.terminate().success(), "{}", dev.output());
    let data_dir = format!("--data-dir={}", dir.path().display());
    let november_range = [
        data_dir.as_str(),
        "--from=2025-11-01T00:00:00Z",
        "--to=2025-12-01T00:00:00Z",
    ];
    let (output, stdout, stderr) = reconcile(&november_range);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("rollups match the log: 6 batches, 11 rollup rows"),
        "{stdout}{stderr}"
    );
    for row in [
        "inv_acme_2025-11\trequests\trequests\t5\t6\t1\tnot yet billed\n",
        "inv_acme_2025-11\tgb_seconds\tbilled_duration_us\t0\t0\t1\tproven\n",
    ] {
        assert!(stdout.contains(row), "{row}{stdout}");
    }

    // December's invoice corrects November: proven again, over two lines.
    let mut dev = start_dev(dir.path(), &dev_flags);
    let api = dev.address("billing HTTP API");
    let december = finalize(api, "inv_acme_2025-12").await;
    assert_eq!(line(&december, "correction", "requests")["batches"], 1, "{december}");
    assert!(dev.terminate().success(), "{}", dev.output());
    let months = [
        data_dir.as_str(),
        "--from=2025-11-01T00:00:00Z",
        "--to=2026-01-01T00:00:00Z",
    ];
    let (output, stdout, stderr) = reconcile(&months);
    assert!(output.status.success(), "{stdout}{stderr}");
    for row in [
        "inv_acme_2025-11\trequests\trequests\t6\t6\t2\tproven\n",
        "inv_acme_2025-12\trequests\trequests\t0\t0\t1\tproven\n",
    ] {
        assert!(stdout.contains(row), "{row}{stdout}");
    }

    // An invoice line that bills more batches than the log holds.
    let db = dir.path().join("billing.db");
    tamper(
        &db,
        "UPDATE invoice_line SET batches = batches + 10
         WHERE invoice_id = 'inv_acme_2025-11' AND charge = 'requests'",
    )
    .await;
    let (output, stdout, stderr) = reconcile(&months);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("inv_acme_2025-11\trequests\trequests\t16\t6\t2\tUNPROVEN\n"),
        "{stdout}"
    );
    assert!(stdout.contains("rollups match the log"), "{stdout}");
    assert!(
        stderr.contains("1 finalized charges bill batches the log does not hold"),
        "{stderr}"
    );

    let range = [
        data_dir.as_str(),
        "--from=2025-11-24T16:00:00Z",
        "--to=2025-11-24T16:05:00Z",
    ];
    let (output, stdout, stderr) = reconcile(&range);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("rollups match the log: 4 batches, 9 rollup rows"),
        "{stdout}{stderr}"
    );
    assert!(
        stdout.contains("no finalized month inside the range (2 finalized invoices outside the range"),
        "{stdout}"
    );
    assert!(stdout.contains("3 duplicates"), "{stdout}");
    assert!(stdout.contains("1 custom usage values rejected"), "{stdout}");

    // One rollup row changed behind the ledger's back.
    let minute = T0 + MINUTE;
    tamper(
        &db,
        &format!(
            "UPDATE usage_rollup SET quantity = quantity + 1
             WHERE tenant = 'globex' AND meter = 'tokens' AND minute = {minute}"
        ),
    )
    .await;
    let (output, stdout, stderr) = reconcile(&range);
    assert!(!output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("globex\tshop\ttokens\t2025-11-24T16:01:00Z\t0.000000009\t0.00000001\t1\t1"),
        "{stdout}{stderr}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("globex\t") || l.starts_with("acme\t"))
            .count(),
        1,
        "{stdout}"
    );
    assert!(stderr.contains("1 rollup rows of"), "{stderr}");

    // A range that leaves the changed minute out still matches.
    let (output, stdout, stderr) = reconcile(&[
        data_dir.as_str(),
        "--from=2025-11-24T16:00:00Z",
        "--to=2025-11-24T16:01:00Z",
    ]);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("rollups match the log: 2 batches, 4 rollup rows"),
        "{stdout}"
    );

    // Ranges must be whole minutes; a directory without a log is refused.
    let (output, _, stderr) = reconcile(&[
        data_dir.as_str(),
        "--from=2025-11-24T16:00:30Z",
        "--to=2025-11-24T16:05:00Z",
    ]);
    assert!(!output.status.success() && stderr.contains("whole minutes"), "{stderr}");
    let empty = tempfile::tempdir().unwrap();
    let (output, _, stderr) = reconcile(&[
        &format!("--data-dir={}", empty.path().display()),
        "--from=2025-11-24T16:00:00Z",
        "--to=2025-11-24T16:05:00Z",
    ]);
    assert!(
        !output.status.success() && stderr.contains("holds no usage log"),
        "{stderr}"
    );
}
