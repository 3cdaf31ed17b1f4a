//! What a run measured: per-worker tallies, merged into one summary.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies are recorded in nanoseconds, to 3 significant digits, up to an
/// hour; longer ones are recorded as an hour.
const HIGHEST_NANOS: u64 = 3_600 * 1_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

/// One worker's measurements. Workers tally alone; tallies are merged at the end.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latencies of the 2xx responses, from the scheduled time to the end of the body.
    pub latency: Histogram<u64>,
    /// How late requests were started against their scheduled time.
    pub lag: Histogram<u64>,
    pub ok: u64,
    pub status_errors: u64,
    pub io_errors: u64,
    /// Responses (any status) to requests outside the measured window: the warmup.
    pub unmeasured_responses: u64,
    /// End of the last measured response, from the start of the measured window.
    pub last_done: Duration,
    /// Requests sent (started), warmup included.
    pub sent: u64,
    /// A trace replay's requests by the trace's tenant index (`None`: rows
    /// without a tenant), warmup included.
    pub by_tenant: BTreeMap<Option<u32>, Sent>,
}

/// How many requests one tenant of a trace sent, and how many got an HTTP
/// response (any status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sent {
    pub sent: u64,
    pub answered: u64,
}

/// How one measured request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// A response whose status is not 2xx.
    Status(u16),
    /// Connect, write or read failed.
    Io,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally {
            latency: histogram(),
            lag: histogram(),
            ok: 0,
            status_errors: 0,
            io_errors: 0,
            unmeasured_responses: 0,
            last_done: Duration::ZERO,
            sent: 0,
            by_tenant: BTreeMap::new(),
        }
    }
}

fn histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, HIGHEST_NANOS, SIGNIFICANT_DIGITS) {
        Ok(h) => h,
        // The bounds are constants that hdrhistogram accepts.
        Err(e) => unreachable!("histogram bounds are valid: {e}"),
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Tally {
    /// Records one measured request: its outcome, its latency (from the
    /// scheduled time to the end of the response), how late it was started,
    /// and when it ended (from the start of the measured window).
    pub fn record(&mut self, outcome: Outcome, latency: Duration, lag: Duration, done: Duration) {
        match outcome {
            Outcome::Ok => {
                self.ok += 1;
                self.latency.saturating_record(nanos(latency).max(1));
                self.lag.saturating_record(nanos(lag).max(1));
            }
            Outcome::Status(_) => self.status_errors += 1,
            Outcome::Io => self.io_errors += 1,
        }
        self.last_done = self.last_done.max(done);
    }

    /// Counts a request sent outside the measured window (the warmup).
    pub fn record_unmeasured(&mut self, outcome: Outcome) {
        if outcome != Outcome::Io {
            self.unmeasured_responses += 1;
        }
    }

    /// Counts a request of a trace replay, sent for `tenant` (the trace's
    /// index), and whether it got an answer (`None`: unfinished).
    pub fn record_tenant(&mut self, tenant: Option<u32>, outcome: Option<Outcome>) {
        let count = self.by_tenant.entry(tenant).or_default();
        count.sent += 1;
        if outcome.is_some_and(|o| o != Outcome::Io) {
            count.answered += 1;
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        // Same bounds on both sides, so adding cannot fail; saturate anyway.
        for v in other.latency.iter_recorded() {
            self.latency
                .saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
        for v in other.lag.iter_recorded() {
            self.lag.saturating_record_n(v.value_iterated_to(), v.count_at_value());
        }
        self.ok += other.ok;
        self.status_errors += other.status_errors;
        self.io_errors += other.io_errors;
        self.unmeasured_responses += other.unmeasured_responses;
        self.last_done = self.last_done.max(other.last_done);
        self.sent += other.sent;
        for (tenant, count) in &other.by_tenant {
            let sum = self.by_tenant.entry(*tenant).or_default();
            sum.sent += count.sent;
            sum.answered += count.answered;
        }
    }

    pub fn errors(&self) -> u64 {
        self.status_errors + self.io_errors
    }
}

/// The result of a run, as printed (and as `--json` writes it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub target: String,
    /// Requests per second asked for; 0 for as fast as possible, and for a trace replay.
    pub rate: u64,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// 2xx responses per second over the measured window.
    pub achieved_rps: f64,
    /// Measured requests that got a 2xx response.
    pub count: u64,
    /// Measured requests that failed: `status_errors + io_errors`.
    pub errors: u64,
    pub status_errors: u64,
    pub io_errors: u64,
    /// Measured requests scheduled but not finished when the run gave up on them.
    pub unfinished: u64,
    /// Every response received, whatever its status, warmup included: what
    /// the target answered (and a metering proxy should have counted).
    pub responses: u64,
    /// Requests sent, warmup included (answered or not).
    pub sent: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Median and p99 of how late requests were started: the generator's
    /// own timer slack plus, when every connection was busy, the queueing wait.
    pub lag_p50_us: f64,
    pub lag_p99_us: f64,
    /// What a trace replay sent; absent for a constant rate or a closed loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceSummary>,
}

/// The trace a run replayed, and what it sent for each tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub file: String,
    pub format: String,
    /// Requests in the trace.
    pub requests: u64,
    /// Requests of the trace the run was to send (all of them unless `--duration` cut the replay short).
    pub scheduled: u64,
    /// How many times faster than the trace.
    pub speed: f64,
    /// From the first request to the last, at that speed.
    pub span_s: f64,
    /// Per tenant: rows without one first (`tenant` absent: sent with the
    /// run's own headers), then the trace's tenants in order of first appearance.
    pub tenants: Vec<TenantSent>,
}

/// What one tenant of a trace replay sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantSent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub sent: u64,
    pub answered: u64,
}

