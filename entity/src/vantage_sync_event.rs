//! `public.vantage_sync_events`: one row per committed change to
//! `vantage_sync_state`, written by its trigger.

use sea_orm::entity::prelude::*;

use crate::SyncStatus;

/// One event of the log.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_events")]
pub struct Model {
    /// Event id: taken at commit under a lock, so id order is commit order.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The resource that changed.
    pub resource: String,
    /// `INSERT`, `UPDATE` or `DELETE`.
    pub operation: String,
    /// Status after the change; `None` on DELETE.
    pub status: Option<SyncStatus>,
    /// Status before the change; `None` on INSERT.
    pub previous_status: Option<SyncStatus>,
    /// The row as the change left it (the old row on DELETE).
    #[sea_orm(column_type = "JsonBinary")]
    pub state: Json,
    /// When the change was made.
    pub occurred_at: DateTimeWithTimeZone,
    /// The writing transaction (an xid8).
    pub xid: i64,
}

/// The table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
