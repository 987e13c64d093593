//! A webhook receiver on a free loopback port: it records every request it
//! gets and answers with the statuses a test scripts (then 200), optionally
//! after a delay. It can be stopped and started again on the same port, and
//! it checks Standard Webhooks signatures with `openssl`, independently of
//! the server's own signing code.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;
use tokio::sync::oneshot;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// The path it was posted to.
    pub path: String,
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
    /// `webhook-signature`.
    pub signature: String,
    /// `traceparent` (W3C Trace Context), when sent.
    pub traceparent: Option<String>,
    /// The raw body.
    pub body: String,
    /// When it arrived.
    pub at: Instant,
    /// The status it was answered with.
    pub answered: u16,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

#[derive(Default)]
struct Script {
    received: Vec<Received>,
    /// Statuses to answer, in order, before answering 200.
    statuses: Vec<u16>,
    delay: Duration,
}

/// The receiver.
pub struct Receiver {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    stop: Option<oneshot::Sender<()>>,
}

impl Receiver {
    /// Starts on a free port.
    pub async fn start() -> Receiver {
        let mut receiver = Receiver {
            addr: "127.0.0.1:0".parse().unwrap(),
            script: Arc::default(),
            stop: None,
        };
        receiver.listen().await;
        receiver
    }

    async fn listen(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/{*path}", post(receive))
            .with_state(self.script.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.stop = Some(stop);
    }

    /// Stops listening (connections are refused until [`Self::resume`]).
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&mut self) {
        for _ in 0..50 {
            if tokio::net::TcpListener::bind(self.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.listen().await;
    }

    /// The URL of `path` here.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers `statuses` to the next requests, in order, then 200 again.
    pub fn answer(&self, statuses: &[u16]) {
        self.script.lock().unwrap().statuses = statuses.to_vec();
    }

    /// Waits `delay` before answering each request.
    pub fn delay(&self, delay: Duration) {
        self.script.lock().unwrap().delay = delay;
    }

    /// Everything received so far on `path`.
    pub fn received(&self, path: &str) -> Vec<Received> {
        let script = self.script.lock().unwrap();
        script
            .received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Waits until `done` holds for what `path` received, or `timeout`.
    pub async fn wait_for(
        &self,
        path: &str,
        timeout: Duration,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.received(path);
            if done(&received) || Instant::now() >= deadline {
                return received;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn receive(
    State(script): State<Arc<Mutex<Script>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (status, delay) = {
        let mut script = script.lock().unwrap();
        let status = if script.statuses.is_empty() {
            200
        } else {
            script.statuses.remove(0)
        };
        (status, script.delay)
    };
    tokio::time::sleep(delay).await;
    script.lock().unwrap().received.push(Received {
        path: uri.path().to_owned(),
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
        at,
        answered: status,
    });
    StatusCode::from_u16(status).unwrap()
}

/// Whether `received` carries a valid Standard Webhooks signature made with
/// `secret` (`whsec_<base64>`), computed with `openssl`.
pub fn signature_is_valid(secret: &str, received: &Received) -> bool {
    let key = openssl(
        &["base64", "-d", "-A"],
        secret.strip_prefix("whsec_").unwrap().as_bytes(),
    );
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let signed = format!("{}.{}.{}", received.id, received.timestamp, received.body);
    let mac = openssl(
        &[
            "dgst",
            "-sha256",
            "-mac",
            "HMAC",
            "-macopt",
            &format!("hexkey:{hex}"),
            "-binary",
        ],
        signed.as_bytes(),
    );
    let expected = String::from_utf8(openssl(&["base64", "-A"], &mac)).unwrap();
    received
        .signature
        .split(' ')
        .any(|candidate| candidate == format!("v1,{}", expected.trim()))
}

fn openssl(args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl is needed for the webhook tests");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "openssl {args:?} failed");
    output.stdout
}
