//! GraphQL over WebSocket on `/graphql`: `graphql-transport-ws` and the
//! legacy `graphql-ws` (subscriptions-transport-ws) subprotocol.
//!
//! The protocol is spoken here rather than by async-graphql's machine,
//! which serialises every result for every subscriber: a change rendered
//! once for a group ([`crate::graphql::live`]) is framed around the same
//! bytes for each member. Also here: the subprotocol chosen once and used
//! for both the handshake and the messages, the protocol's close codes
//! (4400 for a message that does not parse, 4401 for a subscribe before
//! the acknowledgement, 4403 for a refused `connection_init` or an expired
//! token, 4408 when none arrives in time, 4409 for a duplicate id, 4429 for
//! a second `connection_init`), server keep-alive pings, and a cap on
//! subscriptions per connection.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_graphql::futures_util::{SinkExt, StreamExt};
use async_graphql::http::{ClientMessage, WebSocketProtocols as Protocols};
use axum::extract::ws::{CloseFrame, Message, WebSocket as Socket, WebSocketUpgrade};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::AppState;
use super::outbox::Outbox;
use super::request::{mentions_document_id, refuse};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::feed::LIVE_WAIT;
use crate::graphql::live::{Delivery, LiveStream, Outlet, RenderedChange};
use crate::metrics::ConnectionClosed;
use crate::prefetch::prefetch;

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
/// Answers a WebSocket upgrade on `/graphql`.
pub async fn upgrade(
    app: AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    outbox: Option<Arc<Outbox>>,
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
    // The upgrade request's trace (its server span, the child of the
    // client's `traceparent`), for the connection's subscriptions: its
    // context only, so the request's span still ends with the upgrade.
    let current = tracing::Span::current();
    let trace_parent = (!current.is_disabled()).then(|| current.context());
    // A task of its own: inside axum's upgrade task this connection's
    // future would sit in a larger one for its whole life, and every idle
    // subscriber would pay for it.
    upgrade.on_upgrade(move |socket| async move {
        // hyper is done with the socket: from now on the renderer may
        // write to it too.
        if let Some(outbox) = &outbox {
            outbox.share();
        }
        tokio::spawn(serve(
            socket,
            app,
            protocol,
            header_caller,
            client,
            trace_parent,
            outbox,
        ));
    })
}

/// The `documentId` of a subscribe message's payload, if it names one.
fn subscribe_document_id(bytes: &[u8]) -> Result<Option<String>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Subscribe {
        payload: Option<Value>,
    }
    if !mentions_document_id(bytes) {
        return Ok(None);
    }
    let payload = serde_json::from_slice::<Subscribe>(bytes)
        .ok()
        .and_then(|message| message.payload);
    match payload
        .as_ref()
        .and_then(|payload| payload.get("documentId"))
    {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => Ok(Some(id.clone())),
        Some(_) => Err(ApiError::bad_input(
            "documentId",
            "\"documentId\" must be a string",
        )),
    }
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

/// A running operation of a connection.
struct Running {
    id: Box<str>,
    /// The id as a JSON string, written into every message.
    id_json: Box<str>,
    deliveries: LiveStream,
}

/// A connection's running operations, polled in turn.
#[derive(Default)]
struct Operations {
    running: Vec<Running>,
    next_first: usize,
}

impl Operations {
    fn contains(&self, id: &str) -> bool {
        self.running.iter().any(|running| &*running.id == id)
    }

    fn remove(&mut self, id: &str) -> bool {
        let before = self.running.len();
        self.running.retain(|running| &*running.id != id);
        self.running.len() != before
    }

