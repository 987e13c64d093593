//! GraphQL mutations: transitions through the database functions, every
//! error code from a real request, and bad input changing nothing.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use vantage_sync::auth::{Caller, Role};
use vantage_sync::db::{Access, RequestDb, sync_states};
use vantage_sync::error::ApiError;
use vantage_sync_testkit::{TestApp, state_row};

async fn table(conn: &mut PgConnection) -> Value {
    sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(to_jsonb(s) ORDER BY resource), '[]') FROM vantage_sync_state s",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

const STATE: &str =
    "resource lastSyncStatus recordsSynced recordsCreated recordsUpdated errorCount completedAt";

#[tokio::test]
async fn start_complete_fail_cycle_matches_the_database() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    let start = app
        .query(
            "service_role",
            &format!(
                "mutation {{ startSync(resource: \"accounts\") {{ {STATE} runningSeconds }} }}"
            ),
            json!({}),
        )
        .await;
    assert_eq!(
        start,
        json!({"data": {"startSync": {"resource": "accounts", "lastSyncStatus": "RUNNING", "recordsSynced": 0,
            "recordsCreated": 0, "recordsUpdated": 0, "errorCount": 0, "completedAt": null, "runningSeconds": 0}}})
    );
    let complete = app
        .query(
            "service_role",
            &format!("mutation {{ completeSync(resource: \"accounts\", recordsSynced: 100, recordsCreated: 10, recordsUpdated: 90) {{ {STATE} lastSyncTime durationMs }} }}"),
            json!({}),
        )
        .await;
    let state = &complete["data"]["completeSync"];
    assert_eq!(state["lastSyncStatus"], "SUCCESS");
    assert_eq!(
        (
            &state["recordsSynced"],
            &state["recordsCreated"],
            &state["recordsUpdated"]
        ),
        (&json!(100), &json!(10), &json!(90))
    );
    assert_eq!(state["lastSyncTime"], state["completedAt"]);
    let db_row = state_row(&mut conn, "accounts").await;
    assert_eq!(db_row["last_sync_status"], "success");
    assert_eq!(db_row["duration_ms"], state["durationMs"]);

    app.query(
        "service_role",
        "mutation { startSync(resource: \"accounts\") { resource } }",
        json!({}),
    )
    .await;
    let failed = app
        .query(
            "service_role",
            "mutation($errors: [SyncErrorInput!]!) { failSync(resource: \"accounts\", errors: $errors) { lastSyncStatus lastSyncTime errorCount errors { code message recordId timestamp details } } }",
            json!({"errors": [
                {"code": "HTTP_500", "message": "upstream", "recordId": "acc-9", "timestamp": "2025-11-05T13:28:40Z", "details": {"status": 500}},
                {"code": "VALIDATION", "message": "bad currency"}
            ]}),
        )
        .await;
    let state = &failed["data"]["failSync"];
    assert_eq!(state["lastSyncStatus"], "FAILED");
    assert_eq!(state["errorCount"], 2);
    assert_eq!(
        state["lastSyncTime"], complete["data"]["completeSync"]["lastSyncTime"],
        "a failure must not move the watermark"
    );
    // Stored in the column in its canonical camelCase shape.
    assert_eq!(
        state_row(&mut conn, "accounts").await["errors"],
        json!([
            {"code": "HTTP_500", "message": "upstream", "recordId": "acc-9", "timestamp": "2025-11-05T13:28:40Z", "details": {"status": 500}},
            {"code": "VALIDATION", "message": "bad currency"}
        ])
    );
}

