//! `tidemark dev`: collector and billing in one process, over the embedded
//! usage log and SQLite, with everything kept in one data directory; and, by
//! default, a real elastic service to watch: the local process orchestrator
//! runs instances of an app (the built-in demo app, or the command after
//! `--`), each behind its own sidecar, as the autoscaler decides, with one
//! entry port spreading requests over the live instances.

mod entry;
mod load;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use tidemark_billing::api::ApiState;
use tidemark_billing::gauges::{GaugeArgs, Gauges, Sources};
use tidemark_billing::invoice::model::Status;
use tidemark_billing::invoice::{Invoicing, ListFilter};
use tidemark_billing::ledger::Ledger;
use tidemark_billing::store::Store;
use tidemark_billing::telemetry::Telemetry;
use tidemark_billing::{BillingArgs, DEFAULT_GROUP};
use tidemark_collector::board::DecisionBoard;
use tidemark_collector::hooks::CommandLine;
use tidemark_collector::orchestrator::{LocalOrchestrator, LocalSpec};
use tidemark_collector::{Collector, IngestArgs, ScalingArgs};
use tidemark_core::window::now_micros;
use tidemark_log::embedded::EmbeddedConfig;
use tidemark_log::topics::{USAGE_TOPIC, USAGE_TOPIC_SPEC};
use tidemark_log::{Log, LogConfig};
use tidemark_proto::v1::ScalingDecision;
use tidemark_runtime::admin::{self, AdminArgs, Readiness};
use tidemark_runtime::listen::bind;
use tidemark_runtime::shutdown::Shutdown;

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Directory for the embedded usage log and the billing database.
    #[arg(long, env = "TIDEMARK_DATA_DIR", default_value = ".tidemark")]
    pub data_dir: PathBuf,

    /// Address of the collector's ingest gRPC service, where sidecars connect.
    #[arg(long, env = "TIDEMARK_INGEST_LISTEN", default_value = "127.0.0.1:7400")]
    pub ingest_listen: SocketAddr,

    /// The app to run and scale: `demo` (the built-in demo app), or `none` to
    /// run only collector and billing. A command after `--` runs instead of
    /// the demo app (`tidemark dev -- python3 -m http.server {port}`; `PORT`
    /// is set too).
    #[arg(long, env = "TIDEMARK_APP", value_enum, default_value = "demo")]
    pub app: AppChoice,

    /// Service name of the app's instances.
    #[arg(long, env = "TIDEMARK_SERVICE", default_value = "demo")]
    pub service: String,

    /// Address of the entry port that spreads requests over the app's live instances.
    #[arg(long, env = "TIDEMARK_ENTRY_LISTEN", default_value = "127.0.0.1:8000")]
    pub entry_listen: SocketAddr,

    /// Simulated work per request of the built-in demo app.
    #[arg(long, env = "TIDEMARK_DEMO_WORK", value_parser = tidemark_runtime::config::duration, default_value = "50ms")]
    pub demo_work: Duration,

    /// Built-in load on the entry port: `steady=RPS`, `step=LOW,HIGH@EVERY`
    /// (e.g. `step=20,400@30s`) to watch the service scale up and down, or
    /// `trace=FILE[@SPEEDx]` to replay a request trace once, SPEED times
    /// faster (e.g. `trace=conv.csv@20x`; the formats of `tidemark simulate`,
    /// a tenant column's tenants included).
    #[arg(long, env = "TIDEMARK_LOAD")]
    pub load: Option<load::LoadProfile>,

    /// Tenant the built-in load bills to (a trace's rows without a tenant).
    #[arg(long, env = "TIDEMARK_LOAD_TENANT", default_value = "acme")]
    pub load_tenant: String,

    /// The app's command, after `--`; `{port}` is replaced by the instance's port.
    #[arg(last = true)]
    pub command: Vec<String>,

    #[command(flatten)]
    pub ingest: IngestArgs,
    #[command(flatten)]
    pub scaling: ScalingArgs,
    #[command(flatten)]
    pub billing: BillingArgs,
    #[command(flatten)]
    pub gauges: GaugeArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// Which app `tidemark dev` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppChoice {
    Demo,
    None,
}

/// The plan dev prices tenants with when none is given.
const DEV_PLAN: &str = "aws-lambda-x86";

