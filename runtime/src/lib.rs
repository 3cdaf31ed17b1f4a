//! What every Tidemark binary shares: layered configuration, logging, the
//! admin endpoints, listeners that say what they serve, and shutdown.

pub mod admin;
pub mod config;
pub mod listen;
pub mod metrics;
pub mod shutdown;

/// Starts logging to stderr. `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
