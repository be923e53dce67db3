//! The response future of [`Health`](super::Health).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::outlier::Watch;
use crate::classify::{Classifier, Outcome};
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
    /// outcome and records it on the backend's shared state. Dropped
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

impl<F, C, RB, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    C: Classifier,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx)).map_err(Into::into);
        if let Some(o) = this.observed.take() {
            o.watch.record(&o.target, &Outcome::of(&result));
        }
        Poll::Ready(result)
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
