//! Per-tenant usage counters, updated on the request path and drained once
//! per report window.
//!
//! The request path takes a read lock to find the tenant's counters (a write
//! lock only the first time a tenant is seen) and does a few atomic adds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use tidemark_core::{LoadSample, TenantUsage};

#[derive(Debug, Default)]
struct TenantCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    duration_micros: AtomicU64,
}

/// Time-weighted in-flight requests: the area under the in-flight curve.
#[derive(Debug)]
struct Concurrency {
    in_flight: u32,
    since: Instant,
    /// Request-microseconds accumulated since the window opened.
    area: u128,
    window_start: Instant,
}

impl Concurrency {
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.since).as_micros();
        self.area += elapsed * u128::from(self.in_flight);
        self.since = now;
    }
}

/// All tenants' counters for the current window.
#[derive(Debug)]
pub struct Meters {
    tenants: RwLock<HashMap<String, Arc<TenantCounters>>>,
    concurrency: Mutex<Concurrency>,
    requests: AtomicU64,
}

/// What one request did.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub error: bool,
    pub duration_micros: u64,
}

/// One window's usage, drained from [`Meters`].
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub load: LoadSample,
    pub tenants: Vec<TenantUsage>,
}

impl Meters {
    pub fn new(now: Instant) -> Meters {
        Meters {
            tenants: RwLock::new(HashMap::new()),
            concurrency: Mutex::new(Concurrency {
                in_flight: 0,
                since: now,
                area: 0,
                window_start: now,
            }),
            requests: AtomicU64::new(0),
        }
    }

    /// A request started.
    pub fn begin(&self, now: Instant) {
        let mut c = self
            .concurrency
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.advance(now);
        c.in_flight += 1;
    }

    /// A request that [`Meters::begin`] counted finished.
    pub fn end(&self, now: Instant, tenant: &str, outcome: Outcome) {
        {
            let mut c = self
                .concurrency
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.advance(now);
            c.in_flight = c.in_flight.saturating_sub(1);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let counters = self.counters(tenant);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        if outcome.error {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        counters
            .duration_micros
            .fetch_add(outcome.duration_micros, Ordering::Relaxed);
    }

    fn counters(&self, tenant: &str) -> Arc<TenantCounters> {
        if let Some(c) = self
            .tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tenant)
        {
            return Arc::clone(c);
        }
        let mut tenants = self.tenants.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(tenants.entry(tenant.to_owned()).or_default())
    }

    /// Closes the window at `now`: returns its usage and starts the next one.
    /// Tenants without requests in the window are left out.
    pub fn drain(&self, now: Instant) -> Window {
        let (concurrency, in_flight) = {
            let mut c = self
                .concurrency
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            c.advance(now);
            let span = now.saturating_duration_since(c.window_start).as_micros();
            let concurrency = if span == 0 {
                0.0
            } else {
                c.area as f64 / span as f64
            };
            c.area = 0;
            c.window_start = now;
            (concurrency, c.in_flight)
        };
        let mut tenants: Vec<TenantUsage> = self
            .tenants
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(|(tenant, c)| {
                let requests = c.requests.swap(0, Ordering::Relaxed);
                let errors = c.errors.swap(0, Ordering::Relaxed);
                let duration_micros = c.duration_micros.swap(0, Ordering::Relaxed);
                (requests > 0).then(|| TenantUsage {
                    tenant: tenant.clone(),
                    requests,
                    errors: errors.min(requests),
                    duration_micros,
                    billed_duration_micros: duration_micros,
                    ..TenantUsage::default()
                })
            })
            .collect();
        tenants.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        Window {
            load: LoadSample {
                concurrency,
                requests: self.requests.swap(0, Ordering::Relaxed),
                in_flight,
            },
            tenants,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const OK: Outcome = Outcome {
        error: false,
        duration_micros: 500_000,
    };

    #[test]
    fn two_half_second_requests_in_one_second_are_concurrency_one() {
        let t0 = Instant::now();
        let meters = Meters::new(t0);
        meters.begin(t0);
        meters.begin(t0);
        meters.end(t0 + Duration::from_millis(500), "a", OK);
        meters.end(t0 + Duration::from_millis(500), "b", OK);
        let window = meters.drain(t0 + Duration::from_secs(1));
        assert!(
            (window.load.concurrency - 1.0).abs() < 1e-9,
            "{}",
            window.load.concurrency
        );
        assert_eq!(window.load.requests, 2);
        assert_eq!(window.load.in_flight, 0);
    }

    #[test]
    fn a_request_spanning_windows_counts_in_both() {
        let t0 = Instant::now();
        let meters = Meters::new(t0);
        meters.begin(t0 + Duration::from_millis(750));
        let first = meters.drain(t0 + Duration::from_secs(1));
        assert!((first.load.concurrency - 0.25).abs() < 1e-9);
        assert_eq!(first.load.in_flight, 1);
        assert!(first.tenants.is_empty(), "nothing finished yet");
        meters.end(t0 + Duration::from_millis(1500), "a", OK);
        let second = meters.drain(t0 + Duration::from_secs(2));
        assert!((second.load.concurrency - 0.5).abs() < 1e-9);
        assert_eq!(second.tenants.len(), 1);
    }

    #[test]
    fn drains_per_tenant_counts_and_resets() {
        let t0 = Instant::now();
        let meters = Meters::new(t0);
        for (tenant, error) in [("acme", false), ("acme", true), ("globex", false)] {
            meters.begin(t0);
            meters.end(
                t0,
                tenant,
                Outcome {
                    error,
                    duration_micros: 10,
                },
            );
        }
        let window = meters.drain(t0 + Duration::from_secs(1));
        let got: Vec<_> = window
            .tenants
            .iter()
            .map(|u| (u.tenant.as_str(), u.requests, u.errors, u.duration_micros))
            .collect();
        assert_eq!(got, [("acme", 2, 1, 20), ("globex", 1, 0, 10)]);
        assert!(meters.drain(t0 + Duration::from_secs(2)).tenants.is_empty());
    }
}
