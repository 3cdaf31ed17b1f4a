//! The `tidemark.v1.Scaling` gRPC service: orchestrators read the decision
//! board through it.
//!
//! - `GetDecision(service)` answers the latest decision for one service,
//!   `NOT_FOUND` if the board holds none yet.
//! - `WatchDecisions(services)` streams the latest decision of every watched
//!   service (all of them if `services` is empty), then every newer one as it
//!   is published, until the client goes away.
//!
//! A watch stream never goes backwards and never repeats itself: for each
//! service it sends a decision only if it is newer, in the board's order
//! (`decided_at_unix_micros`, then `decision_id`), than the last one it sent
//! for that service. So a decision published between the subscription and the
//! snapshot is sent once, and a late or re-read decision is not sent at all.
//!
//! The board's feed is bounded. A watcher that falls too far behind (a slow
//! client, or a burst of decisions) misses part of the feed; the stream then
//! sends, for every watched service, the board's latest decision if it is
//! newer than the last one sent, and goes on from there. Intermediate
//! decisions may be skipped, the latest never is: decisions are states, not
//! deltas, so a receiver that applies each `decision_id` once and keeps the
//! newest ends in the same state as one that saw every decision.
//!
//! Service names are checked with [`tidemark_core::ids::validate_name`]; a bad
//! one is refused with `INVALID_ARGUMENT` naming it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use tidemark_core::ids::validate_name;
use tidemark_proto::v1::scaling_server::Scaling;
use tidemark_proto::v1::{GetDecisionRequest, ScalingDecision, WatchDecisionsRequest};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::board::DecisionBoard;

/// Decisions buffered per watch stream before the stream stops reading the
/// board's feed (and, if that lasts, lags and catches up from the board).
const WATCH_BUFFER: usize = 64;

/// Longest part of a refused name quoted back in an error.
const QUOTED_NAME_LEN: usize = 64;

/// Serves the decision board over `tidemark.v1.Scaling`.
#[derive(Debug, Clone)]
pub struct ScalingService {
    board: Arc<DecisionBoard>,
}

impl ScalingService {
    pub fn new(board: Arc<DecisionBoard>) -> ScalingService {
        ScalingService { board }
    }
}

type DecisionStream = Pin<Box<dyn Stream<Item = Result<ScalingDecision, Status>> + Send>>;

#[tonic::async_trait]
impl Scaling for ScalingService {
    type WatchDecisionsStream = DecisionStream;

    async fn watch_decisions(
        &self,
        request: Request<WatchDecisionsRequest>,
    ) -> Result<Response<DecisionStream>, Status> {
        let filter = Filter::parse(request.into_inner().services)?;
        // Subscribed before the snapshot is read, and before the client has
        // its answer: nothing published from here on can be missed.
        let feed = self.board.subscribe();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch(self.board.clone(), filter, feed, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_decision(&self, request: Request<GetDecisionRequest>) -> Result<Response<ScalingDecision>, Status> {
        let service = request.into_inner().service;
        checked_name("service", &service)?;
        match self.board.get(&service) {
            Some(decision) => Ok(Response::new(decision)),
            None => Err(Status::not_found(format!(
                "no decision yet for service {}",
                quoted(&service)
            ))),
        }
    }
}

/// Checks a service name from a request; the error names `field`.
pub(crate) fn checked_name(field: &str, name: &str) -> Result<(), Status> {
    validate_name(name).map_err(|reason| Status::invalid_argument(format!("{field} {} {reason}", quoted(name))))
}

/// `name` in quotes for an error message, cut short if it is long.
pub(crate) fn quoted(name: &str) -> String {
    match name.char_indices().nth(QUOTED_NAME_LEN) {
        Some((cut, _)) => format!("{:?}...", &name[..cut]),
        None => format!("{name:?}"),
    }
}

/// The services one watcher asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Filter {
    All,
    /// Sorted, without repeats.
    Only(Vec<String>),
}

impl Filter {
    fn parse(services: Vec<String>) -> Result<Filter, Status> {
        if services.is_empty() {
            return Ok(Filter::All);
        }
        for (i, service) in services.iter().enumerate() {
            checked_name(&format!("services[{i}]"), service)?;
        }
        let mut services = services;
        services.sort();
        services.dedup();
        Ok(Filter::Only(services))
    }

    fn matches(&self, service: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Only(services) => services.binary_search_by(|s| s.as_str().cmp(service)).is_ok(),
        }
    }

    /// The board's latest decision of every matching service, by service name.
    fn snapshot(&self, board: &DecisionBoard) -> Vec<ScalingDecision> {
        match self {
            Filter::All => board.snapshot(),
            Filter::Only(services) => services.iter().filter_map(|s| board.get(s)).collect(),
        }
    }
}

