//! Gauges billing refreshes on an interval, for the dashboards:
//!
//! - **consumer lag**, per partition of the usage topic: the records the log
//!   holds that the ledger has not committed to the store yet, that is the
//!   partition's high watermark minus the store's next offset (the offset
//!   the ledger resumes from, committed with the rollups), every
//!   `--lag-interval`. Kafka or the embedded log alike.
//! - **revenue of the open period**, per tenant and currency: the total of
//!   each tenant's running cost ([`Invoicing::running_cost`], what `GET
//!   /v1/tenants/{id}/cost` answers), every `--revenue-interval`. Tenants
//!   are unbounded, so only the `--revenue-top-tenants` largest amounts of
//!   each currency get a series of their own; the rest are summed under
//!   `tenant="(other)"`, which no tenant can be named (`(` is not a name
//!   character).
//!
//! Both are exported as whole snapshots: a scrape sees one refresh or the
//! next, never half of each. A refresh that fails keeps the previous values
//! and counts `tidemark_billing_refresh_errors_total{refresh}`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use clap::Args;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use tidemark_core::window::now_micros;
use tidemark_log::{Log, LogError, Watermarks};
use tidemark_runtime::config::duration;
use tidemark_runtime::shutdown::Shutdown;

use crate::invoice::{InvoiceError, Invoicing};
use crate::store::{Store, StoreError};

/// The `tenant` label of the revenue summed over the tenants outside the top.
pub const OTHER_TENANTS: &str = "(other)";

/// The most tenants per currency `--revenue-top-tenants` allows.
pub const MAX_TOP_TENANTS: u32 = 1000;

/// When the gauges are refreshed, and how many tenants get a series.
#[derive(Debug, Clone, Args)]
pub struct GaugeArgs {
    /// How often the consumer lag per partition (tidemark_billing_consumer_lag_records) is read
    /// from the log's watermarks and the store's offsets; 0 turns it off.
    #[arg(long, env = "TIDEMARK_LAG_INTERVAL", value_parser = duration, default_value = "5s")]
    pub lag_interval: Duration,

    /// How long to wait between two computations of the open period's revenue per tenant
    /// (tidemark_billing_open_period_revenue): every tenant's running cost, as GET
    /// /v1/tenants/{id}/cost answers it; 0 turns it off.
    #[arg(long, env = "TIDEMARK_REVENUE_INTERVAL", value_parser = duration, default_value = "30s")]
    pub revenue_interval: Duration,

    /// Tenants per currency whose revenue gets a series of its own, the largest amounts first;
    /// the others are summed under tenant="(other)".
    #[arg(long, env = "TIDEMARK_REVENUE_TOP_TENANTS", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_TOP_TENANTS)))]
    pub revenue_top_tenants: u32,
}

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum GaugeError {
    #[error("usage log: {0}")]
    Log(#[from] LogError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("running cost: {0}")]
    Invoice(#[from] InvoiceError),
    #[error("the clock is outside every billing period")]
    ClockOutOfRange,
}

/// One partition's consumer lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// Records in the log not committed to the store yet.
    pub records: i64,
}

/// The records each partition holds beyond the store's committed next
/// offset: `high − max(committed, low)`, never below 0.
///
/// A partition the store has no offset for is read from its beginning, so
/// all of it is behind. Records Kafka's retention deleted before the ledger
/// read them are not in the log any more (`low` is past them) and do not
/// count. A committed offset past the end (a topic recreated under an old
/// database) shows as 0.
pub fn consumer_lag(watermarks: &[Watermarks], committed: &HashMap<i32, i64>) -> Vec<PartitionLag> {
    let mut lag: Vec<PartitionLag> = watermarks
        .iter()
        .map(|w| {
            let next = committed.get(&w.partition).copied().unwrap_or(w.low).max(w.low);
            PartitionLag {
                partition: w.partition,
                records: w.high.saturating_sub(next).max(0),
            }
        })
        .collect();
    lag.sort_by_key(|l| l.partition);
    lag
}

/// One tenant's (or the other tenants') revenue in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRevenue {
    pub tenant: String,
    pub currency: String,
    pub amount: Decimal,
}

