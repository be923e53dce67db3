//! Request bodies that can be sent again.
//!
//! A retried request needs its body a second time. [`Failover`](super::Failover)
//! takes any request whose body implements [`Replay`]:
//!
//! * every `Clone` body (for example `http_body_util::Full<Bytes>`, `()` or
//!   `String`) is replayed as is, by cloning it;
//! * any other body is wrapped by [`BufferBodyLayer`] into a [`ReplayBody`]:
//!   bodies up to a limit (64 KiB by default) are read into memory before the
//!   first attempt and replayed from there; a larger body is streamed to the
//!   first backend that asks for it. Such a request may still be retried
//!   while no backend has read more of its body than was held (a refused
//!   connection), never after. At most the limit is copied: the frame that
//!   would pass it is handed on as it came. A client that stops sending a
//!   body being buffered is given up on after a read timeout (60 s by
//!   default).
//!
//! A stream, whose client sends more only once the backend answered (a
//! gRPC call), is passed on as soon as it pauses, with what came so far;
//! what backends read of it is held up to the limit, so that it can still
//! be sent again until they read past it: see
//! [`BufferBodyLayer::stream_when_idle`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use tokio::time::{Instant, Sleep};

use crate::classify::grpc_subtype;
use crate::error::{BoxError, InvalidRequest};
use crate::time::{later, set_timer};

/// The default limit of [`BufferBodyLayer`]: 64 KiB.
pub const DEFAULT_BUFFER_LIMIT: usize = 64 * 1024;

/// The most a buffered body reserves before its bytes come, whatever the
/// length it claims (hyper's own first read buffer is as large).
const RESERVE_AHEAD: usize = 8 * 1024;

/// The default [`BufferBodyLayer::read_timeout`]: 60 s, as nginx's
/// `client_body_timeout`.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A request body that can (sometimes) be produced again for a retry.
///
/// Implemented by every `Clone` body and by [`ReplayBody`]. A clone must
/// be a whole copy of the body: one whose clones share a source (a stream
/// over a shared channel, say) would be replayed with what the failed
/// attempt left of it. Wrap such a body with [`BufferBodyLayer`] instead.
pub trait Replay: Sized {
    /// A copy of the body for one more attempt, or `None` when the body was
    /// already consumed and cannot be sent again.
    fn replay(&self) -> Option<Self>;

    /// Whether [`replay`](Self::replay) would make a copy, without making
    /// one (a copy of a body being streamed takes the right to send it from
    /// the copies before it).
    fn is_replayable(&self) -> bool {
        self.replay().is_some()
    }

    /// Called when no attempt follows and the copies made since the last
    /// one that was sent were not (the retry they were made for did not
    /// happen: the budget refused it, no backend was left): the right to
    /// send the body goes back to the copy that was sent, whose backend
    /// may still be reading it. By default nothing: a clone holds no such
    /// right.
    fn give_back(&self) {}
}

impl<T: Clone> Replay for T {
    #[inline]
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }

    #[inline]
    fn is_replayable(&self) -> bool {
        true
    }
}

/// A body read into memory (up to a limit) so that it can be sent again, or,
/// past the limit (or passed on before its end), a body that can be sent
/// again only while what a backend read of it is held.
///
/// Built by [`BufferBodyLayer`] (or [`ReplayBody::buffer`]). Its data is
/// [`Bytes`] and its error a [`BoxError`].
///
/// A body passed on before its end keeps the frames a backend takes while
/// they fit in the limit: until a backend reads past it, a new copy can be
/// made, which sends them again, then the rest. Of such copies, only the
/// one [`replay`](Replay::replay) made last may be sent (or, after
/// [`give_back`](Replay::give_back), the one sent before it): an earlier
/// copy, read after it was made, fails with an error rather than take the
/// body from the attempt it was made for. A copy waiting for the body's
/// next frame is woken to learn so when the later copy is first read from.
pub struct ReplayBody<B> {
    kind: Kind<B>,
}

enum Kind<B> {
    /// The whole body, in memory.
    Buffered {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
        len: u64,
        /// What `data` takes of the layer's [`Budget`], until the last copy
        /// is dropped.
        taken: Option<Arc<Taken>>,
    },
    /// A body passed on before its end: what was read, then the rest, sent
    /// by the copy made last (see [`Shared`]).
    Once {
        shared: Arc<Mutex<Shared<B>>>,
        /// Which copy this is: the latest one made is `shared.live`.
        copy: u64,
        hint: SizeHint,
        /// How many of the kept frames this copy has sent; `None` until it
        /// sends anything.
        sent: Option<usize>,
        progress: SendProgress,
    },
}

/// How far the one copy of a body sent once has got, shared by its copies.
/// `BufferBody` puts it in the request's extensions, so that the failover
/// layer's per-try timeout can wait for a streamed upload to end and run
/// from there.
#[derive(Clone, Debug, Default)]
pub(crate) struct SendProgress(Arc<Mutex<SendState>>);

/// See [`SendProgress`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SendState {
    /// No backend has started to read the body.
    #[default]
    Unsent,
    /// A backend is reading it: it last took a frame at `last`, and
    /// `starved` when its last look found none ready (it waits for the
    /// client, not the other way round).
    Sending { last: Instant, starved: bool },
    /// The backend read it to its end (or failed, or dropped it) then.
    Sent(Instant),
}

impl SendProgress {
    pub(crate) fn get(&self) -> SendState {
        *self.0.lock()
    }

    /// A backend takes a frame (`starved: false`), or finds none ready.
    fn sending(&self, starved: bool) {
        let mut state = self.0.lock();
        *state = match *state {
            SendState::Sent(_) => return,
            SendState::Sending { last, .. } if starved => SendState::Sending { last, starved },
            _ => SendState::Sending {
                last: Instant::now(),
                starved,
            },
        };
    }

    fn end(&self) {
        let mut state = self.0.lock();
        if let SendState::Sending { .. } = *state {
            *state = SendState::Sent(Instant::now());
        }
    }

    /// A new copy is to be sent: nothing of it was.
    fn reset(&self) {
        *self.0.lock() = SendState::Unsent;
    }
}

/// What the copies of a body passed on before its end share: the body, the
/// frames read from it while they are kept, and which copy may send it.
/// Each copy made hands that right on to itself, so a copy left behind by
/// an abandoned attempt (in a buffer's queue, say) cannot take the body
/// from the attempt after it, which would fail that attempt and send the
/// request where no one waits for its answer.
struct Shared<B> {
    /// The frames read, in order, those read before the body was passed on
    /// first: each copy sends them, then reads on from `body`. Let go once
    /// the body cannot be sent whole again.
    kept: Vec<Kept>,
    /// The bytes of data in `kept`.
    kept_len: usize,
    /// The most data `kept` takes from `body`.
    limit: usize,
    /// Whether a new copy can send the body whole: `kept` holds every frame
    /// read, and none past the limit was sent. (The frame that passed the
    /// limit while the body was buffered is kept, to be sent first.)
    whole: bool,
    body: Pin<Box<B>>,
    ended: bool,
    /// The copy that may send the body: the last one made, or the one
    /// read from before it again (see [`Replay::give_back`]).
    live: u64,
    /// The copies made: each new one's number.
    made: u64,
    /// The copy that was live when the live one was made: the one
    /// [`Replay::give_back`] hands the body back to.
    before: u64,
    /// The last copy that was read from: until the live copy is, the one
    /// it superseded is not told (it may be given the body back).
    read: u64,
    /// What `kept` takes of the layer's [`Budget`]: given back as `kept`
    /// is let go.
    held: Option<Taken>,
    /// The task of the copy waiting for the body's next frame: woken when
    /// a later copy is first read from, so that it learns it is superseded.
    waiting: Option<Waker>,
}

