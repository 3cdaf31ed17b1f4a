//! The HTTP client side of the billing API that `tidemark usage` and
//! `tidemark invoice` share: one request with a bearer token and a timeout,
//! and the API's JSON errors turned into one readable line.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// How long a call may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The API's JSON error, `{"error": ..., "parameter": ...}`.
#[derive(Debug, Deserialize)]
struct ApiError {
    error: String,
    parameter: Option<String>,
}

/// What the API said, on one line, with the parameter it named.
pub fn describe_error(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(ApiError {
            error,
            parameter: Some(p),
        }) => format!("billing API answered {status}: {error} (parameter {p})"),
        Ok(ApiError { error, parameter: None }) => format!("billing API answered {status}: {error}"),
        Err(_) => format!(
            "billing API answered {status}: {}",
            String::from_utf8_lossy(body).trim()
        ),
    }
}

/// Sends `method uri` accepting `accept`, with `token` as a bearer token;
/// the body of a 2xx answer, or an error saying what went wrong (`api` names
/// the API's address in it).
pub async fn call(
    method: Method,
    uri: &Uri,
    accept: &'static str,
    token: Option<&str>,
    api: &str,
) -> anyhow::Result<Bytes> {
    let mut request = Request::builder()
        .method(method)
        .uri(uri.clone())
        .header(ACCEPT, accept);
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .context("--token has characters not allowed in an HTTP header")?;
        request = request.header(AUTHORIZATION, value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .context("cannot build the request")?;
    let http = Client::builder(TokioExecutor::new()).build_http();
    let (status, body) = tokio::time::timeout(TIMEOUT, async {
        let response = http.request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .map_err(|_| anyhow::anyhow!("{uri}: no answer within {TIMEOUT:?}"))?
    .with_context(|| format!("cannot reach the billing API at {api}; check --api"))?;
    if !status.is_success() {
        bail!("{}", describe_error(status, &body));
    }
    Ok(body)
}
