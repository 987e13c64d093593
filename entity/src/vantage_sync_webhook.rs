//! `public.vantage_sync_webhooks`: endpoints that changes and alerts are
//! pushed to. Written only through the database functions of the alerts
//! migration; the signing secret lives apart, in a private schema.

use sea_orm::entity::prelude::*;

/// What a webhook can be told: the payload's `type`.
// Stored as text (in the `events` array, whose elements are these
// values); the GraphQL enum (feature `graphql`) takes its names and
// descriptions from here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum WebhookEventType {
    /// An alert started firing (`alert.firing`).
    #[sea_orm(string_value = "alert.firing")]
    AlertFiring,
    /// A firing alert stopped holding (`alert.resolved`).
    #[sea_orm(string_value = "alert.resolved")]
    AlertResolved,
    /// A sync started, or was restarted with `force` (`sync.started`).
    #[sea_orm(string_value = "sync.started")]
    SyncStarted,
    /// A sync completed (`sync.succeeded`).
    #[sea_orm(string_value = "sync.succeeded")]
    SyncSucceeded,
    /// A sync failed (`sync.failed`).
    #[sea_orm(string_value = "sync.failed")]
    SyncFailed,
}

/// How deliveries are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum WebhookFormat {
    /// The JSON payload (`id`, `type`, `alert`, `resource`, `at`, `state`),
    /// signed.
    #[sea_orm(string_value = "json")]
    Json,
    /// A Slack incoming-webhook message, `{"text": ...}` (also signed).
    #[sea_orm(string_value = "slack")]
    Slack,
}

/// One webhook.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_webhooks")]
pub struct Model {
    /// Its id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Where deliveries are POSTed (`http` or `https`).
    pub url: String,
    /// Notification types it receives, as stored: [`WebhookEventType`]
    /// values.
    pub events: Vec<String>,
    /// Only these resources' notifications; `None`: every resource.
    pub resources: Option<Vec<String>>,
    /// How deliveries are written.
    pub format: WebhookFormat,
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
