//! Rating: one tenant's usage for one period, priced by a plan. A pure
//! function: the same plan and usage always give the same lines, to the
//! last digit. Every step is exact; each line is rounded once, at the
//! plan's step with the plan's rule, and the subtotal is the sum of the
//! rounded lines.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::exact;
use super::plan::{Charge, Metered, Model, ModelKind, Plan, Pricing, Tier};
use super::rounding::Rounding;

/// A period's usage priced by a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rated {
    pub plan: String,
    pub version: u32,
    pub currency: String,
    pub rounding: Rounding,
    /// One line per charge, in the plan's order, zero amounts included.
    pub lines: Vec<RatedLine>,
    /// The sum of the lines' rounded amounts.
    pub subtotal: Decimal,
    /// Present when the subtotal is below the plan's minimum: the line that
    /// makes up the difference.
    pub minimum: Option<MinimumLine>,
    /// `subtotal` plus the minimum line's amount, if any.
    pub total: Decimal,
    /// Meters in the usage that no charge of the plan reads.
    pub unpriced_meters: Vec<String>,
}

/// How one charge priced the usage. For a flat charge the quantity is one
/// period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RatedLine {
    /// The charge's name in the plan (`[meters.NAME]`).
    pub charge: String,
    pub description: String,
    pub model: ModelKind,
    /// The usage meter read; `None` for a flat charge.
    pub source: Option<String>,
    /// The meter's quantity as given (0 when absent).
    pub usage: Decimal,
    pub scale: Decimal,
    /// `usage × scale`: the charge's quantity (GB-seconds, requests).
    pub quantity: Decimal,
    /// The part of `quantity` the free allowance covered.
    pub allowance: Decimal,
    /// `quantity - allowance`: what was priced.
    pub billable: Decimal,
    /// Prices are per this much quantity; for the package model, the
    /// package size.
    pub unit: Decimal,
    /// The price per unit (unit and flat models) or per package.
    pub unit_price: Option<Decimal>,
    /// Packages started (package model).
    pub packages: Option<Decimal>,
    /// The tiers that priced quantity (graduated: each one reached; volume:
    /// the one the whole quantity fell in).
    pub tiers: Vec<TierLine>,
    /// The exact amount, before rounding.
    pub amount_exact: Decimal,
    /// The amount rounded once, at the plan's step with its rule.
    pub amount: Decimal,
}

/// One tier's part of a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierLine {
    /// The tier's index in the plan (`tiers[i]`).
    pub tier: usize,
    /// The tier covers quantities above this...
    pub above: Decimal,
    /// ...up to and including this (`None`: unbounded).
    pub up_to: Option<Decimal>,
    /// The quantity priced in this tier.
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub flat: Decimal,
    /// `quantity × unit_price ÷ unit + flat`, exact.
    pub amount: Decimal,
}

/// The line a plan's minimum adds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinimumLine {
    pub minimum: Decimal,
    /// `minimum - subtotal`.
    pub amount: Decimal,
}

/// Why usage could not be rated.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RateError {
    #[error("usage of meter {meter:?} is negative ({quantity})")]
    NegativeUsage { meter: String, quantity: Decimal },
    /// A result needs more than a decimal's 28 significant digits; rating
    /// refuses to round anywhere but at the end of a line.
    #[error("{what} cannot be computed exactly in a 28-digit decimal")]
    Inexact { what: String },
    #[error("charge {charge:?}: no tier covers the billable quantity {quantity}")]
    NoTier { charge: String, quantity: Decimal },
}

