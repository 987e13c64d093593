//! Logs and traces: the `tracing` subscriber of the process, and, when an
//! OTLP endpoint is set, OpenTelemetry traces exported over OTLP/HTTP
//! (protobuf) by a batch processor whose queue is bounded.
//!
//! Traces are configured only by the standard `OTEL_*` variables, read and
//! checked once at start ([`TraceSettings::from_env`]). With no endpoint no
//! OpenTelemetry layer is installed: the service's spans are DEBUG spans,
//! which the default log filter leaves disabled, so they cost a callsite's
//! cached "no" each. The exporter never costs a request: a span that finds
//! the queue full is dropped (and counted), and a collector that is down
//! costs the spans of the batches it refused (counted too), with the error
//! logged at most once a minute.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::metrics::{self, SpanDrop};

/// The service name traces carry when neither `OTEL_SERVICE_NAME` nor a
/// `service.name` in `OTEL_RESOURCE_ATTRIBUTES` says otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "vantage-sync";

/// The one protocol the exporter speaks.
const HTTP_PROTOBUF: &str = "http/protobuf";

/// The spans exported: the service's own (the HTTP request, the GraphQL
/// operation, the database calls), not those of the libraries under it.
const TRACED_TARGET: &str = "vantage_sync";

/// How often an export error is logged at most.
const EXPORT_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// The batch processor's settings the service checks itself: the SDK
/// silently ignores values it cannot parse, which would leave an operator
/// believing a setting took.
const BSP_VARIABLES: [&str; 5] = [
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_MAX_CONCURRENT_EXPORTS",
];

/// The samplers `OTEL_TRACES_SAMPLER` may name (those the SDK implements).
const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// Default `OTEL_BSP_MAX_QUEUE_SIZE` (the specification's).
const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;

/// Traces to export, as the `OTEL_*` variables say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSettings {
    /// Where spans are sent: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as
    /// given, else `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces`.
    pub endpoint: String,
    /// Most finished spans waiting for export; more are dropped.
    pub max_queue_size: usize,
}

/// A trace setting that cannot be used, said so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A variable has a value the service cannot use.
    #[error("{variable}={value:?}: {fix}")]
    Invalid {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What to set instead.
        fix: String,
    },
    /// The exporter could not be built.
    #[error("cannot export traces to {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
}

impl TraceSettings {
    /// The settings of this process's environment; `None` when no OTLP
    /// endpoint is set (traces off).
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings `var` gives (a variable's value, if set).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        let set = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let endpoint = match (
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => check_url("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces)?,
            (None, Some(base)) => {
                let base = check_url("OTEL_EXPORTER_OTLP_ENDPOINT", base)?;
                format!("{}/v1/traces", base.trim_end_matches('/'))
            }
            (None, None) => return Ok(None),
        };
        for variable in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = set(variable)
                && protocol.trim() != HTTP_PROTOBUF
            {
                return Err(TelemetryError::Invalid {
                    variable: static_name(variable),
                    value: protocol,
                    fix: format!(
                        "only {HTTP_PROTOBUF} is supported (OTLP over HTTP, port 4318 of a collector): set it to {HTTP_PROTOBUF} or unset it"
                    ),
                });
            }
        }
        if let Some(sampler) = set("OTEL_TRACES_SAMPLER")
            && !SAMPLERS.contains(&sampler.trim())
        {
            return Err(TelemetryError::Invalid {
                variable: "OTEL_TRACES_SAMPLER",
                value: sampler,
                fix: format!("use one of {}", SAMPLERS.join(", ")),
            });
        }
        if let Some(ratio) = set("OTEL_TRACES_SAMPLER_ARG")
            && !ratio
                .trim()
                .parse::<f64>()
                .is_ok_and(|ratio| (0.0..=1.0).contains(&ratio))
        {
            return Err(TelemetryError::Invalid {
                variable: "OTEL_TRACES_SAMPLER_ARG",
                value: ratio,
                fix: "the share of traces to sample: a number from 0 to 1, e.g. 0.1".into(),
            });
        }
        for variable in BSP_VARIABLES {
            if let Some(value) = set(variable)
                && !value.trim().parse::<u64>().is_ok_and(|number| number > 0)
            {
                return Err(TelemetryError::Invalid {
                    variable,
                    value,
                    fix: "a whole number above 0 (milliseconds for delays and timeouts)".into(),
                });
            }
        }
        let max_queue_size = set("OTEL_BSP_MAX_QUEUE_SIZE")
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        Ok(Some(Self {
            endpoint,
            max_queue_size,
        }))
    }
}

