//! A service whose readiness a test holds back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::Service;

/// `S`, whose `poll_ready` stays pending while its gate is shut (it wakes
/// no one: a timer must).
#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    shut: Arc<AtomicBool>,
    /// Whether a call shuts the gate: ready for one call only.
    once: bool,
}

impl<S> Gated<S> {
    /// Held back while `shut` is set.
    pub fn new(inner: S, shut: Arc<AtomicBool>) -> Self {
        Gated {
            inner,
            shut,
            once: false,
        }
    }

    /// Ready for one call only, never again after it.
    pub fn one_call(inner: S) -> Self {
        Gated {
            inner,
            shut: Arc::default(),
            once: true,
        }
    }
}

impl<S: Service<R>, R> Service<R> for Gated<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.shut.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> S::Future {
        if self.once {
            self.shut.store(true, Ordering::SeqCst);
        }
        self.inner.call(req)
    }
}
