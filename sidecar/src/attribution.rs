//! Splits a window's measured resources among tenants.
//!
//! Rule: each tenant's share of a resource is its in-flight time (the sum of
//! its requests' time in flight in the window) divided by
//! `max(total in-flight time, window length)`. What is left — the time no
//! request was in flight for, when requests did not fill the window — goes to
//! the service owner as idle usage. Shares are rounded down in integer units
//! and the remainder goes to idle, so tenants plus idle always equal exactly
//! what was measured.

/// `total` split by `in_flight` weights over a window of `window_micros`:
/// one share per weight, and the idle remainder.
pub fn split(total: u64, in_flight: &[u64], window_micros: u64) -> (Vec<u64>, u64) {
    let busy: u128 = in_flight.iter().map(|&w| u128::from(w)).sum();
    let denominator = busy.max(u128::from(window_micros)).max(1);
    let shares: Vec<u64> = in_flight
        .iter()
        .map(|&w| {
            let share = u128::from(total) * u128::from(w) / denominator;
            u64::try_from(share).unwrap_or(u64::MAX)
        })
        .collect();
    let given: u64 = shares.iter().sum();
    (shares, total - given)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_busy_window_gives_half_to_idle() {
        // One tenant in flight for 500 ms of a 1 s window: half the CPU.
        assert_eq!(split(1000, &[500_000], 1_000_000), (vec![500], 500));
    }

    #[test]
    fn overlapping_requests_share_everything_by_in_flight_time() {
        // 3 s of in-flight time in a 1 s window, split 2:1.
        assert_eq!(split(900, &[2_000_000, 1_000_000], 1_000_000), (vec![600, 300], 0));
    }

    #[test]
    fn remainders_go_to_idle_so_the_sum_is_exact() {
        for total in [0, 1, 7, 999_999_999, u64::MAX / 3] {
            let weights = [333_333, 333_333, 333_334, 1];
            let (shares, idle) = split(total, &weights, 1_000_000);
            assert_eq!(shares.iter().sum::<u64>() + idle, total, "total {total}");
        }
    }

    #[test]
    fn no_requests_means_all_idle() {
        assert_eq!(split(42, &[], 1_000_000), (vec![], 42));
        assert_eq!(split(42, &[0, 0], 0), (vec![0, 0], 42));
    }
}
