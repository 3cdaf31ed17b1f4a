//! When each request of a constant-rate run is due.
//!
//! Request `i` is due at `t0 + i / rate`. Offsets are whole nanoseconds,
//! rounded down, computed in 128-bit integers so they never drift.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The send times of a constant-rate run, as offsets from its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    rate: u64,
}

impl Schedule {
    /// A schedule of `rate` requests per second; `None` for a rate of 0.
    pub fn new(rate: u64) -> Option<Schedule> {
        (rate > 0).then_some(Schedule { rate })
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// When request `i` is due, from the start: `i / rate` seconds.
    pub fn offset(&self, i: u64) -> Duration {
        let nanos = u128::from(i) * NANOS_PER_SEC / u128::from(self.rate);
        duration_from_nanos(nanos)
    }

    /// How many requests are due strictly before `elapsed`: the first `n`
    /// with `offset(n) >= elapsed`.
    pub fn due_before(&self, elapsed: Duration) -> u64 {
        // offset(i) < e  <=>  i * 1e9 / rate < e  <=>  i < e * rate / 1e9.
        count_from(div_ceil(elapsed.as_nanos() * u128::from(self.rate), NANOS_PER_SEC))
    }

    /// How many requests are due at or before `elapsed`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        // floor(i * 1e9 / rate) <= e  <=>  i * 1e9 < (e + 1) * rate.
        count_from(div_ceil(
            (elapsed.as_nanos() + 1) * u128::from(self.rate),
            NANOS_PER_SEC,
        ))
    }
}

fn div_ceil(a: u128, b: u128) -> u128 {
    a.div_ceil(b)
}

fn count_from(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 1e9, so it fits.
    let rest = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_rate_of_zero_has_no_schedule() {
        assert_eq!(Schedule::new(0), None);
    }

    #[test]
    fn offsets_are_evenly_spaced() {
        let s = Schedule::new(1000).unwrap();
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), ms(1));
        assert_eq!(s.offset(1500), ms(1500));
        let s = Schedule::new(3).unwrap();
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(2), Duration::from_nanos(666_666_666));
        assert_eq!(s.offset(3), Duration::from_secs(1));
    }

    #[test]
    fn offsets_do_not_drift_over_long_runs() {
        let s = Schedule::new(7).unwrap();
        assert_eq!(s.offset(7 * 86_400), Duration::from_secs(86_400));
        let s = Schedule::new(u64::MAX).unwrap();
        assert_eq!(s.offset(u64::MAX), Duration::from_secs(1));
    }

    #[test]
    fn counts_requests_due_before_a_time() {
        let s = Schedule::new(1000).unwrap();
        assert_eq!(s.due_before(Duration::ZERO), 0);
        assert_eq!(s.due_before(Duration::from_nanos(1)), 1);
        assert_eq!(s.due_before(ms(1)), 1);
        assert_eq!(s.due_before(ms(1) + Duration::from_nanos(1)), 2);
        assert_eq!(s.due_before(ms(2000)), 2000);
        // 15 s at 5000/s after a 2 s warmup.
        let s = Schedule::new(5000).unwrap();
        assert_eq!(s.due_before(ms(17_000)) - s.due_before(ms(2000)), 75_000);
    }

    #[test]
    fn counts_requests_due_by_a_time() {
        let s = Schedule::new(1000).unwrap();
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(ms(1) - Duration::from_nanos(1)), 1);
        assert_eq!(s.due_by(ms(1)), 2);
        assert_eq!(s.due_by(ms(10)), 11);
    }

    #[test]
    fn counts_agree_with_offsets() {
        for rate in [1, 3, 7, 999, 1000, 4999, 5000, 123_457] {
            let s = Schedule::new(rate).unwrap();
            for i in [0, 1, 2, 10, 999, 1000, 12_345] {
                let at = s.offset(i);
                assert_eq!(s.due_before(at), i, "rate {rate} i {i}");
                assert!(s.due_by(at) > i, "rate {rate} i {i}");
                assert!(s.offset(s.due_by(at)) > at, "rate {rate} i {i}");
            }
        }
    }
}
