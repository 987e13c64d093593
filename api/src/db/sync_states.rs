//! Reads and writes of `vantage_sync_state`. Transitions call the
//! database functions of the migration, so a change made over GraphQL and
//! one made in SQL behave the same; Rust never re-implements them.

use chrono::{DateTime, Utc};
use entity::vantage_sync_state::{ActiveModel, Column, Entity, Model};
use entity::{SyncErrors, SyncStatus};
use sea_orm::sea_query::{Expr, Func, NullOrdering};
use sea_orm::{
    ActiveModelTrait, ActiveValue, ColumnTrait, Condition, ConnectionTrait, DbBackend, DbErr,
    EntityTrait, Order, QueryFilter, QueryOrder, QueryResult, QuerySelect, QueryTrait, Select,
    Statement,
};

/// The columns every read of whole rows selects, in the order of
/// [`Model`]'s fields, so that rows are decoded by position instead of by a
/// lookup of each column's name, per field and row.
const COLUMNS: [Column; 12] = [
    Column::Resource,
    Column::LastSyncTime,
    Column::LastSyncStatus,
    Column::RecordsSynced,
    Column::RecordsCreated,
    Column::RecordsUpdated,
    Column::Errors,
    Column::StartedAt,
    Column::CompletedAt,
    Column::DurationMs,
    Column::CreatedAt,
    Column::UpdatedAt,
];

/// A row selected with [`COLUMNS`].
fn model(row: &QueryResult) -> Result<Model, DbErr> {
    Ok(Model {
        resource: row.try_get_by_index(0)?,
        last_sync_time: row.try_get_by_index(1)?,
        last_sync_status: row.try_get_by_index(2)?,
        records_synced: row.try_get_by_index(3)?,
        records_created: row.try_get_by_index(4)?,
        records_updated: row.try_get_by_index(5)?,
        errors: row.try_get_by_index(6)?,
        started_at: row.try_get_by_index(7)?,
        completed_at: row.try_get_by_index(8)?,
        duration_ms: row.try_get_by_index(9)?,
        created_at: row.try_get_by_index(10)?,
        updated_at: row.try_get_by_index(11)?,
    })
}

/// The rows `query` selects, decoded by position.
async fn rows(db: &impl ConnectionTrait, query: Select<Entity>) -> Result<Vec<Model>, DbErr> {
    let statement = query
        .select_only()
        .columns(COLUMNS)
        .build(DbBackend::Postgres);
    db.query_all_raw(statement)
        .await?
        .iter()
        .map(model)
        .collect()
}

/// One resource's row.
pub async fn find(db: &impl ConnectionTrait, resource: &str) -> Result<Option<Model>, DbErr> {
    Ok(rows(db, Entity::find_by_id(resource))
        .await?
        .into_iter()
        .next())
}

/// Every row with one of `statuses` (all rows when `None`), by resource.
pub async fn list(
    db: &impl ConnectionTrait,
    statuses: Option<&[SyncStatus]>,
) -> Result<Vec<Model>, DbErr> {
    let mut query = Entity::find();
    if let Some(statuses) = statuses {
        query = query.filter(Column::LastSyncStatus.is_in(statuses.iter().copied()));
    }
    rows(db, query.order_by_asc(Column::Resource)).await
}

/// Failed syncs, most recent failure first.
pub async fn failed(db: &impl ConnectionTrait) -> Result<Vec<Model>, DbErr> {
    let query = Entity::find()
        .filter(Column::LastSyncStatus.eq(SyncStatus::Failed))
        .order_by_with_nulls(Column::CompletedAt, Order::Desc, NullOrdering::Last)
        .order_by_asc(Column::Resource);
    rows(db, query).await
}

/// Resources with no successful sync since `cutoff` (never synced first,
/// then oldest watermark first).
pub async fn stale(db: &impl ConnectionTrait, cutoff: DateTime<Utc>) -> Result<Vec<Model>, DbErr> {
    let query = Entity::find()
        .filter(
            Condition::any()
                .add(Column::LastSyncTime.lt(cutoff))
                .add(Column::LastSyncTime.is_null()),
        )
        .order_by_with_nulls(Column::LastSyncTime, Order::Asc, NullOrdering::First)
        .order_by_asc(Column::Resource);
    rows(db, query).await
}

/// The `limit` longest finished syncs.
pub async fn slowest(db: &impl ConnectionTrait, limit: u64) -> Result<Vec<Model>, DbErr> {
    let query = Entity::find()
        .filter(Column::DurationMs.is_not_null())
        .order_by_desc(Column::DurationMs)
        .order_by_asc(Column::Resource)
        .limit(limit);
    rows(db, query).await
}

/// Syncs running since before `cutoff`, longest-running first.
pub async fn stuck(db: &impl ConnectionTrait, cutoff: DateTime<Utc>) -> Result<Vec<Model>, DbErr> {
    let query = Entity::find()
        .filter(Column::LastSyncStatus.eq(SyncStatus::Running))
        .filter(Column::StartedAt.lt(cutoff))
        .order_by_asc(Column::StartedAt)
        .order_by_asc(Column::Resource);
    rows(db, query).await
}

