//! `tidemark loadgen`: an HTTP/1.1 load generator over keep-alive connections.
//!
//! With `--rate N` it is open-loop: request `i` is due at `t0 + i/N` whatever
//! the server does, and its latency is measured from that scheduled time to
//! the end of the response body. A pacer thread releases one permit per due
//! request; a connection that is free takes the next permit. When every
//! connection is busy the permits pile up, and the time a request waits for
//! a connection counts in its latency: a slow server cannot hide its stalls
//! by slowing the generator down (coordinated omission).
//!
//! With `--rate 0` it is a closed loop: each connection sends its next
//! request as soon as the previous one ends, which measures the most the
//! server can take; latency is then measured from the send.
//!
//! With `--trace FILE` it replays a request trace, open-loop as a constant
//! rate is: request `i` is due at its arrival from the start of the trace
//! (divided by `--trace-speed`), sent with the tenant of its row if the
//! trace has a tenant column, once; the run ends with the trace, and the
//! summary says what was sent for each tenant. See [`replay`].

mod connection;
pub mod replay;
mod request;
mod schedule;
mod summary;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use http::header::{HeaderName, HeaderValue};
use tidemark_runtime::config::duration;
use tidemark_runtime::shutdown::Shutdown;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use connection::{ConnectError, Connection};
pub use replay::Replay;
pub use request::{InvalidHeader, InvalidTarget, RequestTemplate, parse_header};
pub use schedule::Schedule;
pub use summary::{Outcome, RunShape, Summary, Tally, TraceShape};

/// How long after the end of the run requests still in flight (or still
/// waiting for a connection) are waited for; those left are `unfinished`.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Most permits the pacer hands out at once (tokio caps a semaphore's permits).
const MAX_RELEASE: u64 = 1 << 20;

/// `--duration` and `--warmup` of a constant rate or a closed loop, unless given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
const DEFAULT_WARMUP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// URL every request gets, e.g. `http://127.0.0.1:8080/` (http only).
    #[arg(long, env = "TIDEMARK_TARGET")]
    pub target: http::Uri,

    /// Requests per second, kept constant; 0 sends as fast as the connections allow. Give this or --trace.
    #[arg(long, env = "TIDEMARK_RATE")]
    pub rate: Option<u64>,

    /// Replay this request trace instead of a rate: each request is sent at its arrival time from the
    /// trace's start, with its row's tenant if the trace has a tenant column; the run ends after the
    /// trace's last request (no loop). CSV `arrival_seconds,service_seconds[,tenant]` or the Azure LLM
    /// trace, as `tidemark simulate --trace` reads them; service times are ignored.
    #[arg(long, env = "TIDEMARK_TRACE", conflicts_with = "rate")]
    pub trace: Option<PathBuf>,

    /// With --trace: replay N times faster (the gaps between arrivals divided by N, as
    /// `tidemark simulate --compress N`); `20` or `20x` [default: 1].
    #[arg(long, env = "TIDEMARK_TRACE_SPEED", value_parser = replay::parse_speed)]
    pub trace_speed: Option<f64>,

    /// With --trace: the header a row's tenant is sent in; it replaces a --header of that name.
    #[arg(long, env = "TIDEMARK_TENANT_HEADER", default_value = "x-tenant-id")]
    pub tenant_header: HeaderName,

    /// How long to measure, after the warmup [default: 10s; with --trace, until the trace's last request,
    /// and a shorter one cuts the replay short].
    #[arg(long, env = "TIDEMARK_DURATION", value_parser = duration)]
    pub duration: Option<Duration>,

    /// How long to send before measuring; those requests are not counted [default: 2s; with --trace, 0s].
    #[arg(long, env = "TIDEMARK_WARMUP", value_parser = duration)]
    pub warmup: Option<Duration>,

    /// Keep-alive connections, each with one request in flight.
    #[arg(long, env = "TIDEMARK_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: u32,

    /// Header to send with every request, `name: value` (repeatable), e.g. `x-tenant-id: acme`.
    #[arg(long = "header", env = "TIDEMARK_HEADER", value_parser = parse_header)]
    pub headers: Vec<(HeaderName, HeaderValue)>,

    /// Print the result as one JSON object instead of text.
    #[arg(long, env = "TIDEMARK_JSON")]
    pub json: bool,
}

