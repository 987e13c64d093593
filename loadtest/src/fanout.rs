//! `fanout` and `sse`: S subscribers (over WebSocket, or GraphQL over
//! SSE), then K changes made in the database; for every subscriber and
//! change the delay from commit to receipt, what was missed, and the
//! server's CPU per delivery and memory per subscriber.
//!
//! With N shapes the subscribers are spread evenly over N distinct
//! subscriptions (see [`Shape`]), all of which receive every change: how
//! much a server that renders each change once per distinct subscription
//! gains over one that renders it once per subscriber, and what it costs
//! when subscriptions share nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use vantage_sync::auth::Role;

use crate::stats;
use crate::target::Target;

const RESOURCE: &str = "fanout_probe";
const SUBSCRIPTION: &str = "subscription { syncStateChanged(resources: [\"fanout_probe\"]) { \
    resource cursor state { lastSyncStatus recordsSynced } } }";
/// The field of `state` that carries the change number in [`SUBSCRIPTION`].
const NUMBER_FIELD: &str = "recordsSynced";

/// One of the distinct subscriptions the subscribers are spread over.
///
/// Shape 0 is [`SUBSCRIPTION`] itself. Shape i > 0 is the same document
/// with `recordsSynced` under the alias `records` + i in six digits
/// (`records000001: recordsSynced`, 13 characters like the field's own
/// name): the same filter, so it receives every change to the probe, and a
/// payload of the same length, so deliveries cost the same whatever the
/// shape, but a distinct document and a distinct rendering. Each
/// subscriber reads its change number under its own alias, so a rendering
/// shared across shapes by mistake counts as an error, not a delivery.
struct Shape {
    document: String,
    number_field: String,
}

impl Shape {
    fn new(index: usize) -> Self {
        if index == 0 {
            return Self {
                document: SUBSCRIPTION.to_owned(),
                number_field: NUMBER_FIELD.to_owned(),
            };
        }
        let alias = format!("records{index:06}");
        Self {
            document: SUBSCRIPTION.replacen(NUMBER_FIELD, &format!("{alias}: {NUMBER_FIELD}"), 1),
            number_field: alias,
        }
    }
}

/// What one subscriber saw: (change number, when it arrived).
type Received = Vec<(u64, Instant)>;

/// How subscribers follow the changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// graphql-transport-ws.
    WebSocket,
    /// graphql-sse, distinct connections.
    Sse,
}

pub async fn run(
    target: &Target,
    transport: Transport,
    subscribers: usize,
    shapes: usize,
    changes: usize,
    interval: Duration,
) -> anyhow::Result<Value> {
    let shapes = shapes.max(1);
    let shape_list: Arc<Vec<Shape>> = Arc::new((0..shapes).map(Shape::new).collect());
    let mut conn = PgConnection::connect(&target.database_url).await?;
    sqlx::query("INSERT INTO vantage_sync_state (resource) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(RESOURCE)
        .execute(&mut conn)
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = target.rss_kib();
    let ws_url = target.base.replacen("http://", "ws://", 1) + "/graphql";
    let token = Arc::new(target.token(Role::Authenticated));
    let connecting = Arc::new(Semaphore::new(128));
    let (ready_send, mut ready) = tokio::sync::mpsc::channel::<bool>(subscribers.max(1));
    let (stop_send, stop) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(subscribers);
    for subscriber in 0..subscribers {
        let (url, token, connecting, ready_send, mut stop, arrived, shape_list) = (
            ws_url.clone(),
            token.clone(),
            connecting.clone(),
            ready_send.clone(),
            stop.clone(),
            arrived.clone(),
            shape_list.clone(),
        );
        let base = target.base.clone();
        tasks.push(tokio::spawn(async move {
            // Round robin: shape sizes differ by one subscriber at most.
            let shape = &shape_list[subscriber % shapes];
            let permit = connecting.acquire_owned().await;
            let subscription = match transport {
                Transport::WebSocket => subscribe(&url, &token, &shape.document, &json!({}))
                    .await
                    .map(|socket| Subscription::WebSocket(Box::new(socket))),
                Transport::Sse => crate::sse::SseStream::open(&base, &token, &shape.document)
                    .await
                    .map(Subscription::Sse),
            };
            drop(permit);
            let _ = ready_send.send(subscription.is_ok()).await;
            let mut tally = Tally {
                received: Received::new(),
                errors: 0,
                arrived: &arrived,
                number_field: &shape.number_field,
            };
            match subscription {
                Ok(Subscription::WebSocket(socket)) => {
                    follow_ws(*socket, &mut stop, &mut tally).await
                }
                Ok(Subscription::Sse(stream)) => follow_sse(stream, &mut stop, &mut tally).await,
                Err(_) => tally.errors += 1,
            }
            (tally.received, tally.errors)
        }));
    }
    drop(ready_send);
    let mut connected = 0;
    let mut failed = 0_u64;
    while let Some(ok) = ready.recv().await {
        if ok {
            connected += 1
        } else {
            failed += 1
        }
        if connected + failed as usize == subscribers {
            break;
        }
    }
    // Let every subscription start before changing anything.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss_after = target.rss_kib();

    let meter = target.cpu_meter();
    let cpu_before = meter.sample();
    let mut committed = Vec::with_capacity(changes);
    for change in 1..=changes {
        sqlx::query("UPDATE vantage_sync_state SET records_synced = $2 WHERE resource = $1")
            .bind(RESOURCE)
            .bind(i32::try_from(change).unwrap_or(i32::MAX))
            .execute(&mut conn)
            .await?;
        committed.push(Instant::now());
        tokio::time::sleep(interval).await;
    }
    // Wait (at most 10 s) until every subscriber has every change.
    let expected = (connected * changes) as u64;
    let wait_until = Instant::now() + Duration::from_secs(10);
    while arrived.load(std::sync::atomic::Ordering::Relaxed) < expected
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_after = meter.sample();
    let _ = stop_send.send(true);
    let mut delays = Vec::with_capacity(expected as usize);
    let mut errors = failed;
    let mut received_total = 0_u64;
    for task in tasks {
        let Ok((received, task_errors)) = task.await else {
            errors += 1;
            continue;
        };
        errors += task_errors;
        for (change, at) in received {
            if let Some(commit) = change
                .checked_sub(1)
                .and_then(|index| committed.get(index as usize))
            {
                received_total += 1;
                delays.push(at.saturating_duration_since(*commit));
            }
        }
    }
    conn.close().await?;
    let per_subscriber = match (rss_before, rss_after) {
        (Some(before), Some(after)) if connected > 0 => {
            json!(after.saturating_sub(before) as f64 / connected as f64)
        }
        _ => Value::Null,
    };
    Ok(json!({
        "subscribers": subscribers,
        "shapes": shapes,
        "connected": connected,
        "changes": changes,
        "interval_ms": interval.as_millis() as u64,
        "delivered": received_total,
        "missed": expected.saturating_sub(received_total) + (failed * changes as u64),
        "errors": errors,
        "delay_ms": stats::summary(&mut delays),
        // CPU per change delivered to one subscriber: much steadier from run
        // to run than the delays, which hang on the machine's other load.
        "cpu_us_per_delivery": meter.per_request(cpu_before, cpu_after, received_total),
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_kib_per_subscriber": per_subscriber,
    }))
}

/// One subscriber's open subscription.
enum Subscription {
    WebSocket(Box<WebSocket>),
    Sse(crate::sse::SseStream),
}

/// What one subscriber received, and its errors.
struct Tally<'a> {
    received: Received,
    errors: u64,
    arrived: &'a std::sync::atomic::AtomicU64,
    /// Where its shape puts the change number.
    number_field: &'a str,
}

