use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::pool::Checkin;
use super::stall::{Stalls, Watch};

/// The client's watch over its response bodies' readers.
pub(super) type BodyStalls = Stalls<Core>;

/// How long a response body waits: for its backend (the read timeout) and
/// for its reader (the send timeout's watch); `None` for no limit.
#[derive(Clone)]
pub(super) struct Waits {
    pub(super) read_timeout: Option<Duration>,
    pub(super) stalls: Option<Arc<BodyStalls>>,
}
use super::timeout::{self, Sent, Timer};
use crate::backend::InFlight;
use crate::error::BoxError;
use crate::health::LateOutcome;

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
/// its client stopped reading: the client's
/// [`send_timeout`](super::HttpClient::send_timeout) (default 60 s)
/// bounds that, giving up a body that has had a frame out for the
/// timeout; its next poll fails with an I/O error of kind `TimedOut`.
///
/// Behind a [`Health`](crate::health::Health) layer, a response whose head
/// its classifier passes is judged when its body ends: a success once read
/// to its end or dropped, a failure as the classifier judges the error
/// when its backend cuts it short (a connection closed or a stream reset
/// in the middle, a malformed body), nothing when it waits for its
/// backend's next frame (given up at the read timeout, or by a reader that
/// leaves). A body that
/// fails because the request's upload did fails with an
/// [`InvalidRequest`](crate::error::InvalidRequest), which counts as
/// nothing.
pub struct ResponseBody {
    held: Held,
    /// The longest wait for a frame, and the client's send timeout, which
    /// watches the body once it hands out a frame before its end.
    waits: Waits,
}

/// Where what a body holds is.
enum Held {
    /// With the body alone.
    Own(Core),
    /// Also with its client's send timeout, which takes it if the body's
    /// reader leaves a frame for too long.
    Watched(Arc<Watch<Core>>),
    /// Moved in between.
    Moving,
}

/// What a response body holds while it is read.
pub(super) struct Core {
    inner: hyper::body::Incoming,
    /// The connection, while the body is still being read from it.
    pooled: Option<Box<dyn Checkin>>,
    /// The request's count in flight, while the body is still being read.
    in_flight: Option<InFlight>,
    /// The health layer's verdict on the response, while the body is
    /// still being read (see [`ResponseBody::report_at_end`]).
    outcome: Option<LateOutcome>,
    /// The last poll of `inner` found nothing yet: the body waits for its
    /// backend.
    awaiting: bool,
    /// How the request's upload went: a body that fails because the upload
    /// did (the client went away) fails as the request's.
    sent: Sent,
    /// The timer of the waits for a frame: the connection's (given back
    /// with it), else made at the body's first wait (a body read without
    /// one never has it).
    timer: Timer,
    /// When the current wait for a frame started.
    since: Option<Instant>,
    /// The rest of a frame handed out in pieces (see [`PIECE`]).
    rest: Bytes,
    done: bool,
}

/// The most of a frame handed out at once while the send timeout watches:
/// a reader is cut off only when it takes in less than this in the
/// timeout, rather than less than whatever the connection read at once
/// (about 500 KiB at times over HTTP/1).
const PIECE: usize = 16 * 1024;

/// What a poll of a body returns.
type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

impl ResponseBody {
    pub(super) fn new(
        inner: hyper::body::Incoming,
        pooled: Option<Box<dyn Checkin>>,
        waits: Waits,
        timer: Timer,
        sent: Sent,
    ) -> Self {
        ResponseBody {
            held: Held::Own(Core {
                inner,
                pooled,
                in_flight: None,
                outcome: None,
                awaiting: false,
                sent,
                timer,
                since: None,
                rest: Bytes::new(),
                done: false,
            }),
            waits,
        }
    }

    /// Holds `in_flight` until the body has been read or dropped.
    pub(super) fn hold(&mut self, in_flight: InFlight) {
        if let Held::Own(core) = &mut self.held {
            core.in_flight = Some(in_flight);
        }
    }

    /// Holds the health layer's `outcome` of the response until the body
    /// ends (see [`LateOutcome`]), with that of a health layer further down
    /// if there is one; reports it at once (dropped) when the body has
    /// already ended.
    pub(crate) fn report_at_end(&mut self, outcome: LateOutcome) {
        if let Held::Own(core) = &mut self.held {
            if !core.done && !core.at_end() {
                core.outcome = Some(match core.outcome.take() {
                    Some(below) => outcome.over(below),
                    None => outcome,
                });
            }
        }
    }
}

/// Reports the health layer's `outcome` of a response that a poll of its
/// body settled, once the body's lock (with the send timeout) is let go,
/// since the report may eject the backend, emitting events: failed with
/// the error the poll returned (`frame`), else a success (dropped).
fn settle(outcome: LateOutcome, frame: &Polled) {
    if let Poll::Ready(Some(Err(e))) = frame {
        outcome.failed(&**e);
    }
}

