//! The service's errors and their one mapping to GraphQL error codes and
//! HTTP statuses. Database errors are translated here by SQLSTATE and
//! constraint name; their text never reaches a client.

use async_graphql::ErrorExtensions;
use axum::http::StatusCode;
use sea_orm::{DbErr, RuntimeErr};

/// Machine-readable error codes (`errors[].extensions.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No credentials, where credentials are needed.
    Unauthenticated,
    /// Valid credentials whose role may not do this.
    Forbidden,
    /// A malformed, expired, unsigned or wrongly signed token.
    InvalidToken,
    /// The request or an argument is invalid.
    BadUserInput,
    /// The resource does not exist.
    NotFound,
    /// The resource exists already.
    AlreadyExists,
    /// A sync of the resource is running already.
    AlreadyRunning,
    /// No sync of the resource is running.
    NotRunning,
    /// A subscription cursor is unknown or pruned.
    CursorExpired,
    /// `startSync` on a resource never registered, while the server
    /// requires registration.
    UnknownResource,
    /// An `Idempotency-Key` already used with a different request (HTTP
    /// 422).
    IdempotencyKeyReused,
    /// No document is known by the hash or `documentId` sent: send the
    /// query with its hash (Apollo's persisted-query protocol).
    PersistedQueryNotFound,
    /// A hash was sent alone while automatic persisted queries are off.
    PersistedQueryNotSupported,
    /// The caller may run only trusted documents, and this is not one
    /// (HTTP 400).
    PersistedQueryRequired,
    /// The database cannot be reached now; retry later (HTTP 503).
    ServiceUnavailable,
    /// The caller is over its rate limit (HTTP 429, `Retry-After`).
    RateLimited,
    /// Anything else; details are logged, never sent.
    InternalServerError,
}

impl ErrorCode {
    /// The code as sent to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::InvalidToken => "INVALID_TOKEN",
            Self::BadUserInput => "BAD_USER_INPUT",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::AlreadyRunning => "ALREADY_RUNNING",
            Self::NotRunning => "NOT_RUNNING",
            Self::CursorExpired => "CURSOR_EXPIRED",
            Self::UnknownResource => "UNKNOWN_RESOURCE",
            Self::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Self::PersistedQueryNotFound => "PERSISTED_QUERY_NOT_FOUND",
            Self::PersistedQueryNotSupported => "PERSISTED_QUERY_NOT_SUPPORTED",
            Self::PersistedQueryRequired => "PERSISTED_QUERY_REQUIRED",
            Self::ServiceUnavailable => "SERVICE_UNAVAILABLE",
            Self::RateLimited => "RATE_LIMITED",
            Self::InternalServerError => "INTERNAL_SERVER_ERROR",
        }
    }
}

/// An error a request can end in. Deliberately not `Display`: async-graphql
/// converts any `Display` type into an error without a code, so the one
/// conversion (below) is the one that attaches the code.
#[derive(Debug)]
pub enum ApiError {
    /// The operation needs an `authenticated` or `service_role` token.
    Unauthenticated,
    /// The caller's role may not do this.
    Forbidden {
        /// The caller's role.
        role: &'static str,
        /// What was refused, e.g. "run mutations".
        action: &'static str,
    },
    /// The bearer token was refused.
    InvalidToken(String),
    /// Bad input, with a message that says what to fix.
    BadUserInput {
        /// What is wrong.
        message: String,
        /// The argument or input field at fault, when known.
        field: Option<&'static str>,
    },
    /// The request body is larger than the server accepts.
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The operation may not be sent with this HTTP method.
    MethodNotAllowed(&'static str),
    /// A POST body not declared `application/json`.
    UnsupportedMediaType,
    /// No such resource.
    NotFound(String),
    /// No webhook with this id.
    WebhookNotFound(String),
    /// The resource exists already.
    AlreadyExists(String),
    /// A sync is running already.
    AlreadyRunning(String),
    /// No sync is running.
    NotRunning(String),
    /// The cursor cannot be resumed from.
    CursorExpired,
    /// `startSync` named a resource never registered, and registration
    /// is required.
    UnknownResource(String),
    /// The `Idempotency-Key` was first used with a different request.
    IdempotencyKeyReused,
    /// A persisted-query hash or `documentId` names no known document.
    PersistedQueryNotFound,
    /// A persisted-query hash came alone, and persisted queries are off.
    PersistedQueryNotSupported,
    /// Only trusted documents may run for this caller.
    PersistedQueryRequired,
    /// The request took longer than the server allows.
    Timeout,
    /// The database could not be reached.
    Unavailable,
    /// The caller is over its rate limit; it may try again after this.
    RateLimited(std::time::Duration),
    /// A failure the client cannot act on. The detail is logged only.
    Internal(String),
}

impl ApiError {
    /// A bad argument, naming the field.
    pub fn bad_input(field: &'static str, message: impl Into<String>) -> Self {
        Self::BadUserInput {
            message: message.into(),
            field: Some(field),
        }
    }

