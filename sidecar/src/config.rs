//! The sidecar's flags (each with its `TIDEMARK_*` twin and TOML key).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tidemark_runtime::config::duration;

/// Shortest report interval: shorter windows cost more than they tell.
pub const MIN_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Tidemark's sidecar: a reverse proxy in front of one instance of an HTTP
/// service that meters every request per tenant and reports the usage to a
/// collector.
#[derive(Debug, Clone, Parser)]
#[command(name = "tidemark-sidecar", version)]
pub struct Config {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address the proxy listens on; clients connect here.
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The app instance behind the proxy, e.g. `http://127.0.0.1:3000`.
    #[arg(long, env = "TIDEMARK_UPSTREAM")]
    pub upstream: http::Uri,

    /// Service this instance belongs to.
    #[arg(long, env = "TIDEMARK_SERVICE")]
    pub service: String,

    /// Name of this instance (default: `<service>-<process id>`).
    #[arg(long, env = "TIDEMARK_INSTANCE")]
    pub instance: Option<String>,

    /// Collector's ingest gRPC endpoint.
    #[arg(
        long,
        env = "TIDEMARK_COLLECTOR",
        default_value = "http://127.0.0.1:7400"
    )]
    pub collector: http::Uri,

    /// How often usage is reported (at least 100ms).
    #[arg(long, env = "TIDEMARK_REPORT_INTERVAL", value_parser = duration, default_value = "1s")]
    pub report_interval: Duration,

    /// Request header that names the tenant; requests without it are `anonymous`.
    #[arg(long, env = "TIDEMARK_TENANT_HEADER", default_value = "x-tenant-id")]
    pub tenant_header: http::HeaderName,

    #[command(flatten)]
    pub admin: tidemark_runtime::admin::AdminArgs,

    /// Most unacknowledged batches kept in memory before the oldest is dropped (and counted).
    #[arg(long, env = "TIDEMARK_MAX_PENDING_BATCHES", default_value_t = 100_000)]
    pub max_pending_batches: usize,

    /// How long shutdown waits for the collector to acknowledge the last batches.
    #[arg(long, env = "TIDEMARK_DRAIN_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub drain_timeout: Duration,
}

/// A setting that parses but cannot work.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    #[error("--report-interval {0:?} is shorter than the {MIN_REPORT_INTERVAL:?} minimum")]
    ReportIntervalTooShort(Duration),
    #[error("--upstream {0} must be an http:// URL with a host")]
    Upstream(http::Uri),
    #[error("--service {name:?} {reason}")]
    Service {
        name: String,
        reason: tidemark_core::ids::InvalidName,
    },
    #[error("--instance {name:?} {reason}")]
    Instance {
        name: String,
        reason: tidemark_core::ids::InvalidName,
    },
}

impl Config {
    /// Checks what clap cannot and fills the derived defaults.
    pub fn validate(mut self) -> Result<Config, InvalidConfig> {
        use tidemark_core::ids::validate_name;
        if self.report_interval < MIN_REPORT_INTERVAL {
            return Err(InvalidConfig::ReportIntervalTooShort(self.report_interval));
        }
        if self.upstream.scheme_str() != Some("http") || self.upstream.authority().is_none() {
            return Err(InvalidConfig::Upstream(self.upstream));
        }
        validate_name(&self.service).map_err(|reason| InvalidConfig::Service {
            name: self.service.clone(),
            reason,
        })?;
        let instance = self
            .instance
            .take()
            .unwrap_or_else(|| format!("{}-{}", self.service, std::process::id()));
        validate_name(&instance).map_err(|reason| InvalidConfig::Instance {
            name: instance.clone(),
            reason,
        })?;
        self.instance = Some(instance);
        Ok(self)
    }
}
