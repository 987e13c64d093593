//! Connections to the service's PostgreSQL database, and the per-request
//! transaction that runs as the caller's role.

pub mod alerts;
pub mod events;
pub mod idempotency;
pub mod migrate;
mod pool;
pub mod replica;
mod spans;
pub mod sync_states;
pub mod webhooks;

pub use pool::{
    DEFAULT_ACQUIRE_TIMEOUT, Pool, PreparedStatements, PrivilegeError, check_privileges, connect,
    connect_lazy, connect_session, connect_with, default_max_connections, is_transaction_pooler,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sea_orm::sea_query::Values;
use sea_orm::sqlx::{self, AssertSqlSafe, Postgres, Transaction};
use sea_orm::{
    ConnAcquireErr, ConnectionTrait, DbBackend, DbErr, ExecResult, QueryResult, RuntimeErr,
    Statement,
};
use sea_query_sqlx::SqlxValues;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tracing::Instrument as _;

use crate::error::{ApiError, ApiResult};
use crate::metrics::ReadTarget;

/// The PostgreSQL role a transaction runs as: one of the three API roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// No token: may introspect, nothing else.
    Anon,
    /// A signed-in user: may read.
    Authenticated,
    /// An ETL worker: may read and write.
    ServiceRole,
}

impl Role {
    /// The PostgreSQL role name (and the token's `role` claim).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Authenticated => "authenticated",
            Self::ServiceRole => "service_role",
        }
    }

    /// Parses a role name; only the three roles of the contract exist.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "anon" => Some(Self::Anon),
            "authenticated" => Some(Self::Authenticated),
            "service_role" => Some(Self::ServiceRole),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whom a transaction runs as: an API role, and the claims it reads as
/// `request.jwt.claims` (PostgREST's convention), as JSON text.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The role.
    pub role: Role,
    /// The verified token's claims as JSON text, shared rather than copied
    /// by every transaction and subscription of a caller.
    pub claims: Arc<str>,
}

impl Identity {
    /// The server itself acting as `role` (the feed reading the log, the
    /// webhook worker): claims that name only the role.
    pub fn of_role(role: Role) -> Self {
        Self {
            role,
            claims: serde_json::json!({ "role": role.as_str() })
                .to_string()
                .into(),
        }
    }
}

/// How a transaction is begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// READ ONLY, read committed: reads that must match the event log as
    /// the primary has it (the live feed, subscriptions). Dropped, not
    /// committed.
    Read,
    /// READ ONLY, read committed, from the read replica when one is usable:
    /// GraphQL queries. Dropped, not committed.
    Query,
    /// READ ONLY, REPEATABLE READ: reads that must see one snapshot.
    Snapshot,
    /// READ WRITE: mutations and pruning. Committed.
    Write,
}

impl Access {
    fn read_only(self) -> bool {
        self != Self::Write
    }

    /// How a trace names it.
    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Query => "query",
            Self::Snapshot => "snapshot",
            Self::Write => "write",
        }
    }
}

/// Time spent in database calls, added up across a request's
/// transactions (for `Server-Timing`). Shared with each transaction.
#[derive(Debug, Default)]
struct DbClock(AtomicU64);

