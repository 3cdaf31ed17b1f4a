//! The webhook hook: each decision as a signed JSON `POST`, retried with
//! jittered exponential backoff until the receiver takes it, refuses it, a
//! newer decision replaces it, or the attempts run out.
//!
//! Headers: `content-type: application/json`, `x-tidemark-decision-id` (the
//! idempotency key), `x-tidemark-signature: sha256=<hex HMAC-SHA256 of the
//! body>`, `x-tidemark-timestamp` (unix seconds when sent), and
//! `x-tidemark-attempt` (1, 2, ...). Only `http://` URLs: the collector links
//! no TLS client for hooks.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tidemark_proto::v1::{DecisionExplanation, MetricLoad, ScalingDecision};
use tidemark_runtime::shutdown::Shutdown;
use tokio::task::JoinHandle;

use super::{Follow, HookConfigError, duration};
use crate::board::DecisionBoard;

/// Header carrying the decision id: receivers apply a decision once.
pub const DECISION_ID_HEADER: &str = "x-tidemark-decision-id";
/// Header carrying `sha256=<hex HMAC-SHA256 of the exact body>`.
pub const SIGNATURE_HEADER: &str = "x-tidemark-signature";
/// Header carrying the unix time, in seconds, the attempt was sent.
pub const TIMESTAMP_HEADER: &str = "x-tidemark-timestamp";
/// Header carrying the attempt number, from 1.
pub const ATTEMPT_HEADER: &str = "x-tidemark-attempt";

/// The `[services.<name>.webhook]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// Where decisions are posted; `http://` only.
    pub url: String,
    /// The HMAC key (or name it with `secret_env`).
    #[serde(default)]
    pub secret: Option<Secret>,
    /// Environment variable holding the HMAC key.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Longest wait for one attempt, connecting included (default 5s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Attempts per decision, the first included (default 10).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles each time (default 200ms).
    #[serde(default = "default_initial_backoff", deserialize_with = "duration")]
    pub initial_backoff: Duration,
    /// Longest wait between attempts (default 30s).
    #[serde(default = "default_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_attempts() -> u32 {
    10
}

fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl WebhookSpec {
    /// A spec with the defaults, posting to `url` signed with `secret`.
    pub fn new(url: impl Into<String>, secret: impl Into<String>) -> WebhookSpec {
        WebhookSpec {
            url: url.into(),
            secret: Some(Secret(secret.into())),
            secret_env: None,
            timeout: default_timeout(),
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }

    pub fn validate(&self) -> Result<(), HookConfigError> {
        parse_url(&self.url)?;
        match (&self.secret, &self.secret_env) {
            (Some(_), Some(_)) => {
                return Err(HookConfigError::new(
                    "webhook.secret",
                    "set either webhook.secret or webhook.secret_env, not both",
                ));
            }
            (None, None) => {
                return Err(HookConfigError::new(
                    "webhook.secret",
                    "required (or webhook.secret_env naming an environment variable): the HMAC key that signs each body",
                ));
            }
            (Some(secret), None) if secret.0.is_empty() => {
                return Err(HookConfigError::new("webhook.secret", "must not be empty"));
            }
            (None, Some(name)) if name.is_empty() || name.contains('=') || name.contains('\0') => {
                return Err(HookConfigError::new(
                    "webhook.secret_env",
                    "must name an environment variable",
                ));
            }
            _ => {}
        }
        if self.timeout.is_zero() {
            return Err(HookConfigError::new("webhook.timeout", "must be more than 0s"));
        }
        if self.max_attempts == 0 {
            return Err(HookConfigError::new("webhook.max_attempts", "must be at least 1"));
        }
        if self.initial_backoff.is_zero() {
            return Err(HookConfigError::new("webhook.initial_backoff", "must be more than 0s"));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(HookConfigError::new(
                "webhook.max_backoff",
                format!(
                    "{} is less than webhook.initial_backoff ({})",
                    humantime::format_duration(self.max_backoff),
                    humantime::format_duration(self.initial_backoff)
                ),
            ));
        }
        Ok(())
    }

    /// The spec with the URL parsed and the key read (from the environment
    /// for `secret_env`).
    pub(crate) fn resolve(self) -> Result<ResolvedWebhook, HookConfigError> {
        self.validate()?;
        let uri = parse_url(&self.url)?;
        let key = match (&self.secret, &self.secret_env) {
            (Some(secret), _) => secret.0.clone().into_bytes(),
            (None, Some(name)) => match std::env::var(name) {
                Ok(value) if !value.is_empty() => value.into_bytes(),
                Ok(_) => {
                    return Err(HookConfigError::new(
                        "webhook.secret_env",
                        format!("environment variable {name} is empty"),
                    ));
                }
                Err(e) => {
                    return Err(HookConfigError::new(
                        "webhook.secret_env",
                        format!("environment variable {name}: {e}"),
                    ));
                }
            },
            (None, None) => return Err(HookConfigError::new("webhook.secret", "required")),
        };
        Ok(ResolvedWebhook {
            uri,
            key,
            timeout: self.timeout,
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
        })
    }
}

fn parse_url(url: &str) -> Result<Uri, HookConfigError> {
    let key = "webhook.url";
    let uri: Uri = url
        .parse()
        .map_err(|e| HookConfigError::new(key, format!("{url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(HookConfigError::new(
                key,
                "must be http://: https:// is not supported (the collector has no TLS client for hooks); \
                 put a TLS-terminating proxy on this machine in between",
            ));
        }
        _ => return Err(HookConfigError::new(key, "must be an http:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(HookConfigError::new(key, "must name a host"));
    }
    Ok(uri)
}

/// A webhook ready to run: URL parsed, key read.
#[derive(Clone)]
pub(crate) struct ResolvedWebhook {
    uri: Uri,
    key: Vec<u8>,
    timeout: Duration,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl fmt::Debug for ResolvedWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedWebhook")
            .field("uri", &self.uri)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// What the webhook did, counted since it started.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Requests sent (or tried: connect errors count).
    pub attempts: AtomicU64,
    /// Decisions the receiver took (2xx).
    pub delivered: AtomicU64,
    /// Decisions the receiver refused for good (a status other than 2xx,
    /// 429 and 5xx); not retried.
    pub rejected: AtomicU64,
    /// Decisions given up after `max_attempts` failed attempts.
    pub exhausted: AtomicU64,
    /// Decisions dropped while being retried because a newer one came.
    pub superseded: AtomicU64,
}

impl WebhookStats {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The JSON body of a webhook request: the decision, with its explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionPayload {
    pub decision_id: String,
    pub service: String,
    pub desired_replicas: u32,
    pub previous_replicas: u32,
    /// RFC 3339, UTC, microseconds.
    pub decided_at: String,
    pub decided_at_unix_micros: i64,
    pub explanation: ExplanationPayload,
}

/// [`DecisionExplanation`] as JSON (see `scaling.proto` for each field).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExplanationPayload {
    pub mode: String,
    pub metric: String,
    pub target_per_instance: f64,
    pub target_utilization: f64,
    pub stable_window_load: f64,
    pub panic_window_load: f64,
    pub stable_window_seconds: f64,
    pub panic_window_seconds: f64,
    pub instances_reporting: u32,
    pub instances_ready: u32,
    pub instances_late: u32,
    pub instances_gone: u32,
    pub instances_starting: u32,
    pub bound_by: String,
    pub unbounded_replicas: u32,
    pub metrics: Vec<MetricLoadPayload>,
    pub summary: String,
}

/// [`MetricLoad`] as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricLoadPayload {
    pub metric: String,
    pub target_per_instance: f64,
    pub stable_window_load: f64,
    pub panic_window_load: f64,
    pub desired_replicas: u32,
}

impl From<&ScalingDecision> for DecisionPayload {
    fn from(d: &ScalingDecision) -> DecisionPayload {
        let micros = u64::try_from(d.decided_at_unix_micros).unwrap_or(0);
        let decided_at = UNIX_EPOCH + Duration::from_micros(micros);
        DecisionPayload {
            decision_id: d.decision_id.clone(),
            service: d.service.clone(),
            desired_replicas: d.desired_replicas,
            previous_replicas: d.previous_replicas,
            decided_at: humantime::format_rfc3339_micros(decided_at).to_string(),
            decided_at_unix_micros: d.decided_at_unix_micros,
            explanation: d.explanation.as_ref().map(ExplanationPayload::from).unwrap_or_default(),
        }
    }
}

impl From<&DecisionExplanation> for ExplanationPayload {
    fn from(e: &DecisionExplanation) -> ExplanationPayload {
        ExplanationPayload {
            mode: e.mode.clone(),
            metric: e.metric.clone(),
            target_per_instance: e.target_per_instance,
            target_utilization: e.target_utilization,
            stable_window_load: e.stable_window_load,
            panic_window_load: e.panic_window_load,
            stable_window_seconds: e.stable_window_seconds,
            panic_window_seconds: e.panic_window_seconds,
            instances_reporting: e.instances_reporting,
            instances_ready: e.instances_ready,
            instances_late: e.instances_late,
            instances_gone: e.instances_gone,
            instances_starting: e.instances_starting,
            bound_by: e.bound_by.clone(),
            unbounded_replicas: e.unbounded_replicas,
            metrics: e.metrics.iter().map(MetricLoadPayload::from).collect(),
            summary: e.summary.clone(),
        }
    }
}

impl From<&MetricLoad> for MetricLoadPayload {
    fn from(m: &MetricLoad) -> MetricLoadPayload {
        MetricLoadPayload {
            metric: m.metric.clone(),
            target_per_instance: m.target_per_instance,
            stable_window_load: m.stable_window_load,
            panic_window_load: m.panic_window_load,
            desired_replicas: m.desired_replicas,
        }
    }
}

/// `sha256=<hex HMAC-SHA256 of body keyed with key>`, the signature header's value.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Starts the webhook for `service`.
pub(crate) fn spawn(
    service: String,
    hook: ResolvedWebhook,
    board: Arc<DecisionBoard>,
    shutdown: Shutdown,
) -> (Arc<WebhookStats>, JoinHandle<()>) {
    let stats = Arc::new(WebhookStats::default());
    let task = tokio::spawn(run(service, hook, board, Arc::clone(&stats), shutdown));
    (stats, task)
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How one decision's delivery ended.
enum Delivery {
    /// Delivered, refused or given up: wait for the next decision.
    Done,
    /// A newer decision came while this one was being retried.
    Superseded(Box<ScalingDecision>),
    /// Shutdown fired, or the board is gone.
    Stop,
}

async fn run(
    service: String,
    hook: ResolvedWebhook,
    board: Arc<DecisionBoard>,
    stats: Arc<WebhookStats>,
    mut shutdown: Shutdown,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(hook.timeout));
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let mut follow = Follow::new(service.clone(), board);
    tracing::info!(service, url = %hook.uri, "webhook hook started");
    let mut next = None;
    loop {
        let decision = match next.take() {
            Some(decision) => decision,
            None => tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                decision = follow.next() => match decision {
                    Some(decision) => decision,
                    None => break,
                },
            },
        };
        match deliver(&client, &hook, &decision, &mut follow, &stats, &mut shutdown).await {
            Delivery::Done => {}
            Delivery::Superseded(newer) => {
                WebhookStats::add(&stats.superseded);
                tracing::info!(
                    service,
                    decision_id = %decision.decision_id,
                    newer = %newer.decision_id,
                    "webhook: dropping a decision still being retried for a newer one"
                );
                next = Some(*newer);
            }
            Delivery::Stop => break,
        }
    }
    tracing::info!(service, "webhook hook stopped");
}

