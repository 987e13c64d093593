//! The soak's HTTP clients: paced queries and mutations, and slowloris
//! attackers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::windows::Windows;
use super::{MUTATION_CLIENTS, QUERY_CLIENTS, Soak};
use crate::http::HttpConnection;
use crate::load::{DASHBOARD, is_data};

/// How often an attacker sends one more header line.
const TRICKLE: Duration = Duration::from_secs(1);

/// The queries the query clients take in turn: the dashboard, the totals,
/// the failures with their streaks and the trends (both read the event
/// log, so they would show a log that costs more as it grows).
const QUERIES: [&str; 4] = [
    DASHBOARD,
    "{ syncStats { totalResources successful failed running } }",
    "{ failedSyncs { resource errorCount consecutiveFailures errors { code } } }",
    "{ syncTrends(last: 10) { resource successRate runs { status } } }",
];
/// A ticker for one of `clients` sharing `rate` per second.
fn pace(rate: u32, clients: usize) -> tokio::time::Interval {
    let period = Duration::from_secs_f64(clients as f64 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(period);
    // A slow answer delays the next request rather than bunching them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// One keep-alive client sending the queries in turn at its share of the
/// rate.
pub(super) async fn query_client(soak: Arc<Soak>, client: usize) -> Windows {
    let mut windows = soak.empty.clone();
    let authorization = format!("Bearer {}", soak.reader);
    let Ok(mut connection) = HttpConnection::open(&soak.base).await else {
        windows.at(Instant::now()).errors += 1;
        return windows;
    };
    let requests: Vec<Vec<u8>> = QUERIES
        .iter()
        .map(|query| {
            connection.post(
                "/graphql",
                &authorization,
                &json!({ "query": query }).to_string(),
            )
        })
        .collect();
    let mut tick = pace(soak.plan.query_rate, QUERY_CLIENTS);
    let mut turn = client;
    loop {
        tick.tick().await;
        let started = Instant::now();
        if started >= soak.deadline {
            return windows;
        }
        turn += 1;
        let ok = match connection.exchange(&requests[turn % requests.len()]).await {
            Ok(response) => response.status == 200 && is_data(response.body),
            Err(_) => false,
        };
        let window = windows.at(started);
        window.queries.push(started.elapsed());
        if !ok {
            window.errors += 1;
            if !connection.reopen().await {
                return windows;
            }
        }
    }
}

/// One client walking its own resource through start, then complete (or,
/// one time in four, fail), at its share of the rate. Returns its windows,
/// the transitions acknowledged and those whose outcome is unknown.
pub(super) async fn mutation_client(soak: Arc<Soak>, client: usize) -> (Windows, u64, u64) {
    let mut windows = soak.empty.clone();
    let (mut acknowledged, mut unknown) = (0, 0);
    let resource = &soak.resources[client];
    let Ok(mut connection) = HttpConnection::open(&soak.base).await else {
        windows.at(Instant::now()).errors += 1;
        return (windows, 0, 0);
    };
    let mut tick = pace(soak.plan.mutation_rate, MUTATION_CLIENTS);
    let mut cycle = 0_u64;
    'run: loop {
        cycle += 1;
        let finish = if cycle.is_multiple_of(4) {
            format!(
                "mutation {{ failSync(resource: \"{resource}\", errors: [{{code: \"HTTP_503\", \
                 message: \"Vantage unavailable\", recordId: \"r-{cycle}\"}}]) {{ lastSyncStatus }} }}"
            )
        } else {
            format!(
                "mutation {{ completeSync(resource: \"{resource}\", recordsSynced: {cycle}, \
                 recordsCreated: 0, recordsUpdated: {cycle}) {{ lastSyncStatus }} }}"
            )
        };
        let start =
            format!("mutation {{ startSync(resource: \"{resource}\") {{ lastSyncStatus }} }}");
        for query in [start, finish] {
            tick.tick().await;
            let started = Instant::now();
            if started >= soak.deadline {
                break 'run;
            }
            let request = connection.post(
                "/graphql",
                &soak.writer,
                &json!({ "query": query }).to_string(),
            );
            let ok = match connection.exchange(&request).await {
                Ok(response) => response.status == 200 && is_data(response.body),
                Err(_) => false,
            };
            let window = windows.at(started);
            window.mutations.push(started.elapsed());
            if ok {
                acknowledged += 1;
            } else {
                window.errors += 1;
                unknown += 1;
                // The transition may not have happened: start the cycle
                // again on a fresh connection.
                if !connection.reopen().await {
                    break 'run;
                }
                continue 'run;
            }
        }
    }
    (windows, acknowledged, unknown)
}

/// A slowloris: a request head sent a header a second, never finished,
/// again as soon as the server closes it. Returns its windows (closes and
/// how long each was held, by when it closed) and whether it was still
/// held open when the run ended.
pub(super) async fn attacker(soak: Arc<Soak>) -> (Windows, u64) {
    let mut windows = soak.empty.clone();
    let authority = soak.base.trim_start_matches("http://").to_owned();
    while Instant::now() < soak.deadline {
        let opened = Instant::now();
        let Ok(mut stream) = TcpStream::connect(&authority).await else {
            // Refused at the cap (or the server is gone): try again soon.
            tokio::time::sleep(TRICKLE).await;
            continue;
        };
        let head = format!("POST /graphql HTTP/1.1\r\nhost: {authority}\r\n");
        let mut line = 0_u64;
        let mut byte = [0_u8; 64];
        let mut write = stream.write_all(head.as_bytes()).await.is_ok();
        while write {
            tokio::select! {
                read = stream.read(&mut byte) => {
                    if matches!(read, Ok(0) | Err(_)) { break; }
                }
                _ = tokio::time::sleep(TRICKLE) => {
                    if Instant::now() >= soak.deadline {
                        return (windows, 1);
                    }
                    line += 1;
                    write = stream.write_all(format!("x-slow-{line}: a\r\n").as_bytes()).await.is_ok();
                }
            }
        }
        let closed = Instant::now();
        let window = windows.at(closed);
        window.attacks_closed += 1;
        window.attack_hold_max = window.attack_hold_max.max(closed - opened);
    }
    (windows, 0)
}
