//! Turns each window's usage into a numbered batch and delivers it to the
//! collector over the gRPC ingest stream.
//!
//! A batch stays in [`Pending`] until the collector acks (or rejects) it; on
//! every (re)connection all pending batches are sent again with their
//! original `(session, seq)`, so the collector's consumers can drop
//! duplicates and nothing acknowledged is lost.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tidemark_core::UsageBatch;
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_runtime::shutdown::Shutdown;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::meter::Meters;
use crate::telemetry::Telemetry;

/// Identity of this sidecar run.
#[derive(Debug, Clone)]
pub struct Identity {
    pub service: String,
    pub instance: String,
    pub session_id: String,
}

/// Batches waiting for the collector's answer, by `seq`.
#[derive(Debug)]
pub struct Pending {
    batches: Mutex<BTreeMap<u64, UsageBatch>>,
    added: Notify,
    settled: Notify,
    max: usize,
    telemetry: Arc<Telemetry>,
}

impl Pending {
    pub fn new(max: usize, telemetry: Arc<Telemetry>) -> Pending {
        Pending {
            batches: Mutex::new(BTreeMap::new()),
            added: Notify::new(),
            settled: Notify::new(),
            max: max.max(1),
            telemetry,
        }
    }

    fn push(&self, batch: UsageBatch) {
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        batches.insert(batch.seq, batch);
        while batches.len() > self.max {
            if let Some((seq, lost)) = batches.pop_first() {
                let requests: u64 = lost.tenants.iter().map(|t| t.requests).sum();
                tracing::error!(
                    seq,
                    requests,
                    "too many unacknowledged batches: dropping the oldest, its usage is lost"
                );
                self.telemetry.batches_dropped.inc();
            }
        }
        self.telemetry.pending_batches.set(batches.len() as i64);
        drop(batches);
        self.added.notify_one();
    }

    /// Batches with `seq` greater than `after`, in order.
    fn after(&self, after: Option<u64>) -> Vec<UsageBatch> {
        let batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        let from = after.map_or(0, |s| s + 1);
        batches.range(from..).map(|(_, b)| b.clone()).collect()
    }

    fn settle(&self, seq: u64) -> bool {
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        let removed = batches.remove(&seq).is_some();
        self.telemetry.pending_batches.set(batches.len() as i64);
        drop(batches);
        self.settled.notify_waiters();
        removed
    }

    pub fn len(&self) -> usize {
        self.batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no batch is pending, or `timeout` passes; true if empty.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let settled = self.settled.notified();
            if self.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return self.is_empty();
            }
        }
    }
}

fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Closes a window every `interval` and queues its batch; on shutdown closes
/// the last, partial window too.
pub async fn windows(
    identity: Identity,
    meters: Arc<Meters>,
    pending: Arc<Pending>,
    interval: Duration,
    mut shutdown: Shutdown,
) {
    let mut seq = 0u64;
    let mut window_start = unix_micros(SystemTime::now());
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            () = shutdown.wait() => true,
        };
        let window = meters.drain(Instant::now());
        // Keep windows contiguous and never empty, even if the clock steps.
        let window_end = unix_micros(SystemTime::now()).max(window_start + 1);
        pending.push(UsageBatch {
            service: identity.service.clone(),
            instance: identity.instance.clone(),
            session_id: identity.session_id.clone(),
            seq,
            window_start_unix_micros: window_start,
            window_end_unix_micros: window_end,
            load: Some(window.load),
            tenants: window.tenants,
            resources: None,
        });
        seq += 1;
        window_start = window_end;
        if last {
            return;
        }
    }
}

/// Delivers pending batches to the collector, reconnecting with backoff and
/// jitter whenever the stream breaks, until `shutdown` fires and nothing is
/// pending any more.
pub async fn deliver(
    collector: http::Uri,
    pending: Arc<Pending>,
    telemetry: Arc<Telemetry>,
    mut shutdown: Shutdown,
) {
    let mut failures = 0u32;
    loop {
        if shutdown.is_fired() && pending.is_empty() {
            return;
        }
        match stream_once(&collector, &pending, &telemetry, &mut shutdown).await {
            Ok(()) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                tracing::warn!(collector = %collector, error = %e, retry_in = ?delay, pending = pending.len(), "collector unavailable; usage is kept until it is back");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Exponential backoff from 100 ms up to 5 s, with ±50% jitter.
fn backoff(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    let jitter = rand::rng().random_range(base / 2..=base + base / 2);
    Duration::from_millis(jitter)
}

/// One connection: sends every pending batch, then each new one, and
/// settles batches as answers come. Ok when shut down with nothing pending.
async fn stream_once(
    collector: &http::Uri,
    pending: &Pending,
    telemetry: &Telemetry,
    shutdown: &mut Shutdown,
) -> Result<(), tonic::Status> {
    let mut client = IngestClient::connect(collector.clone())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut replies = client
        .report(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    tracing::info!(collector = %collector, "connected to the collector");
    let mut sent_up_to = None;
    loop {
        for batch in pending.after(sent_up_to) {
            sent_up_to = Some(batch.seq);
            telemetry.batches_sent.inc();
            tx.send(batch)
                .map_err(|_| tonic::Status::unavailable("stream closed"))?;
        }
        if shutdown.is_fired() && pending.is_empty() {
            return Ok(());
        }
        tokio::select! {
            () = pending.added.notified() => {}
            reply = replies.message() => match reply? {
                Some(reply) => settle(pending, telemetry, reply.result),
                None => return Err(tonic::Status::unavailable("the collector closed the stream")),
            },
            () = shutdown.wait(), if !shutdown.is_fired() => {}
        }
    }
}

/// Forgets a batch the collector answered for.
fn settle(pending: &Pending, telemetry: &Telemetry, reply: Option<Reply>) {
    match reply {
        Some(Reply::Ack(ack)) if pending.settle(ack.seq) => {
            telemetry.batches_acked.inc();
        }
        Some(Reply::Reject(reject)) => {
            pending.settle(reject.seq);
            telemetry.batches_rejected.inc();
            tracing::error!(
                seq = reject.seq,
                code = reject.code,
                reason = %reject.reason,
                "the collector refused a usage batch"
            );
        }
        Some(Reply::Ack(_)) | None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        for failures in 1..20 {
            let d = backoff(failures).as_millis() as u64;
            let base = (100u64 << failures.min(6)).min(5_000);
            assert!(d >= base / 2 && d <= base + base / 2, "{failures}: {d}");
        }
    }

    #[test]
    fn pending_drops_the_oldest_beyond_its_bound_and_counts_it() {
        let telemetry = Arc::new(Telemetry::default());
        let pending = Pending::new(2, Arc::clone(&telemetry));
        for seq in 0..3 {
            pending.push(UsageBatch {
                seq,
                ..UsageBatch::default()
            });
        }
        let seqs: Vec<u64> = pending.after(None).iter().map(|b| b.seq).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(telemetry.batches_dropped.get(), 1);
        assert_eq!(pending.after(Some(1)).len(), 1);
        assert!(pending.settle(1));
        assert!(!pending.settle(1), "settling twice finds nothing");
    }
}
