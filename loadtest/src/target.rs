//! The server under test: one started here, or one already running.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use vantage_sync::auth::{Caller, Role, TokenKeys};

use vantage_sync_testkit::PgBouncer;

use crate::cpu::CpuMeter;

/// Where the server is and how to talk to it.
pub struct Target {
    /// `http://host:port`.
    pub base: String,
    /// Superuser URL of its database.
    pub database_url: String,
    keys: TokenKeys,
    /// The server measured, when started here.
    child: Option<Child>,
    dir: Option<PathBuf>,
    /// Servers started here but not measured.
    idle: Vec<Child>,
    pgbouncer: Option<PgBouncer>,
}

/// Starts `command` (a `vantage-sync serve`) and waits until it announces
/// its address in its `--ready-file`.
fn start_server(mut command: Command, bin: &std::path::Path) -> anyhow::Result<(Child, String)> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ready = std::env::temp_dir().join(format!(
        "vantage-sync-loadtest-ready-{}-{}.json",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&ready);
    let mut child = command
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stderr = child.stderr.take().context("no stderr")?;
    // Its log is kept for a failure message and drained so that the
    // server never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(mut kept) = kept.lock()
                && kept.len() < 200
            {
                kept.push(line);
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(addr) = vantage_sync::cli::announced_addr(&ready) {
            let _ = std::fs::remove_file(&ready);
            return Ok((child, addr.to_string()));
        }
        let exited = child.try_wait()?.is_some();
        if exited || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let seen = log.lock().map(|lines| lines.join("\n")).unwrap_or_default();
            bail!("the server did not start:\n{seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lets this process (and the server it starts) open as many sockets as
/// the system allows: 10,000 subscribers need 20,000 descriptors.
pub fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

impl Target {
    /// A server that is already running.
    pub fn external(base: &str, database_url: String, secret: &str) -> anyhow::Result<Self> {
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            database_url,
            keys: TokenKeys::new(secret.as_bytes()).map_err(anyhow::Error::msg)?,
            child: None,
            dir: None,
            idle: Vec::new(),
            pgbouncer: None,
        })
    }

    /// Starts `vantage-sync serve` in zero-config mode in a fresh directory.
    /// With `through_pgbouncer`, a PgBouncer in transaction mode is put in
    /// front of that server's PostgreSQL, and a second server whose
    /// DATABASE_URL is the PgBouncer (LISTEN_DATABASE_URL the direct
    /// socket) is the one measured.
    pub async fn spawn(
        server_bin: Option<PathBuf>,
        through_pgbouncer: bool,
    ) -> anyhow::Result<Self> {
        let bin = match server_bin {
            Some(bin) => bin,
            None => std::env::current_exe()?
                .parent()
                .context("no directory of this binary")?
                .join("vantage-sync"),
        };
        if !bin.exists() {
            bail!(
                "{} not found: build it (cargo build --release -p vantage-sync) or pass --server-bin",
                bin.display()
            );
        }
        let dir =
            std::env::temp_dir().join(format!("vantage-sync-loadtest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // The server's own defaults (pool size among them): the load
        // measures it as a first run would get it.
        let mut command = Command::new(&bin);
        command
            .args(["serve", "--listen-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env_remove("DATABASE_URL")
            .env_remove("JWT_SECRET")
            // The webhooks scenario's receiver is on loopback.
            .env("WEBHOOK_ALLOW_PRIVATE", "true");
        let (child, addr) = start_server(command, &bin)?;
        let dir = dir.canonicalize()?;
        let secret = std::fs::read_to_string(dir.join("jwt_secret"))?;
        let database_url = vantage_sync::managed_postgres::socket_url(
            &dir.join("run"),
            vantage_sync::managed_postgres::DATABASE,
        );
        let mut target = Self {
            base: format!("http://{addr}"),
            database_url,
            keys: TokenKeys::new(secret.trim().as_bytes()).map_err(anyhow::Error::msg)?,
            child: Some(child),
            dir: Some(dir),
            idle: Vec::new(),
            pgbouncer: None,
        };
        if through_pgbouncer {
            let bouncer = PgBouncer::start(&target.database_url, &["postgres"]);
            let mut command = Command::new(&bin);
            command
                .args(["serve", "--listen-addr", "127.0.0.1:0", "--no-migrate"])
                .env("DATABASE_URL", bouncer.url(&target.database_url))
                .env("LISTEN_DATABASE_URL", &target.database_url)
                .env("JWT_SECRET", secret.trim())
                .env("WEBHOOK_ALLOW_PRIVATE", "true");
            let (pooled, addr) = start_server(command, &bin)?;
            // The zero-config server keeps its PostgreSQL running, idle.
            target.idle.extend(target.child.replace(pooled));
            target.base = format!("http://{addr}");
            target.pgbouncer = Some(bouncer);
        }
        Ok(target)
    }

    /// A token for `role`, valid for an hour.
    pub fn token(&self, role: Role) -> String {
        self.keys
            .mint(
                role,
                Duration::from_secs(3600),
                Some("vantage-sync-loadtest"),
            )
            .unwrap_or_default()
    }

    /// The caller the server makes of a token for `role`.
    pub async fn caller(&self, role: Role) -> anyhow::Result<Caller> {
        let header = format!("Bearer {}", self.token(role));
        self.keys
            .caller(Some(&header))
            .await
            .map_err(|error| anyhow::anyhow!(error.message()))
    }

    /// What to count CPU time of: the server and its PostgreSQL, when they
    /// were started here; this process always.
    pub fn cpu_meter(&self) -> CpuMeter {
        CpuMeter::new(
            self.child.as_ref().map(Child::id),
            self.dir.as_ref().map(|dir| dir.join("pgdata")),
        )
    }

    /// The server's process, when it runs here.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's resident memory, when it runs here.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }

    /// How many file descriptors the server holds open, when it runs here.
    pub fn open_fds(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        Some(entries.count() as u64)
    }

    /// Stops a server started here (SIGTERM) and removes its directory.
    pub fn stop(self) {
        for mut child in self.child.into_iter().chain(self.idle) {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        drop(self.pgbouncer);
        if let Some(dir) = self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}
