//! Reading price plans from TOML files, and everything checked on the way:
//! a plan that loads is a plan that rates. Every error names the file, the
//! key (`meters.requests.tiers[1].up_to`), the line when there is one, and
//! the reason. The format is documented in `docs/pricing.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;
use thiserror::Error;
use tidemark_core::ids::validate_name;
use toml::de::DeTable;

use super::exact;
use super::keys::{Problem, Table, Value, line_of};
use super::plan::{Aggregation, Charge, Metered, Model, ModelKind, Plan, Pricing, Tier};
use super::rounding::{Rounding, RoundingRule};

/// Longest charge or meter name, like the sidecar's custom meter names.
pub const MAX_METER_NAME_LEN: usize = 64;

/// Why a plan did not load.
#[derive(Debug, Error)]
pub enum PlanError {
    #[error("price plan {}: cannot read it: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("price plan {}{}: not valid TOML: {reason}", file.display(), AtLine(*line))]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    #[error("price plan {}: key `{key}`{}: {reason}", file.display(), AtLine(*line))]
    Key {
        file: PathBuf,
        /// Dotted path, e.g. `meters.requests.tiers[1].up_to`.
        key: String,
        line: Option<usize>,
        reason: String,
    },
}

struct AtLine(Option<usize>);

impl fmt::Display for AtLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (line {line})"),
            None => Ok(()),
        }
    }
}

impl Plan {
    /// Reads and validates the plan in `file`.
    pub fn load(file: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(file).map_err(|source| PlanError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Plan::from_toml(file, &text)
    }

    /// Validates the plan written in `text`; `file` names it in errors.
    pub fn from_toml(file: &Path, text: &str) -> Result<Plan, PlanError> {
        let document = DeTable::parse(text).map_err(|e| PlanError::Syntax {
            file: file.to_path_buf(),
            line: e.span().map(|span| line_of(text, span.start)),
            reason: e.message().trim().to_owned(),
        })?;
        plan(Table::root(text, document.get_ref())).map_err(|problem| PlanError::Key {
            file: file.to_path_buf(),
            key: problem.key.to_string(),
            line: problem.line,
            reason: problem.reason,
        })
    }
}

/// Loads every `*.toml` file in `dir`, in file name order. Two files may
/// not define the same plan name and version.
pub fn load_dir(dir: &Path) -> Result<Vec<Plan>, PlanError> {
    let read_error = |source| PlanError::Read {
        file: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    let mut seen: BTreeMap<(String, u32), PathBuf> = BTreeMap::new();
    let mut plans = Vec::with_capacity(files.len());
    for file in files {
        let plan = Plan::load(&file)?;
        let id = (plan.name.clone(), plan.version);
        if let Some(first) = seen.get(&id) {
            return Err(PlanError::Key {
                file,
                key: "name".to_owned(),
                line: None,
                reason: format!(
                    "plan {:?} version {} is also defined in {}",
                    id.0,
                    id.1,
                    first.display()
                ),
            });
        }
        seen.insert(id, file);
        plans.push(plan);
    }
    Ok(plans)
}

const PLAN_KEYS: &[&str] = &[
    "name",
    "version",
    "currency",
    "description",
    "minimum",
    "rounding",
    "meters",
];
const ROUNDING_KEYS: &[&str] = &["step", "rule"];
const CHARGE_KEYS: &[&str] = &[
    "description",
    "model",
    "source",
    "aggregation",
    "scale",
    "free",
    "unit",
    "price",
    "tiers",
    "package_size",
];
const TIER_KEYS: &[&str] = &["up_to", "price", "flat"];

/// The charge keys each model takes.
fn keys_of(model: ModelKind) -> &'static [&'static str] {
    match model {
        ModelKind::Flat => &["description", "model", "price"],
        ModelKind::Unit => &[
            "description",
            "model",
            "source",
            "aggregation",
            "scale",
            "free",
            "unit",
            "price",
        ],
        ModelKind::Graduated | ModelKind::Volume => &[
            "description",
            "model",
            "source",
            "aggregation",
            "scale",
            "free",
            "unit",
            "tiers",
        ],
        ModelKind::Package => &[
            "description",
            "model",
            "source",
            "aggregation",
            "scale",
            "free",
            "price",
            "package_size",
        ],
    }
}

fn plan(root: Table<'_, '_>) -> Result<Plan, Problem> {
    root.only(PLAN_KEYS)?;
    let name_value = root.required("name", "the plan's name, e.g. name = \"aws-lambda-x86\"")?;
    let name = name_value.string()?;
    validate_name(name).map_err(|e| name_value.problem(format!("plan name {e}")))?;

    let version_value = root.required("version", "an integer >= 1, e.g. version = 1")?;
    let version = u32::try_from(version_value.integer()?)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| version_value.problem("must be an integer from 1 to 4294967295"))?;

