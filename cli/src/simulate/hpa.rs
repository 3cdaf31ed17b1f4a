//! A port of the Kubernetes Horizontal Pod Autoscaler (autoscaling/v2, its
//! default behaviour), written from a reading of its source, for the
//! simulator's baseline, scaling on a per-pod metric (average concurrency)
//! with an `AverageValue` target:
//!
//! - `pkg/controller/podautoscaler/replica_calculator.go`
//!   (`calcPlainMetricReplicas`, `groupPods`): pods being deleted are
//!   ignored; pending pods (here: instances still starting) are *unready*;
//!   running pods without a metric are *missing*. `usageRatio = average
//!   metric of the pods with one / target`. With no unready pods on a
//!   scale-up and no missing pods: within the tolerance (0.1) keep the
//!   current count, else `ceil(usageRatio × ready pods)`. Otherwise missing
//!   pods count as using the target on a scale-down and 0 on a scale-up,
//!   unready pods count as 0 on a scale-up, the ratio is computed again,
//!   and the count stays where it is if that is within the tolerance or
//!   flips the direction; else `ceil(newRatio × pods counted)`. No metric at
//!   all: no decision.
//! - `pkg/controller/podautoscaler/horizontal.go`
//!   (`stabilizeRecommendationWithBehaviors`,
//!   `convertDesiredReplicasWithBehaviorRate`): a scale-down takes the
//!   highest recommendation of the last 300 s (the scale-down
//!   stabilization window; scale-up has none); a scale-up is limited to the
//!   larger of +4 pods and +100 % over the replicas at the start of the
//!   15 s period (the default scale-up policies); scale-down's default policy
//!   (100 % per 15 s) does not bind; the result is bounded by min/max replicas.
//! - The controller syncs every 15 s (`--horizontal-pod-autoscaler-sync-period`).
//!
//! The metric: what metrics-server (or a custom-metrics adapter) serves for
//! a pod is an average over a recent window. Assumed here: each ready pod's
//! time-weighted concurrency over the 15 s before the sync (from the
//! instance's reports in that window), i.e. a 15 s window at a 15 s
//! resolution. A pod that has not reported in the window is missing.
//!
//! The HPA cannot scale to or from zero: its minimum is at least 1. The
//! target per pod is the same `target × utilization` Tidemark's policy
//! computes against.

use std::collections::{BTreeMap, VecDeque};

use super::engine::{Report, Scaler, View};

const SECOND: i64 = 1_000_000;

/// The HPA's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HpaConfig {
    /// Average concurrency per pod aimed at.
    pub target: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    pub sync_micros: i64,
    pub tolerance: f64,
    pub metric_window_micros: i64,
    pub scale_down_stabilization_micros: i64,
    pub scale_up_pods: u32,
    pub scale_up_percent: u32,
    pub scale_up_period_micros: i64,
}

impl HpaConfig {
    /// Kubernetes' defaults around `target`, bounded by `min..=max` (min at least 1).
    pub fn kubernetes_defaults(target: f64, min_replicas: u32, max_replicas: u32) -> HpaConfig {
        HpaConfig {
            target,
            min_replicas: min_replicas.max(1),
            max_replicas: max_replicas.max(1),
            sync_micros: 15 * SECOND,
            tolerance: 0.1,
            metric_window_micros: 15 * SECOND,
            scale_down_stabilization_micros: 300 * SECOND,
            scale_up_pods: 4,
            scale_up_percent: 100,
            scale_up_period_micros: 15 * SECOND,
        }
    }
}

/// The HPA controller for one scale target.
#[derive(Debug, Clone)]
pub struct Hpa {
    cfg: HpaConfig,
    /// Per pod, its recent reports: (end, window, concurrency).
    reports: BTreeMap<u32, VecDeque<(i64, i64, f64)>>,
    /// Recommendations before stabilization: (time, count).
    recommendations: VecDeque<(i64, u32)>,
    /// Scale-ups: (time, pods added).
    scale_ups: VecDeque<(i64, u32)>,
}

impl Hpa {
    pub fn new(cfg: HpaConfig) -> Hpa {
        Hpa {
            cfg,
            reports: BTreeMap::new(),
            recommendations: VecDeque::new(),
            scale_ups: VecDeque::new(),
        }
    }

