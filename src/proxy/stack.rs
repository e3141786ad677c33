//! A small stack builder (after linkerd2-proxy's `Stack<S>`): each `push` wraps what is
//! there, so the last push is the first to see a request.

use bytes::Bytes;
use http::{Request, Response};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use super::rescue::ProxyError;
use super::Body;

pub struct Stack<S>(S);

impl<S> Stack<S> {
    pub fn new(inner: S) -> Self {
        Stack(inner)
    }

    pub fn push<L: Layer<S>>(self, layer: L) -> Stack<L::Service> {
        Stack(layer.layer(self.0))
    }

    /// Pins the request type here so type errors point at this line.
    pub fn check_service<R>(self) -> Self
    where
        S: Service<R>,
    {
        self
    }

    pub fn into_inner(self) -> S {
        self.0
    }

    /// Erases the type at the module edge.
    pub fn boxed(self) -> BoxCloneSyncService<Request<Bytes>, Response<Body>, ProxyError>
    where
        S: Service<Request<Bytes>, Response = Response<Body>, Error = ProxyError>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        BoxCloneSyncService::new(self.0)
    }
}
