//! `kill -9` under load: the server is killed while mutations
//! are in flight and another takes its place on the same database. Every
//! transition is in the event log exactly once, and a subscriber that
//! resumes with its cursor sees all of them in order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use vantage_sync::Cursor;
use vantage_sync_testkit::{ServerProcess, TestDb, WsClient};

/// libtest's name of [`server_process`], which the server processes run.
const SERVER_PROCESS: &str = "server_kill::server_process";

/// Load clients, each driving a resource of its own.
const CLIENTS: usize = 8;

/// Load on each server: long enough for many transitions on both.
const LOAD_PER_SERVER: Duration = Duration::from_secs(1);

/// Not a test: the body of the processes [`ServerProcess`] starts, this
/// binary run again (a process can be killed with SIGKILL, an in-process
/// server cannot). Ignored so that normal runs skip it, and run by hand
/// it returns at once.
#[test]
#[ignore = "the server process of the kill -9 test, which runs it itself"]
fn server_process() {
    vantage_sync_testkit::serve_if_asked();
}

/// The server the clients use now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    name: char,
    addr: SocketAddr,
}

/// Transition `index` of a resource's cycles (start, then complete with
/// the cycle's number as its count), as the log records it: the status
/// and `records_synced` it leaves. A start keeps the last count, so no two
/// transitions of a resource leave the same pair.
fn transition(index: usize) -> (String, i64) {
    let cycle = i64::try_from(index / 2).unwrap();
    if index.is_multiple_of(2) {
        ("running".into(), cycle)
    } else {
        ("success".into(), cycle + 1)
    }
}

/// The transition a resource's state says was its last: `None` before the
/// first start created the row.
fn transition_of(state: &Value) -> Option<usize> {
    if state.is_null() {
        return None;
    }
    let records = usize::try_from(state["recordsSynced"].as_i64().unwrap()).unwrap();
    match state["lastSyncStatus"].as_str().unwrap() {
        "RUNNING" => Some(2 * records),
        "SUCCESS" => Some((2 * records).checked_sub(1).unwrap()),
        other => panic!("unexpected status {other} in {state}"),
    }
}

enum Answer {
    /// The server said the transition is done.
    Done,
    /// The server refused it (already running, not running).
    Refused(String),
    /// No answer: the connection was cut or refused.
    None(String),
}

/// Everything one load client knows at the end.
#[derive(Debug, Default)]
struct Outcome {
    resource: String,
    /// Transitions known to be applied, in order, with the server that
    /// answered for each (`None`: found applied after a request that got
    /// no answer).
    applied: Vec<Option<char>>,
    /// Requests sent to the first server before the kill that got no
    /// answer: in flight when it died.
    cut_by_kill: usize,
    /// Requests with no answer in all.
    unanswered: usize,
    /// Why the first of them got none.
    first_unanswered: Option<String>,
}

async fn post(
    client: &reqwest::Client,
    target: Target,
    token: &str,
    body: Value,
) -> Result<(reqwest::StatusCode, Value), String> {
    let response = client
        .post(format!("http://{}/graphql", target.addr))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let body = response.json().await.map_err(|error| error.to_string())?;
    Ok((status, body))
}

/// Asks for transition `index` of `resource`.
async fn request(
    client: &reqwest::Client,
    target: Target,
    token: &str,
    resource: &str,
    index: usize,
) -> Answer {
    let (query, variables) = if index.is_multiple_of(2) {
        (
            "mutation($r: String!) { change: startSync(resource: $r) { lastSyncStatus recordsSynced } }",
            json!({"r": resource}),
        )
    } else {
        (
            "mutation($r: String!, $n: Int!) { change: completeSync(resource: $r, recordsSynced: $n, recordsCreated: 0, recordsUpdated: 0) { lastSyncStatus recordsSynced } }",
            json!({"r": resource, "n": transition(index).1}),
        )
    };
    let (status, body) = match post(
        client,
        target,
        token,
        json!({"query": query, "variables": variables}),
    )
    .await
    {
        Ok(answer) => answer,
        Err(error) => return Answer::None(error),
    };
    if let Some(code) = body["errors"][0]["extensions"]["code"].as_str()
        && matches!(code, "ALREADY_RUNNING" | "NOT_RUNNING")
    {
        return Answer::Refused(code.to_owned());
    }
    assert_eq!(
        status,
        reqwest::StatusCode::OK,
        "{resource} #{index}: {body}"
    );
    assert_eq!(
        transition_of(&body["data"]["change"]),
        Some(index),
        "{resource} #{index}: {body}"
    );
    Answer::Done
}