impl Tally<'_> {
    /// A `next` payload that arrived `at` (`None`: it could not be read).
    fn next(&mut self, payload: Option<&Value>, at: Instant) {
        match payload.and_then(|payload| change_number(payload, self.number_field)) {
            Some(change) => {
                self.received.push((change, at));
                self.arrived
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => self.errors += 1,
        }
    }
}

/// Counts what a WebSocket subscriber receives until told to stop.
async fn follow_ws(
    mut socket: WebSocket,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    tally: &mut Tally<'_>,
) {
    loop {
        tokio::select! {
            message = socket.next() => {
                let Some(Ok(Message::Text(text))) = message else {
                    if !matches!(message, Some(Ok(_))) { tally.errors += 1; break; }
                    continue;
                };
                let at = Instant::now();
                let Ok(value) = serde_json::from_str::<Value>(&text) else { tally.errors += 1; continue };
                match value["type"].as_str() {
                    Some("next") => tally.next(Some(&value["payload"]), at),
                    Some("ping") => { let _ = socket.send(Message::Text(r#"{"type":"pong"}"#.into())).await; }
                    _ => {}
                }
            }
            _ = stop.changed() => break,
        }
    }
}

/// Counts what an SSE subscriber receives until told to stop; every
/// `next` event must carry an id (its cursor).
async fn follow_sse(
    mut stream: crate::sse::SseStream,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    tally: &mut Tally<'_>,
) {
    loop {
        tokio::select! {
            event = stream.next_event() => {
                let at = Instant::now();
                match event {
                    Ok(event) if event.kind == "next" && event.id.is_some() => {
                        tally.next(serde_json::from_str::<Value>(&event.data).ok().as_ref(), at);
                    }
                    Ok(_) => tally.errors += 1,
                    Err(_) => { tally.errors += 1; break; }
                }
            }
            _ = stop.changed() => break,
        }
    }
}

/// The change number a `next` payload carries (the probe's recordsSynced,
/// under `field`: its name or the shape's alias).
fn change_number(payload: &Value, field: &str) -> Option<u64> {
    payload["data"]["syncStateChanged"]["state"][field].as_u64()
}

/// A WebSocket to the server.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a graphql-transport-ws connection as `token`'s caller and
/// subscribes (id "1") to `query` with `variables`.
pub async fn subscribe(
    url: &str,
    token: &str,
    query: &str,
    variables: &Value,
) -> anyhow::Result<WebSocket> {
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
    // A small read buffer: tungstenite zeroes its whole read buffer
    // (128 KiB by default) before every read, which costs this tool more
    // than the message it reads and would inflate every delay measured.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    socket.send(Message::Text(init.to_string().into())).await?;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) if text.contains("connection_ack") => break,
            Some(Ok(_)) => continue,
            other => anyhow::bail!("no connection_ack: {other:?}"),
        }
    }
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": query, "variables": variables}});
    socket
        .send(Message::Text(subscribe.to_string().into()))
        .await?;
    Ok(socket)
}
