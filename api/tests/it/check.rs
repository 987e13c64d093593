//! `vantage-sync check` as an operator runs it: the binary, against real
//! deployments (a migrated database, an unmigrated one, a login role short
//! of a grant, a database nobody answers for, a key set that is down, a
//! transaction-mode PgBouncer).

use std::time::{Duration, Instant};

use vantage_sync_testkit::{JwksServer, KeyKind, PgBouncer, SECRET, TestDb, TestKey};

use crate::cli::vantage_sync;

/// Runs `check` with `env`; whether it succeeded, and its lines.
async fn check(env: &[(&str, &str)]) -> (bool, Vec<String>) {
    let mut command = vantage_sync();
    command.arg("check").envs(env.iter().copied());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
    assert!(
        !lines.is_empty(),
        "check printed nothing; stderr:\n{stderr}"
    );
    (output.status.success(), lines)
}

/// The line of `subject` (`<mark> <subject>: <detail>`), which must be there.
fn line<'a>(lines: &'a [String], subject: &str) -> &'a str {
    let label = format!("{subject}:");
    lines
        .iter()
        .find(|line| {
            line.split_once(' ')
                .is_some_and(|(_, rest)| rest.starts_with(&label))
        })
        .unwrap_or_else(|| panic!("no {subject} line in {lines:#?}"))
}

#[tokio::test]
async fn a_good_deployment_passes_every_check() {
    let db = TestDb::migrated().await;
    let (ok, lines) = check(&[("DATABASE_URL", &db.url), ("JWT_SECRET", SECRET)]).await;
    assert!(ok, "{lines:#?}");
    for subject in [
        "tokens",
        "database",
        "pooler",
        "migrations",
        "roles",
        "live feed",
        "webhook secrets",
    ] {
        assert!(line(&lines, subject).starts_with('✓'), "{lines:#?}");
    }
    assert!(lines.iter().all(|line| line.starts_with('✓')), "{lines:#?}");
    assert!(line(&lines, "migrations").contains("none pending"));
}

#[tokio::test]
async fn an_unmigrated_database_names_migrate_up() {
    let db = TestDb::empty().await;
    let (ok, lines) = check(&[("DATABASE_URL", &db.url), ("JWT_SECRET", SECRET)]).await;
    assert!(!ok, "{lines:#?}");
    let migrations = line(&lines, "migrations");
    assert!(migrations.starts_with('✗'), "{lines:#?}");
    assert!(
        migrations.contains("vantage-sync migrate up"),
        "{migrations}"
    );
}

#[tokio::test]
async fn a_login_role_without_service_role_names_the_grant() {
    let db = TestDb::migrated().await;
    let (login, url) = db.login_role(&["anon", "authenticated"]).await;
    let (ok, lines) = check(&[("DATABASE_URL", &url), ("JWT_SECRET", SECRET)]).await;
    assert!(!ok, "{lines:#?}");
    let roles = line(&lines, "roles");
    assert!(roles.starts_with('✗'), "{lines:#?}");
    assert!(
        roles.contains(&format!("GRANT service_role TO {login};")),
        "{roles}"
    );
    // What the login role may do was still checked.
    assert!(line(&lines, "migrations").starts_with('✓'), "{lines:#?}");
}

