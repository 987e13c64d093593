//! The migration: up, down, up again; idempotent up SQL; complete down SQL.

use serde_json::Value;
use sqlx::{AssertSqlSafe, Executor, PgConnection, raw_sql};
use vantage_sync_testkit::{TestDb, assert_same_json};

/// Everything the migration creates, as text: table, columns, constraints,
/// indexes, comments, grants, policies, triggers, functions with their
/// privileges and settings, roles, and the rows themselves.
async fn schema_snapshot(conn: &mut PgConnection) -> Value {
    sqlx::query_scalar(
        r#"SELECT jsonb_build_object(
            'table', (SELECT jsonb_build_object('acl', relacl::text, 'rls', relrowsecurity,
                        'comment', obj_description(oid, 'pg_class'))
                      FROM pg_class WHERE oid = to_regclass('public.vantage_sync_state')),
            'columns', (SELECT jsonb_agg(jsonb_build_object('name', attname, 'type', format_type(atttypid, atttypmod),
                          'not_null', attnotnull, 'default', pg_get_expr(d.adbin, d.adrelid),
                          'comment', col_description(attrelid, attnum)) ORDER BY attnum)
                        FROM pg_attribute LEFT JOIN pg_attrdef d ON d.adrelid = attrelid AND d.adnum = attnum
                        WHERE attrelid = to_regclass('public.vantage_sync_state') AND attnum > 0 AND NOT attisdropped),
            'constraints', (SELECT jsonb_agg(conname || ': ' || pg_get_constraintdef(oid) ORDER BY conname)
                            FROM pg_constraint WHERE conrelid = to_regclass('public.vantage_sync_state')),
            'indexes', (SELECT jsonb_agg(indexdef ORDER BY indexname) FROM pg_indexes
                        WHERE schemaname = 'public' AND tablename = 'vantage_sync_state'),
            'policies', (SELECT jsonb_agg(to_jsonb(p) ORDER BY policyname) FROM pg_policies p
                         WHERE schemaname = 'public' AND tablename = 'vantage_sync_state'),
            'triggers', (SELECT jsonb_agg(pg_get_triggerdef(oid) || ' enabled=' || tgenabled::text ORDER BY tgname)
                         FROM pg_trigger WHERE tgrelid = to_regclass('public.vantage_sync_state') AND NOT tgisinternal),
            'functions', (SELECT jsonb_agg(jsonb_build_object('def', pg_get_functiondef(oid), 'acl', proacl::text)
                            ORDER BY proname)
                          FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND proname LIKE '%vantage%'),
            'roles', (SELECT jsonb_agg(rolname ORDER BY rolname) FROM pg_roles
                      WHERE rolname IN ('anon', 'authenticated', 'service_role')),
            'rows', (SELECT jsonb_agg(to_jsonb(s) ORDER BY resource) FROM public.vantage_sync_state s)
        )"#,
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

async fn objects_left(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT 'table ' || relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relname LIKE '%vantage%'
         UNION ALL
         SELECT 'function ' || proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND proname LIKE '%vantage%'
         UNION ALL
         SELECT 'policy ' || policyname FROM pg_policies WHERE policyname LIKE '%vantage%'
         UNION ALL
         SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname LIKE '%vantage%'",
    )
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn up_down_up_again() {
    let db = TestDb::empty().await;
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    let mut conn = db.connect().await;
    use migration::MigratorTrait;

    migration::Migrator::up(&orm, None).await.unwrap();
    let first = schema_snapshot(&mut conn).await;
    assert_eq!(first["rows"].as_array().map(Vec::len), Some(7));
    assert_eq!(first["policies"].as_array().map(Vec::len), Some(4));
    // 7 of the state table and event log, 11 of alerts and webhooks, 3 of
    // idempotency keys, 2 of event traces.
    assert_eq!(first["functions"].as_array().map(Vec::len), Some(23));

    migration::Migrator::down(&orm, None).await.unwrap();
    assert_eq!(objects_left(&mut conn).await, Vec::<String>::new());
    let roles: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(roles, 3, "the down migration must keep the roles");

    migration::Migrator::up(&orm, None).await.unwrap();
    let mut again = schema_snapshot(&mut conn).await;
    // Timestamps of the re-inserted initial resources differ; everything
    // else must not.
    strip_row_times(&mut again);
    let mut first = first;
    strip_row_times(&mut first);
    assert_same_json(&again, &first);
}

fn strip_row_times(snapshot: &mut Value) {
    if let Some(rows) = snapshot["rows"].as_array_mut() {
        for row in rows {
            if let Some(row) = row.as_object_mut() {
                row.remove("created_at");
                row.remove("updated_at");
            }
        }
    }
}

/// Idempotent operations: the printed up SQL applied again to a migrated
/// database that has been used succeeds and changes nothing, data included.
#[tokio::test]
async fn printed_up_sql_applied_again_changes_nothing() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    conn.execute(
        "SELECT start_vantage_sync('accounts');
         SELECT complete_vantage_sync('accounts', 10, 4, 5);
         SELECT start_vantage_sync('funds');
         SELECT fail_vantage_sync('funds', '[{\"code\": \"E\", \"message\": \"m\"}]');
         SELECT start_vantage_sync('distributions');
         DELETE FROM vantage_sync_state WHERE resource = 'valuations';",
    )
    .await
    .unwrap();
    let before = schema_snapshot(&mut conn).await;
    raw_sql(AssertSqlSafe(migration::up_sql()))
        .execute(&mut conn)
        .await
        .unwrap();
    let after = schema_snapshot(&mut conn).await;
    assert_same_json(&after, &before);
    // Twice more, for good measure: still nothing changes.
    raw_sql(AssertSqlSafe(migration::up_sql()))
        .execute(&mut conn)
        .await
        .unwrap();
    assert_same_json(&schema_snapshot(&mut conn).await, &before);
}

