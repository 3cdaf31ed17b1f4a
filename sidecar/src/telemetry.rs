//! The sidecar's Prometheus metrics, registered once at start. Labels are
//! bounded: none carries a tenant.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tidemark_runtime::metrics::LatencyHistogram;

#[derive(Debug, Default)]
pub struct Telemetry {
    pub requests: Counter,
    pub upstream_errors: Counter,
    pub breaker_rejections: Counter,
    pub invalid_tenants: Counter,
    pub tenants_overflowed: Counter,
    pub custom_usage_rejects: Counter,
    pub request_duration: LatencyHistogram,
    pub batches_sent: Counter,
    pub batches_acked: Counter,
    pub batches_rejected: Counter,
    pub batches_dropped: Counter,
    pub batches_unspooled: Counter,
    pub pending_batches: Gauge,
    pub spool_bytes: Gauge,
}

impl Telemetry {
    pub fn register(registry: &mut Registry) -> Telemetry {
        let t = Telemetry::default();
        let r = registry.sub_registry_with_prefix("tidemark_sidecar");
        r.register("requests", "Requests forwarded and finished", t.requests.clone());
        r.register(
            "upstream_errors",
            "Requests the upstream did not answer in time (answered 502 or 504)",
            t.upstream_errors.clone(),
        );
        r.register(
            "breaker_rejections",
            "Requests refused with 503 because the concurrency limit and its queue were full",
            t.breaker_rejections.clone(),
        );
        r.register(
            "invalid_tenants",
            "Requests whose tenant name was refused (billed to anonymous)",
            t.invalid_tenants.clone(),
        );
        r.register(
            "tenants_overflowed",
            "Requests folded into the _overflow tenant because a window had too many tenants",
            t.tenants_overflowed.clone(),
        );
        r.register(
            "custom_usage_rejects",
            "Custom usage items from the app that could not be parsed",
            t.custom_usage_rejects.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from forwarding a request to the end of its response",
            Unit::Seconds,
            t.request_duration.clone(),
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
            "batches_unspooled",
            "Usage batches kept in memory only because the spool was full or failed",
            t.batches_unspooled.clone(),
        );
        r.register(
            "pending_batches",
            "Usage batches waiting for an acknowledgement",
            t.pending_batches.clone(),
        );
        r.register_with_unit("spool", "Size of the on-disk spool", Unit::Bytes, t.spool_bytes.clone());
        t
    }

    pub fn observe_request(&self, duration_micros: u64) {
        self.requests.inc();
        self.request_duration.observe_micros(duration_micros);
    }
}
