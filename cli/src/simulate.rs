//! `tidemark simulate`: replays a request trace against Tidemark's real
//! autoscaler on a simulated clock, with instances that take time to start,
//! and compares it with ports of Knative's KPA and the Kubernetes HPA on the
//! same trace and the same instance model. See `docs/simulate.md`.
//!
//! - [`crate::trace`]: reading traces (a plain CSV, or the Azure LLM inference trace),
//!   shared with `tidemark loadgen --trace`;
//! - [`engine`]: the discrete-event engine and what it measures;
//! - [`tidemark`]: the policy file and Tidemark's `ServiceScaler` in the engine;
//! - [`kpa`], [`hpa`]: the baselines;
//! - [`report`]: the table and the JSON.

pub mod engine;
pub mod hpa;
pub mod kpa;
pub mod report;
pub mod tidemark;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tidemark_collector::autoscaler::policy::Policy;
use tidemark_runtime::config::duration;

use crate::trace::{TokenModel, Trace};
use engine::{Config, Outcome, Scaler};
use report::{Results, Setting};

/// After the last arrival, how long the engine waits for requests still
/// queued before it gives up on them (they count as unserved).
const STALL_LIMIT: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Request trace: CSV `arrival_seconds,service_seconds` (header optional), or the Azure LLM
    /// inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`); told apart by the first line.
    #[arg(long, env = "TIDEMARK_TRACE")]
    pub trace: PathBuf,

    /// Policy file (TOML: `[defaults]` and `[services.<name>]` tables of policy keys).
    #[arg(long, env = "TIDEMARK_POLICY")]
    pub policy: PathBuf,

    /// Which service of the policy file (default: the only one, or `[defaults]` if it has none).
    #[arg(long, env = "TIDEMARK_SERVICE")]
    pub service: Option<String>,

    /// Divide the gaps between arrivals by this (service times stay as they are).
    #[arg(long, env = "TIDEMARK_COMPRESS", default_value_t = 1.0, value_parser = positive)]
    pub compress: f64,

    /// How often each instance reports its load (as a sidecar's --report-interval).
    #[arg(long, env = "TIDEMARK_REPORT_INTERVAL", value_parser = duration, default_value = "250ms")]
    pub report_interval: Duration,

    /// From asking for an instance to its serving (default: the policy's instance_startup).
    #[arg(long, env = "TIDEMARK_STARTUP", value_parser = duration)]
    pub startup: Option<Duration>,

    /// Requests one instance serves at once; more wait in a queue (default: the policy's
    /// concurrency target, rounded up).
    #[arg(long, env = "TIDEMARK_INSTANCE_CAPACITY", value_parser = clap::value_parser!(u32).range(1..))]
    pub instance_capacity: Option<u32>,

    /// Policies to compare Tidemark with (comma-separated; `none` for none).
    #[arg(long, env = "TIDEMARK_BASELINES", value_delimiter = ',', default_value = "kpa,hpa")]
    pub baselines: Vec<Baseline>,

    /// Azure trace: seconds of service per generated token.
    #[arg(long, env = "TIDEMARK_SECONDS_PER_TOKEN", default_value_t = 0.02, value_parser = non_negative)]
    pub seconds_per_token: f64,

    /// Azure trace: service time every request takes on top of its tokens.
    #[arg(long, env = "TIDEMARK_BASE_SERVICE_TIME", value_parser = duration, default_value = "0s")]
    pub base_service_time: Duration,

    /// Print the results as JSON instead of a table.
    #[arg(long, env = "TIDEMARK_JSON")]
    pub json: bool,
}

/// A policy to compare with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// Knative's KPA (Knative Pod Autoscaler).
    Kpa,
    /// The Kubernetes Horizontal Pod Autoscaler.
    Hpa,
    /// No baseline.
    None,
}

fn positive(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{text}` is not a number above 0")),
    }
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{text}` is not a number >= 0")),
    }
}

/// Runs the simulation and prints the results.
pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let results = simulate(&args)?;
    if args.json {
        println!("{}", results.json());
    } else {
        print!("{}", results.table());
    }
    Ok(())
}

