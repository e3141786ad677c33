//! The route table: (host, path prefix, method) to a route, first match in file order.

use std::sync::Arc;

use http::Method;

use super::target::Target;
use crate::config::{RouteConfig, RouteMatch};

/// `prefix` matches `path` on a segment boundary: `/v1/quotes` matches `/v1/quotes` and
/// `/v1/quotes/9`, not `/v1/quotesX`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

fn matches(m: &RouteMatch, target: &Target, method: &Method) -> bool {
    if let Some(h) = &m.host {
        if h.host != target.host {
            return false;
        }
        if let Some(p) = h.port {
            if target.port != Some(p) {
                return false;
            }
        }
    }
    if let Some(prefix) = &m.path_prefix {
        if !prefix_matches(prefix, target.path()) {
            return false;
        }
    }
    match &m.methods {
        Some(methods) => methods.contains(method),
        None => true,
    }
}

/// Routes in file order, each with the value the request path needs.
pub struct RouteTable<T> {
    routes: Vec<(Arc<RouteConfig>, T)>,
}

impl<T> RouteTable<T> {
    pub fn new(routes: Vec<(Arc<RouteConfig>, T)>) -> Self {
        RouteTable { routes }
    }

    /// The first route whose match accepts the request.
    pub fn find(&self, target: &Target, method: &Method) -> Option<&(Arc<RouteConfig>, T)> {
        self.routes
            .iter()
            .find(|(r, _)| matches(&r.matcher, target, method))
    }

    /// A route that names `host` and allows `CONNECT` to `port`.
    pub fn find_connect(&self, host: &str, port: u16) -> Option<&(Arc<RouteConfig>, T)> {
        self.routes.iter().find(|(r, _)| {
            r.matcher.host.as_ref().is_some_and(|h| h.host == host)
                && r.connect_ports.contains(&port)
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &(Arc<RouteConfig>, T)> {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_segment_aware() {
        assert!(prefix_matches("/v1/quotes", "/v1/quotes"));
        assert!(prefix_matches("/v1/quotes", "/v1/quotes/9"));
        assert!(!prefix_matches("/v1/quotes", "/v1/quotesX"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/v1/", "/v1/x"));
        assert!(!prefix_matches("/v2", "/v1"));
    }
}
