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
}

/// Every migration, oldest first.
pub const SCRIPTS: &[SqlScript] = &[
    SqlScript {
        name: "m20251105_132840_vantage_sync_state",
        up: include_str!("m20251105_132840_vantage_sync_state/up.sql"),
        down: include_str!("m20251105_132840_vantage_sync_state/down.sql"),
        marker: "public.vantage_sync_state",
    },
    SqlScript {
        name: "m20251106_000000_vantage_sync_events",
        up: include_str!("m20251106_000000_vantage_sync_events/up.sql"),
        down: include_str!("m20251106_000000_vantage_sync_events/down.sql"),
        marker: "public.vantage_sync_events",
    },
    SqlScript {
        name: "m20261202_000000_vantage_sync_event_indexes",
        up: include_str!("m20261202_000000_vantage_sync_event_indexes/up.sql"),
        down: include_str!("m20261202_000000_vantage_sync_event_indexes/down.sql"),
        marker: "public.idx_vantage_sync_events_run_ends",
    },
    SqlScript {
        name: "m20261203_000000_vantage_sync_alerts",
        up: include_str!("m20261203_000000_vantage_sync_alerts/up.sql"),
        down: include_str!("m20261203_000000_vantage_sync_alerts/down.sql"),
        marker: "public.vantage_sync_alerts",
    },
];

/// The whole up migration as one plain SQL script in a single transaction.
pub fn up_sql() -> String {
    transaction_script(SCRIPTS.iter().map(|script| (script.name, script.up)))
}

/// The whole down migration (newest first) as one plain SQL script in a
/// single transaction.
pub fn down_sql() -> String {
    transaction_script(
        SCRIPTS
            .iter()
            .rev()
            .map(|script| (script.name, script.down)),
    )
}

fn transaction_script<'a>(parts: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut sql = String::from("BEGIN;\n");
    for (name, body) in parts {
        sql.push_str("\n-- migration: ");
        sql.push_str(name);
        sql.push_str("\n\n");
        sql.push_str(body.trim_end());
        sql.push('\n');
    }
    sql.push_str("\nCOMMIT;\n");
    sql
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
        Some(true)
    }

    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.0.up)
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(self.0.down)
            .await?;
        Ok(())
    }
}
