//! Which tenant a request belongs to.
//!
//! Either a header names the tenant (default `x-tenant-id`), or an API-key
//! header is looked up in a key file (TOML, `[keys]` table of key = tenant).
//! No header, or an unknown key: `anonymous`. A name that breaks the naming
//! rules, or starts with `_` (reserved for `_overflow` and `_idle`), is
//! counted as invalid and billed to `anonymous`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use http::{HeaderMap, HeaderName};
use tidemark_core::ids::validate_name;

/// Where the tenant comes from.
#[derive(Debug, Clone)]
pub enum TenantSource {
    Header(HeaderName),
    ApiKeys {
        header: HeaderName,
        keys: HashMap<String, String>,
    },
}

/// The tenant of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved<'a> {
    Anonymous,
    Tenant(&'a str),
    /// A tenant was named but the name is not acceptable.
    Invalid,
}

impl Resolved<'_> {
    pub fn name(&self) -> Option<&str> {
        match self {
            Resolved::Tenant(name) => Some(name),
            Resolved::Anonymous | Resolved::Invalid => None,
        }
    }
}

/// Acceptable as a tenant named by a request.
pub fn is_valid_tenant(name: &str) -> bool {
    validate_name(name).is_ok() && !name.starts_with('_')
}

impl TenantSource {
    pub fn resolve<'a>(&'a self, headers: &'a HeaderMap) -> Resolved<'a> {
        match self {
            TenantSource::Header(header) => match headers.get(header).map(|v| v.to_str()) {
                None => Resolved::Anonymous,
                Some(Ok(name)) if is_valid_tenant(name) => Resolved::Tenant(name),
                Some(_) => Resolved::Invalid,
            },
            TenantSource::ApiKeys { header, keys } => match headers.get(header).and_then(|v| v.to_str().ok()) {
                Some(key) => keys.get(key).map_or(Resolved::Anonymous, |t| Resolved::Tenant(t)),
                None => Resolved::Anonymous,
            },
        }
    }
}

/// Why the API key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("API key file {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API key file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads an API key file:
///
/// ```toml
/// [keys]
/// "k-7f3a9" = "acme"
/// ```
pub fn load_keys(path: &Path) -> Result<HashMap<String, String>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_keys(&text).map_err(|reason| KeyFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

fn parse_keys(text: &str) -> Result<HashMap<String, String>, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message()))?;
    let mut keys = HashMap::new();
    for (section, value) in table {
        if section != "keys" {
            return Err(format!("key `{section}`: unknown key; the file holds one [keys] table"));
        }
        let toml::Value::Table(entries) = value else {
            return Err("key `keys`: must be a table of key = tenant".into());
        };
        for (key, tenant) in entries {
            let toml::Value::String(tenant) = tenant else {
                return Err(format!("key `keys.{key}`: the tenant must be a string"));
            };
            if !is_valid_tenant(&tenant) {
                return Err(format!(
                    "key `keys.{key}`: tenant {tenant:?} must be 1 to 128 of A-Z a-z 0-9 . _ - : @ / and not start with _"
                ));
            }
            keys.insert(key, tenant);
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn header_names_the_tenant() {
        let source = TenantSource::Header(HeaderName::from_static("x-tenant-id"));
        assert_eq!(
            source.resolve(&headers(&[("x-tenant-id", "acme")])),
            Resolved::Tenant("acme")
        );
        assert_eq!(source.resolve(&headers(&[])), Resolved::Anonymous);
        assert_eq!(source.resolve(&headers(&[("x-tenant-id", "a b")])), Resolved::Invalid);
        assert_eq!(source.resolve(&headers(&[("x-tenant-id", "_idle")])), Resolved::Invalid);
        assert_eq!(source.resolve(&headers(&[("x-tenant-id", "")])), Resolved::Invalid);
    }

    #[test]
    fn api_keys_map_to_tenants() {
        let keys = parse_keys("[keys]\n\"k-1\" = \"acme\"\n\"k-2\" = \"globex\"\n").unwrap();
        let source = TenantSource::ApiKeys {
            header: HeaderName::from_static("x-api-key"),
            keys,
        };
        assert_eq!(
            source.resolve(&headers(&[("x-api-key", "k-2")])),
            Resolved::Tenant("globex")
        );
        assert_eq!(source.resolve(&headers(&[("x-api-key", "nope")])), Resolved::Anonymous);
        assert_eq!(
            source.resolve(&headers(&[("x-tenant-id", "acme")])),
            Resolved::Anonymous,
            "with keys, the tenant header is not trusted"
        );
    }

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        assert!(parse_keys("[keys]\nk = 1\n").unwrap_err().contains("keys.k"));
        assert!(parse_keys("[keys]\nk = \"_x\"\n").unwrap_err().contains("keys.k"));
        assert!(parse_keys("[other]\n").unwrap_err().contains("`other`"));
        assert!(parse_keys("keys = 3\n").unwrap_err().contains("table"));
        assert!(parse_keys("[keys\n").unwrap_err().contains("not valid TOML"));
        let err = load_keys(Path::new("/nonexistent/keys.toml")).unwrap_err().to_string();
        assert!(
            err.starts_with("API key file /nonexistent/keys.toml: cannot read it"),
            "{err}"
        );
    }
}
