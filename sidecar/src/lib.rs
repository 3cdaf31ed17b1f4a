//! Tidemark's sidecar: a reverse proxy in front of one app instance that
//! meters every request per tenant and reports usage to the collector.
//!
//! - [`proxy`] forwards requests and updates [`meter`]s on the way;
//! - [`reporter`] closes a window every report interval, numbers it
//!   `(session, seq)`, and delivers it until the collector acks it.
//!
//! The request path never waits on reporting: it only touches the meters.

pub mod config;
pub mod meter;
pub mod proxy;
pub mod reporter;
pub mod telemetry;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::registry::Registry;
use tidemark_runtime::admin::{self, Readiness};
use tidemark_runtime::listen::bind;
use tidemark_runtime::shutdown::{self, Shutdown};

pub use config::Config;
use meter::Meters;
use proxy::Proxy;
use reporter::{Identity, Pending};
use telemetry::Telemetry;

/// Why the sidecar could not run.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Config(#[from] config::InvalidConfig),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Runs the sidecar until `shutdown` fires, then stops accepting, lets the
/// requests in flight finish, reports the last window and waits (up to
/// `--drain-timeout`) for the collector to acknowledge what is pending.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), SidecarError> {
    let config = config.validate()?;
    let mut registry = Registry::default();
    let telemetry = Arc::new(Telemetry::register(&mut registry));
    let meters = Arc::new(Meters::new(Instant::now()));
    let identity = Identity {
        service: config.service.clone(),
        instance: config.instance.clone().unwrap_or_default(),
        session_id: uuid::Uuid::new_v4().to_string(),
    };
    let proxy = Proxy::new(
        &config.upstream,
        config.tenant_header.clone(),
        Arc::clone(&meters),
        Arc::clone(&telemetry),
    )
    .ok_or_else(|| config::InvalidConfig::Upstream(config.upstream.clone()))?;

    let listener = bind(config.listen, "proxy").await?;
    let readiness = Readiness::default();
    let pending = Arc::new(Pending::new(
        config.max_pending_batches,
        Arc::clone(&telemetry),
    ));

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
    let windows_task = tokio::spawn(reporter::windows(
        identity.clone(),
        Arc::clone(&meters),
        Arc::clone(&pending),
        config.report_interval,
        after_proxy,
    ));
    let deliver_task = tokio::spawn(reporter::deliver(
        config.collector.clone(),
        Arc::clone(&pending),
        Arc::clone(&telemetry),
        after_windows,
    ));
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
    if tokio::time::timeout(config.drain_timeout, deliver_task)
        .await
        .is_err()
    {
        tracing::error!(
            pending = pending.len(),
            "shutting down with usage the collector has not acknowledged: it is lost"
        );
    }
    let _ = admin_task.await;
    tracing::info!("sidecar stopped");
    Ok(())
}