/// What one attempt got.
enum Attempt {
    Answered {
        status: StatusCode,
        retry_after: Option<Duration>,
        body: String,
    },
    Failed(String),
}

async fn deliver(
    client: &HttpClient,
    hook: &ResolvedWebhook,
    decision: &ScalingDecision,
    follow: &mut Follow,
    stats: &WebhookStats,
    shutdown: &mut Shutdown,
) -> Delivery {
    let service = decision.service.as_str();
    let decision_id = decision.decision_id.as_str();
    let body = match serde_json::to_vec(&DecisionPayload::from(decision)) {
        Ok(body) => Bytes::from(body),
        Err(e) => {
            tracing::error!(service, decision_id, error = %e, "webhook: cannot encode the decision");
            return Delivery::Done;
        }
    };
    let signature = signature(&hook.key, &body);
    for attempt in 1..=hook.max_attempts {
        WebhookStats::add(&stats.attempts);
        let request = match build_request(hook, decision_id, &signature, attempt, body.clone()) {
            Ok(request) => request,
            Err(e) => {
                WebhookStats::add(&stats.rejected);
                tracing::error!(service, decision_id, error = %e, "webhook: cannot build the request");
                return Delivery::Done;
            }
        };
        // An attempt is short (hook.timeout) and runs to its end even if a
        // newer decision comes: receivers never see two requests at once.
        let outcome = tokio::select! {
            biased;
            _ = shutdown.wait() => return Delivery::Stop,
            outcome = send(client, request, hook.timeout) => outcome,
        };
        let retry_after = match outcome {
            Attempt::Answered { status, .. } if status.is_success() => {
                WebhookStats::add(&stats.delivered);
                tracing::info!(
                    service,
                    decision_id,
                    desired_replicas = decision.desired_replicas,
                    attempt,
                    status = status.as_u16(),
                    "webhook: decision delivered"
                );
                return Delivery::Done;
            }
            Attempt::Answered {
                status,
                retry_after,
                body,
            } if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() => {
                tracing::warn!(
                    service,
                    decision_id,
                    attempt,
                    status = status.as_u16(),
                    body,
                    "webhook: receiver failed; will retry"
                );
                retry_after
            }
            Attempt::Answered { status, body, .. } => {
                WebhookStats::add(&stats.rejected);
                tracing::error!(
                    service,
                    decision_id,
                    attempt,
                    status = status.as_u16(),
                    body,
                    "webhook: receiver refused the decision; not retried"
                );
                return Delivery::Done;
            }
            Attempt::Failed(error) => {
                tracing::warn!(
                    service,
                    decision_id,
                    attempt,
                    error,
                    "webhook: request failed; will retry"
                );
                None
            }
        };
        if attempt == hook.max_attempts {
            break;
        }
        let wait = backoff(hook, attempt)
            .max(retry_after.unwrap_or_default())
            .min(hook.max_backoff);
        tokio::select! {
            biased;
            _ = shutdown.wait() => return Delivery::Stop,
            newer = follow.next() => return match newer {
                Some(newer) => Delivery::Superseded(Box::new(newer)),
                None => Delivery::Stop,
            },
            _ = tokio::time::sleep(wait) => {}
        }
    }
    WebhookStats::add(&stats.exhausted);
    tracing::error!(
        service,
        decision_id,
        attempts = hook.max_attempts,
        "webhook: giving up on the decision; the next decision will be sent"
    );
    Delivery::Done
}

