//! The invoice and subscription endpoints of the billing HTTP API:
//!
//! - `GET /v1/invoices[?tenant=T][&status=draft|finalized][&period=YYYY-MM]`
//! - `GET /v1/invoices/{id}`
//! - `POST /v1/invoices/{id}/finalize` (admin)
//! - `GET /v1/tenants/{tenant}/cost`: the open period's draft so far
//! - `PUT /v1/tenants/{tenant}/subscription` (admin), `GET` it back
//!
//! Money and quantities are decimal strings; times RFC 3339 in UTC. A bad
//! parameter gets `400` with `{"error", "parameter"}`, an unknown invoice
//! `404`, a state that forbids the request (too early, already finalized,
//! no plan) `409`. A tenant token sees only its own tenant.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::DateTime;
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Value, json};
use tidemark_core::ids::validate_name;
use tidemark_core::window::now_micros;

use super::model::{Correction, Invoice, Line, LineKind, Status};
use super::period::parse_month;
use super::{InvoiceError, Invoicing, ListFilter};
use crate::api::ApiError;
use crate::auth::{Auth, Caller};
use crate::pricing::TierLine;
use crate::subscriptions::{PlanId, Subscription, current};

/// The invoice and subscription routes, for a router whose state gives
/// the [`Invoicing`] and the [`Auth`] (the API's `ApiState`).
pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Invoicing: FromRef<S>,
    Auth: FromRef<S>,
{
    Router::new()
        .route("/v1/invoices", get(list))
        .route("/v1/invoices/{id}", get(show))
        .route("/v1/invoices/{id}/finalize", post(finalize))
        .route("/v1/tenants/{tenant}/cost", get(cost))
        .route(
            "/v1/tenants/{tenant}/subscription",
            get(get_subscription).put(put_subscription),
        )
}

fn rfc3339(unix_micros: i64) -> String {
    super::rfc3339(unix_micros)
}

