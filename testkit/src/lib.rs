//! Test harness: throwaway PostgreSQL clusters from the installed server
//! binaries, and a fresh database per test cloned from a migrated template.
//!
//! One cluster is started per test binary, on first use. Every cluster has a
//! detached watchdog process that stops it and removes its directory once
//! the test process is gone, however it ended (normal exit, panic, kill).
//! `TEST_DATABASE_URL` (a superuser URL) points the harness at an existing
//! server instead.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use migration::{Migrator, MigratorTrait};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgConnection, PgPool, raw_sql};
use tokio::sync::OnceCell;
use vantage_sync::managed_postgres::{PostgresCluster, Shutdown};

mod app;
mod browser;
mod haproxy;
mod jwks;
mod logs;
pub mod otlp;
mod pgbouncer;
mod process;
mod receiver;
mod sse;
mod ws;
pub use app::{SECRET, TestApp, base64url, metric_value};
pub use browser::Browser;
pub use haproxy::HaProxy;
pub use jwks::{JwksServer, KeyKind, TestKey, private_key_pem};
pub use logs::LogCapture;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use pgbouncer::PgBouncer;
pub use process::{SERVER_VAR, ServerOptions, ServerProcess, serve_if_asked};
pub use receiver::{Received, Receiver, signature_is_valid};
pub use sse::{SseEvent, SseStream};
pub use ws::WsClient;

/// A PostgreSQL cluster started for the tests: the server's own
/// [`PostgresCluster`], on a TCP port of 127.0.0.1, tuned for throwaway data.
pub struct Cluster {
    dir: PathBuf,
    cluster: PostgresCluster,
    port: u16,
}

impl Cluster {
    /// Starts a new cluster in a fresh temporary directory.
    pub fn start() -> Cluster {
        Self::start_with(false)
    }

    /// Starts a new cluster that accepts TLS (self-signed certificate),
    /// like a hosted PostgreSQL such as Supabase.
    pub fn start_tls() -> Cluster {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Cluster {
        let dir = new_cluster_dir();
        spawn_watchdog(&dir, "data/postmaster.pid", "QUIT");
        let port = free_port();
        let options = server_options(&dir, port, tls);
        let cluster = PostgresCluster::new(dir.join("data"), dir.join("server.log"), options)
            .unwrap_or_else(|error| {
                panic!("{error}; or point the tests at a server with TEST_DATABASE_URL")
            });
        cluster.init(&["--auth-host=trust", "--no-sync"]).unwrap();
        if tls {
            let status = as_server_user(Path::new("openssl"))
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=localhost",
                ])
                .arg("-keyout")
                .arg(dir.join("data/server.key"))
                .arg("-out")
                .arg(dir.join("data/server.crt"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl is needed for the TLS test cluster");
            assert!(status.success(), "openssl could not make a certificate");
        }
        cluster.start().unwrap();
        Cluster { dir, cluster, port }
    }

    /// A hot standby of this cluster: a copy made with `pg_basebackup -R`
    /// that streams from it and answers read-only queries. Its settings
    /// are the primary's (a standby refuses to start with fewer
    /// connections than its primary allows).
    pub fn standby(&self) -> Cluster {
        let dir = new_cluster_dir();
        spawn_watchdog(&dir, "data/postmaster.pid", "QUIT");
        let bin = vantage_sync::managed_postgres::server_bin_dir()
            .expect("the PostgreSQL server binaries (pg_basebackup)");
        let status = as_server_user(&bin.join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "--no-sync",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-D")
            .arg(dir.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("pg_basebackup");
        assert!(status.success(), "pg_basebackup failed");
        let port = free_port();
        let cluster = PostgresCluster::new(
            dir.join("data"),
            dir.join("server.log"),
            server_options(&dir, port, false),
        )
        .unwrap();
        cluster.start().unwrap();
        Cluster { dir, cluster, port }
    }

    /// Superuser URL of the database `name` on this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops the server (fast shutdown), keeping its data.
    pub fn stop(&self) {
        self.cluster.stop(Shutdown::Fast).unwrap();
    }

    /// Starts the server again on the same port, after [`Cluster::stop`].
    pub fn restart(&self) {
        self.cluster.start().unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Immediate: the data is thrown away anyway.
        let _ = self.cluster.stop(Shutdown::Immediate);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory for a cluster, owned by the server's OS user
/// (initdb and postgres refuse to run as root).
fn new_cluster_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vantage-sync-pg-{}-{}",
        std::process::id(),
        NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    hand_to_server_user(&dir);
    dir
}

/// The server settings of a test cluster on `port`, its socket in `dir`:
/// tuned for throwaway data, with pg_stat_statements preloaded.
fn server_options(dir: &Path, port: u16, tls: bool) -> String {
    format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off \
         -c max_connections=400 -c shared_buffers=64MB \
         -c shared_preload_libraries=pg_stat_statements{}",
        dir.display(),
        if tls { " -c ssl=on" } else { "" }
    )
}
static NEXT_DATABASE: AtomicU32 = AtomicU32::new(0);

/// The server every test of this binary shares, and its migrated template.
struct Shared {
    /// Kept alive for the whole run; its watchdog cleans up after exit.
    _cluster: Option<Cluster>,
    admin_url: String,
    template: String,
}

static SHARED: OnceCell<Shared> = OnceCell::const_new();

async fn shared() -> &'static Shared {
    SHARED
        .get_or_init(|| async {
            let (cluster, admin_url) = match std::env::var("TEST_DATABASE_URL") {
                Ok(url) => (None, url),
                Err(_) => {
                    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
                    let url = cluster.url("postgres");
                    (Some(cluster), url)
                }
            };
            let template = format!("vantage_template_{}", std::process::id());
            let mut admin = PgConnection::connect(&admin_url).await.unwrap();
            admin
                .execute(raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {template}"
                ))))
                .await
                .unwrap();
            admin
                .execute(raw_sql(AssertSqlSafe(format!(
                    "CREATE DATABASE {template}"
                ))))
                .await
                .unwrap();
            admin.close().await.unwrap();
            let template_url = database_url(&admin_url, &template);
            let db = sea_orm::Database::connect(&template_url).await.unwrap();
            Migrator::up(&db, None).await.unwrap();
            // Statement counts, for the tests of what requests read.
            sea_orm::ConnectionTrait::execute_unprepared(
                &db,
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
            )
            .await
            .unwrap();
            db.close().await.unwrap();
            Shared {
                _cluster: cluster,
                admin_url,
                template,
            }
        })
        .await
}

