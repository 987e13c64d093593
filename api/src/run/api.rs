//! Marking a run's transitions over the server's GraphQL endpoint, with
//! retries while it cannot be reached.
//!
//! Every transition gets a fresh random `Idempotency-Key`, sent again on
//! each of its retries: a retry of a mark whose answer was lost is then
//! answered as the first was, instead of being applied twice (or refused
//! as `ALREADY_RUNNING`).

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::say;

/// Longest one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause between tries; each later one is twice as long.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause between tries.
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// The counts of a completed sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every record processed.
    pub synced: i32,
    /// Of those, created.
    pub created: i32,
    /// Of those, updated.
    pub updated: i32,
}

/// A change of the resource's state.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// `startSync`.
    Start,
    /// `completeSync` with the counts.
    Complete(Counts),
    /// `failSync` with the errors.
    Fail(Vec<entity::SyncError>),
}

impl Transition {
    /// The state it marks, for messages: "accounts started".
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Start => "started",
            Self::Complete(_) => "completed",
            Self::Fail(_) => "failed",
        }
    }

    fn request(&self, resource: &str) -> Value {
        match self {
            Self::Start => json!({
                "query": "mutation($resource: String!) { startSync(resource: $resource) { lastSyncStatus } }",
                "variables": { "resource": resource },
            }),
            Self::Complete(counts) => json!({
                "query": "mutation($resource: String!, $synced: Int!, $created: Int!, $updated: Int!) { completeSync(resource: $resource, recordsSynced: $synced, recordsCreated: $created, recordsUpdated: $updated) { lastSyncStatus } }",
                "variables": {
                    "resource": resource,
                    "synced": counts.synced,
                    "created": counts.created,
                    "updated": counts.updated,
                },
            }),
            Self::Fail(errors) => json!({
                "query": "mutation($resource: String!, $errors: [SyncErrorInput!]!) { failSync(resource: $resource, errors: $errors) { lastSyncStatus } }",
                "variables": { "resource": resource, "errors": errors },
            }),
        }
    }
}

/// How marking a transition ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marked {
    /// The server applied it.
    Done,
    /// The server answered with an error that trying again would not
    /// change (`ALREADY_RUNNING`, `UNAUTHENTICATED`, `FORBIDDEN`, ...).
    Refused {
        /// The error's code.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server could not be reached (or was unavailable) for as long
    /// as the mark was retried; the last error.
    GaveUp(String),
}

/// One try's result.
enum Answer {
    Done,
    Refused {
        code: String,
        message: String,
    },
    TryAgain {
        error: String,
        after: Option<Duration>,
    },
}

/// The server's GraphQL endpoint and the token to call it with.
pub struct Api {
    client: reqwest::Client,
    endpoint: Url,
    token: String,
}

impl Api {
    /// A client of `endpoint` that sends `token`.
    pub fn new(endpoint: Url, token: String) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("vantage-sync-run/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            endpoint,
            token,
        })
    }

    /// Marks `transition` of `resource`, trying again with growing pauses
    /// for `retry_for` while the server cannot be reached or says to try
    /// again. The first failure is told on standard error at once.
    pub async fn mark(
        &self,
        resource: &str,
        transition: &Transition,
        retry_for: Duration,
    ) -> Marked {
        let body = transition.request(resource);
        let key = idempotency_key();
        let deadline = Instant::now() + retry_for;
        let mut pause = FIRST_PAUSE;
        let mut told = false;
        loop {
            let error = match self.send(&body, &key).await {
                Answer::Done => return Marked::Done,
                Answer::Refused { code, message } => return Marked::Refused { code, message },
                Answer::TryAgain { error, after } => {
                    pause = pause.max(after.unwrap_or_default());
                    error
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Marked::GaveUp(error);
            }
            if !told {
                say(format_args!(
                    "cannot mark {resource} {} at {}: {error}; trying again for up to {} s",
                    transition.verb(),
                    self.endpoint,
                    retry_for.as_secs()
                ));
                told = true;
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }

    async fn send(&self, body: &Value, key: &str) -> Answer {
        let sent = self
            .client
            .post(self.endpoint.clone())
            .bearer_auth(&self.token)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                return Answer::TryAgain {
                    error: unsent(&error),
                    after: None,
                };
            }
        };
        let status = response.status();
        let after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
            .map(Duration::from_secs);
        let answer = match response.bytes().await {
            Ok(bytes) => serde_json::from_slice::<Value>(&bytes).ok(),
            Err(error) => {
                return Answer::TryAgain {
                    error: chain(&error),
                    after,
                };
            }
        };
        read_answer(status, answer, after, &self.endpoint)
    }
}

