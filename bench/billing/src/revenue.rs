//! Phase `revenue`: what billing's open-period revenue refresh (the
//! `tidemark_billing_open_period_revenue` gauge) costs on a month of usage,
//! and how long a query of the ledger waits for the database meanwhile.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use prometheus_client::registry::Registry;
use tidemark_bench_support::stats::{median, nearest_rank, thousands};
use tidemark_billing::gauges::Gauges;
use tidemark_billing::invoice::Invoicing;
use tidemark_billing::invoice::period::{BillingZone, Period};
use tidemark_billing::query::{self, UsageParams};
use tidemark_billing::store::{FILL_ROLLUP_HOUR, FILL_TOTAL_HOUR, Store};
use tidemark_billing::subscriptions::Catalog;
use tidemark_core::window::{MICROS_PER_MINUTE, now_micros};

use crate::{Args, Backend, backends, database_url};

/// Every tenant's plan (no subscriptions): the shipped plan pricing
/// requests and billed duration, the two meters filled.
const PLAN: &str = "aws-lambda-x86";
/// Minutes filled: the longest month.
const MINUTES: i64 = 31 * 24 * 60;
/// Tenants per currency with a series of their own (billing's default `--revenue-top-tenants`).
const TOP_TENANTS: usize = 20;
/// Unmeasured, then measured runs of the anchor query.
const ANCHOR_WARMUP: usize = 1;
const ANCHOR_RUNS: usize = 5;

/// One store's measurements, in seconds.
#[derive(Debug)]
struct Measured {
    rows: u64,
    fill: f64,
    anchor_rows: usize,
    anchor: f64,
    listing: f64,
    /// The heavy tenants' running costs, and the light ones'.
    heavy: Vec<f64>,
    light: Vec<f64>,
    refresh: f64,
    waits: Vec<f64>,
}

pub async fn revenue(args: &Args) -> anyhow::Result<String> {
    let (heavy, light) = (args.revenue_heavy_tenants, args.revenue_light_tenants);
    ensure!(
        heavy + light > 0,
        "--revenue-heavy-tenants and --revenue-light-tenants are both 0"
    );
    let anchor_tenant = if heavy > 0 { heavy_name(0) } else { light_name(0) };
    let mut out = String::new();
    let _ = writeln!(out, "## Revenue refresh on a month of usage\n");
    let _ = writeln!(
        out,
        "A fresh store holding the open period's usage: {heavy} tenants with a row at every minute of 31 days and \
         {light} at one minute an hour, two meters each (`requests`, `billed_duration_us`), one service, written \
         straight into the minute rollups in SQL (what the refresh reads; not through Kafka or `Store::commit`), \
         the hourly rollups filled from them as the schema's migration does. Every tenant is on the default plan `{PLAN}`. Then, in this process: the tenants of the \
         period (`Invoicing::tenants`), each one's running cost one after another (`Invoicing::running_cost`, what \
         `GET /v1/tenants/{{id}}/cost` answers), and the whole refresh as billing runs it \
         (`Gauges::refresh_revenue`, top {TOP_TENANTS} per currency). Meanwhile a probe runs a small query of the \
         ledger's (`Store::offsets`) every 10 ms and records how long each took: about what a ledger commit waits \
         for the database meanwhile. Each time is of one run.\n"
    );
    let _ = writeln!(
        out,
        "Anchor, measured first on the quiet store: `GET /v1/usage?tenant={anchor_tenant}` over the period (its \
         default minute windows) answered in process (`tidemark_billing::query::run`, no HTTP), the median of \
         {ANCHOR_RUNS} after {ANCHOR_WARMUP} unmeasured. It reads the same minute rows of one tenant's month as that \
         tenant's running cost, and hands them all back instead of aggregating them.\n"
    );
    let mut columns = Vec::new();
    for backend in backends(args) {
        columns.push((backend, measure(args, backend, &anchor_tenant).await?));
    }
    let names: Vec<&str> = columns.iter().map(|(b, _)| b.name()).collect();
    let _ = writeln!(out, "| | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|{}", "--:|".repeat(columns.len()));
    row(&mut out, &columns, "fill: minute rollup rows, time", |m| {
        format!("{} in {}", thousands(m.rows as f64), secs(m.fill))
    });
    row(
        &mut out,
        &columns,
        &format!("anchor: `GET /v1/usage` of `{anchor_tenant}`'s period (rows answered)"),
        |m| format!("{} ({})", secs(m.anchor), thousands(m.anchor_rows as f64)),
    );
    row(&mut out, &columns, "listing the tenants", |m| secs(m.listing));
    row(&mut out, &columns, "running cost per tenant, p50 of all", |m| {
        let all: Vec<f64> = m.heavy.iter().chain(&m.light).copied().collect();
        secs(median(&all))
    });
    row(&mut out, &columns, "running cost: slowest heavy / slowest light", |m| {
        format!("{} / {}", secs(max(&m.heavy)), secs(max(&m.light)))
    });
    row(
        &mut out,
        &columns,
        "a heavy tenant's running cost (p50) ÷ the anchor",
        |m| {
            let ratio = median(&m.heavy) / m.anchor;
            if ratio.is_finite() {
                format!("{ratio:.1}×")
            } else {
                "–".to_owned()
            }
        },
    );
    row(&mut out, &columns, "the whole refresh", |m| secs(m.refresh));
    row(
        &mut out,
        &columns,
        "the probe meanwhile: p50 / p99 / max (probes)",
        |m| {
            format!(
                "{} / {} / {} ({})",
                secs(nearest_rank(&m.waits, 0.5)),
                secs(nearest_rank(&m.waits, 0.99)),
                secs(max(&m.waits)),
                thousands(m.waits.len() as f64)
            )
        },
    );
    out.push('\n');
    Ok(out)
}

