//! Read operations: sync states, statistics, history, trends and the
//! queries behind the alerts.

use async_graphql::{Context, Object};
use chrono::Duration;
use entity::SyncStatus as Status;

use super::OperationContext;
use super::history::SyncEventConnection;
use super::sync_state::SyncState;
use super::trend::SyncTrend;
use super::types::{SyncHealth, SyncStats, SyncStatus};
use super::validate;
use crate::db::{events, sync_states};
use crate::error::ApiError;
use crate::feed::cursor::Cursor;

/// Read operations; they need an `authenticated` or `service_role` token.
#[derive(Default)]
pub struct SyncQuery;

impl OperationContext {
    fn states(&self, rows: Vec<entity::vantage_sync_state::Model>) -> Vec<SyncState> {
        rows.into_iter()
            .map(|row| SyncState::new(row, self.now))
            .collect()
    }
}

fn status_rank(status: Status) -> u8 {
    match status {
        Status::Failed => 0,
        Status::Running => 1,
        Status::NeverRun => 2,
        Status::Success => 3,
    }
}

#[Object]
impl SyncQuery {
    /// One resource's sync state; null if the resource is not registered.
    async fn sync_state(
        &self,
        ctx: &Context<'_>,
        resource: String,
    ) -> async_graphql::Result<Option<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        validate::resource(&resource)?;
        let row = request
            .read_once(ctx, &resource, async |txn| {
                sync_states::find(txn, &resource).await
            })
            .await?;
        Ok(row.map(|row| SyncState::new(row, request.now)))
    }

    /// Every resource, optionally filtered by status and health: failed
    /// first, then running, never run, successful; by resource within each.
    async fn sync_states(
        &self,
        ctx: &Context<'_>,
        status: Option<Vec<SyncStatus>>,
        health: Option<Vec<SyncHealth>>,
    ) -> async_graphql::Result<Vec<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        let rows = request
            .read_once(ctx, "", async |txn| {
                sync_states::list(txn, status.as_deref()).await
            })
            .await?;
        let mut states = request.states(rows);
        if let Some(health) = health {
            states.retain(|state| health.contains(&state.health()));
        }
        // Stable: the database already ordered each status by resource.
        states.sort_by_key(|state| status_rank(state.row().last_sync_status));
        Ok(states)
    }

    /// Resources whose last sync failed, most recent failure first.
    async fn failed_syncs(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        let rows = request
            .read_once(ctx, "", async |txn| sync_states::failed(txn).await)
            .await?;
        Ok(request.states(rows))
    }

    /// Resources with no successful sync in the last `olderThanHours`
    /// hours: never-synced first, then oldest watermark first.
    async fn stale_syncs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(24.0)")] older_than_hours: Option<f64>,
    ) -> async_graphql::Result<Vec<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        let hours = validate::within(
            "olderThanHours",
            older_than_hours.unwrap_or(24.0),
            0.0,
            24.0 * 366.0 * 100.0,
        )?;
        let cutoff = request.now - Duration::milliseconds((hours * 3_600_000.0) as i64);
        let rows = request
            .read_once(ctx, "", async |txn| sync_states::stale(txn, cutoff).await)
            .await?;
        Ok(request.states(rows))
    }

    /// The `limit` longest last syncs, longest first.
    async fn slowest_syncs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(5)")] limit: Option<i32>,
    ) -> async_graphql::Result<Vec<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        let limit = validate::within("limit", limit.unwrap_or(5), 1, 1000)?;
        let rows = request
            .read_once(ctx, "", async |txn| {
                sync_states::slowest(txn, limit.unsigned_abs().into()).await
            })
            .await?;
        Ok(request.states(rows))
    }

    /// Syncs running for more than `runningLongerThanMinutes`, longest first.
    async fn stuck_syncs(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(30)")] running_longer_than_minutes: Option<i32>,
    ) -> async_graphql::Result<Vec<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        let minutes = validate::within(
            "runningLongerThanMinutes",
            running_longer_than_minutes.unwrap_or(30),
            0,
            60 * 24 * 366,
        )?;
        let cutoff = request.now - Duration::minutes(minutes.into());
        let rows = request
            .read_once(ctx, "", async |txn| sync_states::stuck(txn, cutoff).await)
            .await?;
        Ok(request.states(rows))
    }

    /// Resources whose last `minConsecutive` or more completed syncs all
    /// failed (counted from the event log), most failures first.
    async fn repeated_failures(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(3)")] min_consecutive: Option<i32>,
    ) -> async_graphql::Result<Vec<SyncState>> {
        let request = OperationContext::reader(ctx)?;
        let min = validate::within("minConsecutive", min_consecutive.unwrap_or(3), 1, 1_000_000)?;
        let failures = request.failures().await?;
        let rows = request
            .read_once(ctx, "", async |txn| sync_states::list(txn, None).await)
            .await?;
        let count = |resource: &str| failures.get(resource).copied().unwrap_or(0);
        let mut rows: Vec<_> = rows
            .into_iter()
            .filter(|row| count(&row.resource) >= min)
            .collect();
        rows.sort_by_key(|row| std::cmp::Reverse(count(&row.resource)));
        Ok(request.states(rows))
    }

    /// The event log, oldest first, a page at a time: of one resource, or
    /// of all. Only final events are listed, so an event that commits later
    /// never appears before a cursor already handed out.
    async fn sync_history(
        &self,
        ctx: &Context<'_>,
        resource: Option<String>,
        #[graphql(default_with = "Some(50)")] first: Option<i32>,
        after: Option<String>,
    ) -> async_graphql::Result<SyncEventConnection> {
        let request = OperationContext::reader(ctx)?;
        if let Some(resource) = &resource {
            validate::resource(resource)?;
        }
        let first = validate::within("first", first.unwrap_or(50), 1, 500)?;
        let cursor = match after {
            None => None,
            Some(after) => Some(Cursor::decode(&after).ok_or(ApiError::CursorExpired)?),
        };
        // One more than asked: tells whether a next page exists.
        let limit = u64::from(first.unsigned_abs()) + 1;
        let rows = request
            .read_once(ctx, "", async |txn| {
                let position = match cursor {
                    Some(cursor) if cursor.position < events::pruned_through(txn).await? => {
                        return Ok(None);
                    }
                    Some(cursor) => cursor.position,
                    None => 0,
                };
                events::history(txn, resource.as_deref(), position, limit)
                    .await
                    .map(Some)
            })
            .await?
            .ok_or(ApiError::CursorExpired)?;
        Ok(SyncEventConnection::page(
            rows,
            first.unsigned_abs() as usize,
            request.now,
        ))
    }

    /// The newest `last` runs of `resource` (from the event log) and their
    /// success rate and durations. Unknown and removed resources have none.
    async fn sync_trend(
        &self,
        ctx: &Context<'_>,
        resource: String,
        #[graphql(default_with = "Some(20)")] last: Option<i32>,
    ) -> async_graphql::Result<SyncTrend> {
        let resources = vec![resource];
        let mut trends = trends(ctx, Some(resources), last).await?;
        trends
            .pop()
            .ok_or_else(|| ApiError::internal("a trend per resource asked").into())
    }

    /// `syncTrend` of each of `resources` (every registered resource when
    /// null), by resource, in one database read.
    async fn sync_trends(
        &self,
        ctx: &Context<'_>,
        resources: Option<Vec<String>>,
        #[graphql(default_with = "Some(20)")] last: Option<i32>,
    ) -> async_graphql::Result<Vec<SyncTrend>> {
        trends(ctx, resources, last).await
    }

    /// Totals over every resource.
    async fn sync_stats(&self, ctx: &Context<'_>) -> async_graphql::Result<SyncStats> {
        let request = OperationContext::reader(ctx)?;
        let totals = request
            .read_once(ctx, "", async |txn| sync_states::totals(txn).await)
            .await?;
        let mut stats = SyncStats::default();
        let (mut durations, mut duration_sum) = (0_i64, 0_i64);
        for total in totals {
            let count = i32::try_from(total.resources).unwrap_or(i32::MAX);
            stats.total_resources = stats.total_resources.saturating_add(count);
            match total.status {
                Status::Success => stats.successful = count,
                Status::Failed => stats.failed = count,
                Status::Running => stats.running = count,
                Status::NeverRun => stats.never_run = count,
            }
            stats.total_records_synced += total.records_synced;
            durations += total.durations;
            duration_sum += total.duration_sum_ms;
            stats.max_duration_ms = stats.max_duration_ms.max(total.duration_max_ms);
        }
        stats.avg_duration_ms = (durations > 0).then(|| duration_sum as f64 / durations as f64);
        Ok(stats)
    }
}

/// Most resources one `syncTrends` may name.
const MAX_TREND_RESOURCES: usize = 1_000;
/// Most runs a trend may list.
const MAX_TREND_RUNS: i32 = 100;

async fn trends(
    ctx: &Context<'_>,
    resources: Option<Vec<String>>,
    last: Option<i32>,
) -> async_graphql::Result<Vec<SyncTrend>> {
    let request = OperationContext::reader(ctx)?;
    for resource in resources.iter().flatten() {
        validate::resource(resource)?;
    }
    if resources
        .as_ref()
        .is_some_and(|resources| resources.len() > MAX_TREND_RESOURCES)
    {
        return Err(ApiError::bad_input(
            "resources",
            format!("at most {MAX_TREND_RESOURCES} resources per request"),
        )
        .into());
    }
    let last = validate::within("last", last.unwrap_or(20), 1, MAX_TREND_RUNS)?;
    let rows = request
        .read_once(ctx, "", async |txn| {
            events::runs(txn, resources.as_deref(), last).await
        })
        .await?;
    Ok(SyncTrend::from_rows(rows))
}