/// Prices one tenant's usage for one period. `usage` maps meter names
/// (`requests`, `billed_duration_us`, custom meters) to the period's
/// quantity; a meter absent from it counts as 0.
pub fn rate(plan: &Plan, usage: &BTreeMap<String, Decimal>) -> Result<Rated, RateError> {
    if let Some((meter, quantity)) = usage.iter().find(|(_, q)| **q < Decimal::ZERO) {
        return Err(RateError::NegativeUsage {
            meter: meter.clone(),
            quantity: *quantity,
        });
    }
    let step_places = plan.rounding.step.scale();
    let plan_inexact = |what: &str| RateError::Inexact {
        what: format!("the {what}"),
    };
    let whole = |d: Decimal, what| exact::with_min_scale(d, step_places).ok_or_else(|| plan_inexact(what));
    let mut lines = Vec::with_capacity(plan.charges.len());
    let mut subtotal = Decimal::ZERO;
    for charge in &plan.charges {
        let line = rate_charge(charge, plan.rounding, usage)?;
        subtotal = exact::add(subtotal, line.amount).ok_or_else(|| plan_inexact("subtotal"))?;
        lines.push(line);
    }
    let subtotal = whole(subtotal, "subtotal")?;
    let minimum = match plan.minimum {
        Some(minimum) if subtotal < minimum => {
            let short = exact::sub(minimum, subtotal).ok_or_else(|| plan_inexact("minimum's difference"))?;
            Some(MinimumLine {
                minimum,
                amount: whole(short, "minimum's difference")?,
            })
        }
        _ => None,
    };
    let total = match &minimum {
        Some(line) => whole(line.minimum, "total")?,
        None => subtotal,
    };
    let unpriced_meters = usage
        .keys()
        .filter(|meter| !plan.sources().any(|source| source == meter.as_str()))
        .cloned()
        .collect();
    Ok(Rated {
        plan: plan.name.clone(),
        version: plan.version,
        currency: plan.currency.clone(),
        rounding: plan.rounding,
        lines,
        subtotal,
        minimum,
        total,
        unpriced_meters,
    })
}

/// What a model made of a billable quantity.
struct Priced {
    unit: Decimal,
    unit_price: Option<Decimal>,
    packages: Option<Decimal>,
    tiers: Vec<TierLine>,
    amount: Decimal,
}

fn inexact(charge: &Charge, what: &str) -> RateError {
    RateError::Inexact {
        what: format!("the {what} of charge {:?}", charge.name),
    }
}

fn rate_charge(charge: &Charge, rounding: Rounding, usage: &BTreeMap<String, Decimal>) -> Result<RatedLine, RateError> {
    let inexact = |what| inexact(charge, what);
    let description = charge.description.clone().unwrap_or_else(|| charge.name.clone());
    let model = charge.pricing.kind();
    let mut line = match &charge.pricing {
        Pricing::Flat { price } => RatedLine {
            charge: charge.name.clone(),
            description,
            model,
            source: None,
            usage: Decimal::ZERO,
            scale: Decimal::ONE,
            quantity: Decimal::ONE,
            allowance: Decimal::ZERO,
            billable: Decimal::ONE,
            unit: Decimal::ONE,
            unit_price: Some(*price),
            packages: None,
            tiers: Vec::new(),
            amount_exact: *price,
            amount: *price,
        },
        Pricing::Metered(metered) => {
            let used = usage.get(&metered.source).copied().unwrap_or(Decimal::ZERO);
            let quantity = exact::mul(used, metered.scale).ok_or_else(|| inexact("quantity"))?;
            let allowance = quantity.min(metered.free);
            let billable = exact::sub(quantity, allowance).ok_or_else(|| inexact("billable quantity"))?;
            let priced = price_metered(charge, metered, billable)?;
            RatedLine {
                charge: charge.name.clone(),
                description,
                model,
                source: Some(metered.source.clone()),
                usage: used,
                scale: metered.scale,
                quantity,
                allowance,
                billable,
                unit: priced.unit,
                unit_price: priced.unit_price,
                packages: priced.packages,
                tiers: priced.tiers,
                amount_exact: priced.amount,
                amount: priced.amount,
            }
        }
    };
    line.amount = rounding
        .apply(line.amount_exact)
        .ok_or_else(|| inexact("rounded amount"))?;
    Ok(line)
}

