//! Tidemark's collector: receives usage from sidecars over gRPC and appends
//! it to the usage log. It keeps no state of its own, so several collectors
//! can serve behind one address.

pub mod autoscaler;
pub mod board;
pub mod decisions;
pub mod hooks;
pub mod ingest;
pub mod ingest_auth;
pub mod keda;
pub mod orchestrator;
pub mod scaling_service;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use prometheus_client::registry::Registry;
use tidemark_log::Log;
use tidemark_proto::v1::ingest_server::IngestServer;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use ingest::{IngestPolicy, IngestService};
use ingest_auth::{IngestTokens, TokensError};
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

    /// PEM CA bundle: require sidecars to present a client certificate it signed (mutual TLS).
    #[arg(long, env = "TIDEMARK_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// TOML file of bearer tokens per service (`checkout = "token"`); without it any sidecar may report.
    #[arg(long, env = "TIDEMARK_INGEST_TOKENS")]
    pub ingest_tokens: Option<PathBuf>,

    /// How far in the future a batch's window may end (clock skew between machines).
    #[arg(long, env = "TIDEMARK_MAX_CLOCK_SKEW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,

    /// How long ago a batch's window may have ended (spool replays after an outage).
    #[arg(long, env = "TIDEMARK_MAX_BATCH_AGE", default_value = "7days", value_parser = humantime::parse_duration)]
    pub max_batch_age: Duration,
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
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(Some(tls))
    }

    /// What ingest lets in, with the tokens file read.
    pub fn ingest_policy(&self) -> Result<IngestPolicy, TokensError> {
        Ok(IngestPolicy {
            tokens: self
                .ingest_tokens
                .as_deref()
                .map(IngestTokens::load)
                .transpose()?
                .map(Arc::new),
            max_clock_skew: self.max_clock_skew,
            max_batch_age: self.max_batch_age,
        })
    }
}

/// The collector's services, ready to serve.
#[derive(Debug)]
pub struct Collector {
    ingest: IngestService,
}

impl Collector {
    /// Builds the services over `log` and registers their metrics.
    pub fn new(log: Log, usage_topic: &str, policy: IngestPolicy, registry: &mut Registry) -> Collector {
        let telemetry = Arc::new(Telemetry::register(registry));
        Collector {
            ingest: IngestService::new(log, usage_topic, policy, telemetry),
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
