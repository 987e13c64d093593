//! What a webhook receives: the JSON payload (`id`, `type`, `alert`,
//! `resource`, `at` and the resource's `state`), or a Slack
//! incoming-webhook message.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use entity::vantage_sync_alert::AlertKind;
use entity::vantage_sync_state::Model as Row;
use entity::vantage_sync_webhook::{WebhookEventType, WebhookFormat};
use sea_orm::ActiveEnum;

use crate::db::webhooks::Claim;
use crate::derived;

/// The notification type of `testWebhook` (not one a webhook subscribes to).
const PING: &str = "ping";

/// The notification's id as sent (`webhook-id` and the payload's `id`).
pub fn message_id(claim: &Claim) -> String {
    claim.notification_id.to_string()
}

/// The body to POST for `claim`, in the webhook's format.
pub fn body(claim: &Claim) -> Vec<u8> {
    // The row as the change left it (the event log keeps `to_jsonb(row)`,
    // the entity's column names); `None` once removed, or for a ping.
    let row: Option<Row> = claim
        .state
        .clone()
        .and_then(|state| serde_json::from_value(state).ok());
    let value = match claim.format {
        WebhookFormat::Slack => json!({ "text": slack_text(claim, row.as_ref()) }),
        WebhookFormat::Json => Value::Object(json_payload(claim, row)),
    };
    // A Value always serialises.
    serde_json::to_vec(&value).unwrap_or_default()
}

fn json_payload(claim: &Claim, row: Option<Row>) -> Map<String, Value> {
    let at = claim.at.with_timezone(&Utc);
    let mut payload = Map::new();
    payload.insert("id".into(), message_id(claim).into());
    payload.insert("type".into(), claim.kind.clone().into());
    if let Some(alert) = claim.alert {
        payload.insert("alert".into(), alert.to_value().into());
    }
    if let Some(resource) = &claim.resource {
        payload.insert("resource".into(), resource.clone().into());
    }
    payload.insert("at".into(), graphql_time(at));
    if claim.kind != PING {
        payload.insert("state".into(), state(row, at));
    }
    payload
}

/// The row with every `SyncState` field a query can read without the
/// database, named and written as the API writes them (times in RFC 3339,
/// enums in upper case), derived fields as of the notification's time;
/// null once removed.
fn state(row: Option<Row>, at: DateTime<Utc>) -> Value {
    let Some(row) = row else {
        return Value::Null;
    };
    let time = |at: Option<DateTime<chrono::FixedOffset>>| {
        derived::utc(at).map_or(Value::Null, graphql_time)
    };
    let errors: Vec<Value> = row
        .errors
        .0
        .iter()
        .map(|error| {
            json!({
                "code": error.code,
                "message": error.message,
                "recordId": error.record_id,
                "timestamp": time(error.timestamp),
                "details": error.details,
            })
        })
        .collect();
    json!({
        "resource": row.resource,
        "lastSyncTime": time(row.last_sync_time),
        "lastSyncStatus": enum_name(row.last_sync_status),
        "recordsSynced": row.records_synced,
        "recordsCreated": row.records_created,
        "recordsUpdated": row.records_updated,
        "errors": errors,
        "startedAt": time(row.started_at),
        "completedAt": time(row.completed_at),
        "durationMs": row.duration_ms,
        "createdAt": time(Some(row.created_at)),
        "updatedAt": time(Some(row.updated_at)),
        "errorCount": derived::error_count(&row),
        "runningSeconds": derived::running_seconds(&row, at),
        "hoursSinceSync": derived::hours_since_sync(&row, at),
        "durationSeconds": derived::duration_seconds(&row),
        "recordsPerSecond": derived::records_per_second(&row),
        "health": enum_name(derived::health(&row, at)),
    })
}

/// A time as the API writes it.
fn graphql_time(at: DateTime<Utc>) -> Value {
    at.to_rfc3339().into()
}

/// An enum's GraphQL name (`FAILED`, `GREEN`), from its one definition.
fn enum_name<T: async_graphql::resolver_utils::EnumType>(value: T) -> Value {
    async_graphql::resolver_utils::enum_value(value)
        .into_json()
        .unwrap_or(Value::Null)
}

/// A one-line Slack message.
fn slack_text(claim: &Claim, row: Option<&Row>) -> String {
    let resource = claim.resource.as_deref().unwrap_or("");
    let alert = claim
        .alert
        .map(|alert| alert.to_value())
        .unwrap_or_default();
    let first_error = row
        .and_then(|row| row.errors.0.first())
        .map(|error| format!(": {}", error.message))
        .unwrap_or_default();
    let records = row.map_or(0, |row| row.records_synced);
    let at = claim.at.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S UTC");
    match WebhookEventType::try_from_value(&claim.kind).ok() {
        Some(WebhookEventType::AlertFiring) => format!(
            ":rotating_light: *{alert}* alert firing for `{resource}` since {at}{}",
            match claim.alert {
                Some(AlertKind::Failed | AlertKind::Repeated) => first_error.as_str(),
                _ => "",
            }
        ),
        Some(WebhookEventType::AlertResolved) => {
            format!(":white_check_mark: *{alert}* alert resolved for `{resource}` at {at}")
        }
        Some(WebhookEventType::SyncStarted) => {
            format!(":arrow_forward: sync of `{resource}` started at {at}")
        }
        Some(WebhookEventType::SyncSucceeded) => {
            format!(":heavy_check_mark: sync of `{resource}` succeeded at {at}: {records} records")
        }
        Some(WebhookEventType::SyncFailed) => {
            format!(":x: sync of `{resource}` failed at {at}{first_error}")
        }
        None => "A ping from the Vantage sync state service: this webhook works.".to_owned(),
    }
}
