//! The entry port of `tidemark dev`: one address in front of every live
//! instance of the app, each behind its own sidecar.
//!
//! Each request goes to the ready instance with the fewest requests in
//! flight from this port, so concurrency spreads evenly as instances come
//! and go. With no instance ready (the first seconds after start), a request
//! waits for one for up to [`WAIT_FOR_INSTANCE`] instead of failing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long a request waits for a first ready instance.
pub const WAIT_FOR_INSTANCE: Duration = Duration::from_secs(30);

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The live instances and how busy each is from here.
#[derive(Debug)]
struct Backends {
    ready: watch::Receiver<Vec<SocketAddr>>,
    in_flight: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    client: Client<HttpConnector, Incoming>,
}

/// A request counted against one instance until it is dropped.
struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backends {
    /// The ready instance with the fewest requests in flight, leased.
    async fn pick(&self) -> Option<(SocketAddr, Lease)> {
        let mut ready = self.ready.clone();
        let live = tokio::time::timeout(WAIT_FOR_INSTANCE, ready.wait_for(|list| !list.is_empty()))
            .await
            .ok()?
            .ok()?
            .clone();
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        in_flight.retain(|addr, _| live.contains(addr));
        let (addr, count) = live
            .iter()
            .map(|addr| (*addr, Arc::clone(in_flight.entry(*addr).or_default())))
            .min_by_key(|(_, count)| count.load(Ordering::Relaxed))?;
        count.fetch_add(1, Ordering::Relaxed);
        Some((addr, Lease(count)))
    }

    async fn forward(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let Some((addr, lease)) = self.pick().await else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "no instance became ready");
        };
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri = match Uri::try_from(format!("http://{addr}{path}")) {
            Ok(uri) => uri,
            Err(_) => return error(StatusCode::BAD_REQUEST, "request target is not a valid path"),
        };
        *request.uri_mut() = uri;
        match self.client.request(request).await {
            // The lease lives in the body, so it ends when the body is done
            // or dropped.
            Ok(response) => response.map(|body| {
                body.map_frame(move |frame| {
                    let _held = &lease;
                    frame
                })
                .boxed()
            }),
            Err(e) => {
                tracing::debug!(instance = %addr, error = %e, "instance did not answer");
                error(StatusCode::BAD_GATEWAY, "the instance did not answer")
            }
        }
    }
}

fn error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the entry port on `listener` over the instances `ready` lists,
/// until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    ready: watch::Receiver<Vec<SocketAddr>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let backends = Arc::new(Backends {
        ready,
        in_flight: Mutex::new(HashMap::new()),
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    crate::http1::serve(listener, shutdown, move || {
        let backends = Arc::clone(&backends);
        service_fn(move |request| {
            let backends = Arc::clone(&backends);
            async move { Ok::<_, Infallible>(backends.forward(request).await) }
        })
    })
    .await
}
