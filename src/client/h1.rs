//! The pool for plain-HTTP upstreams (`http://`, HTTP/1.1): the sidecar's usual case, so the
//! request path drives hyper's connection API itself instead of hyper-util's general client.
//! What that saves per request (measured in `benches/README.md`): a task spawned per
//! response to wait for the connection to be idle again, a client clone, SipHash of the
//! pool key twice, and the pool's generic checkout machinery.
//!
//! A connection goes back to the pool when its response body has been read to the end; a
//! body dropped before that takes the connection with it (hyper closes it), so a half-read
//! response is never followed by another request on the same connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::ServiceExt;

use super::{describe, SendError};
use crate::config::FailureClass;
use crate::proxy::Body;

type Sender = SendRequest<Full<Bytes>>;
type Key = Authority;

pub(super) struct H1Pool {
    connector: HttpConnector,
    idle: Mutex<HashMap<Key, Vec<Idle>, foldhash::fast::RandomState>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    reaper_started: AtomicBool,
}

struct Idle {
    tx: Sender,
    since: Instant,
}

impl H1Pool {
    pub(super) fn new(
        connector: HttpConnector,
        max_idle_per_host: usize,
        idle_timeout: Duration,
    ) -> Self {
        H1Pool {
            connector,
            idle: Mutex::default(),
            max_idle_per_host,
            idle_timeout,
            reaper_started: AtomicBool::new(false),
        }
    }

    /// Whether this pool carries `req`: plain HTTP with an authority, HTTP/1.x.
    pub(super) fn carries<B>(req: &Request<B>) -> bool {
        req.uri().scheme() == Some(&Scheme::HTTP)
            && req.uri().authority().is_some()
            && req.version() <= http::Version::HTTP_11
    }

