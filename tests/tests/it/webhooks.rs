//! Alerts and webhooks (SPEC 8), end to end: changes made through the API
//! or straight in PostgreSQL reach a receiver on a loopback port, signed,
//! at least once, in order, across retries, restarts and replicas.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vantage_sync::notify::WebhookSettings;
use vantage_sync_tests::{Received, Receiver, TestApp, TestDb, signature_is_valid};

const CREATE: &str = "mutation($url: String!, $events: [WebhookEventType!]!, $resources: [String!], $format: WebhookFormat) {
  createWebhook(url: $url, events: $events, resources: $resources, format: $format) {
    webhook { id url events resources format enabled disabledReason }
    secret
  }
}";

const DELIVERIES: &str = "query($id: ID!) {
  webhookDeliveries(webhookId: $id, first: 100) {
    edges { node { eventId eventType attempt status httpStatus error } }
    pageInfo { hasNextPage }
  }
}";

/// A server that may deliver to loopback, with a short retry window.
async fn spawn_app(db: TestDb) -> TestApp {
    TestApp::spawn_with(db, |config| {
        config.webhooks = WebhookSettings {
            retry_window: Duration::from_secs(3600),
            allow_private: true,
        };
    })
    .await
}

/// Another handle on the same database (for a second server).
fn same_db(db: &TestDb) -> TestDb {
    TestDb {
        name: db.name.clone(),
        url: db.url.clone(),
    }
}

/// Creates a webhook; returns its id and secret.
async fn create(
    app: &TestApp,
    url: &str,
    events: &[&str],
    resources: Option<&[&str]>,
) -> (String, String) {
    let body = app
        .query(
            "service_role",
            CREATE,
            json!({"url": url, "events": events, "resources": resources}),
        )
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    let created = &body["data"]["createWebhook"];
    (
        created["webhook"]["id"].as_str().unwrap().to_owned(),
        created["secret"].as_str().unwrap().to_owned(),
    )
}

async fn mutate(app: &TestApp, query: &str) {
    let body = app.query("service_role", query, json!({})).await;
    assert!(body.get("errors").is_none(), "{body}");
}

