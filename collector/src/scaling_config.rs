//! The scaling config file (`--scaling-config`): a policy per service and
//! the hooks that carry its decisions out.
//!
//! ```toml
//! [defaults]                      # policy keys for every service
//! stable_window = "60s"
//!
//! [services.checkout]             # policy keys for one service, over the defaults
//! targets = { concurrency = 10, rps = 200 }
//! max_replicas = 20
//!
//! [services.checkout.webhook]     # hooks: webhook, exec, local (see docs/hooks.md)
//! url = "http://deployer.internal/scale"
//! secret_env = "TIDEMARK_WEBHOOK_SECRET"
//! ```
//!
//! A service without a table scales with the defaults. Every error names the
//! file, the key and the reason.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;
use tidemark_core::ids::validate_name;

use crate::autoscaler::policy::{Policy, PolicySpec};
use crate::hooks::HooksSpec;

/// Keys of a service's table that configure hooks, not the policy.
const HOOK_KEYS: [&str; 3] = ["webhook", "exec", "local"];

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{path}: {key}: {reason}")]
pub struct ScalingConfigError {
    pub path: String,
    pub key: String,
    pub reason: String,
}

/// One service's section, resolved.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub policy: Policy,
    pub hooks: HooksSpec,
}

/// The whole file, resolved and validated. The default is no file: every
/// service scales by the built-in policy.
#[derive(Debug, Clone, Default)]
pub struct ScalingConfig {
    /// The policy of services the file does not name.
    pub default_policy: Policy,
    pub services: BTreeMap<String, ServiceConfig>,
}

impl ScalingConfig {
    pub fn load(path: &Path) -> Result<ScalingConfig, ScalingConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScalingConfigError {
            path: name.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        ScalingConfig::parse(&text, &name)
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &str) -> Result<ScalingConfig, ScalingConfigError> {
        let error = |key: String, reason: String| ScalingConfigError {
            path: path.to_owned(),
            key,
            reason,
        };
        let mut top: toml::Table = toml::from_str(text).map_err(|e| error("(syntax)".into(), e.to_string()))?;
        let defaults_table = take_table(&mut top, "defaults").map_err(|r| error("defaults".into(), r))?;
        let services_table = take_table(&mut top, "services").map_err(|r| error("services".into(), r))?;
        if let Some(key) = top.keys().next() {
            return Err(error(
                key.clone(),
                "unknown key: expected [defaults] or [services.<name>]".into(),
            ));
        }
        let defaults = PolicySpec::deserialize(toml::Value::Table(defaults_table))
            .map_err(|e| error("defaults".into(), e.to_string()))?;
        let default_policy = Policy::resolve(&defaults, &PolicySpec::default())
            .map_err(|e| error(format!("defaults.{}", e.key), e.reason))?;

        let mut services = BTreeMap::new();
        for (service, value) in services_table {
            let prefix = format!("services.{service}");
            validate_name(&service).map_err(|e| error(prefix.clone(), format!("service name {e}")))?;
            let toml::Value::Table(mut table) = value else {
                return Err(error(prefix, "expected a table".into()));
            };
            let mut hooks_table = toml::Table::new();
            for key in HOOK_KEYS {
                if let Some(hook) = table.remove(key) {
                    hooks_table.insert(key.into(), hook);
                }
            }
            let spec =
                PolicySpec::deserialize(toml::Value::Table(table)).map_err(|e| error(prefix.clone(), e.to_string()))?;
            let policy =
                Policy::resolve(&defaults, &spec).map_err(|e| error(format!("{prefix}.{}", e.key), e.reason))?;
            let hooks = HooksSpec::deserialize(toml::Value::Table(hooks_table))
                .map_err(|e| error(prefix.clone(), e.to_string()))?;
            hooks
                .validate()
                .map_err(|e| error(format!("{prefix}.{}", e.key), e.reason))?;
            services.insert(service, ServiceConfig { policy, hooks });
        }
        Ok(ScalingConfig {
            default_policy,
            services,
        })
    }

    /// The policy `service` scales by.
    pub fn policy_for(&self, service: &str) -> &Policy {
        self.services.get(service).map_or(&self.default_policy, |s| &s.policy)
    }
}

/// Removes `key` from `top` as a table; missing is an empty table.
fn take_table(top: &mut toml::Table, key: &str) -> Result<toml::Table, String> {
    match top.remove(key) {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(t)) => Ok(t),
        Some(_) => Err("expected a table".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::autoscaler::policy::Metric;

    const FILE: &str = r#"
[defaults]
stable_window = "30s"
max_replicas = 50

[services.checkout]
targets = { concurrency = 4, rps = 100 }
max_replicas = 20

[services.checkout.exec]
command = "kubectl scale deployment/{service} --replicas={replicas}"

[services.search]
scale_to_zero = true
"#;

    #[test]
    fn services_lay_over_defaults_and_hooks_are_split_off() {
        let config = ScalingConfig::parse(FILE, "scaling.toml").expect("valid");
        let checkout = &config.services["checkout"];
        assert_eq!(checkout.policy.max_replicas, 20);
        assert_eq!(checkout.policy.stable_window, Duration::from_secs(30));
        assert_eq!(
            checkout.policy.targets,
            vec![(Metric::Concurrency, 4.0), (Metric::Rps, 100.0)]
        );
        assert!(checkout.hooks.exec.is_some() && checkout.hooks.webhook.is_none());
        let search = config.policy_for("search");
        assert!(search.scale_to_zero);
        assert_eq!((search.min_replicas, search.max_replicas), (0, 50));
        let other = config.policy_for("unnamed");
        assert_eq!(other.max_replicas, 50);
        assert_eq!(other.stable_window, Duration::from_secs(30));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_reason() {
        let cases = [
            (
                "[defaults]\nstable_window = \"1s\"\n",
                "scaling.toml: defaults.panic_window: ",
            ),
            (
                "[defaults]\nbogus = 1\n",
                "scaling.toml: defaults: unknown field `bogus`",
            ),
            (
                "[services.a]\nmax_replicas = 0\n",
                "scaling.toml: services.a.max_replicas: ",
            ),
            (
                "[services.a]\nstable_window = \"soon\"\n",
                "scaling.toml: services.a: invalid duration \"soon\"",
            ),
            ("[services.\"a b\"]\n", "scaling.toml: services.a b: service name"),
            (
                "[services.a.exec]\ncommand = \"scale {nope}\"\n",
                "scaling.toml: services.a.exec.command: ",
            ),
            ("[servics.a]\n", "scaling.toml: servics: unknown key"),
            ("services = 3\n", "scaling.toml: services: expected a table"),
            ("[defaults\n", "scaling.toml: (syntax): "),
        ];
        for (text, want) in cases {
            let err = ScalingConfig::parse(text, "scaling.toml").expect_err(text).to_string();
            assert!(
                err.starts_with(want),
                "{text:?}: got {err:?}, want it to start with {want:?}"
            );
        }
    }
}
