//! A port of Knative Serving's KPA (Knative Pod Autoscaler), written from a
//! reading of its source, for the simulator's baseline:
//!
//! - `pkg/autoscaler/metrics/collector.go` and `stats_scraper.go`: every
//!   second the collector scrapes the ready pods' queue-proxies, averages
//!   their concurrency and multiplies the average by the ready pod count (with
//!   every pod observed, as here, that is the total); the activator's own
//!   stat (requests it holds) is recorded beside it. Each stat goes into 1 s
//!   buckets of a stable-window and a panic-window aggregation.
//! - `pkg/autoscaler/aggregation/bucketing.go` (`TimedFloat64Buckets`): a
//!   ring of 1 s buckets; `WindowAverage` sums the buckets in the window and
//!   divides by the number of buckets, or by fewer when data started less
//!   than a window ago or stopped some time ago; after a whole window
//!   without data it is empty.
//! - `pkg/autoscaler/scaling/autoscaler.go` (`Scale`), every 2 s tick:
//!   `ready = max(1, ready pods)`, `maxScaleUp = ceil(maxScaleUpRate × ready)`,
//!   `maxScaleDown = floor(ready / maxScaleDownRate)`, stable and panic counts
//!   `ceil(observed / target)`, each clamped into `[maxScaleDown, maxScaleUp]`;
//!   panic starts when `panic count / ready >= panic threshold`, is extended
//!   while it holds, and ends a stable window after it last held; in panic the
//!   count is the larger of the two and never goes down (`maxPanicPods`). The
//!   autoscaler starts in panic when it starts with more than one ready pod.
//!   No data means no decision. (Scale-down delay: Knative's default 0, so none.)
//! - `pkg/reconciler/autoscaling/kpa/scaler.go`: the result is bounded by
//!   min/max scale; going to zero (only when the minimum is 0) waits until
//!   the count asked for has been 0 for the scale-to-zero grace period (30 s),
//!   and the activator, holding a request for a revision at zero, has it
//!   scaled to one at once.
//!
//! Defaults are Knative's: stable window 60 s, panic window 6 s (10 %), panic
//! threshold 200 %, max scale up rate 1000, max scale down rate 2. The target
//! per pod is the same `target × utilization` Tidemark's policy computes
//! against, so that both aim at the same load per instance.

use std::collections::BTreeMap;

use super::engine::{Report, Scaler, View};

const SECOND: i64 = 1_000_000;

/// The KPA's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KpaConfig {
    /// Concurrency per pod aimed at (Knative's `TargetValue`: target × utilization).
    pub target: f64,
    pub min_scale: u32,
    pub max_scale: u32,
    pub stable_window_micros: i64,
    pub panic_window_micros: i64,
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_to_zero_grace_micros: i64,
    /// Pods ready when the autoscaler starts.
    pub initial_ready: u32,
}

impl KpaConfig {
    /// Knative's defaults around `target`, bounded by `min_scale..=max_scale`.
    pub fn knative_defaults(target: f64, min_scale: u32, max_scale: u32, initial_ready: u32) -> KpaConfig {
        KpaConfig {
            target,
            min_scale,
            max_scale,
            stable_window_micros: 60 * SECOND,
            panic_window_micros: 6 * SECOND,
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_to_zero_grace_micros: 30 * SECOND,
            initial_ready,
        }
    }
}

/// Knative's `TimedFloat64Buckets`: values summed per 1 s bucket, averaged over a window.
#[derive(Debug, Clone)]
struct Buckets {
    buckets: Vec<f64>,
    window: i64,
    granularity: i64,
    first_write: i64,
    last_write: i64,
    total: f64,
    written: bool,
}

impl Buckets {
    fn new(window: i64, granularity: i64) -> Buckets {
        let n = ((window + granularity - 1) / granularity).max(1) as usize;
        Buckets {
            buckets: vec![0.0; n],
            window,
            granularity,
            first_write: 0,
            last_write: 0,
            total: 0.0,
            written: false,
        }
    }

