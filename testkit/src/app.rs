//! The real server, in-process on a free port, against a test database.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vantage_sync::auth::{Role, TokenKeys};
use vantage_sync::server::Server;
use vantage_sync::server::ServerConfig;

use crate::TestDb;

/// The JWT secret test servers use.
pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789abcdef";

/// A running server and its database.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its database.
    pub db: TestDb,
    /// HTTP client.
    pub client: reqwest::Client,
    keys: TokenKeys,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl TestApp {
    /// A server on a fresh migrated database.
    pub async fn spawn() -> TestApp {
        Self::spawn_with(TestDb::migrated().await, |_| {}).await
    }

    /// A server on `db`, with `configure` applied to its settings.
    pub async fn spawn_with(db: TestDb, configure: impl FnOnce(&mut ServerConfig)) -> TestApp {
        let mut config = ServerConfig::new(db.url.clone(), SECRET.as_bytes()).unwrap();
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        config.migrate = false;
        config.max_connections = 8;
        configure(&mut config);
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr();
        let (shutdown, signal) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .run(async {
                    let _ = signal.await;
                })
                .await
                .unwrap();
        });
        let app = TestApp {
            addr,
            db,
            // No idle connections kept: they would count against the
            // server's connection cap in the tests that fill it.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            keys: TokenKeys::new(SECRET.as_bytes()).unwrap(),
            shutdown: Some(shutdown),
            handle: Some(handle),
        };
        // Ready means the database answers and the live feed listens.
        assert_eq!(
            app.ready_within(Duration::from_secs(5)).await,
            StatusCode::OK,
            "server not ready"
        );
        app
    }

    /// `/readyz`, polled until it is 200 or `timeout` passes; the last status.
    pub async fn ready_within(&self, timeout: Duration) -> StatusCode {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.readiness().await;
            if status == StatusCode::OK || tokio::time::Instant::now() >= deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `/readyz` once.
    pub async fn readiness(&self) -> StatusCode {
        match self.client.get(self.url("/readyz")).send().await {
            Ok(response) => response.status(),
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// Runs `statements` (one or more, simple protocol) as the superuser
    /// on the server's database.
    pub async fn sql(&self, statements: &str) {
        use sqlx::Executor;
        let mut conn = self.db.connect().await;
        conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_owned())))
            .await
            .unwrap();
    }

    /// A valid token for `role`.
    pub fn token(&self, role: &str) -> String {
        token(&self.keys, role)
    }

    /// URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs a GraphQL request with an optional raw Authorization header.
    pub async fn post(&self, authorization: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let mut request = self.client.post(self.url("/graphql")).json(body);
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    /// Runs `query` with `variables` as `role` (`None`: no token).
    pub async fn graphql(
        &self,
        role: Option<&str>,
        query: &str,
        variables: Value,
    ) -> (StatusCode, Value) {
        let authorization = role.map(|role| format!("Bearer {}", self.token(role)));
        self.post(
            authorization.as_deref(),
            &json!({"query": query, "variables": variables}),
        )
        .await
    }

    /// Runs `query` as `role`, expecting HTTP 200, and returns the body.
    pub async fn query(&self, role: &str, query: &str, variables: Value) -> Value {
        let (status, body) = self.graphql(Some(role), query, variables).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Begins shutting down without waiting.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.handle.take().unwrap()
    }
}

/// Unpadded base64url, for hand-made tokens.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A token for `role` signed with `keys`, valid for ten minutes, for the
/// subject `test-user`.
pub(crate) fn token(keys: &TokenKeys, role: &str) -> String {
    keys.mint(
        Role::parse(role).unwrap(),
        Duration::from_secs(600),
        Some("test-user"),
    )
    .unwrap()
}

/// The value of the unlabelled metric `name` in `/metrics` text, if it is
/// there.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}
