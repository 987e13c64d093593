//! The `vantage-sync` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::auth::{Role, SigningKey, TokenKeys};
use crate::check;
use crate::config::{ClaimArgs, ConfigError, ServeArgs};
use crate::db::migrate::{self, MigrateCommand, MigrateError};
use crate::managed_postgres::{self, ManagedError, ManagedPostgres};
use crate::run;
use crate::server::{ServeError, Server};

/// The version and the commit the binary was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("VANTAGE_SYNC_COMMIT"),
    ")"
);

/// The Vantage sync state service.
#[derive(Debug, Parser)]
#[command(name = "vantage-sync", version = VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of `vantage-sync`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the GraphQL API (with no DATABASE_URL: on a managed local PostgreSQL).
    Serve(Box<ServeArgs>),
    /// Check a deployment without serving: the configuration, the database,
    /// migrations, roles, the live feed's LISTEN, the key set and webhook
    /// secrets, one line each; fails if any check fails. Takes the same
    /// flags and variables as `serve`.
    Check(Box<ServeArgs>),
    /// Manage the database schema.
    Migrate {
        /// PostgreSQL connection URL (not needed by `migrate sql`).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
        database_url: Option<String>,
        /// Seconds one statement may wait for a lock: a migration stuck
        /// behind a long transaction then fails, naming it, instead of
        /// making every request that needs the same table wait behind it.
        #[arg(long, global = true, default_value_t = migrate::DEFAULT_LOCK_TIMEOUT.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        lock_timeout_secs: u64,
        /// The migration step.
        #[command(subcommand)]
        command: MigrateCommand,
    },
    /// Print the GraphQL schema (SDL).
    Schema,
    /// Mint a bearer token (HS256 with the secret, or signed with a
    /// private key).
    Token(TokenArgs),
    /// Print the public JSON Web Key Set of a private key (for JWKS_FILE
    /// or a JWKS_URL you serve), so tokens from `token --private-key`
    /// verify.
    Jwks(JwksArgs),
    /// Run an ETL job and record it as a sync of RESOURCE: marked started,
    /// then completed (exit 0, with the counts the job writes to
    /// $VANTAGE_SYNC_RESULT) or failed (with the exit code or signal and
    /// the end of its standard error). Exits with the job's exit code.
    Run(Box<RunArgs>),
}

