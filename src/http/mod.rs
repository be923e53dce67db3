//! A backend [`Service`] that proxies requests to an HTTP server: the piece
//! that turns tower-ha into a reverse proxy (feature `hyper-client`).
//!
//! [`HttpBackend`] sends each request to one base URI over a shared,
//! pooled HTTP/1.1 client ([`HttpClient`]), on plain TCP connections by
//! default, or on whatever a connector of yours opens
//! ([`HttpClient::with_connector`]: TLS for `https://` backends, a Unix
//! socket, ...):
//!
//! * the scheme and authority are rewritten to the backend's (a path prefix
//!   of the base URI is prepended to the request's path);
//! * `Host` is set to the backend's authority (or to the host the client
//!   asked for, with [`HttpBackend::preserve_host`]);
//! * the client's address ([`PeerAddr`]) is appended to `X-Forwarded-For`,
//!   which is created when absent, and `X-Forwarded-Proto` and
//!   `X-Forwarded-Host` are set to the client's scheme
//!   ([`ClientScheme`]) and the host it asked for, replacing the client's
//!   own unless they come from a proxy you trust
//!   ([`HttpBackend::trust_forwarded_headers`]); RFC 7239's `Forwarded`
//!   is sent too with [`HttpBackend::forwarded_header`];
//! * hop-by-hop headers (`Connection` and the headers it names,
//!   `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`,
//!   `Upgrade`, the next proxy's credentials `Proxy-Authorization`
//!   and `Proxy-Authenticate`, and `Proxy`, which no standard defines and
//!   CGI programs read as their own proxy, "httpoxy") are not forwarded,
//!   in either direction
//!   (but for what a proxied protocol upgrade needs), but `TE: trailers`
//!   is sent on, and `Trailer` is forwarded, so the trailer fields it
//!   announces pass both ways (hyper's HTTP/1 side writes only those),
//!   cleaned (without the hop-by-hop fields, `Host`, `Content-Length` and
//!   the fields proxies set); nor is `Expect`, which the client's side has
//!   answered;
//! * a message framed by chunks (`Transfer-Encoding: chunked`) goes on
//!   without a `Content-Length` beside them, in either direction (RFC 9112
//!   section 6.3);
//! * protocol upgrades (WebSocket, for one) are proxied: see
//!   [below](#protocol-upgrades-websocket);
//! * `CONNECT` is refused with [`InvalidRequest`]: it asks a forward
//!   proxy for a tunnel to another host; so is a request with two `Host`
//!   lines, which RFC 9112 has a server refuse;
//! * under a base path, dot segments of the request's path are resolved
//!   before it is appended, and a path hiding a separator (`%2F`, `%5C`, a
//!   backslash, `..;`) is refused, so a request cannot leave the base path;
//!   `OPTIONS *` is refused there too (without a base path it is forwarded
//!   as it is); a refused request fails with [`InvalidRequest`], the
//!   client's error (`400 Bad Request` from
//!   [`gateway_status`](crate::error::gateway_status)), not the backend's:
//!   it is neither failed over nor counted by passive health;
//! * a failure to connect comes back as [`NotSent`](crate::NotSent), so
//!   the failover layer may retry any method on another backend;
//! * requests go out as HTTP/1.1 on kept-alive connections, whatever
//!   version the client spoke, or as HTTP/2 on one multiplexed connection
//!   per backend ([`HttpClient::http2_only`], feature `http2`: gRPC
//!   backends, for one);
//! * bodies stream both ways.
//!
//! [`HttpClient`]'s defaults: connects time out after 5 s
//! ([`connect_timeout`](HttpClient::connect_timeout)), TCP keep-alive
//! probes start after 30 s of silence
//! ([`tcp_keepalive`](HttpClient::tcp_keepalive)), a pooled HTTP/1
//! connection idle for 60 s is closed (an HTTP/2 one is replaced at its
//! next use; [`idle_timeout`](HttpClient::idle_timeout):
//! keep it below the backends' own keep-alive timeout), or one second
//! before the keep-alive timeout a backend announces
//! (`Keep-Alive: timeout=N`) when that comes first, and a backend that
//! sends nothing for 60 s while its response is awaited, its head or the
//! rest of its body, fails the request with a timeout
//! ([`read_timeout`](HttpClient::read_timeout)). The failover layer's
//! [`per_try_timeout`](crate::failover::FailoverLayer::per_try_timeout) and
//! [`deadline`](crate::failover::FailoverLayer::deadline) end at the
//! response head: only the read timeout bounds a backend that stops in the
//! middle of a response body, and such a response, already returned, is
//! not failed over (its client gets it cut short).
//!
//! ```no_run
//! # async fn doc() -> Result<(), tower_ha::BoxError> {
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::ServiceExt;
//! use tower_ha::balance::{Balance, RoundRobin};
//! use tower_ha::http::{HttpBackend, HttpClient};
//! use tower_ha::Pool;
//!
//! let client = HttpClient::<Full<Bytes>>::new();
//! let pool = Pool::new();
//! pool.insert("a", HttpBackend::new(&client, "http://127.0.0.1:8081")?);
//! pool.insert("b", HttpBackend::new(&client, "http://127.0.0.1:8082")?);
//! let balance = Balance::new(pool, RoundRobin::new());
//! let resp = balance.oneshot(http::Request::new(Full::new(Bytes::new()))).await?;
//! println!("{}", resp.status());
//! # Ok(()) }
//! ```
//!
//! # Protocol upgrades (WebSocket)
//!
//! An HTTP/1.1 request asking to switch protocols (`Upgrade: websocket`
//! with `Connection: upgrade`) is sent on with those two headers, on a
//! pooled connection as any request is. When the backend agrees (`101
//! Switching Protocols`), the client's connection and the backend's are
//! joined, and bytes are copied both ways until both ends have closed; an
//! end closed on one side is closed on the other, and the backend's
//! connection never goes back to the pool. When it declines, its response
//! goes back as any other, the client's connection stays HTTP, and so
//! does the backend's, which goes back to the pool. A
//! `101` that names no protocol, or one the request did not offer, fails
//! the request (`502 Bad Gateway` from
//! [`gateway_status`](crate::error::gateway_status)), and so does a `101`
//! to a request that did not ask for a switch.
//!
//! * The client's connection must be hyper's, served with upgrades
//!   (hyper's `serve_connection(..).with_upgrades()`, hyper-util's
//!   `serve_connection_with_upgrades`, as axum serves): hyper puts in the
//!   request what hands that connection over (an `OnUpgrade` extension).
//!   It does so on a connection served without upgrades too, where the
//!   client then gets the `101` and its connection closes: serve with
//!   upgrades. A request without `OnUpgrade` (an in-process caller's)
//!   goes on as a plain request, without `Upgrade`, and so does one
//!   offering `h2c` (a switch to HTTP/2 would hide the requests that
//!   follow from the proxy), and one with a body (a `Content-Length`
//!   other than 0, or chunked), which would hold the switch until its
//!   upload ends.
//! * A `101` is final: the failover layer returns it, whatever its
//!   classifier says, since the client's connection goes to that
//!   backend.
//! * When the `101` does not reach the client (a layer above answered
//!   something else), the backend's connection is closed 10 s later
//!   (or after the [`tunnel_idle_timeout`](HttpClient::tunnel_idle_timeout),
//!   when shorter).
//! * Balancing, failover, stickiness and health apply to the request
//!   that asks for the switch: a backend that refuses the connection is
//!   failed over from, a WebSocket session keyed by a cookie goes to its
//!   backend. Once switched, the tunnel counts as a request in flight on
//!   its backend until it ends (see
//!   [`BackendState::hold_in_flight`](crate::BackendState::hold_in_flight)),
//!   so least-request balancing spreads open WebSockets as nginx's
//!   `least_conn` does. A per-try timeout does not end a tunnel, and
//!   removing, draining or disabling its backend leaves it open. It ends
//!   when its client or its backend closes it, when nothing has moved
//!   either way for the
//!   [`tunnel_idle_timeout`](HttpClient::tunnel_idle_timeout) (default
//!   1 h), which also ends a tunnel whose client vanished without
//!   closing, at the end of its backend's drain (its deadline), when the
//!   probes mark its backend down with
//!   [`HealthChecker::close_tunnels_when_down`](crate::health::HealthChecker::close_tunnels_when_down),
//!   or when
//!   told ([`BackendState::close_tunnels`](crate::BackendState::close_tunnels),
//!   `Handle::close_tunnels`, the admin API's `close_tunnels`). TCP keep-alive ([`HttpClient::tcp_keepalive`], or a
//!   connector's own) finds a backend that vanished sooner.
//! * An HTTP/2 client ([`HttpClient::http2_only`]) sends such a request on
//!   as a plain one (RFC 8441's WebSocket over HTTP/2 is not spoken).
// Without the feature, links to what `http2` adds point at `HttpClient`.
#![cfg_attr(
    feature = "http2",
    doc = "",
    doc = "[`HttpClient::http2_only`]: HttpClient::http2_only"
)]
#![cfg_attr(
    not(feature = "http2"),
    doc = "",
    doc = "[`HttpClient::http2_only`]: HttpClient"
)]

mod body;
#[cfg(feature = "http2")]
mod http2;
mod pool;
mod send_timeout;
mod stall;
mod sweep;
mod timeout;
mod tunnel;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ::http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, COOKIE, EXPECT, FORWARDED, HOST, LOCATION,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use ::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use ::http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::connect::HttpConnector;
use pin_project_lite::pin_project;
use tower_service::Service;

pub use body::ResponseBody;
pub use send_timeout::SendTimeout;

use crate::backend::BackendState;
use crate::error::{BoxError, InvalidRequest};
use crate::extensions::{ClientScheme, PeerAddr, Picked, Target};
use crate::key::list_elements as elements;

/// A pooled HTTP/1.1 client shared by many [`HttpBackend`]s: connections
/// are kept alive and reused per backend address. (With
/// [`http2_only`], each backend has one HTTP/2
/// connection instead, see there.)
///
/// A request takes the backend's most recently used idle connection, or
/// opens one when none is idle, so a backend gets about as many connections
/// as it has requests in flight at the busiest moment. A connection goes
/// back to the pool when its response body, read to its end, is dropped
/// (a server drops it as soon as it has passed it on); one whose response
/// body was dropped unread is closed. A request that an
/// idle connection did not take (the backend had closed it meanwhile) goes
/// to the next one. A backend that closes an idle connection just as a
/// request is written on it fails that request, though, and not as
/// [`NotSent`](crate::NotSent) (the backend may have read it): the failover
/// layer retries it only when its method is idempotent. An
/// [`idle_timeout`](Self::idle_timeout) below the backends' own keep-alive
/// timeout makes that rare, and so does heeding the timeout a backend
/// announces (`Keep-Alive: timeout=N`, see
/// [`idle_timeout`](Self::idle_timeout)). HTTP/1 connections idle for
/// longer are closed as their time passes (an HTTP/2 connection idle that
/// long is replaced at its next use), and all of a backend's when the last
/// [`HttpBackend`] for its address is dropped.
///
/// | Setting | Default |
/// |---|---|
/// | [`connect_timeout`](Self::connect_timeout) | 5 s |
/// | [`tcp_keepalive`](Self::tcp_keepalive) | 30 s |
/// | [`idle_timeout`](Self::idle_timeout) | 60 s |
/// | [`read_timeout`](Self::read_timeout) | 60 s |
/// | [`send_timeout`](Self::send_timeout) | 60 s |
/// | [`tunnel_idle_timeout`](Self::tunnel_idle_timeout) | 1 h |
/// | [`discard_timeout`](Self::discard_timeout) | 30 s |
///
/// TCP_NODELAY is set on every connection the client opens itself (a
/// client [`with_connector`](Self::with_connector) leaves socket options
/// to its connector). The settings apply to the
/// backends made from the client once they are set: a client changed by
/// one has a connection pool of its own, which the backends made from it
/// before do not share.
///
/// `B` is the request body type (for example `http_body_util::Full<Bytes>`,
/// `hyper::body::Incoming` in a proxy, or the failover layer's replayable
/// body).
#[cfg_attr(feature = "http2", doc = "", doc = "[`http2_only`]: Self::http2_only")]
#[cfg_attr(not(feature = "http2"), doc = "", doc = "[`http2_only`]: Self")]
pub struct HttpClient<B> {
    settings: Settings,
    /// The connector given to [`with_connector`](Self::with_connector),
    /// without the connect timeout; `None` for hyper-util's `HttpConnector`.
    custom: Option<pool::Open>,
    upstreams: Arc<pool::Upstreams<B>>,
}

/// How an [`HttpClient`] opens and keeps its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Settings {
    connect_timeout: Duration,
    tcp_keepalive: Option<Duration>,
    idle_timeout: Duration,
    read_timeout: Option<Duration>,
    /// How long a response body may wait for its reader.
    send_timeout: Option<Duration>,
    tunnel_idle_timeout: Option<Duration>,
    /// How long the rest of an HTTP/1 upload given up is read and dropped.
    discard_timeout: Option<Duration>,
    /// Over HTTP/1.1, the most header lines a response may have; `None`:
    /// hyper's 100.
    max_response_headers: Option<usize>,
    /// The most bytes a response's head may take.
    max_response_header_size: usize,
    http2: bool,
    /// With HTTP/2: the silence after which a PING is sent.
    #[cfg_attr(not(feature = "http2"), allow(dead_code))]
    http2_keep_alive: Option<Duration>,
}

/// The most header lines [`HttpClient::max_response_headers`] takes: hyper
/// makes room for all of them at every read of a response head.
const MAX_RESPONSE_HEADERS: usize = 32_767;

