//! [`WebhookStore`]: sessions kept by the user's own HTTP service, in
//! Enterprise Gateway's webhook wire format.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use parking_lot::Mutex;

use super::{ConfigError, Loaded, Session, SessionStore, StoreError, StoreFuture, MAX_READ};

/// Enterprise Gateway's timeout for each webhook call.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_RETRIES: u32 = 3;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(100);
/// How many calls a store and its clones make at once by default.
const DEFAULT_CONCURRENCY: usize = 64;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The largest answer `load_all` reads by default: every session at once.
const DEFAULT_MAX_LISTING: usize = 256 * 1024 * 1024;
/// How long a connection to the service is kept open unused: less than
/// the keep-alive of common servers (Node.js and uvicorn close after 5 s),
/// so that a write rarely goes out on a connection the service is closing,
/// which fails it unretried.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// The key of each element of a load answer.
const SESSION_FIELD: &str = "kernel_session";

/// Sessions kept by an HTTP service of your own (in front of any database),
/// spoken to in the wire format of Enterprise Gateway's webhook session
/// persistence, so an existing Enterprise Gateway webhook service works
/// unchanged.
///
/// | call | request | success |
/// |---|---|---|
/// | [`save`](SessionStore::save) | `POST {url}/{id}`, body `{"<id>": session}` | 204 (as Enterprise Gateway expects), 200 or 201 |
/// | [`delete`](SessionStore::delete) | `DELETE {url}`, body `["<id>", ...]` | 204, 200 or 201 |
/// | [`load_all`](SessionStore::load_all) | `GET {url}` | 200, `[{"kernel_session": {"<id>": session}}, ...]`; 204 is none |
/// | [`load`](SessionStore::load) | `GET {url}/{id}` | 200, `{"kernel_session": {"<id>": session}}`; 404 or 204 is "no such session" |
///
/// `{id}` is the session key, percent-encoded as one path segment; bodies
/// are JSON (`Content-Type: application/json`); `session` is the
/// [`Session`] as JSON (times in Unix milliseconds). Deleting nothing sends
/// no request. The keys `""`, `.` and `..` cannot be a segment of their
/// own (a server that normalises the path reads them as `{url}/` or
/// `{url}/..`): saving or loading them fails with
/// [`is_invalid_key`](StoreError::is_invalid_key), as it does for a key
/// that makes the URL longer than a URI may be (about 64 KiB).
///
/// # Failures
///
/// Every answer other than success is a typed [`StoreError`]:
///
/// * 401 and 403: [`is_unauthorized`](StoreError::is_unauthorized);
/// * 404 (except when loading one session):
///   [`is_not_found`](StoreError::is_not_found), the endpoint is missing;
/// * any other status that is not a success, a 5xx, 408 or 429:
///   [`is_rejected`](StoreError::is_rejected), and so is an answer
///   larger than 64 MiB (for `load_all`, than
///   [`max_listing`](WebhookStoreBuilder::max_listing), 256 MiB by
///   default), and a session that would not fit in an answer read back
///   (64 MiB less 64 KiB as JSON), which is refused before it is sent;
/// * a body that is not JSON or has the wrong shape:
///   [`is_corrupt`](StoreError::is_corrupt); in `load_all`, one bad element
///   (one holding bytes that are not UTF-8 included) is skipped and
///   reported in [`Loaded::skipped`] while the others load;
/// * connection errors (for a save or a delete, only those before the
///   request was written: see below), 5xx answers (but see 504 below),
///   `408 Request Timeout` and `429 Too Many Requests` are retried up to
///   [`retries`](WebhookStoreBuilder::retries) times with exponential
///   backoff (waiting longer when the answer's `Retry-After` asks for it
///   in seconds, at most 10 s), then fail as
///   [`is_unavailable`](StoreError::is_unavailable);
/// * an attempt that takes longer than the
///   [`timeout`](WebhookStoreBuilder::timeout) fails as
///   [`is_timeout`](StoreError::is_timeout) and is not retried (the service
///   may still be working on it), and so does a save or a delete answered
///   `504 Gateway Timeout` (a proxy in front of the service gave up on it);
///   a load answered 504 is retried as any 5xx;
/// * a save or a delete whose connection fails after the request was
///   written (reset, closed without an answer, or a success answer cut
///   off in its body; a failure answer cut off counts by its status, as
///   above) fails as
///   [`is_unavailable`](StoreError::is_unavailable) and is not retried, for
///   the same reason. A connection left unused is closed after 4 s, before
///   common servers close theirs (Node.js and uvicorn after 5 s), so that
///   a write rarely meets a service closing the connection it reuses.
///
/// # Authentication
///
/// Basic sends the credentials with every request. Digest (RFC 7616)
/// answers the service's challenge and reuses it for the following
/// requests, answering a fresh challenge when the service sends one (a
/// stale nonce); a nonce stale again at once is retried as a connection
/// error is (requests that share a challenge may reach a server that
/// checks their order out of order). It takes the algorithms MD5, SHA-256 and SHA-512-256,
/// each also in its `-sess` form. It answers with `qop=auth-int` (which
/// covers the body) when the challenge offers it and the request has a
/// body (a save or a delete), else with `qop=auth`, or with no `qop` when
/// the challenge offers none. Credentials in the URL
/// (`http://user:password@host/...`) are not sent: such a URL is refused
/// by [`build`](WebhookStoreBuilder::build).
///
/// Only `http://` URLs are supported: put the service on a private network
/// or behind a local TLS proxy.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), tower_ha::store::StoreError> {
/// use std::time::Duration;
/// use tower_ha::store::{Session, SessionStore, WebhookStore};
///
/// let store = WebhookStore::builder("http://sessions.internal:8080/api/sessions")
///     .digest_auth("gateway", "s3cret")
///     .timeout(Duration::from_secs(5))
///     .retries(3)
///     .build()?;
/// store.save(&Session::new("kernel-42", "node-a".into())).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WebhookStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// `scheme://authority`, no trailing slash.
    origin: String,
    /// The URL's path as given (`/` when it has none): what `load_all`
    /// and `delete` ask for; `{id}` follows it without its trailing slash.
    collection: String,
    /// The URL's query, with its `?`, or empty.
    query: String,
    auth: Auth,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    max_listing: usize,
    /// The age at which the service prunes a record left alone.
    ttl: Option<Duration>,
    /// One per attempt under way (see `max_concurrent_calls`).
    permits: tokio::sync::Semaphore,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The last Digest challenge, reused (with a growing `nc`) until the
    /// service sends another.
    challenge: Mutex<Option<digest_auth::WwwAuthenticateHeader>>,
}

#[derive(Clone)]
enum Auth {
    None,
    Basic(String),
    Digest { user: String, password: String },
}

/// Builds a [`WebhookStore`]; made by [`WebhookStore::builder`].
#[must_use]
pub struct WebhookStoreBuilder {
    url: String,
    auth: Auth,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
    max_listing: usize,
    ttl: Option<Duration>,
    concurrency: usize,
}

