//! Reads of the event log `vantage_sync_events`.
//!
//! Only the *final prefix* of the log is ever handed out: the events up to
//! the newest one whose `safe_after` the reader's snapshot has passed (see
//! the migration). Such an event proves that every event before it is
//! final, so a reader that moves forward through the prefix by id never
//! misses an event that commits late with a smaller id.

use std::collections::HashMap;

use entity::vantage_sync_event::{Entity, Model};
use entity::vantage_sync_state::Model as StateRow;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, FromQueryResult, QueryFilter,
    QueryOrder, Statement,
};

/// The newest final event id as seen by the current statement's snapshot;
/// 0 when there is none. Scans back from the tail past the unsafe events.
const HEAD: &str = "(SELECT coalesce((SELECT h.id FROM public.vantage_sync_events h \
     WHERE h.safe_after <= pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text::bigint \
     ORDER BY h.id DESC LIMIT 1), 0))";

/// Final events after `after`, oldest first, at most `limit`; only those
/// of `resources` when given.
pub async fn read_final(
    db: &impl ConnectionTrait,
    after: i64,
    limit: u64,
    resources: Option<&[String]>,
) -> Result<Vec<Model>, DbErr> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let statement = match resources {
        None => Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT e.* FROM public.vantage_sync_events e \
                 WHERE e.id > $1 AND e.id <= {HEAD} ORDER BY e.id LIMIT $2"
            ),
            [after.into(), limit.into()],
        ),
        Some(resources) => Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "SELECT e.* FROM public.vantage_sync_events e \
                 WHERE e.id > $1 AND e.id <= {HEAD} AND e.resource = ANY($3) ORDER BY e.id LIMIT $2"
            ),
            [after.into(), limit.into(), resources.to_vec().into()],
        ),
    };
    Entity::find().from_raw_sql(statement).all(db).await
}

/// The newest final event id (0 for an empty log).
pub async fn head(db: &impl ConnectionTrait) -> Result<i64, DbErr> {
    scalar(db, &format!("SELECT {HEAD} AS value")).await
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

/// A transaction snapshot, as PostgreSQL reports it (`xmin:xmax:xip,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every transaction below this had finished.
    pub xmin: i64,
    /// No transaction at or above this had started.
    pub xmax: i64,
    /// Transactions in between that were still running.
    pub running: Vec<i64>,
}

impl Snapshot {
    /// Parses `pg_current_snapshot()::text`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Self {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether changes of transaction `xid` are visible in this snapshot
    /// (assuming it committed).
    pub fn sees(&self, xid: i64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.running.contains(&xid))
    }
}

/// A consistent picture of the current state and where the log stands.
#[derive(Debug)]
pub struct StateSnapshot {
    /// The rows, by resource.
    pub rows: Vec<StateRow>,
    /// Every event up to here is reflected in `rows`.
    pub position: i64,
    /// Events up to here may be reflected in `rows` too: those whose
    /// writer `snapshot` sees.
    pub newest: i64,
    /// The snapshot the rows were read in.
    pub snapshot: Snapshot,
}

#[derive(FromQueryResult)]
struct SnapshotMarks {
    position: i64,
    newest: i64,
    snapshot: String,
}

/// Reads the rows of `resources` (all when `None`) and the log's marks in
/// one snapshot. Run it in a REPEATABLE READ transaction.
pub async fn state_snapshot(
    db: &impl ConnectionTrait,
    resources: Option<&[String]>,
) -> Result<StateSnapshot, DbErr> {
    let marks = SnapshotMarks::find_by_statement(Statement::from_string(
        DbBackend::Postgres,
        format!(
            "SELECT {HEAD} AS position, \
             coalesce((SELECT max(id) FROM public.vantage_sync_events), 0) AS newest, \
             pg_catalog.pg_current_snapshot()::text AS snapshot"
        ),
    ))
    .one(db)
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("snapshot marks".into()))?;
    let snapshot = Snapshot::parse(&marks.snapshot)
        .ok_or_else(|| DbErr::Custom(format!("unreadable snapshot {}", marks.snapshot)))?;
    let mut query = entity::vantage_sync_state::Entity::find();
    if let Some(resources) = resources {
        query = query
            .filter(entity::vantage_sync_state::Column::Resource.is_in(resources.iter().cloned()));
    }
    let rows = query
        .order_by_asc(entity::vantage_sync_state::Column::Resource)
        .all(db)
        .await?;
    Ok(StateSnapshot {
        rows,
        position: marks.position,
        newest: marks.newest,
        snapshot,
    })
}

/// Final events, oldest first, for history pages: of one resource or all.
pub async fn history(
    db: &impl ConnectionTrait,
    resource: Option<&str>,
    after: i64,
    limit: u64,
) -> Result<Vec<Model>, DbErr> {
    let resources = resource.map(|resource| vec![resource.to_owned()]);
    read_final(db, after, limit, resources.as_deref()).await
}

/// Failed completions since the last success, per resource that has any.
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
        "SELECT e.resource, count(*) AS failures FROM public.vantage_sync_events e \
         WHERE e.operation = 'UPDATE' AND e.status = 'failed' AND e.previous_status = 'running' \
           AND e.id > coalesce((SELECT max(s.id) FROM public.vantage_sync_events s \
                                WHERE s.resource = e.resource AND s.status = 'success'), 0) \
         GROUP BY e.resource",
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

/// The newest event id of the log (final or not), 0 when empty.
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
