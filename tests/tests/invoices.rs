//! Invoices over a real store, SQLite (a temporary file) and Postgres (the
//! server `scripts/postgres` runs; these fail, never skip, without it):
//! the AWS worked example to the cent, draft → finalize (not before the
//! collection wait) → immutable, late usage billed as a correction on the
//! next invoice worth exactly rate(new total) − rate(billed total), line
//! usage ranges and batch counts, the time-zone boundary, aggregations on
//! hand-computed rollups; and the HTTP API's 400, 403, 404 and 409.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rust_decimal::Decimal;
use serde_json::Value;
use tidemark_billing::api::ApiState;
use tidemark_billing::auth::{ApiTokens, Auth};
use tidemark_billing::invoice::model::{Invoice, LineKind, Status};
use tidemark_billing::invoice::period::{BillingZone, Period};
use tidemark_billing::invoice::{InvoiceError, Invoicing, ListFilter};
use tidemark_billing::pricing::{Plan, rate};
use tidemark_billing::store::{CommitClock, Store};
use tidemark_billing::subscriptions::{Catalog, PlanId, Subscription};
use tidemark_proto::v1::{TenantUsage, UsageBatch};

const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;

fn at(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp_micros()
}

fn d(text: &str) -> Decimal {
    Decimal::from_str_exact(text).unwrap()
}

async fn sqlite() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("billing.db").display());
    (dir, url)
}

/// The shipped plans plus `aws-lambda-page`: the AWS plan with the price
/// AWS's pricing page multiplies by in its example ($0.00001667 per GB-s).
fn plans_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../billing/plans");
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let aws = std::fs::read_to_string(shipped.join("aws-lambda-x86.toml")).unwrap();
    let page = aws
        .replace("name = \"aws-lambda-x86\"", "name = \"aws-lambda-page\"")
        .replace(
            "{ up_to = \"6000000000\", price = \"0.0000166667\" }",
            "{ up_to = \"6000000000\", price = \"0.00001667\" }",
        );
    assert_ne!(page, aws);
    std::fs::write(dir.path().join("aws-lambda-page.toml"), page).unwrap();
    std::fs::write(dir.path().join("gauges.toml"), GAUGES).unwrap();
    dir
}

/// One charge per aggregation, each at 1.00 per unit of its quantity, so
/// each line's amount is its aggregated usage to the cent.
const GAUGES: &str = r#"
name = "gauges"
version = 1
currency = "EUR"
rounding = { step = "0.01", rule = "half_up" }

[meters.peak_cpu]
source = "cpu_us"
aggregation = "max"
model = "unit"
price = "1"

[meters.last_bytes]
source = "bytes_out"
aggregation = "latest"
model = "unit"
price = "1"

[meters.mean_memory]
source = "memory_byte_us"
aggregation = "time_weighted"
model = "unit"
price = "1"

[meters.active_minutes]
source = "requests"
aggregation = "unique_count"
model = "unit"
price = "1"

[meters.reports]
source = "errors"
aggregation = "count"
model = "unit"
price = "1"

[meters.bytes_in]
model = "unit"
price = "1"
"#;

struct Fixture {
    store: Store,
    invoicing: Invoicing,
    _plans: tempfile::TempDir,
}

async fn fixture(url: &str, zone: &str, default_plan: Option<&str>) -> Fixture {
    let store = Store::open(url).await.unwrap();
    let plans = plans_dir();
    let catalog = Catalog::load(Some(plans.path()), default_plan).unwrap();
    Fixture {
        invoicing: Invoicing {
            store: store.clone(),
            catalog: Arc::new(catalog),
            zone: zone.parse().unwrap(),
            collection_wait_micros: HOUR,
        },
        store,
        _plans: plans,
    }
}

impl Fixture {
    async fn subscribe(&self, tenant: &str, plan: &str, starts_at: &str) {
        self.store
            .put_subscription(&Subscription {
                tenant: tenant.into(),
                plan: PlanId {
                    name: plan.into(),
                    version: 1,
                },
                starts_at: at(starts_at),
            })
            .await
            .unwrap();
    }

    fn period(&self, year: i32, month: u32) -> Period {
        self.invoicing.zone.period(year, month).unwrap()
    }

    async fn commit(&self, now: i64, items: &[(&str, &str, TenantUsage)]) {
        commit(&self.store, now, items).await;
    }
}

/// Commits one batch per item at `now` (each from its own session).
async fn commit(store: &Store, now: i64, items: &[(&str, &str, TenantUsage)]) {
    static SESSION: AtomicU64 = AtomicU64::new(0);
    let batches: Vec<UsageBatch> = items
        .iter()
        .map(|(service, window_start, usage)| {
            let start = at(window_start);
            UsageBatch {
                service: (*service).into(),
                instance: format!("{service}-1"),
                session_id: format!("session-{}", SESSION.fetch_add(1, Ordering::Relaxed)),
                seq: 0,
                window_start_unix_micros: start,
                window_end_unix_micros: start + 1_000_000,
                tenants: vec![usage.clone()],
                ..UsageBatch::default()
            }
        })
        .collect();
    let clock = CommitClock {
        now_micros: now,
        gap_grace_micros: i64::MAX,
        late_after_micros: 5 * MINUTE,
    };
    let done = store.commit("t", &batches, &[], clock).await.unwrap();
    assert_eq!(done.batches, batches.len() as u64);
}

