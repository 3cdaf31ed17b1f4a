//! The decision board: the latest scaling decision of every service, and a
//! feed of every new one.
//!
//! Each collector fills its board from the whole `tidemark.decisions.v1`
//! topic, so any collector can answer for any service whichever autoscaler
//! decided it. The gRPC watchers, the KEDA scaler and the hooks read from
//! here and never from the log.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tidemark_proto::v1::ScalingDecision;
use tokio::sync::broadcast;

/// Decisions a slow subscriber may fall behind by before it misses some;
/// a subscriber that lags re-reads [`DecisionBoard::snapshot`].
const FEED_CAPACITY: usize = 1024;

#[derive(Debug)]
pub struct DecisionBoard {
    latest: RwLock<HashMap<String, ScalingDecision>>,
    feed: broadcast::Sender<ScalingDecision>,
}

impl DecisionBoard {
    pub fn new() -> Arc<DecisionBoard> {
        Arc::new(DecisionBoard {
            latest: RwLock::new(HashMap::new()),
            feed: broadcast::channel(FEED_CAPACITY).0,
        })
    }

    /// Records `decision` unless the board already holds the same or a newer
    /// one for its service (a re-read topic or a late record changes
    /// nothing). Returns whether it was new.
    pub fn publish(&self, decision: ScalingDecision) -> bool {
        let mut latest = self.latest.write().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = latest.get(&decision.service)
            && (held.decided_at_unix_micros, &held.decision_id)
                >= (decision.decided_at_unix_micros, &decision.decision_id)
        {
            return false;
        }
        latest.insert(decision.service.clone(), decision.clone());
        // Sent under the lock, so the feed's order is the board's order.
        // No subscriber is not an error: the board still holds the decision.
        let _ = self.feed.send(decision);
        true
    }

    /// The latest decision for `service`.
    pub fn get(&self, service: &str) -> Option<ScalingDecision> {
        self.read().get(service).cloned()
    }

    /// The latest decision of every service, ordered by service name.
    pub fn snapshot(&self) -> Vec<ScalingDecision> {
        let mut all: Vec<_> = self.read().values().cloned().collect();
        all.sort_by(|a, b| a.service.cmp(&b.service));
        all
    }

    /// Every decision published from now on. Subscribe before reading the
    /// snapshot so nothing falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<ScalingDecision> {
        self.feed.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, ScalingDecision>> {
        self.latest.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(service: &str, id: &str, at: i64, replicas: u32) -> ScalingDecision {
        ScalingDecision {
            decision_id: id.into(),
            service: service.into(),
            decided_at_unix_micros: at,
            desired_replicas: replicas,
            ..ScalingDecision::default()
        }
    }

    #[test]
    fn keeps_the_newest_decision_per_service_and_feeds_only_new_ones() {
        let board = DecisionBoard::new();
        let mut feed = board.subscribe();
        assert!(board.publish(decision("a", "1", 10, 3)));
        assert!(board.publish(decision("b", "2", 5, 1)));
        assert!(!board.publish(decision("a", "0", 9, 7)), "older decision ignored");
        assert!(!board.publish(decision("a", "1", 10, 3)), "same decision ignored");
        assert!(board.publish(decision("a", "3", 11, 4)));
        assert_eq!(board.get("a").map(|d| d.desired_replicas), Some(4));
        assert_eq!(board.get("c"), None);
        let services: Vec<_> = board.snapshot().into_iter().map(|d| d.service).collect();
        assert_eq!(services, ["a", "b"]);
        let fed: Vec<_> = std::iter::from_fn(|| feed.try_recv().ok())
            .map(|d| d.decision_id)
            .collect();
        assert_eq!(fed, ["1", "2", "3"]);
    }
}
