//! Never an open proxy: destinations a client chooses (unmatched passthrough, CONNECT)
//! are resolved and refused in loopback and other private ranges unless the config
//! widens the deny list. Every destination here is on loopback; the other ranges and
//! spellings are covered by the classifier's unit tests (`proxy::egress`).

mod support;

use std::net::SocketAddr;

use support::{get, send, Action, FlakyUpstream, Spillway};

fn config(extra: &str, routes: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\nstorage: {{ path: '{{data}}/q.redb' }}\nshutdown_grace: 2s\nunmatched: passthrough\n{extra}routes:\n{routes}"
    )
}

/// A route for another host, so the requests below are unmatched.
fn other_route(up: SocketAddr) -> String {
    format!("  - name: other\n    match: {{ host: other.test }}\n    upstream: http://{up}\n")
}

/// Every way a client can name this machine's loopback in an HTTP_PROXY request.
fn loopback_spellings(port: u16) -> Vec<(String, String)> {
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "0177.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "localhost",
    ]
    .iter()
    .map(|h| {
        let auth = format!("{h}:{port}");
        (format!("http://{auth}/v1/x"), auth)
    })
    .collect()
}

#[tokio::test]
async fn unmatched_passthrough_to_loopback_is_denied_in_every_spelling() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config("", &other_route(up.addr)));
    let port = up.addr.port();
    for (uri, host) in loopback_spellings(port) {
        let a = send(sw.proxy, get(&uri, &host)).await;
        assert_eq!(a.status, 403, "{uri}: {:?}", a.body);
        assert_eq!(
            a.header("spillway-error"),
            Some("destination_denied"),
            "{uri}"
        );
        assert_eq!(a.json()["error"], "destination_denied", "{uri}");
    }
    // Origin-form with a Host header chooses the destination just the same.
    let a = send(sw.proxy, get("/v1/x", &format!("127.0.0.1:{port}"))).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.header("spillway-error"), Some("destination_denied"));
    assert_eq!(up.count(), 0, "a denied destination was reached");
    assert!(sw.logs().contains("destination denied"), "{}", sw.logs());
}

#[tokio::test]
async fn a_route_upstream_on_loopback_is_used_as_written() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config("", &other_route(up.addr)));
    let a = send(sw.proxy, get("/v1/x", "other.test")).await;
    assert_eq!(a.status, 200);
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn egress_allow_widens_the_deny_list_for_the_named_range() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(
        "egress: { allow: [127.0.0.0/8] }\n",
        &other_route(up.addr),
    ));
    let port = up.addr.port();
    for h in ["127.0.0.1", "127.1", "2130706433"] {
        let uri = format!("http://{h}:{port}/v1/x");
        let a = send(sw.proxy, get(&uri, &format!("{h}:{port}"))).await;
        assert_eq!(a.status, 200, "{uri}: {:?}", a.body);
    }
    assert_eq!(up.count(), 3);
    // IPv6 loopback is not in the allowed range.
    let a = send(
        sw.proxy,
        get(&format!("http://[::1]:{port}/"), &format!("[::1]:{port}")),
    )
    .await;
    assert_eq!(a.status, 403);
}

#[tokio::test]
async fn report_mode_logs_and_lets_through() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(
        "egress: { deny_private: report }\n",
        &other_route(up.addr),
    ));
    let port = up.addr.port();
    let a = send(
        sw.proxy,
        get(
            &format!("http://127.0.0.1:{port}/v1/x"),
            &format!("127.0.0.1:{port}"),
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(up.count(), 1);
    support::eventually("the report line", || async {
        sw.logs().contains("would be denied")
    })
    .await;
}

/// A route naming `host` whose CONNECT ports include `port`.
fn tunnel_route(host: &str, up: SocketAddr, extra: &str) -> String {
    format!(
        "  - name: t\n    match: {{ host: {host} }}\n    upstream: http://{up}\n    connect_ports: [{}]\n{extra}",
        up.port()
    )
}

#[tokio::test]
async fn connect_to_a_route_host_on_loopback_needs_allow_private() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let port = up.addr.port();
    // "localhost" is resolved, then refused: the check is on the address, not the name.
    for host in ["127.0.0.1", "localhost"] {
        let sw = Spillway::start(&config("", &tunnel_route(host, up.addr, "")));
        let answer = support::raw(
            sw.proxy,
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{host}: {answer}");
        assert!(answer.contains("destination_denied"), "{host}: {answer}");
    }
    let sw = Spillway::start(&config(
        "",
        &tunnel_route("127.0.0.1", up.addr, "    allow_private: true\n"),
    ));
    let _tunnel = support::open_tunnel(sw.proxy, port).await;
}

#[tokio::test]
async fn redirects_are_handed_back_not_followed() {
    // The redirect points at another loopback port: following it would reach `other`.
    let other = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let location = format!("http://127.0.0.1:{}/internal", other.addr.port());
    let up = FlakyUpstream::start(move |_, _| Action::Respond {
        status: 302,
        headers: vec![("location", location.clone())],
        body: bytes::Bytes::new(),
    })
    .await;
    let sw = Spillway::start(&config("", &other_route(up.addr)));
    let a = send(sw.proxy, get("/v1/x", "other.test")).await;
    assert_eq!(a.status, 302);
    assert!(a.header("location").unwrap().ends_with("/internal"));
    assert_eq!(up.count(), 1);
    assert_eq!(other.count(), 0);
}
