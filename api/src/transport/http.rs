//! GraphQL over HTTP: a query or mutation, by POST or GET, answered as one
//! JSON response in the media type the client asked for.
//!
//! `application/json` is the default; a client that accepts
//! `application/graphql-response+json` (the GraphQL over HTTP
//! specification's own type) gets it, and with it statuses that tell a
//! request error (the document does not parse or validate, a variable does
//! not coerce: 400, no `data`) from an executed one (200).

use async_graphql::parser::types::OperationType;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::request::{HttpMethod, Incoming, admit, answer, refuse, run};
use crate::error::ApiError;

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

/// The parameters of a GET request's query string.
#[derive(Deserialize)]
struct QueryString {
    #[serde(default)]
    query: String,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
    variables: Option<String>,
    extensions: Option<String>,
    #[serde(rename = "documentId")]
    document_id: Option<String>,
}

/// The GraphQL request in a GET query string: `query` (or `documentId`,
/// or a persisted-query hash in `extensions`), `operationName`, and
/// `variables` and `extensions` as JSON text.
pub(crate) fn from_query_string(query: &str) -> Result<Incoming, ApiError> {
    let bad = |message: String| ApiError::BadUserInput {
        message,
        field: None,
    };
    let parsed: QueryString = serde_urlencoded::from_str(query)
        .map_err(|error| bad(format!("bad query string: {error}")))?;
    let mut request = async_graphql::Request::new(parsed.query);
    request.operation_name = parsed.operation_name.filter(|name| !name.is_empty());
    if let Some(variables) = parsed.variables.filter(|text| !text.is_empty()) {
        request.variables = serde_json::from_str(&variables).map_err(|error| {
            bad(format!(
                "bad query string: \"variables\" is not a JSON object: {error}"
            ))
        })?;
    }
    if let Some(extensions) = parsed.extensions.filter(|text| !text.is_empty()) {
        request.extensions = serde_json::from_str(&extensions).map_err(|error| {
            bad(format!(
                "bad query string: \"extensions\" is not a JSON object: {error}"
            ))
        })?;
    }
    Ok(Incoming {
        request,
        document_id: parsed.document_id,
    })
}

/// Answers a query or mutation as one JSON response.
pub(crate) async fn execute(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    incoming: Incoming,
    method: HttpMethod,
) -> Response {
    let media = ResponseMedia::negotiate(headers);
    let admitted = match admit(app, headers, client, incoming, method).await {
        Ok(admitted) => admitted,
        Err(refused) => return media.label(refused),
    };
    if admitted.kind == Some(OperationType::Subscription) {
        return media.label(refuse(ApiError::BadUserInput {
            message: "subscriptions need a WebSocket connection to /graphql, or a POST with \
                      Accept: text/event-stream"
                .into(),
            field: None,
        }));
    }
    let operation = admitted.operation;
    match run(app, admitted).await {
        Ok((response, outcome, db_time)) => {
            let mut answered = answer(response, operation, outcome, media);
            answered.extensions_mut().insert(db_time);
            answered
        }
        Err(refused) => media.label(refused),
    }
}