/// The trace of a replay, for the summary.
#[derive(Debug, Clone)]
pub struct TraceShape {
    pub file: String,
    pub format: String,
    pub requests: u64,
    pub scheduled: u64,
    pub speed: f64,
    pub span: Duration,
    /// The trace's tenant names, by index.
    pub tenant_names: Vec<String>,
}

/// How the run was set up, for the summary.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub target: String,
    pub rate: u64,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Measured requests that were due (constant rate and trace replay).
    pub scheduled: Option<u64>,
    /// The trace replayed, if any.
    pub trace: Option<TraceShape>,
}

impl Summary {
    pub fn new(shape: &RunShape, tally: &Tally) -> Summary {
        let finished = tally.ok + tally.errors();
        let unfinished = shape
            .scheduled
            .map_or(0, |scheduled| scheduled.saturating_sub(finished));
        // The window is at least the asked duration: a closed loop stops
        // starting requests at its end, a constant rate schedules up to it.
        let window = tally.last_done.max(shape.duration);
        let achieved_rps = if window.is_zero() {
            0.0
        } else {
            tally.ok as f64 / window.as_secs_f64()
        };
        Summary {
            target: shape.target.clone(),
            rate: shape.rate,
            connections: shape.connections,
            duration_s: shape.duration.as_secs_f64(),
            warmup_s: shape.warmup.as_secs_f64(),
            achieved_rps: round1(achieved_rps),
            count: tally.ok,
            errors: tally.errors(),
            status_errors: tally.status_errors,
            io_errors: tally.io_errors,
            unfinished,
            responses: tally.ok + tally.status_errors + tally.unmeasured_responses,
            p50_us: quantile_us(&tally.latency, 0.50),
            p90_us: quantile_us(&tally.latency, 0.90),
            p99_us: quantile_us(&tally.latency, 0.99),
            p999_us: quantile_us(&tally.latency, 0.999),
            max_us: micros(tally.latency.max()),
            lag_p50_us: quantile_us(&tally.lag, 0.50),
            lag_p99_us: quantile_us(&tally.lag, 0.99),
            sent: tally.sent,
            trace: shape.trace.as_ref().map(|trace| TraceSummary {
                file: trace.file.clone(),
                format: trace.format.clone(),
                requests: trace.requests,
                scheduled: trace.scheduled,
                speed: trace.speed,
                span_s: trace.span.as_secs_f64(),
                tenants: tally
                    .by_tenant
                    .iter()
                    .map(|(index, count)| TenantSent {
                        tenant: index.and_then(|i| trace.tenant_names.get(usize::try_from(i).ok()?).cloned()),
                        sent: count.sent,
                        answered: count.answered,
                    })
                    .collect(),
            }),
        }
    }
}

/// The latency at `q` in microseconds, to 0.1 µs; 0 when nothing was recorded.
pub fn quantile_us(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    micros(h.value_at_quantile(q))
}

