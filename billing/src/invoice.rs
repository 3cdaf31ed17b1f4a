//! Invoices: each tenant's calendar month (in the billing time zone)
//! priced by its plan, with the usage range and batches behind every line.
//!
//! - A **draft** is computed from the rollups as they are whenever it is
//!   asked for, and never stored.
//! - **Finalizing** (allowed from `period_end + collection wait` on) builds
//!   the invoice once more and stores it with its lines in one
//!   transaction; it never changes after that.
//! - **Corrections**: every invoice built for a period `P` compares, for
//!   each earlier finalized period `Q`, the usage now in `Q`'s rollups with
//!   what `Q`'s invoice and the finalized corrections of `Q` billed; a
//!   charge whose usage grew gets a line on `P` worth `rate(usage now) −
//!   rate(usage billed)` that names `Q`.
//!
//! The rules, with examples, are in `docs/invoices.md`.

pub mod aggregate;
pub mod db;
pub mod http;
pub mod model;
pub mod period;

use std::collections::BTreeMap;
use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::AnyConnection;
use tidemark_core::window::minute_start;

use crate::pricing::{Aggregation, Plan, Pricing, RateError, Rated, RatedLine, exact, rate};
use crate::store::Store;
use crate::subscriptions::{Catalog, PlanId, plan_for};
use aggregate::{AggregateError, Aggregated, aggregate};
use db::{DbError, Filter};
use model::{Correction, Invoice, Line, LineKind, MINIMUM_CHARGE, Rating, Status, invoice_id, parse_invoice_id};
use period::{BillingZone, Period};

/// Why an invoice could not be had.
#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error("no invoice {id}: {reason}")]
    Unknown { id: String, reason: String },
    #[error(
        "tenant {tenant:?} has no subscription for {period} and billing has no --default-plan; \
         set one with PUT /v1/tenants/{tenant}/subscription"
    )]
    NoPlan { tenant: String, period: String },
    #[error(
        "{period} of tenant {tenant:?} is priced by plan {plan}, which is not loaded; keep every plan version still in use in --plans-dir"
    )]
    PlanNotLoaded {
        tenant: String,
        period: String,
        plan: PlanId,
    },
    #[error("invoice {id} can be finalized from {finalizable_at} on (period end plus the collection wait)")]
    TooEarly {
        id: String,
        /// Microseconds since the epoch.
        finalizable_at: i64,
    },
    #[error("invoice {id} was finalized at {finalized_at}; finalized invoices never change")]
    AlreadyFinalized { id: String, finalized_at: String },
    #[error("tenant {tenant:?}, {period}: {source}")]
    Rate {
        tenant: String,
        period: String,
        #[source]
        source: RateError,
    },
    #[error("tenant {tenant:?}, {period}: {source}")]
    Aggregate {
        tenant: String,
        period: String,
        #[source]
        source: AggregateError,
    },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for InvoiceError {
    fn from(e: sqlx::Error) -> InvoiceError {
        InvoiceError::Db(DbError::Sql(e))
    }
}

/// Invoicing settings and the plans, shared by the API's handlers.
#[derive(Debug, Clone)]
pub struct Invoicing {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    pub zone: BillingZone,
    /// How long after a period's end usage is still waited for before the
    /// period may be finalized, in microseconds.
    pub collection_wait_micros: i64,
}

/// Which invoices to list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub tenant: Option<String>,
    pub status: Option<Status>,
    /// `(year, month)`.
    pub period: Option<(i32, u32)>,
}

/// Invoices listed, and the drafts that could not be built.
#[derive(Debug, Default)]
pub struct Listing {
    pub invoices: Vec<Invoice>,
    pub errors: Vec<(String, InvoiceError)>,
}

