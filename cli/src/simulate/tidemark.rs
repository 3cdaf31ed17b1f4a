//! Tidemark's own autoscaler in the simulator: the policy file, read as the
//! collector reads it, and the real `ServiceScaler` behind the engine's
//! [`Scaler`] interface, asked to decide after every report (the collector
//! decides on every batch) and on a 500 ms tick (as the collector does, so
//! that silence is noticed too). Every report reaches it, draining
//! instances' and stopping instances' last ones included, as the sidecars
//! send them.

use std::path::Path;

use tidemark_collector::autoscaler::load::Observation;
use tidemark_collector::autoscaler::policy::{Metric, Policy, PolicySpec};
use tidemark_collector::autoscaler::scaler::ServiceScaler;

use super::engine::{Report, Scaler, View};

/// The simulated clock starts here on the scaler's clock (µs since the Unix
/// epoch: 2023-11-14T22:13:20Z), so that the scaler sees plausible times.
pub const EPOCH_MICROS: i64 = 1_700_000_000_000_000;

/// The collector's autoscaler decides on every batch and on this tick.
const TICK_MICROS: i64 = 500_000;

/// Keys of a service's table that configure the decision hooks, not the policy.
const HOOK_KEYS: [&str; 3] = ["webhook", "exec", "local"];

/// Why the policy file cannot be used: the file, the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum PolicyFileError {
    #[error("policy file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("policy file {path}: key `{key}`: {reason}")]
    Key { path: String, key: String, reason: String },
}

/// Reads the policy file at `path` and resolves the policy of `service`
/// (by default the only service, or `[defaults]` alone when there are no
/// services). Returns the service's name (`"defaults"` for none) and its policy.
pub fn load_policy(path: &Path, service: Option<&str>) -> Result<(String, Policy), PolicyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let looked_at = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        PolicyFileError::File {
            path: shown.clone(),
            reason: format!("cannot read it (looked at {}): {e}", looked_at.display()),
        }
    })?;
    resolve_policy(&shown, &text, service)
}

/// [`load_policy`] over the file's text; `path` names it in errors.
pub fn resolve_policy(path: &str, text: &str, service: Option<&str>) -> Result<(String, Policy), PolicyFileError> {
    let file_error = |reason: String| PolicyFileError::File {
        path: path.to_owned(),
        reason,
    };
    let key_error = |key: String, reason: String| PolicyFileError::Key {
        path: path.to_owned(),
        key,
        reason,
    };
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_error(format!("not valid TOML: {}", e.message().trim())))?;
    if let Some(key) = table.keys().find(|k| !matches!(k.as_str(), "defaults" | "services")) {
        return Err(key_error(
            key.clone(),
            "unknown key; a policy file has `[defaults]` and `[services.<name>]` tables".into(),
        ));
    }
    let defaults = match table.remove("defaults") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(key_error("defaults".into(), "must be a table".into())),
    };
    let services = match table.remove("services") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(key_error("services".into(), "must be a table of services".into())),
    };
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    let (name, service_table) = match service {
        Some(name) => match services.get(name) {
            Some(toml::Value::Table(t)) => (name.to_owned(), t.clone()),
            Some(_) => return Err(key_error(format!("services.{name}"), "must be a table".into())),
            None => {
                return Err(file_error(format!(
                    "no service `{name}` (--service); the file has {}",
                    if names.is_empty() {
                        "no [services.<name>] tables".to_owned()
                    } else {
                        format!("services: {}", names.join(", "))
                    }
                )));
            }
        },
        None => match names[..] {
            [] => ("defaults".to_owned(), toml::Table::new()),
            [only] => match services.get(only) {
                Some(toml::Value::Table(t)) => (only.to_owned(), t.clone()),
                _ => return Err(key_error(format!("services.{only}"), "must be a table".into())),
            },
            _ => {
                return Err(file_error(format!(
                    "it has several services ({}): choose one with --service",
                    names.join(", ")
                )));
            }
        },
    };
    let spec = |mut table: toml::Table, prefix: &str| -> Result<PolicySpec, PolicyFileError> {
        for key in HOOK_KEYS {
            table.remove(key);
        }
        toml::Value::Table(table).try_into::<PolicySpec>().map_err(|e| {
            let message = e.message().trim().to_owned();
            let key = e
                .message()
                .split('`')
                .nth(1)
                .filter(|_| message.starts_with("unknown field"))
                .map_or_else(|| prefix.to_owned(), |k| format!("{prefix}.{k}"));
            key_error(key, message)
        })
    };
    let defaults_spec = spec(defaults, "defaults")?;
    let service_prefix = format!("services.{name}");
    let service_spec = spec(service_table, &service_prefix)?;
    let policy = Policy::resolve(&defaults_spec, &service_spec).map_err(|e| {
        // The service's key wins over the default's: name where the value came from.
        let in_service = toml_has(text, &service_prefix, e.key);
        let table = if in_service {
            service_prefix.as_str()
        } else {
            "defaults"
        };
        key_error(format!("{table}.{}", e.key), e.reason)
    })?;
    Ok((name, policy))
}