    /// The message clients see: what went wrong and what to do.
    pub fn message(&self) -> String {
        match self {
            Self::Unauthenticated => {
                "authentication required: send an Authorization: Bearer token (`vantage-sync token --role authenticated` makes one)".into()
            }
            Self::Forbidden { role, action } => format!("the {role} role may not {action}"),
            Self::InvalidToken(reason) => format!("invalid token: {reason}"),
            Self::BadUserInput { message, .. } => message.clone(),
            Self::PayloadTooLarge { limit } => {
                format!("the request body exceeds {limit} bytes (MAX_BODY_BYTES)")
            }
            Self::MethodNotAllowed(message) => (*message).to_owned(),
            Self::UnsupportedMediaType => {
                "a GraphQL POST body must be JSON: send Content-Type: application/json".into()
            }
            Self::NotFound(resource) => format!("resource \"{resource}\" is not registered"),
            Self::WebhookNotFound(id) => format!("there is no webhook \"{id}\""),
            Self::AlreadyExists(resource) => {
                format!("resource \"{resource}\" is already registered")
            }
            Self::AlreadyRunning(resource) => format!(
                "a sync of resource \"{resource}\" is already running; pass force: true to restart it"
            ),
            Self::NotRunning(resource) => {
                format!("no sync of resource \"{resource}\" is running; start one first")
            }
            Self::CursorExpired => {
                "cursor is unknown or expired; resubscribe with initial: true".into()
            }
            Self::UnknownResource(resource) => format!(
                "resource \"{resource}\" is not registered, and this server starts syncs of \
                 registered resources only (REQUIRE_REGISTERED_RESOURCES): check the name, or \
                 create it with registerResource first"
            ),
            Self::IdempotencyKeyReused => "this Idempotency-Key was used with a different \
                request in the last 24 hours: send a new key for a new request"
                .into(),
            // Apollo's clients recognise these two by their exact text.
            Self::PersistedQueryNotFound => "PersistedQueryNotFound".into(),
            Self::PersistedQueryNotSupported => "PersistedQueryNotSupported".into(),
            Self::PersistedQueryRequired => "this server runs only trusted documents for this \
                caller (TRUSTED_DOCUMENTS): send the documentId or persisted-query hash of a \
                document in its manifest"
                .into(),
            Self::Timeout => "the request timed out".into(),
            Self::RateLimited(wait) => format!(
                "too many requests: try again in {} s (RATE_LIMIT)",
                retry_after_secs(*wait)
            ),
            Self::Unavailable => "the database is unavailable; try again later".into(),
            Self::Internal(_) => "internal server error".into(),
        }
    }

