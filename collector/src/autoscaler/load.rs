//! Load windows: the exact total load of a service over a window, from
//! every instance's reports.
//!
//! Each sidecar report closes a window of length `d` at time `at` and says
//! how busy the instance was over `(at - d, at]`: a rate per metric, held
//! for that interval. Per instance we keep the reports of the last stable
//! window in a ring, sorted by `at`.
//!
//! The service's load over a window `W` ending at `now` is an integral, not
//! a sum of averages:
//!
//! ```text
//! load_W(now) = ( Σ over every instance, gone ones included, of each
//!                 report's rate × |(at - d, at] ∩ (now - W, now]|
//!               + Σ over every instance not gone, its newest report's rate
//!                 × min(W, now - newest.at) )
//!             ÷ min(W, now - first_start)
//! ```
//!
//! - concurrency: `c × covered µs` (time-weighted requests in flight);
//! - rps: `requests × covered / d` (a report's requests spread evenly over
//!   its interval), per second of the divisor;
//! - cpu: `cpu × covered / d`, giving cores (CPU time per wall time).
//!
//! A report that straddles `now - W` counts for its part inside the window;
//! one ending exactly at `now - W` is out. `first_start` is the start
//! `at - d` of the first report recorded for the service (reports dropped
//! as too old do not count): a window reaching back before it is divided
//! by the time actually measured, so a young service does not read low.
//!
//! Why integrals: averages per instance do not add up when instances come
//! and go. After a scale-down, the remaining instances' averages cover a
//! period when the load was spread over more instances, so their sum reads
//! low (27 of 36.4 in the simulator) and the count cycles. The integral of
//! the total is the sum of the instances' integrals whatever the count did.
//! A consequence: time nobody reported for (a report lost, or an instance
//! gone before its replacement reported) counts as no load, and a late
//! report that fills it in raises the total.
//!
//! Every instance is counted, not a sample of them (Knative's KPA scrapes a
//! subset of pods and extrapolates), so the total is exact up to the
//! reports' own precision.
//!
//! An instance's state at `now` follows from its newest report, `age = now - at`:
//!
//! - *reporting*: `age <= late_after = max(2 × its last window, 1s)`;
//! - *late*: older than that but `age <= instance_timeout`;
//! - *gone*: older than `instance_timeout`. Counted as gone until its newest
//!   report leaves the stable window; then it is forgotten.
//!
//! For a reporting or late instance the newest report's rates are carried
//! forward over `(at, now]` (capped at the window), as if it had kept
//! reporting them: a report not yet due, or overdue, is not a drop in load
//! (and turning late changes no number). A gone instance is not carried: its
//! reports inside the window still count (that load happened), the time
//! since its last report does not.
//!
//! Each report must be recorded once: deduplication on `(session, seq)` is
//! the caller's (the usage log's consumers do it).
//!
//! Reports may arrive out of order: a report older than the newest one is
//! placed by time and counts if it falls inside a window, but it does not
//! change the instance's state. Recording a report is O(1) amortized (it is
//! placed by scanning back from the newest, which is where reports arrive);
//! evaluating is O(instances + reports in the stable window) with no
//! allocation.

use std::collections::{HashMap, VecDeque};

use super::policy::{Metric, Policy, micros};

/// One sidecar report for one instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation<'a> {
    pub instance: &'a str,
    /// When the report's window closed, on the autoscaler's clock (µs since the Unix epoch).
    pub at_micros: i64,
    /// Length of the report's window, > 0.
    pub window_micros: i64,
    /// Time-weighted average of requests in flight over the window.
    pub concurrency: f64,
    /// Requests finished in the window.
    pub requests: u64,
    /// CPU time used in the window (0 if not sampled).
    pub cpu_micros: u64,
}

/// Reports kept per instance at most: 60 s of 250 ms reports is 240, so this
/// only binds for very long stable windows or runaway reporters.
pub const MAX_SAMPLES_PER_INSTANCE: usize = 4096;

/// An instance is late once its newest report is older than this many of its windows...
const LATE_AFTER_WINDOWS: i64 = 2;
/// ...and never sooner than this.
const MIN_LATE_AFTER_MICROS: i64 = 1_000_000;

const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// One metric value per metric.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MetricValues {
    pub concurrency: f64,
    pub rps: f64,
    pub cpu: f64,
}