impl Core {
    /// Polls for the next frame, waiting for at most `read_timeout`; hands
    /// data out in pieces of at most [`PIECE`] bytes when `in_pieces`. With
    /// the frame, the health layer's outcome if the poll settled it (to
    /// [`settle`]).
    fn poll_frame(
        &mut self,
        read_timeout: Option<Duration>,
        in_pieces: bool,
        cx: &mut Context<'_>,
    ) -> (Polled, Option<LateOutcome>) {
        let frame = if !self.rest.is_empty() {
            let piece = self.rest.split_to(PIECE.min(self.rest.len()));
            Some(Ok(Frame::data(piece)))
        } else {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            self.awaiting = polled.is_pending();
            match polled {
                Poll::Ready(frame) => frame,
                Poll::Pending => return (self.wait(read_timeout, cx), None),
            }
        };
        self.since = None;
        let frame = match frame {
            Some(Ok(f)) if in_pieces && f.data_ref().is_some_and(|d| d.len() > PIECE) => {
                let mut piece = f.into_data().unwrap_or_default();
                self.rest = piece.split_off(PIECE);
                Some(Ok(Frame::data(piece)))
            }
            frame => frame,
        };
        match &frame {
            None => self.done = true,
            // Trailers end a body, though a chunked one does not say so
            // until it is polled again (which a server forwarding it does
            // not do).
            Some(Ok(f)) => self.done = f.is_trailers() || self.at_end(),
            // The connection is gone with the error.
            Some(Err(_)) => {
                self.pooled = None;
                self.in_flight = None;
            }
        }
        if self.done {
            self.in_flight = None;
        }
        let settled = match &frame {
            Some(Err(_)) => self.outcome.take(),
            _ if self.done => self.outcome.take(),
            _ => None,
        };
        let frame = frame.map(|f| match f {
            Ok(f) => Ok(super::clean_trailers(f)),
            Err(e) => Err(super::pool::sent_error(e, &self.sent)),
        });
        (Poll::Ready(frame), settled)
    }

    /// Waits for the next frame, for at most the read timeout: fails the
    /// body, giving its connection up, when the timeout passes.
    fn wait(&mut self, read_timeout: Option<Duration>, cx: &mut Context<'_>) -> Polled {
        let Some(timeout) = read_timeout else {
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

    /// Whether a frame it handed out leaves more to read.
    fn waits_for_more(&self, frame: &Polled) -> bool {
        matches!(frame, Poll::Ready(Some(Ok(_)))) && !self.done
    }

    /// Whether nothing is left to hand out.
    fn at_end(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut sum = SizeHint::new();
        if let Some(upper) = hint.upper() {
            sum.set_upper(upper.saturating_add(rest));
        }
        sum.set_lower(hint.lower().saturating_add(rest));
        sum
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

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = &mut *self;
        match &mut this.held {
            Held::Own(core) => {
                let in_pieces = this.waits.stalls.is_some();
                let (frame, settled) = core.poll_frame(this.waits.read_timeout, in_pieces, cx);
                if let Some(outcome) = settled {
                    settle(outcome, &frame);
                }
                let stalls = this.waits.stalls.as_ref();
                if let Some(stalls) = stalls.filter(|_| core.waits_for_more(&frame)) {
                    // Its reader may leave it now: watched from here on.
                    let Held::Own(core) = std::mem::replace(&mut this.held, Held::Moving) else {
                        unreachable!("matched above");
                    };
                    this.held = match stalls.watch(core) {
                        Ok(watch) => Held::Watched(watch),
                        Err(core) => Held::Own(core),
                    };
                }
                frame
            }
            Held::Watched(watch) => {
                let stalls = (this.waits.stalls.as_ref()).expect("only a send timeout watches");
                let mut held = watch.polled();
                let Some(core) = held.as_mut() else {
                    return Poll::Ready(Some(Err(timeout::timed_out_for(
                        "the response's reader took nothing of it",
                        "send",
                        stalls.timeout(),
                    )
                    .into())));
                };
                let (frame, settled) = core.poll_frame(this.waits.read_timeout, true, cx);
                if core.waits_for_more(&frame) {
                    watch.handed_out(stalls);
                }
                drop(held);
                if let Some(outcome) = settled {
                    settle(outcome, &frame);
                }
                frame
            }
            Held::Moving => unreachable!("a body is moved between two statements of a poll"),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.held {
            Held::Own(core) => core.at_end(),
            // One the send timeout took ends in its error.
            Held::Watched(watch) => watch.held().as_ref().is_some_and(Core::at_end),
            Held::Moving => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.held {
            Held::Own(core) => core.size_hint(),
            Held::Watched(watch) => watch
                .held()
                .as_ref()
                .map_or_else(SizeHint::default, Core::size_hint),
            Held::Moving => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Held::Watched(watch) = &self.held {
            // Now, not when the send timeout next looks: the connection
            // goes back to the pool at once.
            let core = watch.held().take();
            drop(core);
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // Dropped before its end by its reader, or by the send timeout for
        // a reader that stopped taking it: a success, as far as it went
        // (the drop reports it). Unless it was waiting for its backend,
        // given up by the read timeout or by its reader: that says nothing
        // either way (as a request whose client leaves before its head
        // comes), since a backend silent in the middle of a body may be
        // stuck, or may serve a stream with nothing to say yet (events, a
        // watch, a long poll).
        if let Some(outcome) = self.outcome.take() {
            if self.awaiting {
                outcome.discard();
            }
        }
        if let Some(pooled) = self.pooled.take() {
            if self.done || self.inner.is_end_stream() {
                pooled.checkin(self.timer.take());
            }
        }
    }
}