/// A database of its own for one test.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Superuser URL of the database.
    pub url: String,
}

impl TestDb {
    /// A fresh database with every migration applied and the initial
    /// resources in.
    pub async fn migrated() -> TestDb {
        let shared = shared().await;
        Self::create(shared, &format!("TEMPLATE {}", shared.template)).await
    }

    /// The `postgres` database of a private cluster, migrated.
    pub async fn migrated_on(cluster: &Cluster) -> TestDb {
        let url = cluster.url("postgres");
        let db = sea_orm::Database::connect(&url).await.unwrap();
        Migrator::up(&db, None).await.unwrap();
        db.close().await.unwrap();
        TestDb {
            name: "postgres".into(),
            url,
        }
    }

    /// A fresh database with nothing in it, for migration tests.
    pub async fn empty() -> TestDb {
        Self::create(shared().await, "TEMPLATE template0").await
    }

    async fn create(shared: &Shared, clause: &str) -> TestDb {
        let name = format!(
            "vantage_test_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = PgConnection::connect(&shared.admin_url).await.unwrap();
        admin
            .execute(raw_sql(AssertSqlSafe(format!(
                "CREATE DATABASE {name} {clause}"
            ))))
            .await
            .unwrap();
        admin.close().await.unwrap();
        let url = database_url(&shared.admin_url, &name);
        TestDb { name, url }
    }

    /// One new superuser connection.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.unwrap()
    }

    /// Creates a `NOINHERIT` login role that is granted `roles` and nothing
    /// else (Supabase's `authenticator`); returns its name and its URL for
    /// this database. Roles belong to the cluster, so each name is new.
    pub async fn login_role(&self, roles: &[&str]) -> (String, String) {
        static NEXT_ROLE: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vs_login_{}_{}",
            std::process::id(),
            NEXT_ROLE.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = self.connect().await;
        let mut sql = format!("CREATE ROLE {name} LOGIN NOINHERIT;");
        if !roles.is_empty() {
            sql.push_str(&format!("GRANT {} TO {name};", roles.join(", ")));
        }
        admin.execute(raw_sql(AssertSqlSafe(sql))).await.unwrap();
        admin.close().await.unwrap();
        let options: PgConnectOptions = self.url.parse().unwrap();
        let url = options.username(&name).to_url_lossy().to_string();
        (name, url)
    }

    /// A pool of superuser connections.
    pub async fn pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&self.url)
            .await
            .unwrap()
    }
}

/// `admin_url` with its database replaced by `name`.
fn database_url(admin_url: &str, name: &str) -> String {
    let options: PgConnectOptions = admin_url.parse().unwrap();
    options.database(name).to_url_lossy().to_string()
}

