//! GraphQL over WebSocket on `/graphql`: `graphql-transport-ws` and the
//! legacy `graphql-ws` (subscriptions-transport-ws) subprotocol.
//!
//! async-graphql's protocol state machine does the GraphQL part; this
//! module wraps it with what it lacks: the subprotocol chosen once and used
//! for both the handshake and the messages, the protocol's close codes (4403
//! for a refused `connection_init` or an expired token, 4408 when none
//! arrives in time, 4409 for a duplicate id), server keep-alive pings, and
//! a cap on subscriptions per connection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::Data;
use async_graphql::futures_util::{SinkExt, StreamExt, future};
use async_graphql::http::{ClientMessage, WebSocket, WebSocketProtocols as Protocols, WsMessage};
use axum::extract::ws::{CloseFrame, Message, WebSocket as Socket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};

use super::AppState;
use super::request::refuse;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::feed::LIVE_WAIT;
use crate::graphql::OperationContext;
use crate::metrics::ConnectionClosed;

/// What the connection's reader (inside async-graphql's machine) and its
/// writer loop share. Kept small: every idle subscriber holds one.
#[derive(Default)]
struct Shared {
    state: Mutex<SharedState>,
    /// Wakes the writer when the reader leaves it a message.
    wake: Notify,
}

#[derive(Default)]
struct SharedState {
    /// Ids of the running subscriptions.
    active: HashSet<String>,
    /// Answers this layer gives itself (refusals, 4409), for the writer.
    outbox: Vec<Message>,
    /// The caller, once acknowledged, when its subscribes are rate limited.
    caller: Option<Caller>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        // Every update is a single insert, remove or push: a panic
        // elsewhere cannot leave the state half-written.
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn answer(&self, message: Message) {
        self.lock().outbox.push(message);
        self.wake.notify_one();
    }
}

/// How `connection_init` ended, told by the init callback (inside
/// async-graphql's machine) to the connection's loop.
enum InitOutcome {
    /// Acknowledged for this caller.
    Accepted(Caller),
    /// Refused: the machine closes with 1002, which becomes this code.
    Refused {
        /// The close code the spec gives the refusal.
        close_code: u16,
    },
}

/// WebSocket transport settings (`--max-subscriptions-per-connection`,
/// `--ws-init-timeout-secs`, `--ws-ping-interval-secs`).
#[derive(Debug, Clone, Copy)]
pub struct WebSocketConfig {
    /// Most subscriptions per connection.
    pub max_subscriptions: usize,
    /// Time allowed for `connection_init`.
    pub init_timeout: Duration,
    /// Interval of server pings.
    pub ping_interval: Duration,
    /// A peer that answers no ping for this long is dropped.
    pub pong_timeout: Duration,
}

impl WebSocketConfig {
    /// The defaults of the flags.
    pub const DEFAULT: Self = Self {
        max_subscriptions: 100,
        init_timeout: Duration::from_secs(10),
        ping_interval: Duration::from_secs(15),
        pong_timeout: Duration::from_secs(30),
    };
}

/// Longest a close frame to a peer that stopped answering may take to go.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Longest subscription id a client may use.
const MAX_ID_BYTES: usize = 128;
/// Longest outgoing message that can be a `connection_ack` or a `complete`
/// (`{"type":"complete","id":"..."}` with the longest id).
const MAX_ENVELOPE_BYTES: usize = MAX_ID_BYTES + 64;

/// The fields of an outgoing protocol message this layer acts on; the
/// payload is skipped unread.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// Answers a WebSocket upgrade on `/graphql`.
pub async fn upgrade(
    app: AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|protocol| protocol.trim().to_owned())
        .collect();
    let offers = |name: &str| offered.iter().any(|protocol| protocol == name);
    let protocol = if offers("graphql-transport-ws") || offered.is_empty() {
        Protocols::GraphQLWS
    } else if offers("graphql-ws") {
        Protocols::SubscriptionsTransportWS
    } else {
        let error = ApiError::bad_input(
            "Sec-WebSocket-Protocol",
            "use the graphql-transport-ws (or legacy graphql-ws) subprotocol",
        );
        return refuse(error);
    };
    // A token may come with the upgrade request; connection_init may
    // override it. A bad one is refused before upgrading.
    let header_caller = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => match app
            .keys
            .caller(Some(value.to_str().unwrap_or("\u{0}")))
            .await
        {
            Ok(caller) => Some(caller),
            Err(error) => return refuse(error),
        },
    };
    // Small buffers (tungstenite's defaults are 128 KiB each way, which
    // is what a connection would cost), write-through, and no message
    // larger than an HTTP body may be.
    let upgrade = upgrade
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(app.max_body_bytes)
        .max_frame_size(app.max_body_bytes);
    let upgrade = if offered.is_empty() {
        upgrade
    } else {
        upgrade.protocols([protocol.sec_websocket_protocol()])
    };
    // A task of its own: inside axum's upgrade task this connection's
    // future would sit in a larger one for its whole life, and every idle
    // subscriber would pay for it.
    upgrade.on_upgrade(move |socket| async move {
        tokio::spawn(serve(socket, app, protocol, header_caller, client));
    })
}