/// Runs until `shutdown` fires. The app's instances stop first, while the
/// collector still takes their last reports; then collector and billing.
pub async fn run(mut args: DevArgs, shutdown: Shutdown) -> anyhow::Result<()> {
    let (stop_core, core) = tidemark_runtime::shutdown::channel();
    let load = match &args.load {
        Some(profile) => Some(profile.prepare().context("cannot start: check --load")?),
        None => None,
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
        dir: args.data_dir.join("log"),
    }))
    .await?;
    log.ensure_topic(USAGE_TOPIC, USAGE_TOPIC_SPEC).await?;
    let auth = args.billing.api_auth().context("cannot start: check --api-tokens")?;
    let database = format!("sqlite:{}", args.data_dir.join("billing.db").display());
    let store = Store::open(&database).await?;
    if args.billing.default_plan.is_none() && args.billing.plans_dir.is_none() {
        args.billing.default_plan = Some(DEV_PLAN.to_owned());
    }
    let invoicing = args
        .billing
        .invoicing(store.clone())
        .context("cannot start: check --plans-dir and --default-plan")?;

    let mut registry = Registry::default();
    let collector = Collector::start(
        log.clone(),
        USAGE_TOPIC,
        args.ingest.policy().context("cannot start: check --ingest-tokens")?,
        &args.scaling,
        &mut registry,
        core.clone(),
    )
    .await?;
    let telemetry = Arc::new(Telemetry::register(&mut registry));
    let gauges = Arc::new(Gauges::register(&mut registry));
    let consumer = log.consumer(USAGE_TOPIC, DEFAULT_GROUP).await?;
    let ledger = Ledger::new(consumer, store.clone(), USAGE_TOPIC, telemetry, args.billing.gap_grace)
        .await?
        .with_late_after(args.billing.late_after)
        .with_parallel_commits(usize::from(args.billing.parallel_commits));

    let ingest_listener = bind(args.ingest_listen, "ingest gRPC").await?;
    let ingest_addr = ingest_listener.local_addr()?;
    let api_listener = bind(args.billing.api_listen, "billing HTTP API").await?;
    let grpc_listener = bind(args.billing.grpc_listen, "billing gRPC").await?;
    let readiness = Readiness::default();
    let admin_task = admin::spawn(args.admin.admin_listen, registry, readiness.clone(), core.clone()).await?;
    let gauges_task = gauges.spawn(
        &args.gauges,
        Sources {
            log: log.clone(),
            store: store.clone(),
            usage_topic: USAGE_TOPIC.to_owned(),
            invoicing: invoicing.clone(),
        },
        core.clone(),
    );
    let board = collector.board();
    let live = collector.live();
    let ingest_task = tokio::spawn(collector.serve(ingest_listener, None, core.clone()));
    let api_state = ApiState {
        store,
        auth,
        invoicing: invoicing.clone(),
    };
    let grpc_task = tokio::spawn(tidemark_billing::grpc::serve(
        grpc_listener,
        api_state.clone(),
        core.clone(),
    ));
    let api_task = tokio::spawn(tidemark_billing::api::serve(api_listener, api_state, core.clone()));
    let app = match app_command(&args)? {
        Some(command) => Some(start_app(&args, command, load, ingest_addr, &log, &board, &shutdown).await?),
        None => None,
    };
    readiness.set(true);
    tracing::info!(data_dir = %args.data_dir.display(), "tidemark dev is running; Ctrl-C stops it");
    let view_task = tokio::spawn(show(live, invoicing.clone(), shutdown.clone()));
    let mut signal = shutdown;
    let stopping = tokio::spawn(async move {
        signal.wait().await;
        let app_result = match app {
            Some((entry_task, orchestrator_task)) => {
                let entry = entry_task.await;
                let _ = orchestrator_task.await;
                entry
            }
            None => Ok(Ok(())),
        };
        stop_core.fire();
        app_result
    });

    ledger
        .run(args.billing.commit_interval, core)
        .await
        .context("ledger failed")?;
    view_task.await?;
    gauges_task.await?;
    stopping.await??.context("entry port failed")?;
    ingest_task.await?.context("collector failed")?;
    api_task.await?.context("billing HTTP API failed")?;
    grpc_task.await?.context("billing gRPC failed")?;
    admin_task.await?.context("admin endpoints failed")?;
    print_invoices(&invoicing).await;
    Ok(())
}

/// The app's command line, or `None` with `--app none` and no command.
fn app_command(args: &DevArgs) -> anyhow::Result<Option<CommandLine>> {
    if !args.command.is_empty() {
        return Ok(Some(CommandLine::Args(args.command.clone())));
    }
    if args.app == AppChoice::None {
        return Ok(None);
    }
    let exe = std::env::current_exe().context("cannot find the tidemark executable to run the demo app")?;
    Ok(Some(CommandLine::Args(vec![
        exe.display().to_string(),
        "demo-app".into(),
        "--listen".into(),
        "127.0.0.1:{port}".into(),
        "--work".into(),
        humantime::format_duration(args.demo_work).to_string(),
    ])))
}

