//! `public.vantage_sync_webhooks`: endpoints that changes and alerts are
//! pushed to. Written only through the database functions of the alerts
//! migration; the signing secret lives apart, in a private schema.

use sea_orm::entity::prelude::*;

/// One webhook.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_webhooks")]
pub struct Model {
    /// Its id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Where deliveries are POSTed (`http` or `https`).
    pub url: String,
    /// Notification types it receives: `alert.firing`, `alert.resolved`,
    /// `sync.started`, `sync.succeeded`, `sync.failed`.
    pub events: Vec<String>,
    /// Only these resources' notifications; `None`: every resource.
    pub resources: Option<Vec<String>>,
    /// `json` or `slack`.
    pub format: String,
    /// Whether deliveries go out.
    pub enabled: bool,
    /// Why it was disabled (410, or failing for the whole retry window).
    pub disabled_reason: Option<String>,
    /// When it was created.
    pub created_at: DateTimeWithTimeZone,
    /// The next delivery attempt is not before this.
    pub next_attempt_at: DateTimeWithTimeZone,
    /// Failing since then, with no success after; `None` when healthy.
    pub failing_since: Option<DateTimeWithTimeZone>,
    /// One replica delivers until then.
    pub leased_until: Option<DateTimeWithTimeZone>,
    /// Which claim holds the lease.
    pub lease: Option<Uuid>,
}

/// The table has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