/// Runs the load, prints the summary; stops early (with an error) if
/// `shutdown` fires.
pub async fn run(args: LoadgenArgs, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let summary = tokio::select! {
        summary = measure(&args) => summary?,
        () = shutdown.wait() => anyhow::bail!("interrupted before the run ended"),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(())
}

/// What a run sends.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Requests per second; 0 for a closed loop.
    Rate(u64),
    /// A trace, replayed once.
    Replay(Arc<Replay>),
}

impl Plan {
    /// The plan `args` ask for: `--rate`, or `--trace` (read here).
    pub fn of(args: &LoadgenArgs) -> anyhow::Result<Plan> {
        match (args.rate, &args.trace) {
            (Some(rate), None) => {
                if args.trace_speed.is_some() {
                    bail!("--trace-speed needs --trace");
                }
                Ok(Plan::Rate(rate))
            }
            (None, Some(path)) => {
                let replay = Replay::read(path, args.trace_speed.unwrap_or(1.0))?;
                Ok(Plan::Replay(Arc::new(replay)))
            }
            (Some(_), Some(_)) => bail!("give --rate or --trace, not both"),
            (None, None) => bail!("give --rate N (requests per second; 0 for as fast as possible) or --trace FILE"),
        }
    }
}

/// Connects, sends the load that `args` describe and summarizes it.
pub async fn measure(args: &LoadgenArgs) -> anyhow::Result<Summary> {
    let plan = Plan::of(args)?;
    measure_plan(args, &plan).await
}

/// Connects, sends `plan` as `args` describe (their `--rate` and `--trace`
/// aside) and summarizes it.
pub async fn measure_plan(args: &LoadgenArgs, plan: &Plan) -> anyhow::Result<Summary> {
    let (template, authority) = RequestTemplate::new(&args.target, &args.headers)?;
    let tenants = match plan {
        Plan::Replay(replay) => tenant_values(replay)?,
        Plan::Rate(_) => Vec::new(),
    };
    let addr = request::resolve(&authority)
        .await
        .with_context(|| format!("cannot resolve {}", authority.host))?;
    let connections = open_all(addr, args.connections)
        .await
        .with_context(|| format!("cannot open connections to {}", args.target))?;
    let (warmup, duration) = match plan {
        Plan::Replay(replay) => {
            let warmup = args.warmup.unwrap_or(Duration::ZERO);
            (warmup, args.duration.unwrap_or(replay.span().saturating_sub(warmup)))
        }
        Plan::Rate(_) => (
            args.warmup.unwrap_or(DEFAULT_WARMUP),
            args.duration.unwrap_or(DEFAULT_DURATION),
        ),
    };
    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + warmup,
        end: start + warmup + duration,
    };
    let template = Arc::new(template);
    let mut trace = None;
    let (tally, scheduled) = match plan {
        Plan::Rate(rate) => match Schedule::new(*rate) {
            Some(schedule) => {
                let total = schedule.due_before(warmup + duration);
                let first_measured = schedule.due_before(warmup);
                let sends = Sends {
                    timeline: Timeline::Rate(schedule),
                    total,
                    first_measured,
                    template,
                    tenant_header: args.tenant_header.clone(),
                    tenants: Arc::new(Vec::new()),
                };
                let tally = open_loop(connections, sends, window).await?;
                (tally, Some(total - first_measured))
            }
            None => (closed_loop(connections, template, window).await?, None),
        },
        Plan::Replay(replay) => {
            // Without --duration every request is sent, the last one included.
            let total = match args.duration {
                Some(_) => replay.due_before(warmup + duration),
                None => replay.len(),
            };
            let first_measured = replay.due_before(warmup).min(total);
            trace = Some(TraceShape {
                file: replay.path.display().to_string(),
                format: replay.format.to_string(),
                requests: replay.len(),
                scheduled: total,
                speed: replay.speed,
                span: replay.span(),
                tenant_names: replay.tenant_names().to_vec(),
            });
            let sends = Sends {
                timeline: Timeline::Replay(Arc::clone(replay)),
                total,
                first_measured,
                template,
                tenant_header: args.tenant_header.clone(),
                tenants: Arc::new(tenants),
            };
            let tally = open_loop(connections, sends, window).await?;
            (tally, Some(total - first_measured))
        }
    };
    let shape = RunShape {
        target: args.target.to_string(),
        rate: match plan {
            Plan::Rate(rate) => *rate,
            Plan::Replay(_) => 0,
        },
        connections: connections_len(args.connections),
        duration,
        warmup,
        scheduled,
        trace,
    };
    Ok(Summary::new(&shape, &tally))
}

