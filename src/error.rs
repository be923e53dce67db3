//! Errors returned by the balancer, shared by every layer.
//!
//! Middleware errors are small public structs. Services return them boxed as
//! [`BoxError`]; use [`BoxError::downcast_ref`](std::error::Error) (or
//! [`find`]) to tell them apart. Causes are kept as sources, never flattened
//! into strings.

use std::error::Error as StdError;
use std::fmt;

use crate::backend::BackendId;
use crate::failover::TimedOut;

/// The boxed error type of tower middleware.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// No backend may take this request: the pool is empty, every backend is
/// unavailable, at its [limit of requests in
/// flight](crate::BackendState::set_max_in_flight), or already tried.
///
/// Returned at once, unless the balancer lets requests
/// [wait for a place](crate::balance::Balance::queue): then a request that
/// found every backend at its limit fails when its wait is over
/// ([`is_queue_timeout`](Self::is_queue_timeout)), or at once if the queue
/// is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoBackend {
    why: Why,
}

/// In the order of [`Refusals`](crate::pool::Refusals)' counts (see
/// [`NoBackend::reason`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Why {
    /// Unavailable or already tried, every one of them.
    #[default]
    Unavailable = 0,
    /// Some could take it but for their limit of requests in flight.
    AtLimit = 1,
    /// Still at their limits when the request's wait in the queue ended.
    QueueTimeout = 2,
}

impl NoBackend {
    pub(crate) fn new() -> Self {
        NoBackend::default()
    }

    pub(crate) fn at_limit() -> Self {
        NoBackend { why: Why::AtLimit }
    }

    pub(crate) fn queue_timeout() -> Self {
        NoBackend {
            why: Why::QueueTimeout,
        }
    }

    /// Which of a pool's counts of refusals this one goes to.
    pub(crate) fn reason(self) -> usize {
        self.why as usize
    }

    /// Whether some backend could have taken the request but for its limit
    /// of requests in flight: the backends are busy rather than down.
    pub fn is_at_limit(&self) -> bool {
        self.why != Why::Unavailable
    }

    /// Whether the request waited in the balancer's queue for as long as
    /// it may and no place came free (it is also
    /// [at the limit](Self::is_at_limit)).
    pub fn is_queue_timeout(&self) -> bool {
        self.why == Why::QueueTimeout
    }
}

impl fmt::Display for NoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.why {
            Why::Unavailable => "no available backend",
            Why::AtLimit => {
                "every backend that could take the request is at its limit of requests in flight"
            }
            Why::QueueTimeout => {
                "every backend that could take the request stayed at its limit of requests in flight for as long as the request could wait"
            }
        })
    }
}

impl StdError for NoBackend {}

/// A backend failed a request: carries the backend's id and its error.
#[derive(Debug)]
pub struct BackendError {
    id: BackendId,
    not_sent: bool,
    source: BoxError,
}

impl BackendError {
    /// Wraps `source`, the error of backend `id`.
    pub fn new(id: BackendId, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        let not_sent = never_sent(&*source);
        BackendError {
            id,
            not_sent,
            source,
        }
    }

    /// Wraps an error that happened before the request left (the backend
    /// did not become ready).
    pub(crate) fn not_sent(id: BackendId, source: BoxError) -> Self {
        BackendError {
            id,
            not_sent: true,
            source,
        }
    }

    /// The backend that failed.
    pub fn backend(&self) -> &BackendId {
        &self.id
    }

    /// Whether the request is known not to have reached the backend: it
    /// failed while the backend became ready, the backend said so with
    /// [`NotSent`] (or, a balancer itself, with a [`NoBackend`] or a
    /// `BackendError` of its own that says so), or its error holds a
    /// refused connection (`io::ErrorKind::ConnectionRefused`). Such a
    /// request is safe to retry whatever its method, so a backend service
    /// that acts before it connects somewhere must not pass a refused
    /// connection up as its error (wrap it in an error of its own, without
    /// `source`).
    pub fn is_not_sent(&self) -> bool {
        self.not_sent
    }

    /// The backend's error.
    pub fn inner(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.source
    }

    /// The backend's error, owned.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "backend {} failed", self.id)?;
        if self.not_sent {
            f.write_str(" before the request was sent")?;
        }
        Ok(())
    }
}

impl StdError for BackendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// A backend's error for a request that is known not to have reached it
/// (for example a refused connection). Backend services return it (boxed)
/// so that the failover layer may retry even a non-idempotent request.
#[derive(Debug)]
pub struct NotSent {
    source: BoxError,
}

impl NotSent {
    /// Marks `source` as having happened before the request was sent.
    pub fn new(source: impl Into<BoxError>) -> Self {
        NotSent {
            source: source.into(),
        }
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request not sent")
    }
}