impl WebhookStore {
    /// A builder for a store at `url` (`http://host:port/path`), with no
    /// authentication, a 60 s timeout per attempt (Enterprise Gateway's),
    /// 3 retries and a 100 ms initial backoff.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use tower_ha::store::{SessionStore, WebhookStore};
    ///
    /// // A port nothing listens on.
    /// let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    /// let store = WebhookStore::builder(format!("http://127.0.0.1:{port}/sessions"))
    ///     .retries(2)
    ///     .backoff(Duration::from_millis(1))
    ///     .build()
    ///     .unwrap();
    /// let err = store.load("kernel-42").await.unwrap_err();
    /// assert!(err.is_unavailable() && err.is_transient()); // after 3 attempts
    /// # }
    /// ```
    pub fn builder(url: impl Into<String>) -> WebhookStoreBuilder {
        WebhookStoreBuilder {
            url: url.into(),
            auth: Auth::None,
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            backoff: DEFAULT_BACKOFF,
            max_listing: DEFAULT_MAX_LISTING,
            concurrency: DEFAULT_CONCURRENCY,
            ttl: None,
        }
    }

    /// The URL sessions are kept at, with its query, if any (the store's
    /// `Debug` and its errors show `?…` instead, as a query may hold a
    /// secret).
    pub fn url(&self) -> String {
        format!(
            "{}{}{}",
            self.inner.origin, self.inner.collection, self.inner.query
        )
    }
}

impl WebhookStoreBuilder {
    /// Sends `user` and `password` with HTTP Basic authentication.
    pub fn basic_auth(mut self, user: impl AsRef<str>, password: impl AsRef<str>) -> Self {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            user.as_ref(),
            password.as_ref()
        ));
        self.auth = Auth::Basic(format!("Basic {token}"));
        self
    }

    /// Answers the service's HTTP Digest challenges as `user` with
    /// `password`.
    pub fn digest_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::Digest {
            user: user.into(),
            password: password.into(),
        };
        self
    }

    /// The longest one attempt (request and whole answer) may take (above
    /// zero: [`build`](Self::build) refuses a zero timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times a call is retried after a connection error (for a
    /// save or a delete, one before the request was written) or an
    /// answer that says to try later (a 5xx, 408 or 429) (0: never), so
    /// the service sees at most `retries + 1` attempts per call. With
    /// [Digest](Self::digest_auth) authentication, an attempt that has no
    /// challenge yet, or whose challenge went stale, is sent once more
    /// with the challenge the `401` answer brings: up to twice as many
    /// requests.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// The wait before the first retry, doubled before each next one (at
    /// most 10 s). An answer whose `Retry-After` header asks for a longer
    /// wait, in seconds, gets it, up to 10 s.
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The largest answer [`load_all`](SessionStore::load_all) reads, in
    /// bytes (default 256 MiB, about a million sessions with a little
    /// data each): it holds every session at once. A larger answer fails
    /// as [`is_rejected`](StoreError::is_rejected). Every other answer
    /// holds one session at most and is read up to 64 MiB.
    pub fn max_listing(mut self, bytes: usize) -> Self {
        self.max_listing = bytes;
        self
    }

    /// How many attempts the store and its clones have under way at once
    /// (default 64; 0 counts as 1, and more than tokio's semaphores hold
    /// as their maximum). Over HTTP/1.1 each one holds a
    /// connection: a service that stops answering while sessions keep
    /// coming would otherwise be sent one more connection per call, until
    /// the process ran out of file descriptors. An attempt waits for its
    /// turn within its [`timeout`](Self::timeout), and fails as
    /// [`is_timeout`](StoreError::is_timeout) if it gets none.
    pub fn max_concurrent_calls(mut self, calls: usize) -> Self {
        self.concurrency = calls;
        self
    }

    /// The age at which the service (or its database) prunes a record
    /// that was neither saved nor loaded: the store does not prune, it
    /// tells the sticky layer, which then refreshes every session it
    /// serves each half `ttl` (see [`SessionStore::refresh_interval`]), so
    /// only sessions nobody uses are pruned, and, in strict standalone
    /// mode, forgets the key of a record left alone for twice `ttl`.
    /// Without it (the default), the layer refreshes only with
    /// [`StickyLayer::refresh_every`](crate::sticky::StickyLayer::refresh_every),
    /// and in strict standalone mode keeps the key of every record it
    /// wrote until the session ends. At least 1 ms; longer than about a
    /// century counts as a century.
    ///
    /// A refresh is a save: with several replicas, each saves its own copy
    /// of a session it serves, over a move or a delete made through
    /// another replica since, until the session idles out of its table
    /// (give the layer a short `idle_timeout`, or share sessions through
    /// Redis, whose refresh writes nothing).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(super::clamp_ttl(ttl));
        self
    }

    /// The store. Fails with an [`other`](StoreError::is_other) error if the
    /// timeout is zero, or if the URL cannot be parsed, is not an `http://`
    /// URL, has a port that is not a number, or holds an `@` anywhere
    /// (credentials, as in `http://user:password@host/...`, would not be sent,
    /// and a password holding `/`, `?` or `#` would turn the rest into a path:
    /// use [`basic_auth`](Self::basic_auth) or
    /// [`digest_auth`](Self::digest_auth); write an `@` in a path as `%40`).
    pub fn build(self) -> Result<WebhookStore, StoreError> {
        if self.timeout.is_zero() {
            return Err(super::zero_timeout("webhook"));
        }
        let shown = redact(&self.url);
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| StoreError::other(e).with_message(format!("bad URL {shown:?}")))?;
        let bad = |why: &str| {
            StoreError::other(ConfigError(format!("{why}: {shown:?}")))
                .with_message("bad webhook URL")
        };
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => return Err(bad("only http:// URLs are supported")),
            None => return Err(bad("the URL needs a scheme and a host")),
        }
        let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
            return Err(bad("the URL needs a host"));
        };
        // Anywhere in the URL: a password holding `/`, `?` or `#` ends the
        // authority early, and what follows would be taken for a path.
        if self.url.contains('@') {
            let why = "credentials in the URL are not sent; \
                       use .basic_auth(user, password) or .digest_auth(user, password) \
                       (write an @ in a path as %40)";
            return Err(bad(why));
        }
        if !crate::uri::has_valid_port(authority) {
            return Err(bad("the port is not a number from 0 to 65535"));
        }
        let collection = match uri.path() {
            "" => "/".to_owned(),
            path => path.to_owned(),
        };
        let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        // With a timer the pool closes connections idle for
        // `IDLE_TIMEOUT` (without one it only skips them when it next
        // picks a connection, and keeps them open meanwhile).
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .build_http();
        Ok(WebhookStore {
            inner: Arc::new(Inner {
                origin: format!("http://{authority}"),
                collection,
                query,
                auth: self.auth,
                timeout: self.timeout,
                retries: self.retries,
                backoff: self.backoff,
                max_listing: self.max_listing,
                permits: tokio::sync::Semaphore::new(
                    self.concurrency
                        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
                ),
                ttl: self.ttl,
                client,
                challenge: Mutex::new(None),
            }),
        })
    }
}

impl fmt::Debug for WebhookStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookStore")
            .field("url", &redact(&self.url()))
            .field("auth", &self.inner.auth)
            .field("timeout", &self.inner.timeout)
            .field("retries", &self.inner.retries)
            .field("backoff", &self.inner.backoff)
            .field("ttl", &self.inner.ttl)
            .finish()
    }
}

