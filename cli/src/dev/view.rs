//! The live view of `tidemark dev`: a few lines, redrawn every second, with
//! the instances of each service and why, its load, and what each tenant's
//! open period costs so far.
//!
//! On a terminal the block is redrawn in place; otherwise (a pipe, a log
//! file, a test) it is printed as plain lines every few seconds.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use tidemark_proto::v1::ScalingDecision;

/// What one tenant owes for the open period so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCost {
    pub tenant: String,
    pub total: String,
    pub currency: String,
}

/// How often the view is drawn on a terminal, and otherwise.
pub const TERMINAL_EVERY: Duration = Duration::from_secs(1);
pub const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The view as text: one line per service, then one per tenant.
pub fn render(decisions: &[ScalingDecision], costs: &[TenantCost]) -> String {
    let mut out = String::new();
    if decisions.is_empty() {
        out.push_str("services: none yet (send traffic to the entry port)\n");
    }
    for d in decisions {
        let why = d.explanation.clone().unwrap_or_default();
        let _ = writeln!(
            out,
            "{service}: {replicas} instance(s) ({reporting} reporting), {mode}; {metric} {panic:.1} now, {stable:.1} over {window:.0}s; {summary}",
            service = d.service,
            replicas = d.desired_replicas,
            reporting = why.instances_reporting,
            mode = if why.mode.is_empty() { "stable" } else { &why.mode },
            metric = if why.metric.is_empty() { "load" } else { &why.metric },
            panic = why.panic_window_load,
            stable = why.stable_window_load,
            window = why.stable_window_seconds,
            summary = why.summary,
        );
    }
    if costs.is_empty() {
        out.push_str("tenants: no usage billed yet\n");
    }
    for c in costs {
        let _ = writeln!(
            out,
            "tenant {}: {} {} so far this period",
            c.tenant, c.total, c.currency
        );
    }
    out
}

/// Draws `text` over the previous drawing of `lines` lines (terminal only);
/// returns how many lines this drawing took.
pub fn draw(text: &str, previous_lines: usize) -> usize {
    let mut stdout = std::io::stdout().lock();
    if stdout.is_terminal() && previous_lines > 0 {
        // Up to the start of the previous block, then clear to the end.
        let _ = write!(stdout, "\x1b[{previous_lines}F\x1b[J");
    }
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    text.lines().count()
}

/// Whether the view redraws in place.
pub fn on_terminal() -> bool {
    std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use tidemark_proto::v1::DecisionExplanation;

    use super::*;

    #[test]
    fn one_line_per_service_and_per_tenant() {
        let decision = ScalingDecision {
            service: "demo".into(),
            desired_replicas: 3,
            explanation: Some(DecisionExplanation {
                mode: "panic".into(),
                metric: "concurrency".into(),
                instances_reporting: 2,
                panic_window_load: 12.0,
                stable_window_load: 4.5,
                stable_window_seconds: 60.0,
                summary: "needs 3".into(),
                ..DecisionExplanation::default()
            }),
            ..ScalingDecision::default()
        };
        let cost = TenantCost {
            tenant: "acme".into(),
            total: "0.42".into(),
            currency: "USD".into(),
        };
        assert_eq!(
            render(&[decision], &[cost]),
            "demo: 3 instance(s) (2 reporting), panic; concurrency 12.0 now, 4.5 over 60s; needs 3\n\
             tenant acme: 0.42 USD so far this period\n"
        );
        assert_eq!(
            render(&[], &[]),
            "services: none yet (send traffic to the entry port)\ntenants: no usage billed yet\n"
        );
    }
}