/// The header value of each tenant the trace names, by index.
fn tenant_values(replay: &Replay) -> anyhow::Result<Vec<HeaderValue>> {
    replay
        .tenant_names()
        .iter()
        .map(|name| {
            HeaderValue::from_str(name).with_context(|| {
                format!(
                    "trace {}: tenant {name:?} is not a valid header value",
                    replay.path.display()
                )
            })
        })
        .collect()
}

/// When each request of an open-loop run is due.
#[derive(Debug, Clone)]
enum Timeline {
    Rate(Schedule),
    Replay(Arc<Replay>),
}

impl Timeline {
    fn offset(&self, i: u64) -> Duration {
        match self {
            Timeline::Rate(schedule) => schedule.offset(i),
            Timeline::Replay(replay) => replay.offset(i),
        }
    }

    fn due_by(&self, elapsed: Duration) -> u64 {
        match self {
            Timeline::Rate(schedule) => schedule.due_by(elapsed),
            Timeline::Replay(replay) => replay.due_by(elapsed),
        }
    }

    /// The trace's tenant of request `i`, and whether this is a replay at all.
    fn tenant(&self, i: u64) -> Option<Option<u32>> {
        match self {
            Timeline::Rate(_) => None,
            Timeline::Replay(replay) => Some(replay.tenant(i)),
        }
    }
}

/// What an open-loop run sends: `total` requests on `timeline`, the first
/// `first_measured` of them unmeasured.
#[derive(Debug, Clone)]
struct Sends {
    timeline: Timeline,
    total: u64,
    first_measured: u64,
    template: Arc<RequestTemplate>,
    /// A trace row's tenant goes in this header, with the value `tenants[index]`.
    tenant_header: HeaderName,
    tenants: Arc<Vec<HeaderValue>>,
}

impl Sends {
    /// Request `i`, with its tenant if the trace gives one.
    fn request(&self, tenant: Option<u32>) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
        let value = tenant.and_then(|t| self.tenants.get(usize::try_from(t).ok()?));
        self.template.request_with(value.map(|v| (&self.tenant_header, v)))
    }
}

fn connections_len(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The run's times: it starts, measures from `measure_from` (after the
/// warmup) and schedules or starts no request at or after `end`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

impl Window {
    /// The latest a request may still finish and be waited for.
    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.end + DRAIN_GRACE)
    }

    /// How far into the measured window `at` is.
    fn since_measure_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.measure_from)
    }
}

/// Opens `n` connections at once, before the clock starts.
async fn open_all(addr: SocketAddr, n: u32) -> anyhow::Result<Vec<Connection>> {
    let mut opening = JoinSet::new();
    for _ in 0..n {
        opening.spawn(Connection::open(addr));
    }
    let mut connections = Vec::with_capacity(connections_len(n));
    while let Some(opened) = opening.join_next().await {
        connections.push(opened.context("a connecting task failed")??);
    }
    Ok(connections)
}

