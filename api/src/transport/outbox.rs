//! A connection's socket, written by more than one writer: the
//! connection's own task (through hyper and tungstenite, or the listener
//! writing an event stream) and, once the connection is a WebSocket or
//! an event stream of its own, the live groups' renderer, which writes a
//! member's frame straight to the socket instead of waking the member's
//! task for every change (`docs/adr/0011`).
//!
//! Two writers on one stream must never interleave within a message. Once
//! shared, every write is whole: what the socket does not take at once is
//! queued, in order, and a flusher task writes the queue out as the socket
//! drains; the renderer writes only while nothing is queued, and otherwise
//! leaves the change to the member's task. Until shared, writes go
//! straight to the socket as they always did.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::prefetch::prefetch;

/// Largest message buffer a thread keeps between offers.
const MESSAGE_KEPT: usize = 64 * 1024;

thread_local! {
    /// The message being offered, built afresh for each member.
    static MESSAGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Queued bytes past which the connection's own writes wait for the
/// flusher: a peer that stops reading holds at most this much (and one
/// message more) in the server.
const QUEUE_LIMIT: usize = 64 * 1024;

/// A connection's socket (its sending side) and what waits to be written
/// to it.
#[derive(Debug)]
pub struct Outbox {
    sending: OwnedWriteHalf,
    shared: AtomicBool,
    queue: Mutex<Queue>,
    /// Told when the connection's own side is gone: a flusher waiting on a
    /// peer that never reads then lets the socket close.
    closed: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    bytes: Vec<u8>,
    flushing: bool,
    /// The connection's task, waiting for the queue to drain.
    waiting: Option<Waker>,
    /// Set once a write failed: every later write fails too.
    broken: Option<io::ErrorKind>,
}

impl Outbox {
    /// The outbox of a connection's sending side, not yet shared.
    pub fn new(sending: OwnedWriteHalf) -> Arc<Self> {
        Arc::new(Self {
            sending,
            shared: AtomicBool::new(false),
            queue: Mutex::new(Queue::default()),
            closed: Notify::new(),
        })
    }

    /// Asks for the socket an [`offer`](Self::offer) writes to, ahead of
    /// it.
    pub fn prefetch_socket(&self) {
        prefetch(self.stream());
    }

    fn stream(&self) -> &TcpStream {
        self.sending.as_ref()
    }

    /// From now on, other writers may [`offer`](Self::offer) whole
    /// messages: the connection's own writes become whole too.
    pub fn share(&self) {
        self.shared.store(true, Ordering::Release);
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every change to the queue is complete before the lock is let go.
        self.queue
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Builds a message with `build` (in a buffer this thread keeps) and
    /// writes it whole if nothing waits before it: at once, or what the
    /// socket does not take now by the flusher, in order. `false` when
    /// nothing was written: earlier bytes still wait, the socket is full,
    /// or it is broken.
    pub fn offer_with(self: &Arc<Self>, build: impl FnOnce(&mut Vec<u8>)) -> bool {
        MESSAGE.with_borrow_mut(|message| {
            message.clear();
            build(message);
            let offered = self.offer(message);
            if message.capacity() > MESSAGE_KEPT {
                *message = Vec::new();
            }
            offered
        })
    }

    /// Writes `message` whole if nothing waits before it, as
    /// [`offer_with`](Self::offer_with) does with the message it builds.
    pub fn offer(self: &Arc<Self>, message: &[u8]) -> bool {
        let mut queue = self.queue();
        if !queue.bytes.is_empty() || queue.broken.is_some() {
            return false;
        }
        // One buffer, one `send`: the kernel takes it for less than a
        // `writev` of its parts. Sent past tokio's readiness, which a
        // full socket leaves set: the flusher, or the connection's own
        // next write, then finds the socket full once and waits.
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        match rustix::net::send(self.stream(), message, flags) {
            Ok(written) if written == message.len() => true,
            Ok(written) => {
                queue.bytes.extend_from_slice(&message[written..]);
                self.start_flushing(&mut queue);
                true
            }
            Err(_) => false,
        }
    }

    /// The connection's own write: all of `buf` or nothing, as
    /// `AsyncWrite::poll_write` says.
    pub fn poll_write(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.shared.load(Ordering::Acquire) {
            return self.poll_write_alone(cx, |stream| stream.try_write(buf));
        }
        let mut queue = self.queue();
        if let Some(kind) = queue.broken {
            return Poll::Ready(Err(kind.into()));
        }
        if queue.bytes.is_empty() {
            match self.stream().try_write(buf) {
                Ok(written) if written == buf.len() => return Poll::Ready(Ok(written)),
                Ok(written) => queue.bytes.extend_from_slice(&buf[written..]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    queue.bytes.extend_from_slice(buf);
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
            self.start_flushing(&mut queue);
            return Poll::Ready(Ok(buf.len()));
        }
        if queue.bytes.len() >= QUEUE_LIMIT {
            queue.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        queue.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    /// The connection's own write of several buffers, as
    /// `AsyncWrite::poll_write_vectored` says: once shared, all or nothing.
    pub fn poll_write_vectored(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.shared.load(Ordering::Acquire) {
            // Rare once shared (hyper is done with the connection): one
            // buffer, whole.
            let whole: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            return self.poll_write(cx, &whole);
        }
        self.poll_write_alone(cx, |stream| stream.try_write_vectored(bufs))
    }

    /// A write before the socket is shared: `write` as soon as the socket
    /// takes it, as an unshared `TcpStream` would.
    fn poll_write_alone(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.stream().poll_write_ready(cx))?;
            match write(self.stream()) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }

    /// Ready once nothing queued is left.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shared.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let mut queue = self.queue();
        if let Some(kind) = queue.broken {
            return Poll::Ready(Err(kind.into()));
        }
        if queue.bytes.is_empty() {
            return Poll::Ready(Ok(()));
        }
        queue.waiting = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Flushes, then closes the sending side.
    pub fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_flush(cx))?;
        Poll::Ready(
            rustix::net::shutdown(self.stream(), rustix::net::Shutdown::Write)
                .map_err(io::Error::from),
        )
    }

    /// Writes `bytes` whole (queued behind what waits), as the
    /// connection's own write.
    pub async fn write(self: &Arc<Self>, bytes: &[u8]) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write(cx, bytes))
            .await
            .map(drop)
    }

    /// Waits until nothing queued is left.
    pub async fn flushed(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// The connection's own side is gone: no flusher keeps the socket.
    pub fn close(&self) {
        self.closed.notify_one();
    }

    fn start_flushing(self: &Arc<Self>, queue: &mut Queue) {
        if !queue.flushing {
            queue.flushing = true;
            tokio::spawn(self.clone().flush());
        }
    }

    /// Writes the queue out as the socket drains, then wakes a writer
    /// waiting for it.
    async fn flush(self: Arc<Self>) {
        loop {
            let writable = tokio::select! {
                writable = self.stream().writable() => writable,
                () = self.closed.notified() => Err(io::ErrorKind::BrokenPipe.into()),
            };
            let mut queue = self.queue();
            let outcome = match writable {
                Ok(()) => loop {
                    match self.stream().try_write(&queue.bytes) {
                        Ok(written) => {
                            queue.bytes.drain(..written);
                            if queue.bytes.is_empty() {
                                break Ok(true);
                            }
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            break Ok(false);
                        }
                        Err(error) => break Err(error.kind()),
                    }
                },
                Err(error) => Err(error.kind()),
            };
            let done = match outcome {
                Ok(drained) => drained,
                Err(kind) => {
                    queue.broken = Some(kind);
                    queue.bytes = Vec::new();
                    true
                }
            };
            if done {
                queue.flushing = false;
                if queue.bytes.capacity() > QUEUE_LIMIT {
                    queue.bytes = Vec::new();
                }
                if let Some(waiting) = queue.waiting.take() {
                    waiting.wake();
                }
                return;
            }
        }
    }
}

/// The outbox of a connection that carries one event stream and nothing
/// else, written by the listener: the renderer may write its events too.
#[derive(Debug, Clone)]
pub struct StreamOutbox(pub Arc<Outbox>);
