//! GraphQL over Server-Sent Events on `POST /graphql` (the graphql-sse
//! protocol, distinct connections mode): a request with
//! `Accept: text/event-stream` gets its results as `next` events, then a
//! `complete` event.
//!
//! A subscription's events carry the change's cursor as their SSE `id`, so
//! a client that reconnects with `Last-Event-ID` resumes exactly as `after`
//! would. Refusals before the stream starts (token, body, method) are the
//! plain POST's statuses and codes; everything after is a `next` event.

use std::convert::Infallible;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::futures_util::future::BoxFuture;
use async_graphql::futures_util::{Stream, StreamExt, stream};
use async_graphql::parser::types::OperationType;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::media::ResponseMedia;
use super::outbox::{Outbox, StreamOutbox};
use super::request::{Admitted, RequestOutcome, answer, refused_as, run, status_of};
use crate::error::ApiError;
use crate::feed::LIVE_WAIT;
use crate::graphql::SseResume;
use crate::graphql::live::{Delivery, LiveStream, Outlet, RenderedChange};
use crate::metrics::{Operation, Outcome};
use crate::prefetch::prefetch;

/// Longest silence on a stream (or the WebSocket ping interval, if
/// shorter): a comment line goes out at least this often, so proxies keep
/// the stream open and a client notices a dead one.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Whether the client asked for an event stream.
pub fn wanted(headers: &HeaderMap) -> bool {
    accepts_event_stream(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .map(|value| value.as_bytes()),
    )
}

