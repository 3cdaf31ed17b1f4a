//! One keep-alive HTTP/1.1 client connection with one request in flight,
//! reopened when it breaks.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::summary::Outcome;

/// Pause after a failed connect, so a dead target is not hammered in a loop.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {source}")]
    Tcp { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake { addr: SocketAddr, source: hyper::Error },
}

#[derive(Debug)]
pub struct Connection {
    addr: SocketAddr,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Connection {
    /// Opens a connection to `addr` now.
    pub async fn open(addr: SocketAddr) -> Result<Connection, ConnectError> {
        Ok(Connection {
            addr,
            sender: Some(connect(addr).await?),
        })
    }

    /// Sends `request` and reads the whole response. A broken connection is
    /// reopened before the request; a failure leaves it closed for the next.
    pub async fn send(&mut self, request: Request<Empty<Bytes>>) -> Outcome {
        let mut sender = match self.ready_sender().await {
            Ok(sender) => sender,
            Err(e) => {
                tracing::debug!(error = %e, "cannot reopen the connection");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                return Outcome::Io;
            }
        };
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                return Outcome::Io;
            }
        };
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            if let Err(e) = frame {
                tracing::debug!(error = %e, "reading the response body failed");
                return Outcome::Io;
            }
        }
        self.sender = Some(sender);
        if status.is_success() {
            Outcome::Ok
        } else {
            Outcome::Status(status.as_u16())
        }
    }

    /// The open connection once it can take a request, or a new one.
    async fn ready_sender(&mut self) -> Result<SendRequest<Empty<Bytes>>, ConnectError> {
        if let Some(mut sender) = self.sender.take()
            && sender.ready().await.is_ok()
        {
            return Ok(sender);
        }
        let mut sender = connect(self.addr).await?;
        sender.ready().await.map_err(|source| ConnectError::Handshake {
            addr: self.addr,
            source,
        })?;
        Ok(sender)
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, ConnectError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Tcp { addr, source })?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    });
    Ok(sender)
}