fn lambda(tenant: &str, requests: u64, seconds_each: u64) -> TenantUsage {
    TenantUsage {
        tenant: tenant.into(),
        requests,
        billed_duration_micros: requests * seconds_each * 1_000_000,
        ..TenantUsage::default()
    }
}

fn line<'a>(invoice: &'a Invoice, kind: LineKind, charge: &str) -> &'a tidemark_billing::invoice::model::Line {
    invoice
        .lines
        .iter()
        .find(|l| l.kind == kind && l.charge == charge)
        .unwrap_or_else(|| panic!("no {kind:?} line {charge} in {invoice:#?}"))
}

/// AWS's published example through an invoice: 3 million requests of 1 s at
/// 512 MB in one month, at the page's price, is $18.74 ($0.40 requests +
/// $18.34 compute); at the list price the shipped plan carries, $18.73.
async fn aws_example(url: String) {
    let f = fixture(&url, "UTC", None).await;
    f.subscribe("acme", "aws-lambda-page", "2026-10-01T00:00:00Z").await;
    f.subscribe("globex", "aws-lambda-x86", "2026-10-01T00:00:00Z").await;
    let now = at("2026-11-05T00:00:00Z");
    for tenant in ["acme", "globex"] {
        f.commit(
            now,
            &[
                ("fn-a", "2026-10-03T10:00:30Z", lambda(tenant, 1_000_000, 1)),
                ("fn-b", "2026-10-03T10:00:45Z", lambda(tenant, 500_000, 1)),
                ("fn-a", "2026-10-15T00:00:00Z", lambda(tenant, 500_000, 1)),
                ("fn-a", "2026-10-31T23:59:59Z", lambda(tenant, 1_000_000, 1)),
                // November's usage is November's.
                ("fn-a", "2026-11-01T00:00:00Z", lambda(tenant, 7, 1)),
            ],
        )
        .await;
    }
    let october = f.period(2026, 10);
    let acme = f.invoicing.draft("acme", &october).await.unwrap();
    assert_eq!((acme.status, acme.currency.as_str()), (Status::Draft, "USD"));
    assert_eq!(acme.id, "inv_acme_2026-10");
    assert_eq!(
        acme.plan,
        PlanId {
            name: "aws-lambda-page".into(),
            version: 1
        }
    );
    let requests = line(&acme, LineKind::Charge, "requests");
    assert_eq!((requests.usage, requests.allowance), (d("3000000"), d("1000000")));
    assert_eq!(requests.amount.to_string(), "0.40");
    let compute = line(&acme, LineKind::Charge, "gb_seconds");
    assert_eq!(compute.source.as_deref(), Some("billed_duration_us"));
    assert_eq!((compute.quantity, compute.allowance), (d("1500000"), d("400000")));
    assert_eq!(compute.amount.to_string(), "18.34");
    assert_eq!(compute.tiers.len(), 1);
    assert_eq!(acme.subtotal.to_string(), "18.74");
    assert_eq!(acme.total.to_string(), "18.74");

    // Each line names the usage behind it: first minute, one past the last,
    // and the batch contributions (two services in the first minute).
    for l in [requests, compute] {
        assert_eq!(l.usage_from, Some(at("2026-10-03T10:00:00Z")), "{}", l.charge);
        assert_eq!(l.usage_to, Some(at("2026-11-01T00:00:00Z")), "{}", l.charge);
        assert_eq!(l.batches, 4, "{}", l.charge);
    }

    let globex = f.invoicing.draft("globex", &october).await.unwrap();
    assert_eq!(
        line(&globex, LineKind::Charge, "gb_seconds").amount.to_string(),
        "18.33"
    );
    assert_eq!(globex.total.to_string(), "18.73");
}

/// The amount of `charge` rated alone on `usage` of its source meter.
fn rated_alone(plan: &Plan, charge: &str, meter: &str, usage: &str) -> Decimal {
    let rated = rate(plan, &BTreeMap::from([(meter.to_owned(), d(usage))])).unwrap();
    rated.lines.iter().find(|l| l.charge == charge).unwrap().amount
}

