//! Micro-benchmarks of the pure functions every request or job passes through: request target
//! normalising and route matching, hop-by-hop header stripping, and the job record's encode
//! and decode. `cargo bench --bench hot`; never part of `cargo test`.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Request};
use spillway::proxy::headers::strip_hop_by_hop;
use spillway::proxy::route::RouteTable;
use spillway::proxy::target::normalise;
use spillway::queue::redb::schema::{decode_job, encode_job};
use spillway::queue::{Job, JobId, JobState};

/// Eight routes; the request matches the last, so the table's full scan is measured.
const CONFIG: &str = r#"
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
storage: { path: /tmp/hot-bench.redb }
routes:
  - { name: a, match: { host: a.test }, upstream: "http://127.0.0.1:1" }
  - { name: b, match: { host: b.test, path_prefix: /v1 }, upstream: "http://127.0.0.1:1" }
  - { name: c, match: { host: c.test, methods: [GET] }, upstream: "http://127.0.0.1:1" }
  - { name: d, match: { host: api.test, path_prefix: /v1/quotes }, upstream: "http://127.0.0.1:1" }
  - { name: e, match: { host: api.test, path_prefix: /v1/orders, methods: [GET] }, upstream: "http://127.0.0.1:1" }
  - { name: f, match: { host: api.test, path_prefix: /v2 }, upstream: "http://127.0.0.1:1" }
  - { name: g, match: { host: other.test }, upstream: "http://127.0.0.1:1" }
  - { name: h, match: { host: api.test, path_prefix: /v1/orders, methods: [POST] }, upstream: "http://127.0.0.1:1", deferrable: true }
"#;

fn route_match(c: &mut Criterion) {
    let config =
        spillway::config::from_str(CONFIG, Path::new("hot.yaml")).expect("bench config is valid");
    let table = RouteTable::new(config.routes.iter().map(|r| (r.clone(), ())).collect());
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/orders/42?x=1")
        .header(http::header::HOST, "api.test")
        .body(())
        .expect("static request is valid");
    let mut g = c.benchmark_group("route");
    g.bench_function("normalise_target", |b| {
        b.iter(|| normalise(black_box(&req)))
    });
    let target = normalise(&req).expect("origin-form with Host normalises");
    g.bench_function("match_last_of_8", |b| {
        b.iter(|| {
            let found = table.find(black_box(&target), black_box(&Method::POST));
            assert!(found.is_some_and(|(r, _)| r.name == "h"));
        })
    });
    g.finish();
}

fn headers(c: &mut Criterion) {
    // What a client library typically sends, plus the hop-by-hop set a proxy must drop.
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "api.test"),
        ("user-agent", "bench/1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "1024"),
        ("authorization", "Bearer abcdefghijklmnopqrstuvwxyz"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("idempotency-key", "0190b8e4-7f2a-7c3e-9d1a-4b5c6d7e8f90"),
        ("connection", "keep-alive, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("te", "trailers"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    c.bench_function("headers/strip_hop_by_hop_12", |b| {
        b.iter_batched_ref(
            || h.clone(),
            |h| strip_hop_by_hop(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
}

fn job() -> Job {
    Job {
        id: JobId::from_u128(0x0190_b8e4_7f2a_7c3e_9d1a_4b5c_6d7e_8f90),
        route: "orders".into(),
        method: "POST".into(),
        uri: "http://api.test/v1/orders".into(),
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            (
                "authorization".into(),
                b"Bearer abcdefghijklmnopqrstuvwxyz".to_vec(),
            ),
            ("user-agent".into(), b"bench/1.0".to_vec()),
        ],
        body: bytes::Bytes::from(vec![b'x'; 1024]),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        idempotency_key: "0190b8e4-7f2a-7c3e-9d1a-4b5c6d7e8f90".into(),
        fingerprint: [7; 32],
        created_at_ms: 1_764_400_000_000,
        ordering_key: None,
        state: JobState::Queued,
        attempts: 0,
        next_attempt_at_ms: 1_764_400_000_000,
        updated_at_ms: 1_764_400_000_000,
        last: None,
        dead_reason: None,
    }
}

fn job_record(c: &mut Criterion) {
    let job = job();
    let rec = encode_job(&job);
    let mut g = c.benchmark_group("job_record_1KiB");
    g.bench_function("encode", |b| b.iter(|| encode_job(black_box(&job))));
    g.bench_function("decode", |b| b.iter(|| decode_job(black_box(&rec))));
    g.finish();
}

criterion_group!(benches, route_match, headers, job_record);
criterion_main!(benches);