/// Where `resource` stands, by the transition its state says was last;
/// `Err` when no server answers.
async fn last_transition(
    client: &reqwest::Client,
    target: Target,
    token: &str,
    resource: &str,
) -> Result<Option<usize>, String> {
    let (status, body) = post(
        client,
        target,
        token,
        json!({
            "query": "query($r: String!) { syncState(resource: $r) { lastSyncStatus recordsSynced } }",
            "variables": {"r": resource},
        }),
    )
    .await?;
    assert_eq!(status, reqwest::StatusCode::OK, "{resource}: {body}");
    Ok(transition_of(&body["data"]["syncState"]))
}

/// Drives `resource` through start/complete cycles against whichever
/// server `target` names, until `stop`. A request that gets no answer may
/// or may not have been applied; the client then reads the state to learn
/// which, and repeats the request only if it was not, as a careful ETL
/// worker would. So the client always knows every applied transition.
async fn drive(
    resource: String,
    token: String,
    target: watch::Receiver<Target>,
    stop: Arc<AtomicBool>,
    killed_at: Arc<OnceLock<Instant>>,
) -> Outcome {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut outcome = Outcome {
        resource: resource.clone(),
        ..Outcome::default()
    };
    // The next transition; whether the last request for it got no answer.
    let mut next = 0;
    let mut in_doubt = false;
    while in_doubt || !stop.load(Ordering::Relaxed) {
        let server = *target.borrow();
        if !in_doubt {
            let sent = Instant::now();
            match request(&client, server, &token, &resource, next).await {
                Answer::Done => {
                    outcome.applied.push(Some(server.name));
                    next += 1;
                    continue;
                }
                Answer::Refused(code) => {
                    panic!(
                        "{resource} #{next}: refused ({code}) though every transition before it was known"
                    )
                }
                Answer::None(error) => {
                    outcome.unanswered += 1;
                    outcome.first_unanswered.get_or_insert(error);
                    if server.name == 'A' && killed_at.get().is_some_and(|killed| sent < *killed) {
                        outcome.cut_by_kill += 1;
                    }
                    in_doubt = true;
                }
            }
        }
        match last_transition(&client, server, &token, &resource).await {
            Ok(last) if last == Some(next) => {
                outcome.applied.push(None);
                next += 1;
                in_doubt = false;
            }
            Ok(last) if last.map_or(0, |last| last + 1) == next => {
                // Not applied (yet: its transaction may still commit).
                match request(&client, server, &token, &resource, next).await {
                    Answer::Done => {
                        outcome.applied.push(Some(server.name));
                        next += 1;
                        in_doubt = false;
                    }
                    // It did commit meanwhile: the next read sees it.
                    Answer::Refused(_) => {}
                    Answer::None(error) => {
                        outcome.unanswered += 1;
                        outcome.first_unanswered.get_or_insert(error);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            Ok(last) => panic!("{resource}: state at transition {last:?}, but {next} was next"),
            // No server yet: the next one is on its way.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    outcome
}

/// One change as the subscriber got it or the log holds it: event id,
/// resource, operation, status, records synced.
type Change = (i64, String, String, String, i64);

const CHANGES: &str = "subscription($resources: [String!], $after: String) { \
    syncStateChanged(resources: $resources, after: $after) { \
    operation resource cursor state { lastSyncStatus recordsSynced } } }";

/// Follows `resources` from `after`, on whichever server `target` names,
/// resuming with its last cursor on the next server when its connection
/// drops. Records each change and the servers it subscribed on.
async fn follow(
    mut target: watch::Receiver<Target>,
    token: String,
    resources: Vec<String>,
    mut after: String,
    received: Arc<Mutex<Vec<Change>>>,
    sessions: Arc<Mutex<Vec<char>>>,
) {
    loop {
        let server = *target.borrow_and_update();
        let Ok(mut socket) = WsClient::ready_at(server.addr, &token).await else {
            target.changed().await.unwrap();
            continue;
        };
        sessions.lock().unwrap().push(server.name);
        socket
            .subscribe(
                "1",
                CHANGES,
                json!({"resources": resources, "after": after}),
            )
            .await;
        while let Ok(message) = socket.next().await {
            assert_eq!(message["type"], "next", "{message}");
            assert!(message["payload"].get("errors").is_none(), "{message}");
            let change = &message["payload"]["data"]["syncStateChanged"];
            after = change["cursor"].as_str().unwrap().to_owned();
            received.lock().unwrap().push((
                Cursor::decode(&after).unwrap().position,
                change["resource"].as_str().unwrap().to_owned(),
                change["operation"].as_str().unwrap().to_owned(),
                change["state"]["lastSyncStatus"]
                    .as_str()
                    .unwrap()
                    .to_lowercase(),
                change["state"]["recordsSynced"].as_i64().unwrap(),
            ));
        }
        // Dropped: resume on the server that takes this one's place.
        while target.borrow().name == server.name {
            target.changed().await.unwrap();
        }
    }
}

/// Every event of `resources` after `after`, in id order.
async fn log_after(conn: &mut sqlx::PgConnection, resources: &[String], after: i64) -> Vec<Change> {
    sqlx::query_as(
        "SELECT id, resource, operation, status, (state->>'records_synced')::bigint \
         FROM vantage_sync_events WHERE resource = ANY($1) AND id > $2 ORDER BY id",
    )
    .bind(resources)
    .bind(after)
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn kill_9_under_load_loses_and_repeats_no_transition() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    let resources: Vec<String> = (0..CLIENTS).map(|n| format!("kill_load_{n}")).collect();
    let head: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM vantage_sync_events")
        .fetch_one(&mut conn)
        .await
        .unwrap();

    let mut first = ServerProcess::start(SERVER_PROCESS, &db).await;
    let writer = first.token("service_role");
    let (publish, target) = watch::channel(Target {
        name: 'A',
        addr: first.addr(),
    });
    let received = Arc::new(Mutex::new(Vec::new()));
    let sessions = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tokio::spawn(follow(
        target.clone(),
        first.token("authenticated"),
        resources.clone(),
        Cursor::at(head).encode(),
        Arc::clone(&received),
        Arc::clone(&sessions),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at = Arc::new(OnceLock::new());
    let clients: Vec<_> = resources
        .iter()
        .map(|resource| {
            tokio::spawn(drive(
                resource.clone(),
                writer.clone(),
                target.clone(),
                Arc::clone(&stop),
                Arc::clone(&killed_at),
            ))
        })
        .collect();
    // The subscriber is on the first server before it dies, however slow
    // the machine: it has had a change from it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no change reached the subscriber; server A:\n{}",
            first.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    tokio::time::sleep(LOAD_PER_SERVER).await;
    killed_at.set(Instant::now()).unwrap();
    first.kill9();
    let second = ServerProcess::start(SERVER_PROCESS, &db).await;
    publish
        .send(Target {
            name: 'B',
            addr: second.addr(),
        })
        .unwrap();
    tokio::time::sleep(LOAD_PER_SERVER).await;
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = Vec::new();
    for client in clients {
        outcomes.push(client.await.unwrap());
    }

    // (1) The log holds exactly the transitions each client knows were
    // applied, each once and in order, and the row is the last one's.
    let log = log_after(&mut conn, &resources, head).await;
    for outcome in &outcomes {
        let events: Vec<&Change> = log
            .iter()
            .filter(|change| change.1 == outcome.resource)
            .collect();
        let logged: Vec<(String, i64)> = events
            .iter()
            .map(|change| (change.3.clone(), change.4))
            .collect();
        let known: Vec<(String, i64)> = (0..outcome.applied.len()).map(transition).collect();
        assert_eq!(logged, known, "{outcome:?}");
        for (index, answered_by) in outcome.applied.iter().enumerate() {
            if answered_by.is_some() {
                let count = logged
                    .iter()
                    .filter(|pair| **pair == transition(index))
                    .count();
                assert_eq!(count, 1, "acknowledged #{index} of {}", outcome.resource);
            }
        }
        let operations: Vec<&str> = events.iter().map(|change| change.2.as_str()).collect();
        assert_eq!(operations[0], "INSERT", "{operations:?}");
        assert!(
            operations[1..]
                .iter()
                .all(|operation| *operation == "UPDATE"),
            "{operations:?}"
        );
        let statuses: Vec<&str> = events.iter().map(|change| change.3.as_str()).collect();
        for (index, status) in statuses.iter().enumerate() {
            let expected = if index.is_multiple_of(2) {
                "running"
            } else {
                "success"
            };
            assert_eq!(
                *status, expected,
                "{} at {index}: {statuses:?}",
                outcome.resource
            );
        }
        let (row, last): (Value, Value) = sqlx::query_as(
            "SELECT to_jsonb(s), (SELECT state FROM vantage_sync_events e \
             WHERE e.resource = s.resource ORDER BY id DESC LIMIT 1) \
             FROM vantage_sync_state s WHERE resource = $1",
        )
        .bind(&outcome.resource)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        vantage_sync_testkit::assert_same_json(&row, &last);
    }

    // (2) The subscriber, resumed on the second server with its cursor,
    // got exactly the log after its start: in id order, none missed, none
    // twice.
    let deadline = Instant::now() + Duration::from_secs(10);
    let newest = log.last().unwrap().0;
    loop {
        let last = received.lock().unwrap().last().map(|change| change.0);
        if last.is_some_and(|last| last >= newest) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber did not catch up to {newest}, it is at {last:?}; server B:\n{}",
            second.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscriber.abort();
    let received = received.lock().unwrap().clone();
    // Thousands of changes: name the first difference, not both lists.
    if let Some(at) = (0..received.len().max(log.len())).find(|&at| received.get(at) != log.get(at))
    {
        panic!(
            "the subscriber got {} changes, the log has {}; first difference at {at}:\n got: {:?}\n log: {:?}",
            received.len(),
            log.len(),
            &received[at.saturating_sub(2)..(at + 3).min(received.len())],
            &log[at.saturating_sub(2)..(at + 3).min(log.len())],
        );
    }
    assert_eq!(
        *sessions.lock().unwrap(),
        ['A', 'B'],
        "one resume, on the second server"
    );

    // (3) Both servers acknowledged transitions, and the kill cut requests
    // short.
    let answered_by = |name: char| -> usize {
        outcomes
            .iter()
            .map(|outcome| {
                outcome
                    .applied
                    .iter()
                    .filter(|by| **by == Some(name))
                    .count()
            })
            .sum()
    };
    let cut: usize = outcomes.iter().map(|outcome| outcome.cut_by_kill).sum();
    let found: usize = outcomes
        .iter()
        .map(|outcome| outcome.applied.iter().filter(|by| by.is_none()).count())
        .sum();
    let unanswered: usize = outcomes.iter().map(|outcome| outcome.unanswered).sum();
    eprintln!(
        "kill -9: {} by A, {} by B, {cut} cut by the kill, {unanswered} unanswered ({found} of them applied all the same), {} events",
        answered_by('A'),
        answered_by('B'),
        log.len()
    );
    assert!(answered_by('A') > 0 && answered_by('B') > 0, "{outcomes:?}");
    assert!(
        cut > 0,
        "no request was in flight at the kill: {outcomes:?}"
    );
    drop(second);
}
