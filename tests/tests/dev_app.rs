//! `tidemark dev` running a real elastic service: a load step through the
//! entry port scales the demo app up (real processes, each behind its own
//! sidecar) and back down, every decision explains itself, and the running
//! invoice counts exactly the requests that were answered.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tidemark_e2e::{get, start_dev};
use tidemark_proto::v1::scaling_client::ScalingClient;
use tidemark_proto::v1::{ScalingDecision, WatchDecisionsRequest};

const POLICY: &str = r#"
[services.demo]
targets = { concurrency = 2 }
target_utilization = 1.0
stable_window = "6s"
panic_window = "1s"
instance_startup = "2s"
max_replicas = 4
"#;

async fn next_where(
    watch: &mut tonic::Streaming<ScalingDecision>,
    within: Duration,
    want: impl Fn(&ScalingDecision) -> bool,
) -> ScalingDecision {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.message()).await {
            Ok(Ok(Some(d))) if want(&d) => return d,
            Ok(Ok(Some(_))) => {}
            other => panic!("no matching decision within {within:?}: {other:?}"),
        }
    }
}

fn count(output: &str, needle: &str) -> usize {
    output.lines().filter(|l| l.contains(needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_step_scales_the_demo_app_up_and_down_and_the_invoice_counts_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("scaling.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut dev = start_dev(
        &dir.path().join("data"),
        &[
            "--entry-listen=127.0.0.1:0",
            "--demo-work=200ms",
            &format!("--scaling-config={}", policy.display()),
        ],
    );
    let entry = dev.address("entry HTTP (the app's instances)");
    let grpc = dev.address("ingest gRPC");
    let api = dev.address("billing HTTP API");
    let mut watch = ScalingClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
        .watch_decisions(WatchDecisionsRequest {
            services: vec!["demo".into()],
        })
        .await
        .unwrap()
        .into_inner();
    next_where(&mut watch, Duration::from_secs(30), |d| d.desired_replicas == 1).await;

    // 8 requests in flight at 2 per instance: the service needs 4.
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (answered, stop) = (Arc::clone(&answered), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, _) = get(&format!("http://{entry}/work"), &[("x-tenant-id", "acme")]).await;
                    assert_eq!(status, StatusCode::OK);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let up = next_where(&mut watch, Duration::from_secs(30), |d| d.desired_replicas >= 3).await;
    let why = up.explanation.unwrap();
    assert_eq!(why.metric, "concurrency", "{why:?}");
    assert!(!why.summary.is_empty());
    // Real processes: each instance is an app and a sidecar, and they answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&dev.output(), "instance ready") < 3 {
        assert!(
            Instant::now() < deadline,
            "instances never became ready:\n{}",
            dev.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    let down = next_where(&mut watch, Duration::from_secs(60), |d| d.desired_replicas == 1).await;
    assert_eq!(down.explanation.unwrap().mode, "stable");
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&dev.output(), "instance stopped") < 2 {
        assert!(Instant::now() < deadline, "instances never stopped:\n{}", dev.output());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The running invoice counts every answered request, once.
    let sent = answered.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(&format!("http://{api}/v1/tenants/acme/cost"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        let requests = json["lines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["charge"] == "requests")
            .map(|l| l["usage"].as_str().unwrap().to_owned());
        if requests.as_deref() == Some(sent.to_string().as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "billed {requests:?}, sent {sent}: {json}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = dev.terminate();
    assert!(status.success(), "{}", dev.output());
    assert!(
        count(&dev.output(), "local orchestrator stopped") == 1,
        "every instance stopped with dev:\n{}",
        dev.output()
    );
}
