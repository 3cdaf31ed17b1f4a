//! Samples the app's CPU time and memory, from its cgroup (v2) or its
//! process.
//!
//! - cgroup v2 directory: `cpu.stat` (`usage_usec`) and `memory.current`;
//! - process id: `/proc/<pid>/schedstat` (CPU time in ns, first field) and
//!   `/proc/<pid>/status` (`VmRSS`).

use std::io;
use std::path::PathBuf;

/// Where the app's resources are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Cgroup(PathBuf),
    Process(u32),
}

/// One reading: cumulative CPU time and current memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub cpu_micros: u64,
    pub memory_bytes: u64,
}

/// What the app used between two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub cpu_micros: u64,
    /// Memory at the end of the interval.
    pub memory_bytes: u64,
    /// Mean of the memory at both ends times the interval.
    pub memory_byte_micros: u64,
}

pub fn read(source: &Source) -> io::Result<Reading> {
    match source {
        Source::Cgroup(dir) => Ok(Reading {
            cpu_micros: cgroup_cpu_micros(&std::fs::read_to_string(dir.join("cpu.stat"))?)?,
            memory_bytes: number(&std::fs::read_to_string(dir.join("memory.current"))?)?,
        }),
        Source::Process(pid) => Ok(Reading {
            cpu_micros: schedstat_micros(&std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?)?,
            memory_bytes: status_rss_bytes(&std::fs::read_to_string(format!("/proc/{pid}/status"))?)?,
        }),
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

fn number(text: &str) -> io::Result<u64> {
    text.trim().parse().map_err(|_| invalid("a number"))
}

/// `usage_usec` from a cgroup v2 `cpu.stat`.
pub fn cgroup_cpu_micros(cpu_stat: &str) -> io::Result<u64> {
    cpu_stat
        .lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .ok_or_else(|| invalid("usage_usec in cpu.stat"))
        .and_then(number)
}

/// CPU time from `/proc/<pid>/schedstat` (nanoseconds, first field).
pub fn schedstat_micros(schedstat: &str) -> io::Result<u64> {
    let ns = schedstat
        .split_whitespace()
        .next()
        .ok_or_else(|| invalid("schedstat"))
        .and_then(number)?;
    Ok(ns / 1000)
}

/// Resident memory from `/proc/<pid>/status` (`VmRSS: N kB`).
pub fn status_rss_bytes(status: &str) -> io::Result<u64> {
    let kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .ok_or_else(|| invalid("VmRSS in status"))
        .and_then(number)?;
    Ok(kb * 1024)
}

/// Usage between two readings `window_micros` apart. A counter that went
/// backwards (the app restarted) counts from zero.
pub fn between(before: Reading, after: Reading, window_micros: u64) -> Usage {
    let cpu_micros = after
        .cpu_micros
        .checked_sub(before.cpu_micros)
        .unwrap_or(after.cpu_micros);
    let mean_memory = (u128::from(before.memory_bytes) + u128::from(after.memory_bytes)) / 2;
    Usage {
        cpu_micros,
        memory_bytes: after.memory_bytes,
        memory_byte_micros: u64::try_from(mean_memory * u128::from(window_micros)).unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_files() {
        let cpu_stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n";
        assert_eq!(cgroup_cpu_micros(cpu_stat).unwrap(), 123_456);
        assert!(cgroup_cpu_micros("user_usec 1\n").is_err());
        assert_eq!(number("52428800\n").unwrap(), 52_428_800);
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(schedstat_micros("2500000 1000 7\n").unwrap(), 2500);
        let status = "Name:\tapp\nVmPeak:\t  9000 kB\nVmRSS:\t    1024 kB\nThreads:\t4\n";
        assert_eq!(status_rss_bytes(status).unwrap(), 1024 * 1024);
        assert!(status_rss_bytes("Name:\tapp\n").is_err());
    }

    #[test]
    fn reads_this_process() {
        let reading = read(&Source::Process(std::process::id())).unwrap();
        assert!(reading.memory_bytes > 0);
    }

    #[test]
    fn usage_between_readings() {
        let a = Reading {
            cpu_micros: 1_000,
            memory_bytes: 100,
        };
        let b = Reading {
            cpu_micros: 1_600,
            memory_bytes: 300,
        };
        let u = between(a, b, 1_000_000);
        assert_eq!(
            (u.cpu_micros, u.memory_bytes, u.memory_byte_micros),
            (600, 300, 200_000_000)
        );
        let restarted = between(b, a, 10);
        assert_eq!(restarted.cpu_micros, 1_000);
    }
}
