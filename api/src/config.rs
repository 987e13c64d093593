//! `vantage-sync serve` configuration: flags with environment fallbacks,
//! checked once at start with messages that say what to fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use clap::builder::RangedU64ValueParser;

use crate::auth::{ClaimRules, DEFAULT_JWKS_REFRESH, JwksSource, KeySettings, TokenKeys};
use crate::db::PreparedStatements;
use crate::db::replica::ReplicaSettings;
use crate::graphql::QueryLimits;
use crate::graphql::documents::{DocumentSettings, TrustedDocuments};
use crate::graphql::mutation::WriteRules;
use crate::server::{
    DEFAULT_EVENT_RETENTION_DAYS, DEFAULT_LISTEN_ADDR, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_REQUEST_TIMEOUT_SECS, Leaving, ServerConfig,
};
use crate::transport::cors::CorsOrigins;
use crate::transport::listener::ConnectionLimits;
use crate::transport::rate_limit::RateLimit;
use crate::transport::ws::WebSocketConfig;
use crate::webhooks::WebhookSettings;

/// Flags of `vantage-sync serve`. Ranges are checked by clap, whose
/// message names the flag and the range.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// PostgreSQL URL. Without it, a managed local PostgreSQL is run from
    /// the installed server binaries, with its data under --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// HS256 secret for bearer tokens, at least 32 bytes. Without it (and
    /// without DATABASE_URL) one is generated and kept under --data-dir.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// URL of a JSON Web Key Set whose keys verify ES256, RS256 and EdDSA
    /// tokens by their `kid`, e.g. Supabase's
    /// https://<ref>.supabase.co/auth/v1/.well-known/jwks.json.
    #[arg(long, env = "JWKS_URL", conflicts_with = "jwks_file")]
    pub jwks_url: Option<String>,

    /// A file holding a JSON Web Key Set (instead of --jwks-url).
    #[arg(long, env = "JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// Seconds between refreshes of the key set (a token naming an
    /// unknown `kid` also triggers one, at most every 10 s).
    #[arg(long, env = "JWKS_REFRESH_SECS", default_value_t = DEFAULT_JWKS_REFRESH.as_secs(),
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub jwks_refresh_secs: u64,

    /// What token claims must say.
    #[command(flatten)]
    pub claims: ClaimArgs,

    /// A hot standby of the database (streaming replication) that queries
    /// read from while it is reachable and its replay lags at most
    /// --read-max-lag-ms; mutations, the live feed, subscriptions, alerts
    /// and webhooks stay on DATABASE_URL.
    #[arg(long, env = "READ_DATABASE_URL", hide_env_values = true)]
    pub read_database_url: Option<String>,

    /// Milliseconds the read replica's replay may lag the primary before
    /// queries read from the primary instead (checked every 100 ms).
    #[arg(long, env = "READ_MAX_LAG_MS",
          default_value_t = ReplicaSettings::DEFAULT_MAX_LAG.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub read_max_lag_ms: u64,

    /// Session connection (direct, or a session-mode pooler) the live feed
    /// LISTENs on; default: DATABASE_URL. Needed when DATABASE_URL is a
    /// transaction-mode pooler, where LISTEN receives nothing.
    #[arg(long, env = "LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,

    /// Named prepared statements: true, false (what a transaction-mode
    /// pooler needs), or auto (off when start-up finds such a pooler).
    #[arg(long, env = "DB_PREPARED_STATEMENTS", value_enum, default_value_t = PreparedStatements::Auto)]
    pub db_prepared_statements: PreparedStatements,

    /// Seconds between reads of the event log that do not wait for a
    /// notification: the longest a change whose notification is lost
    /// takes to reach subscribers.
    #[arg(long, env = "FEED_POLL_SECS", default_value_t = crate::feed::DEFAULT_POLL_INTERVAL.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub feed_poll_secs: u64,

    /// Origins that browsers may call the API from: a comma-separated list
    /// of exact origins (https://dash.example.com), or `*`. Default: none
    /// (same-origin only).
    #[arg(long, env = "CORS_ALLOWED_ORIGINS")]
    pub cors_allowed_origins: Option<String>,

    /// Do not remember documents sent with their hash (Apollo's automatic
    /// persisted queries): a hash sent alone is then answered
    /// PERSISTED_QUERY_NOT_SUPPORTED, unless it names a trusted document.
    #[arg(long, env = "NO_PERSISTED_QUERIES")]
    pub no_persisted_queries: bool,

    /// A manifest of trusted documents (a JSON object of hash → document,
    /// as graphql-codegen's client preset and Relay write it, or an Apollo
    /// persisted query manifest). Callers other than service_role may then
    /// run only these documents, by documentId or persisted-query hash.
    #[arg(long, env = "TRUSTED_DOCUMENTS")]
    pub trusted_documents: Option<PathBuf>,

    /// Hold service_role to the trusted documents too.
    #[arg(
        long,
        env = "TRUSTED_DOCUMENTS_FOR_ALL",
        requires = "trusted_documents"
    )]
    pub trusted_documents_for_all: bool,

    /// Add a `Server-Timing` header (`db;dur=…, total;dur=…`, in
    /// milliseconds) to GraphQL answers over HTTP, for browsers' developer
    /// tools. Off by default: timings tell any caller, and on the public
    /// internet anyone, how long the database took for their request.
    #[arg(long, env = "SERVER_TIMING")]
    pub server_timing: bool,

    /// Address to serve HTTP on.
    #[arg(long, env = "LISTEN_ADDR", default_value_t = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,

    /// Do not apply pending migrations at start.
    #[arg(long)]
    pub no_migrate: bool,

    /// Once the address is bound, write `{"addr": "host:port", "pid": N}`
    /// to this file (whole, by rename), for tools that start the server
    /// with port 0; poll /readyz for readiness.
    #[arg(long, env = "READY_FILE")]
    pub ready_file: Option<PathBuf>,

    /// Where the managed local PostgreSQL and the generated secret live.
    #[arg(long, env = "VANTAGE_SYNC_DATA_DIR", default_value = ".vantage-sync")]
    pub data_dir: PathBuf,

    /// Most database connections in the pool (default: twice this
    /// machine's CPU cores, at least 4).
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = crate::db::default_max_connections(),
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_connections: u32,

    /// Longest a request waits for a database connection, in seconds: with
    /// the database down, requests fail with 503 SERVICE_UNAVAILABLE after
    /// this.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT_SECS",
          default_value_t = crate::db::DEFAULT_ACQUIRE_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub db_acquire_timeout_secs: u64,

    /// Seconds a client has to send a request's head, from its first byte.
    #[arg(long, env = "HEADER_READ_TIMEOUT_SECS",
          default_value_t = ConnectionLimits::DEFAULT.header_read_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_secs: u64,

    /// Seconds a connection may sit with no request in flight.
    #[arg(long, env = "IDLE_TIMEOUT_SECS",
          default_value_t = ConnectionLimits::DEFAULT.idle_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub idle_timeout_secs: u64,

    /// Most open HTTP connections, WebSockets included (default: what the
    /// open-file limit allows after a reserve for the database).
    #[arg(long, env = "MAX_HTTP_CONNECTIONS",
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub max_http_connections: Option<usize>,

    /// Longest a request may take, in seconds (also the statement timeout).
    #[arg(long, env = "REQUEST_TIMEOUT_SECS", default_value_t = DEFAULT_REQUEST_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_secs: u64,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES,
          value_parser = RangedU64ValueParser::<usize>::new().range(1024..=64 * 1024 * 1024))]
    pub max_body_bytes: usize,

    /// Deepest selection nesting a query may have (13, what introspection
    /// needs, to 64).
    #[arg(long, env = "MAX_QUERY_DEPTH", default_value_t = QueryLimits::DEFAULT.depth,
          value_parser = RangedU64ValueParser::<usize>::new().range(13..=64))]
    pub max_query_depth: usize,

    /// Highest complexity (weighted field count) a query may have.
    #[arg(long, env = "MAX_QUERY_COMPLEXITY", default_value_t = QueryLimits::DEFAULT.complexity,
          value_parser = RangedU64ValueParser::<usize>::new().range(100..=100_000))]
    pub max_query_complexity: usize,

    /// Requests per caller (the token's `sub`, else the client address):
    /// N/s, N/m or N/h, with bursts of N. WebSocket subscribe messages
    /// count too. Off when unset.
    #[arg(long, env = "RATE_LIMIT")]
    pub rate_limit: Option<RateLimit>,

    /// Most database reads one request may make (each distinct root field
    /// weighs its reads); more is refused before any database work.
    #[arg(long, env = "MAX_DB_READS_PER_REQUEST",
          default_value_t = QueryLimits::DEFAULT.db_reads,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub max_db_reads_per_request: usize,

    /// Days of sync events to keep (0: keep everything).
    #[arg(long, env = "EVENT_RETENTION_DAYS", default_value_t = DEFAULT_EVENT_RETENTION_DAYS)]
    pub event_retention_days: u32,

    /// Hours a webhook may fail without a success before it is disabled;
    /// failed deliveries are retried with exponential back-off meanwhile.
    #[arg(long, env = "WEBHOOK_RETRY_HOURS",
          default_value_t = WebhookSettings::DEFAULT.retry_window.as_secs() / 3600,
          value_parser = clap::value_parser!(u64).range(1..=720))]
    pub webhook_retry_hours: u64,

    /// Refuse `startSync` on a resource never registered (UNKNOWN_RESOURCE)
    /// instead of creating it, so a misspelt name in a job's configuration
    /// cannot add a resource.
    #[arg(long, env = "REQUIRE_REGISTERED_RESOURCES")]
    pub require_registered_resources: bool,

    /// Allow webhooks to loopback, private and link-local addresses
    /// (refused by default, after DNS resolution, at creation and at
    /// every delivery).
    #[arg(long, env = "WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,

    /// Most subscriptions one WebSocket connection may hold.
    #[arg(long, env = "MAX_SUBSCRIPTIONS_PER_CONNECTION",
          default_value_t = WebSocketConfig::DEFAULT.max_subscriptions,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000))]
    pub max_subscriptions_per_connection: usize,

    /// Seconds a WebSocket client has to send `connection_init`.
    #[arg(long, env = "WS_INIT_TIMEOUT_SECS",
          default_value_t = WebSocketConfig::DEFAULT.init_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub ws_init_timeout_secs: u64,

    /// Seconds between server keep-alive pings on WebSocket connections
    /// (and between SSE keep-alive comments, which go at least every 15 s).
    #[arg(long, env = "WS_PING_INTERVAL_SECS",
          default_value_t = WebSocketConfig::DEFAULT.ping_interval.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ws_ping_interval_secs: u64,

    /// Seconds a WebSocket peer may leave pings unanswered before it is
    /// dropped (a client gone without closing, e.g. off the network); at
    /// least the ping interval. Checked at each ping, so a dead peer is
    /// dropped within this plus one ping interval.
    #[arg(long, env = "WS_PONG_TIMEOUT_SECS",
          default_value_t = WebSocketConfig::DEFAULT.pong_timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ws_pong_timeout_secs: u64,

    /// Seconds `/readyz` answers 503 after SIGTERM while requests are still
    /// served, before the server stops accepting: set it to the load
    /// balancer's check interval times its fall count, so the balancer
    /// takes the replica out first.
    #[arg(long, env = "SHUTDOWN_DELAY_SECS",
          default_value_t = Leaving::DEFAULT.delay.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_delay_secs: u64,

    /// Seconds requests in flight have to finish once the server stops
    /// accepting; connections still busy then are cut.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_SECS",
          default_value_t = Leaving::DEFAULT.timeout.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_timeout_secs: u64,
}

