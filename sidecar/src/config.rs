//! The sidecar's flags (each with its `TIDEMARK_*` twin and TOML key).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tidemark_runtime::config::duration;

use crate::proxy::UpstreamProtocol;

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

    /// HTTP version towards the upstream: `auto` keeps the client's (HTTP/2
    /// stays h2c, so gRPC passes through), or always `http1` or `http2` (h2c).
    #[arg(long, env = "TIDEMARK_UPSTREAM_PROTOCOL", value_enum, default_value = "auto")]
    pub upstream_protocol: UpstreamProtocol,

    /// Service this instance belongs to.
    #[arg(long, env = "TIDEMARK_SERVICE")]
    pub service: String,

    /// Name of this instance (default: `<service>-<process id>`).
    #[arg(long, env = "TIDEMARK_INSTANCE")]
    pub instance: Option<String>,

    /// Collector's ingest gRPC endpoint.
    #[arg(long, env = "TIDEMARK_COLLECTOR", default_value = "http://127.0.0.1:7400")]
    pub collector: http::Uri,

    /// PEM file of the CA that signed the collector's certificate, for an
    /// `https://` collector (default: the system's trusted roots).
    #[arg(long, env = "TIDEMARK_COLLECTOR_CA")]
    pub collector_ca: Option<PathBuf>,

    /// Bearer token sent to the collector (`authorization: Bearer ...`).
    #[arg(long, env = "TIDEMARK_COLLECTOR_TOKEN", hide_env_values = true)]
    pub collector_token: Option<String>,

    /// How often usage is reported (at least 100ms).
    #[arg(long, env = "TIDEMARK_REPORT_INTERVAL", value_parser = duration, default_value = "1s")]
    pub report_interval: Duration,

    /// Request header that names the tenant; requests without it are `anonymous`.
    #[arg(long, env = "TIDEMARK_TENANT_HEADER", default_value = "x-tenant-id")]
    pub tenant_header: http::HeaderName,

    /// TOML file mapping API keys to tenants (`[keys]` table, key = tenant);
    /// when given, the tenant comes from --api-key-header, not --tenant-header.
    #[arg(long, env = "TIDEMARK_API_KEYS")]
    pub api_keys: Option<PathBuf>,

    /// Request header that carries the API key looked up in --api-keys.
    #[arg(long, env = "TIDEMARK_API_KEY_HEADER", default_value = "x-api-key")]
    pub api_key_header: http::HeaderName,

    /// Most distinct tenants per window; requests of further tenants are
    /// billed to `_overflow` and counted.
    #[arg(long, env = "TIDEMARK_MAX_TENANTS", default_value_t = 10_000)]
    pub max_tenants: usize,

    /// Response header in which the app reports custom usage
    /// (`tokens=532, images=2`); stripped before the client sees it.
    #[arg(long, env = "TIDEMARK_USAGE_HEADER", default_value = "tidemark-usage")]
    pub usage_header: http::HeaderName,

    /// Billed duration is each request's duration rounded up to this step
    /// (1ms like AWS Lambda, 100ms like Cloud Run).
    #[arg(long, env = "TIDEMARK_BILLING_STEP", value_parser = duration, default_value = "1ms")]
    pub billing_step: Duration,

    /// Least billed duration of a request (100ms like Azure Functions).
    #[arg(long, env = "TIDEMARK_BILLING_MINIMUM", value_parser = duration, default_value = "0s")]
    pub billing_minimum: Duration,

    /// Most requests forwarded at once (0: no limit).
    #[arg(long, env = "TIDEMARK_MAX_CONCURRENCY", default_value_t = 0)]
    pub max_concurrency: usize,

    /// With --max-concurrency, most requests waiting for a slot; beyond, 503 at once.
    #[arg(long, env = "TIDEMARK_MAX_QUEUE", default_value_t = 100)]
    pub max_queue: usize,

    /// Longest wait to connect to the upstream.
    #[arg(long, env = "TIDEMARK_CONNECT_TIMEOUT", value_parser = duration, default_value = "5s")]
    pub connect_timeout: Duration,

    /// Longest wait for the upstream's response headers (then 504).
    #[arg(long, env = "TIDEMARK_UPSTREAM_TIMEOUT", value_parser = duration, default_value = "5m")]
    pub upstream_timeout: Duration,

    /// Longest wait for a client's request headers.
    #[arg(long, env = "TIDEMARK_CLIENT_HEADER_TIMEOUT", value_parser = duration, default_value = "30s")]
    pub client_header_timeout: Duration,

    /// How long idle upstream connections are kept for reuse.
    #[arg(long, env = "TIDEMARK_IDLE_TIMEOUT", value_parser = duration, default_value = "90s")]
    pub idle_timeout: Duration,

    /// The app's cgroup v2 directory, to sample its CPU and memory.
    #[arg(long, env = "TIDEMARK_APP_CGROUP", conflicts_with = "app_pid")]
    pub app_cgroup: Option<PathBuf>,

    /// The app's process id, to sample its CPU and memory from /proc.
    #[arg(long, env = "TIDEMARK_APP_PID")]
    pub app_pid: Option<u32>,

    /// Directory where batches wait, on disk, until the collector has them;
    /// they are resent after a crash or restart. Without it, unacknowledged
    /// usage lives in memory only.
    #[arg(long, env = "TIDEMARK_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,

    /// Most bytes the spool holds; beyond, batches wait in memory only.
    #[arg(long, env = "TIDEMARK_SPOOL_MAX_BYTES", default_value_t = 256 << 20)]
    pub spool_max_bytes: u64,

    /// Most unacknowledged batches kept in memory before the oldest is dropped (and counted).
    #[arg(long, env = "TIDEMARK_MAX_PENDING_BATCHES", default_value_t = 100_000)]
    pub max_pending_batches: usize,

    /// Threads serving requests; 0 means one per core. A sidecar shares its
    /// machine with the app: one thread keeps it to one core's worth of CPU
    /// and saves cross-core hand-offs (see bench/RESULTS.md).
    #[arg(long, env = "TIDEMARK_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// How long shutdown waits for the collector to acknowledge the last batches.
    #[arg(long, env = "TIDEMARK_DRAIN_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub admin: tidemark_runtime::admin::AdminArgs,
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
    #[error("--billing-step must be at least 1µs")]
    BillingStep,
    #[error("--collector-token is not a valid header value")]
    CollectorToken,
    #[error("--collector-ca {path}: {reason}")]
    CollectorCa { path: PathBuf, reason: String },
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
        if self.billing_step < Duration::from_micros(1) {
            return Err(InvalidConfig::BillingStep);
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