fn running_as_root() -> bool {
    vantage_sync::managed_postgres::running_as_root()
}

/// Gives `dir` to the `postgres` OS user when running as root, so that
/// the server tools run as that user can write there.
fn hand_to_server_user(dir: &Path) {
    if running_as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "chown of {} failed", dir.display());
    }
}

fn as_server_user(program: &Path) -> Command {
    vantage_sync::managed_postgres::server_user_command(program)
}

/// A detached shell that outlives this process: once the process is gone it
/// sends `signal` to the process whose pid is the first line of `pidfile`
/// (relative to `dir`), waits for it, and removes the directory.
fn spawn_watchdog(dir: &Path, pidfile: &str, signal: &str) {
    let script = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
        pid=$(head -n 1 "$2/$3" 2>/dev/null)
        if [ -n "$pid" ]; then
            kill -"$4" "$pid" 2>/dev/null
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -rf "$2"
    "#;
    // `setsid -f` forks the watchdog into its own session and returns at
    // once, so a Ctrl-C to the test's process group does not stop it.
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", script, "watchdog"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(pidfile)
        .arg(signal)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cannot start the cluster watchdog (setsid, sh)");
    assert!(status.success(), "cannot start the cluster watchdog");
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for a subscription to start on the server whose `/metrics` is at
/// `metrics_url`: it counts a subscription as open once it receives the
/// live feed, after which a live-only subscription misses nothing.
pub fn subscription_started(metrics_url: &str) -> SubscriptionStart {
    SubscriptionStart {
        metrics_url: metrics_url.to_owned(),
    }
}

/// See [`subscription_started`].
pub struct SubscriptionStart {
    metrics_url: String,
}

impl SubscriptionStart {
    /// Runs `subscribe` and returns its output once the server's count of
    /// open subscriptions has grown past what it was before.
    pub async fn wait<T>(self, subscribe: impl std::future::Future<Output = T>) -> T {
        let before = self.open().await;
        let output = subscribe.await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.open().await <= before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the subscription did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        output
    }

    async fn open(&self) -> i64 {
        subscriptions_active(&self.metrics_url).await
    }
}

/// The subscriptions open on the server whose `/metrics` is at
/// `metrics_url`, by its gauge.
pub async fn subscriptions_active(metrics_url: &str) -> i64 {
    gauge(metrics_url, "vantage_sync_subscriptions_active").await
}

/// The live subscription groups (subscribers of one document, operation,
/// variables and role share one) on the server whose `/metrics` is at
/// `metrics_url`, by its gauge.
pub async fn subscription_groups(metrics_url: &str) -> i64 {
    gauge(metrics_url, "vantage_sync_subscription_groups").await
}

/// The value of the unlabelled gauge `name` in `/metrics` at `metrics_url`.
async fn gauge(metrics_url: &str, name: &str) -> i64 {
    let text = reqwest::get(metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// The row of `resource` as `to_jsonb` gives it, or JSON null.
pub async fn state_row(conn: &mut PgConnection, resource: &str) -> serde_json::Value {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT to_jsonb(s) FROM vantage_sync_state s WHERE resource = $1), 'null')",
    )
    .bind(resource)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Seconds since the epoch, for token claims.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The SQLSTATE and constraint of a database error, for exact assertions.
pub fn sql_error<T: std::fmt::Debug>(result: Result<T, sqlx::Error>) -> (String, Option<String>) {
    match result {
        Err(sqlx::Error::Database(error)) => (
            error
                .code()
                .map(|code| code.into_owned())
                .unwrap_or_default(),
            error.constraint().map(str::to_owned),
        ),
        other => panic!("expected a database error, got {other:?}"),
    }
}

/// Asserts two JSON objects are equal, reporting only the keys that differ
/// (whole snapshots are too large to read in a failure message).
#[track_caller]
pub fn assert_same_json(actual: &serde_json::Value, expected: &serde_json::Value) {
    if actual == expected {
        return;
    }
    let (Some(actual_map), Some(expected_map)) = (actual.as_object(), expected.as_object()) else {
        panic!("JSON differs:\n actual: {actual}\n expected: {expected}");
    };
    let mut report = String::new();
    for key in expected_map.keys().chain(
        actual_map
            .keys()
            .filter(|key| !expected_map.contains_key(*key)),
    ) {
        let (left, right) = (actual_map.get(key), expected_map.get(key));
        if left != right {
            report.push_str(&format!(
                "\n[{key}]\n actual:   {left:?}\n expected: {right:?}"
            ));
        }
    }
    panic!("JSON differs in:{report}");
}
