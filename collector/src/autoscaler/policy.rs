//! Scaling policies: what a service is scaled on and how fast it may move.
//!
//! A policy is written as TOML, once as the collector's defaults and
//! optionally once per service. [`PolicySpec`] is that written form: every key
//! optional, unknown keys refused. [`Policy::resolve`] layers a service's spec
//! over the defaults' spec over the built-in defaults (a key the service sets
//! wins as a whole; `targets` is one key, so a service that names its targets
//! replaces the default targets rather than merging with them) and then
//! validates the result, naming the key and the reason of the first problem.
//!
//! ```toml
//! targets = { concurrency = 10, rps = 200 }
//! target_utilization = 0.7
//! stable_window = "60s"
//! panic_window = "6s"
//! scale_to_zero = true
//! ```
//!
//! Built-in defaults follow Knative's KPA where it has one: one target of
//! `concurrency = 10` requests in flight per instance (the KPA's container
//! concurrency target in its "soft limit" mode), 70 % utilization, a 60 s
//! stable and 6 s panic window, panic at 2x, scale up at most 1000x and down
//! at most 2x per decision, scale-to-zero grace 30 s.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// What a target is set on. The order of the variants is the order in which
/// metrics are listed in policies and explanations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Time-weighted average of requests in flight.
    Concurrency,
    /// Requests finished per second.
    Rps,
    /// CPU cores in use (CPU seconds per second).
    Cpu,
}

impl Metric {
    /// Every metric, in listing order.
    pub const ALL: [Metric; 3] = [Metric::Concurrency, Metric::Rps, Metric::Cpu];

    /// The metric's name in configs and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Concurrency => "concurrency",
            Metric::Rps => "rps",
            Metric::Cpu => "cpu",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The written form of a policy: every key optional, so that layers can be
/// laid over one another. Durations are humantime strings (`"60s"`, `"500ms"`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub targets: Option<BTreeMap<Metric, f64>>,
    pub target_utilization: Option<f64>,
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub initial_scale: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    pub stable_window: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub panic_window: Option<Duration>,
    pub panic_threshold: Option<f64>,
    pub max_scale_up_rate: Option<f64>,
    pub max_scale_down_rate: Option<f64>,
    #[serde(default, deserialize_with = "duration")]
    pub scale_down_delay: Option<Duration>,
    pub scale_to_zero: Option<bool>,
    #[serde(default, deserialize_with = "duration")]
    pub scale_to_zero_grace: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub instance_startup: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub instance_timeout: Option<Duration>,
    pub hysteresis: Option<f64>,
    pub max_reversals_per_window: Option<u32>,
}

/// Parses a humantime duration string such as `"60s"` or `"500ms"`.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

impl PolicySpec {
    /// `self` with every key that `over` sets replaced by `over`'s value.
    pub fn overlaid_with(&self, over: &PolicySpec) -> PolicySpec {
        PolicySpec {
            targets: over.targets.clone().or_else(|| self.targets.clone()),
            target_utilization: over.target_utilization.or(self.target_utilization),
            min_replicas: over.min_replicas.or(self.min_replicas),
            max_replicas: over.max_replicas.or(self.max_replicas),
            initial_scale: over.initial_scale.or(self.initial_scale),
            stable_window: over.stable_window.or(self.stable_window),
            panic_window: over.panic_window.or(self.panic_window),
            panic_threshold: over.panic_threshold.or(self.panic_threshold),
            max_scale_up_rate: over.max_scale_up_rate.or(self.max_scale_up_rate),
            max_scale_down_rate: over.max_scale_down_rate.or(self.max_scale_down_rate),
            scale_down_delay: over.scale_down_delay.or(self.scale_down_delay),
            scale_to_zero: over.scale_to_zero.or(self.scale_to_zero),
            scale_to_zero_grace: over.scale_to_zero_grace.or(self.scale_to_zero_grace),
            instance_startup: over.instance_startup.or(self.instance_startup),
            instance_timeout: over.instance_timeout.or(self.instance_timeout),
            hysteresis: over.hysteresis.or(self.hysteresis),
            max_reversals_per_window: over.max_reversals_per_window.or(self.max_reversals_per_window),
        }
    }
}

