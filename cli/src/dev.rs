//! `tidemark dev`: collector and billing in one process, over the embedded
//! usage log and SQLite, with everything kept in one data directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use tidemark_billing::api::ApiState;
use tidemark_billing::ledger::Ledger;
use tidemark_billing::store::Store;
use tidemark_billing::telemetry::Telemetry;
use tidemark_billing::{BillingArgs, DEFAULT_GROUP};
use tidemark_collector::{Collector, IngestArgs, ScalingArgs};
use tidemark_log::embedded::EmbeddedConfig;
use tidemark_log::topics::{USAGE_TOPIC, USAGE_TOPIC_SPEC};
use tidemark_log::{Log, LogConfig};
use tidemark_runtime::admin::{self, AdminArgs, Readiness};
use tidemark_runtime::listen::bind;
use tidemark_runtime::shutdown::Shutdown;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Directory for the embedded usage log and the billing database.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = ".tidemark")]
    pub data_dir: PathBuf,

    /// Address of the collector's ingest gRPC service, where sidecars connect.
    #[arg(long, env = "TIDEMARK_INGEST_LISTEN", default_value = "127.0.0.1:7400")]
    pub ingest_listen: SocketAddr,

    #[command(flatten)]
    pub ingest: IngestArgs,
    #[command(flatten)]
    pub scaling: ScalingArgs,
    #[command(flatten)]
    pub billing: BillingArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Runs until `shutdown` fires.
pub async fn run(args: DevArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
        dir: args.data_dir.join("log"),
    }))
    .await?;
    log.ensure_topic(USAGE_TOPIC, USAGE_TOPIC_SPEC).await?;
    let auth = args.billing.api_auth().context("cannot start: check --api-tokens")?;
    let database = format!("sqlite:{}", args.data_dir.join("billing.db").display());
    let store = Store::open(&database).await?;
    let invoicing = args
        .billing
        .invoicing(store.clone())
        .context("cannot start: check --plans-dir and --default-plan")?;

    let mut registry = Registry::default();
    let collector = Collector::start(
        log.clone(),
        USAGE_TOPIC,
        args.ingest.policy().context("cannot start: check --ingest-tokens")?,
        &args.scaling,
        &mut registry,
        shutdown.clone(),
    )
    .await?;
    let telemetry = Arc::new(Telemetry::register(&mut registry));
    let consumer = log.consumer(USAGE_TOPIC, DEFAULT_GROUP).await?;
    let ledger = Ledger::new(consumer, store.clone(), USAGE_TOPIC, telemetry, args.billing.gap_grace)
        .await?
        .with_late_after(args.billing.late_after);

    let ingest_listener = bind(args.ingest_listen, "ingest gRPC").await?;
    let api_listener = bind(args.billing.api_listen, "billing HTTP API").await?;
    let grpc_listener = bind(args.billing.grpc_listen, "billing gRPC").await?;
    let readiness = Readiness::default();
    let admin_task = admin::spawn(args.admin.admin_listen, registry, readiness.clone(), shutdown.clone()).await?;
    let ingest_task = tokio::spawn(collector.serve(ingest_listener, None, shutdown.clone()));
    let api_state = ApiState { store, auth, invoicing };
    let grpc_task = tokio::spawn(tidemark_billing::grpc::serve(
        grpc_listener,
        api_state.clone(),
        shutdown.clone(),
    ));
    let api_task = tokio::spawn(tidemark_billing::api::serve(api_listener, api_state, shutdown.clone()));
    readiness.set(true);
    tracing::info!(data_dir = %args.data_dir.display(), "tidemark dev is running; Ctrl-C stops it");

    ledger
        .run(args.billing.commit_interval, shutdown)
        .await
        .context("ledger failed")?;
    ingest_task.await?.context("collector failed")?;
    api_task.await?.context("billing HTTP API failed")?;
    grpc_task.await?.context("billing gRPC failed")?;
    admin_task.await?.context("admin endpoints failed")?;
    Ok(())
}
