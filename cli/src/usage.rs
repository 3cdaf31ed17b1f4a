//! `tidemark usage`: a tenant's usage from the billing HTTP API
//! (`GET /v1/usage`), as a table, CSV or JSON.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::billing_client::call;
use anyhow::{Context, bail};
use clap::Args;
use http::{Method, Uri};
use serde::Deserialize;

/// How long the whole request may take.

#[derive(Debug, Clone, Args)]
pub struct UsageArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Tenant whose usage to show (a tenant token may only ask for its own).
    #[arg(long, env = "TIDEMARK_TENANT")]
    pub tenant: String,

    /// Only this service's usage.
    #[arg(long, env = "TIDEMARK_SERVICE")]
    pub service: Option<String>,

    /// Only this meter (requests, errors, duration_us, billed_duration_us, bytes_in, bytes_out,
    /// cpu_us, memory_byte_us).
    #[arg(long, env = "TIDEMARK_METER")]
    pub meter: Option<String>,

    /// Start of the range, inclusive (RFC 3339, e.g. 2026-11-01T00:00:00Z).
    #[arg(long, env = "TIDEMARK_FROM")]
    pub from: Option<String>,

    /// End of the range, exclusive (RFC 3339).
    #[arg(long, env = "TIDEMARK_TO")]
    pub to: Option<String>,

    /// Window width: minute, hour, day or month (UTC); the API's default is minute.
    #[arg(long, env = "TIDEMARK_WINDOW")]
    pub window: Option<String>,

    /// Keep these apart: service (meters are always apart).
    #[arg(long, env = "TIDEMARK_GROUP_BY")]
    pub group_by: Option<String>,

    /// Base URL of the billing HTTP API.
    #[arg(long, env = "TIDEMARK_API", default_value = "http://127.0.0.1:7410")]
    pub api: String,

    /// Bearer token for the billing API (needed when it runs with --api-tokens).
    #[arg(long, env = "TIDEMARK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print the API's CSV instead of a table.
    #[arg(long, env = "TIDEMARK_CSV", conflicts_with = "json")]
    pub csv: bool,

    /// Print the API's JSON instead of a table.
    #[arg(long, env = "TIDEMARK_JSON")]
    pub json: bool,
}

/// The usage request's URL under `api`, parameters percent-encoded.
pub fn usage_url(args: &UsageArgs) -> anyhow::Result<Uri> {
    let api = args.api.trim_end_matches('/');
    if !api.starts_with("http://") {
        bail!("--api {api}: only http:// URLs are supported (put a TLS proxy's plain side here, or use a tunnel)");
    }
    let mut query = format!("tenant={}", encode(&args.tenant));
    let optional = [
        ("service", &args.service),
        ("meter", &args.meter),
        ("from", &args.from),
        ("to", &args.to),
        ("window", &args.window),
        ("group_by", &args.group_by),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            let _ = write!(query, "&{name}={}", encode(value));
        }
    }
    format!("{api}/v1/usage?{query}")
        .parse()
        .with_context(|| format!("--api {api}: not a valid URL"))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// `GET /v1/usage`'s JSON.
#[derive(Debug, Deserialize)]
pub struct UsageResponse {
    pub tenant: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub window: String,
    pub rows: Vec<UsageRow>,
    /// Integers for built-in meters, exact decimal strings for custom ones.
    pub totals: std::collections::BTreeMap<String, tidemark_billing::quantity::Quantity>,
}

#[derive(Debug, Deserialize)]
pub struct UsageRow {
    pub window_start: String,
    pub service: Option<String>,
    pub meter: String,
    pub quantity: tidemark_billing::quantity::Quantity,
    pub batches: i64,
}

