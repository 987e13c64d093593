//! Enums, errors and statistics of the schema.

use async_graphql::{Json, SimpleObject};
use chrono::{DateTime, Utc};

/// Status of a resource's last sync: the entity's enum, which is also the
/// GraphQL enum.
pub use entity::SyncStatus;

/// Dashboard traffic light of a resource.
pub use crate::derived::SyncHealth;

/// One error reported by a failed sync, as stored.
pub struct SyncError<'a>(pub &'a entity::SyncError);

super::in_memory::in_memory_object! {
    /// One error reported by a failed sync.
    impl SyncError<'a> as "SyncError" where lifetime 'a {
        /// Machine-readable error code, e.g. `HTTP_500`.
        "code" => fn code(&this) -> &str { &this.0.code }
        /// Human-readable description.
        "message" => fn message(&this) -> &str { &this.0.message }
        /// Identifier of the source record that failed, if any.
        "recordId" => fn record_id(&this) -> Option<&str> { this.0.record_id.as_deref() }
        /// When the error happened.
        "timestamp" => fn timestamp(&this) -> Option<DateTime<Utc>> {
            this.0.timestamp.map(|at| at.with_timezone(&Utc))
        }
        /// Any further structured detail.
        "details" => fn details(&this) -> Option<Json<&serde_json::Value>> {
            this.0.details.as_ref().map(Json)
        }
    }
    resolvers {}
}

/// Totals over every resource.
#[derive(SimpleObject, Debug, Clone, Default)]
pub struct SyncStats {
    /// Resources tracked.
    pub total_resources: i32,
    /// Resources whose last sync succeeded.
    pub successful: i32,
    /// Resources whose last sync failed.
    pub failed: i32,
    /// Resources syncing now.
    pub running: i32,
    /// Resources never synced.
    pub never_run: i32,
    /// Sum of `recordsSynced` over all resources (may exceed 32 bits).
    pub total_records_synced: i64,
    /// Mean duration of the last finished sync of each resource, in ms.
    pub avg_duration_ms: Option<f64>,
    /// Longest duration of the last finished sync of any resource, in ms.
    pub max_duration_ms: Option<i32>,
}
