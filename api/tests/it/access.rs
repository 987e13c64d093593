//! Grants, row level security and function privileges, per role.

use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection, Row, raw_sql};
use vantage_sync_testkit::{TestDb, sql_error};

const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Runs `sql` as `role` in a transaction that is rolled back afterwards.
async fn as_role(
    conn: &mut PgConnection,
    role: &str,
    sql: &str,
) -> Result<Vec<sqlx::postgres::PgRow>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    tx.execute(raw_sql(AssertSqlSafe(format!("SET LOCAL ROLE {role}"))))
        .await?;
    let result = sqlx::query(AssertSqlSafe(sql)).fetch_all(&mut *tx).await;
    tx.rollback().await?;
    result
}

const WRITES: [&str; 3] = [
    "INSERT INTO vantage_sync_state (resource) VALUES ('new_resource')",
    "UPDATE vantage_sync_state SET records_synced = 1 WHERE resource = 'accounts'",
    "DELETE FROM vantage_sync_state WHERE resource = 'accounts'",
];

const FUNCTION_CALLS: [&str; 3] = [
    "SELECT * FROM start_vantage_sync('accounts')",
    "SELECT * FROM complete_vantage_sync('accounts', 1, 0, 0)",
    "SELECT * FROM fail_vantage_sync('accounts', '[]')",
];

#[tokio::test]
async fn anon_reads_and_writes_nothing() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let read = as_role(&mut conn, "anon", "SELECT * FROM vantage_sync_state").await;
    assert_eq!(sql_error(read).0, INSUFFICIENT_PRIVILEGE);
    for sql in WRITES.iter().chain(&FUNCTION_CALLS) {
        assert_eq!(
            sql_error(as_role(&mut conn, "anon", sql).await).0,
            INSUFFICIENT_PRIVILEGE,
            "{sql}"
        );
    }
}

#[tokio::test]
async fn authenticated_reads_all_seven_rows_and_writes_nothing() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = as_role(
        &mut conn,
        "authenticated",
        "SELECT resource FROM vantage_sync_state ORDER BY resource",
    )
    .await
    .unwrap();
    let resources: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(
        resources,
        [
            "accounts",
            "cashflows",
            "commitments",
            "funds",
            "investments",
            "investors",
            "valuations"
        ]
    );
    for sql in WRITES.iter().chain(&FUNCTION_CALLS) {
        assert_eq!(
            sql_error(as_role(&mut conn, "authenticated", sql).await).0,
            INSUFFICIENT_PRIVILEGE,
            "{sql}"
        );
    }
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vantage_sync_state WHERE last_sync_status = 'never_run'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(count, 7, "a refused write changed a row");
}

#[tokio::test]
async fn service_role_reads_writes_and_calls_every_function() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let mut tx = conn.begin().await.unwrap();
    tx.execute("SET LOCAL ROLE service_role").await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM vantage_sync_state")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(count, 7);
    for sql in WRITES {
        let result = tx.execute(sql).await.unwrap();
        assert_eq!(result.rows_affected(), 1, "{sql}");
    }
    let mut statuses: Vec<String> = Vec::new();
    for sql in [
        "SELECT last_sync_status FROM start_vantage_sync('funds')",
        "SELECT last_sync_status FROM complete_vantage_sync('funds', 3, 1, 1)",
        "SELECT last_sync_status FROM start_vantage_sync('funds')",
        "SELECT last_sync_status FROM fail_vantage_sync('funds', '[{\"code\": \"X\", \"message\": \"y\"}]')",
    ] {
        statuses.push(sqlx::query_scalar(sql).fetch_one(&mut *tx).await.unwrap());
    }
    assert_eq!(statuses, ["running", "success", "running", "failed"]);
    tx.commit().await.unwrap();
}

