//! Turns each window's usage into a numbered batch, spools it, and delivers
//! it to the collector over the gRPC ingest stream.
//!
//! A batch stays in [`Pending`] (and in the spool) until the collector acks
//! or rejects it; on every (re)connection all pending batches are sent again
//! with their original `(session, seq)`, so the collector's consumers can
//! drop duplicates and nothing acknowledged is lost.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tidemark_core::window::unix_micros;
use tidemark_core::{ResourceSample, UsageBatch};
use tidemark_proto::v1::ingest_client::IngestClient;
use tidemark_proto::v1::report_reply::Result as Reply;
use tidemark_runtime::shutdown::Shutdown;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::Interceptor;
use tonic::transport::Endpoint;

use crate::meter::Tenants;
use crate::resources::{self, Reading, Source};
use crate::spool::{Spool, Stored};
use crate::telemetry::Telemetry;

/// Identity of this sidecar run.
#[derive(Debug, Clone)]
pub struct Identity {
    pub service: String,
    pub instance: String,
    pub session_id: String,
}

type BatchKey = (Arc<str>, u64);

#[derive(Debug, Default)]
struct Queue {
    /// Pending batches in the order they were queued.
    by_order: BTreeMap<u64, UsageBatch>,
    order_of: HashMap<BatchKey, u64>,
    next_order: u64,
}

/// Batches waiting for the collector's answer, oldest first.
#[derive(Debug)]
pub struct Pending {
    queue: Mutex<Queue>,
    added: Notify,
    max: usize,
    spool: Option<Arc<Spool>>,
    telemetry: &'static Telemetry,
}

