//! Names that travel on the wire: services, instances, tenants, sessions.

use thiserror::Error;

/// Longest accepted service, instance or tenant name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The tenant of requests that name none.
pub const ANONYMOUS_TENANT: &str = "anonymous";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidName {
    #[error("is empty")]
    Empty,
    #[error("is {len} bytes long, more than the {MAX_NAME_LEN} allowed")]
    TooLong { len: usize },
    #[error("contains {found:?}; allowed are ASCII letters, digits and . _ - : @ /")]
    BadChar { found: char },
}

/// Checks a service, instance or tenant name: 1 to [`MAX_NAME_LEN`] bytes of
/// ASCII letters, digits and `. _ - : @ /`. These names end up in log keys,
/// database rows and metric labels, so nothing else is let in.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    if name.is_empty() {
        return Err(InvalidName::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(InvalidName::TooLong { len: name.len() });
    }
    match name.chars().find(|c| !is_name_char(*c)) {
        Some(found) => Err(InvalidName::BadChar { found }),
        None => Ok(()),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in ["acme", "tenant-42", "a.b_c:d@e/f", ANONYMOUS_TENANT] {
            assert_eq!(validate_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn refuses_empty_long_and_odd_names() {
        assert_eq!(validate_name(""), Err(InvalidName::Empty));
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            validate_name(&long),
            Err(InvalidName::TooLong { len: MAX_NAME_LEN + 1 })
        );
        assert_eq!(validate_name(&"x".repeat(MAX_NAME_LEN)), Ok(()));
        assert_eq!(validate_name("a b"), Err(InvalidName::BadChar { found: ' ' }));
        assert_eq!(validate_name("é"), Err(InvalidName::BadChar { found: 'é' }));
    }
}
