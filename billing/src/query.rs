//! Usage queries as the API takes them: parameters in, a store query and
//! a window out, and the calendar-month folding SQL cannot do portably.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use tidemark_core::ids::validate_name;
use tidemark_core::meter::Meter;
use tidemark_core::window::MICROS_PER_MINUTE;

use crate::quantity::is_meter_column;
use crate::store::{Store, StoreError, UsageQuery, UsageRow};

/// How usage is bucketed in time (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Hour,
    Day,
    /// Calendar months.
    Month,
}

impl Window {
    pub fn parse(text: &str) -> Option<Window> {
        Some(match text {
            "minute" => Window::Minute,
            "hour" => Window::Hour,
            "day" => Window::Day,
            "month" => Window::Month,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// The fixed width the store buckets by (months are folded from days).
    fn store_width_micros(self) -> i64 {
        match self {
            Window::Minute => MICROS_PER_MINUTE,
            Window::Hour => 60 * MICROS_PER_MINUTE,
            Window::Day | Window::Month => 24 * 60 * MICROS_PER_MINUTE,
        }
    }
}

/// A refused parameter: which one (if one), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub parameter: Option<&'static str>,
    pub message: String,
}

fn bad(parameter: &'static str, message: impl Into<String>) -> ParamError {
    ParamError {
        parameter: Some(parameter),
        message: message.into(),
    }
}

/// A parsed `GET /v1/usage`.
#[derive(Debug, Clone)]
pub struct UsageRequest {
    pub query: UsageQuery,
    pub window: Window,
}

fn parse_time(parameter: &'static str, text: &str) -> Result<i64, ParamError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|e| {
            bad(
                parameter,
                format!("{text:?} is not an RFC 3339 time such as 2026-11-26T04:00:00Z ({e})"),
            )
        })
}

const KNOWN: &str = "tenant, from, to, service, meter, window, group_by";

/// A usage query's parts as either API received them, before validation.
/// Times are microseconds since the Unix epoch.
#[derive(Debug, Clone, Default)]
pub struct UsageParams<'a> {
    pub tenant: Option<&'a str>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub service: Option<&'a str>,
    pub meter: Option<&'a str>,
    pub window: Option<&'a str>,
    /// Fields to group by: `service` and `meter` (meters are always kept apart).
    pub group_by: Vec<&'a str>,
}

/// Validates a query's parts, as the HTTP and gRPC APIs both take them.
/// Errors name the parameter by its HTTP name.
pub fn usage_request(p: &UsageParams<'_>) -> Result<UsageRequest, ParamError> {
    let tenant = p.tenant.ok_or_else(|| bad("tenant", "tenant is required"))?;
    validate_name(tenant).map_err(|e| bad("tenant", format!("tenant {e}")))?;
    let mut q = UsageQuery::all(tenant);
    q.by_service = false;
    if let Some(service) = p.service {
        validate_name(service).map_err(|e| bad("service", format!("service {e}")))?;
        q.service = Some(service.to_owned());
    }
    if let Some(meter) = p.meter {
        if !is_meter_column(meter) {
            let known: Vec<_> = Meter::ALL.iter().map(|m| m.as_str()).collect();
            return Err(bad(
                "meter",
                format!(
                    "{meter:?} cannot name a meter: use a built-in one ({}) or a custom meter's name \
                     (1 to 64 of a-z 0-9 _ . -, custom.NAME for one named like a built-in)",
                    known.join(", ")
                ),
            ));
        }
        q.meter = Some(meter.to_owned());
    }
    let window = match p.window {
        None => Window::Minute,
        Some(text) => Window::parse(text)
            .ok_or_else(|| bad("window", format!("{text:?} is not one of minute, hour, day, month")))?,
    };
    for field in &p.group_by {
        match *field {
            "service" => q.by_service = true,
            "meter" => {} // always grouped: meters have different units
            other => {
                return Err(bad(
                    "group_by",
                    format!("cannot group by {other:?}; use service or meter"),
                ));
            }
        }
    }
    q.from = p.from.unwrap_or(0);
    q.to = p.to.unwrap_or(i64::MAX);
    if q.from < 0 {
        return Err(bad("from", "from must not be before 1970-01-01T00:00:00Z"));
    }
    if q.from >= q.to {
        return Err(bad("to", "to must be later than from"));
    }
    q.window_micros = window.store_width_micros();
    Ok(UsageRequest { query: q, window })
}

