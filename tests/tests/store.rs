//! The billing store under concurrent ledger commits, as when two billing
//! workers hold batches of one session during a rebalance: on Postgres (real
//! server) and on SQLite (two connections to one file), every batch counts
//! exactly once.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;

use tidemark_billing::quantity::to_decimal;
use tidemark_billing::store::{CommitClock, LateRow, Store, UsageQuery};
use tidemark_e2e::fresh_postgres_database;
use tidemark_proto::v1::{TenantUsage, UsageBatch};

const WORKERS: u64 = 6;
const BATCHES: u64 = 60;

fn batch(seq: u64) -> UsageBatch {
    UsageBatch {
        service: "shop".into(),
        instance: "shop-1".into(),
        session_id: "one-session".into(),
        seq,
        window_start_unix_micros: 1_764_000_000_000_000,
        window_end_unix_micros: 1_764_000_001_000_000,
        tenants: vec![TenantUsage {
            tenant: "acme".into(),
            requests: 1 << (seq % 20),
            ..TenantUsage::default()
        }],
        ..UsageBatch::default()
    }
}

/// Each worker commits every batch, in its own order, in small transactions.
async fn race(stores: Vec<Store>) {
    let clock = CommitClock {
        now_micros: 1,
        gap_grace_micros: i64::MAX,
        late_after_micros: i64::MAX,
    };
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let store = stores[(w as usize) % stores.len()].clone();
            tokio::spawn(async move {
                let mut order: Vec<u64> = (0..BATCHES).collect();
                order.rotate_left((w * 7 % BATCHES) as usize);
                if w % 2 == 1 {
                    order.reverse();
                }
                let mut counted = 0;
                for chunk in order.chunks(5) {
                    let batches: Vec<UsageBatch> = chunk.iter().map(|&s| batch(s)).collect();
                    counted += store.commit("t", &batches, &[], clock).await.unwrap().batches;
                }
                counted
            })
        })
        .collect();
    let mut counted = 0;
    for task in tasks {
        counted += task.await.unwrap();
    }
    assert_eq!(counted, BATCHES, "each batch counted by exactly one worker");
    let want: i64 = (0..BATCHES).map(|s| 1i64 << (s % 20)).sum();
    let rows = stores[0]
        .usage(&UsageQuery {
            meter: Some("requests".into()),
            ..UsageQuery::all("acme")
        })
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.quantity).sum::<i64>(), want);
    assert!(stores[0].gaps().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_on_postgres_count_each_batch_once() {
    let url = fresh_postgres_database().await;
    let stores = vec![Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap()];
    race(stores).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_commits_on_sqlite_count_each_batch_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("billing.db").display());
    let stores = vec![Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap()];
    race(stores).await;
}

const MINUTE: i64 = 60_000_000;
/// 2025-11-24T16:00:00Z, a minute's start.
const T0: i64 = 1_764_000_000_000_000;

fn custom_batch(session: &str, seq: u64, minute: i64, custom: &[(&str, &str)]) -> UsageBatch {
    UsageBatch {
        service: "shop".into(),
        instance: "shop-1".into(),
        session_id: session.into(),
        seq,
        window_start_unix_micros: minute + 1_000_000,
        window_end_unix_micros: minute + 2_000_000,
        tenants: vec![TenantUsage {
            tenant: "acme".into(),
            requests: 1,
            custom: custom
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            ..TenantUsage::default()
        }],
        ..UsageBatch::default()
    }
}

async fn meter_total(store: &Store, meter: &str) -> (String, i64) {
    let rows = store
        .usage(&UsageQuery {
            meter: Some(meter.into()),
            ..UsageQuery::all("acme")
        })
        .await
        .unwrap();
    let quantity: i64 = rows.iter().map(|r| r.quantity).sum();
    let batches: i64 = rows.iter().map(|r| r.batches).sum();
    (to_decimal(meter, quantity).to_string(), batches)
}

