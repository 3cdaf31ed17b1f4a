//! The simulator end to end, over traces the tests make.

use std::time::Duration;

use super::engine::{self, Config, Outcome, Report, Scaler, View};
use super::tidemark::{Tidemark, resolve_policy};
use super::*;
use crate::trace::{Request, Trace};

const SECOND: i64 = 1_000_000;

/// A trace with one request every `gap` µs from `from` until `until`, each taking `service` µs.
fn steady(from: i64, until: i64, gap: i64, service: i64) -> Vec<Request> {
    (0..)
        .map(|i| from + i * gap)
        .take_while(|t| *t < until)
        .map(|arrival_micros| Request {
            arrival_micros,
            service_micros: service,
            tenant: None,
        })
        .collect()
}

fn trace(requests: Vec<Request>) -> Trace {
    Trace {
        requests,
        ..Trace::default()
    }
}

/// Tidemark's policy from `toml` (a service table's keys), the scenario it
/// implies, and Tidemark and both baselines configured for it.
fn setup(toml: &str, startup: Duration) -> (Scenario, Vec<Box<dyn Scaler>>) {
    let (_, policy) = resolve_policy("test.toml", &format!("[services.svc]\n{toml}"), None).expect("policy");
    let overrides = Overrides {
        startup: Some(startup),
        capacity: None,
        report_interval: Duration::from_millis(250),
    };
    let scenario = Scenario::new(&policy, overrides).expect("scenario");
    let mut scalers: Vec<Box<dyn Scaler>> = vec![Box::new(Tidemark::new(policy))];
    scalers.extend(scenario.baselines(&[Baseline::Kpa, Baseline::Hpa]));
    (scenario, scalers)
}

fn run_all(toml: &str, startup: Duration, requests: Vec<Request>) -> Vec<Outcome> {
    let (scenario, mut scalers) = setup(toml, startup);
    let trace = trace(requests);
    scalers.iter_mut().map(|s| scenario.run(&trace, s.as_mut())).collect()
}

fn by_name<'a>(outcomes: &'a [Outcome], name: &str) -> &'a Outcome {
    outcomes.iter().find(|o| o.policy == name).expect("policy ran")
}

/// Instances whose start-up the load tests assume.
const STARTUP: Duration = Duration::from_secs(5);

/// A constant load of 36.4 requests in flight (one every 2/36.4 s, 2 s each);
/// target 10 × 0.7 = 7 per instance: ceil(5.2) = 6 instances. 5.2 sits clear of
/// Tidemark's 10 % hysteresis and the HPA's 10 % tolerance at 6 and at 7, so
/// 6 is the answer whichever side a policy comes from.
fn constant_load() -> (Vec<Request>, u32) {
    let gap = 54_945;
    let load = 2.0 * SECOND as f64 / gap as f64;
    (steady(0, 900 * SECOND, gap, 2 * SECOND), (load / 7.0).ceil() as u32)
}

/// Every sample of the count from `from` s to `to` s (every 5 s) is `expected`.
fn assert_settled(o: &Outcome, expected: u32, from: i64, to: i64) {
    for t in (from..=to).step_by(5) {
        assert_eq!(
            o.replicas_at(t * SECOND),
            expected,
            "{} at {t} s: {:?}",
            o.policy,
            o.timeline
        );
    }
}

#[test]
fn constant_load_settles_at_ceil_of_load_over_target_for_the_baselines() {
    let (requests, expected) = constant_load();
    assert_eq!(expected, 6);
    let outcomes = run_all("targets = { concurrency = 10 }", STARTUP, requests);
    assert_eq!(outcomes.len(), 3);
    for name in ["knative-kpa", "kubernetes-hpa"] {
        let o = by_name(&outcomes, name);
        assert_eq!(o.unserved, 0, "{o:?}");
        // After warm-up (the HPA's 300 s scale-down stabilization included).
        assert_settled(o, expected, 600, 895);
    }
}

#[test]
fn constant_load_settles_at_ceil_of_load_over_target_for_tidemark() {
    let (requests, expected) = constant_load();
    let outcomes = run_all("targets = { concurrency = 10 }", STARTUP, requests);
    let o = by_name(&outcomes, "tidemark");
    assert_eq!(o.unserved, 0, "{o:?}");
    assert_settled(o, expected, 600, 895);
}

