//! `SyncState`: one resource's row, with the fields dashboards derive.

use std::borrow::Cow;

use async_graphql::parser::types::Field;
use async_graphql::registry::Registry;
use async_graphql::resolver_utils::enum_value;
use async_graphql::{
    ContextSelectionSet, Json, Object, OutputType, Positioned, ScalarType, ServerResult, Value,
};
use chrono::{DateTime, Duration, Utc};
use entity::SyncStatus as Status;
use entity::vantage_sync_state::Model;

use super::plain::{PlainObject, Walk};
use super::types::{SyncError, SyncHealth, SyncStatus};

/// A sync running longer than this is stuck (RED).
pub const STUCK_AFTER: Duration = Duration::minutes(30);
/// No success for longer than this is stale (YELLOW).
pub const STALE_AFTER: Duration = Duration::hours(24);

/// The sync state of one resource, as of the request's clock.
///
/// Resolved in one pass when every selected field is a plain value (see
/// [`super::plain`]), else by the derived resolvers of [`SyncStateFields`],
/// which also give the schema its type.
pub struct SyncState(SyncStateFields);

/// The row and the clock its derived fields are computed against.
pub struct SyncStateFields {
    row: Model,
    now: DateTime<Utc>,
}

impl SyncState {
    /// `row` seen at `now`.
    pub fn new(row: Model, now: DateTime<Utc>) -> Self {
        Self(SyncStateFields { row, now })
    }

    /// The underlying row.
    pub fn row(&self) -> &Model {
        &self.0.row
    }

    /// The dashboard rule of the seed documentation.
    pub fn health(&self) -> SyncHealth {
        health(&self.0.row, self.0.now)
    }
}

impl OutputType for SyncState {
    fn type_name() -> Cow<'static, str> {
        SyncStateFields::type_name()
    }

    fn create_type_info(registry: &mut Registry) -> String {
        SyncStateFields::create_type_info(registry)
    }

    async fn resolve(
        &self,
        ctx: &ContextSelectionSet<'_>,
        field: &Positioned<Field>,
    ) -> ServerResult<Value> {
        let plain = Walk::new(ctx).object(&self.0, &ctx.item.node);
        match plain {
            Some(value) => Ok(value),
            None => OutputType::resolve(&self.0, ctx, field).await,
        }
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

fn error_count(row: &Model) -> i32 {
    i32::try_from(row.errors.0.len()).unwrap_or(i32::MAX)
}

fn running_seconds(row: &Model, now: DateTime<Utc>) -> Option<i32> {
    if row.last_sync_status != Status::Running {
        return None;
    }
    let started = row.started_at?.with_timezone(&Utc);
    i32::try_from((now - started).num_seconds().max(0)).ok()
}

fn hours_since_sync(row: &Model, now: DateTime<Utc>) -> Option<f64> {
    let at = row.last_sync_time?.with_timezone(&Utc);
    Some((now - at).num_milliseconds() as f64 / 3_600_000.0)
}

fn duration_seconds(row: &Model) -> Option<f64> {
    row.duration_ms.map(|ms| f64::from(ms) / 1000.0)
}

fn records_per_second(row: &Model) -> Option<f64> {
    let ms = row.duration_ms.filter(|ms| *ms > 0)?;
    (row.last_sync_status == Status::Success)
        .then(|| f64::from(row.records_synced) * 1000.0 / f64::from(ms))
}

/// A scalar or null, as async-graphql resolves `Option<T>`.
fn nullable<T: ScalarType>(value: Option<T>) -> Value {
    value.map_or(Value::Null, |value| value.to_value())
}

impl PlainObject for SyncStateFields {
    const TYPE_NAME: &'static str = "SyncState";

    fn plain_value(&self, field: &Positioned<Field>, walk: &Walk<'_>) -> Option<Value> {
        let row = &self.row;
        Some(match field.node.name.node.as_str() {
            "resource" => Value::String(row.resource.clone()),
            "lastSyncTime" => nullable(utc(row.last_sync_time)),
            "lastSyncStatus" => enum_value(row.last_sync_status),
            "recordsSynced" => row.records_synced.to_value(),
            "recordsCreated" => row.records_created.to_value(),
            "recordsUpdated" => row.records_updated.to_value(),
            "errors" => Value::List(
                row.errors
                    .0
                    .iter()
                    .map(|error| walk.object(error, &field.node.selection_set.node))
                    .collect::<Option<_>>()?,
            ),
            "startedAt" => nullable(utc(row.started_at)),
            "completedAt" => nullable(utc(row.completed_at)),
            "durationMs" => nullable(row.duration_ms),
            "createdAt" => row.created_at.with_timezone(&Utc).to_value(),
            "updatedAt" => row.updated_at.with_timezone(&Utc).to_value(),
            "errorCount" => error_count(row).to_value(),
            "runningSeconds" => nullable(running_seconds(row, self.now)),
            "hoursSinceSync" => nullable(hours_since_sync(row, self.now)),
            "durationSeconds" => nullable(duration_seconds(row)),
            "recordsPerSecond" => nullable(records_per_second(row)),
            "health" => enum_value(health(row, self.now)),
            // consecutiveFailures reads the event log.
            _ => return None,
        })
    }
}

impl PlainObject for entity::SyncError {
    const TYPE_NAME: &'static str = "SyncError";

    fn plain_value(&self, field: &Positioned<Field>, _: &Walk<'_>) -> Option<Value> {
        Some(match field.node.name.node.as_str() {
            "code" => Value::String(self.code.clone()),
            "message" => Value::String(self.message.clone()),
            "recordId" => self
                .record_id
                .as_ref()
                .map_or(Value::Null, |id| Value::String(id.clone())),
            "timestamp" => nullable(self.timestamp.map(|at| at.with_timezone(&Utc))),
            "details" => self.details.as_ref().map_or(Value::Null, |details| {
                async_graphql::to_value(Json(details)).unwrap_or_default()
            }),
            _ => return None,
        })
    }
}

/// The sync state of one resource.
#[Object(name = "SyncState")]
impl SyncStateFields {
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
        self.row.last_sync_status
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
        error_count(&self.row)
    }

    /// Seconds the current sync has been running; null unless running.
    async fn running_seconds(&self) -> Option<i32> {
        running_seconds(&self.row, self.now)
    }

    /// Hours since the last successful sync; null if there was none.
    async fn hours_since_sync(&self) -> Option<f64> {
        hours_since_sync(&self.row, self.now)
    }

    /// Duration of the last finished sync in seconds.
    async fn duration_seconds(&self) -> Option<f64> {
        duration_seconds(&self.row)
    }

    /// Throughput of the last sync, when it succeeded and took measurable time.
    async fn records_per_second(&self) -> Option<f64> {
        records_per_second(&self.row)
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
                    let counts = feed
                        .read(caller, crate::db::Access::Read, async |txn| {
                            crate::db::events::consecutive_failures(txn).await
                        })
                        .await?;
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
        health(&self.row, self.now)
    }
}
