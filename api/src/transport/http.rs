//! GraphQL over HTTP: a query or mutation, by POST or GET, answered as one
//! JSON response.

use async_graphql::parser::types::OperationType;
use axum::http::HeaderMap;
use axum::response::Response;

use super::AppState;
use super::request::{HttpMethod, admit, answer, refuse, run};
use crate::error::ApiError;

/// Answers a query or mutation as one JSON response.
pub(crate) async fn execute(
    app: &AppState,
    headers: &HeaderMap,
    client: Option<std::net::IpAddr>,
    request: async_graphql::Request,
    method: HttpMethod,
) -> Response {
    let admitted = match admit(app, headers, client, request, method).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    if admitted.kind == Some(OperationType::Subscription) {
        return refuse(ApiError::BadUserInput {
            message: "subscriptions need a WebSocket connection to /graphql, or a POST with \
                      Accept: text/event-stream"
                .into(),
            field: None,
        });
    }
    let operation = admitted.operation;
    match run(app, admitted).await {
        Ok((response, outcome, db_time)) => {
            let mut answered = answer(response, operation, outcome);
            answered.extensions_mut().insert(db_time);
            answered
        }
        Err(refused) => refused,
    }
}
