//! Harness for Tidemark's end-to-end tests: runs the real binaries as child
//! processes, finds their ports from their start-up log lines, and talks to
//! the real services (Kafka, Postgres) started by `scripts/`.
//!
//! Tests that need Kafka or Postgres fail, never skip, when the service is
//! not there: run them through `scripts/test`, which starts both.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Path of a workspace binary, built next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, or run scripts/test)",
        path.display()
    );
    path
}

/// The Kafka brokers `scripts/kafka start` runs. Fails the test without them.
pub fn kafka_brokers() -> String {
    std::env::var("TIDEMARK_KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!("TIDEMARK_KAFKA_BROKERS is not set: this test needs the real Kafka broker; run it through scripts/test")
    })
}

/// A fresh, empty Postgres database on the server `scripts/postgres start`
/// runs. Fails the test without it.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let admin = std::env::var("TIDEMARK_DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "TIDEMARK_DATABASE_URL is not set: this test needs the real Postgres server; run it through scripts/test"
        )
    });
    let name = format!("tidemark_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Postgres at {admin}: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

/// A unique topic name, so tests sharing one broker never see each other.
pub fn unique_topic() -> String {
    format!("tidemark.usage.test-{}", uuid::Uuid::new_v4().simple())
}

/// A running binary. Its stderr is kept (and shown if the test fails); it is
/// killed when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn start(name: &str, args: &[&str]) -> Proc {
        Proc::start_with_env(name, args, &[])
    }

    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = Command::new(bin(name));
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The parent's TIDEMARK_* settings (e.g. the broker list) must not
        // leak into a child unless a test passes them explicitly.
        for (key, _) in std::env::vars() {
            if key.starts_with("TIDEMARK_") {
                command.env_remove(key);
            }
        }
        // Billing's gRPC port has a fixed default (7412); tests run many
        // billing processes at once, so each gets an OS-chosen port unless
        // the test says otherwise (a flag or `env` overrides this).
        command.env("TIDEMARK_GRPC_LISTEN", "127.0.0.1:0");
        command.envs(env.iter().copied());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// The address the process logged it listens on for `serves`.
    pub fn address(&self, serves: &str) -> SocketAddr {
        let needle = format!("serves=\"{serves}\"");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self.lines.lock().unwrap().iter().find_map(|line| {
                if !line.contains("listening") || !line.contains(&needle) {
                    return None;
                }
                let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
                addr.parse().ok()
            });
            if let Some(addr) = found {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged that it listens for {serves}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread catch up with the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "cannot signal {}", self.name);
        self.wait_exit(Duration::from_secs(30))
    }

    /// Kills the process at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- {} stderr -----\n{}\n-----", self.name, self.output());
        }
    }
}

/// `tidemark dev` over `data_dir`, committing every 100 ms, on OS-chosen
/// ports (the ingest port may be given in `extra`), with `extra` flags.
pub fn start_dev(data_dir: &std::path::Path, extra: &[&str]) -> Proc {
    let data_dir = format!("--data-dir={}", data_dir.display());
    let mut args = vec![
        "dev",
        &data_dir,
        "--api-listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        "--commit-interval=100ms",
    ];
    if !extra.iter().any(|a| a.starts_with("--ingest-listen=")) {
        args.push("--ingest-listen=127.0.0.1:0");
    }
    // Collector and billing only, unless the test asks for the app.
    if !extra
        .iter()
        .any(|a| a.starts_with("--app=") || a.starts_with("--entry-listen="))
    {
        args.push("--app=none");
    }
    args.extend_from_slice(extra);
    Proc::start("tidemark", &args)
}

/// Starts the test upstream app (see [`upstream`]).
pub async fn start_upstream() -> SocketAddr {
    upstream::start().await
}

