//! The subscribers' sockets, read on one thread per core, each with an
//! epoll loop of its own (mio), once their subscriptions are open.
//!
//! This tool shares the machine's cores with the server it measures, so
//! whatever a delivery costs it to read is taken from the server and
//! shows in every delay. An async task per subscriber paid, on every
//! delivery, for waking the task, polling it and its readiness; a loop
//! that reads each ready socket and parses what came pays for none of
//! that. After each round of reads a reader waits a moment
//! ([`BATCH_WAIT`]) before asking for more, so that each round finds many
//! sockets ready instead of one: the reader then sleeps and wakes once
//! per round, not once per delivery, and the server's writes seldom have a
//! sleeping reader to wake. A delivery is then timed at most that moment
//! after it arrived, which can only lengthen the delays measured. Opening
//! the subscriptions, which is not timed, stays async. Measured in
//! `docs/performance.md`.

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::{sse, ws};

/// What one subscriber saw: (change number, when it arrived).
pub type Received = Vec<(u64, Instant)>;

/// An open subscription, handed to the readers.
pub struct Subscriber {
    /// Its socket.
    pub stream: std::net::TcpStream,
    /// What turns its bytes into deliveries.
    pub decoder: Decoder,
    /// What it has received.
    pub tally: Tally,
}

/// How a subscriber's bytes become `next` payloads.
pub enum Decoder {
    /// A GraphQL over SSE event stream.
    Sse(sse::Decoder),
    /// A graphql-transport-ws connection.
    WebSocket(ws::Decoder),
}

/// What one subscriber received, and its errors.
pub struct Tally {
    /// Every change received, with when.
    pub received: Received,
    /// Messages it could not read, or a connection lost.
    pub errors: u64,
    /// Subscribers that have received the last change.
    finished: Arc<AtomicU64>,
    /// The last change's number.
    last: u64,
    /// Where its shape puts the change number.
    number_field: Arc<str>,
}

impl Tally {
    /// An empty tally with room for `changes`, the last of which is
    /// numbered `changes`.
    pub fn new(changes: usize, finished: Arc<AtomicU64>, number_field: Arc<str>) -> Self {
        Self {
            // Room for every change from the start: growing ten thousand
            // of these mid-run would fault in fresh pages while the
            // changes are timed.
            received: Received::with_capacity(changes),
            errors: 0,
            finished,
            last: changes as u64,
            number_field,
        }
    }

    /// A `next` payload (its JSON text) that arrived `at`.
    pub fn next(&mut self, payload: &str, at: Instant) {
        match change_number(payload, &self.number_field) {
            Some(change) => {
                self.received.push((change, at));
                // Once per subscriber, not per delivery: a counter that
                // every delivery touched would bounce between the cores
                // and cost this tool more than reading the message.
                if change == self.last {
                    self.finished.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => self.errors += 1,
        }
    }
}

/// A subscriber as one reader holds it.
struct Follower {
    stream: mio::net::TcpStream,
    decoder: Decoder,
    tally: Tally,
    /// Whether its connection is still open.
    open: bool,
}

impl Follower {
    /// Reads what is waiting on its socket; false once the connection is
    /// over (closed, failed or unreadable).
    fn read(&mut self, buffer: &mut [u8]) -> bool {
        loop {
            let n = match self.stream.read(buffer) {
                Ok(0) => {
                    self.tally.errors += 1;
                    return false;
                }
                Ok(n) => n,
                Err(error) if error.kind() == ErrorKind::WouldBlock => return true,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.tally.errors += 1;
                    return false;
                }
            };
            let tally = &mut self.tally;
            let fed = match &mut self.decoder {
                Decoder::Sse(decoder) => decoder.feed(&buffer[..n], |event| {
                    let at = Instant::now();
                    // Every `next` event carries an id: its cursor.
                    if event.kind == "next" && event.id.is_some() {
                        tally.next(&event.data, at);
                    } else {
                        tally.errors += 1;
                    }
                }),
                Decoder::WebSocket(decoder) => {
                    let mut pings = 0;
                    let fed = decoder.feed(&buffer[..n], |text| {
                        let at = Instant::now();
                        let Ok(message) = serde_json::from_str::<ws::ServerMessage>(text) else {
                            tally.errors += 1;
                            return;
                        };
                        match (&*message.kind, message.payload) {
                            ("next", Some(payload)) => tally.next(payload.get(), at),
                            ("next", None) => tally.errors += 1,
                            ("ping", _) => pings += 1,
                            _ => {}
                        }
                    });
                    for _ in 0..pings {
                        decoder.reply(ws::PONG);
                    }
                    // Answers are a few bytes on an idle socket: its send
                    // buffer has room for them.
                    match decoder.replies() {
                        Some(replies) => fed.and_then(|()| Ok(self.stream.write_all(&replies)?)),
                        None => fed,
                    }
                }
            };
            if fed.is_err() {
                self.tally.errors += 1;
                return false;
            }
            // A short read drained the socket (epoll, edge-triggered).
            if n < buffer.len() {
                return true;
            }
        }
    }
}

/// How long a reader waits after a round of reads, so that many sockets
/// are ready at the next; see the module's comment.
const BATCH_WAIT: Duration = Duration::from_micros(200);

/// The threads reading every subscriber until stopped.
pub struct Readers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<Vec<Tally>>>>,
}

