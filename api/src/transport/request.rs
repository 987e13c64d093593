//! The request path every transport shares: a GraphQL request is admitted
//! (its token verified, its rate and weight checked, its operation
//! classified) or refused with the error's own status; then run in one
//! transaction as its caller; then answered with the status and the
//! metrics mark its outcome calls for.

use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument as _;

use async_graphql::parser::types::{DocumentOperations, OperationType};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::media::ResponseMedia;
use super::traces::DbTime;
use crate::auth::Caller;
use crate::db::{Access, RequestDb, idempotency};
use crate::error::{ApiError, ErrorCode, retry_after_secs};
use crate::graphql::{OperationContext, cost, validate};
use crate::metrics::{Metrics, Operation, Outcome};

/// A GraphQL-shaped error body for requests refused before execution
/// (HTTP or the WebSocket upgrade), with the status the error calls for.
pub(crate) fn refuse(error: ApiError) -> Response {
    let body = json!({
        "errors": [{
            "message": error.message(),
            "extensions": { "code": error.code().as_str() },
        }]
    });
    let mut response = (error.http_status(), Json(body)).into_response();
    let retry_after = match error {
        ApiError::RateLimited(wait) => Some(retry_after_secs(wait)),
        ApiError::Unavailable => Some(1),
        _ => None,
    };
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    response
}

/// What a GraphQL request ran and how it ended, left in the response for
/// [`record_requests`]. A response without it was refused before its
/// operation was known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestOutcome {
    pub operation: Operation,
    pub outcome: Outcome,
}

/// Counts and times every GraphQL HTTP request (not WebSocket upgrades),
/// by what the handler says it ran.
pub(crate) async fn record_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let recorded = response.extensions().get::<RequestOutcome>().copied();
        let RequestOutcome { operation, outcome } = recorded.unwrap_or(RequestOutcome {
            operation: Operation::Unknown,
            outcome: Outcome::Rejected,
        });
        metrics.record_request(operation, outcome, started.elapsed().as_secs_f64());
    }
    response
}

/// A refusal of an operation whose kind is known, counted as such.
pub(crate) fn refused_as(operation: Operation, error: ApiError) -> Response {
    let mut refused = refuse(error);
    refused.extensions_mut().insert(RequestOutcome {
        operation,
        outcome: Outcome::Rejected,
    });
    refused
}

