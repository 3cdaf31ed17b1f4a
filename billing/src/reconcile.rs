//! `tidemark reconcile`: proves the ledger's rollups from the raw usage log.
//!
//! [`read_log`] reads the usage topic from its beginning up to the end it
//! has when reading starts ([`Log::snapshot`]), decodes every record, drops
//! every `(session, seq)` seen before (the first record of a pair counts,
//! as in the ledger, which reads each partition in order and a session's
//! batches all share one partition), keeps the batches whose window starts
//! in `[from, to)`, and rolls them up with the ledger's own code
//! ([`crate::rollup`]). [`compare`] reads the database's rollups of the same
//! minutes and lists every row whose quantity or batch count differs.
//!
//! The range must be whole minutes: a rollup row holds one minute, so only
//! then do the log and the database cover the same batches.
//!
//! [`check_invoices`] then proves the batch counts of finalized invoices
//! whose month lies inside the range: for each charge of a finalized month,
//! the batches on its own line plus those on every finalized correction of
//! it must equal the batches the log holds for the tenant and the charge's
//! meter in that month (all services). Fewer billed than in the log is usage
//! that came after the month was billed and waits for a correction on a
//! later invoice; more billed than the log holds cannot be proven.

use std::collections::{BTreeMap, HashMap};

use tidemark_core::window::MICROS_PER_MINUTE;
use tidemark_log::topics::decode_usage;
use tidemark_log::{Log, LogError};

use crate::invoice::db::{self as invoice_db, DbError, Filter};
use crate::invoice::model::{LineKind, Status};
use crate::rollup::{RollupKey, Rollups, Sums};
use crate::store::{Store, StoreError};

/// Why reconciling failed (differences are not failures: see [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the range must be whole minutes (UTC), e.g. 2026-01-01T00:00:00Z: {0} is not")]
    NotWholeMinute(&'static str),
    #[error("the range is empty: to must be later than from")]
    EmptyRange,
    #[error(
        "topic {topic:?} partition {partition} starts at offset {low}: older records are gone (retention), \
         so the log can no longer prove the rollups"
    )]
    Truncated { topic: String, partition: i32, low: i64 },
    #[error("usage log: {0}")]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invoices: {0}")]
    Invoices(#[from] DbError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
}

/// A half-open range of whole minutes, microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: i64,
    pub to: i64,
}

impl Range {
    pub fn new(from: i64, to: i64) -> Result<Range, ReconcileError> {
        if from.rem_euclid(MICROS_PER_MINUTE) != 0 {
            return Err(ReconcileError::NotWholeMinute("from"));
        }
        if to.rem_euclid(MICROS_PER_MINUTE) != 0 {
            return Err(ReconcileError::NotWholeMinute("to"));
        }
        if to <= from {
            return Err(ReconcileError::EmptyRange);
        }
        Ok(Range { from, to })
    }

    pub fn contains(&self, micros: i64) -> bool {
        self.from <= micros && micros < self.to
    }
}

/// What the log holds for a range.
#[derive(Debug, Default)]
pub struct LogTally {
    /// Records read (the whole topic up to its end at start).
    pub records: u64,
    /// Records that are not a usage batch (the ledger skips them too).
    pub undecodable: u64,
    /// Records whose `(session, seq)` came before, in any range.
    pub duplicates: u64,
    /// Distinct batches whose window starts in the range.
    pub batches: u64,
    /// Those batches rolled up as the ledger rolls them up.
    pub rollups: Rollups<'static>,
}

/// The seqs seen per session, as disjoint ranges `start → end` (inclusive):
/// little memory however long the log, as seqs mostly come in order.
#[derive(Debug, Default)]
struct Seen {
    sessions: HashMap<String, BTreeMap<u64, u64>>,
}

impl Seen {
    /// Records `(session, seq)`; false if it was seen before.
    fn insert(&mut self, session: &str, seq: u64) -> bool {
        let ranges = match self.sessions.get_mut(session) {
            Some(ranges) => ranges,
            None => self.sessions.entry(session.to_owned()).or_default(),
        };
        let before = ranges.range(..=seq).next_back().map(|(&s, &e)| (s, e));
        if let Some((_, end)) = before
            && seq <= end
        {
            return false;
        }
        let after = seq.checked_add(1).and_then(|next| ranges.get(&next).copied());
        let start = match before {
            Some((start, end)) if end.checked_add(1) == Some(seq) => start,
            _ => seq,
        };
        let end = match after {
            Some(end) => {
                ranges.remove(&(seq + 1));
                end
            }
            None => seq,
        };
        ranges.insert(start, end);
        true
    }
}