/// The bytes the bodies of one [`BufferBodyLayer`] (and its clones) hold,
/// and their bound ([`BufferBodyLayer::max_held`]).
#[derive(Debug)]
struct Budget {
    held: AtomicUsize,
    max: usize,
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
struct Taken {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Taken {
    /// Takes `n` more bytes into `taken` if the budget has room for them
    /// (always, without a budget); whether it did.
    fn more(taken: &mut Option<Taken>, n: usize) -> bool {
        let Some(taken) = taken else { return true };
        let budget = &taken.budget;
        let took = budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&held| held <= budget.max)
            })
            .is_ok();
        if took {
            taken.bytes += n;
        }
        took
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The most frames a body passed on before its end keeps: small frames
/// cost more than their bytes.
const MAX_KEPT_FRAMES: usize = 1024;

/// A frame read from a body passed on before its end, kept to be sent
/// again.
#[derive(Clone)]
enum Kept {
    Data(Bytes),
    Trailers(Box<HeaderMap>),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(data) => Frame::data(data.clone()),
            Kept::Trailers(trailers) => Frame::trailers((**trailers).clone()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Kept::Data(data) => data.len(),
            Kept::Trailers(_) => 0,
        }
    }
}

impl<B> Shared<B> {
    /// Keeps `frame`, just read from the body by the copy that may send
    /// it, if every frame before it is kept and it fits in the limit, and
    /// a new copy can still be made (`alone`: no one else holds the body);
    /// whether it did.
    fn keep(&mut self, frame: &Frame<Bytes>, alone: bool) -> bool {
        if !self.whole {
            return false;
        }
        let size = match (frame.data_ref(), frame.trailers_ref()) {
            // Nothing to send again.
            (Some(data), _) if data.is_empty() => return false,
            (Some(data), _) => data.len(),
            (None, Some(_)) => 0,
            (None, None) => {
                self.lose_kept();
                return false;
            }
        };
        let len = self.kept_len.saturating_add(size);
        if alone
            || len > self.limit
            || self.kept.len() >= MAX_KEPT_FRAMES
            || !Taken::more(&mut self.held, size)
        {
            self.lose_kept();
            return false;
        }
        let kept = match frame.data_ref() {
            // A copy: the frame may be a slice of a larger buffer (an
            // HTTP/2 connection's read buffer), which a slice kept here
            // would hold whole.
            Some(data) => Kept::Data(Bytes::copy_from_slice(data)),
            // Trailers, as the size above found.
            None => Kept::Trailers(Box::new(frame.trailers_ref().cloned().unwrap_or_default())),
        };
        self.kept_len = len;
        self.kept.push(kept);
        true
    }

    /// The body cannot be sent whole again: what is kept is let go (the
    /// copy reading it sent it all before it read on).
    fn lose_kept(&mut self) {
        self.whole = false;
        self.kept = Vec::new();
        self.held = None;
    }
}

/// An empty body, held in memory: what an [`HttpProbe`] sends through a
/// pool whose backends take `ReplayBody`s, as a proxy's do.
///
/// [`HttpProbe`]: crate::health::HttpProbe
impl<B> Default for ReplayBody<B> {
    fn default() -> Self {
        ReplayBody::full(Bytes::new())
    }
}

/// `data`, held in memory (see [`full`](ReplayBody::full)): what a
/// [`GrpcProbe`] sends through a proxy's pool.
///
/// [`GrpcProbe`]: crate::health::GrpcProbe
impl<B> From<Bytes> for ReplayBody<B> {
    fn from(data: Bytes) -> Self {
        ReplayBody::full(data)
    }
}

impl<B> ReplayBody<B> {
    /// A body held in memory, replayable any number of times.
    pub fn full(data: Bytes) -> Self {
        let len = data.len() as u64;
        ReplayBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers: None,
                len,
                taken: None,
            },
        }
    }

    /// Whether the body is held in memory (and so can always be replayed).
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, Kind::Buffered { .. })
    }

    /// Whether a backend read this body past what is held of it, so that
    /// it cannot be sent again.
    pub fn is_consumed(&self) -> bool {
        !self.is_replayable()
    }
}

impl<B> ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    /// Reads `body` into memory when it is at most `limit` bytes long;
    /// otherwise keeps what was read and the rest of the body, to be sent
    /// once.
    ///
    /// This waits for the body for as long as it takes; [`BufferBody`]
    /// gives up on a body that stops coming.
    pub async fn buffer(body: B, limit: usize) -> Result<Self, BoxError> {
        let mut buffering = Buffering::new(body, limit, None, None);
        std::future::poll_fn(|cx| buffering.poll(cx)).await
    }
}

impl<B> Replay for ReplayBody<B> {
    fn is_replayable(&self) -> bool {
        match &self.kind {
            Kind::Buffered { .. } => true,
            Kind::Once { shared, .. } => shared.lock().whole,
        }
    }

    fn give_back(&self) {
        if let Kind::Once { shared, .. } = &self.kind {
            let mut shared = shared.lock();
            // Not told it was superseded (that happens at the live copy's
            // first read), the copy before it reads on (read from or not:
            // its backend may have answered before it read).
            if shared.read != shared.live {
                shared.live = shared.before;
            }
        }
    }

    fn replay(&self) -> Option<Self> {
        match &self.kind {
            Kind::Buffered {
                data,
                trailers,
                len,
                taken,
            } => Some(ReplayBody {
                kind: Kind::Buffered {
                    data: data.clone(),
                    trailers: trailers.clone(),
                    len: *len,
                    taken: taken.clone(),
                },
            }),
            Kind::Once {
                shared: arc,
                hint,
                progress,
                ..
            } => {
                let mut shared = arc.lock();
                if !shared.whole {
                    return None;
                }
                shared.before = shared.live;
                shared.made += 1;
                shared.live = shared.made;
                progress.reset();
                let copy = shared.live;
                drop(shared);
                Some(ReplayBody {
                    kind: Kind::Once {
                        shared: arc.clone(),
                        copy,
                        hint: *hint,
                        sent: None,
                        progress: progress.clone(),
                    },
                })
            }
        }
    }
}