/// A transition made over GraphQL and one made by SQL meet the same state
/// machine: GraphQL sees what SQL did, and vice versa.
#[tokio::test]
async fn graphql_and_sql_share_one_state_machine() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    conn.execute("SELECT start_vantage_sync('funds')")
        .await
        .unwrap();
    let body = app
        .query(
            "service_role",
            "mutation { startSync(resource: \"funds\") { resource } }",
            json!({}),
        )
        .await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "ALREADY_RUNNING");
    app.query(
        "service_role",
        "mutation { completeSync(resource: \"funds\", recordsSynced: 1, recordsCreated: 1, recordsUpdated: 0) { resource } }",
        json!({}),
    )
    .await;
    let refused = sqlx::query("SELECT complete_vantage_sync('funds', 1, 0, 0)")
        .execute(&mut conn)
        .await;
    assert_eq!(vantage_sync_testkit::sql_error(refused).0, "VS002");
}

#[tokio::test]
async fn register_and_remove_resources() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    let body = app
        .query("service_role", "mutation { registerResource(resource: \"distributions\") { resource lastSyncStatus health } }", json!({}))
        .await;
    assert_eq!(
        body,
        json!({"data": {"registerResource": {"resource": "distributions", "lastSyncStatus": "NEVER_RUN", "health": "YELLOW"}}})
    );
    assert_eq!(
        state_row(&mut conn, "distributions").await["last_sync_status"],
        "never_run"
    );
    let body = app
        .query(
            "service_role",
            "mutation { removeResource(resource: \"distributions\") { resource lastSyncStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body,
        json!({"data": {"removeResource": {"resource": "distributions", "lastSyncStatus": "NEVER_RUN"}}})
    );
    assert_eq!(state_row(&mut conn, "distributions").await, Value::Null);
}

