//! `tidemark invoice`: invoices from the billing HTTP API, as tables or
//! JSON: `list`, `show ID`, `finalize ID` (see docs/invoices.md).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::billing_client::call as billing_call;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use http::{Method, Uri};
use serde_json::Value;

/// How long the whole request may take.

#[derive(Debug, Clone, Args)]
pub struct InvoiceArgs {
    #[command(subcommand)]
    pub command: InvoiceCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum InvoiceCommand {
    /// List invoices: finalized ones and the drafts of the current and previous month (or of --period).
    List(ListArgs),
    /// Show one invoice with its lines (a draft as of now, or as finalized).
    Show(IdArgs),
    /// Finalize an invoice (admin): from then on it never changes.
    Finalize(IdArgs),
}

/// Where the billing API is, and how to print.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Base URL of the billing HTTP API.
    #[arg(long, env = "TIDEMARK_API", default_value = "http://127.0.0.1:7410")]
    pub api: String,

    /// Bearer token for the billing API (needed when it runs with --api-tokens).
    #[arg(long, env = "TIDEMARK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Print the API's JSON instead of a table.
    #[arg(long, env = "TIDEMARK_JSON")]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only this tenant's invoices (a tenant token lists its own anyway).
    #[arg(long, env = "TIDEMARK_TENANT")]
    pub tenant: Option<String>,

    /// Only drafts or only finalized invoices.
    #[arg(long, env = "TIDEMARK_STATUS")]
    pub status: Option<String>,

    /// Only this month, YYYY-MM (in billing's time zone).
    #[arg(long, env = "TIDEMARK_PERIOD")]
    pub period: Option<String>,

    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Clone, Args)]
pub struct IdArgs {
    /// The invoice's id, inv_<tenant>_<YYYY-MM>.
    pub id: String,

    #[command(flatten)]
    pub client: ClientArgs,
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

/// `path_and_query` under `--api`.
fn url(client: &ClientArgs, path_and_query: &str) -> anyhow::Result<Uri> {
    let api = client.api.trim_end_matches('/');
    if !api.starts_with("http://") {
        bail!("--api {api}: only http:// URLs are supported (put a TLS proxy's plain side here, or use a tunnel)");
    }
    format!("{api}{path_and_query}")
        .parse()
        .with_context(|| format!("--api {api}: not a valid URL"))
}

/// The list request's path and query, parameters encoded.
pub fn list_path(args: &ListArgs) -> String {
    let params: Vec<String> = [
        ("tenant", &args.tenant),
        ("status", &args.status),
        ("period", &args.period),
    ]
    .into_iter()
    .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={}", encode(v))))
    .collect();
    if params.is_empty() {
        "/v1/invoices".to_owned()
    } else {
        format!("/v1/invoices?{}", params.join("&"))
    }
}

/// The show (or, with `/finalize`, finalize) path of invoice `id`.
pub fn invoice_path(id: &str, suffix: &str) -> String {
    format!("/v1/invoices/{}{suffix}", encode(id))
}

async fn call(client: &ClientArgs, method: Method, path: &str) -> anyhow::Result<Value> {
    let uri = url(client, path)?;
    let body = billing_call(method, &uri, "application/json", client.token.as_deref(), &client.api).await?;
    serde_json::from_slice(&body).context("the billing API answered with bad JSON")
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows as aligned columns; columns in `right` are right-aligned.
fn columns(rows: &[Vec<String>], right: &[usize]) -> String {
    let width = |c: usize| {
        rows.iter()
            .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
            .max()
            .unwrap_or(0)
    };
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count).map(width).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            if right.contains(&c) {
                let _ = write!(line, "{cell:>w$}", w = widths[c]);
            } else {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `GET /v1/invoices`'s answer as a table.
pub fn render_list(json: &Value) -> String {
    let mut rows = vec![
        ["ID", "TENANT", "PERIOD", "STATUS", "PLAN", "TOTAL", "CURRENCY"]
            .map(String::from)
            .to_vec(),
    ];
    for invoice in json["invoices"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&invoice["id"]),
            text(&invoice["tenant"]),
            text(&invoice["period"]),
            text(&invoice["status"]),
            format!("{} v{}", text(&invoice["plan"]), text(&invoice["plan_version"])),
            text(&invoice["total"]),
            text(&invoice["currency"]),
        ]);
    }
    let mut out = if rows.len() == 1 {
        "no invoices\n".to_owned()
    } else {
        columns(&rows, &[5])
    };
    for error in json["errors"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "cannot draft {}: {}", text(&error["id"]), text(&error["error"]));
    }
    out
}

