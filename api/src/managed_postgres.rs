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

/// A running managed cluster; [`ManagedPostgres::stop`] shuts it down.
#[derive(Debug)]
pub struct ManagedPostgres {
    bin_dir: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    as_postgres_user: bool,
}

impl ManagedPostgres {
    /// Starts the cluster in `data_dir`, creating it on first use (or
    /// adopting one left running by a crashed predecessor).
    pub async fn start(data_dir: &Path) -> Result<Self, ManagedError> {
        let data_dir = prepare_dir(data_dir, 0o755)?;
        let bin_dir = server_bin_dir().ok_or(ManagedError::NoServerBinaries)?;
        let as_postgres_user = running_as_root();
        let managed = Self {
            bin_dir,
            pgdata: data_dir.join("pgdata"),
            socket_dir: data_dir.join("run"),
            as_postgres_user,
        };
        let socket = managed.socket_dir.join(".s.PGSQL.5432");
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
        for dir in [&managed.pgdata, &managed.socket_dir] {
            prepare_dir(dir, 0o700)?;
            managed.own(dir)?;
        }
        if as_postgres_user {
            managed.check_reachable(&data_dir)?;
            touch(&log)?;
            managed.own(&log)?;
        }
        if !managed.pgdata.join("PG_VERSION").exists() {
            tracing::info!(pgdata = %managed.pgdata.display(), "creating the managed PostgreSQL cluster");
            managed.run(
                "initdb",
                managed.tool("initdb").arg("-D").arg(&managed.pgdata).args([
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--auth-local=trust",
                    "--auth-host=reject",
                ]),
            )?;
        }
        let running = managed
            .tool("pg_ctl")
            .arg("-D")
            .arg(&managed.pgdata)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|status| status.success())
            .unwrap_or(false);
        if running {
            tracing::warn!("adopting a managed PostgreSQL left running by an earlier process");
        } else {
            let options = format!(
                "-c listen_addresses='' -k {} -c unix_socket_permissions=0700",
                managed.socket_dir.display()
            );
            managed.run(
                "pg_ctl start",
                managed
                    .tool("pg_ctl")
                    .arg("-D")
                    .arg(&managed.pgdata)
                    .arg("-l")
                    .arg(&log)
                    .arg("-o")
                    .arg(options)
                    .args(["-w", "-t", "60", "start"]),
            )?;
        }
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
        self.run(
            "pg_ctl stop",
            self.tool("pg_ctl")
                .arg("-D")
                .arg(&self.pgdata)
                .args(["-m", "fast", "-w", "stop"]),
        )
        .map(drop)
    }

    fn tool(&self, name: &str) -> Command {
        server_user_command(&self.bin_dir.join(name))
    }

    fn run(&self, tool: &'static str, command: &mut Command) -> Result<Output, ManagedError> {
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
    fn own(&self, path: &Path) -> Result<(), ManagedError> {
        if !self.as_postgres_user {
            return Ok(());
        }
        self.run(
            "chown",
            Command::new("chown").arg("postgres:postgres").arg(path),
        )
        .map(drop)
    }

    fn check_reachable(&self, data_dir: &Path) -> Result<(), ManagedError> {
        let reachable = Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(data_dir)
            .status()
            .map(|status| status.success())
            .unwrap_or(false);
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
