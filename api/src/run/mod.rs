//! `vantage-sync run`: records the runs of an existing ETL job (a cron
//! line, say) as syncs of one resource, without changing the job. The run
//! is marked started, the job runs with its standard streams passed
//! through, and the run is marked completed (exit 0) or failed (anything
//! else, with the exit code or signal and the end of its standard error).
//!
//! The job matters more than its record: when the API cannot be reached
//! the job still runs (unless `--require-api`), marking is retried for a
//! bounded time, and the wrapper always exits with the job's code.

mod api;
mod job;
mod outcome;

use std::ffi::OsString;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use tokio::task::JoinHandle;

use crate::graphql::validate;

use self::api::{Api, Marked, REQUEST_TIMEOUT, Transition};
use self::job::{JobEnd, Signals};

/// The variable that gives the job the path of its result file.
pub const RESULT_VAR: &str = "VANTAGE_SYNC_RESULT";
/// The variable the token may be given in; the job does not inherit it.
pub const TOKEN_VAR: &str = "VANTAGE_SYNC_TOKEN";

/// Exit code when the flags cannot be used, as for clap's usage errors.
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the wrapper cannot prepare a run (EX_OSERR): no
/// directory for the result file, no signal handlers.
pub const EXIT_OS_ERROR: i32 = 71;
/// Exit code with `--require-api` when the start could not be marked and
/// the job was not run (EX_TEMPFAIL: try again later).
pub const EXIT_NOT_STARTED: i32 = 75;

/// How long the job waits for its start to be marked before it runs
/// anyway, the marking going on in the background.
pub const START_WAIT: Duration = Duration::from_secs(5);
/// How long a job that was passed SIGINT or SIGTERM has to end before it
/// and its process group are killed (SIGKILL).
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// The most time spent marking a run failed after the wrapper was told to
/// stop: whoever sent the signal wants it gone soon.
pub const STOPPING_RETRY: Duration = Duration::from_secs(5);

/// What `run` was asked to do, as given on the command line or in the
/// environment; [`run`] checks it before anything else.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The resource the job syncs.
    pub resource: String,
    /// The server's address or its `/graphql` endpoint.
    pub url: Option<String>,
    /// A `service_role` token.
    pub token: Option<String>,
    /// Run the job only once its start is marked.
    pub require_api: bool,
    /// How long each mark is retried while the API cannot be reached.
    pub retry_for: Duration,
    /// The job: a program and its arguments.
    pub command: Vec<OsString>,
}

/// Why a run could not be prepared; the job has not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Neither `--url` nor `VANTAGE_SYNC_URL`.
    #[error(
        "no server: pass --url or set VANTAGE_SYNC_URL to the server's address, e.g. http://127.0.0.1:8080"
    )]
    NoUrl,
    /// The URL cannot be used.
    #[error("--url (or VANTAGE_SYNC_URL) {0}")]
    BadUrl(String),
    /// Neither `--token` nor `VANTAGE_SYNC_TOKEN`.
    #[error(
        "no token: pass --token or set VANTAGE_SYNC_TOKEN to a service_role token (`vantage-sync token --role service_role` mints one)"
    )]
    NoToken,
    /// The token cannot be one.
    #[error("--token (or VANTAGE_SYNC_TOKEN) {0}")]
    BadToken(&'static str),
    /// The resource name breaks the table's rule.
    #[error(
        "resource {0:?}: a resource is lower snake case: a letter, then up to 62 letters, digits or underscores"
    )]
    BadResource(String),
    /// Nothing after `--`.
    #[error(
        "no command: put the job after `--`, e.g. vantage-sync run accounts -- ./sync-accounts.sh"
    )]
    NoCommand,
    /// The result file's private directory could not be made.
    #[error("cannot make a directory for the result file in {dir}: {source}")]
    ResultDir {
        /// Where it was to be made.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The handlers for SIGINT and SIGTERM could not be installed.
    #[error("cannot listen for SIGINT and SIGTERM: {0}")]
    Signals(std::io::Error),
    /// The HTTP client could not be built.
    #[error("cannot make an HTTP client: {0}")]
    Client(reqwest::Error),
}

impl RunError {
    /// The wrapper's exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NoUrl
            | Self::BadUrl(_)
            | Self::NoToken
            | Self::BadToken(_)
            | Self::BadResource(_)
            | Self::NoCommand => EXIT_USAGE,
            Self::ResultDir { .. } | Self::Signals(_) | Self::Client(_) => EXIT_OS_ERROR,
        }
    }
}