/// Custom meters sum exactly (no float would make ten 0.1s exactly 1), a
/// name that is a built-in meter's is kept apart under `custom.`, values
/// that cannot be kept exactly are rejected and reported; batches committed
/// long after their window are also in late_usage with both minutes.
async fn custom_meters_and_late_usage(store: Store) {
    let late_after = 5 * MINUTE;
    // On time: committed 30 s after the window.
    let on_time: Vec<UsageBatch> = (0..10)
        .map(|seq| custom_batch("a", seq, T0, &[("tokens", "0.1"), ("requests", "2")]))
        .collect();
    let clock = |now_micros| CommitClock {
        now_micros,
        gap_grace_micros: i64::MAX,
        late_after_micros: late_after,
    };
    let done = store.commit("t", &on_time, &[], clock(T0 + 30_000_000)).await.unwrap();
    assert_eq!((done.batches, done.late, done.rejected.len()), (10, 0, 0));

    // An hour later: two batches of minute T0 (one sent twice), one of
    // T0 + 1 min with a value too precise to keep, and one only 4 min old.
    let stored_at = T0 + 60 * MINUTE + 7_000_000;
    let later = [
        custom_batch("b", 0, T0, &[("tokens", "123456789.123456789")]),
        custom_batch("b", 0, T0, &[("tokens", "123456789.123456789")]),
        custom_batch("b", 1, T0 + MINUTE, &[("tokens", "0.0000000001"), ("images", "2")]),
        custom_batch("c", 0, T0 + 56 * MINUTE, &[("tokens", "1")]),
    ];
    let done = store.commit("t", &later, &[], clock(stored_at)).await.unwrap();
    assert_eq!((done.batches, done.duplicates, done.late), (3, 1, 2));
    assert_eq!(done.rejected.len(), 1, "{:?}", done.rejected);
    assert_eq!(
        (done.rejected[0].meter.as_str(), done.rejected[0].value.as_str()),
        ("tokens", "0.0000000001")
    );

    assert_eq!(meter_total(&store, "tokens").await, ("123456791.123456789".into(), 12));
    assert_eq!(meter_total(&store, "custom.requests").await, ("20".into(), 10));
    assert_eq!(meter_total(&store, "images").await, ("2".into(), 1));
    assert_eq!(
        meter_total(&store, "requests").await,
        ("13".into(), 13),
        "built-in requests apart"
    );

    let late = store.late_usage(&UsageQuery::all("acme")).await.unwrap();
    let stored_minute = T0 + 60 * MINUTE;
    let row = |minute, meter: &str, quantity, batches| LateRow {
        tenant: "acme".into(),
        service: "shop".into(),
        meter: meter.into(),
        minute,
        stored_minute,
        quantity,
        batches,
    };
    assert_eq!(
        late,
        [
            row(T0, "requests", 1, 1),
            row(T0, "tokens", 123_456_789_123_456_789, 1),
            row(T0 + MINUTE, "images", 2_000_000_000, 1),
            row(T0 + MINUTE, "requests", 1, 1),
        ]
    );
    let filtered = store
        .late_usage(&UsageQuery {
            meter: Some("tokens".into()),
            from: T0,
            to: T0 + MINUTE,
            ..UsageQuery::all("acme")
        })
        .await
        .unwrap();
    assert_eq!(filtered, [row(T0, "tokens", 123_456_789_123_456_789, 1)]);
    assert!(store.late_usage(&UsageQuery::all("globex")).await.unwrap().is_empty());

    // Every rollup row of the range, all tenants, as reconcile reads them.
    let rows = store.rollups(T0, T0 + MINUTE).await.unwrap();
    let got: Vec<(&str, i64, i64)> = rows.iter().map(|r| (r.meter.as_str(), r.quantity, r.batches)).collect();
    assert_eq!(
        got,
        [
            ("custom.requests", 20_000_000_000, 10),
            ("requests", 11, 11),
            ("tokens", 123_456_790_123_456_789, 11),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_meters_sum_exactly_and_late_batches_keep_both_minutes_on_postgres() {
    let url = fresh_postgres_database().await;
    custom_meters_and_late_usage(Store::open(&url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn custom_meters_sum_exactly_and_late_batches_keep_both_minutes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("billing.db").display());
    custom_meters_and_late_usage(Store::open(&url).await.unwrap()).await;
}
