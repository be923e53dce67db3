//! The read timeout: how long the client waits for a backend to send
//! something, for a response head (counted once the request has been sent,
//! its body included) and between the frames of a response body (see
//! [`ResponseBody`](super::ResponseBody)).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::http::Request;
use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::error::{BoxError, InvalidRequest};
use crate::time::{from_nanos, later, to_nanos};

/// How the upload of a request's body goes; `None` for a request with no
/// body to send.
pub(super) type Sent = Option<Arc<Progress>>;

/// The progress of an upload, as the wait for the response head sees it.
#[derive(Default)]
pub(super) struct Progress {
    /// When the body was all sent (taken by the connection, or dropped by
    /// it).
    ended: OnceLock<Instant>,
    /// Frames the connection has taken so far.
    frames: AtomicU64,
    /// The body failed while it was sent (a client gone mid-upload).
    failed: AtomicBool,
    /// The connection's last look at the body found no frame ready: it
    /// waits for the request's own body (a client slow to send it), not
    /// for the backend.
    starved: AtomicBool,
    /// The request came over HTTP/1, whose client sends its body before it
    /// waits for the response, whatever the backend speaks (see [`Head`]).
    #[cfg_attr(not(feature = "http2"), allow(dead_code))]
    from_http1: bool,
}

/// Whether the request whose upload `sent` follows came over HTTP/1.
#[cfg(feature = "http2")]
pub(super) fn from_http1(sent: &Sent) -> bool {
    sent.as_ref().is_some_and(|p| p.from_http1)
}

/// When a connection last wrote to its backend, noted by its stream: an
/// upload that hyper took whole (a body in one large frame) still moves
/// while its bytes go out, as fast as the backend reads them. And whether
/// the connection now carries a tunnel.
pub(super) struct Written {
    /// When the connection was opened; the last write is counted from it.
    opened: Instant,
    /// Nanoseconds from `opened` to the end of the last write (0: none yet).
    last: AtomicU64,
    /// The connection switched protocols, and carries a tunnel.
    tunnel: AtomicBool,
}

impl Written {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Written {
            opened: Instant::now(),
            last: AtomicU64::new(0),
            tunnel: AtomicBool::new(false),
        })
    }

    /// Notes that the connection carries a tunnel from now on.
    pub(super) fn switched(&self) {
        self.tunnel.store(true, Ordering::Relaxed);
    }

    /// Whether the connection carries a tunnel.
    #[inline]
    pub(super) fn tunnel(&self) -> bool {
        self.tunnel.load(Ordering::Relaxed)
    }

    /// Notes a write that took some bytes.
    #[inline]
    pub(super) fn wrote(&self) {
        let nanos = to_nanos(self.opened, Instant::now());
        self.last.store(nanos, Ordering::Relaxed);
    }

    /// When the connection last wrote, if it has.
    fn last(&self) -> Option<Instant> {
        from_nanos(self.opened, self.last.load(Ordering::Relaxed))
    }
}

/// Whether the request's body failed while it was sent.
pub(super) fn body_failed(sent: &Sent) -> bool {
    sent.as_ref()
        .is_some_and(|p| p.failed.load(Ordering::Relaxed))
}

/// A request body that notes when the connection is done with it, so that
/// the wait for the response head counts from there: a backend that reads
/// a long upload is not silent.
///
/// A connection that gives up a body in the middle of sending it (its
/// backend answered before reading it all and closed, or failed, or the
/// attempt was abandoned) hands the rest to [`discard`], when the upload
/// has a discard timeout (see `HttpClient::discard_timeout`), which reads
/// it and drops it, as nginx discards a body it will not use: a hyper
/// server in front then keeps reading the client's upload, so the client
/// is not reset before it has read its answer, and the connection can
/// serve its next request. A body no connection has started to read is
/// dropped as it is (a retry may still send it).
pub(super) struct Upload<B> {
    /// `None` once the body has ended, or failed.
    inner: Option<B>,
    sent: Sent,
    /// How long the rest of the body is read if it is given up (see
    /// `HttpClient::discard_timeout`); `None`: it is dropped unread.
    rest: Option<Duration>,
    /// [`discard`], for `B`.
    discard: fn(B, Duration),
}

