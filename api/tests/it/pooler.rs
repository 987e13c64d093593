//! Through a real PgBouncer in transaction mode (Supabase's port 6543):
//! every request works, and the live feed loses nothing, whether it
//! LISTENs on a direct connection or (uselessly) through the pooler.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use vantage_sync::db::{self, PreparedStatements};
use vantage_sync_testkit::{LogCapture, PgBouncer, TestApp, TestDb, WsClient, metric_value};

/// A server whose DATABASE_URL is PgBouncer, with the feed listening on
/// the direct connection when `listen_direct`, and reading the log at
/// least every `poll`.
async fn app_through_pooler(listen_direct: bool, poll: Duration) -> (TestApp, PgBouncer) {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&db.url, &["postgres"]);
    let pooled = bouncer.url(&db.url);
    let direct = db.url.clone();
    let app = TestApp::spawn_with(db, |config| {
        config.database_url = pooled;
        config.listen_database_url = listen_direct.then_some(direct);
        config.feed_poll_interval = poll;
    })
    .await;
    (app, bouncer)
}

#[tokio::test]
async fn start_up_tells_a_transaction_pooler_from_a_direct_connection() {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&db.url, &["postgres"]);
    let pooled = db::connect_with(
        &bouncer.url(&db.url),
        4,
        db::DEFAULT_ACQUIRE_TIMEOUT,
        PreparedStatements::Auto,
    )
    .await
    .unwrap();
    assert!(pooled.behind_transaction_pooler(), "{}", bouncer.log());
    assert!(!pooled.prepared_statements());
    let direct = db::connect_with(
        &db.url,
        4,
        db::DEFAULT_ACQUIRE_TIMEOUT,
        PreparedStatements::Auto,
    )
    .await
    .unwrap();
    assert!(!direct.behind_transaction_pooler());
    assert!(direct.prepared_statements());
    let forced = db::connect_with(
        &bouncer.url(&db.url),
        4,
        db::DEFAULT_ACQUIRE_TIMEOUT,
        PreparedStatements::False,
    )
    .await
    .unwrap();
    assert!(!forced.prepared_statements());
}

/// One worker's share: its own resource, registered, then rounds of
/// start, complete and the dashboard query. Returns how many requests it
/// made and every failure.
async fn worker(app: &TestApp, n: usize, rounds: usize) -> (usize, Vec<String>) {
    let resource = format!("pooled_{n}");
    let mut requests = Vec::new();
    requests.push((
        "service_role",
        "mutation($r: String!) { registerResource(resource: $r) { resource } }",
    ));
    for _ in 0..rounds {
        requests.push((
            "service_role",
            "mutation($r: String!) { startSync(resource: $r) { lastSyncStatus } }",
        ));
        requests.push((
            "service_role",
            "mutation($r: String!) { completeSync(resource: $r, recordsSynced: 3, recordsCreated: 1, recordsUpdated: 2) { lastSyncStatus } }",
        ));
        requests.push((
            "authenticated",
            "query($r: String!) { syncState(resource: $r) { lastSyncStatus } syncStates { resource health errors { code } } syncStats { totalResources } }",
        ));
    }
    let mut failures = Vec::new();
    for (role, query) in &requests {
        let (status, body) = app.graphql(Some(role), query, json!({"r": resource})).await;
        if status != StatusCode::OK || body.get("errors").is_some() {
            failures.push(format!("{status} {body}"));
        }
    }
    (requests.len(), failures)
}

