//! Hooks: what carries a service's scaling decisions from the
//! [`DecisionBoard`] to whatever runs the service.
//!
//! - [`webhook`]: a signed JSON `POST` per decision, retried with backoff;
//! - [`exec`]: a command run per decision (`kubectl scale ...`);
//! - `local` ([`crate::orchestrator`]): processes on this machine, each app
//!   instance behind its own sidecar.
//!
//! Every hook follows one service: it subscribes to the board, acts on the
//! latest decision, skips any it already acted on (by `decision_id`, and never
//! an older one after a newer), and drops a decision still being retried as
//! soon as a newer one arrives. Decision ids are remembered in memory only: a
//! restarted collector acts on the current decision once more (with the same
//! id, which webhook receivers use to apply it once).
//!
//! See `docs/hooks.md` for the configuration and the webhook's wire format.

pub mod exec;
pub mod webhook;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tidemark_proto::v1::ScalingDecision;
use tidemark_runtime::shutdown::Shutdown;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::task::JoinHandle;

use crate::board::DecisionBoard;
use crate::orchestrator::{LocalOrchestrator, LocalSpec};
pub use exec::{ExecSpec, ExecStats};
pub use webhook::{WebhookSpec, WebhookStats};

/// The hooks of one service: the `webhook`, `exec` and `local` tables of
/// `[services.<name>]`, each optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksSpec {
    pub webhook: Option<WebhookSpec>,
    pub exec: Option<ExecSpec>,
    pub local: Option<LocalSpec>,
}

/// A hook setting that cannot work. `key` is relative to the service's table
/// (`webhook.url`); the caller adds the file and the `services.<name>.` prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct HookConfigError {
    pub key: String,
    pub reason: String,
}

impl HookConfigError {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> HookConfigError {
        HookConfigError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl HooksSpec {
    /// Whether no hook is configured.
    pub fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.exec.is_none() && self.local.is_none()
    }

    /// Checks every configured hook, without looking at the environment
    /// (`webhook.secret_env` and the default sidecar are resolved by [`spawn`]).
    pub fn validate(&self) -> Result<(), HookConfigError> {
        if let Some(webhook) = &self.webhook {
            webhook.validate()?;
        }
        if let Some(exec) = &self.exec {
            exec.validate()?;
        }
        if let Some(local) = &self.local {
            local.validate()?;
        }
        Ok(())
    }
}

/// The running hooks of one service.
#[derive(Debug, Default)]
pub struct Hooks {
    /// One task per configured hook; each ends once shutdown fires (the
    /// local orchestrator's once all its processes are gone).
    pub tasks: Vec<JoinHandle<()>>,
    pub webhook: Option<Arc<WebhookStats>>,
    pub exec: Option<Arc<ExecStats>>,
    pub local: Option<LocalOrchestrator>,
}

impl Hooks {
    /// Waits for every hook task to end.
    pub async fn join(self) {
        for task in self.tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a hook task failed");
            }
        }
    }
}

/// Starts one task per hook configured in `spec`, each following `service`'s
/// decisions on `board` until `shutdown` fires. Fails, before starting
/// anything, if the spec is invalid or names what the environment lacks
/// (an unset `webhook.secret_env`, a sidecar that cannot be found).
pub fn spawn(
    service: String,
    spec: HooksSpec,
    board: Arc<DecisionBoard>,
    shutdown: Shutdown,
) -> Result<Hooks, HookConfigError> {
    spec.validate()?;
    // Resolve everything first, so that an error starts nothing.
    let webhook = spec.webhook.map(|s| s.resolve()).transpose()?;
    let local = spec.local.map(|s| s.resolve()).transpose()?;
    let mut hooks = Hooks::default();
    if let Some(webhook) = webhook {
        let (stats, task) = webhook::spawn(service.clone(), webhook, Arc::clone(&board), shutdown.clone());
        hooks.webhook = Some(stats);
        hooks.tasks.push(task);
    }
    if let Some(exec) = spec.exec {
        let (stats, task) = exec::spawn(service.clone(), exec, Arc::clone(&board), shutdown.clone())?;
        hooks.exec = Some(stats);
        hooks.tasks.push(task);
    }
    if let Some(local) = local {
        let (orchestrator, task) = LocalOrchestrator::spawn_resolved(service, local, board, shutdown);
        hooks.local = Some(orchestrator);
        hooks.tasks.push(task);
    }
    Ok(hooks)
}

/// Follows one service's decisions on the board: yields the latest decision
/// not yet yielded, skipping any older than (or the same as) the last one.
pub(crate) struct Follow {
    service: String,
    board: Arc<DecisionBoard>,
    feed: broadcast::Receiver<ScalingDecision>,
    /// The board's current decision has not been looked at yet.
    first: bool,
    /// `(decided_at, decision_id)` of the last decision yielded.
    last: Option<(i64, String)>,
}