    let currency_value = root.required("currency", "an ISO 4217 code, e.g. currency = \"USD\"")?;
    let currency = currency_value.string()?;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(currency_value.problem(format!(
            "{currency:?} is not an ISO 4217 currency code (three capital letters, e.g. \"USD\")"
        )));
    }

    let description = optional_string(&root, "description")?;
    let rounding = rounding(&root)?;

    let minimum = match root.get("minimum") {
        None => None,
        Some(value) => {
            let minimum = value.decimal()?;
            if !rounding.is_on_step(minimum) {
                return Err(value.problem(format!(
                    "{minimum} is not a whole number of rounding steps ({})",
                    rounding.step
                )));
            }
            Some(minimum)
        }
    };

    let meters_value = root.required("meters", "at least one charge, e.g. [meters.requests]")?;
    let mut charges: Vec<Charge> = Vec::new();
    for (name, value) in meters_value.table()?.entries() {
        let charge = charge(name, &value)?;
        // Usage is aggregated once per meter: charges that share a meter
        // must aggregate it the same way.
        if let Pricing::Metered(metered) = &charge.pricing {
            let earlier = charges.iter().find_map(|c| match &c.pricing {
                Pricing::Metered(m) if m.source == metered.source && m.aggregation != metered.aggregation => {
                    Some((c.name.as_str(), m.aggregation))
                }
                _ => None,
            });
            if let Some((other, aggregation)) = earlier {
                let table = value.table()?;
                let problem = format!(
                    "charge {other:?} aggregates meter {:?} by {}; every charge on one meter must aggregate it the same way",
                    metered.source,
                    aggregation.as_str()
                );
                return Err(match table.get("aggregation") {
                    Some(v) => v.problem(problem),
                    None => table.missing("aggregation", format!("defaults to sum, but {problem}")),
                });
            }
        }
        charges.push(charge);
    }
    if charges.is_empty() {
        return Err(meters_value.problem("the plan has no charges; add one, e.g. [meters.requests]"));
    }

    Ok(Plan {
        name: name.to_owned(),
        version,
        currency: currency.to_owned(),
        description,
        minimum,
        rounding,
        charges,
    })
}

fn optional_string(table: &Table<'_, '_>, key: &str) -> Result<Option<String>, Problem> {
    table.get(key).map(|v| v.string().map(str::to_owned)).transpose()
}

fn rounding(root: &Table<'_, '_>) -> Result<Rounding, Problem> {
    let table = root
        .required(
            "rounding",
            "how each line is rounded, e.g. rounding = { step = \"0.01\", rule = \"half_up\" }",
        )?
        .table()?;
    table.only(ROUNDING_KEYS)?;
    let step_value = table.required("step", "the amount lines are rounded to, e.g. step = \"0.01\"")?;
    let step = step_value.decimal()?;
    if !exact::has_finite_reciprocal(step) {
        return Err(step_value.problem(format!(
            "{step} cannot be a rounding step: it must be > 0 and divide 1 into a finite decimal (0.01, 0.05, 1)"
        )));
    }
    let rule_value = table.required("rule", "one of half_up, half_even, up, down")?;
    let rule_name = rule_value.string()?;
    let rule = RoundingRule::parse(rule_name)
        .ok_or_else(|| rule_value.problem(format!("{rule_name:?} is not one of half_up, half_even, up, down")))?;
    Ok(Rounding { step, rule })
}

