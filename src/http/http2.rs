//! One shared HTTP/2 connection per backend (feature `http2`).
//!
//! Every request to a backend goes on its one connection. The first
//! request that finds none starts opening one on a task of its own, and
//! every request arriving meanwhile waits for that same attempt: its
//! success or its failure is theirs too, so a backend that cannot be
//! reached costs each of them one connect timeout, not one each in turn.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::http::uri::Uri;
use ::http::Request;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::body::{ResponseBody, Waits};
use super::pool::Open;
use super::timeout::{self, Failed, Sent};
use crate::error::{find, BoxError, GoingAway, InvalidRequest, NotSent};

/// How long a keep-alive PING may go unanswered before the connection is
/// closed (hyper's default).
const PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The outcome of one attempt to open the connection, shared by every
/// request that waited for it.
type Opened<B> = Option<Result<SendRequest<B>, ConnectFailed>>;

/// An upstream's HTTP/2 connection.
pub(super) struct Http2<B> {
    state: Arc<Mutex<State<B>>>,
    keep_alive: Option<Duration>,
    idle_timeout: Duration,
    /// The largest response header list taken.
    max_header_list: u32,
}

struct State<B> {
    /// How many attempts to open a connection were started (numbers
    /// the attempts and the connections they open).
    opened: u64,
    conn: Conn<B>,
}

enum Conn<B> {
    None,
    Opening(u64, watch::Receiver<Opened<B>>),
    Open {
        n: u64,
        sender: SendRequest<B>,
        last_used: Instant,
    },
}

impl<B> Http2<B> {
    /// A connection that is not open yet, with the client's `settings`:
    /// a PING is sent after a silence of `http2_keep_alive` while requests
    /// are in flight, and a connection unused for `idle_timeout` is
    /// replaced.
    pub(super) fn new(settings: &super::Settings) -> Self {
        Http2 {
            state: Arc::new(Mutex::new(State {
                opened: 0,
                conn: Conn::None,
            })),
            keep_alive: settings.http2_keep_alive,
            idle_timeout: settings.idle_timeout,
            max_header_list: u32::try_from(settings.max_response_header_size).unwrap_or(u32::MAX),
        }
    }
}

