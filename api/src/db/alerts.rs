//! Alerts and the notifications made from the event log. The rules live in
//! the database (`advance_vantage_sync_notifications` and
//! `vantage_sync_alerts_holding` in the alerts migration); this only calls
//! them and reads what they recorded.

use entity::vantage_sync_alert::{Column, Entity, Model};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};

/// Most resolved alerts one read lists (the newest).
pub const MAX_RESOLVED: u64 = 1_000;

/// Firing alerts (`firing`), the newest resolved ones (`!firing`), or both
/// (`None`): firing first, each by when it fired, then by resource.
pub async fn list(db: &impl ConnectionTrait, firing: Option<bool>) -> Result<Vec<Model>, DbErr> {
    let mut rows = Vec::new();
    if firing != Some(false) {
        rows.extend(
            Entity::find()
                .filter(Column::ResolvedAt.is_null())
                .order_by_asc(Column::FiringSince)
                .order_by_asc(Column::Resource)
                .order_by_asc(Column::Alert)
                .all(db)
                .await?,
        );
    }
    if firing != Some(true) {
        rows.extend(
            Entity::find()
                .filter(Column::ResolvedAt.is_not_null())
                .order_by_desc(Column::ResolvedAt)
                .order_by_asc(Column::Resource)
                .limit(MAX_RESOLVED)
                .all(db)
                .await?,
        );
    }
    Ok(rows)
}

/// Turns up to `batch` new events into notifications, and checks the
/// alerts time alone makes true when the last check is 10 s old. Returns
/// how many notifications were made.
pub async fn advance(db: &impl ConnectionTrait, batch: i32) -> Result<i64, DbErr> {
    #[derive(FromQueryResult)]
    struct Made {
        made: i32,
    }
    let made = Made::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT public.advance_vantage_sync_notifications($1) AS made",
        [batch.into()],
    ))
    .one(db)
    .await?;
    Ok(made.map_or(0, |made| i64::from(made.made)))
}
