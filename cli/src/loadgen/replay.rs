//! When each request of a trace replay is due, and which tenant sends it.
//!
//! The trace is read by [`crate::trace`], the reader `tidemark simulate`
//! uses, so the same files replay as real requests and as simulated ones.
//! Request `i` is due at its arrival from the start of the trace, divided
//! by the speed (as `simulate --compress` divides it), in whole
//! microseconds; service times are the app's business and are ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::trace::{Format, TokenModel, Trace, TraceError};

/// A trace to replay: its send times, as offsets from the start of the run,
/// and the tenant of each request.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// The trace file, as given.
    pub path: PathBuf,
    /// Which format it was read as.
    pub format: Format,
    /// How many times faster than the trace it is replayed.
    pub speed: f64,
    /// Sorted.
    offsets: Vec<Duration>,
    /// Index into `tenant_names`, per request.
    tenants: Vec<Option<u32>>,
    tenant_names: Vec<String>,
}

impl Replay {
    /// Reads the trace at `path`, to be replayed `speed` times faster.
    pub fn read(path: &Path, speed: f64) -> Result<Replay, TraceError> {
        let trace = Trace::read(path, TokenModel::default())?;
        Ok(Replay::new(path, trace, speed))
    }

    /// `trace` (read from `path`), `speed` times faster; `speed` is a
    /// number above 0 ([`parse_speed`]), anything else counts as 1.
    pub fn new(path: &Path, mut trace: Trace, speed: f64) -> Replay {
        let speed = if speed.is_finite() && speed > 0.0 { speed } else { 1.0 };
        trace.compress(speed);
        let offsets = trace
            .requests
            .iter()
            .map(|r| Duration::from_micros(u64::try_from(r.arrival_micros).unwrap_or(0)))
            .collect();
        Replay {
            path: path.to_path_buf(),
            format: trace.format,
            speed,
            offsets,
            tenants: trace.requests.iter().map(|r| r.tenant).collect(),
            tenant_names: trace.tenants,
        }
    }

    /// How many requests the trace holds.
    pub fn len(&self) -> u64 {
        u64::try_from(self.offsets.len()).unwrap_or(u64::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// When request `i` is due, from the start (past the end: the last one's time).
    pub fn offset(&self, i: u64) -> Duration {
        let i = usize::try_from(i).unwrap_or(usize::MAX);
        self.offsets
            .get(i)
            .or_else(|| self.offsets.last())
            .copied()
            .unwrap_or_default()
    }

    /// When the last request is due, from the start.
    pub fn span(&self) -> Duration {
        self.offsets.last().copied().unwrap_or_default()
    }

    /// How many requests are due strictly before `elapsed`.
    pub fn due_before(&self, elapsed: Duration) -> u64 {
        count(self.offsets.partition_point(|o| *o < elapsed))
    }

    /// How many requests are due at or before `elapsed`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        count(self.offsets.partition_point(|o| *o <= elapsed))
    }

    /// The tenant of request `i` (an index into [`Replay::tenant_names`]),
    /// if the trace names one.
    pub fn tenant(&self, i: u64) -> Option<u32> {
        let i = usize::try_from(i).ok()?;
        self.tenants.get(i).copied().flatten()
    }

    /// The tenants the trace names, by index.
    pub fn tenant_names(&self) -> &[String] {
        &self.tenant_names
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Parses a replay speed: a number above 0, optionally followed by `x`
/// (`20` or `20x`: twenty times faster than the trace).
pub fn parse_speed(text: &str) -> Result<f64, String> {
    let number = text.trim().strip_suffix('x').unwrap_or(text.trim());
    match number.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("speed `{text}` is not a number above 0 (e.g. 20 or 20x)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replay(text: &str, speed: f64) -> Replay {
        let path = Path::new("t.csv");
        let trace = Trace::parse(path, text, TokenModel::default()).expect("parses");
        Replay::new(path, trace, speed)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn requests_are_due_at_their_arrival_divided_by_the_speed() {
        let r = replay("0,1\n0.5,1\n0.5,9\n2,1\n", 1.0);
        assert_eq!(r.len(), 4);
        let offsets: Vec<Duration> = (0..4).map(|i| r.offset(i)).collect();
        assert_eq!(offsets, vec![ms(0), ms(500), ms(500), ms(2000)]);
        assert_eq!(r.span(), ms(2000));
        let fast = replay("0,1\n0.5,1\n0.5,9\n2,1\n", 4.0);
        let offsets: Vec<Duration> = (0..4).map(|i| fast.offset(i)).collect();
        assert_eq!(offsets, vec![ms(0), ms(125), ms(125), ms(500)]);
        assert_eq!(fast.speed, 4.0);
        // Past the end: the last time, never a panic.
        assert_eq!(fast.offset(99), ms(500));
    }

    #[test]
    fn counts_requests_due_before_and_by_a_time() {
        let r = replay("0,1\n0.5,1\n0.5,9\n2,1\n", 1.0);
        assert_eq!(r.due_before(Duration::ZERO), 0);
        assert_eq!(r.due_by(Duration::ZERO), 1);
        assert_eq!(r.due_before(ms(500)), 1);
        assert_eq!(r.due_by(ms(500)), 3);
        assert_eq!(r.due_by(ms(1999)), 3);
        assert_eq!(r.due_by(ms(2000)), 4);
        assert_eq!(r.due_before(ms(2001)), 4);
        assert_eq!(r.due_by(Duration::from_secs(3600)), 4);
    }

    #[test]
    fn azure_arrivals_start_at_zero() {
        let r = replay(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:46.5,374,44\n\
             2023-11-16 18:15:48.0,396,109\n",
            2.0,
        );
        assert_eq!(r.format, Format::AzureLlm);
        assert_eq!((r.offset(0), r.offset(1)), (ms(0), ms(750)));
        assert_eq!(r.tenant(0), None);
    }

    #[test]
    fn each_request_keeps_its_tenant_through_the_sort() {
        let r = replay(
            "arrival_seconds,service_seconds,tenant\n3,1,beta\n1,1,acme\n2,1,\n",
            1.0,
        );
        assert_eq!(r.tenant_names(), ["beta".to_owned(), "acme".to_owned()]);
        let names: Vec<Option<&str>> = (0..r.len())
            .map(|i| r.tenant(i).map(|t| r.tenant_names()[t as usize].as_str()))
            .collect();
        assert_eq!(names, vec![Some("acme"), None, Some("beta")]);
        assert_eq!(r.tenant(3), None);
    }

    #[test]
    fn speeds_parse_with_or_without_x() {
        assert_eq!(parse_speed("20"), Ok(20.0));
        assert_eq!(parse_speed("20x"), Ok(20.0));
        assert_eq!(parse_speed("0.5x"), Ok(0.5));
        for bad in ["0", "0x", "-2", "x", "fast", "inf", ""] {
            let err = parse_speed(bad).expect_err(bad);
            assert!(err.contains("not a number above 0"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let err = Replay::read(Path::new("no/such/trace.csv"), 1.0).expect_err("missing");
        assert!(
            err.to_string().contains("trace file no/such/trace.csv not found"),
            "{err}"
        );
    }
}
