//! The change notification trigger on channel `vantage_sync_state_changes`.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use sqlx::{Connection, Executor};
use vantage_sync_testkit::TestDb;

async fn next_payload(listener: &mut PgListener) -> Value {
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("no notification within 5 s")
        .unwrap();
    assert_eq!(notification.channel(), "vantage_sync_state_changes");
    serde_json::from_str(notification.payload()).unwrap()
}

#[tokio::test]
async fn one_payload_per_committed_change_and_none_for_a_rollback() {
    let db = TestDb::migrated().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("vantage_sync_state_changes").await.unwrap();
    let mut conn = db.connect().await;

    conn.execute("INSERT INTO vantage_sync_state (resource) VALUES ('distributions')")
        .await
        .unwrap();
    sqlx::query("SELECT start_vantage_sync('accounts')")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.execute("DELETE FROM vantage_sync_state WHERE resource = 'distributions'")
        .await
        .unwrap();

    // Rolled back: must never be delivered.
    let mut tx = conn.begin().await.unwrap();
    tx.execute("UPDATE vantage_sync_state SET records_synced = 1 WHERE resource = 'funds'")
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // A statement that updates two rows sends two payloads, at commit.
    conn.execute("UPDATE vantage_sync_state SET records_synced = records_synced WHERE resource IN ('investors', 'valuations')")
        .await
        .unwrap();

    let mut received = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let mut payload = next_payload(&mut listener).await;
        // Each payload names its event in the log.
        ids.push(
            payload
                .as_object_mut()
                .unwrap()
                .remove("id")
                .unwrap()
                .as_i64()
                .unwrap(),
        );
        received.push(payload);
    }
    let logged: Vec<i64> = sqlx::query_scalar("SELECT id FROM vantage_sync_events ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        sorted, logged,
        "one event per committed change, none for the rollback"
    );
    received[3..].sort_by_key(|payload| payload["resource"].as_str().map(str::to_owned));
    assert_eq!(
        received,
        [
            json!({"operation": "INSERT", "resource": "distributions"}),
            json!({"operation": "UPDATE", "resource": "accounts"}),
            json!({"operation": "DELETE", "resource": "distributions"}),
            json!({"operation": "UPDATE", "resource": "investors"}),
            json!({"operation": "UPDATE", "resource": "valuations"}),
        ]
    );
    let extra = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(extra.is_err(), "unexpected notification: {extra:?}");
}

/// The payload stays tiny however large the row's errors are, far below
/// NOTIFY's 8000-byte limit.
#[tokio::test]
async fn payload_is_small_whatever_the_errors() {
    let db = TestDb::migrated().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener.listen("vantage_sync_state_changes").await.unwrap();
    let mut conn = db.connect().await;
    let resource = format!("a{}", "b".repeat(62));
    sqlx::query("SELECT start_vantage_sync($1)")
        .bind(&resource)
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("SELECT fail_vantage_sync($1, (SELECT jsonb_agg(jsonb_build_object('code', 'E', 'message', repeat('x', 500))) FROM generate_series(1, 1000)))")
        .bind(&resource)
        .execute(&mut conn)
        .await
        .unwrap();
    let _started = next_payload(&mut listener).await;
    let mut failed = next_payload(&mut listener).await;
    assert!(
        failed
            .as_object_mut()
            .unwrap()
            .remove("id")
            .unwrap()
            .is_i64()
    );
    assert_eq!(failed, json!({"operation": "UPDATE", "resource": resource}));
    assert!(failed.to_string().len() < 200);
}