/// A table row: what, then one cell per store.
fn row(out: &mut String, columns: &[(Backend, Measured)], what: &str, cell: impl Fn(&Measured) -> String) {
    let cells: Vec<String> = columns.iter().map(|(_, m)| cell(m)).collect();
    let _ = writeln!(out, "| {what} | {} |", cells.join(" | "));
}

fn heavy_name(i: usize) -> String {
    format!("heavy-{i:03}")
}

fn light_name(i: usize) -> String {
    format!("light-{i:04}")
}

fn max(values: &[f64]) -> f64 {
    nearest_rank(values, 1.0)
}

/// Seconds as `0.73 s` or `1.7 ms`.
fn secs(s: f64) -> String {
    if !s.is_finite() {
        "–".to_owned()
    } else if s >= 1.0 {
        format!("{s:.1} s")
    } else if s >= 0.1 {
        format!("{s:.2} s")
    } else {
        format!("{:.1} ms", s * 1000.0)
    }
}

async fn measure(args: &Args, backend: Backend, anchor_tenant: &str) -> anyhow::Result<Measured> {
    let (heavy, light) = (args.revenue_heavy_tenants, args.revenue_light_tenants);
    let url = database_url(args, backend, "rev").await?;
    let store = Store::open(&url).await?;
    let invoicing = Invoicing {
        store: store.clone(),
        catalog: Arc::new(Catalog::load(None, Some(PLAN))?),
        zone: BillingZone::Utc,
        // Only finalizing reads it; drafts do not.
        collection_wait_micros: 0,
    };
    let now = now_micros();
    let period = invoicing
        .zone
        .period_at(now)
        .ok_or_else(|| anyhow!("no billing period holds the clock ({now} µs)"))?;

    eprintln!(
        "[bench] filling the {} revenue store: {heavy} heavy and {light} light tenants",
        backend.name()
    );
    let began = Instant::now();
    let rows = fill_month(&url, backend, period.start, heavy, light).await?;
    let fill = began.elapsed().as_secs_f64();

    let (anchor, anchor_rows) = anchor(&store, &period, anchor_tenant).await?;

    // What the ledger would wait for a connection, sampled every 10 ms.
    let stop = Arc::new(tokio::sync::Notify::new());
    let probe = {
        let store = store.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut waits = Vec::new();
            loop {
                let asked = Instant::now();
                store.offsets("probe").await?;
                waits.push(asked.elapsed().as_secs_f64());
                tokio::select! {
                    () = stop.notified() => return Ok::<_, anyhow::Error>(waits),
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        })
    };
    eprintln!("[bench] the {} revenue refresh, step by step", backend.name());
    let began = Instant::now();
    let tenants = invoicing.tenants(&period).await?;
    let listing = began.elapsed().as_secs_f64();
    let (mut heavy_costs, mut light_costs) = (Vec::new(), Vec::new());
    for tenant in &tenants {
        let began = Instant::now();
        invoicing.running_cost(tenant, now).await?;
        let took = began.elapsed().as_secs_f64();
        if tenant.starts_with("heavy-") {
            heavy_costs.push(took);
        } else {
            light_costs.push(took);
        }
    }
    let gauges = Gauges::register(&mut Registry::default());
    let began = Instant::now();
    let revenue = gauges.refresh_revenue(&invoicing, TOP_TENANTS, now).await?;
    let refresh = began.elapsed().as_secs_f64();
    stop.notify_one();
    let waits = probe.await??;
    ensure!(
        (revenue.priced, revenue.unpriced) == (heavy + light, 0),
        "the refresh priced {} tenants and could not price {}, of {}",
        revenue.priced,
        revenue.unpriced,
        heavy + light
    );
    Ok(Measured {
        rows,
        fill,
        anchor_rows,
        anchor,
        listing,
        heavy: heavy_costs,
        light: light_costs,
        refresh,
        waits,
    })
}

