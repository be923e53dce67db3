//! How `examples/reverse_proxy.rs` accepts and serves clients'
//! connections, shared with its tests (`tests/front.rs`): HTTP/1.1 or
//! HTTP/2 (prior knowledge, as gRPC clients connect without TLS), protocol
//! switches included, with bounds on how many connections are open, on
//! connections that send nothing or take nothing, on HTTP/2 clients that
//! reset most of their requests, idle connections closed to make room for
//! new ones at the bound, and a graceful stop.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves client connections (see [`Front::serve`]).
pub struct Front {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    first: Duration,
    limits: Limits,
    /// Tells the connections that room is wanted (see
    /// [`make_room`](Front::make_room)); `rooms` counts the asks, so a
    /// connection polls `room` only after one; `wanted` is how many of
    /// them may still close for the last ask.
    room: Notify,
    rooms: AtomicUsize,
    wanted: AtomicUsize,
}

/// The idle connections one ask for room closes at most, as nginx drains
/// at most 32 reusable connections at a time.
const ROOM_PER_ASK: usize = 32;

/// How long a connection may wait for what.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// For its first request head, and over HTTP/1.1 for each request head
    /// (an idle kept-alive connection too); `None`: for `idle`.
    pub header_read_timeout: Option<Duration>,
    /// With no request open, after its first: closed after one to two of
    /// these.
    pub idle: Duration,
    /// With every request open waiting for its client to take what it was
    /// handed of its response, and no response moving (a client that
    /// stopped reading, an HTTP/2 one that grants no window): dropped after
    /// between one and one and a quarter of this, as nginx's
    /// `send_timeout` closes a connection whose writes stand still. `None`:
    /// no limit.
    pub stalled: Option<Duration>,
    /// For the requests under way once it is being closed.
    pub grace: Duration,
    /// For those under way at a stop, when longer than `grace`.
    pub stop_grace: Duration,
}

/// How a connection ends.
enum End {
    /// On its own.
    Ended,
    /// Closed, with time for the requests under way (over HTTP/2 with a
    /// `GOAWAY`): the grace, or the stop's.
    Gracefully { stop: bool },
    /// Dropped: nothing it serves moves.
    Now,
}

/// Closes an HTTP/2 connection whose client reset at least half of its
/// requests before their answers, each within [`PREMATURE`] of its start,
/// once it has made this many (or reset half this many), with Envoy's
/// thresholds: a rapid reset attack (CVE-2023-44487) makes the proxy start
/// a request through its stack, towards a backend, for each stream it
/// resets. h2's own limit counts only the streams reset before hyper takes
/// them, which a client that sends its resets a moment later escapes. A
/// gRPC client whose calls mostly end at deadlines under a second counts
/// too, as with Envoy: it connects again.
const RESETS_JUDGED_AFTER: usize = 500;

/// A request reset sooner than this after it started is reset early.
const PREMATURE: Duration = Duration::from_secs(1);

/// Accepts connections from `listener` until `stopped` resolves, and serves
/// each with `serve`, in a task of its own, while fewer than `max` are
/// open: past that, a new connection waits in the listener's backlog until
/// one closes, as nginx's `worker_connections` has it, so that clients
/// cannot take every file descriptor (backend connects and probes that
/// then fail count against healthy backends). A connection holds its place
/// for as long as its socket is open: through a protocol switch too (a
/// WebSocket tunnel). A failed accept (out of file descriptors, most
/// likely) is logged with `log` and retried 100 ms later. While a new
/// connection waits for a place, `full` is called at once and then every
/// second: let it close idle connections ([`Front::make_room`]), as nginx
/// reuses its idle kept-alive connections when out of
/// `worker_connections`, and say so.
pub async fn accept<F, Fut>(
    listener: TcpListener,
    max: usize,
    stopped: impl Future<Output = ()>,
    log: impl Fn(&io::Error),
    full: impl Fn(),
    mut serve: F,
) where
    F: FnMut(Admitted, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let places = Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS)));
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stopped => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Retrying at once would spin.
                log(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // With every place taken, the connection waits here (one more
        // than `max` open, the others in the backlog) for one to free, and
        // asks for room at once and then every second: a connection busy
        // at the last ask may be idle now.
        let place = match places.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                let mut waiting = std::pin::pin!(places.clone().acquire_owned());
                loop {
                    full();
                    tokio::select! {
                        place = &mut waiting => match place {
                            Ok(place) => break place,
                            Err(_) => return,
                        },
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = &mut stopped => return,
                    }
                }
            }
        };
        // Answers go out as they are written, not held for more.
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(
            Admitted {
                stream,
                _place: place,
            },
            peer,
        ));
    }
}

