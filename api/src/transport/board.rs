//! The status board at `/`: a page, its style sheet and its script,
//! hand-written and compiled into the binary. Nothing is fetched from
//! anywhere else; the page talks only to `/graphql` on its own origin.

use axum::response::Response;

use super::embedded;

/// Only this origin, for scripts, styles and requests alike; nothing may
/// frame the page, post its forms elsewhere or change its base URL.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the board.
pub async fn page() -> Response {
    asset(
        include_bytes!("board/board.html"),
        "text/html; charset=utf-8",
    )
}

/// `GET /board.css`.
pub async fn style() -> Response {
    asset(include_bytes!("board/board.css"), "text/css; charset=utf-8")
}

/// `GET /board.js`.
pub async fn script() -> Response {
    asset(
        include_bytes!("board/board.js"),
        "text/javascript; charset=utf-8",
    )
}

/// Revalidated on every load, so a new server version is picked up.
fn asset(body: &'static [u8], content_type: &'static str) -> Response {
    embedded(body, content_type, CONTENT_SECURITY_POLICY, "no-cache")
}
