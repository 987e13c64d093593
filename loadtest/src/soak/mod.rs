//! `soak`: a mixed load held for a set time, to show the server stays well
//! over a long run rather than for ten seconds: paced queries and
//! mutations, WebSocket subscribers that leave and come back resuming by
//! cursor, and a few slowloris attackers. Reported per time window
//! (latency, errors, missed events, the server's memory and open files),
//! with the slope of its memory over the run.
//!
//! Correctness is checked against the event log at the end: every
//! acknowledged transition is logged, and every subscriber, across all its
//! sessions, received every event of the soak's resources after its start,
//! in order, once.

mod clients;
mod subscriber;
mod windows;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::{Semaphore, watch};
use vantage_sync::Cursor;
use vantage_sync::auth::Role;

use crate::target::Target;
use clients::{attacker, mutation_client, query_client};
use subscriber::subscriber;
use windows::{Windows, report};

/// How hard and how long to soak.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Length of the run.
    pub duration: Duration,
    /// Length of one report window.
    pub window: Duration,
    /// Queries per second, over all query clients.
    pub query_rate: u32,
    /// Transitions per second, over all mutation clients.
    pub mutation_rate: u32,
    /// WebSocket subscribers, each leaving and resuming in turn.
    pub subscribers: usize,
    /// Connections that send a request head a header at a time, forever.
    pub attackers: usize,
}

/// Keep-alive HTTP clients sharing the query rate.
const QUERY_CLIENTS: usize = 8;
/// Mutation clients, each on a resource of its own.
const MUTATION_CLIENTS: usize = 4;
/// How long, after the load stops, subscribers may take to catch up.
const DRAIN: Duration = Duration::from_secs(30);