/// The settings, checked.
struct Plan {
    resource: String,
    api: Arc<Api>,
    require_api: bool,
    retry_for: Duration,
    command: Vec<OsString>,
}

impl Settings {
    fn check(self) -> Result<Plan, RunError> {
        if validate::resource(&self.resource).is_err() {
            return Err(RunError::BadResource(self.resource));
        }
        let url = self.url.filter(|url| !url.trim().is_empty());
        let endpoint = endpoint(&url.ok_or(RunError::NoUrl)?).map_err(RunError::BadUrl)?;
        let token = token(self.token.as_deref())?;
        if self.command.is_empty() {
            return Err(RunError::NoCommand);
        }
        let api = Api::new(endpoint, token).map_err(RunError::Client)?;
        Ok(Plan {
            resource: self.resource,
            api: Arc::new(api),
            require_api: self.require_api,
            retry_for: self.retry_for,
            command: self.command,
        })
    }
}

/// The GraphQL endpoint of `url`: the server's address (`http://host:8080`,
/// perhaps with a path prefix behind a proxy) with `/graphql` added, or
/// the endpoint itself.
pub fn endpoint(url: &str) -> Result<Url, String> {
    let url = url.trim();
    let example = if url.contains("://") {
        "http://127.0.0.1:8080".to_owned()
    } else {
        format!("http://{url}")
    };
    let mut parsed = match Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => parsed,
        // `host:8080` parses, as a URL of the scheme `host`.
        Ok(_) => {
            return Err(format!(
                "{url:?} is not an http:// or https:// URL: write the server's address with its scheme, e.g. {example}"
            ));
        }
        Err(error) => return Err(format!("{url:?} is not a URL ({error}), e.g. {example}")),
    };
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} names no host, e.g. {example}"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "{url:?} has a query or fragment: give the server's address or its /graphql endpoint"
        ));
    }
    let path = parsed.path().trim_end_matches('/').to_owned();
    if path.ends_with("/graphql") {
        parsed.set_path(&path);
    } else {
        parsed.set_path(&format!("{path}/graphql"));
    }
    Ok(parsed)
}

/// The token as it is sent, or what is wrong with it.
fn token(token: Option<&str>) -> Result<String, RunError> {
    let token = token.map(str::trim).unwrap_or_default();
    if token.is_empty() {
        return Err(RunError::NoToken);
    }
    if token.len() > 7 && token[..7].eq_ignore_ascii_case("bearer ") {
        return Err(RunError::BadToken(
            "starts with \"Bearer \": give the token alone",
        ));
    }
    if token.contains(char::is_whitespace) {
        return Err(RunError::BadToken("holds spaces or line breaks"));
    }
    if token.split('.').count() != 3 {
        return Err(RunError::BadToken(
            "is not a JWT (three parts separated by dots): `vantage-sync token --role service_role` mints one",
        ));
    }
    Ok(token.to_owned())
}

/// Writes a line of the wrapper's own to standard error, told apart from
/// the job's lines by its prefix.
fn say(message: impl Display) {
    use std::io::Write;
    // Not `eprintln!`, which panics when standard error is closed.
    let _ = writeln!(std::io::stderr(), "vantage-sync run: {message}");
}

/// The directory (mode 0700, so no other user can plant or read the file)
/// that holds the job's result file; removed with what is in it when
/// dropped.
struct ResultDir {
    dir: PathBuf,
}

impl ResultDir {
    fn create() -> Result<Self, RunError> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = std::env::temp_dir();
        let mut random = [0u8; 16];
        let named = getrandom::fill(&mut random)
            .map_err(|error| std::io::Error::other(error.to_string()))
            .and_then(|()| {
                let name: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
                let dir = parent.join(format!("vantage-sync-run-{name}"));
                std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
                Ok(dir)
            });
        match named {
            Ok(dir) => Ok(Self { dir }),
            Err(source) => Err(RunError::ResultDir {
                dir: parent,
                source,
            }),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("result.json")
    }
}

