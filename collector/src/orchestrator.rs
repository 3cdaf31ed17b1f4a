//! The local process orchestrator: runs a service's instances as processes on
//! this machine, as many as the service's latest scaling decision asks for.
//!
//! Each instance `<service>-<n>` is two processes: the app (`command`, with
//! `PORT` and `{port}` set to a free port) and its own `tidemark-sidecar` in
//! front of it (`--listen` on another free port, `--upstream` the app,
//! `--app-pid` the app, so its CPU and memory are measured). An instance is
//! ready once a `GET /` through its sidecar gets an answer from the app; the
//! ready sidecars' addresses are published on [`LocalOrchestrator::instances`]
//! for an entry proxy to spread requests over.
//!
//! Scaling down stops the newest instances first: out of the ready list,
//! then `SIGTERM` to the sidecar (it stops accepting, finishes the requests in
//! flight and reports its last window), then `SIGTERM` to the app, each
//! `SIGKILL`ed if still there after `stop_grace`. An instance whose app or
//! sidecar dies on its own is restarted (both processes, on fresh ports),
//! with a backoff if it keeps dying.
//!
//! Signals are sent with the `kill` program: the workspace forbids `unsafe`
//! (so no `libc::kill`) and links no crate that wraps it (`nix`), while
//! `kill` is on every Unix. A process is signalled only while it is our
//! unreaped child, so its id cannot have been reused. Each child runs in its
//! own process group (a Ctrl-C in the collector's terminal does not reach it
//! directly; the orchestrator stops it in order), and signals go to the group,
//! so what an app's start script started stops with it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tidemark_runtime::shutdown::Shutdown;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::board::DecisionBoard;
use crate::hooks::{CommandLine, Follow, HookConfigError, Template, duration};

/// The placeholders the app's command may use, in this order.
pub const PLACEHOLDERS: &[&str] = &["port", "service", "instance"];

/// The sidecar flags the orchestrator sets itself; `sidecar_args` may not.
const OWNED_SIDECAR_FLAGS: &[&str] = &[
    "--listen",
    "--admin-listen",
    "--upstream",
    "--service",
    "--instance",
    "--collector",
    "--app-pid",
    "--app-cgroup",
];

/// Name of the sidecar program looked for when `sidecar` is not set.
const SIDECAR_PROGRAM: &str = "tidemark-sidecar";

/// The `[services.<name>.local]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// The app: run with `PORT` set to its port, `{port}`, `{service}` and
    /// `{instance}` put into its arguments.
    pub command: CommandLine,
    /// The sidecar program (default: `tidemark-sidecar` next to the running
    /// executable, else on `PATH`).
    #[serde(default)]
    pub sidecar: Option<CommandLine>,
    /// More sidecar flags, e.g. `["--spool-dir", "/var/spool/tidemark/{instance}"]`;
    /// `{port}` (the app's), `{service}` and `{instance}` are put in.
    #[serde(default)]
    pub sidecar_args: Vec<String>,
    /// The collector's ingest endpoint the sidecars report to.
    #[serde(default = "default_collector")]
    pub collector: String,
    /// First port tried for apps and sidecars (default 18000).
    #[serde(default = "default_ports_from")]
    pub ports_from: u16,
    /// Longest wait for a new instance to answer through its sidecar (default 30s).
    #[serde(default = "default_ready_timeout", deserialize_with = "duration")]
    pub ready_timeout: Duration,
    /// How long the sidecar, then the app, may take to exit after `SIGTERM`
    /// before `SIGKILL` (default 10s).
    #[serde(default = "default_stop_grace", deserialize_with = "duration")]
    pub stop_grace: Duration,
}

fn default_collector() -> String {
    "http://127.0.0.1:7400".to_owned()
}

fn default_ports_from() -> u16 {
    18000
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}

impl LocalSpec {
    /// A spec with the defaults, running `command` as the app.
    pub fn new(command: impl Into<String>) -> LocalSpec {
        LocalSpec {
            command: CommandLine::Line(command.into()),
            sidecar: None,
            sidecar_args: Vec::new(),
            collector: default_collector(),
            ports_from: default_ports_from(),
            ready_timeout: default_ready_timeout(),
            stop_grace: default_stop_grace(),
        }
    }

