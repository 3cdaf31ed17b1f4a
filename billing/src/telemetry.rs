//! Billing's Prometheus metrics, registered once at start.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct Telemetry {
    pub records: Counter,
    pub batches_counted: Counter,
    pub batches_duplicate: Counter,
    pub batches_recovered: Counter,
    pub batches_lost: Counter,
    pub records_undecodable: Counter,
    pub commits: Counter,
    pub commit_errors: Counter,
    pub late_batches: Counter,
    pub custom_usage_rejected: Counter,
}

impl Telemetry {
    pub fn register(registry: &mut Registry) -> Telemetry {
        let t = Telemetry::default();
        let r = registry.sub_registry_with_prefix("tidemark_billing");
        r.register("log_records", "Usage log records read", t.records.clone());
        r.register(
            "batches_counted",
            "Usage batches counted into rollups",
            t.batches_counted.clone(),
        );
        r.register(
            "batches_duplicate",
            "Usage batches dropped because their (session, seq) was already counted",
            t.batches_duplicate.clone(),
        );
        r.register(
            "batches_recovered",
            "Usage batches declared lost that turned up later and were counted",
            t.batches_recovered.clone(),
        );
        r.register(
            "batches_lost",
            "Usage batches declared lost: missing from a session past the grace period",
            t.batches_lost.clone(),
        );
        r.register(
            "records_undecodable",
            "Usage log records that are not a usage batch (skipped)",
            t.records_undecodable.clone(),
        );
        r.register("ledger_commits", "Ledger transactions committed", t.commits.clone());
        r.register(
            "ledger_commit_errors",
            "Ledger transactions that failed",
            t.commit_errors.clone(),
        );
        r.register(
            "late_batches",
            "Usage batches counted more than --late-after after their window ended (also kept in late_usage)",
            t.late_batches.clone(),
        );
        r.register(
            "custom_usage_rejected",
            "Custom usage values not counted: bad name, not a decimal, more than 9 decimal places, or too large",
            t.custom_usage_rejected.clone(),
        );
        t
    }
}