impl Settings {
    const DEFAULT: Settings = Settings {
        // Envoy's default `connect_timeout`.
        connect_timeout: Duration::from_secs(5),
        // Go's `http.DefaultTransport`'s.
        tcp_keepalive: Some(Duration::from_secs(30)),
        // Below nginx's `keepalive_timeout` (75 s), which it does not
        // announce.
        idle_timeout: Duration::from_secs(60),
        // nginx's `proxy_read_timeout`.
        read_timeout: Some(Duration::from_secs(60)),
        // nginx's `send_timeout`.
        send_timeout: Some(Duration::from_secs(60)),
        // HAProxy's documented `timeout tunnel` for WebSockets.
        tunnel_idle_timeout: Some(Duration::from_secs(3600)),
        // nginx's `lingering_time`.
        discard_timeout: Some(Duration::from_secs(30)),
        max_response_headers: None,
        // Envoy's `max_response_headers_kb` (60 KiB), about; as the front
        // of `examples/reverse_proxy.rs` takes request heads.
        max_response_header_size: 64 * 1024,
        http2: false,
        http2_keep_alive: Some(Duration::from_secs(30)),
    };

    fn http_connector(&self) -> HttpConnector {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        connector.set_connect_timeout(Some(self.connect_timeout).filter(|t| !t.is_zero()));
        connector.set_keepalive(self.tcp_keepalive);
        // Probes as often as the idle time before the first, as Go does,
        // rather than the system's default (75 s on Linux).
        connector.set_keepalive_interval(self.tcp_keepalive);
        connector
    }
}

impl<B> Clone for HttpClient<B> {
    fn clone(&self) -> Self {
        HttpClient {
            settings: self.settings,
            custom: self.custom.clone(),
            upstreams: self.upstreams.clone(),
        }
    }
}

impl<B> fmt::Debug for HttpClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Settings {
            connect_timeout,
            tcp_keepalive,
            idle_timeout,
            read_timeout,
            send_timeout,
            tunnel_idle_timeout,
            discard_timeout,
            max_response_headers,
            max_response_header_size,
            http2,
            http2_keep_alive: _,
        } = &self.settings;
        let mut f = f.debug_struct("HttpClient");
        f.field("connect_timeout", connect_timeout);
        match self.custom {
            None => f.field("tcp_keepalive", tcp_keepalive),
            Some(_) => f.field("connector", &"custom"),
        };
        f.field("idle_timeout", idle_timeout)
            .field("read_timeout", read_timeout)
            .field("send_timeout", send_timeout)
            .field("tunnel_idle_timeout", tunnel_idle_timeout)
            .field("discard_timeout", discard_timeout)
            .field("max_response_headers", max_response_headers)
            .field("max_response_header_size", max_response_header_size)
            .field("http2", http2)
            .finish_non_exhaustive()
    }
}

impl<B> HttpClient<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A client with the default settings (see the table above), which
    /// opens plain TCP connections with hyper-util's `HttpConnector`.
    pub fn new() -> Self {
        HttpClient::with_settings(Settings::DEFAULT, None)
    }

    /// A client that opens its connections with `connector`: any tower
    /// service from a backend's URI (its scheme and authority, path `/`)
    /// to a byte stream, such as a TLS connector (hyper-rustls's or
    /// hyper-tls's `HttpsConnector`) for `https://` backends, or a
    /// connection over a Unix socket. The client speaks HTTP/1.1 on what
    /// it opens (HTTP/2 with [`http2_only`]), so a TLS
    /// connector must offer that protocol alone in ALPN (hyper-rustls:
    /// `enable_http1()` or `enable_http2()`, not both).
    ///
    /// Backends made from such a client may be `http://` or `https://`. The
    /// [`connect_timeout`](Self::connect_timeout) (default 5 s) bounds the
    /// connector's whole call, a TLS handshake included, and a connector
    /// that fails or times out fails its request as
    /// [`NotSent`](crate::NotSent). [`tcp_keepalive`](Self::tcp_keepalive)
    /// is the connector's to set, and is ignored here.
    ///
    /// ```
    /// # #[cfg(unix)] fn doc() -> Result<(), tower_ha::http::InvalidBackendUri> {
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use hyper_util::rt::TokioIo;
    /// use tokio::net::UnixStream;
    /// use tower_ha::http::{HttpBackend, HttpClient};
    ///
    /// // An application server listening on a Unix socket.
    /// let client = HttpClient::<Full<Bytes>>::with_connector(tower::service_fn(
    ///     |_backend: http::Uri| async {
    ///         UnixStream::connect("/run/app/http.sock").await.map(TokioIo::new)
    ///     },
    /// ));
    /// // The authority is what the backend is sent in `Host`.
    /// let backend = HttpBackend::new(&client, "http://app.internal")?;
    /// # drop(backend); Ok(()) }
    /// ```
    #[cfg_attr(feature = "http2", doc = "", doc = "[`http2_only`]: Self::http2_only")]
    #[cfg_attr(not(feature = "http2"), doc = "", doc = "[`http2_only`]: Self")]
    pub fn with_connector<C>(connector: C) -> Self
    where
        C: Service<Uri> + Clone + Send + 'static,
        C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        C::Future: Send + 'static,
        C::Error: Into<BoxError>,
    {
        let custom = pool::open_other(connector);
        HttpClient::with_settings(Settings::DEFAULT, Some(custom))
    }

    fn with_settings(settings: Settings, custom: Option<pool::Open>) -> Self {
        let open = match &custom {
            // `HttpConnector` shares the connect timeout among the
            // addresses a name resolves to.
            None => pool::open_tcp(settings.http_connector()),
            Some(custom) => pool::within(custom.clone(), settings.connect_timeout),
        };
        HttpClient {
            settings,
            custom,
            upstreams: Arc::new(pool::Upstreams::new(open, settings)),
        }
    }

    /// Gives up opening a connection after `timeout` (default 5 s, as
    /// Envoy's `connect_timeout`). The time is shared evenly among the
    /// addresses a backend's host name resolves to; the name's resolution
    /// is not counted. A connection that timed out fails its request as
    /// [`NotSent`](crate::NotSent): nothing was sent, so the failover layer
    /// may retry it on another backend whatever its method. Zero for no
    /// limit but the operating system's (about two minutes on Linux).
    pub fn connect_timeout(self, timeout: Duration) -> Self {
        HttpClient::with_settings(
            Settings {
                connect_timeout: timeout,
                ..self.settings
            },
            self.custom,
        )
    }

    /// Sends TCP keep-alive probes on a connection idle for `idle`, and
    /// again every `idle` while none is answered (the system decides how
    /// many, 9 on Linux, before the connection is closed); `None` sends
    /// none. The default, 30 s (as Go's `http.DefaultTransport`), ends a
    /// connection whose backend vanished without closing it (a crashed
    /// host, a dropped NAT or firewall entry) within about 5 minutes, where
    /// a request waiting on it would otherwise wait for ever, and keeps a
    /// NAT or firewall entry alive while its connection is idle.
    ///
    /// The kernel counts in whole seconds up to 32,767: a shorter `idle`
    /// counts as 1 s, a longer one as 32,767 s, and zero as `None` (a value
    /// the kernel refused would leave its defaults, 2 hours on Linux).
    pub fn tcp_keepalive(self, idle: Option<Duration>) -> Self {
        const LONGEST: Duration = Duration::from_secs(i16::MAX as u64);
        let idle = idle
            .filter(|d| !d.is_zero())
            .map(|d| d.clamp(Duration::from_secs(1), LONGEST));
        HttpClient::with_settings(
            Settings {
                tcp_keepalive: idle,
                ..self.settings
            },
            self.custom,
        )
    }

    /// Closes a pooled HTTP/1 connection once it has been idle for
    /// `timeout` (default 60 s; zero keeps none). Keep it below the
    /// backends' own keep-alive timeout (75 s for nginx), so that a backend
    /// seldom closes a connection just as a request is written on it.
    ///
    /// A backend that announces its keep-alive timeout in a response
    /// (`Keep-Alive: timeout=N`, as Apache httpd and Node.js do, with N = 5
    /// by default) has that connection kept one second less than it
    /// announced, when that is shorter than `timeout`, and not at all when
    /// it announced 1 s or less (HTTP/1.1 only).
    ///
    /// An HTTP/2 connection ([`http2_only`]) is not
    /// closed when its time passes: it stays open until the next request,
    /// which finds that none was sent on it for `timeout` and opens a new
    /// one in its place (the old one closes once its last request is
    /// done). With zero, no open HTTP/2 connection is reused: each request
    /// opens a new one, or shares one still being opened.
    #[cfg_attr(feature = "http2", doc = "", doc = "[`http2_only`]: Self::http2_only")]
    #[cfg_attr(not(feature = "http2"), doc = "", doc = "[`http2_only`]: Self")]
    pub fn idle_timeout(self, timeout: Duration) -> Self {
        HttpClient::with_settings(
            Settings {
                idle_timeout: timeout,
                ..self.settings
            },
            self.custom,
        )
    }

    /// Takes HTTP/1.1 responses of up to `lines` header lines (default 100,
    /// hyper's). A response with more fails as the backend's (a `502`, and
    /// a failure of its health); raise the limit for backends that send
    /// many (a hundred `Set-Cookie` lines). Above 100, hyper keeps each
    /// response's headers on the heap instead of the stack, in room for
    /// `lines` made at every read of a head: at most 32,767 (HAProxy's
    /// bound on `tune.http.maxhdr`); zero keeps the default.
    pub fn max_response_headers(self, lines: usize) -> Self {
        HttpClient::with_settings(
            Settings {
                max_response_headers: (lines > 0).then_some(lines.min(MAX_RESPONSE_HEADERS)),
                ..self.settings
            },
            self.custom,
        )
    }

    /// Takes responses whose heads take up to `bytes` (default 64 KiB): over
    /// HTTP/1.1 the status line and the header lines (and, alike, the
    /// trailers of a chunked body), over HTTP/2 the header list as
    /// `SETTINGS_MAX_HEADER_LIST_SIZE` counts it (announced to the
    /// backend). A larger head fails as the backend's (a `502`, and a
    /// failure of its health), so that a broken or hostile backend cannot
    /// make the proxy hold and copy heads of hundreds of kilobytes (hyper's
    /// own bound over HTTP/1.1 is its read buffer, about 400 KiB). At least
    /// 8 KiB.
    pub fn max_response_header_size(self, bytes: usize) -> Self {
        HttpClient::with_settings(
            Settings {
                max_response_header_size: bytes.max(8 * 1024),
                ..self.settings
            },
            self.custom,
        )
    }

    /// Gives up on a backend that sends nothing for `timeout` while its
    /// response is awaited (default 60 s, as nginx's `proxy_read_timeout`;
    /// `None`, or zero, waits without limit): the response head, counted
    /// from the end of the request (its body sent: over HTTP/1.1, written
    /// to the connection, as fast as the backend reads it, which for a
    /// body in one large frame comes well after hyper took it; while the
    /// upload still moves, from its latest frame taken or write, so an
    /// upload that stands still
    /// times out within two timeouts; over HTTP/1, an upload that stands
    /// still because the client sends nothing more fails as the client's,
    /// an [`InvalidRequest`] that `gateway_status` answers with `408
    /// Request Timeout` and nothing retries or counts against the
    /// backend), and each frame of the
    /// response body, counted from the moment the body is polled and its
    /// next frame is not there yet. A backend that stops in the middle of
    /// a response is then left, instead of holding the connection, the
    /// body's reader and the request's count in flight (see
    /// [`BackendState::hold_in_flight`](crate::BackendState::hold_in_flight))
    /// for as long as it stays silent.
    ///
    /// For the head, the time counts until the whole head has come: what
    /// comes before it does not extend it, neither interim responses
    /// (`100 Continue`, `103 Early Hints`, which hyper reads and drops) nor
    /// the first bytes of a head sent slowly, so that a backend cannot
    /// hold a request with either. (nginx's `proxy_read_timeout` counts
    /// between two reads, so its upstream can.)
    ///
    /// When it passes, the request (or the response body) fails with an
    /// I/O error of kind `TimedOut` in its chain of sources, which
    /// [`gateway_status`](crate::error::gateway_status) answers with
    /// `504 Gateway Timeout`; a response head that timed out is not
    /// [`NotSent`](crate::NotSent) (the backend has the request), so the
    /// failover layer retries it only when its method is idempotent. An
    /// HTTP/1.1 connection is then closed, never reused; over HTTP/2 only
    /// the request's stream is reset, and the connection goes on serving
    /// the others (its PINGs, see
    /// [`http2_keep_alive`], find one that died).
    /// A body that has already been
    /// returned cannot be failed over: its client gets a response cut short.
    ///
    /// Keep it above the longest time a backend may think before it
    /// answers (a slow report, a long poll); the failover layer's
    /// [`per_try_timeout`](crate::failover::FailoverLayer::per_try_timeout)
    /// and [`deadline`](crate::failover::FailoverLayer::deadline) bound the
    /// wait for a response head from the start of each attempt, this from
    /// the end of the request's upload, and the silence within its body. A switched connection (a WebSocket) has the
    /// [`tunnel_idle_timeout`](Self::tunnel_idle_timeout) instead.
    #[cfg_attr(
        feature = "http2",
        doc = "",
        doc = "[`http2_only`]: Self::http2_only",
        doc = "[`http2_keep_alive`]: Self::http2_keep_alive"
    )]
    #[cfg_attr(
        not(feature = "http2"),
        doc = "",
        doc = "[`http2_only`]: Self",
        doc = "[`http2_keep_alive`]: Self"
    )]
    pub fn read_timeout(self, timeout: Option<Duration>) -> Self {
        HttpClient::with_settings(
            Settings {
                read_timeout: timeout.filter(|t| !t.is_zero()),
                ..self.settings
            },
            self.custom,
        )
    }

    /// Gives up a response whose reader has left the frame of its body it
    /// was handed for `timeout` (default 60 s, as nginx's `send_timeout`;
    /// `None`, or zero, waits without limit): the body drops its
    /// connection (an HTTP/1.1 connection is closed, an HTTP/2 stream
    /// reset) and the request no longer counts as in flight (see
    /// [`BackendState::hold_in_flight`](crate::BackendState::hold_in_flight)),
    /// and its next poll fails with an I/O error of kind `TimedOut`, so
    /// the server cuts the client's response short (over HTTP/2, once the
    /// client takes data again or its connection ends: until then the
    /// server holds the stream and the frame it was sending, but nothing
    /// of the backend's).
    ///
    /// A server forwarding a body asks for its next frame once it can send
    /// the last one. A client that stops reading (an HTTP/2 client that
    /// grants the stream no more flow-control window, an HTTP/1 client
    /// whose socket no longer drains) leaves the body waiting with a frame
    /// out, holding its backend's connection and its place against the
    /// backend's `max_in_flight`, for as long as the client wants: a few
    /// such clients could fill every backend's limit. Only that wait
    /// counts, one frame at a time, and with a send timeout a body hands
    /// its data out in frames of at most 16 KiB (the connection reads up
    /// to about 500 KiB at once): a slow client that keeps reading is not
    /// cut off as long as it takes in 16 KiB within the timeout (about
    /// 270 bytes a second with 60 s). Nor is a body waiting for its backend
    /// (the [`read_timeout`](Self::read_timeout) bounds that), nor one
    /// whose server has not asked for its first frame yet: a server that
    /// waits for the client's flow-control window before it asks escapes
    /// the timeout, which is why the crate needs hyper 1.10 or later (its
    /// HTTP/2 server asks first, and a client that never grants any window
    /// leaves that first frame out). A body read in
    /// a program rather than sent on is given up alike if the program
    /// leaves a frame for longer: set `None` for a client whose programs
    /// read bodies at their own pace.
    ///
    /// A body that handed out a frame before its end is watched by one
    /// task per client, which looks every quarter of the timeout (every
    /// second at most): a body is given up between the timeout and a
    /// second after. A response whose end comes with its first frame
    /// (most short responses with a length) is never watched; a chunked or
    /// gRPC one is, until it ends. This bounds the responses of HTTP/2
    /// clients, which a [`SendTimeout`] on the connection does not.
    pub fn send_timeout(self, timeout: Option<Duration>) -> Self {
        HttpClient::with_settings(
            Settings {
                send_timeout: timeout.filter(|t| !t.is_zero()),
                ..self.settings
            },
            self.custom,
        )
    }

    /// Closes a tunnel (a connection switched to another protocol, such as
    /// a WebSocket: see [the module's documentation](self#protocol-upgrades-websocket))
    /// once no byte has come from its client or its backend for `timeout`
    /// (default 1 h, as HAProxy's documentation sets `timeout tunnel`);
    /// `None` (or zero) leaves tunnels open until an end closes them. This
    /// ends tunnels whose client vanished without closing, which nothing
    /// else here would notice, so that they stop holding a backend
    /// connection and counting as in flight. Keep it above the interval at
    /// which the protocol pings (WebSocket applications commonly ping every
    /// 30 to 60 s); nginx's 60 s default (`proxy_read_timeout`) closes
    /// quiet WebSockets that ping less often.
    ///
    /// Waiting for the client's side of a tunnel after the backend has
    /// switched (see the module's documentation) is bounded by the shorter
    /// of this and 10 s.
    pub fn tunnel_idle_timeout(self, timeout: Option<Duration>) -> Self {
        HttpClient::with_settings(
            Settings {
                tunnel_idle_timeout: timeout.filter(|t| !t.is_zero()),
                ..self.settings
            },
            self.custom,
        )
    }

    /// Reads the rest of an upload that a backend's connection gave up in
    /// the middle, and drops it, for at most `timeout` (default 30 s, as
    /// nginx's `lingering_time`); `None` (or zero) drops it unread.
    ///
    /// A backend may answer before it has read a request's whole body (a
    /// `413` or a `401` to a large upload) and close the connection; or it
    /// fails, or the failover layer abandons the attempt, in the middle of
    /// the upload. A hyper HTTP/1 server in front that finds the request's
    /// body dropped unread closes the client's connection once it has sent
    /// the answer, with the client's data unread, and the client's system
    /// may then reset the connection before the client has read the
    /// answer. So, as nginx discards a body it will not use, the rest of
    /// the body is read on a task of its own: the server keeps reading the
    /// client's upload, the client reads its answer, and its connection
    /// serves its next request. The task also stops once nothing has come
    /// for 5 s, and after 64 MiB (each frame counted as 1 KiB at least).
    ///
    /// Only the body of a request that came over HTTP/1 (its version, as
    /// the request reaches the backend) is read so: an HTTP/2 server ends
    /// a stream's upload with a reset of its own, which loses no answer. A
    /// body no connection has started to read (a retry may still send it)
    /// is dropped as it is; so a request that no backend took (every
    /// connection refused, no backend available) is answered with its
    /// upload unread. Turn this off for bodies made by the program rather
    /// than sent by a client, which nothing gains from reading.
    pub fn discard_timeout(self, timeout: Option<Duration>) -> Self {
        HttpClient::with_settings(
            Settings {
                discard_timeout: timeout.filter(|t| !t.is_zero()),
                ..self.settings
            },
            self.custom,
        )
    }

    /// Speaks HTTP/2 to every backend (feature `http2`; default HTTP/1.1):
    /// with prior knowledge over plain TCP (`h2c`, as gRPC servers accept
    /// it), or over what a [connector](Self::with_connector) opens, such as
    /// TLS that negotiated `h2` in ALPN.
    ///
    /// Each backend gets one connection for all its requests, opened when
    /// the first request needs it; requests arriving meanwhile wait for
    /// that attempt and share its outcome. Beyond the number of streams
    /// the backend allows at once (`SETTINGS_MAX_CONCURRENT_STREAMS`,
    /// often 100 to 250), requests wait for a stream to finish. Each
    /// stream may hold 2 MiB of its response that nobody has read yet,
    /// and the connection 1 GiB in all, so a client that stops reading its
    /// download does not hold back the other streams' data. Its stream
    /// stays open, though, and counts against the backend's limit until
    /// the client reads on or goes, or the [`send_timeout`](Self::send_timeout)
    /// gives it up: enough stalled downloads (or uploads that trickle)
    /// fill that limit meanwhile, and the requests waiting behind them
    /// time out (`read_timeout`) as if the backend had not answered. A new
    /// connection is opened when the backend closes the old one, when a
    /// keep-alive PING goes unanswered (see
    /// [`http2_keep_alive`](Self::http2_keep_alive)), and when none of
    /// its requests was sent for the [`idle_timeout`](Self::idle_timeout).
    ///
    /// A request the backend did not process comes back as
    /// [`NotSent`](crate::NotSent), so the failover layer may send it,
    /// whatever its method, to another backend: one the connection did not
    /// take because it was closing, and one refused with `REFUSED_STREAM`
    /// (RFC 9113, section 8.7). A request that meets the backend's
    /// `GOAWAY` (a server closing its connection gracefully), or that was
    /// still waiting for a free stream when the connection ended, fails
    /// with hyper's error, which does not say whether the backend got it:
    /// the failover layer retries it only when its method is idempotent.
    /// A `GOAWAY` without an error (`NO_ERROR`) on a connection that served
    /// requests before wraps it in [`GoingAway`](crate::error::GoingAway):
    /// the backend is not to blame, and passive health does not count it
    /// (on a connection opened for the request, it does).
    /// For the same reason, a request that waits for a free stream counts
    /// as sent: a per-try timeout that ends then is not followed by a
    /// retry of a POST.
    ///
    /// Requests go out with the backend's authority as `:authority` (or
    /// the client's host, with [`HttpBackend::preserve_host`]) and no
    /// `Host`.
    #[cfg(feature = "http2")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
    pub fn http2_only(self, http2: bool) -> Self {
        HttpClient::with_settings(
            Settings {
                http2,
                ..self.settings
            },
            self.custom,
        )
    }

    /// With [`http2_only`](Self::http2_only): sends a PING when nothing
    /// has been received on a connection with requests in flight for
    /// `interval` (default 30 s), and closes the connection when the
    /// answer does not come within 20 s, failing its requests; the next
    /// request opens a new one. This finds a connection that died without
    /// closing (a backend host gone, a NAT or firewall entry dropped)
    /// where TCP keep-alive cannot (a connector of yours may not set it,
    /// and it waits while data is unacknowledged). `None` sends no PING. gRPC
    /// servers accept PINGs this rare while calls are in flight; no PING
    /// is sent on an idle connection. Zero counts as `None` (a PING after
    /// every answer would flood the backend), and an interval over a year
    /// as a year.
    #[cfg(feature = "http2")]
    #[cfg_attr(docsrs, doc(cfg(feature = "http2")))]
    pub fn http2_keep_alive(self, interval: Option<Duration>) -> Self {
        const LONGEST: Duration = Duration::from_secs(365 * 86_400);
        let interval = interval.filter(|d| !d.is_zero()).map(|d| d.min(LONGEST));
        HttpClient::with_settings(
            Settings {
                http2_keep_alive: interval,
                ..self.settings
            },
            self.custom,
        )
    }
}

