use std::fmt;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

use super::future::{Observed, ResponseFuture};
use super::layer::HealthLayer;
use super::outlier::Watch;
use crate::classify::{Classifier, DefaultClassifier, Outcome};
use crate::error::BoxError;
use crate::extensions::{Picked, Target};
use crate::failover::TimedOut;

/// Watches the outcomes of one backend's requests and ejects the backend
/// after consecutive failures. Built by [`HealthLayer`].
///
/// The backend is the one named by the request's [`Target`] extension, set
/// by [`Balance`](crate::balance::Balance). A request without a `Target`
/// (sent to the service directly, or a health probe) passes through
/// unobserved.
///
/// `poll_ready` is the inner service's; errors are boxed. A readiness
/// error counts as a failure of the backend the last request with a
/// `Target` named, whoever polled: a health probe sent through this
/// service (as [`HttpProbe`](super::HttpProbe) does) that cannot get it
/// ready counts too.
pub struct Health<S, C = DefaultClassifier> {
    inner: S,
    watch: Arc<Watch<C>>,
}

impl<S> Health<S> {
    /// Wraps `inner` with a [`HealthLayer`] of its own (defaults). To cap
    /// ejections across a pool, build every backend from one layer instead.
    pub fn new(inner: S) -> Self {
        use tower_layer::Layer;
        HealthLayer::new().layer(inner)
    }

    /// A layer with the defaults: see [`HealthLayer`].
    pub fn layer() -> HealthLayer {
        HealthLayer::new()
    }
}

impl<S, C> Health<S, C> {
    pub(crate) fn from_watch(inner: S, watch: Arc<Watch<C>>) -> Self {
        Health { inner, watch }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C> Clone for Health<S, C> {
    fn clone(&self) -> Self {
        Health {
            inner: self.inner.clone(),
            watch: self.watch.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Health<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("inner", &self.inner)
            .field("config", &self.watch.config)
            .finish()
    }
}

impl<S, C, B, RB> Service<Request<B>> for Health<S, C>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    C: Classifier,
    RB: 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let err: BoxError = match ready!(self.inner.poll_ready(cx)) {
            Ok(()) => return Poll::Ready(Ok(())),
            Err(e) => e.into(),
        };
        // A backend that cannot get ready (a connection it cannot make)
        // fails like one that fails a request, once the layer knows which
        // backend it wraps.
        if let Some(target) = self.watch.known_target() {
            self.watch.record(&target, &Outcome::Error(&*err));
        }
        Poll::Ready(Err(err))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ext = req.extensions();
        let observed = ext.get::<Target>().map(|target| {
            self.watch.learn(target);
            // Only a failover layer with a per-try timeout puts a slot
            // that can say an attempt timed out.
            let picked = ext.get::<Picked>().cloned();
            let timeouts_fail = picked.is_some()
                && *self.watch.timeouts_fail.get_or_init(|| {
                    let timed_out = TimedOut::new(Duration::ZERO);
                    self.watch
                        .classifier
                        .is_failure(&Outcome::Error(&timed_out))
                });
            Observed {
                target: target.clone(),
                watch: self.watch.clone(),
                picked: picked.filter(|_| timeouts_fail),
            }
        });
        ResponseFuture::new(self.inner.call(req), observed)
    }
}