impl StdError for NotSent {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

/// A backend's error for a request its connection could not carry because
/// the backend was closing that connection gracefully: an HTTP/2 `GOAWAY`
/// without an error (`NO_ERROR`) that came before the answer, as servers
/// send after a number of requests (nginx's `keepalive_requests`, 1000 by
/// default), after a connection's age (gRPC's `MaxConnectionAge`) or at a
/// restart. `HttpBackend` returns it (feature `http2`) when the connection
/// had served other requests before; on one opened for the request, the
/// backend answered nothing, and its error is a failure as any other.
///
/// The backend is healthy: passive health counts it as neither a failure
/// nor a success, and the sticky layer does not mark the session's backend
/// as failed for it. The request may still have been processed (see
/// `HttpClient::http2_only`), so it is not [`NotSent`]: the failover layer
/// retries it as any other failure of a request that was sent (idempotent
/// requests only, by default), first on the same backend (a new
/// connection), once, when the request's session has its affinity there,
/// so that the session does not move for it.
///
/// ```
/// use tower_ha::error::{find, GoingAway};
/// use tower_ha::BoxError;
///
/// let err: BoxError = GoingAway::new("connection closing").into();
/// assert!(find::<GoingAway>(&*err).is_some());
/// ```
#[derive(Debug, thiserror::Error)]
#[error("the backend closed the connection gracefully before it answered")]
pub struct GoingAway {
    #[source]
    source: BoxError,
}

impl GoingAway {
    /// Marks `source` as the end of a connection its backend closed
    /// gracefully.
    pub fn new(source: impl Into<BoxError>) -> Self {
        GoingAway {
            source: source.into(),
        }
    }

    /// The underlying error.
    pub fn into_inner(self) -> BoxError {
        self.source
    }
}

/// A request that a backend service refuses to send because the request
/// itself is bad (for example a path that would lead out of an
/// `HttpBackend`'s base path, feature `hyper-client`).
///
/// Every backend would refuse it alike, so it is the client's error, not
/// the backend's: the [`DefaultClassifier`](crate::classify::DefaultClassifier)
/// counts it as no failure (the failover layer returns it at once, whatever
/// the method, and passive health does not count it), and
/// [`gateway_status`] answers `400 Bad Request` for it (`408 Request
/// Timeout` for a client too slow sending its body). It is not
/// [`NotSent`]: sending it elsewhere would not help.
///
/// ```
/// use tower_ha::error::{gateway_status, BackendError, InvalidRequest};
///
/// let err = BackendError::new("a".into(), InvalidRequest::new("a path hides a separator"));
/// assert_eq!(gateway_status(&err), http::StatusCode::BAD_REQUEST);
/// ```
#[derive(Debug, thiserror::Error)]
#[error("invalid request: {reason}")]
pub struct InvalidRequest {
    reason: std::borrow::Cow<'static, str>,
    #[source]
    source: Option<BoxError>,
}

impl InvalidRequest {
    /// A request refused for `reason`.
    pub fn new(reason: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        InvalidRequest {
            reason: reason.into(),
            source: None,
        }
    }

