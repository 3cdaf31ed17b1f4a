//! The gRPC `tidemark.v1.Billing` service, served on `--grpc-listen`.
//!
//! - `QueryUsage` answers from the same code as `GET /v1/usage`
//!   ([`crate::query`]): the same validation, windows and month folding;
//!   quantities are exact decimal strings.
//! - `ListInvoices` and `GetInvoice` answer from the same code as
//!   `GET /v1/invoices` and `GET /v1/invoices/{id}` ([`crate::invoice`]);
//!   money and quantities are exact decimal strings. A tenant token lists
//!   its own tenant's invoices when it names none.
//!
//! Callers present `authorization: Bearer <token>` metadata, checked like
//! the HTTP API's header ([`crate::auth`]): missing or unknown token
//! `UNAUTHENTICATED`, another tenant's data `PERMISSION_DENIED`, a bad field
//! `INVALID_ARGUMENT` with a message naming the field; an unknown invoice
//! is `NOT_FOUND`, a tenant without a plan `FAILED_PRECONDITION`.

use axum::http::StatusCode;
use tidemark_core::window::now_micros;
use tidemark_proto::v1::billing_server::{Billing, BillingServer};
use tidemark_proto::v1::{
    GetInvoiceRequest, Invoice, InvoiceLine, InvoiceProblem, ListInvoicesRequest, ListInvoicesResponse,
    QueryUsageRequest, QueryUsageResponse, UsageRow,
};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::api::{ApiError, ApiState};
use crate::auth::{Auth, Caller};
use crate::invoice::model::{self, LineKind, Status as InvoiceStatus};
use crate::invoice::{InvoiceError, Invoicing, ListFilter};
use crate::quantity::Quantity;
use crate::query::{self, ParamError, UsageParams};
use crate::store::Store;

/// The billing gRPC service over the API's state.
#[derive(Debug, Clone)]
pub struct BillingService {
    store: Store,
    auth: Auth,
    invoicing: Invoicing,
}

impl BillingService {
    pub fn new(state: &ApiState) -> BillingService {
        BillingService {
            store: state.store.clone(),
            auth: state.auth.clone(),
            invoicing: state.invoicing.clone(),
        }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let authorization = match request.metadata().get("authorization") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| Status::unauthenticated("the authorization metadata is not ASCII"))?,
            ),
        };
        self.auth.caller(authorization).map_err(status)
    }
}

/// Serves the billing gRPC service on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    mut shutdown: tidemark_runtime::shutdown::Shutdown,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(BillingServer::new(BillingService::new(&state)))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move { shutdown.wait().await })
        .await
}

/// The gRPC status for an API error: same class, same message.
pub fn status(error: ApiError) -> Status {
    let message = error.message().to_owned();
    match error.status() {
        StatusCode::UNAUTHORIZED => Status::unauthenticated(message),
        StatusCode::FORBIDDEN => Status::permission_denied(message),
        StatusCode::NOT_FOUND => Status::not_found(message),
        s if s.is_client_error() => Status::invalid_argument(message),
        _ => Status::internal(message),
    }
}

/// The request's field for the HTTP parameter `parameter`.
fn field_name(parameter: &str) -> &str {
    match parameter {
        "from" => "from_unix_micros",
        "to" => "to_unix_micros",
        other => other,
    }
}

/// `INVALID_ARGUMENT` naming the field first; the times' messages say
/// `from_unix_micros`/`to_unix_micros` where HTTP says `from`/`to`.
fn invalid(e: ParamError) -> Status {
    match e.parameter {
        Some(p @ ("from" | "to")) => {
            let message: Vec<&str> = e.message.split(' ').map(field_name).collect();
            Status::invalid_argument(format!("{}: {}", field_name(p), message.join(" ")))
        }
        Some(p) => Status::invalid_argument(format!("{p}: {}", e.message)),
        None => Status::invalid_argument(e.message),
    }
}

