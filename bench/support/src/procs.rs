//! The processes a benchmark runs (the real release binaries, and Kafka's
//! producer tool), the addresses they log, and what /proc says they cost.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running child process. Its stderr is kept in memory (and written to
/// `<work>/<name>.log` when it stops); it is stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    log_file: Option<PathBuf>,
}

impl Proc {
    /// Starts `program` with `args`, with `RUST_LOG=info` and none of the
    /// parent's `TIDEMARK_*` settings (every setting is a flag here).
    pub fn start(name: &str, program: &Path, args: &[String], log_dir: Option<&Path>) -> anyhow::Result<Proc> {
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("TIDEMARK_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        // Long arguments (a Java classpath) shortened.
        let shown: Vec<String> = args
            .iter()
            .map(|a| match a.char_indices().nth(100) {
                Some((cut, _)) => format!("{}…", &a[..cut]),
                None => a.clone(),
            })
            .collect();
        eprintln!(
            "[bench] started {name} (pid {}): {} {}",
            child.id(),
            program.display(),
            shown.join(" ")
        );
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines,
            log_file: log_dir.map(|d| d.join(format!("{name}.log"))),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The address the process logged it listens on for `serves`
    /// (`listening addr=… serves="…"`), waiting up to 60 s.
    pub fn address(&mut self, serves: &str) -> anyhow::Result<SocketAddr> {
        let needle = format!("serves=\"{serves}\"");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found = self.output().iter().find_map(|line| {
                if !line.contains("listening") || !line.contains(&needle) {
                    return None;
                }
                line.split("addr=").nth(1)?.split_whitespace().next()?.parse().ok()
            });
            if let Some(addr) = found {
                return Ok(addr);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before it listened for {serves}:\n{}",
                    self.name,
                    self.tail(30)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} never logged that it listens for {serves}:\n{}",
                    self.name,
                    self.tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.tail(30));
        }
        Ok(())
    }

    /// Waits for the process to exit on its own; its exit status.
    pub fn wait(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        // Let the reader threads catch up with the last lines.
        std::thread::sleep(Duration::from_millis(100));
        Ok(status)
    }

    pub fn tail(&self, n: usize) -> String {
        let lines = self.output();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 15 s; saves the log.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(path) = self.log_file.take() {
            let _ = std::fs::write(&path, self.output().join("\n"));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks the whole machine spent busy (not idle, not waiting on I/O,
/// not stolen), and the ticks the hypervisor gave to other guests while this
/// one wanted to run (steal).
pub fn busy_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    Some((busy, v.get(7).copied().unwrap_or(0)))
}

/// A `/proc/<pid>/status` value in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU use of some processes over an interval.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    hz: f64,
    start: Instant,
    pids: Vec<(u32, u64)>,
    busy: (u64, u64),
}

impl CpuMeter {
    pub fn start(hz: f64, pids: &[u32]) -> CpuMeter {
        CpuMeter {
            hz,
            start: Instant::now(),
            pids: pids.iter().map(|&p| (p, cpu_ticks(p).unwrap_or(0))).collect(),
            busy: busy_ticks().unwrap_or((0, 0)),
        }
    }

    /// Cores each process kept busy since the start (same order as the
    /// pids), the cores the whole machine kept busy, and the cores the
    /// hypervisor stole.
    pub fn read(&self) -> (Vec<f64>, f64, f64) {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let per = self
            .pids
            .iter()
            .map(|&(pid, t0)| cpu_ticks(pid).map_or(f64::NAN, |t| (t.saturating_sub(t0)) as f64 / self.hz / wall))
            .collect();
        let cores = |now: u64, then: u64| now.saturating_sub(then) as f64 / self.hz / wall;
        match busy_ticks() {
            Some((busy, steal)) => (per, cores(busy, self.busy.0), cores(steal, self.busy.1)),
            None => (per, f64::NAN, f64::NAN),
        }
    }
}

/// A name no earlier run used: `<prefix>.<unix seconds>-<pid>`.
pub fn unique_name(prefix: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{prefix}.{secs}-{}", std::process::id())
}