/// Every refusal: the code the contract names, from a real request, and the
/// table exactly as it was.
#[tokio::test]
async fn every_error_code_and_nothing_changes() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    conn.execute("SELECT start_vantage_sync('cashflows')")
        .await
        .unwrap();
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"code": "E", "message": format!("error {i}")}))
        .collect();
    let too_big: Vec<Value> = (0..300)
        .map(|_| json!({"code": "E", "message": "x".repeat(1000)}))
        .collect();
    let fail = "mutation($errors: [SyncErrorInput!]!) { failSync(resource: \"cashflows\", errors: $errors) { resource } }";
    let complete = |synced: i32, created: i32, updated: i32| {
        format!(
            "mutation {{ completeSync(resource: \"cashflows\", recordsSynced: {synced}, recordsCreated: {created}, recordsUpdated: {updated}) {{ resource }} }}"
        )
    };
    let cases: Vec<(Option<&str>, String, Value, Value)> = vec![
        (Some("service_role"), "mutation { startSync(resource: \"cashflows\") { resource } }".into(), json!({}), json!({"code": "ALREADY_RUNNING"})),
        (Some("service_role"), "mutation { completeSync(resource: \"accounts\", recordsSynced: 1, recordsCreated: 0, recordsUpdated: 0) { resource } }".into(), json!({}), json!({"code": "NOT_RUNNING"})),
        (Some("service_role"), "mutation { failSync(resource: \"accounts\", errors: []) { resource } }".into(), json!({}), json!({"code": "NOT_RUNNING"})),
        (Some("service_role"), "mutation { completeSync(resource: \"ghost\", recordsSynced: 1, recordsCreated: 0, recordsUpdated: 0) { resource } }".into(), json!({}), json!({"code": "NOT_FOUND"})),
        (Some("service_role"), "mutation { failSync(resource: \"ghost\", errors: []) { resource } }".into(), json!({}), json!({"code": "NOT_FOUND"})),
        (Some("service_role"), "mutation { removeResource(resource: \"ghost\") { resource } }".into(), json!({}), json!({"code": "NOT_FOUND"})),
        (Some("service_role"), "mutation { registerResource(resource: \"accounts\") { resource } }".into(), json!({}), json!({"code": "ALREADY_EXISTS"})),
        (Some("service_role"), "mutation { startSync(resource: \"Bad-Name\") { resource } }".into(), json!({}), json!({"code": "BAD_USER_INPUT", "field": "resource"})),
        (Some("service_role"), "mutation { registerResource(resource: \"\") { resource } }".into(), json!({}), json!({"code": "BAD_USER_INPUT", "field": "resource"})),
        (Some("service_role"), complete(-1, 0, 0), json!({}), json!({"code": "BAD_USER_INPUT", "field": "recordsSynced"})),
        (Some("service_role"), complete(5, -1, 0), json!({}), json!({"code": "BAD_USER_INPUT", "field": "recordsCreated"})),
        (Some("service_role"), complete(5, 0, -1), json!({}), json!({"code": "BAD_USER_INPUT", "field": "recordsUpdated"})),
        (Some("service_role"), complete(10, 6, 5), json!({}), json!({"code": "BAD_USER_INPUT", "field": "recordsSynced"})),
        (Some("service_role"), fail.into(), json!({"errors": too_many}), json!({"code": "BAD_USER_INPUT", "field": "errors"})),
        (Some("service_role"), fail.into(), json!({"errors": too_big}), json!({"code": "BAD_USER_INPUT", "field": "errors"})),
        (Some("service_role"), fail.into(), json!({"errors": [{"code": " ", "message": "m"}]}), json!({"code": "BAD_USER_INPUT", "field": "errors"})),
        (Some("service_role"), fail.into(), json!({"errors": [{"code": "E", "message": "m", "timestamp": "yesterday"}]}), json!({"code": "BAD_USER_INPUT"})),
        // Beyond GraphQL's 32-bit Int.
        (Some("service_role"), complete(0, 0, 0).replace("recordsSynced: 0", "recordsSynced: 3000000000"), json!({}), json!({"code": "BAD_USER_INPUT"})),
        (Some("authenticated"), "mutation { startSync(resource: \"accounts\") { resource } }".into(), json!({}), json!({"code": "FORBIDDEN"})),
        (Some("authenticated"), "mutation { removeResource(resource: \"accounts\") { resource } }".into(), json!({}), json!({"code": "FORBIDDEN"})),
        (None, "mutation { registerResource(resource: \"new_one\") { resource } }".into(), json!({}), json!({"code": "UNAUTHENTICATED"})),
        // The role check comes before argument checks.
        (None, complete(-1, 0, 0), json!({}), json!({"code": "UNAUTHENTICATED"})),
        (Some("authenticated"), complete(-1, 0, 0), json!({}), json!({"code": "FORBIDDEN"})),
    ];
    let before = table(&mut conn).await;
    for (role, query, variables, extensions) in cases {
        let (status, body) = app.graphql(role, &query, variables).await;
        assert_eq!(status, StatusCode::OK, "{query}");
        let errors = body["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{query}: no errors in {body}"));
        assert_eq!(errors.len(), 1, "{query}: {body}");
        assert_eq!(errors[0]["extensions"], extensions, "{query}: {body}");
        let message = errors[0]["message"].as_str().unwrap();
        for leak in [
            "SQL",
            "sqlx",
            "sea_orm",
            "violates",
            "constraint",
            "pg_",
            "Execution Error",
            "Query Error",
        ] {
            assert!(
                !message.contains(leak),
                "{query}: message leaks internals: {message}"
            );
        }
        assert_eq!(table(&mut conn).await, before, "{query} changed the table");
    }
}

/// Mutations run in order, each in a savepoint: a refused one neither
/// undoes nor blocks the ones around it.
#[tokio::test]
async fn one_refused_mutation_does_not_undo_the_others() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    let body = app
        .query(
            "service_role",
            "mutation { a: startSync(resource: \"accounts\") { lastSyncStatus }
                        b: startSync(resource: \"accounts\") { lastSyncStatus }
                        c: completeSync(resource: \"accounts\", recordsSynced: 5, recordsCreated: 5, recordsUpdated: 0) { lastSyncStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(body["data"]["a"], json!({"lastSyncStatus": "RUNNING"}));
    assert_eq!(body["data"]["c"], json!({"lastSyncStatus": "SUCCESS"}));
    assert_eq!(body["errors"][0]["path"], json!(["b"]));
    assert_eq!(body["errors"][0]["extensions"]["code"], "ALREADY_RUNNING");
    assert_eq!(state_row(&mut conn, "accounts").await["records_synced"], 5);
}

#[tokio::test]
async fn force_restarts_a_running_sync() {
    let app = TestApp::spawn().await;
    app.query(
        "service_role",
        "mutation { startSync(resource: \"funds\") { resource } }",
        json!({}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let body = app
        .query(
            "service_role",
            "mutation { startSync(resource: \"funds\", force: true) { lastSyncStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body,
        json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}}})
    );
}

