//! The state table: columns, constraints, comments and indexes.

use serde_json::Value;
use sqlx::{AssertSqlSafe, Executor, Row};
use vantage_sync_testkit::{TestDb, sql_error};

#[tokio::test]
async fn columns_have_the_contract_types_nullability_and_defaults() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT column_name::text, data_type::text, is_nullable::text, column_default::text
         FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name = 'vantage_sync_state'
         ORDER BY ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let columns: Vec<(String, String, String, Option<String>)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let expected = [
        ("resource", "text", "NO", None),
        ("last_sync_time", "timestamp with time zone", "YES", None),
        ("last_sync_status", "text", "NO", Some("'never_run'::text")),
        ("records_synced", "integer", "NO", Some("0")),
        ("records_created", "integer", "NO", Some("0")),
        ("records_updated", "integer", "NO", Some("0")),
        ("errors", "jsonb", "NO", Some("'[]'::jsonb")),
        ("started_at", "timestamp with time zone", "YES", None),
        ("completed_at", "timestamp with time zone", "YES", None),
        ("duration_ms", "integer", "YES", None),
        (
            "created_at",
            "timestamp with time zone",
            "NO",
            Some("now()"),
        ),
        (
            "updated_at",
            "timestamp with time zone",
            "NO",
            Some("now()"),
        ),
    ]
    .map(|(name, ty, null, default)| {
        (
            name.to_owned(),
            ty.to_owned(),
            null.to_owned(),
            default.map(str::to_owned),
        )
    });
    assert_eq!(columns, expected);

    let primary_key: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = 'public.vantage_sync_state'::regclass AND i.indisprimary",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(primary_key, ["resource"]);
}

#[tokio::test]
async fn named_constraints_exist_with_their_definitions() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
         WHERE conrelid = 'public.vantage_sync_state'::regclass AND contype <> 't' ORDER BY conname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let constraints: Vec<(String, String)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let expected = [
        ("errors_is_array", "CHECK ((jsonb_typeof(errors) = 'array'::text))"),
        ("non_negative_duration", "CHECK ((duration_ms >= 0))"),
        ("non_negative_records_created", "CHECK ((records_created >= 0))"),
        ("non_negative_records_synced", "CHECK ((records_synced >= 0))"),
        ("non_negative_records_updated", "CHECK ((records_updated >= 0))"),
        (
            "records_breakdown_consistent",
            "CHECK ((((records_created)::bigint + (records_updated)::bigint) <= (records_synced)::bigint))",
        ),
        ("resource_format", "CHECK ((resource ~ '^[a-z][a-z0-9_]{0,62}$'::text))"),
        (
            "running_incomplete",
            "CHECK (((last_sync_status <> 'running'::text) OR (completed_at IS NULL)))",
        ),
        (
            "valid_sync_status",
            "CHECK ((last_sync_status = ANY (ARRAY['success'::text, 'failed'::text, 'running'::text, 'never_run'::text])))",
        ),
        (
            "valid_sync_timerange",
            "CHECK (((completed_at IS NULL) OR (started_at IS NULL) OR (completed_at >= started_at)))",
        ),
        ("vantage_sync_state_pkey", "PRIMARY KEY (resource)"),
    ]
    .map(|(name, def)| (name.to_owned(), def.to_owned()));
    assert_eq!(constraints, expected);
}

