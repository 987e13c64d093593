//! The connection pool, how it talks to PostgreSQL through a pooler, and
//! the start-up checks of what the login role may do.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::{self, AssertSqlSafe, Connection, PgPool, Row};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, RuntimeErr};

use super::Role;
use super::replica::ReadReplica;

/// Whether statements are prepared by name and kept per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreparedStatements {
    /// Find out at start: off when `DATABASE_URL` hands one client
    /// connection's transactions to several server connections (a
    /// transaction-mode pooler), on otherwise.
    Auto,
    /// Named statements, parsed once per connection.
    True,
    /// Unnamed statements, parsed on every use: what a transaction-mode
    /// pooler (PgBouncer `pool_mode = transaction`, Supabase's port 6543)
    /// needs, since each transaction may land on another server connection.
    False,
}

/// The service's connections to PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Pool {
    connection: DatabaseConnection,
    prepared: bool,
    pooled: bool,
    replica: Option<Arc<ReadReplica>>,
}

impl Pool {
    /// The sea-orm handle (for migrations and sea-orm's own helpers).
    pub fn connection(&self) -> &DatabaseConnection {
        &self.connection
    }

    /// The sqlx pool the request transactions are taken from.
    pub fn sqlx(&self) -> &PgPool {
        self.connection.get_postgres_connection_pool()
    }

    /// Whether statements are prepared by name (see [`PreparedStatements`]).
    pub fn prepared_statements(&self) -> bool {
        self.prepared
    }

    /// Whether start-up found a transaction-mode pooler in front of the
    /// database.
    pub fn behind_transaction_pooler(&self) -> bool {
        self.pooled
    }

    /// One round trip to the database.
    pub async fn ping(&self) -> Result<(), DbErr> {
        self.connection.ping().await
    }

    /// Closes every connection (the read replica's too).
    pub async fn close(&self) {
        if let Some(replica) = &self.replica {
            replica.pool().close_own().await;
        }
        self.close_own().await;
    }

    async fn close_own(&self) {
        let _ = self.connection.close_by_ref().await;
    }

    /// This pool, whose queries ([`super::Access::Query`]) read from
    /// `replica` while it is usable.
    pub fn with_replica(mut self, replica: Arc<ReadReplica>) -> Self {
        self.replica = Some(replica);
        self
    }

    /// The read replica, if one is configured.
    pub fn replica(&self) -> Option<&Arc<ReadReplica>> {
        self.replica.as_ref()
    }
}

/// Opens a pool of at most `max_connections` connections to `database_url`
/// with prepared statements on (a direct connection) and the default
/// acquire timeout.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<Pool, DbErr> {
    connect_with(
        database_url,
        max_connections,
        DEFAULT_ACQUIRE_TIMEOUT,
        PreparedStatements::True,
    )
    .await
}

/// How long a request waits for a connection by default: with the
/// database down, requests fail (503) after this, rather than queue.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a pool of at most `max_connections` connections to `database_url`;
/// with [`PreparedStatements::Auto`] it first finds out whether a
/// transaction-mode pooler sits in between.
pub async fn connect_with(
    database_url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
    prepared: PreparedStatements,
) -> Result<Pool, DbErr> {
    let mut options = ConnectOptions::new(database_url);
    options
        .max_connections(max_connections)
        .min_connections(0)
        // Short waits: with the database down, a request should fail fast
        // (and /readyz say so) rather than queue.
        .connect_timeout(acquire_timeout)
        .acquire_timeout(acquire_timeout)
        // sqlx pings every connection on release already; pinging again on
        // every acquire costs each request a round trip. Only a connection
        // idle long enough to have been dropped is checked first.
        .test_before_acquire_if_idle_for(Duration::from_secs(1))
        // PgBouncer refuses start-up parameters it does not know unless
        // told to ignore them; values are read in binary, so this one is
        // of no use here anyway.
        .map_sqlx_postgres_opts(|options| options.extra_float_digits(None))
        .sqlx_logging(false);
    let connection = Database::connect(options).await?;
    let pooled = match prepared {
        PreparedStatements::Auto => {
            let options = connection.get_postgres_connection_pool().connect_options();
            transaction_pooler_in_between(&options)
                .await
                .map_err(conn_error)?
        }
        PreparedStatements::True | PreparedStatements::False => false,
    };
    let prepared = match prepared {
        PreparedStatements::Auto => !pooled,
        PreparedStatements::True => true,
        PreparedStatements::False => false,
    };
    Ok(Pool {
        connection,
        prepared,
        pooled,
        replica: None,
    })
}

/// A pool of at most `max_connections` connections to a read replica at
/// `database_url`, connecting on first use: a standby that is down when
/// the server starts does not stop it (queries read the primary until it
/// answers). Statements are prepared by name as `prepared` says (what was
/// found for the primary).
pub async fn connect_lazy(
    database_url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
    prepared: bool,
) -> Result<Pool, DbErr> {
    let mut options = ConnectOptions::new(database_url);
    options
        .max_connections(max_connections)
        .min_connections(0)
        .connect_timeout(acquire_timeout)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire_if_idle_for(Duration::from_secs(1))
        .map_sqlx_postgres_opts(|options| options.extra_float_digits(None))
        .connect_lazy(true)
        .sqlx_logging(false);
    Ok(Pool {
        connection: Database::connect(options).await?,
        prepared,
        pooled: false,
        replica: None,
    })
}

