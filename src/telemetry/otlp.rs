//! The OTLP span exporter: built from the standard `OTEL_*` environment, batched on the
//! SDK's own thread (its blocking HTTP client never runs on a tokio worker), flushed at exit.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use opentelemetry_sdk::Resource;

/// How long the exit flush may take; a collector that is down must not hold up shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The span exporter, if one runs. Keep it until the runtime finished, then
/// [`shutdown`](Telemetry::shutdown) it.
#[must_use = "call shutdown() at exit, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub(super) fn tracer(&self) -> Option<Tracer> {
        self.provider.as_ref().map(|p| p.tracer("spillway"))
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still batched, within a few seconds. Call it outside the runtime.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown_with_timeout(FLUSH_TIMEOUT) {
                tracing::warn!(error = %e, "the last spans may not have been exported");
            }
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    env(name).is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// The exporter the environment asks for, and why there is none when it asked but
/// building failed (a sidecar does not refuse to start over its traces).
pub(super) fn from_env() -> (Telemetry, Option<String>) {
    let none = Telemetry { provider: None };
    let asked = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    if !asked || env_is("OTEL_SDK_DISABLED", "true") || env_is("OTEL_TRACES_EXPORTER", "none") {
        return (none, None);
    }
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if endpoint.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https:")) {
        // The exporter's client is built without TLS: spillway's own TLS stack is ring-based
        // rustls, and the exporter's would bring a second crypto provider.
        return (
            none,
            Some("the OTLP endpoint is https, which this build does not speak; point it at an http:// collector next to spillway".into()),
        );
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            return (
                none,
                Some(format!("the OTLP exporter cannot be built: {e}")),
            )
        }
    };
    let mut resource = Resource::builder();
    let named = env("OTEL_SERVICE_NAME").is_some()
        || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
    if !named {
        resource = resource.with_service_name("spillway");
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // The batch processor reads OTEL_BSP_* (schedule delay, queue and batch sizes).
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    (
        Telemetry {
            provider: Some(provider),
        },
        None,
    )
}
