//! The local orchestrator with real processes: `python3 -m http.server` as
//! the app, the real `tidemark-sidecar` in front of each instance.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tidemark_collector::board::DecisionBoard;
use tidemark_collector::hooks::CommandLine;
use tidemark_collector::orchestrator::{InstanceStatus, LocalOrchestrator, LocalSpec, Phase};
use tidemark_proto::v1::ScalingDecision;
use tidemark_runtime::shutdown;

/// The sidecar binary: `TIDEMARK_SIDECAR_BIN` if set, else the workspace's
/// own, built (or brought up to date) with cargo into the target directory
/// this test runs from. `cargo test -p tidemark-collector` does not build
/// other packages' binaries; `cargo build` here is quick when it is current.
fn sidecar_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TIDEMARK_SIDECAR_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let path = profile_dir.join("tidemark-sidecar");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build
        .args([
            "build",
            "--quiet",
            "-p",
            "tidemark-sidecar",
            "--bin",
            "tidemark-sidecar",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.env("CARGO_TARGET_DIR", target_dir);
    }
    match build.status() {
        Ok(status) if status.success() => {}
        // Offline or no cargo: an existing binary (e.g. built by scripts/test) still serves.
        result => eprintln!("cannot build tidemark-sidecar ({result:?}); using {}", path.display()),
    }
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p tidemark-sidecar` or set TIDEMARK_SIDECAR_BIN",
        path.display()
    );
    path
}

fn decision(id: &str, at: i64, desired: u32) -> ScalingDecision {
    ScalingDecision {
        decision_id: id.to_owned(),
        service: "web".to_owned(),
        decided_at_unix_micros: at,
        desired_replicas: desired,
        ..ScalingDecision::default()
    }
}

/// Whether `pid` runs (a zombie no longer does).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn pids(status: &InstanceStatus) -> [u32; 2] {
    [status.app_pid.unwrap(), status.sidecar_pid.unwrap()]
}

/// Waits up to `secs` for `condition`, showing the orchestrator's state if it never holds.
async fn eventually(orchestrator: &LocalOrchestrator, secs: u64, what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; instances: {:#?}",
            orchestrator.status()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `GET /` through `addr`: the status.
async fn get(addr: SocketAddr) -> u16 {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let request = http::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("the instance answers in time")
        .unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

fn ready_addrs(orchestrator: &LocalOrchestrator) -> Vec<SocketAddr> {
    orchestrator.instances().borrow().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_as_many_instances_as_decided_restarts_the_dead_and_stops_all_on_shutdown() {
    let sidecar = sidecar_bin();
    // No collector there: the sidecars keep serving and hold their usage.
    let collector = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut spec = LocalSpec::new("python3 -m http.server {port} --bind 127.0.0.1");
    spec.sidecar = Some(CommandLine::Args(vec![sidecar.to_string_lossy().into_owned()]));
    let spools = tempfile::tempdir().unwrap();
    spec.sidecar_args = vec![
        "--drain-timeout=500ms".to_owned(),
        format!("--spool-dir={}/{{instance}}", spools.path().display()),
    ];
    spec.collector = format!("http://{collector}");
    spec.ready_timeout = Duration::from_secs(20);
    spec.stop_grace = Duration::from_secs(5);
    let board = DecisionBoard::new();
    let (trigger, shutdown) = shutdown::channel();
    let (orchestrator, task) = LocalOrchestrator::spawn("web".to_owned(), spec, Arc::clone(&board), shutdown).unwrap();
    let o = &orchestrator;

    // Two instances: two apps, two sidecars, both answering through the sidecar.
    board.publish(decision("d-1", 1, 2));
    eventually(o, 30, "two ready instances", || ready_addrs(o).len() == 2).await;
    assert_eq!(o.instance_count(), 2);
    assert_eq!(o.desired(), 2);
    let status = o.status();
    assert_eq!(status.len(), 2);
    let names: Vec<&str> = status.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web-1", "web-2"]);
    let sidecars: Vec<SocketAddr> = status.iter().map(|s| s.sidecar).collect();
    assert_eq!(ready_addrs(o), sidecars);
    for instance in &status {
        assert_eq!(instance.phase, Phase::Ready);
        let [app, sidecar] = pids(instance);
        assert!(alive(app) && alive(sidecar));
        let app_args = cmdline(app);
        assert!(app_args.contains(&instance.app_port.to_string()), "{app_args:?}");
        let sidecar_args = cmdline(sidecar);
        for flag in [
            format!("--listen={}", instance.sidecar),
            format!("--upstream=http://127.0.0.1:{}", instance.app_port),
            "--service=web".to_owned(),
            format!("--instance={}", instance.name),
            format!("--collector=http://{collector}"),
            format!("--app-pid={app}"),
            "--drain-timeout=500ms".to_owned(),
            format!("--spool-dir={}/{}", spools.path().display(), instance.name),
        ] {
            assert!(sidecar_args.contains(&flag), "{flag} missing from {sidecar_args:?}");
        }
        assert_eq!(
            get(instance.sidecar).await,
            200,
            "the app answers through {}",
            instance.sidecar
        );
        assert!(
            spools.path().join(&instance.name).is_dir(),
            "each sidecar has its own spool"
        );
    }
    let all_pids: Vec<u32> = status.iter().flat_map(pids).collect();
    assert_eq!(
        all_pids.iter().collect::<std::collections::HashSet<_>>().len(),
        4,
        "four distinct processes"
    );

    // One: the newest instance goes, its processes with it.
    let scaled_down = Instant::now();
    board.publish(decision("d-2", 2, 1));
    eventually(o, 20, "one instance left", || {
        o.status().len() == 1 && ready_addrs(o).len() == 1
    })
    .await;
    assert!(
        scaled_down.elapsed() < Duration::from_secs(4),
        "SIGTERM stopped web-2 before the 5s stop_grace ran out (no SIGKILL)"
    );
    assert_eq!(o.instance_count(), 1);
    assert_eq!(o.status()[0].name, "web-1");
    assert_eq!(ready_addrs(o), [status[0].sidecar]);
    for pid in pids(&status[1]) {
        assert!(!alive(pid), "process {pid} of web-2 is gone");
    }
    assert!(pids(&status[0]).into_iter().all(alive), "web-1 still runs");
    assert_eq!(get(status[0].sidecar).await, 200);

    // A dead app is restarted (with its sidecar), and answers again.
    let [dead_app, old_sidecar] = pids(&status[0]);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &dead_app.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually(o, 30, "the restart", || {
        o.restarts() == 1
            && o.status()
                .first()
                .is_some_and(|s| s.phase == Phase::Ready && s.app_pid.is_some_and(|p| p != dead_app))
    })
    .await;
    let restarted = o.status()[0].clone();
    assert_eq!(restarted.name, "web-1");
    assert_eq!(restarted.restarts, 1);
    assert!(!alive(old_sidecar), "the old sidecar was stopped");
    assert_eq!(ready_addrs(o), [restarted.sidecar]);
    assert_eq!(get(restarted.sidecar).await, 200);
    assert_eq!(o.failed_starts(), 0);

    // Zero: nothing runs.
    board.publish(decision("d-3", 3, 0));
    eventually(o, 20, "no instance", || o.status().is_empty()).await;
    assert!(ready_addrs(o).is_empty());
    assert_eq!(o.instance_count(), 0);
    assert!(pids(&restarted).into_iter().all(|p| !alive(p)));

    // Shutdown stops every instance, and the task ends once they are gone.
    board.publish(decision("d-4", 4, 2));
    eventually(o, 30, "two ready instances again", || ready_addrs(o).len() == 2).await;
    let last: Vec<u32> = o.status().iter().flat_map(pids).collect();
    trigger.fire();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the orchestrator stops in time")
        .unwrap();
    assert!(last.iter().all(|p| !alive(*p)), "every process stopped");
    assert!(o.status().is_empty());
    assert!(ready_addrs(o).is_empty());
}

#[tokio::test]
async fn a_missing_sidecar_or_a_bad_command_is_refused_at_start() {
    let board = DecisionBoard::new();
    let (_trigger, shutdown) = shutdown::channel();
    let mut spec = LocalSpec::new("app --port {prot}");
    spec.sidecar = Some(CommandLine::Line("tidemark-sidecar".to_owned()));
    let err = LocalOrchestrator::spawn("web".to_owned(), spec, Arc::clone(&board), shutdown.clone()).unwrap_err();
    assert_eq!(err.key, "local.command");

    let mut spec = LocalSpec::new("app {port}");
    spec.sidecar_args = vec!["--service".to_owned(), "other".to_owned()];
    let err = LocalOrchestrator::spawn("web".to_owned(), spec, board, shutdown).unwrap_err();
    assert_eq!(err.key, "local.sidecar_args");
    assert!(err.reason.contains("--service"), "{err}");
}
