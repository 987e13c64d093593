//! The HTTP server: connects, migrates, binds, serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use sea_orm::DbErr;
use tokio::net::TcpListener;

use crate::auth::{Caller, Role};
use crate::db::migrate::{self, MigrateError};
use crate::db::{Access, Pool, PrivilegeError, events};
use crate::feed::Feed;
use crate::graphql::documents::DocumentCache;
use crate::infra::config::ConnectionLimits;
use crate::infra::config::ServerConfig;
use crate::infra::metrics::Metrics;
use crate::infra::rate_limit::RateLimiter;
use crate::transport::http::{AppState, router};
use crate::transport::listener;
use crate::{db, graphql};

/// Longest a pruning of the event log may take.
const PRUNE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Distinct query texts whose parsed documents are kept.
const DOCUMENT_CACHE_CAPACITY: usize = 512;

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
    Webhooks(#[from] crate::notify::ClientError),
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
        let (shutting_down, shutdown_seen) = tokio::sync::watch::channel(false);
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
        let state = AppState {
            schema: graphql::builder(config.limits)
                .data(config.webhooks)
                .finish(),
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
            documents: Arc::new(DocumentCache::new(DOCUMENT_CACHE_CAPACITY)),
            cors: config.cors,
        };
        crate::notify::start(
            state.pool.clone(),
            &state.feed,
            state.metrics.clone(),
            config.webhooks,
        )?;
        if let Some(limiter) = &state.rate_limiter {
            tokio::spawn(forget_idle_callers(Arc::downgrade(limiter)));
        }
        if let Some(days) = config.event_retention_days {
            tokio::spawn(prune_events(
                state.pool.clone(),
                days,
                Arc::downgrade(&state.feed),
            ));
        }
        Ok(Self {
            listener,
            state,
            connections,
            addr,
            shutting_down,
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

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.addr;
        tracing::info!(%addr, "serving GraphQL on http://{addr}/graphql, the status board on http://{addr}/, GraphiQL on http://{addr}/graphiql");
        let pool = self.state.pool.clone();
        let metrics = self.state.metrics.clone();
        let shutting_down = self.shutting_down;
        listener::serve(
            self.listener,
            router(self.state),
            self.connections,
            metrics,
            async move {
                shutdown.await;
                // WebSocket connections and SSE streams are not requests
                // that finish: tell them to go (1001, or the stream ends)
                // so clients resume elsewhere.
                shutting_down.send_replace(true);
            },
        )
        .await;
        pool.close().await;
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

/// Deletes events older than `days` days, at start and then hourly.
async fn prune_events(pool: Pool, days: u32, feed: std::sync::Weak<Feed>) {
    let mut every_hour = tokio::time::interval(std::time::Duration::from_secs(3600));
    let caller = Caller::for_role(Role::ServiceRole);
    loop {
        every_hour.tick().await;
        // Ends with the server.
        if feed.strong_count() == 0 {
            return;
        }
        let pruned = pool
            .run(&caller, Access::Write, PRUNE_TIMEOUT, async |txn| {
                events::prune(txn, days).await
            })
            .await;
        match pruned {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, days, "pruned old sync events"),
            Err(error) => tracing::warn!(error = %error.message(), "could not prune sync events"),
        }
    }
}
