//! A service that calls its inner one late.

use tower::{Service, ServiceExt};

/// Calls its inner service only when its future is first polled, as a
/// buffer does: the balancer below picks after `call` has returned.
#[derive(Clone)]
pub struct Deferred<S>(pub S);

impl<S, R> Service<R> for Deferred<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.oneshot(req).await })
    }
}
