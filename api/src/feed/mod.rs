//! The live feed: one LISTEN connection per process, fanning the event log
//! out to every subscriber of this process.
//!
//! On each notification (and on a timer, and after every reconnect) the
//! listener reads the log forward from its position and broadcasts each
//! event once. Notifications only say "look"; the log is
//! the truth, so a notification lost while disconnected costs nothing: the
//! reconnect reads what was missed, and the timer (`FEED_POLL_SECS`) bounds
//! the delay of one that never arrives, e.g. a LISTEN made through a
//! transaction-mode pooler, which receives nothing. The broadcast channel is
//! bounded; a subscriber that falls behind reads the log itself from its
//! cursor.

pub mod cursor;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use entity::vantage_sync_event::Model as EventRow;
use entity::vantage_sync_state::Model as StateRow;
use sea_orm::sqlx;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{broadcast, watch};

use crate::db::{Access, Identity, Pool, RequestTxn, Role, events};
use crate::metrics::Metrics;

/// Channel the state table's trigger notifies.
pub const CHANNEL: &str = "vantage_sync_state_changes";
/// Longest time between two reads of the event log that no notification
/// asked for (`--feed-poll-secs`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Events kept for subscribers that are momentarily behind.
const BROADCAST_CAPACITY: usize = 1024;
/// Events read per query while catching up.
pub const BATCH: u64 = 500;
/// Longest a new subscription or `connection_init` waits for the feed to
/// be live before it is refused.
pub const LIVE_WAIT: Duration = Duration::from_secs(10);

/// One event of the log, decoded once for every subscriber.
#[derive(Debug)]
pub struct FeedEvent {
    /// The log row.
    pub event: EventRow,
    /// The row as the change left it; `None` on DELETE.
    pub state: Option<StateRow>,
}

impl FeedEvent {
    /// Decodes a log row.
    pub fn new(event: EventRow) -> Self {
        let state = (event.operation != "DELETE")
            .then(|| serde_json::from_value(event.state.clone()).ok())
            .flatten();
        Self { event, state }
    }
}

