//! Request traces: when each request arrives and how long it needs an
//! instance for.
//!
//! Two formats, told apart by the first line:
//!
//! - **CSV** `arrival_seconds,service_seconds`: arrival relative to the start
//!   of the trace, both floats; the header line is optional.
//! - **Azure LLM inference trace** (`TIMESTAMP,ContextTokens,GeneratedTokens`,
//!   timestamps `YYYY-MM-DD HH:MM:SS.fffffff`): arrivals are made relative to
//!   the first row, and the service time is
//!   `base_service_time + seconds_per_token × GeneratedTokens`.
//!
//! Times are whole microseconds from here on. Requests come out sorted by
//! arrival (stable, so rows with equal arrivals keep their order).

use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDateTime;

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Arrival, µs from the start of the trace.
    pub arrival_micros: i64,
    /// How long an instance works on it once it starts, µs.
    pub service_micros: i64,
}

/// The requests of a trace, sorted by arrival.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    pub requests: Vec<Request>,
    /// Which format the file was read as.
    pub format: Format,
}

/// The trace formats understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `arrival_seconds,service_seconds`.
    #[default]
    Csv,
    /// `TIMESTAMP,ContextTokens,GeneratedTokens`.
    AzureLlm,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Csv => "csv (arrival_seconds,service_seconds)",
            Format::AzureLlm => "azure-llm (TIMESTAMP,ContextTokens,GeneratedTokens)",
        })
    }
}

/// How the Azure trace's token counts turn into service times.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenModel {
    /// Seconds of service per generated token.
    pub seconds_per_token: f64,
    /// Seconds of service every request takes on top of its tokens.
    pub base_service_seconds: f64,
}

impl Default for TokenModel {
    fn default() -> Self {
        TokenModel {
            seconds_per_token: 0.02,
            base_service_seconds: 0.0,
        }
    }
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace file {shown} not found (looked at {looked_at})")]
    NotFound { shown: String, looked_at: PathBuf },
    #[error("cannot read trace file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("trace {path}: line {line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("trace {path}: {reason}")]
    Whole { path: PathBuf, reason: String },
}

impl Trace {
    /// Reads and parses the trace file at `path`.
    pub fn read(path: &Path, tokens: TokenModel) -> Result<Trace, TraceError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                let looked_at = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
                TraceError::NotFound {
                    shown: path.display().to_string(),
                    looked_at,
                }
            } else {
                TraceError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Trace::parse(path, &text, tokens)
    }

    /// Parses `text` (the contents of `path`, named in errors).
    pub fn parse(path: &Path, text: &str, tokens: TokenModel) -> Result<Trace, TraceError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty());
        let Some((first_no, first)) = lines.next() else {
            return Err(TraceError::Whole {
                path: path.to_path_buf(),
                reason: "empty: no header and no requests".into(),
            });
        };
        let line_error = |line: usize, reason: String| TraceError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let header: Vec<String> = first.split(',').map(|c| c.trim().to_ascii_lowercase()).collect();
        let mut requests = Vec::new();
        let format = if header.len() == 3 && header[0] == "timestamp" && header[2] == "generatedtokens" {
            check_token_model(path, tokens)?;
            let mut start = None;
            for (no, line) in lines {
                let (at, generated) = parse_azure(line).map_err(|r| line_error(no, r))?;
                let start = *start.get_or_insert(at);
                let arrival = (at - start).num_microseconds().unwrap_or(i64::MAX);
                let service = tokens.base_service_seconds + tokens.seconds_per_token * generated as f64;
                requests.push(Request {
                    arrival_micros: arrival,
                    service_micros: seconds_to_micros(service).map_err(|r| line_error(no, r))?,
                });
            }
            // Rows before the first one (the trace is sorted, but a cut may not be)
            // would have negative arrivals: shift so that the earliest is 0.
            let earliest = requests.iter().map(|r| r.arrival_micros).min().unwrap_or(0);
            for r in &mut requests {
                r.arrival_micros -= earliest;
            }
            Format::AzureLlm
        } else if header.len() == 2 && header[0] == "arrival_seconds" && header[1] == "service_seconds" {
            for (no, line) in lines {
                requests.push(parse_csv(line).map_err(|r| line_error(no, r))?);
            }
            Format::Csv
        } else if header.len() == 2 {
            // No header: the first line is a request.
            for (no, line) in std::iter::once((first_no, first)).chain(lines) {
                requests.push(parse_csv(line).map_err(|r| line_error(no, r))?);
            }
            Format::Csv
        } else {
            return Err(line_error(
                first_no,
                format!(
                    "unknown trace format: expected a header `arrival_seconds,service_seconds` (or no header and \
                     two numbers a line), or `TIMESTAMP,ContextTokens,GeneratedTokens`; found `{first}`"
                ),
            ));
        };
        if requests.is_empty() {
            return Err(TraceError::Whole {
                path: path.to_path_buf(),
                reason: "no requests".into(),
            });
        }
        requests.sort_by_key(|r| r.arrival_micros);
        Ok(Trace { requests, format })
    }

    /// Divides every arrival time (and so every gap between arrivals) by
    /// `factor`; service times stay as they are.
    pub fn compress(&mut self, factor: f64) {
        for r in &mut self.requests {
            r.arrival_micros = (r.arrival_micros as f64 / factor).round() as i64;
        }
    }

    /// Arrival of the last request, µs.
    pub fn span_micros(&self) -> i64 {
        self.requests.last().map_or(0, |r| r.arrival_micros)
    }
}

