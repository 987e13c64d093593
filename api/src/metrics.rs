//! Prometheus metrics, served as text on `/metrics`. Labels take only a
//! few fixed values (never client-chosen names), so a client cannot grow
//! the registry.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Kind of GraphQL operation.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Operation {
    /// A query (including introspection).
    Query,
    /// A mutation.
    Mutation,
    /// A subscription over GraphQL over SSE (timed to its first byte).
    Subscription,
    /// Refused before it could be classified (bad JSON, bad token, ...).
    Unknown,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Outcome {
    /// No errors.
    Ok,
    /// GraphQL errors in the response.
    Error,
    /// Refused at the HTTP layer (body, token, method, timeout).
    Rejected,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: Operation,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: Operation,
}

/// How a fetch of the JSON Web Key Set ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum JwksOutcome {
    /// A valid set was loaded.
    Ok,
    /// The fetch or the set failed; the last good set stays.
    Failed,
}

/// How a document sent by reference (persisted-query hash,
/// `documentId`), or a text held to the trusted documents, was settled.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum PersistedLookup {
    /// A reference found its document.
    Hit,
    /// A reference named no known document (PERSISTED_QUERY_NOT_FOUND).
    Miss,
    /// A text sent with its hash was remembered (or was already).
    Registered,
    /// A text not in the trusted documents (PERSISTED_QUERY_REQUIRED).
    Refused,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PersistedLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwksLabels {
    outcome: JwksOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    state: &'static str,
}

/// The service's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<OperationLabels, Histogram>,
    pool: Family<PoolLabels, Gauge>,
    subscriptions: Gauge,
    groups: Gauge,
    renders: Counter,
    fell_behind: Counter,
    written_directly: Counter,
    delivered: Counter,
    reconnects: Counter,
    unannounced: Counter,
    jwks_refreshes: Family<JwksLabels, Counter>,
    jwks_keys: Gauge,
    delay: Histogram,
    connections: Gauge,
    connections_closed: Family<ClosedLabels, Counter>,
    rate_limited: Counter,
    persisted: Family<PersistedLabels, Counter>,
    notifications: Counter,
    webhook_attempts: Family<AttemptLabels, Counter>,
    webhook_retries: Counter,
    webhooks_disabled: Counter,
    webhook_latency: Histogram,
    notify_rounds_failed: Counter,
    notify_last_round: Gauge,
    query_reads: Family<TargetLabels, Counter>,
    replica_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    replica_usable: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: ReadTarget,
}

/// Which database a query's transaction read from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReadTarget {
    /// The primary (`DATABASE_URL`).
    Primary,
    /// The read replica (`READ_DATABASE_URL`).
    Replica,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    reason: ConnectionClosed,
}

/// Why the server closed an HTTP connection itself.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ConnectionClosed {
    /// Past the cap on open connections: closed as soon as accepted.
    OverCap,
    /// Its request head did not arrive within the header-read timeout.
    SlowHeaders,
    /// Idle (no request in flight) longer than the idle timeout.
    Idle,
    /// A WebSocket peer answered no ping within the pong timeout.
    PongTimeout,
}

/// Why a finished span was not exported.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum SpanDrop {
    /// The export queue (`OTEL_BSP_MAX_QUEUE_SIZE`) was full.
    QueueFull,
    /// Its batch's export failed.
    ExportFailed,
}

