//! The usage log: the spine every part of Tidemark reads from or writes to.
//!
//! One interface ([`Log`], [`Consumer`]) with two backends:
//! - [`kafka`]: Apache Kafka through rdkafka, for more than one machine;
//! - [`embedded`]: append-only files on local disk, for one machine
//!   (`tidemark dev`), with the same guarantees: an append returns only once
//!   the record is durable, records keep their order within a partition, and
//!   a consumer group resumes from the offsets it committed.
//!
//! Records are keyed; all records of one key land in one partition, in order.
//! [`topics`] names the topics and encodes what goes into them.

pub mod args;
pub mod embedded;
pub mod kafka;
pub mod topics;

use std::path::PathBuf;

use bytes::Bytes;
use thiserror::Error;

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Bytes,
    pub payload: Bytes,
    /// When the log stored the record, milliseconds since the Unix epoch.
    pub timestamp_millis: i64,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Which offsets a partition holds: `[low, high)`. `high` is the offset the
/// next append gets (Kafka's high-water mark); `low` is the first offset
/// still held (above 0 once Kafka's retention deleted older records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
}

/// How a topic is created when it does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicSpec {
    pub partitions: u32,
    /// Keep only the newest record per key (Kafka's `cleanup.policy=compact`).
    pub compacted: bool,
}

/// Everything that can go wrong with the log.
#[derive(Debug, Error)]
pub enum LogError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach Kafka at {brokers}: {reason}")]
    Unreachable { brokers: String, reason: String },
    #[error("Kafka: {action}: {source}")]
    Kafka {
        action: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("consumer group name {0:?} is not valid: use 1 to 128 ASCII letters, digits, '.', '_' or '-'")]
    InvalidGroup(String),
    #[error("consumer group {group:?} already has a member reading topic {topic:?} in this process")]
    GroupBusy { topic: String, group: String },
    #[error("partition {partition} does not exist in topic {topic:?}")]
    NoSuchPartition { topic: String, partition: i32 },
    #[error("a reader of topic {0:?} belongs to no consumer group, so it has no offsets to commit")]
    NoGroup(String),
    #[error("the log is closed")]
    Closed,
    #[error(
        "topic {topic:?} partition {partition}: no record for {waited_secs}s after offset {reached}, short of its end {end}"
    )]
    Stalled {
        topic: String,
        partition: i32,
        reached: i64,
        end: i64,
        waited_secs: u64,
    },
}

/// Which backend to open, and how.
#[derive(Debug, Clone)]
pub enum LogConfig {
    Kafka(kafka::KafkaConfig),
    Embedded(embedded::EmbeddedConfig),
}

/// A handle on the log. Cheap to clone; clones share connections and files.
#[derive(Debug, Clone)]
pub enum Log {
    Kafka(kafka::KafkaLog),
    Embedded(embedded::EmbeddedLog),
}

impl Log {
    /// Opens the log. For Kafka this checks that the brokers answer, so a
    /// wrong address fails here, at start, rather than at the first append.
    pub async fn open(config: LogConfig) -> Result<Log, LogError> {
        Ok(match config {
            LogConfig::Kafka(c) => Log::Kafka(kafka::KafkaLog::open(c).await?),
            LogConfig::Embedded(c) => Log::Embedded(embedded::EmbeddedLog::open(c)?),
        })
    }

    /// Creates `topic` if it does not exist yet.
    pub async fn ensure_topic(&self, topic: &str, spec: TopicSpec) -> Result<(), LogError> {
        match self {
            Log::Kafka(log) => log.ensure_topic(topic, spec).await,
            Log::Embedded(log) => log.ensure_topic(topic, spec).await,
        }
    }

    /// Appends one record and returns once the log holds it durably.
    pub async fn append(&self, topic: &str, key: &[u8], payload: Bytes) -> Result<Position, LogError> {
        match self {
            Log::Kafka(log) => log.append(topic, key, payload).await,
            Log::Embedded(log) => log.append(topic, key, payload).await,
        }
    }

    /// Joins consumer group `group` on `topic`. Without a committed offset a
    /// partition is read from its beginning.
    pub async fn consumer(&self, topic: &str, group: &str) -> Result<Consumer, LogError> {
        Ok(match self {
            Log::Kafka(log) => Consumer::Kafka(log.consumer(topic, group)?),
            Log::Embedded(log) => Consumer::Embedded(log.consumer(topic, group).await?),
        })
    }

    /// Reads every partition of `topic` from its beginning and then follows
    /// it, outside any consumer group (so it cannot commit). This is how each
    /// collector reads the whole compacted decisions topic.
    pub async fn reader(&self, topic: &str) -> Result<Consumer, LogError> {
        Ok(match self {
            Log::Kafka(log) => Consumer::Kafka(log.reader(topic).await?),
            Log::Embedded(log) => Consumer::Embedded(log.reader(topic).await?),
        })
    }

