//! What one request may read: root fields weigh their reads, a
//! request over MAX_DB_READS_PER_REQUEST is refused before any database
//! work, identical root fields are read once, and the README's sample
//! queries read what it says. Reads are counted by PostgreSQL itself
//! (pg_stat_statements, preloaded in the test cluster).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgConnection;
use vantage_sync_testkit::{TestApp, TestDb};

/// Statements run so far in this test's database that read the sync
/// tables (the test's own counting excluded).
async fn reads(conn: &mut PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s
         JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = current_database()
           AND (s.query ILIKE '%vantage_sync_state%' OR s.query ILIKE '%vantage_sync_events%'
                OR s.query ILIKE '%vantage_sync_alerts%')
           AND s.query NOT ILIKE '%pg_stat_statements%'",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

/// A server whose live feed reads the log only when told of a change (its
/// timed poll would fall into the counts), once it is quiet.
async fn quiet_app(setup: &str) -> (TestApp, PgConnection) {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.feed_poll_interval = Duration::from_secs(3600);
    })
    .await;
    if !setup.is_empty() {
        app.sql(setup).await;
    }
    let mut conn = app.db.connect().await;
    // The feed reads what the setup changed; then nothing reads unasked.
    let mut last = reads(&mut conn).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = reads(&mut conn).await;
        if now == last {
            return (app, conn);
        }
        last = now;
    }
}

/// The reads `query` (as `authenticated`) makes, and its response.
async fn counted(app: &TestApp, conn: &mut PgConnection, query: &str) -> (i64, StatusCode, Value) {
    let before = reads(conn).await;
    let (status, body) = app.graphql(Some("authenticated"), query, json!({})).await;
    (reads(conn).await - before, status, body)
}

#[tokio::test]
async fn five_hundred_aliases_are_refused_before_any_database_work() {
    let (app, mut conn) = quiet_app("").await;
    let aliases: String = (0..500)
        .map(|i| format!("a{i}: syncStates {{ resource errors {{ code }} }} "))
        .collect();
    let (read, status, body) = counted(&app, &mut conn, &format!("{{ {aliases} }}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    assert_eq!(
        body["errors"][0]["message"],
        "this request would read the database 500 times; at most 16 reads are allowed per request (MAX_DB_READS_PER_REQUEST): split it, or ask for a field once"
    );
    assert_eq!(read, 0);
}

#[tokio::test]
async fn identical_root_fields_are_read_once() {
    let (app, mut conn) = quiet_app("").await;
    let aliases: String = (0..10)
        .map(|i| format!("a{i}: syncStates {{ resource }} "))
        .collect();
    let (read, status, body) = counted(&app, &mut conn, &format!("{{ {aliases} }}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["a9"], body["data"]["a0"]);
    assert_eq!(body["data"]["a0"].as_array().unwrap().len(), 7);
    assert_eq!(read, 1);
    // Other arguments are other reads.
    let (read, _, body) = counted(
        &app,
        &mut conn,
        "{ a: syncState(resource: \"funds\") { resource } b: syncState(resource: \"accounts\") { resource } c: syncState(resource: \"funds\") { resource } }",
    )
    .await;
    assert_eq!(body["data"]["c"], json!({"resource": "funds"}));
    assert_eq!(read, 2);
}

/// The README's table of sample queries and what each reads.
#[tokio::test]
async fn sample_queries_read_what_the_readme_says() {
    let (app, mut conn) = quiet_app(
        "SELECT start_vantage_sync('accounts'); SELECT fail_vantage_sync('accounts', '[]');",
    )
    .await;
    for (query, documented) in [
        (
            "{ syncStates { resource lastSyncStatus health hoursSinceSync } syncStats { failed running } }",
            2,
        ),
        ("{ syncStates { resource consecutiveFailures } }", 2),
        (
            "{ failedSyncs { resource } staleSyncs { resource } stuckSyncs { resource } slowestSyncs { resource } }",
            4,
        ),
        ("{ repeatedFailures { resource consecutiveFailures } }", 2),
        (
            "{ syncHistory(first: 5) { edges { cursor } pageInfo { hasNextPage } } }",
            1,
        ),
        ("{ syncTrends { resource successRate runs { status } } }", 1),
        (
            "{ syncState(resource: \"accounts\") { resource errors { code } } }",
            1,
        ),
        ("{ alerts { alert resource firingSince } }", 1),
        ("{ alerts(firing: null) { alert resource resolvedAt } }", 2),
    ] {
        let (read, status, body) = counted(&app, &mut conn, query).await;
        assert_eq!(status, StatusCode::OK, "{query}: {body}");
        assert!(body.get("errors").is_none(), "{query}: {body}");
        assert_eq!(read, documented, "{query}");
    }
}
