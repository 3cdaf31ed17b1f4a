//! What batches add to `usage_rollup`: one quantity and one batch count per
//! (tenant, service, meter, minute). The ledger ([`crate::store::Store::commit`])
//! and `tidemark reconcile` ([`crate::reconcile`]) both compute rollups here,
//! so the audit recomputes exactly what the ledger stored.
//!
//! Per tenant in a batch, at the minute its window starts:
//! - each built-in meter adds its quantity, except a zero (but `requests`
//!   always adds, so every tenant seen has a `requests` row);
//! - each custom meter adds its value in nano-units under its stored name
//!   (see [`crate::quantity`]), except a zero. A value that cannot be kept
//!   exactly (bad name, not a decimal, too many decimal places, too large,
//!   or a sum past a BIGINT) is not added: it is listed in
//!   [`Rollups::rejected`], and the ledger logs and counts it.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use tidemark_core::UsageBatch;
use tidemark_core::meter::Meter;
use tidemark_core::window::minute_start;

use crate::quantity::{CustomUsageError, custom_meter_column, parse_custom_quantity};

/// Where a rollup row belongs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RollupKey<'a> {
    pub tenant: Cow<'a, str>,
    pub service: Cow<'a, str>,
    /// The stored meter name.
    pub meter: Cow<'a, str>,
    /// Start of the minute, microseconds since the Unix epoch.
    pub minute: i64,
}

impl RollupKey<'_> {
    pub fn into_owned(self) -> RollupKey<'static> {
        RollupKey {
            tenant: Cow::Owned(self.tenant.into_owned()),
            service: Cow::Owned(self.service.into_owned()),
            meter: Cow::Owned(self.meter.into_owned()),
            minute: self.minute,
        }
    }
}

/// A rollup row's content.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sums {
    /// In the meter's stored unit (nano-units for custom meters).
    pub quantity: i64,
    /// Batch contributions behind the quantity.
    pub batches: i64,
}

/// A custom usage value that was not counted, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedUsage {
    pub session_id: String,
    pub seq: u64,
    pub tenant: String,
    pub service: String,
    /// The meter as the app named it (its stored name for a sum past a
    /// BIGINT found by [`Rollups::add_owned`]).
    pub meter: String,
    pub value: String,
    pub reason: CustomUsageError,
}

/// Where one tenant's usage in one batch lands: every meter's row of it
/// shares the tenant, the service and the minute, so a batch's tenant entry
/// costs one hash lookup, not one per meter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Place<'a> {
    tenant: Cow<'a, str>,
    service: Cow<'a, str>,
    minute: i64,
}

/// The rows of one place: built-in meters in [`Meter::ALL`]'s order (`None`
/// where there is no row), custom ones by stored name (never a built-in
/// name: see [`custom_meter_column`]).
#[derive(Debug, Clone, Default)]
struct PlaceSums<'a> {
    builtin: [Option<Sums>; Meter::ALL.len()],
    custom: BTreeMap<Cow<'a, str>, Sums>,
}

impl<'a> PlaceSums<'a> {
    fn slot(&mut self, meter: Cow<'a, str>) -> &mut Sums {
        match Meter::ALL.iter().position(|m| m.as_str() == meter) {
            Some(i) => self.builtin[i].get_or_insert_default(),
            None => self.custom.entry(meter).or_default(),
        }
    }

    fn get(&self, meter: &str) -> Option<Sums> {
        match Meter::ALL.iter().position(|m| m.as_str() == meter) {
            Some(i) => self.builtin[i],
            None => self.custom.get(meter).copied(),
        }
    }

    fn rows(&self) -> impl Iterator<Item = (&str, Sums)> {
        let builtin = Meter::ALL
            .iter()
            .zip(&self.builtin)
            .filter_map(|(m, sums)| sums.map(|s| (m.as_str(), s)));
        builtin.chain(self.custom.iter().map(|(m, s)| (m.as_ref(), *s)))
    }
}

/// Rollups of some batches: one [`Sums`] per tenant, service, meter and
/// minute.
#[derive(Debug, Clone, Default)]
pub struct Rollups<'a> {
    places: HashMap<Place<'a>, PlaceSums<'a>>,
    rejected: Vec<RejectedUsage>,
}

