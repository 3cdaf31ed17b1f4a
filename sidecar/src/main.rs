//! `tidemark-sidecar`: see the library crate.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let config: tidemark_sidecar::Config = tidemark_runtime::config::load_or_exit();
    let mut runtime = match config.worker_threads {
        0 => tokio::runtime::Builder::new_multi_thread(),
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(n);
            builder
        }
    };
    let runtime = runtime.enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        tidemark_runtime::init_logging();
        let shutdown = tidemark_runtime::shutdown::on_signal();
        tidemark_sidecar::run(config, shutdown)
            .await
            .context("tidemark-sidecar")
    })
}
