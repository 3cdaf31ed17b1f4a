//! The ledger: reads the usage log as a consumer-group member and commits
//! what it read to the store on a short interval.
//!
//! The store, not the log, decides where reading resumes: a record below the
//! store's offset for its partition was already counted and is skipped; if
//! the log starts a partition past that offset (a new database with an old
//! group), the consumer seeks back once. The log's own group offset is
//! committed after the store's, so it never runs ahead of it.
//!
//! On Postgres a commit may be split by partition into several
//! transactions on their own connections, run at once (`--parallel-commits`):
//! each holds the batches and offsets of its partitions only, so each is
//! exact on its own. A service's batches share a partition (it is the log
//! key), so the shards write different rollup rows; the rows they share
//! (per-tenant totals, and sessions when a service's batches are spread
//! over partitions) are locked in key order, so shards wait on each other
//! there but never deadlock.

use std::collections::{BTreeMap, HashMap, HashSet};
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

/// What one transaction of a background commit ends with: the store's
/// answer and the offsets it recorded.
type CommitDone = (Result<Committed, StoreError>, Vec<(i32, i64)>);
type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<CommitDone>> + Send>>;

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
    /// What was read since the last commit, by partition. Only the offsets
    /// of these partitions are written, so a worker never writes over
    /// another's progress.
    uncommitted: BTreeMap<i32, Vec<UsageBatch>>,
    uncommitted_batches: usize,
    gap_grace: Duration,
    late_after: Duration,
    parallel_commits: usize,
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
            uncommitted: BTreeMap::new(),
            uncommitted_batches: 0,
            gap_grace,
            late_after: DEFAULT_LATE_AFTER,
            parallel_commits: 1,
        })
    }

    /// Splits each commit by partition into up to `parallel` transactions
    /// run at once, as far as the store allows
    /// ([`Store::max_parallel_commits`]; SQLite has one writer).
    pub fn with_parallel_commits(mut self, parallel: usize) -> Ledger {
        let most = self.store.max_parallel_commits();
        // SQLite (one writer) takes the default of 2 as 1 without a word.
        if parallel > most && most > 1 {
            tracing::warn!(
                asked = parallel,
                most,
                "--parallel-commits is more than this store allows"
            );
        }
        self.parallel_commits = parallel.clamp(1, most);
        self
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
            if in_flight.is_none() && (due || self.uncommitted_batches >= MAX_UNCOMMITTED) {
                due = false;
                in_flight = self.start_commit();
            }
            let full = self.uncommitted_batches >= MAX_UNCOMMITTED;
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
        let read = self.uncommitted.entry(record.partition).or_default();
        match decode_usage(&record.payload) {
            Ok(batch) => {
                read.push(batch);
                self.uncommitted_batches += 1;
            }
            Err(e) => {
                self.telemetry.records_undecodable.inc();
                tracing::error!(partition = record.partition, offset = record.offset, error = %e, "skipping a record that is not a usage batch");
            }
        }
        Ok(())
    }

    /// Hands what was read since the last commit to a background commit.
    fn start_commit(&mut self) -> Option<InFlight> {
        if self.uncommitted.is_empty() {
            return None;
        }
        let clock = CommitClock {
            now_micros: now_micros(),
            gap_grace_micros: i64::try_from(self.gap_grace.as_micros()).unwrap_or(i64::MAX),
            late_after_micros: i64::try_from(self.late_after.as_micros()).unwrap_or(i64::MAX),
        };
        self.uncommitted_batches = 0;
        let tasks: Vec<_> = shards(std::mem::take(&mut self.uncommitted), self.parallel_commits)
            .into_iter()
            .map(|shard| {
                let offsets: Vec<(i32, i64)> = shard
                    .iter()
                    .filter_map(|(p, _)| self.next.get(p).map(|o| (*p, *o)))
                    .collect();
                let batches: Vec<UsageBatch> = shard.into_iter().flat_map(|(_, batches)| batches).collect();
                let store = self.store.clone();
                let topic = self.topic.clone();
                tokio::spawn(async move {
                    let committed = store.commit(&topic, &batches, &offsets, clock).await;
                    (committed, offsets)
                })
            })
            .collect();
        Some(Box::pin(async move {
            let mut done = Vec::with_capacity(tasks.len());
            for task in tasks {
                done.push(match task.await {
                    Ok(done) => done,
                    Err(e) => (Err(StoreError::Aborted(e.to_string())), Vec::new()),
                });
            }
            done
        }))
    }

    /// Counts the transactions of a finished commit and, for those the
    /// store has, tells the log their offsets too; then fails if one failed.
    async fn finish_commit(&mut self, done: Vec<CommitDone>) -> Result<(), LedgerError> {
        let mut failed = None;
        for (committed, offsets) in done {
            match committed {
                Ok(committed) => self.count(committed, &offsets).await,
                Err(e) => {
                    self.telemetry.commit_errors.inc();
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    async fn count(&mut self, committed: Committed, offsets: &[(i32, i64)]) {
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
        if let Err(e) = self.consumer.commit(offsets).await {
            // Harmless: the store's offsets are the ones that count.
            tracing::warn!(error = %e, "cannot commit offsets to the log");
        }
    }
}

/// Splits what was read, by partition, into at most `parallel` shards of
/// about the same number of batches: the largest partitions first, each to
/// the shard with the fewest batches so far. Every shard holds at least one
/// partition.
fn shards<T>(read: BTreeMap<i32, Vec<T>>, parallel: usize) -> Vec<Vec<(i32, Vec<T>)>> {
    let mut partitions: Vec<(i32, Vec<T>)> = read.into_iter().collect();
    partitions.sort_by_key(|(partition, batches)| (std::cmp::Reverse(batches.len()), *partition));
    let mut shards: Vec<Vec<(i32, Vec<T>)>> = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    for (partition, batches) in partitions {
        let size = batches.len();
        let least = if shards.len() < parallel.max(1) {
            shards.push(Vec::new());
            sizes.push(0);
            shards.len() - 1
        } else {
            (0..sizes.len()).min_by_key(|&i| sizes[i]).unwrap_or(0)
        };
        shards[least].push((partition, batches));
        sizes[least] += size;
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(sizes: &[(i32, usize)]) -> BTreeMap<i32, Vec<usize>> {
        sizes.iter().map(|&(p, n)| (p, (0..n).collect())).collect()
    }

    fn partitions(shard: &[(i32, Vec<usize>)]) -> Vec<i32> {
        let mut parts: Vec<i32> = shard.iter().map(|(p, _)| *p).collect();
        parts.sort_unstable();
        parts
    }

    #[test]
    fn one_shard_holds_everything() {
        let shards = shards(read(&[(0, 3), (1, 0), (2, 5)]), 1);
        assert_eq!(shards.len(), 1);
        assert_eq!(partitions(&shards[0]), [0, 1, 2]);
        assert_eq!(shards[0].iter().map(|(_, b)| b.len()).sum::<usize>(), 8);
    }

    #[test]
    fn partitions_are_spread_by_batches_each_in_one_shard() {
        let shards = shards(read(&[(0, 10), (1, 9), (2, 6), (3, 5), (4, 0)]), 2);
        assert_eq!(shards.len(), 2);
        let sizes: Vec<usize> = shards.iter().map(|s| s.iter().map(|(_, b)| b.len()).sum()).collect();
        assert_eq!(sizes, [15, 15]);
        let mut all: Vec<i32> = shards.iter().flat_map(|s| partitions(s)).collect();
        all.sort_unstable();
        assert_eq!(all, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn no_shard_is_empty() {
        assert_eq!(shards(read(&[(7, 2)]), 4).len(), 1);
        assert_eq!(shards(read(&[(0, 1), (1, 1), (2, 1)]), 2).len(), 2);
        assert!(shards(BTreeMap::<i32, Vec<u8>>::new(), 2).is_empty());
    }
}