/// A resolved, validated policy. Build it with [`Policy::resolve`] (or
/// [`Policy::default`]); [`Policy::validate`] states the rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Target per instance per metric, in [`Metric`] order. Several targets:
    /// the metric that asks for the most instances wins.
    pub targets: Vec<(Metric, f64)>,
    /// Share of each target an instance is meant to run at; the count is
    /// computed against `target * target_utilization`.
    pub target_utilization: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// The count before any load is seen.
    pub initial_scale: u32,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic when the panic window asks for this many times the capacity.
    pub panic_threshold: f64,
    /// One decision may at most multiply the ready instances by this.
    pub max_scale_up_rate: f64,
    /// One decision may at most divide the instances by this.
    pub max_scale_down_rate: f64,
    /// A scale-down takes the highest count asked for over this long.
    pub scale_down_delay: Duration,
    pub scale_to_zero: bool,
    /// How long every metric must have been exactly 0 before going to zero.
    pub scale_to_zero_grace: Duration,
    /// An instance asked for is expected to report within this.
    pub instance_startup: Duration,
    /// A silent instance counts as gone after this.
    pub instance_timeout: Duration,
    /// Scale down to `n` only when the load is at most `n * target * (1 - hysteresis)`.
    pub hysteresis: f64,
    /// Direction reversals allowed per stable window before scale-downs wait.
    pub max_reversals_per_window: u32,
}

/// The default target when a policy names none.
pub const DEFAULT_TARGET: (Metric, f64) = (Metric::Concurrency, 10.0);

impl Default for Policy {
    /// The built-in defaults (see the module docs).
    fn default() -> Policy {
        Policy {
            targets: vec![DEFAULT_TARGET],
            target_utilization: 0.7,
            min_replicas: 1,
            max_replicas: 100,
            initial_scale: 1,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay: Duration::ZERO,
            scale_to_zero: false,
            scale_to_zero_grace: Duration::from_secs(30),
            instance_startup: Duration::from_secs(10),
            instance_timeout: Duration::from_secs(10),
            hysteresis: 0.1,
            max_reversals_per_window: 2,
        }
    }
}

/// A policy that cannot be used: the key at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct PolicyError {
    pub key: &'static str,
    pub reason: String,
}

impl PolicyError {
    fn new(key: &'static str, reason: impl Into<String>) -> PolicyError {
        PolicyError {
            key,
            reason: reason.into(),
        }
    }
}

/// The shortest panic window: shorter windows hold too few reports to mean anything.
const MIN_PANIC_WINDOW: Duration = Duration::from_millis(100);

