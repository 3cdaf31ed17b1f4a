//! Built-in load for `tidemark dev` (`--load`): the load generator
//! (`tidemark loadgen`) pointed at the entry port from the moment the first
//! instance is ready, in phases until Ctrl-C, or a trace replayed once:
//!
//! - `steady=RPS`: RPS requests per second, constantly;
//! - `step=LOW,HIGH@EVERY`: LOW and HIGH requests per second in turn, each
//!   for EVERY (e.g. `step=20,400@30s`), to watch the service scale up and
//!   back down;
//! - `trace=FILE` or `trace=FILE@SPEEDx`: the requests of a trace (the
//!   formats `tidemark simulate` and `tidemark loadgen --trace` read), each
//!   at its arrival time, SPEED times faster (e.g. `trace=conv.csv@20x`),
//!   with each row's tenant if the trace has a tenant column; once, then no
//!   more load, so the service is seen to scale back down. The trace is read
//!   before dev starts anything: a bad file stops it with the file, the line
//!   and the reason.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tidemark_runtime::shutdown::Shutdown;
use tokio::sync::watch;

use crate::loadgen::replay::{Replay, parse_speed};
use crate::loadgen::{LoadgenArgs, Plan, measure, measure_plan};

/// How long one phase of steady load lasts before it reports and goes on.
const STEADY_PHASE: Duration = Duration::from_secs(30);
/// Connections the load keeps open to the entry port.
const CONNECTIONS: u32 = 64;

/// Header the load names its tenant in (the sidecars' default).
const TENANT_HEADER: &str = "x-tenant-id";

#[derive(Debug, Clone, PartialEq)]
pub enum LoadProfile {
    Steady { rate: u64 },
    Step { low: u64, high: u64, every: Duration },
    Trace { path: PathBuf, speed: f64 },
}

impl FromStr for LoadProfile {
    type Err = String;

    fn from_str(text: &str) -> Result<LoadProfile, String> {
        let rate = |s: &str| {
            s.trim()
                .parse::<u64>()
                .ok()
                .filter(|r| *r > 0)
                .ok_or_else(|| format!("{s:?} is not a rate (requests per second, > 0)"))
        };
        match text.split_once('=') {
            Some(("steady", r)) => Ok(LoadProfile::Steady { rate: rate(r)? }),
            Some(("step", spec)) => {
                let (rates, every) = spec
                    .split_once('@')
                    .ok_or("step needs LOW,HIGH@EVERY, e.g. step=20,400@30s")?;
                let (low, high) = rates
                    .split_once(',')
                    .ok_or("step needs LOW,HIGH@EVERY, e.g. step=20,400@30s")?;
                let every = humantime::parse_duration(every.trim()).map_err(|e| format!("{every:?}: {e}"))?;
                if every.is_zero() {
                    return Err("the step's period must be longer than 0".into());
                }
                Ok(LoadProfile::Step {
                    low: rate(low)?,
                    high: rate(high)?,
                    every,
                })
            }
            Some(("trace", spec)) => {
                // A last `@` followed by a number is the speed; any other `@`
                // belongs to the file name.
                let (path, speed) = match spec.rsplit_once('@') {
                    Some((path, speed)) if looks_like_speed(speed) => (path, parse_speed(speed)?),
                    _ => (spec, 1.0),
                };
                if path.is_empty() {
                    return Err("trace needs a file: trace=FILE or trace=FILE@SPEEDx, e.g. trace=conv.csv@20x".into());
                }
                Ok(LoadProfile::Trace {
                    path: PathBuf::from(path),
                    speed,
                })
            }
            _ => Err(format!(
                "{text:?}: expected steady=RPS, step=LOW,HIGH@EVERY or trace=FILE[@SPEEDx]"
            )),
        }
    }
}

fn looks_like_speed(text: &str) -> bool {
    let number = text.strip_suffix('x').unwrap_or(text);
    !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.')
}

impl LoadProfile {
    /// Reads what the profile needs before the load can start: a trace's file.
    pub fn prepare(&self) -> anyhow::Result<Load> {
        Ok(match self {
            LoadProfile::Steady { rate } => Load::Phases(Phases::Steady { rate: *rate }),
            LoadProfile::Step { low, high, every } => Load::Phases(Phases::Step {
                low: *low,
                high: *high,
                every: *every,
            }),
            LoadProfile::Trace { path, speed } => Load::Replay(Arc::new(Replay::read(path, *speed)?)),
        })
    }
}

/// A load ready to run.
#[derive(Debug, Clone)]
pub enum Load {
    /// Constant-rate phases, until Ctrl-C.
    Phases(Phases),
    /// A trace, replayed once.
    Replay(Arc<Replay>),
}

/// Rates in phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phases {
    Steady { rate: u64 },
    Step { low: u64, high: u64, every: Duration },
}

impl Phases {
    /// The `n`-th phase: its rate and length.
    fn phase(self, n: u64) -> (u64, Duration) {
        match self {
            Phases::Steady { rate } => (rate, STEADY_PHASE),
            Phases::Step { low, high, every } => (if n.is_multiple_of(2) { low } else { high }, every),
        }
    }
}