/// An accepted connection, holding its place among those [`accept`] lets
/// be open until it is dropped.
pub struct Admitted {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Front {
    /// A front that holds its connections to `limits`.
    pub fn new(limits: Limits) -> Front {
        let header_read_timeout = limits.header_read_timeout;
        let mut http1 = http1::Builder::new();
        http1
            .keep_alive(true)
            // Without a timer hyper enforces no header read timeout (and
            // warns on every connection).
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            // A request head of at most 64 KiB, as HTTP/2's header list
            // below is 16 KiB; nginx takes heads of up to 32 KiB.
            .max_header_size(64 * 1024)
            // And 64 KiB, not about 400, for what hyper reads ahead (an
            // upload) and queues to write (which then only flushes sooner).
            .max_buf_size(64 * 1024);
        // PINGs every minute find the HTTP/2 clients that went away without
        // closing, whose open streams would otherwise keep their
        // connections for good. A client gets a minute to answer: a PING
        // waits behind what was sent before it, which a slow client reads
        // first.
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(60))
            .keep_alive_timeout(Duration::from_secs(60))
            // Each stream is a request through the stack to a backend:
            // nginx's bound (hyper's default is 200, which its docs say may
            // change).
            .max_concurrent_streams(128)
            // hyper's values today, set because the front relies on them:
            // streams a client resets before hyper takes them (past this,
            // the connection ends), and a request's header list.
            .max_pending_accept_reset_streams(20)
            .max_header_list_size(16 * 1024)
            // The data queued per stream for a client slow to take it:
            // 128 KiB, not hyper's 400 KiB, times 128 streams.
            .max_send_buf_size(128 * 1024);
        Front {
            http1,
            http2,
            first: header_read_timeout.unwrap_or(limits.idle),
            limits,
            room: Notify::new(),
            rooms: AtomicUsize::new(0),
            wanted: AtomicUsize::new(0),
        }
    }

    /// Closes up to 32 connections that have served a request and have
    /// none open (kept-alive HTTP/1.1 ones between requests, HTTP/2 ones
    /// with no stream open, the latter with a `GOAWAY`), so that their
    /// places go to new connections; those that have not sent their first
    /// request yet are left their time for it.
    pub fn make_room(&self) {
        self.wanted.store(ROOM_PER_ASK, Ordering::Release);
        self.rooms.fetch_add(1, Ordering::Release);
        self.room.notify_waiters();
    }