impl<B> Upload<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    /// `req` with its body wrapped, and what says when that body was sent;
    /// the rest of the body is read for up to `rest` if a connection gives
    /// it up (see [`Upload`]). `from_http1`: the request came over HTTP/1.
    // Inlined, so that the request's head is not copied out and back on
    // the proxy's path.
    #[inline(always)]
    pub(super) fn wrap(
        req: Request<B>,
        rest: Option<Duration>,
        from_http1: bool,
    ) -> (Request<Upload<B>>, Sent) {
        let (parts, inner) = req.into_parts();
        // A body at its end (a GET's, and any empty one) is sent with the
        // head: nothing to watch, nothing to allocate.
        let sent = (!inner.is_end_stream() && inner.size_hint().exact() != Some(0)).then(|| {
            Arc::new(Progress {
                from_http1,
                ..Progress::default()
            })
        });
        let body = Upload {
            inner: Some(inner),
            sent: sent.clone(),
            rest,
            discard: discard::<B>,
        };
        (Request::from_parts(parts, body), sent)
    }
}

/// How long [`discard`] waits for a body's next frame (nginx's
/// `lingering_timeout`), and how much of the body it reads at most, each
/// frame counted as [`DISCARD_FRAME`] bytes at least: this bounds the work
/// spent on a body made in memory rather than sent by a client.
const DISCARD_IDLE: Duration = Duration::from_secs(5);
const DISCARD_LIMIT: usize = 64 << 20;
const DISCARD_FRAME: usize = 1024;

/// Reads the rest of `body` and drops it, on a task of its own, for at
/// most `timeout`, [`DISCARD_IDLE`] between frames and [`DISCARD_LIMIT`]
/// bytes (see [`Upload`]). A body at its end, or outside a tokio runtime,
/// is dropped as it is.
fn discard<B>(mut body: B, timeout: Duration)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if body.is_end_stream() {
        return;
    }
    runtime.spawn(async move {
        let end = later(Instant::now(), timeout);
        let mut left = DISCARD_LIMIT;
        loop {
            // Checked here too: a body always ready never lets the
            // timeout's timer be polled.
            let now = Instant::now();
            if now >= end {
                return;
            }
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
            let until = later(now, DISCARD_IDLE).min(end);
            let Ok(Some(Ok(frame))) = tokio::time::timeout_at(until, frame).await else {
                return;
            };
            let len = frame
                .data_ref()
                .map_or(0, Buf::remaining)
                .max(DISCARD_FRAME);
            match left.checked_sub(len) {
                Some(rest) => left = rest,
                None => return,
            }
            // Lets the runtime's other tasks run between frames always ready.
            tokio::task::consume_budget().await;
        }
    });
}

impl<B: Body + Unpin> Body for Upload<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = frame {
            self.inner = None;
        }
        if let Some(sent) = &self.sent {
            sent.starved.store(frame.is_pending(), Ordering::Relaxed);
            if let Poll::Ready(Some(frame)) = &frame {
                sent.frames.fetch_add(1, Ordering::Relaxed);
                if frame.is_err() {
                    sent.failed.store(true, Ordering::Relaxed);
                }
            }
        }
        frame.map(|frame| frame.map(|frame| frame.map(super::clean_trailers)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(B::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), B::size_hint)
    }
}

impl<B> Drop for Upload<B> {
    /// hyper drops a request's body once it has sent its last frame (or
    /// given up on it).
    fn drop(&mut self) {
        if let Some(sent) = &self.sent {
            let _ = sent.ended.set(Instant::now());
            let started =
                sent.frames.load(Ordering::Relaxed) > 0 || sent.starved.load(Ordering::Relaxed);
            if let (Some(timeout), true) = (self.rest, started) {
                if let Some(rest) = self.inner.take() {
                    (self.discard)(rest, timeout);
                }
            }
        }
    }
}

/// The timer of a connection's waits for its backend, made at the first
/// wait. It goes with its HTTP/1.1 connection from request to request, and
/// from the wait for a response head to the waits for its body's frames;
/// its deadline is moved only when it passes before the end of the wait
/// at hand (which started after it was set). A wait on a kept-alive
/// connection then costs a reading of the clock and the registration of
/// its task with the timer, not a timer of its own.
pub(super) type Timer = Option<Pin<Box<Sleep>>>;

