//! The reverse proxy: forwards every request to the upstream and meters it.
//!
//! - HTTP/1.1 and HTTP/2 (h2c) from clients; upstream requests keep the
//!   client's version by default, so gRPC passes through with its trailers.
//! - Bodies stream both ways, counted frame by frame, never buffered whole.
//! - Upgrades (WebSocket) are tunnelled; the request stays in flight, and
//!   billed, until the tunnel closes.
//! - `X-Forwarded-For`, `-Proto` and `-Host` are added; hop-by-hop headers
//!   are dropped.
//! - An optional concurrency limit with a bounded queue answers 503 at once
//!   beyond both.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;

use crate::body::{BilledDuration, RequestBody, RequestEnd, ResponseBody};
use crate::breaker::Breaker;
use crate::custom_usage;
use crate::meter::Tenants;
use crate::telemetry::Telemetry;
use crate::tenant::{Resolved, TenantSource};

/// Headers that describe one hop and must not be forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Which HTTP version requests to the upstream use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamProtocol {
    /// The client's: HTTP/2 stays HTTP/2 (h2c), HTTP/1.x becomes HTTP/1.1.
    Auto,
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// How the proxy behaves; see the sidecar's flags.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub upstream: Uri,
    pub upstream_protocol: UpstreamProtocol,
    pub tenants: TenantSource,
    pub usage_header: HeaderName,
    pub billing: BilledDuration,
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub client_header_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug)]
pub struct Proxy {
    settings: ProxySettings,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    http1: Client<HttpConnector, RequestBody>,
    http2: Client<HttpConnector, RequestBody>,
    breaker: Option<Breaker>,
    meters: Arc<Tenants>,
    telemetry: &'static Telemetry,
}

impl Proxy {
    /// `None` if the upstream URI has no scheme or host.
    pub fn new(settings: ProxySettings, meters: Arc<Tenants>, telemetry: &'static Telemetry) -> Option<Proxy> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let client = |http2: bool| {
            let mut builder = Client::builder(TokioExecutor::new());
            builder
                .pool_idle_timeout(settings.idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(http2);
            builder.build(connector.clone())
        };
        Some(Proxy {
            scheme: settings.upstream.scheme()?.clone(),
            authority: settings.upstream.authority()?.clone(),
            http1: client(false),
            http2: client(true),
            breaker: (settings.max_concurrency > 0).then(|| Breaker::new(settings.max_concurrency, settings.max_queue)),
            settings,
            meters,
            telemetry,
        })
    }

    async fn handle(&self, mut req: Request<Incoming>, client_addr: SocketAddr) -> Response<ResponseBody> {
        let clock = self.meters.clock();
        let resolved = self.settings.tenants.resolve(req.headers());
        if resolved == Resolved::Invalid {
            self.telemetry.invalid_tenants.inc();
        }
        let arrived = clock.now();
        let meter = self.meters.begin(resolved.name(), arrived);
        let (permit, started) = match &self.breaker {
            None => (None, arrived),
            Some(breaker) => match breaker.acquire().await {
                Some(permit) => (Some(permit), clock.now()),
                None => {
                    meter.reject(clock.now());
                    self.telemetry.breaker_rejections.inc();
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "over capacity\n", None);
                }
            },
        };
        let mut end = RequestEnd::new(meter, clock, started, self.settings.billing, self.telemetry, permit);

        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if let Err(e) = self.rewrite(&mut parts, client_addr, upgrade) {
            end.status = StatusCode::BAD_REQUEST.as_u16();
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("cannot forward this request: {e}\n"),
                Some(end),
            );
        }
        let client = if parts.version == Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        };
        let request = Request::from_parts(parts, RequestBody::new(body, Arc::clone(end.meter())));

        let mut response = match tokio::time::timeout(self.settings.upstream_timeout, client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream request failed");
                self.telemetry.upstream_errors.inc();
                end.status = StatusCode::BAD_GATEWAY.as_u16();
                end.error = true;
                return plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n", Some(end));
            }
            Err(_) => {
                self.telemetry.upstream_errors.inc();
                end.status = StatusCode::GATEWAY_TIMEOUT.as_u16();
                end.error = true;
                return plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n", Some(end));
            }
        };
        end.status = response.status().as_u16();
        end.error = response.status().is_server_error();
        self.take_custom_usage(response.headers_mut(), &end);

        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade, end));
            return response.map(|_| ResponseBody::full(Bytes::new(), None));
        }
        strip_hop_by_hop(response.headers_mut());
        response.map(|body| ResponseBody::upstream(body, Some(end)))
    }

    /// Points the request at the upstream, sets its version, drops hop-by-hop
    /// headers (keeping an upgrade's) and adds `X-Forwarded-*`.
    fn rewrite(
        &self,
        parts: &mut http::request::Parts,
        client_addr: SocketAddr,
        upgrade: bool,
    ) -> Result<(), http::Error> {
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()?;
        parts.version = match (self.settings.upstream_protocol, parts.version) {
            (UpstreamProtocol::Http2, _) | (UpstreamProtocol::Auto, Version::HTTP_2) => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        if upgrade && let Some(protocol) = upgrade_to {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        if parts.version == Version::HTTP_2 {
            // HTTP/2 carries the host in the URI; a Host header would be a
            // second, possibly conflicting, one.
            parts.headers.remove(header::HOST);
        }
        if let Ok(ip) = HeaderValue::from_str(&client_addr.ip().to_string()) {
            parts.headers.append(X_FORWARDED_FOR, ip);
        }
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        if let Some(host) = host {
            parts.headers.insert(X_FORWARDED_HOST, host);
        }
        Ok(())
    }

    /// Adds the app's custom usage header to the tenant's meters and removes
    /// it from the response.
    fn take_custom_usage(&self, headers: &mut HeaderMap, end: &RequestEnd) {
        let name = &self.settings.usage_header;
        for value in headers.get_all(name) {
            let Ok(text) = value.to_str() else {
                end.meter().reject_custom();
                self.telemetry.custom_usage_rejects.inc();
                continue;
            };
            for item in custom_usage::parse(text) {
                let accepted = match item {
                    Ok((meter, nanos)) => end.meter().add_custom(meter, nanos),
                    Err(e) => {
                        tracing::debug!(error = %e, "refusing a custom usage item");
                        end.meter().reject_custom();
                        false
                    }
                };
                if !accepted {
                    self.telemetry.custom_usage_rejects.inc();
                }
            }
        }
        headers.remove(name);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// Copies bytes both ways between an upgraded client and upstream, counting
/// them; the request ends when the tunnel closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, end: RequestEnd) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_upstream, to_client)) => {
            end.meter().add_bytes_in(to_upstream);
            end.meter().add_bytes_out(to_client);
        }
        Err(e) => tracing::debug!(error = %e, "tunnel closed with an error"),
    }
}

fn plain(status: StatusCode, body: &str, end: Option<RequestEnd>) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_owned()), end));
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
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.settings.client_header_timeout);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
