//! Billing's query API behind bearer tokens, through the real `tidemark dev`:
//! usage sent through ingest, read back over HTTP (JSON, CSV), gRPC and
//! `tidemark usage`; a tenant token never sees another tenant, a bad query
//! gets 400 naming the parameter.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use hyper::StatusCode;
use tidemark_e2e::{bin, get, start_dev, usage_batch};
use tidemark_proto::v1::billing_client::BillingClient;
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{GetInvoiceRequest, ListInvoicesRequest, QueryUsageRequest, UsageBatch};

const ADMIN: &str = "admin-token-e2e-00001";
const ACME: &str = "acme-token-e2e-000001";

const TOKENS: &str = r#"
[[token]]
token = "admin-token-e2e-00001"
scope = "admin"

[[token]]
token = "acme-token-e2e-000001"
scope = "tenant:acme"
"#;

/// 2025-11-24T16:00:00Z, an hour boundary.
const T0: i64 = 1_764_000_000_000_000;
const HOUR: i64 = 3_600_000_000;

/// The two windows the usage falls in, as the HTTP API writes them.
fn window_label(unix_micros: i64) -> String {
    match unix_micros {
        T0 => "2025-11-24T16:00:00Z".into(),
        t if t == T0 + HOUR => "2025-11-24T17:00:00Z".into(),
        t => format!("unexpected window {t}"),
    }
}

async fn deliver(ingest: SocketAddr, batches: Vec<UsageBatch>) {
    let count = batches.len();
    let mut client = IngestClient::connect(format!("http://{ingest}")).await.unwrap();
    let mut replies = client.report(tokio_stream::iter(batches)).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(reply) = replies.message().await.unwrap() {
        assert!(matches!(reply.result, Some(Reply::Ack(_))), "{reply:?}");
        acked += 1;
    }
    assert_eq!(acked, count);
}

async fn get_as(url: &str, token: Option<&str>) -> (StatusCode, serde_json::Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
    let (status, body) = get(url, &headers).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {status}: not JSON ({e}): {body}"));
    (status, json)
}