    /// `calcPlainMetricReplicas`: the recommendation from the metric, or `None` without metrics.
    fn replicas_from_metric(&mut self, view: &View<'_>) -> Option<u32> {
        let now = view.now_micros;
        let from = now - self.cfg.metric_window_micros;
        let current = view.replicas();
        // Forget pods that are no longer ready, and reports older than the window.
        self.reports.retain(|id, _| view.ready.binary_search(id).is_ok());
        let mut metrics: Vec<f64> = Vec::new();
        let mut missing = 0usize;
        for id in view.ready {
            let Some(reports) = self.reports.get_mut(id) else {
                missing += 1;
                continue;
            };
            while reports.front().is_some_and(|(at, _, _)| *at <= from) {
                reports.pop_front();
            }
            let (area, time) = reports
                .iter()
                .fold((0.0, 0i64), |(a, t), (_, w, c)| (a + c * *w as f64, t + w));
            if time == 0 {
                missing += 1;
            } else {
                metrics.push(area / time as f64);
            }
        }
        if metrics.is_empty() {
            return None;
        }
        let target = self.cfg.target;
        let ratio = |values: &[f64], extra_zero: usize, extra_target: usize| {
            let n = values.len() + extra_zero + extra_target;
            (values.iter().sum::<f64>() + extra_target as f64 * target) / n as f64 / target
        };
        let ready_with_metrics = metrics.len();
        let usage = ratio(&metrics, 0, 0);
        let unready = view.starting as usize;
        let scale_up_with_unready = unready > 0 && usage > 1.0;
        if !scale_up_with_unready && missing == 0 {
            if (1.0 - usage).abs() <= self.cfg.tolerance {
                return Some(current);
            }
            return Some((usage * ready_with_metrics as f64).ceil() as u32);
        }
        let (zero, at_target) = match (usage < 1.0, scale_up_with_unready) {
            // Scale-down: missing pods at the target (unready pods stay out).
            (true, _) => (0, missing),
            // Scale-up: missing pods at 0, and unready pods at 0 too.
            (false, true) => (missing + unready, 0),
            (false, false) => (missing, 0),
        };
        let new_usage = ratio(&metrics, zero, at_target);
        let counted = ready_with_metrics + zero + at_target;
        if (1.0 - new_usage).abs() <= self.cfg.tolerance
            || (usage < 1.0 && new_usage > 1.0)
            || (usage > 1.0 && new_usage < 1.0)
        {
            return Some(current);
        }
        let replicas = (new_usage * counted as f64).ceil() as u32;
        if (new_usage < 1.0 && replicas > current) || (new_usage > 1.0 && replicas < current) {
            return Some(current);
        }
        Some(replicas)
    }

    /// `normalizeDesiredReplicasWithBehaviors`: stabilization, rate limits, bounds.
    fn normalize(&mut self, desired: u32, current: u32, now: i64) -> u32 {
        let cfg = self.cfg;
        // Stabilization: scale-up window 0 (the recommendation itself); scale-down
        // takes the highest recommendation of the window.
        let cutoff = now - cfg.scale_down_stabilization_micros;
        while self.recommendations.front().is_some_and(|(at, _)| *at <= cutoff) {
            self.recommendations.pop_front();
        }
        let down = self.recommendations.iter().map(|(_, r)| *r).fold(desired, u32::max);
        let up = desired;
        let mut stabilized = current;
        if stabilized < up {
            stabilized = up;
        }
        if stabilized > down {
            stabilized = down;
        }
        self.recommendations.push_back((now, desired));
        // Rate limits.
        let period_from = now - cfg.scale_up_period_micros;
        while self.scale_ups.front().is_some_and(|(at, _)| *at <= period_from) {
            self.scale_ups.pop_front();
        }
        let min = cfg.min_replicas;
        let max = cfg.max_replicas.max(min);
        if stabilized > current {
            let added: u32 = self.scale_ups.iter().map(|(_, n)| *n).sum();
            let start = current.saturating_sub(added);
            let by_pods = start + cfg.scale_up_pods;
            let by_percent = (f64::from(start) * (1.0 + f64::from(cfg.scale_up_percent) / 100.0)).ceil() as u32;
            let limit = by_pods.max(by_percent).max(current).min(max);
            stabilized.min(limit)
        } else if stabilized < current {
            // The default scale-down policy (100 % per period) allows any decrease.
            stabilized.max(min)
        } else {
            stabilized.clamp(min, max)
        }
    }
}

impl Scaler for Hpa {
    fn name(&self) -> String {
        "kubernetes-hpa".into()
    }

    fn tick_micros(&self) -> Option<i64> {
        Some(self.cfg.sync_micros)
    }

