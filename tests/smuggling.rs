//! Request smuggling, over raw sockets against the real binary: every ambiguous frame is
//! answered `400` and the connection closed; nothing reaches the upstream and nothing is
//! queued. Also the connection-level limit on requests per connection.

mod support;

use std::net::SocketAddr;

use support::{patience, Action, FlakyUpstream, Spillway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A passthrough route (`api.test`) and a deferrable one (`hooks.test`), both to `up`.
fn config(up: SocketAddr) -> String {
    config_with(up, "")
}

fn config_with(up: SocketAddr, extra: &str) -> String {
    format!(
        "{extra}listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/q.redb' }}
shutdown_grace: 2s
routes:
  - name: api
    match: {{ host: api.test }}
    upstream: http://{up}
    timeout: 2s
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{up}
    deferrable: true
    timeout: 2s
"
    )
}

/// Writes `bytes`, then reads until the server closes. Returns what was read and
/// whether the server closed (rather than the read timing out).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close before it has read everything; that is its right.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(patience(), s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            // A reset after the answer still ends the connection.
            Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Each case: a name and the raw request bytes (a second, smuggled request follows
/// where the attack needs one).
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut v: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for host in ["api.test", "hooks.test"] {
        let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let mut add = |name: &'static str, head: String| {
            v.push((name, head.into_bytes()));
        };
        add(
            "CL then TE",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        );
        add(
            "TE then CL",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{smuggled}"),
        );
        add(
            "two different Content-Lengths",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!{smuggled}"),
        );
        add(
            "two Content-Lengths in one line",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5, 6\r\n\r\nhello!"),
        );
        add(
            "signed Content-Length",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nContent-Length: +5\r\n\r\nhello"),
        );
        add(
            "obs-fold",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nhi"),
        );
        add(
            "obs-fold of Transfer-Encoding",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
        );
        add(
            "space before the colon",
            format!(
                "POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
            ),
        );
        add(
            "chunk size not hex",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "chunk size overflows",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "chunk shorter than its size",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "negative chunk size",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "gzip, chunked",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "chunked, identity",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "identity alone",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello"),
        );
        add(
            "chunked twice",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "unknown coding xchunked",
            format!("POST /a HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /a HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        );
        add(
            "LF alone inside a header value",
            format!("GET /a HTTP/1.1\r\nHost: {host}\r\nX-A: one\ntwo\r\n\r\n"),
        );
        add(
            "CR alone inside a header value",
            format!(
                "GET /a HTTP/1.1\r\nHost: {host}\r\nX-A: one\rTransfer-Encoding: chunked\r\n\r\n"
            ),
        );
        add(
            "space inside a header name",
            format!("GET /a HTTP/1.1\r\nHost: {host}\r\nX A: b\r\n\r\n"),
        );
        add(
            "CR inside a header name",
            format!("GET /a HTTP/1.1\r\nHost: {host}\r\nX\rA: b\r\n\r\n"),
        );
        add(
            "two Host headers",
            format!("GET /a HTTP/1.1\r\nHost: {host}\r\nHost: other.test\r\n\r\n"),
        );
    }
    // NUL bytes can't live in a Rust string literal built with format! comfortably.
    for host in ["api.test", "hooks.test"] {
        let mut nul_value = format!("GET /a HTTP/1.1\r\nHost: {host}\r\nX-A: a").into_bytes();
        nul_value.extend_from_slice(b"\0b\r\n\r\n");
        v.push(("NUL inside a header value", nul_value));
        let mut nul_name = format!("GET /a HTTP/1.1\r\nHost: {host}\r\nX-").into_bytes();
        nul_name.extend_from_slice(b"\0A: b\r\n\r\n");
        v.push(("NUL inside a header name", nul_name));
    }
    v
}

#[tokio::test]
async fn every_ambiguous_frame_is_400_and_closes_and_reaches_nobody() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));
    let mut failures = Vec::new();
    for (name, bytes) in cases() {
        let (answer, closed) = exchange(sw.proxy, &bytes).await;
        let first = answer.lines().next().unwrap_or("").to_owned();
        if !first.starts_with("HTTP/1.1 400") && !first.starts_with("HTTP/1.0 400") {
            failures.push(format!("{name}: answered {first:?}"));
        } else if !closed {
            failures.push(format!("{name}: connection left open"));
        } else if answer.matches("HTTP/1.").count() != 1 {
            failures.push(format!("{name}: more than one answer: {answer:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(up.count(), 0, "a smuggled request reached the upstream");

    let jobs = support::send(sw.admin, support::get("/jobs", &sw.admin.to_string())).await;
    assert_eq!(jobs.status, 200);
    assert_eq!(
        jobs.json()["jobs"],
        serde_json::json!([]),
        "{:?}",
        jobs.body
    );
}

#[tokio::test]
async fn our_refusal_names_the_reason_and_says_close() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));
    let (answer, closed) = exchange(
        sw.proxy,
        b"POST /a HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("spillway-error: bad_request"), "{answer}");
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(answer.contains("chunked transfer coding"), "{answer}");
}

#[tokio::test]
async fn well_framed_requests_still_pass_and_are_reframed() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr));
    // Chunked in, Content-Length out: the upstream sees exactly the bytes we read.
    let (answer, _) = exchange(
        sw.proxy,
        b"POST /a HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Two identical Content-Lengths are one length (RFC 9110 §8.6).
    let (answer, _) = exchange(
        sw.proxy,
        b"POST /b HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, "hello world");
    assert_eq!(seen[0].headers["content-length"], "11");
    assert!(seen[0].headers.get("transfer-encoding").is_none());
    assert_eq!(seen[1].body, "hi");
    assert_eq!(seen[1].headers.get_all("content-length").iter().count(), 1);
}

/// A raw upstream that answers every request with both framings: chunked, plus a stale
/// `Content-Length` that disagrees. Returns its address.
async fn double_framed_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\nstreamed\r\n0\r\n\r\n")
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_answer_with_te_and_cl_is_reframed_once() {
    let up = double_framed_upstream().await;
    let sw = Spillway::start(&config(up));
    let (answer, _) = exchange(
        sw.proxy,
        b"GET /a HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(!lower.contains("content-length: 3"), "{answer}");
    let framings = ["content-length:", "transfer-encoding:"]
        .iter()
        .filter(|h| lower.contains(*h))
        .count();
    assert_eq!(framings, 1, "{answer}");
    assert!(answer.contains("streamed"), "{answer}");
}

#[tokio::test]
async fn a_connection_closes_after_max_requests_per_connection() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config_with(
        up.addr,
        "limits: { max_requests_per_connection: 2 }\n",
    ));
    let one = "GET /n HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let (answer, closed) = exchange(sw.proxy, one.repeat(3).as_bytes()).await;
    assert!(closed, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let second = answer.rfind("HTTP/1.1 200").unwrap();
    assert!(
        answer[second..]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{answer}"
    );
    assert!(
        !answer[..second]
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{answer}"
    );
    assert_eq!(up.count(), 2);
}
