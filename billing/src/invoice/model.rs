//! What an invoice is: its id, period, plan, lines and totals, as built
//! from usage and as stored once finalized.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tidemark_core::ids::validate_name;

use super::period::{BillingZone, Period, parse_month};
use crate::pricing::TierLine;
use crate::subscriptions::PlanId;

/// The `charge` of the line a plan's minimum adds. `@` cannot start a
/// charge name, so it never collides with one.
pub const MINIMUM_CHARGE: &str = "@minimum";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Computed from the usage as it is now; never stored.
    Draft,
    /// Stored, and never changed again.
    Finalized,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Finalized => "finalized",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "draft" => Some(Status::Draft),
            "finalized" => Some(Status::Finalized),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// A charge of the plan on the period's own usage.
    Charge,
    /// What the plan's minimum adds.
    Minimum,
    /// Usage of an earlier, finalized period that arrived after it was
    /// billed.
    Correction,
}

/// One invoice line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1, 2, ... in the invoice's order.
    pub line_no: u32,
    pub kind: LineKind,
    /// The plan's charge (`[meters.NAME]`), or [`MINIMUM_CHARGE`].
    pub charge: String,
    pub description: String,
    /// The usage meter read; `None` for flat charges and the minimum.
    pub source: Option<String>,
    /// The meter's aggregated quantity (a correction: how much it grew).
    pub usage: Decimal,
    /// `usage × scale` (a correction: the difference).
    pub quantity: Decimal,
    /// The part of `quantity` the free allowance covered (a correction: the
    /// difference).
    pub allowance: Decimal,
    pub unit_price: Option<Decimal>,
    /// The tiers that priced the quantity (empty for corrections: see
    /// `correction`).
    pub tiers: Vec<TierLine>,
    /// Rounded once, at the plan's step (a correction: the difference of two
    /// rounded amounts).
    pub amount: Decimal,
    /// First minute of usage behind the line, microseconds since the epoch.
    pub usage_from: Option<i64>,
    /// One minute past the last minute of usage behind the line.
    pub usage_to: Option<i64>,
    /// Usage batches behind the line.
    pub batches: i64,
    /// A correction: the start of the period it corrects.
    pub corrects_period_start: Option<i64>,
    /// A correction: what had been billed for the charge, and what the
    /// usage rates at now.
    pub correction: Option<Correction>,
}

/// A correction's two ratings of the corrected period's charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Correction {
    /// The period corrected, `YYYY-MM`.
    pub period: String,
    /// The usage billed so far: the period's line plus earlier corrections.
    pub billed: Rating,
    /// All of the period's usage as it is now.
    pub now: Rating,
}

/// One charge rated on one quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rating {
    pub usage: Decimal,
    pub quantity: Decimal,
    pub allowance: Decimal,
    pub amount: Decimal,
    pub batches: i64,
    pub tiers: Vec<TierLine>,
}

/// An invoice: a tenant's calendar month priced by one plan version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    /// `inv_<tenant>_<YYYY-MM>`.
    pub id: String,
    pub tenant: String,
    pub period: Period,
    /// The billing time zone the period is a calendar month in.
    pub time_zone: String,
    pub plan: PlanId,
    pub currency: String,
    pub status: Status,
    pub lines: Vec<Line>,
    /// The sum of every line but the minimum's.
    pub subtotal: Decimal,
    /// The sum of every line.
    pub total: Decimal,
    /// Microseconds since the epoch.
    pub finalized_at: Option<i64>,
}

/// The id of `tenant`'s invoice for `period`.
pub fn invoice_id(tenant: &str, period: &Period) -> String {
    format!("inv_{tenant}_{}", period.label())
}

/// An invoice id taken apart: the tenant and the month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedId {
    pub tenant: String,
    pub year: i32,
    pub month: u32,
}

impl ParsedId {
    pub fn period(&self, zone: BillingZone) -> Option<Period> {
        zone.period(self.year, self.month)
    }
}

/// Takes `inv_<tenant>_<YYYY-MM>` apart (tenants may hold `_`: the month
/// is after the last one).
pub fn parse_invoice_id(id: &str) -> Option<ParsedId> {
    let rest = id.strip_prefix("inv_")?;
    let (tenant, month) = rest.rsplit_once('_')?;
    validate_name(tenant).ok()?;
    let (year, month) = parse_month(month)?;
    Some(ParsedId {
        tenant: tenant.to_owned(),
        year,
        month,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_with_any_tenant_name() {
        let period = BillingZone::Utc.period(2026, 11).expect("period");
        for tenant in ["acme", "a_b_c", "team/one:x@y", "x.y-z"] {
            let id = invoice_id(tenant, &period);
            let parsed = parse_invoice_id(&id).expect(&id);
            assert_eq!(parsed.tenant, tenant);
            assert_eq!(parsed.period(BillingZone::Utc), Some(period));
        }
        assert_eq!(invoice_id("acme", &period), "inv_acme_2026-11");
        for bad in [
            "",
            "inv_",
            "inv_acme",
            "inv__2026-11",
            "inv_acme_2026-13",
            "acme_2026-11",
            "inv_a b_2026-11",
        ] {
            assert_eq!(parse_invoice_id(bad), None, "{bad}");
        }
    }
}