    pub fn validate(&self) -> Result<(), HookConfigError> {
        self.template()?;
        if let Some(sidecar) = &self.sidecar {
            sidecar
                .argv()
                .map_err(|reason| HookConfigError::new("local.sidecar", reason))?;
        }
        self.sidecar_args_template()?;
        for arg in &self.sidecar_args {
            let flag = arg.split('=').next().unwrap_or_default();
            if OWNED_SIDECAR_FLAGS.contains(&flag) {
                return Err(HookConfigError::new(
                    "local.sidecar_args",
                    format!("{flag} is set by the local orchestrator for each instance"),
                ));
            }
        }
        let uri: http::Uri = self
            .collector
            .parse()
            .map_err(|e| HookConfigError::new("local.collector", format!("{:?} is not a URL: {e}", self.collector)))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(HookConfigError::new(
                "local.collector",
                "must be an http:// or https:// URL with a host",
            ));
        }
        if self.ports_from == 0 {
            return Err(HookConfigError::new("local.ports_from", "must be between 1 and 65535"));
        }
        if self.ready_timeout.is_zero() {
            return Err(HookConfigError::new("local.ready_timeout", "must be more than 0s"));
        }
        Ok(())
    }

    fn template(&self) -> Result<Template, HookConfigError> {
        Template::parse(&self.command, PLACEHOLDERS).map_err(|reason| HookConfigError::new("local.command", reason))
    }

    fn sidecar_args_template(&self) -> Result<Template, HookConfigError> {
        Template::parse_args(&self.sidecar_args, PLACEHOLDERS)
            .map_err(|reason| HookConfigError::new("local.sidecar_args", reason))
    }

    /// The spec with the template parsed and the sidecar found.
    pub(crate) fn resolve(self) -> Result<ResolvedLocal, HookConfigError> {
        self.validate()?;
        let template = self.template()?;
        let sidecar_args = self.sidecar_args_template()?;
        let sidecar = match &self.sidecar {
            Some(sidecar) => sidecar
                .argv()
                .map_err(|reason| HookConfigError::new("local.sidecar", reason))?,
            None => vec![find_sidecar()?.to_string_lossy().into_owned()],
        };
        Ok(ResolvedLocal {
            template,
            sidecar,
            sidecar_args,
            collector: self.collector,
            ports_from: self.ports_from,
            ready_timeout: self.ready_timeout,
            stop_grace: self.stop_grace,
        })
    }
}

/// `tidemark-sidecar` next to the running executable, else on `PATH`.
fn find_sidecar() -> Result<PathBuf, HookConfigError> {
    let exe = std::env::current_exe().ok();
    let beside = exe
        .as_deref()
        .and_then(Path::parent)
        .map(|dir| dir.join(SIDECAR_PROGRAM));
    if let Some(path) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(path.clone());
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(SIDECAR_PROGRAM))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if let Some(path) = on_path.into_iter().find(|p| p.is_file()) {
        return Ok(path);
    }
    Err(HookConfigError::new(
        "local.sidecar",
        format!(
            "not set, and there is no {SIDECAR_PROGRAM} next to {} nor on PATH",
            exe.map_or_else(|| "this executable".to_owned(), |e| e.display().to_string())
        ),
    ))
}

/// A local spec ready to run.
#[derive(Debug, Clone)]
pub(crate) struct ResolvedLocal {
    template: Template,
    sidecar: Vec<String>,
    sidecar_args: Template,
    collector: String,
    ports_from: u16,
    ready_timeout: Duration,
    stop_grace: Duration,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Processes started, not answering yet.
    Starting,
    /// Answering through its sidecar; in [`LocalOrchestrator::instances`].
    Ready,
    /// A process died or never got ready; waiting to start again.
    Restarting,
    /// Scaled down or shutting down; its processes are being stopped.
    Stopping,
}

/// One instance as the orchestrator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    /// `<service>-<n>`, the sidecar's `--instance`.
    pub name: String,
    pub phase: Phase,
    pub app_pid: Option<u32>,
    pub sidecar_pid: Option<u32>,
    /// The app's port, on 127.0.0.1.
    pub app_port: u16,
    /// The sidecar's proxy address: where requests go.
    pub sidecar: SocketAddr,
    /// The sidecar's `/metrics`, `/healthz` and `/readyz`.
    pub admin: SocketAddr,
    /// Times this instance was started again after a process died or it
    /// never got ready.
    pub restarts: u64,
}

