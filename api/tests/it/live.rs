//! The live feed over WebSocket: both subprotocols, snapshots, filters,
//! every writer, ordering under concurrency, resuming, expiry, auth.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use vantage_sync_testkit::{TestApp, WsClient};

const CHANGES: &str = "subscription($resources: [String!], $initial: Boolean, $after: String) {
    syncStateChanged(resources: $resources, initial: $initial, after: $after) {
        operation resource state { lastSyncStatus recordsSynced } cursor
    } }";

/// The error code of a refused subscription: graphql-transport-ws allows
/// an `error` message or a `next` carrying errors (what async-graphql sends).
fn refusal_code(message: &Value) -> Option<&str> {
    match message["type"].as_str() {
        Some("error") => message["payload"][0]["extensions"]["code"].as_str(),
        Some("next") => message["payload"]["errors"][0]["extensions"]["code"].as_str(),
        _ => None,
    }
}

/// The next change on subscription "1" as (operation, resource, status, cursor).
async fn change(client: &mut WsClient) -> (String, String, Option<String>, String) {
    let (id, data) = client.next_data().await;
    assert_eq!(id, "1");
    let change = &data["syncStateChanged"];
    (
        change["operation"].as_str().unwrap().to_owned(),
        change["resource"].as_str().unwrap().to_owned(),
        change["state"]["lastSyncStatus"]
            .as_str()
            .map(str::to_owned),
        change["cursor"].as_str().unwrap().to_owned(),
    )
}

fn short(change: &(String, String, Option<String>, String)) -> (&str, &str, Option<&str>) {
    (change.0.as_str(), change.1.as_str(), change.2.as_deref())
}

#[tokio::test]
async fn graphql_transport_ws_delivers_changes() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    assert_eq!(client.protocol.as_deref(), Some("graphql-transport-ws"));
    client.follow(CHANGES, json!({})).await;
    app.sql("SELECT start_vantage_sync('accounts')").await;
    let got = change(&mut client).await;
    assert_eq!(short(&got), ("UPDATE", "accounts", Some("RUNNING")));
    assert!(got.3.starts_with("1:"));
    let metrics = app.metrics().await;
    for line in [
        "vantage_sync_subscriptions_active 1",
        "vantage_sync_subscription_events_delivered_total 1",
        "vantage_sync_subscription_delivery_delay_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    client.send(json!({"id": "1", "type": "complete"})).await;
    client.close().await;
}

#[tokio::test]
async fn legacy_graphql_ws_delivers_changes() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::connect(&app, "graphql-ws").await;
    assert_eq!(client.protocol.as_deref(), Some("graphql-ws"));
    let ack = client
        .init(
            json!({"headers": {"Authorization": format!("Bearer {}", app.token("service_role"))}}),
        )
        .await
        .unwrap();
    assert_eq!(ack["type"], "connection_ack");
    client
        .send(json!({"id": "1", "type": "start", "payload": {"query": CHANGES, "variables": {"resources": ["funds"]}}})).await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    let message = client.recv().await;
    assert_eq!(message["type"], "data", "{message}");
    assert_eq!(
        message["payload"]["data"]["syncStateChanged"]["resource"],
        "funds"
    );
    assert_eq!(
        message["payload"]["data"]["syncStateChanged"]["operation"],
        "UPDATE"
    );
}

#[tokio::test]
async fn both_protocols_offered_picks_one_for_handshake_and_messages() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::connect(&app, "graphql-ws, graphql-transport-ws").await;
    assert_eq!(client.protocol.as_deref(), Some("graphql-transport-ws"));
    let ack = client
        .init(json!({"Authorization": format!("Bearer {}", app.token("authenticated"))}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "connection_ack");
    client
        .follow(CHANGES, json!({"resources": ["cashflows"]}))
        .await;
    app.sql("SELECT start_vantage_sync('cashflows')").await;
    // graphql-transport-ws answers "next", not the legacy "data".
    assert_eq!(
        short(&change(&mut client).await),
        ("UPDATE", "cashflows", Some("RUNNING"))
    );
}

