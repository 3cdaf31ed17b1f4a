//! The Scaling service and the KEDA external scaler over real gRPC: a tonic
//! server on a loopback port, the generated clients, decisions published on
//! the board while the clients watch.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tidemark_collector::board::DecisionBoard;
use tidemark_collector::keda::KedaScaler;
use tidemark_collector::scaling_service::ScalingService;
use tidemark_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use tidemark_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use tidemark_proto::externalscaler::{GetMetricsRequest, IsActiveResponse, ScaledObjectRef};
use tidemark_proto::v1::scaling_client::ScalingClient;
use tidemark_proto::v1::scaling_server::ScalingServer;
use tidemark_proto::v1::{GetDecisionRequest, ScalingDecision, WatchDecisionsRequest};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Streaming};

/// Longest wait for anything that should happen.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(200);

/// Both services on 127.0.0.1:0; the server stops with the test's runtime.
async fn serve(board: Arc<DecisionBoard>) -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(ScalingServer::new(ScalingService::new(board.clone())))
            .add_service(ExternalScalerServer::new(KedaScaler::new(board)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    within(Endpoint::from_shared(format!("http://{address}")).unwrap().connect())
        .await
        .unwrap()
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future).await.expect("timed out")
}

fn decision(service: &str, id: &str, at: i64, replicas: u32) -> ScalingDecision {
    ScalingDecision {
        decision_id: id.into(),
        service: service.into(),
        decided_at_unix_micros: at,
        desired_replicas: replicas,
        previous_replicas: 0,
        explanation: None,
    }
}

fn scaled_object(service: Option<&str>) -> ScaledObjectRef {
    let mut metadata = HashMap::from([("scalerAddress".to_string(), "collector:7400".to_string())]);
    if let Some(service) = service {
        metadata.insert("service".into(), service.into());
    }
    ScaledObjectRef {
        name: "web".into(),
        namespace: "shop".into(),
        scaler_metadata: metadata,
    }
}

async fn next_decision(stream: &mut Streaming<ScalingDecision>) -> ScalingDecision {
    within(stream.message()).await.unwrap().expect("stream open")
}

async fn next_state(stream: &mut Streaming<IsActiveResponse>) -> bool {
    within(stream.message()).await.unwrap().expect("stream open").result
}

/// Nothing arrives on `stream` for a while.
async fn assert_quiet<T: std::fmt::Debug>(stream: &mut Streaming<T>) {
    if let Ok(more) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("expected nothing more, got {more:?}");
    }
}

#[tokio::test]
async fn watch_decisions_sends_the_filtered_snapshot_then_live_updates() {
    let board = DecisionBoard::new();
    board.publish(decision("checkout", "c1", 10, 2));
    board.publish(decision("search", "s1", 10, 4));
    board.publish(decision("cart", "k1", 10, 1));
    let mut client = ScalingClient::new(serve(board.clone()).await);

    let mut watched = within(client.watch_decisions(WatchDecisionsRequest {
        services: vec!["search".into(), "checkout".into(), "payments".into()],
    }))
    .await
    .unwrap()
    .into_inner();
    let mut everything = within(client.watch_decisions(WatchDecisionsRequest { services: vec![] }))
        .await
        .unwrap()
        .into_inner();

    // Snapshot: the latest decision of each watched service that has one, by name.
    assert_eq!(next_decision(&mut watched).await.decision_id, "c1");
    assert_eq!(next_decision(&mut watched).await.decision_id, "s1");
    assert_quiet(&mut watched).await;
    for id in ["k1", "c1", "s1"] {
        assert_eq!(next_decision(&mut everything).await.decision_id, id);
    }

    // Live: only the watched services, in order, nothing stale or repeated.
    board.publish(decision("cart", "k2", 20, 3));
    board.publish(decision("checkout", "c2", 20, 5));
    board.publish(decision("checkout", "c0", 5, 9)); // older than c2: the board keeps c2, nothing is sent
    board.publish(decision("payments", "p1", 20, 1));
    board.publish(decision("search", "s2", 20, 0));
    let live: Vec<_> = [
        next_decision(&mut watched).await,
        next_decision(&mut watched).await,
        next_decision(&mut watched).await,
    ]
    .into_iter()
    .map(|d| (d.decision_id, d.desired_replicas))
    .collect();
    assert_eq!(
        live,
        [("c2".to_string(), 5), ("p1".to_string(), 1), ("s2".to_string(), 0)]
    );
    assert_quiet(&mut watched).await;
    for id in ["k2", "c2", "p1", "s2"] {
        assert_eq!(next_decision(&mut everything).await.decision_id, id);
    }
}

