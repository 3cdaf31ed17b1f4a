//! The billing store under concurrent ledger commits, as when two billing
//! workers hold batches of one session during a rebalance: on Postgres (real
//! server) and on SQLite (two connections to one file), every batch counts
//! exactly once.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use tidemark_billing::store::{CommitClock, Store, UsageQuery};
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
