//! `tidemark doctor`: checks a deployment and says what to change.
//!
//! Each check prints one line, `ok`, `FAIL` or `skip`, naming what it looked
//! at; a `FAIL` line ends with `fix:` and what to change. Nothing is written
//! anywhere: the collector is asked for a decision, Kafka for its metadata
//! and topic configs, the database for its schema version, and plan files
//! are only read. The command fails (exit code 1) if any check failed.
//!
//! | check | needs | passes when |
//! |---|---|---|
//! | `collector` | `--collector` (default `http://127.0.0.1:7400`; `none` skips it) | `tidemark.v1.Scaling` and KEDA's `externalscaler.ExternalScaler` answer there |
//! | `decision <service>` | `--service` | the collector holds a decision for the service |
//! | `kafka` | `--kafka-brokers` | a broker answers |
//! | `topic <usage>` | `--kafka-brokers` | the usage topic exists and is not compacted |
//! | `topic <decisions>` | `--kafka-brokers` | the decisions topic exists and is compacted |
//! | `database` | `--database-url` | billing's schema is at the version this build migrates to |
//! | `plans` | `--plans-dir` | every `*.toml` plan in the directory loads |

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tidemark_log::kafka::{KafkaConfig, KafkaLog, TopicDescription};
use tidemark_log::topics::{DECISIONS_TOPIC, DECISIONS_TOPIC_SPEC, USAGE_TOPIC, USAGE_TOPIC_SPEC};
use tidemark_proto::externalscaler::ScaledObjectRef;
use tidemark_proto::externalscaler::external_scaler_client::ExternalScalerClient;
use tidemark_proto::v1::GetDecisionRequest;
use tidemark_proto::v1::scaling_client::ScalingClient;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The service name the collector is asked about to prove that it answers.
/// No sidecar reports under it, so the expected answer is `NOT_FOUND`.
const PROBE_SERVICE: &str = "tidemark-doctor-probe";

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// TOML file with any of these settings (keys as the flags, `_` for `-`).
    #[arg(long, env = "TIDEMARK_CONFIG")]
    pub config: Option<PathBuf>,

    /// The collector's gRPC endpoint (its --listen address), `http://` or `https://`; `none` skips the collector checks.
    #[arg(long, env = "TIDEMARK_COLLECTOR", default_value = "http://127.0.0.1:7400")]
    pub collector: String,

    /// PEM file of the CA that signed an `https://` collector's certificate (default: the system's trusted roots).
    #[arg(long, env = "TIDEMARK_COLLECTOR_CA")]
    pub collector_ca: Option<PathBuf>,

    /// Service whose latest scaling decision the collector must hold (the sidecars' --service); repeatable.
    #[arg(long = "service", env = "TIDEMARK_SERVICE", value_delimiter = ',')]
    pub services: Vec<String>,

    /// Kafka bootstrap servers, comma-separated `host:port` (as the collector's and billing's), to check the brokers and topics.
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Extra librdkafka property for the Kafka client, `KEY=VALUE`; repeatable.
    #[arg(long = "kafka-property", env = "TIDEMARK_KAFKA_PROPERTY", value_parser = key_value, value_delimiter = ',')]
    pub kafka_properties: Vec<(String, String)>,

    /// Topic that carries usage batches, checked with --kafka-brokers.
    #[arg(long, env = "TIDEMARK_USAGE_TOPIC", default_value = USAGE_TOPIC)]
    pub usage_topic: String,

    /// Compacted topic of the latest decision per service, checked with --kafka-brokers.
    #[arg(long, env = "TIDEMARK_DECISIONS_TOPIC", default_value = DECISIONS_TOPIC)]
    pub decisions_topic: String,

    /// Billing's database (its --database-url), to check the schema version; opened read-only.
    #[arg(long, env = "TIDEMARK_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Directory of price plan files (`*.toml`) to validate.
    #[arg(long, env = "TIDEMARK_PLANS_DIR")]
    pub plans_dir: Option<PathBuf>,

    /// Longest wait for each network check.
    #[arg(long, env = "TIDEMARK_TIMEOUT", value_parser = tidemark_runtime::config::duration, default_value = "5s")]
    pub timeout: Duration,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    /// What is wrong, and what to change.
    Fail {
        problem: String,
        fix: String,
    },
    /// Not checked, and how to have it checked.
    Skip(String),
}

