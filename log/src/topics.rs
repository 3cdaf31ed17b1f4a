//! Topic names, keys and record encoding.

use bytes::Bytes;
use prost::Message;
use tidemark_proto::v1::{ScalingDecision, UsageBatch};

use crate::TopicSpec;

/// Every usage batch, protobuf-encoded, keyed by service name.
pub const USAGE_TOPIC: &str = "tidemark.usage.v1";
/// The latest scaling decision per service, compacted, keyed by service name.
pub const DECISIONS_TOPIC: &str = "tidemark.decisions.v1";

/// How the usage topic is created when missing.
pub const USAGE_TOPIC_SPEC: TopicSpec = TopicSpec {
    partitions: 8,
    compacted: false,
};

/// How the decisions topic is created when missing: compacted, so it holds
/// the latest decision per service and a reader can take it whole at start.
pub const DECISIONS_TOPIC_SPEC: TopicSpec = TopicSpec {
    partitions: 1,
    compacted: true,
};

/// A usage batch as it is stored in the log: key and payload.
pub fn encode_usage(batch: &UsageBatch) -> (Bytes, Bytes) {
    (
        Bytes::copy_from_slice(batch.service.as_bytes()),
        Bytes::from(batch.encode_to_vec()),
    )
}

/// Reads a usage batch back from a record's payload.
pub fn decode_usage(payload: &[u8]) -> Result<UsageBatch, prost::DecodeError> {
    UsageBatch::decode(payload)
}

/// A scaling decision as it is stored in the log: key (service) and payload.
pub fn encode_decision(decision: &ScalingDecision) -> (Bytes, Bytes) {
    (
        Bytes::copy_from_slice(decision.service.as_bytes()),
        Bytes::from(decision.encode_to_vec()),
    )
}

/// Reads a scaling decision back from a record's payload.
pub fn decode_decision(payload: &[u8]) -> Result<ScalingDecision, prost::DecodeError> {
    ScalingDecision::decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_round_trips_and_is_keyed_by_service() {
        let batch = UsageBatch {
            service: "checkout".into(),
            session_id: "s".into(),
            seq: 9,
            ..UsageBatch::default()
        };
        let (key, payload) = encode_usage(&batch);
        assert_eq!(&key[..], b"checkout");
        assert_eq!(decode_usage(&payload), Ok(batch));
        assert!(decode_usage(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn decisions_round_trip_and_are_keyed_by_service() {
        let decision = ScalingDecision {
            decision_id: "d".into(),
            service: "checkout".into(),
            desired_replicas: 4,
            ..ScalingDecision::default()
        };
        let (key, payload) = encode_decision(&decision);
        assert_eq!(&key[..], b"checkout");
        assert_eq!(decode_decision(&payload), Ok(decision));
    }
}
