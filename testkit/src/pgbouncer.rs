//! A real PgBouncer (Debian's `pgbouncer`, 1.18) in `pool_mode =
//! transaction` in front of a test cluster: the mode of Supabase's pooler
//! on port 6543, where each transaction may get another server connection.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;

use crate::{as_server_user, free_port, hand_to_server_user, spawn_watchdog};

/// A PgBouncer process and its directory; stopped and removed on drop.
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    /// Starts PgBouncer for the server that `database_url` names, letting
    /// `users` log in (the server itself trusts them).
    pub fn start(database_url: &str, users: &[&str]) -> PgBouncer {
        let server: PgConnectOptions = database_url.parse().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "vantage-sync-pgbouncer-{}-{}",
            std::process::id(),
            crate::NEXT_CLUSTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let userlist: String = users
            .iter()
            .map(|user| format!("\"{user}\" \"\"\n"))
            .collect();
        std::fs::write(dir.join("userlist.txt"), userlist).unwrap();
        // Any database name passes through to the test cluster; trust
        // authentication still needs the users listed in auth_file. No
        // ignore_startup_parameters: the server must not need it.
        // A Unix socket's directory is a host to PgBouncer, as to libpq.
        let host = match server.get_socket() {
            Some(socket) => socket.display().to_string(),
            None => server.get_host().to_owned(),
        };
        let config = format!(
            "[databases]\n* = host={host} port={server_port}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {dir}/userlist.txt\npool_mode = transaction\n\
             default_pool_size = 20\nmax_client_conn = 2000\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n",
            server_port = server.get_port(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), config).unwrap();
        hand_to_server_user(&dir);
        spawn_watchdog(&dir, "pgbouncer.pid", "TERM");
        let output = as_server_user(&pgbouncer_binary())
            .arg("-d")
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .output()
            .expect(
                "pgbouncer is needed for the pooler tests (apt-get install pgbouncer; see .ci/run)",
            );
        assert!(
            output.status.success(),
            "pgbouncer did not start: {}{}",
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
        );
        let bouncer = PgBouncer { dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer does not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        bouncer
    }

    /// `database_url` with its host and port (or socket) replaced by
    /// PgBouncer's.
    pub fn url(&self, database_url: &str) -> String {
        let mut url = reqwest::Url::parse(database_url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        let query: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(name, _)| name != "host")
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        url.set_query(None);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url.to_string()
    }

    /// PgBouncer's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", pid.trim()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pgbouncer_binary() -> PathBuf {
    std::env::var_os("PGBOUNCER_BIN")
        .map_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"), PathBuf::from)
}
