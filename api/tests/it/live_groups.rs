//! Live subscriptions grouped by what they render: subscribers of one
//! document, operation, variables and role share one rendering per change,
//! yet each still receives exactly its own changes, shape and ids; a group
//! outlives the members that leave it and goes with the last one; one too
//! large for a core is written on every core and loses nothing; a member
//! that stops reading holds no one back; an expired token ends only its
//! own subscription. Every expectation is checked against the event log.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Executor, raw_sql};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use vantage_sync_testkit::{
    SECRET, SseStream, TestApp, TestDb, WsClient, metric_value, state_row, subscription_groups,
    subscription_started, subscriptions_active, unix_now,
};

/// A change as the event log has it (or, for a SNAPSHOT, the state table
/// at the snapshot's position).
struct Change {
    id: i64,
    operation: String,
    resource: String,
    /// The row as `to_jsonb` gives it; `None` on DELETE.
    state: Option<Value>,
}

impl Change {
    fn cursor(&self) -> String {
        format!("1:{}", self.id)
    }

    /// `state` with `fields` selected; null on DELETE.
    fn state(&self, fields: &[&str]) -> Value {
        let Some(row) = &self.state else {
            return Value::Null;
        };
        let status = row["last_sync_status"].as_str().unwrap().to_uppercase();
        let value = |field: &str| match field {
            "lastSyncStatus" => json!(status),
            "recordsSynced" => row["records_synced"].clone(),
            // Nothing here runs long enough to be stuck, or is a day old.
            "health" => json!(match status.as_str() {
                "FAILED" => "RED",
                _ if row["last_sync_time"].is_null() => "YELLOW",
                _ => "GREEN",
            }),
            other => panic!("no rule for the field {other}"),
        };
        let fields = fields
            .iter()
            .map(|field| ((*field).to_owned(), value(field)));
        Value::Object(fields.collect())
    }
}

/// The `data` a subscriber is owed for a change, in its selection.
type Shape = fn(&Change) -> Value;

const ALIASED: &str =
    "subscription { changes: syncStateChanged { op: operation resource cursor } }";
fn aliased(c: &Change) -> Value {
    json!({"changes": {"op": c.operation, "resource": c.resource, "cursor": c.cursor()}})
}

const STATE: &str = "subscription($resources: [String!]) {
    syncStateChanged(resources: $resources) {
        cursor state { lastSyncStatus recordsSynced health } } }";
fn state_fields(c: &Change) -> Value {
    let state = c.state(&["lastSyncStatus", "recordsSynced", "health"]);
    json!({"syncStateChanged": {"cursor": c.cursor(), "state": state}})
}

const PLAIN: &str = "subscription($resources: [String!], $initial: Boolean) {
    syncStateChanged(resources: $resources, initial: $initial) {
        operation resource cursor state { lastSyncStatus } } }";
fn plain(c: &Change) -> Value {
    let state = c.state(&["lastSyncStatus"]);
    json!({"syncStateChanged":
        {"operation": c.operation, "resource": c.resource, "cursor": c.cursor(), "state": state}})
}

