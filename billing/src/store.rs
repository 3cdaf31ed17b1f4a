//! The billing store: SQLite (default, embedded) or Postgres (scale-out),
//! one schema, one set of SQL statements, migrations run at start.
//!
//! Everything a ledger commit writes (rollups, each session's dedupe state,
//! and the log offsets) goes into one transaction, so after any crash the
//! store and the offsets it resumes from agree.

use std::collections::{BTreeMap, HashMap};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};
use tidemark_core::UsageBatch;
use tidemark_core::window::{MICROS_PER_MINUTE, minute_start};

use crate::rollup::{RejectedUsage, RollupKey, Rollups, Sums};
use crate::sessions::{Missing, SessionState, Verdict};

mod upsert;
use upsert::{Param, Placeholders, upsert};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("database {url}: unsupported scheme; use sqlite:PATH or postgres://USER@HOST:PORT/DB")]
    Scheme { url: String },
    #[error("cannot migrate database schema to version {version}: {source}")]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("a ledger commit stopped before it finished: {0}")]
    Aborted(String),
}

/// Fills an empty `usage_rollup_hour` from the minute rollups (schema
/// version 5 does, and so may a tool that writes minute rows in SQL).
pub const FILL_ROLLUP_HOUR: &str = "INSERT INTO usage_rollup_hour (tenant, service, meter, hour, quantity, batches)
    SELECT tenant, service, meter, (minute / 3600000000) * 3600000000, SUM(quantity), SUM(batches)
    FROM usage_rollup GROUP BY tenant, service, meter, (minute / 3600000000) * 3600000000";

/// Fills an empty `usage_total_hour` from `usage_rollup_hour`.
pub const FILL_TOTAL_HOUR: &str = "INSERT INTO usage_total_hour (tenant, meter, hour, quantity, batches)
    SELECT tenant, meter, hour, SUM(quantity), SUM(batches) FROM usage_rollup_hour GROUP BY tenant, meter, hour";

/// Schema migrations, applied in order; the store records the last applied.
const MIGRATIONS: &[&[&str]] = &[
    &[
        "CREATE TABLE usage_rollup (
            tenant TEXT NOT NULL,
            service TEXT NOT NULL,
            meter TEXT NOT NULL,
            minute BIGINT NOT NULL,
            quantity BIGINT NOT NULL,
            batches BIGINT NOT NULL,
            PRIMARY KEY (tenant, minute, service, meter)
        )",
        "CREATE TABLE seen_batch (
            session_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            PRIMARY KEY (session_id, seq)
        )",
        "CREATE TABLE log_offset (
            topic TEXT NOT NULL,
            part INTEGER NOT NULL,
            next_offset BIGINT NOT NULL,
            PRIMARY KEY (topic, part)
        )",
    ],
    // One row of dedupe state per session instead of one row per batch.
    &[
        "CREATE TABLE session_state (
            session_id TEXT NOT NULL PRIMARY KEY,
            service TEXT NOT NULL,
            instance TEXT NOT NULL,
            next_seq BIGINT NOT NULL,
            above TEXT NOT NULL,
            hole_since BIGINT,
            lost TEXT NOT NULL,
            last_seen BIGINT NOT NULL
        )",
        "INSERT INTO session_state (session_id, service, instance, next_seq, above, hole_since, lost, last_seen)
         SELECT session_id, '', '', MAX(seq) + 1, '', NULL, '', 0 FROM seen_batch GROUP BY session_id",
        "DROP TABLE seen_batch",
    ],
    // Late usage: batches committed well after their window, kept with both
    // their event minute and the minute they were stored.
    &["CREATE TABLE late_usage (
            tenant TEXT NOT NULL,
            service TEXT NOT NULL,
            meter TEXT NOT NULL,
            minute BIGINT NOT NULL,
            stored_minute BIGINT NOT NULL,
            quantity BIGINT NOT NULL,
            batches BIGINT NOT NULL,
            PRIMARY KEY (tenant, minute, service, meter, stored_minute)
        )"],
    // Subscriptions and invoices. Money and quantities are exact decimal
    // strings; a finalized invoice and its lines are never written again.
    &[
        "CREATE TABLE subscription (
            tenant TEXT NOT NULL,
            starts_at BIGINT NOT NULL,
            plan TEXT NOT NULL,
            plan_version BIGINT NOT NULL,
            PRIMARY KEY (tenant, starts_at)
        )",
        "CREATE TABLE invoice (
            id TEXT NOT NULL PRIMARY KEY,
            tenant TEXT NOT NULL,
            period_start BIGINT NOT NULL,
            period_end BIGINT NOT NULL,
            time_zone TEXT NOT NULL,
            plan TEXT NOT NULL,
            plan_version BIGINT NOT NULL,
            currency TEXT NOT NULL,
            subtotal TEXT NOT NULL,
            total TEXT NOT NULL,
            status TEXT NOT NULL,
            finalized_at BIGINT,
            UNIQUE (tenant, period_start)
        )",
        "CREATE TABLE invoice_line (
            invoice_id TEXT NOT NULL,
            line_no BIGINT NOT NULL,
            charge TEXT NOT NULL,
            description TEXT NOT NULL,
            source TEXT,
            usage TEXT NOT NULL,
            quantity TEXT NOT NULL,
            allowance TEXT NOT NULL,
            unit_price TEXT,
            tiers TEXT NOT NULL,
            amount TEXT NOT NULL,
            usage_from BIGINT,
            usage_to BIGINT,
            batches BIGINT NOT NULL,
            corrects_period_start BIGINT,
            PRIMARY KEY (invoice_id, line_no)
        )",
    ],
    // Hourly rollups next to the minute ones, written in the same
    // transaction: per service, and per tenant over all its services (what
    // a usage query without group_by=service reads), so that hour and day
    // windows read 60x (and more) fewer rows. Clustered by key on SQLite.
    &[
        "CREATE TABLE usage_rollup_hour (
            tenant TEXT NOT NULL,
            service TEXT NOT NULL,
            meter TEXT NOT NULL,
            hour BIGINT NOT NULL,
            quantity BIGINT NOT NULL,
            batches BIGINT NOT NULL,
            PRIMARY KEY (tenant, hour, service, meter)
        ) /*WITHOUT ROWID*/",
        FILL_ROLLUP_HOUR,
        "CREATE TABLE usage_total_hour (
            tenant TEXT NOT NULL,
            meter TEXT NOT NULL,
            hour BIGINT NOT NULL,
            quantity BIGINT NOT NULL,
            batches BIGINT NOT NULL,
            PRIMARY KEY (tenant, hour, meter)
        ) /*WITHOUT ROWID*/",
        FILL_TOTAL_HOUR,
    ],
    // Every commit updates the rollup rows of the current minute and hour.
    // Postgres writes an updated row as a new version; with room left on
    // its page the new version stays there and no index changes (a "HOT"
    // update), instead of a new index entry in every index. Half-empty
    // pages leave room to update every row of a page once per commit, and
    // the dead versions are pruned on the next visit. Only new pages are
    // left half empty, so older minutes keep their layout.
    &[
        "/*postgres*/ ALTER TABLE usage_rollup SET (fillfactor = 50)",
        "/*postgres*/ ALTER TABLE usage_rollup_hour SET (fillfactor = 50)",
        "/*postgres*/ ALTER TABLE usage_total_hour SET (fillfactor = 50)",
        "/*postgres*/ ALTER TABLE session_state SET (fillfactor = 50)",
    ],
];