    fn on_report(&mut self, report: &Report, _view: &View<'_>) -> Option<u32> {
        if report.draining {
            return None; // not in the endpoints any more
        }
        let reports = self.reports.entry(report.instance).or_default();
        reports.push_back((report.at_micros, report.window_micros, report.concurrency));
        let from = report.at_micros - self.cfg.metric_window_micros;
        while reports.front().is_some_and(|(at, _, _)| *at <= from) {
            reports.pop_front();
        }
        None
    }

    fn on_tick(&mut self, view: &View<'_>) -> Option<u32> {
        let current = view.replicas();
        if current == 0 {
            return None; // the HPA does nothing for a target scaled to zero
        }
        let desired = self.replicas_from_metric(view)?;
        let now = view.now_micros;
        let result = self.normalize(desired, current, now);
        if result > current {
            self.scale_ups.push_back((now, result - current));
        }
        Some(result)
    }

    fn on_arrival(&mut self, view: &View<'_>) -> Option<u32> {
        // A Deployment under an HPA never sits below the HPA's minimum (at least 1).
        (view.replicas() == 0).then_some(self.cfg.min_replicas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(ready: &[u32], starting: u32, now: i64) -> View<'_> {
        View {
            now_micros: now,
            ready,
            starting,
            draining: 0,
            queued: 0,
            unreported_queue_area: 0.0,
        }
    }

    fn report(hpa: &mut Hpa, ready: &[u32], at: i64, per_pod: f64) {
        for &id in ready {
            let r = Report {
                instance: id,
                at_micros: at,
                window_micros: 15 * SECOND,
                concurrency: per_pod,
                requests: 0,
                cpu_micros: 0,
                draining: false,
            };
            hpa.on_report(&r, &view(ready, 0, at));
        }
    }

    #[test]
    fn ratio_within_tolerance_keeps_the_count() {
        let mut hpa = Hpa::new(HpaConfig::kubernetes_defaults(10.0, 1, 100));
        let ready = [0, 1, 2];
        report(&mut hpa, &ready, 15 * SECOND, 10.9);
        assert_eq!(hpa.on_tick(&view(&ready, 0, 15 * SECOND)), Some(3));
        report(&mut hpa, &ready, 30 * SECOND, 11.5);
        // ceil(1.15 × 3) = 4.
        assert_eq!(hpa.on_tick(&view(&ready, 0, 30 * SECOND)), Some(4));
    }

    #[test]
    fn scale_up_is_limited_to_double_or_plus_four_per_period() {
        let mut hpa = Hpa::new(HpaConfig::kubernetes_defaults(1.0, 1, 100));
        let ready = [0, 1, 2, 3, 4];
        report(&mut hpa, &ready, 15 * SECOND, 10.0);
        // Wants 50; 5 pods may go to max(5 + 4, 10) = 10.
        assert_eq!(hpa.on_tick(&view(&ready, 0, 15 * SECOND)), Some(10));
    }

    #[test]
    fn unready_pods_count_as_zero_on_a_scale_up() {
        let mut hpa = Hpa::new(HpaConfig::kubernetes_defaults(1.0, 1, 100));
        let ready = [0, 1];
        report(&mut hpa, &ready, 15 * SECOND, 3.0);
        // 2 ready at 3, 2 starting: (3 + 3 + 0 + 0) / 4 = 1.5 -> ceil(1.5 × 4) = 6.
        assert_eq!(hpa.on_tick(&view(&ready, 2, 15 * SECOND)), Some(6));
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let mut hpa = Hpa::new(HpaConfig::kubernetes_defaults(1.0, 1, 100));
        let ready: Vec<u32> = (0..8).collect();
        report(&mut hpa, &ready, 15 * SECOND, 1.0);
        assert_eq!(hpa.on_tick(&view(&ready, 0, 15 * SECOND)), Some(8));
        let mut t = 30 * SECOND;
        while t <= 300 * SECOND {
            report(&mut hpa, &ready, t, 0.25);
            assert_eq!(hpa.on_tick(&view(&ready, 0, t)), Some(8), "at {t}");
            t += 15 * SECOND;
        }
        report(&mut hpa, &ready, 315 * SECOND, 0.25);
        // The recommendation of 8 (at 15 s) has left the 300 s window: 8 × 0.25 = 2.
        assert_eq!(hpa.on_tick(&view(&ready, 0, 315 * SECOND)), Some(2));
    }
}