/// Why a copy of a body sent once may not be read.
#[derive(Debug, thiserror::Error)]
enum NotSendable {
    /// Another copy of it was sent first.
    #[error("request body already sent")]
    AlreadySent,
    /// A later copy of it was made, for the attempt after the one this
    /// copy was made for.
    #[error("request body handed to a later attempt")]
    Superseded,
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // `ReplayBody` is `Unpin`: the streamed body is boxed.
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Buffered { data, trailers, .. } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            Kind::Once {
                shared,
                copy,
                sent,
                progress,
                ..
            } => {
                // Only this copy holds the body: no later one can be made.
                let alone = Arc::strong_count(shared) == 1;
                let mut shared = shared.lock();
                if sent.is_none() && !shared.whole {
                    return Poll::Ready(Some(Err(NotSendable::AlreadySent.into())));
                }
                if shared.live != *copy {
                    return Poll::Ready(Some(Err(NotSendable::Superseded.into())));
                }
                if shared.read != *copy {
                    // First read: the copy it superseded learns it now.
                    shared.read = *copy;
                    if let Some(waiting) = shared.waiting.take() {
                        waiting.wake();
                    }
                }
                let sent = sent.get_or_insert(0);
                if let Some(kept) = shared.kept.get(*sent) {
                    let frame = kept.frame();
                    *sent += 1;
                    progress.sending(false);
                    if *sent == shared.kept.len() && shared.kept_len > shared.limit {
                        // The frame that passed the limit is sent.
                        shared.lose_kept();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                if shared.ended {
                    progress.end();
                    return Poll::Ready(None);
                }
                let polled = shared.body.as_mut().poll_frame(cx);
                if polled.is_pending() {
                    progress.sending(true);
                    if !shared
                        .waiting
                        .as_ref()
                        .is_some_and(|w| w.will_wake(cx.waker()))
                    {
                        shared.waiting = Some(cx.waker().clone());
                    }
                }
                match ready!(polled) {
                    Some(Ok(frame)) => {
                        progress.sending(false);
                        let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                        if shared.keep(&frame, alone) {
                            *sent += 1;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => {
                        // What follows an error is no body to send again.
                        shared.lose_kept();
                        progress.end();
                        // The client's failure, as while buffering: not the
                        // backend's, whatever service sends the body.
                        Poll::Ready(Some(Err(InvalidRequest::with_source(
                            "the request's body failed while it was sent",
                            e,
                        )
                        .into())))
                    }
                    None => {
                        shared.ended = true;
                        progress.end();
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Buffered { data, trailers, .. } => data.is_none() && trailers.is_none(),
            Kind::Once {
                shared, copy, sent, ..
            } => sent.is_some_and(|sent| {
                let shared = shared.lock();
                shared.live == *copy
                    && sent >= shared.kept.len()
                    && (shared.ended || shared.body.is_end_stream())
            }),
        }
    }

    /// What is left to send: it shrinks as the body is read.
    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            // The data was sent: at most trailers are left.
            Kind::Buffered {
                data: None, len, ..
            } if *len > 0 => SizeHint::with_exact(0),
            // With trailers, no exact size: an HTTP/1 client would frame
            // the body by `Content-Length` and leave them out.
            Kind::Buffered {
                len,
                trailers: Some(_),
                ..
            } => {
                let mut hint = SizeHint::new();
                hint.set_lower(*len);
                hint
            }
            Kind::Buffered { len, .. } => SizeHint::with_exact(*len),
            Kind::Once {
                shared,
                copy,
                sent: Some(sent),
                hint,
                ..
            } => {
                let shared = shared.lock();
                if shared.live != *copy {
                    return *hint;
                }
                let kept = shared.kept.get(*sent..).unwrap_or_default();
                let unsent = kept.iter().map(|kept| kept.len() as u64).sum();
                let rest = if shared.ended {
                    SizeHint::with_exact(0)
                } else {
                    shared.body.size_hint()
                };
                let hint = plus(rest, unsent);
                // With trailers to send, no exact size (as for a buffered
                // body).
                if kept.iter().any(|k| matches!(k, Kept::Trailers(_))) {
                    plus(SizeHint::new(), hint.lower())
                } else {
                    hint
                }
            }
            // Not sent yet, or another copy is sending the body: the whole
            // body's hint either way. A copy that may not send it must not
            // look empty (a client would send an empty body without polling
            // it); polled, it fails.
            Kind::Once { hint, .. } => *hint,
        }
    }
}

/// `hint` with `n` more bytes.
fn plus(hint: SizeHint, n: u64) -> SizeHint {
    let mut sum = SizeHint::new();
    sum.set_lower(hint.lower().saturating_add(n));
    if let Some(upper) = hint.upper() {
        sum.set_upper(upper.saturating_add(n));
    }
    sum
}

/// A copy being sent that is dropped (a client stops polling a body once it
/// has its announced length, without asking for its end) has ended, unless
/// a later copy took its place.
impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Kind::Once {
            shared,
            copy,
            sent: Some(_),
            progress,
            ..
        } = &self.kind
        {
            // Under the lock: a new copy made meanwhile resets the progress
            // after, not before.
            let shared = shared.lock();
            if shared.live == *copy {
                progress.end();
            }
        }
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Buffered { len, .. } => {
                f.debug_struct("ReplayBody").field("buffered", len).finish()
            }
            Kind::Once { hint, .. } => f
                .debug_struct("ReplayBody")
                .field("once", hint)
                .field("consumed", &self.is_consumed())
                .finish(),
        }
    }
}

/// Reads a body up to a limit.
struct Buffering<B> {
    body: Option<Pin<Box<B>>>,
    hint: SizeHint,
    chunks: BytesMut,
    trailers: Option<HeaderMap>,
    limit: usize,
    /// The longest wait for the body's next frame.
    timeout: Option<Duration>,
    /// The wait for the body's next frame after which it is passed on as
    /// it is, to be sent once (zero: as soon as none is ready).
    idle: Option<Duration>,
    /// Set at the first wait for a frame (a body that is there already
    /// needs no timer); reset by the next wait after a frame came.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether a frame came since the timer was set.
    moved: bool,
    /// What `chunks` takes of the layer's [`Budget`], if it has one.
    taken: Option<Taken>,
}

impl<B> Buffering<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn new(body: B, limit: usize, timeout: Option<Duration>, idle: Option<Duration>) -> Self {
        let hint = body.size_hint();
        // A client's `Content-Length` is only a claim: reserve no more than
        // the limit, nor more than `RESERVE_AHEAD` ahead of the bytes
        // themselves (beyond it, the buffer grows as they come), so that a
        // head alone, which costs its client some 60 bytes, holds little
        // memory while its body does not come (thousands of such requests
        // would each hold the whole default limit otherwise).
        let reserve = usize::try_from(hint.lower())
            .unwrap_or(usize::MAX)
            .min(limit)
            .min(RESERVE_AHEAD);
        Buffering {
            body: Some(Box::pin(body)),
            hint,
            chunks: BytesMut::with_capacity(reserve),
            trailers: None,
            limit,
            timeout,
            idle,
            timer: None,
            moved: false,
            taken: None,
        }
    }

    /// Holds what it reads within `budget`.
    fn within(mut self, budget: Option<&Arc<Budget>>) -> Self {
        self.taken = budget.map(|budget| Taken {
            budget: budget.clone(),
            bytes: 0,
        });
        self
    }

    /// The body's next frame, its end, or that it stopped coming for the
    /// `idle` wait; a failure (the client's, as the body is the client's)
    /// when it fails or stops coming for longer than the timeout.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Next<B::Data>, BoxError>> {
        let Some(body) = self.body.as_mut() else {
            return Poll::Ready(Err(NotSendable::AlreadySent.into()));
        };
        if body.is_end_stream() {
            return Poll::Ready(Ok(Next::End));
        }
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.moved = true;
                Poll::Ready(Ok(Next::Frame(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(InvalidRequest::with_source(
                "the request's body failed while it was read",
                e,
            )
            .into())),
            Poll::Ready(None) => Poll::Ready(Ok(Next::End)),
            Poll::Pending => {
                // The idle wait applies when it is the shorter one.
                let idle = self
                    .idle
                    .filter(|idle| self.timeout.is_none_or(|timeout| *idle <= timeout));
                if idle == Some(Duration::ZERO) {
                    return Poll::Ready(Ok(Next::Idle));
                }
                let Some(wait) = idle.or(self.timeout) else {
                    return Poll::Pending;
                };
                if std::mem::take(&mut self.moved) || self.timer.is_none() {
                    set_timer(&mut self.timer, Some(later(Instant::now(), wait)));
                }
                let timer = self.timer.as_mut().expect("armed above");
                ready!(timer.as_mut().poll(cx));
                if idle.is_some() {
                    return Poll::Ready(Ok(Next::Idle));
                }
                Poll::Ready(Err(InvalidRequest::client_too_slow(format!(
                    "no more of the request's body for {wait:?}"
                ))
                .into()))
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<ReplayBody<B>, BoxError>> {
        loop {
            match ready!(self.poll_next(cx))? {
                Next::End => return Poll::Ready(Ok(self.finish())),
                // Passed on as it is: the client waits for the backend
                // before it sends more (a stream), or is slow.
                // (Trailers are the body's last frame.)
                Next::Idle if self.trailers.is_some() => return Poll::Ready(Ok(self.finish())),
                Next::Idle => return Poll::Ready(Ok(self.once(Bytes::new(), self.limit))),
                Next::Frame(frame) => match frame.into_data() {
                    Ok(mut data) => {
                        let len = data.remaining();
                        if self.chunks.len().saturating_add(len) > self.limit {
                            // Past the limit: the frame is kept as it came
                            // (`Bytes` are not copied), to be sent after
                            // what was read before it.
                            let held = data.copy_to_bytes(len);
                            return Poll::Ready(Ok(self.once(held, self.limit)));
                        }
                        if !Taken::more(&mut self.taken, len) {
                            // Past the layer's budget: passed on as if past
                            // the limit of what was read, keeping nothing
                            // more once the frame is sent.
                            let held = data.copy_to_bytes(len);
                            let limit = self.chunks.len();
                            return Poll::Ready(Ok(self.once(held, limit)));
                        }
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.chunks.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            match &mut self.trailers {
                                Some(existing) => existing.extend(trailers),
                                None => self.trailers = Some(trailers),
                            }
                        }
                    }
                },
            }
        }
    }

    /// The body passed on: what was read, the frame `held` that would
    /// have passed the limit, then the rest of the body, of which backends'
    /// reads are kept up to `limit` bytes in all.
    fn once(&mut self, held: Bytes, limit: usize) -> ReplayBody<B> {
        let body = self.body.take().expect("body present");
        let prefix = std::mem::take(&mut self.chunks).freeze();
        let kept: Vec<Kept> = [prefix, held]
            .into_iter()
            .filter(|piece| !piece.is_empty())
            .map(Kept::Data)
            .collect();
        let shared = Shared {
            kept_len: kept.iter().map(Kept::len).sum(),
            kept,
            limit,
            whole: true,
            body,
            ended: false,
            live: 0,
            made: 0,
            before: 0,
            read: 0,
            held: self.taken.take(),
            waiting: None,
        };
        ReplayBody {
            kind: Kind::Once {
                shared: Arc::new(Mutex::new(shared)),
                copy: 0,
                hint: self.hint,
                sent: None,
                progress: SendProgress::default(),
            },
        }
    }

    fn finish(&mut self) -> ReplayBody<B> {
        self.body = None;
        let data = std::mem::take(&mut self.chunks).freeze();
        let len = data.len() as u64;
        ReplayBody {
            kind: Kind::Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers: self.trailers.take(),
                len,
                taken: self.taken.take().map(Arc::new),
            },
        }
    }
}