/// The response as a readable table, with per-meter totals.
pub fn render_table(r: &UsageResponse) -> String {
    let mut out = format!("tenant {}, {} windows", r.tenant, r.window);
    if let Some(from) = &r.from {
        let _ = write!(out, ", from {from}");
    }
    if let Some(to) = &r.to {
        let _ = write!(out, ", before {to}");
    }
    out.push('\n');
    if r.rows.is_empty() {
        out.push_str("no usage\n");
        return out;
    }
    let by_service = r.rows.iter().any(|row| row.service.is_some());
    let mut table: Vec<[String; 5]> = vec![[
        "WINDOW START".into(),
        "SERVICE".into(),
        "METER".into(),
        "QUANTITY".into(),
        "BATCHES".into(),
    ]];
    for row in &r.rows {
        table.push([
            row.window_start.clone(),
            row.service.clone().unwrap_or_default(),
            row.meter.clone(),
            row.quantity.to_string(),
            row.batches.to_string(),
        ]);
    }
    for (meter, total) in &r.totals {
        table.push([
            "TOTAL".into(),
            String::new(),
            meter.clone(),
            total.to_string(),
            String::new(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| table.iter().map(|row| row[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in &table {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c == 1 && !by_service {
                continue;
            }
            if !line.is_empty() {
                line.push_str("  ");
            }
            // Numbers right-aligned, names left-aligned.
            if c >= 3 {
                let _ = write!(line, "{cell:>width$}", width = widths[c]);
            } else {
                let _ = write!(line, "{cell:<width$}", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Asks the API and prints the answer to stdout.
pub async fn run(args: UsageArgs) -> anyhow::Result<()> {
    let uri = usage_url(&args)?;
    let accept = if args.csv { "text/csv" } else { "application/json" };
    let body = call(Method::GET, &uri, accept, args.token.as_deref(), &args.api).await?;
    if args.csv {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let json: serde_json::Value = serde_json::from_slice(&body).context("the billing API answered with bad JSON")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    let response: UsageResponse =
        serde_json::from_value(json).context("the billing API answered JSON this CLI does not understand")?;
    print!("{}", render_table(&response));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing_client::describe_error;
    use clap::Parser;
    use http::StatusCode;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        usage: UsageArgs,
    }

    fn args(extra: &[&str]) -> UsageArgs {
        let mut argv = vec!["usage", "--tenant", "acme"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("valid").usage
    }

    #[test]
    fn urls_carry_the_given_parameters_encoded() {
        let url = usage_url(&args(&[
            "--from",
            "2026-11-26T04:00:00+01:00",
            "--window",
            "hour",
            "--group-by",
            "service",
            "--api",
            "http://billing:7410/",
        ]))
        .expect("url");
        assert_eq!(
            url.to_string(),
            "http://billing:7410/v1/usage?tenant=acme&from=2026-11-26T04%3A00%3A00%2B01%3A00&window=hour&group_by=service"
        );
        let err = usage_url(&args(&["--api", "https://billing"])).expect_err("https");
        assert!(err.to_string().contains("only http://"), "{err}");
        assert!(Cli::try_parse_from(["usage", "--tenant", "a", "--csv", "--json"]).is_err());
    }

    #[test]
    fn tables_align_and_total_per_meter() {
        let response: UsageResponse = serde_json::from_value(serde_json::json!({
            "tenant": "acme", "from": "2026-11-26T04:00:00Z", "to": null, "window": "hour",
            "rows": [
                {"window_start": "2026-11-26T04:00:00Z", "service": "checkout", "meter": "requests", "quantity": 7, "batches": 2},
                {"window_start": "2026-11-26T05:00:00Z", "service": "search", "meter": "requests", "quantity": 1234, "batches": 10},
            ],
            "totals": {"requests": 1241}
        }))
        .expect("valid");
        let want = "\
tenant acme, hour windows, from 2026-11-26T04:00:00Z
WINDOW START          SERVICE   METER     QUANTITY  BATCHES
2026-11-26T04:00:00Z  checkout  requests         7        2
2026-11-26T05:00:00Z  search    requests      1234       10
TOTAL                           requests      1241
";
        assert_eq!(render_table(&response), want);
    }

    #[test]
    fn errors_name_the_parameter() {
        let body = br#"{"error":"\"week\" is not one of minute, hour, day, month","parameter":"window"}"#;
        assert_eq!(
            describe_error(StatusCode::BAD_REQUEST, body),
            "billing API answered 400 Bad Request: \"week\" is not one of minute, hour, day, month (parameter window)"
        );
        assert_eq!(
            describe_error(StatusCode::UNAUTHORIZED, br#"{"error":"unknown token"}"#),
            "billing API answered 401 Unauthorized: unknown token"
        );
    }
}
