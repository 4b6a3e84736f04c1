//! Tracing, OpenTelemetry and metrics, set up the same way in every service.
//!
//! - [`init`] installs the `tracing` subscriber once per process, with an OTLP
//!   (gRPC) exporter when an endpoint is given (Jaeger listens on 4317).
//! - [`inject_context`] / [`extract_context`] carry W3C `traceparent` across
//!   gRPC metadata and NATS headers, so one request is one trace.
//! - [`metrics_handle`] installs the Prometheus recorder behind `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}: {source}")]
    Exporter { endpoint: String, source: opentelemetry_otlp::ExporterBuildError },
}

/// Flushes buffered spans when dropped; keep it alive for the process.
#[must_use = "dropping the guard flushes and stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Best effort: a collector that is down must not block shutdown.
            let _ = provider.shutdown();
        }
    }
}

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs logging (`RUST_LOG`, default `info`) and, with `otlp_endpoint`,
/// span export. Later calls in the same process (as under `infermesh up`)
/// are no-ops, so every service may call it.
pub fn init(service_name: &str, otlp_endpoint: Option<&str>) -> Result<TelemetryGuard, TelemetryError> {
    if INSTALLED.get().is_some() {
        return Ok(TelemetryGuard { provider: None });
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_owned()).build());
    if let Some(endpoint) = otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|source| TelemetryError::Exporter { endpoint: endpoint.to_owned(), source })?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let otel_layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("infermesh"));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries machine-readable lines (bound addresses).
    let fmt_layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let installed = tracing_subscriber::registry().with(filter).with(fmt_layer).with(otel_layer).try_init().is_ok();
    let _ = INSTALLED.set(());
    Ok(TelemetryGuard { provider: installed.then_some(provider) })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes the current span's context into outgoing gRPC metadata.
pub fn inject_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// The current span's `traceparent` and `tracestate` as header pairs, for
/// transports other than gRPC (NATS headers).
pub fn context_headers() -> Vec<(String, String)> {
    struct Pairs(Vec<(String, String)>);
    impl Injector for Pairs {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    let context = tracing::Span::current().context();
    let mut pairs = Pairs(Vec::new());
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut pairs);
    });
    pairs.0
}

/// Makes `span` a child of the trace named in incoming headers, if any.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}

/// A tonic interceptor that propagates trace context on every client call.
#[derive(Debug, Clone, Copy, Default)]
pub struct PropagateTrace;

impl tonic::service::Interceptor for PropagateTrace {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(request.metadata_mut());
        Ok(request)
    }
}

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Bucket bounds of every histogram, in seconds: every metric we keep as a
/// histogram is a duration, from a gateway's sub-millisecond overhead to a
/// minutes-long stream. Buckets rather than the exporter's default
/// summaries: they add up across gateways, and a sample costs a counter
/// increment instead of a quantile sketch update.
const DURATION_BUCKETS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 120.0,
];

/// The process-wide Prometheus recorder, installed on first use; `None` if
/// another recorder was installed first.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().set_buckets(&DURATION_BUCKETS).ok()?.install_recorder().ok()?;
            // The recorder keeps every histogram sample until something
            // folds them in, which only a scrape would do otherwise: an
            // unscraped gateway grew by every request it served.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
                loop {
                    std::thread::sleep(METRICS_UPKEEP_EVERY);
                    upkeep.run_upkeep();
                }
            });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "no metrics upkeep thread; histogram samples wait for a scrape");
            }
            Some(handle)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_crosses_grpc_metadata() {
        let _guard = init("test", None);
        let root = tracing::info_span!("root");
        let _entered = root.enter();
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_context(&mut metadata);
        let traceparent = metadata.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let Some(traceparent) = traceparent else {
            panic!("no traceparent injected");
        };
        let trace_id = traceparent.split('-').nth(1).map(str::to_owned);

        let headers = metadata.into_headers();
        let child = tracing::info_span!("child");
        adopt_remote_parent(&child, &headers);
        use opentelemetry::trace::TraceContextExt;
        let child_trace = child.context().span().span_context().trace_id().to_string();
        assert_eq!(Some(child_trace), trace_id);
    }
}
