//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spillway exports its spans over
//! OTLP/HTTP (protobuf), and a deferred job's delivery attempts join the trace of the
//! request that created it. A small OTLP receiver on 127.0.0.1 decodes what arrives.
//!
//! The trace, as designed:
//! client span P ─▶ `proxy.request` ─▶ `proxy.accept` ─▶ `dispatch.attempt` (one per attempt)
//! and each attempt's request carries `traceparent: 00-<trace>-<attempt span>-01`.

mod support;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use support::{eventually, send, Action, FlakyUpstream, Spillway};
use tokio::net::TcpListener;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP trace receiver: `POST /v1/traces` with a protobuf body.
struct Collector {
    endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut s = store.lock();
                            for rs in export.resource_spans {
                                for ss in rs.scope_spans {
                                    s.extend(ss.spans);
                                }
                            }
                            let mut rsp = Response::new(Full::new(Bytes::new()));
                            rsp.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, Infallible>(rsp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector {
            endpoint,
            spans,
            task,
        }
    }

    fn named(&self, name: &str) -> Vec<Span> {
        self.spans
            .lock()
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.clone())
        .and_then(|v| v.value)
}

fn int(span: &Span, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::IntValue(i)) => i,
        other => panic!("{key} of {} is {other:?}", span.name),
    }
}

fn string(span: &Span, key: &str) -> String {
    match attr(span, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key} of {} is {other:?}", span.name),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn delivery_attempts_are_children_of_the_accepting_request_and_propagate_their_context() {
    let collector = Collector::start().await;
    let up = FlakyUpstream::start(|n, _| Action::status(if n == 0 { 503 } else { 200 })).await;
    let config = format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{}
    deferrable: true
    timeout: 5s
    retry:
      max_attempts: 5
      backoff: {{ initial: 100ms, max: 100ms, jitter: none }}
",
        up.addr
    );
    let sw = Spillway::start_with_env(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );

    let req = Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let accepted = send(sw.proxy, req).await;
    assert_eq!(accepted.status, 202);
    let job_id = accepted.header("spillway-job-id").unwrap().to_owned();

    eventually("two attempts upstream", || async { up.count() == 2 }).await;
    eventually("the spans exported", || async {
        collector.named("dispatch.attempt").len() == 2
            && collector.named("proxy.accept").len() == 1
            && collector.named("proxy.request").len() == 1
    })
    .await;

    let request = &collector.named("proxy.request")[0];
    assert_eq!(hex(&request.trace_id), TRACE);
    assert_eq!(hex(&request.parent_span_id), CLIENT_SPAN);
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(string(request, "route"), "hooks");
    assert_eq!(string(request, "mode"), "deferred");
    assert_eq!(int(request, "status"), 202);

    let accept = &collector.named("proxy.accept")[0];
    assert_eq!(hex(&accept.trace_id), TRACE);
    assert_eq!(accept.parent_span_id, request.span_id);
    assert_eq!(string(accept, "job_id"), job_id);
    assert_eq!(accept.kind, SpanKind::Producer as i32);

    let mut attempts = collector.named("dispatch.attempt");
    attempts.sort_by_key(|s| int(s, "attempt"));
    let seen = up.requests();
    for (i, (attempt, status)) in attempts.iter().zip([503, 200]).enumerate() {
        assert_eq!(hex(&attempt.trace_id), TRACE, "attempt {}", i + 1);
        // A child of the accept span, not of the (long finished) client span.
        assert_eq!(attempt.parent_span_id, accept.span_id, "attempt {}", i + 1);
        assert_eq!(attempt.kind, SpanKind::Client as i32);
        assert_eq!(int(attempt, "attempt"), i as i64 + 1);
        assert_eq!(string(attempt, "job_id"), job_id);
        assert_eq!(string(attempt, "route"), "hooks");
        assert_eq!(int(attempt, "status"), status);
        // The upstream saw this attempt's context: same trace, the attempt as parent.
        assert_eq!(
            seen[i].headers["traceparent"],
            format!("00-{TRACE}-{}-01", hex(&attempt.span_id)).as_str(),
            "attempt {}",
            i + 1
        );
    }
    assert_ne!(attempts[0].span_id, attempts[1].span_id);
}

#[tokio::test]
async fn passthrough_attempts_continue_the_callers_trace() {
    let collector = Collector::start().await;
    let up = FlakyUpstream::start(|n, _| Action::status(if n == 0 { 503 } else { 200 })).await;
    let config = format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
routes:
  - name: api
    match: {{ host: api.test }}
    upstream: http://{}
    retry:
      max_attempts: 2
      retry_on: [503]
      backoff: {{ initial: 10ms, max: 10ms, jitter: none }}
",
        up.addr
    );
    let sw = Spillway::start_with_env(
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let req = Request::get("/x")
        .header("host", "api.test")
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(sw.proxy, req).await.status, 200);

    eventually("the spans exported", || async {
        collector.named("proxy.attempt").len() == 2 && collector.named("proxy.request").len() == 1
    })
    .await;
    let request = &collector.named("proxy.request")[0];
    assert_eq!(hex(&request.trace_id), TRACE);
    assert_eq!(hex(&request.parent_span_id), CLIENT_SPAN);
    let mut attempts = collector.named("proxy.attempt");
    attempts.sort_by_key(|s| int(s, "attempt"));
    let seen = up.requests();
    for (i, (attempt, status)) in attempts.iter().zip([503, 200]).enumerate() {
        assert_eq!(attempt.parent_span_id, request.span_id);
        assert_eq!(int(attempt, "status"), status);
        assert_eq!(string(attempt, "route"), "api");
        assert_eq!(
            seen[i].headers["traceparent"],
            format!("00-{TRACE}-{}-01", hex(&attempt.span_id)).as_str()
        );
    }
}

#[tokio::test]
async fn without_an_endpoint_the_callers_traceparent_passes_unchanged() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let config = format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{}
    deferrable: true
",
        up.addr
    );
    let sw = Spillway::start_with_env(&config, &[("OTEL_SDK_DISABLED", "true")]);
    let tp = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let req = Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("traceparent", tp.as_str())
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(sw.proxy, req).await.status, 202);
    eventually("delivery", || async { up.count() == 1 }).await;
    assert_eq!(up.requests()[0].headers["traceparent"], tp.as_str());
}
