//! Billing workers on the real Kafka broker: killed with `kill -9` over and
//! over while they consume, or sharing the partitions with a second worker
//! through rebalances, they end with exactly the ground truth — nothing
//! lost, nothing counted twice — on SQLite and on Postgres.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use tidemark_e2e::{Proc, billed, fresh_postgres_database, kafka_brokers, unique_topic};
use tidemark_log::kafka::KafkaConfig;
use tidemark_log::topics::{USAGE_TOPIC_SPEC, encode_usage};
use tidemark_log::{Log, LogConfig};
use tidemark_proto::v1::{TenantUsage, UsageBatch};

const SERVICES: u64 = 12;
const SESSIONS_PER_SERVICE: u64 = 2;

/// Appends `per_session` batches for every session, starting at `first_seq`,
/// and returns the requests they carry (for tenant `acme`). Each goes to its
/// service's partition (the log key), as collectors send them.
async fn produce(log: &Log, topic: &str, first_seq: u64, per_session: u64) -> i64 {
    produce_keyed(log, topic, first_seq, per_session, |batch| {
        encode_usage(batch).0.to_vec()
    })
    .await
}

/// [`produce`] with the log key of each batch chosen by `key`.
async fn produce_keyed(
    log: &Log,
    topic: &str,
    first_seq: u64,
    per_session: u64,
    key: impl Fn(&UsageBatch) -> Vec<u8>,
) -> i64 {
    let mut total = 0;
    for seq in first_seq..first_seq + per_session {
        for service in 0..SERVICES {
            for session in 0..SESSIONS_PER_SERVICE {
                let requests = 1 + (seq * 7 + service * 3 + session) % 11;
                let batch = UsageBatch {
                    service: format!("svc-{service}"),
                    instance: format!("svc-{service}-{session}"),
                    session_id: format!("session-{service}-{session}"),
                    seq,
                    window_start_unix_micros: 1_764_000_000_000_000 + seq as i64 * 1_000_000,
                    window_end_unix_micros: 1_764_000_001_000_000 + seq as i64 * 1_000_000,
                    tenants: vec![TenantUsage {
                        tenant: "acme".into(),
                        requests,
                        ..TenantUsage::default()
                    }],
                    ..UsageBatch::default()
                };
                let (_, payload) = encode_usage(&batch);
                let key = key(&batch);
                log.append(topic, &key, payload.clone()).await.unwrap();
                // Every tenth batch is delivered twice, as after a failover.
                if seq % 10 == 3 {
                    log.append(topic, &key, payload).await.unwrap();
                }
                total += requests as i64;
            }
        }
    }
    total
}

async fn kafka(topic: &str) -> Log {
    let log = Log::open(LogConfig::Kafka(KafkaConfig {
        brokers: kafka_brokers(),
        properties: vec![("linger.ms".into(), "20".into())],
    }))
    .await
    .unwrap();
    log.ensure_topic(topic, USAGE_TOPIC_SPEC).await.unwrap();
    log
}

fn worker(database_url: &str, topic: &str) -> Proc {
    worker_with(database_url, topic, &[])
}