/// Reads the trace and the policy and runs Tidemark and the baselines over them.
pub fn simulate(args: &SimulateArgs) -> anyhow::Result<Results> {
    let (service, policy) = tidemark::load_policy(&args.policy, args.service.as_deref())?;
    let tokens = TokenModel {
        seconds_per_token: args.seconds_per_token,
        base_service_seconds: args.base_service_time.as_secs_f64(),
    };
    let mut trace = Trace::read(&args.trace, tokens)?;
    trace.compress(args.compress);
    let overrides = Overrides {
        startup: args.startup,
        capacity: args.instance_capacity,
        report_interval: args.report_interval,
    };
    let scenario = Scenario::new(&policy, overrides)
        .with_context(|| format!("policy file {} (service {service})", args.policy.display()))?;
    let mut scalers: Vec<Box<dyn Scaler>> = vec![Box::new(tidemark::Tidemark::new(policy))];
    scalers.extend(scenario.baselines(&args.baselines));
    let results = scalers.iter_mut().map(|s| scenario.run(&trace, s.as_mut())).collect();
    Ok(Results {
        setting: Setting {
            trace: args.trace.display().to_string(),
            format: trace.format.to_string(),
            requests: trace.requests.len(),
            span_seconds: trace.span_micros() as f64 / 1e6,
            compress: args.compress,
            service,
            capacity_per_instance: scenario.config.capacity,
            target_per_instance: scenario.config.target_per_instance,
            startup_seconds: scenario.config.startup_micros as f64 / 1e6,
            report_interval_seconds: scenario.config.report_interval_micros as f64 / 1e6,
            initial_instances: scenario.config.initial_instances,
            min_instances: scenario.min,
            max_instances: scenario.max,
        },
        results,
    })
}

/// What every policy is run under: the engine's settings and the bounds
/// and target the baselines share with Tidemark's policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    pub config: Config,
    pub min: u32,
    pub max: u32,
    /// Whether the policy may go to zero (the KPA's minimum is then 0 too).
    pub scale_to_zero: bool,
}

/// What the flags override in the scenario a policy implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overrides {
    pub startup: Option<Duration>,
    pub capacity: Option<u32>,
    pub report_interval: Duration,
}

impl Scenario {
    /// The scenario of `policy`, with what the flags override.
    pub fn new(policy: &Policy, args: Overrides) -> anyhow::Result<Scenario> {
        let target = tidemark::concurrency_target(policy).context(
            "the policy has no concurrency target (targets.concurrency), which the simulator's instance model \
             and the baselines are built on",
        )?;
        let startup = args.startup.unwrap_or(policy.instance_startup);
        anyhow::ensure!(
            !args.report_interval.is_zero(),
            "--report-interval must be longer than 0s"
        );
        Ok(Scenario {
            config: Config {
                capacity: args.capacity.unwrap_or(target.ceil().max(1.0) as u32),
                target_per_instance: policy.effective_target(target),
                startup_micros: micros(startup),
                report_interval_micros: micros(args.report_interval),
                initial_instances: policy.initial_scale,
                stall_limit_micros: micros(STALL_LIMIT),
            },
            min: policy.min_replicas,
            max: policy.max_replicas,
            scale_to_zero: policy.scale_to_zero,
        })
    }

    /// The baselines asked for, configured for this scenario.
    pub fn baselines(&self, which: &[Baseline]) -> Vec<Box<dyn Scaler>> {
        let mut out: Vec<Box<dyn Scaler>> = Vec::new();
        let mut seen = Vec::new();
        for b in which {
            if seen.contains(b) {
                continue;
            }
            seen.push(*b);
            let target = self.config.target_per_instance;
            match b {
                Baseline::Kpa => {
                    let min = if self.scale_to_zero { 0 } else { self.min.max(1) };
                    out.push(Box::new(kpa::Kpa::new(kpa::KpaConfig::knative_defaults(
                        target,
                        min,
                        self.max,
                        self.config.initial_instances,
                    ))));
                }
                Baseline::Hpa => out.push(Box::new(hpa::Hpa::new(hpa::HpaConfig::kubernetes_defaults(
                    target, self.min, self.max,
                )))),
                Baseline::None => {}
            }
        }
        out
    }

    /// One policy over the trace.
    pub fn run(&self, trace: &Trace, scaler: &mut dyn Scaler) -> Outcome {
        engine::run(self.config, &trace.requests, scaler)
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