impl fmt::Debug for WebhookStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookStoreBuilder")
            .field("url", &redact(&self.url))
            .field("auth", &self.auth)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("backoff", &self.backoff)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// Never shows credentials.
impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Auth::None => "None",
            Auth::Basic(_) => "Basic",
            Auth::Digest { .. } => "Digest",
        })
    }
}

impl SessionStore for WebhookStore {
    /// Half the [`ttl`](WebhookStoreBuilder::ttl), if any: a session in
    /// use is saved again before the service would prune its record.
    fn refresh_interval(&self) -> Option<Duration> {
        self.inner.ttl.map(|ttl| ttl / 2)
    }

    fn load_all(&self) -> StoreFuture<'_, Loaded> {
        Box::pin(async move {
            let path = self.inner.collection.clone();
            let limit = self.inner.max_listing;
            let (status, body) = self.inner.call(Method::GET, &path, None, limit).await?;
            if !holds_records(status, &body, "load all")? {
                return Ok(Loaded::default());
            }
            let runtime = tokio::runtime::Handle::try_current();
            match runtime {
                // Parsing takes about a millisecond per megabyte, which an
                // async worker's other tasks would wait for.
                Ok(runtime) if body.len() > PARSE_INLINE => {
                    match runtime.spawn_blocking(move || parse_all(&body)).await {
                        Ok(loaded) => loaded,
                        Err(e) => Err(StoreError::other(e)
                            .with_message("parsing the listing did not complete")),
                    }
                }
                _ => parse_all(&body),
            }
        })
    }

    fn load<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Session>> {
        Box::pin(async move {
            let path = self.inner.session_path(key)?;
            let (status, body) = self.inner.call(Method::GET, &path, None, MAX_READ).await?;
            if status == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !holds_records(status, &body, "load")? {
                return Ok(None);
            }
            let value: serde_json::Value = serde_json::from_slice(without_bom(&body))
                .map_err(|e| StoreError::corrupt(e).with_message("the answer is not JSON"))?;
            let (id, session) = parse_element(value)?;
            if id != key {
                return Err(StoreError::corrupt(ShapeError(format!(
                    "asked for {key:?}, got {id:?}"
                )))
                .with_message("the answer holds another session"));
            }
            Ok(Some(session))
        })
    }

    fn save<'a>(&'a self, session: &'a Session) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            session.check_depth()?;
            let mut body = serde_json::Map::new();
            let record = serde_json::to_value(session).map_err(|e| {
                StoreError::other(e).with_message("session cannot be encoded as JSON")
            })?;
            body.insert(session.key.clone(), record);
            let body = serde_json::to_vec(&body).map_err(StoreError::other)?;
            super::check_size(body.len())?;
            let path = self.inner.session_path(&session.key)?;
            let (status, answer) = self
                .inner
                .call(Method::POST, &path, Some(Bytes::from(body)), MAX_READ)
                .await?;
            expect_success(status, &answer, "save")
        })
    }

    fn delete<'a>(&'a self, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let body = serde_json::to_vec(keys).map_err(StoreError::other)?;
            let path = self.inner.collection.clone();
            let (status, answer) = self
                .inner
                .call(Method::DELETE, &path, Some(Bytes::from(body)), MAX_READ)
                .await?;
            expect_success(status, &answer, "delete")
        })
    }
}

impl Inner {
    /// `{path}/{id}` with `id` as one percent-encoded segment.
    ///
    /// Refused as [`invalid_key`](StoreError::invalid_key): a key too long
    /// for a URL, and the keys `""`, `.` and `..`. Whatever their encoding,
    /// those three name `{url}/` (the load-all endpoint) or `{url}/..` (another
    /// endpoint) once a server or proxy normalises the path, since RFC 3986
    /// reads `%2E` as `.` (sections 2.3 and 6.2.2).
    fn session_path(&self, key: &str) -> Result<String, StoreError> {
        if matches!(key, "" | "." | "..") {
            return Err(StoreError::invalid_key(format!(
                "{key:?} cannot be a path segment of its own"
            ))
            .with_message(format!("the webhook cannot hold session key {key:?}")));
        }
        let base = self.collection.trim_end_matches('/');
        let path = format!("{base}/{}", super::percent_encoded(key));
        // A URI has a limit of its own (about 64 KiB in `http`).
        if http::Uri::try_from(format!("{}{path}{}", self.origin, self.query)).is_err() {
            return Err(StoreError::invalid_key(format!(
                "a key of {} bytes makes too long a URL",
                key.len()
            ))
            .with_message("the webhook cannot hold this session key"));
        }
        Ok(path)
    }

