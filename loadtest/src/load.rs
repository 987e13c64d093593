//! `query` (the dashboard over HTTP) and `floor` (the same rows straight
//! from PostgreSQL in the same role-switching transaction).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};
use vantage_sync::auth::Role;
use vantage_sync::db::{Access, begin_statement};

use crate::cpu::CpuSample;
use crate::http::HttpConnection;
use crate::stats;
use crate::target::Target;

/// The dashboard query: every resource with every field.
pub const DASHBOARD: &str = "{ syncStates { resource lastSyncTime lastSyncStatus recordsSynced \
    recordsCreated recordsUpdated errors { code message recordId timestamp details } startedAt \
    completedAt durationMs createdAt updatedAt errorCount runningSeconds hoursSinceSync \
    durationSeconds recordsPerSecond health } }";

const TOP_LEVEL_ERRORS: &[u8] = br#""errors":[{"message""#;

/// Gives the initial resources realistic contents: successes, a failure with
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
    /// Responses by the replica a balancer named in `x-served-by`; empty
    /// without a balancer.
    pub served_by: BTreeMap<String, u64>,
}

impl Samples {
    /// One call that began at `started`, and whether it succeeded.
    pub fn record(&mut self, started: Instant, ok: bool) {
        self.latencies.push(started.elapsed());
        if !ok {
            self.errors += 1;
        }
    }

    /// Counts a response that `replica` answered, if a balancer said so.
    pub fn served_by(&mut self, replica: Option<&str>) {
        let Some(replica) = replica else { return };
        match self.served_by.get_mut(replica) {
            Some(count) => *count += 1,
            None => {
                self.served_by.insert(replica.to_owned(), 1);
            }
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
                for (replica, count) in samples.served_by {
                    *all.served_by.entry(replica).or_default() += count;
                }
            }
            Err(_) => all.errors += 1,
        }
    }
    (all, started.elapsed())
}

/// The figures of one timed scenario; with `served_by` when a balancer
/// named the replicas that answered.
pub fn report(
    mut samples: Samples,
    elapsed: Duration,
    concurrency: usize,
    cpu_us_per_request: Value,
) -> Value {
    let count = samples.latencies.len();
    let mut report = json!({
        "concurrency": concurrency,
        "seconds": elapsed.as_secs_f64(),
        "requests": count,
        "requests_per_second": count as f64 / elapsed.as_secs_f64(),
        "latency_ms": stats::summary(&mut samples.latencies),
        "errors": samples.errors,
        "cpu_us_per_request": cpu_us_per_request,
    });
    if !samples.served_by.is_empty() {
        report["served_by"] = json!(samples.served_by);
    }
    report
}

/// Runs `scenario` between two CPU samples; the second is taken once
/// PostgreSQL has reaped the backends of connections the scenario closed.
pub async fn metered<T>(
    target: &Target,
    scenario: impl std::future::Future<Output = T>,
) -> (T, CpuSample, CpuSample) {
    let meter = target.cpu_meter();
    let before = meter.sample();
    let result = scenario.await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    (result, before, meter.sample())
}

/// `concurrency` keep-alive HTTP clients sending the dashboard query.
pub async fn query(
    target: &Target,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let base = Arc::new(target.base.clone());
    let token = Arc::new(format!("Bearer {}", target.token(Role::Authenticated)));
    let body = Arc::new(json!({"query": DASHBOARD}).to_string());
    let ((samples, elapsed), before, after) = metered(
        target,
        drive(concurrency, duration, |_, deadline| {
            let (base, token, body) = (base.clone(), token.clone(), body.clone());
            async move {
                let mut samples = Samples::default();
                let Ok(mut connection) = HttpConnection::open(&base).await else {
                    samples.errors += 1;
                    return samples;
                };
                let request = connection.post("/graphql", &token, &body);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let ok = match connection.exchange(&request).await {
                        Ok(response) => {
                            samples.served_by(response.served_by);
                            response.status == 200 && is_dashboard(response.body)
                        }
                        Err(_) => false,
                    };
                    samples.record(started, ok);
                    if !ok && !connection.reopen().await {
                        break;
                    }
                }
                samples
            }
        }),
    )
    .await;
    let requests = samples.latencies.len() as u64;
    let cpu = target.cpu_meter().per_request(before, after, requests);
    Ok(report(samples, elapsed, concurrency, cpu))
}

/// An answer with data and no top-level errors.
pub fn is_data(body: &[u8]) -> bool {
    body.starts_with(br#"{"data":"#)
        && !body
            .windows(TOP_LEVEL_ERRORS.len())
            .any(|window| window == TOP_LEVEL_ERRORS)
}

/// A dashboard answer with data and no top-level errors (SyncState's own
/// `errors` field holds {"code": ...} objects, never {"message": ...} first).
fn is_dashboard(body: &[u8]) -> bool {
    body.starts_with(br#"{"data":{"syncStates":["#)
        && !body
            .windows(TOP_LEVEL_ERRORS.len())
            .any(|window| window == TOP_LEVEL_ERRORS)
}

/// The physical floor: the server's transaction for the dashboard query
/// (its begin statement with role and claims, the read, the end) straight
/// on PostgreSQL.
pub async fn floor(
    target: &Target,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Value> {
    let url = Arc::new(target.database_url.clone());
    // The server's own first statement, for a caller with the query
    // scenario's token.
    let caller = target.caller(Role::Authenticated).await?;
    let begin = Arc::new(begin_statement(
        caller.role,
        &caller.claims,
        Duration::from_secs(30),
        Access::Read,
        None,
    ));
    let ((samples, elapsed), before, after) = metered(
        target,
        drive(concurrency, duration, |_, deadline| {
            let (url, begin) = (url.clone(), begin.clone());
            async move {
                let mut samples = Samples::default();
                let Ok(mut conn) = PgConnection::connect(&url).await else {
                    samples.errors += 1;
                    return samples;
                };
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let ok = read_once(&mut conn, &begin).await.is_ok();
                    samples.record(started, ok);
                }
                samples
            }
        }),
    )
    .await;
    let requests = samples.latencies.len() as u64;
    let cpu = target.cpu_meter().per_request(before, after, requests);
    Ok(report(samples, elapsed, concurrency, cpu))
}

async fn read_once(conn: &mut PgConnection, begin: &str) -> Result<usize, sqlx::Error> {
    let mut tx = conn.begin_with(AssertSqlSafe(begin.to_owned())).await?;
    let rows = sqlx::query("SELECT * FROM public.vantage_sync_state ORDER BY resource")
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}