fn check_token_model(path: &Path, tokens: TokenModel) -> Result<(), TraceError> {
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    if ok(tokens.seconds_per_token) && ok(tokens.base_service_seconds) {
        Ok(())
    } else {
        Err(TraceError::Whole {
            path: path.to_path_buf(),
            reason: "--seconds-per-token and --base-service-time must be finite and >= 0".into(),
        })
    }
}

fn parse_csv(line: &str) -> Result<Request, String> {
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    let [arrival, service] = cols[..] else {
        return Err(format!(
            "expected 2 columns `arrival_seconds,service_seconds`, found {}: `{line}`",
            cols.len()
        ));
    };
    let number = |name: &str, text: &str| -> Result<f64, String> {
        let v: f64 = text.parse().map_err(|_| format!("{name} `{text}` is not a number"))?;
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(format!("{name} `{text}` must be finite and >= 0"))
        }
    };
    Ok(Request {
        arrival_micros: seconds_to_micros(number("arrival_seconds", arrival)?)?,
        service_micros: seconds_to_micros(number("service_seconds", service)?)?,
    })
}

fn parse_azure(line: &str) -> Result<(NaiveDateTime, u64), String> {
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    let [timestamp, _context, generated] = cols[..] else {
        return Err(format!(
            "expected 3 columns `TIMESTAMP,ContextTokens,GeneratedTokens`, found {}: `{line}`",
            cols.len()
        ));
    };
    let at = NaiveDateTime::parse_from_str(timestamp, "%Y-%m-%d %H:%M:%S%.f")
        .map_err(|e| format!("TIMESTAMP `{timestamp}` is not `YYYY-MM-DD HH:MM:SS.fffffff`: {e}"))?;
    let generated: u64 = generated
        .parse()
        .map_err(|_| format!("GeneratedTokens `{generated}` is not a whole number >= 0"))?;
    Ok((at, generated))
}

