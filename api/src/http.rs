//! HTTP routes: `/graphql` (POST, GET), GraphiQL at `/`, `/healthz`,
//! `/readyz`, `/metrics`.
//!
//! The GraphQL handlers are written here rather than taken from
//! async-graphql-axum (not a dependency), whose extractor ignores the body
//! limit, runs mutations over GET and answers malformed JSON in plain text.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::parser::types::{DocumentOperations, OperationType};
use axum::body::{Body, to_bytes};
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;

use crate::auth::TokenKeys;
use crate::config::WebSocketConfig;
use crate::cors::{self, CorsOrigins};
use crate::db::{Access, Pool, RequestDb};
use crate::error::{ApiError, ErrorCode};
use crate::feed::Feed;
use crate::graphql::documents::DocumentCache;
use crate::graphql::{AppSchema, RequestContext};
use crate::metrics::{Metrics, Operation, Outcome};

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
    /// Parsed queries, by text.
    pub documents: Arc<DocumentCache>,
    /// Origins browsers may call from.
    pub cors: CorsOrigins,
}

/// The service's routes.
pub fn router(state: AppState) -> Router {
    let cors = state.cors.clone();
    let routes = Router::new()
        .route("/", get(graphiql))
        .route("/graphql", get(graphql_get_or_websocket).post(graphql_post))
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
/// (HTTP or the WebSocket upgrade).
pub(crate) fn refuse(status: StatusCode, error: ApiError) -> Response {
    let body = json!({
        "errors": [{
            "message": error.message(),
            "extensions": { "code": error.code().as_str() },
        }]
    });
    (status, Json(body)).into_response()
}

async fn graphql_post(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let bytes = match to_bytes(body, app.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            app.metrics
                .record_request(Operation::Unknown, Outcome::Rejected, 0.0);
            let message = format!("the request body exceeds {} bytes", app.max_body_bytes);
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                ApiError::BadUserInput {
                    message,
                    field: None,
                },
            );
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
    let request = match parsed {
        Ok(request) => request,
        Err(error) => {
            app.metrics
                .record_request(Operation::Unknown, Outcome::Rejected, 0.0);
            let message = format!(
                "the body must be a JSON object with a \"query\" string (and optional \"variables\", \"operationName\"): {error}"
            );
            return refuse(
                StatusCode::BAD_REQUEST,
                ApiError::BadUserInput {
                    message,
                    field: None,
                },
            );
        }
    };
    execute(app, &headers, request, false, started).await
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
            Ok(upgrade) => crate::ws::upgrade(app, &parts.headers, upgrade).await,
            Err(rejection) => rejection.into_response(),
        };
    }
    graphql_get(app, parts.headers, parts.uri.query()).await
}

async fn graphql_get(app: AppState, headers: HeaderMap, query: Option<&str>) -> Response {
    let started = Instant::now();
    match async_graphql::http::parse_query_string(query.unwrap_or_default()) {
        Ok(request) => execute(app, &headers, request, true, started).await,
        Err(error) => {
            app.metrics
                .record_request(Operation::Unknown, Outcome::Rejected, 0.0);
            let message = format!("bad query string: {error}");
            refuse(
                StatusCode::BAD_REQUEST,
                ApiError::BadUserInput {
                    message,
                    field: None,
                },
            )
        }
    }
}

/// The type of the operation a request will run, if it parses.
fn operation_type(request: &mut async_graphql::Request) -> Option<OperationType> {
    let name = request.operation_name.clone();
    let document = request.parsed_query().ok()?;
    match &document.operations {
        DocumentOperations::Single(operation) => Some(operation.node.ty),
        DocumentOperations::Multiple(operations) => match name {
            Some(name) => operations
                .get(name.as_str())
                .map(|operation| operation.node.ty),
            None if operations.len() == 1 => operations.values().next().map(|op| op.node.ty),
            None => None,
        },
    }
}

async fn execute(
    app: AppState,
    headers: &HeaderMap,
    mut request: async_graphql::Request,
    via_get: bool,
    started: Instant,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|value| value.to_str().unwrap_or("\u{0}"));
    if request.query.trim().is_empty() {
        app.metrics
            .record_request(Operation::Unknown, Outcome::Rejected, 0.0);
        let error = ApiError::bad_input("query", "the request has no \"query\"");
        return refuse(StatusCode::BAD_REQUEST, error);
    }
    let caller = match app.keys.caller(authorization).await {
        Ok(caller) => caller,
        Err(error) => {
            app.metrics
                .record_request(Operation::Unknown, Outcome::Rejected, 0.0);
            return refuse(StatusCode::UNAUTHORIZED, error);
        }
    };
    app.documents.prepare(&mut request);
    let kind = operation_type(&mut request);
    let operation = match kind {
        Some(OperationType::Mutation) => Operation::Mutation,
        Some(OperationType::Query) => Operation::Query,
        _ => Operation::Unknown,
    };
    let refusal = match kind {
        Some(OperationType::Mutation) if via_get => Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "mutations must be sent with POST",
        )),
        Some(OperationType::Subscription) => Some((
            StatusCode::BAD_REQUEST,
            "subscriptions need a WebSocket connection to /graphql",
        )),
        _ => None,
    };
    if let Some((status, message)) = refusal {
        app.metrics
            .record_request(operation, Outcome::Rejected, 0.0);
        let error = ApiError::BadUserInput {
            message: message.into(),
            field: None,
        };
        return refuse(status, error);
    }

    let db = Arc::new(RequestDb::new(
        app.pool.clone(),
        &caller,
        if kind == Some(OperationType::Mutation) {
            Access::Write
        } else {
            Access::Read
        },
        app.request_timeout,
    ));
    let context = RequestContext {
        caller,
        now: Utc::now(),
        db: db.clone(),
        failures: Default::default(),
    };
    let executed = tokio::time::timeout(
        app.request_timeout,
        app.schema.execute(request.data(context)),
    )
    .await;
    let mut response = match executed {
        Ok(response) => response,
        Err(_) => {
            app.metrics.record_request(
                operation,
                Outcome::Rejected,
                started.elapsed().as_secs_f64(),
            );
            return refuse(StatusCode::GATEWAY_TIMEOUT, ApiError::Timeout);
        }
    };
    // The schema has let go of its handle; commit what the request did.
    let committed = match Arc::try_unwrap(db) {
        Ok(db) => db.commit().await,
        Err(_) => Err(ApiError::internal(
            "request transaction still shared after execution",
        )),
    };
    if let Err(error) = committed {
        response = async_graphql::Response::from_errors(vec![
            async_graphql::Error::from(error).into_server_error(Default::default()),
        ]);
    }
    for error in &mut response.errors {
        // Parse, validation and limit errors come from async-graphql
        // without a code: they are all the client's to fix.
        let extensions = error.extensions.get_or_insert_with(Default::default);
        if extensions.get("code").is_none() {
            extensions.set("code", ErrorCode::BadUserInput.as_str());
        }
    }
    let outcome = if response.errors.is_empty() {
        Outcome::Ok
    } else {
        Outcome::Error
    };
    app.metrics
        .record_request(operation, outcome, started.elapsed().as_secs_f64());
    Json(response).into_response()
}

async fn graphiql() -> Html<&'static str> {
    Html(include_str!("graphiql.html"))
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