/// Most of an over-limit body read (and thrown away) before its 413 is
/// sent: a client still writing when the server answers and closes gets a
/// connection reset instead of the answer, so the rest of a body a little
/// or a lot over the limit is drained first. Past this, or past
/// [`DRAIN_WITHIN`], the answer goes anyway.
const DRAIN_AT_MOST: usize = 64 * 1024 * 1024;
/// Longest the rest of an over-limit body is drained.
const DRAIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// A POST body, at most `limit` bytes. An over-limit body is refused with
/// 413 after the rest of it is drained (bounded), so the client reads the
/// answer instead of a reset; one announced over the limit with `Expect:
/// 100-continue` is refused before the client sends it.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let too_large = ApiError::PayloadTooLarge { limit };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let waits_for_continue = headers
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if let Some(length) = announced
        && length > limit as u64
        && (waits_for_continue || length > DRAIN_AT_MOST as u64)
    {
        return Err(too_large);
    }
    let mut body = body;
    // A body in one frame (the usual case) is kept as it came, uncopied.
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut seen = 0_usize;
    let drain_deadline = tokio::time::Instant::now() + DRAIN_WITHIN;
    loop {
        let frame = if seen > limit {
            match tokio::time::timeout_at(drain_deadline, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => return Err(too_large),
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|error| ApiError::BadUserInput {
            message: format!("the request body could not be read: {error}"),
            field: None,
        })?;
        if let Ok(data) = frame.into_data() {
            seen = seen.saturating_add(data.len());
            if seen > limit {
                first = None;
                rest = Vec::new();
                if seen > DRAIN_AT_MOST {
                    return Err(too_large);
                }
            } else if first.is_none() && rest.is_empty() {
                first = Some(data);
            } else {
                if let Some(first) = first.take() {
                    rest.extend_from_slice(&first);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    if seen > limit {
        return Err(too_large);
    }
    Ok(first.unwrap_or_else(|| Bytes::from(rest)))
}

/// A GraphQL request as it came, before its document is settled: the
/// request, and the `documentId` it names its document by, if any.
pub(crate) struct Incoming {
    pub request: async_graphql::Request,
    pub document_id: Option<String>,
}

/// Whether a JSON message mentions `documentId` at all: a scan much
/// cheaper than a second parse of every body.
pub(crate) fn mentions_document_id(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, b"documentId").is_some()
}

/// The `documentId` of a JSON object that has one.
pub(crate) fn document_id(bytes: &[u8]) -> Result<Option<String>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Reference {
        #[serde(rename = "documentId")]
        document_id: Option<String>,
    }
    if !mentions_document_id(bytes) {
        return Ok(None);
    }
    serde_json::from_slice::<Reference>(bytes)
        .map(|reference| reference.document_id)
        .map_err(|_| ApiError::bad_input("documentId", "\"documentId\" must be a string"))
}

/// The GraphQL request in a POST body; a body that is not a JSON object
/// is refused.
pub(crate) fn from_body(bytes: &[u8]) -> Result<Incoming, ApiError> {
    // async-graphql's Request would also accept an array; only an object is
    // a GraphQL request (batches are not supported).
    let is_object = bytes.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{');
    let parsed = if is_object {
        serde_json::from_slice::<async_graphql::Request>(bytes).map_err(|error| error.to_string())
    } else {
        Err("expected a JSON object".to_owned())
    };
    let request = parsed.map_err(|error| ApiError::BadUserInput {
        message: format!(
            "the body must be a JSON object with a \"query\" string (and optional \"variables\", \"operationName\"): {error}"
        ),
        field: None,
    })?;
    Ok(Incoming {
        request,
        document_id: document_id(bytes)?,
    })
}

/// How a GraphQL request arrived over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpMethod {
    /// A query string.
    Get,
    /// A JSON body.
    Post,
}

/// What [`classify`] tells of the operation a request will run.
struct Classified {
    kind: OperationType,
    /// Its name in the document (a GraphQL name: never a value).
    name: Option<async_graphql::Name>,
    /// The database reads it will make at most.
    reads: usize,
}

/// The operation a request will run, if it parses.
fn classify(request: &mut async_graphql::Request) -> Option<Classified> {
    let name = request.operation_name.clone();
    let document = request.parsed_query().ok()?;
    let (name, operation) = match &document.operations {
        DocumentOperations::Single(operation) => Some((None, &operation.node)),
        DocumentOperations::Multiple(operations) => match name {
            Some(name) => operations
                .get_key_value(name.as_str())
                .map(|(name, operation)| (Some(name.clone()), &operation.node)),
            None if operations.len() == 1 => operations
                .iter()
                .next()
                .map(|(name, operation)| (Some(name.clone()), &operation.node)),
            None => None,
        },
    }?;
    Some(Classified {
        kind: operation.ty,
        name,
        reads: cost::database_reads(document, operation),
    })
}

/// A GraphQL request let in: its caller known, its operation classified.
pub(crate) struct Admitted {
    pub caller: Caller,
    pub request: async_graphql::Request,
    pub operation: Operation,
    pub kind: Option<OperationType>,
    /// The operation's name in the document, when it has one.
    pub name: Option<async_graphql::Name>,
    /// The `Idempotency-Key` header, when sent.
    pub idempotency_key: Option<String>,
}

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;

/// The `Idempotency-Key` header: any text of 1 to 255 characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let refused = || {
        ApiError::bad_input(
            "Idempotency-Key",
            format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters of text"),
        )
    };
    let key = value.to_str().map_err(|_| refused())?;
    if key.is_empty() || key.chars().count() > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(refused());
    }
    Ok(Some(key.to_owned()))
}

