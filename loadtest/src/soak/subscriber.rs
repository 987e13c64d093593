//! The soak's subscribers: each leaves after a while and comes back with
//! `after:` its last cursor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use vantage_sync::Cursor;

use super::windows::Windows;
use super::{DRAIN, Plan, Soak, wall_now};

/// What one subscriber saw over all its sessions.
pub(super) struct SubscriberResult {
    pub(super) windows: Windows,
    /// Event ids received, in order of receipt.
    pub(super) received: Vec<i64>,
    pub(super) duplicates: u64,
    pub(super) sessions: u64,
}

/// How long subscriber `index` stays in its `session`-th session: spread
/// evenly between a 60th and a 10th of the run (at least 1 and 2 s), so
/// that sessions end all through it.
fn lifetime(plan: &Plan, index: usize, session: u64) -> Duration {
    let shortest = (plan.duration / 60).max(Duration::from_secs(1));
    let longest = (plan.duration / 10).max(Duration::from_secs(2));
    let step = ((index as u64 * 37 + session * 61) % 100) as f64 / 100.0;
    shortest + (longest - shortest).mul_f64(step)
}

/// A subscriber that leaves after its lifetime and comes back shortly
/// after (between 0.1 and 1 s) with `after:` its last cursor; once the
/// run's last event id is known, it stays (or comes back) until it has
/// received it.
pub(super) async fn subscriber(
    soak: Arc<Soak>,
    index: usize,
    mut finish: watch::Receiver<Option<i64>>,
    connecting: Arc<Semaphore>,
) -> SubscriberResult {
    let mut result = SubscriberResult {
        windows: soak.empty.clone(),
        received: Vec::new(),
        duplicates: 0,
        sessions: 0,
    };
    let mut cursor = soak.start;
    let give_up = soak.deadline + DRAIN;
    loop {
        let last = *finish.borrow_and_update();
        if last.is_some_and(|last| cursor.position >= last) || Instant::now() >= give_up {
            return result;
        }
        let session_started = wall_now();
        let permit = connecting.acquire().await;
        let variables = json!({ "after": cursor.encode() });
        let socket = subscribe(&soak.ws_url, &soak.reader, &soak.subscription, &variables).await;
        drop(permit);
        let mut socket = match socket {
            Ok(socket) => socket,
            Err(_) => {
                result.windows.at(Instant::now()).errors += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if result.sessions > 0 {
            result.windows.at(Instant::now()).resumes += 1;
        }
        result.sessions += 1;
        let leave_at = if last.is_some() {
            give_up
        } else {
            Instant::now() + lifetime(&soak.plan, index, result.sessions)
        };
        let mut leave = std::pin::pin!(tokio::time::sleep_until(leave_at.into()));
        let mut target = last;
        loop {
            if target.is_some_and(|last| cursor.position >= last) {
                break;
            }
            tokio::select! {
                message = socket.next() => {
                    let received_wall = wall_now();
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        _ => {
                            // Closed under it: an error, then resume.
                            result.windows.at(Instant::now()).errors += 1;
                            break;
                        }
                    };
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        result.windows.at(Instant::now()).errors += 1;
                        continue;
                    };
                    match value["type"].as_str() {
                        Some("next") => {
                            let change = &value["payload"]["data"]["syncStateChanged"];
                            let id = change["cursor"].as_str().and_then(Cursor::decode);
                            let committed = change["at"]
                                .as_str()
                                .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok());
                            let (Some(id), Some(committed)) = (id, committed) else {
                                result.windows.at(Instant::now()).errors += 1;
                                continue;
                            };
                            if id.position <= cursor.position {
                                result.duplicates += 1;
                                continue;
                            }
                            cursor = id;
                            result.received.push(id.position);
                            let committed = committed.timestamp_micros() as f64 / 1e6;
                            // Only what was committed while this session was
                            // open counts as delivered live; the rest is the
                            // replay of what it missed while away.
                            if committed >= session_started {
                                let delay_ms = ((received_wall - committed) * 1000.0) as f32;
                                result.windows.at_wall(committed).deliveries.push(delay_ms);
                            }
                        }
                        Some("ping") => {
                            let _ = socket.send(Message::Text(r#"{"type":"pong"}"#.into())).await;
                        }
                        _ => {
                            result.windows.at(Instant::now()).errors += 1;
                            break;
                        }
                    }
                }
                _ = &mut leave => {
                    leave_now(&mut socket, index).await;
                    break;
                }
                changed = finish.changed(), if target.is_none() => {
                    if changed.is_ok() {
                        target = *finish.borrow_and_update();
                        leave.as_mut().reset(give_up.into());
                    }
                }
            }
        }
        if target.is_some() {
            let _ = socket.close(None).await;
            continue;
        }
        drop(socket);
        // Away for a moment, as a page reload or a network change would.
        let away = Duration::from_millis(100 + (index as u64 * 53 + result.sessions * 29) % 900);
        tokio::time::sleep(away).await;
    }
}

/// Half the subscribers say goodbye, the other half just vanish.
async fn leave_now(socket: &mut WebSocket, index: usize) {
    if index.is_multiple_of(2) {
        let _ = socket.close(None).await;
    }
}

/// A WebSocket to the server.
type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a graphql-transport-ws connection as `token`'s caller and
/// subscribes (id "1") to `query` with `variables`.
async fn subscribe(
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
