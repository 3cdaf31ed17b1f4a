//! Metric types the Prometheus client lacks.
//!
//! [`LatencyHistogram`] is a histogram of durations that takes no lock to
//! observe (three relaxed atomic adds), for request paths where the client's
//! own histogram, which locks on every observation, costs too much.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Bucket bounds for request latencies, in microseconds (100 µs to 10 s).
pub const REQUEST_BUCKETS_MICROS: [u64; 15] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// A histogram of durations observed in microseconds, exported in seconds.
/// Clones share the same counts.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bounds_micros: Box<[u64]>,
    /// One more than the bounds: the last counts what is above them all.
    counts: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// `bounds_micros` must be sorted ascending.
    pub fn new(bounds_micros: &[u64]) -> LatencyHistogram {
        LatencyHistogram(Arc::new(Inner {
            bounds_micros: bounds_micros.into(),
            counts: (0..=bounds_micros.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }))
    }

    pub fn observe_micros(&self, micros: u64) {
        let bucket = self.0.bounds_micros.partition_point(|&bound| bound < micros);
        self.0.counts[bucket].fetch_add(1, Relaxed);
        self.0.sum_micros.fetch_add(micros, Relaxed);
    }

    /// `(upper bound in seconds, count in that bucket alone)`, the last
    /// bound being +Inf.
    fn buckets(&self) -> Vec<(f64, u64)> {
        let bounds = self
            .0
            .bounds_micros
            .iter()
            .map(|&b| b as f64 / 1e6)
            .chain([f64::INFINITY]);
        bounds.zip(self.0.counts.iter().map(|c| c.load(Relaxed))).collect()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new(&REQUEST_BUCKETS_MICROS)
    }
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets = self.buckets();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.0.sum_micros.load(Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::{Registry, Unit};

    #[test]
    fn observations_land_in_their_bucket_and_encode_cumulatively() {
        let h = LatencyHistogram::new(&[1_000, 10_000]);
        for micros in [0, 1_000, 1_001, 10_000, 99_999_999] {
            h.observe_micros(micros);
        }
        assert_eq!(h.buckets(), vec![(0.001, 2), (0.01, 2), (f64::INFINITY, 1)]);
        let mut registry = Registry::default();
        registry.register_with_unit("latency", "test", Unit::Seconds, h.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("latency_seconds_count 5\n"), "{text}");
        assert!(text.contains("latency_seconds_sum 100.012"), "{text}");
        assert!(text.contains("latency_seconds_bucket{le=\"0.001\"} 2\n"), "{text}");
        assert!(text.contains("latency_seconds_bucket{le=\"0.01\"} 4\n"), "{text}");
        assert!(text.contains("latency_seconds_bucket{le=\"+Inf\"} 5\n"), "{text}");
        assert!(text.contains("# TYPE latency_seconds histogram"), "{text}");
    }
}
