//! Walks a parsed TOML document keeping, for every value, its key path
//! (`meters.requests.tiers[1].up_to`) and its line, so that each complaint
//! about a plan names both. Tables list the keys they know, and any other
//! key is refused.

use std::fmt;

use rust_decimal::Decimal;
use toml::de::{DeTable, DeValue};

use super::exact;

/// A dotted key path; keys that are not bare TOML keys are quoted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn key(&self, key: &str) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Segment::Key(key.to_owned()));
        path
    }

    pub fn index(&self, index: usize) -> KeyPath {
        let mut path = self.clone();
        path.0.push(Segment::Index(index));
        path
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare =
                        !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if bare { f.write_str(key)? } else { write!(f, "{key:?}")? }
                }
            }
        }
        Ok(())
    }
}

/// What is wrong, and where. The loader adds the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: KeyPath,
    /// 1-based line of the offending key or value, when there is one.
    pub line: Option<usize>,
    pub reason: String,
}

/// The 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count()
}

/// A TOML table being read.
#[derive(Debug, Clone)]
pub struct Table<'a, 'i> {
    text: &'a str,
    path: KeyPath,
    /// Where the table is named (its header or key); `None` for the root.
    line: Option<usize>,
    entries: &'a DeTable<'i>,
}

/// A TOML value being read.
#[derive(Debug, Clone)]
pub struct Value<'a, 'i> {
    text: &'a str,
    path: KeyPath,
    line: usize,
    value: &'a DeValue<'i>,
}

impl<'a, 'i> Table<'a, 'i> {
    /// The document's root table.
    pub fn root(text: &'a str, root: &'a DeTable<'i>) -> Self {
        Table {
            text,
            path: KeyPath::default(),
            line: None,
            entries: root,
        }
    }

    /// A problem with a key this table lacks.
    pub fn missing(&self, key: &str, reason: impl Into<String>) -> Problem {
        Problem {
            key: self.path.key(key),
            line: self.line,
            reason: reason.into(),
        }
    }

    /// Refuses any key not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), Problem> {
        match self.entries().into_iter().find(|(key, _)| !known.contains(key)) {
            None => Ok(()),
            Some((key, value)) => Err(value.problem(format!(
                "unknown key {key:?} in {}; known keys are: {}",
                self.describe(),
                known.join(", ")
            ))),
        }
    }

    fn describe(&self) -> String {
        if self.path.0.is_empty() {
            "the plan".to_owned()
        } else {
            format!("`{}`", self.path)
        }
    }

    /// The entries, in the order the file writes them.
    pub fn entries(&self) -> Vec<(&'a str, Value<'a, 'i>)> {
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_by_key(|(key, _)| key.span().start);
        entries
            .into_iter()
            .map(|(key, value)| {
                let name: &'a str = key.get_ref().as_ref();
                let value = Value {
                    text: self.text,
                    path: self.path.key(name),
                    line: line_of(self.text, key.span().start),
                    value: value.get_ref(),
                };
                (name, value)
            })
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<Value<'a, 'i>> {
        self.entries().into_iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The value of a key the table must have; `what` says what it is for.
    pub fn required(&self, key: &str, what: &str) -> Result<Value<'a, 'i>, Problem> {
        self.get(key)
            .ok_or_else(|| self.missing(key, format!("missing; {what}")))
    }
}

impl<'a, 'i> Value<'a, 'i> {
    pub fn problem(&self, reason: impl Into<String>) -> Problem {
        Problem {
            key: self.path.clone(),
            line: Some(self.line),
            reason: reason.into(),
        }
    }

    fn kind(&self) -> &'static str {
        match self.value {
            DeValue::String(_) => "a string",
            DeValue::Integer(_) => "an integer",
            DeValue::Float(_) => "a float",
            DeValue::Boolean(_) => "a boolean",
            DeValue::Datetime(_) => "a datetime",
            DeValue::Array(_) => "an array",
            DeValue::Table(_) => "a table",
        }
    }

    fn wrong_type(&self, expected: &str) -> Problem {
        self.problem(format!("expected {expected}, found {}", self.kind()))
    }

    pub fn string(&self) -> Result<&'a str, Problem> {
        match self.value {
            DeValue::String(s) => Ok(s.as_ref()),
            _ => Err(self.wrong_type("a string")),
        }
    }

    /// An integer written in decimal.
    pub fn integer(&self) -> Result<i64, Problem> {
        match self.value {
            DeValue::Integer(i) if i.radix() == 10 => i
                .as_str()
                .parse()
                .map_err(|_| self.problem(format!("{} does not fit a 64-bit integer", i.as_str()))),
            DeValue::Integer(_) => Err(self.problem("write the integer in decimal")),
            _ => Err(self.wrong_type("an integer")),
        }
    }

    /// A decimal >= 0, written as a string (`"0.0000166667"`) or as a TOML
    /// integer (`1_000_000`). TOML floats are refused: other tools read
    /// them as binary floating point, which cannot hold most prices.
    pub fn decimal(&self) -> Result<Decimal, Problem> {
        let text = match self.value {
            DeValue::String(s) => s.as_ref(),
            DeValue::Integer(i) if i.radix() == 10 => i.as_str(),
            DeValue::Integer(_) => return Err(self.problem("write the number in decimal")),
            DeValue::Float(f) => {
                return Err(self.problem(format!(
                    "{} is a TOML float; write decimals as strings, e.g. \"{}\", so that they stay exact",
                    f.as_str(),
                    f.as_str()
                )));
            }
            _ => return Err(self.wrong_type("a decimal number as a string (\"0.20\") or an integer")),
        };
        exact::parse_non_negative(text).map_err(|reason| self.problem(reason))
    }

    /// Whether this value is the string `text`.
    pub fn is_string(&self, text: &str) -> bool {
        matches!(self.value, DeValue::String(s) if s.as_ref() == text)
    }

    pub fn table(&self) -> Result<Table<'a, 'i>, Problem> {
        match self.value {
            DeValue::Table(entries) => Ok(Table {
                text: self.text,
                path: self.path.clone(),
                line: Some(self.line),
                entries,
            }),
            _ => Err(self.wrong_type("a table")),
        }
    }

    /// The items of an array, each with its own path (`tiers[1]`) and line.
    pub fn array(&self) -> Result<Vec<Value<'a, 'i>>, Problem> {
        match self.value {
            DeValue::Array(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(index, item)| Value {
                    text: self.text,
                    path: self.path.index(index),
                    line: line_of(self.text, item.span().start),
                    value: item.get_ref(),
                })
                .collect()),
            _ => Err(self.wrong_type("an array")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_read_like_toml() {
        let path = KeyPath::default()
            .key("meters")
            .key("requests")
            .key("tiers")
            .index(1)
            .key("up_to");
        assert_eq!(path.to_string(), "meters.requests.tiers[1].up_to");
        let odd = KeyPath::default().key("meters").key("gpu.seconds").key("price");
        assert_eq!(odd.to_string(), "meters.\"gpu.seconds\".price");
        assert_eq!(KeyPath::default().to_string(), "");
    }

    #[test]
    fn lines_count_from_one() {
        let text = "a = 1\nb = 2\n";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 6), 2);
        assert_eq!(line_of(text, 999), 3);
    }
}
