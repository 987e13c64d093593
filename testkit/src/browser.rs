//! A real headless browser for the status board's tests: Debian's
//! `chromium`, driven over WebDriver (`chromedriver`, from
//! `chromium-driver`) with fantoccini.
//!
//! Every request the page makes is seen in Chromium's own network log
//! (DevTools events, through chromedriver's performance log). Nothing
//! leaves the machine: the browser's proxy is a listener here that refuses
//! everything (Chromium never proxies loopback, where the server is), which
//! also keeps Chromium's own background traffic in.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One browser session with its own chromedriver.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    driver_url: String,
    profile: PathBuf,
    foreign: Arc<AtomicUsize>,
    name: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium `width` × `height`; its
    /// screenshots are named after `test`.
    pub async fn start(test: &str, width: u32, height: u32) -> Browser {
        let port = crate::free_port();
        // A process group of its own, which the browser it starts joins:
        // ending the group ends them all, however the test ends.
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is needed for the board tests (apt-get install chromium-driver; see .ci/run)");
        let profile = std::env::temp_dir().join(format!(
            "vantage-sync-chromium-{}-{port}",
            std::process::id()
        ));
        outlive_guard(driver.id(), &profile);
        let driver_url = format!("http://127.0.0.1:{port}");
        let (proxy, foreign) = refusing_proxy().await;
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.display()),
                    format!("--proxy-server=http://{proxy}"),
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-default-apps",
                    "--disable-extensions",
                    "--disable-sync",
                    "--metrics-recording-only",
                ],
                // Chromium itself preconnects to its search engine: not the
                // page's doing, and off here so that the proxy counts only
                // what the page asks for.
                "prefs": {
                    "net.network_prediction_options": 2,
                    "search.suggest_enabled": false,
                },
                // Headless windows are at least ~500 px wide: narrower
                // viewports are emulated.
                "mobileEmulation": {
                    "deviceMetrics": {"width": width, "height": height, "pixelRatio": 1.0, "mobile": false, "touch": false},
                },
            },
            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&driver_url)
                .await
            {
                Ok(client) => break client,
                Err(error) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no browser session: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser {
            client,
            driver,
            driver_url,
            profile,
            foreign,
            name: test.to_owned(),
        }
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap()
    }

    /// Polls `script` until it returns something truthy, at most `timeout`;
    /// what it returned, or `None` on timeout.
    pub async fn wait_for(&self, script: &str, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let value = self.js(script, vec![]).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("");
            if truthy {
                return Some(value);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Requests that reached the refusing proxy: Chromium's own, or a
    /// page's request to another host.
    pub fn proxied_requests(&self) -> usize {
        self.foreign.load(Ordering::SeqCst)
    }

    /// Every URL requested by documents loaded from `origin` (DevTools'
    /// `Network.requestWillBeSent`), from the start of the session.
    pub async fn page_requests(&self, origin: &str) -> Vec<String> {
        self.log("performance")
            .await
            .iter()
            .filter_map(|entry| {
                let event: Value = serde_json::from_str(entry["message"].as_str()?).ok()?;
                let event = &event["message"];
                let params = &event["params"];
                let ours = params["documentURL"]
                    .as_str()
                    .is_some_and(|document| document.starts_with(origin));
                (event["method"] == "Network.requestWillBeSent" && ours)
                    .then(|| params["request"]["url"].as_str().map(str::to_owned))?
            })
            .collect()
    }

    /// The browser console's messages at level SEVERE (errors).
    pub async fn console_errors(&self) -> Vec<String> {
        self.log("browser")
            .await
            .iter()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// chromedriver's log of `kind` since it was last read.
    async fn log(&self, kind: &str) -> Vec<Value> {
        let session = self.client.session_id().await.unwrap().unwrap();
        let logs: Value = reqwest::Client::new()
            .post(format!("{}/session/{session}/se/log", self.driver_url))
            .json(&json!({"type": kind}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        logs["value"]
            .as_array()
            .unwrap_or_else(|| panic!("no {kind} log: {logs}"))
            .clone()
    }

    /// Saves a screenshot as `<test>.png` in the tests' output folder
    /// (`target/tmp/board/`, beside cargo's `CARGO_TARGET_TMPDIR`), so a
    /// failure can be looked at; its path.
    pub async fn screenshot(&self) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        // The test binary is <target>/<profile>/deps/<name>.
        let exe = std::env::current_exe().unwrap();
        let target = exe.ancestors().nth(3).unwrap();
        let dir = target.join("tmp").join("board");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.png", self.name));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Ends the session, the browser and the driver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
        // Drop ends whatever is left.
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Also when a test fails before close(): the driver's whole group,
        // the browser's processes included.
        end_group(self.driver.id());
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Kills process group `group`.
fn end_group(group: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A detached shell that ends process group `group` and removes `profile`
/// once this test process is gone, however it ended (a kill included).
fn outlive_guard(group: u32, profile: &std::path::Path) {
    let script = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
        kill -KILL -- "-$2" 2>/dev/null
        rm -rf "$3"
    "#;
    let _ = Command::new("setsid")
        .args(["-f", "sh", "-c", script, "browser-guard"])
        .arg(std::process::id().to_string())
        .arg(group.to_string())
        .arg(profile)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn chromium() -> String {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|path| std::path::Path::new(path).exists())
        .expect("chromium is needed for the board tests (apt-get install chromium; see .ci/run)")
        .to_owned()
}

/// A proxy that answers every request with 403 and counts it.
async fn refusing_proxy() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut request = [0_u8; 1024];
                let read = socket.read(&mut request).await.unwrap_or(0);
                if read > 0 {
                    let line = String::from_utf8_lossy(&request[..read]);
                    let line = line.lines().next().unwrap_or_default().to_owned();
                    eprintln!("refused by the browser's proxy: {line}");
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
            });
        }
    });
    (addr, count)
}
