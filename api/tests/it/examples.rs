//! The client examples in `examples/`, run as their READMEs say against a
//! real server: the Python worker (httpx), the cron job under
//! `vantage-sync run`, and the TypeScript dashboard (Apollo Client,
//! graphql-ws, graphql-sse, types from graphql-codegen).
//! Missing tools fail these tests rather than skip them: CI installs them,
//! and an example nobody runs goes stale unnoticed.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::{Instant, timeout};
use vantage_sync_testkit::{TestApp, subscriptions_active};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// `command`'s output, failing the test if it does not end within `limit`.
async fn output(command: &mut Command, limit: Duration) -> Output {
    let run = command.kill_on_drop(true).output();
    match timeout(limit, run).await {
        Ok(output) => output.unwrap(),
        Err(_) => panic!("{command:?} did not end within {limit:?}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// --- The Python worker -----------------------------------------------------

/// A Python 3 that can import httpx. Debian's python3-httpx installs into
/// /usr/bin/python3, which a pyenv or virtualenv `python3` on the PATH
/// hides, so both are tried.
async fn python_with_httpx() -> &'static str {
    for python in ["python3", "/usr/bin/python3"] {
        let imported = Command::new(python)
            .args(["-c", "import httpx"])
            .output()
            .await
            .is_ok_and(|output| output.status.success());
        if imported {
            return python;
        }
    }
    panic!(
        "the Python worker example needs python3 with httpx: install the Debian package \
         python3-httpx (apt-get install python3-httpx, as .ci/run does) or pip install httpx"
    );
}

/// What a run of the worker printed, and how it ended.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `worker.py args` against `url` with a service_role token.
async fn worker(app: &TestApp, url: &str, args: &[&str]) -> Run {
    let python = python_with_httpx().await;
    let output = output(
        Command::new(python)
            .arg(examples().join("python-worker/worker.py"))
            .args(args)
            .env("VANTAGE_SYNC_URL", url)
            .env("VANTAGE_SYNC_TOKEN", app.token("service_role"))
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        Duration::from_secs(60),
    )
    .await;
    Run {
        code: output.status.code(),
        stdout: text(&output.stdout),
        stderr: text(&output.stderr),
    }
}

async fn state(app: &TestApp, resource: &str) -> Value {
    app.query(
        "service_role",
        "query($r: String!) { syncState(resource: $r) { lastSyncStatus recordsSynced
            recordsCreated recordsUpdated errors { code message } } }",
        json!({"r": resource}),
    )
    .await["data"]["syncState"]
        .clone()
}

/// The statuses of `resource`'s events in the log, oldest first.
async fn history(app: &TestApp, resource: &str) -> Vec<String> {
    let body = app
        .query(
            "service_role",
            "query($r: String!) { syncHistory(resource: $r, first: 100) {
                edges { node { status } } } }",
            json!({"r": resource}),
        )
        .await;
    body["data"]["syncHistory"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|edge| edge["node"]["status"].as_str().unwrap_or("-").to_owned())
        .collect()
}

