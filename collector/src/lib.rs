//! Tidemark's collector: receives usage from sidecars over gRPC and appends
//! it to the usage log; its autoscaler turns the same usage into scaling
//! decisions, which it serves to orchestrators (gRPC watch, KEDA) and
//! carries out through hooks (webhook, exec, local processes).
//!
//! Ingest keeps no state, so several collectors can serve behind one
//! address; autoscalers share the services as members of one consumer group,
//! and every collector follows the whole decisions topic, so any of them
//! answers for any service.

pub mod autoscaler;
pub mod board;
pub mod decisions;
pub mod hooks;
pub mod ingest;
pub mod ingest_auth;
pub mod keda;
pub mod orchestrator;
pub mod scaling_config;
pub mod scaling_service;
pub mod telemetry;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args};
use prometheus_client::registry::Registry;
use thiserror::Error;
use tidemark_log::topics::{DECISIONS_TOPIC, DECISIONS_TOPIC_SPEC};
use tidemark_log::{Log, LogError};
use tidemark_proto::externalscaler::external_scaler_server::ExternalScalerServer;
use tidemark_proto::v1::ingest_server::IngestServer;
use tidemark_proto::v1::scaling_server::ScalingServer;
use tidemark_runtime::shutdown::Shutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use autoscaler::runner::{Autoscaler, AutoscalerError, AutoscalerSettings, AutoscalerTelemetry};
use board::DecisionBoard;
use hooks::{HookConfigError, Hooks};
use ingest::{IngestPolicy, IngestService};
use ingest_auth::{IngestTokens, TokensError};
use keda::KedaScaler;
use scaling_config::{ScalingConfig, ScalingConfigError};
use scaling_service::ScalingService;
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

    #[command(flatten)]
    pub ingest: IngestArgs,
}

/// What ingest lets in besides well-formed batches.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
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

impl IngestArgs {
    /// The ingest policy, with the tokens file read.
    pub fn policy(&self) -> Result<IngestPolicy, TokensError> {
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
}

/// How long open gRPC streams may go on after shutdown.
pub const STREAMS_GRACE: Duration = Duration::from_secs(2);

/// How the collector scales services.
#[derive(Debug, Clone, Args)]
pub struct ScalingArgs {
    /// TOML file of scaling policies and hooks per service (docs/autoscaler.md); policies reload when it changes.
    #[arg(long, env = "TIDEMARK_SCALING_CONFIG")]
    pub scaling_config: Option<PathBuf>,

    /// Run an autoscaler in this process, as a member of --autoscaler-group.
    #[arg(long, env = "TIDEMARK_AUTOSCALE", default_value_t = true, action = ArgAction::Set)]
    pub autoscale: bool,

    /// Consumer group the autoscalers share the usage topic's partitions in.
    #[arg(long, env = "TIDEMARK_AUTOSCALER_GROUP", default_value = "tidemark-autoscaler")]
    pub autoscaler_group: String,

