//! The HTTP server: connects, migrates, binds, serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use sea_orm::{DatabaseConnection, DbErr};
use tokio::net::TcpListener;

use crate::auth::{Caller, Role};
use crate::config::ServerConfig;
use crate::db::{RequestDb, events};
use crate::feed::Feed;
use crate::graphql::documents::DocumentCache;
use crate::http::{AppState, router};
use crate::metrics::Metrics;
use crate::migrate::{self, MigrateError};
use crate::{db, graphql};

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
    addr: SocketAddr,
    shutting_down: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Migrates (unless told not to), connects the pool and binds.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServeError> {
        if config.migrate {
            migrate::apply_pending(&config.database_url).await?;
        }
        let pool = db::connect(&config.database_url, config.max_connections).await?;
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
        let (shutting_down, shutdown_seen) = tokio::sync::watch::channel(false);
        let feed = Feed::start(config.database_url.clone(), pool.clone(), metrics.clone());
        let state = AppState {
            schema: graphql::builder(config.limits).data(feed.clone()).finish(),
            pool,
            keys: config.keys,
            metrics,
            feed,
            request_timeout: config.request_timeout,
            max_body_bytes: config.max_body_bytes,
            websocket: config.websocket,
            shutting_down: shutdown_seen,
            documents: Arc::new(DocumentCache::new(DOCUMENT_CACHE_CAPACITY)),
        };
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
            addr,
            shutting_down,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The database pool, e.g. to close it after shutdown.
    pub fn pool(&self) -> DatabaseConnection {
        self.state.pool.clone()
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.addr;
        tracing::info!(%addr, "serving GraphQL on http://{addr}/graphql, GraphiQL on http://{addr}/");
        let pool = self.state.pool.clone();
        let shutting_down = self.shutting_down;
        axum::serve(self.listener, router(self.state))
            .with_graceful_shutdown(async move {
                shutdown.await;
                // WebSocket connections are not HTTP requests in flight:
                // tell them to go away (1001) so clients resume elsewhere.
                shutting_down.send_replace(true);
            })
            .await
            .map_err(|source| ServeError::Io { addr, source })?;
        let _ = pool.close().await;
        Ok(())
    }
}

/// Deletes events older than `days` days, at start and then hourly.
async fn prune_events(pool: DatabaseConnection, days: u32, feed: std::sync::Weak<Feed>) {
    let mut every_hour = tokio::time::interval(std::time::Duration::from_secs(3600));
    let caller = Caller::for_role(Role::ServiceRole);
    loop {
        every_hour.tick().await;
        // Ends with the server.
        if feed.strong_count() == 0 {
            return;
        }
        let db = RequestDb::new(
            pool.clone(),
            &caller,
            false,
            std::time::Duration::from_secs(300),
        );
        let pruned = match db.txn().await {
            Ok(txn) => events::prune(&*txn, days)
                .await
                .map_err(|error| error.to_string()),
            Err(error) => Err(error.message()),
        };
        let committed = db.commit().await.map_err(|error| error.message());
        match pruned.and_then(|deleted| committed.map(|()| deleted)) {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, days, "pruned old sync events"),
            Err(error) => tracing::warn!(%error, "could not prune sync events"),
        }
    }
}
