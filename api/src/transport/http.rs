//! HTTP routes: `/graphql` (POST, GET; SSE in `sse`), the status board at
//! `/`, GraphiQL at `/graphiql`, `/healthz`, `/readyz`, `/metrics`.
//!
//! The GraphQL handlers are written here rather than taken from
//! async-graphql-axum (not a dependency), whose extractor ignores the body
//! limit, runs mutations over GET and answers malformed JSON in plain text.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::parser::types::{DocumentOperations, OperationType};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::auth::{Caller, TokenKeys};
use crate::db::{Access, Pool, RequestDb};
use crate::error::{ApiError, ErrorCode, retry_after_secs};
use crate::feed::Feed;
use crate::graphql::documents::DocumentCache;
use crate::graphql::{AppSchema, OperationContext, cost};
use crate::infra::config::WebSocketConfig;
use crate::infra::metrics::{Metrics, Operation, Outcome};
use crate::infra::rate_limit::RateLimiter;
use crate::transport::board;
use crate::transport::cors::{self, CorsOrigins};
use crate::transport::listener::ClientAddr;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The GraphQL schema.
    pub schema: AppSchema,
    /// The database pool.
    pub pool: Pool,
    /// Token verification.
    pub keys: TokenKeys,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// The live feed.
    pub feed: Arc<Feed>,
    /// WebSocket transport settings.
    pub websocket: WebSocketConfig,
    /// Becomes true when the server starts shutting down.
    pub shutting_down: tokio::sync::watch::Receiver<bool>,
    /// Longest a request may run.
    pub request_timeout: Duration,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Most database reads one request may make.
    pub max_db_reads: usize,
    /// Requests per caller, when limited.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// Parsed queries, by text.
    pub documents: Arc<DocumentCache>,
    /// Origins browsers may call from.
    pub cors: CorsOrigins,
}

/// The service's routes.
pub fn router(state: AppState) -> Router {
    let cors = state.cors.clone();
    let graphql = Router::new()
        .route("/graphql", get(graphql_get_or_websocket).post(graphql_post))
        .route_layer(DefaultBodyLimit::max(state.max_body_bytes))
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            record_requests,
        ));
    let routes = Router::new()
        .merge(graphql)
        .route("/", get(board::page))
        .route("/board.css", get(board::style))
        .route("/board.js", get(board::script))
        .merge(crate::transport::graphiql::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // One span per request (method, path) with status and latency
        // events, filtered by RUST_LOG (e.g. `tower_http=debug`).
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state);
    match cors.layer() {
        Some(layer) => routes
            .layer(layer)
            .layer(axum::middleware::from_fn_with_state(cors, cors::fix_up)),
        None => routes,
    }
}

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
    if let ApiError::RateLimited(wait) = error {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(retry_after_secs(wait)),
        );
    }
    response
}

/// What a GraphQL request ran and how it ended, left in the response for
/// [`record_requests`]. A response without it was refused before its
/// operation was known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ran {
    pub operation: Operation,
    pub outcome: Outcome,
}

/// Counts and times every GraphQL HTTP request (not WebSocket upgrades),
/// by what the handler says it ran.
async fn record_requests(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let ran = response.extensions().get::<Ran>().copied();
        let Ran { operation, outcome } = ran.unwrap_or(Ran {
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
    refused.extensions_mut().insert(Ran {
        operation,
        outcome: Outcome::Rejected,
    });
    refused
}

async fn graphql_post(
    State(app): State<AppState>,
    client: Option<axum::Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let client = client.map(|axum::Extension(addr)| addr.0.ip());
    // The limit is axum's (DefaultBodyLimit on the route); its refusal
    // becomes a GraphQL error like every other.
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refuse(ApiError::PayloadTooLarge {
                limit: app.max_body_bytes,
            });
        }
        Err(rejection) => {
            return refuse(ApiError::BadUserInput {
                message: format!("the request body could not be read: {rejection}"),
                field: None,
            });
        }
    };
    // async-graphql's Request would also accept an array; only an object is
    // a GraphQL request (batches are not supported).
    let is_object = bytes.iter().find(|byte| !byte.is_ascii_whitespace()) == Some(&b'{');
    let parsed = if is_object {
        serde_json::from_slice::<async_graphql::Request>(&bytes).map_err(|error| error.to_string())
    } else {
        Err("expected a JSON object".to_owned())
    };
    match parsed {
        Ok(request) if crate::transport::sse::wanted(&headers) => {
            match admit(&app, &headers, client, request, Method::Post).await {
                Ok(admitted) => crate::transport::sse::respond(app, &headers, admitted).await,
                Err(refused) => refused,
            }
        }
        Ok(request) => execute(&app, &headers, client, request, Method::Post).await,
        Err(error) => refuse(ApiError::BadUserInput {
            message: format!(
                "the body must be a JSON object with a \"query\" string (and optional \"variables\", \"operationName\"): {error}"
            ),
            field: None,
        }),
    }
}

async fn graphql_get_or_websocket(State(app): State<AppState>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let wants_websocket = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    if wants_websocket {
        return match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => {
                let client = parts.extensions.get::<ClientAddr>().map(|addr| addr.0.ip());
                crate::transport::ws::upgrade(app, &parts.headers, client, upgrade).await
            }
            Err(rejection) => rejection.into_response(),
        };
    }
    match async_graphql::http::parse_query_string(parts.uri.query().unwrap_or_default()) {
        Ok(request) => {
            let client = parts.extensions.get::<ClientAddr>().map(|addr| addr.0.ip());
            execute(&app, &parts.headers, client, request, Method::Get).await
        }
        Err(error) => refuse(ApiError::BadUserInput {
            message: format!("bad query string: {error}"),
            field: None,
        }),
    }
}