fn some(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The usage parameters a gRPC request stands for: empty strings and zero
/// times are unset.
fn params(r: &QueryUsageRequest) -> UsageParams<'_> {
    UsageParams {
        tenant: some(&r.tenant),
        from: (r.from_unix_micros != 0).then_some(r.from_unix_micros),
        to: (r.to_unix_micros != 0).then_some(r.to_unix_micros),
        service: some(&r.service),
        meter: some(&r.meter),
        window: some(&r.window),
        group_by: r.group_by.iter().map(String::as_str).collect(),
    }
}

#[tonic::async_trait]
impl Billing for BillingService {
    async fn query_usage(&self, request: Request<QueryUsageRequest>) -> Result<Response<QueryUsageResponse>, Status> {
        let caller = self.caller(&request)?;
        let usage = query::usage_request(&params(request.get_ref())).map_err(invalid)?;
        caller.may_read(&usage.query.tenant).map_err(status)?;
        let rows = query::run(&self.store, &usage)
            .await
            .map_err(|e| status(ApiError::internal("usage query", &e)))?;
        let tenant = usage.query.tenant;
        let rows = rows
            .into_iter()
            .map(|r| UsageRow {
                window_start_unix_micros: r.window_start,
                tenant: tenant.clone(),
                service: r.service.unwrap_or_default(),
                quantity: Quantity::of(&r.meter, r.quantity).to_string(),
                meter: r.meter,
                batches: u64::try_from(r.batches).unwrap_or(0),
            })
            .collect();
        Ok(Response::new(QueryUsageResponse { rows }))
    }

    async fn list_invoices(
        &self,
        request: Request<ListInvoicesRequest>,
    ) -> Result<Response<ListInvoicesResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.get_ref();
        let mut filter = ListFilter::default();
        if let Some(tenant) = some(&r.tenant) {
            tidemark_core::ids::validate_name(tenant)
                .map_err(|e| Status::invalid_argument(format!("tenant: tenant {e}")))?;
            caller.may_read(tenant).map_err(status)?;
            filter.tenant = Some(tenant.to_owned());
        } else if let Some(own) = caller.tenant() {
            filter.tenant = Some(own.to_owned());
        }
        if let Some(text) = some(&r.status) {
            filter.status =
                Some(InvoiceStatus::parse(text).ok_or_else(|| {
                    Status::invalid_argument(format!("status: {text:?} is not one of draft, finalized"))
                })?);
        }
        let listing = self
            .invoicing
            .list(&filter, now_micros())
            .await
            .map_err(invoice_status)?;
        Ok(Response::new(ListInvoicesResponse {
            invoices: listing.invoices.iter().map(|i| invoice_proto(i, false)).collect(),
            problems: listing
                .errors
                .iter()
                .map(|(id, e)| InvoiceProblem {
                    id: id.clone(),
                    error: e.to_string(),
                })
                .collect(),
        }))
    }

    async fn get_invoice(&self, request: Request<GetInvoiceRequest>) -> Result<Response<Invoice>, Status> {
        let caller = self.caller(&request)?;
        let id = &request.get_ref().id;
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "id: the invoice id is required (inv_<tenant>_<YYYY-MM>)",
            ));
        }
        let (tenant, _) = self.invoicing.parse_id(id).map_err(invoice_status)?;
        caller.may_read(&tenant).map_err(status)?;
        let invoice = self.invoicing.get(id, now_micros()).await.map_err(invoice_status)?;
        Ok(Response::new(invoice_proto(&invoice, true)))
    }
}

/// The gRPC status for an invoice error, as the HTTP API classes them.
fn invoice_status(e: InvoiceError) -> Status {
    let message = e.to_string();
    match e {
        InvoiceError::Unknown { .. } => Status::not_found(message),
        InvoiceError::NoPlan { .. } | InvoiceError::PlanNotLoaded { .. } => Status::failed_precondition(message),
        InvoiceError::TooEarly { .. } | InvoiceError::AlreadyFinalized { .. } => Status::failed_precondition(message),
        InvoiceError::Rate { .. } | InvoiceError::Aggregate { .. } => {
            tracing::error!(error = %message, "cannot price an invoice");
            Status::internal(message)
        }
        InvoiceError::Db(_) => {
            tracing::error!(error = %message, "invoice query failed");
            Status::internal("invoice query failed")
        }
    }
}

