//! A GraphQL-over-WebSocket test client (both subprotocols).

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::TestApp;

/// One WebSocket connection to a test server.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The subprotocol the server chose.
    pub protocol: Option<String>,
    /// The server's `/metrics`, whose subscription gauge tells when a
    /// subscription has started.
    metrics_url: String,
}

const WAIT: Duration = Duration::from_secs(10);

impl WsClient {
    /// Connects offering `protocols` (comma-separated).
    pub async fn connect(app: &TestApp, protocols: &str) -> WsClient {
        Self::connect_with(app, protocols, None).await.unwrap()
    }

    /// Connects with an optional Authorization header on the upgrade.
    pub async fn connect_with(
        app: &TestApp,
        protocols: &str,
        authorization: Option<&str>,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        Self::connect_to(app.addr, protocols, authorization).await
    }

    /// Connects to the server at `addr`, which need not be a [`TestApp`]
    /// (a [`crate::ServerProcess`], say), with an optional Authorization
    /// header on the upgrade.
    pub async fn connect_to(
        addr: SocketAddr,
        protocols: &str,
        authorization: Option<&str>,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let mut request = format!("ws://{addr}/graphql")
            .into_client_request()
            .unwrap();
        if !protocols.is_empty() {
            request
                .headers_mut()
                .insert("sec-websocket-protocol", protocols.parse().unwrap());
        }
        if let Some(authorization) = authorization {
            request
                .headers_mut()
                .insert("authorization", authorization.parse().unwrap());
        }
        let (socket, response) = tokio_tungstenite::connect_async(request).await?;
        let protocol = response
            .headers()
            .get("sec-websocket-protocol")
            .map(|value| value.to_str().unwrap().to_owned());
        Ok(WsClient {
            socket,
            protocol,
            metrics_url: format!("http://{addr}/metrics"),
        })
    }

    /// Sends a JSON message.
    pub async fn send(&mut self, message: Value) {
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
    }

    /// The next message that is not a keep-alive; panics on close.
    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Ok(value) => value,
            Err(close) => panic!("connection closed: {close:?}"),
        }
    }

    /// The next message that is not a keep-alive, or the close frame.
    pub async fn next(&mut self) -> Result<Value, (u16, String)> {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("no message within 10 s");
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    match value["type"].as_str() {
                        Some("ping") => {
                            self.send(json!({"type": "pong"})).await;
                        }
                        Some("ka") | Some("pong") => {}
                        _ => return Ok(value),
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(frame.map_or((1005, String::new()), |frame| {
                        (u16::from(frame.code), frame.reason.to_string())
                    }));
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err((1006, error.to_string())),
                None => return Err((1006, "ended".into())),
            }
        }
    }

    /// The next text message as sent, keep-alives included.
    pub async fn raw(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.socket.next())
                .await
                .expect("no message within 10 s");
            if let Some(Ok(Message::Text(text))) = message {
                return serde_json::from_str(&text).unwrap();
            }
            assert!(
                matches!(message, Some(Ok(_))),
                "connection ended: {message:?}"
            );
        }
    }

    /// Expects the server to close, returning code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        match self.next().await {
            Ok(value) => panic!("expected a close, got {value}"),
            Err(close) => close,
        }
    }

    /// `connection_init` with `payload`; returns the server's answer.
    pub async fn init(&mut self, payload: Value) -> Result<Value, (u16, String)> {
        self.send(json!({"type": "connection_init", "payload": payload}))
            .await;
        self.next().await
    }

    /// Connects with graphql-transport-ws and initialises with a token for `role`.
    pub async fn ready(app: &TestApp, role: &str) -> WsClient {
        Self::ready_at(app.addr, &app.token(role)).await.unwrap()
    }

    /// Connects to `addr` with graphql-transport-ws and initialises with
    /// `token`. Failing to connect is returned, for clients that expect
    /// servers to come and go; a refused `connection_init` panics.
    pub async fn ready_at(
        addr: SocketAddr,
        token: &str,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let mut client = Self::connect_to(addr, "graphql-transport-ws", None).await?;
        let ack = client
            .init(json!({"Authorization": format!("Bearer {token}")}))
            .await;
        match ack {
            Ok(ack) if ack["type"] == "connection_ack" => Ok(client),
            other => panic!("connection_init not acknowledged: {other:?}"),
        }
    }

    /// Starts subscription `id` (graphql-transport-ws).
    pub async fn subscribe(&mut self, id: &str, query: &str, variables: Value) {
        self.send(json!({"id": id, "type": "subscribe", "payload": {"query": query, "variables": variables}}))
            .await;
    }

    /// Subscribes as "1" and waits until the subscription has started (a
    /// live-only subscription delivers changes from then on).
    pub async fn follow(&mut self, query: &str, variables: Value) {
        let started = crate::subscription_started(&self.metrics_url);
        let subscribe = self.subscribe("1", query, variables);
        started.wait(subscribe).await;
    }

    /// The next `next` payload's data for any subscription, with its id.
    pub async fn next_data(&mut self) -> (String, Value) {
        let message = self.recv().await;
        assert_eq!(message["type"], "next", "{message}");
        assert!(message["payload"].get("errors").is_none(), "{message}");
        (
            message["id"].as_str().unwrap().to_owned(),
            message["payload"]["data"].clone(),
        )
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}