/// One check: what was checked, and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            outcome: Outcome::Ok(detail.into()),
        }
    }

    fn fail(name: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            outcome: Outcome::Fail {
                problem: problem.into(),
                fix: fix.into(),
            },
        }
    }

    fn skip(name: impl Into<String>, how: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            outcome: Outcome::Skip(how.into()),
        }
    }

    pub fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Fail { .. })
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Outcome::Ok(detail) => write!(f, "ok    {}: {detail}", self.name),
            Outcome::Fail { problem, fix } => write!(f, "FAIL  {}: {problem}; fix: {fix}", self.name),
            Outcome::Skip(how) => write!(f, "skip  {}: {how}", self.name),
        }
    }
}

/// Runs every check, printing each line as it is known. If any check
/// failed, says how many on stderr and exits with status 1.
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let checks = check_all(&args, |check| println!("{check}")).await;
    let failed = checks.iter().filter(|c| c.failed()).count();
    if failed > 0 {
        eprintln!(
            "tidemark doctor: {failed} of {} checks failed; each FAIL line says what to change",
            checks.len()
        );
        std::process::exit(1);
    }
    Ok(())
}

/// Runs every check and hands each one to `report` as soon as it is done.
pub async fn check_all(args: &DoctorArgs, mut report: impl FnMut(&Check)) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut push = |check: Check| {
        report(&check);
        checks.push(check);
    };

    if args.collector == "none" || args.collector.is_empty() {
        push(Check::skip("collector", "not checked (--collector none)"));
    } else {
        for check in check_collector(args).await {
            push(check);
        }
    }
    match &args.kafka_brokers {
        Some(brokers) => {
            let config = KafkaConfig {
                brokers: brokers.clone(),
                properties: args.kafka_properties.clone(),
            };
            for check in check_kafka(config, &args.usage_topic, &args.decisions_topic, args.timeout).await {
                push(check);
            }
        }
        None => push(Check::skip(
            "kafka",
            "not checked; give --kafka-brokers (TIDEMARK_KAFKA_BROKERS) to check the brokers and topics",
        )),
    }
    push(match &args.database_url {
        Some(url) => check_database(url, args.timeout).await,
        None => Check::skip(
            "database",
            "not checked; give --database-url (TIDEMARK_DATABASE_URL) to check billing's schema",
        ),
    });
    push(match &args.plans_dir {
        Some(dir) => check_plans(dir),
        None => Check::skip(
            "plans",
            "not checked; give --plans-dir (TIDEMARK_PLANS_DIR) to validate price plans",
        ),
    });
    checks
}

async fn channel(args: &DoctorArgs) -> Result<Channel, (String, String)> {
    let url = &args.collector;
    let fix_url = "set --collector to the collector's --listen address as a URL, e.g. http://collector:7400";
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| (format!("{url:?} is not a URL ({e})"), fix_url.to_owned()))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &args.collector_ca {
            let pem = std::fs::read(ca).map_err(|e| {
                (
                    format!("cannot read --collector-ca {}: {e}", ca.display()),
                    "set --collector-ca to the PEM file of the collector's CA".to_owned(),
                )
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| (format!("cannot set up TLS: {e}"), "check --collector-ca".to_owned()))?;
    } else if !url.starts_with("http://") {
        return Err((format!("{url:?} is neither http:// nor https://"), fix_url.to_owned()));
    }
    endpoint.connect().await.map_err(|e| {
        (
            format!("cannot connect to {url}: {}", error_chain(&e)),
            format!(
                "start tidemark-collector, or set --collector to its --listen address \
                 (port 7400 unless changed; in Kubernetes the collector Service, e.g. http://collector.tidemark:7400){}",
                if url.starts_with("https://") {
                    ""
                } else {
                    "; use https:// if the collector serves TLS (--tls-cert)"
                }
            ),
        )
    })
}

