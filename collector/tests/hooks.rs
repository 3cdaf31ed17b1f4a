//! The webhook and exec hooks against a real HTTP receiver and real commands.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tidemark_collector::board::DecisionBoard;
use tidemark_collector::hooks::{self, CommandLine, ExecSpec, HooksSpec, WebhookSpec};
use tidemark_proto::v1::{DecisionExplanation, MetricLoad, ScalingDecision};
use tidemark_runtime::shutdown::{self, Trigger};
use tokio::net::TcpListener;

const SECRET: &str = "s3cret-key";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    decision_id: String,
    signature: String,
    timestamp: String,
    attempt: String,
    content_type: String,
    body: Bytes,
}

/// A real HTTP server on 127.0.0.1:0 that records every request and answers
/// with `respond(decision id, how many times that id came, this one included)`.
struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Receiver {
    async fn start(respond: impl Fn(&str, usize) -> StatusCode + Send + Sync + 'static) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let respond = Arc::new(respond);
        let recorded = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = Arc::clone(&recorded);
                let respond = Arc::clone(&respond);
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        let respond = Arc::clone(&respond);
                        async move {
                            let header = |name: &str| {
                                req.headers()
                                    .get(name)
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default()
                            };
                            let mut request = Seen {
                                decision_id: header("x-tidemark-decision-id"),
                                signature: header("x-tidemark-signature"),
                                timestamp: header("x-tidemark-timestamp"),
                                attempt: header("x-tidemark-attempt"),
                                content_type: header("content-type"),
                                body: Bytes::new(),
                            };
                            assert_eq!(req.method(), hyper::Method::POST);
                            assert_eq!(req.uri().path(), "/hook");
                            request.body = req.into_body().collect().await.unwrap().to_bytes();
                            let status = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(request.clone());
                                let count = seen.iter().filter(|s| s.decision_id == request.decision_id).count();
                                respond(&request.decision_id, count)
                            };
                            let mut response = Response::new(Full::new(Bytes::from_static(b"answer\n")));
                            *response.status_mut() = status;
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            seen,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn ids(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.decision_id).collect()
    }
}

fn decision(id: &str, at: i64, desired: u32, previous: u32) -> ScalingDecision {
    ScalingDecision {
        decision_id: id.to_owned(),
        service: "shop".to_owned(),
        decided_at_unix_micros: at,
        desired_replicas: desired,
        previous_replicas: previous,
        explanation: Some(DecisionExplanation {
            mode: "panic".to_owned(),
            metric: "concurrency".to_owned(),
            target_per_instance: 7.0,
            stable_window_load: 20.5,
            panic_window_load: 42.0,
            stable_window_seconds: 60.0,
            panic_window_seconds: 6.0,
            instances_reporting: 2,
            instances_ready: 2,
            bound_by: "max_scale_up_rate".to_owned(),
            unbounded_replicas: 9,
            target_utilization: 0.7,
            metrics: vec![MetricLoad {
                metric: "concurrency".to_owned(),
                target_per_instance: 7.0,
                stable_window_load: 20.5,
                panic_window_load: 42.0,
                desired_replicas: 9,
            }],
            summary: "panic: 42.0 concurrency over 6s needs 9 (target 7.0 x 0.70)".to_owned(),
            ..DecisionExplanation::default()
        }),
    }
}

fn webhook(url: &str) -> WebhookSpec {
    let mut spec = WebhookSpec::new(url, SECRET);
    spec.initial_backoff = Duration::from_millis(20);
    spec.max_backoff = Duration::from_millis(50);
    spec.timeout = Duration::from_secs(2);
    spec
}

/// Starts `spec`'s hooks for `shop`; the trigger stops them.
fn start(spec: HooksSpec, board: &Arc<DecisionBoard>) -> (hooks::Hooks, Trigger) {
    let (trigger, shutdown) = shutdown::channel();
    let hooks = hooks::spawn("shop".to_owned(), spec, Arc::clone(board), shutdown).unwrap();
    (hooks, trigger)
}

/// Waits up to 10 s for `condition`.
async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn stop(hooks: hooks::Hooks, trigger: Trigger) {
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(10), hooks.join())
        .await
        .expect("hooks stop on shutdown");
}

fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn webhook_retries_503_and_429_then_delivers_one_signed_decision() {
    let receiver = Receiver::start(|_, count| match count {
        1 => StatusCode::SERVICE_UNAVAILABLE,
        2 => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::OK,
    })
    .await;
    let board = DecisionBoard::new();
    // Published before the hook starts: the board's current decision is acted on.
    board.publish(decision("d-1", 1_700_000_000_123_456, 3, 1));
    let spec = HooksSpec {
        webhook: Some(webhook(&receiver.url)),
        ..HooksSpec::default()
    };
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.webhook.clone().unwrap();
    eventually("the delivery", || stats.delivered.load(Ordering::Relaxed) == 1).await;

    let seen = receiver.seen();
    assert_eq!(seen.len(), 3, "a 503 and a 429, then the delivery");
    let sent_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    for (i, request) in seen.iter().enumerate() {
        assert_eq!(request.decision_id, "d-1");
        assert_eq!(request.attempt, (i + 1).to_string());
        assert_eq!(request.content_type, "application/json");
        assert_eq!(request.body, seen[0].body, "every attempt sends the same body");
        assert_eq!(request.signature, expected_signature(&request.body));
        let timestamp: u64 = request.timestamp.parse().unwrap();
        assert!(timestamp.abs_diff(sent_at) <= 60, "timestamp {timestamp} is now");
    }
    let json: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(json["decision_id"], "d-1");
    assert_eq!(json["service"], "shop");
    assert_eq!(json["desired_replicas"], 3);
    assert_eq!(json["previous_replicas"], 1);
    assert_eq!(json["decided_at"], "2023-11-14T22:13:20.123456Z");
    assert_eq!(json["decided_at_unix_micros"], 1_700_000_000_123_456i64);
    let explanation = &json["explanation"];
    assert_eq!(explanation["mode"], "panic");
    assert_eq!(explanation["metric"], "concurrency");
    assert_eq!(explanation["panic_window_load"], 42.0);
    assert_eq!(explanation["bound_by"], "max_scale_up_rate");
    assert_eq!(explanation["unbounded_replicas"], 9);
    assert_eq!(explanation["metrics"][0]["desired_replicas"], 9);
    assert_eq!(
        explanation["summary"],
        "panic: 42.0 concurrency over 6s needs 9 (target 7.0 x 0.70)"
    );

    // Delivered once: not sent again, even if the same decision is published again.
    board.publish(decision("d-1", 1_700_000_000_123_456, 3, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.seen().len(), 3);
    // A newer decision is sent (and this one is taken at once).
    board.publish(decision("d-2", 1_700_000_001_000_000, 4, 3));
    eventually("the second delivery", || stats.delivered.load(Ordering::Relaxed) == 2).await;
    assert_eq!(receiver.ids(), ["d-1", "d-1", "d-1", "d-2", "d-2", "d-2"]);
    assert_eq!(stats.attempts.load(Ordering::Relaxed), 6);
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
    stop(hooks, trigger).await;
}

#[tokio::test]
async fn webhook_does_not_retry_a_400() {
    let receiver = Receiver::start(|_, _| StatusCode::BAD_REQUEST).await;
    let board = DecisionBoard::new();
    let spec = HooksSpec {
        webhook: Some(webhook(&receiver.url)),
        ..HooksSpec::default()
    };
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.webhook.clone().unwrap();
    board.publish(decision("d-1", 10, 2, 1));
    eventually("the refusal", || stats.rejected.load(Ordering::Relaxed) == 1).await;
    // Retries would come every 10-50 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(receiver.ids(), ["d-1"]);
    assert_eq!(stats.attempts.load(Ordering::Relaxed), 1);
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 0);
    stop(hooks, trigger).await;
}

#[tokio::test]
async fn webhook_drops_a_retried_decision_when_a_newer_one_comes() {
    let receiver = Receiver::start(|id, _| {
        if id == "old" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::NO_CONTENT
        }
    })
    .await;
    let board = DecisionBoard::new();
    let mut spec = webhook(&receiver.url);
    spec.max_attempts = 1000;
    let spec = HooksSpec {
        webhook: Some(spec),
        ..HooksSpec::default()
    };
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.webhook.clone().unwrap();
    board.publish(decision("old", 10, 5, 1));
    eventually("retries of the old decision", || receiver.ids().len() >= 3).await;
    board.publish(decision("new", 20, 2, 1));
    eventually("the new decision", || stats.delivered.load(Ordering::Relaxed) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids = receiver.ids();
    let first_new = ids.iter().position(|id| id == "new").unwrap();
    assert!(
        ids[first_new..].iter().all(|id| id == "new"),
        "the old decision is never sent after the new one: {ids:?}"
    );
    assert_eq!(ids[first_new..].len(), 1, "the new decision is sent once");
    assert_eq!(stats.superseded.load(Ordering::Relaxed), 1);
    assert_eq!(stats.exhausted.load(Ordering::Relaxed), 0);
    stop(hooks, trigger).await;
}