/// Draft → finalize (refused before the collection wait) → immutable; late
/// usage becomes correction lines on the next invoice, each exactly
/// rate(usage now) − rate(usage billed), naming the period; once billed, a
/// correction is not billed again, and more late usage is corrected from
/// what was billed so far.
async fn lifecycle_and_corrections(url: String) {
    let f = fixture(&url, "UTC", None).await;
    f.subscribe("acme", "aws-lambda-x86", "2026-09-15T00:00:00Z").await;
    let plan = f.invoicing.catalog.get("aws-lambda-x86", 1).unwrap().clone();
    f.commit(
        at("2026-10-31T00:00:00Z"),
        &[("fn", "2026-10-10T08:00:00Z", lambda("acme", 3_000_000, 1))],
    )
    .await;
    let id = "inv_acme_2026-10";

    // Not before the period's end plus the collection wait (1 h).
    let err = f.invoicing.finalize(id, at("2026-11-01T00:59:59Z")).await.unwrap_err();
    match err {
        InvoiceError::TooEarly { finalizable_at, .. } => assert_eq!(finalizable_at, at("2026-11-01T01:00:00Z")),
        other => panic!("expected TooEarly, got {other}"),
    }
    let draft = f.invoicing.get(id, at("2026-11-01T00:30:00Z")).await.unwrap();
    assert_eq!(
        (draft.status, draft.total.to_string().as_str()),
        (Status::Draft, "18.73")
    );

    let finalized_at = at("2026-11-01T01:00:00Z");
    let october = f.invoicing.finalize(id, finalized_at).await.unwrap();
    assert_eq!(october.status, Status::Finalized);
    assert_eq!(october.finalized_at, Some(finalized_at));
    assert_eq!(october.lines, draft.lines, "finalizing stores the draft as it was");
    assert_eq!(october.total.to_string(), "18.73");
    let again = f.invoicing.finalize(id, finalized_at + HOUR).await.unwrap_err();
    assert!(matches!(again, InvoiceError::AlreadyFinalized { .. }), "{again}");

    // Usage for October arrives on 2 November: October stays as it was.
    f.commit(
        at("2026-11-02T00:00:00Z"),
        &[("fn", "2026-10-20T12:00:10Z", lambda("acme", 500_000, 1))],
    )
    .await;
    f.commit(
        at("2026-11-02T00:00:00Z"),
        &[("fn", "2026-11-01T12:00:00Z", lambda("acme", 10, 1))],
    )
    .await;
    let stored = f.invoicing.get(id, at("2026-11-02T00:00:00Z")).await.unwrap();
    assert_eq!(stored, october, "a finalized invoice never changes");

    // November's invoice corrects October: 3.5M requests now, 3M billed.
    let november = f.period(2026, 11);
    let draft = f.invoicing.draft("acme", &november).await.unwrap();
    let kinds: Vec<(LineKind, &str)> = draft.lines.iter().map(|l| (l.kind, l.charge.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (LineKind::Charge, "requests"),
            (LineKind::Charge, "gb_seconds"),
            (LineKind::Correction, "requests"),
            (LineKind::Correction, "gb_seconds"),
        ]
    );
    let requests = line(&draft, LineKind::Correction, "requests");
    let compute = line(&draft, LineKind::Correction, "gb_seconds");
    let october_start = f.period(2026, 10).start;
    for l in [requests, compute] {
        assert_eq!(l.corrects_period_start, Some(october_start));
        assert!(l.description.contains("correction for 2026-10"), "{}", l.description);
        assert_eq!(l.correction.as_ref().unwrap().period, "2026-10");
        // The late batch's minute, as the ledger recorded it late.
        assert_eq!(l.usage_from, Some(at("2026-10-20T12:00:00Z")));
        assert_eq!(l.usage_to, Some(at("2026-10-20T12:01:00Z")));
        assert_eq!(l.batches, 1);
    }
    assert_eq!(requests.usage, d("500000"));
    // Alone, 500,000 requests and 250,000 GB-s are inside the free tier: the
    // correction is what the period's total costs more, not what the late
    // usage would cost by itself.
    assert_eq!(
        requests.amount,
        rated_alone(&plan, "requests", "requests", "3500000") - rated_alone(&plan, "requests", "requests", "3000000")
    );
    assert_eq!(requests.amount.to_string(), "0.10");
    assert_eq!(
        compute.amount,
        rated_alone(&plan, "gb_seconds", "billed_duration_us", "3500000000000")
            - rated_alone(&plan, "gb_seconds", "billed_duration_us", "3000000000000")
    );
    assert_eq!(compute.amount.to_string(), "4.17", "22.50 - 18.33");
    let correction = compute.correction.as_ref().unwrap();
    assert_eq!(
        (correction.billed.amount, correction.now.amount),
        (d("18.33"), d("22.50"))
    );
    assert_eq!((correction.billed.batches, correction.now.batches), (1, 2));
    assert_eq!(draft.subtotal, d("4.27"), "November's own 10 requests are free");
    assert_eq!(draft.total, d("4.27"));

    // Finalized with November, the correction is billed once.
    let november_invoice = f
        .invoicing
        .finalize("inv_acme_2026-11", at("2026-12-01T01:00:00Z"))
        .await
        .unwrap();
    assert_eq!(november_invoice.lines, draft.lines);
    let december = f.period(2026, 12);
    let draft = f.invoicing.draft("acme", &december).await.unwrap();
    assert!(
        draft.lines.iter().all(|l| l.kind == LineKind::Charge),
        "nothing left to correct: {draft:#?}"
    );

    // More October usage in December: corrected from 3.5M, not from 3M.
    f.commit(
        at("2026-12-02T00:00:00Z"),
        &[("fn", "2026-10-31T23:59:00Z", lambda("acme", 100_000, 1))],
    )
    .await;
    let draft = f.invoicing.draft("acme", &december).await.unwrap();
    let corrections: Vec<_> = draft.lines.iter().filter(|l| l.kind == LineKind::Correction).collect();
    assert_eq!(corrections.len(), 2, "{draft:#?}");
    assert_eq!(
        line(&draft, LineKind::Correction, "requests").amount.to_string(),
        "0.02"
    );
    let compute = line(&draft, LineKind::Correction, "gb_seconds");
    assert_eq!(compute.amount.to_string(), "0.83", "23.33 - 22.50");
    assert_eq!(compute.usage_from, Some(at("2026-10-31T23:59:00Z")));
    assert_eq!(compute.usage, d("100000000000"));
    let billed = &compute.correction.as_ref().unwrap().billed;
    assert_eq!((billed.usage, billed.amount), (d("3500000000000"), d("22.50")));
    // November is corrected too? No: nothing of November arrived late.
    assert!(
        draft
            .lines
            .iter()
            .all(|l| l.corrects_period_start.is_none_or(|s| s == october_start))
    );

    // Listing: both finalized invoices and December's draft.
    let listing = f
        .invoicing
        .list(
            &ListFilter {
                tenant: Some("acme".into()),
                ..ListFilter::default()
            },
            at("2026-12-02T00:00:00Z"),
        )
        .await
        .unwrap();
    let listed: Vec<(&str, Status)> = listing.invoices.iter().map(|i| (i.id.as_str(), i.status)).collect();
    assert_eq!(
        listed,
        [
            ("inv_acme_2026-12", Status::Draft),
            ("inv_acme_2026-11", Status::Finalized),
            ("inv_acme_2026-10", Status::Finalized),
        ]
    );
}

