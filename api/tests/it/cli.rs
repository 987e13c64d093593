//! The `vantage-sync` binary as an operator runs it: zero-configuration
//! first run on a managed PostgreSQL, configuration errors, tokens.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_vantage-sync");

pub(crate) fn vantage_sync() -> Command {
    let mut command = Command::new(BIN);
    for variable in [
        "DATABASE_URL",
        "JWT_SECRET",
        "JWKS_URL",
        "JWKS_FILE",
        "JWT_ISSUER",
        "JWT_AUDIENCE",
        "JWT_ROLE_CLAIM",
        "LISTEN_DATABASE_URL",
        "CORS_ALLOWED_ORIGINS",
        "LISTEN_ADDR",
        "VANTAGE_SYNC_DATA_DIR",
    ] {
        command.env_remove(variable);
    }
    command.env("RUST_LOG", "info");
    command
}

/// A data directory the `postgres` OS user can reach (not under /root).
pub(crate) fn data_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vantage-sync-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub(crate) struct Serving {
    pub(crate) child: Child,
    pub(crate) addr: String,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

/// Starts `serve` and waits until it announces its address in its
/// `--ready-file`.
/// The arguments the README runs the binary with.
pub(crate) const README_SERVE_ARGS: [&str; 1] = ["serve"];

/// `serve` as the README runs it, told only where to listen (any free
/// port), keep its data and announce its address.
fn serve(dir: &Path) -> Serving {
    serve_with(dir, &[])
}

/// [`serve`] with environment variables of the test's own.
pub(crate) fn serve_with(dir: &Path, env: &[(&str, &str)]) -> Serving {
    let ready = dir.with_extension("ready.json");
    let _ = std::fs::remove_file(&ready);
    let mut child = vantage_sync()
        .envs(env.iter().copied())
        .args(README_SERVE_ARGS)
        .args(["--listen-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (send, log) = mpsc::channel();
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no stderr pipe");
    };
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if send.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(addr) = vantage_sync::cli::announced_addr(&ready) {
            let _ = std::fs::remove_file(&ready);
            return Serving {
                child,
                addr: addr.to_string(),
                log,
                lines: Vec::new(),
            };
        }
        if std::time::Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            let lines: Vec<String> = log.try_iter().collect();
            panic!("serve did not announce its address:\n{}", lines.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Serving {
    /// The log so far, read until a line containing `needle` (at most 10 s).
    fn log_until(&mut self, needle: &str) -> &[String] {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.lines.iter().any(|line| line.contains(needle)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(_) => panic!("no log line with {needle:?} in:\n{}", self.lines.join("\n")),
            }
        }
        &self.lines
    }

    /// SIGTERM, then the exit status and every log line.
    pub(crate) fn stop(mut self) -> (bool, Vec<String>) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(5)) {
            self.lines.push(line);
        }
        (exit.success(), std::mem::take(&mut self.lines))
    }
}

/// A test that fails before `stop` still stops its server (and with it
/// the managed PostgreSQL), rather than leave both running.
impl Drop for Serving {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

pub(crate) fn token(dir: &Path, role: &str) -> String {
    let output = vantage_sync()
        .args(["token", "--role", role, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

async fn graphql(addr: &str, token: &str, query: &str) -> Value {
    reqwest::Client::new()
        .post(format!("http://{addr}/graphql"))
        .bearer_auth(token)
        .json(&json!({"query": query}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn managed_postgres_running(dir: &Path) -> bool {
    dir.join("pgdata/postmaster.pid").exists()
}

/// With no DATABASE_URL: a managed PostgreSQL is created, serves, stops
/// with the server, and a second start reuses its data and secret.
#[tokio::test]
async fn zero_config_first_run_and_second_run() {
    let dir = data_dir("first-run");
    let mut first = serve(&dir);
    let started = first.log_until("vantage-sync token --role authenticated");
    assert!(
        started
            .iter()
            .any(|line| line.contains("creating the managed PostgreSQL cluster"))
    );
    assert!(managed_postgres_running(&dir));
    // A ready-to-open status board link, signed in (as a reader) by its
    // fragment.
    let started = first.log_until("status board").to_vec();
    let link = started
        .iter()
        .find_map(|line| {
            line.split_whitespace()
                .find(|word| word.contains("/#token="))
        })
        .unwrap_or_else(|| panic!("no board link in:\n{}", started.join("\n")))
        .to_owned();
    let (page, board_token) = link.split_once("#token=").unwrap();
    assert_eq!(page, format!("http://{}/", first.addr));
    let board = reqwest::get(page).await.unwrap();
    assert_eq!(board.status(), reqwest::StatusCode::OK);
    assert!(board.text().await.unwrap().contains("/board.js"));
    let body = graphql(
        &first.addr,
        board_token,
        "{ syncState(resource: \"funds\") { resource } }",
    )
    .await;
    assert_eq!(body, json!({"data": {"syncState": {"resource": "funds"}}}));
    let body = graphql(
        &first.addr,
        board_token,
        "mutation { registerResource(resource: \"x\") { resource } }",
    )
    .await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "FORBIDDEN");
    let reader = token(&dir, "authenticated");
    let writer = token(&dir, "service_role");
    let body = graphql(
        &first.addr,
        &reader,
        "{ syncStats { totalResources neverRun } }",
    )
    .await;
    assert_eq!(
        body,
        json!({"data": {"syncStats": {"totalResources": 7, "neverRun": 7}}})
    );
    let body = graphql(
        &first.addr,
        &writer,
        "mutation { startSync(resource: \"accounts\") { lastSyncStatus } }",
    )
    .await;
    assert_eq!(
        body,
        json!({"data": {"startSync": {"lastSyncStatus": "RUNNING"}}})
    );
    let (clean, lines) = first.stop();
    assert!(clean, "serve exited with an error:\n{}", lines.join("\n"));
    // A normal shutdown says nothing alarming.
    let alarming: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains(" WARN ") || line.contains(" ERROR "))
        .collect();
    assert!(alarming.is_empty(), "shutdown logged {alarming:#?}");
    assert!(
        lines
            .iter()
            .any(|line| line.contains("stopped the managed PostgreSQL"))
    );
    assert!(
        !managed_postgres_running(&dir),
        "the managed PostgreSQL outlived the server"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.join("jwt_secret"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let mut second = serve(&dir);
    assert!(
        !second
            .log_until("vantage-sync token --role authenticated")
            .iter()
            .any(|line| line.contains("creating the managed"))
    );
    // Same secret: the first run's token still works; same data.
    let body = graphql(
        &second.addr,
        &reader,
        "{ syncState(resource: \"accounts\") { lastSyncStatus } }",
    )
    .await;
    assert_eq!(
        body,
        json!({"data": {"syncState": {"lastSyncStatus": "RUNNING"}}})
    );
    let (clean, _) = second.stop();
    assert!(clean);
    assert!(!managed_postgres_running(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn fails_with(args: &[&str], env: &[(&str, &str)], expected: &str) {
    let output = vantage_sync()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in:\n{stderr}"
    );
}

#[test]
fn configuration_errors_say_what_to_fix() {
    let url = ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none");
    let secret = ("JWT_SECRET", "0123456789abcdef0123456789abcdef");
    fails_with(&["serve"], &[url], "JWT_SECRET");
    fails_with(&["serve"], &[url, ("JWT_SECRET", "short")], "at least 32");
    fails_with(
        &["serve", "--max-query-depth", "5"],
        &[url, secret],
        "--max-query-depth",
    );
    // A flag other servers have points at the one this one has.
    fails_with(&["serve", "--port", "8081"], &[], "--listen-addr HOST:PORT");
    fails_with(&["serve", "--dsn", "x"], &[], "--database-url URL");
    fails_with(
        &["serve", "--listen-addr", "nowhere"],
        &[],
        "invalid socket address",
    );
    fails_with(
        &["token", "--role", "postgres"],
        &[secret],
        "anon, authenticated or service_role",
    );
    fails_with(
        &["token", "--role", "anon", "--ttl", "5y"],
        &[secret],
        "unknown unit",
    );
    fails_with(&["migrate", "up"], &[], "DATABASE_URL");
    fails_with(&["serve"], &[url], "JWKS_URL or JWKS_FILE");
    fails_with(
        &["serve", "--jwks-file", "/nonexistent/jwks.json"],
        &[url],
        "cannot read /nonexistent/jwks.json",
    );
    fails_with(
        &["serve", "--jwks-url", "ftp://example.com/keys"],
        &[url],
        "must be an https:// (or http://) URL",
    );
    fails_with(
        &[
            "serve",
            "--cors-allowed-origins",
            "https://dash.example.com/",
        ],
        &[url, secret],
        "without a path or trailing slash",
    );
    fails_with(
        &["serve", "--db-prepared-statements", "sometimes"],
        &[url, secret],
        "auto",
    );
    fails_with(
        &["serve", "--feed-poll-secs", "0"],
        &[url, secret],
        "--feed-poll-secs",
    );
    fails_with(
        &["serve"],
        &[url, secret, ("WEBHOOK_RETRY_HOURS", "0")],
        "--webhook-retry-hours",
    );
    fails_with(
        &[
            "token",
            "--role",
            "anon",
            "--private-key",
            "/nonexistent.pem",
        ],
        &[],
        "cannot read /nonexistent.pem",
    );
}

/// `token --private-key` signs with the key's own algorithm, and `jwks
/// --private-key` prints the set that verifies it, under the same key id.
#[tokio::test]
async fn private_key_tokens_verify_against_the_printed_key_set() {
    let dir = data_dir("keys");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, args, alg) in [
        (
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"][..],
            "ES256",
        ),
        ("ed", &["-algorithm", "ED25519"][..], "EdDSA"),
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
            "RS256",
        ),
    ] {
        let pem = dir.join(format!("{name}.pem"));
        let status = Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .arg("-out")
            .arg(&pem)
            .status()
            .unwrap();
        assert!(status.success());
        let output = vantage_sync()
            .args(["jwks", "--private-key"])
            .arg(&pem)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let set: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(set["keys"][0]["alg"], alg);
        assert_eq!(set["keys"][0]["use"], "sig");
        assert!(
            set["keys"][0].get("d").is_none(),
            "private material printed"
        );
        let kid = set["keys"][0]["kid"].as_str().unwrap().to_owned();
        let jwks_file = dir.join(format!("{name}.json"));
        std::fs::write(&jwks_file, &output.stdout).unwrap();

        let output = vantage_sync()
            .args([
                "token",
                "--role",
                "service_role",
                "--sub",
                "etl-9",
                "--private-key",
            ])
            .arg(&pem)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout).unwrap();
        let header: Value =
            serde_json::from_slice(&decode_base64url(token.split('.').next().unwrap())).unwrap();
        assert_eq!(header["alg"], alg);
        assert_eq!(header["kid"], kid.as_str());

        let keys = vantage_sync::auth::TokenKeys::from_settings(vantage_sync::auth::KeySettings {
            secret: None,
            jwks: Some((
                vantage_sync::auth::JwksSource::File(jwks_file),
                Duration::from_secs(600),
            )),
            rules: vantage_sync::auth::ClaimRules::default(),
        })
        .unwrap();
        let caller = keys.verify(token.trim()).await.unwrap();
        assert_eq!(caller.role, vantage_sync::auth::Role::ServiceRole, "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// As a login role that cannot become service_role, `serve` exits
/// non-zero and says which GRANT to run.
#[tokio::test]
async fn serve_refuses_a_login_role_without_a_grant() {
    use sea_orm::ConnectionTrait;
    let dir = data_dir("grant");
    let managed = vantage_sync::managed_postgres::ManagedPostgres::start(&dir)
        .await
        .unwrap();
    let url = managed.database_url();
    vantage_sync::db::migrate::apply_pending(&url)
        .await
        .unwrap();
    let admin = vantage_sync::db::connect_session(&url).await.unwrap();
    admin
        .execute_unprepared(
            "CREATE ROLE vs_cli_login LOGIN NOINHERIT; GRANT anon, authenticated TO vs_cli_login",
        )
        .await
        .unwrap();
    admin.close().await.unwrap();
    let login_url = url.replacen("postgres://postgres@", "postgres://vs_cli_login@", 1);
    let output = vantage_sync()
        .args(["serve", "--no-migrate", "--listen-addr", "127.0.0.1:0"])
        .env("DATABASE_URL", &login_url)
        .env("JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    managed.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("run `GRANT service_role TO vs_cli_login;` as the database owner"),
        "{stderr}"
    );
}

#[test]
fn token_and_schema_commands() {
    let output = vantage_sync()
        .args([
            "token",
            "--role",
            "service_role",
            "--ttl",
            "90s",
            "--sub",
            "etl-1",
        ])
        .env("JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    let claims = decode_base64url(payload);
    let claims: Value = serde_json::from_slice(&claims).unwrap();
    assert_eq!(claims["role"], "service_role");
    assert_eq!(claims["sub"], "etl-1");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        90
    );

    let output = vantage_sync().arg("schema").output().unwrap();
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema.graphql"))
            .unwrap();
    assert_eq!(String::from_utf8(output.stdout).unwrap(), committed);
}

/// `--version` names the commit the binary was built from.
#[test]
fn version_names_the_commit() {
    let output = vantage_sync().arg("--version").output().unwrap();
    assert!(output.status.success());
    let version = String::from_utf8(output.stdout).unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8(output.stdout).unwrap().trim().to_owned());
    let commit = head.unwrap_or_else(|| "unknown".into());
    assert_eq!(
        version.trim(),
        format!(
            "vantage-sync {} (commit {commit})",
            env!("CARGO_PKG_VERSION")
        )
    );
}

fn decode_base64url(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        _ => 63,
    };
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        bits = (bits << 6) | u32::from(value(c));
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}
