//! `syncStateChanged`: every committed change, in per-resource commit
//! order, none skipped, resumable by cursor.

use std::collections::VecDeque;
use std::sync::Arc;

use async_graphql::futures_util::StreamExt;
use async_graphql::futures_util::stream::{self, BoxStream};
use async_graphql::{Context, Enum, Object, Subscription as SubscriptionRoot};
use chrono::{DateTime, Utc};

use super::live::{HandOff, Joined, Member, RenderOne};
use super::sync_state::SyncState;
use super::validate;
use super::{OperationContext, SseResume};
use crate::db::{Access, Identity, events};
use crate::error::{ApiError, ApiResult};
use crate::feed::cursor::Cursor;
use crate::feed::{BATCH, Feed, FeedEvent, LIVE_WAIT};
use crate::metrics::SubscriptionGuard;

/// What happened to a resource.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOperation {
    /// The resource's state when the subscription started (`initial: true`).
    Snapshot,
    /// The resource was registered.
    Insert,
    /// The resource's state changed.
    Update,
    /// The resource was removed.
    Delete,
}

impl ChangeOperation {
    /// From the log's `operation` column.
    pub fn from_log(operation: &str) -> Self {
        match operation {
            "INSERT" => Self::Insert,
            "DELETE" => Self::Delete,
            _ => Self::Update,
        }
    }
}

/// One change delivered to a subscriber.
pub struct SyncStateChange {
    operation: ChangeOperation,
    resource: String,
    state: Option<SyncState>,
    at: DateTime<Utc>,
    cursor: String,
}

impl SyncStateChange {
    /// The change `event` made, its derived fields computed at `now`.
    fn of(event: &FeedEvent, now: DateTime<Utc>) -> Self {
        Self {
            operation: ChangeOperation::from_log(&event.event.operation),
            resource: event.event.resource.clone(),
            state: event.state.clone().map(|row| SyncState::new(row, now)),
            at: event.event.occurred_at.with_timezone(&Utc),
            cursor: Cursor::at(event.event.id).encode(),
        }
    }
}

/// One change delivered to a subscriber.
#[Object]
impl SyncStateChange {
    /// SNAPSHOT, INSERT, UPDATE or DELETE.
    async fn operation(&self) -> ChangeOperation {
        self.operation
    }

    /// The resource that changed.
    async fn resource(&self) -> &str {
        &self.resource
    }

    /// The state after the change; null on DELETE.
    async fn state(&self) -> Option<&SyncState> {
        self.state.as_ref()
    }

    /// When the change was made (for SNAPSHOT: when the snapshot was taken).
    async fn at(&self) -> DateTime<Utc> {
        self.at
    }

    /// Resume point: subscribe again with `after: cursor` to receive every
    /// change after this one, with no gap and no duplicate.
    async fn cursor(&self) -> &str {
        &self.cursor
    }
}

/// Live operations; they need an `authenticated` or `service_role` token
/// (sent in `connection_init`).
pub struct Subscription;

#[SubscriptionRoot]
impl Subscription {
    /// Every committed change to the sync state of `resources` (all when
    /// omitted), whoever made it, in per-resource commit order. With
    /// `initial: true`, first one SNAPSHOT per matching resource. With
    /// `after: <cursor>`, first every change after that cursor. A cursor
    /// that is unknown or pruned is refused with CURSOR_EXPIRED.
    async fn sync_state_changed(
        &self,
        ctx: &Context<'_>,
        resources: Option<Vec<String>>,
        #[graphql(default_with = "Some(false)")] initial: Option<bool>,
        after: Option<String>,
    ) -> async_graphql::Result<BoxStream<'static, async_graphql::Result<SyncStateChange>>> {
        let operation = OperationContext::reader(ctx)?;
        if let Some(RenderOne(event)) = ctx.data_opt::<RenderOne>() {
            let change = SyncStateChange::of(event, Utc::now());
            return Ok(stream::once(std::future::ready(Ok(change))).boxed());
        }
        let identity = operation.caller.identity();
        let sse_resume = operation.sse_resume().cloned();
        // An SSE stream resuming (`Last-Event-ID`) already had its
        // snapshot: it continues after its last event, as `after` would.
        let resume_after = sse_resume
            .as_ref()
            .and_then(|ids| ids.resume_after().map(str::to_owned));
        let (initial, after) = match resume_after {
            Some(resume_after) => (false, Some(resume_after)),
            None => (initial.unwrap_or(false), after),
        };
        for resource in resources.iter().flatten() {
            validate::resource(resource)?;
        }
        if initial && after.is_some() {
            return Err(ApiError::bad_input(
                "after",
                "pass either initial: true or after, not both",
            )
            .into());
        }
        let live = operation.live()?.clone();
        let feed = live.feed().clone();
        if !feed.wait_live(LIVE_WAIT).await {
            return Err(ApiError::Unavailable.into());
        }
        let hand_off = ctx
            .data::<Arc<HandOff>>()
            .map_err(|_| ApiError::internal("a subscription without its transport"))?
            .clone();
        // Joining first, then reading: nothing falls in between.
        let joined = hand_off.join(ctx, &live, resources.clone())?;
        let mut subscriber = Subscriber {
            guard: Some(feed.metrics_handle().subscription_opened()),
            cursor: Cursor::at(joined.position),
            joined: Some(joined),
            hand_off,
            feed,
            identity: Box::new(identity),
            resources,
            sse_resume,
            pending: VecDeque::new(),
            needs_log: false,
            done: false,
        };
        // Boxed: the database reads are the largest futures by far.
        if initial {
            Box::pin(subscriber.snapshot()).await?;
        } else if let Some(after) = after {
            Box::pin(subscriber.resume(&after)).await?;
        }
        Ok(stream::unfold(subscriber, Subscriber::next).boxed())
    }
}

