//! A period's usage of one meter, aggregated into the one quantity a
//! charge rates, with the usage range and the batches behind it. The store
//! summarizes the rollups per meter in SQL ([`MeterUsage`]); these pure
//! functions only turn a summary into the quantity.

use rust_decimal::Decimal;
use tidemark_core::window::MICROS_PER_MINUTE;

use crate::pricing::Aggregation;

/// One minute of one meter's usage, the services added up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinuteUsage {
    /// Start of the minute, microseconds since the Unix epoch.
    pub minute: i64,
    pub quantity: i64,
    /// Batch contributions behind the quantity.
    pub batches: i64,
}

/// What the aggregations need to know of one meter's rollups over a
/// period (all services), as the store summarizes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeterUsage {
    /// Σ quantity, in stored units (i128: a month of byte-µs passes i64).
    pub sum: i128,
    /// Σ batch contributions.
    pub batches: i64,
    /// First and last minute with a rollup row.
    pub first: Option<i64>,
    pub last: Option<i64>,
    /// Minutes whose quantity (all services) is not 0.
    pub active_minutes: i64,
    /// The largest quantity of one minute (all services); filled only when
    /// asked for (`max`).
    pub max_minute: i64,
    /// The quantity of the last minute (all services); filled only when
    /// asked for (`latest`).
    pub latest: i64,
}

impl MeterUsage {
    /// The summary of per-minute rows (one per minute, any order).
    pub fn from_minutes(rows: &[MinuteUsage]) -> MeterUsage {
        let last = rows.iter().max_by_key(|r| r.minute);
        MeterUsage {
            sum: rows.iter().map(|r| i128::from(r.quantity)).sum(),
            batches: rows.iter().map(|r| r.batches).sum(),
            first: rows.iter().map(|r| r.minute).min(),
            last: last.map(|r| r.minute),
            active_minutes: rows.iter().filter(|r| r.quantity != 0).count() as i64,
            max_minute: rows.iter().map(|r| r.quantity).max().unwrap_or(0),
            latest: last.map_or(0, |r| r.quantity),
        }
    }
}

/// A meter's usage over a period, aggregated one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aggregated {
    /// The quantity rated.
    pub usage: Decimal,
    /// First minute with a rollup row; `None` without usage.
    pub from: Option<i64>,
    /// One minute past the last minute with a rollup row.
    pub to: Option<i64>,
    /// Batch contributions behind every row in `[from, to)`.
    pub batches: i64,
}

impl Aggregated {
    pub const NONE: Aggregated = Aggregated {
        usage: Decimal::ZERO,
        from: None,
        to: None,
        batches: 0,
    };
}

/// Decimal places a time-weighted mean keeps when the division does not end.
pub const TIME_WEIGHTED_PLACES: u32 = 9;

/// Why usage could not be aggregated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AggregateError {
    #[error("the {aggregation} of meter {meter:?} does not fit a 28-digit decimal")]
    TooLarge { meter: String, aggregation: &'static str },
    #[error("meter {meter:?} has negative usage")]
    Negative { meter: String },
}

/// Aggregates one meter's `usage` over a period of `period_minutes`
/// minutes. Stored quantities have `digits` decimal places (0 for built-in
/// meters, 9 for custom ones: see [`crate::quantity`]); counts are whole.
pub fn aggregate(
    meter: &str,
    aggregation: Aggregation,
    usage: &MeterUsage,
    period_minutes: i64,
    digits: u32,
) -> Result<Aggregated, AggregateError> {
    if usage.sum < 0 || usage.max_minute < 0 || usage.latest < 0 {
        return Err(AggregateError::Negative {
            meter: meter.to_owned(),
        });
    }
    let (Some(first), Some(last)) = (usage.first, usage.last) else {
        return Ok(Aggregated::NONE);
    };
    let too_large = || AggregateError::TooLarge {
        meter: meter.to_owned(),
        aggregation: aggregation.as_str(),
    };
    let stored = |n: i128| {
        Decimal::try_from_i128_with_scale(n, digits)
            .map(|d| d.normalize())
            .map_err(|_| too_large())
    };
    let quantity = match aggregation {
        Aggregation::Sum => stored(usage.sum)?,
        Aggregation::Count => Decimal::from(usage.batches),
        Aggregation::Max => stored(i128::from(usage.max_minute))?,
        Aggregation::Latest => stored(i128::from(usage.latest))?,
        Aggregation::UniqueCount => Decimal::from(usage.active_minutes),
        Aggregation::TimeWeighted => mean(usage.sum, period_minutes.max(1), digits).ok_or_else(too_large)?,
    };
    Ok(Aggregated {
        usage: quantity,
        from: Some(first),
        to: Some(last + MICROS_PER_MINUTE),
        batches: usage.batches,
    })
}

