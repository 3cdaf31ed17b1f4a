//! Exact decimal arithmetic for money and quantities.
//!
//! `rust_decimal` keeps 96 bits of mantissa and at most 28 decimal places;
//! its operators silently round a result that needs more. Billing must not,
//! so every operation here returns either the exact result or `None`. The
//! results are normalized (no trailing zeros after the point).

use rust_decimal::Decimal;

/// Largest mantissa a `Decimal` holds: 2^96 - 1.
const MAX_MANTISSA: u128 = (1 << 96) - 1;

/// `m × 10^-scale` as a `Decimal`, if it is representable exactly.
fn fit(mut mantissa: i128, mut scale: u32) -> Option<Decimal> {
    while scale > Decimal::MAX_SCALE || mantissa.unsigned_abs() > MAX_MANTISSA {
        // Only trailing zeros may go: anything else would round.
        if scale == 0 || mantissa % 10 != 0 {
            return None;
        }
        mantissa /= 10;
        scale -= 1;
    }
    Decimal::try_from_i128_with_scale(mantissa, scale)
        .ok()
        .map(|d| d.normalize())
}

fn pow10(exponent: u32) -> Option<i128> {
    10i128.checked_pow(exponent)
}

/// `a + b`, exactly.
pub fn add(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    let scale = a.scale().max(b.scale());
    let ma = a.mantissa().checked_mul(pow10(scale - a.scale())?)?;
    let mb = b.mantissa().checked_mul(pow10(scale - b.scale())?)?;
    fit(ma.checked_add(mb)?, scale)
}

/// `a - b`, exactly.
pub fn sub(a: Decimal, b: Decimal) -> Option<Decimal> {
    add(a, -b)
}

/// `a × b`, exactly.
pub fn mul(a: Decimal, b: Decimal) -> Option<Decimal> {
    let (a, b) = (a.normalize(), b.normalize());
    fit(a.mantissa().checked_mul(b.mantissa())?, a.scale() + b.scale())
}

/// `a ÷ b`, if the quotient is a decimal of at most 28 places (so `1 ÷ 3`
/// is `None`).
pub fn div(a: Decimal, b: Decimal) -> Option<Decimal> {
    if b.is_zero() {
        return None;
    }
    let quotient = a.checked_div(b)?;
    (mul(quotient, b)? == a).then(|| quotient.normalize())
}

/// `⌈a ÷ b⌉` for `a ≥ 0`, `b > 0`, computed without trusting a rounded
/// quotient: the estimate is corrected with exact products.
pub fn div_ceil(a: Decimal, b: Decimal) -> Option<Decimal> {
    if a.is_sign_negative() || b <= Decimal::ZERO {
        return None;
    }
    let mut whole = a.checked_div(b)?.trunc();
    while mul(whole, b)? > a {
        whole = sub(whole, Decimal::ONE)?;
    }
    while mul(add(whole, Decimal::ONE)?, b)? <= a {
        whole = add(whole, Decimal::ONE)?;
    }
    if mul(whole, b)? == a {
        Some(whole)
    } else {
        add(whole, Decimal::ONE)
    }
}

/// `d` written with at least `scale` decimal places (`0.4` → `0.40`), if
/// that fits; the value does not change.
pub fn with_min_scale(d: Decimal, scale: u32) -> Option<Decimal> {
    if d.scale() >= scale {
        return Some(d);
    }
    let mantissa = d.mantissa().checked_mul(pow10(scale - d.scale())?)?;
    if scale > Decimal::MAX_SCALE || mantissa.unsigned_abs() > MAX_MANTISSA {
        return None;
    }
    Decimal::try_from_i128_with_scale(mantissa, scale).ok()
}

/// Whether `1 ÷ d` is a finite decimal, i.e. `d > 0` and, as a reduced
/// fraction, its numerator has no prime factor other than 2 and 5. Dividing
/// by such a number never needs rounding (1000, 1_000_000, 1024, 0.5 do;
/// 3 or 60 do not).
pub fn has_finite_reciprocal(d: Decimal) -> bool {
    if d <= Decimal::ZERO {
        return false;
    }
    let mut m = d.normalize().mantissa();
    for factor in [2, 5] {
        while m % factor == 0 {
            m /= factor;
        }
    }
    m == 1
}