/// The `top` largest amounts of each currency as they are, and the rest of
/// the currency summed under [`OTHER_TENANTS`] (only if there is a rest).
/// Equal amounts rank by tenant name. Sorted by currency, then rank, the
/// other tenants last.
pub fn top_tenants(revenue: Vec<TenantRevenue>, top: usize) -> Vec<TenantRevenue> {
    let mut by_currency: BTreeMap<String, Vec<TenantRevenue>> = BTreeMap::new();
    for r in revenue {
        by_currency.entry(r.currency.clone()).or_default().push(r);
    }
    let mut out = Vec::new();
    for (currency, mut tenants) in by_currency {
        tenants.sort_by(|a, b| b.amount.cmp(&a.amount).then_with(|| a.tenant.cmp(&b.tenant)));
        let rest = tenants.split_off(top.min(tenants.len()));
        out.extend(tenants);
        if !rest.is_empty() {
            let amount = rest.iter().fold(Decimal::ZERO, |sum, r| sum.saturating_add(r.amount));
            out.push(TenantRevenue {
                tenant: OTHER_TENANTS.to_owned(),
                currency,
                amount,
            });
        }
    }
    out
}

/// What a revenue refresh found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revenue {
    /// The exported series: [`top_tenants`] of every priced tenant.
    pub series: Vec<TenantRevenue>,
    /// Tenants whose running cost was computed.
    pub priced: usize,
    /// Tenants with usage or a subscription whose running cost could not be
    /// computed (no plan, a plan not loaded, a rating error).
    pub unpriced: usize,
}

type Labels = Vec<(&'static str, String)>;

/// A gauge family replaced whole at each refresh.
#[derive(Debug)]
struct SnapshotGauge<N> {
    name: &'static str,
    help: &'static str,
    series: RwLock<Vec<(Labels, N)>>,
}

impl<N> SnapshotGauge<N> {
    fn new(name: &'static str, help: &'static str) -> SnapshotGauge<N> {
        SnapshotGauge {
            name,
            help,
            series: RwLock::new(Vec::new()),
        }
    }

    fn replace(&self, series: Vec<(Labels, N)>) {
        *self.series.write().unwrap_or_else(PoisonError::into_inner) = series;
    }
}

impl<N> Collector for SnapshotGauge<N>
where
    N: EncodeGaugeValue + std::fmt::Debug + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
        if series.is_empty() {
            return Ok(()); // as an empty family: no descriptor until there is data
        }
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, MetricType::Gauge)?;
        for (labels, value) in series.iter() {
            metric.encode_family(labels)?.encode_gauge(value)?;
        }
        Ok(())
    }
}

/// What one kind of refresh reports about itself.
#[derive(Debug, Clone, Default)]
struct RefreshStats {
    seconds: Gauge<f64, AtomicU64>,
    errors: Counter,
}

/// The gauges, registered once; refreshed by [`Gauges::spawn`] or by hand
/// with [`Gauges::refresh_lag`] and [`Gauges::refresh_revenue`].
#[derive(Debug)]
pub struct Gauges {
    lag: Arc<SnapshotGauge<i64>>,
    revenue: Arc<SnapshotGauge<f64>>,
    priced: Gauge,
    unpriced: Gauge,
    lag_stats: RefreshStats,
    revenue_stats: RefreshStats,
}

/// What the gauges are computed from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub log: Log,
    pub store: Store,
    pub usage_topic: String,
    pub invoicing: Invoicing,
}