/// The claim rules' flags, shared by `serve` (to check tokens) and
/// `token` (to mint tokens that pass the same checks).
#[derive(Debug, Clone, Args)]
pub struct ClaimArgs {
    /// When set, a token's `iss` must equal it (Supabase:
    /// https://<ref>.supabase.co/auth/v1); `token` writes it.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, a token's `aud` must contain one of these
    /// (comma-separated); unset, `aud` is not checked. `token` writes
    /// the first.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Dotted path to the role claim (e.g. app_metadata.role); the role
    /// must be anon, authenticated or service_role.
    #[arg(long, env = "JWT_ROLE_CLAIM", default_value = "role")]
    pub jwt_role_claim: String,
}

impl ClaimArgs {
    /// The rules these flags describe.
    pub fn rules(&self) -> Result<ClaimRules, ConfigError> {
        ClaimRules::parse(
            self.jwt_issuer.as_deref(),
            self.jwt_audience.as_deref(),
            &self.jwt_role_claim,
        )
        .map_err(ConfigError::Keys)
    }
}

/// A configuration problem, said so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The token keys or claim rules are missing or unusable.
    #[error("{0}")]
    Keys(String),
    /// The CORS origins are malformed.
    #[error("CORS_ALLOWED_ORIGINS: {0}")]
    Cors(String),
    /// The WebSocket timings contradict each other.
    #[error("{0}")]
    WebSocket(String),
    /// The trusted documents' manifest cannot be used.
    #[error(transparent)]
    TrustedDocuments(#[from] crate::graphql::documents::ManifestError),
}

