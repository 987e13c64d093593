//! The status board at `/` (SPEC 7): a page, its style sheet and its script,
//! hand-written and compiled into the binary. Nothing is fetched from
//! anywhere else; the page talks only to `/graphql` on its own origin.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

/// Only this origin, for scripts, styles and requests alike; nothing may
/// frame the page, post its forms elsewhere or change its base URL.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the board.
pub async fn page() -> Response {
    asset(include_str!("board/board.html"), "text/html; charset=utf-8")
}

/// `GET /board.css`.
pub async fn style() -> Response {
    asset(include_str!("board/board.css"), "text/css; charset=utf-8")
}

/// `GET /board.js`.
pub async fn script() -> Response {
    asset(
        include_str!("board/board.js"),
        "text/javascript; charset=utf-8",
    )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Revalidated on every load, so a new server version is picked up.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
