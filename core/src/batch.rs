//! Checks a [`UsageBatch`] before it enters the usage log.

use std::collections::HashSet;

use thiserror::Error;

use crate::UsageBatch;
use crate::ids::{InvalidName, validate_name};
use crate::window::MICROS_PER_SECOND;

/// Longest window a batch may cover. Sidecars report every second or so; a
/// longer window means a broken clock or a broken sender.
pub const MAX_WINDOW_MICROS: i64 = 3600 * MICROS_PER_SECOND;

/// Most requests an instance may report in flight on average: far beyond
/// any real instance, so only a broken sender reaches it.
pub const MAX_CONCURRENCY: f64 = 1_000_000.0;

/// Most CPU cores an instance may report using over a window.
pub const MAX_CORES: i64 = 4096;

/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// Why a batch was refused. The message is sent back to the sidecar.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum InvalidBatch {
    #[error("service name {0}")]
    Service(InvalidName),
    #[error("instance name {0}")]
    Instance(InvalidName),
    #[error("session_id is empty")]
    EmptySession,
    #[error("session_id is {0} bytes long, more than the {MAX_SESSION_ID_LEN} allowed")]
    SessionTooLong(usize),
    #[error("window is empty or reversed: start {start} >= end {end} (unix micros)")]
    EmptyWindow { start: i64, end: i64 },
    #[error("window starts before the Unix epoch ({0} unix micros)")]
    WindowBeforeEpoch(i64),
    #[error("window lasts {0} µs, more than the {MAX_WINDOW_MICROS} µs allowed")]
    WindowTooLong(i64),
    #[error("load.concurrency is {0}, not a finite number between 0 and {MAX_CONCURRENCY}")]
    BadConcurrency(f64),
    #[error("resources.cpu_micros is {cpu_micros} over a {window_micros} µs window: more than {MAX_CORES} cores")]
    AbsurdCpu { cpu_micros: u64, window_micros: i64 },
    #[error("tenant #{index} name {reason}")]
    Tenant { index: usize, reason: InvalidName },
    #[error("tenant {0:?} appears more than once")]
    DuplicateTenant(String),
    #[error("tenant {tenant:?} has {errors} errors but only {requests} requests")]
    MoreErrorsThanRequests { tenant: String, errors: u64, requests: u64 },
}

/// Checks everything about a batch that can be checked without a clock or
/// configuration: names, the window, and per-tenant consistency.
pub fn validate(batch: &UsageBatch) -> Result<(), InvalidBatch> {
    validate_name(&batch.service).map_err(InvalidBatch::Service)?;
    validate_name(&batch.instance).map_err(InvalidBatch::Instance)?;
    if batch.session_id.is_empty() {
        return Err(InvalidBatch::EmptySession);
    }
    if batch.session_id.len() > MAX_SESSION_ID_LEN {
        return Err(InvalidBatch::SessionTooLong(batch.session_id.len()));
    }
    let (start, end) = (batch.window_start_unix_micros, batch.window_end_unix_micros);
    if start < 0 {
        return Err(InvalidBatch::WindowBeforeEpoch(start));
    }
    if start >= end {
        return Err(InvalidBatch::EmptyWindow { start, end });
    }
    if end - start > MAX_WINDOW_MICROS {
        return Err(InvalidBatch::WindowTooLong(end - start));
    }
    if let Some(load) = &batch.load
        && !(load.concurrency.is_finite() && (0.0..=MAX_CONCURRENCY).contains(&load.concurrency))
    {
        return Err(InvalidBatch::BadConcurrency(load.concurrency));
    }
    let window_micros = end - start;
    if let Some(resources) = &batch.resources
        && u128::from(resources.cpu_micros) > (window_micros as u128) * (MAX_CORES as u128)
    {
        return Err(InvalidBatch::AbsurdCpu {
            cpu_micros: resources.cpu_micros,
            window_micros,
        });
    }
    let mut seen = HashSet::with_capacity(batch.tenants.len());
    for (index, usage) in batch.tenants.iter().enumerate() {
        validate_name(&usage.tenant).map_err(|reason| InvalidBatch::Tenant { index, reason })?;
        if !seen.insert(usage.tenant.as_str()) {
            return Err(InvalidBatch::DuplicateTenant(usage.tenant.clone()));
        }
        if usage.errors > usage.requests {
            return Err(InvalidBatch::MoreErrorsThanRequests {
                tenant: usage.tenant.clone(),
                errors: usage.errors,
                requests: usage.requests,
            });
        }
    }
    Ok(())
}

/// Why a batch's window does not fit the receiver's clock.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OutOfTime {
    #[error("window ends {ahead_micros} µs after the collector's clock, more than the {skew_micros} µs skew allowed")]
    Future { ahead_micros: i64, skew_micros: i64 },
    #[error("window ended {age_micros} µs ago, longer than the {max_age_micros} µs a batch may wait")]
    TooOld { age_micros: i64, max_age_micros: i64 },
}

