//! Who may read what from the billing API: bearer tokens with a scope, read
//! from a TOML file given with `--api-tokens`.
//!
//! ```toml
//! [[token]]
//! token = "a-long-random-admin-token"   # at least 16 characters
//! scope = "admin"                        # every tenant, and /v1/gaps
//!
//! [[token]]
//! token_env = "ACME_BILLING_TOKEN"       # or read the token from this environment variable
//! scope = "tenant:acme"                  # acme's data only
//! ```
//!
//! With a tokens file, every HTTP request and gRPC call must present
//! `Authorization: Bearer <token>` (missing or unknown: 401 /
//! `UNAUTHENTICATED`); a tenant token reading another tenant's data gets
//! 403 / `PERMISSION_DENIED`. Tokens are kept as SHA-256 digests only.
//!
//! **Without a tokens file every caller is admin.** That is for local use
//! (`tidemark dev` on a laptop); anything reachable by others needs
//! `--api-tokens`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tidemark_core::ids::validate_name;

use crate::api::ApiError;

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Why a tokens file was refused.
#[derive(Debug, Error)]
pub enum TokensError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {reason}")]
    Syntax { path: String, reason: String },
    #[error("{path}: key {key}: {reason}")]
    Key { path: String, key: String, reason: String },
}

/// Who is calling, as their token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// May read every tenant and the cross-tenant views (gaps).
    Admin,
    /// May read this tenant's data only.
    Tenant(String),
}

impl Caller {
    /// `Ok` if the caller may read `tenant`'s data, else a 403.
    pub fn may_read(&self, tenant: &str) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(own) if own == tenant => Ok(()),
            Caller::Tenant(own) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this token may read tenant {own:?} only, not {tenant:?}"),
            )),
        }
    }

    /// `Ok` for an admin token, else a 403.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant(own) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this needs an admin token; this token may read tenant {own:?} only"),
            )),
        }
    }

    /// The one tenant a tenant token is limited to; `None` for admin.
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Admin => None,
            Caller::Tenant(t) => Some(t),
        }
    }
}

type Digest32 = [u8; 32];

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// The tokens of a `--api-tokens` file, as digests with their scopes.
#[derive(Debug, Default)]
pub struct ApiTokens {
    callers: HashMap<Digest32, Caller>,
}

impl ApiTokens {
    /// Reads and parses `path`, taking `token_env` values from the process environment.
    pub fn load(path: &Path) -> Result<ApiTokens, TokensError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: name.clone(),
            source,
        })?;
        ApiTokens::parse(&text, &name, |var| std::env::var(var).ok())
    }

    /// Parses the file's text; `path` only names it in errors and `env`
    /// looks up `token_env` variables.
    pub fn parse(text: &str, path: &str, env: impl Fn(&str) -> Option<String>) -> Result<ApiTokens, TokensError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| TokensError::Syntax {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        let key_error = |key: String, reason: String| TokensError::Key {
            path: path.to_owned(),
            key,
            reason,
        };
        if let Some(other) = table.keys().find(|k| *k != "token") {
            return Err(key_error(
                other.clone(),
                "unknown key; the file holds [[token]] entries only".into(),
            ));
        }
        let entries = match table.get("token") {
            Some(toml::Value::Array(entries)) if !entries.is_empty() => entries,
            Some(toml::Value::Array(_)) | None => {
                return Err(key_error(
                    "token".into(),
                    "no [[token]] entries; give at least one (with scope = \"admin\" to read everything)".into(),
                ));
            }
            Some(_) => return Err(key_error("token".into(), "expected [[token]] entries".into())),
        };
        let mut callers = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let at = |field: &str| format!("token[{i}].{field}");
            let Some(entry) = entry.as_table() else {
                return Err(key_error(format!("token[{i}]"), "expected a table".into()));
            };
            if let Some(other) = entry
                .keys()
                .find(|k| !matches!(k.as_str(), "token" | "token_env" | "scope"))
            {
                return Err(key_error(
                    at(other),
                    "unknown key; known: token, token_env, scope".into(),
                ));
            }
            let string = |field: &str| -> Result<Option<&str>, TokensError> {
                match entry.get(field) {
                    None => Ok(None),
                    Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
                    Some(_) => Err(key_error(at(field), "expected a string".into())),
                }
            };
            let token = match (string("token")?, string("token_env")?) {
                (Some(token), None) => token.to_owned(),
                (None, Some(var)) => env(var).ok_or_else(|| {
                    key_error(
                        at("token_env"),
                        format!("environment variable {var} is not set (or not UTF-8)"),
                    )
                })?,
                (Some(_), Some(_)) => {
                    return Err(key_error(at("token"), "give token or token_env, not both".into()));
                }
                (None, None) => return Err(key_error(at("token"), "missing; give token or token_env".into())),
            };
            let token_key = if entry.contains_key("token") {
                "token"
            } else {
                "token_env"
            };
            if token.chars().count() < MIN_TOKEN_LEN {
                return Err(key_error(
                    at(token_key),
                    format!(
                        "the token is {} characters, fewer than the {MIN_TOKEN_LEN} required",
                        token.chars().count()
                    ),
                ));
            }
            let scope = string("scope")?
                .ok_or_else(|| key_error(at("scope"), "missing; give \"admin\" or \"tenant:<tenant>\"".into()))?;
            let caller = parse_scope(scope).map_err(|reason| key_error(at("scope"), reason))?;
            match callers.entry(digest(&token)) {
                Entry::Occupied(_) => {
                    return Err(key_error(at(token_key), "the same token is listed twice".into()));
                }
                Entry::Vacant(slot) => {
                    slot.insert(caller);
                }
            }
        }
        Ok(ApiTokens { callers })
    }

    /// The caller `token` stands for, if it is known.
    pub fn caller(&self, token: &str) -> Option<&Caller> {
        self.callers.get(&digest(token))
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.callers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }
}