impl<'a> Rollups<'a> {
    /// Adds every tenant's usage in `batch`.
    pub fn add(&mut self, batch: &'a UsageBatch) {
        let minute = minute_start(batch.window_start_unix_micros);
        for usage in &batch.tenants {
            let place = Place {
                tenant: Cow::Borrowed(usage.tenant.as_str()),
                service: Cow::Borrowed(batch.service.as_str()),
                minute,
            };
            let sums = self.places.entry(place).or_default();
            for (meter, slot) in Meter::ALL.iter().zip(&mut sums.builtin) {
                let quantity = meter.quantity(usage);
                if quantity == 0 && *meter != Meter::Requests {
                    continue;
                }
                let slot = slot.get_or_insert_default();
                slot.quantity = slot
                    .quantity
                    .saturating_add(i64::try_from(quantity).unwrap_or(i64::MAX));
                slot.batches += 1;
            }
            if usage.custom.is_empty() {
                continue;
            }
            // In name order, so that what is rejected does not depend on a
            // hash map's order.
            let mut custom: Vec<(&'a String, &'a String)> = usage.custom.iter().collect();
            custom.sort_unstable();
            for (name, value) in custom {
                let counted = custom_meter_column(name).and_then(|column| {
                    let nanos = parse_custom_quantity(value)?;
                    if nanos == 0 {
                        return Ok(());
                    }
                    let slot = sums.custom.entry(column).or_default();
                    slot.quantity = slot
                        .quantity
                        .checked_add(nanos)
                        .ok_or_else(|| CustomUsageError::SumTooLarge(value.clone()))?;
                    slot.batches += 1;
                    Ok(())
                });
                if let Err(reason) = counted {
                    self.rejected.push(RejectedUsage {
                        session_id: batch.session_id.clone(),
                        seq: batch.seq,
                        tenant: usage.tenant.clone(),
                        service: batch.service.clone(),
                        meter: name.clone(),
                        value: value.clone(),
                        reason,
                    });
                }
            }
        }
    }

