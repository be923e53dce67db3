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
use crate::extensions::Target;

pin_project! {
    /// The response future of [`Health`](super::Health): classifies the
    /// outcome and records it on the backend's shared state.
    pub struct ResponseFuture<F, C> {
        #[pin]
        inner: F,
        observed: Option<(Target, Arc<Watch<C>>)>,
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn new(inner: F, observed: Option<(Target, Arc<Watch<C>>)>) -> Self {
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
        if let Some((target, watch)) = this.observed.take() {
            let failed = watch.classifier.is_failure(&Outcome::of(&result));
            watch.observe(&target, failed);
        }
        Poll::Ready(result)
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