/// Connections to Postgres per billing process.
const POSTGRES_CONNECTIONS: u32 = 8;

/// Marks a migration statement that runs on Postgres only.
const POSTGRES_ONLY: &str = "/*postgres*/";

/// The schema version this build migrates to (`tidemark_schema`'s newest row after [`Store::open`]).
pub const fn latest_schema_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// One row of rolled-up usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    /// Start of the window, microseconds since the Unix epoch.
    pub window_start: i64,
    /// The service, when grouped by service.
    pub service: Option<String>,
    pub meter: String,
    pub quantity: i64,
    /// Batch contributions behind the quantity.
    pub batches: i64,
}

/// One row of late usage: batches of one minute stored in a later one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateRow {
    pub tenant: String,
    pub service: String,
    pub meter: String,
    /// Event time: start of the minute the batches' windows began in.
    pub minute: i64,
    /// Stored time: start of the minute the ledger committed them in.
    pub stored_minute: i64,
    pub quantity: i64,
    pub batches: i64,
}

/// One `usage_rollup` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    pub tenant: String,
    pub service: String,
    pub meter: String,
    pub minute: i64,
    pub quantity: i64,
    pub batches: i64,
}

/// What one ledger commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Batches counted, recovered ones included.
    pub batches: u64,
    pub duplicates: u64,
    /// Batches declared lost earlier that turned up and were counted.
    pub recovered: u64,
    /// Batches declared lost by this commit (holes older than the grace).
    pub declared_lost: u64,
    /// Batches counted whose window ended more than the late threshold
    /// before the commit (also recorded in `late_usage`).
    pub late: u64,
    /// Custom usage values of counted batches that could not be kept
    /// exactly, so were not counted.
    pub rejected: Vec<RejectedUsage>,
}

/// The time a commit happens at, how long a hole in a session's seqs may
/// stay open before it is declared lost, and how long after its window
/// ended a batch counts as late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitClock {
    pub now_micros: i64,
    pub gap_grace_micros: i64,
    pub late_after_micros: i64,
}

/// A session with missing batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionGaps {
    pub session_id: String,
    pub service: String,
    pub instance: String,
    pub missing: Vec<Missing>,
}

/// The `Param`s of a rollup row at `time` (its minute, or its hour).
fn rollup_params<'a>(key: &'a RollupKey<'_>, time: i64, sums: Sums) -> [Param<'a>; 6] {
    [
        Param::Text(&key.tenant),
        Param::Text(&key.service),
        Param::Text(&key.meter),
        Param::Int(time),
        Param::Int(sums.quantity),
        Param::Int(sums.batches),
    ]
}

/// Folds rows ordered by tenant, service, meter and minute into hours: the
/// rows of one hour are consecutive, so one pass does it.
fn hours<'k, 'a: 'k>(
    rows: impl Iterator<Item = &'k (RollupKey<'a>, Sums)>,
) -> impl Iterator<Item = (&'k RollupKey<'a>, i64, Sums)> {
    let mut rows = rows.peekable();
    std::iter::from_fn(move || {
        let (key, first) = rows.next()?;
        let hour = hour_start(key.minute);
        let mut sums = *first;
        while let Some((next, more)) = rows.peek().copied() {
            let same = next.tenant == key.tenant && next.service == key.service && next.meter == key.meter;
            if !same || hour_start(next.minute) != hour {
                break;
            }
            sums.quantity = sums.quantity.saturating_add(more.quantity);
            sums.batches += more.batches;
            rows.next();
        }
        Some((key, hour, sums))
    })
}

