//! The billing HTTP API.
//!
//! - `GET /v1/usage?tenant=T[&from=RFC3339][&to=RFC3339][&service=S][&meter=M]
//!   [&window=minute|hour|day|month][&group_by=service]`: the tenant's usage
//!   per window in `[from, to)` with totals per meter, as JSON, or as CSV
//!   with `Accept: text/csv`;
//!   Custom meters' quantities are exact decimal strings, built-in ones
//!   integers;
//! - `GET /v1/late-usage?tenant=T[&from][&to][&service][&meter]`: usage the
//!   ledger counted more than `--late-after` after its window ended, per
//!   event minute and stored minute (docs/ledger.md);
//! - `GET /v1/gaps`: sessions with missing batches (admin tokens only);
//! - invoices, running cost and subscriptions: see [`crate::invoice::http`].
//!
//! Callers are recognized by bearer token (see [`crate::auth`]): a tenant
//! token reads its own tenant only. A bad parameter gets `400` and
//! `{"error": ..., "parameter": ...}`; a missing or unknown token `401`, a
//! token reading what it may not `403`, both with `{"error": ...}`.

use std::collections::BTreeMap;

use axum::extract::{FromRef, Query, State};
use std::fmt::Write as _;

use crate::auth::{Auth, Caller};
use crate::invoice::Invoicing;
use crate::quantity::Quantity;
use crate::query::{self, ParamError, UsageRequest, parse_usage_request};
use crate::store::Store;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::json;

/// What the API's handlers share. Handlers take the parts they need
/// (`State<Store>`, the [`Caller`] extractor via [`Auth`]) through `FromRef`.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
    pub auth: Auth,
    pub invoicing: Invoicing,
}

impl FromRef<ApiState> for Invoicing {
    fn from_ref(state: &ApiState) -> Invoicing {
        state.invoicing.clone()
    }
}

impl FromRef<ApiState> for Store {
    fn from_ref(state: &ApiState) -> Store {
        state.store.clone()
    }
}

impl FromRef<ApiState> for Auth {
    fn from_ref(state: &ApiState) -> Auth {
        state.auth.clone()
    }
}

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    mut shutdown: tidemark_runtime::shutdown::Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/gaps", get(gaps))
        .route("/v1/late-usage", get(late_usage))
        .merge(crate::invoice::http::routes())
        .with_state(state)
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    parameter: Option<&'static str>,
}

impl ApiError {
    /// An error with `status`, naming no parameter.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            parameter: None,
        }
    }

    /// A `400` naming the refused `parameter`.
    pub fn bad_parameter(parameter: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            parameter: Some(parameter),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The refused parameter, for a `400`.
    pub fn parameter(&self) -> Option<&'static str> {
        self.parameter
    }

    /// A store failure: logged in full, answered without details.
    pub(crate) fn internal(what: &'static str, error: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(%error, "{what} failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("{what} failed"),
            parameter: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.parameter {
            Some(p) => json!({ "error": self.message, "parameter": p }),
            None => json!({ "error": self.message }),
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[derive(Debug, Serialize)]
struct UsageResponse {
    tenant: String,
    from: Option<String>,
    to: Option<String>,
    window: &'static str,
    rows: Vec<UsageRowJson>,
    totals: BTreeMap<String, Quantity>,
}

#[derive(Debug, Serialize)]
struct UsageRowJson {
    window_start: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    meter: String,
    quantity: Quantity,
    batches: i64,
}

fn rfc3339(unix_micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(unix_micros).map_or_else(
        || unix_micros.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.message,
            parameter: e.parameter,
        }
    }
}

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().starts_with("text/csv")))
}

