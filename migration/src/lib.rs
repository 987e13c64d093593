//! Database schema of the Vantage sync state service.
//!
//! Every migration is a pair of raw SQL files beside this crate's source
//! (`<name>/up.sql`, `<name>/down.sql`). The same text is applied by the
//! [`Migrator`] and printed by `vantage-sync migrate sql`, so a Supabase user
//! can drop the printed SQL into `supabase/migrations` and get exactly what
//! the service would have created.

use sea_orm_migration::prelude::*;

pub use sea_orm_migration::MigratorTrait;

/// One schema migration, written as plain SQL.
#[derive(Debug)]
pub struct SqlScript {
    /// The migration's name as recorded in `seaql_migrations`.
    pub name: &'static str,
    /// SQL that applies it. Idempotent, and free of BEGIN/COMMIT: the
    /// caller supplies the transaction.
    pub up: &'static str,
    /// SQL that reverts it completely, in dependency order.
    pub down: &'static str,
    /// A relation this migration creates and no later one removes: its
    /// presence in the catalogs, which every role may read, shows the
    /// migration applied, whether by `migrate up` or as printed SQL through
    /// another tool (which records nothing in `seaql_migrations`).
    pub marker: &'static str,
    /// Whether it runs in one transaction. A migration that builds an
    /// index on a table in use does it with `CREATE INDEX CONCURRENTLY`,
    /// which cannot run in a transaction: such a script is `false`, holds
    /// only plain statements each ended by `;` (no function bodies), and
    /// is written to be run again after a failure (`IF NOT EXISTS`, and
    /// `DROP INDEX CONCURRENTLY IF EXISTS` of what a failed build left).
    pub transactional: bool,
}

/// Every migration, oldest first.
pub const SCRIPTS: &[SqlScript] = &[
    SqlScript {
        name: "m20251105_132840_vantage_sync_state",
        up: include_str!("m20251105_132840_vantage_sync_state/up.sql"),
        down: include_str!("m20251105_132840_vantage_sync_state/down.sql"),
        marker: "public.vantage_sync_state",
        transactional: true,
    },
    SqlScript {
        name: "m20251106_000000_vantage_sync_events",
        up: include_str!("m20251106_000000_vantage_sync_events/up.sql"),
        down: include_str!("m20251106_000000_vantage_sync_events/down.sql"),
        marker: "public.vantage_sync_events",
        transactional: true,
    },
    SqlScript {
        name: "m20261202_000000_vantage_sync_event_indexes",
        up: include_str!("m20261202_000000_vantage_sync_event_indexes/up.sql"),
        down: include_str!("m20261202_000000_vantage_sync_event_indexes/down.sql"),
        marker: "public.idx_vantage_sync_events_run_ends",
        transactional: true,
    },
    SqlScript {
        name: "m20261203_000000_vantage_sync_alerts",
        up: include_str!("m20261203_000000_vantage_sync_alerts/up.sql"),
        down: include_str!("m20261203_000000_vantage_sync_alerts/down.sql"),
        marker: "public.vantage_sync_alerts",
        transactional: true,
    },
    SqlScript {
        name: "m20261204_000000_vantage_sync_idempotency",
        up: include_str!("m20261204_000000_vantage_sync_idempotency/up.sql"),
        down: include_str!("m20261204_000000_vantage_sync_idempotency/down.sql"),
        marker: "public.vantage_sync_idempotency_keys",
        transactional: true,
    },
    SqlScript {
        name: "m20261204_120000_vantage_sync_event_traces",
        up: include_str!("m20261204_120000_vantage_sync_event_traces/up.sql"),
        down: include_str!("m20261204_120000_vantage_sync_event_traces/down.sql"),
        marker: "public.vantage_sync_event_traces",
        transactional: true,
    },
];

/// The whole up migration as one plain SQL script: the transactional
/// migrations in transactions, the others' statements between them.
pub fn up_sql() -> String {
    printed(SCRIPTS.iter().map(|script| (script, script.up)))
}

/// The whole down migration (newest first) as one plain SQL script.
pub fn down_sql() -> String {
    printed(SCRIPTS.iter().rev().map(|script| (script, script.down)))
}

