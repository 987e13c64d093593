//! The HTTP server: connects, migrates, binds, serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::DbErr;
use tokio::net::TcpListener;

use crate::auth::TokenKeys;
use crate::db::migrate::{self, MigrateError};
use crate::db::replica::{ReadReplica, ReplicaSettings};
use crate::db::{Access, Identity, Pool, PreparedStatements, PrivilegeError, Role, events};
use crate::feed::Feed;
use crate::graphql::QueryLimits;
use crate::graphql::documents::{DocumentSettings, PersistedDocuments};
use crate::graphql::live::LiveGroups;
use crate::graphql::mutation::WriteRules;
use crate::graphql::parsed_queries::ParsedQueryCache;
use crate::metrics::Metrics;
use crate::transport::cors::CorsOrigins;
use crate::transport::listener::{self, ConnectionLimits};
use crate::transport::rate_limit::{RateLimit, RateLimiter};
use crate::transport::ws::WebSocketConfig;
use crate::transport::{AppState, router};
use crate::webhooks::WebhookSettings;
use crate::{db, graphql};

/// Address served when none is given.
pub const DEFAULT_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
/// Request and statement timeout, in seconds.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
/// Largest request body, in bytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Days of sync events kept.
pub const DEFAULT_EVENT_RETENTION_DAYS: u32 = 30;

/// How the server leaves when told to stop (`--shutdown-delay-secs`,
/// `--shutdown-timeout-secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaving {
    /// How long `/readyz` answers 503 while requests are still served, so
    /// a load balancer takes the replica out before it stops accepting.
    pub delay: Duration,
    /// How long requests in flight then have to finish.
    pub timeout: Duration,
}

impl Leaving {
    /// The defaults: no delay (nothing to tell without a balancer), 30 s.
    pub const DEFAULT: Self = Self {
        delay: Duration::ZERO,
        timeout: Duration::from_secs(30),
    };
}

/// Longest a pruning of the event log may take.
const PRUNE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Distinct query texts whose parsed documents are kept.
const PARSED_QUERIES_KEPT: usize = 512;

/// The server's validated settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Session connection the live feed LISTENs on; `None`: `database_url`.
    pub listen_database_url: Option<String>,
    /// Named prepared statements, or how to decide.
    pub prepared_statements: PreparedStatements,
    /// Longest time between two reads of the event log.
    pub feed_poll_interval: Duration,
    /// Origins browsers may call from.
    pub cors: CorsOrigins,
    /// Token keys made from the secret.
    pub keys: TokenKeys,
    /// Address to listen on (port 0: any free port).
    pub listen_addr: SocketAddr,
    /// Apply pending migrations at start.
    pub migrate: bool,
    /// Pool size.
    pub max_connections: u32,
    /// Longest wait for a pooled connection.
    pub acquire_timeout: Duration,
    /// Request and statement timeout.
    pub request_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Query depth and complexity limits.
    pub limits: QueryLimits,
    /// Days of events to keep; `None` keeps everything.
    pub event_retention_days: Option<u32>,
    /// WebSocket transport settings.
    pub websocket: WebSocketConfig,
    /// Timeouts and cap of HTTP connections; `max_connections` of 0: from
    /// the open-file limit at start.
    pub connections: ConnectionLimits,
    /// Requests per caller; `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// Webhook retry window and allowed addresses.
    pub webhooks: WebhookSettings,
    /// How strict writes are.
    pub write_rules: WriteRules,
    /// How the server leaves when told to stop.
    pub leaving: Leaving,
    /// A hot standby that queries read from, when usable.
    pub read_replica: Option<ReplicaSettings>,
    /// Whether GraphQL HTTP answers carry `Server-Timing` (`db`, `total`).
    pub server_timing: bool,
    /// What may be sent by reference (persisted queries, trusted
    /// documents).
    pub documents: DocumentSettings,
}

impl ServerConfig {
    /// Settings with defaults for everything but the database and secret.
    pub fn new(database_url: String, jwt_secret: &[u8]) -> Result<Self, String> {
        let keys = TokenKeys::new(jwt_secret)?;
        Ok(Self::with_keys(database_url, keys))
    }