/// Runs a service's instances as local processes. Cloning gives another
/// handle on the same orchestrator.
#[derive(Debug, Clone)]
pub struct LocalOrchestrator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    service: String,
    spec: ResolvedLocal,
    ready: watch::Sender<Vec<SocketAddr>>,
    state: Mutex<State>,
    desired: AtomicU32,
    count: AtomicUsize,
    restarts: AtomicU64,
    failed_starts: AtomicU64,
    probe: Client<HttpConnector, Empty<Bytes>>,
}

#[derive(Debug, Default)]
struct State {
    instances: BTreeMap<usize, InstanceStatus>,
    ready: BTreeMap<usize, SocketAddr>,
    ports_in_use: HashSet<u16>,
    next_port: u16,
}

impl LocalOrchestrator {
    /// Starts the orchestrator for `service`: it follows the service's
    /// decisions on `board` until `shutdown` fires, then stops every instance;
    /// the task ends once all their processes are gone. Nothing runs until
    /// the first decision.
    pub fn spawn(
        service: String,
        spec: LocalSpec,
        board: Arc<DecisionBoard>,
        shutdown: Shutdown,
    ) -> Result<(LocalOrchestrator, JoinHandle<()>), HookConfigError> {
        Ok(LocalOrchestrator::spawn_resolved(
            service,
            spec.resolve()?,
            board,
            shutdown,
        ))
    }

    pub(crate) fn spawn_resolved(
        service: String,
        spec: ResolvedLocal,
        board: Arc<DecisionBoard>,
        shutdown: Shutdown,
    ) -> (LocalOrchestrator, JoinHandle<()>) {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(PROBE_TIMEOUT));
        let probe = Client::builder(TokioExecutor::new())
            // No kept connections: they would hold a stopping sidecar up.
            .pool_max_idle_per_host(0)
            .build(connector);
        let shared = Arc::new(Shared {
            service,
            state: Mutex::new(State {
                next_port: spec.ports_from,
                ..State::default()
            }),
            spec,
            ready: watch::channel(Vec::new()).0,
            desired: AtomicU32::new(0),
            count: AtomicUsize::new(0),
            restarts: AtomicU64::new(0),
            failed_starts: AtomicU64::new(0),
            probe,
        });
        let orchestrator = LocalOrchestrator {
            shared: Arc::clone(&shared),
        };
        let task = tokio::spawn(supervise(shared, board, shutdown));
        (orchestrator, task)
    }

    /// The ready instances' sidecar addresses, ordered by instance number,
    /// updated as instances become ready and leave.
    pub fn instances(&self) -> watch::Receiver<Vec<SocketAddr>> {
        self.shared.ready.subscribe()
    }

    /// Instances kept running (starting, ready or restarting; not those
    /// being stopped).
    pub fn instance_count(&self) -> usize {
        self.shared.count.load(Ordering::Relaxed)
    }

    /// The replica count of the latest decision acted on.
    pub fn desired(&self) -> u32 {
        self.shared.desired.load(Ordering::Relaxed)
    }

    /// Instances started again because a process died, since the start.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Starts that failed: a program could not start or the instance was not
    /// ready within `ready_timeout`.
    pub fn failed_starts(&self) -> u64 {
        self.shared.failed_starts.load(Ordering::Relaxed)
    }

    /// Every instance with processes, those being stopped included.
    pub fn status(&self) -> Vec<InstanceStatus> {
        self.shared.lock().instances.values().cloned().collect()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_ready(&self, index: usize, addr: Option<SocketAddr>) {
        let mut state = self.lock();
        let changed = match addr {
            Some(addr) => state.ready.insert(index, addr) != Some(addr),
            None => state.ready.remove(&index).is_some(),
        };
        if changed {
            let list: Vec<SocketAddr> = state.ready.values().copied().collect();
            self.ready.send_replace(list);
        }
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut InstanceStatus)) {
        if let Some(status) = self.lock().instances.get_mut(&index) {
            change(status);
        }
    }

    /// A port free now, scanning up from where the last scan ended (so a port
    /// just given back is not reused at once), skipping ports this
    /// orchestrator has handed out.
    fn take_port(&self) -> Option<u16> {
        let mut state = self.lock();
        let from = self.spec.ports_from;
        let span = u32::from(u16::MAX - from) + 1;
        let start = state.next_port.max(from);
        for step in 0..span {
            let port = from + ((u32::from(start - from) + step) % span) as u16;
            if state.ports_in_use.contains(&port) {
                continue;
            }
            if std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok() {
                state.ports_in_use.insert(port);
                state.next_port = port.checked_add(1).unwrap_or(from);
                return Some(port);
            }
        }
        None
    }

    fn release_ports(&self, ports: &[u16]) {
        let mut state = self.lock();
        for port in ports {
            state.ports_in_use.remove(port);
        }
    }
}