/// One invoice with its lines as a table.
pub fn render_invoice(json: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}  tenant {}  {} ({} to {}, {})",
        text(&json["id"]),
        text(&json["status"]).to_uppercase(),
        text(&json["tenant"]),
        text(&json["period"]),
        text(&json["period_start"]),
        text(&json["period_end"]),
        text(&json["time_zone"]),
    );
    let _ = writeln!(
        out,
        "plan {} v{}, {}",
        text(&json["plan"]),
        text(&json["plan_version"]),
        text(&json["currency"])
    );
    match json["status"].as_str() {
        Some("finalized") => {
            let _ = writeln!(out, "finalized at {}", text(&json["finalized_at"]));
        }
        _ => {
            let _ = writeln!(
                out,
                "draft as of {}; can be finalized from {}",
                text(&json["as_of"]),
                text(&json["finalizable_at"])
            );
        }
    }
    out.push('\n');
    let mut rows = vec![
        [
            "#",
            "LINE",
            "USAGE",
            "QUANTITY",
            "FREE",
            "AMOUNT",
            "USAGE FROM",
            "USAGE TO",
            "BATCHES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for line in json["lines"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&line["line_no"]),
            text(&line["description"]),
            text(&line["usage"]),
            text(&line["quantity"]),
            text(&line["allowance"]),
            text(&line["amount"]),
            text(&line["usage_from"]),
            text(&line["usage_to"]),
            text(&line["batches"]),
        ]);
    }
    let currency = text(&json["currency"]);
    rows.push(vec![
        String::new(),
        "Subtotal".into(),
        String::new(),
        String::new(),
        String::new(),
        text(&json["subtotal"]),
    ]);
    rows.push(vec![
        String::new(),
        format!("Total ({currency})"),
        String::new(),
        String::new(),
        String::new(),
        text(&json["total"]),
    ]);
    out.push_str(&columns(&rows, &[0, 2, 3, 4, 5, 8]));
    out
}