#[tokio::test]
async fn webhook_retries_an_unreachable_receiver_until_attempts_run_out() {
    // A port nothing listens on: every attempt is a connect error.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let board = DecisionBoard::new();
    let mut spec = webhook(&format!("http://{closed}/hook"));
    spec.max_attempts = 4;
    let spec = HooksSpec {
        webhook: Some(spec),
        ..HooksSpec::default()
    };
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.webhook.clone().unwrap();
    board.publish(decision("d-1", 10, 2, 1));
    eventually("giving up", || stats.exhausted.load(Ordering::Relaxed) == 1).await;
    assert_eq!(stats.attempts.load(Ordering::Relaxed), 4);
    stop(hooks, trigger).await;
}

#[tokio::test]
async fn exec_runs_the_command_with_each_value_as_one_argument() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("decisions.txt");
    // `sh` is the program here, not an interpreter of the values: they
    // arrive as $1..$4, however they look.
    let script = r#"printf '%s|%s|%s|%s\n' "$1" "$2" "$3" "$4" >> "$0""#;
    let spec = HooksSpec {
        exec: Some(ExecSpec {
            command: CommandLine::Args(
                ["sh", "-c", script, file.to_str().unwrap()]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(["{service}", "{replicas}", "{previous}", "id={decision_id}"].map(str::to_owned))
                    .collect(),
            ),
            timeout: Duration::from_secs(10),
        }),
        ..HooksSpec::default()
    };
    let board = DecisionBoard::new();
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.exec.clone().unwrap();
    board.publish(decision("d 1; touch pwned", 10, 3, 1));
    eventually("the first run", || stats.succeeded.load(Ordering::Relaxed) == 1).await;
    board.publish(decision("d-2", 20, 0, 3));
    eventually("the second run", || stats.succeeded.load(Ordering::Relaxed) == 2).await;
    // The same decision again changes nothing.
    board.publish(decision("d-2", 20, 0, 3));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "shop|3|1|id=d 1; touch pwned\nshop|0|3|id=d-2\n"
    );
    assert!(!std::path::Path::new("pwned").exists(), "no shell ran the values");
    assert_eq!(stats.runs.load(Ordering::Relaxed), 2);
    stop(hooks, trigger).await;
}

#[tokio::test]
async fn exec_parses_a_command_line_and_counts_failures() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.txt");
    let quoted = shlex::try_quote(file.to_str().unwrap()).unwrap().into_owned();
    let line = format!("sh -c 'echo \"$1 $2\" > \"$0\"; echo broken >&2; exit 3' {quoted} {{service}} {{replicas}}");
    let spec = HooksSpec {
        exec: Some(ExecSpec::new(line)),
        ..HooksSpec::default()
    };
    let board = DecisionBoard::new();
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.exec.clone().unwrap();
    board.publish(decision("d-1", 10, 7, 1));
    eventually("the failure", || stats.failed.load(Ordering::Relaxed) == 1).await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "shop 7\n");
    assert_eq!(stats.succeeded.load(Ordering::Relaxed), 0);
    // Not retried: only the next decision runs it again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stats.runs.load(Ordering::Relaxed), 1);
    stop(hooks, trigger).await;
}

/// Whether `pid` runs (a zombie no longer does).
fn alive(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn exec_kills_a_command_and_what_it_started_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pids");
    // The shell starts a sleep of its own: the timeout must kill both.
    let mut spec = ExecSpec::new(format!(
        "sh -c 'sleep 30 & echo $$ $! > \"$0\"; wait' {}",
        shlex::try_quote(file.to_str().unwrap()).unwrap()
    ));
    spec.timeout = Duration::from_millis(300);
    let spec = HooksSpec {
        exec: Some(spec),
        ..HooksSpec::default()
    };
    let board = DecisionBoard::new();
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.exec.clone().unwrap();
    let started = Instant::now();
    board.publish(decision("d-1", 10, 1, 0));
    eventually("the timeout", || stats.timed_out.load(Ordering::Relaxed) == 1).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let pids = std::fs::read_to_string(&file).unwrap();
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        eventually(&format!("process {pid} to be gone"), || !alive(pid)).await;
    }
    stop(hooks, trigger).await;
}

