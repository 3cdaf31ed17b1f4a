//! KEDA's external scaler (`externalscaler.ExternalScaler`) over the decision
//! board, so that a KEDA `ScaledObject` applies the autoscaler's decisions to
//! a Deployment. The operator's side is in `docs/keda.md`.
//!
//! # Which service
//!
//! The trigger's metadata names it: `scalerMetadata["service"]`, the name the
//! service's sidecars report under. Missing or not a valid name (see
//! [`tidemark_core::ids::validate_name`]): `INVALID_ARGUMENT` naming the key
//! `scalerMetadata.service`, on every call.
//!
//! # The metric
//!
//! `GetMetricSpec` answers one metric, [`metric_name`] of the service
//! (`tidemark-<service>-replicas`, the service lowercased and every character
//! other than `a-z 0-9 - .` turned into `-`, so that it is a valid Kubernetes
//! metric name), with a target of 1 (`targetSize = 1`, `targetSizeFloat = 1.0`).
//! `GetMetrics` answers the latest decision's `desired_replicas`, in both
//! `metricValue` and `metricValueFloat`. The service is always taken from
//! `scalerMetadata.service`; the `metricName` of the request is not needed.
//!
//! KEDA gives the HPA an `AverageValue` target for an external trigger unless
//! the trigger sets `metricType`, and for that target the HPA computes
//! `desired = ceil(value / target) = ceil(replicas / 1)`: exactly the
//! decision's replica count. A trigger with `metricType: Value` would make the
//! HPA multiply by the current count instead; leave `metricType` unset.
//!
//! # No decision yet
//!
//! `GetMetrics` and `IsActive` answer `NOT_FOUND` ("no decision yet for
//! service ...") while the board holds no decision for the service; they never
//! make up a 0. A 0 would read as "scale to the minimum" to the HPA and
//! "inactive" to KEDA, which then scales the target to zero after its
//! `cooldownPeriod`: a typo in `service`, or a collector that has just started
//! and not yet re-read `tidemark.decisions.v1`, would take a serving service
//! down. An error is what KEDA is built to handle: it leaves the replica count
//! as it is, marks the ScaledObject not ready (`TriggerError`), records the
//! message as a `KEDAScalerFailed` event, and applies the ScaledObject's
//! `fallback.replicas` after `fallback.failureThreshold` failures if one is
//! set. The message names the service and says what to check, so a typo
//! shows up in `kubectl describe scaledobject`. Each such answer is also
//! logged at debug level.
//!
//! `StreamIsActive` for a service with no decision yet sends nothing until the
//! first decision arrives (the polling calls above surface a typo meanwhile).
//!
//! # Activity, scale to and from zero
//!
//! `IsActive` is `desired_replicas > 0`. `StreamIsActive` (trigger type
//! `external-push`) sends the current state, then one message each time the
//! state flips, until the client goes away; decisions that leave it unchanged
//! send nothing. KEDA scales a target from 0 to `max(minReplicaCount, 1)` when
//! the trigger turns active and hands over to the HPA from there; it scales to
//! 0 (with `minReplicaCount: 0`) once the trigger has been inactive for
//! `cooldownPeriod` (300 s by default). The autoscaler has already waited out
//! its own scale-to-zero grace before it decides 0, so a short `cooldownPeriod`
//! avoids waiting twice.
//!
//! # HPA tolerance: set it to 0 for exact replica counts
//!
//! The HPA leaves the replica count alone while `|value / (target × current) − 1|`
//! is within its tolerance, 0.1 by default. Here that ratio is
//! `desired / current`, so a decision within ±10 % of the current count is
//! ignored: 10 → 11 or 10 → 9 never happens, and at 40 replicas nothing within
//! ±4 does. For exact counts set the tolerance to 0, either per HPA through
//! the ScaledObject (`spec.advanced.horizontalPodAutoscalerConfig.behavior.
//! scaleUp.tolerance: 0` and `scaleDown.tolerance: 0`; Kubernetes 1.33 and
//! later with the `HPAConfigurableTolerance` feature gate, alpha in 1.33, and a
//! KEDA whose CRD carries the field) or for the whole cluster with
//! kube-controller-manager's `--horizontal-pod-autoscaler-tolerance=0`. With
//! tolerance 0 the HPA still does nothing when the decision equals the current
//! count. The HPA's own scale-down stabilization (300 s) and scale-up rate
//! limits also apply on top of the decision; `docs/keda.md` shows the settings
//! that leave the decision alone.
//!
//! KEDA's newer `StreamMetricSpec` call is not part of this service: tonic
//! answers it `UNIMPLEMENTED`, which KEDA takes as "not supported" and skips.

use std::pin::Pin;
use std::sync::Arc;

