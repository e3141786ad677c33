//! The passthrough proxy, end to end: the real binary, a real flaky upstream on loopback.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{eventually, get, send, Action, FlakyUpstream, Spillway};

fn config(routes: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstorage: {{ path: '{{data}}/q.redb' }}\nshutdown_grace: 5s\nroutes:\n{routes}"
    )
}

fn route(name: &str, host: &str, upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "  - name: {name}\n    match: {{ host: {host} }}\n    upstream: http://{upstream}\n    timeout: 2s\n    retry: {{ max_attempts: 3, backoff: {{ initial: 10ms, max: 50ms }} }}\n{extra}"
    )
}

/// A route naming 127.0.0.1 whose CONNECT ports include the upstream's; loopback is a
/// private destination, so the route widens the egress deny list.
fn tunnel_route(upstream: std::net::SocketAddr) -> String {
    let port = upstream.port();
    route(
        "local",
        "127.0.0.1",
        upstream,
        &format!("    connect_ports: [{port}]\n    allow_private: true\n"),
    )
}

fn post(uri: &str, host: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .header("host", host)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test]
async fn host_header_routes_to_the_upstream_with_its_authority() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let a = send(sw.proxy, get("/v1/things?x=1", "api.test")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "upstream says hi");
    let seen = &up.requests()[0];
    assert_eq!(seen.uri, "/v1/things?x=1");
    assert_eq!(seen.headers["host"], up.addr.to_string().as_str());
    assert!(a.header("x-request-id").is_some());
}

#[tokio::test]
async fn absolute_form_routes_on_the_uri_authority() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let a = send(sw.proxy, get("http://api.test/v1/x", "api.test")).await;
    assert_eq!(a.status, 200);
    assert_eq!(up.requests()[0].uri, "/v1/x");
}

