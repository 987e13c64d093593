//! The transition functions: start, complete, fail, and their refusals.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Executor, PgConnection, Row};
use vantage_sync_testkit::{TestDb, sql_error, state_row};

/// The row of `resource` as JSON, or null.
async fn start(conn: &mut PgConnection, resource: &str) -> Result<Value, sqlx::Error> {
    sqlx::query_scalar("SELECT to_jsonb(s) FROM start_vantage_sync($1) s")
        .bind(resource)
        .fetch_one(conn)
        .await
}

async fn complete(
    conn: &mut PgConnection,
    resource: &str,
    counts: [i32; 3],
) -> Result<Value, sqlx::Error> {
    sqlx::query_scalar("SELECT to_jsonb(s) FROM complete_vantage_sync($1, $2, $3, $4) s")
        .bind(resource)
        .bind(counts[0])
        .bind(counts[1])
        .bind(counts[2])
        .fetch_one(conn)
        .await
}

async fn fail(
    conn: &mut PgConnection,
    resource: &str,
    errors: Value,
) -> Result<Value, sqlx::Error> {
    sqlx::query_scalar("SELECT to_jsonb(s) FROM fail_vantage_sync($1, $2) s")
        .bind(resource)
        .bind(errors)
        .fetch_one(conn)
        .await
}

fn time(value: &Value) -> DateTime<Utc> {
    serde_json::from_value(value.clone()).unwrap()
}

#[tokio::test]
async fn start_marks_running_and_returns_the_row() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let started = start(&mut conn, "accounts").await.unwrap();
    assert_eq!(started["last_sync_status"], "running");
    assert!(started["started_at"].is_string());
    assert_eq!(started["completed_at"], Value::Null);
    assert_eq!(started["duration_ms"], Value::Null);
    assert_eq!(started["last_sync_time"], Value::Null);
    assert_eq!(state_row(&mut conn, "accounts").await, started);
}

#[tokio::test]
async fn complete_records_counts_watermark_and_duration() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let begun = Instant::now();
    start(&mut conn, "accounts").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A failure before the success, so clearing errors is observable.
    conn.execute("UPDATE vantage_sync_state SET errors = '[{\"code\": \"OLD\", \"message\": \"old\"}]' WHERE resource = 'accounts'")
        .await
        .unwrap();
    let completed = complete(&mut conn, "accounts", [100, 10, 90])
        .await
        .unwrap();
    let elapsed = begun.elapsed().as_millis() as i64;

    assert_eq!(completed["last_sync_status"], "success");
    assert_eq!(
        (
            &completed["records_synced"],
            &completed["records_created"],
            &completed["records_updated"]
        ),
        (&json!(100), &json!(10), &json!(90))
    );
    assert_eq!(completed["errors"], json!([]));
    assert_eq!(completed["last_sync_time"], completed["completed_at"]);
    let duration = completed["duration_ms"].as_i64().unwrap();
    assert!(
        (300..=elapsed).contains(&duration),
        "duration {duration} ms, elapsed {elapsed} ms"
    );
    let computed =
        (time(&completed["completed_at"]) - time(&completed["started_at"])).num_milliseconds();
    assert_eq!(duration, computed);
    assert_eq!(state_row(&mut conn, "accounts").await, completed);
}

#[tokio::test]
async fn fail_stores_errors_and_keeps_the_watermark() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    start(&mut conn, "funds").await.unwrap();
    let succeeded = complete(&mut conn, "funds", [5, 5, 0]).await.unwrap();
    start(&mut conn, "funds").await.unwrap();
    let errors = json!([
        {"code": "HTTP_503", "message": "Vantage unavailable", "recordId": "fund-7", "timestamp": "2025-11-05T13:28:40Z"},
        {"code": "VALIDATION", "message": "missing currency", "details": {"field": "currency"}}
    ]);
    let failed = fail(&mut conn, "funds", errors.clone()).await.unwrap();
    assert_eq!(failed["last_sync_status"], "failed");
    assert_eq!(failed["errors"], errors);
    assert_eq!(failed["last_sync_time"], succeeded["last_sync_time"]);
    assert!(failed["completed_at"].is_string());
    assert!(failed["duration_ms"].is_i64());
    // The counts of the last success stay.
    assert_eq!(failed["records_synced"], 5);
}