/// Whether the service's table sets `key` (for naming where a bad value came from).
fn toml_has(text: &str, service_prefix: &str, key: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false;
    };
    let mut node = Some(&table);
    for part in service_prefix.split('.') {
        node = node.and_then(|t| t.get(part)).and_then(toml::Value::as_table);
    }
    node.is_some_and(|t| t.contains_key(key))
}

/// The policy's concurrency target per instance, if it has one.
pub fn concurrency_target(policy: &Policy) -> Option<f64> {
    policy
        .targets
        .iter()
        .find(|(m, _)| *m == Metric::Concurrency)
        .map(|(_, t)| *t)
}

/// Tidemark's `ServiceScaler`, fed every report and asked to decide after each.
#[derive(Debug)]
pub struct Tidemark {
    scaler: ServiceScaler,
    names: Vec<String>,
}

impl Tidemark {
    pub fn new(policy: Policy) -> Tidemark {
        Tidemark {
            scaler: ServiceScaler::new(policy, EPOCH_MICROS),
            names: Vec::new(),
        }
    }

    fn name_of(&mut self, instance: u32) -> &str {
        let i = instance as usize;
        while self.names.len() <= i {
            let next = self.names.len();
            self.names.push(format!("sim-{next:05}"));
        }
        &self.names[i]
    }
}

impl Scaler for Tidemark {
    fn name(&self) -> String {
        "tidemark".into()
    }

    /// The collector's autoscaler also decides on a 500 ms tick (docs/autoscaler.md).
    fn tick_micros(&self) -> Option<i64> {
        Some(TICK_MICROS)
    }

    fn on_tick(&mut self, view: &View<'_>) -> Option<u32> {
        Some(self.scaler.decide(EPOCH_MICROS + view.now_micros).desired)
    }

    fn on_report(&mut self, report: &Report, view: &View<'_>) -> Option<u32> {
        let report = *report;
        let name = self.name_of(report.instance).to_owned();
        let observation = Observation {
            instance: &name,
            at_micros: EPOCH_MICROS + report.at_micros,
            window_micros: report.window_micros,
            concurrency: report.concurrency,
            requests: report.requests,
            cpu_micros: report.cpu_micros,
        };
        self.scaler.observe(&observation);
        Some(self.scaler.decide(EPOCH_MICROS + view.now_micros).desired)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn service_over_defaults_and_hook_tables_ignored() {
        let text = r#"
            [defaults]
            targets = { concurrency = 20 }
            stable_window = "30s"

            [services.api]
            max_replicas = 8
            instance_startup = "3s"
            [services.api.webhook]
            url = "http://example.invalid/"
            [services.api.exec]
            command = "true"
        "#;
        let (name, policy) = resolve_policy("p.toml", text, None).expect("resolves");
        assert_eq!(name, "api");
        assert_eq!(policy.max_replicas, 8);
        assert_eq!(policy.stable_window, Duration::from_secs(30));
        assert_eq!(policy.instance_startup, Duration::from_secs(3));
        assert_eq!(concurrency_target(&policy), Some(20.0));
        let (name, policy) = resolve_policy("p.toml", "[defaults]\nmax_replicas = 3\n", None).expect("defaults alone");
        assert_eq!((name.as_str(), policy.max_replicas), ("defaults", 3));
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let two = "[services.a]\n[services.b]\n";
        let err = resolve_policy("p.toml", two, None).expect_err("ambiguous").to_string();
        assert!(err.contains("p.toml") && err.contains("--service"), "{err}");
        let err = resolve_policy("p.toml", two, Some("c"))
            .expect_err("no such")
            .to_string();
        assert!(err.contains("no service `c`") && err.contains("a, b"), "{err}");
        let err = resolve_policy("p.toml", "[services.a]\nmax_replica = 3\n", None)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("key `services.a.max_replica`"), "{err}");
        let err = resolve_policy("p.toml", "[services.a]\nmin_replicas = 5\nmax_replicas = 2\n", None)
            .expect_err("invalid")
            .to_string();
        assert!(
            err.starts_with("policy file p.toml: key `services.a.min_replicas`"),
            "{err}"
        );
        let err = resolve_policy("p.toml", "[defaults]\nhysteresis = 0.9\n", None)
            .expect_err("invalid default")
            .to_string();
        assert!(err.contains("key `defaults.hysteresis`"), "{err}");
        let err = resolve_policy("p.toml", "threads = 3\n", None)
            .expect_err("top level")
            .to_string();
        assert!(err.contains("key `threads`"), "{err}");
        let err = resolve_policy("p.toml", "[defaults\n", None)
            .expect_err("bad toml")
            .to_string();
        assert!(err.contains("not valid TOML"), "{err}");
    }
}
