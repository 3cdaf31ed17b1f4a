//! The Kafka backend, through rdkafka.
//!
//! The producer is idempotent with `acks=all`, so an append that returns has
//! been written to every in-sync replica exactly once. Consumers never
//! auto-commit: offsets move only when the caller commits them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

use crate::{LogError, Position, Record, TopicSpec, Watermarks, validate_group};

/// How long to wait for the brokers at start before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an append may wait for the brokers' acknowledgement.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach Kafka.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (`bootstrap.servers`).
    pub brokers: String,
    /// Extra librdkafka properties applied to every client, e.g. `linger.ms`.
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }
}

/// The producing side of the Kafka backend. Cheap to clone.
#[derive(Clone)]
pub struct KafkaLog {
    config: KafkaConfig,
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.config.brokers)
            .finish()
    }
}

fn kafka_err(action: &'static str) -> impl FnOnce(KafkaError) -> LogError {
    move |source| LogError::Kafka { action, source }
}

impl KafkaLog {
    /// Creates the producer and checks that the brokers answer.
    pub async fn open(config: KafkaConfig) -> Result<KafkaLog, LogError> {
        let producer: FutureProducer = config
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", DELIVERY_TIMEOUT.as_millis().to_string())
            .create()
            .map_err(kafka_err("create producer"))?;
        let probe = producer.clone();
        let brokers = config.brokers.clone();
        tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, Timeout::After(CONNECT_TIMEOUT))
                .map(|_| ())
        })
        .await
        .map_err(|_| LogError::Closed)?
        .map_err(|e| LogError::Unreachable {
            brokers,
            reason: format!("no broker answered within {}s ({e})", CONNECT_TIMEOUT.as_secs()),
        })?;
        Ok(KafkaLog { config, producer })
    }

    /// Creates the topic unless it exists. The replication factor is the
    /// broker's default.
    pub async fn ensure_topic(&self, topic: &str, spec: TopicSpec) -> Result<(), LogError> {
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client_config()
            .create()
            .map_err(kafka_err("create admin client"))?;
        let partitions = i32::try_from(spec.partitions.max(1)).unwrap_or(i32::MAX);
        let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
        if spec.compacted {
            new_topic = new_topic.set("cleanup.policy", "compact");
        }
        let options = AdminOptions::new().operation_timeout(Some(CONNECT_TIMEOUT));
        let results = admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(kafka_err("create topic"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Kafka {
                        action: "create topic",
                        source: KafkaError::AdminOp(code),
                    })
                    .inspect_err(|_| tracing::error!(topic = %name, "cannot create topic"));
                }
            }
        }
        Ok(())
    }

    pub async fn append(&self, topic: &str, key: &[u8], payload: Bytes) -> Result<Position, LogError> {
        let record = FutureRecord::to(topic).key(key).payload(&payload[..]);
        let delivery = self
            .producer
            .send(record, Timeout::After(DELIVERY_TIMEOUT))
            .await
            .map_err(|(e, _)| LogError::Kafka {
                action: "append",
                source: e,
            })?;
        Ok(Position {
            partition: delivery.partition,
            offset: delivery.offset,
        })
    }

    /// Each partition's low and high watermarks, asked of its leader.
    pub async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        let producer = self.producer.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let client = producer.client();
            let metadata = client
                .fetch_metadata(Some(&topic), Timeout::After(CONNECT_TIMEOUT))
                .map_err(kafka_err("read topic metadata"))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(LogError::Kafka {
                    action: "read topic metadata",
                    source: KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition),
                });
            }
            let mut marks = Vec::with_capacity(partitions.len());
            for partition in partitions {
                let (low, high) = client
                    .fetch_watermarks(&topic, partition, Timeout::After(CONNECT_TIMEOUT))
                    .map_err(kafka_err("read watermarks"))?;
                marks.push(Watermarks { partition, low, high });
            }
            marks.sort_by_key(|w| w.partition);
            Ok(marks)
        })
        .await
        .map_err(|_| LogError::Closed)?
    }

    pub fn consumer(&self, topic: &str, group: &str) -> Result<KafkaConsumer, LogError> {
        validate_group(group)?;
        let consumer: StreamConsumer = self
            .config
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(kafka_err("create consumer"))?;
        consumer.subscribe(&[topic]).map_err(kafka_err("subscribe"))?;
        Ok(KafkaConsumer {
            topic: topic.to_owned(),
            consumer: Arc::new(consumer),
            grouped: true,
        })
    }

    /// Assigns every partition of `topic` from its beginning, with no group
    /// membership: nothing is coordinated and nothing can be committed.
    pub async fn reader(&self, topic: &str) -> Result<KafkaConsumer, LogError> {
        let consumer: StreamConsumer = self
            .config
            .client_config()
            // librdkafka wants a group id even for assign(); it is never joined.
            .set("group.id", "tidemark-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(kafka_err("create reader"))?;
        let consumer = Arc::new(consumer);
        let probe = Arc::clone(&consumer);
        let name = topic.to_owned();
        let partitions = tokio::task::spawn_blocking(move || {
            probe
                .fetch_metadata(Some(&name), Timeout::After(CONNECT_TIMEOUT))
                .map(|m| m.topics().first().map_or(0, |t| t.partitions().len()))
        })
        .await
        .map_err(|_| LogError::Closed)?
        .map_err(kafka_err("read topic metadata"))?;
        let mut list = TopicPartitionList::new();
        for p in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
            list.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(kafka_err("assign"))?;
        }
        consumer.assign(&list).map_err(kafka_err("assign"))?;
        Ok(KafkaConsumer {
            topic: topic.to_owned(),
            consumer,
            grouped: false,
        })
    }
}