    /// Compacted topic of the latest decision per service.
    #[arg(long, env = "TIDEMARK_DECISIONS_TOPIC", default_value = DECISIONS_TOPIC)]
    pub decisions_topic: String,
}

#[derive(Debug, Error)]
pub enum CollectorError {
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("--scaling-config: {0}")]
    Config(#[from] ScalingConfigError),
    #[error("--scaling-config: services.{service}.{source}")]
    Hook {
        service: String,
        #[source]
        source: HookConfigError,
    },
    #[error("autoscaler: {0}")]
    Autoscaler(#[from] AutoscalerError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("a background task panicked: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The collector's services, started and ready to serve.
#[derive(Debug)]
pub struct Collector {
    ingest: IngestService,
    board: Arc<DecisionBoard>,
    live: Arc<DecisionBoard>,
    background: JoinSet<Result<(), CollectorError>>,
    hooks: Vec<(String, Hooks)>,
}

impl Collector {
    /// Starts everything behind the gRPC services: the decisions follower,
    /// the autoscaler (unless disabled) and every configured hook.
    pub async fn start(
        log: Log,
        usage_topic: &str,
        policy: IngestPolicy,
        scaling: &ScalingArgs,
        registry: &mut Registry,
        shutdown: Shutdown,
    ) -> Result<Collector, CollectorError> {
        let telemetry = Arc::new(Telemetry::register(registry));
        let config = match &scaling.scaling_config {
            Some(path) => ScalingConfig::load(path)?,
            None => ScalingConfig::default(),
        };
        log.ensure_topic(&scaling.decisions_topic, DECISIONS_TOPIC_SPEC).await?;
        let board = DecisionBoard::new();
        let live = DecisionBoard::new();
        let mut hooks = Vec::new();
        for (service, section) in &config.services {
            if section.hooks.is_empty() {
                continue;
            }
            let started = hooks::spawn(
                service.clone(),
                section.hooks.clone(),
                Arc::clone(&board),
                shutdown.clone(),
            )
            .map_err(|source| CollectorError::Hook {
                service: service.clone(),
                source,
            })?;
            hooks.push((service.clone(), started));
        }
        let mut background = JoinSet::new();
        let follow = decisions::follow(
            log.clone(),
            scaling.decisions_topic.clone(),
            Arc::clone(&board),
            shutdown.clone(),
        );
        background.spawn(async move { Ok(follow.await?) });
        if scaling.autoscale {
            let settings = AutoscalerSettings {
                usage_topic: usage_topic.to_owned(),
                decisions_topic: scaling.decisions_topic.clone(),
                group: scaling.autoscaler_group.clone(),
                config_path: scaling.scaling_config.clone(),
            };
            let telemetry = AutoscalerTelemetry::register(registry);
            let autoscaler = Autoscaler::start(
                log.clone(),
                settings,
                config,
                Arc::clone(&board),
                Arc::clone(&live),
                telemetry,
            )
            .await?;
            let stop = shutdown.clone();
            background.spawn(async move { Ok(autoscaler.run(stop).await?) });
        }
        Ok(Collector {
            ingest: IngestService::new(log, usage_topic, policy, telemetry),
            board,
            live,
            background,
            hooks,
        })
    }

    /// The latest decisions, as this collector knows them.
    pub fn board(&self) -> Arc<DecisionBoard> {
        Arc::clone(&self.board)
    }

    /// Every decision this process's autoscaler computes, published or not
    /// (empty without `--autoscale`): the current load and explanation.
    pub fn live(&self) -> Arc<DecisionBoard> {
        Arc::clone(&self.live)
    }

    /// The running hooks of each service that has some.
    pub fn hooks(&self) -> &[(String, Hooks)] {
        &self.hooks
    }

    /// Serves ingest, Scaling and the KEDA external scaler on `listener`
    /// (over TLS if `tls`) until `shutdown` fires, then waits for the
    /// background tasks and hooks to finish. If a background task fails,
    /// serving stops and its error is returned: a collector whose autoscaler
    /// died must not look healthy.
    pub async fn serve(
        self,
        listener: TcpListener,
        tls: Option<ServerTlsConfig>,
        mut shutdown: Shutdown,
    ) -> Result<(), CollectorError> {
        let stop = shutdown.clone();
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls)?;
        }
        let grpc = server
            .add_service(IngestServer::new(self.ingest))
            .add_service(ScalingServer::new(ScalingService::new(Arc::clone(&self.board))))
            .add_service(ExternalScalerServer::new(KedaScaler::new(Arc::clone(&self.board))))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move { shutdown.wait().await });
        let mut background = self.background;
        let first_failure = async {
            while let Some(done) = background.join_next().await {
                done??;
            }
            std::future::pending::<Result<(), CollectorError>>().await
        };
        // Watch streams (WatchDecisions, StreamIsActive) last as long as
        // their clients: after shutdown they get a moment, then are cut.
        let mut stop = stop;
        let streams_cut = async move {
            stop.wait().await;
            tokio::time::sleep(STREAMS_GRACE).await;
        };
        tokio::select! {
            served = grpc => served?,
            failed = first_failure => return failed,
            () = streams_cut => tracing::info!(grace = ?STREAMS_GRACE, "open gRPC streams cut at shutdown"),
        }
        while let Some(done) = background.join_next().await {
            done??;
        }
        for (_, hooks) in self.hooks {
            hooks.join().await;
        }
        Ok(())
    }
}
