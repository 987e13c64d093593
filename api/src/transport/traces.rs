//! What every GraphQL HTTP request is observed by: its server span, by
//! OpenTelemetry's conventions for HTTP servers, the child of the caller's
//! W3C `traceparent` (and `tracestate`); and, when enabled, its
//! `Server-Timing` header (`db`, `total`), so a browser's developer tools
//! show where the request's time went.

use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Time a request's database calls took, left in its response for
/// [`observe`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbTime(pub Duration);

/// The path the observed routes serve (the only one: `/graphql`), as the
/// span's `url.path` and name say it.
const PATH: &str = "/graphql";

/// Whether the server spans would be recorded: traces are on (or the log
/// filter asks for these DEBUG spans).
pub(crate) fn enabled() -> bool {
    tracing::enabled!(
        kind: tracing::metadata::Kind::SPAN,
        target: "vantage_sync::transport::traces",
        tracing::Level::DEBUG
    )
}

/// Runs a request in its server span and, with `server_timing`, writes
/// its `Server-Timing`.
pub(crate) async fn observe(
    State(server_timing): State<bool>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let span = server_span(request.method(), request.headers());
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    if server_timing {
        let db = response
            .extensions()
            .get::<DbTime>()
            .map(|DbTime(db)| format!("db;dur={:.3}, ", millis(*db)))
            .unwrap_or_default();
        let timing = format!("{db}total;dur={:.3}", millis(started.elapsed()));
        if let Ok(value) = HeaderValue::from_str(&timing) {
            response.headers_mut().insert("server-timing", value);
        }
    }
    response
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The request's server span, the child of the trace context its headers
/// carry; disabled (and nothing read) when traces are off.
fn server_span(method: &Method, headers: &HeaderMap) -> tracing::Span {
    // Named by method and route; a method the conventions do not know is
    // `_OTHER` (and the span `HTTP`), so a client cannot coin names.
    let (method, name) = match *method {
        Method::GET => ("GET", "GET /graphql"),
        Method::POST => ("POST", "POST /graphql"),
        Method::OPTIONS => ("OPTIONS", "OPTIONS /graphql"),
        Method::HEAD => ("HEAD", "HEAD /graphql"),
        _ => ("_OTHER", "HTTP"),
    };
    let span = tracing::debug_span!(
        "http.server",
        otel.name = name,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        url.path = PATH,
        http.route = PATH,
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        // A context without a valid traceparent leaves the span a root.
        let _ = span.set_parent(parent);
    }
    span
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}