fn worker_with(database_url: &str, topic: &str, extra: &[&str]) -> Proc {
    let args = [
        "--api-listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        "--commit-interval=50ms",
        &format!("--database-url={database_url}"),
        &format!("--kafka-brokers={}", kafka_brokers()),
        &format!("--usage-topic={topic}"),
        &format!("--group=billing-{topic}"),
        // A killed worker's partitions move on after 6 s, not 45 s.
        "--kafka-property=session.timeout.ms=6000",
        "--kafka-property=heartbeat.interval.ms=1000",
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    Proc::start("tidemark-billing", &args)
}

/// Waits until the worker's API reports `want` requests for `acme`, then
/// checks it stays there.
async fn expect_total(worker: &Proc, want: i64) {
    let api = worker.address("billing HTTP API");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut got = billed(api, "acme", "requests").await;
    while got != want {
        assert!(got < want, "counted twice: {got} > {want}");
        assert!(tokio::time::Instant::now() < deadline, "stuck at {got}, want {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        got = billed(api, "acme", "requests").await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(billed(api, "acme", "requests").await, want, "changed after settling");
}

async fn killed_again_and_again(database_url: &str) {
    let topic = unique_topic();
    let log = kafka(&topic).await;
    let want = produce(&log, &topic, 0, 60).await;
    for round in 0..6u64 {
        let mut w = worker(database_url, &topic);
        w.address("billing HTTP API");
        // Let it get somewhere, then kill it wherever it is, commits included.
        tokio::time::sleep(Duration::from_millis(300 + round * 170)).await;
        w.kill();
    }
    let last = worker(database_url, &topic);
    expect_total(&last, want).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_commit_on_sqlite_ends_exact() {
    let dir = tempfile::tempdir().unwrap();
    killed_again_and_again(&format!("sqlite:{}", dir.path().join("billing.db").display())).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_commit_on_postgres_ends_exact() {
    killed_again_and_again(&fresh_postgres_database().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_on_postgres_through_rebalances_stay_exact() {
    let url = fresh_postgres_database().await;
    let topic = unique_topic();
    let log = kafka(&topic).await;
    let mut want = produce(&log, &topic, 0, 20).await;
    let mut first = worker(&url, &topic);
    first.address("billing HTTP API");
    want += produce(&log, &topic, 20, 20).await;
    // A second worker joins: the partitions are split between them.
    let second = worker(&url, &topic);
    second.address("billing HTTP API");
    want += produce(&log, &topic, 40, 20).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The first dies: its partitions move to the second.
    first.kill();
    want += produce(&log, &topic, 60, 20).await;
    expect_total(&second, want).await;
}

/// Every session's batches spread over several partitions (as when a topic
/// gains partitions, or a producer keys by something else), duplicates on
/// other partitions than their first copy: the transactions of one commit
/// share sessions and lock them in turn; killed in between, the worker
/// still ends exact.
#[tokio::test(flavor = "multi_thread")]
async fn parallel_commits_sharing_sessions_across_partitions_stay_exact() {
    let url = fresh_postgres_database().await;
    let topic = unique_topic();
    let log = kafka(&topic).await;
    let spread = |batch: &UsageBatch| format!("{}-{}", batch.session_id, batch.seq % 5).into_bytes();
    let mut want = produce_keyed(&log, &topic, 0, 40, spread).await;
    let mut w = worker_with(&url, &topic, &["--parallel-commits=4"]);
    w.address("billing HTTP API");
    tokio::time::sleep(Duration::from_millis(700)).await;
    w.kill();
    want += produce_keyed(&log, &topic, 40, 40, spread).await;
    let last = worker_with(&url, &topic, &["--parallel-commits=4"]);
    expect_total(&last, want).await;
}

/// One transaction of a split commit fails (a trigger refuses one session)
/// while the others commit: the worker stops, having recorded only the
/// offsets of what it committed, and once the cause is gone a worker counts
/// the rest, exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_transaction_of_a_parallel_commit_loses_nothing() {
    use sqlx::{Connection, Executor, Row};
    let url = fresh_postgres_database().await;
    tidemark_billing::store::Store::open(&url).await.unwrap();
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    db.execute(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.session_id = 'session-3-0' THEN RAISE EXCEPTION 'session-3-0 is poisoned'; END IF;
           RETURN NEW;
         END $$",
    )
    .await
    .unwrap();
    db.execute("CREATE TRIGGER poison BEFORE INSERT OR UPDATE ON session_state FOR EACH ROW EXECUTE FUNCTION poison()")
        .await
        .unwrap();
    let topic = unique_topic();
    let log = kafka(&topic).await;
    let want = produce(&log, &topic, 0, 40).await;

    let mut failing = worker_with(&url, &topic, &["--parallel-commits=4"]);
    assert!(!failing.wait_exit(Duration::from_secs(60)).success());
    assert!(failing.output().contains("poisoned"), "{}", failing.output());
    let counted: i64 =
        sqlx::query("SELECT COALESCE(SUM(quantity), 0)::BIGINT FROM usage_rollup WHERE meter = 'requests'")
            .fetch_one(&mut db)
            .await
            .unwrap()
            .get(0);
    assert!(
        0 < counted && counted < want,
        "the other transactions committed {counted} of {want}"
    );

    db.execute("DROP TRIGGER poison ON session_state").await.unwrap();
    let last = worker_with(&url, &topic, &["--parallel-commits=4"]);
    expect_total(&last, want).await;
}