impl ServeArgs {
    /// The server's settings from these flags, given the database URL and
    /// HS256 secret (if any) to use.
    pub fn server_config(
        &self,
        database_url: String,
        jwt_secret: Option<&[u8]>,
    ) -> Result<ServerConfig, ConfigError> {
        let args = self;
        let rules = args.claims.rules()?;
        let refresh = Duration::from_secs(args.jwks_refresh_secs);
        let jwks = match (&args.jwks_url, &args.jwks_file) {
            (Some(url), _) => {
                let parsed = reqwest::Url::parse(url).map_err(|error| {
                    ConfigError::Keys(format!("JWKS_URL: \"{url}\" is not a URL: {error}"))
                })?;
                if !matches!(parsed.scheme(), "https" | "http") {
                    return Err(ConfigError::Keys(format!(
                        "JWKS_URL: \"{url}\" must be an https:// (or http://) URL"
                    )));
                }
                Some((JwksSource::Url(url.clone()), refresh))
            }
            (None, Some(path)) => Some((JwksSource::File(path.clone()), refresh)),
            (None, None) => None,
        };
        let keys = TokenKeys::from_settings(KeySettings {
            secret: jwt_secret.map(<[u8]>::to_vec),
            jwks,
            rules,
        })
        .map_err(ConfigError::Keys)?;
        let mut config = ServerConfig::with_keys(database_url, keys);
        config.listen_database_url = args.listen_database_url.clone();
        config.prepared_statements = args.db_prepared_statements;
        config.feed_poll_interval = Duration::from_secs(args.feed_poll_secs);
        config.cors = match &args.cors_allowed_origins {
            Some(origins) => CorsOrigins::parse(origins).map_err(ConfigError::Cors)?,
            None => CorsOrigins::default(),
        };
        config.event_retention_days =
            (args.event_retention_days > 0).then_some(args.event_retention_days);
        config.websocket = WebSocketConfig {
            max_subscriptions: args.max_subscriptions_per_connection,
            init_timeout: Duration::from_secs(args.ws_init_timeout_secs),
            ping_interval: Duration::from_secs(args.ws_ping_interval_secs),
            pong_timeout: Duration::from_secs(args.ws_pong_timeout_secs),
        };
        if config.websocket.pong_timeout < config.websocket.ping_interval {
            return Err(ConfigError::WebSocket(format!(
                "WS_PONG_TIMEOUT_SECS ({}) is shorter than WS_PING_INTERVAL_SECS ({}): a peer that answers every ping would be dropped; make it at least the ping interval",
                args.ws_pong_timeout_secs, args.ws_ping_interval_secs
            )));
        }
        config.connections = ConnectionLimits {
            header_read_timeout: Duration::from_secs(args.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(args.idle_timeout_secs),
            max_connections: args.max_http_connections.unwrap_or(0),
        };
        config.rate_limit = args.rate_limit;
        config.read_replica = args.read_database_url.clone().map(|url| ReplicaSettings {
            url,
            max_lag: Duration::from_millis(args.read_max_lag_ms),
        });
        config.leaving = Leaving {
            delay: Duration::from_secs(args.shutdown_delay_secs),
            timeout: Duration::from_secs(args.shutdown_timeout_secs),
        };
        config.webhooks = WebhookSettings {
            retry_window: Duration::from_secs(args.webhook_retry_hours * 3600),
            allow_private: args.webhook_allow_private,
        };
        config.write_rules = WriteRules {
            require_registered_resources: args.require_registered_resources,
        };
        config.listen_addr = args.listen_addr;
        config.server_timing = args.server_timing;
        config.documents = DocumentSettings {
            persisted_queries: !args.no_persisted_queries,
            trusted: match &args.trusted_documents {
                Some(path) => Some(Arc::new(TrustedDocuments::load(path)?)),
                None => None,
            },
            trusted_for_all: args.trusted_documents_for_all,
        };
        config.migrate = !args.no_migrate;
        config.max_connections = args.max_connections;
        config.acquire_timeout = Duration::from_secs(args.db_acquire_timeout_secs);
        config.request_timeout = Duration::from_secs(args.request_timeout_secs);
        config.max_body_bytes = args.max_body_bytes;
        config.limits = QueryLimits {
            depth: args.max_query_depth,
            complexity: args.max_query_complexity,
            db_reads: args.max_db_reads_per_request,
        };
        Ok(config)
    }
}