/// The whole hours `[first, end)` inside `[from, to)`: `first` is the
/// first hour start at or after `from` (or `to`), `end` the last at or
/// before `to` (but not before `first`). So `[from, first)` and `[end, to)`
/// hold the partial hours, and all three ranges are empty or inside.
pub(crate) fn whole_hours(from: i64, to: i64) -> (i64, i64) {
    let first = hour_start(from);
    let first = if first < from {
        first.checked_add(MICROS_PER_HOUR).unwrap_or(to)
    } else {
        first
    };
    let first = first.min(to).max(from);
    (first, hour_start(to).max(first))
}

/// Start of the hour `unix_micros` is in.
fn hour_start(unix_micros: i64) -> i64 {
    unix_micros.div_euclid(MICROS_PER_HOUR) * MICROS_PER_HOUR
}

const MICROS_PER_HOUR: i64 = 60 * MICROS_PER_MINUTE;

/// Rows of session state read in one query.
const SESSIONS_PER_QUERY: usize = 500;

/// A usage query: one tenant, a half-open time range, optional filters,
/// fixed-width windows, and whether to keep services apart.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub tenant: String,
    pub from: i64,
    pub to: i64,
    pub service: Option<String>,
    pub meter: Option<String>,
    /// Window width in microseconds, a whole number of minutes.
    pub window_micros: i64,
    pub by_service: bool,
}