/// Sends `sends.total` requests, each when it is due; records those from
/// `sends.first_measured` on.
async fn open_loop(connections: Vec<Connection>, sends: Sends, window: Window) -> anyhow::Result<Tally> {
    let permits = Arc::new(Semaphore::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let pacer = Pacer {
        timeline: sends.timeline.clone(),
        start: window.start,
        total: sends.total,
        stop_tokens: connections.len(),
        permits: permits.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let _stop_pacer = pacer.spawn()?;
    let mut workers = JoinSet::new();
    for mut connection in connections {
        let (permits, next, sends) = (permits.clone(), next.clone(), sends.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            let deadline = window.deadline();
            loop {
                match tokio::time::timeout_at(deadline, permits.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sends.total {
                    break;
                }
                let scheduled = window.start + sends.timeline.offset(i);
                let tenant = sends.timeline.tenant(i);
                let request = sends.request(tenant.flatten());
                let sent = Instant::now();
                tally.sent += 1;
                let answer = tokio::time::timeout_at(deadline, connection.send(request)).await.ok();
                if let Some(tenant) = tenant {
                    tally.record_tenant(tenant, answer);
                }
                let Some(outcome) = answer else {
                    break;
                };
                let done = Instant::now();
                if i >= sends.first_measured {
                    tally.record(
                        outcome,
                        done.saturating_duration_since(scheduled),
                        sent.saturating_duration_since(scheduled),
                        window.since_measure_start(done),
                    );
                } else {
                    tally.record_unmeasured(outcome);
                }
            }
            tally
        });
    }
    join_tallies(workers).await
}

/// Each connection sends back to back until the end of the window.
async fn closed_loop(
    connections: Vec<Connection>,
    template: Arc<RequestTemplate>,
    window: Window,
) -> anyhow::Result<Tally> {
    let mut workers = JoinSet::new();
    for mut connection in connections {
        let template = template.clone();
        workers.spawn(async move {
            let mut tally = Tally::default();
            let deadline = window.deadline();
            loop {
                let sent = Instant::now();
                if sent >= window.end {
                    break;
                }
                tally.sent += 1;
                let Ok(outcome) = tokio::time::timeout_at(deadline, connection.send(template.request())).await else {
                    break;
                };
                let done = Instant::now();
                if sent >= window.measure_from {
                    tally.record(
                        outcome,
                        done.saturating_duration_since(sent),
                        Duration::ZERO,
                        window.since_measure_start(done),
                    );
                } else {
                    tally.record_unmeasured(outcome);
                }
            }
            tally
        });
    }
    join_tallies(workers).await
}

async fn join_tallies(mut workers: JoinSet<Tally>) -> anyhow::Result<Tally> {
    let mut total = Tally::default();
    while let Some(joined) = workers.join_next().await {
        let tally = joined.context("a load worker failed")?;
        total.merge(&tally);
    }
    Ok(total)
}

/// Releases one permit when each request is due, on its own thread: the
/// async timer ticks in whole milliseconds, a thread's sleep is far finer.
#[derive(Debug)]
struct Pacer {
    timeline: Timeline,
    start: Instant,
    total: u64,
    /// Permits released after the last request, one per worker, so each
    /// worker wakes, finds the schedule used up and stops.
    stop_tokens: usize,
    permits: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
}

/// Stops the pacer when dropped.
#[derive(Debug)]
struct StopPacer(Arc<AtomicBool>);

impl Drop for StopPacer {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Pacer {
    fn spawn(self) -> anyhow::Result<StopPacer> {
        let stop = StopPacer(self.stop.clone());
        std::thread::Builder::new()
            .name("loadgen-pacer".into())
            .spawn(move || self.run())
            .context("cannot start the pacer thread")?;
        Ok(stop)
    }

    fn run(self) {
        reduce_timer_slack();
        let mut released = 0;
        while released < self.total && !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let due = self
                .timeline
                .due_by(now.saturating_duration_since(self.start))
                .min(self.total);
            if due > released {
                let batch = (due - released).min(MAX_RELEASE);
                self.permits.add_permits(usize::try_from(batch).unwrap_or(usize::MAX));
                released += batch;
                continue;
            }
            let next = self.start + self.timeline.offset(released);
            std::thread::sleep(next.saturating_duration_since(now));
        }
        self.permits.add_permits(self.stop_tokens);
    }
}

/// Asks Linux to wake this thread's sleeps on time: by default a sleep may
/// end up to 50 µs late (timer slack), which would add to every latency.
/// Best effort; elsewhere, or when refused, sleeps stay as they are.
fn reduce_timer_slack() {
    // `/proc/thread-self` links to `<pid>/task/<tid>`; `/proc/<tid>/timerslack_ns`
    // is this thread's slack.
    let result = std::fs::read_link("/proc/thread-self").and_then(|link| {
        let tid = link
            .file_name()
            .ok_or_else(|| std::io::Error::other("no thread id in /proc/thread-self"))?;
        let path = std::path::Path::new("/proc").join(tid).join("timerslack_ns");
        std::fs::write(path, "1")
    });
    if let Err(e) = result {
        tracing::debug!(error = %e, "cannot reduce the pacer's timer slack");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_app::{self, Behavior};

    async fn demo_app(behavior: Behavior) -> (SocketAddr, tidemark_runtime::shutdown::Trigger) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, shutdown) = tidemark_runtime::shutdown::channel();
        tokio::spawn(demo_app::serve(listener, behavior, shutdown));
        (addr, trigger)
    }

    fn args(addr: SocketAddr, rate: u64) -> LoadgenArgs {
        LoadgenArgs {
            config: None,
            target: format!("http://{addr}/").parse().unwrap(),
            rate: Some(rate),
            trace: None,
            trace_speed: None,
            tenant_header: HeaderName::from_static("x-tenant-id"),
            duration: Some(Duration::from_millis(500)),
            warmup: Some(Duration::from_millis(100)),
            connections: 4,
            headers: vec![parse_header("x-tenant-id: acme").unwrap()],
            json: true,
        }
    }

    fn fast() -> Behavior {
        Behavior {
            work: Duration::ZERO,
            cpu_work: false,
            body: demo_app::body_of_len(13),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn constant_rate_sends_exactly_the_schedule() {
        let (addr, _stop) = demo_app(fast()).await;
        let summary = measure(&args(addr, 200)).await.unwrap();
        // 0.5 s at 200/s, the 0.1 s warmup excluded.
        assert_eq!(summary.count, 100, "{summary}");
        assert_eq!(summary.responses, 120, "{summary}");
        assert_eq!((summary.errors, summary.unfinished), (0, 0), "{summary}");
        assert!(summary.achieved_rps > 180.0, "{summary}");
        assert!(summary.p50_us > 0.0 && summary.p50_us <= summary.max_us);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_busy_connection_counts_in_the_latency() {
        // One connection, 10 ms per request, 200 requests/s asked: the
        // server takes 100/s, so requests queue and latency grows far past
        // the 10 ms a request takes once sent.
        let (addr, _stop) = demo_app(Behavior {
            work: Duration::from_millis(10),
            ..fast()
        })
        .await;
        let mut slow = args(addr, 200);
        slow.connections = 1;
        let summary = measure(&slow).await.unwrap();
        assert!(summary.p99_us > 100_000.0, "{summary}");
        assert!(summary.achieved_rps < 120.0, "{summary}");
        assert!(summary.lag_p99_us > 100_000.0, "{summary}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_keeps_every_connection_busy() {
        let (addr, _stop) = demo_app(fast()).await;
        let summary = measure(&args(addr, 0)).await.unwrap();
        assert!(summary.count > 100, "{summary}");
        assert_eq!(summary.errors, 0, "{summary}");
        assert_eq!(summary.rate, 0);
    }

    /// A trace file that is removed when dropped.
    struct TraceFile(std::path::PathBuf);

    impl TraceFile {
        fn new(text: &str) -> TraceFile {
            let path = std::env::temp_dir().join(format!("tidemark-loadgen-{}.csv", uuid::Uuid::new_v4().simple()));
            std::fs::write(&path, text).unwrap();
            TraceFile(path)
        }
    }

    impl Drop for TraceFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn trace_args(addr: SocketAddr, trace: &std::path::Path, speed: f64) -> LoadgenArgs {
        LoadgenArgs {
            rate: None,
            trace: Some(trace.to_path_buf()),
            trace_speed: Some(speed),
            duration: None,
            warmup: None,
            ..args(addr, 0)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_sends_every_request_of_the_trace_once_on_time() {
        let (addr, _stop) = demo_app(fast()).await;
        // 30 requests over 6 s of trace, 3 per row time; at 10x: 0.6 s.
        let mut text = String::from("arrival_seconds,service_seconds,tenant\n");
        for i in 0..10 {
            let at = f64::from(i) * 0.6;
            text.push_str(&format!("{at},0.1,acme\n{at},0.1,beta\n{at},0.1,\n"));
        }
        let file = TraceFile::new(&text);
        let started = Instant::now();
        let summary = measure(&trace_args(addr, &file.0, 10.0)).await.unwrap();
        let took = started.elapsed();
        assert_eq!(
            (summary.sent, summary.responses, summary.count),
            (30, 30, 30),
            "{summary}"
        );
        assert_eq!((summary.errors, summary.unfinished), (0, 0), "{summary}");
        // The last rows are due at 5.4 s / 10: the run waits for them, no longer.
        assert!(took >= Duration::from_millis(540), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let trace = summary.trace.clone().expect("a replay reports its trace");
        assert_eq!((trace.requests, trace.scheduled, trace.speed), (30, 30, 10.0));
        let tenants: Vec<(Option<&str>, u64, u64)> = trace
            .tenants
            .iter()
            .map(|t| (t.tenant.as_deref(), t.sent, t.answered))
            .collect();
        assert_eq!(
            tenants,
            vec![(None, 10, 10), (Some("acme"), 10, 10), (Some("beta"), 10, 10)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_duration_cuts_a_replay_short() {
        let (addr, _stop) = demo_app(fast()).await;
        let file = TraceFile::new("0,1\n0.1,1\n0.2,1\n5,1\n");
        let mut cut = trace_args(addr, &file.0, 1.0);
        cut.duration = Some(Duration::from_millis(300));
        let summary = measure(&cut).await.unwrap();
        assert_eq!((summary.sent, summary.responses), (3, 3), "{summary}");
        assert_eq!(summary.trace.map(|t| (t.requests, t.scheduled)), Some((4, 3)));
    }

    #[tokio::test]
    async fn a_bad_trace_is_an_error_naming_file_and_line() {
        let (addr, _stop) = demo_app(fast()).await;
        let file = TraceFile::new("0,1\n0.5,soon\n");
        let error = measure(&trace_args(addr, &file.0, 1.0)).await.unwrap_err();
        let text = format!("{error:#}");
        assert!(
            text.contains(&format!("trace {}: line 2: ", file.0.display())),
            "{text}"
        );
        assert!(text.contains("service_seconds `soon` is not a number"), "{text}");
    }

    #[test]
    fn rate_or_trace_is_needed_and_not_both() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut neither = args(addr, 1);
        neither.rate = None;
        let error = Plan::of(&neither).unwrap_err().to_string();
        assert!(error.contains("give --rate N"), "{error}");
        let mut both = trace_args(addr, std::path::Path::new("t.csv"), 1.0);
        both.rate = Some(5);
        assert!(Plan::of(&both).unwrap_err().to_string().contains("not both"));
        let mut speed_alone = args(addr, 1);
        speed_alone.trace_speed = Some(2.0);
        let error = Plan::of(&speed_alone).unwrap_err().to_string();
        assert!(error.contains("--trace-speed needs --trace"), "{error}");
    }

    #[test]
    fn the_command_line_takes_a_trace_instead_of_a_rate() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            args: LoadgenArgs,
        }
        let cli = Cli::try_parse_from([
            "loadgen",
            "--target=http://127.0.0.1:1/",
            "--trace=t.csv",
            "--trace-speed=20x",
        ])
        .unwrap();
        assert_eq!(cli.args.trace.as_deref(), Some(std::path::Path::new("t.csv")));
        assert_eq!((cli.args.rate, cli.args.trace_speed), (None, Some(20.0)));
        assert_eq!(cli.args.tenant_header, "x-tenant-id");
        let both = Cli::try_parse_from(["loadgen", "--target=http://127.0.0.1:1/", "--trace=t.csv", "--rate=5"]);
        assert!(both.is_err());
        let slow = Cli::try_parse_from([
            "loadgen",
            "--target=http://127.0.0.1:1/",
            "--trace=t",
            "--trace-speed=0",
        ]);
        assert!(slow.unwrap_err().to_string().contains("not a number above 0"));
    }

    #[tokio::test]
    async fn a_dead_target_is_an_error_before_the_run() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = measure(&args(addr, 100)).await.unwrap_err();
        assert!(format!("{error:#}").contains("cannot open connections"), "{error:#}");
    }
}
