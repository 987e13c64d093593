//! `public.vantage_sync_state`: one row per resource imported from the
//! Vantage IR API. Column names are defined here and nowhere else in Rust.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

use crate::SyncErrors;

/// Status of a resource's last sync.
// Stored as lower-case text; the GraphQL enum (feature `graphql`) takes
// its names and descriptions from here too.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[sea_orm(rs_type = "String", db_type = "Text")]
#[serde(rename_all = "snake_case")]
pub enum SyncStatus {
    /// Registered, never synced.
    #[sea_orm(string_value = "never_run")]
    NeverRun,
    /// A sync is in progress.
    #[sea_orm(string_value = "running")]
    Running,
    /// The last sync completed.
    #[sea_orm(string_value = "success")]
    Success,
    /// The last sync failed.
    #[sea_orm(string_value = "failed")]
    Failed,
}

/// One row of `public.vantage_sync_state`. Serde reads and writes the
/// row's own column names, as `to_jsonb(row)` does in the event log.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Serialize, Deserialize)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_state")]
pub struct Model {
    /// Resource name in lower snake case; primary key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub resource: String,
    /// Completion time of the last successful sync (the incremental watermark).
    pub last_sync_time: Option<DateTimeWithTimeZone>,
    /// Status of the last sync.
    pub last_sync_status: SyncStatus,
    /// Records processed by the last successful sync.
    pub records_synced: i32,
    /// Records created by the last successful sync.
    pub records_created: i32,
    /// Records updated by the last successful sync.
    pub records_updated: i32,
    /// Errors of the last failed sync; empty after a success.
    #[sea_orm(column_type = "JsonBinary")]
    pub errors: SyncErrors,
    /// When the current or last sync started.
    pub started_at: Option<DateTimeWithTimeZone>,
    /// When the last sync finished; `None` while running.
    pub completed_at: Option<DateTimeWithTimeZone>,
    /// `completed_at - started_at` in milliseconds, computed by trigger.
    pub duration_ms: Option<i32>,
    /// When the resource was registered.
    pub created_at: DateTimeWithTimeZone,
    /// When the row last changed, maintained by trigger.
    pub updated_at: DateTimeWithTimeZone,
}

/// The table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
