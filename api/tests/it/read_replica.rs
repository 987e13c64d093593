//! A read replica: a hot standby made with `pg_basebackup -R`, streaming
//! from the primary. Queries read from it; mutations stay on the primary;
//! while its replay lags or it is down, the primary answers queries.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sqlx::{Connection, Executor, PgConnection, Row};
use vantage_sync::db::replica::{CHECK_EVERY, ReplicaSettings};
use vantage_sync_testkit::{Cluster, TestApp, TestDb, metric_value};

const MAX_LAG: Duration = Duration::from_millis(500);

/// Calls of top-level statements whose text has `pattern`, since the last
/// reset, in the database the connection is on.
async fn calls(conn: &mut PgConnection, pattern: &str) -> i64 {
    sqlx::query(
        "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s
         JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = current_database() AND s.query ILIKE $1
           AND s.query NOT ILIKE '%pg_stat_statements%'",
    )
    .bind(format!("%{pattern}%"))
    .fetch_one(conn)
    .await
    .unwrap()
    .get(0)
}

/// Starts the statement counts of each connection's server afresh.
async fn reset_counts(connections: &mut [&mut PgConnection]) {
    for conn in connections {
        conn.execute("SELECT pg_stat_statements_reset()")
            .await
            .unwrap();
    }
}

async fn metric(app: &TestApp, name: &str) -> f64 {
    metric_value(&app.metrics().await, name).unwrap_or(0.0)
}

async fn usable_within(app: &TestApp, within: Duration, usable: bool) {
    let deadline = Instant::now() + within;
    let wanted = if usable { 1.0 } else { 0.0 };
    while metric(app, "vantage_sync_read_replica_usable").await != wanted {
        assert!(Instant::now() < deadline, "read replica usable != {usable}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(app: &TestApp, resource: &str) -> String {
    let body = app
        .query(
            "authenticated",
            &format!(r#"{{ syncState(resource: "{resource}") {{ lastSyncStatus }} }}"#),
            json!({}),
        )
        .await;
    body["data"]["syncState"]["lastSyncStatus"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn queries_read_the_standby_and_the_primary_takes_over_when_it_lags_or_is_gone() {
    let primary = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let db = TestDb::migrated_on(&primary).await;
    let mut on_primary = db.connect().await;
    on_primary
        .execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .unwrap();
    let primary = std::sync::Arc::new(primary);
    let standby = {
        let primary = primary.clone();
        tokio::task::spawn_blocking(move || primary.standby())
            .await
            .unwrap()
    };
    let standby_url = standby.url("postgres");
    let app = TestApp::spawn_with(db, |config| {
        config.read_replica = Some(ReplicaSettings {
            url: standby_url.clone(),
            max_lag: MAX_LAG,
        });
    })
    .await;
    usable_within(&app, Duration::from_secs(10), true).await;
    // `check` knows it for a standby.
    let mut command = crate::cli::vantage_sync();
    command.args(["check"]).envs([
        ("DATABASE_URL", app.db.url.as_str()),
        ("JWT_SECRET", vantage_sync_testkit::SECRET),
        ("READ_DATABASE_URL", standby_url.as_str()),
    ]);
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("✓ read replica:") && printed.contains("is a hot standby"),
        "{printed}"
    );
    let mut on_standby = PgConnection::connect(&standby_url).await.unwrap();

    // Queries are counted on the standby, and not on the primary.
    reset_counts(&mut [&mut on_primary, &mut on_standby]).await;
    for _ in 0..20 {
        let body = app
            .query("authenticated", "{ syncStates { resource } }", json!({}))
            .await;
        assert_eq!(body["data"]["syncStates"].as_array().unwrap().len(), 7);
    }
    assert!(calls(&mut on_standby, "vantage_sync_state").await >= 20);
    assert_eq!(calls(&mut on_primary, "vantage_sync_state").await, 0);
    assert!(
        metric(
            &app,
            "vantage_sync_query_transactions_total{target=\"Replica\"}"
        )
        .await
            >= 20.0
    );

    // Mutations are counted on the primary, and not on the standby.
    reset_counts(&mut [&mut on_primary, &mut on_standby]).await;
    let started = app
        .query(
            "service_role",
            r#"mutation { startSync(resource: "accounts") { lastSyncStatus } }"#,
            json!({}),
        )
        .await;
    assert_eq!(started["data"]["startSync"]["lastSyncStatus"], "RUNNING");
    assert!(calls(&mut on_primary, "start_vantage_sync").await >= 1);
    assert_eq!(calls(&mut on_standby, "start_vantage_sync").await, 0);

    // Replay paused: a change made now shows in queries within the lag
    // bound plus a check, as the primary takes over.
    on_standby
        .execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed_at = Instant::now();
    let answer = app
        .query(
            "service_role",
            r#"mutation { startSync(resource: "funds") { lastSyncStatus } }"#,
            json!({}),
        )
        .await;
    // The mutation's own answer is the new state (read your writes there).
    assert_eq!(answer["data"]["startSync"]["lastSyncStatus"], "RUNNING");
    while status_of(&app, "funds").await != "RUNNING" {
        assert!(
            // The bound, one check period, and slack for a busy machine.
            changed_at.elapsed() < MAX_LAG + CHECK_EVERY + Duration::from_millis(1500),
            "the change did not show within the lag bound"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    usable_within(&app, Duration::from_secs(2), false).await;
    assert!(metric(&app, "vantage_sync_read_replica_lag_seconds").await > MAX_LAG.as_secs_f64());
    on_standby
        .execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    usable_within(&app, Duration::from_secs(5), true).await;

    // The standby gone: queries still succeed and the server stays ready.
    drop(on_standby);
    let standby = tokio::task::spawn_blocking(move || {
        standby.stop();
        standby
    })
    .await
    .unwrap();
    for _ in 0..20 {
        let (status, body) = app
            .graphql(
                Some("authenticated"),
                "{ syncStates { resource } }",
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body["data"]["syncStates"].as_array().unwrap().len(),
            7,
            "{body}"
        );
    }
    assert_eq!(app.readiness().await, StatusCode::OK);
    usable_within(&app, Duration::from_secs(3), false).await;

    // A server started while its standby is down serves from the primary,
    // and takes the standby into use once it is back.
    let standby = std::sync::Arc::new(standby);
    let second = TestApp::spawn_with(
        TestDb {
            name: app.db.name.clone(),
            url: app.db.url.clone(),
        },
        |config| {
            config.read_replica = Some(ReplicaSettings {
                url: standby.url("postgres"),
                max_lag: MAX_LAG,
            });
        },
    )
    .await;
    let body = second
        .query("authenticated", "{ syncStates { resource } }", json!({}))
        .await;
    assert_eq!(body["data"]["syncStates"].as_array().unwrap().len(), 7);
    assert_eq!(second.readiness().await, StatusCode::OK);
    let restarting = standby.clone();
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .unwrap();
    usable_within(&second, Duration::from_secs(10), true).await;
}