/// The `&'static` name of one of the protocol variables.
fn static_name(variable: &str) -> &'static str {
    if variable == "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" {
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
    } else {
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    }
}

fn check_url(variable: &'static str, value: String) -> Result<String, TelemetryError> {
    let value = value.trim().to_owned();
    match reqwest::Url::parse(&value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(value),
        _ => Err(TelemetryError::Invalid {
            variable,
            value,
            fix: "an http:// or https:// URL, e.g. http://localhost:4318 (a collector's OTLP/HTTP port)".into(),
        }),
    }
}

/// What [`init`] installed; dropping it (or [`Telemetry::shutdown`])
/// exports the spans still queued.
#[must_use = "traces stop being exported when this is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn tracing(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is queued and stops the exporter. The batch processor
    /// waits for its thread, so this runs off the async workers.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the process's subscriber: logs to stderr filtered by
/// `RUST_LOG` (else `default_filter`), and, with `traces`, the service's
/// spans exported over OTLP, with each log line in a traced request ending
/// in its `trace_id` and `span_id`.
pub fn init(
    traces: Option<&TraceSettings>,
    default_filter: &str,
    ansi: bool,
) -> Result<Telemetry, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let Some(traces) = traces else {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi)
                    .with_filter(filter),
            )
            .init();
        return Ok(Telemetry { provider: None });
    };
    let provider = provider(traces)?;
    let tracer = provider.tracer(DEFAULT_SERVICE_NAME);
    // Each layer filters for itself: the spans are DEBUG (so that, off,
    // they are never made), exported whatever RUST_LOG says of the logs.
    // Events stay in the log: an internal error's detail (driver text,
    // which may quote values) is for the log only, not for a collector.
    let spans = tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.is_span()
            && *metadata.level() <= tracing::Level::DEBUG
            && metadata.target().starts_with(TRACED_TARGET)
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .event_format(WithTraceIds(Format::default().with_ansi(ansi)))
                .with_filter(filter),
        )
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false)
                .with_filter(spans),
        )
        .init();
    tracing::info!(endpoint = %traces.endpoint, "exporting traces over OTLP/HTTP");
    Ok(Telemetry {
        provider: Some(provider),
    })
}