async fn check_collector(args: &DoctorArgs) -> Vec<Check> {
    let name = format!("collector {}", args.collector);
    let channel = match channel(args).await {
        Ok(channel) => channel,
        Err((problem, fix)) => return vec![Check::fail(name, problem, fix)],
    };
    let mut checks = Vec::new();
    let mut scaling = ScalingClient::new(channel.clone());
    let probe = scaling
        .get_decision(GetDecisionRequest {
            service: PROBE_SERVICE.to_owned(),
        })
        .await;
    let not_the_collector = "set --collector to the collector's gRPC --listen address (port 7400 unless changed), \
                             not its admin port (7401) or billing's ports (7410-7412)";
    match probe {
        Ok(_) => {}
        Err(status) if status.code() == Code::NotFound => {}
        Err(status) if status.code() == Code::Unimplemented => {
            checks.push(Check::fail(
                &name,
                "answers gRPC but not tidemark.v1.Scaling: this is not a Tidemark collector",
                not_the_collector,
            ));
            return checks;
        }
        Err(status) => {
            checks.push(Check::fail(
                &name,
                format!(
                    "tidemark.v1.Scaling/GetDecision failed: {:?}: {}",
                    status.code(),
                    status.message()
                ),
                not_the_collector,
            ));
            return checks;
        }
    }
    let mut keda = ExternalScalerClient::new(channel.clone());
    let spec = keda
        .get_metric_spec(ScaledObjectRef {
            name: PROBE_SERVICE.to_owned(),
            namespace: "tidemark-doctor".to_owned(),
            scaler_metadata: [("service".to_owned(), PROBE_SERVICE.to_owned())].into(),
        })
        .await;
    checks.push(match spec {
        Ok(_) => Check::ok(
            &name,
            "answers tidemark.v1.Scaling and KEDA's externalscaler.ExternalScaler (scalerAddress for a ScaledObject)",
        ),
        Err(status) => Check::fail(
            &name,
            format!(
                "answers tidemark.v1.Scaling but KEDA's ExternalScaler/GetMetricSpec failed: {:?}: {}",
                status.code(),
                status.message()
            ),
            "run a tidemark-collector of this version",
        ),
    });
    for service in &args.services {
        checks.push(check_decision(&mut scaling, service).await);
    }
    checks
}

async fn check_decision(scaling: &mut ScalingClient<Channel>, service: &str) -> Check {
    let name = format!("decision {service}");
    match scaling
        .get_decision(GetDecisionRequest {
            service: service.to_owned(),
        })
        .await
    {
        Ok(response) => {
            let decision = response.into_inner();
            let age = chrono::Utc::now().timestamp_micros() - decision.decided_at_unix_micros;
            let summary = decision.explanation.map(|e| e.summary).unwrap_or_default();
            Check::ok(
                name,
                format!(
                    "{} replicas, decided {}s ago: {summary}",
                    decision.desired_replicas,
                    age.max(0) / 1_000_000
                ),
            )
        }
        Err(status) if status.code() == Code::NotFound => Check::fail(
            name,
            format!("the collector holds no decision for {service:?}"),
            format!(
                "check that sidecars run with --service {service} and --collector pointing at this collector \
                 (their log says `sidecar started` and no delivery errors), and that the collector's autoscaler \
                 runs (--autoscale true); a collector that has just started may still be reading the decisions topic"
            ),
        ),
        Err(status) => Check::fail(
            name,
            format!("{:?}: {}", status.code(), status.message()),
            "give the service name the sidecars report under (their --service)",
        ),
    }
}

