//! The ingest service: sidecars stream usage batches in; each is checked,
//! appended to the usage log, and answered.
//!
//! An ack is sent only after the log holds the batch. A batch that can never
//! be accepted gets a reject with a gRPC code and a reason, and the stream
//! goes on. If the log fails, the stream ends with `UNAVAILABLE` and nothing
//! is acked, so the sidecar resends after reconnecting.

use std::pin::Pin;
use std::sync::Arc;

use tidemark_core::UsageBatch;
use tidemark_log::Log;
use tidemark_log::topics::encode_usage;
use tidemark_proto::v1::ingest_server::Ingest;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_proto::v1::{Ack, Reject, ReportReply};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::telemetry::Telemetry;

/// Answers buffered per stream before the collector stops reading it.
const REPLY_BUFFER: usize = 256;

#[derive(Debug, Clone)]
pub struct IngestService {
    log: Log,
    topic: Arc<str>,
    telemetry: Arc<Telemetry>,
}

impl IngestService {
    pub fn new(log: Log, topic: &str, telemetry: Arc<Telemetry>) -> IngestService {
        IngestService {
            log,
            topic: topic.into(),
            telemetry,
        }
    }

    /// Checks and appends one batch. `Err` means the log failed: the batch
    /// is neither acked nor rejected.
    pub async fn accept(&self, batch: UsageBatch) -> Result<Reply, Status> {
        if let Err(reason) = tidemark_core::batch::validate(&batch) {
            self.telemetry.batches_rejected.inc();
            tracing::warn!(service = %batch.service, session = %batch.session_id, seq = batch.seq, %reason, "rejecting a usage batch");
            return Ok(Reply::Reject(Reject {
                session_id: batch.session_id,
                seq: batch.seq,
                code: Code::InvalidArgument as i32,
                reason: reason.to_string(),
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

type ReplyStream = Pin<Box<dyn Stream<Item = Result<ReportReply, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = ReplyStream;

    async fn report(&self, request: Request<Streaming<UsageBatch>>) -> Result<Response<ReplyStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        let this = self.clone();
        this.telemetry.streams.inc();
        tokio::spawn(async move {
            loop {
                let batch = match inbound.message().await {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "ingest stream ended");
                        break;
                    }
                };
                let reply = this.accept(batch).await.map(|r| ReportReply { result: Some(r) });
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    break;
                }
            }
            this.telemetry.streams.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
