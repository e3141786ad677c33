//! `CONNECT` tunnels, only to hosts and ports that a route names; never deferred.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

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
) -> Result<Response<Body>, ProxyError> {
    let permit = tunnels
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let addr = (target.host.clone(), target.port.unwrap_or(443));
    let upstream =
        tokio::time::timeout(std::time::Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| ProxyError::UpstreamConnect("connect timed out".into()))?
            .map_err(|e| ProxyError::UpstreamConnect(e.to_string()))?;
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
        let mut client = TokioIo::new(upgraded);
        let mut upstream = upstream;
        match tokio::time::timeout(
            idle,
            tokio::io::copy_bidirectional(&mut client, &mut upstream),
        )
        .await
        {
            Ok(Ok((up, down))) => tracing::debug!(%authority, up, down, "tunnel closed"),
            Ok(Err(e)) => tracing::debug!(%authority, error = %e, "tunnel ended"),
            Err(_) => tracing::debug!(%authority, "tunnel reached its time limit"),
        }
    });
    let mut rsp = Response::new(full(bytes::Bytes::new()));
    *rsp.status_mut() = StatusCode::OK;
    Ok(rsp)
}