    /// The code clients see.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Unauthenticated => ErrorCode::Unauthenticated,
            Self::Forbidden { .. } => ErrorCode::Forbidden,
            Self::InvalidToken(_) => ErrorCode::InvalidToken,
            Self::BadUserInput { .. }
            | Self::PayloadTooLarge { .. }
            | Self::MethodNotAllowed(_)
            | Self::UnsupportedMediaType => ErrorCode::BadUserInput,
            Self::NotFound(_) | Self::WebhookNotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::AlreadyRunning(_) => ErrorCode::AlreadyRunning,
            Self::NotRunning(_) => ErrorCode::NotRunning,
            Self::CursorExpired => ErrorCode::CursorExpired,
            Self::UnknownResource(_) => ErrorCode::UnknownResource,
            Self::IdempotencyKeyReused => ErrorCode::IdempotencyKeyReused,
            Self::PersistedQueryNotFound => ErrorCode::PersistedQueryNotFound,
            Self::PersistedQueryNotSupported => ErrorCode::PersistedQueryNotSupported,
            Self::PersistedQueryRequired => ErrorCode::PersistedQueryRequired,
            Self::Unavailable => ErrorCode::ServiceUnavailable,
            Self::RateLimited(_) => ErrorCode::RateLimited,
            Self::Timeout | Self::Internal(_) => ErrorCode::InternalServerError,
        }
    }

    /// The HTTP status for errors that end a request before GraphQL runs
    /// (errors inside a GraphQL response travel with 200).
    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::InvalidToken(_) | Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::BadUserInput { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PersistedQueryRequired => StatusCode::BAD_REQUEST,
            // 200, as Apollo's servers answer: its client link takes a 400
            // or 500 to mean the server has no persisted queries at all,
            // and stops sending hashes.
            Self::PersistedQueryNotFound | Self::PersistedQueryNotSupported => StatusCode::OK,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Translates a database error raised while working on `resource`.
    pub fn from_db(error: DbErr, resource: &str) -> Self {
        let Some((code, constraint)) = sqlstate(&error) else {
            return if lost_database(&error) {
                Self::Unavailable
            } else {
                Self::internal(error)
            };
        };
        match code.as_str() {
            "VS001" => Self::AlreadyRunning(resource.to_owned()),
            "VS002" => Self::NotRunning(resource.to_owned()),
            "VS003" => Self::NotFound(resource.to_owned()),
            "23505" => Self::AlreadyExists(resource.to_owned()),
            "23514" => constraint_violation(constraint.as_deref()),
            "23502" => Self::BadUserInput {
                message: "a required value is missing".into(),
                field: None,
            },
            // The database refused what the role may not do: the guards
            // should have caught it first, so this is defence in depth.
            "42501" => Self::Forbidden {
                role: "caller's",
                action: "do this",
            },
            "57014" => Self::Timeout,
            "57P01" | "57P02" | "57P03" | "08000" | "08003" | "08006" => Self::Unavailable,
            _ => Self::internal(error),
        }
    }

    /// An internal error, logged with its detail.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let detail = detail.to_string();
        tracing::error!(%detail, "internal error");
        Self::Internal(detail)
    }
}

/// Whole seconds to wait, at least one, for `Retry-After`.
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Whether `error` says the database could not be reached or a connection
/// to it broke (rather than that a statement failed).
fn lost_database(error: &DbErr) -> bool {
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(inner)) | DbErr::Query(RuntimeErr::SqlxError(inner)) => {
            matches!(
                inner.as_ref(),
                sea_orm::sqlx::Error::Io(_)
                    | sea_orm::sqlx::Error::PoolTimedOut
                    | sea_orm::sqlx::Error::PoolClosed
                    | sea_orm::sqlx::Error::WorkerCrashed
            )
        }
        _ => false,
    }
}

/// A database error's SQLSTATE and constraint name, when it has them.
pub fn sqlstate(error: &DbErr) -> Option<(String, Option<String>)> {
    let (DbErr::Exec(RuntimeErr::SqlxError(inner)) | DbErr::Query(RuntimeErr::SqlxError(inner))) =
        error
    else {
        return None;
    };
    let sea_orm::sqlx::Error::Database(database) = inner.as_ref() else {
        return None;
    };
    Some((
        database.code()?.into_owned(),
        database.constraint().map(str::to_owned),
    ))
}

