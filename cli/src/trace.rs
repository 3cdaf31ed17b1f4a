//! Request traces: when each request arrives, how long it needs an
//! instance for and, if the trace says, which tenant sends it. Read by
//! `tidemark simulate` (against simulated autoscalers) and by
//! `tidemark loadgen --trace` and `tidemark dev --load trace=` (replayed as
//! real HTTP requests), so the same files work for all three.
//!
//! Two formats, told apart by the first line:
//!
//! - **CSV** `arrival_seconds,service_seconds`: arrival relative to the start
//!   of the trace, both floats; the header line is optional. With the header
//!   `arrival_seconds,service_seconds,tenant`, a third column names each
//!   request's tenant (empty: no tenant, the replay's default).
//! - **Azure LLM inference trace** (`TIMESTAMP,ContextTokens,GeneratedTokens`,
//!   timestamps `YYYY-MM-DD HH:MM:SS.fffffff`): arrivals are made relative to
//!   the first row, and the service time is
//!   `base_service_time + seconds_per_token × GeneratedTokens`.
//!
//! Times are whole microseconds from here on. Requests come out sorted by
//! arrival (stable, so rows with equal arrivals keep their order).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDateTime;
use tidemark_sidecar::tenant::is_valid_tenant;

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Arrival, µs from the start of the trace.
    pub arrival_micros: i64,
    /// How long an instance works on it once it starts, µs.
    pub service_micros: i64,
    /// Who sends it: an index into [`Trace::tenants`]; `None` when the
    /// trace has no tenant column or the row leaves it empty.
    pub tenant: Option<u32>,
}

/// The requests of a trace, sorted by arrival.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    pub requests: Vec<Request>,
    /// Which format the file was read as.
    pub format: Format,
    /// The tenants the requests name, each once, in order of first appearance.
    pub tenants: Vec<String>,
}