impl SpanDrop {
    fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpanDropLabels {
    reason: &'static str,
}

/// Spans exported, process-wide: the trace exporter is the process's
/// (installed with the subscriber, before any server's registry exists).
static TRACE_SPANS_EXPORTED: std::sync::LazyLock<Counter> =
    std::sync::LazyLock::new(Counter::default);
/// Spans dropped, process-wide, by why; both reasons shown from the start.
static TRACE_SPANS_DROPPED: std::sync::LazyLock<Family<SpanDropLabels, Counter>> =
    std::sync::LazyLock::new(|| {
        let dropped = Family::default();
        for reason in [SpanDrop::QueueFull, SpanDrop::ExportFailed] {
            let _ = dropped.get_or_create(&SpanDropLabels {
                reason: reason.label(),
            });
        }
        dropped
    });

/// Counts `spans` exported.
pub fn trace_spans_exported(spans: u64) {
    TRACE_SPANS_EXPORTED.inc_by(spans);
}

/// Counts `spans` dropped for `reason`.
pub fn trace_spans_dropped(reason: SpanDrop, spans: u64) {
    TRACE_SPANS_DROPPED
        .get_or_create(&SpanDropLabels {
            reason: reason.label(),
        })
        .inc_by(spans);
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vantage_sync");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "graphql_requests",
            "GraphQL HTTP requests by operation and outcome",
            requests.clone(),
        );
        let latency = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms to about 16 s.
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "graphql_request_duration_seconds",
            "Time to answer a GraphQL HTTP request",
            latency.clone(),
        );
        let pool = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "db_pool_connections",
            "Database pool connections by state",
            pool.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions_active",
            "Subscriptions currently open",
            subscriptions.clone(),
        );
        let groups = Gauge::default();
        registry.register(
            "subscription_groups",
            "Distinct live subscriptions (same document, variables and role) with members",
            groups.clone(),
        );
        let renders = Counter::default();
        registry.register(
            "subscription_renders",
            "Changes rendered for a group of subscribers (one per group and change), or by a \
             subscriber that fell behind its group and catches up from the log",
            renders.clone(),
        );
        let fell_behind = Counter::default();
        registry.register(
            "subscription_fell_behind",
            "Times a subscriber could not take a change when it came and caught up from the event log",
            fell_behind.clone(),
        );
        let written_directly = Counter::default();
        registry.register(
            "subscription_written_directly",
            "Changes the renderer wrote straight to a subscriber's socket, without waking its \
             connection (a subset of the delivered ones)",
            written_directly.clone(),
        );
        let delivered = Counter::default();
        registry.register(
            "subscription_events_delivered",
            "Changes sent to subscribers (one per subscriber and change)",
            delivered.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "feed_listener_reconnects",
            "Times the live feed's LISTEN connection was rebuilt",
            reconnects.clone(),
        );
        let unannounced = Counter::default();
        registry.register(
            "feed_unannounced_events",
            "Changes the live feed found by polling that no notification announced \
             (LISTEN_DATABASE_URL is not a session connection, or notifications are lost)",
            unannounced.clone(),
        );
        let jwks_refreshes = Family::<JwksLabels, Counter>::default();
        registry.register(
            "jwks_refreshes",
            "Loads of the JSON Web Key Set by outcome",
            jwks_refreshes.clone(),
        );
        let jwks_keys = Gauge::default();
        registry.register(
            "jwks_keys",
            "Verification keys in the JSON Web Key Set in use",
            jwks_keys.clone(),
        );
        let delay = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "subscription_delivery_delay_seconds",
            "Delay from a change to its sending to a subscriber",
            delay.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "http_connections_open",
            "HTTP connections open (WebSocket connections included)",
            connections.clone(),
        );
        let connections_closed = Family::<ClosedLabels, Counter>::default();
        registry.register(
            "http_connections_closed",
            "HTTP connections the server closed itself, by reason",
            connections_closed.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests and WebSocket subscribe messages refused by the rate limit",
            rate_limited.clone(),
        );
        let persisted = Family::<PersistedLabels, Counter>::default();
        registry.register(
            "persisted_queries",
            "Documents sent by reference (persisted-query hash or documentId), by result: hit, miss; texts remembered by their hash (registered); texts refused for not being trusted documents (refused)",
            persisted.clone(),
        );
        let notifications = Counter::default();
        registry.register(
            "notifications_made",
            "Notifications made from the event log and alerts (once, whatever the replicas)",
            notifications.clone(),
        );
        let webhook_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed)",
            webhook_attempts.clone(),
        );
        let webhook_retries = Counter::default();
        registry.register(
            "webhook_retries_scheduled",
            "Failed webhook deliveries that will be retried after a back-off",
            webhook_retries.clone(),
        );
        let webhooks_disabled = Counter::default();
        registry.register(
            "webhooks_disabled",
            "Webhooks disabled (410 Gone, or failing for the whole retry window)",
            webhooks_disabled.clone(),
        );
        // 1 ms to about 15 minutes; a delivery that waited out longer retries
        // (the back-off reaches an hour) counts only in +Inf.
        let webhook_latency = Histogram::new(exponential_buckets(0.001, 2.5, 16));
        registry.register(
            "webhook_delivery_latency_seconds",
            "Time from a notification's change to its successful delivery",
            webhook_latency.clone(),
        );
        let notify_rounds_failed = Counter::default();
        registry.register(
            "notify_rounds_failed",
            "Rounds of the webhook worker that failed (tried again on its next wake-up; answers kept)",
            notify_rounds_failed.clone(),
        );
        let notify_last_round = Gauge::default();
        registry.register(
            "notify_last_round_timestamp_seconds",
            "Unix time of the webhook worker's last committed round (at least every second while it runs)",
            notify_last_round.clone(),
        );
        let query_reads = Family::<TargetLabels, Counter>::default();
        registry.register(
            "query_transactions",
            "Query transactions by the database they read (Primary, or Replica when READ_DATABASE_URL is set and usable)",
            query_reads.clone(),
        );
        let replica_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "read_replica_lag_seconds",
            "How far the read replica's replay was behind the primary at the last check",
            replica_lag.clone(),
        );
        let replica_usable = Gauge::default();
        registry.register(
            "read_replica_usable",
            "1 while queries may read from the read replica (reachable, within READ_MAX_LAG_MS), else 0",
            replica_usable.clone(),
        );
        // Process-wide, as the exporter is: every registry shows the same.
        registry.register(
            "trace_spans_exported",
            "Spans exported over OTLP",
            TRACE_SPANS_EXPORTED.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not exported: the export queue was full (queue_full), or the collector refused or could not be reached (export_failed)",
            TRACE_SPANS_DROPPED.clone(),
        );
        Self {
            registry,
            query_reads,
            replica_lag,
            replica_usable,
            notifications,
            notify_rounds_failed,
            notify_last_round,
            webhook_attempts,
            webhook_retries,
            webhooks_disabled,
            webhook_latency,
            rate_limited,
            persisted,
            connections,
            connections_closed,
            requests,
            latency,
            pool,
            subscriptions,
            groups,
            renders,
            fell_behind,
            written_directly,
            delivered,
            reconnects,
            unannounced,
            jwks_refreshes,
            jwks_keys,
            delay,
        }
    }
}