/// `invoice` on the wire, with its lines if `with_lines`.
fn invoice_proto(invoice: &model::Invoice, with_lines: bool) -> Invoice {
    let lines = if with_lines {
        invoice.lines.iter().map(line_proto).collect()
    } else {
        Vec::new()
    };
    Invoice {
        id: invoice.id.clone(),
        tenant: invoice.tenant.clone(),
        period_start_unix_micros: invoice.period.start,
        period_end_unix_micros: invoice.period.end,
        status: invoice.status.as_str().to_owned(),
        currency: invoice.currency.clone(),
        lines,
        subtotal: invoice.subtotal.to_string(),
        finalized_at_unix_micros: invoice.finalized_at.unwrap_or(0),
        total: invoice.total.to_string(),
        plan: invoice.plan.name.clone(),
        plan_version: invoice.plan.version,
        time_zone: invoice.time_zone.clone(),
    }
}

fn line_proto(line: &model::Line) -> InvoiceLine {
    InvoiceLine {
        meter: line.source.clone().unwrap_or_default(),
        description: line.description.clone(),
        quantity: line.quantity.to_string(),
        allowance: line.allowance.to_string(),
        unit_price: line.unit_price.map(|p| p.to_string()).unwrap_or_default(),
        amount: line.amount.to_string(),
        usage_from_unix_micros: line.usage_from.unwrap_or(0),
        usage_to_unix_micros: line.usage_to.unwrap_or(0),
        batches: u64::try_from(line.batches).unwrap_or(0),
        corrects_period_start_unix_micros: line.corrects_period_start.unwrap_or(0),
        line_no: line.line_no,
        kind: match line.kind {
            LineKind::Charge => "charge",
            LineKind::Minimum => "minimum",
            LineKind::Correction => "correction",
        }
        .to_owned(),
        charge: line.charge.clone(),
        usage: line.usage.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_fields_are_named_as_the_request_names_them() {
        let request = |f: fn(&mut QueryUsageRequest)| {
            let mut r = QueryUsageRequest {
                tenant: "acme".into(),
                ..QueryUsageRequest::default()
            };
            f(&mut r);
            r
        };
        let cases: [(QueryUsageRequest, &str); 6] = [
            (request(|r| r.tenant.clear()), "tenant: "),
            (request(|r| r.window = "week".into()), "window: "),
            (request(|r| r.meter = "tokens?".into()), "meter: "),
            (request(|r| r.group_by = vec!["tenant".into()]), "group_by: "),
            (
                request(|r| {
                    r.from_unix_micros = 20;
                    r.to_unix_micros = 10;
                }),
                "to_unix_micros: to_unix_micros must be later than from_unix_micros",
            ),
            (request(|r| r.from_unix_micros = -1), "from_unix_micros: "),
        ];
        for (r, want) in cases {
            let s = query::usage_request(&params(&r)).map(|_| ()).map_err(invalid);
            let s = s.expect_err(want);
            assert_eq!(s.code(), tonic::Code::InvalidArgument);
            assert!(s.message().starts_with(want), "{r:?}: {}", s.message());
        }
        assert!(query::usage_request(&params(&request(|_| {}))).is_ok());
    }

    #[test]
    fn api_errors_keep_their_class() {
        let code = |s: StatusCode| status(ApiError::new(s, "x")).code();
        assert_eq!(code(StatusCode::UNAUTHORIZED), tonic::Code::Unauthenticated);
        assert_eq!(code(StatusCode::FORBIDDEN), tonic::Code::PermissionDenied);
        assert_eq!(code(StatusCode::BAD_REQUEST), tonic::Code::InvalidArgument);
        assert_eq!(code(StatusCode::INTERNAL_SERVER_ERROR), tonic::Code::Internal);
    }
}
