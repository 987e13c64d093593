//! `vantage-sync check`: every start-up check of `serve`, run against the
//! configured deployment without serving. One line per check, `✓`, `⚠`
//! (works, but not as well as it could) or `✗` with what to do; any `✗`
//! makes the command fail. Nothing printed holds a password or a secret.

use std::time::Duration;

use crate::db::migrate::{self, MigrationState};
use crate::db::{self, Pool, PreparedStatements};
use crate::feed;
use crate::server::ServerConfig;
use crate::telemetry::TraceSettings;

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// As it should be.
    Pass,
    /// It works, but not as well as it could.
    Warn,
    /// `serve` would refuse to start, or fail at it.
    Fail,
}

/// One check's line.
#[derive(Debug, Clone)]
pub struct Finding {
    /// How it ended.
    pub verdict: Verdict,
    /// What was checked.
    pub subject: &'static str,
    /// What was found, and on a warning or failure what to do.
    pub detail: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = match self.verdict {
            Verdict::Pass => "✓",
            Verdict::Warn => "⚠",
            Verdict::Fail => "✗",
        };
        write!(f, "{mark} {}: {}", self.subject, self.detail)
    }
}

/// The findings of one run, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// Every check's line.
    pub findings: Vec<Finding>,
    /// Text that must never be printed (the database passwords).
    secrets: Vec<String>,
}

impl Report {
    fn add(&mut self, verdict: Verdict, subject: &'static str, detail: impl Into<String>) {
        let mut detail = detail.into();
        for secret in &self.secrets {
            detail = detail.replace(secret.as_str(), "****");
        }
        self.findings.push(Finding {
            verdict,
            subject,
            detail,
        });
    }

    /// How many checks failed.
    pub fn failures(&self) -> usize {
        self.findings
            .iter()
            .filter(|finding| finding.verdict == Verdict::Fail)
            .count()
    }

    /// A failure found before the database was asked anything (the
    /// configuration itself).
    pub fn configuration_failed(error: impl std::fmt::Display) -> Self {
        let mut report = Self::default();
        report.add(
            Verdict::Fail,
            "configuration",
            format!("{error}; fix it and run check again"),
        );
        report
    }
}

/// With no `DATABASE_URL`, `serve` runs a managed PostgreSQL from the
/// server binaries in `bin_dir` (found or not), with its data in
/// `data_dir`: there is no deployment to check beyond that.
pub fn managed(data_dir: &std::path::Path, bin_dir: Option<std::path::PathBuf>) -> Report {
    let mut report = Report::default();
    match bin_dir {
        Some(bin_dir) => report.add(
            Verdict::Pass,
            "database",
            format!(
                "no DATABASE_URL: serve runs a managed PostgreSQL from {} with its data in {}; set DATABASE_URL to check a deployment's database",
                bin_dir.display(),
                data_dir.display()
            ),
        ),
        None => report.add(
            Verdict::Fail,
            "database",
            "no DATABASE_URL, and no PostgreSQL server binaries to run one with: install them (Debian: the postgresql package, or set PG_BIN_DIR) or set DATABASE_URL",
        ),
    }
    report
}

/// `url` as it may be shown: without its password.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("****"));
            }
            parsed.to_string()
        }
        Err(_) => "the configured URL (it does not parse as a URL)".into(),
    }
}

/// The password of `url`, as written in it and decoded: never to be shown.
fn passwords(url: &str) -> Vec<String> {
    let Some(written) = reqwest::Url::parse(url)
        .ok()
        .and_then(|url| url.password().map(str::to_owned))
    else {
        return Vec::new();
    };
    let decoded = percent_encoding::percent_decode_str(&written)
        .decode_utf8_lossy()
        .into_owned();
    [written, decoded]
        .into_iter()
        .filter(|password| !password.is_empty())
        .collect()
}

/// Runs every check `serve` makes at start against `config`'s database
/// and keys.
pub async fn deployment(config: &ServerConfig) -> Report {
    let mut report = Report::default();
    let read_url = config.read_replica.as_ref().map(|replica| &replica.url);
    for url in [
        Some(&config.database_url),
        config.listen_database_url.as_ref(),
        read_url,
    ]
    .into_iter()
    .flatten()
    {
        report.secrets.extend(passwords(url));
    }
    keys(config, &mut report).await;
    trusted_documents(config, &mut report);
    let Some(pool) = database(config, &mut report).await else {
        return report;
    };
    let pooled = pooler(config, &pool, &mut report).await;
    migrations(&pool, &mut report).await;
    roles(&pool, &mut report).await;
    live_feed(config, pooled, &mut report).await;
    webhook_secrets(&pool, &mut report).await;
    pool.close().await;
    read_replica(config, &mut report).await;
    report
}