impl Metrics {
    /// Counts one request and its duration.
    pub fn record_request(&self, operation: Operation, outcome: Outcome, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { operation, outcome })
            .inc();
        self.latency
            .get_or_create(&OperationLabels { operation })
            .observe(seconds);
    }

    /// An HTTP connection opened; counted open until the guard drops.
    pub fn connection_opened(self: &std::sync::Arc<Self>) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.clone())
    }

    /// A request or subscribe message over its caller's rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// A document settled by reference, or refused, as `result` says.
    pub fn persisted_lookup(&self, result: PersistedLookup) {
        let result = match result {
            PersistedLookup::Hit => "hit",
            PersistedLookup::Miss => "miss",
            PersistedLookup::Registered => "registered",
            PersistedLookup::Refused => "refused",
        };
        self.persisted
            .get_or_create(&PersistedLabels { result })
            .inc();
    }

    /// The server closed a connection itself, for `reason`.
    pub fn connection_closed(&self, reason: ConnectionClosed) {
        self.connections_closed
            .get_or_create(&ClosedLabels { reason })
            .inc();
    }

    /// A subscription opened; closes when the guard drops.
    pub fn subscription_opened(self: &std::sync::Arc<Self>) -> SubscriptionGuard {
        self.subscriptions.inc();
        SubscriptionGuard(self.clone())
    }

    /// A group of identical subscriptions formed; it is counted until the
    /// guard drops.
    pub fn group_formed(self: &std::sync::Arc<Self>) -> GroupGuard {
        self.groups.inc();
        GroupGuard(self.clone())
    }

    /// A change rendered once, for a group or a subscriber catching up.
    pub fn change_rendered(&self) {
        self.renders.inc();
    }

    /// A subscriber fell behind its group and reads the log.
    pub fn subscriber_fell_behind(&self) {
        self.fell_behind.inc();
    }

    /// Changes written to subscribers' sockets by the renderer itself:
    /// `writes` of them, each `delay_seconds` after it happened.
    pub fn events_written_directly(&self, delay_seconds: f64, writes: u64) {
        self.written_directly.inc_by(writes);
        self.delivered.inc_by(writes);
        // One after another on this core: the histogram's lock moves
        // between cores once per run, not once per write.
        for _ in 0..writes {
            self.delay.observe(delay_seconds.max(0.0));
        }
    }

    /// One change sent to one subscriber, `delay_seconds` after it happened.
    pub fn event_delivered(&self, delay_seconds: f64) {
        self.delivered.inc();
        self.delay.observe(delay_seconds.max(0.0));
    }

    /// The feed's listener connection was rebuilt.
    pub fn listener_reconnected(&self) {
        self.reconnects.inc();
    }

    /// The feed's poll found `count` changes no notification announced.
    pub fn unannounced_events(&self, count: u64) {
        self.unannounced.inc_by(count);
    }

    /// A load of the JSON Web Key Set ended; `keys` is the size of the set
    /// in use afterwards.
    pub fn jwks_loaded(&self, outcome: JwksOutcome, keys: usize) {
        self.jwks_refreshes
            .get_or_create(&JwksLabels { outcome })
            .inc();
        self.jwks_keys.set(i64::try_from(keys).unwrap_or(i64::MAX));
    }

    /// A round of the webhook worker committed, making `count`
    /// notifications.
    pub fn notify_round(&self, count: u64) {
        self.notifications.inc_by(count);
        self.notify_last_round.set(chrono::Utc::now().timestamp());
    }

    /// A query's transaction began on `target`.
    pub fn query_read(&self, target: ReadTarget) {
        self.query_reads
            .get_or_create(&TargetLabels { target })
            .inc();
    }

    /// The read replica's lag at the last check.
    pub fn replica_lag(&self, seconds: f64) {
        self.replica_lag.set(seconds);
    }

    /// Whether queries may read from the read replica.
    pub fn replica_usable(&self, usable: bool) {
        self.replica_usable.set(i64::from(usable));
    }

    /// A round of the webhook worker failed.
    pub fn notify_round_failed(&self) {
        self.notify_rounds_failed.inc();
    }

    /// A webhook delivery succeeded, `latency_seconds` after its change.
    pub fn webhook_delivered(&self, latency_seconds: f64) {
        self.webhook_attempts
            .get_or_create(&AttemptLabels {
                outcome: "delivered",
            })
            .inc();
        self.webhook_latency.observe(latency_seconds.max(0.0));
    }

    /// A webhook delivery failed; `retried` if it will be tried again.
    pub fn webhook_failed(&self, retried: bool) {
        self.webhook_attempts
            .get_or_create(&AttemptLabels { outcome: "failed" })
            .inc();
        if retried {
            self.webhook_retries.inc();
        }
    }

    /// A webhook was disabled.
    pub fn webhook_disabled(&self) {
        self.webhooks_disabled.inc();
    }

    /// The metrics as Prometheus text, with the pool's current state.
    pub fn render(&self, pool_size: u32, pool_idle: usize) -> String {
        let idle = i64::try_from(pool_idle).unwrap_or(i64::MAX);
        self.pool
            .get_or_create(&PoolLabels { state: "idle" })
            .set(idle);
        self.pool
            .get_or_create(&PoolLabels { state: "in_use" })
            .set(i64::from(pool_size) - idle);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Counts an open subscription until dropped.
#[derive(Debug)]
pub struct SubscriptionGuard(std::sync::Arc<Metrics>);

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.0.subscriptions.dec();
    }
}

/// Counts a group of subscriptions until dropped.
#[derive(Debug)]
pub struct GroupGuard(std::sync::Arc<Metrics>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.0.groups.dec();
    }
}

/// Counts an open HTTP connection until dropped.
#[derive(Debug)]
pub struct ConnectionGuard(std::sync::Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}