fn seconds_to_micros(seconds: f64) -> Result<i64, String> {
    let micros = (seconds * 1e6).round();
    // A century is far beyond any trace; it keeps sums of times far from overflow.
    if micros.is_finite() && (0.0..=3.2e15).contains(&micros) {
        Ok(micros as i64)
    } else {
        Err(format!("time {seconds} s is out of range (0 to 100 years)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Trace, TraceError> {
        Trace::parse(Path::new("t.csv"), text, TokenModel::default())
    }

    #[test]
    fn csv_with_and_without_header() {
        let with = parse("arrival_seconds,service_seconds\n0,1.5\n0.25, 0.000001\n").expect("parses");
        let without = parse("0,1.5\n0.25,0.000001\n").expect("parses");
        assert_eq!(with, without);
        assert_eq!(with.format, Format::Csv);
        assert_eq!(
            with.requests,
            vec![
                Request {
                    arrival_micros: 0,
                    service_micros: 1_500_000
                },
                Request {
                    arrival_micros: 250_000,
                    service_micros: 1
                },
            ]
        );
    }

    #[test]
    fn csv_is_sorted_by_arrival() {
        let t = parse("2,1\n1,2\n").expect("parses");
        assert_eq!(t.requests[0].arrival_micros, 1_000_000);
        assert_eq!(t.requests[1].arrival_micros, 2_000_000);
    }

    #[test]
    fn bad_csv_line_names_its_line_number() {
        let err = parse("arrival_seconds,service_seconds\n0,1\n\n1,x\n").expect_err("bad line");
        let text = err.to_string();
        assert!(text.contains("line 4"), "{text}");
        assert!(text.contains("service_seconds `x`"), "{text}");
        let err = parse("0,1\n1,2,3\n").expect_err("three columns");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = parse("0,1\n-1,2\n").expect_err("negative");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn azure_format_by_header() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 18:15:46.6805900,374,44\n\
                    2023-11-16 18:15:50.9951690,396,109\n\
                    2023-11-16 18:16:00.0000000,1,0\n";
        let model = TokenModel {
            seconds_per_token: 0.01,
            base_service_seconds: 0.5,
        };
        let t = Trace::parse(Path::new("conv.csv"), text, model).expect("parses");
        assert_eq!(t.format, Format::AzureLlm);
        assert_eq!(
            t.requests,
            vec![
                Request {
                    arrival_micros: 0,
                    service_micros: 940_000
                },
                Request {
                    arrival_micros: 4_314_579,
                    service_micros: 1_590_000
                },
                Request {
                    arrival_micros: 13_319_410,
                    service_micros: 500_000
                },
            ]
        );
    }

    #[test]
    fn bad_azure_line_names_its_line_number() {
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 18:15:46.6805900,374,44\n\
                    2023-11-16 18:15:50,396,many\n";
        let err = parse(text).expect_err("bad tokens");
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(err.to_string().contains("GeneratedTokens `many`"), "{err}");
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n16/11/2023 18:15,374,44\n";
        let err = parse(text).expect_err("bad timestamp");
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_header_and_empty_are_errors() {
        assert!(parse("a,b,c,d\n").expect_err("unknown").to_string().contains("line 1"));
        assert!(parse("\n\n").is_err());
        assert!(parse("arrival_seconds,service_seconds\n").is_err());
    }

    #[test]
    fn compress_divides_gaps_not_service_times() {
        let mut t = parse("0,3\n10,3\n30,1\n").expect("parses");
        t.compress(20.0);
        let arrivals: Vec<i64> = t.requests.iter().map(|r| r.arrival_micros).collect();
        let services: Vec<i64> = t.requests.iter().map(|r| r.service_micros).collect();
        assert_eq!(arrivals, vec![0, 500_000, 1_500_000]);
        assert_eq!(services, vec![3_000_000, 3_000_000, 1_000_000]);
    }

    #[test]
    fn missing_file_says_where_it_looked() {
        let err = Trace::read(Path::new("no/such/trace.csv"), TokenModel::default()).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("not found"), "{text}");
        let cwd = std::env::current_dir().expect("cwd");
        assert!(
            text.contains(&cwd.join("no/such/trace.csv").display().to_string()),
            "{text}"
        );
    }
}
