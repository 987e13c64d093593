//! GraphQL over SSE (graphql-sse, distinct connections mode): queries and
//! mutations as one `next` then `complete`, refusals as plain POSTs get
//! them, subscriptions whose events carry their cursor as the SSE id, and
//! `Last-Event-ID` resumes after a dropped connection, a server restart and
//! a database restart with every change received once, in order.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use vantage_sync_testkit::{
    Cluster, SseStream, TestApp, TestDb, metric_value, subscription_started, subscriptions_active,
};

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
    // Caught up, the stream is written to by the renderer itself, in the
    // same form.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    assert_eq!(change(&mut stream).await, started("funds"));
    let metrics = app.metrics().await;
    let written_directly =
        metric_value(&metrics, "vantage_sync_subscription_written_directly_total");
    assert!(written_directly >= Some(1.0), "{metrics}");
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

/// Writes `request` to `socket` and reads the answer's head (lower-cased)
/// and whatever body bytes came with it.
async fn head_of(socket: &mut tokio::net::TcpStream, request: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = raw.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            return (head, raw[end + 4..].to_vec());
        }
        let mut buffer = [0_u8; 4096];
        let read = tokio::time::timeout_at(deadline, socket.read(&mut buffer))
            .await
            .expect("no answer")
            .unwrap();
        assert!(read > 0, "closed before a head: {raw:?}");
        raw.extend_from_slice(&buffer[..read]);
    }
}

/// Subscribes to every change as a stream on `socket`, once the server
/// has started it; the answer's head.
async fn subscribe_on(app: &TestApp, socket: &mut tokio::net::TcpStream) -> String {
    let request = sse_request(app, "subscription { syncStateChanged { resource } }");
    let started = subscription_started(&app.url("/metrics"));
    started.wait(head_of(socket, &request)).await.0
}

fn sse_request(app: &TestApp, query: &str) -> String {
    let body = json!({"query": query}).to_string();
    format!(
        "POST /graphql HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
         accept: text/event-stream\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        app.addr,
        app.token("authenticated"),
        body.len()
    )
}

/// A connection whose first request is an event stream is served outside
/// hyper (no per-connection buffers): chunked, closed when the stream
/// ends, and its subscription freed as soon as the client goes away,
/// without waiting for a write to fail. A stream asked for later on a
/// kept-alive connection is hyper's, and works the same.
#[tokio::test]
async fn an_event_stream_connection_is_its_own_and_freed_when_the_client_leaves() {
    use tokio::io::AsyncReadExt;
    let app = TestApp::spawn().await;
    let metrics_url = app.url("/metrics");

    // A query as a stream: next, complete, the last chunk, then the close.
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (head, mut body) =
        head_of(&mut socket, &sse_request(&app, "{ syncStats { total } }")).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    socket.read_to_end(&mut body).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("event: next"), "{text}");
    assert!(text.contains("event: complete"), "{text}");
    assert!(text.ends_with("0\r\n\r\n"), "{text:?}");

    // A subscription, then the client leaves: freed at once.
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = subscribe_on(&app, &mut socket).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(subscriptions_active(&metrics_url).await, 1);
    drop(socket);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while subscriptions_active(&metrics_url).await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A plain query first, then a stream on the same connection: hyper's.
    let mut socket = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let query = json!({"query": "{ syncStats { total } }"}).to_string();
    let plain = format!(
        "POST /graphql HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{query}",
        app.addr,
        app.token("authenticated"),
        query.len()
    );
    let (head, body) = head_of(&mut socket, &plain).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut rest = vec![0_u8; length - body.len()];
    socket.read_exact(&mut rest).await.unwrap();
    let head = subscribe_on(&app, &mut socket).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    app.sql("SELECT start_vantage_sync('funds')").await;
    let mut buffer = [0_u8; 4096];
    let mut seen = String::new();
    while !seen.contains("funds") {
        let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buffer))
            .await
            .expect("no change")
            .unwrap();
        assert!(read > 0);
        seen.push_str(&String::from_utf8_lossy(&buffer[..read]));
    }
}
