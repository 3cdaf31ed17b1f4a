//! A price plan, as loaded and validated from its TOML file by
//! `Plan::load`. Every value here has passed validation: prices are
//! exact decimals ≥ 0, tiers ascend and end with an unbounded one, and so on.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rounding::Rounding;

/// A price plan: what one tenant pays for one period's usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The plan's name, e.g. `aws-lambda-x86`.
    pub name: String,
    /// The plan's version; a changed price is a new version.
    pub version: u32,
    /// ISO 4217 code of every amount in the plan, e.g. `USD`.
    pub currency: String,
    pub description: Option<String>,
    /// The least a period costs: when the lines add up to less, a line
    /// makes up the difference. A multiple of the rounding step.
    pub minimum: Option<Decimal>,
    /// How each line's amount is rounded, once.
    pub rounding: Rounding,
    /// The charges, in the order the file lists them.
    pub charges: Vec<Charge>,
}

/// One charge of a plan: the table `[meters.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The table's name under `meters`; the usage meter it reads unless
    /// `source` says otherwise.
    pub name: String,
    pub description: Option<String>,
    pub pricing: Pricing,
}

/// How a charge turns usage into money.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pricing {
    /// A fixed price for the period, whatever the usage.
    Flat { price: Decimal },
    /// Priced per unit of a metered quantity.
    Metered(Metered),
}

/// A charge on a metered quantity: `quantity = usage[source] × scale`; the
/// first `free` of it costs nothing; the rest (the billable quantity) is
/// priced by `model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    /// The usage meter read: a built-in one (`requests`,
    /// `billed_duration_us`, ...) or a custom one.
    pub source: String,
    /// How the period's per-minute rollups of `source` become the one
    /// quantity rated. Rating itself never looks at it: the caller
    /// aggregates (see `crate::invoice::aggregate`).
    pub aggregation: Aggregation,
    /// Exact multiplier from the meter's unit to the charge's
    /// (`billed_duration_us` × 0.0000005 = GB-seconds at 512 MB).
    pub scale: Decimal,
    /// Allowance per period, in the charge's quantity (after `scale`).
    pub free: Decimal,
    pub model: Model,
}

/// The pricing models of a metered charge. Prices are per `unit` of
/// quantity (per 1 by default, per 1,000,000 for "per million requests");
/// tier bounds and package sizes are in quantity, like `free`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Model {
    /// `billable × price ÷ unit`.
    Unit { price: Decimal, unit: Decimal },
    /// Each tier prices the part of the billable quantity within its bounds;
    /// a tier's `flat` is added when any quantity falls in it.
    Graduated { tiers: Vec<Tier>, unit: Decimal },
    /// The tier the whole billable quantity falls in prices all of it, plus
    /// that tier's `flat`; nothing when the billable quantity is 0.
    Volume { tiers: Vec<Tier>, unit: Decimal },
    /// `price` per started package of `size`: `⌈billable ÷ size⌉ × price`.
    Package { price: Decimal, size: Decimal },
}

/// A tier: quantities above the previous tier's `up_to`, up to and including
/// this one's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Upper bound, inclusive; `None` is unbounded (`"inf"`), only last.
    pub up_to: Option<Decimal>,
    /// Price per `unit` of quantity in this tier.
    pub price: Decimal,
    /// Fixed amount added when the tier applies.
    pub flat: Decimal,
}

/// How a period's usage of a meter becomes one quantity. Usage is kept as
/// per-minute rollups (per service); every aggregation first adds the
/// services up per minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The sum of every minute's quantity (the default).
    #[default]
    Sum,
    /// The number of usage batches that reported the meter.
    Count,
    /// The largest quantity of any one minute.
    Max,
    /// The quantity of the last minute with usage.
    Latest,
    /// The number of distinct minutes with a non-zero quantity (active
    /// minutes): rollups keep no other identity to count.
    UniqueCount,
    /// The time-weighted mean over the whole period: each minute's quantity
    /// held for that minute, minutes without usage at 0, divided by the
    /// minutes in the period (rounded half-even to 9 decimal places when
    /// the division does not end).
    TimeWeighted,
}

impl Aggregation {
    pub const ALL: [Aggregation; 6] = [
        Aggregation::Sum,
        Aggregation::Count,
        Aggregation::Max,
        Aggregation::Latest,
        Aggregation::UniqueCount,
        Aggregation::TimeWeighted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Count => "count",
            Aggregation::Max => "max",
            Aggregation::Latest => "latest",
            Aggregation::UniqueCount => "unique_count",
            Aggregation::TimeWeighted => "time_weighted",
        }
    }

    pub fn parse(name: &str) -> Option<Aggregation> {
        Aggregation::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// The model names used in plan files and rated lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Flat,
    Unit,
    Graduated,
    Volume,
    Package,
}

impl ModelKind {
    pub const ALL: [ModelKind; 5] = [
        ModelKind::Flat,
        ModelKind::Unit,
        ModelKind::Graduated,
        ModelKind::Volume,
        ModelKind::Package,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Flat => "flat",
            ModelKind::Unit => "unit",
            ModelKind::Graduated => "graduated",
            ModelKind::Volume => "volume",
            ModelKind::Package => "package",
        }
    }

    pub fn parse(name: &str) -> Option<ModelKind> {
        ModelKind::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

impl Pricing {
    pub fn kind(&self) -> ModelKind {
        match self {
            Pricing::Flat { .. } => ModelKind::Flat,
            Pricing::Metered(metered) => match metered.model {
                Model::Unit { .. } => ModelKind::Unit,
                Model::Graduated { .. } => ModelKind::Graduated,
                Model::Volume { .. } => ModelKind::Volume,
                Model::Package { .. } => ModelKind::Package,
            },
        }
    }
}

impl Plan {
    /// The usage meters this plan reads.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.charges.iter().filter_map(|c| match &c.pricing {
            Pricing::Metered(m) => Some(m.source.as_str()),
            Pricing::Flat { .. } => None,
        })
    }

    /// Each usage meter this plan reads, with its aggregation (the loader
    /// makes sure charges sharing a meter aggregate it the same way).
    pub fn sources_aggregated(&self) -> std::collections::BTreeMap<&str, Aggregation> {
        self.charges
            .iter()
            .filter_map(|c| match &c.pricing {
                Pricing::Metered(m) => Some((m.source.as_str(), m.aggregation)),
                Pricing::Flat { .. } => None,
            })
            .collect()
    }
}