impl<B> Http2<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// The open connection (its number and its sender), or the attempt
    /// to open one to wait for, started now if there is none.
    fn current(&self, open: &Open, target: &Uri) -> Result<(u64, SendRequest<B>), Waiting<B>> {
        let now = Instant::now();
        let mut state = self.state.lock();
        match &mut state.conn {
            Conn::Open {
                n,
                sender,
                last_used,
            } if !sender.is_closed() && now.duration_since(*last_used) < self.idle_timeout => {
                *last_used = now;
                return Ok((*n, sender.clone()));
            }
            // Still opening: wait for it. (An attempt whose task is gone
            // without a word, having panicked, is replaced.)
            Conn::Opening(n, done) if done.has_changed().is_ok() => {
                return Err(Waiting(*n, done.clone()))
            }
            // None, closed, or idle for too long (the backend may have
            // forgotten it): open another. The old one closes once its
            // last request is done.
            _ => {}
        }
        let (tell, done) = watch::channel(None);
        state.opened += 1;
        let n = state.opened;
        state.conn = Conn::Opening(n, done.clone());
        let (open, target) = (open.clone(), target.clone());
        let (keep_alive, max_header_list) = (self.keep_alive, self.max_header_list);
        let shared = Arc::downgrade(&self.state);
        // On a task of its own, which installs the outcome itself: a
        // request that gives up waiting abandons nothing, and a later one
        // never gets an old outcome.
        tokio::spawn(async move {
            let opened = connect(&open, target, keep_alive, max_header_list)
                .await
                .map_err(|e| ConnectFailed(Arc::new(e)));
            if let Some(shared) = shared.upgrade() {
                let mut state = shared.lock();
                if matches!(state.conn, Conn::Opening(m, _) if m == n) {
                    state.conn = match &opened {
                        Ok(sender) => Conn::Open {
                            n,
                            sender: sender.clone(),
                            last_used: Instant::now(),
                        },
                        Err(_) => Conn::None,
                    };
                }
            }
            tell.send_replace(Some(opened));
        });
        Err(Waiting(n, done))
    }

    /// The connection, opened now if there is none.
    async fn connection(
        &self,
        open: &Open,
        target: &Uri,
    ) -> Result<(u64, SendRequest<B>, bool), BoxError> {
        let Waiting(n, mut done) = match self.current(open, target) {
            Ok((n, sender)) => return Ok((n, sender, false)),
            Err(waiting) => waiting,
        };
        let opened = match done.wait_for(Option::is_some).await {
            Ok(opened) => opened.clone().expect("waited for an outcome"),
            // The attempt's task is gone (it panicked, or the runtime is
            // shutting down).
            Err(_) => Err(ConnectFailed(Arc::new(
                "the connection attempt was dropped".into(),
            ))),
        };
        // The attempt's task installed its outcome already (or died, and
        // the next request starts another).
        match opened {
            Ok(sender) => Ok((n, sender, true)),
            Err(failed) => Err(NotSent::new(failed).into()),
        }
    }

    /// Forgets connection `n` if it is still the shared one.
    fn forget(&self, n: u64) {
        let mut state = self.state.lock();
        if matches!(state.conn, Conn::Open { n: current, .. } if current == n) {
            state.conn = Conn::None;
        }
    }

    /// Sends `req` (absolute-form) on the shared connection. A request the
    /// connection did not take (it was closing) goes to a new one. A
    /// failure to open or use a new connection is [`NotSent`], and so is a
    /// stream the backend refused with `REFUSED_STREAM`, which HTTP/2
    /// guarantees it did not process (RFC 9113, section 8.7).
    ///
    /// A `GOAWAY` does not make a request [`NotSent`], even one whose
    /// stream it left out: hyper also reports a `GOAWAY` that arrives
    /// just after it opened a request's stream (it checks the connection
    /// once more before it sends the body) to that request, whose headers
    /// still go out, and which the backend may then process. The two
    /// errors are alike, and sending the second kind again processed
    /// some POSTs twice in `posts_racing_a_goaway_are_never_processed_twice`.
    ///
    /// A request whose stream a `GOAWAY` without an error (`NO_ERROR`)
    /// ended, on a connection that other requests used before, fails with
    /// [`GoingAway`]: the backend closed the connection in the normal way,
    /// and is not to blame. On a connection opened for the request, it is
    /// the backend's failure, so that one that goes away at every
    /// connection is ejected.
    ///
    /// A response head that does not come within the read timeout of the
    /// request's end (`sent` says when its body was sent) fails the
    /// request, resetting its stream.
    pub(super) async fn send(
        &self,
        open: &Open,
        target: &Uri,
        mut req: Request<B>,
        waits: &Waits,
        sent: &Sent,
        handover: &super::Handover,
    ) -> Result<super::Received, BoxError> {
        loop {
            let (n, mut sender, fresh) = self.connection(open, target).await?;
            if let Err(e) = sender.ready().await {
                self.forget(n);
                if fresh {
                    return Err(NotSent::new(e).into());
                }
                continue;
            }
            handover.handed(true);
            let response = sender.try_send_request(req);
            // A timer of its own: the connection carries many requests.
            let mut timer = None;
            // A client that speaks HTTP/2 may await the response before it
            // sends more; one that speaks HTTP/1 does not.
            let client_paced = timeout::from_http1(sent);
            match timeout::head(
                response,
                waits.read_timeout,
                sent,
                None,
                &mut timer,
                client_paced,
            )
            .await
            {
                Ok(resp) => {
                    let present = super::hop_by_hop(resp.headers());
                    let waits = waits.clone();
                    let sent = sent.clone();
                    let resp = resp.map(|body| ResponseBody::new(body, None, waits, timer, sent));
                    return Ok((resp, present));
                }
                Err(Failed::TimedOut(e)) => return Err(e),
                Err(Failed::Sent(mut e)) => match e.take_message() {
                    Some(back) if !fresh => {
                        self.forget(n);
                        handover.handed(false);
                        req = back;
                    }
                    Some(_) => return Err(NotSent::new(e.into_error()).into()),
                    None => {
                        let e = e.into_error();
                        let h2 = find::<h2::Error>(&e).filter(|h2| h2.is_remote());
                        let going_away = h2.is_some_and(h2::Error::is_go_away);
                        if going_away {
                            // The connection is going away: later requests
                            // go to a new one.
                            self.forget(n);
                        }
                        // On a connection opened for this request, the
                        // backend answered nothing before it went away: as
                        // a backend that keeps doing so, a failure.
                        let graceful = going_away
                            && !fresh
                            && h2.and_then(h2::Error::reason) == Some(h2::Reason::NO_ERROR);
                        let refused = h2.is_some_and(|h2| {
                            h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                        });
                        if refused {
                            return Err(NotSent::new(e).into());
                        }
                        let e = super::pool::sent_error(e, sent);
                        // Not the backend's failure, unless the request's
                        // own body failed.
                        return Err(if graceful && find::<InvalidRequest>(&*e).is_none() {
                            GoingAway::new(e).into()
                        } else {
                            e
                        });
                    }
                },
            }
        }
    }
}

/// The receive window of a connection to a backend: 1 GiB.
const CONNECTION_WINDOW: u32 = 1 << 30;

/// An attempt to open the connection that others wait for.
struct Waiting<B>(u64, watch::Receiver<Opened<B>>);

/// Opens a connection to `target` and starts its task.
async fn connect<B>(
    open: &Open,
    target: Uri,
    keep_alive: Option<Duration>,
    max_header_list: u32,
) -> Result<SendRequest<B>, BoxError>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let io = open(target).await?;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    // Each stream keeps hyper's 2 MiB window, but the connection's is
    // larger than every stream's together (hyper's 5 MiB is not): a few
    // clients that stop reading their downloads hold only their own
    // streams, not every response on the connection (as Go does).
    builder.initial_connection_window_size(CONNECTION_WINDOW);
    builder.max_header_list_size(max_header_list);
    if let Some(interval) = keep_alive {
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(interval)
            .keep_alive_timeout(PING_TIMEOUT);
    }
    let (sender, connection) = builder.handshake(io).await?;
    tokio::spawn(async move {
        // Its end shows in the sender, which is then never used again.
        let _ = connection.await;
    });
    Ok(sender)
}

/// A failure to open a connection, shared by the requests that waited for
/// it.
#[derive(Clone)]
struct ConnectFailed(Arc<BoxError>);

impl fmt::Debug for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectFailed").field(&self.0).finish()
    }
}

impl fmt::Display for ConnectFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("could not open an HTTP/2 connection")
    }
}

impl StdError for ConnectFailed {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&**self.0)
    }
}
