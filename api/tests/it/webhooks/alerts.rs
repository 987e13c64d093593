//! Alerts that fire without a delivery problem in sight: stuck on the
//! timer, repeated after failures in a row, and the idle worker's check.

use std::time::Duration;

use serde_json::json;
use vantage_sync_testkit::{Receiver, TestApp, TestDb};

use super::{create, fail, kind, kinds, spawn_app, start};

#[tokio::test]
async fn stuck_fires_on_the_timer_without_an_event() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    create(
        &app,
        &receiver.url("/stuck"),
        &["ALERT_FIRING"],
        Some(&["funds"]),
    )
    .await;
    start(&app, "funds").await;
    let events_before = event_count(&app).await;
    // Straight in the table with triggers off: no event, no notify.
    app.sql(
        "SET session_replication_role = replica;
         UPDATE vantage_sync_state SET started_at = now() - interval '31 minutes' WHERE resource = 'funds';",
    )
    .await;
    assert_eq!(event_count(&app).await, events_before);

    let received = receiver
        .wait_for("/stuck", Duration::from_secs(15), |r| !r.is_empty())
        .await;
    assert_eq!(
        kinds(&received),
        vec![kind("alert.firing", Some("stuck"), "funds")]
    );
    let alerts = app
        .query(
            "authenticated",
            r#"{ alerts { alert resource } }"#,
            json!({}),
        )
        .await;
    assert!(
        alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .contains(&json!({"alert": "STUCK", "resource": "funds"}))
    );
    // Firing is state: it is not sent again on the next checks.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(receiver.received("/stuck").len(), 1);
}

async fn event_count(app: &TestApp) -> i64 {
    let mut conn = app.db.connect().await;
    sqlx::query_scalar("SELECT count(*) FROM vantage_sync_events")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn three_failures_in_a_row_fire_repeated_once() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    create(
        &app,
        &receiver.url("/repeated"),
        &["ALERT_FIRING", "SYNC_FAILED"],
        Some(&["cashflows"]),
    )
    .await;
    for _ in 0..4 {
        fail(&app, "cashflows").await;
    }
    let received = receiver
        .wait_for("/repeated", Duration::from_secs(5), |r| {
            kinds(r).iter().filter(|k| k.0 == "sync.failed").count() == 4
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = if received.len() < receiver.received("/repeated").len() {
        receiver.received("/repeated")
    } else {
        received
    };
    assert_eq!(
        kinds(&received),
        vec![
            kind("sync.failed", None, "cashflows"),
            kind("alert.firing", Some("failed"), "cashflows"),
            kind("sync.failed", None, "cashflows"),
            kind("sync.failed", None, "cashflows"),
            kind("alert.firing", Some("repeated"), "cashflows"),
            kind("sync.failed", None, "cashflows"),
        ]
    );
}

/// An idle worker writes nothing: its round every second leaves the
/// progress row alone but for the stuck/stale check every 10 s.
#[tokio::test]
async fn an_idle_worker_writes_nothing_but_its_ten_second_check() {
    let app = spawn_app(TestDb::migrated().await).await;
    let mut conn = app.db.connect().await;
    let mut versions = std::collections::HashSet::new();
    for _ in 0..10 {
        let version: String =
            sqlx::query_scalar("SELECT xmin::text FROM vantage_sync_notify_progress")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        versions.insert(version);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Five seconds of rounds: at most the row as found and one check.
    assert!(versions.len() <= 2, "{versions:?}");
}