/// The trace formats understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `arrival_seconds,service_seconds`.
    #[default]
    Csv,
    /// `arrival_seconds,service_seconds,tenant`.
    CsvWithTenant,
    /// `TIMESTAMP,ContextTokens,GeneratedTokens`.
    AzureLlm,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Csv => "csv (arrival_seconds,service_seconds)",
            Format::CsvWithTenant => "csv (arrival_seconds,service_seconds,tenant)",
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
        let mut tenants = Tenants::default();
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
                    tenant: None,
                });
            }
            // Rows before the first one (the trace is sorted, but a cut may not be)
            // would have negative arrivals: shift so that the earliest is 0.
            let earliest = requests.iter().map(|r| r.arrival_micros).min().unwrap_or(0);
            for r in &mut requests {
                r.arrival_micros -= earliest;
            }
            Format::AzureLlm
        } else if header.len() >= 2 && header[0] == "arrival_seconds" && header[1] == "service_seconds" {
            let format = match header.get(2..) {
                Some([]) => Format::Csv,
                Some([tenant]) if tenant == "tenant" => Format::CsvWithTenant,
                _ => {
                    return Err(line_error(
                        first_no,
                        format!(
                            "unknown columns: expected `arrival_seconds,service_seconds` or \
                             `arrival_seconds,service_seconds,tenant`; found `{first}`"
                        ),
                    ));
                }
            };
            for (no, line) in lines {
                let request = parse_csv(line, format, &mut tenants).map_err(|r| line_error(no, r))?;
                requests.push(request);
            }
            format
        } else if header.len() == 2 {
            // No header: the first line is a request.
            for (no, line) in std::iter::once((first_no, first)).chain(lines) {
                requests.push(parse_csv(line, Format::Csv, &mut tenants).map_err(|r| line_error(no, r))?);
            }
            Format::Csv
        } else {
            return Err(line_error(
                first_no,
                format!(
                    "unknown trace format: expected a header `arrival_seconds,service_seconds` (or no header and \
                     two numbers a line), `arrival_seconds,service_seconds,tenant`, or \
                     `TIMESTAMP,ContextTokens,GeneratedTokens`; found `{first}`"
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
        Ok(Trace {
            requests,
            format,
            tenants: tenants.names,
        })
    }

    /// The name of `request`'s tenant, if the trace gives one.
    pub fn tenant(&self, request: &Request) -> Option<&str> {
        request
            .tenant
            .and_then(|i| self.tenants.get(usize::try_from(i).ok()?))
            .map(String::as_str)
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

/// The tenant names met so far, each with its index.
#[derive(Debug, Default)]
struct Tenants {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Tenants {
    /// The index of `name` (empty: none), checked against the sidecar's rules.
    fn intern(&mut self, name: &str) -> Result<Option<u32>, String> {
        if name.is_empty() {
            return Ok(None);
        }
        if let Some(i) = self.index.get(name) {
            return Ok(Some(*i));
        }
        if !is_valid_tenant(name) {
            return Err(format!(
                "tenant `{name}` is not a tenant name: 1 to 128 of A-Z a-z 0-9 . _ - : @ / and not starting with _"
            ));
        }
        let i = u32::try_from(self.names.len()).map_err(|_| "more than 4 billion tenants".to_owned())?;
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), i);
        Ok(Some(i))
    }
}

fn parse_csv(line: &str, format: Format, tenants: &mut Tenants) -> Result<Request, String> {
    let cols: Vec<&str> = line.split(',').map(str::trim).collect();
    let (arrival, service, tenant) = match (format, &cols[..]) {
        (Format::CsvWithTenant, [arrival, service, tenant]) => (*arrival, *service, tenants.intern(tenant)?),
        (Format::CsvWithTenant, _) => {
            return Err(format!(
                "expected 3 columns `arrival_seconds,service_seconds,tenant`, found {}: `{line}`",
                cols.len()
            ));
        }
        (_, [arrival, service]) => (*arrival, *service, None),
        _ => {
            return Err(format!(
                "expected 2 columns `arrival_seconds,service_seconds`, found {}: `{line}`",
                cols.len()
            ));
        }
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
        tenant,
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
                    service_micros: 1_500_000,
                    tenant: None
                },
                Request {
                    arrival_micros: 250_000,
                    service_micros: 1,
                    tenant: None
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
                    service_micros: 940_000,
                    tenant: None
                },
                Request {
                    arrival_micros: 4_314_579,
                    service_micros: 1_590_000,
                    tenant: None
                },
                Request {
                    arrival_micros: 13_319_410,
                    service_micros: 500_000,
                    tenant: None
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
    fn csv_with_a_tenant_column_names_each_request_s_tenant() {
        let t = parse("arrival_seconds,service_seconds,tenant\n1,0.1,beta\n0,0.1,acme\n0.5,0.1,\n2,0.1,acme\n")
            .expect("parses");
        assert_eq!(t.format, Format::CsvWithTenant);
        // In order of first appearance in the file, before sorting.
        assert_eq!(t.tenants, vec!["beta".to_owned(), "acme".to_owned()]);
        let named: Vec<(i64, Option<&str>)> = t.requests.iter().map(|r| (r.arrival_micros, t.tenant(r))).collect();
        assert_eq!(
            named,
            vec![
                (0, Some("acme")),
                (500_000, None),
                (1_000_000, Some("beta")),
                (2_000_000, Some("acme"))
            ]
        );
        // Without the column, no request has a tenant.
        let plain = parse("0,1\n").expect("parses");
        assert!(plain.tenants.is_empty());
        assert_eq!(plain.tenant(&plain.requests[0]), None);
    }

    #[test]
    fn bad_tenant_column_names_file_line_and_reason() {
        let err = parse("arrival_seconds,service_seconds,tenant\n0,1,acme\n1,1,bad tenant\n").expect_err("bad name");
        let text = err.to_string();
        assert!(text.starts_with("trace t.csv: line 3: "), "{text}");
        assert!(text.contains("tenant `bad tenant` is not a tenant name"), "{text}");
        let err = parse("arrival_seconds,service_seconds,tenant\n0,1,_idle\n").expect_err("reserved");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = parse("arrival_seconds,service_seconds,tenant\n0,1\n").expect_err("missing column");
        assert!(err.to_string().contains("line 2: expected 3 columns"), "{err}");
        let err = parse("arrival_seconds,service_seconds,customer\n0,1,acme\n").expect_err("unknown column");
        assert!(err.to_string().contains("line 1: unknown columns"), "{err}");
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