    /// A request refused for `reason`, found by the error `source`.
    pub fn with_source(
        reason: impl Into<std::borrow::Cow<'static, str>>,
        source: impl Into<BoxError>,
    ) -> Self {
        InvalidRequest {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }

    /// Why the request was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// A client that stopped sending its request's body: `stalled` says
    /// for how long. Its I/O error of kind `TimedOut` is what
    /// [`gateway_status`] answers with `408 Request Timeout`.
    pub(crate) fn client_too_slow(stalled: String) -> Self {
        let stalled = std::io::Error::new(std::io::ErrorKind::TimedOut, stalled);
        InvalidRequest::with_source(
            "the client was too slow sending the request's body",
            stalled,
        )
    }
}

/// Whether `err` says its request never reached the backend: a [`NotSent`],
/// a [`TimedOut`] that [says so](TimedOut::is_not_sent), a [`BackendError`]
/// that does, or a [`NoBackend`] (a balancer behind the backend had none)
/// anywhere in its chain of sources, or an I/O error of kind
/// `ConnectionRefused` anywhere in it (how hyper-util's client and
/// `TcpStream::connect` report a refused connection).
pub(crate) fn never_sent(err: &(dyn StdError + 'static)) -> bool {
    chain(err).any(|e| {
        e.is::<NotSent>()
            || e.is::<NoBackend>()
            || e.downcast_ref::<BackendError>()
                .is_some_and(BackendError::is_not_sent)
            || e.downcast_ref::<TimedOut>()
                .is_some_and(TimedOut::is_not_sent)
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// Whether `err` says nothing of the backend that returned it: the request
/// was bad ([`InvalidRequest`]), or met its connection's graceful close
/// ([`GoingAway`]). Passive health records nothing for it, and the sticky
/// layer does not mark the session's backend as failed.
pub(crate) fn not_the_backends(err: &(dyn StdError + 'static)) -> bool {
    chain(err).any(|e| e.is::<InvalidRequest>() || e.is::<GoingAway>())
}

/// `err` and its sources, in order. An `io::Error` that wraps another
/// error (`io::Error::other(e)`) is followed by that error: its own
/// `source()` skips it, to `e.source()`.
pub(crate) fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&e| match e.downcast_ref::<std::io::Error>() {
        Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
        None => e.source(),
    })
}

/// Whether `err` is the balancer's own [`NoBackend`], or wraps one: one
/// found in its chain before any [`BackendError`]. Inside a `BackendError`
/// it is that backend's failure (a balancer behind the backend had none).
pub(crate) fn is_no_backend(err: &(dyn StdError + 'static)) -> bool {
    chain(err)
        .find_map(|e| {
            if e.is::<BackendError>() {
                Some(false)
            } else if e.is::<NoBackend>() {
                Some(true)
            } else {
                None
            }
        })
        .unwrap_or(false)
}

/// Shows an error followed by its chain of sources (`outer: inner:
/// innermost`), for logs: a [`BackendError`] alone says only which backend
/// failed, its sources say why. A source whose text the error it is the
/// source of already shows (as [`Exhausted`](crate::failover::Exhausted)
/// shows each attempt's cause) is not repeated.
///
/// ```
/// use tower_ha::error::{BackendError, NotSent, Report};
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let err = BackendError::new("a".into(), NotSent::new(refused));
/// assert_eq!(
///     Report(&err).to_string(),
///     "backend a failed before the request was sent: request not sent: connection refused"
/// );
/// ```
#[derive(Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut outer = self.0.to_string();
        f.write_str(&outer)?;
        for err in chain(self.0).skip(1) {
            let text = err.to_string();
            // Shown by the error it is the source of.
            if !outer.contains(&text) {
                write!(f, ": {text}")?;
            }
            outer = text;
        }
        Ok(())
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Finds the first error of type `E` in `err`'s chain of sources,
/// starting with `err` itself (an `io::Error` that wraps another error, as
/// `io::Error::other(e)` does, is followed by `e`).
///
/// ```
/// use tower_ha::error::{find, BackendError, NotSent};
///
/// let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
/// let err = BackendError::new("a".into(), NotSent::new(refused));
/// assert!(err.is_not_sent());
/// assert!(find::<std::io::Error>(&err).is_some());
/// ```
pub fn find<'a, E: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    chain(err).find_map(|e| e.downcast_ref::<E>())
}

/// The status a gateway should answer for an error of the tower-ha stack,
/// as the proxies do: `400 Bad Request` for a request refused as
/// [`InvalidRequest`] (also when the failover layer tried it, with a
/// classifier that counts it as a failure, until no backend was left), or
/// `408 Request Timeout` when the refusal is a timeout (a client too slow
/// sending its body),
/// `503 Service Unavailable` when no backend could take
/// the request ([`NoBackend`], attempts that found no backend, a strict
/// sticky session whose backend is gone; also tower's `LoadShed` finding
/// its service at capacity), `504 Gateway Timeout` when the last attempt
/// timed out (also a connect that timed out, as nginx answers, and the
/// timeout of tower's `Timeout` or of `tokio::time::timeout` around the
/// stack or a backend) or the deadline passed, `502 Bad Gateway` for any
/// other backend failure.
///
/// ```
/// use http::StatusCode;
/// use tower_ha::error::{gateway_status, BackendError, BoxError, NoBackend};
///
/// let none: BoxError = Box::new(NoBackend::default());
/// assert_eq!(gateway_status(&*none), StatusCode::SERVICE_UNAVAILABLE);
/// let reset: BoxError = Box::new(BackendError::new("a".into(), "connection reset"));
/// assert_eq!(gateway_status(&*reset), StatusCode::BAD_GATEWAY);
/// ```
pub fn gateway_status(err: &(dyn StdError + 'static)) -> http::StatusCode {
    failure(err).status()
}

/// How an error of the tower-ha stack failed its request, as a gateway
/// answers it (see [`gateway_status`] and [`grpc_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request was refused as invalid.
    Invalid,
    /// The client was too slow sending the request's body.
    ClientTimeout,
    /// No backend could take the request.
    Unavailable,
    /// The last attempt, or the deadline, timed out; `unsent` when it was
    /// a connect that timed out (by its own timeout or the per-try
    /// timeout), so the request reached no backend.
    Timeout { unsent: bool },
    /// Any other backend failure.
    Failed,
}

impl Failure {
    /// See [`gateway_status`].
    fn status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Failure::Invalid => StatusCode::BAD_REQUEST,
            Failure::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Failure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Failure::Failed => StatusCode::BAD_GATEWAY,
        }
    }

    /// See [`grpc_status`].
    fn grpc_status(self) -> u32 {
        use crate::classify::{GRPC_DEADLINE_EXCEEDED, GRPC_INTERNAL, GRPC_UNAVAILABLE};
        match self {
            Failure::Invalid => GRPC_INTERNAL,
            Failure::ClientTimeout | Failure::Timeout { unsent: false } => GRPC_DEADLINE_EXCEEDED,
            Failure::Unavailable | Failure::Timeout { unsent: true } | Failure::Failed => {
                GRPC_UNAVAILABLE
            }
        }
    }
}

/// See [`Failure`].
fn failure(err: &(dyn StdError + 'static)) -> Failure {
    use crate::failover::{DeadlineExceeded, Exhausted, TimedOut};
    use crate::sticky::SessionUnavailable;

    // A per-try timeout, the deadline, an I/O timeout (a connect that
    // timed out, as `HttpClient::connect_timeout` or the kernel reports),
    // or the timeout of a layer the user put around the stack or a
    // backend (tower's `TimeoutLayer`, `tokio::time::timeout`).
    let timed_out = |e: &(dyn StdError + 'static)| {
        chain(e).any(|e| {
            e.is::<TimedOut>()
                || e.is::<DeadlineExceeded>()
                || e.is::<tower::timeout::error::Elapsed>()
                || e.is::<tokio::time::error::Elapsed>()
                || e.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        })
    };
    // Of attempts the failover layer gave up on, the last one's cause
    // decides (not the reason that ended them, such as the `NoBackend` met
    // once every backend was tried); else the error itself.
    let exhausted = find::<Exhausted>(err);
    let decisive = match exhausted.and_then(|e| e.attempts().last()) {
        Some((_, cause)) => &**cause as &(dyn StdError + 'static),
        None => err,
    };
    // The deadline may also pass between attempts (during a backoff), and
    // a last attempt may time out before it reached any backend (waiting
    // in a balancer's queue): the reason that ended the attempts says so.
    let ended_by_timeout = exhausted
        .and_then(Exhausted::reason)
        .is_some_and(|reason| timed_out(reason));
    // (A refused request anywhere in the chain is a 400: the last
    // attempt's cause is the failover layer's error's source.)
    if let Some(invalid) = find::<InvalidRequest>(err) {
        // A client too slow sending its request's body.
        if timed_out(invalid) {
            Failure::ClientTimeout
        } else {
            Failure::Invalid
        }
    } else if find::<SessionUnavailable>(err).is_some() {
        // A strict session whose backend could not take it, or whose
        // record could not be read, whatever the error (kept as the
        // source) was: a store that timed out asked no backend.
        Failure::Unavailable
    } else if timed_out(decisive) || ended_by_timeout {
        // A connect that timed out (its own timeout, or a per-try timeout
        // that cut it), not a deadline that passed.
        let unsent = !ended_by_timeout
            && never_sent(decisive)
            && find::<DeadlineExceeded>(decisive).is_none();
        Failure::Timeout { unsent }
    } else if find::<NoBackend>(err).is_some()
        // A load-shedding layer around the stack or a backend that found
        // it at capacity.
        || find::<tower::load_shed::error::Overloaded>(err).is_some()
        || exhausted.is_some_and(|e| e.attempts().is_empty())
    {
        Failure::Unavailable
    } else {
        Failure::Failed
    }
}

/// The gRPC status a gateway should answer a gRPC call with for an error
/// of the tower-ha stack: the counterpart of [`gateway_status`].
///
/// - A call that timed out (`504 Gateway Timeout`: at its backend, by the
///   failover layer's per-try timeout or a backend silent for the read
///   timeout, or by its deadline, the layer's or the client's
///   `grpc-timeout`; also `408 Request Timeout`) is `DEADLINE_EXCEEDED`
///   (4), as Envoy and Linkerd answer a call they timed out. gRPC's own
///   reading of a `504` would be `UNAVAILABLE`, which tells a client to
///   try again, and a call whose time ran out has none left for that.
/// - A connect that timed out (the `504` of a [`NotSent`] I/O timeout,
///   such as `HttpClient::connect_timeout`'s, or of a per-try timeout
///   that cut a connect) reached no server: it is `UNAVAILABLE` (14), as
///   gRPC's clients call a server they cannot reach.
/// - Otherwise it is the code a gRPC client reads from the HTTP status
///   when an answer has no `grpc-status` (gRPC's mapping of HTTP
///   statuses): `UNAVAILABLE` for `502` and `503` (no backend could
///   take the call, or its backend failed: worth trying again, as gRPC
///   clients' retry policies do for that code), `INTERNAL` (13) for `400`
///   (a request refused as invalid).
///
/// [`GrpcCall::answer`] sends it.
///
/// ```
/// use std::io::{Error, ErrorKind};
/// use tower_ha::error::{grpc_status, BackendError, NoBackend, NotSent};
///
/// assert_eq!(grpc_status(&NoBackend::default()), 14);
/// // A backend silent for the read timeout.
/// let silent = BackendError::new("a".into(), Error::from(ErrorKind::TimedOut));
/// assert_eq!(grpc_status(&silent), 4);
/// // A connect that timed out.
/// let unreachable = NotSent::new(Error::from(ErrorKind::TimedOut));
/// assert_eq!(grpc_status(&BackendError::new("a".into(), unreachable)), 14);
/// ```
pub fn grpc_status(err: &(dyn StdError + 'static)) -> u32 {
    failure(err).grpc_status()
}

/// A gRPC call, as far as a gateway's answer to its failure needs it: its
/// request's content type, read before the request goes into the stack.
///
/// gRPC clients read how a call went from its `grpc-status`, not from the
/// HTTP status: one answered `503` with a text body reports `UNAVAILABLE`
/// with a message about an unexpected content type, and a `504` becomes
/// `UNAVAILABLE` too, which invites a retry after the deadline.
/// [`answer`](Self::answer) sends what a gRPC server sends for a call
/// that fails before any message, as Envoy answers the gRPC calls it
/// fails itself: a "Trailers-Only" response.
///
/// ```
/// use http::{header::CONTENT_TYPE, Request, StatusCode};
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower_ha::error::{GrpcCall, NoBackend};
///
/// let request = Request::post("/inventory.Stock/Get")
///     .header(CONTENT_TYPE, "application/grpc+proto")
///     .body(())
///     .unwrap();
/// let call = GrpcCall::of(request.headers()).expect("a gRPC call");
/// // ... the stack fails the request:
/// let answer = call.answer::<Full<Bytes>>(&NoBackend::default());
/// assert_eq!(answer.status(), StatusCode::OK);
/// assert_eq!(answer.headers()["grpc-status"], "14");
/// assert_eq!(answer.headers()["grpc-message"], "Service Unavailable");
/// assert_eq!(answer.headers()[CONTENT_TYPE], "application/grpc+proto");
///
/// let page = Request::get("/").body(()).unwrap();
/// assert!(GrpcCall::of(page.headers()).is_none());
/// ```
#[derive(Debug, Clone)]
pub struct GrpcCall {
    content_type: http::HeaderValue,
}

impl GrpcCall {
    /// The call whose request has `headers`, or `None` when their content
    /// type is not gRPC's: `application/grpc`, its `+proto`, `+json`, ...
    /// forms, and gRPC-Web's (`application/grpc-web`,
    /// `application/grpc-web-text`, and their forms), compared without
    /// regard to case.
    pub fn of(headers: &http::HeaderMap) -> Option<Self> {
        use crate::key::strip_prefix_ignore_case;
        let content_type = headers.get(http::header::CONTENT_TYPE)?;
        let mut rest = crate::classify::grpc_subtype_of(content_type)?;
        if let Some(web) = strip_prefix_ignore_case(rest, b"-web") {
            rest = strip_prefix_ignore_case(web, b"-text").unwrap_or(web);
        }
        matches!(rest.first(), None | Some(b'+' | b';')).then(|| GrpcCall {
            content_type: content_type.clone(),
        })
    }

    /// The answer to this call when the stack failed it with `err`: `200
    /// OK`, the request's content type, a `grpc-status` of
    /// [`grpc_status(err)`](grpc_status), a `grpc-message` of the reason
    /// phrase of [`gateway_status(err)`](gateway_status) (`Service
    /// Unavailable`; what failed, which names backends and system errors,
    /// is no business of the client's), and `B`'s default, which must be
    /// an empty body (`Full`, `Empty`): hyper then ends the stream with
    /// the head (over HTTP/1.1, with `content-length: 0`).
    pub fn answer<B: Default>(&self, err: &(dyn StdError + 'static)) -> http::Response<B> {
        let failure = failure(err);
        let mut response = http::Response::new(B::default());
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, self.content_type.clone());
        headers.insert(
            crate::classify::GRPC_STATUS,
            http::HeaderValue::from(failure.grpc_status()),
        );
        if let Some(reason) = failure.status().canonical_reason() {
            headers.insert(GRPC_MESSAGE, http::HeaderValue::from_static(reason));
        }
        response
    }
}

/// The field a gRPC status's message is sent in.
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// `uri` with everything between its scheme (or, without one, position
/// `from`) and its last `@`, if any, shown as `***`, so that no password
/// is shown in an error or a log, one holding `/`, `?` or `#` included.
#[cfg_attr(
    not(any(feature = "hyper-client", feature = "webhook")),
    allow(dead_code)
)]
pub(crate) fn hide_user_info(uri: &str, from: usize) -> String {
    let start = after_scheme(uri, from);
    match uri[start..].rfind('@') {
        Some(at) => format!("{}***{}", &uri[..start], &uri[start + at..]),
        None => uri.to_owned(),
    }
}

/// Where what follows `uri`'s scheme and its `://` starts, or `from`
/// when the text from `from` up to the first `://` is no scheme (RFC 3986
/// section 3.1: a letter, then letters, digits, `+`, `-` or `.`): a URL
/// written without one may hold `://` in its password or query.
#[cfg_attr(
    not(any(feature = "hyper-client", feature = "webhook", feature = "redis")),
    allow(dead_code)
)]
pub(crate) fn after_scheme(uri: &str, from: usize) -> usize {
    let Some(i) = uri.get(from..).and_then(|rest| rest.find("://")) else {
        return from;
    };
    let scheme = &uri.as_bytes()[from..from + i];
    let valid = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && (scheme.iter()).all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if valid {
        from + i + 3
    } else {
        from
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn user_info_is_hidden_and_nothing_else() {
        assert_eq!(hide_user_info("\"http://a/b\"", 1), "\"http://a/b\"");
        assert_eq!(hide_user_info("http://u:p@a/b", 0), "http://***@a/b");
        assert_eq!(hide_user_info("\"u:p@a:1\"", 1), "\"***@a:1\"");
        assert_eq!(hide_user_info("http://u:p/q?r#s@a", 0), "http://***@a");
        // `://` in a password is not the end of a scheme.
        assert_eq!(hide_user_info("u:pa://ss@a:1", 0), "***@a:1");
        assert_eq!(hide_user_info("\"u:p://w@a\"", 1), "\"***@a\"");
        assert_eq!(after_scheme("redis+unix:///s", 0), 13);
        assert_eq!(after_scheme("\"h2.c-x://a", 1), 10);
        assert_eq!(after_scheme("://a", 0), 0);
        assert_eq!(after_scheme("1http://a", 0), 0);
    }
    use http::StatusCode;

    #[test]
    fn refused_connections_and_not_sent_errors_are_not_sent() {
        use crate::error::BoxError;

        /// An error that keeps its cause as a source, as hyper-util's
        /// client error does.
        #[derive(Debug)]
        struct Connect(io::Error);
        impl std::fmt::Display for Connect {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl StdError for Connect {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }

        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let backend = |e: BoxError| -> BoxError { Box::new(BackendError::new("a".into(), e)) };
        for err in [
            backend(Box::new(Connect(refused()))),
            backend(Box::new(refused())),
            backend(Box::new(NotSent::new("dns"))),
            Box::new(Connect(refused())),
        ] {
            assert!(never_sent(&*err), "{err:?}");
        }
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        for err in [
            backend(Box::new(Connect(reset()))),
            backend("refused".into()),
            Box::new(reset()),
        ] {
            assert!(!never_sent(&*err), "{err:?}");
        }
    }

    #[test]
    fn errors_wrapped_in_an_io_error_are_found() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let wrapped = std::io::Error::other(NotSent::new(refused()));
        assert!(find::<NotSent>(&wrapped).is_some());
        assert!(never_sent(&wrapped));
        let err = BackendError::new("a".into(), std::io::Error::other(refused()));
        assert!(err.is_not_sent());
        // A request's own fault, however wrapped: not the backend's.
        let invalid = std::io::Error::other(InvalidRequest::new("bad"));
        let err = BackendError::new("a".into(), invalid);
        assert_eq!(gateway_status(&err), StatusCode::BAD_REQUEST);
        // The wrapped error's own sources follow it.
        let deeper = std::io::Error::other(BackendError::new("b".into(), NotSent::new(refused())));
        assert!(find::<NotSent>(&deeper).is_some());
        assert_eq!(
            Report(&deeper).to_string(),
            "backend b failed before the request was sent: request not sent: connection refused"
        );
    }

    #[test]
    fn a_report_shows_each_cause_once() {
        use crate::failover::Exhausted;
        let io = |text: &str| std::io::Error::other(text.to_owned());
        // A plain chain.
        let err = BackendError::new("a".into(), io("reset"));
        assert_eq!(Report(&err).to_string(), "backend a failed: reset");
        // `Exhausted` shows each attempt's cause, the last of which is its
        // source: not repeated. The sources of that cause are shown, even
        // one whose text an earlier attempt's cause holds too.
        let attempts: Vec<(BackendId, BoxError)> = vec![
            ("a".into(), Box::new(io("timed out"))),
            (
                "b".into(),
                Box::new(BackendError::new("b".into(), io("timed out"))),
            ),
        ];
        let err = Exhausted::new(attempts, None);
        assert_eq!(
            Report(&err).to_string(),
            "2 attempts failed: a (timed out); b (backend b failed): timed out"
        );
        // As a stack's attempts fail: each a `BackendError`, whose own
        // text names only the backend. An earlier one's cause is shown
        // through it, though no source leads there.
        let attempts: Vec<(BackendId, BoxError)> = vec![
            (
                "a".into(),
                Box::new(BackendError::new("a".into(), io("connection refused"))),
            ),
            (
                "b".into(),
                Box::new(BackendError::new("b".into(), io("reset"))),
            ),
        ];
        let err = Exhausted::new(attempts, None);
        assert_eq!(
            Report(&err).to_string(),
            "2 attempts failed: a (backend a failed: connection refused); b (backend b failed): reset"
        );
    }

    #[test]
    fn gateway_statuses() {
        use crate::failover::{Exhausted, TimedOut};
        use std::time::Duration;
        let boxed = |e: BoxError| gateway_status(&*e);
        assert_eq!(
            boxed(Box::new(NoBackend::new())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let timeout: BoxError = Box::new(TimedOut::new(Duration::from_secs(1)));
        assert_eq!(
            boxed(Box::new(BackendError::new("a".into(), timeout))),
            StatusCode::GATEWAY_TIMEOUT
        );
        let refused: BoxError = Box::new(NotSent::new("refused"));
        let exhausted = Exhausted::new(vec![("a".into(), refused)], None);
        assert_eq!(boxed(Box::new(exhausted)), StatusCode::BAD_GATEWAY);
        let nothing = Exhausted::new(Vec::new(), Some(Box::new(NoBackend::new())));
        assert_eq!(boxed(Box::new(nothing)), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(boxed("anything else".into()), StatusCode::BAD_GATEWAY);
        // A connect that timed out, as hyper-util's connector reports it.
        let connect = || {
            let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout");
            NotSent::new(io)
        };
        assert_eq!(
            boxed(Box::new(BackendError::new("a".into(), connect()))),
            StatusCode::GATEWAY_TIMEOUT
        );
        let attempts: Vec<(BackendId, BoxError)> = vec![
            ("a".into(), Box::new(NotSent::new("refused"))),
            ("b".into(), Box::new(connect())),
        ];
        let exhausted = Exhausted::new(attempts, Some(Box::new(NoBackend::new())));
        assert_eq!(boxed(Box::new(exhausted)), StatusCode::GATEWAY_TIMEOUT);
        // A 503, then a retry whose per-try timeout passed while it waited
        // for a backend: the last attempt timed out.
        let failed: Vec<(BackendId, BoxError)> = vec![("a".into(), "503".into())];
        let retry_timed_out = TimedOut::new(Duration::from_millis(100));
        let exhausted = Exhausted::new(failed, Some(Box::new(retry_timed_out)));
        assert_eq!(boxed(Box::new(exhausted)), StatusCode::GATEWAY_TIMEOUT);
        // The errors of tower's and tokio's own timeouts and load
        // shedding, put around the stack or a backend.
        let elapsed = || tower::timeout::error::Elapsed::new();
        assert_eq!(boxed(elapsed().into()), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            boxed(Box::new(BackendError::new("a".into(), elapsed()))),
            StatusCode::GATEWAY_TIMEOUT
        );
        let shed = tower::load_shed::error::Overloaded::new();
        assert_eq!(boxed(shed.into()), StatusCode::SERVICE_UNAVAILABLE);
        // A strict session whose backend's connect timed out: refused, as
        // any strict session whose backend cannot take it.
        let strict = crate::sticky::SessionUnavailable::new("k", false, "a".into())
            .failed(Box::new(BackendError::new("a".into(), connect())));
        assert_eq!(boxed(Box::new(strict)), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_timeout_is_a_gateway_timeout() {
        let elapsed = || async {
            let never = std::future::pending::<()>();
            tokio::time::timeout(std::time::Duration::from_secs(1), never)
                .await
                .unwrap_err()
        };
        let err = BackendError::new("a".into(), elapsed().await);
        assert_eq!(gateway_status(&err), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(grpc_status(&err), crate::classify::GRPC_DEADLINE_EXCEEDED);
        // A strict session whose store timed out (the stores time their
        // calls with `tokio::time::timeout`) asked no backend: it is
        // unavailable, as when the store refused.
        for cause in [
            crate::store::StoreError::timeout(elapsed().await),
            crate::store::StoreError::timeout(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        ] {
            let unreadable = crate::sticky::SessionUnavailable::unreadable(
                "k",
                false,
                None,
                std::sync::Arc::new(cause),
            );
            assert_eq!(gateway_status(&unreadable), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(grpc_status(&unreadable), crate::classify::GRPC_UNAVAILABLE);
        }
    }

    #[test]
    fn grpc_statuses_follow_the_gateway_statuses() {
        use crate::classify::{GRPC_DEADLINE_EXCEEDED, GRPC_INTERNAL, GRPC_UNAVAILABLE};
        use crate::failover::{DeadlineExceeded, Exhausted, TimedOut};
        use std::time::Duration;
        let timed_out = || BackendError::new("a".into(), TimedOut::new(Duration::from_secs(1)));
        assert_eq!(grpc_status(&timed_out()), GRPC_DEADLINE_EXCEEDED);
        let attempts: Vec<(BackendId, BoxError)> = vec![("a".into(), "503".into())];
        let deadline = DeadlineExceeded::new(Duration::from_secs(2), false);
        let ended = Exhausted::new(attempts, Some(Box::new(deadline)));
        assert_eq!(grpc_status(&ended), GRPC_DEADLINE_EXCEEDED);
        let slow = InvalidRequest::client_too_slow("5 s".into());
        assert_eq!(grpc_status(&slow), GRPC_DEADLINE_EXCEEDED);
        assert_eq!(grpc_status(&InvalidRequest::new("bad")), GRPC_INTERNAL);
        assert_eq!(grpc_status(&NoBackend::at_limit()), GRPC_UNAVAILABLE);
        // A connect that timed out reached no server, on every backend,
        // also one that the per-try timeout cut; a per-try timeout at the
        // backend is the call's deadline.
        let connect = || {
            let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout");
            BackendError::new("a".into(), NotSent::new(io))
        };
        assert_eq!(grpc_status(&connect()), GRPC_UNAVAILABLE);
        let attempts: Vec<(BackendId, BoxError)> = vec![
            ("a".into(), Box::new(connect())),
            ("b".into(), Box::new(connect())),
        ];
        let blackholed = Exhausted::new(attempts, Some(Box::new(NoBackend::new())));
        assert_eq!(grpc_status(&blackholed), GRPC_UNAVAILABLE);
        assert_eq!(gateway_status(&blackholed), StatusCode::GATEWAY_TIMEOUT);
        let cut = TimedOut::new(Duration::from_millis(100)).not_sent(true);
        assert_eq!(grpc_status(&cut), GRPC_UNAVAILABLE);
        let waited = TimedOut::new(Duration::from_millis(100));
        assert_eq!(grpc_status(&waited), GRPC_DEADLINE_EXCEEDED);
        let reset = BackendError::new("a".into(), "connection reset");
        assert_eq!(grpc_status(&reset), GRPC_UNAVAILABLE);
    }

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        let headers = |content_type: &'static str| {
            let mut headers = http::HeaderMap::new();
            let value = http::HeaderValue::from_static(content_type);
            headers.insert(http::header::CONTENT_TYPE, value);
            headers
        };
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc;charset=utf-8",
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc-Web-Text",
            "application/grpc-web-text+proto",
        ] {
            let call = GrpcCall::of(&headers(grpc)).expect(grpc);
            let answer = call.answer::<String>(&NoBackend::new());
            assert_eq!(answer.headers()[http::header::CONTENT_TYPE], grpc);
            assert_eq!(answer.status(), StatusCode::OK);
            assert!(answer.body().is_empty());
        }
        for other in [
            "application/grpcx",
            "application/grpc-webx",
            "application/grpc-text",
            "application/json",
            "text/plain",
            "application/grp",
        ] {
            assert!(GrpcCall::of(&headers(other)).is_none(), "{other}");
        }
        assert!(GrpcCall::of(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn a_grpc_answer_names_the_status_and_no_cause() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        let call = GrpcCall::of(&headers).unwrap();
        let err = BackendError::new("10.0.0.7:9000".into(), "connection reset by peer");
        let answer = call.answer::<String>(&err);
        assert_eq!(answer.headers()["grpc-status"], "14");
        assert_eq!(answer.headers()["grpc-message"], "Bad Gateway");
        assert_eq!(answer.headers().len(), 3, "{:?}", answer.headers());
        let timed_out = TimedOut::new(std::time::Duration::from_secs(1));
        let answer = call.answer::<String>(&timed_out);
        assert_eq!(answer.headers()["grpc-status"], "4");
        assert_eq!(answer.headers()["grpc-message"], "Gateway Timeout");
    }

    #[test]
    fn an_invalid_request_is_a_bad_request_wherever_it_is() {
        use crate::failover::Exhausted;
        let boxed = |e: BoxError| gateway_status(&*e);
        let invalid = || InvalidRequest::with_source("bad path", "a cause");
        assert_eq!(boxed(Box::new(invalid())), StatusCode::BAD_REQUEST);
        let wrapped = BackendError::new("a".into(), invalid());
        assert_eq!(boxed(Box::new(wrapped)), StatusCode::BAD_REQUEST);
        // Tried on every backend, then none was left.
        let attempts: Vec<(BackendId, BoxError)> = vec![
            ("a".into(), Box::new(invalid())),
            ("b".into(), Box::new(invalid())),
        ];
        let exhausted = Exhausted::new(attempts, Some(Box::new(NoBackend::new())));
        assert_eq!(boxed(Box::new(exhausted)), StatusCode::BAD_REQUEST);
        let err = invalid();
        assert_eq!(err.reason(), "bad path");
        assert_eq!(err.to_string(), "invalid request: bad path");
        assert_eq!(err.source().unwrap().to_string(), "a cause");
        assert!(InvalidRequest::new("x").source().is_none());
    }
}
