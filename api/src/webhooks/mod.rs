//! Alerts and webhooks: the worker that turns the event log into
//! notifications and delivers them.
//!
//! Everything durable happens in PostgreSQL (see the alerts migration):
//! notifications are made there from the event log by cursor, each webhook
//! has an outbox, and a delivery is leased to one replica with row locks.
//! This worker only drives it: each round, in one transaction, it records
//! the answers of finished deliveries, asks the database to make the
//! notifications of new events (and check stuck and stale), and claims
//! the next notifications (a few, in order) of every webhook that is due
//! and not leased. Each webhook's claim then goes out on its own task, one
//! request after another, stopping at the first failure, so a slow or dead
//! endpoint holds up only its own webhook. Rounds run on every change the
//! live feed hears, on every finished claim, and every second.

pub mod address;
pub mod payload;
pub mod signature;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use entity::vantage_sync_webhook::WebhookFormat;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use sea_orm::ActiveEnum as _;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::db::webhooks::{self, Attempt, AttemptOutcome, Cause, Claim, Sent};
use crate::db::{Access, Identity, Pool, Role, alerts};
use crate::feed::Feed;
use crate::feed::cursor::Cursor;
use crate::metrics::Metrics;

/// Longest a webhook's endpoint has to answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claimed delivery is this replica's: past it, another
/// replica may send it again (at least once).
const LEASE: Duration = Duration::from_secs(30);
/// Webhooks being delivered to at once from this replica.
const MAX_IN_FLIGHT: usize = 256;
/// Notifications one claim may take for a webhook: sent one after
/// another, they save a round each.
const PER_CLAIM: i32 = 16;
/// Bodies kept for reuse: every webhook of a format is sent the same body
/// for a notification (only the signature differs).
const BODIES_KEPT: usize = 4_096;
/// A claim stops sending new requests once this much of its lease is gone.
const SEND_WITHIN: Duration = Duration::from_secs(15);
/// Events turned into notifications per round.
const EVENTS_PER_ROUND: i32 = 1_000;
/// A round's transaction may take this long.
const ROUND_TIMEOUT: Duration = Duration::from_secs(30);
/// Rounds run at least this often (retries fall due, stuck and stale are
/// checked by the database every 10 s).
const TICK: Duration = Duration::from_secs(1);

/// Webhook settings (`--webhook-retry-hours`, `--webhook-allow-private`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookSettings {
    /// A webhook failing without a success for this long is disabled.
    pub retry_window: Duration,
    /// Whether loopback, private and link-local addresses may be targets.
    pub allow_private: bool,
}