#[tokio::test]
async fn the_python_worker_records_a_run_a_failure_and_a_refusal() {
    let app = TestApp::spawn().await;

    // The server's address, as a cron line would give it.
    let run = worker(&app, &app.url(""), &["funds"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "started funds\ncompleted funds synced=3 created=1 updated=2\n"
    );
    assert_eq!(
        state(&app, "funds").await,
        json!({"lastSyncStatus": "SUCCESS", "recordsSynced": 3, "recordsCreated": 1,
            "recordsUpdated": 2, "errors": []})
    );

    // Told to fail: the failure is recorded with its errors, and the
    // worker's exit code says the job failed. The endpoint works as well.
    let run = worker(&app, &app.url("/graphql"), &["accounts", "--fail"]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.stdout, "started accounts\nfailed accounts errors=1\n");
    let failed = state(&app, "accounts").await;
    assert_eq!(failed["lastSyncStatus"], "FAILED");
    assert_eq!(
        failed["errors"],
        json!([{"code": "SOURCE_UNAVAILABLE", "message": "the source answered HTTP 500"}])
    );

    // Another run holds the resource: the start is refused, said on
    // standard error, and the job does not pretend it ran.
    app.sql("SELECT start_vantage_sync('cashflows')").await;
    let run = worker(&app, &app.url(""), &["cashflows"]).await;
    assert_eq!(run.code, Some(3), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("ALREADY_RUNNING"), "{}", run.stderr);
}

#[tokio::test]
async fn the_python_worker_retry_demo_is_a_replay_applied_once() {
    let app = TestApp::spawn().await;
    let run = worker(&app, &app.url(""), &["valuations", "--retry-demo"]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "started valuations\n\
         completed valuations synced=3 created=1 updated=2\n\
         retried completeSync valuations replayed=true same_answer=true\n"
    );
    assert_eq!(state(&app, "valuations").await["lastSyncStatus"], "SUCCESS");
    let log = history(&app, "valuations").await;
    assert_eq!(
        log.iter().filter(|status| *status == "SUCCESS").count(),
        1,
        "{log:?}"
    );
}

/// Forwards requests to the server, but loses the answer to the first
/// `completeSync` after the server applied it (as a dropped connection or
/// a proxy timing out would), answering 503 instead; records each
/// request's operation and `Idempotency-Key`.
#[derive(Clone)]
struct LossyProxy {
    upstream: String,
    client: reqwest::Client,
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

async fn lossy(State(proxy): State<LossyProxy>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let request = text(&body);
    let operation = ["startSync", "completeSync", "failSync"]
        .into_iter()
        .find(|name| request.contains(name))
        .unwrap_or("other");
    let key = header("idempotency-key");
    let first_completion = {
        let mut seen = proxy.seen.lock().unwrap();
        let first = operation == "completeSync" && !seen.iter().any(|(op, _)| op == operation);
        seen.push((operation.to_owned(), key.clone()));
        first
    };
    let answer = proxy
        .client
        .post(proxy.upstream.as_str())
        .header("authorization", header("authorization"))
        .header("content-type", header("content-type"))
        .header("idempotency-key", key)
        .body(body)
        .send()
        .await
        .unwrap();
    if first_completion {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let status = answer.status();
    let replayed = answer.headers().get("idempotent-replayed").cloned();
    let mut response = (status, answer.bytes().await.unwrap()).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(replayed) = replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", replayed);
    }
    response
}

#[tokio::test]
async fn the_python_worker_retries_a_lost_answer_with_the_same_key() {
    let app = TestApp::spawn().await;
    let proxy = LossyProxy {
        upstream: app.url("/graphql"),
        client: reqwest::Client::new(),
        seen: Arc::default(),
    };
    let seen = Arc::clone(&proxy.seen);
    let router = axum::Router::new()
        .route("/graphql", axum::routing::post(lossy))
        .with_state(proxy);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let run = worker(&app, &format!("http://{addr}"), &["investors"]).await;
    server.abort();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout,
        "started investors\ncompleted investors synced=3 created=1 updated=2\n"
    );
    assert!(run.stderr.contains("retrying in"), "{}", run.stderr);
    let seen = seen.lock().unwrap().clone();
    let operations: Vec<&str> = seen.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(operations, ["startSync", "completeSync", "completeSync"]);
    // The retry reused the completion's key; the start had its own.
    assert_eq!(seen[1].1, seen[2].1);
    assert_ne!(seen[0].1, seen[1].1);
    assert!(!seen[1].1.is_empty());
    // Applied once: without the key the retry would have been refused
    // with NOT_RUNNING, and the worker would have failed.
    let log = history(&app, "investors").await;
    assert_eq!(
        log.iter().filter(|status| *status == "SUCCESS").count(),
        1,
        "{log:?}"
    );
}

// --- The cron job ----------------------------------------------------------

/// The example crontab's line is a `vantage-sync run` the CLI takes, and
/// the example job, run by it, is recorded with the counts it writes to
/// the result file, or failed with the errors it writes there.
#[tokio::test]
async fn the_cron_example_job_is_recorded_by_vantage_sync_run() {
    use clap::Parser;
    let crontab = std::fs::read_to_string(examples().join("cron/crontab")).unwrap();
    let line = crontab
        .lines()
        .find(|line| !line.starts_with('#') && line.contains("vantage-sync run"))
        .expect("a vantage-sync run line in examples/cron/crontab");
    let readme = std::fs::read_to_string(examples().join("cron/README.md")).unwrap();
    assert!(readme.contains(line), "the README shows another line");
    let from = line.find("vantage-sync run").unwrap();
    let to = line[from..].find(" >>").map_or(line.len(), |to| from + to);
    let words: Vec<&str> = line[from..to].split_whitespace().collect();
    let cli = vantage_sync::cli::Cli::try_parse_from(words.iter()).unwrap_or_else(|error| {
        panic!("the crontab's command is refused: {error}");
    });
    let vantage_sync::cli::Command::Run(args) = cli.command else {
        panic!("not a run: {words:?}");
    };
    assert_eq!(args.resource, "funds");
    assert!(
        args.command
            .last()
            .is_some_and(|job| job.to_string_lossy().contains("sync-funds.sh")),
        "{:?}",
        args.command
    );

    let app = TestApp::spawn().await;
    let job = examples().join("cron/sync-funds.sh");
    let run = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vantage-sync"));
        command
            .args(["run", "funds", "--retry-secs", "5", "--"])
            .arg(job.as_os_str())
            .args(extra)
            .env("VANTAGE_SYNC_URL", app.url(""))
            .env("VANTAGE_SYNC_TOKEN", app.token("service_role"))
            .env_remove("VANTAGE_SYNC_RETRY_SECS");
        command
    };

    let done = output(&mut run(&[]), Duration::from_secs(60)).await;
    assert_eq!(done.status.code(), Some(0), "{}", text(&done.stderr));
    assert_eq!(
        text(&done.stdout),
        "sync-funds: 3 records, 1 new, 2 changed\n"
    );
    assert_eq!(
        state(&app, "funds").await,
        json!({"lastSyncStatus": "SUCCESS", "recordsSynced": 3, "recordsCreated": 1,
            "recordsUpdated": 2, "errors": []})
    );

    let failed = output(
        &mut run(&["/nonexistent/funds.csv"]),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    let state = state(&app, "funds").await;
    assert_eq!(state["lastSyncStatus"], "FAILED");
    let codes: Vec<&str> = state["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|error| error["code"].as_str())
        .collect();
    assert!(codes.contains(&"INPUT_MISSING"), "{state}");
}

// --- The TypeScript dashboard ------------------------------------------------

fn dashboard_dir() -> PathBuf {
    examples().join("typescript-dashboard")
}

/// Held by each test of the dashboard for its whole run: they install
/// into, generate into and run from one folder, and `npm ci` empties
/// node_modules first, so two at once break each other.
static DASHBOARD_FOLDER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `npm args` in `dir`; its output, the test failing if it does not
/// succeed.
pub(crate) async fn npm_in(dir: &Path, args: &[&str], limit: Duration) -> Output {
    let output = output(
        Command::new("npm")
            .args(args)
            .current_dir(dir)
            .env("npm_config_update_notifier", "false")
            .env("npm_config_fund", "false")
            .env("npm_config_audit", "false"),
        limit,
    )
    .await;
    assert!(
        output.status.success(),
        "npm {} failed:\n{}\n{}",
        args.join(" "),
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// `npm args` in the dashboard's folder.
async fn npm(args: &[&str], limit: Duration) -> Output {
    npm_in(&dashboard_dir(), args, limit).await
}

/// Node.js 20 or newer and npm, or a failure saying what to install.
pub(crate) async fn require_node() {
    const INSTALL: &str = "the TypeScript dashboard example and the GraphQL over HTTP audit \
        need Node.js 20 or newer and npm: install them (apt-get install nodejs npm, as .ci/run does, or from nodejs.org)";
    let node = Command::new("node").arg("--version").output().await;
    let npm = Command::new("npm").arg("--version").output().await;
    let (Ok(node), Ok(npm)) = (node, npm) else {
        panic!("{INSTALL}");
    };
    assert!(node.status.success() && npm.status.success(), "{INSTALL}");
    let version = text(&node.stdout);
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0);
    assert!(major >= 20, "{INSTALL}; this is Node.js {}", version.trim());
}

/// `npm ci` in `dir`, unless its node_modules was installed from this
/// very lock file: the lock file's text is kept beside the packages after
/// each install (npm ci empties node_modules first, so a failed one leaves
/// no stamp).
pub(crate) async fn npm_install(dir: &Path) {
    let lock = std::fs::read(dir.join("package-lock.json")).unwrap();
    let stamp = dir.join("node_modules/.installed-package-lock.json");
    if std::fs::read(&stamp).is_ok_and(|installed| installed == lock) {
        return;
    }
    npm_in(
        dir,
        &["ci", "--no-audit", "--no-fund"],
        Duration::from_secs(600),
    )
    .await;
    std::fs::write(stamp, lock).unwrap();
}

/// Starts the dashboard (`npm start`) against `app` as `authenticated`,
/// waiting for `changes` changes on each transport; its standard output
/// arrives line by line on the receiver.
fn start_dashboard(
    app: &TestApp,
    changes: usize,
    timeout_secs: u64,
    trusted: bool,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut child = Command::new("npm")
        .args(["start", "--silent", "--", &changes.to_string()])
        .current_dir(dashboard_dir())
        .env("VANTAGE_SYNC_URL", app.url(""))
        .env("VANTAGE_SYNC_TOKEN", app.token("authenticated"))
        .env("VANTAGE_SYNC_TIMEOUT_SECS", timeout_secs.to_string())
        .env(
            "VANTAGE_SYNC_TRUSTED_DOCUMENTS",
            if trusted { "1" } else { "0" },
        )
        .env("npm_config_update_notifier", "false")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let _ = lines_tx.send(line);
        }
    });
    (child, lines)
}