/// The tracer provider: the resource (service name, `OTEL_RESOURCE_ATTRIBUTES`),
/// the sampler (`OTEL_TRACES_SAMPLER`, read by the SDK), and the exporter
/// behind a bounded batch processor.
fn provider(traces: &TraceSettings) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces.endpoint.clone())
        .build()
        .map_err(|error| TelemetryError::Exporter {
            endpoint: traces.endpoint.clone(),
            message: error.to_string(),
        })?;
    let queued = Arc::new(AtomicUsize::new(0));
    let exporter = CountingExporter {
        inner: exporter,
        queued: queued.clone(),
        errors: Mutex::new(ErrorLog::default()),
    };
    // The SDK reads the other OTEL_BSP_* variables itself.
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(traces.max_queue_size)
        .build();
    let processor = BoundedQueue {
        inner: BatchSpanProcessor::new(exporter, config),
        queued,
        capacity: traces.max_queue_size,
    };
    // Resource::builder() reads OTEL_SERVICE_NAME and
    // OTEL_RESOURCE_ATTRIBUTES; without either naming the service it would
    // be "unknown_service".
    let named = |name: &str| {
        std::env::var(name)
            .ok()
            .is_some_and(|value| !value.trim().is_empty())
    };
    let attributes_name_it =
        std::env::var("OTEL_RESOURCE_ATTRIBUTES")
            .ok()
            .is_some_and(|attributes| {
                attributes
                    .split(',')
                    .any(|pair| pair.trim_start().starts_with("service.name="))
            });
    let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if !named("OTEL_SERVICE_NAME") && !attributes_name_it {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// The batch processor behind a queue bound the service keeps itself, so
/// that what is dropped is known: the SDK counts its own drops but does not
/// tell. A span counts from its end until its batch is handed to the
/// exporter, which is at least as long as the SDK holds it in its channel,
/// so the SDK's channel (as large) never fills and drops nothing itself.
#[derive(Debug)]
struct BoundedQueue {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl SpanProcessor for BoundedQueue {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            metrics::trace_spans_dropped(SpanDrop::QueueFull, 1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// When an export error was last logged, and how many failed since.
#[derive(Debug, Default)]
struct ErrorLog {
    last_logged: Option<Instant>,
    unlogged: u64,
}

/// The OTLP exporter, counting what it exports and what it loses, and
/// logging its errors at most once a minute: a collector that is down
/// fails every batch, and a line per batch would flood the log.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    errors: Mutex<ErrorLog>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        self.queued.fetch_sub(spans, Ordering::Relaxed);
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => metrics::trace_spans_exported(spans as u64),
            Err(error) => {
                metrics::trace_spans_dropped(SpanDrop::ExportFailed, spans as u64);
                self.log_error(error);
            }
        }
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E> CountingExporter<E> {
    fn log_error(&self, error: &dyn std::fmt::Display) {
        let Ok(mut log) = self.errors.lock() else {
            return;
        };
        let now = Instant::now();
        let due = log
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= EXPORT_ERROR_LOG_EVERY);
        if !due {
            log.unlogged += 1;
            return;
        }
        let unlogged = std::mem::take(&mut log.unlogged);
        log.last_logged = Some(now);
        drop(log);
        tracing::warn!(
            %error,
            failed_since_last_logged = unlogged,
            "cannot export traces; their spans are dropped (counted in vantage_sync_trace_spans_dropped_total), and this is logged at most once a minute"
        );
    }
}

/// The default log line, ending with the trace and span ids of the span
/// it was logged in, when that span is traced.
struct WithTraceIds(Format);

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // The OpenTelemetry layer makes an entered span's context current.
        let context = opentelemetry::Context::current();
        let span = context.span();
        let ids = span.span_context();
        if !ids.is_valid() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        writeln!(
            writer,
            "{line} trace_id={} span_id={}",
            ids.trace_id(),
            ids.span_id()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<TraceSettings>, TelemetryError> {
        TraceSettings::from_vars(|name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        })
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(settings(&[]).unwrap(), None);
        assert_eq!(settings(&[("OTEL_SERVICE_NAME", "x")]).unwrap(), None);
    }

    #[test]
    fn endpoints_resolve_as_the_specification_says() {
        let base = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(base.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(base.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
        let traces = settings(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://other:9999/in"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(traces.endpoint, "http://other:9999/in");
        assert_eq!(traces.max_queue_size, 64);
    }

    #[test]
    fn refusals_say_what_to_set() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318");
        let refused = |extra: (&str, &str)| settings(&[endpoint, extra]).unwrap_err().to_string();
        assert!(refused(("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")).contains("only http/protobuf"));
        assert!(
            refused(("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"))
                .starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=")
        );
        assert!(refused(("OTEL_TRACES_SAMPLER", "sometimes")).contains("parentbased_always_on"));
        assert!(refused(("OTEL_TRACES_SAMPLER_ARG", "1.5")).contains("from 0 to 1"));
        assert!(refused(("OTEL_BSP_SCHEDULE_DELAY", "soon")).contains("whole number"));
        assert!(
            settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318")])
                .unwrap_err()
                .to_string()
                .contains("http:// or https://")
        );
        assert!(settings(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).is_ok());
    }
}