impl<B> Default for HttpClient<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn default() -> Self {
        HttpClient::new()
    }
}

/// The base URI given to [`HttpBackend::new`] is refused: it is not an
/// absolute `http://` URI (or `https://`, for a client with a TLS
/// connector: [`HttpClient::with_connector`]), its host is empty, its port
/// is not a number from 0 to 65535, or it has user information or a
/// query.
#[derive(Debug)]
pub struct InvalidBackendUri {
    uri: String,
    reason: std::borrow::Cow<'static, str>,
}

impl fmt::Display for InvalidBackendUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `uri` is already quoted (the `Debug` of what was given).
        write!(f, "invalid backend URI {}: {}", self.uri, self.reason)
    }
}

impl std::error::Error for InvalidBackendUri {}

/// Proxies requests to one HTTP server. See the [module docs](self).
pub struct HttpBackend<B> {
    upstream: Arc<pool::Upstream<B>>,
    authority: Authority,
    host: HeaderValue,
    /// The base URI's path without its trailing slash; empty for `/`.
    /// Shared, so that the clone `Balance` makes for each request
    /// allocates nothing.
    prefix: Arc<str>,
    preserve_host: bool,
    /// Whether the client's `X-Forwarded-Proto`, `X-Forwarded-Host` and
    /// `Forwarded` are kept (see [`HttpBackend::trust_forwarded_headers`]).
    trust_forwarded: bool,
    /// Whether `Forwarded` (RFC 7239) is sent (see
    /// [`HttpBackend::forwarded_header`]).
    forwarded: bool,
    /// The backend's own URLs, which a `Location` it answers is rewritten
    /// from (see [`HttpBackend::rewrite_redirects`]); `None` when off.
    redirects: Option<Arc<Redirects>>,
}

impl<B> Clone for HttpBackend<B> {
    fn clone(&self) -> Self {
        HttpBackend {
            upstream: self.upstream.clone(),
            authority: self.authority.clone(),
            host: self.host.clone(),
            prefix: self.prefix.clone(),
            preserve_host: self.preserve_host,
            trust_forwarded: self.trust_forwarded,
            forwarded: self.forwarded,
            redirects: self.redirects.clone(),
        }
    }
}

impl<B> fmt::Debug for HttpBackend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBackend")
            .field("authority", &self.authority)
            .field("host", &self.host)
            .field("prefix", &self.prefix)
            .field("preserve_host", &self.preserve_host)
            .field("trust_forwarded_headers", &self.trust_forwarded)
            .field("forwarded_header", &self.forwarded)
            .field("rewrite_redirects", &self.redirects.is_some())
            .finish()
    }
}

