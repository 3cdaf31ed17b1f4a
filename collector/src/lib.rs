//! Tidemark's collector: receives usage from sidecars over gRPC and appends
//! it to the usage log. It keeps no state of its own, so several collectors
//! can serve behind one address.

pub mod board;
pub mod decisions;
pub mod ingest;
pub mod keda;
pub mod scaling_service;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use prometheus_client::registry::Registry;
use tidemark_log::Log;
use tidemark_proto::v1::ingest_server::IngestServer;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};

use ingest::IngestService;
use telemetry::Telemetry;

/// Where and how the collector serves.
#[derive(Debug, Clone, Args)]
pub struct CollectorArgs {
    /// Address of the ingest gRPC service, where sidecars connect.
    #[arg(long = "listen", env = "TIDEMARK_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,

    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "TIDEMARK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TIDEMARK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl CollectorArgs {
    /// The server's TLS identity, if configured.
    pub fn tls(&self) -> std::io::Result<Option<ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))
        };
        Ok(Some(
            ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)),
        ))
    }
}

/// The collector's services, ready to serve.
#[derive(Debug)]
pub struct Collector {
    ingest: IngestService,
}

impl Collector {
    /// Builds the services over `log` and registers their metrics.
    pub fn new(log: Log, usage_topic: &str, registry: &mut Registry) -> Collector {
        let telemetry = Arc::new(Telemetry::register(registry));
        Collector {
            ingest: IngestService::new(log, usage_topic, telemetry),
        }
    }

    /// Serves gRPC on `listener` (over TLS if `tls`) until `shutdown` fires.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<ServerTlsConfig>,
        mut shutdown: Shutdown,
    ) -> Result<(), tonic::transport::Error> {
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls)?;
        }
        server
            .add_service(IngestServer::new(self.ingest))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { shutdown.wait().await })
            .await
    }
}
