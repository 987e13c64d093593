//! What operators and orchestrators ask: `/healthz` (the process
//! answers), `/readyz` (it can serve: database, keys, live feed) and
//! `/metrics` (Prometheus text).

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Liveness: the process answers.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: not leaving, the database answers, the token keys are
/// loaded and the live feed is connected.
pub async fn readyz(State(app): State<AppState>) -> Response {
    if app.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "leaving").into_response();
    }
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

/// The metrics in Prometheus text format.
pub async fn metrics(State(app): State<AppState>) -> Response {
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