#[tokio::test]
async fn unmatched_host_is_403_in_both_forms() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    for req in [
        get("/", "other.test"),
        get("http://other.test/", "other.test"),
    ] {
        let a = send(sw.proxy, req).await;
        assert_eq!(a.status, 403);
        assert_eq!(a.header("spillway-error"), Some("no_route"));
        assert_eq!(a.json()["error"], "no_route");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn absolute_form_with_a_different_host_is_400_host_mismatch() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let a = send(sw.proxy, get("http://other.test/", "api.test")).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"], "host_mismatch");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn connect_is_refused_to_unnamed_hosts_and_tunnels_to_named_ones() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let port = up.addr.port();
    let routes = tunnel_route(up.addr);
    let sw = Spillway::start(&config(&routes));

    let denied = support::raw(
        sw.proxy,
        b"CONNECT other.test:443 HTTP/1.1\r\nHost: other.test:443\r\n\r\n",
    )
    .await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    let wrong_port = support::raw(
        sw.proxy,
        b"CONNECT 127.0.0.1:25 HTTP/1.1\r\nHost: 127.0.0.1:25\r\n\r\n",
    )
    .await;
    assert!(wrong_port.starts_with("HTTP/1.1 403"), "{wrong_port}");

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = support::open_tunnel(sw.proxy, port).await;
    s.write_all(b"GET /through-tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(support::patience(), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out).contains("upstream says hi"));
    assert_eq!(up.requests()[0].uri, "/through-tunnel");
}

#[tokio::test]
async fn get_is_retried_on_503() {
    let up = FlakyUpstream::start(|n, _| Action::status(if n < 2 { 503 } else { 200 })).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let a = send(sw.proxy, get("/", "api.test")).await;
    assert_eq!(a.status, 200);
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn get_is_retried_on_a_refused_connection_then_502() {
    // A port with nothing listening: bind, learn it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sw = Spillway::start(&config(&route("down", "down.test", port, "")));
    let a = send(sw.proxy, get("/", "down.test")).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"], "upstream_connect");
    eventually("the access line", || async {
        !sw.access_lines().is_empty()
    })
    .await;
    assert_eq!(sw.access_lines()[0]["attempts"], 3);
}

#[tokio::test]
async fn post_is_retried_only_with_an_idempotency_key() {
    let up =
        FlakyUpstream::start(|n, _| Action::status(if n == 0 || n == 1 { 503 } else { 200 })).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let a = send(sw.proxy, post("/pay", "api.test", "{}")).await;
    assert_eq!(
        a.status, 503,
        "an unkeyed POST gets the upstream's answer, not a retry"
    );
    assert_eq!(up.count(), 1);

    let mut keyed = post("/pay", "api.test", "{}");
    keyed
        .headers_mut()
        .insert("idempotency-key", "k-1".parse().unwrap());
    let a = send(sw.proxy, keyed).await;
    assert_eq!(a.status, 200);
    assert_eq!(up.count(), 3);
    let reqs = up.requests();
    assert_eq!(reqs[1].headers["idempotency-key"], "k-1");
    assert_eq!(reqs[2].body, "{}");
}

#[tokio::test]
async fn an_upstream_that_closes_every_connection_loses_no_request() {
    // Every answer says `Connection: close`, so the pooled connection is gone by the next
    // request. POSTs without a key are never retried, so none of them may fail either.
    let up = FlakyUpstream::start(|_, _| Action::Respond {
        status: 200,
        headers: vec![("connection", "close".into())],
        body: Bytes::from_static(b"ok"),
    })
    .await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    for i in 0..20 {
        let a = send(sw.proxy, post("/v1/x", "api.test", "x")).await;
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
    }
    assert_eq!(up.count(), 20);
}

#[tokio::test]
async fn a_hanging_upstream_gives_504() {
    let up = FlakyUpstream::start(|_, _| Action::Delay(Duration::from_secs(30))).await;
    let routes = format!(
        "  - name: slow\n    match: {{ host: slow.test }}\n    upstream: http://{}\n    timeout: 200ms\n    retry: {{ max_attempts: 1 }}\n",
        up.addr
    );
    let sw = Spillway::start(&config(&routes));
    let a = send(sw.proxy, get("/", "slow.test")).await;
    assert_eq!(a.status, 504);
    assert_eq!(a.json()["error"], "upstream_timeout");
}

#[tokio::test]
async fn circuit_opens_after_failures_then_recovers() {
    let healthy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let up = FlakyUpstream::start(move |_, _| {
        Action::status(if h.load(std::sync::atomic::Ordering::SeqCst) {
            200
        } else {
            500
        })
    })
    .await;
    let routes = route(
        "api",
        "api.test",
        up.addr,
        "    circuit_breaker: { consecutive_failures: 3, open_for: 500ms }\n",
    );
    let sw = Spillway::start(&config(&routes));
    for _ in 0..3 {
        assert_eq!(send(sw.proxy, get("/", "api.test")).await.status, 500);
    }
    let before = up.count();
    let a = send(sw.proxy, get("/", "api.test")).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"], "circuit_open");
    assert!(a.header("retry-after").is_some());
    assert_eq!(
        up.count(),
        before,
        "an open circuit does not touch the upstream"
    );

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually("the circuit closes", || async {
        send(sw.proxy, get("/", "api.test")).await.status == 200
    })
    .await;
    assert_eq!(send(sw.proxy, get("/", "api.test")).await.status, 200);
}

#[tokio::test]
async fn rate_limit_gives_429_with_retry_after() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let routes = route(
        "api",
        "api.test",
        up.addr,
        "    rate_limit: { per_second: 1, burst: 2 }\n",
    );
    let sw = Spillway::start(&config(&routes));
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let a = send(sw.proxy, get("/", "api.test")).await;
        if a.status == 429 {
            assert_eq!(a.json()["error"], "rate_limited");
            assert!(a.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
        }
        statuses.push(a.status);
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
}

#[tokio::test]
async fn connection_listed_and_hop_by_hop_headers_do_not_reach_the_upstream() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let req = Request::get("/")
        .header("host", "api.test")
        .header("connection", "x-secret")
        .header("x-secret", "v")
        .header("proxy-authorization", "Basic abc")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(sw.proxy, req).await.status, 200);
    let seen = &up.requests()[0];
    assert!(seen.headers.get("x-secret").is_none());
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert!(seen.headers.get("traceparent").is_some());
}

