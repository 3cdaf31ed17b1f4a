//! `tidemark-collector`: see the library crate.

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use tidemark_collector::{Collector, CollectorArgs, ScalingArgs};
use tidemark_log::args::KafkaArgs;
use tidemark_log::topics::USAGE_TOPIC_SPEC;
use tidemark_log::{Log, LogConfig};
use tidemark_runtime::admin::{self, AdminArgs, Readiness};

/// Tidemark's collector: receives usage from sidecars over gRPC and appends
/// it to the usage log in Kafka; scales services from that usage and serves
/// the decisions (gRPC watch, KEDA external scaler, hooks).
#[derive(Debug, Parser)]
#[command(name = "tidemark-collector", version, mut_arg("admin_listen", |a| a.default_value("127.0.0.1:7401")))]
struct Args {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    collector: CollectorArgs,
    #[command(flatten)]
    scaling: ScalingArgs,
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

    let log = Log::open(LogConfig::Kafka(args.kafka.kafka_config()))
        .await
        .context("cannot start: check --kafka-brokers")?;
    log.ensure_topic(&args.kafka.usage_topic, USAGE_TOPIC_SPEC)
        .await
        .with_context(|| format!("cannot create topic {}", args.kafka.usage_topic))?;

    let tls = args
        .collector
        .tls()
        .context("cannot start: check --tls-cert and --tls-key")?;
    let policy = args
        .collector
        .ingest
        .policy()
        .context("cannot start: check --ingest-tokens")?;
    let mut registry = Registry::default();
    let collector = Collector::start(
        log,
        &args.kafka.usage_topic,
        policy,
        &args.scaling,
        &mut registry,
        shutdown.clone(),
    )
    .await
    .context("cannot start")?;
    let listener = tidemark_runtime::listen::bind(args.collector.listen, "ingest gRPC").await?;
    let readiness = Readiness::default();
    let admin_task = admin::spawn(args.admin.admin_listen, registry, readiness.clone(), shutdown.clone()).await?;
    readiness.set(true);
    collector
        .serve(listener, tls, shutdown)
        .await
        .context("collector failed")?;
    admin_task.await??;
    tracing::info!("collector stopped");
    Ok(())
}
