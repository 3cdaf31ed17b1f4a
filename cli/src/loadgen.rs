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

mod connection;
mod request;
mod schedule;
mod summary;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use http::header::{HeaderName, HeaderValue};
use tidemark_runtime::config::duration;
use tidemark_runtime::shutdown::Shutdown;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use connection::{ConnectError, Connection};
pub use request::{InvalidHeader, InvalidTarget, RequestTemplate, parse_header};
pub use schedule::Schedule;
pub use summary::{Outcome, RunShape, Summary, Tally};

/// How long after the end of the run requests still in flight (or still
/// waiting for a connection) are waited for; those left are `unfinished`.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Most permits the pacer hands out at once (tokio caps a semaphore's permits).
const MAX_RELEASE: u64 = 1 << 20;

#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// URL every request gets, e.g. `http://127.0.0.1:8080/` (http only).
    #[arg(long, env = "TIDEMARK_TARGET")]
    pub target: http::Uri,

    /// Requests per second, kept constant; 0 sends as fast as the connections allow.
    #[arg(long, env = "TIDEMARK_RATE")]
    pub rate: u64,

    /// How long to measure, after the warmup.
    #[arg(long, env = "TIDEMARK_DURATION", value_parser = duration, default_value = "10s")]
    pub duration: Duration,

    /// How long to send before measuring; those requests are not counted.
    #[arg(long, env = "TIDEMARK_WARMUP", value_parser = duration, default_value = "2s")]
    pub warmup: Duration,

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

/// Connects, sends the load that `args` describe and summarizes it.
pub async fn measure(args: &LoadgenArgs) -> anyhow::Result<Summary> {
    let (template, authority) = RequestTemplate::new(&args.target, &args.headers)?;
    let addr = request::resolve(&authority)
        .await
        .with_context(|| format!("cannot resolve {}", authority.host))?;
    let connections = open_all(addr, args.connections)
        .await
        .with_context(|| format!("cannot open connections to {}", args.target))?;
    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + args.warmup,
        end: start + args.warmup + args.duration,
    };
    let template = Arc::new(template);
    let (tally, scheduled) = match Schedule::new(args.rate) {
        Some(schedule) => {
            let total = schedule.due_before(args.warmup + args.duration);
            let first_measured = schedule.due_before(args.warmup);
            let tally = constant_rate(connections, template, schedule, total, first_measured, window).await?;
            (tally, Some(total - first_measured))
        }
        None => (closed_loop(connections, template, window).await?, None),
    };
    let shape = RunShape {
        target: args.target.to_string(),
        rate: args.rate,
        connections: connections_len(args.connections),
        duration: args.duration,
        warmup: args.warmup,
        scheduled,
    };
    Ok(Summary::new(&shape, &tally))
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

/// Sends `total` requests on the schedule; records those from `first_measured` on.
async fn constant_rate(
    connections: Vec<Connection>,
    template: Arc<RequestTemplate>,
    schedule: Schedule,
    total: u64,
    first_measured: u64,
    window: Window,
) -> anyhow::Result<Tally> {
    let permits = Arc::new(Semaphore::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let pacer = Pacer {
        schedule,
        start: window.start,
        total,
        stop_tokens: connections.len(),
        permits: permits.clone(),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let _stop_pacer = pacer.spawn()?;
    let mut workers = JoinSet::new();
    for mut connection in connections {
        let (permits, next, template) = (permits.clone(), next.clone(), template.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            let deadline = window.deadline();
            loop {
                match tokio::time::timeout_at(deadline, permits.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let scheduled = window.start + schedule.offset(i);
                let sent = Instant::now();
                let Ok(outcome) = tokio::time::timeout_at(deadline, connection.send(template.request())).await else {
                    break;
                };
                let done = Instant::now();
                if i >= first_measured {
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
    schedule: Schedule,
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
                .schedule
                .due_by(now.saturating_duration_since(self.start))
                .min(self.total);
            if due > released {
                let batch = (due - released).min(MAX_RELEASE);
                self.permits.add_permits(usize::try_from(batch).unwrap_or(usize::MAX));
                released += batch;
                continue;
            }
            let next = self.start + self.schedule.offset(released);
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
            rate,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
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

    #[tokio::test]
    async fn a_dead_target_is_an_error_before_the_run() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = measure(&args(addr, 100)).await.unwrap_err();
        assert!(format!("{error:#}").contains("cannot open connections"), "{error:#}");
    }
}
