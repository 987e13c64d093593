//! `vantage-sync migrate`: applies, reverts, reports and prints the schema.

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use migration::{Migrator, MigratorTrait};
use sea_orm::sqlx::{self, Row};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr};

use crate::db;

/// Key of the session advisory lock held while migrating, so that several
/// server replicas starting at once apply each migration exactly once.
const MIGRATION_LOCK_KEY: i64 = 0x5653_594e_435f_4d47; // "VSYNC_MG"

/// What `vantage-sync migrate` should do.
#[derive(Debug, Clone, Subcommand)]
pub enum MigrateCommand {
    /// Apply every pending migration.
    Up,
    /// Revert the most recent migrations (their down SQL).
    Down {
        /// How many migrations to revert.
        #[arg(short = 'n', long, default_value_t = 1)]
        steps: u32,
    },
    /// List the migrations and whether each is applied.
    Status,
    /// Revert every applied migration, then apply them all again. Unlike
    /// sea-orm's `fresh`, it touches nothing the migrations did not create.
    Fresh,
    /// Print the plain SQL of every migration, wrapped in one transaction,
    /// for use without this tool (e.g. in `supabase/migrations`).
    Sql {
        /// Print the down (revert) SQL instead of the up SQL.
        #[arg(long)]
        down: bool,
    },
}

/// How long one statement of a migration may wait for a lock by default
/// (`migrate --lock-timeout-secs`).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a migrate command failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The command needs a database and none was configured.
    #[error("no database configured: set DATABASE_URL or pass --database-url")]
    NoDatabase,
    /// A statement waited longer than the lock timeout: another
    /// transaction holds what the migration needs.
    #[error(
        "a migration waited more than {} s for a lock (lock_timeout) and was rolled back; {blockers}; end or wait out that transaction and run it again (--lock-timeout-secs waits longer)",
        timeout.as_secs_f64()
    )]
    LockTimeout {
        /// The timeout in force.
        timeout: Duration,
        /// Who held locks on the service's tables, said for the operator.
        blockers: String,
    },
    /// The database refused or failed.
    #[error("database error: {0}")]
    Database(#[from] DbErr),
    /// Writing the report failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `command`, writing its report to `out`; each statement waits at
/// most `lock_timeout` for a lock, so a migration stuck behind a long
/// transaction fails (naming it) instead of queueing every request that
/// needs the same table behind its own lock request.
pub async fn run(
    command: &MigrateCommand,
    database_url: Option<&str>,
    lock_timeout: Duration,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    if let MigrateCommand::Sql { down } = command {
        let sql = if *down {
            migration::down_sql()
        } else {
            migration::up_sql()
        };
        out.write_all(sql.as_bytes())?;
        return Ok(());
    }
    let database_url = database_url.ok_or(MigrateError::NoDatabase)?;
    // One connection: the advisory lock belongs to the session that took it.
    let db = db::connect_session(database_url).await?;
    let result = run_locked(&db, command, lock_timeout, out).await;
    let result = match result {
        Err(MigrateError::Database(error)) if is_lock_timeout(&error) => {
            Err(MigrateError::LockTimeout {
                timeout: lock_timeout,
                blockers: blockers(&db).await,
            })
        }
        other => other,
    };
    db.close().await?;
    result
}

fn is_lock_timeout(error: &DbErr) -> bool {
    crate::error::sqlstate(error).is_some_and(|(code, _)| code == "55P03")
        || error.to_string().contains("lock timeout")
}

/// The other sessions holding locks on the service's tables, longest open
/// first: what a migration that timed out was waiting behind.
async fn blockers(db: &DatabaseConnection) -> String {
    let rows = db
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT a.pid, coalesce(a.usename, '') AS usename, \
                    coalesce(a.application_name, '') AS application_name, \
                    coalesce(a.state, '') AS state, \
                    coalesce(extract(epoch FROM now() - a.xact_start), 0)::bigint AS open_secs, \
                    left(coalesce(a.query, ''), 80) AS query \
             FROM pg_catalog.pg_stat_activity a \
             WHERE a.pid <> pg_backend_pid() AND a.pid IN ( \
                 SELECT l.pid FROM pg_catalog.pg_locks l \
                 JOIN pg_catalog.pg_class c ON c.oid = l.relation \
                 WHERE l.granted AND c.relname LIKE 'vantage\\_sync%') \
             ORDER BY a.xact_start LIMIT 5",
        ))
        .await;
    let described: Vec<String> = rows
        .unwrap_or_default()
        .iter()
        .filter_map(|row| {
            let pid: i32 = row.try_get("", "pid").ok()?;
            let user: String = row.try_get("", "usename").ok()?;
            let application: String = row.try_get("", "application_name").ok()?;
            let state: String = row.try_get("", "state").ok()?;
            let open: i64 = row.try_get("", "open_secs").ok()?;
            let query: String = row.try_get("", "query").ok()?;
            Some(format!(
                "pid {pid} (user {user}, application {application:?}, {state}, transaction open {open} s, last statement {query:?})"
            ))
        })
        .collect();
    if described.is_empty() {
        "no session holds a lock on the service's tables now (the blocker has ended)".into()
    } else {
        format!(
            "held by {} (pg_terminate_backend(pid) ends one)",
            described.join("; ")
        )
    }
}

