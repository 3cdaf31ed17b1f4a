//! `tidemark reconcile`: proves billing's rollups from the raw usage log
//! (see [`tidemark_billing::reconcile`] and docs/ledger.md).
//!
//! Prints every rollup row the log and the database disagree on, or
//! `rollups match the log: N batches, M rollup rows`. Exits 0 only when they
//! match.

use std::path::PathBuf;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use tidemark_billing::quantity::Quantity;
use tidemark_billing::reconcile::{ChargeState, InvoiceCheck, Range, Report, check_invoices, compare, read_log};
use tidemark_billing::store::{Store, redact};
use tidemark_log::args::key_value;
use tidemark_log::embedded::EmbeddedConfig;
use tidemark_log::kafka::KafkaConfig;
use tidemark_log::topics::USAGE_TOPIC;
use tidemark_log::{Log, LogConfig};

#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// Start of the range, RFC 3339, a whole minute: batches whose window starts at or after it.
    #[arg(long, env = "TIDEMARK_FROM", value_parser = time)]
    pub from: i64,

    /// End of the range, RFC 3339, a whole minute: batches whose window starts before it.
    #[arg(long, env = "TIDEMARK_TO", value_parser = time)]
    pub to: i64,

    /// Data directory of a stopped `tidemark dev`: its embedded log, and its
    /// database unless --database-url names another.
    #[arg(
        long,
        env = "TIDEMARK_DATA_DIR",
        required_unless_present = "kafka_brokers",
        conflicts_with = "kafka_brokers"
    )]
    pub data_dir: Option<PathBuf>,

    /// Kafka bootstrap servers, comma-separated `host:port` (instead of --data-dir).
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS", requires = "database_url")]
    pub kafka_brokers: Option<String>,

    /// Extra librdkafka property, `KEY=VALUE`; repeatable.
    #[arg(long = "kafka-property", env = "TIDEMARK_KAFKA_PROPERTY", value_parser = key_value, value_delimiter = ',')]
    pub kafka_properties: Vec<(String, String)>,

    /// Topic that carries usage batches.
    #[arg(long, env = "TIDEMARK_USAGE_TOPIC", default_value = USAGE_TOPIC)]
    pub usage_topic: String,

    /// Billing's database: `sqlite:PATH` or `postgres://USER@HOST:PORT/DB`
    /// (with --data-dir, default: its billing.db).
    #[arg(long, env = "TIDEMARK_DATABASE_URL")]
    pub database_url: Option<String>,
}

/// An RFC 3339 time as microseconds since the Unix epoch (whole minutes
/// are checked by [`Range::new`]).
fn time(text: &str) -> Result<i64, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time such as 2026-01-01T00:00:00Z ({e})"))
}

fn rfc3339(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .map_or_else(|| micros.to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
}

pub async fn run(args: ReconcileArgs) -> anyhow::Result<()> {
    let range = Range::new(args.from, args.to).context("check --from and --to")?;
    let (log, database_url) = match (&args.data_dir, &args.kafka_brokers) {
        (Some(dir), _) => {
            let log_dir = dir.join("log");
            if !log_dir.join(&args.usage_topic).is_dir() {
                bail!(
                    "{} holds no usage log ({} is missing): is it the --data-dir of tidemark dev?",
                    dir.display(),
                    log_dir.join(&args.usage_topic).display()
                );
            }
            let database_url = match &args.database_url {
                Some(url) => url.clone(),
                None => {
                    let db = dir.join("billing.db");
                    if !db.is_file() {
                        bail!("{} is missing: is it the --data-dir of tidemark dev?", db.display());
                    }
                    format!("sqlite:{}", db.display())
                }
            };
            let log = Log::open(LogConfig::Embedded(EmbeddedConfig { dir: log_dir })).await?;
            (log, database_url)
        }
        (None, Some(brokers)) => {
            let log = Log::open(LogConfig::Kafka(KafkaConfig {
                brokers: brokers.clone(),
                properties: args.kafka_properties.clone(),
            }))
            .await
            .context("check --kafka-brokers")?;
            let Some(url) = args.database_url.clone() else {
                bail!("--database-url is required with --kafka-brokers");
            };
            (log, url)
        }
        (None, None) => bail!("give --data-dir (tidemark dev) or --kafka-brokers and --database-url"),
    };
    let store = Store::open(&database_url)
        .await
        .with_context(|| format!("cannot open the billing database {}", redact(&database_url)))?;

    let tally = read_log(&log, &args.usage_topic, range)
        .await
        .with_context(|| format!("cannot read the usage log (topic {})", args.usage_topic))?;
    let report = compare(&store, range, &tally).await?;
    println!(
        "log: {} records read, {} duplicates, {} not usage batches; {} custom usage values rejected (as the ledger rejects them)",
        tally.records, tally.duplicates, tally.undecodable, report.rejected
    );
    print_report(&report, range);
    let invoices = check_invoices(&store, range, &tally)
        .await
        .context("cannot check the finalized invoices")?;
    print_invoices(&invoices);
    let unproven = invoices
        .charges
        .iter()
        .filter(|c| c.state() == ChargeState::Unproven)
        .count();
    match (report.matches(), unproven) {
        (true, 0) => Ok(()),
        (false, 0) => bail!(
            "{} rollup rows of [{}, {}) differ from the log",
            report.differences.len(),
            rfc3339(range.from),
            rfc3339(range.to)
        ),
        (true, n) => bail!("{n} finalized charges bill batches the log does not hold"),
        (false, n) => bail!(
            "{} rollup rows differ from the log, and {n} finalized charges bill batches the log does not hold",
            report.differences.len()
        ),
    }
}

fn print_invoices(check: &InvoiceCheck) {
    let outside = match check.outside {
        0 => String::new(),
        n => format!(" ({n} finalized invoices outside the range, not checked)"),
    };
    if check.charges.is_empty() {
        println!("invoices: no finalized month inside the range{outside}");
        return;
    }
    println!(
        "invoices: {} charges of finalized months checked, batches billed (the month's line and its finalized corrections) against the log{outside}",
        check.charges.len()
    );
    println!("invoice\tcharge\tsource\tbilled_batches\tlog_batches\tlines\tstate");
    for c in &check.charges {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            c.invoice,
            c.charge,
            c.source,
            c.billed_batches,
            c.log_batches,
            c.lines,
            c.state().as_str()
        );
    }
}

fn print_report(report: &Report, range: Range) {
    if report.matches() {
        println!(
            "rollups match the log: {} batches, {} rollup rows in [{}, {})",
            report.batches,
            report.log_rows,
            rfc3339(range.from),
            rfc3339(range.to)
        );
        return;
    }
    println!(
        "rollups differ from the log: {} of {} rows (log: {} batches, {} rows; database: {} rows)",
        report.differences.len(),
        report.log_rows.max(report.db_rows),
        report.batches,
        report.log_rows,
        report.db_rows
    );
    println!("tenant\tservice\tmeter\tminute\tlog_quantity\tdb_quantity\tlog_batches\tdb_batches");
    for d in &report.differences {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            d.tenant,
            d.service,
            d.meter,
            rfc3339(d.minute),
            Quantity::of(&d.meter, d.log.quantity),
            Quantity::of(&d.meter, d.db.quantity),
            d.log.batches,
            d.db.batches
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(time("2025-11-24T16:00:00Z"), Ok(1_764_000_000_000_000));
        assert_eq!(time("2025-11-24T17:00:00+01:00"), Ok(1_764_000_000_000_000));
        assert!(time("yesterday").is_err_and(|e| e.contains("RFC 3339")));
    }
}