async fn start(app: &TestApp, resource: &str) {
    mutate(
        app,
        &format!(r#"mutation {{ startSync(resource: "{resource}") {{ resource }} }}"#),
    )
    .await;
}

/// Starts a sync of `resource` and ends it with the mutation field `end`.
async fn run(app: &TestApp, resource: &str, end: &str) {
    start(app, resource).await;
    mutate(app, &format!("mutation {{ {end} {{ resource }} }}")).await;
}

async fn fail(app: &TestApp, resource: &str) {
    let errors = r#"[{code: "HTTP_500", message: "upstream down"}]"#;
    run(
        app,
        resource,
        &format!(r#"failSync(resource: "{resource}", errors: {errors})"#),
    )
    .await;
}

async fn succeed(app: &TestApp, resource: &str) {
    let counts = "recordsSynced: 3, recordsCreated: 1, recordsUpdated: 2";
    run(
        app,
        resource,
        &format!(r#"completeSync(resource: "{resource}", {counts})"#),
    )
    .await;
}

/// (type, alert, resource) of each received notification.
fn kinds(received: &[Received]) -> Vec<(String, Option<String>, Option<String>)> {
    received
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["type"].as_str().unwrap().to_owned(),
                body["alert"].as_str().map(str::to_owned),
                body["resource"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

fn kind(t: &str, alert: Option<&str>, resource: &str) -> (String, Option<String>, Option<String>) {
    (
        t.to_owned(),
        alert.map(str::to_owned),
        Some(resource.to_owned()),
    )
}

/// What `fetch` returns once `done` holds for it, or once `within` has
/// passed (the caller's assertions then say what is wrong).
async fn eventually<T>(
    within: Duration,
    fetch: impl AsyncFn() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let value = fetch().await;
        if done(&value) || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `alerts` that `query` reads once `done` holds for them (within 2 s).
async fn eventually_alerts(
    app: &TestApp,
    query: &str,
    done: impl Fn(&Vec<Value>) -> bool,
) -> Vec<Value> {
    let fetch = async || {
        let body = app.query("authenticated", query, json!({})).await;
        body["data"]["alerts"].as_array().unwrap().clone()
    };
    eventually(Duration::from_secs(2), fetch, done).await
}

/// The delivery log once `done` holds for it (answers are recorded in the
/// worker's next round), or after 5 s.
async fn deliveries_when(
    app: &TestApp,
    id: &str,
    done: impl Fn(&Vec<Value>) -> bool,
) -> Vec<Value> {
    eventually(
        Duration::from_secs(5),
        async || deliveries(app, id).await,
        done,
    )
    .await
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let body = app
        .query("service_role", DELIVERIES, json!({"id": id}))
        .await;
    assert!(body.get("errors").is_none(), "{body}");
    body["data"]["webhookDeliveries"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|edge| edge["node"].clone())
        .collect()
}

#[tokio::test]
async fn a_failed_sync_delivers_signed_alert_and_sync_notifications_and_a_success_resolves() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    let (id, secret) = create(
        &app,
        &receiver.url("/hooks"),
        &["ALERT_FIRING", "ALERT_RESOLVED", "SYNC_FAILED"],
        Some(&["accounts"]),
    )
    .await;
    assert!(secret.starts_with("whsec_"), "{secret}");

    let failed_at = Instant::now();
    fail(&app, "accounts").await;
    // Another resource's failure is filtered out.
    fail(&app, "funds").await;
    let received = receiver
        .wait_for("/hooks", Duration::from_secs(2), |r| r.len() >= 2)
        .await;
    assert_eq!(
        kinds(&received),
        vec![
            kind("sync.failed", None, "accounts"),
            kind("alert.firing", Some("failed"), "accounts"),
        ],
        "within 2 s of failSync"
    );
    for r in &received {
        assert!(r.at.duration_since(failed_at) < Duration::from_secs(2));
        assert!(signature_is_valid(&secret, r), "bad signature on {r:?}");
        let body = r.json();
        assert_eq!(
            body["id"].as_str().unwrap(),
            r.id,
            "payload id = webhook-id"
        );
        let at = chrono::DateTime::parse_from_rfc3339(body["at"].as_str().unwrap()).unwrap();
        assert!((chrono::Utc::now() - at.to_utc()).num_seconds().abs() < 10);
        let timestamp: i64 = r.timestamp.parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 10);
    }
    // The state as GraphQL returns it.
    let state = &received[0].json()["state"];
    assert_eq!(state["resource"], "accounts");
    assert_eq!(state["lastSyncStatus"], "FAILED");
    assert_eq!(state["errors"][0]["code"], "HTTP_500");
    // Tampering is detected by the independent check.
    let mut forged = received[0].clone();
    forged.body = forged.body.replace("accounts", "funds");
    assert!(!signature_is_valid(&secret, &forged));

    // Both failures fire, whatever the webhooks' filters.
    let firing = eventually_alerts(&app, "{ alerts { alert resource resolvedAt } }", |firing| {
        firing.contains(&json!({"alert": "FAILED", "resource": "funds", "resolvedAt": null}))
    })
    .await;
    assert!(
        firing.contains(&json!({"alert": "FAILED", "resource": "accounts", "resolvedAt": null}))
    );

    succeed(&app, "accounts").await;
    let received = receiver
        .wait_for("/hooks", Duration::from_secs(2), |r| r.len() >= 4)
        .await;
    // Succeeding also ends `stale` (the seed rows had never run).
    assert_eq!(
        kinds(&received[2..]),
        vec![
            kind("alert.resolved", Some("failed"), "accounts"),
            kind("alert.resolved", Some("stale"), "accounts"),
        ]
    );
    let resolved = app
        .query(
            "authenticated",
            r#"{ alerts(firing: false) { alert resource } }"#,
            json!({}),
        )
        .await;
    let resolved = resolved["data"]["alerts"].as_array().unwrap();
    assert!(resolved.contains(&json!({"alert": "FAILED", "resource": "accounts"})));
    assert!(!resolved.contains(&json!({"alert": "FAILED", "resource": "funds"})));

    let log = deliveries_when(&app, &id, |log| log.len() >= 4).await;
    assert_eq!(log.len(), 4);
    assert!(
        log.iter()
            .all(|d| d["status"] == "DELIVERED" && d["attempt"] == 1 && d["httpStatus"] == 200)
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("vantage_sync_webhook_deliveries_total{outcome=\"delivered\"} 4"),
        "{metrics}"
    );
    // That the worker has not silently stopped: its last round is recent.
    assert!(
        metrics.contains("vantage_sync_notify_rounds_failed_total 0"),
        "{metrics}"
    );
    let last_round: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vantage_sync_notify_last_round_timestamp_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (chrono::Utc::now().timestamp() - last_round).abs() <= 2,
        "{last_round}"
    );
    let made: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vantage_sync_notifications_made_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(made >= 6, "{made}");
}

#[tokio::test]
async fn stuck_fires_on_the_timer_without_an_event() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    create(
        &app,
        &receiver.url("/stuck"),
        &["ALERT_FIRING"],
        Some(&["funds"]),
    )
    .await;
    start(&app, "funds").await;
    let events_before = event_count(&app).await;
    // Straight in the table with triggers off: no event, no notify.
    app.sql(
        "SET session_replication_role = replica;
         UPDATE vantage_sync_state SET started_at = now() - interval '31 minutes' WHERE resource = 'funds';",
    )
    .await;
    assert_eq!(event_count(&app).await, events_before);

    let received = receiver
        .wait_for("/stuck", Duration::from_secs(15), |r| !r.is_empty())
        .await;
    assert_eq!(
        kinds(&received),
        vec![kind("alert.firing", Some("stuck"), "funds")]
    );
    let alerts = app
        .query(
            "authenticated",
            r#"{ alerts { alert resource } }"#,
            json!({}),
        )
        .await;
    assert!(
        alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .contains(&json!({"alert": "STUCK", "resource": "funds"}))
    );
    // Firing is state: it is not sent again on the next checks.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(receiver.received("/stuck").len(), 1);
}

async fn event_count(app: &TestApp) -> i64 {
    let mut conn = app.db.connect().await;
    sqlx::query_scalar("SELECT count(*) FROM vantage_sync_events")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn three_failures_in_a_row_fire_repeated_once() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    create(
        &app,
        &receiver.url("/repeated"),
        &["ALERT_FIRING", "SYNC_FAILED"],
        Some(&["cashflows"]),
    )
    .await;
    for _ in 0..4 {
        fail(&app, "cashflows").await;
    }
    let received = receiver
        .wait_for("/repeated", Duration::from_secs(5), |r| {
            kinds(r).iter().filter(|k| k.0 == "sync.failed").count() == 4
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = if received.len() < receiver.received("/repeated").len() {
        receiver.received("/repeated")
    } else {
        received
    };
    assert_eq!(
        kinds(&received),
        vec![
            kind("sync.failed", None, "cashflows"),
            kind("alert.firing", Some("failed"), "cashflows"),
            kind("sync.failed", None, "cashflows"),
            kind("sync.failed", None, "cashflows"),
            kind("alert.firing", Some("repeated"), "cashflows"),
            kind("sync.failed", None, "cashflows"),
        ]
    );
}

#[tokio::test]
async fn failed_attempts_are_retried_with_one_event_id_and_logged() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    let (id, _) = create(&app, &receiver.url("/retry"), &["SYNC_FAILED"], None).await;
    receiver.answer(&[500, 500]);
    fail(&app, "accounts").await;
    let received = receiver
        .wait_for("/retry", Duration::from_secs(10), |r| r.len() >= 3)
        .await;
    assert_eq!(
        received.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 500, 200]
    );
    assert!(received.iter().all(|r| r.id == received[0].id));
    // Back-off: 1 s, then 2 s.
    assert!(received[1].at - received[0].at >= Duration::from_millis(900));
    assert!(received[2].at - received[1].at >= Duration::from_millis(1900));
    let log = deliveries_when(&app, &id, |log| log.len() >= 3).await;
    let event_id = &received[0].id;
    assert_eq!(
        log.iter()
            .map(|d| (
                d["eventId"].as_str().unwrap().to_owned(),
                d["attempt"].as_i64().unwrap(),
                d["status"].as_str().unwrap().to_owned(),
                d["httpStatus"].as_i64().unwrap()
            ))
            .collect::<Vec<_>>(),
        vec![
            (event_id.clone(), 1, "FAILED".into(), 500),
            (event_id.clone(), 2, "FAILED".into(), 500),
            (event_id.clone(), 3, "DELIVERED".into(), 200),
        ]
    );
    assert_eq!(log[0]["eventType"], "sync.failed");
    assert_eq!(
        log[0]["error"],
        "the endpoint answered 500 Internal Server Error"
    );
}

#[tokio::test]
async fn a_notification_survives_a_dead_receiver_and_a_server_restart() {
    let db = TestDb::migrated().await;
    let mut app = spawn_app(same_db(&db)).await;
    let mut receiver = Receiver::start().await;
    let (id, _) = create(&app, &receiver.url("/later"), &["SYNC_FAILED"], None).await;
    receiver.stop();
    fail(&app, "funds").await;
    // It was tried, and failed: nothing listens.
    let log = deliveries_when(&app, &id, |log| log.iter().any(|d| d["status"] == "FAILED")).await;
    assert_eq!(log[0]["status"], "FAILED", "no failed attempt: {log:?}");
    assert!(log[0]["httpStatus"].is_null());
    // /readyz does not care about a dead endpoint.
    assert_eq!(app.readiness().await, reqwest::StatusCode::OK);
    app.begin_shutdown().await.unwrap();

    receiver.resume().await;
    let app = spawn_app(db).await;
    // Within the back-off of however many attempts failed meanwhile.
    let received = receiver
        .wait_for("/later", Duration::from_secs(40), |r| !r.is_empty())
        .await;
    assert_eq!(kinds(&received), vec![kind("sync.failed", None, "funds")]);
    let log = deliveries_when(&app, &id, |log| {
        log.last().is_some_and(|d| d["status"] == "DELIVERED")
    })
    .await;
    assert_eq!(log.last().unwrap()["status"], "DELIVERED");
    assert!(log.len() >= 2);
}

#[tokio::test]
async fn gone_disables_the_webhook() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    let (id, _) = create(&app, &receiver.url("/gone"), &["SYNC_STARTED"], None).await;
    receiver.answer(&[410]);
    start(&app, "accounts").await;
    receiver
        .wait_for("/gone", Duration::from_secs(3), |r| !r.is_empty())
        .await;
    // Recorded in the worker's next round.
    deliveries_when(&app, &id, |log| !log.is_empty()).await;
    let body = app
        .query(
            "service_role",
            "{ webhooks { id enabled disabledReason } }",
            json!({}),
        )
        .await;
    let hook = &body["data"]["webhooks"][0];
    assert_eq!(hook["id"], id.as_str());
    assert_eq!(hook["enabled"], false);
    assert!(
        hook["disabledReason"].as_str().unwrap().contains("410"),
        "{hook}"
    );
    // Nothing more is sent to it.
    start(&app, "funds").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.received("/gone").len(), 1);
    assert!(
        app.metrics()
            .await
            .contains("vantage_sync_webhooks_disabled_total 1")
    );
}