impl MetricValues {
    pub fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Concurrency => self.concurrency,
            Metric::Rps => self.rps,
            Metric::Cpu => self.cpu,
        }
    }

    /// True when every metric is exactly 0: nothing at all happened.
    pub fn is_zero(&self) -> bool {
        self.concurrency == 0.0 && self.rps == 0.0 && self.cpu == 0.0
    }
}

/// The service's load at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Total over the stable window.
    pub stable: MetricValues,
    /// Total over the panic window.
    pub panic: MetricValues,
    pub reporting: u32,
    pub late: u32,
    pub gone: u32,
}

/// The windows an evaluation uses, in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spans {
    stable: i64,
    panic: i64,
    timeout: i64,
}

impl Spans {
    fn of(policy: &Policy) -> Spans {
        Spans {
            stable: micros(policy.stable_window).max(1),
            panic: micros(policy.panic_window).max(1),
            timeout: micros(policy.instance_timeout),
        }
    }
}

/// One report, reduced to what the windows need.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: i64,
    window: i64,
    concurrency: f64,
    requests: f64,
    cpu_micros: f64,
}

impl Sample {
    /// The report as a sample; `None` if it covers no time. Non-finite or
    /// negative concurrency counts as 0.
    fn of(obs: &Observation<'_>) -> Option<Sample> {
        if obs.window_micros <= 0 {
            return None;
        }
        let concurrency = if obs.concurrency.is_finite() && obs.concurrency > 0.0 {
            obs.concurrency
        } else {
            0.0
        };
        Some(Sample {
            at: obs.at_micros,
            window: obs.window_micros,
            concurrency,
            requests: obs.requests as f64,
            cpu_micros: obs.cpu_micros as f64,
        })
    }
}

/// Integrals over one window: each metric's rate times the time it lasted,
/// clipped to the window. Integrals add across instances, averages do not.
#[derive(Debug, Clone, Copy, Default)]
struct Integral {
    /// Σ concurrency × covered µs.
    concurrency_micros: f64,
    requests: f64,
    cpu_micros: f64,
}

impl Integral {
    /// Adds the part of `s` (which covers `(s.at - s.window, s.at]`) after `from`.
    fn add_after(&mut self, s: &Sample, from: i64) {
        let covered = s.at.saturating_sub(s.at.saturating_sub(s.window).max(from));
        if covered <= 0 {
            return;
        }
        let share = covered as f64 / s.window as f64;
        self.concurrency_micros += s.concurrency * covered as f64;
        self.requests += s.requests * share;
        self.cpu_micros += s.cpu_micros * share;
    }

    /// Adds `gap` µs at `s`'s rates, as if it had gone on reporting them.
    fn carry(&mut self, s: &Sample, gap: i64) {
        if gap <= 0 {
            return;
        }
        let share = gap as f64 / s.window as f64;
        self.concurrency_micros += s.concurrency * gap as f64;
        self.requests += s.requests * share;
        self.cpu_micros += s.cpu_micros * share;
    }

    fn add(&mut self, other: &Integral) {
        self.concurrency_micros += other.concurrency_micros;
        self.requests += other.requests;
        self.cpu_micros += other.cpu_micros;
    }

