//! Billing periods: calendar months in the billing time zone.
//!
//! The zone is `UTC`, a fixed offset (`+01:00`, `-05:30`) or an IANA name
//! (`Europe/Berlin`, with its daylight-saving rules from the tz database
//! compiled into `chrono-tz`). A month runs from local midnight on its
//! first day to local midnight on the next month's first day, as instants:
//! in `Europe/Berlin`, November is `[2026-10-31T23:00Z, 2026-11-30T23:00Z)`
//! and June is `[2026-05-31T22:00Z, 2026-06-30T22:00Z)`. Usage is rolled up
//! per UTC minute, so every zone whose offset is a whole number of minutes
//! (all of today's) splits usage exactly at the boundary.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, FixedOffset, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The time zone billing periods are calendar months in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingZone {
    Utc,
    /// A fixed offset east of UTC, in seconds; never 0 (that is `Utc`).
    Fixed(FixedOffset),
    /// An IANA zone with its offset changes.
    Named(Tz),
}

/// A zone that is neither `UTC`, a `±HH:MM` offset, nor an IANA name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a time zone: use UTC, a fixed offset such as +01:00 or -05:30, or an IANA name such as Europe/Berlin"
)]
pub struct BadZone(pub String);

impl FromStr for BillingZone {
    type Err = BadZone;

    fn from_str(text: &str) -> Result<BillingZone, BadZone> {
        let bad = || BadZone(text.to_owned());
        if matches!(text, "UTC" | "Z" | "Etc/UTC") {
            return Ok(BillingZone::Utc);
        }
        if let Some(rest) = text.strip_prefix(['+', '-']) {
            let sign = if text.starts_with('-') { -1 } else { 1 };
            let (hours, minutes) = rest.split_once(':').ok_or_else(bad)?;
            let hours = two_digits(hours).ok_or_else(bad)?;
            let minutes = two_digits(minutes).ok_or_else(bad)?;
            if hours > 23 || minutes > 59 {
                return Err(bad());
            }
            let seconds = sign * (hours * 3600 + minutes * 60);
            if seconds == 0 {
                return Ok(BillingZone::Utc);
            }
            return FixedOffset::east_opt(seconds).map(BillingZone::Fixed).ok_or_else(bad);
        }
        text.parse::<Tz>().map(BillingZone::Named).map_err(|_| bad())
    }
}

/// `"07"` as 7: exactly two ASCII digits.
fn two_digits(text: &str) -> Option<i32> {
    if text.len() != 2 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl fmt::Display for BillingZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BillingZone::Utc => f.write_str("UTC"),
            BillingZone::Fixed(offset) => write!(f, "{offset}"),
            BillingZone::Named(tz) => f.write_str(tz.name()),
        }
    }
}

/// A calendar month: which one (local year and month) and the instants it
/// spans, `[start, end)`, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    pub year: i32,
    pub month: u32,
    pub start: i64,
    pub end: i64,
}

impl Period {
    /// `YYYY-MM`, the month in the billing zone.
    pub fn label(&self) -> String {
        format!("{:04}-{:02}", self.year, self.month)
    }

    /// Whole minutes in the period.
    pub fn minutes(&self) -> i64 {
        (self.end - self.start) / tidemark_core::window::MICROS_PER_MINUTE
    }

    pub fn contains(&self, unix_micros: i64) -> bool {
        self.start <= unix_micros && unix_micros < self.end
    }
}

/// Parses `YYYY-MM` (months 01 to 12, years 1970 to 9999).
pub fn parse_month(text: &str) -> Option<(i32, u32)> {
    let (year, month) = text.split_once('-')?;
    if year.len() != 4 || month.len() != 2 || !(year.bytes().chain(month.bytes())).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = year.parse().ok()?;
    let month: u32 = month.parse().ok()?;
    ((1970..=9999).contains(&year) && (1..=12).contains(&month)).then_some((year, month))
}

impl BillingZone {
    /// The first instant of local midnight starting `date`. Where a zone
    /// skips midnight (a daylight-saving jump at 00:00), the first local
    /// minute after the gap; where it repeats it, the earlier one.
    fn local_midnight(self, date: NaiveDate) -> Option<i64> {
        let midnight = date.and_hms_opt(0, 0, 0)?;
        // Gaps are at most a few hours; walk forward a minute at a time.
        for minute in 0..24 * 60 {
            let local = midnight + chrono::Duration::minutes(minute);
            if let Some(t) = self.earliest(local) {
                return Some(t);
            }
        }
        None
    }