#[tokio::test]
async fn a_mixed_load_through_a_transaction_pooler_has_no_errors() {
    let (app, bouncer) = app_through_pooler(true, Duration::from_secs(2)).await;
    let workers = 16;
    let rounds = 21;
    let results =
        futures_util::future::join_all((0..workers).map(|n| worker(&app, n, rounds))).await;
    let requests: usize = results.iter().map(|(count, _)| count).sum();
    let failures: Vec<&String> = results.iter().flat_map(|(_, failures)| failures).collect();
    assert!(requests >= 1000, "{requests}");
    assert!(
        failures.is_empty(),
        "{} of {requests} failed, e.g. {:?}\n{}",
        failures.len(),
        failures.first(),
        bouncer.log()
    );
    // Every acknowledged transition is in the log once.
    let mut db = app.db.connect().await;
    let (events,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM vantage_sync_events WHERE resource LIKE 'pooled\\_%'")
            .fetch_one(&mut db)
            .await
            .unwrap();
    assert_eq!(events, (workers * (1 + 2 * rounds)) as i64);
}

const FUNDS: &str = "subscription { syncStateChanged(resources: [\"funds\"], initial: true) { operation resource state { lastSyncStatus recordsSynced } } }";

/// Subscribes to funds, then makes 15 transitions one at a time: each
/// must arrive, in order, within `within` of the mutation's answer.
async fn every_change_arrives_in_order(app: &TestApp, within: Duration) {
    let mut client = WsClient::ready(app, "authenticated").await;
    client.subscribe("1", FUNDS, json!({})).await;
    let (_, snapshot) = client.next_data().await;
    assert_eq!(snapshot["syncStateChanged"]["operation"], "SNAPSHOT");
    for n in 0..15 {
        let (mutation, status) = if n % 2 == 0 {
            (
                "mutation { startSync(resource: \"funds\") { resource } }".to_owned(),
                "RUNNING",
            )
        } else {
            (
                format!(
                    "mutation {{ completeSync(resource: \"funds\", recordsSynced: {n}, recordsCreated: 0, recordsUpdated: 0) {{ resource }} }}"
                ),
                "SUCCESS",
            )
        };
        let body = app.query("service_role", &mutation, json!({})).await;
        assert!(body.get("errors").is_none(), "{body}");
        let made = Instant::now();
        let (_, change) = client.next_data().await;
        let waited = made.elapsed();
        assert_eq!(
            change["syncStateChanged"]["operation"], "UPDATE",
            "change {n}"
        );
        assert_eq!(
            change["syncStateChanged"]["state"]["lastSyncStatus"], status,
            "change {n}"
        );
        if n % 2 == 1 {
            assert_eq!(
                change["syncStateChanged"]["state"]["recordsSynced"],
                json!(n)
            );
        }
        assert!(waited <= within, "change {n} took {waited:?}");
    }
}

fn unannounced(metrics: &str) -> u64 {
    metric_value(metrics, "vantage_sync_feed_unannounced_events_total")
        .unwrap_or_else(|| panic!("no unannounced-events metric in:\n{metrics}")) as u64
}

#[tokio::test]
async fn subscribers_get_every_change_when_the_feed_listens_on_a_direct_connection() {
    let logs = LogCapture::start();
    let (app, _bouncer) = app_through_pooler(true, Duration::from_secs(2)).await;
    // Notifications arrive: no waiting for the poll.
    every_change_arrives_in_order(&app, Duration::from_millis(1500)).await;
    // Give the last poll time to judge the last changes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(unannounced(&app.metrics().await), 0);
    assert!(
        !logs.text().contains("no notification announced"),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn without_a_session_connection_changes_arrive_by_polling_and_the_server_says_so() {
    let logs = LogCapture::start();
    let poll = Duration::from_secs(1);
    let (app, _bouncer) = app_through_pooler(false, poll).await;
    let started = logs.text();
    assert!(
        started.contains(
            "LISTEN_DATABASE_URL (DATABASE_URL when unset) goes through a transaction-mode pooler, where LISTEN receives nothing"
        ),
        "{started}"
    );
    // Nothing LISTENs through the pooler; the poll delivers each
    // change within its interval (plus the time to read and send).
    every_change_arrives_in_order(&app, poll + Duration::from_millis(700)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while unannounced(&app.metrics().await) == 0 {
        assert!(Instant::now() < deadline, "no unannounced changes counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = logs.text();
    let warning: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("no notification announced"))
        .collect();
    assert!(!warning.is_empty(), "{text}");
    assert!(
        warning[0].contains("WARN") && warning[0].contains("LISTEN_DATABASE_URL"),
        "{}",
        warning[0]
    );
}

/// Migrations need one session: through a transaction pooler they run
/// over LISTEN_DATABASE_URL, and without one the start is refused.
#[tokio::test]
async fn start_up_migrations_never_run_through_a_transaction_pooler() {
    let db = TestDb::empty().await;
    let bouncer = PgBouncer::start(&db.url, &["postgres"]);
    let config = |listen: Option<String>| {
        let mut config = vantage_sync::server::ServerConfig::new(
            bouncer.url(&db.url),
            vantage_sync_testkit::SECRET.as_bytes(),
        )
        .unwrap();
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        config.listen_database_url = listen;
        config
    };
    match vantage_sync::server::Server::bind(config(None)).await {
        Ok(_) => panic!("migrated through the pooler"),
        Err(error) => assert!(
            matches!(
                error,
                vantage_sync::server::ServeError::MigrateThroughPooler
            ),
            "{error}"
        ),
    }
    let server = vantage_sync::server::Server::bind(config(Some(db.url.clone())))
        .await
        .unwrap();
    drop(server);
    let mut conn = db.connect().await;
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' \
         AND tablename IN ('vantage_sync_state', 'vantage_sync_events')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(tables, 2);
}
