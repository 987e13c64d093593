//! `serve` as Supabase's `authenticator` runs PostgREST: a NOINHERIT login
//! role that is only granted anon, authenticated and service_role, with
//! the migrations applied by the owner. Everything works; a missing grant
//! stops the start with the GRANT to run.

use std::time::{Duration, Instant};

use serde_json::json;
use vantage_sync::server::ServerConfig;
use vantage_sync::server::{ServeError, Server};
use vantage_sync_testkit::{SECRET, TestApp, TestDb, WsClient};

async fn bind_error(database_url: String) -> String {
    let mut config = ServerConfig::new(database_url, SECRET.as_bytes()).unwrap();
    config.listen_addr = "127.0.0.1:0".parse().unwrap();
    config.migrate = false;
    match Server::bind(config).await {
        Ok(_) => panic!("the server started"),
        Err(error) => {
            assert!(matches!(error, ServeError::Privileges(_)), "{error}");
            error.to_string()
        }
    }
}

#[tokio::test]
async fn the_api_the_feed_and_pruning_work_as_a_login_role_granted_only_the_three_roles() {
    let db = TestDb::migrated().await;
    let mut admin = db.connect().await;
    // An old event, for the pruning at start.
    sqlx::raw_sql(
        "UPDATE vantage_sync_state SET records_synced = 1 WHERE resource = 'investors';
         UPDATE vantage_sync_events SET occurred_at = now() - interval '40 days';",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let (login, url) = db
        .login_role(&["anon", "authenticated", "service_role"])
        .await;
    let app = TestApp::spawn_with(db, |config| {
        config.database_url = url;
        config.event_retention_days = Some(30);
    })
    .await;

    // Pruning (at start, then hourly) runs as service_role.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (old,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM vantage_sync_events WHERE occurred_at < now() - interval '30 days'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if old == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the old event was not pruned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .subscribe(
            "1",
            "subscription { syncStateChanged(resources: [\"accounts\"], initial: true) { operation state { lastSyncStatus } } }",
            json!({}),
        )
        .await;
    let (_, snapshot) = client.next_data().await;
    assert_eq!(
        snapshot,
        json!({"syncStateChanged": {"operation": "SNAPSHOT", "state": {"lastSyncStatus": "NEVER_RUN"}}})
    );
    let started = app
        .query(
            "service_role",
            "mutation { startSync(resource: \"accounts\") { lastSyncStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(
        started,
        json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}}})
    );
    let (_, change) = client.next_data().await;
    assert_eq!(
        change,
        json!({"syncStateChanged": {"operation": "UPDATE", "state": {"lastSyncStatus": "RUNNING"}}})
    );
    let read = app
        .query(
            "authenticated",
            "{ syncState(resource: \"accounts\") { lastSyncStatus } syncHistory(resource: \"accounts\") { edges { node { status } } } }",
            json!({}),
        )
        .await;
    assert_eq!(
        read,
        json!({"data": {"syncState": {"lastSyncStatus": "RUNNING"}, "syncHistory": {"edges": [{"node": {"status": "RUNNING"}}]}}})
    );
    // Refusals still come from the roles the login role becomes.
    let refused = app
        .query(
            "authenticated",
            "mutation { startSync(resource: \"funds\") { lastSyncStatus } }",
            json!({}),
        )
        .await;
    assert_eq!(refused["errors"][0]["extensions"]["code"], "FORBIDDEN");
    // And every connection of the server is the login role's.
    let (sessions,): (Vec<String>,) = sqlx::query_as(
        "SELECT array_agg(DISTINCT usename::text) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(sessions, [login]);
}

#[tokio::test]
async fn a_missing_grant_stops_the_start_naming_the_grant() {
    let db = TestDb::migrated().await;
    let (login, url) = db.login_role(&["anon", "authenticated"]).await;
    assert_eq!(
        bind_error(url).await,
        format!(
            "the login role {login} cannot become service_role: run `GRANT service_role TO {login};` as the database owner (serve needs membership in anon, authenticated and service_role, and nothing else)"
        )
    );
    let (login, url) = db.login_role(&[]).await;
    assert!(
        bind_error(url)
            .await
            .contains(&format!("run `GRANT anon TO {login};`"))
    );
}

#[tokio::test]
async fn an_unmigrated_database_stops_the_start_saying_to_migrate() {
    let db = TestDb::empty().await;
    assert_eq!(
        bind_error(db.url.clone()).await,
        "the table public.vantage_sync_state does not exist: apply the migrations first (`vantage-sync migrate up` as the owner, or start without --no-migrate)"
    );
}