    fn earliest(self, local: NaiveDateTime) -> Option<i64> {
        let pick = |r: LocalResult<i64>| match r {
            LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t),
            LocalResult::None => None,
        };
        match self {
            BillingZone::Utc => Some(Utc.from_utc_datetime(&local).timestamp_micros()),
            BillingZone::Fixed(offset) => pick(offset.from_local_datetime(&local).map(|t| t.timestamp_micros())),
            BillingZone::Named(tz) => pick(tz.from_local_datetime(&local).map(|t| t.timestamp_micros())),
        }
    }

    /// The local year and month at `unix_micros`.
    fn local_month(self, unix_micros: i64) -> Option<(i32, u32)> {
        let utc = DateTime::<Utc>::from_timestamp_micros(unix_micros)?;
        Some(match self {
            BillingZone::Utc => (utc.year(), utc.month()),
            BillingZone::Fixed(offset) => {
                let t = utc.with_timezone(&offset);
                (t.year(), t.month())
            }
            BillingZone::Named(tz) => {
                let t = utc.with_timezone(&tz);
                (t.year(), t.month())
            }
        })
    }

    /// The calendar month `year`-`month` in this zone; `None` out of range.
    pub fn period(self, year: i32, month: u32) -> Option<Period> {
        let first = NaiveDate::from_ymd_opt(year, month, 1)?;
        let next = if month == 12 {
            NaiveDate::from_ymd_opt(year + 1, 1, 1)?
        } else {
            NaiveDate::from_ymd_opt(year, month + 1, 1)?
        };
        Some(Period {
            year,
            month,
            start: self.local_midnight(first)?,
            end: self.local_midnight(next)?,
        })
    }

    /// The period holding the instant `unix_micros`.
    pub fn period_at(self, unix_micros: i64) -> Option<Period> {
        let (year, month) = self.local_month(unix_micros)?;
        let period = self.period(year, month)?;
        // A midnight that does not exist moves the boundary later: an
        // instant just before it still belongs to the previous month.
        if unix_micros < period.start {
            return self.previous(&period);
        }
        Some(period)
    }

    /// The period right before `period`.
    pub fn previous(self, period: &Period) -> Option<Period> {
        if period.month == 1 {
            self.period(period.year - 1, 12)
        } else {
            self.period(period.year, period.month - 1)
        }
    }

    /// The period right after `period`.
    pub fn next(self, period: &Period) -> Option<Period> {
        if period.month == 12 {
            self.period(period.year + 1, 1)
        } else {
            self.period(period.year, period.month + 1)
        }
    }

    /// The period starting exactly at `start`, if one does.
    pub fn period_starting(self, start: i64) -> Option<Period> {
        self.period_at(start).filter(|p| p.start == start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text).expect("rfc3339").timestamp_micros()
    }

    fn zone(text: &str) -> BillingZone {
        text.parse().expect("zone")
    }

    #[test]
    fn zones_parse_and_print_back() {
        for text in ["UTC", "+01:00", "-05:30", "Europe/Berlin", "Asia/Kolkata"] {
            assert_eq!(zone(text).to_string(), text);
        }
        assert_eq!(zone("+00:00"), BillingZone::Utc);
        assert_eq!(zone("Z"), BillingZone::Utc);
        for bad in [
            "",
            "utc+1",
            "+1:00",
            "+01",
            "+24:00",
            "+01:60",
            "Mars/Olympus",
            "+01:00:00",
        ] {
            let err = bad.parse::<BillingZone>().expect_err(bad);
            assert!(err.to_string().contains("is not a time zone"), "{err}");
        }
    }

    #[test]
    fn utc_months() {
        let p = zone("UTC").period(2026, 11).expect("period");
        assert_eq!(
            (p.start, p.end),
            (at("2026-11-01T00:00:00Z"), at("2026-12-01T00:00:00Z"))
        );
        assert_eq!(p.label(), "2026-11");
        assert_eq!(p.minutes(), 30 * 24 * 60);
        let dec = zone("UTC").period(2026, 12).expect("period");
        assert_eq!(dec.end, at("2027-01-01T00:00:00Z"));
        assert_eq!(zone("UTC").next(&p), Some(dec));
        assert_eq!(zone("UTC").previous(&dec), Some(p));
    }

    #[test]
    fn a_fixed_offset_moves_the_boundary() {
        let plus_one = zone("+01:00");
        // 23:30 UTC on the last day of October is 00:30 on 1 November at +01:00.
        let late = at("2026-10-31T23:30:00Z");
        assert_eq!(plus_one.period_at(late).expect("period").label(), "2026-11");
        assert_eq!(zone("UTC").period_at(late).expect("period").label(), "2026-10");
        let nov = plus_one.period(2026, 11).expect("period");
        assert_eq!(nov.start, at("2026-10-31T23:00:00Z"));
        assert_eq!(nov.end, at("2026-11-30T23:00:00Z"));
        assert_eq!(plus_one.period_at(nov.start - 1).expect("period").label(), "2026-10");
        assert_eq!(plus_one.period_starting(nov.start), Some(nov));
        assert_eq!(plus_one.period_starting(nov.start + 60_000_000), None);
    }

    #[test]
    fn named_zones_follow_daylight_saving() {
        let berlin = zone("Europe/Berlin");
        let nov = berlin.period(2026, 11).expect("period");
        assert_eq!(
            (nov.start, nov.end),
            (at("2026-10-31T23:00:00Z"), at("2026-11-30T23:00:00Z"))
        );
        let june = berlin.period(2026, 6).expect("period");
        assert_eq!(june.start, at("2026-05-31T22:00:00Z"), "summer time: +02:00");
        // March loses an hour to the change to summer time.
        let march = berlin.period(2026, 3).expect("period");
        assert_eq!(march.minutes(), 31 * 24 * 60 - 60);
    }

    #[test]
    fn a_skipped_midnight_starts_the_month_after_the_gap() {
        // Paraguay moved its clocks from 00:00 to 01:00 on 1 October 2023.
        let asuncion = zone("America/Asuncion");
        let october = asuncion.period(2023, 10).expect("period");
        assert_eq!(october.start, at("2023-10-01T01:00:00-03:00"));
        assert_eq!(october.start, at("2023-10-01T04:00:00Z"));
        assert_eq!(asuncion.period(2023, 9).expect("period").end, october.start);
        assert_eq!(
            asuncion.period_at(october.start - 1).expect("period").label(),
            "2023-09"
        );
        assert_eq!(asuncion.period_at(october.start).expect("period").label(), "2023-10");
    }

    #[test]
    fn months_parse() {
        assert_eq!(parse_month("2026-11"), Some((2026, 11)));
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "",
            "2026-11-01",
            "１９７０-01",
        ] {
            assert_eq!(parse_month(bad), None, "{bad}");
        }
    }
}