use tidemark_proto::externalscaler::external_scaler_server::ExternalScaler;
use tidemark_proto::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec, MetricValue,
    ScaledObjectRef,
};
use tidemark_proto::v1::ScalingDecision;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::board::DecisionBoard;
use crate::scaling_service::{Newest, checked_name, quoted};

/// The key of `scalerMetadata` that names the service.
pub const SERVICE_KEY: &str = "service";

/// Messages buffered per `StreamIsActive` stream.
const ACTIVE_BUFFER: usize = 8;

/// The metric a ScaledObject's HPA follows for `service`: stable for a given
/// service, and a valid Kubernetes metric name whatever the service is called.
pub fn metric_name(service: &str) -> String {
    let mut name = String::with_capacity(service.len() + "tidemark--replicas".len());
    name.push_str("tidemark-");
    name.extend(service.chars().map(|c| match c.to_ascii_lowercase() {
        c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
        _ => '-',
    }));
    name.push_str("-replicas");
    name
}

/// Serves the decision board as a KEDA external scaler.
#[derive(Debug, Clone)]
pub struct KedaScaler {
    board: Arc<DecisionBoard>,
}

impl KedaScaler {
    pub fn new(board: Arc<DecisionBoard>) -> KedaScaler {
        KedaScaler { board }
    }

    /// The latest decision for the ScaledObject's service, `NOT_FOUND` if none.
    fn latest(&self, scaled_object: &ScaledObjectRef) -> Result<ScalingDecision, Status> {
        let service = service_of(scaled_object)?;
        self.board.get(service).ok_or_else(|| {
            tracing::debug!(
                service,
                scaled_object = %scaled_object_name(scaled_object),
                "KEDA asked about a service without a decision"
            );
            Status::not_found(format!(
                "no decision yet for service {} (scalerMetadata.service of ScaledObject {}): check that it is the \
                 name the service's sidecars report under; the replica count is left as it is until a decision exists",
                quoted(service),
                scaled_object_name(scaled_object),
            ))
        })
    }
}

/// The service a ScaledObject names in its trigger metadata.
fn service_of(scaled_object: &ScaledObjectRef) -> Result<&str, Status> {
    let field = format!("scalerMetadata.{SERVICE_KEY}");
    let Some(service) = scaled_object.scaler_metadata.get(SERVICE_KEY) else {
        return Err(Status::invalid_argument(format!(
            "{field} is missing: set the trigger's metadata `{SERVICE_KEY}` of ScaledObject {} to the Tidemark \
             service name",
            scaled_object_name(scaled_object)
        )));
    };
    checked_name(&field, service)?;
    Ok(service)
}

fn scaled_object_name(scaled_object: &ScaledObjectRef) -> String {
    format!("{}/{}", scaled_object.namespace, scaled_object.name)
}

fn is_active(decision: &ScalingDecision) -> bool {
    decision.desired_replicas > 0
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for KedaScaler {
    type StreamIsActiveStream = ActiveStream;

    async fn is_active(&self, request: Request<ScaledObjectRef>) -> Result<Response<IsActiveResponse>, Status> {
        let decision = self.latest(request.get_ref())?;
        Ok(Response::new(IsActiveResponse {
            result: is_active(&decision),
        }))
    }

    async fn stream_is_active(&self, request: Request<ScaledObjectRef>) -> Result<Response<ActiveStream>, Status> {
        let service = service_of(request.get_ref())?.to_owned();
        // Subscribed before the board is read: no flip can fall in between.
        let feed = self.board.subscribe();
        let (tx, rx) = mpsc::channel(ACTIVE_BUFFER);
        tokio::spawn(stream_activity(self.board.clone(), service, feed, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let service = service_of(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: metric_name(service),
                target_size: 1,
                target_size_float: 1.0,
            }],
        }))
    }

    async fn get_metrics(&self, request: Request<GetMetricsRequest>) -> Result<Response<GetMetricsResponse>, Status> {
        let Some(scaled_object) = request.get_ref().scaled_object_ref.as_ref() else {
            return Err(Status::invalid_argument("scaledObjectRef is missing"));
        };
        let decision = self.latest(scaled_object)?;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: metric_name(&decision.service),
                metric_value: i64::from(decision.desired_replicas),
                metric_value_float: f64::from(decision.desired_replicas),
            }],
        }))
    }
}

/// What one `StreamIsActive` stream has told its client.
#[derive(Debug, Default)]
struct Activity {
    newest: Newest,
    sent: Option<bool>,
}