impl<B> HttpBackend<B> {
    /// A backend at `base` (`http://host:port` with an optional path
    /// prefix), sharing `client`'s connection pool. `https://` needs a
    /// client with a TLS connector
    /// ([`HttpClient::with_connector`]). A base URI with user information
    /// (`http://user:password@host`) is refused: it would be sent to the
    /// backend in `Host`. So is one with an empty host (`http://:80`) or a
    /// port that is not a number from 0 to 65535 (`http://host:65616`),
    /// which would otherwise be taken for no port at all.
    pub fn new<U>(client: &HttpClient<B>, base: U) -> Result<Self, InvalidBackendUri>
    where
        U: TryInto<Uri>,
        U: fmt::Debug + Clone,
        U::Error: fmt::Display,
    {
        // Shown without credentials, which would end up in logs.
        let invalid = |reason: &'static str| InvalidBackendUri {
            uri: {
                // Quoted: a URI without a scheme starts after the quote.
                let shown = format!("{base:?}");
                crate::error::hide_user_info(&shown, usize::from(shown.starts_with('"')))
            },
            reason: reason.into(),
        };
        let uri: Uri = base.clone().try_into().map_err(|e| InvalidBackendUri {
            // What the parser found wrong (the `http` crate's errors name
            // none of the text; another conversion's might).
            reason: format!(
                "not a URI ({})",
                crate::error::hide_user_info(&e.to_string(), 0)
            )
            .into(),
            ..invalid("")
        })?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        if scheme == Scheme::HTTPS && client.custom.is_none() {
            return Err(invalid(
                "https:// needs a client with a TLS connector (HttpClient::with_connector)",
            ));
        }
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid("only http:// and https:// are supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "a base URI has no user information (it would be sent in Host)",
            ));
        }
        if uri.query().is_some() {
            return Err(invalid("a base URI has no query"));
        }
        if authority.host().is_empty() {
            return Err(invalid("no host"));
        }
        // Without user information, the authority is the host, then the
        // port, if any.
        if !crate::uri::has_valid_port(&authority) {
            return Err(invalid("the port is not a number from 0 to 65535"));
        }
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| invalid("bad host"))?;
        let backend = HttpBackend {
            upstream: client.upstreams.get(&scheme, &authority),
            authority,
            host,
            prefix: uri.path().trim_end_matches('/').into(),
            preserve_host: false,
            trust_forwarded: false,
            forwarded: false,
            redirects: None,
        };
        Ok(backend.rewrite_redirects(true))
    }

    /// Whether a `Location` the backend answers that points into the base
    /// URI (`http://10.0.0.5:8080/app/login` for a backend at
    /// `http://10.0.0.5:8080/app`, or at the host given with
    /// [`host`](Self::host)) is rewritten to a path of the proxy's
    /// (`/login`), as nginx's `proxy_redirect default` does: on by default,
    /// so that a redirect neither shows clients an internal address nor
    /// sends them there, and a base path does not end up twice in the next
    /// request. Other locations, relative ones included, pass unchanged, and
    /// so does one whose path a browser would read as another host (`//`,
    /// `/\`).
    pub fn rewrite_redirects(mut self, rewrite: bool) -> Self {
        self.redirects = rewrite.then(|| Arc::new(self.own_urls()));
        self
    }

    /// What the backend's own URLs start with: its scheme, its authority or
    /// the host it is sent as, and its base path.
    fn own_urls(&self) -> Redirects {
        let scheme = self.upstream.scheme().as_str().to_owned();
        let mut hosts = Vec::new();
        for host in [self.authority.as_str().as_bytes(), self.host.as_bytes()] {
            if let Some(host) = canonical_host(host, &scheme) {
                if !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
        }
        Redirects {
            scheme,
            hosts,
            prefix: self.prefix.to_string(),
        }
    }

    /// Forwards the host the client asked for instead of the backend's
    /// authority (for backends that route by virtual host): the authority
    /// of the request's target when it has one (an HTTP/2 front end's
    /// `:authority`, an HTTP/1.1 absolute-form target, whose authority RFC
    /// 9112 section 3.2.2 puts before `Host`), without user information;
    /// else its `Host` header; else the backend's authority.
    pub fn preserve_host(mut self, preserve: bool) -> Self {
        self.preserve_host = preserve;
        self
    }

    /// Whether the client is a proxy you trust (a CDN, a load balancer in
    /// front), whose `X-Forwarded-Proto` and `X-Forwarded-Host` are kept
    /// rather than replaced, and whose `Forwarded` elements are kept
    /// before this proxy's own (with
    /// [`forwarded_header`](Self::forwarded_header)), as Envoy does behind
    /// trusted hops. Off by default: this proxy is the first the client
    /// reached, and a client's own values, which it may have made up to
    /// pass for HTTPS or for another site, are replaced by what this proxy
    /// saw. `X-Forwarded-For` is appended to either way.
    pub fn trust_forwarded_headers(mut self, trust: bool) -> Self {
        self.trust_forwarded = trust;
        self
    }

    /// Also sends the standard `Forwarded` header (RFC 7239, as HAProxy's
    /// `option forwarded`): an element `for=` the client's address (with
    /// a [`PeerAddr`]), `host=` the host it asked for, `proto=` its scheme
    /// (see [`ClientScheme`]), replacing
    /// the client's `Forwarded` or, with
    /// [`trust_forwarded_headers`](Self::trust_forwarded_headers), appended
    /// to it. Off by default.
    ///
    /// ```
    /// use http_body_util::Full;
    /// use tower_ha::http::{HttpBackend, HttpClient};
    ///
    /// let client = HttpClient::<Full<bytes::Bytes>>::new();
    /// // Behind a CDN that sets the X-Forwarded-* headers itself.
    /// let backend = HttpBackend::new(&client, "http://10.0.0.7:8080")?
    ///     .trust_forwarded_headers(true)
    ///     .forwarded_header(true);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forwarded_header(mut self, send: bool) -> Self {
        self.forwarded = send;
        self
    }

    /// Sends `host` as the requests' `Host` (`:authority` over HTTP/2)
    /// instead of the base URI's authority, as nginx's `proxy_set_header
    /// Host` or Envoy's `host_rewrite_literal` do: for a backend reached by
    /// its address that serves a named virtual host. Connections still go
    /// to the base URI. User information in `host` is dropped (a `Host`
    /// never holds it). With [`preserve_host`](Self::preserve_host), the
    /// host sent when the client named none.
    ///
    /// ```
    /// use http::uri::Authority;
    /// use http_body_util::Full;
    /// use tower_ha::http::{HttpBackend, HttpClient};
    ///
    /// let client = HttpClient::<Full<bytes::Bytes>>::new();
    /// let backend = HttpBackend::new(&client, "http://10.0.0.7:8080")?
    ///     .host(Authority::from_static("api.example.com"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn host(mut self, host: Authority) -> Self {
        if let Some(host) = host_of(&host) {
            self.host = host;
        }
        if self.redirects.is_some() {
            self.redirects = Some(Arc::new(self.own_urls()));
        }
        self
    }

    /// Rewrites `req` for the backend; returns the client's side of a
    /// protocol upgrade it asks for, when it can be proxied.
    fn rewrite(&self, req: &mut Request<B>) -> Result<Option<OnUpgrade>, InvalidRequest> {
        if req.method() == Method::CONNECT {
            // RFC 8441's extended CONNECT (a WebSocket over HTTP/2), which a
            // front sees only if it offered it.
            #[cfg(feature = "http2")]
            if req.extensions().get::<hyper::ext::Protocol>().is_some() {
                return Err(InvalidRequest::new(
                    "an extended CONNECT (RFC 8441, a WebSocket over HTTP/2) is not proxied; \
                     the client can upgrade over HTTP/1.1 instead",
                ));
            }
            // A forward proxy's method: its target is a host to tunnel to,
            // not a resource of the backend.
            return Err(InvalidRequest::new(
                "CONNECT asks for a tunnel to another host, which a reverse proxy does not open",
            ));
        }
        if req.headers().get_all(HOST).iter().nth(1).is_some() {
            // Which one names the host is anyone's guess: a proxy or a
            // cache in front may have gone by the other one than the layers
            // here (and `preserve_host`) go by, the first. RFC 9112 section
            // 3.2 has a server answer 400, as nginx and HAProxy do.
            return Err(InvalidRequest::new(
                "the request has more than one Host field",
            ));
        }
        let present = hop_by_hop(req.headers());
        let upgrade = if present & UPGRADE_PRESENT != 0
            && req.version() == Version::HTTP_11
            && !self.upstream.speaks_http2()
            && lists(req.headers().get_all(CONNECTION), b"upgrade")
            // A switch to HTTP/2 would turn the connection into one the
            // proxy no longer sees requests on: such a request goes on as
            // plain HTTP/1.1 (as Envoy and nginx send it).
            && !lists(req.headers().get_all(UPGRADE), b"h2c")
            // A body still uploading when the backend switches would keep
            // its side of the tunnel from being handed over, with no time
            // limit; no WebSocket client sends one.
            && present & TRANSFER_ENCODING_PRESENT == 0
            && req.headers().get(CONTENT_LENGTH).is_none_or(|len| len == "0")
        {
            // Present when the client's connection is hyper's, which can
            // hand it over once the backend agrees.
            req.extensions_mut().remove::<OnUpgrade>()
        } else {
            None
        };
        if present & TRANSFER_ENCODING_PRESENT != 0 {
            if !only_chunked(req.headers().get_all(TRANSFER_ENCODING)) {
                return Err(InvalidRequest::new(
                    "a transfer coding other than chunked, which this proxy does not decode",
                ));
            }
            // Framed by its chunks, the body has no use for a
            // `Content-Length` beside them, which a proxy must remove (RFC
            // 9112 section 6.3): left on, it would frame what goes on to
            // the backend, cutting the body short.
            req.headers_mut().remove(CONTENT_LENGTH);
        }
        let original = match req.uri().path_and_query() {
            // An absolute-form target without a path (`http://host?q`):
            // its path is `/` (RFC 9112 section 3.2.2).
            Some(pq) if !pq.as_str().starts_with(['/', '*']) => {
                PathAndQuery::try_from(format!("/{}", pq.as_str())).map_err(|e| {
                    InvalidRequest::with_source("the request target is not valid", e)
                })?
            }
            Some(pq) => pq.clone(),
            // An authority-form target (`host:port`) names a host to
            // tunnel to, not a resource: only CONNECT, refused above, has
            // one. Taken for `/`, it would ask the backend for its root.
            None if req.uri().scheme().is_none() && req.uri().authority().is_some() => {
                return Err(InvalidRequest::new(
                    "an authority-form target (host:port) is only for CONNECT",
                ));
            }
            None => PathAndQuery::from_static("/"),
        };
        // The host the client asked for: its target's authority when it
        // has one (an HTTP/2 front end's `:authority`, an absolute-form
        // target, which RFC 9112 section 3.2.2 puts before `Host`), else
        // its `Host`.
        let asked = match req.uri().authority() {
            Some(authority) => host_of(authority),
            // An empty one names no host (RFC 9112 section 3.2).
            None => req.headers().get(HOST).filter(|h| !h.is_empty()).cloned(),
        };
        let asked = asked.map(|host| client_host(&host)).transpose()?;
        let path_and_query = if self.prefix.is_empty() {
            original
        } else if original.as_str() == "*" {
            // `OPTIONS *` asks about the whole server, of which the base
            // path gives only a part. Refused, as nginx (400) and Envoy do
            // with any asterisk-form target, rather than turned into a
            // request for the base path.
            return Err(InvalidRequest::new(
                "an asterisk-form target (`OPTIONS *`) names the whole server, \
                 not the backend's base path",
            ));
        } else {
            // Under a prefix, dot segments are resolved first, so that a
            // request cannot climb out of it (`/../other`).
            let path = original.path();
            if hides_a_separator(path) {
                return Err(InvalidRequest::new(
                    "the request path hides a separator (%2F, %5C, a backslash \
                     or `..;`) that could lead out of the backend's base path",
                ));
            }
            let query_len = original.query().map_or(0, |q| q.len() + 1);
            let mut joined = String::with_capacity(self.prefix.len() + path.len() + query_len);
            joined.push_str(&self.prefix);
            push_without_dot_segments(&mut joined, path);
            if let Some(query) = original.query() {
                joined.push('?');
                joined.push_str(query);
            }
            PathAndQuery::try_from(joined).map_err(|e| {
                InvalidRequest::with_source("the rewritten request target is not valid", e)
            })?
        };
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        let proto = match req.extensions().get::<ClientScheme>() {
            Some(ClientScheme(scheme)) => proto_value(scheme),
            None => HeaderValue::from_static("http"),
        };
        let headers = req.headers_mut();
        let trailers = match upgrade {
            Some(_) => strip_all_but_upgrade(headers, present),
            None => strip_present(headers, present),
        };
        if trailers {
            // The client takes trailer fields, and so does this proxy,
            // which forwards them: say so to the backend (hyper, for one,
            // sends none unless asked), as Go's `httputil.ReverseProxy`
            // does.
            headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(ip) = peer {
            append_forwarded_for(headers, ip);
        }
        self.set_forwarded(headers, peer, asked.as_ref(), proto);
        let host = match asked {
            Some(host) if self.preserve_host => host,
            _ => self.host.clone(),
        };
        if self.upstream.speaks_http2() {
            // Absolute form: HTTP/2 names the host in `:authority`, and a
            // `Host` beside it could only disagree.
            headers.remove(HOST);
            let authority = Authority::try_from(host.as_bytes()).map_err(|e| {
                InvalidRequest::with_source("the request's host is not a valid authority", e)
            })?;
            *req.uri_mut() = Uri::builder()
                .scheme(self.upstream.scheme().clone())
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
                .map_err(|e| {
                    InvalidRequest::with_source("the rewritten request target is not valid", e)
                })?;
            *req.version_mut() = Version::HTTP_2;
        } else {
            headers.insert(HOST, host);
            if trailers {
                // TE is of this hop only: its sender names it in
                // `Connection` (RFC 9110 section 10.1.4), so that an
                // HTTP/1.1 proxy on the way does not pass it on.
                let connection = match upgrade {
                    Some(_) => "upgrade, te",
                    None => "te",
                };
                headers.insert(CONNECTION, HeaderValue::from_static(connection));
            }
            if req.version() >= Version::HTTP_2 {
                join_cookies(req.headers_mut());
            }
            // Origin form: the connection already names the backend.
            *req.uri_mut() = Uri::from(path_and_query);
            // Backend connections are HTTP/1.1 and kept alive, whatever the
            // client spoke (as Envoy does): hyper's HTTP/1 client writes no
            // other version (an HTTP/3 front end's requests would make it
            // panic), and an HTTP/1.0 request would close the pooled
            // connection after its response.
            *req.version_mut() = Version::HTTP_11;
        }
        Ok(upgrade)
    }
}

/// Joins the `Cookie` fields of an HTTP/2 or HTTP/3 request into one, as
/// RFC 9113 section 8.2.3 requires before it goes on over HTTP/1.1: such
/// clients may send each cookie in a field of its own, and an HTTP/1.1
/// application may read only the first `Cookie` line.
fn join_cookies(headers: &mut HeaderMap) {
    let mut lines = headers.get_all(COOKIE).iter();
    if lines.next().is_none() || lines.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for line in headers.get_all(COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(line.as_bytes());
    }
    // Made of valid values and "; ", so valid.
    if let Ok(joined) = HeaderValue::from_bytes(&joined) {
        headers.insert(COOKIE, joined);
    }
}

/// The `Host` value of an authority: its host and port, without user
/// information.
fn host_of(authority: &Authority) -> Option<HeaderValue> {
    let all = authority.as_str();
    let host = all.rsplit_once('@').map_or(all, |(_, host)| host);
    HeaderValue::from_str(host).ok()
}

/// A client's `Host` as it goes on to the backend: without the user
/// information a client may have put in it (which a `Host` never holds,
/// and an HTTP/2 `:authority` must not). A value that is no `host[:port]`
/// (`a.example/x?`, `a.example b.example`, a port that is no number) is
/// refused, as RFC 9112 section 3.2 has a server do and nginx does: passed
/// on, a backend that builds links or picks a site by it would trust what
/// the client made up.
fn client_host(host: &HeaderValue) -> Result<HeaderValue, InvalidRequest> {
    let invalid = || InvalidRequest::new("the request's Host is not a valid host[:port]");
    let bytes = host.as_bytes();
    match bytes.iter().rposition(|&b| b == b'@') {
        None if crate::uri::is_host_and_port(bytes) => Ok(host.clone()),
        Some(at) if crate::uri::is_host_and_port(&bytes[at + 1..]) => {
            HeaderValue::from_bytes(&bytes[at + 1..]).map_err(|_| invalid())
        }
        _ => Err(invalid()),
    }
}

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl<B> HttpBackend<B> {
    /// Sets `X-Forwarded-Proto` to `proto` and `X-Forwarded-Host` to the
    /// host the client asked for (`host`), or keeps the client's when it
    /// is trusted, and `Forwarded` when asked for.
    fn set_forwarded(
        &self,
        headers: &mut HeaderMap,
        peer: Option<std::net::IpAddr>,
        host: Option<&HeaderValue>,
        proto: HeaderValue,
    ) {
        if self.forwarded {
            let element = forwarded_element(peer, host, &proto);
            if self.trust_forwarded {
                append_to_list(headers, &FORWARDED, &element);
            } else if let Ok(element) = HeaderValue::from_maybe_shared(bytes::Bytes::from(element))
            {
                headers.insert(FORWARDED, element);
            }
        }
        if self.trust_forwarded {
            headers.entry(&X_FORWARDED_PROTO).or_insert(proto);
            if let Some(host) = host {
                headers
                    .entry(&X_FORWARDED_HOST)
                    .or_insert_with(|| host.clone());
            }
        } else {
            if !self.forwarded {
                // Nor does a client's own `Forwarded` pass for this
                // proxy's word.
                headers.remove(FORWARDED);
            }
            headers.insert(&X_FORWARDED_PROTO, proto);
            match host {
                Some(host) => headers.insert(&X_FORWARDED_HOST, host.clone()),
                None => headers.remove(&X_FORWARDED_HOST),
            };
        }
    }
}

