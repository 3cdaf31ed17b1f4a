//! Per-tenant meters: updated on the request path, drained once per window.
//!
//! The request path finds its tenant's [`TenantMeter`] under a read lock
//! (the write lock is taken only the first time a tenant appears in a window)
//! and then does a handful of atomic adds plus one short per-tenant lock for
//! the in-flight integral. Nothing on the path allocates once the tenant is
//! known.
//!
//! Time-weighted concurrency follows Knative: the area under the in-flight
//! curve divided by the window (two 500 ms requests in a 1 s window = 1.0).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

use tidemark_core::ids::{ANONYMOUS_TENANT, validate_name};
use tidemark_core::{LoadSample, TenantUsage};

use crate::attribution;
use crate::custom_usage::Decimal;
use crate::resources::Usage;

/// The tenant that requests fold into once a window has the most distinct
/// tenants allowed.
pub const OVERFLOW_TENANT: &str = "_overflow";
/// The service owner's share of resources no request was in flight for.
pub const IDLE_TENANT: &str = "_idle";
/// Most distinct custom meters per tenant per window.
pub const MAX_CUSTOM_METERS: usize = 32;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Monotonic microseconds since the sidecar started.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

#[derive(Debug, Default)]
struct Flight {
    in_flight: u32,
    since: u64,
    /// Request-microseconds in flight since the window opened.
    area: u64,
}

impl Flight {
    fn advance(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.since);
        self.area = self
            .area
            .saturating_add(elapsed.saturating_mul(u64::from(self.in_flight)));
        self.since = self.since.max(now);
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// The status sent to the client.
    pub status: u16,
    /// The upstream failed (no answer, or a 5xx).
    pub error: bool,
    pub duration_micros: u64,
    pub billed_duration_micros: u64,
}

/// One tenant's counters for the current window.
#[derive(Debug)]
pub struct TenantMeter {
    name: Box<str>,
    requests: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
    duration_micros: AtomicU64,
    billed_duration_micros: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    status_classes: [AtomicU64; 5],
    custom_rejects: AtomicU64,
    custom: Mutex<Vec<(Box<str>, u64)>>,
    flight: Mutex<Flight>,
}

