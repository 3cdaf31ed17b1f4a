//! Custom usage the app reports in a response header, e.g.
//! `tidemark-usage: tokens=532, images=2, gpu_seconds=0.25`.
//!
//! Quantities are exact decimals, kept as integer nano-units (9 decimal
//! places) so they add up without rounding. Each malformed item is refused on
//! its own; the well-formed ones in the same header still count.

use std::fmt;

/// Decimal places kept.
pub const SCALE_DIGITS: u32 = 9;
const SCALE: u64 = 10u64.pow(SCALE_DIGITS);
/// Longest meter name.
pub const MAX_NAME_LEN: usize = 64;

/// Why one `name=value` item was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadItem {
    #[error("{0:?} is not name=value")]
    NotAPair(String),
    #[error("meter name {0:?} must be 1 to 64 of a-z, 0-9, '_', '.', '-'")]
    BadName(String),
    #[error("{0:?} is not a decimal number >= 0 with at most 9 decimal places")]
    BadValue(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a header value into `(meter, nano-units)` items, each Ok or why not.
pub fn parse(header: &str) -> impl Iterator<Item = Result<(&str, u64), BadItem>> {
    header
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(parse_item)
}

fn parse_item(item: &str) -> Result<(&str, u64), BadItem> {
    let (name, value) = item.split_once('=').ok_or_else(|| BadItem::NotAPair(item.to_owned()))?;
    let (name, value) = (name.trim(), value.trim());
    let name_ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if !name_ok {
        return Err(BadItem::BadName(name.to_owned()));
    }
    Ok((name, parse_decimal(value)?))
}

/// `"12.5"` → 12_500_000_000 nano-units.
pub fn parse_decimal(text: &str) -> Result<u64, BadItem> {
    let bad = || BadItem::BadValue(text.to_owned());
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > SCALE_DIGITS as usize {
        return Err(bad());
    }
    if text.ends_with('.') {
        return Err(bad());
    }
    let too_large = || BadItem::TooLarge(text.to_owned());
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<u64>().map_err(|_| bad())? * 10u64.pow(SCALE_DIGITS - fraction.len() as u32)
    };
    whole
        .checked_mul(SCALE)
        .and_then(|w| w.checked_add(fraction))
        .ok_or_else(too_large)
}

/// Nano-units written as an exact decimal with no trailing zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal(pub u64);

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, fraction) = (self.0 / SCALE, self.0 % SCALE);
        if fraction == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{fraction:09}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let items: Vec<_> = parse("tokens=532, images=2, gpu_seconds=0.25").collect();
        assert_eq!(
            items,
            [
                Ok(("tokens", 532 * SCALE)),
                Ok(("images", 2 * SCALE)),
                Ok(("gpu_seconds", SCALE / 4))
            ]
        );
    }

    #[test]
    fn garbage_is_refused_item_by_item() {
        let items: Vec<_> =
            parse("tokens=5,junk,=3,Tokens=1,x=-1,y=1e3,z=0.1234567891,w=1.,v=.5,u=99999999999999999999, ok = 7 ,,")
                .collect();
        assert_eq!(items[0], Ok(("tokens", 5 * SCALE)));
        assert_eq!(items[1], Err(BadItem::NotAPair("junk".into())));
        assert_eq!(items[2], Err(BadItem::BadName(String::new())));
        assert_eq!(items[3], Err(BadItem::BadName("Tokens".into())));
        assert_eq!(items[4], Err(BadItem::BadValue("-1".into())));
        assert_eq!(items[5], Err(BadItem::BadValue("1e3".into())));
        assert_eq!(items[6], Err(BadItem::BadValue("0.1234567891".into())));
        assert_eq!(items[7], Err(BadItem::BadValue("1.".into())));
        assert_eq!(items[8], Err(BadItem::BadValue(".5".into())));
        assert_eq!(items[9], Err(BadItem::TooLarge("99999999999999999999".into())));
        assert_eq!(items[10], Ok(("ok", 7 * SCALE)));
        assert_eq!(items.len(), 11, "empty items are skipped");
    }

    #[test]
    fn the_largest_value_fits_and_one_more_does_not() {
        assert_eq!(parse_decimal("18446744073.709551615"), Ok(u64::MAX));
        assert!(matches!(
            parse_decimal("18446744073.709551616"),
            Err(BadItem::TooLarge(_))
        ));
    }

    #[test]
    fn decimals_print_exactly() {
        assert_eq!(Decimal(532 * SCALE).to_string(), "532");
        assert_eq!(Decimal(SCALE / 4).to_string(), "0.25");
        assert_eq!(Decimal(1).to_string(), "0.000000001");
        assert_eq!(Decimal(0).to_string(), "0");
        for text in ["0.5", "12.000000001", "3"] {
            assert_eq!(Decimal(parse_decimal(text).unwrap()).to_string(), text);
        }
    }
}