fn price_metered(charge: &Charge, metered: &Metered, billable: Decimal) -> Result<Priced, RateError> {
    let inexact = |what| inexact(charge, what);
    let per_unit = |quantity: Decimal, price: Decimal, unit: Decimal| {
        exact::mul(quantity, price)
            .and_then(|product| exact::div(product, unit))
            .ok_or_else(|| inexact("amount"))
    };
    match &metered.model {
        Model::Unit { price, unit } => Ok(Priced {
            unit: *unit,
            unit_price: Some(*price),
            packages: None,
            tiers: Vec::new(),
            amount: per_unit(billable, *price, *unit)?,
        }),
        Model::Package { price, size } => {
            let packages = exact::div_ceil(billable, *size).ok_or_else(|| inexact("package count"))?;
            Ok(Priced {
                unit: *size,
                unit_price: Some(*price),
                packages: Some(packages),
                tiers: Vec::new(),
                amount: exact::mul(packages, *price).ok_or_else(|| inexact("amount"))?,
            })
        }
        Model::Graduated { tiers, unit } => {
            let mut lines = Vec::new();
            // Quantity up to `above` has been priced.
            let mut above = Decimal::ZERO;
            for (index, tier) in tiers.iter().enumerate() {
                if billable <= above {
                    break;
                }
                let top = tier.up_to.map_or(billable, |bound| bound.min(billable));
                let quantity = exact::sub(top, above).ok_or_else(|| inexact("tier quantity"))?;
                let priced = per_unit(quantity, tier.price, *unit)?;
                lines.push(tier_line(index, above, tier, quantity, priced).ok_or_else(|| inexact("tier amount"))?);
                above = top;
            }
            if billable > above {
                return Err(RateError::NoTier {
                    charge: charge.name.clone(),
                    quantity: billable,
                });
            }
            let amount = sum(lines.iter().map(|l| l.amount)).ok_or_else(|| inexact("amount"))?;
            Ok(Priced {
                unit: *unit,
                unit_price: None,
                packages: None,
                tiers: lines,
                amount,
            })
        }
        Model::Volume { tiers, unit } => {
            let mut lines = Vec::new();
            if !billable.is_zero() {
                let index = tiers
                    .iter()
                    .position(|t| t.up_to.is_none_or(|bound| billable <= bound))
                    .ok_or_else(|| RateError::NoTier {
                        charge: charge.name.clone(),
                        quantity: billable,
                    })?;
                let above = index
                    .checked_sub(1)
                    .and_then(|i| tiers[i].up_to)
                    .unwrap_or(Decimal::ZERO);
                let tier = &tiers[index];
                let priced = per_unit(billable, tier.price, *unit)?;
                lines.push(tier_line(index, above, tier, billable, priced).ok_or_else(|| inexact("tier amount"))?);
            }
            let amount = sum(lines.iter().map(|l| l.amount)).ok_or_else(|| inexact("amount"))?;
            Ok(Priced {
                unit: *unit,
                unit_price: lines.first().map(|l| l.unit_price),
                packages: None,
                tiers: lines,
                amount,
            })
        }
    }
}

/// A tier's line: `priced` (its quantity × price ÷ unit) plus its flat.
fn tier_line(index: usize, above: Decimal, tier: &Tier, quantity: Decimal, priced: Decimal) -> Option<TierLine> {
    Some(TierLine {
        tier: index,
        above,
        up_to: tier.up_to,
        quantity,
        unit_price: tier.price,
        flat: tier.flat,
        amount: exact::add(priced, tier.flat)?,
    })
}

