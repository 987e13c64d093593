//! The real server in an OS process of its own, for tests that must kill it
//! the hard way (`kill -9`), which an in-process [`crate::TestApp`] cannot
//! be.
//!
//! The process is this test binary run again, asked by libtest to run only
//! one ignored test that calls [`serve_if_asked`]. A prebuilt
//! `target/debug/vantage-sync` would do as well, but it is not built when
//! only this package is tested and may be stale when it is there; the test
//! binary always holds the library as the test was built against it. The
//! child runs [`Server::bind`] and [`Server::run`], as `vantage-sync serve`
//! and [`crate::TestApp`] do, with [`ServerConfig::new`]'s defaults: the
//! CLI's own entry point takes clap's `Parser` trait, which this crate does
//! not depend on.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use vantage_sync::auth::TokenKeys;
use vantage_sync::server::Server;
use vantage_sync::server::{Leaving, ServerConfig};

use crate::{SECRET, TestDb};

/// The environment variable that asks the re-executed test binary to
/// serve, and says how: a JSON object with `database_url` and
/// `ready_file`.
pub const SERVER_VAR: &str = "VANTAGE_SYNC_TEST_SERVER";

/// Lines of output kept for failure messages.
const LOG_LINES: usize = 200;

/// How long a server process may take to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

static NEXT_PROCESS: AtomicU32 = AtomicU32::new(0);

/// How [`ServerProcess::start_with`] starts a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How it leaves when sent SIGTERM.
    pub leaving: Leaving,
    /// Environment variables of the process (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
    /// Whether answers carry `Server-Timing`.
    pub server_timing: bool,
    /// Whether webhooks may target loopback and private addresses (the
    /// test kit's receiver).
    pub webhook_allow_private: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            leaving: Leaving::DEFAULT,
            env: Vec::new(),
            server_timing: false,
            webhook_allow_private: false,
        }
    }
}

/// A server process (the [`Server`] that `vantage-sync serve` runs) on a
/// test database, on a free port of 127.0.0.1, with the [`SECRET`] that [`crate::TestApp`] uses. Killed
/// (SIGKILL) when dropped, so a failing test leaves nothing running; and
/// it exits by itself once the test process is gone, however that ended.
pub struct ServerProcess {
    child: Child,
    /// Held open: the child exits when it reads end-of-file here, which
    /// also happens when this process dies without running `Drop`.
    _stdin: ChildStdin,
    addr: SocketAddr,
    ready_file: PathBuf,
    log: Arc<Mutex<VecDeque<String>>>,
    keys: TokenKeys,
}

impl ServerProcess {
    /// Starts a server on `db` (its superuser URL, as [`crate::TestApp`]
    /// uses, no migrations at start) and waits until `/readyz` says 200.
    /// `test` is libtest's full name, in this test binary, of an ignored
    /// test that calls [`serve_if_asked`], e.g. `server_kill::server_process`.
    pub async fn start(test: &str, db: &TestDb) -> ServerProcess {
        Self::start_leaving(test, db, Leaving::DEFAULT).await
    }

    /// [`Self::start`], leaving as `leaving` says when sent SIGTERM
    /// ([`Self::terminate`]).
    pub async fn start_leaving(test: &str, db: &TestDb, leaving: Leaving) -> ServerProcess {
        Self::start_with(
            test,
            db,
            ServerOptions {
                leaving,
                ..ServerOptions::default()
            },
        )
        .await
    }

    /// [`Self::start`] with `options`: process-wide settings such as the
    /// `OTEL_*` variables, which a server in the test process could not
    /// have without giving them to every other test.
    pub async fn start_with(test: &str, db: &TestDb, options: ServerOptions) -> ServerProcess {
        let ServerOptions {
            leaving,
            env,
            server_timing,
            webhook_allow_private,
        } = options;
        let ready_file = std::env::temp_dir().join(format!(
            "vantage-sync-server-{}-{}.json",
            std::process::id(),
            NEXT_PROCESS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&ready_file);
        let settings = serde_json::json!({
            "database_url": db.url,
            "ready_file": ready_file,
            "shutdown_delay_ms": leaving.delay.as_millis() as u64,
            "shutdown_timeout_ms": leaving.timeout.as_millis() as u64,
            "server_timing": server_timing,
            "webhook_allow_private": webhook_allow_private,
        });
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                test,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SERVER_VAR, settings.to_string())
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        // Drained by threads of their own, so a full pipe never stops the
        // server, whatever the test is doing.
        drain(child.stdout.take().unwrap(), Arc::clone(&log));
        drain(child.stderr.take().unwrap(), Arc::clone(&log));
        let mut server = ServerProcess {
            _stdin: child.stdin.take().unwrap(),
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ready_file,
            log,
            keys: TokenKeys::new(SECRET.as_bytes()).unwrap(),
        };
        server.wait_until_ready().await;
        server
    }

