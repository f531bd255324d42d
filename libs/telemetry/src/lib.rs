//! Telemetry for every Socle process, set up by one [`init`] call that
//! returns a guard flushing exporters when dropped.
//!
//! - Logs: `tracing` events as JSON lines on stdout (or human-readable with
//!   `log_format = "pretty"`), filtered by `log_level` (an `EnvFilter`
//!   directive, overridden by `RUST_LOG`). Messages are lowercase with
//!   structured fields; secrets never go in fields (the config types redact them).
//! - Traces and metrics: exported over OTLP/gRPC when `otlp_endpoint` is
//!   set; otherwise no exporter runs and the global providers are no-ops.
//! - W3C trace context (`traceparent`/`tracestate`) is extracted from
//!   incoming headers with [`extract_context`] and injected into outgoing
//!   ones with [`inject_context`].
//! - RED metrics per RPC through [`RpcMetrics`].

use std::time::Duration;

use opentelemetry::{
    KeyValue, global,
    metrics::{Counter, Histogram},
    propagation::{Extractor, Injector},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator, trace::SdkTracerProvider,
};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (production, default).
    #[default]
    Json,
    /// Human-readable, for a developer's terminal.
    Pretty,
}

/// Telemetry configuration (`[telemetry]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// An `EnvFilter` directive, e.g. `info,socle_crm=debug`. `RUST_LOG` wins.
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`.
    /// Unset: no traces or metrics are exported.
    pub otlp_endpoint: Option<String>,
    /// Fraction of root traces sampled, 0.0–1.0.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            log_level: "info".into(),
            log_format: LogFormat::Json,
            otlp_endpoint: None,
            trace_sample_ratio: 1.0,
        }
    }
}

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter is invalid.
    #[error("telemetry.log_level: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built.
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(String),
    /// A global subscriber is already installed.
    #[error("telemetry is already initialised")]
    AlreadyInitialised,
}

/// Flushes and shuts down exporters when dropped.
#[must_use = "dropping the guard shuts telemetry down"]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take() {
            let _ = tracer.shutdown();
        }
        if let Some(meter) = self.meter.take() {
            let _ = meter.shutdown();
        }
    }
}

/// Installs the global subscriber, propagator and providers for `service`.
/// Call once, from `main`, inside the tokio runtime.
pub fn init(service: &'static str, settings: &TelemetrySettings) -> Result<TelemetryGuard, TelemetryError> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = match std::env::var("RUST_LOG") {
        Ok(directive) if !directive.is_empty() => EnvFilter::try_new(directive),
        _ => EnvFilter::try_new(&settings.log_level),
    }
    .map_err(|e| TelemetryError::Filter(e.to_string()))?;

    let resource = Resource::builder().with_service_name(service).build();
    let (tracer, meter) = match &settings.otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let tracer = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
                    opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(settings.trace_sample_ratio),
                )))
                .with_resource(resource.clone())
                .build();
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let meter = SdkMeterProvider::builder().with_periodic_exporter(metrics).with_resource(resource).build();
            global::set_tracer_provider(tracer.clone());
            global::set_meter_provider(meter.clone());
            (Some(tracer), Some(meter))
        }
    };

    let otel_layer =
        tracer.as_ref().map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service)));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    let result = match settings.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer().compact()).try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInitialised)?;
    Ok(TelemetryGuard { tracer, meter })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// The remote trace context carried by `headers` (W3C `traceparent`).
pub fn extract_context(headers: &http::HeaderMap) -> opentelemetry::Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Makes `span` a child of the trace context carried by `headers`.
pub fn set_parent_from(span: &tracing::Span, headers: &http::HeaderMap) {
    let _ = span.set_parent(extract_context(headers));
}

/// The trace id of the current span (32 lowercase hex), or an empty
/// string when there is no valid trace (no tracer installed).
pub fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if span_context.is_valid() { span_context.trace_id().to_string() } else { String::new() }
}

/// Writes the current span's trace context into `headers`.
pub fn inject_context(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    global::get_text_map_propagator(|p| p.inject_context(&context, &mut HeaderInjector(headers)));
}

/// RED metrics (rate, errors, duration) per RPC, following the OpenTelemetry
/// RPC semantic conventions.
#[derive(Clone)]
pub struct RpcMetrics {
    requests: Counter<u64>,
    duration: Histogram<f64>,
}

impl RpcMetrics {
    /// Instruments on the global meter for `service`.
    pub fn new(service: &'static str) -> Self {
        Self::from_meter(&global::meter(service))
    }

    /// Instruments on a given meter (tests read them back from their own provider).
    pub fn from_meter(meter: &opentelemetry::metrics::Meter) -> Self {
        RpcMetrics {
            requests: meter
                .u64_counter("rpc.server.requests")
                .with_description("RPCs handled, by method and status code")
                .build(),
            duration: meter
                .f64_histogram("rpc.server.duration")
                .with_unit("s")
                .with_description("RPC handling time")
                .build(),
        }
    }

    /// Records one finished RPC.
    pub fn record(&self, system: &'static str, service: &str, method: &str, code: &str, elapsed: Duration) {
        let attributes = [
            KeyValue::new("rpc.system", system),
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
            KeyValue::new("rpc.grpc.status_code", code.to_owned()),
        ];
        self.requests.add(1, &attributes);
        self.duration.record(elapsed.as_secs_f64(), &attributes);
    }
}

/// RED metrics of HTTP requests at the edge, following the OpenTelemetry
/// HTTP semantic conventions (the route template is not a label: it would
/// multiply series by the number of routes; traces carry it).
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Counter<u64>,
    duration: Histogram<f64>,
}

impl HttpMetrics {
    /// Instruments on the global meter for `service`.
    pub fn new(service: &'static str) -> Self {
        Self::from_meter(&global::meter(service))
    }

    /// Instruments on a given meter.
    pub fn from_meter(meter: &opentelemetry::metrics::Meter) -> Self {
        HttpMetrics {
            requests: meter
                .u64_counter("http.server.requests")
                .with_description("HTTP requests handled, by method, status and protocol")
                .build(),
            duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("HTTP request handling time")
                .build(),
        }
    }

    /// Records one finished request; `protocol` is `rest`, `grpc` or `grpc-web`.
    pub fn record(&self, method: &str, status: u16, protocol: &'static str, elapsed: Duration) {
        let attributes = [
            KeyValue::new("http.request.method", method.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("socle.protocol", protocol),
        ];
        self.requests.add(1, &attributes);
        self.duration.record(elapsed.as_secs_f64(), &attributes);
    }
}