/// Parses the query parameters of `GET /v1/usage`, refusing unknown ones
/// and repeated ones (but `group_by`, whose fields add up).
pub fn parse_usage_request(params: &[(String, String)]) -> Result<UsageRequest, ParamError> {
    let mut p = UsageParams::default();
    let mut seen = std::collections::BTreeSet::new();
    for (key, value) in params {
        let parameter: &'static str = match key.as_str() {
            "tenant" => "tenant",
            "from" => "from",
            "to" => "to",
            "service" => "service",
            "meter" => "meter",
            "window" => "window",
            "group_by" => "group_by",
            _ => {
                return Err(ParamError {
                    parameter: None,
                    message: format!("unknown parameter {key:?}; known: {KNOWN}"),
                });
            }
        };
        if parameter != "group_by" && !seen.insert(parameter) {
            return Err(bad(parameter, format!("{parameter} is given more than once")));
        }
        match parameter {
            "tenant" => p.tenant = Some(value),
            "from" => p.from = Some(parse_time("from", value)?),
            "to" => p.to = Some(parse_time("to", value)?),
            "service" => p.service = Some(value),
            "meter" => p.meter = Some(value),
            "window" => p.window = Some(value),
            _ => p
                .group_by
                .extend(value.split(',').map(str::trim).filter(|f| !f.is_empty())),
        }
    }
    usage_request(&p)
}

/// Runs a usage request: the store's fixed-width windows, folded into
/// calendar months if asked. Both APIs answer from this.
pub async fn run(store: &Store, request: &UsageRequest) -> Result<Vec<UsageRow>, StoreError> {
    let rows = store.usage(&request.query).await?;
    Ok(if request.window == Window::Month {
        fold_months(rows)
    } else {
        rows
    })
}

/// Total quantity per meter over `rows`, exact (`i128`: no overflow).
pub fn totals(rows: &[UsageRow]) -> std::collections::BTreeMap<String, i128> {
    let mut totals = std::collections::BTreeMap::new();
    for row in rows {
        *totals.entry(row.meter.clone()).or_insert(0) += i128::from(row.quantity);
    }
    totals
}

/// Start of the calendar month (UTC) holding `unix_micros`.
pub fn month_start(unix_micros: i64) -> i64 {
    let Some(t) = DateTime::<Utc>::from_timestamp_micros(unix_micros) else {
        return unix_micros;
    };
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .map_or(unix_micros, |m| m.timestamp_micros())
}

/// Folds rows bucketed by day into calendar months; rows stay ordered.
pub fn fold_months(rows: Vec<UsageRow>) -> Vec<UsageRow> {
    let mut folded: std::collections::BTreeMap<(i64, Option<String>, String), (i64, i64)> = Default::default();
    for row in rows {
        let entry = folded
            .entry((month_start(row.window_start), row.service, row.meter))
            .or_default();
        entry.0 += row.quantity;
        entry.1 += row.batches;
    }
    folded
        .into_iter()
        .map(|((window_start, service, meter), (quantity, batches))| UsageRow {
            window_start,
            service,
            meter,
            quantity,
            batches,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_a_full_query() {
        let r = parse_usage_request(&params(&[
            ("tenant", "acme"),
            ("from", "2026-11-26T04:00:00Z"),
            ("to", "2026-11-26T06:00:00+01:00"),
            ("meter", "requests"),
            ("window", "hour"),
            ("group_by", "service,meter"),
        ]))
        .expect("valid");
        assert_eq!(r.query.tenant, "acme");
        assert_eq!(r.query.from, 1_795_665_600_000_000);
        assert_eq!(r.query.to, 1_795_669_200_000_000, "06:00+01:00 is 05:00Z");
        assert_eq!(
            (r.window, r.query.window_micros, r.query.by_service),
            (Window::Hour, 3_600_000_000, true)
        );
    }

    #[test]
    fn names_the_bad_parameter() {
        let cases = [
            (vec![], Some("tenant")),
            (vec![("tenant", "a b")], Some("tenant")),
            (vec![("tenant", "a"), ("from", "yesterday")], Some("from")),
            (vec![("tenant", "a"), ("meter", "tokens?")], Some("meter")),
            (vec![("tenant", "a"), ("window", "week")], Some("window")),
            (vec![("tenant", "a"), ("group_by", "tenant")], Some("group_by")),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-01-02T00:00:00Z"),
                    ("to", "2026-01-01T00:00:00Z"),
                ],
                Some("to"),
            ),
            (vec![("tenant", "a"), ("colour", "red")], None),
            (vec![("tenant", "a"), ("service", "x y")], Some("service")),
            (vec![("tenant", "a"), ("tenant", "b")], Some("tenant")),
            (vec![("tenant", "a"), ("from", "1969-12-31T00:00:00Z")], Some("from")),
        ];
        for (pairs, parameter) in cases {
            let err = parse_usage_request(&params(&pairs)).expect_err("invalid");
            assert_eq!(err.parameter, parameter, "{pairs:?}: {}", err.message);
        }
    }

    #[test]
    fn days_fold_into_calendar_months() {
        let day = |y, m, d| Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap().timestamp_micros();
        let row = |t, q| UsageRow {
            window_start: t,
            service: None,
            meter: "requests".into(),
            quantity: q,
            batches: 1,
        };
        let folded = fold_months(vec![
            row(day(2026, 1, 31), 1),
            row(day(2026, 2, 1), 10),
            row(day(2026, 2, 28), 100),
        ]);
        let got: Vec<_> = folded.iter().map(|r| (r.window_start, r.quantity, r.batches)).collect();
        assert_eq!(got, [(day(2026, 1, 1), 1, 1), (day(2026, 2, 1), 110, 2)]);
    }
}