/// When the wait at hand started: `since`, or now if it is only starting
/// (then on `timer`, made now and ending `timeout` from now if the
/// connection has none yet).
pub(super) fn start(timer: &mut Timer, since: &mut Option<Instant>, timeout: Duration) -> Instant {
    *since.get_or_insert_with(|| {
        let now = Instant::now();
        if timer.is_none() {
            *timer = Some(Box::pin(tokio::time::sleep_until(later(now, timeout))));
        }
        now
    })
}

/// Ready once `timeout` has passed `since` the start of a wait on `timer`
/// (see [`start`]).
pub(super) fn passed(
    timer: &mut Timer,
    since: Instant,
    timeout: Duration,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let timer = timer.as_mut().expect("a wait started");
    let end = later(since, timeout);
    loop {
        ready!(timer.as_mut().poll(cx));
        if timer.deadline() >= end {
            return Poll::Ready(());
        }
        // Set for an earlier wait.
        timer.as_mut().reset(end);
    }
}

pin_project! {
    /// A response head awaited for at most the read timeout after the
    /// request was sent: the timer starts at the first wait (a response
    /// already there costs none), and is pushed back to a read timeout
    /// after the end of the request's body when that comes later, or
    /// after now while the body's upload still moves (a frame taken since
    /// the last look), or, over HTTP/1.1, after the connection's last
    /// write once the upload has begun, when that comes later (hyper takes
    /// a body's frame whole, and writes it out as the backend reads it;
    /// over HTTP/2, where other streams and PINGs share the connection's
    /// writes, an upload ends when hyper has taken it). An upload that
    /// stands still for the read timeout because the backend reads none
    /// of it times out like a silent
    /// backend; over HTTP/1, one that stands still because the request's
    /// body has no more to give (a client slow to send it) fails as the
    /// request's fault, an `InvalidRequest` (answered 408), which counts
    /// against no backend. A client that speaks HTTP/2 may wait for the
    /// response before it sends more (a bidirectional gRPC stream): over
    /// an HTTP/2 backend, the backend's silence is then the backend's. One
    /// that speaks HTTP/1 sends its body first, whatever the backend
    /// speaks.
    pub(super) struct Head<'a, F> {
        #[pin]
        response: F,
        timer: &'a mut Timer,
        // When the backend's silence started, once the response is waited for.
        since: Option<Instant>,
        // The upload's frames taken, at the last look.
        frames: u64,
        read_timeout: Option<Duration>,
        sent: &'a Sent,
        written: Option<&'a Written>,
        // Whether an upload waiting on its client is the client's fault:
        // over HTTP/1 (to the backend, or from the client) a request's
        // body comes before its response; over HTTP/2 both ways a client
        // may wait for the response to send more.
        client_paced: bool,
    }
}

/// Waits for `response`, a response head, for at most `read_timeout` (see
/// [`Head`]) on the connection's `timer`; `sent` says when the request's
/// body was sent, `written` when the connection last wrote; `client_paced`
/// for HTTP/1 to the backend or from the client (see [`Head`]).
pub(super) fn head<'a, F>(
    response: F,
    read_timeout: Option<Duration>,
    sent: &'a Sent,
    written: Option<&'a Written>,
    timer: &'a mut Timer,
    client_paced: bool,
) -> Head<'a, F> {
    Head {
        response,
        timer,
        since: None,
        frames: 0,
        read_timeout,
        sent,
        written,
        client_paced,
    }
}

/// Why a response head did not come: the request failed, or the read
/// timeout passed first (the backend's silence, or the request body's).
pub(super) enum Failed<E> {
    Sent(E),
    TimedOut(BoxError),
}