fn rfc3339(unix_micros: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_micros(unix_micros).map_or_else(
        || unix_micros.to_string(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

impl crate::BillingArgs {
    /// Invoicing over `store` as the flags say, with the plans loaded (a bad
    /// plan fails, naming its file, key and reason).
    pub fn invoicing(&self, store: Store) -> Result<Invoicing, crate::subscriptions::CatalogError> {
        let catalog = Catalog::load(self.plans_dir.as_deref(), self.default_plan.as_deref())?;
        if self.collection_wait < self.late_after {
            tracing::warn!(
                collection_wait = ?self.collection_wait,
                late_after = ?self.late_after,
                "--collection-wait is shorter than --late-after: usage arriving after a month is finalized may \
                 not be in the late-usage record, and its correction lines then show the whole month's range"
            );
        }
        tracing::info!(
            plans = %catalog.describe(),
            from = %self.plans_dir.as_ref().map_or_else(|| "built in".to_owned(), |d| d.display().to_string()),
            default_plan = ?catalog.default_plan().map(ToString::to_string),
            time_zone = %self.time_zone,
            collection_wait = ?self.collection_wait,
            "price plans loaded"
        );
        Ok(Invoicing {
            store,
            catalog: Arc::new(catalog),
            zone: self.time_zone,
            collection_wait_micros: i64::try_from(self.collection_wait.as_micros()).unwrap_or(i64::MAX),
        })
    }
}

impl Invoicing {
    /// When `period` may be finalized.
    pub fn finalizable_at(&self, period: &Period) -> i64 {
        period.end.saturating_add(self.collection_wait_micros)
    }

    /// The tenant and period an id names, in the billing time zone.
    pub fn parse_id(&self, id: &str) -> Result<(String, Period), InvoiceError> {
        let unknown = |reason: &str| InvoiceError::Unknown {
            id: id.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = parse_invoice_id(id).ok_or_else(|| unknown("invoice ids are inv_<tenant>_<YYYY-MM>"))?;
        let period = parsed
            .period(self.zone)
            .ok_or_else(|| unknown("the month is out of range"))?;
        Ok((parsed.tenant, period))
    }

    /// The invoice `id` names as of `now`: stored if finalized, else a
    /// draft of the usage as it is.
    pub async fn get(&self, id: &str, now: i64) -> Result<Invoice, InvoiceError> {
        let (tenant, period) = self.parse_id(id)?;
        let mut conn = self.store.reads().acquire().await?;
        if let Some(invoice) = self.stored(&mut conn, &tenant, &period, true).await? {
            return Ok(invoice);
        }
        if period.start > now {
            return Err(InvoiceError::Unknown {
                id: id.to_owned(),
                reason: format!("{} has not begun", period.label()),
            });
        }
        self.draft_on(&mut conn, &tenant, &period).await
    }

    /// The draft of `tenant`'s `period` (never a stored invoice).
    pub async fn draft(&self, tenant: &str, period: &Period) -> Result<Invoice, InvoiceError> {
        let mut conn = self.store.reads().acquire().await?;
        self.draft_on(&mut conn, tenant, period).await
    }

    /// The running cost: the draft of the period holding `now`.
    pub async fn running_cost(&self, tenant: &str, now: i64) -> Result<Invoice, InvoiceError> {
        let period = self.zone.period_at(now).ok_or_else(|| InvoiceError::Unknown {
            id: format!("inv_{tenant}_?"),
            reason: "the clock is out of range".to_owned(),
        })?;
        self.draft(tenant, &period).await
    }

    /// The tenants that have an invoice for `period`: those with usage in it
    /// or a subscription starting before its end, sorted (the tenants
    /// [`Invoicing::list`] drafts when no tenant is given).
    pub async fn tenants(&self, period: &Period) -> Result<Vec<String>, InvoiceError> {
        let mut conn = self.store.reads().acquire().await?;
        tenants_on(&mut conn, period).await
    }

    /// Finalizes invoice `id` at `now`: builds it from the usage as it is
    /// and stores it with its lines in one transaction. Refused before the
    /// period's end plus the collection wait, and for a finalized invoice.
    pub async fn finalize(&self, id: &str, now: i64) -> Result<Invoice, InvoiceError> {
        let (tenant, period) = self.parse_id(id)?;
        let finalizable_at = self.finalizable_at(&period);
        if now < finalizable_at {
            return Err(InvoiceError::TooEarly {
                id: id.to_owned(),
                finalizable_at,
            });
        }
        // One tenant's finalizations run one at a time, so two periods
        // finalized at once never bill the same correction twice. SQLite
        // takes its write lock up front; Postgres a per-tenant advisory lock.
        let mut tx = if self.store.is_postgres() {
            let mut tx = self.store.pool().begin().await?;
            // The lock function returns void, which the Any driver cannot
            // decode: select a constant beside it.
            sqlx::query("SELECT 1 FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
                .bind(db::lock_key(&tenant))
                .execute(&mut *tx)
                .await?;
            tx
        } else {
            self.store.pool().begin_with("BEGIN IMMEDIATE").await?
        };
        if let Some(stored) = self.stored(&mut tx, &tenant, &period, false).await? {
            return Err(already_finalized(&stored));
        }
        let mut invoice = self.draft_on(&mut tx, &tenant, &period).await?;
        invoice.status = Status::Finalized;
        invoice.finalized_at = Some(now);
        if !db::insert(&mut tx, &invoice).await? {
            let stored = self.stored(&mut tx, &tenant, &period, false).await?;
            return Err(match stored {
                Some(stored) => already_finalized(&stored),
                None => InvoiceError::AlreadyFinalized {
                    id: invoice.id,
                    finalized_at: "another time".to_owned(),
                },
            });
        }
        tx.commit().await?;
        tracing::info!(id = %invoice.id, total = %invoice.total, currency = %invoice.currency, "invoice finalized");
        Ok(invoice)
    }

    /// Lists finalized invoices and drafts: with a period, that period's;
    /// without, every finalized invoice and the drafts of the current and
    /// the previous period (not yet finalized).
    pub async fn list(&self, filter: &ListFilter, now: i64) -> Result<Listing, InvoiceError> {
        let mut conn = self.store.reads().acquire().await?;
        let requested = match filter.period {
            Some((year, month)) => Some(self.zone.period(year, month).ok_or_else(|| InvoiceError::Unknown {
                id: format!("{year:04}-{month:02}"),
                reason: "the month is out of range".to_owned(),
            })?),
            None => None,
        };
        let stored = db::invoices(
            &mut conn,
            &Filter {
                tenant: filter.tenant.as_deref(),
                period_start: requested.map(|p| p.start),
                ..Filter::default()
            },
        )
        .await?;
        let mut listing = Listing::default();
        let finalized: std::collections::BTreeSet<String> = stored.iter().map(|i| i.id.clone()).collect();
        if filter.status != Some(Status::Draft) {
            listing.invoices.extend(stored);
        }
        if filter.status != Some(Status::Finalized) {
            let periods: Vec<Period> = match requested {
                Some(period) => vec![period],
                None => {
                    let current = self.zone.period_at(now);
                    let previous = current.and_then(|p| self.zone.previous(&p));
                    previous.into_iter().chain(current).collect()
                }
            };
            for period in periods.iter().filter(|p| p.start <= now) {
                let tenants = match &filter.tenant {
                    Some(tenant) => vec![tenant.clone()],
                    None => tenants_on(&mut conn, period).await?,
                };
                for tenant in tenants {
                    let id = invoice_id(&tenant, period);
                    if finalized.contains(&id) {
                        continue;
                    }
                    // A finalized invoice of another listing scope (e.g. a
                    // period given without a tenant) is not drafted again.
                    if self.stored(&mut conn, &tenant, period, false).await?.is_some() {
                        continue;
                    }
                    match self.draft_on(&mut conn, &tenant, period).await {
                        Ok(draft) => listing.invoices.push(draft),
                        Err(e @ InvoiceError::Db(_)) => return Err(e),
                        Err(e) => listing.errors.push((id, e)),
                    }
                }
            }
        }
        listing
            .invoices
            .sort_by(|a, b| (b.period.start, &a.tenant).cmp(&(a.period.start, &b.tenant)));
        Ok(listing)
    }

    /// The stored invoice of `tenant`'s `period`, if finalized.
    async fn stored(
        &self,
        conn: &mut AnyConnection,
        tenant: &str,
        period: &Period,
        with_lines: bool,
    ) -> Result<Option<Invoice>, InvoiceError> {
        let id = invoice_id(tenant, period);
        let mut found = db::invoices(
            conn,
            &Filter {
                id: Some(&id),
                lines: with_lines,
                ..Filter::default()
            },
        )
        .await?;
        if found.is_empty() {
            // Stored under another zone's boundaries, the id still matches
            // its tenant and start.
            found = db::invoices(
                conn,
                &Filter {
                    tenant: Some(tenant),
                    period_start: Some(period.start),
                    lines: with_lines,
                    ..Filter::default()
                },
            )
            .await?;
        }
        Ok(found.pop())
    }

    fn plan(&self, tenant: &str, period: &Period, id: &PlanId) -> Result<Arc<Plan>, InvoiceError> {
        self.catalog
            .get(&id.name, id.version)
            .cloned()
            .ok_or_else(|| InvoiceError::PlanNotLoaded {
                tenant: tenant.to_owned(),
                period: period.label(),
                plan: id.clone(),
            })
    }

    /// Builds the draft of `tenant`'s `period` from the usage as it is.
    async fn draft_on(&self, conn: &mut AnyConnection, tenant: &str, period: &Period) -> Result<Invoice, InvoiceError> {
        let subscriptions = db::subscriptions(conn, tenant).await?;
        let source =
            plan_for(&subscriptions, self.catalog.default_plan(), period).ok_or_else(|| InvoiceError::NoPlan {
                tenant: tenant.to_owned(),
                period: period.label(),
            })?;
        let plan = self.plan(tenant, period, source.plan())?;
        let usage = self.usage(conn, tenant, period, &plan).await?;
        let amounts: BTreeMap<String, Decimal> = usage.iter().map(|(meter, a)| (meter.clone(), a.usage)).collect();
        let rated = rate(&plan, &amounts).map_err(|source| InvoiceError::Rate {
            tenant: tenant.to_owned(),
            period: period.label(),
            source,
        })?;

        let mut lines: Vec<Line> = rated
            .lines
            .iter()
            .map(|line| {
                let behind = line
                    .source
                    .as_ref()
                    .and_then(|s| usage.get(s))
                    .copied()
                    .unwrap_or(Aggregated::NONE);
                charge_line(line, &behind)
            })
            .collect();
        lines.extend(self.corrections(conn, tenant, period).await?);
        let inexact = |what: &str| InvoiceError::Rate {
            tenant: tenant.to_owned(),
            period: period.label(),
            source: RateError::Inexact {
                what: format!("the invoice's {what}"),
            },
        };
        // Money is written to the plan's step (0.40, not 0.4).
        let places = plan.rounding.step.scale();
        let subtotal = lines
            .iter()
            .try_fold(Decimal::ZERO, |sum, line| exact::add(sum, line.amount))
            .and_then(|sum| exact::with_min_scale(sum, places))
            .ok_or_else(|| inexact("subtotal"))?;
        let mut total = subtotal;
        if let Some(minimum) = &rated.minimum {
            total = exact::add(total, minimum.amount)
                .and_then(|sum| exact::with_min_scale(sum, places))
                .ok_or_else(|| inexact("total"))?;
            // After the charges, before the corrections.
            lines.insert(
                rated.lines.len(),
                Line {
                    line_no: 0,
                    kind: LineKind::Minimum,
                    charge: MINIMUM_CHARGE.to_owned(),
                    description: format!("Minimum for the period ({} {})", minimum.minimum, rated.currency),
                    source: None,
                    usage: rated.subtotal,
                    quantity: minimum.minimum,
                    allowance: Decimal::ZERO,
                    unit_price: None,
                    tiers: Vec::new(),
                    amount: minimum.amount,
                    usage_from: None,
                    usage_to: None,
                    batches: 0,
                    corrects_period_start: None,
                    correction: None,
                },
            );
        }
        for (i, line) in lines.iter_mut().enumerate() {
            line.line_no = u32::try_from(i + 1).unwrap_or(u32::MAX);
        }
        Ok(Invoice {
            id: invoice_id(tenant, period),
            tenant: tenant.to_owned(),
            period: *period,
            time_zone: self.zone.to_string(),
            plan: source.plan().clone(),
            currency: rated.currency,
            status: Status::Draft,
            lines,
            subtotal,
            total,
            finalized_at: None,
        })
    }

    /// `tenant`'s usage in `period` of every meter `plan` reads, aggregated
    /// as the plan says.
    async fn usage(
        &self,
        conn: &mut AnyConnection,
        tenant: &str,
        period: &Period,
        plan: &Plan,
    ) -> Result<BTreeMap<String, Aggregated>, InvoiceError> {
        let sources = plan.sources_aggregated();
        let meters: Vec<(&str, Aggregation)> = sources.iter().map(|(m, a)| (*m, *a)).collect();
        let summaries = db::meter_usage(conn, tenant, period.start, period.end, &meters).await?;
        let mut usage = BTreeMap::new();
        for (meter, aggregation) in sources {
            let summary = summaries.get(meter).copied().unwrap_or_default();
            let digits = crate::quantity::scale_digits(meter);
            let aggregated = aggregate(meter, aggregation, &summary, period.minutes(), digits).map_err(|source| {
                InvoiceError::Aggregate {
                    tenant: tenant.to_owned(),
                    period: period.label(),
                    source,
                }
            })?;
            usage.insert(meter.to_owned(), aggregated);
        }
        Ok(usage)
    }

    /// Correction lines for every finalized period of `tenant` before
    /// `period` whose usage changed since it was billed.
    async fn corrections(
        &self,
        conn: &mut AnyConnection,
        tenant: &str,
        period: &Period,
    ) -> Result<Vec<Line>, InvoiceError> {
        let finalized = db::invoices(
            conn,
            &Filter {
                tenant: Some(tenant),
                lines: true,
                ..Filter::default()
            },
        )
        .await?;
        let mut lines = Vec::new();
        for billed in finalized.iter().filter(|i| i.period.start < period.start) {
            let plan = self.plan(tenant, &billed.period, &billed.plan)?;
            // What has been billed per charge: the period's own line plus
            // every finalized correction of it, and when it was last billed.
            let mut so_far: BTreeMap<&str, Billed> = BTreeMap::new();
            for line in &billed.lines {
                if line.kind == LineKind::Charge {
                    so_far.insert(&line.charge, Billed::from_line(line, billed.finalized_at));
                }
            }
            for invoice in &finalized {
                for line in invoice
                    .lines
                    .iter()
                    .filter(|l| l.corrects_period_start == Some(billed.period.start))
                {
                    if let Some(entry) = so_far.get_mut(line.charge.as_str()) {
                        entry
                            .add(line, invoice.finalized_at)
                            .ok_or_else(|| InvoiceError::Rate {
                                tenant: tenant.to_owned(),
                                period: billed.period.label(),
                                source: RateError::Inexact {
                                    what: format!("the usage billed for charge {:?}", line.charge),
                                },
                            })?;
                    }
                }
            }
            let sources = plan.sources_aggregated();
            let meters: Vec<&str> = sources.keys().copied().collect();
            // Any usage added to a period adds batches: equal batch counts
            // mean nothing to correct, without reading every minute.
            let batches = db::batches_per_meter(conn, tenant, billed.period.start, billed.period.end, &meters).await?;
            let changed = plan.charges.iter().any(|charge| match &charge.pricing {
                Pricing::Metered(m) => {
                    let billed_batches = so_far.get(charge.name.as_str()).map_or(0, |b| b.batches);
                    batches.get(&m.source).copied().unwrap_or(0) != billed_batches
                }
                Pricing::Flat { .. } => false,
            });
            if !changed {
                continue;
            }
            let now = self.usage(conn, tenant, &billed.period, &plan).await?;
            for charge in &plan.charges {
                let Pricing::Metered(metered) = &charge.pricing else {
                    continue;
                };
                let current = now.get(&metered.source).copied().unwrap_or(Aggregated::NONE);
                let before = so_far.get(charge.name.as_str()).cloned().unwrap_or_default();
                if current.usage == before.usage && current.batches == before.batches {
                    continue;
                }
                let rate_error = |source| InvoiceError::Rate {
                    tenant: tenant.to_owned(),
                    period: billed.period.label(),
                    source,
                };
                let one = |usage: Decimal| -> Result<RatedLine, InvoiceError> {
                    let single = Plan {
                        charges: vec![charge.clone()],
                        minimum: None,
                        ..(*plan).clone()
                    };
                    let rated: Rated =
                        rate(&single, &BTreeMap::from([(metered.source.clone(), usage)])).map_err(rate_error)?;
                    rated.lines.into_iter().next().ok_or_else(|| {
                        rate_error(RateError::Inexact {
                            what: format!("charge {:?}", charge.name),
                        })
                    })
                };
                let at_now = one(current.usage)?;
                let at_billed = one(before.usage)?;
                let difference = |a: Decimal, b: Decimal, what: &str| {
                    exact::sub(a, b).ok_or_else(|| {
                        rate_error(RateError::Inexact {
                            what: format!("the correction's {what} of charge {:?}", charge.name),
                        })
                    })
                };
                let since = before.last_billed_at.map_or(billed.period.start, minute_start);
                let range = db::late_range(
                    conn,
                    tenant,
                    &metered.source,
                    billed.period.start,
                    billed.period.end,
                    since,
                )
                .await?
                .map_or((current.from, current.to), |(from, to)| (Some(from), Some(to)));
                let label = billed.period.label();
                lines.push(Line {
                    line_no: 0,
                    kind: LineKind::Correction,
                    charge: charge.name.clone(),
                    description: format!("{}: correction for {label}", at_now.description),
                    source: Some(metered.source.clone()),
                    usage: difference(current.usage, before.usage, "usage")?,
                    quantity: difference(at_now.quantity, at_billed.quantity, "quantity")?,
                    allowance: difference(at_now.allowance, at_billed.allowance, "allowance")?,
                    unit_price: at_now.unit_price,
                    tiers: Vec::new(),
                    amount: exact::with_min_scale(
                        difference(at_now.amount, at_billed.amount, "amount")?,
                        plan.rounding.step.scale(),
                    )
                    .ok_or_else(|| {
                        rate_error(RateError::Inexact {
                            what: format!("the correction's amount of charge {:?}", charge.name),
                        })
                    })?,
                    usage_from: range.0,
                    usage_to: range.1,
                    batches: current.batches - before.batches,
                    corrects_period_start: Some(billed.period.start),
                    correction: Some(Correction {
                        period: label,
                        billed: rating(&at_billed, before.batches),
                        now: rating(&at_now, current.batches),
                    }),
                });
            }
        }
        Ok(lines)
    }
}

/// The tenants with an invoice for `period`: usage in it or a subscription
/// starting before its end, sorted.
async fn tenants_on(conn: &mut AnyConnection, period: &Period) -> Result<Vec<String>, InvoiceError> {
    let mut tenants = db::tenants_with_usage(conn, period.start, period.end).await?;
    tenants.extend(db::subscribed_tenants(conn, period.end).await?);
    tenants.sort();
    tenants.dedup();
    Ok(tenants)
}

fn already_finalized(stored: &Invoice) -> InvoiceError {
    InvoiceError::AlreadyFinalized {
        id: stored.id.clone(),
        finalized_at: stored
            .finalized_at
            .map_or_else(|| "an unknown time".to_owned(), rfc3339),
    }
}

fn rating(line: &RatedLine, batches: i64) -> Rating {
    Rating {
        usage: line.usage,
        quantity: line.quantity,
        allowance: line.allowance,
        amount: line.amount,
        batches,
        tiers: line.tiers.clone(),
    }
}

/// What has been billed for one charge of a finalized period.
#[derive(Debug, Clone, Default)]
struct Billed {
    usage: Decimal,
    batches: i64,
    last_billed_at: Option<i64>,
}

impl Billed {
    fn from_line(line: &Line, finalized_at: Option<i64>) -> Billed {
        Billed {
            usage: line.usage,
            batches: line.batches,
            last_billed_at: finalized_at,
        }
    }

    /// Adds a finalized correction of the charge; `None` if the sum is not exact.
    fn add(&mut self, correction: &Line, finalized_at: Option<i64>) -> Option<()> {
        self.usage = exact::add(self.usage, correction.usage)?;
        self.batches += correction.batches;
        self.last_billed_at = self.last_billed_at.max(finalized_at);
        Some(())
    }
}

fn charge_line(line: &RatedLine, behind: &Aggregated) -> Line {
    Line {
        line_no: 0,
        kind: LineKind::Charge,
        charge: line.charge.clone(),
        description: line.description.clone(),
        source: line.source.clone(),
        usage: line.usage,
        quantity: line.quantity,
        allowance: line.allowance,
        unit_price: line.unit_price,
        tiers: line.tiers.clone(),
        amount: line.amount,
        usage_from: behind.from,
        usage_to: behind.to,
        batches: behind.batches,
        corrects_period_start: None,
        correction: None,
    }
}