/// The `Authorization` value in a `connection_init` payload:
/// `{"Authorization": ...}` or `{"headers": {"Authorization": ...}}`, any case.
fn authorization(payload: &Value) -> Option<String> {
    let find = |object: &serde_json::Map<String, Value>| {
        object
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
            .and_then(|(_, value)| value.as_str().map(str::to_owned))
    };
    let object = payload.as_object()?;
    find(object).or_else(|| {
        object
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("headers"))
            .and_then(|(_, headers)| headers.as_object())
            .and_then(find)
    })
}

fn error_message(protocol: Protocols, id: &str, code: ErrorCode, message: &str) -> String {
    let error = json!({"message": message, "extensions": {"code": code.as_str()}});
    match protocol {
        Protocols::GraphQLWS => json!({"type": "error", "id": id, "payload": [error]}),
        Protocols::SubscriptionsTransportWS => json!({"type": "error", "id": id, "payload": error}),
    }
    .to_string()
}

async fn serve(
    socket: Socket,
    app: AppState,
    protocol: Protocols,
    header_caller: Option<Caller>,
    client: Option<std::net::IpAddr>,
) {
    let (mut sink, stream) = socket.split();
    let shared = Arc::new(Shared::default());
    let (init_told, mut init_outcome) = oneshot::channel::<InitOutcome>();
    let settings = app.websocket;

    let limiter = app.rate_limiter.clone();
    let metrics = app.metrics.clone();
    // Set by anything the peer sends (a pong frame, a protocol pong, a
    // message): proof it is still there.
    let heard = Arc::new(AtomicBool::new(false));
    // Incoming: client messages, less what this layer answers itself.
    let incoming = {
        let shared = shared.clone();
        let heard = heard.clone();
        stream
            .inspect(move |_| heard.store(true, Ordering::Relaxed))
            .take_while(|message| {
                future::ready(
                    matches!(message, Ok(message) if !matches!(message, Message::Close(_))),
                )
            })
            .filter_map(move |message| {
                let (shared, limiter, metrics) = (shared.clone(), limiter.clone(), metrics.clone());
                async move {
                    let parsed = match message.ok()? {
                        Message::Text(text) => ClientMessage::from_bytes(text.as_str().as_bytes()),
                        Message::Binary(bytes) => ClientMessage::from_bytes(&bytes),
                        _ => return None,
                    };
                    match &parsed {
                        Ok(ClientMessage::Start { id, .. }) => {
                            let over_rate = match (&limiter, shared.lock().caller.clone()) {
                                (Some(limiter), Some(caller)) => {
                                    limiter.check(&caller, client).err()
                                }
                                _ => None,
                            };
                            let refusal = {
                                let active = &mut shared.lock().active;
                                if let Some(wait) = over_rate {
                                    metrics.rate_limited();
                                    let error = ApiError::RateLimited(wait);
                                    let text =
                                        error_message(protocol, id, error.code(), &error.message());
                                    Some(Message::Text(text.into()))
                                } else if active.contains(id) {
                                    Some(Message::Close(Some(CloseFrame {
                                        code: 4409,
                                        reason: format!("Subscriber for {id} already exists")
                                            .into(),
                                    })))
                                } else if id.len() > MAX_ID_BYTES {
                                    let text = error_message(
                                        protocol,
                                        id,
                                        ErrorCode::BadUserInput,
                                        &format!(
                                            "subscription ids are at most {MAX_ID_BYTES} bytes"
                                        ),
                                    );
                                    Some(Message::Text(text.into()))
                                } else if active.len() >= settings.max_subscriptions {
                                    let text = error_message(
                                        protocol,
                                        id,
                                        ErrorCode::BadUserInput,
                                        &format!(
                                            "at most {} subscriptions per connection",
                                            settings.max_subscriptions
                                        ),
                                    );
                                    Some(Message::Text(text.into()))
                                } else {
                                    active.insert(id.clone());
                                    None
                                }
                            };
                            if let Some(refusal) = refusal {
                                shared.answer(refusal);
                                return None;
                            }
                        }
                        Ok(ClientMessage::Stop { id }) => {
                            shared.lock().active.remove(id);
                        }
                        _ => {}
                    }
                    Some(parsed)
                }
            })
    };

    let on_init = {
        let keys = app.keys.clone();
        let feed = app.feed.clone();
        let limited = app.rate_limiter.is_some();
        let shared_for_init = shared.clone();
        move |payload: Value| async move {
            let caller = match authorization(&payload) {
                Some(value) => keys.caller(Some(&value)).await,
                None => Ok(header_caller.unwrap_or_else(Caller::anon)),
            };
            let caller = match caller {
                Ok(caller) => caller,
                Err(error) => {
                    let _ = init_told.send(InitOutcome::Refused { close_code: 4403 });
                    return Err(async_graphql::Error::new(error.message()));
                }
            };
            // Acknowledge only once changes can be delivered.
            if !feed.wait_live(LIVE_WAIT).await {
                // 1013: try again later.
                let _ = init_told.send(InitOutcome::Refused { close_code: 1013 });
                return Err(async_graphql::Error::new(
                    "the live feed is reconnecting; try again shortly",
                ));
            }
            if limited {
                shared_for_init.lock().caller = Some(caller.clone());
            }
            let _ = init_told.send(InitOutcome::Accepted(caller.clone()));
            let mut data = Data::default();
            data.insert(OperationContext::subscriptions(caller, feed, None));
            Ok(data)
        }
    };

    let machine = WebSocket::from_message_stream(app.schema.clone(), incoming, protocol)
        .on_connection_init(on_init);
    let mut machine = std::pin::pin!(machine);
    let init_deadline = tokio::time::sleep(settings.init_timeout);
    tokio::pin!(init_deadline);
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    // Since when a ping has gone unanswered, if one has.
    let mut unanswered_since: Option<tokio::time::Instant> = None;
    let mut expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let mut acked = false;
    let mut shutting_down = app.shutting_down.clone();

    let close = |code: u16, reason: String| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        let outgoing = tokio::select! {
            message = machine.next() => match message {
                None => break,
                Some(WsMessage::Text(text)) => {
                    // Only short messages can be an ack or a complete (ids
                    // are capped): the changes themselves are not read again.
                    let envelope = (text.len() <= MAX_ENVELOPE_BYTES)
                        .then(|| serde_json::from_str::<Envelope<'_>>(&text).ok())
                        .flatten();
                    match envelope {
                        Some(envelope) if envelope.kind == "connection_ack" && !acked => {
                            acked = true;
                            if let Ok(InitOutcome::Accepted(caller)) = init_outcome.try_recv() {
                                expiry = caller.expires_in().map(|left| Box::pin(tokio::time::sleep(left)));
                            }
                        }
                        Some(Envelope { kind, id: Some(id) }) if kind == "complete" => {
                            shared.lock().active.remove(id.as_ref());
                        }
                        _ => {}
                    }
                    Message::Text(text.into())
                }
                Some(WsMessage::Close(code, reason)) => {
                    let code = match (code, init_outcome.try_recv()) {
                        (1002, Ok(InitOutcome::Refused { close_code })) => close_code,
                        // Anything else the machine closes with 1002 is a
                        // message it could not parse.
                        (1002, _) => 4400,
                        (other, _) => other,
                    };
                    let _ = sink.send(close(code, reason)).await;
                    break;
                }
            },
            () = shared.wake.notified() => {
                let answers = std::mem::take(&mut shared.lock().outbox);
                let mut closing = false;
                for message in answers {
                    closing = matches!(message, Message::Close(_));
                    if sink.send(message).await.is_err() || closing {
                        closing = true;
                        break;
                    }
                }
                if closing {
                    break;
                }
                continue;
            }
            () = &mut init_deadline, if !acked => {
                let _ = sink.send(close(4408, "Connection initialisation timeout".into())).await;
                break;
            }
            _ = ping.tick(), if acked => {
                if heard.swap(false, Ordering::Relaxed) {
                    unanswered_since = None;
                }
                match unanswered_since {
                    // The peer is gone without a FIN (a lost network, a
                    // sleeping laptop): free its slot now, not when TCP
                    // gives up, many minutes later.
                    Some(since) if since.elapsed() >= settings.pong_timeout => {
                        app.metrics.connection_closed(ConnectionClosed::PongTimeout);
                        let goodbye = sink.send(close(1011, "no answer to pings".into()));
                        let _ = tokio::time::timeout(CLOSE_WAIT, goodbye).await;
                        break;
                    }
                    _ => {}
                }
                // A ping frame as well as the protocol's keep-alive: every
                // WebSocket peer answers it, the legacy protocol's too,
                // whose keep-alive has no answer. The wait is counted from
                // when it went out: time spent blocked writing to a slow
                // reader is not the peer's silence.
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                let text = match protocol {
                    Protocols::GraphQLWS => r#"{"type":"ping"}"#,
                    Protocols::SubscriptionsTransportWS => r#"{"type":"ka"}"#,
                };
                Message::Text(text.into())
            }
            () = async { drop(shutting_down.wait_for(|down| *down).await) } => {
                let _ = sink.send(close(1001, "server shutting down; resume with your last cursor".into())).await;
                break;
            }
            () = async { if let Some(expiry) = expiry.as_mut() { expiry.await } else { std::future::pending().await } } => {
                let _ = sink.send(close(4403, "token expired".into())).await;
                break;
            }
        };
        if sink.send(outgoing).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}