/// Parses a non-negative decimal written as plain ASCII digits with at most
/// one decimal point: `"0.20"`, `"1000000"`. No sign, exponent or `_`.
pub fn parse_non_negative(text: &str) -> Result<Decimal, String> {
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return Err(format!(
            "{text:?} is not a decimal number >= 0 (digits with an optional decimal point, e.g. \"0.20\")"
        ));
    }
    if fraction.is_some_and(|f| f.len() > Decimal::MAX_SCALE as usize) {
        return Err(format!("{text:?} has more than {} decimal places", Decimal::MAX_SCALE));
    }
    Decimal::from_str_exact(text).map_err(|_| format!("{text:?} has more digits than a decimal can hold exactly (28)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    #[test]
    fn arithmetic_is_exact_and_normalized() {
        assert_eq!(add(d("0.1"), d("0.2")), Some(d("0.3")));
        assert_eq!(sub(d("1.50"), d("0.5")).map(|x| x.to_string()), Some("1".into()));
        assert_eq!(
            mul(d("1100000"), d("0.0000166667")).map(|x| x.to_string()),
            Some("18.33337".into())
        );
        assert_eq!(mul(d("3000000000000"), d("0.0000005")), Some(d("1500000")));
        assert_eq!(div(d("400000"), d("1000000")), Some(d("0.4")));
        assert_eq!(div(d("1"), d("1024")), Some(d("0.0009765625")));
    }

    #[test]
    fn results_that_would_round_are_refused() {
        assert_eq!(div(d("1"), d("3")), None);
        assert_eq!(div(d("1"), d("0")), None);
        // 29 decimal places, or more than 96 bits of digits.
        assert_eq!(mul(d("0.00000000000001"), d("0.000000000000001")), None);
        assert_eq!(mul(d("79228162514264337593543950335"), d("2")), None);
        assert_eq!(
            add(d("79228162514264337593543950335"), d("0.1")),
            None,
            "30 significant digits"
        );
        // Trailing zeros are not digits that matter.
        assert_eq!(
            mul(d("10000000000000000000000000000"), d("0.0000000000000000000000000001")),
            Some(d("1"))
        );
    }

    #[test]
    fn ceiling_division() {
        assert_eq!(div_ceil(d("10"), d("5")), Some(d("2")));
        assert_eq!(div_ceil(d("11"), d("5")), Some(d("3")));
        assert_eq!(div_ceil(d("10"), d("3")), Some(d("4")));
        assert_eq!(div_ceil(d("9"), d("3")), Some(d("3")));
        assert_eq!(div_ceil(d("0"), d("3")), Some(d("0")));
        assert_eq!(div_ceil(d("0.5"), d("0.25")), Some(d("2")));
        assert_eq!(div_ceil(d("0.50001"), d("0.25")), Some(d("3")));
        assert_eq!(div_ceil(d("1"), d("0")), None);
    }

    #[test]
    fn finite_reciprocals() {
        for yes in ["1", "1000", "1000000", "1024", "0.5", "0.01", "0.05", "2.5"] {
            assert!(has_finite_reciprocal(d(yes)), "{yes}");
        }
        for no in ["3", "60", "0.3", "0", "-1"] {
            assert!(!has_finite_reciprocal(d(no)), "{no}");
        }
    }

    #[test]
    fn minimum_scale_pads_without_changing_the_value() {
        assert_eq!(with_min_scale(d("0.4"), 2).map(|x| x.to_string()), Some("0.40".into()));
        assert_eq!(with_min_scale(d("18"), 2).map(|x| x.to_string()), Some("18.00".into()));
        assert_eq!(
            with_min_scale(d("1.234"), 2).map(|x| x.to_string()),
            Some("1.234".into())
        );
    }

    #[test]
    fn parsing_takes_plain_decimals_only() {
        assert_eq!(parse_non_negative("0.20").map(|x| x.to_string()), Ok("0.20".into()));
        assert_eq!(parse_non_negative("1000000"), Ok(d("1000000")));
        for bad in ["", "-1", "+1", "1e6", ".5", "5.", "1_000", "0.2.0", " 1", "inf", "0x10"] {
            assert!(parse_non_negative(bad).is_err(), "{bad:?}");
        }
        assert!(parse_non_negative("0.00000000000000000000000000001").is_err());
        assert!(parse_non_negative("99999999999999999999999999999999").is_err());
    }
}
