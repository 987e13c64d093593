//! What is delivered and how: signed alert and sync notifications, their
//! payloads and order, JSON and Slack formats, what a new webhook is told,
//! and the documented receiver example.

use std::time::{Duration, Instant};

use serde_json::json;
use vantage_sync_testkit::{Receiver, TestDb, signature_is_valid};

use super::{
    CREATE, create, deliveries_when, eventually_alerts, fail, kind, kinds, mutate, run, spawn_app,
    succeed,
};

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
    // Succeeding also ends `stale` (the initial resources had never run).
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

/// The receiver example of the alerts and webhooks page, run with python3
/// as written (only its secret and port filled in): it takes real
/// deliveries and refuses a forged one.
#[tokio::test]
async fn the_documented_receiver_verifies_real_deliveries() {
    use std::io::{BufRead, BufReader};
    let page = include_str!("../../../../docs/alerts-and-webhooks.md");
    let example = page
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a python block in docs/alerts-and-webhooks.md");
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

/// Every field of `SyncState` a query can read without the database.
const STATE_FIELDS: &str = "resource lastSyncTime lastSyncStatus recordsSynced \
    recordsCreated recordsUpdated errors { code message recordId timestamp details } \
    startedAt completedAt durationMs createdAt updatedAt errorCount runningSeconds \
    hoursSinceSync durationSeconds recordsPerSecond health";

#[tokio::test]
async fn a_payload_state_is_what_a_query_returns() {
    let app = spawn_app(TestDb::migrated().await).await;
    let receiver = Receiver::start().await;
    create(
        &app,
        &receiver.url("/hooks"),
        &["SYNC_SUCCEEDED", "SYNC_FAILED"],
        None,
    )
    .await;
    succeed(&app, "funds").await;
    let errors = r#"[{code: "HTTP_500", message: "upstream down", recordId: "r-1",
        timestamp: "2026-12-01T10:00:00+01:00", details: {attempt: 3, body: ["x"]}}]"#;
    run(
        &app,
        "accounts",
        &format!(r#"failSync(resource: "accounts", errors: {errors})"#),
    )
    .await;
    let received = receiver
        .wait_for("/hooks", Duration::from_secs(2), |r| r.len() >= 2)
        .await;
    for notification in &received {
        let body = notification.json();
        let resource = body["resource"].as_str().unwrap();
        let mut delivered = body["state"].clone();
        let mut queried = app
            .query(
                "service_role",
                &format!(r#"{{ syncState(resource: "{resource}") {{ {STATE_FIELDS} }} }}"#),
                json!({}),
            )
            .await["data"]["syncState"]
            .clone();
        // Hours since the last success move with the clock between the
        // notification and the query; everything else is as of the row.
        let hours = |state: &mut serde_json::Value| state["hoursSinceSync"].take().as_f64();
        match (hours(&mut delivered), hours(&mut queried)) {
            (Some(then), Some(now)) => assert!((0.0..0.01).contains(&(now - then)), "{then} {now}"),
            (then, now) => assert_eq!(then, now, "{resource}"),
        }
        assert_eq!(delivered, queried, "{resource}");
    }
    assert_eq!(
        kinds(&received),
        vec![
            kind("sync.succeeded", None, "funds"),
            kind("sync.failed", None, "accounts"),
        ]
    );
}