/// Usage at 23:30 UTC on 31 October is November's at +01:00 and October's in UTC.
async fn time_zone_boundary(url: String) {
    let plus_one = fixture(&url, "+01:00", Some("aws-lambda-x86")).await;
    plus_one
        .commit(
            at("2026-11-05T00:00:00Z"),
            &[
                ("fn", "2026-10-31T22:59:59Z", lambda("acme", 2_000_000, 1)),
                ("fn", "2026-10-31T23:30:00Z", lambda("acme", 3_000_000, 1)),
            ],
        )
        .await;
    let november = plus_one.period(2026, 11);
    assert_eq!(november.start, at("2026-10-31T23:00:00Z"));
    let invoice = plus_one.invoicing.draft("acme", &november).await.unwrap();
    assert_eq!(invoice.time_zone, "+01:00");
    let requests = line(&invoice, LineKind::Charge, "requests");
    assert_eq!(requests.usage, d("3000000"));
    assert_eq!(requests.usage_from, Some(at("2026-10-31T23:30:00Z")));
    let october = plus_one
        .invoicing
        .draft("acme", &plus_one.period(2026, 10))
        .await
        .unwrap();
    assert_eq!(line(&october, LineKind::Charge, "requests").usage, d("2000000"));

    let utc = Invoicing {
        zone: BillingZone::Utc,
        ..plus_one.invoicing.clone()
    };
    let october = utc.draft("acme", &utc.zone.period(2026, 10).unwrap()).await.unwrap();
    assert_eq!(line(&october, LineKind::Charge, "requests").usage, d("5000000"));
}