/// A refusal: an [`ApiError`], or a `409` with the time that matters.
#[derive(Debug)]
pub enum HttpError {
    Api(ApiError),
    Conflict {
        message: String,
        field: &'static str,
        at: String,
    },
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> HttpError {
        HttpError::Api(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        match self {
            HttpError::Api(e) => e.into_response(),
            HttpError::Conflict { message, field, at } => {
                let mut body = json!({ "error": message });
                body[field] = Value::String(at);
                (StatusCode::CONFLICT, Json(body)).into_response()
            }
        }
    }
}

impl From<InvoiceError> for HttpError {
    fn from(e: InvoiceError) -> HttpError {
        let message = e.to_string();
        match e {
            InvoiceError::Unknown { .. } => ApiError::new(StatusCode::NOT_FOUND, message).into(),
            InvoiceError::NoPlan { .. } | InvoiceError::PlanNotLoaded { .. } => {
                ApiError::new(StatusCode::CONFLICT, message).into()
            }
            InvoiceError::TooEarly { finalizable_at, id } => HttpError::Conflict {
                message: format!(
                    "invoice {id} can be finalized from {} on (period end plus the collection wait)",
                    rfc3339(finalizable_at)
                ),
                field: "finalizable_at",
                at: rfc3339(finalizable_at),
            },
            InvoiceError::AlreadyFinalized { finalized_at, .. } => HttpError::Conflict {
                message,
                field: "finalized_at",
                at: finalized_at,
            },
            InvoiceError::Rate { .. } | InvoiceError::Aggregate { .. } => {
                tracing::error!(error = %message, "cannot price an invoice");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).into()
            }
            InvoiceError::Db(_) => {
                tracing::error!(error = %message, "invoice query failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "invoice query failed").into()
            }
        }
    }
}

fn tenant_param(tenant: &str) -> Result<(), ApiError> {
    validate_name(tenant).map_err(|e| ApiError::bad_parameter("tenant", format!("tenant {e}")))
}

/// An invoice line as the API shows it.
#[derive(Debug, Serialize)]
pub struct LineJson {
    pub line_no: u32,
    pub kind: LineKind,
    pub charge: String,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub usage: Decimal,
    pub quantity: Decimal,
    pub allowance: Decimal,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Decimal>,
    pub tiers: Vec<TierLine>,
    pub amount: Decimal,
    pub usage_from: Option<String>,
    pub usage_to: Option<String>,
    pub batches: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrects_period: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrects_period_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correction: Option<Correction>,
}

/// An invoice as the API shows it.
#[derive(Debug, Serialize)]
pub struct InvoiceJson {
    pub id: String,
    pub tenant: String,
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    pub time_zone: String,
    pub status: Status,
    pub plan: String,
    pub plan_version: u32,
    pub currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lines: Option<Vec<LineJson>>,
    pub subtotal: Decimal,
    pub total: Decimal,
    pub finalized_at: Option<String>,
    /// Drafts: from when the period may be finalized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalizable_at: Option<String>,
    /// Drafts: the time the usage was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
}

fn line_json(line: &Line) -> LineJson {
    LineJson {
        line_no: line.line_no,
        kind: line.kind,
        charge: line.charge.clone(),
        description: line.description.clone(),
        source: line.source.clone(),
        usage: line.usage,
        quantity: line.quantity,
        allowance: line.allowance,
        unit_price: line.unit_price,
        tiers: line.tiers.clone(),
        amount: line.amount,
        usage_from: line.usage_from.map(rfc3339),
        usage_to: line.usage_to.map(rfc3339),
        batches: line.batches,
        corrects_period: line.correction.as_ref().map(|c| c.period.clone()),
        corrects_period_start: line.corrects_period_start.map(rfc3339),
        correction: line.correction.clone(),
    }
}

/// `invoice` as JSON, with its lines if `with_lines`; `now` for drafts.
pub fn invoice_json(invoice: &Invoice, invoicing: &Invoicing, with_lines: bool, now: i64) -> InvoiceJson {
    let draft = invoice.status == Status::Draft;
    InvoiceJson {
        id: invoice.id.clone(),
        tenant: invoice.tenant.clone(),
        period: invoice.period.label(),
        period_start: rfc3339(invoice.period.start),
        period_end: rfc3339(invoice.period.end),
        time_zone: invoice.time_zone.clone(),
        status: invoice.status,
        plan: invoice.plan.name.clone(),
        plan_version: invoice.plan.version,
        currency: invoice.currency.clone(),
        lines: with_lines.then(|| invoice.lines.iter().map(line_json).collect()),
        subtotal: invoice.subtotal,
        total: invoice.total,
        finalized_at: invoice.finalized_at.map(rfc3339),
        finalizable_at: draft.then(|| rfc3339(invoicing.finalizable_at(&invoice.period))),
        as_of: draft.then(|| rfc3339(now)),
    }
}

const LIST_KNOWN: &str = "tenant, status, period";

/// `GET /v1/invoices`.
async fn list(
    caller: Caller,
    State(invoicing): State<Invoicing>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, HttpError> {
    let mut filter = ListFilter::default();
    for (key, value) in &params {
        match key.as_str() {
            "tenant" => {
                tenant_param(value)?;
                filter.tenant = Some(value.clone());
            }
            "status" => {
                filter.status = Some(Status::parse(value).ok_or_else(|| {
                    ApiError::bad_parameter("status", format!("{value:?} is not one of draft, finalized"))
                })?);
            }
            "period" => {
                filter.period = Some(parse_month(value).ok_or_else(|| {
                    ApiError::bad_parameter("period", format!("{value:?} is not a month such as 2026-11"))
                })?);
            }
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {key:?}; known: {LIST_KNOWN}"),
                )
                .into());
            }
        }
    }
    match (&filter.tenant, caller.tenant()) {
        (Some(tenant), _) => caller.may_read(tenant)?,
        (None, Some(own)) => filter.tenant = Some(own.to_owned()),
        (None, None) => {}
    }
    let now = now_micros();
    let listing = invoicing.list(&filter, now).await?;
    let invoices: Vec<InvoiceJson> = listing
        .invoices
        .iter()
        .map(|i| invoice_json(i, &invoicing, false, now))
        .collect();
    let errors: Vec<Value> = listing
        .errors
        .iter()
        .map(|(id, e)| json!({ "id": id, "error": e.to_string() }))
        .collect();
    let mut body = json!({ "invoices": invoices });
    if !errors.is_empty() {
        body["errors"] = Value::Array(errors);
    }
    Ok(Json(body))
}

/// `GET /v1/invoices/{id}`.
async fn show(
    caller: Caller,
    State(invoicing): State<Invoicing>,
    Path(id): Path<String>,
) -> Result<Json<InvoiceJson>, HttpError> {
    let (tenant, _) = invoicing.parse_id(&id)?;
    caller.may_read(&tenant)?;
    let now = now_micros();
    let invoice = invoicing.get(&id, now).await?;
    Ok(Json(invoice_json(&invoice, &invoicing, true, now)))
}

/// `POST /v1/invoices/{id}/finalize`.
async fn finalize(
    caller: Caller,
    State(invoicing): State<Invoicing>,
    Path(id): Path<String>,
) -> Result<Json<InvoiceJson>, HttpError> {
    caller.require_admin()?;
    let now = now_micros();
    let invoice = invoicing.finalize(&id, now).await?;
    Ok(Json(invoice_json(&invoice, &invoicing, true, now)))
}