impl<F, T, E> Future for Head<'_, F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, Failed<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.response.poll(cx) {
            return Poll::Ready(response.map_err(Failed::Sent));
        }
        let Some(timeout) = *this.read_timeout else {
            return Poll::Pending;
        };
        let mut since = start(this.timer, this.since, timeout);
        loop {
            ready!(passed(this.timer, since, timeout, cx));
            // The connection wrote since the wait (re)started, after
            // hyper took some of the upload: the backend reads it.
            let written = *this.written;
            let wrote = |sent: &Progress| {
                let taken = sent.frames.load(Ordering::Relaxed) > 0;
                written?.last().filter(|&at| taken && at > since)
            };
            let resumed = match this.sent.as_deref() {
                None => None,
                Some(sent) => match sent.ended.get() {
                    Some(&at) => Some(at).filter(|&at| at > since).max(wrote(sent)),
                    // Still sending, and the upload moved: the backend is
                    // reading, not silent.
                    None => {
                        let frames = sent.frames.load(Ordering::Relaxed);
                        let moved = frames != *this.frames || wrote(sent).is_some();
                        *this.frames = frames;
                        if !moved && *this.client_paced && sent.starved.load(Ordering::Relaxed) {
                            let e = InvalidRequest::client_too_slow(format!(
                                "the request's body sent nothing more for the read timeout ({timeout:?})"
                            ));
                            return Poll::Ready(Err(Failed::TimedOut(e.into())));
                        }
                        moved.then(Instant::now)
                    }
                },
            };
            match resumed {
                Some(at) => {
                    since = at;
                    *this.since = Some(at);
                }
                None => {
                    let e = timed_out("the backend sent no response", timeout);
                    return Poll::Ready(Err(Failed::TimedOut(e.into())));
                }
            }
        }
    }
}

/// The error of a read timeout that passed: `what` happened for `timeout`.
pub(super) fn timed_out(what: &str, timeout: Duration) -> io::Error {
    timed_out_for(what, "read", timeout)
}

