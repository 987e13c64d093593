//! A real HAProxy (Debian's `haproxy`, 2.6) in front of server replicas,
//! with the configuration operators get: `docs/haproxy.cfg`, of which only
//! the bind address and the server lines are changed here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, spawn_watchdog};

/// The configuration the documentation ships.
const SHIPPED: &str = include_str!("../../docs/haproxy.cfg");

/// An HAProxy process and its directory; stopped and removed on drop.
pub struct HaProxy {
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl HaProxy {
    /// Starts HAProxy with the shipped configuration in front of
    /// `replicas` (named `replica1`, `replica2`, ... in that order).
    pub fn start(replicas: &[SocketAddr]) -> HaProxy {
        let dir = std::env::temp_dir().join(format!(
            "vantage-sync-haproxy-{}-{}",
            std::process::id(),
            crate::NEXT_CLUSTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::write(dir.join("haproxy.cfg"), configuration(addr, replicas)).unwrap();
        spawn_watchdog(&dir, "haproxy.pid", "TERM");
        let output = Command::new(haproxy_binary())
            .arg("-D")
            .arg("-p")
            .arg(dir.join("haproxy.pid"))
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .stdin(Stdio::null())
            .output()
            .expect(
                "haproxy is needed for the replica tests (apt-get install haproxy; see .ci/run)",
            );
        assert!(
            output.status.success(),
            "haproxy did not start: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy does not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        HaProxy { dir, addr }
    }

    /// URL of `path` through the balancer.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// The shipped configuration, bound to `addr`, with one server line per
/// replica.
fn configuration(addr: SocketAddr, replicas: &[SocketAddr]) -> String {
    let mut config = String::new();
    let mut servers_written = false;
    for line in SHIPPED.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("bind ") {
            config.push_str(&format!("    bind {addr}\n"));
        } else if trimmed.starts_with("server ") {
            if !servers_written {
                for (index, replica) in replicas.iter().enumerate() {
                    config.push_str(&format!(
                        "    server replica{} {replica} check\n",
                        index + 1
                    ));
                }
                servers_written = true;
            }
        } else {
            config.push_str(line);
            config.push('\n');
        }
    }
    assert!(servers_written, "docs/haproxy.cfg has no server lines");
    config
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("haproxy.pid")) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn haproxy_binary() -> PathBuf {
    std::env::var_os("HAPROXY_BIN")
        .map_or_else(|| PathBuf::from("/usr/sbin/haproxy"), PathBuf::from)
}