#[tokio::test]
async fn start_while_running_is_refused_unless_forced() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let first = start(&mut conn, "cashflows").await.unwrap();
    assert_eq!(sql_error(start(&mut conn, "cashflows").await).0, "VS001");
    assert_eq!(
        state_row(&mut conn, "cashflows").await,
        first,
        "a refused start changed the row"
    );

    tokio::time::sleep(Duration::from_millis(5)).await;
    let forced: Value =
        sqlx::query_scalar("SELECT to_jsonb(s) FROM start_vantage_sync('cashflows', true) s")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(forced["last_sync_status"], "running");
    assert!(time(&forced["started_at"]) > time(&first["started_at"]));
}

#[tokio::test]
async fn start_is_allowed_from_every_finished_status() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    // never_run -> running -> success -> running -> failed -> running
    start(&mut conn, "investors").await.unwrap();
    complete(&mut conn, "investors", [1, 1, 0]).await.unwrap();
    start(&mut conn, "investors").await.unwrap();
    fail(&mut conn, "investors", json!([])).await.unwrap();
    let again = start(&mut conn, "investors").await.unwrap();
    assert_eq!(again["last_sync_status"], "running");
    assert_eq!(again["completed_at"], Value::Null);
    assert_eq!(again["duration_ms"], Value::Null);
}

#[tokio::test]
async fn complete_or_fail_when_not_running_is_refused_and_changes_nothing() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    start(&mut conn, "valuations").await.unwrap();
    complete(&mut conn, "valuations", [1, 0, 0]).await.unwrap();
    start(&mut conn, "commitments").await.unwrap();
    fail(&mut conn, "commitments", json!([])).await.unwrap();
    // never_run, success and failed are all "not running".
    for resource in ["accounts", "valuations", "commitments"] {
        let before = state_row(&mut conn, resource).await;
        assert_eq!(
            sql_error(complete(&mut conn, resource, [1, 0, 0]).await).0,
            "VS002",
            "{resource}"
        );
        assert_eq!(
            sql_error(fail(&mut conn, resource, json!([])).await).0,
            "VS002",
            "{resource}"
        );
        assert_eq!(state_row(&mut conn, resource).await, before, "{resource}");
    }
}

#[tokio::test]
async fn complete_or_fail_of_an_unknown_resource_is_refused_and_creates_nothing() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    assert_eq!(
        sql_error(complete(&mut conn, "unknown_thing", [0, 0, 0]).await).0,
        "VS003"
    );
    assert_eq!(
        sql_error(fail(&mut conn, "unknown_thing", json!([])).await).0,
        "VS003"
    );
    assert_eq!(state_row(&mut conn, "unknown_thing").await, Value::Null);
}

#[tokio::test]
async fn start_of_an_unknown_resource_creates_it_running() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let created = start(&mut conn, "distributions").await.unwrap();
    assert_eq!(created["resource"], "distributions");
    assert_eq!(created["last_sync_status"], "running");
    assert_eq!(created["records_synced"], 0);
    assert_eq!(created["errors"], json!([]));
    assert_eq!(state_row(&mut conn, "distributions").await, created);
}

#[tokio::test]
async fn bad_arguments_are_refused_and_leave_the_running_sync_alone() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let running = start(&mut conn, "accounts").await.unwrap();
    let cases: Vec<(Result<Value, sqlx::Error>, &str, Option<&str>)> = vec![
        (
            complete(&mut conn, "accounts", [-1, 0, 0]).await,
            "23514",
            Some("non_negative_records_synced"),
        ),
        (
            complete(&mut conn, "accounts", [5, -1, 0]).await,
            "23514",
            Some("non_negative_records_created"),
        ),
        (
            complete(&mut conn, "accounts", [5, 0, -1]).await,
            "23514",
            Some("non_negative_records_updated"),
        ),
        (
            complete(&mut conn, "accounts", [5, 3, 3]).await,
            "23514",
            Some("records_breakdown_consistent"),
        ),
        (
            fail(&mut conn, "accounts", json!({"code": "X"})).await,
            "23514",
            Some("errors_is_array"),
        ),
        // JSON null is not an array; SQL NULL is not a value at all.
        (
            fail(&mut conn, "accounts", Value::Null).await,
            "23514",
            Some("errors_is_array"),
        ),
    ];
    for (result, code, constraint) in cases {
        let (actual_code, actual_constraint) = sql_error(result);
        assert_eq!(
            (actual_code.as_str(), actual_constraint.as_deref()),
            (code, constraint)
        );
    }
    for sql in [
        "SELECT complete_vantage_sync('accounts', NULL, 0, 0)",
        "SELECT fail_vantage_sync('accounts', NULL)",
    ] {
        assert_eq!(
            sql_error(sqlx::query(sql).execute(&mut conn).await).0,
            "23502",
            "{sql}"
        );
    }
    for name in ["Bad Name", "-x", ""] {
        assert_eq!(
            sql_error(start(&mut conn, name).await),
            ("23514".to_owned(), Some("resource_format".to_owned()))
        );
    }
    assert_eq!(state_row(&mut conn, "accounts").await, running);
}

