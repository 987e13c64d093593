//! One keep-alive HTTP/1.1 connection per load worker, with no pool, no
//! retries and no task of its own (as wrk does): the server and PostgreSQL
//! share this machine's cores with the load tool, so every microsecond the
//! tool spends is taken from what it measures. Responses are parsed with
//! httparse (hyper's parser) and must carry a `content-length`, as the
//! server's JSON answers do. Through a balancer that names the replica
//! that answered in an `x-served-by` header (as docs/haproxy.cfg does),
//! that name comes with the response.

use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest one exchange may take before it counts as failed.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers parsed per response: the server's own and a balancer's.
const MAX_HEADERS: usize = 32;

/// The header in which a balancer names the replica that answered.
const SERVED_BY: &str = "x-served-by";

/// A status and body read off the connection.
pub struct Response<'a> {
    /// HTTP status code.
    pub status: u16,
    /// The whole body.
    pub body: &'a [u8],
    /// The `x-served-by` header: which replica a balancer sent the
    /// request to. `None` without a balancer (or with one that does not
    /// say).
    pub served_by: Option<&'a str>,
}

/// Where the head and body of a response lie in the buffer.
struct Parsed {
    status: u16,
    head: usize,
    length: usize,
    served_by: Option<Range<usize>>,
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
        let parsed = tokio::time::timeout(EXCHANGE_TIMEOUT, self.send_and_read(request))
            .await
            .context("the server did not answer in time")??;
        let served_by = parsed
            .served_by
            .and_then(|range| std::str::from_utf8(&self.buffer[range]).ok())
            .map(str::trim)
            .filter(|name| !name.is_empty());
        Ok(Response {
            status: parsed.status,
            body: &self.buffer[parsed.head..parsed.head + parsed.length],
            served_by,
        })
    }

    /// Reads a response whose head and body are then all in `buffer`.
    async fn send_and_read(&mut self, request: &[u8]) -> anyhow::Result<Parsed> {
        self.stream.write_all(request).await?;
        self.buffer.clear();
        loop {
            self.fill().await?;
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response.parse(&self.buffer)? {
                let status = response.code.context("no status")?;
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|header| header.name.eq_ignore_ascii_case(name))
                };
                let length =
                    header("content-length").context("the response has no content-length")?;
                let length: usize = std::str::from_utf8(length.value)?.trim().parse()?;
                // Where the value lies in the buffer (httparse's slices
                // borrow it, and it grows while the body is read).
                let served_by = header(SERVED_BY).map(|header| {
                    let start = header.value.as_ptr() as usize - self.buffer.as_ptr() as usize;
                    start..start + header.value.len()
                });
                while self.buffer.len() < head + length {
                    self.fill().await?;
                }
                return Ok(Parsed {
                    status,
                    head,
                    length,
                    served_by,
                });
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

/// Opens a connection to `base` (`http://host:port`) for a response that
/// stays open (an event stream, a WebSocket): sends the request `request`
/// writes for the authority, reads the response's head, and lets `accept`
/// refuse it. Returns the socket and whatever followed the head.
pub async fn open_stream(
    base: &str,
    request: impl FnOnce(&str) -> String,
    accept: impl FnOnce(&httparse::Response) -> anyhow::Result<()>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let authority = base
        .strip_prefix("http://")
        .context("only http:// URLs are supported")?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request(authority).as_bytes()).await?;
    let mut raw = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut raw).await? == 0 {
            bail!("the server closed the connection before answering");
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(&raw)? {
            accept(&response)?;
            return Ok((stream, raw.split_off(head)));
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// Two answers on one keep-alive connection, the first through a
    /// balancer that names the replica, the second without one.
    #[tokio::test]
    async fn the_replica_named_by_the_balancer_comes_with_the_response() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let mut connection = HttpConnection::open(&base).await.unwrap();
        let request = connection.post("/graphql", "Bearer x", r#"{"query":"{ x }"}"#);
        let length = request.len();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            for answer in [
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                 X-Served-By: replica2\r\ncontent-length: 11\r\n\r\n{\"data\":{}}",
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}",
            ] {
                let mut received = vec![0; length];
                socket.read_exact(&mut received).await.unwrap();
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let first = connection.exchange(&request).await.unwrap();
        assert_eq!(
            (first.status, first.body, first.served_by),
            (200, &br#"{"data":{}}"#[..], Some("replica2"))
        );
        let second = connection.exchange(&request).await.unwrap();
        assert_eq!(
            (second.status, second.body, second.served_by),
            (503, &b"{}"[..], None)
        );
        server.await.unwrap();
    }
}
