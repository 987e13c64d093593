//! A lean GraphQL over SSE subscriber for the `sse` scenario: one raw
//! HTTP/1.1 connection, its head parsed with httparse, its chunked body
//! decoded and split into events by hand, so that ten thousand of them
//! cost the load tool little.

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One server-sent event.
pub struct Event {
    /// Its `event:` field.
    pub kind: String,
    /// Its `id:` field.
    pub id: Option<String>,
    /// Its `data:` lines, joined.
    pub data: String,
}

/// An open event stream.
pub struct SseStream {
    stream: TcpStream,
    /// Bytes read and not yet decoded (chunk framing included).
    raw: Vec<u8>,
    /// Decoded body not yet split into events.
    body: Vec<u8>,
    /// Body bytes left in the current chunk.
    chunk_left: usize,
}

impl SseStream {
    /// POSTs `query` to `base`/graphql with `Accept: text/event-stream`.
    pub async fn open(base: &str, token: &str, query: &str) -> anyhow::Result<Self> {
        let authority = base
            .strip_prefix("http://")
            .context("only http:// URLs are supported")?
            .trim_end_matches('/');
        let mut stream = TcpStream::connect(authority).await?;
        stream.set_nodelay(true)?;
        let body = serde_json::json!({ "query": query }).to_string();
        let request = format!(
            "POST /graphql HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\n\
             accept: text/event-stream\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::with_capacity(1024);
        loop {
            if stream.read_buf(&mut raw).await? == 0 {
                bail!("the server closed the connection before answering");
            }
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&raw)? {
                if response.code != Some(200) {
                    bail!("refused with {:?}", response.code);
                }
                let chunked = response.headers.iter().any(|header| {
                    header.name.eq_ignore_ascii_case("transfer-encoding")
                        && header.value.eq_ignore_ascii_case(b"chunked")
                });
                if !chunked {
                    bail!("expected a chunked event stream");
                }
                raw.drain(..head);
                return Ok(Self {
                    stream,
                    raw,
                    body: Vec::new(),
                    chunk_left: 0,
                });
            }
        }
    }

    /// The next event (keep-alive comments skipped).
    pub async fn next_event(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(end) = self.body.windows(2).position(|pair| pair == b"\n\n") {
                // Read in place, then dropped: a copy of every event would
                // cost this tool, which shares the cores with the server.
                let text = std::str::from_utf8(&self.body[..end + 2])?;
                let mut event = Event {
                    kind: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut any = false;
                for line in text.lines().filter(|line| !line.starts_with(':')) {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    any |= !line.is_empty();
                    match field {
                        "event" => event.kind = value.to_owned(),
                        "id" => event.id = Some(value.to_owned()),
                        "data" => event.data.push_str(value),
                        _ => {}
                    }
                }
                self.body.drain(..end + 2);
                if any {
                    return Ok(event);
                }
                continue;
            }
            if !self.decode()? && self.stream.read_buf(&mut self.raw).await? == 0 {
                bail!("the stream ended");
            }
        }
    }

    /// Moves whole chunk data from `raw` to `body`; whether it moved any.
    fn decode(&mut self) -> anyhow::Result<bool> {
        let mut moved = false;
        loop {
            if self.chunk_left > 0 {
                let take = self.chunk_left.min(self.raw.len());
                if take == 0 {
                    return Ok(moved);
                }
                self.body.extend(self.raw.drain(..take));
                self.chunk_left -= take;
                moved = true;
                continue;
            }
            // A chunk's framing: [CRLF after the previous chunk] size CRLF.
            let start = usize::from(self.raw.starts_with(b"\r\n")) * 2;
            let Some(line_end) = self.raw[start..]
                .windows(2)
                .position(|pair| pair == b"\r\n")
            else {
                return Ok(moved);
            };
            let size = std::str::from_utf8(&self.raw[start..start + line_end])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            if size == 0 {
                bail!("the stream ended");
            }
            self.raw.drain(..start + line_end + 2);
            self.chunk_left = size;
        }
    }
}
