//! The billing HTTP API.
//!
//! `GET /v1/usage?tenant=T[&from=RFC3339][&to=RFC3339][&service=S][&meter=M]`
//! returns the tenant's usage per minute in `[from, to)`, with totals per
//! meter. A bad parameter gets `400` and `{"error": ..., "parameter": ...}`.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::json;
use tidemark_core::ids::validate_name;
use tidemark_core::meter::Meter;

use crate::store::{Store, UsageQuery};

/// Serves the API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Store,
    mut shutdown: tidemark_runtime::shutdown::Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router(store))
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

pub fn router(store: Store) -> Router {
    Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/gaps", get(gaps))
        .with_state(store)
}

/// An error answered as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    parameter: Option<&'static str>,
}

impl ApiError {
    /// A store failure: logged in full, answered without details.
    fn internal(what: &'static str, error: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(%error, "{what} failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("{what} failed"),
            parameter: None,
        }
    }

    fn bad(parameter: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            parameter: Some(parameter),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.parameter {
            Some(p) => json!({ "error": self.message, "parameter": p }),
            None => json!({ "error": self.message }),
        };
        (self.status, Json(body)).into_response()
    }
}

#[derive(Debug, Serialize)]
struct UsageResponse {
    tenant: String,
    from: Option<String>,
    to: Option<String>,
    rows: Vec<UsageRowJson>,
    totals: BTreeMap<String, i64>,
}

#[derive(Debug, Serialize)]
struct UsageRowJson {
    minute: String,
    service: String,
    meter: String,
    quantity: i64,
    batches: i64,
}

fn rfc3339(unix_micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(unix_micros).map_or_else(
        || unix_micros.to_string(),
        |t| t.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}

fn parse_time(parameter: &'static str, text: &str) -> Result<i64, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|e| {
            ApiError::bad(
                parameter,
                format!("{text:?} is not an RFC 3339 time such as 2026-11-26T04:00:00Z ({e})"),
            )
        })
}

/// Turns query parameters into a [`UsageQuery`], refusing unknown ones.
fn parse_usage_query(params: &[(String, String)]) -> Result<UsageQuery, ApiError> {
    let mut q = UsageQuery {
        from: 0,
        to: i64::MAX,
        ..UsageQuery::default()
    };
    let mut tenant = None;
    for (key, value) in params {
        match key.as_str() {
            "tenant" => tenant = Some(value.clone()),
            "from" => q.from = parse_time("from", value)?,
            "to" => q.to = parse_time("to", value)?,
            "service" => q.service = Some(value.clone()),
            "meter" => {
                if Meter::parse(value).is_none() {
                    let known: Vec<_> = Meter::ALL.iter().map(|m| m.as_str()).collect();
                    return Err(ApiError::bad(
                        "meter",
                        format!("unknown meter {value:?}; known: {}", known.join(", ")),
                    ));
                }
                q.meter = Some(value.clone());
            }
            _ => {
                return Err(ApiError {
                    status: StatusCode::BAD_REQUEST,
                    message: format!("unknown parameter {key:?}; known: tenant, from, to, service, meter"),
                    parameter: None,
                });
            }
        }
    }
    q.tenant = tenant.ok_or_else(|| ApiError::bad("tenant", "tenant is required"))?;
    validate_name(&q.tenant).map_err(|e| ApiError::bad("tenant", format!("tenant {e}")))?;
    if q.from >= q.to {
        return Err(ApiError::bad("to", "to must be later than from"));
    }
    Ok(q)
}

async fn usage(
    State(store): State<Store>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<UsageResponse>, ApiError> {
    let q = parse_usage_query(&params)?;
    let rows = store
        .usage(&q)
        .await
        .map_err(|e| ApiError::internal("usage query", &e))?;
    let mut totals = BTreeMap::new();
    for row in &rows {
        *totals.entry(row.meter.clone()).or_insert(0) += row.quantity;
    }
    Ok(Json(UsageResponse {
        from: (q.from != 0).then(|| rfc3339(q.from)),
        to: (q.to != i64::MAX).then(|| rfc3339(q.to)),
        tenant: q.tenant,
        rows: rows
            .into_iter()
            .map(|r| UsageRowJson {
                minute: rfc3339(r.minute),
                service: r.service,
                meter: r.meter,
                quantity: r.quantity,
                batches: r.batches,
            })
            .collect(),
        totals,
    }))
}

/// `GET /v1/gaps`: every session with missing batches, still waited for
/// (`open`) or declared lost after the grace period (`lost`).
async fn gaps(State(store): State<Store>) -> Result<Json<serde_json::Value>, ApiError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_a_full_query() {
        let q = parse_usage_query(&params(&[
            ("tenant", "acme"),
            ("from", "2026-11-26T04:00:00Z"),
            ("to", "2026-11-26T06:00:00+01:00"),
            ("meter", "requests"),
        ]))
        .expect("valid");
        assert_eq!(q.tenant, "acme");
        assert_eq!(q.from, 1_795_665_600_000_000);
        assert_eq!(q.to, 1_795_669_200_000_000, "06:00+01:00 is 05:00Z");
    }

    #[test]
    fn names_the_bad_parameter() {
        let cases = [
            (vec![], Some("tenant")),
            (vec![("tenant", "a b")], Some("tenant")),
            (vec![("tenant", "a"), ("from", "yesterday")], Some("from")),
            (vec![("tenant", "a"), ("meter", "tokens?")], Some("meter")),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "2026-01-02T00:00:00Z"),
                    ("to", "2026-01-01T00:00:00Z"),
                ],
                Some("to"),
            ),
            (vec![("tenant", "a"), ("colour", "red")], None),
        ];
        for (pairs, parameter) in cases {
            let err = parse_usage_query(&params(&pairs)).expect_err("invalid");
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert_eq!(err.parameter, parameter, "{pairs:?}: {}", err.message);
        }
    }
}
