//! The zero-configuration database: with no `DATABASE_URL`, `serve` runs a
//! PostgreSQL cluster of its own from the installed server binaries.
//!
//! Layout of the data directory (default `./.vantage-sync`):
//! - `pgdata/`: the cluster, owned by the user the server runs as (the
//!   `postgres` OS user when started as root, since PostgreSQL refuses root);
//! - `run/`: the server's Unix socket, mode 0700. The cluster listens on no
//!   TCP port at all, so nothing else on the machine can reach it and no
//!   port can clash;
//! - `jwt_secret`: the generated token secret, mode 0600;
//! - `postgres.log`: the server's log.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Name of the database the service uses inside the managed cluster.
pub const DATABASE: &str = "vantage_sync";
/// Longest Unix socket path PostgreSQL accepts (sun_path less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why the managed database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no DATABASE_URL is set and no PostgreSQL server binaries were found under \
         /usr/lib/postgresql/*/bin: install them (apt-get install postgresql), set PG_BIN_DIR, \
         or set DATABASE_URL"
    )]
    NoServerBinaries,
    /// The data directory cannot be used.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A PostgreSQL tool failed.
    #[error("{tool} failed: {detail}")]
    Tool {
        /// The tool (initdb, pg_ctl, ...).
        tool: &'static str,
        /// Its output.
        detail: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// One PostgreSQL cluster run with the installed server binaries, as the
/// server's own user: the managed mode's, and the test harness's.
#[derive(Debug)]
pub struct PostgresCluster {
    bin_dir: PathBuf,
    pgdata: PathBuf,
    log: PathBuf,
    options: String,
}

/// How [`PostgresCluster::stop`] ends open sessions.
#[derive(Debug, Clone, Copy)]
pub enum Shutdown {
    /// Sessions are ended cleanly, then the server stops.
    Fast,
    /// The server stops at once; recovery runs at the next start.
    Immediate,
}

impl PostgresCluster {
    /// A cluster in `pgdata` logging to `log`, whose server is started with
    /// `options` (postgres command-line settings).
    pub fn new(pgdata: PathBuf, log: PathBuf, options: String) -> Result<Self, ManagedError> {
        Ok(Self {
            bin_dir: server_bin_dir().ok_or(ManagedError::NoServerBinaries)?,
            pgdata,
            log,
            options,
        })
    }

    /// Whether the cluster's data directory has been initialised.
    pub fn exists(&self) -> bool {
        self.pgdata.join("PG_VERSION").exists()
    }

    /// Creates the cluster: superuser `postgres`, UTF-8, local connections
    /// trusted, `extra` initdb arguments.
    pub fn init(&self, extra: &[&str]) -> Result<(), ManagedError> {
        run(
            "initdb",
            self.tool("initdb")
                .arg("-D")
                .arg(&self.pgdata)
                .args(["-U", "postgres", "-E", "UTF8", "--auth-local=trust"])
                .args(extra),
        )
        .map(drop)
    }

    /// Whether a server runs on this cluster's data.
    pub fn is_running(&self) -> bool {
        self.pg_ctl()
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) -> Result<(), ManagedError> {
        let mut command = self.pg_ctl();
        command
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(&self.options)
            .args(["-w", "-t", "60", "start"]);
        run("pg_ctl start", &mut command)
            .map(drop)
            .map_err(|error| {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                match error {
                    ManagedError::Tool { tool, detail } if !tail.is_empty() => ManagedError::Tool {
                        tool,
                        detail: format!(
                            "{detail}; the end of {}:\n{}",
                            self.log.display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        ),
                    },
                    other => other,
                }
            })
    }

    /// Stops the server, keeping its data.
    pub fn stop(&self, mode: Shutdown) -> Result<(), ManagedError> {
        let mode = match mode {
            Shutdown::Fast => "fast",
            Shutdown::Immediate => "immediate",
        };
        run(
            "pg_ctl stop",
            self.pg_ctl().args(["-m", mode, "-w", "stop"]),
        )
        .map(drop)
    }

    fn pg_ctl(&self) -> Command {
        let mut command = self.tool("pg_ctl");
        command.arg("-D").arg(&self.pgdata);
        command
    }

    fn tool(&self, name: &str) -> Command {
        server_user_command(&self.bin_dir.join(name))
    }
}

/// The managed cluster of `serve`; [`ManagedPostgres::stop`] shuts it down.
#[derive(Debug)]
pub struct ManagedPostgres {
    cluster: PostgresCluster,
    socket_dir: PathBuf,
}

impl ManagedPostgres {
    /// Starts the cluster in `data_dir`, creating it on first use (or
    /// adopting one left running by a crashed predecessor).
    pub async fn start(data_dir: &Path) -> Result<Self, ManagedError> {
        let data_dir = prepare_dir(data_dir, 0o755)?;
        let pgdata = data_dir.join("pgdata");
        let socket_dir = data_dir.join("run");
        let socket = socket_dir.join(".s.PGSQL.5432");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ManagedError::DataDir {
                path: data_dir,
                reason: format!(
                    "its socket path {} is longer than PostgreSQL's limit of {MAX_SOCKET_PATH} bytes; \
                     pass a shorter --data-dir",
                    socket.display()
                ),
            });
        }
        let log = data_dir.join("postgres.log");
        for dir in [&pgdata, &socket_dir] {
            prepare_dir(dir, 0o700)?;
            own(dir)?;
        }
        if running_as_root() {
            check_reachable(&data_dir)?;
            touch(&log)?;
            own(&log)?;
        }
        let options = format!(
            "-c listen_addresses='' -k {} -c unix_socket_permissions=0700",
            socket_dir.display()
        );
        let cluster = PostgresCluster::new(pgdata, log, options)?;
        if !cluster.exists() {
            tracing::info!(pgdata = %cluster.pgdata.display(), "creating the managed PostgreSQL cluster");
            cluster.init(&["--auth-host=reject"])?;
        }
        if cluster.is_running() {
            tracing::warn!("adopting a managed PostgreSQL left running by an earlier process");
        } else {
            cluster.start()?;
        }
        let managed = Self {
            cluster,
            socket_dir,
        };
        managed.ensure_database().await?;
        Ok(managed)
    }

    /// URL of the service's database in this cluster.
    pub fn database_url(&self) -> String {
        self.url(DATABASE)
    }

    fn url(&self, database: &str) -> String {
        socket_url(&self.socket_dir, database)
    }

    async fn ensure_database(&self) -> Result<(), ManagedError> {
        use sea_orm::{ConnectionTrait, DbBackend, Statement};
        let tool_error = |detail: sea_orm::DbErr| ManagedError::Tool {
            tool: "postgres",
            detail: detail.to_string(),
        };
        let admin = crate::db::connect_session(&self.url("postgres"))
            .await
            .map_err(tool_error)?;
        let exists = admin
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM pg_database WHERE datname = $1",
                [DATABASE.into()],
            ))
            .await
            .map_err(tool_error)?
            .is_some();
        if !exists {
            admin
                .execute_unprepared(&format!("CREATE DATABASE {DATABASE}"))
                .await
                .map_err(tool_error)?;
        }
        admin.close().await.map_err(tool_error)
    }

    /// Stops the cluster (fast shutdown: open sessions are ended cleanly).
    pub fn stop(&self) -> Result<(), ManagedError> {
        self.cluster.stop(Shutdown::Fast)
    }
}

fn run(tool: &'static str, command: &mut Command) -> Result<Output, ManagedError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| ManagedError::Tool {
            tool,
            detail: error.to_string(),
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(ManagedError::Tool {
            tool,
            detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Hands `path` to the `postgres` user when running as root.
fn own(path: &Path) -> Result<(), ManagedError> {
    if !running_as_root() {
        return Ok(());
    }
    run(
        "chown",
        Command::new("chown").arg("postgres:postgres").arg(path),
    )
    .map(drop)
}

fn check_reachable(data_dir: &Path) -> Result<(), ManagedError> {
    let reachable = Command::new("runuser")
        .args(["-u", "postgres", "--", "test", "-x"])
        .arg(data_dir)
        .status()
        .is_ok_and(|status| status.success());
    if reachable {
        Ok(())
    } else {
        Err(ManagedError::DataDir {
            path: data_dir.to_owned(),
            reason: "the postgres OS user (which runs the managed PostgreSQL when started as \
                     root) cannot enter it; pass a --data-dir under a directory it can reach, \
                     e.g. /var/lib/vantage-sync"
                .into(),
        })
    }
}

/// The token secret kept in `data_dir`, generated on first use.
pub fn load_or_create_secret(data_dir: &Path) -> Result<String, ManagedError> {
    let data_dir = prepare_dir(data_dir, 0o755)?;
    let path = data_dir.join("jwt_secret");
    let io = |source| ManagedError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(secret) => return Ok(secret.trim().to_owned()),
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
        Err(_) => {}
    }
    let mut random = [0_u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| std::io::Read::read_exact(&mut urandom, &mut random))
        .map_err(io)?;
    let secret: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    file.write_all(secret.as_bytes()).map_err(io)?;
    tracing::info!(path = %path.display(), "generated a JWT secret");
    Ok(secret)
}

fn prepare_dir(dir: &Path, mode: u32) -> Result<PathBuf, ManagedError> {
    let io = |source| ManagedError::Io {
        path: dir.to_owned(),
        source,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    }
    dir.canonicalize().map_err(io)
}

fn touch(path: &Path) -> Result<(), ManagedError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(drop)
        .map_err(|source| ManagedError::Io {
            path: path.to_owned(),
            source,
        })
}

/// `program` run as the `postgres` OS user when this process is root
/// (PostgreSQL's tools refuse root), as itself otherwise: how the managed
/// cluster, the test harness's clusters and PgBouncer are all started.
pub fn server_user_command(program: &Path) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// The URL of `database` on the cluster listening in `socket_dir`, as
/// `postgres`, with the directory percent-encoded.
pub fn socket_url(socket_dir: &Path, database: &str) -> String {
    let socket: String = socket_dir
        .to_string_lossy()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '/' | '-' | '_' | '.' => c.to_string(),
            other => {
                let mut buffer = [0; 4];
                other
                    .encode_utf8(&mut buffer)
                    .bytes()
                    .map(|byte| format!("%{byte:02X}"))
                    .collect()
            }
        })
        .collect();
    format!("postgres://postgres@localhost/{database}?host={socket}")
}

/// Whether this process runs as root (PostgreSQL then runs as `postgres`).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|meta| meta.uid() == 0)
        .unwrap_or(false)
}

/// `PG_BIN_DIR`, or the newest `/usr/lib/postgresql/<version>/bin`.
pub fn server_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}
