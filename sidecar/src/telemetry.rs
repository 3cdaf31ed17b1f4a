//! The sidecar's Prometheus metrics, registered once at start.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct Telemetry {
    pub requests: Counter,
    pub upstream_errors: Counter,
    pub batches_sent: Counter,
    pub batches_acked: Counter,
    pub batches_rejected: Counter,
    pub batches_dropped: Counter,
    pub pending_batches: Gauge,
}

impl Telemetry {
    pub fn register(registry: &mut Registry) -> Telemetry {
        let t = Telemetry::default();
        let r = registry.sub_registry_with_prefix("tidemark_sidecar");
        r.register("requests", "Requests proxied", t.requests.clone());
        r.register(
            "upstream_errors",
            "Requests the upstream did not answer (answered 502)",
            t.upstream_errors.clone(),
        );
        r.register(
            "batches_sent",
            "Usage batches sent to the collector, resends included",
            t.batches_sent.clone(),
        );
        r.register(
            "batches_acked",
            "Usage batches the collector acknowledged",
            t.batches_acked.clone(),
        );
        r.register(
            "batches_rejected",
            "Usage batches the collector refused",
            t.batches_rejected.clone(),
        );
        r.register(
            "batches_dropped",
            "Usage batches dropped unsent because too many were pending (lost usage)",
            t.batches_dropped.clone(),
        );
        r.register(
            "pending_batches",
            "Usage batches waiting for an acknowledgement",
            t.pending_batches.clone(),
        );
        t
    }
}
