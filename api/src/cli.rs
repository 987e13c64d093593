//! The `vantage-sync` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::auth::{Role, TokenKeys};
use crate::config::{ConfigError, ServeArgs, ServerConfig};
use crate::managed_postgres::{self, ManagedError, ManagedPostgres};
use crate::migrate::{self, MigrateCommand, MigrateError};
use crate::server::{ServeError, Server};

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
    /// Serve the GraphQL API (with no DATABASE_URL: on a managed local PostgreSQL).
    Serve(ServeArgs),
    /// Manage the database schema.
    Migrate {
        /// PostgreSQL connection URL (not needed by `migrate sql`).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
        database_url: Option<String>,
        /// The migration step.
        #[command(subcommand)]
        command: MigrateCommand,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Mint a bearer token.
    Token(TokenArgs),
}

/// Flags of `vantage-sync token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Role of the token: anon, authenticated or service_role.
    #[arg(long, value_parser = parse_role)]
    pub role: Role,
    /// How long the token is valid: seconds, or a number with s, m, h or d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Subject (`sub` claim), e.g. a user id.
    #[arg(long)]
    pub sub: Option<String>,
    /// Secret to sign with; without it, the one kept in --data-dir.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Data directory of the zero-configuration setup.
    #[arg(long, env = "VANTAGE_SYNC_DATA_DIR", default_value = ".vantage-sync")]
    pub data_dir: PathBuf,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `migrate` failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The managed database could not be used.
    #[error("managed database: {0}")]
    Managed(#[from] ManagedError),
    /// The server failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Minting a token failed.
    #[error("token: {0}")]
    Token(String),
    /// Writing output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

fn parse_role(name: &str) -> Result<Role, String> {
    Role::parse(name).ok_or_else(|| "use anon, authenticated or service_role".to_owned())
}

/// Parses `90`, `90s`, `15m`, `12h` or `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a duration like 90s, 15m, 12h or 7d"))?;
    let seconds = match unit {
        "s" => value,
        "m" => value.saturating_mul(60),
        "h" => value.saturating_mul(3600),
        "d" => value.saturating_mul(86_400),
        _ => return Err(format!("unknown unit \"{unit}\": use s, m, h or d")),
    };
    if seconds == 0 || seconds > 366 * 86_400 {
        return Err("the ttl must be between 1 second and 366 days".into());
    }
    Ok(Duration::from_secs(seconds))
}

impl Cli {
    /// Runs the parsed command.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Serve(args) => serve(args).await,
            Command::Migrate {
                database_url,
                command,
            } => {
                let mut stdout = std::io::stdout().lock();
                Ok(migrate::run(&command, database_url.as_deref(), &mut stdout).await?)
            }
            Command::Schema => {
                print!("{}", crate::graphql::sdl());
                Ok(())
            }
            Command::Token(args) => {
                let secret = match args.jwt_secret {
                    Some(secret) => secret,
                    None => managed_postgres::load_or_create_secret(&args.data_dir)?,
                };
                let keys = TokenKeys::new(secret.as_bytes()).map_err(ConfigError::Secret)?;
                let token = keys
                    .mint(args.role, args.ttl, args.sub.as_deref())
                    .map_err(CliError::Token)?;
                println!("{token}");
                Ok(())
            }
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let (managed, database_url, secret) = match &args.database_url {
        Some(url) => {
            let secret = args.jwt_secret.clone().ok_or_else(|| {
                ConfigError::Secret(
                    "not set: with DATABASE_URL, also set JWT_SECRET (the secret your tokens are signed with, at least 32 bytes)"
                        .into(),
                )
            })?;
            (None, url.clone(), secret)
        }
        None => {
            let managed = ManagedPostgres::start(&args.data_dir).await?;
            let secret = match &args.jwt_secret {
                Some(secret) => secret.clone(),
                None => managed_postgres::load_or_create_secret(&args.data_dir)?,
            };
            let url = managed.database_url();
            (Some(managed), url, secret)
        }
    };
    let result = serve_with(&args, database_url, secret.as_bytes(), managed.is_some()).await;
    if let Some(managed) = managed {
        if let Err(error) = managed.stop() {
            tracing::error!(%error, "could not stop the managed PostgreSQL");
        } else {
            tracing::info!("stopped the managed PostgreSQL");
        }
    }
    result
}

async fn serve_with(
    args: &ServeArgs,
    database_url: String,
    secret: &[u8],
    managed: bool,
) -> Result<(), CliError> {
    let config = ServerConfig::from_args(args, database_url, secret)?;
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    if managed {
        tracing::info!(
            "zero-config mode: managed PostgreSQL in {dir}. Get a token with \
             `vantage-sync token --role authenticated` (or service_role to write), then open \
             http://{addr}/ or POST to http://{addr}/graphql with `Authorization: Bearer <token>`",
            dir = args.data_dir.display()
        );
    }
    server.run(shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("5y").is_err());
        assert!(parse_ttl("soon").is_err());
    }
}