impl Activity {
    /// The state to send for `decision`, if it is newer than any seen and
    /// flips (or first sets) the state.
    fn observe(&mut self, decision: &ScalingDecision) -> Option<bool> {
        if !self.newest.advance(decision) {
            return None;
        }
        let active = is_active(decision);
        (self.sent != Some(active)).then(|| {
            self.sent = Some(active);
            active
        })
    }
}

type ActiveOutbox = mpsc::Sender<Result<IsActiveResponse, Status>>;

/// Feeds one `StreamIsActive` stream until its client goes away.
async fn stream_activity(
    board: Arc<DecisionBoard>,
    service: String,
    mut feed: broadcast::Receiver<ScalingDecision>,
    tx: ActiveOutbox,
) {
    tracing::debug!(service, "KEDA activity stream started");
    let mut activity = Activity::default();
    let mut current = board.get(&service);
    loop {
        if let Some(active) = current.as_ref().and_then(|d| activity.observe(d))
            && tx.send(Ok(IsActiveResponse { result: active })).await.is_err()
        {
            break;
        }
        let next = tokio::select! {
            _ = tx.closed() => break,
            next = feed.recv() => next,
        };
        current = match next {
            Ok(decision) if decision.service == service => Some(decision),
            Ok(_) => None,
            Err(RecvError::Lagged(missed)) => {
                tracing::debug!(
                    service,
                    missed,
                    "KEDA activity stream fell behind the feed; rereading the board"
                );
                board.get(&service)
            }
            Err(RecvError::Closed) => {
                let _ = tx.send(Err(Status::unavailable("the decision board closed"))).await;
                break;
            }
        };
    }
    tracing::debug!(service, "KEDA activity stream ended");
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(5);

    fn decision(service: &str, id: &str, at: i64, replicas: u32) -> ScalingDecision {
        ScalingDecision {
            decision_id: id.into(),
            service: service.into(),
            decided_at_unix_micros: at,
            desired_replicas: replicas,
            ..ScalingDecision::default()
        }
    }

    fn scaled_object(metadata: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: "web".into(),
            namespace: "shop".into(),
            scaler_metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn metrics_request(service: &str) -> Request<GetMetricsRequest> {
        Request::new(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&[(SERVICE_KEY, service)])),
            metric_name: metric_name(service),
        })
    }

    async fn next_state(stream: &mut ActiveStream) -> bool {
        let item = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("a state in time");
        item.expect("stream open").expect("a state, not an error").result
    }

    async fn quiet(stream: &mut ActiveStream) {
        let more = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(more.is_err(), "unexpected {more:?}");
    }

    #[test]
    fn metric_names_are_valid_and_stable() {
        assert_eq!(metric_name("checkout"), "tidemark-checkout-replicas");
        assert_eq!(
            metric_name("Shop_API:v2@eu/1.0"),
            "tidemark-shop-api-v2-eu-1.0-replicas"
        );
        assert_eq!(metric_name("checkout"), metric_name("checkout"));
        let name = metric_name("A.b_C:d@e/f-9");
        assert!(
            name.chars().all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '.')),
            "{name}"
        );
    }

    #[test]
    fn activity_sends_the_first_state_and_flips_only() {
        let mut activity = Activity::default();
        assert_eq!(activity.observe(&decision("a", "1", 1, 0)), Some(false));
        assert_eq!(activity.observe(&decision("a", "2", 2, 0)), None);
        assert_eq!(activity.observe(&decision("a", "3", 3, 2)), Some(true));
        assert_eq!(activity.observe(&decision("a", "4", 4, 5)), None);
        assert_eq!(
            activity.observe(&decision("a", "0", 0, 0)),
            None,
            "older decision ignored"
        );
        assert_eq!(activity.observe(&decision("a", "5", 5, 0)), Some(false));
    }

    #[tokio::test]
    async fn the_service_comes_from_scaler_metadata() {
        let scaler = KedaScaler::new(DecisionBoard::new());
        for metadata in [vec![], vec![("other", "x")]] {
            let status = scaler
                .get_metric_spec(Request::new(scaled_object(&metadata)))
                .await
                .expect_err("missing");
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().starts_with("scalerMetadata.service is missing"),
                "{}",
                status.message()
            );
            assert!(status.message().contains("shop/web"), "{}", status.message());
        }
        let status = scaler
            .is_active(Request::new(scaled_object(&[(SERVICE_KEY, "bad name")])))
            .await
            .expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status
                .message()
                .starts_with("scalerMetadata.service \"bad name\" contains ' '"),
            "{}",
            status.message()
        );
        let status = scaler
            .get_metrics(Request::new(GetMetricsRequest {
                scaled_object_ref: None,
                metric_name: String::new(),
            }))
            .await
            .expect_err("no ref");
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn metric_spec_targets_one_replica_per_unit() {
        let scaler = KedaScaler::new(DecisionBoard::new());
        let spec = scaler
            .get_metric_spec(Request::new(scaled_object(&[(SERVICE_KEY, "checkout")])))
            .await
            .expect("spec")
            .into_inner();
        assert_eq!(
            spec.metric_specs,
            [MetricSpec {
                metric_name: "tidemark-checkout-replicas".into(),
                target_size: 1,
                target_size_float: 1.0,
            }]
        );
    }

    #[tokio::test]
    async fn metrics_and_activity_follow_the_latest_decision() {
        let board = DecisionBoard::new();
        let scaler = KedaScaler::new(board.clone());
        let missing = scaler
            .get_metrics(metrics_request("checkout"))
            .await
            .expect_err("none yet");
        assert_eq!(missing.code(), Code::NotFound);
        assert!(
            missing
                .message()
                .starts_with("no decision yet for service \"checkout\""),
            "{}",
            missing.message()
        );
        let missing = scaler
            .is_active(Request::new(scaled_object(&[(SERVICE_KEY, "checkout")])))
            .await
            .expect_err("none yet");
        assert_eq!(missing.code(), Code::NotFound);

        for (at, replicas) in [(1, 0), (2, 3), (3, 12)] {
            board.publish(decision("checkout", &at.to_string(), at, replicas));
            let values = scaler
                .get_metrics(metrics_request("checkout"))
                .await
                .expect("metrics")
                .into_inner();
            assert_eq!(
                values.metric_values,
                [MetricValue {
                    metric_name: "tidemark-checkout-replicas".into(),
                    metric_value: i64::from(replicas),
                    metric_value_float: f64::from(replicas),
                }]
            );
            let active = scaler
                .is_active(Request::new(scaled_object(&[(SERVICE_KEY, "checkout")])))
                .await
                .expect("active")
                .into_inner();
            assert_eq!(active.result, replicas > 0);
        }
    }

    #[tokio::test]
    async fn stream_is_active_waits_for_a_first_decision_then_sends_flips() {
        let board = DecisionBoard::new();
        let scaler = KedaScaler::new(board.clone());
        let mut stream = scaler
            .stream_is_active(Request::new(scaled_object(&[(SERVICE_KEY, "a")])))
            .await
            .expect("stream")
            .into_inner();
        quiet(&mut stream).await;
        board.publish(decision("a", "1", 1, 2));
        assert!(next_state(&mut stream).await);
        board.publish(decision("a", "2", 2, 4));
        board.publish(decision("b", "1", 1, 0));
        quiet(&mut stream).await;
        board.publish(decision("a", "3", 3, 0));
        assert!(!next_state(&mut stream).await);
    }

    /// After a lag the stream rereads the board: a flip pushed out of the
    /// feed by other services' decisions still arrives, and the lost part of
    /// the feed is not replayed.
    #[tokio::test]
    async fn a_lagging_activity_stream_rereads_the_board() {
        let board = DecisionBoard::new();
        let scaler = KedaScaler::new(board.clone());
        board.publish(decision("a", "0", 0, 1));
        let mut stream = scaler
            .stream_is_active(Request::new(scaled_object(&[(SERVICE_KEY, "a")])))
            .await
            .expect("stream")
            .into_inner();
        assert!(next_state(&mut stream).await);
        // The stream task waits on the feed and does not run again until
        // this test awaits (single-threaded test runtime): "a" flips, then
        // the burst for "b" pushes the flip out of the feed.
        board.publish(decision("a", "1", 1, 0));
        for at in 1..=3000 {
            board.publish(decision("b", &at.to_string(), at, 1));
        }
        assert!(!next_state(&mut stream).await);
        quiet(&mut stream).await;
        board.publish(decision("a", "2", 2, 7));
        assert!(next_state(&mut stream).await);
    }

    #[tokio::test]
    async fn the_activity_stream_ends_when_the_client_goes_away() {
        let board = DecisionBoard::new();
        let (tx, rx) = mpsc::channel(ACTIVE_BUFFER);
        let task = tokio::spawn(stream_activity(board.clone(), "a".into(), board.subscribe(), tx));
        tokio::task::yield_now().await;
        drop(rx);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("ends without any decision published")
            .expect("no panic");
    }

    #[test]
    fn unused_metadata_is_ignored() {
        let mut metadata = HashMap::new();
        metadata.insert(SERVICE_KEY.to_string(), "a".to_string());
        metadata.insert("scalerAddress".to_string(), "collector:7400".to_string());
        let scaled_object = ScaledObjectRef {
            scaler_metadata: metadata,
            ..ScaledObjectRef::default()
        };
        assert_eq!(service_of(&scaled_object).expect("valid"), "a");
    }
}