    /// Whether this connection may close for the last ask for room.
    fn take_room(&self) -> bool {
        (self.wanted)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(1))
            .is_ok()
    }

    /// Serves `io` with `service` until the connection ends. When `stop`
    /// turns true, when no first request comes in time, when the
    /// connection has had no request open (none started, none whose
    /// response was still being sent) since the idle timer last fired, when
    /// room is wanted ([`make_room`](Front::make_room)) while it has none
    /// open, or when its HTTP/2 client resets its requests early (see
    /// [`RESETS_JUDGED_AFTER`]), it finishes the requests it is serving
    /// for at most the grace and closes (over HTTP/2 with a `GOAWAY`).
    /// When every request open waits for the client to take its response
    /// and none moves for the stall limit, it is dropped. Holds two
    /// receivers of `stop` while it runs.
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
        // A zero limit would look every zero seconds.
        let stall = (self.limits.stalled).filter(|limit| !limit.is_zero());
        let requests = Arc::new(Requests {
            watched: stall.is_some(),
            ..Requests::default()
        });
        let service = Counted {
            inner: service,
            requests: requests.clone(),
        };
        let mut idle = std::pin::pin!(tokio::time::sleep(self.first));
        let mut stop_changed = stop.clone();
        let mut stopping = std::pin::pin!(stop_changed.wait_for(|&stop| stop));
        // Which protocol it speaks, read within the time for its first
        // request.
        let mut io = io;
        let version = tokio::select! {
            version = sniff(&mut io) => version,
            () = &mut idle => return,
            _ = &mut stopping => return,
        };
        let Ok((http2, first)) = version else { return };
        let io = Rewind {
            io,
            first,
            failed: None,
        };
        let mut connection: Pin<Box<dyn Serving>> = if http2 {
            Box::pin(self.http2.serve_connection(io, service))
        } else {
            Box::pin(self.http1.serve_connection(io, service).with_upgrades())
        };
        let mut reset_early = std::pin::pin!(requests.reset_early.notified());
        // Made before the asks are counted: an ask counted after is one
        // whose notice it gets.
        let mut room = std::pin::pin!(self.room.notified());
        let mut rooms = self.rooms.load(Ordering::Acquire);
        let mut registered = false;
        let mut counted = 0;
        let mut stall = stall.map(Stall::new);
        let (mut waiting, mut watching) = (false, false);
        // The stop and reset futures keep the task's waker from their first
        // polls, so a wake polls them again only once their value changed
        // (an atomic load): polling them on every wake of a busy connection
        // would take a lock each time.
        let end = std::future::poll_fn(|cx| {
            if connection.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Ended);
            }
            if !watching || requests.reset.load(Ordering::Acquire) {
                watching = true;
                if reset_early.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Gracefully { stop: false });
                }
            }
            // Looked at when it fires: a connection that had a request
            // open since goes on for another period.
            while idle.as_mut().poll(cx).is_ready() {
                let now = requests.closed.load(Ordering::Relaxed);
                if now == counted && requests.open.load(Ordering::Relaxed) == 0 {
                    return Poll::Ready(End::Gracefully { stop: false });
                }
                counted = now;
                idle.as_mut().reset(Instant::now() + self.limits.idle);
            }
            if let Some(stall) = &mut stall {
                if stall.poll(&requests, cx).is_ready() {
                    return Poll::Ready(End::Now);
                }
            }
            // Polled to register, then only once an ask was counted (until
            // its notice lands, which the count may precede).
            if !registered || self.rooms.load(Ordering::Acquire) != rooms {
                registered = true;
                if room.as_mut().poll(cx).is_ready() {
                    let idle = requests.open.load(Ordering::Relaxed) == 0
                        && requests.closed.load(Ordering::Relaxed) > 0;
                    if idle && self.take_room() {
                        return Poll::Ready(End::Gracefully { stop: false });
                    }
                    // Busy, new, or enough closed: waits for the next ask.
                    room.set(self.room.notified());
                    rooms = self.rooms.load(Ordering::Acquire);
                    let _ = room.as_mut().poll(cx);
                }
            }
            if !waiting || stop.has_changed().unwrap_or(true) {
                waiting = true;
                if stopping.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(End::Gracefully { stop: true });
                }
            }
            Poll::Pending
        })
        .await;
        match end {
            End::Ended | End::Now => {}
            End::Gracefully { stop } => {
                connection.as_mut().close();
                // A stream whose client grants it no window, say, would
                // keep the connection past its `GOAWAY` for good.
                let limits = &self.limits;
                let grace = if stop {
                    limits.grace.max(limits.stop_grace)
                } else {
                    limits.grace
                };
                let _ = tokio::time::timeout(grace, connection).await;
            }
        }
    }
}

