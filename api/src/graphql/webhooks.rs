//! Webhooks, for `service_role` callers: create, delete, list,
//! test, and read the delivery log. Creating one checks its URL (after
//! DNS resolution) and makes its signing secret, shown only then.

use async_graphql::{Context, ID, Object, SimpleObject};
use chrono::{DateTime, Utc};
use entity::vantage_sync_webhook::Model as WebhookRow;
pub use entity::vantage_sync_webhook::{WebhookEventType, WebhookFormat};
use entity::vantage_sync_webhook_delivery::Model as DeliveryRow;
pub use entity::vantage_sync_webhook_delivery::WebhookDeliveryStatus;
use sea_orm::ActiveEnum;
use sea_orm::prelude::Uuid;

use super::OperationContext;
use super::history::PageInfo;
use super::validate;
use crate::db::webhooks::{self, NewWebhook};
use crate::error::ApiError;
use crate::feed::cursor::Cursor;
use crate::webhooks::{WebhookSettings, address, signature};

/// An endpoint that notifications are POSTed to.
#[derive(SimpleObject, Debug, Clone)]
pub struct Webhook {
    /// Its id.
    pub id: ID,
    /// Where deliveries go.
    pub url: String,
    /// What it is told.
    pub events: Vec<WebhookEventType>,
    /// Only these resources' notifications; null: every resource.
    pub resources: Option<Vec<String>>,
    /// How deliveries are written.
    pub format: WebhookFormat,
    /// Whether deliveries go out.
    pub enabled: bool,
    /// Why it was disabled: the endpoint answered 410, or no delivery
    /// succeeded for the whole retry window.
    pub disabled_reason: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

impl From<WebhookRow> for Webhook {
    fn from(row: WebhookRow) -> Self {
        Self {
            id: ID(row.id.to_string()),
            url: row.url,
            events: row
                .events
                .iter()
                .filter_map(|event| WebhookEventType::try_from_value(event).ok())
                .collect(),
            resources: row.resources,
            format: row.format,
            enabled: row.enabled,
            disabled_reason: row.disabled_reason,
            created_at: row.created_at.with_timezone(&Utc),
        }
    }
}

/// A new webhook and its signing secret.
#[derive(SimpleObject, Debug)]
pub struct WebhookCreated {
    /// The webhook.
    pub webhook: Webhook,
    /// The Standard Webhooks signing secret (`whsec_...`). Shown only
    /// here: keep it where the receiver can verify signatures with it.
    pub secret: String,
}

/// One attempt to deliver a notification.
#[derive(SimpleObject, Debug)]
pub struct WebhookDelivery {
    /// The notification's id (the payload's `id`, the `webhook-id` header):
    /// the same on every attempt.
    pub event_id: ID,
    /// `alert.firing`, `sync.failed`, `ping`, ...
    pub event_type: String,
    /// 1 for the first attempt of this notification.
    pub attempt: i32,
    /// Delivered or failed.
    pub status: WebhookDeliveryStatus,
    /// The endpoint's HTTP status; null when it did not answer.
    pub http_status: Option<i32>,
    /// What went wrong.
    pub error: Option<String>,
    /// When the attempt ended.
    pub at: DateTime<Utc>,
}

/// An attempt and where it stands in the log.
#[derive(SimpleObject, Debug)]
pub struct WebhookDeliveryEdge {
    /// Pass as `after` for the attempts after this one.
    pub cursor: String,
    /// The attempt.
    pub node: WebhookDelivery,
}

/// A page of a webhook's delivery log, oldest first.
#[derive(SimpleObject)]
pub struct WebhookDeliveryConnection {
    /// The attempts of this page.
    pub edges: Vec<WebhookDeliveryEdge>,
    /// Paging state.
    pub page_info: PageInfo,
}

impl WebhookDeliveryConnection {
    fn page(mut rows: Vec<DeliveryRow>, first: usize) -> Self {
        let has_next_page = rows.len() > first;
        rows.truncate(first);
        let edges: Vec<WebhookDeliveryEdge> = rows
            .into_iter()
            .map(|row| WebhookDeliveryEdge {
                cursor: Cursor::at(row.id).encode(),
                node: WebhookDelivery {
                    event_id: ID(row.notification_id.to_string()),
                    event_type: row.event_type,
                    attempt: row.attempt,
                    status: row.status,
                    http_status: row.http_status,
                    error: row.error,
                    at: row.at.with_timezone(&Utc),
                },
            })
            .collect();
        let end_cursor = edges.last().map(|edge| edge.cursor.clone());
        Self {
            edges,
            page_info: PageInfo {
                has_next_page,
                end_cursor,
            },
        }
    }
}

fn webhook_id(id: &ID) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::WebhookNotFound(id.to_string()))
}

/// Most resources one webhook may filter on.
const MAX_FILTER_RESOURCES: usize = 1_000;
/// Longest URL accepted.
const MAX_URL_BYTES: usize = 2_048;

/// Webhook reads.
#[derive(Default)]
pub struct WebhookQuery;