/// One document, two operations told apart by their name alone.
const NAMED: &str = "
    subscription Accounts { syncStateChanged(resources: [\"accounts\"]) { resource cursor } }
    subscription Funds { syncStateChanged(resources: [\"funds\"]) { resource cursor } }";
fn named(c: &Change) -> Value {
    json!({"syncStateChanged": {"resource": c.resource, "cursor": c.cursor()}})
}

/// No cursor selected: an SSE stream's event ids carry it all the same.
const BARE: &str = "subscription {
    syncStateChanged(resources: [\"funds\", \"cashflows\"]) { resource state { lastSyncStatus } } }";
fn bare(c: &Change) -> Value {
    json!({"syncStateChanged": {"resource": c.resource, "state": c.state(&["lastSyncStatus"])}})
}

/// The newest event id of the log, 0 when empty.
async fn head(app: &TestApp) -> i64 {
    let mut conn = app.db.connect().await;
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM vantage_sync_events")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// The log after event `after`, oldest first.
async fn log_after(app: &TestApp, after: i64) -> Vec<Change> {
    let mut conn = app.db.connect().await;
    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
        "SELECT id, operation, resource, state::text FROM vantage_sync_events
         WHERE id > $1 ORDER BY id",
    )
    .bind(after)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, operation, resource, state)| Change {
            id,
            state: (operation != "DELETE").then(|| serde_json::from_str(&state).unwrap()),
            operation,
            resource,
        })
        .collect()
}

/// Asserts `got` is `owed`, reporting the first difference.
#[track_caller]
fn assert_changes(label: &str, got: &[Value], owed: &[Value]) {
    let differs = (0..got.len().max(owed.len())).find(|&i| got.get(i) != owed.get(i));
    if let Some(index) = differs {
        let show = |value: Option<&Value>| value.map_or("nothing".into(), Value::to_string);
        panic!(
            "{label}: received {}, owed {}; first difference at #{index}:\n received: {}\n owed:     {}",
            got.len(),
            owed.len(),
            show(got.get(index)),
            show(owed.get(index))
        );
    }
}

#[derive(Clone, Copy, Debug)]
enum Gauge {
    Groups,
    Subscriptions,
}

/// Polls `gauge` until it shows `want` (members join and leave
/// asynchronously).
async fn becomes(app: &TestApp, gauge: Gauge, want: i64) {
    let url = app.url("/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = match gauge {
            Gauge::Groups => subscription_groups(&url).await,
            Gauge::Subscriptions => subscriptions_active(&url).await,
        };
        if value == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{gauge:?} at {value}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn groups(app: &TestApp) -> i64 {
    subscription_groups(&app.url("/metrics")).await
}

/// Starts subscription `id` with `payload` on `client` and waits until the
/// server has started it.
async fn subscribe(app: &TestApp, client: &mut WsClient, id: &str, payload: Value) {
    let message = json!({"id": id, "type": "subscribe", "payload": payload});
    subscription_started(&app.url("/metrics"))
        .wait(client.send(message))
        .await;
}

/// Opens an SSE stream for `body` with `token` and waits until the server
/// has started its subscription.
async fn open_stream(app: &TestApp, token: &str, body: &Value) -> SseStream {
    subscription_started(&app.url("/metrics"))
        .wait(SseStream::open(
            &app.url("/graphql"),
            Some(token),
            body,
            None,
        ))
        .await
        .unwrap()
}

/// An `authenticated` token for the tests' user that expires in `seconds`.
fn expiring_token(seconds: u64) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": "authenticated", "sub": "test-user", "exp": unix_now() + seconds}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// One subscription of a mix: how it subscribes and what it is owed.
struct Member {
    role: &'static str,
    request: Value,
    shape: Shape,
    /// The resources it follows; `None`: all.
    resources: Option<Vec<String>>,
    /// The SNAPSHOTs owed before the log's changes, if `initial: true`.
    snapshot: Option<Vec<Change>>,
    /// On the connection of the member before it.
    beside: bool,
}

/// A member subscribing as `role` to `query` with `variables`, following
/// the `resources` variable.
fn member(role: &'static str, query: &str, variables: Value, shape: Shape) -> Member {
    Member {
        role,
        resources: serde_json::from_value(variables["resources"].clone()).unwrap(),
        snapshot: (variables["initial"] == true).then(Vec::new),
        request: json!({"query": query, "variables": variables}),
        shape,
        beside: false,
    }
}

impl Member {
    /// Following `resources`, which its document names.
    fn only(mut self, resources: &[&str]) -> Self {
        self.resources = Some(resources.iter().map(|r| (*r).to_owned()).collect());
        self
    }

    fn beside(mut self) -> Self {
        self.beside = true;
        self
    }

    fn operation(mut self, name: &str) -> Self {
        self.request["operationName"] = json!(name);
        self
    }

    fn label(&self) -> String {
        format!("{} as {}", self.request, self.role)
    }

    /// What it must receive, in order: the log id of each change (none
    /// for SNAPSHOTs) and its data.
    fn owed(&self, log: &[Change]) -> Vec<(Option<i64>, Value)> {
        let snapshot = self
            .snapshot
            .iter()
            .flatten()
            .map(|change| (None, (self.shape)(change)));
        let wanted = |change: &&Change| {
            self.resources
                .as_ref()
                .is_none_or(|wanted| wanted.contains(&change.resource))
        };
        let live = log
            .iter()
            .filter(wanted)
            .map(|change| (Some(change.id), (self.shape)(change)));
        snapshot.chain(live).collect()
    }
}

/// Subscriptions of every kind at once (aliases, other fields, other
/// variables, both roles, a snapshot, two on one connection, two operations
/// of one document, SSE streams), then one run of changes: each receives
/// exactly the changes its filter matches, in log order, in exactly its own
/// selection, with cursors (and SSE ids) naming the log's events.
#[tokio::test]
async fn mixed_subscriptions_each_get_their_own_shape() {
    let app = TestApp::spawn().await;
    let auth = "authenticated";
    // One connection each, but those marked `beside` the one before: their
    // ids are "1", "2" in order.
    let plan = vec![
        member(auth, ALIASED, json!({}), aliased),
        member(auth, STATE, json!({}), state_fields),
        member(auth, PLAIN, json!({"resources": ["accounts"]}), plain),
        member(auth, PLAIN, json!({"resources": ["funds"]}), plain),
        member(auth, PLAIN, json!({}), plain),
        member("service_role", PLAIN, json!({}), plain),
        member(
            auth,
            PLAIN,
            json!({"resources": ["funds", "accounts"], "initial": true}),
            plain,
        ),
        member(
            auth,
            STATE,
            json!({"resources": ["cashflows"]}),
            state_fields,
        ),
        member(auth, ALIASED, json!({}), aliased).beside(),
        member(auth, NAMED, json!({}), named)
            .only(&["accounts"])
            .operation("Accounts"),
        member(auth, NAMED, json!({}), named)
            .only(&["funds"])
            .operation("Funds")
            .beside(),
    ];
    let mut ws: Vec<(WsClient, Vec<Member>)> = Vec::new();
    for member in plan {
        if !member.beside {
            ws.push((WsClient::ready(&app, member.role).await, Vec::new()));
        }
        let (client, members) = ws.last_mut().unwrap();
        let id = (members.len() + 1).to_string();
        subscribe(&app, client, &id, member.request.clone()).await;
        members.push(member);
    }
    let mut sse = Vec::new();
    for member in [
        member(auth, ALIASED, json!({}), aliased),
        member("service_role", BARE, json!({}), bare).only(&["funds", "cashflows"]),
    ] {
        let stream = open_stream(&app, &app.token(member.role), &member.request).await;
        sse.push((stream, member));
    }
    let baseline = head(&app).await;
    let mut conn = app.db.connect().await;
    for member in ws.iter_mut().flat_map(|(_, members)| members) {
        let (Some(snapshot), Some(resources)) = (&mut member.snapshot, &member.resources) else {
            continue;
        };
        // By resource, at the position the subscription started from.
        let mut resources = resources.clone();
        resources.sort();
        for resource in resources {
            let state = Some(state_row(&mut conn, &resource).await);
            let (id, operation) = (baseline, "SNAPSHOT".to_owned());
            snapshot.push(Change {
                id,
                operation,
                resource,
                state,
            });
        }
    }

    for statement in [
        "SELECT start_vantage_sync('accounts')",
        "SELECT start_vantage_sync('funds')",
        "SELECT complete_vantage_sync('accounts', 10, 4, 3)",
        "SELECT start_vantage_sync('cashflows')",
        r#"SELECT fail_vantage_sync('funds', '[{"code": "E", "message": "boom"}]')"#,
        "SELECT complete_vantage_sync('cashflows', 7, 7, 0)",
        "SELECT start_vantage_sync('valuations')",
        "SELECT start_vantage_sync('funds'); SELECT complete_vantage_sync('funds', 2, 1, 1)",
        "INSERT INTO vantage_sync_state (resource) VALUES ('fx_rates')",
        "DELETE FROM vantage_sync_state WHERE resource = 'valuations'",
    ] {
        app.sql(statement).await;
    }
    let log = log_after(&app, baseline).await;
    assert_eq!(log.len(), 11, "one event per change");

    for (client, members) in &mut ws {
        let owed: Vec<Vec<(Option<i64>, Value)>> = members.iter().map(|m| m.owed(&log)).collect();
        let mut got: HashMap<String, Vec<Value>> = HashMap::new();
        for _ in 0..owed.iter().map(Vec::len).sum::<usize>() {
            let (id, data) = client.next_data().await;
            got.entry(id).or_default().push(data);
        }
        for (index, (member, owed)) in members.iter().zip(owed).enumerate() {
            let got = got.remove(&(index + 1).to_string()).unwrap_or_default();
            let owed: Vec<Value> = owed.into_iter().map(|(_, data)| data).collect();
            assert_changes(&member.label(), &got, &owed);
        }
        assert!(got.is_empty(), "changes for unknown ids: {got:?}");
    }
    for (stream, member) in &mut sse {
        let (mut got, mut owed) = (Vec::new(), Vec::new());
        for (id, data) in member.owed(&log) {
            let (event_id, payload) = stream.next_payload().await;
            let label = member.label();
            assert_eq!(event_id, id.map(|id| format!("1:{id}")), "{label}");
            got.push(payload);
            owed.push(json!({ "data": data }));
        }
        assert_changes(&member.label(), &got, &owed);
    }
    // And nothing more for anyone.
    let quiet = Duration::from_millis(500);
    let (ws_extra, sse_extra) = tokio::join!(
        join_all(ws.iter_mut().map(|(client, _)| async move {
            let extra = tokio::time::timeout(quiet, client.next()).await;
            extra.ok().map(|extra| format!("{extra:?}"))
        })),
        join_all(sse.iter_mut().map(|(stream, _)| async move {
            let extra = tokio::time::timeout(quiet, stream.next_event()).await;
            extra.ok().map(|extra| format!("{extra:?}"))
        })),
    );
    let extra: Vec<String> = ws_extra.into_iter().chain(sse_extra).flatten().collect();
    assert!(extra.is_empty(), "unexpected extra messages: {extra:?}");
    // Ten groups over WebSocket ("aliases" has two members), one for the
    // cursorless stream; the other stream may join the first group.
    let groups = groups(&app).await;
    assert!((11..=12).contains(&groups), "{groups} groups");
}

const FOLLOWED: &str =
    "subscription { syncStateChanged { resource cursor state { lastSyncStatus recordsSynced } } }";
fn followed(c: &Change) -> Value {
    let state = c.state(&["lastSyncStatus", "recordsSynced"]);
    json!({"syncStateChanged": {"resource": c.resource, "cursor": c.cursor(), "state": state}})
}

/// Members leaving a group while changes flow (by `complete`, by a close,
/// by a dropped socket) cost the others nothing: they receive every change
/// of the log, in order. One group per document while it has members; it
/// goes with the last, even while a member's connection stays open.
#[tokio::test]
async fn a_group_losing_members_keeps_delivering_and_is_freed_when_empty() {
    let app = TestApp::spawn().await;
    assert_eq!(groups(&app).await, 0);
    let mut members = Vec::new();
    for _ in 0..6 {
        let mut client = WsClient::ready(&app, "authenticated").await;
        client.follow(FOLLOWED, json!({})).await;
        members.push(client);
    }
    becomes(&app, Gauge::Groups, 1).await;
    let mut other = WsClient::ready(&app, "authenticated").await;
    other.follow(ALIASED, json!({})).await;
    becomes(&app, Gauge::Groups, 2).await;
    other.close().await;
    becomes(&app, Gauge::Groups, 1).await;
    becomes(&app, Gauge::Subscriptions, 6).await;

    let baseline = head(&app).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (progress, mut rounds) = tokio::sync::watch::channel(0);
    let mut conn = app.db.connect().await;
    let writer = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                let statements = format!(
                    "SELECT start_vantage_sync('accounts');
                     SELECT complete_vantage_sync('accounts', {round}, 0, 0)"
                );
                conn.execute(raw_sql(AssertSqlSafe(statements)))
                    .await
                    .unwrap();
                round += 1;
                progress.send_replace(round);
            }
        }
    });
    let staying: Vec<_> = members
        .split_off(3)
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let (_, data) = client.next_data().await;
                    let last = data["syncStateChanged"]["resource"] == "the_end";
                    got.push(data);
                    if last {
                        return (client, got);
                    }
                }
            })
        })
        .collect();
    let mut reached = async |round: i32| {
        tokio::time::timeout(
            Duration::from_secs(10),
            rounds.wait_for(|done| *done >= round),
        )
        .await
        .expect("the writer stalled")
        .unwrap();
    };
    // One leaves by `complete` (its connection stays), one by closing, one
    // by dropping its socket.
    let mut leaving = members.into_iter();
    let mut completing = leaving.next().unwrap();
    reached(10).await;
    completing
        .send(json!({"id": "1", "type": "complete"}))
        .await;
    reached(30).await;
    leaving.next().unwrap().close().await;
    reached(50).await;
    drop(leaving.next());
    becomes(&app, Gauge::Subscriptions, 3).await;
    assert_eq!(groups(&app).await, 1, "the group stays while members do");
    reached(80).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    app.sql("INSERT INTO vantage_sync_state (resource) VALUES ('the_end')")
        .await;

    let log = log_after(&app, baseline).await;
    assert!(log.len() > 160, "{} changes", log.len());
    let owed: Vec<Value> = log.iter().map(followed).collect();
    let mut remaining = Vec::new();
    for (index, reader) in staying.into_iter().enumerate() {
        let (client, got) = reader.await.unwrap();
        assert_changes(&format!("staying member {index}"), &got, &owed);
        remaining.push(client);
    }
    assert_eq!(groups(&app).await, 1);
    let mut remaining = remaining.into_iter();
    let mut first = remaining.next().unwrap();
    first.send(json!({"id": "1", "type": "complete"})).await;
    remaining.next().unwrap().close().await;
    drop(remaining);
    becomes(&app, Gauge::Groups, 0).await;
    becomes(&app, Gauge::Subscriptions, 0).await;
    drop((first, completing));
}