/// The printed SQL alone builds the same schema as the migrator, and the
/// printed down SQL removes all of it.
#[tokio::test]
async fn printed_sql_builds_and_removes_the_same_schema() {
    let migrated = TestDb::migrated().await;
    let mut reference = migrated.connect().await;
    let db = TestDb::empty().await;
    let mut conn = db.connect().await;
    raw_sql(AssertSqlSafe(migration::up_sql()))
        .execute(&mut conn)
        .await
        .unwrap();
    let mut printed = schema_snapshot(&mut conn).await;
    let mut expected = schema_snapshot(&mut reference).await;
    strip_row_times(&mut printed);
    strip_row_times(&mut expected);
    assert_same_json(&printed, &expected);

    raw_sql(AssertSqlSafe(migration::down_sql()))
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(objects_left(&mut conn).await, Vec::<String>::new());
}

#[tokio::test]
async fn printed_sql_is_one_transaction_without_nested_ones() {
    for sql in [migration::up_sql(), migration::down_sql()] {
        assert!(sql.starts_with("BEGIN;\n"));
        assert!(sql.ends_with("\nCOMMIT;\n"));
        let inner = &sql["BEGIN;\n".len()..sql.len() - "COMMIT;\n".len()];
        assert!(!inner.contains("BEGIN;") && !inner.contains("COMMIT;"));
    }
}

/// A failing statement rolls the whole migration back: nothing half-made.
#[tokio::test]
async fn a_failed_up_leaves_nothing_behind() {
    let db = TestDb::empty().await;
    let mut conn = db.connect().await;
    // A conflicting object makes the migration fail part-way through.
    conn.execute("CREATE FUNCTION public.fail_vantage_sync(text, jsonb) RETURNS int LANGUAGE sql AS 'SELECT 1'")
        .await
        .unwrap();
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    use migration::MigratorTrait;
    assert!(migration::Migrator::up(&orm, None).await.is_err());
    assert_eq!(
        objects_left(&mut conn).await,
        ["function fail_vantage_sync"]
    );
    let applied = migration::Migrator::get_applied_migrations(&orm)
        .await
        .unwrap();
    assert!(applied.is_empty());
}

/// Zero-downtime rules: the state table's migration creates and alters,
/// never drops; the event log's replaces one trigger (no data) and
/// drops nothing else. Names keep the `mYYYYMMDD_HHMMSS_name` order.
#[tokio::test]
async fn up_sql_drops_nothing_and_migrations_are_named_by_time() {
    for script in migration::SCRIPTS {
        let code: String = script
            .up
            .lines()
            .map(|line| line.split("--").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
            .to_uppercase();
        let allowed = usize::from(
            script.name.ends_with("vantage_sync_events")
                && code.contains("DROP TRIGGER IF EXISTS TRIGGER_VANTAGE_SYNC_STATE_NOTIFY"),
        );
        assert_eq!(
            code.matches("DROP ").count(),
            allowed,
            "{} up SQL drops something",
            script.name
        );
        let (date, rest) = script.name[1..].split_at(8);
        assert!(
            script.name.starts_with('m') && date.chars().all(|c| c.is_ascii_digit()),
            "{}",
            script.name
        );
        assert!(
            rest.starts_with('_') && rest[1..7].chars().all(|c| c.is_ascii_digit()),
            "{}",
            script.name
        );
    }
    let mut names: Vec<&str> = migration::SCRIPTS
        .iter()
        .map(|script| script.name)
        .collect();
    let in_order = names.clone();
    names.sort();
    assert_eq!(names, in_order);
}

/// Applying the up SQL over a drifted schema brings the policies and
/// grants back to the contract (e.g. a select policy for authenticated only,
/// or a stray grant to anon).
#[tokio::test]
async fn up_sql_converges_a_drifted_schema() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let expected = schema_snapshot(&mut conn).await;
    conn.execute(
        "ALTER POLICY vantage_sync_state_select_all ON vantage_sync_state TO authenticated;
         ALTER POLICY vantage_sync_state_update_service ON vantage_sync_state USING (false);
         GRANT ALL ON vantage_sync_state TO anon;
         GRANT EXECUTE ON FUNCTION start_vantage_sync(text, boolean) TO PUBLIC;",
    )
    .await
    .unwrap();
    assert_ne!(schema_snapshot(&mut conn).await, expected);
    raw_sql(AssertSqlSafe(migration::up_sql()))
        .execute(&mut conn)
        .await
        .unwrap();
    assert_same_json(&schema_snapshot(&mut conn).await, &expected);
}