    /// One call: attempts with timeout, retries on connection errors and
    /// answers that say to try later (see [`try_later`]). Returns the first
    /// other answer, read up to `limit` bytes.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), StoreError> {
        let path_and_query = format!("{path}{}", self.query);
        // What errors and logs show: a query may hold a secret (a
        // function key), so only its presence is, and so may a session's
        // key (an application's session cookie), so its segment is
        // `{key}`.
        let base = self.collection.trim_end_matches('/');
        let path_shown = match path
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            Some(key) if !key.is_empty() => format!("{base}/{{key}}"),
            _ => path.to_owned(),
        };
        let shown = format!("{path_shown}{}", hidden_query(&self.query));
        let mut attempt = 0u32;
        loop {
            let deadline = crate::time::later(tokio::time::Instant::now(), self.timeout);
            // The semaphore is never closed. The turn is the attempt's:
            // given back before a backoff, which holds no connection.
            let Ok(turn) = tokio::time::timeout_at(deadline, self.permits.acquire()).await else {
                return Err(StoreError::timeout("no turn to call the webhook").with_message(
                    format!(
                        "{method} {shown}: not sent; the store's other calls (max_concurrent_calls) took the {:?} it may wait",
                        self.timeout
                    ),
                ));
            };
            let outcome = tokio::time::timeout_at(
                deadline,
                self.exchange(&method, &path_and_query, body.clone(), limit),
            )
            .await;
            drop(turn);
            let (failure, asked) = match outcome {
                Err(elapsed) => {
                    return Err(StoreError::timeout(elapsed).with_message(format!(
                        "{method} {shown}: no answer within {:?}",
                        self.timeout
                    )))
                }
                Ok(Err(Failure::Fatal(e))) => return Err(e),
                Ok(Err(Failure::Retry(e))) => (e, None),
                // A proxy's own timeout: the service may still be writing,
                // and a write sent again could land before it and be
                // undone, as after a timeout of this client's.
                Ok(Ok((StatusCode::GATEWAY_TIMEOUT, _, answer))) if method != Method::GET => {
                    let status = StatusError::new(StatusCode::GATEWAY_TIMEOUT, &answer);
                    return Err(StoreError::timeout(status).with_message(format!(
                        "{method} {shown}: a gateway timed out waiting for the service"
                    )));
                }
                Ok(Ok((status, headers, answer))) if try_later(status) => (
                    StoreError::unavailable(StatusError::new(status, &answer)),
                    retry_after(&headers),
                ),
                Ok(Ok((status, _, answer))) => return Ok((status, answer)),
            };
            if attempt >= self.retries {
                let message = format!("{method} {shown}: failed after {} attempt(s)", attempt + 1);
                return Err(failure.with_message(message));
            }
            tracing::debug!(%method, path = %shown, attempt, error = %crate::error::Report(&failure), "webhook call failed, retrying");
            tokio::time::sleep(wait(self.backoff, attempt, asked)).await;
            attempt += 1;
        }
    }

    /// One attempt, answering a Digest challenge once if needed.
    async fn exchange(
        &self,
        method: &Method,
        path_and_query: &str,
        body: Option<Bytes>,
        limit: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), Failure> {
        let mut answered_fresh_challenge = false;
        loop {
            let authorization = self.authorization(method, path_and_query, body.as_deref())?;
            let (status, headers, answer) = self
                .send(method, path_and_query, body.clone(), authorization, limit)
                .await?;
            if let (StatusCode::UNAUTHORIZED, Auth::Digest { .. }) = (status, &self.auth) {
                let challenge = headers
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(digest_challenge);
                if let Some(challenge) = challenge {
                    let parsed = digest_auth::parse(challenge).map_err(|e| {
                        Failure::Fatal(
                            StoreError::unauthorized(e)
                                .with_message("cannot read the Digest challenge"),
                        )
                    })?;
                    let stale = parsed.stale;
                    *self.challenge.lock() = Some(parsed);
                    if !answered_fresh_challenge {
                        answered_fresh_challenge = true;
                        continue;
                    }
                    if stale {
                        // The credentials were right, the nonce out of date
                        // again (requests sharing a challenge reached a
                        // server that checks their order): a failure worth
                        // another attempt, not an authorization error.
                        return Err(Failure::Retry(
                            StoreError::unavailable(StatusError::new(status, &answer))
                                .with_message("the Digest nonce went stale again"),
                        ));
                    }
                }
            }
            return Ok((status, headers, answer));
        }
    }

    fn authorization(
        &self,
        method: &Method,
        path_and_query: &str,
        body: Option<&[u8]>,
    ) -> Result<Option<String>, Failure> {
        match &self.auth {
            Auth::None => Ok(None),
            Auth::Basic(header) => Ok(Some(header.clone())),
            Auth::Digest { user, password } => {
                let mut challenge = self.challenge.lock();
                let Some(challenge) = challenge.as_mut() else {
                    return Ok(None); // the service will send one
                };
                let context = digest_auth::AuthContext::new_with_method(
                    user.as_str(),
                    password.as_str(),
                    path_and_query,
                    body,
                    digest_auth::HttpMethod::from(method.as_str().to_owned()),
                );
                let answer = challenge.respond(&context).map_err(|e| {
                    Failure::Fatal(
                        StoreError::unauthorized(e)
                            .with_message("cannot answer the Digest challenge"),
                    )
                })?;
                Ok(Some(answer.to_header_string()))
            }
        }
    }

    async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        body: Option<Bytes>,
        authorization: Option<String>,
        limit: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), Failure> {
        let uri = format!("{}{path_and_query}", self.origin);
        let mut request = Request::builder().method(method.clone()).uri(uri);
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| {
                Failure::Fatal(StoreError::other(e).with_message("cannot build the request"))
            })?;
        let response = self.client.request(request).await.map_err(|e| {
            if *method == Method::GET || never_sent(&e) {
                Failure::Retry(StoreError::unavailable(e).with_message("webhook unreachable"))
            } else {
                // The service may have the write, and may still apply it
                // after a write sent again, as after a timeout.
                Failure::Fatal(StoreError::unavailable(e).with_message(format!(
                    "the connection failed after the {method} was sent; not sent again"
                )))
            }
        })?;
        let (parts, body) = response.into_parts();
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Failure::Fatal(
                    StoreError::rejected(e)
                        .with_message(format!("the answer is larger than {limit} bytes")),
                ))
            }
            Err(e) if *method == Method::GET => {
                return Err(Failure::Retry(
                    StoreError::unavailable(e).with_message("the answer was cut off"),
                ))
            }
            // A write that failed says how by its status alone, which
            // `call` judges (a 503 is retried, say): its body is not needed.
            Err(_) if !parts.status.is_success() => Bytes::new(),
            Err(e) => {
                // The service had the write, and answered that it did.
                return Err(Failure::Fatal(StoreError::unavailable(e).with_message(
                    format!("the answer to the {method} was cut off; not sent again"),
                )));
            }
        };
        Ok((parts.status, parts.headers, bytes))
    }
}

/// Whether a failed exchange never sent the request: a connection that
/// could not be opened or readied (the error names no connection), or one
/// that handed the request back unwritten.
fn never_sent(error: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error as _;
    error.is_connect()
        || error.connect_info().is_none()
        || error
            .source()
            .and_then(|e| e.downcast_ref::<hyper::Error>())
            .is_some_and(hyper::Error::is_canceled)
}

/// The parameters of the Digest challenge in a `WWW-Authenticate` value,
/// which may list several challenges (`Basic realm="a", Digest realm="b",
/// nonce="c"`); schemes are case-insensitive (RFC 9110, section 11.1).
fn digest_challenge(value: &str) -> Option<&str> {
    crate::key::quoted_list_elements(value.as_bytes()).find_map(|element| {
        let start = element.iter().position(|&b| b != b' ' && b != b'\t')?;
        let element = &element[start..];
        // No scheme starts with a quote: a quoted string at the start of
        // an element is no challenge, and nothing in it is one.
        let scheme = element.split(|&b| b == b' ' || b == b'\t').next()?;
        if !scheme.eq_ignore_ascii_case(b"digest") || element.len() == scheme.len() {
            return None;
        }
        // Where the scheme ends in `value`: the element is a part of it.
        let at = element.as_ptr() as usize - value.as_ptr() as usize + scheme.len();
        value.get(at..)
    })
}

enum Failure {
    /// A connection error: worth another attempt.
    Retry(StoreError),
    /// Anything else.
    Fatal(StoreError),
}

/// What errors and `Debug` show of a URL's query: it may hold a secret.
const HIDDEN_QUERY: &str = "?…";

/// [`HIDDEN_QUERY`] for a query (with its `?`), nothing for none.
fn hidden_query(query: &str) -> &'static str {
    if query.is_empty() {
        ""
    } else {
        HIDDEN_QUERY
    }
}

/// `url` without its user information (see `hide_user_info`), and its
/// query shown as `?…` (it may hold a key). A `?` before the last `@` is
/// either a query holding an `@` or a password holding a `?`: all but the
/// scheme is hidden then.
fn redact(url: &str) -> String {
    let start = crate::error::after_scheme(url, 0);
    let rest = &url[start..];
    match rest.find('?') {
        Some(query) if rest.rfind('@').is_some_and(|at| at > query) => {
            format!("{}***{HIDDEN_QUERY}", &url[..start])
        }
        Some(query) => {
            let shown = crate::error::hide_user_info(&url[..start + query], 0);
            format!("{shown}{HIDDEN_QUERY}")
        }
        None => crate::error::hide_user_info(url, 0),
    }
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

/// The wait before the retry that follows `attempt`: the backoff, or
/// longer when the service asked for it (`Retry-After`), at most
/// [`MAX_BACKOFF`].
fn wait(base: Duration, attempt: u32, asked: Option<Duration>) -> Duration {
    backoff(base, attempt)
        .max(asked.unwrap_or_default())
        .min(MAX_BACKOFF)
}

/// Whether an answer says "try again later": a 5xx, `408 Request Timeout`
/// or `429 Too Many Requests`. Such answers are retried and end as
/// [`unavailable`](StoreError::is_unavailable).
fn try_later(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
        )
}