/// The child's exit code and standard error, once it ends.
async fn finish(child: tokio::process::Child, limit: Duration) -> (Option<i32>, String) {
    let output = match timeout(limit, child.wait_with_output()).await {
        Ok(output) => output.unwrap(),
        Err(_) => panic!("the dashboard did not end within {limit:?}"),
    };
    (output.status.code(), text(&output.stderr))
}

/// The dashboard's rows as the program prints them, from the API.
async fn expected_rows(app: &TestApp) -> Vec<String> {
    expected_rows_as(app, "authenticated").await
}

/// The dashboard's rows, read as `role`.
async fn expected_rows_as(app: &TestApp, role: &str) -> Vec<String> {
    let body = app
        .query(
            role,
            "{ syncStates { resource lastSyncStatus health recordsSynced lastSyncTime } }",
            json!({}),
        )
        .await;
    body["data"]["syncStates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            format!(
                "row {} {} {} synced={} last={}",
                row["resource"].as_str().unwrap(),
                row["lastSyncStatus"].as_str().unwrap(),
                row["health"].as_str().unwrap(),
                row["recordsSynced"],
                row["lastSyncTime"].as_str().unwrap_or("never"),
            )
        })
        .collect()
}

/// Runs the dashboard (`trusted`: by documentId only) through four
/// changes, checking it prints `rows`, then each change once per
/// transport, in commit order.
async fn follows_four_changes(app: &TestApp, rows: &[String], trusted: bool) {
    let (mut child, mut lines) = start_dashboard(app, 4, 60, trusted);
    // Changes are sent from the next one on: make them once both
    // subscriptions are live.
    let deadline = Instant::now() + Duration::from_secs(60);
    while subscriptions_active(&app.url("/metrics")).await < 2 {
        if let Some(status) = child.try_wait().unwrap() {
            let (_, stderr) = finish(child, Duration::from_secs(5)).await;
            panic!("the dashboard ended ({status}) before subscribing:\n{stderr}");
        }
        assert!(Instant::now() < deadline, "the dashboard did not subscribe");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for statement in [
        "SELECT start_vantage_sync('funds')",
        "SELECT complete_vantage_sync('funds', 5, 2, 3)",
        "SELECT start_vantage_sync('accounts')",
        r#"SELECT fail_vantage_sync('accounts', '[{"code": "HTTP_500", "message": "down"}]')"#,
    ] {
        app.sql(statement).await;
    }
    let (code, stderr) = finish(child, Duration::from_secs(60)).await;
    let mut printed = Vec::new();
    while let Some(line) = lines.recv().await {
        printed.push(line);
    }
    assert_eq!(code, Some(0), "{stderr}\n{printed:#?}");

    let changes = [
        "UPDATE funds RUNNING",
        "UPDATE funds SUCCESS",
        "UPDATE accounts RUNNING",
        "UPDATE accounts FAILED",
    ];
    let with_prefix = |prefix: &str| -> Vec<String> {
        printed
            .iter()
            .filter(|line| line.starts_with(prefix))
            .cloned()
            .collect()
    };
    assert_eq!(
        printed.len(),
        rows.len() + 2 * changes.len() + 1,
        "{printed:#?}"
    );
    // The rows come first, as the API lists them; each transport's
    // changes arrive in commit order (the two transports interleave).
    assert_eq!(printed[..rows.len()], rows[..], "{printed:#?}");
    assert_eq!(with_prefix("ws "), changes.map(|c| format!("ws {c}")));
    assert_eq!(with_prefix("sse "), changes.map(|c| format!("sse {c}")));
    assert_eq!(printed.last().unwrap(), "done ws=4 sse=4");
}

#[tokio::test]
async fn the_typescript_dashboard_builds_and_follows_changes() {
    require_node().await;
    let _folder = DASHBOARD_FOLDER.lock().await;
    let started = Instant::now();
    npm_install(&dashboard_dir()).await;
    let installed = started.elapsed();
    // Types from the schema as it is now, then a strict type check: a
    // schema change that breaks the dashboard's operations fails here.
    npm(&["run", "--silent", "codegen"], Duration::from_secs(120)).await;
    npm(&["run", "--silent", "typecheck"], Duration::from_secs(120)).await;

    let app = TestApp::spawn().await;
    for statement in [
        "SELECT start_vantage_sync('funds')",
        "SELECT complete_vantage_sync('funds', 3, 1, 2)",
        "SELECT start_vantage_sync('accounts')",
        r#"SELECT fail_vantage_sync('accounts', '[{"code": "HTTP_500", "message": "down"}]')"#,
    ] {
        app.sql(statement).await;
    }
    let rows = expected_rows(&app).await;
    assert!(rows.len() >= 2, "{rows:?}");

    follows_four_changes(&app, &rows, false).await;

    // With nothing happening, it gives up when told to, and says so.
    let (child, _lines) = start_dashboard(&app, 1, 2, false);
    let (code, stderr) = finish(child, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("timed out after 2 s: ws 0/1, sse 0/1 changes"),
        "{stderr}"
    );
    eprintln!(
        "npm ci {installed:?}; the whole test {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn apollo_clients_persisted_queries_send_only_the_hash_once_known() {
    require_node().await;
    let _folder = DASHBOARD_FOLDER.lock().await;
    npm_install(&dashboard_dir()).await;
    npm(&["run", "--silent", "codegen"], Duration::from_secs(120)).await;
    let app = TestApp::spawn().await;
    let run = output(
        Command::new("npm")
            .args(["run", "--silent", "persisted"])
            .current_dir(dashboard_dir())
            .env("VANTAGE_SYNC_URL", app.url(""))
            .env("VANTAGE_SYNC_TOKEN", app.token("authenticated"))
            .env("npm_config_update_notifier", "false"),
        Duration::from_secs(120),
    )
    .await;
    assert!(
        run.status.success(),
        "{}\n{}",
        text(&run.stdout),
        text(&run.stderr)
    );
    let lines: Vec<Value> = text(&run.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for (line, hashed_method) in lines.iter().zip(["POST", "GET"]) {
        // The hash alone (unknown on the first transport; on the second,
        // the server remembers it from the first), then, where unknown,
        // with the document, then the hash alone again.
        let sent = line["sent"].as_array().unwrap();
        let last = sent.last().unwrap();
        assert_eq!(last["method"], hashed_method, "{line}");
        assert_eq!(last["document"], false, "{line}");
        assert_eq!(sent[0]["document"], false, "{line}");
        assert_eq!(line["same"], true, "{line}");
        assert!(line["rows"].as_u64().unwrap() >= 7, "{line}");
    }
    // POST: hash (miss), hash and document, hash (hit). GET: the server
    // knows the hash already: hash (hit), hash (hit).
    assert_eq!(lines[0]["sent"].as_array().unwrap().len(), 3, "{lines:#?}");
    assert_eq!(lines[1]["sent"].as_array().unwrap().len(), 2, "{lines:#?}");
    let metrics = app.metrics().await;
    for (result, count) in [("miss", 1), ("registered", 1), ("hit", 3)] {
        let line = format!("vantage_sync_persisted_queries_total{{result=\"{result}\"}} {count}");
        assert!(metrics.contains(&line), "no {line:?} in\n{metrics}");
    }
}

#[tokio::test]
async fn the_typescript_dashboard_runs_on_its_generated_trusted_documents() {
    use std::sync::Arc;
    use vantage_sync::graphql::documents::TrustedDocuments;
    require_node().await;
    let _folder = DASHBOARD_FOLDER.lock().await;
    npm_install(&dashboard_dir()).await;
    // graphql-codegen's client preset writes the manifest of the
    // dashboard's operations; the server trusts exactly those.
    npm(&["run", "--silent", "codegen"], Duration::from_secs(120)).await;
    let manifest = dashboard_dir().join("src/generated/trusted/persisted-documents.json");
    let trusted = TrustedDocuments::load(&manifest).unwrap();
    assert_eq!(trusted.len(), 2, "the dashboard's query and subscription");
    let app = TestApp::spawn_with(vantage_sync_testkit::TestDb::migrated().await, |config| {
        config.documents.trusted = Some(Arc::new(trusted));
    })
    .await;
    let rows = expected_rows_as(&app, "service_role").await;

    follows_four_changes(&app, &rows, true).await;

    // The same token with a document of its own is refused, and so is the
    // dashboard sending its documents' text instead of their ids (the
    // manifest holds them as codegen prints them, with __typename).
    let bearer = format!("Bearer {}", app.token("authenticated"));
    let (status, refused) = app
        .post(
            Some(&bearer),
            &json!({"query": "{ syncStates { resource lastSyncStatus health recordsSynced lastSyncTime } }"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(
        refused["errors"][0]["extensions"]["code"], "PERSISTED_QUERY_REQUIRED",
        "{refused}"
    );
    let (child, _lines) = start_dashboard(&app, 1, 20, false);
    let (code, stderr) = finish(child, Duration::from_secs(60)).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("PERSISTED_QUERY_REQUIRED") || stderr.contains("trusted documents"),
        "{stderr}"
    );
}