/// Aggregations on hand-computed rollups: two services, four minutes of
/// November (43,200 minutes).
async fn aggregations(url: String) {
    let f = fixture(&url, "UTC", Some("gauges")).await;
    let usage = |cpu: u64, bytes_out: u64, memory: u64, requests: u64, errors: u64| TenantUsage {
        tenant: "acme".into(),
        cpu_micros: cpu,
        bytes_out,
        memory_byte_micros: memory,
        requests,
        errors,
        bytes_in: 1,
        ..TenantUsage::default()
    };
    f.commit(
        at("2026-11-20T00:00:00Z"),
        &[
            // Minute 1: cpu 30 + 20 = 50 across services.
            ("a", "2026-11-03T00:01:00Z", usage(30, 7, 43_200, 1, 1)),
            ("b", "2026-11-03T00:01:30Z", usage(20, 0, 43_200, 0, 1)),
            // Minute 2: cpu 45, the largest minute of one service but not the peak.
            ("a", "2026-11-03T00:02:00Z", usage(45, 0, 86_400, 2, 0)),
            // Minute 3: bytes_out 9; no requests.
            ("b", "2026-11-10T12:00:00Z", usage(1, 9, 0, 0, 1)),
            // The last minute with bytes_out: 4 (latest), 2 batches.
            ("a", "2026-11-19T23:59:00Z", usage(0, 3, 43_200, 5, 0)),
            ("b", "2026-11-19T23:59:10Z", usage(0, 1, 0, 0, 0)),
        ],
    )
    .await;
    let invoice = f.invoicing.draft("acme", &f.period(2026, 11)).await.unwrap();
    assert_eq!(invoice.currency, "EUR");
    let usage_of = |charge: &str| line(&invoice, LineKind::Charge, charge).usage;
    assert_eq!(usage_of("peak_cpu"), d("50"), "max of per-minute sums");
    assert_eq!(
        usage_of("last_bytes"),
        d("4"),
        "the last minute with bytes_out, both services"
    );
    // (43,200 + 43,200 + 86,400 + 43,200) byte-µs-minutes over 43,200 minutes.
    assert_eq!(usage_of("mean_memory"), d("5"));
    assert_eq!(usage_of("active_minutes"), d("3"), "minutes with requests");
    assert_eq!(usage_of("reports"), d("3"), "batches that reported errors");
    assert_eq!(usage_of("bytes_in"), d("6"), "sum, the default");
    assert_eq!(line(&invoice, LineKind::Charge, "peak_cpu").amount.to_string(), "50.00");
    assert_eq!(invoice.total, d("71"));
    let reports = line(&invoice, LineKind::Charge, "reports");
    assert_eq!(
        (reports.usage_from, reports.usage_to, reports.batches),
        (Some(at("2026-11-03T00:01:00Z")), Some(at("2026-11-10T12:01:00Z")), 3)
    );

    // Sums beyond a BIGINT stay exact: 2 × 5e18 byte-µs over 43,200 minutes.
    let heavy = TenantUsage {
        tenant: "heavy".into(),
        memory_byte_micros: 5_000_000_000_000_000_000,
        ..TenantUsage::default()
    };
    f.commit(
        at("2026-11-20T00:00:00Z"),
        &[
            ("a", "2026-11-04T00:00:00Z", heavy.clone()),
            ("a", "2026-11-05T00:00:00Z", heavy),
        ],
    )
    .await;
    let invoice = f.invoicing.draft("heavy", &f.period(2026, 11)).await.unwrap();
    let mean = line(&invoice, LineKind::Charge, "mean_memory");
    assert_eq!(
        mean.usage,
        d("231481481481481.481481481"),
        "1e19 / 43200, half-even at 9 places"
    );
    assert_eq!(mean.amount.to_string(), "231481481481481.48");
}

/// Without a subscription or a default plan there is no invoice to draft.
async fn no_plan(url: String) {
    let f = fixture(&url, "UTC", None).await;
    f.commit(
        at("2026-11-05T00:00:00Z"),
        &[("fn", "2026-11-01T00:00:00Z", lambda("acme", 1, 1))],
    )
    .await;
    let err = f.invoicing.draft("acme", &f.period(2026, 11)).await.unwrap_err();
    assert!(matches!(err, InvoiceError::NoPlan { .. }), "{err}");
    assert!(err.to_string().contains("no subscription for 2026-11"), "{err}");
    // A subscription starting mid-month prices that whole month.
    f.subscribe("acme", "aws-lambda-x86", "2026-11-15T00:00:00Z").await;
    let invoice = f.invoicing.draft("acme", &f.period(2026, 11)).await.unwrap();
    assert_eq!(line(&invoice, LineKind::Charge, "requests").usage, d("1"));
    assert!(matches!(
        f.invoicing.draft("acme", &f.period(2026, 10)).await.unwrap_err(),
        InvoiceError::NoPlan { .. }
    ));
}

/// Two finalizations of one tenant at once (two periods, both correcting
/// the same earlier one) bill a correction once.
async fn concurrent_finalizations(url: String) {
    let f = fixture(&url, "UTC", Some("aws-lambda-x86")).await;
    f.commit(
        at("2026-09-02T00:00:00Z"),
        &[("fn", "2026-09-01T00:00:00Z", lambda("acme", 2_000_000, 1))],
    )
    .await;
    f.invoicing
        .finalize("inv_acme_2026-09", at("2026-10-01T02:00:00Z"))
        .await
        .unwrap();
    f.commit(
        at("2026-12-02T00:00:00Z"),
        &[("fn", "2026-09-15T00:00:00Z", lambda("acme", 1_000_000, 1))],
    )
    .await;
    let now = at("2026-12-02T00:00:00Z");
    let (a, b) = tokio::join!(
        f.invoicing.finalize("inv_acme_2026-10", now),
        f.invoicing.finalize("inv_acme_2026-11", now)
    );
    let corrections: usize = [a.unwrap(), b.unwrap()]
        .iter()
        .map(|i| i.lines.iter().filter(|l| l.kind == LineKind::Correction).count())
        .sum();
    assert_eq!(corrections, 2, "requests and gb_seconds of September, once");
}

