//! The invoice tables and the usage reads invoices need. Every function
//! takes a connection, so that finalizing reads and writes in one
//! transaction; the SQL is the same on SQLite and Postgres.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::aggregate::MeterUsage;
use super::model::{Correction, Invoice, Line, LineKind, MINIMUM_CHARGE, Status, parse_invoice_id};
use super::period::Period;
use crate::pricing::{Aggregation, TierLine};
use crate::subscriptions::{PlanId, Subscription};

/// Why stored data could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored invoice {id}: {reason}")]
    Corrupt { id: String, reason: String },
}

fn corrupt(id: &str, reason: impl Into<String>) -> DbError {
    DbError::Corrupt {
        id: id.to_owned(),
        reason: reason.into(),
    }
}

fn placeholders(from: usize, count: usize) -> String {
    (from..from + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits quantities in SQL so that sums of them never pass a BIGINT:
/// `Σ q = Σ (q / 10⁹) × 10⁹ + Σ (q % 10⁹)`, each part far from overflowing.
const SPLIT: i64 = 1_000_000_000;

/// The usage of `meters` (each with its aggregation) by `tenant` in
/// `[from, to)`, all services, summarized per meter in SQL: sums, batches,
/// range and active minutes always; the largest minute for `max`, the last
/// minute's quantity for `latest`. Meters without usage are absent.
pub async fn meter_usage(
    conn: &mut AnyConnection,
    tenant: &str,
    from: i64,
    to: i64,
    meters: &[(&str, Aggregation)],
) -> Result<BTreeMap<String, MeterUsage>, DbError> {
    let mut usage: BTreeMap<String, MeterUsage> = BTreeMap::new();
    if meters.is_empty() {
        return Ok(usage);
    }
    let names: Vec<&str> = meters.iter().map(|(m, _)| *m).collect();
    let in_meters = placeholders(5, names.len());
    let sql = format!(
        "SELECT meter,
                CAST(SUM(quantity / $4) AS BIGINT), CAST(SUM(quantity % $4) AS BIGINT),
                CAST(SUM(batches) AS BIGINT), MIN(minute), MAX(minute),
                COUNT(DISTINCT CASE WHEN quantity <> 0 THEN minute END)
         FROM usage_rollup
         WHERE tenant = $1 AND minute >= $2 AND minute < $3 AND meter IN ({in_meters})
         GROUP BY meter"
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(tenant)
        .bind(from)
        .bind(to)
        .bind(SPLIT);
    for meter in &names {
        query = query.bind(*meter);
    }
    for row in query.fetch_all(&mut *conn).await? {
        let meter: String = row.try_get(0)?;
        let high: i64 = row.try_get(1)?;
        let low: i64 = row.try_get(2)?;
        usage.insert(
            meter,
            MeterUsage {
                sum: i128::from(high) * i128::from(SPLIT) + i128::from(low),
                batches: row.try_get(3)?,
                first: row.try_get(4)?,
                last: row.try_get(5)?,
                active_minutes: row.try_get(6)?,
                max_minute: 0,
                latest: 0,
            },
        );
    }
    let wanting = |usage: &BTreeMap<String, MeterUsage>, aggregation: Aggregation| -> Vec<&str> {
        meters
            .iter()
            .filter(|(m, a)| *a == aggregation && usage.contains_key(*m))
            .map(|(m, _)| *m)
            .collect()
    };
    let maxed = wanting(&usage, Aggregation::Max);
    if !maxed.is_empty() {
        let sql = format!(
            "SELECT meter, CAST(MAX(q) AS BIGINT) FROM (
                 SELECT meter, minute, SUM(quantity) AS q FROM usage_rollup
                 WHERE tenant = $1 AND minute >= $2 AND minute < $3 AND meter IN ({})
                 GROUP BY meter, minute
             ) AS per_minute
             GROUP BY meter",
            placeholders(4, maxed.len())
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant).bind(from).bind(to);
        for meter in &maxed {
            query = query.bind(*meter);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let meter: String = row.try_get(0)?;
            if let Some(u) = usage.get_mut(&meter) {
                u.max_minute = row.try_get(1)?;
            }
        }
    }
    for meter in wanting(&usage, Aggregation::Latest) {
        let Some(last) = usage.get(meter).and_then(|u| u.last) else {
            continue;
        };
        let latest: i64 = sqlx::query(
            "SELECT CAST(SUM(quantity) AS BIGINT) FROM usage_rollup WHERE tenant = $1 AND meter = $2 AND minute = $3",
        )
        .bind(tenant)
        .bind(meter)
        .bind(last)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
        if let Some(u) = usage.get_mut(meter) {
            u.latest = latest;
        }
    }
    Ok(usage)
}

/// Batch contributions per meter for `tenant` in `[from, to)`: any new
/// usage adds to them, so equal counts mean unchanged usage.
pub async fn batches_per_meter(
    conn: &mut AnyConnection,
    tenant: &str,
    from: i64,
    to: i64,
    meters: &[&str],
) -> Result<BTreeMap<String, i64>, DbError> {
    if meters.is_empty() {
        return Ok(BTreeMap::new());
    }
    let sql = format!(
        "SELECT meter, CAST(SUM(batches) AS BIGINT) FROM usage_rollup
         WHERE tenant = $1 AND minute >= $2 AND minute < $3 AND meter IN ({})
         GROUP BY meter",
        placeholders(4, meters.len())
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant).bind(from).bind(to);
    for meter in meters {
        query = query.bind(*meter);
    }
    query
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}

/// The event minutes `[first, last + 1 min)` of `tenant`'s usage of
/// `meter` in `[from, to)` that the ledger recorded as late and stored at
/// or after the minute `stored_since`; `None` if it recorded none.
pub async fn late_range(
    conn: &mut AnyConnection,
    tenant: &str,
    meter: &str,
    from: i64,
    to: i64,
    stored_since: i64,
) -> Result<Option<(i64, i64)>, DbError> {
    let row = sqlx::query(
        "SELECT MIN(minute), MAX(minute) FROM late_usage
         WHERE tenant = $1 AND meter = $2 AND minute >= $3 AND minute < $4 AND stored_minute >= $5",
    )
    .bind(tenant)
    .bind(meter)
    .bind(from)
    .bind(to)
    .bind(stored_since)
    .fetch_one(&mut *conn)
    .await?;
    let first: Option<i64> = row.try_get(0)?;
    let last: Option<i64> = row.try_get(1)?;
    Ok(first
        .zip(last)
        .map(|(first, last)| (first, last + tidemark_core::window::MICROS_PER_MINUTE)))
}

/// Tenants with usage in `[from, to)`.
///
/// Every tenant with usage has rows in `usage_total_hour`, so the query
/// walks its distinct tenants through the key (one index probe per tenant,
/// not a scan of the rollups), and asks of each whether it has usage in
/// the range's whole hours (hourly totals) or its partial hours at either
/// end (minutes).
pub async fn tenants_with_usage(conn: &mut AnyConnection, from: i64, to: i64) -> Result<Vec<String>, DbError> {
    let (hours_from, hours_to) = crate::store::whole_hours(from, to);
    let rows = sqlx::query(
        "WITH RECURSIVE known (tenant) AS (
           SELECT MIN(tenant) FROM usage_total_hour
           UNION ALL
           SELECT (SELECT MIN(h.tenant) FROM usage_total_hour h WHERE h.tenant > known.tenant)
           FROM known WHERE known.tenant IS NOT NULL
         )
         SELECT tenant FROM known k WHERE k.tenant IS NOT NULL AND (
           EXISTS (SELECT 1 FROM usage_total_hour h WHERE h.tenant = k.tenant AND h.hour >= $3 AND h.hour < $4)
           OR EXISTS (SELECT 1 FROM usage_rollup m WHERE m.tenant = k.tenant AND m.minute >= $1 AND m.minute < $3)
           OR EXISTS (SELECT 1 FROM usage_rollup m WHERE m.tenant = k.tenant AND m.minute >= $4 AND m.minute < $2)
         )
         ORDER BY tenant",
    )
    .bind(from)
    .bind(to)
    .bind(hours_from)
    .bind(hours_to)
    .fetch_all(&mut *conn)
    .await?;
    first_column(&rows)
}

/// The first column of every row.
fn first_column(rows: &[AnyRow]) -> Result<Vec<String>, DbError> {
    rows.iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}

/// Tenants with a subscription starting before `before`.
pub async fn subscribed_tenants(conn: &mut AnyConnection, before: i64) -> Result<Vec<String>, DbError> {
    let rows = sqlx::query("SELECT DISTINCT tenant FROM subscription WHERE starts_at < $1 ORDER BY tenant")
        .bind(before)
        .fetch_all(&mut *conn)
        .await?;
    first_column(&rows)
}

/// Every subscription of `tenant`, oldest first.
pub async fn subscriptions(conn: &mut AnyConnection, tenant: &str) -> Result<Vec<Subscription>, DbError> {
    let rows = sqlx::query(
        "SELECT tenant, starts_at, plan, plan_version FROM subscription WHERE tenant = $1 ORDER BY starts_at",
    )
    .bind(tenant)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let version: i64 = r.try_get(3)?;
            Ok(Subscription {
                tenant: r.try_get(0)?,
                starts_at: r.try_get(1)?,
                plan: PlanId {
                    name: r.try_get(2)?,
                    version: u32::try_from(version).map_err(|_| {
                        sqlx::Error::Decode(format!("subscription plan_version {version} out of range").into())
                    })?,
                },
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(DbError::from)
}

/// Which finalized invoices to read.
#[derive(Debug, Clone, Default)]
pub struct Filter<'a> {
    pub id: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub period_start: Option<i64>,
    /// Only invoices of periods starting before this.
    pub before: Option<i64>,
    /// Read the lines too.
    pub lines: bool,
}

const INVOICE_COLUMNS: &str = "id, tenant, period_start, period_end, time_zone, plan, plan_version, currency, \
                               subtotal, total, status, finalized_at";

/// The stored (finalized) invoices matching `filter`, oldest period first.
pub async fn invoices(conn: &mut AnyConnection, filter: &Filter<'_>) -> Result<Vec<Invoice>, DbError> {
    let sql = format!(
        "SELECT {INVOICE_COLUMNS} FROM invoice
         WHERE ($1 = '' OR id = $1) AND ($2 = '' OR tenant = $2)
           AND ($3 = 0 OR period_start = $4) AND period_start < $5
         ORDER BY period_start, tenant"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(filter.id.unwrap_or(""))
        .bind(filter.tenant.unwrap_or(""))
        .bind(i64::from(filter.period_start.is_some()))
        .bind(filter.period_start.unwrap_or(0))
        .bind(filter.before.unwrap_or(i64::MAX))
        .fetch_all(&mut *conn)
        .await?;
    let mut invoices = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut invoice = invoice_from_row(row)?;
        if filter.lines {
            invoice.lines = lines(conn, &invoice.id).await?;
        }
        invoices.push(invoice);
    }
    Ok(invoices)
}

fn decimal(id: &str, column: &str, text: &str) -> Result<Decimal, DbError> {
    Decimal::from_str_exact(text).map_err(|e| corrupt(id, format!("{column} {text:?} is not a decimal: {e}")))
}

fn invoice_from_row(row: &sqlx::any::AnyRow) -> Result<Invoice, DbError> {
    let id: String = row.try_get(0)?;
    let parsed = parse_invoice_id(&id).ok_or_else(|| corrupt(&id, "the id is not inv_<tenant>_<YYYY-MM>"))?;
    let version: i64 = row.try_get(6)?;
    let status: String = row.try_get(10)?;
    Ok(Invoice {
        tenant: row.try_get(1)?,
        period: Period {
            year: parsed.year,
            month: parsed.month,
            start: row.try_get(2)?,
            end: row.try_get(3)?,
        },
        time_zone: row.try_get(4)?,
        plan: PlanId {
            name: row.try_get(5)?,
            version: u32::try_from(version).map_err(|_| corrupt(&id, format!("plan_version {version}")))?,
        },
        currency: row.try_get(7)?,
        subtotal: decimal(&id, "subtotal", &row.try_get::<String, _>(8)?)?,
        total: decimal(&id, "total", &row.try_get::<String, _>(9)?)?,
        status: Status::parse(&status).ok_or_else(|| corrupt(&id, format!("status {status:?}")))?,
        finalized_at: row.try_get(11)?,
        lines: Vec::new(),
        id,
    })
}

async fn lines(conn: &mut AnyConnection, id: &str) -> Result<Vec<Line>, DbError> {
    let rows = sqlx::query(
        "SELECT line_no, charge, description, source, usage, quantity, allowance, unit_price, tiers, amount,
                usage_from, usage_to, batches, corrects_period_start
         FROM invoice_line WHERE invoice_id = $1 ORDER BY line_no",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let line_no: i64 = r.try_get(0)?;
            let charge: String = r.try_get(1)?;
            let unit_price: Option<String> = r.try_get(7)?;
            let tiers_text: String = r.try_get(8)?;
            let corrects_period_start: Option<i64> = r.try_get(13)?;
            let kind = if corrects_period_start.is_some() {
                LineKind::Correction
            } else if charge == MINIMUM_CHARGE {
                LineKind::Minimum
            } else {
                LineKind::Charge
            };
            let bad_tiers = |e: serde_json::Error| corrupt(id, format!("line {line_no}: tiers: {e}"));
            let (tiers, correction) = match kind {
                LineKind::Correction => (
                    Vec::new(),
                    Some(serde_json::from_str::<Correction>(&tiers_text).map_err(bad_tiers)?),
                ),
                _ => (
                    serde_json::from_str::<Vec<TierLine>>(&tiers_text).map_err(bad_tiers)?,
                    None,
                ),
            };
            Ok(Line {
                line_no: u32::try_from(line_no).map_err(|_| corrupt(id, format!("line_no {line_no}")))?,
                kind,
                charge,
                description: r.try_get(2)?,
                source: r.try_get(3)?,
                usage: decimal(id, "usage", &r.try_get::<String, _>(4)?)?,
                quantity: decimal(id, "quantity", &r.try_get::<String, _>(5)?)?,
                allowance: decimal(id, "allowance", &r.try_get::<String, _>(6)?)?,
                unit_price: unit_price.map(|p| decimal(id, "unit_price", &p)).transpose()?,
                tiers,
                amount: decimal(id, "amount", &r.try_get::<String, _>(9)?)?,
                usage_from: r.try_get(10)?,
                usage_to: r.try_get(11)?,
                batches: r.try_get(12)?,
                corrects_period_start,
                correction,
            })
        })
        .collect()
}

/// Stores `invoice` and its lines; `false` (and nothing written) if an
/// invoice of that id or that tenant and period is stored already. Run it
/// in the transaction that built the invoice.
pub async fn insert(conn: &mut AnyConnection, invoice: &Invoice) -> Result<bool, DbError> {
    let inserted = sqlx::query(
        "INSERT INTO invoice (id, tenant, period_start, period_end, time_zone, plan, plan_version, currency,
                              subtotal, total, status, finalized_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT DO NOTHING",
    )
    .bind(&invoice.id)
    .bind(&invoice.tenant)
    .bind(invoice.period.start)
    .bind(invoice.period.end)
    .bind(&invoice.time_zone)
    .bind(&invoice.plan.name)
    .bind(i64::from(invoice.plan.version))
    .bind(&invoice.currency)
    .bind(invoice.subtotal.to_string())
    .bind(invoice.total.to_string())
    .bind(invoice.status.as_str())
    .bind(invoice.finalized_at)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    for line in &invoice.lines {
        let tiers = match &line.correction {
            Some(correction) => serde_json::to_string(correction),
            None => serde_json::to_string(&line.tiers),
        }
        .map_err(|e| corrupt(&invoice.id, format!("line {}: tiers: {e}", line.line_no)))?;
        sqlx::query(
            "INSERT INTO invoice_line (invoice_id, line_no, charge, description, source, usage, quantity, allowance,
                                       unit_price, tiers, amount, usage_from, usage_to, batches, corrects_period_start)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(&invoice.id)
        .bind(i64::from(line.line_no))
        .bind(&line.charge)
        .bind(&line.description)
        .bind(line.source.as_deref())
        .bind(line.usage.to_string())
        .bind(line.quantity.to_string())
        .bind(line.allowance.to_string())
        .bind(line.unit_price.map(|p| p.to_string()))
        .bind(tiers)
        .bind(line.amount.to_string())
        .bind(line.usage_from)
        .bind(line.usage_to)
        .bind(line.batches)
        .bind(line.corrects_period_start)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

/// The key of `tenant`'s finalization lock on Postgres (FNV-1a, 64 bits).
pub fn lock_key(tenant: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "tidemark-invoice:".bytes().chain(tenant.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use tidemark_core::{TenantUsage, UsageBatch};

    use super::*;
    use crate::store::{CommitClock, Store};

    const MINUTE: i64 = 60_000_000;

    #[tokio::test]
    async fn tenants_with_usage_in_whole_and_partial_hours() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite:{}", dir.path().join("b.db").display()))
            .await
            .expect("open");
        let day = 1_764_000_000_000_000 / (24 * 60 * MINUTE) * (24 * 60 * MINUTE);
        let at = |hour: i64, minute: i64| day + (hour * 60 + minute) * MINUTE;
        let usage = [
            ("before", at(9, 30)),
            ("head", at(9, 45)),
            ("whole", at(10, 30)),
            ("tail", at(12, 10)),
            ("edge", at(12, 20)),
            ("after", at(12, 30)),
        ];
        let batches: Vec<UsageBatch> = usage
            .iter()
            .enumerate()
            .map(|(seq, (tenant, start))| UsageBatch {
                service: "svc".into(),
                instance: "i".into(),
                session_id: "s".into(),
                seq: seq as u64,
                window_start_unix_micros: *start,
                window_end_unix_micros: start + 1_000_000,
                tenants: vec![TenantUsage {
                    tenant: (*tenant).into(),
                    requests: 1,
                    ..TenantUsage::default()
                }],
                ..UsageBatch::default()
            })
            .collect();
        let clock = CommitClock {
            now_micros: at(13, 0),
            gap_grace_micros: 0,
            late_after_micros: i64::MAX,
        };
        store.commit("t", &batches, &[(0, 6)], clock).await.expect("commit");
        let listed = |from, to| {
            let store = store.clone();
            async move {
                let mut conn = store.reads().acquire().await.expect("conn");
                tenants_with_usage(&mut conn, from, to).await.expect("tenants")
            }
        };
        assert_eq!(listed(at(9, 40), at(12, 20)).await, ["head", "tail", "whole"]);
        assert_eq!(
            listed(at(9, 0), at(13, 0)).await,
            ["after", "before", "edge", "head", "tail", "whole"]
        );
        assert_eq!(listed(at(10, 0), at(12, 0)).await, ["whole"]);
        assert_eq!(listed(at(12, 10), at(12, 11)).await, ["tail"]);
        assert!(listed(at(11, 0), at(12, 0)).await.is_empty());
        assert!(listed(at(13, 0), at(14, 0)).await.is_empty());
    }
}