/// A plain HTTP/1.1 client.
pub fn http_client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs `url` with `headers`; returns status and body.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut request = Request::get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = http_client()
        .request(request.body(Empty::new()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `count` requests for `tenant` through the proxy at `proxy`; all must
/// succeed.
pub async fn send_requests(proxy: SocketAddr, tenant: &str, count: usize) {
    for _ in 0..count {
        let (status, body) = get(&format!("http://{proxy}/hello"), &[("x-tenant-id", tenant)]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "hello"));
    }
}

/// The tenant's total of `meter` as billing's HTTP API reports it.
pub async fn billed(api: SocketAddr, tenant: &str, meter: &str) -> i64 {
    let (status, body) = get(&format!("http://{api}/v1/usage?tenant={tenant}&meter={meter}"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["totals"][meter].as_i64().unwrap_or(0)
}

/// Waits until billing reports exactly `want` requests per tenant, then
/// checks that the counts stay there (nothing counted twice later).
pub async fn expect_billed_requests(api: SocketAddr, want: &[(&str, i64)], settle: Duration) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = Vec::new();
        for (tenant, _) in want {
            got.push((*tenant, billed(api, tenant, "requests").await));
        }
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "billing never reached {want:?}; last saw {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(settle).await;
    for (tenant, count) in want {
        assert_eq!(
            billed(api, tenant, "requests").await,
            *count,
            "{tenant} changed after settling"
        );
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A usage batch of one second starting at `start`, from `service` (its
/// instance `<service>-1`), number `seq` of `session`: each tenant with its
/// requests and nothing else.
pub fn usage_batch(
    service: &str,
    session: &str,
    seq: u64,
    start: i64,
    tenants: &[(&str, u64)],
) -> tidemark_proto::v1::UsageBatch {
    tidemark_proto::v1::UsageBatch {
        service: service.into(),
        instance: format!("{service}-1"),
        session_id: session.into(),
        seq,
        window_start_unix_micros: start,
        window_end_unix_micros: start + 1_000_000,
        tenants: tenants
            .iter()
            .map(|(tenant, requests)| tidemark_proto::v1::TenantUsage {
                tenant: (*tenant).into(),
                requests: *requests,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Reads usage batches from `topic` (a fresh consumer group, from the
/// beginning) until `done` says enough, or fails after 60 s.
pub async fn read_usage(
    brokers: &str,
    topic: &str,
    done: impl Fn(&[tidemark_proto::v1::UsageBatch]) -> bool,
) -> Vec<tidemark_proto::v1::UsageBatch> {
    use tidemark_log::kafka::KafkaConfig;
    use tidemark_log::{Log, LogConfig};
    let log = Log::open(LogConfig::Kafka(KafkaConfig {
        brokers: brokers.to_owned(),
        properties: Vec::new(),
    }))
    .await
    .unwrap();
    let group = format!("reader-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = log.consumer(topic, &group).await.unwrap();
    let mut batches = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&batches) {
        let record = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("usage never complete; read {} batches: {batches:#?}", batches.len()))
            .unwrap();
        batches.push(tidemark_log::topics::decode_usage(&record.payload).unwrap());
    }
    batches
}

/// Per-tenant sums of every usage field over `batches` (custom meters
/// summed as integers).
pub fn totals(
    batches: &[tidemark_proto::v1::UsageBatch],
) -> std::collections::BTreeMap<String, tidemark_proto::v1::TenantUsage> {
    let mut sums: std::collections::BTreeMap<String, tidemark_proto::v1::TenantUsage> = Default::default();
    for usage in batches.iter().flat_map(|b| &b.tenants) {
        let sum = sums.entry(usage.tenant.clone()).or_default();
        sum.tenant.clone_from(&usage.tenant);
        sum.requests += usage.requests;
        sum.errors += usage.errors;
        sum.duration_micros += usage.duration_micros;
        sum.billed_duration_micros += usage.billed_duration_micros;
        sum.bytes_in += usage.bytes_in;
        sum.bytes_out += usage.bytes_out;
        sum.responses_1xx += usage.responses_1xx;
        sum.responses_2xx += usage.responses_2xx;
        sum.responses_3xx += usage.responses_3xx;
        sum.responses_4xx += usage.responses_4xx;
        sum.responses_5xx += usage.responses_5xx;
        sum.cpu_micros += usage.cpu_micros;
        sum.memory_byte_micros += usage.memory_byte_micros;
        sum.in_flight_micros += usage.in_flight_micros;
        sum.rejected += usage.rejected;
        sum.custom_rejects += usage.custom_rejects;
        for (meter, value) in &usage.custom {
            let total = sum.custom.entry(meter.clone()).or_insert_with(|| "0".into());
            *total = (total.parse::<u64>().unwrap() + value.parse::<u64>().unwrap()).to_string();
        }
    }
    sums
}