impl DbClock {
    /// Runs `call`, adding how long it took.
    async fn timed<T>(&self, call: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = call.await;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::Relaxed);
        result
    }

    fn spent(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

impl Pool {
    /// Runs `work` in one transaction as `identity`, then ends it: the one
    /// begin-use-end of every piece of database work outside a GraphQL
    /// request (whose resolvers share a [`RequestDb`] instead). A failure
    /// rolls back.
    pub async fn run<T>(
        &self,
        identity: &Identity,
        access: Access,
        statement_timeout: Duration,
        work: impl AsyncFnOnce(&RequestTxn) -> Result<T, DbErr>,
    ) -> ApiResult<T> {
        let db = RequestDb::new(self.clone(), identity.clone(), access, statement_timeout);
        let result = {
            let txn = db.txn().await?;
            work(&txn)
                .await
                .map_err(|error| ApiError::from_db(error, ""))?
        };
        db.commit().await?;
        Ok(result)
    }
}

/// The database work of one request: a single transaction, begun on first
/// use, that first becomes the caller's role (PostgREST's model) so that
/// PostgreSQL's grants and RLS refuse whatever a guard might miss.
pub struct RequestDb {
    pool: Pool,
    identity: Identity,
    access: Access,
    statement_timeout: Duration,
    txn: Mutex<Option<RequestTxn>>,
    clock: Arc<DbClock>,
}

impl RequestDb {
    /// Work for `identity`, begun as `access` says.
    pub fn new(
        pool: Pool,
        identity: Identity,
        access: Access,
        statement_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            identity,
            access,
            statement_timeout,
            txn: Mutex::new(None),
            clock: Arc::default(),
        }
    }

    /// Time spent so far in database calls (begins, statements, commits)
    /// of this request's transactions, waits for a connection included.
    pub fn time_spent(&self) -> Duration {
        self.clock.spent()
    }

    /// The request's transaction, begun (as the caller's role) if need be.
    /// Resolvers hold it only while they talk to the database.
    pub async fn txn(&self) -> ApiResult<MappedMutexGuard<'_, RequestTxn>> {
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

    async fn begin(&self) -> ApiResult<RequestTxn> {
        let span = spans::transaction(self.access.as_str());
        let traceparent = match self.access {
            Access::Write => spans::traceparent(&span),
            _ => None,
        };
        let statement = begin_statement(
            self.identity.role,
            &self.identity.claims,
            self.statement_timeout,
            self.access,
            traceparent.as_deref(),
        );
        let begun = Begun {
            span,
            clock: self.clock.clone(),
        };
        if self.access == Access::Query
            && let Some(replica) = self.pool.replica()
        {
            if replica.usable() {
                match begin_on(replica.pool(), &statement, begun.clone()).await {
                    Ok(txn) => {
                        replica.counted(ReadTarget::Replica);
                        return Ok(txn);
                    }
                    // The standby went away since its last check: out of
                    // use until a check finds it again; the primary answers.
                    Err(error) => {
                        tracing::warn!(%error, "read replica failed; reading from the primary");
                        replica.set_unusable();
                    }
                }
            }
            replica.counted(ReadTarget::Primary);
        }
        begin_on(&self.pool, &statement, begun)
            .await
            .map_err(|error| ApiError::from_db(error, ""))
    }

    /// Ends the transaction, if one was begun: commits a read-write one;
    /// drops a read-only one, which rolls it back (there is nothing to keep).
    /// Work after this begins a new transaction.
    pub async fn commit(&self) -> ApiResult<()> {
        let txn = self.txn.lock().await.take();
        match txn {
            // A read-only transaction has nothing to commit: dropping it
            // queues a ROLLBACK that goes out with the pool's release ping,
            // saving the request a round trip.
            Some(txn) if self.access.read_only() => {
                drop(txn);
                Ok(())
            }
            Some(txn) => {
                let span = spans::fixed_statement(&txn.span, "COMMIT");
                let clock = txn.clock.clone();
                clock
                    .timed(txn.txn.into_inner().commit().instrument(span))
                    .await
                    .map_err(|error| ApiError::from_db(query_error(error), ""))
            }
            None => Ok(()),
        }
    }
}

/// The statement that begins a request's transaction as `role` with the
/// token's `claims` (PostgREST's `request.jwt.claims`), in one round trip.
///
/// One simple-protocol message of utility statements: PostgreSQL parses
/// them but plans nothing, which costs the database less than BEGIN
/// followed by a prepared `set_config` call, besides saving the round trip
/// (`docs/adr/0001`). The role is one of the three API roles' fixed
/// names; the claims are JSON text from the verified token, written as an
/// escape string literal, so nothing in them can end it.
///
/// A traced write also sets `vantage_sync.traceparent` (built here from
/// hex ids, never input), which the database keeps with the changes the
/// transaction logs.
///
/// JIT compilation is off: PostgreSQL compiles a plan whose estimated cost
/// passes `jit_above_cost`, which a read over a long event log can, and the
/// compilation then takes far longer than the read: requests here are short
/// transactions that it never pays off for.
pub fn begin_statement(
    role: Role,
    claims: &str,
    statement_timeout: Duration,
    access: Access,
    traceparent: Option<&str>,
) -> String {
    let (isolation, access) = match access {
        Access::Read | Access::Query => ("", "READ ONLY"),
        Access::Snapshot => (" ISOLATION LEVEL REPEATABLE READ", "READ ONLY"),
        Access::Write => ("", "READ WRITE"),
    };
    let role = role.as_str();
    let claims = claims.replace('\\', "\\\\").replace('\'', "''");
    let trace = traceparent
        .map(|traceparent| format!("; SET LOCAL vantage_sync.traceparent TO '{traceparent}'"))
        .unwrap_or_default();
    format!(
        "BEGIN{isolation} {access}; SET LOCAL ROLE \"{role}\"; \
         SET LOCAL request.jwt.claims TO E'{claims}'; SET LOCAL statement_timeout TO {}; \
         SET LOCAL jit TO off{trace}",
        statement_timeout.as_millis()
    )
}

/// What a request transaction is traced and timed by.
#[derive(Clone)]
struct Begun {
    /// The transaction's span, ended when the transaction is.
    span: tracing::Span,
    clock: Arc<DbClock>,
}

/// A request transaction begun on `pool` with `statement`.
async fn begin_on(pool: &Pool, statement: &str, begun: Begun) -> Result<RequestTxn, DbErr> {
    // The statement holds the caller's claims: the span names it BEGIN.
    let span = spans::fixed_statement(&begun.span, "BEGIN");
    let txn = begun
        .clock
        .timed(
            pool.sqlx()
                .begin_with(AssertSqlSafe(statement.to_owned()))
                .instrument(span),
        )
        .await
        .map_err(|error| match error {
            sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
            sqlx::Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
            sqlx::Error::Database(_) => query_error(error),
            other => DbErr::Conn(RuntimeErr::SqlxError(Arc::new(other))),
        })?;
    Ok(RequestTxn {
        txn: Mutex::new(txn),
        prepared: pool.prepared_statements(),
        span: begun.span,
        clock: begun.clock,
    })
}

