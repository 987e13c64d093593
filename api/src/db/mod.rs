//! Connections to the service's PostgreSQL database, and the per-request
//! transaction that runs as the caller's role.

pub mod events;
pub mod sync_states;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{
    AccessMode, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, IsolationLevel, Statement, TransactionTrait,
};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};

/// Opens a pool of at most `max_connections` connections to `database_url`.
pub async fn connect(
    database_url: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(database_url);
    options
        .max_connections(max_connections)
        .min_connections(0)
        // Short waits: with the database down, a request should fail fast
        // (and /readyz say so) rather than queue.
        .connect_timeout(Duration::from_secs(3))
        .acquire_timeout(Duration::from_secs(3))
        // sqlx pings every connection on release already; pinging again on
        // every acquire costs each request a round trip. Only a connection
        // idle long enough to have been dropped is checked first.
        .test_before_acquire_if_idle_for(Duration::from_secs(1))
        .sqlx_logging(false);
    Database::connect(options).await
}

/// The database work of one request: a single transaction, begun on first
/// use, that first becomes the caller's role (PostgREST's model) so that
/// PostgreSQL's grants and RLS refuse whatever a guard might miss.
pub struct RequestDb {
    pool: DatabaseConnection,
    role: &'static str,
    claims: Arc<str>,
    read_only: bool,
    repeatable_read: bool,
    statement_timeout: Duration,
    txn: Mutex<Option<DatabaseTransaction>>,
}

impl RequestDb {
    /// Work for `caller`; `read_only` for queries.
    pub fn new(
        pool: DatabaseConnection,
        caller: &Caller,
        read_only: bool,
        statement_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            role: caller.role.as_str(),
            claims: caller.claims.clone(),
            read_only,
            repeatable_read: false,
            statement_timeout,
            txn: Mutex::new(None),
        }
    }

    /// Read-only work for `caller` that must see one snapshot throughout
    /// (REPEATABLE READ).
    pub fn snapshot(
        pool: DatabaseConnection,
        caller: &Caller,
        statement_timeout: Duration,
    ) -> Self {
        Self {
            repeatable_read: true,
            ..Self::new(pool, caller, true, statement_timeout)
        }
    }

    /// The request's transaction, begun (as the caller's role) if need be.
    /// Resolvers hold it only while they talk to the database.
    pub async fn txn(&self) -> ApiResult<MappedMutexGuard<'_, DatabaseTransaction>> {
        let mut slot = self.txn.lock().await;
        if slot.is_none() {
            // Boxed: every field resolver that may reach the database
            // embeds this future, and async-graphql copies each of those
            // into a box of its own, per field and row.
            *slot = Some(Box::pin(self.begin()).await?);
        }
        MutexGuard::try_map(slot, Option::as_mut)
            .map_err(|_| ApiError::internal("request transaction vanished"))
    }

    async fn begin(&self) -> ApiResult<DatabaseTransaction> {
        let txn = if self.repeatable_read {
            self.pool
                .begin_with_config(
                    Some(IsolationLevel::RepeatableRead),
                    Some(AccessMode::ReadOnly),
                )
                .await
        } else {
            self.pool.begin().await
        }
        .map_err(|error| ApiError::from_db(error, ""))?;
        // One round trip: role, claims, statement timeout, access mode.
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('role', $1, true), set_config('request.jwt.claims', $2, true), \
             set_config('statement_timeout', $3, true), set_config('transaction_read_only', $4, true)",
            [
                self.role.into(),
                self.claims.to_string().into(),
                self.statement_timeout.as_millis().to_string().into(),
                if self.read_only { "on" } else { "off" }.into(),
            ],
        );
        txn.execute_raw(statement)
            .await
            .map_err(|error| ApiError::from_db(error, ""))?;
        Ok(txn)
    }

    /// Ends the transaction, if one was begun: commits a read-write one;
    /// drops a read-only one, which rolls it back (there is nothing to keep).
    pub async fn commit(self) -> ApiResult<()> {
        match self.txn.into_inner() {
            // A read-only transaction has nothing to commit: dropping it
            // queues a ROLLBACK that goes out with the pool's release ping,
            // saving the request a round trip.
            Some(txn) if self.read_only => {
                drop(txn);
                Ok(())
            }
            Some(txn) => txn
                .commit()
                .await
                .map_err(|error| ApiError::from_db(error, "")),
            None => Ok(()),
        }
    }
}
