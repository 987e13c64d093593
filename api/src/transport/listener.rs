//! The HTTP listener: hyper's HTTP/1.1 connections, with what
//! `axum::serve` lacks against slow and idle clients.
//!
//! - At most `max_connections` open at once (WebSocket connections
//!   included, for as long as they live); past the cap a connection is
//!   closed as soon as it is accepted, long before the file limit.
//! - A request head must arrive within `header_read_timeout` of its first
//!   byte, and a connection with no request in flight is closed after
//!   `idle_timeout`. (hyper's own header timer starts when a keep-alive
//!   connection goes idle, which would make the two one.)
//! - On shutdown: no more accepting; connections finish what is in
//!   flight, within the shutdown timeout.
//! - A connection whose first request asks for an event stream (GraphQL
//!   over SSE) is served here, outside hyper, and closed when its stream
//!   ends: hyper keeps an 8 KiB read buffer and an 8 KiB write buffer for
//!   every connection as long as it lives, which for a stream that lasts
//!   hours is most of what a subscriber costs. Any other first request,
//!   or one that does not arrive whole in one read, is hyper's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::outbox::{Outbox, StreamOutbox};
use super::sse::{accepts_event_stream, chunk};
use crate::metrics::{ConnectionClosed, ConnectionGuard, Metrics};

/// Limits on HTTP connections: slow heads, idle connections, and how many
/// may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to send a request head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a connection may sit with no request in flight.
    pub idle_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// The defaults of the flags (the cap comes from the file limit).
    pub const DEFAULT: Self = Self {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 0,
    };
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the
/// open connections finish what they are doing, for at most `timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    timeout: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Connections are told to stop by `stopping`; each holds a `running`
    // sender, so the receiver sees the channel close once all are done.
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let (running, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors or a connection reset before it
                // was accepted: neither stops the server.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connection_closed(ConnectionClosed::OverCap);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let held = (permit, metrics.connection_opened());
        let activity = Arc::new(Activity::new());
        let metrics = metrics.clone();
        let (mut stop, running) = (stop.clone(), running.clone());
        let router = router.clone();
        tokio::spawn(async move {
            let first = tokio::select! {
                biased;
                first = first_request(&stream) => first,
                reason = activity.expiry(limits) => {
                    metrics.connection_closed(reason);
                    return;
                }
                _ = stop.wait_for(|stop| *stop) => return,
            };
            if let FirstRequest::EventStream { head, body } = first {
                event_stream(stream, peer, head, body, router, limits).await;
                drop((held, running));
                return;
            }
            let (receiving, sending) = stream.into_split();
            let outbox = Outbox::new(sending);
            let io = TokioIo::new(Tracked {
                receiving,
                outbox: outbox.clone(),
                activity: activity.clone(),
                _held: held,
            });
            serve_with_hyper(io, peer, outbox, router, activity, limits, metrics, stop).await;
            drop(running);
        });
    }
    drop(listener);
    stopping.send_replace(true);
    drop(running);
    if tokio::time::timeout(timeout, all_done.recv())
        .await
        .is_err()
    {
        let open = limits
            .max_connections
            .saturating_sub(permits.available_permits());
        tracing::warn!(
            open,
            timeout_secs = timeout.as_secs_f64(),
            "leaving: connections still busy after the shutdown timeout are cut"
        );
    }
}

/// Serves one connection with hyper until it closes, breaks a limit, or
/// (on shutdown) has finished what is in flight.
#[allow(clippy::too_many_arguments)]
async fn serve_with_hyper(
    io: TokioIo<Tracked>,
    peer: std::net::SocketAddr,
    outbox: Arc<Outbox>,
    router: Router,
    activity: Arc<Activity>,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn({
        let router = router.clone();
        let activity = activity.clone();
        move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(peer));
            // For a WebSocket upgrade: the socket its frames are written to.
            request.extensions_mut().insert(outbox.clone());
            let mut router = router.clone();
            let busy = activity.request_started();
            async move {
                let response = router.call(request.map(Body::new)).await?;
                // In flight until the body is sent (or dropped): an SSE
                // stream is never idle.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &busy;
                        frame
                    }))
                }))
            }
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(io, service)
        .with_upgrades();
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        biased;
        _ = connection.as_mut() => return,
        reason = activity.expiry(limits) => {
            metrics.connection_closed(reason);
            return;
        }
        _ = stop.wait_for(|stop| *stop) => {}
    }
    // Shutting down: what is in flight finishes, then it closes.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Most of a first request looked at to tell an event stream: its head