impl fmt::Debug for Follow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follow")
            .field("service", &self.service)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl Follow {
    /// Subscribes before anything is read, so no decision falls in between.
    pub(crate) fn new(service: String, board: Arc<DecisionBoard>) -> Follow {
        let feed = board.subscribe();
        Follow {
            service,
            board,
            feed,
            first: true,
            last: None,
        }
    }

    /// The newest decision for the service not yielded before, waiting for
    /// one if need be; `None` once the board is gone. Cancel-safe: it awaits
    /// only the feed, and changes nothing before a decision is yielded.
    pub(crate) async fn next(&mut self) -> Option<ScalingDecision> {
        loop {
            let mut newest = None;
            if self.first {
                self.first = false;
                newest = self.board.get(&self.service);
            }
            if newest.is_none() {
                match self.feed.recv().await {
                    Ok(decision) => self.consider(&mut newest, Some(decision)),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(service = %self.service, missed, "decision feed lagged; re-reading the board");
                        let current = self.board.get(&self.service);
                        self.consider(&mut newest, current);
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
            // Whatever is queued already is newer: act on the newest only.
            loop {
                match self.feed.try_recv() {
                    Ok(decision) => self.consider(&mut newest, Some(decision)),
                    Err(TryRecvError::Lagged(_)) => {
                        let current = self.board.get(&self.service);
                        self.consider(&mut newest, current);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
            if let Some(decision) = newest {
                self.last = Some((decision.decided_at_unix_micros, decision.decision_id.clone()));
                return Some(decision);
            }
        }
    }

    /// Keeps `candidate` in `newest` if it is this service's, newer than
    /// `newest` and newer than the last decision yielded.
    fn consider(&self, newest: &mut Option<ScalingDecision>, candidate: Option<ScalingDecision>) {
        let Some(candidate) = candidate else { return };
        if candidate.service != self.service {
            return;
        }
        let key = (candidate.decided_at_unix_micros, candidate.decision_id.as_str());
        if let Some((at, id)) = &self.last
            && key <= (*at, id.as_str())
        {
            return;
        }
        if let Some(held) = newest
            && key <= (held.decided_at_unix_micros, held.decision_id.as_str())
        {
            return;
        }
        *newest = Some(candidate);
    }
}

/// Deserializes a humantime duration such as `"200ms"` or `"30s"`.
pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"200ms\" or \"30s\": {e}")))
}

/// A command line: one string split like a shell would (`shlex`, no shell
/// runs it), or an array of arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "a command line string or an array of arguments")]
pub enum CommandLine {
    Line(String),
    Args(Vec<String>),
}

impl CommandLine {
    /// The arguments, the program first.
    pub fn argv(&self) -> Result<Vec<String>, String> {
        let argv = match self {
            CommandLine::Line(line) => {
                shlex::split(line).ok_or_else(|| format!("cannot split {line:?} into arguments (unclosed quote?)"))?
            }
            CommandLine::Args(args) => args.clone(),
        };
        if argv.first().is_none_or(|program| program.is_empty()) {
            return Err("names no program".to_owned());
        }
        Ok(argv)
    }
}

/// An argv whose arguments may hold `{name}` placeholders. The command line
/// is split into arguments first and values are put into each argument after,
/// so a value is always exactly one argument's part, never shell syntax. Only
/// `{` + a name + `}` is a placeholder; other braces are literal (so JSON
/// arguments need no escaping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    args: Vec<Vec<Piece>>,
    names: &'static [&'static str],
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    /// Index into the template's names.
    Value(usize),
}

