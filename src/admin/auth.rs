//! Bearer-token auth for the admin API: the token is read once at startup from the
//! variable `admin.token_env` names, and compared in constant time. Every endpoint but
//! `/healthz` and `/readyz` requires it when it is set.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::AdminError;
use crate::config::AdminConfig;

/// Paths a load balancer or kubelet probes without credentials.
const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// The expected token, kept only as its SHA-256 so the comparison takes the same time
/// whatever the presented token's length.
#[derive(Clone, Default)]
pub struct Auth {
    digest: Option<Arc<[u8; 32]>>,
    var: Option<String>,
}

impl Auth {
    /// No token: every endpoint is open (loopback only; `App::build` refuses otherwise).
    pub fn disabled() -> Auth {
        Auth::default()
    }

    pub fn with_token(token: &str, var: Option<String>) -> Auth {
        Auth {
            digest: Some(Arc::new(Sha256::digest(token.as_bytes()).into())),
            var,
        }
    }

    /// Reads the token from the environment variable `admin.token_env` names.
    pub fn from_env(admin: &AdminConfig) -> Auth {
        let Some(var) = admin.token_env.clone() else {
            return Auth::disabled();
        };
        match std::env::var(&var) {
            Ok(token) if !token.is_empty() => Auth::with_token(&token, Some(var)),
            _ => {
                tracing::warn!(
                    variable = %var,
                    listen = %admin.listen,
                    "admin.token_env names a variable that is unset or empty; the admin API on loopback is open to every local user"
                );
                Auth::disabled()
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.digest.is_some()
    }

    fn check(&self, req: &Request) -> Result<(), AdminError> {
        let Some(digest) = &self.digest else {
            return Ok(());
        };
        let var = self.var.as_deref().unwrap_or("the admin token variable");
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        let Some(token) = presented else {
            return Err(AdminError::Unauthorized {
                message: format!(
                    "this endpoint needs `Authorization: Bearer <token>` with the token from {var}"
                ),
                invalid: false,
            });
        };
        let got: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if bool::from(got.ct_eq(digest.as_ref())) {
            Ok(())
        } else {
            Err(AdminError::Unauthorized {
                message: format!("the bearer token does not match the one in {var}"),
                invalid: true,
            })
        }
    }
}

/// The middleware over the whole admin router: health endpoints stay open, everything
/// else (including endpoints added later and the 404 fallback) needs the token.
pub async fn require(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match auth.check(&req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn req(auth: Option<&str>) -> Request {
        let mut b = axum::http::Request::get("/jobs");
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn bearer_token_is_checked() {
        let auth = Auth::with_token("s3cret", Some("TOKEN".into()));
        assert!(auth.check(&req(Some("Bearer s3cret"))).is_ok());
        assert!(auth.check(&req(Some("bearer  s3cret "))).is_ok());
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("Basic s3cret"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let e = auth.check(&req(bad)).unwrap_err();
            assert_eq!(e.status(), 401, "{bad:?}");
            assert!(e.to_string().contains("TOKEN"), "{e}");
        }
    }

    #[test]
    fn no_token_means_open() {
        assert!(!Auth::disabled().enabled());
        assert!(Auth::disabled().check(&req(None)).is_ok());
    }
}
