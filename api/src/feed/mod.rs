//! The live feed: one LISTEN connection per process, fanning the event log
//! out to every subscriber of this process.
//!
//! On each notification (and on a timer, and after every reconnect) the
//! listener reads the log forward from its position and broadcasts each
//! event once. Notifications only say "look"; the log is
//! the truth, so a notification lost while disconnected costs nothing: the
//! reconnect reads what was missed. The broadcast channel is bounded; a
//! subscriber that falls behind reads the log itself from its cursor.

pub mod cursor;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use entity::vantage_sync_event::Model as EventRow;
use entity::vantage_sync_state::Model as StateRow;
use sea_orm::DatabaseConnection;
use sea_orm::sqlx::postgres::PgListener;
use tokio::sync::{broadcast, watch};

use crate::auth::{Caller, Role};
use crate::db::{RequestDb, events};
use crate::metrics::Metrics;

/// Channel the state table's trigger notifies.
pub const CHANNEL: &str = "vantage_sync_state_changes";
/// Events kept for subscribers that are momentarily behind.
const BROADCAST_CAPACITY: usize = 1024;
/// Events read per query while catching up.
pub const BATCH: u64 = 500;
/// Read the log this often even without notifications.
const SAFETY_NET: Duration = Duration::from_secs(1);

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
    pool: DatabaseConnection,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("position", &self.position.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Feed {
    /// Starts the listener task for the database at `database_url`.
    pub fn start(
        database_url: String,
        pool: DatabaseConnection,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (sender, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (live, _) = watch::channel(false);
        let feed = Arc::new(Self {
            sender,
            live,
            position: AtomicI64::new(-1),
            pool,
            metrics,
        });
        tokio::spawn(listen(Arc::downgrade(&feed), database_url));
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

    /// Waits until the listener is live, at most `timeout`.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let mut live = self.live.subscribe();
        tokio::time::timeout(timeout, live.wait_for(|live| *live))
            .await
            .is_ok_and(|result| result.is_ok())
    }

    /// The pool subscribers read the log with.
    pub fn pool(&self) -> &DatabaseConnection {
        &self.pool
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A shared handle on the metrics registry.
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Reads and broadcasts every event after the position.
    async fn catch_up(&self) -> Result<(), String> {
        let reader = Caller::for_role(Role::Authenticated);
        loop {
            let after = self.position.load(Ordering::Acquire);
            let db = RequestDb::new(self.pool.clone(), &reader, true, Duration::from_secs(30));
            let batch = {
                let txn = db.txn().await.map_err(|error| error.message())?;
                if after < 0 {
                    // First connection: live subscribers start from now.
                    let head = events::newest(&*txn)
                        .await
                        .map_err(|error| error.to_string())?;
                    self.position.store(head, Ordering::Release);
                    continue;
                }
                events::read_after(&*txn, after, BATCH, None)
                    .await
                    .map_err(|error| error.to_string())?
            };
            drop(db);
            let full = batch.len() as u64 == BATCH;
            for event in batch {
                let id = event.id;
                // No receivers is fine: nobody is subscribed right now.
                let _ = self.sender.send(Arc::new(FeedEvent::new(event)));
                self.position.store(id, Ordering::Release);
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// The listener task: connect, LISTEN, catch up, then follow; on any error
/// mark the feed not live, back off and start again. Ends when the feed is
/// dropped.
async fn listen(feed: std::sync::Weak<Feed>, database_url: String) {
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
        let result = follow(&current, &database_url).await;
        current.live.send_replace(false);
        match result {
            Ok(()) => return,
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
async fn follow(feed: &Arc<Feed>, database_url: &str) -> Result<(), String> {
    let mut listener = PgListener::connect(database_url)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    listener
        .listen(CHANNEL)
        .await
        .map_err(|error| format!("listen: {error}"))?;
    // Listening first, then reading: nothing committed in between is lost.
    feed.catch_up().await?;
    feed.live.send_replace(true);
    tracing::info!(position = feed.position(), "live feed listening");
    let mut safety_net = tokio::time::interval(SAFETY_NET);
    loop {
        tokio::select! {
            notification = listener.try_recv() => {
                match notification {
                    Ok(Some(_)) => {
                        // Drain what else is buffered: one read serves them all.
                        while listener.next_buffered().is_some() {}
                    }
                    Ok(None) => return Err("connection lost".into()),
                    Err(error) => return Err(format!("receive: {error}")),
                }
            }
            _ = safety_net.tick() => {}
        }
        // This task holds the last handle once the server is gone.
        if Arc::strong_count(feed) == 1 {
            return Ok(());
        }
        feed.catch_up().await?;
    }
}