/// One instance slot the supervisor keeps.
struct Slot {
    index: usize,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn supervise(shared: Arc<Shared>, board: Arc<DecisionBoard>, mut shutdown: Shutdown) {
    let service = shared.service.clone();
    let mut follow = Follow::new(service.clone(), board);
    let mut active: Vec<Slot> = Vec::new();
    let mut stopping: Vec<(usize, JoinHandle<()>)> = Vec::new();
    tracing::info!(service, "local orchestrator started");
    loop {
        let decision = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            decision = follow.next() => match decision {
                Some(decision) => decision,
                None => break,
            },
        };
        let desired = decision.desired_replicas as usize;
        shared.desired.store(decision.desired_replicas, Ordering::Relaxed);
        stopping.retain(|(_, task)| !task.is_finished());
        if desired != active.len() {
            tracing::info!(
                service,
                decision_id = %decision.decision_id,
                from = active.len(),
                to = desired,
                "local orchestrator: scaling"
            );
        }
        while active.len() < desired {
            let taken: HashSet<usize> = active
                .iter()
                .map(|s| s.index)
                .chain(stopping.iter().map(|(i, _)| *i))
                .collect();
            let index = (1..).find(|i| !taken.contains(i)).unwrap_or(active.len() + 1);
            active.push(start_slot(&shared, index));
        }
        // Newest first.
        while active.len() > desired {
            let Some(slot) = active.pop() else { break };
            let _ = slot.stop.send(());
            stopping.push((slot.index, slot.task));
        }
        shared.count.store(active.len(), Ordering::Relaxed);
    }
    tracing::info!(
        service,
        instances = active.len(),
        "local orchestrator: stopping every instance"
    );
    shared.count.store(0, Ordering::Relaxed);
    for slot in active.into_iter().rev() {
        let _ = slot.stop.send(());
        stopping.push((slot.index, slot.task));
    }
    for (_, task) in stopping {
        if let Err(e) = task.await {
            tracing::error!(service, error = %e, "local orchestrator: an instance task failed");
        }
    }
    tracing::info!(service, "local orchestrator stopped");
}

fn start_slot(shared: &Arc<Shared>, index: usize) -> Slot {
    let (stop, stopped) = oneshot::channel();
    let name = format!("{}-{index}", shared.service);
    shared.lock().instances.insert(
        index,
        InstanceStatus {
            name,
            phase: Phase::Starting,
            app_pid: None,
            sidecar_pid: None,
            app_port: 0,
            sidecar: unspecified(),
            admin: unspecified(),
            restarts: 0,
        },
    );
    let task = tokio::spawn(run_instance(Arc::clone(shared), index, stopped));
    Slot { index, stop, task }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
}

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// First wait before starting a failed instance again; doubles up to [`MAX_RESTART_DELAY`].
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(200);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// An instance ready for this long has its restart delay reset.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// Longest wait for one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness probes.
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// How an instance's run ended.
enum Ended {
    /// Told to stop: the instance is done.
    Stop,
    /// A process died or the start failed: start again.
    Restart,
}

async fn run_instance(shared: Arc<Shared>, index: usize, mut stop: oneshot::Receiver<()>) {
    let mut delay = FIRST_RESTART_DELAY;
    let mut restarts = 0u64;
    loop {
        let started = Instant::now();
        let (ended, was_ready) = run_once(&shared, index, &mut stop).await;
        match ended {
            Ended::Stop => break,
            Ended::Restart => {}
        }
        if was_ready && started.elapsed() >= STABLE_AFTER {
            delay = FIRST_RESTART_DELAY;
        }
        restarts += 1;
        shared.update(index, |s| {
            s.phase = Phase::Restarting;
            s.restarts = restarts;
            s.app_pid = None;
            s.sidecar_pid = None;
        });
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RESTART_DELAY);
    }
    shared.lock().instances.remove(&index);
}

