//! One service's scaler: from load windows to a replica count that explains
//! itself.
//!
//! Every decision runs the same steps, in this order (`t_m` is metric `m`'s
//! target times the policy's utilization, `previous` the count decided last):
//!
//! 1. **Demand.** Per metric, `desired_stable_m = ceil(stable_m / t_m)` and
//!    `desired_panic_m = ceil(panic_m / t_m)` (`ceil(x - 1e-9)`, so float
//!    noise on an exact multiple does not add an instance). The metric asking
//!    for the most wins each window; ties go to the first metric listed.
//! 2. **Capacity** `= reporting + late + starting`, where *starting* counts
//!    instances asked for by scale-ups within `instance_startup` that do not
//!    report yet: `min(Σ additions, previous - reporting - late)`. The KPA
//!    counts only ready pods, so while new pods boot its panic ratio stays
//!    high and keeps re-arming the panic; counting starting instances avoids
//!    that overshoot.
//! 3. **Mode.** Panic starts when `desired_panic >= panic_threshold ×
//!    max(1, capacity)`; each decision over the threshold re-arms it; it ends
//!    at the first decision a full `stable_window` after the last one over the
//!    threshold. In panic the candidate is `desired_panic`, never below the
//!    highest count reached in this panic (which starts at `previous`): panic
//!    never scales down (bound `panic_hold`). Otherwise it is `desired_stable`.
//!    `unbounded_replicas` is this mode's raw demand, before any limit.
//! 4. **Hysteresis.** Going down, go only to `n = ceil(load / (t × (1 -
//!    hysteresis)))`: scale down to `n` only with clear headroom, so a load
//!    sitting on `n × t` does not flap between `n` and `n + 1`.
//! 5. **Rate limits.** Up to at most `ceil(max_scale_up_rate × max(1, ready))`
//!    where `ready = reporting + late`, and never less than `previous`. The
//!    base is the instances that proved to exist, not the capacity: decisions
//!    run on every report, many per second, and a base that counted the
//!    instances just asked for would compound before any of them started.
//!    Down to at least `floor(max(1, previous, capacity) / max_scale_down_rate)`
//!    and never more than `previous`: the base includes `previous` so that
//!    missing reports (a smaller capacity) cannot crash the count, and it
//!    includes the capacity as the KPA's ready pods do.
//! 6. **Scale-down delay.** The highest candidate over the last
//!    `scale_down_delay` (the KPA's max-over-window).
//! 7. **Late instances.** While any instance is late, never below `previous`.
//!    **Starting instances.** While instances from a scale-up are still
//!    starting (at most `instance_startup`), never below `previous`: the load
//!    was measured without them and a count in flux is no base to shrink.
//!    **Warming up.** Until the reports cover a full stable window (from the
//!    first report this scaler saw, after a start or a takeover), never below
//!    `previous`: a few seconds of reports are no base to shrink on, and a
//!    quiet first second would otherwise halve a service that was sized for
//!    its load (the KPA starts in panic mode for the same reason).
//! 8. **Change budget.** Direction reversals (up then down, down then up)
//!    are counted over the last stable window; once they reach
//!    `max_reversals_per_window`, a scale-down that would reverse a scale-up
//!    waits. Scale-ups never wait.
//! 9. **Scale to zero.** Only with `scale_to_zero` and `min_replicas = 0`,
//!    and only once the stable load has been exactly 0 (every target metric,
//!    and requests and concurrency) for `scale_to_zero_grace`, measured from
//!    the first decision that saw it at 0. Until then the count stays at 1
//!    (bound `scale_to_zero_grace`). From zero, any report with requests or
//!    concurrency above 0 asks for at least 1 at once (activation), whatever
//!    the windows say.
//! 10. **Clamp** to `[min_replicas, max_replicas]`.
//!
//! `bound_by` names the last limit that changed the value. Until the first
//! report arrives, the scaler keeps `initial_scale`.

use std::collections::VecDeque;

use tidemark_proto::v1 as proto;

use super::load::{Load, LoadWindows, Observation};
use super::policy::{DEFAULT_TARGET, Metric, Policy, micros};

/// How the count was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the stable window.
    Stable,
    /// From the panic window, after a burst.
    Panic,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Stable => "stable",
            Mode::Panic => "panic",
        }
    }
}

/// The limit that bound a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    None,
    MinReplicas,
    MaxReplicas,
    MaxScaleUpRate,
    MaxScaleDownRate,
    ScaleDownDelay,
    PanicHold,
    Hysteresis,
    ChangeBudget,
    LateInstances,
    ScaleToZeroGrace,
    InstancesStarting,
    WarmingUp,
}

impl Bound {
    /// The limit's name on the wire; `""` for none.
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::None => "",
            Bound::MinReplicas => "min_replicas",
            Bound::MaxReplicas => "max_replicas",
            Bound::MaxScaleUpRate => "max_scale_up_rate",
            Bound::MaxScaleDownRate => "max_scale_down_rate",
            Bound::ScaleDownDelay => "scale_down_delay",
            Bound::PanicHold => "panic_hold",
            Bound::Hysteresis => "hysteresis",
            Bound::ChangeBudget => "change_budget",
            Bound::LateInstances => "late_instances",
            Bound::ScaleToZeroGrace => "scale_to_zero_grace",
            Bound::InstancesStarting => "instances_starting",
            Bound::WarmingUp => "warming_up",
        }
    }
}

/// One metric's part in a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricLoad {
    pub metric: Metric,
    /// The effective target: the policy's target times its utilization.
    pub target_per_instance: f64,
    pub stable_window_load: f64,
    pub panic_window_load: f64,
    /// What this metric alone asks for in the decision's mode, before limits.
    pub desired_replicas: u32,
}

/// Everything a decision was computed from (proto `DecisionExplanation`).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    pub mode: Mode,
    /// The metric that bound the answer.
    pub metric: Metric,
    /// The metric's effective target per instance (target × utilization).
    pub target_per_instance: f64,
    pub stable_window_load: f64,
    pub panic_window_load: f64,
    pub stable_window_seconds: f64,
    pub panic_window_seconds: f64,
    pub instances_reporting: u32,
    /// Reporting plus late: the instances known to exist.
    pub instances_ready: u32,
    pub bound_by: Bound,
    /// The mode's demand before any limit (panic hold included).
    pub unbounded_replicas: u32,
    pub instances_late: u32,
    pub instances_gone: u32,
    pub instances_starting: u32,
    pub target_utilization: f64,
    /// Every configured metric, in policy order.
    pub metrics: Vec<MetricLoad>,
    pub summary: String,
}

/// One scaling decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub previous: u32,
    pub explanation: Explanation,
}

impl Decision {
    /// True when the decision changes the count.
    pub fn changed(&self) -> bool {
        self.desired != self.previous
    }

    /// The decision on the wire.
    pub fn to_proto(
        &self,
        decision_id: String,
        service: String,
        decided_at_unix_micros: i64,
    ) -> proto::ScalingDecision {
        proto::ScalingDecision {
            decision_id,
            service,
            decided_at_unix_micros,
            desired_replicas: self.desired,
            previous_replicas: self.previous,
            explanation: Some(self.explanation.to_proto()),
        }
    }
}

impl Explanation {
    fn to_proto(&self) -> proto::DecisionExplanation {
        proto::DecisionExplanation {
            mode: self.mode.as_str().to_owned(),
            metric: self.metric.as_str().to_owned(),
            target_per_instance: self.target_per_instance,
            stable_window_load: self.stable_window_load,
            panic_window_load: self.panic_window_load,
            stable_window_seconds: self.stable_window_seconds,
            panic_window_seconds: self.panic_window_seconds,
            instances_reporting: self.instances_reporting,
            instances_ready: self.instances_ready,
            bound_by: self.bound_by.as_str().to_owned(),
            unbounded_replicas: self.unbounded_replicas,
            instances_late: self.instances_late,
            instances_gone: self.instances_gone,
            instances_starting: self.instances_starting,
            target_utilization: self.target_utilization,
            metrics: self.metrics.iter().map(MetricLoad::to_proto).collect(),
            summary: self.summary.clone(),
        }
    }
}

