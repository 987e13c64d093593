//! `public.vantage_sync_alerts`: each time one of the four alerts fired for
//! a resource, and when it resolved. Written only by the database's
//! notification maker (see the alerts migration).

use sea_orm::entity::prelude::*;

/// One of the four alerts: failed, stuck, stale, repeated.
// Stored as lower-case text; the GraphQL enum (feature `graphql`) takes
// its names and descriptions from here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum AlertKind {
    /// The last completed sync failed (until one succeeds).
    #[sea_orm(string_value = "failed")]
    Failed,
    /// Running for more than 30 minutes.
    #[sea_orm(string_value = "stuck")]
    Stuck,
    /// No successful sync in the last 24 hours, or never.
    #[sea_orm(string_value = "stale")]
    Stale,
    /// Failed 3 or more times in a row.
    #[sea_orm(string_value = "repeated")]
    Repeated,
}

/// One firing of an alert.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_alerts")]
pub struct Model {
    /// Row id, in the order alerts fired.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Which alert.
    pub alert: AlertKind,
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