/// Rounds of start and fail, each with this many bytes of error text.
// More changes than a group keeps for a member behind (512 renderings):
// the stalled member must fall out and catch up from the log.
const ROUNDS: usize = 300;
const PAYLOAD: usize = 32_000;
const LARGE: &str = "subscription { syncStateChanged(resources: [\"accounts\"]) {
    cursor at state { lastSyncStatus errors { code message } } } }";

/// (event id of the cursor, status, first error's code) of a change.
fn large_change(data: &Value) -> (i64, String, Option<String>) {
    let change = &data["syncStateChanged"];
    let id = change["cursor"]
        .as_str()
        .unwrap()
        .strip_prefix("1:")
        .unwrap();
    let status = change["state"]["lastSyncStatus"].as_str().unwrap();
    let code = change["state"]["errors"][0]["code"].as_str();
    (
        id.parse().unwrap(),
        status.to_owned(),
        code.map(str::to_owned),
    )
}

/// A member of a group that stops reading its socket (a receive buffer of
/// a few KiB, megabytes of changes) delays no one: the others receive every
/// change within 2 s of its commit. Once it reads again it receives every
/// change, in order, none missing, none twice.
// Several threads: the delays measured are the server's, not the test's.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_stops_reading_does_not_delay_the_others() {
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        // A stalled reader answers no ping; that is not what is tested.
        config.websocket.pong_timeout = Duration::from_secs(600);
    })
    .await;
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.set_recv_buffer_size(4096).unwrap();
    let tcp = tcp.connect(app.addr).await.unwrap();
    let mut request = format!("ws://{}/graphql", app.addr)
        .into_client_request()
        .unwrap();
    let protocol = "graphql-transport-ws".parse().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol);
    let (mut stalled, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let text = |value: Value| Message::Text(value.to_string().into());
    let init = json!({"Authorization": format!("Bearer {}", app.token("authenticated"))});
    let init = text(json!({"type": "connection_init", "payload": init}));
    stalled.send(init).await.unwrap();
    let ack = stalled.next().await.unwrap().unwrap();
    assert!(ack.to_text().unwrap().contains("connection_ack"), "{ack}");
    let subscribe =
        json!({"id": "1", "type": "subscribe", "payload": {"query": LARGE, "variables": {}}});
    subscription_started(&app.url("/metrics"))
        .wait(stalled.send(text(subscribe)))
        .await
        .unwrap();
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut client = WsClient::ready(&app, "authenticated").await;
        client.follow(LARGE, json!({})).await;
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let (_, data) = client.next_data().await;
                let at = data["syncStateChanged"]["at"].as_str().unwrap();
                let delay = Utc::now() - DateTime::parse_from_rfc3339(at).unwrap().to_utc();
                got.push((large_change(&data), delay));
                if got.last().unwrap().0.1 == "SUCCESS" {
                    return got;
                }
            }
        }));
    }
    becomes(&app, Gauge::Groups, 1).await;

    let baseline = head(&app).await;
    let mut conn = app.db.connect().await;
    for round in 0..=ROUNDS {
        let end = match round {
            ROUNDS => "complete_vantage_sync('accounts', 1, 0, 0)".to_owned(),
            _ => format!(
                "fail_vantage_sync('accounts', jsonb_build_array(jsonb_build_object(
                     'code', 'E{round}', 'message', repeat('x', {PAYLOAD}))))"
            ),
        };
        let round = format!("SELECT start_vantage_sync('accounts'); SELECT {end}");
        conn.execute(raw_sql(AssertSqlSafe(round))).await.unwrap();
    }
    let owed: Vec<(i64, String, Option<String>)> = log_after(&app, baseline)
        .await
        .into_iter()
        .map(|change| {
            let state = change.state.unwrap();
            let status = state["last_sync_status"].as_str().unwrap().to_uppercase();
            (
                change.id,
                status,
                state["errors"][0]["code"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(owed.len(), 2 * ROUNDS + 2);
    let same = |label: &str, got: &[(i64, String, Option<String>)]| {
        let ids = |changes: &[(i64, String, Option<String>)]| -> Vec<i64> {
            changes.iter().map(|change| change.0).collect()
        };
        assert_eq!(ids(got), ids(&owed), "{label}: the log's events");
        assert!(got == owed, "{label}: the log's changes");
    };
    for (index, reader) in readers.into_iter().enumerate() {
        let got = reader.await.unwrap();
        let changes: Vec<_> = got.iter().map(|(change, _)| change.clone()).collect();
        same(&format!("reader {index}"), &changes);
        let (slowest, id) = got
            .iter()
            .map(|(change, delay)| (*delay, change.0))
            .max()
            .unwrap();
        assert!(
            slowest < TimeDelta::seconds(2),
            "reader {index} got event {id} {slowest} after its commit"
        );
    }
    // The readers have closed; the stalled member is still there, in the
    // same group.
    becomes(&app, Gauge::Subscriptions, 1).await;
    assert_eq!(groups(&app).await, 1);

    let mut caught_up = Vec::new();
    while caught_up
        .last()
        .is_none_or(|(_, status, _)| status != "SUCCESS")
    {
        let message = tokio::time::timeout(Duration::from_secs(30), stalled.next()).await;
        let message = message.expect("the stalled member is not fed");
        let Message::Text(message) = message.unwrap().unwrap() else {
            continue;
        };
        let value: Value = serde_json::from_str(&message).unwrap();
        if value["type"] == "next" {
            assert!(value["payload"].get("errors").is_none(), "{value}");
            caught_up.push(large_change(&value["payload"]["data"]));
        } else {
            assert_eq!(value["type"], "ping", "{value}");
        }
    }
    same("the stalled member", &caught_up);
    let metrics = app.metrics().await;
    let fell_behind = metric_value(&metrics, "vantage_sync_subscription_fell_behind_total");
    assert!(fell_behind >= Some(1.0), "it never fell behind:\n{metrics}");
    // The readers that kept up were written to by the renderer itself.
    let written_directly =
        metric_value(&metrics, "vantage_sync_subscription_written_directly_total");
    assert!(
        written_directly >= Some(1.0),
        "no change was written directly:\n{metrics}"
    );
    // The renderer counts its writes in runs: still every change to every
    // member once (three readers and the stalled member), each with its
    // delay.
    let deliveries = Some((4 * owed.len()) as f64);
    for name in [
        "vantage_sync_subscription_events_delivered_total",
        "vantage_sync_subscription_delivery_delay_seconds_count",
    ] {
        assert_eq!(
            metric_value(&metrics, name),
            deliveries,
            "{name}:\n{metrics}"
        );
    }
    assert!(written_directly <= deliveries, "{metrics}");
}

/// A group with more members than one core writes to (256 per core) is
/// written in shares, one per core: still every change to every member,
/// once and in order, compared with the log.
#[tokio::test]
async fn a_group_written_on_every_core_delivers_every_change_once_in_order() {
    let app = TestApp::spawn().await;
    // The server deals a group's writes out to as many cores as this
    // process sees: one member more than one core's share needs them all.
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    let members = 256 * cores + 1;
    let mut clients = Vec::with_capacity(members);
    for _ in 0..members {
        let mut client = WsClient::ready(&app, "authenticated").await;
        client.follow(ALIASED, json!({})).await;
        clients.push(client);
    }
    becomes(&app, Gauge::Groups, 1).await;

    let baseline = head(&app).await;
    let mut conn = app.db.connect().await;
    for resource in ["accounts", "funds"] {
        let change = format!(
            "SELECT start_vantage_sync('{resource}'); SELECT complete_vantage_sync('{resource}', 1, 0, 0)"
        );
        conn.execute(raw_sql(AssertSqlSafe(change))).await.unwrap();
    }
    let owed: Vec<Value> = log_after(&app, baseline)
        .await
        .iter()
        .map(aliased)
        .collect();
    assert_eq!(owed.len(), 4);
    let readers = clients.into_iter().map(|mut client| {
        let count = owed.len();
        tokio::spawn(async move {
            let mut got = Vec::with_capacity(count);
            while got.len() < count {
                got.push(client.next_data().await.1);
            }
            got
        })
    });
    for (index, got) in join_all(readers).await.into_iter().enumerate() {
        assert_changes(&format!("member {index}"), &got.unwrap(), &owed);
    }
    let metrics = app.metrics().await;
    let deliveries = Some((members * owed.len()) as f64);
    assert_eq!(
        metric_value(&metrics, "vantage_sync_subscription_events_delivered_total"),
        deliveries,
        "{metrics}"
    );
    // Members that had caught up before the first change: the renderer
    // wrote to the whole group, more than one core's share.
    let written_directly =
        metric_value(&metrics, "vantage_sync_subscription_written_directly_total");
    assert!(
        written_directly >= Some(members as f64),
        "too few written directly:\n{metrics}"
    );
}

/// A member whose token expires is ended as a lone subscriber is (over
/// WebSocket closed with 4403; over SSE INVALID_TOKEN, then `complete`);
/// the other member of its group stays, and receives the next changes.
#[tokio::test]
async fn an_expired_token_removes_only_its_member() {
    let app = TestApp::spawn().await;
    let token = expiring_token(3);
    let mut lasting = WsClient::ready(&app, "authenticated").await;
    lasting.follow(PLAIN, json!({})).await;
    let mut expiring = WsClient::ready_at(app.addr, &token).await.unwrap();
    expiring.follow(PLAIN, json!({})).await;
    // Over SSE, another document: a group of its own.
    let body = json!({"query": ALIASED, "variables": {}});
    let mut lasting_stream = open_stream(&app, &app.token("authenticated"), &body).await;
    let mut expiring_stream = open_stream(&app, &token, &body).await;
    becomes(&app, Gauge::Groups, 2).await;
    let baseline = head(&app).await;
    app.sql("SELECT start_vantage_sync('accounts')").await;
    let first = &log_after(&app, baseline).await[0];
    let over_sse = |change: &Change| (Some(change.cursor()), json!({"data": aliased(change)}));
    for client in [&mut lasting, &mut expiring] {
        assert_eq!(client.next_data().await, ("1".to_owned(), plain(first)));
    }
    for stream in [&mut lasting_stream, &mut expiring_stream] {
        assert_eq!(stream.next_payload().await, over_sse(first));
    }

    assert_eq!(expiring.closed().await, (4403, "token expired".to_owned()));
    let (id, payload) = expiring_stream.next_payload().await;
    let code = &payload["errors"][0]["extensions"]["code"];
    assert_eq!(
        (id, code.as_str()),
        (None, Some("INVALID_TOKEN")),
        "{payload}"
    );
    let complete = expiring_stream.expect_event(Duration::from_secs(1)).await;
    assert_eq!(complete.event, "complete");
    assert_eq!(expiring_stream.next_event().await, None);
    becomes(&app, Gauge::Subscriptions, 2).await;
    assert_eq!(groups(&app).await, 2);
    app.sql("SELECT complete_vantage_sync('accounts', 5, 2, 3)")
        .await;
    app.sql("SELECT start_vantage_sync('funds')").await;
    let log = log_after(&app, baseline).await;
    assert_eq!(log.len(), 3);
    for change in &log[1..] {
        assert_eq!(lasting.next_data().await, ("1".to_owned(), plain(change)));
        assert_eq!(lasting_stream.next_payload().await, over_sse(change));
    }
    assert_eq!(groups(&app).await, 2);
}
