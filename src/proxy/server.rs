//! The accept loop: a connection cap, the header-read timeout (from the first byte by
//! hyper, and before it by a wait of our own), hyper's head-size limit,
//! the framing scanner, requests per connection (HTTP/1 and HTTP/2), an idle timeout
//! between requests, and a graceful drain that lets in-flight requests finish.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::framing::{AmbiguousFrame, Sniffed};
use super::Proxy;
use crate::config::Limits;

/// hyper refuses a read buffer below 8 KiB; smaller head limits are enforced by the proxy.
const MIN_BUF: usize = 8192;

/// Serves `listener` until `stop` fires, then waits for open connections to finish their
/// current request (the caller bounds that wait with `shutdown_grace`).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    stop: CancellationToken,
) -> GracefulShutdown {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(
            usize::try_from(limits.max_header_bytes)
                .unwrap_or(usize::MAX)
                .max(MIN_BUF),
        );
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(200);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let conns = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));

    loop {
        // Taking the permit before accepting leaves excess clients in the kernel's
        // backlog instead of holding sockets we will not serve.
        let permit = tokio::select! {
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte = limits.header_read_timeout;
        let idle_timeout = limits.idle_timeout;
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut one = [0u8; 1];
            // hyper starts its header-read timer at the first byte, so a client that
            // connects and never writes would hold a permit forever: bound that wait too.
            tokio::select! {
                // peek leaves the byte for hyper; 0 (EOF) is hyper's to see as well.
                r = tokio::time::timeout(first_byte, stream.peek(&mut one)) => match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "connection failed before its first byte");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no request within the header-read timeout");
                        return;
                    }
                },
                _ = stop.cancelled() => return,
            }
            serve_one(stream, peer, proxy, builder, watcher, idle_timeout, stop).await;
        });
    }
    graceful
}

/// What the connection task needs to know of its requests: how many were served (the
/// request limit), how many are in flight and since when none is (`limits.idle_timeout`).
struct Activity {
    start: Instant,
    served: AtomicU64,
    in_flight: AtomicU64,
    idle_since_ms: AtomicU64,
    /// HTTP/2 reached `max_requests_per_connection`: the connection task sends a GOAWAY.
    limit_reached: Notify,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long the connection has had no request in flight; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(self.now_ms().saturating_sub(since)))
    }
}

/// One request in flight; dropped with its response future, also when the client leaves.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one accepted connection until it closes, it sits idle past `idle_timeout`, it
/// reached its request limit, or the server stops; the last three end it gracefully
/// (requests in flight finish; HTTP/2 gets a GOAWAY).
async fn serve_one(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    proxy: Arc<Proxy>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    idle_timeout: Duration,
    stop: CancellationToken,
) {
    // The framing scanner sees each request head before hyper hands it to us.
    let (stream, verdicts) = Sniffed::new(stream);
    let max_requests = proxy.max_requests_per_connection();
    let activity = Arc::new(Activity {
        start: Instant::now(),
        served: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        idle_since_ms: AtomicU64::new(0),
        limit_reached: Notify::new(),
    });
    let act = activity.clone();
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let in_flight = InFlight::new(&act);
        // HTTP/1 serves one request at a time, in arrival order: the count matches
        // the scanner's. (HTTP/2 has no smuggling frame; its count is only a limit.)
        let n = act.served.fetch_add(1, Ordering::Relaxed) + 1;
        let h2 = req.version() >= Version::HTTP_2;
        if verdicts.ambiguous(n) && !h2 {
            req.extensions_mut().insert(AmbiguousFrame);
        }
        // A tunnel takes the connection over anyway; its 200 must stay an upgrade.
        let last = n >= max_requests && req.method() != Method::CONNECT;
        if last && h2 {
            // HTTP/2 has no per-answer close: the connection task sends a GOAWAY, and
            // streams already open still finish.
            act.limit_reached.notify_one();
        }
        let proxy = proxy.clone();
        async move {
            let _in_flight = in_flight;
            let mut rsp = proxy.serve(req).await;
            if last && !h2 {
                // hyper closes an HTTP/1 connection after an answer that says so.
                rsp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(rsp)
        }
    });
    // The server's drain waits for this watcher to drop, i.e. for this connection; the
    // shutdown signal itself reaches us through `stop`, which fires first.
    let _drain = watcher;
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .into_owned();
    tokio::pin!(conn);
    let ended = loop {
        let wait = activity
            .idle_for()
            .map_or(idle_timeout, |idle| idle_timeout.saturating_sub(idle));
        tokio::select! {
            r = conn.as_mut() => break Some(r),
            _ = stop.cancelled() => break None,
            _ = activity.limit_reached.notified() => break None,
            _ = tokio::time::sleep(wait) => {
                if activity.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    tracing::debug!(%peer, "connection idle past limits.idle_timeout");
                    break None;
                }
            }
        }
    };
    let result = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