/// A mutation sent with an `Idempotency-Key`: whose key it is and what
/// identifies the request, so a retry can be told from a reuse.
struct IdempotentRequest {
    /// The token's subject, else its role: keys of two callers never meet.
    caller: String,
    key: String,
    fingerprint: String,
}

impl IdempotentRequest {
    fn new(caller: &Caller, key: String, request: &async_graphql::Request) -> Self {
        use sha2::Digest;
        let caller = match &caller.subject {
            Some(subject) => format!("sub:{subject}"),
            None => format!("role:{}", caller.role.as_str()),
        };
        let identity =
            serde_json::to_string(&(&request.operation_name, &request.query, &request.variables))
                .unwrap_or_default();
        let fingerprint = format!("{:x}", sha2::Sha256::digest(identity.as_bytes()));
        Self {
            caller,
            key,
            fingerprint,
        }
    }
}

/// Authenticates and classifies one GraphQL request, or refuses it with
/// the error's own status before anything runs.
pub(crate) async fn admit(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    incoming: Incoming,
    method: HttpMethod,
) -> Result<Admitted, Response> {
    let Incoming {
        mut request,
        document_id,
    } = incoming;
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("\u{0}"));
    let caller = app.keys.caller(authorization).await.map_err(refuse)?;
    let idempotency_key = idempotency_key(headers).map_err(refuse)?;
    if let Some(limiter) = &app.rate_limiter
        && let Err(wait) = limiter.check(&caller, client)
    {
        app.metrics.rate_limited();
        return Err(refuse(ApiError::RateLimited(wait)));
    }
    app.documents
        .settle(
            &mut request,
            document_id.as_deref(),
            caller.role,
            &app.metrics,
        )
        .map_err(refuse)?;
    if request.query.trim().is_empty() {
        return Err(refuse(ApiError::bad_input(
            "query",
            "the request has no \"query\" (nor a \"documentId\" or persisted-query hash)",
        )));
    }
    app.parsed_queries.prepare(&mut request);
    let classified = classify(&mut request);
    let kind = classified.as_ref().map(|classified| classified.kind);
    let operation = match kind {
        Some(OperationType::Mutation) if method == HttpMethod::Get => {
            return Err(refused_as(
                Operation::Mutation,
                ApiError::MethodNotAllowed("mutations must be sent with POST"),
            ));
        }
        Some(OperationType::Mutation) => Operation::Mutation,
        Some(OperationType::Query) => Operation::Query,
        Some(OperationType::Subscription) => Operation::Subscription,
        None => Operation::Unknown,
    };
    if let Some(reads) = classified.as_ref().map(|classified| classified.reads)
        && reads > app.max_db_reads
    {
        return Err(refused_as(
            operation,
            ApiError::BadUserInput {
                message: format!(
                    "this request would read the database {reads} times; at most {} reads are allowed per request (MAX_DB_READS_PER_REQUEST): split it, or ask for a field once",
                    app.max_db_reads
                ),
                field: None,
            },
        ));
    }
    Ok(Admitted {
        caller,
        request,
        operation,
        kind,
        name: classified.and_then(|classified| classified.name),
        idempotency_key,
    })
}

