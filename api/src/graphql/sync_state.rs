//! `SyncState`: one resource's row, with the fields dashboards derive.

use std::borrow::Cow;

use async_graphql::parser::types::Field;
use async_graphql::registry::Registry;
use async_graphql::{ContextSelectionSet, OutputType, Positioned, ServerResult, Value};
use chrono::{DateTime, Utc};
use entity::vantage_sync_state::Model;

use super::in_memory::{Walk, in_memory_enums, in_memory_object};
use super::types::{SyncError, SyncHealth, SyncStatus};
use crate::derived::{
    duration_seconds, error_count, health, hours_since_sync, records_per_second, running_seconds,
    utc,
};

/// The sync state of one resource, as of the request's clock.
///
/// Resolved in one pass when every selected field is a value in memory (see
/// [`super::in_memory`]), else by the derived resolvers of [`SyncStateFields`],
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

    /// RED when failed or stuck, YELLOW when never run or stale, GREEN
    /// otherwise ([`health`]).
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
        let in_memory = Walk::new(ctx).object(&self.0, &ctx.item.node);
        match in_memory {
            Some(value) => Ok(value),
            None => OutputType::resolve(&self.0, ctx, field).await,
        }
    }
}

in_memory_enums!(SyncStatus, SyncHealth);

in_memory_object! {
    /// The sync state of one resource.
    impl SyncStateFields as "SyncState" {
        /// Resource name in lower snake case (accounts, funds, ...).
        "resource" => fn resource(&this) -> &str { &this.row.resource }
        /// Watermark for incremental syncs: completion time of the last successful sync.
        "lastSyncTime" => fn last_sync_time(&this) -> Option<DateTime<Utc>> {
            utc(this.row.last_sync_time)
        }
        /// Status of the last sync.
        "lastSyncStatus" => fn last_sync_status(&this) -> SyncStatus {
            this.row.last_sync_status
        }
        /// Records processed by the last successful sync (created + updated + skipped).
        "recordsSynced" => fn records_synced(&this) -> i32 { this.row.records_synced }
        /// Records created by the last successful sync.
        "recordsCreated" => fn records_created(&this) -> i32 { this.row.records_created }
        /// Records updated by the last successful sync.
        "recordsUpdated" => fn records_updated(&this) -> i32 { this.row.records_updated }
        /// Errors of the last failed sync; empty after a success.
        "errors" => fn errors(&this) -> Vec<SyncError<'_>> {
            this.row.errors.0.iter().map(SyncError).collect()
        }
        /// When the current or last sync started.
        "startedAt" => fn started_at(&this) -> Option<DateTime<Utc>> { utc(this.row.started_at) }
        /// When the last sync finished; null while running.
        "completedAt" => fn completed_at(&this) -> Option<DateTime<Utc>> {
            utc(this.row.completed_at)
        }
        /// Duration of the last finished sync in milliseconds.
        "durationMs" => fn duration_ms(&this) -> Option<i32> { this.row.duration_ms }
        /// When the resource was registered.
        "createdAt" => fn created_at(&this) -> DateTime<Utc> {
            this.row.created_at.with_timezone(&Utc)
        }
        /// When the row last changed.
        "updatedAt" => fn updated_at(&this) -> DateTime<Utc> {
            this.row.updated_at.with_timezone(&Utc)
        }
        /// Number of errors of the last failed sync.
        "errorCount" => fn error_count(&this) -> i32 { error_count(&this.row) }
        /// Seconds the current sync has been running; null unless running.
        "runningSeconds" => fn running_seconds(&this) -> Option<i32> {
            running_seconds(&this.row, this.now)
        }
        /// Hours since the last successful sync; null if there was none.
        "hoursSinceSync" => fn hours_since_sync(&this) -> Option<f64> {
            hours_since_sync(&this.row, this.now)
        }
        /// Duration of the last finished sync in seconds.
        "durationSeconds" => fn duration_seconds(&this) -> Option<f64> {
            duration_seconds(&this.row)
        }
        /// Throughput of the last sync, when it succeeded and took measurable time.
        "recordsPerSecond" => fn records_per_second(&this) -> Option<f64> {
            records_per_second(&this.row)
        }
        /// Dashboard traffic light: RED failed or stuck over 30 min, YELLOW never
        /// run or no success in 24 h, GREEN otherwise.
        "health" => fn health_field(&this) -> SyncHealth { health(&this.row, this.now) }
    }
    resolvers {
    /// Failed completions since the last success, from the event log (the
    /// "failed 3+ times in a row" alert). Counts only events still in the
    /// log (see event retention).
    async fn consecutive_failures(
        &self,
        ctx: &async_graphql::Context<'_>,
    ) -> async_graphql::Result<i32> {
        // Boxed: async-graphql sizes every field's future of this type by
        // the largest, and this one holds database reads.
        let count = Box::pin(async {
            super::OperationContext::reader(ctx)?
                .consecutive_failures(&self.row.resource)
                .await
        })
        .await?;
        Ok(count)
    }
    }
}
