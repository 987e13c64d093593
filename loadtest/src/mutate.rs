//! `mutate`: start + complete cycles as service_role, each client on its
//! own resource, then a check in the event log that none was lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use vantage_sync::auth::Role;

use crate::http::HttpConnection;
use crate::load::{Samples, drive, metered};
use crate::stats;
use crate::target::Target;

pub async fn run(target: &Target, concurrency: usize, duration: Duration) -> anyhow::Result<Value> {
    let base = Arc::new(target.base.clone());
    let token = Arc::new(format!("Bearer {}", target.token(Role::ServiceRole)));
    let run_id = std::process::id();
    let ((samples, elapsed), before, after) = metered(
        target,
        drive(concurrency, duration, |worker, deadline| {
            let (base, token) = (base.clone(), token.clone());
            async move {
                let mut samples = Samples::default();
                let Ok(mut connection) = HttpConnection::open(&base).await else {
                    samples.errors += 1;
                    return samples;
                };
                let resource = format!("bench_{run_id}_{worker}");
                let mut cycle = 0;
                while Instant::now() < deadline {
                    cycle += 1;
                    for query in [
                        format!("mutation {{ startSync(resource: \"{resource}\") {{ lastSyncStatus }} }}"),
                        format!(
                            "mutation {{ completeSync(resource: \"{resource}\", recordsSynced: {cycle}, recordsCreated: 0, recordsUpdated: {cycle}) {{ lastSyncStatus }} }}"
                        ),
                    ] {
                        let request =
                            connection.post("/graphql", &token, &json!({"query": query}).to_string());
                        let started = Instant::now();
                        let ok = match connection.exchange(&request).await {
                            Ok(response) => {
                                response.status == 200
                                    && serde_json::from_slice::<Value>(response.body)
                                        .is_ok_and(|body| body.get("errors").is_none())
                            }
                            Err(_) => false,
                        };
                        samples.record(started, ok);
                        if !ok && !connection.reopen().await {
                            return samples;
                        }
                    }
                }
                samples
            }
        }),
    )
    .await;
    // Every acknowledged transition must be in the log, in order, and the
    // rows must hold the last cycle.
    let mut conn = PgConnection::connect(&target.database_url).await?;
    let logged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM vantage_sync_events WHERE resource LIKE $1 AND status IN ('running', 'success')",
    )
    .bind(format!("bench_{run_id}_%"))
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    let acknowledged = samples.latencies.len() as u64 - samples.errors;
    let lost = acknowledged.saturating_sub(logged.unsigned_abs());
    let mut samples = samples;
    let count = samples.latencies.len();
    Ok(json!({
        "concurrency": concurrency,
        "resources": concurrency,
        "seconds": elapsed.as_secs_f64(),
        "requests": count,
        "requests_per_second": acknowledged as f64 / elapsed.as_secs_f64(),
        "latency_ms": stats::summary(&mut samples.latencies),
        "errors": samples.errors,
        "logged": logged,
        "lost": lost,
        "cpu_us_per_request": target.cpu_meter().per_request(before, after, count as u64),
    }))
}
