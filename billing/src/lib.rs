//! Tidemark's billing: consumes the usage log into an exact ledger of
//! per-tenant rollups and answers usage queries.
//!
//! - [`ledger`] reads the log and commits batches, dedupe state and offsets
//!   in one transaction;
//! - [`store`] is that database, SQLite or Postgres;
//! - [`api`] is the HTTP query API.

pub mod api;
pub mod ledger;
pub mod pricing;
pub mod query;
pub mod sessions;
pub mod store;
pub mod telemetry;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tidemark_runtime::config::duration;

/// The consumer group billing workers share.
pub const DEFAULT_GROUP: &str = "tidemark-billing";

/// Billing's own settings, shared by `tidemark-billing` and `tidemark dev`.
#[derive(Debug, Clone, Args)]
pub struct BillingArgs {
    /// Address of the billing HTTP API.
    #[arg(long, env = "TIDEMARK_API_LISTEN", default_value = "127.0.0.1:7410")]
    pub api_listen: SocketAddr,

    /// How long a session's missing batch is waited for before it is
    /// declared lost (reported as missing usage in GET /v1/gaps).
    #[arg(long, env = "TIDEMARK_GAP_GRACE", value_parser = duration, default_value = "10m")]
    pub gap_grace: Duration,

    /// How often the ledger commits what it read.
    #[arg(long, env = "TIDEMARK_COMMIT_INTERVAL", value_parser = duration, default_value = "1s")]
    pub commit_interval: Duration,
}
