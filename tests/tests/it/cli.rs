//! `vantage-sync migrate`, driven through the same code the binary runs.

use vantage_sync::migrate::{self, MigrateCommand, MigrateError};
use vantage_sync_tests::TestDb;

async fn run(command: MigrateCommand, url: Option<&str>) -> Result<String, MigrateError> {
    let mut out = Vec::new();
    migrate::run(&command, url, &mut out).await?;
    Ok(String::from_utf8(out).unwrap())
}

const NAME: &str = "m20251105_132840_vantage_sync_state";

#[tokio::test]
async fn migrate_status_up_down_fresh() {
    let db = TestDb::empty().await;
    let url = Some(db.url.as_str());
    assert_eq!(
        run(MigrateCommand::Status, url).await.unwrap(),
        format!("Pending\t{NAME}\n")
    );
    assert_eq!(
        run(MigrateCommand::Up, url).await.unwrap(),
        format!("applied\t{NAME}\n")
    );
    assert_eq!(
        run(MigrateCommand::Status, url).await.unwrap(),
        format!("Applied\t{NAME}\n")
    );
    assert_eq!(
        run(MigrateCommand::Up, url).await.unwrap(),
        "nothing to do\n"
    );
    assert_eq!(
        run(MigrateCommand::Fresh, url).await.unwrap(),
        format!("reverted\t{NAME}\napplied\t{NAME}\n")
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }, url).await.unwrap(),
        format!("reverted\t{NAME}\n")
    );
    assert_eq!(
        run(MigrateCommand::Down { steps: 1 }, url).await.unwrap(),
        "nothing to do\n"
    );
    assert_eq!(
        run(MigrateCommand::Status, url).await.unwrap(),
        format!("Pending\t{NAME}\n")
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
            format!("applied\t{NAME}\n"),
            "nothing to do\n".to_owned(),
            "nothing to do\n".to_owned(),
            "nothing to do\n".to_owned()
        ]
    );
}
