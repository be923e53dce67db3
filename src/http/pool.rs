//! Keep-alive connections to backends.
//!
//! Each backend address has one [`Upstream`], with the [`Open`] that opens
//! its connections. Over HTTP/1.1 it keeps a stack of idle connections
//! (the most recently used is taken first, so a few hot connections carry
//! the load and the rest age out). A request takes an idle connection, or
//! opens one when none is idle, and its connection goes back on the stack
//! as soon as the response has been read to its end: at once when the
//! response has no body left to read, else when the response body is
//! finished. A connection whose response was not read to its end is
//! closed, since HTTP/1.1 cannot tell where the next response would start.
//! Over HTTP/2 every request shares one connection.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use ::http::header::{HeaderMap, HeaderValue, UPGRADE};
use ::http::uri::{Authority, Scheme, Uri};
use ::http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

use super::body::{BodyStalls, ResponseBody, Waits};
#[cfg(feature = "http2")]
use super::http2::Http2;
use super::sweep::{self, Swept};
use super::timeout::{self, Failed, Sent, Timer, Upload, Written};
use super::{Handover, Received, Settings};
use crate::backend::BackendState;
use crate::error::{BoxError, InvalidRequest, NotSent};

/// A byte stream to a backend, as a connector opened it.
pub(super) trait Io: Read + Write + Unpin + Send + 'static {}

impl<T: Read + Write + Unpin + Send + 'static> Io for T {}

/// A connection's byte stream: a TCP stream that the client's own
/// `HttpConnector` opened (read and written without dynamic dispatch, on
/// the proxy's hot path), or what a connector of the user's opened.
///
/// A backend may answer before it has read the whole request (a `413` or
/// `401` to a large upload) and close the connection with the rest
/// unread; its kernel then resets the connection, and the next write
/// fails though the answer is waiting to be read. So once a write finds
/// the backend gone, the stream's write side is taken as closed: what is
/// written from then on is dropped, and reads go on, so that hyper reads
/// the answer, or, when there is none, the end of the connection, which
/// fails the exchange. Once the answer has been read, hyper reads the
/// connection's end too, which stops the upload: the rest of the
/// request's body goes to [`Upload`], which reads and drops it.
///
/// Not so on a connection that switched protocols: once it is a tunnel,
/// a write that finds the backend gone fails, so that the tunnel ends
/// rather than drop what the client sends.
pub(super) struct Stream {
    io: Transport,
    write_closed: bool,
    /// When it last wrote to the backend, noted for an HTTP/1.1
    /// connection, whose writes are its one request's; and whether it
    /// carries a tunnel, whose writes that find the backend gone fail as
    /// they are.
    written: Option<Arc<Written>>,
}

enum Transport {
    Tcp(TokioIo<TcpStream>),
    Other(Box<dyn Io>),
}

impl Stream {
    fn tcp(io: TokioIo<TcpStream>) -> Self {
        Stream {
            io: Transport::Tcp(io),
            write_closed: false,
            written: None,
        }
    }

    fn other(io: Box<dyn Io>) -> Self {
        Stream {
            io: Transport::Other(io),
            write_closed: false,
            written: None,
        }
    }

    /// `written`, the outcome of a write of `len` bytes, unless it found
    /// the backend gone: the write side is then closed, and the bytes
    /// count as written.
    fn unless_gone(
        &mut self,
        written: Poll<io::Result<usize>>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) if n > 0 => {
                if let Some(written) = &self.written {
                    written.wrote();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e))
                if !self.written.as_ref().is_some_and(|w| w.tunnel())
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset
                            | io::ErrorKind::BrokenPipe
                            | io::ErrorKind::ConnectionAborted
                    ) =>
            {
                self.write_closed = true;
                Poll::Ready(Ok(len))
            }
            written => written,
        }
    }
}

/// Opens a new [`Stream`] to the backend a URI names (its scheme and
/// authority).
pub(super) type Open = Arc<
    dyn Fn(Uri) -> Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>> + Send + Sync,
>;

/// An [`Open`] that calls (a clone of) `connector`, any tower service
/// from a URI to a byte stream, and wraps what it opens with `stream`.
fn open_with<C>(connector: C, stream: fn(C::Response) -> Stream) -> Open
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    // Behind a lock, so that a connector that is not `Sync` will do.
    let connector = Mutex::new(connector);
    Arc::new(move |uri| {
        let mut connector = connector.lock().clone();
        Box::pin(async move {
            poll_fn(|cx| connector.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let io = connector.call(uri).await.map_err(Into::into)?;
            Ok(stream(io))
        })
    })
}

