//! Time windows. Times are microseconds since the Unix epoch, UTC.

/// Microseconds in one second.
pub const MICROS_PER_SECOND: i64 = 1_000_000;
/// Microseconds in one minute.
pub const MICROS_PER_MINUTE: i64 = 60 * MICROS_PER_SECOND;

/// Start of the minute that holds `unix_micros` (floored, also before 1970).
pub fn minute_start(unix_micros: i64) -> i64 {
    unix_micros.div_euclid(MICROS_PER_MINUTE) * MICROS_PER_MINUTE
}

/// `t` in microseconds since the Unix epoch (0 before it, saturating far after).
pub fn unix_micros(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The wall clock now, in microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    unix_micros(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_to_the_minute() {
        assert_eq!(minute_start(0), 0);
        assert_eq!(minute_start(MICROS_PER_MINUTE - 1), 0);
        assert_eq!(minute_start(MICROS_PER_MINUTE), MICROS_PER_MINUTE);
        assert_eq!(minute_start(-1), -MICROS_PER_MINUTE);
        assert_eq!(minute_start(1_764_131_234_567_890), 1_764_131_220_000_000);
    }
}