/// Defence in depth: with the GraphQL guard bypassed, a write attempted in
/// a request transaction running as `authenticated` is refused by
/// PostgreSQL itself (grants and RLS), and changes nothing.
#[tokio::test]
async fn the_database_refuses_writes_when_the_guard_is_bypassed() {
    let app = TestApp::spawn().await;
    let mut conn = app.db.connect().await;
    let before = table(&mut conn).await;
    let pool = vantage_sync::db::connect(&app.db.url, 2).await.unwrap();
    let caller = Caller::for_role(Role::Authenticated);
    for attempt in 0..3 {
        let db = RequestDb::new(
            pool.clone(),
            caller.identity(),
            Access::Write,
            Duration::from_secs(5),
        );
        let result = {
            let txn = db.txn().await.unwrap();
            match attempt {
                0 => sync_states::start(&*txn, "accounts", false).await,
                1 => sync_states::register(&*txn, "sneaky").await,
                _ => sync_states::remove(&*txn, "accounts")
                    .await
                    .map(|row| row.unwrap()),
            }
        };
        let error = result.expect_err("the database let authenticated write");
        assert!(
            matches!(
                ApiError::from_db(error, "accounts"),
                ApiError::Forbidden { .. }
            ),
            "attempt {attempt}"
        );
        drop(db);
    }
    // And reads in such a transaction really run as that role.
    let db = RequestDb::new(
        pool.clone(),
        caller.identity(),
        Access::Read,
        Duration::from_secs(5),
    );
    let role: Option<String> = {
        use sea_orm::{ConnectionTrait, DbBackend, Statement};
        let txn = db.txn().await.unwrap();
        txn.query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT current_user::text AS r, current_setting('request.jwt.claims') AS c",
        ))
        .await
        .unwrap()
        .map(|row| row.try_get::<String>("", "r").unwrap())
    };
    assert_eq!(role.as_deref(), Some("authenticated"));
    assert_eq!(table(&mut conn).await, before);
}

/// The README's setup for a hosted database: a plain login role, granted
/// the three API roles and nothing else, is all the server needs.
#[tokio::test]
async fn a_non_superuser_login_role_granted_the_api_roles_suffices() {
    let db = vantage_sync_testkit::TestDb::migrated().await;
    let login = format!("login_{}", db.name);
    let mut conn = db.connect().await;
    conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {login} LOGIN NOSUPERUSER NOCREATEROLE NOINHERIT; GRANT anon, authenticated, service_role TO {login};"
    ))))
    .await
    .unwrap();
    let options: sqlx::postgres::PgConnectOptions = db.url.parse().unwrap();
    let url = sqlx::ConnectOptions::to_url_lossy(&options.username(&login)).to_string();
    let app_db = vantage_sync_testkit::TestDb {
        name: db.name.clone(),
        url,
    };
    let app = TestApp::spawn_with(app_db, |_| {}).await;
    let body = app
        .query("service_role", "mutation { startSync(resource: \"funds\") { lastSyncStatus } registerResource(resource: \"fx_rates\") { resource } }", json!({}))
        .await;
    assert_eq!(
        body,
        json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}, "registerResource": {"resource": "fx_rates"}}})
    );
    let body = app
        .query(
            "authenticated",
            "{ syncStats { totalResources running } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body,
        json!({"data": {"syncStats": {"totalResources": 8, "running": 1}}})
    );
    // The login role itself may not touch the table: only the API roles can.
    let mut as_login = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    let direct = sqlx::query("SELECT * FROM vantage_sync_state")
        .fetch_all(&mut as_login)
        .await;
    assert_eq!(vantage_sync_testkit::sql_error(direct).0, "42501");
}