async fn usage(
    caller: Caller,
    State(store): State<Store>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let request = parse_usage_request(&params)?;
    caller.may_read(&request.query.tenant)?;
    let rows = query::run(&store, &request)
        .await
        .map_err(|e| ApiError::internal("usage query", &e))?;
    let totals = query::totals(&rows)
        .into_iter()
        .map(|(meter, total)| {
            let total = Quantity::of_total(&meter, total);
            (meter, total)
        })
        .collect();
    let UsageRequest { query: q, window } = request;
    let rows: Vec<UsageRowJson> = rows
        .into_iter()
        .map(|r| UsageRowJson {
            window_start: rfc3339(r.window_start),
            service: r.service,
            quantity: Quantity::of(&r.meter, r.quantity),
            meter: r.meter,
            batches: r.batches,
        })
        .collect();
    if wants_csv(&headers) {
        let mut csv = String::from("window_start,service,meter,quantity,batches\n");
        for r in &rows {
            // Every field is an RFC 3339 time, a validated name or a number:
            // nothing to quote.
            let service = r.service.as_deref().unwrap_or("");
            let _ = writeln!(
                csv,
                "{},{service},{},{},{}",
                r.window_start, r.meter, r.quantity, r.batches
            );
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response());
    }
    Ok(Json(UsageResponse {
        from: (q.from != 0).then(|| rfc3339(q.from)),
        to: (q.to != i64::MAX).then(|| rfc3339(q.to)),
        tenant: q.tenant,
        window: window.as_str(),
        rows,
        totals,
    })
    .into_response())
}

/// `GET /v1/late-usage`: the tenant's late usage whose event minute is in
/// `[from, to)`, one row per event minute, stored minute, service and
/// meter, as JSON or CSV.
async fn late_usage(
    caller: Caller,
    State(store): State<Store>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    if let Some((key, _)) = params.iter().find(|(k, _)| k == "window" || k == "group_by") {
        return Err(ParamError {
            parameter: None,
            message: format!(
                "unknown parameter {key:?}: late usage is listed per event minute, stored minute and service; \
                 known: tenant, from, to, service, meter"
            ),
        }
        .into());
    }
    let request = parse_usage_request(&params)?;
    caller.may_read(&request.query.tenant)?;
    let q = request.query;
    let rows = store
        .late_usage(&q)
        .await
        .map_err(|e| ApiError::internal("late usage query", &e))?;
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            json!({
                "minute": rfc3339(r.minute),
                "stored_minute": rfc3339(r.stored_minute),
                "service": r.service,
                "meter": r.meter,
                "quantity": Quantity::of(&r.meter, r.quantity),
                "batches": r.batches,
            })
        })
        .collect();
    if wants_csv(&headers) {
        let mut csv = String::from("minute,stored_minute,service,meter,quantity,batches\n");
        for r in &rows {
            let text = |key: &str| match &r[key] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let fields = ["minute", "stored_minute", "service", "meter", "quantity", "batches"].map(text);
            let _ = writeln!(csv, "{}", fields.join(","));
        }
        return Ok(([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], csv).into_response());
    }
    Ok(Json(json!({
        "tenant": q.tenant,
        "from": (q.from != 0).then(|| rfc3339(q.from)),
        "to": (q.to != i64::MAX).then(|| rfc3339(q.to)),
        "rows": rows,
    }))
    .into_response())
}

/// `GET /v1/gaps`: every session with missing batches, still waited for
/// (`open`) or declared lost after the grace period (`lost`). Admin only:
/// sessions span tenants.
async fn gaps(caller: Caller, State(store): State<Store>) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require_admin()?;
    let sessions = store.gaps().await.map_err(|e| ApiError::internal("gaps query", &e))?;
    let sessions: Vec<_> = sessions
        .into_iter()
        .map(|s| {
            let missing: Vec<_> = s
                .missing
                .iter()
                .map(|m| json!({ "from_seq": m.from_seq, "to_seq": m.to_seq, "state": if m.lost { "lost" } else { "open" } }))
                .collect();
            json!({ "session": s.session_id, "service": s.service, "instance": s.instance, "missing": missing })
        })
        .collect();
    Ok(Json(json!({ "sessions": sessions })))
}