/// Whether `name` can name a meter: 1 to 64 of `a-z 0-9 _ . -`, the
/// sidecar's rule for custom meters (the built-in ones follow it too).
pub fn is_meter_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_METER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'))
}

fn charge(name: &str, value: &Value<'_, '_>) -> Result<Charge, Problem> {
    if !is_meter_name(name) {
        return Err(value.problem(format!(
            "{name:?} cannot name a charge: use 1 to {MAX_METER_NAME_LEN} of a-z 0-9 _ . -"
        )));
    }
    let table = value.table()?;
    table.only(CHARGE_KEYS)?;
    let model_value = table.required("model", "one of flat, unit, graduated, volume, package")?;
    let model_name = model_value.string()?;
    let kind = ModelKind::parse(model_name).ok_or_else(|| {
        model_value.problem(format!(
            "{model_name:?} is not one of flat, unit, graduated, volume, package"
        ))
    })?;
    let allowed = keys_of(kind);
    if let Some((key, value)) = table.entries().into_iter().find(|(key, _)| !allowed.contains(key)) {
        return Err(value.problem(format!(
            "{key:?} does not apply to model {:?}; its keys are: {}",
            kind.as_str(),
            allowed.join(", ")
        )));
    }
    let description = optional_string(&table, "description")?;
    let price = |what: &str| -> Result<Decimal, Problem> { table.required("price", what)?.decimal() };

    let pricing = match kind {
        ModelKind::Flat => Pricing::Flat {
            price: price("the fixed price per period, e.g. price = \"5.00\"")?,
        },
        _ => {
            let source = match table.get("source") {
                Some(value) => {
                    let source = value.string()?;
                    if !is_meter_name(source) {
                        return Err(value.problem(format!(
                            "{source:?} cannot name a usage meter: use 1 to {MAX_METER_NAME_LEN} of a-z 0-9 _ . -"
                        )));
                    }
                    source.to_owned()
                }
                None => name.to_owned(),
            };
            let aggregation = match table.get("aggregation") {
                None => Aggregation::Sum,
                Some(value) => {
                    let name = value.string()?;
                    Aggregation::parse(name).ok_or_else(|| {
                        value.problem(format!(
                            "{name:?} is not one of sum, count, max, latest, unique_count, time_weighted"
                        ))
                    })?
                }
            };
            let scale = positive(&table, "scale", "a multiplier")?.unwrap_or(Decimal::ONE);
            let free = table
                .get("free")
                .map(|v| v.decimal())
                .transpose()?
                .unwrap_or(Decimal::ZERO);
            let unit = match table.get("unit") {
                None => Decimal::ONE,
                Some(value) => {
                    let unit = value.decimal()?;
                    if !exact::has_finite_reciprocal(unit) {
                        return Err(value.problem(format!(
                            "{unit} cannot be a unit: it must be > 0 and divide 1 into a finite decimal \
                             (1000, 1000000, 1024), so that prices per unit stay exact"
                        )));
                    }
                    unit
                }
            };
            let model = match kind {
                ModelKind::Unit => Model::Unit {
                    price: price("the price per unit, e.g. price = \"0.20\"")?,
                    unit,
                },
                ModelKind::Graduated => Model::Graduated {
                    tiers: tiers(&table)?,
                    unit,
                },
                ModelKind::Volume => Model::Volume {
                    tiers: tiers(&table)?,
                    unit,
                },
                // Package (flat charges were handled above).
                _ => Model::Package {
                    price: price("the price per started package, e.g. price = \"1.00\"")?,
                    size: positive(&table, "package_size", "the quantity in one package")?
                        .ok_or_else(|| table.missing("package_size", "missing; the quantity in one package"))?,
                },
            };
            Pricing::Metered(Metered {
                source,
                aggregation,
                scale,
                free,
                model,
            })
        }
    };
    Ok(Charge {
        name: name.to_owned(),
        description,
        pricing,
    })
}

/// An optional decimal that must be > 0.
fn positive(table: &Table<'_, '_>, key: &str, what: &str) -> Result<Option<Decimal>, Problem> {
    let Some(value) = table.get(key) else {
        return Ok(None);
    };
    let d = value.decimal()?;
    if d.is_zero() {
        return Err(value.problem(format!("{what} must be > 0")));
    }
    Ok(Some(d))
}

