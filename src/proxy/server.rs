//! The accept loop: a connection cap, hyper's header-read timeout and head-size limit,
//! the framing scanner, requests per connection, and a graceful drain that lets
//! in-flight requests finish.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
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
        // The framing scanner sees each request head before hyper hands it to us.
        let (stream, verdicts) = Sniffed::new(stream);
        let max_requests = proxy.max_requests_per_connection();
        let served = Arc::new(AtomicU64::new(0));
        let svc = service_fn(move |mut req: Request<Incoming>| {
            // HTTP/1 serves one request at a time, in arrival order: the count matches
            // the scanner's. (HTTP/2 has no smuggling frame; its count is only a limit.)
            let n = served.fetch_add(1, Ordering::Relaxed) + 1;
            if verdicts.ambiguous(n) && req.version() < Version::HTTP_2 {
                req.extensions_mut().insert(AmbiguousFrame);
            }
            // A tunnel takes the connection over anyway; its 200 must stay an upgrade.
            let last = n >= max_requests && req.method() != Method::CONNECT;
            let proxy = proxy.clone();
            async move {
                let mut rsp = proxy.serve(req).await;
                if last {
                    // hyper closes an HTTP/1 connection after an answer that says so
                    // (and drops the header on HTTP/2).
                    rsp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(rsp)
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    graceful
}
