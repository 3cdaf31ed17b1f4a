//! Which price plan prices a tenant's period: the plans loaded at start
//! (the [`Catalog`]), each tenant's subscriptions (plan, version, start),
//! and the `--default-plan` for tenants without one.
//!
//! A period is priced by one plan version: the subscription in effect when
//! the period starts (the latest one starting at or before it); if none is,
//! the first one starting inside the period; if none does either, the
//! default plan. So a change of plan takes effect at the next period
//! boundary, except for a tenant's first subscription, which prices the
//! whole period it starts in. See `docs/invoices.md`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::invoice::db::{self, DbError};
use crate::invoice::period::Period;
use crate::pricing::{Plan, PlanError, load_dir};
use crate::store::Store;

/// The shipped plans (`billing/plans/`), built into the binary: the plans
/// billing knows when no `--plans-dir` is given.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "billing/plans/aws-lambda-x86.toml",
        include_str!("../plans/aws-lambda-x86.toml"),
    ),
    (
        "billing/plans/azure-functions-consumption.toml",
        include_str!("../plans/azure-functions-consumption.toml"),
    ),
    (
        "billing/plans/cloud-run-request.toml",
        include_str!("../plans/cloud-run-request.toml"),
    ),
];

/// Why the plans could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("--default-plan {name:?}: no such plan; loaded plans: {known}")]
    UnknownDefault { name: String, known: String },
    #[error("--plans-dir {dir}: holds no *.toml plan")]
    Empty { dir: String },
}

/// A plan and version, as subscriptions and invoices name them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlanId {
    pub name: String,
    pub version: u32,
}

impl std::fmt::Display for PlanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} version {}", self.name, self.version)
    }
}

/// Every plan version billing knows, and the default plan.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    plans: BTreeMap<PlanId, Arc<Plan>>,
    default: Option<PlanId>,
}

impl Catalog {
    /// The plans of `--plans-dir` (every `*.toml` in it), or the built-in
    /// shipped plans without one; `default_plan` names the plan (its latest
    /// version) of tenants without a subscription.
    pub fn load(plans_dir: Option<&Path>, default_plan: Option<&str>) -> Result<Catalog, CatalogError> {
        let plans = match plans_dir {
            Some(dir) => {
                let plans = load_dir(dir)?;
                if plans.is_empty() {
                    return Err(CatalogError::Empty {
                        dir: dir.display().to_string(),
                    });
                }
                plans
            }
            None => built_in_plans()?,
        };
        Catalog::new(plans, default_plan)
    }

    pub fn new(plans: Vec<Plan>, default_plan: Option<&str>) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog {
            plans: plans
                .into_iter()
                .map(|plan| {
                    let id = PlanId {
                        name: plan.name.clone(),
                        version: plan.version,
                    };
                    (id, Arc::new(plan))
                })
                .collect(),
            default: None,
        };
        if let Some(name) = default_plan {
            let plan = catalog.latest(name).ok_or_else(|| CatalogError::UnknownDefault {
                name: name.to_owned(),
                known: catalog.describe(),
            })?;
            catalog.default = Some(PlanId {
                name: plan.name.clone(),
                version: plan.version,
            });
        }
        Ok(catalog)
    }

    pub fn get(&self, name: &str, version: u32) -> Option<&Arc<Plan>> {
        self.plans.get(&PlanId {
            name: name.to_owned(),
            version,
        })
    }

    /// The highest version of `name`.
    pub fn latest(&self, name: &str) -> Option<&Arc<Plan>> {
        self.plans
            .iter()
            .filter(|(id, _)| id.name == name)
            .map(|(_, plan)| plan)
            .next_back()
    }

    pub fn default_plan(&self) -> Option<&PlanId> {
        self.default.as_ref()
    }

    /// `name v1, v2; other v1`: what is loaded, for error messages.
    pub fn describe(&self) -> String {
        let mut names: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for id in self.plans.keys() {
            names.entry(&id.name).or_default().push(format!("v{}", id.version));
        }
        let list: Vec<String> = names
            .into_iter()
            .map(|(name, versions)| format!("{name} {}", versions.join(", ")))
            .collect();
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join("; ")
        }
    }

    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

/// The shipped plans, as built into the binary.
pub fn built_in_plans() -> Result<Vec<Plan>, PlanError> {
    BUILT_IN
        .iter()
        .map(|(file, text)| Plan::from_toml(Path::new(file), text))
        .collect()
}

/// A tenant's subscription: from `starts_at` on, its periods are priced by
/// `plan`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub tenant: String,
    pub plan: PlanId,
    /// Microseconds since the Unix epoch.
    pub starts_at: i64,
}

/// Where a period's plan comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanSource {
    Subscription(Subscription),
    Default(PlanId),
}

impl PlanSource {
    pub fn plan(&self) -> &PlanId {
        match self {
            PlanSource::Subscription(s) => &s.plan,
            PlanSource::Default(id) => id,
        }
    }
}

/// The plan for `period` among `subscriptions` (a tenant's, any order) and
/// the default: see the module's documentation for the rule.
pub fn plan_for(subscriptions: &[Subscription], default: Option<&PlanId>, period: &Period) -> Option<PlanSource> {
    let in_effect = subscriptions
        .iter()
        .filter(|s| s.starts_at <= period.start)
        .max_by_key(|s| s.starts_at);
    let starting_inside = || {
        subscriptions
            .iter()
            .filter(|s| period.contains(s.starts_at))
            .min_by_key(|s| s.starts_at)
    };
    match in_effect.or_else(starting_inside) {
        Some(s) => Some(PlanSource::Subscription(s.clone())),
        None => default.cloned().map(PlanSource::Default),
    }
}