/// Each bad row is refused with the SQLSTATE and constraint that guard it,
/// and leaves the table as it was.
#[tokio::test]
async fn every_constraint_rejects_its_bad_row() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "INSERT INTO vantage_sync_state (resource, last_sync_status) VALUES ('test', 'invalid_status')",
            "23514",
            Some("valid_sync_status"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, records_synced) VALUES ('test', -1)",
            "23514",
            Some("non_negative_records_synced"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, records_synced, records_created) VALUES ('test', 5, -1)",
            "23514",
            Some("non_negative_records_created"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, records_synced, records_updated) VALUES ('test', 5, -1)",
            "23514",
            Some("non_negative_records_updated"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, records_synced, records_created, records_updated) VALUES ('test', 10, 6, 5)",
            "23514",
            Some("records_breakdown_consistent"),
        ),
        (
            // Two counts whose sum overflows int4 must still be refused, not error out.
            "INSERT INTO vantage_sync_state (resource, records_synced, records_created, records_updated) VALUES ('test', 2147483647, 2147483647, 2147483647)",
            "23514",
            Some("records_breakdown_consistent"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, started_at, completed_at) VALUES ('test', now(), now() - interval '1 second')",
            "23514",
            Some("valid_sync_timerange"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, last_sync_status, started_at, completed_at) VALUES ('test', 'running', now(), now())",
            "23514",
            Some("running_incomplete"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, errors) VALUES ('test', '{\"code\": \"X\"}')",
            "23514",
            Some("errors_is_array"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, errors) VALUES ('test', '\"text\"')",
            "23514",
            Some("errors_is_array"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource, errors) VALUES ('test', NULL)",
            "23502",
            None,
        ),
        (
            "UPDATE vantage_sync_state SET errors = NULL WHERE resource = 'accounts'",
            "23502",
            None,
        ),
        (
            "INSERT INTO vantage_sync_state (resource, last_sync_status) VALUES ('test', NULL)",
            "23502",
            None,
        ),
        (
            "INSERT INTO vantage_sync_state (resource) VALUES ('Accounts')",
            "23514",
            Some("resource_format"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource) VALUES ('1funds')",
            "23514",
            Some("resource_format"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource) VALUES ('cash-flows')",
            "23514",
            Some("resource_format"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource) VALUES ('')",
            "23514",
            Some("resource_format"),
        ),
        (
            // 64 characters: one more than PostgreSQL's identifier length.
            "INSERT INTO vantage_sync_state (resource) VALUES ('a' || repeat('b', 63))",
            "23514",
            Some("resource_format"),
        ),
        (
            "INSERT INTO vantage_sync_state (resource) VALUES ('accounts')",
            "23505",
            Some("vantage_sync_state_pkey"),
        ),
    ];
    let before = table_snapshot(&mut conn).await;
    for (sql, code, constraint) in cases {
        let (actual_code, actual_constraint) = sql_error(conn.execute(*sql).await);
        assert_eq!(
            (actual_code.as_str(), actual_constraint.as_deref()),
            (*code, *constraint),
            "{sql}"
        );
    }
    // The duration check cannot be reached through the trigger, which
    // computes the column; bypass the trigger to prove the check itself.
    conn.execute(
        "ALTER TABLE vantage_sync_state DISABLE TRIGGER trigger_calculate_vantage_sync_duration",
    )
    .await
    .unwrap();
    let (code, constraint) = sql_error(
        conn.execute(
            "INSERT INTO vantage_sync_state (resource, duration_ms) VALUES ('test', -100)",
        )
        .await,
    );
    assert_eq!(
        (code.as_str(), constraint.as_deref()),
        ("23514", Some("non_negative_duration"))
    );
    conn.execute(
        "ALTER TABLE vantage_sync_state ENABLE TRIGGER trigger_calculate_vantage_sync_duration",
    )
    .await
    .unwrap();
    assert_eq!(table_snapshot(&mut conn).await, before);
}

#[tokio::test]
async fn good_rows_are_accepted() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    for sql in [
        "INSERT INTO vantage_sync_state (resource) VALUES ('a')",
        "INSERT INTO vantage_sync_state (resource) VALUES ('a' || repeat('b', 62))",
        "INSERT INTO vantage_sync_state (resource, last_sync_status, records_synced, records_created, records_updated, started_at, completed_at, last_sync_time)
         VALUES ('capital_calls_2', 'success', 10, 4, 6, now() - interval '2 seconds', now(), now())",
        "INSERT INTO vantage_sync_state (resource, last_sync_status, started_at) VALUES ('running_one', 'running', now())",
        "INSERT INTO vantage_sync_state (resource, last_sync_status, errors, started_at, completed_at)
         VALUES ('failed_one', 'failed', '[{\"code\": \"HTTP_500\", \"message\": \"boom\"}]', now(), now())",
    ] {
        conn.execute(sql).await.unwrap_or_else(|error| panic!("{sql}: {error}"));
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM vantage_sync_state")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 7 + 5);
}

