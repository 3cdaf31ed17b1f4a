//! The ingest service: sidecars stream usage batches in; each is checked,
//! appended to the usage log, and answered.
//!
//! An ack is sent only after the log holds the batch. A batch that can never
//! be accepted gets a reject with a gRPC code and a reason, and the stream
//! goes on: a malformed window, absurd values, a clock too far off, or a
//! service the stream's token may not report for. If the log fails, the
//! stream ends with `UNAVAILABLE` and nothing more is acked, so the sidecar
//! resends after reconnecting.
//!
//! Up to [`APPENDS_IN_FLIGHT`] batches of one stream are appended at once
//! (a sidecar replaying its spool sends many), and their answers go back in
//! the order the batches came.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tidemark_core::UsageBatch;
use tidemark_core::batch::check_clock;
use tidemark_log::Log;
use tidemark_log::topics::encode_usage;
use tidemark_proto::v1::ingest_server::Ingest;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{Ack, Reject, ReportReply};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::ingest_auth::{IngestTokens, bearer};
use crate::telemetry::Telemetry;

/// Answers buffered per stream before the collector stops reading it.
const REPLY_BUFFER: usize = 256;

/// Batches of one stream being appended at the same time.
pub const APPENDS_IN_FLIGHT: usize = 32;

/// What the ingest service lets in besides well-formed batches.
#[derive(Debug, Clone)]
pub struct IngestPolicy {
    /// Bearer tokens per service; `None` lets any stream report for any service.
    pub tokens: Option<Arc<IngestTokens>>,
    /// How far in the future a window may end (clock skew between machines).
    pub max_clock_skew: Duration,
    /// How long ago a window may have ended (spool replays after an outage).
    pub max_batch_age: Duration,
}

#[derive(Debug, Clone)]
pub struct IngestService {
    log: Log,
    topic: Arc<str>,
    policy: Arc<IngestPolicy>,
    telemetry: Arc<Telemetry>,
}

/// The services a stream may report for: `None` is any.
type Allowed = Option<Arc<BTreeSet<String>>>;

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl IngestService {
    pub fn new(log: Log, topic: &str, policy: IngestPolicy, telemetry: Arc<Telemetry>) -> IngestService {
        IngestService {
            log,
            topic: topic.into(),
            policy: Arc::new(policy),
            telemetry,
        }
    }

    /// Why `batch` must be refused, with the gRPC code that says so.
    fn refusal(&self, batch: &UsageBatch, allowed: &Allowed) -> Option<(Code, String)> {
        if let Err(reason) = tidemark_core::batch::validate(batch) {
            return Some((Code::InvalidArgument, reason.to_string()));
        }
        if let Some(services) = allowed
            && !services.contains(&batch.service)
        {
            return Some((
                Code::PermissionDenied,
                format!(
                    "service {:?} is unknown or not one this token may report for",
                    batch.service
                ),
            ));
        }
        let now = tidemark_core::window::now_micros();
        let (skew, max_age) = (micros(self.policy.max_clock_skew), micros(self.policy.max_batch_age));
        check_clock(batch, now, skew, max_age)
            .err()
            .map(|e| (Code::OutOfRange, e.to_string()))
    }

    /// Checks and appends one batch. `Err` means the log failed: the batch
    /// is neither acked nor rejected.
    pub async fn accept(&self, batch: UsageBatch, allowed: &Allowed) -> Result<Reply, Status> {
        if let Some((code, reason)) = self.refusal(&batch, allowed) {
            self.telemetry.batches_rejected.inc();
            tracing::warn!(service = %batch.service, session = %batch.session_id, seq = batch.seq, %reason, "rejecting a usage batch");
            return Ok(Reply::Reject(Reject {
                session_id: batch.session_id,
                seq: batch.seq,
                code: code as i32,
                reason,
            }));
        }
        let (key, payload) = encode_usage(&batch);
        self.log.append(&self.topic, &key, payload).await.map_err(|e| {
            self.telemetry.append_errors.inc();
            tracing::error!(error = %e, "cannot append to the usage log");
            Status::unavailable(format!("usage log unavailable: {e}"))
        })?;
        self.telemetry.batches_accepted.inc();
        Ok(Reply::Ack(Ack {
            session_id: batch.session_id,
            seq: batch.seq,
        }))
    }
}

/// Counts an open stream for as long as it lives, however its task ends.
struct OpenStream(Arc<Telemetry>);

impl OpenStream {
    fn count(telemetry: &Arc<Telemetry>) -> OpenStream {
        telemetry.streams.inc();
        OpenStream(Arc::clone(telemetry))
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.streams.dec();
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ReportReply, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = ReplyStream;

    async fn report(&self, request: Request<Streaming<UsageBatch>>) -> Result<Response<ReplyStream>, Status> {
        let allowed = match &self.policy.tokens {
            None => None,
            Some(tokens) => {
                let token = bearer(request.metadata())
                    .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
                Some(
                    tokens
                        .services_for(token)
                        .ok_or_else(|| Status::unauthenticated("unknown ingest token"))?,
                )
            }
        };
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        // Appends run concurrently; their results queue here in arrival order.
        let (order_tx, mut order_rx) =
            mpsc::channel::<tokio::task::JoinHandle<Result<Reply, Status>>>(APPENDS_IN_FLIGHT);
        let this = self.clone();
        let reader = tokio::spawn(async move {
            let _open = OpenStream::count(&this.telemetry);
            loop {
                let batch = match inbound.message().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "ingest stream ended");
                        break;
                    }
                };
                let service = this.clone();
                let allowed = allowed.clone();
                let append = tokio::spawn(async move { service.accept(batch, &allowed).await });
                if order_tx.send(append).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(append) = order_rx.recv().await {
                let reply = match append.await {
                    Ok(reply) => reply.map(|r| ReportReply { result: Some(r) }),
                    Err(e) => Err(Status::internal(format!("append task failed: {e}"))),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
            // The client is gone or the log failed: stop reading the stream.
            reader.abort();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