/// The wait a `Retry-After` header asks for, when given in seconds (digits
/// only, RFC 9110 section 10.2.3).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds = crate::key::decimal(headers.get(RETRY_AFTER)?.as_bytes().trim_ascii())?;
    Some(Duration::from_secs(seconds))
}

/// Maps every status but 200, 201 and 204 to its error. Another 2xx
/// (`202 Accepted`, `206 Partial Content`, ...) does not say the call took
/// effect, so it is an error too rather than a log line.
fn expect_success(status: StatusCode, body: &[u8], what: &str) -> Result<(), StoreError> {
    match status {
        StatusCode::OK | StatusCode::CREATED | StatusCode::NO_CONTENT => Ok(()),
        _ => Err(failure(status, body, what)),
    }
}

/// Whether a load's answer holds records: `true` for a body to read
/// (200), `false` for nothing stored (`204 No Content`; Enterprise Gateway
/// loads nothing from any answer but 200), or the error of any other
/// status.
fn holds_records(status: StatusCode, body: &[u8], what: &str) -> Result<bool, StoreError> {
    match status {
        StatusCode::OK => Ok(true),
        StatusCode::NO_CONTENT => Ok(false),
        _ => Err(failure(status, body, what)),
    }
}

/// The error of a call answered `status`.
fn failure(status: StatusCode, body: &[u8], what: &str) -> StoreError {
    let error = StatusError::new(status, body);
    let error = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => StoreError::unauthorized(error),
        StatusCode::NOT_FOUND => StoreError::not_found(error),
        s if try_later(s) => StoreError::unavailable(error),
        _ => StoreError::rejected(error),
    };
    error.with_message(format!("{what}: the webhook answered {status}"))
}

/// Above this many bytes, a listing is parsed on tokio's blocking pool.
const PARSE_INLINE: usize = 256 * 1024;

/// The most unreadable elements a listing may have: an answer with more is
/// no listing of sessions (a body of `[0,0,0,...]` would otherwise make
/// hundreds of millions of skipped records and log lines).
const MAX_SKIPPED: usize = 10_000;

/// The answer to load all: a JSON array, whose elements are read one by
/// one as the answer is parsed, so that one that cannot be read (nested
/// deeper than the parser goes, say) is skipped while the others load, and
/// the answer is never held twice. A leading byte order mark is ignored.
fn parse_all(body: &[u8]) -> Result<Loaded, StoreError> {
    use serde::de::{Deserializer as _, Error as _, SeqAccess, Visitor};
    use serde_json::value::RawValue;

    /// Where the elements go, the text read, and where in it bytes that
    /// were not UTF-8 were replaced (see [`replace_not_utf8`]).
    struct Listing<'a>(&'a mut Loaded, &'a str, &'a [usize]);

    impl<'de> Visitor<'de> for Listing<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON array")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0usize;
            // Skipping over a value is not bounded in depth: an error here
            // is the answer's.
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                let raw = raw.get();
                // Where it starts in the text: a `&'de RawValue` is
                // borrowed from the input, which is that text.
                let start = (raw.as_ptr() as usize).wrapping_sub(self.1.as_ptr() as usize);
                let first_after = self.2.partition_point(|&at| at < start);
                let replaced = self
                    .2
                    .get(first_after)
                    .is_some_and(|&at| at < start + raw.len());
                read_element(self.0, i, raw, replaced);
                if self.0.skipped.len() > MAX_SKIPPED {
                    return Err(A::Error::custom("too many unreadable elements"));
                }
                i += 1;
            }
            Ok(())
        }
    }

    let not_json =
        |e: crate::BoxError| StoreError::corrupt(e).with_message("the answer is not JSON");
    let body = without_bom(body);
    // A record holding bytes that are not UTF-8 (written by another client)
    // is skipped alone: the answer is read with those bytes replaced, and
    // each element in which one was replaced is skipped, as its record
    // cannot be read back as written. (A replacement character the service
    // sent as such is text like any other.)
    let mut replaced = Vec::new();
    let text = match std::str::from_utf8(body) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => std::borrow::Cow::Owned(replace_not_utf8(body, &mut replaced)),
    };
    let text = &*text;
    let mut loaded = Loaded::default();
    let mut parser = serde_json::Deserializer::from_str(text);
    let parsed = (&mut parser)
        .deserialize_seq(Listing(&mut loaded, text, &replaced))
        .and_then(|()| parser.end());
    match parsed {
        Ok(()) => Ok(loaded),
        Err(_) if loaded.skipped.len() > MAX_SKIPPED => Err(StoreError::corrupt(ShapeError(
            format!("more than {MAX_SKIPPED} elements of the answer cannot be read"),
        ))
        .with_message("the answer is no listing of sessions")),
        Err(e) => Err(match serde_json::from_str::<&RawValue>(text) {
            Err(e) => not_json(e.into()),
            Ok(_) => StoreError::corrupt(ShapeError(format!(
                "load all must answer a JSON array ({e})"
            )))
            .with_message("the answer has the wrong shape"),
        }),
    }
}

/// `body` read as text with each run of bytes that are not UTF-8 replaced
/// by U+FFFD (as [`String::from_utf8_lossy`] does), and where in the text
/// each replacement was put, in order, pushed to `at`.
fn replace_not_utf8(body: &[u8], at: &mut Vec<usize>) -> String {
    let mut text = String::with_capacity(body.len());
    for chunk in body.utf8_chunks() {
        text.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            at.push(text.len());
            text.push(char::REPLACEMENT_CHARACTER);
        }
    }
    text
}

/// `body` without a leading UTF-8 byte order mark, which some services
/// write and JSON readers skip.
fn without_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Reads element `i` of a listing, `raw`, into `loaded`: a session, or a
/// record skipped with why. `replaced`: bytes in it that were not UTF-8
/// were replaced, so it is not the record as written.
fn read_element(loaded: &mut Loaded, i: usize, raw: &str, replaced: bool) {
    let read = if replaced {
        Err(StoreError::corrupt(ShapeError(
            "the record holds bytes that are not UTF-8".into(),
        )))
    } else {
        serde_json::from_str::<serde_json::Value>(raw).map_err(StoreError::corrupt)
    };
    let (name, parsed) = match read {
        Ok(element) => (element_name(&element), parse_element(element)),
        Err(e) => (None, Err(e.with_message("unreadable element"))),
    };
    match parsed {
        Ok((_, session)) => loaded.sessions.push(session),
        Err(e) => {
            let name = name.unwrap_or_else(|| format!("#{i}"));
            tracing::warn!(record = %name, error = %crate::error::Report(&e), "skipping unreadable webhook session");
            loaded.skip(name, e);
        }
    }
}

