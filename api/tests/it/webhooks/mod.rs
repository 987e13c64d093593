//! Alerts and webhooks, end to end: changes made through the API
//! or straight in PostgreSQL reach a receiver on a loopback port, signed,
//! at least once, in order, across retries, restarts and replicas.

mod alerts;
mod delivery;
mod refusals;
mod replicas;
mod retries;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vantage_sync::webhooks::WebhookSettings;
use vantage_sync_testkit::{Received, TestApp, TestDb};

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