/// The trusted documents, when set (a manifest that cannot be used never
/// gets here: the configuration fails first, naming it).
fn trusted_documents(config: &ServerConfig, report: &mut Report) {
    if let Some(trusted) = &config.documents.trusted {
        let held = if config.documents.trusted_for_all {
            "every caller, service_role too,"
        } else {
            "callers other than service_role"
        };
        report.add(
            Verdict::Pass,
            "trusted documents",
            format!(
                "{held} may run only the {} documents of the manifest",
                trusted.len()
            ),
        );
    }
}

/// How long the collector has to answer the traces check.
const COLLECTOR_ANSWERS_WITHIN: Duration = Duration::from_secs(3);

impl Report {
    /// Trace export, as the `OTEL_*` variables of this process set it: off,
    /// or on with a collector that answers an empty export (a warning when
    /// it does not: spans are dropped, requests are not affected).
    pub async fn traces(&mut self) {
        let settings = match TraceSettings::from_env() {
            Ok(Some(settings)) => settings,
            Ok(None) => {
                return self.add(
                    Verdict::Pass,
                    "traces",
                    "off (set OTEL_EXPORTER_OTLP_ENDPOINT to export them; docs/traces.md)",
                );
            }
            Err(error) => return self.add(Verdict::Fail, "traces", error.to_string()),
        };
        let shown = shown_url(&settings.endpoint);
        let sampler = std::env::var("OTEL_TRACES_SAMPLER")
            .ok()
            .filter(|sampler| !sampler.trim().is_empty())
            .unwrap_or_else(|| "parentbased_always_on".into());
        let mut request = reqwest::Client::new()
            .post(&settings.endpoint)
            .timeout(COLLECTOR_ANSWERS_WITHIN)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
        for (name, value) in collector_headers() {
            request = request.header(name, value);
        }
        // An empty ExportTraceServiceRequest is zero bytes of protobuf.
        let answer = request.body(Vec::new()).send().await;
        match answer {
            Ok(answer) if answer.status().is_success() => self.add(
                Verdict::Pass,
                "traces",
                format!("exported over OTLP/HTTP to {shown} (sampler {sampler}); the collector answers"),
            ),
            Ok(answer) => {
                let status = answer.status();
                let fix = if matches!(status.as_u16(), 401 | 403) {
                    "check the credentials in OTEL_EXPORTER_OTLP_HEADERS"
                } else {
                    "check OTEL_EXPORTER_OTLP_ENDPOINT (a collector's OTLP/HTTP port, 4318 by default)"
                };
                self.add(
                    Verdict::Warn,
                    "traces",
                    format!(
                        "the collector at {shown} answers {status}: spans would be dropped (requests are not affected); {fix}"
                    ),
                );
            }
            Err(error) => self.add(
                Verdict::Warn,
                "traces",
                format!(
                    "no answer from the collector at {shown} ({}): spans would be dropped and counted in vantage_sync_trace_spans_dropped_total (requests are not affected); start the collector or fix OTEL_EXPORTER_OTLP_ENDPOINT",
                    if error.is_timeout() { "timed out" } else if error.is_connect() { "cannot connect" } else { "request failed" }
                ),
            ),
        }
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS` (and the traces-only variable), as the
/// exporter sends them: `name=value` pairs separated by commas.
fn collector_headers() -> Vec<(String, String)> {
    [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ]
    .into_iter()
    .filter_map(|variable| std::env::var(variable).ok())
    .flat_map(|headers| {
        headers
            .split(',')
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                Some((name.trim().to_owned(), value.trim().to_owned()))
            })
            .collect::<Vec<_>>()
    })
    .collect()
}

async fn read_replica(config: &ServerConfig, report: &mut Report) {
    use sea_orm::sqlx::{self, Row};
    let Some(replica) = &config.read_replica else {
        return;
    };
    let shown = shown_url(&replica.url);
    let timeout = config.acquire_timeout;
    let asked = tokio::time::timeout(timeout, async {
        let pool = db::connect_with(&replica.url, 1, timeout, PreparedStatements::False)
            .await
            .map_err(|error| error.to_string())?;
        let row = sqlx::raw_sql("SELECT pg_is_in_recovery()")
            .fetch_one(pool.sqlx())
            .await
            .map_err(|error| error.to_string())?;
        pool.close().await;
        // Simple-protocol results are text: PostgreSQL's `t` or `f`.
        row.try_get::<bool, _>(0).map_err(|error| error.to_string())
    })
    .await;
    match asked {
        Ok(Ok(true)) => report.add(
            Verdict::Pass,
            "read replica",
            format!(
                "{shown} is a hot standby; queries read from it while it lags at most {} ms",
                replica.max_lag.as_millis()
            ),
        ),
        Ok(Ok(false)) => report.add(
            Verdict::Fail,
            "read replica",
            format!(
                "{shown} is not a standby (pg_is_in_recovery() is false): point READ_DATABASE_URL at a hot standby of DATABASE_URL"
            ),
        ),
        Ok(Err(error)) => report.add(
            Verdict::Warn,
            "read replica",
            format!(
                "cannot ask {shown}: {error}; queries read from the primary until it answers (check READ_DATABASE_URL)"
            ),
        ),
        Err(_) => report.add(
            Verdict::Warn,
            "read replica",
            format!(
                "no answer from {shown} within {} s; queries read from the primary until it answers",
                timeout.as_secs()
            ),
        ),
    }
}

async fn keys(config: &ServerConfig, report: &mut Report) {
    if config.keys.has_secret() {
        report.add(
            Verdict::Pass,
            "tokens",
            "HS256 tokens are verified with JWT_SECRET",
        );
    }
    let Some(key_set) = config.keys.key_set() else {
        return;
    };
    let source = key_set.source().to_string();
    match key_set.key_ids().await {
        Ok(kids) if kids.is_empty() => report.add(
            Verdict::Fail,
            "key set",
            format!("{source} holds no usable key; check JWKS_URL or JWKS_FILE"),
        ),
        Ok(kids) => report.add(
            Verdict::Pass,
            "key set",
            format!(
                "{source}: {} key{} ({})",
                kids.len(),
                if kids.len() == 1 { "" } else { "s" },
                kids.join(", ")
            ),
        ),
        Err(error) => report.add(
            Verdict::Fail,
            "key set",
            format!(
                "cannot load {source}: {error}; check JWKS_URL (or JWKS_FILE) and that this host can reach it (serve would answer /readyz with 503 until it loads)"
            ),
        ),
    }
}

async fn database(config: &ServerConfig, report: &mut Report) -> Option<Pool> {
    let shown = shown_url(&config.database_url);
    let timeout = config.acquire_timeout;
    let connected = tokio::time::timeout(
        timeout,
        db::connect_with(&config.database_url, 2, timeout, config.prepared_statements),
    )
    .await;
    let pool = match connected {
        Ok(Ok(pool)) => pool,
        Ok(Err(error)) => {
            report.add(
                Verdict::Fail,
                "database",
                format!(
                    "cannot connect to {shown}: {error}; check DATABASE_URL (host, port, user, password, database) and that the server accepts connections from here"
                ),
            );
            return None;
        }
        Err(_) => {
            report.add(
                Verdict::Fail,
                "database",
                format!(
                    "no answer from {shown} within {} s (DB_ACQUIRE_TIMEOUT_SECS); check DATABASE_URL and that the server is up and reachable from here",
                    timeout.as_secs()
                ),
            );
            return None;
        }
    };
    let version = version(&pool, timeout).await;
    match version {
        Ok((user, version)) => {
            report.add(
                Verdict::Pass,
                "database",
                format!("connected to {shown} as {user} ({version})"),
            );
            Some(pool)
        }
        Err(error) => {
            report.add(
                Verdict::Fail,
                "database",
                format!("connected to {shown}, but a query failed: {error}"),
            );
            pool.close().await;
            None
        }
    }
}

async fn version(pool: &Pool, timeout: Duration) -> Result<(String, String), String> {
    use sea_orm::sqlx::{self, Row};
    let query = sqlx::raw_sql("SELECT current_user::text, current_setting('server_version')")
        .fetch_one(pool.sqlx());
    let row = tokio::time::timeout(timeout, query)
        .await
        .map_err(|_| "no answer in time".to_owned())?
        .map_err(|error| error.to_string())?;
    let user: String = row.try_get(0).map_err(|error| error.to_string())?;
    let version: String = row.try_get(1).map_err(|error| error.to_string())?;
    Ok((user, format!("PostgreSQL {version}")))
}

async fn pooler(config: &ServerConfig, pool: &Pool, report: &mut Report) -> bool {
    let pooled = match config.prepared_statements {
        PreparedStatements::Auto => Ok(pool.behind_transaction_pooler()),
        // Found out at start only in auto mode; asked here either way.
        _ => db::is_transaction_pooler(&config.database_url).await,
    };
    let pooled = match pooled {
        Ok(pooled) => pooled,
        Err(error) => {
            report.add(
                Verdict::Fail,
                "pooler",
                format!("cannot tell whether DATABASE_URL goes through a pooler: {error}"),
            );
            return false;
        }
    };
    match (pooled, pool.prepared_statements()) {
        (true, true) => report.add(
            Verdict::Fail,
            "pooler",
            "DATABASE_URL goes through a transaction-mode pooler, where statements prepared by name collide: set DB_PREPARED_STATEMENTS=auto (or false)",
        ),
        (true, false) => report.add(
            Verdict::Pass,
            "pooler",
            "DATABASE_URL goes through a transaction-mode pooler; statements are not prepared by name",
        ),
        (false, true) => report.add(
            Verdict::Pass,
            "pooler",
            "DATABASE_URL is a direct or session-mode connection; statements are prepared by name",
        ),
        (false, false) => report.add(
            Verdict::Pass,
            "pooler",
            "DATABASE_URL is a direct or session-mode connection; statements are not prepared by name (DB_PREPARED_STATEMENTS=false)",
        ),
    }
    pooled
}

async fn migrations(pool: &Pool, report: &mut Report) {
    match migrate::state(pool.sqlx()).await {
        Ok(MigrationState {
            applied,
            pending,
            unknown,
        }) => {
            let unknown = unknown.unwrap_or_default();
            if !unknown.is_empty() {
                report.add(
                    Verdict::Fail,
                    "migrations",
                    format!(
                        "the database has migrations this binary does not know ({}): it was migrated by a newer release; run that release, or a newer one",
                        unknown.join(", ")
                    ),
                );
            } else if !pending.is_empty() {
                report.add(
                    Verdict::Fail,
                    "migrations",
                    format!(
                        "{} of {} not applied ({}): run `vantage-sync migrate up` as the schema's owner (serve applies them itself unless --no-migrate)",
                        pending.len(),
                        applied.len() + pending.len(),
                        pending.join(", ")
                    ),
                );
            } else {
                report.add(
                    Verdict::Pass,
                    "migrations",
                    format!("all {} applied, none pending", applied.len()),
                );
            }
        }
        Err(error) => report.add(
            Verdict::Fail,
            "migrations",
            format!("cannot read which migrations are applied: {error}"),
        ),
    }
}

async fn roles(pool: &Pool, report: &mut Report) {
    match db::check_privileges(pool).await {
        Ok(()) => report.add(
            Verdict::Pass,
            "roles",
            "the login role can become anon, authenticated and service_role",
        ),
        Err(error) => report.add(Verdict::Fail, "roles", error.to_string()),
    }
}

async fn live_feed(config: &ServerConfig, database_pooled: bool, report: &mut Report) {
    let (url, named) = match &config.listen_database_url {
        Some(url) => (url.as_str(), "LISTEN_DATABASE_URL"),
        None => (config.database_url.as_str(), "DATABASE_URL"),
    };
    let pooled = match &config.listen_database_url {
        Some(url) => db::is_transaction_pooler(url).await,
        None => Ok(database_pooled),
    };
    match pooled {
        Ok(true) => report.add(
            Verdict::Warn,
            "live feed",
            format!(
                "{named} goes through a transaction-mode pooler, where LISTEN receives nothing: changes reach subscribers only by polling, every FEED_POLL_SECS ({} s); set LISTEN_DATABASE_URL to a direct or session-mode connection",
                config.feed_poll_interval.as_secs()
            ),
        ),
        Ok(false) => match feed::can_listen(url).await {
            Ok(()) => report.add(
                Verdict::Pass,
                "live feed",
                format!("LISTEN works on {named} ({})", shown_url(url)),
            ),
            Err(error) => report.add(
                Verdict::Fail,
                "live feed",
                format!(
                    "cannot LISTEN on {named} ({}): {error}; it must be a direct or session-mode connection",
                    shown_url(url)
                ),
            ),
        },
        Err(error) => report.add(
            Verdict::Fail,
            "live feed",
            format!(
                "cannot connect to {named} ({}): {error}",
                shown_url(url)
            ),
        ),
    }
}

async fn webhook_secrets(pool: &Pool, report: &mut Report) {
    match db::webhooks::secrets_reachable(pool).await {
        Ok(Some(access))
            if access.service_role_may_claim
                && access.claim_is_definer
                && access.owner_reads_secrets =>
        {
            report.add(
                Verdict::Pass,
                "webhook secrets",
                "service_role signs deliveries through the claim function, which may read the secrets",
            );
        }
        Ok(Some(access)) => report.add(
            Verdict::Fail,
            "webhook secrets",
            format!(
                "deliveries could not be signed (service_role may claim: {}; the claim function runs as its owner: {}; its owner may read vantage_sync_private.webhook_secrets: {}); run `vantage-sync migrate up` again as the schema's owner to restore the grants",
                access.service_role_may_claim, access.claim_is_definer, access.owner_reads_secrets
            ),
        ),
        Ok(None) => report.add(
            Verdict::Fail,
            "webhook secrets",
            "the webhook functions and secrets table are missing: run `vantage-sync migrate up`",
        ),
        Err(error) => report.add(
            Verdict::Fail,
            "webhook secrets",
            format!("cannot read the catalogs: {error}"),
        ),
    }
}