/// What [`Buffering::poll_next`] found.
enum Next<D> {
    Frame(Frame<D>),
    End,
    /// No frame came for the `idle` wait.
    Idle,
}

/// Wraps request bodies into [`ReplayBody`] so that [`Failover`](super::Failover)
/// can retry requests whose body is not `Clone`.
///
/// Bodies up to the limit (default [`DEFAULT_BUFFER_LIMIT`], 64 KiB) are
/// read into memory before the inner service is called, as nginx's
/// `proxy_request_buffering` does; larger bodies are passed on, and can be
/// sent again only until a backend reads past the limit. A client that
/// stops sending the body while it is read fails its request after the
/// [`read_timeout`](Self::read_timeout).
///
/// A stream, whose client waits for the backend's answer before it sends
/// more (a gRPC bidirectional or client-streaming call, say), is passed on
/// as soon as it pauses, with what was read so far: a gRPC request (a
/// `content-type` of `application/grpc…`, not gRPC-Web's) as soon as no
/// part of it is ready, any other after
/// [`stream_when_idle`](Self::stream_when_idle), if set. What backends read
/// of it is held up to the limit, as for a body past the limit.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
/// use tower_ha::failover::{BufferBodyLayer, ReplayBody};
///
/// let svc = ServiceBuilder::new()
///     .layer(BufferBodyLayer::new())
///     .service(service_fn(|req: http::Request<ReplayBody<_>>| async move {
///         let buffered = req.body().is_buffered();
///         let bytes = req.into_body().collect().await?.to_bytes();
///         Ok::<_, tower_ha::BoxError>(http::Response::new((buffered, bytes)))
///     }));
/// // A body that is not `Clone`.
/// let body = Full::new(Bytes::from_static(b"hello")).boxed();
/// let response = svc.oneshot(http::Request::new(body)).await.unwrap();
/// assert_eq!(response.body(), &(true, Bytes::from_static(b"hello")));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct BufferBodyLayer {
    limit: usize,
    timeout: Option<Duration>,
    idle: Option<Duration>,
    budget: Option<Arc<Budget>>,
}

impl Default for BufferBodyLayer {
    fn default() -> Self {
        BufferBodyLayer::new()
    }
}

impl BufferBodyLayer {
    /// Buffers bodies up to 64 KiB, waiting at most 60 s for each part.
    pub fn new() -> Self {
        BufferBodyLayer {
            limit: DEFAULT_BUFFER_LIMIT,
            timeout: Some(DEFAULT_BODY_READ_TIMEOUT),
            idle: None,
            budget: None,
        }
    }

    /// Buffers bodies up to `limit` bytes.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Gives up on a body being buffered when nothing more of it comes for
    /// `timeout` (default [`DEFAULT_BODY_READ_TIMEOUT`], 60 s, as nginx's
    /// `client_body_timeout`: the time between two reads, not for the
    /// whole body; `None`, or zero, waits without limit). Without it, a
    /// client that stops sending holds its request, and its connection,
    /// until it goes away.
    ///
    /// The request then fails with an [`InvalidRequest`] that has an I/O
    /// error of
    /// kind `TimedOut` among its sources, which
    /// [`gateway_status`](crate::error::gateway_status) answers with `408
    /// Request Timeout`; no backend was called. (A body that fails while it
    /// is read, or past the limit while it is sent, is an `InvalidRequest`
    /// too: `400 Bad Request`, and no failure of the backend.) A body past
    /// the limit is streamed to its backend and timed by the backend
    /// client instead (`HttpClient::read_timeout`, feature `hyper-client`).
    #[must_use]
    pub fn read_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout.filter(|t| !t.is_zero());
        self
    }

    /// Passes a body on, with what was read of it, when no more of it
    /// comes for `idle` (zero: as soon as no part is ready), instead of
    /// waiting for its end (default `None`; shorter than the
    /// [`read_timeout`](Self::read_timeout) or as long, to take effect).
    /// What backends read of the body is then held up to the limit, and
    /// the request can go to another backend until one reads past it (if
    /// the failover layer's idempotency rule lets it: a gRPC call is a
    /// `POST`).
    ///
    /// The failover layer's per-try timeout waits while the backend waits
    /// for more of such a body, as for any body being sent: a backend that
    /// stalls on a stream is then bounded by the backend client's read
    /// timeout (`HttpClient::read_timeout`) and the failover deadline.
    ///
    /// This is for streams, whose client sends more only once the backend
    /// answered: held back, such a request would never reach a backend.
    /// gRPC requests are passed on this way at once whatever the setting.
    #[must_use]
    pub fn stream_when_idle(mut self, idle: Option<Duration>) -> Self {
        self.idle = idle;
        self
    }

    /// Holds at most `total` bytes of request bodies at once, across the
    /// requests of this layer, its clones and the services they build
    /// (default: no bound but each body's limit): what is read of bodies
    /// being buffered, and what is kept of bodies passed on. A body that
    /// would take the total past it is passed on as it comes, with what was
    /// read of it, and nothing more of it is kept: it can be sent again
    /// only until a backend reads on, as one past the limit. This bounds
    /// what many uploads at once take (an HTTP/2 connection carries up to
    /// its stream limit of them, each up to the limit), as Envoy's overload
    /// manager bounds its buffers.
    ///
    /// ```
    /// use tower_ha::failover::BufferBodyLayer;
    ///
    /// // 64 KiB per body, 256 MiB in all.
    /// let layer = BufferBodyLayer::new().max_held(256 << 20);
    /// # drop(layer);
    /// ```
    pub fn max_held(mut self, total: usize) -> Self {
        self.budget = Some(Arc::new(Budget {
            held: AtomicUsize::new(0),
            max: total,
        }));
        self
    }
}

