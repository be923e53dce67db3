use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::pool::Checkin;
use super::timeout::{self, Timer};
use crate::backend::InFlight;
use crate::error::BoxError;

/// The streaming body of a response from an
/// [`HttpBackend`](super::HttpBackend).
///
/// Its connection goes back to the client's pool when the body, read to
/// its end, is dropped; a body dropped before its end closes the
/// connection. Until
/// then the request counts as in flight on the backend a balancer sent it
/// to (see [`BackendState::hold_in_flight`](crate::BackendState::hold_in_flight)).
///
/// A wait for the next frame that lasts the client's
/// [`read_timeout`](super::HttpClient::read_timeout) (default 60 s) fails
/// the body with an I/O error of kind `TimedOut`: an HTTP/1.1 connection
/// is not reused (over HTTP/2 the stream is reset), and the request no
/// longer counts as in flight. Only waits count:
/// a body read slowly (its client is slow) does not time out, nor one
/// its client stopped reading: serve client connections over a
/// [`SendTimeout`](super::SendTimeout) to bound that.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    /// The connection, while the body is still being read from it.
    pooled: Option<Box<dyn Checkin>>,
    /// The request's count in flight, while the body is still being read.
    in_flight: Option<InFlight>,
    /// The longest wait for a frame; `None` for no limit.
    read_timeout: Option<Duration>,
    /// The timer of the waits for a frame: the connection's (given back
    /// with it), else made at the body's first wait (a body read without
    /// one never has it).
    timer: Timer,
    /// When the current wait for a frame started.
    since: Option<Instant>,
    done: bool,
}

impl ResponseBody {
    pub(super) fn new(
        inner: hyper::body::Incoming,
        pooled: Option<Box<dyn Checkin>>,
        read_timeout: Option<Duration>,
        timer: Timer,
    ) -> Self {
        ResponseBody {
            inner,
            pooled,
            in_flight: None,
            read_timeout,
            timer,
            since: None,
            done: false,
        }
    }

    /// Holds `in_flight` until the body has been read or dropped.
    pub(super) fn hold(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
    }
}

impl ResponseBody {
    /// Waits for the next frame, for at most the read timeout: fails the
    /// body, giving its connection up, when the timeout passes.
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(timeout) = self.read_timeout else {
            return Poll::Pending;
        };
        let since = timeout::start(&mut self.timer, &mut self.since, timeout);
        std::task::ready!(timeout::passed(&mut self.timer, since, timeout, cx));
        // The connection is in an unknown state, and the request over.
        self.pooled = None;
        self.in_flight = None;
        Poll::Ready(Some(Err(timeout::timed_out(
            "the backend sent nothing more of the response body",
            timeout,
        )
        .into())))
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => return self.wait(cx),
        };
        self.since = None;
        match &frame {
            None => self.done = true,
            // Trailers end a body, though a chunked one does not say so
            // until it is polled again (which a server forwarding it does
            // not do).
            Some(Ok(f)) => self.done = f.is_trailers() || self.inner.is_end_stream(),
            // The connection is gone with the error.
            Some(Err(_)) => {
                self.pooled = None;
                self.in_flight = None;
            }
        }
        if self.done {
            self.in_flight = None;
        }
        Poll::Ready(frame.map(|f| f.map(super::clean_trailers).map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            if self.done || self.inner.is_end_stream() {
                pooled.checkin(self.timer.take());
            }
        }
    }
}