impl Gauges {
    pub fn register(registry: &mut Registry) -> Gauges {
        let r = registry.sub_registry_with_prefix("tidemark_billing");
        let lag = Arc::new(SnapshotGauge::new(
            "consumer_lag_records",
            "Records of the usage topic's partition not committed to the billing store yet: the partition's high \
             watermark minus the store's next offset (every billing worker reports every partition)",
        ));
        r.register_collector(Box::new(Arc::clone(&lag)));
        let revenue = Arc::new(SnapshotGauge::new(
            "open_period_revenue",
            "Running amount of the open billing period per tenant, in the plan's currency (the total of GET \
             /v1/tenants/{id}/cost): the --revenue-top-tenants largest per currency, the other tenants summed under \
             tenant=\"(other)\"",
        ));
        r.register_collector(Box::new(Arc::clone(&revenue)));
        let tenants = Family::<Labels, Gauge>::default();
        r.register(
            "open_period_tenants",
            "Tenants with usage or a subscription in the open billing period, by whether their running cost could \
             be computed (unpriced: no plan, a plan not loaded, a rating error)",
            tenants.clone(),
        );
        let seconds = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "refresh_duration_seconds",
            "How long the last refresh of a gauge took (refresh: consumer_lag or revenue)",
            seconds.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        r.register(
            "refresh_errors",
            "Gauge refreshes that failed; the gauge keeps its previous values (refresh: consumer_lag or revenue)",
            errors.clone(),
        );
        // Each handle in a statement of its own: `get_or_create` holds the
        // family's read lock until the end of the statement.
        let series = |family: &Family<Labels, Gauge>, label: &'static str, value: &str| {
            family.get_or_create(&vec![(label, value.to_owned())]).clone()
        };
        let stats = |name: &str| {
            let labels = vec![("refresh", name.to_owned())];
            let seconds = seconds.get_or_create(&labels).clone();
            let errors = errors.get_or_create(&labels).clone();
            RefreshStats { seconds, errors }
        };
        let priced = series(&tenants, "state", "priced");
        let unpriced = series(&tenants, "state", "unpriced");
        let lag_stats = stats("consumer_lag");
        let revenue_stats = stats("revenue");
        Gauges {
            lag,
            revenue,
            priced,
            unpriced,
            lag_stats,
            revenue_stats,
        }
    }

    /// Reads the store's offsets, then the log's watermarks, and exports
    /// the lag of every partition. On failure the previous values stay.
    pub async fn refresh_lag(&self, log: &Log, store: &Store, topic: &str) -> Result<Vec<PartitionLag>, GaugeError> {
        let started = Instant::now();
        let result = async {
            // Offsets first: the watermarks read after them are at least as
            // far, so the lag is never under the truth.
            let committed = store.offsets(topic).await?;
            let watermarks = log.watermarks(topic).await?;
            Ok::<_, GaugeError>(consumer_lag(&watermarks, &committed))
        }
        .await;
        self.lag_stats.seconds.set(started.elapsed().as_secs_f64());
        let lag = result.inspect_err(|_| {
            self.lag_stats.errors.inc();
        })?;
        self.lag.replace(
            lag.iter()
                .map(|l| (vec![("partition", l.partition.to_string())], l.records))
                .collect(),
        );
        Ok(lag)
    }

    /// Computes every tenant's running cost of the period holding `now`,
    /// one tenant at a time (each on a connection of its own, so the
    /// ledger's commits get their turn in between), and exports the `top`
    /// largest per currency and the rest summed. On failure (the database)
    /// the previous values stay.
    pub async fn refresh_revenue(&self, invoicing: &Invoicing, top: usize, now: i64) -> Result<Revenue, GaugeError> {
        let started = Instant::now();
        let result = revenue(invoicing, top, now).await;
        self.revenue_stats.seconds.set(started.elapsed().as_secs_f64());
        let revenue = result.inspect_err(|_| {
            self.revenue_stats.errors.inc();
        })?;
        self.priced.set(i64::try_from(revenue.priced).unwrap_or(i64::MAX));
        self.unpriced.set(i64::try_from(revenue.unpriced).unwrap_or(i64::MAX));
        self.revenue.replace(
            revenue
                .series
                .iter()
                .map(|r| {
                    let labels = vec![("tenant", r.tenant.clone()), ("currency", r.currency.clone())];
                    (labels, r.amount.to_f64().unwrap_or(f64::NAN))
                })
                .collect(),
        );
        Ok(revenue)
    }

    /// Refreshes the lag every `lag_interval` and the revenue
    /// `revenue_interval` after the previous computation ended, from the
    /// start until `shutdown` (which also stops a refresh halfway); an
    /// interval of 0 leaves its gauge out.
    pub fn spawn(
        self: Arc<Self>,
        args: &GaugeArgs,
        sources: Sources,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let args = args.clone();
        tokio::spawn(async move {
            let lag = async {
                if args.lag_interval.is_zero() {
                    return;
                }
                let mut failing = Failing::new("consumer lag");
                let mut shutdown = shutdown.clone();
                loop {
                    // A refresh only reads: stopping it halfway is safe.
                    tokio::select! {
                        () = shutdown.wait() => return,
                        refreshed = self.refresh_lag(&sources.log, &sources.store, &sources.usage_topic) => {
                            failing.note(refreshed.map(drop));
                        }
                    }
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(args.lag_interval) => {}
                    }
                }
            };
            let revenue = async {
                if args.revenue_interval.is_zero() {
                    return;
                }
                let top = usize::try_from(args.revenue_top_tenants).unwrap_or(usize::MAX);
                let mut failing = Failing::new("revenue");
                let mut shutdown = shutdown.clone();
                loop {
                    let refreshed = tokio::select! {
                        () = shutdown.wait() => return,
                        refreshed = self.refresh_revenue(&sources.invoicing, top, now_micros()) => refreshed,
                    };
                    if let Ok(r) = &refreshed {
                        tracing::debug!(
                            tenants = r.priced,
                            unpriced = r.unpriced,
                            seconds = self.revenue_stats.seconds.get(),
                            "revenue gauge refreshed"
                        );
                    }
                    failing.note(refreshed.map(drop));
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(args.revenue_interval) => {}
                    }
                }
            };
            tokio::join!(lag, revenue);
        })
    }
}

