//! GraphQL over SSE (graphql-sse, distinct connections mode): queries and
//! mutations as one `next` then `complete`, refusals as plain POSTs get
//! them, subscriptions whose events carry their cursor as the SSE id, and
//! `Last-Event-ID` resumes after a dropped connection, a server restart and
//! a database restart with every change received once, in order.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use vantage_sync_testkit::{Cluster, SseStream, TestApp, TestDb, subscription_started};

const CHANGES: &str = "subscription($initial: Boolean) {
    syncStateChanged(initial: $initial) { operation resource state { lastSyncStatus } cursor } }";

/// Opens a subscription stream as `authenticated` and waits until the
/// server has started it.
async fn follow(app: &TestApp, variables: Value, last_event_id: Option<&str>) -> SseStream {
    let token = app.token("authenticated");
    let body = json!({"query": CHANGES, "variables": variables});
    subscription_started(&app.url("/metrics"))
        .wait(SseStream::open(
            &app.url("/graphql"),
            Some(&token),
            &body,
            last_event_id,
        ))
        .await
        .unwrap()
}

/// The next change as (operation, resource, status), checking that the
/// event's id is the change's cursor.
async fn change(stream: &mut SseStream) -> (String, String, Option<String>) {
    let (id, payload) = stream.next_payload().await;
    assert!(payload.get("errors").is_none(), "{payload}");
    let change = &payload["data"]["syncStateChanged"];
    assert_eq!(id.as_deref(), change["cursor"].as_str(), "{payload}");
    (
        change["operation"].as_str().unwrap().to_owned(),
        change["resource"].as_str().unwrap().to_owned(),
        change["state"]["lastSyncStatus"]
            .as_str()
            .map(str::to_owned),
    )
}

fn started(resource: &str) -> (String, String, Option<String>) {
    ("UPDATE".into(), resource.into(), Some("RUNNING".into()))
}

#[tokio::test]
async fn a_query_is_one_next_event_then_complete() {
    let app = TestApp::spawn().await;
    let token = app.token("authenticated");
    let body =
        json!({"query": "{ syncState(resource: \"accounts\") { resource lastSyncStatus } }"});
    let mut stream = SseStream::open(&app.url("/graphql"), Some(&token), &body, None)
        .await
        .unwrap();
    let first = stream.expect_event(Duration::from_secs(5)).await;
    assert_eq!(first.event, "next");
    assert_eq!(first.id, None);
    assert_eq!(
        first.json(),
        json!({"data": {"syncState": {"resource": "accounts", "lastSyncStatus": "NEVER_RUN"}}})
    );
    let second = stream.expect_event(Duration::from_secs(5)).await;
    assert_eq!(
        (second.event.as_str(), second.data.as_str()),
        ("complete", "")
    );
    assert_eq!(stream.next_event().await, None, "the stream ends");
}

#[tokio::test]
async fn a_mutation_runs_once_and_reports_like_a_post() {
    let app = TestApp::spawn().await;
    let token = app.token("service_role");
    let body = json!({"query": "mutation { startSync(resource: \"funds\") { lastSyncStatus } }"});
    let mut stream = SseStream::open(&app.url("/graphql"), Some(&token), &body, None)
        .await
        .unwrap();
    let (_, payload) = stream.next_payload().await;
    assert_eq!(
        payload,
        json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}}})
    );
    assert_eq!(
        stream.expect_event(Duration::from_secs(5)).await.event,
        "complete"
    );
    // The same again is refused inside the stream, with its code.
    let mut stream = SseStream::open(&app.url("/graphql"), Some(&token), &body, None)
        .await
        .unwrap();
    let (_, payload) = stream.next_payload().await;
    assert_eq!(payload["data"], Value::Null);
    assert_eq!(
        payload["errors"][0]["extensions"]["code"],
        "ALREADY_RUNNING"
    );
}

#[tokio::test]
async fn refusals_before_the_stream_are_a_plain_posts() {
    let app = TestApp::spawn().await;
    let url = app.url("/graphql");
    let body = json!({"query": CHANGES});
    let refused = SseStream::open(&url, Some("not-a-token"), &body, None).await;
    let Err((status, refusal)) = refused else {
        panic!("a bad token opened a stream")
    };
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(refusal["errors"][0]["extensions"]["code"], "INVALID_TOKEN");
    let refused = SseStream::open(&url, None, &json!({"variables": {}}), None).await;
    let Err((status, refusal)) = refused else {
        panic!("a body without a query opened a stream")
    };
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refusal["errors"][0]["extensions"]["code"], "BAD_USER_INPUT");
    // Without a token the subscription starts and is refused in the stream.
    let mut stream = SseStream::open(&url, None, &body, None).await.unwrap();
    let (_, payload) = stream.next_payload().await;
    assert_eq!(
        payload["errors"][0]["extensions"]["code"],
        "UNAUTHENTICATED"
    );
    assert_eq!(
        stream.expect_event(Duration::from_secs(5)).await.event,
        "complete"
    );
}

