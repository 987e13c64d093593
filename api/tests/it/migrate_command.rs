//! `vantage-sync migrate`, driven through the same code the binary runs.

use vantage_sync::db::migrate::{self, MigrateCommand, MigrateError};
use vantage_sync_testkit::TestDb;

async fn run(command: MigrateCommand, url: Option<&str>) -> Result<String, MigrateError> {
    let mut out = Vec::new();
    migrate::run(&command, url, migrate::DEFAULT_LOCK_TIMEOUT, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

const STATE: &str = "m20251105_132840_vantage_sync_state";
const EVENTS: &str = "m20251106_000000_vantage_sync_events";
const INDEXES: &str = "m20261202_000000_vantage_sync_event_indexes";
const ALERTS: &str = "m20261203_000000_vantage_sync_alerts";
const IDEMPOTENCY: &str = "m20261204_000000_vantage_sync_idempotency";
const EVENT_TRACES: &str = "m20261204_120000_vantage_sync_event_traces";

fn lines(prefix: &str, names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("{prefix}\t{name}\n"))
        .collect()
}

#[tokio::test]
async fn migrate_status_up_down_fresh() {
    let db = TestDb::empty().await;
    let url = Some(db.url.as_str());
    let run = |command| run(command, url);
    assert_eq!(
        run(MigrateCommand::Status).await.unwrap(),
        lines(
            "Pending",
            &[STATE, EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
        )
    );
    assert_eq!(
        run(MigrateCommand::Up).await.unwrap(),
        lines(
            "applied",
            &[STATE, EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
        )
    );
    assert_eq!(
        run(MigrateCommand::Status).await.unwrap(),
        lines(
            "Applied",
            &[STATE, EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
        )
    );
    assert_eq!(run(MigrateCommand::Up).await.unwrap(), "nothing to do\n");
    assert_eq!(
        run(MigrateCommand::Fresh).await.unwrap(),
        lines(
            "reverted",
            &[EVENT_TRACES, IDEMPOTENCY, ALERTS, INDEXES, EVENTS, STATE]
        ) + &lines(
            "applied",
            &[STATE, EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
        )
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        lines("reverted", &[EVENT_TRACES])
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        lines("reverted", &[IDEMPOTENCY])
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        lines("reverted", &[ALERTS])
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        lines("reverted", &[INDEXES])
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        lines("reverted", &[EVENTS])
    );
    assert_eq!(
        run(MigrateCommand::Status).await.unwrap(),
        lines("Applied", &[STATE])
            + &lines(
                "Pending",
                &[EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
            )
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        lines("reverted", &[STATE])
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }).await.unwrap(),
        "nothing to do\n"
    );
    assert_eq!(
        run(MigrateCommand::Status).await.unwrap(),
        lines(
            "Pending",
            &[STATE, EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
        )
    );
}

#[tokio::test]
async fn migrate_sql_prints_without_a_database() {
    assert_eq!(
        run(MigrateCommand::Sql { down: false }, None)
            .await
            .unwrap(),
        migration::up_sql()
    );
    assert_eq!(
        run(MigrateCommand::Sql { down: true }, None).await.unwrap(),
        migration::down_sql()
    );
}

#[tokio::test]
async fn migrate_without_a_database_says_what_to_set() {
    let error = run(MigrateCommand::Up, None).await.unwrap_err();
    assert!(matches!(error, MigrateError::NoDatabase));
    assert!(error.to_string().contains("DATABASE_URL"));
}

/// Four replicas starting at once: each migration is applied exactly once
/// and none of them fails.
#[tokio::test]
async fn concurrent_migrate_up_applies_once() {
    let db = TestDb::empty().await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { run(MigrateCommand::Up, Some(&url)).await })
        })
        .collect();
    let mut outputs = Vec::new();
    for task in tasks {
        outputs.push(task.await.unwrap().unwrap());
    }
    outputs.sort();
    assert_eq!(
        outputs,
        [
            lines(
                "applied",
                &[STATE, EVENTS, INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES]
            ),
            "nothing to do\n".to_owned(),
            "nothing to do\n".to_owned(),
            "nothing to do\n".to_owned()
        ]
    );
}

/// A migration that needs a table a long transaction holds waits at most
/// the lock timeout, then fails naming that transaction; reads of the
/// table go on meanwhile; once the transaction ends, it applies.
#[tokio::test]
async fn a_migration_behind_a_long_transaction_fails_fast_and_names_it() {
    use std::time::{Duration, Instant};

    use sqlx::{Connection, Executor};
    let db = TestDb::migrated().await;
    let url = Some(db.url.as_str());
    run(MigrateCommand::Down { steps: 4 }, url).await.unwrap();
    // A writer's long transaction on the event log, which the indexes'
    // migration builds on.
    let mut writer = db.connect().await;
    writer
        .execute("SET application_name = 'nightly-backfill'")
        .await
        .unwrap();
    let mut long = writer.begin().await.unwrap();
    long.execute("LOCK TABLE vantage_sync_events IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut reader = db.connect().await;
    let reads = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let started = Instant::now();
            reader
                .execute("SELECT count(*) FROM vantage_sync_events")
                .await
                .unwrap();
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest
    });
    let started = Instant::now();
    let mut out = Vec::new();
    let error = migrate::run(&MigrateCommand::Up, url, Duration::from_secs(1), &mut out)
        .await
        .unwrap_err();
    let failed_after = started.elapsed();
    let message = error.to_string();
    assert!(
        matches!(error, MigrateError::LockTimeout { .. }),
        "{message}"
    );
    assert!(failed_after < Duration::from_secs(4), "{failed_after:?}");
    assert!(message.contains("nightly-backfill"), "{message}");
    assert!(message.contains("--lock-timeout-secs"), "{message}");
    let slowest_read = reads.await.unwrap();
    assert!(
        slowest_read < Duration::from_millis(500),
        "{slowest_read:?}"
    );
    // Nothing of it stayed; with the transaction over it applies.
    long.rollback().await.unwrap();
    assert_eq!(
        run(MigrateCommand::Up, url).await.unwrap(),
        lines("applied", &[INDEXES, ALERTS, IDEMPOTENCY, EVENT_TRACES])
    );
}