/// What an HTTP/2 client with prior knowledge sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first bytes of a connection, read to tell its protocol.
type First = ([u8; PREFACE.len()], usize);

/// Reads `io` up to the first byte that differs from HTTP/2's preface, or
/// to its end: whether the connection speaks HTTP/2, and what was read.
///
/// As hyper-util's server does, but the bytes read go back to hyper with
/// the rest of what the client sent at once (see [`Rewind`]), not alone: a
/// first read of those few bytes alone would make hyper's HTTP/1 read
/// buffer grow from 8 to 16 KiB, which every kept-alive connection then
/// holds while idle.
async fn sniff<I: Read + Unpin>(io: &mut I) -> io::Result<(bool, First)> {
    let mut first = ([0u8; PREFACE.len()], 0);
    loop {
        let (buf, len) = &mut first;
        let read = std::future::poll_fn(|cx| {
            let mut dst = hyper::rt::ReadBuf::new(&mut buf[*len..]);
            std::task::ready!(Pin::new(&mut *io).poll_read(cx, dst.unfilled()))?;
            Poll::Ready(Ok::<_, io::Error>(dst.filled().len()))
        })
        .await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        *len += read;
        if buf[..*len] != PREFACE[..*len] {
            return Ok((false, first));
        }
        if *len == PREFACE.len() {
            return Ok((true, first));
        }
    }
}

/// A connection whose first bytes were read to tell its protocol: its first
/// read gives them back, with what else the client has sent by then.
struct Rewind<I> {
    io: I,
    first: First,
    /// An error of the read that followed the first bytes, for the next.
    failed: Option<io::Error>,
}

