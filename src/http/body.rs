use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::pool::Checkin;
use crate::backend::InFlight;
use crate::error::BoxError;

/// The streaming body of a response from an
/// [`HttpBackend`](super::HttpBackend).
///
/// Its connection goes back to the client's pool once the body has been
/// read to its end; a body dropped before that closes the connection. Until
/// then the request counts as in flight on the backend a balancer sent it
/// to (see [`BackendState::hold_in_flight`](crate::BackendState::hold_in_flight)).
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    /// The connection, while the body is still being read from it.
    pooled: Option<Box<dyn Checkin>>,
    /// The request's count in flight, while the body is still being read.
    in_flight: Option<InFlight>,
    done: bool,
}

impl ResponseBody {
    pub(super) fn new(inner: hyper::body::Incoming, pooled: Option<Box<dyn Checkin>>) -> Self {
        ResponseBody {
            inner,
            pooled,
            in_flight: None,
            done: false,
        }
    }

    /// Holds `in_flight` until the body has been read or dropped.
    pub(super) fn hold(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
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
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.done = true,
            Some(Ok(_)) => self.done = self.inner.is_end_stream(),
            // The connection is gone with the error.
            Some(Err(_)) => {
                self.pooled = None;
                self.in_flight = None;
            }
        }
        if self.done {
            self.in_flight = None;
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
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
                pooled.checkin();
            }
        }
    }
}