    /// The next delivery of any operation, with its id as JSON; `None` for
    /// an operation that has ended (and is removed).
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<(Box<str>, Option<Delivery>)> {
        let count = self.running.len();
        for offset in 0..count {
            let index = (self.next_first + offset) % count;
            match self.running[index].deliveries.poll_next_unpin(cx) {
                Poll::Ready(Some(delivery)) => {
                    // The next poll starts after this one: a busy
                    // operation cannot starve the others.
                    self.next_first = index + 1;
                    return Poll::Ready((self.running[index].id_json.clone(), Some(delivery)));
                }
                Poll::Ready(None) => {
                    let ended = self.running.swap_remove(index);
                    return Poll::Ready((ended.id_json, None));
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    fn next(&mut self) -> impl Future<Output = (Box<str>, Option<Delivery>)> + '_ {
        std::future::poll_fn(|cx| self.poll_next(cx))
    }
}

/// What the connection does after a client message.
enum Reply {
    Nothing,
    Send(String),
    Close(u16, String),
    /// Ends without a close code (the legacy protocol's refusals, after
    /// their `connection_error`, and `connection_terminate`).
    End(Option<String>),
}

/// A connection's protocol state.
struct Connection {
    app: AppState,
    protocol: Protocols,
    client: Option<std::net::IpAddr>,
    header_caller: Option<Caller>,
    init_received: bool,
    /// The caller, once acknowledged.
    caller: Option<Caller>,
    operations: Operations,
    /// The trace of the upgrade request, when traces are on.
    trace_parent: Option<opentelemetry::Context>,
    /// The socket, shared with the renderer; `None` when the router is
    /// served by something other than this server's listener.
    outbox: Option<Arc<Outbox>>,
}

impl Connection {
    async fn receive(&mut self, bytes: &[u8]) -> Reply {
        let message = match ClientMessage::from_bytes(bytes) {
            Ok(message) => message,
            Err(error) => return Reply::Close(4400, error.to_string()),
        };
        match message {
            ClientMessage::ConnectionInit { payload } => {
                Box::pin(self.init(payload.unwrap_or_default())).await
            }
            ClientMessage::Start { id, payload } => match subscribe_document_id(bytes) {
                Ok(document_id) => self.start(id, payload, document_id),
                Err(error) => Reply::Send(error_message(
                    self.protocol,
                    &id,
                    error.code(),
                    &error.message(),
                )),
            },
            ClientMessage::Stop { id } => {
                if self.operations.remove(&id) {
                    Reply::Send(complete(&json_string(&id)))
                } else {
                    Reply::Nothing
                }
            }
            ClientMessage::ConnectionTerminate => Reply::End(None),
            ClientMessage::Ping { .. } => Reply::Send(r#"{"type":"pong"}"#.to_owned()),
            ClientMessage::Pong { .. } => Reply::Nothing,
        }
    }

    /// Refuses `connection_init` as the protocol says.
    fn refuse_init(&self, close_code: u16, message: String) -> Reply {
        match self.protocol {
            Protocols::GraphQLWS => Reply::Close(close_code, message),
            Protocols::SubscriptionsTransportWS => Reply::End(Some(
                json!({"type": "connection_error", "payload": {"message": message}}).to_string(),
            )),
        }
    }

    async fn init(&mut self, payload: Value) -> Reply {
        if std::mem::replace(&mut self.init_received, true) {
            return self.refuse_init(4429, "Too many initialisation requests.".into());
        }
        let caller = match authorization(&payload) {
            Some(value) => self.app.keys.caller(Some(&value)).await,
            None => Ok(self.header_caller.take().unwrap_or_else(Caller::anon)),
        };
        let caller = match caller {
            Ok(caller) => caller,
            Err(error) => return self.refuse_init(4403, error.message()),
        };
        // Acknowledge only once changes can be delivered.
        if !self.app.feed.wait_live(LIVE_WAIT).await {
            // 1013: try again later.
            return self.refuse_init(
                1013,
                "the live feed is reconnecting; try again shortly".into(),
            );
        }
        self.caller = Some(caller);
        Reply::Send(r#"{"type":"connection_ack"}"#.to_owned())
    }

    fn start(
        &mut self,
        id: String,
        mut request: async_graphql::Request,
        document_id: Option<String>,
    ) -> Reply {
        let Some(caller) = &self.caller else {
            return Reply::Close(4401, "Unauthorized".into());
        };
        let refusal = |error: ApiError| {
            Reply::Send(error_message(
                self.protocol,
                &id,
                error.code(),
                &error.message(),
            ))
        };
        if let Some(limiter) = &self.app.rate_limiter
            && let Err(wait) = limiter.check(caller, self.client)
        {
            self.app.metrics.rate_limited();
            return refusal(ApiError::RateLimited(wait));
        }
        if self.operations.contains(&id) {
            return Reply::Close(4409, format!("Subscriber for {id} already exists"));
        }
        if id.len() > MAX_ID_BYTES {
            return refusal(ApiError::bad_input(
                "id",
                format!("subscription ids are at most {MAX_ID_BYTES} bytes"),
            ));
        }
        let max = self.app.websocket.max_subscriptions;
        if self.operations.running.len() >= max {
            return refusal(ApiError::bad_input(
                "id",
                format!("at most {max} subscriptions per connection"),
            ));
        }
        if let Err(error) = self.app.documents.settle(
            &mut request,
            document_id.as_deref(),
            caller.role,
            &self.app.metrics,
        ) {
            return refusal(error);
        }
        if request.query.trim().is_empty() {
            return refusal(ApiError::bad_input(
                "query",
                "the subscribe payload has no \"query\" (nor a \"documentId\" or persisted-query hash)",
            ));
        }
        self.app.parsed_queries.prepare(&mut request);
        let mut deliveries =
            self.app
                .live
                .subscribe(request, caller.clone(), None, self.trace_parent.as_ref());
        let id_json = json_string(&id);
        if let Some(outbox) = &self.outbox {
            deliveries.deliver_through(FramedOutlet::new(outbox.clone(), self.protocol, &id_json));
        }
        self.operations.running.push(Running {
            id_json: id_json.into(),
            id: id.into(),
            deliveries,
        });
        Reply::Nothing
    }

    /// Ends every operation: nothing of theirs is written after this, so
    /// a close frame written next is the last frame.
    fn end_operations(&mut self) {
        self.operations = Operations::default();
    }

    /// The message carrying `delivery` to operation `id_json`.
    fn frame(&self, id_json: &str, delivery: Delivery) -> String {
        let response;
        let payload = match &delivery {
            Delivery::Rendered(change) => &*change.payload,
            Delivery::Response(result) => {
                response = serde_json::to_string(result).unwrap_or_else(|_| "{}".into());
                &response
            }
        };
        let mut text = message_head(self.protocol, id_json);
        text.reserve(payload.len() + 1);
        text.push_str(payload);
        text.push('}');
        text
    }
}

/// An operation's changes written by the renderer itself: its message
/// around the group's payload, in one WebSocket text frame.
struct FramedOutlet {
    outbox: Arc<Outbox>,
    /// The message up to its payload: `{"type":"next","id":<id>,"payload":`.
    head: Box<[u8]>,
}

impl FramedOutlet {
    fn new(outbox: Arc<Outbox>, protocol: Protocols, id_json: &str) -> Self {
        Self {
            outbox,
            head: message_head(protocol, id_json)
                .into_bytes()
                .into_boxed_slice(),
        }
    }
}

impl Outlet for FramedOutlet {
    fn prefetch(&self) {
        prefetch(&*self.head);
        prefetch(&*self.outbox);
    }

    fn prefetch_socket(&self) {
        self.outbox.prefetch_socket();
    }

    fn offer(&self, change: &RenderedChange) -> bool {
        let payload = change.payload.as_bytes();
        let length = self.head.len() + payload.len() + 1;
        self.outbox.offer_with(|frame| {
            // A server's frame: final, text, unmasked; its length in 7, 16
            // or 64 bits.
            frame.push(0x81);
            match length {
                0..=125 => frame.push(length as u8),
                126..=0xFFFF => {
                    frame.push(126);
                    frame.extend_from_slice(&(length as u16).to_be_bytes());
                }
                _ => {
                    frame.push(127);
                    frame.extend_from_slice(&(length as u64).to_be_bytes());
                }
            }
            frame.extend_from_slice(&self.head);
            frame.extend_from_slice(payload);
            frame.push(b'}');
        })
    }
}

/// A data message to operation `id_json`, up to its payload:
/// `{"type":"next","id":<id>,"payload":` (`data` in the legacy protocol).
fn message_head(protocol: Protocols, id_json: &str) -> String {
    let kind = match protocol {
        Protocols::GraphQLWS => "next",
        Protocols::SubscriptionsTransportWS => "data",
    };
    format!(r#"{{"type":"{kind}","id":{id_json},"payload":"#)
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

fn complete(id_json: &str) -> String {
    format!(r#"{{"type":"complete","id":{id_json}}}"#)
}

async fn serve(
    mut socket: Socket,
    app: AppState,
    protocol: Protocols,
    header_caller: Option<Caller>,
    client: Option<std::net::IpAddr>,
    trace_parent: Option<opentelemetry::Context>,
    outbox: Option<Arc<Outbox>>,
) {
    let settings = app.websocket;
    let mut shutting_down = app.shutting_down.clone();
    // Made once: a future made afresh on every turn of the loop costs
    // more than the delivery it waits beside.
    let shutdown = async move { drop(shutting_down.wait_for(|down| *down).await) };
    tokio::pin!(shutdown);
    let mut connection = Connection {
        app,
        protocol,
        client,
        header_caller,
        init_received: false,
        caller: None,
        operations: Operations::default(),
        trace_parent,
        outbox,
    };
    let init_deadline = tokio::time::sleep(settings.init_timeout);
    tokio::pin!(init_deadline);
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.tick().await;
    // Set by anything the peer sends (a pong frame, a protocol pong, a
    // message): proof it is still there.
    let mut heard = false;
    // Since when a ping has gone unanswered, if one has.
    let mut unanswered_since: Option<tokio::time::Instant> = None;
    let mut expiry: Option<Pin<Box<tokio::time::Sleep>>> = None;

    let close = |code: u16, reason: String| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        let acked = connection.caller.is_some();
        let outgoing = tokio::select! {
            // In this order, without drawing a random one each turn.
            biased;
            message = socket.next() => {
                heard = true;
                let reply = match message {
                    Some(Ok(Message::Text(text))) => connection.receive(text.as_bytes()).await,
                    Some(Ok(Message::Binary(bytes))) => connection.receive(&bytes).await,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                match reply {
                    Reply::Nothing => continue,
                    Reply::Send(text) => {
                        if !acked && let Some(caller) = &connection.caller {
                            expiry = caller.expires_in().map(|left| Box::pin(tokio::time::sleep(left)));
                        }
                        Message::Text(text.into())
                    }
                    Reply::Close(code, reason) => {
                        connection.end_operations();
                        let _ = socket.send(close(code, reason)).await;
                        break;
                    }
                    Reply::End(last) => {
                        connection.end_operations();
                        if let Some(text) = last {
                            let _ = socket.send(Message::Text(text.into())).await;
                        }
                        break;
                    }
                }
            }
            (id_json, delivery) = connection.operations.next() => match delivery {
                Some(delivery) => Message::Text(connection.frame(&id_json, delivery).into()),
                None => Message::Text(complete(&id_json).into()),
            },
            () = &mut init_deadline, if !acked => {
                let _ = socket.send(close(4408, "Connection initialisation timeout".into())).await;
                break;
            }
            _ = ping.tick(), if acked => {
                if std::mem::take(&mut heard) {
                    unanswered_since = None;
                }
                match unanswered_since {
                    // The peer is gone without a FIN (a lost network, a
                    // sleeping laptop): free its slot now, not when TCP
                    // gives up, many minutes later.
                    Some(since) if since.elapsed() >= settings.pong_timeout => {
                        connection.app.metrics.connection_closed(ConnectionClosed::PongTimeout);
                        connection.end_operations();
                        let goodbye = socket.send(close(1011, "no answer to pings".into()));
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
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                unanswered_since.get_or_insert_with(tokio::time::Instant::now);
                let text = match protocol {
                    Protocols::GraphQLWS => r#"{"type":"ping"}"#,
                    Protocols::SubscriptionsTransportWS => r#"{"type":"ka"}"#,
                };
                Message::Text(text.into())
            }
            () = &mut shutdown => {
                connection.end_operations();
                let _ = socket.send(close(1001, "server shutting down; resume with your last cursor".into())).await;
                break;
            }
            () = async { if let Some(expiry) = expiry.as_mut() { expiry.await } else { std::future::pending().await } } => {
                connection.end_operations();
                let _ = socket.send(close(4403, "token expired".into())).await;
                break;
            }
        };
        if socket.send(outgoing).await.is_err() {
            break;
        }
    }
    connection.end_operations();
    let _ = socket.close().await;
}