/// The newest decision a stream has sent, per service, so that it sends
/// nothing twice and nothing older than what it already sent.
#[derive(Debug, Default)]
pub(crate) struct Newest {
    sent: HashMap<String, (i64, String)>,
}

impl Newest {
    /// Whether `decision` is newer than any sent for its service, in the
    /// board's order; if so it counts as sent from now on.
    pub(crate) fn advance(&mut self, decision: &ScalingDecision) -> bool {
        let key = (decision.decided_at_unix_micros, decision.decision_id.as_str());
        match self.sent.get_mut(&decision.service) {
            Some(held) if (held.0, held.1.as_str()) >= key => false,
            Some(held) => {
                *held = (key.0, key.1.to_owned());
                true
            }
            None => {
                self.sent.insert(decision.service.clone(), (key.0, key.1.to_owned()));
                true
            }
        }
    }
}

type Outbox = mpsc::Sender<Result<ScalingDecision, Status>>;

/// Feeds one watch stream until its client goes away.
async fn watch(board: Arc<DecisionBoard>, filter: Filter, mut feed: broadcast::Receiver<ScalingDecision>, tx: Outbox) {
    tracing::debug!(?filter, "decision watch started");
    let mut newest = Newest::default();
    if send_snapshot(&board, &filter, &mut newest, &tx).await.is_ok() {
        loop {
            let next = tokio::select! {
                _ = tx.closed() => break,
                next = feed.recv() => next,
            };
            let sent = match next {
                Ok(decision) if filter.matches(&decision.service) && newest.advance(&decision) => {
                    tx.send(Ok(decision)).await.map_err(drop)
                }
                Ok(_) => Ok(()),
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "decision watch fell behind the feed; resending from the board");
                    send_snapshot(&board, &filter, &mut newest, &tx).await
                }
                Err(RecvError::Closed) => {
                    let _ = tx.send(Err(Status::unavailable("the decision board closed"))).await;
                    break;
                }
            };
            if sent.is_err() {
                break;
            }
        }
    }
    tracing::debug!(?filter, "decision watch ended");
}

