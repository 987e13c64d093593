//! `vantage-sync run`, the binary as a crontab runs it, around `sh -c`
//! jobs, against a real server: what each end of a job records, its
//! streams and exit code passed through, signals passed on, and the job
//! run even when the API cannot be reached.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use vantage_sync_testkit::{TestApp, TestDb, state_row};

const BIN: &str = env!("CARGO_BIN_EXE_vantage-sync");

/// Longest any one run of the wrapper may take here.
const RUN_WITHIN: Duration = Duration::from_secs(60);

/// `vantage-sync run RESOURCE ARGS -- sh -c JOB` against `url` with
/// `token`, nothing from the test's own environment.
fn wrapper(url: &str, token: &str, resource: &str, args: &[&str], job: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_remove("VANTAGE_SYNC_URL")
        .env_remove("VANTAGE_SYNC_TOKEN")
        .env_remove("VANTAGE_SYNC_RETRY_SECS")
        .args(["run", resource, "--url", url, "--token", token])
        .args(args)
        .args(["--", "sh", "-c", job])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn finish(mut command: Command) -> Output {
    tokio::time::timeout(RUN_WITHIN, command.output())
        .await
        .expect("vantage-sync run did not exit")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A directory of the test's own for the files its jobs write.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "vantage-sync-run-test-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn state(app: &TestApp, resource: &str) -> Value {
    state_row(&mut app.db.connect().await, resource).await
}

/// Waits until `path` exists.
async fn appears(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether process `pid` has ended (a zombie has: it only waits to be
/// reaped).
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// A loopback port where nothing listens.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_job_that_succeeds_is_recorded_with_its_counts() {
    let app = TestApp::spawn().await;
    let dir = scratch("success");
    let job = format!(
        r#"echo "result file: $VANTAGE_SYNC_RESULT" > {dir}/seen
           echo "token: ${{VANTAGE_SYNC_TOKEN:-none}}"
           read line && echo "read: $line"
           echo synced from the source
           printf '{{"recordsSynced": 10, "recordsCreated": 4, "recordsUpdated": 5}}' > "$VANTAGE_SYNC_RESULT""#,
        dir = dir.display()
    );
    // The URL and token from the environment, as a crontab would set them.
    let mut command = from_environment(&app, "accounts", &job);
    let mut wrapper = command.stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = wrapper.stdin.take().unwrap();
    stdin.write_all(b"line from stdin\n").await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(RUN_WITHIN, wrapper.wait_with_output())
        .await
        .expect("vantage-sync run did not exit")
        .unwrap();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("synced from the source"), "{stdout}");
    assert!(stdout.contains("read: line from stdin"), "{stdout}");
    // The wrapper says nothing when all is well, and keeps its token.
    assert!(!stderr.contains("vantage-sync run:"), "{stderr}");
    assert!(stdout.contains("token: none"), "{stdout}");
    let row = state(&app, "accounts").await;
    assert_eq!(row["last_sync_status"], "success", "{row}");
    assert_eq!(
        [
            &row["records_synced"],
            &row["records_created"],
            &row["records_updated"]
        ],
        [&json!(10), &json!(4), &json!(5)]
    );
    // The result file was the job's, in a directory removed afterwards.
    let seen = std::fs::read_to_string(dir.join("seen")).unwrap();
    let path = PathBuf::from(seen.trim().strip_prefix("result file: ").unwrap());
    assert!(path.is_absolute(), "{seen}");
    assert!(!path.parent().unwrap().exists(), "{seen} is still there");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The wrapper with its token in `VANTAGE_SYNC_TOKEN` and its URL, the
/// endpoint itself, in `VANTAGE_SYNC_URL`.
fn from_environment(app: &TestApp, resource: &str, job: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("VANTAGE_SYNC_URL", app.url("/graphql"))
        .env("VANTAGE_SYNC_TOKEN", app.token("service_role"))
        .env_remove("VANTAGE_SYNC_RETRY_SECS")
        .args(["run", resource, "--", "sh", "-c", job])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn a_job_that_fails_is_recorded_with_its_exit_code_and_stderr() {
    let app = TestApp::spawn().await;
    let job = r#"echo 'fetching funds' >&2
                 echo 'HTTP 503 from the source' >&2
                 printf '{"errors": [{"code": "HTTP_503", "message": "Vantage unavailable", "recordId": "fund-17"}]}' > "$VANTAGE_SYNC_RESULT"
                 exit 3"#;
    let output = finish(wrapper(
        &app.url(""),
        &app.token("service_role"),
        "funds",
        &[],
        job,
    ))
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    // Standard error passed through as well as kept.
    assert!(stderr.contains("HTTP 503 from the source"), "{stderr}");
    let row = state(&app, "funds").await;
    assert_eq!(row["last_sync_status"], "failed", "{row}");
    let errors = row["errors"].as_array().unwrap();
    assert_eq!(errors[0]["code"], "EXIT_3", "{row}");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("code 3"),
        "{row}"
    );
    assert_eq!(errors[1]["code"], "STDERR", "{row}");
    assert_eq!(
        errors[1]["message"],
        "fetching funds\nHTTP 503 from the source"
    );
    // The job's own errors follow.
    assert_eq!(errors[2]["code"], "HTTP_503", "{row}");
    assert_eq!(errors[2]["recordId"], "fund-17", "{row}");
}

#[tokio::test]
async fn sigterm_reaches_the_job_and_the_run_is_failed() {
    let app = TestApp::spawn().await;
    let dir = scratch("sigterm");
    // The trap first, then the pids, written whole: once `pids` is there
    // the job is ready for the signal.
    let job = format!(
        r#"trap 'echo trapped > {dir}/trapped; exit 143' TERM
           sleep 600 &
           echo "$$ $!" > {dir}/pids.partial && mv {dir}/pids.partial {dir}/pids
           wait"#,
        dir = dir.display()
    );
    let mut wrapper: Child = wrapper(
        &app.url(""),
        &app.token("service_role"),
        "accounts",
        &[],
        &job,
    )
    .spawn()
    .unwrap();
    appears(&dir.join("pids")).await;
    let pids: Vec<u32> = std::fs::read_to_string(dir.join("pids"))
        .unwrap()
        .split_whitespace()
        .map(|pid| pid.parse().unwrap())
        .collect();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &wrapper.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let output = tokio::time::timeout(Duration::from_secs(5), wrapper.wait())
        .await
        .expect("the wrapper did not exit within 5 s of SIGTERM")
        .unwrap();
    assert_eq!(output.code(), Some(143));
    assert!(dir.join("trapped").exists(), "the job did not get SIGTERM");
    // Nothing the job started is left: the shell nor its sleep.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|pid| ended(*pid)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "left running: {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = state(&app, "accounts").await;
    assert_eq!(row["last_sync_status"], "failed", "{row}");
    assert_eq!(row["errors"][0]["code"], "SIGNAL_SIGTERM", "{row}");
    assert!(
        row["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 143"),
        "{row}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_job_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let app = TestApp::spawn().await;
    let dir = scratch("ignores-sigterm");
    let job = format!(
        r#"trap '' TERM
           echo "$$" > {dir}/pid.partial && mv {dir}/pid.partial {dir}/pid
           sleep 600"#,
        dir = dir.display()
    );
    let mut wrapper: Child = wrapper(
        &app.url(""),
        &app.token("service_role"),
        "accounts",
        &[],
        &job,
    )
    .spawn()
    .unwrap();
    appears(&dir.join("pid")).await;
    let pid: u32 = std::fs::read_to_string(dir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &wrapper.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let grace = vantage_sync::run::KILL_GRACE;
    let output = tokio::time::timeout(grace + Duration::from_secs(5), wrapper.wait())
        .await
        .expect("the wrapper did not exit after the grace period")
        .unwrap();
    // SIGKILL: 128 + 9.
    assert_eq!(output.code(), Some(137));
    assert!(ended(pid));
    let row = state(&app, "accounts").await;
    assert_eq!(row["last_sync_status"], "failed", "{row}");
    assert_eq!(row["errors"][0]["code"], "SIGNAL_SIGTERM", "{row}");
    assert!(
        row["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("was killed (SIGKILL)"),
        "{row}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn with_the_api_down_the_job_still_runs_unless_required() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let dir = scratch("api-down");
    let ran = dir.join("ran");
    let job = format!("echo ran > {}; exit 4", ran.display());
    let token = "a.b.c";

    let output = finish(wrapper(
        &url,
        token,
        "accounts",
        &["--retry-secs", "1"],
        &job,
    ))
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(ran.exists(), "{stderr}");
    assert!(
        stderr.contains("vantage-sync run: cannot mark accounts started"),
        "{stderr}"
    );
    assert!(stderr.contains("not recorded"), "{stderr}");

    std::fs::remove_file(&ran).unwrap();
    let output = finish(wrapper(
        &url,
        token,
        "accounts",
        &["--retry-secs", "1", "--require-api"],
        &job,
    ))
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(75), "{stderr}");
    assert!(!ran.exists(), "the job ran:\n{stderr}");
    assert!(stderr.contains("--require-api"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server that comes up while the job runs: the start, marked in the
/// background, lands before the end does.
#[tokio::test]
async fn a_start_marked_late_is_still_followed_by_the_end() {
    let port = closed_port();
    let dir = scratch("late-server");
    let job = format!(
        r#"echo ran > {dir}/ran
           while [ ! -e {dir}/go ]; do sleep 0.05; done
           printf '{{"recordsSynced": 7, "recordsCreated": 7, "recordsUpdated": 0}}' > "$VANTAGE_SYNC_RESULT""#,
        dir = dir.display()
    );
    let keys = vantage_sync::auth::TokenKeys::new(vantage_sync_testkit::SECRET.as_bytes()).unwrap();
    let token = keys
        .mint(
            vantage_sync::auth::Role::ServiceRole,
            Duration::from_secs(600),
            None,
        )
        .unwrap();
    let wrapper = wrapper(
        &format!("http://127.0.0.1:{port}"),
        &token,
        "accounts",
        &[],
        &job,
    )
    .spawn()
    .unwrap();
    // The job runs without waiting for the API for long.
    appears(&dir.join("ran")).await;
    let app = TestApp::spawn_with(TestDb::migrated().await, |config| {
        config.listen_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    })
    .await;
    std::fs::write(dir.join("go"), "").unwrap();
    let output = tokio::time::timeout(RUN_WITHIN, wrapper.wait_with_output())
        .await
        .expect("vantage-sync run did not exit")
        .unwrap();
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("in the background"), "{stderr}");
    let row = state(&app, "accounts").await;
    assert_eq!(row["last_sync_status"], "success", "{row}\n{stderr}");
    assert_eq!(row["records_created"], 7, "{row}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_invalid_result_file_fails_the_run_with_the_jobs_exit_code() {
    let app = TestApp::spawn().await;
    for (resource, job, exit, says) in [
        (
            "accounts",
            r#"echo 'synced 10' > "$VANTAGE_SYNC_RESULT""#,
            0,
            "not JSON",
        ),
        (
            "funds",
            r#"echo '{"recordsSynced": 4, "recordsCreated": 3, "recordsUpdated": 2}' > "$VANTAGE_SYNC_RESULT"; exit 0"#,
            0,
            "exceeds recordsSynced",
        ),
        (
            "investors",
            r#"echo '{"recordsSynced": -1}' > "$VANTAGE_SYNC_RESULT"; exit 5"#,
            5,
            "recordsSynced must be a whole number",
        ),
    ] {
        let output = finish(wrapper(
            &app.url(""),
            &app.token("service_role"),
            resource,
            &[],
            job,
        ))
        .await;
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(exit), "{resource}: {stderr}");
        assert!(stderr.contains(says), "{resource}: {stderr}");
        let row = state(&app, resource).await;
        assert_eq!(row["last_sync_status"], "failed", "{row}");
        let invalid = row["errors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|error| error["code"] == "INVALID_RESULT_FILE")
            .unwrap_or_else(|| panic!("no INVALID_RESULT_FILE in {row}"));
        assert!(invalid["message"].as_str().unwrap().contains(says), "{row}");
        if exit != 0 {
            assert_eq!(row["errors"][0]["code"], format!("EXIT_{exit}"), "{row}");
        }
    }
}

#[tokio::test]
async fn refusals_are_told_and_the_job_runs_unless_required() {
    let app = TestApp::spawn().await;
    let dir = scratch("refused");
    let ran = dir.join("ran");
    let job = format!("echo ran > {}", ran.display());
    // Another run holds the resource.
    app.query(
        "service_role",
        "mutation { startSync(resource: \"accounts\") { lastSyncStatus } }",
        json!({}),
    )
    .await;
    let before = state(&app, "accounts").await;

    let output = finish(wrapper(
        &app.url(""),
        &app.token("service_role"),
        "accounts",
        &[],
        &job,
    ))
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(ran.exists(), "{stderr}");
    assert!(stderr.contains("ALREADY_RUNNING"), "{stderr}");
    // That run's state is left to it.
    assert_eq!(state(&app, "accounts").await, before);

    std::fs::remove_file(&ran).unwrap();
    let output = finish(wrapper(
        &app.url(""),
        &app.token("service_role"),
        "accounts",
        &["--require-api"],
        &job,
    ))
    .await;
    assert_eq!(output.status.code(), Some(75));
    assert!(!ran.exists());

    // A token that may not write is refused, not retried.
    let output = finish(wrapper(
        &app.url(""),
        &app.token("authenticated"),
        "funds",
        &[],
        &job,
    ))
    .await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(ran.exists(), "{stderr}");
    assert!(stderr.contains("FORBIDDEN"), "{stderr}");
    assert!(!stderr.contains("trying again"), "{stderr}");
    assert_eq!(state(&app, "funds").await["last_sync_status"], "never_run");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_flags_are_refused_before_anything_runs() {
    let dir = std::env::temp_dir().join(format!(
        "vantage-sync-run-test-flags-{}",
        std::process::id()
    ));
    let ran = dir.with_extension("ran");
    let _ = std::fs::remove_file(&ran);
    let job = format!("echo ran > {}", ran.display());
    for (args, says) in [
        (
            vec!["run", "accounts", "--url", "http://127.0.0.1:8080"],
            "VANTAGE_SYNC_TOKEN",
        ),
        (
            vec!["run", "accounts", "--token", "a.b.c"],
            "VANTAGE_SYNC_URL",
        ),
        (
            vec![
                "run",
                "accounts",
                "--url",
                "ftp://sync.example",
                "--token",
                "a.b.c",
            ],
            "http:// or https://",
        ),
        (
            vec![
                "run",
                "accounts",
                "--url",
                "127.0.0.1:8080",
                "--token",
                "a.b.c",
            ],
            "e.g. http://127.0.0.1:8080",
        ),
        (
            vec![
                "run",
                "accounts",
                "--url",
                "http://127.0.0.1:8080",
                "--token",
                "Bearer a.b.c",
            ],
            "the token alone",
        ),
        (
            vec![
                "run",
                "Accounts",
                "--url",
                "http://127.0.0.1:8080",
                "--token",
                "a.b.c",
            ],
            "lower snake case",
        ),
    ] {
        let output = std::process::Command::new(BIN)
            .env_remove("VANTAGE_SYNC_URL")
            .env_remove("VANTAGE_SYNC_TOKEN")
            .args(&args)
            .args(["--", "sh", "-c", &job])
            .output()
            .unwrap();
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(says),
            "{args:?}: expected {says:?} in:\n{stderr}"
        );
        assert!(!ran.exists(), "{args:?} ran the job");
    }
    // No command: clap's own usage error.
    let output = std::process::Command::new(BIN)
        .args(["run", "accounts", "--url", "http://h", "--token", "a.b.c"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("<COMMAND>"));
}
