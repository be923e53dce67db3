//! The response future of [`Balance`](super::Balance).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::backend::{BackendId, InFlight};
use crate::error::{BackendError, BoxError, NoBackend};
use crate::extensions::{Picked, ServedBy};

use super::queue::Wait;

pin_project! {
    /// The response future of [`Balance`](super::Balance): drives the chosen
    /// backend to readiness, calls it, and labels the response.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
        // The chosen backend, and its in-flight count held until the
        // response (or error) is ready or the future is dropped.
        target: Option<(BackendId, InFlight)>,
    }
    impl<S, Req> PinnedDrop for ResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped before its backend was called: not a request sent.
            // (A backend whose `call` panicked has taken the request, and
            // counts it.)
            if matches!(
                this.state.as_ref().get_ref(),
                State::Ready {
                    request: Some(_),
                    ..
                }
            ) {
                if let Some((_, in_flight)) = this.target.take() {
                    in_flight.unused();
                }
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        NoBackend { error: NoBackend },
        Queued {
            request: Option<Req>,
            wait: Box<Wait<S, Req>>,
        },
        Ready {
            service: S,
            request: Option<Req>,
            // The failover layer's slot, told when the request is sent.
            picked: Option<Picked>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        Done,
    }
}

impl<S: Service<Req>, Req> ResponseFuture<S, Req> {
    pub(crate) fn new(
        service: S,
        request: Req,
        id: BackendId,
        in_flight: InFlight,
        picked: Option<Picked>,
    ) -> Self {
        ResponseFuture {
            state: State::Ready {
                service,
                request: Some(request),
                picked,
            },
            target: Some((id, in_flight)),
        }
    }

    pub(crate) fn queued(request: Req, wait: Box<Wait<S, Req>>) -> Self {
        ResponseFuture {
            state: State::Queued {
                request: Some(request),
                wait,
            },
            target: None,
        }
    }

    pub(crate) fn no_backend(error: NoBackend) -> Self {
        ResponseFuture {
            state: State::NoBackend { error },
            target: None,
        }
    }
}

impl<S, Req, RB> Future for ResponseFuture<S, Req>
where
    S: Service<Req, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::NoBackend { error } => {
                    let error = *error;
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Queued { request, wait } => {
                    let req = request.as_mut().expect("request kept while waiting");
                    match ready!(wait.poll_place(cx, req)) {
                        Ok(placed) => {
                            let request = request.take();
                            *this.target = Some((placed.id, placed.in_flight));
                            this.state.set(State::Ready {
                                service: placed.service,
                                request,
                                picked: placed.picked,
                            });
                        }
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    }
                }
                StateProj::Ready {
                    service,
                    request,
                    picked,
                } => {
                    if let Err(e) = ready!(service.poll_ready(cx)) {
                        let (id, in_flight) = this.target.take().expect("target set");
                        in_flight.unused();
                        this.state.set(State::Done);
                        return Poll::Ready(Err(BackendError::not_sent(id, e.into()).into()));
                    }
                    let request = request.take().expect("request taken once");
                    if let Some(picked) = picked {
                        picked.set_readying(false);
                    }
                    let future = service.call(request);
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    let result = ready!(future.poll(cx));
                    // The request is no longer in flight once its response's
                    // head is here: a backend whose exchange goes on holds
                    // its own count (`BackendState::hold_in_flight`).
                    let (id, _in_flight) = this.target.take().expect("target set");
                    this.state.set(State::Done);
                    return Poll::Ready(match result {
                        Ok(mut response) => {
                            response.extensions_mut().insert(ServedBy(id));
                            Ok(response)
                        }
                        Err(e) => Err(BackendError::new(id, e).into()),
                    });
                }
                StateProj::Done => panic!("ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
