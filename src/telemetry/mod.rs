//! Logs and traces.
//!
//! Logging: human text by default, JSON with `SPILLWAY_LOG_FORMAT=json`; the filter comes
//! from `SPILLWAY_LOG`, else `RUST_LOG`, else `info`.
//!
//! Traces: spans (`proxy.request`, `proxy.accept`, `proxy.attempt`, `dispatch.attempt`)
//! annotate log lines only when the filter asks for debug (at info they would cost every
//! request their formatting for the rare line inside one; events there name their route).
//! They are exported over OTLP/HTTP (protobuf) only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and neither `OTEL_SDK_DISABLED=true` nor
//! `OTEL_TRACES_EXPORTER=none` is. Without them no exporter exists, no trace context is
//! written on outgoing requests, and below debug no span is created at all. W3C trace
//! context moves through [`continue_from`], [`continue_from_traceparent`], [`inject`] and
//! [`traceparent`].
//!
//! Integer span fields are recorded as `i64`: tracing-opentelemetry exports other integer
//! types as strings.

mod otlp;

use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::Tracer;
use tracing::{Dispatch, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use otlp::Telemetry;

/// Sets up logging, and span export when the OTLP environment asks for it. Call it before
/// the tokio runtime starts (the exporter's HTTP client must not be built inside it), and
/// call [`Telemetry::shutdown`] after the runtime finished, to flush the last spans.
pub fn init() -> Telemetry {
    let filter = std::env::var("SPILLWAY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SPILLWAY_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let (telemetry, problem) = otlp::from_env();
    let _ = subscriber(filter, json, telemetry.tracer()).try_init();
    if let Some(problem) = problem {
        tracing::warn!(%problem, "spans are not exported");
    } else if telemetry.exporting() {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!("exporting spans over OTLP/HTTP");
    }
    telemetry
}

/// The subscriber [`init`] installs: the log (text or JSON on stderr, filtered by `filter`)
/// and, with a tracer, the span export layer. A `Dispatch` rather than a boxed subscriber, so
/// every callsite check goes through one dynamic call, not two.
fn subscriber(filter: EnvFilter, json: bool, tracer: Option<Tracer>) -> Dispatch {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never in files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    // Spans reach the log only when it asks for debug detail: at info the request spans'
    // fields were formatted for every request (a few µs of an accept) to annotate the rare
    // line inside one. Without an exporter they are then not created at all.
    let detail = filter
        .max_level_hint()
        .is_some_and(|l| l >= LevelFilter::DEBUG);
    let spans = filter_fn(move |m| detail || !m.is_span());
    let log = tracing_subscriber::registry().with(fmt.with_filter(filter.and(spans)));
    // Not `.with(export)` of an `Option`: an absent layer counts as one that wants every
    // span, so the registry would still create (and close) a span per request for nobody.
    match tracer {
        // Only spillway's own spans are exported: never the HTTP client's or the exporter's.
        Some(tracer) => Dispatch::new(
            log.with(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(Targets::new().with_target("spillway", LevelFilter::INFO)),
            ),
        ),
        None => Dispatch::new(log),
    }
}

/// Set once by [`init`] when spans are exported. Without an exporter no span has an
/// OpenTelemetry context, so the request path skips propagation altogether.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Makes `span` a child of the W3C trace context in `headers`. Absent or malformed
/// context leaves `span` a root.
pub fn continue_from(span: &Span, headers: &HeaderMap) {
    if !exporting() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        if let Err(e) = span.set_parent(cx) {
            tracing::debug!(error = %e, "trace context not applied");
        }
    }
}

/// [`continue_from`] for a stored `traceparent` value.
pub fn continue_from_traceparent(span: &Span, traceparent: &str) {
    let Ok(value) = http::HeaderValue::from_str(traceparent) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", value);
    continue_from(span, &headers);
}

/// Writes `span`'s context as `traceparent` (and `tracestate`) into `headers`, replacing
/// what was there. Does nothing when spans are not exported.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if !exporting() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// `span`'s context as a `traceparent` value, when spans are exported.
pub fn traceparent(span: &Span) -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(span, &mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_span() -> Span {
        tracing::info_span!("proxy.accept", route = "r")
    }

    // One test, cases in sequence: tracing caches each callsite's interest across every
    // live dispatcher, so subscribers of tests running side by side would see each other's.
    #[test]
    fn a_request_span_exists_only_for_a_debug_log_or_an_exporter() {
        let info = subscriber(EnvFilter::new("info"), false, None);
        tracing::dispatcher::with_default(&info, || {
            assert!(request_span().is_disabled(), "a span was created at info");
            // Events still reach the log.
            assert!(tracing::enabled!(tracing::Level::INFO));
        });
        let json = subscriber(EnvFilter::new("warn"), true, None);
        tracing::dispatcher::with_default(&json, || {
            assert!(request_span().is_disabled(), "a span was created at warn");
        });
        let debug = subscriber(EnvFilter::new("debug"), false, None);
        tracing::dispatcher::with_default(&debug, || {
            assert!(!request_span().is_disabled(), "no span for the debug log");
        });
        // A provider without an exporter: the layer still wants spillway's spans.
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "test");
        let export = subscriber(EnvFilter::new("info"), false, Some(tracer));
        tracing::dispatcher::with_default(&export, || {
            assert!(!request_span().is_disabled(), "no span for the exporter");
        });
    }

    #[test]
    fn without_an_exporter_nothing_is_injected() {
        let span = tracing::info_span!("test");
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        continue_from(&span, &headers);
        inject(&span, &mut headers);
        assert_eq!(
            headers["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(traceparent(&span), None);
    }
}
