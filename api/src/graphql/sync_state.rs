//! `SyncState`: one resource's row, with the fields dashboards derive.

use async_graphql::Object;
use chrono::{DateTime, Duration, Utc};
use entity::SyncStatus as Status;
use entity::vantage_sync_state::Model;

use super::types::{SyncError, SyncHealth, SyncStatus};

/// A sync running longer than this is stuck (RED).
pub const STUCK_AFTER: Duration = Duration::minutes(30);
/// No success for longer than this is stale (YELLOW).
pub const STALE_AFTER: Duration = Duration::hours(24);

/// The sync state of one resource, as of the request's clock.
pub struct SyncState {
    row: Model,
    now: DateTime<Utc>,
}

impl SyncState {
    /// `row` seen at `now`.
    pub fn new(row: Model, now: DateTime<Utc>) -> Self {
        Self { row, now }
    }

    /// The underlying row.
    pub fn row(&self) -> &Model {
        &self.row
    }

    /// The dashboard rule of the seed documentation.
    pub fn health(&self) -> SyncHealth {
        health(&self.row, self.now)
    }
}

/// RED: failed, or running for more than 30 minutes. YELLOW: never run, or
/// no success in the last 24 hours. GREEN otherwise.
pub fn health(row: &Model, now: DateTime<Utc>) -> SyncHealth {
    let stuck = row.last_sync_status == Status::Running
        && row
            .started_at
            .is_some_and(|started| now - started.with_timezone(&Utc) > STUCK_AFTER);
    if row.last_sync_status == Status::Failed || stuck {
        return SyncHealth::Red;
    }
    let fresh = row
        .last_sync_time
        .is_some_and(|at| now - at.with_timezone(&Utc) <= STALE_AFTER);
    if row.last_sync_status == Status::NeverRun || !fresh {
        SyncHealth::Yellow
    } else {
        SyncHealth::Green
    }
}

fn utc(at: Option<DateTime<chrono::FixedOffset>>) -> Option<DateTime<Utc>> {
    at.map(|at| at.with_timezone(&Utc))
}

/// The sync state of one resource.
#[Object]
impl SyncState {
    /// Resource name in lower snake case (accounts, funds, ...).
    async fn resource(&self) -> &str {
        &self.row.resource
    }

    /// Watermark for incremental syncs: completion time of the last successful sync.
    async fn last_sync_time(&self) -> Option<DateTime<Utc>> {
        utc(self.row.last_sync_time)
    }

    /// Status of the last sync.
    async fn last_sync_status(&self) -> SyncStatus {
        self.row.last_sync_status.into()
    }

    /// Records processed by the last successful sync (created + updated + skipped).
    async fn records_synced(&self) -> i32 {
        self.row.records_synced
    }

    /// Records created by the last successful sync.
    async fn records_created(&self) -> i32 {
        self.row.records_created
    }

    /// Records updated by the last successful sync.
    async fn records_updated(&self) -> i32 {
        self.row.records_updated
    }

    /// Errors of the last failed sync; empty after a success.
    async fn errors(&self) -> Vec<SyncError> {
        self.row.errors.0.iter().cloned().map(SyncError).collect()
    }

    /// When the current or last sync started.
    async fn started_at(&self) -> Option<DateTime<Utc>> {
        utc(self.row.started_at)
    }

    /// When the last sync finished; null while running.
    async fn completed_at(&self) -> Option<DateTime<Utc>> {
        utc(self.row.completed_at)
    }

    /// Duration of the last finished sync in milliseconds.
    async fn duration_ms(&self) -> Option<i32> {
        self.row.duration_ms
    }

    /// When the resource was registered.
    async fn created_at(&self) -> DateTime<Utc> {
        self.row.created_at.with_timezone(&Utc)
    }

    /// When the row last changed.
    async fn updated_at(&self) -> DateTime<Utc> {
        self.row.updated_at.with_timezone(&Utc)
    }

    /// Number of errors of the last failed sync.
    async fn error_count(&self) -> i32 {
        i32::try_from(self.row.errors.0.len()).unwrap_or(i32::MAX)
    }

    /// Seconds the current sync has been running; null unless running.
    async fn running_seconds(&self) -> Option<i32> {
        if self.row.last_sync_status != Status::Running {
            return None;
        }
        let started = self.row.started_at?.with_timezone(&Utc);
        i32::try_from((self.now - started).num_seconds().max(0)).ok()
    }

    /// Hours since the last successful sync; null if there was none.
    async fn hours_since_sync(&self) -> Option<f64> {
        let at = self.row.last_sync_time?.with_timezone(&Utc);
        Some((self.now - at).num_milliseconds() as f64 / 3_600_000.0)
    }

    /// Duration of the last finished sync in seconds.
    async fn duration_seconds(&self) -> Option<f64> {
        self.row.duration_ms.map(|ms| f64::from(ms) / 1000.0)
    }

    /// Throughput of the last sync, when it succeeded and took measurable time.
    async fn records_per_second(&self) -> Option<f64> {
        let ms = self.row.duration_ms.filter(|ms| *ms > 0)?;
        (self.row.last_sync_status == Status::Success)
            .then(|| f64::from(self.row.records_synced) * 1000.0 / f64::from(ms))
    }

    /// Failed completions since the last success, from the event log (the
    /// "failed 3+ times in a row" alert). Counts only events still in the
    /// log (see event retention).
    async fn consecutive_failures(
        &self,
        ctx: &async_graphql::Context<'_>,
    ) -> async_graphql::Result<i32> {
        // Boxed: async-graphql sizes every field's future of this type by
        // the largest, and this one holds database reads.
        let counts = Box::pin(async {
            Ok::<_, async_graphql::Error>(match ctx.data_opt::<super::RequestContext>() {
                Some(request) => request.failures().await?.get(&self.row.resource).copied(),
                // Inside a subscription: read as the subscriber.
                None => {
                    let caller = ctx.data::<crate::auth::Caller>()?;
                    let feed = ctx.data::<std::sync::Arc<crate::feed::Feed>>()?;
                    let db = crate::db::RequestDb::new(
                        feed.pool().clone(),
                        caller,
                        true,
                        std::time::Duration::from_secs(30),
                    );
                    let counts = {
                        let txn = db.txn().await?;
                        crate::db::events::consecutive_failures(&*txn)
                            .await
                            .map_err(|error| crate::error::ApiError::from_db(error, ""))?
                    };
                    db.commit().await?;
                    counts.get(&self.row.resource).copied()
                }
            })
        })
        .await?;
        Ok(counts.unwrap_or(0))
    }

    /// Dashboard traffic light: RED failed or stuck over 30 min, YELLOW never
    /// run or no success in 24 h, GREEN otherwise.
    #[graphql(name = "health")]
    async fn health_field(&self) -> SyncHealth {
        self.health()
    }
}
