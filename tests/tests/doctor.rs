//! `tidemark doctor` against real deployments: `tidemark dev` (collector and
//! SQLite), wrong settings that must fail with what to change, and the real
//! Kafka broker after a collector created its topics. Also the read-only
//! `KafkaLog::describe_topic` the Kafka checks stand on.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tidemark_e2e::{Proc, bin, free_port, kafka_brokers, send_requests, start_dev, start_upstream, unique_topic};
use tidemark_log::TopicSpec;
use tidemark_log::kafka::{KafkaConfig, KafkaLog};

fn plans_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("billing/plans")
        .display()
        .to_string()
}

/// Runs `tidemark doctor` with `args` and no `TIDEMARK_*` variables of this
/// process (scripts/test sets the broker list, which would add Kafka checks).
fn doctor(args: &[&str]) -> (Output, String) {
    let mut command = Command::new(bin("tidemark"));
    command.arg("doctor").args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("TIDEMARK_") {
            command.env_remove(key);
        }
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (output, stdout)
}

/// The line of check `name` (`collector`, `plans`, ...).
fn line<'a>(stdout: &'a str, status: &str, name: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(status) && l[status.len()..].trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no `{status} {name}` line in:\n{stdout}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_passes_against_tidemark_dev() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path(), &[]);
    let ingest = dev.address("ingest gRPC");
    dev.address("billing HTTP API");
    let collector = format!("--collector=http://{ingest}");
    let database = format!("--database-url=sqlite:{}", dir.path().join("billing.db").display());
    let plans = format!("--plans-dir={}", plans_dir());

    let (output, stdout) = doctor(&[&collector, &database, &plans]);
    assert!(output.status.success(), "{output:?}\n{stdout}");
    assert!(line(&stdout, "ok", "collector").contains("externalscaler.ExternalScaler"));
    let latest = tidemark_billing::store::latest_schema_version();
    assert!(line(&stdout, "ok", "database").contains(&format!("schema version {latest}, the latest")));
    assert!(line(&stdout, "ok", "plans").contains("valid"));
    assert!(line(&stdout, "skip", "kafka").contains("--kafka-brokers"));

    // A service's decision: missing until a sidecar reports, then there.
    let (output, stdout) = doctor(&[&collector, "--service=shop"]);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(line(&stdout, "FAIL", "decision shop").contains("--service shop"));
    let upstream = start_upstream().await;
    let sidecar = Proc::start(
        "tidemark-sidecar",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--upstream=http://{upstream}"),
            "--service=shop",
            &format!("--collector=http://{ingest}"),
            "--report-interval=100ms",
        ],
    );
    send_requests(sidecar.address("proxy"), "acme", 5).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (output, stdout) = doctor(&[&collector, "--service=shop"]);
        if output.status.success() {
            assert!(line(&stdout, "ok", "decision shop").contains("replicas"), "{stdout}");
            break;
        }
        assert!(Instant::now() < deadline, "no decision for shop:\n{stdout}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_says_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let bad_plans = dir.path().join("plans");
    std::fs::create_dir(&bad_plans).unwrap();
    std::fs::write(bad_plans.join("broken.toml"), "name = \"broken\"\nversion = \"one\"\n").unwrap();
    let empty_db = dir.path().join("empty.db");
    std::fs::write(&empty_db, "").unwrap();

    let started = Instant::now();
    let (output, stdout) = doctor(&[
        &format!("--collector=http://127.0.0.1:{}", free_port()),
        &format!("--database-url=sqlite:{}", empty_db.display()),
        &format!("--plans-dir={}", bad_plans.display()),
        "--timeout=2s",
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}\n{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("3 of 4 checks failed"), "{stderr}");

    let collector = line(&stdout, "FAIL", "collector");
    assert!(
        collector.contains("cannot connect") && collector.contains("fix:"),
        "{collector}"
    );
    assert!(
        collector.contains("--collector") && collector.contains("--listen"),
        "{collector}"
    );
    let database = line(&stdout, "FAIL", "database");
    assert!(
        database.contains("no Tidemark billing schema") && database.contains("start tidemark-billing"),
        "{database}"
    );
    let plans = line(&stdout, "FAIL", "plans");
    assert!(plans.contains("broken.toml") && plans.contains("fix:"), "{plans}");

    // An older schema, a missing file, an empty plans directory, a port that is not the collector's.
    let old = dir.path().join("old.db");
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}?mode=rwc", old.display()))
            .await
            .unwrap();
        sqlx::raw_sql("CREATE TABLE tidemark_schema (version BIGINT NOT NULL); INSERT INTO tidemark_schema VALUES (1)")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let (_, stdout) = doctor(&[&format!("--database-url=sqlite:{}", old.display())]);
    let latest = tidemark_billing::store::latest_schema_version();
    assert!(
        line(&stdout, "FAIL", "database").contains(&format!(
            "schema version 1, this release's billing migrates to {latest}"
        )),
        "{stdout}"
    );
    let (_, stdout) = doctor(&[&format!(
        "--database-url=sqlite:{}",
        dir.path().join("nope.db").display()
    )]);
    assert!(line(&stdout, "FAIL", "database").contains("--database-url"), "{stdout}");
    let empty = tempfile::tempdir().unwrap();
    let (output, stdout) = doctor(&["--collector=none", &format!("--plans-dir={}", empty.path().display())]);
    assert!(line(&stdout, "FAIL", "plans").contains("no plan files"), "{stdout}");
    assert!(
        line(&stdout, "skip", "collector").contains("--collector none"),
        "{stdout}"
    );
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let (output, stdout) = doctor(&["--collector=none", &format!("--plans-dir={}", plans_dir())]);
    assert!(output.status.success(), "only skipped and passed checks: {stdout}");

    let data = tempfile::tempdir().unwrap();
    let dev = start_dev(data.path(), &[]);
    let admin = dev.address("metrics, healthz, readyz");
    let (output, stdout) = doctor(&[&format!("--collector=http://{admin}")]);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(line(&stdout, "FAIL", "collector").contains("--collector"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_topic_reads_partitions_and_compaction() {
    let log = KafkaLog::open(KafkaConfig {
        brokers: kafka_brokers(),
        properties: Vec::new(),
    })
    .await
    .unwrap();
    let topic = unique_topic();
    assert_eq!(
        log.describe_topic(&topic).await.unwrap(),
        None,
        "a missing topic is None"
    );
    assert_eq!(
        log.describe_topic(&topic).await.unwrap(),
        None,
        "describing does not create the topic"
    );
    log.ensure_topic(
        &topic,
        TopicSpec {
            partitions: 3,
            compacted: true,
        },
    )
    .await
    .unwrap();
    let described = log.describe_topic(&topic).await.unwrap().unwrap();
    assert_eq!((described.name.as_str(), described.partitions), (topic.as_str(), 3));
    assert!(described.replication_factor >= 1);
    assert!(described.is_compacted(), "{:?}", described.configs);
    assert!(
        described.configs.contains_key("retention.ms"),
        "{:?}",
        described.configs
    );

    let plain = unique_topic();
    log.ensure_topic(
        &plain,
        TopicSpec {
            partitions: 1,
            compacted: false,
        },
    )
    .await
    .unwrap();
    let described = log.describe_topic(&plain).await.unwrap().unwrap();
    assert!(!described.is_compacted(), "{:?}", described.configs);
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_checks_the_topics_a_collector_created() {
    let brokers = kafka_brokers();
    let usage = unique_topic();
    let decisions = unique_topic();
    let collector = Proc::start(
        "tidemark-collector",
        &[
            "--listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            &format!("--kafka-brokers={brokers}"),
            &format!("--usage-topic={usage}"),
            &format!("--decisions-topic={decisions}"),
            &format!("--autoscaler-group={}", unique_topic()),
        ],
    );
    let grpc = collector.address("ingest gRPC");
    let kafka = format!("--kafka-brokers={brokers}");
    let (output, stdout) = doctor(&[
        &format!("--collector=http://{grpc}"),
        &kafka,
        &format!("--usage-topic={usage}"),
        &format!("--decisions-topic={decisions}"),
    ]);
    assert!(output.status.success(), "{output:?}\n{stdout}");
    assert!(line(&stdout, "ok", "kafka").contains("answers"), "{stdout}");
    let spec = tidemark_log::topics::USAGE_TOPIC_SPEC;
    assert!(
        line(&stdout, "ok", &format!("topic {usage}")).contains(&format!("{} partitions", spec.partitions)),
        "{stdout}"
    );
    assert!(
        line(&stdout, "ok", &format!("topic {decisions}")).contains("compacted"),
        "{stdout}"
    );

    // A decisions topic that is not compacted, a usage topic that is, and one that is missing.
    let log = KafkaLog::open(KafkaConfig {
        brokers: brokers.clone(),
        properties: Vec::new(),
    })
    .await
    .unwrap();
    let plain = unique_topic();
    log.ensure_topic(&plain, spec).await.unwrap();
    let compacted = unique_topic();
    log.ensure_topic(
        &compacted,
        TopicSpec {
            partitions: 1,
            compacted: true,
        },
    )
    .await
    .unwrap();
    let (output, stdout) = doctor(&[
        &format!("--collector=http://{grpc}"),
        &kafka,
        &format!("--usage-topic={compacted}"),
        &format!("--decisions-topic={plain}"),
    ]);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let usage_line = line(&stdout, "FAIL", &format!("topic {compacted}"));
    assert!(usage_line.contains("cleanup.policy=delete"), "{usage_line}");
    let decisions_line = line(&stdout, "FAIL", &format!("topic {plain}"));
    assert!(
        decisions_line.contains("is not compacted") && decisions_line.contains("cleanup.policy=compact"),
        "{decisions_line}"
    );
    let missing = unique_topic();
    let (_, stdout) = doctor(&[&kafka, &format!("--usage-topic={missing}")]);
    let missing_line = line(&stdout, "FAIL", &format!("topic {missing}"));
    assert!(
        missing_line.contains("does not exist") && missing_line.contains("--partitions 8"),
        "{missing_line}"
    );
    assert_eq!(
        log.describe_topic(&missing).await.unwrap(),
        None,
        "the doctor created nothing"
    );

    // Brokers that are not there.
    let (output, stdout) = doctor(&[&format!("--kafka-brokers=127.0.0.1:{}", free_port()), "--timeout=2s"]);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(line(&stdout, "FAIL", "kafka").contains("--kafka-brokers"), "{stdout}");
}