impl Drop for ResultDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the job as `settings` say, recording it, and returns the exit
/// code for the wrapper: the job's own (128 + the signal's number for a
/// job killed by a signal, as shells do), or one of the `EXIT_` codes
/// when the job did not run.
pub async fn run(settings: Settings) -> i32 {
    let prepared = settings.check().and_then(|plan| {
        let signals = Signals::listen().map_err(RunError::Signals)?;
        let result_dir = ResultDir::create()?;
        Ok((plan, signals, result_dir))
    });
    match prepared {
        Ok((plan, mut signals, result_dir)) => {
            run_planned(&plan, &mut signals, &result_dir.file()).await
        }
        Err(error) => {
            say(&error);
            error.exit_code()
        }
    }
}

/// Where marking the start stands when the job is about to run.
enum Start {
    /// Marked: this run owns the resource's state and records its end.
    Marked,
    /// Not marked, and it will not be: the end is not recorded.
    NotMarked,
    /// Still being retried in the background.
    Pending(JoinHandle<Marked>),
}

async fn run_planned(plan: &Plan, signals: &mut Signals, result_file: &Path) -> i32 {
    let start = match mark_start(plan, signals).await {
        Ok(start) => start,
        Err(exit_code) => return exit_code,
    };
    let end = match job::spawn(&plan.command, result_file) {
        Ok(job) => job.wait(signals, KILL_GRACE).await,
        Err(error) => {
            let end = JobEnd::not_started(&plan.command, error);
            say(end.describe());
            end
        }
    };
    let report = outcome::read(result_file);
    if let Err(problem) = &report {
        say(format_args!(
            "the result file is invalid: {problem}; the run is marked failed"
        ));
    }
    let transition = outcome::transition(&end, &report);
    record_end(plan, signals, start, &end, &transition).await;
    end.exit_code()
}

/// Marks the start, waiting for it at most [`START_WAIT`] (with
/// `--require-api`, until it is marked or given up on); the exit code
/// instead when the job is not to run.
async fn mark_start(plan: &Plan, signals: &mut Signals) -> Result<Start, i32> {
    let resource = plan.resource.as_str();
    let mut marking = tokio::spawn({
        let api = Arc::clone(&plan.api);
        let resource = plan.resource.clone();
        let retry_for = plan.retry_for;
        async move { api.mark(&resource, &Transition::Start, retry_for).await }
    });
    let waited = tokio::select! {
        biased;
        signal = signals.recv() => Err(signal),
        marked = &mut marking => Ok(Some(joined(marked))),
        () = tokio::time::sleep(START_WAIT), if !plan.require_api => Ok(None),
    };
    match waited {
        Err(signal) => Err(stopped_before_the_job(plan, marking, signal).await),
        Ok(None) => {
            say(format_args!(
                "running the job while marking {resource} started is retried in the background"
            ));
            Ok(Start::Pending(marking))
        }
        Ok(Some(Marked::Done)) => Ok(Start::Marked),
        Ok(Some(marked)) => {
            tell(resource, &Transition::Start, &marked, plan.retry_for);
            if plan.require_api {
                say(format_args!(
                    "not running the job: --require-api, and {resource} could not be marked started (exit {EXIT_NOT_STARTED})"
                ));
                return Err(EXIT_NOT_STARTED);
            }
            let whose = match &marked {
                Marked::Refused { code, .. } if code == "ALREADY_RUNNING" => {
                    "the running sync belongs to another run"
                }
                _ => "its start was not marked",
            };
            say(format_args!(
                "running the job anyway; its end will not be recorded, as {whose}"
            ));
            Ok(Start::NotMarked)
        }
    }
}

/// Marks the job's end with `transition`, if this run marked the start
/// (waiting for a start still being retried). A signal stops the waiting.
async fn record_end(
    plan: &Plan,
    signals: &mut Signals,
    start: Start,
    end: &JobEnd,
    transition: &Transition,
) {
    let resource = plan.resource.as_str();
    let leaving = |signal: rustix::process::Signal| {
        say(format_args!(
            "received {}: leaving without recording the end of the run",
            job::signal_name(signal.as_raw())
        ));
    };
    let start = match start {
        Start::Pending(marking) => {
            // Its retries end after `retry_for`; a run told to stop waits
            // less.
            let limit = if end.stopped_by.is_some() {
                STOPPING_RETRY
            } else {
                plan.retry_for + REQUEST_TIMEOUT
            };
            let marked = tokio::select! {
                marked = within(limit, marking) => marked,
                signal = signals.recv() => return leaving(signal),
            };
            if marked == Marked::Done {
                Start::Marked
            } else {
                tell(resource, &Transition::Start, &marked, plan.retry_for);
                Start::NotMarked
            }
        }
        start => start,
    };
    if !matches!(start, Start::Marked) {
        say(format_args!(
            "the job {}; this is not recorded, as {resource} was not marked started by this run",
            end.ended()
        ));
        return;
    }
    let retry_for = if end.stopped_by.is_some() {
        plan.retry_for.min(STOPPING_RETRY)
    } else {
        plan.retry_for
    };
    tokio::select! {
        marked = plan.api.mark(resource, transition, retry_for) => {
            tell(resource, transition, &marked, retry_for);
        }
        signal = signals.recv() => leaving(signal),
    }
}

