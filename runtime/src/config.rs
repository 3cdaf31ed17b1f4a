//! Layered configuration: command-line flags, then `TIDEMARK_*` environment
//! variables, then a TOML file given with `--config`, then defaults.
//!
//! Each binary declares its flags once, with clap (every flag has
//! `env = "TIDEMARK_<FLAG>"`). The TOML file uses the same names with `_`
//! for `-` (`report_interval = "1s"` for `--report-interval`). A key that
//! names no flag, or a value the flag would refuse, fails with the file, the
//! key and the reason.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, Parser};
use thiserror::Error;

/// The id of the flag that names the TOML file.
const CONFIG_ARG: &str = "config";

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Flags or environment variables are wrong, or help was asked for.
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("config file {path}: key `{key}`: {reason}")]
    Key { path: PathBuf, key: String, reason: String },
}

/// Parses the process's arguments, environment and config file, or prints
/// why not (or the help) and exits: 0 for `--help`, 2 for an error.
pub fn load_or_exit<T: Parser>() -> T {
    match load_from(std::env::args_os().collect(), |p| std::fs::read_to_string(p)) {
        Ok(config) => config,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// Parses `args` (with the program name first) over the environment and the
/// TOML file named by `--config`, read with `read_file`.
pub fn load_from<T: Parser>(
    args: Vec<OsString>,
    read_file: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<T, ConfigError> {
    let command = T::command();
    // A first, lenient pass finds the file and what flags and environment
    // already set; required flags may still be missing (the file may hold them).
    let partial = lenient(command.clone()).try_get_matches_from(&args)?;
    let (leaf, leaf_matches) = leaf(&command, &partial);
    let Some(path) = leaf_matches.try_get_one::<PathBuf>(CONFIG_ARG).ok().flatten().cloned() else {
        let matches = command.try_get_matches_from(&args)?;
        return Ok(T::from_arg_matches(&matches)?);
    };
    let text = read_file(&path).map_err(|e| ConfigError::File {
        path: path.clone(),
        reason: format!("cannot read it: {e}"),
    })?;
    let extra = file_args(leaf, leaf_matches, &path, &text)?;
    let mut args = args;
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(at..at, extra);
    let matches = command.try_get_matches_from(&args)?;
    Ok(T::from_arg_matches(&matches)?)
}

/// The command with no flag required, in every subcommand too.
fn lenient(command: Command) -> Command {
    let names: Vec<String> = command.get_subcommands().map(|c| c.get_name().to_owned()).collect();
    names.iter().fold(command.mut_args(|a| a.required(false)), |c, name| {
        c.mut_subcommand(name, lenient)
    })
}

/// The innermost subcommand that was invoked, with its matches.
fn leaf<'a>(command: &'a Command, matches: &'a ArgMatches) -> (&'a Command, &'a ArgMatches) {
    match matches.subcommand() {
        Some((name, sub_matches)) => match command.find_subcommand(name) {
            Some(sub) => leaf(sub, sub_matches),
            None => (command, matches),
        },
        None => (command, matches),
    }
}

/// Turns the file's keys into flags for those flags that neither the command
/// line nor the environment set.
fn file_args(command: &Command, matches: &ArgMatches, path: &Path, text: &str) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::File {
        path: path.to_path_buf(),
        reason: format!("not valid TOML: {}", e.message()),
    })?;
    let key_error = |key: &str, reason: String| ConfigError::Key {
        path: path.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    let mut extra = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && is_settable(a))
            .ok_or_else(|| {
                let known: Vec<String> = command
                    .get_arguments()
                    .filter(|a| is_settable(a))
                    .filter_map(|a| a.get_long())
                    .map(|l| l.replace('-', "_"))
                    .collect();
                key_error(key, format!("unknown key; known keys are: {}", known.join(", ")))
            })?;
        if matches!(
            matches.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let takes_values = arg.get_action().takes_values();
        let scalars = match value {
            toml::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for scalar in scalars {
            let text = match scalar {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !takes_values => {
                    if *b {
                        extra.push(OsString::from(format!("--{long}")));
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Datetime(d) => d.to_string(),
                toml::Value::Array(_) | toml::Value::Table(_) => {
                    return Err(key_error(key, "expected a value, found a table or nested array".into()));
                }
            };
            if !takes_values {
                return Err(key_error(key, format!("is a switch: write `{key} = true` or `false`")));
            }
            let flag = OsString::from(format!("--{long}={text}"));
            // Check the value with the flag's own parser, alone, so that the
            // error can name the file and the key.
            Command::new("config")
                .arg(arg.clone().required(false))
                .try_get_matches_from([OsString::from("config"), flag.clone()])
                .map_err(|e| key_error(key, first_line(&e.to_string())))?;
            extra.push(flag);
        }
    }
    Ok(extra)
}

/// Flags a config file may set: all but `--config`, `--help` and `--version`.
fn is_settable(arg: &clap::Arg) -> bool {
    arg.get_long().is_some() && !arg.is_hide_set() && !matches!(arg.get_id().as_str(), CONFIG_ARG | "help" | "version")
}

fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message);
    line.trim_start_matches("error: ").to_owned()
}

/// Parses a duration such as `250ms`, `1s` or `5m` (a clap value parser).
pub fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser, PartialEq)]
    struct Args {
        #[arg(long, env = "TIDEMARK_TEST_CONFIG_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, env = "TIDEMARK_TEST_CONFIG_PORT", default_value_t = 80)]
        port: u16,
        #[arg(long, env = "TIDEMARK_TEST_CONFIG_INTERVAL", value_parser = duration, default_value = "1s")]
        report_interval: Duration,
        #[arg(long, env = "TIDEMARK_TEST_CONFIG_VERBOSE")]
        verbose: bool,
        #[arg(long = "tag")]
        tags: Vec<String>,
    }

    fn parse(args: &[&str], file: &str) -> Result<Args, ConfigError> {
        let args = std::iter::once("prog")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let file = file.to_owned();
        load_from(args, move |_| Ok(file.clone()))
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let got = parse(
            &["--config", "t.toml", "--port", "9"],
            "port = 7\nreport_interval = \"250ms\"\nverbose = true\ntag = [\"a\", \"b\"]\n",
        )
        .expect("valid");
        assert_eq!(got.port, 9, "the flag wins over the file");
        assert_eq!(got.report_interval, Duration::from_millis(250));
        assert!(got.verbose);
        assert_eq!(got.tags, ["a", "b"]);
    }

    #[derive(Debug, Parser)]
    struct NeedsName {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        name: String,
    }

    #[test]
    fn a_required_flag_may_come_from_the_file() {
        let args = ["prog", "--config", "t.toml"].map(OsString::from).to_vec();
        let got: NeedsName = load_from(args, |_| Ok("name = \"shop\"\n".into())).expect("valid");
        assert_eq!(got.name, "shop");
        let args = ["prog", "--config", "t.toml"].map(OsString::from).to_vec();
        let err = load_from::<NeedsName>(args, |_| Ok(String::new())).expect_err("still required");
        assert!(err.to_string().contains("--name"), "{err}");
    }

    #[test]
    fn defaults_without_a_file() {
        let got = parse(&[], "").expect("valid");
        assert_eq!(got.port, 80);
        assert_eq!(got.report_interval, Duration::from_secs(1));
    }

    #[test]
    fn unknown_keys_name_file_and_key() {
        let err = parse(&["--config", "t.toml"], "prot = 7\n").expect_err("unknown key");
        let text = err.to_string();
        assert!(
            text.contains("t.toml") && text.contains("`prot`") && text.contains("unknown key"),
            "{text}"
        );
        assert!(text.contains("port"), "lists the known keys: {text}");
    }

    #[test]
    fn bad_values_name_file_key_and_reason() {
        let err = parse(&["--config", "t.toml"], "port = \"eighty\"\n").expect_err("bad value");
        let text = err.to_string();
        assert!(text.starts_with("config file t.toml: key `port`: "), "{text}");
        assert!(text.contains("eighty"), "{text}");
        let err = parse(&["--config", "t.toml"], "port = [[1]]\n").expect_err("nested");
        assert!(err.to_string().contains("`port`"), "{err}");
        let err = parse(&["--config", "t.toml"], "port = ").expect_err("not toml");
        assert!(err.to_string().contains("not valid TOML"), "{err}");
    }

    #[test]
    fn unreadable_file_is_named() {
        let args = ["prog", "--config", "/nope.toml"].map(OsString::from).to_vec();
        let err = load_from::<Args>(args, |_| Err(std::io::Error::other("gone"))).expect_err("unreadable");
        assert_eq!(err.to_string(), "config file /nope.toml: cannot read it: gone");
    }
}