/// How a GraphQL request arrived over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
}

/// The type of the operation a request will run and the database reads it
/// will make at most, if it parses.
fn classify(request: &mut async_graphql::Request) -> Option<(OperationType, usize)> {
    let name = request.operation_name.clone();
    let document = request.parsed_query().ok()?;
    let operation = match &document.operations {
        DocumentOperations::Single(operation) => Some(&operation.node),
        DocumentOperations::Multiple(operations) => match name {
            Some(name) => operations
                .get(name.as_str())
                .map(|operation| &operation.node),
            None if operations.len() == 1 => operations.values().next().map(|op| &op.node),
            None => None,
        },
    }?;
    Some((operation.ty, cost::database_reads(document, operation)))
}

/// A GraphQL request let in: its caller known, its operation classified.
pub(crate) struct Admitted {
    pub caller: Caller,
    pub request: async_graphql::Request,
    pub operation: Operation,
    pub kind: Option<OperationType>,
}

/// Authenticates and classifies one GraphQL request, or refuses it with
/// the error's own status before anything runs.
async fn admit(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    mut request: async_graphql::Request,
    method: Method,
) -> Result<Admitted, Response> {
    if request.query.trim().is_empty() {
        return Err(refuse(ApiError::bad_input(
            "query",
            "the request has no \"query\"",
        )));
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("\u{0}"));
    let caller = app.keys.caller(authorization).await.map_err(refuse)?;
    if let Some(limiter) = &app.rate_limiter
        && let Err(wait) = limiter.check(&caller, client)
    {
        app.metrics.rate_limited();
        return Err(refuse(ApiError::RateLimited(wait)));
    }
    app.documents.prepare(&mut request);
    let classified = classify(&mut request);
    let kind = classified.map(|(kind, _)| kind);
    let operation = match kind {
        Some(OperationType::Mutation) if method == Method::Get => {
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
    if let Some((_, reads)) = classified
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
    })
}

/// Answers a query or mutation as one JSON response.
async fn execute(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    request: async_graphql::Request,
    method: Method,
) -> Response {
    let admitted = match admit(app, headers, client, request, method).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    if admitted.kind == Some(OperationType::Subscription) {
        return refuse(ApiError::BadUserInput {
            message: "subscriptions need a WebSocket connection to /graphql, or a POST with \
                      Accept: text/event-stream"
                .into(),
            field: None,
        });
    }
    let operation = admitted.operation;
    match run(app, admitted).await {
        Ok((response, outcome)) => answer(response, operation, outcome),
        Err(refused) => refused,
    }
}

/// An executed request as one JSON response, with its status (and
/// `Retry-After` when the database was unavailable).
pub(crate) fn answer(
    response: async_graphql::Response,
    operation: Operation,
    outcome: Outcome,
) -> Response {
    let mut answer = (status_of(&response), Json(response)).into_response();
    if answer.status() == StatusCode::SERVICE_UNAVAILABLE {
        answer
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    answer.extensions_mut().insert(Ran { operation, outcome });
    answer
}

/// The HTTP status of an executed request: 200, but 503 when the database
/// could not be reached for any of it, so that load balancers and clients
/// know to retry rather than take it for a bug.
pub(crate) fn status_of(response: &async_graphql::Response) -> StatusCode {
    let unavailable = response.errors.iter().any(|error| {
        error
            .extensions
            .as_ref()
            .and_then(|extensions| extensions.get("code"))
            == Some(&async_graphql::Value::from(
                ErrorCode::ServiceUnavailable.as_str(),
            ))
    });
    if unavailable {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// Runs an admitted query or mutation in one request transaction, as its
/// caller, within the request timeout.
pub(crate) async fn run(
    app: &AppState,
    admitted: Admitted,
) -> Result<(async_graphql::Response, Outcome), Response> {
    let Admitted {
        caller,
        request,
        operation,
        kind,
    } = admitted;
    let access = match kind {
        Some(OperationType::Mutation) => Access::Write,
        _ => Access::Read,
    };
    let db = Arc::new(RequestDb::new(
        app.pool.clone(),
        &caller,
        access,
        app.request_timeout,
    ));
    let context = OperationContext::request(caller, db.clone());
    let executed = tokio::time::timeout(
        app.request_timeout,
        app.schema.execute(request.data(context)),
    )
    .await;
    let Ok(mut response) = executed else {
        return Err(refused_as(operation, ApiError::Timeout));
    };
    if let Err(error) = db.commit().await {
        response = async_graphql::Response::from_errors(vec![
            async_graphql::Error::from(error).into_server_error(Default::default()),
        ]);
    }
    fill_codes(&mut response);
    let outcome = if response.errors.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Error
    };
    Ok((response, outcome))
}

/// Gives every error a code: parse, validation and limit errors come from
/// async-graphql without one, and they are all the client's to fix.
pub(crate) fn fill_codes(response: &mut async_graphql::Response) {
    for error in &mut response.errors {
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", ErrorCode::BadUserInput.as_str());
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(app): State<AppState>) -> Response {
    let ping = tokio::time::timeout(Duration::from_secs(2), app.pool.ping()).await;
    match ping {
        Ok(Ok(())) if !app.keys.is_ready() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "JSON Web Key Set not loaded yet",
        )
            .into_response(),
        Ok(Ok(())) if app.feed.is_live() => (StatusCode::OK, "ready").into_response(),
        Ok(Ok(())) => (StatusCode::SERVICE_UNAVAILABLE, "live feed reconnecting").into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    let pool = app.pool.sqlx();
    let text = app.metrics.render(pool.size(), pool.num_idle());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
