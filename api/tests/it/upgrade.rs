//! Upgrades with no downtime: the previous release keeps serving, under
//! load and with no error, while this build's migrations are applied under
//! it; then this build serves beside it on the same database.
//!
//! Ignored by default: it builds the previous release from this
//! repository's history (several minutes the first time; kept in
//! `target/previous-release/`). Run it with
//!
//! ```sh
//! cargo test -p vantage-sync --test it -- --ignored upgrade::
//! ```
//!
//! `PREVIOUS_RELEASE_BIN` points it at a `vantage-sync` binary built
//! already instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vantage_sync::db::migrate::{self, MigrateCommand};
use vantage_sync_testkit::{SECRET, TestApp, TestDb};

/// The release before this one: the last commit before the layered code,
/// the test kit, `check`, graceful leaving and read replicas.
const PREVIOUS_RELEASE: &str = "2891393";

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The previous release's `vantage-sync`, built from git if need be.
fn previous_release() -> PathBuf {
    if let Some(binary) = std::env::var_os("PREVIOUS_RELEASE_BIN") {
        return PathBuf::from(binary);
    }
    let root = repository().join("target/previous-release");
    let source = root.join(PREVIOUS_RELEASE);
    let binary = root.join("target/release/vantage-sync");
    if !source.join("Cargo.toml").exists() {
        std::fs::create_dir_all(&source).unwrap();
        let mut archive = Command::new("git")
            .args(["archive", "--format=tar", PREVIOUS_RELEASE])
            .current_dir(repository())
            .stdout(Stdio::piped())
            .spawn()
            .expect("git, with this repository's history");
        let status = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&source)
            .stdin(archive.stdout.take().unwrap())
            .status()
            .unwrap();
        assert!(status.success(), "cannot unpack {PREVIOUS_RELEASE}");
        assert!(
            archive.wait().unwrap().success(),
            "git archive {PREVIOUS_RELEASE} failed"
        );
    }
    if !binary.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked", "-p", "vantage-sync"])
            .arg("--manifest-path")
            .arg(source.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(root.join("target"))
            .status()
            .unwrap();
        assert!(status.success(), "cannot build {PREVIOUS_RELEASE}");
    }
    binary
}

/// A server process of the previous release on `database_url`, and where
/// it listens.
fn serve_previous(binary: &Path, database_url: &str) -> (std::process::Child, String) {
    let ready =
        std::env::temp_dir().join(format!("vantage-sync-previous-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--no-migrate",
            "--listen-addr",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .env("DATABASE_URL", database_url)
        .env("JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(addr) = vantage_sync::cli::announced_addr(&ready) {
            return (child, format!("http://{addr}"));
        }
        assert!(
            Instant::now() < deadline,
            "the previous release did not start"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the previous release exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
#[ignore = "builds the previous release (minutes): cargo test -p vantage-sync --test it -- --ignored upgrade::"]
async fn the_previous_release_serves_while_the_new_migrations_apply() {
    let binary = tokio::task::spawn_blocking(previous_release).await.unwrap();
    let db = TestDb::empty().await;
    // The previous release's schema, by the previous release.
    let status = Command::new(&binary)
        .args(["migrate", "up"])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let (mut previous, base) = serve_previous(&binary, &db.url);
    let keys = vantage_sync::auth::TokenKeys::new(SECRET.as_bytes()).unwrap();
    let token = |role| {
        keys.mint(role, Duration::from_secs(600), Some("upgrade"))
            .unwrap()
    };
    let (reader, writer) = (
        token(vantage_sync::auth::Role::Authenticated),
        token(vantage_sync::auth::Role::ServiceRole),
    );

    // Steady load on the previous release: dashboards reading, a worker
    // writing runs of its own resource.
    let until = Instant::now() + Duration::from_secs(8);
    let mut load = Vec::new();
    for worker in 0..4 {
        let (base, reader, writer) = (base.clone(), reader.clone(), writer.clone());
        load.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut errors = Vec::new();
            let mut requests = 0;
            let resource = format!("upgrade_{worker}");
            let steps = [
                (reader.as_str(), "{ syncStates { resource lastSyncStatus health consecutiveFailures } syncStats { totalResources } }".to_owned()),
                (writer.as_str(), format!(r#"mutation {{ startSync(resource: "{resource}", force: true) {{ lastSyncStatus }} }}"#)),
                (writer.as_str(), format!(r#"mutation {{ completeSync(resource: "{resource}", recordsSynced: 3, recordsCreated: 1, recordsUpdated: 2) {{ lastSyncStatus }} }}"#)),
            ];
            while Instant::now() < until {
                for (token, query) in &steps {
                    requests += 1;
                    let answer = client
                        .post(format!("{base}/graphql"))
                        .bearer_auth(token)
                        .json(&json!({"query": query}))
                        .send()
                        .await;
                    match answer {
                        Ok(response) => {
                            let status = response.status();
                            let body: Value = response.json().await.unwrap_or(Value::Null);
                            if !status.is_success() || body.get("errors").is_some() {
                                errors.push(format!("{status} {body}"));
                            }
                        }
                        Err(error) => errors.push(error.to_string()),
                    }
                }
            }
            (requests, errors)
        }));
    }
    // Meanwhile this build's migrations, as an operator applies them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut out = Vec::new();
    migrate::run(
        &MigrateCommand::Up,
        Some(&db.url),
        migrate::DEFAULT_LOCK_TIMEOUT,
        &mut out,
    )
    .await
    .unwrap();
    eprintln!(
        "applied under load: {}",
        String::from_utf8_lossy(&out).trim()
    );
    // And this build serving beside it, on the same database.
    let next = TestApp::spawn_with(db, |_| {}).await;
    let body = next
        .query(
            "authenticated",
            "{ syncStats { totalResources } }",
            json!({}),
        )
        .await;
    assert!(
        body["data"]["syncStats"]["totalResources"]
            .as_i64()
            .unwrap()
            >= 7
    );

    let mut requests = 0;
    let mut errors = Vec::new();
    for task in load {
        let (count, task_errors) = task.await.unwrap();
        requests += count;
        errors.extend(task_errors);
    }
    let _ = previous.kill();
    let _ = previous.wait();
    eprintln!(
        "{requests} requests to the previous release, {} errors",
        errors.len()
    );
    assert!(requests > 100, "only {requests} requests");
    assert_eq!(errors, Vec::<String>::new());
}