fn parse_scope(scope: &str) -> Result<Caller, String> {
    if scope == "admin" {
        return Ok(Caller::Admin);
    }
    match scope.strip_prefix("tenant:") {
        Some(tenant) => validate_name(tenant)
            .map(|()| Caller::Tenant(tenant.to_owned()))
            .map_err(|e| format!("tenant {e}")),
        None => Err(format!("{scope:?} is not \"admin\" or \"tenant:<tenant>\"")),
    }
}

/// How callers are recognized: by a tokens file, or not at all (everyone is admin).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Option<Arc<ApiTokens>>,
}

impl Auth {
    /// No tokens: every caller is [`Caller::Admin`]. For local use only.
    pub fn open() -> Auth {
        Auth { tokens: None }
    }

    pub fn with_tokens(tokens: ApiTokens) -> Auth {
        Auth {
            tokens: Some(Arc::new(tokens)),
        }
    }

    /// Whether callers must present a token.
    pub fn requires_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// The caller behind an `Authorization` header value (`None`: no header).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        let Some(tokens) = &self.tokens else {
            return Ok(Caller::Admin);
        };
        let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, message);
        let value =
            authorization.ok_or_else(|| unauthorized("missing bearer token: send Authorization: Bearer <token>"))?;
        let token = bearer(value).ok_or_else(|| unauthorized("the Authorization header is not \"Bearer <token>\""))?;
        tokens
            .caller(token)
            .cloned()
            .ok_or_else(|| unauthorized("unknown token"))
    }
}

/// The token of an `Authorization: Bearer <token>` value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl<S> FromRequestParts<S> for Caller
where
    Auth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Caller, ApiError> {
        let authorization = match parts.headers.get(header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "the Authorization header is not ASCII"))?,
            ),
        };
        Auth::from_ref(state).caller(authorization)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[token]]
token = "admin-token-000001"
scope = "admin"

[[token]]
token = "acme-token-0000001"
scope = "tenant:acme"

