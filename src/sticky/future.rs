//! The response future of [`Sticky`](super::Sticky).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::shared::{BoxFuture, Loaded, Shared, Start, Track};
use super::table::Unread;
use crate::backend::BackendId;
use crate::error::BoxError;

pin_project! {
    /// The response future of [`Sticky`](super::Sticky): loads an unknown
    /// session from the store when it must, calls the inner service, then
    /// learns from the response (starts, moves or ends the session, sets
    /// the cookie) and finishes the store and hook calls that go with it.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        shared: Arc<Shared>,
        track: Option<Track>,
        // The request's path, when the layer learns a cookie.
        path: Option<PathAndQuery>,
    }

    impl<S, B> PinnedDrop for ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before its response came (the client went away): a
            // session it started is not saved, so it is not marked saved.
            let this = this.project();
            if let Some(track) = this.track.take() {
                this.shared.unsaved(&track);
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // Boxed: a load from the store is rare, and the request and the
        // service it holds would make every response future larger.
        Loading {
            loading: Box<Loading<S, B>>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
        Finishing {
            work: Finishing,
            response: Option<S::Response>,
        },
        Refused {
            error: Option<BoxError>,
        },
        Done,
    }
}

/// The writes and hooks of a response, run to their end in a task of
/// their own (so that a client gone meanwhile does not stop an `on_move`
/// hook half-way), waited for until the layer's `response_wait` at most;
/// or in the response's future outside a runtime.
enum Finishing {
    Spawned {
        task: tokio::task::JoinHandle<()>,
        // Boxed: only responses with writes wait, and a timer would make
        // every response future larger.
        limit: Option<Pin<Box<tokio::time::Sleep>>>,
    },
    Inline(BoxFuture<()>),
}

impl Finishing {
    fn new(work: BoxFuture<()>, limit: Duration) -> Self {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => Finishing::Spawned {
                task: runtime.spawn(work),
                limit: (!limit.is_zero()).then(|| Box::pin(tokio::time::sleep(limit))),
            },
            Err(_) => Finishing::Inline(work),
        }
    }

    /// Ready once the work is done (`false`), or once the response may
    /// wait no longer (`true`: the task goes on without its handle).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        match self {
            Finishing::Spawned { task, limit } => {
                // A hook that panicked has been reported by its task; the
                // response goes on, as after a hook's error.
                if Pin::new(task).poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                let Some(limit) = limit else {
                    return Poll::Pending;
                };
                ready!(limit.as_mut().poll(cx));
                Poll::Ready(true)
            }
            Finishing::Inline(work) => work.as_mut().poll(cx).map(|()| false),
        }
    }
}

/// A request waiting for its session to be loaded from the store, then
/// (its track set) for its service to be ready.
struct Loading<S, B> {
    key: Arc<str>,
    cookie: Option<BackendId>,
    unread: Option<Unread>,
    load: BoxFuture<Loaded>,
    service: Option<S>,
    request: Option<Request<B>>,
}

impl<S: Service<Request<B>>, B> ResponseFuture<S, B> {
    pub(crate) fn called(
        shared: Arc<Shared>,
        track: Track,
        path: Option<PathAndQuery>,
        future: S::Future,
    ) -> Self {
        ResponseFuture {
            state: State::Called { future },
            shared,
            track: Some(track),
            path,
        }
    }

    pub(crate) fn loading(
        shared: Arc<Shared>,
        key: Arc<str>,
        cookie: Option<BackendId>,
        unread: Option<Unread>,
        load: BoxFuture<Loaded>,
        service: S,
        request: Request<B>,
    ) -> Self {
        ResponseFuture {
            state: State::Loading {
                loading: Box::new(Loading {
                    key,
                    cookie,
                    unread,
                    load,
                    service: Some(service),
                    request: Some(request),
                }),
            },
            shared,
            track: None,
            path: None,
        }
    }

    pub(crate) fn refused(shared: Arc<Shared>, error: BoxError) -> Self {
        ResponseFuture {
            state: State::Refused { error: Some(error) },
            shared,
            track: None,
            path: None,
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Loading { loading } => {
                    let Loading {
                        key,
                        cookie,
                        unread,
                        load,
                        service,
                        request,
                    } = &mut **loading;
                    // Its track is set once the session is read and
                    // routed: the service's readiness is next.
                    if this.track.is_some() {
                        let ready = service.as_mut().expect("service taken once").poll_ready(cx);
                        if let Err(error) = ready!(ready) {
                            let track = this.track.take().expect("track set once routed");
                            let error = this.shared.on_error(&track, error.into());
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error));
                        }
                        let request = request.take().expect("request taken once");
                        let future = service.take().expect("service taken once").call(request);
                        this.state.set(State::Called { future });
                        continue;
                    }
                    let Loaded { stored, waiting } = ready!(load.as_mut().poll(cx));
                    let start = this.shared.after_load(
                        request.as_mut().expect("request taken once"),
                        key.clone(),
                        cookie.take(),
                        unread.take(),
                        stored,
                        Some(&waiting),
                    );
                    match start {
                        Start::Call(track) => {
                            *this.track = Some(track);
                            *this.path = this.shared.learns_on(request.as_ref().expect("request"));
                        }
                        // Forgotten since it was read: read again.
                        Start::Load {
                            key: again,
                            cookie: named,
                            unread: kept,
                            load: next,
                        } => {
                            (*key, *cookie, *unread, *load) = (again, named, kept, next);
                        }
                        Start::Refuse(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    }
                }
                StateProj::Called { future } => {
                    // The response is looked at where the inner future left
                    // it and moved once, into the output: it is large, and
                    // each move copies it.
                    let mut poll = future.poll(cx);
                    let Poll::Ready(result) = &mut poll else {
                        return Poll::Pending;
                    };
                    let track = this.track.take().expect("track set before the call");
                    let Ok(response) = result else {
                        let Poll::Ready(Err(error)) = poll else {
                            unreachable!("an error")
                        };
                        let error = this.shared.on_error(&track, error.into());
                        this.state.set(State::Done);
                        return Poll::Ready(Err(error));
                    };
                    let path = this.path.as_ref().map(PathAndQuery::path);
                    match this.shared.on_response(track, response, path) {
                        Ok(None) => {
                            this.state.set(State::Done);
                            return poll.map_err(Into::into);
                        }
                        Ok(Some(work)) => {
                            let Poll::Ready(result) = poll else {
                                unreachable!("a response")
                            };
                            this.state.set(State::Finishing {
                                work: Finishing::new(work, this.shared.config.response_wait),
                                response: result.ok(),
                            })
                        }
                        Err(error) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                    }
                }
                StateProj::Finishing { work, response } => {
                    if ready!(work.poll(cx)) {
                        this.shared.handed_on_early();
                    }
                    let response = response.take().expect("response taken once");
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Refused { error } => {
                    let error = error.take().expect("error taken once");
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => panic!("sticky ResponseFuture polled after completion"),
            }
        }
    }
}

impl<S: Service<Request<B>>, B> fmt::Debug for ResponseFuture<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
