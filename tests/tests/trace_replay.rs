//! Replaying a request trace as real HTTP requests: `tidemark loadgen
//! --trace` against a server that counts what it receives per tenant, and
//! `tidemark dev --load trace=` through the entry port, the sidecars and
//! billing. The traces are small CSVs made here.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tidemark_e2e::{billed, bin, start_dev};

/// Requests received, by `x-tenant-id` (`None`: no such header).
type Received = Arc<Mutex<BTreeMap<Option<String>, u64>>>;

/// An HTTP server that answers 200 and counts every request by tenant.
async fn counting_server() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let counts = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counts = Arc::clone(&counts);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let tenant = request
                        .headers()
                        .get("x-tenant-id")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                    *counts.lock().unwrap().entry(tenant).or_default() += 1;
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

/// `tidemark` with `args`, with none of the parent's `TIDEMARK_*` settings.
fn tidemark(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(bin("tidemark"));
    command.args(args).env("RUST_BACKTRACE", "0");
    for (key, _) in std::env::vars() {
        if key.starts_with("TIDEMARK_") {
            command.env_remove(key);
        }
    }
    command.output().unwrap()
}

/// A trace of `rows` rows over `span_s` seconds, tenants in turn from
/// `tenants` (an empty name leaves the row without one); returns how many
/// rows each tenant has.
fn write_trace(path: &Path, rows: u32, span_s: f64, tenants: &[&str]) -> BTreeMap<Option<String>, u64> {
    let mut text = String::from("arrival_seconds,service_seconds,tenant\n");
    let mut want: BTreeMap<Option<String>, u64> = BTreeMap::new();
    for i in 0..rows {
        let tenant = tenants[i as usize % tenants.len()];
        let at = span_s * f64::from(i) / f64::from(rows - 1);
        text.push_str(&format!("{at:.6},0.05,{tenant}\n"));
        *want.entry((!tenant.is_empty()).then(|| tenant.to_owned())).or_default() += 1;
    }
    std::fs::write(path, text).unwrap();
    want
}

#[tokio::test(flavor = "multi_thread")]
async fn loadgen_replays_every_request_of_a_trace_with_its_tenant() {
    let (addr, received) = counting_server().await;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.csv");
    // 240 requests over 6 s of trace, replayed at 3x: 2 s.
    let mut want = write_trace(&trace, 240, 6.0, &["acme", "beta", "acme", ""]);
    let started = Instant::now();
    let output = tidemark(&[
        "loadgen",
        &format!("--target=http://{addr}/"),
        &format!("--trace={}", trace.display()),
        "--trace-speed=3x",
        "--header=x-tenant-id: fallback",
        "--json",
    ]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "loadgen failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();

    // Rows without a tenant go with the --header's tenant.
    let untenanted = want.remove(&None).unwrap();
    want.insert(Some("fallback".into()), untenanted);
    assert_eq!(*received.lock().unwrap(), want, "{summary}");
    assert_eq!(want.values().sum::<u64>(), 240);
    // Sent at their times: the last row is due at 2 s.
    assert!(took >= Duration::from_secs(2), "{took:?}");
    assert_eq!(summary["sent"], 240, "{summary}");
    assert_eq!(summary["responses"], 240, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["trace"]["requests"], 240, "{summary}");
    assert_eq!(summary["trace"]["speed"], 3.0, "{summary}");
    let reported: BTreeMap<String, u64> = summary["trace"]["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t["tenant"].as_str().unwrap_or("(none)").to_owned();
            (name, t["answered"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        reported,
        BTreeMap::from([("(none)".into(), 60), ("acme".into(), 120), ("beta".into(), 60)]),
        "{summary}"
    );
}

#[test]
fn a_bad_trace_fails_loadgen_and_dev_naming_file_line_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("bad.csv");
    std::fs::write(
        &trace,
        "arrival_seconds,service_seconds,tenant\n0,0.1,acme\n0.5,0.1,no spaces\n",
    )
    .unwrap();
    let want = format!(
        "trace {}: line 3: tenant `no spaces` is not a tenant name",
        trace.display()
    );
    let loadgen = tidemark(&[
        "loadgen",
        "--target=http://127.0.0.1:9/",
        &format!("--trace={}", trace.display()),
    ]);
    assert!(!loadgen.status.success());
    let stderr = String::from_utf8_lossy(&loadgen.stderr);
    assert!(stderr.contains(&want), "{stderr}");

    // dev reads the trace before it starts anything: no data directory is made.
    let data = dir.path().join("data");
    let dev = tidemark(&[
        "dev",
        &format!("--data-dir={}", data.display()),
        &format!("--load=trace={}@10x", trace.display()),
    ]);
    assert!(!dev.status.success());
    let stderr = String::from_utf8_lossy(&dev.stderr);
    assert!(stderr.contains("check --load") && stderr.contains(&want), "{stderr}");
    assert!(!data.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_replays_a_trace_once_and_bills_each_row_to_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.csv");
    // 90 requests over 4 s of trace at 2x: 2 s of load, then none.
    let want = write_trace(&trace, 90, 4.0, &["acme", "beta", ""]);
    let mut dev = start_dev(
        &dir.path().join("data"),
        &[
            "--entry-listen=127.0.0.1:0",
            "--demo-work=5ms",
            &format!("--load=trace={}@2x", trace.display()),
            "--load-tenant=gamma",
        ],
    );
    let api = dev.address("billing HTTP API");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !dev.output().contains("the trace is replayed") {
        assert!(Instant::now() < deadline, "the replay never ended:\n{}", dev.output());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = dev.output();
    assert!(
        output.contains("sent        90 of the trace's 90 requests"),
        "the summary says what was sent:\n{output}"
    );
    let expected = [
        ("acme", want[&Some("acme".to_owned())] as i64),
        ("beta", want[&Some("beta".to_owned())] as i64),
        ("gamma", want[&None] as i64),
    ];
    assert_eq!(expected, [("acme", 30), ("beta", 30), ("gamma", 30)]);
    // Every row billed once to its tenant, and no more load after the trace.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut got = Vec::new();
        for (tenant, _) in expected {
            got.push((tenant, billed(api, tenant, "requests").await));
        }
        if got == expected {
            break;
        }
        assert!(Instant::now() < deadline, "billed {got:?}, want {expected:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (tenant, count) in expected {
        assert_eq!(
            billed(api, tenant, "requests").await,
            count,
            "{tenant} after the trace ended"
        );
    }
    let status = dev.terminate();
    assert!(status.success(), "{}", dev.output());
}
