//! The README's quickstart, run word for word: the commands are read from
//! README.md itself (`scripts/dev`, the block of "## The two commands", then
//! every ```sh block under "## Trying it", in order) and run with bash from
//! the repository's root, as a reader would paste them into two terminals.
//!
//! What differs from a reader's terminal, and only that: the environment has
//! no `TIDEMARK_*` settings but `TIDEMARK_DATA_DIR`, a temporary directory, so
//! the repository's `.tidemark/` is left alone, and `TIDEMARK_DEV_NO_BUILD`,
//! so `scripts/dev` runs the release binaries `scripts/test` has just built
//! (run from inside `cargo test`, its own `cargo build` rebuilt some of them
//! again, minutes of CI); each command's output goes to a file; and Ctrl-C
//! is a SIGINT to `scripts/dev`'s process group.
//!
//! The commands use the fixed default ports (7400, 7401, 7410, 7412, 8000,
//! 3000, 8080, 9090), so this is the only test that runs them, and the only
//! test in this file; it fails at once, naming the port, if one is taken.
//! `scripts/test` builds the release binaries the README's commands run.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tidemark_e2e::get;

const PORTS: [u16; 8] = [7400, 7401, 7410, 7412, 8000, 3000, 8080, 9090];
const API: &str = "127.0.0.1:7410";

/// How long `scripts/dev` may take to come up: it may have to build the
/// release binaries first (minutes on a small machine).
const DEV_START: Duration = Duration::from_secs(45 * 60);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The ```sh blocks of the README section headed `heading`, in order.
fn sh_blocks(readme: &str, heading: &str) -> Vec<String> {
    let mut lines = readme.lines().skip_while(|l| l.trim_end() != heading);
    assert!(lines.next().is_some(), "README.md has no `{heading}` section");
    let mut blocks = Vec::new();
    let mut block: Option<Vec<&str>> = None;
    for line in lines.take_while(|l| !l.starts_with("## ")) {
        match &mut block {
            None if line.trim_end() == "```sh" => block = Some(Vec::new()),
            None => {}
            Some(b) if line.trim_end() == "```" => {
                blocks.push(b.join("\n") + "\n");
                block = None;
            }
            Some(b) => b.push(line),
        }
    }
    assert!(block.is_none(), "an unclosed ```sh block under `{heading}`");
    blocks
}

/// A process (and its process group) started by this test, stopped with
/// everything it started when dropped, the test failing or not.
struct Group {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Group {
    /// `bash -e -c script` from the repository's root, in a process group
    /// of its own, its output in files under `dir`.
    fn bash(name: &str, script: &str, dir: &Path, env: &[(&str, &Path)]) -> Group {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let mut command = Command::new("bash");
        command
            .args(["-e", "-c", script])
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .process_group(0);
        for (key, _) in std::env::vars() {
            if key.starts_with("TIDEMARK_") {
                command.env_remove(key);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run bash for {name}: {e}"));
        Group {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
        }
    }

    fn pgid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn show(&self) -> String {
        format!(
            "----- {} stdout -----\n{}\n----- {} stderr -----\n{}\n-----",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Waits up to `timeout` for the bash (not what it left in the background) to exit.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish in {timeout:?}:\n{}",
                self.name,
                self.show()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `needle` shows in its stderr, failing if it exits first.
    fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{}",
                    self.name,
                    self.show()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} never logged {needle:?}:\n{}",
                self.name,
                self.show()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends `signal` to the whole process group.
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{}", self.pgid())])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // What the group started, process groups of their own included
        // (dev's instances), before the parents go and they are orphaned.
        let mut doomed = live_group(self.pgid());
        doomed.extend(descendants(self.child.id()));
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while doomed.iter().any(|pid| is_alive(*pid)) && Instant::now() < deadline {
            let _ = self.child.try_wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        self.signal("KILL");
        for pid in doomed {
            if is_alive(pid) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.show());
        }
    }
}

/// One process as /proc tells it: parent, process group and state.
struct Stat {
    pid: u32,
    ppid: u32,
    pgrp: u32,
    state: char,
}

fn processes() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let rest = stat.rsplit_once(')')?.1;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid = fields.next()?.parse().ok()?;
            let pgrp = fields.next()?.parse().ok()?;
            Some(Stat { pid, ppid, pgrp, state })
        })
        .collect()
}

fn is_alive(pid: u32) -> bool {
    processes().iter().any(|p| p.pid == pid && p.state != 'Z')
}

/// The live processes of a process group.
fn live_group(pgid: u32) -> Vec<u32> {
    processes()
        .iter()
        .filter(|p| p.pgrp == pgid && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Every live process below `root`.
fn descendants(root: u32) -> Vec<u32> {
    let all = processes();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|p| p.ppid == parent && p.state != 'Z').map(|p| p.pid));
        i += 1;
    }
    found.remove(0);
    found
}

fn json_stream(text: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("not JSON values ({e}):\n{text}"))
}