/// Told to stop while the start was being marked: the job never runs, and
/// a start that was marked meanwhile is marked failed.
async fn stopped_before_the_job(
    plan: &Plan,
    marking: JoinHandle<Marked>,
    signal: rustix::process::Signal,
) -> i32 {
    let name = job::signal_name(signal.as_raw());
    say(format_args!("received {name}: the job does not run"));
    // A start that lands now must still be ended.
    if within(STOPPING_RETRY, marking).await == Marked::Done {
        let transition = Transition::Fail(vec![entity::SyncError {
            code: format!("SIGNAL_{name}"),
            message: format!(
                "vantage-sync run received {name} before the job started; the job did not run"
            ),
            ..Default::default()
        }]);
        let retry_for = plan.retry_for.min(STOPPING_RETRY);
        let marked = plan.api.mark(&plan.resource, &transition, retry_for).await;
        tell(&plan.resource, &transition, &marked, retry_for);
    }
    128 + signal.as_raw()
}

/// A background mark's answer; one that panicked is one that gave up.
fn joined(marked: Result<Marked, tokio::task::JoinError>) -> Marked {
    marked.unwrap_or_else(|error| Marked::GaveUp(error.to_string()))
}

/// A background mark's answer if it comes within `limit`; else the mark
/// is abandoned.
async fn within(limit: Duration, mut marking: JoinHandle<Marked>) -> Marked {
    match tokio::time::timeout(limit, &mut marking).await {
        Ok(marked) => joined(marked),
        Err(_) => {
            marking.abort();
            Marked::GaveUp(format!("no answer within {} s", limit.as_secs()))
        }
    }
}

/// Says how a mark that did not succeed ended.
fn tell(resource: &str, transition: &Transition, marked: &Marked, retry_for: Duration) {
    let verb = transition.verb();
    match marked {
        Marked::Done => {}
        Marked::Refused { code, message } => {
            say(format_args!(
                "the API refused to mark {resource} {verb}: {code}: {message}"
            ));
        }
        Marked::GaveUp(error) => say(format_args!(
            "gave up marking {resource} {verb} after {} s: {error}",
            retry_for.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_the_graphql_path() {
        for (given, expected) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/graphql"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/graphql"),
            (
                "https://sync.example/graphql",
                "https://sync.example/graphql",
            ),
            (
                "https://sync.example/graphql/",
                "https://sync.example/graphql",
            ),
            (
                "https://example.com/sync",
                "https://example.com/sync/graphql",
            ),
            (" http://h:1 ", "http://h:1/graphql"),
        ] {
            assert_eq!(endpoint(given).unwrap().as_str(), expected, "{given}");
        }
        for (given, says) in [
            ("localhost:8080", "e.g. http://localhost:8080"),
            ("127.0.0.1:8080", "e.g. http://127.0.0.1:8080"),
            ("ftp://h/", "not an http:// or https:// URL"),
            ("http://", "not a URL"),
            ("http://h/graphql?x=1", "query"),
        ] {
            let error = endpoint(given).unwrap_err();
            assert!(error.contains(says), "{given}: {error}");
        }
    }

    #[test]
    fn tokens_are_checked_for_what_people_paste() {
        assert_eq!(token(Some(" a.b.c\n")).unwrap(), "a.b.c");
        assert!(matches!(token(None), Err(RunError::NoToken)));
        assert!(matches!(token(Some("  ")), Err(RunError::NoToken)));
        for bad in ["Bearer a.b.c", "a.b", "a. b.c"] {
            assert!(
                matches!(token(Some(bad)), Err(RunError::BadToken(_))),
                "{bad}"
            );
        }
    }
}
