//! The exec hook: runs a command per decision, e.g.
//! `kubectl scale deployment/{service} --replicas={replicas}`.
//!
//! The command line is split into arguments first (`shlex`), and the
//! decision's values are put into each argument after; no shell runs it, so
//! no value can inject anything. A failed or timed-out command is logged and
//! counted, and not retried: the hook cannot tell whether a failed command
//! did part of its work (running it again could act twice), and the next
//! decision runs the command again with the then-current replica count.
//! A command that must retry can do so itself (wrap it in a script).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tidemark_proto::v1::ScalingDecision;
use tidemark_runtime::shutdown::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinHandle;

use super::{CommandLine, Follow, HookConfigError, Template, duration};
use crate::board::DecisionBoard;
use crate::orchestrator::{Signal, signal_group};

/// The placeholders an exec command may use, in this order.
pub const PLACEHOLDERS: &[&str] = &["service", "replicas", "previous", "decision_id"];

/// The `[services.<name>.exec]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// The command, with placeholders `{service}`, `{replicas}`, `{previous}`
    /// and `{decision_id}`: one line (split like a shell would, but run
    /// without one) or an array of arguments.
    pub command: CommandLine,
    /// Longest run; the command (and what it started) is killed after it
    /// (default 30s).
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

impl ExecSpec {
    /// A spec with the default timeout.
    pub fn new(command: impl Into<String>) -> ExecSpec {
        ExecSpec {
            command: CommandLine::Line(command.into()),
            timeout: default_timeout(),
        }
    }

    pub fn validate(&self) -> Result<(), HookConfigError> {
        self.template()?;
        if self.timeout.is_zero() {
            return Err(HookConfigError::new("exec.timeout", "must be more than 0s"));
        }
        Ok(())
    }

    fn template(&self) -> Result<Template, HookConfigError> {
        Template::parse(&self.command, PLACEHOLDERS).map_err(|reason| HookConfigError::new("exec.command", reason))
    }
}

/// What the exec hook did, counted since it started.
#[derive(Debug, Default)]
pub struct ExecStats {
    /// Commands started (or tried: a program that cannot start counts).
    pub runs: AtomicU64,
    /// Commands that exited with status 0.
    pub succeeded: AtomicU64,
    /// Commands that could not start, exited non-zero or were killed by a signal.
    pub failed: AtomicU64,
    /// Commands killed at the timeout.
    pub timed_out: AtomicU64,
}

impl ExecStats {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts the exec hook for `service`.
pub(crate) fn spawn(
    service: String,
    spec: ExecSpec,
    board: Arc<DecisionBoard>,
    shutdown: Shutdown,
) -> Result<(Arc<ExecStats>, JoinHandle<()>), HookConfigError> {
    spec.validate()?;
    let template = spec.template()?;
    let stats = Arc::new(ExecStats::default());
    let task = tokio::spawn(run(
        service,
        template,
        spec.timeout,
        board,
        Arc::clone(&stats),
        shutdown,
    ));
    Ok((stats, task))
}

async fn run(
    service: String,
    template: Template,
    timeout: Duration,
    board: Arc<DecisionBoard>,
    stats: Arc<ExecStats>,
    mut shutdown: Shutdown,
) {
    let mut follow = Follow::new(service.clone(), board);
    tracing::info!(service, "exec hook started");
    loop {
        let decision = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            decision = follow.next() => match decision {
                Some(decision) => decision,
                None => break,
            },
        };
        // A command already running is let finish (within its timeout) even
        // on shutdown: cutting a scaling command short is worse than waiting.
        run_once(&template, timeout, &decision, &stats).await;
    }
    tracing::info!(service, "exec hook stopped");
}

/// Most output kept from a command, for the logs.
const OUTPUT_KEPT: usize = 2048;

async fn run_once(template: &Template, timeout: Duration, decision: &ScalingDecision, stats: &ExecStats) {
    let service = decision.service.as_str();
    let decision_id = decision.decision_id.as_str();
    let replicas = decision.desired_replicas.to_string();
    let previous = decision.previous_replicas.to_string();
    let argv = template.render(&[service, &replicas, &previous, decision_id]);
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    ExecStats::add(&stats.runs);
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a timeout kills what it started too, and a
        // Ctrl-C meant for the collector does not cut it short.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            ExecStats::add(&stats.failed);
            tracing::error!(service, decision_id, program, error = %e, "exec hook: cannot start the command");
            return;
        }
    };
    let stdout = tokio::spawn(read_tail(child.stdout.take()));
    let stderr = tokio::spawn(read_tail(child.stderr.take()));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            ExecStats::add(&stats.timed_out);
            // Not reaped yet, so the id is still this child's: kill its group.
            if let Some(pid) = child.id() {
                signal_group(pid, Signal::Kill).await;
            }
            let _ = child.kill().await;
            let stderr = collect(stderr).await;
            tracing::error!(
                service,
                decision_id,
                argv = ?argv,
                timeout = %humantime::format_duration(timeout),
                stderr,
                "exec hook: the command timed out and was killed"
            );
            return;
        }
    };
    let stdout = collect(stdout).await;
    let stderr = collect(stderr).await;
    match status {
        Ok(status) if status.success() => {
            ExecStats::add(&stats.succeeded);
            tracing::info!(
                service,
                decision_id,
                desired_replicas = decision.desired_replicas,
                argv = ?argv,
                "exec hook: command succeeded"
            );
            tracing::debug!(service, decision_id, stdout, stderr, "exec hook: command output");
        }
        Ok(status) => {
            ExecStats::add(&stats.failed);
            tracing::error!(service, decision_id, argv = ?argv, %status, stderr, "exec hook: the command failed; the next decision runs it again");
        }
        Err(e) => {
            ExecStats::add(&stats.failed);
            tracing::error!(service, decision_id, argv = ?argv, error = %e, "exec hook: cannot wait for the command");
        }
    }
}

/// Reads `reader` to its end, keeping the last [`OUTPUT_KEPT`] bytes or so.
async fn read_tail(reader: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > 2 * OUTPUT_KEPT {
                    kept.drain(..kept.len() - OUTPUT_KEPT);
                }
            }
        }
    }
    kept
}

/// The tail of an output reader; a process the command left running may hold
/// the pipe open, so this waits a moment only.
async fn collect(reader: JoinHandle<Vec<u8>>) -> String {
    match tokio::time::timeout(Duration::from_secs(1), reader).await {
        Ok(Ok(bytes)) => super::tail(&bytes, OUTPUT_KEPT),
        _ => String::new(),
    }
}
