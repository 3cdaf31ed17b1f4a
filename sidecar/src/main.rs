//! `tidemark-sidecar`: see the library crate.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: tidemark_sidecar::Config = tidemark_runtime::config::load_or_exit();
    tidemark_runtime::init_logging();
    let shutdown = tidemark_runtime::shutdown::on_signal();
    tidemark_sidecar::run(config, shutdown)
        .await
        .context("tidemark-sidecar")
}
