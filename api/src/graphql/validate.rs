//! Argument checks made before anything reaches the database, so bad input
//! gets a precise message and never starts a transaction. The database
//! enforces the same rules again (constraints), as the last word.

use std::collections::HashMap;
use std::sync::LazyLock;

use async_graphql::parser::types::{TypeKind, TypeSystemDefinition};
use entity::SyncErrors;

use crate::error::{ApiError, ApiResult, ErrorCode};

/// Most errors one `failSync` may record.
pub const MAX_ERRORS: usize = 1_000;
/// Largest `errors` list one `failSync` may record, serialised as JSON.
pub const MAX_ERRORS_BYTES: usize = 256 * 1024;

/// Resource names are lower snake case, 1 to 63 characters, starting with
/// a letter (the table's `resource_format` check).
pub fn resource(name: &str) -> ApiResult<()> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_input(
            "resource",
            "resource must be lower snake case: a letter, then up to 62 letters, digits or underscores",
        ))
    }
}

/// Counts of a completed sync: none negative, and created + updated no
/// more than synced.
pub fn record_counts(synced: i32, created: i32, updated: i32) -> ApiResult<()> {
    for (field, value) in [
        ("recordsSynced", synced),
        ("recordsCreated", created),
        ("recordsUpdated", updated),
    ] {
        if value < 0 {
            return Err(ApiError::bad_input(
                field,
                format!("{field} must not be negative"),
            ));
        }
    }
    if i64::from(created) + i64::from(updated) > i64::from(synced) {
        return Err(ApiError::bad_input(
            "recordsSynced",
            "recordsCreated + recordsUpdated must not exceed recordsSynced",
        ));
    }
    Ok(())
}

/// A number of something, within `range`.
pub fn within<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    min: T,
    max: T,
) -> ApiResult<T> {
    if value >= min && value <= max {
        Ok(value)
    } else {
        Err(ApiError::bad_input(
            field,
            format!("{field} must be between {min} and {max}"),
        ))
    }
}

/// The errors of a failed sync: at most [`MAX_ERRORS`], each with a code,
/// and at most [`MAX_ERRORS_BYTES`] as JSON.
pub fn errors(errors: Vec<entity::SyncError>) -> ApiResult<SyncErrors> {
    if errors.len() > MAX_ERRORS {
        return Err(ApiError::bad_input(
            "errors",
            format!("at most {} errors may be recorded per sync", MAX_ERRORS),
        ));
    }
    if let Some(index) = errors.iter().position(|error| error.code.trim().is_empty()) {
        return Err(ApiError::bad_input(
            "errors",
            format!("errors[{index}].code must not be empty"),
        ));
    }
    let errors = SyncErrors(errors);
    let size = serde_json::to_vec(&errors)
        .map(|json| json.len())
        .unwrap_or(usize::MAX);
    if size > MAX_ERRORS_BYTES {
        return Err(ApiError::bad_input(
            "errors",
            format!(
                "errors take {size} bytes as JSON; at most {} are accepted",
                MAX_ERRORS_BYTES
            ),
        ));
    }
    Ok(errors)
}

/// Every enum of the schema with its values, in schema order.
static ENUM_VALUES: LazyLock<HashMap<String, Vec<String>>> = LazyLock::new(|| {
    let Ok(document) = async_graphql::parser::parse_schema(super::sdl()) else {
        return HashMap::new();
    };
    document
        .definitions
        .into_iter()
        .filter_map(|definition| match definition {
            TypeSystemDefinition::Type(definition) => Some(definition.node),
            _ => None,
        })
        .filter_map(|definition| match definition.kind {
            TypeKind::Enum(values) => Some((
                definition.name.node.to_string(),
                values
                    .values
                    .iter()
                    .map(|value| value.node.value.node.to_string())
                    .collect(),
            )),
            _ => None,
        })
        .collect()
});

/// `message` with the valid values added when it says an enum argument
/// does not contain a value (GraphQL enums are written in upper case, so a
/// lower-case `failed` is a common first guess).
pub fn with_enum_values(message: &str) -> Option<String> {
    let (_, rest) = message.split_once("enumeration type \"")?;
    let (name, _) = rest.split_once('"')?;
    let values = ENUM_VALUES.get(name)?;
    Some(format!("{message}; expected one of {}", values.join(", ")))
}

/// Gives every error a code: parse, validation and limit errors come from
/// async-graphql without one, and they are all the client's to fix; an
/// unknown enum value is told the valid ones.
pub fn fill_codes(response: &mut async_graphql::Response) {
    for error in &mut response.errors {
        if let Some(message) = with_enum_values(&error.message) {
            error.message = message;
        }
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", ErrorCode::BadUserInput.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_follow_the_table_rule() {
        for good in [
            "a",
            "accounts",
            "capital_calls_2",
            &format!("a{}", "b".repeat(62)),
        ] {
            assert!(resource(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Accounts",
            "1funds",
            "cash-flows",
            "_x",
            "é",
            &format!("a{}", "b".repeat(63)),
        ] {
            assert!(resource(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_must_be_consistent() {
        assert!(record_counts(10, 4, 6).is_ok());
        assert!(record_counts(-1, 0, 0).is_err());
        assert!(record_counts(10, 6, 5).is_err());
        assert!(record_counts(i32::MAX, i32::MAX, i32::MAX).is_err());
    }
}