/// Handle on the process's feed.
pub struct Feed {
    sender: broadcast::Sender<Arc<FeedEvent>>,
    live: watch::Sender<bool>,
    position: AtomicI64,
    pool: Pool,
    metrics: Arc<Metrics>,
    read_timeout: Duration,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("position", &self.position.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Feed {
    /// Starts the listener task: it LISTENs on a session connection to
    /// `listen_url` (if any: `None` only polls) and reads the log through
    /// `pool`, at least every `poll_interval`; its reads, and those of
    /// subscriptions, may take `read_timeout`.
    pub fn start(
        listen_url: Option<String>,
        pool: Pool,
        metrics: Arc<Metrics>,
        poll_interval: Duration,
        read_timeout: Duration,
    ) -> Arc<Self> {
        let (sender, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (live, _) = watch::channel(false);
        let feed = Arc::new(Self {
            sender,
            live,
            position: AtomicI64::new(-1),
            pool,
            metrics,
            read_timeout,
        });
        tokio::spawn(listen(Arc::downgrade(&feed), listen_url, poll_interval));
        feed
    }

    /// A receiver of every event broadcast from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<FeedEvent>> {
        self.sender.subscribe()
    }

    /// The last event id broadcast (everything up to it has been sent).
    pub fn position(&self) -> i64 {
        self.position.load(Ordering::Acquire).max(0)
    }

    /// Whether the listener is connected and caught up.
    pub fn is_live(&self) -> bool {
        *self.live.borrow()
    }

    /// Watches whether the listener is live (false while it reconnects).
    pub fn liveness(&self) -> watch::Receiver<bool> {
        self.live.subscribe()
    }

    /// Waits until the listener is live, at most `timeout`.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let mut live = self.live.subscribe();
        tokio::time::timeout(timeout, live.wait_for(|live| *live))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// The pool subscribers read the log with.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Longest a read of the log (the feed's, a subscription's) may take.
    pub fn read_timeout(&self) -> Duration {
        self.read_timeout
    }

    /// Runs `work` in a read-only transaction as `identity` (see
    /// [`Pool::run`]), within the read timeout.
    pub async fn read<T>(
        &self,
        identity: &Identity,
        access: Access,
        work: impl AsyncFnOnce(&RequestTxn) -> Result<T, sea_orm::DbErr>,
    ) -> crate::error::ApiResult<T> {
        self.pool
            .run(identity, access, self.read_timeout, work)
            .await
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A shared handle on the metrics registry.
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Reads and broadcasts every event after the position; the ids it
    /// broadcast, oldest first.
    async fn catch_up(&self) -> Result<Vec<i64>, String> {
        let reader = Identity::of_role(Role::Authenticated);
        let mut sent = Vec::new();
        loop {
            let after = self.position.load(Ordering::Acquire);
            if after < 0 {
                // First connection: live subscribers start from now.
                let head = self
                    .read(&reader, Access::Read, async |txn| events::newest(txn).await)
                    .await
                    .map_err(|error| format!("{error:?}"))?;
                self.position.store(head, Ordering::Release);
                continue;
            }
            let batch = self
                .read(&reader, Access::Read, async |txn| {
                    events::read_after(txn, after, BATCH, None).await
                })
                .await
                .map_err(|error| format!("{error:?}"))?;
            let full = batch.len() as u64 == BATCH;
            for event in batch {
                let id = event.id;
                // No receivers is fine: nobody is subscribed right now.
                let _ = self.sender.send(Arc::new(FeedEvent::new(event)));
                self.position.store(id, Ordering::Release);
                sent.push(id);
            }
            if !full {
                return Ok(sent);
            }
        }
    }
}

/// The listener task: connect, LISTEN, catch up, then follow; on any error
/// mark the feed not live, back off and start again. Ends when the feed is
/// dropped.
async fn listen(feed: std::sync::Weak<Feed>, listen_url: Option<String>, poll_interval: Duration) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let Some(current) = feed.upgrade() else {
            return;
        };
        if !first {
            current.metrics.listener_reconnected();
        }
        first = false;
        let result = follow(&current, listen_url.as_deref(), poll_interval).await;
        // A connection that went live earns a quick first retry again: the
        // back-off grows only while reconnecting keeps failing.
        if current.live.send_replace(false) {
            backoff = Duration::from_millis(100);
        }
        match result {
            Ok(()) => return,
            // This task holds the last handle: the server has stopped, and
            // its database going away after it (a managed one is stopped
            // with it) is no failure to report.
            Err(error) if Arc::strong_count(&current) == 1 => {
                tracing::debug!(%error, "live feed listener ended with the server");
                return;
            }
            Err(error) => tracing::warn!(%error, ?backoff, "live feed listener lost; reconnecting"),
        }
        drop(current);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if feed.strong_count() == 0 {
            return;
        }
    }
}

/// One connection's life. `Ok` when the feed is gone, `Err` on failure.
async fn follow(
    feed: &Arc<Feed>,
    listen_url: Option<&str>,
    poll_interval: Duration,
) -> Result<(), String> {
    let mut listener = match listen_url {
        Some(url) => Some(listening(url).await?),
        None => None,
    };
    // Listening first, then reading: nothing committed in between is lost.
    feed.catch_up().await?;
    feed.live.send_replace(true);
    tracing::info!(
        position = feed.position(),
        listening = listener.is_some(),
        "live feed started"
    );
    let mut poll = tokio::time::interval(poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut ledger = NotificationLedger::default();
    loop {
        let polled = match listener.as_mut() {
            Some(listener) => {
                tokio::select! {
                    notification = listener.try_recv() => {
                        match notification {
                            Ok(Some(notification)) => {
                                ledger.heard(notification.payload());
                                // Drain what else is buffered: one read serves them all.
                                while let Some(notification) = listener.next_buffered() {
                                    ledger.heard(notification.payload());
                                }
                            }
                            Ok(None) => return Err("connection lost".into()),
                            Err(error) => return Err(format!("receive: {error}")),
                        }
                        false
                    }
                    _ = poll.tick() => true,
                }
            }
            None => {
                poll.tick().await;
                true
            }
        };
        // This task holds the last handle once the server is gone.
        if Arc::strong_count(feed) == 1 {
            return Ok(());
        }
        let sent = feed.catch_up().await?;
        if polled {
            let unannounced = ledger.polled(sent);
            if unannounced > 0 {
                feed.metrics.unannounced_events(unannounced);
                if ledger.time_to_warn() {
                    tracing::warn!(
                        events = unannounced,
                        "the live feed found changes that no notification announced, so \
                         subscribers got them only by polling (FEED_POLL_SECS): point \
                         LISTEN_DATABASE_URL at a direct or session-mode connection (LISTEN \
                         through a transaction-mode pooler receives nothing)"
                    );
                }
            }
        }
    }
}

/// Whether a LISTEN on `listen_url` is accepted (what `vantage-sync check`
/// asks): a session connects and listens on the feed's channel.
pub async fn can_listen(listen_url: &str) -> Result<(), String> {
    listening(listen_url)
        .await?
        .unlisten_all()
        .await
        .map_err(|error| format!("unlisten: {error}"))
}

/// A session to `listen_url` that LISTENs on the feed's channel.
async fn listening(listen_url: &str) -> Result<PgListener, String> {
    let mut listener = connect_listener(listen_url)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    listener
        .listen(CHANNEL)
        .await
        .map_err(|error| format!("listen: {error}"))?;
    Ok(listener)
}

/// A listener on its own session to `listen_url`, sending no start-up
/// parameter a pooler refuses (as the request pool does not).
async fn connect_listener(listen_url: &str) -> Result<PgListener, sqlx::Error> {
    let options: PgConnectOptions = listen_url.parse()?;
    // A pool of one, as PgListener::connect makes, only to reconnect.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options.extra_float_digits(None))
        .await?;
    PgListener::connect_with(&pool).await
}

/// Which broadcast events a notification announced. Notifications carry
/// their event's id and arrive in commit order, shortly after the commit;
/// an event the timer had to find is judged one poll later, once its
/// notification has had a whole interval to arrive.
#[derive(Debug, Default)]
struct NotificationLedger {
    /// Highest event id a notification named.
    heard_through: i64,
    /// Events the last poll found, not yet judged.
    found: Vec<i64>,
    /// When the last warning about unannounced changes was logged.
    warned: Option<tokio::time::Instant>,
}

impl NotificationLedger {
    fn heard(&mut self, payload: &str) {
        let id = serde_json::from_str::<serde_json::Value>(payload)
            .ok()
            .and_then(|payload| payload.get("id")?.as_i64());
        if let Some(id) = id {
            self.heard_through = self.heard_through.max(id);
        }
    }

    /// Whether to log the warning now: at most once a minute, while the
    /// metric counts every change.
    fn time_to_warn(&mut self) -> bool {
        let due = self
            .warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        if due {
            self.warned = Some(tokio::time::Instant::now());
        }
        due
    }

    /// Records what a poll found; returns how many events of the previous
    /// poll no notification has announced since.
    fn polled(&mut self, found: Vec<i64>) -> u64 {
        let heard = self.heard_through;
        let unannounced = self.found.iter().filter(|id| **id > heard).count() as u64;
        self.found = found;
        unannounced
    }
}

#[cfg(test)]
mod tests {
    use super::NotificationLedger;

    #[test]
    fn an_event_is_unannounced_when_no_notification_named_it_within_a_poll() {
        let mut ledger = NotificationLedger::default();
        assert_eq!(ledger.polled(vec![1, 2, 3]), 0);
        // 1 and 2 were announced late (after the poll found them): fine.
        ledger.heard(r#"{"id": 2, "operation": "UPDATE", "resource": "funds"}"#);
        assert_eq!(ledger.polled(vec![]), 1);
        ledger.heard("not json");
        assert_eq!(ledger.polled(vec![4]), 0);
        assert_eq!(ledger.polled(vec![]), 1);
    }
}