fn sum(mut amounts: impl Iterator<Item = Decimal>) -> Option<Decimal> {
    amounts.try_fold(Decimal::ZERO, exact::add)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    /// A plan with cents rounded by `rule` and the given charges.
    fn plan_with(rule: &str, extra: &str) -> Plan {
        let text = format!(
            "name = \"test\"\nversion = 1\ncurrency = \"USD\"\n\
             rounding = {{ step = \"0.01\", rule = \"{rule}\" }}\n{extra}"
        );
        Plan::from_toml(Path::new("test.toml"), &text).unwrap()
    }

    fn plan(extra: &str) -> Plan {
        plan_with("half_up", extra)
    }

    fn usage(items: &[(&str, &str)]) -> BTreeMap<String, Decimal> {
        items.iter().map(|(meter, q)| (meter.to_string(), d(q))).collect()
    }

    fn rate_one(plan: &Plan, meter: &str, quantity: &str) -> RatedLine {
        let rated = rate(plan, &usage(&[(meter, quantity)])).unwrap();
        rated.lines.into_iter().next().unwrap()
    }

    #[test]
    fn allowance_below_at_and_above_the_free_quantity() {
        let plan = plan("[meters.requests]\nmodel = \"unit\"\nprice = \"0.01\"\nfree = 100\n");
        let below = rate_one(&plan, "requests", "99");
        assert_eq!(
            (below.allowance, below.billable, below.amount),
            (d("99"), d("0"), d("0"))
        );
        let at = rate_one(&plan, "requests", "100");
        assert_eq!((at.allowance, at.billable, at.amount), (d("100"), d("0"), d("0")));
        let above = rate_one(&plan, "requests", "101");
        assert_eq!((above.allowance, above.billable), (d("100"), d("1")));
        assert_eq!(above.amount.to_string(), "0.01");
        assert_eq!(above.unit_price, Some(d("0.01")));
    }

    #[test]
    fn unit_prices_per_a_unit_of_quantity() {
        let plan = plan("[meters.requests]\nmodel = \"unit\"\nunit = 1_000_000\nprice = \"0.20\"\n");
        let line = rate_one(&plan, "requests", "2500000");
        assert_eq!(line.unit, d("1000000"));
        assert_eq!(line.amount_exact, d("0.5"));
        assert_eq!(line.amount.to_string(), "0.50");
    }

    const TIERS: &str = "tiers = [\n  { up_to = 100, price = \"1\" },\n  { up_to = \"inf\", price = \"0.5\" },\n]\n";

    #[test]
    fn graduated_at_a_tier_boundary_and_one_past() {
        let plan = plan(&format!("[meters.requests]\nmodel = \"graduated\"\n{TIERS}"));
        let at = rate_one(&plan, "requests", "100");
        assert_eq!(at.tiers.len(), 1);
        assert_eq!((at.tiers[0].quantity, at.tiers[0].up_to), (d("100"), Some(d("100"))));
        assert_eq!(at.amount.to_string(), "100.00");

        let past = rate_one(&plan, "requests", "101");
        assert_eq!(past.tiers.len(), 2);
        assert_eq!((past.tiers[0].quantity, past.tiers[0].amount), (d("100"), d("100")));
        let second = &past.tiers[1];
        assert_eq!((second.tier, second.above, second.up_to), (1, d("100"), None));
        assert_eq!(
            (second.quantity, second.unit_price, second.amount),
            (d("1"), d("0.5"), d("0.5"))
        );
        assert_eq!(past.amount.to_string(), "100.50");
        assert_eq!(past.unit_price, None);
    }

    #[test]
    fn volume_at_a_tier_boundary_and_one_past() {
        let plan = plan(&format!("[meters.requests]\nmodel = \"volume\"\n{TIERS}"));
        let at = rate_one(&plan, "requests", "100");
        assert_eq!(at.tiers.len(), 1);
        assert_eq!((at.tiers[0].tier, at.tiers[0].quantity), (0, d("100")));
        assert_eq!(at.amount.to_string(), "100.00");

        // One more and all 101 fall to the cheaper tier.
        let past = rate_one(&plan, "requests", "101");
        assert_eq!(past.tiers.len(), 1);
        let tier = &past.tiers[0];
        assert_eq!((tier.tier, tier.above, tier.quantity), (1, d("100"), d("101")));
        assert_eq!(past.unit_price, Some(d("0.5")));
        assert_eq!(past.amount.to_string(), "50.50");

        let none = rate_one(&plan, "requests", "0");
        assert!(none.tiers.is_empty());
        assert_eq!(none.amount.to_string(), "0.00");
    }

    #[test]
    fn tier_flat_amounts_apply_once_a_tier_is_reached() {
        let tiers = "tiers = [\n  { up_to = 100, price = \"1\", flat = \"10\" },\n  \
                     { up_to = \"inf\", price = \"0.5\", flat = \"5\" },\n]\n";
        let graduated = plan(&format!("[meters.requests]\nmodel = \"graduated\"\n{tiers}"));
        assert_eq!(rate_one(&graduated, "requests", "0").amount.to_string(), "0.00");
        assert_eq!(rate_one(&graduated, "requests", "1").amount.to_string(), "11.00");
        assert_eq!(rate_one(&graduated, "requests", "100").amount.to_string(), "110.00");
        assert_eq!(rate_one(&graduated, "requests", "101").amount.to_string(), "115.50");

        let volume = plan(&format!("[meters.requests]\nmodel = \"volume\"\n{tiers}"));
        assert_eq!(rate_one(&volume, "requests", "0").amount.to_string(), "0.00");
        assert_eq!(rate_one(&volume, "requests", "100").amount.to_string(), "110.00");
        assert_eq!(rate_one(&volume, "requests", "101").amount.to_string(), "55.50");
    }

    #[test]
    fn the_allowance_comes_off_before_the_tiers_and_units_apply() {
        let plan = plan(&format!(
            "[meters.requests]\nmodel = \"graduated\"\nfree = 50\nunit = 10\n{TIERS}"
        ));
        // 160 - 50 free = 110 billable: 100 at 1 per 10, 10 at 0.5 per 10.
        let line = rate_one(&plan, "requests", "160");
        assert_eq!((line.allowance, line.billable), (d("50"), d("110")));
        assert_eq!(line.amount.to_string(), "10.50");
    }

    #[test]
    fn packages_at_exact_multiples_and_one_more() {
        let plan = plan("[meters.tokens]\nmodel = \"package\"\npackage_size = 1000\nprice = \"2\"\n");
        for (tokens, packages, amount) in [
            ("0", "0", "0.00"),
            ("1", "1", "2.00"),
            ("1000", "1", "2.00"),
            ("1001", "2", "4.00"),
            ("2000", "2", "4.00"),
            ("2001", "3", "6.00"),
            ("0.5", "1", "2.00"),
        ] {
            let line = rate_one(&plan, "tokens", tokens);
            assert_eq!(line.packages, Some(d(packages)), "{tokens}");
            assert_eq!(line.amount.to_string(), amount, "{tokens}");
            assert_eq!(line.unit, d("1000"));
        }
        let with_free =
            self::plan("[meters.tokens]\nmodel = \"package\"\npackage_size = 1000\nprice = \"2\"\nfree = 500\n");
        assert_eq!(rate_one(&with_free, "tokens", "1500").packages, Some(d("1")));
        assert_eq!(rate_one(&with_free, "tokens", "1501").packages, Some(d("2")));
    }

    #[test]
    fn flat_charges_cost_their_price_whatever_the_usage() {
        let plan = plan("[meters.platform]\nmodel = \"flat\"\nprice = \"9.99\"\ndescription = \"Platform fee\"\n");
        let rated = rate(&plan, &BTreeMap::new()).unwrap();
        let line = &rated.lines[0];
        assert_eq!((line.source.as_deref(), line.quantity), (None, d("1")));
        assert_eq!(line.description, "Platform fee");
        assert_eq!(line.amount.to_string(), "9.99");
        assert_eq!(rated.total.to_string(), "9.99");
    }

    #[test]
    fn the_minimum_tops_up_a_smaller_subtotal_only() {
        let plan = plan("minimum = \"5.00\"\n[meters.requests]\nmodel = \"unit\"\nprice = \"0.01\"\n");
        let rated = rate(&plan, &usage(&[("requests", "300")])).unwrap();
        assert_eq!(rated.subtotal.to_string(), "3.00");
        let minimum = rated.minimum.as_ref().unwrap();
        assert_eq!(
            (minimum.minimum, minimum.amount.to_string()),
            (d("5"), "2.00".to_owned())
        );
        assert_eq!(rated.total.to_string(), "5.00");

        let nothing = rate(&plan, &BTreeMap::new()).unwrap();
        assert_eq!(nothing.minimum.as_ref().map(|m| m.amount), Some(d("5")));
        assert_eq!(nothing.total.to_string(), "5.00");

        for (requests, total) in [("500", "5.00"), ("700", "7.00")] {
            let rated = rate(&plan, &usage(&[("requests", requests)])).unwrap();
            assert_eq!(rated.minimum, None, "{requests}");
            assert_eq!(rated.total.to_string(), total);
        }
    }

    #[test]
    fn each_rounding_rule_applies_to_each_line_once() {
        // Two lines of 0.125 each: every line is rounded on its own, and the
        // subtotal is the sum of the rounded lines.
        let charges = "[meters.a]\nmodel = \"unit\"\nprice = \"0.125\"\n\
                       [meters.b]\nmodel = \"unit\"\nprice = \"0.125\"\n";
        let usage = usage(&[("a", "1"), ("b", "1")]);
        for (rule, line, subtotal) in [
            ("half_up", "0.13", "0.26"),
            ("half_even", "0.12", "0.24"),
            ("up", "0.13", "0.26"),
            ("down", "0.12", "0.24"),
        ] {
            let rated = rate(&plan_with(rule, charges), &usage).unwrap();
            for l in &rated.lines {
                assert_eq!(l.amount_exact, d("0.125"), "{rule}");
                assert_eq!(l.amount.to_string(), line, "{rule}");
            }
            assert_eq!(rated.subtotal.to_string(), subtotal, "{rule}");
        }
    }

    #[test]
    fn derived_meters_scale_their_source() {
        // GB-seconds at 512 MB from microseconds.
        let plan = plan(
            "[meters.gb_seconds]\nsource = \"billed_duration_us\"\nscale = \"0.0000005\"\n\
             model = \"unit\"\nprice = \"0.0000166667\"\n",
        );
        let line = rate_one(&plan, "billed_duration_us", "1500");
        assert_eq!(line.source.as_deref(), Some("billed_duration_us"));
        assert_eq!((line.usage, line.quantity), (d("1500"), d("0.00075")));
        assert_eq!(line.amount_exact, d("0.000000012500025"));
        assert_eq!(line.amount.to_string(), "0.00");
    }

    #[test]
    fn lines_follow_the_plan_and_unread_meters_are_listed() {
        let plan = plan(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\n\
             [meters.bytes_out]\nmodel = \"unit\"\nprice = \"1\"\n",
        );
        let rated = rate(&plan, &usage(&[("requests", "2"), ("tokens", "5"), ("errors", "1")])).unwrap();
        let charges: Vec<&str> = rated.lines.iter().map(|l| l.charge.as_str()).collect();
        assert_eq!(charges, ["requests", "bytes_out"]);
        assert_eq!(rated.lines[1].usage, Decimal::ZERO, "absent meters count 0");
        assert_eq!(rated.unpriced_meters, ["errors", "tokens"]);
        assert_eq!(
            (rated.plan.as_str(), rated.version, rated.currency.as_str()),
            ("test", 1, "USD")
        );
    }

    #[test]
    fn quantities_beyond_the_last_tier_are_refused_not_dropped() {
        // Only a plan built in code can lack an unbounded last tier.
        for model in ["graduated", "volume"] {
            let mut plan = plan(&format!("[meters.requests]\nmodel = \"{model}\"\n{TIERS}"));
            let Pricing::Metered(Metered {
                model: Model::Graduated { tiers, .. } | Model::Volume { tiers, .. },
                ..
            }) = &mut plan.charges[0].pricing
            else {
                panic!("tiered")
            };
            tiers[1].up_to = Some(d("200"));
            assert_eq!(
                rate_one(&plan, "requests", "200").amount.to_string(),
                if model == "volume" { "100.00" } else { "150.00" }
            );
            let err = rate(&plan, &usage(&[("requests", "201")])).unwrap_err();
            assert_eq!(
                err,
                RateError::NoTier {
                    charge: "requests".into(),
                    quantity: d("201")
                },
                "{model}"
            );
        }
    }

    #[test]
    fn negative_usage_is_refused() {
        let plan = plan("[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\n");
        let err = rate(&plan, &usage(&[("requests", "5"), ("tokens", "-1")])).unwrap_err();
        assert_eq!(
            err,
            RateError::NegativeUsage {
                meter: "tokens".into(),
                quantity: d("-1")
            }
        );
    }

    #[test]
    fn amounts_beyond_a_decimal_are_refused_not_rounded() {
        let plan = plan("[meters.requests]\nmodel = \"unit\"\nprice = \"0.0000000000007\"\n");
        // 12345678901234567890123456789 × 7 needs 29 significant digits, more than 96 bits hold.
        let err = rate(&plan, &usage(&[("requests", "1234567890123456789012345678.9")])).unwrap_err();
        assert!(
            matches!(&err, RateError::Inexact { what } if what.contains("\"requests\"")),
            "{err}"
        );
    }

    #[test]
    fn rated_money_serializes_as_decimal_strings() {
        let plan = plan("[meters.requests]\nmodel = \"unit\"\nprice = \"0.20\"\nunit = 1000000\n");
        let rated = rate(&plan, &usage(&[("requests", "2000000")])).unwrap();
        let json = serde_json::to_value(&rated).unwrap();
        assert_eq!(json["lines"][0]["amount"], "0.40");
        assert_eq!(json["lines"][0]["model"], "unit");
        assert_eq!(json["total"], "0.40");
        assert_eq!(json["rounding"]["rule"], "half_up");
        let back: Rated = serde_json::from_value(json).unwrap();
        assert_eq!(back, rated);
    }
}
