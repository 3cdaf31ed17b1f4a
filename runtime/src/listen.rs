//! Listeners that announce themselves.
//!
//! Every binary logs one line per address it listens on, in this form:
//!
//! ```text
//! ... INFO tidemark_runtime::listen: listening addr=127.0.0.1:7400 serves="ingest gRPC"
//! ```
//!
//! so people and scripts can find a port chosen by the OS (`:0`).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds `addr` and logs the bound address with what is served there.
pub async fn bind(addr: SocketAddr, serves: &'static str) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} for {serves}: {e}")))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, serves, "listening");
    Ok(listener)
}