/// Starts the instance's processes once and runs them until they die or it
/// is told to stop. Returns how it ended and whether it was ready.
async fn run_once(shared: &Arc<Shared>, index: usize, stop: &mut oneshot::Receiver<()>) -> (Ended, bool) {
    let service = shared.service.as_str();
    let name = format!("{service}-{index}");
    let ports: Vec<u16> = (0..3).map_while(|_| shared.take_port()).collect();
    let &[app_port, sidecar_port, admin_port] = ports.as_slice() else {
        shared.release_ports(&ports);
        shared.failed_starts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            service,
            instance = name,
            from = shared.spec.ports_from,
            "local orchestrator: no free ports"
        );
        return (Ended::Restart, false);
    };
    let sidecar_addr = localhost(sidecar_port);
    shared.update(index, |s| {
        s.phase = Phase::Starting;
        s.app_port = app_port;
        s.sidecar = sidecar_addr;
        s.admin = localhost(admin_port);
    });
    let mut pair = match Pair::start(shared, &name, app_port, sidecar_port, admin_port) {
        Ok(pair) => pair,
        Err(e) => {
            shared.release_ports(&ports);
            shared.failed_starts.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                service,
                instance = name,
                error = e,
                "local orchestrator: cannot start the instance"
            );
            return (Ended::Restart, false);
        }
    };
    shared.update(index, |s| {
        s.app_pid = pair.app.id();
        s.sidecar_pid = pair.sidecar.id();
    });
    tracing::info!(
        service,
        instance = name,
        app_pid = pair.app.id(),
        sidecar_pid = pair.sidecar.id(),
        app_port,
        sidecar = %sidecar_addr,
        "local orchestrator: instance started"
    );

    let ready = tokio::select! {
        biased;
        _ = &mut *stop => None,
        died = pair.died() => Some(Err(died)),
        ready = wait_ready(shared, sidecar_addr) => Some(Ok(ready)),
    };
    let ended = match ready {
        None => (Ended::Stop, false),
        Some(Err(died)) => {
            shared.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                service,
                instance = name,
                died,
                output = pair.output(),
                "local orchestrator: the instance died before it was ready; restarting it"
            );
            (Ended::Restart, false)
        }
        Some(Ok(false)) => {
            shared.failed_starts.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                service,
                instance = name,
                ready_timeout = %humantime::format_duration(shared.spec.ready_timeout),
                output = pair.output(),
                "local orchestrator: the instance did not answer through its sidecar in time; restarting it"
            );
            (Ended::Restart, false)
        }
        Some(Ok(true)) => {
            shared.update(index, |s| s.phase = Phase::Ready);
            shared.set_ready(index, Some(sidecar_addr));
            tracing::info!(service, instance = name, sidecar = %sidecar_addr, "local orchestrator: instance ready");
            tokio::select! {
                biased;
                _ = &mut *stop => (Ended::Stop, true),
                died = pair.died() => {
                    shared.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        service,
                        instance = name,
                        died,
                        output = pair.output(),
                        "local orchestrator: a process of the instance died; restarting it"
                    );
                    (Ended::Restart, true)
                }
            }
        }
    };
    // Out of the ready list before anything is signalled.
    shared.set_ready(index, None);
    if matches!(ended.0, Ended::Stop) {
        shared.update(index, |s| s.phase = Phase::Stopping);
        tracing::info!(service, instance = name, "local orchestrator: stopping the instance");
    }
    pair.stop(shared.spec.stop_grace, &name).await;
    shared.release_ports(&ports);
    if matches!(ended.0, Ended::Stop) {
        tracing::info!(service, instance = name, "local orchestrator: instance stopped");
    }
    ended
}