async fn check_kafka(config: KafkaConfig, usage_topic: &str, decisions_topic: &str, timeout: Duration) -> Vec<Check> {
    let brokers = config.brokers.clone();
    let brokers = &brokers;
    let log = match tokio::time::timeout(timeout.max(Duration::from_secs(12)), KafkaLog::open(config)).await {
        Ok(Ok(log)) => log,
        Ok(Err(e)) => {
            return vec![Check::fail(
                format!("kafka {brokers}"),
                e.to_string(),
                "set --kafka-brokers to the brokers' bootstrap host:port list (the same as the collector's and \
                 billing's), and --kafka-property for security.protocol/SASL settings if the cluster needs them",
            )];
        }
        Err(_) => {
            return vec![Check::fail(
                format!("kafka {brokers}"),
                "no broker answered in time",
                "set --kafka-brokers to the brokers' bootstrap host:port list",
            )];
        }
    };
    let mut checks = vec![Check::ok(format!("kafka {brokers}"), "a broker answers")];
    checks.push(check_topic(&log, brokers, usage_topic, TopicRole::Usage).await);
    checks.push(check_topic(&log, brokers, decisions_topic, TopicRole::Decisions).await);
    checks
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicRole {
    Usage,
    Decisions,
}

async fn check_topic(log: &KafkaLog, brokers: &str, topic: &str, role: TopicRole) -> Check {
    let name = format!("topic {topic}");
    let description = match log.describe_topic(topic).await {
        Ok(Some(d)) => d,
        Ok(None) => {
            let (spec, creator, extra) = match role {
                TopicRole::Usage => (USAGE_TOPIC_SPEC, "tidemark-collector or tidemark-billing", ""),
                TopicRole::Decisions => (
                    DECISIONS_TOPIC_SPEC,
                    "tidemark-collector",
                    " --config cleanup.policy=compact",
                ),
            };
            return Check::fail(
                name,
                "does not exist",
                format!(
                    "start {creator} once (it creates the topic), or create it: kafka-topics.sh --bootstrap-server \
                     {brokers} --create --topic {topic} --partitions {} --replication-factor 3{extra} \
                     (1 on a one-broker cluster; docs/production.md); check --usage-topic/--decisions-topic if the binaries use other names",
                    spec.partitions
                ),
            );
        }
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot describe it: {e}"),
                "give the doctor's Kafka principal Describe and DescribeConfigs on the topic",
            );
        }
    };
    let alter = |config: &str| {
        format!(
            "kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name {topic} \
             --add-config {config}"
        )
    };
    match role {
        TopicRole::Usage if description.is_compacted() => Check::fail(
            name,
            "is compacted (cleanup.policy includes compact): Kafka would keep only the newest usage batch of each \
             service and billing would lose the rest",
            alter("cleanup.policy=delete"),
        ),
        TopicRole::Decisions if !description.is_compacted() => Check::fail(
            name,
            format!(
                "is not compacted (cleanup.policy={}): retention will delete services' latest decisions and \
                 restarted collectors will not know them",
                description
                    .configs
                    .get("cleanup.policy")
                    .map_or("unknown", String::as_str)
            ),
            alter("cleanup.policy=compact"),
        ),
        _ => Check::ok(name, describe(&description, role)),
    }
}

/// `8 partitions, replication factor 3, retention 7d` and what it means.
fn describe(d: &TopicDescription, role: TopicRole) -> String {
    let mut text = format!(
        "{} partition{}, replication factor {}",
        d.partitions,
        if d.partitions == 1 { "" } else { "s" },
        d.replication_factor
    );
    match role {
        TopicRole::Usage => {
            let retention = d
                .configs
                .get("retention.ms")
                .and_then(|ms| ms.parse::<i64>().ok())
                .map_or_else(|| "unknown".to_owned(), retention);
            let _ = write!(
                text,
                ", retention {retention}; up to {} autoscalers and {} billing workers share it",
                d.partitions, d.partitions
            );
        }
        TopicRole::Decisions => text.push_str(", compacted"),
    }
    if d.replication_factor < 3 {
        text.push_str(" (fewer than 3 replicas: a broker loss can lose data; use 3 in production)");
    }
    text
}

fn retention(ms: i64) -> String {
    if ms < 0 {
        return "forever".to_owned();
    }
    let hours = ms / 3_600_000;
    if hours >= 24 && hours % 24 == 0 {
        format!("{}d", hours / 24)
    } else if hours >= 1 {
        format!("{hours}h")
    } else {
        format!("{ms}ms")
    }
}

