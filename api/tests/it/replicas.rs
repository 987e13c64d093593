//! Three replicas on one database behind HAProxy (the shipped
//! configuration), WebSocket and SSE subscribers spread over them through
//! the balancer. One replica is killed with SIGKILL while changes are
//! made: its subscribers reconnect through the balancer, the WebSocket ones
//! with `after: <last cursor>`, the SSE ones with `Last-Event-ID`, and
//! every subscriber ends with exactly the event log after its start: none
//! missed, none twice, in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use vantage_sync::Cursor;
use vantage_sync_testkit::{
    HaProxy, ServerProcess, SseStream, TestDb, WsClient, subscriptions_active,
};

/// The ignored test whose process serves (see `ServerProcess`).
const SERVER_PROCESS: &str = "server_kill::server_process";

/// Subscribers of each transport, opened one after the other through
/// the balancer: `leastconn` gives each replica some of each.
const PER_TRANSPORT: usize = 6;

/// The resources changed, in turn.
const RESOURCES: [&str; 3] = ["replica_feed_a", "replica_feed_b", "replica_feed_c"];

/// One change every so often, before and after the kill.
const PACE: Duration = Duration::from_millis(50);
const BEFORE_KILL: Duration = Duration::from_millis(1500);
/// Past the balancer's inter x fall (2 s x 2), so changes are still made
/// once it has taken the dead replica out.
const AFTER_KILL: Duration = Duration::from_millis(5000);

/// A client's back-off before its first reconnection, and between
/// attempts: changes are committed meanwhile, which a subscriber that
/// resumed without its cursor would miss.
const BACK_OFF: Duration = Duration::from_millis(250);
/// How long a subscriber keeps trying to reconnect.
const RECONNECT_WITHIN: Duration = Duration::from_secs(20);
/// How long one connection attempt may take.
const ATTEMPT_WITHIN: Duration = Duration::from_secs(5);

const CHANGES: &str = "subscription($resources: [String!], $after: String) { \
    syncStateChanged(resources: $resources, after: $after) { \
    operation resource cursor state { lastSyncStatus } } }";

/// One change as a subscriber got it or the log holds it: event id,
/// resource, operation, status after it.
type Change = (i64, String, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    WebSocket,
    Sse,
}

/// What a subscriber has seen, shared with the test.
#[derive(Default)]
struct Seen {
    /// Every change received, in order, over all sessions.
    received: Vec<Change>,
    /// Connections it subscribed on (1 + resumptions).
    sessions: usize,
    /// Changes the writer made between each drop and the resubscription
    /// that followed it.
    made_while_away: Vec<usize>,
    /// Failed connection attempts.
    failed_attempts: usize,
    /// Why the last attempt failed, if one did.
    last_failure: Option<String>,
    /// From each drop to the resubscription that followed it.
    away: Vec<Duration>,
}

struct Subscriber {
    name: String,
    transport: Transport,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<Result<(), String>>,
}