/// Whether `headers` are a gRPC request's (`application/grpc`, or one of
/// its `+proto`, `+json`, … forms), whose body may be a stream; not
/// gRPC-Web's, whose clients send whole bodies.
fn is_grpc(headers: &HeaderMap) -> bool {
    grpc_subtype(headers).is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> BufferBody<S> {
        BufferBody {
            inner,
            limit: self.limit,
            timeout: self.timeout,
            idle: self.idle,
            budget: self.budget.clone(),
        }
    }
}

/// Reads request bodies into a [`ReplayBody`] before calling the inner
/// service; see [`BufferBodyLayer`].
///
/// `poll_ready` is the inner service's; the inner service is called once the
/// body is buffered, or passed on.
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    limit: usize,
    timeout: Option<Duration>,
    idle: Option<Duration>,
    budget: Option<Arc<Budget>>,
}

impl<S> BufferBody<S> {
    /// Wraps `inner` with [`BufferBodyLayer::new`]'s settings: bodies up to
    /// 64 KiB, at most 60 s for each part.
    pub fn new(inner: S) -> Self {
        BufferBodyLayer::new().layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, consuming `self`.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, R> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<ReplayBody<B>>, Response = R> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Response = R;
    type Error = BoxError;
    type Future = BufferFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.body().is_end_stream() {
            // Nothing to read (a GET, usually): the inner service, which
            // was polled ready, is called at once.
            let req = req.map(|_| ReplayBody::full(Bytes::new()));
            return BufferFuture {
                state: BufferState::Called {
                    future: self.inner.call(req),
                },
            };
        }
        // Keep the service that was polled ready; leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let (parts, body) = req.into_parts();
        let idle = if is_grpc(&parts.headers) {
            Some(Duration::ZERO)
        } else {
            self.idle
        };
        BufferFuture {
            state: BufferState::Buffering {
                service: Some(inner),
                parts: Some(parts),
                buffering: Buffering::new(body, self.limit, self.timeout, idle)
                    .within(self.budget.as_ref()),
            },
        }
    }
}

pin_project! {
    /// The response future of [`BufferBody`].
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct BufferFuture<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: BufferState<S, B>,
    }
}

pin_project! {
    #[project = BufferStateProj]
    enum BufferState<S, B>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        Buffering {
            service: Option<S>,
            parts: Option<http::request::Parts>,
            buffering: Buffering<B>,
        },
        Called {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, B, R> Future for BufferFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>, Response = R>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                BufferStateProj::Buffering {
                    service,
                    parts,
                    buffering,
                } => {
                    let body = ready!(buffering.poll(cx))?;
                    let (Some(mut service), Some(mut parts)) = (service.take(), parts.take())
                    else {
                        return Poll::Ready(Err(NotSendable::AlreadySent.into()));
                    };
                    if let Kind::Once { progress, .. } = &body.kind {
                        parts.extensions.insert(progress.clone());
                    }
                    let future = service.call(Request::from_parts(parts, body));
                    this.state.set(BufferState::Called { future });
                }
                BufferStateProj::Called { future } => {
                    return future.poll(cx).map_err(Into::into);
                }
            }
        }
    }
}

