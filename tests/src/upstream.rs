//! A small upstream app for the tests, speaking HTTP/1.1 and h2c:
//!
//! - `/hello`: 200 `hello`;
//! - `/status/NNN`: that status, body `status`;
//! - `/echo`: streams the request body back;
//! - `/drip`: sends `first`, waits 2 s, sends `second` (proves streaming);
//! - `/slow`: waits 1 s, then 200 `slow`;
//! - `/usage`: 200 with `tidemark-usage: tokens=5, bad` (one good, one bad item);
//! - `/trailers`: 200 `body` followed by trailers `grpc-status: 0`,
//!   `grpc-message: done` (as a gRPC server answers);
//! - `/ws`: upgrades (`Upgrade: echo`) and echoes bytes until the client closes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Body = BoxBody<Bytes, hyper::Error>;

fn full(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

async fn route(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(match path.as_str() {
        "/hello" => full(StatusCode::OK, "hello"),
        "/echo" => Response::new(req.into_body().boxed()),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            full(StatusCode::OK, "slow")
        }
        "/drip" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"second")))).await;
            });
            Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed())
        }
        "/trailers" => {
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().expect("static header"));
            trailers.insert("grpc-message", "done".parse().expect("static header"));
            let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"body"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(StreamBody::new(tokio_stream::iter(frames)).boxed())
        }
        "/usage" => {
            let mut response = full(StatusCode::OK, "used");
            response
                .headers_mut()
                .insert("tidemark-usage", "tokens=5, bad".parse().expect("static header"));
            response
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut response = full(StatusCode::SWITCHING_PROTOCOLS, "");
            response
                .headers_mut()
                .insert("connection", "upgrade".parse().expect("static header"));
            response
                .headers_mut()
                .insert("upgrade", "echo".parse().expect("static header"));
            response
        }
        other => match other.strip_prefix("/status/").and_then(|s| s.parse::<u16>().ok()) {
            Some(code) => full(StatusCode::from_u16(code).unwrap_or(StatusCode::OK), "status"),
            None => full(StatusCode::NOT_FOUND, "no such route"),
        },
    })
}

/// Starts the upstream on a free loopback port.
pub async fn start() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service_fn(route))
                    .await;
            });
        }
    });
    addr
}