#[tokio::test]
async fn watch_decisions_refuses_a_bad_service_name() {
    let mut client = ScalingClient::new(serve(DecisionBoard::new()).await);
    let status = within(client.watch_decisions(WatchDecisionsRequest {
        services: vec!["checkout".into(), "check out".into()],
    }))
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("services[1] \"check out\""),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn get_decision_found_not_found_and_invalid() {
    let board = DecisionBoard::new();
    board.publish(decision("checkout", "c1", 10, 2));
    board.publish(decision("checkout", "c2", 20, 6));
    let mut client = ScalingClient::new(serve(board).await);

    let found = within(client.get_decision(GetDecisionRequest {
        service: "checkout".into(),
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!((found.decision_id.as_str(), found.desired_replicas), ("c2", 6));

    let missing = within(client.get_decision(GetDecisionRequest {
        service: "search".into(),
    }))
    .await
    .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), "no decision yet for service \"search\"");

    let invalid = within(client.get_decision(GetDecisionRequest { service: "".into() }))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().starts_with("service \"\" is empty"),
        "{}",
        invalid.message()
    );
}

#[tokio::test]
async fn keda_metric_spec_and_metrics_follow_the_decisions() {
    let board = DecisionBoard::new();
    let mut keda = ExternalScalerClient::new(serve(board.clone()).await);

    let spec = within(keda.get_metric_spec(scaled_object(Some("checkout"))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1);
    let spec = &spec.metric_specs[0];
    assert_eq!(spec.metric_name, "tidemark-checkout-replicas");
    assert_eq!((spec.target_size, spec.target_size_float), (1, 1.0));

    let request = || GetMetricsRequest {
        scaled_object_ref: Some(scaled_object(Some("checkout"))),
        metric_name: "tidemark-checkout-replicas".into(),
    };
    let missing = within(keda.get_metrics(request())).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "no decision yet is an error, not 0");
    assert!(missing.message().contains("\"checkout\""), "{}", missing.message());

    for (at, replicas) in [(1, 3), (2, 17), (3, 0)] {
        board.publish(decision("checkout", &format!("c{at}"), at, replicas));
        let values = within(keda.get_metrics(request())).await.unwrap().into_inner();
        assert_eq!(values.metric_values.len(), 1);
        let value = &values.metric_values[0];
        assert_eq!(value.metric_name, "tidemark-checkout-replicas");
        assert_eq!(value.metric_value, i64::from(replicas));
        assert_eq!(value.metric_value_float, f64::from(replicas));
    }
}

#[tokio::test]
async fn keda_is_active_at_three_not_at_zero() {
    let board = DecisionBoard::new();
    let mut keda = ExternalScalerClient::new(serve(board.clone()).await);
    board.publish(decision("checkout", "c1", 1, 0));
    let active = within(keda.is_active(scaled_object(Some("checkout")))).await.unwrap();
    assert!(!active.into_inner().result);
    board.publish(decision("checkout", "c2", 2, 3));
    let active = within(keda.is_active(scaled_object(Some("checkout")))).await.unwrap();
    assert!(active.into_inner().result);
}

#[tokio::test]
async fn keda_stream_is_active_emits_on_flips_only() {
    let board = DecisionBoard::new();
    board.publish(decision("checkout", "c1", 1, 0));
    let mut keda = ExternalScalerClient::new(serve(board.clone()).await);
    let mut stream = within(keda.stream_is_active(scaled_object(Some("checkout"))))
        .await
        .unwrap()
        .into_inner();

    assert!(!next_state(&mut stream).await, "current state first");
    board.publish(decision("checkout", "c2", 2, 0));
    board.publish(decision("search", "s1", 2, 5));
    assert_quiet(&mut stream).await;
    board.publish(decision("checkout", "c3", 3, 3));
    assert!(next_state(&mut stream).await);
    board.publish(decision("checkout", "c4", 4, 8));
    board.publish(decision("checkout", "c5", 5, 1));
    assert_quiet(&mut stream).await;
    board.publish(decision("checkout", "c6", 6, 0));
    assert!(!next_state(&mut stream).await);
    assert_quiet(&mut stream).await;
}

#[tokio::test]
async fn keda_refuses_a_missing_or_invalid_service_naming_the_key() {
    let mut keda = ExternalScalerClient::new(serve(DecisionBoard::new()).await);
    let expect_refused = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("scalerMetadata.service"),
            "{}",
            status.message()
        );
    };
    expect_refused(within(keda.get_metric_spec(scaled_object(None))).await.unwrap_err());
    expect_refused(within(keda.is_active(scaled_object(None))).await.unwrap_err());
    expect_refused(within(keda.stream_is_active(scaled_object(None))).await.unwrap_err());
    expect_refused(
        within(keda.get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(None)),
            metric_name: String::new(),
        }))
        .await
        .unwrap_err(),
    );
    expect_refused(
        within(keda.is_active(scaled_object(Some("not valid!"))))
            .await
            .unwrap_err(),
    );
}