impl WebhookSettings {
    /// The defaults: 24 hours, public addresses only.
    pub const DEFAULT: Self = Self {
        retry_window: Duration::from_secs(24 * 3600),
        allow_private: false,
    };
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the webhook HTTP client: {0}")]
pub struct ClientError(#[from] reqwest::Error);

/// The HTTP client deliveries use: no redirects (a redirect could aim it
/// anywhere), no proxy from the environment, names resolved only to
/// public addresses unless private ones are allowed.
fn client(settings: WebhookSettings) -> Result<reqwest::Client, ClientError> {
    let builder = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("vantage-sync/", env!("CARGO_PKG_VERSION")));
    let builder = if settings.allow_private {
        builder
    } else {
        builder.dns_resolver(address::PublicOnly::shared())
    };
    Ok(builder.build()?)
}

/// Starts the worker; it ends when `feed` (the server) is gone, or once
/// `shutting_down` turns true.
pub fn start(
    pool: Pool,
    feed: &Arc<Feed>,
    metrics: Arc<Metrics>,
    settings: WebhookSettings,
    shutting_down: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let worker = Worker {
        pool,
        metrics,
        settings,
        client: client(settings)?,
        feed: Arc::downgrade(feed),
        shutting_down,
    };
    tokio::spawn(worker.run(feed.subscribe()));
    Ok(())
}

struct Worker {
    pool: Pool,
    metrics: Arc<Metrics>,
    settings: WebhookSettings,
    client: reqwest::Client,
    feed: Weak<Feed>,
    shutting_down: watch::Receiver<bool>,
}

/// One webhook's claim that went out: each notification sent with its
/// answer, in order (those not sent after a failure are left out).
type Finished = Vec<(Claim, Attempt)>;

impl Worker {
    async fn run(mut self, mut changes: broadcast::Receiver<Arc<crate::feed::FeedEvent>>) {
        let (done, mut finished_rx) = mpsc::unbounded_channel::<Finished>();
        let mut finished: Vec<Finished> = Vec::new();
        let mut in_flight = 0_usize;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let worker = Identity::of_role(Role::ServiceRole);
        let mut bodies: HashMap<(i64, WebhookFormat), Bytes> = HashMap::new();
        loop {
            tokio::select! {
                change = changes.recv() => {
                    if matches!(change, Err(broadcast::error::RecvError::Closed)) {
                        return;
                    }
                }
                Some(delivery) = finished_rx.recv() => {
                    in_flight -= 1;
                    finished.push(delivery);
                }
                _ = tick.tick() => {}
                _ = self.shutting_down.wait_for(|down| *down) => return,
            }
            if self.feed.strong_count() == 0 {
                return;
            }
            // One round for everything that woke it meanwhile.
            while let Ok(delivery) = finished_rx.try_recv() {
                in_flight -= 1;
                finished.push(delivery);
            }
            loop {
                match changes.try_recv() {
                    Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                    Err(broadcast::error::TryRecvError::Empty) => break,
                    Err(broadcast::error::TryRecvError::Closed) => return,
                }
            }
            let room = i32::try_from(MAX_IN_FLIGHT.saturating_sub(in_flight)).unwrap_or(0);
            let window = self.settings.retry_window;
            let round = self
                .pool
                .run(&worker, Access::Write, ROUND_TIMEOUT, async |txn| {
                    let sent: Vec<Sent<'_>> = finished
                        .iter()
                        .flat_map(|claimed| {
                            claimed
                                .iter()
                                .enumerate()
                                .map(|(index, (claim, attempt))| Sent {
                                    claim,
                                    attempt,
                                    release: index + 1 == claimed.len(),
                                })
                        })
                        .collect();
                    let outcomes = webhooks::record(txn, &sent, window).await?;
                    let made = alerts::advance(txn, EVENTS_PER_ROUND).await?;
                    let claims = if room > 0 {
                        webhooks::claim(txn, room, LEASE, PER_CLAIM).await?
                    } else {
                        Vec::new()
                    };
                    // What the delivery spans link to: read only when
                    // traces are on.
                    let causes = if !claims.is_empty() && delivery_traced() {
                        let notifications: Vec<i64> =
                            claims.iter().map(|claim| claim.notification_id).collect();
                        webhooks::causes(txn, &notifications).await?
                    } else {
                        Vec::new()
                    };
                    Ok((outcomes, made, claims, causes))
                })
                .await;
            let (outcomes, made, claims, causes) = match round {
                Ok(round) => round,
                // The server stopped during the round, its pool (and a
                // managed database) with it: no failure to report.
                Err(_) if *self.shutting_down.borrow() => return,
                Err(error) => {
                    // Answers are kept for the next round; leases run out
                    // and the deliveries go again: at least once.
                    tracing::warn!(error = %error.message(), "webhook round failed; retrying");
                    self.metrics.notify_round_failed();
                    continue;
                }
            };
            self.metrics.notify_round(u64::try_from(made).unwrap_or(0));
            for ((claim, _), outcome) in finished.drain(..).flatten().zip(outcomes) {
                self.count(&claim, outcome);
            }
            if bodies.len() > BODIES_KEPT {
                bodies.clear();
            }
            let causes: HashMap<i64, Cause> = causes
                .into_iter()
                .map(|cause| (cause.notification_id, cause))
                .collect();
            for batch in by_webhook(claims) {
                let batch: Vec<(Claim, Bytes, Option<Cause>)> = batch
                    .into_iter()
                    .map(|claim| {
                        let body = bodies
                            .entry((claim.notification_id, claim.format))
                            .or_insert_with(|| Bytes::from(payload::body(&claim)))
                            .clone();
                        let cause = causes.get(&claim.notification_id).cloned();
                        (claim, body, cause)
                    })
                    .collect();
                in_flight += 1;
                let done = done.clone();
                let client = self.client.clone();
                let allow_private = self.settings.allow_private;
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut sent = Vec::with_capacity(batch.len());
                    for (claim, body, cause) in batch {
                        if !sent.is_empty() && started.elapsed() > SEND_WITHIN {
                            break;
                        }
                        let attempt =
                            deliver(&client, &claim, cause.as_ref(), body, allow_private).await;
                        let failed = attempt.error.is_some();
                        sent.push((claim, attempt));
                        if failed {
                            break;
                        }
                    }
                    let _ = done.send(sent);
                });
            }
        }
    }

    fn count(&self, claim: &Claim, outcome: AttemptOutcome) {
        match outcome {
            AttemptOutcome::Delivered => {
                let made = claim.at.with_timezone(&chrono::Utc);
                let latency = (chrono::Utc::now() - made).num_microseconds().unwrap_or(0);
                self.metrics.webhook_delivered(latency as f64 / 1e6);
            }
            AttemptOutcome::Retry => self.metrics.webhook_failed(true),
            AttemptOutcome::Disabled => {
                self.metrics.webhook_failed(false);
                self.metrics.webhook_disabled();
                tracing::warn!(webhook = %claim.webhook_id, url = %claim.url, "webhook disabled");
            }
            AttemptOutcome::Stale => {}
        }
    }
}