/// Checks a batch's window against the receiver's clock `now`: it may end at
/// most `skew` in the future (clocks differ a little, not a lot) and at most
/// `max_age` in the past (a spool replay after a long outage is fine, a
/// batch from a year ago is a bug). All in µs since the Unix epoch.
pub fn check_clock(batch: &UsageBatch, now: i64, skew: i64, max_age: i64) -> Result<(), OutOfTime> {
    let end = batch.window_end_unix_micros;
    if end.saturating_sub(now) > skew {
        return Err(OutOfTime::Future {
            ahead_micros: end - now,
            skew_micros: skew,
        });
    }
    if now.saturating_sub(end) > max_age {
        return Err(OutOfTime::TooOld {
            age_micros: now - end,
            max_age_micros: max_age,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoadSample, TenantUsage};

    fn good() -> UsageBatch {
        UsageBatch {
            service: "checkout".into(),
            instance: "checkout-1".into(),
            session_id: "0b7f2a52-6f0c-4b8e-9d1e-3c2f6a1d9e11".into(),
            seq: 7,
            window_start_unix_micros: 1_000_000,
            window_end_unix_micros: 2_000_000,
            load: Some(LoadSample {
                concurrency: 1.5,
                requests: 3,
                in_flight: 1,
            }),
            tenants: vec![
                TenantUsage {
                    tenant: "acme".into(),
                    requests: 2,
                    errors: 1,
                    ..TenantUsage::default()
                },
                TenantUsage {
                    tenant: "globex".into(),
                    requests: 1,
                    ..TenantUsage::default()
                },
            ],
            ..UsageBatch::default()
        }
    }

    #[test]
    fn accepts_a_well_formed_batch() {
        assert_eq!(validate(&good()), Ok(()));
    }

    #[test]
    fn refuses_each_kind_of_bad_batch() {
        type Spoil = fn(&mut UsageBatch);
        let cases: Vec<(Spoil, InvalidBatch)> = vec![
            (|b| b.service.clear(), InvalidBatch::Service(InvalidName::Empty)),
            (
                |b| b.instance = "a b".into(),
                InvalidBatch::Instance(InvalidName::BadChar { found: ' ' }),
            ),
            (|b| b.session_id.clear(), InvalidBatch::EmptySession),
            (|b| b.session_id = "s".repeat(65), InvalidBatch::SessionTooLong(65)),
            (
                |b| b.window_end_unix_micros = b.window_start_unix_micros,
                InvalidBatch::EmptyWindow {
                    start: 1_000_000,
                    end: 1_000_000,
                },
            ),
            (|b| b.window_start_unix_micros = -5, InvalidBatch::WindowBeforeEpoch(-5)),
            (
                |b| b.window_end_unix_micros = 1_000_000 + MAX_WINDOW_MICROS + 1,
                InvalidBatch::WindowTooLong(MAX_WINDOW_MICROS + 1),
            ),
            (
                |b| {
                    if let Some(load) = b.load.as_mut() {
                        load.concurrency = f64::NAN;
                    }
                },
                InvalidBatch::BadConcurrency(f64::NAN),
            ),
            (
                |b| {
                    if let Some(load) = b.load.as_mut() {
                        load.concurrency = 2e6;
                    }
                },
                InvalidBatch::BadConcurrency(2e6),
            ),
            (
                |b| {
                    b.resources = Some(crate::ResourceSample {
                        cpu_micros: 1_000_000 * 4097,
                        memory_bytes: 0,
                    })
                },
                InvalidBatch::AbsurdCpu {
                    cpu_micros: 1_000_000 * 4097,
                    window_micros: 1_000_000,
                },
            ),
            (
                |b| b.tenants[1].tenant = String::new(),
                InvalidBatch::Tenant {
                    index: 1,
                    reason: InvalidName::Empty,
                },
            ),
            (
                |b| b.tenants[1].tenant = "acme".into(),
                InvalidBatch::DuplicateTenant("acme".into()),
            ),
            (
                |b| b.tenants[0].errors = 3,
                InvalidBatch::MoreErrorsThanRequests {
                    tenant: "acme".into(),
                    errors: 3,
                    requests: 2,
                },
            ),
        ];
        for (spoil, want) in cases {
            let mut batch = good();
            spoil(&mut batch);
            let got = validate(&batch).expect_err("spoiled batch must be refused");
            // NaN != NaN, so compare the messages, which carry every field.
            assert_eq!(got.to_string(), want.to_string());
        }
    }

    #[test]
    fn the_window_must_fit_the_clock_within_skew_and_age() {
        let batch = good(); // ends at 2_000_000
        assert_eq!(check_clock(&batch, 2_000_000, 10, 100), Ok(()));
        assert_eq!(check_clock(&batch, 1_999_990, 10, 100), Ok(()), "exactly the skew");
        assert_eq!(
            check_clock(&batch, 1_999_989, 10, 100),
            Err(OutOfTime::Future {
                ahead_micros: 11,
                skew_micros: 10
            })
        );
        assert_eq!(check_clock(&batch, 2_000_100, 10, 100), Ok(()), "exactly the age");
        assert_eq!(
            check_clock(&batch, 2_000_101, 10, 100),
            Err(OutOfTime::TooOld {
                age_micros: 101,
                max_age_micros: 100
            })
        );
    }
}