#[test]
fn hooks_config_parses_with_defaults_and_refuses_bad_keys() {
    let spec: HooksSpec = toml::from_str(
        r#"
        [webhook]
        url = "http://127.0.0.1:9000/scale"
        secret = "k"
        [exec]
        command = "kubectl scale deployment/{service} --replicas={replicas}"
        [local]
        command = "python3 -m http.server {port} --bind 127.0.0.1"
        "#,
    )
    .unwrap();
    spec.validate().unwrap();
    let webhook = spec.webhook.unwrap();
    assert_eq!(webhook.timeout, Duration::from_secs(5));
    assert_eq!(webhook.max_attempts, 10);
    assert_eq!(webhook.initial_backoff, Duration::from_millis(200));
    assert_eq!(webhook.max_backoff, Duration::from_secs(30));
    assert_eq!(spec.exec.unwrap().timeout, Duration::from_secs(30));
    let local = spec.local.unwrap();
    assert_eq!(local.collector, "http://127.0.0.1:7400");
    assert_eq!(local.ports_from, 18000);
    assert_eq!(local.ready_timeout, Duration::from_secs(30));
    assert_eq!(local.stop_grace, Duration::from_secs(10));
    assert!(local.sidecar.is_none());

    let parse = |text: &str| toml::from_str::<HooksSpec>(text).map_err(|e| e.to_string());
    let err = parse("[webhook]\nurl = \"http://h/\"\nsecret = \"k\"\nretries = 3\n").unwrap_err();
    assert!(err.contains("unknown field `retries`"), "{err}");
    let err = parse("[webhook]\nurl = \"http://h/\"\nsecret = \"k\"\ntimeout = \"5 parsecs\"\n").unwrap_err();
    assert!(err.contains("not a duration"), "{err}");
    let err = parse("[kubernetes]\n").unwrap_err();
    assert!(err.contains("unknown field `kubernetes`"), "{err}");
    let timeout: HooksSpec = toml::from_str("[exec]\ncommand = [\"true\"]\ntimeout = \"1m 30s\"\n").unwrap();
    assert_eq!(timeout.exec.unwrap().timeout, Duration::from_secs(90));
}

#[test]
fn a_bad_template_or_url_is_a_config_error_naming_the_key() {
    let spec: HooksSpec =
        toml::from_str("[exec]\ncommand = \"kubectl scale deployment/{deployment} --replicas={replicas}\"\n").unwrap();
    let err = spec.validate().unwrap_err();
    assert_eq!(err.key, "exec.command");
    assert!(
        err.to_string().starts_with(
            "exec.command: unknown placeholder {deployment}; known are {service}, {replicas}, {previous}, {decision_id}"
        ),
        "{err}"
    );
    let (_trigger, shutdown) = shutdown::channel();
    let refused = hooks::spawn("shop".to_owned(), spec, DecisionBoard::new(), shutdown).unwrap_err();
    assert_eq!(refused.key, "exec.command");

    let spec: HooksSpec = toml::from_str("[exec]\ncommand = \"echo 'unclosed\"\n").unwrap();
    assert_eq!(spec.validate().unwrap_err().key, "exec.command");

    let spec: HooksSpec = toml::from_str("[webhook]\nurl = \"https://example.com/\"\nsecret = \"k\"\n").unwrap();
    let err = spec.validate().unwrap_err();
    assert_eq!(err.key, "webhook.url");
    assert!(err.to_string().contains("https:// is not supported"), "{err}");

    let spec: HooksSpec = toml::from_str("[webhook]\nurl = \"http://h/\"\n").unwrap();
    assert_eq!(spec.validate().unwrap_err().key, "webhook.secret");

    // The key comes from the environment; an unset variable fails at start.
    let spec: HooksSpec =
        toml::from_str("[webhook]\nurl = \"http://h/\"\nsecret_env = \"TIDEMARK_TEST_NO_SUCH_SECRET_VARIABLE\"\n")
            .unwrap();
    spec.validate().unwrap();
    let (_trigger, shutdown) = shutdown::channel();
    let refused = hooks::spawn("shop".to_owned(), spec, DecisionBoard::new(), shutdown).unwrap_err();
    assert_eq!(refused.key, "webhook.secret_env");
    assert!(
        refused.reason.contains("TIDEMARK_TEST_NO_SUCH_SECRET_VARIABLE"),
        "{refused}"
    );
}

/// The secret can come from the environment (here `PATH`, which every test run has).
#[tokio::test]
async fn webhook_reads_its_key_from_secret_env() {
    let receiver = Receiver::start(|_, _| StatusCode::OK).await;
    let spec: HooksSpec = toml::from_str(&format!(
        "[webhook]\nurl = \"{}\"\nsecret_env = \"PATH\"\ninitial_backoff = \"10ms\"\n",
        receiver.url
    ))
    .unwrap();
    let board = DecisionBoard::new();
    let (hooks, trigger) = start(spec, &board);
    let stats = hooks.webhook.clone().unwrap();
    board.publish(decision("d-1", 10, 2, 1));
    eventually("the delivery", || stats.delivered.load(Ordering::Relaxed) == 1).await;
    let seen = receiver.seen();
    let mut mac = Hmac::<Sha256>::new_from_slice(std::env::var("PATH").unwrap().as_bytes()).unwrap();
    mac.update(&seen[0].body);
    assert_eq!(
        seen[0].signature,
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    let _: HashMap<String, serde_json::Value> = serde_json::from_slice(&seen[0].body).unwrap();
    stop(hooks, trigger).await;
}
