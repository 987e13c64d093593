//! What a webhook receives: the JSON payload of SPEC 8, or a Slack
//! incoming-webhook message.

use std::sync::LazyLock;

use async_graphql::ScalarType;
use async_graphql::parser::types::{DocumentOperations, Selection, SelectionSet};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use entity::vantage_sync_alert::AlertKind;
use entity::vantage_sync_state::Model as Row;
use entity::vantage_sync_webhook::{WebhookEventType, WebhookFormat};
use sea_orm::ActiveEnum;

use crate::db::webhooks::Claim;
use crate::graphql::sync_state::SyncState;

/// Every `SyncState` field that needs no database read, as a query would
/// select them: the payload's `state` is exactly what such a query returns
/// (derived fields as of the notification's time).
const STATE_QUERY: &str = "{ state { resource lastSyncTime lastSyncStatus recordsSynced \
    recordsCreated recordsUpdated errors { code message recordId timestamp details } \
    startedAt completedAt durationMs createdAt updatedAt errorCount runningSeconds \
    hoursSinceSync durationSeconds recordsPerSecond health } }";

static STATE_SELECTION: LazyLock<Option<SelectionSet>> = LazyLock::new(|| {
    let document = async_graphql::parser::parse_query(STATE_QUERY).ok()?;
    let DocumentOperations::Single(operation) = document.operations else {
        return None;
    };
    match &operation.node.selection_set.node.items.first()?.node {
        Selection::Field(field) => Some(field.node.selection_set.node.clone()),
        _ => None,
    }
});

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

/// The row as GraphQL's `SyncState` would return it; null once removed.
fn state(row: Option<Row>, at: DateTime<Utc>) -> Value {
    match (row, STATE_SELECTION.as_ref()) {
        (Some(row), Some(selection)) => SyncState::new(row, at)
            .plain(selection)
            .and_then(|value| value.into_json().ok())
            .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

fn graphql_time(at: DateTime<Utc>) -> Value {
    at.to_value().into_json().unwrap_or(Value::Null)
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