type AppTasks = (tokio::task::JoinHandle<anyhow::Result<()>>, tokio::task::JoinHandle<()>);

/// Starts the local orchestrator for the app (each instance behind a
/// sidecar run by this same executable) and the entry port in front of it,
/// and asks for the policy's initial scale unless the service has a
/// decision already (from an earlier run: the data directory keeps it).
async fn start_app(
    args: &DevArgs,
    command: CommandLine,
    load: Option<load::Load>,
    ingest: SocketAddr,
    log: &Log,
    board: &Arc<DecisionBoard>,
    shutdown: &Shutdown,
) -> anyhow::Result<AppTasks> {
    let exe = std::env::current_exe().context("cannot find the tidemark executable to run sidecars")?;
    let mut spec = LocalSpec::new(String::new());
    spec.command = command;
    spec.sidecar = Some(CommandLine::Args(vec![exe.display().to_string(), "sidecar".into()]));
    spec.sidecar_args = vec!["--report-interval".into(), "250ms".into()];
    spec.collector = format!("http://{ingest}");
    let (orchestrator, orchestrator_task) =
        LocalOrchestrator::spawn(args.service.clone(), spec, Arc::clone(board), shutdown.clone())
            .map_err(|e| anyhow::anyhow!("cannot run the app: {e}"))?;
    let entry_listener = bind(args.entry_listen, "entry HTTP (the app's instances)").await?;
    let entry_addr = entry_listener.local_addr()?;
    let entry_task = tokio::spawn(entry::serve(entry_listener, orchestrator.instances(), shutdown.clone()));
    if let Some(load) = load {
        tokio::spawn(load::run(
            load,
            entry_addr,
            orchestrator.instances(),
            args.load_tenant.clone(),
            shutdown.clone(),
        ));
    }
    // Give the follower a moment to read decisions kept from an earlier run.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if board.get(&args.service).is_none() {
        let policy = match &args.scaling.scaling_config {
            Some(path) => tidemark_collector::scaling_config::ScalingConfig::load(path)?
                .policy_for(&args.service)
                .clone(),
            None => tidemark_collector::autoscaler::policy::Policy::default(),
        };
        let initial = ScalingDecision {
            decision_id: uuid::Uuid::new_v4().to_string(),
            service: args.service.clone(),
            decided_at_unix_micros: now_micros(),
            desired_replicas: policy.initial_scale,
            ..ScalingDecision::default()
        };
        tidemark_collector::decisions::append(log, &args.scaling.decisions_topic, &initial).await?;
    }
    Ok((entry_task, orchestrator_task))
}

/// Draws the live view from the autoscaler's latest decisions until
/// `shutdown` fires.
async fn show(board: Arc<DecisionBoard>, invoicing: Invoicing, mut shutdown: Shutdown) {
    let every = if view::on_terminal() {
        view::TERMINAL_EVERY
    } else {
        view::PLAIN_EVERY
    };
    let mut tick = tokio::time::interval(every);
    let mut drawn = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        let costs = open_drafts(&invoicing)
            .await
            .into_iter()
            .map(|invoice| view::TenantCost {
                tenant: invoice.tenant,
                total: invoice.total.to_string(),
                currency: invoice.currency,
            })
            .collect::<Vec<_>>();
        let text = view::render(&board.snapshot(), &costs);
        drawn = view::draw(&text, if view::on_terminal() { drawn } else { 0 });
    }
}

/// Every tenant's draft for the open period.
async fn open_drafts(invoicing: &Invoicing) -> Vec<tidemark_billing::invoice::model::Invoice> {
    let now = now_micros();
    match invoicing.list(&ListFilter::default(), now).await {
        Ok(listing) => listing
            .invoices
            .into_iter()
            .filter(|i| i.status == Status::Draft && i.period.contains(now))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot price the open period");
            Vec::new()
        }
    }
}

/// Prints what each tenant owes for the open period so far.
async fn print_invoices(invoicing: &Invoicing) {
    let drafts = open_drafts(invoicing).await;
    if drafts.is_empty() {
        println!("no usage billed in the open period");
    }
    for invoice in drafts {
        println!(
            "invoice {} ({}, draft): {} {}",
            invoice.id,
            invoice.period.label(),
            invoice.total,
            invoice.currency
        );
        for line in &invoice.lines {
            println!(
                "  {:<40} {:>20} {:>12} {}",
                line.description, line.quantity, line.amount, invoice.currency
            );
        }
    }
}
