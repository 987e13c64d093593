//! The typed contents of the `errors` jsonb column.
//!
//! The column only guarantees a JSON array: rows written by plain SQL or by
//! older tools may hold anything in it. Reading is therefore lenient (a
//! missing or odd field becomes empty or `None`, never a failed read), while
//! writing always produces the canonical camelCase object.

use chrono::{DateTime, FixedOffset};
use sea_orm::FromJsonQueryResult;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// One error to record with `failSync`.
// Also the GraphQL input `SyncErrorInput` (feature `graphql`), so its
// fields are written once; the output type wraps it (the API's
// `graphql::types::SyncError`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::InputObject))]
#[cfg_attr(feature = "graphql", graphql(name = "SyncErrorInput"))]
#[serde(rename_all = "camelCase")]
pub struct SyncError {
    /// Machine-readable error code, e.g. `HTTP_500`; not empty.
    pub code: String,
    /// Human-readable description.
    pub message: String,
    /// Identifier of the source record that failed, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_id: Option<String>,
    /// When the error happened (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<FixedOffset>>,
    /// Any further structured detail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// The `errors` column: a JSON array of [`SyncError`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, FromJsonQueryResult)]
#[serde(transparent)]
pub struct SyncErrors(pub Vec<SyncError>);

impl<'de> Deserialize<'de> for SyncError {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self::from_json(Value::deserialize(deserializer)?))
    }
}

impl SyncError {
    /// Reads one element of the column, whatever its shape. A bare string is
    /// taken as the message; an object's known fields are read (snake_case
    /// aliases too) and anything unrecognised is kept under `details`.
    pub fn from_json(value: Value) -> Self {
        let mut object = match value {
            Value::Object(object) => object,
            Value::String(message) => {
                return Self {
                    message,
                    ..Self::default()
                };
            }
            other => {
                return Self {
                    details: Some(other),
                    ..Self::default()
                };
            }
        };
        let code = take_text(&mut object, &["code"]).unwrap_or_default();
        let message = take_text(&mut object, &["message", "msg", "error"]).unwrap_or_default();
        let record_id = take_text(&mut object, &["recordId", "record_id"]);
        let timestamp = match take(&mut object, &["timestamp"]) {
            Some(Value::String(text)) => match DateTime::parse_from_rfc3339(&text) {
                Ok(timestamp) => Some(timestamp),
                Err(_) => {
                    object.insert("timestamp".into(), Value::String(text));
                    None
                }
            },
            Some(Value::Null) | None => None,
            Some(other) => {
                object.insert("timestamp".into(), other);
                None
            }
        };
        let mut details = take(&mut object, &["details"]).filter(|value| !value.is_null());
        if !object.is_empty() {
            // Keep unrecognised fields rather than dropping data on the floor.
            let mut merged = match details {
                Some(Value::Object(map)) => map,
                Some(other) => Map::from_iter([("details".to_owned(), other)]),
                None => Map::new(),
            };
            merged.extend(object);
            details = Some(Value::Object(merged));
        }
        Self {
            code,
            message,
            record_id,
            timestamp,
            details,
        }
    }
}

fn take(object: &mut Map<String, Value>, keys: &[&str]) -> Option<Value> {
    keys.iter().find_map(|key| object.remove(*key))
}

fn take_text(object: &mut Map<String, Value>, keys: &[&str]) -> Option<String> {
    match take(object, keys)? {
        Value::Null => None,
        Value::String(text) => Some(text),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_objects_round_trip() {
        let value = json!([{
            "code": "HTTP_500",
            "message": "upstream failed",
            "recordId": "acc-1",
            "timestamp": "2025-11-05T13:28:40Z",
            "details": {"status": 500}
        }]);
        let errors: SyncErrors = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(errors.0[0].record_id.as_deref(), Some("acc-1"));
        assert_eq!(serde_json::to_value(&errors).unwrap(), value);
    }

    #[test]
    fn odd_shapes_are_read_without_losing_data() {
        let errors: SyncErrors = serde_json::from_value(json!([
            "plain text",
            42,
            {"record_id": 7, "timestamp": "yesterday", "extra": true}
        ]))
        .unwrap();
        assert_eq!(errors.0[0].message, "plain text");
        assert_eq!(errors.0[1].details, Some(json!(42)));
        assert_eq!(errors.0[2].record_id.as_deref(), Some("7"));
        assert_eq!(errors.0[2].timestamp, None);
        assert_eq!(
            errors.0[2].details,
            Some(json!({"timestamp": "yesterday", "extra": true}))
        );
    }
}