#[tokio::test]
async fn an_unreachable_database_fails_fast_and_shows_no_password() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let password = "s3cret-Passw0rd";
    let url = format!("postgres://vantage:{password}@127.0.0.1:{port}/vantage");
    let started = Instant::now();
    let (ok, lines) = check(&[
        ("DATABASE_URL", &url),
        ("JWT_SECRET", SECRET),
        ("DB_ACQUIRE_TIMEOUT_SECS", "3"),
    ])
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3 + 2),
        "{:?}",
        started.elapsed()
    );
    assert!(!ok);
    let database = line(&lines, "database");
    assert!(database.starts_with('✗'), "{lines:#?}");
    assert!(database.contains("DATABASE_URL"), "{database}");
    assert!(
        lines.iter().all(|line| !line.contains(password)),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn a_key_set_that_is_down_fails_its_check() {
    let db = TestDb::migrated().await;
    let key = TestKey::new(KeyKind::Es256, "key-1");
    let mut jwks = JwksServer::start(vec![key.public_jwk()]).await;
    let url = jwks.url();
    let (ok, lines) = check(&[("DATABASE_URL", &db.url), ("JWKS_URL", &url)]).await;
    assert!(ok, "{lines:#?}");
    let key_set = line(&lines, "key set");
    assert!(
        key_set.starts_with('✓') && key_set.contains("key-1"),
        "{key_set}"
    );
    jwks.stop();
    let (ok, lines) = check(&[("DATABASE_URL", &db.url), ("JWKS_URL", &url)]).await;
    assert!(!ok, "{lines:#?}");
    let key_set = line(&lines, "key set");
    assert!(key_set.starts_with('✗'), "{lines:#?}");
    assert!(key_set.contains("JWKS_URL"), "{key_set}");
}

#[tokio::test]
async fn a_transaction_pooler_without_a_listen_url_is_a_warning() {
    let db = TestDb::migrated().await;
    let bouncer = PgBouncer::start(&db.url, &["postgres"]);
    let pooled = bouncer.url(&db.url);
    let (ok, lines) = check(&[("DATABASE_URL", &pooled), ("JWT_SECRET", SECRET)]).await;
    assert!(ok, "a warning is not a failure: {lines:#?}");
    assert!(
        line(&lines, "pooler").contains("transaction-mode pooler"),
        "{lines:#?}"
    );
    let feed = line(&lines, "live feed");
    assert!(feed.starts_with('⚠'), "{lines:#?}");
    assert!(feed.contains("LISTEN_DATABASE_URL"), "{feed}");
    // With a session connection to LISTEN on, nothing is left to warn of.
    let (ok, lines) = check(&[
        ("DATABASE_URL", &pooled),
        ("LISTEN_DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
    ])
    .await;
    assert!(ok, "{lines:#?}");
    assert!(line(&lines, "live feed").starts_with('✓'), "{lines:#?}");
}

#[tokio::test]
async fn a_read_replica_must_be_a_standby_and_an_unreachable_one_is_a_warning() {
    let db = TestDb::migrated().await;
    // The primary itself is no standby.
    let (ok, lines) = check(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("READ_DATABASE_URL", &db.url),
    ])
    .await;
    assert!(!ok, "{lines:#?}");
    let replica = line(&lines, "read replica");
    assert!(
        replica.starts_with('✗') && replica.contains("not a standby"),
        "{replica}"
    );
    // One that does not answer: queries would read the primary meanwhile.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let password = "r3plica-Secret";
    let url = format!("postgres://reader:{password}@127.0.0.1:{port}/vantage");
    let (ok, lines) = check(&[
        ("DATABASE_URL", &db.url),
        ("JWT_SECRET", SECRET),
        ("READ_DATABASE_URL", &url),
    ])
    .await;
    assert!(ok, "a warning is not a failure: {lines:#?}");
    assert!(line(&lines, "read replica").starts_with('⚠'), "{lines:#?}");
    assert!(
        lines.iter().all(|line| !line.contains(password)),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn traces_are_reported_off_on_or_with_a_collector_that_does_not_answer() {
    let db = TestDb::migrated().await;
    let base = [("DATABASE_URL", db.url.as_str()), ("JWT_SECRET", SECRET)];
    let (ok, lines) = check(&base).await;
    assert!(ok, "{lines:#?}");
    let off = line(&lines, "traces");
    assert!(off.starts_with('✓') && off.contains("off"), "{off}");

    let collector = vantage_sync_testkit::OtlpReceiver::start().await;
    let endpoint = collector.endpoint();
    let mut env = base.to_vec();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint));
    let (ok, lines) = check(&env).await;
    assert!(ok, "{lines:#?}");
    let on = line(&lines, "traces");
    assert!(on.starts_with('✓'), "{on}");
    assert!(on.contains(&format!("{endpoint}/v1/traces")), "{on}");
    assert!(on.contains("parentbased_always_on"), "{on}");

    // Nobody listens there: a warning, and check still succeeds.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut env = base.to_vec();
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", &closed));
    let (ok, lines) = check(&env).await;
    assert!(ok, "{lines:#?}");
    let down = line(&lines, "traces");
    assert!(down.starts_with('⚠'), "{down}");
    assert!(down.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{down}");
}

#[tokio::test]
async fn trusted_documents_are_counted_and_a_bad_manifest_names_itself() {
    let db = TestDb::migrated().await;
    let dir = tempfile_dir();
    let manifest = dir.join("persisted-documents.json");
    std::fs::write(
        &manifest,
        r#"{"a": "query A { syncStates { resource } }", "b": "query B { syncStats { total } }"}"#,
    )
    .unwrap();
    let path = manifest.to_str().unwrap();
    let base = [("DATABASE_URL", db.url.as_str()), ("JWT_SECRET", SECRET)];
    let mut env = base.to_vec();
    env.push(("TRUSTED_DOCUMENTS", path));
    let (ok, lines) = check(&env).await;
    assert!(ok, "{lines:#?}");
    let trusted = line(&lines, "trusted documents");
    assert!(trusted.starts_with('✓'), "{trusted}");
    assert!(trusted.contains("only the 2 documents"), "{trusted}");

    std::fs::write(&manifest, r#"{"a": "query A { unclosed"}"#).unwrap();
    let (ok, lines) = check(&env).await;
    assert!(!ok, "{lines:#?}");
    let configuration = line(&lines, "configuration");
    assert!(configuration.starts_with('✗'), "{configuration}");
    assert!(configuration.contains(path), "{configuration}");
    assert!(configuration.contains("does not parse"), "{configuration}");
}

/// A fresh directory under the system's temporary one.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vantage-sync-check-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