/// Reads `topic` of `log` from the beginning to its end at start and rolls
/// up the distinct batches whose window starts in `range`.
pub async fn read_log(log: &Log, topic: &str, range: Range) -> Result<LogTally, ReconcileError> {
    let mut snapshot = log.snapshot(topic).await?;
    if let Some(w) = snapshot.watermarks().iter().find(|w| w.low > 0) {
        return Err(ReconcileError::Truncated {
            topic: topic.to_owned(),
            partition: w.partition,
            low: w.low,
        });
    }
    let mut tally = LogTally::default();
    let mut seen = Seen::default();
    while let Some(record) = snapshot.next().await? {
        tally.records += 1;
        let batch = match decode_usage(&record.payload) {
            Ok(batch) => batch,
            Err(e) => {
                tally.undecodable += 1;
                tracing::warn!(partition = record.partition, offset = record.offset, error = %e, "skipping a record that is not a usage batch");
                continue;
            }
        };
        if !seen.insert(&batch.session_id, batch.seq) {
            tally.duplicates += 1;
            continue;
        }
        if range.contains(batch.window_start_unix_micros) {
            tally.batches += 1;
            tally.rollups.add_owned(&batch);
        }
    }
    Ok(tally)
}

/// One rollup row that the log and the database disagree on. A row
/// missing on one side has zero quantity and batches there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub tenant: String,
    pub service: String,
    pub meter: String,
    pub minute: i64,
    pub log: Sums,
    pub db: Sums,
}

/// The outcome of a reconciliation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Distinct batches of the range in the log.
    pub batches: u64,
    /// Rollup rows the log makes for the range.
    pub log_rows: usize,
    /// Rollup rows the database has for the range.
    pub db_rows: usize,
    /// Custom usage values the log holds that the ledger rejects too.
    pub rejected: usize,
    pub differences: Vec<Difference>,
}

impl Report {
    pub fn matches(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Compares the log's rollups of `range` with the database's.
pub async fn compare(store: &Store, range: Range, tally: &LogTally) -> Result<Report, ReconcileError> {
    let db_rows = store.rollups(range.from, range.to).await?;
    let mut db: BTreeMap<RollupKey<'static>, Sums> = BTreeMap::new();
    for row in &db_rows {
        db.insert(
            RollupKey {
                tenant: row.tenant.clone().into(),
                service: row.service.clone().into(),
                meter: row.meter.clone().into(),
                minute: row.minute,
            },
            Sums {
                quantity: row.quantity,
                batches: row.batches,
            },
        );
    }
    let mut differences = Vec::new();
    let mut difference = |key: &RollupKey<'_>, log: Sums, db: Sums| {
        if log != db {
            differences.push(Difference {
                tenant: key.tenant.to_string(),
                service: key.service.to_string(),
                meter: key.meter.to_string(),
                minute: key.minute,
                log,
                db,
            });
        }
    };
    for (key, log) in tally.rollups.rows() {
        difference(&key, log, db.get(&key).copied().unwrap_or_default());
    }
    for (key, &db) in &db {
        if tally.rollups.get(key).is_none() {
            difference(key, Sums::default(), db);
        }
    }
    differences
        .sort_by(|a, b| (&a.tenant, &a.service, &a.meter, a.minute).cmp(&(&b.tenant, &b.service, &b.meter, b.minute)));
    Ok(Report {
        batches: tally.batches,
        log_rows: tally.rollups.len(),
        db_rows: db_rows.len(),
        rejected: tally.rollups.rejected().len(),
        differences,
    })
}

/// How a finalized month's charge compares with the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeState {
    /// Billed batches equal the log's.
    Proven,
    /// The log holds more: usage that came after the month was billed, for
    /// a correction on a later invoice.
    NotYetBilled,
    /// Billed batches the log does not hold.
    Unproven,
}

impl ChargeState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeState::Proven => "proven",
            ChargeState::NotYetBilled => "not yet billed",
            ChargeState::Unproven => "UNPROVEN",
        }
    }
}

/// One charge of one finalized month: the batches billed for it (its own
/// line plus the finalized corrections of it) and the batches the log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BilledCharge {
    /// The month's invoice.
    pub invoice: String,
    pub tenant: String,
    pub period_start: i64,
    pub period_end: i64,
    pub charge: String,
    /// The meter the charge reads.
    pub source: String,
    pub billed_batches: i64,
    /// Lines behind `billed_batches`: the month's own and its corrections.
    pub lines: usize,
    pub log_batches: i64,
}