    fn index(&self, t: i64) -> usize {
        (t / self.granularity).rem_euclid(self.buckets.len() as i64) as usize
    }

    fn truncate(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.granularity)
    }

    fn record(&mut self, at: i64, value: f64) {
        let bucket = self.truncate(at);
        if !self.written || bucket - self.last_write >= self.window {
            // First write, or nothing for a whole window: start afresh.
            self.buckets.iter_mut().for_each(|b| *b = 0.0);
            self.total = 0.0;
            self.first_write = bucket;
            self.last_write = bucket;
            self.written = true;
        } else if bucket < self.last_write {
            if bucket + self.window <= self.last_write {
                return; // older than the window
            }
        } else if bucket > self.last_write {
            // Clear the buckets skipped since the last write.
            let mut t = self.last_write + self.granularity;
            while t <= bucket {
                let i = self.index(t);
                self.total -= self.buckets[i];
                self.buckets[i] = 0.0;
                t += self.granularity;
            }
            self.last_write = bucket;
        }
        let i = self.index(bucket);
        self.buckets[i] += value;
        self.total += value;
    }

    fn is_empty(&self, now: i64) -> bool {
        !self.written || self.truncate(now) - self.last_write > self.window
    }

    fn window_average(&self, now: i64) -> f64 {
        let now = self.truncate(now);
        if self.is_empty(now) {
            return 0.0;
        }
        let n = self.buckets.len() as i64;
        let since_first = (self.last_write - self.first_write) / self.granularity + 1;
        let d = now - self.last_write;
        if d <= 0 {
            self.total / since_first.min(n) as f64
        } else if d < self.window {
            let mut total = self.total;
            let mut t = self.last_write + self.granularity;
            while t <= now {
                total -= self.buckets[self.index(t)];
                t += self.granularity;
            }
            let skipped = d / self.granularity;
            let buckets = since_first.min(n - skipped).max(1);
            total / buckets as f64
        } else {
            0.0
        }
    }
}

/// The KPA: collector, decider and the reconciler's bounds.
#[derive(Debug, Clone)]
pub struct Kpa {
    cfg: KpaConfig,
    stable: Buckets,
    panic: Buckets,
    /// Reports since the last scrape: per pod, Σ(concurrency × window) and Σwindow.
    pending: BTreeMap<u32, (f64, i64)>,
    /// The activator's queue area already scraped.
    activator_seen: f64,
    panic_since: Option<i64>,
    max_panic_pods: u32,
    ticks: u64,
    /// Since when the decider has asked for 0.
    zero_since: Option<i64>,
}

impl Kpa {
    pub fn new(cfg: KpaConfig) -> Kpa {
        Kpa {
            stable: Buckets::new(cfg.stable_window_micros, SECOND),
            panic: Buckets::new(cfg.panic_window_micros, SECOND),
            pending: BTreeMap::new(),
            activator_seen: 0.0,
            // Knative starts in panic mode over more than one ready pod, so that a
            // restarted autoscaler does not scale down before it has data.
            panic_since: (cfg.initial_ready > 1).then_some(0),
            max_panic_pods: cfg.initial_ready,
            ticks: 0,
            zero_since: None,
            cfg,
        }
    }

    /// The 1 s scrape: the ready pods' average × ready count, plus the activator.
    fn scrape(&mut self, view: &View<'_>) {
        let now = view.now_micros;
        let mut stat: Option<f64> = None;
        if !self.pending.is_empty() {
            let pods = self.pending.len() as f64;
            let average = self
                .pending
                .values()
                .map(|(area, window)| area / (*window).max(1) as f64)
                .sum::<f64>()
                / pods;
            stat = Some(average * view.ready.len() as f64);
            self.pending.clear();
        }
        let activator_area = view.unreported_queue_area - self.activator_seen;
        self.activator_seen = view.unreported_queue_area;
        if activator_area > 0.0 {
            *stat.get_or_insert(0.0) += activator_area / SECOND as f64;
        }
        if let Some(value) = stat {
            self.stable.record(now, value);
            self.panic.record(now, value);
        }
    }