#[Object]
impl WebhookQuery {
    /// Every webhook, oldest first (service_role).
    async fn webhooks(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Webhook>> {
        let request = OperationContext::webhook_admin(ctx)?;
        let rows = request
            .read_once(ctx, "", async |txn| webhooks::list(txn).await)
            .await?;
        Ok(rows.into_iter().map(Webhook::from).collect())
    }

    /// A webhook's delivery attempts, oldest first, a page at a time
    /// (service_role).
    async fn webhook_deliveries(
        &self,
        ctx: &Context<'_>,
        webhook_id: ID,
        #[graphql(default_with = "Some(50)")] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<WebhookDeliveryConnection> {
        let request = OperationContext::webhook_admin(ctx)?;
        let id = self::webhook_id(&webhook_id)?;
        let first = validate::within("first", first.unwrap_or(50), 1, 500)?;
        let after = match after {
            None => 0,
            Some(after) => {
                Cursor::decode(&after)
                    .ok_or_else(|| {
                        ApiError::bad_input("after", "not a cursor of webhookDeliveries")
                    })?
                    .position
            }
        };
        let limit = u64::from(first.unsigned_abs()) + 1;
        let rows = request
            .read_once(ctx, "", async |txn| match webhooks::find(txn, id).await? {
                None => Ok(None),
                Some(_) => webhooks::deliveries(txn, id, after, limit).await.map(Some),
            })
            .await?
            .ok_or_else(|| ApiError::WebhookNotFound(webhook_id.to_string()))?;
        Ok(WebhookDeliveryConnection::page(
            rows,
            first.unsigned_abs() as usize,
        ))
    }
}

/// Webhook changes.
#[derive(Default)]
pub struct WebhookMutation;

#[Object]
impl WebhookMutation {
    /// Creates a webhook that is told `events` (of `resources` only, when
    /// given) from now on; alerts already firing are not sent. The URL
    /// must be http(s) and, unless WEBHOOK_ALLOW_PRIVATE, resolve only to
    /// public addresses. Returns the signing secret, shown only here.
    async fn create_webhook(
        &self,
        ctx: &Context<'_>,
        url: String,
        events: Vec<WebhookEventType>,
        resources: Option<Vec<String>>,
        #[graphql(default_with = "Some(WebhookFormat::Json)")] format: Option<WebhookFormat>,
    ) -> async_graphql::Result<WebhookCreated> {
        let request = OperationContext::webhook_admin(ctx)?;
        let settings = ctx
            .data_opt::<WebhookSettings>()
            .copied()
            .unwrap_or(WebhookSettings::DEFAULT);
        if url.len() > MAX_URL_BYTES {
            return Err(
                ApiError::bad_input("url", format!("at most {MAX_URL_BYTES} bytes")).into(),
            );
        }
        address::check(&url, settings.allow_private)
            .await
            .map_err(|refused| ApiError::bad_input("url", refused.to_string()))?;
        if events.is_empty() {
            return Err(ApiError::bad_input("events", "name at least one event type").into());
        }
        let mut stored: Vec<String> = Vec::new();
        for event in &events {
            let value = event.to_value();
            if !stored.contains(&value) {
                stored.push(value);
            }
        }
        if let Some(resources) = &resources {
            if resources.is_empty() || resources.len() > MAX_FILTER_RESOURCES {
                return Err(ApiError::bad_input(
                    "resources",
                    format!("name 1 to {MAX_FILTER_RESOURCES} resources, or leave it out for all"),
                )
                .into());
            }
            for resource in resources {
                validate::resource(resource)?;
            }
        }
        let secret = signature::new_secret().map_err(ApiError::internal)?;
        let new = NewWebhook {
            url,
            events: stored,
            resources,
            format: format.unwrap_or(WebhookFormat::Json),
            secret: secret.clone(),
        };
        let row = request
            .read("", async |txn| {
                txn.in_savepoint(async |txn| webhooks::create(txn, new).await)
                    .await
            })
            .await?;
        Ok(WebhookCreated {
            webhook: row.into(),
            secret,
        })
    }

    /// Deletes a webhook with its undelivered notifications and delivery
    /// log; returns it as it was.
    async fn delete_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Webhook> {
        let request = OperationContext::webhook_admin(ctx)?;
        let uuid = webhook_id(&id)?;
        let row = request
            .read("", async |txn| {
                txn.in_savepoint(async |txn| webhooks::delete(txn, uuid).await)
                    .await
            })
            .await?
            .ok_or_else(|| ApiError::WebhookNotFound(id.to_string()))?;
        Ok(row.into())
    }

    /// Queues a `ping` to the webhook, after what it already has to
    /// receive; its attempts show in `webhookDeliveries`. Returns the
    /// webhook.
    async fn test_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Webhook> {
        let request = OperationContext::webhook_admin(ctx)?;
        let uuid = webhook_id(&id)?;
        let row = request
            .read("", async |txn| {
                txn.in_savepoint(async |txn| match webhooks::ping(txn, uuid).await? {
                    None => Ok(None),
                    Some(_) => webhooks::find(txn, uuid).await,
                })
                .await
            })
            .await?
            .ok_or_else(|| ApiError::WebhookNotFound(id.to_string()))?;
        Ok(row.into())
    }
}
