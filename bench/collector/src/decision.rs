//! Decision latency: how long after the load on a service jumps does an
//! orchestrator watching `tidemark.v1.Scaling/WatchDecisions` hear that it
//! should scale up.
//!
//! Setup, all real processes on 127.0.0.1: `tidemark demo-app` holding each
//! request for `--work`; one `tidemark-sidecar` in front of it reporting every
//! `--report-interval`; the collector (`tidemark-collector` over Kafka, or
//! `tidemark dev` over its embedded log) with a scaling policy written from
//! the flags; a closed-loop HTTP load in this process; a WatchDecisions
//! client on the collector's port.
//!
//! Each trial: hold `--baseline` requests in flight until the decision is
//! steady, step to `--step` in flight at a random phase of the report
//! interval, and time the step to the first decision received with more
//! replicas than before. The step is held for `--hold` (the peak decision is
//! recorded), then the load returns to the baseline until the decision is
//! back where it was (the stable window has to pass).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidemark_bench_support::procs::{CpuMeter, Proc, clock_ticks, unique_name};
use tidemark_bench_support::stats;
use tidemark_proto::v1::scaling_client::ScalingClient;
use tidemark_proto::v1::{ScalingDecision, WatchDecisionsRequest};
use tokio::sync::{mpsc, watch};

const SERVICE: &str = "bench";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Directory of the release binaries (tidemark, tidemark-collector, tidemark-sidecar).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Kafka bootstrap servers for tidemark-collector.
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Which collectors to measure, in order: `kafka` (tidemark-collector), `dev` (tidemark dev).
    #[arg(long, value_delimiter = ',', default_value = "kafka,dev")]
    paths: Vec<Path>,
    /// Trials per collector.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Requests in flight before and after each step.
    #[arg(long, default_value_t = 10)]
    baseline: usize,
    /// Requests in flight during the step.
    #[arg(long, default_value_t = 500)]
    step: usize,
    /// How long the app holds each request.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    work: Duration,
    /// The sidecar's --report-interval.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "250ms")]
    report_interval: Duration,
    /// How long each step is held after it starts (the peak is recorded meanwhile).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    hold: Duration,
    /// A trial with no scale-up within this long counts as missed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Longest wait for the decision to return to its baseline after a step.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "180s")]
    return_timeout: Duration,
    /// No new decision for this long, in stable mode at the baseline count: steady.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    quiet: Duration,
    /// Policy: concurrency target per instance.
    #[arg(long, default_value_t = 10.0)]
    target_concurrency: f64,
    /// Policy: stable window.
    #[arg(long, default_value = "10s")]
    stable_window: String,
    /// Policy: panic window.
    #[arg(long, default_value = "2s")]
    panic_window: String,
    /// Policy: max replicas.
    #[arg(long, default_value_t = 100)]
    max_replicas: u32,
    /// Policy: hysteresis on the way down. 0 lets a baseline of exactly one
    /// target's worth of load return to 1 replica (the default 0.1 settles
    /// at 2); it plays no part in scaling up.
    #[arg(long, default_value_t = 0.0)]
    hysteresis: f64,
    /// The broker's pid, to count its CPU as the benchmark's own.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Keep the processes' logs here (default: a temporary directory, kept only on failure).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Path {
    Kafka,
    Dev,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Kafka => "tidemark-collector → Kafka → decisions topic",
            Path::Dev => "tidemark dev (embedded log, no Kafka)",
        }
    }
}

/// What one trial saw.
#[derive(Debug, Clone)]
struct Trial {
    pre: u32,
    /// Step to the first scale-up decision received; `None` if missed.
    latency: Option<Duration>,
    /// Of which: the autoscaler's `decided_at` to the watch client receiving it.
    published: Option<Duration>,
    first: Option<ScalingDecision>,
    peak: u32,
    peak_after: Duration,
    peak_load: f64,
    back_after: Option<Duration>,
}