/// RLS is really on: a role granted SELECT but named in no policy sees no
/// rows at all, and one granted INSERT is refused by the policy.
#[tokio::test]
async fn row_level_security_filters_roles_without_a_policy() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let role = format!("auditor_{}", db.name);
    conn.execute(raw_sql(AssertSqlSafe(format!(
        "CREATE ROLE {role} NOLOGIN"
    ))))
    .await
    .unwrap();
    conn.execute(raw_sql(AssertSqlSafe(format!(
        "GRANT SELECT, INSERT ON vantage_sync_state TO {role}"
    ))))
    .await
    .unwrap();
    let rows = as_role(&mut conn, &role, "SELECT * FROM vantage_sync_state")
        .await
        .unwrap();
    let insert = as_role(&mut conn, &role, WRITES[0]).await;
    conn.execute(raw_sql(AssertSqlSafe(format!(
        "REVOKE ALL ON vantage_sync_state FROM {role}; DROP ROLE {role}"
    ))))
    .await
    .unwrap();
    assert!(
        rows.is_empty(),
        "RLS let a role without a policy read {} rows",
        rows.len()
    );
    assert_eq!(sql_error(insert).0, INSUFFICIENT_PRIVILEGE);
}

#[tokio::test]
async fn rls_is_enabled_with_exactly_the_four_policies() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let enabled: bool = sqlx::query_scalar(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'public.vantage_sync_state'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(enabled);
    let rows = sqlx::query(
        "SELECT policyname::text, cmd::text, roles::text[], coalesce(qual, ''), coalesce(with_check, '')
         FROM pg_policies WHERE schemaname = 'public' AND tablename = 'vantage_sync_state' ORDER BY policyname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let policies: Vec<(String, String, Vec<String>, String, String)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect();
    let expected = [
        (
            "vantage_sync_state_delete_service",
            "DELETE",
            vec!["service_role"],
            "true",
            "",
        ),
        (
            "vantage_sync_state_insert_service",
            "INSERT",
            vec!["service_role"],
            "",
            "true",
        ),
        (
            "vantage_sync_state_select_all",
            "SELECT",
            vec!["authenticated", "service_role"],
            "true",
            "",
        ),
        (
            "vantage_sync_state_update_service",
            "UPDATE",
            vec!["service_role"],
            "true",
            "true",
        ),
    ]
    .map(|(name, cmd, roles, qual, check)| {
        (
            name.to_owned(),
            cmd.to_owned(),
            roles.into_iter().map(str::to_owned).collect(),
            qual.to_owned(),
            check.to_owned(),
        )
    });
    assert_eq!(policies, expected);
}

#[tokio::test]
async fn table_grants_are_exactly_the_contract() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT coalesce(r.rolname, 'PUBLIC')::text, a.privilege_type::text
         FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
         WHERE c.oid = 'public.vantage_sync_state'::regclass AND a.grantee <> c.relowner
         ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let grants: Vec<(String, String)> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    let expected = [
        ("authenticated", "SELECT"),
        ("service_role", "DELETE"),
        ("service_role", "INSERT"),
        ("service_role", "SELECT"),
        ("service_role", "UPDATE"),
    ]
    .map(|(role, privilege)| (role.to_owned(), privilege.to_owned()));
    assert_eq!(grants, expected);
}

#[tokio::test]
async fn roles_exist_and_cannot_log_in() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT rolname::text, rolcanlogin, rolsuper, rolbypassrls FROM pg_roles
         WHERE rolname IN ('anon', 'authenticated', 'service_role') ORDER BY rolname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let roles: Vec<(String, bool, bool, bool)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    assert_eq!(
        roles,
        [
            ("anon".to_owned(), false, false, false),
            ("authenticated".to_owned(), false, false, false),
            ("service_role".to_owned(), false, false, false),
        ]
    );
}

