//! Several deliveries at once: two replicas sharing the work, and a slow
//! endpoint beside a fast one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vantage_sync_testkit::{Receiver, TestDb};

use super::{create, eventually, fail, kinds, same_db, spawn_app};

#[tokio::test]
async fn two_replicas_deliver_everything_and_nothing_twice_in_order() {
    let db = TestDb::migrated().await;
    let a = spawn_app(same_db(&db)).await;
    let b = spawn_app(db).await;
    let receiver = Receiver::start().await;
    let mut hooks = Vec::new();
    for n in 0..4 {
        let path = format!("/replica{n}");
        create(
            &a,
            &receiver.url(&path),
            &["SYNC_STARTED", "SYNC_SUCCEEDED"],
            None,
        )
        .await;
        hooks.push(path);
    }
    // A burst of 100 changes, made straight in the database.
    let mut conn = a.db.connect().await;
    for n in 0..50 {
        let resource = format!("burst_{}", n % 7);
        sqlx::query("SELECT start_vantage_sync($1)")
            .bind(&resource)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("SELECT complete_vantage_sync($1, 1, 1, 0)")
            .bind(&resource)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    for path in &hooks {
        let received = receiver
            .wait_for(path, Duration::from_secs(30), |r| r.len() >= 100)
            .await;
        // Never twice (every answer was 200), and in event order.
        let ids: Vec<i64> = received.iter().map(|r| r.id.parse().unwrap()).collect();
        let mut seen: HashMap<i64, usize> = HashMap::new();
        for id in &ids {
            *seen.entry(*id).or_default() += 1;
        }
        assert!(
            seen.values().all(|n| *n == 1),
            "{path}: duplicates in {ids:?}"
        );
        assert_eq!(ids.len(), 100, "{path}");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{path}: out of order {ids:?}"
        );
        let types: Vec<String> = kinds(&received).into_iter().map(|k| k.0).collect();
        for pair in types.chunks(2) {
            assert_eq!(pair, ["sync.started", "sync.succeeded"], "{path}");
        }
    }
    // Each success is recorded by the replica that sent it (leases go to
    // whichever claims first), in its next round: 400 between them.
    let delivered = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("vantage_sync_webhook_deliveries_total{outcome=\"delivered\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fetch = async || delivered(&a.metrics().await) + delivered(&b.metrics().await);
    let total = eventually(Duration::from_secs(3), fetch, |total| *total == 400).await;
    assert_eq!(total, 400);
}

#[tokio::test]
async fn a_slow_endpoint_does_not_delay_another() {
    let app = spawn_app(TestDb::migrated().await).await;
    let slow = Receiver::start().await;
    slow.delay(Duration::from_secs(5));
    let fast = Receiver::start().await;
    create(
        &app,
        &slow.url("/slow"),
        &["SYNC_STARTED", "SYNC_FAILED"],
        None,
    )
    .await;
    create(
        &app,
        &fast.url("/fast"),
        &["SYNC_STARTED", "SYNC_FAILED"],
        None,
    )
    .await;
    let started = Instant::now();
    for resource in ["accounts", "funds", "cashflows"] {
        fail(&app, resource).await;
    }
    let received = fast
        .wait_for("/fast", Duration::from_secs(3), |r| r.len() >= 6)
        .await;
    assert_eq!(received.len(), 6);
    assert!(received[5].at.duration_since(started) < Duration::from_secs(3));
    // The slow one is still on its first.
    assert!(slow.received("/slow").len() <= 1);
}