impl Readers {
    /// Starts one reader per core, each with its share of `subscribers`.
    pub fn start(subscribers: Vec<Subscriber>) -> anyhow::Result<Self> {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut shares: Vec<Vec<Subscriber>> = (0..count).map(|_| Vec::new()).collect();
        for (index, subscriber) in subscribers.into_iter().enumerate() {
            shares[index % count].push(subscriber);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let threads = shares
            .into_iter()
            .map(|share| {
                let stop = stop.clone();
                std::thread::Builder::new()
                    .name("reader".into())
                    .spawn(move || read_until_stopped(share, &stop))
                    .context("starting a reader thread")
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { stop, threads })
    }

    /// Stops the readers and returns every subscriber's tally.
    pub fn stop(self) -> anyhow::Result<Vec<Tally>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut tallies = Vec::new();
        for thread in self.threads {
            let share = thread
                .join()
                .map_err(|_| anyhow::anyhow!("a reader thread panicked"))??;
            tallies.extend(share);
        }
        Ok(tallies)
    }
}

/// One reader: its share's sockets on one epoll instance, read as they
/// become ready.
fn read_until_stopped(share: Vec<Subscriber>, stop: &AtomicBool) -> anyhow::Result<Vec<Tally>> {
    let mut poll = mio::Poll::new()?;
    let mut followers = Vec::with_capacity(share.len());
    for (index, subscriber) in share.into_iter().enumerate() {
        let mut stream = mio::net::TcpStream::from_std(subscriber.stream);
        poll.registry()
            .register(&mut stream, mio::Token(index), mio::Interest::READABLE)?;
        followers.push(Follower {
            stream,
            decoder: subscriber.decoder,
            tally: subscriber.tally,
            open: true,
        });
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut buffer = vec![0; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(20))) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        }
        for event in &events {
            let Some(follower) = followers.get_mut(event.token().0) else {
                continue;
            };
            if follower.open && !follower.read(&mut buffer) {
                follower.open = false;
                let _ = poll.registry().deregister(&mut follower.stream);
            }
        }
        if !events.is_empty() {
            std::thread::sleep(BATCH_WAIT);
        }
    }
    Ok(followers
        .into_iter()
        .map(|follower| follower.tally)
        .collect())
}

/// The change number a `next` payload (JSON text) carries: the probe's
/// `recordsSynced`, under `field` (its name or the shape's alias). Read
/// with borrowed, typed structures: a whole `Value` tree per delivery
/// would make this tool, which shares the cores with the server it
/// measures, the larger cost of a delivery.
fn change_number(payload: &str, field: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Payload<'a> {
        #[serde(borrow)]
        data: Data<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "syncStateChanged", borrow)]
        changed: Changed<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Changed<'a> {
        #[serde(borrow)]
        state: &'a serde_json::value::RawValue,
    }
    let state = serde_json::from_str::<Payload>(payload)
        .ok()?
        .data
        .changed
        .state;
    let mut reader = serde_json::Deserializer::from_str(state.get());
    serde::de::DeserializeSeed::deserialize(NumberUnder(field), &mut reader).ok()?
}

/// Reads the unsigned number under one key of a JSON object, skipping the
/// rest without building them.
struct NumberUnder<'f>(&'f str);

impl<'de> serde::de::DeserializeSeed<'de> for NumberUnder<'_> {
    type Value = Option<u64>;

    fn deserialize<D: serde::Deserializer<'de>>(self, reader: D) -> Result<Self::Value, D::Error> {
        reader.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NumberUnder<'_> {
    type Value = Option<u64>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut number = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 {
                number = map.next_value::<Option<u64>>()?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(number)
    }
}