/// A consumer-group member on one Kafka topic, or a reader of all of it.
pub struct KafkaConsumer {
    topic: String,
    consumer: Arc<StreamConsumer>,
    grouped: bool,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer").field("topic", &self.topic).finish()
    }
}

impl KafkaConsumer {
    pub async fn recv(&mut self) -> Result<Record, LogError> {
        let message = self.consumer.recv().await.map_err(kafka_err("receive"))?;
        Ok(Record {
            partition: message.partition(),
            offset: message.offset(),
            key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            timestamp_millis: message.timestamp().to_millis().unwrap_or(0),
        })
    }

    pub async fn seek(&mut self, partition: i32, offset: i64) -> Result<(), LogError> {
        let consumer = Arc::clone(&self.consumer);
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Timeout::After(CONNECT_TIMEOUT),
            )
        })
        .await
        .map_err(|_| LogError::Closed)?
        .map_err(kafka_err("seek"))
    }

    pub fn assigned_partitions(&self) -> Result<Vec<i32>, LogError> {
        let list = self.consumer.assignment().map_err(kafka_err("read assignment"))?;
        Ok(list
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect())
    }

    pub async fn commit(&mut self, next_offsets: &[(i32, i64)]) -> Result<(), LogError> {
        if !self.grouped {
            return Err(LogError::NoGroup(self.topic.clone()));
        }
        let mut list = TopicPartitionList::new();
        for &(partition, offset) in next_offsets {
            list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(kafka_err("commit"))?;
        }
        let consumer = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .map_err(|_| LogError::Closed)?
            .map_err(kafka_err("commit"))
    }
}

/// A topic as the brokers have it: for checks such as `tidemark doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    pub name: String,
    /// Number of partitions.
    pub partitions: usize,
    /// The fewest replicas any partition has.
    pub replication_factor: usize,
    /// The topic's effective configuration (`cleanup.policy`, `retention.ms`,
    /// `min.insync.replicas`, ...), defaults included, sensitive values left out.
    pub configs: std::collections::BTreeMap<String, String>,
}

impl TopicDescription {
    /// Whether Kafka compacts the topic (`cleanup.policy` includes `compact`).
    pub fn is_compacted(&self) -> bool {
        self.configs
            .get("cleanup.policy")
            .is_some_and(|p| p.split(',').any(|p| p.trim() == "compact"))
    }
}

impl KafkaLog {
    /// Describes `topic`, read-only: its partitions and replicas from the
    /// cluster metadata and its configuration from the brokers. `None` if
    /// the topic does not exist. Asks for the metadata of every topic, so
    /// that a broker with `auto.create.topics.enable` never creates it.
    pub async fn describe_topic(&self, topic: &str) -> Result<Option<TopicDescription>, LogError> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let found = tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(None, Timeout::After(CONNECT_TIMEOUT))
                .map_err(kafka_err("read cluster metadata"))?;
            Ok::<_, LogError>(
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map(|t| {
                        let replicas = t.partitions().iter().map(|p| p.replicas().len()).min();
                        (t.partitions().len(), replicas.unwrap_or(0))
                    }),
            )
        })
        .await
        .map_err(|_| LogError::Closed)??;
        let Some((partitions, replication_factor)) = found else {
            return Ok(None);
        };
        let admin: AdminClient<DefaultClientContext> = self
            .config
            .client_config()
            .create()
            .map_err(kafka_err("create admin client"))?;
        let options = AdminOptions::new().request_timeout(Some(CONNECT_TIMEOUT));
        let resource = rdkafka::admin::ResourceSpecifier::Topic(topic);
        let results = admin
            .describe_configs([&resource], &options)
            .await
            .map_err(kafka_err("describe topic configs"))?;
        let mut configs = std::collections::BTreeMap::new();
        for result in results {
            let resource = result.map_err(|code| LogError::Kafka {
                action: "describe topic configs",
                source: KafkaError::AdminOp(code),
            })?;
            for entry in resource.entries {
                if let (false, Some(value)) = (entry.is_sensitive, entry.value) {
                    configs.insert(entry.name, value);
                }
            }
        }
        Ok(Some(TopicDescription {
            name: topic.to_owned(),
            partitions,
            replication_factor,
            configs,
        }))
    }
}