/// `total ÷ minutes` rounded half-even to [`TIME_WEIGHTED_PLACES`] places
/// (of a quantity with `digits` places stored), with a single rounding
/// (integer arithmetic throughout).
fn mean(total: i128, minutes: i64, digits: u32) -> Option<Decimal> {
    let scaled = total.checked_mul(10i128.pow(TIME_WEIGHTED_PLACES))?;
    let minutes = i128::from(minutes);
    let (mut quotient, remainder) = (scaled / minutes, scaled % minutes);
    let twice = remainder * 2;
    if twice > minutes || (twice == minutes && quotient % 2 == 1) {
        quotient += 1;
    }
    Decimal::try_from_i128_with_scale(quotient, TIME_WEIGHTED_PLACES + digits)
        .ok()
        .map(|d| d.normalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = MICROS_PER_MINUTE;

    fn row(minute: i64, quantity: i64, batches: i64) -> MinuteUsage {
        MinuteUsage {
            minute: minute * M,
            quantity,
            batches,
        }
    }

    fn d(text: &str) -> Decimal {
        Decimal::from_str_exact(text).expect("decimal")
    }

    /// Hand-computed: minutes 3, 5, 6 and 10 of a 60-minute period.
    fn rows() -> Vec<MinuteUsage> {
        vec![row(5, 40, 2), row(3, 10, 1), row(10, 0, 1), row(6, 30, 3)]
    }

    fn agg(aggregation: Aggregation) -> Aggregated {
        aggregate("m", aggregation, &MeterUsage::from_minutes(&rows()), 60, 0).expect("aggregate")
    }

    #[test]
    fn every_aggregation_on_hand_computed_rollups() {
        assert_eq!(agg(Aggregation::Sum).usage, d("80"));
        assert_eq!(agg(Aggregation::Count).usage, d("7"), "1 + 2 + 3 + 1 batches");
        assert_eq!(agg(Aggregation::Max).usage, d("40"));
        assert_eq!(agg(Aggregation::Latest).usage, d("0"), "minute 10 is the last, with 0");
        assert_eq!(agg(Aggregation::UniqueCount).usage, d("3"), "minutes 3, 5 and 6");
        // (10 + 40 + 30 + 0) quantity-minutes over 60 minutes.
        assert_eq!(agg(Aggregation::TimeWeighted).usage, d("1.333333333"));
        for aggregation in Aggregation::ALL {
            let a = agg(aggregation);
            assert_eq!(
                (a.from, a.to, a.batches),
                (Some(3 * M), Some(11 * M), 7),
                "{aggregation:?}"
            );
        }
    }

    #[test]
    fn time_weighted_rounds_once_half_even() {
        // 1 / 8 = 0.125 exactly: no rounding.
        assert_eq!(mean(1, 8, 0), Some(d("0.125")));
        // 5e-10 is halfway between 0 and 1e-9: to the even 0.
        assert_eq!(mean(1, 2_000_000_000, 0), Some(d("0")));
        // 3e-10 × 5 = 1.5e-9: halfway, to the even 2e-9.
        assert_eq!(mean(3, 2_000_000_000, 0), Some(d("0.000000002")));
        assert_eq!(mean(2, 3, 0), Some(d("0.666666667")));
        // A full month of a gauge at 2: the mean is 2.
        assert_eq!(mean(2 * 43_200, 43_200, 0), Some(d("2")));
        // A custom meter stored in nano-units: 2 units over 3 minutes.
        assert_eq!(mean(2_000_000_000, 3, 9), Some(d("0.666666666666666667")));
    }

    #[test]
    fn nothing_used_is_zero_with_no_range() {
        for aggregation in Aggregation::ALL {
            assert_eq!(
                aggregate("m", aggregation, &MeterUsage::default(), 60, 0),
                Ok(Aggregated::NONE)
            );
        }
    }

    #[test]
    fn sums_beyond_64_bits_stay_exact() {
        let big = [row(1, i64::MAX, 1), row(2, i64::MAX, 1)];
        let a = aggregate(
            "memory_byte_us",
            Aggregation::Sum,
            &MeterUsage::from_minutes(&big),
            60,
            0,
        )
        .expect("fits a decimal");
        assert_eq!(a.usage, Decimal::from(i64::MAX) * Decimal::TWO);
    }

    #[test]
    fn custom_meters_come_back_in_their_unit_and_counts_stay_whole() {
        // 0.25 and 1.5 tokens, stored in nano-units.
        let nanos = [row(1, 250_000_000, 1), row(2, 1_500_000_000, 2)];
        let summary = MeterUsage::from_minutes(&nanos);
        let of = |aggregation| {
            aggregate("tokens", aggregation, &summary, 60, 9)
                .expect("aggregate")
                .usage
        };
        assert_eq!(of(Aggregation::Sum), d("1.75"));
        assert_eq!(of(Aggregation::Max), d("1.5"));
        assert_eq!(of(Aggregation::Latest), d("1.5"));
        assert_eq!(of(Aggregation::Count), d("3"));
        assert_eq!(of(Aggregation::UniqueCount), d("2"));
        assert_eq!(of(Aggregation::TimeWeighted), d("0.029166666666666667"));
    }

    #[test]
    fn negative_quantities_are_refused() {
        let summary = MeterUsage::from_minutes(&[row(1, -1, 1)]);
        let err = aggregate("m", Aggregation::Sum, &summary, 60, 0).expect_err("negative");
        assert!(matches!(err, AggregateError::Negative { .. }), "{err}");
    }
}