impl BilledCharge {
    pub fn state(&self) -> ChargeState {
        match self.billed_batches.cmp(&self.log_batches) {
            std::cmp::Ordering::Equal => ChargeState::Proven,
            std::cmp::Ordering::Less => ChargeState::NotYetBilled,
            std::cmp::Ordering::Greater => ChargeState::Unproven,
        }
    }
}

/// What [`check_invoices`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoiceCheck {
    /// Every metered charge of the finalized months inside the range.
    pub charges: Vec<BilledCharge>,
    /// Finalized invoices whose month is not inside the range (not checked).
    pub outside: usize,
}

impl InvoiceCheck {
    pub fn proven(&self) -> bool {
        self.charges.iter().all(|c| c.state() != ChargeState::Unproven)
    }
}

/// Checks the batch counts of the finalized invoices whose month lies in
/// `range` against the log's (see the module's documentation).
pub async fn check_invoices(store: &Store, range: Range, tally: &LogTally) -> Result<InvoiceCheck, ReconcileError> {
    let mut conn = store.reads().acquire().await?;
    let filter = Filter {
        lines: true,
        ..Filter::default()
    };
    let invoices: Vec<_> = invoice_db::invoices(&mut conn, &filter)
        .await?
        .into_iter()
        .filter(|i| i.status == Status::Finalized)
        .collect();
    // The log's batches per (tenant, meter), by minute.
    let mut log: BTreeMap<(&str, &str), BTreeMap<i64, i64>> = BTreeMap::new();
    let rows = tally.rollups.rows();
    for (key, sums) in &rows {
        *log.entry((&key.tenant, &key.meter))
            .or_default()
            .entry(key.minute)
            .or_default() += sums.batches;
    }
    let mut check = InvoiceCheck::default();
    // (tenant, period start, charge) → index in check.charges.
    let mut index: HashMap<(String, i64, String), usize> = HashMap::new();
    for invoice in &invoices {
        let period = invoice.period;
        if !(range.from <= period.start && period.end <= range.to) {
            check.outside += 1;
            continue;
        }
        for line in &invoice.lines {
            let (LineKind::Charge, Some(source)) = (line.kind, &line.source) else {
                continue;
            };
            let log_batches = log
                .get(&(invoice.tenant.as_str(), source.as_str()))
                .map_or(0, |minutes| {
                    minutes.range(period.start..period.end).map(|(_, b)| b).sum()
                });
            index.insert(
                (invoice.tenant.clone(), period.start, line.charge.clone()),
                check.charges.len(),
            );
            check.charges.push(BilledCharge {
                invoice: invoice.id.clone(),
                tenant: invoice.tenant.clone(),
                period_start: period.start,
                period_end: period.end,
                charge: line.charge.clone(),
                source: source.clone(),
                billed_batches: line.batches,
                lines: 1,
                log_batches,
            });
        }
    }
    for invoice in &invoices {
        for line in &invoice.lines {
            let (LineKind::Correction, Some(corrected)) = (line.kind, line.corrects_period_start) else {
                continue;
            };
            if let Some(&i) = index.get(&(invoice.tenant.clone(), corrected, line.charge.clone())) {
                check.charges[i].billed_batches += line.batches;
                check.charges[i].lines += 1;
            }
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::CommitClock;
    use tidemark_core::{TenantUsage, UsageBatch};
    use tidemark_log::embedded::EmbeddedConfig;
    use tidemark_log::topics::encode_usage;
    use tidemark_log::{LogConfig, TopicSpec};

    const MINUTE: i64 = 60_000_000;
    /// 2025-11-24T16:00:00Z.
    const T0: i64 = 1_764_000_000_000_000;

    #[test]
    fn seen_seqs_are_exact_in_any_order() {
        let mut seen = Seen::default();
        let fresh: Vec<bool> = [0, 1, 3, 2, 2, 5, 4, 0, 6, 5]
            .iter()
            .map(|&seq| seen.insert("s", seq))
            .collect();
        assert_eq!(fresh, [true, true, true, true, false, true, true, false, true, false]);
        assert_eq!(seen.sessions["s"], BTreeMap::from([(0, 6)]), "merged into one range");
        assert!(seen.insert("other", 0), "sessions are apart");
        assert!(seen.insert("s", u64::MAX) && !seen.insert("s", u64::MAX));
    }

    #[test]
    fn ranges_are_whole_minutes() {
        assert!(Range::new(T0, T0 + MINUTE).is_ok());
        assert!(matches!(
            Range::new(T0 + 1, T0 + MINUTE),
            Err(ReconcileError::NotWholeMinute("from"))
        ));
        assert!(matches!(
            Range::new(T0, T0 + 1),
            Err(ReconcileError::NotWholeMinute("to"))
        ));
        assert!(matches!(Range::new(T0, T0), Err(ReconcileError::EmptyRange)));
    }

    fn batch(session: &str, seq: u64, minute: i64, requests: u64) -> UsageBatch {
        UsageBatch {
            service: "shop".into(),
            instance: "shop-1".into(),
            session_id: session.into(),
            seq,
            window_start_unix_micros: minute + 5_000_000,
            window_end_unix_micros: minute + 6_000_000,
            tenants: vec![TenantUsage {
                tenant: "acme".into(),
                requests,
                custom: [("tokens".to_owned(), "0.5".to_owned())].into(),
                ..TenantUsage::default()
            }],
            ..UsageBatch::default()
        }
    }

    #[tokio::test]
    async fn the_log_proves_the_ledgers_rollups_and_a_changed_row_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Log::open(LogConfig::Embedded(EmbeddedConfig {
            dir: dir.path().join("log"),
        }))
        .await
        .expect("log");
        let spec = TopicSpec {
            partitions: 2,
            compacted: false,
        };
        log.ensure_topic("usage", spec).await.expect("topic");
        // In range: a/0, a/1 (sent twice), b/0; outside: a/2 (the next minute).
        let batches = [
            batch("a", 0, T0, 1),
            batch("a", 1, T0, 2),
            batch("a", 1, T0, 2),
            batch("b", 0, T0, 4),
            batch("a", 2, T0 + MINUTE, 8),
        ];
        for b in &batches {
            let (key, payload) = encode_usage(b);
            log.append("usage", &key, payload).await.expect("append");
        }
        log.append("usage", b"shop", vec![0xff, 0xff].into())
            .await
            .expect("append");

        let url = format!("sqlite:{}", dir.path().join("b.db").display());
        let store = Store::open(&url).await.expect("store");
        let clock = CommitClock {
            now_micros: T0 + 2 * MINUTE,
            gap_grace_micros: i64::MAX,
            late_after_micros: i64::MAX,
        };
        // The ledger saw them in two commits, the duplicate in both.
        store.commit("usage", &batches[..3], &[], clock).await.expect("commit");
        store.commit("usage", &batches[2..], &[], clock).await.expect("commit");

        let range = Range::new(T0, T0 + MINUTE).expect("range");
        let tally = read_log(&log, "usage", range).await.expect("read");
        assert_eq!(
            (tally.records, tally.undecodable, tally.duplicates, tally.batches),
            (6, 1, 1, 3)
        );
        let report = compare(&store, range, &tally).await.expect("compare");
        assert!(report.matches(), "{report:?}");
        assert_eq!((report.batches, report.log_rows, report.db_rows), (3, 2, 2));

        // The database counts one request more than the log holds, and has
        // a row the log knows nothing of.
        let db = sqlx::AnyPool::connect(&url).await.expect("connect");
        sqlx::query("UPDATE usage_rollup SET quantity = quantity + 1 WHERE meter = 'requests' AND minute = $1")
            .bind(T0)
            .execute(&db)
            .await
            .expect("tamper");
        sqlx::query(
            "INSERT INTO usage_rollup (tenant, service, meter, minute, quantity, batches)
             VALUES ('ghost', 'shop', 'requests', $1, 5, 1)",
        )
        .bind(T0)
        .execute(&db)
        .await
        .expect("insert");
        let report = compare(&store, range, &tally).await.expect("compare");
        let row = |tenant: &str, log: (i64, i64), db: (i64, i64)| Difference {
            tenant: tenant.into(),
            service: "shop".into(),
            meter: "requests".into(),
            minute: T0,
            log: Sums {
                quantity: log.0,
                batches: log.1,
            },
            db: Sums {
                quantity: db.0,
                batches: db.1,
            },
        };
        assert_eq!(
            report.differences,
            [row("acme", (7, 3), (8, 3)), row("ghost", (0, 0), (5, 1))]
        );
        // The next minute alone still matches: a/2, and nothing else.
        let next = Range::new(T0 + MINUTE, T0 + 2 * MINUTE).expect("range");
        let tally = read_log(&log, "usage", next).await.expect("read");
        assert_eq!(tally.batches, 1);
        assert!(compare(&store, next, &tally).await.expect("compare").matches());
    }
}
