//! The per-caller rate limit: 429 with Retry-After and
//! RATE_LIMITED past the budget, each caller (`sub`, else address) on its
//! own budget, WebSocket subscribe messages counted with requests.

use reqwest::StatusCode;
use serde_json::{Value, json};
use vantage_sync_testkit::{SECRET, TestApp, TestDb, WsClient, unix_now};

async fn limited_app(rate: &str) -> TestApp {
    let rate = rate.parse().unwrap();
    TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.rate_limit = Some(rate);
    })
    .await
}

/// A token for `authenticated` with `sub`.
fn token_for(sub: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "authenticated", "sub": sub, "exp": unix_now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn ask(app: &TestApp, token: Option<&str>) -> (StatusCode, Option<u64>, Value) {
    let mut request = app
        .client
        .post(app.url("/graphql"))
        .json(&json!({"query": "{ __typename }"}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    (status, retry_after, response.json().await.unwrap())
}

#[tokio::test]
async fn a_caller_over_its_rate_gets_429_and_others_are_unaffected() {
    let app = limited_app("3/m").await;
    let alice = token_for("alice");
    for _ in 0..3 {
        assert_eq!(ask(&app, Some(&alice)).await.0, StatusCode::OK);
    }
    let (status, retry_after, body) = ask(&app, Some(&alice)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry_after = retry_after.expect("a Retry-After header");
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert_eq!(body["errors"][0]["extensions"]["code"], "RATE_LIMITED");
    assert_eq!(
        body["errors"][0]["message"],
        format!("too many requests: try again in {retry_after} s (RATE_LIMIT)")
    );
    // Another caller has a budget of its own.
    assert_eq!(ask(&app, Some(&token_for("bob"))).await.0, StatusCode::OK);
    // Callers without a token are counted by address.
    for _ in 0..3 {
        assert_eq!(ask(&app, None).await.0, StatusCode::OK);
    }
    assert_eq!(ask(&app, None).await.0, StatusCode::TOO_MANY_REQUESTS);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("vantage_sync_rate_limited_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn websocket_subscribe_messages_count_against_the_same_budget() {
    let app = limited_app("2/m").await;
    let carol = token_for("carol");
    assert_eq!(ask(&app, Some(&carol)).await.0, StatusCode::OK);
    let mut client = WsClient::connect(&app, "graphql-transport-ws").await;
    let ack = client
        .init(json!({"Authorization": format!("Bearer {carol}")}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "connection_ack");
    let query = "subscription { syncStateChanged { resource } }";
    client.follow(query, json!({})).await;
    client.subscribe("2", query, json!({})).await;
    let refused = client.recv().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["id"], "2");
    assert_eq!(refused["payload"][0]["extensions"]["code"], "RATE_LIMITED");
    // The first subscription runs.
    app.sql("SELECT start_vantage_sync('accounts')").await;
    let next = client.recv().await;
    assert_eq!(next["id"], "1", "{next}");
    assert_eq!(
        next["payload"]["data"]["syncStateChanged"]["resource"],
        "accounts"
    );
}