[[token]]
token_env = "GLOBEX_TOKEN"
scope = "tenant:globex"
"#;

    fn env(var: &str) -> Option<String> {
        (var == "GLOBEX_TOKEN").then(|| "globex-token-000001".to_owned())
    }

    #[test]
    fn tokens_map_to_their_scopes() {
        let tokens = ApiTokens::parse(FILE, "api-tokens.toml", env).expect("valid");
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens.caller("admin-token-000001"), Some(&Caller::Admin));
        assert_eq!(
            tokens.caller("acme-token-0000001"),
            Some(&Caller::Tenant("acme".into()))
        );
        assert_eq!(
            tokens.caller("globex-token-000001"),
            Some(&Caller::Tenant("globex".into()))
        );
        assert_eq!(tokens.caller("acme-token-0000002"), None);
    }

    #[test]
    fn bad_files_name_the_file_key_and_reason() {
        let entry = |body: &str| format!("[[token]]\n{body}\n");
        let cases = [
            (
                entry("token = \"short\"\nscope = \"admin\""),
                "t.toml: key token[0].token: the token is 5 characters, fewer than the 16 required",
            ),
            (
                entry("token = \"0123456789abcdef\"\nscope = \"root\""),
                "t.toml: key token[0].scope: \"root\" is not \"admin\" or \"tenant:<tenant>\"",
            ),
            (
                entry("token = \"0123456789abcdef\"\nscope = \"tenant:a b\""),
                "t.toml: key token[0].scope: tenant ",
            ),
            (
                entry("token = \"0123456789abcdef\""),
                "t.toml: key token[0].scope: missing",
            ),
            (entry("scope = \"admin\""), "t.toml: key token[0].token: missing"),
            (
                entry("token = \"0123456789abcdef\"\ntoken_env = \"X\"\nscope = \"admin\""),
                "t.toml: key token[0].token: give token or token_env, not both",
            ),
            (
                entry("token_env = \"UNSET_VAR\"\nscope = \"admin\""),
                "t.toml: key token[0].token_env: environment variable UNSET_VAR is not set",
            ),
            (
                entry("token = 12\nscope = \"admin\""),
                "t.toml: key token[0].token: expected a string",
            ),
            (
                entry("token = \"0123456789abcdef\"\nscope = \"admin\"\nname = \"x\""),
                "t.toml: key token[0].name: unknown key",
            ),
            (
                format!(
                    "{}{}",
                    entry("token = \"0123456789abcdef\"\nscope = \"admin\""),
                    entry("token = \"0123456789abcdef\"\nscope = \"tenant:acme\"")
                ),
                "t.toml: key token[1].token: the same token is listed twice",
            ),
            ("tokens = []".to_owned(), "t.toml: key tokens: unknown key"),
            (String::new(), "t.toml: key token: no [[token]] entries"),
            (
                "token = \"0123456789abcdef\"".to_owned(),
                "t.toml: key token: expected [[token]]",
            ),
            ("[[token]\n".to_owned(), "t.toml: not valid TOML"),
        ];
        for (text, want) in cases {
            let err = ApiTokens::parse(&text, "t.toml", env).expect_err(&text).to_string();
            assert!(err.starts_with(want), "{text:?}:\n got {err}\nwant {want}");
        }
    }

    #[test]
    fn load_names_a_missing_file() {
        let err = ApiTokens::load(Path::new("/nonexistent/api-tokens.toml")).expect_err("missing");
        assert!(
            err.to_string().starts_with("/nonexistent/api-tokens.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn callers_come_from_the_authorization_header() {
        let auth = Auth::with_tokens(ApiTokens::parse(FILE, "t.toml", env).expect("valid"));
        let status = |header: Option<&str>| auth.caller(header).map_err(|e| e.status());
        assert_eq!(status(Some("Bearer admin-token-000001")), Ok(Caller::Admin));
        assert_eq!(
            status(Some("bearer  acme-token-0000001 ")),
            Ok(Caller::Tenant("acme".into()))
        );
        assert_eq!(status(None), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(
            status(Some("Bearer nope-nope-nope-nope")),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(status(Some("Basic admin-token-000001")), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(status(Some("Bearer ")), Err(StatusCode::UNAUTHORIZED));
        // Without a tokens file, everyone is admin.
        assert_eq!(Auth::open().caller(None).map_err(|e| e.status()), Ok(Caller::Admin));
    }

    #[test]
    fn tenant_tokens_read_their_own_tenant_only() {
        let acme = Caller::Tenant("acme".into());
        assert!(acme.may_read("acme").is_ok());
        assert_eq!(
            acme.may_read("globex").map_err(|e| e.status()),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(acme.require_admin().map_err(|e| e.status()), Err(StatusCode::FORBIDDEN));
        assert!(Caller::Admin.may_read("globex").is_ok());
        assert!(Caller::Admin.require_admin().is_ok());
    }
}