/// The error of the `which` timeout that passed: `what` happened for
/// `timeout`.
pub(super) fn timed_out_for(what: &str, which: &str, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{what} for the {which} timeout ({timeout:?})"),
    )
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use tokio::sync::mpsc;

    use super::*;

    /// A request body fed through a channel: its sender sees when the body
    /// is dropped, and, with room for one frame, how much of it was read.
    /// Its token is shared while it lives.
    struct Fed {
        rx: mpsc::Receiver<Bytes>,
        _token: Arc<()>,
    }

    impl Body for Fed {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.rx.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
        }
    }

    /// The discard timeout of the uploads here.
    const FOR: Duration = Duration::from_secs(30);

    /// An upload fed by the sender returned, with room for one frame, and
    /// the body's token; its rest is read for `rest` if it is given up.
    fn upload_for(rest: Option<Duration>) -> (Upload<Fed>, mpsc::Sender<Bytes>, Arc<()>) {
        let (tx, rx) = mpsc::channel(1);
        let token = Arc::new(());
        let fed = Fed {
            rx,
            _token: token.clone(),
        };
        let (req, _) = Upload::wrap(Request::new(fed), rest, true);
        (req.into_body(), tx, token)
    }

    fn upload() -> (Upload<Fed>, mpsc::Sender<Bytes>, Arc<()>) {
        upload_for(Some(FOR))
    }

    /// A body always ready, without end, of frames of `size` bytes; counts
    /// its polls.
    struct Endless {
        frame: Bytes,
        polled: Arc<AtomicUsize>,
        _token: Arc<()>,
    }

    impl Body for Endless {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.polled.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Some(Ok(Frame::data(self.frame.clone()))))
        }
    }

    /// An upload (see [`upload_for`]) whose connection took a first frame
    /// and then gave it up; its sender and token.
    async fn given_up(rest: Option<Duration>) -> (mpsc::Sender<Bytes>, Arc<()>) {
        let (mut body, tx, token) = upload_for(rest);
        tx.send(Bytes::from_static(b"first")).await.unwrap();
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert_eq!(frame.unwrap().unwrap().into_data().unwrap(), "first");
        drop(body);
        (tx, token)
    }

    /// A body no connection has started to read is dropped with its
    /// upload, unread: a retry may still send it.
    #[tokio::test(start_paused = true)]
    async fn a_body_never_read_is_not_discarded() {
        let (body, tx, token) = upload();
        tx.send(Bytes::from_static(b"kept")).await.unwrap();
        drop(body);
        assert!(tx.is_closed());
        assert_eq!(Arc::strong_count(&token), 1);
    }

    /// Without a discard timeout, a body given up is dropped unread.
    #[tokio::test(start_paused = true)]
    async fn a_body_given_up_without_a_discard_timeout_is_dropped() {
        let (tx, _) = given_up(None).await;
        assert!(tx.is_closed());
    }

    /// A body given up while the connection waited for its next frame
    /// (the client slow to send it) is read on too.
    #[tokio::test(start_paused = true)]
    async fn a_body_given_up_while_waiting_for_its_client_is_read_on() {
        let (mut body, tx, _) = upload();
        let waiting = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx)));
        assert!(waiting.await.is_pending());
        drop(body);
        for _ in 0..10 {
            tx.send(Bytes::from_static(b"late")).await.expect("read on");
        }
    }

    /// A body given up in the middle is read to its end, and dropped then.
    #[tokio::test(start_paused = true)]
    async fn the_rest_of_a_body_given_up_is_read_and_dropped() {
        let (tx, token) = given_up(Some(FOR)).await;
        for _ in 0..100 {
            // With room for one frame, each send waits for the last one
            // to have been read.
            tx.send(Bytes::from_static(b"rest")).await.expect("read on");
        }
        drop(tx);
        for _ in 0..10 {
            if Arc::strong_count(&token) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the body outlived its end");
    }

    /// A body that sends nothing for `DISCARD_IDLE` is dropped then.
    #[tokio::test(start_paused = true)]
    async fn a_body_given_up_that_stands_still_is_dropped_after_the_idle_limit() {
        let (tx, _) = given_up(Some(FOR)).await;
        let start = Instant::now();
        tokio::time::sleep(DISCARD_IDLE - Duration::from_millis(1)).await;
        assert!(!tx.is_closed());
        tx.closed().await;
        assert_eq!(start.elapsed(), DISCARD_IDLE);
    }

    /// A body always ready, without end, is read up to `DISCARD_LIMIT`,
    /// each frame counted as `DISCARD_FRAME` bytes at least (an endless
    /// run of empty frames ends too), and lets other tasks run meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_body_always_ready_is_read_up_to_the_limit_and_lets_others_run() {
        for size in [0, DISCARD_FRAME / 2, 16 * 1024] {
            let polled = Arc::new(AtomicUsize::new(0));
            let token = Arc::new(());
            let endless = Endless {
                frame: Bytes::from(vec![0; size]),
                polled: polled.clone(),
                _token: token.clone(),
            };
            let (req, _) = Upload::wrap(Request::new(endless), Some(FOR), true);
            let mut body = req.into_body();
            let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            assert!(first.is_some());
            drop(body);
            let mut ran_meanwhile = false;
            while Arc::strong_count(&token) > 1 {
                ran_meanwhile |= polled.load(Ordering::Relaxed) > 1;
                tokio::task::yield_now().await;
            }
            assert!(ran_meanwhile, "frames of {size} bytes");
            // The first frame, those within the limit, and the one past it.
            let within = DISCARD_LIMIT / size.max(DISCARD_FRAME);
            assert_eq!(polled.load(Ordering::Relaxed), within + 2, "{size}");
        }
    }

    /// A body fed without end is read up to `DISCARD_LIMIT`.
    #[tokio::test(start_paused = true)]
    async fn a_body_fed_without_end_is_read_up_to_the_byte_limit() {
        let (tx, _) = given_up(Some(FOR)).await;
        let chunk = Bytes::from(vec![0; 64 * 1024]);
        let mut sent = 0;
        while tx.send(chunk.clone()).await.is_ok() {
            sent += chunk.len();
            assert!(sent <= 2 * DISCARD_LIMIT, "read past the limit");
        }
        // The limit, the frame that passed it, and perhaps one more in
        // the channel's room.
        assert!(sent > DISCARD_LIMIT, "{sent}");
        assert!(sent <= DISCARD_LIMIT + 2 * chunk.len(), "{sent}");
    }

    /// A body that keeps trickling is read for the discard timeout in all.
    #[tokio::test(start_paused = true)]
    async fn a_body_given_up_is_read_for_the_time_limit_at_most() {
        let (tx, _) = given_up(Some(FOR)).await;
        let start = Instant::now();
        let step = DISCARD_IDLE - Duration::from_secs(1);
        for _ in 0..20 {
            if tx.send(Bytes::from_static(b"drip")).await.is_err() {
                break;
            }
            tokio::time::sleep(step).await;
        }
        // The frame sent just before the limit lands in the channel's
        // room; the one after finds the body gone.
        let elapsed = start.elapsed();
        assert!(elapsed >= FOR, "{elapsed:?}");
        assert!(elapsed <= FOR + step, "{elapsed:?}");
    }
}