/// Asks the API and prints the answer to stdout.
pub async fn run(args: InvoiceArgs) -> anyhow::Result<()> {
    let (client, json, table): (&ClientArgs, Value, fn(&Value) -> String) = match &args.command {
        InvoiceCommand::List(list) => (
            &list.client,
            call(&list.client, Method::GET, &list_path(list)).await?,
            render_list,
        ),
        InvoiceCommand::Show(show) => (
            &show.client,
            call(&show.client, Method::GET, &invoice_path(&show.id, "")).await?,
            render_invoice,
        ),
        InvoiceCommand::Finalize(finalize) => (
            &finalize.client,
            call(&finalize.client, Method::POST, &invoice_path(&finalize.id, "/finalize")).await?,
            render_invoice,
        ),
    };
    if client.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", table(&json));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing_client::describe_error;
    use clap::Parser;
    use http::StatusCode;
    use serde_json::json;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: InvoiceCommand,
    }

    fn parse(args: &[&str]) -> InvoiceCommand {
        Cli::try_parse_from(std::iter::once("invoice").chain(args.iter().copied()))
            .expect("valid")
            .command
    }

    #[test]
    fn paths_carry_the_parameters_encoded() {
        let InvoiceCommand::List(list) = parse(&["list", "--tenant", "team/a b", "--period", "2026-11"]) else {
            panic!("list")
        };
        assert_eq!(list_path(&list), "/v1/invoices?tenant=team%2Fa%20b&period=2026-11");
        assert_eq!(list.client.api, "http://127.0.0.1:7410");
        let InvoiceCommand::List(list) = parse(&["list"]) else {
            panic!("list")
        };
        assert_eq!(list_path(&list), "/v1/invoices");
        let InvoiceCommand::Finalize(id) = parse(&["finalize", "inv_team/a_2026-11", "--json"]) else {
            panic!("finalize")
        };
        assert!(id.client.json);
        assert_eq!(
            invoice_path(&id.id, "/finalize"),
            "/v1/invoices/inv_team%2Fa_2026-11/finalize"
        );
        let bad = ClientArgs {
            config: None,
            api: "https://billing".into(),
            token: None,
            json: false,
        };
        assert!(url(&bad, "/v1/invoices").is_err());
    }

    #[test]
    fn invoices_render_as_tables() {
        let invoice = json!({
            "id": "inv_acme_2026-10", "tenant": "acme", "period": "2026-10", "status": "finalized",
            "period_start": "2026-10-01T00:00:00Z", "period_end": "2026-11-01T00:00:00Z", "time_zone": "UTC",
            "plan": "aws-lambda-x86", "plan_version": 1, "currency": "USD",
            "finalized_at": "2026-11-01T01:00:00Z",
            "lines": [
                {"line_no": 1, "description": "Requests", "usage": "3000000", "quantity": "3000000",
                 "allowance": "1000000", "amount": "0.40", "usage_from": "2026-10-03T10:00:00Z",
                 "usage_to": "2026-11-01T00:00:00Z", "batches": 4},
                {"line_no": 2, "description": "Requests: correction for 2026-09", "usage": "5", "quantity": "5",
                 "allowance": "0", "amount": "12.00", "usage_from": null, "usage_to": null, "batches": 1}
            ],
            "subtotal": "12.40", "total": "12.40"
        });
        let table = render_invoice(&invoice);
        assert!(
            table.starts_with("inv_acme_2026-10  FINALIZED  tenant acme  2026-10"),
            "{table}"
        );
        assert!(table.contains("finalized at 2026-11-01T01:00:00Z"), "{table}");
        let lines: Vec<&str> = table.lines().collect();
        let requests = lines.iter().find(|l| l.contains("Requests ")).expect("line");
        assert!(
            requests.contains(" 0.40  2026-10-03T10:00:00Z  2026-11-01T00:00:00Z        4"),
            "{table}"
        );
        let total = lines.last().expect("total");
        assert!(total.contains("Total (USD)") && total.ends_with("12.40"), "{table}");

        let list = json!({
            "invoices": [{"id": "inv_acme_2026-10", "tenant": "acme", "period": "2026-10", "status": "draft",
                          "plan": "aws-lambda-x86", "plan_version": 1, "total": "18.73", "currency": "USD"}],
            "errors": [{"id": "inv_globex_2026-10", "error": "no subscription"}]
        });
        let table = render_list(&list);
        assert!(table.starts_with("ID "), "{table}");
        assert!(
            table.contains("inv_acme_2026-10  acme    2026-10  draft   aws-lambda-x86 v1  18.73  USD"),
            "{table}"
        );
        assert!(
            table.contains("cannot draft inv_globex_2026-10: no subscription"),
            "{table}"
        );
        assert_eq!(render_list(&json!({"invoices": []})), "no invoices\n");
    }

    #[test]
    fn errors_name_status_and_parameter() {
        let message = describe_error(
            StatusCode::BAD_REQUEST,
            br#"{"error": "\"x\" is not a month such as 2026-11", "parameter": "period"}"#,
        );
        assert_eq!(
            message,
            "billing API answered 400 Bad Request: \"x\" is not a month such as 2026-11 (parameter period)"
        );
        let message = describe_error(
            StatusCode::CONFLICT,
            br#"{"error": "too early", "finalizable_at": "t"}"#,
        );
        assert_eq!(message, "billing API answered 409 Conflict: too early");
    }
}
