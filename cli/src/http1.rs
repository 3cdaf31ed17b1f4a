//! The HTTP/1.1 accept loop the CLI's servers share (the demo app and the
//! `tidemark dev` entry port): accept, serve each connection on its own
//! task, and on shutdown let open requests finish for a while.

use std::time::Duration;

use anyhow::Context;
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;

/// How long shutdown waits for open requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves HTTP/1.1 on `listener` with a service made per connection by
/// `make`, until `shutdown` fires; then waits up to [`DRAIN_TIMEOUT`] for
/// open requests.
pub async fn serve<S, B>(listener: TcpListener, mut shutdown: Shutdown, make: impl Fn() -> S) -> anyhow::Result<()>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), make()));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .context("open connections did not finish in time")
}