/// The number after `label` on the line that starts with it.
fn number_after(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{label} N` line in:\n{text}"))
}

async fn requests_billed(query: &str) -> u64 {
    let (status, body) = get(&format!("http://{API}/v1/usage?{query}&meter=requests"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["totals"]["requests"].as_u64().unwrap_or(0)
}

/// Waits until billing counts `want` requests for `query`.
async fn expect_billed(query: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = requests_billed(query).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{query}: billed {got} requests, want {want}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A Prometheus counter's value in a `/metrics` text.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_quickstart_runs_as_written() {
    let root = repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = sh_blocks(&readme, "## The two commands");
    assert_eq!(start.first().map(String::as_str), Some("scripts/dev\n"), "{start:?}");
    let trying = sh_blocks(&readme, "## Trying it");
    let [load, sidecar] = &trying[..] else {
        panic!("expected two ```sh blocks under `## Trying it` (load on dev, a sidecar of your own): {trying:#?}");
    };
    assert!(
        load.contains("tidemark loadgen") && load.contains("x-tenant-id: acme"),
        "{load}"
    );
    assert!(sidecar.contains("tidemark-sidecar"), "{sidecar}");
    for port in PORTS {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            panic!(
                "port {port} is taken ({e}): the README's commands use their default ports; stop what holds it \
                 (another `tidemark dev`?)"
            );
        }
    }
    let had_dot_tidemark = root.join(".tidemark").exists();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // First terminal: scripts/dev, until it runs an instance of the demo app.
    let mut dev = Group::bash(
        "scripts-dev",
        &start[0],
        dir.path(),
        &[("TIDEMARK_DATA_DIR", &data), ("TIDEMARK_DEV_NO_BUILD", Path::new("1"))],
    );
    dev.wait_for_log("tidemark dev is running", DEV_START);
    dev.wait_for_log("local orchestrator: instance ready", Duration::from_secs(60));

    // Second terminal: load for acme, then its usage and running cost.
    let mut first = Group::bash("trying-it-load", load, dir.path(), &[]);
    let status = first.wait(Duration::from_secs(300));
    assert!(status.success(), "the load block failed ({status}):\n{}", first.show());
    let out = first.stdout();
    let answered = number_after(&out, "responses");
    assert!(answered > 0, "{out}");
    assert!(
        out.contains(" 0 errors (0 non-2xx, 0 I/O), 0 unfinished"),
        "every request answered:\n{out}"
    );
    let (_, after_summary) = out.split_once("start lag µs").unwrap();
    let answers = json_stream(after_summary.split_once('\n').map_or("", |(_, rest)| rest));
    let [usage, cost] = &answers[..] else {
        panic!("expected the usage and the cost answers after the summary:\n{out}");
    };
    // Asked the moment the load ended: the last second may still be on its way.
    let shown = usage["totals"]["requests"].as_u64().unwrap();
    assert!(
        shown > 0 && shown <= answered,
        "usage showed {shown} of {answered}:\n{out}"
    );
    assert_eq!(cost["tenant"], "acme", "{cost}");
    let charges: Vec<&str> = cost["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["charge"].as_str())
        .collect();
    assert!(charges.contains(&"requests"), "{cost}");
    assert!(cost["total"].as_str().is_some(), "{cost}");
    // Every answered request is billed to acme, once.
    expect_billed("tenant=acme", answered).await;
    // And the service scaled with the load, as the README says it does.
    let ready = dev.stderr().matches("local orchestrator: instance ready").count();
    assert!(
        ready >= 2,
        "the demo app never scaled out under the load:\n{}",
        dev.show()
    );

    // A sidecar of your own, in front of the demo app, reporting to dev's collector.
    let mut second = Group::bash("trying-it-sidecar", sidecar, dir.path(), &[]);
    let status = second.wait(Duration::from_secs(120));
    assert!(
        status.success(),
        "the sidecar block failed ({status}):\n{}",
        second.show()
    );
    assert!(
        second.stdout().contains("Hello, world!"),
        "the demo app answered through the sidecar:\n{}",
        second.show()
    );
    let (status, metrics) = get("http://127.0.0.1:9090/metrics", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let proxied = counter(&metrics, "tidemark_sidecar_requests_total");
    assert!(proxied >= 1, "{metrics}");
    expect_billed("tenant=acme&service=shop", proxied).await;
    expect_billed("tenant=acme", answered + proxied).await;
    drop(second);
    assert!(
        std::net::TcpListener::bind("127.0.0.1:8080").is_ok(),
        "the sidecar block's processes are stopped"
    );

    // Ctrl-C: instances stop, then collector and billing; invoices are printed.
    let instances = descendants(dev.pgid());
    assert!(!instances.is_empty());
    dev.signal("INT");
    let status = dev.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "scripts/dev did not stop cleanly ({status}):\n{}",
        dev.show()
    );
    let printed = dev.stdout();
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("invoice ") && l.contains("draft")),
        "no invoice printed at exit:\n{printed}"
    );
    let left: Vec<u32> = instances.into_iter().filter(|pid| is_alive(*pid)).collect();
    assert!(left.is_empty(), "processes left running after Ctrl-C: {left:?}");
    assert!(
        data.join("billing.db").exists(),
        "dev kept its data in TIDEMARK_DATA_DIR"
    );
    if !had_dot_tidemark {
        assert!(
            !root.join(".tidemark").exists(),
            "the test left .tidemark/ in the repository"
        );
    }
}
