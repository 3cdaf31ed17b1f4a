//! The admin endpoints every long-running binary serves: `/metrics`
//! (Prometheus text format), `/healthz` (the process runs) and `/readyz`
//! (it can do its job).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Whether the process is ready to serve. Starts not ready.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
struct AdminState {
    registry: Arc<Registry>,
    readiness: Readiness,
}

/// Serves the admin endpoints on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Readiness,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { registry, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Where the admin endpoints listen.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "TIDEMARK_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: std::net::SocketAddr,
}

/// Binds `addr` (logging it) and serves the admin endpoints there in the
/// background until `shutdown` fires.
pub async fn spawn(
    addr: std::net::SocketAddr,
    registry: Registry,
    readiness: Readiness,
    shutdown: Shutdown,
) -> std::io::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let listener = crate::listen::bind(addr, "metrics, healthz, readyz").await?;
    Ok(tokio::spawn(serve(listener, Arc::new(registry), readiness, shutdown)))
}