/// `GET /v1/tenants/{tenant}/cost`: what the open period costs so far.
async fn cost(
    caller: Caller,
    State(invoicing): State<Invoicing>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, HttpError> {
    tenant_param(&tenant)?;
    caller.may_read(&tenant)?;
    let now = now_micros();
    let draft = invoicing.running_cost(&tenant, now).await?;
    let lines: Vec<Value> = draft
        .lines
        .iter()
        .map(|l| {
            let mut line = json!({
                "line_no": l.line_no,
                "kind": l.kind,
                "charge": l.charge,
                "description": l.description,
                "usage": l.usage,
                "amount": l.amount,
            });
            if let Some(c) = &l.correction {
                line["corrects_period"] = Value::String(c.period.clone());
            }
            line
        })
        .collect();
    Ok(Json(json!({
        "tenant": draft.tenant,
        "invoice": draft.id,
        "period": draft.period.label(),
        "period_start": rfc3339(draft.period.start),
        "period_end": rfc3339(draft.period.end),
        "time_zone": draft.time_zone,
        "as_of": rfc3339(now),
        "plan": draft.plan.name,
        "plan_version": draft.plan.version,
        "currency": draft.currency,
        "lines": lines,
        "subtotal": draft.subtotal,
        "total": draft.total,
    })))
}

fn subscription_json(s: &Subscription) -> Value {
    json!({ "plan": s.plan.name, "version": s.plan.version, "starts_at": rfc3339(s.starts_at) })
}

fn plan_json(id: &PlanId) -> Value {
    json!({ "plan": id.name, "version": id.version })
}

/// `GET /v1/tenants/{tenant}/subscription`: the subscription in effect
/// now, every one (past and scheduled), and the default plan.
async fn get_subscription(
    caller: Caller,
    State(invoicing): State<Invoicing>,
    Path(tenant): Path<String>,
) -> Result<Json<Value>, HttpError> {
    tenant_param(&tenant)?;
    caller.may_read(&tenant)?;
    let subscriptions = invoicing
        .store
        .subscriptions(&tenant)
        .await
        .map_err(|e| HttpError::from(InvoiceError::Db(e)))?;
    let default = invoicing.catalog.default_plan();
    if subscriptions.is_empty() && default.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("tenant {tenant:?} has no subscription and billing has no --default-plan"),
        )
        .into());
    }
    Ok(Json(json!({
        "tenant": tenant,
        "current": current(&subscriptions, now_micros()).map(subscription_json),
        "subscriptions": subscriptions.iter().map(subscription_json).collect::<Vec<_>>(),
        "default_plan": default.map(plan_json),
    })))
}

/// `PUT /v1/tenants/{tenant}/subscription` with
/// `{"plan": NAME, "version": N, "starts_at": RFC3339}` (`version`
/// defaults to the plan's latest).
async fn put_subscription(
    caller: Caller,
    State(invoicing): State<Invoicing>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    caller.require_admin()?;
    tenant_param(&tenant)?;
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON ({e}); send {{\"plan\": NAME, \"version\": N, \"starts_at\": RFC3339}}"),
        )
    })?;
    let Some(fields) = body.as_object() else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the body must be a JSON object").into());
    };
    if let Some(key) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "plan" | "version" | "starts_at"))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("unknown field {key:?}; known: plan, version, starts_at"),
        )
        .into());
    }
    let catalog = &invoicing.catalog;
    let name = fields
        .get("plan")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_parameter("plan", "plan is required: the name of a loaded plan"))?;
    let plan = match fields.get("version") {
        None | Some(Value::Null) => catalog.latest(name),
        Some(version) => {
            let version = version
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|v| *v >= 1)
                .ok_or_else(|| {
                    ApiError::bad_parameter("version", format!("{version} is not a plan version (1, 2, ...)"))
                })?;
            if catalog.latest(name).is_some() && catalog.get(name, version).is_none() {
                return Err(ApiError::bad_parameter(
                    "version",
                    format!("plan {name:?} has no version {version}; loaded: {}", catalog.describe()),
                )
                .into());
            }
            catalog.get(name, version)
        }
    }
    .ok_or_else(|| {
        ApiError::bad_parameter(
            "plan",
            format!("no plan {name:?} is loaded; loaded: {}", catalog.describe()),
        )
    })?;
    let starts_at = fields
        .get("starts_at")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_parameter("starts_at", "starts_at is required, e.g. \"2026-11-01T00:00:00Z\""))?;
    let starts_at = DateTime::parse_from_rfc3339(starts_at)
        .map_err(|e| {
            ApiError::bad_parameter(
                "starts_at",
                format!("{starts_at:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z ({e})"),
            )
        })?
        .timestamp_micros();
    let subscription = Subscription {
        tenant: tenant.clone(),
        plan: PlanId {
            name: plan.name.clone(),
            version: plan.version,
        },
        starts_at,
    };
    invoicing
        .store
        .put_subscription(&subscription)
        .await
        .map_err(|e| HttpError::from(InvoiceError::Db(e)))?;
    tracing::info!(%tenant, plan = %subscription.plan, starts_at = %rfc3339(starts_at), "subscription set");
    Ok(Json(
        json!({ "tenant": tenant, "subscription": subscription_json(&subscription) }),
    ))
}