    /// Settings with defaults for everything but the database and keys.
    pub fn with_keys(database_url: String, keys: TokenKeys) -> Self {
        Self {
            database_url,
            listen_database_url: None,
            prepared_statements: PreparedStatements::Auto,
            feed_poll_interval: crate::feed::DEFAULT_POLL_INTERVAL,
            cors: CorsOrigins::default(),
            keys,
            listen_addr: DEFAULT_LISTEN_ADDR,
            migrate: true,
            max_connections: db::default_max_connections(),
            acquire_timeout: db::DEFAULT_ACQUIRE_TIMEOUT,
            request_timeout: Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECS),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            limits: QueryLimits::DEFAULT,
            event_retention_days: Some(DEFAULT_EVENT_RETENTION_DAYS),
            websocket: WebSocketConfig::DEFAULT,
            connections: ConnectionLimits::DEFAULT,
            rate_limit: None,
            webhooks: WebhookSettings::DEFAULT,
            write_rules: WriteRules::default(),
            leaving: Leaving::DEFAULT,
            read_replica: None,
            server_timing: false,
            documents: DocumentSettings {
                persisted_queries: true,
                ..DocumentSettings::default()
            },
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The database could not be reached.
    #[error("cannot connect to the database: {0}")]
    Database(#[from] DbErr),
    /// Pending migrations could not be applied.
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] MigrateError),
    /// Migrations were asked for over a transaction-mode pooler only.
    #[error(
        "DATABASE_URL goes through a transaction-mode pooler, where migrations cannot run (their lock and statements need one session): set LISTEN_DATABASE_URL to a direct connection (migrations then use it), or run `vantage-sync migrate up` over a direct connection and serve with --no-migrate"
    )]
    MigrateThroughPooler,
    /// The login role lacks what the server needs.
    #[error("{0}")]
    Privileges(#[from] PrivilegeError),
    /// More HTTP connections were asked for than open files allow.
    #[error(
        "MAX_HTTP_CONNECTIONS={asked} is more than the open-file limit ({files}) allows after a reserve of {reserve} for the database pool and the listener: set at most {allowed}, or raise the hard limit (ulimit -Hn)"
    )]
    TooManyConnections {
        /// The cap asked for.
        asked: usize,
        /// The open-file limit in force.
        files: u64,
        /// Files kept for other uses.
        reserve: u64,
        /// The largest cap that fits.
        allowed: usize,
    },
    /// The webhook client could not be built.
    #[error("{0}")]
    Webhooks(#[from] crate::webhooks::ClientError),
    /// The listen address could not be bound, or serving failed.
    #[error("cannot serve on {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
}

/// A bound, ready-to-run server.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    connections: ConnectionLimits,
    addr: SocketAddr,
    shutting_down: tokio::sync::watch::Sender<bool>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    leaving: Leaving,
}