#[tokio::test]
async fn subscription_events_carry_their_cursor_as_id_and_snapshots_one_id() {
    let app = TestApp::spawn().await;
    let mut stream = follow(&app, json!({"initial": true}), None).await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        let event = stream.expect_event(Duration::from_secs(5)).await;
        assert_eq!(
            event.json()["data"]["syncStateChanged"]["operation"],
            "SNAPSHOT"
        );
        ids.push(event.id);
    }
    // Only the last SNAPSHOT has an id: a stream cut before it resumes
    // with a whole snapshot again.
    assert!(ids[..6].iter().all(Option::is_none), "{ids:?}");
    assert!(ids[6].is_some());
    app.sql("SELECT start_vantage_sync('accounts')").await;
    assert_eq!(change(&mut stream).await, started("accounts"));
    assert_ne!(stream.last_event_id, ids[6]);
}

/// Reads changes, reconnecting with the last event id whenever the stream
/// ends, until `count` have arrived (none may be repeated).
async fn collect_resuming(
    url: &str,
    token: &str,
    stream: &mut SseStream,
    count: usize,
) -> Vec<(String, String, Option<String>)> {
    let mut changes = Vec::new();
    let body = json!({"query": CHANGES, "variables": {}});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while changes.len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got only {changes:?}"
        );
        match tokio::time::timeout(Duration::from_secs(10), stream.next_event()).await {
            Ok(Some(event)) if event.event == "next" => {
                let payload = event.json();
                if payload.get("errors").is_some() {
                    // An outage: the stream ends next, without `complete`.
                    continue;
                }
                let change = &payload["data"]["syncStateChanged"];
                assert_eq!(event.id.as_deref(), change["cursor"].as_str());
                changes.push((
                    change["operation"].as_str().unwrap().to_owned(),
                    change["resource"].as_str().unwrap().to_owned(),
                    change["state"]["lastSyncStatus"]
                        .as_str()
                        .map(str::to_owned),
                ));
            }
            Ok(Some(event)) => panic!("unexpected {event:?}"),
            Ok(None) => {
                let last = stream.last_event_id.clone();
                match SseStream::open(url, Some(token), &body, last.as_deref()).await {
                    Ok(resumed) => *stream = resumed,
                    // Down or not live yet: try again, as a browser would.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            Err(_) => panic!("no event in time; got {changes:?}"),
        }
    }
    changes
}

#[tokio::test]
async fn a_dropped_connection_resumes_from_last_event_id() {
    let app = TestApp::spawn().await;
    let mut stream = follow(&app, json!({}), None).await;
    app.sql("SELECT start_vantage_sync('accounts')").await;
    assert_eq!(change(&mut stream).await, started("accounts"));
    let last = stream.last_event_id.clone();
    drop(stream);
    app.sql(
        "SELECT start_vantage_sync('funds'); SELECT start_vantage_sync('cashflows');
         SELECT complete_vantage_sync('accounts', 5, 1, 1);",
    )
    .await;
    let mut stream = follow(&app, json!({}), last.as_deref()).await;
    assert_eq!(change(&mut stream).await, started("funds"));
    assert_eq!(change(&mut stream).await, started("cashflows"));
    assert_eq!(
        change(&mut stream).await,
        ("UPDATE".into(), "accounts".into(), Some("SUCCESS".into()))
    );
    // And on live, nothing repeated in between.
    app.sql("SELECT start_vantage_sync('investors')").await;
    assert_eq!(change(&mut stream).await, started("investors"));
    // `initial: true` is ignored when resuming: the client has its snapshot.
    let last = stream.last_event_id.clone();
    drop(stream);
    app.sql("SELECT start_vantage_sync('valuations')").await;
    let mut stream = follow(&app, json!({"initial": true}), last.as_deref()).await;
    assert_eq!(change(&mut stream).await, started("valuations"));
}