#[tokio::test]
async fn table_and_all_twelve_columns_are_commented() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let table: Option<String> = sqlx::query_scalar(
        "SELECT obj_description('public.vantage_sync_state'::regclass, 'pg_class')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(table.is_some_and(|comment| comment.len() > 20));
    let rows = sqlx::query(
        "SELECT a.attname::text, col_description(a.attrelid, a.attnum) FROM pg_attribute a
         WHERE a.attrelid = 'public.vantage_sync_state'::regclass AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY a.attnum",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), 12);
    for row in rows {
        let column: String = row.get(0);
        let comment: Option<String> = row.get(1);
        assert!(
            comment.is_some_and(|comment| comment.len() > 10),
            "column {column} has no comment"
        );
    }
}

#[tokio::test]
async fn indexes_have_the_contract_names_and_definitions() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT indexname::text, indexdef FROM pg_indexes
         WHERE schemaname = 'public' AND tablename = 'vantage_sync_state' ORDER BY indexname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let indexes: Vec<(String, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let expected = [
        (
            "idx_vantage_sync_duration",
            "CREATE INDEX idx_vantage_sync_duration ON public.vantage_sync_state USING btree (duration_ms DESC) WHERE (duration_ms IS NOT NULL)",
        ),
        (
            "idx_vantage_sync_last_time",
            "CREATE INDEX idx_vantage_sync_last_time ON public.vantage_sync_state USING btree (last_sync_time DESC NULLS LAST)",
        ),
        (
            "idx_vantage_sync_status",
            "CREATE INDEX idx_vantage_sync_status ON public.vantage_sync_state USING btree (last_sync_status) WHERE (last_sync_status <> 'success'::text)",
        ),
        (
            "vantage_sync_state_pkey",
            "CREATE UNIQUE INDEX vantage_sync_state_pkey ON public.vantage_sync_state USING btree (resource)",
        ),
    ]
    .map(|(name, def)| (name.to_owned(), def.to_owned()));
    assert_eq!(indexes, expected);
}

/// On a table of 20,000 rows the planner picks each index for the query it
/// exists for.
#[tokio::test]
async fn planner_uses_each_index_on_a_large_table() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    // Every 50th row failed, every 100th running, the rest succeeded with
    // varied times and durations.
    conn.execute(
        "INSERT INTO vantage_sync_state
             (resource, last_sync_status, last_sync_time, started_at, completed_at, errors)
         SELECT 'resource_' || i,
                CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 100 = 1 THEN 'running' ELSE 'success' END,
                CASE WHEN i % 50 = 0 OR i % 100 = 1 THEN NULL
                     ELSE now() - make_interval(secs => i * 7) END,
                now() - make_interval(secs => i * 7 + (i % 977)),
                CASE WHEN i % 100 = 1 THEN NULL ELSE now() - make_interval(secs => i * 7) END,
                '[]'
         FROM generate_series(1, 20000) AS i;
         ANALYZE vantage_sync_state;",
    )
    .await
    .unwrap();
    let cases = [
        (
            "SELECT * FROM vantage_sync_state WHERE last_sync_status = 'failed' ORDER BY completed_at DESC",
            "idx_vantage_sync_status",
        ),
        (
            "SELECT * FROM vantage_sync_state WHERE last_sync_status <> 'success'",
            "idx_vantage_sync_status",
        ),
        (
            "SELECT * FROM vantage_sync_state WHERE duration_ms IS NOT NULL ORDER BY duration_ms DESC LIMIT 5",
            "idx_vantage_sync_duration",
        ),
        (
            "SELECT * FROM vantage_sync_state ORDER BY last_sync_time DESC NULLS LAST LIMIT 10",
            "idx_vantage_sync_last_time",
        ),
        (
            "SELECT * FROM vantage_sync_state WHERE last_sync_time < now() - interval '38 hours' ORDER BY last_sync_time ASC NULLS FIRST LIMIT 10",
            "idx_vantage_sync_last_time",
        ),
        (
            "SELECT * FROM vantage_sync_state WHERE resource = 'resource_4242'",
            "vantage_sync_state_pkey",
        ),
    ];
    for (query, index) in cases {
        let plan: Value =
            sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {query}")))
                .fetch_one(&mut conn)
                .await
                .unwrap();
        let used = indexes_in_plan(&plan);
        assert!(
            used.iter().any(|used| used == index),
            "{query}: expected {index}, plan uses {used:?}\n{plan:#}"
        );
    }
}

