//! GraphQL over HTTP: a query or mutation, by POST or GET, answered as one
//! JSON response in the media type the client asked for (`media`).

use async_graphql::parser::types::OperationType;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::AppState;
use super::media::ResponseMedia;
use super::request::{HttpMethod, Incoming, admit, answer, refuse, run};
use crate::error::ApiError;

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

/// Answers a query or mutation as one JSON response in `media`.
pub(crate) async fn execute(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    incoming: Incoming,
    method: HttpMethod,
    media: ResponseMedia,
) -> Response {
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