/// Hardening: every function pins an empty search_path, and PUBLIC's
/// default EXECUTE is taken back, so only the roles named may run them.
#[tokio::test]
async fn functions_pin_search_path_and_only_service_role_executes_them() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT p.proname::text, p.prosecdef, coalesce(p.proconfig, '{}')::text[],
                has_function_privilege('anon', p.oid, 'EXECUTE'),
                has_function_privilege('authenticated', p.oid, 'EXECUTE'),
                has_function_privilege('service_role', p.oid, 'EXECUTE'),
                EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a WHERE a.grantee = 0)
         FROM pg_proc p
         WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE '%vantage%'
         ORDER BY p.proname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    type Function = (String, bool, Vec<String>, bool, bool, bool, bool);
    let functions: Vec<Function> = rows
        .iter()
        .map(|row| {
            (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
                row.get(6),
            )
        })
        .collect();
    let pinned = vec!["search_path=\"\"".to_owned()];
    let expected = [
        ("advance_vantage_sync_notifications", true, true),
        ("calculate_vantage_sync_duration", false, false),
        ("claim_vantage_idempotency_key", true, true),
        ("claim_vantage_webhook_deliveries", true, true),
        ("complete_vantage_sync", true, true),
        ("create_vantage_webhook", true, true),
        ("delete_vantage_webhook", true, true),
        ("fail_vantage_sync", true, true),
        // Writes the event log, which no caller role may write.
        ("notify_vantage_sync_state_change", true, false),
        ("ping_vantage_webhook", true, true),
        ("prune_vantage_idempotency_keys", true, true),
        ("prune_vantage_sync_events", true, true),
        ("record_vantage_idempotent_answer", true, true),
        // Called by record_vantage_webhook_attempts, one attempt each.
        ("record_vantage_webhook_attempt", true, false),
        ("record_vantage_webhook_attempts", true, true),
        ("start_vantage_sync", true, true),
        ("update_vantage_sync_state_updated_at", false, false),
        // The alert rules and their parts: called only by the functions
        // above.
        ("vantage_sync_alerts_holding", false, false),
        ("vantage_sync_failure_streak", false, false),
        // Keeps a writer's traceparent with its event, which no caller
        // role may write.
        ("vantage_sync_keep_event_trace", true, false),
        ("vantage_sync_notification_traces", true, true),
        ("vantage_sync_notify", true, false),
        ("vantage_sync_settle_alerts", true, false),
    ]
    .map(|(name, definer, service)| {
        (
            name.to_owned(),
            definer,
            pinned.clone(),
            false,
            false,
            service,
            false,
        )
    });
    assert_eq!(functions, expected);
}

/// A pinned search_path means a caller's own objects cannot hijack the
/// SECURITY DEFINER functions: a shadowing `now()` in a schema first on
/// the caller's path is ignored.
#[tokio::test]
async fn a_hostile_search_path_cannot_hijack_the_functions() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    conn.execute(
        "CREATE SCHEMA hostile;
         CREATE FUNCTION hostile.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2000-01-01'::timestamptz $$;
         GRANT USAGE ON SCHEMA hostile TO service_role;
         GRANT EXECUTE ON FUNCTION hostile.now() TO service_role;",
    )
    .await
    .unwrap();
    let mut tx = conn.begin().await.unwrap();
    tx.execute("SET LOCAL ROLE service_role; SET LOCAL search_path = hostile, pg_catalog, public")
        .await
        .unwrap();
    let year: f64 = sqlx::query_scalar(
        "SELECT extract(year FROM started_at)::float8 FROM public.start_vantage_sync('accounts')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        year > 2020.0,
        "the function used the caller's now(): year {year}"
    );
}

/// The event log is read-only for the API roles and invisible to anon.
#[tokio::test]
async fn the_event_log_is_written_only_by_its_trigger() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    conn.execute("SELECT start_vantage_sync('accounts')")
        .await
        .unwrap();
    for role in ["authenticated", "service_role"] {
        let rows = as_role(
            &mut conn,
            role,
            "SELECT resource, operation FROM vantage_sync_events",
        )
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{role}");
        for sql in [
            "INSERT INTO vantage_sync_events (resource, operation, state) VALUES ('x', 'INSERT', '{}')",
            "UPDATE vantage_sync_events SET resource = 'x'",
            "DELETE FROM vantage_sync_events",
            "UPDATE vantage_sync_events_pruned SET through = 99",
        ] {
            assert_eq!(
                sql_error(as_role(&mut conn, role, sql).await).0,
                INSUFFICIENT_PRIVILEGE,
                "{role}: {sql}"
            );
        }
    }
    let read = as_role(&mut conn, "anon", "SELECT * FROM vantage_sync_events").await;
    assert_eq!(sql_error(read).0, INSUFFICIENT_PRIVILEGE);
    // The trigger writes it for every role allowed to change the state.
    let rows = as_role(
        &mut conn,
        "service_role",
        "SELECT * FROM start_vantage_sync('funds')",
    )
    .await;
    assert!(rows.is_ok());
}