impl<S, B> fmt::Debug for BufferFuture<S, B>
where
    S: Service<Request<ReplayBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn stream(chunks: Vec<&'static [u8]>) -> impl Body<Data = Bytes, Error = BoxError> {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c))));
        StreamBody::new(futures_util_stream(frames))
    }

    // A stream from an iterator, without pulling in a stream crate.
    fn futures_util_stream<I: Iterator + Unpin>(iter: I) -> IterStream<I> {
        IterStream(iter)
    }

    struct IterStream<I>(I);

    impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
        type Item = I::Item;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<I::Item>> {
            Poll::Ready(self.0.next())
        }
    }

    /// A head that claims a body of `claimed` bytes, and sends none yet.
    struct Claims(u64);

    impl Body for Claims {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0)
        }
    }

    #[test]
    fn a_claimed_length_reserves_little_ahead_of_the_bytes() {
        for limit in [usize::MAX, 1 << 30, DEFAULT_BUFFER_LIMIT] {
            let buffering = Buffering::new(Claims(1 << 30), limit, None, None);
            assert!(
                buffering.chunks.capacity() <= RESERVE_AHEAD,
                "{} bytes reserved",
                buffering.chunks.capacity()
            );
        }
        // A small body gets all its room at once.
        assert!(
            Buffering::new(Claims(100), usize::MAX, None, None)
                .chunks
                .capacity()
                >= 100
        );
    }

    #[tokio::test]
    async fn buffered_trailers_leave_the_size_open_so_they_are_sent() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("1"));
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = ReplayBody::buffer(StreamBody::new(futures_util_stream(frames.into_iter())), 64)
            .await
            .unwrap();
        assert!(body.is_buffered());
        let hint = body.size_hint();
        assert_eq!((hint.lower(), hint.upper()), (5, None));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-sum"], "1");
        assert_eq!(collected.to_bytes(), "hello");
    }

    #[tokio::test]
    async fn small_bodies_are_buffered_and_replayed() {
        let body = ReplayBody::buffer(stream(vec![b"he", b"llo"]), 8)
            .await
            .unwrap();
        assert!(body.is_buffered());
        assert_eq!(body.size_hint().exact(), Some(5));
        let again = body.replay().unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let third = again.replay().unwrap();
        assert_eq!(again.collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(third.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn large_bodies_are_sent_once() {
        let body = ReplayBody::buffer(stream(vec![b"0123", b"4567", b"89"]), 6)
            .await
            .unwrap();
        assert!(!body.is_buffered());
        assert!(!body.is_consumed());
        let copy = body.replay().expect("not consumed yet");
        assert_eq!(copy.collect().await.unwrap().to_bytes(), "0123456789");
        assert!(body.is_consumed());
        assert!(body.replay().is_none());
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "request body already sent");
    }

    #[tokio::test]
    async fn only_the_latest_copy_of_a_body_sent_once_may_send_it() {
        let body = ReplayBody::buffer(stream(vec![b"0123", b"4567"]), 2)
            .await
            .unwrap();
        let early = body.replay().unwrap();
        let late = early.replay().unwrap();
        let err = early.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "request body handed to a later attempt");
        assert!(!body.is_consumed(), "the early copy took nothing");
        assert_eq!(late.collect().await.unwrap().to_bytes(), "01234567");
        assert!(body.is_consumed());
        assert!(body.replay().is_none());
    }

    /// The progress the failover layer times a streamed upload by: sent
    /// from the first frame taken, until the end is read or the copy being
    /// sent is dropped.
    #[tokio::test(start_paused = true)]
    async fn the_progress_of_a_body_sent_once() {
        let progress_of = |body: &ReplayBody<_>| match &body.kind {
            Kind::Once { progress, .. } => progress.clone(),
            Kind::Buffered { .. } => panic!("buffered"),
        };
        let body = ReplayBody::buffer(stream(vec![b"0123", b"4567"]), 2)
            .await
            .unwrap();
        let progress = progress_of(&body);
        assert_eq!(progress.get(), SendState::Unsent);
        let mut copy = body.replay().unwrap();
        copy.frame().await.unwrap().unwrap();
        let first = Instant::now();
        let sending = |last, starved| SendState::Sending { last, starved };
        assert_eq!(progress.get(), sending(first, false));
        tokio::time::advance(Duration::from_secs(1)).await;
        copy.frame().await.unwrap().unwrap();
        assert_eq!(
            progress.get(),
            sending(first + Duration::from_secs(1), false)
        );
        assert!(copy.frame().await.is_none());
        let end = Instant::now();
        assert_eq!(progress.get(), SendState::Sent(end));
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(copy);
        assert_eq!(progress.get(), SendState::Sent(end), "the first end holds");

        // Dropped part way: ended then.
        let body = ReplayBody::buffer(stream(vec![b"0123", b"4567"]), 2)
            .await
            .unwrap();
        let progress = progress_of(&body);
        let mut copy = body.replay().unwrap();
        copy.frame().await.unwrap().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(copy);
        assert_eq!(progress.get(), SendState::Sent(Instant::now()));
    }

    #[tokio::test]
    async fn a_frame_past_the_limit_is_not_copied() {
        let big = Bytes::from(vec![3u8; 4096]);
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"head"))),
            Ok(Frame::data(big.clone())),
            Ok(Frame::data(Bytes::from_static(b"tail"))),
        ];
        let body = ReplayBody::buffer(StreamBody::new(IterStream(frames.into_iter())), 64)
            .await
            .unwrap();
        assert!(!body.is_buffered());
        let mut copy = body.replay().unwrap();
        let mut sent = Vec::new();
        while let Some(frame) = copy.frame().await {
            sent.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0], "head");
        // The frame itself, not a copy of it.
        assert_eq!(sent[1].as_ptr(), big.as_ptr());
        assert_eq!(sent[1].len(), 4096);
        assert_eq!(sent[2], "tail");
    }

    /// A body of chunks that says exactly how much is left.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|c| c.len() as u64).sum())
        }
    }

    fn chunks(list: &[&'static str]) -> Chunks {
        Chunks(
            list.iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
        )
    }

    async fn left_after_each_frame(mut body: ReplayBody<Chunks>) -> Vec<Option<u64>> {
        let mut left = vec![body.size_hint().exact()];
        while let Some(frame) = body.frame().await {
            frame.unwrap();
            left.push(body.size_hint().exact());
        }
        left
    }

    #[tokio::test]
    async fn the_size_hint_is_what_is_left_to_send() {
        let buffered = ReplayBody::buffer(chunks(&["he", "llo"]), 8).await.unwrap();
        assert!(buffered.is_buffered());
        let copy = buffered.replay().unwrap();
        assert_eq!(left_after_each_frame(buffered).await, [Some(5), Some(0)]);
        assert_eq!(copy.size_hint().exact(), Some(5), "a copy is whole");

        let once = ReplayBody::buffer(chunks(&["0123", "4567", "89"]), 6)
            .await
            .unwrap();
        assert!(!once.is_buffered());
        let copy = once.replay().unwrap();
        assert_eq!(copy.size_hint().exact(), Some(10));
        let left = left_after_each_frame(copy).await;
        assert_eq!(left, [Some(10), Some(6), Some(2), Some(0)]);
        // Its other copy does not look like an empty body: sent, it fails.
        assert_eq!(once.size_hint().exact(), Some(10));
        assert!(once.collect().await.is_err());
    }

    #[tokio::test]
    async fn trailers_are_kept() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "1".parse().unwrap());
        let frames = vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let body = ReplayBody::buffer(StreamBody::new(IterStream(frames.into_iter())), 64)
            .await
            .unwrap();
        let collected = body.replay().unwrap().collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "ab");
    }

    #[tokio::test]
    async fn empty_and_full_bodies() {
        let empty = ReplayBody::buffer(Full::new(Bytes::new()), 4)
            .await
            .unwrap();
        assert!(empty.is_end_stream());
        let full = ReplayBody::<Full<Bytes>>::full(Bytes::from_static(b"x"));
        assert_eq!(full.collect().await.unwrap().to_bytes(), "x");
    }

    #[tokio::test]
    async fn buffer_body_passes_empty_and_small_bodies_on_replayable() {
        use tower::ServiceExt;
        let inner = tower::service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
            let body = req.into_body();
            assert!(body.is_buffered());
            let again = body.replay().expect("a buffered body replays");
            Ok::<_, BoxError>(again.collect().await?.to_bytes())
        });
        let svc = BufferBody::new(inner);
        for data in ["", "hello"] {
            let req = Request::new(Full::new(Bytes::from_static(data.as_bytes())));
            let echoed = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(echoed, data);
        }
    }

    /// A client's body: frames as the test sends them, the end when the
    /// sender is dropped.
    struct Uploading(tokio::sync::mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>);

    impl Body for Uploading {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx)
        }
    }

    type Sender = tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>;

    /// The next frame of `body`, which must be data.
    async fn data<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> Bytes
    where
        B::Error: std::fmt::Debug,
    {
        body.frame().await.unwrap().unwrap().into_data().unwrap()
    }

    /// A part of an upload, to send.
    fn part(bytes: &'static [u8]) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(bytes)))
    }

    /// Sends a request whose body is an upload through `layer` to a
    /// service that counts its calls and returns the body it got.
    fn upload(
        layer: BufferBodyLayer,
    ) -> (
        Sender,
        Arc<std::sync::atomic::AtomicUsize>,
        tokio::task::JoinHandle<Result<Bytes, BoxError>>,
    ) {
        upload_typed(layer, None)
    }

    /// [`upload`] with a `content-type`.
    fn upload_typed(
        layer: BufferBodyLayer,
        content_type: Option<&'static str>,
    ) -> (
        Sender,
        Arc<std::sync::atomic::AtomicUsize>,
        tokio::task::JoinHandle<Result<Bytes, BoxError>>,
    ) {
        use tower::ServiceExt;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = tower::service_fn(move |req: Request<ReplayBody<Uploading>>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, BoxError>(req.into_body().collect().await?.to_bytes()) }
        });
        let svc = layer.layer(inner);
        let mut req = Request::new(Uploading(rx));
        if let Some(content_type) = content_type {
            let value = http::HeaderValue::from_static(content_type);
            req.headers_mut().insert(http::header::CONTENT_TYPE, value);
        }
        let call = tokio::spawn(svc.oneshot(req));
        (tx, calls, call)
    }

    /// A gRPC stream whose client sends a message, then waits for the
    /// answer before it sends more: it reaches the service at once.
    #[tokio::test(start_paused = true)]
    async fn a_grpc_stream_is_passed_on_as_soon_as_it_pauses() {
        use std::sync::atomic::Ordering::SeqCst;
        let start = Instant::now();
        let (tx, calls, call) =
            upload_typed(BufferBodyLayer::new(), Some("application/grpc+proto"));
        tx.send(part(b"ping")).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(calls.load(SeqCst), 1, "the service was not called");
        tx.send(part(b" pong")).unwrap();
        drop(tx);
        assert_eq!(call.await.unwrap().unwrap(), "ping pong");
        assert_eq!(start.elapsed(), Duration::from_millis(1));
    }

    /// A body passed on as it paused keeps what backends read of it, up to
    /// the limit: a new copy sends that again, then reads on; a copy left
    /// behind neither sends it nor ends the new one's progress.
    #[tokio::test(start_paused = true)]
    async fn a_body_passed_on_can_be_sent_again_while_what_was_read_is_held() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(part(b"ping")).unwrap();
        let mut buffering = Buffering::new(Uploading(rx), 9, None, Some(Duration::ZERO));
        let body = std::future::poll_fn(|cx| buffering.poll(cx)).await.unwrap();
        assert!(!body.is_buffered());
        let progress = match &body.kind {
            Kind::Once { progress, .. } => progress.clone(),
            Kind::Buffered { .. } => panic!("buffered"),
        };
        let data = |frame: Option<Result<Frame<Bytes>, BoxError>>| {
            frame.unwrap().unwrap().into_data().unwrap()
        };
        let mut first = body.replay().unwrap();
        assert_eq!(data(first.frame().await), "ping");
        tx.send(part(b" pong")).unwrap();
        assert_eq!(data(first.frame().await), " pong");
        // The attempt failed: the next one sends it all again.
        let mut second = body.replay().expect("what was read is held");
        assert_eq!(progress.get(), SendState::Unsent);
        let err = first.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "request body handed to a later attempt");
        assert_eq!(data(second.frame().await), "ping");
        drop(first);
        assert!(matches!(progress.get(), SendState::Sending { .. }));
        assert_eq!(data(second.frame().await), " pong");
        // Past the limit of 9 bytes: sent on, and never again.
        tx.send(part(b"!")).unwrap();
        drop(tx);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "!");
        assert!(body.is_consumed());
        assert!(body.replay().is_none());
    }

    /// A body that sent `first`, then paused, as `BufferBodyLayer` passes
    /// a gRPC request on; and what sends the rest.
    async fn paused_after(first: &'static [u8]) -> (Sender, ReplayBody<Uploading>) {
        paused_within(first, 64, None).await
    }

    /// As [`paused_after`], with a limit of `limit` bytes, within `budget`.
    async fn paused_within(
        first: &'static [u8],
        limit: usize,
        budget: Option<&Arc<Budget>>,
    ) -> (Sender, ReplayBody<Uploading>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(part(first)).unwrap();
        let mut buffering =
            Buffering::new(Uploading(rx), limit, None, Some(Duration::ZERO)).within(budget);
        let body = std::future::poll_fn(|cx| buffering.poll(cx)).await.unwrap();
        (tx, body)
    }

    /// Trailers a backend read are held and sent again with the rest; while
    /// they are to come, a copy claims no exact size.
    #[tokio::test]
    async fn trailers_of_a_body_passed_on_are_sent_again() {
        let (tx, body) = paused_after(b"msg").await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("7"));
        tx.send(Ok(Frame::trailers(trailers))).unwrap();
        drop(tx);
        let first = body.replay().unwrap().collect().await.unwrap();
        assert_eq!(first.trailers().unwrap()["x-checksum"], "7");
        let mut second = body.replay().expect("all of it is held");
        assert_eq!(data(&mut second).await, "msg");
        assert_eq!(second.size_hint().exact(), None, "trailers are to come");
        let rest = second.collect().await.unwrap();
        assert_eq!(rest.trailers().unwrap()["x-checksum"], "7");
    }

    /// A frame read from a body passed on is kept as a copy of its bytes,
    /// not as a slice of the buffer it was read into (a connection's read
    /// buffer, which would stay allocated, whole, as long as the slice):
    /// the limit bounds the memory kept, not only the bytes.
    #[tokio::test]
    async fn a_kept_frame_holds_no_buffer_it_came_in() {
        let (tx, body) = paused_after(b"msg").await;
        let buffer = Bytes::from(vec![b'x'; 8192]);
        tx.send(Ok(Frame::data(buffer.slice(..5)))).unwrap();
        let mut copy = body.replay().unwrap();
        for want in ["msg", "xxxxx"] {
            let frame = copy.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), want);
        }
        let Kind::Once { shared, .. } = &body.kind else {
            panic!("passed on, not held");
        };
        let shared = shared.lock();
        let [_, Kept::Data(kept)] = &shared.kept[..] else {
            panic!("not kept");
        };
        assert_eq!(kept, "xxxxx");
        let range = buffer.as_ptr_range();
        assert!(
            !range.contains(&kept.as_ptr()),
            "a slice of the read buffer"
        );
    }

    /// A body that failed while it was sent cannot be sent again: what
    /// would follow is not the body.
    #[tokio::test]
    async fn a_body_that_failed_while_it_was_sent_is_not_sent_again() {
        let (tx, body) = paused_after(b"part").await;
        let mut copy = body.replay().unwrap();
        assert_eq!(data(&mut copy).await, "part");
        // Asking does not take the body from the copy being sent.
        assert!(body.is_replayable());
        tx.send(Err("client gone".into())).unwrap();
        drop(tx);
        let err = copy.frame().await.unwrap().unwrap_err();
        assert_eq!(
            crate::error::gateway_status(&*err),
            http::StatusCode::BAD_REQUEST
        );
        assert!(!body.is_replayable());
        assert!(body.replay().is_none());
    }

    /// A copy waiting for the client's next frame learns at once that a
    /// later copy took its place (was first read from), rather than
    /// waiting on.
    #[tokio::test]
    async fn a_waiting_copy_is_woken_when_it_is_superseded() {
        struct Woken(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Woken {
            fn wake(self: Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let (_tx, body) = paused_after(b"part").await;
        let mut copy = body.replay().unwrap();
        assert_eq!(data(&mut copy).await, "part");
        let woken = Arc::new(Woken(false.into()));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut copy).poll_frame(&mut cx).is_pending());
        let mut next = body.replay().unwrap();
        assert!(!woken.0.load(std::sync::atomic::Ordering::SeqCst));
        // Read from: it sends what is kept first.
        assert_eq!(data(&mut next).await, "part");
        assert!(woken.0.load(std::sync::atomic::Ordering::SeqCst));
        let Poll::Ready(Some(Err(err))) = Pin::new(&mut copy).poll_frame(&mut cx) else {
            panic!("the superseded copy went on");
        };
        assert_eq!(err.to_string(), "request body handed to a later attempt");
    }

    /// With a budget, bodies are buffered while what they hold fits in it
    /// (given back when the last copy of a body is dropped); one that does
    /// not fit is passed on, and keeps nothing of what backends read past
    /// what came.
    #[tokio::test]
    async fn bodies_are_held_within_the_layers_budget() {
        use tower::ServiceExt;
        let layer = BufferBodyLayer::new().max_held(100);
        let held = || layer.budget.as_ref().unwrap().held.load(Ordering::SeqCst);
        let echo = tower::service_fn(|req: Request<ReplayBody<_>>| async move {
            Ok::<_, BoxError>(req.into_body())
        });
        let send = |len: usize| {
            let body = Full::new(Bytes::from(vec![b'x'; len])).boxed();
            layer.layer(echo).oneshot(Request::new(body))
        };
        let first = send(80).await.unwrap();
        assert!(first.is_buffered());
        assert_eq!(held(), 80);
        // 80 + 40 > 100: passed on, holding nothing of the budget, and
        // sent again only until a backend has read its frame.
        let second = send(40).await.unwrap();
        assert!(!second.is_buffered());
        assert_eq!(held(), 80);
        assert!(second.is_replayable());
        let mut copy = second.replay().unwrap();
        assert_eq!(
            copy.frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap()
                .len(),
            40
        );
        assert!(!second.is_replayable());
        drop(copy);
        let copy = first.replay().unwrap();
        drop(first);
        assert_eq!(held(), 80, "a copy still holds it");
        drop(copy);
        assert_eq!(held(), 0);
        let third = send(40).await.unwrap();
        assert!(third.is_buffered());
        assert_eq!(held(), 40);
        drop((second, third));
        assert_eq!(held(), 0);

        // Passed on before its end (a pause): what backends read is kept
        // while it fits, and given back when it no longer can be sent
        // again.
        // (A limit far above: only the budget refuses.)
        let (tx, body) = paused_within(b"0123456789", 1000, layer.budget.as_ref()).await;
        assert_eq!(held(), 10);
        let mut copy = body.replay().unwrap();
        assert_eq!(data(&mut copy).await, "0123456789");
        tx.send(Ok(Frame::data(Bytes::from(vec![b'y'; 50]))))
            .unwrap();
        copy.frame().await.unwrap().unwrap();
        assert_eq!(held(), 60);
        assert!(body.is_replayable());
        // 60 + 50 > 100: nothing more is kept, and what was is given back.
        tx.send(Ok(Frame::data(Bytes::from(vec![b'z'; 50]))))
            .unwrap();
        copy.frame().await.unwrap().unwrap();
        assert_eq!(held(), 0);
        assert!(!body.is_replayable());
    }

    /// A copy made for a retry that did not happen, never read from, gives
    /// the body back to the copy sent before it, which reads on; one that
    /// was read from keeps it.
    #[tokio::test]
    async fn a_copy_never_read_gives_the_body_back() {
        let (tx, body) = paused_after(b"part").await;
        let mut sent = body.replay().unwrap();
        assert_eq!(data(&mut sent).await, "part");
        // Two copies for retries that did not happen, each given back (the
        // failover gives one back as soon as it knows it unsent).
        drop(body.replay().unwrap());
        body.give_back();
        let unread = body.replay().unwrap();
        body.give_back();
        tx.send(part(b"more")).unwrap();
        assert_eq!(data(&mut sent).await, "more");
        drop(unread);

        let mut retry = body.replay().unwrap();
        let mut kept = Vec::new();
        for _ in 0..2 {
            kept.push(data(&mut retry).await);
        }
        assert_eq!(kept, ["part", "more"]);
        body.give_back();
        tx.send(part(b"end")).unwrap();
        let superseded = sent.frame().await.unwrap().unwrap_err();
        assert_eq!(
            superseded.to_string(),
            "request body handed to a later attempt"
        );
        assert_eq!(data(&mut retry).await, "end");
    }

    /// Trailers read before the body paused end it: it is held whole,
    /// trailers included.
    #[tokio::test]
    async fn trailers_before_a_pause_are_kept() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        // Sent, but the body's end not yet.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(part(b"msg")).unwrap();
        tx.send(Ok(Frame::trailers(trailers))).unwrap();
        let mut buffering = Buffering::new(Uploading(rx), 64, None, Some(Duration::ZERO));
        let body = std::future::poll_fn(|cx| buffering.poll(cx)).await.unwrap();
        assert!(body.is_buffered());
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "msg");
    }

    /// gRPC-Web has no streams from the client: its bodies are held as
    /// any other.
    #[tokio::test(start_paused = true)]
    async fn a_grpc_web_body_is_held_to_its_end() {
        use std::sync::atomic::Ordering::SeqCst;
        let layer = BufferBodyLayer::new();
        let (tx, calls, call) = upload_typed(layer, Some("application/grpc-web+proto"));
        tx.send(part(b"whole")).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(calls.load(SeqCst), 0, "passed on before its end");
        drop(tx);
        assert_eq!(call.await.unwrap().unwrap(), "whole");
    }

    /// A gRPC request whose body is all there is held, and can be sent
    /// again.
    #[tokio::test]
    async fn a_grpc_body_that_is_all_there_is_buffered() {
        use tower::ServiceExt;
        let inner = tower::service_fn(|req: Request<ReplayBody<_>>| async move {
            Ok::<_, BoxError>(req.body().is_buffered())
        });
        let req = Request::post("/pkg.Service/Method")
            .header(http::header::CONTENT_TYPE, "Application/GRPC")
            .body(stream(vec![b"one", b"two"]))
            .unwrap();
        assert!(BufferBodyLayer::new()
            .layer(inner)
            .oneshot(req)
            .await
            .unwrap());
    }

    /// Any other body is passed on once it pauses for `stream_when_idle`.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_pauses_is_passed_on_after_stream_when_idle() {
        use std::sync::atomic::Ordering::SeqCst;
        let layer = BufferBodyLayer::new().stream_when_idle(Some(Duration::from_secs(2)));
        let (tx, calls, call) = upload(layer);
        tx.send(part(b"part")).unwrap();
        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert_eq!(calls.load(SeqCst), 0, "passed on before the idle wait");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(calls.load(SeqCst), 1, "not passed on after the idle wait");
        tx.send(part(b" rest")).unwrap();
        drop(tx);
        assert_eq!(call.await.unwrap().unwrap(), "part rest");
    }

    /// An idle wait longer than the read timeout leaves the timeout to
    /// end a body that stopped coming.
    #[tokio::test(start_paused = true)]
    async fn the_read_timeout_wins_over_a_longer_idle_wait() {
        let layer = BufferBodyLayer::new()
            .read_timeout(Some(Duration::from_secs(5)))
            .stream_when_idle(Some(Duration::from_secs(10)));
        let (tx, calls, call) = upload(layer);
        tx.send(part(b"part")).unwrap();
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(
            crate::error::gateway_status(&*error),
            http::StatusCode::REQUEST_TIMEOUT,
            "{error}"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_fails_at_the_read_timeout() {
        use std::sync::atomic::Ordering::SeqCst;
        let start = Instant::now();
        let (tx, calls, call) = upload(BufferBodyLayer::new());
        // Each part within the timeout of the one before: the body may
        // take longer than the timeout as a whole.
        for _ in 0..3 {
            tx.send(part(b"part")).unwrap();
            tokio::time::sleep(Duration::from_secs(59)).await;
            assert!(!call.is_finished());
        }
        // Then nothing more, with the client still connected.
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(3 * 59 + 1));
        assert_eq!(
            crate::error::gateway_status(&*error),
            http::StatusCode::REQUEST_TIMEOUT,
            "{error}"
        );
        assert_eq!(calls.load(SeqCst), 0, "no backend was called");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_read_timeout_a_body_is_awaited() {
        let layer = BufferBodyLayer::new().read_timeout(Some(Duration::ZERO));
        let (tx, calls, call) = upload(layer);
        tx.send(part(b"slow")).unwrap();
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        assert!(!call.is_finished());
        tx.send(part(b" body")).unwrap();
        drop(tx);
        assert_eq!(call.await.unwrap().unwrap(), "slow body");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A timeout too long to add to a clock reading is no limit in
    /// practice, not a panic, however often the body stalls.
    #[tokio::test(start_paused = true)]
    async fn the_longest_read_timeout_is_rearmed_without_overflow() {
        let layer = BufferBodyLayer::new().read_timeout(Some(Duration::MAX));
        let (tx, _, call) = upload(layer);
        for _ in 0..2 {
            tx.send(part(b"part")).unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            assert!(!call.is_finished());
        }
        drop(tx);
        assert_eq!(call.await.unwrap().unwrap(), "partpart");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_fails_while_it_is_read_is_the_clients_failure() {
        let (tx, calls, call) = upload(BufferBodyLayer::new());
        tx.send(part(b"part")).unwrap();
        tx.send(Err("connection reset".into())).unwrap();
        let error = call.await.unwrap().unwrap_err();
        assert!(
            crate::error::find::<InvalidRequest>(&*error).is_some(),
            "{error}"
        );
        assert_eq!(
            crate::error::gateway_status(&*error),
            http::StatusCode::BAD_REQUEST
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_past_the_limit_that_fails_while_it_is_sent_is_the_clients_failure() {
        let (tx, calls, call) = upload(BufferBodyLayer::new().limit(4));
        tx.send(part(b"past the limit")).unwrap();
        tx.send(Err("connection reset".into())).unwrap();
        let error = call.await.unwrap().unwrap_err();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            crate::error::find::<InvalidRequest>(&*error).is_some(),
            "{error}"
        );
        use crate::classify::{Classifier, DefaultClassifier, Outcome};
        assert!(!DefaultClassifier::new().is_failure(&Outcome::Error(&*error)));
    }
}
