//! `CONNECT` tunnels, only to hosts and ports that a route names; never deferred. The
//! name's addresses pass the egress guard (the route's `allow_private` widens it).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::egress::{EgressError, Guard};
use super::rescue::{full, ProxyError};
use super::target::Target;
use super::Body;
use crate::config::Limits;

/// Opens the upstream connection first, so a refused one is a `502`, not a dead tunnel.
pub async fn connect(
    req: Request<Incoming>,
    target: &Target,
    tunnels: &Arc<tokio::sync::Semaphore>,
    limits: &Limits,
    guard: &Guard,
) -> Result<Response<Body>, ProxyError> {
    let permit = tunnels
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let port = target.port.unwrap_or(443);
    let connect = async {
        // Resolve and check once, then connect to exactly the checked addresses.
        let addrs = guard
            .resolve(&target.host, port)
            .await
            .map_err(|e| match e {
                EgressError::Denied(d) => ProxyError::DestinationDenied(d.to_string()),
                other => ProxyError::UpstreamConnect(other.to_string()),
            })?;
        TcpStream::connect(&addrs[..])
            .await
            .map_err(|e| ProxyError::UpstreamConnect(e.to_string()))
    };
    let upstream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| ProxyError::UpstreamConnect("connect timed out".into()))??;
    let idle = limits.tunnel_idle_timeout;
    let authority = target.authority();
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let (up, down) = pipe(TokioIo::new(upgraded), upstream, idle).await;
        tracing::debug!(%authority, up, down, "tunnel closed");
    });
    let mut rsp = Response::new(full(Bytes::new()));
    *rsp.status_mut() = StatusCode::OK;
    Ok(rsp)
}

/// Copies both ways until either side closes or neither moves a byte for `idle`.
/// Returns the bytes sent up and down.
async fn pipe<C>(client: C, upstream: TcpStream, idle: Duration) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let last = Mutex::new(Instant::now());
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = upstream.into_split();
    let (mut up, mut down) = (0u64, 0u64);
    let watchdog = async {
        loop {
            let deadline = *last.lock() + idle;
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(copy(&mut cr, &mut uw, &mut up, &last), copy(&mut ur, &mut cw, &mut down, &last)) } => {}
        _ = watchdog => tracing::debug!("tunnel idle for {idle:?}; closing"),
    }
    (up, down)
}

/// One direction of a tunnel; every chunk moved resets the shared idle clock.
async fn copy<R, W>(r: &mut R, w: &mut W, n: &mut u64, last: &Mutex<Instant>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => k,
        };
        if w.write_all(&buf[..read]).await.is_err() {
            break;
        }
        *n += read as u64;
        *last.lock() = Instant::now();
    }
    let _ = w.shutdown().await;
}