#[tokio::test]
async fn an_unknown_last_event_id_is_cursor_expired() {
    let app = TestApp::spawn().await;
    let token = app.token("authenticated");
    let body = json!({"query": CHANGES});
    let mut stream = SseStream::open(&app.url("/graphql"), Some(&token), &body, Some("nonsense"))
        .await
        .unwrap();
    let (_, payload) = stream.next_payload().await;
    assert_eq!(payload["errors"][0]["extensions"]["code"], "CURSOR_EXPIRED");
    assert_eq!(
        stream.expect_event(Duration::from_secs(5)).await.event,
        "complete"
    );
}

#[tokio::test]
async fn a_server_restart_loses_nothing() {
    let mut app = TestApp::spawn().await;
    let (name, url) = (app.db.name.clone(), app.db.url.clone());
    let token = app.token("authenticated");
    let mut stream = follow(&app, json!({}), None).await;
    app.sql("SELECT start_vantage_sync('accounts')").await;
    assert_eq!(change(&mut stream).await, started("accounts"));
    app.begin_shutdown().await.unwrap();
    // Ended without `complete`: the client is to reconnect.
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), stream.next_event())
            .await
            .unwrap(),
        None
    );
    app.sql("SELECT start_vantage_sync('funds'); SELECT fail_vantage_sync('accounts', '[{\"code\":\"E\",\"message\":\"m\"}]')")
        .await;
    let app = TestApp::spawn_with(TestDb { name, url }, |_| {}).await;
    app.sql("SELECT start_vantage_sync('cashflows')").await;
    let changes = collect_resuming(&app.url("/graphql"), &token, &mut stream, 3).await;
    assert_eq!(
        changes,
        vec![
            started("funds"),
            ("UPDATE".into(), "accounts".into(), Some("FAILED".into())),
            started("cashflows"),
        ]
    );
}

#[tokio::test]
async fn a_database_restart_loses_nothing() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let app = TestApp::spawn_with(TestDb::migrated_on(&cluster).await, |_| {}).await;
    let token = app.token("authenticated");
    let mut stream = follow(&app, json!({}), None).await;
    app.sql("SELECT start_vantage_sync('accounts')").await;
    assert_eq!(change(&mut stream).await, started("accounts"));
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster.restart();
        cluster
    })
    .await
    .unwrap();
    app.sql("SELECT start_vantage_sync('funds'); SELECT start_vantage_sync('cashflows')")
        .await;
    let changes = collect_resuming(&app.url("/graphql"), &token, &mut stream, 2).await;
    assert_eq!(changes, vec![started("funds"), started("cashflows")]);
    app.sql("SELECT start_vantage_sync('investors')").await;
    let changes = collect_resuming(&app.url("/graphql"), &token, &mut stream, 1).await;
    assert_eq!(changes, vec![started("investors")]);
    drop(cluster);
}

#[tokio::test]
async fn an_idle_stream_gets_keep_alive_comments_and_counts_as_a_subscription() {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.websocket.ping_interval = Duration::from_secs(1);
    })
    .await;
    let mut stream = follow(&app, json!({}), None).await;
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("vantage_sync_subscriptions_active 1"),
        "{metrics}"
    );
    // Idle for a little over two intervals: comments keep it open.
    let idle = tokio::time::timeout(Duration::from_millis(2_500), stream.next_event()).await;
    assert!(idle.is_err(), "an idle stream sent {idle:?}");
    assert!(stream.comments >= 2, "{} keep-alives", stream.comments);
    app.sql("SELECT start_vantage_sync('accounts')").await;
    assert_eq!(change(&mut stream).await, started("accounts"));
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("vantage_sync_subscription_events_delivered_total 1"),
        "{metrics}"
    );
    drop(stream);
}

/// A stream does not outlive its token: INVALID_TOKEN, then `complete`.
#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let exp = vantage_sync_testkit::unix_now() + 2;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "authenticated", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(vantage_sync_testkit::SECRET.as_bytes()),
    )
    .unwrap();
    let body = json!({"query": CHANGES});
    let mut stream = subscription_started(&app.url("/metrics"))
        .wait(SseStream::open(
            &app.url("/graphql"),
            Some(&token),
            &body,
            None,
        ))
        .await
        .unwrap();
    let (id, payload) = stream.next_payload().await;
    assert_eq!(id, None);
    assert_eq!(
        payload["errors"][0]["extensions"]["code"], "INVALID_TOKEN",
        "{payload}"
    );
    assert_eq!(
        stream.expect_event(Duration::from_secs(1)).await.event,
        "complete"
    );
    assert_eq!(stream.next_event().await, None);
}
