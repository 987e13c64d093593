//! Transports: bytes in, a GraphQL request and its context out, a response
//! (or a stream of them) back to bytes. The schema and the database are
//! the same for every transport (`graphql::OperationContext`).

pub mod board;
pub mod cors;
pub mod graphiql;
pub mod http;
pub mod listener;
pub mod sse;
pub mod ws;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

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