/// Applies every pending migration while holding the migration lock; what
/// `serve` does at start.
pub async fn apply_pending(database_url: &str) -> Result<(), MigrateError> {
    run(
        &MigrateCommand::Up,
        Some(database_url),
        DEFAULT_LOCK_TIMEOUT,
        &mut std::io::sink(),
    )
    .await
}

async fn run_locked(
    db: &DatabaseConnection,
    command: &MigrateCommand,
    lock_timeout: Duration,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    db.execute_unprepared(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await?;
    // For the session, so every migration's statements wait at most this.
    db.execute_unprepared(&format!(
        "SET lock_timeout = {}",
        lock_timeout.as_millis().max(1)
    ))
    .await?;
    let result = run_command(db, command, out).await;
    let unlock = db
        .execute_unprepared(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
        .await;
    result?;
    unlock?;
    Ok(())
}

async fn run_command(
    db: &DatabaseConnection,
    command: &MigrateCommand,
    out: &mut impl Write,
) -> Result<(), MigrateError> {
    let before = applied(db).await?;
    match command {
        MigrateCommand::Up => Migrator::up(db, None).await?,
        MigrateCommand::Down { steps } => Migrator::down(db, Some(*steps)).await?,
        MigrateCommand::Fresh => Migrator::refresh(db).await?,
        MigrateCommand::Status => {
            for migration in Migrator::get_migration_with_status_read_only(db).await? {
                writeln!(out, "{}\t{}", migration.status(), migration.name())?;
            }
            return Ok(());
        }
        // Printed by `run` before any connection is made.
        MigrateCommand::Sql { .. } => return Ok(()),
    }
    let after = applied(db).await?;
    let (reverted, newly_applied): (Vec<&String>, Vec<&String>) = match command {
        MigrateCommand::Fresh => (before.iter().rev().collect(), after.iter().collect()),
        _ => (
            before
                .iter()
                .rev()
                .filter(|name| !after.contains(name))
                .collect(),
            after.iter().filter(|name| !before.contains(name)).collect(),
        ),
    };
    for name in &reverted {
        writeln!(out, "reverted\t{name}")?;
    }
    for name in &newly_applied {
        writeln!(out, "applied\t{name}")?;
    }
    if reverted.is_empty() && newly_applied.is_empty() {
        writeln!(out, "nothing to do")?;
    }
    Ok(())
}

/// Which migrations a database has, against the ones this binary knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationState {
    /// Applied and known, oldest first.
    pub applied: Vec<String>,
    /// Known and not applied yet.
    pub pending: Vec<String>,
    /// Recorded as applied in `seaql_migrations` but unknown to this
    /// binary (a newer release migrated it); `None` when that table cannot
    /// be read (absent where the printed SQL was applied by another tool,
    /// or not readable by a least-privilege login role).
    pub unknown: Option<Vec<String>>,
}

/// The migrations the database of `pool` has applied, read without taking
/// the migration lock or writing anything: a migration is applied when its
/// marker relation exists ([`migration::SqlScript::marker`]), which any
/// role can see. Simple-protocol statements only, so this works through a
/// transaction-mode pooler too.
pub async fn state(pool: &sqlx::PgPool) -> Result<MigrationState, sqlx::Error> {
    let mut applied = Vec::new();
    let mut pending = Vec::new();
    for script in migration::SCRIPTS {
        // The marker is a constant of this binary, never input.
        let sql = format!("SELECT to_regclass('{}') IS NOT NULL", script.marker);
        let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .fetch_one(pool)
            .await?;
        // Simple-protocol results are text: PostgreSQL's `t` or `f`.
        if row.try_get::<bool, _>(0)? {
            applied.push(script.name.to_owned());
        } else {
            pending.push(script.name.to_owned());
        }
    }
    let recorded = sqlx::raw_sql("SELECT version FROM seaql_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .ok();
    let unknown = recorded.map(|rows| {
        rows.iter()
            .filter_map(|row| row.try_get::<String, _>(0).ok())
            .filter(|name| !migration::SCRIPTS.iter().any(|script| script.name == name))
            .collect()
    });
    Ok(MigrationState {
        applied,
        pending,
        unknown,
    })
}

async fn applied(db: &DatabaseConnection) -> Result<Vec<String>, DbErr> {
    Ok(Migrator::get_applied_migrations_read_only(db)
        .await?
        .iter()
        .map(|migration| migration.name().to_owned())
        .collect())
}