impl MetricLoad {
    fn to_proto(&self) -> proto::MetricLoad {
        proto::MetricLoad {
            metric: self.metric.as_str().to_owned(),
            target_per_instance: self.target_per_instance,
            stable_window_load: self.stable_window_load,
            panic_window_load: self.panic_window_load,
            desired_replicas: self.desired_replicas,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// An ongoing panic.
#[derive(Debug, Clone, Copy)]
struct Panic {
    /// The last decision over the threshold.
    last_over: i64,
    /// The highest count decided in this panic (from `previous` at entry).
    highest: u32,
}

/// What one metric asks for.
#[derive(Debug, Clone, Copy)]
struct Demand {
    metric: Metric,
    /// Target × utilization.
    per_instance: f64,
    stable: f64,
    panic: f64,
    desired_stable: u32,
    desired_panic: u32,
}

impl Demand {
    fn load(&self, mode: Mode) -> f64 {
        match mode {
            Mode::Stable => self.stable,
            Mode::Panic => self.panic,
        }
    }

    fn desired(&self, mode: Mode) -> u32 {
        match mode {
            Mode::Stable => self.desired_stable,
            Mode::Panic => self.desired_panic,
        }
    }
}

/// The count as the limits shape it, and the last limit that changed it.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    value: u32,
    bound: Bound,
}

impl Candidate {
    fn set(&mut self, value: u32, bound: Bound) {
        if value != self.value {
            self.value = value;
            self.bound = bound;
        }
    }

    /// Holds the count at `previous` when it would go below it and `hold` is true.
    fn hold_down(&mut self, previous: u32, hold: bool, bound: Bound) {
        if hold && self.value < previous {
            self.set(previous, bound);
        }
    }
}

/// Instances counted in a decision.
#[derive(Debug, Clone, Copy)]
struct Instances {
    reporting: u32,
    late: u32,
    gone: u32,
    starting: u32,
}

impl Instances {
    fn ready(&self) -> u32 {
        self.reporting.saturating_add(self.late)
    }

    fn capacity(&self) -> u32 {
        self.ready().saturating_add(self.starting)
    }
}

/// Below this, a quotient counts as an exact multiple (float noise).
const CEIL_SLACK: f64 = 1e-9;

/// `ceil(load / per_instance)`, NaN-safe and saturating.
fn replicas_for(load: f64, per_instance: f64) -> u32 {
    let x = load / per_instance;
    if x.is_nan() {
        return 0;
    }
    // `as` saturates: negative to 0, +inf to u32::MAX.
    (x - CEIL_SLACK).ceil() as u32
}

/// Index of the first demand with the largest `key`.
fn winner(demands: &[Demand], key: impl Fn(&Demand) -> u32) -> usize {
    let mut best = 0;
    for (i, d) in demands.iter().enumerate() {
        if key(d) > demands.get(best).map_or(0, &key) {
            best = i;
        }
    }
    best
}

/// The service's scaler: its policy, its load windows and what it decided.
#[derive(Debug)]
pub struct ServiceScaler {
    policy: Policy,
    windows: LoadWindows,
    replicas: u32,
    panic: Option<Panic>,
    /// Scale-ups within `instance_startup`: (time, instances added).
    scale_ups: VecDeque<(i64, u32)>,
    /// Candidates within `scale_down_delay`: a max-queue (values strictly
    /// decreasing from front to back), so the max is the front.
    recent: VecDeque<(i64, u32)>,
    /// Direction reversals within the stable window.
    reversals: VecDeque<i64>,
    last_direction: Option<Direction>,
    /// The first decision of the current run of exactly-0 stable load.
    zero_since: Option<i64>,
    /// A report with traffic arrived since the last decision.
    activity: bool,
}

impl ServiceScaler {
    /// A scaler at `policy.initial_scale`, asked for at `now_micros` (so
    /// those instances count as starting until they report).
    pub fn new(policy: Policy, now_micros: i64) -> ServiceScaler {
        let mut scale_ups = VecDeque::new();
        if policy.initial_scale > 0 {
            scale_ups.push_back((now_micros, policy.initial_scale));
        }
        ServiceScaler {
            windows: LoadWindows::new(&policy),
            replicas: policy.initial_scale,
            policy,
            panic: None,
            scale_ups,
            recent: VecDeque::new(),
            reversals: VecDeque::new(),
            last_direction: None,
            zero_since: None,
            activity: false,
        }
    }

    /// A scaler taking over a service that already runs at `replicas` (the
    /// last decision, e.g. from another collector before a rebalance). Those
    /// instances are not counted as starting: they were asked for long ago.
    /// Until the first report it keeps `replicas`; the first decision after
    /// that applies the policy's limits, the clamp included.
    pub fn resume(policy: Policy, now_micros: i64, replicas: u32) -> ServiceScaler {
        let mut scaler = ServiceScaler::new(policy, now_micros);
        scaler.scale_ups.clear();
        scaler.replicas = replicas;
        scaler
    }

    /// Takes a reloaded policy; the windows and the state stay.
    pub fn set_policy(&mut self, policy: Policy) {
        self.windows.set_policy(&policy);
        self.policy = policy;
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records one report.
    pub fn observe(&mut self, obs: &Observation<'_>) {
        if obs.window_micros > 0 && (obs.requests > 0 || obs.concurrency > 0.0) {
            self.activity = true;
        }
        self.windows.record(obs);
    }

    /// The current desired count.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// Decides the count at `now_micros`: a function of the reports, the
    /// policy and the previous decisions only. Never panics.
    pub fn decide(&mut self, now_micros: i64) -> Decision {
        let now = now_micros;
        let previous = self.replicas;
        self.forget_before(now);
        if !self.windows.observed() {
            return self.before_any_report(previous);
        }
        let load = self.windows.evaluate(now);
        let activity = std::mem::take(&mut self.activity);
        let instances = self.instances(&load, previous);
        let demands = demands(&self.policy, &load);
        let panic_i = winner(&demands, |d| d.desired_panic);
        let panic_desired = demands.get(panic_i).map_or(0, |d| d.desired_panic);
        let mode = self.update_panic(now, panic_desired, instances.capacity(), previous);
        let mut metric_i = match mode {
            Mode::Stable => winner(&demands, |d| d.desired_stable),
            Mode::Panic => panic_i,
        };
        let unbounded = demands.get(metric_i).map_or(0, |d| d.desired(mode));
        self.track_zero(now, activity, &load, &demands);

        let mut c = Candidate {
            value: unbounded,
            bound: Bound::None,
        };
        if let Some(panic) = self.panic
            && panic.highest > c.value
        {
            c.set(panic.highest, Bound::PanicHold);
        }
        if let Some(i) = self.hysteresis(&mut c, previous, mode, &demands) {
            metric_i = i;
        }
        self.rate_limits(&mut c, previous, &instances);
        self.scale_down_delay(&mut c, now);
        let warming_up = self.windows.measured(now) < micros(self.policy.stable_window);
        c.hold_down(previous, warming_up, Bound::WarmingUp);
        c.hold_down(previous, instances.late > 0, Bound::LateInstances);
        c.hold_down(previous, instances.starting > 0, Bound::InstancesStarting);
        c.hold_down(previous, self.budget_spent(), Bound::ChangeBudget);
        self.scale_to_zero(&mut c, now, previous, activity);
        self.clamp(&mut c);
        self.commit(now, previous, c.value);

        let decided = Decided {
            mode,
            previous,
            desired: c.value,
            unbounded,
            bound: c.bound,
            metric_i,
            instances,
        };
        self.decision(&decided, &demands)
    }

    /// The decision before any report: keep the count, say so.
    fn before_any_report(&self, previous: u32) -> Decision {
        let load = Load::default();
        let demands = demands(&self.policy, &load);
        let instances = self.instances(&load, previous);
        let decided = Decided {
            mode: Mode::Stable,
            previous,
            desired: previous,
            unbounded: previous,
            bound: Bound::None,
            metric_i: 0,
            instances,
        };
        let mut decision = self.decision(&decided, &demands);
        decision.explanation.summary = format!(
            "no reports yet: keeping the initial scale of {previous}; {}",
            instances_text(&instances)
        );
        decision
    }

    /// Drops history that no longer matters at `now`.
    fn forget_before(&mut self, now: i64) {
        let startup = now.saturating_sub(micros(self.policy.instance_startup));
        while self.scale_ups.front().is_some_and(|(t, _)| *t <= startup) {
            self.scale_ups.pop_front();
        }
        let stable = now.saturating_sub(micros(self.policy.stable_window));
        while self.reversals.front().is_some_and(|t| *t <= stable) {
            self.reversals.pop_front();
        }
        let delay = now.saturating_sub(micros(self.policy.scale_down_delay));
        while self.recent.front().is_some_and(|(t, _)| *t <= delay) {
            self.recent.pop_front();
        }
    }

    fn instances(&self, load: &Load, previous: u32) -> Instances {
        let mut instances = Instances {
            reporting: load.reporting,
            late: load.late,
            gone: load.gone,
            starting: 0,
        };
        let added = self.scale_ups.iter().fold(0u32, |sum, (_, n)| sum.saturating_add(*n));
        instances.starting = added.min(previous.saturating_sub(instances.ready()));
        instances
    }

    /// Enters, re-arms or leaves the panic; the mode for this decision.
    fn update_panic(&mut self, now: i64, panic_desired: u32, capacity: u32, previous: u32) -> Mode {
        let threshold = self.policy.panic_threshold;
        let over = f64::from(panic_desired) >= threshold * f64::from(capacity.max(1));
        match (&mut self.panic, over) {
            (Some(panic), true) => panic.last_over = now,
            (None, true) => {
                self.panic = Some(Panic {
                    last_over: now,
                    highest: previous,
                })
            }
            (Some(panic), false) => {
                if now.saturating_sub(panic.last_over) >= micros(self.policy.stable_window) {
                    self.panic = None;
                }
            }
            (None, false) => {}
        }
        if self.panic.is_some() {
            Mode::Panic
        } else {
            Mode::Stable
        }
    }

    /// Starts or ends the run of exactly-0 load that scale-to-zero waits on.
    fn track_zero(&mut self, now: i64, activity: bool, load: &Load, demands: &[Demand]) {
        let quiet = load.stable.concurrency == 0.0 && load.stable.rps == 0.0 && demands.iter().all(|d| d.stable == 0.0);
        if activity || !quiet {
            self.zero_since = None;
        } else if self.zero_since.is_none() {
            self.zero_since = Some(now);
        }
    }

    /// Step 4; the index of the metric that held the count, if it did.
    fn hysteresis(&self, c: &mut Candidate, previous: u32, mode: Mode, demands: &[Demand]) -> Option<usize> {
        if c.value >= previous {
            return None;
        }
        let h = if self.policy.hysteresis.is_finite() {
            self.policy.hysteresis.clamp(0.0, 0.5)
        } else {
            0.0
        };
        let (i, n) = demands
            .iter()
            .map(|d| replicas_for(d.load(mode), d.per_instance * (1.0 - h)))
            .enumerate()
            .fold((0, 0), |best, (i, n)| if n > best.1 { (i, n) } else { best });
        let held = n.min(previous);
        if held > c.value {
            c.set(held, Bound::Hysteresis);
            Some(i)
        } else {
            None
        }
    }

    /// Step 5.
    fn rate_limits(&self, c: &mut Candidate, previous: u32, instances: &Instances) {
        let up_base = f64::from(instances.ready().max(1));
        let ceiling = ((self.policy.max_scale_up_rate * up_base).ceil() as u32).max(previous);
        if c.value > ceiling {
            c.set(ceiling, Bound::MaxScaleUpRate);
        }
        let down_base = f64::from(previous.max(instances.capacity()).max(1));
        let floor = ((down_base / self.policy.max_scale_down_rate).floor() as u32).min(previous);
        if c.value < floor {
            c.set(floor, Bound::MaxScaleDownRate);
        }
    }

    /// Step 6: the highest candidate over the last `scale_down_delay`.
    fn scale_down_delay(&mut self, c: &mut Candidate, now: i64) {
        if self.policy.scale_down_delay.is_zero() {
            self.recent.clear();
            return;
        }
        while self.recent.back().is_some_and(|(_, v)| *v <= c.value) {
            self.recent.pop_back();
        }
        self.recent.push_back((now, c.value));
        let highest = self.recent.front().map_or(c.value, |(_, v)| *v);
        if highest > c.value {
            c.set(highest, Bound::ScaleDownDelay);
        }
    }

    /// Step 8: reversals have used up the budget and the last move was up.
    fn budget_spent(&self) -> bool {
        let max = self.policy.max_reversals_per_window as usize;
        max > 0 && self.last_direction == Some(Direction::Up) && self.reversals.len() >= max
    }

    /// Step 9: the grace before zero, and activation from zero.
    fn scale_to_zero(&self, c: &mut Candidate, now: i64, previous: u32, activity: bool) {
        if c.value != 0 {
            return;
        }
        if previous == 0 {
            if activity {
                c.value = 1;
            }
            return;
        }
        let allowed = self.policy.scale_to_zero && self.policy.min_replicas == 0;
        let grace = micros(self.policy.scale_to_zero_grace);
        let waited = self.zero_since.is_some_and(|since| now.saturating_sub(since) >= grace);
        if !allowed {
            c.set(1, Bound::MinReplicas);
        } else if !waited {
            c.set(1, Bound::ScaleToZeroGrace);
        }
    }

    /// Step 10.
    fn clamp(&self, c: &mut Candidate) {
        if c.value > self.policy.max_replicas {
            c.set(self.policy.max_replicas, Bound::MaxReplicas);
        }
        if c.value < self.policy.min_replicas {
            c.set(self.policy.min_replicas, Bound::MinReplicas);
        }
    }

    /// Remembers the decision: scale-ups, reversals, the panic's high mark.
    fn commit(&mut self, now: i64, previous: u32, desired: u32) {
        if desired > previous {
            self.scale_ups.push_back((now, desired - previous));
        }
        if desired != previous {
            let direction = if desired > previous {
                Direction::Up
            } else {
                Direction::Down
            };
            if self.last_direction.is_some_and(|d| d != direction) {
                self.reversals.push_back(now);
            }
            self.last_direction = Some(direction);
        }
        if let Some(panic) = &mut self.panic {
            panic.highest = panic.highest.max(desired);
        }
        self.replicas = desired;
    }

    fn decision(&self, d: &Decided, demands: &[Demand]) -> Decision {
        let fallback = Demand {
            metric: DEFAULT_TARGET.0,
            per_instance: 0.0,
            stable: 0.0,
            panic: 0.0,
            desired_stable: 0,
            desired_panic: 0,
        };
        let bound_metric = demands.get(d.metric_i).copied().unwrap_or(fallback);
        let explanation = Explanation {
            mode: d.mode,
            metric: bound_metric.metric,
            target_per_instance: bound_metric.per_instance,
            stable_window_load: bound_metric.stable,
            panic_window_load: bound_metric.panic,
            stable_window_seconds: self.policy.stable_window.as_secs_f64(),
            panic_window_seconds: self.policy.panic_window.as_secs_f64(),
            instances_reporting: d.instances.reporting,
            instances_ready: d.instances.ready(),
            bound_by: d.bound,
            unbounded_replicas: d.unbounded,
            instances_late: d.instances.late,
            instances_gone: d.instances.gone,
            instances_starting: d.instances.starting,
            target_utilization: self.policy.target_utilization,
            metrics: demands
                .iter()
                .map(|m| MetricLoad {
                    metric: m.metric,
                    target_per_instance: m.per_instance,
                    stable_window_load: m.stable,
                    panic_window_load: m.panic,
                    desired_replicas: m.desired(d.mode),
                })
                .collect(),
            summary: self.summary(d, &bound_metric),
        };
        Decision {
            desired: d.desired,
            previous: d.previous,
            explanation,
        }
    }

    /// E.g. `stable: 42.0 concurrency over 60s needs 6 at 7.0/instance (10 x
    /// 0.70); 5 reporting, 1 starting; 8 -> 6, bound by max_scale_down_rate`.
    fn summary(&self, d: &Decided, m: &Demand) -> String {
        let window = match d.mode {
            Mode::Stable => self.policy.stable_window,
            Mode::Panic => self.policy.panic_window,
        };
        let target = self
            .policy
            .targets
            .iter()
            .find(|(metric, _)| *metric == m.metric)
            .map_or(DEFAULT_TARGET.1, |(_, t)| *t);
        let change = if d.desired == d.previous {
            format!("stays {}", d.desired)
        } else {
            format!("{} -> {}", d.previous, d.desired)
        };
        let bound = match d.bound {
            Bound::None => String::new(),
            b => format!(", bound by {}", b.as_str()),
        };
        format!(
            "{}: {:.1} {} over {} needs {} at {:.1}/instance ({} x {:.2}); {}; {change}{bound}",
            d.mode.as_str(),
            m.load(d.mode),
            m.metric,
            window_text(window),
            m.desired(d.mode),
            m.per_instance,
            target,
            self.policy.target_utilization,
            instances_text(&d.instances),
        )
    }
}

/// The outcome of one decision's steps.
#[derive(Debug, Clone, Copy)]
struct Decided {
    mode: Mode,
    previous: u32,
    desired: u32,
    unbounded: u32,
    bound: Bound,
    metric_i: usize,
    instances: Instances,
}

/// A window as `60s` or `500ms` (humantime would say `1m`).
fn window_text(window: std::time::Duration) -> String {
    if window.subsec_nanos() == 0 {
        format!("{}s", window.as_secs())
    } else if window.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", window.as_millis())
    } else {
        format!("{}s", window.as_secs_f64())
    }
}

/// `5 reporting, 1 late, 2 starting` (zero counts left out, except reporting).
fn instances_text(i: &Instances) -> String {
    let mut text = format!("{} reporting", i.reporting);
    for (n, what) in [(i.late, "late"), (i.gone, "gone"), (i.starting, "starting")] {
        if n > 0 {
            text.push_str(&format!(", {n} {what}"));
        }
    }
    text
}

/// Each target's demand, in policy order. Targets that are not positive
/// numbers are skipped (a validated policy has none); with none left, the
/// default target stands in so that a decision can always be made.
fn demands(policy: &Policy, load: &Load) -> Vec<Demand> {
    let mut demands: Vec<Demand> = policy
        .targets
        .iter()
        .filter_map(|(metric, target)| demand(*metric, policy.effective_target(*target), load))
        .collect();
    if demands.is_empty() {
        let (metric, target) = DEFAULT_TARGET;
        demands.extend(demand(metric, target * 0.7, load));
    }
    demands
}

fn demand(metric: Metric, per_instance: f64, load: &Load) -> Option<Demand> {
    if !(per_instance.is_finite() && per_instance > 0.0) {
        return None;
    }
    let stable = finite(load.stable.get(metric));
    let panic = finite(load.panic.get(metric));
    Some(Demand {
        metric,
        per_instance,
        stable,
        panic,
        desired_stable: replicas_for(stable, per_instance),
        desired_panic: replicas_for(panic, per_instance),
    })
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscaler::policy::PolicySpec;

    const SECOND: i64 = 1_000_000;
    /// Sidecars report every 250 ms in these tests.
    const TICK: i64 = 250_000;

    fn policy(text: &str) -> Policy {
        let spec: PolicySpec = toml::from_str(text).expect("spec parses");
        Policy::resolve(&PolicySpec::default(), &spec).expect("policy is valid")
    }

    fn at(seconds: i64) -> i64 {
        seconds * SECOND
    }

    /// What each instance reports per 250 ms window.
    #[derive(Clone, Copy)]
    struct Report {
        concurrency: f64,
        requests: u64,
        cpu_micros: u64,
    }

    fn conc(concurrency: f64) -> Report {
        Report {
            concurrency,
            requests: 0,
            cpu_micros: 0,
        }
    }

    /// Every instance reports `report` every 250 ms, windows closing in `(from, to]`.
    fn feed(s: &mut ServiceScaler, instances: &[&str], from: i64, to: i64, report: Report) {
        let mut t = from + TICK;
        while t <= to {
            for instance in instances {
                s.observe(&Observation {
                    instance,
                    at_micros: t,
                    window_micros: TICK,
                    concurrency: report.concurrency,
                    requests: report.requests,
                    cpu_micros: report.cpu_micros,
                });
            }
            t += TICK;
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    const ABC: [&str; 3] = ["a", "b", "c"];

    #[test]
    fn stable_scaling_follows_the_stable_window() {
        let mut s = ServiceScaler::new(policy("initial_scale = 3\npanic_threshold = 3"), 0);
        feed(&mut s, &ABC, 0, at(60), conc(7.0));
        let d = s.decide(at(60));
        // 3 × 7.0 = 21 at 10 × 0.7 = 7 per instance: ceil(21 / 7) = 3.
        assert_eq!((d.desired, d.previous), (3, 3));
        assert!(!d.changed());
        let e = &d.explanation;
        assert_eq!(
            (e.mode, e.metric, e.bound_by),
            (Mode::Stable, Metric::Concurrency, Bound::None)
        );
        assert!(
            close(e.stable_window_load, 21.0) && close(e.panic_window_load, 21.0),
            "{e:?}"
        );
        assert!(close(e.target_per_instance, 7.0));
        assert_eq!(
            (e.instances_reporting, e.instances_ready, e.instances_starting),
            (3, 3, 0)
        );
        assert_eq!(e.unbounded_replicas, 3);
        assert_eq!(
            e.summary,
            "stable: 21.0 concurrency over 60s needs 3 at 7.0/instance (10 x 0.70); 3 reporting; stays 3"
        );

        // Load 50 for half the stable window: (30, 60] at 21 in all and
        // (60, 90] at 50: (30 × 21 + 30 × 50) / 60 = 35.5, ceil(35.5 / 7) = 6; the panic
        // window asks 8, only 8/3 < 3 times the capacity.
        feed(&mut s, &ABC, at(60), at(90), conc(50.0 / 3.0));
        let d = s.decide(at(90));
        assert_eq!((d.desired, d.previous), (6, 3));
        assert!(close(d.explanation.stable_window_load, 35.5), "{:?}", d.explanation);
        assert!(close(d.explanation.panic_window_load, 50.0));
        assert_eq!(d.explanation.mode, Mode::Stable);
        // A full window of 50: ceil(50 / 7) = 8.
        feed(&mut s, &ABC, at(90), at(120), conc(50.0 / 3.0));
        let d = s.decide(at(120));
        assert_eq!((d.desired, d.previous), (8, 6));
        assert_eq!(
            (d.explanation.bound_by, d.explanation.unbounded_replicas),
            (Bound::None, 8)
        );
        assert_eq!(s.replicas(), 8);
    }

    #[test]
    fn panic_enters_on_a_burst_holds_and_exits_after_a_stable_window() {
        let mut s = ServiceScaler::new(policy("initial_scale = 2"), 0);
        feed(&mut s, &["a", "b"], 0, at(60), conc(7.0));
        assert_eq!(s.decide(at(60)).desired, 2);

        // Burst: 28 each over the last 6 s. Panic: 56 / 7 = 8 >= 2 × 2.
        feed(&mut s, &["a", "b"], at(60), at(66), conc(28.0));
        let d = s.decide(at(66));
        let e = &d.explanation;
        assert_eq!((d.desired, e.mode, e.bound_by), (8, Mode::Panic, Bound::None));
        assert!(close(e.panic_window_load, 56.0), "{e:?}");
        // Stable (6, 66]: (54 s × 14 + 6 s × 56) / 60 s = 18.2.
        assert!(close(e.stable_window_load, 18.2), "{e:?}");
        assert_eq!(e.metrics[0].desired_replicas, 8);
        assert!(
            e.summary.starts_with("panic: 56.0 concurrency over 6s needs 8"),
            "{}",
            e.summary
        );

        // Back to 7 each. At 67 the panic window (61, 67] holds 20 reports
        // at 28 and 4 at 7: 24.5 each, 49 in all, 7 instances; 6 of the 8
        // are starting, so 7 < 2 × 8: not over, but panic holds at 8.
        feed(&mut s, &["a", "b"], at(66), at(67), conc(7.0));
        let d = s.decide(at(67));
        let e = &d.explanation;
        assert!(close(e.panic_window_load, 49.0), "{e:?}");
        assert_eq!((e.instances_reporting, e.instances_starting), (2, 6));
        assert_eq!(
            (d.desired, e.mode, e.bound_by, e.unbounded_replicas),
            (8, Mode::Panic, Bound::PanicHold, 7)
        );

        // Still panic 59 s after the last decision over the threshold (66 s).
        feed(&mut s, &["a", "b"], at(67), at(125), conc(7.0));
        let d = s.decide(at(125));
        assert_eq!(
            (d.desired, d.explanation.mode, d.explanation.bound_by),
            (8, Mode::Panic, Bound::PanicHold)
        );

        // 60 s after: stable. 14 / 7 = 2; hysteresis keeps ceil(14 / 6.3) = 3;
        // the down rate keeps floor(8 / 2) = 4.
        feed(&mut s, &["a", "b"], at(125), at(126), conc(7.0));
        let d = s.decide(at(126));
        let e = &d.explanation;
        assert_eq!(e.mode, Mode::Stable);
        assert_eq!((d.desired, d.previous, e.unbounded_replicas), (4, 8, 2));
        assert_eq!(e.bound_by, Bound::MaxScaleDownRate);
        assert_eq!(
            e.summary,
            "stable: 14.0 concurrency over 60s needs 2 at 7.0/instance (10 x 0.70); 2 reporting; \
             8 -> 4, bound by max_scale_down_rate"
        );
    }

    #[test]
    fn a_new_burst_rearms_the_panic() {
        let mut s = ServiceScaler::new(policy("initial_scale = 2"), 0);
        feed(&mut s, &["a", "b"], 0, at(60), conc(7.0));
        s.decide(at(60));
        feed(&mut s, &["a", "b"], at(60), at(66), conc(28.0));
        assert_eq!(s.decide(at(66)).desired, 8);
        feed(&mut s, &["a", "b"], at(66), at(100), conc(7.0));
        assert_eq!(s.decide(at(100)).explanation.mode, Mode::Panic);
        // 8 reporting now; 80 each over 6 s: 160 / 7 → 23 >= 2 × 8.
        let eight = ["a", "b", "c", "d", "e", "f", "g", "h"];
        feed(&mut s, &eight, at(100), at(106), conc(20.0));
        let d = s.decide(at(106));
        assert_eq!((d.desired, d.explanation.mode), (23, Mode::Panic));
        // 60 s after 66 would have ended the first panic; the second holds.
        feed(&mut s, &eight, at(106), at(126), conc(7.0));
        let d = s.decide(at(126));
        assert_eq!(
            (d.desired, d.explanation.mode, d.explanation.bound_by),
            (23, Mode::Panic, Bound::PanicHold)
        );
        feed(&mut s, &eight, at(126), at(165), conc(7.0));
        assert_eq!(s.decide(at(165)).explanation.mode, Mode::Panic);
        // 60 s after 106: stable. 56 / 7 = 8; hysteresis ceil(56 / 6.3) = 9;
        // the down rate floor(23 / 2) = 11.
        feed(&mut s, &eight, at(165), at(166), conc(7.0));
        let d = s.decide(at(166));
        assert_eq!(
            (d.desired, d.explanation.mode, d.explanation.unbounded_replicas),
            (11, Mode::Stable, 8)
        );
        assert_eq!(d.explanation.bound_by, Bound::MaxScaleDownRate);
    }

    #[test]
    fn starting_instances_dampen_a_second_panic_step() {
        let mut s = ServiceScaler::new(policy(""), 0);
        feed(&mut s, &["a"], 0, at(60), conc(7.0));
        assert_eq!(s.decide(at(60)).desired, 1);
        // 28 over the panic window: 4 >= 2 × 1: panic, 1 → 4.
        feed(&mut s, &["a"], at(60), at(66), conc(28.0));
        let d = s.decide(at(66));
        assert_eq!((d.desired, d.explanation.mode), (4, Mode::Panic));
        // 49 over (66, 72]: 7, but with 3 starting the capacity is 4 and
        // 7 < 2 × 4: the panic goes on without being re-armed.
        feed(&mut s, &["a"], at(66), at(72), conc(49.0));
        let d = s.decide(at(72));
        let e = &d.explanation;
        assert_eq!((d.desired, e.mode, e.bound_by), (7, Mode::Panic, Bound::None));
        assert_eq!((e.instances_reporting, e.instances_starting), (1, 3));
        assert!(e.summary.ends_with("1 reporting, 3 starting; 4 -> 7"), "{}", e.summary);
        feed(&mut s, &["a"], at(72), at(125), conc(7.0));
        assert_eq!(s.decide(at(125)).explanation.mode, Mode::Panic);
        // Exit 60 s after 66, not after 72. Stable (66, 126]: (24 × 49 +
        // 216 × 7) / 240 = 11.2 → 2; the down rate allows floor(7 / 2) = 3.
        feed(&mut s, &["a"], at(125), at(126), conc(7.0));
        let d = s.decide(at(126));
        assert_eq!(d.explanation.mode, Mode::Stable);
        assert!(close(d.explanation.stable_window_load, 11.2), "{:?}", d.explanation);
        assert_eq!((d.desired, d.explanation.bound_by), (3, Bound::MaxScaleDownRate));
    }

    #[test]
    fn max_scale_up_rate_counts_ready_instances() {
        let mut s = ServiceScaler::new(policy("max_scale_up_rate = 2"), 0);
        feed(&mut s, &["a"], 0, at(60), conc(70.0));
        let d = s.decide(at(60));
        // 70 / 7 = 10, but one ready instance may only become ceil(2 × 1) = 2.
        assert_eq!((d.desired, d.explanation.unbounded_replicas), (2, 10));
        assert_eq!(
            (d.explanation.mode, d.explanation.bound_by),
            (Mode::Panic, Bound::MaxScaleUpRate)
        );
        // The instance asked for has not reported: the limit does not compound.
        feed(&mut s, &["a"], at(60), at(61), conc(70.0));
        let d = s.decide(at(61));
        assert_eq!((d.desired, d.explanation.bound_by), (2, Bound::MaxScaleUpRate));
        assert_eq!(d.explanation.instances_starting, 1);
        // Once it reports, ceil(2 × 2) = 4. The panic window (56, 62] holds
        // a's 6 s and b's first 1 s at 70: 490 / 6 ≈ 81.7, ceil(81.7 / 7) =
        // 12, still far above the limit.
        feed(&mut s, &["a", "b"], at(61), at(62), conc(70.0));
        let d = s.decide(at(62));
        assert_eq!((d.desired, d.previous, d.explanation.unbounded_replicas), (4, 2, 12));
        assert_eq!(d.explanation.bound_by, Bound::MaxScaleUpRate);
    }

    #[test]
    fn max_scale_down_rate_halves_at_most() {
        let ten: Vec<String> = (0..10).map(|i| format!("i{i}")).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        let mut s = ServiceScaler::new(policy("initial_scale = 10"), 0);
        feed(&mut s, &ten, 0, at(60), conc(0.5));
        let d = s.decide(at(60));
        // 5 / 7 → 1; hysteresis ceil(5 / 6.3) = 1; floor(10 / 2) = 5.
        assert_eq!((d.desired, d.previous, d.explanation.unbounded_replicas), (5, 10, 1));
        assert_eq!(
            (d.explanation.mode, d.explanation.bound_by),
            (Mode::Stable, Bound::MaxScaleDownRate)
        );
        assert_eq!(d.explanation.instances_reporting, 10);
    }

    #[test]
    fn min_and_max_replicas_clamp_last() {
        let mut s = ServiceScaler::new(policy("max_replicas = 5\npanic_threshold = 10\ninitial_scale = 3"), 0);
        feed(&mut s, &ABC, 0, at(60), conc(20.0));
        let d = s.decide(at(60));
        // 60 / 7 → 9, clamped to 5.
        assert_eq!((d.desired, d.explanation.unbounded_replicas), (5, 9));
        assert_eq!(d.explanation.bound_by, Bound::MaxReplicas);

        let mut s = ServiceScaler::new(policy("min_replicas = 3"), 0);
        feed(&mut s, &ABC, 0, at(60), conc(0.1));
        let d = s.decide(at(60));
        // 0.3 / 7 → 1; floor(3 / 2) = 1; min 3.
        assert_eq!((d.desired, d.previous, d.explanation.unbounded_replicas), (3, 3, 1));
        assert_eq!(d.explanation.bound_by, Bound::MinReplicas);
    }

    #[test]
    fn scale_to_zero_after_exactly_the_grace_and_activation_from_zero() {
        let mut s = ServiceScaler::new(policy("scale_to_zero = true"), 0);
        feed(&mut s, &["a"], 0, at(60), conc(1.0));
        assert_eq!(s.decide(at(60)).desired, 1);
        // Idle from 60 s: the stable window holds traffic until 120 s.
        for second in 61..=149 {
            feed(&mut s, &["a"], at(second - 1), at(second), conc(0.0));
            let d = s.decide(at(second));
            assert_eq!(d.desired, 1, "at {second} s");
            let expected = if second < 120 {
                Bound::None
            } else {
                Bound::ScaleToZeroGrace
            };
            assert_eq!(d.explanation.bound_by, expected, "at {second} s");
        }
        // 30 s after the first decision that saw exactly 0 (120 s).
        feed(&mut s, &["a"], at(149), at(150), conc(0.0));
        let d = s.decide(at(150));
        assert_eq!((d.desired, d.previous, d.explanation.bound_by), (0, 1, Bound::None));
        feed(&mut s, &["a"], at(150), at(160), conc(0.0));
        assert_eq!(s.decide(at(160)).desired, 0);

        // Activation: 3 requests and no concurrency (so the concurrency
        // target alone asks for 0) bring it back to 1 at once.
        s.observe(&Observation {
            instance: "b",
            at_micros: at(170),
            window_micros: SECOND,
            concurrency: 0.0,
            requests: 3,
            cpu_micros: 0,
        });
        let d = s.decide(at(170));
        assert_eq!((d.desired, d.previous, d.explanation.unbounded_replicas), (1, 0, 0));
        // The grace starts again once the load is exactly 0 again. b's
        // 3 requests in (169, 170] count until that report leaves the stable
        // window at 230 s, even though b is gone (silent > 10 s) from 181 s:
        // a gone instance's past reports stay in the integral.
        let d = s.decide(at(171));
        assert_eq!((d.desired, d.explanation.bound_by), (1, Bound::ScaleToZeroGrace));
        assert!(close(d.explanation.metrics[0].stable_window_load, 0.0));
        let d = s.decide(at(182));
        assert_eq!(
            (d.explanation.instances_gone, d.explanation.instances_reporting),
            (2, 0)
        );
        assert_eq!((d.desired, d.explanation.bound_by), (1, Bound::ScaleToZeroGrace));
        // (169, 229]: 3 requests / 60 s = 0.05/s, not 0 yet.
        let d = s.decide(at(229));
        assert_eq!((d.desired, d.explanation.bound_by), (1, Bound::ScaleToZeroGrace));
        assert!(d.explanation.metrics[0].stable_window_load == 0.0);
        // (170, 230] is exactly 0: the grace runs from here, 30 s.
        assert_eq!(s.decide(at(230)).desired, 1);
        assert_eq!(s.decide(at(259)).desired, 1);
        assert_eq!(s.decide(at(260)).desired, 0);
    }

    #[test]
    fn traffic_from_zero_scales_on_load() {
        let mut s = ServiceScaler::new(policy("scale_to_zero = true\ninitial_scale = 0"), 0);
        assert_eq!(s.decide(at(1)).desired, 0);
        feed(&mut s, &["a"], at(1), at(2), conc(30.0));
        let d = s.decide(at(2));
        // 30 / 7 → 5, in panic (5 >= 2 × 1).
        assert_eq!((d.desired, d.previous, d.explanation.mode), (5, 0, Mode::Panic));
    }

    #[test]
    fn a_late_instance_carries_its_load_and_blocks_scale_down_until_gone() {
        let p = policy(
            r#"
            stable_window = "10s"
            panic_window = "2s"
            instance_timeout = "5s"
            hysteresis = 0
            initial_scale = 3
            "#,
        );
        let mut s = ServiceScaler::new(p, 0);
        feed(&mut s, &ABC, 0, at(10), conc(7.0));
        assert_eq!(s.decide(at(10)).desired, 3);
        // c goes silent; a and b go idle.
        feed(&mut s, &["a", "b"], at(10), at(15), conc(0.0));
        let d = s.decide(at(15));
        let e = &d.explanation;
        // a, b: (20 × 7 + 20 × 0) / 40 = 3.5 each; c: 5 s reported + 5 s carried at 7.
        assert!(close(e.stable_window_load, 14.0), "{e:?}");
        // Panic (13, 15]: a and b idle, c carried over 2 s at 7.
        assert!(close(e.panic_window_load, 7.0), "{e:?}");
        assert_eq!((e.instances_reporting, e.instances_late, e.instances_ready), (2, 1, 3));
        assert_eq!(
            (d.desired, e.unbounded_replicas, e.bound_by),
            (3, 2, Bound::LateInstances)
        );
        assert!(e.summary.contains("2 reporting, 1 late"), "{}", e.summary);

        // 7 s silent > 5 s: gone, no longer carried; its reports in the
        // window still count. (7, 17]: a, b and c each 3 s at 7 in (7, 10],
        // then a, b idle: 3 × 21 / 10 = 6.3 (carrying c would give 13.3).
        feed(&mut s, &["a", "b"], at(15), at(17), conc(0.0));
        let d = s.decide(at(17));
        let e = &d.explanation;
        assert!(close(e.stable_window_load, 6.3), "{e:?}");
        assert_eq!((e.instances_reporting, e.instances_late, e.instances_gone), (2, 0, 1));
        assert_eq!((d.desired, e.bound_by), (1, Bound::None));
        // Counted gone until its last report leaves the stable window, then forgotten.
        feed(&mut s, &["a", "b"], at(17), at(20), conc(0.0));
        assert_eq!(s.decide(at(20)).explanation.instances_gone, 1);
        feed(&mut s, &["a", "b"], at(20), at(21), conc(0.0));
        assert_eq!(s.decide(at(21)).explanation.instances_gone, 0);
    }

    #[test]
    fn the_metric_asking_for_most_wins() {
        let p = policy(
            r#"
            targets = { concurrency = 10, rps = 100, cpu = 1 }
            target_utilization = 1
            panic_threshold = 5
            initial_scale = 2
            "#,
        );
        let mut s = ServiceScaler::new(p, 0);
        // Each of 2 instances per 250 ms: concurrency 5, 50 requests (200/s),
        // 125 ms CPU (0.5 cores). Totals 10 → 1, 400/s → 4, 1 core → 1.
        let busy = Report {
            concurrency: 5.0,
            requests: 50,
            cpu_micros: 125_000,
        };
        feed(&mut s, &["a", "b"], 0, at(60), busy);
        let d = s.decide(at(60));
        let e = &d.explanation;
        assert_eq!((d.desired, e.mode, e.metric), (4, Mode::Stable, Metric::Rps));
        assert!(
            close(e.target_per_instance, 100.0) && close(e.stable_window_load, 400.0),
            "{e:?}"
        );
        let seen: Vec<(Metric, u32)> = e.metrics.iter().map(|m| (m.metric, m.desired_replicas)).collect();
        assert_eq!(seen, [(Metric::Concurrency, 1), (Metric::Rps, 4), (Metric::Cpu, 1)]);
        assert!(close(e.metrics[0].stable_window_load, 10.0) && close(e.metrics[2].panic_window_load, 1.0));

        // CPU-bound now: 750 ms CPU per 250 ms (3 cores) each → 6 cores → 6.
        let hot = Report {
            cpu_micros: 750_000,
            ..busy
        };
        feed(&mut s, &["a", "b"], at(60), at(120), hot);
        let d = s.decide(at(120));
        assert_eq!((d.desired, d.explanation.metric), (6, Metric::Cpu));
        assert!(close(d.explanation.stable_window_load, 6.0));
    }

    #[test]
    fn an_exact_multiple_needs_no_extra_instance() {
        // 0.7 per instance × 6 adds up to 4.2, and 4.2 / 0.7 is
        // 6.000000000000001 in floats: still 6 instances, not 7.
        let mut s = ServiceScaler::new(policy("targets = { concurrency = 1 }\ninitial_scale = 6"), 0);
        let six = ["a", "b", "c", "d", "e", "f"];
        feed(&mut s, &six, 0, at(60), conc(0.7));
        let d = s.decide(at(60));
        assert!(
            d.explanation.stable_window_load / 0.7 > 6.0,
            "the float noise this guards against"
        );
        assert_eq!((d.desired, d.explanation.unbounded_replicas), (6, 6));

        assert_eq!(replicas_for(21.0, 7.0), 3);
        assert_eq!(replicas_for(21.03, 7.0), 4);
        assert_eq!(replicas_for(0.001, 7.0), 1);
        assert_eq!(replicas_for(0.0, 7.0), 0);
        assert_eq!(replicas_for(-5.0, 7.0), 0);
        assert_eq!(replicas_for(f64::NAN, 7.0), 0);
        assert_eq!(replicas_for(1.0, 0.0), u32::MAX);
        assert_eq!(window_text(std::time::Duration::from_secs(60)), "60s");
        assert_eq!(window_text(std::time::Duration::from_millis(1500)), "1500ms");
        assert_eq!(window_text(std::time::Duration::from_micros(2_000_500)), "2.0005s");
    }

    /// Phases of 2 s at `per_instance` for 3 instances, a decision at the end of each.
    fn phases(s: &mut ServiceScaler, values: impl IntoIterator<Item = f64>) -> Vec<u32> {
        let mut decided = Vec::new();
        for (k, v) in values.into_iter().enumerate() {
            let start = at(2 * k as i64);
            feed(s, &ABC, start, start + at(2), conc(v));
            decided.push(s.decide(start + at(2)).desired);
        }
        decided
    }

    #[test]
    fn hysteresis_stops_flapping_at_the_edge() {
        let edge = r#"
            stable_window = "2s"
            panic_window = "1s"
            panic_threshold = 10
            initial_scale = 3
            instance_startup = "0s"
            max_reversals_per_window = 100
        "#;
        // Exactly 3 × 7: 3, float noise or not.
        let mut s = ServiceScaler::new(policy(edge), 0);
        assert_eq!(phases(&mut s, [7.0; 5]), [3; 5]);

        // 21 ± 0.03 in turn: up to 4 once, then hysteresis holds 4, since
        // 20.97 > 3 × 7 × 0.9 = 18.9.
        let noisy = (0..20).map(|k| if k % 2 == 0 { 7.01 } else { 6.99 });
        let mut s = ServiceScaler::new(policy(edge), 0);
        assert_eq!(phases(&mut s, noisy.clone()), [4; 20]);
        let feed_one = |s: &mut ServiceScaler| {
            feed(s, &ABC, at(40), at(42), conc(6.99));
            s.decide(at(42))
        };
        let d = feed_one(&mut s);
        assert_eq!((d.desired, d.explanation.unbounded_replicas), (4, 3));
        assert_eq!(d.explanation.bound_by, Bound::Hysteresis);

        // Without hysteresis the same load flaps on every decision.
        let mut s = ServiceScaler::new(policy(&format!("{edge}\nhysteresis = 0")), 0);
        let decided = phases(&mut s, noisy);
        let expected: Vec<u32> = (0..20).map(|k| if k % 2 == 0 { 4 } else { 3 }).collect();
        assert_eq!(decided, expected);
    }

    #[test]
    fn the_change_budget_holds_a_third_reversal() {
        let p = policy(
            r#"
            stable_window = "4s"
            panic_window = "1s"
            panic_threshold = 10
            hysteresis = 0
            instance_startup = "0s"
            initial_scale = 2
            "#,
        );
        let mut s = ServiceScaler::new(p, 0);
        // One instance, one 1 s report per second; the stable load is the
        // integral over the last 4 s, / 4.
        let mut report = |t: i64, concurrency: f64| {
            s.observe(&Observation {
                instance: "a",
                at_micros: at(t),
                window_micros: SECOND,
                concurrency,
                requests: 0,
                cpu_micros: 0,
            });
            s.decide(at(t))
        };
        for t in 1..=4 {
            assert_eq!(report(t, 14.0).desired, 2);
        }
        // Averages 15 → 3 (up), 14 → 2 (down, reversal 1), 15 → 3 (up, reversal 2).
        assert_eq!(report(5, 18.0).desired, 3);
        assert_eq!(report(6, 10.0).desired, 2);
        assert_eq!(report(7, 18.0).desired, 3);
        // 14 → 2 would be a third reversal within 4 s: held.
        let d = report(8, 10.0);
        assert_eq!((d.desired, d.explanation.unbounded_replicas), (3, 2));
        assert_eq!(d.explanation.bound_by, Bound::ChangeBudget);
        // (5, 9]: 12 → 2, still two reversals (6 s, 7 s) within 4 s.
        assert_eq!(report(9, 10.0).explanation.bound_by, Bound::ChangeBudget);
        // At 10 s the reversal at 6 s has left the window.
        let d = report(10, 10.0);
        assert_eq!((d.desired, d.explanation.bound_by), (2, Bound::None));
    }

    #[test]
    fn scale_down_delay_takes_the_highest_recent_candidate() {
        let p = policy(
            r#"
            stable_window = "2s"
            panic_window = "1s"
            panic_threshold = 10
            hysteresis = 0
            instance_startup = "0s"
            max_scale_down_rate = 100
            scale_down_delay = "5s"
            initial_scale = 3
            "#,
        );
        let mut s = ServiceScaler::new(p, 0);
        // Phases of 2 s, decisions at 2, 4, ...: 6 (at 2 s) then 1.
        let decided = phases(&mut s, [14.0, 7.0 / 3.0, 7.0 / 3.0, 7.0 / 3.0, 7.0 / 3.0]);
        // The 6 asked for at 2 s stands until 7 s; at 8 s the window (3, 8] holds only 1s.
        assert_eq!(decided, [6, 6, 6, 1, 1]);
        let mut s = ServiceScaler::new(s.policy().clone(), 0);
        phases(&mut s, [14.0, 7.0 / 3.0]);
        assert_eq!(s.decide(at(4)).explanation.bound_by, Bound::ScaleDownDelay);
    }

    #[test]
    fn out_of_order_reports_count_like_in_order_ones() {
        let p = policy("panic_threshold = 10");
        let mut in_order = ServiceScaler::new(p.clone(), 0);
        let mut reversed = ServiceScaler::new(p, 0);
        feed(&mut in_order, &["a"], 0, at(60), conc(7.0));
        for k in (1..=240).rev() {
            reversed.observe(&Observation {
                instance: "a",
                at_micros: k * TICK,
                window_micros: TICK,
                concurrency: 7.0,
                requests: 0,
                cpu_micros: 0,
            });
        }
        assert_eq!(in_order.decide(at(60)), reversed.decide(at(60)));

        // Reports for (57, 58] arrive after the newer ones.
        let mut s = ServiceScaler::new(policy("panic_threshold = 10"), 0);
        feed(&mut s, &["a"], 0, at(57), conc(7.0));
        feed(&mut s, &["a"], at(58), at(60), conc(7.0));
        let d = s.decide(at(60));
        assert_eq!(d.desired, 1);
        // The missing second reads as no load until its reports arrive:
        // 59 s × 7 / 60 s.
        assert!(
            close(d.explanation.stable_window_load, 413.0 / 60.0),
            "{:?}",
            d.explanation
        );
        feed(&mut s, &["a"], at(57), at(58), conc(21.0));
        let d = s.decide(at(60));
        // Filled in, exactly as if in order: (57 × 7 + 1 × 21 + 2 × 7) / 60 =
        // 434 / 60 = 1736 / 240; the 6 s panic window (54, 60]: (3 × 7 +
        // 21 + 2 × 7) / 6 = 56 / 6 = 224 / 24.
        assert!(
            close(d.explanation.stable_window_load, 1736.0 / 240.0),
            "{:?}",
            d.explanation
        );
        assert!(
            close(d.explanation.panic_window_load, 224.0 / 24.0),
            "{:?}",
            d.explanation
        );
        assert_eq!((d.desired, d.explanation.instances_reporting), (2, 1));
    }

    #[test]
    fn nothing_reported_keeps_the_initial_scale() {
        let mut s = ServiceScaler::new(policy("initial_scale = 4"), 0);
        let d = s.decide(at(100));
        assert_eq!((d.desired, d.previous, s.replicas()), (4, 4, 4));
        assert_eq!(
            d.explanation.summary,
            "no reports yet: keeping the initial scale of 4; 0 reporting"
        );
        // Within instance_startup the asked-for instances count as starting.
        let mut s = ServiceScaler::new(policy("initial_scale = 4"), at(95));
        assert_eq!(s.decide(at(100)).explanation.instances_starting, 4);
    }

    #[test]
    fn a_reloaded_policy_keeps_the_windows() {
        let mut s = ServiceScaler::new(policy("initial_scale = 3\npanic_threshold = 10"), 0);
        feed(&mut s, &ABC, 0, at(60), conc(7.0));
        assert_eq!(s.decide(at(60)).desired, 3);
        s.set_policy(policy("targets = { concurrency = 5 }\npanic_threshold = 10"));
        // 21 / 3.5 = 6 from the same reports.
        let d = s.decide(at(60));
        assert_eq!((d.desired, d.previous), (6, 3));
        assert!(close(d.explanation.target_per_instance, 3.5));
    }

    #[test]
    fn to_proto_fills_every_field() {
        let p = policy(
            r#"
            stable_window = "10s"
            panic_window = "2s"
            instance_timeout = "5s"
            hysteresis = 0
            initial_scale = 3
            targets = { concurrency = 10, rps = 1000 }
            "#,
        );
        let mut s = ServiceScaler::new(p, 0);
        feed(&mut s, &ABC, 0, at(10), conc(7.0));
        s.decide(at(10));
        feed(&mut s, &["a", "b"], at(10), at(15), conc(0.0));
        let d = s.decide(at(15));
        let wire = d.to_proto("d-1".to_owned(), "shop".to_owned(), 1_764_000_000_000_000);
        assert_eq!(wire.decision_id, "d-1");
        assert_eq!(wire.service, "shop");
        assert_eq!(wire.decided_at_unix_micros, 1_764_000_000_000_000);
        assert_eq!((wire.desired_replicas, wire.previous_replicas), (3, 3));
        let e = wire.explanation.expect("explanation");
        assert_eq!((e.mode.as_str(), e.metric.as_str()), ("stable", "concurrency"));
        assert!(close(e.target_per_instance, 7.0));
        assert!(close(e.stable_window_load, 14.0) && close(e.panic_window_load, 7.0));
        assert_eq!((e.stable_window_seconds, e.panic_window_seconds), (10.0, 2.0));
        assert_eq!((e.instances_reporting, e.instances_ready), (2, 3));
        assert_eq!((e.bound_by.as_str(), e.unbounded_replicas), ("late_instances", 2));
        assert_eq!((e.instances_late, e.instances_gone, e.instances_starting), (1, 0, 0));
        assert_eq!(e.target_utilization, 0.7);
        assert_eq!(e.metrics.len(), 2);
        assert_eq!(e.metrics[0].metric, "concurrency");
        assert_eq!(e.metrics[1].metric, "rps");
        assert!(close(e.metrics[1].target_per_instance, 700.0));
        assert_eq!((e.metrics[0].desired_replicas, e.metrics[1].desired_replicas), (2, 0));
        assert!(close(e.metrics[0].stable_window_load, 14.0) && close(e.metrics[0].panic_window_load, 7.0));
        assert_eq!(e.summary, d.explanation.summary);
        assert_eq!(
            e.summary,
            "stable: 14.0 concurrency over 10s needs 2 at 7.0/instance (10 x 0.70); 2 reporting, 1 late; \
             stays 3, bound by late_instances"
        );
    }

    #[test]
    fn names_on_the_wire() {
        let bounds = [
            Bound::None,
            Bound::MinReplicas,
            Bound::MaxReplicas,
            Bound::MaxScaleUpRate,
            Bound::MaxScaleDownRate,
            Bound::ScaleDownDelay,
            Bound::PanicHold,
            Bound::Hysteresis,
            Bound::ChangeBudget,
            Bound::LateInstances,
            Bound::ScaleToZeroGrace,
            Bound::InstancesStarting,
            Bound::WarmingUp,
        ];
        let names: Vec<&str> = bounds.iter().map(|b| b.as_str()).collect();
        assert_eq!(
            names,
            [
                "",
                "min_replicas",
                "max_replicas",
                "max_scale_up_rate",
                "max_scale_down_rate",
                "scale_down_delay",
                "panic_hold",
                "hysteresis",
                "change_budget",
                "late_instances",
                "scale_to_zero_grace",
                "instances_starting",
                "warming_up"
            ]
        );
        assert_eq!((Mode::Stable.as_str(), Mode::Panic.as_str()), ("stable", "panic"));
    }

    #[test]
    fn instances_starting_hold_a_scale_down() {
        let p = policy(
            r#"
            stable_window = "2s"
            panic_window = "1s"
            panic_threshold = 10
            hysteresis = 0
            initial_scale = 3
            "#,
        );
        let mut s = ServiceScaler::new(p, 0);
        // Up to 6 at 2 s; the 3 new instances never report; load falls back.
        let decided = phases(&mut s, [14.0, 7.0, 7.0]);
        assert_eq!(decided, [6, 6, 6]);
        let d = s.decide(at(6));
        assert_eq!(
            (d.explanation.bound_by, d.explanation.instances_starting),
            (Bound::InstancesStarting, 3)
        );
        // 10 s after the scale-up they no longer count as starting.
        feed(&mut s, &ABC, at(6), at(12), conc(7.0));
        let d = s.decide(at(12));
        assert_eq!((d.desired, d.explanation.instances_starting), (3, 0));
    }

    #[test]
    fn no_scale_down_before_the_reports_cover_a_stable_window() {
        // Sized at 40 for a load that starts quiet: 40 instances at 0.7 each
        // is 28 in flight, which needs 4 at 7 per instance.
        let p = policy("initial_scale = 40\nstable_window = \"10s\"\npanic_window = \"2s\"\ninstance_startup = \"0s\"");
        let mut s = ServiceScaler::new(p, 0);
        let instances: Vec<String> = (0..40).map(|i| format!("i{i}")).collect();
        let names: Vec<&str> = instances.iter().map(String::as_str).collect();
        feed(&mut s, &names, at(0), at(9), conc(0.7));
        let d = s.decide(at(9));
        assert_eq!(
            (d.desired, d.explanation.bound_by),
            (40, Bound::WarmingUp),
            "{:?}",
            d.explanation
        );
        // A full stable window on: down, by at most half (40 / 2).
        feed(&mut s, &names, at(9), at(10), conc(0.7));
        let d = s.decide(at(10));
        assert_eq!(
            (d.desired, d.explanation.bound_by),
            (20, Bound::MaxScaleDownRate),
            "{:?}",
            d.explanation
        );
    }

    #[test]
    fn decide_never_panics_on_odd_input() {
        let odd = Policy {
            targets: vec![(Metric::Rps, f64::NAN), (Metric::Cpu, 0.0)],
            target_utilization: f64::NAN,
            min_replicas: 7,
            max_replicas: 2,
            max_scale_up_rate: f64::INFINITY,
            max_scale_down_rate: 0.0,
            hysteresis: f64::NAN,
            max_reversals_per_window: 0,
            ..Policy::default()
        };
        let mut s = ServiceScaler::new(odd, i64::MIN);
        for (at_micros, window_micros) in [(i64::MIN, 1), (i64::MAX, i64::MAX), (0, -5), (5, 1)] {
            s.observe(&Observation {
                instance: "x",
                at_micros,
                window_micros,
                concurrency: f64::INFINITY,
                requests: u64::MAX,
                cpu_micros: u64::MAX,
            });
        }
        for now in [i64::MIN, 0, i64::MAX, 3, i64::MIN] {
            let d = s.decide(now);
            let _ = d.to_proto(String::new(), String::new(), now);
        }
        let mut s = ServiceScaler::new(Policy::default(), 0);
        s.set_policy(Policy {
            targets: Vec::new(),
            ..Policy::default()
        });
        feed(&mut s, &["a"], 0, at(60), conc(14.0));
        assert_eq!(s.decide(at(60)).desired, 2);
    }
}