#[test]
fn step_up_tidemark_reaches_the_new_count_with_no_more_overload_than_the_kpa() {
    // 11.2 in flight (1.6 × the target of 7: 2 instances), then 49.7 (7.1 × 7: 8
    // instances) from 300 s on; both clear of the 10 % hysteresis band.
    let mut requests = steady(0, 300 * SECOND, 178_571, 2 * SECOND);
    requests.extend(steady(300 * SECOND, 600 * SECOND, 40_241, 2 * SECOND));
    let outcomes = run_all("targets = { concurrency = 10 }", STARTUP, requests);
    let tidemark = by_name(&outcomes, "tidemark");
    let kpa = by_name(&outcomes, "knative-kpa");
    assert_eq!(tidemark.replicas_at(290 * SECOND), 2, "{:?}", tidemark.timeline);
    assert_settled(tidemark, 8, 400, 595);
    assert!(
        tidemark.overload_seconds <= kpa.overload_seconds,
        "tidemark {} s overloaded, kpa {} s",
        tidemark.overload_seconds,
        kpa.overload_seconds
    );
    assert!(
        tidemark.overload_seconds > 0.0,
        "a step with a 5 s start-up overloads everyone a while"
    );
}

#[test]
fn ample_capacity_means_no_queueing() {
    // 3.5 in flight at most 4 at once, capacity 10 per instance: one instance is
    // enough at any time, and every policy keeps at least one.
    let requests = steady(0, 300 * SECOND, SECOND / 7 * 4, 2 * SECOND);
    let outcomes = run_all(
        "targets = { concurrency = 10 }\ninitial_scale = 3",
        Duration::from_secs(5),
        requests,
    );
    for o in &outcomes {
        assert_eq!(o.queue_max_seconds, 0.0, "{o:?}");
        assert_eq!(o.overload_seconds, 0.0, "{o:?}");
        assert_eq!(o.unserved, 0, "{o:?}");
    }
}

/// A scaler that asks for fixed counts at fixed times, and keeps the reports it sees.
#[derive(Debug, Default)]
struct Script {
    at: Vec<(i64, u32)>,
    reports: Vec<Report>,
}

impl Scaler for Script {
    fn name(&self) -> String {
        "script".into()
    }
    fn tick_micros(&self) -> Option<i64> {
        Some(SECOND)
    }
    fn on_report(&mut self, report: &Report, _view: &View<'_>) -> Option<u32> {
        self.reports.push(*report);
        None
    }
    fn on_tick(&mut self, view: &View<'_>) -> Option<u32> {
        self.at.iter().find(|(t, _)| *t == view.now_micros).map(|(_, n)| *n)
    }
}

fn config(capacity: u32, target: f64, startup: i64) -> Config {
    Config {
        capacity,
        target_per_instance: target,
        startup_micros: startup,
        report_interval_micros: SECOND / 4,
        initial_instances: 1,
        stall_limit_micros: 3600 * SECOND,
    }
}

#[test]
fn one_instance_for_exactly_ten_seconds() {
    let requests = vec![Request {
        arrival_micros: 0,
        service_micros: 10 * SECOND,
        tenant: None,
    }];
    let o = engine::run(config(10, 7.0, 0), &requests, &mut Script::default());
    assert_eq!(o.instance_seconds, 10.0);
    assert_eq!(o.overload_seconds, 0.0);
    assert_eq!((o.served, o.unserved, o.scale_events, o.max_instances), (1, 0, 0, 1));
    assert_eq!(o.end_seconds, 10.0);
}

#[test]
fn hand_computed_scale_up_with_startup_and_queueing() {
    // Capacity 1. Request A at 0 s for 10 s; B at 1 s for 5 s. At 2 s the
    // script asks for 2 instances; the second is ready at 5 s (3 s start-up)
    // and serves B from 5 s to 10 s. Instance-seconds: 10 + 8 = 18. Demand per
    // ready instance: 1 (0-1 s), 2 (1-5 s), 1 (5-10 s): above the target of 1
    // for 4 s. Queueing: A 0, B 4 s.
    let requests = vec![
        Request {
            arrival_micros: 0,
            service_micros: 10 * SECOND,
            tenant: None,
        },
        Request {
            arrival_micros: SECOND,
            service_micros: 5 * SECOND,
            tenant: None,
        },
    ];
    let mut script = Script {
        at: vec![(2 * SECOND, 2)],
        ..Script::default()
    };
    let o = engine::run(config(1, 1.0, 3 * SECOND), &requests, &mut script);
    assert_eq!(o.instance_seconds, 18.0);
    assert_eq!(o.overload_seconds, 4.0);
    assert_eq!(
        (o.queue_p50_seconds, o.queue_p99_seconds, o.queue_max_seconds),
        (0.0, 4.0, 4.0)
    );
    assert_eq!((o.served, o.scale_events, o.max_instances), (2, 1, 2));
    assert_eq!(o.timeline, vec![(0, 1), (2 * SECOND, 2)]);
    // The first instance's report over 1-1.25 s: 1 in flight + the queued B = 2;
    // CPU: 1 request on a capacity of 1 is one core.
    let r = script
        .reports
        .iter()
        .find(|r| r.instance == 0 && r.at_micros == SECOND + SECOND / 4)
        .expect("report");
    assert_eq!(r.concurrency, 2.0);
    assert_eq!(r.cpu_micros, 250_000);
    assert_eq!(r.window_micros, 250_000);
    // Once the second instance is ready (5 s), B is served there and nothing queues: 1 each.
    let late: Vec<f64> = script
        .reports
        .iter()
        .filter(|r| r.at_micros > 5 * SECOND + SECOND / 4)
        .map(|r| r.concurrency)
        .collect();
    assert!(!late.is_empty() && late.iter().all(|c| *c == 1.0), "{late:?}");
}