impl Template {
    /// Parses `command`, allowing the placeholders `names`.
    pub(crate) fn parse(command: &CommandLine, names: &'static [&'static str]) -> Result<Template, String> {
        let template = Template::parse_args(&command.argv()?, names)?;
        if matches!(template.args.first().map(Vec::as_slice), Some([Piece::Value(_), ..])) {
            // A program chosen by a decision's values is never what anyone means.
            return Err("the program itself cannot be a placeholder".to_owned());
        }
        Ok(template)
    }

    /// Parses arguments that are already split (no program among them).
    pub(crate) fn parse_args(argv: &[String], names: &'static [&'static str]) -> Result<Template, String> {
        let mut args = Vec::with_capacity(argv.len());
        for arg in argv {
            let mut pieces = Vec::new();
            let mut text = String::new();
            let mut rest = arg.as_str();
            while let Some(open) = rest.find('{') {
                text.push_str(&rest[..open]);
                let after = &rest[open + 1..];
                let name_len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                let name = &after[..name_len];
                let is_placeholder = !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && after[name_len..].starts_with('}');
                if !is_placeholder {
                    text.push('{');
                    rest = after;
                    continue;
                }
                let index = names.iter().position(|n| *n == name).ok_or_else(|| {
                    let known: Vec<String> = names.iter().map(|n| format!("{{{n}}}")).collect();
                    format!("unknown placeholder {{{name}}}; known are {}", known.join(", "))
                })?;
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Value(index));
                rest = &after[name_len + 1..];
            }
            text.push_str(rest);
            if !text.is_empty() || pieces.is_empty() {
                pieces.push(Piece::Text(text));
            }
            args.push(pieces);
        }
        Ok(Template { args, names })
    }

    /// The argv with `values` (in the order of the names given to
    /// [`Template::parse`]) put in.
    pub(crate) fn render(&self, values: &[&str]) -> Vec<String> {
        debug_assert_eq!(values.len(), self.names.len());
        self.args
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|piece| match piece {
                        Piece::Text(text) => text.as_str(),
                        Piece::Value(i) => values.get(*i).copied().unwrap_or_default(),
                    })
                    .collect()
            })
            .collect()
    }
}

/// The last `max` bytes of `bytes` as text, cut at a character boundary.
pub(crate) fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(max)..]);
    text.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const NAMES: &[&str] = &["service", "replicas"];

    fn line(s: &str) -> CommandLine {
        CommandLine::Line(s.to_owned())
    }

    #[test]
    fn templates_substitute_into_split_arguments() {
        let t = Template::parse(
            &line("kubectl scale 'deployment/{service}' --replicas={replicas}"),
            NAMES,
        )
        .unwrap();
        assert_eq!(
            t.render(&["shop", "3"]),
            ["kubectl", "scale", "deployment/shop", "--replicas=3"]
        );
        // A value with spaces or shell syntax stays one argument.
        assert_eq!(t.render(&["a b; rm -rf /", "1"])[2], "deployment/a b; rm -rf /");
        let json = Template::parse(&line(r#"patch -p '{"spec":{"replicas":{replicas}}}'"#), NAMES).unwrap();
        assert_eq!(json.render(&["s", "4"])[2], r#"{"spec":{"replicas":4}}"#);
        let empty_arg = Template::parse(&line("echo '' {service}{replicas}"), NAMES).unwrap();
        assert_eq!(empty_arg.render(&["s", "2"]), ["echo", "", "s2"]);
    }

    #[test]
    fn templates_refuse_unknown_placeholders_and_bad_lines() {
        let err = Template::parse(&line("echo {sevrice}"), NAMES).unwrap_err();
        assert!(err.contains("unknown placeholder {sevrice}"), "{err}");
        assert!(err.contains("{service}, {replicas}"), "{err}");
        assert!(Template::parse(&line("echo 'unclosed"), NAMES).is_err());
        assert!(Template::parse(&line("   "), NAMES).is_err());
        assert!(Template::parse(&line("{service} x"), NAMES).is_err());
        assert!(Template::parse(&CommandLine::Args(vec![]), NAMES).is_err());
    }

    fn decision(service: &str, id: &str, at: i64) -> ScalingDecision {
        ScalingDecision {
            decision_id: id.into(),
            service: service.into(),
            decided_at_unix_micros: at,
            ..ScalingDecision::default()
        }
    }

    #[tokio::test]
    async fn follow_yields_the_current_then_only_newer_decisions_of_its_service() {
        let board = DecisionBoard::new();
        board.publish(decision("shop", "a", 1));
        let mut follow = Follow::new("shop".into(), Arc::clone(&board));
        assert_eq!(follow.next().await.unwrap().decision_id, "a");
        board.publish(decision("other", "x", 5));
        board.publish(decision("shop", "b", 2));
        board.publish(decision("shop", "c", 3));
        // b and c were both queued: only the newest is acted on.
        assert_eq!(follow.next().await.unwrap().decision_id, "c");
        let waiting = tokio::time::timeout(Duration::from_millis(50), follow.next()).await;
        assert!(waiting.is_err(), "nothing new to yield");
        board.publish(decision("shop", "d", 4));
        assert_eq!(follow.next().await.unwrap().decision_id, "d");
    }

    #[tokio::test]
    async fn follow_recovers_from_lag_without_going_backwards() {
        let board = DecisionBoard::new();
        let mut follow = Follow::new("shop".into(), Arc::clone(&board));
        for at in 0..3000 {
            board.publish(decision("shop", &format!("d{at}"), at));
        }
        assert_eq!(follow.next().await.unwrap().decision_id, "d2999");
        let waiting = tokio::time::timeout(Duration::from_millis(50), follow.next()).await;
        assert!(waiting.is_err(), "the decisions left in the feed are older");
    }
}