fn indexes_in_plan(plan: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![plan];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(index)) = map.get("Index Name") {
                    found.push(index.clone());
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found
}

async fn table_snapshot(conn: &mut sqlx::PgConnection) -> Value {
    sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY resource), '[]') FROM vantage_sync_state s",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn triggers_have_the_contract_names_timing_and_functions() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger
         WHERE tgrelid = 'public.vantage_sync_state'::regclass AND NOT tgisinternal AND tgenabled = 'O'
         ORDER BY tgname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        triggers,
        [
            "CREATE TRIGGER trigger_calculate_vantage_sync_duration BEFORE INSERT OR UPDATE ON public.vantage_sync_state FOR EACH ROW EXECUTE FUNCTION calculate_vantage_sync_duration()",
            // Fires at commit, where the event log takes ids in commit order.
            "CREATE CONSTRAINT TRIGGER trigger_vantage_sync_state_notify AFTER INSERT OR DELETE OR UPDATE ON public.vantage_sync_state DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION notify_vantage_sync_state_change()",
            "CREATE TRIGGER trigger_vantage_sync_state_updated_at BEFORE UPDATE ON public.vantage_sync_state FOR EACH ROW EXECUTE FUNCTION update_vantage_sync_state_updated_at()",
        ]
    );
}

/// On the seven initial resources a full read and the aggregate statistics
/// are a plain sequential scan.
#[tokio::test]
async fn small_table_reads_are_sequential_scans() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    conn.execute("ANALYZE vantage_sync_state").await.unwrap();
    for query in [
        "SELECT * FROM vantage_sync_state",
        "SELECT count(*), count(*) FILTER (WHERE last_sync_status = 'failed'), sum(records_synced), avg(duration_ms), max(duration_ms) FROM vantage_sync_state",
    ] {
        let plan: Value =
            sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN (FORMAT JSON) {query}")))
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(plan.to_string().contains("\"Seq Scan\""), "{query}: {plan}");
        assert!(indexes_in_plan(&plan).is_empty(), "{query}: {plan}");
    }
}

/// With the initial resources the table is one page, and each B-tree index
/// with rows a metapage plus a leaf: this pins those sizes.
#[tokio::test]
async fn initial_table_and_indexes_stay_tiny() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT c.relname::text, pg_relation_size(c.oid) FROM pg_class c
         WHERE c.oid = 'public.vantage_sync_state'::regclass
            OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'public.vantage_sync_state'::regclass)
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let sizes: Vec<(String, i64)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(
        sizes,
        [
            ("idx_vantage_sync_duration".to_owned(), 8192),
            ("idx_vantage_sync_last_time".to_owned(), 16384),
            ("idx_vantage_sync_status".to_owned(), 16384),
            ("vantage_sync_state".to_owned(), 8192),
            ("vantage_sync_state_pkey".to_owned(), 16384),
        ]
    );
}
