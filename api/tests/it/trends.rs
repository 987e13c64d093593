//! Run trends from the event log (`syncTrend`, `syncTrends`): runs paired
//! from starts and their ends, forced restarts as ABANDONED, operators'
//! corrections not counted as runs, removed resources starting afresh.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Executor, PgConnection};
use vantage_sync_testkit::{TestApp, state_row};

const TREND: &str = "query($resource: String!, $last: Int) {
    syncTrend(resource: $resource, last: $last) {
        resource successRate p50DurationMs p95DurationMs
        runs { status startedAt completedAt durationMs recordsSynced errorCount } } }";

/// One run as (status, started, ended, duration, records, errors).
type Run = (
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<i64>,
    Option<i64>,
    i64,
);

fn time(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(
        value
            .as_str()
            .unwrap_or_else(|| panic!("not a time: {value}")),
    )
    .unwrap()
    .with_timezone(&Utc)
}

fn runs(trend: &Value) -> Vec<Run> {
    trend["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            (
                run["status"].as_str().unwrap().to_owned(),
                time(&run["startedAt"]),
                time(&run["completedAt"]),
                run["durationMs"].as_i64(),
                run["recordsSynced"].as_i64(),
                run["errorCount"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Runs `sql` and returns the row of `resource` it left.
async fn step(conn: &mut PgConnection, sql: &str, resource: &str) -> Value {
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())))
        .await
        .unwrap();
    state_row(conn, resource).await
}

/// The run a completion or failure ended, from the row it left.
fn ended(row: &Value, status: &str) -> Run {
    let success = status == "SUCCESS";
    (
        status.to_owned(),
        time(&row["started_at"]),
        time(&row["completed_at"]),
        row["duration_ms"].as_i64(),
        success.then(|| row["records_synced"].as_i64().unwrap()),
        if success {
            0
        } else {
            row["errors"].as_array().unwrap().len() as i64
        },
    )
}

async fn trend(app: &TestApp, resource: &str, last: Option<i64>) -> Value {
    let body = app
        .query(
            "authenticated",
            TREND,
            json!({"resource": resource, "last": last}),
        )
        .await;
    body["data"]["syncTrend"].clone()
}

#[tokio::test]
async fn runs_pair_starts_with_their_ends_and_forced_restarts_are_abandoned() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    let first = step(
        &mut conn,
        "SELECT start_vantage_sync('alpha'); SELECT complete_vantage_sync('alpha', 5, 1, 1)",
        "alpha",
    )
    .await;
    let failed = step(
        &mut conn,
        "SELECT start_vantage_sync('alpha');
         SELECT fail_vantage_sync('alpha', '[{\"code\":\"A\",\"message\":\"a\"},{\"code\":\"B\",\"message\":\"b\"}]')",
        "alpha",
    )
    .await;
    let abandoned = step(&mut conn, "SELECT start_vantage_sync('alpha')", "alpha").await;
    let restarted = step(
        &mut conn,
        "SELECT start_vantage_sync('alpha', true)",
        "alpha",
    )
    .await;
    // An operator moves the running sync's start back: a correction of
    // the same run, not a new one.
    step(
        &mut conn,
        "UPDATE vantage_sync_state SET started_at = started_at - interval '10 seconds' WHERE resource = 'alpha'",
        "alpha",
    )
    .await;
    let last = step(
        &mut conn,
        "SELECT complete_vantage_sync('alpha', 7, 7, 0)",
        "alpha",
    )
    .await;
    // Running now: not a run yet.
    step(&mut conn, "SELECT start_vantage_sync('alpha')", "alpha").await;

    let trend = trend(&app, "alpha", None).await;
    let expected = vec![
        ended(&last, "SUCCESS"),
        (
            "ABANDONED".to_owned(),
            time(&abandoned["started_at"]),
            time(&restarted["started_at"]),
            None,
            None,
            0,
        ),
        ended(&failed, "FAILED"),
        ended(&first, "SUCCESS"),
    ];
    assert_eq!(runs(&trend), expected);
    assert!(last["duration_ms"].as_i64().unwrap() >= 10_000, "{last}");
    assert_eq!(trend["resource"], "alpha");
    assert_eq!(trend["successRate"], json!(0.5));
    // Of the successful runs only, nearest rank.
    assert_eq!(trend["p50DurationMs"], first["duration_ms"]);
    assert_eq!(trend["p95DurationMs"], last["duration_ms"]);

    let newest_two = self::trend(&app, "alpha", Some(2)).await;
    assert_eq!(runs(&newest_two), expected[..2]);
    assert_eq!(newest_two["successRate"], json!(0.5));
    assert_eq!(newest_two["p50DurationMs"], last["duration_ms"]);
}

