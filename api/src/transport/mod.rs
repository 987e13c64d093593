//! Transports: bytes in, a GraphQL request and its context out, a response
//! (or a stream of them) back to bytes. The schema and the database are
//! the same for every transport (`graphql::OperationContext`); admitting,
//! running and answering a request is one path (`request`) that plain
//! HTTP (`http`), SSE (`sse`) and WebSocket (`ws`) share.
//!
//! The GraphQL handlers are written here rather than taken from
//! async-graphql-axum (not a dependency), whose extractor ignores the body
//! limit, runs mutations over GET and answers malformed JSON in plain text
//! (`docs/adr/0003`).

pub mod board;
pub mod cors;
pub mod graphiql;
pub mod http;
pub mod listener;
pub mod media;
pub mod operator;
pub mod outbox;
pub mod rate_limit;
pub mod request;
pub mod sse;
pub mod traces;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::auth::TokenKeys;
use crate::db::Pool;
use crate::error::ApiError;
use crate::feed::Feed;
use crate::graphql::AppSchema;
use crate::graphql::documents::PersistedDocuments;
use crate::graphql::live::LiveGroups;
use crate::graphql::parsed_queries::ParsedQueryCache;
use crate::metrics::Metrics;
use cors::CorsOrigins;
use listener::ClientAddr;
use outbox::{Outbox, StreamOutbox};
use rate_limit::RateLimiter;
use request::{HttpMethod, refuse};
use ws::WebSocketConfig;

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
    /// Live operations, grouped by what they render.
    pub live: Arc<LiveGroups>,
    /// WebSocket transport settings.
    pub websocket: WebSocketConfig,
    /// Becomes true when the server stops: WebSockets close, SSE streams end.
    pub shutting_down: tokio::sync::watch::Receiver<bool>,
    /// True from the stop signal on: `/readyz` answers 503 so load
    /// balancers send nothing new, while requests are still served.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Longest a request may run.
    pub request_timeout: Duration,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// Most database reads one request may make.
    pub max_db_reads: usize,
    /// Requests per caller, when limited.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// Parsed queries, by text.
    pub parsed_queries: Arc<ParsedQueryCache>,
    /// Origins browsers may call from.
    pub cors: CorsOrigins,
    /// Whether GraphQL HTTP answers carry `Server-Timing`.
    pub server_timing: bool,
    /// Documents sent by reference: persisted queries, trusted documents.
    pub documents: Arc<PersistedDocuments>,
}

/// The service's routes.
pub fn router(state: AppState) -> Router {
    let cors = state.cors.clone();
    let graphql = Router::new()
        .route("/graphql", get(graphql_get_or_websocket).post(graphql_post))
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            request::record_requests,
        ));
    // Outermost: the server span covers the request's metrics too. Left
    // out when there is nothing to observe (no traces, no Server-Timing):
    // a layer costs every request even when it does nothing.
    let graphql = if state.server_timing || traces::enabled() {
        graphql.route_layer(axum::middleware::from_fn_with_state(
            state.server_timing,
            traces::observe,
        ))
    } else {
        graphql
    };
    let routes = Router::new()
        .merge(graphql)
        .route("/", get(board::page))
        .route("/board.css", get(board::style))
        .route("/board.js", get(board::script))
        .merge(graphiql::routes())
        .route("/healthz", get(operator::healthz))
        .route("/readyz", get(operator::readyz))
        .route("/metrics", get(operator::metrics))
        // One span per request (method, path) with status and latency
        // events, filtered by RUST_LOG (e.g. `tower_http=debug`).
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state);
    match cors.layer() {
        Some(layer) => routes
            .layer(layer)
            .layer(axum::middleware::from_fn_with_state(
                cors,
                cors::enforce_allowed_origins,
            )),
        None => routes,
    }
}

/// `POST /graphql`: a JSON body; answered as an event stream when the
/// client accepts one (`sse`), else as one JSON response (`http`).
async fn graphql_post(
    State(app): State<AppState>,
    client: Option<axum::Extension<ClientAddr>>,
    stream_outbox: Option<axum::Extension<StreamOutbox>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let client = client.map(|axum::Extension(addr)| addr.0.ip());
    let media = media::ResponseMedia::negotiate(&headers);
    if !media::declared_json(&headers) {
        return media.label(refuse(ApiError::UnsupportedMediaType));
    }
    let request = match request::read_body(&headers, body, app.max_body_bytes).await {
        Ok(bytes) => request::from_body(&bytes),
        Err(error) => Err(error),
    };
    let request = match request {
        Ok(request) => request,
        Err(error) => return media.label(refuse(error)),
    };
    if sse::wanted(&headers) {
        match request::admit(&app, &headers, client, request, HttpMethod::Post).await {
            Ok(admitted) => {
                let outbox = stream_outbox.map(|axum::Extension(outbox)| outbox);
                sse::respond(app, &headers, admitted, outbox).await
            }
            Err(refused) => refused,
        }
    } else {
        http::execute(&app, &headers, client, request, HttpMethod::Post, media).await
    }
}

/// `GET /graphql`: a WebSocket upgrade (`ws`), or a query in the query
/// string (`http`).
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
                let outbox = parts.extensions.get::<Arc<Outbox>>().cloned();
                ws::upgrade(app, &parts.headers, client, outbox, upgrade).await
            }
            Err(rejection) => rejection.into_response(),
        };
    }
    let media = media::ResponseMedia::negotiate(&parts.headers);
    match http::from_query_string(parts.uri.query().unwrap_or_default()) {
        Ok(incoming) => {
            let client = parts.extensions.get::<ClientAddr>().map(|addr| addr.0.ip());
            let mut answer = http::execute(
                &app,
                &parts.headers,
                client,
                incoming,
                HttpMethod::Get,
                media,
            )
            .await;
            // Every answer is the caller's own (no role reads anything
            // without a token): no cache, shared or private, may keep it.
            answer
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            answer
        }
        Err(error) => media.label(refuse(error)),
    }
}

/// A page or asset compiled into the binary, with its content security
/// policy, its cache rule, and no sniffing or referrers.
pub(crate) fn embedded(
    body: &'static [u8],
    content_type: &'static str,
    policy: &'static str,
    cache: &'static str,
) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, policy),
        (header::CACHE_CONTROL, cache),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