/// Seconds since the Unix epoch, as PostgreSQL's clock reads them.
fn wall_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}
/// What every task of the run shares.
struct Soak {
    base: String,
    ws_url: String,
    reader: String,
    writer: String,
    resources: Vec<String>,
    subscription: String,
    /// The log's head when the run began: every subscriber starts after it.
    start: Cursor,
    deadline: Instant,
    empty: Windows,
    plan: Plan,
}
pub async fn run(target: &Target, plan: Plan) -> anyhow::Result<Value> {
    let mut conn = PgConnection::connect(&target.database_url).await?;
    let head: i64 =
        sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM public.vantage_sync_events")
            .fetch_one(&mut conn)
            .await?;
    let run_id = std::process::id();
    let resources: Vec<String> = (0..MUTATION_CLIENTS)
        .map(|client| format!("soak_{run_id}_{client}"))
        .collect();
    let subscription = format!(
        "subscription($after: String) {{ syncStateChanged(resources: {}, after: $after) \
         {{ resource cursor at }} }}",
        serde_json::to_string(&resources)?
    );
    let started = Instant::now();
    let started_wall = wall_now();
    let soak = Arc::new(Soak {
        base: target.base.clone(),
        ws_url: target.base.replacen("http://", "ws://", 1) + "/graphql",
        reader: target.token(Role::Authenticated),
        writer: format!("Bearer {}", target.token(Role::ServiceRole)),
        resources,
        subscription,
        start: Cursor::at(head),
        deadline: started + plan.duration,
        empty: Windows::new(started, started_wall, &plan),
        plan: plan.clone(),
    });

    let (finish_send, finish) = watch::channel(None::<i64>);
    let connecting = Arc::new(Semaphore::new(64));
    let subscribers: Vec<_> = (0..plan.subscribers)
        .map(|index| {
            tokio::spawn(subscriber(
                soak.clone(),
                index,
                finish.clone(),
                connecting.clone(),
            ))
        })
        .collect();
    let queries: Vec<_> = (0..QUERY_CLIENTS)
        .map(|client| tokio::spawn(query_client(soak.clone(), client)))
        .collect();
    let mutations: Vec<_> = (0..MUTATION_CLIENTS)
        .map(|client| tokio::spawn(mutation_client(soak.clone(), client)))
        .collect();
    let attackers: Vec<_> = (0..plan.attackers)
        .map(|_| tokio::spawn(attacker(soak.clone())))
        .collect();
    let samples = sample_server(target, &soak).await;

    let mut windows = soak.empty.clone();
    let mut acknowledged = 0_u64;
    let mut unknown = 0_u64;
    for task in queries {
        windows.merge(task.await?);
    }
    for task in mutations {
        let (client, acked, failed) = task.await?;
        windows.merge(client);
        acknowledged += acked;
        unknown += failed;
    }
    let mut attacks_open_at_end = 0;
    for task in attackers {
        let (attacks, open) = task.await?;
        windows.merge(attacks);
        attacks_open_at_end += open;
    }

    // Every subscriber must now reach the last event of the run.
    let events: Vec<(i64, f64)> = sqlx::query_as(
        "SELECT id, extract(epoch FROM occurred_at)::float8 FROM public.vantage_sync_events \
         WHERE resource = ANY($1) AND id > $2 ORDER BY id",
    )
    .bind(&soak.resources)
    .bind(head)
    .fetch_all(&mut conn)
    .await?;
    conn.close().await?;
    let last = events.last().map_or(head, |(id, _)| *id);
    let _ = finish_send.send(Some(last));
    let (mut delivered, mut duplicates, mut sessions) = (0_u64, 0_u64, 0_u64);
    for task in subscribers {
        let result = task.await?;
        windows.merge(result.windows);
        sessions += result.sessions;
        duplicates += result.duplicates;
        delivered += result.received.len() as u64;
        for committed in missing(&events, &result.received) {
            windows.at_wall(committed).missed += 1;
        }
    }
    drop(finish_send);

    let logged = events.len() as u64;
    Ok(report(
        &plan,
        windows,
        &samples,
        json!({
            "transitions_acknowledged": acknowledged,
            "transitions_unknown": unknown,
            "transitions_logged": logged,
            // Acknowledged but not in the log; a failed request may or may
            // not have committed, so only acknowledged ones count.
            "lost": acknowledged.saturating_sub(logged),
            "events": logged,
            "delivered": delivered,
            "duplicates": duplicates,
            "sessions": sessions,
            "attacks_open_at_end": attacks_open_at_end,
        }),
    ))
}

/// When each of the `events` (id, commit time) that a subscriber which
/// received `received` (in order) did not get was committed.
fn missing(events: &[(i64, f64)], received: &[i64]) -> Vec<f64> {
    let mut got = received.iter().peekable();
    let mut missing = Vec::new();
    for &(id, committed) in events {
        while got.next_if(|&&seen| seen < id).is_some() {}
        if got.next_if(|&&seen| seen == id).is_none() {
            missing.push(committed);
        }
    }
    missing
}

/// The server's memory and open files, once a second until the run ends:
/// (seconds into the run, RSS KiB, open descriptors).
async fn sample_server(target: &Target, soak: &Soak) -> Vec<(f64, Option<u64>, Option<u64>)> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = Instant::now();
        samples.push((
            now.saturating_duration_since(soak.empty.started)
                .as_secs_f64(),
            target.rss_kib(),
            target.open_fds(),
        ));
        if now >= soak.deadline {
            return samples;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::missing;

    #[test]
    fn missing_finds_gaps_and_ignores_what_was_not_wanted() {
        let events = [(3, 30.0), (5, 50.0), (8, 80.0), (9, 90.0)];
        assert_eq!(missing(&events, &[3, 5, 8, 9]), Vec::<f64>::new());
        // 4 and 7 belong to other resources: never expected.
        assert_eq!(missing(&events, &[3, 4, 5, 7, 9]), vec![80.0]);
        assert_eq!(missing(&events, &[]), vec![30.0, 50.0, 80.0, 90.0]);
        assert_eq!(missing(&events, &[9]), vec![30.0, 50.0, 80.0]);
    }
}
