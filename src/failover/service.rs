use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::body::Replay;
use super::future::ResponseFuture;
use super::layer::{Config, FailoverLayer};
use super::stats::FailoverStats;
use crate::classify::{Classifier, DefaultClassifier};
use crate::error::BoxError;

/// Retries a failed request on another backend: decides *when* to try
/// again, while the inner service (usually [`Balance`](crate::balance::Balance))
/// decides *who* is next.
///
/// Built by [`FailoverLayer`], which documents the settings and defaults.
/// See the [module documentation](super) for the semantics.
///
/// # Readiness
///
/// `poll_ready` is the inner service's. Each retry drives the inner service
/// (the clone that served the first attempt) to readiness again before
/// calling it.
pub struct Failover<S, C = DefaultClassifier> {
    inner: S,
    config: Arc<Config<C>>,
}

impl<S> Failover<S> {
    /// Wraps `inner` with the default settings.
    pub fn new(inner: S) -> Self {
        Failover::from_config(inner, Arc::new(Config::new()))
    }

    /// A layer with the default settings, to change with its builder
    /// methods.
    pub fn layer() -> FailoverLayer {
        FailoverLayer::new()
    }
}

impl<S, C> Failover<S, C> {
    pub(crate) fn from_config(inner: S, config: Arc<Config<C>>) -> Self {
        Failover { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming `self`.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The counters this service shares with the layer that built it, and
    /// with every other service that layer built.
    pub fn stats(&self) -> FailoverStats {
        self.config.counters.snapshot()
    }
}

impl<S: Clone, C> Clone for Failover<S, C> {
    fn clone(&self) -> Self {
        Failover {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Failover<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

impl<S, C, B, RB> Service<Request<B>> for Failover<S, C>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    B: Replay,
    C: Classifier,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone that was polled ready serves the first attempt and is
        // driven to readiness again for each retry.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::new(inner, self.config.clone(), req)
    }
}