    /// `autoscaler.go`'s `Scale`: the desired count, or `None` without data.
    fn scale(&mut self, view: &View<'_>) -> Option<u32> {
        let now = view.now_micros;
        if self.stable.is_empty(now) {
            return None;
        }
        let cfg = self.cfg;
        let ready = (view.ready.len() as f64).max(1.0);
        let observed_stable = self.stable.window_average(now);
        let observed_panic = self.panic.window_average(now);
        let max_up = (cfg.max_scale_up_rate * ready).ceil();
        let max_down = (ready / cfg.max_scale_down_rate).floor();
        let dspc = (observed_stable / cfg.target).ceil();
        let dppc = (observed_panic / cfg.target).ceil();
        let desired_stable = dspc.max(max_down).min(max_up) as u32;
        let desired_panic = dppc.max(max_down).min(max_up) as u32;
        let over_threshold = dppc / ready >= cfg.panic_threshold;
        match self.panic_since {
            _ if over_threshold => self.panic_since = Some(now),
            Some(since) if since + cfg.stable_window_micros < now => {
                self.panic_since = None;
                self.max_panic_pods = 0;
            }
            _ => {}
        }
        let mut desired = desired_stable;
        if self.panic_since.is_some() {
            desired = desired.max(desired_panic);
            // Never scale down in panic mode.
            self.max_panic_pods = self.max_panic_pods.max(desired);
            desired = self.max_panic_pods;
        }
        Some(desired)
    }

    /// `kpa/scaler.go`: bounds, and the grace period before zero.
    fn bound(&mut self, desired: u32, view: &View<'_>) -> u32 {
        let now = view.now_micros;
        let bounded = desired.clamp(self.cfg.min_scale, self.cfg.max_scale.max(self.cfg.min_scale));
        if bounded > 0 {
            self.zero_since = None;
            return bounded;
        }
        let since = *self.zero_since.get_or_insert(now);
        if now - since >= self.cfg.scale_to_zero_grace_micros || view.replicas() == 0 {
            0
        } else {
            view.replicas().min(1)
        }
    }
}

impl Scaler for Kpa {
    fn name(&self) -> String {
        "knative-kpa".into()
    }

    fn tick_micros(&self) -> Option<i64> {
        Some(SECOND)
    }

    fn on_report(&mut self, report: &Report, _view: &View<'_>) -> Option<u32> {
        if report.draining {
            return None; // not in the endpoints any more
        }
        let entry = self.pending.entry(report.instance).or_insert((0.0, 0));
        entry.0 += report.concurrency * report.window_micros as f64;
        entry.1 += report.window_micros;
        None
    }

    fn on_tick(&mut self, view: &View<'_>) -> Option<u32> {
        self.scrape(view);
        self.ticks += 1;
        // Scrapes every 1 s, decisions every 2 s.
        if !self.ticks.is_multiple_of(2) {
            return None;
        }
        let desired = self.scale(view)?;
        Some(self.bound(desired, view))
    }

