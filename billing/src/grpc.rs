//! The gRPC `tidemark.v1.Billing` service, served on `--grpc-listen`.
//!
//! - `QueryUsage` answers from the same code as `GET /v1/usage`
//!   ([`crate::query`]): the same validation, windows and month folding;
//!   quantities are exact decimal strings.
//! - `ListInvoices` and `GetInvoice` answer `UNIMPLEMENTED` for now:
//!   invoices are served over HTTP.
//!
//! Callers present `authorization: Bearer <token>` metadata, checked like
//! the HTTP API's header ([`crate::auth`]): missing or unknown token
//! `UNAUTHENTICATED`, another tenant's data `PERMISSION_DENIED`, a bad field
//! `INVALID_ARGUMENT` with a message naming the field.

use axum::http::StatusCode;
use tidemark_proto::v1::billing_server::{Billing, BillingServer};
use tidemark_proto::v1::{
    GetInvoiceRequest, Invoice, ListInvoicesRequest, ListInvoicesResponse, QueryUsageRequest, QueryUsageResponse,
    UsageRow,
};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::api::{ApiError, ApiState};
use crate::auth::{Auth, Caller};
use crate::quantity::Quantity;
use crate::query::{self, ParamError, UsageParams};
use crate::store::Store;

/// The billing gRPC service over the API's state.
#[derive(Debug, Clone)]
pub struct BillingService {
    store: Store,
    auth: Auth,
}

impl BillingService {
    pub fn new(state: &ApiState) -> BillingService {
        BillingService {
            store: state.store.clone(),
            auth: state.auth.clone(),
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
        self.caller(&request)?;
        Err(invoices_over_http())
    }

    async fn get_invoice(&self, request: Request<GetInvoiceRequest>) -> Result<Response<Invoice>, Status> {
        self.caller(&request)?;
        Err(invoices_over_http())
    }
}

fn invoices_over_http() -> Status {
    Status::unimplemented("invoices are served over HTTP for now (GET /v1/invoices on the billing HTTP API)")
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