/// What each CHECK constraint of the table means to a client.
fn constraint_violation(constraint: Option<&str>) -> ApiError {
    let (field, message) = match constraint {
        Some("resource_format") => (
            "resource",
            "resource must be lower snake case: a letter, then up to 62 letters, digits or underscores",
        ),
        Some("non_negative_records_synced") => {
            ("recordsSynced", "recordsSynced must not be negative")
        }
        Some("non_negative_records_created") => {
            ("recordsCreated", "recordsCreated must not be negative")
        }
        Some("non_negative_records_updated") => {
            ("recordsUpdated", "recordsUpdated must not be negative")
        }
        Some("records_breakdown_consistent") => (
            "recordsSynced",
            "recordsCreated + recordsUpdated must not exceed recordsSynced",
        ),
        Some("errors_is_array") => ("errors", "errors must be a list"),
        _ => {
            return ApiError::BadUserInput {
                message: "the values given are inconsistent with the sync state".into(),
                field: None,
            };
        }
    };
    ApiError::bad_input(field, message)
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        let code = error.code();
        let field = match &error {
            ApiError::BadUserInput { field, .. } => *field,
            _ => None,
        };
        async_graphql::Error::new(error.message()).extend_with(|_, extensions| {
            extensions.set("code", code.as_str());
            if let Some(field) = field {
                extensions.set("field", field);
            }
        })
    }
}

