//! The live feed under faults: a killed listener connection, a database
//! restart. Nothing committed meanwhile is lost.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sqlx::{Connection, Executor};
use vantage_sync_testkit::{Cluster, TestApp, TestDb, WsClient};

const CHANGES: &str =
    "subscription { syncStateChanged { operation resource state { lastSyncStatus } cursor } }";

async fn next_change(client: &mut WsClient) -> (String, String) {
    let (_, data) = client.next_data().await;
    let change = &data["syncStateChanged"];
    (
        change["resource"].as_str().unwrap().to_owned(),
        change["state"]["lastSyncStatus"]
            .as_str()
            .unwrap_or("null")
            .to_owned(),
    )
}

async fn listener_pids(url: &str) -> Vec<i32> {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// `pg_terminate_backend` on the listener, then at once a change: the
/// change still arrives (the listener reconnects and reads the log).
#[tokio::test]
async fn a_killed_listener_loses_nothing() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.follow(CHANGES, json!({})).await;
    let pids = listener_pids(&app.db.url).await;
    assert_eq!(pids.len(), 1, "one LISTEN connection per server process");
    let mut conn = app.db.connect().await;
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SELECT pg_terminate_backend({}); SELECT start_vantage_sync('accounts'); SELECT start_vantage_sync('funds');",
        pids[0]
    ))))
    .await
    .unwrap();
    assert_eq!(
        next_change(&mut client).await,
        ("accounts".into(), "RUNNING".into())
    );
    assert_eq!(
        next_change(&mut client).await,
        ("funds".into(), "RUNNING".into())
    );
    // It reconnected, and says so.
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("vantage_sync_feed_listener_reconnects_total 1"),
        "{metrics}"
    );
    let new_pids = listener_pids(&app.db.url).await;
    assert_eq!(new_pids.len(), 1);
    assert_ne!(new_pids, pids);
}

/// A full database stop and start: /readyz is 503 while it is down, 200
/// once the listener is back, and changes made right after the restart
/// reach the subscriber that stayed connected.
#[tokio::test]
async fn a_database_restart_loses_nothing() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let url = cluster.url("postgres");
    let app = TestApp::spawn_with(TestDb::migrated_on(&cluster).await, |_| {}).await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.follow(CHANGES, json!({})).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    assert_eq!(app.readiness().await, StatusCode::SERVICE_UNAVAILABLE);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart();
        cluster
    })
    .await
    .unwrap();
    // Changed at once, likely before the listener is back.
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    conn.execute(
        "SELECT start_vantage_sync('valuations'); SELECT start_vantage_sync('investors');",
    )
    .await
    .unwrap();
    assert_eq!(
        next_change(&mut client).await,
        ("valuations".into(), "RUNNING".into())
    );
    assert_eq!(
        next_change(&mut client).await,
        ("investors".into(), "RUNNING".into())
    );
    assert_eq!(
        app.ready_within(Duration::from_secs(10)).await,
        StatusCode::OK
    );
    drop(cluster);
}