impl Server {
    /// Connects the pool, migrates (unless told not to), checks what the
    /// login role may do, and binds.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        let pool = db::connect_with(
            &config.database_url,
            config.max_connections,
            config.acquire_timeout,
            config.prepared_statements,
        )
        .await?;
        let pooled = pool.behind_transaction_pooler();
        if pooled {
            tracing::info!(
                "DATABASE_URL goes through a transaction-mode pooler: statements are not prepared by name"
            );
        }
        if config.migrate {
            let url = match (&config.listen_database_url, pooled) {
                (_, false) => &config.database_url,
                (Some(session), true) => session,
                (None, true) => return Err(ServeError::MigrateThroughPooler),
            };
            migrate::apply_pending(url).await?;
        }
        db::check_privileges(&pool).await?;
        let connections = connection_limits(config.connections, config.max_connections)?;
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| ServeError::Io {
                addr: config.listen_addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Io {
            addr: config.listen_addr,
            source,
        })?;
        let metrics = Arc::new(Metrics::default());
        config.keys.start(metrics.clone());
        let pool = match &config.read_replica {
            Some(settings) => {
                let standby = db::connect_lazy(
                    &settings.url,
                    config.max_connections,
                    config.acquire_timeout,
                    pool.prepared_statements(),
                )
                .await?;
                let replica =
                    ReadReplica::start(pool.clone(), standby, settings.max_lag, metrics.clone());
                pool.with_replica(replica)
            }
            None => pool,
        };
        let (shutting_down, shutdown_seen) = tokio::sync::watch::channel(false);
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // LISTEN through a transaction pooler hears nothing, and worse, the
        // server connection it lands on then hands notifications to other
        // clients mid-query: there the feed only polls.
        let listen_url = match config.listen_database_url {
            Some(url) if db::is_transaction_pooler(&url).await? => None,
            Some(url) => Some(url),
            None if pooled => None,
            None => Some(config.database_url.clone()),
        };
        if listen_url.is_none() {
            tracing::warn!(
                "LISTEN_DATABASE_URL (DATABASE_URL when unset) goes through a transaction-mode pooler, where LISTEN receives nothing: changes reach subscribers only by polling, every FEED_POLL_SECS; set LISTEN_DATABASE_URL to a direct or session-mode connection"
            );
        }
        let feed = Feed::start(
            listen_url,
            pool.clone(),
            metrics.clone(),
            config.feed_poll_interval,
            config.request_timeout,
        );
        let schema = graphql::builder(config.limits)
            .data(config.webhooks)
            .data(config.write_rules)
            .finish();
        let state = AppState {
            live: LiveGroups::start(schema.clone(), feed.clone()),
            schema,
            pool,
            keys: config.keys,
            metrics,
            feed,
            request_timeout: config.request_timeout,
            max_body_bytes: config.max_body_bytes,
            max_db_reads: config.limits.db_reads,
            rate_limiter: config
                .rate_limit
                .map(|limit| Arc::new(RateLimiter::new(limit))),
            websocket: config.websocket,
            shutting_down: shutdown_seen,
            draining: draining.clone(),
            parsed_queries: Arc::new(ParsedQueryCache::new(PARSED_QUERIES_KEPT)),
            cors: config.cors,
            server_timing: config.server_timing,
            documents: Arc::new(PersistedDocuments::new(config.documents.clone())),
        };
        crate::webhooks::start(
            state.pool.clone(),
            &state.feed,
            state.metrics.clone(),
            config.webhooks,
            state.shutting_down.clone(),
        )?;
        if let Some(limiter) = &state.rate_limiter {
            tokio::spawn(forget_idle_callers(Arc::downgrade(limiter)));
        }
        tokio::spawn(prune_hourly(
            state.pool.clone(),
            Pruned::IdempotencyKeys,
            Arc::downgrade(&state.feed),
        ));
        if let Some(days) = config.event_retention_days {
            tokio::spawn(prune_hourly(
                state.pool.clone(),
                Pruned::Events(days),
                Arc::downgrade(&state.feed),
            ));
        }
        Ok(Self {
            listener,
            state,
            connections,
            addr,
            shutting_down,
            draining,
            leaving: config.leaving,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The database pool, e.g. to close it after shutdown.
    pub fn pool(&self) -> Pool {
        self.state.pool.clone()
    }

    /// Serves until `shutdown` completes, then leaves in phases, each
    /// logged: `/readyz` answers 503 while requests are still served for
    /// the shutdown delay (a load balancer takes the replica out); then no
    /// new connections are accepted, WebSockets close with 1001 and SSE
    /// streams end (their clients resume elsewhere with their cursor), and
    /// requests in flight have the shutdown timeout to finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.addr;
        tracing::info!(%addr, "serving GraphQL on http://{addr}/graphql, the status board on http://{addr}/, GraphiQL on http://{addr}/graphiql");
        let pool = self.state.pool.clone();
        let metrics = self.state.metrics.clone();
        let shutting_down = self.shutting_down;
        let (draining, leaving) = (self.draining, self.leaving);
        listener::serve(
            self.listener,
            router(self.state),
            self.connections,
            metrics,
            async move {
                shutdown.await;
                draining.store(true, std::sync::atomic::Ordering::SeqCst);
                if !leaving.delay.is_zero() {
                    tracing::info!(
                        delay_secs = leaving.delay.as_secs_f64(),
                        "leaving: /readyz answers 503 while requests are still served"
                    );
                    tokio::time::sleep(leaving.delay).await;
                }
                tracing::info!(
                    timeout_secs = leaving.timeout.as_secs_f64(),
                    "leaving: no new connections; requests in flight finish, WebSockets close with 1001, SSE streams end"
                );
                // WebSocket connections and SSE streams are not requests
                // that finish: tell them to go so clients resume elsewhere.
                shutting_down.send_replace(true);
            },
            leaving.timeout,
        )
        .await;
        pool.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The connection limits in force: the open-file limit raised to its hard
/// limit, and the cap checked against it (or taken from it) after a
/// reserve for the database pool, the listener and the process's own files.
fn connection_limits(
    asked: ConnectionLimits,
    pool_size: u32,
) -> Result<ConnectionLimits, ServeError> {
    let files = listener::raise_file_limit();
    let reserve = u64::from(pool_size) + 2 + 64;
    let allowed =
        usize::try_from(files.saturating_sub(reserve).clamp(1, 10_000_000)).unwrap_or(10_000_000);
    let max_connections = match asked.max_connections {
        0 => allowed,
        asked if asked > allowed => {
            return Err(ServeError::TooManyConnections {
                asked,
                files,
                reserve,
                allowed,
            });
        }
        asked => asked,
    };
    tracing::info!(
        open_files = files,
        max_http_connections = max_connections,
        "connection limits"
    );
    Ok(ConnectionLimits {
        max_connections,
        ..asked
    })
}

/// Once a minute, forgets callers whose budget is full again; ends with
/// the server.
async fn forget_idle_callers(limiter: std::sync::Weak<RateLimiter>) {
    let mut every_minute = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        every_minute.tick().await;
        match limiter.upgrade() {
            Some(limiter) => limiter.forget_idle(),
            None => return,
        }
    }
}

/// What the server prunes on its own, hourly.
#[derive(Debug, Clone, Copy)]
enum Pruned {
    /// Sync events older than this many days.
    Events(u32),
    /// Idempotency keys older than a day (an expired key is also taken
    /// over by its next use).
    IdempotencyKeys,
}

impl Pruned {
    async fn prune(self, txn: &db::RequestTxn) -> Result<i64, DbErr> {
        match self {
            Self::Events(days) => events::prune(txn, days).await,
            Self::IdempotencyKeys => db::idempotency::prune(txn).await,
        }
    }
}

/// Deletes what `pruned` names, at start and then hourly, as the service
/// role, until the server ends.
async fn prune_hourly(pool: Pool, pruned: Pruned, feed: std::sync::Weak<Feed>) {
    let mut every_hour = tokio::time::interval(std::time::Duration::from_secs(3600));
    let pruner = Identity::of_role(Role::ServiceRole);
    loop {
        every_hour.tick().await;
        // Ends with the server.
        if feed.strong_count() == 0 {
            return;
        }
        let result = pool
            .run(&pruner, Access::Write, PRUNE_TIMEOUT, async |txn| {
                pruned.prune(txn).await
            })
            .await;
        // The messages operators search for (docs/operations.md).
        match (result, pruned) {
            (Ok(0), _) => {}
            (Ok(deleted), Pruned::Events(days)) => {
                tracing::info!(deleted, days, "pruned old sync events")
            }
            (Ok(deleted), Pruned::IdempotencyKeys) => {
                tracing::info!(deleted, "forgot idempotency keys older than a day")
            }
            (Err(error), Pruned::Events(_)) => {
                tracing::warn!(error = %error.message(), "could not prune sync events")
            }
            (Err(error), Pruned::IdempotencyKeys) => {
                tracing::warn!(error = %error.message(), "could not prune idempotency keys")
            }
        }
    }
}
