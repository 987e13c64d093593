//! `public.vantage_sync_alerts`: each time one of the four alerts fired for
//! a resource, and when it resolved. Written only by the database's
//! notification maker (see the alerts migration).

use sea_orm::entity::prelude::*;

/// One firing of an alert.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_alerts")]
pub struct Model {
    /// Row id, in the order alerts fired.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// `failed`, `stuck`, `stale` or `repeated`.
    pub alert: String,
    /// The resource it concerns.
    pub resource: String,
    /// When its condition started to hold.
    pub firing_since: DateTimeWithTimeZone,
    /// When it stopped holding; `None` while firing.
    pub resolved_at: Option<DateTimeWithTimeZone>,
}

/// The table has no relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