/// Flags of `vantage-sync run`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (a crontab line):\n  0 * * * * vantage-sync run accounts -- /opt/etl/sync-accounts.sh"
)]
pub struct RunArgs {
    /// The resource the job syncs, e.g. accounts.
    pub resource: String,
    /// The server: its address (http://host:8080) or its /graphql endpoint.
    #[arg(long, env = "VANTAGE_SYNC_URL")]
    pub url: Option<String>,
    /// A service_role token to mark the sync with (`vantage-sync token
    /// --role service_role`); the job does not inherit VANTAGE_SYNC_TOKEN.
    #[arg(long, env = "VANTAGE_SYNC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Run the job only once its start is marked: if the API cannot be
    /// reached or refuses (ALREADY_RUNNING included), exit 75 without
    /// running it.
    #[arg(long)]
    pub require_api: bool,
    /// Seconds to keep retrying each mark (start, then completed or
    /// failed) while the API cannot be reached; 0 tries once.
    #[arg(long, env = "VANTAGE_SYNC_RETRY_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub retry_secs: u64,
    /// The job: a program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

impl RunArgs {
    fn settings(self) -> run::Settings {
        run::Settings {
            resource: self.resource,
            url: self.url,
            token: self.token,
            require_api: self.require_api,
            retry_for: Duration::from_secs(self.retry_secs),
            command: self.command,
        }
    }
}

/// Flags of `vantage-sync jwks`.
#[derive(Debug, Clone, clap::Args)]
pub struct JwksArgs {
    /// PEM private key: EC P-256, RSA (2048 bits or more) or Ed25519.
    #[arg(long)]
    pub private_key: PathBuf,
    /// Key id; default: the key's RFC 7638 thumbprint.
    #[arg(long)]
    pub kid: Option<String>,
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
    /// Secret to sign with; without it (and without --private-key), the
    /// one kept in --data-dir.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Sign with this PEM private key instead (EC P-256: ES256, RSA:
    /// RS256, Ed25519: EdDSA); `jwks --private-key` prints its public key.
    #[arg(long, conflicts_with = "jwt_secret")]
    pub private_key: Option<PathBuf>,
    /// Key id of --private-key; default: the key's RFC 7638 thumbprint.
    #[arg(long, requires = "private_key")]
    pub kid: Option<String>,
    /// The claims the server expects (the same flags as `serve`).
    #[command(flatten)]
    pub claims: ClaimArgs,
    /// Data directory of the zero-configuration setup.
    #[arg(long, env = "VANTAGE_SYNC_DATA_DIR", default_value = ".vantage-sync")]
    pub data_dir: PathBuf,
}

fn read_signing_key(path: &std::path::Path, kid: Option<String>) -> Result<SigningKey, CliError> {
    let pem = std::fs::read(path).map_err(|error| {
        CliError::PrivateKey(format!("cannot read {}: {error}", path.display()))
    })?;
    SigningKey::from_pem(&pem, kid)
        .map_err(|error| CliError::PrivateKey(format!("{}: {error}", path.display())))
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
    /// `check` found problems (each printed with what to do).
    #[error("{failed} of {checks} checks failed")]
    CheckFailed {
        /// Checks that failed.
        failed: usize,
        /// Checks made.
        checks: usize,
    },
    /// Minting a token failed.
    #[error("token: {0}")]
    Token(String),
    /// The private key could not be used.
    #[error("private key: {0}")]
    PrivateKey(String),
    /// Writing output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Adds a tip naming the flag an unknown one was probably meant as, when
/// clap found no similar name itself (`--port` is not like `--listen-addr`).
fn add_flag_tip(error: &mut clap::Error) {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::UnknownArgument || error.get(ContextKind::SuggestedArg).is_some()
    {
        return;
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return;
    };
    let Some(tip) = flag_tip(arg) else {
        return;
    };
    let mut tips = match error.get(ContextKind::Suggested) {
        Some(ContextValue::StyledStrs(tips)) => tips.clone(),
        _ => Vec::new(),
    };
    tips.insert(0, tip.into());
    error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
}

/// Where to set what a flag this command line does not have, but other
/// servers do, would set.
fn flag_tip(arg: &str) -> Option<String> {
    let name = arg.trim_start_matches('-').split('=').next()?;
    let tip = match name.to_ascii_lowercase().as_str() {
        "port" | "host" | "bind" | "addr" | "address" | "listen" | "http" | "server" => {
            "the address and port are set with --listen-addr HOST:PORT (or LISTEN_ADDR), e.g. --listen-addr 127.0.0.1:8081"
        }
        "db" | "database" | "postgres" | "postgresql" | "pg" | "db-url" | "dsn" | "url"
        | "database-uri" | "connection-string" => {
            "the database is set with --database-url URL (or DATABASE_URL)"
        }
        "secret" | "jwt" | "jwt-key" | "key" => {
            "the token secret is set with --jwt-secret SECRET (or JWT_SECRET)"
        }
        "data" | "dir" | "data-directory" | "datadir" => {
            "the managed PostgreSQL's directory is set with --data-dir DIR (or VANTAGE_SYNC_DATA_DIR)"
        }
        "log" | "log-level" | "verbose" | "debug" | "quiet" | "v" => {
            "logging is set with the RUST_LOG environment variable, e.g. RUST_LOG=debug"
        }
        "config" | "config-file" | "c" => {
            "settings are flags or environment variables, listed by `vantage-sync serve --help`"
        }
        _ => return None,
    };
    Some(tip.to_owned())
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
    /// The command line of this process; on an error, clap's message (with
    /// a tip for flags people guess that have another name here) and exit.
    pub fn parse_or_exit() -> Self {
        Self::try_parse().unwrap_or_else(|mut error| {
            add_flag_tip(&mut error);
            error.exit()
        })
    }

    /// Runs the parsed command.
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Serve(args) => serve(*args).await,
            Command::Check(args) => check(*args).await,
            Command::Migrate {
                database_url,
                lock_timeout_secs,
                command,
            } => {
                let mut stdout = std::io::stdout().lock();
                let lock_timeout = Duration::from_secs(lock_timeout_secs);
                Ok(
                    migrate::run(&command, database_url.as_deref(), lock_timeout, &mut stdout)
                        .await?,
                )
            }
            Command::Schema => {
                print!("{}", crate::graphql::sdl());
                Ok(())
            }
            Command::Token(args) => {
                let rules = args.claims.rules()?;
                let token = match &args.private_key {
                    Some(path) => read_signing_key(path, args.kid.clone())?.mint(
                        &rules,
                        args.role,
                        args.ttl,
                        args.sub.as_deref(),
                    ),
                    None => {
                        let secret = match args.jwt_secret {
                            Some(secret) => secret,
                            None => managed_postgres::load_or_create_secret(&args.data_dir)?,
                        };
                        TokenKeys::from_settings(crate::auth::KeySettings {
                            secret: Some(secret.into_bytes()),
                            jwks: None,
                            rules,
                        })
                        .map_err(ConfigError::Keys)?
                        .mint(args.role, args.ttl, args.sub.as_deref())
                    }
                }
                .map_err(CliError::Token)?;
                println!("{token}");
                Ok(())
            }
            Command::Jwks(args) => {
                let key = read_signing_key(&args.private_key, args.kid)?;
                let set = serde_json::to_string_pretty(&key.key_set())
                    .map_err(|error| CliError::PrivateKey(error.to_string()))?;
                println!("{set}");
                Ok(())
            }
            Command::Run(args) => {
                let code = run::run(args.settings()).await;
                // The job's exit code is the wrapper's, which `main`'s
                // Result cannot carry.
                std::process::exit(code)
            }
        }
    }
}

