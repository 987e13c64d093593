//! What dashboards derive from a resource's sync state row as of a moment:
//! its health, and the counts and rates the row implies. One definition,
//! read by the GraphQL schema and by webhook payloads alike.

use chrono::{DateTime, Duration, Utc};
use entity::SyncStatus as Status;
use entity::vantage_sync_state::Model;

/// A sync running longer than this is stuck (RED).
pub const STUCK_AFTER: Duration = Duration::minutes(30);
/// No success for longer than this is stale (YELLOW).
pub const STALE_AFTER: Duration = Duration::hours(24);

/// Dashboard traffic light of a resource.
#[derive(async_graphql::Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncHealth {
    /// Failed, or running for more than 30 minutes (stuck).
    Red,
    /// Never run, or no successful sync in the last 24 hours.
    Yellow,
    /// Synced successfully within the last 24 hours.
    Green,
}

/// RED: failed, or running for more than 30 minutes. YELLOW: never run, or
/// no success in the last 24 hours. GREEN otherwise.
pub fn health(row: &Model, now: DateTime<Utc>) -> SyncHealth {
    let stuck = row.last_sync_status == Status::Running
        && row
            .started_at
            .is_some_and(|started| now - started.with_timezone(&Utc) > STUCK_AFTER);
    if row.last_sync_status == Status::Failed || stuck {
        return SyncHealth::Red;
    }
    let fresh = row
        .last_sync_time
        .is_some_and(|at| now - at.with_timezone(&Utc) <= STALE_AFTER);
    if row.last_sync_status == Status::NeverRun || !fresh {
        SyncHealth::Yellow
    } else {
        SyncHealth::Green
    }
}

/// A stored time in UTC, as the API gives every time.
pub fn utc(at: Option<DateTime<chrono::FixedOffset>>) -> Option<DateTime<Utc>> {
    at.map(|at| at.with_timezone(&Utc))
}

/// Errors of the last failed sync.
pub fn error_count(row: &Model) -> i32 {
    i32::try_from(row.errors.0.len()).unwrap_or(i32::MAX)
}

/// Seconds the current sync has been running; `None` unless running.
pub fn running_seconds(row: &Model, now: DateTime<Utc>) -> Option<i32> {
    if row.last_sync_status != Status::Running {
        return None;
    }
    let started = row.started_at?.with_timezone(&Utc);
    i32::try_from((now - started).num_seconds().max(0)).ok()
}

/// Hours since the last successful sync; `None` if there was none.
pub fn hours_since_sync(row: &Model, now: DateTime<Utc>) -> Option<f64> {
    let at = row.last_sync_time?.with_timezone(&Utc);
    Some((now - at).num_milliseconds() as f64 / 3_600_000.0)
}

/// Duration of the last finished sync in seconds.
pub fn duration_seconds(row: &Model) -> Option<f64> {
    row.duration_ms.map(|ms| f64::from(ms) / 1000.0)
}

/// Throughput of the last sync, when it succeeded and took measurable time.
pub fn records_per_second(row: &Model) -> Option<f64> {
    let ms = row.duration_ms.filter(|ms| *ms > 0)?;
    (row.last_sync_status == Status::Success)
        .then(|| f64::from(row.records_synced) * 1000.0 / f64::from(ms))
}