impl Pending {
    pub fn new(max: usize, spool: Option<Arc<Spool>>, telemetry: &'static Telemetry) -> Pending {
        Pending {
            queue: Mutex::new(Queue::default()),
            added: Notify::new(),
            max: max.max(1),
            spool,
            telemetry,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a batch for delivery. Beyond the bound the oldest batch is
    /// dropped, loudly: its usage is lost and its `seq` becomes a gap.
    pub fn push(&self, batch: UsageBatch) {
        let mut dropped = None;
        {
            let mut q = self.queue();
            let order = q.next_order;
            q.next_order += 1;
            q.order_of.insert((batch.session_id.as_str().into(), batch.seq), order);
            q.by_order.insert(order, batch);
            if q.by_order.len() > self.max
                && let Some((_, lost)) = q.by_order.pop_first()
            {
                q.order_of.remove(&(lost.session_id.as_str().into(), lost.seq));
                dropped = Some(lost);
            }
            self.telemetry.pending_batches.set(q.by_order.len() as i64);
        }
        if let Some(lost) = dropped {
            let requests: u64 = lost.tenants.iter().map(|t| t.requests).sum();
            tracing::error!(
                session = %lost.session_id,
                seq = lost.seq,
                requests,
                "too many unacknowledged batches: dropping the oldest, its usage is lost"
            );
            self.telemetry.batches_dropped.inc();
            self.forget_on_disk(&lost.session_id, lost.seq);
        }
        self.added.notify_one();
    }

    /// Batches queued after position `after` (all if `None`), with the
    /// position of the last one.
    fn after(&self, after: Option<u64>) -> (Vec<UsageBatch>, Option<u64>) {
        let q = self.queue();
        let from = after.map_or(0, |o| o + 1);
        let batches: Vec<UsageBatch> = q.by_order.range(from..).map(|(_, b)| b.clone()).collect();
        let last = q.by_order.range(from..).next_back().map(|(o, _)| *o).or(after);
        (batches, last)
    }

    /// Forgets a batch the collector answered for; false if it was not pending.
    fn settle(&self, session: &str, seq: u64) -> bool {
        let removed = {
            let mut q = self.queue();
            let removed = match q.order_of.remove(&(Arc::from(session), seq)) {
                Some(order) => q.by_order.remove(&order).is_some(),
                None => false,
            };
            self.telemetry.pending_batches.set(q.by_order.len() as i64);
            removed
        };
        if removed {
            self.forget_on_disk(session, seq);
        }
        removed
    }

    fn forget_on_disk(&self, session: &str, seq: u64) {
        if let Some(spool) = &self.spool
            && let Err(e) = spool.remove(session, seq)
        {
            tracing::warn!(session, seq, error = %e, "cannot remove a settled batch from the spool; it will be resent after a restart (and dropped as a duplicate)");
        }
    }

    pub fn len(&self) -> usize {
        self.queue().by_order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads the app's resources once per window.
#[derive(Debug)]
pub struct Sampler {
    source: Source,
    last: Option<Reading>,
}

impl Sampler {
    pub fn new(source: Source) -> Sampler {
        Sampler { source, last: None }
    }

    /// What the app used since the previous call (`None` the first time, or
    /// if the reading failed).
    fn sample(&mut self, window_micros: u64) -> Option<resources::Usage> {
        let reading = match resources::read(&self.source) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(source = ?self.source, error = %e, "cannot read the app's resources");
                return None;
            }
        };
        let usage = self
            .last
            .map(|before| resources::between(before, reading, window_micros));
        self.last = Some(reading);
        usage
    }
}

/// Everything that turns windows into batches.
#[derive(Debug)]
pub struct Windows {
    pub identity: Identity,
    pub tenants: Arc<Tenants>,
    pub sampler: Option<Sampler>,
    pub pending: Arc<Pending>,
    pub spool: Option<Arc<Spool>>,
    pub telemetry: &'static Telemetry,
}

impl Windows {
    /// Closes a window every `interval` and queues its batch; on shutdown
    /// closes the last, partial window too.
    pub async fn run(mut self, interval: Duration, mut shutdown: Shutdown) {
        let mut seq = 0u64;
        let mut window_start = unix_micros(SystemTime::now());
        let mut last_close = self.tenants.clock().now();
        if let Some(sampler) = self.sampler.as_mut() {
            sampler.sample(0);
        }
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full_since: Option<u64> = None;
        loop {
            let last = tokio::select! {
                _ = ticker.tick() => false,
                () = shutdown.wait() => true,
            };
            let now = self.tenants.clock().now();
            let resources = self
                .sampler
                .as_mut()
                .and_then(|s| s.sample(now.saturating_sub(last_close)));
            last_close = now;
            let window = self.tenants.drain(now, resources);
            // Keep windows contiguous and never empty, even if the clock steps.
            let window_end = unix_micros(SystemTime::now()).max(window_start + 1);
            let batch = UsageBatch {
                service: self.identity.service.clone(),
                instance: self.identity.instance.clone(),
                session_id: self.identity.session_id.clone(),
                seq,
                window_start_unix_micros: window_start,
                window_end_unix_micros: window_end,
                load: Some(window.load),
                tenants: window.tenants,
                resources: resources.map(|r| ResourceSample {
                    cpu_micros: r.cpu_micros,
                    memory_bytes: r.memory_bytes,
                }),
                tenants_overflowed: window.tenants_overflowed,
            };
            self.telemetry.tenants_overflowed.inc_by(window.tenants_overflowed);
            let batch = match &self.spool {
                None => batch,
                Some(spool) => {
                    // Writing syncs the disk: off the threads that serve requests.
                    let writer = Arc::clone(spool);
                    let (stored, written) = tokio::task::spawn_blocking(move || (writer.store(&batch), batch))
                        .await
                        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                    match stored {
                        Ok(Stored::Durable) => {
                            if let Some(first) = full_since.take() {
                                tracing::warn!(since_seq = first, "the spool has room again");
                            }
                        }
                        Ok(Stored::Full) => {
                            self.telemetry.batches_unspooled.inc();
                            if full_since.is_none() {
                                full_since = Some(seq);
                                tracing::error!(
                                    seq,
                                    "the spool is full: new batches are kept in memory only and are lost if the sidecar crashes before the collector takes them"
                                );
                            }
                        }
                        Err(e) => {
                            self.telemetry.batches_unspooled.inc();
                            tracing::error!(seq, error = %e, "cannot write a batch to the spool: it is kept in memory only");
                        }
                    }
                    self.telemetry
                        .spool_bytes
                        .set(i64::try_from(spool.used_bytes()).unwrap_or(i64::MAX));
                    written
                }
            };
            self.pending.push(batch);
            seq += 1;
            window_start = window_end;
            if last {
                return;
            }
        }
    }
}

/// How the sidecar reaches the collector.
#[derive(Debug, Clone)]
pub struct CollectorLink {
    pub endpoint: Endpoint,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// Delivers pending batches to the collector, reconnecting with backoff and
/// jitter whenever the stream breaks, until `done` fires (no more batches
/// will come) and nothing is pending any more.
pub async fn deliver(link: CollectorLink, pending: Arc<Pending>, telemetry: &'static Telemetry, mut done: Shutdown) {
    let mut failures = 0u32;
    loop {
        if done.is_fired() && pending.is_empty() {
            return;
        }
        match stream_once(&link, &pending, telemetry, &mut done).await {
            Ok(()) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                let delay = backoff(failures);
                tracing::warn!(collector = %link.endpoint.uri(), error = %e, retry_in = ?delay, pending = pending.len(), "collector unavailable; usage is kept until it is back");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// An error with its causes, `outer: inner: innermost`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Exponential backoff from 100 ms up to 5 s, with ±50% jitter.
fn backoff(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    let jitter = rand::rng().random_range(base / 2..=base + base / 2);
    Duration::from_millis(jitter)
}

/// One connection: sends every pending batch, then each new one, and
/// settles batches as answers come. Ok when done with nothing pending.
async fn stream_once(
    link: &CollectorLink,
    pending: &Pending,
    telemetry: &Telemetry,
    done: &mut Shutdown,
) -> Result<(), tonic::Status> {
    let channel = link
        .endpoint
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("cannot connect: {}", error_chain(&e))))?;
    let mut client = IngestClient::with_interceptor(channel, Bearer(link.token.clone()));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut replies = client.report(UnboundedReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(collector = %link.endpoint.uri(), "connected to the collector");
    let mut sent_up_to = None;
    loop {
        let (batches, last) = pending.after(sent_up_to);
        sent_up_to = last;
        for batch in batches {
            telemetry.batches_sent.inc();
            tx.send(batch)
                .map_err(|_| tonic::Status::unavailable("stream closed"))?;
        }
        if done.is_fired() && pending.is_empty() {
            return Ok(());
        }
        tokio::select! {
            () = pending.added.notified() => {}
            reply = replies.message() => match reply? {
                Some(reply) => settle(pending, telemetry, reply.result),
                None => return Err(tonic::Status::unavailable("the collector closed the stream")),
            },
            () = done.wait(), if !done.is_fired() => {}
        }
    }
}

/// Forgets a batch the collector answered for.
fn settle(pending: &Pending, telemetry: &Telemetry, reply: Option<Reply>) {
    match reply {
        Some(Reply::Ack(ack)) if pending.settle(&ack.session_id, ack.seq) => {
            telemetry.batches_acked.inc();
        }
        Some(Reply::Reject(reject)) => {
            pending.settle(&reject.session_id, reject.seq);
            telemetry.batches_rejected.inc();
            tracing::error!(
                session = %reject.session_id,
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

    fn batch(session: &str, seq: u64) -> UsageBatch {
        UsageBatch {
            session_id: session.into(),
            seq,
            ..UsageBatch::default()
        }
    }

    #[test]
    fn pending_keeps_queue_order_across_sessions_and_drops_the_oldest_beyond_its_bound() {
        let telemetry: &'static Telemetry = Box::leak(Box::default());
        let pending = Pending::new(3, None, telemetry);
        // Replayed batches of an old session, then the current one's.
        for (session, seq) in [("z-old", 4), ("z-old", 5), ("a-new", 0), ("a-new", 1)] {
            pending.push(batch(session, seq));
        }
        let (all, last) = pending.after(None);
        let keys: Vec<_> = all.iter().map(|b| (b.session_id.as_str(), b.seq)).collect();
        assert_eq!(keys, [("z-old", 5), ("a-new", 0), ("a-new", 1)]);
        assert_eq!(telemetry.batches_dropped.get(), 1);
        pending.push(batch("a-new", 2));
        let (new, _) = pending.after(last);
        assert_eq!(
            new.iter().map(|b| b.seq).collect::<Vec<_>>(),
            [2],
            "only what came after"
        );
        assert!(pending.settle("a-new", 0));
        assert!(!pending.settle("a-new", 0), "settling twice finds nothing");
        assert!(!pending.settle("z-old", 4), "dropped batches are gone");
        assert_eq!(pending.len(), 2);
        assert_eq!(telemetry.batches_dropped.get(), 2);
    }
}
