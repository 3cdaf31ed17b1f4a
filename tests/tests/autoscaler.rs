//! The autoscaler end to end: a real sidecar under load reports through the
//! collector into Kafka; the collector's autoscaler decides, publishes to the
//! decisions topic, and serves the decision over WatchDecisions and KEDA's
//! external scaler contract.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tidemark_e2e::{Proc, get, kafka_brokers, start_upstream, unique_topic};
use tidemark_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use tidemark_proto::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use tidemark_proto::v1::scaling_client::ScalingClient;
use tidemark_proto::v1::{ScalingDecision, WatchDecisionsRequest};

const POLICY: &str = r#"
[defaults]
targets = { concurrency = 2 }
target_utilization = 1.0
stable_window = "6s"
panic_window = "1s"
max_replicas = 10
instance_startup = "2s"
"#;

/// Keeps `workers` requests to `/slow` (1 s each) in flight until `stop`.
fn hold_concurrency(proxy: SocketAddr, workers: usize, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..workers)
        .map(|_| {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    get(&format!("http://{proxy}/slow"), &[("x-tenant-id", "acme")]).await;
                }
            })
        })
        .collect()
}

/// Waits for the first decision on `watch` that satisfies `want`.
async fn decision_where(
    watch: &mut tonic::Streaming<ScalingDecision>,
    within: Duration,
    want: impl Fn(&ScalingDecision) -> bool,
) -> ScalingDecision {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.message()).await {
            Ok(Ok(Some(d))) if want(&d) => return d,
            Ok(Ok(Some(d))) => seen.push((d.desired_replicas, d.explanation.map(|e| e.summary))),
            other => panic!("no matching decision within {within:?}: {other:?}; saw {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn load_on_a_sidecar_scales_the_service_up_and_back_down_with_explanations() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("scaling.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let collector = Proc::start(
        "tidemark-collector",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--kafka-brokers={}", kafka_brokers()),
            &format!("--usage-topic={}", unique_topic()),
            &format!("--decisions-topic={}", unique_topic()),
            &format!("--autoscaler-group={}", unique_topic()),
            &format!("--scaling-config={}", policy.display()),
        ],
    );
    let grpc = collector.address("ingest gRPC");
    let upstream = start_upstream().await;
    let sidecar = Proc::start(
        "tidemark-sidecar",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--upstream=http://{upstream}"),
            &format!("--collector=http://{grpc}"),
            "--service=shop",
            "--instance=shop-1",
            "--report-interval=250ms",
        ],
    );
    let proxy = sidecar.address("proxy");

    let mut scaling = ScalingClient::connect(format!("http://{grpc}")).await.unwrap();
    let mut watch = scaling
        .watch_decisions(WatchDecisionsRequest {
            services: vec!["shop".into()],
        })
        .await
        .unwrap()
        .into_inner();

    // Light traffic: the service becomes known at its initial scale.
    get(&format!("http://{proxy}/hello"), &[("x-tenant-id", "acme")]).await;
    let first = decision_where(&mut watch, Duration::from_secs(30), |_| true).await;
    assert_eq!((first.service.as_str(), first.desired_replicas), ("shop", 1));

    // 8 requests in flight at a target of 2 per instance: 4 instances.
    let stop = Arc::new(AtomicBool::new(false));
    let workers = hold_concurrency(proxy, 8, Arc::clone(&stop));
    let up = decision_where(&mut watch, Duration::from_secs(20), |d| d.desired_replicas >= 4).await;
    let why = up.explanation.clone().unwrap();
    assert_eq!(up.desired_replicas, 4, "{why:?}");
    assert_eq!(why.metric, "concurrency");
    assert_eq!(why.target_per_instance, 2.0);
    assert_eq!(why.instances_reporting, 1, "{why:?}");
    assert!(why.panic_window_load > 6.0 && why.panic_window_load < 10.0, "{why:?}");
    assert!(!why.summary.is_empty());
    assert!(!up.decision_id.is_empty() && up.decision_id != first.decision_id);

    // KEDA's view, on the same port: the metric is the replica count at a target of 1.
    let mut keda = ExternalScalerClient::connect(format!("http://{grpc}")).await.unwrap();
    let object = ScaledObjectRef {
        name: "shop".into(),
        namespace: "default".into(),
        scaler_metadata: [("service".to_owned(), "shop".to_owned())].into(),
    };
    let metrics = keda
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let value = &metrics.metric_values[0];
    let current = scaling
        .get_decision(tidemark_proto::v1::GetDecisionRequest { service: "shop".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(value.metric_value, i64::from(current.desired_replicas));
    assert_eq!(value.metric_value_float, f64::from(current.desired_replicas));
    assert!(keda.is_active(object).await.unwrap().into_inner().result);

    // The load ends: back to one instance once the stable window has passed.
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let down = decision_where(&mut watch, Duration::from_secs(40), |d| d.desired_replicas == 1).await;
    let why = down.explanation.unwrap();
    assert_eq!(why.mode, "stable", "{why:?}");
    assert!(why.stable_window_load < 2.0, "{why:?}");
}
