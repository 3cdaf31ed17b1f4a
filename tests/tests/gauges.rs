//! Billing's refreshed gauges against what they stand for, in process:
//!
//! - `tidemark_billing_consumer_lag_records` equals the records appended to
//!   the usage log that the ledger has not committed, partition by
//!   partition: all of them before the ledger runs, none once it caught up,
//!   exactly the new ones appended while it is stopped. On the embedded log
//!   with SQLite, and on the real Kafka broker with the real Postgres.
//! - `tidemark_billing_open_period_revenue` equals the total that `GET
//!   /v1/tenants/{id}/cost` answers for each top tenant, and the
//!   `tenant="(other)"` series the sum of the rest, per currency.
//! - `Gauges::spawn`, as `tidemark-billing` runs it, keeps both current and
//!   stops with the shutdown.
//!
//! The values are read from the exporter's `/metrics` text.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use prometheus_client::registry::Registry;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use tidemark_billing::api::ApiState;
use tidemark_billing::auth::Auth;
use tidemark_billing::gauges::{GaugeArgs, Gauges, OTHER_TENANTS, PartitionLag, Sources};
use tidemark_billing::ledger::Ledger;
use tidemark_billing::store::Store;
use tidemark_billing::telemetry::Telemetry;
use tidemark_billing::{BillingArgs, invoice::Invoicing};
use tidemark_core::window::now_micros;
use tidemark_e2e::{fresh_postgres_database, get, kafka_brokers, unique_topic, usage_batch};
use tidemark_log::embedded::EmbeddedConfig;
use tidemark_log::kafka::KafkaConfig;
use tidemark_log::topics::encode_usage;
use tidemark_log::{Log, LogConfig, TopicSpec};
use tidemark_proto::v1::UsageBatch;
use tidemark_runtime::admin::{self, Readiness};
use tidemark_runtime::shutdown::{Shutdown, Trigger, channel};

const PARTITIONS: u32 = 3;
const SERVICES: [&str; 5] = ["shop", "search", "cart", "media", "auth"];

/// Billing's flags as parsed from `args` (the rest at their defaults).
#[derive(Debug, Parser)]
struct Flags {
    #[command(flatten)]
    billing: BillingArgs,
}

fn invoicing(store: &Store, args: &[&str]) -> Invoicing {
    let flags = Flags::try_parse_from(std::iter::once("billing").chain(args.iter().copied())).unwrap();
    flags.billing.invoicing(store.clone()).unwrap()
}

/// The gauges on a registry served at a real `/metrics`.
struct Exporter {
    gauges: Arc<Gauges>,
    addr: SocketAddr,
    _stop: Trigger,
}

impl Exporter {
    async fn start() -> Exporter {
        let mut registry = Registry::default();
        let gauges = Arc::new(Gauges::register(&mut registry));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = channel();
        tokio::spawn(admin::serve(
            listener,
            Arc::new(registry),
            Readiness::default(),
            shutdown,
        ));
        Exporter {
            gauges,
            addr,
            _stop: stop,
        }
    }