/// An [`Open`] with hyper-util's `HttpConnector`.
pub(super) fn open_tcp(connector: HttpConnector) -> Open {
    open_with(connector, Stream::tcp)
}

/// An [`Open`] with a connector of the user's.
pub(super) fn open_other<C>(connector: C) -> Open
where
    C: Service<Uri> + Clone + Send + 'static,
    C::Response: Read + Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    open_with(connector, |io| Stream::other(Box::new(io)))
}

/// A write of `len` bytes to a stream whose write side is closed: they
/// are dropped, within the task's budget of the runtime, so that a body
/// always ready to be written (in memory, or without end) is not spun
/// through before hyper reads what the backend sent.
fn dropped(cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
    let progress = std::task::ready!(tokio::task::coop::poll_proceed(cx));
    progress.made_progress();
    Poll::Ready(Ok(len))
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Transport::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Other(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return dropped(cx, buf.len());
        }
        let written = match &mut this.io {
            Transport::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Other(io) => Pin::new(io).poll_write(cx, buf),
        };
        this.unless_gone(written, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = || bufs.iter().map(|b| b.len()).sum();
        if this.write_closed {
            return dropped(cx, len());
        }
        let written = match &mut this.io {
            Transport::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Transport::Other(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        };
        this.unless_gone(written, len())
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Transport::Tcp(io) => io.is_write_vectored(),
            Transport::Other(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Transport::Tcp(io) => Pin::new(io).poll_flush(cx),
            Transport::Other(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Transport::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Other(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// `open`, failing with a timed-out I/O error when it takes longer than
/// `limit` (zero: no limit).
pub(super) fn within(open: Open, limit: Duration) -> Open {
    if limit.is_zero() {
        return open;
    }
    Arc::new(move |uri| {
        let opening = open(uri);
        Box::pin(async move {
            match tokio::time::timeout(limit, opening).await {
                Ok(opened) => opened,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting took longer than {limit:?}"),
                )
                .into()),
            }
        })
    })
}

/// The upstreams of one [`HttpClient`](super::HttpClient), by the URI of
/// their scheme and authority.
pub(super) struct Upstreams<B> {
    open: Open,
    settings: Settings,
    /// The response bodies waiting for their readers, with a send timeout.
    stalls: Option<Arc<BodyStalls>>,
    by_target: Mutex<Targets<B>>,
}

impl<B> Upstreams<B> {
    /// Upstreams whose connections `open` opens, kept as `settings` say.
    pub(super) fn new(open: Open, settings: Settings) -> Self {
        Upstreams {
            open,
            settings,
            stalls: settings.send_timeout.map(BodyStalls::new),
            by_target: Mutex::new(Targets {
                map: HashMap::new(),
                prune_at: PRUNE_AT_LEAST,
            }),
        }
    }

    #[cfg(test)]
    pub(super) fn idle_timeout(&self) -> Duration {
        self.settings.idle_timeout
    }

    #[cfg(test)]
    pub(super) fn stalls(&self) -> Option<&Arc<BodyStalls>> {
        self.stalls.as_ref()
    }

    /// How many upstreams the map holds, those gone and not pruned yet
    /// included.
    #[cfg(test)]
    pub(super) fn targets(&self) -> usize {
        self.by_target.lock().map.len()
    }

    /// The upstream for `scheme://authority`, shared by every backend
    /// naming it while any of them lives; its idle connections close with
    /// the last.
    pub(super) fn get(&self, scheme: &Scheme, authority: &Authority) -> Arc<Upstream<B>> {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("a URI from a valid scheme and authority");
        let mut targets = self.by_target.lock();
        if let Some(upstream) = targets.map.get(&target).and_then(Weak::upgrade) {
            return upstream;
        }
        // Those no backend names any more are let go once the map has
        // doubled since: building a fleet of N backends is then O(N), not
        // O(N²).
        if targets.map.len() >= targets.prune_at {
            targets.map.retain(|_, u| u.strong_count() > 0);
            targets.prune_at = (2 * targets.map.len()).max(PRUNE_AT_LEAST);
        }
        let upstream = Arc::new(Upstream {
            open: self.open.clone(),
            target: target.clone(),
            idle_timeout: self.settings.idle_timeout,
            waits: Waits {
                read_timeout: self.settings.read_timeout,
                stalls: self.stalls.clone(),
            },
            tunnel_idle_timeout: self.settings.tunnel_idle_timeout,
            discard_timeout: self.settings.discard_timeout,
            max_response_headers: self.settings.max_response_headers,
            max_response_header_size: self.settings.max_response_header_size,
            idle: Mutex::new(IdleConnections {
                stack: VecDeque::new(),
                swept: false,
            }),
            #[cfg(feature = "http2")]
            http2: self.settings.http2.then(|| Http2::new(&self.settings)),
        });
        targets.map.insert(target, Arc::downgrade(&upstream));
        upstream
    }
}

/// The upstreams by target, and the size at which those gone are pruned.
struct Targets<B> {
    map: HashMap<Uri, Weak<Upstream<B>>>,
    prune_at: usize,
}

/// The smallest size at which `Targets` are pruned.
const PRUNE_AT_LEAST: usize = 64;

/// One backend address: its idle connections and how to open more.
pub(super) struct Upstream<B> {
    open: Open,
    target: Uri,
    idle_timeout: Duration,
    /// How long the backend may send nothing while a response (its head
    /// or the next frame of its body) is awaited, and the client's send
    /// timeout, which watches response bodies waiting for their readers.
    waits: Waits,
    /// How long a switched connection may carry nothing before it is
    /// closed.
    tunnel_idle_timeout: Option<Duration>,
    /// How long the rest of an HTTP/1 upload given up is read (see
    /// [`Upload`]).
    discard_timeout: Option<Duration>,
    /// The most header lines an HTTP/1.1 response may have, when set.
    max_response_headers: Option<usize>,
    /// The most bytes an HTTP/1.1 response's head may take.
    max_response_header_size: usize,
    /// Idle HTTP/1.1 connections, the most recently used last, and
    /// whether a task closes them once idle too long (set and cleared
    /// under the same lock).
    idle: Mutex<IdleConnections<B>>,
    /// The shared connection, when the client speaks HTTP/2.
    #[cfg(feature = "http2")]
    http2: Option<Http2<Upload<B>>>,
}

struct Idle<B> {
    sender: SendRequest<Upload<B>>,
    written: Arc<Written>,
    timer: Timer,
    since: Instant,
    /// How long it may stay idle: the idle timeout, or less when the
    /// backend announced a shorter keep-alive.
    life: Duration,
}

impl<B> Idle<B> {
    fn expired(&self, now: Instant) -> bool {
        crate::time::elapsed(self.since, now, self.life)
    }
}

struct IdleConnections<B> {
    stack: VecDeque<Idle<B>>,
    swept: bool,
}

impl<B> IdleConnections<B> {
    /// Drops the connections at the bottom that have been idle for their
    /// time at `now` (for the most part the oldest are at the bottom).
    fn prune(&mut self, now: Instant) {
        while self.stack.front().is_some_and(|i| i.expired(now)) {
            self.stack.pop_front();
        }
    }
}

/// The error of a request that went (at least in part) to the backend. A
/// failure of the request's own body, such as a client that went away in
/// the middle of its upload, is the request's, not the backend's: an
/// [`InvalidRequest`], which neither counts against the backend's health
/// nor is answered as the backend's failure. The body itself notes its
/// failure in `sent`: hyper's own errors cannot tell it from others of the
/// same kind (a request that waited for a free HTTP/2 stream on a
/// connection that then ended is "user" error with a cause too).
pub(super) fn sent_error(e: hyper::Error, sent: &Sent) -> BoxError {
    // A body that says so itself (`ReplayBody`) needs no second wrap.
    if timeout::body_failed(sent) && crate::error::find::<InvalidRequest>(&e).is_none() {
        InvalidRequest::with_source("the request's body failed while it was sent", e).into()
    } else {
        e.into()
    }
}

impl<B> Upstream<B> {
    /// The backend's scheme.
    pub(super) fn scheme(&self) -> &Scheme {
        self.target.scheme().expect("a target built with a scheme")
    }

    /// How long the rest of the body of a request is read if a connection
    /// gives it up (see [`Upload`]): only one that came over HTTP/1.
    pub(super) fn discard_timeout(&self, from_http1: bool) -> Option<Duration> {
        self.discard_timeout.filter(|_| from_http1)
    }

    /// Whether requests go out as HTTP/2.
    pub(super) fn speaks_http2(&self) -> bool {
        #[cfg(feature = "http2")]
        return self.http2.is_some();
        #[cfg(not(feature = "http2"))]
        false
    }

    /// The most recently used idle connection that is ready for a request.
    /// Closed connections met on the way are dropped, and so are those idle
    /// too long (with all older ones, when it is the idle timeout that has
    /// passed); one still busy (the backend answered before the request
    /// body was all sent) is left for later rather than waited for.
    fn checkout(&self) -> Option<(SendRequest<Upload<B>>, Arc<Written>, Timer)> {
        let now = Instant::now();
        let mut guard = self.idle.lock();
        let idle = &mut guard.stack;
        let mut at = idle.len();
        while at > 0 {
            at -= 1;
            let connection = &idle[at];
            let expired = connection.expired(now);
            if expired && connection.life >= self.idle_timeout {
                // In order of checkin: everything before is older still.
                idle.drain(..=at);
                return None;
            }
            if expired || connection.sender.is_closed() {
                idle.remove(at);
            } else if connection.sender.is_ready() {
                return idle.remove(at).map(|i| (i.sender, i.written, i.timer));
            }
        }
        None
    }

    /// How long a connection may stay idle after a response whose headers
    /// are `headers` (with the hop-by-hop ones `present`): the idle
    /// timeout, or less when the backend announced that it keeps idle
    /// connections for N seconds (`Keep-Alive: timeout=N`): one second
    /// less, so that a request does not meet the backend's close, and none
    /// at all for N of 1 or less.
    fn idle_life(&self, headers: &HeaderMap, present: u16) -> Life {
        let announced = (present & super::KEEP_ALIVE_PRESENT != 0)
            .then(|| super::keep_alive_timeout(headers))
            .flatten();
        Life {
            idle: self.idle_timeout,
            // Counted from now, when the response's head came: the
            // backend counts from when it has written the whole response,
            // which a slow client may read long after.
            until: announced.map(|secs| {
                crate::time::later(Instant::now(), Duration::from_secs(secs.saturating_sub(1)))
            }),
        }
    }

    /// Puts a connection whose last response was read to its end back on
    /// the stack, to be reused within `life` at most (see
    /// [`idle_life`](Self::idle_life)), and closes those at the bottom that
    /// have been idle for their time. While any is idle, a task closes them
    /// as their time passes, so that they do not outlive it when no request
    /// comes (one whose backend announced a shorter keep-alive may wait for
    /// the task's next round, but its backend closes it meanwhile).
    fn checkin(
        self: &Arc<Self>,
        sender: SendRequest<Upload<B>>,
        written: Arc<Written>,
        timer: Timer,
        life: Life,
    ) where
        B: Send + 'static,
    {
        let now = Instant::now();
        let life = life.left(now);
        // A zero idle timeout (or keep-alive) keeps nothing.
        if sender.is_closed() || life.is_zero() {
            return;
        }
        let mut idle = self.idle.lock();
        idle.prune(now);
        idle.stack.push_back(Idle {
            sender,
            written,
            timer,
            since: now,
            life,
        });
        if idle.swept {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        idle.swept = true;
        drop(idle);
        sweep::spawn(&runtime, self, crate::time::later(now, life));
    }
}

/// Closes an upstream's idle connections as their idle timeout passes;
/// those the backend closed go too (a checkout passes them by).
impl<B: Send + 'static> Swept for Upstream<B> {
    fn round(&self, now: Instant) -> Option<Instant> {
        let mut idle = self.idle.lock();
        idle.stack
            .retain(|i| !i.expired(now) && !i.sender.is_closed());
        let first_to_expire = idle
            .stack
            .iter()
            .map(|i| crate::time::later(i.since, i.life))
            .min();
        if first_to_expire.is_none() {
            // Ended under the lock a checkin takes: one that comes next
            // starts a new sweep.
            idle.swept = false;
        }
        first_to_expire
    }

    fn stopped(&self) {
        self.idle.lock().swept = false;
    }
}

impl<B> Upstream<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Waits for the response head of a request sent on one of its
    /// HTTP/1.1 connections (see [`timeout::head`]).
    fn head<'a, F>(
        &self,
        response: F,
        sent: &'a Sent,
        written: &'a Written,
        timer: &'a mut Timer,
    ) -> timeout::Head<'a, F> {
        timeout::head(
            response,
            self.waits.read_timeout,
            sent,
            Some(written),
            timer,
            true,
        )
    }

    /// Opens a new HTTP/1.1 connection, run by a task of its own, which
    /// hands its byte stream over after a `101` (to a request that asked
    /// for a switch: see [`Upstream::upgrade`]).
    async fn connect(&self) -> Result<(SendRequest<Upload<B>>, Arc<Written>), BoxError> {
        let mut io = (self.open)(self.target.clone()).await?;
        let written = Written::new();
        io.written = Some(written.clone());
        let mut builder = http1::Builder::new();
        builder.max_header_size(self.max_response_header_size);
        if let Some(lines) = self.max_response_headers {
            builder.max_headers(lines);
        }
        let (sender, connection) = builder.handshake(io).await?;
        // Its end (the backend closed it, or a response was abandoned)
        // shows in the sender, which is then never reused.
        tokio::spawn(async move { connection.with_upgrades().await });
        Ok((sender, written))
    }

    /// Sends `req` (origin-form, with its `Host`; absolute-form for
    /// HTTP/2) on an idle connection, or on a new one. A request that an
    /// idle connection did not take (the backend had closed it meanwhile)
    /// is given to the next connection; a failure to open or use a new
    /// connection is [`NotSent`]. A response head that does not come
    /// within the read timeout of the request's end fails it (not as
    /// [`NotSent`]: the backend has the request).
    ///
    /// `sent` says when the request's body was sent ([`Upload::wrap`]).
    pub(super) async fn send(
        self: Arc<Self>,
        req: Request<Upload<B>>,
        sent: Sent,
        handover: Handover,
    ) -> Result<Received, BoxError> {
        #[cfg(feature = "http2")]
        if let Some(http2) = &self.http2 {
            return http2
                .send(&self.open, &self.target, req, &self.waits, &sent, &handover)
                .await;
        }
        let (resp, sender, written, timer) = self.exchange(req, &sent, &handover).await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Nothing asked for a switch here, and nothing could join the
            // connections: the connection is dropped.
            return Err("the backend switched protocols though the request did not ask to".into());
        }
        Ok(self.lend(resp, sender, written, timer, sent))
    }

    /// Sends `req` on an idle HTTP/1.1 connection, or on a new one, and
    /// waits for the response head (see [`Upstream::send`]); answers it
    /// with the connection it came on.
    async fn exchange(
        &self,
        mut req: Request<Upload<B>>,
        sent: &Sent,
        handover: &Handover,
    ) -> Result<Exchanged<B>, BoxError> {
        loop {
            let (mut sender, written, mut timer, fresh) = match self.checkout() {
                Some((sender, written, timer)) => (sender, written, timer, false),
                None => {
                    let (sender, written) = self.connect().await.map_err(NotSent::new)?;
                    (sender, written, None, true)
                }
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(NotSent::new(e).into());
                }
                continue;
            }
            handover.handed(true);
            let response = sender.try_send_request(req);
            // Dropped with its connection when it times out: the backend
            // may still answer, and the connection would be out of step.
            match self.head(response, sent, &written, &mut timer).await {
                Ok(resp) => return Ok((resp, sender, written, timer)),
                Err(Failed::TimedOut(e)) => return Err(e),
                Err(Failed::Sent(mut e)) => match e.take_message() {
                    Some(back) if !fresh => {
                        handover.handed(false);
                        req = back;
                    }
                    Some(_) => return Err(NotSent::new(e.into_error()).into()),
                    None => return Err(sent_error(e.into_error(), sent)),
                },
            }
        }
    }

    /// `resp`, whose head came on the connection of `sender`, with that
    /// connection given back to the pool once its body has been read: at
    /// once if it already has. `sent` follows the request's upload.
    fn lend(
        self: Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<Upload<B>>,
        written: Arc<Written>,
        timer: Timer,
        sent: Sent,
    ) -> Received {
        let waits = self.waits.clone();
        // The one pass over the header names, whose answer the caller
        // strips the hop-by-hop headers with.
        let present = super::hop_by_hop(resp.headers());
        let life = self.idle_life(resp.headers(), present);
        let (pooled, timer) = if sender.is_ready() {
            // The response is already read to its end.
            self.checkin(sender, written, timer, life);
            (None, None)
        } else {
            // The body's waits take the connection's timer.
            let pooled = Pooled {
                upstream: self,
                sender,
                written,
                life,
            };
            (Some(Box::new(pooled) as Box<dyn Checkin>), timer)
        };
        let resp = resp.map(|body| ResponseBody::new(body, pooled, waits, timer, sent));
        (resp, present)
    }
}

