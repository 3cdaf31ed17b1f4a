//! `tidemark`: the operator CLI. See the library crate.

use clap::{Parser, Subcommand};

/// Tidemark: elastic scaling and pay-per-use billing for any HTTP service.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant (`dev`, with all
// of billing's and the collector's flags) does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run collector and billing in one process over an embedded log and SQLite.
    #[command(mut_arg("admin_listen", |a| a.default_value("127.0.0.1:7401")))]
    Dev(tidemark::dev::DevArgs),
    /// Run a small, fast HTTP/1.1 app: the benchmark upstream and an app to try Tidemark with.
    DemoApp(tidemark::demo_app::DemoAppArgs),
    /// Send HTTP/1.1 load at a constant rate, as fast as possible, or as a request trace has it, and report latency
    /// percentiles.
    Loadgen(tidemark::loadgen::LoadgenArgs),
    /// Replay a request trace against Tidemark's autoscaler and Knative's KPA and the Kubernetes HPA, simulated.
    Simulate(tidemark::simulate::SimulateArgs),
    /// Show a tenant's usage from the billing API, as a table, CSV or JSON.
    Usage(tidemark::usage::UsageArgs),
    /// Prove billing's rollups from the raw usage log over a range of minutes; exits non-zero on any difference.
    Reconcile(tidemark::reconcile::ReconcileArgs),
    /// Check a deployment (collector, Kafka topics, billing's database, price plans) and say what to change.
    Doctor(tidemark::doctor::DoctorArgs),
    /// List, show and finalize invoices through the billing API.
    Invoice(tidemark::invoice::InvoiceArgs),
    /// Run a sidecar, as `tidemark-sidecar` does (used by `tidemark dev` for each instance).
    #[command(hide = true)]
    Sidecar(tidemark_sidecar::Config),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = tidemark_runtime::config::load_or_exit();
    tidemark_runtime::init_logging();
    let shutdown = tidemark_runtime::shutdown::on_signal();
    match cli.command {
        Command::Dev(args) => tidemark::dev::run(args, shutdown).await,
        Command::DemoApp(args) => tidemark::demo_app::run(args, shutdown).await,
        Command::Loadgen(args) => tidemark::loadgen::run(args, shutdown).await,
        Command::Usage(args) => tidemark::usage::run(args).await,
        Command::Reconcile(args) => tidemark::reconcile::run(args).await,
        Command::Doctor(args) => tidemark::doctor::run(args).await,
        Command::Invoice(args) => tidemark::invoice::run(args).await,
        Command::Sidecar(config) => Ok(tidemark_sidecar::run(config, shutdown).await?),
        Command::Simulate(args) => tokio::task::spawn_blocking(move || tidemark::simulate::run(args)).await?,
    }
}