async fn check_database(url: &str, timeout: Duration) -> Check {
    let shown = tidemark_billing::store::redact(url);
    let name = format!("database {shown}");
    let latest = tidemark_billing::store::latest_schema_version();
    let fix_url = "set --database-url to billing's --database-url (tidemark dev: sqlite:<data-dir>/billing.db)";
    let read_only = if let Some(path) = url.strip_prefix("sqlite:") {
        let file = path.trim_start_matches("//");
        let file = file.split_once('?').map_or(file, |(f, _)| f);
        if !Path::new(file).is_file() {
            return Check::fail(name, format!("there is no database file {file}"), fix_url);
        }
        if url.contains("mode=") {
            url.to_owned()
        } else {
            format!("{url}{}mode=ro", if url.contains('?') { '&' } else { '?' })
        }
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        url.to_owned()
    } else {
        return Check::fail(
            name,
            "unsupported scheme",
            "use sqlite:PATH or postgres://USER:PASSWORD@HOST:PORT/DB, as billing's --database-url",
        );
    };
    match tokio::time::timeout(timeout, schema_version(&read_only)).await {
        Err(_) => Check::fail(
            name,
            format!("no answer within {}s", timeout.as_secs_f64()),
            "check the database host and port, and that the database server runs",
        ),
        Ok(Err(SchemaError::Connect(e))) => Check::fail(
            name,
            format!("cannot connect: {e}"),
            "check host, port, user, password and database name in --database-url, and that the server runs",
        ),
        Ok(Err(SchemaError::NoSchema(e))) => Check::fail(
            name,
            format!("holds no Tidemark billing schema (no tidemark_schema table: {e})"),
            "start tidemark-billing once with this --database-url: it creates the schema; or point \
             --database-url at billing's database",
        ),
        Ok(Ok(version)) if version == latest => Check::ok(name, format!("schema version {version}, the latest")),
        Ok(Ok(0)) => Check::fail(
            name,
            "the schema was never migrated (version 0)",
            "start tidemark-billing with this --database-url: it migrates at start",
        ),
        Ok(Ok(version)) if version < latest => Check::fail(
            name,
            format!("schema version {version}, this release's billing migrates to {latest}"),
            "start this release's tidemark-billing with this --database-url: it migrates at start",
        ),
        Ok(Ok(version)) => Check::fail(
            name,
            format!("schema version {version} is newer than this release knows ({latest})"),
            "run a tidemark (and tidemark-billing) of the release that migrated this database, or newer",
        ),
    }
}

#[derive(Debug)]
enum SchemaError {
    Connect(String),
    NoSchema(String),
}

async fn schema_version(url: &str) -> Result<i64, SchemaError> {
    use sqlx::{Connection, Row};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url)
        .await
        .map_err(|e| SchemaError::Connect(e.to_string()))?;
    let version = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM tidemark_schema")
        .fetch_one(&mut conn)
        .await
        .and_then(|row| row.try_get::<i64, _>(0))
        .map_err(|e| SchemaError::NoSchema(e.to_string()));
    let _ = conn.close().await;
    version
}

fn check_plans(dir: &Path) -> Check {
    let name = format!("plans {}", dir.display());
    match tidemark_billing::pricing::load_dir(dir) {
        Ok(plans) if plans.is_empty() => Check::fail(
            name,
            "no plan files (*.toml) in it",
            "set --plans-dir to the directory of billing's price plans (e.g. billing/plans)",
        ),
        Ok(plans) => {
            let names: Vec<String> = plans.iter().map(|p| format!("{} v{}", p.name, p.version)).collect();
            Check::ok(
                name,
                format!(
                    "{} plan{} valid: {}",
                    plans.len(),
                    if plans.len() == 1 { "" } else { "s" },
                    names.join(", ")
                ),
            )
        }
        Err(e) => Check::fail(
            name,
            e.to_string(),
            "correct the file and key named (docs/pricing.md), or set --plans-dir to billing's plan directory",
        ),
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            let _ = write!(text, ": {part}");
        }
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_what_to_change() {
        let line = Check::fail("plans x", "no plan files", "set --plans-dir").to_string();
        assert_eq!(line, "FAIL  plans x: no plan files; fix: set --plans-dir");
        assert_eq!(Check::ok("a", "fine").to_string(), "ok    a: fine");
        assert!(
            Check::skip("kafka", "give --kafka-brokers")
                .to_string()
                .starts_with("skip  kafka: ")
        );
    }

    #[test]
    fn retention_reads_as_days_hours_or_forever() {
        assert_eq!(retention(604_800_000), "7d");
        assert_eq!(retention(7_200_000), "2h");
        assert_eq!(retention(-1), "forever");
        assert_eq!(retention(500), "500ms");
    }
}
