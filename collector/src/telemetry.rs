//! The collector's Prometheus metrics, registered once at start.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Default)]
pub struct Telemetry {
    pub batches_accepted: Counter,
    pub batches_rejected: Counter,
    pub append_errors: Counter,
    pub streams: Gauge,
}

impl Telemetry {
    pub fn register(registry: &mut Registry) -> Telemetry {
        let t = Telemetry::default();
        let r = registry.sub_registry_with_prefix("tidemark_collector");
        r.register(
            "batches_accepted",
            "Usage batches appended to the log and acked",
            t.batches_accepted.clone(),
        );
        r.register(
            "batches_rejected",
            "Usage batches refused as invalid",
            t.batches_rejected.clone(),
        );
        r.register(
            "append_errors",
            "Appends to the usage log that failed",
            t.append_errors.clone(),
        );
        r.register("ingest_streams", "Open sidecar ingest streams", t.streams.clone());
        t
    }
}