/// Whether these `Accept` values name `text/event-stream`.
pub(crate) fn accepts_event_stream<'a>(accept: impl IntoIterator<Item = &'a [u8]>) -> bool {
    accept
        .into_iter()
        .filter_map(|value| std::str::from_utf8(value).ok())
        .flat_map(|value| value.split(','))
        .any(|media| {
            media
                .split(';')
                .next()
                .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// `data` as one chunk of a chunked body.
pub(crate) fn chunk(data: &[u8]) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(data.len() + 12);
    chunk_into(&mut chunk, &[data]);
    chunk
}

/// Appends to `buffer` one chunk of a chunked body holding `parts`.
fn chunk_into(buffer: &mut Vec<u8>, parts: &[&[u8]]) {
    let length: usize = parts.iter().map(|part| part.len()).sum();
    // Into a Vec, writing cannot fail.
    let _ = write!(buffer, "{length:x}\r\n");
    for part in parts {
        buffer.extend_from_slice(part);
    }
    buffer.extend_from_slice(b"\r\n");
}

/// A stream's changes written by the renderer itself: each a `next`
/// event with its cursor as `id`, in one chunk, as the stream's body
/// would write it. The chunk names no operation, so it is built once per
/// change for every stream.
struct ChunkOutlet(Arc<Outbox>);

impl Outlet for ChunkOutlet {
    fn prefetch(&self) {
        prefetch(&*self.0);
    }

    fn prefetch_socket(&self) {
        self.0.prefetch_socket();
    }

    fn offer(&self, change: &RenderedChange) -> bool {
        let chunk = change.shared_frame(|chunk| {
            let (cursor, payload) = (change.cursor.as_bytes(), change.payload.as_bytes());
            chunk_into(
                chunk,
                &[b"event: next\nid: ", cursor, b"\ndata: ", payload, b"\n\n"],
            );
        });
        self.0.offer(chunk)
    }
}

/// Answers an admitted request as an event stream; with `outbox`, the
/// renderer may write a subscription's changes to it itself.
pub(crate) async fn respond(
    app: AppState,
    headers: &HeaderMap,
    admitted: Admitted,
    outbox: Option<StreamOutbox>,
) -> Response {
    let operation = admitted.operation;
    if admitted.kind != Some(OperationType::Subscription) {
        // A query or mutation: its one result, then `complete`.
        return match run(&app, admitted).await {
            // Unavailable: said with the plain POST's status, before any
            // stream, so the client retries.
            // Server-Timing's `db` is for plain answers; a stream says
            // only its `total` (to its head).
            Ok((response, outcome, _)) => match status_of(&response) {
                StatusCode::OK => {
                    let events = stream::iter([next(&response, None), complete()]);
                    marked(stream_response(events, KEEP_ALIVE), operation, outcome)
                }
                _ => answer(response, operation, outcome, ResponseMedia::Json),
            },
            Err(refused) => refused,
        };
    }
    let resume_after = match headers.get("last-event-id").map(|value| value.to_str()) {
        None => None,
        Some(Ok(cursor)) if !cursor.trim().is_empty() => Some(cursor.trim().to_owned()),
        Some(Ok(_)) => None,
        Some(Err(_)) => return refused_as(operation, ApiError::CursorExpired),
    };
    if !app.feed.wait_live(LIVE_WAIT).await {
        return refused_as(operation, ApiError::Unavailable);
    }
    let Admitted {
        caller, request, ..
    } = admitted;
    let expiry = caller.expires_in();
    let sse_resume = Arc::new(SseResume::resuming(resume_after));
    let mut deliveries = app
        .live
        .subscribe(request, caller, Some(sse_resume.clone()), None);
    if let Some(StreamOutbox(outbox)) = outbox {
        deliveries.deliver_through(ChunkOutlet(outbox));
    }
    let mut shutting_down = app.shutting_down.clone();
    let mut liveness = app.feed.liveness();
    // A comment at a fixed pace, busy or idle: resetting a timer on
    // every change (axum's keep-alive) costs more than the comment saves.
    let mut keep_alive = tokio::time::interval(app.websocket.ping_interval.min(KEEP_ALIVE));
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keep_alive.reset();
    let live = Live {
        keep_alive,
        deliveries,
        sse_resume,
        expiry: Box::pin(async move {
            match expiry {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        }),
        shutdown: Box::pin(async move { drop(shutting_down.wait_for(|down| *down).await) }),
        // While the feed reconnects, changes may wait for minutes: the
        // client is told at once (the stream ends), shows it, and resumes.
        feed_lost: Box::pin(async move { drop(liveness.wait_for(|live| !*live).await) }),
        done: false,
        interrupted: false,
    };
    let events = stream::unfold(live, Live::next).flat_map(stream::iter);
    let response = Sse::new(events.map(Ok::<_, Infallible>)).into_response();
    marked(response, operation, Outcome::Ok)
}

/// A subscription's stream of events.
struct Live {
    deliveries: LiveStream,
    keep_alive: tokio::time::Interval,
    sse_resume: Arc<SseResume>,
    expiry: BoxFuture<'static, ()>,
    shutdown: BoxFuture<'static, ()>,
    feed_lost: BoxFuture<'static, ()>,
    done: bool,
    /// An outage ended the subscription: no `complete`.
    interrupted: bool,
}

impl Live {
    /// The next events: a change; or the end (`complete`) when the
    /// subscription ends or the token expires. On shutdown, when the live
    /// feed is lost, or when an outage cut the subscription, the stream
    /// stops without `complete`, so the client reconnects with its
    /// `Last-Event-ID`.
    async fn next(mut self) -> Option<(Vec<Event>, Self)> {
        if self.done {
            return None;
        }
        let events = tokio::select! {
            // In this order, without drawing a random one each time.
            biased;
            delivery = self.deliveries.next() => match delivery {
                Some(Delivery::Response(response)) => {
                    // An outage ended the subscription (as it started, or
                    // reading the log): the stream ends after this without
                    // `complete`, so the client resumes.
                    if status_of(&response) == StatusCode::SERVICE_UNAVAILABLE {
                        self.interrupted = true;
                    }
                    vec![next(&response, self.sse_resume.take())]
                }
                Some(Delivery::Rendered(change)) => vec![Event::default()
                    .event("next")
                    .id(change.cursor.as_str())
                    .data(change.payload.as_ref())],
                None if self.interrupted => return None,
                None => {
                    self.done = true;
                    vec![complete()]
                }
            },
            () = &mut self.expiry => {
                self.done = true;
                // Nothing of the subscription's follows its end.
                self.deliveries.end();
                let expired = async_graphql::Response::from_errors(vec![
                    async_graphql::Error::from(ApiError::InvalidToken("token expired".into()))
                        .into_server_error(Default::default()),
                ]);
                vec![next(&expired, None), complete()]
            }
            () = &mut self.shutdown => return None,
            () = &mut self.feed_lost => return None,
            _ = self.keep_alive.tick() => vec![Event::default().comment("")],
        };
        Some((events, self))
    }
}

fn stream_response(
    events: impl Stream<Item = Event> + Send + 'static,
    keep_alive: Duration,
) -> Response {
    Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(keep_alive).text(""))
        .into_response()
}

fn marked(mut response: Response, operation: Operation, outcome: Outcome) -> Response {
    response
        .extensions_mut()
        .insert(RequestOutcome { operation, outcome });
    response
}

/// A `next` event carrying `response`, with `id` when it has one.
fn next(response: &async_graphql::Response, id: Option<String>) -> Event {
    let event = Event::default().event("next");
    let event = match id {
        Some(id) => event.id(id),
        None => event,
    };
    event
        .json_data(response)
        .unwrap_or_else(|_| Event::default().event("next").data("{}"))
}

fn complete() -> Event {
    Event::default().event("complete").data("")
}