/// The claims reach the database as written in the token, whatever they
/// contain.
#[tokio::test]
async fn claims_with_quotes_backslashes_and_dollars_arrive_intact() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let db = vantage_sync_testkit::TestDb::migrated().await;
    let pool = vantage_sync::db::connect(&db.url, 1).await.unwrap();
    let keys = vantage_sync::auth::TokenKeys::new(&[7; 32]).unwrap();
    let subject = "o'brien \\' \\\\ $$ $q$ '; SELECT pg_sleep(5); -- ünïcødé \u{1F600}";
    let token = keys
        .mint(Role::Authenticated, Duration::from_secs(60), Some(subject))
        .unwrap();
    let caller = keys.verify(&token).await.unwrap();
    let request = RequestDb::new(
        pool,
        caller.identity(),
        Access::Read,
        Duration::from_secs(5),
    );
    let (claims, user): (String, String) = {
        let txn = request.txn().await.unwrap();
        let row = txn
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT current_setting('request.jwt.claims') AS c, current_user::text AS u",
            ))
            .await
            .unwrap()
            .unwrap();
        (row.try_get("", "c").unwrap(), row.try_get("", "u").unwrap())
    };
    assert_eq!(claims, &*caller.claims);
    let parsed: Value = serde_json::from_str(&claims).unwrap();
    assert_eq!(parsed["sub"], subject);
    assert_eq!(user, "authenticated");
}

/// Each kind of request transaction begins with the access mode,
/// isolation, role and statement timeout it asks for, with JIT compilation
/// off, and a read-only one refuses writes even from a role that may write.
#[tokio::test]
async fn request_transactions_begin_as_asked() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let db = vantage_sync_testkit::TestDb::migrated().await;
    let pool = vantage_sync::db::connect(&db.url, 1).await.unwrap();
    let writer = Caller::for_role(Role::ServiceRole);
    let settings = "SELECT current_setting('transaction_read_only') AS ro, \
        current_setting('transaction_isolation') AS iso, current_user::text AS u, \
        current_setting('statement_timeout') AS t, current_setting('jit') AS jit";
    let cases = [
        (
            RequestDb::new(
                pool.clone(),
                writer.identity(),
                Access::Read,
                Duration::from_millis(1500),
            ),
            ["on", "read committed", "service_role", "1500ms", "off"],
        ),
        (
            RequestDb::new(
                pool.clone(),
                writer.identity(),
                Access::Write,
                Duration::from_secs(5),
            ),
            ["off", "read committed", "service_role", "5s", "off"],
        ),
        (
            RequestDb::new(
                pool.clone(),
                writer.identity(),
                Access::Snapshot,
                Duration::from_secs(5),
            ),
            ["on", "repeatable read", "service_role", "5s", "off"],
        ),
    ];
    for (request, expected) in cases {
        let txn = request.txn().await.unwrap();
        let row = txn
            .query_one_raw(Statement::from_string(DbBackend::Postgres, settings))
            .await
            .unwrap()
            .unwrap();
        let got: Vec<String> = ["ro", "iso", "u", "t", "jit"]
            .iter()
            .map(|column| row.try_get("", column).unwrap())
            .collect();
        assert_eq!(got, expected);
    }
    let read_only = RequestDb::new(
        pool,
        writer.identity(),
        Access::Read,
        Duration::from_secs(5),
    );
    let refused = {
        let txn = read_only.txn().await.unwrap();
        sync_states::register(&*txn, "written").await
    };
    let Err(error) = refused else {
        panic!("a read-only transaction wrote");
    };
    assert_eq!(
        vantage_sync::error::sqlstate(&error).map(|(code, _)| code),
        Some("25006".to_owned())
    );
}