macro_rules! on_both {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    let (_dir, url) = super::sqlite().await;
                    super::$scenario(url).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $scenario() {
                    super::$scenario(tidemark_e2e::fresh_postgres_database().await).await;
                }
            )*
        }
    };
}

on_both!(
    aws_example,
    lifecycle_and_corrections,
    time_zone_boundary,
    aggregations,
    no_plan,
    concurrent_finalizations,
    http_api,
);

// ---------------------------------------------------------------- HTTP

const TOKENS: &str = r#"
[[token]]
token = "admin-token-0000001"
scope = "admin"

[[token]]
token = "acme-token-00000001"
scope = "tenant:acme"
"#;

struct Api {
    base: String,
    _shutdown: tidemark_runtime::shutdown::Trigger,
}

async fn call(method: Method, url: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = Full::new(Bytes::from(body.unwrap_or("").to_owned()));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request.body(body).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, json)
}

impl Api {
    async fn start(f: &Fixture) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let tokens = ApiTokens::parse(TOKENS, "tokens.toml", |_| None).unwrap();
        let state = ApiState {
            store: f.store.clone(),
            auth: Auth::with_tokens(tokens),
            invoicing: f.invoicing.clone(),
        };
        let (trigger, shutdown) = tidemark_runtime::shutdown::channel();
        tokio::spawn(tidemark_billing::api::serve(listener, state, shutdown));
        Api {
            base,
            _shutdown: trigger,
        }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<&str>) -> (StatusCode, Value) {
        call(
            method,
            &format!("{}{path}", self.base),
            Some("admin-token-0000001"),
            body,
        )
        .await
    }

    async fn acme(&self, method: Method, path: &str) -> (StatusCode, Value) {
        call(
            method,
            &format!("{}{path}", self.base),
            Some("acme-token-00000001"),
            None,
        )
        .await
    }
}