/// The id of an element, if it has the right outline.
fn element_name(element: &serde_json::Value) -> Option<String> {
    let inner = element.get(SESSION_FIELD)?.as_object()?;
    inner.keys().next().cloned()
}

/// `{"kernel_session": {"<id>": session}}` → `(id, session)`.
fn parse_element(element: serde_json::Value) -> Result<(String, Session), StoreError> {
    let shape =
        |why: &str| StoreError::corrupt(ShapeError(why.to_owned())).with_message("wrong shape");
    let serde_json::Value::Object(mut outer) = element else {
        return Err(shape("an element must be a JSON object"));
    };
    let Some(serde_json::Value::Object(inner)) = outer.remove(SESSION_FIELD) else {
        return Err(shape("an element needs a \"kernel_session\" object"));
    };
    if inner.len() != 1 {
        return Err(shape("\"kernel_session\" must hold exactly one id"));
    }
    let Some((id, record)) = inner.into_iter().next() else {
        return Err(shape("\"kernel_session\" must hold exactly one id"));
    };
    let session: Session = serde_json::from_value(record)
        .map_err(|e| StoreError::corrupt(e).with_message(format!("{id:?} is not a session")))?;
    if session.key != id {
        return Err(shape("the session's key differs from its id"));
    }
    Ok((id, session))
}

/// A status the call did not expect, with the start of the answer.
#[derive(Debug)]
struct StatusError {
    status: StatusCode,
    body: String,
}

impl StatusError {
    fn new(status: StatusCode, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        let body: String = text.chars().take(200).collect();
        StatusError { status, body }
    }
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "status {}", self.status)?;
        if !self.body.is_empty() {
            write!(f, ": {}", self.body)?;
        }
        Ok(())
    }
}

impl StdError for StatusError {}

