//! One keep-alive HTTP/1.1 connection per load worker, with no pool, no
//! retries and no task of its own (as wrk does): the server and PostgreSQL
//! share this machine's cores with the load tool, so every microsecond the
//! tool spends is taken from what it measures. Responses are parsed with
//! httparse (hyper's parser) and must carry a `content-length`, as the
//! server's JSON answers do.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest one exchange may take before it counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A status and body read off the connection.
pub struct Response<'a> {
    /// HTTP status code.
    pub status: u16,
    /// The whole body.
    pub body: &'a [u8],
}

/// An open connection to the server.
pub struct HttpConnection {
    stream: TcpStream,
    authority: String,
    buffer: Vec<u8>,
}

impl HttpConnection {
    /// Connects to `base` (`http://host:port`).
    pub async fn open(base: &str) -> anyhow::Result<Self> {
        let authority = base
            .strip_prefix("http://")
            .with_context(|| format!("{base}: only http:// URLs are supported"))?
            .trim_end_matches('/')
            .to_owned();
        let stream = TcpStream::connect(&authority)
            .await
            .with_context(|| format!("cannot connect to {authority}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            authority,
            buffer: Vec::with_capacity(16 * 1024),
        })
    }

    /// Replaces the connection with a fresh one, as after a failed
    /// exchange (its state is then unknown); false when the server cannot
    /// be reached.
    pub async fn reopen(&mut self) -> bool {
        match Self::open(&format!("http://{}", self.authority)).await {
            Ok(fresh) => {
                *self = fresh;
                true
            }
            Err(_) => false,
        }
    }

    /// A complete `POST path` request with `body` as JSON, ready to send
    /// as often as needed.
    pub fn post(&self, path: &str, authorization: &str, body: &str) -> Vec<u8> {
        format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\nauthorization: {authorization}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.authority,
            body.len()
        )
        .into_bytes()
    }

    /// Sends `request` and reads its response.
    pub async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<Response<'_>> {
        let (status, head, length) =
            tokio::time::timeout(EXCHANGE_TIMEOUT, self.send_and_read(request))
                .await
                .context("the server did not answer in time")??;
        Ok(Response {
            status,
            body: &self.buffer[head..head + length],
        })
    }

    /// Returns the status, the length of the head and of the body, which
    /// are then all in `buffer`.
    async fn send_and_read(&mut self, request: &[u8]) -> anyhow::Result<(u16, usize, usize)> {
        self.stream.write_all(request).await?;
        self.buffer.clear();
        loop {
            self.fill().await?;
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&self.buffer)? {
                let status = response.code.context("no status")?;
                let length = response
                    .headers
                    .iter()
                    .find(|header| header.name.eq_ignore_ascii_case("content-length"))
                    .context("the response has no content-length")?;
                let length: usize = std::str::from_utf8(length.value)?.trim().parse()?;
                while self.buffer.len() < head + length {
                    self.fill().await?;
                }
                return Ok((status, head, length));
            }
        }
    }

    async fn fill(&mut self) -> anyhow::Result<()> {
        if self.buffer.capacity() - self.buffer.len() < 4096 {
            self.buffer.reserve(16 * 1024);
        }
        if self.stream.read_buf(&mut self.buffer).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}