/// Reverting the newest migrations gives back exactly the schema before
/// them, for every point in the list: reverting the event log's indexes
/// gives back the event log, and reverting the event log too gives back
/// the first migration's schema (the change trigger notifies again without
/// logging).
#[tokio::test]
async fn reverting_migrations_restores_the_schema_before_them() {
    use migration::MigratorTrait;
    let db = TestDb::empty().await;
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    let mut conn = db.connect().await;
    let count = u32::try_from(migration::SCRIPTS.len()).unwrap();
    for applied in 1..count {
        migration::Migrator::up(&orm, Some(applied)).await.unwrap();
        let mut before = schema_snapshot(&mut conn).await;
        migration::Migrator::up(&orm, None).await.unwrap();
        migration::Migrator::down(&orm, Some(count - applied))
            .await
            .unwrap();
        let mut reverted = schema_snapshot(&mut conn).await;
        strip_row_times(&mut before);
        strip_row_times(&mut reverted);
        assert_same_json(&reverted, &before);
        migration::Migrator::down(&orm, None).await.unwrap();
    }
    migration::Migrator::up(&orm, Some(1)).await.unwrap();
    let left: Vec<String> = objects_left(&mut conn)
        .await
        .into_iter()
        .filter(|object| object.contains("events"))
        .collect();
    assert_eq!(left, Vec::<String>::new());
}

/// A migration counts as applied when its marker relation exists, whoever
/// applied it: `migrate up` (recorded in `seaql_migrations`) or the printed
/// SQL through another tool (recorded nowhere).
#[tokio::test]
async fn applied_migrations_are_told_by_their_markers() {
    use migration::MigratorTrait;
    use vantage_sync::db::migrate::{self, MigrationState};
    let names: Vec<String> = migration::SCRIPTS
        .iter()
        .map(|script| script.name.to_owned())
        .collect();
    let db = TestDb::empty().await;
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    let pool = db.pool(1).await;
    for applied in 0..=names.len() {
        if applied > 0 {
            migration::Migrator::up(&orm, Some(1)).await.unwrap();
        }
        let state = migrate::state(&pool).await.unwrap();
        assert_eq!(
            state,
            MigrationState {
                applied: names[..applied].to_vec(),
                pending: names[applied..].to_vec(),
                // No table of versions until the first `migrate up`.
                unknown: (applied > 0).then(Vec::new),
            }
        );
    }
    // A version this binary does not know (a newer release's).
    let mut conn = db.connect().await;
    sqlx::raw_sql(
        "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m29990101_000000_later', 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let state = migrate::state(&pool).await.unwrap();
    assert_eq!(
        state.unknown,
        Some(vec!["m29990101_000000_later".to_owned()])
    );

    // The printed SQL, applied by another tool: everything applied, and
    // no table of versions to compare with.
    let printed = TestDb::empty().await;
    let mut conn = printed.connect().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(migration::up_sql()))
        .execute(&mut conn)
        .await
        .unwrap();
    let state = migrate::state(&printed.pool(1).await).await.unwrap();
    assert_eq!(state.applied, names);
    assert_eq!(state.pending, Vec::<String>::new());
    assert_eq!(state.unknown, None);
}

/// A migration outside a transaction, as one that builds an index with
/// `CREATE INDEX CONCURRENTLY` must be: its statements go one at a time
/// (sent together they would share an implicit transaction, which
/// PostgreSQL refuses), and its down removes what it made.
#[tokio::test]
async fn a_migration_outside_a_transaction_builds_indexes_concurrently() {
    let db = TestDb::migrated().await;
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    let script = migration::SqlScript {
        name: "m29990101_000000_concurrent_indexes",
        up: "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_test_events_xid ON public.vantage_sync_events (xid);\n\
             -- a second one, so the statements must go one at a time\n\
             CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_test_events_status ON public.vantage_sync_events (status);\n",
        down: "DROP INDEX CONCURRENTLY IF EXISTS public.idx_test_events_status;\n\
               DROP INDEX CONCURRENTLY IF EXISTS public.idx_test_events_xid;\n",
        marker: "public.idx_test_events_xid",
        transactional: false,
    };
    let whole = sea_orm::ConnectionTrait::execute_unprepared(&orm, script.up).await;
    assert!(
        whole.is_err(),
        "sent whole, the statements would share a transaction"
    );
    migration::execute(&orm, &script, script.up).await.unwrap();
    let mut conn = db.connect().await;
    let valid: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relname LIKE 'idx_test_events_%' ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        valid,
        [
            ("idx_test_events_status".to_owned(), true),
            ("idx_test_events_xid".to_owned(), true)
        ]
    );
    // Run again after a failure (or twice): nothing changes.
    migration::execute(&orm, &script, script.up).await.unwrap();
    migration::execute(&orm, &script, script.down)
        .await
        .unwrap();
    let (left,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM pg_class WHERE relname LIKE 'idx_test_events_%'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(left, 0);
}
