//! `fanout` and `sse`: S subscribers (over WebSocket, or GraphQL over
//! SSE), then K changes made in the database; for every subscriber and
//! change the delay from commit to receipt, what was missed, and the
//! server's CPU per delivery and memory per subscriber.
//!
//! With N shapes the subscribers are spread evenly over N distinct
//! subscriptions (see [`Shape`]), all of which receive every change: how
//! much a server that renders each change once per distinct subscription
//! gains over one that renders it once per subscriber, and what it costs
//! when subscriptions share nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::sync::Semaphore;
use vantage_sync::auth::Role;

use crate::delivery_floor::DeliveryFloor;
use crate::readers::{Decoder, Readers, Subscriber, Tally};
use crate::stats;
use crate::target::Target;

/// The resource changed and followed, unless `--probe-resource` names
/// another.
pub const PROBE_RESOURCE: &str = "fanout_probe";
/// The subscription every subscriber of shape 0 sends, for `RESOURCE`.
const SUBSCRIPTION: &str = "subscription { syncStateChanged(resources: [\"RESOURCE\"]) { \
    resource cursor state { lastSyncStatus recordsSynced } } }";
/// The field of `state` that carries the change number in [`SUBSCRIPTION`].
const NUMBER_FIELD: &str = "recordsSynced";

/// One of the distinct subscriptions the subscribers are spread over.
///
/// Shape 0 is [`SUBSCRIPTION`] itself. Shape i > 0 is the same document
/// with `recordsSynced` under the alias `records` + i in six digits
/// (`records000001: recordsSynced`, 13 characters like the field's own
/// name): the same filter, so it receives every change to the probe, and a
/// payload of the same length, so deliveries cost the same whatever the
/// shape, but a distinct document and a distinct rendering. Each
/// subscriber reads its change number under its own alias, so a rendering
/// shared across shapes by mistake counts as an error, not a delivery.
struct Shape {
    document: String,
    number_field: String,
}

impl Shape {
    /// Shape `index` of the subscription to `resource`.
    fn new(index: usize, resource: &str) -> Self {
        let document = SUBSCRIPTION.replacen("RESOURCE", resource, 1);
        if index == 0 {
            return Self {
                document,
                number_field: NUMBER_FIELD.to_owned(),
            };
        }
        let alias = format!("records{index:06}");
        Self {
            document: document.replacen(NUMBER_FIELD, &format!("{alias}: {NUMBER_FIELD}"), 1),
            number_field: alias,
        }
    }
}

/// What a `fanout` or `sse` run does.
pub struct Plan {
    /// Subscribers (S).
    pub subscribers: usize,
    /// Distinct subscriptions they are spread over (N).
    pub shapes: usize,
    /// Changes made (K).
    pub changes: usize,
    /// Time between changes.
    pub interval: Duration,
    /// The resource changed and followed.
    pub resource: String,
    /// When to make the first change, if at a set time: several load
    /// tools, each with its own resource, then change while all of their
    /// subscribers are connected.
    pub changes_at: Option<std::time::SystemTime>,
    /// A file to write every delay to (milliseconds, one per line), for
    /// percentiles over several load tools.
    pub delays_out: Option<std::path::PathBuf>,
}

/// How subscribers follow the changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// graphql-transport-ws.
    WebSocket,
    /// graphql-sse, distinct connections.
    Sse,
}

/// Who delivers the changes, and how they are made.
pub enum Deliverer<'a> {
    /// The server: each change is written to its database.
    Server(&'a Target),
    /// The delivery floor: each change is announced to it.
    Floor(&'a mut DeliveryFloor),
}

/// How the changes are made.
enum Changes<'a> {
    /// A connection to the server's database, and the resource changed.
    Database(PgConnection, String),
    Floor(&'a mut DeliveryFloor),
}

impl Changes<'_> {
    async fn make(&mut self, number: usize) -> anyhow::Result<()> {
        match self {
            Self::Database(conn, resource) => {
                sqlx::query(
                    "UPDATE vantage_sync_state SET records_synced = $2 WHERE resource = $1",
                )
                .bind(&*resource)
                .bind(i32::try_from(number).unwrap_or(i32::MAX))
                .execute(conn)
                .await?;
            }
            Self::Floor(floor) => floor.change(number as u64)?,
        }
        Ok(())
    }
}