#[tokio::test]
async fn initial_snapshot_then_live_changes() {
    let app = TestApp::spawn().await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .subscribe(
            "1",
            CHANGES,
            json!({"resources": ["funds", "accounts"], "initial": true}),
        )
        .await;
    let first = change(&mut client).await;
    let second = change(&mut client).await;
    assert_eq!(short(&first), ("SNAPSHOT", "accounts", Some("NEVER_RUN")));
    assert_eq!(short(&second), ("SNAPSHOT", "funds", Some("RUNNING")));
    app.sql("SELECT complete_vantage_sync('funds', 3, 1, 1); SELECT start_vantage_sync('valuations'); SELECT start_vantage_sync('accounts');",
    )
    .await;
    assert_eq!(
        short(&change(&mut client).await),
        ("UPDATE", "funds", Some("SUCCESS"))
    );
    assert_eq!(
        short(&change(&mut client).await),
        ("UPDATE", "accounts", Some("RUNNING"))
    );
}

/// Changes made by GraphQL, by the SQL functions and by plain SQL all
/// arrive, with INSERT, UPDATE and DELETE (null state).
#[tokio::test]
async fn every_writer_and_operation_arrives() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.follow(CHANGES, json!({})).await;
    app.query(
        "service_role",
        "mutation { registerResource(resource: \"fx_rates\") { resource } }",
        json!({}),
    )
    .await;
    app.sql("SELECT start_vantage_sync('fx_rates')").await;
    app.sql("UPDATE vantage_sync_state SET records_synced = 5 WHERE resource = 'fx_rates'")
        .await;
    app.query(
        "service_role",
        "mutation { removeResource(resource: \"fx_rates\") { resource } }",
        json!({}),
    )
    .await;
    app.sql("INSERT INTO vantage_sync_state (resource) VALUES ('plain_sql')")
        .await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let change = change(&mut client).await;
        got.push((change.0, change.1, change.2));
    }
    let expected = [
        ("INSERT", "fx_rates", Some("NEVER_RUN")),
        ("UPDATE", "fx_rates", Some("RUNNING")),
        ("UPDATE", "fx_rates", Some("RUNNING")),
        ("DELETE", "fx_rates", None),
        ("INSERT", "plain_sql", Some("NEVER_RUN")),
    ]
    .map(|(op, resource, status)| {
        (
            op.to_owned(),
            resource.to_owned(),
            status.map(str::to_owned),
        )
    });
    assert_eq!(got, expected);
}

#[tokio::test]
async fn twenty_rapid_transitions_arrive_complete_and_in_order() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .follow(CHANGES, json!({"resources": ["accounts"]}))
        .await;
    let mut script = String::new();
    for i in 0..10 {
        script.push_str(&format!(
            "SELECT start_vantage_sync('accounts'); SELECT complete_vantage_sync('accounts', {i}, 0, 0);"
        ));
    }
    app.sql(&script).await;
    for i in 0..10 {
        assert_eq!(
            short(&change(&mut client).await),
            ("UPDATE", "accounts", Some("RUNNING")),
            "#{i}"
        );
        let (id, data) = client.next_data().await;
        assert_eq!(id, "1");
        assert_eq!(
            data["syncStateChanged"]["state"],
            json!({"lastSyncStatus": "SUCCESS", "recordsSynced": i})
        );
    }
}

