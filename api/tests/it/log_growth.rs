//! Reads that must not grow with the event log. The log keeps
//! `EVENT_RETENTION_DAYS` (30) of changes, so the board's reads (trends,
//! failure streaks, a resource's history) must cost what the answer needs,
//! not what the log holds. Counted as the buffers PostgreSQL touched
//! (pg_stat_statements, preloaded in the test cluster), never as time.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sqlx::PgConnection;
use vantage_sync_testkit::{TestApp, TestDb};

/// Shared buffers touched so far by statements of this test's database
/// that read the event log (the test's own counting excluded).
async fn blocks(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(s.shared_blks_hit + s.shared_blks_read), 0)::bigint
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = current_database()
           AND s.query ILIKE '%vantage_sync_events%'
           AND s.query NOT ILIKE '%pg_stat_statements%'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// `accounts` ran three times long ago (two failures last), then another
/// resource, `busy_feed`, made 20,000 changes (many pages of log that an
/// answer about `accounts` has no need to touch), then `ledger`
/// was registered and ran once.
const LONG_LOG: &str = "
    SELECT start_vantage_sync('accounts');
    SELECT complete_vantage_sync('accounts', 10, 5, 5);
    SELECT start_vantage_sync('accounts');
    SELECT fail_vantage_sync('accounts', '[{\"code\": \"E1\", \"message\": \"one\"}]');
    SELECT start_vantage_sync('accounts');
    SELECT fail_vantage_sync('accounts', '[{\"code\": \"E2\", \"message\": \"two\"}]');
    INSERT INTO vantage_sync_state (resource) VALUES ('busy_feed');
    INSERT INTO vantage_sync_events (resource, operation, status, previous_status, state)
    SELECT 'busy_feed', 'UPDATE',
           CASE WHEN i % 2 = 1 THEN 'running' ELSE 'success' END,
           CASE WHEN i % 2 = 1 THEN 'success' ELSE 'running' END,
           jsonb_build_object(
               'resource', 'busy_feed',
               'last_sync_status', CASE WHEN i % 2 = 1 THEN 'running' ELSE 'success' END,
               'started_at', now() - interval '1 day' + ((i - 1) / 2) * interval '2 seconds',
               'completed_at', now() - interval '1 day' + ((i - 1) / 2) * interval '2 seconds' + interval '1 second',
               'duration_ms', 1000,
               'records_synced', i,
               'errors', '[]'::jsonb,
               'padding', repeat('x', 200))
    FROM generate_series(1, 20000) i;
    SELECT start_vantage_sync('ledger');
    SELECT complete_vantage_sync('ledger', 1, 1, 0);
    ANALYZE vantage_sync_events;
";

#[tokio::test]
async fn reads_about_one_resource_do_not_grow_with_the_log() {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        // The feed's own reads would fall into the counts.
        config.feed_poll_interval = Duration::from_secs(3600);
    })
    .await;
    app.sql(LONG_LOG).await;
    let mut conn = app.db.connect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (query, expected) in [
        (
            "{ syncTrends(resources: [\"accounts\"], last: 3) { resource runs { status errorCount } } }",
            json!({"syncTrends": [{"resource": "accounts", "runs": [
                {"status": "FAILED", "errorCount": 1},
                {"status": "FAILED", "errorCount": 1},
                {"status": "SUCCESS", "errorCount": 0},
            ]}]}),
        ),
        (
            "{ syncState(resource: \"accounts\") { consecutiveFailures } }",
            json!({"syncState": {"consecutiveFailures": 2}}),
        ),
        (
            "{ repeatedFailures(minConsecutive: 2) { resource consecutiveFailures } }",
            json!({"repeatedFailures": [{"resource": "accounts", "consecutiveFailures": 2}]}),
        ),
        (
            "{ syncHistory(resource: \"ledger\", first: 5) { edges { node { operation status } } } }",
            json!({"syncHistory": {"edges": [
                {"node": {"operation": "INSERT", "status": "RUNNING"}},
                {"node": {"operation": "UPDATE", "status": "SUCCESS"}},
            ]}}),
        ),
    ] {
        // PostgreSQL may switch a prepared statement to a generic plan
        // (one for any parameter values) from its sixth run: the last of
        // eight runs counts.
        for _ in 0..7 {
            app.graphql(Some("authenticated"), query, json!({})).await;
        }
        let before = blocks(&mut conn).await;
        let (status, body) = app.graphql(Some("authenticated"), query, json!({})).await;
        let touched = blocks(&mut conn).await - before;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        assert_eq!(body, json!({ "data": expected }), "{query}");
        // Index pages and the few heap pages of `accounts`' events: tens
        // of pages, where reading the log would touch all of its pages.
        assert!(touched < 60, "{query} touched {touched} pages");
    }
}