impl UsageQuery {
    /// All of `tenant`'s usage per minute and service.
    pub fn all(tenant: &str) -> UsageQuery {
        UsageQuery {
            tenant: tenant.to_owned(),
            from: 0,
            to: i64::MAX,
            service: None,
            meter: None,
            window_micros: tidemark_core::window::MICROS_PER_MINUTE,
            by_service: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Connections for queries that only read. On SQLite, read-only
    /// connections apart from the one writer: in WAL mode they read the
    /// last commit while the ledger writes the next, so a long query (a
    /// month's revenue of every tenant) never holds up a commit. On
    /// Postgres, the same pool.
    reads: AnyPool,
    backend: Backend,
}

/// Read-only connections to an SQLite store.
const SQLITE_READERS: u32 = 4;

/// Opens a pool on `url`.
async fn connect(options: AnyPoolOptions, url: &str) -> Result<AnyPool, StoreError> {
    options
        .acquire_timeout(std::time::Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|e| StoreError::Connect {
            url: redact(url),
            reason: e.to_string(),
        })
}

/// The read-only twin of a writable SQLite file URL (`mode=rwc` or `rw`);
/// `None` for anything else: Postgres, an in-memory database (its readers
/// would see another database), or a URL already read-only.
fn sqlite_read_only(url: &str) -> Option<String> {
    if !url.starts_with("sqlite:") || url.contains(":memory:") {
        return None;
    }
    ["mode=rwc", "mode=rw"]
        .iter()
        .find(|mode| url.contains(*mode))
        .map(|mode| url.replacen(mode, "mode=ro", 1))
}

/// Hides the password of a database URL.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl Store {
    /// The connection pool, for the store functions of other modules
    /// (invoices, subscriptions) that keep their SQL next to their types.
    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The pool for queries that only read (see [`Store`]).
    pub(crate) fn reads(&self) -> &AnyPool {
        &self.reads
    }

    /// How many ledger commits may run at once: SQLite has one writer;
    /// Postgres gives each its own connection, and keeps the rest of the
    /// pool for queries.
    pub fn max_parallel_commits(&self) -> usize {
        match self.backend {
            Backend::Sqlite => 1,
            Backend::Postgres => POSTGRES_CONNECTIONS as usize / 2,
        }
    }

    /// Whether the database is Postgres (else SQLite).
    pub(crate) fn is_postgres(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// Connects to `url` and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        if !is_sqlite && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(StoreError::Scheme { url: redact(url) });
        }
        let url = if is_sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_owned()
        };
        let options = if is_sqlite {
            // One writer: SQLite serializes writes anyway.
            AnyPoolOptions::new().max_connections(1).after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    Ok(())
                })
            })
        } else {
            AnyPoolOptions::new().max_connections(POSTGRES_CONNECTIONS)
        };
        let pool = connect(options, &url).await?;
        let backend = if is_sqlite { Backend::Sqlite } else { Backend::Postgres };
        let mut store = Store {
            reads: pool.clone(),
            pool,
            backend,
        };
        store.migrate().await?;
        if let Some(url) = sqlite_read_only(&url) {
            let options = AnyPoolOptions::new()
                .max_connections(SQLITE_READERS)
                .after_connect(|conn, _| {
                    Box::pin(async move { conn.execute("PRAGMA busy_timeout = 5000").await.map(drop) })
                });
            store.reads = connect(options, &url).await?;
        }
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.pool
            .execute("CREATE TABLE IF NOT EXISTS tidemark_schema (version BIGINT NOT NULL)")
            .await?;
        let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM tidemark_schema")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        // SQLite keeps the rows of a `WITHOUT ROWID` table in key order,
        // so a range of keys is read in one sequential pass.
        let without_rowid = match self.backend {
            Backend::Sqlite => "WITHOUT ROWID",
            Backend::Postgres => "",
        };
        for (i, statements) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            if version <= current {
                continue;
            }
            let fail = |source| StoreError::Migrate { version, source };
            let mut tx = self.pool.begin().await.map_err(fail)?;
            for statement in *statements {
                if self.backend == Backend::Sqlite && statement.starts_with(POSTGRES_ONLY) {
                    continue;
                }
                let statement = statement.replace("/*WITHOUT ROWID*/", without_rowid);
                tx.execute(sqlx::AssertSqlSafe(statement)).await.map_err(fail)?;
            }
            sqlx::query("INSERT INTO tidemark_schema (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            tracing::info!(version, "database schema migrated");
        }
        Ok(())
    }

    /// The next offset to read per partition of `topic`, as last committed.
    pub async fn offsets(&self, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let rows = sqlx::query("SELECT part, next_offset FROM log_offset WHERE topic = $1")
            .bind(topic)
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<i32, _>(0)?, r.try_get::<i64, _>(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Counts `batches` (dropping those whose `(session, seq)` was counted
    /// before, declaring lost the holes older than the grace) and records
    /// `next_offsets`, in one transaction.
    pub async fn commit(
        &self,
        topic: &str,
        batches: &[UsageBatch],
        next_offsets: &[(i32, i64)],
        clock: CommitClock,
    ) -> Result<Committed, StoreError> {
        // Several workers may commit at once (during a rebalance, two may
        // hold batches of one session): SQLite takes its write lock up
        // front, Postgres locks the sessions' rows while reading them.
        let mut tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        let sessions = || batches.iter().map(|b| b.session_id.as_str());
        if self.backend == Backend::Postgres {
            insert_missing_sessions(&mut tx, sessions(), clock.now_micros).await?;
        }
        let mut states = load_sessions(&mut tx, sessions(), self.backend == Backend::Postgres).await?;
        let mut rollups = Rollups::default();
        // Late batches again, for late_usage (their rejections are the same).
        let mut late = Rollups::default();
        let mut committed = Committed::default();
        for batch in batches {
            let state = states.entry(batch.session_id.as_str()).or_default();
            match state.admit(batch.seq, clock.now_micros) {
                Verdict::Duplicate => {
                    committed.duplicates += 1;
                    continue;
                }
                Verdict::Recovered => committed.recovered += 1,
                Verdict::New => {}
            }
            committed.batches += 1;
            rollups.add(batch);
            if clock.now_micros.saturating_sub(batch.window_end_unix_micros) > clock.late_after_micros {
                committed.late += 1;
                late.add(batch);
            }
        }
        committed.rejected = rollups.rejected().to_vec();
        let placeholders = match self.backend {
            Backend::Sqlite => Placeholders::Positional,
            Backend::Postgres => Placeholders::Numbered,
        };
        let mut touched: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for batch in batches {
            touched.insert(&batch.session_id, (&batch.service, &batch.instance));
        }
        let mut sessions = Vec::with_capacity(touched.len());
        for (session, (service, instance)) in touched {
            let Some(state) = states.get_mut(session) else { continue };
            committed.declared_lost += state.declare_old_holes(clock.now_micros, clock.gap_grace_micros);
            let next_seq = i64::try_from(state.next_seq).unwrap_or(i64::MAX);
            let row = (
                session,
                service,
                instance,
                next_seq,
                state.above_text(),
                state.hole_since_micros,
            );
            sessions.push((row, state.lost_text()));
        }
        let mut params = Vec::with_capacity(sessions.len() * 8);
        for ((session, service, instance, next_seq, above, hole_since), lost) in &sessions {
            params.extend([
                Param::Text(session),
                Param::Text(service),
                Param::Text(instance),
                Param::Int(*next_seq),
                Param::Text(above),
                Param::NullableInt(*hole_since),
                Param::Text(lost),
                Param::Int(clock.now_micros),
            ]);
        }
        upsert(
            &mut tx,
            placeholders,
            "INSERT INTO session_state (session_id, service, instance, next_seq, above, hole_since, lost, last_seen)",
            "ON CONFLICT (session_id) DO UPDATE SET
               service = excluded.service, instance = excluded.instance, next_seq = excluded.next_seq,
               above = excluded.above, hole_since = excluded.hole_since, lost = excluded.lost,
               last_seen = excluded.last_seen",
            8,
            &params,
        )
        .await?;
        let add_up = |table: &str, keys: &str| {
            format!(
                "ON CONFLICT ({keys}) DO UPDATE SET
                   quantity = {table}.quantity + excluded.quantity, batches = {table}.batches + excluded.batches"
            )
        };
        params.clear();
        let rows = rollups.rows();
        for (key, sums) in &rows {
            params.extend(rollup_params(key, key.minute, *sums));
        }
        upsert(
            &mut tx,
            placeholders,
            "INSERT INTO usage_rollup (tenant, service, meter, minute, quantity, batches)",
            &add_up("usage_rollup", "tenant, minute, service, meter"),
            6,
            &params,
        )
        .await?;
        params.clear();
        let hourly: Vec<_> = hours(rows.iter()).collect();
        for &(key, hour, sums) in &hourly {
            params.extend(rollup_params(key, hour, sums));
        }
        upsert(
            &mut tx,
            placeholders,
            "INSERT INTO usage_rollup_hour (tenant, service, meter, hour, quantity, batches)",
            &add_up("usage_rollup_hour", "tenant, hour, service, meter"),
            6,
            &params,
        )
        .await?;
        params.clear();
        let mut totals: BTreeMap<(&str, i64, &str), Sums> = BTreeMap::new();
        for &(key, hour, sums) in &hourly {
            let total = totals.entry((&key.tenant, hour, &key.meter)).or_default();
            total.quantity = total.quantity.saturating_add(sums.quantity);
            total.batches += sums.batches;
        }
        for ((tenant, hour, meter), sums) in &totals {
            params.extend([
                Param::Text(tenant),
                Param::Text(meter),
                Param::Int(*hour),
                Param::Int(sums.quantity),
                Param::Int(sums.batches),
            ]);
        }
        upsert(
            &mut tx,
            placeholders,
            "INSERT INTO usage_total_hour (tenant, meter, hour, quantity, batches)",
            &add_up("usage_total_hour", "tenant, hour, meter"),
            5,
            &params,
        )
        .await?;
        let stored_minute = minute_start(clock.now_micros);
        params.clear();
        let late_rows = late.rows();
        for (key, sums) in &late_rows {
            let [tenant, service, meter, minute, quantity, batches] = rollup_params(key, key.minute, *sums);
            params.extend([
                tenant,
                service,
                meter,
                minute,
                Param::Int(stored_minute),
                quantity,
                batches,
            ]);
        }
        upsert(
            &mut tx,
            placeholders,
            "INSERT INTO late_usage (tenant, service, meter, minute, stored_minute, quantity, batches)",
            &add_up("late_usage", "tenant, minute, service, meter, stored_minute"),
            7,
            &params,
        )
        .await?;
        params.clear();
        for &(part, next_offset) in next_offsets {
            params.extend([Param::Text(topic), Param::Int(i64::from(part)), Param::Int(next_offset)]);
        }
        upsert(
            &mut tx,
            placeholders,
            "INSERT INTO log_offset (topic, part, next_offset)",
            "ON CONFLICT (topic, part) DO UPDATE SET next_offset = excluded.next_offset",
            3,
            &params,
        )
        .await?;
        tx.commit().await?;
        Ok(committed)
    }

    /// Every session with missing batches, open or declared lost.
    pub async fn gaps(&self) -> Result<Vec<SessionGaps>, StoreError> {
        let rows = sqlx::query(
            "SELECT session_id, service, instance, next_seq, above, hole_since, lost FROM session_state
             WHERE above <> '' OR lost <> '' ORDER BY service, session_id",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                let session_id: String = r.try_get(0)?;
                let state = SessionState::from_stored(
                    r.try_get(3)?,
                    &r.try_get::<String, _>(4)?,
                    r.try_get(5)?,
                    &r.try_get::<String, _>(6)?,
                )
                .ok_or_else(|| {
                    sqlx::Error::Decode(format!("malformed session_state row for session {session_id}").into())
                })?;
                Ok(SessionGaps {
                    service: r.try_get(1)?,
                    instance: r.try_get(2)?,
                    missing: state.missing(),
                    session_id,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Rolled-up usage per window (and service, if asked), oldest first.
    ///
    /// Windows of whole hours read the whole hours of the range from the
    /// hourly rollups (per tenant, or per service when grouped or filtered
    /// by service) and only its partial hours at either end from the
    /// minute rollups; shorter windows read minutes. The rows are summed
    /// into windows here rather than by SQL's `GROUP BY`, which costs a
    /// sort per query.
    pub async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let window = q.window_micros.max(1);
        let (hours_from, hours_to) = if window % MICROS_PER_HOUR == 0 {
            whole_hours(q.from, q.to)
        } else {
            (q.to, q.to)
        };
        let hourly = if q.by_service || q.service.is_some() {
            "SELECT hour AS t, service, meter, quantity, batches FROM usage_rollup_hour
             WHERE tenant = $1 AND hour >= $6 AND hour < $7 AND ($4 = '' OR service = $4) AND ($5 = '' OR meter = $5)"
        } else {
            "SELECT hour AS t, '' AS service, meter, quantity, batches FROM usage_total_hour
             WHERE tenant = $1 AND hour >= $6 AND hour < $7 AND ($5 = '' OR meter = $5)"
        };
        let minutes = |from: &str, to: &str| {
            format!(
                "SELECT minute, service, meter, quantity, batches FROM usage_rollup
                 WHERE tenant = $1 AND minute >= {from} AND minute < {to}
                   AND ($4 = '' OR service = $4) AND ($5 = '' OR meter = $5)"
            )
        };
        // All rows as one JSON array in one row: sqlx's SQLite driver hands
        // each row over from its worker thread on its own (a thread wake-up,
        // some microseconds, per row), which for a few thousand rows costs
        // more than the query.
        let packed = match self.backend {
            Backend::Sqlite => "json_group_array(json_array(t, service, meter, quantity, batches))",
            Backend::Postgres => "json_agg(json_build_array(t, service, meter, quantity, batches))::text",
        };
        let sql = format!(
            "SELECT COALESCE({packed}, '[]') FROM ({hourly} UNION ALL {} UNION ALL {}) AS rows",
            minutes("$2", "$6"),
            minutes("$7", "$3")
        );
        let packed: String = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&q.tenant)
            .bind(q.from)
            .bind(q.to)
            .bind(q.service.as_deref().unwrap_or(""))
            .bind(q.meter.as_deref().unwrap_or(""))
            .bind(hours_from)
            .bind(hours_to)
            .fetch_one(&self.reads)
            .await?
            .try_get(0)?;
        let rows: Vec<(i64, String, String, i64, i64)> = serde_json::from_str(&packed)
            .map_err(|e| sqlx::Error::Decode(format!("usage rows packed as JSON: {e}").into()))?;
        // Into windows: sort (the hourly rows come in key order, which the
        // sort finds in one pass) and add up neighbours with the same key.
        let mut rows: Vec<UsageRow> = rows
            .into_iter()
            .map(|(time, service, meter, quantity, batches)| UsageRow {
                window_start: time.div_euclid(window) * window,
                service: q.by_service.then_some(service),
                meter,
                quantity,
                batches,
            })
            .collect();
        rows.sort_by(|a, b| (a.window_start, &a.service, &a.meter).cmp(&(b.window_start, &b.service, &b.meter)));
        rows.dedup_by(|later, kept| {
            let same =
                (later.window_start, &later.service, &later.meter) == (kept.window_start, &kept.service, &kept.meter);
            if same {
                kept.quantity = kept.quantity.saturating_add(later.quantity);
                kept.batches = kept.batches.saturating_add(later.batches);
            }
            same
        });
        Ok(rows)
    }

    /// The tenant's late usage (`service` and `meter` filters apply) whose
    /// event minute is in `[q.from, q.to)`, per event minute and stored
    /// minute, oldest first. `q.window_micros` and `q.by_service` do not
    /// apply: each row is one event minute, stored minute and service.
    pub async fn late_usage(&self, q: &UsageQuery) -> Result<Vec<LateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant, service, meter, minute, stored_minute, quantity, batches FROM late_usage
             WHERE tenant = $1 AND minute >= $2 AND minute < $3
               AND ($4 = '' OR service = $4) AND ($5 = '' OR meter = $5)
             ORDER BY minute, stored_minute, service, meter",
        )
        .bind(&q.tenant)
        .bind(q.from)
        .bind(q.to)
        .bind(q.service.as_deref().unwrap_or(""))
        .bind(q.meter.as_deref().unwrap_or(""))
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LateRow {
                    tenant: r.try_get(0)?,
                    service: r.try_get(1)?,
                    meter: r.try_get(2)?,
                    minute: r.try_get(3)?,
                    stored_minute: r.try_get(4)?,
                    quantity: r.try_get(5)?,
                    batches: r.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// Every `usage_rollup` row, of every tenant, whose minute is in
    /// `[from, to)`, ordered by tenant, service, meter and minute.
    pub async fn rollups(&self, from: i64, to: i64) -> Result<Vec<RollupRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant, service, meter, minute, quantity, batches FROM usage_rollup
             WHERE minute >= $1 AND minute < $2
             ORDER BY tenant, service, meter, minute",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RollupRow {
                    tenant: r.try_get(0)?,
                    service: r.try_get(1)?,
                    meter: r.try_get(2)?,
                    minute: r.try_get(3)?,
                    quantity: r.try_get(4)?,
                    batches: r.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

fn distinct<'a>(sessions: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let set: std::collections::BTreeSet<&str> = sessions.collect();
    set.into_iter().collect()
}

fn placeholders(from: usize, count: usize) -> String {
    (from..from + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Gives every session a row (empty state) unless it has one, so that
/// [`load_sessions`] can lock it.
async fn insert_missing_sessions<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    sessions: impl Iterator<Item = &'a str>,
    now_micros: i64,
) -> Result<(), StoreError> {
    for chunk in distinct(sessions).chunks(SESSIONS_PER_QUERY) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, '', '', 0, '', NULL, '', $1)", i + 2))
            .collect();
        let sql = format!(
            "INSERT INTO session_state (session_id, service, instance, next_seq, above, hole_since, lost, last_seen)
             VALUES {} ON CONFLICT (session_id) DO NOTHING",
            rows.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now_micros);
        for session in chunk {
            query = query.bind(*session);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// The stored dedupe state of `sessions` (those never seen are absent),
/// with their rows locked until the transaction ends if `lock`.
async fn load_sessions<'a>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    sessions: impl Iterator<Item = &'a str>,
    lock: bool,
) -> Result<HashMap<&'a str, SessionState>, StoreError> {
    let wanted = distinct(sessions);
    let mut states = HashMap::with_capacity(wanted.len());
    for chunk in wanted.chunks(SESSIONS_PER_QUERY) {
        let sql = format!(
            "SELECT session_id, next_seq, above, hole_since, lost FROM session_state WHERE session_id IN ({}){}",
            placeholders(1, chunk.len()),
            // In key order, as every commit locks them: commits that share
            // sessions wait for each other and never deadlock.
            if lock { " ORDER BY session_id FOR UPDATE" } else { "" }
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for session in chunk {
            query = query.bind(*session);
        }
        for row in query.fetch_all(&mut **tx).await? {
            let id: String = row.try_get(0)?;
            let Some(&session) = chunk.iter().find(|s| **s == id) else {
                continue;
            };
            let state = SessionState::from_stored(
                row.try_get(1)?,
                &row.try_get::<String, _>(2)?,
                row.try_get(3)?,
                &row.try_get::<String, _>(4)?,
            )
            .ok_or_else(|| sqlx::Error::Decode(format!("malformed session_state row for session {id}").into()))?;
            states.insert(session, state);
        }
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::Missing;
    use tidemark_core::TenantUsage;

    fn batch(session: &str, seq: u64, tenant: &str, requests: u64) -> UsageBatch {
        UsageBatch {
            service: "svc".into(),
            instance: "i".into(),
            session_id: session.into(),
            seq,
            window_start_unix_micros: 120_000_000 + seq as i64,
            window_end_unix_micros: 121_000_000,
            tenants: vec![TenantUsage {
                tenant: tenant.into(),
                requests,
                ..TenantUsage::default()
            }],
            ..UsageBatch::default()
        }
    }

    fn all(tenant: &str) -> UsageQuery {
        UsageQuery {
            meter: Some("requests".into()),
            ..UsageQuery::all(tenant)
        }
    }

    const CLOCK: CommitClock = CommitClock {
        now_micros: 1_000_000,
        gap_grace_micros: 60_000_000,
        late_after_micros: 300_000_000,
    };

    #[tokio::test]
    async fn counts_each_session_seq_once_and_keeps_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("b.db").display());
        let store = Store::open(&url).await.expect("open");
        let first = [batch("s1", 0, "acme", 3), batch("s1", 1, "acme", 4)];
        let done = store.commit("t", &first, &[(0, 2)], CLOCK).await.expect("commit");
        assert_eq!((done.batches, done.duplicates), (2, 0));
        // A replay of seq 1 plus a new batch: only the new one counts.
        let second = [batch("s1", 1, "acme", 4), batch("s2", 0, "acme", 5)];
        let done = store
            .commit("t", &second, &[(0, 4), (1, 7)], CLOCK)
            .await
            .expect("commit");
        assert_eq!((done.batches, done.duplicates), (1, 1));
        drop(store);

        let store = Store::open(&url).await.expect("reopen runs no migration twice");
        let rows = store.usage(&all("acme")).await.expect("query");
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].window_start, rows[0].quantity, rows[0].batches),
            (120_000_000, 12, 3)
        );
        assert!(store.usage(&all("globex")).await.expect("query").is_empty());
        let offsets = store.offsets("t").await.expect("offsets");
        assert_eq!(offsets, HashMap::from([(0, 4), (1, 7)]));
    }

    #[tokio::test]
    async fn out_of_order_batches_count_once_and_holes_become_reported_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("b.db").display());
        let store = Store::open(&url).await.expect("open");
        // 0, then 3 and 4 before 1 (a failover); 2 never comes.
        let batches = [0, 3, 4, 1, 3].map(|seq| batch("s1", seq, "acme", 1));
        let done = store.commit("t", &batches, &[(0, 5)], CLOCK).await.expect("commit");
        assert_eq!((done.batches, done.duplicates, done.declared_lost), (4, 1, 0));
        let gaps = store.gaps().await.expect("gaps");
        assert_eq!(gaps.len(), 1);
        assert_eq!((gaps[0].session_id.as_str(), gaps[0].service.as_str()), ("s1", "svc"));
        assert_eq!(
            gaps[0].missing,
            [Missing {
                from_seq: 2,
                to_seq: 2,
                lost: false
            }]
        );

        // Past the grace, the next commit touching the session declares it lost.
        let later = CommitClock {
            now_micros: CLOCK.now_micros + CLOCK.gap_grace_micros,
            ..CLOCK
        };
        let done = store
            .commit("t", &[batch("s1", 5, "acme", 1)], &[(0, 6)], later)
            .await
            .expect("commit");
        assert_eq!((done.batches, done.declared_lost), (1, 1));
        assert_eq!(
            store.gaps().await.expect("gaps")[0].missing,
            [Missing {
                from_seq: 2,
                to_seq: 2,
                lost: true
            }]
        );

        // It turns up after all: counted once, and the gap is gone.
        let late = [batch("s1", 2, "acme", 1), batch("s1", 2, "acme", 1)];
        let done = store.commit("t", &late, &[(0, 8)], later).await.expect("commit");
        assert_eq!((done.batches, done.recovered, done.duplicates), (1, 1, 1));
        assert!(store.gaps().await.expect("gaps").is_empty());
        let total: i64 = store
            .usage(&all("acme"))
            .await
            .expect("query")
            .iter()
            .map(|r| r.quantity)
            .sum();
        assert_eq!(total, 6, "seqs 0 to 5, each once");
    }

    #[test]
    fn whole_hours_leave_only_partial_hours_at_the_ends() {
        const H: i64 = MICROS_PER_HOUR;
        const M: i64 = MICROS_PER_MINUTE;
        assert_eq!(whole_hours(0, 3 * H), (0, 3 * H), "aligned: all hours");
        assert_eq!(whole_hours(10 * M, 3 * H + 5 * M), (H, 3 * H));
        assert_eq!(whole_hours(10 * M, 20 * M), (20 * M, 20 * M), "inside one hour: none");
        assert_eq!(whole_hours(10 * M, H), (H, H));
        assert_eq!(whole_hours(0, i64::MAX), (0, hour_start(i64::MAX)));
    }

    #[tokio::test]
    async fn hour_and_day_windows_from_hourly_rollups_equal_the_minutes_folded() {
        const M: i64 = MICROS_PER_MINUTE;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite:{}", dir.path().join("b.db").display()))
            .await
            .expect("open");
        // Minutes spread over three hours and two services (seq n has n + 1
        // requests; even seqs are service a), in two commits, so that hourly
        // rows are added to as well as inserted.
        let minutes = [0, 1, 59, 60, 61, 119, 125, 170, 179];
        let batches: Vec<UsageBatch> = minutes
            .iter()
            .enumerate()
            .map(|(seq, minute)| UsageBatch {
                service: if seq % 2 == 0 { "a" } else { "b" }.into(),
                window_start_unix_micros: minute * M + 1,
                window_end_unix_micros: minute * M + 2,
                ..batch("s1", seq as u64, "acme", seq as u64 + 1)
            })
            .collect();
        let (first, second) = batches.split_at(4);
        store.commit("t", first, &[(0, 4)], CLOCK).await.expect("commit");
        store.commit("t", second, &[(0, 9)], CLOCK).await.expect("commit");
        for (from, to) in [
            (0, 180 * M),
            (1, 180 * M),
            (30 * M, 150 * M),
            (61 * M, 62 * M),
            (60 * M, 120 * M),
        ] {
            for (window, by_service) in [(60 * M, true), (60 * M, false), (1440 * M, false), (120 * M, true)] {
                let q = UsageQuery {
                    from,
                    to,
                    window_micros: window,
                    by_service,
                    ..all("acme")
                };
                let minutes = store
                    .usage(&UsageQuery {
                        window_micros: M,
                        ..q.clone()
                    })
                    .await
                    .expect("minutes");
                let mut folded: BTreeMap<(i64, Option<String>), (i64, i64)> = BTreeMap::new();
                for row in minutes {
                    let sums = folded
                        .entry(((row.window_start / window) * window, row.service))
                        .or_default();
                    sums.0 += row.quantity;
                    sums.1 += row.batches;
                }
                let got: BTreeMap<(i64, Option<String>), (i64, i64)> = store
                    .usage(&q)
                    .await
                    .expect("windows")
                    .into_iter()
                    .map(|r| ((r.window_start, r.service), (r.quantity, r.batches)))
                    .collect();
                assert_eq!(
                    got, folded,
                    "from {from} to {to} window {window} by service {by_service}"
                );
                assert!(!got.is_empty());
            }
        }
        let hourly = |store: Store| async move {
            sqlx::query("SELECT hour, service, quantity, batches FROM usage_rollup_hour ORDER BY hour, service")
                .fetch_all(store.pool())
                .await
                .expect("hourly rows")
                .iter()
                .map(|r| {
                    let row: (i64, String, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
                    row
                })
                .collect::<Vec<_>>()
        };
        let written = hourly(store.clone()).await;
        let h = 60 * M;
        let expected = [
            (0, "a", 1 + 3, 2),
            (0, "b", 2, 1),
            (h, "a", 5, 1),
            (h, "b", 4 + 6, 2),
            (2 * h, "a", 7 + 9, 2),
            (2 * h, "b", 8, 1),
        ]
        .map(|(hour, service, q, b)| (hour, service.to_owned(), q, b));
        assert_eq!(written, expected);
        let totals = |store: Store| async move {
            sqlx::query("SELECT hour, quantity, batches FROM usage_total_hour ORDER BY hour")
                .fetch_all(store.pool())
                .await
                .expect("total rows")
                .iter()
                .map(|r| {
                    let row: (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
                    row
                })
                .collect::<Vec<_>>()
        };
        let expected_totals = [(0, 4 + 2, 3), (h, 5 + 10, 3), (2 * h, 16 + 8, 3)];
        assert_eq!(totals(store.clone()).await, expected_totals);

        // A store from before hourly rollups gets them from its minutes.
        let conn = store.pool();
        conn.execute("DROP TABLE usage_rollup_hour").await.expect("drop");
        conn.execute("DROP TABLE usage_total_hour").await.expect("drop");
        conn.execute("DELETE FROM tidemark_schema WHERE version >= 5")
            .await
            .expect("unmigrate");
        drop(store);
        let store = Store::open(&format!("sqlite:{}", dir.path().join("b.db").display()))
            .await
            .expect("reopen");
        assert_eq!(hourly(store.clone()).await, expected);
        assert_eq!(totals(store).await, expected_totals);
    }

    #[test]
    fn sqlite_files_get_read_only_twins() {
        assert_eq!(
            sqlite_read_only("sqlite:/d/b.db?mode=rwc").as_deref(),
            Some("sqlite:/d/b.db?mode=ro")
        );
        assert_eq!(
            sqlite_read_only("sqlite:b.db?cache=shared&mode=rw").as_deref(),
            Some("sqlite:b.db?cache=shared&mode=ro")
        );
        assert_eq!(sqlite_read_only("sqlite:b.db?mode=ro"), None);
        assert_eq!(sqlite_read_only("sqlite::memory:"), None);
        assert_eq!(sqlite_read_only("postgres://u@h/db?mode=rw"), None);
    }

    #[tokio::test]
    async fn on_sqlite_queries_answer_while_the_writer_is_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite:{}", dir.path().join("b.db").display()))
            .await
            .expect("open");
        let b = batch("s", 0, "acme", 3);
        let clock = CommitClock {
            now_micros: b.window_end_unix_micros,
            gap_grace_micros: 0,
            late_after_micros: i64::MAX,
        };
        store.commit("t", &[b], &[(0, 1)], clock).await.expect("commit");
        // A commit in the middle of its transaction holds the only writer.
        let mut writing = store.pool().begin_with("BEGIN IMMEDIATE").await.expect("begin");
        writing
            .execute("UPDATE log_offset SET next_offset = 2")
            .await
            .expect("write");
        let usage = tokio::time::timeout(std::time::Duration::from_secs(2), store.usage(&all("acme")))
            .await
            .expect("the query waited for the writer")
            .expect("usage");
        assert_eq!(usage.iter().map(|r| r.quantity).sum::<i64>(), 3);
        let offsets = store.offsets("t").await.expect("offsets");
        assert_eq!(offsets.get(&0), Some(&1), "a reader sees the last commit only");
        writing.commit().await.expect("commit");
        assert_eq!(store.offsets("t").await.expect("offsets").get(&0), Some(&2));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:x.db"), "sqlite:x.db");
    }

    #[tokio::test]
    async fn bad_urls_fail_with_a_reason() {
        let err = Store::open("mysql://h/db").await.expect_err("unsupported");
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
        let err = Store::open("sqlite:/nonexistent-dir/x/y.db")
            .await
            .expect_err("no such dir");
        assert!(
            err.to_string()
                .starts_with("cannot open database sqlite:/nonexistent-dir/x/y.db"),
            "{err}"
        );
    }
}
