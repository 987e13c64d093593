//! The sea-orm entity matches the table and reads every row.

use entity::vantage_sync_state::{self, Entity as SyncStateEntity};
use entity::{SyncError, SyncStatus};
use sea_orm::{EntityTrait, QueryOrder};
use serde_json::json;
use sqlx::Executor;
use vantage_sync_testkit::TestDb;

#[tokio::test]
async fn entity_reads_the_initial_rows() {
    let db = TestDb::migrated().await;
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    let rows = SyncStateEntity::find()
        .order_by_asc(vantage_sync_state::Column::Resource)
        .all(&orm)
        .await
        .unwrap();
    let summary: Vec<(&str, SyncStatus, usize, i32)> = rows
        .iter()
        .map(|row| {
            (
                row.resource.as_str(),
                row.last_sync_status,
                row.errors.0.len(),
                row.records_synced,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("accounts", SyncStatus::NeverRun, 0, 0),
            ("cashflows", SyncStatus::NeverRun, 0, 0),
            ("commitments", SyncStatus::NeverRun, 0, 0),
            ("funds", SyncStatus::NeverRun, 0, 0),
            ("investments", SyncStatus::NeverRun, 0, 0),
            ("investors", SyncStatus::NeverRun, 0, 0),
            ("valuations", SyncStatus::NeverRun, 0, 0),
        ]
    );
}

/// Errors written by plain SQL in any shape still read back.
#[tokio::test]
async fn entity_reads_errors_of_any_shape() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    conn.execute(
        r#"SELECT start_vantage_sync('funds');
           SELECT fail_vantage_sync('funds', '[{"code": "HTTP_500", "message": "boom", "recordId": "f-1"}, "bare text"]');"#,
    )
    .await
    .unwrap();
    let orm = sea_orm::Database::connect(&db.url).await.unwrap();
    let funds = SyncStateEntity::find_by_id("funds")
        .one(&orm)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(funds.last_sync_status, SyncStatus::Failed);
    assert_eq!(
        funds.errors.0,
        [
            SyncError {
                code: "HTTP_500".into(),
                message: "boom".into(),
                record_id: Some("f-1".into()),
                ..SyncError::default()
            },
            SyncError {
                message: "bare text".into(),
                ..SyncError::default()
            },
        ]
    );
    assert_eq!(
        serde_json::to_value(&funds.errors).unwrap(),
        json!([{"code": "HTTP_500", "message": "boom", "recordId": "f-1"}, {"code": "", "message": "bare text"}])
    );
}

/// The server's reads decode rows by column position; with a distinct
/// value in every column they must give what sea-orm's decoding by name
/// gives.
#[tokio::test]
async fn reads_by_position_match_the_entity() {
    let db = TestDb::migrated().await;
    let mut conn = db.connect().await;
    conn.execute(
        r#"INSERT INTO vantage_sync_state (resource, last_sync_time, last_sync_status,
             records_synced, records_created, records_updated, errors, started_at,
             completed_at, created_at)
           VALUES ('probe', '2025-01-01T00:00:01Z', 'failed', 30, 10, 20,
             '[{"code": "E1", "message": "m", "recordId": "r-1", "details": {"n": 1}}]',
             '2025-01-01T00:00:02Z', '2025-01-01T00:00:05Z', '2025-01-01T00:00:00Z')"#,
    )
    .await
    .unwrap();
    let orm = vantage_sync::db::connect_session(&db.url).await.unwrap();
    let by_name = SyncStateEntity::find_by_id("probe")
        .one(&orm)
        .await
        .unwrap()
        .unwrap();
    let by_position = vantage_sync::db::sync_states::find(&orm, "probe")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_position, by_name);
    assert_eq!(by_name.duration_ms, Some(3000));
    let all = vantage_sync::db::sync_states::list(&orm, None)
        .await
        .unwrap();
    let all_by_name = SyncStateEntity::find()
        .order_by_asc(vantage_sync_state::Column::Resource)
        .all(&orm)
        .await
        .unwrap();
    assert_eq!(all, all_by_name);
}