/// Aggregates of one status: how many rows, records synced, and the sum,
/// count and maximum of their durations.
#[derive(Debug, Clone, Copy)]
pub struct StatusTotals {
    /// The status these totals are for.
    pub status: SyncStatus,
    /// Rows with this status.
    pub resources: i64,
    /// Sum of `records_synced`.
    pub records_synced: i64,
    /// Rows with a duration.
    pub durations: i64,
    /// Sum of their durations in ms.
    pub duration_sum_ms: i64,
    /// Longest duration in ms.
    pub duration_max_ms: Option<i32>,
}

/// One row of the totals query: status, rows, records, durations counted,
/// duration sum, longest duration.
type TotalsRow = (SyncStatus, i64, Option<i64>, i64, Option<i64>, Option<i32>);

/// Totals per status, in one scan.
pub async fn totals(db: &impl ConnectionTrait) -> Result<Vec<StatusTotals>, DbErr> {
    let rows: Vec<TotalsRow> = Entity::find()
        .select_only()
        .column(Column::LastSyncStatus)
        .column_as(
            Expr::from(Func::count(Expr::col(Column::Resource))),
            "resources",
        )
        .column_as(
            Expr::from(Func::sum(Expr::col(Column::RecordsSynced))),
            "records_synced",
        )
        .column_as(
            Expr::from(Func::count(Expr::col(Column::DurationMs))),
            "durations",
        )
        .column_as(
            Expr::from(Func::sum(Expr::col(Column::DurationMs))),
            "duration_sum",
        )
        .column_as(
            Expr::from(Func::max(Expr::col(Column::DurationMs))),
            "duration_max",
        )
        .group_by(Column::LastSyncStatus)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(status, resources, records, durations, duration_sum, duration_max)| StatusTotals {
                status,
                resources,
                records_synced: records.unwrap_or(0),
                durations,
                duration_sum_ms: duration_sum.unwrap_or(0),
                duration_max_ms: duration_max,
            },
        )
        .collect())
}

/// Calls one of the transition functions and returns the row it yields.
async fn transition(
    db: &impl ConnectionTrait,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<Model, DbErr> {
    Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .one(db)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the transition function returned no row".into()))
}

/// `start_vantage_sync`: marks the resource running (creating it if needed).
pub async fn start(db: &impl ConnectionTrait, resource: &str, force: bool) -> Result<Model, DbErr> {
    transition(
        db,
        "SELECT * FROM public.start_vantage_sync($1, $2)",
        vec![resource.into(), force.into()],
    )
    .await
}

/// Record counts of a successful sync.
#[derive(Debug, Clone, Copy)]
pub struct RecordCounts {
    /// Records processed (created + updated + skipped).
    pub synced: i32,
    /// Records created.
    pub created: i32,
    /// Records updated.
    pub updated: i32,
}

/// `complete_vantage_sync`: marks the running sync successful.
pub async fn complete(
    db: &impl ConnectionTrait,
    resource: &str,
    counts: RecordCounts,
) -> Result<Model, DbErr> {
    transition(
        db,
        "SELECT * FROM public.complete_vantage_sync($1, $2, $3, $4)",
        vec![
            resource.into(),
            counts.synced.into(),
            counts.created.into(),
            counts.updated.into(),
        ],
    )
    .await
}

/// `fail_vantage_sync`: marks the running sync failed with `errors`.
pub async fn fail(
    db: &impl ConnectionTrait,
    resource: &str,
    errors: &SyncErrors,
) -> Result<Model, DbErr> {
    let errors = serde_json::to_value(errors).map_err(|error| DbErr::Json(error.to_string()))?;
    transition(
        db,
        "SELECT * FROM public.fail_vantage_sync($1, $2)",
        vec![resource.into(), errors.into()],
    )
    .await
}

/// Registers a new resource, never run.
pub async fn register(db: &impl ConnectionTrait, resource: &str) -> Result<Model, DbErr> {
    ActiveModel {
        resource: ActiveValue::Set(resource.to_owned()),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// Removes a resource, returning its last row.
pub async fn remove(db: &impl ConnectionTrait, resource: &str) -> Result<Option<Model>, DbErr> {
    Entity::delete_by_id(resource).exec_with_returning(db).await
}

#[cfg(test)]
mod tests {
    use sea_orm::{Iden, Iterable};

    use super::*;

    #[test]
    fn whole_row_reads_select_every_column_once() {
        let mut selected: Vec<String> = COLUMNS.iter().map(Iden::to_string).collect();
        let mut all: Vec<String> = Column::iter().map(|column| column.to_string()).collect();
        selected.sort();
        all.sort();
        assert_eq!(selected, all);
    }
}
