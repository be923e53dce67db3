//! How `examples/reverse_proxy.rs` serves a client's connection, shared
//! with its tests (`tests/front.rs`): HTTP/1.1 or HTTP/2 (prior knowledge,
//! as gRPC clients connect without TLS), protocol switches included, with
//! bounds on connections that send nothing and a graceful stop.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::watch;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves client connections (see [`Front::serve`]).
pub struct Front {
    builder: auto::Builder<TokioExecutor>,
    first: Duration,
    idle: Duration,
}

impl Front {
    /// A front that closes a connection whose first request head has not
    /// come whole within `header_read_timeout` (`None`: within `idle`), an
    /// idle kept-alive HTTP/1.1 one too, and one that then starts no
    /// request for `idle`.
    pub fn new(header_read_timeout: Option<Duration>, idle: Duration) -> Front {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .keep_alive(true)
            // Without a timer hyper enforces no header read timeout (and
            // warns on every connection).
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout);
        // PINGs, after a minute without a frame from the client, find the
        // HTTP/2 clients that went away without closing, whose streams
        // would otherwise stay open for good. A client that reads, however
        // slowly, sends frames (window updates); one that stops reading is
        // for a send timeout to find.
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(60))
            .keep_alive_timeout(Duration::from_secs(20));
        Front {
            builder,
            first: header_read_timeout.unwrap_or(idle),
            idle,
        }
    }

    /// Serves `io` with `service` until the connection ends. When `stop`
    /// turns true, when no first request comes in time, or when no request
    /// starts for the idle time, the connection finishes the requests it
    /// is serving and closes (over HTTP/2 with a `GOAWAY`).
    ///
    /// Until its protocol is known, and over HTTP/2, hyper's header read
    /// timeout does not watch a connection: this does.
    pub async fn serve<I, S, B>(&self, io: I, service: S, stop: watch::Receiver<bool>)
    where
        I: Read + Write + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let started = Arc::new(AtomicUsize::new(0));
        let service = Counted {
            inner: service,
            started: started.clone(),
        };
        let connection = self.builder.serve_connection_with_upgrades(io, service);
        let mut connection = std::pin::pin!(connection);
        let mut idle = std::pin::pin!(tokio::time::sleep(self.first));
        let mut counted = 0;
        let mut stop_changed = stop.clone();
        let mut stopping = std::pin::pin!(stop_changed.wait_for(|&stop| stop));
        let mut waiting = false;
        // The stop future keeps the task's waker from its first poll, so a
        // wake polls it again only once the value changed (an atomic load):
        // polling it on every wake of a busy connection would take a lock
        // each time.
        let close = std::future::poll_fn(|cx| {
            if connection.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            // Looked at when it fires: a connection that started a request
            // since goes on for another period.
            while idle.as_mut().poll(cx).is_ready() {
                let now = started.load(Ordering::Relaxed);
                if now == counted {
                    return Poll::Ready(true);
                }
                counted = now;
                idle.as_mut().reset(tokio::time::Instant::now() + self.idle);
            }
            if !waiting || stop.has_changed().unwrap_or(true) {
                waiting = true;
                if stopping.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(true);
                }
            }
            Poll::Pending
        })
        .await;
        if close {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// A service that counts the requests it is called with.
struct Counted<S> {
    inner: S,
    started: Arc<AtomicUsize>,
}

impl<S: Service<R>, R> Service<R> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> S::Future {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.inner.call(req)
    }
}
