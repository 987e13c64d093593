//! `webhooks`: W webhooks pointing at a receiver on loopback (the test
//! harness's), then K changes made in the database at a steady rate. For
//! every webhook and change: the delay from commit to receipt, what was
//! lost, delivered twice or out of order, and the CPU the server and its
//! PostgreSQL spent per delivered notification.
//!
//! Each change is one start or one completion, so it makes exactly one
//! notification (`sync.started` or `sync.succeeded`; the webhooks ask for
//! nothing else), and a webhook's i-th delivery is the i-th change.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use vantage_sync_testkit::Receiver;

use crate::stats;
use crate::target::Target;

/// Sizes of one run.
pub struct Plan {
    /// Webhooks, each told every change.
    pub webhooks: usize,
    /// Changes made.
    pub changes: usize,
    /// Changes per second.
    pub rate: u32,
}

/// Resources the changes go round.
const RESOURCES: usize = 10;
/// Longest wait for the last deliveries after the last change.
const DRAIN: Duration = Duration::from_secs(120);

pub async fn run(target: &Target, plan: Plan) -> anyhow::Result<Value> {
    let receiver = Receiver::start().await;
    let mut conn = PgConnection::connect(&target.database_url).await?;
    let mut paths = Vec::with_capacity(plan.webhooks);
    for n in 0..plan.webhooks {
        let path = format!("/bench{n}");
        // Straight through the database function (as the API does): the
        // setup is not what is measured.
        sqlx::query(
            "SELECT id FROM create_vantage_webhook($1, ARRAY['sync.started', 'sync.succeeded'], NULL, 'json', $2)",
        )
        .bind(receiver.url(&path))
        .bind("whsec_QmVuY2hCZW5jaEJlbmNoQmVuY2hCZW5jaEJlbmNoISE=")
        .execute(&mut conn)
        .await?;
        paths.push(path);
    }
    let resources: Vec<String> = (0..RESOURCES)
        .map(|n| format!("webhook_probe_{n}"))
        .collect();
    for resource in &resources {
        sqlx::query("INSERT INTO vantage_sync_state (resource) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(resource)
            .execute(&mut conn)
            .await?;
    }
    // The registrations above make no notification the webhooks want.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let meter = target.cpu_meter();
    let before = meter.sample();
    let mut ticks =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1))));
    let mut committed = Vec::with_capacity(plan.changes);
    for change in 0..plan.changes {
        ticks.tick().await;
        let resource = &resources[(change / 2) % RESOURCES];
        let statement = if change % 2 == 0 {
            "SELECT start_vantage_sync($1)"
        } else {
            "SELECT complete_vantage_sync($1, 1, 1, 0)"
        };
        sqlx::query(statement)
            .bind(resource)
            .execute(&mut conn)
            .await?;
        committed.push(Instant::now());
    }
    let expected = plan.changes;
    let deadline = Instant::now() + DRAIN;
    for path in &paths {
        let left = deadline.saturating_duration_since(Instant::now());
        receiver.wait_for(path, left, |r| r.len() >= expected).await;
    }
    let after = meter.sample();

    let mut delays = Vec::with_capacity(expected * paths.len());
    let (mut delivered, mut lost, mut duplicates, mut out_of_order) = (0_u64, 0_u64, 0_u64, 0_u64);
    // Deliveries that are not the change they should be (type, resource).
    let mut mismatched = 0_u64;
    for path in &paths {
        let received = receiver.received(path);
        let mut seen = HashSet::new();
        let mut last = 0_i64;
        let mut index = 0_usize;
        for r in &received {
            let id: i64 = r.id.parse().unwrap_or(0);
            if !seen.insert(id) {
                duplicates += 1;
                continue;
            }
            if id < last {
                out_of_order += 1;
            }
            last = id;
            let body = r.json();
            let want = if index.is_multiple_of(2) {
                "sync.started"
            } else {
                "sync.succeeded"
            };
            let resource = resources.get((index / 2) % RESOURCES);
            if body["type"] != want || body["resource"].as_str() != resource.map(String::as_str) {
                if mismatched == 0 {
                    eprintln!(
                        "webhooks: delivery {index} of {path} is {body}, not {want} of {resource:?}"
                    );
                }
                mismatched += 1;
            }
            if let Some(at) = committed.get(index) {
                delays.push(r.at.saturating_duration_since(*at));
            }
            index += 1;
        }
        delivered += seen.len() as u64;
        lost += expected.saturating_sub(seen.len()) as u64;
    }
    Ok(json!({
        "webhooks": plan.webhooks,
        "changes": plan.changes,
        "change_rate": plan.rate,
        "delivered": delivered,
        "lost": lost,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "mismatched": mismatched,
        "delay_ms": stats::summary(&mut delays),
        "cpu_us_per_delivery": meter.per_request(before, after, delivered),
    }))
}