/// Result of a resolver.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::time::Duration;

    use sea_orm::sqlx;

    use super::*;

    /// A database refusal as PostgreSQL reports one: a SQLSTATE and, for a
    /// constraint, its name.
    #[derive(Debug)]
    struct Refusal {
        code: &'static str,
        constraint: Option<&'static str>,
    }

    impl std::fmt::Display for Refusal {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "refused with {}", self.code)
        }
    }

    impl std::error::Error for Refusal {}

    impl sqlx::error::DatabaseError for Refusal {
        fn message(&self) -> &str {
            "the database's own text, never shown"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(self.code.into())
        }
        fn constraint(&self) -> Option<&str> {
            self.constraint
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn refused(code: &'static str, constraint: Option<&'static str>) -> DbErr {
        DbErr::Query(RuntimeErr::SqlxError(Arc::new(sqlx::Error::Database(
            Box::new(Refusal { code, constraint }),
        ))))
    }

    #[test]
    fn every_error_has_its_code_and_status() {
        let bad_input = ApiError::BadUserInput {
            message: "no".into(),
            field: None,
        };
        let table = [
            (ApiError::Unauthenticated, "UNAUTHENTICATED", 401),
            (
                ApiError::Forbidden {
                    role: "authenticated",
                    action: "write",
                },
                "FORBIDDEN",
                403,
            ),
            (
                ApiError::InvalidToken("expired".into()),
                "INVALID_TOKEN",
                401,
            ),
            (bad_input, "BAD_USER_INPUT", 400),
            (
                ApiError::PayloadTooLarge { limit: 1024 },
                "BAD_USER_INPUT",
                413,
            ),
            (ApiError::MethodNotAllowed("POST"), "BAD_USER_INPUT", 405),
            (ApiError::UnsupportedMediaType, "BAD_USER_INPUT", 415),
            (ApiError::NotFound("funds".into()), "NOT_FOUND", 500),
            (ApiError::WebhookNotFound("7".into()), "NOT_FOUND", 500),
            (
                ApiError::AlreadyExists("funds".into()),
                "ALREADY_EXISTS",
                500,
            ),
            (
                ApiError::AlreadyRunning("funds".into()),
                "ALREADY_RUNNING",
                500,
            ),
            (ApiError::NotRunning("funds".into()), "NOT_RUNNING", 500),
            (ApiError::CursorExpired, "CURSOR_EXPIRED", 500),
            (
                ApiError::UnknownResource("fundz".into()),
                "UNKNOWN_RESOURCE",
                500,
            ),
            (
                ApiError::IdempotencyKeyReused,
                "IDEMPOTENCY_KEY_REUSED",
                422,
            ),
            (
                ApiError::PersistedQueryNotFound,
                "PERSISTED_QUERY_NOT_FOUND",
                200,
            ),
            (
                ApiError::PersistedQueryNotSupported,
                "PERSISTED_QUERY_NOT_SUPPORTED",
                200,
            ),
            (
                ApiError::PersistedQueryRequired,
                "PERSISTED_QUERY_REQUIRED",
                400,
            ),
            (ApiError::Timeout, "INTERNAL_SERVER_ERROR", 504),
            (ApiError::Unavailable, "SERVICE_UNAVAILABLE", 503),
            (
                ApiError::RateLimited(Duration::from_millis(1500)),
                "RATE_LIMITED",
                429,
            ),
            (
                ApiError::Internal("a detail".into()),
                "INTERNAL_SERVER_ERROR",
                500,
            ),
        ];
        for (error, code, status) in table {
            assert_eq!(error.code().as_str(), code, "{error:?}");
            assert_eq!(error.http_status().as_u16(), status, "{error:?}");
            assert!(!error.message().is_empty(), "{error:?}");
        }
    }

    #[test]
    fn messages_say_what_to_do_and_keep_internals_out() {
        assert_eq!(
            ApiError::Internal("password=hunter2".into()).message(),
            "internal server error"
        );
        assert!(
            ApiError::AlreadyRunning("funds".into())
                .message()
                .contains("force: true")
        );
        assert!(
            ApiError::RateLimited(Duration::from_millis(1500))
                .message()
                .contains("2 s")
        );
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn database_refusals_translate_by_sqlstate_and_constraint() {
        let table = [
            (refused("VS001", None), "ALREADY_RUNNING", None),
            (refused("VS002", None), "NOT_RUNNING", None),
            (refused("VS003", None), "NOT_FOUND", None),
            (refused("23505", None), "ALREADY_EXISTS", None),
            (
                refused("23514", Some("resource_format")),
                "BAD_USER_INPUT",
                Some("resource"),
            ),
            (
                refused("23514", Some("non_negative_records_synced")),
                "BAD_USER_INPUT",
                Some("recordsSynced"),
            ),
            (
                refused("23514", Some("non_negative_records_created")),
                "BAD_USER_INPUT",
                Some("recordsCreated"),
            ),
            (
                refused("23514", Some("non_negative_records_updated")),
                "BAD_USER_INPUT",
                Some("recordsUpdated"),
            ),
            (
                refused("23514", Some("records_breakdown_consistent")),
                "BAD_USER_INPUT",
                Some("recordsSynced"),
            ),
            (
                refused("23514", Some("errors_is_array")),
                "BAD_USER_INPUT",
                Some("errors"),
            ),
            (
                refused("23514", Some("a_constraint_added_later")),
                "BAD_USER_INPUT",
                None,
            ),
            (refused("23502", None), "BAD_USER_INPUT", None),
            (refused("42501", None), "FORBIDDEN", None),
            (refused("57014", None), "INTERNAL_SERVER_ERROR", None),
            (refused("57P01", None), "SERVICE_UNAVAILABLE", None),
            (refused("08006", None), "SERVICE_UNAVAILABLE", None),
            (refused("XX000", None), "INTERNAL_SERVER_ERROR", None),
            (
                DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout),
                "SERVICE_UNAVAILABLE",
                None,
            ),
            (
                DbErr::Query(RuntimeErr::SqlxError(Arc::new(sqlx::Error::PoolClosed))),
                "SERVICE_UNAVAILABLE",
                None,
            ),
            (DbErr::Custom("a bug".into()), "INTERNAL_SERVER_ERROR", None),
        ];
        for (db_error, code, field) in table {
            let shown = format!("{db_error:?}");
            let error = ApiError::from_db(db_error, "funds");
            assert_eq!(error.code().as_str(), code, "{shown}");
            let graphql = async_graphql::Error::from(error);
            let extensions = graphql.extensions.as_ref().unwrap();
            assert_eq!(
                extensions.get("code"),
                Some(&async_graphql::Value::from(code)),
                "{shown}"
            );
            assert_eq!(
                extensions.get("field"),
                field.map(async_graphql::Value::from).as_ref(),
                "{shown}"
            );
            assert!(
                !graphql.message.contains("never shown"),
                "the database's text reached the client: {shown}"
            );
        }
        // The resource worked on is named.
        assert!(
            ApiError::from_db(refused("VS002", None), "cashflows")
                .message()
                .contains("\"cashflows\"")
        );
    }
}
