//! The `vantage-sync` command line.

use clap::{Parser, Subcommand};

use crate::migrate::{self, MigrateCommand, MigrateError};

/// The Vantage sync state service.
#[derive(Debug, Parser)]
#[command(name = "vantage-sync", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `vantage-sync`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the database schema.
    Migrate {
        /// PostgreSQL connection URL (not needed by `migrate sql`).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
        database_url: Option<String>,
        /// The migration step.
        #[command(subcommand)]
        command: MigrateCommand,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `migrate` failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

impl Cli {
    /// Runs the parsed command, writing its report to standard output.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Migrate {
                database_url,
                command,
            } => {
                let mut stdout = std::io::stdout().lock();
                migrate::run(&command, database_url.as_deref(), &mut stdout).await?;
            }
        }
        Ok(())
    }
}