async fn http_api(url: String) {
    let f = fixture(&url, "UTC", None).await;
    let api = Api::start(&f).await;
    let now = tidemark_core::window::now_micros();
    let this_month = f.invoicing.zone.period_at(now).unwrap();
    let minute = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(this_month.start)
        .unwrap()
        .to_rfc3339();
    f.commit(
        now,
        &[
            ("fn", &minute, lambda("acme", 2_500_000, 1)),
            ("fn", &minute, lambda("globex", 1, 1)),
        ],
    )
    .await;
    let id = format!("inv_acme_{}", this_month.label());

    // Subscriptions: bad requests name the parameter.
    for (body, parameter) in [
        (r#"{"plan": "nope", "starts_at": "2026-01-01T00:00:00Z"}"#, "plan"),
        (r#"{"version": 1, "starts_at": "2026-01-01T00:00:00Z"}"#, "plan"),
        (
            r#"{"plan": "aws-lambda-x86", "version": 9, "starts_at": "2026-01-01T00:00:00Z"}"#,
            "version",
        ),
        (
            r#"{"plan": "aws-lambda-x86", "version": 0, "starts_at": "2026-01-01T00:00:00Z"}"#,
            "version",
        ),
        (r#"{"plan": "aws-lambda-x86", "starts_at": "yesterday"}"#, "starts_at"),
        (r#"{"plan": "aws-lambda-x86"}"#, "starts_at"),
    ] {
        let (status, json) = api
            .admin(Method::PUT, "/v1/tenants/acme/subscription", Some(body))
            .await;
        assert_eq!(
            (status, json["parameter"].as_str()),
            (StatusCode::BAD_REQUEST, Some(parameter)),
            "{body}: {json}"
        );
    }
    let (status, json) = api
        .admin(
            Method::PUT,
            "/v1/tenants/acme/subscription",
            Some(r#"{"plan": "aws-lambda-x86", "colour": 1}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    let (status, json) = api
        .admin(Method::PUT, "/v1/tenants/acme/subscription", Some("not json"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    let (status, json) = api
        .admin(
            Method::PUT,
            "/v1/tenants/a%20b/subscription",
            Some(r#"{"plan": "aws-lambda-x86", "starts_at": "2026-01-01T00:00:00Z"}"#),
        )
        .await;
    assert_eq!(
        (status, json["parameter"].as_str()),
        (StatusCode::BAD_REQUEST, Some("tenant")),
        "{json}"
    );

    // No subscription, no default plan: 409 saying so; and no subscription to show.
    let (status, json) = api.admin(Method::GET, &format!("/v1/invoices/{id}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{json}");
    assert!(json["error"].as_str().unwrap().contains("no subscription"), "{json}");
    let (status, _) = api.admin(Method::GET, "/v1/tenants/acme/cost", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = api.admin(Method::GET, "/v1/tenants/acme/subscription", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Only an admin sets a subscription.
    let body = r#"{"plan": "aws-lambda-x86", "version": 1, "starts_at": "2020-01-01T00:00:00Z"}"#;
    let (status, _) = call(
        Method::PUT,
        &format!("{}/v1/tenants/acme/subscription", api.base),
        Some("acme-token-00000001"),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, json) = api
        .admin(Method::PUT, "/v1/tenants/acme/subscription", Some(body))
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["subscription"]["starts_at"], "2020-01-01T00:00:00Z");
    let (status, json) = api.acme(Method::GET, "/v1/tenants/acme/subscription").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["current"]["plan"], "aws-lambda-x86");
    assert_eq!(json["current"]["version"], 1);

    // The running cost: 2.5M requests, 1.5M billable: $0.30; 1.25M GB-s.
    let (status, cost) = api.acme(Method::GET, "/v1/tenants/acme/cost").await;
    assert_eq!(status, StatusCode::OK, "{cost}");
    assert_eq!(cost["period"], this_month.label());
    assert_eq!(cost["currency"], "USD");
    assert_eq!(cost["lines"][0]["charge"], "requests");
    assert_eq!(cost["lines"][0]["amount"], "0.30");
    // 850,000 GB-s × 0.0000166667 = 14.16669500 → 14.17.
    assert_eq!(cost["lines"][1]["amount"], "14.17");
    assert_eq!(cost["total"], "14.47");

    // The invoice, with money as strings and its lines' usage ranges.
    let (status, invoice) = api.acme(Method::GET, &format!("/v1/invoices/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{invoice}");
    assert_eq!(
        (invoice["status"].as_str(), invoice["total"].as_str()),
        (Some("draft"), Some("14.47"))
    );
    assert_eq!(invoice["lines"][0]["usage"], "2500000");
    assert_eq!(
        invoice["lines"][0]["usage_from"].as_str(),
        Some(minute.replace("+00:00", "Z").as_str())
    );
    assert_eq!(invoice["lines"][0]["batches"], 1);
    assert!(
        invoice["finalizable_at"].is_string() && invoice["as_of"].is_string(),
        "{invoice}"
    );

    // Early finalize: 409 with the time it becomes possible.
    let (status, json) = api
        .admin(Method::POST, &format!("/v1/invoices/{id}/finalize"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{json}");
    assert_eq!(json["finalizable_at"], invoice["finalizable_at"]);
    // A tenant token may not finalize.
    let (status, _) = api.acme(Method::POST, &format!("/v1/invoices/{id}/finalize")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Last month can be finalized (an hour's wait is long over... unless the
    // month began less than an hour ago: then it is 409 too).
    let last_month = f.invoicing.zone.previous(&this_month).unwrap();
    let last_id = format!("inv_acme_{}", last_month.label());
    let (status, json) = api
        .admin(Method::POST, &format!("/v1/invoices/{last_id}/finalize"), None)
        .await;
    if now >= f.invoicing.finalizable_at(&last_month) {
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(json["status"], "finalized");
        let (status, json) = api
            .admin(Method::POST, &format!("/v1/invoices/{last_id}/finalize"), None)
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{json}");
        assert!(json["finalized_at"].is_string(), "{json}");
    } else {
        assert_eq!(status, StatusCode::CONFLICT, "{json}");
    }

    // Unknown invoices: 404.
    for unknown in ["nope", "inv_acme_2026-13", "inv_acme_9999-01", "inv_a%20b_2026-11"] {
        let (status, json) = api.admin(Method::GET, &format!("/v1/invoices/{unknown}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}: {json}");
    }

    // Listing: bad parameters get 400 naming them.
    for (query, parameter) in [
        ("status=open", Some("status")),
        ("period=2026-13", Some("period")),
        ("period=november", Some("period")),
        ("tenant=a%20b", Some("tenant")),
        ("colour=red", None),
    ] {
        let (status, json) = api.admin(Method::GET, &format!("/v1/invoices?{query}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {json}");
        assert_eq!(json["parameter"].as_str(), parameter, "{query}: {json}");
        assert!(json["error"].is_string());
    }
    // A tenant token lists its own invoices only, and may not ask for others'.
    let (status, json) = api.acme(Method::GET, "/v1/invoices").await;
    assert_eq!(status, StatusCode::OK, "{json}");
    let tenants: Vec<&str> = json["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["tenant"].as_str().unwrap())
        .collect();
    assert!(!tenants.is_empty() && tenants.iter().all(|t| *t == "acme"), "{json}");
    let (status, _) = api.acme(Method::GET, "/v1/invoices?tenant=globex").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.acme(Method::GET, "/v1/invoices/inv_globex_2026-11").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api.acme(Method::GET, "/v1/tenants/globex/cost").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The admin sees globex's draft can't be built (no plan) as an error, not a failure.
    let (status, json) = api
        .admin(
            Method::GET,
            &format!("/v1/invoices?period={}", this_month.label()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["invoices"][0]["id"], id.as_str());
    assert_eq!(json["errors"][0]["id"], format!("inv_globex_{}", this_month.label()));
    // Without a token: 401.
    let (status, _) = call(Method::GET, &format!("{}/v1/invoices", api.base), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

// ---------------------------------------------------------------- processes

/// `tidemark` run to completion: exit status, stdout, stderr.
fn run_cli(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(tidemark_e2e::bin("tidemark"))
        .args(args)
        .env_remove("TIDEMARK_TOKEN")
        .env_remove("TIDEMARK_API")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `tidemark dev` with the invoice flags, usage committed into its
/// database, and the `tidemark invoice` CLI against its API.
#[tokio::test(flavor = "multi_thread")]
async fn tidemark_dev_and_the_invoice_cli() {
    let dir = tempfile::tempdir().unwrap();
    let plans = plans_dir();
    let plans_flag = format!("--plans-dir={}", plans.path().display());
    let dev = tidemark_e2e::start_dev(
        dir.path(),
        &[
            &plans_flag,
            "--default-plan=aws-lambda-x86",
            "--time-zone=+01:00",
            "--collection-wait=1s",
        ],
    );
    let api = format!("http://{}", dev.address("billing HTTP API"));
    let output = dev.output();
    assert!(output.contains("price plans loaded"), "{output}");

    // Usage in last month (at +01:00), committed straight into dev's database.
    let zone: BillingZone = "+01:00".parse().unwrap();
    let now = tidemark_core::window::now_micros();
    let this_month = zone.period_at(now).unwrap();
    let last_month = zone.previous(&this_month).unwrap();
    let store = Store::open(&format!("sqlite:{}", dir.path().join("billing.db").display()))
        .await
        .unwrap();
    let minute = chrono::DateTime::<chrono::Utc>::from_timestamp_micros(last_month.start + HOUR)
        .unwrap()
        .to_rfc3339();
    commit(&store, now, &[("fn", &minute, lambda("team_a", 3_000_000, 1))]).await;

    let id = format!("inv_team_a_{}", last_month.label());
    let (ok, out, err) = run_cli(&["invoice", "list", "--tenant", "team_a", "--api", &api]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    assert!(
        out.contains(&id) && out.contains("draft") && out.contains("18.73"),
        "{out}"
    );

    let (ok, out, err) = run_cli(&["invoice", "show", &id, "--api", &api]);
    assert!(ok, "{err}");
    assert!(out.contains("DRAFT") && out.contains("+01:00"), "{out}");
    assert!(
        out.contains("Compute (GB-seconds at 512 MB)") && out.contains("18.33"),
        "{out}"
    );

    let (ok, out, err) = run_cli(&["invoice", "finalize", &id, "--api", &api, "--json"]);
    if now >= last_month.end + 1_000_000 {
        assert!(ok, "{err}");
        let json: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (json["status"].as_str(), json["total"].as_str()),
            (Some("finalized"), Some("18.73"))
        );
        let (ok, _, err) = run_cli(&["invoice", "finalize", &id, "--api", &api]);
        assert!(!ok);
        assert!(err.contains("409 Conflict") && err.contains("finalized"), "{err}");
    }
    let this_id = format!("inv_team_a_{}", this_month.label());
    let (ok, _, err) = run_cli(&["invoice", "finalize", &this_id, "--api", &api]);
    assert!(!ok);
    assert!(
        err.contains("409 Conflict") && err.contains("can be finalized from"),
        "{err}"
    );
    let (ok, _, err) = run_cli(&["invoice", "list", "--period", "2026-13", "--api", &api]);
    assert!(!ok);
    assert!(
        err.contains("400 Bad Request") && err.contains("(parameter period)"),
        "{err}"
    );
    let (ok, _, err) = run_cli(&["invoice", "show", "inv_nobody", "--api", &api]);
    assert!(!ok);
    assert!(err.contains("404 Not Found"), "{err}");
}

/// A plan that does not load fails the start, naming file, key and reason;
/// so do an unknown default plan and a bad time zone.
#[test]
fn bad_invoice_settings_fail_the_start() {
    let plans = tempfile::tempdir().unwrap();
    std::fs::write(
        plans.path().join("bad.toml"),
        "name = \"bad\"\nversion = 1\ncurrency = \"USD\"\nrounding = { step = \"0.01\", rule = \"half_up\" }\n\
         [meters.requests]\nmodel = \"unit\"\nprice = \"1\"\naggregation = \"median\"\n",
    )
    .unwrap();
    let plans_flag = format!("--plans-dir={}", plans.path().display());
    for (flag, want) in [
        (
            plans_flag.as_str(),
            "key `meters.requests.aggregation` (line 8): \"median\" is not one of",
        ),
        ("--default-plan=nope", "--default-plan \"nope\": no such plan"),
        ("--time-zone=Mars/Olympus", "is not a time zone"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut dev = tidemark_e2e::start_dev(dir.path(), &[flag]);
        let status = dev.wait_exit(std::time::Duration::from_secs(60));
        assert!(!status.success(), "{flag}");
        let output = dev.output();
        assert!(output.contains(want), "{flag}: {output}");
        if flag == plans_flag {
            assert!(output.contains("bad.toml"), "{output}");
        }
    }
}
