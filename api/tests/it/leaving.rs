//! How a replica leaves: on the stop signal `/readyz` answers 503 while
//! requests are still served for the shutdown delay, then it stops
//! accepting, WebSockets close with 1001, and it is gone within the delay
//! plus the shutdown timeout.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use vantage_sync::server::Leaving;
use vantage_sync_testkit::{TestApp, TestDb, WsClient};

#[tokio::test]
async fn a_leaving_replica_says_so_on_readyz_while_it_still_serves() {
    let delay = Duration::from_secs(2);
    let timeout = Duration::from_secs(3);
    let mut app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.leaving = Leaving { delay, timeout };
    })
    .await;
    let mut subscriber = WsClient::connect(&app, "graphql-transport-ws").await;
    subscriber
        .send(json!({
            "type": "connection_init",
            "payload": {"Authorization": format!("Bearer {}", app.token("authenticated"))},
        }))
        .await;
    assert_eq!(subscriber.recv().await["type"], "connection_ack");

    let told = Instant::now();
    let stopped = app.begin_shutdown();
    // Within the delay: not ready, still serving, the WebSocket still open.
    let mut checked = 0;
    while told.elapsed() < delay - Duration::from_millis(500) {
        let ready = app.client.get(app.url("/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready.text().await.unwrap(), "leaving");
        let (status, body) = app
            .graphql(
                Some("authenticated"),
                "{ syncStats { totalResources } }",
                json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"]["syncStats"]["totalResources"], 7);
        checked += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checked >= 5, "only {checked} checks in the delay");
    // Then the WebSocket is told to go, with 1001, once the delay is over.
    let closed = subscriber.next().await;
    let closed_after = told.elapsed();
    assert_eq!(closed.map_err(|(code, _)| code), Err(1001));
    assert!(closed_after >= delay, "closed after {closed_after:?}");
    // And the server is gone within the delay plus the timeout.
    tokio::time::timeout(delay + timeout, stopped)
        .await
        .expect("the server outlived its shutdown delay and timeout")
        .unwrap();
    assert!(app.client.get(app.url("/healthz")).send().await.is_err());
}