pub async fn run(
    deliverer: Deliverer<'_>,
    transport: Transport,
    plan: Plan,
) -> anyhow::Result<Value> {
    let Plan {
        subscribers,
        shapes,
        changes,
        interval,
        resource,
        changes_at,
        delays_out,
    } = plan;
    let shapes = shapes.max(1);
    let shape_list: Arc<Vec<Shape>> = Arc::new(
        (0..shapes)
            .map(|index| Shape::new(index, &resource))
            .collect(),
    );
    // The process that delivers (whose memory and CPU are measured), and
    // how changes reach it.
    let (base, token, pid, meter, mut made) = match deliverer {
        Deliverer::Server(target) => {
            let mut conn = PgConnection::connect(&target.database_url).await?;
            sqlx::query(
                "INSERT INTO vantage_sync_state (resource) VALUES ($1) ON CONFLICT DO NOTHING",
            )
            .bind(&resource)
            .execute(&mut conn)
            .await?;
            (
                target.base.clone(),
                target.token(Role::Authenticated),
                target.pid(),
                target.cpu_meter(),
                Changes::Database(conn, resource.clone()),
            )
        }
        Deliverer::Floor(floor) => (
            floor.base.clone(),
            String::new(),
            Some(floor.pid()),
            floor.cpu_meter(),
            Changes::Floor(floor),
        ),
    };
    let rss_kib = || pid.and_then(crate::target::rss_kib);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib();
    let token = Arc::new(token);
    let connecting = Arc::new(Semaphore::new(128));
    let (ready_send, mut ready) = tokio::sync::mpsc::channel::<bool>(subscribers.max(1));
    let finished = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(subscribers);
    for subscriber in 0..subscribers {
        let (base, token, connecting, ready_send, shape_list, finished) = (
            base.clone(),
            token.clone(),
            connecting.clone(),
            ready_send.clone(),
            shape_list.clone(),
            finished.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Round robin: shape sizes differ by one subscriber at most.
            let shape = &shape_list[subscriber % shapes];
            let permit = connecting.acquire_owned().await;
            let opened = match transport {
                Transport::WebSocket => crate::ws::open(&base, &token, &shape.document, &json!({}))
                    .await
                    .map(|(stream, decoder)| (stream, Decoder::WebSocket(decoder))),
                Transport::Sse => crate::sse::open(&base, &token, &shape.document)
                    .await
                    .map(|(stream, decoder)| (stream, Decoder::Sse(decoder))),
            };
            drop(permit);
            let _ = ready_send.send(opened.is_ok()).await;
            opened.map(|(stream, decoder)| Subscriber {
                stream,
                decoder,
                tally: Tally::new(changes, finished, shape.number_field.as_str().into()),
            })
        }));
    }
    drop(ready_send);
    let mut connected = 0;
    let mut failed = 0_u64;
    while let Some(ok) = ready.recv().await {
        if ok {
            connected += 1
        } else {
            failed += 1
        }
        if connected + failed as usize == subscribers {
            break;
        }
    }
    // From here on every subscription is read on the readers' threads.
    let mut to_read = Vec::with_capacity(subscribers);
    for task in tasks {
        if let Ok(Ok(subscriber)) = task.await {
            to_read.push(subscriber);
        }
    }
    let readers = Readers::start(to_read)?;
    // Let every subscription start before changing anything.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let rss_after = rss_kib();

    if let Some(at) = changes_at {
        let wait = at
            .duration_since(std::time::SystemTime::now())
            .map_err(|_| {
                anyhow::anyhow!(
                    "the subscribers were still connecting at --changes-at: give them longer"
                )
            })?;
        tokio::time::sleep(wait).await;
    }
    let cpu_before = meter.sample();
    let mut committed = Vec::with_capacity(changes);
    for change in 1..=changes {
        made.make(change).await?;
        committed.push(Instant::now());
        tokio::time::sleep(interval).await;
    }
    // Wait (at most 10 s) until every subscriber has the last change.
    let expected = (connected * changes) as u64;
    let wait_until = Instant::now() + Duration::from_secs(10);
    while changes > 0
        && finished.load(std::sync::atomic::Ordering::Relaxed) < connected as u64
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_after = meter.sample();
    let tallies = tokio::task::spawn_blocking(move || readers.stop()).await??;
    let mut delays = Vec::with_capacity(expected as usize);
    let mut errors = failed;
    let mut received_total = 0_u64;
    for tally in tallies {
        errors += tally.errors;
        for (change, at) in tally.received {
            if let Some(commit) = change
                .checked_sub(1)
                .and_then(|index| committed.get(index as usize))
            {
                received_total += 1;
                delays.push(at.saturating_duration_since(*commit));
            }
        }
    }
    if let Some(path) = delays_out {
        let lines: String = delays
            .iter()
            .map(|delay| format!("{:.3}\n", delay.as_secs_f64() * 1000.0))
            .collect();
        std::fs::write(&path, lines)
            .with_context(|| format!("writing the delays to {}", path.display()))?;
    }
    if let Changes::Database(conn, _) = made {
        conn.close().await?;
    }
    let per_subscriber = match (rss_before, rss_after) {
        (Some(before), Some(after)) if connected > 0 => {
            json!(after.saturating_sub(before) as f64 / connected as f64)
        }
        _ => Value::Null,
    };
    Ok(json!({
        "subscribers": subscribers,
        "shapes": shapes,
        "connected": connected,
        "changes": changes,
        "interval_ms": interval.as_millis() as u64,
        "delivered": received_total,
        "missed": expected.saturating_sub(received_total) + (failed * changes as u64),
        "errors": errors,
        "delay_ms": stats::summary(&mut delays),
        // CPU per change delivered to one subscriber: much steadier from run
        // to run than the delays, which hang on the machine's other load.
        "cpu_us_per_delivery": meter.per_request(cpu_before, cpu_after, received_total),
        "rss_kib_before": rss_before,
        "rss_kib_after": rss_after,
        "rss_kib_per_subscriber": per_subscriber,
    }))
}