fn tiers(charge: &Table<'_, '_>) -> Result<Vec<Tier>, Problem> {
    let list = charge.required(
        "tiers",
        "a list of tiers, e.g. tiers = [{ up_to = \"1000\", price = \"0\" }, { up_to = \"inf\", price = \"0.01\" }]",
    )?;
    let items = list.array()?;
    if items.is_empty() {
        return Err(list.problem("needs at least one tier, the last with up_to = \"inf\""));
    }
    let last = items.len() - 1;
    let mut tiers: Vec<Tier> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let table = item.table()?;
        table.only(TIER_KEYS)?;
        let up_to_value = table.required("up_to", "the tier's upper bound (inclusive), or \"inf\" for the last")?;
        let up_to = if up_to_value.is_string("inf") {
            if index != last {
                return Err(up_to_value.problem("only the last tier may be unbounded (\"inf\")"));
            }
            None
        } else {
            let bound = up_to_value.decimal()?;
            if index == last {
                return Err(up_to_value.problem(format!(
                    "the last tier must have up_to = \"inf\" so that every quantity has a price, not {bound}"
                )));
            }
            match tiers.last().and_then(|t| t.up_to) {
                Some(previous) if bound <= previous => {
                    return Err(up_to_value.problem(format!(
                        "{bound} must be greater than the previous tier's up_to ({previous})"
                    )));
                }
                _ if bound.is_zero() => return Err(up_to_value.problem("must be > 0")),
                _ => {}
            }
            Some(bound)
        };
        let price = table.required("price", "the price per unit in this tier")?.decimal()?;
        let flat = table
            .get("flat")
            .map(|v| v.decimal())
            .transpose()?
            .unwrap_or(Decimal::ZERO);
        tiers.push(Tier { up_to, price, flat });
    }
    Ok(tiers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "plans/bad.toml";

    const HEAD: &str = r#"name = "test"
version = 1
currency = "USD"
rounding = { step = "0.01", rule = "half_up" }
"#;

    fn load(text: &str) -> Result<Plan, PlanError> {
        Plan::from_toml(Path::new(FILE), text)
    }

    /// Loads `HEAD` + `rest`, which must fail on `key` for a reason
    /// containing `reason`; returns the whole message.
    fn refused(rest: &str, key: &str, reason: &str) -> String {
        refused_whole(&format!("{HEAD}{rest}"), key, reason)
    }

    fn refused_whole(text: &str, key: &str, reason: &str) -> String {
        let err = load(text).expect_err("the plan should be refused");
        let message = err.to_string();
        match &err {
            PlanError::Key {
                key: got, reason: why, ..
            } => {
                assert_eq!(got, key, "{message}");
                assert!(why.contains(reason), "reason {why:?} lacks {reason:?}");
            }
            other => panic!("expected a key error, got {other:?}"),
        }
        assert!(
            message.starts_with(&format!("price plan {FILE}: key `{key}`")),
            "{message}"
        );
        message
    }

    const REQUESTS: &str = "[meters.requests]\nmodel = \"unit\"\nprice = \"0.20\"\n";
    const TIERS: &str = "tiers = [{ up_to = 10, price = \"0\" }, { up_to = \"inf\", price = \"1\" }]\n";

    #[test]
    fn a_minimal_plan_loads() {
        let plan = load(&format!("{HEAD}{REQUESTS}")).unwrap();
        assert_eq!(plan.name, "test");
        assert_eq!(plan.version, 1);
        assert_eq!(plan.minimum, None);
        let [charge] = plan.charges.as_slice() else {
            panic!("one charge")
        };
        let Pricing::Metered(metered) = &charge.pricing else {
            panic!("metered")
        };
        assert_eq!(metered.source, "requests");
        assert_eq!(metered.scale, Decimal::ONE);
        assert_eq!(metered.free, Decimal::ZERO);
        assert_eq!(
            metered.model,
            Model::Unit {
                price: Decimal::new(20, 2),
                unit: Decimal::ONE
            }
        );
    }

    #[test]
    fn charges_keep_the_files_order_and_arrays_of_tables_work() {
        let plan = load(&format!(
            "{HEAD}[meters.zeta]\nmodel = \"flat\"\nprice = \"1\"\n\
             [meters.alpha]\nmodel = \"graduated\"\n\
             [[meters.alpha.tiers]]\nup_to = 10\nprice = \"0\"\n\
             [[meters.alpha.tiers]]\nup_to = \"inf\"\nprice = \"0.5\"\nflat = \"2\"\n"
        ))
        .unwrap();
        let names: Vec<&str> = plan.charges.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha"]);
        let Pricing::Metered(Metered {
            model: Model::Graduated { tiers, .. },
            ..
        }) = &plan.charges[1].pricing
        else {
            panic!("graduated")
        };
        assert_eq!(tiers.len(), 2);
        assert_eq!(tiers[0].up_to, Some(Decimal::TEN));
        assert_eq!(tiers[1].up_to, None);
        assert_eq!(tiers[1].flat, Decimal::TWO);
    }

    #[test]
    fn toml_syntax_errors_name_the_file_and_line() {
        let err = load("name = \"x\"\nversion = \n").unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, PlanError::Syntax { line: Some(2), .. }), "{message}");
        assert!(
            message.starts_with("price plan plans/bad.toml (line 2): not valid TOML"),
            "{message}"
        );
    }

    #[test]
    fn unreadable_files_are_named() {
        let err = Plan::load(Path::new("/nonexistent/plan.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("price plan /nonexistent/plan.toml: cannot read it"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path_and_line() {
        let message = refused(&format!("colour = \"blue\"\n{REQUESTS}"), "colour", "unknown key");
        assert!(message.contains("(line 5)"), "{message}");
        assert!(message.contains("known keys are: name, version"), "{message}");

        let message = refused(
            "[meters.requests]\nmodel = \"unit\"\npirce = \"0.20\"\n",
            "meters.requests.pirce",
            "unknown key \"pirce\" in `meters.requests`",
        );
        assert!(message.contains("(line 7)") && message.contains("price"), "{message}");

        refused(
            "[meters.requests]\nmodel = \"graduated\"\ntiers = [\n  { up_to = 10, price = \"1\" },\n  { upto = \"inf\", price = \"0.5\" },\n]\n",
            "meters.requests.tiers[1].upto",
            "unknown key",
        );
        refused(&format!("rounding2 = 1\n{REQUESTS}"), "rounding2", "unknown key");
        refused_whole(
            &format!(
                "{}{REQUESTS}",
                HEAD.replace("rule = \"half_up\"", "rule = \"half_up\", mode = 1")
            ),
            "rounding.mode",
            "unknown key",
        );
    }

    #[test]
    fn missing_keys_are_named() {
        refused_whole(&HEAD.replace("name = \"test\"\n", ""), "name", "missing");
        refused_whole(&HEAD.replace("version = 1\n", ""), "version", "missing");
        refused_whole(&HEAD.replace("currency = \"USD\"\n", ""), "currency", "missing");
        refused_whole(
            &format!("name = \"t\"\nversion = 1\ncurrency = \"USD\"\n{REQUESTS}"),
            "rounding",
            "missing",
        );
        refused_whole(
            &HEAD.replace("rule = \"half_up\"", "").replace(", }", " }"),
            "rounding.rule",
            "missing",
        );
        refused("", "meters", "missing");
        refused("[meters.requests]\nprice = \"1\"\n", "meters.requests.model", "missing");
        refused(
            "[meters.requests]\nmodel = \"unit\"\n",
            "meters.requests.price",
            "missing",
        );
        refused(
            "[meters.x]\nmodel = \"package\"\nprice = \"1\"\n",
            "meters.x.package_size",
            "missing",
        );
        refused("[meters.x]\nmodel = \"volume\"\n", "meters.x.tiers", "missing");
        refused(
            "[meters.x]\nmodel = \"volume\"\ntiers = [{ price = \"1\" }]\n",
            "meters.x.tiers[0].up_to",
            "missing",
        );
        refused(
            "[meters.x]\nmodel = \"volume\"\ntiers = [{ up_to = \"inf\" }]\n",
            "meters.x.tiers[0].price",
            "missing",
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        refused_whole(&HEAD.replace("\"test\"", "\"a b\""), "name", "plan name contains ' '");
        refused_whole(
            &HEAD.replace("\"test\"", "5"),
            "name",
            "expected a string, found an integer",
        );
        refused_whole(&HEAD.replace("version = 1", "version = 0"), "version", "from 1");
        refused_whole(
            &HEAD.replace("version = 1", "version = \"1\""),
            "version",
            "expected an integer",
        );
        refused_whole(&HEAD.replace("\"USD\"", "\"usd\""), "currency", "ISO 4217");
        refused_whole(
            &HEAD.replace("\"0.01\"", "\"0\""),
            "rounding.step",
            "cannot be a rounding step",
        );
        refused_whole(
            &HEAD.replace("\"0.01\"", "\"0.03\""),
            "rounding.step",
            "cannot be a rounding step",
        );
        refused_whole(
            &HEAD.replace("\"half_up\"", "\"nearest\""),
            "rounding.rule",
            "not one of half_up",
        );
        refused(
            &format!("minimum = \"0.005\"\n{REQUESTS}"),
            "minimum",
            "whole number of rounding steps",
        );
        refused("meters = {}\n", "meters", "no charges");
        refused(
            "[meters.requests]\nmodel = \"tiered\"\n",
            "meters.requests.model",
            "not one of flat",
        );
    }

    #[test]
    fn numbers_must_be_exact_decimals() {
        let message = refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = 0.2\n",
            "meters.requests.price",
            "TOML float",
        );
        assert!(message.contains("\"0.2\""), "{message}");
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"-0.2\"\n",
            "meters.requests.price",
            "not a decimal number >= 0",
        );
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"0.2.0\"\n",
            "meters.requests.price",
            "not a decimal number >= 0",
        );
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\nfree = -5\n",
            "meters.requests.free",
            "not a decimal number >= 0",
        );
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\nfree = 0x10\n",
            "meters.requests.free",
            "in decimal",
        );
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\nunit = 3\n",
            "meters.requests.unit",
            "cannot be a unit",
        );
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\nscale = \"0\"\n",
            "meters.requests.scale",
            "must be > 0",
        );
        refused(
            "[meters.x]\nmodel = \"package\"\nprice = \"1\"\npackage_size = 0\n",
            "meters.x.package_size",
            "must be > 0",
        );
    }

    #[test]
    fn names_of_charges_and_sources_follow_the_meter_rule() {
        refused(
            "[meters.Requests]\nmodel = \"unit\"\nprice = \"1\"\n",
            "meters.Requests",
            "cannot name a charge",
        );
        refused(
            "[meters.gb_s]\nmodel = \"unit\"\nprice = \"1\"\nsource = \"Billed Duration\"\n",
            "meters.gb_s.source",
            "cannot name a usage meter",
        );
        // Dotted names are quoted in the path.
        refused(
            "[meters.\"gpu.seconds\"]\nmodel = \"unit\"\n",
            "meters.\"gpu.seconds\".price",
            "missing",
        );
    }

    #[test]
    fn keys_that_do_not_fit_the_model_are_refused() {
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\ntiers = []\n",
            "meters.requests.tiers",
            "does not apply to model \"unit\"",
        );
        refused(
            "[meters.base]\nmodel = \"flat\"\nprice = \"1\"\nfree = 10\n",
            "meters.base.free",
            "does not apply to model \"flat\"",
        );
        refused(
            "[meters.x]\nmodel = \"package\"\nprice = \"1\"\npackage_size = 10\nunit = 1000\n",
            "meters.x.unit",
            "does not apply to model \"package\"",
        );
        refused(
            "[meters.x]\nmodel = \"graduated\"\nprice = \"1\"\n",
            "meters.x.price",
            "does not apply to model \"graduated\"",
        );
    }

    #[test]
    fn aggregations_default_to_sum_and_are_checked() {
        let plan = load(&format!(
            "{HEAD}{REQUESTS}[meters.peak]\nmodel = \"unit\"\nprice = \"1\"\nsource = \"cpu_us\"\naggregation = \"max\"\n\
             [meters.gauge]\nmodel = \"graduated\"\naggregation = \"time_weighted\"\n{TIERS}"
        ))
        .unwrap();
        let aggregations: Vec<Aggregation> = plan
            .charges
            .iter()
            .map(|c| match &c.pricing {
                Pricing::Metered(m) => m.aggregation,
                Pricing::Flat { .. } => panic!("metered"),
            })
            .collect();
        assert_eq!(
            aggregations,
            [Aggregation::Sum, Aggregation::Max, Aggregation::TimeWeighted]
        );
        refused(
            "[meters.requests]\nmodel = \"unit\"\nprice = \"1\"\naggregation = \"avg\"\n",
            "meters.requests.aggregation",
            "\"avg\" is not one of sum, count, max, latest, unique_count, time_weighted",
        );
        refused(
            "[meters.base]\nmodel = \"flat\"\nprice = \"1\"\naggregation = \"sum\"\n",
            "meters.base.aggregation",
            "does not apply to model \"flat\"",
        );
        // Two charges on one meter must aggregate it alike.
        refused(
            &format!(
                "{REQUESTS}[meters.peak]\nmodel = \"unit\"\nprice = \"1\"\nsource = \"requests\"\naggregation = \"max\"\n"
            ),
            "meters.peak.aggregation",
            "charge \"requests\" aggregates meter \"requests\" by sum",
        );
        refused(
            "[meters.peak]\nmodel = \"unit\"\nprice = \"1\"\nsource = \"requests\"\naggregation = \"max\"\n\
             [meters.requests]\nmodel = \"unit\"\nprice = \"1\"\n",
            "meters.requests.aggregation",
            "defaults to sum, but charge \"peak\" aggregates meter \"requests\" by max",
        );
    }

    #[test]
    fn tiers_must_ascend_and_end_unbounded() {
        let tiers = |list: &str| format!("[meters.requests]\nmodel = \"graduated\"\ntiers = [{list}]\n");
        refused(&tiers(""), "meters.requests.tiers", "at least one tier");
        refused(
            &tiers(
                "{ up_to = 100, price = \"1\" }, { up_to = 100, price = \"1\" }, { up_to = \"inf\", price = \"1\" }",
            ),
            "meters.requests.tiers[1].up_to",
            "greater than the previous tier's up_to (100)",
        );
        refused(
            &tiers("{ up_to = 100, price = \"1\" }, { up_to = 200, price = \"1\" }"),
            "meters.requests.tiers[1].up_to",
            "the last tier must have up_to = \"inf\"",
        );
        refused(
            &tiers("{ up_to = \"inf\", price = \"1\" }, { up_to = \"inf\", price = \"1\" }"),
            "meters.requests.tiers[0].up_to",
            "only the last tier",
        );
        refused(
            &tiers("{ up_to = 0, price = \"1\" }, { up_to = \"inf\", price = \"1\" }"),
            "meters.requests.tiers[0].up_to",
            "must be > 0",
        );
        refused(&tiers("5"), "meters.requests.tiers[0]", "expected a table");
    }

    #[test]
    fn directories_load_in_name_order_and_refuse_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            format!("{HEAD}{REQUESTS}").replace("\"test\"", "\"b\""),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            format!("{HEAD}{REQUESTS}").replace("\"test\"", "\"a\""),
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a plan").unwrap();
        let names: Vec<String> = load_dir(dir.path()).unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["a", "b"]);

        std::fs::write(
            dir.path().join("c.toml"),
            format!("{HEAD}{REQUESTS}").replace("\"test\"", "\"a\""),
        )
        .unwrap();
        let message = load_dir(dir.path()).unwrap_err().to_string();
        assert!(message.contains("c.toml: key `name`"), "{message}");
        assert!(
            message.contains("also defined in") && message.contains("a.toml"),
            "{message}"
        );

        std::fs::write(dir.path().join("d.toml"), "name = ").unwrap();
        std::fs::remove_file(dir.path().join("c.toml")).unwrap();
        let message = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            message.contains("d.toml") && message.contains("not valid TOML"),
            "{message}"
        );
    }
}