#[derive(Debug)]
struct PathResult {
    path: Path,
    trials: Vec<Trial>,
    requests_ok: u64,
    requests_failed: u64,
    /// Cores the machine kept busy over the trials, and how many of them
    /// went to processes other than the benchmark's.
    machine_cores: f64,
    other_cores: f64,
    steal_cores: f64,
}

pub async fn run(args: Args) -> anyhow::Result<String> {
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Work::Kept(dir.clone())
        }
        None => Work::Temp(tempfile::Builder::new().prefix("tidemark-bench-decision.").tempdir()?),
    };
    let result = measure(&args, work.path()).await;
    if result.is_err()
        && let Work::Temp(dir) = work
    {
        eprintln!("[bench] logs kept in {}", dir.keep().display());
    }
    result
}

#[derive(Debug)]
enum Work {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Work {
    fn path(&self) -> &std::path::Path {
        match self {
            Work::Temp(d) => d.path(),
            Work::Kept(p) => p,
        }
    }
}

fn policy(args: &Args) -> String {
    format!(
        "[defaults]\ntargets = {{ concurrency = {} }}\ntarget_utilization = 1.0\nstable_window = \"{}\"\n\
         panic_window = \"{}\"\nmax_replicas = {}\nhysteresis = {}\n",
        args.target_concurrency, args.stable_window, args.panic_window, args.max_replicas, args.hysteresis
    )
}

async fn measure(args: &Args, work: &std::path::Path) -> anyhow::Result<String> {
    let policy_text = policy(args);
    let policy_path = work.join("scaling.toml");
    std::fs::write(&policy_path, &policy_text)?;
    let bin = |name: &str| args.bin_dir.join(name);

    let mut app = Proc::start(
        "demo-app",
        &bin("tidemark"),
        &[
            "demo-app".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--work={}ms", args.work.as_millis()),
        ],
        Some(work),
    )?;
    let app_addr = app.address("demo app")?;

    let mut results = Vec::new();
    for &path in &args.paths {
        eprintln!("[bench] decision latency through {}", path.label());
        results.push(measure_path(args, path, work, &policy_path, (app_addr, app.pid())).await?);
        app.check_alive()?;
    }
    app.stop();
    Ok(report(args, &policy_text, &results))
}

async fn measure_path(
    args: &Args,
    path: Path,
    work: &std::path::Path,
    policy: &std::path::Path,
    (app, app_pid): (SocketAddr, u32),
) -> anyhow::Result<PathResult> {
    let bin = |name: &str| args.bin_dir.join(name);
    let mut collector = match path {
        Path::Kafka => {
            let brokers = args
                .kafka_brokers
                .as_deref()
                .context("--kafka-brokers (or TIDEMARK_KAFKA_BROKERS) is needed for the kafka path")?;
            let run = unique_name("bench-decision");
            Proc::start(
                "collector",
                &bin("tidemark-collector"),
                &[
                    "--listen=127.0.0.1:0".into(),
                    "--admin-listen=127.0.0.1:0".into(),
                    format!("--kafka-brokers={brokers}"),
                    format!("--usage-topic={run}.usage"),
                    format!("--decisions-topic={run}.decisions"),
                    format!("--autoscaler-group={run}.autoscaler"),
                    format!("--scaling-config={}", policy.display()),
                ],
                Some(work),
            )?
        }
        Path::Dev => {
            let data = work.join("dev-data");
            let mut dev_args = vec![
                "dev".into(),
                format!("--data-dir={}", data.display()),
                "--ingest-listen=127.0.0.1:0".into(),
                "--api-listen=127.0.0.1:0".into(),
                "--admin-listen=127.0.0.1:0".into(),
                format!("--scaling-config={}", policy.display()),
            ];
            // Where this `tidemark dev` has them: no app of its own (the
            // sidecar here reports to it like any other), and every other
            // port chosen by the OS, so that a dev instance someone else runs
            // on the defaults is no obstacle.
            let help = std::process::Command::new(bin("tidemark"))
                .args(["dev", "--help"])
                .output()?;
            let help = String::from_utf8_lossy(&help.stdout);
            for (flag, value) in [
                ("--app", "none"),
                ("--grpc-listen", "127.0.0.1:0"),
                ("--entry-listen", "127.0.0.1:0"),
            ] {
                if help.contains(&format!("{flag} ")) {
                    dev_args.push(format!("{flag}={value}"));
                }
            }
            Proc::start("dev", &bin("tidemark"), &dev_args, Some(work))?
        }
    };
    let grpc = collector.address("ingest gRPC")?;
    let instance = format!("{SERVICE}-{}", if path == Path::Kafka { "kafka" } else { "dev" });
    let mut sidecar = Proc::start(
        &format!("sidecar-{}", if path == Path::Kafka { "kafka" } else { "dev" }),
        &bin("tidemark-sidecar"),
        &[
            "--listen=127.0.0.1:0".into(),
            "--admin-listen=127.0.0.1:0".into(),
            format!("--upstream=http://{app}"),
            format!("--collector=http://{grpc}"),
            format!("--service={SERVICE}"),
            format!("--instance={instance}"),
            format!("--report-interval={}ms", args.report_interval.as_millis()),
        ],
        Some(work),
    )?;
    let proxy = sidecar.address("proxy")?;

    let mut watcher = Watcher::connect(grpc).await?;
    let load = Load::start(proxy, args.step.max(args.baseline));
    load.set(args.baseline);
    let load_started = Instant::now();
    let panic_window = humantime::parse_duration(&args.panic_window).context("--panic-window")?;
    let baseline = (args.baseline as f64 / args.target_concurrency).ceil().max(1.0) as u32;
    watcher
        .wait_steady(
            baseline,
            args.quiet,
            load_started + panic_window + Duration::from_secs(1),
            args.return_timeout,
        )
        .await
        .context("the decision never settled at the baseline")?;

    let mut pids = vec![app_pid, collector.pid(), sidecar.pid(), std::process::id()];
    if path == Path::Kafka {
        pids.extend(args.broker_pid);
    }
    let meter = CpuMeter::start(clock_ticks(), &pids);
    let mut trials = Vec::new();
    for i in 0..args.trials {
        collector.check_alive()?;
        sidecar.check_alive()?;
        let trial = one_trial(args, &mut watcher, &load, panic_window).await?;
        eprintln!(
            "[bench] {} trial {}/{}: {} ms to {} replicas ({}), peak {} after {:.1} s, back after {}",
            if path == Path::Kafka { "kafka" } else { "dev" },
            i + 1,
            args.trials,
            trial
                .latency
                .map_or("missed".into(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0)),
            trial.first.as_ref().map_or(0, |d| d.desired_replicas),
            trial
                .first
                .as_ref()
                .and_then(|d| d.explanation.as_ref())
                .map_or("", |e| e.mode.as_str()),
            trial.peak,
            trial.peak_after.as_secs_f64(),
            trial
                .back_after
                .map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        );
        let back = trial.back_after.is_some();
        trials.push(trial);
        if !back {
            bail!(
                "the decision did not return to the baseline within {:?}",
                args.return_timeout
            );
        }
    }
    let (ours, machine_cores, steal_cores) = meter.read();
    let other_cores = (machine_cores - ours.iter().filter(|c| c.is_finite()).sum::<f64>()).max(0.0);
    let (requests_ok, requests_failed) = load.counts();
    drop(watcher);
    load.stop();
    sidecar.stop();
    collector.stop();
    Ok(PathResult {
        path,
        trials,
        requests_ok,
        requests_failed,
        machine_cores,
        other_cores,
        steal_cores,
    })
}

async fn one_trial(args: &Args, watcher: &mut Watcher, load: &Load, panic_window: Duration) -> anyhow::Result<Trial> {
    // Steady at the baseline count, with the panic window full of baseline load.
    let pre = watcher.latest_replicas();
    // A random phase against the sidecar's report interval.
    tokio::time::sleep(jitter(args.report_interval)).await;
    let step_wall = SystemTime::now();
    let step = Instant::now();
    load.set(args.step);

    let mut trial = Trial {
        pre,
        latency: None,
        published: None,
        first: None,
        peak: pre,
        peak_after: Duration::ZERO,
        peak_load: 0.0,
        back_after: None,
    };
    let up_deadline = step + args.timeout;
    let hold_until = step + args.hold;
    loop {
        let deadline = if trial.latency.is_none() {
            up_deadline.max(hold_until)
        } else {
            hold_until
        };
        let Some((at, decision)) = watcher.next_before(deadline).await? else {
            break;
        };
        if decision.desired_replicas > trial.peak {
            trial.peak = decision.desired_replicas;
            trial.peak_after = at.saturating_duration_since(step);
            trial.peak_load = decision.explanation.as_ref().map_or(0.0, |e| e.panic_window_load);
        }
        if trial.latency.is_none() && decision.desired_replicas > pre {
            trial.latency = Some(at.saturating_duration_since(step));
            let decided =
                UNIX_EPOCH + Duration::from_micros(u64::try_from(decision.decided_at_unix_micros).unwrap_or(0));
            let received = step_wall + at.saturating_duration_since(step);
            trial.published = received.duration_since(decided).ok();
            trial.first = Some(decision);
        }
    }
    let hold_end = Instant::now().max(hold_until);
    tokio::time::sleep_until(hold_end.into()).await;
    load.set(args.baseline);
    let down = Instant::now();
    let back = watcher
        .wait_steady(pre, Duration::ZERO, down, args.return_timeout)
        .await
        .ok();
    trial.back_after = back.map(|at| at.saturating_duration_since(down));
    if trial.back_after.is_some() {
        // Steady again before the next step, with a full panic window of baseline load.
        watcher
            .wait_steady(
                pre,
                args.quiet,
                down + panic_window + Duration::from_secs(1),
                args.return_timeout,
            )
            .await?;
    }
    Ok(trial)
}

/// A pseudo-random duration in `[0, max)` from the clock's nanoseconds.
fn jitter(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let max_nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX).max(1);
    Duration::from_nanos(u64::from(nanos).wrapping_mul(2_654_435_761) % max_nanos)
}

