//! Price plans as data, and the rating engine that applies them.
//!
//! A plan is a TOML file (`billing/plans/*.toml`, format in
//! `docs/pricing.md`) loaded and validated by [`Plan::load`] or
//! [`load_dir`]; [`rate`] prices one tenant's usage for one period with it.
//! Everything is exact decimal arithmetic ([`exact`]): no floats, and the
//! only rounding is the plan's, once per line.

pub mod exact;
mod keys;
mod load;
mod plan;
mod rate;
mod rounding;

#[cfg(test)]
mod shipped_plans;

pub use load::{MAX_METER_NAME_LEN, PlanError, is_meter_name, load_dir};
pub use plan::{Aggregation, Charge, Metered, Model, ModelKind, Plan, Pricing, Tier};
pub use rate::{MinimumLine, RateError, Rated, RatedLine, TierLine, rate};
pub use rounding::{Rounding, RoundingRule};
