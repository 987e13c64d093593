//! A GraphQL over SSE client (graphql-sse, distinct connections mode): a
//! POST with `Accept: text/event-stream`, its body read as the SSE format
//! (RFC: the HTML Living Standard's "server-sent events") by hand.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `id:` field, when the event set one.
    pub id: Option<String>,
    /// The `data:` lines, joined by newlines.
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|error| panic!("event data is not JSON ({error}): {:?}", self.data))
    }
}

/// An open event stream.
pub struct SseStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    /// The last event id seen, as a browser's EventSource keeps it.
    pub last_event_id: Option<String>,
    /// Comment lines received (keep-alives).
    pub comments: usize,
}

impl SseStream {
    /// POSTs `body` to `url` as an event stream, with `token` and a
    /// `Last-Event-ID`; the status and JSON body if it is refused.
    pub async fn open(
        url: &str,
        token: Option<&str>,
        body: &Value,
        last_event_id: Option<&str>,
    ) -> Result<SseStream, (StatusCode, Value)> {
        let mut request = reqwest::Client::new()
            .post(url)
            .header("accept", "text/event-stream")
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if status != StatusCode::OK {
            return Err((status, response.json().await.unwrap_or(Value::Null)));
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content-type {content_type}"
        );
        Ok(SseStream {
            response,
            buffer: Vec::new(),
            last_event_id: last_event_id.map(str::to_owned),
            comments: 0,
        })
    }

    /// The next event, or `None` when the stream has ended (or was cut).
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        let (mut event, mut id, mut data) = (None, None, Vec::<String>::new());
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                if data.is_empty() && event.is_none() {
                    continue;
                }
                if let Some(id) = &id {
                    self.last_event_id = Some(String::clone(id));
                }
                return Some(SseEvent {
                    event: event.unwrap_or_else(|| "message".into()),
                    id,
                    data: data.join("\n"),
                });
            }
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "event" => event = Some(value),
                "id" => id = Some(value),
                "data" => data.push(value),
                _ => {}
            }
        }
    }

    /// The next event within `timeout`, which must come.
    pub async fn expect_event(&mut self, timeout: Duration) -> SseEvent {
        tokio::time::timeout(timeout, self.next_event())
            .await
            .expect("no event in time")
            .expect("the stream ended")
    }

    /// The next `next` event's payload, with its id; panics on anything else.
    pub async fn next_payload(&mut self) -> (Option<String>, Value) {
        let event = self.expect_event(Duration::from_secs(10)).await;
        assert_eq!(event.event, "next", "{event:?}");
        (event.id.clone(), event.json())
    }

    async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&byte| byte == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Some(String::from_utf8(line).unwrap());
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