/// The anchor: one tenant's period by `GET /v1/usage` (default windows),
/// in process; the median time of the measured runs and the rows answered.
async fn anchor(store: &Store, period: &Period, tenant: &str) -> anyhow::Result<(f64, usize)> {
    let request = query::usage_request(&UsageParams {
        tenant: Some(tenant),
        from: Some(period.start),
        to: Some(period.end),
        ..UsageParams::default()
    })
    .map_err(|e| anyhow!("usage request: {}", e.message))?;
    let mut rows = 0;
    let mut times = Vec::new();
    for run in 0..ANCHOR_WARMUP + ANCHOR_RUNS {
        let began = Instant::now();
        rows = query::run(store, &request).await?.len();
        if run >= ANCHOR_WARMUP {
            times.push(began.elapsed().as_secs_f64());
        }
    }
    Ok((median(&times), rows))
}

/// Fills the open period of a fresh database with `heavy` tenants using
/// every minute of 31 days and `light` tenants using one minute an hour,
/// `requests` and `billed_duration_us` rows, directly in SQL; the rows written.
async fn fill_month(url: &str, backend: Backend, period_start: i64, heavy: usize, light: usize) -> anyhow::Result<u64> {
    use sqlx::Connection;
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    let sql = match backend {
        Backend::Postgres => {
            "INSERT INTO usage_rollup (tenant, service, meter, minute, quantity, batches)
             SELECT $1, 'shop', meter, $2 + i * $3, CASE meter WHEN 'requests' THEN 100 ELSE 25000000 END, 4
             FROM generate_series(0, $4 - 1) AS i, (VALUES ('requests'), ('billed_duration_us')) AS meters(meter)"
        }
        Backend::Sqlite => {
            "WITH RECURSIVE m(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM m WHERE i < $4 - 1)
             INSERT INTO usage_rollup (tenant, service, meter, minute, quantity, batches)
             SELECT $1, 'shop', meter, $2 + i * $3, CASE meter WHEN 'requests' THEN 100 ELSE 25000000 END, 4
             FROM m, (SELECT 'requests' AS meter UNION ALL SELECT 'billed_duration_us') AS meters"
        }
    };
    let tenants = (0..heavy)
        .map(|i| (heavy_name(i), MICROS_PER_MINUTE, MINUTES))
        .chain((0..light).map(|i| (light_name(i), 60 * MICROS_PER_MINUTE, MINUTES / 60)));
    let mut rows = 0;
    for (tenant, step, count) in tenants {
        rows += sqlx::query(sql)
            .bind(tenant)
            .bind(period_start)
            .bind(step)
            .bind(count)
            .execute(&mut conn)
            .await?
            .rows_affected();
    }
    // The hourly rollups the ledger would have written beside them.
    for fill in [FILL_ROLLUP_HOUR, FILL_TOTAL_HOUR] {
        sqlx::query(fill).execute(&mut conn).await?;
    }
    Ok(rows)
}