    async fn wait_until_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        let client = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the server process exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server process was not ready within {READY_WITHIN:?}:\n{}",
                self.log_tail()
            );
            if let Some(addr) = vantage_sync::cli::announced_addr(&self.ready_file) {
                self.addr = addr;
                // Ready means the database answers and the live feed listens.
                let ready = client
                    .get(self.url("/readyz"))
                    .send()
                    .await
                    .is_ok_and(|response| response.status() == StatusCode::OK);
                if ready {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// URL of `path` on this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// A token for `role` that this server accepts, valid for ten minutes.
    pub fn token(&self, role: &str) -> String {
        crate::app::token(&self.keys, role)
    }

    /// Sends SIGTERM: the server leaves as its [`Leaving`] says.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `within` for the process to exit; whether it did,
    /// successfully.
    pub async fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Sends SIGKILL and waits for the process to be gone: no shutdown,
    /// no goodbyes to clients or the database, as after `kill -9`.
    pub fn kill9(&mut self) {
        // `Child::kill` is SIGKILL on Unix.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// The last lines the process wrote (libtest's and the server's), for
    /// failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.ready_file);
    }
}

fn drain(output: impl Read + Send + 'static, log: Arc<Mutex<VecDeque<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            let mut log = log.lock().unwrap();
            if log.len() == LOG_LINES {
                log.pop_front();
            }
            log.push_back(line);
        }
    });
}

/// The body of the ignored test that [`ServerProcess::start`] runs: with
/// [`SERVER_VAR`] set, serves as it says (port 0 of 127.0.0.1, [`SECRET`],
/// no migrations, a pool of 8 as [`crate::TestApp`] has), announces the
/// address in the ready file as `vantage-sync serve --ready-file` does,
/// and logs to stderr until the process is killed or, on SIGTERM, has
/// left as its settings say. Without it (someone
/// running the ignored tests), returns at once.
pub fn serve_if_asked() {
    let Ok(settings) = std::env::var(SERVER_VAR) else {
        return;
    };
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    let database_url = settings["database_url"].as_str().unwrap().to_owned();
    let ready_file = PathBuf::from(settings["ready_file"].as_str().unwrap());
    // As `vantage-sync serve` does: logs, and traces when OTEL_* say so.
    let traces = vantage_sync::telemetry::TraceSettings::from_env().unwrap();
    let _telemetry =
        vantage_sync::telemetry::init(traces.as_ref(), "info,sqlx=warn", false).unwrap();
    // The parent holds our stdin open; end-of-file means it is gone, and a
    // server left behind would hold database connections and a port.
    std::thread::spawn(|| {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = ServerConfig::new(database_url, SECRET.as_bytes()).unwrap();
        config.listen_addr = "127.0.0.1:0".parse().unwrap();
        config.migrate = false;
        config.max_connections = 8;
        config.server_timing = settings["server_timing"].as_bool().unwrap_or(false);
        config.webhooks.allow_private =
            settings["webhook_allow_private"].as_bool().unwrap_or(false);
        let millis = |name: &str| Duration::from_millis(settings[name].as_u64().unwrap_or(0));
        config.leaving = Leaving {
            delay: millis("shutdown_delay_ms"),
            timeout: millis("shutdown_timeout_ms"),
        };
        let server = Server::bind(config).await.unwrap();
        let announced = serde_json::json!({
            "addr": server.local_addr().to_string(),
            "pid": std::process::id(),
        });
        // Whole, by rename: the parent never reads half a file.
        let partial = ready_file.with_extension("partial");
        std::fs::write(&partial, announced.to_string()).unwrap();
        std::fs::rename(&partial, &ready_file).unwrap();
        server
            .run(async {
                let mut terminate =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .unwrap();
                terminate.recv().await;
            })
            .await
            .unwrap();
    });
}
