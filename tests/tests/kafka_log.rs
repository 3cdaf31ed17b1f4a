//! The Kafka backend of the usage log against the real broker.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use tidemark_e2e::{kafka_brokers, unique_topic};
use tidemark_log::kafka::KafkaConfig;
use tidemark_log::{Log, LogConfig, TopicSpec};

const RECORDS: usize = 30;
const FIRST_READ: usize = 12;

#[tokio::test(flavor = "multi_thread")]
async fn a_group_resumes_from_its_committed_offsets_with_nothing_lost_or_repeated() {
    let log = Log::open(LogConfig::Kafka(KafkaConfig {
        brokers: kafka_brokers(),
        properties: Vec::new(),
    }))
    .await
    .expect("the broker answers");
    let topic = unique_topic();
    let spec = TopicSpec {
        partitions: 3,
        compacted: false,
    };
    log.ensure_topic(&topic, spec).await.expect("topic");
    log.ensure_topic(&topic, spec)
        .await
        .expect("creating an existing topic is fine");

    let mut sent = BTreeSet::new();
    for i in 0..RECORDS {
        let key = format!("service-{}", i % 5);
        let payload = format!("record-{i}");
        log.append(&topic, key.as_bytes(), Bytes::from(payload.clone()))
            .await
            .expect("append");
        sent.insert(payload);
    }

    let mut seen = BTreeSet::new();
    {
        let mut consumer = log.consumer(&topic, "round-trip").await.expect("consumer");
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for _ in 0..FIRST_READ {
            let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("a record within 30s")
                .expect("recv");
            assert!(seen.insert(String::from_utf8(record.payload.to_vec()).unwrap()));
            next.insert(record.partition, record.offset + 1);
        }
        let mut assigned = consumer.assigned_partitions().expect("assignment");
        assigned.sort_unstable();
        assert_eq!(
            assigned,
            [0, 1, 2],
            "the only member of the group reads every partition"
        );
        let offsets: Vec<(i32, i64)> = next.into_iter().collect();
        consumer.commit(&offsets).await.expect("commit");
    } // the consumer leaves the group here

    let mut consumer = log.consumer(&topic, "round-trip").await.expect("consumer again");
    for _ in FIRST_READ..RECORDS {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("a record within 30s")
            .expect("recv");
        let payload = String::from_utf8(record.payload.to_vec()).unwrap();
        assert!(seen.insert(payload.clone()), "{payload} was delivered twice");
    }
    assert_eq!(seen, sent, "every record exactly once");
    let extra = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await;
    assert!(extra.is_err(), "nothing beyond what was sent: {extra:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_sees_every_partition_from_the_beginning_and_follows() {
    let log = Log::open(LogConfig::Kafka(KafkaConfig {
        brokers: kafka_brokers(),
        properties: Vec::new(),
    }))
    .await
    .expect("the broker answers");
    let topic = unique_topic();
    let spec = TopicSpec {
        partitions: 3,
        compacted: true,
    };
    log.ensure_topic(&topic, spec).await.expect("topic");
    for i in 0..9 {
        log.append(&topic, format!("service-{i}").as_bytes(), Bytes::from(format!("{i}")))
            .await
            .expect("append");
    }
    let mut reader = log.reader(&topic).await.expect("reader");
    let mut seen = BTreeSet::new();
    for _ in 0..9 {
        let record = tokio::time::timeout(Duration::from_secs(30), reader.recv())
            .await
            .expect("a record within 30s")
            .expect("recv");
        seen.insert(String::from_utf8(record.payload.to_vec()).unwrap());
    }
    assert_eq!(seen, (0..9).map(|i| i.to_string()).collect());
    log.append(&topic, b"service-new", Bytes::from_static(b"new"))
        .await
        .expect("append");
    let record = tokio::time::timeout(Duration::from_secs(30), reader.recv())
        .await
        .expect("the reader follows new records")
        .expect("recv");
    assert_eq!(&record.payload[..], b"new");
    assert!(
        reader.commit(&[(0, 1)]).await.is_err(),
        "a reader has no group to commit to"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watermarks_give_each_partitions_end_and_a_snapshot_reads_up_to_them() {
    let log = Log::open(LogConfig::Kafka(KafkaConfig {
        brokers: kafka_brokers(),
        properties: Vec::new(),
    }))
    .await
    .expect("the broker answers");
    let topic = unique_topic();
    let spec = TopicSpec {
        partitions: 3,
        compacted: false,
    };
    log.ensure_topic(&topic, spec).await.expect("topic");
    let empty = log.watermarks(&topic).await.expect("watermarks");
    assert_eq!(
        empty.iter().map(|w| (w.partition, w.low, w.high)).collect::<Vec<_>>(),
        [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    );
    let mut appended: BTreeMap<i32, i64> = BTreeMap::new();
    for i in 0..RECORDS {
        let at = log
            .append(
                &topic,
                format!("service-{}", i % 5).as_bytes(),
                Bytes::from(i.to_string()),
            )
            .await
            .expect("append");
        let next = appended.entry(at.partition).or_insert(0);
        *next = (*next).max(at.offset + 1);
    }
    let marks = log.watermarks(&topic).await.expect("watermarks");
    for w in &marks {
        assert_eq!(
            (w.low, w.high),
            (0, appended.get(&w.partition).copied().unwrap_or(0)),
            "{w:?}"
        );
    }

    let mut snapshot = log.snapshot(&topic).await.expect("snapshot");
    log.append(&topic, b"service-0", Bytes::from_static(b"after"))
        .await
        .expect("append");
    let mut seen = BTreeSet::new();
    while let Some(record) = tokio::time::timeout(Duration::from_secs(60), snapshot.next())
        .await
        .expect("the snapshot ends")
        .expect("next")
    {
        assert!(seen.insert(String::from_utf8(record.payload.to_vec()).unwrap()));
    }
    assert_eq!(seen, (0..RECORDS).map(|i| i.to_string()).collect());
}