    fn on_arrival(&mut self, view: &View<'_>) -> Option<u32> {
        // The activator holds the request and pokes the autoscaler: zero goes to one at once.
        (view.replicas() == 0 && self.cfg.max_scale > 0).then_some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_average_over_the_data_they_have() {
        let mut b = Buckets::new(6 * SECOND, SECOND);
        assert!(b.is_empty(0));
        b.record(SECOND, 6.0);
        b.record(2 * SECOND, 12.0);
        // Two buckets of data in a 6 s window: the average is over two.
        assert_eq!(b.window_average(2 * SECOND), 9.0);
        for s in 3..=8 {
            b.record(s * SECOND, 3.0);
        }
        // Window full: the last 6 buckets, all 3.
        assert_eq!(b.window_average(8 * SECOND), 3.0);
        // Two seconds without data: the two missing buckets are left out.
        assert_eq!(b.window_average(10 * SECOND), 3.0);
        // A whole window without data: empty.
        assert!(b.is_empty(15 * SECOND));
        assert_eq!(b.window_average(15 * SECOND), 0.0);
        // Values in one bucket add up (two pods' stats in one second).
        let mut b = Buckets::new(6 * SECOND, SECOND);
        b.record(SECOND, 1.0);
        b.record(SECOND + 500_000, 2.0);
        assert_eq!(b.window_average(SECOND), 3.0);
    }

    fn view(ready: &[u32], now: i64) -> View<'_> {
        View {
            now_micros: now,
            ready,
            starting: 0,
            draining: 0,
            queued: 0,
            unreported_queue_area: 0.0,
        }
    }

    fn feed(kpa: &mut Kpa, ready: &[u32], from: i64, to: i64, per_pod: f64) -> Option<u32> {
        let mut last = None;
        let mut t = from;
        while t < to {
            t += SECOND / 4;
            for &id in ready {
                let report = Report {
                    instance: id,
                    at_micros: t,
                    window_micros: SECOND / 4,
                    concurrency: per_pod,
                    requests: 0,
                    cpu_micros: 0,
                    draining: false,
                };
                kpa.on_report(&report, &view(ready, t));
            }
            if t % SECOND == 0
                && let Some(d) = kpa.on_tick(&view(ready, t))
            {
                last = Some(d);
            }
        }
        last
    }

    #[test]
    fn stable_load_asks_for_ceil_of_load_over_target() {
        let mut kpa = Kpa::new(KpaConfig::knative_defaults(7.0, 1, 100, 4));
        // 4 pods at 10 each = 40 in total, target 7: ceil(40/7) = 6.
        let ready = [0, 1, 2, 3];
        assert_eq!(feed(&mut kpa, &ready, 0, 120 * SECOND, 10.0), Some(6));
    }

    #[test]
    fn panic_never_scales_down_and_scale_down_is_at_most_halving() {
        let mut kpa = Kpa::new(KpaConfig::knative_defaults(1.0, 1, 100, 1));
        // One pod seeing 10: panic (10 / 1 >= 2), up to 10.
        assert_eq!(feed(&mut kpa, &[0], 0, 4 * SECOND, 10.0), Some(10));
        assert!(kpa.panic_since.is_some());
        // Load gone but still panicking: stays at 10.
        let ten: Vec<u32> = (0..10).collect();
        assert_eq!(feed(&mut kpa, &ten, 4 * SECOND, 30 * SECOND, 0.0), Some(10));
        // After a stable window without crossing the threshold, out of panic;
        // scale down at most halves the ready count: 10 -> 5.
        assert_eq!(feed(&mut kpa, &ten, 30 * SECOND, 66 * SECOND, 0.0), Some(5));
    }

    #[test]
    fn zero_waits_for_the_grace_period_and_the_activator_wakes_it() {
        let mut cfg = KpaConfig::knative_defaults(1.0, 0, 10, 1);
        cfg.max_scale_down_rate = 1000.0;
        let mut kpa = Kpa::new(cfg);
        assert_eq!(feed(&mut kpa, &[0], 0, 10 * SECOND, 0.0), Some(1), "within grace");
        assert_eq!(
            feed(&mut kpa, &[0], 10 * SECOND, 40 * SECOND, 0.0),
            Some(0),
            "after grace"
        );
        let none: [u32; 0] = [];
        let mut v = view(&none, 41 * SECOND);
        v.queued = 1;
        assert_eq!(kpa.on_arrival(&v), Some(1));
    }
}