    /// The average rates over `span` µs.
    fn over(&self, span: i64) -> MetricValues {
        let span = span.max(1) as f64;
        MetricValues {
            concurrency: self.concurrency_micros / span,
            rps: self.requests * MICROS_PER_SECOND / span,
            cpu: self.cpu_micros / span,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reporting,
    Late,
    Gone,
}

/// One instance's recent reports.
#[derive(Debug)]
struct Instance {
    /// Sorted by `at`, oldest first; at most [`MAX_SAMPLES_PER_INSTANCE`].
    samples: VecDeque<Sample>,
    /// The newest report ever seen; kept after the ring drops it, because a
    /// late instance's load is carried forward from it.
    newest: Sample,
}

impl Instance {
    fn new(sample: Sample) -> Instance {
        let mut samples = VecDeque::with_capacity(16);
        samples.push_back(sample);
        Instance {
            samples,
            newest: sample,
        }
    }

    /// Places `sample`; false when it is dropped as too old to matter.
    fn record(&mut self, sample: Sample, stable: i64) -> bool {
        if sample.at > self.newest.at {
            self.newest = sample;
        } else if sample.at <= self.newest.at.saturating_sub(stable) {
            // Too old for any window that ends at or after the newest report.
            return false;
        }
        // Reports arrive in order almost always: scan back from the newest.
        let pos = self
            .samples
            .iter()
            .rposition(|s| s.at <= sample.at)
            .map_or(0, |i| i + 1);
        self.samples.insert(pos, sample);
        if self.samples.len() > MAX_SAMPLES_PER_INSTANCE {
            self.samples.pop_front();
        }
        self.prune(self.newest.at.saturating_sub(stable));
        true
    }

    /// Drops samples with `at <= horizon`.
    fn prune(&mut self, horizon: i64) {
        while self.samples.front().is_some_and(|s| s.at <= horizon) {
            self.samples.pop_front();
        }
    }

    fn state(&self, now: i64, timeout: i64) -> State {
        let age = now.saturating_sub(self.newest.at);
        let late_after = self
            .newest
            .window
            .saturating_mul(LATE_AFTER_WINDOWS)
            .max(MIN_LATE_AFTER_MICROS);
        if age > timeout {
            State::Gone
        } else if age > late_after {
            State::Late
        } else {
            State::Reporting
        }
    }

    /// This instance's (stable, panic) integrals over the windows ending at
    /// `now`. Unless it is gone, the time since its newest report is filled
    /// at that report's rates: a report not yet due (or overdue, while late)
    /// is not a drop in load.
    fn integrals(&self, now: i64, spans: Spans, state: State) -> (Integral, Integral) {
        let mut stable = Integral::default();
        let mut panic = Integral::default();
        let (stable_from, panic_from) = (now.saturating_sub(spans.stable), now.saturating_sub(spans.panic));
        for s in self.samples.iter().rev() {
            if s.at > now {
                continue; // from the future (clock skew): not in a window ending now
            }
            if s.at <= stable_from {
                break;
            }
            stable.add_after(s, stable_from);
            panic.add_after(s, panic_from);
        }
        if state != State::Gone {
            let gap = now.saturating_sub(self.newest.at);
            stable.carry(&self.newest, gap.min(spans.stable));
            panic.carry(&self.newest, gap.min(spans.panic));
        }
        (stable, panic)
    }
}

/// The reports of one service's instances, and the integrals over them.
#[derive(Debug)]
pub struct LoadWindows {
    instances: HashMap<String, Instance>,
    spans: Spans,
    /// Where the first report recorded began: windows reaching further back
    /// are measured from here, not padded with load nobody measured.
    first_start: Option<i64>,
}

impl LoadWindows {
    pub fn new(policy: &Policy) -> LoadWindows {
        LoadWindows {
            instances: HashMap::new(),
            spans: Spans::of(policy),
            first_start: None,
        }
    }

    /// Takes a new policy's windows; the reports kept stay.
    pub fn set_policy(&mut self, policy: &Policy) {
        self.spans = Spans::of(policy);
    }

    /// Records one report. Reports that cover no time (`window_micros <= 0`)
    /// are ignored.
    pub fn record(&mut self, obs: &Observation<'_>) {
        let Some(sample) = Sample::of(obs) else {
            return;
        };
        let kept = match self.instances.get_mut(obs.instance) {
            Some(instance) => instance.record(sample, self.spans.stable),
            None => {
                self.instances.insert(obs.instance.to_owned(), Instance::new(sample));
                true
            }
        };
        // A report dropped as too old adds no load, so it must not stretch
        // the measured time either (that would dilute every total).
        if kept {
            let start = sample.at.saturating_sub(sample.window);
            self.first_start = Some(self.first_start.map_or(start, |first| first.min(start)));
        }
    }

    /// True once any report has been recorded.
    pub fn observed(&self) -> bool {
        self.first_start.is_some()
    }

    /// How long the reports cover at `now`: from the start of the first
    /// report recorded (0 before any).
    pub fn measured(&self, now: i64) -> i64 {
        now.saturating_sub(self.first_start.unwrap_or(now))
    }

    /// Instances known (reporting, late or gone but not yet forgotten).
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    /// The service's load at `now`. Drops reports older than the stable
    /// window and forgets gone instances whose newest report is that old.
    pub fn evaluate(&mut self, now: i64) -> Load {
        let spans = self.spans;
        let horizon = now.saturating_sub(spans.stable);
        let mut load = Load::default();
        let (mut stable, mut panic) = (Integral::default(), Integral::default());
        self.instances.retain(|_, instance| {
            let state = instance.state(now, spans.timeout);
            let (s, p) = instance.integrals(now, spans, state);
            stable.add(&s);
            panic.add(&p);
            match state {
                State::Gone => load.gone += 1,
                State::Late => load.late += 1,
                State::Reporting => load.reporting += 1,
            }
            instance.prune(horizon);
            state != State::Gone || instance.newest.at > horizon
        });
        let measured = self.measured(now);
        load.stable = stable.over(spans.stable.min(measured));
        load.panic = panic.over(spans.panic.min(measured));
        load
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SECOND: i64 = 1_000_000;
    const MS: i64 = 1_000;

    fn policy(stable_secs: u64, panic_secs: u64, timeout_secs: u64) -> Policy {
        Policy {
            stable_window: Duration::from_secs(stable_secs),
            panic_window: Duration::from_secs(panic_secs),
            instance_timeout: Duration::from_secs(timeout_secs),
            ..Policy::default()
        }
    }

    fn obs(instance: &str, at: i64, window: i64, concurrency: f64, requests: u64, cpu_micros: u64) -> Observation<'_> {
        Observation {
            instance,
            at_micros: at,
            window_micros: window,
            concurrency,
            requests,
            cpu_micros,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn integrals_per_metric_over_the_measured_time() {
        let mut windows = LoadWindows::new(&policy(60, 6, 10));
        // a: (9, 10] at concurrency 2 and (10, 13] at concurrency 6;
        // b: (9, 13] at 1. Reports began at 9 s, so at 13 s the 60 s window
        // is measured over min(60, 13 - 9) = 4 s.
        // Concurrency (2·1 + 6·3 + 1·4) / 4 = 6. Requests (10 + 30 + 16) /
        // 4 s = 14/s. CPU (0.5 + 2.5 + 1) s / 4 s = 1 core.
        windows.record(&obs("a", 10 * SECOND, SECOND, 2.0, 10, 500_000));
        windows.record(&obs("a", 13 * SECOND, 3 * SECOND, 6.0, 30, 2_500_000));
        windows.record(&obs("b", 13 * SECOND, 4 * SECOND, 1.0, 16, 1_000_000));
        let load = windows.evaluate(13 * SECOND);
        assert!(close(load.stable.concurrency, 6.0), "{load:?}");
        assert!(close(load.stable.rps, 14.0), "{load:?}");
        assert!(close(load.stable.cpu, 1.0), "{load:?}");
        // The panic window (7 s, 13 s] is also measured over (9, 13].
        assert_eq!(load.panic, load.stable);
        assert_eq!((load.reporting, load.late, load.gone), (2, 0, 0));
    }

    #[test]
    fn windows_take_reports_by_their_end_time() {
        let mut windows = LoadWindows::new(&policy(10, 2, 10));
        // One report per second at 1, 2, ..., 20 with concurrency = its second.
        for t in 1..=20 {
            windows.record(&obs("a", t * SECOND, SECOND, t as f64, 0, 0));
        }
        let load = windows.evaluate(20 * SECOND);
        // Stable (10, 20]: the reports ending at 11..=20, (11 + ... + 20) / 10
        // = 155 / 10 = 15.5; the one ending at 10 = now - W adds nothing.
        // Panic (18, 20]: (19 + 20) / 2 = 19.5.
        assert!(close(load.stable.concurrency, 15.5), "{load:?}");
        assert!(close(load.panic.concurrency, 19.5), "{load:?}");
        // Half a second later the windows cut reports by time: stable
        // (10.5, 20.5] takes the second half of (10, 11] (0.5 × 11 = 5.5),
        // 12..=20 whole (144) and 0.5 s carried at 20 (10): 159.5 / 10 =
        // 15.95. Panic (18.5, 20.5]: 0.5 × 19 + 20 + 0.5 × 20 = 39.5, / 2 =
        // 19.75.
        let load = windows.evaluate(20 * SECOND + 500 * MS);
        assert!(close(load.stable.concurrency, 15.95), "{load:?}");
        assert!(close(load.panic.concurrency, 19.75), "{load:?}");
    }

    #[test]
    fn a_late_report_older_than_the_newest_still_counts() {
        let mut windows = LoadWindows::new(&policy(10, 2, 10));
        windows.record(&obs("a", 20 * SECOND, SECOND, 4.0, 0, 0));
        windows.record(&obs("a", 18 * SECOND, SECOND, 1.0, 0, 0));
        windows.record(&obs("a", 19 * SECOND, SECOND, 7.0, 0, 0));
        // Older than the stable window before the newest: dropped at once.
        windows.record(&obs("a", 5 * SECOND, SECOND, 100.0, 0, 0));
        let load = windows.evaluate(20 * SECOND);
        // Kept reports cover (17, 20]: (1 + 7 + 4) / 3 = 4. The dropped one
        // does not stretch the measured time back to 4 s (which would
        // read 12 / 10 = 1.2).
        assert!(close(load.stable.concurrency, 4.0), "{load:?}");
        // Panic (18, 20]: (7 + 4) / 2 = 5.5.
        assert!(close(load.panic.concurrency, 5.5), "{load:?}");
        assert_eq!(load.reporting, 1);
    }

    #[test]
    fn late_instances_carry_their_newest_rates_forward() {
        let mut windows = LoadWindows::new(&policy(10, 2, 10));
        for t in 1..=10 {
            windows.record(&obs("a", t * SECOND, SECOND, 3.0, 20, 0));
        }
        // Within 2 × 1 s the instance is reporting; the 2 s since its newest
        // report are carried at its rates. Stable (2, 12]: 8 s + 2 s at 3.
        let load = windows.evaluate(12 * SECOND);
        assert_eq!((load.reporting, load.late), (1, 0));
        assert!(close(load.stable.concurrency, 3.0), "{load:?}");
        // Panic (10, 12] holds no report: all carried, 3 in flight and
        // 20 requests per 1 s report → 40 requests / 2 s = 20/s.
        assert!(close(load.panic.concurrency, 3.0), "{load:?}");
        assert!(close(load.panic.rps, 20.0), "{load:?}");
        // 5 s silent: late. Stable (5, 15]: 5 real seconds + 5 carried at 3.0.
        let load = windows.evaluate(15 * SECOND);
        assert_eq!((load.reporting, load.late, load.gone), (0, 1, 0));
        assert!(close(load.stable.concurrency, 3.0), "{load:?}");
        assert!(close(load.stable.rps, 20.0), "{load:?}");
        assert!(close(load.panic.concurrency, 3.0), "{load:?}");
    }

    #[test]
    fn the_carry_weighs_the_newest_report_over_the_gap() {
        let mut windows = LoadWindows::new(&policy(10, 2, 10));
        for t in 1..=8 {
            windows.record(&obs("a", t * SECOND, SECOND, 1.0, 0, 0));
        }
        windows.record(&obs("a", 10 * SECOND, 2 * SECOND, 5.0, 0, 0));
        // At 14 s (late_after = 4 s, age 4 s): still reporting, and carried
        // all the same. Stable (4, 14]: 5..=8 (4 s at 1), (8, 10] (2 s at 5),
        // (10, 14] carried at 5 (4 s): (4 + 10 + 20) / 10 = 3.4.
        let load = windows.evaluate(14 * SECOND);
        assert_eq!(load.reporting, 1);
        assert!(close(load.stable.concurrency, (4.0 + 10.0 + 20.0) / 10.0), "{load:?}");
        // At 15 s: late. (5, 15]: 6..=8 (3 s at 1), 10 (2 s at 5), 5 s carried
        // at 5. Turning late changes nothing but the count: no jump.
        let load = windows.evaluate(15 * SECOND);
        assert_eq!(load.late, 1);
        assert!(close(load.stable.concurrency, (3.0 + 10.0 + 25.0) / 10.0), "{load:?}");
        // The newest report: 8 requests in 2 s. 5 s carried is 20 requests;
        // the earlier reports had none: 20 / 10 s = 2/s.
        windows.record(&obs("a", 16 * SECOND, 2 * SECOND, 5.0, 8, 0));
        let load = windows.evaluate(19 * SECOND);
        // (9, 19]: (9, 10] of the 2 s report at 5 with 0 requests, the gap
        // (10, 14] nobody reported (0), (14, 16] at 5 with 8 requests, and
        // (16, 19] carried: 3 s at 5, 8 × 3 / 2 = 12 requests.
        // Concurrency (5 + 10 + 15) / 10 = 3; rps (8 + 12) / 10 = 2.
        assert!(close(load.stable.concurrency, 3.0), "{load:?}");
        assert!(close(load.stable.rps, 2.0), "{load:?}");
    }

    #[test]
    fn gone_instances_keep_their_past_then_are_forgotten() {
        let mut windows = LoadWindows::new(&policy(10, 2, 5));
        // a reports (t - 1, t] at 3 for t in 1..=10 and stops; b reports at 4
        // until 16 s.
        for t in 1..=10 {
            windows.record(&obs("a", t * SECOND, SECOND, 3.0, 0, 0));
        }
        for t in 1..=16 {
            windows.record(&obs("b", t * SECOND, SECOND, 4.0, 0, 0));
        }
        let load = windows.evaluate(16 * SECOND);
        assert_eq!((load.reporting, load.late, load.gone), (1, 0, 1));
        // Stable (6, 16]: a's reports in (6, 10] count (4 s at 3 = 12) and
        // nothing is carried after its last one (a late a would add 6 s at
        // 3); b gives 10 s at 4 = 40: 52 / 10 = 5.2.
        assert!(close(load.stable.concurrency, 5.2), "{load:?}");
        // Panic (14, 16]: b alone, 4.
        assert!(close(load.panic.concurrency, 4.0), "{load:?}");
        assert_eq!(windows.instances(), 2);
        // At 20 s, a's newest (10 s) is on the stable window's edge: counted
        // as gone, adds nothing (its reports end by 10), then forgotten. b is
        // late (age 4 s > 2 s) and carried: (10, 16] 6 s + 4 s carried at 4
        // = 40, / 10 = 4.
        let load = windows.evaluate(20 * SECOND);
        assert_eq!((load.late, load.gone), (1, 1));
        assert!(close(load.stable.concurrency, 4.0), "{load:?}");
        assert_eq!(windows.instances(), 1);
        let load = windows.evaluate(20 * SECOND);
        assert_eq!(load.gone, 0);
        // b comes back to life after being gone: reporting again. Stable
        // (20, 30] holds only (29, 30] at 2 (its reports up to 16 s are out,
        // and the time it was gone is not carried): 2 / 10 = 0.2. Panic
        // (28, 30]: 2 / 2 = 1.
        windows.record(&obs("b", 30 * SECOND, SECOND, 2.0, 0, 0));
        let load = windows.evaluate(30 * SECOND);
        assert_eq!((load.reporting, load.gone), (1, 0));
        assert!(close(load.stable.concurrency, 0.2), "{load:?}");
        assert!(close(load.panic.concurrency, 1.0), "{load:?}");
    }

    #[test]
    fn bad_reports_harm_nothing() {
        let mut windows = LoadWindows::new(&policy(10, 2, 10));
        windows.record(&obs("a", 10 * SECOND, 0, 50.0, 5, 5));
        assert!(!windows.observed());
        windows.record(&obs("a", 10 * SECOND, SECOND, f64::NAN, 0, 0));
        windows.record(&obs("b", 10 * SECOND, SECOND, f64::INFINITY, 0, 0));
        windows.record(&obs("c", 10 * SECOND, SECOND, -3.0, 0, 0));
        assert!(windows.observed());
        let load = windows.evaluate(10 * SECOND);
        assert_eq!(load.stable.concurrency, 0.0);
        assert_eq!(load.reporting, 3);
    }

    #[test]
    fn rings_are_bounded() {
        let mut windows = LoadWindows::new(&policy(3600, 6, 10));
        for i in 0..(MAX_SAMPLES_PER_INSTANCE as i64 + 100) {
            windows.record(&obs("a", i * 100 * MS, 100 * MS, 1.0, 0, 0));
        }
        let instance = windows.instances.get("a").expect("known");
        assert_eq!(instance.samples.len(), MAX_SAMPLES_PER_INSTANCE);
        // And a normal window keeps only what is inside it.
        let mut windows = LoadWindows::new(&policy(10, 2, 10));
        for i in 0..1000 {
            windows.record(&obs("a", i * 250 * MS, 250 * MS, 1.0, 0, 0));
        }
        let instance = windows.instances.get("a").expect("known");
        assert_eq!(instance.samples.len(), 40);
    }
}
