//! What a webhook receives: the JSON payload of SPEC 8, or a Slack
//! incoming-webhook message.

use std::sync::LazyLock;

use async_graphql::ScalarType;
use async_graphql::parser::types::{DocumentOperations, Selection, SelectionSet};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

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

/// The notification's id as sent (`webhook-id` and the payload's `id`).
pub fn message_id(claim: &Claim) -> String {
    claim.notification_id.to_string()
}

/// The body to POST for `claim`, in the webhook's format.
pub fn body(claim: &Claim) -> Vec<u8> {
    let value = if claim.format == "slack" {
        json!({ "text": slack_text(claim) })
    } else {
        Value::Object(json_payload(claim))
    };
    // A Value always serialises.
    serde_json::to_vec(&value).unwrap_or_default()
}

fn json_payload(claim: &Claim) -> Map<String, Value> {
    let at = claim.at.with_timezone(&Utc);
    let mut payload = Map::new();
    payload.insert("id".into(), message_id(claim).into());
    payload.insert("type".into(), claim.kind.clone().into());
    if let Some(alert) = &claim.alert {
        payload.insert("alert".into(), alert.clone().into());
    }
    if let Some(resource) = &claim.resource {
        payload.insert("resource".into(), resource.clone().into());
    }
    payload.insert("at".into(), graphql_time(at));
    if claim.kind != "ping" {
        payload.insert("state".into(), state(claim, at));
    }
    payload
}

/// The row as GraphQL's `SyncState` would return it; null once removed.
fn state(claim: &Claim, at: DateTime<Utc>) -> Value {
    let row = claim
        .state
        .clone()
        .and_then(|state| serde_json::from_value(state).ok());
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
fn slack_text(claim: &Claim) -> String {
    let resource = claim.resource.as_deref().unwrap_or("");
    let alert = claim.alert.as_deref().unwrap_or("");
    let first_error = claim
        .state
        .as_ref()
        .and_then(|state| state.get("errors")?.get(0)?.get("message")?.as_str())
        .map(|message| format!(": {message}"))
        .unwrap_or_default();
    let records = claim
        .state
        .as_ref()
        .and_then(|state| state.get("records_synced")?.as_i64())
        .unwrap_or(0);
    let at = claim.at.with_timezone(&Utc).format("%Y-%m-%d %H:%M:%S UTC");
    match claim.kind.as_str() {
        "alert.firing" => format!(
            ":rotating_light: *{alert}* alert firing for `{resource}` since {at}{}",
            if alert == "failed" || alert == "repeated" {
                first_error.as_str()
            } else {
                ""
            }
        ),
        "alert.resolved" => {
            format!(":white_check_mark: *{alert}* alert resolved for `{resource}` at {at}")
        }
        "sync.started" => format!(":arrow_forward: sync of `{resource}` started at {at}"),
        "sync.succeeded" => {
            format!(":heavy_check_mark: sync of `{resource}` succeeded at {at}: {records} records")
        }
        "sync.failed" => format!(":x: sync of `{resource}` failed at {at}{first_error}"),
        _ => "A ping from the Vantage sync state service: this webhook works.".to_owned(),
    }
}
