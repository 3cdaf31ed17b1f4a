//! The request every connection sends: target URL and extra headers.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Uri};
use http_body_util::Empty;

/// A `--header` that cannot be sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidHeader {
    #[error("expected `name: value`, found no `:` in {0:?}")]
    NoColon(String),
    #[error("{0:?} is not a valid header name")]
    Name(String),
    #[error("the value of {0:?} is not a valid header value")]
    Value(String),
}

/// A `--target` that cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidTarget {
    #[error("{0} is not an http:// URL (https is not supported)")]
    Scheme(Uri),
    #[error("{0} has no host")]
    NoHost(Uri),
}

/// Parses `name: value` (a clap value parser for `--header`).
pub fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), InvalidHeader> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| InvalidHeader::NoColon(text.to_owned()))?;
    let name = name.trim();
    let parsed_name = HeaderName::try_from(name).map_err(|_| InvalidHeader::Name(name.to_owned()))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|_| InvalidHeader::Value(name.to_owned()))?;
    Ok((parsed_name, value))
}

/// What to send, built once and copied for each request.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    path: Uri,
    headers: HeaderMap,
}

/// The target's host and port, as given (resolved separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub port: u16,
}

impl RequestTemplate {
    /// A `GET` of `target`'s path and query with a `Host` header and
    /// `headers` (a `Host` among them wins).
    pub fn new(
        target: &Uri,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<(RequestTemplate, Authority), InvalidTarget> {
        if target.scheme_str() != Some("http") {
            return Err(InvalidTarget::Scheme(target.clone()));
        }
        let authority = target
            .authority()
            .ok_or_else(|| InvalidTarget::NoHost(target.clone()))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(InvalidTarget::NoHost(target.clone()));
        }
        let path = target
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<Uri>()
            .map_err(|_| InvalidTarget::NoHost(target.clone()))?;
        let mut map = HeaderMap::new();
        let host_value =
            HeaderValue::try_from(authority.as_str()).map_err(|_| InvalidTarget::NoHost(target.clone()))?;
        map.insert(HOST, host_value);
        for (name, value) in headers {
            if name == HOST {
                map.insert(HOST, value.clone());
            } else {
                map.append(name.clone(), value.clone());
            }
        }
        let authority = Authority {
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(80),
        };
        Ok((RequestTemplate { path, headers: map }, authority))
    }

    pub fn request(&self) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.path.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }

    /// The request with `header` set to `value`, replacing the template's
    /// own values of that header (a trace row's tenant); `None` is [`RequestTemplate::request`].
    pub fn request_with(&self, header: Option<(&HeaderName, &HeaderValue)>) -> Request<Empty<Bytes>> {
        let mut request = self.request();
        if let Some((name, value)) = header {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        request
    }
}

/// Resolves the target's address once, before the run.
pub async fn resolve(authority: &Authority) -> std::io::Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host((authority.host.as_str(), authority.port)).await?;
    addrs.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} resolves to no address", authority.host),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_name_colon_value() {
        let (name, value) = parse_header("x-tenant-id: acme").unwrap();
        assert_eq!(name, "x-tenant-id");
        assert_eq!(value, "acme");
        let (name, value) = parse_header("  X-Trace :a:b:c  ").unwrap();
        assert_eq!(name, "x-trace");
        assert_eq!(value, "a:b:c");
        let (_, value) = parse_header("x-empty:").unwrap();
        assert_eq!(value, "");
    }

    #[test]
    fn refuses_broken_headers() {
        assert_eq!(
            parse_header("x-tenant-id acme"),
            Err(InvalidHeader::NoColon("x-tenant-id acme".into()))
        );
        assert_eq!(parse_header(": acme"), Err(InvalidHeader::Name("".into())));
        assert_eq!(
            parse_header("bad name: acme"),
            Err(InvalidHeader::Name("bad name".into()))
        );
        assert_eq!(
            parse_header("x-a: line\nbreak"),
            Err(InvalidHeader::Value("x-a".into()))
        );
    }

    #[test]
    fn builds_a_get_with_host_and_headers() {
        let target: Uri = "http://127.0.0.1:23000/items?id=7".parse().unwrap();
        let headers = [parse_header("x-tenant-id: acme").unwrap()];
        let (template, authority) = RequestTemplate::new(&target, &headers).unwrap();
        assert_eq!(
            authority,
            Authority {
                host: "127.0.0.1".into(),
                port: 23000
            }
        );
        let request = template.request();
        assert_eq!(request.method(), http::Method::GET);
        assert_eq!(request.uri(), "/items?id=7");
        assert_eq!(request.headers()[HOST], "127.0.0.1:23000");
        assert_eq!(request.headers()["x-tenant-id"], "acme");
    }

    #[test]
    fn defaults_path_and_port_and_lets_host_be_overridden() {
        let target: Uri = "http://[::1]".parse().unwrap();
        let headers = [parse_header("host: shop.example").unwrap()];
        let (template, authority) = RequestTemplate::new(&target, &headers).unwrap();
        assert_eq!(authority.host, "::1");
        assert_eq!(authority.port, 80);
        let request = template.request();
        assert_eq!(request.uri(), "/");
        assert_eq!(request.headers().get_all(HOST).iter().count(), 1);
        assert_eq!(request.headers()[HOST], "shop.example");
    }

    #[test]
    fn a_row_s_tenant_replaces_the_header_s_tenant() {
        let target: Uri = "http://127.0.0.1:23000/".parse().unwrap();
        let headers = [
            parse_header("x-tenant-id: acme").unwrap(),
            parse_header("x-other: kept").unwrap(),
        ];
        let (template, _) = RequestTemplate::new(&target, &headers).unwrap();
        let name = HeaderName::from_static("x-tenant-id");
        let beta = HeaderValue::from_static("beta");
        let request = template.request_with(Some((&name, &beta)));
        let tenants: Vec<_> = request.headers().get_all("x-tenant-id").iter().collect();
        assert_eq!(tenants, vec![&beta]);
        assert_eq!(request.headers()["x-other"], "kept");
        assert_eq!(template.request_with(None).headers()["x-tenant-id"], "acme");
    }

    #[test]
    fn refuses_other_schemes() {
        let target: Uri = "https://127.0.0.1/".parse().unwrap();
        assert!(matches!(
            RequestTemplate::new(&target, &[]),
            Err(InvalidTarget::Scheme(_))
        ));
        let target: Uri = "/just/a/path".parse().unwrap();
        assert!(RequestTemplate::new(&target, &[]).is_err());
    }
}