/// `scheme` as the value of `X-Forwarded-Proto`.
fn proto_value(scheme: &Scheme) -> HeaderValue {
    if *scheme == Scheme::HTTPS {
        HeaderValue::from_static("https")
    } else if *scheme == Scheme::HTTP {
        HeaderValue::from_static("http")
    } else {
        // A scheme is letters, digits, `+`, `-` and `.`: a valid value.
        HeaderValue::from_str(scheme.as_str()).unwrap_or(HeaderValue::from_static("http"))
    }
}

/// This proxy's element of a `Forwarded` header (RFC 7239 section 4):
/// `for=` the client's address, when known (an IPv6 one in brackets and
/// quotes), `host=` the host it asked for, when it named one, and
/// `proto=` its scheme. A value that is no token (a host with a port, for
/// one) is quoted.
fn forwarded_element(
    peer: Option<std::net::IpAddr>,
    host: Option<&HeaderValue>,
    proto: &HeaderValue,
) -> Vec<u8> {
    let mut element = Vec::with_capacity(96);
    if let Some(ip) = peer {
        let ip = ip.to_canonical();
        let mut text = [0; 64];
        let text = ip_text(ip, &mut text);
        element.extend_from_slice(b"for=");
        if ip.is_ipv6() {
            element.extend_from_slice(b"\"[");
            element.extend_from_slice(text);
            element.extend_from_slice(b"]\";");
        } else {
            element.extend_from_slice(text);
            element.push(b';');
        }
    }
    if let Some(host) = host {
        element.extend_from_slice(b"host=");
        push_token_or_quoted(&mut element, host.as_bytes());
        element.push(b';');
    }
    element.extend_from_slice(b"proto=");
    push_token_or_quoted(&mut element, proto.as_bytes());
    element
}

/// Appends `value` to `out` as it is when it is a token (RFC 9110 section
/// 5.6.2), else as a quoted string.
fn push_token_or_quoted(out: &mut Vec<u8>, value: &[u8]) {
    if crate::key::is_token(value) {
        out.extend_from_slice(value);
        return;
    }
    out.push(b'"');
    for &b in value {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Folds every `X-Forwarded-For` line into one and appends `ip`, or adds
/// the header with `ip` alone.
fn append_forwarded_for(headers: &mut HeaderMap, ip: std::net::IpAddr) {
    let mut text = [0; 64];
    append_to_list(
        headers,
        &X_FORWARDED_FOR,
        ip_text(ip.to_canonical(), &mut text),
    );
}

/// Folds every line of the list header `name` into one and appends `item`,
/// or adds the header with `item` alone.
fn append_to_list(headers: &mut HeaderMap, name: &HeaderName, item: &[u8]) {
    use ::http::header::Entry;
    use bytes::BufMut;
    // One lookup of the name, whether the header is there or not.
    match headers.entry(name) {
        // The usual case, the client's own connection: the item alone.
        Entry::Vacant(entry) => {
            if let Ok(value) = HeaderValue::from_bytes(item) {
                entry.insert(value);
            }
        }
        Entry::Occupied(mut entry) => {
            let mut v = bytes::BytesMut::with_capacity(64);
            // Every line of the header, in order, folded into one.
            for prev in entry.iter() {
                let prev = prev.as_bytes().trim_ascii();
                if !prev.is_empty() {
                    v.put_slice(prev);
                    v.put_slice(b", ");
                }
            }
            v.put_slice(item);
            if let Ok(value) = HeaderValue::from_maybe_shared(v.freeze()) {
                entry.insert(value);
            }
        }
    }
}

/// `ip` as text, written into `buf` (an IPv6 address takes at most 39
/// bytes; the formatting machinery is left to it, the rare case).
fn ip_text(ip: std::net::IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    match ip {
        std::net::IpAddr::V4(ip) => {
            let mut len = 0;
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buf[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buf[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buf[len] = b'0' + octet % 10;
                len += 1;
            }
            &buf[..len]
        }
        std::net::IpAddr::V6(ip) => {
            use std::io::Write;
            let mut rest = &mut buf[..];
            // 39 bytes at most: the buffer holds every address.
            let _ = write!(rest, "{ip}");
            let len = 64 - rest.len();
            &buf[..len]
        }
    }
}

/// Whether a path holds a separator that a backend may decode or honour
/// after dot segments are resolved here: an encoded `/` or `\`, a
/// backslash, or a `..;` segment (path parameters, as Tomcat reads them).
fn hides_a_separator(path: &str) -> bool {
    let encoded = |w: &[u8]| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'f') | (b'5', b'c')
            )
    };
    path.contains('\\')
        || path.as_bytes().windows(3).any(encoded)
        || path
            .split('/')
            .any(|s| matches!(leading_dots(s), (2, rest) if rest.starts_with(';')))
}

/// How many dots (`.` or `%2e`, in any case) a segment starts with, and
/// what follows them.
fn leading_dots(mut segment: &str) -> (usize, &str) {
    let mut dots = 0;
    loop {
        if let Some(rest) = segment.strip_prefix('.') {
            segment = rest;
        } else if segment
            .get(..3)
            .is_some_and(|p| p.eq_ignore_ascii_case("%2e"))
        {
            segment = &segment[3..];
        } else {
            return (dots, segment);
        }
        dots += 1;
    }
}