#[tokio::test]
async fn triggers_maintain_updated_at_and_duration() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let before = state_row(&mut conn, "accounts").await;
    conn.execute("UPDATE vantage_sync_state SET records_synced = 3 WHERE resource = 'accounts'")
        .await
        .unwrap();
    let after = state_row(&mut conn, "accounts").await;
    assert!(time(&after["updated_at"]) > time(&before["updated_at"]));
    assert_eq!(after["created_at"], before["created_at"]);

    // Direct writes get the duration computed too, whatever they claim.
    conn.execute(
        "UPDATE vantage_sync_state SET last_sync_status = 'success',
             started_at = '2025-11-05T10:00:00Z', completed_at = '2025-11-05T10:00:02.5Z', duration_ms = 1
         WHERE resource = 'funds'",
    )
    .await
    .unwrap();
    assert_eq!(state_row(&mut conn, "funds").await["duration_ms"], 2500);
    conn.execute(
        "UPDATE vantage_sync_state SET started_at = NULL, duration_ms = 7 WHERE resource = 'funds'",
    )
    .await
    .unwrap();
    assert_eq!(
        state_row(&mut conn, "funds").await["duration_ms"],
        Value::Null
    );
}

/// A sync left running past int4's 24.8 days of milliseconds can still be
/// completed: the duration saturates instead of overflowing.
#[tokio::test]
async fn a_very_long_sync_can_still_complete() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    start(&mut conn, "accounts").await.unwrap();
    conn.execute("UPDATE vantage_sync_state SET started_at = now() - interval '40 days' WHERE resource = 'accounts'")
        .await
        .unwrap();
    let completed = complete(&mut conn, "accounts", [1, 0, 0]).await.unwrap();
    assert_eq!(completed["duration_ms"], i32::MAX);
}

/// Sixteen workers race to start one resource: exactly one wins, whether
/// the row exists already or the race creates it.
#[tokio::test]
async fn concurrent_starts_have_exactly_one_winner() {
    let db = TestDb::migrated().await;
    let pool = db.pool(16).await;
    for resource in ["accounts", "brand_new_resource"] {
        // Hold every connection first so the calls really overlap.
        let mut conns = Vec::new();
        for _ in 0..16 {
            conns.push(pool.acquire().await.unwrap());
        }
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut conn| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    sqlx::query("SELECT start_vantage_sync($1)")
                        .bind(resource)
                        .execute(&mut *conn)
                        .await
                })
            })
            .collect();
        let mut wins = 0;
        let mut refusals = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(error) => {
                    assert_eq!(sql_error::<()>(Err(error)).0, "VS001");
                    refusals += 1;
                }
            }
        }
        assert_eq!((wins, refusals), (1, 15), "{resource}");
        let status: String =
            sqlx::query("SELECT last_sync_status FROM vantage_sync_state WHERE resource = $1")
                .bind(resource)
                .fetch_one(&pool)
                .await
                .unwrap()
                .get(0);
        assert_eq!(status, "running");
    }
}

/// Parameters are data, never SQL: a hostile resource name is refused by
/// the name check and runs nothing.
#[tokio::test]
async fn a_hostile_resource_name_is_only_data() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    for name in [
        "x'; DROP TABLE vantage_sync_state; --",
        "accounts' OR '1'='1",
        "accounts\"; DELETE FROM vantage_sync_state; --",
    ] {
        assert_eq!(
            sql_error(start(&mut conn, name).await).1.as_deref(),
            Some("resource_format")
        );
        assert_eq!(
            sql_error(complete(&mut conn, name, [0, 0, 0]).await).0,
            "VS003"
        );
        assert_eq!(sql_error(fail(&mut conn, name, json!([])).await).0, "VS003");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM vantage_sync_state")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 7);
    // The functions build no SQL text of their own.
    let dynamic: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace
         AND proname LIKE '%vantage_sync%' AND prosrc ~* '\\mEXECUTE\\M'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(dynamic, 0);
}
