//! Failed deliveries: retries with back-off, the retry window, 410
//! disabling a webhook, a dead receiver and a server restart, and a
//! failure holding back the rest of a claim.

use std::time::Duration;

use serde_json::json;
use vantage_sync::webhooks::WebhookSettings;
use vantage_sync_testkit::{Receiver, TestApp, TestDb};

use super::{
    create, deliveries, deliveries_when, eventually, fail, kind, kinds, same_db, spawn_app, start,
};

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
    let hook = &first_webhook(&app).await;
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
    let fetch = async || first_webhook(&app).await;
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

/// The first webhook's id, whether it is enabled, and why not.
async fn first_webhook(app: &TestApp) -> serde_json::Value {
    let body = app
        .query(
            "service_role",
            "{ webhooks { id enabled disabledReason } }",
            json!({}),
        )
        .await;
    body["data"]["webhooks"][0].clone()
}
