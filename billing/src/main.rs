//! `tidemark-billing`: see the library crate.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use tidemark_billing::api::ApiState;
use tidemark_billing::gauges::{GaugeArgs, Gauges, Sources};
use tidemark_billing::ledger::Ledger;
use tidemark_billing::store::Store;
use tidemark_billing::telemetry::Telemetry;
use tidemark_billing::{BillingArgs, DEFAULT_GROUP};
use tidemark_log::args::KafkaArgs;
use tidemark_log::{Log, LogConfig};
use tidemark_runtime::admin::{self, AdminArgs, Readiness};

/// Tidemark's billing worker: consumes usage from Kafka into an exact ledger
/// and serves the usage query API.
#[derive(Debug, Parser)]
#[command(name = "tidemark-billing", version, mut_arg("admin_listen", |a| a.default_value("127.0.0.1:7411")))]
struct Args {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    config: Option<std::path::PathBuf>,

    /// Database: `sqlite:PATH` (created if missing) or `postgres://USER@HOST:PORT/DB`.
    #[arg(long, env = "TIDEMARK_DATABASE_URL", default_value = "sqlite:tidemark-billing.db")]
    database_url: String,

    /// Consumer group of the billing workers.
    #[arg(long, env = "TIDEMARK_GROUP", default_value = DEFAULT_GROUP)]
    group: String,

    #[command(flatten)]
    billing: BillingArgs,
    #[command(flatten)]
    gauges: GaugeArgs,
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    admin: AdminArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = tidemark_runtime::config::load_or_exit();
    tidemark_runtime::init_logging();
    let shutdown = tidemark_runtime::shutdown::on_signal();

    let auth = args.billing.api_auth().context("cannot start: check --api-tokens")?;
    let store = Store::open(&args.database_url)
        .await
        .context("cannot start: check --database-url")?;
    let invoicing = args
        .billing
        .invoicing(store.clone())
        .context("cannot start: check --plans-dir and --default-plan")?;
    let log = Log::open(LogConfig::Kafka(args.kafka.kafka_config()))
        .await
        .context("cannot start: check --kafka-brokers")?;
    let topic = &args.kafka.usage_topic;
    log.ensure_topic(topic, tidemark_log::topics::USAGE_TOPIC_SPEC)
        .await
        .with_context(|| format!("cannot create topic {topic}"))?;
    let consumer = log.consumer(topic, &args.group).await?;

    let mut registry = Registry::default();
    let telemetry = Arc::new(Telemetry::register(&mut registry));
    let gauges = Arc::new(Gauges::register(&mut registry));
    let ledger = Ledger::new(consumer, store.clone(), topic, telemetry, args.billing.gap_grace)
        .await?
        .with_late_after(args.billing.late_after)
        .with_parallel_commits(usize::from(args.billing.parallel_commits));
    let api_listener = tidemark_runtime::listen::bind(args.billing.api_listen, "billing HTTP API").await?;
    let grpc_listener = tidemark_runtime::listen::bind(args.billing.grpc_listen, "billing gRPC").await?;
    let readiness = Readiness::default();
    let admin_task = admin::spawn(args.admin.admin_listen, registry, readiness.clone(), shutdown.clone()).await?;

    let gauges_task = gauges.spawn(
        &args.gauges,
        Sources {
            log: log.clone(),
            store: store.clone(),
            usage_topic: topic.clone(),
            invoicing: invoicing.clone(),
        },
        shutdown.clone(),
    );
    let api_state = ApiState { store, auth, invoicing };
    let grpc_task = tokio::spawn(tidemark_billing::grpc::serve(
        grpc_listener,
        api_state.clone(),
        shutdown.clone(),
    ));
    let api_task = tokio::spawn(tidemark_billing::api::serve(api_listener, api_state, shutdown.clone()));
    readiness.set(true);
    ledger
        .run(args.billing.commit_interval, shutdown)
        .await
        .context("ledger failed")?;
    api_task.await??;
    gauges_task.await?;
    grpc_task.await?.context("billing gRPC failed")?;
    admin_task.await??;
    tracing::info!("billing stopped");
    Ok(())
}