impl<I: Read + Unpin> Read for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        let (bytes, len) = self.first;
        if len == 0 {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let given = len.min(buf.remaining());
        buf.put_slice(&bytes[..given]);
        self.first.0.copy_within(given..len, 0);
        self.first.1 = len - given;
        if self.first.1 == 0 && buf.remaining() > 0 {
            // What was read is read: nothing more yet is fine, and an error
            // waits for the next read.
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.io).poll_read(cx, buf) {
                self.failed = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: Write + Unpin> Write for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's connection, whichever its protocol.
trait Serving: Future<Output = hyper::Result<()>> + Send {
    /// Starts a graceful close (over HTTP/2, a `GOAWAY`).
    fn close(self: Pin<&mut Self>);
}

impl<I, S, B> Serving for http1::UpgradeableConnection<I, S>
where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Send,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn close(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Serving for http2::Connection<I, S, TokioExecutor>
where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn close(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The watch over a connection whose responses may all stand still.
struct Stall {
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Since when no frame was handed out while every request open waited
    /// for its client; `None` while the timer does not run: not while no
    /// request is open, so that an idle connection is not woken for it.
    since: Option<Instant>,
}

impl Stall {
    fn new(limit: Duration) -> Stall {
        Stall {
            limit,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            since: None,
        }
    }

    /// Ready when every request open has waited for its client to take
    /// what it was handed, and no frame was handed out, for the limit;
    /// looked at every quarter of it while requests are open. Polled at
    /// each wake of the connection, which a new request is.
    fn poll(&mut self, requests: &Requests, cx: &mut Context<'_>) -> Poll<()> {
        if self.since.is_none() {
            if requests.open.load(Ordering::Acquire) == 0 {
                return Poll::Pending;
            }
            let now = Instant::now();
            self.since = Some(now);
            requests.moved.store(false, Ordering::Relaxed);
            self.timer.as_mut().reset(now + self.limit / 4);
        }
        while let (Some(since), Poll::Ready(())) = (self.since, self.timer.as_mut().poll(cx)) {
            let now = Instant::now();
            // In this order: a request that opens between the two reads
            // makes `open` larger, never `handed`.
            let handed = requests.handed.load(Ordering::Acquire);
            let open = requests.open.load(Ordering::Acquire);
            if open == 0 {
                self.since = None;
                return Poll::Pending;
            }
            if handed < open || requests.moved.swap(false, Ordering::Relaxed) {
                self.since = Some(now);
            } else if now.duration_since(since) >= self.limit {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(now + self.limit / 4);
        }
        Poll::Pending
    }
}

/// The requests of one connection.
#[derive(Default)]
struct Requests {
    /// Open: called, and neither failed nor done sending the response.
    open: AtomicUsize,
    /// Open requests whose response body handed a frame and has not been
    /// asked for the next yet: they wait for their client to take it.
    handed: AtomicUsize,
    /// Whether the stall watch looks at the requests: else they note
    /// nothing of their responses' frames.
    watched: bool,
    /// A response's body handed out a frame since the stall watch last
    /// looked.
    moved: AtomicBool,
    /// How many requests closed: with `open`, whether any was open since
    /// the count was last read.
    closed: AtomicUsize,
    /// How many requests were dropped before their answers within
    /// [`PREMATURE`] of their start (their streams reset by the client).
    early: AtomicUsize,
    /// Set, and `reset_early` told, once `early` is at least half of the
    /// requests closed, or of [`RESETS_JUDGED_AFTER`].
    reset: AtomicBool,
    reset_early: Notify,
}

/// One open request: closed when dropped.
struct Open {
    requests: Arc<Requests>,
    /// When an HTTP/2 request started (one over HTTP/1 that is reset ends
    /// its connection anyway).
    started: Option<Instant>,
    /// Its response's head was handed to the server, or it failed.
    answered: bool,
    /// Its response's body handed a frame and was not asked for the next.
    handed: bool,
}

impl Open {
    fn new(requests: &Arc<Requests>, version: Version) -> Open {
        requests.open.fetch_add(1, Ordering::Release);
        Open {
            requests: requests.clone(),
            started: (version == Version::HTTP_2).then(Instant::now),
            answered: false,
            handed: false,
        }
    }

    /// Notes whether its response's body now waits for its client to
    /// take a frame it handed.
    fn handed(&mut self, handed: bool) {
        let requests = &self.requests;
        if !requests.watched {
            return;
        }
        if handed {
            requests.moved.store(true, Ordering::Relaxed);
        }
        if handed != self.handed {
            self.handed = handed;
            if handed {
                requests.handed.fetch_add(1, Ordering::Release);
            } else {
                requests.handed.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.handed(false);
        let requests = &self.requests;
        let closed = requests.closed.fetch_add(1, Ordering::Relaxed) + 1;
        requests.open.fetch_sub(1, Ordering::Release);
        let early = !self.answered && self.started.is_some_and(|s| s.elapsed() < PREMATURE);
        if early {
            let early = requests.early.fetch_add(1, Ordering::Relaxed) + 1;
            if early * 2 >= closed.max(RESETS_JUDGED_AFTER) {
                requests.reset.store(true, Ordering::Release);
                requests.reset_early.notify_one();
            }
        }
    }
}

/// A service whose requests stay open until their responses' bodies are
/// dropped.
struct Counted<S> {
    inner: S,
    requests: Arc<Requests>,
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Tracked<B>>;
    type Error = S::Error;
    type Future = Counting<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Counting<S::Future> {
        Counting {
            open: Some(Open::new(&self.requests, req.version())),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A response on its way, its request open.
    struct Counting<F> {
        open: Option<Open>,
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for Counting<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Tracked<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let mut open = this.open.take();
        // A failed request was not reset by its client.
        if let Some(open) = &mut open {
            open.answered = true;
        }
        Poll::Ready(result.map(|response| response.map(|body| Tracked { body, open })))
    }
}

pin_project_lite::pin_project! {
    /// A response's body, its request open until it is dropped.
    struct Tracked<B> {
        #[pin]
        body: B,
        open: Option<Open>,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if let Some(open) = this.open {
            open.handed(matches!(frame, Poll::Ready(Some(Ok(_)))));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
