//! The response future of [`Health`](super::Health).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

#[cfg(feature = "hyper-client")]
use super::outlier::LateOutcome;
use super::outlier::Watch;
use crate::classify::{response_fails, Classifier, Outcome};
use crate::error::BoxError;
use crate::extensions::{Picked, Target};

/// What a response future observes for the health of its backend.
pub(crate) struct Observed<C> {
    pub(crate) target: Target,
    pub(crate) watch: Arc<Watch<C>>,
    /// The failover layer's slot, which says whether an attempt dropped
    /// unfinished was abandoned at its per-try timeout; `None` when the
    /// classifier does not count timeouts.
    pub(crate) picked: Option<Picked>,
}

pin_project! {
    /// The response future of [`Health`](super::Health): classifies the
    /// outcome and records it on the backend's shared state; that of a
    /// response whose head passes and whose body an
    /// [`HttpBackend`](crate::http::HttpBackend) still streams, when that
    /// body ends (see [`ResponseBody`](crate::http::ResponseBody)). Dropped
    /// unfinished because the failover layer's per-try timeout fired, it
    /// records a failure; dropped for any other reason (the client went
    /// away, the overall deadline), nothing.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: F,
        observed: Option<Observed<C>>,
    }

    impl<F, C> PinnedDrop for ResponseFuture<F, C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(o) = this.observed.take() {
                if o.picked.as_ref().is_some_and(Picked::is_timing_out) {
                    o.watch.observe(&o.target, true);
                }
            }
        }
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn new(inner: F, observed: Option<Observed<C>>) -> Self {
        ResponseFuture { inner, observed }
    }
}

impl<C: Classifier> Observed<C> {
    /// Records the outcome of `result`. A response the classifier passes
    /// whose body an [`HttpBackend`](crate::http::HttpBackend) still
    /// streams is judged when that body ends instead: a backend that cuts
    /// its bodies short fails, though their heads came.
    fn record<RB: 'static>(self, result: &mut Result<Response<RB>, BoxError>) {
        let Ok(response) = result else {
            return self.watch.record(&self.target, &Outcome::of(result));
        };
        let failed = response_fails(&*self.watch.classifier, response);
        #[cfg(feature = "hyper-client")]
        if !failed {
            let body = response.body_mut() as &mut dyn std::any::Any;
            if let Some(body) = body.downcast_mut::<crate::http::ResponseBody>() {
                let watch = Arc::downgrade(&self.watch);
                return body.report_at_end(LateOutcome::new(self.target, watch));
            }
        }
        self.watch.observe(&self.target, failed);
    }
}

impl<F, C, RB, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    C: Classifier,
    RB: 'static,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx)).map_err(Into::into);
        if let Some(o) = this.observed.take() {
            o.record(&mut result);
        }
        Poll::Ready(result)
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