/// Runs every start-up check of `serve` and prints a line for each.
async fn check(args: ServeArgs) -> Result<(), CliError> {
    let mut report = match &args.database_url {
        None => check::managed(&args.data_dir, managed_postgres::server_bin_dir()),
        Some(url) => {
            let secret = args.jwt_secret.as_deref().map(str::as_bytes);
            match args.server_config(url.clone(), secret) {
                Ok(config) => check::deployment(&config).await,
                Err(error) => check::Report::configuration_failed(error),
            }
        }
    };
    report.traces().await;
    for finding in &report.findings {
        println!("{finding}");
    }
    match report.failures() {
        0 => Ok(()),
        failed => Err(CliError::CheckFailed {
            failed,
            checks: report.findings.len(),
        }),
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let (managed, database_url, secret) = match &args.database_url {
        Some(url) => {
            if args.jwt_secret.is_none() && args.jwks_url.is_none() && args.jwks_file.is_none() {
                return Err(ConfigError::Keys(
                    "with DATABASE_URL, set JWT_SECRET (the HS256 secret your tokens are signed with, at least 32 bytes) and/or JWKS_URL or JWKS_FILE (the public keys of ES256, RS256 or EdDSA tokens)"
                        .into(),
                )
                .into());
            }
            (None, url.clone(), args.jwt_secret.clone())
        }
        None => {
            let managed = ManagedPostgres::start(&args.data_dir).await?;
            let secret = match &args.jwt_secret {
                Some(secret) => secret.clone(),
                None => managed_postgres::load_or_create_secret(&args.data_dir)?,
            };
            let url = managed.database_url();
            (Some(managed), url, Some(secret))
        }
    };
    let result = serve_with(
        &args,
        database_url,
        secret.as_deref().map(str::as_bytes),
        managed.is_some(),
    )
    .await;
    if let Some(managed) = managed {
        if let Err(error) = managed.stop() {
            tracing::error!(%error, "could not stop the managed PostgreSQL");
        } else {
            tracing::info!("stopped the managed PostgreSQL");
        }
    }
    result
}

/// How long the zero-config start's status board link stays signed in.
const BOARD_LINK_TTL: Duration = Duration::from_secs(12 * 3600);

async fn serve_with(
    args: &ServeArgs,
    database_url: String,
    secret: Option<&[u8]>,
    managed: bool,
) -> Result<(), CliError> {
    let config = args.server_config(database_url, secret)?;
    let board_token = managed
        .then(|| {
            config
                .keys
                .mint(Role::Authenticated, BOARD_LINK_TTL, Some("status-board"))
        })
        .transpose()
        .map_err(CliError::Token)?;
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    if let Some(token) = board_token {
        // Browsers cannot open an unspecified address.
        let host = match addr.ip() {
            ip if ip.is_unspecified() => {
                std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port())
            }
            _ => addr,
        };
        tracing::info!(
            "zero-config mode: managed PostgreSQL in {dir}. Get a token with \
             `vantage-sync token --role authenticated` (or service_role to write) and POST to \
             http://{addr}/graphql with `Authorization: Bearer <token>`",
            dir = args.data_dir.display()
        );
        // The token rides in the fragment, which the browser never sends;
        // the board moves it to session storage and out of the address bar.
        tracing::info!(
            "status board (signed in for {hours} hours): http://{host}/#token={token}",
            hours = BOARD_LINK_TTL.as_secs() / 3600
        );
    }
    if let Some(path) = &args.ready_file {
        announce(path, addr)?;
    }
    server.run(shutdown_signal()).await?;
    Ok(())
}

/// Writes the bound address to `path` as JSON, whole: a reader never sees
/// half a file.
fn announce(path: &std::path::Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let text = serde_json::json!({ "addr": addr.to_string(), "pid": std::process::id() });
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text.to_string())?;
    std::fs::rename(&partial, path)
}

/// The address a server announced in its `--ready-file`, once it has.
pub fn announced_addr(path: &std::path::Path) -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string(path).ok()?;
    let announced: serde_json::Value = serde_json::from_str(&text).ok()?;
    announced.get("addr")?.as_str()?.parse().ok()
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
    tracing::info!("leaving: told to stop");
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
