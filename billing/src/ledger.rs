//! The ledger: reads the usage log as a consumer-group member and commits
//! what it read to the store on a short interval.
//!
//! The store, not the log, decides where reading resumes: a record below the
//! store's offset for its partition was already counted and is skipped; if
//! the log starts a partition past that offset (a new database with an old
//! group), the consumer seeks back once. The log's own group offset is
//! committed after the store's, so it never runs ahead of it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tidemark_core::UsageBatch;
use tidemark_core::window::now_micros;
use tidemark_log::topics::decode_usage;
use tidemark_log::{Consumer, LogError, Record};
use tidemark_runtime::shutdown::Shutdown;

use crate::store::{CommitClock, Committed, Store, StoreError};
use crate::telemetry::Telemetry;

/// Batches read before a commit is forced, whatever the interval.
const MAX_UNCOMMITTED: usize = 10_000;

/// How long after its window ended a batch counts as late, unless
/// [`Ledger::with_late_after`] says otherwise (`--late-after`).
pub const DEFAULT_LATE_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a background commit ends with: the store's answer and the offsets
/// it recorded.
type CommitDone = (Result<Committed, StoreError>, Vec<(i32, i64)>);
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = CommitDone> + Send>>;

#[derive(Debug)]
pub struct Ledger {
    consumer: Consumer,
    store: Store,
    topic: String,
    telemetry: Arc<Telemetry>,
    /// Next offset to count, per partition (the store's, plus what is read).
    next: HashMap<i32, i64>,
    /// Partitions already rewound to the store's offset.
    rewound: HashSet<i32>,
    uncommitted: Vec<UsageBatch>,
    /// Partitions read since the last commit: only their offsets are
    /// written, so a worker never writes over another's progress.
    read_since_commit: BTreeSet<i32>,
    gap_grace: Duration,
    late_after: Duration,
}

impl Ledger {
    pub async fn new(
        consumer: Consumer,
        store: Store,
        topic: &str,
        telemetry: Arc<Telemetry>,
        gap_grace: Duration,
    ) -> Result<Ledger, LedgerError> {
        let next = store.offsets(topic).await?;
        Ok(Ledger {
            consumer,
            store,
            topic: topic.to_owned(),
            telemetry,
            next,
            rewound: HashSet::new(),
            uncommitted: Vec::new(),
            read_since_commit: BTreeSet::new(),
            gap_grace,
            late_after: DEFAULT_LATE_AFTER,
        })
    }

    /// Batches committed more than `late_after` after their window ended
    /// are also recorded as late usage, with the minute they were stored.
    pub fn with_late_after(mut self, late_after: Duration) -> Ledger {
        self.late_after = late_after;
        self
    }