/// and a GraphQL body are far smaller.
const FIRST_REQUEST_BYTES: usize = 4096;

/// Largest body of an event-stream request served outside hyper; a larger
/// one goes to hyper, whose body limit then answers it.
const EVENT_STREAM_BODY_BYTES: usize = 64 * 1024;

/// What a connection's first request is, from its first bytes, left
/// unread in the socket.
enum FirstRequest {
    /// `POST /graphql` over HTTP/1.1 asking for `text/event-stream`, its
    /// head and body lengths known: served here.
    EventStream { head: usize, body: usize },
    /// Anything else, or a head not yet whole: hyper's.
    Other,
}

/// Looks at the first bytes the client sends, without taking them.
async fn first_request(stream: &TcpStream) -> FirstRequest {
    if stream.readable().await.is_err() {
        return FirstRequest::Other;
    }
    let mut peeked = vec![0_u8; FIRST_REQUEST_BYTES];
    let Ok(length) = stream.peek(&mut peeked).await else {
        return FirstRequest::Other;
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = request.parse(&peeked[..length]) else {
        return FirstRequest::Other;
    };
    let path = request.path.unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    if request.method != Some("POST") || path != "/graphql" || request.version != Some(1) {
        return FirstRequest::Other;
    }
    let headers: &[httparse::Header<'_>] = request.headers;
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
    };
    let event_stream = accepts_event_stream(named("accept"));
    // A chunked body, a client waiting for 100-continue, or an odd length
    // are left to hyper, which knows them all.
    if !event_stream
        || named("transfer-encoding").next().is_some()
        || named("expect").next().is_some()
    {
        return FirstRequest::Other;
    }
    let mut lengths = named("content-length");
    let body = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(value), None) => match std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse().ok())
        {
            Some(length) if length <= EVENT_STREAM_BODY_BYTES => length,
            _ => return FirstRequest::Other,
        },
        (Some(_), Some(_)) => return FirstRequest::Other,
    };
    FirstRequest::EventStream { head, body }
}

/// Serves a connection's one event-stream request: reads it, runs it
/// through the router (every layer, as hyper's requests are), and writes
/// the answer, a stream in chunks, then closes the connection. Stops as
/// soon as the client goes away.
async fn event_stream(
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    head: usize,
    body: usize,
    mut router: Router,
    limits: ConnectionLimits,
) {
    let mut raw = vec![0_u8; head + body];
    let read = tokio::time::timeout(limits.header_read_timeout, stream.read_exact(&mut raw)).await;
    if !matches!(read, Ok(Ok(_))) {
        return;
    }
    let Some(mut request) = parsed(&raw[..head]) else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            )
            .await;
        return;
    };
    *request.body_mut() = Body::from(raw.split_off(head));
    drop(raw);
    request.extensions_mut().insert(ClientAddr(peer));
    let (mut reader, sending) = stream.into_split();
    let outbox = Outbox::new(sending);
    // Every write whole from the start: the renderer may write the
    // stream's events itself.
    outbox.share();
    request
        .extensions_mut()
        .insert(StreamOutbox(outbox.clone()));
    let Ok(response) = router.call(request).await;
    let (parts, body) = response.into_parts();
    let exact = axum::body::HttpBody::size_hint(&body).exact();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in &parts.headers {
        if matches!(
            name.as_str(),
            "connection" | "transfer-encoding" | "content-length"
        ) {
            continue;
        }
        if let Ok(value) = value.to_str() {
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
    }
    match exact {
        Some(length) => head.push_str(&format!("content-length: {length}\r\n")),
        None => head.push_str("transfer-encoding: chunked\r\n"),
    }
    head.push_str("connection: close\r\n\r\n");
    if outbox.write(head.as_bytes()).await.is_err() {
        return;
    }
    drop(head);
    let mut body = std::pin::pin!(body);
    let mut probe = [0_u8; 64];
    let sent = async {
        loop {
            tokio::select! {
                frame = body.frame() => {
                    let data = match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) if !data.is_empty() => data,
                            _ => continue,
                        },
                        // The stream failed: cut, so the client knows it did
                        // not end well.
                        Some(Err(_)) => return,
                        None => {
                            if exact.is_none() {
                                let _ = outbox.write(b"0\r\n\r\n").await;
                            }
                            let _ = tokio::time::timeout(FINAL_FLUSH, outbox.flushed()).await;
                            return;
                        }
                    };
                    let written = if exact.is_some() {
                        outbox.write(&data).await
                    } else {
                        outbox.write(&chunk(&data)).await
                    };
                    if written.is_err() {
                        return;
                    }
                }
                // The client closed (or broke) the connection; anything it
                // sends after its request is ignored, as the connection is
                // closing.
                read = reader.read(&mut probe) => {
                    if !matches!(read, Ok(length) if length > 0) {
                        return;
                    }
                }
            }
        }
    };
    sent.await;
    outbox.close();
}