    /// The rows, ordered by tenant, service, meter and minute.
    pub fn rows(&self) -> Vec<(RollupKey<'_>, Sums)> {
        let mut rows: Vec<(RollupKey<'_>, Sums)> = self
            .places
            .iter()
            .flat_map(|(place, sums)| {
                sums.rows().map(|(meter, s)| {
                    let key = RollupKey {
                        tenant: Cow::Borrowed(place.tenant.as_ref()),
                        service: Cow::Borrowed(place.service.as_ref()),
                        meter: Cow::Borrowed(meter),
                        minute: place.minute,
                    };
                    (key, s)
                })
            })
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rows
    }

    /// The row at `key`, if any.
    pub fn get(&self, key: &RollupKey<'_>) -> Option<Sums> {
        let place = Place {
            tenant: Cow::Borrowed(key.tenant.as_ref()),
            service: Cow::Borrowed(key.service.as_ref()),
            minute: key.minute,
        };
        // The map's keys outlive `place`'s borrow; HashMap::get only compares.
        let places: &HashMap<Place<'_>, PlaceSums<'_>> = &self.places;
        places.get(&place)?.get(&key.meter)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.places.values().map(|s| s.rows().count()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.places.is_empty()
    }

    /// Custom usage values not counted, in the order met.
    pub fn rejected(&self) -> &[RejectedUsage] {
        &self.rejected
    }
}

impl Rollups<'static> {
    /// Adds `batch` to rollups that own their keys (outlive the batch).
    pub fn add_owned(&mut self, batch: &UsageBatch) {
        let mut one = Rollups::default();
        one.add(batch);
        self.rejected.extend(one.rejected.iter().cloned());
        for (key, sums) in one.rows() {
            let key = key.into_owned();
            let is_custom = crate::quantity::is_custom(&key.meter);
            let place = Place {
                tenant: key.tenant.clone(),
                service: key.service.clone(),
                minute: key.minute,
            };
            let total = self.places.entry(place).or_default().slot(key.meter.clone());
            if !is_custom {
                total.quantity = total.quantity.saturating_add(sums.quantity);
            } else if let Some(quantity) = total.quantity.checked_add(sums.quantity) {
                total.quantity = quantity;
            } else {
                // Past a BIGINT: refused, as Rollups::add refuses it.
                let value = crate::quantity::to_decimal(&key.meter, sums.quantity).to_string();
                self.rejected.push(RejectedUsage {
                    session_id: batch.session_id.clone(),
                    seq: batch.seq,
                    tenant: key.tenant.into_owned(),
                    service: key.service.into_owned(),
                    meter: key.meter.into_owned(),
                    value: value.clone(),
                    reason: CustomUsageError::SumTooLarge(value),
                });
                continue;
            }
            total.batches += sums.batches;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use tidemark_core::TenantUsage;

    fn batch(seq: u64, window_start: i64, usage: Vec<TenantUsage>) -> UsageBatch {
        UsageBatch {
            service: "svc".into(),
            instance: "i".into(),
            session_id: "s".into(),
            seq,
            window_start_unix_micros: window_start,
            window_end_unix_micros: window_start + 1_000_000,
            tenants: usage,
            ..UsageBatch::default()
        }
    }

    fn usage(tenant: &str, requests: u64, custom: &[(&str, &str)]) -> TenantUsage {
        TenantUsage {
            tenant: tenant.into(),
            requests,
            custom: custom
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            ..TenantUsage::default()
        }
    }

    fn row(rollups: &Rollups<'_>, tenant: &str, meter: &str, minute: i64) -> Option<(i64, i64)> {
        rollups
            .get(&RollupKey {
                tenant: tenant.into(),
                service: "svc".into(),
                meter: meter.into(),
                minute,
            })
            .map(|s| (s.quantity, s.batches))
    }

    #[test]
    fn batches_roll_up_per_tenant_meter_and_minute_with_custom_meters_exact() {
        let batches = [
            batch(
                0,
                60_000_000,
                vec![usage("acme", 2, &[("tokens", "0.1"), ("requests", "5")])],
            ),
            batch(
                1,
                61_000_000,
                vec![usage("acme", 3, &[("tokens", "0.2")]), usage("globex", 0, &[])],
            ),
            batch(2, 120_000_000, vec![usage("acme", 1, &[("tokens", "0")])]),
        ];
        let mut rollups = Rollups::default();
        for b in &batches {
            rollups.add(b);
        }
        assert_eq!(row(&rollups, "acme", "requests", 60_000_000), Some((5, 2)));
        assert_eq!(
            row(&rollups, "acme", "tokens", 60_000_000),
            Some((300_000_000, 2)),
            "0.1 + 0.2 = 0.3"
        );
        assert_eq!(
            row(&rollups, "acme", "custom.requests", 60_000_000),
            Some((5_000_000_000, 1))
        );
        assert_eq!(row(&rollups, "globex", "requests", 60_000_000), Some((0, 1)));
        assert_eq!(row(&rollups, "acme", "requests", 120_000_000), Some((1, 1)));
        assert_eq!(row(&rollups, "acme", "tokens", 120_000_000), None, "zero adds nothing");
        assert_eq!(rollups.len(), 5);
        assert!(rollups.rejected().is_empty());

        // The owned form used by reconcile gets the same rows.
        let mut owned = Rollups::default();
        for b in &batches {
            owned.add_owned(b);
        }
        let rows = |r: &Rollups<'_>| {
            r.rows()
                .into_iter()
                .map(|(k, s)| (k.into_owned(), s))
                .collect::<Vec<_>>()
        };
        assert_eq!(rows(&owned), rows(&rollups));
    }

    #[test]
    fn values_that_cannot_be_kept_exactly_are_rejected_and_the_rest_counts() {
        let b = batch(
            7,
            0,
            vec![usage(
                "acme",
                1,
                &[
                    ("tokens", "1.5"),
                    ("images", "0.0000000001"),
                    ("gpu", "-1"),
                    ("Bad", "1"),
                    ("huge", "99999999999"),
                ],
            )],
        );
        let mut rollups = Rollups::default();
        rollups.add(&b);
        assert_eq!(row(&rollups, "acme", "tokens", 0), Some((1_500_000_000, 1)));
        let reasons: Vec<(&str, &CustomUsageError)> = rollups
            .rejected()
            .iter()
            .map(|r| (r.meter.as_str(), &r.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("Bad", &CustomUsageError::BadName("Bad".into())),
                ("gpu", &CustomUsageError::NotADecimal("-1".into())),
                ("huge", &CustomUsageError::TooLarge("99999999999".into())),
                ("images", &CustomUsageError::TooPrecise("0.0000000001".into())),
            ]
        );
        assert_eq!(
            (rollups.rejected()[0].session_id.as_str(), rollups.rejected()[0].seq),
            ("s", 7)
        );

        // A sum past a BIGINT is refused, not wrapped or clamped.
        let max = "9223372036.854775807";
        let batches = [
            batch(0, 0, vec![usage("acme", 0, &[("tokens", max)])]),
            batch(1, 0, vec![usage("acme", 0, &[("tokens", "0.000000001")])]),
        ];
        let mut rollups = Rollups::default();
        for b in &batches {
            rollups.add(b);
        }
        assert_eq!(row(&rollups, "acme", "tokens", 0), Some((i64::MAX, 1)));
        assert_eq!(
            rollups.rejected()[0].reason,
            CustomUsageError::SumTooLarge("0.000000001".into())
        );
    }
}