/// Claims grouped by webhook, each group in order (as claimed).
fn by_webhook(claims: Vec<Claim>) -> Vec<Vec<Claim>> {
    let mut groups: Vec<Vec<Claim>> = Vec::new();
    for claim in claims {
        match groups.last_mut() {
            Some(group) if group[0].webhook_id == claim.webhook_id => group.push(claim),
            _ => groups.push(vec![claim]),
        }
    }
    groups
}

/// Sends one notification (its body, made once per notification and
/// format), signed; the answer, whatever it is. The attempt is a client
/// span when traces are on, linked to the change that `cause` names.
async fn deliver(
    client: &reqwest::Client,
    claim: &Claim,
    cause: Option<&Cause>,
    body: Bytes,
    allow_private: bool,
) -> Attempt {
    let span = delivery_span(claim, cause);
    if span.is_disabled() {
        return send(client, claim, body, allow_private, &span).await;
    }
    let attempt = send(client, claim, body, allow_private, &span)
        .instrument(span.clone())
        .await;
    if let Some(status) = attempt.http_status {
        span.record("http.response.status_code", status);
    }
    if attempt.error.is_some() {
        span.record("otel.status_code", "error");
    }
    attempt
}

/// The span of one delivery attempt, by OpenTelemetry's conventions for
/// HTTP clients, naming the notification and the webhook; never the URL's
/// path or query (a webhook URL may hold a token), the body, the secret or
/// the signature. Disabled (and nothing read) when traces are off.
///
/// A notification made from a change names that change's cursor, and
/// links to the trace of the transaction that wrote it, when that
/// transaction was traced: a delivery is made later, by whichever replica
/// claims it, so it starts a trace of its own rather than joining the
/// writer's.
fn delivery_span(claim: &Claim, cause: Option<&Cause>) -> tracing::Span {
    let span = tracing::debug_span!(
        "webhook.delivery",
        otel.name = "POST",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        url.scheme = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
        vantage_sync.webhook.id = tracing::field::Empty,
        vantage_sync.webhook.attempt = claim.attempt,
        vantage_sync.event.id = claim.notification_id,
        vantage_sync.notification.type = claim.kind.as_str(),
        vantage_sync.change.cursor = tracing::field::Empty,
        vantage_sync.alert = tracing::field::Empty,
        vantage_sync.resource.name = tracing::field::Empty,
    );
    if !span.is_disabled() {
        span.record(
            "vantage_sync.webhook.id",
            tracing::field::display(claim.webhook_id),
        );
        if let Some(alert) = claim.alert {
            span.record("vantage_sync.alert", alert.to_value().as_str());
        }
        if let Some(resource) = &claim.resource {
            span.record("vantage_sync.resource.name", resource.as_str());
        }
        if let Some(event) = cause.and_then(|cause| cause.event_id) {
            span.record(
                "vantage_sync.change.cursor",
                Cursor::at(event).encode().as_str(),
            );
        }
        if let Some(traceparent) = cause.and_then(|cause| cause.traceparent.as_deref()) {
            let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
            let writer = TraceContextPropagator::new().extract(&carrier);
            span.add_link(writer.span().span_context().clone());
        }
    }
    span
}