/// Logs the first failure of a run of failures and the recovery, not every one.
#[derive(Debug)]
struct Failing {
    what: &'static str,
    failing: bool,
}

impl Failing {
    fn new(what: &'static str) -> Failing {
        Failing { what, failing: false }
    }

    fn note(&mut self, result: Result<(), GaugeError>) {
        match result {
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(gauge = self.what, error = %e, "cannot refresh a gauge; it keeps its last values");
            }
            Err(e) => tracing::debug!(gauge = self.what, error = %e, "cannot refresh a gauge"),
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!(gauge = self.what, "gauge refreshed again");
            }
            Ok(()) => {}
        }
    }
}

/// Every tenant's running cost of the period holding `now`, bounded.
async fn revenue(invoicing: &Invoicing, top: usize, now: i64) -> Result<Revenue, GaugeError> {
    let period = invoicing.zone.period_at(now).ok_or(GaugeError::ClockOutOfRange)?;
    let tenants = invoicing.tenants(&period).await?;
    let mut priced = Vec::with_capacity(tenants.len());
    let mut unpriced = 0;
    for tenant in tenants {
        match invoicing.running_cost(&tenant, now).await {
            Ok(draft) => priced.push(TenantRevenue {
                tenant: draft.tenant,
                currency: draft.currency,
                amount: draft.total,
            }),
            Err(e @ InvoiceError::Db(_)) => return Err(e.into()),
            Err(e) => {
                tracing::debug!(tenant, error = %e, "no running cost for the revenue gauge");
                unpriced += 1;
            }
        }
        tokio::task::yield_now().await;
    }
    Ok(Revenue {
        priced: priced.len(),
        unpriced,
        series: top_tenants(priced, top),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(partition: i32, low: i64, high: i64) -> Watermarks {
        Watermarks { partition, low, high }
    }

    fn lag(partition: i32, records: i64) -> PartitionLag {
        PartitionLag { partition, records }
    }

    #[test]
    fn lag_is_the_high_watermark_minus_the_committed_offset() {
        let committed = HashMap::from([(0, 7), (1, 10), (2, 3)]);
        let got = consumer_lag(&[marks(2, 0, 3), marks(0, 0, 10), marks(1, 0, 10)], &committed);
        assert_eq!(got, [lag(0, 3), lag(1, 0), lag(2, 0)]);
    }

    #[test]
    fn a_partition_without_a_committed_offset_is_behind_by_all_it_holds() {
        let got = consumer_lag(&[marks(0, 0, 5), marks(1, 40, 45), marks(2, 0, 0)], &HashMap::new());
        assert_eq!(got, [lag(0, 5), lag(1, 5), lag(2, 0)]);
    }

    #[test]
    fn records_deleted_before_they_were_read_are_not_behind() {
        // Retention deleted offsets below 100; the store stopped at 60.
        let got = consumer_lag(&[marks(0, 100, 130)], &HashMap::from([(0, 60)]));
        assert_eq!(got, [lag(0, 30)]);
    }

    #[test]
    fn an_offset_past_the_end_is_no_lag_and_unknown_partitions_are_ignored() {
        let got = consumer_lag(&[marks(0, 0, 5)], &HashMap::from([(0, 9), (7, 1)]));
        assert_eq!(got, [lag(0, 0)]);
    }

    fn rev(tenant: &str, currency: &str, amount: &str) -> TenantRevenue {
        TenantRevenue {
            tenant: tenant.to_owned(),
            currency: currency.to_owned(),
            amount: amount.parse().unwrap(),
        }
    }

    #[test]
    fn the_top_tenants_of_each_currency_keep_their_series_and_the_rest_is_summed() {
        let revenue = vec![
            rev("a", "USD", "1.50"),
            rev("b", "USD", "20.00"),
            rev("c", "USD", "3.25"),
            rev("d", "USD", "0.10"),
            rev("e", "EUR", "7"),
            rev("f", "USD", "3.25"),
        ];
        let got = top_tenants(revenue, 2);
        assert_eq!(
            got,
            [
                rev("e", "EUR", "7"),
                rev("b", "USD", "20.00"),
                // Equal amounts rank by name: c before f.
                rev("c", "USD", "3.25"),
                rev(OTHER_TENANTS, "USD", "4.85"),
            ]
        );
        // The sum per currency is kept exactly.
        let usd: Decimal = got.iter().filter(|r| r.currency == "USD").map(|r| r.amount).sum();
        assert_eq!(usd, "28.10".parse::<Decimal>().unwrap());
    }

    #[test]
    fn no_other_series_without_a_rest_and_top_zero_sums_everything() {
        let revenue = vec![rev("a", "USD", "1"), rev("b", "USD", "2")];
        assert_eq!(
            top_tenants(revenue.clone(), 2),
            [rev("b", "USD", "2"), rev("a", "USD", "1")]
        );
        assert_eq!(top_tenants(revenue.clone(), 5).len(), 2);
        assert_eq!(top_tenants(revenue, 0), [rev(OTHER_TENANTS, "USD", "3")]);
        assert!(top_tenants(Vec::new(), 3).is_empty());
    }

    #[test]
    fn the_label_set_is_bounded_by_top_and_currencies_however_many_tenants() {
        let revenue: Vec<TenantRevenue> = (0..10_000)
            .map(|i| rev(&format!("t{i}"), if i % 2 == 0 { "USD" } else { "EUR" }, &i.to_string()))
            .collect();
        let got = top_tenants(revenue, 20);
        assert_eq!(got.len(), 2 * 21);
        assert_eq!(got[0], rev("t9999", "EUR", "9999"));
        let other_eur = got
            .iter()
            .find(|r| r.tenant == OTHER_TENANTS && r.currency == "EUR")
            .unwrap();
        // EUR: odd 1..=9999 sum to 25,000,000; the top 20 are 9961..=9999.
        let top: i64 = (0..20).map(|k| 9999 - 2 * k).sum();
        assert_eq!(other_eur.amount, Decimal::from(25_000_000 - top));
    }

    #[test]
    fn other_is_not_a_tenant_name() {
        assert!(tidemark_core::ids::validate_name(OTHER_TENANTS).is_err());
    }

    #[test]
    fn snapshots_are_exported_whole_and_replaced_whole() {
        let mut registry = Registry::default();
        let gauges = Gauges::register(&mut registry);
        let text = |registry: &Registry| {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
            out
        };
        assert!(!text(&registry).contains("consumer_lag_records"));
        gauges.lag.replace(vec![
            (vec![("partition", "0".to_owned())], 4),
            (vec![("partition", "1".to_owned())], 0),
        ]);
        gauges.revenue.replace(vec![(
            vec![("tenant", "acme".to_owned()), ("currency", "USD".to_owned())],
            1.25,
        )]);
        let out = text(&registry);
        assert!(
            out.contains("# TYPE tidemark_billing_consumer_lag_records gauge\n"),
            "{out}"
        );
        assert!(
            out.contains("tidemark_billing_consumer_lag_records{partition=\"0\"} 4\n"),
            "{out}"
        );
        assert!(
            out.contains("tidemark_billing_consumer_lag_records{partition=\"1\"} 0\n"),
            "{out}"
        );
        assert!(
            out.contains("tidemark_billing_open_period_revenue{tenant=\"acme\",currency=\"USD\"} 1.25\n"),
            "{out}"
        );
        assert!(
            out.contains("tidemark_billing_refresh_errors_total{refresh=\"revenue\"} 0\n"),
            "{out}"
        );
        gauges.revenue.replace(vec![(
            vec![("tenant", OTHER_TENANTS.to_owned()), ("currency", "USD".to_owned())],
            2.0,
        )]);
        let out = text(&registry);
        assert!(!out.contains("tenant=\"acme\""), "{out}");
        assert!(out.contains("tenant=\"(other)\",currency=\"USD\"} 2.0\n"), "{out}");
    }
}