/// What an HTTP answer means for the mark.
fn read_answer(
    status: StatusCode,
    answer: Option<Value>,
    after: Option<Duration>,
    endpoint: &Url,
) -> Answer {
    let unavailable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
    let Some(answer) = answer.filter(Value::is_object) else {
        let error = format!(
            "{endpoint} answered HTTP {status} without a GraphQL answer; is it the sync server's /graphql endpoint?"
        );
        return if unavailable {
            Answer::TryAgain { error, after }
        } else {
            Answer::Refused {
                code: format!("HTTP_{}", status.as_u16()),
                message: error,
            }
        };
    };
    if let Some(error) = answer["errors"]
        .as_array()
        .and_then(|errors| errors.first())
    {
        let code = error["extensions"]["code"]
            .as_str()
            .unwrap_or("UNKNOWN")
            .to_owned();
        let message = error["message"].as_str().unwrap_or_default().to_owned();
        // The server's "try again" answers: its database is unreachable,
        // the caller is over its rate, or a request timed out.
        let transient = matches!(
            code.as_str(),
            "SERVICE_UNAVAILABLE" | "RATE_LIMITED" | "INTERNAL_SERVER_ERROR"
        );
        return if transient || unavailable {
            Answer::TryAgain {
                error: format!("HTTP {status}: {code}: {message}"),
                after,
            }
        } else {
            Answer::Refused { code, message }
        };
    }
    if status.is_success() && !answer["data"].is_null() {
        Answer::Done
    } else if unavailable {
        Answer::TryAgain {
            error: format!("HTTP {status}"),
            after,
        }
    } else {
        Answer::Refused {
            code: format!("HTTP_{}", status.as_u16()),
            message: format!("{endpoint} answered HTTP {status} with no data"),
        }
    }
}

/// Why a request got no answer, in short: the endpoint is in the message
/// already, and reqwest's own text repeats it.
fn unsent(error: &reqwest::Error) -> String {
    let mut root: &dyn std::error::Error = error;
    while let Some(cause) = root.source() {
        root = cause;
    }
    if error.is_timeout() {
        format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
    } else if error.is_connect() {
        format!("cannot connect: {root}")
    } else {
        chain(error)
    }
}

/// An error with its causes, which say what actually failed ("connection
/// refused").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// 128 random bits in hex; without randomness, the time and process, which
/// are unique enough for one caller's keys.
fn idempotency_key() -> String {
    let mut random = [0u8; 16];
    if getrandom::fill(&mut random).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        return format!("{nanos:x}-{:x}", std::process::id());
    }
    random.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Url {
        Url::parse("http://127.0.0.1:8080/graphql").unwrap()
    }

    fn read(status: u16, answer: Value) -> Answer {
        read_answer(
            StatusCode::from_u16(status).unwrap(),
            Some(answer),
            None,
            &endpoint(),
        )
    }

    fn error(code: &str) -> Value {
        json!({"data": null, "errors": [{"message": "no", "extensions": {"code": code}}]})
    }

    #[test]
    fn refusals_are_final_and_unavailability_is_retried() {
        assert!(matches!(
            read(
                200,
                json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}}})
            ),
            Answer::Done
        ));
        for code in [
            "ALREADY_RUNNING",
            "UNAUTHENTICATED",
            "FORBIDDEN",
            "BAD_USER_INPUT",
        ] {
            assert!(
                matches!(read(200, error(code)), Answer::Refused { code: found, .. } if found == code),
                "{code}"
            );
        }
        assert!(matches!(
            read(401, error("INVALID_TOKEN")),
            Answer::Refused { .. }
        ));
        assert!(matches!(
            read(503, error("SERVICE_UNAVAILABLE")),
            Answer::TryAgain { .. }
        ));
        assert!(matches!(
            read(429, error("RATE_LIMITED")),
            Answer::TryAgain { .. }
        ));
        assert!(matches!(
            read(200, error("INTERNAL_SERVER_ERROR")),
            Answer::TryAgain { .. }
        ));
        assert!(matches!(
            read_answer(StatusCode::BAD_GATEWAY, None, None, &endpoint()),
            Answer::TryAgain { .. }
        ));
        assert!(matches!(
            read_answer(StatusCode::NOT_FOUND, None, None, &endpoint()),
            Answer::Refused { code, .. } if code == "HTTP_404"
        ));
    }

    #[test]
    fn keys_differ() {
        let key = idempotency_key();
        assert_eq!(key.len(), 32);
        assert_ne!(key, idempotency_key());
    }
}