/// Whether delivery spans are recorded (traces are on).
fn delivery_traced() -> bool {
    tracing::enabled!(
        kind: tracing::metadata::Kind::SPAN,
        target: "vantage_sync::webhooks",
        tracing::Level::DEBUG
    )
}

/// Records why an attempt failed, as a class the conventions' `error.type`
/// allows: never an error's text, which may quote the URL.
fn failed_as(span: &tracing::Span, error_type: &'static str) {
    span.record("error.type", error_type);
}

/// The W3C `traceparent` (and `tracestate`) of `span`, to send with its
/// request; none when traces are off.
fn trace_headers(span: &tracing::Span) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if !span.is_disabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut Injector(&mut headers));
    }
    headers
}

/// Request headers as the propagator writes them.
struct Injector<'a>(&'a mut reqwest::header::HeaderMap);

impl opentelemetry::propagation::Injector for Injector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

async fn send(
    client: &reqwest::Client,
    claim: &Claim,
    body: Bytes,
    allow_private: bool,
    span: &tracing::Span,
) -> Attempt {
    let started = Instant::now();
    let failed = |error: String| Attempt {
        http_status: None,
        error: Some(error),
        duration: started.elapsed(),
    };
    let url = match address::check_written(&claim.url, allow_private) {
        Ok(url) => url,
        Err(refused) => {
            failed_as(span, "address_refused");
            return failed(refused.to_string());
        }
    };
    if !span.is_disabled() {
        span.record("url.scheme", url.scheme());
        if let Some(host) = url.host_str() {
            span.record("server.address", host);
        }
        if let Some(port) = url.port_or_known_default() {
            span.record("server.port", port);
        }
    }
    let id = payload::message_id(claim);
    let timestamp = chrono::Utc::now().timestamp();
    let signature = match signature::sign(&claim.secret, &id, timestamp, &body) {
        Ok(signature) => signature,
        Err(error) => {
            failed_as(span, "signature");
            return failed(error.to_string());
        }
    };
    let sent = client
        .post(url)
        .headers(trace_headers(span))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status();
            if !status.is_success() {
                // The conventions' error.type of an HTTP error: its status.
                span.record("error.type", status.as_str());
            }
            Attempt {
                http_status: Some(status.as_u16()),
                error: (!status.is_success()).then(|| format!("the endpoint answered {status}")),
                duration: started.elapsed(),
            }
        }
        Err(error) => {
            failed_as(span, error_type(&error));
            failed(describe(&error))
        }
    }
}

/// The class of a transport error, for `error.type`.
fn error_type(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else if error.is_request() {
        "request"
    } else {
        "_OTHER"
    }
}

/// A transport error with its causes (reqwest's own text says little).
fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
