//! Rollup quantities as exact decimals, and how custom meters are stored.
//!
//! The store keeps every quantity as a BIGINT. Built-in meters
//! ([`Meter::ALL`]) are integers in their base unit (requests, µs, bytes,
//! byte-µs) and are stored as they are. Custom meters, which apps report as
//! exact decimal strings (`tokens=532`, `gpu_seconds=0.25`), are stored in
//! **nano-units**: the value × 10⁹, so `0.25` is `250000000`. A value with
//! more than [`CUSTOM_SCALE_DIGITS`] decimal places (after dropping trailing
//! zeros), or beyond what a BIGINT holds, is refused, never rounded.
//!
//! A custom meter is stored under its own name, unless that name is a
//! built-in meter's or starts with [`CUSTOM_PREFIX`]: then it is stored as
//! `custom.` + name (`requests` → `custom.requests`, `custom.x` →
//! `custom.custom.x`), so no two names ever share a row.
//!
//! [`to_decimal`] and [`from_decimal`] turn a stored `(meter, quantity)` into
//! the exact [`Decimal`] in the meter's unit and back; rating and the API go
//! through them.

use std::borrow::Cow;
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tidemark_core::meter::Meter;

/// Decimal places a custom meter's quantity keeps (nano-units).
pub const CUSTOM_SCALE_DIGITS: u32 = 9;
/// One unit of a custom meter, in stored nano-units.
pub const NANOS_PER_UNIT: i64 = 1_000_000_000;
/// Put in front of a custom meter's name that would collide with a built-in
/// meter's (or with another prefixed name).
pub const CUSTOM_PREFIX: &str = "custom.";
/// Longest custom meter name, the sidecar's limit.
pub const MAX_CUSTOM_NAME_LEN: usize = 64;

/// Why a custom usage value was not counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomUsageError {
    #[error("custom meter name {0:?} must be 1 to 64 of a-z 0-9 _ . -")]
    BadName(String),
    #[error("{0:?} is not a decimal number >= 0 (digits, optionally a point and more digits)")]
    NotADecimal(String),
    #[error("{0:?} has more than 9 decimal places; custom usage is kept exact to 10^-9 and never rounded")]
    TooPrecise(String),
    #[error("{0:?} is too large: at most 9223372036.854775807 per value")]
    TooLarge(String),
    #[error("adding {0:?} would take the rollup past 9223372036.854775807")]
    SumTooLarge(String),
}

/// Why a decimal cannot be stored as a meter's quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{value} of meter {meter:?} has more than {digits} decimal places")]
    TooPrecise { meter: String, value: Decimal, digits: u32 },
    #[error("{value} of meter {meter:?} does not fit a stored quantity")]
    OutOfRange { meter: String, value: Decimal },
}

/// Whether a stored meter name is a custom meter's (not a built-in one).
pub fn is_custom(meter: &str) -> bool {
    Meter::parse(meter).is_none()
}

/// Whether `name` can name a custom meter: 1 to 64 of `a-z 0-9 _ . -`.
pub fn is_custom_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CUSTOM_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether `meter` can be a stored meter name: a built-in meter, a custom
/// name, or a prefixed one.
pub fn is_meter_column(meter: &str) -> bool {
    is_custom_name(meter) || meter.strip_prefix(CUSTOM_PREFIX).is_some_and(is_custom_name)
}

/// The stored meter name of custom meter `name`: `name` itself, or
/// `custom.name` when `name` is a built-in meter's or starts with `custom.`.
pub fn custom_meter_column(name: &str) -> Result<Cow<'_, str>, CustomUsageError> {
    if !is_custom_name(name) {
        return Err(CustomUsageError::BadName(name.to_owned()));
    }
    if Meter::parse(name).is_some() || name.starts_with(CUSTOM_PREFIX) {
        Ok(Cow::Owned(format!("{CUSTOM_PREFIX}{name}")))
    } else {
        Ok(Cow::Borrowed(name))
    }
}