    /// The samples of `family` on `/metrics`: labels as written → value.
    async fn samples(&self, family: &str) -> BTreeMap<String, f64> {
        let (status, body) = get(&format!("http://{}/metrics", self.addr), &[]).await;
        assert!(status.is_success(), "{body}");
        body.lines()
            .filter_map(|line| line.strip_prefix(family))
            .filter_map(|rest| rest.strip_prefix('{'))
            .map(|rest| {
                let (labels, value) = rest.rsplit_once("} ").unwrap();
                (labels.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    /// The exported lag by partition.
    async fn lag(&self) -> BTreeMap<i32, i64> {
        self.samples("tidemark_billing_consumer_lag_records")
            .await
            .into_iter()
            .map(|(labels, value)| {
                let partition = labels.strip_prefix("partition=\"").unwrap().trim_end_matches('"');
                (partition.parse().unwrap(), value as i64)
            })
            .collect()
    }
}

/// Usage batches, each service in a session of its own.
struct Batches {
    session: String,
    /// The next seq of each service's session.
    seqs: BTreeMap<String, u64>,
}

impl Batches {
    fn new() -> Batches {
        Batches {
            session: uuid::Uuid::new_v4().to_string(),
            seqs: BTreeMap::new(),
        }
    }

    fn next(&mut self, service: &str, start: i64, tenants: &[(&str, u64)]) -> UsageBatch {
        let next = self.seqs.entry(service.to_owned()).or_insert(0);
        let seq = *next;
        *next += 1;
        // One session per service, numbered from 0 without holes.
        usage_batch(service, &format!("{}-{service}", self.session), seq, start, tenants)
    }
}

/// Appends `count` batches (services in turn) and returns how many landed
/// in each partition.
async fn append(
    log: &Log,
    topic: &str,
    batches: &mut Batches,
    count: usize,
    tenants: &[(&str, u64)],
) -> BTreeMap<i32, i64> {
    let mut landed = BTreeMap::new();
    for i in 0..count {
        let batch = batches.next(SERVICES[i % SERVICES.len()], now_micros(), tenants);
        let (key, payload) = encode_usage(&batch);
        let position = log.append(topic, &key, payload).await.unwrap();
        *landed.entry(position.partition).or_insert(0) += 1;
    }
    landed
}

/// Every partition, with 0 where nothing landed.
fn all_partitions(landed: &BTreeMap<i32, i64>) -> BTreeMap<i32, i64> {
    (0..PARTITIONS as i32)
        .map(|p| (p, landed.get(&p).copied().unwrap_or(0)))
        .collect()
}

fn as_map(lag: &[PartitionLag]) -> BTreeMap<i32, i64> {
    lag.iter().map(|l| (l.partition, l.records)).collect()
}

/// A ledger reading `topic` into `store` until the trigger fires.
async fn start_ledger(log: &Log, store: &Store, topic: &str, group: &str) -> (Trigger, tokio::task::JoinHandle<()>) {
    let consumer = log.consumer(topic, group).await.unwrap();
    let telemetry = Arc::new(Telemetry::register(&mut Registry::default()));
    let ledger = Ledger::new(consumer, store.clone(), topic, telemetry, Duration::from_secs(600))
        .await
        .unwrap();
    let (stop, shutdown): (Trigger, Shutdown) = channel();
    let task = tokio::spawn(async move {
        ledger.run(Duration::from_millis(50), shutdown).await.unwrap();
    });
    (stop, task)
}

/// The gauge as the exporter shows it after a refresh; asserts that the
/// refresh returned the same.
async fn refreshed_lag(exporter: &Exporter, log: &Log, store: &Store, topic: &str) -> BTreeMap<i32, i64> {
    let lag = exporter.gauges.refresh_lag(log, store, topic).await.unwrap();
    let exported = exporter.lag().await;
    assert_eq!(as_map(&lag), exported, "refresh and /metrics disagree");
    exported
}

/// The lag follows the backlog: everything before the ledger runs, nothing
/// once it has caught up, exactly the records appended while it is stopped.
async fn lag_follows_the_backlog(log: Log, store: Store) {
    let topic = unique_topic();
    let spec = TopicSpec {
        partitions: PARTITIONS,
        compacted: false,
    };
    log.ensure_topic(&topic, spec).await.unwrap();
    let exporter = Exporter::start().await;
    let mut batches = Batches::new();

    // A new Kafka topic may take a moment to show in the metadata.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = exporter.gauges.refresh_lag(&log, &store, &topic).await {
        assert!(tokio::time::Instant::now() < deadline, "no watermarks: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        refreshed_lag(&exporter, &log, &store, &topic).await,
        all_partitions(&BTreeMap::new()),
        "an empty topic: every partition at 0"
    );

    let first = append(&log, &topic, &mut batches, 23, &[("acme", 2)]).await;
    assert!(first.len() >= 2, "the services spread over partitions: {first:?}");
    assert_eq!(
        refreshed_lag(&exporter, &log, &store, &topic).await,
        all_partitions(&first),
        "nothing committed yet: the lag is everything appended"
    );

    let group = format!("billing-{topic}");
    let (stop, ledger) = start_ledger(&log, &store, &topic, &group).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lag = refreshed_lag(&exporter, &log, &store, &topic).await;
        if lag.values().all(|records| *records == 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger never caught up: {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.fire();
    ledger.await.unwrap();
    let committed = store.offsets(&topic).await.unwrap();
    for (partition, count) in &first {
        assert_eq!(committed.get(partition), Some(count), "partition {partition}");
    }

    // With the ledger stopped, the lag is exactly what comes after.
    let second = append(&log, &topic, &mut batches, 7, &[("acme", 3)]).await;
    assert_eq!(
        refreshed_lag(&exporter, &log, &store, &topic).await,
        all_partitions(&second)
    );
    // A ledger that starts again reads it all, and the lag is 0 again.
    let (stop, ledger) = start_ledger(&log, &store, &topic, &group).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while refreshed_lag(&exporter, &log, &store, &topic)
        .await
        .values()
        .any(|records| *records != 0)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ledger never caught up again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.fire();
    ledger.await.unwrap();
}

async fn open_sqlite(dir: &Path) -> Store {
    Store::open(&format!("sqlite:{}", dir.join("billing.db").display()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn lag_equals_the_backlog_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
        dir: dir.path().join("log"),
    }))
    .await
    .unwrap();
    let store = open_sqlite(dir.path()).await;
    lag_follows_the_backlog(log, store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lag_equals_the_backlog_on_kafka_and_postgres() {
    let log = Log::open(LogConfig::Kafka(KafkaConfig {
        brokers: kafka_brokers(),
        properties: Vec::new(),
    }))
    .await
    .unwrap();
    let store = Store::open(&fresh_postgres_database().await).await.unwrap();
    lag_follows_the_backlog(log, store).await;
}

/// `Gauges::spawn` (what `tidemark-billing` runs) fills both gauges from the
/// start, keeps them current, and stops with the shutdown.
#[tokio::test(flavor = "multi_thread")]
async fn spawned_refreshes_keep_the_gauges_current_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
        dir: dir.path().join("log"),
    }))
    .await
    .unwrap();
    let topic = unique_topic();
    let spec = TopicSpec {
        partitions: PARTITIONS,
        compacted: false,
    };
    log.ensure_topic(&topic, spec).await.unwrap();
    let store = open_sqlite(dir.path()).await;
    let invoicing = invoicing(&store, &["--default-plan=aws-lambda-x86"]);
    let exporter = Exporter::start().await;
    let (stop, shutdown) = channel();
    let args = GaugeArgs {
        lag_interval: Duration::from_millis(50),
        revenue_interval: Duration::from_millis(50),
        revenue_top_tenants: 20,
    };
    let sources = Sources {
        log: log.clone(),
        store: store.clone(),
        usage_topic: topic.clone(),
        invoicing,
    };
    let task = Arc::clone(&exporter.gauges).spawn(&args, sources, shutdown);

    let landed = append(&log, &topic, &mut Batches::new(), 6, &[("acme", 5)]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while exporter.lag().await != all_partitions(&landed) {
        assert!(tokio::time::Instant::now() < deadline, "lag never showed the backlog");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once a ledger counts the usage, acme shows up (within the free tier: 0).
    let (stop_ledger, ledger) = start_ledger(&log, &store, &topic, "billing").await;
    loop {
        let revenue = exporter.samples("tidemark_billing_open_period_revenue").await;
        let lag = exporter.lag().await;
        if revenue.get("tenant=\"acme\",currency=\"USD\"") == Some(&0.0) && lag.values().all(|l| *l == 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauges never caught up: {revenue:?} {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_ledger.fire();
    ledger.await.unwrap();

    stop.fire();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the refreshes stop with the shutdown")
        .unwrap();
}

/// A plan charging every request, so that amounts differ by tenant.
fn write_plan(dir: &Path, name: &str, currency: &str, price: &str) {
    let plan = format!(
        "name = \"{name}\"\nversion = 1\ncurrency = \"{currency}\"\n\
         rounding = {{ step = \"0.01\", rule = \"half_up\" }}\n\n\
         [meters.requests]\nmodel = \"unit\"\nprice = \"{price}\"\n"
    );
    std::fs::write(dir.join(format!("{name}.toml")), plan).unwrap();
}

async fn cost_total(api: SocketAddr, tenant: &str) -> (String, Decimal) {
    let (status, body) = get(&format!("http://{api}/v1/tenants/{tenant}/cost"), &[]).await;
    assert!(status.is_success(), "{tenant}: {status} {body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        json["currency"].as_str().unwrap().to_owned(),
        json["total"].as_str().unwrap().parse().unwrap(),
    )
}

/// Waits out the last two minutes of a month, so that the usage written
/// now and the running cost read later fall in the same period.
async fn away_from_a_month_end(invoicing: &Invoicing) {
    let now = now_micros();
    let period = invoicing.zone.period_at(now).unwrap();
    let left = period.end - now;
    if left < 120_000_000 {
        tokio::time::sleep(Duration::from_micros(left as u64 + 1_000_000)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revenue_equals_the_cost_api_for_top_tenants_and_the_rest_sums_up() {
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans");
    std::fs::create_dir(&plans).unwrap();
    write_plan(&plans, "per-request-usd", "USD", "0.01");
    write_plan(&plans, "per-request-eur", "EUR", "0.02");
    let store = open_sqlite(dir.path()).await;
    let plans_flag = format!("--plans-dir={}", plans.display());
    let invoicing = invoicing(&store, &[&plans_flag, "--default-plan=per-request-usd"]);
    away_from_a_month_end(&invoicing).await;

    let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
        dir: dir.path().join("log"),
    }))
    .await
    .unwrap();
    let topic = unique_topic();
    log.ensure_topic(
        &topic,
        TopicSpec {
            partitions: PARTITIONS,
            compacted: false,
        },
    )
    .await
    .unwrap();

    let (stop_api, api_shutdown) = channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let api_task = tokio::spawn(tidemark_billing::api::serve(
        listener,
        ApiState {
            store: store.clone(),
            auth: Auth::open(),
            invoicing: invoicing.clone(),
        },
        api_shutdown,
    ));
    // globex pays in EUR; everyone else is on the default plan, in USD.
    let period = invoicing.zone.period_at(now_micros()).unwrap();
    let starts_at = chrono::DateTime::from_timestamp_micros(period.start)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = format!(r#"{{"plan": "per-request-eur", "starts_at": "{starts_at}"}}"#);
    let (status, answer) = put(api, "/v1/tenants/globex/subscription", &body).await;
    assert!(status.is_success(), "{status} {answer}");

    // 5 USD tenants of different sizes (two of them equal), 1 EUR tenant,
    // 2 batches each (twice the requests below).
    let usage = [
        ("acme", 50u64),
        ("initech", 700),
        ("hooli", 120),
        ("umbrella", 120),
        ("stark", 9),
        ("globex", 40),
    ];
    let mut batches = Batches::new();
    append(&log, &topic, &mut batches, 2, &usage).await;
    let (stop_ledger, ledger) = start_ledger(&log, &store, &topic, "billing").await;
    let exporter = Exporter::start().await;
    caught_up(&exporter, &log, &store, &topic).await;

    let revenue = exporter
        .gauges
        .refresh_revenue(&invoicing, 2, now_micros())
        .await
        .unwrap();
    assert_eq!((revenue.priced, revenue.unpriced), (6, 0));
    let mut api_totals = BTreeMap::new();
    for (tenant, _) in usage {
        api_totals.insert(tenant, cost_total(api, tenant).await);
    }
    // Requests: 2 × the table; USD 0.01, EUR 0.02 a request.
    assert_eq!(api_totals["initech"], ("USD".to_owned(), "14.00".parse().unwrap()));
    assert_eq!(api_totals["globex"], ("EUR".to_owned(), "1.60".parse().unwrap()));

    let exported = exporter.samples("tidemark_billing_open_period_revenue").await;
    let series = |tenant: &str, currency: &str| {
        exported
            .get(&format!("tenant=\"{tenant}\",currency=\"{currency}\""))
            .copied()
    };
    // USD's top two: initech, then hooli and umbrella tie at 2.40 and hooli
    // ranks first by name; the rest (umbrella, acme, stark) is summed.
    for tenant in ["initech", "hooli"] {
        let (currency, total) = &api_totals[tenant];
        assert_eq!(series(tenant, currency), total.to_f64(), "{tenant}: {exported:?}");
    }
    let rest: Decimal = ["umbrella", "acme", "stark"].iter().map(|t| api_totals[t].1).sum();
    assert_eq!(rest, "3.58".parse().unwrap());
    assert_eq!(series(OTHER_TENANTS, "USD"), rest.to_f64(), "{exported:?}");
    // EUR has one tenant: no rest.
    assert_eq!(series("globex", "EUR"), api_totals["globex"].1.to_f64());
    assert_eq!(series(OTHER_TENANTS, "EUR"), None);
    assert_eq!(exported.len(), 4, "{exported:?}");
    let tenants = exporter.samples("tidemark_billing_open_period_tenants").await;
    assert_eq!(tenants.get("state=\"priced\""), Some(&6.0), "{tenants:?}");

    // More usage moves the gauge by what the cost API moves by.
    append(&log, &topic, &mut batches, 1, &[("stark", 1000)]).await;
    caught_up(&exporter, &log, &store, &topic).await;
    exporter
        .gauges
        .refresh_revenue(&invoicing, 2, now_micros())
        .await
        .unwrap();
    let exported = exporter.samples("tidemark_billing_open_period_revenue").await;
    let (_, stark) = cost_total(api, "stark").await;
    assert_eq!(stark, "10.18".parse().unwrap());
    assert_eq!(
        exported.get("tenant=\"stark\",currency=\"USD\"").copied(),
        stark.to_f64(),
        "{exported:?}"
    );
    assert_eq!(
        exported.get("tenant=\"initech\",currency=\"USD\"").copied(),
        Some(14.0),
        "{exported:?}"
    );

    stop_ledger.fire();
    ledger.await.unwrap();
    stop_api.fire();
    api_task.await.unwrap().unwrap();
}

/// Waits (up to a minute) until the exported lag of every partition is 0.
async fn caught_up(exporter: &Exporter, log: &Log, store: &Store, topic: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while exporter
        .gauges
        .refresh_lag(log, store, topic)
        .await
        .unwrap()
        .iter()
        .any(|l| l.records != 0)
    {
        assert!(tokio::time::Instant::now() < deadline, "the ledger never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PUTs a JSON body; returns the status and the answer.
async fn put(api: SocketAddr, path: &str, body: &str) -> (hyper::StatusCode, String) {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    let client: Client<_, http_body_util::Full<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let request = hyper::Request::put(format!("http://{api}{path}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