    /// Sends `req` (absolute URI, see [`Self::carries`]) on an idle connection to its
    /// authority, or a new one. A request that an idle connection closed under before it
    /// was written goes on the next connection; one that was written is never resent here
    /// (the retry layer decides that, knowing the method and key).
    pub(super) async fn send(
        self: &Arc<Self>,
        req: Request<Bytes>,
    ) -> Result<Response<Body>, SendError> {
        let (mut parts, body) = req.into_parts();
        let Some(key) = parts.uri.authority().cloned() else {
            return Err(SendError {
                class: FailureClass::ConnectFailure,
                message: "the upstream URI has no authority".into(),
                denied: None,
            });
        };
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(host_header(&key)) {
                parts.headers.insert(header::HOST, host);
            }
        }
        // HTTP/1 to an origin server takes the origin form: path and query only.
        parts.uri = Uri::from(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        let mut req = Request::from_parts(parts, Full::new(body));
        loop {
            let (mut tx, reused) = match self.checkout(&key) {
                Some(tx) => (tx, true),
                None => (self.connect(&key).await?, false),
            };
            // A connection handed back as its body ended may still be finishing that
            // response; closed means it will not take another request. (A new one takes
            // its first request at once: hyper buffers it.)
            if reused && !tx.is_ready() && tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(rsp) => return Ok(self.hand_back_after(rsp, tx, key)),
                Err(mut e) => match (e.take_message(), reused) {
                    (Some(unsent), true) => req = unsent,
                    // A new connection that failed: no second connect here, so an
                    // upstream that accepts and closes at once cannot spin this loop.
                    (unsent, _) => {
                        return Err(SendError {
                            // Nothing of an unsent request left this process.
                            class: if unsent.is_some() {
                                FailureClass::ConnectFailure
                            } else {
                                FailureClass::Reset
                            },
                            message: describe(&e.into_error()),
                            denied: None,
                        });
                    }
                },
            }
        }
    }

    /// The most recently used live connection to `key`.
    fn checkout(&self, key: &Key) -> Option<Sender> {
        let mut idle = self.idle.lock();
        let list = idle.get_mut(key)?;
        while let Some(i) = list.pop() {
            if !i.tx.is_closed() && i.since.elapsed() < self.idle_timeout {
                return Some(i.tx);
            }
        }
        None
    }

    fn put(&self, key: Key, tx: Sender) {
        if tx.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = self.idle.lock();
        let list = idle.entry(key).or_default();
        // Past the cap the connection is dropped, which closes it.
        if list.len() < self.max_idle_per_host {
            list.push(Idle { tx, since });
        }
    }

    async fn connect(self: &Arc<Self>, key: &Key) -> Result<Sender, SendError> {
        let connect_failure = |message: String| SendError {
            class: FailureClass::ConnectFailure,
            message,
            denied: None,
        };
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(key.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| connect_failure(e.to_string()))?;
        // The connector resolves the name, tries each address (happy eyeballs), and
        // bounds the connect; its errors read like the general client's.
        let io =
            self.connector.clone().oneshot(uri).await.map_err(|e| {
                connect_failure(format!("client error (Connect): {}", describe(&e)))
            })?;
        let (tx, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| connect_failure(describe(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        self.start_reaper();
        Ok(tx)
    }

    fn hand_back_after(
        self: &Arc<Self>,
        rsp: Response<Incoming>,
        tx: Sender,
        key: Key,
    ) -> Response<Body> {
        let (parts, inner) = rsp.into_parts();
        let mut body = PooledBody {
            inner,
            back: Some(HandBack {
                tx,
                key,
                pool: Arc::downgrade(self),
            }),
        };
        if body.inner.is_end_stream() {
            body.hand_back();
        }
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// Closes connections idle past the timeout, even when no request comes to find them.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    fn sweep(&self) {
        let mut idle = self.idle.lock();
        idle.retain(|_, list| {
            list.retain(|i| !i.tx.is_closed() && i.since.elapsed() < self.idle_timeout);
            !list.is_empty()
        });
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().values().map(Vec::len).sum()
    }

    #[cfg(test)]
    fn idle_all_closed(&self) -> bool {
        self.idle
            .lock()
            .values()
            .flatten()
            .all(|i| i.tx.is_closed())
    }
}

/// `Host` as a client would write it: the port only when it is not 80.
fn host_header(key: &Authority) -> &str {
    match key.port_u16() {
        Some(80) => key.host(),
        _ => key.as_str(),
    }
}

struct HandBack {
    tx: Sender,
    key: Key,
    /// Weak, so a response body kept by a caller does not keep a replaced pool alive.
    pool: Weak<H1Pool>,
}

/// The upstream's response body; its end returns the connection to the pool.
struct PooledBody {
    inner: Incoming,
    back: Option<HandBack>,
}

impl PooledBody {
    fn hand_back(&mut self) {
        if let Some(b) = self.back.take() {
            if let Some(pool) = b.pool.upgrade() {
                pool.put(b.key, b.tx);
            }
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tower::BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.hand_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.hand_back(),
            // A failed body leaves the connection in no state to reuse.
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::client::tcp;

    fn pool(idle_timeout: Duration) -> Arc<H1Pool> {
        Arc::new(H1Pool::new(tcp(HttpConnector::new()), 4, idle_timeout))
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> Request<Bytes> {
        Request::get(format!("http://{addr}{path}"))
            .body(Bytes::new())
            .unwrap()
    }

    /// An upstream that answers every request on a connection with `answer`, counting
    /// connections, and closes after `per_conn` answers.
    async fn upstream(
        answer: &'static str,
        per_conn: usize,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    let mut served = 0;
                    while served < per_conn {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            if s.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                            served += 1;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_was_read() {
        let (addr, conns) = upstream(OK, usize::MAX).await;
        let p = pool(Duration::from_secs(30));
        for _ in 0..5 {
            let rsp = p.send(get(addr, "/a?b=c")).await.unwrap();
            assert_eq!(rsp.status(), 200);
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(p.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_takes_its_connection_with_it() {
        let (addr, conns) = upstream(OK, usize::MAX).await;
        let p = pool(Duration::from_secs(30));
        drop(p.send(get(addr, "/")).await.unwrap());
        assert_eq!(p.idle_count(), 0);
        let rsp = p.send(get(addr, "/")).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used_again() {
        // One answer per connection, then the upstream closes.
        let (addr, conns) = upstream(OK, 1).await;
        let p = pool(Duration::from_secs(30));
        for _ in 0..3 {
            let rsp = p.send(get(addr, "/")).await.unwrap();
            rsp.into_body().collect().await.unwrap();
            // The close reaches the pooled connection, as it would between two requests.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !p.idle_all_closed() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(p.idle_all_closed());
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn the_origin_form_and_host_reach_the_upstream() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let got = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(OK.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let p = pool(Duration::from_secs(30));
        let rsp = p.send(get(addr, "/x/y?z=1")).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        let head = got.await.unwrap();
        assert!(head.starts_with("GET /x/y?z=1 HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("host: {addr}\r\n")),
            "{head}"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_failure() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = pool(Duration::from_secs(30))
            .send(get(addr, "/"))
            .await
            .unwrap_err();
        assert_eq!(e.class, FailureClass::ConnectFailure);
        assert!(e.message.contains("Connection refused"), "{}", e.message);
    }

    #[tokio::test]
    async fn an_upstream_that_closes_each_new_connection_fails_the_request_once() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let p = pool(Duration::from_secs(30));
        let sent = tokio::time::timeout(Duration::from_secs(10), p.send(get(addr, "/"))).await;
        let e = sent
            .expect("the pool gave up instead of connecting again and again")
            .unwrap_err();
        assert!(
            matches!(e.class, FailureClass::Reset | FailureClass::ConnectFailure),
            "{e}"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connect per request"
        );
    }

    #[tokio::test]
    async fn idle_connections_past_the_timeout_are_closed() {
        let (addr, conns) = upstream(OK, usize::MAX).await;
        let p = pool(Duration::from_millis(200));
        let rsp = p.send(get(addr, "/")).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(p.idle_count(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.idle_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            p.idle_count(),
            0,
            "the reaper closes what no request came for"
        );
        let rsp = p.send(get(addr, "/")).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }
}