/// `parts` as one script: consecutive transactional migrations share one
/// `BEGIN; ... COMMIT;`, and a non-transactional one stands outside.
fn printed<'a>(parts: impl Iterator<Item = (&'a SqlScript, &'a str)>) -> String {
    let mut sql = String::new();
    let mut in_transaction = false;
    for (script, body) in parts {
        if script.transactional && !in_transaction {
            sql.push_str("BEGIN;\n");
            in_transaction = true;
        } else if !script.transactional && in_transaction {
            sql.push_str("\nCOMMIT;\n");
            in_transaction = false;
        }
        sql.push_str("\n-- migration: ");
        sql.push_str(script.name);
        if !script.transactional {
            sql.push_str(" (outside a transaction)");
        }
        sql.push_str("\n\n");
        sql.push_str(body.trim_end());
        sql.push('\n');
    }
    if in_transaction {
        sql.push_str("\nCOMMIT;\n");
    }
    sql
}

/// The statements of a non-transactional script, each to be sent alone
/// (several statements in one message would share an implicit
/// transaction, where `CREATE INDEX CONCURRENTLY` is refused).
pub fn statements(body: &str) -> Vec<String> {
    let without_comments: String = body
        .lines()
        .map(|line| line.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Runs `body` of `script` on `connection`: whole, or (outside a
/// transaction) one statement at a time.
pub async fn execute(
    connection: &impl ConnectionTrait,
    script: &SqlScript,
    body: &str,
) -> Result<(), DbErr> {
    if script.transactional {
        connection.execute_unprepared(body).await?;
    } else {
        for statement in statements(body) {
            connection.execute_unprepared(&statement).await?;
        }
    }
    Ok(())
}

/// Applies and reverts the service's schema; see [`SCRIPTS`].
#[derive(Debug)]
pub struct Migrator;

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        SCRIPTS
            .iter()
            .map(|script| Box::new(SqlMigration(script)) as Box<dyn MigrationTrait>)
            .collect()
    }
}

struct SqlMigration(&'static SqlScript);

impl MigrationName for SqlMigration {
    fn name(&self) -> &str {
        self.0.name
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SqlMigration {
    fn use_transaction(&self) -> Option<bool> {
        Some(self.0.transactional)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        execute(manager.get_connection(), self.0, self.0.up).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        execute(manager.get_connection(), self.0, self.0.down).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONCURRENT: SqlScript = SqlScript {
        name: "m29990101_000000_concurrent",
        up: "-- two indexes; one statement each\nCREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x);\nCREATE INDEX CONCURRENTLY IF NOT EXISTS b ON t (y);\n",
        down: "DROP INDEX CONCURRENTLY IF EXISTS b;\nDROP INDEX CONCURRENTLY IF EXISTS a;\n",
        marker: "public.a",
        transactional: false,
    };

    #[test]
    fn statements_are_split_one_each_without_comments() {
        assert_eq!(
            statements(CONCURRENT.up),
            [
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x)",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS b ON t (y)"
            ]
        );
    }

    #[test]
    fn a_non_transactional_migration_is_printed_outside_the_transactions() {
        let first = &SCRIPTS[0];
        let last = &SCRIPTS[SCRIPTS.len() - 1];
        let sql = printed(
            [
                (first, "SELECT 1;"),
                (&CONCURRENT, CONCURRENT.up),
                (last, "SELECT 2;"),
            ]
            .into_iter(),
        );
        let outline: Vec<&str> = sql
            .lines()
            .filter(|line| {
                matches!(*line, "BEGIN;" | "COMMIT;" | "SELECT 1;" | "SELECT 2;")
                    || line.starts_with("CREATE")
            })
            .collect();
        assert_eq!(
            outline,
            [
                "BEGIN;",
                "SELECT 1;",
                "COMMIT;",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x);",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS b ON t (y);",
                "BEGIN;",
                "SELECT 2;",
                "COMMIT;"
            ]
        );
        // Every migration today runs in a transaction: one for all.
        assert!(up_sql().starts_with("BEGIN;\n"));
        assert_eq!(up_sql().matches("BEGIN;").count(), 1);
        assert!(SCRIPTS.iter().all(|script| script.transactional));
    }
}