/// An executed request as one JSON response in `media`, with its status
/// (and `Retry-After` when the database was unavailable).
pub(crate) fn answer(
    response: async_graphql::Response,
    operation: Operation,
    outcome: Outcome,
    media: ResponseMedia,
) -> Response {
    let mut response = response;
    let headers = std::mem::take(&mut response.http_headers);
    let status = status_of(&response);
    let mut answer = if media == ResponseMedia::GraphqlResponseJson && request_error(&response) {
        // No `data` at all: the operation never ran.
        let status = match status {
            StatusCode::OK if has_code(&response, ErrorCode::InternalServerError) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            StatusCode::OK => StatusCode::BAD_REQUEST,
            status => status,
        };
        let body = if response.extensions.is_empty() {
            json!({ "errors": response.errors })
        } else {
            json!({ "errors": response.errors, "extensions": response.extensions })
        };
        media.label((status, Json(body)).into_response())
    } else {
        media.label((status, Json(response)).into_response())
    };
    // What a response asks to carry, e.g. `Idempotent-Replayed`.
    answer.headers_mut().extend(headers);
    if answer.status() == StatusCode::SERVICE_UNAVAILABLE {
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    answer
        .extensions_mut()
        .insert(RequestOutcome { operation, outcome });
    answer
}

/// Whether `response` is a request error: the operation never ran (its
/// document did not parse or validate, a variable did not coerce, or the
/// transaction could not end), so its errors name no field. An error
/// raised while executing always has the path of its field.
fn request_error(response: &async_graphql::Response) -> bool {
    response.data == async_graphql::Value::Null
        && !response.errors.is_empty()
        && response.errors.iter().all(|error| error.path.is_empty())
}

/// Whether any of `response`'s errors has `code`.
fn has_code(response: &async_graphql::Response, code: ErrorCode) -> bool {
    let code = async_graphql::Value::from(code.as_str());
    response.errors.iter().any(|error| {
        error
            .extensions
            .as_ref()
            .and_then(|extensions| extensions.get("code"))
            == Some(&code)
    })
}

/// The HTTP status of an executed request: 200, but 503 when the database
/// could not be reached for any of it, so that load balancers and clients
/// know to retry rather than take it for a bug.
pub(crate) fn status_of(response: &async_graphql::Response) -> StatusCode {
    if has_code(response, ErrorCode::ServiceUnavailable) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// The span of a GraphQL operation, by OpenTelemetry's conventions: named
/// by its type and name (`query Dashboard`), never by its document or
/// variables.
fn operation_span(kind: Option<OperationType>, name: Option<&str>) -> tracing::Span {
    let kind = match kind {
        Some(OperationType::Query) => "query",
        Some(OperationType::Mutation) => "mutation",
        Some(OperationType::Subscription) => "subscription",
        // Not parsed, or no operation to run: the schema says why.
        None => "unknown",
    };
    let span = tracing::debug_span!(
        "graphql.operation",
        otel.name = tracing::field::Empty,
        graphql.operation.type = kind,
        graphql.operation.name = tracing::field::Empty,
    );
    if !span.is_disabled() {
        match name {
            Some(name) => {
                let full = format!("{kind} {name}");
                span.record("otel.name", full.as_str());
                span.record("graphql.operation.name", name);
            }
            None => {
                span.record("otel.name", kind);
            }
        }
    }
    span
}

/// Runs an admitted query or mutation in one request transaction, as its
/// caller, within the request timeout, in the operation's span; with the
/// time its database calls took.
pub(crate) async fn run(
    app: &AppState,
    admitted: Admitted,
) -> Result<(async_graphql::Response, Outcome, DbTime), Response> {
    let span = operation_span(admitted.kind, admitted.name.as_deref());
    run_in_transaction(app, admitted).instrument(span).await
}

async fn run_in_transaction(
    app: &AppState,
    admitted: Admitted,
) -> Result<(async_graphql::Response, Outcome, DbTime), Response> {
    let Admitted {
        caller,
        request,
        operation,
        kind,
        name: _,
        idempotency_key,
    } = admitted;
    let access = match kind {
        Some(OperationType::Mutation) => Access::Write,
        _ => Access::Query,
    };
    // Only writers' mutations are kept: anything else changes nothing
    // (or is refused), so running it again is already safe.
    let idempotent = match idempotency_key {
        Some(key) if access == Access::Write && caller.may_write().is_ok() => {
            Some(IdempotentRequest::new(&caller, key, &request))
        }
        _ => None,
    };
    let db = Arc::new(RequestDb::new(
        app.pool.clone(),
        caller.identity(),
        access,
        app.request_timeout,
    ));
    if let Some(idempotent) = &idempotent {
        let claimed = tokio::time::timeout(app.request_timeout, claim(&db, idempotent)).await;
        match claimed {
            Err(_) => return Err(refused_as(operation, ApiError::Timeout)),
            Ok(Err(error)) => return Err(refused_as(operation, error)),
            Ok(Ok(Some(replay))) => {
                let outcome = if replay.errors.is_empty() {
                    Outcome::Ok
                } else {
                    Outcome::Error
                };
                return Ok((replay, outcome, DbTime(db.time_spent())));
            }
            Ok(Ok(None)) => {}
        }
    }
    let context = OperationContext::request(caller, db.clone());
    let executed = tokio::time::timeout(
        app.request_timeout,
        app.schema.execute(request.data(context)),
    )
    .await;
    let Ok(mut response) = executed else {
        return Err(refused_as(operation, ApiError::Timeout));
    };
    validate::fill_codes(&mut response);
    if let Some(idempotent) = &idempotent {
        // An answer to retry (the database was unavailable) is not kept:
        // the transaction rolls back with the key, and a retry runs anew.
        if status_of(&response) != StatusCode::OK {
            return Ok((response, Outcome::Error, DbTime(db.time_spent())));
        }
        if let Err(error) = record(&db, idempotent, &response).await {
            return Err(refused_as(operation, error));
        }
    }
    if let Err(error) = db.commit().await {
        response = async_graphql::Response::from_errors(vec![
            async_graphql::Error::from(error).into_server_error(Default::default()),
        ]);
        validate::fill_codes(&mut response);
    }
    let outcome = if response.errors.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Error
    };
    Ok((response, outcome, DbTime(db.time_spent())))
}

/// Claims the request's key in its transaction: `None` when the request
/// is to run; the first answer when it is a retry; IDEMPOTENCY_KEY_REUSED
/// when the key came with a different request.
async fn claim(
    db: &RequestDb,
    idempotent: &IdempotentRequest,
) -> Result<Option<async_graphql::Response>, ApiError> {
    let first = {
        let txn = db.txn().await?;
        idempotency::claim(
            &*txn,
            &idempotent.caller,
            &idempotent.key,
            &idempotent.fingerprint,
        )
        .await
        .map_err(|error| ApiError::from_db(error, ""))?
    };
    let Some(first) = first else {
        return Ok(None);
    };
    if first.first_fingerprint != idempotent.fingerprint {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let mut answer: async_graphql::Response = first
        .first_answer
        .and_then(|answer| serde_json::from_value(answer).ok())
        .ok_or_else(|| ApiError::internal("an idempotency key without its answer"))?;
    answer.http_headers.insert(
        "idempotent-replayed",
        header::HeaderValue::from_static("true"),
    );
    Ok(Some(answer))
}

/// Keeps the answer under the request's key, before the commit.
async fn record(
    db: &RequestDb,
    idempotent: &IdempotentRequest,
    response: &async_graphql::Response,
) -> Result<(), ApiError> {
    let answer = serde_json::to_value(response).map_err(ApiError::internal)?;
    let txn = db.txn().await?;
    idempotency::record(&*txn, &idempotent.caller, &idempotent.key, answer)
        .await
        .map_err(|error| ApiError::from_db(error, ""))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn refusals_to_retry_say_when() {
        let retry_after = |error| {
            refuse(error)
                .headers()
                .get(header::RETRY_AFTER)
                .map(|value| value.to_str().unwrap_or_default().to_owned())
        };
        assert_eq!(retry_after(ApiError::Unavailable).as_deref(), Some("1"));
        assert_eq!(
            retry_after(ApiError::RateLimited(Duration::from_millis(2500))).as_deref(),
            Some("3")
        );
        assert_eq!(retry_after(ApiError::Unauthenticated), None);
        assert_eq!(
            refuse(ApiError::Unavailable).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