/// The WatchDecisions stream, with each decision's arrival time.
#[derive(Debug)]
struct Watcher {
    rx: mpsc::UnboundedReceiver<(Instant, ScalingDecision)>,
    latest: Option<ScalingDecision>,
    last_at: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Watcher {
    async fn connect(grpc: SocketAddr) -> anyhow::Result<Watcher> {
        let mut client = ScalingClient::connect(format!("http://{grpc}")).await?;
        let mut stream = client
            .watch_decisions(WatchDecisionsRequest {
                services: vec![SERVICE.into()],
            })
            .await?
            .into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(d)) => {
                        if tx.send((Instant::now(), d)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        eprintln!("[bench] WatchDecisions ended: {status}");
                        return;
                    }
                }
            }
        });
        Ok(Watcher {
            rx,
            latest: None,
            last_at: Instant::now(),
            task,
        })
    }

    fn latest_replicas(&self) -> u32 {
        self.latest.as_ref().map_or(0, |d| d.desired_replicas)
    }

    fn latest_mode(&self) -> &str {
        self.latest
            .as_ref()
            .and_then(|d| d.explanation.as_ref())
            .map_or("", |e| e.mode.as_str())
    }

    /// The next decision, if one arrives before `deadline`.
    async fn next_before(&mut self, deadline: Instant) -> anyhow::Result<Option<(Instant, ScalingDecision)>> {
        match tokio::time::timeout_at(deadline.into(), self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => bail!("the WatchDecisions stream ended"),
            Ok(Some((at, decision))) => {
                self.latest = Some(decision.clone());
                self.last_at = at;
                Ok(Some((at, decision)))
            }
        }
    }

    /// Waits until the latest decision asks for at most `replicas` in stable
    /// mode, nothing new has come for `quiet`, and it is past `not_before`.
    /// Returns when the settling decision arrived (or `not_before`, if later).
    async fn wait_steady(
        &mut self,
        replicas: u32,
        quiet: Duration,
        not_before: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let settled = self.latest.is_some() && self.latest_replicas() <= replicas && self.latest_mode() == "stable";
            if settled {
                let at = (self.last_at + quiet).max(not_before);
                if Instant::now() >= at {
                    return Ok(self.last_at.max(not_before));
                }
                // Steady unless another decision arrives before `at`.
                self.next_before(at.min(deadline)).await?;
            } else {
                self.next_before(deadline).await?;
            }
        }
        bail!(
            "no steady decision at {replicas} replicas within {timeout:?}; latest: {} replicas, mode {:?}",
            self.latest_replicas(),
            self.latest_mode()
        )
    }
}

