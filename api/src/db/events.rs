//! Reads of the event log `vantage_sync_events`.
//!
//! Ids are taken at commit under a lock (see the migration), so the events a
//! snapshot sees are always a gap-free prefix of the log: a reader that
//! moves forward by id never misses an event that commits later.

use std::collections::HashMap;

use entity::vantage_sync_event::{Column, Entity, Model};
use entity::vantage_sync_state::Model as StateRow;
use sea_orm::prelude::DateTimeWithTimeZone;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};

/// Events after `after`, oldest first, at most `limit`; only those of
/// `resources` when given.
pub async fn read_after(
    db: &impl ConnectionTrait,
    after: i64,
    limit: u64,
    resources: Option<&[String]>,
) -> Result<Vec<Model>, DbErr> {
    let mut query = Entity::find().filter(Column::Id.gt(after));
    if let Some(resources) = resources {
        query = query.filter(Column::Resource.is_in(resources.iter().cloned()));
    }
    query.order_by_asc(Column::Id).limit(limit).all(db).await
}

/// Everything up to this id has been pruned.
pub async fn pruned_through(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    scalar(
        db,
        "SELECT coalesce((SELECT through FROM public.vantage_sync_events_pruned), 0) AS value",
    )
    .await
}

#[derive(FromQueryResult)]
struct Scalar {
    value: i64,
}

async fn scalar(db: &impl ConnectionTrait, sql: &str) -> Result<i64, DbErr> {
    let row = Scalar::find_by_statement(Statement::from_string(DbBackend::Postgres, sql))
        .one(db)
        .await?;
    Ok(row.map_or(0, |row| row.value))
}

/// A consistent picture of the current state and where the log stands.
#[derive(Debug)]
pub struct StateSnapshot {
    /// The rows, by resource.
    pub rows: Vec<StateRow>,
    /// The newest event the rows reflect; later events are not in them.
    pub position: i64,
}

/// Reads the rows of `resources` (all when `None`) and the newest event in
/// one snapshot. Run it in a REPEATABLE READ transaction.
pub async fn state_snapshot(
    db: &impl ConnectionTrait,
    resources: Option<&[String]>,
) -> Result<StateSnapshot, DbErr> {
    let position = newest(db).await?;
    let mut query = entity::vantage_sync_state::Entity::find();
    if let Some(resources) = resources {
        query = query
            .filter(entity::vantage_sync_state::Column::Resource.is_in(resources.iter().cloned()));
    }
    let rows = query
        .order_by_asc(entity::vantage_sync_state::Column::Resource)
        .all(db)
        .await?;
    Ok(StateSnapshot { rows, position })
}

/// Events, oldest first, for history pages: of one resource or all.
pub async fn history(
    db: &impl ConnectionTrait,
    resource: Option<&str>,
    after: i64,
    limit: u64,
) -> Result<Vec<Model>, DbErr> {
    let resources = resource.map(|resource| vec![resource.to_owned()]);
    read_after(db, after, limit, resources.as_deref()).await
}

/// Failed completions since the last success, per registered resource
/// that has any (see `consecutive_failures.sql`).
pub async fn consecutive_failures(
    db: &impl ConnectionTrait,
) -> Result<HashMap<String, i32>, DbErr> {
    #[derive(FromQueryResult)]
    struct Row {
        resource: String,
        failures: i64,
    }
    let rows = Row::find_by_statement(Statement::from_string(
        DbBackend::Postgres,
        include_str!("consecutive_failures.sql"),
    ))
    .all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            (
                row.resource,
                i32::try_from(row.failures).unwrap_or(i32::MAX),
            )
        })
        .collect())
}

/// One ended run of a sync (see `sync_runs.sql`), or a resource without
/// any (every run field `None`).
#[derive(Debug, Clone, FromQueryResult)]
pub struct RunRow {
    /// The resource.
    pub resource: String,
    /// When the run started.
    pub started_at: Option<DateTimeWithTimeZone>,
    /// When it completed, failed or was abandoned.
    pub completed_at: Option<DateTimeWithTimeZone>,
    /// SUCCESS, FAILED or ABANDONED; `None` for a resource without runs.
    pub status: Option<String>,
    /// How long a completed or failed run took.
    pub duration_ms: Option<i32>,
    /// Records of a successful run.
    pub records_synced: Option<i32>,
    /// Errors a failed run recorded.
    pub error_count: Option<i32>,
}

/// The newest `last` runs of each of `resources` (every registered
/// resource when `None`), by resource, newest first, in one read.
pub async fn runs(
    db: &impl ConnectionTrait,
    resources: Option<&[String]>,
    last: i32,
) -> Result<Vec<RunRow>, DbErr> {
    let resources = resources.map(|resources| Box::new(serde_json::json!(resources)));
    RunRow::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        include_str!("sync_runs.sql"),
        [sea_orm::Value::Json(resources), last.into()],
    ))
    .all(db)
    .await
}

/// The newest event id of the log, 0 when empty.
pub async fn newest(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    scalar(
        db,
        "SELECT coalesce(max(id), 0) AS value FROM public.vantage_sync_events",
    )
    .await
}

/// Deletes events older than `days` days; how many were deleted.
pub async fn prune(db: &impl ConnectionTrait, days: u32) -> Result<i64, DbErr> {
    scalar(
        db,
        &format!("SELECT public.prune_vantage_sync_events(interval '{days} days') AS value"),
    )
    .await
}