/// One session to `database_url` (migrations, administration): a pool of
/// one connection, so that session-level state such as an advisory lock
/// holds for everything done through it.
pub async fn connect_session(database_url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(database_url);
    options
        .max_connections(1)
        .min_connections(0)
        .connect_timeout(Duration::from_secs(3))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    Database::connect(options).await
}

fn conn_error(error: sqlx::Error) -> DbErr {
    DbErr::Conn(RuntimeErr::SqlxError(Arc::new(error)))
}

/// Whether the server connections behind this pool's client connections
/// are shared between them, one transaction at a time.
///
/// Two client connections held at once have two server sessions of their
/// own on a direct or session-mode connection, so seeing one server
/// process serve both (or one client change server process between two
/// statements) proves a transaction-mode pooler. The converse is not
/// proof, but PgBouncer hands out the server connection used last, so it
/// shows itself here.
async fn transaction_pooler_in_between(options: &PgConnectOptions) -> Result<bool, sqlx::Error> {
    async fn backend(connection: &mut sqlx::PgConnection) -> Result<i32, sqlx::Error> {
        // Simple protocol: nothing is prepared before we know.
        let row = sqlx::raw_sql("SELECT pg_backend_pid()")
            .fetch_one(&mut *connection)
            .await?;
        row.try_get(0)
    }
    // Connections of their own, not a pool's: a pool of one could not
    // lend two.
    let mut first = sqlx::PgConnection::connect_with(options).await?;
    let before = backend(&mut first).await?;
    let mut second = sqlx::PgConnection::connect_with(options).await?;
    let other = backend(&mut second).await?;
    let after = backend(&mut first).await?;
    let _ = second.close().await;
    let _ = first.close().await;
    Ok(before == other || before != after)
}

/// Whether `database_url` goes through a transaction-mode pooler (see
/// [`connect_with`]), e.g. to know whether LISTEN can work there.
pub async fn is_transaction_pooler(database_url: &str) -> Result<bool, DbErr> {
    let options: PgConnectOptions = database_url.parse().map_err(conn_error)?;
    transaction_pooler_in_between(&options.extra_float_digits(None))
        .await
        .map_err(conn_error)
}

/// What stops the server from running as the login role it was given.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// The login role may not become one of the API roles.
    #[error(
        "the login role {login} cannot become {role}: run `GRANT {role} TO {login};` as the database owner (serve needs membership in anon, authenticated and service_role, and nothing else)"
    )]
    MissingGrant {
        /// The login role, quoted as an identifier.
        login: String,
        /// The API role it cannot become.
        role: &'static str,
    },
    /// An API role does not exist: the schema was never migrated.
    #[error(
        "the role {role} does not exist: apply the migrations first (`vantage-sync migrate up` as the owner)"
    )]
    MissingRole {
        /// The missing role.
        role: &'static str,
    },
    /// A table of the schema is missing.
    #[error(
        "the table public.{table} does not exist: apply the migrations first (`vantage-sync migrate up` as the owner, or start without --no-migrate)"
    )]
    MissingTable {
        /// The missing table.
        table: &'static str,
    },
    /// The checks could not run.
    #[error("cannot check the login role's privileges: {0}")]
    Database(#[from] sqlx::Error),
}

/// Checks that the schema is there and that the login role can become
/// each API role, the only privileges the server needs of its own.
pub async fn check_privileges(pool: &Pool) -> Result<(), PrivilegeError> {
    let mut connection = pool.sqlx().acquire().await?;
    let row = sqlx::raw_sql(
        "SELECT quote_ident(current_user), \
                to_regclass('public.vantage_sync_state') IS NOT NULL, \
                to_regclass('public.vantage_sync_events') IS NOT NULL",
    )
    .fetch_one(&mut *connection)
    .await?;
    let login: String = row.try_get(0)?;
    for (index, table) in [(1, "vantage_sync_state"), (2, "vantage_sync_events")] {
        // Simple-protocol results are text: PostgreSQL's `t` or `f`.
        if row.try_get::<bool, _>(index)? {
            continue;
        }
        return Err(PrivilegeError::MissingTable { table });
    }
    for role in [Role::Anon, Role::Authenticated, Role::ServiceRole] {
        // Trying is the only check that holds on every version (PostgreSQL
        // 16 can grant membership without the right to SET ROLE).
        let mut txn = connection.begin().await?;
        let attempt = sqlx::raw_sql(AssertSqlSafe(format!("SET LOCAL ROLE \"{role}\"")))
            .execute(&mut *txn)
            .await;
        drop(txn);
        match attempt {
            Ok(_) => {}
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42501") => {
                return Err(PrivilegeError::MissingGrant {
                    login,
                    role: role.as_str(),
                });
            }
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("22023") => {
                return Err(PrivilegeError::MissingRole {
                    role: role.as_str(),
                });
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Twice the CPU cores, at least 4: PostgreSQL's rule of thumb for a pool
/// (about two connections per core keep the database busy; more only
/// queue inside it; `docs/adr/0001`).
pub fn default_max_connections() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    u32::try_from(cores.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .clamp(4, 1000)
}