/// A closed-loop HTTP load: the first `n` of its workers each keep one
/// request in flight; `set` changes `n` at once.
#[derive(Debug)]
struct Load {
    target: watch::Sender<usize>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(proxy: SocketAddr, workers: usize) -> Load {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(600))
            .build(connector);
        let uri: hyper::Uri = format!("http://{proxy}/")
            .parse()
            .expect("a socket address makes a valid URI");
        let (target, rx) = watch::channel(0usize);
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let workers = (0..workers)
            .map(|i| {
                let mut rx = rx.clone();
                let client = client.clone();
                let uri = uri.clone();
                let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
                tokio::spawn(async move {
                    loop {
                        if rx.wait_for(|n| i < *n).await.is_err() {
                            return;
                        }
                        let request = Request::get(uri.clone())
                            .header("x-tenant-id", "acme")
                            .body(Empty::new())
                            .expect("a GET with a valid header is a valid request");
                        match client.request(request).await {
                            Ok(response) => {
                                let good = response.status().is_success();
                                let body = response.into_body().collect().await;
                                if good && body.is_ok() {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            target,
            ok,
            failed,
            workers,
        }
    }

    fn set(&self, n: usize) {
        self.target.send_replace(n);
    }

    fn counts(&self) -> (u64, u64) {
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }

    fn stop(self) {
        for worker in self.workers {
            worker.abort();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(args: &Args, policy: &str, results: &[PathResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Decision latency\n\n\
         Load on one sidecar steps from {} to {} requests in flight (closed loop; the app holds each \
         request {} ms; the sidecar reports every {} ms). Latency: from the step to the first decision \
         a WatchDecisions client on the collector's port receives with more replicas than before the \
         step. {} trials per path; the steps fall at random phases of the report interval. Percentiles \
         are nearest-rank over the trials: with {} trials, p99 is the slowest trial.\n",
        args.baseline,
        args.step,
        args.work.as_millis(),
        args.report_interval.as_millis(),
        args.trials,
        args.trials,
    );
    let _ = writeln!(
        out,
        "| path | trials (missed) | p50 ms | p90 ms | p99 ms | max ms | of which decided → watch, p50 / max ms | \
         first scale-up: replicas (min–max), mode | peak replicas, reached after (p50 s) | back to baseline after (p50 s) |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|---|---|--:|");
    for r in results {
        let latencies: Vec<f64> = r.trials.iter().filter_map(|t| t.latency.map(ms)).collect();
        let published: Vec<f64> = r.trials.iter().filter_map(|t| t.published.map(ms)).collect();
        let mut firsts = Vec::new();
        let mut modes = std::collections::BTreeMap::<String, usize>::new();
        for t in &r.trials {
            if let Some(d) = &t.first {
                firsts.push(d.desired_replicas);
                let mode = d.explanation.as_ref().map_or("?".to_owned(), |e| e.mode.clone());
                *modes.entry(mode).or_default() += 1;
            }
        }
        let missed = r.trials.iter().filter(|t| t.latency.is_none()).count();
        let peaks: Vec<f64> = r.trials.iter().map(|t| f64::from(t.peak)).collect();
        let peak_after: Vec<f64> = r.trials.iter().map(|t| t.peak_after.as_secs_f64()).collect();
        let back: Vec<f64> = r
            .trials
            .iter()
            .filter_map(|t| t.back_after.map(|d| d.as_secs_f64()))
            .collect();
        let modes: Vec<String> = modes.iter().map(|(m, n)| format!("{m} ×{n}")).collect();
        let (min_peak, max_peak) = peaks.iter().fold((f64::MAX, 0f64), |(a, b), &p| (a.min(p), b.max(p)));
        let _ = writeln!(
            out,
            "| {} | {} ({missed}) | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {}–{}, {} | {:.0}–{:.0}, {:.1} s | {:.1} s |",
            r.path.label(),
            r.trials.len(),
            stats::nearest_rank(&latencies, 0.5),
            stats::nearest_rank(&latencies, 0.9),
            stats::nearest_rank(&latencies, 0.99),
            stats::nearest_rank(&latencies, 1.0),
            stats::nearest_rank(&published, 0.5),
            stats::nearest_rank(&published, 1.0),
            firsts.iter().min().copied().unwrap_or(0),
            firsts.iter().max().copied().unwrap_or(0),
            modes.join(", "),
            min_peak,
            max_peak,
            stats::median(&peak_after),
            stats::median(&back),
        );
    }
    let _ = writeln!(
        out,
        "\nTarget: p99 ≤ 1,000 ms through Kafka at a 250 ms report interval.\n\n\
         For context, **not measured here**: Knative's KPA takes a step like this in through a \
         structural chain of 1 s queue-proxy averaging, a 1 s scrape tick and a 2 s decider tick \
         (`tick-interval`), so its decision comes roughly 0–4 s after the step (about 2 s on \
         average), before any write to the Kubernetes API; its activator pokes the autoscaler sooner \
         only while it is on the request path (scale from zero, little burst capacity).\n"
    );
    let _ = writeln!(
        out,
        "Policy (`--scaling-config`, the same file for both paths):\n\n```toml\n{}```\n",
        policy
    );
    for r in results {
        let _ = writeln!(
            out,
            "### Trials: {}\n\nRequests through the sidecar: {} answered, {} failed. The machine was busy \
             {:.2} cores on average over the trials, {:.2} of them outside the benchmark's processes (app, \
             sidecar, collector, load generator{}); the hypervisor stole {:.2} cores.\n",
            r.path.label(),
            r.requests_ok,
            r.requests_failed,
            r.machine_cores,
            r.other_cores,
            if r.path == Path::Kafka { ", broker" } else { "" },
            r.steal_cores,
        );
        let _ = writeln!(
            out,
            "| # | before | latency ms | decided → watch ms | first decision: replicas, mode, panic-window load, summary | \
             peak replicas (panic-window load) after s | back after s |"
        );
        let _ = writeln!(out, "|--:|--:|--:|--:|---|---|--:|");
        for (i, t) in r.trials.iter().enumerate() {
            let first = t.first.as_ref().map_or_else(
                || "–".to_owned(),
                |d| {
                    let e = d.explanation.clone().unwrap_or_default();
                    format!(
                        "{}, {}, {:.1}, {}",
                        d.desired_replicas,
                        e.mode,
                        e.panic_window_load,
                        e.summary.replace('|', "\\|")
                    )
                },
            );
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} ({:.1}) after {:.2} | {} |",
                i + 1,
                t.pre,
                t.latency.map_or("missed".into(), |d| format!("{:.0}", ms(d))),
                t.published.map_or("–".into(), |d| format!("{:.0}", ms(d))),
                first,
                t.peak,
                t.peak_load,
                t.peak_after.as_secs_f64(),
                t.back_after.map_or("–".into(), |d| format!("{:.1}", d.as_secs_f64())),
            );
        }
        let _ = writeln!(out);
    }
    out
}
