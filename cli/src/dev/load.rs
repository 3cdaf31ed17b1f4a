//! Built-in load for `tidemark dev` (`--load`): the load generator
//! (`tidemark loadgen`) pointed at the entry port, in phases, until Ctrl-C.
//!
//! - `steady=RPS`: RPS requests per second, constantly;
//! - `step=LOW,HIGH@EVERY`: LOW and HIGH requests per second in turn, each
//!   for EVERY (e.g. `step=20,400@30s`), to watch the service scale up and
//!   back down.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use tidemark_runtime::shutdown::Shutdown;

use crate::loadgen::{LoadgenArgs, measure};

/// How long one phase of steady load lasts before it reports and goes on.
const STEADY_PHASE: Duration = Duration::from_secs(30);
/// Connections the load keeps open to the entry port.
const CONNECTIONS: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadProfile {
    Steady { rate: u64 },
    Step { low: u64, high: u64, every: Duration },
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
            _ => Err(format!("{text:?}: expected steady=RPS or step=LOW,HIGH@EVERY")),
        }
    }
}

impl LoadProfile {
    /// The `n`-th phase: its rate and length.
    fn phase(self, n: u64) -> (u64, Duration) {
        match self {
            LoadProfile::Steady { rate } => (rate, STEADY_PHASE),
            LoadProfile::Step { low, high, every } => (if n.is_multiple_of(2) { low } else { high }, every),
        }
    }
}

/// Sends `profile` to `entry` as `tenant` until `shutdown` fires, logging
/// each phase's summary.
pub async fn run(profile: LoadProfile, entry: SocketAddr, tenant: String, mut shutdown: Shutdown) {
    let Ok(tenant_value) = HeaderValue::from_str(&tenant) else {
        tracing::error!(%tenant, "the load's tenant is not a valid header value");
        return;
    };
    let Ok(target) = http::Uri::try_from(format!("http://{entry}/")) else {
        return;
    };
    for n in 0.. {
        let (rate, duration) = profile.phase(n);
        let args = LoadgenArgs {
            config: None,
            target: target.clone(),
            rate,
            duration,
            warmup: Duration::ZERO,
            connections: CONNECTIONS,
            headers: vec![(HeaderName::from_static("x-tenant-id"), tenant_value.clone())],
            json: false,
        };
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
        assert_eq!(step.phase(0), (20, Duration::from_secs(30)));
        assert_eq!(step.phase(1), (400, Duration::from_secs(30)));
        assert_eq!(step.phase(2).0, 20);
        for (bad, says) in [
            ("steady=0", "not a rate"),
            ("steady=fast", "not a rate"),
            ("step=20,400", "step needs LOW,HIGH@EVERY"),
            ("step=20@30s", "step needs LOW,HIGH@EVERY"),
            ("step=20,400@0s", "longer than 0"),
            ("step=20,400@soon", "\"soon\""),
            ("trace=x.csv", "expected steady=RPS or step=LOW,HIGH@EVERY"),
        ] {
            let err = bad.parse::<LoadProfile>().expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