/// The subscription in effect at `now`: the latest started.
pub fn current(subscriptions: &[Subscription], now: i64) -> Option<&Subscription> {
    subscriptions
        .iter()
        .filter(|s| s.starts_at <= now)
        .max_by_key(|s| s.starts_at)
}

impl Store {
    /// Sets the subscription of `tenant` starting at `starts_at` (replacing
    /// one that starts at the same instant).
    pub async fn put_subscription(&self, subscription: &Subscription) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO subscription (tenant, starts_at, plan, plan_version) VALUES ($1, $2, $3, $4)
             ON CONFLICT (tenant, starts_at) DO UPDATE SET plan = excluded.plan, plan_version = excluded.plan_version",
        )
        .bind(&subscription.tenant)
        .bind(subscription.starts_at)
        .bind(&subscription.plan.name)
        .bind(i64::from(subscription.plan.version))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Every subscription of `tenant`, oldest first.
    pub async fn subscriptions(&self, tenant: &str) -> Result<Vec<Subscription>, DbError> {
        let mut conn = self.reads().acquire().await?;
        db::subscriptions(&mut conn, tenant).await
    }

    /// Tenants with a subscription starting before `before`.
    pub async fn subscribed_tenants(&self, before: i64) -> Result<Vec<String>, DbError> {
        let mut conn = self.reads().acquire().await?;
        db::subscribed_tenants(&mut conn, before).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoice::period::BillingZone;

    fn plan_id(name: &str, version: u32) -> PlanId {
        PlanId {
            name: name.into(),
            version,
        }
    }

    fn sub(plan: &str, starts_at: i64) -> Subscription {
        Subscription {
            tenant: "acme".into(),
            plan: plan_id(plan, 1),
            starts_at,
        }
    }

    #[test]
    fn the_built_in_plans_are_the_shipped_files() {
        let built_in = built_in_plans().expect("built-in plans load");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plans");
        assert_eq!(built_in, load_dir(&dir).expect("shipped plans load"));
    }

    #[test]
    fn default_plans_must_exist_and_take_the_latest_version() {
        let catalog = Catalog::load(None, Some("aws-lambda-x86")).expect("catalog");
        assert_eq!(catalog.default_plan(), Some(&plan_id("aws-lambda-x86", 1)));
        assert_eq!(catalog.len(), 3);
        let err = Catalog::load(None, Some("aws")).expect_err("unknown");
        let message = err.to_string();
        assert!(message.starts_with("--default-plan \"aws\": no such plan"), "{message}");
        assert!(message.contains("aws-lambda-x86 v1"), "{message}");
        let empty = tempfile::tempdir().expect("tempdir");
        let err = Catalog::load(Some(empty.path()), None).expect_err("empty");
        assert!(err.to_string().contains("holds no *.toml plan"), "{err}");
    }

    #[test]
    fn a_period_takes_the_plan_in_effect_at_its_start() {
        let zone = BillingZone::Utc;
        let oct = zone.period(2026, 10).expect("period");
        let nov = zone.period(2026, 11).expect("period");
        let dec = zone.period(2026, 12).expect("period");
        let mid_nov = nov.start + 14 * 86_400_000_000;
        let subs = [sub("old", oct.start), sub("new", mid_nov)];
        let plan = |p: &Period, default: Option<&PlanId>| plan_for(&subs, default, p).map(|s| s.plan().name.clone());
        assert_eq!(plan(&oct, None).as_deref(), Some("old"));
        assert_eq!(
            plan(&nov, None).as_deref(),
            Some("old"),
            "a change waits for the next period"
        );
        assert_eq!(plan(&dec, None).as_deref(), Some("new"));

        // A first subscription prices the period it starts in.
        let first = [sub("new", mid_nov)];
        assert_eq!(
            plan_for(&first, None, &nov).map(|s| s.plan().name.clone()).as_deref(),
            Some("new")
        );
        assert_eq!(plan_for(&first, None, &oct), None);
        let default = plan_id("fallback", 2);
        assert_eq!(
            plan_for(&first, Some(&default), &oct),
            Some(PlanSource::Default(default.clone()))
        );
        assert_eq!(current(&subs, mid_nov - 1).map(|s| s.plan.name.as_str()), Some("old"));
        assert_eq!(current(&subs, mid_nov).map(|s| s.plan.name.as_str()), Some("new"));
    }

    #[tokio::test]
    async fn subscriptions_are_stored_per_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite:{}", dir.path().join("b.db").display()))
            .await
            .expect("open");
        store.put_subscription(&sub("b", 20)).await.expect("put");
        store.put_subscription(&sub("a", 10)).await.expect("put");
        store.put_subscription(&sub("c", 20)).await.expect("replace");
        let subs = store.subscriptions("acme").await.expect("read");
        let got: Vec<(&str, i64)> = subs.iter().map(|s| (s.plan.name.as_str(), s.starts_at)).collect();
        assert_eq!(got, [("a", 10), ("c", 20)]);
        assert!(store.subscriptions("globex").await.expect("read").is_empty());
        assert_eq!(store.subscribed_tenants(15).await.expect("read"), ["acme"]);
        assert!(store.subscribed_tenants(10).await.expect("read").is_empty());
    }
}
