//! The reverse proxy: forwards every request to the upstream and meters it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tidemark_core::ids::{ANONYMOUS_TENANT, validate_name};
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::meter::{Meters, Outcome};
use crate::telemetry::Telemetry;

/// Response bodies: the upstream's, streamed, or one the proxy wrote.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Headers that describe one hop and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

#[derive(Debug)]
pub struct Proxy {
    upstream_scheme: http::uri::Scheme,
    upstream_authority: http::uri::Authority,
    tenant_header: HeaderName,
    client: Client<HttpConnector, Incoming>,
    meters: Arc<Meters>,
    telemetry: Arc<Telemetry>,
}

impl Proxy {
    pub fn new(
        upstream: &Uri,
        tenant_header: HeaderName,
        meters: Arc<Meters>,
        telemetry: Arc<Telemetry>,
    ) -> Option<Proxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Some(Proxy {
            upstream_scheme: upstream.scheme()?.clone(),
            upstream_authority: upstream.authority()?.clone(),
            tenant_header,
            client: Client::builder(TokioExecutor::new()).build(connector),
            meters,
            telemetry,
        })
    }

    /// The tenant a request belongs to: the tenant header if it holds a valid
    /// name, else `anonymous`.
    fn tenant_of<'a>(&self, req: &'a Request<Incoming>) -> &'a str {
        req.headers()
            .get(&self.tenant_header)
            .and_then(|v| v.to_str().ok())
            .filter(|t| validate_name(t).is_ok())
            .unwrap_or(ANONYMOUS_TENANT)
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        client_addr: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let tenant = self.tenant_of(&req).to_owned();
        self.meters.begin(started);
        let response = match self.rewrite(&mut req, client_addr) {
            Ok(()) => match self.client.request(req).await {
                Ok(response) => response.map(Either::Left),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream request failed");
                    self.telemetry.upstream_errors.inc();
                    plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot forward request");
                plain(StatusCode::BAD_REQUEST, "cannot forward this request\n")
            }
        };
        let outcome = Outcome {
            error: response.status().is_server_error(),
            duration_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        self.meters.end(Instant::now(), &tenant, outcome);
        self.telemetry.requests.inc();
        response
    }

    /// Points the request at the upstream, drops hop-by-hop headers and adds
    /// `X-Forwarded-For`.
    fn rewrite(
        &self,
        req: &mut Request<Incoming>,
        client_addr: SocketAddr,
    ) -> Result<(), http::Error> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = Uri::builder()
            .scheme(self.upstream_scheme.clone())
            .authority(self.upstream_authority.clone())
            .path_and_query(path)
            .build()?;
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        for name in &HOP_BY_HOP {
            headers.remove(name);
        }
        if let Ok(value) = HeaderValue::from_str(&client_addr.ip().to_string()) {
            headers.append(HeaderName::from_static("x-forwarded-for"), value);
        }
        Ok(())
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Accepts connections until `shutdown` fires, then waits for the requests
/// in flight to finish.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, mut shutdown: Shutdown) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, client_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            async move { Ok::<_, Infallible>(proxy.handle(req, client_addr).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
