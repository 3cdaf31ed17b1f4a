//! The meters a sidecar measures for each tenant.

use crate::TenantUsage;

/// A built-in meter. Custom meters from the app are named by the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Meter {
    Requests,
    Errors,
    DurationMicros,
    BilledDurationMicros,
    BytesIn,
    BytesOut,
    CpuMicros,
    MemoryByteMicros,
}

impl Meter {
    pub const ALL: [Meter; 8] = [
        Meter::Requests,
        Meter::Errors,
        Meter::DurationMicros,
        Meter::BilledDurationMicros,
        Meter::BytesIn,
        Meter::BytesOut,
        Meter::CpuMicros,
        Meter::MemoryByteMicros,
    ];

    /// The name users see in queries and invoices.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Requests => "requests",
            Meter::Errors => "errors",
            Meter::DurationMicros => "duration_us",
            Meter::BilledDurationMicros => "billed_duration_us",
            Meter::BytesIn => "bytes_in",
            Meter::BytesOut => "bytes_out",
            Meter::CpuMicros => "cpu_us",
            Meter::MemoryByteMicros => "memory_byte_us",
        }
    }

    pub fn parse(name: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// This meter's quantity in one tenant's usage.
    pub fn quantity(self, usage: &TenantUsage) -> u64 {
        match self {
            Meter::Requests => usage.requests,
            Meter::Errors => usage.errors,
            Meter::DurationMicros => usage.duration_micros,
            Meter::BilledDurationMicros => usage.billed_duration_micros,
            Meter::BytesIn => usage.bytes_in,
            Meter::BytesOut => usage.bytes_out,
            Meter::CpuMicros => usage.cpu_micros,
            Meter::MemoryByteMicros => usage.memory_byte_micros,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for meter in Meter::ALL {
            assert_eq!(Meter::parse(meter.as_str()), Some(meter));
        }
        assert_eq!(Meter::parse("tokens"), None);
    }

    #[test]
    fn quantity_reads_the_matching_field() {
        let usage = TenantUsage {
            requests: 1,
            errors: 2,
            duration_micros: 3,
            billed_duration_micros: 4,
            bytes_in: 5,
            bytes_out: 6,
            cpu_micros: 7,
            memory_byte_micros: 8,
            ..TenantUsage::default()
        };
        let got: Vec<u64> = Meter::ALL.iter().map(|m| m.quantity(&usage)).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