/// Probes `GET /` through the sidecar until the app answers; false if it has
/// not within `ready_timeout`.
async fn wait_ready(shared: &Shared, sidecar: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + shared.spec.ready_timeout;
    let probe = async {
        loop {
            if probe_once(&shared.probe, sidecar).await {
                return;
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
    };
    tokio::time::timeout_at(deadline, probe).await.is_ok()
}

/// Whether the app answered a `GET /` through the sidecar (any status the
/// app gave; not the sidecar's own 502 or 504 for an app it cannot reach).
async fn probe_once(client: &Client<HttpConnector, Empty<Bytes>>, sidecar: SocketAddr) -> bool {
    let Ok(request) = http::Request::get(format!("http://{sidecar}/"))
        .header(http::header::USER_AGENT, "tidemark-local-orchestrator")
        .body(Empty::new())
    else {
        return false;
    };
    let exchange = async {
        let response = client.request(request).await.ok()?;
        let status = response.status();
        if status != http::StatusCode::BAD_GATEWAY && status != http::StatusCode::GATEWAY_TIMEOUT {
            // The app answered; its body does not matter.
            return Some(true);
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        let from_sidecar = &body[..] == b"upstream unavailable\n" || &body[..] == b"upstream timed out\n";
        Some(!from_sidecar)
    };
    matches!(tokio::time::timeout(PROBE_TIMEOUT, exchange).await, Ok(Some(true)))
}

/// Lines of output kept per process, shown when it fails.
const TAIL_LINES: usize = 20;

type Tail = Arc<Mutex<VecDeque<String>>>;

/// An instance's two processes.
struct Pair {
    app: Child,
    sidecar: Child,
    app_tail: Tail,
    sidecar_tail: Tail,
}

impl Pair {
    fn start(shared: &Shared, name: &str, app_port: u16, sidecar_port: u16, admin_port: u16) -> Result<Pair, String> {
        let spec = &shared.spec;
        let port = app_port.to_string();
        let argv = spec.template.render(&[&port, &shared.service, name]);
        let (program, args) = argv.split_first().ok_or("the app's command is empty")?;
        let mut app = command(program);
        app.args(args).env("PORT", &port);
        let mut app = app
            .spawn()
            .map_err(|e| format!("cannot start the app {program:?}: {e}"))?;
        let app_tail = Tail::default();
        forward(&mut app, name, "app", &app_tail);
        let Some(app_pid) = app.id() else {
            return Err("the app exited at once".to_owned());
        };

        let (program, args) = spec.sidecar.split_first().ok_or("the sidecar's command is empty")?;
        let mut sidecar = command(program);
        sidecar
            .args(args)
            .arg(format!("--listen=127.0.0.1:{sidecar_port}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin_port}"))
            .arg(format!("--upstream=http://127.0.0.1:{app_port}"))
            .arg(format!("--service={}", shared.service))
            .arg(format!("--instance={name}"))
            .arg(format!("--collector={}", spec.collector))
            .arg(format!("--app-pid={app_pid}"))
            .args(spec.sidecar_args.render(&[&port, &shared.service, name]));
        let mut sidecar = match sidecar.spawn() {
            Ok(sidecar) => sidecar,
            Err(e) => {
                // `app` is killed on drop.
                return Err(format!("cannot start the sidecar {program:?}: {e}"));
            }
        };
        let sidecar_tail = Tail::default();
        forward(&mut sidecar, name, "sidecar", &sidecar_tail);
        Ok(Pair {
            app,
            sidecar,
            app_tail,
            sidecar_tail,
        })
    }

    /// Resolves when either process exits, saying which and how.
    async fn died(&mut self) -> String {
        let (which, status) = tokio::select! {
            status = self.app.wait() => ("app", status),
            status = self.sidecar.wait() => ("sidecar", status),
        };
        match status {
            Ok(status) => format!("the {which} exited ({})", describe(status)),
            Err(e) => format!("cannot wait for the {which}: {e}"),
        }
    }

    /// The last lines both processes wrote.
    fn output(&self) -> String {
        let lines = |tail: &Tail| {
            tail.lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- app ---\n{}\n--- sidecar ---\n{}",
            lines(&self.app_tail),
            lines(&self.sidecar_tail)
        )
    }

    /// The sidecar first (it finishes the requests in flight to the app and
    /// reports its last window), then the app.
    async fn stop(&mut self, grace: Duration, name: &str) {
        terminate(&mut self.sidecar, grace, name, "sidecar").await;
        terminate(&mut self.app, grace, name, "app").await;
    }
}

fn describe(status: ExitStatus) -> String {
    status.to_string()
}

/// A child in its own process group, with no `TIDEMARK_*` settings of the
/// collector's (they are every Tidemark binary's flags: a sidecar or a
/// `tidemark demo-app` would take them as its own), killed if dropped.
fn command(program: &str) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TIDEMARK_") {
            command.env_remove(key);
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    command
}

/// Logs each line `child` writes (at debug level), keeping the last few.
fn forward(child: &mut Child, instance: &str, process: &'static str, tail: &Tail) {
    fn pipe(reader: impl AsyncRead + Unpin + Send + 'static, instance: String, process: &'static str, tail: Tail) {
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(instance, process, "{line}");
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
    }
    if let Some(stdout) = child.stdout.take() {
        pipe(stdout, instance.to_owned(), process, Arc::clone(tail));
    }
    if let Some(stderr) = child.stderr.take() {
        pipe(stderr, instance.to_owned(), process, Arc::clone(tail));
    }
}

/// `SIGTERM` to the child's process group, then `SIGKILL` if the child is
/// still there after `grace`.
async fn terminate(child: &mut Child, grace: Duration, instance: &str, process: &str) {
    // Exited (and now reaped) already: its id may be reused, so no signal.
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let Some(pid) = child.id() else { return };
    signal_group(pid, Signal::Term).await;
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return;
    }
    tracing::warn!(
        instance,
        process,
        pid,
        grace = %humantime::format_duration(grace),
        "still running after SIGTERM; sending SIGKILL"
    );
    signal_group(pid, Signal::Kill).await;
    let _ = child.kill().await;
}

/// A signal sent by [`signal_group`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    Term,
    Kill,
}