#[tokio::test]
async fn a_removed_resource_starts_afresh_and_unknown_ones_have_no_runs() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    step(
        &mut conn,
        "SELECT start_vantage_sync('beta'); SELECT complete_vantage_sync('beta', 1, 1, 0);
         SELECT start_vantage_sync('beta');",
        "beta",
    )
    .await;
    // Removed while running: that run never ended, and the one before
    // belonged to the removed resource.
    step(
        &mut conn,
        "DELETE FROM vantage_sync_state WHERE resource = 'beta'",
        "beta",
    )
    .await;
    let removed = trend(&app, "beta", None).await;
    assert_eq!(
        removed,
        json!({"resource": "beta", "successRate": null, "p50DurationMs": null,
               "p95DurationMs": null, "runs": []})
    );
    let failed = step(
        &mut conn,
        "SELECT start_vantage_sync('beta'); SELECT fail_vantage_sync('beta', '[]')",
        "beta",
    )
    .await;
    let again = trend(&app, "beta", None).await;
    assert_eq!(runs(&again), vec![ended(&failed, "FAILED")]);
    assert_eq!(again["successRate"], json!(0.0));
    assert_eq!(again["p50DurationMs"], Value::Null);
    assert_eq!(trend(&app, "never_heard_of", None).await["runs"], json!([]));
}

#[tokio::test]
async fn sync_trends_lists_every_registered_resource_or_those_asked() {
    let app = TestApp::spawn().await;
    app.sql(
        "SELECT start_vantage_sync('funds'); SELECT complete_vantage_sync('funds', 3, 3, 0);
         SELECT start_vantage_sync('funds'); SELECT fail_vantage_sync('funds', '[]');",
    )
    .await;
    let body = app
        .query(
            "authenticated",
            "{ syncTrends { resource runs { status } }
               syncStates { resource }
               asked: syncTrends(resources: [\"funds\", \"zeta\", \"funds\"], last: 1) { resource runs { status } successRate } }",
            json!({}),
        )
        .await;
    let mut registered: Vec<&str> = body["data"]["syncStates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|state| state["resource"].as_str().unwrap())
        .collect();
    registered.sort_unstable();
    let trends = body["data"]["syncTrends"].as_array().unwrap();
    let names: Vec<&str> = trends
        .iter()
        .map(|trend| trend["resource"].as_str().unwrap())
        .collect();
    assert_eq!(names, registered);
    let funds = trends
        .iter()
        .find(|trend| trend["resource"] == "funds")
        .unwrap();
    assert_eq!(
        funds["runs"],
        json!([{"status": "FAILED"}, {"status": "SUCCESS"}])
    );
    assert_eq!(
        body["data"]["asked"],
        json!([
            {"resource": "funds", "runs": [{"status": "FAILED"}], "successRate": 0.0},
            {"resource": "zeta", "runs": [], "successRate": null},
        ])
    );
}

#[tokio::test]
async fn trend_arguments_are_checked_and_need_a_reader() {
    let app = TestApp::spawn().await;
    for (query, field) in [
        (
            "{ syncTrend(resource: \"funds\", last: 0) { resource } }",
            "last",
        ),
        (
            "{ syncTrend(resource: \"funds\", last: 101) { resource } }",
            "last",
        ),
        (
            "{ syncTrend(resource: \"Funds\") { resource } }",
            "resource",
        ),
        (
            "{ syncTrends(resources: [\"ok\", \"not ok\"]) { resource } }",
            "resource",
        ),
    ] {
        let body = app.query("authenticated", query, json!({})).await;
        assert_eq!(body["data"], Value::Null, "{query}");
        assert_eq!(
            body["errors"][0]["extensions"],
            json!({"code": "BAD_USER_INPUT", "field": field}),
            "{query}"
        );
    }
    let (_, body) = app
        .graphql(None, "{ syncTrends { resource } }", json!({}))
        .await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
}