impl Policy {
    /// `service` laid over `defaults` laid over the built-in defaults, validated.
    ///
    /// Two defaults depend on other keys: `min_replicas` defaults to 0 when
    /// `scale_to_zero` is set and to 1 otherwise, and `initial_scale`
    /// defaults to 1 moved into `[min_replicas, max_replicas]`.
    pub fn resolve(defaults: &PolicySpec, service: &PolicySpec) -> Result<Policy, PolicyError> {
        let spec = defaults.overlaid_with(service);
        let builtin = Policy::default();
        let scale_to_zero = spec.scale_to_zero.unwrap_or(builtin.scale_to_zero);
        let min_replicas = spec.min_replicas.unwrap_or(if scale_to_zero { 0 } else { 1 });
        let max_replicas = spec.max_replicas.unwrap_or(builtin.max_replicas);
        let policy = Policy {
            targets: match &spec.targets {
                Some(targets) => targets.iter().map(|(m, t)| (*m, *t)).collect(),
                None => builtin.targets,
            },
            target_utilization: spec.target_utilization.unwrap_or(builtin.target_utilization),
            min_replicas,
            max_replicas,
            initial_scale: spec
                .initial_scale
                .unwrap_or_else(|| builtin.initial_scale.max(min_replicas).min(max_replicas)),
            stable_window: spec.stable_window.unwrap_or(builtin.stable_window),
            panic_window: spec.panic_window.unwrap_or(builtin.panic_window),
            panic_threshold: spec.panic_threshold.unwrap_or(builtin.panic_threshold),
            max_scale_up_rate: spec.max_scale_up_rate.unwrap_or(builtin.max_scale_up_rate),
            max_scale_down_rate: spec.max_scale_down_rate.unwrap_or(builtin.max_scale_down_rate),
            scale_down_delay: spec.scale_down_delay.unwrap_or(builtin.scale_down_delay),
            scale_to_zero,
            scale_to_zero_grace: spec.scale_to_zero_grace.unwrap_or(builtin.scale_to_zero_grace),
            instance_startup: spec.instance_startup.unwrap_or(builtin.instance_startup),
            instance_timeout: spec.instance_timeout.unwrap_or(builtin.instance_timeout),
            hysteresis: spec.hysteresis.unwrap_or(builtin.hysteresis),
            max_reversals_per_window: spec
                .max_reversals_per_window
                .unwrap_or(builtin.max_reversals_per_window),
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every rule; the error names the first key that breaks one.
    pub fn validate(&self) -> Result<(), PolicyError> {
        self.validate_targets()?;
        self.validate_replicas()?;
        self.validate_windows()?;
        self.validate_rates()?;
        self.validate_instances()
    }

    fn validate_targets(&self) -> Result<(), PolicyError> {
        if self.targets.is_empty() {
            return Err(PolicyError::new("targets", "at least one target is needed"));
        }
        for (metric, target) in &self.targets {
            if !(target.is_finite() && *target > 0.0) {
                return Err(PolicyError::new(
                    "targets",
                    format!("{metric} = {target} must be a number above 0"),
                ));
            }
        }
        let u = self.target_utilization;
        if !(u.is_finite() && u > 0.0 && u <= 1.0) {
            return Err(PolicyError::new(
                "target_utilization",
                format!("{u} must be above 0 and at most 1"),
            ));
        }
        Ok(())
    }

    fn validate_replicas(&self) -> Result<(), PolicyError> {
        if self.max_replicas == 0 {
            return Err(PolicyError::new("max_replicas", "must be at least 1"));
        }
        if self.min_replicas > self.max_replicas {
            return Err(PolicyError::new(
                "min_replicas",
                format!("{} is above max_replicas {}", self.min_replicas, self.max_replicas),
            ));
        }
        if self.scale_to_zero && self.min_replicas != 0 {
            return Err(PolicyError::new(
                "scale_to_zero",
                format!("needs min_replicas = 0, not {}", self.min_replicas),
            ));
        }
        if !self.scale_to_zero && self.min_replicas == 0 {
            return Err(PolicyError::new("min_replicas", "0 needs scale_to_zero = true"));
        }
        if self.initial_scale < self.min_replicas || self.initial_scale > self.max_replicas {
            return Err(PolicyError::new(
                "initial_scale",
                format!(
                    "{} is outside min_replicas {} ..= max_replicas {}",
                    self.initial_scale, self.min_replicas, self.max_replicas
                ),
            ));
        }
        Ok(())
    }

    fn validate_windows(&self) -> Result<(), PolicyError> {
        if self.panic_window < MIN_PANIC_WINDOW {
            return Err(PolicyError::new(
                "panic_window",
                format!(
                    "{} must be at least {}",
                    show(self.panic_window),
                    show(MIN_PANIC_WINDOW)
                ),
            ));
        }
        if self.panic_window >= self.stable_window {
            return Err(PolicyError::new(
                "panic_window",
                format!(
                    "{} must be shorter than stable_window {}",
                    show(self.panic_window),
                    show(self.stable_window)
                ),
            ));
        }
        Ok(())
    }

    fn validate_rates(&self) -> Result<(), PolicyError> {
        above_one("panic_threshold", self.panic_threshold)?;
        above_one("max_scale_up_rate", self.max_scale_up_rate)?;
        above_one("max_scale_down_rate", self.max_scale_down_rate)?;
        let h = self.hysteresis;
        if !(h.is_finite() && (0.0..0.5).contains(&h)) {
            return Err(PolicyError::new(
                "hysteresis",
                format!("{h} must be at least 0 and below 0.5"),
            ));
        }
        Ok(())
    }

    fn validate_instances(&self) -> Result<(), PolicyError> {
        if self.instance_timeout.is_zero() {
            return Err(PolicyError::new("instance_timeout", "must be longer than 0s"));
        }
        if self.max_reversals_per_window == 0 {
            // 0 would hold every scale-down after a scale-up for good.
            return Err(PolicyError::new("max_reversals_per_window", "must be at least 1"));
        }
        Ok(())
    }

    /// The value the count is computed against for `target`: `target * utilization`.
    pub fn effective_target(&self, target: f64) -> f64 {
        target * self.target_utilization
    }
}

fn above_one(key: &'static str, value: f64) -> Result<(), PolicyError> {
    if value.is_finite() && value > 1.0 {
        Ok(())
    } else {
        Err(PolicyError::new(key, format!("{value} must be above 1")))
    }
}

/// A duration as people write it in configs: `6s`, `500ms`.
fn show(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A duration in whole microseconds, saturating (policies hold durations far
/// below the ~292,000 years where i64 microseconds end).
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> PolicySpec {
        toml::from_str(text).expect("spec parses")
    }

    fn resolve(text: &str) -> Result<Policy, PolicyError> {
        Policy::resolve(&PolicySpec::default(), &spec(text))
    }

    #[test]
    fn empty_specs_give_the_builtin_defaults() {
        let policy = resolve("").expect("defaults are valid");
        assert_eq!(policy, Policy::default());
        assert_eq!(policy.targets, vec![(Metric::Concurrency, 10.0)]);
        assert_eq!(policy.target_utilization, 0.7);
        assert_eq!(
            (policy.min_replicas, policy.max_replicas, policy.initial_scale),
            (1, 100, 1)
        );
        assert_eq!(policy.stable_window, Duration::from_secs(60));
        assert_eq!(policy.panic_window, Duration::from_secs(6));
        assert_eq!(policy.panic_threshold, 2.0);
        assert_eq!((policy.max_scale_up_rate, policy.max_scale_down_rate), (1000.0, 2.0));
        assert_eq!(policy.scale_down_delay, Duration::ZERO);
        assert!(!policy.scale_to_zero);
        assert_eq!(policy.scale_to_zero_grace, Duration::from_secs(30));
        assert_eq!(policy.instance_startup, Duration::from_secs(10));
        assert_eq!(policy.instance_timeout, Duration::from_secs(10));
        assert_eq!(policy.hysteresis, 0.1);
        assert_eq!(policy.max_reversals_per_window, 2);
        assert_eq!(policy.effective_target(10.0), 7.0);
    }

    #[test]
    fn every_key_parses() {
        let policy = resolve(
            r#"
            targets = { rps = 200, concurrency = 10, cpu = 0.5 }
            target_utilization = 0.8
            min_replicas = 0
            max_replicas = 40
            initial_scale = 2
            stable_window = "2m"
            panic_window = "500ms"
            panic_threshold = 3
            max_scale_up_rate = 10.5
            max_scale_down_rate = 4
            scale_down_delay = "5m"
            scale_to_zero = true
            scale_to_zero_grace = "45s"
            instance_startup = "20s"
            instance_timeout = "15s"
            hysteresis = 0.2
            max_reversals_per_window = 5
            "#,
        )
        .expect("valid");
        // Listed in Metric order, whatever the order in the file.
        assert_eq!(
            policy.targets,
            vec![(Metric::Concurrency, 10.0), (Metric::Rps, 200.0), (Metric::Cpu, 0.5)]
        );
        assert_eq!(policy.target_utilization, 0.8);
        assert_eq!(
            (policy.min_replicas, policy.max_replicas, policy.initial_scale),
            (0, 40, 2)
        );
        assert_eq!(policy.stable_window, Duration::from_secs(120));
        assert_eq!(policy.panic_window, Duration::from_millis(500));
        assert_eq!(policy.panic_threshold, 3.0);
        assert_eq!((policy.max_scale_up_rate, policy.max_scale_down_rate), (10.5, 4.0));
        assert_eq!(policy.scale_down_delay, Duration::from_secs(300));
        assert!(policy.scale_to_zero);
        assert_eq!(policy.scale_to_zero_grace, Duration::from_secs(45));
        assert_eq!(policy.instance_startup, Duration::from_secs(20));
        assert_eq!(policy.instance_timeout, Duration::from_secs(15));
        assert_eq!(policy.hysteresis, 0.2);
        assert_eq!(policy.max_reversals_per_window, 5);
    }

    #[test]
    fn service_keys_override_defaults_which_override_builtins() {
        let defaults = spec(
            r#"
            targets = { rps = 100 }
            stable_window = "30s"
            max_replicas = 20
            "#,
        );
        let service = spec(
            r#"
            targets = { concurrency = 4 }
            max_replicas = 8
            "#,
        );
        let policy = Policy::resolve(&defaults, &service).expect("valid");
        // `targets` is one key: the service's replaces the defaults', no merge.
        assert_eq!(policy.targets, vec![(Metric::Concurrency, 4.0)]);
        assert_eq!(policy.max_replicas, 8);
        assert_eq!(policy.stable_window, Duration::from_secs(30));
        assert_eq!(policy.panic_window, Duration::from_secs(6));

        let policy = Policy::resolve(&defaults, &PolicySpec::default()).expect("valid");
        assert_eq!(policy.targets, vec![(Metric::Rps, 100.0)]);
        assert_eq!(policy.max_replicas, 20);
    }

    #[test]
    fn defaults_that_depend_on_other_keys() {
        let policy = resolve("scale_to_zero = true").expect("valid");
        assert_eq!((policy.min_replicas, policy.initial_scale), (0, 1));
        let policy = resolve("min_replicas = 3").expect("valid");
        assert_eq!(policy.initial_scale, 3);
        let policy = resolve("scale_to_zero = true\ninitial_scale = 0").expect("valid");
        assert_eq!(policy.initial_scale, 0);
    }

    #[test]
    fn each_validation_error_names_its_key() {
        let cases = [
            ("targets = {}", "targets"),
            ("targets = { rps = 0 }", "targets"),
            ("targets = { cpu = -1.5 }", "targets"),
            ("targets = { rps = nan }", "targets"),
            ("target_utilization = 0", "target_utilization"),
            ("target_utilization = 1.01", "target_utilization"),
            ("max_replicas = 0", "max_replicas"),
            ("min_replicas = 5\nmax_replicas = 4", "min_replicas"),
            ("min_replicas = 0", "min_replicas"),
            ("scale_to_zero = true\nmin_replicas = 1", "scale_to_zero"),
            ("initial_scale = 101", "initial_scale"),
            ("min_replicas = 2\ninitial_scale = 1", "initial_scale"),
            (r#"panic_window = "50ms""#, "panic_window"),
            (r#"panic_window = "60s""#, "panic_window"),
            ("panic_threshold = 1", "panic_threshold"),
            ("max_scale_up_rate = 0.5", "max_scale_up_rate"),
            ("max_scale_down_rate = 1", "max_scale_down_rate"),
            ("hysteresis = 0.5", "hysteresis"),
            ("hysteresis = -0.1", "hysteresis"),
            (r#"instance_timeout = "0s""#, "instance_timeout"),
            ("max_reversals_per_window = 0", "max_reversals_per_window"),
        ];
        for (text, key) in cases {
            let error = resolve(text).expect_err(text);
            assert_eq!(error.key, key, "{text}: {error}");
            assert!(error.to_string().starts_with(&format!("{key}: ")), "{error}");
        }
    }

    #[test]
    fn error_messages_say_why() {
        let error = resolve("stable_window = \"5s\"").expect_err("panic window too long");
        assert_eq!(
            error.to_string(),
            "panic_window: 6s must be shorter than stable_window 5s"
        );
        let error = resolve("min_replicas = 5\nmax_replicas = 4").expect_err("min above max");
        assert_eq!(error.to_string(), "min_replicas: 5 is above max_replicas 4");
        let error = resolve("targets = { rps = 0 }").expect_err("zero target");
        assert_eq!(error.to_string(), "targets: rps = 0 must be a number above 0");
    }

    #[test]
    fn unknown_keys_and_bad_values_do_not_parse() {
        let error = toml::from_str::<PolicySpec>("stable_windw = \"60s\"").expect_err("unknown key");
        assert!(error.to_string().contains("stable_windw"), "{error}");
        let error = toml::from_str::<PolicySpec>("targets = { memory = 1 }").expect_err("unknown metric");
        assert!(error.to_string().contains("memory"), "{error}");
        let error = toml::from_str::<PolicySpec>("panic_window = \"6 parsecs\"").expect_err("bad duration");
        assert!(error.to_string().contains("invalid duration"), "{error}");
        let error = toml::from_str::<PolicySpec>("stable_window = 60").expect_err("duration as number");
        assert!(error.to_string().contains("stable_window"), "{error}");
    }

    #[test]
    fn metric_names() {
        let names: Vec<&str> = Metric::ALL.iter().map(|m| m.as_str()).collect();
        assert_eq!(names, ["concurrency", "rps", "cpu"]);
        assert_eq!(micros(Duration::from_millis(250)), 250_000);
        assert_eq!(micros(Duration::MAX), i64::MAX);
    }
}