/// Sends `signal` to the process group led by `pid` with the `kill` program
/// (or the shell's `kill` where there is no program, as in slim container
/// images). Call it only while `pid` is an unreaped child of this process.
pub(crate) async fn signal_group(pid: u32, signal: Signal) {
    let name = match signal {
        Signal::Term => "TERM",
        Signal::Kill => "KILL",
    };
    let group = format!("-{pid}");
    let quiet = |mut command: Command| {
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        command
    };
    let mut program = Command::new("kill");
    program.args(["-s", name, "--", &group]);
    let mut result = quiet(program).status().await;
    if result.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        let mut shell = Command::new("sh");
        shell.args(["-c", &format!("kill -s {name} -- {group}")]);
        result = quiet(shell).status().await;
    }
    match result {
        Ok(status) if status.success() => {}
        // The group is gone already: nothing to signal.
        Ok(status) => tracing::debug!(pid, signal = name, %status, "kill found no such process group"),
        Err(e) => tracing::error!(pid, signal = name, error = %e, "cannot run kill"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    impl LocalSpec {
        fn resolve_with_sidecar(mut self) -> Result<ResolvedLocal, HookConfigError> {
            self.sidecar = Some(CommandLine::Line("tidemark-sidecar".into()));
            self.resolve()
        }
    }

    #[test]
    fn validation_names_the_key() {
        let mut spec = LocalSpec::new("python3 -m http.server {port} --bind 127.0.0.1");
        spec.validate().unwrap();
        spec.sidecar_args = vec!["--listen=127.0.0.1:1".into()];
        assert_eq!(spec.validate().unwrap_err().key, "local.sidecar_args");
        spec.sidecar_args = vec!["--report-interval".into(), "500ms".into()];
        spec.validate().unwrap();
        spec.sidecar_args = vec!["--spool-dir=/var/spool/{instance}".into()];
        let resolved = spec.clone().resolve_with_sidecar().unwrap();
        assert_eq!(
            resolved.sidecar_args.render(&["18000", "web", "web-2"]),
            ["--spool-dir=/var/spool/web-2"]
        );
        spec.sidecar_args = vec!["--spool-dir=/var/spool/{instanse}".into()];
        assert_eq!(spec.validate().unwrap_err().key, "local.sidecar_args");
        spec.sidecar_args = Vec::new();
        spec.command = CommandLine::Line("app --port {prot}".into());
        let err = spec.validate().unwrap_err();
        assert_eq!(err.key, "local.command");
        assert!(err.reason.contains("{prot}"), "{err}");
        spec.command = CommandLine::Line("app".into());
        spec.collector = "127.0.0.1:7400".into();
        assert_eq!(spec.validate().unwrap_err().key, "local.collector");
        spec.collector = default_collector();
        spec.ports_from = 0;
        assert_eq!(spec.validate().unwrap_err().key, "local.ports_from");
    }
}
