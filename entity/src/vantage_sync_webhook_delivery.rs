//! `public.vantage_sync_webhook_deliveries`: every attempt to deliver a
//! notification to a webhook, with its answer.

use sea_orm::entity::prelude::*;

/// How a delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[sea_orm(rs_type = "String", db_type = "Text")]
pub enum WebhookDeliveryStatus {
    /// The endpoint answered 2xx.
    #[sea_orm(string_value = "delivered")]
    Delivered,
    /// Anything else: another status, no answer in 10 s, no connection.
    #[sea_orm(string_value = "failed")]
    Failed,
}

/// One delivery attempt.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(schema_name = "public", table_name = "vantage_sync_webhook_deliveries")]
pub struct Model {
    /// Row id, in the order attempts were recorded.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The webhook.
    pub webhook_id: Uuid,
    /// The notification (the `webhook-id` header and payload `id`).
    pub notification_id: i64,
    /// Its type, e.g. `alert.firing` or `ping`.
    pub event_type: String,
    /// 1 for the first attempt of this notification to this webhook.
    pub attempt: i32,
    /// Delivered or failed.
    pub status: WebhookDeliveryStatus,
    /// The endpoint's HTTP status; `None` when it did not answer.
    pub http_status: Option<i32>,
    /// What went wrong, when it failed.
    pub error: Option<String>,
    /// How long the attempt took.
    pub duration_ms: i32,
    /// When the attempt ended.
    pub at: DateTimeWithTimeZone,
}

/// The table has no relations the service navigates.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
