//! `query` (the dashboard over HTTP) and `floor` (the same rows straight
//! from PostgreSQL in the same role-switching transaction).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use vantage_sync::auth::Role;

use crate::stats;
use crate::target::Target;

/// The dashboard query: every resource with every field.
pub const DASHBOARD: &str = "{ syncStates { resource lastSyncTime lastSyncStatus recordsSynced \
    recordsCreated recordsUpdated errors { code message recordId timestamp details } startedAt \
    completedAt durationMs createdAt updatedAt errorCount runningSeconds hoursSinceSync \
    durationSeconds recordsPerSecond health } }";

const TOP_LEVEL_ERRORS: &[u8] = br#""errors":[{"message""#;

/// Gives the seeded rows realistic contents: successes, a failure with
/// errors, a running sync.
pub async fn prepare(target: &Target) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(&target.database_url)
        .await
        .context("cannot reach the server's database")?;
    conn.execute(
        r#"DO $$ BEGIN
             IF (SELECT last_sync_status FROM vantage_sync_state WHERE resource = 'accounts') = 'never_run' THEN
               PERFORM start_vantage_sync(r) FROM unnest(ARRAY['accounts', 'funds', 'cashflows', 'commitments', 'investors']) r;
               PERFORM complete_vantage_sync(r, 1000, 100, 800) FROM unnest(ARRAY['accounts', 'funds', 'cashflows']) r;
               PERFORM fail_vantage_sync('commitments', '[{"code": "HTTP_503", "message": "Vantage unavailable", "recordId": "c-17", "timestamp": "2025-11-05T13:28:40Z", "details": {"attempt": 3}}]');
             END IF;
           END $$"#,
    )
    .await?;
    conn.close().await?;
    Ok(())
}

/// Collected by each worker.
#[derive(Default)]
pub struct Samples {
    pub latencies: Vec<Duration>,
    pub errors: u64,
}

impl Samples {
    /// One call that began at `started`, and whether it succeeded.
    pub fn record(&mut self, started: Instant, ok: bool) {
        self.latencies.push(started.elapsed());
        if !ok {
            self.errors += 1;
        }
    }
}

/// Runs `workers` copies of `work` until `duration` passes; merges samples.
pub async fn drive<F, Fut>(workers: usize, duration: Duration, work: F) -> (Samples, Duration)
where
    F: Fn(usize, Instant) -> Fut,
    Fut: std::future::Future<Output = Samples> + Send + 'static,
{
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|worker| tokio::spawn(work(worker, deadline)))
        .collect();
    let mut all = Samples::default();
    for task in tasks {
        match task.await {
            Ok(samples) => {
                all.latencies.extend(samples.latencies);
                all.errors += samples.errors;
            }
            Err(_) => all.errors += 1,
        }
    }
    (all, started.elapsed())
}

fn report(mut samples: Samples, elapsed: Duration, concurrency: usize) -> Value {
    let count = samples.latencies.len();
    json!({
        "concurrency": concurrency,
        "seconds": elapsed.as_secs_f64(),
        "requests": count,
        "requests_per_second": count as f64 / elapsed.as_secs_f64(),
        "latency_ms": stats::summary(&mut samples.latencies),
        "errors": samples.errors,
    })
}

/// `concurrency` keep-alive HTTP clients sending the dashboard query.
pub async fn query(
    target: &Target,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let url = Arc::new(format!("{}/graphql", target.base));
    let token = Arc::new(format!("Bearer {}", target.token(Role::Authenticated)));
    let body = Arc::new(json!({"query": DASHBOARD}).to_string());
    let (samples, elapsed) = drive(concurrency, duration, |_, deadline| {
        let (url, token, body) = (url.clone(), token.clone(), body.clone());
        async move {
            // One client per worker: one keep-alive connection each.
            let client = reqwest::Client::new();
            let mut samples = Samples::default();
            while Instant::now() < deadline {
                let started = Instant::now();
                let response = client
                    .post(url.as_str())
                    .header("authorization", token.as_str())
                    .header("content-type", "application/json")
                    .body(body.as_str().to_owned())
                    .send()
                    .await;
                let ok = match response {
                    Ok(response) if response.status().is_success() => {
                        match response.bytes().await {
                            // Top-level errors; SyncState's own `errors` field
                            // holds {"code": ...} objects, never {"message": ...} first.
                            Ok(bytes) => !bytes
                                .windows(TOP_LEVEL_ERRORS.len())
                                .any(|window| window == TOP_LEVEL_ERRORS),
                            Err(_) => false,
                        }
                    }
                    _ => false,
                };
                samples.record(started, ok);
            }
            samples
        }
    })
    .await;
    Ok(report(samples, elapsed, concurrency))
}

/// The physical floor: the server's transaction for the dashboard query
/// (begin, role and claims, the read, commit) straight on PostgreSQL.
pub async fn floor(
    target: &Target,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let url = Arc::new(target.database_url.clone());
    let (samples, elapsed) = drive(concurrency, duration, |_, deadline| {
        let url = url.clone();
        async move {
            let mut samples = Samples::default();
            let Ok(mut conn) = PgConnection::connect(&url).await else {
                samples.errors += 1;
                return samples;
            };
            while Instant::now() < deadline {
                let started = Instant::now();
                let ok = read_once(&mut conn).await.is_ok();
                samples.record(started, ok);
            }
            samples
        }
    })
    .await;
    Ok(report(samples, elapsed, concurrency))
}

async fn read_once(conn: &mut PgConnection) -> Result<usize, sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query(
        "SELECT set_config('role', 'authenticated', true), \
         set_config('request.jwt.claims', '{\"role\":\"authenticated\"}', true), \
         set_config('statement_timeout', '30000', true), set_config('transaction_read_only', 'on', true)",
    )
    .execute(&mut *tx)
    .await?;
    let rows = sqlx::query("SELECT * FROM public.vantage_sync_state ORDER BY resource")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}