/// Appends `path` to `out` with its dot segments (`.`, `..`, and their
/// percent-encoded forms) resolved as RFC 3986 does, never above `out`'s
/// own content.
fn push_without_dot_segments(out: &mut String, path: &str) {
    let base = out.len();
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        match leading_dots(segment) {
            (dots @ (1 | 2), "") => {
                if dots == 2 {
                    if let Some(cut) = out[base..].rfind('/') {
                        out.truncate(base + cut);
                    }
                }
                // A dot segment at the end leaves a directory: `/a/..` is `/`.
                if segments.peek().is_none() {
                    out.push('/');
                }
            }
            _ => {
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    if out.len() == base {
        out.push('/');
    }
}

/// The headers that describe one connection, not the message: `Connection`,
/// and those RFC 9110 section 7.6.1 says to remove before forwarding
/// whether or not `Connection` names them.
///
/// `Trailer` is not one of them: RFC 9110 (section 6.6.2) has it describe
/// the message, not the connection, and hyper writes only the trailer
/// fields that `Trailer` announces, so removing it would drop them all.
/// (RFC 2616 listed it, and Go's `httputil.ReverseProxy` removes it but
/// announces the trailers again itself.) A client's `TE: trailers` is sent
/// on to the backend, as Go does, since a backend may send no trailer
/// fields without it (hyper does not).
///
/// `Proxy-Authorization` and `Proxy-Authenticate` are credentials between
/// a client and the next proxy (RFC 9110 section 11.7), which this one is:
/// they are not passed on (as Go's `httputil.ReverseProxy` does not).
/// Nor is `Proxy`: no standard defines it, and a CGI program reads it as
/// `HTTP_PROXY`, the proxy of its own requests (CVE-2016-5385, "httpoxy",
/// whose advisory asks proxies to drop it).
///
/// Nor is `Expect`, whose `100-continue` the client's side has answered
/// already: hyper's server sends `100 Continue` once the body is read,
/// which the proxy does before the backend has said anything. Sent on, the
/// expectation would be answered twice, and a backend that does not take
/// expectations could refuse (417) an upload the client has sent. nginx
/// clears it too. (An interim response of the backend's, such as
/// `103 Early Hints`, is not passed on: hyper's server sends none.)
///
/// Names for removal (a removal by name is a lookup without parsing), and
/// [`HOP_BY_HOP_TEXT`] to find them by (comparing text is cheaper).
static HOP_BY_HOP: [HeaderName; 10] = [
    CONNECTION,
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy"),
    EXPECT,
];

/// [`HOP_BY_HOP`]'s names as text, in the same order.
const HOP_BY_HOP_TEXT: [&str; 10] = [
    "connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "proxy",
    "expect",
];

/// Bits of [`hop_by_hop`]'s answer: `Connection`, `TE`,
/// `Transfer-Encoding` and `Upgrade`.
const CONNECTION_PRESENT: u16 = 1 << 0;
const TE_PRESENT: u16 = 1 << 1;
const TRANSFER_ENCODING_PRESENT: u16 = 1 << 2;
const UPGRADE_PRESENT: u16 = 1 << 3;
const KEEP_ALIVE_PRESENT: u16 = 1 << 4;

/// A backend's response, and which of the [`HOP_BY_HOP`] headers it has
/// (see [`hop_by_hop`]), found by the pool, which reads a `Keep-Alive`
/// among them.
type Received = (Response<ResponseBody>, u16);

/// The `timeout` a backend's `Keep-Alive` header announces, in seconds:
/// how long it keeps an idle connection open (RFC 2068 section 19.7.1.1,
/// as Apache httpd, Node.js and nginx send it).
///
/// Its parameters are split at commas outside quoted strings (another
/// parameter's quoted value may hold `, timeout=9`), and its value is
/// digits only.
fn keep_alive_timeout(headers: &HeaderMap) -> Option<u64> {
    let mut parameters = (headers.get_all(&HOP_BY_HOP[4]).iter())
        .flat_map(|line| crate::key::quoted_list_elements(line.as_bytes()))
        .map(<[u8]>::trim_ascii);
    parameters.find_map(|parameter| {
        let eq = parameter.iter().position(|&b| b == b'=')?;
        if !parameter[..eq]
            .trim_ascii_end()
            .eq_ignore_ascii_case(b"timeout")
        {
            return None;
        }
        crate::key::decimal(crate::key::unquote(parameter[eq + 1..].trim_ascii_start()))
    })
}

/// Whether `Transfer-Encoding` says `chunked` and nothing else: the one
/// coding hyper takes off, so the only one a body can be passed on under.
fn only_chunked<'a>(lines: impl IntoIterator<Item = &'a HeaderValue>) -> bool {
    let mut codings = elements(lines);
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Which of the [`HOP_BY_HOP`] headers are present, a bit for each, in
/// one pass over the names (a backend's `Connection: keep-alive` is the
/// common case), so that only those are looked up again.
fn hop_by_hop(headers: &HeaderMap) -> u16 {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP_TEXT.iter().position(|&h| h == name.as_str()) {
            present |= 1 << i;
        }
    }
    present
}

/// Removes the hop-by-hop headers, knowing which are `present` (see
/// [`hop_by_hop`]); returns whether `TE` (one of them) said that trailer
/// fields are accepted.
fn strip_present(headers: &mut HeaderMap, present: u16) -> bool {
    if present == 0 {
        return false;
    }
    let trailers = present & TE_PRESENT != 0 && lists(headers.get_all(TE), b"trailers");
    // The headers `Connection` names go too; the usual line
    // (`keep-alive` or `close`) names none, and nothing is collected.
    if present & CONNECTION_PRESENT != 0 {
        // Cloned (each a cheap clone), so removing holds no borrow of the
        // map.
        let naming: Vec<HeaderValue> = (headers.get_all(CONNECTION).iter())
            .filter(|line| names_others(line))
            .cloned()
            .collect();
        for line in &naming {
            remove_named(headers, line);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    trailers
}

/// [`strip_present`], but keeping what asks for or agrees to a switch of
/// protocols: `Upgrade` and `Connection: upgrade`.
fn strip_all_but_upgrade(headers: &mut HeaderMap, present: u16) -> bool {
    let protocols: Vec<HeaderValue> = headers.get_all(UPGRADE).iter().cloned().collect();
    let trailers = strip_present(headers, present);
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    for protocol in protocols {
        headers.append(UPGRADE, protocol);
    }
    trailers
}

/// Whether a list header's `lines` hold `element`, in any case.
fn lists<'a>(lines: impl IntoIterator<Item = &'a HeaderValue>, element: &[u8]) -> bool {
    elements(lines).any(|e| e.eq_ignore_ascii_case(element))
}

/// Whether a `101` response names, in `Upgrade`, only protocols the
/// request `offered` (RFC 9110, section 7.8).
fn switch_agrees(offered: &[HeaderValue], response: &HeaderMap) -> bool {
    let mut chosen = elements(response.get_all(UPGRADE)).peekable();
    chosen.peek().is_some() && chosen.all(|c| lists(offered, c))
}

/// Whether `token`, from a `Connection` line, names a header to remove
/// besides the hop-by-hop ones (removed anyway): not one of them, nor
/// `close`.
fn names_other(token: &[u8]) -> bool {
    !token.eq_ignore_ascii_case(b"close")
        && !HOP_BY_HOP_TEXT
            .iter()
            .any(|h| h.as_bytes().eq_ignore_ascii_case(token))
}

/// Whether a `Connection` line names any header [`remove_named`] would
/// remove.
fn names_others(connection: &HeaderValue) -> bool {
    // The usual lines, whole.
    let line = connection.as_bytes();
    if line.eq_ignore_ascii_case(b"keep-alive") || line.eq_ignore_ascii_case(b"close") {
        return false;
    }
    elements([connection]).any(names_other)
}

/// Removes the headers a `Connection` line names, except the hop-by-hop
/// ones (removed anyway), `close`, and those a proxy's layers set for the
/// backend (see [`set_by_proxies`]).
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    for token in elements([connection]).filter(|t| names_other(t) && !set_by_proxies(t)) {
        // A token that is no valid header name names nothing.
        if let Ok(name) = HeaderName::from_bytes(token) {
            headers.remove(name);
        }
    }
}

/// Whether header `name` is one that proxies set for the backend to trust
/// (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`, `Via`). A client's
/// `Connection` line naming one would remove what a layer in front of the
/// backend has just set, leaving the backend to trust the proxy's own
/// address instead (Apache's CVE-2022-31813, Traefik's CVE-2024-45410):
/// such tokens are ignored.
fn set_by_proxies(name: &[u8]) -> bool {
    crate::key::strip_prefix_ignore_case(name, b"x-forwarded-").is_some()
        || [b"x-real-ip".as_slice(), b"forwarded", b"via"]
            .iter()
            .any(|exact| name.eq_ignore_ascii_case(exact))
}

/// `frame`, and if it is a body's trailer fields, without those that may
/// not travel there through a proxy: the hop-by-hop ones (see
/// [`HOP_BY_HOP`]) and any its own `Connection` names, `Host` and
/// `Content-Length`, which only a head can say, and those that proxies set
/// (see [`set_by_proxies`]), which this one strips or sets in the head.
///
/// HTTP/1 carries any field a sender puts in its last chunk, and hyper
/// passes them on: unfiltered, they would reach the other side as the
/// fields the head was cleaned of. And h2 refuses to send trailers with a
/// connection's fields (RFC 9113 section 8.2.2) without ending the stream:
/// its peer would wait for the end of a body that never comes.
pub(super) fn clean_trailers<D>(frame: http_body::Frame<D>) -> http_body::Frame<D> {
    let mut fields = match frame.into_trailers() {
        Ok(fields) => fields,
        Err(frame) => return frame,
    };
    let present = hop_by_hop(&fields);
    strip_present(&mut fields, present);
    fields.remove(HOST);
    fields.remove(CONTENT_LENGTH);
    // Collected (nothing is allocated when there are none), so removing
    // holds no borrow of the map.
    let proxies: Vec<HeaderName> = (fields.keys())
        .filter(|name| set_by_proxies(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in proxies {
        fields.remove(name);
    }
    http_body::Frame::trailers(fields)
}

impl<B> Service<Request<B>> for HttpBackend<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: the pooled client opens connections on demand.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> ResponseFuture {
        // The backend a balancer sent this to, held in flight while the
        // response's body streams (or its tunnel lasts).
        let backend = req.extensions().get::<Target>().map(|t| t.state().clone());
        // A failover layer's slot for this attempt: the request is still
        // being readied while its connection opens, so that an attempt
        // abandoned meanwhile counts as never sent (and may be retried
        // whatever its method).
        let handover = Handover::of(&req);
        // Before the rewrite sets the version the backend speaks.
        let from_http1 = req.version() < Version::HTTP_2;
        let http1_1 = req.version() == Version::HTTP_11;
        let discard = self.upstream.discard_timeout(from_http1);
        let rewritten = self.rewrite(&mut req);
        // An HTTP/1.1 client that takes trailers (the rewrite keeps its
        // `TE: trailers`, and only that) gets them in chunks only.
        let chunks_trailers = http1_1 && req.headers().contains_key(TE);
        let body = req.body();
        if self.upstream.speaks_http2() {
            // Framed by its stream.
        } else if !body.is_end_stream() {
            // A body of unknown length goes chunked: hyper would send a GET
            // or HEAD without one. So does one whose trailers are announced
            // (`Trailer`): framed by its length, hyper would drop them.
            let trailers = req.headers().contains_key(TRAILER);
            if trailers || body.size_hint().exact().is_none() {
                req.headers_mut().remove(CONTENT_LENGTH);
                req.headers_mut()
                    .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            }
        } else if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
            && !req.headers().contains_key(CONTENT_LENGTH)
        {
            // An empty body of a method that defines one goes with its
            // length, as a client sends it (RFC 9110 section 8.6), not
            // unframed as hyper would: some servers answer 411 without.
            req.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        }
        let state = match rewritten {
            Ok(None) => {
                let (req, sent) = timeout::Upload::wrap(req, discard, from_http1);
                State::Sent {
                    future: Box::pin(self.upstream.clone().send(req, sent, handover)),
                }
            }
            Ok(Some(client)) => State::Sent {
                future: Box::pin(self.upstream.clone().upgrade(
                    req,
                    client,
                    backend.clone(),
                    handover,
                )),
            },
            Err(e) => State::Invalid {
                error: Some(e.into()),
            },
        };
        ResponseFuture {
            state,
            backend,
            redirects: self.redirects.clone(),
            chunks_trailers,
        }
    }
}

/// What a backend's own URLs start with (see
/// [`HttpBackend::rewrite_redirects`]); the scheme compares in any case.
#[derive(Debug)]
struct Redirects {
    scheme: String,
    /// Each as [`canonical_host`] writes it.
    hosts: Vec<Vec<u8>>,
    prefix: String,
}

/// `authority` (a host and an optional port) written one way, so that
/// spellings of one address that differ in case, IPv6 form or port compare
/// equal: the host in lower case, an IPv6 address in its shortest form
/// (`[2001:DB8:0::1]` is `[2001:db8::1]`), and the port as a number, left
/// out when it is the one `scheme` implies (`:80` for `http`, `:443` for
/// `https`; `:080` is `:80`). Other forms of an IPv4 address (`10.0.0.05`)
/// and a trailing dot are not. `None` when it is not a host and port.
fn canonical_host(authority: &[u8], scheme: &str) -> Option<Vec<u8>> {
    let authority = std::str::from_utf8(authority).ok()?;
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (ip, port) = rest.split_once(']')?;
            // A zone (`%25eth0`) follows the address as it is written.
            let (ip, zone) = ip.split_at(ip.find('%').unwrap_or(ip.len()));
            let ip: std::net::Ipv6Addr = ip.parse().ok()?;
            (format!("[{ip}{}]", zone.to_ascii_lowercase()), port)
        }
        None => {
            let end = authority.find(':').unwrap_or(authority.len());
            let (host, port) = authority.split_at(end);
            (host.to_ascii_lowercase(), port)
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = crate::uri::port_after_host(port)?;
    let default = if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    };
    Some(match port {
        Some(port) if port != default => format!("{host}:{port}").into_bytes(),
        _ => host.into_bytes(),
    })
}

impl Redirects {
    /// `location` as a path of the proxy's, when it points into the
    /// backend's base URI: what follows the base path, or `/`. Bytes, not
    /// text: a backend may send a raw UTF-8 path, which is kept as it is.
    fn rewrite(&self, location: &[u8]) -> Option<Vec<u8>> {
        let scheme_end = location.windows(3).position(|w| w == b"://")?;
        let (scheme, rest) = (&location[..scheme_end], &location[scheme_end + 3..]);
        if !scheme.eq_ignore_ascii_case(self.scheme.as_bytes()) {
            return None;
        }
        let host_end = rest
            .iter()
            .position(|b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(rest.len());
        let (host, path) = rest.split_at(host_end);
        // A backend may write its host in another case, or write the
        // default port its base URI leaves out (or the reverse).
        if !canonical_host(host, &self.scheme).is_some_and(|host| self.hosts.contains(&host)) {
            return None;
        }
        let after = path.strip_prefix(self.prefix.as_bytes())?;
        // Browsers drop tabs and line breaks from a URL, which could make
        // `/<tab>/evil.example` the `//` below.
        if after.iter().any(u8::is_ascii_control) {
            return None;
        }
        match after {
            // Read by browsers as another host (`//evil.example/`, or
            // `/\evil.example/` alike): as a path of the proxy's, it would
            // send the client off the site. Left as it is.
            [b'/', b'/' | b'\\', ..] => None,
            [b'/', ..] => Some(after.to_vec()),
            [] | [b'?' | b'#', ..] => Some([b"/", after].concat()),
            // `/application` is not under `/app`.
            _ => None,
        }
    }
}

/// Tells a failover layer (through the attempt's [`Picked`] slot) when a
/// request is handed to a connection: until then, nothing of it was sent.
pub(crate) struct Handover(Option<Picked>);

impl Handover {
    /// The slot of `req`'s attempt, if any, marked as not handed over yet.
    fn of<B>(req: &Request<B>) -> Self {
        let picked = req.extensions().get::<Picked>().cloned();
        if let Some(picked) = &picked {
            picked.set_readying(true);
        }
        Handover(picked)
    }

    /// Says whether the request is being handed to a connection now
    /// (`true`), or was given back unsent (`false`).
    pub(crate) fn handed(&self, handed: bool) {
        if let Some(picked) = &self.0 {
            picked.set_readying(!handed);
        }
    }
}

pin_project! {
    /// The response future of [`HttpBackend`].
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture {
        #[pin]
        state: State,
        backend: Option<Arc<BackendState>>,
        redirects: Option<Arc<Redirects>>,
        // The client speaks HTTP/1.1, which carries trailers only in
        // chunks, and takes them.
        chunks_trailers: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sent {
            future: Pin<Box<dyn Future<Output = Result<Received, BoxError>> + Send>>,
        },
        Invalid {
            error: Option<BoxError>,
        },
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state.project() {
            StateProj::Invalid { error } => {
                let e = error.take().expect("polled after completion");
                // The request never left, but not `NotSent`: every backend
                // would refuse it alike.
                Poll::Ready(Err(e))
            }
            StateProj::Sent { future } => {
                let (mut resp, present) = ready!(future.as_mut().poll(cx))?;
                let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                // A `101` (whose tunnel has started) and a 204 have no body
                // (hyper reads none): a framing header on them, which RFC
                // 9110 and 9112 forbid there, frames nothing.
                let bodiless = switched || resp.status() == StatusCode::NO_CONTENT;
                if present & TRANSFER_ENCODING_PRESENT != 0 && !bodiless {
                    // Framed by its chunks, not by a `Content-Length` beside
                    // them, which is passed on only when it is the framing
                    // (RFC 9112 section 6.3); and a coding hyper left on the
                    // body could not be passed on without its name.
                    if !only_chunked(resp.headers().get_all(TRANSFER_ENCODING)) {
                        return Poll::Ready(Err(
                            "the backend's response has a transfer coding other than chunked"
                                .into(),
                        ));
                    }
                    resp.headers_mut().remove(CONTENT_LENGTH);
                }
                if bodiless {
                    // No `Content-Length` either (RFC 9110 section 8.6, for
                    // a 204). hyper's HTTP/1 server drops one a
                    // backend sent anyway; its HTTP/2 server does not, and
                    // HTTP/2 clients built on nghttp2 (curl, Node) reset a
                    // stream whose 204 has one that is not zero.
                    resp.headers_mut().remove(CONTENT_LENGTH);
                }
                // A backend's `Connection: close` ends its own connection,
                // not the client's. A switch of protocols (which only an
                // upgrade request gets) is the client's too.
                if switched {
                    strip_all_but_upgrade(resp.headers_mut(), present);
                } else {
                    strip_present(resp.headers_mut(), present);
                }
                // Trailers announced by a backend whose response is framed
                // by its HTTP/2 stream, with a length: framed by that length
                // to an HTTP/1.1 client, hyper would drop them. Chunked, as
                // an HTTP/1 backend's response with trailers is.
                if *this.chunks_trailers
                    && resp.version() == Version::HTTP_2
                    && resp.headers().contains_key(TRAILER)
                    && !http_body::Body::is_end_stream(resp.body())
                {
                    resp.headers_mut().remove(CONTENT_LENGTH);
                    resp.headers_mut()
                        .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
                }
                if let Some(redirects) = this.redirects.take() {
                    let rewritten = resp.headers().get(LOCATION).and_then(|location| {
                        HeaderValue::from_bytes(&redirects.rewrite(location.as_bytes())?).ok()
                    });
                    if let Some(location) = rewritten {
                        resp.headers_mut().insert(LOCATION, location);
                    }
                }
                // An intermediary answers in its own version (RFC 9110
                // section 6.2): a backend's HTTP/1.0 would otherwise make
                // an HTTP/1.1 client's connection close after every answer.
                // The client's server adapts it to a 1.0 client, and
                // HTTP/2 ignores it.
                *resp.version_mut() = Version::HTTP_11;
                if let Some(backend) = this.backend.take() {
                    if !http_body::Body::is_end_stream(resp.body()) {
                        resp.body_mut().hold(backend.hold_in_flight());
                    }
                }
                Poll::Ready(Ok(resp))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes the hop-by-hop headers, finding which are present.
    fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
        strip_present(headers, hop_by_hop(headers))
    }

    #[test]
    fn forwarded_for_is_appended_or_created() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        append_forwarded_for(&mut h, "::ffff:10.0.0.2".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
        // Several lines are folded in order, the peer last.
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static(" 10.0.0.3 "));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static(""));
        append_forwarded_for(&mut h, "10.0.0.4".parse().unwrap());
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[&X_FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4"
        );
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "10.109.200.1",
            "255.255.255.255",
            "2001:db8::1",
            "::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
        ] {
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, ip.parse().unwrap());
            assert_eq!(h[&X_FORWARDED_FOR], ip);
        }
        // Every octet value, in every position, reads as `Display` has it.
        for o in 0..=255u8 {
            let ip = std::net::Ipv4Addr::new(o, 255 - o, o / 3, o.wrapping_mul(7));
            let mut h = HeaderMap::new();
            append_forwarded_for(&mut h, ip.into());
            assert_eq!(h[&X_FORWARDED_FOR], ip.to_string().as_str());
        }
    }

    #[test]
    fn a_request_cannot_leave_the_base_path() {
        let resolve = |path: &str| {
            let mut out = String::from("/app1");
            push_without_dot_segments(&mut out, path);
            out
        };
        assert_eq!(resolve("/"), "/app1/");
        assert_eq!(resolve("/x/y"), "/app1/x/y");
        assert_eq!(resolve("/x/"), "/app1/x/");
        assert_eq!(resolve("/../app2/secret"), "/app1/app2/secret");
        assert_eq!(resolve("/a/%2E%2e/%2e/../../b"), "/app1/b");
        assert_eq!(resolve("/a/.."), "/app1/");
        assert_eq!(resolve("/a/./b/."), "/app1/a/b/");
        assert_eq!(resolve("/..."), "/app1/...");
        assert_eq!(resolve("//x"), "/app1//x");
        for hidden in [
            "/..%2Fapp2",
            "/..%2fx",
            "/a%5c..",
            "/a\\..\\b",
            "/..;/app2",
            "/%2e%2E;x/y",
        ] {
            assert!(hides_a_separator(hidden), "{hidden}");
        }
        for plain in ["/", "/a/b", "/a%20b/..", "/a;b", "/%2e%2e/x"] {
            assert!(!hides_a_separator(plain), "{plain}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.append(
            CONNECTION,
            HeaderValue::from_static("x-other ,bad name, TE"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(::http::header::TE, HeaderValue::from_static("trailers"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert("trailer", HeaderValue::from_static("x-sum"));
        assert!(strip_hop_by_hop(&mut h), "TE: trailers");
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("x-kept"));
        assert!(h.contains_key("trailer"), "end to end");
        // A byte that is not text spoils its element only.
        let mut h = HeaderMap::new();
        let line = HeaderValue::from_bytes(b"x-secret, caf\xe9, x-other").unwrap();
        h.insert(CONNECTION, line);
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
        let te = HeaderValue::from_bytes(b"\xff, trailers").unwrap();
        assert!(lists([&te], b"trailers"));
        // Two elements that are not text are not alike.
        let offered = [HeaderValue::from_bytes(b"\xfe").unwrap()];
        let mut chose = HeaderMap::new();
        chose.insert(UPGRADE, HeaderValue::from_bytes(b"\xff").unwrap());
        assert!(!switch_agrees(&offered, &chose));
        let coding = HeaderValue::from_bytes(b"chunked, \xff").unwrap();
        assert!(!only_chunked([&coding]), "a coding not read is one more");
        // A plain line names nothing; a later line still does.
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        h.insert(CONNECTION, HeaderValue::from_static("close"));
        h.append(CONNECTION, HeaderValue::from_static("x-kept"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        // Each one alone is found too, with its bit.
        assert_eq!(HOP_BY_HOP[0], "connection");
        assert_eq!(HOP_BY_HOP[1], "te");
        assert_eq!(HOP_BY_HOP[3], "upgrade");
        assert_eq!(HOP_BY_HOP[4], "keep-alive");
        // Exactly (a name's text is lowercase; `HeaderName == &str` would
        // ignore case, and `hop_by_hop` compares exactly).
        for (name, text) in HOP_BY_HOP.iter().zip(HOP_BY_HOP_TEXT) {
            assert_eq!(name.as_str(), text);
        }
        assert_eq!(KEEP_ALIVE_PRESENT, 1 << 4);
        let mut only = HeaderMap::new();
        only.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(hop_by_hop(&only), UPGRADE_PRESENT);
        for name in [
            "connection",
            "te",
            "transfer-encoding",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "proxy-authenticate",
            "proxy",
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            assert!(!strip_hop_by_hop(&mut h), "{name}");
            assert_eq!(h.len(), 1, "{name}");
        }
        for (te, trailers) in [("gzip, Trailers ", true), ("gzip", false), ("", false)] {
            let mut h = HeaderMap::new();
            h.append(::http::header::TE, HeaderValue::from_static("deflate"));
            h.append(::http::header::TE, HeaderValue::from_static(te));
            assert_eq!(strip_hop_by_hop(&mut h), trailers, "{te}");
            assert!(h.is_empty());
        }
    }

    #[test]
    fn a_keep_alive_timeout_is_read() {
        let timeout = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append("keep-alive", HeaderValue::from_static(line));
            }
            keep_alive_timeout(&h)
        };
        assert_eq!(timeout(&["timeout=5"]), Some(5));
        assert_eq!(timeout(&["timeout=5, max=1000"]), Some(5));
        assert_eq!(timeout(&["max=100, Timeout = 15"]), Some(15));
        assert_eq!(timeout(&["max=100", "timeout=\"20\""]), Some(20));
        assert_eq!(timeout(&["timeout=0"]), Some(0));
        // A comma in another parameter's quoted value splits nothing.
        assert_eq!(timeout(&[r#"x="a, timeout=9, b", timeout=5"#]), Some(5));
        for none in [
            &[][..],
            &["max=5"],
            &["timeout"],
            &["timeout=-1"],
            &["timeout=5s"],
            &["timeout=+5"],
            &[""],
        ] {
            assert_eq!(timeout(none), None, "{none:?}");
        }
    }

    /// `Keep-Alive` parameters but `timeout`: names that are not it in any
    /// case (some near it), with optional spaces around the `=`, and a
    /// token or a quoted string (without a comma) for value.
    fn other_keep_alive_parameters() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (
            "(max|Max|timeouts|time-out|xtimeout|[A-Za-z-]{1,9})",
            "[ \t]{0,2}",
            "[ \t]{0,2}",
            "([A-Za-z0-9.!~-]{0,8}|\"[A-Za-z0-9 =;.]{0,8}\")",
        )
            .prop_filter("not timeout", |(name, ..)| {
                !name.eq_ignore_ascii_case("timeout")
            })
            .prop_map(|(name, before, after, value)| format!("{name}{before}={after}{value}"))
    }

    /// `parameters` as the lines of a `Keep-Alive` header: each gap a
    /// comma with optional spaces, empty elements, or a new line, as
    /// `gaps` picks, and spaces at each line's ends.
    fn keep_alive_lines(parameters: &[String], gaps: &[u8]) -> HeaderMap {
        let mut lines = vec![String::from(" ")];
        for (i, parameter) in parameters.iter().enumerate() {
            if i > 0 {
                match gaps.get(i).copied().unwrap_or(0) % 5 {
                    0 => lines.last_mut().unwrap().push(','),
                    1 => lines.last_mut().unwrap().push_str(" , "),
                    2 => lines.last_mut().unwrap().push_str(",\t"),
                    3 => lines.last_mut().unwrap().push_str(", ,,"),
                    _ => lines.push(String::from("\t")),
                }
            }
            lines.last_mut().unwrap().push_str(parameter);
        }
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(
                &HOP_BY_HOP[4],
                HeaderValue::from_str(&format!("{line} ")).unwrap(),
            );
        }
        headers
    }

    /// A line of any bytes and pieces of parameters, in any order.
    fn keep_alive_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let pieces = "(timeout|TimeOut|max|=|,|\"| |\t|5|007|18446744073709551616|-|\\+|é)";
        proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..4),
                pieces.prop_map(String::into_bytes),
            ],
            0..12,
        )
        .prop_map(|pieces| pieces.concat())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes, and pieces of parameters in any order, on any number
        /// of lines, are read without a panic (a line a header value cannot
        /// hold is left out); a timeout read is written in them.
        #[test]
        fn any_keep_alive_header_is_read(
            lines in proptest::collection::vec(keep_alive_bytes(), 0..4),
        ) {
            let mut headers = HeaderMap::new();
            for line in &lines {
                if let Ok(value) = HeaderValue::from_bytes(line) {
                    headers.append(&HOP_BY_HOP[4], value);
                }
            }
            if let Some(timeout) = keep_alive_timeout(&headers) {
                let all = String::from_utf8_lossy(&lines.concat()).into_owned();
                proptest::prop_assert!(all.contains(&timeout.to_string()), "{}: {:?}", timeout, all);
            }
        }

        /// `timeout` in any case, among other parameters in any order and
        /// on any lines, with optional spaces around its `=`, leading
        /// zeros and quotes: its value is read.
        #[test]
        fn the_timeout_parameter_is_read(
            others in proptest::collection::vec(other_keep_alive_parameters(), 0..5),
            at: proptest::sample::Index,
            name in "[tT][iI][mM][eE][oO][uU][tT]",
            before in "[ \t]{0,2}",
            after in "[ \t]{0,2}",
            zeros in 0usize..3,
            timeout: u64,
            quoted: bool,
            gaps in proptest::collection::vec(proptest::prelude::any::<u8>(), 6),
        ) {
            let value = format!("{}{timeout}", "0".repeat(zeros));
            let value = if quoted { format!("\"{value}\"") } else { value };
            let mut parameters = others;
            parameters.insert(at.index(parameters.len() + 1), format!("{name}{before}={after}{value}"));
            let headers = keep_alive_lines(&parameters, &gaps);
            proptest::prop_assert_eq!(keep_alive_timeout(&headers), Some(timeout), "{:?}", headers);
        }

        /// Without a `timeout` parameter, no timeout is read.
        #[test]
        fn no_timeout_parameter_is_no_timeout(
            others in proptest::collection::vec(other_keep_alive_parameters(), 0..6),
            gaps in proptest::collection::vec(proptest::prelude::any::<u8>(), 6),
        ) {
            let headers = keep_alive_lines(&others, &gaps);
            proptest::prop_assert_eq!(keep_alive_timeout(&headers), None, "{:?}", headers);
        }
    }

    #[test]
    fn a_switch_names_only_protocols_offered() {
        let offered = [
            HeaderValue::from_static("websocket, echo/2"),
            HeaderValue::from_static("chat"),
        ];
        let answer = |lines: &[&'static str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(UPGRADE, HeaderValue::from_static(line));
            }
            switch_agrees(&offered, &h)
        };
        assert!(answer(&["WebSocket"]));
        assert!(answer(&["echo/2"]));
        assert!(answer(&["chat, websocket"]));
        assert!(!answer(&[]), "a switch names its protocol");
        assert!(!answer(&[" , "]));
        assert!(!answer(&["h2c"]));
        assert!(!answer(&["echo"]), "another version");
        assert!(!answer(&["websocket", "h2c"]));
    }

    #[test]
    fn client_settings_reach_the_pool() {
        type Client = HttpClient<http_body_util::Empty<bytes::Bytes>>;
        let client = Client::new();
        assert_eq!(client.settings, Settings::DEFAULT);
        assert_eq!(client.settings.connect_timeout, Duration::from_secs(5));
        let secs = Duration::from_secs;
        let client = client
            .connect_timeout(secs(1))
            .tcp_keepalive(None)
            .idle_timeout(secs(2))
            .read_timeout(Some(Duration::ZERO))
            .send_timeout(Some(Duration::ZERO))
            .tunnel_idle_timeout(Some(Duration::ZERO))
            .discard_timeout(Some(Duration::ZERO));
        assert_eq!(client.settings.tunnel_idle_timeout, None, "zero is none");
        assert_eq!(client.settings.discard_timeout, None, "zero is none");
        assert_eq!(client.settings.read_timeout, None, "zero is none");
        assert_eq!(client.settings.send_timeout, None, "zero is none");
        assert!(client.upstreams.stalls().is_none());
        let client = client
            .tunnel_idle_timeout(Some(secs(3)))
            .read_timeout(Some(secs(4)))
            .send_timeout(Some(secs(6)))
            .discard_timeout(Some(secs(5)))
            .max_response_headers(200)
            .max_response_header_size(1024);
        let expected = Settings {
            connect_timeout: secs(1),
            tcp_keepalive: None,
            idle_timeout: secs(2),
            read_timeout: Some(secs(4)),
            send_timeout: Some(secs(6)),
            tunnel_idle_timeout: Some(secs(3)),
            discard_timeout: Some(secs(5)),
            max_response_headers: Some(200),
            // At least 8 KiB.
            max_response_header_size: 8192,
            http2: false,
            http2_keep_alive: Some(secs(30)),
        };
        assert_eq!(client.settings, expected);
        assert_eq!(client.upstreams.idle_timeout(), secs(2));
        assert_eq!(client.upstreams.stalls().unwrap().timeout(), secs(6));
        assert_eq!(
            format!("{client:?}"),
            "HttpClient { connect_timeout: 1s, tcp_keepalive: None, idle_timeout: 2s, \
             read_timeout: Some(4s), send_timeout: Some(6s), tunnel_idle_timeout: Some(3s), \
             discard_timeout: Some(5s), max_response_headers: Some(200), \
             max_response_header_size: 8192, http2: false, .. }"
        );
    }

    #[test]
    fn base_uris_are_validated() {
        let client = HttpClient::<http_body_util::Empty<bytes::Bytes>>::new();
        assert!(HttpBackend::new(&client, "http://127.0.0.1:1").is_ok());
        assert!(HttpBackend::new(&client, "127.0.0.1:1").is_err());
        let err = HttpBackend::new(&client, "https://example.com").unwrap_err();
        assert!(err.to_string().contains("TLS connector"), "{err}");
        let err = HttpBackend::new(&client, "ftp://example.com").unwrap_err();
        assert!(
            err.to_string().contains("only http:// and https://"),
            "{err}"
        );
        assert!(HttpBackend::new(&client, "http://a/x?q=1").is_err());
        // Credentials would be sent in `Host`; the error does not show them.
        let err = HttpBackend::new(&client, "127.0.0.1:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backend URI \"127.0.0.1:1\": no scheme"
        );
        let err = HttpBackend::new(&client, "http://user:secret@a:1/api").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backend URI \"http://***@a:1/api\": a base URI has no user \
             information (it would be sent in Host)"
        );
        // Nor when it is refused for another reason first.
        for uri in [
            "https://user:secret@a",
            "ftp://user:secret@a/x",
            "http://user:secret@a b/",
            "http://user:secret@a/x?q=1",
            "user:secret@a:1",
            "http://user:se#cret@a",
            "http://user:se/cret@a",
        ] {
            let err = HttpBackend::new(&client, uri).unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains("***@a"), "{shown}");
        }
        // What the URI parser found wrong is shown.
        let err = HttpBackend::new(&client, "http://a b/").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backend URI \"http://a b/\": not a URI (invalid uri character)"
        );
        let b = HttpBackend::new(&client, "http://a:1/api/").unwrap();
        assert_eq!(&*b.prefix, "/api");
        // A port out of range, or not a number, is not taken for none.
        for uri in [
            "http://10.0.0.5:65616",
            "http://a:99999999999999999999",
            "http://[::1]:65536",
            "http://a:+80",
            "http://a:-1",
            "http://a:8x",
            "http://[::1]8080",
        ] {
            let err = HttpBackend::new(&client, uri).unwrap_err();
            assert!(
                err.to_string()
                    .ends_with("the port is not a number from 0 to 65535"),
                "{err}"
            );
        }
        for uri in ["http://:80", "http://:", "http://:80/api"] {
            let err = HttpBackend::new(&client, uri).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("invalid backend URI {uri:?}: no host")
            );
        }
        for uri in [
            "http://a:65535",
            "http://[::1]:8080/x",
            "http://a:080",
            "http://a:",
            "http://a",
        ] {
            assert!(HttpBackend::new(&client, uri).is_ok(), "{uri}");
        }
    }

    /// A backend's URL is its URL with or without the scheme's default
    /// port.
    #[test]
    fn redirects_name_the_backend_with_or_without_its_default_port() {
        let client = HttpClient::<http_body_util::Empty<bytes::Bytes>>::new();
        let own = |base: &str| HttpBackend::new(&client, base).unwrap().own_urls();
        let rewritten = |base: &str, location: &str| {
            own(base)
                .rewrite(location.as_bytes())
                .map(|path| String::from_utf8(path).unwrap())
        };
        for (base, location) in [
            ("http://10.0.0.5:80/app", "http://10.0.0.5/app/login"),
            ("http://10.0.0.5/app", "http://10.0.0.5:80/app/login"),
            ("http://[::1]:80/app", "http://[::1]/app/login"),
            (
                "http://Api.Internal/app",
                "HTTP://api.internal:80/app/login",
            ),
            // Other spellings of one address.
            (
                "http://[2001:db8::1]/app",
                "http://[2001:DB8:0::1]:080/app/login",
            ),
            (
                "http://[2001:DB8:0:0::1]:8080/app",
                "http://[2001:db8::1]:8080/app/login",
            ),
            (
                "http://[fe80::1%25eth0]:8080/app",
                "http://[FE80:0::1%25eth0]:8080/app/login",
            ),
        ] {
            assert_eq!(
                rewritten(base, location).as_deref(),
                Some("/login"),
                "{base} {location}"
            );
        }
        for (base, location) in [
            ("http://10.0.0.5:8080/app", "http://10.0.0.5/app/login"),
            ("http://10.0.0.5/app", "http://10.0.0.5:8080/app/login"),
            ("http://10.0.0.5:443/app", "http://10.0.0.5/app/login"),
        ] {
            assert_eq!(rewritten(base, location), None, "{base} {location}");
        }
    }

    #[test]
    fn hosts_are_compared_in_one_spelling() {
        let canonical = |host: &str, scheme| {
            canonical_host(host.as_bytes(), scheme).map(|h| String::from_utf8(h).unwrap())
        };
        for (host, scheme, want) in [
            ("[::1]:443", "https", "[::1]"),
            ("a:80", "https", "a:80"),
            ("a:8080", "http", "a:8080"),
            ("App.Example:080", "http", "app.example"),
            ("a:0000000000000000000080", "http", "a"),
            ("a:", "http", "a"),
            ("a:0", "http", "a:0"),
            ("[2001:DB8:0::1]:8080", "http", "[2001:db8::1]:8080"),
            ("[0:0::1]", "http", "[::1]"),
            ("10.0.0.5:443", "HTTPS", "10.0.0.5"),
            ("[FE80::1%25Eth0]:8080", "http", "[fe80::1%25eth0]:8080"),
        ] {
            assert_eq!(canonical(host, scheme).as_deref(), Some(want), "{host}");
        }
        for host in [
            "",
            ":80",
            "a:65536",
            "a:+80",
            "a:8o",
            "[::1",
            "[zz::1]",
            "[::1]8080",
            "a b:1:2",
        ] {
            assert_eq!(canonical(host, "http"), None, "{host}");
        }
    }

    /// The upstreams of backends gone are let go, a few at a time: a
    /// client that sees backends come and go under new addresses holds
    /// about twice as many as it serves (at least 64), not all it ever saw.
    #[test]
    fn the_upstreams_of_backends_gone_are_let_go() {
        let client = HttpClient::<http_body_util::Empty<bytes::Bytes>>::new();
        let kept: Vec<_> = (0..100)
            .map(|i| HttpBackend::new(&client, format!("http://10.0.0.1:{}", 1000 + i)).unwrap())
            .collect();
        for i in 0..1_000 {
            drop(HttpBackend::new(&client, format!("http://10.0.1.1:{}", 1000 + i)).unwrap());
        }
        let targets = client.upstreams.targets();
        assert!((100..=400).contains(&targets), "{targets}");
        drop(kept);
    }

    #[test]
    fn a_client_with_a_connector_of_its_own() {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = HttpClient::<http_body_util::Empty<bytes::Bytes>>::with_connector(connector)
            .connect_timeout(Duration::from_secs(3));
        assert!(client.custom.is_some(), "settings keep the connector");
        assert!(HttpBackend::new(&client, "https://example.com").is_ok());
        assert!(HttpBackend::new(&client, "http://example.com").is_ok());
        assert!(HttpBackend::new(&client, "ftp://example.com").is_err());
        assert_eq!(
            format!("{client:?}"),
            "HttpClient { connect_timeout: 3s, connector: \"custom\", idle_timeout: 60s, \
             read_timeout: Some(60s), send_timeout: Some(60s), tunnel_idle_timeout: Some(3600s), \
             discard_timeout: Some(30s), max_response_headers: None, \
             max_response_header_size: 65536, http2: false, .. }"
        );
    }

    #[cfg(feature = "http2")]
    #[test]
    fn http2_pings_are_never_back_to_back_nor_beyond_a_year() {
        let interval = |d| {
            HttpClient::<http_body_util::Empty<bytes::Bytes>>::new()
                .http2_keep_alive(d)
                .settings
                .http2_keep_alive
        };
        assert_eq!(interval(Some(Duration::ZERO)), None);
        assert_eq!(interval(None), None);
        let second = Some(Duration::from_secs(1));
        assert_eq!(interval(second), second);
        let year = Duration::from_secs(365 * 86_400);
        assert_eq!(interval(Some(Duration::MAX)), Some(year));
    }

    mod generated {
        //! Request paths, `Location`s, `Connection` lines and
        //! `X-Forwarded-For` lines of any content.

        use super::*;
        use crate::key::{self, RequestHead, RequestKey};
        use proptest::prelude::*;

        /// RFC 3986's removal of dot segments (section 5.2.4) on the
        /// segments of `path`, a `%2e` read as a dot, never above the root;
        /// the result appended to `prefix`.
        fn reference(prefix: &str, path: &str) -> String {
            let segments: Vec<&str> = path.split('/').skip(1).collect();
            let mut kept: Vec<&str> = Vec::new();
            let mut directory = false;
            for (i, segment) in segments.iter().enumerate() {
                let last = i + 1 == segments.len();
                match segment.to_ascii_lowercase().replace("%2e", ".").as_str() {
                    "." => directory = last,
                    ".." => {
                        kept.pop();
                        directory = last;
                    }
                    _ => {
                        kept.push(segment);
                        directory = false;
                    }
                }
            }
            let mut out = format!("{prefix}/{}", kept.join("/"));
            if directory && !kept.is_empty() {
                out.push('/');
            }
            out
        }

        /// Paths made of segments that are dots, encoded dots, empty, or
        /// names.
        fn paths() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    Just(""),
                    Just("."),
                    Just(".."),
                    Just("%2e"),
                    Just("%2E%2e"),
                    Just(".%2E"),
                    Just("..."),
                    Just("a"),
                    Just("b%20c"),
                    Just("é"),
                    Just("..a"),
                    Just("a.."),
                    Just("%2"),
                ],
                0..8,
            )
            .prop_map(|segments| segments.iter().map(|s| format!("/{s}")).collect::<String>())
        }

        fn client() -> HttpClient<http_body_util::Empty<bytes::Bytes>> {
            HttpClient::new()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Under a base path, a request path's dot segments are removed
            /// as RFC 3986 removes them, never above the base.
            #[test]
            fn dot_segments_are_removed_as_rfc_3986_does(
                prefix in "(/app|/a/b|/x%2e)",
                path in paths(),
            ) {
                let mut out = prefix.clone();
                push_without_dot_segments(&mut out, &path);
                prop_assert_eq!(&out, &reference(&prefix, &path), "{}", path);
                prop_assert!(out[prefix.len()..].starts_with('/'));
            }

            /// Any path is either refused as hiding a separator or resolved
            /// under the base, without a panic.
            #[test]
            fn any_path_stays_under_the_base(path in "/[a-z./%;\\\\2eEfFcC5é]{0,24}") {
                if !hides_a_separator(&path) {
                    let mut out = "/app".to_owned();
                    push_without_dot_segments(&mut out, &path);
                    prop_assert!(out.starts_with("/app/"), "{} -> {}", path, out);
                    for segment in out["/app/".len()..].split('/') {
                        let lower = segment.to_ascii_lowercase().replace("%2e", ".");
                        prop_assert!(lower != "." && lower != "..", "{} -> {}", path, out);
                    }
                }
            }

            /// A `Location` is rewritten to a path of the proxy's only when it
            /// names the backend's own URL, and the path then neither leaves
            /// the site (`//`, `/\`) nor holds a control character.
            #[test]
            fn only_the_backends_own_urls_are_rewritten(
                base in "(10\\.0\\.0\\.5|\\[::1\\]|api\\.internal)(|:80|:8080)(|/app)",
                scheme in "(http|HTTP|https)",
                host in "(10\\.0\\.0\\.5|\\[::1\\]|API\\.internal|api\\.internal|evil\\.example)(|:80|:8080|:443)",
                prefix in "(|/app|/APP|/application)",
                tail in "[/\\\\?#a-z\t\r\n ]{0,8}",
            ) {
                let backend = HttpBackend::new(&client(), format!("http://{base}").as_str()).unwrap();
                let own = backend.own_urls();
                let location = format!("{scheme}://{host}{prefix}{tail}");
                let rewritten = own.rewrite(location.as_bytes());
                if let Some(path) = &rewritten {
                    prop_assert!(path.starts_with(b"/"));
                    prop_assert!(!path.starts_with(b"//") && !path.starts_with(b"/\\"));
                    prop_assert!(!path.iter().any(u8::is_ascii_control));
                }
                // Where the host ends is plain only when the path starts
                // with one of the characters that end it.
                let after_host = format!("{prefix}{tail}");
                if !(after_host.is_empty() || after_host.starts_with(['/', '?', '#'])) {
                    return Ok(());
                }
                let strip = |h: &str| h.strip_suffix(":80").unwrap_or(h).to_ascii_lowercase();
                let base_host = base.split('/').next().unwrap();
                let base_path = &base[base_host.len()..];
                let expected = after_host
                    .strip_prefix(base_path)
                    .filter(|_| scheme.eq_ignore_ascii_case("http") && strip(&host) == strip(base_host))
                    .filter(|after| !after.bytes().any(|b| b.is_ascii_control()))
                    .filter(|after| !after.starts_with("//") && !after.starts_with("/\\"))
                    .and_then(|after| match after.chars().next() {
                        Some('/') => Some(after.to_owned()),
                        None | Some('?' | '#') => Some(format!("/{after}")),
                        _ => None,
                    });
                prop_assert_eq!(rewritten, expected.map(String::into_bytes), "{}", location);
            }

            /// Whatever `X-Forwarded-For` lines a client sent, the peer is
            /// appended as the one last entry of one line, which a key that
            /// trusts one hop reads as the peer's address.
            #[test]
            fn the_peer_is_the_last_forwarded_entry(
                lines in proptest::collection::vec("[0-9a-f.:, \t\\[\\]%é]{0,20}", 0..4),
                ip in any::<std::net::IpAddr>(),
                port in any::<u16>(),
            ) {
                let mut req = Request::new(());
                for line in &lines {
                    req.headers_mut().append(&X_FORWARDED_FOR, HeaderValue::from_str(line).unwrap());
                }
                append_forwarded_for(req.headers_mut(), ip);
                prop_assert_eq!(req.headers().get_all(&X_FORWARDED_FOR).iter().count(), 1);
                let forwarded = key::forwarded_for().trusted_hops(1).key(&RequestHead::from(&req));
                req.extensions_mut().insert(PeerAddr(std::net::SocketAddr::new(ip, port)));
                let peer = key::peer_ip().key(&RequestHead::from(&req));
                prop_assert!(peer.is_some());
                prop_assert_eq!(forwarded, peer);
                let mut text = [0; 64];
                let written = ip.to_canonical().to_string();
                prop_assert_eq!(ip_text(ip.to_canonical(), &mut text), written.as_bytes());
            }

            /// `Connection` lines of any tokens remove the headers they name
            /// and the hop-by-hop ones, never those proxies set for the
            /// backend, nor any they do not name.
            #[test]
            fn connection_lines_remove_what_they_name_and_no_more(
                lines in proptest::collection::vec(
                    proptest::collection::vec(
                        "(x-a|X-B|x-forwarded-for|X-Forwarded-Proto|forwarded|Via|x-real-ip|te|keep-alive|close|upgrade|bad name|b@d|\\t|)",
                        0..4,
                    )
                    .prop_map(|tokens| tokens.join(" ,")),
                    0..3,
                ),
            ) {
                let mut h = HeaderMap::new();
                for line in &lines {
                    h.append(CONNECTION, HeaderValue::from_str(line).unwrap());
                }
                for name in ["x-a", "x-b", "x-c", "x-forwarded-for", "x-forwarded-proto", "forwarded", "via", "x-real-ip", "te", "keep-alive", "upgrade"] {
                    h.insert(HeaderName::from_static(name), HeaderValue::from_static("1"));
                }
                strip_hop_by_hop(&mut h);
                for name in HOP_BY_HOP_TEXT {
                    prop_assert!(!h.contains_key(name), "{}", name);
                }
                for name in ["x-c", "x-forwarded-for", "x-forwarded-proto", "forwarded", "via", "x-real-ip"] {
                    prop_assert!(h.contains_key(name), "{}", name);
                }
                let named = |token: &str| lines.iter().any(|l| l.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)));
                for name in ["x-a", "x-b"] {
                    prop_assert_eq!(h.contains_key(name), !named(name), "{}", name);
                }
            }

        }
    }
}
