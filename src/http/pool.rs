//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! Each backend address has one [`Upstream`]: a stack of idle connections
//! (the most recently used is taken first, so a few hot connections carry
//! the load and the rest age out) and the [`Connect`] that opens new ones.
//! A request takes an idle connection, or opens one when none is idle, and
//! its connection goes back on the stack as soon as the response has been
//! read to its end: at once when the response has no body left to read,
//! else when the response body is finished. A connection whose response
//! was not read to its end is closed, since HTTP/1.1 cannot tell where the
//! next response would start.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::http::uri::{Authority, Scheme, Uri};
use ::http::{Request, Response};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::rt::{Read, Write};
use parking_lot::Mutex;
use tokio::time::Instant;
use tower_service::Service;

use super::body::ResponseBody;
use crate::error::{BoxError, NotSent};

/// Opens a new connection to the backend a URI names (its scheme and
/// authority) and hands back its sender; the connection itself runs on a
/// task of its own.
pub(super) type Connect<B> = Arc<
    dyn Fn(Uri) -> Pin<Box<dyn Future<Output = Result<SendRequest<B>, BoxError>> + Send>>
        + Send
        + Sync,
>;

/// A [`Connect`] that opens connections with `connector` (any tower
/// service from a URI to a byte stream, such as hyper-util's
/// `HttpConnector`) and speaks HTTP/1.1 on them.
pub(super) fn connect_with<B, C>(connector: C) -> Connect<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: Read + Write + Unpin + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    Arc::new(move |uri| {
        let mut connector = connector.clone();
        Box::pin(async move {
            poll_fn(|cx| connector.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let io = connector.call(uri).await.map_err(Into::into)?;
            let (sender, connection) = http1::handshake(io).await?;
            tokio::spawn(async move {
                // Its end (the backend closed it, or a response was
                // abandoned) shows in the sender, which is then never reused.
                let _ = connection.await;
            });
            Ok(sender)
        })
    })
}

/// `connect`, failing with a timed-out I/O error when it takes longer than
/// `limit`.
pub(super) fn within<B: 'static>(connect: Connect<B>, limit: Duration) -> Connect<B> {
    Arc::new(move |uri| {
        let opening = connect(uri);
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
    connect: Connect<B>,
    idle_timeout: Duration,
    by_target: Mutex<HashMap<Uri, Weak<Upstream<B>>>>,
}

impl<B> Upstreams<B> {
    pub(super) fn new(connect: Connect<B>, idle_timeout: Duration) -> Self {
        Upstreams {
            connect,
            idle_timeout,
            by_target: Mutex::new(HashMap::new()),
        }
    }

    #[cfg(test)]
    pub(super) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
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
        let mut map = self.by_target.lock();
        if let Some(upstream) = map.get(&target).and_then(Weak::upgrade) {
            return upstream;
        }
        map.retain(|_, u| u.strong_count() > 0);
        let upstream = Arc::new(Upstream {
            connect: self.connect.clone(),
            target: target.clone(),
            idle_timeout: self.idle_timeout,
            idle: Mutex::new(VecDeque::new()),
        });
        map.insert(target, Arc::downgrade(&upstream));
        upstream
    }
}

/// One backend address: its idle connections and how to open more.
pub(super) struct Upstream<B> {
    connect: Connect<B>,
    target: Uri,
    idle_timeout: Duration,
    idle: Mutex<VecDeque<Idle<B>>>,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<B> Upstream<B> {
    /// The most recently used idle connection that is ready for a request.
    /// Closed connections met on the way are dropped, and so are those idle
    /// too long (with all older ones); one still busy (the backend answered
    /// before the request body was all sent) is left for later rather than
    /// waited for.
    fn checkout(&self) -> Option<SendRequest<B>> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let mut at = idle.len();
        while at > 0 {
            at -= 1;
            let Idle { sender, since } = &idle[at];
            if now.duration_since(*since) >= self.idle_timeout {
                // In order of checkin: everything before is older still.
                idle.drain(..=at);
                return None;
            }
            if sender.is_closed() {
                idle.remove(at);
            } else if sender.is_ready() {
                return idle.remove(at).map(|i| i.sender);
            }
        }
        None
    }

    /// Puts a connection whose last response was read to its end back on
    /// the stack, and closes those idle for longer than the idle timeout
    /// (they are at the bottom).
    fn checkin(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }
}

impl<B> Upstream<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Sends `req` (origin-form, with its `Host`) on an idle connection, or
    /// on a new one. A request that an idle connection did not take (the
    /// backend had closed it meanwhile) is given to the next connection; a
    /// failure to open or use a new connection is [`NotSent`].
    pub(super) async fn send(
        self: Arc<Self>,
        mut req: Request<B>,
    ) -> Result<Response<ResponseBody>, BoxError> {
        loop {
            let (mut sender, fresh) = match self.checkout() {
                Some(sender) => (sender, false),
                None => (
                    (self.connect)(self.target.clone())
                        .await
                        .map_err(NotSent::new)?,
                    true,
                ),
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Err(NotSent::new(e).into());
                }
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let pooled = if sender.is_ready() {
                        // The response is already read to its end.
                        self.checkin(sender);
                        None
                    } else {
                        Some(Box::new(Pooled {
                            upstream: self,
                            sender,
                        }) as Box<dyn Checkin>)
                    };
                    return Ok(resp.map(|body| ResponseBody::new(body, pooled)));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => req = back,
                    Some(_) => return Err(NotSent::new(e.into_error()).into()),
                    None => return Err(e.into_error().into()),
                },
            }
        }
    }
}

/// A connection lent to a response body until it is read to its end.
struct Pooled<B> {
    upstream: Arc<Upstream<B>>,
    sender: SendRequest<B>,
}

/// What a [`ResponseBody`] holds to give its connection back.
pub(super) trait Checkin: Send + Sync {
    fn checkin(self: Box<Self>);
}

impl<B: Send + 'static> Checkin for Pooled<B> {
    fn checkin(self: Box<Self>) {
        self.upstream.checkin(self.sender);
    }
}
