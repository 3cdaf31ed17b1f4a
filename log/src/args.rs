//! The flags that point a binary at Kafka, shared by the collector and billing.

use clap::Args;

use crate::kafka::KafkaConfig;
use crate::topics::USAGE_TOPIC;

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, comma-separated `host:port`.
    #[arg(long, env = "TIDEMARK_KAFKA_BROKERS")]
    pub kafka_brokers: String,

    /// Extra librdkafka property for every Kafka client, `KEY=VALUE`; repeatable.
    #[arg(long = "kafka-property", env = "TIDEMARK_KAFKA_PROPERTY", value_parser = key_value, value_delimiter = ',')]
    pub kafka_properties: Vec<(String, String)>,

    /// Topic that carries usage batches.
    #[arg(long, env = "TIDEMARK_USAGE_TOPIC", default_value = USAGE_TOPIC)]
    pub usage_topic: String,
}

impl KafkaArgs {
    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            properties: self.kafka_properties.clone(),
        }
    }
}

/// Parses `KEY=VALUE` (a clap value parser for `--kafka-property`).
pub fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}