/// A subscription until it has caught up with its group: its snapshot or
/// the changes after its cursor, read from the log and rendered for it
/// alone. Then it hands itself over as a [`Member`] and its stream ends.
struct Subscriber {
    feed: Arc<Feed>,
    identity: Box<Identity>,
    resources: Option<Vec<String>>,
    /// An SSE stream's ids, told each change's cursor as it is sent.
    sse_resume: Option<Arc<SseResume>>,
    joined: Option<Joined>,
    hand_off: Arc<HandOff>,
    cursor: Cursor,
    pending: VecDeque<SyncStateChange>,
    /// Read the log from the cursor before handing over.
    needs_log: bool,
    done: bool,
    guard: Option<SubscriptionGuard>,
}

impl Subscriber {
    fn wants(&self, resource: &str) -> bool {
        self.resources
            .as_ref()
            .is_none_or(|resources| resources.iter().any(|wanted| wanted == resource))
    }

    /// The current rows and the log position they reflect, as SNAPSHOTs.
    async fn snapshot(&mut self) -> ApiResult<()> {
        let resources = self.resources.as_deref();
        let snapshot = self
            .feed
            .read(&self.identity, Access::Snapshot, async |txn| {
                events::state_snapshot(txn, resources).await
            })
            .await?;
        let cursor = Cursor::at(snapshot.position);
        let now = Utc::now();
        let encoded = cursor.encode();
        for row in snapshot.rows {
            self.pending.push_back(SyncStateChange {
                operation: ChangeOperation::Snapshot,
                resource: row.resource.clone(),
                state: Some(SyncState::new(row, now)),
                at: now,
                cursor: encoded.clone(),
            });
        }
        self.cursor = cursor;
        self.needs_log = true;
        Ok(())
    }

    /// Starts after a cursor the client had, if it can still be honoured.
    async fn resume(&mut self, after: &str) -> ApiResult<()> {
        let cursor = Cursor::decode(after).ok_or(ApiError::CursorExpired)?;
        let (pruned, newest) = self
            .feed
            .read(&self.identity, Access::Read, async |txn| {
                Ok((
                    events::pruned_through(txn).await?,
                    events::newest(txn).await?,
                ))
            })
            .await?;
        if cursor.position < pruned || cursor.position > newest {
            return Err(ApiError::CursorExpired);
        }
        self.cursor = cursor;
        self.needs_log = true;
        Ok(())
    }

    /// The change `event` makes for this subscriber, if it is new to it and
    /// wanted.
    fn accept(&mut self, event: &FeedEvent) -> Option<SyncStateChange> {
        let id = event.event.id;
        if id <= self.cursor.position {
            return None;
        }
        self.cursor = Cursor::at(id);
        if !self.wants(&event.event.resource) {
            return None;
        }
        let now = Utc::now();
        let change = SyncStateChange::of(event, now);
        self.feed
            .metrics()
            .event_delivered((now - change.at).num_microseconds().unwrap_or(0) as f64 / 1e6);
        Some(change)
    }

    /// Tells an SSE stream the id of the change about to be sent. The
    /// SNAPSHOTs all carry the snapshot's cursor, and only the last one
    /// gets it as its id: a stream cut during the snapshot resumes without
    /// one, so it is sent again whole.
    fn sending(&self, change: &SyncStateChange) {
        let Some(ids) = &self.sse_resume else {
            return;
        };
        let more_snapshots = self
            .pending
            .front()
            .is_some_and(|next| next.operation == ChangeOperation::Snapshot);
        if change.operation != ChangeOperation::Snapshot || !more_snapshots {
            ids.sent(&change.cursor);
        }
    }

    /// Reads one batch of the log after the cursor.
    async fn read_log(&mut self) -> ApiResult<()> {
        let after = self.cursor.position;
        let batch = self
            .feed
            .read(&self.identity, Access::Read, async |txn| {
                events::read_after(txn, after, BATCH, None).await
            })
            .await?;
        self.needs_log = batch.len() as u64 == BATCH;
        for event in batch {
            if let Some(change) = self.accept(&FeedEvent::new(event)) {
                self.pending.push_back(change);
            }
        }
        Ok(())
    }

    async fn next(mut self) -> Option<(async_graphql::Result<SyncStateChange>, Self)> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                self.sending(&change);
                if self.pending.is_empty() {
                    // Live changes skip the queue; an idle subscriber
                    // keeps no buffer from its last catch-up.
                    self.pending = VecDeque::new();
                }
                return Some((Ok(change), self));
            }
            if self.done {
                return None;
            }
            if self.needs_log {
                if let Err(error) = Box::pin(self.read_log()).await {
                    // Ends the subscription; the client resumes from its
                    // last cursor and loses nothing.
                    tracing::warn!(error = ?error, "subscription could not read the log");
                    self.done = true;
                    return Some((Err(ApiError::Unavailable.into()), self));
                }
                continue;
            }
            // Caught up: from here on the group's renderings follow.
            if let (Some(joined), Some(guard)) = (self.joined.take(), self.guard.take()) {
                self.hand_off
                    .hand_over(Member::new(joined, self.cursor.position, guard));
            }
            return None;
        }
    }
}
