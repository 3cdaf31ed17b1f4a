//! Which sidecars may report for which services: bearer tokens per service,
//! read from a TOML file given with `--ingest-tokens`.
//!
//! ```toml
//! checkout = "a-long-random-token"
//! search = ["current-token", "next-token"]   # several, to rotate without downtime
//! ```
//!
//! With a tokens file, a stream must present `authorization: Bearer <token>`
//! and may only report for the services that token is listed under; a
//! service missing from the file is unknown and refused. Tokens are kept as
//! SHA-256 digests, so a lookup takes the same time whatever the guess.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use thiserror::Error;
use tidemark_core::ids::validate_name;

/// Shortest token accepted: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

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
    #[error("{path}: key {key:?}: {reason}")]
    Key { path: String, key: String, reason: String },
}

type Digest32 = [u8; 32];

/// Services each token may report for.
#[derive(Debug, Default)]
pub struct IngestTokens {
    services_by_token: HashMap<Digest32, Arc<BTreeSet<String>>>,
}

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

impl IngestTokens {
    pub fn load(path: &Path) -> Result<IngestTokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        IngestTokens::parse(&text, &path.display().to_string())
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<IngestTokens, TokensError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| TokensError::Syntax {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        let key_error = |key: &str, reason: String| TokensError::Key {
            path: path.to_owned(),
            key: key.to_owned(),
            reason,
        };
        let mut services: HashMap<Digest32, BTreeSet<String>> = HashMap::new();
        for (service, value) in &table {
            validate_name(service).map_err(|e| key_error(service, format!("service name {e}")))?;
            let tokens: Vec<&str> = match value {
                toml::Value::String(token) => vec![token.as_str()],
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().ok_or("every token must be a string"))
                    .collect::<Result<_, _>>()
                    .map_err(|reason| key_error(service, reason.to_owned()))?,
                _ => return Err(key_error(service, "expected a token string or an array of them".into())),
            };
            if tokens.is_empty() {
                return Err(key_error(service, "no token given".into()));
            }
            for token in tokens {
                if token.len() < MIN_TOKEN_LEN {
                    return Err(key_error(
                        service,
                        format!(
                            "a token is {} characters, fewer than the {MIN_TOKEN_LEN} required",
                            token.len()
                        ),
                    ));
                }
                services.entry(digest(token)).or_default().insert(service.clone());
            }
        }
        Ok(IngestTokens {
            services_by_token: services.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        })
    }

    /// The services `token` may report for, if it is known.
    pub fn services_for(&self, token: &str) -> Option<Arc<BTreeSet<String>>> {
        self.services_by_token.get(&digest(token)).cloned()
    }
}

/// The bearer token of a request's `authorization` metadata, if any.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
checkout = "checkout-token-0001"
search = ["search-token-00001", "shared-token-00001"]
billing = "shared-token-00001"
"#;

    #[test]
    fn tokens_map_to_their_services() {
        let tokens = IngestTokens::parse(FILE, "tokens.toml").expect("valid");
        let services = |t: &str| tokens.services_for(t).map(|s| s.iter().cloned().collect::<Vec<_>>());
        assert_eq!(services("checkout-token-0001"), Some(vec!["checkout".to_owned()]));
        assert_eq!(services("search-token-00001"), Some(vec!["search".to_owned()]));
        assert_eq!(
            services("shared-token-00001"),
            Some(vec!["billing".to_owned(), "search".to_owned()])
        );
        assert_eq!(services("checkout-token-0002"), None);
    }

    #[test]
    fn bad_files_name_the_file_key_and_reason() {
        let cases = [
            (
                "checkout = \"short\"",
                "tokens.toml: key \"checkout\": a token is 5 characters",
            ),
            ("checkout = 5", "tokens.toml: key \"checkout\": expected a token string"),
            ("checkout = []", "tokens.toml: key \"checkout\": no token given"),
            (
                "\"bad name\" = \"0123456789abcdef\"",
                "tokens.toml: key \"bad name\": service name",
            ),
            (
                "checkout = [1]",
                "tokens.toml: key \"checkout\": every token must be a string",
            ),
            ("checkout = ", "tokens.toml: not valid TOML"),
        ];
        for (text, want) in cases {
            let err = IngestTokens::parse(text, "tokens.toml").expect_err(text).to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn bearer_reads_the_authorization_header() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&metadata), None);
        metadata.insert("authorization", "Bearer abc".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), Some("abc"));
        metadata.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert_eq!(bearer(&metadata), None);
    }
}