/// Longest wait for a finished stream's last bytes to leave.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// A request head as the router takes it; `None` if it is not one.
fn parsed(head: &[u8]) -> Option<axum::http::Request<Body>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    parsed.parse(head).ok()?;
    let mut request = axum::http::Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?)
        .version(axum::http::Version::HTTP_11);
    for header in parsed.headers.iter() {
        request = request.header(header.name, header.value);
    }
    request.body(Body::empty()).ok()
}

/// The address a request's connection came from (what a rate limit
/// counts when the caller has no `sub`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// What a connection is doing, for its timeouts. Times are milliseconds
/// since the process's first connection.
struct Activity {
    in_flight: AtomicUsize,
    /// When it last had nothing in flight.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived; 0: none yet.
    head_started: AtomicU64,
    /// Wakes the expiry check when a head starts (its deadline is nearer).
    head_arrived: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now()),
            head_started: AtomicU64::new(0),
            head_arrived: tokio::sync::Notify::new(),
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self
                .head_started
                .compare_exchange(0, now().max(1), Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        {
            self.head_arrived.notify_one();
        }
    }

    /// Resolves when the connection has broken a limit, with which.
    async fn expiry(&self, limits: ConnectionLimits) -> ConnectionClosed {
        loop {
            let deadline = if self.in_flight.load(Ordering::SeqCst) > 0 {
                // A request runs: check again once a head could be late.
                (now() + millis(limits.header_read_timeout), None)
            } else {
                match self.head_started.load(Ordering::SeqCst) {
                    0 => (
                        self.idle_since.load(Ordering::SeqCst) + millis(limits.idle_timeout),
                        Some(ConnectionClosed::Idle),
                    ),
                    started => (
                        started + millis(limits.header_read_timeout),
                        Some(ConnectionClosed::SlowHeaders),
                    ),
                }
            };
            let (at, reason) = deadline;
            let left = at.saturating_sub(now());
            if left == 0
                && let Some(reason) = reason
            {
                return reason;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(left.max(10))) => {}
                () = self.head_arrived.notified() => {}
            }
        }
    }
}

/// A request in flight on a connection, until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.idle_since.store(now(), Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2)
}

fn now() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    millis(START.get_or_init(Instant::now).elapsed())
}

/// The connection's socket, which notes arriving bytes and holds the
/// connection's place under the cap (and in the metrics) for as long as it
/// lives: an upgraded WebSocket keeps it too.
struct Tracked {
    receiving: OwnedReadHalf,
    outbox: Arc<Outbox>,
    activity: Arc<Activity>,
    _held: (OwnedSemaphorePermit, ConnectionGuard),
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.outbox.close();
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.receiving).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.outbox.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.outbox.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.outbox.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.outbox.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

/// Raises this process's soft limit on open files to its hard limit, and
/// returns the limit now in force.
pub fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let mut raised = limit;
    raised.current = limit.maximum;
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum.unwrap_or(u64::MAX),
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-file limit");
            limit.current.unwrap_or(u64::MAX)
        }
    }
}