#[tokio::test]
async fn oversized_bodies_are_413_and_oversized_heads_431() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let cfg = config(&route("api", "api.test", up.addr, "")).replace(
        "shutdown_grace",
        "limits: { max_body_bytes: 1KiB, max_header_bytes: 16KiB }\nshutdown_grace",
    );
    let sw = Spillway::start(&cfg);
    let big = Request::post("/")
        .header("host", "api.test")
        .body(Full::new(Bytes::from(vec![b'a'; 4096])))
        .unwrap();
    let a = send(sw.proxy, big).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"], "body_too_large");

    let head = format!(
        "GET / HTTP/1.1\r\nHost: api.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let out = support::raw(sw.proxy, head.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn a_50_mib_response_streams_through_with_small_rss() {
    const SIZE: usize = 50 * 1024 * 1024;
    let up = FlakyUpstream::start(|_, _| Action::Stream(SIZE)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    // Growth over the process's own baseline, so allocator and runtime overheads that have
    // nothing to do with the body don't count: buffering would add at least SIZE.
    let before = sw.peak_rss();
    let a = send(sw.proxy, get("/big", "api.test")).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), SIZE);
    let grown = sw.peak_rss().saturating_sub(before);
    assert!(
        grown < SIZE as u64 / 2,
        "peak RSS grew by {grown} bytes (baseline {before}): the body was buffered"
    );
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_slow_request_then_exits_0() {
    let up = FlakyUpstream::start(|_, _| Action::Delay(Duration::from_millis(800))).await;
    let mut sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let proxy = sw.proxy;
    let in_flight = tokio::spawn(async move { send(proxy, get("/slow", "api.test")).await });
    eventually("the upstream sees the request", || async {
        up.count() == 1
    })
    .await;
    sw.sigterm();
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, "slow");
    assert!(sw.wait_exit().await.success());
}

#[tokio::test]
async fn readiness_and_health_answer_on_the_admin_listener() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    assert_eq!(send(sw.admin, get("/healthz", "admin")).await.status, 200);
    assert_eq!(send(sw.admin, get("/readyz", "admin")).await.status, 200);
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_tunnel_idle_timeout() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let port = up.addr.port();
    let routes = tunnel_route(up.addr);
    let cfg = config(&routes).replace(
        "shutdown_grace",
        "limits: { tunnel_idle_timeout: 300ms }\nshutdown_grace",
    );
    let sw = Spillway::start(&cfg);
    use tokio::io::AsyncReadExt;
    let mut s = support::open_tunnel(sw.proxy, port).await;
    let mut buf = vec![0u8; 64];
    // Send nothing: the tunnel must close by itself.
    let closed = tokio::time::timeout(support::patience(), s.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the idle tunnel stayed open"
    );
}

#[tokio::test]
async fn run_with_a_bad_config_names_the_place_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "listen: 127.0.0.1:0\nroutes:\n  - name: a\n    upstream: ftp://x\n",
    )
    .unwrap();
    let (code, err) = support::run_to_exit(&cfg);
    assert_eq!(code, Some(1));
    assert!(err.contains(&format!("{}:4:", cfg.display())), "{err}");
    assert!(err.contains("routes[0].upstream"), "{err}");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let stream = tokio::net::TcpStream::connect(sw.proxy).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://api.test/h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let rsp = tx.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(up.requests()[0].uri, "/h2");
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(&route("api", "api.test", up.addr, "")));
    let req = Request::get("/private?token=query-secret-1")
        .header("host", "api.test")
        .header("authorization", "Bearer auth-secret-1")
        .header("cookie", "session=cookie-secret-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(sw.proxy, req).await.status, 200);
    eventually("the access line", || async {
        !sw.access_lines().is_empty()
    })
    .await;
    let line = &sw.access_lines()[0];
    assert_eq!(line["route"], "api");
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/private");
    let logs = sw.logs();
    for secret in ["auth-secret-1", "cookie-secret-1", "query-secret-1"] {
        assert!(!logs.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_cut_off() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let cfg = config(&route("api", "api.test", up.addr, "")).replace(
        "shutdown_grace",
        "limits: { header_read_timeout: 300ms }\nshutdown_grace",
    );
    let sw = Spillway::start(&cfg);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(sw.proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.te")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(support::patience(), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow client kept its connection");
    assert_eq!(up.count(), 0);
}