/// Sends every matching decision on the board that is newer than what was
/// sent. `Err` means the client went away.
async fn send_snapshot(board: &DecisionBoard, filter: &Filter, newest: &mut Newest, tx: &Outbox) -> Result<(), ()> {
    for decision in filter.snapshot(board) {
        if newest.advance(&decision) {
            tx.send(Ok(decision)).await.map_err(drop)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(5);

    fn decision(service: &str, id: &str, at: i64, replicas: u32) -> ScalingDecision {
        ScalingDecision {
            decision_id: id.into(),
            service: service.into(),
            decided_at_unix_micros: at,
            desired_replicas: replicas,
            ..ScalingDecision::default()
        }
    }

    async fn watch_stream(service: &ScalingService, services: &[&str]) -> Result<DecisionStream, Status> {
        let request = WatchDecisionsRequest {
            services: services.iter().map(|s| s.to_string()).collect(),
        };
        Ok(service.watch_decisions(Request::new(request)).await?.into_inner())
    }

    async fn next_id(stream: &mut DecisionStream) -> String {
        let item = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("a decision in time");
        item.expect("stream open")
            .expect("a decision, not an error")
            .decision_id
    }

    /// Nothing more arrives right now.
    async fn quiet(stream: &mut DecisionStream) {
        let more = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
        assert!(more.is_err(), "unexpected {more:?}");
    }

    #[test]
    fn newest_refuses_repeats_and_older_decisions() {
        let mut newest = Newest::default();
        assert!(newest.advance(&decision("a", "2", 10, 1)));
        assert!(!newest.advance(&decision("a", "2", 10, 1)), "repeat");
        assert!(!newest.advance(&decision("a", "1", 10, 1)), "same time, smaller id");
        assert!(!newest.advance(&decision("a", "9", 9, 1)), "older");
        assert!(newest.advance(&decision("b", "1", 1, 1)), "another service");
        assert!(newest.advance(&decision("a", "3", 10, 1)), "same time, larger id");
        assert!(newest.advance(&decision("a", "0", 11, 1)), "newer");
    }

    #[test]
    fn filter_validates_sorts_and_dedups() {
        assert!(matches!(Filter::parse(vec![]), Ok(Filter::All)));
        let only = Filter::parse(vec!["b".into(), "a".into(), "b".into()]).expect("valid");
        assert_eq!(only, Filter::Only(vec!["a".into(), "b".into()]));
        assert!(only.matches("a") && only.matches("b") && !only.matches("c"));
        let refused = Filter::parse(vec!["a".into(), "no way".into()]).expect_err("invalid");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().starts_with("services[1] \"no way\" contains ' '"),
            "{}",
            refused.message()
        );
        let empty = Filter::parse(vec![String::new()]).expect_err("empty name");
        assert_eq!(empty.message(), "services[0] \"\" is empty");
    }

    #[test]
    fn long_names_are_quoted_short() {
        let long = "x".repeat(1000);
        let status = checked_name("service", &long).expect_err("too long");
        assert!(status.message().len() < 200, "{}", status.message());
        assert!(status.message().contains("1000 bytes long"), "{}", status.message());
    }

    #[tokio::test]
    async fn get_decision_answers_latest_not_found_and_invalid() {
        let board = DecisionBoard::new();
        let service = ScalingService::new(board.clone());
        board.publish(decision("a", "1", 1, 2));
        board.publish(decision("a", "2", 2, 5));
        let got = service
            .get_decision(Request::new(GetDecisionRequest { service: "a".into() }))
            .await
            .expect("found")
            .into_inner();
        assert_eq!((got.decision_id.as_str(), got.desired_replicas), ("2", 5));
        let missing = service
            .get_decision(Request::new(GetDecisionRequest { service: "b".into() }))
            .await
            .expect_err("none yet");
        assert_eq!(missing.code(), Code::NotFound);
        assert_eq!(missing.message(), "no decision yet for service \"b\"");
        let bad = service
            .get_decision(Request::new(GetDecisionRequest {
                service: "a/b c".into(),
            }))
            .await
            .expect_err("invalid");
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert!(
            bad.message().starts_with("service \"a/b c\" contains ' '"),
            "{}",
            bad.message()
        );
    }

    #[tokio::test]
    async fn watch_sends_the_filtered_snapshot_then_newer_decisions_only() {
        let board = DecisionBoard::new();
        let service = ScalingService::new(board.clone());
        board.publish(decision("a", "a1", 1, 1));
        board.publish(decision("b", "b1", 1, 1));
        board.publish(decision("c", "c1", 1, 1));
        let mut stream = watch_stream(&service, &["c", "a"]).await.expect("valid");
        assert_eq!(next_id(&mut stream).await, "a1");
        assert_eq!(next_id(&mut stream).await, "c1");
        quiet(&mut stream).await;
        board.publish(decision("b", "b2", 2, 1));
        board.publish(decision("a", "a2", 2, 1));
        assert_eq!(next_id(&mut stream).await, "a2");
        quiet(&mut stream).await;
    }

    #[tokio::test]
    async fn watch_refuses_a_bad_name() {
        let service = ScalingService::new(DecisionBoard::new());
        let status = watch_stream(&service, &["ok", ""]).await.err().expect("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("services[1]"), "{}", status.message());
    }

    /// A decision published after the subscription but before the snapshot
    /// is read is on both; the stream sends it once.
    #[tokio::test]
    async fn a_decision_both_in_the_snapshot_and_the_feed_is_sent_once() {
        let board = DecisionBoard::new();
        let feed = board.subscribe();
        board.publish(decision("a", "a1", 1, 1));
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch(board.clone(), Filter::All, feed, tx));
        let mut stream: DecisionStream = Box::pin(ReceiverStream::new(rx));
        assert_eq!(next_id(&mut stream).await, "a1");
        quiet(&mut stream).await;
        board.publish(decision("a", "a2", 2, 1));
        assert_eq!(next_id(&mut stream).await, "a2");
    }

    /// A watcher that lags loses part of the feed; it catches up from the
    /// board, so the latest decision of every service still arrives, and
    /// what is left of the feed is not replayed.
    #[tokio::test]
    async fn a_lagging_watcher_catches_up_from_the_board() {
        let board = DecisionBoard::new();
        let service = ScalingService::new(board.clone());
        let mut stream = watch_stream(&service, &[]).await.expect("valid");
        board.publish(decision("c", "c1", 1, 1));
        assert_eq!(next_id(&mut stream).await, "c1");
        // The watch task now waits on the feed and does not run again until
        // this test awaits (single-threaded test runtime): "b" is published
        // first and pushed out of the feed by "a".
        board.publish(decision("b", "b1", 1, 1));
        for at in 1..=3000 {
            board.publish(decision("a", &format!("a{at}"), at, 1));
        }
        assert_eq!(next_id(&mut stream).await, "a3000");
        assert_eq!(next_id(&mut stream).await, "b1");
        quiet(&mut stream).await;
        board.publish(decision("b", "b2", 2, 1));
        assert_eq!(next_id(&mut stream).await, "b2");
    }

    #[tokio::test]
    async fn the_watch_ends_when_the_client_goes_away() {
        let board = DecisionBoard::new();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let task = tokio::spawn(watch(board.clone(), Filter::All, board.subscribe(), tx));
        tokio::task::yield_now().await;
        drop(rx);
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("ends without any decision published")
            .expect("no panic");
    }
}
