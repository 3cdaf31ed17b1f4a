//! `tidemark demo-app`: a small, fast HTTP/1.1 app to put behind a sidecar.
//!
//! It is the upstream of the sidecar benchmark (`bench/sidecar/`) and the
//! app to try Tidemark with. Every request gets `200 OK` with a body of
//! `--response-bytes` bytes after `--work` of simulated work; the request
//! body is read and thrown away. Connections are kept alive.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use tidemark_runtime::config::duration;
use tidemark_runtime::listen::bind;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;

/// The body is this text repeated (and cut) to `--response-bytes`.
const BODY_PATTERN: &[u8] = b"Hello, world!";

#[derive(Debug, Clone, Args)]
pub struct DemoAppArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address the app listens on.
    #[arg(long, env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,

    /// Simulated work per request, e.g. `0ms`, `5ms`: a sleep, or a busy spin with `--cpu-work`.
    #[arg(long, env = "TIDEMARK_WORK", value_parser = duration, default_value = "0ms")]
    pub work: Duration,

    /// Spend `--work` busy on a CPU (on the blocking pool) instead of sleeping.
    #[arg(long, env = "TIDEMARK_CPU_WORK")]
    pub cpu_work: bool,

    /// Size of every response body in bytes.
    #[arg(long, env = "TIDEMARK_RESPONSE_BYTES", default_value_t = 13)]
    pub response_bytes: usize,
}

/// What every request gets.
#[derive(Debug, Clone)]
pub struct Behavior {
    pub work: Duration,
    pub cpu_work: bool,
    pub body: Bytes,
}

impl Behavior {
    pub fn from_args(args: &DemoAppArgs) -> Behavior {
        Behavior {
            work: args.work,
            cpu_work: args.cpu_work,
            body: body_of_len(args.response_bytes),
        }
    }
}

/// A body of exactly `len` bytes: the pattern repeated, the last copy cut.
pub fn body_of_len(len: usize) -> Bytes {
    BODY_PATTERN.iter().copied().cycle().take(len).collect()
}

/// Runs until `shutdown` fires.
pub async fn run(args: DemoAppArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    let listener = bind(args.listen, "demo app").await?;
    tracing::info!(
        work = ?args.work,
        cpu_work = args.cpu_work,
        response_bytes = args.response_bytes,
        "demo app is running; Ctrl-C stops it"
    );
    serve(listener, Behavior::from_args(&args), shutdown).await
}

/// Serves HTTP/1.1 on `listener` until `shutdown` fires, then lets open
/// requests finish.
pub async fn serve(listener: TcpListener, behavior: Behavior, shutdown: Shutdown) -> anyhow::Result<()> {
    crate::http1::serve(listener, shutdown, move || {
        let behavior = behavior.clone();
        service_fn(move |request| respond(request, behavior.clone()))
    })
    .await
}

async fn respond(request: Request<Incoming>, behavior: Behavior) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            // The client went away mid-body; answer anyway, hyper drops it.
            tracing::debug!(error = %e, "cannot read the request body");
            break;
        }
    }
    work(behavior.work, behavior.cpu_work).await;
    Ok(Response::new(Full::new(behavior.body)))
}

/// Simulated work: a sleep, or with `cpu` a busy spin off the async workers.
async fn work(length: Duration, cpu: bool) {
    if length.is_zero() {
        return;
    }
    if !cpu {
        tokio::time::sleep(length).await;
        return;
    }
    let spin = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        while start.elapsed() < length {
            std::hint::spin_loop();
        }
    });
    if let Err(e) = spin.await {
        tracing::warn!(error = %e, "CPU work task failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_asked_length() {
        assert_eq!(body_of_len(0), Bytes::new());
        assert_eq!(body_of_len(13), Bytes::from_static(b"Hello, world!"));
        assert_eq!(body_of_len(5), Bytes::from_static(b"Hello"));
        assert_eq!(body_of_len(16), Bytes::from_static(b"Hello, world!Hel"));
        assert_eq!(body_of_len(100_000).len(), 100_000);
    }

    #[tokio::test]
    async fn cpu_work_takes_at_least_its_length() {
        let start = Instant::now();
        work(Duration::from_millis(20), true).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
        let start = Instant::now();
        work(Duration::from_millis(20), false).await;
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