#[test]
fn scale_down_drains_busy_instances_and_stops_idle_ones_first() {
    // Three instances; instance 0 is busy 0-10 s, the others idle. At 2 s the
    // script asks for 1: the two idle ones stop at once (2 s each), instance 0
    // keeps serving: 10 + 2 + 2 = 14 instance-seconds. At 3 s it asks for 0:
    // instance 0 drains and stops when its request ends at 10 s.
    let requests = vec![Request {
        arrival_micros: 0,
        service_micros: 10 * SECOND,
        tenant: None,
    }];
    let mut cfg = config(10, 7.0, 0);
    cfg.initial_instances = 3;
    let mut script = Script {
        at: vec![(2 * SECOND, 1), (3 * SECOND, 0)],
        ..Script::default()
    };
    let o = engine::run(cfg, &requests, &mut script);
    assert_eq!(o.instance_seconds, 14.0);
    assert_eq!(o.served, 1);
    assert_eq!(o.scale_events, 2);
    // The idle ones sent their last partial window when they stopped at 2 s;
    // instance 0 reports as draining from 3 s on, and last at 10 s.
    let last = |id: u32| {
        script
            .reports
            .iter()
            .rfind(|r| r.instance == id)
            .copied()
            .expect("reported")
    };
    for id in [1, 2] {
        let r = last(id);
        assert_eq!(
            (r.at_micros, r.draining, r.concurrency),
            (2 * SECOND, true, 0.0),
            "{r:?}"
        );
    }
    let r = last(0);
    assert_eq!(
        (r.at_micros, r.draining, r.concurrency),
        (10 * SECOND, true, 1.0),
        "{r:?}"
    );
    assert!(
        script
            .reports
            .iter()
            .filter(|r| r.instance == 0 && r.at_micros < 3 * SECOND)
            .all(|r| !r.draining)
    );
}

#[test]
fn runs_are_deterministic() {
    let requests = steady(0, 120 * SECOND, SECOND / 20, 3 * SECOND);
    let a = run_all(
        "targets = { concurrency = 10 }",
        Duration::from_secs(5),
        requests.clone(),
    );
    let b = run_all("targets = { concurrency = 10 }", Duration::from_secs(5), requests);
    assert_eq!(a, b);
}

#[test]
fn a_policy_without_a_concurrency_target_is_refused() {
    let (_, policy) = resolve_policy("p.toml", "[defaults]\ntargets = { rps = 10 }\n", None).expect("policy");
    let overrides = Overrides {
        startup: None,
        capacity: None,
        report_interval: Duration::from_millis(250),
    };
    let err = Scenario::new(&policy, overrides).expect_err("no concurrency target");
    assert!(err.to_string().contains("targets.concurrency"), "{err}");
}

#[test]
fn simulate_reads_files_and_names_a_missing_trace() {
    let dir = std::env::temp_dir().join(format!("tidemark-simulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[services.api]\ntargets = { concurrency = 4 }\n").expect("write policy");
    let trace_path = dir.join("trace.csv");
    let mut text = String::from("arrival_seconds,service_seconds\n");
    for i in 0..200 {
        text.push_str(&format!("{},0.5\n", f64::from(i) * 0.1));
    }
    std::fs::write(&trace_path, text).expect("write trace");
    let mut args = SimulateArgs {
        config: None,
        trace: trace_path.clone(),
        policy,
        service: None,
        compress: 2.0,
        report_interval: Duration::from_millis(250),
        startup: Some(Duration::from_secs(1)),
        instance_capacity: None,
        baselines: vec![Baseline::Kpa, Baseline::Hpa],
        seconds_per_token: 0.02,
        base_service_time: Duration::ZERO,
        json: false,
    };
    let results = simulate(&args).expect("runs");
    let names: Vec<&str> = results.results.iter().map(|o| o.policy.as_str()).collect();
    assert_eq!(names, ["tidemark", "knative-kpa", "kubernetes-hpa"]);
    assert_eq!(results.setting.requests, 200);
    assert_eq!(results.setting.span_seconds, 9.95, "compressed 2x: 19.9 s / 2");
    assert_eq!(
        (results.setting.capacity_per_instance, results.setting.service.as_str()),
        (4, "api")
    );
    assert!(results.results.iter().all(|o| o.served == 200));
    args.baselines = vec![Baseline::None];
    assert_eq!(simulate(&args).expect("runs").results.len(), 1);
    args.trace = dir.join("missing.csv");
    let err = simulate(&args).expect_err("missing trace").to_string();
    assert!(
        err.contains("not found") && err.contains(&dir.join("missing.csv").display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
