//! Mutations retried with an `Idempotency-Key` apply once, across
//! replicas; a key reused for another request is refused; and a server
//! that requires registered resources refuses a misspelt one.

use reqwest::StatusCode;
use serde_json::{Value, json};
use vantage_sync_testkit::{SECRET, TestApp, TestDb, unix_now};

const START: &str = "mutation($resource: String!) { startSync(resource: $resource, force: true) {
    resource lastSyncStatus startedAt } }";
const COMPLETE: &str = "mutation($resource: String!) { completeSync(resource: $resource,
    recordsSynced: 5, recordsCreated: 2, recordsUpdated: 3) { resource lastSyncStatus recordsSynced } }";

/// A service_role token whose subject is `sub`.
fn token_of(sub: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "service_role", "sub": sub, "exp": unix_now() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// POSTs `query` with `variables` to `app` as `token`, with `key`; the
/// status, whether it was a replay, and the body.
async fn send(
    app: &TestApp,
    token: &str,
    key: Option<&str>,
    query: &str,
    variables: Value,
) -> (StatusCode, bool, Value) {
    let mut request = app
        .client
        .post(app.url("/graphql"))
        .header("authorization", format!("Bearer {token}"))
        .json(&json!({"query": query, "variables": variables}));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, replayed, response.json().await.unwrap())
}

/// Events of `resource` in the log.
async fn events(app: &TestApp, resource: &str) -> i64 {
    let mut conn = app.db.connect().await;
    sqlx::query_scalar("SELECT count(*) FROM vantage_sync_events WHERE resource = $1")
        .bind(resource)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// The same mutation three times under one key, the third on a second
/// replica: one transition in the log, three identical answers, the two
/// retries marked as replays.
#[tokio::test]
async fn a_retried_mutation_applies_once_on_any_replica() {
    let app = TestApp::spawn().await;
    let db = TestDb {
        name: app.db.name.clone(),
        url: app.db.url.clone(),
    };
    let replica = TestApp::spawn_with(db, |_| {}).await;
    let token = token_of("etl-worker");
    let vars = json!({"resource": "funds"});
    let first = send(&app, &token, Some("run-1-start"), START, vars.clone()).await;
    assert_eq!((first.0, first.1), (StatusCode::OK, false), "{}", first.2);
    assert!(first.2.get("errors").is_none(), "{}", first.2);
    let before = events(&app, "funds").await;
    let again = send(&app, &token, Some("run-1-start"), START, vars.clone()).await;
    let elsewhere = send(&replica, &token, Some("run-1-start"), START, vars.clone()).await;
    assert_eq!(events(&app, "funds").await, before, "a retry was applied");
    assert_eq!(again, (StatusCode::OK, true, first.2.clone()));
    assert_eq!(elsewhere, (StatusCode::OK, true, first.2.clone()));

    // A refusal is an answer too: a retried completeSync that failed the
    // first time fails the same way, and one that succeeded succeeds
    // again instead of saying NOT_RUNNING.
    let done = send(&app, &token, Some("run-1-end"), COMPLETE, vars.clone()).await;
    assert_eq!(done.2["data"]["completeSync"]["lastSyncStatus"], "SUCCESS");
    let retried = send(&replica, &token, Some("run-1-end"), COMPLETE, vars.clone()).await;
    assert_eq!(retried, (StatusCode::OK, true, done.2.clone()));
    let unkeyed = send(&app, &token, None, COMPLETE, vars).await;
    assert_eq!(
        unkeyed.2["errors"][0]["extensions"]["code"], "NOT_RUNNING",
        "{}",
        unkeyed.2
    );
}

/// A key sent again with another request is refused with
/// IDEMPOTENCY_KEY_REUSED (HTTP 422) and changes nothing; the same key of
/// another caller is that caller's own.
#[tokio::test]
async fn a_key_reused_for_another_request_is_refused_and_callers_do_not_collide() {
    let app = TestApp::spawn().await;
    let worker = token_of("worker-a");
    let (status, _, body) = send(
        &app,
        &worker,
        Some("k"),
        START,
        json!({"resource": "funds"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = events(&app, "accounts").await;
    let (status, replayed, body) = send(
        &app,
        &worker,
        Some("k"),
        START,
        json!({"resource": "accounts"}),
    )
    .await;
    assert_eq!(
        (status, replayed),
        (StatusCode::UNPROCESSABLE_ENTITY, false)
    );
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "IDEMPOTENCY_KEY_REUSED",
        "{body}"
    );
    assert_eq!(events(&app, "accounts").await, before);

    let other = token_of("worker-b");
    let (status, replayed, body) = send(
        &app,
        &other,
        Some("k"),
        START,
        json!({"resource": "accounts"}),
    )
    .await;
    assert_eq!((status, replayed), (StatusCode::OK, false), "{body}");
    assert_eq!(body["data"]["startSync"]["resource"], "accounts");
    assert_eq!(events(&app, "accounts").await, before + 1);

    // Keys are 1 to 255 characters.
    for bad in [String::new(), "x".repeat(256)] {
        let (status, _, body) = send(
            &app,
            &other,
            Some(&bad),
            START,
            json!({"resource": "cashflows"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    }
    assert_eq!(events(&app, "cashflows").await, 0);
}

/// Ten requests at once with one key: one applies, the nine others wait
/// for its answer and get it.
#[tokio::test]
async fn concurrent_requests_with_one_key_apply_once() {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.max_connections = 12;
    })
    .await;
    let token = token_of("etl-worker");
    let answers = futures_util::future::join_all((0..10).map(|_| {
        send(
            &app,
            &token,
            Some("together"),
            START,
            json!({"resource": "valuations"}),
        )
    }))
    .await;
    assert_eq!(events(&app, "valuations").await, 1);
    let first = &answers[0].2;
    assert!(first.get("errors").is_none(), "{first}");
    for (status, _, body) in &answers {
        assert_eq!((*status, body), (StatusCode::OK, first));
    }
    assert_eq!(
        answers.iter().filter(|(_, replayed, _)| !replayed).count(),
        1
    );
}

/// With REQUIRE_REGISTERED_RESOURCES, startSync on a name never registered
/// is refused with UNKNOWN_RESOURCE and creates nothing; a registered one
/// starts. Without it, an unknown name is registered by starting it.
#[tokio::test]
async fn registration_can_be_required_before_a_sync_starts() {
    let strict = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.write_rules.require_registered_resources = true;
    })
    .await;
    let token = token_of("etl-worker");
    let (_, _, body) = send(&strict, &token, None, START, json!({"resource": "fundz"})).await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "UNKNOWN_RESOURCE",
        "{body}"
    );
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("registerResource"),
        "{body}"
    );
    let mut conn = strict.db.connect().await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vantage_sync_state WHERE resource = 'fundz'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows, 0);
    let register = "mutation { registerResource(resource: \"fundz\") { resource } }";
    let (_, _, body) = send(&strict, &token, None, register, json!({})).await;
    assert!(body.get("errors").is_none(), "{body}");
    let (_, _, body) = send(&strict, &token, None, START, json!({"resource": "fundz"})).await;
    assert_eq!(
        body["data"]["startSync"]["lastSyncStatus"], "RUNNING",
        "{body}"
    );

    let lenient = TestApp::spawn().await;
    let (_, _, body) = send(&lenient, &token, None, START, json!({"resource": "fundz"})).await;
    assert_eq!(
        body["data"]["startSync"]["lastSyncStatus"], "RUNNING",
        "{body}"
    );
}