#[tokio::test]
async fn two_replicas_deliver_everything_and_nothing_twice_in_order() {
    let db = TestDb::migrated().await;
    let a = spawn_app(same_db(&db)).await;
    let b = spawn_app(db).await;
    let receiver = Receiver::start().await;
    let mut hooks = Vec::new();
    for n in 0..4 {
        let path = format!("/replica{n}");
        create(
            &a,
            &receiver.url(&path),
            &["SYNC_STARTED", "SYNC_SUCCEEDED"],
            None,
        )
        .await;
        hooks.push(path);
    }
    // A burst of 100 changes, made straight in the database.
    let mut conn = a.db.connect().await;
    for n in 0..50 {
        let resource = format!("burst_{}", n % 7);
        sqlx::query("SELECT start_vantage_sync($1)")
            .bind(&resource)
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("SELECT complete_vantage_sync($1, 1, 1, 0)")
            .bind(&resource)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    for path in &hooks {
        let received = receiver
            .wait_for(path, Duration::from_secs(30), |r| r.len() >= 100)
            .await;
        // Never twice (every answer was 200), and in event order.
        let ids: Vec<i64> = received.iter().map(|r| r.id.parse().unwrap()).collect();
        let mut seen: HashMap<i64, usize> = HashMap::new();
        for id in &ids {
            *seen.entry(*id).or_default() += 1;
        }
        assert!(
            seen.values().all(|n| *n == 1),
            "{path}: duplicates in {ids:?}"
        );
        assert_eq!(ids.len(), 100, "{path}");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{path}: out of order {ids:?}"
        );
        let types: Vec<String> = kinds(&received).into_iter().map(|k| k.0).collect();
        for pair in types.chunks(2) {
            assert_eq!(pair, ["sync.started", "sync.succeeded"], "{path}");
        }
    }
    // Each success is recorded by the replica that sent it (leases go to
    // whichever claims first), in its next round: 400 between them.
    let delivered = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("vantage_sync_webhook_deliveries_total{outcome=\"delivered\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fetch = async || delivered(&a.metrics().await) + delivered(&b.metrics().await);
    let total = eventually(Duration::from_secs(3), fetch, |total| *total == 400).await;
    assert_eq!(total, 400);
}

#[tokio::test]
async fn a_slow_endpoint_does_not_delay_another() {
    let app = spawn_app(TestDb::migrated().await).await;
    let slow = Receiver::start().await;
    slow.delay(Duration::from_secs(5));
    let fast = Receiver::start().await;
    create(
        &app,
        &slow.url("/slow"),
        &["SYNC_STARTED", "SYNC_FAILED"],
        None,
    )
    .await;
    create(
        &app,
        &fast.url("/fast"),
        &["SYNC_STARTED", "SYNC_FAILED"],
        None,
    )
    .await;
    let started = Instant::now();
    for resource in ["accounts", "funds", "cashflows"] {
        fail(&app, resource).await;
    }
    let received = fast
        .wait_for("/fast", Duration::from_secs(3), |r| r.len() >= 6)
        .await;
    assert_eq!(received.len(), 6);
    assert!(received[5].at.duration_since(started) < Duration::from_secs(3));
    // The slow one is still on its first.
    assert!(slow.received("/slow").len() <= 1);
}

#[tokio::test]
async fn unsafe_or_unauthorised_webhooks_are_refused_and_nothing_is_stored() {
    // The defaults: public addresses only.
    let app = TestApp::spawn().await;
    let refused = |body: &Value| {
        (
            body["errors"][0]["extensions"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            body["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    for (url, says) in [
        ("http://127.0.0.1:9/hook", "WEBHOOK_ALLOW_PRIVATE"),
        ("http://localhost:9/hook", "WEBHOOK_ALLOW_PRIVATE"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "WEBHOOK_ALLOW_PRIVATE",
        ),
        ("ftp://example.com/hook", "ftp://"),
        ("http://user:pw@example.com/hook", "no user or password"),
        ("not a url", "is not a URL"),
    ] {
        let body = app
            .query(
                "service_role",
                CREATE,
                json!({"url": url, "events": ["SYNC_FAILED"]}),
            )
            .await;
        let (code, message) = refused(&body);
        assert_eq!(code, "BAD_USER_INPUT", "{url}: {body}");
        assert!(message.contains(says), "{url}: {message}");
    }
    // A public address literal (no DNS here), with bad events or resources.
    for (variables, says) in [
        (json!({"events": []}), "at least one event type"),
        (
            json!({"events": ["SYNC_FAILED"], "resources": []}),
            "name 1 to 1000 resources",
        ),
        (
            json!({"events": ["SYNC_FAILED"], "resources": ["Not Snake"]}),
            "resource",
        ),
    ] {
        let mut variables = variables;
        variables["url"] = json!("https://93.184.215.14/hook");
        let body = app.query("service_role", CREATE, variables).await;
        let (code, message) = refused(&body);
        assert_eq!(code, "BAD_USER_INPUT", "{body}");
        assert!(message.contains(says), "{message}");
    }
    let body = app
        .query("service_role", DELIVERIES, json!({"id": "not-a-webhook"}))
        .await;
    assert_eq!(refused(&body).0, "NOT_FOUND", "{body}");
    let (_, user) = app
        .graphql(
            Some("authenticated"),
            CREATE,
            json!({"url": "https://example.com/hook", "events": ["SYNC_FAILED"]}),
        )
        .await;
    assert_eq!(refused(&user).0, "FORBIDDEN", "{user}");
    let (_, list) = app
        .graphql(Some("authenticated"), "{ webhooks { id } }", json!({}))
        .await;
    assert_eq!(refused(&list).0, "FORBIDDEN", "{list}");

    let mut conn = app.db.connect().await;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM vantage_sync_webhooks")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // The secret table is out of reach of every API role.
    for role in ["anon", "authenticated", "service_role"] {
        let (schema, table): (bool, bool) = sqlx::query_as(
            "SELECT has_schema_privilege($1, 'vantage_sync_private', 'USAGE'),
                    has_table_privilege($1, 'vantage_sync_private.webhook_secrets', 'SELECT')",
        )
        .bind(role)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!((schema, table), (false, false), "{role}");
        let mut txn = sqlx::Connection::begin(&mut conn).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SET LOCAL ROLE {role}")))
            .execute(&mut *txn)
            .await
            .unwrap();
        let denied = sqlx::query("SELECT secret FROM vantage_sync_private.webhook_secrets")
            .fetch_all(&mut *txn)
            .await;
        assert!(denied.is_err(), "{role} reads the secrets");
        txn.rollback().await.unwrap();
    }
}

#[tokio::test]
async fn a_ping_and_a_slack_message() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    let body = app
        .query(
            "service_role",
            CREATE,
            json!({"url": receiver.url("/slack"), "events": ["ALERT_FIRING"], "format": "SLACK"}),
        )
        .await;
    let id = body["data"]["createWebhook"]["webhook"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(body["data"]["createWebhook"]["webhook"]["format"], "SLACK");
    // A JSON webhook told the same alert gets its own body (bodies are
    // made once per notification and format).
    let (json_id, _) = create(&app, &receiver.url("/json"), &["ALERT_FIRING"], None).await;
    mutate(
        &app,
        &format!(r#"mutation {{ testWebhook(id: "{id}") {{ id }} }}"#),
    )
    .await;
    fail(&app, "accounts").await;
    let received = receiver
        .wait_for("/slack", Duration::from_secs(3), |r| r.len() >= 2)
        .await;
    let texts: Vec<String> = received
        .iter()
        .map(|r| r.json()["text"].as_str().unwrap().to_owned())
        .collect();
    let json = receiver
        .wait_for("/json", Duration::from_secs(3), |r| !r.is_empty())
        .await;
    assert_eq!(
        kinds(&json),
        vec![kind("alert.firing", Some("failed"), "accounts")]
    );
    assert_eq!(json[0].id, received[1].id);
    assert!(json[0].json().get("text").is_none());
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(texts[0].contains("ping"), "{texts:?}");
    assert!(
        texts[1].contains("accounts") && texts[1].contains("failed"),
        "{texts:?}"
    );

    let unknown = app
        .query(
            "service_role",
            r#"mutation { testWebhook(id: "00000000-0000-0000-0000-000000000000") { id } }"#,
            json!({}),
        )
        .await;
    assert_eq!(unknown["errors"][0]["extensions"]["code"], "NOT_FOUND");
    let deleted = app
        .query(
            "service_role",
            &format!(r#"mutation {{ deleteWebhook(id: "{id}") {{ id url }} }}"#),
            json!({}),
        )
        .await;
    assert_eq!(deleted["data"]["deleteWebhook"]["id"], id.as_str());
    let list = app
        .query("service_role", "{ webhooks { id url } }", json!({}))
        .await;
    assert_eq!(
        list["data"]["webhooks"],
        json!([{"id": json_id, "url": receiver.url("/json")}])
    );
}

#[tokio::test]
async fn a_webhook_failing_for_the_whole_retry_window_is_disabled() {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.webhooks = WebhookSettings {
            retry_window: Duration::from_secs(2),
            allow_private: true,
        };
    })
    .await;
    let mut receiver = Receiver::start().await;
    let url = receiver.url("/down");
    receiver.stop();
    let (id, _) = create(&app, &url, &["SYNC_STARTED"], None).await;
    start(&app, "accounts").await;
    // Attempts at 0, 1 and 3 s (back-off 1 s, 2 s): the third is past the
    // 2 s window and disables it.
    let fetch = async || {
        let body = app
            .query(
                "service_role",
                "{ webhooks { id enabled disabledReason } }",
                json!({}),
            )
            .await;
        body["data"]["webhooks"][0].clone()
    };
    let hook = eventually(Duration::from_secs(10), fetch, |hook| {
        hook["enabled"] == false
    })
    .await;
    assert_eq!(hook["id"], id.as_str());
    assert_eq!(hook["enabled"], false, "{hook}");
    assert!(
        hook["disabledReason"]
            .as_str()
            .unwrap()
            .contains("for the whole retry window"),
        "{hook}"
    );
    let log = deliveries(&app, &id).await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log.iter().all(|d| d["status"] == "FAILED"));
    assert_eq!(
        log.iter()
            .map(|d| d["attempt"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

/// A target that became private after creation (here: written straight
/// into the table, as a DNS change would make it) is refused at delivery,
/// by name and by address, and the receiver hears nothing.
#[tokio::test]
async fn private_targets_are_refused_again_at_every_delivery() {
    let app = TestApp::spawn().await;
    let receiver = Receiver::start().await;
    let port = receiver.url("").rsplit(':').next().unwrap().to_owned();
    let mut ids = Vec::new();
    for url in [
        format!("http://localhost:{port}/by-name"),
        format!("http://127.0.0.1:{port}/by-address"),
    ] {
        let mut conn = app.db.connect().await;
        let id: sqlx::types::Uuid = sqlx::query_scalar(
            "SELECT id FROM create_vantage_webhook($1, ARRAY['sync.started'], NULL, 'json', 'whsec_QmVuY2hCZW5jaEJlbmNoQmVuY2hCZW5jaEJlbmNoISE=')",
        )
        .bind(&url)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        ids.push(id.to_string());
    }
    start(&app, "accounts").await;
    for id in &ids {
        let log = deliveries_when(&app, id, |log| !log.is_empty()).await;
        assert_eq!(log[0]["status"], "FAILED", "{log:?}");
        assert!(log[0]["httpStatus"].is_null());
        let error = log[0]["error"].as_str().unwrap();
        assert!(error.contains("WEBHOOK_ALLOW_PRIVATE"), "{error}");
    }
    assert!(receiver.received("/by-name").is_empty());
    assert!(receiver.received("/by-address").is_empty());
}

/// A webhook is told only of changes committed after it was created, even
/// when their notifications are made later (the worker lags), and of no
/// alert already firing. In the database alone, no server.
#[tokio::test]
async fn a_new_webhook_is_told_only_what_happens_after_it() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let outbox = async |conn: &mut sqlx::PgConnection| -> Vec<(String, Option<String>, String)> {
        sqlx::query_as(
            "SELECT n.type, n.alert, n.resource FROM vantage_sync_webhook_outbox o
             JOIN vantage_sync_notifications n ON n.id = o.notification_id ORDER BY n.id",
        )
        .fetch_all(conn)
        .await
        .unwrap()
    };
    for statement in [
        "SELECT start_vantage_sync('accounts')",
        "SELECT fail_vantage_sync('accounts', '[]')",
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    sqlx::query(
        "SELECT create_vantage_webhook('http://192.0.2.1/hook',
             ARRAY['sync.started', 'sync.failed', 'alert.firing', 'alert.resolved'], NULL, 'json',
             'whsec_QmVuY2hCZW5jaEJlbmNoQmVuY2hCZW5jaEJlbmNoISE=')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // The notifications of the earlier changes are made only now.
    let made: i32 = sqlx::query_scalar("SELECT advance_vantage_sync_notifications(1000)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(made >= 2, "{made}");
    assert_eq!(outbox(&mut conn).await, vec![]);
    // (Each its own transaction: events are written at commit.)
    for statement in [
        "SELECT start_vantage_sync('accounts')",
        "SELECT fail_vantage_sync('accounts', '[]')",
        "SELECT advance_vantage_sync_notifications(1000)",
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    let accounts = || Some("accounts".to_owned());
    assert_eq!(
        outbox(&mut conn)
            .await
            .into_iter()
            .map(|(t, a, r)| (t, a, Some(r)))
            .collect::<Vec<_>>(),
        vec![
            ("sync.started".to_owned(), None, accounts()),
            ("sync.failed".to_owned(), None, accounts()),
        ]
    );
}

/// The README's receiver example, run with python3 as written (only its
/// secret and port filled in): it takes real deliveries and refuses a
/// forged one.
#[tokio::test]
async fn the_readme_receiver_verifies_real_deliveries() {
    use std::io::{BufRead, BufReader};
    let readme = include_str!("../../../README.md");
    let example = readme
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a python block in the README");
    let app = spawn_app(TestDb::migrated().await).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (id, secret) = create(
        &app,
        &format!("http://127.0.0.1:{port}/hook"),
        &["SYNC_FAILED"],
        None,
    )
    .await;
    let script = example
        .replace("\"whsec_...\"", &format!("\"{secret}\""))
        .replace("(\"0.0.0.0\", 9000)", &format!("(\"127.0.0.1\", {port})"));
    assert_ne!(script, example);
    let mut child = std::process::Command::new("python3")
        .args(["-u", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 is needed for this test");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // Until it listens: a POST without headers is refused, not a crash.
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/hook");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&url).send().await.is_err() {
        assert!(Instant::now() < deadline, "the receiver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fail(&app, "accounts").await;
    let line = tokio::time::timeout(Duration::from_secs(5), lines.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "sync.failed None accounts");
    // The answer is recorded in the worker's next round.
    let log = deliveries_when(&app, &id, |log| !log.is_empty()).await;
    assert_eq!(log[0]["status"], "DELIVERED");
    assert_eq!(log[0]["httpStatus"], 204);
    // A forged body with a made-up signature is refused.
    let forged = client
        .post(&url)
        .header("webhook-id", "1")
        .header(
            "webhook-timestamp",
            chrono::Utc::now().timestamp().to_string(),
        )
        .header(
            "webhook-signature",
            "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .body(r#"{"type": "sync.failed"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), reqwest::StatusCode::UNAUTHORIZED);
    let _ = child.kill();
    let _ = child.wait();
}

/// An idle worker writes nothing: its round every second leaves the
/// progress row alone but for the stuck/stale check every 10 s.
#[tokio::test]
async fn an_idle_worker_writes_nothing_but_its_ten_second_check() {
    let app = spawn_app(TestDb::migrated().await).await;
    let mut conn = app.db.connect().await;
    let mut versions = std::collections::HashSet::new();
    for _ in 0..10 {
        let version: String =
            sqlx::query_scalar("SELECT xmin::text FROM vantage_sync_notify_progress")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        versions.insert(version);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Five seconds of rounds: at most the row as found and one check.
    assert!(versions.len() <= 2, "{versions:?}");
}

/// A claim sends a webhook's queued notifications one after another and
/// stops at the first failure: the rest wait for its retry, in order.
#[tokio::test]
async fn a_failure_stops_the_rest_of_a_claim_until_its_retry() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    create(
        &app,
        &receiver.url("/queued"),
        &["SYNC_STARTED", "SYNC_SUCCEEDED"],
        None,
    )
    .await;
    receiver.answer(&[200, 500]);
    // Three changes in one commit: all three queued before any is claimed.
    app.sql(
        "SELECT start_vantage_sync('accounts');
         SELECT complete_vantage_sync('accounts', 1, 1, 0);
         SELECT start_vantage_sync('accounts');",
    )
    .await;
    let received = receiver
        .wait_for("/queued", Duration::from_secs(10), |r| r.len() >= 4)
        .await;
    let sent: Vec<(String, u16)> = received
        .iter()
        .map(|r| (r.id.clone(), r.answered))
        .collect();
    let ids: Vec<&String> = sent.iter().map(|(id, _)| id).collect();
    assert_eq!(sent.len(), 4, "{sent:?}");
    assert_eq!(
        sent.iter().map(|(_, status)| *status).collect::<Vec<_>>(),
        vec![200, 500, 200, 200]
    );
    assert!(
        ids[0] != ids[1] && ids[1] == ids[2] && ids[2] != ids[3],
        "{sent:?}"
    );
    assert_eq!(
        kinds(&received)
            .into_iter()
            .map(|k| k.0)
            .collect::<Vec<_>>(),
        [
            "sync.started",
            "sync.succeeded",
            "sync.succeeded",
            "sync.started"
        ]
    );
    // The retry waited its back-off.
    assert!(received[2].at - received[1].at >= Duration::from_millis(900));
}