fn build_request(
    hook: &ResolvedWebhook,
    decision_id: &str,
    signature: &str,
    attempt: u32,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Request::post(hook.uri.clone())
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("tidemark-collector/", env!("CARGO_PKG_VERSION")),
        )
        .header(DECISION_ID_HEADER, decision_id)
        .header(SIGNATURE_HEADER, signature)
        .header(TIMESTAMP_HEADER, now.to_string())
        .header(ATTEMPT_HEADER, attempt.to_string())
        .body(Full::new(body))
}

/// Most of a response body shown in a log line.
const BODY_SHOWN: usize = 512;

async fn send(client: &HttpClient, request: Request<Full<Bytes>>, timeout: Duration) -> Attempt {
    let exchange = async {
        let response = client.request(request).await.map_err(|e| error_chain(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read the body so the connection can be reused; its text is only
        // for the logs.
        let body = match response.into_body().collect().await {
            Ok(collected) => super::tail(&collected.to_bytes(), BODY_SHOWN),
            Err(e) => format!("(body unreadable: {e})"),
        };
        Ok::<_, String>(Attempt::Answered {
            status,
            retry_after,
            body,
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(attempt)) => attempt,
        Ok(Err(error)) => Attempt::Failed(error),
        Err(_) => Attempt::Failed(format!("no answer within {}", humantime::format_duration(timeout))),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Wait after failed attempt `attempt` (1-based): `initial_backoff * 2^(attempt-1)`,
/// capped at `max_backoff`, then jittered to between half of it and all of it.
fn backoff(hook: &ResolvedWebhook, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    let base = hook.initial_backoff.saturating_mul(factor).min(hook.max_backoff);
    base.mul_f64(0.5 + 0.5 * unit_random())
}

/// A number in `[0, 1)`, from the process's random source (v4 UUIDs): jitter
/// needs no more.
fn unit_random() -> f64 {
    let bits = (uuid::Uuid::new_v4().as_u128() >> 75) as u64; // 53 random bits
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn urls_must_be_plain_http() {
        let mut spec = WebhookSpec::new("https://example.com/hook", "k");
        let err = spec.validate().unwrap_err();
        assert_eq!(err.key, "webhook.url");
        assert!(err.to_string().contains("https:// is not supported"), "{err}");
        spec.url = "ftp://example.com".into();
        assert_eq!(
            spec.validate().unwrap_err().to_string(),
            "webhook.url: must be an http:// URL"
        );
        spec.url = "http://127.0.0.1:9/hook".into();
        spec.validate().unwrap();
    }

    #[test]
    fn exactly_one_secret_source() {
        let mut spec = WebhookSpec::new("http://h/", "k");
        spec.secret_env = Some("X".into());
        assert_eq!(spec.validate().unwrap_err().key, "webhook.secret");
        spec.secret = None;
        spec.validate().unwrap();
        spec.secret_env = None;
        assert_eq!(spec.validate().unwrap_err().key, "webhook.secret");
        spec.secret_env = Some("TIDEMARK_TEST_SURELY_UNSET_WEBHOOK_SECRET".into());
        let err = spec.resolve().unwrap_err();
        assert_eq!(err.key, "webhook.secret_env");
        assert!(format!("{:?}", WebhookSpec::new("http://h/", "hunter2")).contains("Secret(..)"));
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let mut spec = WebhookSpec::new("http://h/", "k");
        spec.initial_backoff = Duration::from_millis(100);
        spec.max_backoff = Duration::from_millis(1000);
        let hook = spec.resolve().unwrap();
        for _ in 0..100 {
            let first = backoff(&hook, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = backoff(&hook, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = backoff(&hook, 40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn payload_carries_the_decision_and_its_explanation() {
        let decision = ScalingDecision {
            decision_id: "d1".into(),
            service: "shop".into(),
            decided_at_unix_micros: 1_700_000_000_123_456,
            desired_replicas: 3,
            previous_replicas: 1,
            explanation: Some(DecisionExplanation {
                mode: "panic".into(),
                metrics: vec![MetricLoad {
                    metric: "rps".into(),
                    desired_replicas: 3,
                    ..MetricLoad::default()
                }],
                ..DecisionExplanation::default()
            }),
        };
        let json = serde_json::to_value(DecisionPayload::from(&decision)).unwrap();
        assert_eq!(json["decided_at"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(json["explanation"]["mode"], "panic");
        assert_eq!(json["explanation"]["metrics"][0]["metric"], "rps");
    }
}