/// A custom usage value (`"12.5"`) in nano-units (`12500000000`): digits,
/// optionally a point and more digits; at most 9 decimal places that are not
/// trailing zeros.
pub fn parse_custom_quantity(text: &str) -> Result<i64, CustomUsageError> {
    let not_decimal = || CustomUsageError::NotADecimal(text.to_owned());
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => {
            if fraction.is_empty() {
                return Err(not_decimal());
            }
            (whole, fraction)
        }
        None => (text, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) {
        return Err(not_decimal());
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > CUSTOM_SCALE_DIGITS as usize {
        return Err(CustomUsageError::TooPrecise(text.to_owned()));
    }
    let too_large = || CustomUsageError::TooLarge(text.to_owned());
    let whole = whole.trim_start_matches('0');
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut nanos: i64 = 0;
    for position in 0..CUSTOM_SCALE_DIGITS as usize {
        let digit = fraction.as_bytes().get(position).map_or(0, |b| i64::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    whole
        .checked_mul(NANOS_PER_UNIT)
        .and_then(|w| w.checked_add(nanos))
        .ok_or_else(too_large)
}

/// Decimal places a stored quantity of `meter` has: 0 for built-in meters,
/// 9 for custom ones.
pub fn scale_digits(meter: &str) -> u32 {
    if is_custom(meter) { CUSTOM_SCALE_DIGITS } else { 0 }
}

/// A stored quantity as the exact decimal it stands for, in the meter's
/// unit (`("tokens", 12500000000)` → `12.5`; `("requests", 7)` → `7`).
pub fn to_decimal(meter: &str, quantity: i64) -> Decimal {
    Decimal::new(quantity, scale_digits(meter)).normalize()
}

/// The stored quantity of an exact decimal in the meter's unit; refused if
/// it has more decimal places than the meter keeps or does not fit.
pub fn from_decimal(meter: &str, value: Decimal) -> Result<i64, QuantityError> {
    let digits = scale_digits(meter);
    let normal = value.normalize();
    if normal.scale() > digits {
        return Err(QuantityError::TooPrecise {
            meter: meter.to_owned(),
            value,
            digits,
        });
    }
    normal
        .mantissa()
        .checked_mul(10i128.pow(digits - normal.scale()))
        .and_then(|m| i64::try_from(m).ok())
        .ok_or_else(|| QuantityError::OutOfRange {
            meter: meter.to_owned(),
            value,
        })
}

/// A quantity as users see it: a JSON integer for built-in meters, an exact
/// decimal string (no exponent, no trailing zeros) for custom ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Quantity {
    Integer(i128),
    Decimal(String),
}

/// Reads what [`Quantity`] writes: an integer or a string (serde's untagged
/// enums cannot read an `i128`).
impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Quantity, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or an exact decimal string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity::Integer(i128::from(v)))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity::Integer(i128::from(v)))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Quantity, E> {
                Ok(Quantity::Integer(v))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Quantity, E> {
                i128::try_from(v)
                    .map(Quantity::Integer)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity::Decimal(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Quantity {
    /// The stored quantity of `meter` as shown.
    pub fn of(meter: &str, quantity: i64) -> Quantity {
        Quantity::of_total(meter, i128::from(quantity))
    }

    /// A sum of stored quantities of `meter` (summed as i128, so without
    /// overflow) as shown.
    pub fn of_total(meter: &str, total: i128) -> Quantity {
        if !is_custom(meter) {
            return Quantity::Integer(total);
        }
        let scale = 10u128.pow(CUSTOM_SCALE_DIGITS);
        let sign = if total < 0 { "-" } else { "" };
        let (whole, fraction) = (total.unsigned_abs() / scale, total.unsigned_abs() % scale);
        if fraction == 0 {
            return Quantity::Decimal(format!("{sign}{whole}"));
        }
        let fraction = format!("{fraction:09}");
        Quantity::Decimal(format!("{sign}{whole}.{}", fraction.trim_end_matches('0')))
    }

    /// An exact decimal in `meter`'s unit as shown.
    pub fn of_decimal(meter: &str, value: Decimal) -> Quantity {
        let value = value.normalize();
        if !is_custom(meter) && value.scale() == 0 {
            return Quantity::Integer(value.mantissa());
        }
        Quantity::Decimal(value.to_string())
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantity::Integer(i) => write!(f, "{i}"),
            Quantity::Decimal(d) => f.write_str(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(text: &str) -> Decimal {
        Decimal::from_str(text).expect("decimal")
    }

    #[test]
    fn custom_values_parse_to_exact_nano_units() {
        let cases = [
            ("0", 0),
            ("532", 532_000_000_000),
            ("0.25", 250_000_000),
            ("12.5", 12_500_000_000),
            ("0.000000001", 1),
            ("1.100000000000", 1_100_000_000), // trailing zeros are exact
            ("007.5", 7_500_000_000),
            ("9223372036.854775807", i64::MAX),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_custom_quantity(text), Ok(nanos), "{text}");
        }
    }

    #[test]
    fn custom_values_that_cannot_be_kept_exactly_are_refused() {
        let too_precise = ["0.0000000001", "1.1234567891", "3.0000000005"];
        for text in too_precise {
            assert_eq!(
                parse_custom_quantity(text),
                Err(CustomUsageError::TooPrecise(text.into())),
                "{text}"
            );
        }
        for text in ["9223372036.854775808", "10000000000", "99999999999999999999999"] {
            assert_eq!(
                parse_custom_quantity(text),
                Err(CustomUsageError::TooLarge(text.into())),
                "{text}"
            );
        }
        for text in ["", "-1", "+1", "1.", ".5", "1e3", " 1", "1,5", "0x10", "1.2.3", "NaN"] {
            assert_eq!(
                parse_custom_quantity(text),
                Err(CustomUsageError::NotADecimal(text.into())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn stored_quantities_round_trip_exactly_through_decimals() {
        for text in [
            "0",
            "1",
            "0.000000001",
            "12.5",
            "532",
            "9223372036.854775807",
            "0.1",
            "0.3",
        ] {
            let nanos = parse_custom_quantity(text).expect("valid");
            let value = to_decimal("tokens", nanos);
            assert_eq!(value, dec(text), "{text}");
            assert_eq!(value.to_string(), text, "shown without trailing zeros");
            assert_eq!(from_decimal("tokens", value), Ok(nanos), "{text}");
        }
        // 0.1 + 0.2 is exactly 0.3 in nano-units.
        let sum = parse_custom_quantity("0.1").expect("valid") + parse_custom_quantity("0.2").expect("valid");
        assert_eq!(to_decimal("tokens", sum), dec("0.3"));
        // Built-in meters are integers in their base unit.
        assert_eq!(to_decimal("requests", 7), dec("7"));
        assert_eq!(from_decimal("requests", dec("7.000")), Ok(7));
        assert_eq!(from_decimal("duration_us", dec("-3")), Ok(-3));
        assert_eq!(to_decimal("custom.requests", 1), dec("0.000000001"));
    }

    #[test]
    fn decimals_a_meter_cannot_hold_are_refused() {
        assert!(matches!(
            from_decimal("requests", dec("1.5")),
            Err(QuantityError::TooPrecise { digits: 0, .. })
        ));
        assert!(matches!(
            from_decimal("tokens", dec("0.0000000001")),
            Err(QuantityError::TooPrecise { digits: 9, .. })
        ));
        assert!(matches!(
            from_decimal("tokens", dec("9223372036.854775808")),
            Err(QuantityError::OutOfRange { .. })
        ));
        assert!(matches!(
            from_decimal("requests", dec("9223372036854775808")),
            Err(QuantityError::OutOfRange { .. })
        ));
    }

    #[test]
    fn custom_names_that_collide_with_built_in_meters_get_a_prefix() {
        let column = |name: &str| custom_meter_column(name).map(Cow::into_owned);
        assert_eq!(column("tokens"), Ok("tokens".into()));
        assert_eq!(column("gpu.seconds"), Ok("gpu.seconds".into()));
        for meter in Meter::ALL {
            assert_eq!(column(meter.as_str()), Ok(format!("custom.{}", meter.as_str())));
        }
        // A name that already looks prefixed is prefixed again: no two names share a column.
        assert_eq!(column("custom.requests"), Ok("custom.custom.requests".into()));
        assert_eq!(column("custom.tokens"), Ok("custom.custom.tokens".into()));
        assert_eq!(column("Tokens"), Err(CustomUsageError::BadName("Tokens".into())));
        assert_eq!(column(""), Err(CustomUsageError::BadName(String::new())));
        assert!(column(&"x".repeat(65)).is_err());
        for name in ["tokens", "requests", "custom.requests", &"x".repeat(64)] {
            let stored = column(name).expect("valid");
            assert!(is_custom(&stored) && is_meter_column(&stored), "{stored}");
        }
        assert!(!is_meter_column("tokens?") && !is_meter_column("custom.Tokens") && !is_meter_column(""));
    }

    #[test]
    fn quantities_are_shown_as_integers_or_exact_decimal_strings() {
        assert_eq!(Quantity::of("requests", 12), Quantity::Integer(12));
        for (nanos, text) in [
            (0, "0"),
            (1, "0.000000001"),
            (12_500_000_000, "12.5"),
            (-1_500_000_000, "-1.5"),
        ] {
            assert_eq!(Quantity::of_total("tokens", nanos), Quantity::Decimal(text.into()));
            assert_eq!(
                Quantity::of_total("tokens", nanos).to_string(),
                to_decimal("tokens", nanos as i64).to_string()
            );
        }
        let beyond_i64 = i128::from(i64::MAX) * 3 + 7;
        assert_eq!(
            Quantity::of_total("tokens", beyond_i64),
            Quantity::Decimal("27670116110.564327428".into())
        );
        assert_eq!(
            Quantity::of_total("bytes_out", beyond_i64),
            Quantity::Integer(beyond_i64)
        );
        let back: Vec<Quantity> = serde_json::from_str(r#"[12, -3, "0.5"]"#).expect("json");
        assert_eq!(
            back,
            [
                Quantity::Integer(12),
                Quantity::Integer(-3),
                Quantity::Decimal("0.5".into())
            ]
        );
        let value: Quantity = serde_json::from_value(serde_json::json!(7)).expect("from a Value too");
        assert_eq!(value, Quantity::Integer(7));
        assert!(serde_json::from_str::<Quantity>("1.5").is_err(), "a float is not exact");
        assert_eq!(Quantity::of("tokens", 12_500_000_000), Quantity::Decimal("12.5".into()));
        assert_eq!(
            Quantity::of("custom.requests", 3_000_000_000),
            Quantity::Decimal("3".into())
        );
        assert_eq!(
            serde_json::to_string(&[Quantity::of("requests", 12), Quantity::of("tokens", 1)]).expect("json"),
            r#"[12,"0.000000001"]"#
        );
        let big = Decimal::from(i64::MAX) + Decimal::ONE;
        assert_eq!(
            Quantity::of_decimal("bytes_in", big),
            Quantity::Integer(9_223_372_036_854_775_808)
        );
        assert_eq!(Quantity::of_decimal("bytes_in", dec("5.00")), Quantity::Integer(5));
        assert_eq!(Quantity::of_decimal("tokens", dec("5.00")).to_string(), "5");
    }
}
