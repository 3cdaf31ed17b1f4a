//! The decisions topic, both ways: the autoscaler appends each new decision;
//! every collector follows the whole topic into its [`DecisionBoard`].
//!
//! Going through the log, not straight to the local board, is what lets any
//! collector answer for any service: the autoscaler that decided may run in
//! another process.

use std::sync::Arc;

use tidemark_log::topics::{decode_decision, encode_decision};
use tidemark_log::{Log, LogError};
use tidemark_proto::v1::ScalingDecision;
use tidemark_runtime::shutdown::Shutdown;

use crate::board::DecisionBoard;

/// Appends one decision to `topic`, returning once the log holds it.
pub async fn append(log: &Log, topic: &str, decision: &ScalingDecision) -> Result<(), LogError> {
    let (key, payload) = encode_decision(decision);
    log.append(topic, &key, payload).await.map(|_| ())
}

/// Reads `topic` from its beginning into `board`, then follows it until
/// `shutdown` fires. A record that does not decode is skipped with a warning:
/// one bad record must not blind the board to every later decision.
pub async fn follow(
    log: Log,
    topic: String,
    board: Arc<DecisionBoard>,
    mut shutdown: Shutdown,
) -> Result<(), LogError> {
    let mut reader = log.reader(&topic).await?;
    loop {
        let record = tokio::select! {
            record = reader.recv() => record?,
            () = shutdown.wait() => return Ok(()),
        };
        match decode_decision(&record.payload) {
            Ok(decision) => {
                board.publish(decision);
            }
            Err(e) => tracing::warn!(
                %topic, partition = record.partition, offset = record.offset, error = %e,
                "skipping a record that is not a scaling decision"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tidemark_log::LogConfig;
    use tidemark_log::embedded::EmbeddedConfig;
    use tidemark_log::topics::{DECISIONS_TOPIC, DECISIONS_TOPIC_SPEC};

    use super::*;

    fn decision(service: &str, at: i64, replicas: u32) -> ScalingDecision {
        ScalingDecision {
            decision_id: format!("{service}-{at}"),
            service: service.into(),
            decided_at_unix_micros: at,
            desired_replicas: replicas,
            ..ScalingDecision::default()
        }
    }

    #[tokio::test]
    async fn the_board_learns_past_and_new_decisions_and_skips_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
            dir: dir.path().to_path_buf(),
        }))
        .await
        .expect("log");
        log.ensure_topic(DECISIONS_TOPIC, DECISIONS_TOPIC_SPEC)
            .await
            .expect("topic");
        append(&log, DECISIONS_TOPIC, &decision("a", 1, 2))
            .await
            .expect("append");
        append(&log, DECISIONS_TOPIC, &decision("a", 2, 5))
            .await
            .expect("append");
        log.append(DECISIONS_TOPIC, b"b", Bytes::from_static(b"\xff\xff\xff"))
            .await
            .expect("append garbage");

        let board = DecisionBoard::new();
        let (trigger, shutdown) = tidemark_runtime::shutdown::channel();
        let mut feed = board.subscribe();
        let task = tokio::spawn(follow(
            log.clone(),
            DECISIONS_TOPIC.into(),
            Arc::clone(&board),
            shutdown,
        ));
        append(&log, DECISIONS_TOPIC, &decision("b", 3, 1))
            .await
            .expect("append");
        let mut fed = Vec::new();
        while fed.len() < 3 {
            let d = tokio::time::timeout(Duration::from_secs(5), feed.recv())
                .await
                .expect("a decision within 5s")
                .expect("feed open");
            fed.push((d.service, d.desired_replicas));
        }
        assert_eq!(fed, [("a".into(), 2), ("a".into(), 5), ("b".into(), 1)]);
        assert_eq!(board.get("a").map(|d| d.desired_replicas), Some(5));
        trigger.fire();
        task.await.expect("join").expect("follow ends cleanly on shutdown");
    }
}