impl TenantMeter {
    fn new(name: &str, now: u64) -> TenantMeter {
        TenantMeter {
            name: name.into(),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            duration_micros: AtomicU64::new(0),
            billed_duration_micros: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            status_classes: Default::default(),
            custom_rejects: AtomicU64::new(0),
            custom: Mutex::new(Vec::new()),
            flight: Mutex::new(Flight {
                since: now,
                ..Flight::default()
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn begin(&self, now: u64) {
        let mut flight = lock(&self.flight);
        flight.advance(now);
        flight.in_flight += 1;
    }

    /// A request this meter [began](Tenants::begin) is over.
    pub fn finish(&self, now: u64, done: Finished) {
        self.requests.fetch_add(1, Relaxed);
        if done.error {
            self.errors.fetch_add(1, Relaxed);
        }
        let class = usize::from(done.status / 100).clamp(1, 5) - 1;
        self.status_classes[class].fetch_add(1, Relaxed);
        self.duration_micros.fetch_add(done.duration_micros, Relaxed);
        self.billed_duration_micros
            .fetch_add(done.billed_duration_micros, Relaxed);
        // Last: once in_flight drops, the drain may retire this meter.
        let mut flight = lock(&self.flight);
        flight.advance(now);
        flight.in_flight = flight.in_flight.saturating_sub(1);
    }

    /// A request this meter began was turned away (not forwarded).
    pub fn reject(&self, now: u64) {
        self.rejected.fetch_add(1, Relaxed);
        let mut flight = lock(&self.flight);
        flight.advance(now);
        flight.in_flight = flight.in_flight.saturating_sub(1);
    }

    pub fn add_bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    pub fn add_bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }

    /// Adds `nanos` of custom meter `name`; false (and counted as a reject)
    /// if the tenant already has the most custom meters allowed.
    pub fn add_custom(&self, name: &str, nanos: u64) -> bool {
        let mut custom = lock(&self.custom);
        if let Some((_, total)) = custom.iter_mut().find(|(n, _)| &**n == name) {
            *total = total.saturating_add(nanos);
            return true;
        }
        if custom.len() >= MAX_CUSTOM_METERS {
            drop(custom);
            self.reject_custom();
            return false;
        }
        custom.push((name.into(), nanos));
        true
    }

    pub fn reject_custom(&self) {
        self.custom_rejects.fetch_add(1, Relaxed);
    }

    /// Takes this window's counts. Returns them and whether requests are
    /// still in flight.
    fn take(&self, now: u64) -> (TenantUsage, u64, bool) {
        let [c1, c2, c3, c4, c5] = &self.status_classes;
        let mut usage = TenantUsage {
            tenant: self.name.to_string(),
            requests: self.requests.swap(0, Relaxed),
            errors: self.errors.swap(0, Relaxed),
            duration_micros: self.duration_micros.swap(0, Relaxed),
            billed_duration_micros: self.billed_duration_micros.swap(0, Relaxed),
            bytes_in: self.bytes_in.swap(0, Relaxed),
            bytes_out: self.bytes_out.swap(0, Relaxed),
            responses_1xx: c1.swap(0, Relaxed),
            responses_2xx: c2.swap(0, Relaxed),
            responses_3xx: c3.swap(0, Relaxed),
            responses_4xx: c4.swap(0, Relaxed),
            responses_5xx: c5.swap(0, Relaxed),
            rejected: self.rejected.swap(0, Relaxed),
            custom_rejects: self.custom_rejects.swap(0, Relaxed),
            ..TenantUsage::default()
        };
        usage.custom = std::mem::take(&mut *lock(&self.custom))
            .into_iter()
            .map(|(name, nanos)| (name.into_string(), Decimal(nanos).to_string()))
            .collect();
        let mut flight = lock(&self.flight);
        flight.advance(now);
        let area = std::mem::take(&mut flight.area);
        usage.in_flight_micros = area;
        (usage, area, flight.in_flight > 0)
    }
}

fn is_active(u: &TenantUsage) -> bool {
    u.requests > 0
        || u.rejected > 0
        || u.in_flight_micros > 0
        || u.bytes_in > 0
        || u.bytes_out > 0
        || !u.custom.is_empty()
        || u.custom_rejects > 0
}

/// One window's usage, drained from [`Tenants`].
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub window_micros: u64,
    pub load: LoadSample,
    pub tenants: Vec<TenantUsage>,
    pub tenants_overflowed: u64,
}

/// Every tenant's meter for the current window.
#[derive(Debug)]
pub struct Tenants {
    clock: Clock,
    map: RwLock<HashMap<Box<str>, Arc<TenantMeter>>>,
    anonymous: Arc<TenantMeter>,
    overflow: Arc<TenantMeter>,
    max_tenants: usize,
    overflowed: AtomicU64,
    window_start: Mutex<u64>,
}

impl Tenants {
    /// At most `max_tenants` distinct named tenants per window (besides
    /// `anonymous`); requests of further tenants go to `_overflow`.
    pub fn new(clock: Clock, max_tenants: usize) -> Tenants {
        let now = clock.now();
        Tenants {
            clock,
            map: RwLock::new(HashMap::new()),
            anonymous: Arc::new(TenantMeter::new(ANONYMOUS_TENANT, now)),
            overflow: Arc::new(TenantMeter::new(OVERFLOW_TENANT, now)),
            max_tenants,
            overflowed: AtomicU64::new(0),
            window_start: Mutex::new(now),
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Starts a request of `tenant` (`None`: anonymous) and returns its
    /// meter. The caller must [finish](TenantMeter::finish) or
    /// [reject](TenantMeter::reject) it. `tenant` must be a valid name.
    pub fn begin(&self, tenant: Option<&str>, now: u64) -> Arc<TenantMeter> {
        let Some(name) = tenant else {
            self.anonymous.begin(now);
            return Arc::clone(&self.anonymous);
        };
        {
            // Begin under the lock, so a drain cannot retire the meter first.
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(meter) = map.get(name) {
                meter.begin(now);
                return Arc::clone(meter);
            }
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(meter) = map.get(name) {
            meter.begin(now);
            return Arc::clone(meter);
        }
        if map.len() >= self.max_tenants || validate_name(name).is_err() {
            drop(map);
            self.overflowed.fetch_add(1, Relaxed);
            self.overflow.begin(now);
            return Arc::clone(&self.overflow);
        }
        let meter = Arc::new(TenantMeter::new(name, now));
        meter.begin(now);
        map.insert(name.into(), Arc::clone(&meter));
        meter
    }

    /// Closes the window at `now` (from [`Tenants::clock`]): returns its
    /// usage (resources, if sampled, split among tenants and idle) and opens
    /// the next one. Tenants with no activity are left out and forgotten.
    pub fn drain(&self, now: u64, resources: Option<Usage>) -> Window {
        let window_micros = {
            let mut start = lock(&self.window_start);
            let micros = now.saturating_sub(*start);
            *start = now;
            micros
        };
        let mut usages = Vec::new();
        let mut in_flight = 0u32;
        {
            let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
            map.retain(|_, meter| {
                let (usage, _, busy) = meter.take(now);
                in_flight += u32::from(busy);
                let keep = busy || is_active(&usage);
                if is_active(&usage) {
                    usages.push(usage);
                }
                keep
            });
        }
        for meter in [&self.anonymous, &self.overflow] {
            let (usage, _, busy) = meter.take(now);
            in_flight += u32::from(busy);
            if is_active(&usage) {
                usages.push(usage);
            }
        }
        usages.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let area: u64 = usages.iter().map(|u| u.in_flight_micros).sum();
        if let Some(measured) = resources {
            attribute(&mut usages, measured, window_micros);
        }
        Window {
            window_micros,
            load: LoadSample {
                concurrency: if window_micros == 0 {
                    0.0
                } else {
                    area as f64 / window_micros as f64
                },
                requests: usages.iter().map(|u| u.requests).sum(),
                in_flight,
            },
            tenants: usages,
            tenants_overflowed: self.overflowed.swap(0, Relaxed),
        }
    }
}

/// Splits measured CPU and memory among tenants by in-flight time; the rest
/// is the `_idle` tenant's.
fn attribute(usages: &mut Vec<TenantUsage>, measured: Usage, window_micros: u64) {
    let weights: Vec<u64> = usages.iter().map(|u| u.in_flight_micros).collect();
    let (cpu, idle_cpu) = attribution::split(measured.cpu_micros, &weights, window_micros);
    let (memory, idle_memory) = attribution::split(measured.memory_byte_micros, &weights, window_micros);
    for ((usage, cpu), memory) in usages.iter_mut().zip(cpu).zip(memory) {
        usage.cpu_micros = cpu;
        usage.memory_byte_micros = memory;
    }
    if idle_cpu > 0 || idle_memory > 0 {
        usages.push(TenantUsage {
            tenant: IDLE_TENANT.into(),
            cpu_micros: idle_cpu,
            memory_byte_micros: idle_memory,
            ..TenantUsage::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(duration_micros: u64) -> Finished {
        Finished {
            status: 200,
            error: false,
            duration_micros,
            billed_duration_micros: duration_micros,
        }
    }

    #[test]
    fn two_half_second_requests_in_one_second_are_concurrency_one() {
        let t = Tenants::new(Clock::new(), 10);
        let start = *lock(&t.window_start);
        let a = t.begin(Some("a"), start);
        let b = t.begin(Some("b"), start);
        a.finish(start + 500_000, ok(500_000));
        b.finish(start + 500_000, ok(500_000));
        let in_flight: u64 = [&a, &b].iter().map(|m| m.take(start + 1_000_000).1).sum();
        assert_eq!(in_flight, 1_000_000, "1 s of in-flight time in a 1 s window");
    }

    #[test]
    fn a_request_spanning_windows_counts_in_both() {
        let t = Tenants::new(Clock::new(), 10);
        let s = *lock(&t.window_start);
        let m = t.begin(Some("a"), s + 750_000);
        let (first, area, busy) = m.take(s + 1_000_000);
        assert_eq!((first.requests, area, busy), (0, 250_000, true));
        m.finish(s + 1_500_000, ok(750_000));
        let (second, area, busy) = m.take(s + 2_000_000);
        assert_eq!((second.requests, area, busy), (1, 500_000, false));
    }

    #[test]
    fn drains_per_tenant_usage_and_forgets_idle_tenants() {
        let t = Tenants::new(Clock::new(), 10);
        let now = t.clock.now();
        for (tenant, status) in [
            (Some("acme"), 200),
            (Some("acme"), 503),
            (Some("globex"), 404),
            (None, 200),
        ] {
            let m = t.begin(tenant, now);
            m.add_bytes_in(10);
            m.add_bytes_out(100);
            m.finish(
                now,
                Finished {
                    status,
                    error: status >= 500,
                    duration_micros: 1_234,
                    billed_duration_micros: 2_000,
                },
            );
        }
        let w = t.drain(t.clock.now(), None);
        let got: Vec<_> = w
            .tenants
            .iter()
            .map(|u| {
                (
                    u.tenant.as_str(),
                    u.requests,
                    u.errors,
                    u.responses_2xx,
                    u.responses_4xx,
                    u.responses_5xx,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("acme", 2, 1, 1, 0, 1),
                ("anonymous", 1, 0, 1, 0, 0),
                ("globex", 1, 0, 0, 1, 0)
            ]
        );
        let acme = &w.tenants[0];
        assert_eq!(
            (
                acme.bytes_in,
                acme.bytes_out,
                acme.duration_micros,
                acme.billed_duration_micros
            ),
            (20, 200, 2_468, 4_000)
        );
        assert_eq!(w.load.requests, 4);
        assert!(
            t.drain(t.clock.now(), None).tenants.is_empty(),
            "the next window starts empty"
        );
        assert!(t.map.read().unwrap().is_empty(), "idle tenants are forgotten");
    }

    #[test]
    fn tenants_beyond_the_bound_fold_into_overflow_and_are_counted() {
        let t = Tenants::new(Clock::new(), 2);
        let now = t.clock.now();
        for name in ["a", "b", "c", "d", "a"] {
            t.begin(Some(name), now).finish(now, ok(1));
        }
        let w = t.drain(t.clock.now(), None);
        let names: Vec<_> = w.tenants.iter().map(|u| (u.tenant.as_str(), u.requests)).collect();
        assert_eq!(names, [(OVERFLOW_TENANT, 2), ("a", 2), ("b", 1)]);
        assert_eq!(w.tenants_overflowed, 2);
    }

    #[test]
    fn a_tenant_with_a_request_in_flight_is_kept_across_windows() {
        let t = Tenants::new(Clock::new(), 1);
        let now = t.clock.now();
        let long = t.begin(Some("a"), now);
        t.drain(t.clock.now(), None);
        // "a" still holds the only slot, so "b" overflows.
        t.begin(Some("b"), now).finish(now, ok(1));
        long.finish(t.clock.now(), ok(1));
        let w = t.drain(t.clock.now(), None);
        let names: Vec<_> = w.tenants.iter().map(|u| u.tenant.as_str()).collect();
        assert_eq!(names, [OVERFLOW_TENANT, "a"]);
    }

    #[test]
    fn resources_split_among_tenants_and_idle_sum_to_what_was_measured() {
        let t = Tenants::new(Clock::new(), 10);
        let s = t.clock.now();
        let a = t.begin(Some("a"), s);
        a.finish(s + 200, ok(200));
        let measured = Usage {
            cpu_micros: 1_000_003,
            memory_bytes: 1 << 30,
            memory_byte_micros: 987_654_321,
        };
        let w = t.drain(s + 1_000, Some(measured));
        let cpu: u64 = w.tenants.iter().map(|u| u.cpu_micros).sum();
        let memory: u64 = w.tenants.iter().map(|u| u.memory_byte_micros).sum();
        assert_eq!((cpu, memory), (measured.cpu_micros, measured.memory_byte_micros));
        assert_eq!(w.tenants.last().map(|u| u.tenant.as_str()), Some(IDLE_TENANT));
    }

    #[test]
    fn custom_meters_add_up_exactly_and_are_bounded() {
        let t = Tenants::new(Clock::new(), 10);
        let now = t.clock.now();
        let m = t.begin(Some("a"), now);
        assert!(m.add_custom("tokens", 500_000_000_000));
        assert!(m.add_custom("tokens", 32_000_000_000));
        for i in 1..MAX_CUSTOM_METERS {
            assert!(m.add_custom(&format!("m{i}"), 1));
        }
        assert!(!m.add_custom("one-too-many", 1));
        m.finish(now, ok(1));
        let w = t.drain(t.clock.now(), None);
        assert_eq!(w.tenants[0].custom.get("tokens").map(String::as_str), Some("532"));
        assert_eq!(w.tenants[0].custom.len(), MAX_CUSTOM_METERS);
        assert_eq!(w.tenants[0].custom_rejects, 1);
    }
}
