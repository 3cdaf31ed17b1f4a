//! `tidemark-sidecar`: see the library crate.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: tidemark_sidecar::Config = tidemark_runtime::config::load_or_exit();
    tidemark_runtime::init_logging();
    let (trigger, shutdown) = tidemark_runtime::shutdown::channel();
    tokio::spawn(async move {
        tidemark_runtime::shutdown::signal().await;
        tracing::info!("shutting down");
        trigger.fire();
    });
    tidemark_sidecar::run(config, shutdown).await.context("tidemark-sidecar")
}
