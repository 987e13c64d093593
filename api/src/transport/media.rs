//! The media types of GraphQL over HTTP: what a POST body must be
//! declared as, and what an answer is labelled.
//!
//! `application/json` is the default; a client that accepts
//! `application/graphql-response+json` (the GraphQL over HTTP
//! specification's own type) gets it, and with it statuses that tell a
//! request error (the document does not parse or validate, a variable does
//! not coerce: 400, no `data`) from an executed one (200).

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;

/// `application/graphql-response+json`, as answers carry it.
const GRAPHQL_RESPONSE_JSON: &str = "application/graphql-response+json; charset=utf-8";

/// The media type of a GraphQL answer over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseMedia {
    /// `application/json`: every well-formed request is answered 200.
    Json,
    /// `application/graphql-response+json`: request errors are 4xx,
    /// without `data`.
    GraphqlResponseJson,
}

impl ResponseMedia {
    /// What `Accept` asks for: the specification's type when it is
    /// accepted at least as readily as `application/json` (a wildcard
    /// counts for `application/json`), else `application/json`.
    pub(crate) fn negotiate(headers: &HeaderMap) -> Self {
        let mut graphql_response = 0.0_f32;
        let mut json = 0.0_f32;
        for range in headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
        {
            let mut parts = range.split(';');
            let kind = parts.next().unwrap_or_default().trim();
            let quality = parts
                .filter_map(|parameter| parameter.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if kind.eq_ignore_ascii_case("application/graphql-response+json") {
                graphql_response = graphql_response.max(quality);
            } else if kind.eq_ignore_ascii_case("application/json")
                || kind == "*/*"
                || kind.eq_ignore_ascii_case("application/*")
            {
                json = json.max(quality);
            }
        }
        if graphql_response > 0.0 && graphql_response >= json {
            Self::GraphqlResponseJson
        } else {
            Self::Json
        }
    }

    /// Gives `response` this media type (it is JSON either way).
    pub(crate) fn label(self, mut response: Response) -> Response {
        if self == Self::GraphqlResponseJson
            && response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|value| value.as_bytes().starts_with(b"application/json"))
        {
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(GRAPHQL_RESPONSE_JSON),
            );
        }
        response
    }
}

/// Whether a POST body is declared JSON (`application/json`, any
/// parameters). A body declared otherwise, or not at all, is refused: the
/// specification asks for a 4xx, and a browser sends a form or plain text
/// cross-origin without asking CORS first, but never JSON.
pub(crate) fn declared_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
}