fn query_error(error: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(error)))
}

fn exec_error(error: sqlx::Error) -> DbErr {
    DbErr::Exec(RuntimeErr::SqlxError(Arc::new(error)))
}

/// A request's transaction on one connection of the pool. Statements built
/// by sea-orm run on it through sqlx, as named prepared statements cached
/// per connection, or unnamed ones behind a transaction-mode pooler;
/// dropping it without a commit rolls it back.
pub struct RequestTxn {
    txn: Mutex<Transaction<'static, Postgres>>,
    prepared: bool,
    /// The transaction's span: its statements' parent.
    span: tracing::Span,
    clock: Arc<DbClock>,
}

impl RequestTxn {
    /// Runs `work` in a savepoint: kept if it succeeds, rolled back if not,
    /// so a refused statement neither poisons nor undoes the rest of the
    /// transaction. A failure to end the savepoint wins over `work`'s own.
    pub async fn in_savepoint<T>(
        &self,
        work: impl AsyncFnOnce(&Self) -> Result<T, DbErr>,
    ) -> Result<T, DbErr> {
        self.execute_unprepared("SAVEPOINT request_step").await?;
        let result = work(self).await;
        let end = match result {
            Ok(_) => "RELEASE SAVEPOINT request_step",
            Err(_) => "ROLLBACK TO SAVEPOINT request_step",
        };
        self.execute_unprepared(end).await?;
        result
    }
}

impl RequestTxn {
    /// `statement` as a sqlx query. Unnamed statements live until the next
    /// one, inside this transaction, so they never meet another client's
    /// statements on a server connection a pooler shares.
    fn bind(&self, statement: Statement) -> sqlx::query::Query<'static, Postgres, SqlxValues> {
        let values = statement.values.unwrap_or(Values(Vec::new()));
        sqlx::query_with(AssertSqlSafe(statement.sql), SqlxValues(values)).persistent(self.prepared)
    }

    /// Runs `call`, a statement, in `span` and on the clock.
    async fn traced<T>(&self, span: tracing::Span, call: impl Future<Output = T>) -> T {
        self.clock.timed(call.instrument(span)).await
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for RequestTxn {
    fn get_database_backend(&self) -> DbBackend {
        DbBackend::Postgres
    }

    async fn execute_raw(&self, statement: Statement) -> Result<ExecResult, DbErr> {
        let mut txn = self.txn.lock().await;
        let span = spans::statement(&self.span, &statement.sql);
        self.traced(span, self.bind(statement).execute(&mut **txn))
            .await
            .map(Into::into)
            .map_err(exec_error)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        let mut txn = self.txn.lock().await;
        let span = spans::statement(&self.span, sql);
        self.traced(
            span,
            sqlx::raw_sql(AssertSqlSafe(sql.to_owned())).execute(&mut **txn),
        )
        .await
        .map(Into::into)
        .map_err(exec_error)
    }

    async fn query_one_raw(&self, statement: Statement) -> Result<Option<QueryResult>, DbErr> {
        let mut txn = self.txn.lock().await;
        let span = spans::statement(&self.span, &statement.sql);
        self.traced(span, self.bind(statement).fetch_optional(&mut **txn))
            .await
            .map(|row| row.map(Into::into))
            .map_err(query_error)
    }

    async fn query_all_raw(&self, statement: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let mut txn = self.txn.lock().await;
        let span = spans::statement(&self.span, &statement.sql);
        self.traced(span, self.bind(statement).fetch_all(&mut **txn))
            .await
            .map(|rows| rows.into_iter().map(Into::into).collect())
            .map_err(query_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_statement_sets_role_claims_timeout_and_jit_in_one_message() {
        assert_eq!(
            begin_statement(
                Role::Authenticated,
                r#"{"sub":"o'brien \ '"}"#,
                Duration::from_secs(30),
                Access::Read,
                None
            ),
            r#"BEGIN READ ONLY; SET LOCAL ROLE "authenticated"; SET LOCAL request.jwt.claims TO E'{"sub":"o''brien \\ ''"}'; SET LOCAL statement_timeout TO 30000; SET LOCAL jit TO off"#
        );
        assert!(
            begin_statement(
                Role::ServiceRole,
                "{}",
                Duration::from_secs(1),
                Access::Write,
                None
            )
            .starts_with("BEGIN READ WRITE; SET LOCAL ROLE \"service_role\";")
        );
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(
            begin_statement(
                Role::ServiceRole,
                "{}",
                Duration::from_secs(1),
                Access::Write,
                Some(traceparent)
            )
            .ends_with(&format!(
                "SET LOCAL jit TO off; SET LOCAL vantage_sync.traceparent TO '{traceparent}'"
            ))
        );
        assert!(
            begin_statement(
                Role::Anon,
                "{}",
                Duration::from_secs(1),
                Access::Snapshot,
                None
            )
            .starts_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;")
        );
    }
}
