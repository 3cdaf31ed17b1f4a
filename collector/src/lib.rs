//! Tidemark's collector: receives usage from sidecars over gRPC and appends
//! it to the usage log. It keeps no state of its own, so several collectors
//! can serve behind one address.

pub mod ingest;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use prometheus_client::registry::Registry;
use tidemark_log::Log;
use tidemark_proto::v1::ingest_server::IngestServer;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use ingest::IngestService;
use telemetry::Telemetry;

/// Where the collector serves.
#[derive(Debug, Clone, Args)]
pub struct CollectorArgs {
    /// Address of the ingest gRPC service, where sidecars connect.
    #[arg(
        long = "listen",
        env = "TIDEMARK_LISTEN",
        default_value = "127.0.0.1:7400"
    )]
    pub listen: SocketAddr,
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

    /// Serves gRPC on `listener` until `shutdown` fires.
    pub async fn serve(
        self,
        listener: TcpListener,
        mut shutdown: Shutdown,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(IngestServer::new(self.ingest))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                shutdown.wait().await
            })
            .await
    }
}