/// Eight resources written at once from eight connections, one subscriber
/// to all: every event exactly once, each resource's events in order.
#[tokio::test]
async fn concurrent_writers_every_event_exactly_once_in_per_resource_order() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.follow(CHANGES, json!({})).await;
    let resources = ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8"];
    let rounds = 15;
    let writers: Vec<_> = resources
        .iter()
        .map(|resource| {
            let url = app.db.url.clone();
            let resource = resource.to_string();
            tokio::spawn(async move {
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                    .await
                    .unwrap();
                for round in 0..rounds {
                    sqlx::query("SELECT start_vantage_sync($1)")
                        .bind(&resource)
                        .execute(&mut conn)
                        .await
                        .unwrap();
                    sqlx::query("SELECT complete_vantage_sync($1, $2, 0, 0)")
                        .bind(&resource)
                        .bind(round)
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // Per resource: start creates the row (INSERT), then alternating updates.
    let total = resources.len() * rounds as usize * 2;
    let mut seen: HashMap<String, Vec<(String, Value)>> = HashMap::new();
    let mut cursors = std::collections::HashSet::new();
    for received in 0..total {
        let message = match tokio::time::timeout(Duration::from_secs(5), client.next()).await {
            Ok(Ok(message)) => message,
            other => {
                let mut conn = app.db.connect().await;
                let logged: Vec<(i64, String, i64)> =
                    sqlx::query_as("SELECT id, resource, xid FROM vantage_sync_events ORDER BY id")
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                let got: Vec<&String> = cursors.iter().collect();
                panic!("after {received} of {total}: {other:?}\ncursors {got:?}\nlog {logged:?}");
            }
        };
        let data = message["payload"]["data"].clone();
        let change = &data["syncStateChanged"];
        assert!(
            cursors.insert(change["cursor"].as_str().unwrap().to_owned()),
            "duplicate {change}"
        );
        seen.entry(change["resource"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                change["operation"].as_str().unwrap().to_owned(),
                change["state"].clone(),
            ));
    }
    for resource in resources {
        let events = &seen[resource];
        assert_eq!(events.len(), rounds as usize * 2, "{resource}");
        for (index, (operation, state)) in events.iter().enumerate() {
            let round = index / 2;
            let expected_op = if index == 0 { "INSERT" } else { "UPDATE" };
            assert_eq!(operation, expected_op, "{resource} #{index}");
            if index % 2 == 0 {
                assert_eq!(state["lastSyncStatus"], "RUNNING", "{resource} #{index}");
            } else {
                assert_eq!(
                    state,
                    &json!({"lastSyncStatus": "SUCCESS", "recordsSynced": round}),
                    "{resource} #{index}"
                );
            }
        }
    }
    // And nothing more.
    let extra = tokio::time::timeout(Duration::from_millis(500), client.next()).await;
    assert!(extra.is_err(), "unexpected extra message: {extra:?}");
}

/// A client that reconnects with the last cursor it saw gets exactly what
/// it missed, then live changes.
#[tokio::test]
async fn reconnecting_with_the_last_cursor_replays_exactly_what_was_missed() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .follow(CHANGES, json!({"resources": ["funds", "accounts"]}))
        .await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    let seen = change(&mut client).await;
    client.close().await;
    app.sql("SELECT complete_vantage_sync('funds', 1, 1, 0); SELECT start_vantage_sync('cashflows'); SELECT start_vantage_sync('accounts');",
    )
    .await;
    let mut again = WsClient::ready(&app, "authenticated").await;
    again
        .subscribe(
            "1",
            CHANGES,
            json!({"resources": ["funds", "accounts"], "after": seen.3}),
        )
        .await;
    assert_eq!(
        short(&change(&mut again).await),
        ("UPDATE", "funds", Some("SUCCESS"))
    );
    assert_eq!(
        short(&change(&mut again).await),
        ("UPDATE", "accounts", Some("RUNNING"))
    );
    app.sql("SELECT fail_vantage_sync('accounts', '[]')").await;
    assert_eq!(
        short(&change(&mut again).await),
        ("UPDATE", "accounts", Some("FAILED"))
    );
}

/// A snapshot's cursor resumes after the snapshot: no change already in it
/// comes again, none after it is lost.
#[tokio::test]
async fn resuming_from_a_snapshot_cursor() {
    let app = TestApp::spawn().await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .subscribe(
            "1",
            CHANGES,
            json!({"resources": ["funds"], "initial": true}),
        )
        .await;
    let snapshot = change(&mut client).await;
    assert_eq!(short(&snapshot), ("SNAPSHOT", "funds", Some("RUNNING")));
    client.close().await;
    app.sql("SELECT complete_vantage_sync('funds', 2, 1, 1)")
        .await;
    let mut again = WsClient::ready(&app, "authenticated").await;
    again
        .subscribe(
            "1",
            CHANGES,
            json!({"resources": ["funds"], "after": snapshot.3}),
        )
        .await;
    assert_eq!(
        short(&change(&mut again).await),
        ("UPDATE", "funds", Some("SUCCESS"))
    );
    let extra = tokio::time::timeout(Duration::from_millis(400), again.next()).await;
    assert!(extra.is_err(), "{extra:?}");
}

#[tokio::test]
async fn pruned_or_unknown_cursors_are_refused() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.follow(CHANGES, json!({})).await;
    app.sql("SELECT start_vantage_sync('funds'); SELECT complete_vantage_sync('funds', 1, 0, 0);")
        .await;
    let first = change(&mut client).await;
    let _second = change(&mut client).await;
    app.sql("SELECT advance_vantage_sync_notifications(100000); SELECT prune_vantage_sync_events(interval '0 seconds')")
        .await;
    for (cursor, why) in [
        (first.3.as_str(), "pruned"),
        ("1:999999", "unknown"),
        ("garbage", "malformed"),
    ] {
        client
            .subscribe("2", CHANGES, json!({"after": cursor}))
            .await;
        let message = client.recv().await;
        assert_eq!(message["id"], "2");
        assert_eq!(
            refusal_code(&message),
            Some("CURSOR_EXPIRED"),
            "{why}: {message}"
        );
        let complete = client.recv().await;
        assert_eq!(complete, json!({"type": "complete", "id": "2"}));
    }
}

#[tokio::test]
async fn anon_cannot_subscribe_and_bad_tokens_are_refused() {
    let app = TestApp::spawn().await;
    let mut anon = WsClient::connect(&app, "graphql-transport-ws").await;
    assert_eq!(
        anon.init(json!({})).await.unwrap()["type"],
        "connection_ack"
    );
    anon.subscribe("1", CHANGES, json!({})).await;
    let message = anon.recv().await;
    assert_eq!(refusal_code(&message), Some("UNAUTHENTICATED"), "{message}");

    let mut bad = WsClient::connect(&app, "graphql-transport-ws").await;
    let closed = bad.init(json!({"Authorization": "Bearer garbage"})).await;
    assert_eq!(closed.unwrap_err().0, 4403);

    // A bad token on the upgrade request is refused before upgrading.
    let refused =
        WsClient::connect_with(&app, "graphql-transport-ws", Some("Bearer garbage")).await;
    assert!(refused.is_err());
    // A good one there is enough, without a token in connection_init.
    let header = format!("Bearer {}", app.token("authenticated"));
    let mut by_header = WsClient::connect_with(&app, "graphql-transport-ws", Some(&header))
        .await
        .unwrap();
    assert_eq!(
        by_header.init(json!({})).await.unwrap()["type"],
        "connection_ack"
    );
    by_header
        .follow(CHANGES, json!({"resources": ["funds"]}))
        .await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    assert_eq!(
        short(&change(&mut by_header).await),
        ("UPDATE", "funds", Some("RUNNING"))
    );
}

#[tokio::test]
async fn protocol_errors_get_the_spec_close_codes() {
    let db = vantage_sync_testkit::TestDb::migrated().await;
    let app = TestApp::spawn_with(db, |config| {
        config.websocket.init_timeout = Duration::from_secs(1);
        config.websocket.max_subscriptions = 2;
    })
    .await;
    // No connection_init in time: 4408.
    let mut silent = WsClient::connect(&app, "graphql-transport-ws").await;
    assert_eq!(silent.closed().await.0, 4408);
    // Over the cap: an error for that subscription, the others go on.
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.subscribe("a", CHANGES, json!({})).await;
    client.subscribe("b", CHANGES, json!({})).await;
    client.subscribe("c", CHANGES, json!({})).await;
    let refused = client.recv().await;
    assert_eq!(
        (refused["type"].as_str(), refused["id"].as_str()),
        (Some("error"), Some("c")),
        "{refused}"
    );
    // An id longer than 128 bytes: an error for that subscription.
    let long = "x".repeat(129);
    client.subscribe(&long, CHANGES, json!({})).await;
    let refused = client.recv().await;
    assert_eq!(
        (
            refused["type"].as_str(),
            refused["payload"][0]["message"].as_str()
        ),
        (
            Some("error"),
            Some("subscription ids are at most 128 bytes")
        ),
        "{refused}"
    );
    // A duplicate id: 4409.
    client.subscribe("a", CHANGES, json!({})).await;
    assert_eq!(client.closed().await.0, 4409);
    // A subscribe before the acknowledgement: 4401.
    let mut early = WsClient::connect(&app, "graphql-transport-ws").await;
    early.subscribe("1", CHANGES, json!({})).await;
    assert_eq!(early.closed().await, (4401, "Unauthorized".to_owned()));
    // A second connection_init: 4429.
    let mut twice = WsClient::ready(&app, "authenticated").await;
    let again = twice.init(json!({})).await;
    assert_eq!(again.unwrap_err().0, 4429);
    // A message that is not one of the protocol's: 4400.
    let mut garbled = WsClient::ready(&app, "authenticated").await;
    garbled.send(json!({"type": "subscribe", "id": 7})).await;
    assert_eq!(garbled.closed().await.0, 4400);
    // A subprotocol nobody speaks is refused.
    assert!(WsClient::connect_with(&app, "mqtt", None).await.is_err());
}

/// A subscription does not outlive its token: 4403 when it expires.
#[tokio::test]
async fn token_expiry_ends_the_connection() {
    let app = TestApp::spawn().await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "authenticated", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(vantage_sync_testkit::SECRET.as_bytes()),
    )
    .unwrap();
    let mut client = WsClient::connect(&app, "graphql-transport-ws").await;
    assert_eq!(
        client
            .init(json!({"Authorization": format!("Bearer {token}")}))
            .await
            .unwrap()["type"],
        "connection_ack"
    );
    client.follow(CHANGES, json!({})).await;
    let started = std::time::Instant::now();
    let (code, reason) = client.closed().await;
    assert_eq!((code, reason.as_str()), (4403, "token expired"));
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// Two server processes on one database: a change made through one
/// reaches the subscribers of the other.
#[tokio::test]
async fn a_change_through_one_replica_reaches_another() {
    let first = TestApp::spawn().await;
    let second_db = vantage_sync_testkit::TestDb {
        name: first.db.name.clone(),
        url: first.db.url.clone(),
    };
    let second = TestApp::spawn_with(second_db, |_| {}).await;
    let mut client = WsClient::ready(&second, "authenticated").await;
    client.subscribe("1", CHANGES, json!({})).await;
    first
        .query(
            "service_role",
            "mutation { startSync(resource: \"investors\") { resource } }",
            json!({}),
        )
        .await;
    assert_eq!(
        short(&change(&mut client).await),
        ("UPDATE", "investors", Some("RUNNING"))
    );
}

/// A subscriber that reads nothing while thousands of changes happen is
/// not queued for: it falls behind the bounded buffer and, once it reads
/// again, is fed from the log, losing nothing.
#[tokio::test]
async fn a_slow_subscriber_catches_up_from_the_log() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .subscribe("1", CHANGES, json!({"resources": ["accounts"]}))
        .await;
    let mut script = String::new();
    for i in 0..1500 {
        script.push_str(&format!(
            "SELECT start_vantage_sync('accounts'); SELECT complete_vantage_sync('accounts', {i}, 0, 0);"
        ));
    }
    app.sql(&script).await;
    let mut previous: Option<String> = None;
    for i in 0..1500 {
        let running = change(&mut client).await;
        assert_eq!(running.2.as_deref(), Some("RUNNING"), "#{i}");
        let (_, data) = client.next_data().await;
        assert_eq!(
            data["syncStateChanged"]["state"]["recordsSynced"], i,
            "#{i}"
        );
        let cursor = data["syncStateChanged"]["cursor"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(previous.as_ref(), Some(&cursor));
        previous = Some(cursor);
    }
}

/// The server pings idle connections (graphql-transport-ws `ping`,
/// legacy `ka`), so proxies keep them open and dead peers are noticed.
#[tokio::test]
async fn the_server_sends_keep_alive_pings() {
    let db = vantage_sync_testkit::TestDb::migrated().await;
    let app = TestApp::spawn_with(db, |config| {
        config.websocket.ping_interval = Duration::from_millis(300)
    })
    .await;
    let mut modern = WsClient::ready(&app, "authenticated").await;
    assert_eq!(modern.raw().await, json!({"type": "ping"}));
    let mut legacy = WsClient::connect(&app, "graphql-ws").await;
    let ack = legacy
        .init(json!({"Authorization": format!("Bearer {}", app.token("authenticated"))}))
        .await
        .unwrap();
    assert_eq!(ack["type"], "connection_ack");
    assert_eq!(legacy.raw().await, json!({"type": "ka"}));
}

/// Shutting down tells subscribers to go away (1001) rather than cutting
/// them off, so they resume elsewhere with their cursor.
#[tokio::test]
async fn shutdown_closes_subscriptions_with_going_away() {
    let mut app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client.follow(CHANGES, json!({})).await;
    let stopped = app.begin_shutdown();
    assert_eq!(client.closed().await.0, 1001);
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .unwrap()
        .unwrap();
}

/// `consecutiveFailures` inside a subscription reads the event log as the
/// subscriber, once per delivered change, and counts the failure streak as
/// it stands when the change is sent.
#[tokio::test]
async fn consecutive_failures_is_current_in_every_change() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .follow(
            "subscription { syncStateChanged(resources: [\"funds\"]) {
                state { lastSyncStatus consecutiveFailures } } }",
            json!({}),
        )
        .await;
    let mut seen = Vec::new();
    for statement in [
        "SELECT start_vantage_sync('funds')",
        "SELECT fail_vantage_sync('funds', '[]')",
        "SELECT start_vantage_sync('funds')",
        "SELECT fail_vantage_sync('funds', '[]')",
        "SELECT start_vantage_sync('funds')",
        "SELECT complete_vantage_sync('funds', 1, 1, 0)",
    ] {
        app.sql(statement).await;
        let (_, data) = client.next_data().await;
        seen.push(data["syncStateChanged"]["state"].clone());
    }
    assert_eq!(
        seen,
        [
            json!({"lastSyncStatus": "RUNNING", "consecutiveFailures": 0}),
            json!({"lastSyncStatus": "FAILED", "consecutiveFailures": 1}),
            json!({"lastSyncStatus": "RUNNING", "consecutiveFailures": 1}),
            json!({"lastSyncStatus": "FAILED", "consecutiveFailures": 2}),
            json!({"lastSyncStatus": "RUNNING", "consecutiveFailures": 2}),
            json!({"lastSyncStatus": "SUCCESS", "consecutiveFailures": 0}),
        ]
    );
}

/// A query sent over the WebSocket is told where it belongs, with a code.
#[tokio::test]
async fn queries_over_the_websocket_are_sent_to_http() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    client
        .subscribe(
            "q",
            "{ syncState(resource: \"funds\") { resource } }",
            json!({}),
        )
        .await;
    let message = client.recv().await;
    assert_eq!(
        message["payload"]["errors"][0]["message"],
        "send queries and mutations over HTTP; the WebSocket carries subscriptions",
        "{message}"
    );
    assert_eq!(
        message["payload"]["errors"][0]["extensions"]["code"],
        "BAD_USER_INPUT"
    );
}

/// An operation the server completes frees its id for reuse (the server
/// sees its own `complete` going out).
#[tokio::test]
async fn a_completed_operation_frees_its_id() {
    let app = TestApp::spawn().await;
    let mut client = WsClient::ready(&app, "authenticated").await;
    for _ in 0..2 {
        client.subscribe("q", "{ __typename }", json!({})).await;
        let next = client.recv().await;
        assert_eq!(next["type"], "next", "{next}");
        assert_eq!(next["payload"]["data"], json!({"__typename": "Query"}));
        let complete = client.recv().await;
        assert_eq!(complete, json!({"type": "complete", "id": "q"}));
    }
}
