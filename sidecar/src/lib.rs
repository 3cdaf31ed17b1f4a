//! Tidemark's sidecar: a reverse proxy in front of one app instance that
//! meters every request per tenant and reports usage to the collector.
//!
//! - [`proxy`] forwards requests; [`body`] counts what flows and ends each
//!   request; [`tenant`] says whose it is; [`breaker`] bounds concurrency;
//! - [`meter`] holds the per-tenant counters; [`custom_usage`] parses what
//!   the app reports; [`resources`] samples the app and [`attribution`]
//!   splits it among tenants;
//! - [`reporter`] closes a window every report interval, numbers it
//!   `(session, seq)`, writes it to the [`spool`], and delivers it until the
//!   collector answers for it.
//!
//! The request path never waits on reporting: it only touches the meters.

pub mod attribution;
pub mod body;
pub mod breaker;
pub mod config;
pub mod custom_usage;
pub mod meter;
pub mod proxy;
pub mod reporter;
pub mod resources;
pub mod spool;
pub mod telemetry;
pub mod tenant;

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tidemark_runtime::admin::{self, Readiness};
use tidemark_runtime::listen::bind;
use tidemark_runtime::shutdown::{self, Shutdown};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

pub use config::Config;
use meter::{Clock, Tenants};
use proxy::{Proxy, ProxySettings};
use reporter::{CollectorLink, Identity, Pending, Sampler, Windows};
use spool::Spool;
use telemetry::Telemetry;
use tenant::TenantSource;

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Config(#[from] config::InvalidConfig),
    #[error(transparent)]
    Keys(#[from] tenant::KeyFileError),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The collector's endpoint, with TLS for `https://`.
fn collector_endpoint(config: &Config) -> Result<Endpoint, config::InvalidConfig> {
    let endpoint = Endpoint::from(config.collector.clone())
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    if config.collector.scheme_str() != Some("https") {
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(path) = &config.collector_ca {
        let pem = std::fs::read(path).map_err(|e| config::InvalidConfig::CollectorCa {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    endpoint
        .tls_config(tls)
        .map_err(|e| config::InvalidConfig::CollectorCa {
            path: config.collector_ca.clone().unwrap_or_default(),
            reason: e.to_string(),
        })
}

/// Runs the sidecar until `shutdown` fires, then stops accepting, lets the
/// requests in flight finish, reports the last window and waits (up to
/// `--drain-timeout`) for the collector to acknowledge what is pending.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), SidecarError> {
    let config = config.validate()?;
    let mut registry = Registry::default();
    // One per process, alive as long as it: requests borrow it without a
    // reference count.
    let telemetry: &'static Telemetry = Box::leak(Box::new(Telemetry::register(&mut registry)));
    let tenants = Arc::new(Tenants::new(Clock::new(), config.max_tenants));
    let identity = Identity {
        service: config.service.clone(),
        instance: config.instance.clone().unwrap_or_default(),
        session_id: uuid::Uuid::new_v4().to_string(),
    };
    let source = match &config.api_keys {
        Some(path) => TenantSource::ApiKeys {
            header: config.api_key_header.clone(),
            keys: tenant::load_keys(path)?,
        },
        None => TenantSource::Header(config.tenant_header.clone()),
    };
    let settings = ProxySettings {
        upstream: config.upstream.clone(),
        upstream_protocol: config.upstream_protocol,
        tenants: source,
        usage_header: config.usage_header.clone(),
        billing: body::BilledDuration {
            step: config.billing_step,
            minimum: config.billing_minimum,
        },
        max_concurrency: config.max_concurrency,
        max_queue: config.max_queue,
        connect_timeout: config.connect_timeout,
        upstream_timeout: config.upstream_timeout,
        client_header_timeout: config.client_header_timeout,
        idle_timeout: config.idle_timeout,
    };
    let proxy = Proxy::new(settings, Arc::clone(&tenants), telemetry)
        .ok_or_else(|| config::InvalidConfig::Upstream(config.upstream.clone()))?;
    let link = CollectorLink {
        endpoint: collector_endpoint(&config)?,
        token: config
            .collector_token
            .as_deref()
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| config::InvalidConfig::CollectorToken)?,
    };

    let (spool, leftovers) = match &config.spool_dir {
        Some(dir) => {
            let (spool, leftovers) = Spool::open(dir, config.spool_max_bytes)?;
            (Some(Arc::new(spool)), leftovers)
        }
        None => {
            tracing::warn!(
                "no --spool-dir: usage not yet acknowledged by the collector is lost if the sidecar crashes"
            );
            (None, Vec::new())
        }
    };
    let pending = Arc::new(Pending::new(config.max_pending_batches, spool.clone(), telemetry));
    if !leftovers.is_empty() {
        tracing::info!(
            batches = leftovers.len(),
            "resending batches a previous run left in the spool"
        );
    }
    for batch in leftovers {
        pending.push(batch);
    }
    let sampler = match (&config.app_cgroup, config.app_pid) {
        (Some(dir), _) => Some(Sampler::new(resources::Source::Cgroup(dir.clone()))),
        (None, Some(pid)) => Some(Sampler::new(resources::Source::Process(pid))),
        (None, None) => None,
    };

    let listener = bind(config.listen, "proxy").await?;
    let readiness = Readiness::default();
    // Shutdown runs in stages: proxy drained → last window closed → delivered.
    let (proxy_drained, after_proxy) = shutdown::channel();
    let (windows_closed, after_windows) = shutdown::channel();
    let admin_task = admin::spawn(
        config.admin.admin_listen,
        registry,
        readiness.clone(),
        after_windows.clone(),
    )
    .await?;
    let windows = Windows {
        identity: identity.clone(),
        tenants,
        sampler,
        pending: Arc::clone(&pending),
        spool,
        telemetry,
    };
    let windows_task = tokio::spawn(windows.run(config.report_interval, after_proxy));
    let deliver_task = tokio::spawn(reporter::deliver(link, Arc::clone(&pending), telemetry, after_windows));
    readiness.set(true);
    tracing::info!(
        service = %identity.service,
        instance = %identity.instance,
        session = %identity.session_id,
        upstream = %config.upstream,
        collector = %config.collector,
        "sidecar started"
    );

    proxy::serve(listener, Arc::new(proxy), shutdown).await;
    readiness.set(false);
    proxy_drained.fire();
    let _ = windows_task.await;
    windows_closed.fire();
    if tokio::time::timeout(config.drain_timeout, deliver_task).await.is_err() {
        tracing::error!(
            pending = pending.len(),
            spooled = config.spool_dir.is_some(),
            "shutting down with usage the collector has not acknowledged"
        );
    }
    let _ = admin_task.await;
    tracing::info!("sidecar stopped");
    Ok(())
}