/// An answer that is JSON but not of the expected shape.
#[derive(Debug)]
struct ShapeError(String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for ShapeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_challenge_is_found_in_any_case_and_among_others() {
        let params = r#"realm="r", qop="auth", nonce="n1", opaque="o""#;
        for value in [
            format!("Digest {params}"),
            format!("digest {params}"),
            format!("DIGEST\t{params}"),
            format!(r#"Basic realm="a, Digest b", Digest {params}"#),
            format!(r#"Bearer realm="x", error="a\"b", digest {params}"#),
        ] {
            let found = digest_challenge(&value).unwrap_or_else(|| panic!("none in {value}"));
            assert_eq!(found.trim_start(), params, "in {value}");
            let parsed = digest_auth::parse(found).unwrap();
            assert_eq!(parsed.nonce, "n1");
        }
        // The challenge may come first, with another after it.
        let first = format!(r#"Digest {params}, Basic realm="a""#);
        assert_eq!(
            digest_auth::parse(digest_challenge(&first).unwrap())
                .unwrap()
                .nonce,
            "n1"
        );
        for value in [
            r#"Basic realm="Digest realm""#,
            "Basic digest=1",
            "Digest",
            "Digestive realm=x",
            "",
        ] {
            assert_eq!(digest_challenge(value), None, "in {value}");
        }
    }

    /// An escaped character inside a quoted string that is not ASCII:
    /// the scan steps into it, where no scheme can start.
    #[test]
    fn an_escape_before_a_character_beyond_ascii_is_no_challenge() {
        assert_eq!(digest_challenge("\"\\é"), None);
        assert_eq!(digest_challenge("\"Digest realm=r\""), None);
        assert_eq!(
            digest_challenge("Basic realm=a, \"Digest realm=evil\", Digest realm=good"),
            Some(" realm=good")
        );
        assert_eq!(
            digest_challenge("\"\\é\", Digest realm=r"),
            Some(" realm=r")
        );
    }

    #[test]
    fn ids_are_one_path_segment() {
        let store = WebhookStore::builder("http://127.0.0.1:1/api/sessions/")
            .build()
            .unwrap();
        // `/` is encoded, so the key stays one segment, and that segment
        // is not a dot segment. (The dots go as they are: a server may
        // decode `%2E` back to `.` anyway.)
        assert_eq!(
            store.inner.session_path("../a b/%").unwrap(),
            "/api/sessions/..%2Fa%20b%2F%25",
        );
        // The URL as given.
        assert_eq!(store.url(), "http://127.0.0.1:1/api/sessions/");
    }

    #[test]
    fn keys_that_are_dot_segments_or_empty_are_invalid() {
        let store = WebhookStore::builder("http://127.0.0.1:1/api/sessions")
            .build()
            .unwrap();
        for key in ["", ".", ".."] {
            let err = store.inner.session_path(key).unwrap_err();
            assert!(err.is_invalid_key(), "{key:?}: {err:?}");
        }
        assert!(store.inner.session_path("...").is_ok());
        assert!(store.inner.session_path(".a").is_ok());
    }

    #[test]
    fn a_key_too_long_for_a_url_is_invalid() {
        let store = WebhookStore::builder("http://127.0.0.1:1/api/sessions")
            .build()
            .unwrap();
        // Each `/` takes three bytes once encoded.
        let err = store.inner.session_path(&"/".repeat(22_000)).unwrap_err();
        assert!(err.is_invalid_key(), "{err:?}");
        assert!(store.inner.session_path(&"/".repeat(20_000)).is_ok());
    }

    #[test]
    fn a_zero_timeout_is_refused() {
        let builder = WebhookStore::builder("http://h/api");
        let err = builder.timeout(Duration::ZERO).build().unwrap_err();
        assert!(err.is_other(), "{err:?}");
        let why = std::error::Error::source(&err).unwrap().to_string();
        assert!(why.contains("above zero"), "{why}");
        let builder = WebhookStore::builder("http://h/api");
        assert!(builder.timeout(Duration::from_millis(1)).build().is_ok());
    }

    #[test]
    fn only_http_urls_with_numeric_ports() {
        for url in [
            "https://x/y",
            "not a url",
            "/relative",
            "http://h:pa/api",
            "http://h:65536/api",
            "http://[::1]:x/api",
        ] {
            let err = WebhookStore::builder(url).build().unwrap_err();
            assert!(err.is_other(), "{url}: {err:?}");
        }
        for (url, why) in [
            ("http://[::1]8080/api", "the port is not a number"),
            ("http://h:+80/api", "the port is not a number"),
            ("http://:8080/api", "the URL needs a host"),
        ] {
            let err = WebhookStore::builder(url).build().unwrap_err();
            let shown = crate::error::Report(&err).to_string();
            assert!(err.is_other() && shown.contains(why), "{url}: {shown}");
        }
        for url in [
            "http://h/api",
            "http://h:8080/api",
            "http://[::1]:8080/api",
            "http://h:/api",
        ] {
            assert!(WebhookStore::builder(url).build().is_ok(), "{url}");
        }
    }

    #[test]
    fn credentials_in_the_url_are_refused_and_never_shown() {
        for url in [
            "http://gateway:s3cret@h:8080/api",
            "http://gateway@h/api",
            "http://:s3cret@h",
            // Passwords that end the authority early.
            "http://gw:pa?s3cret@h/api",
            "http://gw:12/s3cret@127.0.0.1/api",
            "http://gw:pa#s3cret@h/api",
        ] {
            let builder = WebhookStore::builder(url);
            assert!(!format!("{builder:?}").contains("s3cret"), "{builder:?}");
            let err = builder.build().unwrap_err();
            assert!(err.is_other(), "{url}: {err:?}");
            let shown = format!("{err} {err:?}");
            assert!(shown.contains(".basic_auth"), "{shown}");
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        // A bad URL is shown without its password too.
        let err = WebhookStore::builder("http://u:s3cret@h/a b")
            .build()
            .unwrap_err();
        assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
        assert_eq!(redact("http://h/a"), "http://h/a");
        assert_eq!(redact("http://u:p@h/x"), "http://***@h/x");
        assert_eq!(redact("http://u:p/q#s@h/x"), "http://***@h/x");
        assert_eq!(redact("http://h/a?code=k3y"), "http://h/a?…");
        assert_eq!(redact("http://u:p@h/a?code=k3y"), "http://***@h/a?…");
        // No scheme, and `://` in the password or the query.
        assert_eq!(redact("u:p://w@h/x"), "***@h/x");
        assert_eq!(redact("h/a?next=http://k3y"), "h/a?…");
        // A `?` before the last `@`: in a password, or in a query holding an
        // `@`, whose end a cut at the `@` would show.
        assert_eq!(redact("http://u:p/q?r#s@h/x"), "http://***?…");
        assert_eq!(redact("http://h/a?owner=o@corp&code=k3y"), "http://***?…");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_millis(100);
        assert_eq!(backoff(base, 0), base);
        assert_eq!(backoff(base, 2), Duration::from_millis(400));
        assert_eq!(backoff(base, 40), MAX_BACKOFF);
    }

    #[test]
    fn retry_after_lengthens_the_wait_up_to_the_cap() {
        let base = Duration::from_millis(100);
        assert_eq!(wait(base, 1, None), Duration::from_millis(200));
        assert_eq!(
            wait(base, 1, Some(Duration::ZERO)),
            Duration::from_millis(200)
        );
        assert_eq!(
            wait(base, 0, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(wait(base, 0, Some(Duration::from_secs(3600))), MAX_BACKOFF);
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, http::HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None, "only seconds are read");
    }

    /// `Retry-After: text`.
    fn retry_after_of(text: &[u8]) -> Option<http::HeaderMap> {
        let mut headers = http::HeaderMap::new();
        headers.insert(RETRY_AFTER, http::HeaderValue::from_bytes(text).ok()?);
        Some(headers)
    }

    /// An HTTP-date in each of its three forms (RFC 9110 section 5.6.7).
    fn http_dates() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        (
            "(Mon|Tue|Wed|Thu|Fri|Sat|Sun)",
            "(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)",
            1u8..=31,
            "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)",
            1970u16..=9999,
            (0u8..24, 0u8..60, 0u8..61),
            0u8..3,
        )
            .prop_map(
                |(day, long_day, date, month, year, (h, m, s), form)| match form {
                    0 => format!("{day}, {date:02} {month} {year} {h:02}:{m:02}:{s:02} GMT"),
                    1 => format!(
                        "{long_day}, {date:02}-{month}-{:02} {h:02}:{m:02}:{s:02} GMT",
                        year % 100
                    ),
                    _ => format!("{day} {month} {date:>2} {h:02}:{m:02}:{s:02} {year}"),
                },
            )
    }

    /// Text that is not digits between optional spaces: numbers with a
    /// sign, a fraction or an exponent, words, nothing, or any characters.
    fn not_seconds() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "[ \t]{0,2}[+-]?[0-9]{0,4}([.,eE_][+-]?[0-9]{0,3})?[ \t]{0,2}",
            "[ \t0-9+.,:eE_a-z-]{0,12}",
            "\\PC{0,12}",
        ]
        .prop_filter("not seconds", |text| {
            let digits = text.trim_matches([' ', '\t']);
            digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit())
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes, digits and spaces most often, are read without a
        /// panic (a value a header cannot hold is left out), and a wait
        /// read is one written in them.
        #[test]
        fn any_retry_after_is_read(
            value in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::any::<u8>(),
                    proptest::sample::select(b" \t0123456789+-".to_vec()),
                ],
                0..30,
            ),
        ) {
            if let Some(wait) = retry_after_of(&value).as_ref().and_then(retry_after) {
                let text = String::from_utf8_lossy(&value).into_owned();
                proptest::prop_assert!(text.contains(&wait.as_secs().to_string()), "{:?}", text);
            }
        }

        /// Seconds, leading zeros and spaces around included, are read
        /// as that many seconds.
        #[test]
        fn seconds_are_read(
            before in "[ \t]{0,3}",
            zeros in 0usize..3,
            seconds: u64,
            after in "[ \t]{0,3}",
        ) {
            let text = format!("{before}{}{seconds}{after}", "0".repeat(zeros));
            let headers = retry_after_of(text.as_bytes()).unwrap();
            proptest::prop_assert_eq!(retry_after(&headers), Some(Duration::from_secs(seconds)));
        }

        /// An HTTP-date, in any of its forms, is no wait in seconds.
        #[test]
        fn a_date_is_not_read(date in http_dates()) {
            let headers = retry_after_of(date.as_bytes()).unwrap();
            proptest::prop_assert_eq!(retry_after(&headers), None, "{}", date);
        }

        /// Text that is not digits between optional spaces (RFC 9110
        /// section 10.2.3: `delay-seconds = 1*DIGIT`) is no wait.
        #[test]
        fn anything_but_seconds_is_not_read(text in not_seconds()) {
            if let Some(headers) = retry_after_of(text.as_bytes()) {
                proptest::prop_assert_eq!(retry_after(&headers), None, "{:?}", text);
            }
        }
    }

    #[test]
    fn debug_hides_credentials() {
        // The Basic token of `u:secret` is `dTpzZWNyZXQ=`.
        let builder = WebhookStore::builder("http://h/").basic_auth("u", "secret");
        assert!(!format!("{builder:?}").contains("dTpzZWNyZXQ"));
        let store = builder.build().unwrap();
        assert!(!format!("{store:?}").contains("dTpzZWNyZXQ"));
        let builder = WebhookStore::builder("http://h/").digest_auth("u", "secret");
        assert!(!format!("{builder:?}").contains("secret"));
        let store = builder.build().unwrap();
        assert!(!format!("{store:?}").contains("secret"));
    }

    mod generated {
        //! Answers and challenges of any content.

        use super::*;
        use crate::store::tests::generated::{nested, sessions};
        use proptest::prelude::*;
        use serde_json::json;

        /// The element a listing holds for `session`.
        fn element(session: &Session) -> serde_json::Value {
            json!({ SESSION_FIELD: { session.key.clone(): session } })
        }

        /// Elements that are no session, each with why.
        fn bad_elements() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("0".to_owned()),
                Just("null".to_owned()),
                Just(r#"{"kernel_session": {}}"#.to_owned()),
                Just(r#"{"kernel_session": {"a": 1, "b": 2}}"#.to_owned()),
                Just(r#"{"other": {"k": {}}}"#.to_owned()),
                // A record under another id than its key.
                Just(
                    r#"{"kernel_session": {"x": {"key": "y", "backend": "b", "created": 0, "last_seen": 0}}}"#
                        .to_owned()
                ),
                // A record whose time is out of range.
                Just(
                    r#"{"kernel_session": {"k": {"key": "k", "backend": "b", "created": -1, "last_seen": 0}}}"#
                        .to_owned()
                ),
                // Nested deeper than a record can be read.
                (120usize..5_000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
                (crate::store::MAX_DATA_DEPTH + 30..1_000).prop_map(|d| {
                    element(&Session::new("deep", "b".into()).with_data(nested(d, json!(1))))
                        .to_string()
                }),
            ]
        }

        /// A `WWW-Authenticate` challenge: a scheme and its parameters, whose
        /// quoted strings may hold commas, escaped quotes and the word
        /// `Digest`.
        fn challenges() -> impl Strategy<Value = (String, String)> {
            (
                "(Basic|Bearer|Newauth|Digest|digest|DIGEST|Digestive)",
                proptest::collection::vec(
                    (
                        "(realm|nonce|qop|opaque|error|charset)",
                        prop_oneof![
                            "[a-zA-Z0-9]{1,6}",
                            "\"([a-z ,=]|Digest |\\\\\"|\\\\\\\\){0,12}\"",
                        ],
                    )
                        .prop_map(|(name, value)| format!("{name}={value}")),
                    1..4,
                ),
                "( |\t|  )",
            )
                .prop_map(|(scheme, params, space)| {
                    (scheme, params.join(", ").replacen("", &space, 1))
                })
        }

        /// Sessions, half of them holding a replacement character as
        /// text, which an answer that is not all UTF-8 elsewhere keeps.
        fn whole() -> impl Strategy<Value = Session> {
            (sessions(), any::<bool>()).prop_map(|(mut s, replacement)| {
                if replacement {
                    s.data = serde_json::Value::from("\u{fffd}");
                }
                s
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            /// A header of any characters is looked through without a
            /// panic, and what is found follows a `Digest` in it.
            #[test]
            fn a_header_of_any_text_is_looked_through(
                value in prop_oneof![
                    "\\PC{0,40}",
                    proptest::collection::vec(
                        prop_oneof![
                            Just("\""), Just("\\"), Just(","), Just("é"), Just("Digest "),
                        ],
                        0..12,
                    )
                    .prop_map(|parts| parts.concat()),
                ],
            ) {
                if let Some(found) = digest_challenge(&value) {
                    let start = value.len() - found.len();
                    prop_assert!(value[..start].to_ascii_lowercase().ends_with("digest"), "{:?}", value);
                }
            }

        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// In a list of challenges, the parameters of the first whose
            /// scheme is `Digest` (in any case) are found, wherever the
            /// word stands inside quoted strings.
            #[test]
            fn the_first_digest_challenge_is_found(list in proptest::collection::vec(challenges(), 0..4)) {
                let mut value = String::new();
                let mut expected = None;
                for (scheme, params) in &list {
                    if !value.is_empty() {
                        value.push_str(", ");
                    }
                    value.push_str(scheme);
                    if expected.is_none() && scheme.eq_ignore_ascii_case("digest") {
                        expected = Some(value.len());
                    }
                    value.push_str(params);
                }
                prop_assert_eq!(digest_challenge(&value), expected.map(|at| &value[at..]), "{:?}", value);
            }

            /// A listing reads back every session it holds, in order, with a
            /// byte order mark or without, around elements that are no
            /// session, which are skipped one by one.
            #[test]
            fn a_listing_reads_its_sessions_and_skips_the_rest(
                items in proptest::collection::vec(
                    prop_oneof![
                        3 => sessions().prop_map(Ok),
                        1 => bad_elements().prop_map(Err),
                    ],
                    0..6,
                ),
                bom in any::<bool>(),
            ) {
                let mut body = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
                body.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        body.extend_from_slice(b" ,\n");
                    }
                    match item {
                        Ok(session) => body.extend(element(session).to_string().into_bytes()),
                        Err(bad) => body.extend_from_slice(bad.as_bytes()),
                    }
                }
                body.push(b']');
                let loaded = parse_all(&body).unwrap();
                let good: Vec<&Session> = items.iter().filter_map(|i| i.as_ref().ok()).collect();
                prop_assert_eq!(loaded.sessions.iter().collect::<Vec<_>>(), good);
                prop_assert_eq!(loaded.skipped.len(), items.len() - loaded.sessions.len());
                for skipped in &loaded.skipped {
                    prop_assert!(skipped.error.is_corrupt(), "{:?}", skipped.error);
                }
            }

            /// An element holding bytes that are not UTF-8 is skipped alone.
            #[test]
            fn an_element_not_utf8_is_skipped_alone(
                before in proptest::collection::vec(whole(), 0..3),
                after in proptest::collection::vec(whole(), 0..3),
                bad in proptest::collection::vec(0x80u8..=0xff, 1..4),
            ) {
                let mut body = b"[".to_vec();
                let mut elements: Vec<Vec<u8>> = before.iter().map(|s| element(s).to_string().into_bytes()).collect();
                let mut broken = br#"{"kernel_session": {"k": {"key": "k"#.to_vec();
                broken.extend(&bad);
                broken.extend_from_slice(br#"", "backend": "b", "created": 0, "last_seen": 0}}}"#);
                elements.push(broken);
                elements.extend(after.iter().map(|s| element(s).to_string().into_bytes()));
                body.extend(elements.join(&b',').into_iter());
                body.push(b']');
                prop_assume!(std::str::from_utf8(&body).is_err());
                let loaded = parse_all(&body).unwrap();
                let good: Vec<&Session> = before.iter().chain(&after).collect();
                prop_assert_eq!(loaded.sessions.iter().collect::<Vec<_>>(), good);
                prop_assert_eq!(loaded.skipped.len(), 1);
            }

            /// A key of any characters is one path segment that decodes back
            /// to it, or is refused as a key the service cannot hold.
            #[test]
            fn any_key_is_one_segment_or_refused(key in "\\PC{0,30}|[./%]{0,4}") {
                let store = WebhookStore::builder("http://127.0.0.1:1/api/sessions?t=1")
                    .build()
                    .unwrap();
                match store.inner.session_path(&key) {
                    Ok(path) => {
                        let segment = path.strip_prefix("/api/sessions/").unwrap();
                        prop_assert!(!segment.contains('/') && !matches!(segment, "" | "." | ".."));
                        let mut decoded = Vec::new();
                        let mut bytes = segment.bytes();
                        while let Some(b) = bytes.next() {
                            if b == b'%' {
                                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                                decoded.push(u8::from_str_radix(&hex, 16).unwrap());
                            } else {
                                decoded.push(b);
                            }
                        }
                        prop_assert_eq!(decoded, key.as_bytes());
                    }
                    Err(e) => {
                        prop_assert!(e.is_invalid_key());
                        prop_assert!(matches!(key.as_str(), "" | "." | ".."));
                    }
                }
            }

        }
    }
}