/// A response head, with the connection it came on and that connection's
/// timer.
type Exchanged<B> = (
    Response<Incoming>,
    SendRequest<Upload<B>>,
    Arc<Written>,
    Timer,
);

impl<B> Upstream<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Sends `req`, which asks to switch protocols, as [`Upstream::send`]
    /// sends a request. When the backend agrees (`101 Switching
    /// Protocols`), the connection carries the new protocol, never another
    /// request: a task joins the client's connection, once hyper hands it
    /// over, to the backend's (see [`tunnel::join`](super::tunnel::join):
    /// until both ends have closed, or the tunnel has been idle for the
    /// client's `tunnel_idle_timeout`). When it declines, the connection
    /// is an ordinary one again (RFC 9110, section 7.8), and goes back to
    /// the pool once the answer has been read.
    pub(super) async fn upgrade(
        self: Arc<Self>,
        req: Request<B>,
        client: OnUpgrade,
        backend_state: Option<Arc<BackendState>>,
        handover: Handover,
    ) -> Result<Received, BoxError> {
        let offered: Vec<HeaderValue> = req.headers().get_all(UPGRADE).iter().cloned().collect();
        // Its body is empty, or becomes the tunnel's.
        let (req, sent) = Upload::wrap(req, None, true);
        let (mut resp, sender, written, timer) = self.exchange(req, &sent, &handover).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Ok(self.lend(resp, sender, written, timer, sent));
        }
        if !super::switch_agrees(&offered, resp.headers()) {
            return Err(
                "the backend switched to a protocol the request did not offer \
                 (RFC 9110, section 7.8)"
                    .into(),
            );
        }
        written.switched();
        let backend = hyper::upgrade::on(&mut resp);
        // The tunnel counts as in flight on its backend while it lasts.
        let in_flight = backend_state.as_ref().map(|state| state.hold_in_flight());
        // Told from the switch on: dropping the tunnel closes both sides.
        let closed = backend_state.as_ref().map(|state| state.tunnels_closed());
        let idle = self.tunnel_idle_timeout;
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let closed = async {
                match closed {
                    Some(closed) => closed.await,
                    None => std::future::pending().await,
                }
            };
            let tunnel = async {
                // The backend's side is ready at once. The client's is
                // handed over as soon as the `101` is written; one that
                // does not come (a layer above answered something else,
                // the client left) ends the tunnel, closing the backend's.
                let Ok(backend) = backend.await else { return };
                let client = async { client.await.map(TokioIo::new) };
                super::tunnel::join(client, TokioIo::new(backend), idle).await;
            };
            tokio::select! {
                () = tunnel => {}
                () = closed => {}
            }
        });
        let present = super::hop_by_hop(resp.headers());
        let waits = self.waits.clone();
        let resp = resp.map(|body| ResponseBody::new(body, None, waits, timer, sent));
        Ok((resp, present))
    }
}

/// A connection lent to a response body until it is read to its end.
struct Pooled<B> {
    upstream: Arc<Upstream<B>>,
    sender: SendRequest<Upload<B>>,
    written: Arc<Written>,
    /// How long it may stay idle once back.
    life: Life,
}

/// How long a connection may stay idle once back in the pool: the idle
/// timeout, and no later than a second before the keep-alive its backend
/// announced runs out (see [`Upstream::idle_life`]).
#[derive(Clone, Copy)]
struct Life {
    idle: Duration,
    until: Option<Instant>,
}

impl Life {
    /// How long it may stay idle from `now`.
    fn left(self, now: Instant) -> Duration {
        match self.until {
            Some(until) => self.idle.min(until.saturating_duration_since(now)),
            None => self.idle,
        }
    }
}

/// What a [`ResponseBody`] holds to give its connection back, with the
/// connection's timer.
pub(super) trait Checkin: Send + Sync {
    fn checkin(self: Box<Self>, timer: Timer);
}

impl<B: Send + 'static> Checkin for Pooled<B> {
    fn checkin(self: Box<Self>, timer: Timer) {
        self.upstream
            .checkin(self.sender, self.written, timer, self.life);
    }
}