    /// Reads and commits until `shutdown` fires, then commits what is left.
    ///
    /// A commit runs in the background while reading goes on into the next
    /// one; one commit is in flight at a time, and reading waits for it
    /// when another [`MAX_UNCOMMITTED`] batches are ready.
    pub async fn run(mut self, commit_interval: Duration, mut shutdown: Shutdown) -> Result<(), LedgerError> {
        let mut ticker = tokio::time::interval(commit_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight: Option<InFlight> = None;
        let mut due = false;
        loop {
            if in_flight.is_none() && (due || self.uncommitted.len() >= MAX_UNCOMMITTED) {
                due = false;
                in_flight = self.start_commit();
            }
            let full = self.uncommitted.len() >= MAX_UNCOMMITTED;
            tokio::select! {
                done = async {
                    match in_flight.as_mut() {
                        Some(commit) => commit.await,
                        None => std::future::pending().await,
                    }
                } => {
                    in_flight = None;
                    self.finish_commit(done).await?;
                }
                record = self.consumer.recv(), if !full => self.take(record?).await?,
                _ = ticker.tick() => due = true,
                () = shutdown.wait() => {
                    if let Some(commit) = in_flight.take() {
                        self.finish_commit(commit.await).await?;
                    }
                    if let Some(commit) = self.start_commit() {
                        self.finish_commit(commit.await).await?;
                    }
                    return Ok(());
                }
            }
        }
    }

    async fn take(&mut self, record: Record) -> Result<(), LedgerError> {
        self.telemetry.records.inc();
        let expected = self.next.get(&record.partition).copied().unwrap_or(0);
        if record.offset < expected {
            return Ok(());
        }
        if record.offset > expected && self.rewound.insert(record.partition) {
            tracing::info!(
                partition = record.partition,
                from = record.offset,
                to = expected,
                "rewinding to the store's offset"
            );
            self.consumer.seek(record.partition, expected).await?;
            return Ok(());
        }
        self.next.insert(record.partition, record.offset + 1);
        self.read_since_commit.insert(record.partition);
        match decode_usage(&record.payload) {
            Ok(batch) => self.uncommitted.push(batch),
            Err(e) => {
                self.telemetry.records_undecodable.inc();
                tracing::error!(partition = record.partition, offset = record.offset, error = %e, "skipping a record that is not a usage batch");
            }
        }
        Ok(())
    }

    /// Hands what was read since the last commit to a background commit.
    fn start_commit(&mut self) -> Option<InFlight> {
        if self.read_since_commit.is_empty() {
            return None;
        }
        let offsets: Vec<(i32, i64)> = std::mem::take(&mut self.read_since_commit)
            .into_iter()
            .filter_map(|p| self.next.get(&p).map(|o| (p, *o)))
            .collect();
        let clock = CommitClock {
            now_micros: now_micros(),
            gap_grace_micros: i64::try_from(self.gap_grace.as_micros()).unwrap_or(i64::MAX),
            late_after_micros: i64::try_from(self.late_after.as_micros()).unwrap_or(i64::MAX),
        };
        let batches = std::mem::take(&mut self.uncommitted);
        let store = self.store.clone();
        let topic = self.topic.clone();
        let task = tokio::spawn(async move {
            let committed = store.commit(&topic, &batches, &offsets, clock).await;
            (committed, offsets)
        });
        Some(Box::pin(async move {
            match task.await {
                Ok(done) => done,
                Err(e) => (Err(StoreError::Aborted(e.to_string())), Vec::new()),
            }
        }))
    }

    /// Counts a finished commit and, once the store has the offsets, tells
    /// the log too.
    async fn finish_commit(&mut self, (committed, offsets): CommitDone) -> Result<(), LedgerError> {
        let committed = match committed {
            Ok(c) => c,
            Err(e) => {
                self.telemetry.commit_errors.inc();
                return Err(e.into());
            }
        };
        self.telemetry.commits.inc();
        self.telemetry.batches_counted.inc_by(committed.batches);
        self.telemetry.batches_duplicate.inc_by(committed.duplicates);
        self.telemetry.batches_recovered.inc_by(committed.recovered);
        self.telemetry.batches_lost.inc_by(committed.declared_lost);
        self.telemetry.late_batches.inc_by(committed.late);
        self.telemetry
            .custom_usage_rejected
            .inc_by(committed.rejected.len() as u64);
        for r in &committed.rejected {
            tracing::warn!(
                session = %r.session_id,
                seq = r.seq,
                tenant = %r.tenant,
                service = %r.service,
                meter = %r.meter,
                value = %r.value,
                reason = %r.reason,
                "custom usage value not counted"
            );
        }
        if committed.declared_lost > 0 {
            tracing::error!(
                batches = committed.declared_lost,
                "usage batches missing past the grace period declared lost; see GET /v1/gaps"
            );
        }
        if let Err(e) = self.consumer.commit(&offsets).await {
            // Harmless: the store's offsets are the ones that count.
            tracing::warn!(error = %e, "cannot commit offsets to the log");
        }
        Ok(())
    }
}