fn micros(nanos: u64) -> f64 {
    round1(nanos as f64 / 1_000.0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "target      {}", self.target)?;
        if let Some(trace) = &self.trace {
            writeln!(
                f,
                "load        trace {} ({}): {} requests over {:.1} s at {}x (latency from scheduled time), \
                 {} connections, {}s after {}s warmup",
                trace.file,
                trace.format,
                trace.requests,
                trace.span_s,
                trace.speed,
                self.connections,
                self.duration_s,
                self.warmup_s
            )?;
        } else if self.rate == 0 {
            writeln!(
                f,
                "load        as fast as possible (closed loop), {} connections, {}s after {}s warmup",
                self.connections, self.duration_s, self.warmup_s
            )?;
        } else {
            writeln!(
                f,
                "load        {} req/s constant (latency from scheduled time), {} connections, {}s after {}s warmup",
                self.rate, self.connections, self.duration_s, self.warmup_s
            )?;
        }
        writeln!(
            f,
            "achieved    {:.1} req/s: {} ok, {} errors ({} non-2xx, {} I/O), {} unfinished",
            self.achieved_rps, self.count, self.errors, self.status_errors, self.io_errors, self.unfinished
        )?;
        writeln!(f, "responses   {} in all, warmup included", self.responses)?;
        match &self.trace {
            Some(trace) => {
                write!(
                    f,
                    "sent        {} of the trace's {} requests",
                    self.sent, trace.requests
                )?;
                if trace.scheduled < trace.requests {
                    write!(f, " ({} within --duration)", trace.scheduled)?;
                }
                for (i, t) in trace.tenants.iter().enumerate() {
                    let who = t.tenant.as_deref().unwrap_or("(rows without a tenant)");
                    let sep = if i == 0 { ": " } else { ", " };
                    write!(f, "{sep}{who} {} ({} answered)", t.sent, t.answered)?;
                }
                writeln!(f)?;
            }
            None => writeln!(f, "sent        {} requests, warmup included", self.sent)?,
        }
        writeln!(
            f,
            "latency µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )?;
        write!(
            f,
            "start lag µs  p50 {:.1}  p99 {:.1}",
            self.lag_p50_us, self.lag_p99_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn shape(rate: u64, scheduled: Option<u64>) -> RunShape {
        RunShape {
            target: "http://127.0.0.1:1/".into(),
            rate,
            connections: 4,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            scheduled,
            trace: None,
        }
    }

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut t = Tally::default();
        for i in 1..=10_000 {
            t.record(Outcome::Ok, us(i), Duration::ZERO, us(i));
        }
        let s = Summary::new(&shape(10_000, Some(10_000)), &t);
        // 3 significant digits: values are within 0.1% of the true ones.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.1;
        assert!(near(s.p50_us, 5_000.0), "{}", s.p50_us);
        assert!(near(s.p90_us, 9_000.0), "{}", s.p90_us);
        assert!(near(s.p99_us, 9_900.0), "{}", s.p99_us);
        assert!(near(s.p999_us, 9_990.0), "{}", s.p999_us);
        assert!(near(s.max_us, 10_000.0), "{}", s.max_us);
        assert_eq!(s.count, 10_000);
        assert_eq!(s.unfinished, 0);
    }

    #[test]
    fn one_slow_request_in_a_thousand_shows_at_p999() {
        let mut t = Tally::default();
        for _ in 0..999 {
            t.record(Outcome::Ok, us(100), Duration::ZERO, us(1));
        }
        t.record(Outcome::Ok, Duration::from_millis(50), Duration::ZERO, us(1));
        let s = Summary::new(&shape(1000, None), &t);
        assert_eq!(s.p50_us, 100.0);
        assert_eq!(s.p99_us, 100.0);
        assert!(s.p999_us <= 100.1, "{}", s.p999_us);
        assert!((s.max_us - 50_000.0).abs() <= 50.0, "{}", s.max_us);
        let mut t2 = t.clone();
        t2.record(Outcome::Ok, Duration::from_millis(50), Duration::ZERO, us(1));
        let s2 = Summary::new(&shape(1000, None), &t2);
        assert!(s2.p999_us >= 49_950.0, "{}", s2.p999_us);
    }

    #[test]
    fn errors_are_counted_but_not_timed() {
        let mut t = Tally::default();
        t.record(Outcome::Ok, us(100), us(3), us(10));
        t.record(Outcome::Status(502), us(1), Duration::ZERO, us(20));
        t.record(Outcome::Io, us(1), Duration::ZERO, us(30));
        t.record_unmeasured(Outcome::Ok);
        t.record_unmeasured(Outcome::Status(500));
        t.record_unmeasured(Outcome::Io);
        let s = Summary::new(&shape(10, Some(5)), &t);
        assert_eq!((s.count, s.errors), (1, 2));
        assert_eq!(s.responses, 4);
        assert_eq!((s.status_errors, s.io_errors), (1, 1));
        assert_eq!(s.unfinished, 2);
        assert_eq!(s.p50_us, 100.0);
        assert_eq!(s.lag_p50_us, 3.0);
    }

    #[test]
    fn merging_adds_up() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        for _ in 0..3 {
            a.record(Outcome::Ok, us(10), Duration::ZERO, us(5));
        }
        b.record(Outcome::Ok, us(1000), Duration::ZERO, Duration::from_secs(2));
        b.record(Outcome::Io, us(1), Duration::ZERO, us(1));
        b.record_unmeasured(Outcome::Ok);
        a.merge(&b);
        assert_eq!((a.ok, a.io_errors, a.unmeasured_responses), (4, 1, 1));
        assert_eq!(a.latency.len(), 4);
        assert_eq!(a.last_done, Duration::from_secs(2));
        assert!(a.latency.max() >= 999_000);
    }

    #[test]
    fn achieved_rate_is_over_the_window() {
        let mut t = Tally::default();
        for i in 0..500 {
            t.record(Outcome::Ok, us(50), Duration::ZERO, us(i * 2_000));
        }
        // Finished within the asked second: 500 in 1 s.
        assert_eq!(Summary::new(&shape(500, None), &t).achieved_rps, 500.0);
        // The last one ended at 2 s: 501 in 2 s.
        t.record(Outcome::Ok, us(50), Duration::ZERO, Duration::from_secs(2));
        assert_eq!(Summary::new(&shape(500, None), &t).achieved_rps, 250.5);
    }

    #[test]
    fn a_replay_reports_what_each_tenant_sent() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        for _ in 0..3 {
            a.sent += 1;
            a.record(Outcome::Ok, us(10), Duration::ZERO, us(5));
            a.record_tenant(Some(1), Some(Outcome::Ok));
        }
        b.sent += 3;
        b.record_tenant(Some(0), Some(Outcome::Status(503)));
        b.record_tenant(Some(0), Some(Outcome::Io));
        b.record_tenant(None, None);
        a.merge(&b);
        let mut replay = shape(0, Some(6));
        replay.trace = Some(TraceShape {
            file: "t.csv".into(),
            format: "csv".into(),
            requests: 7,
            scheduled: 6,
            speed: 2.0,
            span: Duration::from_millis(1500),
            tenant_names: vec!["acme".into(), "beta".into()],
        });
        let s = Summary::new(&replay, &a);
        assert_eq!(s.sent, 6);
        let trace = s.trace.clone().expect("a trace summary");
        let tenants: Vec<(Option<&str>, u64, u64)> = trace
            .tenants
            .iter()
            .map(|t| (t.tenant.as_deref(), t.sent, t.answered))
            .collect();
        assert_eq!(tenants, vec![(None, 1, 0), (Some("acme"), 2, 1), (Some("beta"), 3, 3)]);
        let text = s.to_string();
        assert!(
            text.contains("load        trace t.csv (csv): 7 requests over 1.5 s at 2x"),
            "{text}"
        );
        assert!(
            text.contains(
                "sent        6 of the trace's 7 requests (6 within --duration): (rows without a tenant) 1 (0 answered), \
                 acme 2 (1 answered), beta 3 (3 answered)"
            ),
            "{text}"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["trace"]["tenants"][1]["tenant"], "acme");
        assert_eq!(json["trace"]["tenants"][1]["sent"], 2);
        assert!(json["trace"]["tenants"][0].get("tenant").is_none(), "{json}");
    }

    #[test]
    fn an_empty_run_reports_zeros() {
        let s = Summary::new(&shape(0, None), &Tally::default());
        assert_eq!((s.count, s.p50_us, s.max_us, s.achieved_rps), (0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn json_has_the_documented_keys() {
        let s = Summary::new(&shape(0, None), &Tally::default());
        let json = serde_json::to_value(&s).unwrap();
        for key in [
            "target",
            "rate",
            "achieved_rps",
            "count",
            "errors",
            "p50_us",
            "p90_us",
            "p99_us",
            "p999_us",
            "max_us",
            "responses",
            "sent",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert!(json.get("trace").is_none(), "only a replay has a trace: {json}");
    }
}
