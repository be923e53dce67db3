//! Keep-alive HTTP/1.1 connections to one backend.
//!
//! Each backend address has one [`Upstream`]: a stack of idle connections
//! (the most recently used is taken first, so a few hot connections carry
//! the load and the rest age out) and the connector that opens new ones.
//! A request takes an idle connection, or opens one when none is idle, and
//! its connection goes back on the stack as soon as the response has been
//! read to its end: at once when the response has no body left to read,
//! else when the response body is finished. A connection whose response
//! was not read to its end is closed, since HTTP/1.1 cannot tell where the
//! next response would start.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::http::uri::{Authority, Uri};
use ::http::{Request, Response};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower_service::Service;

use super::body::ResponseBody;
use crate::error::{BoxError, NotSent};

/// The upstreams of one [`HttpClient`](super::HttpClient), by authority.
pub(super) struct Upstreams<B> {
    connector: HttpConnector,
    idle_timeout: Duration,
    by_authority: Mutex<HashMap<Authority, Weak<Upstream<B>>>>,
}

impl<B> Upstreams<B> {
    pub(super) fn new(connector: HttpConnector, idle_timeout: Duration) -> Self {
        Upstreams {
            connector,
            idle_timeout,
            by_authority: Mutex::new(HashMap::new()),
        }
    }

    #[cfg(test)]
    pub(super) fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The upstream for `authority`, shared by every backend naming it
    /// while any of them lives; its idle connections close with the last.
    pub(super) fn get(&self, authority: &Authority) -> Arc<Upstream<B>> {
        let mut map = self.by_authority.lock();
        if let Some(upstream) = map.get(authority).and_then(Weak::upgrade) {
            return upstream;
        }
        map.retain(|_, u| u.strong_count() > 0);
        let upstream = Arc::new(Upstream {
            connector: self.connector.clone(),
            target: Uri::builder()
                .scheme("http")
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .expect("an http URI from a valid authority"),
            idle_timeout: self.idle_timeout,
            idle: Mutex::new(VecDeque::new()),
        });
        map.insert(authority.clone(), Arc::downgrade(&upstream));
        upstream
    }
}

/// One backend address: its idle connections and how to open more.
pub(super) struct Upstream<B> {
    connector: HttpConnector,
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
    async fn connect(&self) -> Result<SendRequest<B>, BoxError> {
        let io = self.connector.clone().call(self.target.clone()).await?;
        let (sender, connection) = http1::handshake(io).await?;
        tokio::spawn(async move {
            // Its end (the backend closed it, or a response was abandoned)
            // shows in the sender, which is then never reused.
            let _ = connection.await;
        });
        Ok(sender)
    }

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
                None => (self.connect().await.map_err(NotSent::new)?, true),
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