/// Once the first instance is `ready`, sends `load` to `entry` (as
/// `tenant`, unless a trace row names another) until it ends or `shutdown`
/// fires, logging each phase's summary.
pub async fn run(
    load: Load,
    entry: SocketAddr,
    mut ready: watch::Receiver<Vec<SocketAddr>>,
    tenant: String,
    mut shutdown: Shutdown,
) {
    let Ok(tenant_value) = HeaderValue::from_str(&tenant) else {
        tracing::error!(%tenant, "the load's tenant is not a valid header value");
        return;
    };
    let Ok(target) = http::Uri::try_from(format!("http://{entry}/")) else {
        return;
    };
    // A trace's first requests are due at once: they would otherwise wait
    // in the entry port for the first instance, and their times with them.
    tokio::select! {
        _ = ready.wait_for(|instances| !instances.is_empty()) => {}
        () = shutdown.wait() => return,
    }
    let header = HeaderName::from_static(TENANT_HEADER);
    let args = LoadgenArgs {
        config: None,
        target,
        rate: None,
        trace: None,
        trace_speed: None,
        tenant_header: header.clone(),
        duration: None,
        warmup: Some(Duration::ZERO),
        connections: CONNECTIONS,
        headers: vec![(header, tenant_value)],
        json: false,
    };
    match load {
        Load::Phases(phases) => run_phases(phases, args, shutdown).await,
        Load::Replay(replay) => {
            let plan = Plan::Replay(replay);
            loop {
                tokio::select! {
                    summary = measure_plan(&args, &plan) => match summary {
                        Ok(summary) => {
                            tracing::info!("load: the trace is replayed, no more load follows:\n{summary}");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "load: the trace replay could not start; trying again");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    },
                    () = shutdown.wait() => return,
                }
            }
        }
    }
}

async fn run_phases(phases: Phases, mut args: LoadgenArgs, mut shutdown: Shutdown) {
    for n in 0.. {
        let (rate, duration) = phases.phase(n);
        args.rate = Some(rate);
        args.duration = Some(duration);
        tokio::select! {
            summary = measure(&args) => match summary {
                Ok(summary) => tracing::info!(rate, ?duration, "load phase done:\n{summary}"),
                Err(e) => {
                    tracing::warn!(error = %e, "load phase failed; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            () = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_bad_ones_say_why() {
        assert_eq!("steady=400".parse(), Ok(LoadProfile::Steady { rate: 400 }));
        let step: LoadProfile = "step=20,400@30s".parse().expect("valid");
        assert_eq!(
            step,
            LoadProfile::Step {
                low: 20,
                high: 400,
                every: Duration::from_secs(30)
            }
        );
        let Ok(Load::Phases(phases)) = step.prepare() else {
            panic!("a step is phases");
        };
        assert_eq!(phases.phase(0), (20, Duration::from_secs(30)));
        assert_eq!(phases.phase(1), (400, Duration::from_secs(30)));
        assert_eq!(phases.phase(2).0, 20);
        for (bad, says) in [
            ("steady=0", "not a rate"),
            ("steady=fast", "not a rate"),
            ("step=20,400", "step needs LOW,HIGH@EVERY"),
            ("step=20@30s", "step needs LOW,HIGH@EVERY"),
            ("step=20,400@0s", "longer than 0"),
            ("step=20,400@soon", "\"soon\""),
            (
                "burst=5",
                "expected steady=RPS, step=LOW,HIGH@EVERY or trace=FILE[@SPEEDx]",
            ),
            ("trace=", "trace needs a file"),
            ("trace=@20x", "trace needs a file"),
            ("trace=x.csv@0x", "speed `0x` is not a number above 0"),
            ("trace=x.csv@1.2.3", "speed `1.2.3` is not a number above 0"),
        ] {
            let err = bad.parse::<LoadProfile>().expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_trace_profile_names_its_file_and_speed() {
        let trace = |path: &str, speed: f64| LoadProfile::Trace {
            path: PathBuf::from(path),
            speed,
        };
        assert_eq!("trace=conv.csv".parse(), Ok(trace("conv.csv", 1.0)));
        assert_eq!("trace=conv.csv@20x".parse(), Ok(trace("conv.csv", 20.0)));
        assert_eq!("trace=/data/conv.csv@0.5".parse(), Ok(trace("/data/conv.csv", 0.5)));
        // An `@` that is not followed by a speed is part of the file name.
        assert_eq!("trace=me@host/t.csv".parse(), Ok(trace("me@host/t.csv", 1.0)));
        assert_eq!("trace=a@b.csv@2x".parse(), Ok(trace("a@b.csv", 2.0)));
    }

    #[test]
    fn a_trace_is_read_before_the_load_starts_and_a_bad_one_says_where() {
        let path = std::env::temp_dir().join(format!("tidemark-dev-load-{}.csv", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, "arrival_seconds,service_seconds,tenant\n0,1,acme\n2,1,beta\n").expect("write");
        let profile = LoadProfile::Trace {
            path: path.clone(),
            speed: 4.0,
        };
        let prepared = profile.prepare();
        std::fs::write(&path, "arrival_seconds,service_seconds,tenant\n0,1,acme\n1,1\n").expect("write");
        let bad = profile.prepare();
        let _ = std::fs::remove_file(&path);
        let Ok(Load::Replay(replay)) = prepared else {
            panic!("a trace is a replay: {prepared:?}");
        };
        assert_eq!(replay.len(), 2);
        assert_eq!(replay.span(), Duration::from_millis(500));
        assert_eq!(replay.tenant_names(), ["acme".to_owned(), "beta".to_owned()]);
        let err = format!("{:#}", bad.expect_err("a row without its tenant column"));
        assert!(
            err.contains(&format!("trace {}: line 3: expected 3 columns", path.display())),
            "{err}"
        );
    }
}
