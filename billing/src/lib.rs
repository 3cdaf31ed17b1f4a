//! Tidemark's billing: consumes the usage log into an exact ledger of
//! per-tenant rollups and answers usage queries.
//!
//! - [`ledger`] reads the log and commits batches, dedupe state and offsets
//!   in one transaction;
//! - [`store`] is that database, SQLite or Postgres;
//! - [`api`] is the HTTP query API and [`grpc`] the gRPC `tidemark.v1.Billing`
//!   service, both behind the bearer tokens of [`auth`];
//! - [`gauges`] exports the consumer lag and the open period's revenue per
//!   tenant, refreshed on an interval.

pub mod api;
pub mod auth;
pub mod gauges;
pub mod grpc;
pub mod invoice;
pub mod ledger;
pub mod pricing;
pub mod quantity;
pub mod query;
pub mod reconcile;
pub mod rollup;
pub mod sessions;
pub mod store;
pub mod subscriptions;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::auth::{ApiTokens, Auth, TokensError};
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

    /// Transactions a ledger commit is split into by partition, run at once on their own
    /// connections (Postgres; SQLite commits in one).
    #[arg(long, env = "TIDEMARK_PARALLEL_COMMITS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel_commits: u16,

    /// A batch committed longer than this after its window ended is late:
    /// also kept in late usage with the minute it was stored.
    #[arg(long, env = "TIDEMARK_LATE_AFTER", value_parser = duration, default_value = "5m")]
    pub late_after: Duration,

    /// TOML file of API bearer tokens with scopes (`admin` or `tenant:NAME`), for HTTP and gRPC;
    /// without it every caller is admin (local use only).
    #[arg(long, env = "TIDEMARK_API_TOKENS")]
    pub api_tokens: Option<PathBuf>,

    /// Address of the billing gRPC service (tidemark.v1.Billing).
    #[arg(long, env = "TIDEMARK_GRPC_LISTEN", default_value = "127.0.0.1:7412")]
    pub grpc_listen: SocketAddr,

    /// Directory of price plans (every `*.toml` in it, docs/pricing.md); without it, the
    /// plans shipped in billing/plans/, built into the binary.
    #[arg(long, env = "TIDEMARK_PLANS_DIR")]
    pub plans_dir: Option<PathBuf>,

    /// Plan (its latest version) for tenants without a subscription; without it, such
    /// tenants have no invoice until PUT /v1/tenants/{id}/subscription gives them one.
    #[arg(long, env = "TIDEMARK_DEFAULT_PLAN")]
    pub default_plan: Option<String>,

    /// Time zone whose calendar months are the billing periods: UTC, a fixed offset
    /// (+01:00, -05:30) or an IANA name (Europe/Berlin).
    #[arg(long, env = "TIDEMARK_TIME_ZONE", default_value = "UTC")]
    pub time_zone: crate::invoice::period::BillingZone,

    /// How long after a period ends its usage is still waited for before its
    /// invoices may be finalized.
    #[arg(long, env = "TIDEMARK_COLLECTION_WAIT", value_parser = duration, default_value = "1h")]
    pub collection_wait: Duration,
}

impl BillingArgs {
    /// Who may read what, with the `--api-tokens` file read.
    pub fn api_auth(&self) -> Result<Auth, TokensError> {
        match &self.api_tokens {
            Some(path) => {
                let tokens = ApiTokens::load(path)?;
                tracing::info!(tokens = tokens.len(), file = %path.display(), "billing API tokens loaded");
                Ok(Auth::with_tokens(tokens))
            }
            None => {
                tracing::warn!(
                    "no --api-tokens: every billing API caller is admin and reads every tenant; for local use only"
                );
                Ok(Auth::open())
            }
        }
    }
}