    /// The offsets each partition of `topic` holds now, by partition.
    pub async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        match self {
            Log::Kafka(log) => log.watermarks(topic).await,
            Log::Embedded(log) => log.watermarks(topic).await,
        }
    }

    /// Reads every partition of `topic` from its beginning up to the end it
    /// has now (its [`Log::watermarks`]), outside any consumer group, and
    /// then says it is done: for audits such as `tidemark reconcile`.
    pub async fn snapshot(&self, topic: &str) -> Result<Snapshot, LogError> {
        let watermarks = self.watermarks(topic).await?;
        let consumer = self.reader(topic).await?;
        Ok(Snapshot::new(topic, consumer, watermarks))
    }
}

/// How long a [`Snapshot`] waits for the next record of a partition short
/// of its end before it gives up.
pub const SNAPSHOT_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// A whole-topic reader that stops at the watermarks taken when it was
/// made; records appended later are left out. See [`Log::snapshot`].
#[derive(Debug)]
pub struct Snapshot {
    topic: String,
    consumer: Consumer,
    watermarks: Vec<Watermarks>,
    /// Partitions not read to their end yet: next offset expected, end.
    remaining: std::collections::BTreeMap<i32, (i64, i64)>,
    stall: std::time::Duration,
}

impl Snapshot {
    fn new(topic: &str, consumer: Consumer, watermarks: Vec<Watermarks>) -> Snapshot {
        let remaining = watermarks
            .iter()
            .filter(|w| w.high > w.low)
            .map(|w| (w.partition, (w.low, w.high)))
            .collect();
        Snapshot {
            topic: topic.to_owned(),
            consumer,
            watermarks,
            remaining,
            stall: SNAPSHOT_STALL,
        }
    }

    /// How long to wait for a record short of a partition's end (default
    /// [`SNAPSHOT_STALL`]).
    pub fn with_stall_timeout(mut self, stall: std::time::Duration) -> Snapshot {
        self.stall = stall;
        self
    }

    /// The watermarks the snapshot reads up to.
    pub fn watermarks(&self) -> &[Watermarks] {
        &self.watermarks
    }

    /// The next record below the watermarks, or `None` once every partition
    /// has been read to its end. Fails with [`LogError::Stalled`] if no
    /// record comes for the stall timeout while a partition is short of it.
    pub async fn next(&mut self) -> Result<Option<Record>, LogError> {
        loop {
            let Some((&partition, &(reached, end))) = self.remaining.iter().next() else {
                return Ok(None);
            };
            let record = match tokio::time::timeout(self.stall, self.consumer.recv()).await {
                Ok(record) => record?,
                Err(_) => {
                    return Err(LogError::Stalled {
                        topic: self.topic.clone(),
                        partition,
                        reached,
                        end,
                        waited_secs: self.stall.as_secs(),
                    });
                }
            };
            let Some(&(_, end)) = self.remaining.get(&record.partition) else {
                continue; // a partition read to its end already, or empty
            };
            if record.offset >= end {
                continue; // appended after the snapshot began
            }
            if record.offset + 1 >= end {
                self.remaining.remove(&record.partition);
            } else {
                self.remaining.insert(record.partition, (record.offset + 1, end));
            }
            return Ok(Some(record));
        }
    }
}

/// A member of a consumer group, or a whole-topic reader ([`Log::reader`]).
/// Offsets are the caller's: nothing is committed unless
/// [`Consumer::commit`] says so.
#[derive(Debug)]
pub enum Consumer {
    Kafka(kafka::KafkaConsumer),
    Embedded(embedded::EmbeddedConsumer),
}

impl Consumer {
    /// Waits for the next record.
    pub async fn recv(&mut self) -> Result<Record, LogError> {
        match self {
            Consumer::Kafka(c) => c.recv().await,
            Consumer::Embedded(c) => c.recv().await,
        }
    }

    /// Makes the next [`Consumer::recv`] from `partition` return `offset`.
    pub async fn seek(&mut self, partition: i32, offset: i64) -> Result<(), LogError> {
        match self {
            Consumer::Kafka(c) => c.seek(partition, offset).await,
            Consumer::Embedded(c) => c.seek(partition, offset),
        }
    }

    /// The partitions this member reads now. A group's assignment moves
    /// with rebalances; a reader and an embedded member read them all.
    pub fn assigned_partitions(&self) -> Result<Vec<i32>, LogError> {
        match self {
            Consumer::Kafka(c) => c.assigned_partitions(),
            Consumer::Embedded(c) => Ok(c.partitions()),
        }
    }

    /// Commits, for each `(partition, next_offset)`, the offset of the next
    /// record the group should read from that partition.
    pub async fn commit(&mut self, next_offsets: &[(i32, i64)]) -> Result<(), LogError> {
        match self {
            Consumer::Kafka(c) => c.commit(next_offsets).await,
            Consumer::Embedded(c) => c.commit(next_offsets).await,
        }
    }
}

/// Consumer group names are used as file names by the embedded backend.
fn validate_group(group: &str) -> Result<(), LogError> {
    let ok = !group.is_empty()
        && group.len() <= 128
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(LogError::InvalidGroup(group.to_owned()))
    }
}