/// The change a `syncStateChanged` payload describes.
fn change_of(data: &Value) -> Result<Change, String> {
    let change = &data["syncStateChanged"];
    let cursor = change["cursor"]
        .as_str()
        .ok_or_else(|| format!("no cursor in {data}"))?;
    let id = Cursor::decode(cursor)
        .ok_or_else(|| format!("not a cursor: {cursor}"))?
        .position;
    Ok((
        id,
        change["resource"].as_str().unwrap_or_default().to_owned(),
        change["operation"].as_str().unwrap_or_default().to_owned(),
        change["state"]["lastSyncStatus"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase(),
    ))
}

/// Follows [`RESOURCES`] over a WebSocket through the balancer from
/// `after`; when the connection drops, backs off and subscribes again
/// through the balancer with the cursor of the last change received.
async fn follow_websocket(
    balancer: SocketAddr,
    token: String,
    mut after: String,
    seen: Arc<Mutex<Seen>>,
    made: Arc<AtomicUsize>,
) -> Result<(), String> {
    let mut dropped: Option<(Instant, usize)> = None;
    loop {
        let deadline = Instant::now() + RECONNECT_WITHIN;
        let mut socket = loop {
            let attempt =
                tokio::time::timeout(ATTEMPT_WITHIN, WsClient::ready_at(balancer, &token))
                    .await
                    .map_err(|_| "no answer in time".to_owned())
                    .and_then(|connected| connected.map_err(|error| error.to_string()));
            match attempt {
                Ok(socket) => break socket,
                Err(error) => {
                    let mut seen = seen.lock().unwrap();
                    seen.failed_attempts += 1;
                    seen.last_failure = Some(error.clone());
                    if Instant::now() > deadline {
                        return Err(format!(
                            "no connection within {RECONNECT_WITHIN:?}: {error}"
                        ));
                    }
                }
            }
            tokio::time::sleep(BACK_OFF).await;
        };
        socket
            .subscribe(
                "1",
                CHANGES,
                json!({"resources": RESOURCES, "after": after}),
            )
            .await;
        resubscribed(&seen, dropped.take(), &made);
        // Until the connection drops (an error or a close frame).
        while let Ok(message) = socket.next().await {
            if message["type"] != "next" || message["payload"].get("errors").is_some() {
                return Err(format!("not a change: {message}"));
            }
            let change = change_of(&message["payload"]["data"])?;
            after = Cursor::at(change.0).encode();
            seen.lock().unwrap().received.push(change);
        }
        dropped = Some((Instant::now(), made.load(Ordering::SeqCst)));
        tokio::time::sleep(BACK_OFF).await;
    }
}

/// Follows [`RESOURCES`] over GraphQL over SSE through the balancer from
/// `after` (in the body, as a first request would); when the stream ends,
/// backs off and sends the same request through the balancer again with
/// the last event's id as `Last-Event-ID`, as an EventSource-like reader
/// does.
async fn follow_sse(
    balancer: String,
    token: String,
    after: String,
    seen: Arc<Mutex<Seen>>,
    made: Arc<AtomicUsize>,
) -> Result<(), String> {
    let body = json!({"query": CHANGES, "variables": {"resources": RESOURCES, "after": after}});
    let mut last_event_id: Option<String> = None;
    let mut dropped: Option<(Instant, usize)> = None;
    loop {
        let deadline = Instant::now() + RECONNECT_WITHIN;
        let mut stream = loop {
            let attempt = tokio::time::timeout(
                ATTEMPT_WITHIN,
                SseStream::open(&balancer, Some(&token), &body, last_event_id.as_deref()),
            )
            .await
            .map_err(|_| "no answer in time".to_owned())
            .and_then(|opened| {
                opened.map_err(|(status, body)| format!("refused with {status}: {body}"))
            });
            match attempt {
                Ok(stream) => break stream,
                Err(error) => {
                    let mut seen = seen.lock().unwrap();
                    seen.failed_attempts += 1;
                    seen.last_failure = Some(error.clone());
                    if Instant::now() > deadline {
                        return Err(format!("no stream within {RECONNECT_WITHIN:?}: {error}"));
                    }
                }
            }
            tokio::time::sleep(BACK_OFF).await;
        };
        resubscribed(&seen, dropped.take(), &made);
        // Until the stream ends without `complete` (cut).
        while let Some(event) = stream.next_event().await {
            let data = event.json();
            if event.event != "next" || data.get("errors").is_some() {
                return Err(format!("not a change: {event:?}"));
            }
            let change = change_of(&data["data"])?;
            if event.id != Some(Cursor::at(change.0).encode()) {
                return Err(format!("the event's id is not its cursor: {event:?}"));
            }
            last_event_id = event.id;
            seen.lock().unwrap().received.push(change);
        }
        dropped = Some((Instant::now(), made.load(Ordering::SeqCst)));
        tokio::time::sleep(BACK_OFF).await;
    }
}

/// Counts a session; after a drop, how long the subscriber was away and
/// how many changes were made meanwhile.
fn resubscribed(seen: &Mutex<Seen>, dropped: Option<(Instant, usize)>, made: &AtomicUsize) {
    let mut seen = seen.lock().unwrap();
    seen.sessions += 1;
    if let Some((at, made_then)) = dropped {
        seen.away.push(at.elapsed());
        seen.made_while_away
            .push(made.load(Ordering::SeqCst) - made_then);
    }
}

/// Makes change `index`: the resources in turn, each started, then
/// completed or failed (alternately), then started again.
async fn make_change(conn: &mut sqlx::PgConnection, index: usize) {
    let resource = RESOURCES[index % RESOURCES.len()];
    let transition = index / RESOURCES.len();
    let query = if transition.is_multiple_of(2) {
        sqlx::query("SELECT 1 FROM start_vantage_sync($1)").bind(resource)
    } else if (transition / 2).is_multiple_of(2) {
        sqlx::query("SELECT 1 FROM complete_vantage_sync($1, $2, 0, 0)")
            .bind(resource)
            .bind(i32::try_from(index).unwrap())
    } else {
        sqlx::query("SELECT 1 FROM fail_vantage_sync($1, $2)")
            .bind(resource)
            .bind(json!([{"code": "HTTP_503", "message": "Vantage unavailable"}]))
    };
    query.execute(conn).await.unwrap();
}

/// The replica's count of open subscriptions, read from it directly.
async fn subscriptions_on(replica: &ServerProcess) -> i64 {
    subscriptions_active(&replica.url("/metrics")).await
}

/// Panics with a subscriber's own error if its task has ended.
async fn check_alive(subscribers: &mut [Subscriber]) {
    for subscriber in subscribers.iter_mut() {
        if subscriber.task.is_finished() {
            let outcome = (&mut subscriber.task).await;
            panic!("subscriber {} stopped: {outcome:?}", subscriber.name);
        }
    }
}

#[tokio::test]
async fn sigkill_of_a_replica_behind_haproxy_loses_and_repeats_no_change() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let head: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM vantage_sync_events")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let start = Cursor::at(head).encode();

    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ServerProcess::start(SERVER_PROCESS, &db).await);
    }
    let addrs: Vec<_> = replicas.iter().map(ServerProcess::addr).collect();
    let balancer = HaProxy::start(&addrs);
    // Every replica has the same secret: any one's token does for all.
    let token = replicas[0].token("authenticated");

    let made = Arc::new(AtomicUsize::new(0));
    let mut subscribers = Vec::new();
    for transport in [Transport::WebSocket, Transport::Sse] {
        for n in 0..PER_TRANSPORT {
            let seen = Arc::new(Mutex::new(Seen::default()));
            let task = match transport {
                Transport::WebSocket => tokio::spawn(follow_websocket(
                    balancer.addr,
                    token.clone(),
                    start.clone(),
                    Arc::clone(&seen),
                    Arc::clone(&made),
                )),
                Transport::Sse => tokio::spawn(follow_sse(
                    balancer.url("/graphql"),
                    token.clone(),
                    start.clone(),
                    Arc::clone(&seen),
                    Arc::clone(&made),
                )),
            };
            let name = format!("{transport:?} {n}");
            // One at a time, so that leastconn spreads them.
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.lock().unwrap().sessions == 0 {
                assert!(Instant::now() < deadline, "{name} did not connect");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            subscribers.push(Subscriber {
                name,
                transport,
                seen,
                task,
            });
        }
    }

    // Changes at a steady pace until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, made) = (Arc::clone(&stop), Arc::clone(&made));
        let mut conn = db.connect().await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            while !stop.load(Ordering::SeqCst) {
                tick.tick().await;
                make_change(&mut conn, made.load(Ordering::SeqCst)).await;
                made.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let writing = Instant::now();

    // Every subscription is live on its replica: each has had a change.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check_alive(&mut subscribers).await;
        let waiting: Vec<&str> = subscribers
            .iter()
            .filter(|subscriber| subscriber.seen.lock().unwrap().received.is_empty())
            .map(|subscriber| subscriber.name.as_str())
            .collect();
        if waiting.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no change reached {waiting:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut spread = Vec::new();
    for replica in &replicas {
        spread.push(subscriptions_on(replica).await);
    }
    assert_eq!(
        spread.iter().sum::<i64>(),
        i64::try_from(subscribers.len()).unwrap(),
        "subscriptions per replica: {spread:?}"
    );
    // The victim: the middle one, which leastconn gave its share.
    let victim = 1;
    assert!(
        spread[victim] > 0,
        "no subscriber on the replica to kill: {spread:?}"
    );

    tokio::time::sleep(BEFORE_KILL.saturating_sub(writing.elapsed())).await;
    let made_at_kill = made.load(Ordering::SeqCst);
    replicas[victim].kill9();
    let killed = Instant::now();
    tokio::time::sleep(AFTER_KILL).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let made_in_all = made.load(Ordering::SeqCst);

    let log: Vec<Change> = sqlx::query_as(
        "SELECT id, resource, operation, status FROM vantage_sync_events \
         WHERE resource = ANY($1) AND id > $2 ORDER BY id",
    )
    .bind(&RESOURCES[..])
    .bind(head)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(log.len(), made_in_all, "one event per change");
    let newest = log.last().unwrap().0;

    // Everyone catches up with the newest event (or, missing one, never
    // does).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        check_alive(&mut subscribers).await;
        let behind: Vec<(&str, Option<i64>)> = subscribers
            .iter()
            .map(|subscriber| {
                let seen = subscriber.seen.lock().unwrap();
                (
                    subscriber.name.as_str(),
                    seen.received.last().map(|change| change.0),
                )
            })
            .filter(|(_, last)| last.is_none_or(|last| last < newest))
            .collect();
        if behind.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for subscriber in &subscribers {
        subscriber.task.abort();
    }

    // Each got exactly the log after its start, in order, once.
    let mut resumed = Vec::new();
    for subscriber in &subscribers {
        let seen = subscriber.seen.lock().unwrap();
        let received = &seen.received;
        if let Some(at) =
            (0..received.len().max(log.len())).find(|&at| received.get(at) != log.get(at))
        {
            panic!(
                "{}: got {} changes over {} sessions, the log has {}; first difference at {at}:\n got: {:?}\n log: {:?}",
                subscriber.name,
                received.len(),
                seen.sessions,
                log.len(),
                &received[at.saturating_sub(2)..(at + 3).min(received.len())],
                &log[at.saturating_sub(2)..(at + 3).min(log.len())],
            );
        }
        // One session, or one more after the kill: nobody else was cut.
        assert!(
            matches!(seen.sessions, 1 | 2),
            "{}: {} sessions",
            subscriber.name,
            seen.sessions
        );
        if seen.sessions == 2 {
            // Changes were made while it was away: resuming without its
            // cursor, it would have missed them.
            assert!(
                seen.made_while_away[0] > 0,
                "{}: no change was made while it was away ({:?})",
                subscriber.name,
                seen.away
            );
            resumed.push((
                subscriber.name.clone(),
                subscriber.transport,
                seen.away[0],
                seen.made_while_away[0],
                seen.failed_attempts,
                seen.last_failure.clone(),
            ));
        }
    }
    eprintln!(
        "subscriptions per replica {spread:?}, killed replica{} after {made_at_kill} of {made_in_all} changes; \
         resumed (name, transport, away, changes made meanwhile, failed attempts, last failure): {resumed:?}",
        victim + 1
    );
    assert_eq!(
        i64::try_from(resumed.len()).unwrap(),
        spread[victim],
        "exactly the killed replica's subscribers resumed"
    );
    for transport in [Transport::WebSocket, Transport::Sse] {
        assert!(
            resumed.iter().any(|resumed| resumed.1 == transport),
            "no {transport:?} subscriber was on the killed replica: {resumed:?}"
        );
    }
    // And they did so before the end of the changes: through the balancer
    // while it took the dead replica out.
    for (name, _, away, ..) in &resumed {
        assert!(
            *away < AFTER_KILL,
            "{name} was away {away:?}, killed {:?} ago",
            killed.elapsed()
        );
    }
}