/// The total of `requests` for `tenant`, read with the admin token.
async fn requests(api: SocketAddr, tenant: &str) -> i64 {
    let (status, json) = get_as(
        &format!("http://{api}/v1/usage?tenant={tenant}&meter=requests"),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    json["totals"]["requests"].as_i64().unwrap_or(0)
}

/// Runs `tidemark usage` with `args`; returns whether it succeeded, stdout and stderr.
fn tidemark_usage(args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(bin("tidemark"));
    command.arg("usage").args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("TIDEMARK_") {
            command.env_remove(key);
        }
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_tokens_read_only_their_tenant_over_http_grpc_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api-tokens.toml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let dev = start_dev(
        &dir.path().join("data"),
        &[
            &format!("--api-tokens={}", tokens.display()),
            // The batches are from November 2025.
            "--max-batch-age=100000days",
        ],
    );
    let ingest = dev.address("ingest gRPC");
    let api = dev.address("billing HTTP API");
    let grpc = dev.address("billing gRPC");

    deliver(
        ingest,
        vec![
            usage_batch("shop", "s1", 0, T0, &[("acme", 3), ("globex", 100)]),
            usage_batch("cart", "c1", 0, T0 + 60_000_000, &[("acme", 5)]),
            usage_batch("shop", "s2", 0, T0 + HOUR, &[("acme", 4)]),
        ],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (requests(api, "acme").await, requests(api, "globex").await) != (12, 100) {
        assert!(tokio::time::Instant::now() < deadline, "usage never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No token, an unknown one, a malformed header: 401 with a JSON error.
    let usage = |query: &str| format!("http://{api}/v1/usage?{query}");
    for (token, says) in [
        (None, "missing bearer token"),
        (Some("not-a-known-token-000"), "unknown token"),
    ] {
        let (status, json) = get_as(&usage("tenant=acme"), token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {json}");
        assert!(json["error"].as_str().unwrap().contains(says), "{json}");
    }
    let (status, _) = get(&usage("tenant=acme"), &[("authorization", &format!("Basic {ACME}"))]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = get_as(&format!("http://{api}/v1/gaps"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Admin reads every tenant and the gaps.
    let (status, json) = get_as(&usage("tenant=globex"), Some(ADMIN)).await;
    assert_eq!(
        (status, &json["totals"]),
        (StatusCode::OK, &serde_json::json!({"requests": 100}))
    );
    let (status, json) = get_as(&format!("http://{api}/v1/gaps"), Some(ADMIN)).await;
    assert_eq!((status, json), (StatusCode::OK, serde_json::json!({"sessions": []})));

    // A tenant token reads its own tenant, nothing else.
    let query = "tenant=acme&meter=requests&window=hour&group_by=service";
    let (status, http) = get_as(&usage(query), Some(ACME)).await;
    assert_eq!(status, StatusCode::OK, "{http}");
    assert_eq!(http["totals"], serde_json::json!({"requests": 12}));
    let (status, json) = get_as(&usage("tenant=globex"), Some(ACME)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    assert!(json["error"].as_str().unwrap().contains("globex"), "{json}");
    assert!(json.get("totals").is_none(), "{json}");
    let (status, json) = get_as(&format!("http://{api}/v1/gaps"), Some(ACME)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
    // Naming the tenant twice is refused, not read as the last one.
    let (status, json) = get_as(&usage("tenant=acme&tenant=globex"), Some(ACME)).await;
    assert_eq!(
        (status, &json["parameter"]),
        (StatusCode::BAD_REQUEST, &"tenant".into()),
        "{json}"
    );

    // CSV, same rows.
    let (status, csv) = get(
        &usage(query),
        &[("authorization", &format!("Bearer {ACME}")), ("accept", "text/csv")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{csv}");
    assert_eq!(
        csv,
        "window_start,service,meter,quantity,batches\n\
         2025-11-24T16:00:00Z,cart,requests,5,1\n\
         2025-11-24T16:00:00Z,shop,requests,3,1\n\
         2025-11-24T17:00:00Z,shop,requests,4,1\n"
    );

    // Malformed queries: 400 naming the parameter, for admin and tenant tokens alike.
    for (query, parameter) in [
        ("meter=requests", "tenant"),
        ("tenant=acme&window=week", "window"),
        ("tenant=acme&from=yesterday", "from"),
        ("tenant=acme&from=2025-11-25T00:00:00Z&to=2025-11-24T00:00:00Z", "to"),
        ("tenant=acme&meter=tokens%3F", "meter"),
        ("tenant=acme&group_by=tenant", "group_by"),
        ("tenant=acme&service=a%20b", "service"),
        ("tenant=a%20b", "tenant"),
    ] {
        for token in [ADMIN, ACME] {
            let (status, json) = get_as(&usage(query), Some(token)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {json}");
            assert_eq!(json["parameter"], parameter, "{query}: {json}");
            assert!(json["error"].is_string(), "{json}");
        }
    }
    let (status, json) = get_as(&usage("tenant=acme&colour=red"), Some(ACME)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    assert!(json["error"].as_str().unwrap().contains("colour"), "{json}");

    // gRPC: the same rows and totals as HTTP for the tenant's own token.
    let mut client = BillingClient::connect(format!("http://{grpc}")).await.unwrap();
    let ask = |tenant: &str, token: Option<&str>, window: &str| {
        let mut request = tonic::Request::new(QueryUsageRequest {
            tenant: tenant.into(),
            meter: "requests".into(),
            window: window.into(),
            group_by: vec!["service".into()],
            ..QueryUsageRequest::default()
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    let rows = client
        .query_usage(ask("acme", Some(ACME), "hour"))
        .await
        .unwrap()
        .into_inner()
        .rows;
    let grpc_rows: Vec<(String, String, String, String, u64)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.tenant, "acme");
            (
                window_label(r.window_start_unix_micros),
                r.service.clone(),
                r.meter.clone(),
                r.quantity.clone(),
                r.batches,
            )
        })
        .collect();
    let http_rows: Vec<(String, String, String, String, u64)> = http["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["window_start"].as_str().unwrap().to_owned(),
                r["service"].as_str().unwrap().to_owned(),
                r["meter"].as_str().unwrap().to_owned(),
                r["quantity"].as_i64().unwrap().to_string(),
                r["batches"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(grpc_rows, http_rows);
    assert_eq!(
        grpc_rows,
        [
            (window_label(T0), "cart".into(), "requests".into(), "5".into(), 1),
            (window_label(T0), "shop".into(), "requests".into(), "3".into(), 1),
            (window_label(T0 + HOUR), "shop".into(), "requests".into(), "4".into(), 1),
        ]
    );
    let grpc_total: i64 = rows.iter().map(|r| r.quantity.parse::<i64>().unwrap()).sum();
    assert_eq!(grpc_total, http["totals"]["requests"].as_i64().unwrap());

    let denied = client.query_usage(ask("globex", Some(ACME), "hour")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let admin = client.query_usage(ask("globex", Some(ADMIN), "hour")).await.unwrap();
    assert_eq!(admin.into_inner().rows[0].quantity, "100");
    for token in [None, Some("not-a-known-token-000")] {
        let refused = client.query_usage(ask("acme", token, "hour")).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }
    let invalid = client.query_usage(ask("acme", Some(ACME), "week")).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    assert!(invalid.message().starts_with("window: "), "{invalid:?}");

    // `tidemark usage`: a table by default, the API's CSV with --csv.
    let api_flag = format!("--api=http://{api}");
    let common = [
        "--tenant=acme",
        "--meter=requests",
        "--window=hour",
        "--group-by=service",
        &api_flag,
    ];
    let (ok, stdout, stderr) = tidemark_usage(&[&common[..], &[&format!("--token={ACME}")]].concat());
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        "\
tenant acme, hour windows
WINDOW START          SERVICE  METER     QUANTITY  BATCHES
2025-11-24T16:00:00Z  cart     requests         5        1
2025-11-24T16:00:00Z  shop     requests         3        1
2025-11-24T17:00:00Z  shop     requests         4        1
TOTAL                          requests        12
"
    );
    let (ok, stdout, stderr) = tidemark_usage(&[&common[..], &[&format!("--token={ACME}"), "--csv"]].concat());
    assert!(ok, "{stderr}");
    assert_eq!(stdout, csv);
    // Another tenant, no token, a bad window: a failure that says why.
    let (ok, _, stderr) = tidemark_usage(&[&format!("--token={ACME}"), "--tenant=globex", &api_flag]);
    assert!(!ok && stderr.contains("403 Forbidden"), "{stderr}");
    let (ok, _, stderr) = tidemark_usage(&["--tenant=acme", &api_flag]);
    assert!(!ok && stderr.contains("401 Unauthorized"), "{stderr}");
    let (ok, _, stderr) = tidemark_usage(&[&format!("--token={ACME}"), "--tenant=acme", "--window=week", &api_flag]);
    assert!(!ok && stderr.contains("(parameter window)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_tokens_file_stops_the_start_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api-tokens.toml");
    std::fs::write(&tokens, "[[token]]\ntoken = \"short\"\nscope = \"admin\"\n").unwrap();
    let mut dev = start_dev(
        &dir.path().join("data"),
        &[&format!("--api-tokens={}", tokens.display())],
    );
    let status = dev.wait_exit(Duration::from_secs(60));
    let output = dev.output();
    assert!(!status.success(), "{output}");
    let want = format!("{}: key token[0].token: the token is 5 characters", tokens.display());
    assert!(
        output.contains("check --api-tokens") && output.contains(&want),
        "{output}"
    );
}

/// A gRPC request carrying `token`.
fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_invoices_match_http_and_keep_to_the_token_scope() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("api-tokens.toml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let dev = start_dev(
        &dir.path().join("data"),
        &[
            &format!("--api-tokens={}", tokens.display()),
            "--max-batch-age=100000days",
            "--default-plan=cloud-run-request",
        ],
    );
    let api = dev.address("billing HTTP API");
    let grpc = dev.address("billing gRPC");
    deliver(
        dev.address("ingest gRPC"),
        vec![usage_batch(
            "shop",
            "s1",
            0,
            T0,
            &[("acme", 3_000_000), ("globex", 100)],
        )],
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while requests(api, "acme").await != 3_000_000 {
        assert!(tokio::time::Instant::now() < deadline, "usage never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut client = BillingClient::connect(format!("http://{grpc}")).await.unwrap();

    // GetInvoice: the same invoice as GET /v1/invoices/{id}, to the last line.
    let id = "inv_acme_2025-11";
    let invoice = client
        .get_invoice(with_token(ACME, GetInvoiceRequest { id: id.into() }))
        .await
        .unwrap()
        .into_inner();
    let (status, http) = get_as(&format!("http://{api}/v1/invoices/{id}"), Some(ACME)).await;
    assert_eq!(status, StatusCode::OK, "{http}");
    assert_eq!(
        (invoice.id.as_str(), invoice.tenant.as_str(), invoice.status.as_str()),
        (id, "acme", "draft")
    );
    assert_eq!(invoice.total, http["total"].as_str().unwrap());
    assert_eq!(invoice.subtotal, http["subtotal"].as_str().unwrap());
    assert_eq!(invoice.currency, http["currency"].as_str().unwrap());
    assert_eq!((invoice.plan.as_str(), invoice.plan_version), ("cloud-run-request", 1));
    let grpc_lines: Vec<(String, String, String)> = invoice
        .lines
        .iter()
        .map(|l| (l.charge.clone(), l.quantity.clone(), l.amount.clone()))
        .collect();
    let http_lines: Vec<(String, String, String)> = http["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let text = |key: &str| l[key].as_str().unwrap().to_owned();
            (text("charge"), text("quantity"), text("amount"))
        })
        .collect();
    assert!(!grpc_lines.is_empty());
    assert_eq!(grpc_lines, http_lines);
    let requests_line = invoice.lines.iter().find(|l| l.meter == "requests").unwrap();
    assert_eq!((requests_line.usage.as_str(), requests_line.batches), ("3000000", 1));

    // Another tenant's invoice, an unknown id, no token.
    let denied = client
        .get_invoice(with_token(
            ACME,
            GetInvoiceRequest {
                id: "inv_globex_2025-11".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let unknown = client
        .get_invoice(with_token(ACME, GetInvoiceRequest { id: "invoice-7".into() }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let anonymous = client
        .get_invoice(GetInvoiceRequest { id: id.into() })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated, "{anonymous:?}");

    // ListInvoices: a tenant token lists its own tenant, as HTTP does.
    let listed = client
        .list_invoices(with_token(ACME, ListInvoicesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let (status, http) = get_as(&format!("http://{api}/v1/invoices"), Some(ACME)).await;
    assert_eq!(status, StatusCode::OK, "{http}");
    let grpc_ids: Vec<&str> = listed.invoices.iter().map(|i| i.id.as_str()).collect();
    let http_ids: Vec<&str> = http["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert!(!grpc_ids.is_empty());
    assert_eq!(grpc_ids, http_ids);
    assert!(listed.invoices.iter().all(|i| i.tenant == "acme"), "{listed:?}");
    let denied = client
        .list_invoices(with_token(
            ACME,
            ListInvoicesRequest {
                tenant: "globex".into(),
                ..ListInvoicesRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let invalid = client
        .list_invoices(with_token(
            ADMIN,
            ListInvoicesRequest {
                status: "paid".into(),
                ..ListInvoicesRequest::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    assert!(invalid.message().starts_with("status: "), "{invalid:?}");
}
